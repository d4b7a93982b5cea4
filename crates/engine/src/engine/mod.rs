//! Sequences and generation loops on top of a loaded model.

pub mod bench_io;
pub mod eval;
pub mod inventory;
pub mod logprobs;
pub mod sampler;
pub mod session;
pub mod stop;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, ExpertCacheStats};
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::profile::Profile;
use crate::model::weights::WeightSource;
use crate::model::{Logits, Model};
use crate::storage::layout::CheckpointWeights;
use crate::storage::store::{ExpertIo, ExpertStore, IoStats, IoTotals, StoreConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use sampler::Sampler;

/// Loads the model in `dir` (config.json plus safetensors weights) onto `backend`.
/// Routed experts are fetched through `store`.
pub fn load_model<B: Backend>(dir: &Path, backend: B, store: Arc<ExpertStore>) -> Result<Model<B>> {
    let config = ModelConfig::from_dir(dir)?;
    let weights = CheckpointWeights::open(dir, &config, store)?;
    Model::load(backend, config, &weights)
}

/// Loads the model in `dir` on the CPU while recording what it is made of.
pub fn inspect_model(dir: &Path) -> Result<(ModelConfig, String, inventory::Inventory)> {
    let config = ModelConfig::from_dir(dir)?;
    let store = ExpertStore::new(StoreConfig {
        io: ExpertIo::Mmap,
        ..StoreConfig::default()
    });
    let weights = CheckpointWeights::open(dir, &config, store)?;
    let recorder = inventory::Recorder::new(&weights, &config);
    Model::load(crate::backend::cpu::CpuBackend::new(), config.clone(), &recorder)?;
    let inventory = recorder.into_inventory();
    Ok((config, weights.describe(), inventory))
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model emitted an end-of-sequence token.
    Eos,
    /// `max_tokens` were generated.
    Length,
}

/// What a generation run did and how long it took.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub stop: StopReason,
    /// Time per layer and phase, for the prompt and for the tokens after it.
    pub prefill_profile: Profile,
    pub decode_profile: Profile,
    /// Expert I/O for the prompt and for the tokens after it (zero without a store).
    pub prefill_io: IoTotals,
    pub decode_io: IoTotals,
    /// The backend's own expert cache (VRAM), for the prompt and the tokens after it.
    pub prefill_vram: Option<ExpertCacheStats>,
    pub decode_vram: Option<ExpertCacheStats>,
}

impl GenerationStats {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode rate over the tokens after the first (the first comes from prefill logits).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Prefills `prompt` ([`Model::prefill`]: layer by layer in windows), then samples up to
/// `max_tokens` tokens one at a time, handing each completed piece of text to `on_text`. `io`
/// is the expert store's counters, split into prefill and decode in the result.
pub fn generate<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    io: Option<&IoStats>,
    mut on_text: impl FnMut(&str),
) -> Result<GenerationStats> {
    let io_now = || io.map(IoStats::totals).unwrap_or_default();
    let io_start = io_now();
    let vram_start = model.backend().expert_cache_stats();
    let mut state = model.new_state()?;
    let start = Instant::now();
    let logits = model.backend().download(&model.prefill(prompt, &mut state)?)?;
    let prefill_time = start.elapsed();
    let prefill_profile = state.profile.clone();
    let io_prefilled = io_now();
    let vram_prefilled = model.backend().expert_cache_stats();
    let start = Instant::now();
    let mut decoder = StreamDecoder::default();
    let mut generated = 0;
    let mut stop = StopReason::Length;
    // Logits after the first token stay on the device, where the sampler makes its choice
    // (Sampler::sample_on).
    let mut last = None;
    while generated < max_tokens {
        let id = match &last {
            None => sampler.sample(&logits),
            Some(device) => sampler.sample_on(model.backend(), device)?,
        };
        generated += 1;
        if tokenizer.is_eos(id) {
            stop = StopReason::Eos;
            break;
        }
        on_text(&decoder.push(tokenizer, id)?);
        if generated == max_tokens {
            break;
        }
        last = Some(model.forward(&[id], &mut state, Logits::Last)?);
    }
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generated,
        prefill_time,
        decode_time: start.elapsed(),
        stop,
        decode_profile: state.profile.since(&prefill_profile),
        prefill_profile,
        prefill_io: io_prefilled.since(&io_start),
        decode_io: io_now().since(&io_prefilled),
        prefill_vram: vram_prefilled.zip(vram_start).map(|(a, b)| a.since(&b)),
        decode_vram: model
            .backend()
            .expert_cache_stats()
            .zip(vram_prefilled)
            .map(|(a, b)| a.since(&b)),
    })
}
