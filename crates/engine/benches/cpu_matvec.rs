//! CPU matrix-vector throughput on the shapes that dominate decode, against a memory copy
//! measured in the same run. Run with `cargo bench -p flash-moe-engine --bench cpu_matvec`.

use std::time::Instant;

use flash_moe_engine::backend::Backend;
use flash_moe_engine::backend::cpu::CpuBackend;
use flash_moe_engine::storage::blob::Blob;
use flash_moe_engine::storage::checkpoint::DType;
use flash_moe_engine::storage::quant::MatrixView;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn affine(rows: usize, cols: usize, bits: u32) -> MatrixView {
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let codes: Vec<u8> = (0..rows * cols * bits as usize / 8).map(|_| next() as u8).collect();
    let groups = rows * cols / 64;
    let scale: Vec<u8> = (0..groups)
        .flat_map(|_| half::bf16::from_f32(0.01).to_bits().to_le_bytes())
        .collect();
    let bias: Vec<u8> = (0..groups)
        .flat_map(|_| half::bf16::from_f32(-0.05).to_bits().to_le_bytes())
        .collect();
    MatrixView::affine(
        "bench",
        rows,
        cols,
        bits,
        64,
        DType::BF16,
        Blob::from_vec(codes),
        Blob::from_vec(scale),
        Blob::from_vec(bias),
    )
    .expect("valid matrix")
}

fn main() {
    let b = CpuBackend::new();
    // Memory bandwidth: copy 1 GiB, counting bytes read and written.
    let src = vec![1u8; 1 << 30];
    let mut dst = vec![0u8; 1 << 30];
    let copy = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                dst.copy_from_slice(&src);
                std::hint::black_box(&dst);
                2.0 * src.len() as f64 / t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    println!("memcpy: {:.2} GB/s (read + write, one thread)", copy / 1e9);
    for (name, rows, cols, bits) in [
        ("lm_head 248320x4096", 248_320, 4096, 4),
        ("expert gate 1024x4096", 1024, 4096, 4),
        ("expert down 4096x1024", 4096, 1024, 4),
        ("expert gate 1024x4096", 1024, 4096, 2),
        ("router 512x4096", 512, 4096, 8),
        // Qwen3.5-35B-A3B: short rows, where each row's own work weighs most.
        ("35B lm_head 248320x2048", 248_320, 2048, 4),
        ("35B expert gate 512x2048", 512, 2048, 4),
        ("35B expert down 2048x512", 2048, 512, 4),
    ] {
        let w = affine(rows, cols, bits);
        let x = b.upload(&vec![0.5f32; cols], 1, cols).expect("upload");
        let reps = (2_000_000_000 / (rows * cols)).clamp(3, 200);
        let rates: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(b.matmul(&x, &w).expect("matmul"));
                w.storage_bytes() as f64 / t.elapsed().as_secs_f64()
            })
            .collect();
        println!(
            "{name} {bits}-bit: {:.2} GB/s of weights (median of {reps})",
            median(rates) / 1e9
        );
    }
    // A prompt's product: every token against every row, compute-bound when done well.
    for (name, rows, cols, tokens) in [
        ("in_proj 4096x4096 4-bit", 4096, 4096, 2),
        ("in_proj 4096x4096 4-bit", 4096, 4096, 4),
        ("in_proj 4096x4096 4-bit", 4096, 4096, 8),
        ("in_proj 4096x4096 4-bit", 4096, 4096, 12),
        ("in_proj 4096x4096 4-bit", 4096, 4096, 16),
        ("in_proj 4096x4096 4-bit", 4096, 4096, 32),
        ("in_proj 4096x4096 4-bit", 4096, 4096, 64),
        ("in_proj 4096x4096 4-bit", 4096, 4096, 512),
        ("in_proj 4096x4096 4-bit", 4096, 4096, 2048),
        ("in_proj 2048x12288 4-bit", 12288, 2048, 2048),
        ("expert gate 1024x4096 4-bit", 1024, 4096, 24),
    ] {
        let w = affine(rows, cols, 4);
        let x = b.upload(&vec![0.5f32; tokens * cols], tokens, cols).expect("upload");
        let rates: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(b.matmul(&x, &w).expect("matmul"));
                2.0 * (rows * cols * tokens) as f64 / t.elapsed().as_secs_f64()
            })
            .collect();
        println!(
            "{name} x {tokens} tokens: {:.1} GFLOP/s (median of 3)",
            median(rates) / 1e9
        );
    }
}
