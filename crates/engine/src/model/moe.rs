//! The feed-forward blocks: a sparse mixture of experts (router softmax, top-k, SwiGLU
//! experts, a shared expert scaled by `sigmoid(shared_expert_gate)`) and a dense SwiGLU MLP.

use std::collections::BTreeMap;
use std::sync::{Arc, mpsc};

use super::config::ModelConfig;
use super::cpu_share::CpuSplit;
use super::profile::{Phase, PhaseTimes, Stopwatch};
use super::weights::{ExpertSource, ExpertView, LayerWeight as W, PendingExpert, Weight, WeightSource};
use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::backend::{Backend, DeviceRouting, ExpertRows, Route, SharedExpert, norm_project, shared_expert_ffn};
use crate::error::{Error, Result};

/// `down(silu(gate(x)) * up(x))`.
pub struct SwiGlu<B: Backend> {
    gate: B::Matrix,
    up: B::Matrix,
    down: B::Matrix,
}

impl<B: Backend> SwiGlu<B> {
    fn load(
        backend: &B,
        src: &dyn WeightSource,
        layer: usize,
        names: [W; 3],
        hidden: usize,
        inter: usize,
    ) -> Result<Self> {
        let matrix = |w, rows, cols| backend.load_matrix(&src.matrix(Weight::Layer(layer, w), rows, cols)?);
        Ok(SwiGlu {
            gate: matrix(names[0], inter, hidden)?,
            up: matrix(names[1], inter, hidden)?,
            down: matrix(names[2], hidden, inter)?,
        })
    }

    fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let act = b.swiglu(x, &self.gate, &self.up)?;
        b.matmul(&act, &self.down)
    }
}

/// How a layer's routed experts run.
#[derive(Debug)]
pub struct ExpertPlan {
    /// Routed experts per token.
    pub per_token: usize,
    /// Which of one token's missed experts the host CPU computes.
    pub cpu: CpuSplit,
}

pub struct SparseMoe<B: Backend> {
    router: B::Matrix,
    experts: Arc<dyn ExpertSource>,
    shared: Option<(SwiGlu<B>, B::Matrix)>,
    renormalize: bool,
    layer: usize,
}

impl<B: Backend> SparseMoe<B> {
    pub fn load(backend: &B, cfg: &ModelConfig, src: &dyn WeightSource, layer: usize) -> Result<Self> {
        let m = &cfg.moe;
        let h = cfg.hidden_size;
        let router = backend.load_matrix(&src.matrix(Weight::Layer(layer, W::Router), m.num_experts, h)?)?;
        let shared = if m.shared_intermediate > 0 {
            let names = [W::SharedGateProj, W::SharedUpProj, W::SharedDownProj];
            let mlp = SwiGlu::load(backend, src, layer, names, h, m.shared_intermediate)?;
            let gate = backend.load_matrix(&src.matrix(Weight::Layer(layer, W::SharedExpertGate), 1, h)?)?;
            Some((mlp, gate))
        } else {
            None
        };
        Ok(SparseMoe {
            router,
            experts: src.experts(layer)?,
            shared,
            renormalize: m.norm_topk_prob,
            layer,
        })
    }

    /// Reads every expert of the layer once through storage and hands it to the backend,
    /// filling the caches of both (as far as they hold): with all of a layer's experts in
    /// VRAM a GPU routes on the device from the first token. Experts the backend holds
    /// already are skipped.
    pub fn prefetch(&self, b: &B) -> Result<()> {
        let all: Vec<usize> = (0..self.experts.num_experts())
            .filter(|&e| !b.holds_expert(self.layer, e))
            .collect();
        for chunk in all.chunks(64) {
            for (&e, pending) in chunk.iter().zip(self.experts.fetch(chunk)?) {
                b.load_expert(self.layer, e, &pending.wait()?)?;
            }
        }
        Ok(())
    }

    /// Bytes of the layer's routed experts (its first expert's, times their number: a layer's
    /// experts share one shape and encoding), with `slack` per expert.
    pub fn expert_bytes(&self, slack: u64) -> Result<u64> {
        let Some(first) = self.experts.fetch(&[0])?.into_iter().next() else {
            return Ok(0);
        };
        let one = first.wait()?.storage_bytes() as u64 + slack;
        Ok(one * self.experts.num_experts() as u64)
    }

