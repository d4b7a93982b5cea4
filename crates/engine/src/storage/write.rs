//! Writing model files: a streaming safetensors writer (header planned up front, tensors
//! streamed in order, so nothing needs to sit in memory) and a hashing file writer.

use std::fs::File;
use std::hash::Hasher;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::packed::FileDigest;
use crate::error::{Error, Result};

/// Writes a model directory so that it appears complete or not at all: `fill` writes into a
/// hidden directory next to `dst` (with its `experts/` folder made), which is renamed to `dst`
/// only when `fill` succeeds and removed when it fails. An interrupted run leaves only the
/// hidden directory, which holds no manifest and so never loads as a packed model.
pub fn write_model_dir<T>(dst: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if dst.exists() {
        return Err(Error::InvalidInput(format!("{} already exists", dst.display())));
    }
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(tmp.join("experts")).map_err(|e| Error::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|value| {
        std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))?;
        Ok(value)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// A buffered file writer that counts bytes and hashes them (xxh3-64) as they pass.
pub struct HashingWriter {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: twox_hash::XxHash3_64,
    bytes: u64,
}

impl HashingWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(HashingWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(8 << 20, file),
            hasher: twox_hash::XxHash3_64::default(),
            bytes: 0,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.out.write_all(data).map_err(|e| Error::io(&self.path, e))?;
        self.hasher.write(data);
        self.bytes += data.len() as u64;
        Ok(())
    }

    pub fn write_zeros(&mut self, n: usize) -> Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROS.len());
            self.write(&ZEROS[..k])?;
            left -= k;
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes and syncs the file; returns its size and hash.
    pub fn finish(mut self) -> Result<FileDigest> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        self.out.get_ref().sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(FileDigest {
            bytes: self.bytes,
            xxh3: format!("{:016x}", self.hasher.finish()),
        })
    }
}

/// One tensor of a planned safetensors file.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    /// safetensors dtype name: `F32`, `F16`, `BF16`, `U32`.
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// Writes a safetensors file whose tensors are known up front and streamed in plan order.
pub struct SafetensorsWriter {
    out: HashingWriter,
    plan: Vec<PlannedTensor>,
    next: usize,
    /// Bytes of tensor `next` written so far.
    partial: usize,
}

impl SafetensorsWriter {
    /// Writes the header for `plan`; tensors must then be written in that order.
    pub fn create(path: &Path, plan: Vec<PlannedTensor>, metadata: &Map<String, Value>) -> Result<Self> {
        let mut header = Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), Value::Object(metadata.clone()));
        }
        let mut offset = 0usize;
        for t in &plan {
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes]}),
            );
            offset += t.bytes;
        }
        let mut text = serde_json::to_string(&Value::Object(header)).map_err(|error| Error::Json {
            path: path.to_path_buf(),
            error,
        })?;
        // Pad the header with spaces so the data starts 8-byte aligned, as the reference writer does.
        text.push_str(&" ".repeat((8 - text.len() % 8) % 8));
        let mut out = HashingWriter::create(path)?;
        out.write(&(text.len() as u64).to_le_bytes())?;
        out.write(text.as_bytes())?;
        Ok(SafetensorsWriter {
            out,
            plan,
            next: 0,
            partial: 0,
        })
    }

    /// Writes the next bytes of the planned tensors: a whole tensor or a piece of one.
    /// A piece never runs into the next tensor.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let planned = self.plan.get(self.next).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: more tensors written than planned",
                self.out.path.display()
            ))
        })?;
        if self.partial + data.len() > planned.bytes {
            return Err(Error::InvalidInput(format!(
                "{}: tensor `{}` gets more than its planned {} bytes",
                self.out.path.display(),
                planned.name,
                planned.bytes
            )));
        }
        self.partial += data.len();
        if self.partial == planned.bytes {
            self.next += 1;
            self.partial = 0;
        }
        self.out.write(data)
    }

    pub fn finish(self) -> Result<FileDigest> {
        if self.next != self.plan.len() {
            return Err(Error::InvalidInput(format!(
                "{}: {} of {} planned tensors written",
                self.out.path.display(),
                self.next,
                self.plan.len()
            )));
        }
        self.out.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::checkpoint::Checkpoint;

    #[test]
    fn written_file_reads_back_with_the_safetensors_parser() {
        let dir = tempfile::tempdir().unwrap();
        let plan = vec![
            PlannedTensor {
                name: "a".into(),
                dtype: "F32",
                shape: vec![2, 3],
                bytes: 24,
            },
            PlannedTensor {
                name: "b".into(),
                dtype: "BF16",
                shape: vec![5],
                bytes: 10,
            },
        ];
        let mut w = SafetensorsWriter::create(&dir.path().join("x.safetensors"), plan, &Map::new()).unwrap();
        w.write_tensor(&[1u8; 24]).unwrap();
        w.write_tensor(&[2u8; 10]).unwrap();
        let digest = w.finish().unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.require("a").unwrap().shape, vec![2, 3]);
        assert_eq!(ckpt.require("b").unwrap().data.bytes(), &[2u8; 10]);
        assert_eq!(
            digest.bytes,
            std::fs::metadata(dir.path().join("x.safetensors")).unwrap().len()
        );
    }
}
