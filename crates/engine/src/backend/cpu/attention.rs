//! Gated full attention: query/gate split, rotate-half RoPE, causal GQA softmax attention.

use std::ops::Range;

use rayon::prelude::*;

use super::CpuTensor;
use super::gemm::{Strided, sgemm};
use crate::backend::AttentionShape;

/// Splits rows whose heads hold `[query (head_dim) | gate (head_dim)]` into two tensors.
pub fn split_query_gate(qg: &CpuTensor, head_dim: usize) -> (CpuTensor, CpuTensor) {
    let width = qg.cols / 2;
    let mut q = Vec::with_capacity(qg.rows * width);
    let mut gate = Vec::with_capacity(qg.rows * width);
    for head in qg.data.chunks_exact(2 * head_dim) {
        q.extend_from_slice(&head[..head_dim]);
        gate.extend_from_slice(&head[head_dim..]);
    }
    (CpuTensor::new(qg.rows, width, q), CpuTensor::new(qg.rows, width, gate))
}

/// The inverse frequencies, computed in f32 as transformers does.
fn inv_freq(rotary_dim: usize, theta: f64) -> Vec<f32> {
    let base = theta as f32;
    (0..rotary_dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / rotary_dim as f32))
        .collect()
}

/// Rotate-half (NeoX) RoPE on the first `rotary_dim` dims of each head; row `t` sits at
/// position `pos0 + t`. Angles are `f32(position) * f32(inv_freq)`, as in the reference.
pub fn rope(x: &mut CpuTensor, head_dim: usize, rotary_dim: usize, theta: f64, pos0: usize) {
    let freqs = inv_freq(rotary_dim, theta);
    let half = rotary_dim / 2;
    let cols = x.cols;
    x.data.par_chunks_mut(cols).enumerate().for_each(|(t, row)| {
        let pos = (pos0 + t) as f32;
        let (cos, sin): (Vec<f32>, Vec<f32>) = freqs
            .iter()
            .map(|&f| {
                let angle = f64::from(pos * f);
                (angle.cos() as f32, angle.sin() as f32)
            })
            .unzip();
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = b * cos[i] + a * sin[i];
            }
        }
    });
}

/// Queries from which attention runs as matrix products (a prompt): per KV head and block of
/// query rows, the scores of the group's heads against the keys by sgemm, the masked
/// softmax, and the weighted values by sgemm, so that each key and value row is read once
/// per block rather than once per query.
const GEMM_MIN_QUERIES: usize = 16;
/// Query rows per block, at most.
const QUERY_BLOCK: usize = 64;
/// Scores one block may hold (floats), which shortens the blocks of long contexts.
const SCORES_PER_BLOCK: usize = 1 << 22;

/// Keys per task when few queries attend (decode): their work splits over chunks of the
/// cache so that every core takes part, and merges per head after.
const KEYS_PER_TASK: usize = 512;
/// (query, KV head) pairs from which each pair is one task over all its keys (a prompt).
const PAIRS_WITHOUT_SPLIT: usize = 64;

/// What one task leaves for each query head of its KV head: the largest score of its keys,
/// the sum of exp(score - largest) over them, and the values weighted by those.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    values: Vec<f32>,
}

/// Causal attention of query rows at positions `pos0..` over cached keys and values. A task
/// takes one query row, one KV head and a range of keys for all the query heads of that KV
/// head, so that each key and value row is read once for them all (not once per head).
pub fn attention(q: &CpuTensor, keys: &CpuTensor, values: &CpuTensor, shape: AttentionShape, pos0: usize) -> CpuTensor {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    if q.rows >= GEMM_MIN_QUERIES {
        return attention_products(q, keys, values, shape, pos0);
    }
    let group = num_heads / num_kv_heads;
    let pairs = q.rows * num_kv_heads;
    let keys_seen = pos0 + q.rows;
    let chunk = if pairs >= PAIRS_WITHOUT_SPLIT {
        keys_seen
    } else {
        KEYS_PER_TASK
    };
    let chunks = keys_seen.div_ceil(chunk.max(1));
    let partials: Vec<Partial> = (0..pairs * chunks)
        .into_par_iter()
        .map(|i| {
            let (t, kv, c) = (i / chunks / num_kv_heads, i / chunks % num_kv_heads, i % chunks);
            let seen = pos0 + t + 1;
            let heads = &q.row(t)[kv * group * head_dim..(kv + 1) * group * head_dim];
            let range = (c * chunk).min(seen)..((c + 1) * chunk).min(seen);
            chunk_attention(heads, keys, values, kv * head_dim..(kv + 1) * head_dim, range)
        })
        .collect();
    let mut out = vec![0.0f32; q.rows * num_heads * head_dim];
    out.par_chunks_mut(head_dim).enumerate().for_each(|(index, o)| {
        let (t, h) = (index / num_heads, index % num_heads);
        let pair = t * num_kv_heads + h / group;
        merge(&partials[pair * chunks..(pair + 1) * chunks], h % group, o);
    });
    CpuTensor::new(q.rows, num_heads * head_dim, out)
}

