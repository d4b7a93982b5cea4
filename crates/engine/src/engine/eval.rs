//! Measuring a model on text: perplexity, agreement with a reference model (mean KL
//! divergence of the next-token distributions, top-1 agreement), and what real routing looks
//! like over time (expert reuse between consecutive tokens, LRU hit rates).
//!
//! The text is cut into non-overlapping windows of `window` tokens, each run from a fresh
//! state as one batch; every token but a window's first is predicted.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Logits, Model};

/// What `evaluate` measured.
#[derive(Clone, Debug, Default)]
pub struct EvalReport {
    pub windows: usize,
    pub predictions: usize,
    /// Sum of the negative log-likelihoods of the predicted tokens (nats).
    pub nll: f64,
    /// Sum of KL(reference || model) over predictions (nats), when a reference is given.
    pub kl: f64,
    /// Predictions where the model's and the reference's most likely tokens agree.
    pub top1_agree: usize,
    pub has_reference: bool,
}

impl EvalReport {
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.predictions.max(1) as f64).exp()
    }

    pub fn mean_kl(&self) -> f64 {
        self.kl / self.predictions.max(1) as f64
    }

    pub fn top1_agreement(&self) -> f64 {
        self.top1_agree as f64 / self.predictions.max(1) as f64
    }
}

/// Log-softmax of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    row.iter().map(|&v| v as f64 - log_sum).collect()
}

fn argmax(row: &[f64]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

/// All-position logits of one window, `[window, vocab]`.
fn window_logits<B: Backend>(model: &Model<B>, ids: &[u32]) -> Result<Vec<f32>> {
    let mut state = model.new_state()?;
    model.backend().download(&model.forward(ids, &mut state, Logits::All)?)
}

/// Perplexity of `model` on `ids`, and agreement with `reference` when given.
pub fn evaluate<B: Backend, R: Backend>(
    model: &Model<B>,
    reference: Option<&Model<R>>,
    ids: &[u32],
    window: usize,
) -> Result<EvalReport> {
    if window < 2 || ids.len() < window {
        return Err(Error::InvalidInput(format!(
            "the text has {} tokens; it needs at least one window of {window} (and windows need 2 tokens)",
            ids.len()
        )));
    }
    let vocab = model.config.vocab_size;
    if let Some(r) = reference
        && r.config.vocab_size != vocab
    {
        return Err(Error::InvalidInput(format!(
            "the reference has a vocabulary of {}, the model {vocab}",
            r.config.vocab_size
        )));
    }
    let mut report = EvalReport {
        has_reference: reference.is_some(),
        ..EvalReport::default()
    };
    for chunk in ids.chunks_exact(window) {
        let logits = window_logits(model, chunk)?;
        let reference_logits = reference.map(|r| window_logits(r, chunk)).transpose()?;
        for t in 0..window - 1 {
            let lp = log_softmax(&logits[t * vocab..(t + 1) * vocab]);
            report.nll -= lp[chunk[t + 1] as usize];
            if let Some(rl) = &reference_logits {
                let rp = log_softmax(&rl[t * vocab..(t + 1) * vocab]);
                report.kl += rp.iter().zip(&lp).map(|(r, m)| r.exp() * (r - m)).sum::<f64>();
                report.top1_agree += usize::from(argmax(&rp) == argmax(&lp));
            }
            report.predictions += 1;
        }
        report.windows += 1;
    }
    Ok(report)
}

/// Locality of routing in one layer.
#[derive(Clone, Debug)]
pub struct LayerRouting {
    pub layer: usize,
    /// Mean share of a token's experts that the previous token also used.
    pub reuse: f64,
    /// Hit rate of an LRU cache of `capacity` experts of this layer, per capacity asked.
    pub lru_hits: Vec<(usize, f64)>,
    /// Share of all routings each expert received, highest first (load balance).
    pub busiest_share: f64,
}

/// Routing statistics of `model` over `ids`, token by token in text order.
pub fn routing_stats<B: Backend>(
    model: &Model<B>,
    ids: &[u32],
    window: usize,
    capacities: &[usize],
) -> Result<Vec<LayerRouting>> {
    let layers = model.config.num_layers();
    let mut sequence: Vec<Vec<Vec<usize>>> = vec![Vec::new(); layers];
    for chunk in ids.chunks(window.max(1)) {
        let mut state = model.new_state()?;
        state.routing = Some(vec![Vec::new(); layers]);
        model.forward(chunk, &mut state, Logits::Last)?;
        for (all, window_routes) in sequence.iter_mut().zip(state.routing.take().unwrap_or_default()) {
            all.extend(window_routes);
        }
    }
    let experts = model.config.moe.num_experts;
    Ok(sequence
        .iter()
        .enumerate()
        .filter(|(_, tokens)| !tokens.is_empty())
        .map(|(layer, tokens)| {
            let reuse = tokens
                .windows(2)
                .map(|w| w[1].iter().filter(|e| w[0].contains(e)).count() as f64 / w[1].len().max(1) as f64)
                .sum::<f64>()
                / (tokens.len().saturating_sub(1)).max(1) as f64;
            let lru_hits = capacities.iter().map(|&c| (c, lru_hit_rate(tokens, c))).collect();
            let mut counts = vec![0usize; experts];
            tokens.iter().flatten().for_each(|&e| counts[e] += 1);
            let total: usize = counts.iter().sum();
            let busiest_share = counts.iter().copied().max().unwrap_or(0) as f64 / total.max(1) as f64;
            LayerRouting {
                layer,
                reuse,
                lru_hits,
                busiest_share,
            }
        })
        .collect())
}

/// Hit rate of an LRU of `capacity` experts over a layer's routing sequence.
fn lru_hit_rate(tokens: &[Vec<usize>], capacity: usize) -> f64 {
    if capacity == 0 {
        return 0.0;
    }
    let mut recent: Vec<usize> = Vec::with_capacity(capacity + 1);
    let (mut hits, mut total) = (0usize, 0usize);
    for experts in tokens {
        for &e in experts {
            total += 1;
            if let Some(pos) = recent.iter().position(|&x| x == e) {
                hits += 1;
                recent.remove(pos);
            } else if recent.len() == capacity {
                recent.remove(0);
            }
            recent.push(e);
        }
    }
    hits as f64 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_counts_hits_and_evicts_the_oldest() {
        let seq = vec![vec![1, 2], vec![2, 3], vec![1, 3]];
        // Capacity 2: 1 2 | 2(hit) 3 -> [2,3] | 1 (miss, evicts 2) 3 (hit).
        assert!((lru_hit_rate(&seq, 2) - 2.0 / 6.0).abs() < 1e-12);
        assert!((lru_hit_rate(&seq, 3) - 3.0 / 6.0).abs() < 1e-12);
        assert_eq!(lru_hit_rate(&seq, 0), 0.0);
    }

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        assert!((lp.iter().map(|v| v.exp()).sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(argmax(&lp), 2);
    }
}
