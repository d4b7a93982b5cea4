//! Maps the model's weight roles onto the tensors of a downloaded checkpoint.
//!
//! Layouts understood:
//! - Hugging Face originals: keys under `model.` or `model.language_model.`, zero-centred
//!   norms (applied as `1 + w`), conv weight `[C, 1, K]`, experts per expert
//!   (`mlp.experts.E.gate_proj.weight`) or fused (`mlp.experts.gate_up_proj` `[E, 2I, H]`).
//! - MLX (`mlx_lm.convert`): keys under `language_model.model.` (Qwen3.5) or `model.`
//!   (Qwen3-Next), norms with the 1 already added, conv weight `[C, K, 1]`, experts stacked in
//!   `mlp.switch_mlp.*`, affine quantization with per-module bits and group size.
//! - Qwen3-Next's fused `in_proj_qkvz` / `in_proj_ba`, split here into Qwen3.5's form.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::checkpoint::{Checkpoint, DType, TensorEntry};
use super::experts::{CheckpointExperts, MatrixParts, PartSource};
use super::io::SourceFile;
use super::packed::{MANIFEST, Manifest, PackedExperts, read_manifest};
use super::quant::{Encoding, MatrixView, floats_to_vec};
use super::store::ExpertStore;
use crate::error::{Error, Result};
use crate::model::config::{Family, ModelConfig};
use crate::model::weights::{ExpertSource, LayerWeight as W, Weight, WeightSource};

/// Affine quantization settings of an MLX checkpoint: a default plus per-module overrides.
#[derive(Clone, Debug, Default)]
pub struct QuantSettings {
    default: Option<(u32, usize)>,
    overrides: serde_json::Map<String, Value>,
}

impl QuantSettings {
    /// Reads `quantization` (or `quantization_config`) from config.json.
    pub fn from_config(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let root: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            error: source,
        })?;
        let Some(q) = root
            .get("quantization")
            .or_else(|| root.get("quantization_config"))
            .and_then(Value::as_object)
        else {
            return Ok(QuantSettings::default());
        };
        if let Some(mode) = q.get("mode").and_then(Value::as_str).filter(|m| *m != "affine") {
            return Err(Error::InvalidField {
                path,
                field: "quantization.mode".into(),
                message: format!("`{mode}` is not supported (only affine)"),
            });
        }
        let params = |v: &Value| Some((v.get("bits")?.as_u64()? as u32, v.get("group_size")?.as_u64()? as usize));
        Ok(QuantSettings {
            default: params(&Value::Object(q.clone())),
            overrides: q.clone(),
        })
    }

    /// `(bits, group_size)` for the module at `path`.
    fn for_module(&self, path: &str) -> Option<(u32, usize)> {
        let params = |v: &Value| Some((v.get("bits")?.as_u64()? as u32, v.get("group_size")?.as_u64()? as usize));
        self.overrides.get(path).and_then(params).or(self.default)
    }
}

/// A downloaded HF or MLX checkpoint seen through the model's weight roles.
pub struct CheckpointWeights {
    ckpt: Arc<Checkpoint>,
    family: Family,
    config: ModelConfig,
    quant: QuantSettings,
    /// Module prefix of the decoder, e.g. `model.` or `language_model.model.`.
    prefix: String,
    lm_head: String,
    /// True when norms are stored zero-centred (HF) and need `1 + w`.
    zero_centred_norms: bool,
    layout_name: &'static str,
    store: Arc<ExpertStore>,
    files: HashMap<PathBuf, Arc<SourceFile>>,
    /// Set for a packed model (`flash-moe convert`): experts come from its record files.
    packed: Option<Manifest>,
}

/// A matrix as stored: its tensors, checked against the expected shape, and its encoding.
/// `lead` is `[num_experts]` for stacked experts, empty otherwise.
struct StoredMatrix<'a> {
    key: String,
    encoding: Encoding,
    data: &'a TensorEntry,
    scales: Option<(&'a TensorEntry, &'a TensorEntry)>,
}

