//! Prefix reuse in a generation session: a request that starts from a snapshot must give
//! exactly the tokens a fresh, unchunked run gives.

use std::path::{Path, PathBuf};

use flash_moe_engine::backend::Backend;
use flash_moe_engine::backend::cpu::CpuBackend;
use flash_moe_engine::engine::sampler::SamplingParams;
use flash_moe_engine::engine::session::{Completion, FinishReason, GenerationRequest, Session};
use flash_moe_engine::engine::{generate, load_model};
use flash_moe_engine::model::Model;
use flash_moe_engine::storage::store::{ExpertStore, StoreConfig};
use flash_moe_engine::tokenizer::Tokenizer;

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-qwen35moe-4bit")
}

fn load() -> (Model<CpuBackend>, Tokenizer) {
    let dir = bundled();
    let model = load_model(&dir, CpuBackend::new(), ExpertStore::new(StoreConfig::default())).expect("model loads");
    let tokenizer = Tokenizer::from_dir(&dir, &model.config.eos_token_ids).expect("tokenizer loads");
    (model, tokenizer)
}

fn request(prompt: &[u32], checkpoints: &[usize], max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        checkpoints: checkpoints.to_vec(),
        max_tokens,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
        logprobs: None,
        prompt_logprobs: None,
    }
}

fn run(
    session: &mut Session<CpuBackend>,
    model: &Model<CpuBackend>,
    tok: &Tokenizer,
    req: &GenerationRequest,
) -> (String, Completion) {
    let mut text = String::new();
    let mut sink = |piece: &str| {
        text.push_str(piece);
        true
    };
    let done = session.generate(model, tok, req, &mut sink).expect("generation runs");
    (text, done)
}

/// The reference: one unchunked forward of the whole prompt from a fresh state.
fn reference(model: &Model<CpuBackend>, tok: &Tokenizer, prompt: &[u32], max_tokens: usize) -> String {
    let mut sampler = flash_moe_engine::engine::sampler::Sampler::new(SamplingParams::default());
    let mut text = String::new();
    generate(model, tok, prompt, max_tokens, &mut sampler, None, |t| text.push_str(t)).expect("generate runs");
    text
}

#[test]
fn snapshots_reproduce_fresh_runs() {
    let (model, tok) = load();
    let heldout = std::fs::read_to_string(bundled().join("../heldout.txt")).expect("heldout.txt");
    let ids = tok.encode(&heldout).expect("encodes");
    assert!(ids.len() > 800);
    // Longer than one prefill chunk, and a checkpoint inside it.
    let first = &ids[..700];
    let mut session = Session::new(4096, 1 << 30);
    let (text, done) = run(&mut session, &model, &tok, &request(first, &[300], 16));
    assert_eq!(done.cached_tokens, 0);
    assert_eq!(
        text,
        reference(&model, &tok, first, 16),
        "chunked prefill differs from one batch"
    );

    // The same prompt again: every token comes from the snapshot, logits included.
    let (again, done) = run(&mut session, &model, &tok, &request(first, &[], 16));
    assert_eq!(done.cached_tokens, 700);
    assert_eq!(again, text);

    // A prompt that shares the first 300 tokens, then goes elsewhere.
    let branch: Vec<u32> = ids[..300].iter().chain(&ids[750..800]).copied().collect();
    let (text, done) = run(&mut session, &model, &tok, &request(&branch, &[], 16));
    assert_eq!(done.cached_tokens, 300);
    assert_eq!(text, reference(&model, &tok, &branch, 16));

    // A prompt that extends the first one.
    let longer = &ids[..760];
    let (text, done) = run(&mut session, &model, &tok, &request(longer, &[], 16));
    assert_eq!(done.cached_tokens, 700);
    assert_eq!(text, reference(&model, &tok, longer, 16));
}

