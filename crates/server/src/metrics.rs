//! Counters for `GET /metrics`, in the Prometheus text format.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use flash_moe_engine::backend::ExpertCacheStats;
use flash_moe_engine::engine::session::{Completion, FinishReason};

/// Extra metric lines from outside the server (the expert store, the GPU cache).
pub type ExtraMetrics = Box<dyn Fn() -> String + Send + Sync>;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<Vec<(String, u16, u64)>>,
    waiting: AtomicI64,
    running: AtomicI64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    cancelled: AtomicU64,
    prefill_nanos: AtomicU64,
    decode_nanos: AtomicU64,
    busy_nanos: AtomicU64,
    /// Decode tok/s of the last finished request, as f64 bits.
    last_decode_rate: AtomicU64,
    extra: Option<ExtraMetrics>,
    vram_cache: Mutex<Option<ExpertCacheStats>>,
}

impl Metrics {
    pub fn new(extra: Option<ExtraMetrics>) -> Self {
        Metrics {
            extra,
            ..Default::default()
        }
    }

    pub fn record_request(&self, endpoint: &str, status: u16) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        match requests.iter_mut().find(|(e, s, _)| e == endpoint && *s == status) {
            Some(entry) => entry.2 += 1,
            None => requests.push((endpoint.to_string(), status, 1)),
        }
    }

    pub fn waiting_changed(&self, by: i64) {
        self.waiting.fetch_add(by, Ordering::Relaxed);
    }

    pub fn running_changed(&self, by: i64) {
        self.running.fetch_add(by, Ordering::Relaxed);
    }

    pub fn record_cancelled_in_queue(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_completion(&self, done: &Completion, busy: Duration) {
        let add = |a: &AtomicU64, v: u64| a.fetch_add(v, Ordering::Relaxed);
        add(&self.prompt_tokens, done.prompt_tokens as u64);
        add(&self.cached_tokens, done.cached_tokens as u64);
        add(&self.generated_tokens, done.completion_tokens as u64);
        add(&self.prefill_nanos, done.prefill_time.as_nanos() as u64);
        add(&self.decode_nanos, done.decode_time.as_nanos() as u64);
        add(&self.busy_nanos, busy.as_nanos() as u64);
        if done.finish == FinishReason::Cancelled {
            add(&self.cancelled, 1);
        }
        if done.completion_tokens > 1 {
            let rate = (done.completion_tokens - 1) as f64 / done.decode_time.as_secs_f64().max(1e-9);
            self.last_decode_rate.store(rate.to_bits(), Ordering::Relaxed);
        }
    }

    /// The GPU expert cache's counters, as of the last finished request.
    pub fn set_vram_cache(&self, stats: Option<ExpertCacheStats>) {
        *self.vram_cache.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP flash_moe_requests_total HTTP requests by endpoint and status.\n");
        out.push_str("# TYPE flash_moe_requests_total counter\n");
        for (endpoint, status, n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "flash_moe_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        };
        let secs = |a: &AtomicU64| format!("{:.6}", get(a) as f64 * 1e-9);
        let gauge = |a: &AtomicI64| a.load(Ordering::Relaxed).to_string();
        metric(
            "flash_moe_requests_waiting",
            "gauge",
            "Requests queued for the engine.",
            gauge(&self.waiting),
        );
        metric(
            "flash_moe_requests_running",
            "gauge",
            "Requests the engine is running.",
            gauge(&self.running),
        );
        metric(
            "flash_moe_requests_cancelled_total",
            "counter",
            "Requests whose client went away.",
            get(&self.cancelled).to_string(),
        );
        metric(
            "flash_moe_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished requests.",
            get(&self.prompt_tokens).to_string(),
        );
        metric(
            "flash_moe_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens restored from a prefix snapshot.",
            get(&self.cached_tokens).to_string(),
        );
        metric(
            "flash_moe_generation_tokens_total",
            "counter",
            "Tokens generated.",
            get(&self.generated_tokens).to_string(),
        );
        metric(
            "flash_moe_prefill_seconds_total",
            "counter",
            "Time spent on prompts.",
            secs(&self.prefill_nanos),
        );
        metric(
            "flash_moe_decode_seconds_total",
            "counter",
            "Time spent generating.",
            secs(&self.decode_nanos),
        );
        metric(
            "flash_moe_engine_busy_seconds_total",
            "counter",
            "Time the engine spent on requests.",
            secs(&self.busy_nanos),
        );
        let rate = f64::from_bits(get(&self.last_decode_rate));
        metric(
            "flash_moe_decode_tokens_per_second",
            "gauge",
            "Decode rate of the last finished request.",
            format!("{rate:.3}"),
        );
        if let Some(c) = *self.vram_cache.lock().unwrap_or_else(|p| p.into_inner()) {
            let rows = [
                (
                    "flash_moe_gpu_expert_cache_hits_total",
                    "counter",
                    "Routed experts found in VRAM.",
                    c.hits,
                ),
                (
                    "flash_moe_gpu_expert_cache_misses_total",
                    "counter",
                    "Routed experts uploaded to VRAM.",
                    c.misses,
                ),
                (
                    "flash_moe_gpu_expert_cache_resident_bytes",
                    "gauge",
                    "VRAM held by cached experts.",
                    c.resident_bytes,
                ),
                (
                    "flash_moe_gpu_layer_steps_routed_total",
                    "counter",
                    "Layer steps of one token routed on the GPU, with no round trip to the host.",
                    c.device_routed,
                ),
                (
                    "flash_moe_gpu_layer_steps_replayed_total",
                    "counter",
                    "Layer steps of one token replayed from a CUDA graph.",
                    c.replayed_steps,
                ),
            ];
            for (name, kind, help, value) in rows {
                metric(name, kind, help, value.to_string());
            }
        }
        if let Some(extra) = &self.extra {
            out.push_str(&extra());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_expert_cache_shows_only_when_there_is_one() {
        let m = Metrics::new(None);
        assert!(!m.render().contains("flash_moe_gpu_"));
        m.set_vram_cache(Some(ExpertCacheStats {
            hits: 7,
            misses: 3,
            device_routed: 5,
            replayed_steps: 2,
            resident_bytes: 4096,
            ..Default::default()
        }));
        let text = m.render();
        for line in [
            "flash_moe_gpu_expert_cache_hits_total 7",
            "flash_moe_gpu_expert_cache_misses_total 3",
            "flash_moe_gpu_expert_cache_resident_bytes 4096",
            "flash_moe_gpu_layer_steps_routed_total 5",
            "flash_moe_gpu_layer_steps_replayed_total 2",
            "# TYPE flash_moe_gpu_layer_steps_replayed_total counter",
            "# TYPE flash_moe_gpu_expert_cache_resident_bytes gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
