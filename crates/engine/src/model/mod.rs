//! The model definition: configuration, the architecture as a sequence of layer kinds, and
//! the forward pass, written once against [`crate::backend::Backend`]. Knows nothing of files
//! or devices.

pub mod attention;
pub mod config;
mod cpu_share;
pub mod linear_attention;
pub mod moe;
mod prefill;
pub mod presets;
pub mod profile;
pub mod weights;

use attention::{GatedAttention, KvCache};
use config::{FfnKind, LayerKind, ModelConfig};
pub use cpu_share::{CpuShare, CpuSplit};
use linear_attention::{DeltaState, GatedDeltaNet};
pub use moe::ExpertPlan;
use moe::{DenseMlp, SparseMoe};
use profile::{Phase, PhaseTimes, Profile, Stopwatch};
use weights::{LayerWeight, Weight, WeightSource};

use crate::backend::{Backend, StepKey};
use crate::error::{Error, Result};

enum Mixer<B: Backend> {
    Attention(GatedAttention<B>),
    Linear(GatedDeltaNet<B>),
}

enum Ffn<B: Backend> {
    Moe(SparseMoe<B>),
    Dense(DenseMlp<B>),
}

/// The part of a one-token layer step the backend records and replays.
enum RecordedPart {
    None,
    Layer(StepKey),
    Ffn(StepKey),
}

struct DecoderLayer<B: Backend> {
    input_norm: B::Tensor,
    post_attention_norm: B::Tensor,
    mixer: Mixer<B>,
    ffn: Ffn<B>,
}

/// Per-layer state of one sequence.
pub enum LayerState<B: Backend> {
    Attention(KvCache<B>),
    Linear(DeltaState<B>),
}

impl<B: Backend> LayerState<B> {
    fn snapshot(&self, b: &B) -> Result<Self> {
        Ok(match self {
            LayerState::Attention(c) => LayerState::Attention(c.snapshot(b)?),
            LayerState::Linear(s) => LayerState::Linear(s.snapshot(b)?),
        })
    }
}

/// Everything a sequence carries between calls: caches, recurrent state and position.
pub struct ModelState<B: Backend> {
    /// Tokens processed so far; the next token sits at this position.
    pub position: usize,
    layers: Vec<LayerState<B>>,
    /// Time spent per layer and phase, over every call on this state.
    pub profile: Profile,
    /// When set, the experts each token was routed to, per layer (empty for dense layers).
    pub routing: Option<Vec<Vec<Vec<usize>>>>,
}

impl<B: Backend> ModelState<B> {
    /// A copy of the sequence on the device, to continue from later.
    pub fn snapshot(&self, b: &B) -> Result<Self> {
        Ok(ModelState {
            position: self.position,
            layers: self.layers.iter().map(|l| l.snapshot(b)).collect::<Result<_>>()?,
            profile: self.profile.clone(),
            routing: self.routing.clone(),
        })
    }
}

/// Which rows of logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// One row per input token.
    All,
    /// Only the row of the last input token (generation).
    Last,
}

/// A layer, its index, its state, its profile times and its routing log ([`Model::forward`]).
type LayerWith<'a, B> = (
    usize,
    &'a DecoderLayer<B>,
    &'a mut LayerState<B>,
    &'a mut PhaseTimes,
    Option<&'a mut Vec<Vec<usize>>>,
);

/// A loaded model on backend `B`.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    backend: B,
    embed: B::Matrix,
    lm_head: B::Matrix,
    final_norm: B::Tensor,
    layers: Vec<DecoderLayer<B>>,
    experts: ExpertPlan,
    prefill_chunk: usize,
}

/// Prompt tokens per attention pass when a prompt is prefilled ([`Model::prefill`]): a
/// chunk's attention and linear-attention activations grow with it.
pub const DEFAULT_PREFILL_CHUNK: usize = 2048;

/// `k` routed experts per token: at least one, at most the layer's experts and what the
/// backend's routing takes.
fn check_experts_per_token<B: Backend>(backend: &B, config: &ModelConfig, k: usize) -> Result<()> {
    let limit = backend.max_experts_per_token();
    let most = limit.map_or(config.moe.num_experts, |m| m.min(config.moe.num_experts));
    if k == 0 || k > most {
        return Err(Error::InvalidInput(format!(
            "experts per token must be between 1 and {most} ({} experts per layer{}), not {k}",
            config.moe.num_experts,
            match limit {
                Some(m) => format!(", and backend {} routes at most {m}", backend.describe()),
                None => String::new(),
            }
        )));
    }
    Ok(())
}

