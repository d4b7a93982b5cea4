//! `flash-moe convert`: a downloaded HF or MLX checkpoint to the packed layout
//! (`storage::packed`), streaming tensor by tensor and expert by expert so memory stays
//! bounded whatever the model's size.
//!
//! Quantized experts are copied bit for bit unless asked otherwise; float experts (HF) are
//! quantized to MLX-compatible affine at group 64 (`mx.quantize`'s rounding). Output goes
//! to a hidden temporary directory next to the destination and is renamed into place only
//! once complete, with the manifest (checksums included) written last.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::{Map, Value, json};

use super::checkpoint::{DType, TensorEntry};
use super::layout::CheckpointWeights;
use super::packed::{
    DENSE_FILE, FORMAT, FileDigest, LayerRecords, MANIFEST, Manifest, MatrixRecord, MatrixShape, VERSION,
    record_layout, write_layer_file,
};
use super::quant::{Encoding, MatrixView};
use super::quantize::quantize_affine;
use super::store::{ExpertIo, ExpertLocator, ExpertStore, StoreConfig};
use super::write::{HashingWriter, PlannedTensor, SafetensorsWriter, write_model_dir};
use crate::error::{Error, Result};
use crate::model::config::{FfnKind, ModelConfig};
use crate::model::weights::ExpertView;

/// Bit width requested for a class of weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    /// Keep the source encoding (quantized bits copied as they are).
    Keep,
    Affine(u32),
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// `None`: 4-bit for float sources, keep for quantized ones.
    pub expert_bits: Option<Bits>,
    pub dense_bits: Bits,
    pub group_size: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            expert_bits: None,
            dense_bits: Bits::Keep,
            group_size: 64,
        }
    }
}

/// Auxiliary files copied from the source when present.
const COPIED_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// What a conversion will do, computed before anything is written.
pub struct ConversionPlan {
    src: PathBuf,
    weights: CheckpointWeights,
    options: ConvertOptions,
    dense: Vec<DenseTensor>,
    /// Input bytes to process, for progress reporting.
    pub total_bytes: u64,
    /// Warnings worth showing the user (matrices that cannot be quantized as asked).
    pub notes: Vec<String>,
}

/// A dense tensor of the source and what becomes of it.
struct DenseTensor {
    entry: TensorEntry,
    /// `Some((bits, module))` when it is quantized on the way.
    quantize: Option<(u32, String)>,
}

/// Plans the conversion of the checkpoint in `src`.
pub fn plan(src: &Path, options: ConvertOptions) -> Result<ConversionPlan> {
    let config = ModelConfig::from_dir(src)?;
    let store = ExpertStore::new(StoreConfig {
        io: ExpertIo::Mmap,
        ..StoreConfig::default()
    });
    let weights = CheckpointWeights::open(src, &config, store)?;
    if weights.is_packed() {
        return Err(Error::InvalidInput(format!(
            "{} is already a packed model",
            src.display()
        )));
    }
    let ckpt = weights.checkpoint();
    let mut names: Vec<&str> = ckpt
        .names()
        .filter(|n| !CheckpointWeights::is_expert_tensor(n) && !CheckpointWeights::is_ignored_tensor(n))
        .collect();
    names.sort_unstable();
    let mut notes = Vec::new();
    let mut dense = Vec::new();
    let mut total_bytes = 0u64;
    for name in names {
        let entry = ckpt.require(name)?.clone();
        total_bytes += entry.data.len() as u64;
        let quantize = match options.dense_bits {
            Bits::Keep => None,
            Bits::Affine(bits) => dense_quantization(ckpt, &entry, bits, options.group_size, &mut notes)?,
        };
        dense.push(DenseTensor { entry, quantize });
    }
    for layer in moe_layers(&config) {
        let locator = weights.expert_locator(layer)?;
        total_bytes += (locator.layout().record_bytes() * locator.count()) as u64;
    }
    Ok(ConversionPlan {
        src: src.to_path_buf(),
        weights,
        options,
        dense,
        total_bytes,
        notes,
    })
}

