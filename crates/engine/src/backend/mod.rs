//! Compute backends: where the arithmetic happens.
//!
//! The forward pass (`crate::model`) is written once against the [`Backend`] trait. A backend
//! owns its activation tensors and its copies of weight matrices; the model only sequences
//! operations. Every operation works on a batch of `T` tokens at once, so prompt prefill and
//! one-token decode run the same code.

pub mod cpu;
pub mod cuda;

use crate::error::{Error, Result};
use crate::model::config::LinearAttentionConfig;
use crate::model::weights::ExpertView;
use crate::storage::quant::MatrixView;

/// One token's routing decision: `(expert index, weight)` for each of the top-k experts.
pub type Route = Vec<(usize, f32)>;

/// What a backend's own expert cache (tier 1, e.g. VRAM) did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpertCacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Bytes copied to the device for misses.
    pub uploaded_bytes: u64,
    /// Layer steps (one token through one layer) routed on the device, no host round trip.
    pub device_routed: u64,
    /// Layer steps replayed from a recording (a CUDA graph) instead of launched op by op.
    pub replayed_steps: u64,
    pub resident_bytes: u64,
    pub budget_bytes: u64,
}

impl ExpertCacheStats {
    /// The counters since the snapshot `earlier` (resident and budget stay current).
    pub fn since(&self, earlier: &ExpertCacheStats) -> ExpertCacheStats {
        ExpertCacheStats {
            hits: self.hits - earlier.hits,
            misses: self.misses - earlier.misses,
            uploaded_bytes: self.uploaded_bytes - earlier.uploaded_bytes,
            device_routed: self.device_routed - earlier.device_routed,
            replayed_steps: self.replayed_steps - earlier.replayed_steps,
            ..*self
        }
    }
}

/// What routing on the device needs to know of a mixture-of-experts layer (one token).
#[derive(Clone, Copy, Debug)]
pub struct DeviceRouting {
    pub layer: usize,
    pub experts_per_token: usize,
    pub renormalize: bool,
}

/// A one-token layer step that a backend may record once (a CUDA graph) and replay: the
/// layer, the experts per token it routes to, and the device addresses of the buffers it
/// reads and writes besides weights (the residual stream and the layer's state). The same key
/// must mean the same work.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StepKey {
    pub layer: usize,
    pub experts_per_token: usize,
    pub buffers: Vec<u64>,
}

/// Geometry of one full-attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The operations the forward pass needs.
///
/// Tensors are row-major `[rows, cols]` f32 matrices; a row is one token unless said otherwise.
/// Matrices follow PyTorch's `Linear` layout: `[out, in]`, so `matmul(x, w) = x · wᵀ`.
pub trait Backend: Send + Sync {
    /// Activations and state on the device.
    type Tensor: Send + Sync;
    /// A weight matrix in its stored encoding, ready for `matmul`.
    type Matrix: Send + Sync;
    /// A routed expert ready for compute (on a GPU: in VRAM).
    type Expert: Send + Sync;

    /// A short description, e.g. `cpu (2 threads)`.
    fn describe(&self) -> String;
    /// The most routed experts per token this backend's routing takes (`None`: any).
    fn max_experts_per_token(&self) -> Option<usize> {
        None
    }