impl CheckpointWeights {
    /// Opens the checkpoint in `dir`; routed experts are fetched through `store`.
    pub fn open(dir: &Path, config: &ModelConfig, store: Arc<ExpertStore>) -> Result<Self> {
        let ckpt = Arc::new(Checkpoint::open(dir)?);
        let packed = read_manifest(dir)?;
        let mut files = HashMap::new();
        for path in ckpt.files() {
            files.insert(path.clone(), SourceFile::open(path)?);
        }
        let quant = QuantSettings::from_config(dir)?;
        let prefix = ["language_model.model.", "model.language_model.", "model.", ""]
            .into_iter()
            .find(|p| ckpt.contains(&format!("{p}embed_tokens.weight")))
            .ok_or_else(|| Error::MissingTensor {
                name: "model.embed_tokens.weight (or language_model.model.embed_tokens.weight)".into(),
            })?
            .to_string();
        let lm_head = ["language_model.lm_head", "lm_head"]
            .into_iter()
            .find(|p| ckpt.contains(&format!("{p}.weight")))
            .map_or_else(|| format!("{prefix}embed_tokens"), str::to_string);
        if !config.tie_word_embeddings && !ckpt.contains(&format!("{lm_head}.weight")) {
            return Err(Error::MissingTensor {
                name: "lm_head.weight".into(),
            });
        }
        let zero_centred_norms = norms_are_zero_centred(&ckpt, &prefix, config);
        let layout_name = match (&packed, zero_centred_norms, prefix.as_str()) {
            (Some(_), false, _) => "packed (from mlx)",
            (Some(_), true, _) => "packed (from hf)",
            (None, false, _) => "mlx",
            (None, true, "model.language_model.") => "hf (model.language_model.)",
            (None, true, _) => "hf",
        };
        Ok(CheckpointWeights {
            ckpt,
            family: config.family,
            config: config.clone(),
            quant,
            prefix,
            lm_head,
            zero_centred_norms,
            layout_name,
            store,
            files,
            packed,
        })
    }

    /// Is this a packed model (`flash-moe convert` output)?
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Is `name` a tensor of the routed experts (stored apart in a packed model)?
    pub fn is_expert_tensor(name: &str) -> bool {
        name.contains(".mlp.experts.") || name.contains(".mlp.switch_mlp.")
    }

    /// Tensors a text-only engine never reads: the vision tower and the MTP head.
    pub fn is_ignored_tensor(name: &str) -> bool {
        name.starts_with("mtp.")
            || name.contains(".mtp.")
            || name.starts_with("model.visual.")
            || name.starts_with("vision_tower")
            || name.starts_with("model.vision_tower")
    }

    fn module(&self, weight: Weight) -> String {
        let p = &self.prefix;
        match weight {
            Weight::Embed => format!("{p}embed_tokens"),
            Weight::LmHead
                if self.config.tie_word_embeddings && !self.ckpt.contains(&format!("{}.weight", self.lm_head)) =>
            {
                format!("{p}embed_tokens")
            }
            Weight::LmHead => self.lm_head.clone(),
            Weight::FinalNorm => format!("{p}norm"),
            Weight::Layer(i, w) => format!("{p}layers.{i}.{}", layer_suffix(w)),
        }
    }

    /// The tensor key of a weight: `module.weight`, except bare parameters.
    fn key(&self, weight: Weight) -> String {
        let module = self.module(weight);
        match weight {
            Weight::Layer(_, W::DtBias | W::ALog) => module,
            _ => format!("{module}.weight"),
        }
    }

