//! `flash-moe synth`: a model with the real shapes of a named checkpoint and random weights,
//! written straight into the packed layout (MLX-style 4-bit dense weights with an 8-bit
//! router, 4- or 2-bit experts), with a tokenizer. For benchmarks and for trying real-size
//! shapes without a download.
//!
//! Quantized weights get uniformly random codes and a per-tensor scale and bias chosen so
//! the values have mean 0 and standard deviation about `gain / sqrt(fan_in)`: activations
//! stay of order one through the layers and the logits are finite and spread out. Router
//! weights are random too, so routing is pseudo-random: near-uniform over the experts, the
//! worst case for any expert cache.

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use rayon::prelude::*;
use serde_json::{Map, Value, json};

use super::checkpoint::DType;
use super::packed::{
    DENSE_FILE, FORMAT, FileDigest, MANIFEST, Manifest, MatrixRecord, MatrixShape, VERSION, record_layout,
    write_layer_file,
};
use super::quant::Encoding;
use super::write::{HashingWriter, PlannedTensor, SafetensorsWriter, write_model_dir};
use crate::error::{Error, Result};
use crate::model::config::{Family, FfnKind, LayerKind, ModelConfig};
use crate::model::presets;

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub shape: String,
    pub layers: Option<usize>,
    pub experts: Option<usize>,
    /// 4 or 2.
    pub expert_bits: u32,
    pub seed: u64,
}

const GROUP: usize = 64;
const DENSE_BITS: u32 = 4;
const ROUTER_BITS: u32 = 8;

/// How a synthetic tensor is filled.
#[derive(Clone, Debug)]
enum Fill {
    /// Affine-quantized `[rows, cols]` with values of standard deviation `std`.
    Quantized {
        bits: u32,
        std: f32,
    },
    /// A float vector of values `mean + std * noise` (`log_uniform` draws `log(U(a, b))`).
    Floats {
        dtype: DType,
        mean: f32,
        std: f32,
    },
    LogUniform {
        low: f32,
        high: f32,
    },
}

#[derive(Clone, Debug)]
struct SynthTensor {
    module: String,
    /// Trailing name: `weight` (matrices, norms, conv) or a bare parameter name.
    param: &'static str,
    shape: Vec<usize>,
    fill: Fill,
}

/// A synthetic model, planned.
pub struct SynthPlan {
    options: SynthOptions,
    config_json: Value,
    config: ModelConfig,
    tensors: Vec<SynthTensor>,
    pub total_bytes: u64,
}

pub fn plan(options: SynthOptions) -> Result<SynthPlan> {
    if !matches!(options.expert_bits, 2 | 4) {
        return Err(Error::InvalidInput("--expert-bits takes 4 or 2".into()));
    }
    let mut config_json = presets::config_json(&options.shape, options.layers, options.experts).ok_or_else(|| {
        Error::InvalidInput(format!(
            "unknown shape `{}` (known: {})",
            options.shape,
            presets::SHAPES.join(", ")
        ))
    })?;
    let config = ModelConfig::from_json_str(&config_json.to_string(), Path::new("config.json"))?;
    let tensors = dense_tensors(&config);
    let mut quantization = Map::new();
    quantization.insert("group_size".into(), json!(GROUP));
    quantization.insert("bits".into(), json!(DENSE_BITS));
    quantization.insert("mode".into(), json!("affine"));
    for t in &tensors {
        if let Fill::Quantized { bits, .. } = t.fill
            && bits != DENSE_BITS
        {
            quantization.insert(t.module.clone(), json!({"group_size": GROUP, "bits": bits}));
        }
    }
    config_json["quantization"] = Value::Object(quantization.clone());
    config_json["quantization_config"] = Value::Object(quantization);
    let dense_bytes: u64 = tensors
        .iter()
        .map(|t| planned(t).iter().map(|p| p.bytes as u64).sum::<u64>())
        .sum();
    let (_, record_bytes) = record_layout(expert_shapes(&config, options.expert_bits));
    let moe_layers = config.ffn.iter().filter(|f| **f == FfnKind::Moe).count() as u64;
    let total_bytes = dense_bytes + moe_layers * config.moe.num_experts as u64 * record_bytes as u64;
    Ok(SynthPlan {
        options,
        config_json,
        config,
        tensors,
        total_bytes,
    })
}

