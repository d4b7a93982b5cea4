//! How many of one token's missed experts the host CPU computes beside a GPU.
//!
//! The experts a GPU's VRAM cache missed are in host memory; the CPU can compute some of them
//! from there while the others cross the link, so that a layer waits for the slower of the two
//! instead of for every copy. `Auto` does not model either side: the CPU's cost per layer has
//! a fixed part (threads woken, one fork-join per product) and shares its memory with the
//! link's reads, and a model fitted to rates chose well on one machine and badly on the next.
//! It measures instead what each choice costs: the time from one layer's routing decision to
//! the next's, which holds this layer's experts (both sides) and the next layer's dense work.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The share of one token's routed experts that the backend does not hold which the host CPU
/// computes from their bytes in host memory while the others are copied to the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CpuShare {
    /// This share (0 to 1) of the missed experts, rounded.
    Fixed(f32),
    /// For each number of missed experts, the number of them on the CPU that gave the
    /// shortest layers so far (a few choices around the best share found tried first, the best
    /// one's neighbours tried now and then after, so that the best moves a step at a time).
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

/// [`CpuShare`] with what `Auto` has measured.
#[derive(Debug)]
pub struct CpuSplit {
    share: CpuShare,
    state: Mutex<Measured>,
}

/// The share of the missed experts around which the CPU's first choices are tried, before
/// any is measured: between the H200 machine's best (0.3-0.5 of the experts, 16 vCPUs against
/// PCIe 5) and none.
const FIRST_SHARE: f64 = 0.3;
/// A choice's first layer is left out of its time (the CPU's threads start, the expert's pages
/// are first touched); this many more make it measured.
const MEASURED_AFTER: u32 = 3;
/// Once the first choices are measured, about one decision in this many tries a neighbour of
/// the best, so that the times follow the machine (its load, the cache's hit rate) as they
/// change, and a choice not tried first gets its turn when it is next to the best.
const PROBE_ONE_IN: u64 = 8;
/// Weight of a new layer time in a measured choice's moving average.
const NEW_TIME_WEIGHT: f64 = 0.25;
/// A layer time above this many times its choice's average counts as that much (a
/// preempted thread, a page fault), so that one stall does not condemn a choice.
const OUTLIER_CAP: f64 = 3.0;
/// Per decision, how much of the past the reported share keeps.
const SHARE_MEMORY: f64 = 0.99;

#[derive(Debug)]
struct Measured {
    /// Whether the backend copies experts to memory of its own (asked once).
    has_link: Option<bool>,
    /// Indexed by the number of missed experts: what each number on the CPU cost.
    by_missed: Vec<Choices>,
    /// The last decision, whose layer time ends at the next decision of the same token.
    last: Option<Decision>,
    /// Chooses what to try: at random, so that what is tried does not follow the pattern of
    /// layer kinds (whose dense work differs), which would bias the times.
    rng: u64,
    /// Decaying sums of experts given to the CPU and of experts missed.
    given: f64,
    missed: f64,
}

#[derive(Clone, Copy, Debug)]
struct Decision {
    layer: usize,
    missed: usize,
    on_cpu: usize,
    at: Instant,
}

/// Layer times of `0..=missed` experts on the CPU.
#[derive(Debug, Default)]
struct Choices {
    /// Seconds: the mean of the first measured layers, then a moving average.
    mean: Vec<f64>,
    /// Layers seen with this choice, the left-out first one included.
    seen: Vec<u32>,
    /// The choices tried first: the best share found so far (or [`FIRST_SHARE`]) applied to
    /// this number of missed experts, and its neighbours. The best then moves a step at a
    /// time as its neighbours are tried (with a VRAM cache the number of missed experts varies
    /// from layer to layer, and trying every choice of every number would take tens of tokens).
    first: Vec<usize>,
}

impl CpuSplit {
    pub fn new(share: CpuShare) -> Self {
        CpuSplit {
            share,
            state: Mutex::new(Measured {
                has_link: None,
                by_missed: Vec::new(),
                last: None,
                rng: 0x9E37_79B9_7F4A_7C15,
                given: 0.0,
                missed: 0.0,
            }),
        }
    }

    /// The share in force: the fixed one, or the share of recently missed experts `Auto` gave
    /// the CPU (0 before any).
    pub fn share(&self) -> f32 {
        match self.share {
            CpuShare::Fixed(v) => v,
            CpuShare::Auto => {
                let s = self.lock();
                if s.missed > 0.0 {
                    (s.given / s.missed) as f32
                } else {
                    0.0
                }
            }
        }
    }

