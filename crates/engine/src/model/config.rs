//! Model configuration read from a Hugging Face `config.json` at run time.
//!
//! Two families share one architecture description: Qwen3.5-MoE (`qwen3_5_moe`, text fields
//! nested under `text_config`, or the bare `qwen3_5_moe_text`) and Qwen3-Next (`qwen3_next`).
//! Defaults follow transformers' config classes where a real checkpoint may omit a field;
//! the dimensions that define the model must be present.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The model families the engine implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Qwen3.5-MoE: separate `in_proj_qkv`/`in_proj_z`/`in_proj_b`/`in_proj_a`, top-k always renormalised.
    Qwen35Moe,
    /// Qwen3-Next: fused `in_proj_qkvz`/`in_proj_ba` grouped per key head, `norm_topk_prob` from config.
    Qwen3Next,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Qwen35Moe => "qwen3_5_moe",
            Family::Qwen3Next => "qwen3_next",
        }
    }
}

/// The token mixer of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Gated full attention with a KV cache.
    FullAttention,
    /// Gated DeltaNet linear attention with conv and recurrent state.
    LinearAttention,
}

/// The feed-forward block of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKind {
    /// Routed experts plus a gated shared expert.
    Moe,
    /// A dense SwiGLU MLP (Qwen3-Next `mlp_only_layers` / `decoder_sparse_step`).
    Dense,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (`head_dim * partial_rotary_factor`).
    pub rotary_dim: usize,
    pub rope_theta: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LinearAttentionConfig {
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    pub conv_kernel: usize,
}

impl LinearAttentionConfig {
    pub fn key_dim(&self) -> usize {
        self.num_key_heads * self.key_head_dim
    }
    pub fn value_dim(&self) -> usize {
        self.num_value_heads * self.value_head_dim
    }
    /// Channels through the causal conv: q, k and v side by side.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub expert_intermediate: usize,
    /// Zero when the model has no shared expert.
    pub shared_intermediate: usize,
    /// Renormalise the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub layers: Vec<LayerKind>,
    pub ffn: Vec<FfnKind>,
    /// Intermediate size of dense MLP layers (only read when some layer is dense).
    pub dense_intermediate: usize,
    pub attention: AttentionConfig,
    pub linear: LinearAttentionConfig,
    pub moe: MoeConfig,
    /// EOS ids named in config.json (the tokenizer adds more from its own files).
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text, &path)
    }

    /// Parses the text of a `config.json`; `path` is used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            error: source,
        })?;
        let root = root.as_object().ok_or_else(|| Error::InvalidField {
            path: path.to_path_buf(),
            field: "(root)".into(),
            message: "expected a JSON object".into(),
        })?;
        let model_type = root
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::MissingField {
                path: path.to_path_buf(),
                field: "model_type".into(),
            })?;
        let (family, fields, prefix) = match model_type {
            "qwen3_5_moe" => {
                let text = root
                    .get("text_config")
                    .and_then(Value::as_object)
                    .ok_or_else(|| Error::MissingField {
                        path: path.to_path_buf(),
                        field: "text_config".into(),
                    })?;
                (Family::Qwen35Moe, text, "text_config.")
            }
            "qwen3_5_moe_text" => (Family::Qwen35Moe, root, ""),
            "qwen3_next" => (Family::Qwen3Next, root, ""),
            other => {
                return Err(Error::UnknownModelType {
                    path: path.to_path_buf(),
                    model_type: other.into(),
                });
            }
        };
        let reader = Fields {
            path: path.to_path_buf(),
            map: fields,
            prefix,
        };
        let mut config = parse(family, &reader)?;
        // A top-level eos (outside text_config) also counts.
        if config.eos_token_ids.is_empty() {
            let top = Fields {
                path: path.to_path_buf(),
                map: root,
                prefix: "",
            };
            config.eos_token_ids = top.token_ids("eos_token_id")?;
        }
        Ok(config)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

