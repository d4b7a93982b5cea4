//! What the forward pass asks of weight storage: tensors by role, in one canonical form,
//! whatever the checkpoint layout. Storage (`crate::storage`) answers.

use std::fmt;
use std::sync::Arc;

use crate::error::Result;
use crate::storage::quant::MatrixView;

/// A weight of the model, named by its role rather than by a checkpoint key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Weight {
    Embed,
    LmHead,
    FinalNorm,
    Layer(usize, LayerWeight),
}

/// A weight inside decoder layer `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerWeight {
    InputNorm,
    PostAttentionNorm,
    // Gated full attention.
    QProj,
    KProj,
    VProj,
    OProj,
    QNorm,
    KNorm,
    // Gated DeltaNet, in Qwen3.5's split form (Qwen3-Next's fused projections are split by storage).
    InProjQkv,
    InProjZ,
    InProjB,
    InProjA,
    /// `[conv_dim, kernel]`.
    Conv1d,
    DtBias,
    ALog,
    /// The gated RMSNorm of the output (a plain multiplier, never zero-centred).
    GatedNorm,
    OutProj,
    // Mixture of experts.
    Router,
    SharedGateProj,
    SharedUpProj,
    SharedDownProj,
    /// `[1, hidden]`: the scalar gate of the shared expert.
    SharedExpertGate,
    // Dense MLP layers (Qwen3-Next `mlp_only_layers`).
    MlpGateProj,
    MlpUpProj,
    MlpDownProj,
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Weight::Embed => write!(f, "embed_tokens"),
            Weight::LmHead => write!(f, "lm_head"),
            Weight::FinalNorm => write!(f, "norm"),
            Weight::Layer(i, w) => write!(f, "layers.{i}.{w:?}"),
        }
    }
}

/// The three matrices of one routed expert: `gate` and `up` are `[intermediate, hidden]`,
/// `down` is `[hidden, intermediate]`.
#[derive(Clone, Debug)]
pub struct ExpertView {
    pub gate: MatrixView,
    pub up: MatrixView,
    pub down: MatrixView,
}

impl ExpertView {
    pub fn storage_bytes(&self) -> usize {
        self.gate.storage_bytes() + self.up.storage_bytes() + self.down.storage_bytes()
    }
}

/// An expert on its way: ready now, or arriving from storage.
pub struct PendingExpert(PendingInner);

enum PendingInner {
    Ready(Box<ExpertView>),
    Deferred(Box<dyn FnOnce() -> Result<ExpertView> + Send>),
}

impl PendingExpert {
    pub fn ready(view: ExpertView) -> Self {
        PendingExpert(PendingInner::Ready(Box::new(view)))
    }

    pub fn deferred(wait: impl FnOnce() -> Result<ExpertView> + Send + 'static) -> Self {
        PendingExpert(PendingInner::Deferred(Box::new(wait)))
    }

    /// Whether the bytes are in memory already (`wait` returns at once).
    pub fn is_ready(&self) -> bool {
        matches!(self.0, PendingInner::Ready(_))
    }

    /// Blocks until the expert's bytes are in memory.
    pub fn wait(self) -> Result<ExpertView> {
        match self.0 {
            PendingInner::Ready(view) => Ok(*view),
            PendingInner::Deferred(wait) => wait(),
        }
    }
}

/// The routed experts of one layer.
pub trait ExpertSource: Send + Sync {
    fn num_experts(&self) -> usize;
    /// Starts fetching `experts` (all in flight together) and returns them in that order.
    fn fetch(&self, experts: &[usize]) -> Result<Vec<PendingExpert>>;
}

/// Supplies weights in canonical form.
pub trait WeightSource {
    /// A 2-D weight of shape `[rows, cols]`; an error names the checkpoint tensor when the
    /// stored shape differs.
    fn matrix(&self, weight: Weight, rows: usize, cols: usize) -> Result<MatrixView>;
    /// A 1-D weight of length `len` in f32. Norm weights come back as the multiplier applied
    /// to the normalised input (storage adds the 1 of zero-centred layouts).
    fn vector(&self, weight: Weight, len: usize) -> Result<Vec<f32>>;
    /// The routed experts of `layer`.
    fn experts(&self, layer: usize) -> Result<Arc<dyn ExpertSource>>;
    /// A one-line description of the checkpoint layout, for `inspect`.
    fn describe(&self) -> String;
}
