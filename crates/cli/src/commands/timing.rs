//! The `--timing` report: where the time went per layer and phase, expert I/O, memory.

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
        Phase::CpuExperts => "cpu-experts",
        Phase::LmHead => "lm_head",
        Phase::Other => "other",
        Phase::Replayed => "replayed",
    }
}

fn io_line(io: &IoTotals, tokens: u64) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    format!(
        "experts: {:.1} fetched per token ({} from the in-process cache, {} in place from the mapped files, {} warm in the page cache, {} cold, {} unknown); \
         read {:.1} MB per token, {:.1} MB of it from the device; {:.2} GB/s while reads were in flight\n",
        io.fetches as f64 / tokens as f64,
        io.cache_hits,
        io.mapped,
        io.page_cache_hits,
        io.cold_reads,
        io.unknown_reads,
        mb(io.bytes_read) / tokens as f64,
        mb(io.bytes_cold) / tokens as f64,
        io.read_bytes_per_second() / 1e9,
    )
}

/// The whole report for a `generate` run.
pub fn report(config: &ModelConfig, stats: &GenerationStats) -> String {
    let mut out = section("prefill", config, &stats.prefill_profile, &stats.prefill_io);
    out += &section("decode", config, &stats.decode_profile, &stats.decode_io);
    if let Some(v) = stats.decode_vram {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        out += &format!(
            "VRAM expert cache (decode): {} hits, {} misses ({:.1}% hits); {} layer steps routed on the GPU, \
             {} replayed from CUDA graphs; {:.2} GiB copied to the GPU; {:.2} of {:.2} GiB resident\n",
            v.hits,
            v.misses,
            100.0 * v.hits as f64 / (v.hits + v.misses).max(1) as f64,
            v.device_routed,
            v.replayed_steps,
            gib(v.uploaded_bytes),
            gib(v.resident_bytes),
            gib(v.budget_bytes),
        );
    }
    if let Some(rss) = peak_rss_bytes() {
        out += &format!("peak resident memory: {:.2} GiB\n", rss as f64 / (1u64 << 30) as f64);
    }
    out
}

/// The run's measurements as JSON, for benchmark scripts.
pub fn json(stats: &GenerationStats) -> serde_json::Value {
    let io = |t: &IoTotals| {
        serde_json::json!({
            "fetches": t.fetches, "cache_hits": t.cache_hits, "mapped": t.mapped, "page_cache_hits": t.page_cache_hits,
            "cold_reads": t.cold_reads, "unknown_reads": t.unknown_reads, "bytes_read": t.bytes_read,
            "bytes_cold": t.bytes_cold, "io_busy_seconds": t.io_window_nanos as f64 * 1e-9,
        })
    };
    let phases = |p: &Profile| {
        let total = p.total();
        Phase::ALL
            .iter()
            .map(|&ph| (ph.label().to_string(), serde_json::json!(total.get(ph).as_secs_f64())))
            .collect::<serde_json::Map<_, _>>()
    };
    serde_json::json!({
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prefill_seconds": stats.prefill_time.as_secs_f64(),
        "decode_seconds": stats.decode_time.as_secs_f64(),
        "prefill_tokens_per_second": stats.prefill_tokens_per_second(),
        "decode_tokens_per_second": stats.decode_tokens_per_second(),
        "decode_calls": stats.decode_profile.calls,
        "prefill_io": io(&stats.prefill_io),
        "decode_io": io(&stats.decode_io),
        "decode_phase_seconds": phases(&stats.decode_profile),
        "decode_vram": stats.decode_vram.map(|v| serde_json::json!({
            "hits": v.hits, "misses": v.misses, "uploaded_bytes": v.uploaded_bytes,
            "device_routed": v.device_routed, "replayed_steps": v.replayed_steps,
            "resident_bytes": v.resident_bytes,
            "budget_bytes": v.budget_bytes,
        })),
        "peak_rss_bytes": peak_rss_bytes(),
    })
}