    /// How many of the `missed` experts of `layer`'s token the CPU takes. `has_link`: whether
    /// the backend copies experts into memory of its own ([`Backend::has_host_link`]), asked
    /// once; without one, `Auto` gives the CPU none.
    ///
    /// [`Backend::has_host_link`]: crate::backend::Backend::has_host_link
    pub fn on_cpu(&self, layer: usize, missed: usize, has_link: impl FnOnce() -> bool) -> usize {
        self.decide(layer, missed, has_link, Instant::now())
    }

    fn decide(&self, layer: usize, missed: usize, has_link: impl FnOnce() -> bool, now: Instant) -> usize {
        if let CpuShare::Fixed(v) = self.share {
            return ((missed as f32 * v).round() as usize).min(missed);
        }
        let mut s = self.lock();
        if let Some(last) = s.last.take()
            && layer > last.layer
        {
            s.observe(last, now.saturating_duration_since(last.at));
        }
        if missed == 0 || !*s.has_link.get_or_insert_with(has_link) {
            return 0;
        }
        let on_cpu = s.choose(missed);
        s.last = Some(Decision {
            layer,
            missed,
            on_cpu,
            at: now,
        });
        s.given = s.given * SHARE_MEMORY + on_cpu as f64;
        s.missed = s.missed * SHARE_MEMORY + missed as f64;
        on_cpu
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Measured> {
        // The state is a set of averages: one left half-updated by a panic is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Measured {
    fn choices(&mut self, missed: usize) -> &mut Choices {
        if self.by_missed.len() <= missed {
            self.by_missed.resize_with(missed + 1, Choices::default);
        }
        if self.by_missed[missed].mean.is_empty() {
            let share = self.best_share().unwrap_or(FIRST_SHARE);
            let n = ((share * missed as f64).round() as usize).min(missed);
            let first = (n.saturating_sub(1)..=(n + 1).min(missed)).collect();
            self.by_missed[missed] = Choices {
                mean: vec![0.0; missed + 1],
                seen: vec![0; missed + 1],
                first,
            };
        }
        &mut self.by_missed[missed]
    }

    /// The best choice's share of its missed experts, for the number of missed experts seen
    /// most often, once it has one.
    fn best_share(&self) -> Option<f64> {
        self.by_missed
            .iter()
            .enumerate()
            .filter_map(|(missed, c)| Some((missed, c.best()?, c.seen.iter().sum::<u32>())))
            .max_by_key(|&(_, _, seen)| seen)
            .map(|(missed, best, _)| best as f64 / missed as f64)
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: enough to keep the choices apart from the layers' pattern.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The first choices until they are measured, at random; then the best, or now and then
    /// a neighbour of it.
    fn choose(&mut self, missed: usize) -> usize {
        let r = self.random();
        let c = self.choices(missed);
        let unmeasured: Vec<usize> = c.first.iter().copied().filter(|&n| !c.measured(n)).collect();
        if let Some(&n) = unmeasured.get((r % unmeasured.len().max(1) as u64) as usize) {
            return n;
        }
        let Some(best) = c.best() else {
            return 0;
        };
        if !(r >> 32).is_multiple_of(PROBE_ONE_IN) {
            return best;
        }
        if best == 0 {
            1
        } else if best == missed || r & 1 == 0 {
            best - 1
        } else {
            best + 1
        }
    }

    fn observe(&mut self, d: Decision, elapsed: Duration) {
        let c = self.choices(d.missed);
        let n = d.on_cpu;
        c.seen[n] += 1;
        let counted = c.seen[n] - 1;
        if counted == 0 {
            return;
        }
        let t = elapsed.as_secs_f64();
        let mean = &mut c.mean[n];
        if counted <= MEASURED_AFTER {
            *mean += (t - *mean) / f64::from(counted);
        } else {
            *mean += (t.min(OUTLIER_CAP * *mean) - *mean) * NEW_TIME_WEIGHT;
        }
    }
}

impl Choices {
    fn measured(&self, n: usize) -> bool {
        self.seen[n] > MEASURED_AFTER
    }

    /// The measured choice with the shortest layers (the fewer experts on the CPU on a tie).
    fn best(&self) -> Option<usize> {
        (0..self.mean.len())
            .filter(|&n| self.measured(n))
            .min_by(|&a, &b| self.mean[a].total_cmp(&self.mean[b]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINK: fn() -> bool = || true;

    #[test]
    fn shares_parse_and_round() {
        assert_eq!("auto".parse(), Ok(CpuShare::Auto));
        assert_eq!("0.3".parse(), Ok(CpuShare::Fixed(0.3)));
        assert!("1.5".parse::<CpuShare>().is_err());
        assert!("half".parse::<CpuShare>().is_err());
        let fixed = CpuSplit::new(CpuShare::Fixed(0.3));
        assert_eq!([1, 2, 4, 10].map(|m| fixed.on_cpu(0, m, LINK)), [0, 1, 1, 3]);
        assert_eq!(CpuSplit::new(CpuShare::Fixed(1.0)).on_cpu(0, 7, || false), 7);
        assert_eq!(fixed.share(), 0.3);
    }

    #[test]
    fn auto_gives_nothing_without_a_link_and_asks_once() {
        let split = CpuSplit::new(CpuShare::Auto);
        assert_eq!(split.on_cpu(0, 0, || panic!("asked with nothing missed")), 0);
        assert_eq!(split.on_cpu(0, 10, || false), 0);
        assert!((1..100).all(|layer| split.on_cpu(layer, 10, || panic!("asked twice")) == 0));
        assert_eq!(split.share(), 0.0);
    }

    /// Layer time of `n` of `missed` experts on the CPU: the CPU pays a fixed cost and its
    /// rate, the link its rate; the next layer's dense work is longer after every fourth
    /// layer, and every time carries up to ±`noise` of jitter.
    struct Machine {
        cpu_fixed: f64,
        cpu_per_expert: f64,
        link_per_expert: f64,
        noise: f64,
    }

    /// A machine whose costs are in microseconds, with ±30% jitter.
    fn machine(cpu_fixed: u32, cpu_per_expert: u32, link_per_expert: u32) -> Machine {
        Machine {
            cpu_fixed: f64::from(cpu_fixed) * 1e-6,
            cpu_per_expert: f64::from(cpu_per_expert) * 1e-6,
            link_per_expert: f64::from(link_per_expert) * 1e-6,
            noise: 0.3,
        }
    }

    impl Machine {
        fn with_noise(self, noise: f64) -> Machine {
            Machine { noise, ..self }
        }

        fn layer_time(&self, layer: usize, missed: usize, n: usize, jitter: f64) -> Duration {
            let cpu = if n == 0 {
                0.0
            } else {
                self.cpu_fixed + self.cpu_per_expert * n as f64
            };
            let link = self.link_per_expert * (missed - n) as f64;
            let dense = if layer % 4 == 3 { 150e-6 } else { 80e-6 };
            Duration::from_secs_f64((cpu.max(link) + dense) * (1.0 + self.noise * jitter))
        }

        fn best(&self, missed: usize) -> usize {
            (0..=missed)
                .min_by(|&a, &b| {
                    self.layer_time(0, missed, a, 0.0)
                        .cmp(&self.layer_time(0, missed, b, 0.0))
                })
                .unwrap_or(0)
        }
    }

    /// Decodes `tokens` tokens of 60 layers, each missing `missed` experts; returns the
    /// choices of the last `last` tokens and the clock.
    fn decode(
        split: &CpuSplit,
        machine: &Machine,
        missed: usize,
        tokens: usize,
        last: usize,
        clock: &mut Instant,
    ) -> Vec<usize> {
        let mut jitter = 0x1234_5678_u64;
        let mut chosen = Vec::new();
        for token in 0..tokens {
            for layer in 0..60 {
                let n = split.decide(layer, missed, LINK, *clock);
                jitter = jitter
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = (jitter >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                *clock += machine.layer_time(layer, missed, n, unit);
                if token + last >= tokens {
                    chosen.push(n);
                }
            }
            // lm_head, sampling: not part of any layer's time.
            *clock += Duration::from_millis(3);
        }
        chosen
    }

    fn most_common(chosen: &[usize]) -> (usize, f64) {
        let top = (0..=chosen.iter().copied().max().unwrap_or(0))
            .max_by_key(|&n| chosen.iter().filter(|&&c| c == n).count())
            .unwrap_or(0);
        let count = chosen.iter().filter(|&&c| c == top).count();
        (top, count as f64 / chosen.len() as f64)
    }

    #[test]
    fn auto_settles_on_the_fastest_split() {
        // K=10: a balanced split at 4 experts on the CPU.
        let ten = machine(200, 150, 130);
        // K=4 with a large fixed cost: the CPU should get none.
        let four_slow_cpu = machine(600, 150, 130);
        // K=4 with a cheap start: two experts on the CPU.
        let four_fast_cpu = machine(50, 120, 130);
        // K=10 over a slow link (PCIe 4 beside a fast CPU): far from the first choices.
        let slow_link = machine(50, 60, 280);
        let cases = [
            (ten, 10, 4),
            (four_slow_cpu, 4, 0),
            (four_fast_cpu, 4, 2),
            (slow_link, 10, 8),
        ];
        for (machine, missed, expected) in cases {
            assert_eq!(machine.best(missed), expected, "the test machine's own optimum");
            let split = CpuSplit::new(CpuShare::Auto);
            let chosen = decode(&split, &machine, missed, 40, 20, &mut Instant::now());
            let (top, _) = most_common(&chosen);
            assert_eq!(top, expected, "K={missed}: {chosen:?}");
            // Near-ties may alternate; what counts is the time they cost.
            let best = machine.layer_time(0, missed, expected, 0.0).as_secs_f64();
            let spent: f64 = chosen
                .iter()
                .map(|&n| machine.layer_time(0, missed, n, 0.0).as_secs_f64())
                .sum();
            let excess = spent / (best * chosen.len() as f64) - 1.0;
            assert!(
                excess < 0.05,
                "K={missed}: {:.1}% slower than the best split",
                100.0 * excess
            );
            let share = f64::from(split.share());
            assert!((share - expected as f64 / missed as f64).abs() < 0.1, "share {share}");
        }
    }

    #[test]
    fn auto_learns_every_number_of_missed_experts_quickly() {
        // A VRAM cache that holds about a quarter of what is routed: 10 minus the hits missed.
        let machine = machine(200, 150, 130);
        let split = CpuSplit::new(CpuShare::Auto);
        let mut clock = Instant::now();
        let mut draw = 0x9876_5432_u64;
        let (mut spent, mut oracle) = (0.0, 0.0);
        for token in 0..12 {
            for layer in 0..60 {
                draw = draw.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let hits = (0..10).filter(|i| (draw >> (20 + 4 * i)) & 3 == 0).count();
                let missed = 10 - hits;
                let n = split.decide(layer, missed, LINK, clock);
                let t = machine.layer_time(layer, missed, n, 0.3 * ((draw >> 8) as u8 as f64 / 127.5 - 1.0));
                clock += t;
                if token >= 6 {
                    spent += machine.layer_time(layer, missed, n, 0.0).as_secs_f64();
                    oracle += machine
                        .layer_time(layer, missed, machine.best(missed), 0.0)
                        .as_secs_f64();
                }
            }
            clock += Duration::from_millis(3);
        }
        assert!(
            spent < 1.05 * oracle,
            "tokens 7-12 took {spent:.5} s against {oracle:.5} s at the best splits"
        );
    }

    #[test]
    fn auto_follows_a_cpu_that_slows_down() {
        let mut machine = machine(200, 150, 130).with_noise(0.05);
        let split = CpuSplit::new(CpuShare::Auto);
        let mut clock = Instant::now();
        let (before, _) = most_common(&decode(&split, &machine, 10, 20, 5, &mut clock));
        assert_eq!(before, 4);
        // The host gets busy: its experts take three times as long.
        machine.cpu_fixed *= 3.0;
        machine.cpu_per_expert *= 3.0;
        let after = machine.best(10);
        assert!(after < before);
        // Within ten tokens.
        let (top, fraction) = most_common(&decode(&split, &machine, 10, 10, 5, &mut clock));
        assert_eq!(top, after);
        assert!(fraction > 0.8, "{fraction}");
    }

    #[test]
    fn auto_times_only_a_token_s_next_layer() {
        let split = CpuSplit::new(CpuShare::Auto);
        let start = Instant::now();
        let n = split.decide(59, 4, LINK, start);
        // The next token's first layer, a second later: not this choice's time.
        split.decide(0, 4, LINK, start + Duration::from_secs(1));
        let s = split.lock();
        assert_eq!(s.by_missed[4].seen[n], 0, "a token boundary counted as a layer");
        assert!(s.by_missed[4].mean.iter().all(|&t| t == 0.0));
    }
}
