//! A long-lived generation session, as a chat or a server keeps one: each request's prompt
//! starts from the longest prefix already computed. Recurrent (linear-attention) state
//! cannot be rewound, so reuse works from snapshots of the whole sequence state (KV caches,
//! recurrent and conv state, and the logits after the last token) taken at chosen points.

use std::time::{Duration, Instant};

use super::logprobs::{TokenLogprob, token_logprob};
use super::sampler::{Sampler, SamplingParams};
use super::stop::StopMatcher;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Logits, Model, ModelState};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// One generation.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// Prompt lengths worth a snapshot for later requests (for a chat: where the conversation
    /// ends before the assistant's header). The whole prompt and the whole generated
    /// sequence are always snapshotted.
    pub checkpoints: Vec<usize>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// For each generated token, its log-probability and this many of the most likely
    /// alternatives' ([`TextSink::logprob`]); `None`: none.
    pub logprobs: Option<usize>,
    /// The same for each prompt token after the first, handed over before any generated
    /// token's. The prompt then runs from the start, every row's logits computed, without a
    /// snapshot's help.
    pub prompt_logprobs: Option<usize>,
}

/// Prompt tokens per pass when their log-probabilities are asked for: each brings its logits
/// row to the host (1 MB for Qwen3.5's vocabulary). The prompt of tests/logprobs.rs spans two.
const SCORED_ROWS_PER_PASS: usize = 64;

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model emitted an end-of-sequence token.
    Eos,
    /// A stop string was generated: the request's `stop[i]`.
    StopString(usize),
    /// `max_tokens` or the context length was reached.
    Length,
    /// The receiver went away.
    Cancelled,
}

