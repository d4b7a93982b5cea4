//! CPU attention for one token (decode) over a long KV cache, with Qwen3.5-397B's heads (32
//! query heads over 2 KV heads of 256): time per layer and the rate at which it reads the
//! cache (keys and values once); then a prompt's attention. Run with `cargo bench -p flash-moe-engine --bench cpu_attention`.

mod common;

use common::{median_secs, values};
use flash_moe_engine::backend::cpu::CpuBackend;
use flash_moe_engine::backend::{AttentionShape, Backend};

fn main() {
    let shape = AttentionShape {
        num_heads: 32,
        num_kv_heads: 2,
        head_dim: 256,
    };
    let (width, kv_width) = (32 * 256, 2 * 256);
    let b = CpuBackend::new();
    println!("{:<28} {:>10} {:>14}", "one token, context", "ms/layer", "cache GB/s");
    for context in [4096usize, 23_000] {
        let q = b.upload(&values(width, 1), 1, width).expect("query");
        let k = b
            .upload(&values(context * kv_width, 2), context, kv_width)
            .expect("keys");
        let v = b
            .upload(&values(context * kv_width, 3), context, kv_width)
            .expect("values");
        let secs = median_secs(7, || {
            std::hint::black_box(b.attention(&q, &k, &v, shape, context - 1).expect("attention"));
        });
        let bytes = 2.0 * (context * kv_width * 4) as f64;
        println!("{:<28} {:>10.2} {:>14.1}", context, secs * 1e3, bytes / secs / 1e9);
    }
    // A prompt: every query over the keys up to its own position.
    println!("{:<28} {:>10} {:>14}", "prompt, tokens", "ms/layer", "GFLOP/s");
    for tokens in [512usize, 2048] {
        let q = b.upload(&values(tokens * width, 1), tokens, width).expect("queries");
        let k = b.upload(&values(tokens * kv_width, 2), tokens, kv_width).expect("keys");
        let v = b
            .upload(&values(tokens * kv_width, 3), tokens, kv_width)
            .expect("values");
        let secs = median_secs(3, || {
            std::hint::black_box(b.attention(&q, &k, &v, shape, 0).expect("attention"));
        });
        // Scores and weighted values over the causal half: 2 * 2 * heads * d * tokens^2 / 2.
        let flops = 2.0 * (32 * 256) as f64 * (tokens * tokens) as f64;
        println!("{:<28} {:>10.2} {:>14.1}", tokens, secs * 1e3, flops / secs / 1e9);
    }
}
