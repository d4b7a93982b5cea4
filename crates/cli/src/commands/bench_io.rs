use flash_moe_engine::engine::bench_io::bench_io;
use flash_moe_engine::model::config::ModelConfig;
use flash_moe_engine::storage::io::IoMode;
use flash_moe_engine::storage::store::{ExpertIo, StoreConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (packed or a downloaded checkpoint).
    #[arg(long)]
    model: std::path::PathBuf,
    /// Experts read per layer (default: the model's num_experts_per_tok).
    #[arg(long)]
    experts_per_token: Option<usize>,
    /// Tokens to simulate.
    #[arg(long, default_value_t = 20)]
    tokens: usize,
    /// Threads reading experts.
    #[arg(long, default_value_t = 8)]
    io_threads: usize,
    /// Read through the page cache instead of O_DIRECT (measures warm reads once cached).
    #[arg(long)]
    page_cache: bool,
    /// Seed of the random expert choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = ModelConfig::from_dir(&args.model)?;
    let k = args.experts_per_token.unwrap_or(config.moe.experts_per_token);
    let mode = if args.page_cache {
        IoMode::PageCache
    } else {
        IoMode::Direct
    };
    let store = StoreConfig {
        io: ExpertIo::Read(mode),
        cache_bytes: 0,
        io_threads: args.io_threads,
        host_memory: None,
    };
    let r = bench_io(&args.model, k, args.tokens, store, args.seed)?;
    let per_token = r.bytes as f64 / args.tokens.max(1) as f64;
    println!(
        "bench-io ({}): {} tokens x {} MoE layers x {} experts = {} reads of {:.2} MB, {:.3} GB in {:.2} s",
        if args.page_cache {
            "page cache"
        } else {
            "O_DIRECT, cold"
        },
        args.tokens,
        r.layers,
        r.experts_per_layer,
        r.reads,
        r.bytes as f64 / r.reads.max(1) as f64 / 1e6,
        r.bytes as f64 / 1e9,
        r.elapsed.as_secs_f64()
    );
    println!(
        "throughput {:.2} GB/s; per layer batch: median {:.2} ms, p90 {:.2} ms; {:.1} MB per token -> I/O floor {:.1} ms/token",
        r.bytes_per_second() / 1e9,
        r.layer_time_quantile(0.5).as_secs_f64() * 1e3,
        r.layer_time_quantile(0.9).as_secs_f64() * 1e3,
        per_token / 1e6,
        per_token / r.bytes_per_second() * 1e3,
    );
    Ok(())
}