    /// The tensors of the matrix stored under `module`, dense or affine-quantized, checked
    /// against the shape `lead + [rows, cols]`.
    fn stored_matrix(&self, module: &str, lead: &[usize], rows: usize, cols: usize) -> Result<StoredMatrix<'_>> {
        let key = format!("{module}.weight");
        let entry = self.ckpt.require(&key)?;
        let shape = |inner: usize| [lead, &[rows, inner]].concat();
        match self.ckpt.get(&format!("{module}.scales")) {
            None => {
                expect_shape(entry, &shape(cols))?;
                Ok(StoredMatrix {
                    key,
                    encoding: Encoding::Dense(float_dtype(entry)?),
                    data: entry,
                    scales: None,
                })
            }
            Some(scales) => {
                let (bits, group) = self.quant_params(module)?;
                expect_shape(entry, &shape(cols * bits as usize / 32))?;
                expect_shape(scales, &shape(cols / group))?;
                let biases = self.ckpt.require(&format!("{module}.biases"))?;
                expect_shape(biases, &shape(cols / group))?;
                expect_u32(entry)?;
                Ok(StoredMatrix {
                    key,
                    encoding: Encoding::Affine {
                        bits,
                        group_size: group,
                        scale_dtype: float_dtype(scales)?,
                    },
                    data: entry,
                    scales: Some((scales, biases)),
                })
            }
        }
    }

    /// A matrix stored under `module`, memory-mapped.
    fn load_matrix(&self, module: &str, rows: usize, cols: usize) -> Result<MatrixView> {
        let m = self.stored_matrix(module, &[], rows, cols)?;
        match (m.encoding, m.scales) {
            (
                Encoding::Affine {
                    bits,
                    group_size,
                    scale_dtype,
                },
                Some((s, b)),
            ) => MatrixView::affine(
                &m.key,
                rows,
                cols,
                bits,
                group_size,
                scale_dtype,
                m.data.data.clone(),
                s.data.clone(),
                b.data.clone(),
            ),
            (encoding, _) => MatrixView {
                name: m.key,
                rows,
                cols,
                encoding,
                data: m.data.data.clone(),
                scales: None,
                biases: None,
            }
            .validated(),
        }
    }

    fn quant_params(&self, module: &str) -> Result<(u32, usize)> {
        self.quant.for_module(module).ok_or_else(|| Error::Quantization {
            name: format!("{module}.weight"),
            message: "quantized tensor but config.json has no `quantization` bits/group_size".into(),
        })
    }

    fn source_file(&self, entry: &TensorEntry) -> Arc<SourceFile> {
        Arc::clone(&self.files[&entry.file])
    }

    /// Qwen3-Next: one of the projections packed, per key head, into `in_proj_qkvz` / `in_proj_ba`.
    fn fused_projection(&self, layer: usize, w: W) -> Result<MatrixView> {
        let d = &self.config.linear;
        let (nk, dk, dv) = (d.num_key_heads, d.key_head_dim, d.value_head_dim);
        let r = d.num_value_heads / nk;
        let h = self.config.hidden_size;
        let base = format!("{}layers.{layer}.linear_attn", self.prefix);
        let group_rows = |offset: usize, len: usize, stride: usize| -> Vec<usize> {
            (0..nk)
                .flat_map(|g| (g * stride + offset)..(g * stride + offset + len))
                .collect()
        };
        let qkvz_stride = 2 * dk + 2 * r * dv;
        let (module, total, rows) = match w {
            W::InProjQkv => {
                let mut rows = group_rows(0, dk, qkvz_stride);
                rows.extend(group_rows(dk, dk, qkvz_stride));
                rows.extend(group_rows(2 * dk, r * dv, qkvz_stride));
                ("in_proj_qkvz", nk * qkvz_stride, rows)
            }
            W::InProjZ => (
                "in_proj_qkvz",
                nk * qkvz_stride,
                group_rows(2 * dk + r * dv, r * dv, qkvz_stride),
            ),
            W::InProjB => ("in_proj_ba", 2 * d.num_value_heads, group_rows(0, r, 2 * r)),
            _ => ("in_proj_ba", 2 * d.num_value_heads, group_rows(r, r, 2 * r)),
        };
        let fused = self.load_matrix(&format!("{base}.{module}"), total, h)?;
        Ok(fused.select_rows(&rows, &format!("{base}.{module}.weight ({w:?} rows)")))
    }

    /// All experts of a layer stacked in the tensor of `module` (MLX `switch_mlp`).
    fn stacked_parts(&self, module: &str, experts: usize, rows: usize, cols: usize) -> Result<MatrixParts> {
        let m = self.stored_matrix(module, &[experts], rows, cols)?;
        let stacked = |entry: &TensorEntry| PartSource::Stacked {
            file: self.source_file(entry),
            base: entry.offset,
            stride: (entry.data.len() / experts) as u64,
            inner: 0,
        };
        Ok(MatrixParts {
            name: m.key.clone(),
            rows,
            cols,
            encoding: m.encoding,
            data: stacked(m.data),
            scales: m.scales.map(|(s, b)| (stacked(s), stacked(b))),
        })
    }

    /// One tensor per expert (`experts.E.gate_proj.weight`).
    fn per_expert_parts(
        &self,
        base: &str,
        proj: &str,
        experts: usize,
        rows: usize,
        cols: usize,
    ) -> Result<MatrixParts> {
        let mut data = Vec::with_capacity(experts);
        let mut scales = Vec::new();
        let mut biases = Vec::new();
        let mut encoding = None;
        for e in 0..experts {
            let m = self.stored_matrix(&format!("{base}.experts.{e}.{proj}"), &[], rows, cols)?;
            if encoding.is_some_and(|enc| enc != m.encoding) {
                return Err(Error::Quantization {
                    name: m.key,
                    message: "experts of one layer are stored with different encodings".into(),
                });
            }
            encoding = Some(m.encoding);
            data.push((self.source_file(m.data), m.data.offset));
            if let Some((s, b)) = m.scales {
                scales.push((self.source_file(s), s.offset));
                biases.push((self.source_file(b), b.offset));
            }
        }
        Ok(MatrixParts {
            name: format!("{base}.experts.*.{proj}.weight"),
            rows,
            cols,
            encoding: encoding.unwrap_or(Encoding::Dense(DType::F32)),
            data: PartSource::PerExpert(data),
            scales: (!scales.is_empty()).then(|| (PartSource::PerExpert(scales), PartSource::PerExpert(biases))),
        })
    }

    /// Where the experts of `layer` are in the checkpoint's tensors.
    pub fn expert_locator(&self, layer: usize) -> Result<CheckpointExperts> {
        let m = &self.config.moe;
        let (h, i, e) = (self.config.hidden_size, m.expert_intermediate, m.num_experts);
        let base = format!("{}layers.{layer}.mlp", self.prefix);
        if self.ckpt.contains(&format!("{base}.switch_mlp.gate_proj.weight")) {
            let parts = [
                self.stacked_parts(&format!("{base}.switch_mlp.gate_proj"), e, i, h)?,
                self.stacked_parts(&format!("{base}.switch_mlp.up_proj"), e, i, h)?,
                self.stacked_parts(&format!("{base}.switch_mlp.down_proj"), e, h, i)?,
            ];
            return Ok(CheckpointExperts::new(e, parts));
        }
        if self.ckpt.contains(&format!("{base}.experts.gate_up_proj")) {
            let gate_up = self.ckpt.require(&format!("{base}.experts.gate_up_proj"))?;
            expect_shape(gate_up, &[e, 2 * i, h])?;
            let dtype = float_dtype(gate_up)?;
            let half = (i * h * dtype.size()) as u64;
            let part = |inner| PartSource::Stacked {
                file: self.source_file(gate_up),
                base: gate_up.offset,
                stride: 2 * half,
                inner,
            };
            let matrix = |name: &str, data| MatrixParts {
                name: format!("{} ({name} rows)", gate_up.name),
                rows: i,
                cols: h,
                encoding: Encoding::Dense(dtype),
                data,
                scales: None,
            };
            let down = self.stacked_parts_unsuffixed(&format!("{base}.experts.down_proj"), e, h, i)?;
            return Ok(CheckpointExperts::new(
                e,
                [matrix("gate", part(0)), matrix("up", part(half)), down],
            ));
        }
        let parts = [
            self.per_expert_parts(&base, "gate_proj", e, i, h)?,
            self.per_expert_parts(&base, "up_proj", e, i, h)?,
            self.per_expert_parts(&base, "down_proj", e, h, i)?,
        ];
        Ok(CheckpointExperts::new(e, parts))
    }

    /// HF's fused `experts.down_proj` `[E, H, I]` (a parameter, no `.weight` suffix).
    fn stacked_parts_unsuffixed(&self, key: &str, experts: usize, rows: usize, cols: usize) -> Result<MatrixParts> {
        let entry = self.ckpt.require(key)?;
        expect_shape(entry, &[experts, rows, cols])?;
        let dtype = float_dtype(entry)?;
        Ok(MatrixParts {
            name: key.into(),
            rows,
            cols,
            encoding: Encoding::Dense(dtype),
            data: PartSource::Stacked {
                file: self.source_file(entry),
                base: entry.offset,
                stride: (rows * cols * dtype.size()) as u64,
                inner: 0,
            },
            scales: None,
        })
    }
}

