//! The packed model layout that `flash-moe convert` and `flash-moe synth` write:
//!
//! ```text
//! DIR/config.json, tokenizer files      as in the source
//! DIR/dense.safetensors                  every non-expert tensor, source names (mmap'd at run time)
//! DIR/experts/layer-NNN.bin              one file per MoE layer: fixed-size expert records
//! DIR/flash-moe.json                     the manifest: record layouts, per-record and per-file xxh3
//! ```
//!
//! An expert record holds gate, up and down (codes, scales, biases), each part 64-byte
//! aligned, the record padded to 4 KiB; expert `e` starts at `e * record_bytes`, so one
//! `pread` fetches one expert, with `O_DIRECT` if asked. The manifest is written last: a
//! directory without it is not a packed model.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::checkpoint::DType;
use super::io::{DIRECT_ALIGN, SourceFile};
use super::quant::Encoding;
use super::store::{ExpertLocator, MatrixSlots, RecordLayout, Segment, SlotAddr};
use super::write::HashingWriter;
use crate::error::{Error, Result};

pub const MANIFEST: &str = "flash-moe.json";
pub const FORMAT: &str = "flash-moe-packed";
pub const VERSION: u32 = 1;
pub const DENSE_FILE: &str = "dense.safetensors";
/// Alignment of each part inside a record.
const PART_ALIGN: usize = 64;

/// `flash-moe.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_by: String,
    pub source: String,
    pub layers: Vec<LayerRecords>,
    /// Every file of the model (relative path) with its size and xxh3-64.
    pub files: BTreeMap<String, FileDigest>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub xxh3: String,
}

/// The expert records of one MoE layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerRecords {
    pub layer: usize,
    pub file: String,
    pub num_experts: usize,
    pub record_bytes: usize,
    pub gate: MatrixRecord,
    pub up: MatrixRecord,
    pub down: MatrixRecord,
    /// xxh3-64 of each record, hex.
    pub checksums: Vec<String>,
}

/// One matrix inside a record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MatrixRecord {
    pub rows: usize,
    pub cols: usize,
    /// `dense` or `affine`.
    pub kind: String,
    /// Value dtype (dense) or scale dtype (affine): `f32`, `f16`, `bf16`.
    pub dtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<usize>,
    /// `[offset, len]` in the record.
    pub data: [usize; 2],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scales: Option<[usize; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub biases: Option<[usize; 2]>,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::U32 => "u32",
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "f32" => Some(DType::F32),
        "f16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        _ => None,
    }
}

impl MatrixRecord {
    fn encoding(&self) -> Option<Encoding> {
        let dtype = parse_dtype(&self.dtype)?;
        match self.kind.as_str() {
            "dense" => Some(Encoding::Dense(dtype)),
            "affine" => Some(Encoding::Affine {
                bits: self.bits?,
                group_size: self.group_size?,
                scale_dtype: dtype,
            }),
            _ => None,
        }
    }

    fn slots(&self, name: String) -> Option<MatrixSlots> {
        let addr = |[offset, len]: [usize; 2]| SlotAddr {
            segment: 0,
            offset,
            len,
        };
        Some(MatrixSlots {
            name,
            rows: self.rows,
            cols: self.cols,
            encoding: self.encoding()?,
            data: addr(self.data),
            scales: self.scales.map(addr),
            biases: self.biases.map(addr),
        })
    }
}

/// Shape and encoding of one expert matrix, for laying out records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixShape {
    pub rows: usize,
    pub cols: usize,
    pub encoding: Encoding,
}

impl MatrixShape {
    /// Bytes of the codes or values, and of the scales (= of the biases).
    pub fn part_lens(&self) -> (usize, usize) {
        match self.encoding {
            Encoding::Dense(d) => (self.rows * self.cols * d.size(), 0),
            Encoding::Affine {
                bits,
                group_size,
                scale_dtype,
            } => (
                self.rows * self.cols * bits as usize / 8,
                self.rows * (self.cols / group_size) * scale_dtype.size(),
            ),
        }
    }
}

