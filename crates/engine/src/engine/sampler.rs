//! Next-token choice: penalties on tokens already seen, then greedy or temperature sampling
//! with top-k, top-p and min-p filtering.

use std::collections::HashMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use crate::backend::argmax;
use crate::backend::{Backend, LogitPenalty, draw_order, keep_top_k};
use crate::error::{Error, Result};

/// Sampling settings. `temperature == 0` means greedy.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// Drops tokens whose probability is below `min_p` times the most likely one's (0: off).
    pub min_p: f32,
    pub seed: u64,
    /// OpenAI's: subtracted once from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted per occurrence among the tokens generated so far.
    pub frequency_penalty: f32,
    /// Hugging Face's (1 = off): logits of tokens in the prompt or output are divided by it
    /// when positive and multiplied by it when negative.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// The defaults a model's authors recommend, from `generation_config.json` (`do_sample`,
    /// `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`) over `fallback`.
    /// A missing file gives `fallback`.
    pub fn from_generation_config(dir: &Path, fallback: SamplingParams) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(fallback);
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|error| Error::Json {
            path: path.clone(),
            error,
        })?;
        let float = |key: &str| v.get(key).and_then(serde_json::Value::as_f64).map(|x| x as f32);
        let mut p = fallback;
        if let Some(t) = float("temperature") {
            p.temperature = t;
        }
        if v.get("do_sample").and_then(serde_json::Value::as_bool) == Some(false) {
            p.temperature = 0.0;
        }
        p.top_p = float("top_p").unwrap_or(p.top_p);
        p.min_p = float("min_p").unwrap_or(p.min_p);
        p.repetition_penalty = float("repetition_penalty").unwrap_or(p.repetition_penalty);
        if let Some(k) = v.get("top_k").and_then(serde_json::Value::as_u64) {
            p.top_k = k as usize;
        }
        Ok(p)
    }

    fn penalizes(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }
}