    /// Normalizes `out` (the residual) with `norm` (weight, eps), routes every token, runs
    /// each chosen expert once on all the tokens that chose it, and adds their weighted
    /// outputs and the gated shared expert's to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into(
        &self,
        b: &B,
        norm: (&B::Tensor, f32),
        plan: &ExpertPlan,
        times: &mut PhaseTimes,
        clock: &mut Stopwatch,
        routing_log: Option<&mut Vec<Vec<usize>>>,
        out: &mut B::Tensor,
    ) -> Result<()> {
        let tokens = b.shape(out).0;
        // The norm, the router and the shared expert's gate in one launch where the backend
        // can (they read the same input), and the gate logit is ready before the routing
        // decision comes back.
        let (x, router_logits, shared_logit) = match &self.shared {
            Some((_, gate)) => {
                let (x, [router_logits, shared_logit]) = norm_project(b, out, norm, [&self.router, gate])?;
                (x, router_logits, Some(shared_logit))
            }
            None => {
                let (x, [router_logits]) = norm_project(b, out, norm, [&self.router])?;
                (x, router_logits, None)
            }
        };
        let x = &x;
        let shared = self
            .shared
            .as_ref()
            .zip(shared_logit.as_ref())
            .map(|((mlp, _), gate_logit)| SharedExpert {
                gate_proj: &mlp.gate,
                up_proj: &mlp.up,
                down_proj: &mlp.down,
                gate_logit,
            });
        // A backend that holds every expert of the layer routes one token by itself: the host
        // need not wait for the decision. Not when the routing is to be logged.
        let routing = DeviceRouting {
            layer: self.layer,
            experts_per_token: plan.per_token,
            renormalize: self.renormalize,
        };
        if tokens == 1
            && routing_log.is_none()
            && b.route_and_run_experts(&routing, x, &router_logits, shared.as_ref(), out)?
        {
            clock.charge(times, Phase::ExpertCompute);
            return Ok(());
        }
        let routes = b.route_top_k(&router_logits, plan.per_token, self.renormalize)?;
        if let Some(log) = routing_log {
            log.extend(routes.iter().map(|r| r.iter().map(|&(e, _)| e).collect()));
        }
        self.run_routed(b, x, &routes, plan, shared.as_ref(), times, clock, out)
    }

    /// Runs the experts `routes` chose, each once on the tokens that chose it (fetching those
    /// the backend does not hold, all in flight at once), then the shared expert; for one
    /// token, `plan`'s share of the fetched ones on the host CPU.
    #[allow(clippy::too_many_arguments)]
    fn run_routed(
        &self,
        b: &B,
        x: &B::Tensor,
        routes: &[Route],
        plan: &ExpertPlan,
        shared: Option<&SharedExpert<'_, B>>,
        times: &mut PhaseTimes,
        clock: &mut Stopwatch,
        out: &mut B::Tensor,
    ) -> Result<()> {
        let tokens = b.shape(x).0;
        // Per expert: the rows (tokens) that chose it and their weights.
        let mut by_expert: BTreeMap<usize, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
        for (t, route) in routes.iter().enumerate() {
            for &(e, w) in route {
                let entry = by_expert.entry(e).or_default();
                entry.0.push(t);
                entry.1.push(w);
            }
        }
        // Experts the backend holds already (VRAM) need no fetch; the rest come from storage,
        // all in flight at once.
        let mut resident: Vec<Option<B::Expert>> = by_expert.keys().map(|&e| b.cached_expert(self.layer, e)).collect();
        let missing: Vec<usize> = by_expert
            .keys()
            .zip(&resident)
            .filter(|(_, r)| r.is_none())
            .map(|(&e, _)| e)
            .collect();
        let mut pending = self.experts.fetch(&missing)?;
        if pending.len() != missing.len() {
            return Err(Error::InvalidInput("expert fetch fell short".into()));
        }
        // The CPU takes the last of the missed experts and starts on them at once, beside the
        // device's copies of the others. It needs x in host memory, fetched before any copy
        // is queued (a download behind the copies would wait for them).
        let on_cpu = if tokens == 1 {
            plan.cpu.on_cpu(self.layer, missing.len(), || b.has_host_link())
        } else {
            0
        };
        let first_on_cpu = missing.len() - on_cpu;
        let cpu_from = missing.get(first_on_cpu).copied().unwrap_or(usize::MAX);
        let cpu_result = if on_cpu > 0 {
            let cpu_pending = pending.split_off(first_on_cpu);
            let cpu_weights = missing[first_on_cpu..]
                .iter()
                .map(|e| by_expert.get(e).map_or(0.0, |(_, w)| w[0]))
                .collect();
            Some(start_experts_on_cpu(b.download(x)?, cpu_pending, cpu_weights))
        } else {
            None
        };
        let mut pending = pending.into_iter();
        clock.charge(times, Phase::Routing);
        // Experts are used in index order, whatever order they arrive in, so the sum is the
        // same bit for bit however the bytes were fetched.
        let mut ready = Vec::with_capacity(by_expert.len());
        let mut token_weights = Vec::with_capacity(by_expert.len());
        // Several tokens: the experts at hand run together, handed over before a wait for a
        // read still in flight so that their compute overlaps it. Experts already in memory
        // join the group (a GPU copies them in while it computes the ones before), up to
        // GROUP_FETCHED_BYTES of them.
        let mut group: Vec<(B::Expert, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut group_fetched = 0;
        for ((e, (rows, weights)), resident) in by_expert.into_iter().zip(resident.iter_mut()) {
            let expert = match resident.take() {
                Some(expert) => expert,
                None if e >= cpu_from => continue,
                None => {
                    let fetched = pending
                        .next()
                        .ok_or_else(|| Error::InvalidInput("expert fetch fell short".into()))?;
                    if !group.is_empty() && (!fetched.is_ready() || group_fetched >= GROUP_FETCHED_BYTES) {
                        run_group(b, x, &mut group, out)?;
                        clock.charge(times, Phase::ExpertCompute);
                        group_fetched = 0;
                    }
                    let view = fetched.wait()?;
                    clock.charge(times, Phase::ExpertIoWait);
                    group_fetched += view.storage_bytes();
                    b.load_expert(self.layer, e, &view)?
                }
            };
            if tokens == 1 {
                // One token: all experts together once they are all here.
                ready.push(expert);
                token_weights.push(weights[0]);
            } else {
                group.push((expert, rows, weights));
            }
        }
        if !group.is_empty() {
            run_group(b, x, &mut group, out)?;
        }
        if tokens == 1 {
            let experts: Vec<&B::Expert> = ready.iter().collect();
            b.experts_ffn_one_token(x, &experts, &token_weights, shared, out)?;
        } else if let Some(shared) = shared {
            shared_expert_ffn(b, x, shared, out)?;
        }
        clock.charge(times, Phase::ExpertCompute);
        if let Some(result) = cpu_result {
            let sum = result
                .recv()
                .map_err(|_| Error::InvalidInput("the CPU's experts were lost".into()))??;
            clock.charge(times, Phase::CpuExperts);
            b.add_assign(out, &b.upload(&sum, 1, sum.len())?)?;
            clock.charge(times, Phase::ExpertCompute);
        }
        Ok(())
    }
}