    // --- memory ----------------------------------------------------------------------------
    fn load_matrix(&self, w: &MatrixView) -> Result<Self::Matrix>;
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// [`argmax`] of the last row of `logits` (greedy decoding's choice), found where the
    /// logits are: a GPU sends back one index instead of the vocabulary's logits.
    fn argmax_last_row(&self, logits: &Self::Tensor) -> Result<u32> {
        let (rows, cols) = self.shape(logits);
        if rows == 0 || cols == 0 {
            return Err(Error::InvalidInput("argmax of an empty tensor".into()));
        }
        let all = self.download(logits)?;
        Ok(argmax(&all[(rows - 1) * cols..]))
    }
    /// A temperature draw's candidates from the last row of `logits`, found where the logits
    /// are, as `(index, logit)` in any order: every logit at least the largest minus `span`,
    /// or with `top_k` set, at least the `top_k` largest of those (ties to the lower index).
    /// `None` where the backend has no cheaper way than downloading the row.
    fn draw_candidates(&self, _logits: &Self::Tensor, _span: f32, _top_k: usize) -> Result<Option<Vec<(u32, f32)>>> {
        Ok(None)
    }
    /// A copy of the last row of `logits` with `penalties` applied ([`LogitPenalty::apply`],
    /// at most one per token), made where the logits are; `None` where the backend has no
    /// cheaper way than downloading them.
    fn penalized_last_row(&self, _logits: &Self::Tensor, _penalties: &[LogitPenalty]) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// A copy of `t` (snapshots of a sequence's state).
    fn copy(&self, t: &Self::Tensor) -> Result<Self::Tensor>;
    /// `(rows, cols)` of a tensor.
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);
    /// Appends the rows of `src` to `dst` (KV caches).
    fn append_rows(&self, dst: &mut Self::Tensor, src: &Self::Tensor) -> Result<()>;

    // --- dense ops -------------------------------------------------------------------------
    /// Rows `ids` of an embedding table.
    fn embed(&self, table: &Self::Matrix, ids: &[u32]) -> Result<Self::Tensor>;
    /// `x · wᵀ`: `[T, in]` by `[out, in]` gives `[T, out]`.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Matrix) -> Result<Self::Tensor>;
    /// `x · wᵀ` for each of several matrices that read the same `x` (a layer's input
    /// projections). Backends may do them in one launch.
    fn matmul_many(&self, x: &Self::Tensor, ws: &[&Self::Matrix]) -> Result<Vec<Self::Tensor>> {
        ws.iter().map(|w| self.matmul(x, w)).collect()
    }
    /// `rms_norm(x, weight, eps)`, and `matmul_many` of it: the RMSNorm before a layer's
    /// input projections. Returns the normalized `x` and the products. Backends may do both
    /// in one launch.
    fn rms_norm_project(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
        ws: &[&Self::Matrix],
    ) -> Result<(Self::Tensor, Vec<Self::Tensor>)> {
        rms_norm_project_unfused(self, x, weight, eps, ws)
    }
    /// `out += x · wᵀ`: an output projection added into the residual stream.
    fn matmul_add(&self, x: &Self::Tensor, w: &Self::Matrix, out: &mut Self::Tensor) -> Result<()> {
        self.add_assign(out, &self.matmul(x, w)?)
    }
    /// RMS-normalises every `weight.len()`-wide slice of each row and multiplies by `weight`.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `x *= sigmoid(gate)`, elementwise; a one-column `gate` scales whole rows.
    fn mul_sigmoid(&self, x: &mut Self::Tensor, gate: &Self::Tensor) -> Result<()>;
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `silu(x · gateᵀ) * (x · upᵀ)`: the first half of a SwiGLU MLP. Backends may fuse it.
    fn swiglu(&self, x: &Self::Tensor, gate: &Self::Matrix, up: &Self::Matrix) -> Result<Self::Tensor> {
        self.silu_mul(&self.matmul(x, gate)?, &self.matmul(x, up)?)
    }

    // --- full attention --------------------------------------------------------------------
    /// Splits a `q_proj` output whose heads hold `[query | gate]` into `(query, gate)`.
    fn split_query_gate(
        &self,
        qg: &Self::Tensor,
        num_heads: usize,
        head_dim: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Rotate-half RoPE on the first `rotary_dim` dims of every head; row `t` is at position `pos0 + t`.
    fn rope(&self, x: &mut Self::Tensor, head_dim: usize, rotary_dim: usize, theta: f64, pos0: usize) -> Result<()>;
    /// The attention inputs of `T` rows at positions `pos0..pos0 + T`, from a full-attention
    /// layer's projections: the queries split from their gates (`query_gate` holds heads of
    /// `[query | gate]`), queries and keys RMS-normalized per head and rotated as `prep`
    /// says, the keys appended to `keys` and `v` to `values`. Returns `(query, gate)`.
    /// Backends may do it all in one launch.
    #[allow(clippy::too_many_arguments)]
    fn attention_inputs(
        &self,
        query_gate: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        prep: &HeadPrep<'_, Self::Tensor>,
        pos0: usize,
        keys: &mut Self::Tensor,
        values: &mut Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        attention_inputs_unfused(self, query_gate, k, v, prep, pos0, keys, values)
    }
    /// Causal softmax attention of the `T` query rows (at positions `pos0..pos0+T`) over the
    /// first `pos0 + T` cached key/value rows.
    fn attention(
        &self,
        q: &Self::Tensor,
        keys: &Self::Tensor,
        values: &Self::Tensor,
        shape: AttentionShape,
        pos0: usize,
    ) -> Result<Self::Tensor>;

    // --- linear attention ------------------------------------------------------------------
    /// Depthwise causal conv over time, then SiLU. `weight` is `[channels, kernel]`; `state`
    /// holds the last `kernel - 1` input rows and is updated.
    fn causal_conv1d_silu(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        state: &mut Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// The gated delta rule over `T` tokens. `qkv` is the conv output `[T, q | k | v]`;
    /// `a`, `b` are `[T, value_heads]`; `state` is `[value_heads, key_dim * value_dim]` and is
    /// updated. Returns `[T, value_heads * value_head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn gated_delta_rule(
        &self,
        qkv: &Self::Tensor,
        a: &Self::Tensor,
        b: &Self::Tensor,
        a_log: &Self::Tensor,
        dt_bias: &Self::Tensor,
        state: &mut Self::Tensor,
        dims: &LinearAttentionConfig,
    ) -> Result<Self::Tensor>;
    /// Per-group RMSNorm times `weight`, times `silu(z)`.
    fn gated_rms_norm(
        &self,
        x: &Self::Tensor,
        z: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    // --- mixture of experts ----------------------------------------------------------------
    /// Softmax over each row of router logits, then the `k` largest, optionally renormalised.
    /// The decision comes back to the host, which fetches the chosen experts.
    fn route_top_k(&self, logits: &Self::Tensor, k: usize, renormalize: bool) -> Result<Vec<Route>>;
    /// `out[rows] += weights * expert(x[rows])` for each expert of `work` in turn: a layer's
    /// routed experts for a batch of tokens (a prompt). Backends may run all of them in a few
    /// launches, adding each token's outputs in the same order.
    fn experts_ffn_rows(
        &self,
        x: &Self::Tensor,
        work: &[ExpertRows<'_, Self::Expert>],
        out: &mut Self::Tensor,
    ) -> Result<()> {
        for w in work {
            self.expert_ffn(x, w.expert, w.rows, w.weights, out)?;
        }
        Ok(())
    }
    /// The rows `rows` of `x`, in that order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// `out[rows[i]] += weights[i] * y[i]`.
    fn scatter_add_rows(&self, out: &mut Self::Tensor, y: &Self::Tensor, rows: &[usize], weights: &[f32])
    -> Result<()>;

    // --- routed experts --------------------------------------------------------------------
    /// Expert `index` of `layer` if the backend holds it already (a device-side cache), so
    /// storage need not fetch it.
    fn cached_expert(&self, layer: usize, index: usize) -> Option<Self::Expert>;
    /// Whether the backend holds expert `index` of `layer` (without counting a use).
    fn holds_expert(&self, _layer: usize, _index: usize) -> bool {
        false
    }
    /// Makes a fetched expert ready for compute (copying it to the device, and caching it
    /// there when the backend has a cache).
    fn load_expert(&self, layer: usize, index: usize, view: &ExpertView) -> Result<Self::Expert>;
    /// Gate, up and down of an expert, ready for the backend's next operations.
    fn expert_matrices<'a>(&self, expert: &'a Self::Expert) -> Result<[&'a Self::Matrix; 3]>;
    /// `out[rows[i]] += weights[i] * down(silu(gate(x_i)) * up(x_i))` for the rows `rows`
    /// of `x` that chose this expert. Backends may fuse it; this is the reference sequence.
    fn expert_ffn(
        &self,
        x: &Self::Tensor,
        expert: &Self::Expert,
        rows: &[usize],
        weights: &[f32],
        out: &mut Self::Tensor,
    ) -> Result<()> {
        expert_ffn_unfused(self, x, expert, rows, weights, out)
    }
    /// One token's routed experts and the shared expert, if any, at once:
    /// `out += sum_e weights[e] * ffn_e(x) + shared(x)`, summed in the order given, the shared
    /// expert last. Backends may batch them into a few launches.
    fn experts_ffn_one_token(
        &self,
        x: &Self::Tensor,
        experts: &[&Self::Expert],
        weights: &[f32],
        shared: Option<&SharedExpert<'_, Self>>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        experts_ffn_one_by_one(self, x, experts, weights, shared, out)
    }
    /// One token's routing and experts without a round trip to the host, when the backend
    /// holds every expert of the layer: the top-k of `router_logits` (as `route_top_k`) picks
    /// experts that run as in `experts_ffn_one_token` (in index order, the shared expert
    /// last, so the sums are the same), added into `out`. Returns false, having done nothing,
    /// when the backend cannot; the host then routes.
    fn route_and_run_experts(
        &self,
        _routing: &DeviceRouting,
        _x: &Self::Tensor,
        _router_logits: &Self::Tensor,
        _shared: Option<&SharedExpert<'_, Self>>,
        _out: &mut Self::Tensor,
    ) -> Result<bool> {
        Ok(false)
    }
    /// Whether `route_and_run_experts` can route one token of `layer` now (the backend holds
    /// every expert of it).
    fn routes_on_device(&self, _layer: usize) -> bool {
        false
    }
    /// Bytes the backend's own expert cache may hold (an automatic budget is sized now), when
    /// it has one.
    fn expert_cache_budget(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Device memory the sequence state will take (KV caches, recurrent state, snapshots),
    /// which an expert cache sized automatically leaves free.
    fn reserve_state_memory(&self, _bytes: u64) {}
    /// The backend's expert cache counters, when it has one.
    fn expert_cache_stats(&self) -> Option<ExpertCacheStats> {
        None
    }
    /// Whether the backend copies experts from host memory into memory of its own (a GPU's
    /// link); `false` for a backend that computes in host memory.
    fn has_host_link(&self) -> bool {
        false
    }

    // --- recorded steps ----------------------------------------------------------------------
    /// The key under which a one-token step of `layer` over `buffers` may be recorded, or
    /// `None` when the backend does not record steps. The step may not wait on the device,
    /// nor depend on the position.
    fn step_key(&self, _layer: usize, _experts_per_token: usize, _buffers: &[&Self::Tensor]) -> Option<StepKey> {
        None
    }
    /// Runs `step`, or replays what it launched when it ran before under `key`.
    fn run_step(&self, _key: &StepKey, step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        step()
    }
}

/// What the sampler's penalties do to the logit of one token seen before: divided by
/// `repetition` when positive, multiplied by it otherwise, then `minus` subtracted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitPenalty {
    pub token: u32,
    pub repetition: f32,
    pub minus: f32,
}

impl LogitPenalty {
    pub fn apply(&self, logit: f32) -> f32 {
        let scaled = if logit > 0.0 {
            logit / self.repetition
        } else {
            logit * self.repetition
        };
        scaled - self.minus
    }
}

/// A temperature draw's order on its candidates `(token, logit)`: by logit, then the lower
/// token first (`Less`: ranks higher). It is total, so the top k and the draw do not depend
/// on where the candidates were found, nor on their order.
pub fn draw_order(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the `k` candidates that rank highest in [`draw_order`], in no particular order.
pub fn keep_top_k(candidates: &mut Vec<(u32, f32)>, k: usize) {
    if k > 0 && candidates.len() > k {
        candidates.select_nth_unstable_by(k - 1, draw_order);
        candidates.truncate(k);
    }
}

/// The index of the largest value, the first one on ties (NaNs are passed over). Two passes
/// the compiler vectorizes: lane-wise maxima over chunks, then the first chunk holding the
/// maximum (248K entries: 32 us instead of 166 on the dev VM).
pub fn argmax(values: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let first_chunk = values.chunks(LANES).position(|c| c.contains(&max)).unwrap_or(0);
    let within = values[first_chunk * LANES..]
        .iter()
        .position(|&v| v == max)
        .unwrap_or(0);
    (first_chunk * LANES + within) as u32
}

/// [`Backend::attention`]'s precondition, the same for every backend: the cache holds a key
/// and a value for every position up to the last query's.
pub fn check_kv_cache<B: Backend + ?Sized>(
    b: &B,
    q: &B::Tensor,
    keys: &B::Tensor,
    values: &B::Tensor,
    pos0: usize,
) -> Result<()> {
    let (queries, keys, values) = (b.shape(q).0, b.shape(keys).0, b.shape(values).0);
    if keys < pos0 + queries || values != keys {
        return Err(Error::InvalidInput(
            "attention: the KV cache is shorter than the positions".into(),
        ));
    }
    Ok(())
}

/// [`Backend::rms_norm_project`] as the backend's two separate operations.
pub fn rms_norm_project_unfused<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    weight: &B::Tensor,
    eps: f32,
    ws: &[&B::Matrix],
) -> Result<(B::Tensor, Vec<B::Tensor>)> {
    let h = b.rms_norm(x, weight, eps)?;
    let outs = b.matmul_many(&h, ws)?;
    Ok((h, outs))
}

/// One routed expert's share of a batch of tokens: the rows of `x` that chose it and their
/// routing weights ([`Backend::experts_ffn_rows`]).
pub struct ExpertRows<'a, E> {
    pub expert: &'a E,
    pub rows: &'a [usize],
    pub weights: &'a [f32],
}

/// What a full-attention layer does to each query and key head before attending: RMSNorm
/// with `q_norm` / `k_norm` (`head_dim` wide), then rotate-half RoPE on the first
/// `rotary_dim` dims.
pub struct HeadPrep<'a, T> {
    pub shape: AttentionShape,
    pub q_norm: &'a T,
    pub k_norm: &'a T,
    pub eps: f32,
    pub rotary_dim: usize,
    pub rope_theta: f64,
}

