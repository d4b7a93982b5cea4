//! Where the time of a forward pass goes, per layer and phase. Collected as the work
//! happens; front ends decide whether and how to print it.

use std::time::{Duration, Instant};

/// The phases a forward pass is split into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Attention,
    LinearAttention,
    /// Router logits and top-k.
    Routing,
    /// Waiting for routed experts to arrive from storage.
    ExpertIoWait,
    /// Routed and shared expert arithmetic.
    ExpertCompute,
    /// Waiting for the routed experts the host CPU computes beside a GPU ([`CpuShare`]), past
    /// the device's work queued meanwhile.
    ///
    /// [`CpuShare`]: super::moe::CpuShare
    CpuExperts,
    LmHead,
    /// Embedding, norms, residual additions.
    Other,
    /// Launching a layer step recorded earlier (a CUDA graph): every phase of it at once.
    Replayed,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Attention,
        Phase::LinearAttention,
        Phase::Routing,
        Phase::ExpertIoWait,
        Phase::ExpertCompute,
        Phase::CpuExperts,
        Phase::LmHead,
        Phase::Other,
        Phase::Replayed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Phase::Attention => "attention",
            Phase::LinearAttention => "linear attn",
            Phase::Routing => "routing",
            Phase::ExpertIoWait => "expert I/O wait",
            Phase::ExpertCompute => "expert compute",
            Phase::CpuExperts => "CPU experts",
            Phase::LmHead => "lm_head",
            Phase::Other => "other",
            Phase::Replayed => "replayed",
        }
    }
}

/// Accumulated time per phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseTimes([Duration; Phase::ALL.len()]);

impl PhaseTimes {
    pub fn get(&self, phase: Phase) -> Duration {
        self.0[phase as usize]
    }

    pub fn add(&mut self, phase: Phase, d: Duration) {
        self.0[phase as usize] += d;
    }

    pub fn total(&self) -> Duration {
        self.0.iter().sum()
    }

    pub fn merge(&mut self, other: &PhaseTimes) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// `self - earlier`, phase by phase.
    pub fn since(&self, earlier: &PhaseTimes) -> PhaseTimes {
        let mut out = *self;
        for (a, b) in out.0.iter_mut().zip(earlier.0) {
            *a = a.saturating_sub(b);
        }
        out
    }
}

/// Per-layer phase times, plus the work outside the layers (embedding, final norm, lm_head).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub layers: Vec<PhaseTimes>,
    pub outside_layers: PhaseTimes,
    /// Forward calls and tokens they processed.
    pub calls: u64,
    pub tokens: u64,
}

impl Profile {
    pub fn new(layers: usize) -> Self {
        Profile {
            layers: vec![PhaseTimes::default(); layers],
            ..Default::default()
        }
    }

    /// What happened after the snapshot `earlier` of the same profile.
    pub fn since(&self, earlier: &Profile) -> Profile {
        Profile {
            layers: self
                .layers
                .iter()
                .zip(&earlier.layers)
                .map(|(a, b)| a.since(b))
                .collect(),
            outside_layers: self.outside_layers.since(&earlier.outside_layers),
            calls: self.calls - earlier.calls,
            tokens: self.tokens - earlier.tokens,
        }
    }

    /// Everything, summed over layers.
    pub fn total(&self) -> PhaseTimes {
        let mut t = self.outside_layers;
        for l in &self.layers {
            t.merge(l);
        }
        t
    }
}

/// Charges the time since the last mark to a phase.
pub struct Stopwatch(Instant);

impl Stopwatch {
    pub fn start() -> Self {
        Stopwatch(Instant::now())
    }

    pub fn charge(&mut self, times: &mut PhaseTimes, phase: Phase) {
        let now = Instant::now();
        times.add(phase, now - self.0);
        self.0 = now;
    }
}
