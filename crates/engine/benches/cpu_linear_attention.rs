//! CPU Gated DeltaNet over a prompt, with Qwen3.5's linear-attention heads (16 key heads and
//! 32 or 64 value heads of 128): the causal conv and the gated delta rule, time per layer and
//! per prompt token. Run with `cargo bench -p flash-moe-engine --bench cpu_linear_attention`.

mod common;

use common::{median_secs, values};
use flash_moe_engine::backend::Backend;
use flash_moe_engine::backend::cpu::CpuBackend;
use flash_moe_engine::model::config::LinearAttentionConfig;

fn main() {
    let b = CpuBackend::new();
    println!(
        "{:<22} {:>7} {:>12} {:>12} {:>14}",
        "value heads, tokens", "", "conv ms", "delta ms", "delta us/token"
    );
    for (value_heads, tokens) in [(64usize, 1usize), (32, 16), (32, 512), (64, 512), (32, 2048)] {
        let dims = LinearAttentionConfig {
            num_key_heads: 16,
            num_value_heads: value_heads,
            key_head_dim: 128,
            value_head_dim: 128,
            conv_kernel: 4,
        };
        let channels = 2 * dims.key_dim() + dims.value_dim();
        let x = b.upload(&values(tokens * channels, 1), tokens, channels).expect("x");
        let weight = b.upload(&values(channels * 4, 2), channels, 4).expect("conv weight");
        let a = b
            .upload(&values(tokens * value_heads, 3), tokens, value_heads)
            .expect("a");
        let gate = b
            .upload(&values(tokens * value_heads, 4), tokens, value_heads)
            .expect("b");
        let a_log = b.upload(&values(value_heads, 5), 1, value_heads).expect("a_log");
        let dt_bias = b.upload(&values(value_heads, 6), 1, value_heads).expect("dt_bias");
        let state_len = dims.key_head_dim * dims.value_head_dim;
        let mut conv_state = b.upload(&vec![0.0; 3 * channels], 3, channels).expect("conv state");
        let mut state = b
            .upload(&vec![0.0; value_heads * state_len], value_heads, state_len)
            .expect("state");
        let conv = median_secs(9, || {
            std::hint::black_box(b.causal_conv1d_silu(&x, &weight, &mut conv_state).expect("conv"));
        });
        let delta = median_secs(9, || {
            std::hint::black_box(
                b.gated_delta_rule(&x, &a, &gate, &a_log, &dt_bias, &mut state, &dims)
                    .expect("delta rule"),
            );
        });
        println!(
            "{:<22} {:>7} {:>12.2} {:>12.2} {:>14.1}",
            format!("{value_heads}, {tokens}"),
            "",
            conv * 1e3,
            delta * 1e3,
            delta * 1e6 / tokens as f64
        );
    }
}
