//! CUDA kernel microbenchmarks: the one-token quantized matvec at expert and dense sizes,
//! against a device-to-device copy and pinned host-to-device copies measured in the same
//! run. Prints a table; exits quietly without a GPU. Times are CUDA-event medians.
//!
//! `cargo bench -p flash-moe-engine --bench cuda_kernels` (or the prebuilt binary).

use std::sync::Arc;

use cudarc::driver::{CudaStream, sys::CUevent_flags};
use flash_moe_engine::backend::Backend;
use flash_moe_engine::backend::cuda::{self, CudaBackend};
use flash_moe_engine::storage::blob::Blob;
use flash_moe_engine::storage::checkpoint::DType;
use flash_moe_engine::storage::quant::MatrixView;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Milliseconds of `f` on `stream`, by events, median of `reps`.
fn time_ms(stream: &Arc<CudaStream>, reps: usize, mut f: impl FnMut()) -> f64 {
    let ctx = stream.context();
    f(); // warm-up
    let times = (0..reps)
        .map(|_| {
            let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
            let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
            start.record(stream).expect("record");
            f();
            end.record(stream).expect("record");
            end.synchronize().expect("sync");
            f64::from(start.elapsed_ms(&end).expect("elapsed"))
        })
        .collect();
    median(times)
}

fn random_affine(rows: usize, cols: usize, bits: u32, seed: u64) -> MatrixView {
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let codes: Vec<u8> = (0..rows * cols * bits as usize / 8).map(|_| next() as u8).collect();
    let groups = rows * cols / 64;
    let half = |v: f32| half::bf16::from_f32(v).to_bits().to_le_bytes();
    let scales: Vec<u8> = (0..groups).flat_map(|_| half(0.01)).collect();
    let biases: Vec<u8> = (0..groups).flat_map(|_| half(-0.05)).collect();
    MatrixView::affine(
        "bench",
        rows,
        cols,
        bits,
        64,
        DType::BF16,
        Blob::from_vec(codes),
        Blob::from_vec(scales),
        Blob::from_vec(biases),
    )
    .expect("valid matrix")
}

