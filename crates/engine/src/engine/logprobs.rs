//! Log-probabilities of generated tokens, as OpenAI's `logprobs` reports them: the model's own
//! distribution (the raw logits' log-softmax, before temperature and penalties), the chosen
//! token's value and the most likely alternatives.

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

/// `token`'s log-probability under `logits` and the `top` most likely tokens'. NaN logits
/// count as impossible.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let valid = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let max = logits.iter().copied().map(valid).fold(f32::NEG_INFINITY, f32::max);
    // Sums in f64: 248,320 terms of f32 exponentials lose digits the answer needs.
    let sum: f64 = logits
        .iter()
        .map(|&x| (f64::from(valid(x)) - f64::from(max)).exp())
        .sum();
    let norm = f64::from(max) + sum.ln();
    let logprob = |id: u32| match logits.get(id as usize) {
        Some(&x) => (f64::from(valid(x)) - norm) as f32,
        None => f32::NEG_INFINITY,
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_likelihood = |a: &u32, b: &u32| {
        valid(logits[*b as usize])
            .total_cmp(&valid(logits[*a as usize]))
            .then(a.cmp(b))
    };
    let top = top.min(order.len());
    if top > 0 && top < order.len() {
        order.select_nth_unstable_by(top - 1, by_likelihood);
    }
    order.truncate(top);
    order.sort_unstable_by(by_likelihood);
    TokenLogprob {
        token,
        logprob: logprob(token),
        top: order.into_iter().map(|id| (id, logprob(id))).collect(),
    }
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
}
