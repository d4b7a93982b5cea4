//! `flash-moe`: run giant Mixture-of-Experts models from disk.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flash-moe",
    version,
    about = "Run giant Mixture-of-Experts language models on small machines"
)]
struct Cli {
    /// Worker threads for CPU compute (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout.
    Generate(commands::generate::Args),
    /// Talk to the model in the terminal (multi-turn, thinking, optional bash tool).
    Chat(commands::chat::Args),
    /// Serve the model over HTTP: OpenAI and Anthropic compatible APIs.
    Serve(commands::serve::Args),
    /// Write the logits of a list of token ids to a .npy file.
    Logits(commands::logits::Args),
    /// Print the token ids of a text, comma-separated.
    Tokenize(commands::tokenize::Args),
    /// Describe a model: architecture, parameters, bytes, quantization.
    Inspect(commands::inspect::Args),
    /// Convert a downloaded HF or MLX checkpoint to the packed layout (one read per expert).
    Convert(commands::convert::Args),
    /// Check every file and expert record of a packed model against its manifest.
    Verify(commands::convert::VerifyArgs),
    /// Write a model with the real shapes of a known checkpoint and random weights.
    Synth(commands::synth::Args),
    /// Measure the disk for the decode access pattern: k random experts per layer, in parallel.
    BenchIo(commands::bench_io::Args),
    /// Perplexity on a text, and agreement with a reference model.
    Eval(commands::eval::Args),
    /// How routing behaves over a text: expert reuse between tokens, LRU hit rates.
    RouteStats(commands::eval::RouteArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    match cli.command {
        Command::Generate(args) => commands::generate::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Logits(args) => commands::logits::run(args),
        Command::Tokenize(args) => commands::tokenize::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Verify(args) => commands::convert::verify(args),
        Command::Synth(args) => commands::synth::run(args),
        Command::BenchIo(args) => commands::bench_io::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::RouteStats(args) => commands::eval::route_stats(args),
    }
}