fn moe_layers(config: &ModelConfig) -> impl Iterator<Item = usize> + '_ {
    (0..config.num_layers()).filter(|&i| config.ffn[i] == FfnKind::Moe)
}

/// Whether and how a dense tensor is quantized under `--dense-bits`: 2-D float `.weight`
/// matrices whose rows split into whole groups, like mlx-lm's converter; the router and the
/// shared-expert gate keep at least 8 bits, as in the real 4-bit checkpoints.
fn dense_quantization(
    ckpt: &super::checkpoint::Checkpoint,
    entry: &TensorEntry,
    bits: u32,
    group: usize,
    notes: &mut Vec<String>,
) -> Result<Option<(u32, String)>> {
    let Some(module) = entry.name.strip_suffix(".weight") else {
        return Ok(None);
    };
    if ckpt.contains(&format!("{module}.scales")) {
        return Err(Error::InvalidInput(format!(
            "`{}` is already quantized; use --dense-bits keep for this checkpoint",
            entry.name
        )));
    }
    if entry.shape.len() != 2 || entry.dtype()? == DType::U32 {
        return Ok(None);
    }
    if !entry.shape[1].is_multiple_of(group) {
        notes.push(format!(
            "{} kept unquantized: {} columns are not a multiple of {group}",
            entry.name, entry.shape[1]
        ));
        return Ok(None);
    }
    let gate_like = module.ends_with("mlp.gate") || module.ends_with("shared_expert_gate");
    Ok(Some((if gate_like { bits.max(8) } else { bits }, module.to_string())))
}