impl WeightSource for CheckpointWeights {
    fn matrix(&self, weight: Weight, rows: usize, cols: usize) -> Result<MatrixView> {
        if let (Family::Qwen3Next, Weight::Layer(l, w @ (W::InProjQkv | W::InProjZ | W::InProjB | W::InProjA))) =
            (self.family, weight)
        {
            return self.fused_projection(l, w);
        }
        self.load_matrix(&self.module(weight), rows, cols)
    }

    fn vector(&self, weight: Weight, len: usize) -> Result<Vec<f32>> {
        let key = self.key(weight);
        let entry = self.ckpt.require(&key)?;
        if entry.element_count() != len {
            return Err(Error::TensorShape {
                name: key,
                file: entry.file.clone(),
                expected: vec![len],
                found: entry.shape.clone(),
            });
        }
        if self.ckpt.contains(&format!("{}.scales", self.module(weight))) {
            return Err(Error::Quantization {
                name: key,
                message: "a quantized vector weight is not supported".into(),
            });
        }
        let mut values = floats_to_vec(entry.data.bytes(), float_dtype(entry)?);
        let zero_centred = matches!(
            weight,
            Weight::FinalNorm | Weight::Layer(_, W::InputNorm | W::PostAttentionNorm | W::QNorm | W::KNorm)
        );
        if zero_centred && self.zero_centred_norms {
            // Shifted in f32: rounding 1 + w to the checkpoint dtype would change the model.
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        Ok(values)
    }

    fn experts(&self, layer: usize) -> Result<Arc<dyn ExpertSource>> {
        let Some(manifest) = &self.packed else {
            return Ok(self.store.layer(layer, Arc::new(self.expert_locator(layer)?)));
        };
        let records = manifest
            .layers
            .iter()
            .find(|r| r.layer == layer)
            .ok_or_else(|| Error::MissingTensor {
                name: format!("experts of layer {layer} ({MANIFEST} lists none)"),
            })?;
        Ok(self
            .store
            .layer(layer, Arc::new(PackedExperts::open(&self.ckpt.dir, records)?)))
    }

    fn describe(&self) -> String {
        format!("{} checkpoint, {}", self.layout_name, self.ckpt.dir.display())
    }
}

fn layer_suffix(w: W) -> &'static str {
    match w {
        W::InputNorm => "input_layernorm",
        W::PostAttentionNorm => "post_attention_layernorm",
        W::QProj => "self_attn.q_proj",
        W::KProj => "self_attn.k_proj",
        W::VProj => "self_attn.v_proj",
        W::OProj => "self_attn.o_proj",
        W::QNorm => "self_attn.q_norm",
        W::KNorm => "self_attn.k_norm",
        W::InProjQkv => "linear_attn.in_proj_qkv",
        W::InProjZ => "linear_attn.in_proj_z",
        W::InProjB => "linear_attn.in_proj_b",
        W::InProjA => "linear_attn.in_proj_a",
        W::Conv1d => "linear_attn.conv1d",
        W::DtBias => "linear_attn.dt_bias",
        W::ALog => "linear_attn.A_log",
        W::GatedNorm => "linear_attn.norm",
        W::OutProj => "linear_attn.out_proj",
        W::Router => "mlp.gate",
        W::SharedGateProj => "mlp.shared_expert.gate_proj",
        W::SharedUpProj => "mlp.shared_expert.up_proj",
        W::SharedDownProj => "mlp.shared_expert.down_proj",
        W::SharedExpertGate => "mlp.shared_expert_gate",
        W::MlpGateProj => "mlp.gate_proj",
        W::MlpUpProj => "mlp.up_proj",
        W::MlpDownProj => "mlp.down_proj",
    }
}