/// [`Backend::attention_inputs`] as the backend's separate operations.
#[allow(clippy::too_many_arguments)]
pub fn attention_inputs_unfused<B: Backend + ?Sized>(
    b: &B,
    query_gate: &B::Tensor,
    k: &B::Tensor,
    v: &B::Tensor,
    prep: &HeadPrep<'_, B::Tensor>,
    pos0: usize,
    keys: &mut B::Tensor,
    values: &mut B::Tensor,
) -> Result<(B::Tensor, B::Tensor)> {
    let hd = prep.shape.head_dim;
    let (q, gate) = b.split_query_gate(query_gate, prep.shape.num_heads, hd)?;
    let mut q = b.rms_norm(&q, prep.q_norm, prep.eps)?;
    let mut k = b.rms_norm(k, prep.k_norm, prep.eps)?;
    b.rope(&mut q, hd, prep.rotary_dim, prep.rope_theta, pos0)?;
    b.rope(&mut k, hd, prep.rotary_dim, prep.rope_theta, pos0)?;
    b.append_rows(keys, &k)?;
    b.append_rows(values, v)?;
    Ok((q, gate))
}

/// [`Backend::rms_norm_project`] for a fixed number of matrices: the normalized `x` and the
/// products, as an array.
pub fn norm_project<B: Backend + ?Sized, const N: usize>(
    b: &B,
    x: &B::Tensor,
    norm: (&B::Tensor, f32),
    ws: [&B::Matrix; N],
) -> Result<(B::Tensor, [B::Tensor; N])> {
    let (h, outs) = b.rms_norm_project(x, norm.0, norm.1, &ws)?;
    let got = outs.len();
    let outs = outs
        .try_into()
        .map_err(|_| Error::InvalidInput(format!("rms_norm_project returned {got} outputs for {N} matrices")))?;
    Ok((h, outs))
}

