use std::path::PathBuf;

use anyhow::{Context, bail};
use flash_moe_engine::backend::Backend;
use std::sync::Arc;

use flash_moe_engine::model::{Logits, Model};
use flash_moe_engine::storage::npy;
use flash_moe_engine::storage::store::ExpertStore;

use super::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Run the first N ids as one batch and the rest one at a time through the caches
    /// (default: all at once).
    #[arg(long)]
    prefill: Option<usize>,
    /// Output .npy file, float32 [number of ids, vocab].
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model_args = args.model.clone();
    model_args.run(args)
}

impl super::ModelJob for Args {
    fn run<B: Backend>(self, model: Model<B>, _store: Arc<ExpertStore>) -> anyhow::Result<()> {
        write_logits(&self, &model)
    }
}

fn write_logits<B: Backend>(args: &Args, model: &Model<B>) -> anyhow::Result<()> {
    let n = args.ids.len();
    let prefill = args.prefill.unwrap_or(n);
    if prefill == 0 || prefill > n {
        bail!("--prefill must be between 1 and the number of ids ({n}), not {prefill}");
    }
    let b = model.backend();
    let mut state = model.new_state()?;
    let mut logits = b.download(&model.forward(&args.ids[..prefill], &mut state, Logits::All)?)?;
    for &id in &args.ids[prefill..] {
        logits.extend(b.download(&model.forward(&[id], &mut state, Logits::All)?)?);
    }
    let vocab = logits.len() / n;
    npy::write_f32(&args.out, &[n, vocab], &logits).with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}