fn parse(family: Family, f: &Fields<'_>) -> Result<ModelConfig> {
    if f.bool_or("attention_bias", false)? {
        return Err(f.invalid(
            "attention_bias",
            "attention projections with bias are not supported".into(),
        ));
    }
    if let Some(act) = f.get("hidden_act").and_then(Value::as_str).filter(|a| *a != "silu") {
        return Err(f.invalid("hidden_act", format!("`{act}` is not supported (only silu)")));
    }
    let hidden_size = f.usize("hidden_size")?;
    let num_layers = f.usize("num_hidden_layers")?;
    let num_heads = f.usize("num_attention_heads")?;
    let head_dim = f.usize_or("head_dim", 256)?;
    let (rope_theta, partial) = rope(f)?;
    let rotary_dim = (head_dim as f64 * partial) as usize;
    if !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
        return Err(f.invalid(
            "partial_rotary_factor",
            format!("gives an odd or oversized rotary dim {rotary_dim}"),
        ));
    }
    let attention = AttentionConfig {
        num_heads,
        num_kv_heads: f.usize("num_key_value_heads")?,
        head_dim,
        rotary_dim,
        rope_theta,
    };
    if attention.num_kv_heads == 0 || num_heads % attention.num_kv_heads != 0 {
        return Err(f.invalid("num_key_value_heads", "must divide num_attention_heads".into()));
    }
    let linear = LinearAttentionConfig {
        num_key_heads: f.usize("linear_num_key_heads")?,
        num_value_heads: f.usize("linear_num_value_heads")?,
        key_head_dim: f.usize("linear_key_head_dim")?,
        value_head_dim: f.usize("linear_value_head_dim")?,
        conv_kernel: f.usize_or("linear_conv_kernel_dim", 4)?,
    };
    if linear.num_key_heads == 0 || !linear.num_value_heads.is_multiple_of(linear.num_key_heads) {
        return Err(f.invalid(
            "linear_num_value_heads",
            "must be a multiple of linear_num_key_heads".into(),
        ));
    }
    let moe = MoeConfig {
        num_experts: f.usize("num_experts")?,
        experts_per_token: f.usize("num_experts_per_tok")?,
        expert_intermediate: f.usize("moe_intermediate_size")?,
        shared_intermediate: f.usize_or("shared_expert_intermediate_size", 0)?,
        norm_topk_prob: match family {
            Family::Qwen35Moe => true,
            Family::Qwen3Next => f.bool_or("norm_topk_prob", true)?,
        },
    };
    if moe.experts_per_token == 0 || moe.experts_per_token > moe.num_experts {
        return Err(f.invalid(
            "num_experts_per_tok",
            format!("must be between 1 and num_experts ({})", moe.num_experts),
        ));
    }
    let layers = layer_kinds(f, num_layers)?;
    let ffn = ffn_kinds(family, f, num_layers)?;
    let dense_intermediate = if ffn.contains(&FfnKind::Dense) {
        f.usize("intermediate_size")?
    } else {
        0
    };
    Ok(ModelConfig {
        family,
        hidden_size,
        vocab_size: f.usize("vocab_size")?,
        rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        max_position_embeddings: f.usize_or("max_position_embeddings", 32768)?,
        layers,
        ffn,
        dense_intermediate,
        attention,
        linear,
        moe,
        eos_token_ids: f.token_ids("eos_token_id")?,
    })
}

/// `layer_types` when present (any pattern), else every `full_attention_interval`-th layer.
fn layer_kinds(f: &Fields<'_>, num_layers: usize) -> Result<Vec<LayerKind>> {
    if let Some(list) = f.get("layer_types") {
        let items = list
            .as_array()
            .ok_or_else(|| f.invalid("layer_types", "expected a list of strings".into()))?;
        if items.len() != num_layers {
            return Err(f.invalid(
                "layer_types",
                format!("has {} entries for {num_layers} layers", items.len()),
            ));
        }
        return items
            .iter()
            .map(|v| match v.as_str() {
                Some("full_attention") => Ok(LayerKind::FullAttention),
                Some("linear_attention") => Ok(LayerKind::LinearAttention),
                other => Err(f.invalid("layer_types", format!("unknown layer type {other:?}"))),
            })
            .collect();
    }
    let interval = f.usize_or("full_attention_interval", 4)?;
    if interval == 0 {
        return Err(f.invalid("full_attention_interval", "must be positive".into()));
    }
    Ok((0..num_layers)
        .map(|i| {
            if (i + 1) % interval == 0 {
                LayerKind::FullAttention
            } else {
                LayerKind::LinearAttention
            }
        })
        .collect())
}

/// Qwen3-Next may make some layers dense; Qwen3.5-MoE layers are all MoE.
fn ffn_kinds(family: Family, f: &Fields<'_>, num_layers: usize) -> Result<Vec<FfnKind>> {
    if family == Family::Qwen35Moe {
        return Ok(vec![FfnKind::Moe; num_layers]);
    }
    let step = f.usize_or("decoder_sparse_step", 1)?.max(1);
    let dense: Vec<usize> = match f.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or_else(|| f.invalid("mlp_only_layers", "expected a list of layer indices".into()))?
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| f.invalid("mlp_only_layers", "expected a list of layer indices".into()))?,
    };
    Ok((0..num_layers)
        .map(|i| {
            if !dense.contains(&i) && (i + 1) % step == 0 {
                FfnKind::Moe
            } else {
                FfnKind::Dense
            }
        })
        .collect())
}

