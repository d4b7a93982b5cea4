//! The `--timing` report: where the time went per layer and phase, expert I/O, memory.

use flash_moe_engine::backend::ExpertCacheStats;
use flash_moe_engine::engine::GenerationStats;
use flash_moe_engine::model::config::{LayerKind, ModelConfig};
use flash_moe_engine::model::profile::{Phase, PhaseTimes, Profile};
use flash_moe_engine::storage::io::peak_rss_bytes;
use flash_moe_engine::storage::store::IoTotals;

fn ms(d: std::time::Duration, per: u64) -> f64 {
    d.as_secs_f64() * 1e3 / per.max(1) as f64
}

fn row(label: &str, t: &PhaseTimes, per: u64) -> String {
    let cells: String = Phase::ALL
        .iter()
        .map(|&p| format!(" {:>10.2}", ms(t.get(p), per)))
        .collect();
    format!("{label:<12}{cells} {:>10.2}", ms(t.total(), per))
}

fn section(title: &str, config: &ModelConfig, profile: &Profile, io: &IoTotals) -> String {
    let tokens = profile.tokens.max(1);
    let mut out = format!(
        "{title}: {} tokens in {} calls, milliseconds per token\n",
        profile.tokens, profile.calls
    );
    let header: String = Phase::ALL.iter().map(|p| format!(" {:>10}", short(*p))).collect();
    out += &format!("{:<12}{header} {:>10}\n", "layer", "total");
    for (i, t) in profile.layers.iter().enumerate() {
        let kind = if config.layers[i] == LayerKind::FullAttention {
            "full"
        } else {
            "linear"
        };
        out += &row(&format!("{i:>3} {kind}"), t, tokens);
        out.push('\n');
    }
    out += &row("outside", &profile.outside_layers, tokens);
    out.push('\n');
    out += &row("all", &profile.total(), tokens);
    out.push('\n');
    out += &io_line(io, tokens);
    out
}

fn short(p: Phase) -> &'static str {
    match p {
        Phase::Attention => "attn",
        Phase::LinearAttention => "lin-attn",
        Phase::Routing => "routing",
        Phase::ExpertIoWait => "io-wait",
        Phase::ExpertCompute => "experts",
        Phase::LmHead => "lm_head",
        Phase::Other => "other",
    }
}

fn io_line(io: &IoTotals, tokens: u64) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    format!(
        "experts: {:.1} fetched per token ({} from the in-process cache, {} warm in the page cache, {} cold, {} unknown); \
         read {:.1} MB per token, {:.1} MB of it from the device; {:.2} GB/s while reads were in flight\n",
        io.fetches as f64 / tokens as f64,
        io.cache_hits,
        io.page_cache_hits,
        io.cold_reads,
        io.unknown_reads,
        mb(io.bytes_read) / tokens as f64,
        mb(io.bytes_cold) / tokens as f64,
        io.read_bytes_per_second() / 1e9,
    )
}

/// The whole report for a `generate` run.
pub fn report(config: &ModelConfig, stats: &GenerationStats, vram: Option<ExpertCacheStats>) -> String {
    let mut out = section("prefill", config, &stats.prefill_profile, &stats.prefill_io);
    out += &section("decode", config, &stats.decode_profile, &stats.decode_io);
    if let Some(v) = vram {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        out += &format!(
            "VRAM expert cache (whole run): {} hits, {} misses ({:.1}% hits); {:.2} GiB copied to the GPU at {:.1} GB/s; \
             {:.2} of {:.2} GiB resident\n",
            v.hits,
            v.misses,
            100.0 * v.hits as f64 / (v.hits + v.misses).max(1) as f64,
            gib(v.uploaded_bytes),
            v.uploaded_bytes as f64 / (v.upload_nanos as f64).max(1.0),
            gib(v.resident_bytes),
            gib(v.budget_bytes),
        );
    }
    if let Some(rss) = peak_rss_bytes() {
        out += &format!("peak resident memory: {:.2} GiB\n", rss as f64 / (1u64 << 30) as f64);
    }
    out
}