fn expert_shapes(config: &ModelConfig, bits: u32) -> [MatrixShape; 3] {
    let (h, i) = (config.hidden_size, config.moe.expert_intermediate);
    let enc = Encoding::Affine {
        bits,
        group_size: GROUP,
        scale_dtype: DType::BF16,
    };
    [
        MatrixShape {
            rows: i,
            cols: h,
            encoding: enc,
        },
        MatrixShape {
            rows: i,
            cols: h,
            encoding: enc,
        },
        MatrixShape {
            rows: h,
            cols: i,
            encoding: enc,
        },
    ]
}

/// Every dense tensor of the model, in MLX naming.
fn dense_tensors(c: &ModelConfig) -> Vec<SynthTensor> {
    let (p, head) = match c.family {
        Family::Qwen35Moe => ("language_model.model.", "language_model.lm_head"),
        Family::Qwen3Next => ("model.", "lm_head"),
    };
    let h = c.hidden_size;
    let q = |module: String, rows: usize, cols: usize, bits: u32, gain: f32| SynthTensor {
        module,
        param: "weight",
        shape: vec![rows, cols],
        fill: Fill::Quantized {
            bits,
            std: gain / (cols as f32).sqrt(),
        },
    };
    let norm = |module: String, len: usize| SynthTensor {
        module,
        param: "weight",
        shape: vec![len],
        fill: Fill::Floats {
            dtype: DType::BF16,
            mean: 1.0,
            std: 0.1,
        },
    };
    let mut t = vec![
        // Embedding rows of unit deviation; the first norm rescales them anyway.
        q(
            format!("{p}embed_tokens"),
            c.vocab_size,
            h,
            DENSE_BITS,
            (h as f32).sqrt(),
        ),
        q(head.to_string(), c.vocab_size, h, DENSE_BITS, 3.0),
        norm(format!("{p}norm"), h),
    ];
    let (a, l, m) = (&c.attention, &c.linear, &c.moe);
    for (i, kind) in c.layers.iter().enumerate() {
        let base = format!("{p}layers.{i}");
        t.push(norm(format!("{base}.input_layernorm"), h));
        t.push(norm(format!("{base}.post_attention_layernorm"), h));
        match kind {
            LayerKind::FullAttention => {
                let (qw, kvw) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
                let s = format!("{base}.self_attn");
                t.push(q(format!("{s}.q_proj"), 2 * qw, h, DENSE_BITS, 1.0));
                t.push(q(format!("{s}.k_proj"), kvw, h, DENSE_BITS, 1.0));
                t.push(q(format!("{s}.v_proj"), kvw, h, DENSE_BITS, 1.0));
                t.push(q(format!("{s}.o_proj"), h, qw, DENSE_BITS, 1.0));
                t.push(norm(format!("{s}.q_norm"), a.head_dim));
                t.push(norm(format!("{s}.k_norm"), a.head_dim));
            }
            LayerKind::LinearAttention => {
                let s = format!("{base}.linear_attn");
                let nv = l.num_value_heads;
                if c.family == Family::Qwen3Next {
                    t.push(q(
                        format!("{s}.in_proj_qkvz"),
                        l.conv_dim() + l.value_dim(),
                        h,
                        DENSE_BITS,
                        1.0,
                    ));
                    t.push(q(format!("{s}.in_proj_ba"), 2 * nv, h, DENSE_BITS, 1.0));
                } else {
                    t.push(q(format!("{s}.in_proj_qkv"), l.conv_dim(), h, DENSE_BITS, 1.0));
                    t.push(q(format!("{s}.in_proj_z"), l.value_dim(), h, DENSE_BITS, 1.0));
                    t.push(q(format!("{s}.in_proj_b"), nv, h, DENSE_BITS, 1.0));
                    t.push(q(format!("{s}.in_proj_a"), nv, h, DENSE_BITS, 1.0));
                }
                t.push(SynthTensor {
                    module: format!("{s}.conv1d"),
                    param: "weight",
                    shape: vec![l.conv_dim(), l.conv_kernel, 1],
                    fill: Fill::Floats {
                        dtype: DType::BF16,
                        mean: 0.0,
                        std: 0.3,
                    },
                });
                t.push(SynthTensor {
                    module: s.clone(),
                    param: "dt_bias",
                    shape: vec![nv],
                    fill: Fill::Floats {
                        dtype: DType::BF16,
                        mean: 0.0,
                        std: 0.5,
                    },
                });
                t.push(SynthTensor {
                    module: s.clone(),
                    param: "A_log",
                    shape: vec![nv],
                    fill: Fill::LogUniform { low: 0.05, high: 1.0 },
                });
                t.push(norm(format!("{s}.norm"), l.value_head_dim));
                t.push(q(format!("{s}.out_proj"), h, l.value_dim(), DENSE_BITS, 1.0));
            }
        }
        let mlp = format!("{base}.mlp");
        match c.ffn[i] {
            FfnKind::Moe => {
                t.push(q(format!("{mlp}.gate"), m.num_experts, h, ROUTER_BITS, 1.0));
                let si = m.shared_intermediate;
                t.push(q(format!("{mlp}.shared_expert.gate_proj"), si, h, DENSE_BITS, 1.0));
                t.push(q(format!("{mlp}.shared_expert.up_proj"), si, h, DENSE_BITS, 1.0));
                t.push(q(format!("{mlp}.shared_expert.down_proj"), h, si, DENSE_BITS, 1.0));
                t.push(q(format!("{mlp}.shared_expert_gate"), 1, h, ROUTER_BITS, 1.0));
            }
            FfnKind::Dense => {
                let d = c.dense_intermediate;
                t.push(q(format!("{mlp}.gate_proj"), d, h, DENSE_BITS, 1.0));
                t.push(q(format!("{mlp}.up_proj"), d, h, DENSE_BITS, 1.0));
                t.push(q(format!("{mlp}.down_proj"), h, d, DENSE_BITS, 1.0));
            }
        }
    }
    t
}

