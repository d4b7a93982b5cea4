//! Gated DeltaNet: the causal depthwise conv and the gated delta rule, token by token.
//!
//! The recurrence is evaluated exactly as written (decay, read, delta, rank-one update,
//! output) for every token, in prefill as in decode, so both paths give the same numbers.

use rayon::prelude::*;

use super::CpuTensor;
use super::norm::{sigmoid, silu};
use crate::model::config::LinearAttentionConfig;

/// Depthwise causal conv with `kernel - 1` rows of history from `state`, then SiLU.
/// `weight` is `[channels, kernel]`; the last tap multiplies the current token.
pub fn causal_conv1d_silu(x: &CpuTensor, weight: &CpuTensor, state: &mut CpuTensor) -> CpuTensor {
    let (c, k, t) = (x.cols, weight.cols, x.rows);
    let history: Vec<f32> = [state.data.as_slice(), x.data.as_slice()].concat();
    let mut out = vec![0.0f32; t * c];
    out.par_chunks_mut(c).enumerate().for_each(|(ti, row)| {
        for (ch, o) in row.iter_mut().enumerate() {
            let taps = &weight.data[ch * k..(ch + 1) * k];
            let sum: f32 = taps
                .iter()
                .enumerate()
                .map(|(j, &w)| w * history[(ti + j) * c + ch])
                .sum();
            *o = silu(sum);
        }
    });
    let keep = (k - 1) * c;
    state.data.copy_from_slice(&history[history.len() - keep..]);
    CpuTensor::new(t, c, out)
}

/// torch's softplus (beta 1, threshold 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// `x / sqrt(sum(x²) + 1e-6)`, the l2norm of the reference implementation.
fn l2_normalize(x: &[f32], scale: f32) -> Vec<f32> {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
    x.iter().map(|v| v * inv * scale).collect()
}

/// Runs the gated delta rule for `T` tokens; see [`crate::backend::Backend::gated_delta_rule`].
pub fn gated_delta_rule(
    qkv: &CpuTensor,
    a: &CpuTensor,
    b: &CpuTensor,
    a_log: &[f32],
    dt_bias: &[f32],
    state: &mut CpuTensor,
    dims: &LinearAttentionConfig,
) -> CpuTensor {
    let (nk, nv) = (dims.num_key_heads, dims.num_value_heads);
    let (dk, dv) = (dims.key_head_dim, dims.value_head_dim);
    let key_dim = nk * dk;
    let per_key_head = nv / nk;
    let q_scale = 1.0 / (dk as f32).sqrt();
    let t_len = qkv.rows;
    let per_head: Vec<Vec<f32>> = state
        .data
        .par_chunks_mut(dk * dv)
        .enumerate()
        .map(|(h, s)| {
            let kh = h / per_key_head;
            let mut out = vec![0.0f32; t_len * dv];
            let mut delta = vec![0.0f32; dv];
            for t in 0..t_len {
                let row = qkv.row(t);
                let q = l2_normalize(&row[kh * dk..(kh + 1) * dk], q_scale);
                let k = l2_normalize(&row[key_dim + kh * dk..key_dim + (kh + 1) * dk], 1.0);
                let v = &row[2 * key_dim + h * dv..2 * key_dim + (h + 1) * dv];
                let g = -a_log[h].exp() * softplus(a.row(t)[h] + dt_bias[h]);
                let decay = g.exp();
                let beta = sigmoid(b.row(t)[h]);
                s.iter_mut().for_each(|x| *x *= decay);
                // delta = (v - Sᵀk) * beta
                delta.copy_from_slice(v);
                for (i, &ki) in k.iter().enumerate() {
                    for (d, &sv) in delta.iter_mut().zip(&s[i * dv..(i + 1) * dv]) {
                        *d -= sv * ki;
                    }
                }
                delta.iter_mut().for_each(|d| *d *= beta);
                // S += k deltaᵀ, then o = Sᵀq
                let o = &mut out[t * dv..(t + 1) * dv];
                for (i, (&ki, &qi)) in k.iter().zip(&q).enumerate() {
                    let srow = &mut s[i * dv..(i + 1) * dv];
                    for ((sv, &d), ov) in srow.iter_mut().zip(&delta).zip(o.iter_mut()) {
                        *sv += ki * d;
                        *ov += *sv * qi;
                    }
                }
            }
            out
        })
        .collect();
    let mut out = vec![0.0f32; t_len * nv * dv];
    for (h, head) in per_head.iter().enumerate() {
        for t in 0..t_len {
            out[t * nv * dv + h * dv..t * nv * dv + (h + 1) * dv].copy_from_slice(&head[t * dv..(t + 1) * dv]);
        }
    }
    CpuTensor::new(t_len, nv * dv, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_uses_state_as_left_context_and_keeps_the_tail() {
        // One channel, kernel 3: out[t] = silu(w0 x[t-2] + w1 x[t-1] + w2 x[t]).
        let weight = CpuTensor::new(1, 3, vec![1.0, 10.0, 100.0]);
        let mut state = CpuTensor::new(2, 1, vec![0.0, 0.0]);
        let x = CpuTensor::new(2, 1, vec![0.01, 0.02]);
        let first = causal_conv1d_silu(&x, &weight, &mut state);
        assert!((first.data[1] - silu(0.1 + 2.0)).abs() < 1e-6);
        assert_eq!(state.data, vec![0.01, 0.02]);
        let next = causal_conv1d_silu(&CpuTensor::new(1, 1, vec![0.03]), &weight, &mut state);
        assert!((next.data[0] - silu(0.01 + 0.2 + 3.0)).abs() < 1e-5);
    }
}
