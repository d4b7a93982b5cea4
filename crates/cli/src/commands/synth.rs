use std::path::PathBuf;

use flash_moe_engine::model::presets::SHAPES;
use flash_moe_engine::storage::synth::{SynthOptions, plan};

use super::progress_bar;

#[derive(clap::Args)]
pub struct Args {
    /// The real model whose shapes to use.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(SHAPES))]
    shape: String,
    /// Destination directory (must not exist).
    #[arg(long)]
    to: PathBuf,
    /// Decoder layers (default: the real count); fewer makes a model that fits a smaller disk.
    #[arg(long)]
    layers: Option<usize>,
    /// Experts per layer (default: the real count).
    #[arg(long)]
    experts: Option<usize>,
    /// Bits of the routed experts: 4 or 2.
    #[arg(long, default_value_t = 4)]
    expert_bits: u32,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let plan = plan(SynthOptions {
        shape: args.shape,
        layers: args.layers,
        experts: args.experts,
        expert_bits: args.expert_bits,
        seed: args.seed,
    })?;
    let bar = progress_bar(plan.total_bytes, "writing");
    let manifest = plan.run(&args.to, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    let bytes: u64 = manifest.files.values().map(|f| f.bytes).sum();
    eprintln!(
        "wrote {}: {}, {:.2} GiB",
        args.to.display(),
        manifest.source,
        bytes as f64 / (1u64 << 30) as f64
    );
    Ok(())
}
