//! A generation's log-probabilities (`GenerationRequest::logprobs`): the first token's against
//! the log-softmax of mlx-lm's logits for the prompt (tests/fixtures, tools/make_fixtures.py),
//! the next ones against the log-softmax of the model's logits for the prompt and the tokens
//! before them, run afresh (a prompt pass, where generation ran one-token steps: the last digits
//! differ). The prompt's own (`prompt_logprobs`) against mlx-lm's logits at every position.

use std::path::{Path, PathBuf};

use flash_moe_engine::backend::Backend;
use flash_moe_engine::backend::cpu::CpuBackend;
use flash_moe_engine::engine::load_model;
use flash_moe_engine::engine::logprobs::TokenLogprob;
use flash_moe_engine::engine::sampler::SamplingParams;
use flash_moe_engine::engine::session::{GenerationRequest, Session, TextSink};
use flash_moe_engine::model::Model;
use flash_moe_engine::storage::npy;
use flash_moe_engine::storage::store::{ExpertStore, StoreConfig};
use flash_moe_engine::tokenizer::Tokenizer;

const TOP: usize = 5;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mlx-qwen35-4bit")
}

#[derive(Default)]
struct Recorder {
    logprobs: Vec<TokenLogprob>,
}

impl TextSink for Recorder {
    fn text(&mut self, _piece: &str) -> bool {
        true
    }

    fn logprob(&mut self, logprob: TokenLogprob) -> bool {
        self.logprobs.push(logprob);
        true
    }
}

/// Log-softmax in f64, computed here from the logits alone.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let norm = f64::from(max)
        + row
            .iter()
            .map(|&x| (f64::from(x) - f64::from(max)).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&x| f64::from(x) - norm).collect()
}

/// `got` holds `token`'s value and the `TOP` largest of `expected`, in order.
fn check(got: &TokenLogprob, expected: &[f64], tolerance: f64, what: &str) {
    let close = |a: f32, b: f64| (f64::from(a) - b).abs() < tolerance;
    assert!(
        close(got.logprob, expected[got.token as usize]),
        "{what}: token {} at {} against {}",
        got.token,
        got.logprob,
        expected[got.token as usize]
    );
    let mut order: Vec<usize> = (0..expected.len()).collect();
    order.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]));
    assert_eq!(got.top.len(), TOP, "{what}");
    for (rank, (&(id, lp), &want)) in got.top.iter().zip(&order).enumerate() {
        assert_eq!(id as usize, want, "{what}: rank {rank}");
        assert!(
            close(lp, expected[want]),
            "{what}: rank {rank}, {lp} against {}",
            expected[want]
        );
    }
}

fn last_logits(model: &Model<CpuBackend>, tokens: &[u32]) -> Vec<f32> {
    let mut state = model.new_state().expect("state");
    let last = model.prefill(tokens, &mut state).expect("runs");
    model.backend().download(&last).expect("downloads")
}

/// The fixture model, its tokenizer, the reference's token ids and prompt length, and mlx-lm's
/// logits (`[ids, vocab]`) with the vocabulary's size.
struct Fixture {
    model: Model<CpuBackend>,
    tokenizer: Tokenizer,
    ids: Vec<u32>,
    prefill: usize,
    reference: Vec<f32>,
    vocab: usize,
}

fn load() -> Fixture {
    let dir = fixture();
    let model = load_model(&dir, CpuBackend::new(), ExpertStore::new(StoreConfig::default())).expect("model loads");
    let tokenizer = Tokenizer::from_dir(&dir, &model.config.eos_token_ids).expect("tokenizer loads");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
            .expect("valid JSON");
    let ids = meta["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect();
    let prefill = meta["prefill"].as_u64().expect("prefill") as usize;
    let (shape, reference) = npy::read_f32(&dir.join("reference-full.npy")).expect("reference logits");
    Fixture {
        model,
        tokenizer,
        ids,
        prefill,
        reference,
        vocab: shape[1],
    }
}

fn generate(
    f: &Fixture,
    prompt: &[u32],
    max_tokens: usize,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
) -> (Recorder, usize) {
    let request = GenerationRequest {
        prompt: prompt.to_vec(),
        checkpoints: Vec::new(),
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop: Vec::new(),
        logprobs,
        prompt_logprobs,
    };
    let mut sink = Recorder::default();
    let done = Session::new(4096, 0)
        .generate(&f.model, &f.tokenizer, &request, &mut sink)
        .expect("generates");
    (sink, done.completion_tokens)
}

#[test]
fn prompt_logprobs_match_the_reference() {
    let f = load();
    let (sink, generated) = generate(&f, &f.ids, 0, None, Some(TOP));
    assert_eq!(generated, 0);
    assert_eq!(
        sink.logprobs.len(),
        f.ids.len() - 1,
        "one entry per prompt token after the first"
    );
    for (p, got) in sink.logprobs.iter().enumerate() {
        assert_eq!(got.token, f.ids[p + 1]);
        let row = &f.reference[p * f.vocab..(p + 1) * f.vocab];
        check(got, &log_softmax(row), 1e-3, &format!("prompt token {}", p + 1));
    }
}

#[test]
fn logprobs_match_the_reference_and_a_fresh_run() {
    let f = load();
    let (model, prompt, vocab) = (&f.model, &f.ids[..f.prefill], f.vocab);
    let (sink, generated) = generate(&f, prompt, 3, Some(TOP), None);
    assert_eq!(sink.logprobs.len(), generated, "one entry per token");
    assert!(sink.logprobs.len() >= 2, "the fixture model ended too soon");

    let first = &f.reference[(prompt.len() - 1) * vocab..prompt.len() * vocab];
    check(
        &sink.logprobs[0],
        &log_softmax(first),
        1e-3,
        "first token against mlx-lm",
    );
    let mut tokens = prompt.to_vec();
    for (step, got) in sink.logprobs.iter().enumerate().skip(1) {
        tokens.push(sink.logprobs[step - 1].token);
        let fresh = log_softmax(&last_logits(model, &tokens));
        check(got, &fresh, 1e-3, &format!("token {step} against a fresh run"));
        assert_eq!(got.token, got.top[0].0, "greedy: the most likely token");
    }
}