impl ConversionPlan {
    /// Runs the conversion into `dst`, calling `progress` with input bytes as they are done.
    pub fn run(self, dst: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<Manifest> {
        write_model_dir(dst, |tmp| self.write_all(tmp, progress))
    }

    fn write_all(&self, tmp: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<Manifest> {
        let mut files = std::collections::BTreeMap::new();
        files.insert(DENSE_FILE.to_string(), self.write_dense(tmp, progress)?);
        let mut layers = Vec::new();
        for layer in moe_layers(self.weights.config()) {
            let (records, digest) = self.write_layer(tmp, layer, progress)?;
            files.insert(records.file.clone(), digest);
            layers.push(records);
        }
        files.insert("config.json".into(), self.write_config(tmp)?);
        for name in COPIED_FILES {
            let from = self.src.join(name);
            if from.is_file() {
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                let mut out = HashingWriter::create(&tmp.join(name))?;
                out.write(&bytes)?;
                files.insert(name.to_string(), out.finish()?);
            }
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            created_by: format!("flash-moe {}", env!("CARGO_PKG_VERSION")),
            source: self.src.display().to_string(),
            layers,
            files,
        };
        let text = serde_json::to_string_pretty(&manifest).map_err(|error| Error::Json {
            path: tmp.join(MANIFEST),
            error,
        })?;
        let mut out = HashingWriter::create(&tmp.join(MANIFEST))?;
        out.write(text.as_bytes())?;
        out.finish()?;
        Ok(manifest)
    }

    fn write_dense(&self, tmp: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<FileDigest> {
        let group = self.options.group_size;
        let mut plan = Vec::new();
        for t in &self.dense {
            let e = &t.entry;
            let dtype = e.dtype()?.name();
            match &t.quantize {
                None => plan.push(PlannedTensor {
                    name: e.name.clone(),
                    dtype,
                    shape: e.shape.clone(),
                    bytes: e.data.len(),
                }),
                Some((bits, module)) => {
                    let (rows, cols) = (e.shape[0], e.shape[1]);
                    let scale_bytes = rows * (cols / group) * e.dtype()?.size();
                    plan.push(PlannedTensor {
                        name: e.name.clone(),
                        dtype: "U32",
                        shape: vec![rows, cols * *bits as usize / 32],
                        bytes: rows * cols * *bits as usize / 8,
                    });
                    for part in ["scales", "biases"] {
                        plan.push(PlannedTensor {
                            name: format!("{module}.{part}"),
                            dtype,
                            shape: vec![rows, cols / group],
                            bytes: scale_bytes,
                        });
                    }
                }
            }
        }
        let mut meta = Map::new();
        meta.insert("format".into(), Value::String("mlx".into()));
        let mut out = SafetensorsWriter::create(&tmp.join(DENSE_FILE), plan, &meta)?;
        for t in &self.dense {
            let e = &t.entry;
            match &t.quantize {
                None => out.write_tensor(e.data.bytes())?,
                Some((bits, _)) => {
                    let (rows, cols) = (e.shape[0], e.shape[1]);
                    let m = MatrixView::dense(&e.name, rows, cols, e.dtype()?, e.data.clone())?;
                    // Codes stream out block by block; scales and biases (1/16 of the codes
                    // or less) follow once the matrix is done.
                    let (mut scales, mut biases) = (Vec::new(), Vec::new());
                    for block in (0..rows).step_by(DENSE_BLOCK_ROWS) {
                        let q = quantize_rows(
                            &m,
                            block..(block + DENSE_BLOCK_ROWS).min(rows),
                            *bits,
                            group,
                            e.dtype()?,
                        );
                        out.write_tensor(&q.codes)?;
                        scales.extend_from_slice(&q.scales);
                        biases.extend_from_slice(&q.biases);
                    }
                    out.write_tensor(&scales)?;
                    out.write_tensor(&biases)?;
                }
            }
            progress(e.data.len() as u64);
        }
        out.finish()
    }

    /// The config.json of the packed model: the source's, plus the quantization of dense
    /// weights quantized on the way.
    fn write_config(&self, tmp: &Path) -> Result<FileDigest> {
        let path = self.src.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut config: Value = serde_json::from_str(&text).map_err(|error| Error::Json { path, error })?;
        if let Bits::Affine(bits) = self.options.dense_bits
            && let Some(root) = config.as_object_mut()
        {
            let mut q = Map::new();
            q.insert("group_size".into(), json!(self.options.group_size));
            q.insert("bits".into(), json!(bits));
            q.insert("mode".into(), json!("affine"));
            for t in &self.dense {
                if let Some((b, module)) = &t.quantize
                    && *b != bits
                {
                    q.insert(
                        module.clone(),
                        json!({"group_size": self.options.group_size, "bits": b}),
                    );
                }
            }
            root.insert("quantization".into(), Value::Object(q.clone()));
            root.insert("quantization_config".into(), Value::Object(q));
        }
        let text = serde_json::to_string_pretty(&config).map_err(|error| Error::Json {
            path: tmp.join("config.json"),
            error,
        })?;
        let mut out = HashingWriter::create(&tmp.join("config.json"))?;
        out.write(text.as_bytes())?;
        out.finish()
    }

    /// The target encoding of one expert matrix.
    fn target(&self, source: &MatrixView) -> Encoding {
        let group = self.options.group_size;
        let requested = self.options.expert_bits.unwrap_or(match source.encoding {
            Encoding::Dense(_) => Bits::Affine(4),
            Encoding::Affine { .. } => Bits::Keep,
        });
        match (requested, source.encoding) {
            (Bits::Keep, e) => e,
            (Bits::Affine(_), e) if !source.cols.is_multiple_of(group) => e,
            (Bits::Affine(bits), Encoding::Dense(dtype)) => Encoding::Affine {
                bits,
                group_size: group,
                scale_dtype: dtype,
            },
            (Bits::Affine(bits), Encoding::Affine { scale_dtype, .. }) => Encoding::Affine {
                bits,
                group_size: group,
                scale_dtype,
            },
        }
    }

    fn write_layer(
        &self,
        tmp: &Path,
        layer: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(LayerRecords, FileDigest)> {
        let locator = Arc::new(self.weights.expert_locator(layer)?);
        let count = locator.count();
        let first = mapped_expert(locator.as_ref(), 0)?;
        let shape = |m: &MatrixView| MatrixShape {
            rows: m.rows,
            cols: m.cols,
            encoding: self.target(m),
        };
        let (matrices, record_bytes) = record_layout([shape(&first.gate), shape(&first.up), shape(&first.down)]);
        let source_bytes = locator.layout().record_bytes() as u64;
        write_layer_file(tmp, layer, count, matrices, record_bytes, &|e, matrices| {
            let expert = mapped_expert(locator.as_ref(), e)?;
            let record = encode_record(&expert, matrices, record_bytes);
            progress(source_bytes);
            record
        })
    }
}

/// Expert `e` with its bytes memory-mapped from the source files.
fn mapped_expert(locator: &dyn ExpertLocator, e: usize) -> Result<ExpertView> {
    let blobs = locator
        .segments(e)
        .iter()
        .map(|s| Ok(s.file.mapped()?.sub(s.offset as usize, s.len)))
        .collect::<Result<Vec<_>>>()?;
    locator.layout().views(&blobs, e)
}

/// One expert as a record of `record_bytes`, each matrix re-encoded as `targets` say.
fn encode_record(expert: &ExpertView, targets: &[MatrixRecord; 3], record_bytes: usize) -> Result<Vec<u8>> {
    let mut record = vec![0u8; record_bytes];
    for (m, target) in [&expert.gate, &expert.up, &expert.down].into_iter().zip(targets) {
        let place = |record: &mut [u8], [offset, len]: [usize; 2], bytes: &[u8]| {
            record[offset..offset + len].copy_from_slice(bytes);
        };
        let same = matches!((target.kind.as_str(), m.encoding), ("dense", Encoding::Dense(_)))
            || matches!(m.encoding, Encoding::Affine { bits, group_size, .. }
                if target.bits == Some(bits) && target.group_size == Some(group_size));
        if same {
            place(&mut record, target.data, m.data.bytes());
            if let (Some(s), Some(b), Some(ms), Some(mb)) = (target.scales, target.biases, &m.scales, &m.biases) {
                place(&mut record, s, ms.bytes());
                place(&mut record, b, mb.bytes());
            }
            continue;
        }
        let (Some(bits), Some(group), Some(s), Some(b)) =
            (target.bits, target.group_size, target.scales, target.biases)
        else {
            return Err(Error::Quantization {
                name: m.name.clone(),
                message: "cannot turn a quantized expert back into floats".into(),
            });
        };
        let scale_dtype = match target.dtype.as_str() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            _ => DType::BF16,
        };
        let q = quantize_rows(m, 0..m.rows, bits, group, scale_dtype);
        place(&mut record, target.data, &q.codes);
        place(&mut record, s, &q.scales);
        place(&mut record, b, &q.biases);
    }
    Ok(record)
}

/// Rows per block when quantizing large dense matrices (bounds the f32 copy held at once).
const DENSE_BLOCK_ROWS: usize = 4096;

/// Decodes rows `rows` of a matrix to f32 and quantizes them to `bits`, in parallel over
/// row blocks (each row's codes are whole bytes, so blocks concatenate).
fn quantize_rows(
    m: &MatrixView,
    rows: std::ops::Range<usize>,
    bits: u32,
    group: usize,
    scale_dtype: DType,
) -> super::quantize::Quantized {
    let per_task = 64;
    let blocks: Vec<super::quantize::Quantized> = rows
        .clone()
        .step_by(per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            let end = (start + per_task).min(rows.end);
            let mut values = vec![0.0f32; (end - start) * m.cols];
            for (r, row) in (start..end).zip(values.chunks_exact_mut(m.cols)) {
                m.dequantize_row(r, row);
            }
            quantize_affine(&values, m.cols, bits, group, scale_dtype)
        })
        .collect();
    let mut all = super::quantize::Quantized {
        codes: Vec::new(),
        scales: Vec::new(),
        biases: Vec::new(),
    };
    for b in blocks {
        all.codes.extend_from_slice(&b.codes);
        all.scales.extend_from_slice(&b.scales);
        all.biases.extend_from_slice(&b.biases);
    }
    all
}
