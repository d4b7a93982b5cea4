//! The feed-forward blocks: a sparse mixture of experts (router softmax, top-k, SwiGLU
//! experts, a shared expert scaled by `sigmoid(shared_expert_gate)`) and a dense SwiGLU MLP.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use super::config::ModelConfig;
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

/// The share of one token's routed experts that the backend does not hold (a GPU's VRAM
/// cache missed them) which the host CPU computes from their bytes in host memory while the
/// others are copied to the device: the two run at once, so that a token waits for the
/// slower of them instead of for every copy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CpuShare {
    /// This share (0 to 1) of the missed experts, rounded.
    Fixed(f32),
    /// The share at which both sides take as long: the CPU's measured rate over the sum of
    /// it and the link's (none where the backend computes in host memory).
    Auto,
}

impl std::str::FromStr for CpuShare {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            return Ok(CpuShare::Auto);
        }
        match s.parse::<f32>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(CpuShare::Fixed(v)),
            _ => Err(format!("`{s}` is not auto or a share between 0 and 1")),
        }
    }
}

/// [`CpuShare`] with what `Auto` measures.
#[derive(Debug)]
pub struct CpuSplit {
    share: CpuShare,
    /// The backend's host-to-device bytes per second, asked for the first time `Auto` has
    /// missed experts to split (a backend that holds every expert never measures it).
    link_rate: OnceLock<Option<f64>>,
    /// The CPU's bytes of experts per second (f64 bits): a moving average over the layers it
    /// computed; 0 until the first counted one, the guess standing in for it.
    cpu_rate: AtomicU64,
    /// Layers the CPU computed experts for.
    samples: AtomicU64,
    /// Layers with missed experts of which `Auto` gave the CPU none.
    skipped: AtomicU64,
}

/// Before measuring, `Auto` takes the CPU for this fraction of the link.
const FIRST_GUESS: f64 = 0.5;
/// Every so many layers that `Auto` gave the CPU none of their missed experts, it gives it
/// one, to measure the CPU again: an estimate that fell too low would otherwise stay there.
const REMEASURE_EVERY: u64 = 32;
/// `Auto` splits a layer's missed experts only from this many: below, the CPU's fixed costs
/// (x brought to the host, its threads started) outweigh the copy of one or two experts.
const AUTO_MIN_MISSED: usize = 4;

impl CpuSplit {
    pub fn new(share: CpuShare) -> Self {
        CpuSplit {
            share,
            link_rate: OnceLock::new(),
            cpu_rate: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// The share in force now (for `Auto`, 0 until it has had experts to split).
    pub fn share(&self) -> f32 {
        match (self.share, self.link_rate.get().copied().flatten()) {
            (CpuShare::Fixed(v), _) => v,
            (CpuShare::Auto, Some(link)) => {
                let cpu = self.cpu_rate(link);
                (cpu / (cpu + link)) as f32
            }
            (CpuShare::Auto, None) => 0.0,
        }
    }

    /// The CPU's measured rate, or before any, the guess.
    fn cpu_rate(&self, link: f64) -> f64 {
        match f64::from_bits(self.cpu_rate.load(Ordering::Relaxed)) {
            0.0 => FIRST_GUESS * link,
            measured => measured,
        }
    }

    /// How many of `missed` experts the CPU takes; `link_rate` is the backend's
    /// ([`Backend::host_link_rate`]), asked once.
    fn on_cpu(&self, missed: usize, link_rate: impl FnOnce() -> Option<f64>) -> usize {
        let auto = self.share == CpuShare::Auto;
        if auto && (missed < AUTO_MIN_MISSED || self.link_rate.get_or_init(link_rate).is_none()) {
            return 0;
        }
        let n = ((missed as f32 * self.share()).round() as usize).min(missed);
        if auto && n == 0 && self.skipped.fetch_add(1, Ordering::Relaxed) % REMEASURE_EVERY == REMEASURE_EVERY - 1 {
            return 1;
        }
        n
    }

    /// Counts `bytes` of experts the CPU computed in `elapsed`. The first layer's time is
    /// left out: it pays for starting the CPU's threads.
    fn record(&self, bytes: usize, elapsed: Duration) {
        let Some(link) = self.link_rate.get().copied().flatten() else {
            return;
        };
        if self.samples.fetch_add(1, Ordering::Relaxed) == 0 {
            return;
        }
        let rate = bytes as f64 / elapsed.as_secs_f64().max(1e-9);
        let old = self.cpu_rate(link);
        self.cpu_rate
            .store((0.9 * old + 0.1 * rate).to_bits(), Ordering::Relaxed);
    }
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
            plan.cpu.on_cpu(missing.len(), || b.host_link_rate())
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
            let done = result
                .recv()
                .map_err(|_| Error::InvalidInput("the CPU's experts were lost".into()))??;
            plan.cpu.record(done.bytes, done.compute);
            clock.charge(times, Phase::CpuExperts);
            b.add_assign(out, &b.upload(&done.sum, 1, done.sum.len())?)?;
            clock.charge(times, Phase::ExpertCompute);
        }
        Ok(())
    }
}