/// Below this log-probability ratio to the best token a candidate cannot matter
/// (e^-30 ≈ 1e-13), so sampling never sorts the whole vocabulary.
const NEGLIGIBLE: f32 = 30.0;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each generated token (for presence and frequency penalties).
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            generated: HashMap::new(),
            prompt: Vec::new(),
        }
    }

    /// Tells the sampler the prompt, for the repetition penalty.
    pub fn set_prompt(&mut self, prompt: &[u32]) {
        if self.params.repetition_penalty != 1.0 {
            self.prompt = prompt.to_vec();
            self.prompt.sort_unstable();
            self.prompt.dedup();
        }
    }

    /// Picks the next token from `logits` and remembers it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let id = if self.params.penalizes() {
            let mut adjusted = logits.to_vec();
            self.apply_penalties(&mut adjusted);
            self.choose(&adjusted)
        } else {
            self.choose(logits)
        };
        *self.generated.entry(id).or_default() += 1;
        id
    }

    /// Picks the next token from logits still on `backend`, as [`Sampler::sample`] would from
    /// their download. Little comes back: penalties are applied there to a copy
    /// ([`Backend::penalized_last_row`]), a greedy choice is made there
    /// ([`Backend::argmax_last_row`]), a temperature draw among the candidates the backend
    /// finds ([`Backend::draw_candidates`]).
    pub fn sample_on<B: Backend>(&mut self, backend: &B, logits: &B::Tensor) -> Result<u32> {
        let penalized = match self.params.penalizes() {
            false => None,
            true => match backend.penalized_last_row(logits, &self.penalties())? {
                Some(row) => Some(row),
                None => return Ok(self.sample(&backend.download(logits)?)),
            },
        };
        let row = penalized.as_ref().unwrap_or(logits);
        let p = &self.params;
        let (greedy, span) = (p.temperature <= 0.0 || p.top_k == 1, NEGLIGIBLE * p.temperature);
        let chosen = match greedy {
            true => Some(backend.argmax_last_row(row)?),
            false => backend
                .draw_candidates(row, span, p.top_k)?
                .map(|c| self.choose_among(c)),
        };
        match chosen {
            Some(id) => {
                *self.generated.entry(id).or_default() += 1;
                Ok(id)
            }
            // From the logits as they came: `sample` applies the penalties itself.
            None => Ok(self.sample(&backend.download(logits)?)),
        }
    }

    /// The penalty on each token seen so far: the repetition penalty on the prompt's and the
    /// output's (once on a token of both, as transformers applies it), presence and frequency
    /// on the output's.
    fn penalties(&self) -> Vec<LogitPenalty> {
        let p = &self.params;
        let seen = |token| LogitPenalty {
            token,
            repetition: p.repetition_penalty,
            minus: 0.0,
        };
        // The prompt's tokens are sorted and unique (set_prompt), and may be many: no map.
        let mut list: Vec<LogitPenalty> = self.prompt.iter().map(|&token| seen(token)).collect();
        for (&token, &count) in &self.generated {
            let minus = p.presence_penalty + p.frequency_penalty * count as f32;
            match self.prompt.binary_search(&token) {
                Ok(i) => list[i].minus = minus,
                Err(_) => list.push(LogitPenalty { minus, ..seen(token) }),
            }
        }
        list
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        for penalty in self.penalties() {
            if let Some(l) = logits.get_mut(penalty.token as usize) {
                *l = penalty.apply(*l);
            }
        }
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let floor = logits[argmax(logits) as usize] - NEGLIGIBLE * p.temperature;
        let candidates = (0..logits.len())
            .filter(|&i| logits[i] >= floor)
            .map(|i| (i as u32, logits[i]))
            .collect();
        self.choose_among(candidates)
    }

    /// The temperature draw among `candidates`, (token, logit) in any order: every logit
    /// within `NEGLIGIBLE * temperature` of the largest, or with top-k, at least the top k of
    /// those. Ranked by [`draw_order`], so the top k and the draw are the same whichever side
    /// of the device found the candidates, in whatever order.
    fn choose_among(&mut self, mut order: Vec<(u32, f32)>) -> u32 {
        let p = &self.params;
        keep_top_k(&mut order, p.top_k);
        order.sort_by(draw_order);
        // No candidate: every logit is NaN; greedy takes token 0 then too.
        let Some(&(_, max)) = order.first() else {
            return 0;
        };
        let weights: Vec<f32> = order.iter().map(|&(_, l)| ((l - max) / p.temperature).exp()).collect();
        let total: f32 = weights.iter().sum();
        // min-p: the best token has weight 1, so the cut is on the weight itself.
        let mut keep = weights.iter().take_while(|&&w| w >= p.min_p).count().max(1);
        // top-p: the smallest prefix whose probability reaches it.
        let mut cumulative = 0.0;
        for (i, w) in weights[..keep].iter().enumerate() {
            cumulative += w / total;
            if cumulative >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        let kept_total: f32 = weights[..keep].iter().sum();
        let mut target = self.rng.random::<f32>() * kept_total;
        for (i, w) in weights[..keep].iter().enumerate() {
            target -= w;
            if target <= 0.0 {
                return order[i].0;
            }
        }
        order[keep - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params);
        (0..n).map(|_| s.sample(logits)).collect()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn a_draw_does_not_depend_on_the_order_of_its_candidates() {
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 5,
            top_p: 0.9,
            seed: 7,
            ..Default::default()
        };
        // Ten tokens tie for the top, so top-k 5 keeps the five lowest: 0, 4, 8, 12, 16.
        let candidates: Vec<(u32, f32)> = (0..40).map(|i| (i, [2.0, 1.0, 1.0, 0.5][i as usize % 4])).collect();
        let draws = |order: Vec<(u32, f32)>| {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.choose_among(order.clone())).collect::<Vec<u32>>()
        };
        let want = draws(candidates.clone());
        assert!(want.iter().all(|id| [0, 4, 8, 12, 16].contains(id)), "{want:?}");
        let mut reversed = candidates.clone();
        reversed.reverse();
        let mut rotated = candidates;
        rotated.rotate_left(13);
        assert_eq!(draws(reversed), want);
        assert_eq!(draws(rotated), want);
    }

    #[test]
    fn sampling_on_a_backend_is_sampling_its_logits() {
        let cpu = crate::backend::cpu::CpuBackend::new();
        // Two rows: the choice is made on the last one.
        let logits = [5.0, 0.0, 0.0, 0.1, 3.0, 2.0];
        let tensor = cpu.upload(&logits, 2, 3).unwrap();
        let mut greedy = Sampler::new(SamplingParams::default());
        assert_eq!(greedy.sample_on(&cpu, &tensor).unwrap(), 1);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        };
        let (mut on, mut off) = (Sampler::new(params.clone()), Sampler::new(params));
        let row = [0.1, 0.3, 0.2];
        let tensor = cpu.upload(&row, 1, 3).unwrap();
        for _ in 0..20 {
            assert_eq!(on.sample_on(&cpu, &tensor).unwrap(), off.sample(&row));
        }
    }

    #[test]
    fn argmax_is_the_first_largest_anywhere() {
        let naive = |v: &[f32]| (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32;
        // Maximum in the first chunk, a middle chunk, the remainder; ties; NaNs; all equal.
        let mut cases: Vec<Vec<f32>> = vec![vec![], vec![1.0], vec![2.0; 37]];
        for at in [0usize, 5, 16, 17, 300, 331, 332] {
            let mut v: Vec<f32> = (0..333).map(|i| ((i * 7919) % 101) as f32 * 0.01).collect();
            v[at] = 5.0;
            cases.push(v.clone());
            v[at / 2 + 1] = 5.0;
            cases.push(v.clone());
            v[at / 3] = f32::NAN;
            cases.push(v);
        }
        for v in &cases {
            let expected = if v.first().is_some_and(|x| x.is_nan()) {
                None
            } else {
                Some(naive(v))
            };
            if let Some(expected) = expected {
                assert_eq!(argmax(v), expected, "{v:?}");
            }
        }
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
        let a = sampled(params.clone(), &logits, 5);
        assert_eq!(a, sampled(params, &logits, 5));
        assert!(
            a.iter().any(|&t| t != a[0]),
            "uniform logits gave one token five times: {a:?}"
        );
    }

    #[test]
    fn top_p_drops_the_tail() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
            ..Default::default()
        };
        // Token 2 holds ~84% of the mass, so a top_p of 0.5 keeps only it.
        assert!(sampled(params, &[0.0, 1.0, 3.0], 20).iter().all(|&t| t == 2));
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            min_p: 0.2,
            seed: 5,
            ..Default::default()
        };
        // exp(-2) = 0.135 < 0.2: token 0 goes; exp(-1) = 0.37 stays.
        let picks = sampled(params, &[0.0, 1.0, 2.0], 200);
        assert!(!picks.contains(&0));
        assert!(picks.contains(&1) && picks.contains(&2));
    }

    #[test]
    fn penalties_steer_away_from_repeats() {
        // Greedy with a frequency penalty alternates between two near-equal tokens.
        let params = SamplingParams {
            frequency_penalty: 1.0,
            ..Default::default()
        };
        assert_eq!(sampled(params, &[1.0, 0.5, -5.0], 4), vec![0, 1, 0, 1]);
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        s.set_prompt(&[0]);
        // Token 0 (in the prompt) drops from 1.0 to 0.5, below token 1's 0.8.
        assert_eq!(s.sample(&[1.0, 0.8]), 1);
        // A token of both the prompt and the output is penalized once: 3.0 -> 1.5, still
        // above 1.0 (twice, 0.75, it would lose).
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        s.set_prompt(&[0]);
        assert_eq!(s.sample(&[3.0, 1.0]), 0);
        assert_eq!(s.sample(&[3.0, 1.0]), 0);
    }
}
