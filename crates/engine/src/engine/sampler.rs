//! Next-token choice: greedy, or temperature sampling with top-k and top-p filtering.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. `temperature == 0` means greedy.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.params.top_k > 0 {
            order.truncate(self.params.top_k);
        }
        let max = logits[order[0]];
        let weights: Vec<f32> = order
            .iter()
            .map(|&i| ((logits[i] - max) / self.params.temperature).exp())
            .collect();
        let total: f32 = weights.iter().sum();
        // Smallest prefix whose probability reaches top_p.
        let mut keep = weights.len();
        let mut cumulative = 0.0;
        for (i, w) in weights.iter().enumerate() {
            cumulative += w / total;
            if cumulative >= self.params.top_p {
                keep = i + 1;
                break;
            }
        }
        let kept_total: f32 = weights[..keep].iter().sum();
        let mut target = self.rng.random::<f32>() * kept_total;
        for (i, w) in weights[..keep].iter().enumerate() {
            target -= w;
            if target <= 0.0 {
                return order[i] as u32;
            }
        }
        order[keep - 1] as u32
    }
}

/// Index of the largest value; the first one on ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(Sampler::new(params).sample(&[0.1, 3.0, 2.0]), 1);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let logits = [0.0f32; 50];
        let a: Vec<u32> = (0..5)
            .scan(Sampler::new(params.clone()), |s, _| Some(s.sample(&logits)))
            .collect();
        let b: Vec<u32> = (0..5)
            .scan(Sampler::new(params), |s, _| Some(s.sample(&logits)))
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn top_p_drops_the_tail() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        // Token 2 holds ~84% of the mass, so a top_p of 0.5 keeps only it.
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 1.0, 3.0]), 2);
        }
    }
}