/// HF stores the conv weight `[C, 1, K]` and norms zero-centred; mlx-lm moves the conv to
/// `[C, K, 1]` and adds 1 to the norms in the same conversion, so the conv shape tells.
/// A checkpoint without linear-attention layers is taken as MLX when it is quantized.
fn norms_are_zero_centred(ckpt: &Checkpoint, prefix: &str, config: &ModelConfig) -> bool {
    let conv = config
        .layers
        .iter()
        .position(|k| *k == crate::model::config::LayerKind::LinearAttention)
        .and_then(|i| ckpt.get(&format!("{prefix}layers.{i}.linear_attn.conv1d.weight")));
    match conv {
        Some(entry) => !(entry.shape.len() == 3 && entry.shape[2] == 1 && config.linear.conv_kernel != 1),
        None => !ckpt.names().any(|n| n.ends_with(".scales")),
    }
}

fn expect_shape(entry: &TensorEntry, shape: &[usize]) -> Result<()> {
    if entry.shape == shape {
        Ok(())
    } else {
        Err(Error::TensorShape {
            name: entry.name.clone(),
            file: entry.file.clone(),
            expected: shape.to_vec(),
            found: entry.shape.clone(),
        })
    }
}

fn float_dtype(entry: &TensorEntry) -> Result<DType> {
    match entry.dtype()? {
        DType::U32 => Err(Error::TensorDtype {
            name: entry.name.clone(),
            file: entry.file.clone(),
            dtype: "U32".into(),
            message: "expected a float dtype (quantized weights need .scales and .biases)".into(),
        }),
        d => Ok(d),
    }
}

fn expect_u32(entry: &TensorEntry) -> Result<()> {
    match entry.dtype()? {
        DType::U32 => Ok(()),
        d => Err(Error::TensorDtype {
            name: entry.name.clone(),
            file: entry.file.clone(),
            dtype: d.name().into(),
            message: "quantized weights must be packed in U32".into(),
        }),
    }
}
