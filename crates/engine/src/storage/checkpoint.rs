//! Safetensors checkpoints: one file or shards listed in `model.safetensors.index.json`,
//! memory-mapped, with every tensor's dtype, shape and byte range known up front.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use super::blob::Blob;
use crate::error::{Error, Result};

/// Element types the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::U32 => "U32",
        }
    }
}

/// One tensor of a checkpoint: where its bytes are and what they hold.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub file: PathBuf,
    /// `None` when the file stores a dtype the engine has no use for (reported on access).
    pub dtype: Option<DType>,
    pub raw_dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the tensor data in `file`.
    pub offset: u64,
    pub data: Blob,
}

impl TensorEntry {
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// The dtype, or an error naming the tensor when the file holds one we cannot read.
    pub fn dtype(&self) -> Result<DType> {
        self.dtype.ok_or_else(|| Error::TensorDtype {
            name: self.name.clone(),
            file: self.file.clone(),
            dtype: self.raw_dtype.clone(),
            message: "expected F32, F16, BF16 or U32".into(),
        })
    }
}

/// All tensors of a checkpoint directory, by name.
pub struct Checkpoint {
    pub dir: PathBuf,
    tensors: HashMap<String, TensorEntry>,
}

impl Checkpoint {
    /// Opens every safetensors file of `dir`: the shards named by
    /// `model.safetensors.index.json` when it exists, else every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = shard_files(dir)?;
        let mut tensors = HashMap::new();
        for file in files {
            for entry in read_file(&file)? {
                tensors.insert(entry.name.clone(), entry);
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            tensors,
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    pub fn require(&self, name: &str) -> Result<&TensorEntry> {
        self.get(name).ok_or_else(|| Error::MissingTensor { name: name.into() })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The files the tensors live in.
    pub fn files(&self) -> BTreeSet<&PathBuf> {
        self.tensors.values().map(|t| &t.file).collect()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index.clone(),
            error: source,
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::MissingField {
                path: index.clone(),
                field: "weight_map".into(),
            })?;
        let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::io(
            dir.join("model.safetensors"),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no safetensors files in the model directory",
            ),
        ));
    }
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<Vec<TensorEntry>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a checkpoint truncated while we run is outside our control,
    // as for every mmap-based loader.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let invalid = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| match e {
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::HeaderTooSmall => invalid(format!(
            "the file is truncated or incomplete ({} bytes; its header describes more)",
            map.len()
        )),
        e => invalid(e.to_string()),
    })?;
    let data_start = 8 + header_len;
    let map: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(map);
    let file_len = (*map).as_ref().len();
    let mut entries = Vec::new();
    for (name, info) in metadata.tensors() {
        let (begin, end) = info.data_offsets;
        let (start, stop) = (data_start + begin, data_start + end);
        if stop > file_len || begin > end {
            return Err(invalid(format!(
                "tensor `{name}` needs bytes {start}..{stop} but the file has {file_len} (truncated?)"
            )));
        }
        let dtype = match info.dtype {
            Dtype::F32 => Some(DType::F32),
            Dtype::F16 => Some(DType::F16),
            Dtype::BF16 => Some(DType::BF16),
            Dtype::U32 => Some(DType::U32),
            _ => None,
        };
        let expected = dtype.map(|d| d.size() * info.shape.iter().product::<usize>());
        if expected.is_some_and(|n| n != end - begin) {
            return Err(invalid(format!(
                "tensor `{name}` has {} bytes, its shape {:?} needs {}",
                end - begin,
                info.shape,
                expected.unwrap_or(0)
            )));
        }
        entries.push(TensorEntry {
            name: name.clone(),
            file: path.to_path_buf(),
            dtype,
            raw_dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
            offset: start as u64,
            data: Blob::slice_of(Arc::clone(&map), start, stop - start),
        });
    }
    Ok(entries)
}