fn main() {
    if !cuda::is_available() {
        println!("cuda_kernels: skipped, no CUDA driver or no GPU");
        return;
    }
    let b = CudaBackend::new(0, Some(0)).expect("opening the GPU");
    let stream = Arc::clone(b.stream());
    println!("device: {}", b.describe());

    let n = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(n).expect("alloc");
    let mut dst = stream.alloc_zeros::<u8>(n).expect("alloc");
    let ms = time_ms(&stream, 10, || stream.memcpy_dtod(&src, &mut dst).expect("copy"));
    let d2d = 2.0 * n as f64 / (ms * 1e-3);
    println!(
        "{:<44} {:>9.1} GB/s (read + write)",
        "device-to-device copy, 1 GiB",
        d2d / 1e9
    );

    let host = vec![7u8; 256 << 20];
    let mut dev = stream.alloc_zeros::<u8>(host.len()).expect("alloc");
    // SAFETY: filled before use by the copy below.
    let mut pinned = unsafe { stream.context().alloc_pinned_with_flags::<u8>(host.len(), 0) }.expect("pinned");
    pinned.as_mut_slice().expect("pinned slice").copy_from_slice(&host);
    let pageable_ms = time_ms(&stream, 10, || stream.memcpy_htod(&host, &mut dev).expect("copy"));
    let pinned_ms = time_ms(&stream, 10, || stream.memcpy_htod(&pinned, &mut dev).expect("copy"));
    let h2d = |ms: f64| host.len() as f64 / (ms * 1e-3) / 1e9;
    println!(
        "{:<44} {:>9.1} GB/s",
        "host-to-device, pageable, 256 MiB",
        h2d(pageable_ms)
    );
    println!("{:<44} {:>9.1} GB/s", "host-to-device, pinned, 256 MiB", h2d(pinned_ms));

    println!(
        "{:<44} {:>9} {:>9} {:>8}",
        "matvec (one token)", "us/call", "GB/s", "% of d2d"
    );
    for (name, rows, cols, bits, copies) in [
        ("expert gate/up 1024x4096 4-bit", 1024usize, 4096usize, 4u32, 256usize),
        ("expert down 4096x1024 4-bit", 4096, 1024, 4, 256),
        ("expert gate/up 1024x4096 2-bit", 1024, 4096, 2, 256),
        ("linear attn in_proj_qkv 12288x4096 4-bit", 12288, 4096, 4, 16),
        ("lm_head 248320x4096 4-bit", 248_320, 4096, 4, 1),
        ("router 512x4096 8-bit", 512, 4096, 8, 64),
    ] {
        // Several copies, used in turn, so the matrices do not sit in L2.
        let host_matrix = random_affine(rows, cols, bits, rows as u64 * 31 + bits as u64);
        let matrices: Vec<_> = (0..copies)
            .map(|_| b.load_matrix(&host_matrix).expect("upload"))
            .collect();
        let x = b.upload(&vec![0.5f32; cols], 1, cols).expect("upload");
        let calls = copies.max(8);
        let ms = time_ms(&stream, 5, || {
            for i in 0..calls {
                std::hint::black_box(b.matmul(&x, &matrices[i % copies]).expect("matvec"));
            }
        });
        let us = ms * 1e3 / calls as f64;
        let rate = host_matrix.storage_bytes() as f64 / (us * 1e-6);
        println!("{name:<44} {us:>9.2} {:>9.1} {:>7.0}%", rate / 1e9, 100.0 * rate / d2d);
    }
    for bits in [4u32, 2] {
        // A whole routed expert, one token: gate and up with SiLU fused, then down added
        // into the output with the routing weight; 256 experts in turn, as decode uses them.
        let view = flash_moe_engine::model::weights::ExpertView {
            gate: random_affine(1024, 4096, bits, 1),
            up: random_affine(1024, 4096, bits, 2),
            down: random_affine(4096, 1024, bits, 3),
        };
        let experts: Vec<_> = (0..256).map(|e| b.load_expert(0, e, &view).expect("upload")).collect();
        let x = b.upload(&vec![0.5f32; 4096], 1, 4096).expect("upload");
        let mut out = b.zeros(1, 4096).expect("alloc");
        let ms = time_ms(&stream, 5, || {
            for e in &experts {
                b.expert_ffn(&x, e, &[0], &[0.25], &mut out).expect("expert");
            }
        });
        let us = ms * 1e3 / experts.len() as f64;
        let rate = view.storage_bytes() as f64 / (us * 1e-6);
        let name = format!("whole expert 3x1024x4096 {bits}-bit, fused");
        println!("{name:<44} {us:>9.2} {:>9.1} {:>7.0}%", rate / 1e9, 100.0 * rate / d2d);
        for k in [4usize, 10] {
            // All K routed experts of a token in one batched pair of launches, as decode runs
            // them: the expert-sized matrices as the engine reads them.
            let groups: Vec<Vec<_>> = experts.chunks_exact(k).map(|c| c.iter().collect()).collect();
            let weights = vec![0.1f32; k];
            let ms = time_ms(&stream, 5, || {
                for group in &groups {
                    b.experts_ffn_one_token(&x, group, &weights, None, &mut out)
                        .expect("experts");
                }
            });
            let us = ms * 1e3 / groups.len() as f64;
            let rate = (k * view.storage_bytes()) as f64 / (us * 1e-6);
            let name = format!("{k} experts of one token {bits}-bit, batched");
            println!("{name:<44} {us:>9.2} {:>9.1} {:>7.0}%", rate / 1e9, 100.0 * rate / d2d);
        }
    }
    // The same kernels' FP32 counterparts (tensor cores off), for same-run ratios.
    let fp32 = CudaBackend::new(0, Some(0))
        .expect("second backend")
        .flash_attention(false);
    decode_attention(&b, &fp32, &stream, d2d);
    prompt_attention(&b, &fp32, &stream);
    host_cost_per_op(&b, &stream);
}

