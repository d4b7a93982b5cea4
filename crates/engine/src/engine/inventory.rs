//! What a model is made of: parameter counts and stored bytes per tensor class, found by
//! recording what the model actually loads.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::weights::{ExpertSource, LayerWeight as W, Weight, WeightSource};
use crate::storage::quant::MatrixView;

/// Tensor classes reported by `inspect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TensorClass {
    Embedding,
    LmHead,
    Attention,
    LinearAttention,
    Router,
    SharedExpert,
    DenseMlp,
    RoutedExperts,
    NormsAndOther,
}

impl TensorClass {
    pub fn label(self) -> &'static str {
        match self {
            TensorClass::Embedding => "embedding",
            TensorClass::LmHead => "lm_head",
            TensorClass::Attention => "full attention",
            TensorClass::LinearAttention => "linear attention",
            TensorClass::Router => "router",
            TensorClass::SharedExpert => "shared expert",
            TensorClass::DenseMlp => "dense mlp",
            TensorClass::RoutedExperts => "routed experts",
            TensorClass::NormsAndOther => "norms, conv, gates",
        }
    }

    fn of(weight: Weight) -> Self {
        match weight {
            Weight::Embed => TensorClass::Embedding,
            Weight::LmHead => TensorClass::LmHead,
            Weight::FinalNorm => TensorClass::NormsAndOther,
            Weight::Layer(_, w) => match w {
                W::QProj | W::KProj | W::VProj | W::OProj => TensorClass::Attention,
                W::InProjQkv | W::InProjZ | W::InProjB | W::InProjA | W::OutProj => TensorClass::LinearAttention,
                W::Router => TensorClass::Router,
                W::SharedGateProj | W::SharedUpProj | W::SharedDownProj | W::SharedExpertGate => {
                    TensorClass::SharedExpert
                }
                W::MlpGateProj | W::MlpUpProj | W::MlpDownProj => TensorClass::DenseMlp,
                _ => TensorClass::NormsAndOther,
            },
        }
    }
}

/// Totals for one tensor class.
#[derive(Clone, Debug, Default)]
pub struct ClassTotals {
    pub parameters: u64,
    pub bytes: u64,
    /// Encodings seen, e.g. `q4/g64`, `bf16`.
    pub encodings: Vec<String>,
}

/// The model's weights by class.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    pub classes: BTreeMap<TensorClass, ClassTotals>,
    /// Parameters of the experts a token does not use (`num_experts - k` per MoE layer).
    pub inactive_expert_parameters: u64,
}

impl Inventory {
    pub fn total_parameters(&self) -> u64 {
        self.classes.values().map(|c| c.parameters).sum()
    }

    pub fn active_parameters(&self) -> u64 {
        self.total_parameters() - self.inactive_expert_parameters
    }

    pub fn expert_bytes(&self) -> u64 {
        self.classes.get(&TensorClass::RoutedExperts).map_or(0, |c| c.bytes)
    }

    pub fn dense_bytes(&self) -> u64 {
        self.classes.values().map(|c| c.bytes).sum::<u64>() - self.expert_bytes()
    }

    fn add(&mut self, class: TensorClass, parameters: u64, bytes: u64, encoding: String) {
        let totals = self.classes.entry(class).or_default();
        totals.parameters += parameters;
        totals.bytes += bytes;
        if !totals.encodings.contains(&encoding) {
            totals.encodings.push(encoding);
        }
    }
}

/// A [`WeightSource`] that records every weight handed out.
pub struct Recorder<'a> {
    inner: &'a dyn WeightSource,
    config: &'a ModelConfig,
    inventory: RefCell<Inventory>,
}

impl<'a> Recorder<'a> {
    pub fn new(inner: &'a dyn WeightSource, config: &'a ModelConfig) -> Self {
        Recorder {
            inner,
            config,
            inventory: RefCell::default(),
        }
    }

    pub fn into_inventory(self) -> Inventory {
        self.inventory.into_inner()
    }
}

impl WeightSource for Recorder<'_> {
    fn matrix(&self, weight: Weight, rows: usize, cols: usize) -> Result<MatrixView> {
        let m = self.inner.matrix(weight, rows, cols)?;
        let params = (m.rows * m.cols) as u64;
        let bytes = m.storage_bytes() as u64;
        self.inventory
            .borrow_mut()
            .add(TensorClass::of(weight), params, bytes, m.encoding.label());
        Ok(m)
    }

    fn vector(&self, weight: Weight, len: usize) -> Result<Vec<f32>> {
        let v = self.inner.vector(weight, len)?;
        // Vectors are counted at their loaded size (f32); they are a negligible share of any model.
        self.inventory
            .borrow_mut()
            .add(TensorClass::NormsAndOther, len as u64, 4 * len as u64, "f32".into());
        Ok(v)
    }

    fn experts(&self, layer: usize) -> Result<Arc<dyn ExpertSource>> {
        let experts = self.inner.experts(layer)?;
        let count = experts.num_experts() as u64;
        let first = experts.fetch(&[0])?.remove(0).wait()?;
        let per_expert = [&first.gate, &first.up, &first.down]
            .iter()
            .map(|m| (m.rows * m.cols) as u64)
            .sum::<u64>();
        let mut inv = self.inventory.borrow_mut();
        for m in [&first.gate, &first.up, &first.down] {
            inv.add(
                TensorClass::RoutedExperts,
                count * (m.rows * m.cols) as u64,
                count * m.storage_bytes() as u64,
                m.encoding.label(),
            );
        }
        let unused = self
            .config
            .moe
            .num_experts
            .saturating_sub(self.config.moe.experts_per_token) as u64;
        inv.inactive_expert_parameters += unused * per_expert;
        Ok(experts)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