/// Lays out a record for gate, up and down: parts 64-byte aligned, the record padded to a
/// page. Returns the three matrix records and the record size.
pub fn record_layout(shapes: [MatrixShape; 3]) -> ([MatrixRecord; 3], usize) {
    let mut pos = 0usize;
    let mut place = |len: usize| {
        let at = pos.next_multiple_of(PART_ALIGN);
        pos = at + len;
        [at, len]
    };
    let records = shapes.map(|s| {
        let (data_len, scale_len) = s.part_lens();
        let data = place(data_len);
        let (kind, dtype, bits, group_size, scales, biases) = match s.encoding {
            Encoding::Dense(d) => ("dense", d, None, None, None, None),
            Encoding::Affine {
                bits,
                group_size,
                scale_dtype,
            } => (
                "affine",
                scale_dtype,
                Some(bits),
                Some(group_size),
                Some(place(scale_len)),
                Some(place(scale_len)),
            ),
        };
        MatrixRecord {
            rows: s.rows,
            cols: s.cols,
            kind: kind.into(),
            dtype: dtype_name(dtype).into(),
            bits,
            group_size,
            data,
            scales,
            biases,
        }
    });
    (records, pos.next_multiple_of(DIRECT_ALIGN))
}

/// Builds the bytes of expert `e`'s record for the given matrix layout.
pub type RecordMaker<'a> = dyn Fn(usize, &[MatrixRecord; 3]) -> Result<Vec<u8>> + Sync + 'a;

/// Writes the record file of one MoE layer: `count` records of `record_bytes` made by
/// `make(expert, matrices)`, several at a time in parallel, each hashed. Returns the
/// layer's manifest entry and the file's digest.
pub fn write_layer_file(
    dir: &Path,
    layer: usize,
    count: usize,
    matrices: [MatrixRecord; 3],
    record_bytes: usize,
    make: &RecordMaker<'_>,
) -> Result<(LayerRecords, FileDigest)> {
    use rayon::prelude::*;
    let file = format!("experts/layer-{layer:03}.bin");
    let mut out = HashingWriter::create(&dir.join(&file))?;
    let mut checksums = Vec::with_capacity(count);
    let chunk = 2 * rayon::current_num_threads().max(1);
    for start in (0..count).step_by(chunk) {
        let records: Vec<Vec<u8>> = (start..(start + chunk).min(count))
            .into_par_iter()
            .map(|e| make(e, &matrices))
            .collect::<Result<_>>()?;
        for record in records {
            if record.len() != record_bytes {
                return Err(Error::InvalidInput(format!(
                    "{file}: a record of {} bytes, not {record_bytes}",
                    record.len()
                )));
            }
            checksums.push(format!("{:016x}", twox_hash::XxHash3_64::oneshot(&record)));
            out.write(&record)?;
        }
    }
    let [gate, up, down] = matrices;
    let records = LayerRecords {
        layer,
        file,
        num_experts: count,
        record_bytes,
        gate,
        up,
        down,
        checksums,
    };
    Ok((records, out.finish()?))
}

/// The experts of one packed layer: one segment per expert.
pub struct PackedExperts {
    layout: RecordLayout,
    file: Arc<SourceFile>,
    count: usize,
    checksums: Vec<u64>,
}

impl PackedExperts {
    /// Opens a layer's record file and checks it against its manifest entry.
    pub fn open(dir: &Path, records: &LayerRecords) -> Result<Self> {
        let path = dir.join(&records.file);
        let bad = |message: String| Error::Expert {
            layer: records.layer,
            expert: 0,
            error: Box::new(Error::InvalidInput(format!("{}: {message}", path.display()))),
        };
        let file = SourceFile::open(&path).map_err(|e| Error::Expert {
            layer: records.layer,
            expert: 0,
            error: Box::new(e),
        })?;
        let expected = (records.num_experts * records.record_bytes) as u64;
        if file.len() != expected {
            return Err(bad(format!(
                "holds {} bytes, the manifest says {} experts of {} bytes ({expected}); truncated or damaged",
                file.len(),
                records.num_experts,
                records.record_bytes
            )));
        }
        let name = |m: &str| format!("{}:{m}", records.file);
        let (gate, up, down) = match (
            records.gate.slots(name("gate")),
            records.up.slots(name("up")),
            records.down.slots(name("down")),
        ) {
            (Some(g), Some(u), Some(d)) => (g, u, d),
            _ => return Err(bad("the manifest has an unknown matrix encoding".into())),
        };
        let checksums = records
            .checksums
            .iter()
            .map(|h| u64::from_str_radix(h, 16))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| bad("the manifest has a malformed checksum".into()))?;
        if checksums.len() != records.num_experts {
            return Err(bad("the manifest lists the wrong number of checksums".into()));
        }
        Ok(PackedExperts {
            layout: RecordLayout {
                gate,
                up,
                down,
                segment_lens: vec![records.record_bytes],
            },
            file,
            count: records.num_experts,
            checksums,
        })
    }
}