/// The shared expert of a mixture-of-experts block, which every token uses:
/// `sigmoid(gate_logit) * down_proj(silu(gate_proj x) * up_proj x)`.
pub struct SharedExpert<'a, B: Backend + ?Sized> {
    pub gate_proj: &'a B::Matrix,
    pub up_proj: &'a B::Matrix,
    pub down_proj: &'a B::Matrix,
    /// `[rows, 1]`: the logit of the expert's sigmoid gate for each row of `x` (computed
    /// with the router logits, which read the same input).
    pub gate_logit: &'a B::Tensor,
}

/// [`Backend::experts_ffn_one_token`] one expert at a time, the shared expert last.
pub fn experts_ffn_one_by_one<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    experts: &[&B::Expert],
    weights: &[f32],
    shared: Option<&SharedExpert<'_, B>>,
    out: &mut B::Tensor,
) -> Result<()> {
    for (expert, &w) in experts.iter().zip(weights) {
        b.expert_ffn(x, expert, &[0], &[w], out)?;
    }
    match shared {
        Some(s) => shared_expert_ffn(b, x, s, out),
        None => Ok(()),
    }
}

/// `out += shared(x)` for every row of `x`, as a sequence of the backend's plain operations.
pub fn shared_expert_ffn<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    shared: &SharedExpert<'_, B>,
    out: &mut B::Tensor,
) -> Result<()> {
    let mut y = b.matmul(&b.swiglu(x, shared.gate_proj, shared.up_proj)?, shared.down_proj)?;
    b.mul_sigmoid(&mut y, shared.gate_logit)?;
    b.add_assign(out, &y)
}

/// [`Backend::expert_ffn`] as a sequence of the backend's plain operations.
pub fn expert_ffn_unfused<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    expert: &B::Expert,
    rows: &[usize],
    weights: &[f32],
    out: &mut B::Tensor,
) -> Result<()> {
    b.scatter_add_rows(out, &expert_output(b, x, expert, rows)?, rows, weights)
}

/// `down(silu(gate(x_i)) * up(x_i))` for the rows `rows` of `x`, one output row each.
pub fn expert_output<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    expert: &B::Expert,
    rows: &[usize],
) -> Result<B::Tensor> {
    let [gate_w, up_w, down_w] = b.expert_matrices(expert)?;
    let xs = b.gather_rows(x, rows)?;
    let act = b.swiglu(&xs, gate_w, up_w)?;
    b.matmul(&act, down_w)
}
