//! One module per subcommand; shared model options here.

pub mod generate;
pub mod inspect;
pub mod logits;
pub mod tokenize;

use std::path::PathBuf;

use anyhow::Context;
use flash_moe_engine::backend::cpu::CpuBackend;
use flash_moe_engine::engine::load_model;
use flash_moe_engine::model::Model;

/// Options every command that runs the model takes.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory: config.json, safetensors weights, tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Routed experts per token (default: the model's num_experts_per_tok). Fewer is faster
    /// and lowers quality.
    #[arg(long)]
    pub experts_per_token: Option<usize>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Model<CpuBackend>> {
        let mut model = load_model(&self.model, CpuBackend::new())
            .with_context(|| format!("loading model from {}", self.model.display()))?;
        if let Some(k) = self.experts_per_token {
            let native = model.config.moe.experts_per_token;
            model.set_experts_per_token(k)?;
            if k < native {
                eprintln!(
                    "warning: using {k} of the model's {native} experts per token; output quality drops"
                );
            }
        }
        Ok(model)
    }
}
