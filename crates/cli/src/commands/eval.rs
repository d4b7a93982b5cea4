use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use flash_moe_engine::backend::Backend;
use flash_moe_engine::backend::cpu::CpuBackend;
use flash_moe_engine::engine::eval::{evaluate, routing_stats};
use flash_moe_engine::engine::{inspect_model, load_model};
use flash_moe_engine::model::Model;
use flash_moe_engine::storage::store::{ExpertIo, ExpertStore, StoreConfig};
use flash_moe_engine::tokenizer::Tokenizer;

use super::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to score.
    #[arg(long)]
    text: PathBuf,
    /// A reference model (same tokenizer) to compare next-token distributions with; run on
    /// the CPU.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Tokens per window; each window is scored from a fresh state.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Score at most this many tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The text's token ids, cut to `max`.
fn text_ids(
    model: &std::path::Path,
    eos: &[u32],
    text: &std::path::Path,
    max: Option<usize>,
) -> anyhow::Result<Vec<u32>> {
    let tokenizer = Tokenizer::from_dir(model, eos)?;
    let text = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut ids = tokenizer.encode(&text)?;
    if let Some(max) = max {
        ids.truncate(max);
    }
    Ok(ids)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model_args = args.model.clone();
    model_args.run(args)
}

impl super::ModelJob for Args {
    fn run<B: Backend>(self, model: Model<B>, _store: Arc<ExpertStore>) -> anyhow::Result<()> {
        let ids = text_ids(
            &self.model.model,
            &model.config.eos_token_ids,
            &self.text,
            self.max_tokens,
        )?;
        let reference = self
            .reference
            .as_ref()
            .map(|dir| {
                let store = ExpertStore::new(StoreConfig {
                    io: ExpertIo::Mmap,
                    ..StoreConfig::default()
                });
                load_model(dir, CpuBackend::new(), store)
                    .with_context(|| format!("loading reference {}", dir.display()))
            })
            .transpose()?;
        let report = evaluate(&model, reference.as_ref(), &ids, self.window)?;
        let (_, _, inventory) = inspect_model(&self.model.model)?;
        let k = model.experts_per_token();
        let expert_bytes = inventory.expert_bytes() as f64 * k as f64 / model.config.moe.num_experts as f64;
        println!(
            "{}: {} windows of {} tokens, {} predictions, {k} experts per token",
            self.model.model.display(),
            report.windows,
            self.window,
            report.predictions
        );
        println!("perplexity: {:.4}", report.perplexity());
        if let Some(r) = &self.reference {
            println!(
                "vs {}: mean KL {:.5} nats, top-1 agreement {:.2}%",
                r.display(),
                report.mean_kl(),
                100.0 * report.top1_agreement()
            );
        }
        println!(
            "routed-expert bytes per decoded token (no cache): {:.1} KB",
            expert_bytes / 1e3
        );
        if let Some(path) = &self.json {
            let json = serde_json::json!({
                "model": self.model.model, "experts_per_token": k, "window": self.window,
                "windows": report.windows, "predictions": report.predictions,
                "perplexity": report.perplexity(),
                "mean_kl": report.has_reference.then(|| report.mean_kl()),
                "top1_agreement": report.has_reference.then(|| report.top1_agreement()),
                "expert_bytes_per_token": expert_bytes,
            });
            std::fs::write(path, json.to_string()).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct RouteArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to route.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window (each from a fresh state).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Sizes (experts per layer) of the LRU caches to simulate (default: k, 2k, half the experts).
    #[arg(long, value_delimiter = ',')]
    lru: Vec<usize>,
    /// Route at most this many tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
}

pub fn route_stats(args: RouteArgs) -> anyhow::Result<()> {
    let model_args = args.model.clone();
    model_args.run(args)
}

impl super::ModelJob for RouteArgs {
    fn run<B: Backend>(self, model: Model<B>, _store: Arc<ExpertStore>) -> anyhow::Result<()> {
        let ids = text_ids(
            &self.model.model,
            &model.config.eos_token_ids,
            &self.text,
            self.max_tokens,
        )?;
        let k = model.experts_per_token();
        let experts = model.config.moe.num_experts;
        let capacities = if self.lru.is_empty() {
            vec![k, 2 * k, experts / 2]
        } else {
            self.lru.clone()
        };
        let stats = routing_stats(&model, &ids, self.window, &capacities)?;
        println!(
            "{} tokens, {k} of {experts} experts per token; reuse = share of a token's experts the previous token also used",
            ids.len()
        );
        let lru_head: String = capacities
            .iter()
            .map(|c| format!(" {:>9}", format!("LRU {c}")))
            .collect();
        println!("{:>5} {:>8} {:>9}{lru_head}", "layer", "reuse", "busiest");
        let n = stats.len().max(1) as f64;
        let mut mean_reuse = 0.0;
        let mut mean_lru = vec![0.0; capacities.len()];
        for l in &stats {
            let cells: String = l
                .lru_hits
                .iter()
                .map(|(_, h)| format!(" {:>8.1}%", 100.0 * h))
                .collect();
            println!(
                "{:>5} {:>7.1}% {:>8.1}%{cells}",
                l.layer,
                100.0 * l.reuse,
                100.0 * l.busiest_share
            );
            mean_reuse += l.reuse / n;
            for (m, (_, h)) in mean_lru.iter_mut().zip(&l.lru_hits) {
                *m += h / n;
            }
        }
        let cells: String = mean_lru.iter().map(|h| format!(" {:>8.1}%", 100.0 * h)).collect();
        println!("{:>5} {:>7.1}% {:>9}{cells}", "mean", 100.0 * mean_reuse, "");
        println!(
            "(uniform random routing would give reuse {:.1}%)",
            100.0 * k as f64 / experts as f64
        );
        Ok(())
    }
}