impl ExpertLocator for PackedExperts {
    fn layout(&self) -> &RecordLayout {
        &self.layout
    }

    fn count(&self) -> usize {
        self.count
    }

    fn segments(&self, expert: usize) -> Vec<Segment> {
        let len = self.layout.segment_lens[0];
        vec![Segment {
            file: Arc::clone(&self.file),
            offset: (expert * len) as u64,
            len,
        }]
    }

    fn checksum(&self, expert: usize) -> Option<u64> {
        self.checksums.get(expert).copied()
    }
}

/// Reads and checks the manifest of a packed model; `None` when `dir` is not one.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|error| Error::Json {
        path: path.clone(),
        error,
    })?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(Error::InvalidField {
            path,
            field: "format".into(),
            message: format!(
                "`{}` version {} is not `{FORMAT}` version {VERSION}",
                manifest.format, manifest.version
            ),
        });
    }
    Ok(Some(manifest))
}

/// One problem `verify` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub message: String,
}

/// Re-reads every file of a packed model and checks sizes, file hashes and, for expert
/// files, every record's hash. `progress` gets the bytes read as they go.
pub fn verify(dir: &Path, progress: &dyn Fn(u64)) -> Result<Vec<Problem>> {
    let manifest = read_manifest(dir)?.ok_or_else(|| {
        Error::io(
            dir.join(MANIFEST),
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a packed model (no manifest)"),
        )
    })?;
    let mut problems = Vec::new();
    for (name, digest) in &manifest.files {
        let records = manifest.layers.iter().find(|l| &l.file == name);
        match hash_file(&dir.join(name), records, progress) {
            Err(e) => problems.push(Problem {
                file: name.clone(),
                message: e.to_string(),
            }),
            Ok((found, bad_records)) => {
                if found != *digest {
                    problems.push(Problem {
                        file: name.clone(),
                        message: format!(
                            "{} bytes with xxh3 {}, the manifest says {} bytes with xxh3 {}",
                            found.bytes, found.xxh3, digest.bytes, digest.xxh3
                        ),
                    });
                }
                for (layer, expert) in bad_records {
                    problems.push(Problem {
                        file: name.clone(),
                        message: format!("layer {layer}, expert {expert}: record checksum mismatch"),
                    });
                }
            }
        }
    }
    Ok(problems)
}

/// Hashes a file, and each record when it holds expert records.
fn hash_file(
    path: &Path,
    records: Option<&LayerRecords>,
    progress: &dyn Fn(u64),
) -> Result<(FileDigest, Vec<(usize, usize)>)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    use std::hash::Hasher;
    let mut whole = twox_hash::XxHash3_64::default();
    let mut record = twox_hash::XxHash3_64::default();
    let record_bytes = records.map_or(usize::MAX, |r| r.record_bytes);
    let mut in_record = 0usize;
    let mut index = 0usize;
    let mut bad = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        whole.write(&buf[..n]);
        total += n as u64;
        progress(n as u64);
        let Some(r) = records else { continue };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            let take = chunk.len().min(record_bytes - in_record);
            record.write(&chunk[..take]);
            in_record += take;
            chunk = &chunk[take..];
            if in_record == record_bytes {
                let expected = r.checksums.get(index).and_then(|h| u64::from_str_radix(h, 16).ok());
                if expected != Some(record.finish()) {
                    bad.push((r.layer, index));
                }
                record = twox_hash::XxHash3_64::default();
                in_record = 0;
                index += 1;
            }
        }
    }
    let digest = FileDigest {
        bytes: total,
        xxh3: format!("{:016x}", whole.finish()),
    };
    Ok((digest, bad))
}