/// One token's attention over a long KV cache with Qwen3.5-397B's heads (32 query heads over
/// 2 KV heads of 256) and Qwen3-Next's (16 over 2), as decode runs it: on the tensor cores
/// and in FP32 (`fp32`, a backend with them off), with the rate at which the first reads the
/// cache (keys and values once). Short caches take several layers' caches in turn, so that
/// they do not sit in L2.
fn decode_attention(b: &CudaBackend, fp32: &CudaBackend, stream: &Arc<CudaStream>, d2d: f64) {
    use flash_moe_engine::backend::AttentionShape;
    println!(
        "{:<44} {:>9} {:>9} {:>8} {:>9} {:>7}",
        "attention (one token), context", "us/layer", "GB/s", "% of d2d", "us fp32", "ratio"
    );
    for (heads, context) in [32usize, 16]
        .into_iter()
        .flat_map(|h| [1024usize, 4096, 32_768, 131_072].map(|c| (h, c)))
    {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: 2,
            head_dim: 256,
        };
        let (width, kv_width) = (heads * 256, 2 * 256);
        let layers = (256 << 20) / (context * kv_width * 8) + 1;
        let fill = |seed: usize| -> Vec<f32> {
            (0..context * kv_width)
                .map(|i| ((i * 7 + seed) % 13) as f32 * 0.05 - 0.3)
                .collect()
        };
        let time = |be: &CudaBackend, s: &Arc<CudaStream>| {
            let caches: Vec<_> = (0..layers)
                .map(|l| {
                    let k = be.upload(&fill(2 * l), context, kv_width).expect("keys");
                    let v = be.upload(&fill(2 * l + 1), context, kv_width).expect("values");
                    (k, v)
                })
                .collect();
            let q = be.upload(&vec![0.1f32; width], 1, width).expect("query");
            let ms = time_ms(s, 5, || {
                for (k, v) in &caches {
                    std::hint::black_box(be.attention(&q, k, v, shape, context - 1).expect("attention"));
                }
            });
            ms * 1e3 / layers as f64
        };
        let us = time(b, stream);
        let us_fp32 = time(fp32, fp32.stream());
        let rate = (context * kv_width * 8) as f64 / (us * 1e-6);
        let name = format!("{heads}:2 heads of 256, {context} keys");
        println!(
            "{name:<44} {us:>9.2} {:>9.1} {:>7.0}% {us_fp32:>9.2} {:>6.2}x",
            rate / 1e9,
            100.0 * rate / d2d,
            us_fp32 / us
        );
    }
}

/// A 2048-token chunk of a long prompt's attention with Qwen3.5-397B's and Qwen3-Next's heads,
/// after 0 to 30K positions: on the tensor cores and as SGEMMs (`sgemm`, a backend with them
/// off), with the rate of the products the causal mask keeps (4 d FLOPs per head, query and
/// key seen).
fn prompt_attention(b: &CudaBackend, sgemm: &CudaBackend, stream: &Arc<CudaStream>) {
    use flash_moe_engine::backend::AttentionShape;
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>7}",
        "prompt attention, 2048 queries", "ms tc", "TFLOP/s", "ms sgemm", "ratio"
    );
    let queries = 2048;
    for (heads, cached) in [32usize, 16]
        .into_iter()
        .flat_map(|h| [0usize, 8192, 30_720].map(|c| (h, c)))
    {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: 2,
            head_dim: 256,
        };
        let (width, kv_width, rows) = (heads * 256, 2 * 256, cached + queries);
        let fill =
            |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7 + seed) % 13) as f32 * 0.05 - 0.3).collect() };
        let time = |be: &CudaBackend, s: &Arc<CudaStream>| {
            let k = be.upload(&fill(rows * kv_width, 1), rows, kv_width).expect("keys");
            let v = be.upload(&fill(rows * kv_width, 2), rows, kv_width).expect("values");
            let q = be.upload(&fill(queries * width, 3), queries, width).expect("queries");
            time_ms(s, 3, || {
                std::hint::black_box(be.attention(&q, &k, &v, shape, cached).expect("attention"));
            })
        };
        let tc = time(b, stream);
        let blas = time(sgemm, sgemm.stream());
        let seen = queries * cached + queries * (queries + 1) / 2;
        let tflops = (4 * 256 * heads * seen) as f64 / (tc * 1e-3) / 1e12;
        let name = format!("{heads}:2 heads of 256, after {cached}");
        println!("{name:<44} {tc:>9.2} {tflops:>9.1} {blas:>9.2} {:>6.1}x", blas / tc);
    }
}

/// What the host spends issuing one operation: consecutive tiny operations (4096 floats, well
/// under a microsecond of GPU work each) run at the host's pace, not the GPU's.
fn host_cost_per_op(b: &CudaBackend, stream: &Arc<CudaStream>) {
    let v = b.upload(&vec![0.5f32; 4096], 1, 4096).expect("upload");
    let weight = b.upload(&vec![1.0f32; 4096], 1, 4096).expect("upload");
    let mut acc = b.zeros(1, 4096).expect("alloc");
    let calls = 2000;
    let in_place = time_ms(stream, 5, || {
        for _ in 0..calls {
            b.add_assign(&mut acc, &v).expect("add");
        }
    });
    let with_output = time_ms(stream, 5, || {
        for _ in 0..calls {
            std::hint::black_box(b.rms_norm(&v, &weight, 1e-6).expect("norm"));
        }
    });
    let us = |ms: f64| ms * 1e3 / calls as f64;
    println!("{:<44} {:>9.2}", "host us per op, in place (add)", us(in_place));
    println!(
        "{:<44} {:>9.2}",
        "host us per op, new output (rms_norm)",
        us(with_output)
    );
}
