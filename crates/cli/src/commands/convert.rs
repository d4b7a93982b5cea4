use std::path::PathBuf;

use anyhow::Context;
use flash_moe_engine::storage::convert::{Bits, ConvertOptions, plan};
use flash_moe_engine::storage::packed;

use super::progress_bar;

/// A bit width given on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum BitsArg {
    Keep,
    #[value(name = "8")]
    B8,
    #[value(name = "4")]
    B4,
    #[value(name = "2")]
    B2,
}

impl BitsArg {
    fn bits(self) -> Bits {
        match self {
            BitsArg::Keep => Bits::Keep,
            BitsArg::B8 => Bits::Affine(8),
            BitsArg::B4 => Bits::Affine(4),
            BitsArg::B2 => Bits::Affine(2),
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Source model directory (HF or MLX safetensors).
    #[arg(long)]
    from: PathBuf,
    /// Destination directory (must not exist).
    #[arg(long)]
    to: PathBuf,
    /// Bits of the routed experts. Default: 4 for float checkpoints, keep (copied bit for
    /// bit) for quantized ones. 2 is the original engine's fast mode (Qwen3.5-397B: about
    /// 120 GB instead of 209 GB), known to corrupt JSON output and tool calls.
    #[arg(long, value_enum)]
    expert_bits: Option<BitsArg>,
    /// Bits of the dense (resident) weights: keep, 8 or 4. The router and the shared-expert
    /// gate keep 8 bits at least.
    #[arg(long, value_enum, default_value = "keep")]
    dense_bits: BitsArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if matches!(args.dense_bits, BitsArg::B2) {
        anyhow::bail!("--dense-bits takes keep, 8 or 4");
    }
    let options = ConvertOptions {
        expert_bits: args.expert_bits.map(BitsArg::bits),
        dense_bits: args.dense_bits.bits(),
        ..ConvertOptions::default()
    };
    let plan = plan(&args.from, options).with_context(|| format!("reading {}", args.from.display()))?;
    for note in &plan.notes {
        eprintln!("note: {note}");
    }
    let bar = progress_bar(plan.total_bytes, "converting");
    let manifest = plan
        .run(&args.to, &|n| bar.inc(n))
        .with_context(|| format!("converting into {}", args.to.display()))?;
    bar.finish_and_clear();
    let bytes: u64 = manifest.files.values().map(|f| f.bytes).sum();
    eprintln!(
        "wrote {} ({} expert layers, {:.2} GiB); check it any time with `flash-moe verify {}`",
        args.to.display(),
        manifest.layers.len(),
        bytes as f64 / (1u64 << 30) as f64,
        args.to.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A packed model directory.
    dir: PathBuf,
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let manifest = packed::read_manifest(&args.dir)?
        .with_context(|| format!("{}: not a packed model (no {})", args.dir.display(), packed::MANIFEST))?;
    let total = manifest.files.values().map(|f| f.bytes).sum();
    let bar = progress_bar(total, "verifying");
    let problems = packed::verify(&args.dir, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    for p in &problems {
        eprintln!("{}: {}", args.dir.join(&p.file).display(), p.message);
    }
    if !problems.is_empty() {
        anyhow::bail!("{}: {} problem(s) found", args.dir.display(), problems.len());
    }
    eprintln!("{}: {} files OK", args.dir.display(), manifest.files.len());
    Ok(())
}
