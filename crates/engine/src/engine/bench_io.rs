//! `flash-moe bench-io`: what the disk gives for the decode access pattern, without any
//! compute: for each token and MoE layer, `k` random expert records read in parallel.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::index::sample;

use crate::error::Result;
use crate::model::config::{FfnKind, ModelConfig};
use crate::model::weights::WeightSource;
use crate::storage::layout::CheckpointWeights;
use crate::storage::store::{ExpertStore, StoreConfig};

/// What `bench_io` measured.
#[derive(Clone, Debug)]
pub struct IoBenchReport {
    pub layers: usize,
    pub experts_per_layer: usize,
    pub reads: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Wall time of each layer's batch of `k` reads.
    pub layer_times: Vec<Duration>,
}

impl IoBenchReport {
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-12)
    }

    /// The `q`-quantile (0..=1) of the per-layer batch time.
    pub fn layer_time_quantile(&self, q: f64) -> Duration {
        let mut t = self.layer_times.clone();
        t.sort();
        t.get(((t.len().saturating_sub(1)) as f64 * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// Reads `k` random experts per MoE layer for `tokens` tokens through a store configured by
/// `store` (direct I/O for a cold measurement).
pub fn bench_io(dir: &Path, k: usize, tokens: usize, store: StoreConfig, seed: u64) -> Result<IoBenchReport> {
    let config = ModelConfig::from_dir(dir)?;
    let store = ExpertStore::new(store);
    let weights = CheckpointWeights::open(dir, &config, Arc::clone(&store))?;
    let moe: Vec<usize> = (0..config.num_layers())
        .filter(|&i| config.ffn[i] == FfnKind::Moe)
        .collect();
    let sources = moe.iter().map(|&l| weights.experts(l)).collect::<Result<Vec<_>>>()?;
    let n = config.moe.num_experts;
    let k = k.min(n);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut layer_times = Vec::with_capacity(tokens * moe.len());
    let start = Instant::now();
    for _ in 0..tokens {
        for source in &sources {
            let mut chosen = sample(&mut rng, n, k).into_vec();
            chosen.sort_unstable();
            let t = Instant::now();
            for pending in source.fetch(&chosen)? {
                pending.wait()?;
            }
            layer_times.push(t.elapsed());
        }
    }
    let elapsed = start.elapsed();
    let totals = store.stats().totals();
    Ok(IoBenchReport {
        layers: moe.len(),
        experts_per_layer: k,
        reads: totals.fetches,
        bytes: totals.bytes_read,
        elapsed,
        layer_times,
    })
}
