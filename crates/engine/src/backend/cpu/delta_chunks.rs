//! The gated delta rule over a prompt in chunks of tokens, as matrix products.
//!
//! Within a chunk starting from state `S₀` (`[dk, dv]`), let `Gₜ` be the log decay summed
//! from the chunk's start through token `t` and `Γₜⱼ = exp(Gₜ − Gⱼ)`. The recurrence
//! (decay, read, delta, rank-one update, output) unrolls to
//!
//! - `δₜ = βₜ (vₜ − e^{Gₜ} S₀ᵀkₜ) − βₜ Σ_{j<t} Γₜⱼ (kₜ·kⱼ) δⱼ`, a unit lower-triangular system,
//! - `oₜ = e^{Gₜ} S₀ᵀqₜ + Σ_{j≤t} Γₜⱼ (qₜ·kⱼ) δⱼ`,
//! - `S = e^{G_last} S₀ + Σⱼ e^{G_last − Gⱼ} kⱼ δⱼᵀ`,
//!
//! so a chunk reads the state twice and writes it once, in products of a chunk's rows,
//! where the recurrence makes three passes over it per token. Every exponent is at most
//! zero. transformers runs this form for prompts (`torch_chunk_gated_delta_rule`); here the
//! triangular system is solved by forward substitution on the deltas, not by inverting it.

use super::gemm::{Strided, sgemm};
use super::linear_attention::HeadInputs;

/// Tokens per chunk.
const CHUNK: usize = 32;

/// Runs one head over every token of `x`: `s` is its `[dk, dv]` state, updated; `out` its
/// `[T, dv]` outputs, overwritten.
pub(super) fn run(x: &HeadInputs, s: &mut [f32], out: &mut [f32], dk: usize, dv: usize) {
    let mut scratch = Scratch::new(dk, dv);
    let t_len = x.beta.len();
    for start in (0..t_len).step_by(CHUNK) {
        let c = CHUNK.min(t_len - start);
        let cum: Vec<f32> = x.log_decay[start..start + c]
            .iter()
            .scan(0.0f32, |g, &d| {
                *g += d;
                Some(*g)
            })
            .collect();
        let chunk = Chunk {
            q: &x.q[start * dk..(start + c) * dk],
            k: &x.k[start * dk..(start + c) * dk],
            v: &x.v[start * dv..(start + c) * dv],
            beta: &x.beta[start..start + c],
            between: (0..c * c)
                .map(|i| {
                    if i % c <= i / c {
                        decay(cum[i / c] - cum[i % c])
                    } else {
                        0.0
                    }
                })
                .collect(),
            cum,
            dk,
            dv,
        };
        chunk.run(s, &mut out[start * dv..(start + c) * dv], &mut scratch);
    }
}

/// One chunk's inputs; `cum` holds the cumulative log decays `Gₜ`, `between` the decays
/// `Γₜⱼ` at `[t, j]` for `j ≤ t` and zeros above the diagonal.
struct Chunk<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    beta: &'a [f32],
    cum: Vec<f32>,
    between: Vec<f32>,
    dk: usize,
    dv: usize,
}

/// Buffers reused from chunk to chunk. Keys and queries are stacked (`[K; Q]`, `2c` rows)
/// so that what both need of the state, and of the keys, is one product each.
struct Scratch {
    /// Keys then queries, as given or with each row scaled, `[2c, dk]`.
    stacked: Vec<f32>,
    /// `[K; Q] Kᵀ`, `[2c, c]`: the keys' Gram matrix, then the query-key scores.
    pairs: Vec<f32>,
    /// `[2c, dv]`: `(K ⊙ e^G) S₀` then `(Q ⊙ e^G) S₀`; later the scores times the deltas.
    product: Vec<f32>,
    /// The deltas `δ`, `[c, dv]`.
    delta: Vec<f32>,
    /// The chunk's addition to the state, `[dk, dv]`.
    update: Vec<f32>,
}

impl Scratch {
    fn new(dk: usize, dv: usize) -> Scratch {
        Scratch {
            stacked: vec![0.0; 2 * CHUNK * dk],
            pairs: vec![0.0; 2 * CHUNK * CHUNK],
            product: vec![0.0; 2 * CHUNK * dv],
            delta: vec![0.0; CHUNK * dv],
            update: vec![0.0; dk * dv],
        }
    }
}

