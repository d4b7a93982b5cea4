//! The shapes of the real checkpoints, as `config.json` documents, for `flash-moe synth`.
//!
//! Sources: the published config.json files of Qwen/Qwen3.5-397B-A17B, Qwen3.5-35B-A3B and
//! Qwen3-Next-80B-A3B (see shared/research/qwen35-arch.md). For Qwen3.5-122B-A10B the public
//! figures give 48 layers (12 full attention), 256 experts with 8 routed plus 1 shared, a
//! 248,320 vocabulary and 122B parameters, which fix hidden 3072 with expert width 1024; its
//! attention and linear-attention head counts are taken to be the 397B's.

use serde_json::{Value, json};

/// The shapes `synth` knows.
pub const SHAPES: [&str; 4] = [
    "qwen3.5-397b-a17b",
    "qwen3.5-122b-a10b",
    "qwen3.5-35b-a3b",
    "qwen3-next-80b-a3b",
];

/// The config.json of shape `name`, with `layers` decoder layers and `experts` experts per
/// layer when given (the number of active experts is capped at `experts`).
pub fn config_json(name: &str, layers: Option<usize>, experts: Option<usize>) -> Option<Value> {
    let (family, hidden, n_layers, heads, lin_v, n_experts, top_k, inter, vocab) = match name {
        "qwen3.5-397b-a17b" => ("qwen3_5_moe", 4096, 60, 32, 64, 512, 10, 1024, 248_320),
        "qwen3.5-122b-a10b" => ("qwen3_5_moe", 3072, 48, 32, 64, 256, 8, 1024, 248_320),
        "qwen3.5-35b-a3b" => ("qwen3_5_moe", 2048, 40, 16, 32, 256, 8, 512, 248_320),
        "qwen3-next-80b-a3b" => ("qwen3_next", 2048, 48, 16, 32, 512, 10, 512, 151_936),
        _ => return None,
    };
    let n_layers = layers.unwrap_or(n_layers);
    let n_experts = experts.unwrap_or(n_experts);
    let eos = if family == "qwen3_next" { 151_645 } else { 248_044 };
    let mut text = json!({
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "full_attention_interval": 4,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": lin_v,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "num_experts": n_experts,
        "num_experts_per_tok": top_k.min(n_experts),
        "moe_intermediate_size": inter,
        "shared_expert_intermediate_size": inter,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262_144,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "eos_token_id": eos,
    });
    if family == "qwen3_next" {
        text["model_type"] = json!("qwen3_next");
        text["rope_theta"] = json!(10_000_000.0);
        text["partial_rotary_factor"] = json!(0.25);
        text["norm_topk_prob"] = json!(true);
        text["decoder_sparse_step"] = json!(1);
        text["intermediate_size"] = json!(5120);
        text["mlp_only_layers"] = json!([]);
        return Some(text);
    }
    text["model_type"] = json!("qwen3_5_moe_text");
    text["rope_parameters"] = json!({
        "rope_type": "default",
        "rope_theta": 10_000_000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": true
    });
    Some(json!({
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;

    #[test]
    fn every_shape_parses_and_397b_has_the_known_sizes() {
        for name in SHAPES {
            let json = config_json(name, None, None).unwrap();
            let c = ModelConfig::from_json_str(&json.to_string(), std::path::Path::new(name)).unwrap();
            assert_eq!(c.num_layers() % 4, 0, "{name}");
        }
        let json = config_json("qwen3.5-397b-a17b", Some(8), Some(64)).unwrap();
        let c = ModelConfig::from_json_str(&json.to_string(), std::path::Path::new("x")).unwrap();
        assert_eq!(
            (c.num_layers(), c.moe.num_experts, c.moe.experts_per_token),
            (8, 64, 10)
        );
        assert_eq!(c.linear.conv_dim(), 12288);
    }
}
