//! The CUDA backend against the CPU backend: every operation on random inputs, then every
//! fixture model end to end (relative L2 under 1e-3 and the same argmax at every position).
//! Without a usable GPU each test prints why it is skipped and passes.
//!
//! On a machine without cargo, run the prebuilt test binary with `FLASH_MOE_FIXTURES` set to
//! the fixtures directory (tools/gpu-check.sh does).

use std::path::PathBuf;
use std::sync::Arc;

use flash_moe_engine::backend::cpu::CpuBackend;
use flash_moe_engine::backend::cuda::{self, CudaBackend};
use flash_moe_engine::backend::{
    AttentionShape, Backend, ExpertCacheStats, ExpertRows, HeadPrep, SharedExpert, attention_inputs_unfused,
};
use flash_moe_engine::engine::load_model;
use flash_moe_engine::engine::logprobs::TokenLogprob;
use flash_moe_engine::engine::sampler::SamplingParams;
use flash_moe_engine::engine::session::{GenerationRequest, Session, TextSink};
use flash_moe_engine::model::config::{LayerKind, LinearAttentionConfig, ModelConfig};
use flash_moe_engine::model::weights::ExpertView;
use flash_moe_engine::model::{CpuShare, Logits};
use flash_moe_engine::storage::blob::Blob;
use flash_moe_engine::storage::checkpoint::DType;
use flash_moe_engine::storage::quant::MatrixView;
use flash_moe_engine::storage::quantize::quantize_affine;
use flash_moe_engine::storage::store::{ExpertIo, ExpertStore, StoreConfig};
use flash_moe_engine::tokenizer::Tokenizer;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

type Result<T> = flash_moe_engine::Result<T>;

fn gpu(cache_bytes: Option<u64>) -> Option<CudaBackend> {
    if !cuda::is_available() {
        // Written past the test harness's output capture, so the skip shows in every log.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "cuda_parity: SKIPPED, no CUDA driver or no GPU on this machine"
        );
        return None;
    }
    Some(CudaBackend::new(0, cache_bytes).unwrap_or_else(|e| panic!("a GPU is present but unusable: {e}")))
}