impl Chunk<'_> {
    fn len(&self) -> usize {
        self.beta.len()
    }

    fn run(&self, s: &mut [f32], out: &mut [f32], w: &mut Scratch) {
        let (c, dk, dv) = (self.len(), self.dk, self.dv);
        let (last, growth) = (self.cum[c - 1], |t: usize| decay(self.cum[t]));
        // What the state gives keys and queries: [K ⊙ e^G; Q ⊙ e^G] S₀.
        let (keys, queries) = w.stacked[..2 * c * dk].split_at_mut(c * dk);
        scale_rows(self.k, dk, growth, keys);
        scale_rows(self.q, dk, growth, queries);
        sgemm(
            1.0,
            &Strided::of(&w.stacked[..2 * c * dk], 2 * c, dk, false),
            &Strided::of(s, dk, dv, false),
            &mut w.product[..2 * c * dv],
        );
        // [K; Q] Kᵀ
        let (keys, queries) = w.stacked[..2 * c * dk].split_at_mut(c * dk);
        keys.copy_from_slice(self.k);
        queries.copy_from_slice(self.q);
        sgemm(
            1.0,
            &Strided::of(&w.stacked[..2 * c * dk], 2 * c, dk, false),
            &Strided::of(self.k, dk, c, true),
            &mut w.pairs[..2 * c * c],
        );
        self.solve_deltas(w);
        // out = (Q ⊙ e^G) S₀ + (Q Kᵀ ⊙ Γ, lower triangle with the diagonal) Δ
        let scores = &mut w.pairs[c * c..2 * c * c];
        scores.iter_mut().zip(&self.between).for_each(|(p, &d)| *p *= d);
        let (within, from_state) = w.product[..2 * c * dv].split_at_mut(c * dv);
        sgemm(
            1.0,
            &Strided::of(scores, c, c, false),
            &Strided::of(&w.delta[..c * dv], c, dv, false),
            within,
        );
        out.iter_mut()
            .zip(from_state.iter().zip(within.iter()))
            .for_each(|(o, (&a, &b))| *o = a + b);
        // S = e^{G_last} S₀ + (K ⊙ e^{G_last − G})ᵀ Δ
        scale_rows(self.k, dk, |t| decay(last - self.cum[t]), &mut w.stacked[..c * dk]);
        sgemm(
            1.0,
            &Strided::of(&w.stacked[..c * dk], dk, c, true),
            &Strided::of(&w.delta[..c * dv], c, dv, false),
            &mut w.update,
        );
        let kept = decay(last);
        s.iter_mut().zip(&w.update).for_each(|(sv, &u)| *sv = *sv * kept + u);
    }

    /// Fills `w.delta` with `δ` by forward substitution, from `S₀ᵀkₜ` (the first `c` rows of
    /// `w.product`) and the keys' Gram matrix (the first `c` rows of `w.pairs`).
    fn solve_deltas(&self, w: &mut Scratch) {
        let (c, dv) = (self.len(), self.dv);
        let gram = &w.pairs[..c * c];
        for t in 0..c {
            let (solved, rest) = w.delta.split_at_mut(t * dv);
            let delta = &mut rest[..dv];
            let beta = self.beta[t];
            let read = &w.product[t * dv..(t + 1) * dv];
            for ((d, &v), &r) in delta.iter_mut().zip(&self.v[t * dv..(t + 1) * dv]).zip(read) {
                *d = beta * (v - r);
            }
            for (j, earlier) in solved.chunks(dv).enumerate() {
                let weight = beta * self.between[t * c + j] * gram[t * c + j];
                delta.iter_mut().zip(earlier).for_each(|(d, &e)| *d -= weight * e);
            }
        }
    }
}

/// `exp(log_decay)`, or zero below `exp(FLUSH_BELOW)`.
///
/// Decays summed over a chunk reach far below one; products of such factors with small
/// values then fall into f32's subnormal range, which x86 computes tens of times slower.
/// What a factor under `exp(-40)` (4e-18) scales is below f32 resolution next to the
/// terms it is added to, so it is dropped before it gets there.
fn decay(log_decay: f32) -> f32 {
    if log_decay < FLUSH_BELOW { 0.0 } else { log_decay.exp() }
}

const FLUSH_BELOW: f32 = -40.0;

/// `into[t] = m[t] * factor(t)` for each row `t` of `cols` values.
fn scale_rows(m: &[f32], cols: usize, factor: impl Fn(usize) -> f32, into: &mut [f32]) {
    for (t, (dst, src)) in into.chunks_mut(cols).zip(m.chunks(cols)).enumerate() {
        let f = factor(t);
        dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x * f);
    }
}