/// [`attention`] for a prompt, as matrix products per KV head and block of query rows.
fn attention_products(
    q: &CpuTensor,
    keys: &CpuTensor,
    values: &CpuTensor,
    shape: AttentionShape,
    pos0: usize,
) -> CpuTensor {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
    } = shape;
    let group = num_heads / num_kv_heads;
    let block = (SCORES_PER_BLOCK / (group * (pos0 + q.rows)).max(1)).clamp(1, QUERY_BLOCK);
    let blocks = q.rows.div_ceil(block);
    let outputs: Vec<Vec<f32>> = (0..num_kv_heads * blocks)
        .into_par_iter()
        .map(|i| {
            let (kv, first) = (i / blocks, i % blocks * block);
            let rows = block.min(q.rows - first);
            block_attention(q, keys, values, shape, kv, first..first + rows, pos0)
        })
        .collect();
    let mut out = vec![0.0f32; q.rows * num_heads * d];
    for (i, o) in outputs.iter().enumerate() {
        let (kv, first) = (i / blocks, i % blocks * block);
        for (t, heads) in o.chunks_exact(group * d).enumerate() {
            let at = (first + t) * num_heads * d + kv * group * d;
            out[at..at + group * d].copy_from_slice(heads);
        }
    }
    CpuTensor::new(q.rows, num_heads * d, out)
}

/// The outputs of query rows `rows` (at positions `pos0 + row`) for the query heads of KV
/// head `kv`, row by row, each row's heads one after another.
fn block_attention(
    q: &CpuTensor,
    keys: &CpuTensor,
    values: &CpuTensor,
    shape: AttentionShape,
    kv: usize,
    rows: Range<usize>,
    pos0: usize,
) -> Vec<f32> {
    let d = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    // The keys the block's last row sees; earlier rows mask the rest.
    let cap = pos0 + rows.end;
    let first = rows.start;
    let queries: Vec<f32> = rows
        .flat_map(|t| q.row(t)[kv * group * d..(kv + 1) * group * d].iter().copied())
        .collect();
    let m = queries.len() / d;
    let keys_t = head_columns(keys, 0..cap, kv * d..(kv + 1) * d).transposed();
    let mut scores = vec![0.0f32; m * cap];
    let scale = 1.0 / (d as f32).sqrt();
    sgemm(scale, &Strided::of(&queries, m, d, false), &keys_t, &mut scores);
    for (r, row) in scores.chunks_exact_mut(cap).enumerate() {
        let (live, masked) = row.split_at_mut(pos0 + first + r / group + 1);
        masked.fill(0.0);
        let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        live.iter_mut().for_each(|s| *s = (*s - max).exp());
        let total: f32 = live.iter().sum();
        live.iter_mut().for_each(|s| *s /= total);
    }
    let mut out = vec![0.0f32; m * d];
    sgemm(
        1.0,
        &Strided::of(&scores, m, cap, false),
        &head_columns(values, 0..cap, kv * d..(kv + 1) * d),
        &mut out,
    );
    out
}

/// Rows `rows` and columns `cols` of a cache: one KV head's keys or values.
fn head_columns(cache: &CpuTensor, rows: Range<usize>, cols: Range<usize>) -> Strided<'_> {
    Strided {
        data: &cache.data[rows.start * cache.cols + cols.start..],
        rows: rows.len(),
        cols: cols.len(),
        row_stride: cache.cols,
        col_stride: 1,
    }
}

/// The queries `heads` (one after another, each as wide as `cols`) over the keys `range`,
/// columns `cols` of the cache rows.
fn chunk_attention(
    heads: &[f32],
    keys: &CpuTensor,
    values: &CpuTensor,
    cols: Range<usize>,
    range: Range<usize>,
) -> Partial {
    let d = cols.len();
    let (group, n) = (heads.len() / d, range.len());
    let scale = 1.0 / (d as f32).sqrt();
    let mut part = Partial {
        max: vec![f32::NEG_INFINITY; group],
        sum: vec![0.0; group],
        values: vec![0.0; group * d],
    };
    if n == 0 {
        return part;
    }
    let mut scores = vec![0.0f32; group * n];
    let keys_t = head_columns(keys, range.clone(), cols.clone()).transposed();
    sgemm(scale, &Strided::of(heads, group, d, false), &keys_t, &mut scores);
    for (member, s) in scores.chunks_exact_mut(n).enumerate() {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        s.iter_mut().for_each(|x| *x = (*x - max).exp());
        part.max[member] = max;
        part.sum[member] = s.iter().sum();
    }
    sgemm(
        1.0,
        &Strided::of(&scores, group, n, false),
        &head_columns(values, range, cols),
        &mut part.values,
    );
    part
}

