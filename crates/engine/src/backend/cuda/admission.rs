//! How often each expert was used lately, for the VRAM cache's admission rule: a missed
//! expert takes the place of the coldest resident one only when it was used more often.
//!
//! A token visits the layers in order, so with more misses per token than the cache holds,
//! plain least-recently-used eviction drops every expert before its layer comes round again
//! and keeps nothing useful (measured: no hits at K=10 with room for 434 of the 600 experts a
//! token misses). With the rule the cache settles on the experts used most; under uniform
//! routing it keeps its share of them, and under skewed routing the popular ones.

use std::collections::HashMap;

/// Uses since the last halving, per key seen, after which every count is halved, so that
/// old popularity fades and the cache follows a change of topic.
const AGING_FACTOR: u64 = 8;

/// Use counts of (layer, expert) keys, halved now and then.
#[derive(Default)]
pub(super) struct Frequencies {
    counts: HashMap<(usize, usize), u32>,
    since_aging: u64,
}

impl Frequencies {
    /// Counts a use of `key`.
    pub(super) fn record(&mut self, key: (usize, usize)) {
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

    pub(super) fn count(&self, key: (usize, usize)) -> u32 {
        self.counts.get(&key).copied().unwrap_or(0)
    }

    /// Whether `candidate` may take `victim`'s place: only when it was used more often.
    pub(super) fn admits(&self, candidate: (usize, usize), victim: (usize, usize)) -> bool {
        self.count(candidate) > self.count(victim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_needs_more_uses_than_its_victim() {
        let mut f = Frequencies::default();
        f.record((0, 1));
        f.record((0, 2));
        assert!(!f.admits((0, 1), (0, 2)), "a tie keeps the resident");
        f.record((0, 1));
        assert!(f.admits((0, 1), (0, 2)));
        assert!(!f.admits((0, 2), (0, 1)));
        assert!(f.admits((0, 1), (5, 5)), "an expert never used is the coldest");
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
}