/// What a generation did.
#[derive(Clone, Debug)]
pub struct Completion {
    pub prompt_tokens: usize,
    /// Prompt tokens restored from a snapshot instead of computed.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub finish: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Where generated text goes.
pub trait TextSink {
    /// Takes the next piece of text; false stops the generation.
    fn text(&mut self, piece: &str) -> bool;
    /// Checked between forward calls, so a long prefill stops when nobody waits for it.
    fn cancelled(&self) -> bool {
        false
    }
    /// Takes a generated token's log-probabilities, when the request asked for them, before
    /// the token's text (which may come later: text that could start a stop string or an
    /// unfinished character is held back); false stops the generation.
    fn logprob(&mut self, _logprob: TokenLogprob) -> bool {
        true
    }
}

impl<F: FnMut(&str) -> bool> TextSink for F {
    fn text(&mut self, piece: &str) -> bool {
        self(piece)
    }
}

struct Snapshot<B: Backend> {
    tokens: Vec<u32>,
    state: ModelState<B>,
    logits: Vec<f32>,
    bytes: usize,
    last_used: u64,
}

/// Snapshots kept within a byte budget, least recently used dropped first.
pub struct Session<B: Backend> {
    snapshots: Vec<Snapshot<B>>,
    budget_bytes: usize,
    max_context: usize,
    clock: u64,
}

impl<B: Backend> Session<B> {
    /// `max_context`: the longest sequence allowed; `budget_bytes`: memory for snapshots.
    pub fn new(max_context: usize, budget_bytes: usize) -> Self {
        Session {
            snapshots: Vec::new(),
            budget_bytes,
            max_context,
            clock: 0,
        }
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Forgets every snapshot.
    pub fn clear(&mut self) {
        self.snapshots.clear();
    }

    /// Runs one request, streaming its text into `sink`.
    pub fn generate(
        &mut self,
        model: &Model<B>,
        tokenizer: &Tokenizer,
        request: &GenerationRequest,
        sink: &mut dyn TextSink,
    ) -> Result<Completion> {
        let prompt = &request.prompt;
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        if prompt.len() >= self.max_context {
            return Err(Error::ContextLength {
                tokens: prompt.len(),
                limit: self.max_context,
            });
        }
        let start = Instant::now();
        let (mut state, mut logits, cached) = match request.prompt_logprobs {
            Some(_) => (model.new_state()?, Vec::new(), 0),
            None => self.restore(model, prompt)?,
        };
        let mut completion = Completion {
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
            completion_tokens: 0,
            finish: FinishReason::Cancelled,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        };
        let prefilled = match request.prompt_logprobs {
            Some(top) => score_prompt(model, prompt, top, &mut state, &mut logits, sink)?,
            None => self.prefill(model, request, cached, &mut state, &mut logits, sink)?,
        };
        if !prefilled {
            return Ok(completion);
        }
        if request.prompt_logprobs.is_some() {
            self.save(model, prompt, &state, &logits);
        }
        completion.prefill_time = start.elapsed();
        let start = Instant::now();
        let mut tokens = prompt.clone();
        let (finish, generated) = self.decode(model, tokenizer, request, &mut state, &mut logits, &mut tokens, sink)?;
        self.save(model, &tokens, &state, &logits);
        completion.finish = finish;
        completion.completion_tokens = generated;
        completion.decode_time = start.elapsed();
        Ok(completion)
    }

    /// Runs the prompt after its first `cached` tokens, a prefill window at a time (a
    /// cancelled request stops within one), snapshotting at the request's checkpoints and at
    /// its end; leaves the last row's logits in `logits`. False when the sink was cancelled.
    fn prefill(
        &mut self,
        model: &Model<B>,
        request: &GenerationRequest,
        cached: usize,
        state: &mut ModelState<B>,
        logits: &mut Vec<f32>,
        sink: &dyn TextSink,
    ) -> Result<bool> {
        let prompt = &request.prompt;
        let mut marks: Vec<usize> = request
            .checkpoints
            .iter()
            .copied()
            .filter(|&c| c > cached && c < prompt.len())
            .collect();
        marks.sort_unstable();
        marks.dedup();
        marks.push(prompt.len());
        let mut pos = cached;
        for mark in marks {
            let mut last = None;
            while pos < mark {
                if sink.cancelled() {
                    return Ok(false);
                }
                let end = (pos + model.prefill_window()).min(mark);
                last = Some(model.prefill(&prompt[pos..end], state)?);
                pos = end;
            }
            // Only the mark's logits are kept: the chunks before it need no download.
            if let Some(last) = last {
                *logits = model.backend().download(&last)?;
            }
            self.save(model, &prompt[..mark], state, logits);
        }
        Ok(true)
    }

    /// Samples until a stop, extending `tokens` (and `state`) with every token run.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        model: &Model<B>,
        tokenizer: &Tokenizer,
        request: &GenerationRequest,
        state: &mut ModelState<B>,
        logits: &mut Vec<f32>,
        tokens: &mut Vec<u32>,
        sink: &mut dyn TextSink,
    ) -> Result<(FinishReason, usize)> {
        let mut sampler = Sampler::new(request.sampling.clone());
        sampler.set_prompt(&request.prompt);
        let mut decoder = StreamDecoder::default();
        let mut stops = StopMatcher::new(&request.stop);
        let budget = request.max_tokens.min(self.max_context - request.prompt.len());
        let mut generated = 0;
        // The logits after the last token run stay on the device (the sampler makes its
        // choice there) and come back once, at the end, for the snapshot.
        let mut last: Option<B::Tensor> = None;
        let mut sample_until_stop = || -> Result<(FinishReason, usize)> {
            while generated < budget {
                let id = match &last {
                    None => sampler.sample(logits),
                    Some(device) => sampler.sample_on(model.backend(), device)?,
                };
                generated += 1;
                if tokenizer.is_eos(id) {
                    return flush(&mut stops, sink, FinishReason::Eos, generated);
                }
                if let Some(top) = request.logprobs {
                    let row = match &last {
                        None => token_logprob(logits, id, top),
                        Some(device) => token_logprob(&model.backend().download(device)?, id, top),
                    };
                    if !sink.logprob(row) {
                        return Ok((FinishReason::Cancelled, generated));
                    }
                }
                let (text, stopped) = stops.push(&decoder.push(tokenizer, id)?);
                if !text.is_empty() && !sink.text(&text) {
                    return Ok((FinishReason::Cancelled, generated));
                }
                if let Some(stop) = stopped {
                    return Ok((FinishReason::StopString(stop), generated));
                }
                if generated == budget || sink.cancelled() {
                    break;
                }
                last = Some(model.forward(&[id], state, Logits::Last)?);
                tokens.push(id);
            }
            if sink.cancelled() {
                return Ok((FinishReason::Cancelled, generated));
            }
            flush(&mut stops, sink, FinishReason::Length, generated)
        };
        let outcome = sample_until_stop();
        if let Some(device) = &last {
            *logits = model.backend().download(device)?;
        }
        outcome
    }