fn fixtures() -> PathBuf {
    std::env::var_os("FLASH_MOE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    assert!(a.iter().all(|v| v.is_finite()), "non-finite output");
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

fn random(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Runs one operation on both backends and checks the outputs agree.
macro_rules! same_on_both {
    ($name:expr, $cpu:expr, $gpu:expr, $tol:expr, $args:expr, |$b:ident, $p:ident : $t:ty| $body:expr) => {{
        fn run<B: Backend>($b: &B, $p: $t) -> Result<Vec<f32>> {
            $body
        }
        let want = run($cpu, $args).unwrap_or_else(|e| panic!("{} on the CPU: {e}", $name));
        let got = run($gpu, $args).unwrap_or_else(|e| panic!("{} on CUDA: {e}", $name));
        let err = relative_l2(&got, &want);
        eprintln!("{:<44} relative L2 {err:.2e}", $name);
        assert!(err < $tol, "{}: relative L2 {err:.3e}", $name);
    }};
}

/// The expert with its parts copied into one buffer, 16 bytes apart, the way a record read
/// from disk holds them (the CUDA backend then uploads the record in one copy).
fn as_one_record(mut view: ExpertView) -> ExpertView {
    let mut bytes = vec![0u8; 16];
    let mut ranges = Vec::new();
    for m in [&view.gate, &view.up, &view.down] {
        for part in [Some(&m.data), m.scales.as_ref(), m.biases.as_ref()]
            .into_iter()
            .flatten()
        {
            ranges.push((bytes.len(), part.len()));
            bytes.extend_from_slice(part.bytes());
            bytes.resize(bytes.len().next_multiple_of(16) + 16, 0);
        }
    }
    let record = Blob::from_vec(bytes);
    let mut ranges = ranges.into_iter().map(|(at, len)| record.sub(at, len));
    for m in [&mut view.gate, &mut view.up, &mut view.down] {
        for part in [Some(&mut m.data), m.scales.as_mut(), m.biases.as_mut()]
            .into_iter()
            .flatten()
        {
            *part = ranges.next().expect("one range per part");
        }
    }
    view
}

fn matrix(rng: &mut SmallRng, rows: usize, cols: usize, encoding: &str) -> MatrixView {
    let values = random(rng, rows * cols, 0.5);
    let dense =
        |dtype: DType, bytes: Vec<u8>| MatrixView::dense("w", rows, cols, dtype, Blob::from_vec(bytes)).unwrap();
    match encoding {
        "f32" => dense(DType::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        "bf16" => dense(
            DType::BF16,
            values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        "f16" => dense(
            DType::F16,
            values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        q => {
            let (bits, group): (u32, usize) = {
                let mut parts = q.trim_start_matches('q').split("/g");
                (
                    parts.next().unwrap().parse().unwrap(),
                    parts.next().unwrap().parse().unwrap(),
                )
            };
            let qz = quantize_affine(&values, cols, bits, group, DType::BF16);
            MatrixView::affine(
                "w",
                rows,
                cols,
                bits,
                group,
                DType::BF16,
                Blob::from_vec(qz.codes),
                Blob::from_vec(qz.scales),
                Blob::from_vec(qz.biases),
            )
            .unwrap()
        }
    }
}

// The inputs of each case are drawn inside the generic function from a fixed seed, so both
// backends see the same values.
#[test]
fn every_operation_matches_the_cpu() {
    let Some(gpu) = gpu(Some(0)) else { return };
    let cpu = CpuBackend::new();
    for encoding in [
        "f32", "bf16", "f16", "q2/g64", "q3/g64", "q4/g32", "q4/g64", "q4/g128", "q5/g64", "q6/g64", "q8/g64",
    ] {
        for tokens in [1usize, 5] {
            // Odd numbers of rows too: the one-token kernels take the rows of a tall matrix
            // (at least 16 per multiprocessor) in pairs.
            for (rows, cols) in [(97usize, 256usize), (4097, 256), (1024, 4096)] {
                let name = format!("matmul {encoding} [{rows}x{cols}] x {tokens} tokens");
                let args = (rows, cols, tokens, encoding);
                same_on_both!(name, &cpu, &gpu, 1e-4, args, |b, p: (usize, usize, usize, &str)| {
                    let (rows, cols, tokens, enc) = p;
                    let mut rng = SmallRng::seed_from_u64(1);
                    let w = b.load_matrix(&matrix(&mut rng, rows, cols, enc))?;
                    let x = b.upload(&random(&mut rng, tokens * cols, 1.0), tokens, cols)?;
                    b.download(&b.matmul(&x, &w)?)
                });
            }
        }
    }
    // A prompt's product with a tall 2-, 4- or 8-bit matrix runs on the tensor cores (32 row
    // tiles by 9 token tiles, the last of each part full).
    for encoding in ["q4/g64", "q2/g64", "q8/g32", "q4/g128"] {
        let name = format!("matmul {encoding} [4000x512] x 260 tokens");
        same_on_both!(name, &cpu, &gpu, 1e-4, encoding, |b, enc: &str| {
            let mut rng = SmallRng::seed_from_u64(3);
            let w = b.load_matrix(&matrix(&mut rng, 4000, 512, enc))?;
            let x = b.upload(&random(&mut rng, 260 * 512, 4.0), 260, 512)?;
            b.download(&b.matmul(&x, &w)?)
        });
    }
    for (encoding, tokens) in [
        ("q4/g64", 1usize),
        ("q2/g64", 1),
        ("q8/g64", 1),
        ("q3/g64", 1),
        ("q4/g64", 3),
    ] {
        let name = format!("expert_ffn {encoding} x {tokens} tokens, accumulated");
        same_on_both!(name, &cpu, &gpu, 1e-4, (encoding, tokens), |b, p: (&str, usize)| {
            let (enc, tokens) = p;
            let mut rng = SmallRng::seed_from_u64(11);
            let view = ExpertView {
                gate: matrix(&mut rng, 256, 512, enc),
                up: matrix(&mut rng, 256, 512, enc),
                down: matrix(&mut rng, 512, 256, enc),
            };
            let expert = b.load_expert(0, 0, &view)?;
            let x = b.upload(&random(&mut rng, tokens * 512, 1.0), tokens, 512)?;
            let mut out = b.upload(&random(&mut rng, tokens * 512, 1.0), tokens, 512)?;
            let rows: Vec<usize> = (0..tokens).collect();
            let weights: Vec<f32> = (0..tokens).map(|i| 0.3 + i as f32).collect();
            b.expert_ffn(&x, &expert, &rows, &weights, &mut out)?;
            b.download(&out)
        });
    }
    // A layer's experts for a batch of tokens, each token choosing 3 of 6 (one expert with a
    // single token): on CUDA one gather, the products, one combine.
    // Large groups of 4-, 2- and 8-bit experts go through the grouped kernel on the tensor
    // cores (several tiles of 128 rows by 32 tokens per expert, enough to fill the GPU; inputs
    // up to a thousand test the limbs' scaling), small ones and 3-bit ones through SGEMM.
    let cases = [
        ("q4/g64", 9usize, 128usize, 1.0f32),
        ("q3/g64", 9, 128, 1.0),
        ("q4/g64", 400, 1024, 1.0),
        ("q4/g64", 397, 1024, 1000.0),
        ("q4/g128", 400, 1024, 1.0),
        // Two scale groups per stage, and a last tile of rows only part full.
        ("q4/g32", 400, 960, 1.0),
        ("q2/g64", 400, 1024, 1.0),
        ("q8/g32", 400, 1024, 1.0),
    ];
    for (encoding, tokens, inter, scale) in cases {
        let name = format!("experts_ffn_rows {encoding}, {tokens} tokens x 3 of 6 experts of {inter}, x up to {scale}");
        let args = (encoding, tokens, inter, scale);
        same_on_both!(name, &cpu, &gpu, 1e-4, args, |b, p: (&str, usize, usize, f32)| {
            let (enc, tokens, inter, scale) = p;
            let mut rng = SmallRng::seed_from_u64(14);
            let experts = (0..6)
                .map(|e| {
                    let view = ExpertView {
                        gate: matrix(&mut rng, inter, 512, enc),
                        up: matrix(&mut rng, inter, 512, enc),
                        down: matrix(&mut rng, 512, inter, enc),
                    };
                    b.load_expert(0, e, &view)
                })
                .collect::<Result<Vec<_>>>()?;
            let mut chosen: Vec<(Vec<usize>, Vec<f32>)> = vec![Default::default(); 6];
            for t in 0..tokens {
                let picks = if t == 0 {
                    [5, 0, 1]
                } else {
                    [t % 5, (t + 1) % 5, (t + 3) % 5]
                };
                for (j, e) in picks.into_iter().enumerate() {
                    chosen[e].0.push(t);
                    chosen[e].1.push(0.1 + 0.2 * j as f32 + 0.01 * t as f32);
                }
            }
            let work: Vec<ExpertRows<'_, _>> = experts
                .iter()
                .zip(&chosen)
                .map(|(expert, (rows, weights))| ExpertRows { expert, rows, weights })
                .collect();
            let x = b.upload(&random(&mut rng, tokens * 512, scale), tokens, 512)?;
            let mut out = b.upload(&random(&mut rng, tokens * 512, 1.0), tokens, 512)?;
            b.experts_ffn_rows(&x, &work, &mut out)?;
            b.download(&out)
        });
    }
    // With a shared expert of the routed experts' encoding (batched with them on CUDA), of
    // another encoding (run on its own), and without one.
    let cases = [
        ("q4/g64", 10usize, Some("q4/g64")),
        ("q4/g64", 15, Some("q4/g64")),
        ("q4/g64", 4, Some("q8/g64")),
        ("q2/g64", 17, Some("q2/g64")),
        ("q8/g64", 3, Some("q8/g64")),
        ("q5/g64", 4, None),
    ];
    for (encoding, count, shared) in cases {
        let name = format!(
            "experts_ffn_one_token {encoding} x {count}, shared {}",
            shared.unwrap_or("none")
        );
        same_on_both!(name, &cpu, &gpu, 1e-4, (encoding, count, shared), |b,
                                                                          p: (
            &str,
            usize,
            Option<&str>
        )| {
            let (enc, count, shared_enc) = p;
            let mut rng = SmallRng::seed_from_u64(12);
            let experts = (0..count)
                .map(|e| {
                    let view = ExpertView {
                        gate: matrix(&mut rng, 128, 512, enc),
                        up: matrix(&mut rng, 128, 512, enc),
                        down: matrix(&mut rng, 512, 128, enc),
                    };
                    // Every other expert arrives as one record, as from the expert store.
                    let view = if e % 2 == 1 { as_one_record(view) } else { view };
                    b.load_expert(0, e, &view)
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<_> = experts.iter().collect();
            let weights: Vec<f32> = (0..count).map(|i| 0.05 * (i + 1) as f32).collect();
            let x = b.upload(&random(&mut rng, 512, 1.0), 1, 512)?;
            let mut out = b.upload(&random(&mut rng, 512, 1.0), 1, 512)?;
            let shared = match shared_enc {
                Some(enc) => {
                    let gate = b.load_matrix(&matrix(&mut rng, 1, 512, "q8/g64"))?;
                    Some((
                        [
                            b.load_matrix(&matrix(&mut rng, 128, 512, enc))?,
                            b.load_matrix(&matrix(&mut rng, 128, 512, enc))?,
                            b.load_matrix(&matrix(&mut rng, 512, 128, enc))?,
                        ],
                        b.matmul(&x, &gate)?,
                    ))
                }
                None => None,
            };
            let shared = shared
                .as_ref()
                .map(|([gate_proj, up_proj, down_proj], gate_logit)| SharedExpert {
                    gate_proj,
                    up_proj,
                    down_proj,
                    gate_logit,
                });
            b.experts_ffn_one_token(&x, &refs, &weights, shared.as_ref(), &mut out)?;
            b.download(&out)
        });
    }
    // Matrices of one encoding (rows of very different counts, odd ones too), of mixed
    // encodings, and with more than one input row.
    let many = [
        (["q4/g64", "q4/g64", "q4/g64", "q4/g64"], 1usize),
        (["q8/g64", "q8/g64", "q8/g64", "q8/g64"], 1),
        (["q2/g32", "q2/g32", "q2/g32", "q2/g32"], 1),
        (["q4/g64", "q8/g64", "q4/g64", "q4/g64"], 1),
        (["q4/g64", "q4/g64", "q4/g64", "q4/g64"], 2),
    ];
    for (encodings, rows) in many {
        let name = format!("matmul_many {} x {rows} rows", encodings.join(","));
        same_on_both!(name, &cpu, &gpu, 1e-5, (encodings, rows), |b, p: ([&str; 4], usize)| {
            let (encs, rows) = p;
            let mut rng = SmallRng::seed_from_u64(14);
            let ws = [(encs[0], 640usize), (encs[1], 256), (encs[2], 7), (encs[3], 25)]
                .iter()
                .map(|&(enc, r)| b.load_matrix(&matrix(&mut rng, r, 512, enc)))
                .collect::<Result<Vec<_>>>()?;
            let x = b.upload(&random(&mut rng, rows * 512, 1.0), rows, 512)?;
            let refs: Vec<_> = ws.iter().collect();
            let mut all = Vec::new();
            for out in b.matmul_many(&x, &refs)? {
                all.extend(b.download(&out)?);
            }
            Ok(all)
        });
    }
    for (encoding, rows) in [("q4/g64", 1usize), ("q5/g64", 1), ("q4/g64", 3)] {
        let name = format!("matmul_add {encoding} x {rows} rows");
        same_on_both!(name, &cpu, &gpu, 1e-5, (encoding, rows), |b, p: (&str, usize)| {
            let (enc, rows) = p;
            let mut rng = SmallRng::seed_from_u64(13);
            let w = b.load_matrix(&matrix(&mut rng, 384, 512, enc))?;
            let x = b.upload(&random(&mut rng, rows * 512, 1.0), rows, 512)?;
            let mut out = b.upload(&random(&mut rng, rows * 384, 1.0), rows, 384)?;
            b.matmul_add(&x, &w, &mut out)?;
            b.download(&out)
        });
    }
    same_on_both!("embed q4/g64", &cpu, &gpu, 1e-6, (), |b, _p: ()| {
        let mut rng = SmallRng::seed_from_u64(2);
        let w = b.load_matrix(&matrix(&mut rng, 300, 128, "q4/g64"))?;
        b.download(&b.embed(&w, &[0, 299, 17, 17])?)
    });
    same_on_both!("rms_norm per head", &cpu, &gpu, 1e-5, (), |b, _p: ()| {
        let mut rng = SmallRng::seed_from_u64(3);
        let x = b.upload(&random(&mut rng, 3 * 512, 2.0), 3, 512)?;
        let w = b.upload(&random(&mut rng, 128, 1.0), 1, 128)?;
        b.download(&b.rms_norm(&x, &w, 1e-6)?)
    });
    same_on_both!("gated_rms_norm", &cpu, &gpu, 1e-5, (), |b, _p: ()| {
        let mut rng = SmallRng::seed_from_u64(4);
        let x = b.upload(&random(&mut rng, 3 * 256, 2.0), 3, 256)?;
        let z = b.upload(&random(&mut rng, 3 * 256, 2.0), 3, 256)?;
        let w = b.upload(&random(&mut rng, 64, 1.0), 1, 64)?;
        b.download(&b.gated_rms_norm(&x, &z, &w, 1e-6)?)
    });
    same_on_both!("silu_mul, mul_sigmoid, add", &cpu, &gpu, 1e-6, (), |b, _p: ()| {
        let mut rng = SmallRng::seed_from_u64(5);
        let g = b.upload(&random(&mut rng, 4 * 64, 3.0), 4, 64)?;
        let u = b.upload(&random(&mut rng, 4 * 64, 3.0), 4, 64)?;
        let mut y = b.silu_mul(&g, &u)?;
        b.mul_sigmoid(&mut y, &g)?;
        let row_gate = b.upload(&random(&mut rng, 4, 3.0), 4, 1)?;
        b.mul_sigmoid(&mut y, &row_gate)?;
        b.add_assign(&mut y, &u)?;
        b.download(&y)
    });
    same_on_both!(
        "split_query_gate + rope at position 37",
        &cpu,
        &gpu,
        1e-5,
        (),
        |b, _p: ()| {
            let mut rng = SmallRng::seed_from_u64(6);
            let qg = b.upload(&random(&mut rng, 3 * 4 * 2 * 64, 1.0), 3, 4 * 2 * 64)?;
            let (mut q, gate) = b.split_query_gate(&qg, 4, 64)?;
            b.rope(&mut q, 64, 16, 1e7, 37)?;
            Ok([b.download(&q)?, b.download(&gate)?].concat())
        }
    );
    // The attention inputs in one launch: head dims that load as float4s and one that does
    // not, partial and full rotation, one row and three after five cached.
    for (heads, kv_heads, d, rot, rows) in [
        (8usize, 2usize, 64usize, 16usize, 1usize),
        (4, 2, 30, 30, 3),
        (16, 1, 256, 64, 1),
    ] {
        let name = format!("attention inputs {heads}:{kv_heads} heads of {d}, rotary {rot}, {rows} rows");
        let args = (heads, kv_heads, d, rot, rows);
        same_on_both!(name, &cpu, &gpu, 1e-5, args, |b, p: HeadArgs| attention_inputs(
            b, p, false
        ));
        let fused = attention_inputs(&gpu, args, false).unwrap();
        let unfused = attention_inputs(&gpu, args, true).unwrap();
        assert!(fused == unfused, "{name}: the fused launch changed a bit");
    }
    same_on_both!(
        "attention GQA 8:2, 3 queries after 40 cached",
        &cpu,
        &gpu,
        1e-5,
        (),
        |b, _p: ()| {
            let mut rng = SmallRng::seed_from_u64(7);
            let shape = AttentionShape {
                num_heads: 8,
                num_kv_heads: 2,
                head_dim: 64,
            };
            let mut keys = b.zeros(0, 128)?;
            let mut values = b.zeros(0, 128)?;
            b.append_rows(&mut keys, &b.upload(&random(&mut rng, 40 * 128, 1.0), 40, 128)?)?;
            b.append_rows(&mut values, &b.upload(&random(&mut rng, 40 * 128, 1.0), 40, 128)?)?;
            b.append_rows(&mut keys, &b.upload(&random(&mut rng, 3 * 128, 1.0), 3, 128)?)?;
            b.append_rows(&mut values, &b.upload(&random(&mut rng, 3 * 128, 1.0), 3, 128)?)?;
            let q = b.upload(&random(&mut rng, 3 * 512, 1.0), 3, 512)?;
            b.download(&b.attention(&q, &keys, &values, shape, 40)?)
        }
    );
    // Decode attention split over the keys (under 16 queries), on the tensor cores and, with
    // them off, in FP32: Qwen3.5-397B's and Qwen3-Next's groups over many chunks, smaller
    // heads with chunks that end mid-tile, one query head per KV head (a group padded from 1
    // to 16 on the tensor cores), and (FP32 only) a group of 32, a group padded to
    // the kernel's (3 heads per KV head), a head dim that does not load as float4s, and one
    // with fewer value items than threads. Prompt attention on the tensor cores: the same two
    // groups after a cache (a chunk of a long prompt), a group of 3 with rows that end
    // mid-block, and a head dim the kernels do not take (the SGEMM path).
    let fp32 = CudaBackend::new(0, Some(0)).unwrap().flash_attention(false);
    for (heads, kv_heads, d, cached, queries) in [
        (32, 2, 256, 5000, 1),
        (16, 2, 256, 700, 3),
        (8, 2, 64, 130, 1),
        (16, 1, 128, 77, 5),
        (32, 1, 64, 300, 1),
        (4, 4, 64, 300, 1),
        (2, 2, 128, 40, 15),
        (6, 2, 30, 100, 2),
        (4, 1, 16, 2100, 1),
        (32, 2, 256, 1200, 70),
        (16, 2, 256, 0, 300),
        (6, 2, 32, 500, 37),
        (8, 2, 128, 33, 100),
        (4, 2, 48, 10, 40),
    ] {
        let name = format!("attention {heads}:{kv_heads} heads of {d}, {queries} queries after {cached}");
        let args = (
            AttentionShape {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: d,
            },
            cached,
            queries,
        );
        same_on_both!(name, &cpu, &gpu, 1e-5, args, |b, p: (AttentionShape, usize, usize)| {
            attention_after(b, p.0, p.1, p.2)
        });
        if queries < 16 {
            let name = format!("{name}, FP32");
            same_on_both!(name, &cpu, &fp32, 1e-5, args, |b, p: (AttentionShape, usize, usize)| {
                attention_after(b, p.0, p.1, p.2)
            });
        }
    }
    drop(fp32);
    same_on_both!(
        "attention GQA 8:2, 3000 queries (two launches of scores)",
        &cpu,
        &gpu,
        1e-5,
        (),
        |b, _p: ()| {
            let mut rng = SmallRng::seed_from_u64(11);
            let shape = AttentionShape {
                num_heads: 8,
                num_kv_heads: 2,
                head_dim: 64,
            };
            let t = 3000;
            let keys = b.upload(&random(&mut rng, t * 128, 1.0), t, 128)?;
            let values = b.upload(&random(&mut rng, t * 128, 1.0), t, 128)?;
            let q = b.upload(&random(&mut rng, t * 512, 1.0), t, 512)?;
            b.download(&b.attention(&q, &keys, &values, shape, 0)?)
        }
    );
    for (dk, dv, nk, nv, tokens) in [
        (16, 16, 2, 4, 7),
        (128, 128, 2, 4, 1),
        (128, 128, 1, 2, 6),
        (32, 24, 2, 2, 3),
        // Prompts both backends run in chunks (two full ones and a partial one; one and a
        // partial block of value columns) and whose conv splits its rows among threads.
        (128, 128, 2, 4, 75),
        (32, 40, 2, 4, 40),
    ] {
        let name = format!("conv1d + delta rule dk {dk} dv {dv} heads {nk}/{nv} x {tokens}");
        let args = (dk, dv, nk, nv, tokens);
        same_on_both!(name, &cpu, &gpu, 1e-4, args, |b, p: DeltaArgs| conv_and_delta_rule(
            b, p
        ));
    }
    // Tokens, experts, k: slices of 64 experts in every warp, one part-filled slice, the
    // most a token takes; logits rounded to quarters, so that many probabilities tie (the
    // lower expert wins on both).
    for (tokens, experts, k, ties) in [
        (5, 512, 10, false),
        (3, 100, 32, false),
        (4, 64, 4, true),
        (2, 700, 8, true),
    ] {
        same_on_both!(
            &format!("route_top_k {tokens} tokens x {experts} experts, k {k}, ties {ties}"),
            &cpu,
            &gpu,
            1e-6,
            (tokens, experts, k, ties),
            |b, p: (usize, usize, usize, bool)| {
                let (tokens, experts, k, ties) = p;
                let mut rng = SmallRng::seed_from_u64(9);
                let mut logits = random(&mut rng, tokens * experts, 4.0);
                if ties {
                    logits.iter_mut().for_each(|v| *v = (*v * 4.0).round() / 4.0);
                }
                let logits = b.upload(&logits, tokens, experts)?;
                let mut out = Vec::new();
                for renorm in [true, false] {
                    for route in b.route_top_k(&logits, k, renorm)? {
                        for (e, w) in route {
                            out.push(e as f32);
                            out.push(w);
                        }
                    }
                }
                Ok(out)
            }
        );
    }
    same_on_both!("gather_rows + scatter_add_rows", &cpu, &gpu, 1e-6, (), |b, _p: ()| {
        let mut rng = SmallRng::seed_from_u64(10);
        let x = b.upload(&random(&mut rng, 6 * 32, 1.0), 6, 32)?;
        let g = b.gather_rows(&x, &[5, 0, 3])?;
        let mut out = b.zeros(6, 32)?;
        b.scatter_add_rows(&mut out, &g, &[1, 2, 4], &[0.5, -1.0, 2.0])?;
        b.scatter_add_rows(&mut out, &g, &[0, 1, 5], &[1.0, 1.0, 1.0])?;
        b.download(&out)
    });
}

/// GPUs with less shared memory per block than this one, or without tensor cores, as the
/// backend emulates them: name, shared memory per block, tensor cores.
const SMALLER_GPUS: [(&str, usize, bool); 3] = [
    ("Ada, most of Ampere (99 KiB)", 99 << 10, true),
    ("A100 (163 KiB)", 163 << 10, true),
    ("Turing (64 KiB, no tensor cores)", 64 << 10, false),
];

/// The paths a smaller GPU takes where kernels do not fit or cannot run there (the FP32
/// decode attention, the SGEMM prompt attention, the sequential delta rule, the prompt
/// products without tensor cores), taken on this GPU: the operations they replace, then
/// every fixture, prefilled and decoded, with and without every expert in VRAM.
#[test]
fn smaller_gpus_paths_match_the_cpu() {
    if gpu(Some(0)).is_none() {
        return;
    }
    let cpu = CpuBackend::new();
    for (gpu_name, shared, tensor_cores) in SMALLER_GPUS {
        let small = || gpu(None).unwrap().emulate_smaller_gpu(shared, tensor_cores);
        let b = small();
        for (heads, kv_heads, d, cached, queries) in [
            (32, 2, 256, 5000, 1),
            (16, 2, 128, 700, 3),
            (8, 2, 64, 130, 1),
            (32, 2, 256, 1200, 70),
            (8, 2, 128, 33, 100),
        ] {
            let name = format!("{gpu_name}: attention {heads}:{kv_heads} heads of {d}, {queries} after {cached}");
            let shape = AttentionShape {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: d,
            };
            same_on_both!(name, &cpu, &b, 1e-5, (shape, cached, queries), |b,
                                                                           p: (
                AttentionShape,
                usize,
                usize
            )| {
                attention_after(b, p.0, p.1, p.2)
            });
        }
        let name = format!("{gpu_name}: conv1d + delta rule dk 128 x 75");
        same_on_both!(name, &cpu, &b, 1e-4, (128, 128, 2, 4, 75), |b, p: DeltaArgs| {
            conv_and_delta_rule(b, p)
        });
        for encoding in ["q4/g64", "q2/g64"] {
            let name = format!("{gpu_name}: matmul {encoding} [4000x512] x 260 tokens");
            same_on_both!(name, &cpu, &b, 1e-4, encoding, |b, enc: &str| {
                let mut rng = SmallRng::seed_from_u64(3);
                let w = b.load_matrix(&matrix(&mut rng, 4000, 512, enc))?;
                let x = b.upload(&random(&mut rng, 260 * 512, 4.0), 260, 512)?;
                b.download(&b.matmul(&x, &w)?)
            });
        }
        drop(b);
        for dir in fixture_dirs() {
            let (ids, prefill) = reference_ids(&dir);
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let (want, _) = fixture_logits(CpuBackend::new(), &dir, &ids, prefill, false)
                .unwrap_or_else(|e| panic!("{name} on the CPU: {e}"));
            for prefetch in [false, true] {
                let (got, _) = fixture_logits(small(), &dir, &ids, prefill, prefetch)
                    .unwrap_or_else(|e| panic!("{name} on CUDA as {gpu_name}: {e}"));
                let err = relative_l2(&got, &want);
                let same_argmax = same_argmax_everywhere(&got, &want, ids.len());
                eprintln!(
                    "{gpu_name}: {name:<28} prefill {prefill:>2}, every expert in VRAM {prefetch}: relative L2 \
                     {err:.2e}, argmax {}",
                    if same_argmax { "identical" } else { "DIFFERS" }
                );
                assert!(err < 1e-3 && same_argmax, "{gpu_name}: {name}: CUDA vs CPU {err:.3e}");
            }
        }
    }
}

/// Greedy decoding's choice made on the device: the same index as the host's argmax over the
/// last row, on ties (the first wins), NaNs, zeros of both signs, infinities and a row of the
/// vocabulary's size.
#[test]
fn the_device_argmax_is_the_hosts() {
    let Some(gpu) = gpu(Some(0)) else { return };
    let cpu = CpuBackend::new();
    let mut rng = SmallRng::seed_from_u64(21);
    let mut vocab = random(&mut rng, 248_320, 8.0);
    vocab[200_001] = 9.5;
    vocab[7_777] = 9.5;
    vocab[3] = f32::NAN;
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let rows: Vec<(usize, Vec<f32>)> = vec![
        (1, vocab.clone()),
        (2, [random(&mut rng, 1000, 1.0), vec![0.5; 1000]].concat()),
        (1, vec![-1.0, -0.0, 0.0, -2.0]),
        (1, vec![-3.0, 0.0, -0.0]),
        (1, vec![nan, 1.0, nan, 1.0, inf, -inf]),
        (1, vec![-inf; 5]),
        (1, vec![nan; 70]),
        (3, (0..3 * 4099).map(|i| ((i * 7919) % 4093) as f32).collect()),
    ];
    for (n, data) in rows {
        let cols = data.len() / n;
        let want = cpu.argmax_last_row(&cpu.upload(&data, n, cols).unwrap()).unwrap();
        let got = gpu.argmax_last_row(&gpu.upload(&data, n, cols).unwrap()).unwrap();
        eprintln!("argmax of the last of {n} rows of {cols}: {got}");
        assert_eq!(got, want, "argmax of the last of {n} rows of {cols}");
    }
}

/// A temperature draw from logits on the device (among the candidates that come back: each
/// block's top k, or the logits near the largest) is the draw the sampler makes from the
/// downloaded logits: the same tokens for the same seeds, with top-k, top-p and min-p, ties
/// at the top-k cut, penalties, and rows with too many candidates (downloaded) or none (every
/// NaN).
#[test]
fn the_device_draws_the_hosts_tokens() {
    use flash_moe_engine::engine::sampler::{Sampler, SamplingParams};
    let Some(gpu) = gpu(Some(0)) else { return };
    let cpu = CpuBackend::new();
    let mut rng = SmallRng::seed_from_u64(22);
    // Peaked: about 500 logits within reach of the largest (30 temperatures), the rest far
    // below, as a trained model's usually are.
    let peaked: Vec<f32> = (0..248_320)
        .map(|_| match rng.random_range(0.0..1.0) < 0.002 {
            true => rng.random_range(0.0..10.0),
            false => rng.random_range(-40.0..-20.0),
        })
        .collect();
    // Every logit a candidate (3000 of at most 4096), 20 of them tied for the top.
    let mut ties = random(&mut rng, 3000, 1.0);
    for i in (100..3000).step_by(145) {
        ties[i] = 1.5;
    }
    let flat = random(&mut rng, 100_000, 1.0);
    let params = [(0.7, 20, 0.95, 0.0), (1.0, 0, 1.0, 0.05), (0.6, 7, 0.8, 0.0)];
    for (name, row) in [
        ("peaked", peaked),
        ("ties", ties),
        ("flat", flat),
        ("NaN", vec![f32::NAN; 64]),
    ] {
        let on_cpu = cpu.upload(&row, 1, row.len()).unwrap();
        let on_gpu = gpu.upload(&row, 1, row.len()).unwrap();
        // The candidates themselves, where they come back: those the host's filter keeps.
        let span = 30.0 * 0.7;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let near: Vec<(u32, f32)> = (0..row.len() as u32)
            .filter(|&i| row[i as usize] >= max - span)
            .map(|i| (i, row[i as usize]))
            .collect();
        let found = gpu.draw_candidates(&on_gpu, span, 0).unwrap().map(|mut c| {
            c.sort_unstable_by_key(|&(i, _)| i);
            c
        });
        eprintln!(
            "{name} row: {} candidates, {}",
            near.len(),
            if found.is_some() {
                "found on the device"
            } else {
                "downloaded"
            }
        );
        match name {
            "peaked" | "ties" => assert_eq!(found, Some(near.clone()), "candidates of the {name} row"),
            _ => assert_eq!(found, None, "candidates of the {name} row"),
        }
        // With top-k: candidates the host's filter keeps, the top k among them.
        let mut ranked = near.clone();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for k in [1, 7, 20, 64] {
            let got = gpu.draw_candidates(&on_gpu, span, k).unwrap().unwrap_or_default();
            let kept = |&(i, l): &(u32, f32)| row[i as usize].to_bits() == l.to_bits() && l >= max - span;
            assert!(
                got.iter().all(kept),
                "top {k} of the {name} row: not a logit above the cut"
            );
            let indices: std::collections::HashSet<u32> = got.iter().map(|c| c.0).collect();
            let top = &ranked[..k.min(ranked.len())];
            assert!(
                top.iter().all(|c| indices.contains(&c.0)),
                "top {k} of the {name} row: missing some of the top"
            );
        }
        // 32 draws on each side from the same settings, seed and prompt.
        let same_draws = |p: SamplingParams, prompt: &[u32], label: String| {
            let (mut a, mut b) = (Sampler::new(p.clone()), Sampler::new(p));
            a.set_prompt(prompt);
            b.set_prompt(prompt);
            let want: Vec<u32> = (0..32).map(|_| a.sample_on(&cpu, &on_cpu).unwrap()).collect();
            let got: Vec<u32> = (0..32).map(|_| b.sample_on(&gpu, &on_gpu).unwrap()).collect();
            eprintln!("draws from the {label}: {:?}", &got[..8]);
            assert_eq!(got, want, "draws from the {label}");
        };
        for (seed, &(temperature, top_k, top_p, min_p)) in params.iter().enumerate() {
            let p = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                seed: seed as u64,
                ..Default::default()
            };
            same_draws(p, &[], format!("{name} row, T {temperature} top-k {top_k}"));
        }
        // Penalties (applied on the device to a copy), greedy and drawn, with a prompt of the
        // best candidates so that the repetition penalty touches tokens that matter.
        let prompt: Vec<u32> = ranked.iter().take(8).map(|c| c.0).collect();
        let penalties = [(0.5, 0.3, 1.0), (0.0, 0.0, 1.3), (1.5, 0.0, 1.1)];
        for (seed, &(presence_penalty, frequency_penalty, repetition_penalty)) in penalties.iter().enumerate() {
            for (temperature, top_k) in [(0.0, 0), (0.7, 20)] {
                let p = SamplingParams {
                    temperature,
                    top_k,
                    presence_penalty,
                    frequency_penalty,
                    repetition_penalty,
                    seed: seed as u64,
                    ..Default::default()
                };
                let label = format!(
                    "{name} row, T {temperature} top-k {top_k}, penalties {presence_penalty}/{frequency_penalty}/{repetition_penalty}"
                );
                same_draws(p, &prompt, label);
            }
        }
    }
}

/// The logits of every position, and the backend's expert cache counters; `prefetch` puts
/// every expert in the backend's cache first (on a GPU with room for them all, one-token
/// steps are then routed on the device).
/// Query heads, KV heads, head dim, rotary dims, rows.
type HeadArgs = (usize, usize, usize, usize, usize);

/// Attention of `queries` new rows after `cached` rows of random keys and values (scaled so
/// that the softmax is neither flat nor one-hot).
fn attention_after<B: Backend>(b: &B, shape: AttentionShape, cached: usize, queries: usize) -> Result<Vec<f32>> {
    let mut rng = SmallRng::seed_from_u64((shape.num_heads * 1000 + cached) as u64);
    let (width, kv_width) = (shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim);
    let rows = cached + queries;
    let keys = b.upload(&random(&mut rng, rows * kv_width, 1.0), rows, kv_width)?;
    let values = b.upload(&random(&mut rng, rows * kv_width, 1.0), rows, kv_width)?;
    let q = b.upload(&random(&mut rng, queries * width, 3.0), queries, width)?;
    b.download(&b.attention(&q, &keys, &values, shape, cached)?)
}

/// Key head dim, value head dim, key heads, value heads, prompt tokens.
type DeltaArgs = (usize, usize, usize, usize, usize);

/// The conv and the delta rule over a prompt of random inputs, then over one more token: both
/// outputs, then the conv and recurrent states.
fn conv_and_delta_rule<B: Backend>(b: &B, p: DeltaArgs) -> Result<Vec<f32>> {
    let (dk, dv, nk, nv, tokens) = p;
    let dims = LinearAttentionConfig {
        num_key_heads: nk,
        num_value_heads: nv,
        key_head_dim: dk,
        value_head_dim: dv,
        conv_kernel: 4,
    };
    let c = dims.conv_dim();
    let mut rng = SmallRng::seed_from_u64(8);
    let w = b.upload(&random(&mut rng, c * 4, 0.5), c, 4)?;
    let mut conv = b.upload(&random(&mut rng, 3 * c, 1.0), 3, c)?;
    let mut state = b.upload(&random(&mut rng, nv * dk * dv, 0.1), nv, dk * dv)?;
    let a_log = b.upload(&random(&mut rng, nv, 1.0), 1, nv)?;
    let dt = b.upload(&random(&mut rng, nv, 1.0), 1, nv)?;
    let mut outs = Vec::new();
    for step in [tokens, 1] {
        let x = b.upload(&random(&mut rng, step * c, 1.0), step, c)?;
        let a = b.upload(&random(&mut rng, step * nv, 2.0), step, nv)?;
        let beta = b.upload(&random(&mut rng, step * nv, 2.0), step, nv)?;
        let qkv = b.causal_conv1d_silu(&x, &w, &mut conv)?;
        outs.push(b.download(&b.gated_delta_rule(&qkv, &a, &beta, &a_log, &dt, &mut state, &dims)?)?);
    }
    outs.push(b.download(&conv)?);
    outs.push(b.download(&state)?);
    Ok(outs.concat())
}

/// `Backend::attention_inputs` (or its unfused composition) on random projections with five
/// rows already cached: the queries, gates, keys and values, one after another.
fn attention_inputs<B: Backend>(b: &B, p: HeadArgs, unfused: bool) -> Result<Vec<f32>> {
    let (heads, kv_heads, d, rotary_dim, rows) = p;
    let mut rng = SmallRng::seed_from_u64(5);
    let kv = kv_heads * d;
    let query_gate = b.upload(&random(&mut rng, rows * heads * 2 * d, 1.0), rows, heads * 2 * d)?;
    let k = b.upload(&random(&mut rng, rows * kv, 1.0), rows, kv)?;
    let v = b.upload(&random(&mut rng, rows * kv, 1.0), rows, kv)?;
    let q_norm = b.upload(&random(&mut rng, d, 1.0), 1, d)?;
    let k_norm = b.upload(&random(&mut rng, d, 1.0), 1, d)?;
    let mut keys = b.upload(&random(&mut rng, 5 * kv, 1.0), 5, kv)?;
    let mut values = b.upload(&random(&mut rng, 5 * kv, 1.0), 5, kv)?;
    let prep = HeadPrep {
        shape: AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
        },
        q_norm: &q_norm,
        k_norm: &k_norm,
        eps: 1e-6,
        rotary_dim,
        rope_theta: 1e7,
    };
    let (q, gate) = if unfused {
        attention_inputs_unfused(b, &query_gate, &k, &v, &prep, 5, &mut keys, &mut values)?
    } else {
        b.attention_inputs(&query_gate, &k, &v, &prep, 5, &mut keys, &mut values)?
    };
    Ok([
        b.download(&q)?,
        b.download(&gate)?,
        b.download(&keys)?,
        b.download(&values)?,
    ]
    .concat())
}

fn fixture_logits<B: Backend>(
    backend: B,
    model: &std::path::Path,
    ids: &[u32],
    prefill: usize,
    prefetch: bool,
) -> Result<(Vec<f32>, Option<ExpertCacheStats>)> {
    fixture_logits_sharing(backend, model, ids, prefill, prefetch, 0.0)
}

/// [`fixture_logits`] with `cpu_share` of the missed experts computed by the host CPU.
fn fixture_logits_sharing<B: Backend>(
    backend: B,
    model: &std::path::Path,
    ids: &[u32],
    prefill: usize,
    prefetch: bool,
    cpu_share: f32,
) -> Result<(Vec<f32>, Option<ExpertCacheStats>)> {
    let store = ExpertStore::new(StoreConfig {
        io: ExpertIo::Read(flash_moe_engine::storage::io::IoMode::PageCache),
        ..StoreConfig::default()
    });
    let mut model = load_model(model, backend, Arc::clone(&store))?;
    model.set_cpu_expert_share(CpuShare::Fixed(cpu_share))?;
    if prefetch {
        model.prefetch_experts()?;
    }
    let b = model.backend();
    let mut state = model.new_state()?;
    let mut out = b.download(&model.forward(&ids[..prefill], &mut state, Logits::All)?)?;
    for &id in &ids[prefill..] {
        out.extend(b.download(&model.forward(&[id], &mut state, Logits::All)?)?);
    }
    Ok((out, b.expert_cache_stats()))
}

/// The fixture models' directories (those with a reference), in order.
fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("reference.json").exists())
        .collect();
    dirs.sort();
    dirs
}

/// A fixture's token ids and the prompt length of its prefill-then-decode reference.
fn reference_ids(dir: &std::path::Path) -> (Vec<u32>, usize) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let ids = meta["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    (ids, meta["prefill"].as_u64().unwrap() as usize)
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

/// Whether the logits of each of `positions` positions in `got` and `want` (as many rows)
/// have the same argmax.
fn same_argmax_everywhere(got: &[f32], want: &[f32], positions: usize) -> bool {
    let vocab = want.len() / positions;
    got.chunks(vocab)
        .zip(want.chunks(vocab))
        .all(|(a, b)| argmax(a) == argmax(b))
}

#[test]
fn every_fixture_model_matches_the_cpu() {
    if gpu(Some(0)).is_none() {
        return;
    }
    let mut checked = 0;
    let mut routed_models = 0;
    for dir in fixture_dirs() {
        let (ids, prefill) = reference_ids(&dir);
        for prefill in [ids.len(), prefill] {
            let name = dir.display();
            let (cpu, _) = fixture_logits(CpuBackend::new(), &dir, &ids, prefill, false)
                .unwrap_or_else(|e| panic!("{name} prefill {prefill} on the CPU: {e}"));
            // Without a VRAM cache, with one, and with every expert in it (routing on the
            // device): neither may change a bit.
            let (gpu_plain, _) = fixture_logits(gpu(Some(0)).unwrap(), &dir, &ids, prefill, false)
                .unwrap_or_else(|e| panic!("{name} prefill {prefill} on CUDA without a VRAM cache: {e}"));
            let (gpu_cached, _) = fixture_logits(gpu(None).unwrap(), &dir, &ids, prefill, false)
                .unwrap_or_else(|e| panic!("{name} prefill {prefill} on CUDA with a VRAM cache: {e}"));
            assert!(
                gpu_plain == gpu_cached,
                "{}: the VRAM expert cache changed the logits",
                dir.display()
            );
            let unrecorded = gpu(None).unwrap().record_steps(false);
            let (gpu_routed, stats) = fixture_logits(unrecorded, &dir, &ids, prefill, true)
                .unwrap_or_else(|e| panic!("{name} prefill {prefill} on CUDA routing on the device: {e}"));
            assert!(
                gpu_plain == gpu_routed,
                "{}: routing on the device changed the logits",
                dir.display()
            );
            // The same with layer steps recorded as CUDA graphs and replayed.
            let (gpu_replayed, replay_stats) = fixture_logits(gpu(None).unwrap(), &dir, &ids, prefill, true)
                .unwrap_or_else(|e| panic!("{name} prefill {prefill} on CUDA replaying graphs: {e}"));
            assert!(
                gpu_plain == gpu_replayed,
                "{}: replaying recorded layer steps changed the logits",
                dir.display()
            );
            // A VRAM cache for 15/16 of the experts: layers go in and out of being routed on
            // the device as experts are evicted, so recordings are made, go stale and are made
            // again (on the 4-bit fixtures, 39 and 21 replays among 84 and 91 device-routed
            // steps when this was written). None of it may change a bit.
            let resident = replay_stats.map_or(0, |s| s.resident_bytes);
            let small = gpu(Some(resident - resident / 16)).unwrap();
            let (gpu_churn, churn_stats) = fixture_logits(small, &dir, &ids, prefill, true)
                .unwrap_or_else(|e| panic!("{name} prefill {prefill} on CUDA with a small VRAM cache: {e}"));
            assert!(
                gpu_plain == gpu_churn,
                "{}: evictions from a VRAM cache too small for every expert changed the logits",
                dir.display()
            );
            // The 4-bit fixtures' experts all suit the batched kernels: their decode steps
            // must have been routed on the device and replayed, or the comparisons above
            // tested nothing.
            let routed = stats.map_or(0, |s| s.device_routed);
            let replayed = replay_stats.map_or(0, |s| s.replayed_steps);
            let name_str = dir.file_name().unwrap().to_string_lossy();
            if name_str.ends_with("-4bit") || name_str.ends_with("-4bit-f16") {
                let decode_steps = ids.len() - prefill;
                assert!(
                    decode_steps == 0 || routed > 0,
                    "{name_str}: no layer step was routed on the device"
                );
                assert!(
                    decode_steps == 0 || replayed > 0,
                    "{name_str}: no layer step was replayed from a CUDA graph"
                );
                // Full-attention layers' MoE blocks are replayed too: more replays than the
                // linear-attention layers alone could make.
                let config = ModelConfig::from_dir(&dir).unwrap();
                let linear = config
                    .layers
                    .iter()
                    .filter(|&&k| k == LayerKind::LinearAttention)
                    .count();
                let attention = config.layers.len() - linear;
                assert!(
                    decode_steps == 0 || attention == 0 || replayed as usize > linear * decode_steps,
                    "{name_str}: {replayed} replays in {decode_steps} tokens: the full-attention layers' MoE \
                     blocks were not replayed"
                );
                routed_models += usize::from(routed > 0);
                eprintln!(
                    "{name_str:<28} prefill {prefill:>2}: {routed} layer steps routed on the GPU, {replayed} replayed"
                );
                let churn = churn_stats.unwrap_or_default();
                eprintln!(
                    "{name_str:<28} prefill {prefill:>2}, VRAM cache for 15/16 of the experts: {} hits, {} misses, \
                     {} layer steps routed on the GPU, {} replayed",
                    churn.hits, churn.misses, churn.device_routed, churn.replayed_steps
                );
                assert!(
                    decode_steps == 0 || churn.replayed_steps > 0,
                    "{name_str}: no layer step was replayed with a VRAM cache too small for every expert"
                );
            }
            // Half of the missed experts computed on the host CPU beside the GPU: only the
            // order of the sum changes.
            let (gpu_shared, shared_stats) =
                fixture_logits_sharing(gpu(Some(0)).unwrap(), &dir, &ids, prefill, false, 0.5)
                    .unwrap_or_else(|e| panic!("{name} prefill {prefill} on CUDA with CPU experts: {e}"));
            let uploaded = shared_stats.map_or(0, |s| s.uploaded_bytes);
            let (_, plain_stats) = fixture_logits(gpu(Some(0)).unwrap(), &dir, &ids, prefill, false).unwrap();
            assert!(
                ids.len() == prefill || uploaded < plain_stats.map_or(0, |s| s.uploaded_bytes),
                "{name}: with half of the missed experts on the CPU, as many bytes went to the GPU"
            );
            for (what, logits) in [("CUDA", &gpu_plain), ("CUDA with CPU experts", &gpu_shared)] {
                let err = relative_l2(logits, &cpu);
                let same_argmax = same_argmax_everywhere(logits, &cpu, ids.len());
                eprintln!(
                    "{:<28} prefill {prefill:>2}: {what} vs CPU relative L2 {err:.2e}, argmax {}",
                    dir.file_name().unwrap().to_string_lossy(),
                    if same_argmax { "identical" } else { "DIFFERS" }
                );
                assert!(err < 1e-3 && same_argmax, "{}: {what} vs CPU {err:.3e}", dir.display());
            }
            checked += 1;
        }
    }
    assert!(
        routed_models >= 2,
        "routing on the device ran for {routed_models} fixture runs"
    );
    assert!(
        checked >= 12,
        "only {checked} fixture runs found in {}",
        fixtures().display()
    );
}

/// Generated tokens' and prompt tokens' log-probabilities of a greedy generation on `backend`.
fn session_logprobs<B: Backend>(backend: B, dir: &std::path::Path, prompt: &[u32], scored: bool) -> Vec<TokenLogprob> {
    struct Recorder(Vec<TokenLogprob>);
    impl TextSink for Recorder {
        fn text(&mut self, _piece: &str) -> bool {
            true
        }
        fn logprob(&mut self, logprob: TokenLogprob) -> bool {
            self.0.push(logprob);
            true
        }
    }
    let store = ExpertStore::new(StoreConfig::default());
    let model = load_model(dir, backend, store).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let tokenizer = Tokenizer::from_dir(dir, &model.config.eos_token_ids).expect("tokenizer loads");
    let request = GenerationRequest {
        prompt: prompt.to_vec(),
        checkpoints: Vec::new(),
        max_tokens: 6,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop: Vec::new(),
        logprobs: Some(5),
        prompt_logprobs: scored.then_some(5),
    };
    let mut sink = Recorder(Vec::new());
    Session::new(4096, 0)
        .generate(&model, &tokenizer, &request, &mut sink)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    sink.0
}

#[test]
fn logprobs_match_the_cpu() {
    let Some(gpu) = gpu(None) else {
        return;
    };
    let dir = fixtures().join("mlx-qwen35-4bit");
    let (ids, prefill) = reference_ids(&dir);
    let prompt = &ids[..prefill];
    let cpu = session_logprobs(CpuBackend::new(), &dir, prompt, true);
    let cuda = session_logprobs(gpu, &dir, prompt, true);
    assert_eq!(cpu.len(), cuda.len(), "as many entries");
    assert!(cpu.len() > prompt.len(), "the prompt's and some generated tokens'");
    for (i, (c, g)) in cpu.iter().zip(&cuda).enumerate() {
        assert_eq!(c.token, g.token, "entry {i}: the same token");
        assert!(
            (c.logprob - g.logprob).abs() < 1e-3,
            "entry {i}: {} against {}",
            g.logprob,
            c.logprob
        );
        assert_eq!(c.top.len(), g.top.len(), "entry {i}");
        for ((ci, cl), (gi, gl)) in c.top.iter().zip(&g.top) {
            assert!(
                (cl - gl).abs() < 1e-3,
                "entry {i}: alternative {gi} at {gl} against {ci} at {cl}"
            );
        }
    }
    eprintln!("cuda_parity: logprobs of {} tokens within 1e-3 of the CPU's", cpu.len());
}
