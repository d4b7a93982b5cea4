//! `flash-moe serve`: the OpenAI- and Anthropic-compatible HTTP server.

use std::sync::Arc;

use anyhow::Context;
use flash_moe_engine::backend::Backend;
use flash_moe_engine::chat::ChatTemplate;
use flash_moe_engine::engine::sampler::SamplingParams;
use flash_moe_engine::engine::session::Session;
use flash_moe_engine::model::Model;
use flash_moe_engine::storage::store::ExpertStore;
use flash_moe_engine::tokenizer::Tokenizer;
use flash_moe_server::{ServerOptions, serve};

use super::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on. Anything other than 127.0.0.1 exposes the model to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require this key of every client (`Authorization: Bearer KEY` or `x-api-key: KEY`).
    #[arg(long, env = "FLASH_MOE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Names the model answers to (repeatable; default: the model directory's name).
    #[arg(long = "served-model-name")]
    served_model_names: Vec<String>,
    /// Longest sequence, prompt plus answer, in tokens (default: the model's).
    #[arg(long)]
    max_context: Option<usize>,
    /// Memory for snapshots of earlier prompts, which let a resent conversation skip the
    /// part already computed, in MiB.
    #[arg(long, default_value_t = 2048)]
    prefix_cache_mib: usize,
    /// Requests that may wait for the engine; more are refused with 503 (529 for Anthropic).
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 32)]
    max_body_mib: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model_args = args.model.clone();
    model_args.run(args)
}

impl super::ModelJob for Args {
    fn max_context(&self) -> Option<usize> {
        self.max_context
    }

    fn run<B: Backend>(self, model: Model<B>, store: Arc<ExpertStore>) -> anyhow::Result<()> {
        let dir = &self.model.model;
        let tokenizer = Arc::new(Tokenizer::from_dir(dir, &model.config.eos_token_ids)?);
        let template = ChatTemplate::from_dir(dir)?;
        if template.is_fallback() {
            eprintln!("note: {} has no chat template; using ChatML", dir.display());
        }
        let defaults = SamplingParams::from_generation_config(
            dir,
            SamplingParams {
                temperature: 1.0,
                ..SamplingParams::default()
            },
        )?;
        let names = if self.served_model_names.is_empty() {
            vec![model_name(dir)]
        } else {
            self.served_model_names.clone()
        };
        let max_context = self.max_context.unwrap_or(model.config.max_position_embeddings);
        let session = Session::new(max_context, self.prefix_cache_mib << 20);
        let store_for_metrics = Arc::clone(&store);
        let options = ServerOptions {
            host: self.host.clone(),
            port: self.port,
            api_key: self.api_key.clone(),
            model_names: names.clone(),
            max_queue: self.max_queue,
            max_body_bytes: self.max_body_mib << 20,
            defaults,
            extra_metrics: Some(Box::new(move || {
                let t = store_for_metrics.stats().totals();
                format!(
                    "# HELP flash_moe_expert_fetches_total Routed experts fetched, by where they came from.\n\
                     # TYPE flash_moe_expert_fetches_total counter\n\
                     flash_moe_expert_fetches_total{{source=\"memory_cache\"}} {}\n\
                     flash_moe_expert_fetches_total{{source=\"mapped\"}} {}\n\
                     flash_moe_expert_fetches_total{{source=\"page_cache\"}} {}\n\
                     flash_moe_expert_fetches_total{{source=\"disk\"}} {}\n\
                     flash_moe_expert_fetches_total{{source=\"unknown\"}} {}\n\
                     # HELP flash_moe_expert_bytes_read_total Bytes of experts read from files.\n\
                     # TYPE flash_moe_expert_bytes_read_total counter\n\
                     flash_moe_expert_bytes_read_total {}\n",
                    t.cache_hits, t.mapped, t.page_cache_hits, t.cold_reads, t.unknown_reads, t.bytes_read
                )
            })),
        };
        let key_note = if self.api_key.is_some() {
            ", API key required"
        } else {
            ""
        };
        serve(&model, tokenizer, Arc::new(template), session, options, |addr| {
            eprintln!(
                "flash-moe: serving `{}` on http://{addr}/v1 (context {max_context} tokens{key_note})",
                names[0]
            );
        })
        .with_context(|| format!("serving on {}:{}", self.host, self.port))
    }
}

/// The directory's name, as users would call the model.
fn model_name(dir: &std::path::Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string())
}
