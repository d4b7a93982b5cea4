//! Gated DeltaNet: the causal depthwise conv and the gated delta rule.
//!
//! One token (decode) and short calls evaluate the recurrence exactly as written; prompts
//! take the chunked form of [`super::delta_chunks`], which reorders the same sums into
//! matrix products.

use rayon::prelude::*;

use super::CpuTensor;
use super::delta_chunks;
use super::norm::{sigmoid, silu};
use crate::model::config::LinearAttentionConfig;

/// Depthwise causal conv with `kernel - 1` rows of history from `state`, then SiLU.
/// `weight` is `[channels, kernel]`; the last tap multiplies the current token.
///
/// Taps run outermost over pieces of a row of channels, so that the inner loop walks the
/// input contiguously (the weights with a stride of `kernel`) and the piece stays in L1;
/// each channel still sums its taps in order.
pub fn causal_conv1d_silu(x: &CpuTensor, weight: &CpuTensor, state: &mut CpuTensor) -> CpuTensor {
    let (c, k, t) = (x.cols, weight.cols, x.rows);
    let keep = k - 1;
    // Row `i` of the input with its history in front: the state's rows, then the tokens.
    let history = |i: usize| if i < keep { state.row(i) } else { x.row(i - keep) };
    // One piece of a row of channels (p) of token ti, through all its taps.
    let conv_piece = |ti: usize, p: usize, piece: &mut [f32]| {
        let channels = p * CONV_CHANNELS..p * CONV_CHANNELS + piece.len();
        let weights = || weight.data[channels.start * k..channels.end * k].chunks_exact(k);
        let input = |j: usize| &history(ti + j)[channels.clone()];
        if k == 4 {
            // The models' kernel size: all taps in one pass, the same sums in the same order.
            let rows = (input(0).iter().zip(input(1))).zip(input(2).iter().zip(input(3)));
            for ((o, w), ((&a, &b), (&c, &d))) in piece.iter_mut().zip(weights()).zip(rows) {
                *o = w[0] * a + w[1] * b + w[2] * c + w[3] * d;
            }
        } else {
            // The first tap assigns: the output's fresh pages are written before they are read.
            for ((o, w), &h) in piece.iter_mut().zip(weights()).zip(input(0)) {
                *o = w[0] * h;
            }
            for j in 1..k {
                for ((o, w), &h) in piece.iter_mut().zip(weights()).zip(input(j)) {
                    *o += w[j] * h;
                }
            }
        }
        piece.iter_mut().for_each(|o| *o = silu(*o));
    };
    let mut out = vec![0.0f32; t * c];
    out.par_chunks_mut(c * CONV_ROWS).enumerate().for_each(|(block, rows)| {
        for (r, row) in rows.chunks_mut(c).enumerate() {
            // Pieces of the row small enough that the output stays in L1 over the taps.
            for (p, piece) in row.chunks_mut(CONV_CHANNELS).enumerate() {
                conv_piece(block * CONV_ROWS + r, p, piece);
            }
        }
    });
    // Row by row: a flattening iterator here cost more than the conv of one token.
    let mut tail = Vec::with_capacity(keep * c);
    for i in t..t + keep {
        tail.extend_from_slice(history(i));
    }
    state.data.copy_from_slice(&tail);
    CpuTensor::new(t, c, out)
}

/// Token rows per parallel task in the conv.
const CONV_ROWS: usize = 16;

/// Channels the conv takes through all its taps at a time.
const CONV_CHANNELS: usize = 512;

/// torch's softplus (beta 1, threshold 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// Appends `x / sqrt(sum(x²) + 1e-6) * scale`: the l2norm of the reference implementation.
fn push_l2_normalized(into: &mut Vec<f32>, x: &[f32], scale: f32) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
    into.extend(x.iter().map(|v| v * inv * scale));
}

/// One value head's inputs to the delta rule for every token of a call, token-major:
/// normalised (and for q scaled) queries and keys, values, log decays and write strengths.
pub(super) struct HeadInputs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub log_decay: Vec<f32>,
    pub beta: Vec<f32>,
}

impl HeadInputs {
    #[allow(clippy::too_many_arguments)]
    fn gather(
        qkv: &CpuTensor,
        a: &CpuTensor,
        b: &CpuTensor,
        a_log: &[f32],
        dt_bias: &[f32],
        dims: &LinearAttentionConfig,
        h: usize,
    ) -> HeadInputs {
        let (dk, dv) = (dims.key_head_dim, dims.value_head_dim);
        let key_dim = dims.key_dim();
        let kh = h / (dims.num_value_heads / dims.num_key_heads);
        let q_scale = 1.0 / (dk as f32).sqrt();
        let t_len = qkv.rows;
        let mut x = HeadInputs {
            q: Vec::with_capacity(t_len * dk),
            k: Vec::with_capacity(t_len * dk),
            v: Vec::with_capacity(t_len * dv),
            log_decay: Vec::with_capacity(t_len),
            beta: Vec::with_capacity(t_len),
        };
        for t in 0..t_len {
            let row = qkv.row(t);
            push_l2_normalized(&mut x.q, &row[kh * dk..(kh + 1) * dk], q_scale);
            push_l2_normalized(&mut x.k, &row[key_dim + kh * dk..key_dim + (kh + 1) * dk], 1.0);
            x.v.extend_from_slice(&row[2 * key_dim + h * dv..2 * key_dim + (h + 1) * dv]);
            x.log_decay.push(-a_log[h].exp() * softplus(a.row(t)[h] + dt_bias[h]));
            x.beta.push(sigmoid(b.row(t)[h]));
        }
        x
    }
}