    /// The state after the longest snapshotted prefix of `prompt`, its logits and length.
    fn restore(&mut self, model: &Model<B>, prompt: &[u32]) -> Result<(ModelState<B>, Vec<f32>, usize)> {
        self.clock += 1;
        let best = self
            .snapshots
            .iter_mut()
            .filter(|s| s.tokens.len() <= prompt.len() && prompt.starts_with(&s.tokens))
            .max_by_key(|s| s.tokens.len());
        match best {
            Some(s) => {
                s.last_used = self.clock;
                Ok((s.state.snapshot(model.backend())?, s.logits.clone(), s.tokens.len()))
            }
            None => Ok((model.new_state()?, Vec::new(), 0)),
        }
    }

    fn save(&mut self, model: &Model<B>, tokens: &[u32], state: &ModelState<B>, logits: &[f32]) {
        self.clock += 1;
        if let Some(s) = self.snapshots.iter_mut().find(|s| s.tokens == tokens) {
            s.last_used = self.clock;
            return;
        }
        let bytes = model.state_bytes(tokens.len()) + 4 * logits.len();
        if bytes > self.budget_bytes {
            return;
        }
        while self.snapshots.iter().map(|s| s.bytes).sum::<usize>() + bytes > self.budget_bytes {
            let oldest = (0..self.snapshots.len()).min_by_key(|&i| self.snapshots[i].last_used);
            match oldest {
                Some(i) => drop(self.snapshots.swap_remove(i)),
                None => break,
            }
        }
        // A snapshot is an optimisation: when the device has no room for it, none is kept.
        let Ok(state) = state.snapshot(model.backend()) else {
            return;
        };
        self.snapshots.push(Snapshot {
            tokens: tokens.to_vec(),
            state,
            logits: logits.to_vec(),
            bytes,
            last_used: self.clock,
        });
    }
}

/// Runs `prompt` from an empty `state` with every row's logits, handing `sink` each token's
/// log-probabilities (with `top` alternatives) after the first; leaves the last row's logits in
/// `logits`. False when the sink stopped it.
fn score_prompt<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    top: usize,
    state: &mut ModelState<B>,
    logits: &mut Vec<f32>,
    sink: &mut dyn TextSink,
) -> Result<bool> {
    for (pass, ids) in prompt.chunks(SCORED_ROWS_PER_PASS).enumerate() {
        if sink.cancelled() {
            return Ok(false);
        }
        let rows = model.backend().download(&model.forward(ids, state, Logits::All)?)?;
        let vocab = rows.len() / ids.len();
        for (i, row) in rows.chunks_exact(vocab).enumerate() {
            match prompt.get(pass * SCORED_ROWS_PER_PASS + i + 1) {
                Some(&next) if !sink.logprob(token_logprob(row, next, top)) => return Ok(false),
                Some(_) => {}
                None => *logits = row.to_vec(),
            }
        }
    }
    Ok(true)
}

fn flush(
    stops: &mut StopMatcher,
    sink: &mut dyn TextSink,
    finish: FinishReason,
    generated: usize,
) -> Result<(FinishReason, usize)> {
    let rest = stops.finish();
    if !rest.is_empty() && !sink.text(&rest) {
        return Ok((FinishReason::Cancelled, generated));
    }
    Ok((finish, generated))
}