impl<B: Backend> Model<B> {
    /// Builds the model from weights in canonical form.
    pub fn load(backend: B, config: ModelConfig, src: &dyn WeightSource) -> Result<Self> {
        check_experts_per_token(&backend, &config, config.moe.experts_per_token)?;
        let (h, vocab) = (config.hidden_size, config.vocab_size);
        let embed = backend.load_matrix(&src.matrix(Weight::Embed, vocab, h)?)?;
        let lm_head = backend.load_matrix(&src.matrix(Weight::LmHead, vocab, h)?)?;
        let final_norm = backend.upload(&src.vector(Weight::FinalNorm, h)?, 1, h)?;
        let mut layers = Vec::with_capacity(config.num_layers());
        for i in 0..config.num_layers() {
            let norm = |w| backend.upload(&src.vector(Weight::Layer(i, w), h)?, 1, h);
            let mixer = match config.layers[i] {
                LayerKind::FullAttention => Mixer::Attention(GatedAttention::load(&backend, &config, src, i)?),
                LayerKind::LinearAttention => Mixer::Linear(GatedDeltaNet::load(&backend, &config, src, i)?),
            };
            let ffn = match config.ffn[i] {
                FfnKind::Moe => Ffn::Moe(SparseMoe::load(&backend, &config, src, i)?),
                FfnKind::Dense => Ffn::Dense(DenseMlp::load(&backend, &config, src, i)?),
            };
            layers.push(DecoderLayer {
                input_norm: norm(LayerWeight::InputNorm)?,
                post_attention_norm: norm(LayerWeight::PostAttentionNorm)?,
                mixer,
                ffn,
            });
        }
        let experts = ExpertPlan {
            per_token: config.moe.experts_per_token,
            cpu: CpuSplit::new(CpuShare::Fixed(0.0)),
        };
        Ok(Model {
            config,
            backend,
            embed,
            lm_head,
            final_norm,
            layers,
            experts,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Routed experts per token (the config's `num_experts_per_tok` unless overridden).
    pub fn experts_per_token(&self) -> usize {
        self.experts.per_token
    }

    /// Overrides the number of routed experts per token.
    pub fn set_experts_per_token(&mut self, k: usize) -> Result<()> {
        check_experts_per_token(&self.backend, &self.config, k)?;
        self.experts.per_token = k;
        Ok(())
    }

    /// Of one token's routed experts that the backend does not hold, the share the host CPU
    /// computes from host memory while the others go to the device ([`CpuShare`]).
    pub fn set_cpu_expert_share(&mut self, share: CpuShare) -> Result<()> {
        if let CpuShare::Fixed(v) = share
            && !(0.0..=1.0).contains(&v)
        {
            return Err(Error::InvalidInput(format!(
                "the CPU's share of missed experts must be between 0 and 1, not {v}"
            )));
        }
        self.experts.cpu = CpuSplit::new(share);
        Ok(())
    }

    /// The share of a token's missed experts the host CPU computes now.
    pub fn cpu_expert_share(&self) -> f32 {
        self.experts.cpu.share()
    }

    /// Reads every routed expert once through storage, so that its in-process cache and the
    /// backend's (when they have room) hold them all before the first token.
    pub fn prefetch_experts(&self) -> Result<()> {
        for layer in &self.layers {
            if let Ffn::Moe(moe) = &layer.ffn {
                moe.prefetch(&self.backend)?;
            }
        }
        Ok(())
    }

    /// When the backend's own expert cache (VRAM) can hold every routed expert, loads them all
    /// now, as engines that keep a model in GPU memory do: no token then waits for an expert,
    /// and a GPU routes on the device from the first token. Returns the bytes loaded, or
    /// `None` when the experts do not fit (they then come on demand).
    pub fn preload_experts_if_they_fit(&self) -> Result<Option<u64>> {
        /// Allowance per expert for the alignment of its device allocation.
        const SLACK: u64 = 512;
        let Some(budget) = self.backend.expert_cache_budget()? else {
            return Ok(None);
        };
        let mut total = 0;
        for layer in &self.layers {
            if let Ffn::Moe(moe) = &layer.ffn {
                total += moe.expert_bytes(SLACK)?;
            }
        }
        if total == 0 || total > budget {
            return Ok(None);
        }
        self.prefetch_experts()?;
        Ok(Some(total))
    }

    /// Leaves device memory for the state of a sequence of `tokens` tokens when the backend
    /// sizes its expert cache automatically (the cache gives experts back if a sequence
    /// grows past it).
    pub fn reserve_state_memory(&self, tokens: usize) {
        self.backend.reserve_state_memory(self.state_bytes(tokens) as u64);
    }

    /// Bytes a sequence state holds at `position` tokens: KV caches plus the fixed
    /// recurrent and conv state (f32).
    pub fn state_bytes(&self, position: usize) -> usize {
        let (a, l) = (&self.config.attention, &self.config.linear);
        let per_layer = |kind: &LayerKind| match kind {
            LayerKind::FullAttention => 2 * position * a.num_kv_heads * a.head_dim,
            LayerKind::LinearAttention => {
                (l.conv_kernel - 1) * l.conv_dim() + l.num_value_heads * l.key_head_dim * l.value_head_dim
            }
        };
        4 * self.config.layers.iter().map(per_layer).sum::<usize>()
    }

    /// A fresh, empty sequence state.
    pub fn new_state(&self) -> Result<ModelState<B>> {
        let layers = self
            .config
            .layers
            .iter()
            .map(|kind| match kind {
                LayerKind::FullAttention => {
                    GatedAttention::new_cache(&self.backend, &self.config).map(LayerState::Attention)
                }
                LayerKind::LinearAttention => {
                    GatedDeltaNet::new_state(&self.backend, &self.config).map(LayerState::Linear)
                }
            })
            .collect::<Result<_>>()?;
        Ok(ModelState {
            position: 0,
            layers,
            profile: Profile::new(self.config.num_layers()),
            routing: None,
        })
    }

    /// What of this one-token step of layer `index` the backend may record, and under which
    /// key. Nothing in a recorded part may depend on the position or wait on the device:
    /// a linear-attention layer whose experts the backend routes by itself is recorded whole;
    /// of a full-attention layer (RoPE, the cache append and the attention read the position)
    /// only the MoE block. Layers with a dense MLP would do too, but no fixture has one, so
    /// the parity test could not check them.
    fn recorded_part(
        &self,
        index: usize,
        layer: &DecoderLayer<B>,
        state: &LayerState<B>,
        x: &B::Tensor,
    ) -> RecordedPart {
        let b = &self.backend;
        if !matches!(layer.ffn, Ffn::Moe(_)) || !b.routes_on_device(index) {
            return RecordedPart::None;
        }
        let per_token = self.experts.per_token;
        let key = match state {
            LayerState::Linear(s) => b
                .step_key(index, per_token, &[x, &s.conv, &s.recurrent])
                .map(RecordedPart::Layer),
            LayerState::Attention(_) => b.step_key(index, per_token, &[x]).map(RecordedPart::Ffn),
        };
        key.unwrap_or(RecordedPart::None)
    }

    /// `layer` on `x` (the residual stream, updated), continuing `state`.
    #[allow(clippy::too_many_arguments)]
    fn layer_step(
        &self,
        layer: &DecoderLayer<B>,
        state: &mut LayerState<B>,
        pos0: usize,
        times: &mut PhaseTimes,
        clock: &mut Stopwatch,
        routing_log: Option<&mut Vec<Vec<usize>>>,
        x: &mut B::Tensor,
    ) -> Result<()> {
        self.mixer_step(layer, state, pos0, times, clock, x)?;
        self.ffn_step(layer, times, clock, routing_log, x)
    }

    /// The attention or linear-attention block of `layer` on `x` (rows at positions `pos0..`),
    /// continuing `state`. Each block normalizes its input itself (with its first products,
    /// where the backend fuses them).
    fn mixer_step(
        &self,
        layer: &DecoderLayer<B>,
        state: &mut LayerState<B>,
        pos0: usize,
        times: &mut PhaseTimes,
        clock: &mut Stopwatch,
        x: &mut B::Tensor,
    ) -> Result<()> {
        let b = &self.backend;
        let eps = self.config.rms_norm_eps;
        match (&layer.mixer, state) {
            (Mixer::Attention(attn), LayerState::Attention(cache)) => {
                attn.forward_into(b, (&layer.input_norm, eps), cache, pos0, x)?;
                clock.charge(times, Phase::Attention);
            }
            (Mixer::Linear(delta), LayerState::Linear(s)) => {
                delta.forward_into(b, (&layer.input_norm, eps), s, x)?;
                clock.charge(times, Phase::LinearAttention);
            }
            _ => return Err(Error::InvalidInput("sequence state does not match the model".into())),
        }
        Ok(())
    }

    /// The MoE or dense MLP block of `layer` on `x`, every row independently.
    fn ffn_step(
        &self,
        layer: &DecoderLayer<B>,
        times: &mut PhaseTimes,
        clock: &mut Stopwatch,
        routing_log: Option<&mut Vec<Vec<usize>>>,
        x: &mut B::Tensor,
    ) -> Result<()> {
        let b = &self.backend;
        let norm = (&layer.post_attention_norm, self.config.rms_norm_eps);
        match &layer.ffn {
            Ffn::Moe(moe) => moe.forward_into(b, norm, &self.experts, times, clock, routing_log, x),
            Ffn::Dense(mlp) => {
                let h = b.rms_norm(x, norm.0, norm.1)?;
                clock.charge(times, Phase::Other);
                let out = mlp.forward(b, &h)?;
                clock.charge(times, Phase::ExpertCompute);
                b.add_assign(x, &out)?;
                clock.charge(times, Phase::Other);
                Ok(())
            }
        }
    }

    /// Runs `ids` through the model as one batch, continuing `state`, and returns logits
    /// (`[rows, vocab]`, rows as `which` says).
    pub fn forward(&self, ids: &[u32], state: &mut ModelState<B>, which: Logits) -> Result<B::Tensor> {
        if ids.is_empty() {
            return Err(Error::InvalidInput("no tokens to run".into()));
        }
        let b = &self.backend;
        let pos0 = state.position;
        let (mut x, mut clock) = self.embed_timed(ids, state)?;
        for (index, layer, layer_state, times, log) in self.layers_with(state) {
            let part = match (&log, ids.len()) {
                (None, 1) => self.recorded_part(index, layer, layer_state, &x),
                _ => RecordedPart::None,
            };
            let mut ran = false;
            match part {
                RecordedPart::None => {
                    self.layer_step(layer, layer_state, pos0, times, &mut clock, log, &mut x)?;
                    ran = true;
                }
                RecordedPart::Layer(key) => b.run_step(&key, &mut || {
                    ran = true;
                    self.layer_step(layer, layer_state, pos0, times, &mut clock, None, &mut x)
                })?,
                RecordedPart::Ffn(key) => {
                    self.mixer_step(layer, layer_state, pos0, times, &mut clock, &mut x)?;
                    b.run_step(&key, &mut || {
                        ran = true;
                        self.ffn_step(layer, times, &mut clock, None, &mut x)
                    })?;
                }
            }
            if !ran {
                clock.charge(times, Phase::Replayed);
            }
        }
        self.finish_pass(ids.len(), x, state, which, clock)
    }

    /// Each layer with its index, its part of `state`, its profile times and its routing log
    /// (when `state` keeps one).
    fn layers_with<'a>(&'a self, state: &'a mut ModelState<B>) -> impl Iterator<Item = LayerWith<'a, B>> + 'a {
        let mut logs = state.routing.as_mut().map(|r| r.iter_mut());
        self.layers
            .iter()
            .zip(state.layers.iter_mut())
            .zip(state.profile.layers.iter_mut())
            .enumerate()
            .map(move |(index, ((layer, layer_state), times))| {
                let log = logs.as_mut().and_then(|l| l.next());
                (index, layer, layer_state, times, log)
            })
    }

    /// The embeddings of `ids`, timed into `state`'s profile, and the clock that goes on.
    fn embed_timed(&self, ids: &[u32], state: &mut ModelState<B>) -> Result<(B::Tensor, Stopwatch)> {
        let mut clock = Stopwatch::start();
        let x = self.backend.embed(&self.embed, ids)?;
        clock.charge(&mut state.profile.outside_layers, Phase::Other);
        Ok((x, clock))
    }

    /// The end of a forward pass over `tokens` tokens whose last hidden states are `x`:
    /// advances `state` and returns the logits `which` asks for.
    fn finish_pass(
        &self,
        tokens: usize,
        mut x: B::Tensor,
        state: &mut ModelState<B>,
        which: Logits,
        mut clock: Stopwatch,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        state.position += tokens;
        state.profile.calls += 1;
        state.profile.tokens += tokens as u64;
        if which == Logits::Last && tokens > 1 {
            x = b.gather_rows(&x, &[tokens - 1])?;
        }
        let x = b.rms_norm(&x, &self.final_norm, self.config.rms_norm_eps)?;
        clock.charge(&mut state.profile.outside_layers, Phase::Other);
        let logits = b.matmul(&x, &self.lm_head)?;
        clock.charge(&mut state.profile.outside_layers, Phase::LmHead);
        Ok(logits)
    }
}