/// Computes `sum_e(w_e * expert_e(x))` over `experts` on the CPU's thread pool, in their
/// order, from when their bytes arrive, while the caller goes on; the sum comes through the
/// channel.
fn start_experts_on_cpu(
    x: Vec<f32>,
    experts: Vec<PendingExpert>,
    weights: Vec<f32>,
) -> mpsc::Receiver<Result<Vec<f32>>> {
    let (done, result) = mpsc::channel();
    rayon::spawn(move || {
        let run = || -> Result<Vec<f32>> {
            let views = experts
                .into_iter()
                .map(PendingExpert::wait)
                .collect::<Result<Vec<_>>>()?;
            let x = CpuTensor::new(1, x.len(), x);
            let mut sum = CpuTensor::new(1, x.cols, vec![0.0; x.cols]);
            let refs: Vec<&ExpertView> = views.iter().collect();
            CpuBackend::new().experts_ffn_one_token(&x, &refs, &weights, None, &mut sum)?;
            Ok(sum.data)
        };
        // The receiver is gone only when the layer failed on the device side.
        let _ = done.send(run());
    });
    result
}

/// Bytes of fetched experts one group holds at most. On a GPU that does not cache them,
/// they stay in device memory until their group has run.
const GROUP_FETCHED_BYTES: usize = 512 << 20;

/// Runs (and empties) a group of experts, each on its rows of `x`, in the group's order.
fn run_group<B: Backend>(
    b: &B,
    x: &B::Tensor,
    group: &mut Vec<(B::Expert, Vec<usize>, Vec<f32>)>,
    out: &mut B::Tensor,
) -> Result<()> {
    let work: Vec<ExpertRows<'_, B::Expert>> = group
        .iter()
        .map(|(expert, rows, weights)| ExpertRows { expert, rows, weights })
        .collect();
    b.experts_ffn_rows(x, &work, out)?;
    group.clear();
    Ok(())
}

/// A dense SwiGLU MLP layer.
pub struct DenseMlp<B: Backend>(SwiGlu<B>);

impl<B: Backend> DenseMlp<B> {
    pub fn load(backend: &B, cfg: &ModelConfig, src: &dyn WeightSource, layer: usize) -> Result<Self> {
        let names = [W::MlpGateProj, W::MlpUpProj, W::MlpDownProj];
        Ok(DenseMlp(SwiGlu::load(
            backend,
            src,
            layer,
            names,
            cfg.hidden_size,
            cfg.dense_intermediate,
        )?))
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        self.0.forward(b, x)
    }
}
