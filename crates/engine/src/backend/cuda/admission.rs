//! When the VRAM cache takes in a missed expert once it is full.
//!
//! A token visits the layers in order, and an expert can be hit again only when its layer
//! comes round on a later token. While the cache holds more than a round's (a cycle's)
//! misses, least-recently-used eviction keeps what was used in the last rounds, and real
//! routing rewards that (the original engine measured 8-34% of a layer's experts reused by
//! the next token). When it holds fewer, LRU evicts every expert before its layer comes round
//! again and keeps nothing useful (measured: no hits at K=10 with room for 434 of the 600
//! experts a token misses). Then, and only then, a missed expert takes the place of the
//! coldest resident one only if it was used more often lately, and the cache settles on the
//! experts used most. `tools/cache_policy_sim.py` compares the rules on synthetic traces.

use std::collections::HashMap;

/// Uses since the last halving, per key seen, after which every count is halved, so that
/// old popularity fades and the cache follows a change of topic.
const AGING_FACTOR: u64 = 8;

/// Weight of the last cycle in the running mean of misses per cycle: a prompt's prefill
/// misses most experts of every layer in one cycle, and the mean should be back at the
/// decode's level within about ten tokens.
const CYCLE_WEIGHT: f64 = 0.25;

/// Use counts of (layer, expert) keys, halved now and then.
#[derive(Default)]
struct Frequencies {
    counts: HashMap<(usize, usize), u32>,
    since_aging: u64,
}

impl Frequencies {
    fn record(&mut self, key: (usize, usize)) {
        let count = self.counts.entry(key).or_default();
        *count = count.saturating_add(1);
        self.since_aging += 1;
        if self.since_aging >= AGING_FACTOR * self.counts.len() as u64 {
            self.since_aging = 0;
            self.counts.retain(|_, c| {
                *c /= 2;
                *c > 0
            });
        }
    }

    fn count(&self, key: (usize, usize)) -> u32 {
        self.counts.get(&key).copied().unwrap_or(0)
    }
}

/// What the admission rule tracks: every lookup, and the misses of each cycle of the layers.
#[derive(Default)]
pub(super) struct Admission {
    uses: Frequencies,
    last_layer: Option<usize>,
    cycle_misses: u64,
    /// Running mean of misses per cycle; `None` before the first cycle ends.
    misses_per_cycle: Option<f64>,
}

impl Admission {
    /// Counts a lookup of expert `index` of `layer`, a hit or a miss. A layer below the last
    /// one looked up starts a new cycle.
    pub(super) fn record(&mut self, layer: usize, index: usize, hit: bool) {
        if self.last_layer.is_some_and(|last| layer < last) {
            let misses = self.cycle_misses as f64;
            self.misses_per_cycle = Some(match self.misses_per_cycle {
                Some(mean) => mean + CYCLE_WEIGHT * (misses - mean),
                None => misses,
            });
            self.cycle_misses = 0;
        }
        self.last_layer = Some(layer);
        self.cycle_misses += u64::from(!hit);
        self.uses.record((layer, index));
    }

    /// Whether the rule applies: a cycle's misses, at `expert_bytes` each, exceed `budget`.
    pub(super) fn filters(&self, expert_bytes: u64, budget: u64) -> bool {
        self.misses_per_cycle
            .is_some_and(|m| m * expert_bytes as f64 > budget as f64)
    }

    /// Whether `candidate` may take `victim`'s place: only when it was used more often.
    pub(super) fn admits(&self, candidate: (usize, usize), victim: (usize, usize)) -> bool {
        self.uses.count(candidate) > self.uses.count(victim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_needs_more_uses_than_its_victim() {
        let mut a = Admission::default();
        a.record(0, 1, false);
        a.record(0, 2, true);
        assert!(!a.admits((0, 1), (0, 2)), "a tie keeps the resident");
        a.record(0, 1, false);
        assert!(a.admits((0, 1), (0, 2)));
        assert!(!a.admits((0, 2), (0, 1)));
        assert!(a.admits((0, 1), (5, 5)), "an expert never used is the coldest");
    }

    #[test]
    fn counts_are_halved_after_enough_uses_and_forgotten_at_zero() {
        let mut f = Frequencies::default();
        for _ in 0..6 {
            f.record((1, 1));
        }
        f.record((1, 2));
        // With two keys seen, the counts are halved at the 16th use since the last halving.
        for _ in 0..8 {
            f.record((1, 1));
        }
        assert_eq!(f.count((1, 1)), 14);
        f.record((1, 1));
        assert_eq!(f.count((1, 1)), 7, "halved at the 16th use");
        assert_eq!(f.count((1, 2)), 0, "a count of one halves to nothing");
        assert!(!f.counts.contains_key(&(1, 2)), "and the key is forgotten");
    }

    /// One token over `layers` layers, each missing `misses` experts and hitting one.
    fn token(a: &mut Admission, layers: usize, misses: usize) {
        for layer in 0..layers {
            for e in 0..misses {
                a.record(layer, e, false);
            }
            a.record(layer, 100, true);
        }
    }

    #[test]
    fn the_rule_applies_only_while_a_cycle_misses_more_than_the_cache_holds() {
        let mut a = Admission::default();
        token(&mut a, 4, 5);
        assert!(!a.filters(1, 10), "no cycle has ended yet");
        token(&mut a, 4, 5);
        // 20 misses per cycle of 1-byte experts.
        assert!(a.filters(1, 19));
        assert!(!a.filters(1, 20));
        // Cycles of 4 misses pull the mean down by a quarter of the gap each.
        token(&mut a, 4, 1);
        assert!(a.filters(1, 19), "the second cycle had 20 misses too");
        token(&mut a, 4, 1);
        assert!(!a.filters(1, 19) && a.filters(1, 15), "a quarter of the way to 4: 16");
        for _ in 0..20 {
            token(&mut a, 4, 1);
        }
        assert!(!a.filters(1, 5) && a.filters(1, 3), "the mean follows the cycles");
    }

    #[test]
    fn a_prefill_cycle_weighs_on_the_mean_for_a_few_tokens_only() {
        // 180 misses per decode cycle, 30,000 in the prefill's, a cache of 540 experts: the
        // rule applies for ten tokens after the prompt, not for good.
        let mut a = Admission::default();
        token(&mut a, 60, 3);
        token(&mut a, 60, 500);
        for _ in 0..6 {
            token(&mut a, 60, 3);
        }
        assert!(a.filters(1, 540));
        for _ in 0..6 {
            token(&mut a, 60, 3);
        }
        assert!(!a.filters(1, 540));
    }
}
