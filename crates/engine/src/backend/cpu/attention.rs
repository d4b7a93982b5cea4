//! Gated full attention: query/gate split, rotate-half RoPE, causal GQA softmax attention.

use rayon::prelude::*;

use super::CpuTensor;
use super::matmul::dot;
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

/// Causal attention of query rows at positions `pos0..` over cached keys and values.
pub fn attention(q: &CpuTensor, keys: &CpuTensor, values: &CpuTensor, shape: AttentionShape, pos0: usize) -> CpuTensor {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0.0f32; q.rows * num_heads * head_dim];
    out.par_chunks_mut(head_dim).enumerate().for_each(|(index, o)| {
        let (t, h) = (index / num_heads, index % num_heads);
        let kv = h / group;
        let query = &q.row(t)[h * head_dim..(h + 1) * head_dim];
        let len = pos0 + t + 1;
        let mut scores: Vec<f32> = (0..len)
            .map(|j| dot(query, &keys.row(j)[kv * head_dim..(kv + 1) * head_dim]) * scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        for (j, &p) in scores.iter().enumerate() {
            let v = &values.row(j)[kv * head_dim..(kv + 1) * head_dim];
            o.iter_mut().zip(v).for_each(|(acc, &x)| *acc += p / total * x);
        }
    });
    CpuTensor::new(q.rows, num_heads * head_dim, out)
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
}