/// What the CPU's share of a token's experts came to.
struct CpuExperts {
    /// `sum_e(w_e * expert_e(x))`.
    sum: Vec<f32>,
    /// The experts' bytes, and the time their arithmetic took (not the wait for them).
    bytes: usize,
    compute: Duration,
}

/// Computes `sum_e(w_e * expert_e(x))` over `experts` on the CPU's thread pool, in their
/// order, from when their bytes arrive, while the caller goes on; the result comes through
/// the channel.
fn start_experts_on_cpu(
    x: Vec<f32>,
    experts: Vec<PendingExpert>,
    weights: Vec<f32>,
) -> mpsc::Receiver<Result<CpuExperts>> {
    let (done, result) = mpsc::channel();
    rayon::spawn(move || {
        let run = || -> Result<CpuExperts> {
            let views = experts
                .into_iter()
                .map(PendingExpert::wait)
                .collect::<Result<Vec<_>>>()?;
            let started = Instant::now();
            let x = CpuTensor::new(1, x.len(), x);
            let mut sum = CpuTensor::new(1, x.cols, vec![0.0; x.cols]);
            let refs: Vec<&ExpertView> = views.iter().collect();
            CpuBackend::new().experts_ffn_one_token(&x, &refs, &weights, None, &mut sum)?;
            Ok(CpuExperts {
                sum: sum.data,
                bytes: views.iter().map(ExpertView::storage_bytes).sum(),
                compute: started.elapsed(),
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    const LINK: fn() -> Option<f64> = || Some(60e9);

    #[test]
    fn shares_parse_and_round() {
        assert_eq!("auto".parse(), Ok(CpuShare::Auto));
        assert_eq!("0.3".parse(), Ok(CpuShare::Fixed(0.3)));
        assert!("1.5".parse::<CpuShare>().is_err());
        assert!("half".parse::<CpuShare>().is_err());
        let fixed = CpuSplit::new(CpuShare::Fixed(0.3));
        assert_eq!([1, 2, 4, 10].map(|m| fixed.on_cpu(m, LINK)), [0, 1, 1, 3]);
        assert_eq!(CpuSplit::new(CpuShare::Fixed(1.0)).on_cpu(7, || None), 7);
    }

    #[test]
    fn auto_balances_the_cpu_against_the_link() {
        assert_eq!(
            CpuSplit::new(CpuShare::Auto).on_cpu(10, || None),
            0,
            "no link: no split"
        );
        let split = CpuSplit::new(CpuShare::Auto);
        assert_eq!(split.share(), 0.0, "nothing split yet");
        assert_eq!(split.on_cpu(3, || panic!("asked for too few missed experts")), 0);
        assert_eq!(split.on_cpu(10, LINK), 3);
        assert!(
            (split.share() - 1.0 / 3.0).abs() < 1e-6,
            "first guess: half the link's rate"
        );
        split.record(1, Duration::from_secs(1));
        assert!((split.share() - 1.0 / 3.0).abs() < 1e-6, "the first layer is left out");
        // 10 GB/s measured: the average moves a tenth of the way.
        split.record(10_000_000, Duration::from_millis(1));
        let cpu = 0.9 * 30e9 + 0.1 * 10e9;
        assert!((f64::from(split.share()) - cpu / (cpu + 60e9)).abs() < 1e-6);
        assert_eq!(split.on_cpu(10, || panic!("asked twice")), 3);
        assert_eq!(split.on_cpu(3, LINK), 0, "too few missed experts to split");
    }

    #[test]
    fn auto_measures_again_after_giving_the_cpu_nothing() {
        let split = CpuSplit::new(CpuShare::Auto);
        assert_eq!(split.on_cpu(4, LINK), 1);
        for _ in 0..40 {
            split.record(1, Duration::from_secs(1));
        }
        assert!(split.share() < 0.05);
        let given: Vec<usize> = (0..64).map(|_| split.on_cpu(4, LINK)).collect();
        assert_eq!(given.iter().filter(|&&n| n == 1).count(), 2, "{given:?}");
        assert!(given.iter().all(|&n| n <= 1));
        let fixed = CpuSplit::new(CpuShare::Fixed(0.0));
        assert!((0..64).all(|_| fixed.on_cpu(4, LINK) == 0), "a fixed share is kept");
    }
}