/// Query head `member`'s output from its tasks' partial results, rescaled to their common max.
fn merge(parts: &[Partial], member: usize, out: &mut [f32]) {
    let d = out.len();
    let live = || parts.iter().filter(|p| p.sum[member] > 0.0);
    let max = live().map(|p| p.max[member]).fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for p in live() {
        let w = (p.max[member] - max).exp();
        total += w * p.sum[member];
        let values = &p.values[member * d..(member + 1) * d];
        out.iter_mut().zip(values).for_each(|(o, &v)| *o += w * v);
    }
    out.iter_mut().for_each(|o| *o /= total);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let data: Vec<f32> = (0..16).map(|i| i as f32 * 0.1 - 0.5).collect();
        let mut x = CpuTensor::new(2, 16, [data.clone(), data.clone()].concat());
        rope(&mut x, 8, 4, 10000.0, 0);
        assert_eq!(x.row(0), &data[..]);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x.row(1)[..4]) - norm(&data[..4])).abs() < 1e-5);
        assert_eq!(&x.row(1)[4..8], &data[4..8], "dims past rotary_dim pass through");
    }

    #[test]
    fn single_position_attention_returns_the_value() {
        let shape = AttentionShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
        };
        let q = CpuTensor::new(1, 4, vec![1.0, 0.0, 0.0, 1.0]);
        let k = CpuTensor::new(1, 2, vec![0.3, 0.7]);
        let v = CpuTensor::new(1, 2, vec![2.0, -1.0]);
        let o = attention(&q, &k, &v, shape, 0);
        assert_eq!(o.data, vec![2.0, -1.0, 2.0, -1.0]);
    }

    /// Softmax attention written out per (query, head), in f64.
    fn naive(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, shape: AttentionShape, pos0: usize) -> Vec<f64> {
        let (heads, d) = (shape.num_heads, shape.head_dim);
        let group = heads / shape.num_kv_heads;
        let mut out = Vec::new();
        for t in 0..q.rows {
            for h in 0..heads {
                let (query, kv) = (&q.row(t)[h * d..(h + 1) * d], (h / group) * d);
                let scores: Vec<f64> = (0..=pos0 + t)
                    .map(|j| {
                        let key = &k.row(j)[kv..kv + d];
                        query
                            .iter()
                            .zip(key)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                out.extend((0..d).map(|i| {
                    weights
                        .iter()
                        .enumerate()
                        .map(|(j, w)| w * f64::from(v.row(j)[kv + i]))
                        .sum::<f64>()
                        / total
                }));
            }
        }
        out
    }

    #[test]
    fn split_and_whole_attention_match_the_definition() {
        let shape = AttentionShape {
            num_heads: 8,
            num_kv_heads: 2,
            head_dim: 16,
        };
        let mut seed = 1u32;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        // 3 queries after 1100 cached keys: split over chunks of 512, the last ones partial;
        // after 1022, the first query's last chunk is empty. 40 queries after 30, and 150
        // after 20: matrix products, one block of rows, and three blocks (the last partial).
        for (rows, pos0) in [(3, 1100), (3, 1022), (40, 30), (150, 20)] {
            let keys = pos0 + rows;
            let q = CpuTensor::new(rows, 8 * 16, random(rows * 8 * 16).iter().map(|x| 4.0 * x).collect());
            let k = CpuTensor::new(keys, 2 * 16, random(keys * 2 * 16));
            let v = CpuTensor::new(keys, 2 * 16, random(keys * 2 * 16));
            let got = attention(&q, &k, &v, shape, pos0);
            let want = naive(&q, &k, &v, shape, pos0);
            let err: f64 = got
                .data
                .iter()
                .zip(&want)
                .map(|(&g, w)| (f64::from(g) - w).powi(2))
                .sum();
            let norm: f64 = want.iter().map(|w| w * w).sum();
            assert!(
                (err / norm).sqrt() < 1e-6,
                "{rows} queries after {pos0}: relative L2 {}",
                (err / norm).sqrt()
            );
        }
    }
}