/// RoPE theta and partial factor: `rope_parameters` first, then the legacy top-level fields,
/// then transformers' defaults (theta 10000, factor 0.25).
fn rope(f: &Fields<'_>) -> Result<(f64, f64)> {
    let params = f
        .get("rope_parameters")
        .or_else(|| f.get("rope_scaling"))
        .and_then(Value::as_object);
    let from_params = |key: &str| params.and_then(|p| p.get(key)).and_then(Value::as_f64);
    if let Some(p) = params {
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(f.invalid(
                "rope_parameters.rope_type",
                format!("`{kind}` is not supported (only default RoPE)"),
            ));
        }
    }
    let theta = match from_params("rope_theta") {
        Some(t) => t,
        None => f.f64_or("rope_theta", 10000.0)?,
    };
    let partial = match from_params("partial_rotary_factor") {
        Some(p) => p,
        None => f.f64_or("partial_rotary_factor", 0.25)?,
    };
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(f.invalid("partial_rotary_factor", format!("{partial} is not in (0, 1]")));
    }
    Ok((theta, partial))
}

/// Typed access to one JSON object, with errors that name the file and field.
struct Fields<'a> {
    path: PathBuf,
    map: &'a Map<String, Value>,
    prefix: &'static str,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn invalid(&self, field: &str, message: String) -> Error {
        Error::InvalidField {
            path: self.path.clone(),
            field: format!("{}{field}", self.prefix),
            message,
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            None => Err(Error::MissingField {
                path: self.path.clone(),
                field: format!("{}{key}", self.prefix),
            }),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.invalid(key, format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.get(key).is_none() {
            Ok(default)
        } else {
            self.usize(key)
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.invalid(key, format!("expected a number, found {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.invalid(key, format!("expected true or false, found {v}"))),
        }
    }

    /// A token id or a list of them.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || self.invalid(key, "expected a token id or a list of token ids".into());
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32).ok_or_else(bad))
                .collect(),
            Some(v) => v.as_u64().map(|x| vec![x as u32]).ok_or_else(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN35_397B: &str = r#"{
      "model_type": "qwen3_5_moe",
      "text_config": {
        "model_type": "qwen3_5_moe_text", "hidden_size": 4096, "num_hidden_layers": 8,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 64, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 512,
        "num_experts_per_tok": 10, "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024,
        "vocab_size": 248320, "rms_norm_eps": 1e-6, "full_attention_interval": 4, "eos_token_id": 248044,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": true}
      }
    }"#;

    fn parse_str(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    #[test]
    fn reads_nested_text_config_and_interval() {
        let c = parse_str(QWEN35_397B).unwrap();
        assert_eq!(c.family, Family::Qwen35Moe);
        assert_eq!(c.attention.rotary_dim, 64);
        assert_eq!(c.attention.rope_theta, 1e7);
        assert_eq!(c.linear.conv_dim(), 12288);
        use LayerKind::*;
        assert_eq!(
            &c.layers[..4],
            &[LinearAttention, LinearAttention, LinearAttention, FullAttention]
        );
        assert_eq!(c.eos_token_ids, vec![248044]);
        assert!(c.moe.norm_topk_prob);
    }

    #[test]
    fn layer_types_win_over_the_interval() {
        let text = QWEN35_397B.replace(
            "\"full_attention_interval\": 4",
            "\"layer_types\": [\"full_attention\", \"linear_attention\", \"full_attention\", \"full_attention\",
              \"linear_attention\", \"linear_attention\", \"linear_attention\", \"full_attention\"]",
        );
        let c = parse_str(&text).unwrap();
        assert_eq!(c.layers[0], LayerKind::FullAttention);
        assert_eq!(c.layers[1], LayerKind::LinearAttention);
        assert_eq!(c.layers[3], LayerKind::FullAttention);
    }

    #[test]
    fn qwen3_next_reads_legacy_rope_and_dense_layers() {
        let text = r#"{"model_type": "qwen3_next", "hidden_size": 2048, "num_hidden_layers": 4,
          "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
          "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
          "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
          "shared_expert_intermediate_size": 512, "vocab_size": 151936, "rope_theta": 10000000,
          "partial_rotary_factor": 0.25, "norm_topk_prob": false, "mlp_only_layers": [1],
          "intermediate_size": 5120, "eos_token_id": 151645}"#;
        let c = parse_str(text).unwrap();
        assert_eq!(c.family, Family::Qwen3Next);
        assert_eq!(c.attention.rope_theta, 1e7);
        assert!(!c.moe.norm_topk_prob);
        assert_eq!(c.ffn, vec![FfnKind::Moe, FfnKind::Dense, FfnKind::Moe, FfnKind::Moe]);
        assert_eq!(c.dense_intermediate, 5120);
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse_str(&QWEN35_397B.replace("\"num_experts\": 512,", "")).unwrap_err();
        assert!(err.to_string().contains("text_config.num_experts"), "{err}");
        let err = parse_str(r#"{"model_type": "llama"}"#).unwrap_err();
        assert!(err.to_string().contains("llama"), "{err}");
        let err = parse_str(&QWEN35_397B.replace("\"hidden_size\": 4096", "\"hidden_size\": \"big\"")).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
        let err = parse_str(&QWEN35_397B.replace("\"default\"", "\"yarn\"")).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }
}
