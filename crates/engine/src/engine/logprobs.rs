//! Log-probabilities of generated tokens, as OpenAI's `logprobs` reports them: the model's own
//! distribution (the raw logits' log-softmax, before temperature and penalties), the chosen
//! token's value and the most likely alternatives.

use std::cmp::Ordering;

use rayon::prelude::*;

/// The log-probability of a generated token and of the most likely tokens at its place.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens, most likely first (ties: the lower id first).
    pub top: Vec<(u32, f32)>,
}

/// The most alternatives a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Logits per parallel task: a vocabulary of 248,320 is 16 tasks. The tasks' results are
/// joined in order, so the answer does not depend on how the threads shared the work.
const CHUNK: usize = 16_384;

/// `token`'s log-probability under `logits` and the `top` most likely tokens'. NaN logits
/// count as impossible. Parallel over the vocabulary: one pass for the largest, one for the
/// sum of exponentials, each task keeping its own most likely (a vocabulary-sized row took
/// about 4 ms on one thread, as long as a GPU's decode step).
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits
        .par_chunks(CHUNK)
        .map(|c| c.iter().copied().map(valid).fold(f32::NEG_INFINITY, f32::max))
        .reduce(|| f32::NEG_INFINITY, f32::max);
    // Sums in f64: 248,320 terms of f32 exponentials lose digits the answer needs.
    let sums: Vec<f64> = logits
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&x| (f64::from(valid(x)) - f64::from(max)).exp()).sum())
        .collect();
    let norm = f64::from(max) + sums.iter().sum::<f64>().ln();
    let logprob = |id: u32| match logits.get(id as usize) {
        Some(&x) => (f64::from(valid(x)) - norm) as f32,
        None => f32::NEG_INFINITY,
    };
    let mut best: Vec<u32> = logits
        .par_chunks(CHUNK)
        .enumerate()
        .flat_map_iter(|(i, c)| most_likely(c, (i * CHUNK) as u32, top))
        .collect();
    best.sort_unstable_by(|&a, &b| by_likelihood(logits, a, b));
    best.truncate(top);
    TokenLogprob {
        token,
        logprob: logprob(token),
        top: best.into_iter().map(|id| (id, logprob(id))).collect(),
    }
}

fn valid(x: f32) -> f32 {
    if x.is_nan() { f32::NEG_INFINITY } else { x }
}

/// More likely first; of equally likely, the lower id.
fn by_likelihood(logits: &[f32], a: u32, b: u32) -> Ordering {
    valid(logits[b as usize])
        .total_cmp(&valid(logits[a as usize]))
        .then(a.cmp(&b))
}

/// The ids (from `first`) of the `top` most likely of `chunk`, in one pass that keeps them
/// sorted: most logits fall below the last kept and cost one comparison.
fn most_likely(chunk: &[f32], first: u32, top: usize) -> Vec<u32> {
    let mut kept: Vec<(f32, u32)> = Vec::with_capacity(top + 1);
    for (i, &x) in chunk.iter().enumerate() {
        let x = valid(x);
        if kept.len() == top && kept.last().is_none_or(|&(low, _)| x <= low) {
            continue;
        }
        // Ids grow through the chunk: an equal logit goes after those kept (lower ids).
        let at = kept.partition_point(|&(k, _)| k >= x);
        kept.insert(at, (x, first + i as u32));
        kept.truncate(top);
    }
    kept.into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_the_most_likely() {
        let logits = [1.0f32, 3.0, f32::NAN, 3.0, -2.0, 0.5];
        let lp = token_logprob(&logits, 4, 3);
        let norm = logits
            .iter()
            .filter(|x| !x.is_nan())
            .map(|&x| f64::from(x).exp())
            .sum::<f64>()
            .ln();
        assert!((f64::from(lp.logprob) - (-2.0 - norm)).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [1, 3, 0], "most likely first, ties by id");
        assert!((f64::from(lp.top[2].1) - (1.0 - norm)).abs() < 1e-6);
        let probability: f64 = logits
            .iter()
            .enumerate()
            .map(|(i, _)| f64::from(token_logprob(&logits, i as u32, 0).logprob).exp())
            .sum();
        assert!((probability - 1.0).abs() < 1e-6, "probabilities sum to {probability}");
        assert_eq!(
            token_logprob(&logits, 2, 0).logprob,
            f32::NEG_INFINITY,
            "NaN: impossible"
        );
        assert_eq!(
            token_logprob(&logits, 1, 10).top.len(),
            6,
            "no more than the vocabulary"
        );
    }

    #[test]
    fn a_peaked_vocabulary_sized_row() {
        let mut logits = vec![-10.0f32; 248_320];
        logits[77] = 20.0;
        let lp = token_logprob(&logits, 77, 1);
        // log(1 / (1 + (n - 1) e^-30)) ~ -(n - 1) e^-30: f32 sums would round it to 0.
        let expected = -((248_320.0 - 1.0) * (-30.0f64).exp());
        assert!((f64::from(lp.logprob) - expected).abs() < 1e-9, "{}", lp.logprob);
        assert_eq!(lp.top, vec![(77, lp.logprob)]);
    }

    #[test]
    fn the_most_likely_across_tasks_as_a_full_sort_ranks_them() {
        // Values from a small set: many ties, across task boundaries.
        let logits: Vec<f32> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 27) as f32 * 0.5)
            .collect();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| by_likelihood(&logits, a, b));
        for top in [0, 1, 7, 20] {
            let got: Vec<u32> = token_logprob(&logits, 3, top).top.iter().map(|&(id, _)| id).collect();
            assert_eq!(got, order[..top], "top {top}");
        }
    }
}