#[test]
fn budget_zero_keeps_nothing_and_context_is_enforced() {
    let (model, tok) = load();
    let ids = tok.encode("def main():\n    return 1\n").expect("encodes");
    let mut session = Session::new(ids.len() + 3, 0);
    let (_, done) = run(&mut session, &model, &tok, &request(&ids, &[], 100));
    assert_eq!(done.cached_tokens, 0);
    assert!(done.completion_tokens <= 3, "generation ran past the context");
    if done.completion_tokens == 3 {
        assert_eq!(done.finish, FinishReason::Length);
    }
    let (_, done) = run(&mut session, &model, &tok, &request(&ids, &[], 2));
    assert_eq!(done.cached_tokens, 0, "a session without a budget restored a snapshot");
    let mut sink = |_: &str| true;
    let too_long = Session::<CpuBackend>::new(ids.len(), 0).generate(&model, &tok, &request(&ids, &[], 1), &mut sink);
    assert!(too_long.is_err_and(|e| e.to_string().contains("context holds")));
}

#[test]
fn stop_strings_and_cancellation() {
    let (model, tok) = load();
    let ids = tok.encode("import os\nimport sys\n").expect("encodes");
    let mut session = Session::new(4096, 0);
    let (full, _) = run(&mut session, &model, &tok, &request(&ids, &[], 24));
    let cut = full
        .char_indices()
        .nth(5)
        .map(|(i, _)| i)
        .expect("five characters generated");
    let stop = full[cut..].chars().take(2).collect::<String>();
    let mut req = request(&ids, &[], 24);
    req.stop = vec!["no such text".to_string(), stop.clone()];
    let (text, done) = run(&mut session, &model, &tok, &req);
    assert_eq!(done.finish, FinishReason::StopString(1));
    assert_eq!(text, full[..full.find(&stop).expect("stop occurs")]);

    let mut pieces = 0;
    let mut sink = |_: &str| {
        pieces += 1;
        pieces < 3
    };
    let done = session
        .generate(&model, &tok, &request(&ids, &[], 24), &mut sink)
        .expect("runs");
    assert_eq!(done.finish, FinishReason::Cancelled);
    assert!(done.completion_tokens < 24);
}

/// A prompt prefilled a few tokens per attention pass, in one window or several, gives the
/// logits one pass gives (the same operations, summed in the same order per token, up to the
/// batched products' order).
#[test]
fn chunked_prefill_matches_one_pass() {
    let (mut model, tok) = load();
    let prompt = tok
        .encode("The quick brown fox jumps over the lazy dog, twice, and then it rested in the sun.")
        .expect("encodes");
    assert!(prompt.len() > 6, "the prompt spans several chunks");
    let last_logits = |model: &Model<CpuBackend>| {
        let mut state = model.new_state().expect("state");
        let logits = model.prefill(&prompt, &mut state).expect("prefill runs");
        model.backend().download(&logits).expect("download")
    };
    let one_pass = last_logits(&model);
    // Chunks of 5 tokens: one window, each layer's attention per chunk, its experts on the
    // whole window; chunks of 1: windows of 8 tokens one after another.
    for chunk in [5, 1] {
        model.set_prefill_chunk(chunk).expect("chunk size");
        assert!(
            prompt.len() > chunk * 2 && (chunk > 1) == (prompt.len() <= model.prefill_window()),
            "{} tokens",
            prompt.len()
        );
        let chunked = last_logits(&model);
        let diff: f32 = one_pass.iter().zip(&chunked).map(|(a, b)| (a - b).powi(2)).sum();
        let norm: f32 = one_pass.iter().map(|a| a * a).sum();
        assert!(
            (diff / norm).sqrt() < 1e-5,
            "chunk {chunk}: relative L2 {}",
            (diff / norm).sqrt()
        );
        let argmax = |v: &[f32]| flash_moe_engine::engine::sampler::argmax(v);
        assert_eq!(argmax(&one_pass), argmax(&chunked));
    }
    assert!(model.set_prefill_chunk(0).is_err());
}