/// Runs the gated delta rule for `T` tokens; see [`crate::backend::Backend::gated_delta_rule`].
/// Prompts of [`CHUNKED_MIN_TOKENS`] or more take the chunked form, which gives the same
/// state and outputs up to rounding; fewer tokens take the recurrence token by token.
pub fn gated_delta_rule(
    qkv: &CpuTensor,
    a: &CpuTensor,
    b: &CpuTensor,
    a_log: &[f32],
    dt_bias: &[f32],
    state: &mut CpuTensor,
    dims: &LinearAttentionConfig,
) -> CpuTensor {
    let (nv, dk, dv) = (dims.num_value_heads, dims.key_head_dim, dims.value_head_dim);
    let t_len = qkv.rows;
    let per_head: Vec<Vec<f32>> = state
        .data
        .par_chunks_mut(dk * dv)
        .enumerate()
        .map(|(h, s)| {
            let inputs = HeadInputs::gather(qkv, a, b, a_log, dt_bias, dims, h);
            let mut out = vec![0.0f32; t_len * dv];
            if t_len >= CHUNKED_MIN_TOKENS {
                delta_chunks::run(&inputs, s, &mut out, dk, dv);
            } else {
                recurrence(&inputs, s, &mut out, dk, dv);
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

/// Prompts at least this long run the delta rule in chunks.
const CHUNKED_MIN_TOKENS: usize = 16;

/// The recurrence exactly as written, token by token: decay, read, delta, rank-one update,
/// output. `s` is the head's `[dk, dv]` state, `out` its `[T, dv]` outputs.
fn recurrence(x: &HeadInputs, s: &mut [f32], out: &mut [f32], dk: usize, dv: usize) {
    let mut delta = vec![0.0f32; dv];
    for (t, o) in out.chunks_mut(dv).enumerate() {
        let q = &x.q[t * dk..(t + 1) * dk];
        let k = &x.k[t * dk..(t + 1) * dk];
        let decay = x.log_decay[t].exp();
        s.iter_mut().for_each(|v| *v *= decay);
        // delta = (v - Sᵀk) * beta
        delta.copy_from_slice(&x.v[t * dv..(t + 1) * dv]);
        for (i, &ki) in k.iter().enumerate() {
            for (d, &sv) in delta.iter_mut().zip(&s[i * dv..(i + 1) * dv]) {
                *d -= sv * ki;
            }
        }
        delta.iter_mut().for_each(|d| *d *= x.beta[t]);
        // S += k deltaᵀ, then o = Sᵀq
        for (i, (&ki, &qi)) in k.iter().zip(q).enumerate() {
            let srow = &mut s[i * dv..(i + 1) * dv];
            for ((sv, &d), ov) in srow.iter_mut().zip(&delta).zip(o.iter_mut()) {
                *sv += ki * d;
                *ov += *sv * qi;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul::tests::noise;
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

    /// `n` values in [-scale, scale] from the matmul tests' noise.
    fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        noise(seed, n)
            .iter()
            .map(|&b| (f32::from(b) / 127.5 - 1.0) * scale)
            .collect()
    }

    fn relative_l2(a: &[f32], b: &[f32]) -> f32 {
        let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let norm: f32 = b.iter().map(|y| y * y).sum();
        (diff / norm).sqrt()
    }

    #[test]
    fn a_prompt_in_chunks_matches_the_recurrence_token_by_token() {
        // Two key heads shared by four value heads, unequal head dims, 150 tokens: two full
        // chunks and a partial one, from a state that is not zero.
        let dims = LinearAttentionConfig {
            num_key_heads: 2,
            num_value_heads: 4,
            key_head_dim: 16,
            value_head_dim: 24,
            conv_kernel: 4,
        };
        let (tokens, nv) = (150, dims.num_value_heads);
        let qkv = CpuTensor::new(tokens, dims.conv_dim(), random(1, tokens * dims.conv_dim(), 1.0));
        let a = CpuTensor::new(tokens, nv, random(2, tokens * nv, 3.0));
        let b = CpuTensor::new(tokens, nv, random(3, tokens * nv, 3.0));
        let (a_log, dt_bias) = (random(4, nv, 1.0), random(5, nv, 1.0));
        let state_len = dims.key_head_dim * dims.value_head_dim;
        let start = CpuTensor::new(nv, state_len, random(6, nv * state_len, 0.5));

        let mut chunked_state = CpuTensor::new(nv, state_len, start.data.clone());
        let chunked = gated_delta_rule(&qkv, &a, &b, &a_log, &dt_bias, &mut chunked_state, &dims);
        let mut state = start;
        let row = |m: &CpuTensor, t: usize| CpuTensor::new(1, m.cols, m.row(t).to_vec());
        let stepped: Vec<f32> = (0..tokens)
            .flat_map(|t| {
                gated_delta_rule(
                    &row(&qkv, t),
                    &row(&a, t),
                    &row(&b, t),
                    &a_log,
                    &dt_bias,
                    &mut state,
                    &dims,
                )
                .data
            })
            .collect();
        assert!(
            relative_l2(&chunked.data, &stepped) < 1e-5,
            "outputs {}",
            relative_l2(&chunked.data, &stepped)
        );
        assert!(relative_l2(&chunked_state.data, &state.data) < 1e-5, "state");
    }
}