/// The safetensors entries of one synthetic tensor.
fn planned(t: &SynthTensor) -> Vec<PlannedTensor> {
    let name = format!("{}.{}", t.module, t.param);
    let n: usize = t.shape.iter().product();
    match t.fill {
        Fill::Quantized { bits, .. } => {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let scales = |part: &str| PlannedTensor {
                name: format!("{}.{part}", t.module),
                dtype: "BF16",
                shape: vec![rows, cols / GROUP],
                bytes: rows * (cols / GROUP) * 2,
            };
            vec![
                PlannedTensor {
                    name,
                    dtype: "U32",
                    shape: vec![rows, cols * bits as usize / 32],
                    bytes: rows * cols * bits as usize / 8,
                },
                scales("scales"),
                scales("biases"),
            ]
        }
        Fill::Floats { dtype, .. } => vec![PlannedTensor {
            name,
            dtype: dtype.name(),
            shape: t.shape.clone(),
            bytes: n * dtype.size(),
        }],
        Fill::LogUniform { .. } => vec![PlannedTensor {
            name,
            dtype: "F32",
            shape: t.shape.clone(),
            bytes: n * 4,
        }],
    }
}

/// A deterministic generator per (seed, stream) so parallel work does not change the output.
fn rng(seed: u64, stream: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Scale and bias so that uniformly random `bits`-bit codes have mean 0 and deviation `std`.
fn uniform_code_scale_bias(bits: u32, std: f32) -> (f32, f32) {
    let levels = ((1u32 << bits) - 1) as f32;
    let code_std = (((levels + 1.0) * (levels + 1.0) - 1.0) / 12.0).sqrt();
    let scale = std / code_std;
    (scale, -scale * levels / 2.0)
}

/// Fills the scale and bias arrays (bf16) of random `bits`-bit codes with values around the
/// ones that give deviation `std`, jittered by up to 10% per group.
fn fill_scales_biases(rng: &mut SmallRng, scales: &mut [u8], biases: &mut [u8], bits: u32, std: f32) {
    let (scale, bias) = uniform_code_scale_bias(bits, std);
    for (s, b) in scales.chunks_exact_mut(2).zip(biases.chunks_exact_mut(2)) {
        let jitter = 1.0 + rng.random_range(-0.1f32..0.1);
        s.copy_from_slice(&half::bf16::from_f32(scale * jitter).to_bits().to_le_bytes());
        b.copy_from_slice(&half::bf16::from_f32(bias * jitter).to_bits().to_le_bytes());
    }
}

impl SynthPlan {
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Writes the model into `dst` (which must not exist), via a hidden partial directory.
    pub fn run(self, dst: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<Manifest> {
        write_model_dir(dst, |tmp| self.write_all(tmp, progress))
    }

    fn write_all(&self, tmp: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<Manifest> {
        let mut files = BTreeMap::new();
        files.insert(DENSE_FILE.to_string(), self.write_dense(tmp, progress)?);
        let shapes = expert_shapes(&self.config, self.options.expert_bits);
        let (matrices, record_bytes) = record_layout(shapes);
        let std = [
            1.0 / (self.config.hidden_size as f32).sqrt(),
            1.0 / (self.config.hidden_size as f32).sqrt(),
            1.0 / (self.config.moe.expert_intermediate as f32).sqrt(),
        ];
        let mut layers = Vec::new();
        for layer in (0..self.config.num_layers()).filter(|&i| self.config.ffn[i] == FfnKind::Moe) {
            let seed = self.options.seed;
            let bits = self.options.expert_bits;
            let (records, digest) = write_layer_file(
                tmp,
                layer,
                self.config.moe.num_experts,
                matrices.clone(),
                record_bytes,
                &|e, m| {
                    let mut rng = rng(seed, ((layer as u64) << 32) | e as u64);
                    let mut record = vec![0u8; record_bytes];
                    for (matrix, std) in m.iter().zip(std) {
                        fill_record_matrix(&mut rng, &mut record, matrix, bits, std);
                    }
                    progress(record_bytes as u64);
                    Ok(record)
                },
            )?;
            files.insert(records.file.clone(), digest);
            layers.push(records);
        }
        files.insert(
            "config.json".into(),
            write_text(tmp, "config.json", &self.config_json.to_string())?,
        );
        let tokenizer = synthetic_tokenizer(self.config.vocab_size, self.config.family);
        files.insert(
            "tokenizer.json".into(),
            write_text(tmp, "tokenizer.json", &tokenizer.to_string())?,
        );
        let tokenizer_config = json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"});
        files.insert(
            "tokenizer_config.json".into(),
            write_text(tmp, "tokenizer_config.json", &tokenizer_config.to_string())?,
        );
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            created_by: format!("flash-moe {} synth", env!("CARGO_PKG_VERSION")),
            source: format!(
                "synthetic {} (layers {}, experts {}, {}-bit experts, seed {})",
                self.options.shape,
                self.config.num_layers(),
                self.config.moe.num_experts,
                self.options.expert_bits,
                self.options.seed
            ),
            layers,
            files,
        };
        let text = serde_json::to_string_pretty(&manifest).map_err(|error| Error::Json {
            path: tmp.join(MANIFEST),
            error,
        })?;
        write_text(tmp, MANIFEST, &text)?;
        Ok(manifest)
    }

    fn write_dense(&self, tmp: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<FileDigest> {
        let plan: Vec<PlannedTensor> = self.tensors.iter().flat_map(planned).collect();
        let mut meta = Map::new();
        meta.insert("format".into(), Value::String("mlx".into()));
        let mut out = SafetensorsWriter::create(&tmp.join(DENSE_FILE), plan, &meta)?;
        for (index, t) in self.tensors.iter().enumerate() {
            let parts = planned(t);
            let mut bufs: Vec<Vec<u8>> = parts.iter().map(|p| vec![0u8; p.bytes]).collect();
            let mut rng = rng(self.options.seed, u64::MAX - index as u64);
            match t.fill {
                Fill::Quantized { bits, std } => {
                    let [codes, scales, biases] = &mut bufs[..] else {
                        unreachable!("a quantized tensor has three parts")
                    };
                    // Large tensors (embeddings) are filled in parallel blocks.
                    let block = 1 << 20;
                    codes.par_chunks_mut(block).enumerate().for_each(|(i, c)| {
                        rng_block(self.options.seed, index, i).fill_bytes(c);
                    });
                    fill_scales_biases(&mut rng, scales, biases, bits, std);
                }
                Fill::Floats { dtype, mean, std } => {
                    for v in bufs[0].chunks_exact_mut(dtype.size()) {
                        let x = mean + std * standard_normal(&mut rng);
                        write_float(v, x, dtype);
                    }
                }
                Fill::LogUniform { low, high } => {
                    for v in bufs[0].chunks_exact_mut(4) {
                        v.copy_from_slice(&rng.random_range(low..high).ln().to_le_bytes());
                    }
                }
            }
            for b in &bufs {
                out.write_tensor(b)?;
                progress(b.len() as u64);
            }
        }
        out.finish()
    }
}

fn rng_block(seed: u64, tensor: usize, block: usize) -> SmallRng {
    rng(seed, ((tensor as u64) << 40) ^ block as u64 ^ 0xA5A5_0000_0000_0000)
}

/// Fills one matrix of a record: random codes, scales and biases for deviation `std`.
fn fill_record_matrix(rng: &mut SmallRng, record: &mut [u8], m: &MatrixRecord, bits: u32, std: f32) {
    let (Some([so, sl]), Some([bo, bl])) = (m.scales, m.biases) else {
        return;
    };
    let [d_off, d_len] = m.data;
    rng.fill_bytes(&mut record[d_off..d_off + d_len]);
    let (head, tail) = record.split_at_mut(bo);
    fill_scales_biases(rng, &mut head[so..so + sl], &mut tail[..bl], bits, std);
}

fn standard_normal(rng: &mut SmallRng) -> f32 {
    // Box-Muller.
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn write_float(out: &mut [u8], v: f32, dtype: DType) {
    match dtype {
        DType::BF16 => out.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
        DType::F16 => out.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
        DType::F32 | DType::U32 => out.copy_from_slice(&v.to_le_bytes()),
    }
}

fn write_text(dir: &Path, name: &str, text: &str) -> Result<FileDigest> {
    let mut out = HashingWriter::create(&dir.join(name))?;
    out.write(text.as_bytes())?;
    out.finish()
}

/// A byte-level BPE tokenizer with `vocab` ids: the 256 byte tokens, the chat special
/// tokens at the family's real ids, and filler tokens `tok<N>` for the rest, so every id
/// the model can produce decodes to text.
fn synthetic_tokenizer(vocab: usize, family: Family) -> Value {
    let bytes = byte_level_alphabet();
    let mut map = Map::new();
    for (i, c) in bytes.iter().enumerate() {
        map.insert(c.to_string(), json!(i));
    }
    let first_special = match family {
        Family::Qwen35Moe => 248_044,
        Family::Qwen3Next => 151_643,
    }
    .min(vocab - 3);
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    for id in 256..vocab {
        if (first_special..first_special + 3).contains(&id) {
            continue;
        }
        map.insert(format!("tok{id}"), json!(id));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": first_special + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": map, "merges": []}
    })
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the others are
/// shifted past U+0100.
fn byte_level_alphabet() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}
