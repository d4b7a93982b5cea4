//! Tier 1 of the expert cache: routed experts kept in VRAM under a byte budget.
//!
//! Eviction is least-recently-used with a second chance for experts that were hit before:
//! an evicted candidate with hits left is moved back to the front with one hit fewer, so an
//! expert used in many tokens outlives a burst of one-off ones (recency and frequency).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{CudaBackend, CudaMatrix};
use crate::backend::ExpertCacheStats;
use crate::error::Result;
use crate::model::weights::ExpertView;

/// A routed expert in VRAM: gate, up and down.
#[derive(Clone)]
pub struct CudaExpert(Arc<[CudaMatrix; 3]>);

impl CudaExpert {
    pub fn matrices(&self) -> [&CudaMatrix; 3] {
        let [g, u, d] = &*self.0;
        [g, u, d]
    }

    /// VRAM the expert occupies (its three matrices share one allocation).
    fn bytes(&self) -> u64 {
        self.0[0].mem.len() as u64
    }
}

struct Entry {
    expert: CudaExpert,
    /// Second chances left (hits since insertion, capped).
    credit: u8,
}

struct Inner {
    entries: lru::LruCache<(usize, usize), Entry>,
    /// Resolved on first use when it was left to the backend.
    budget: Option<u64>,
    stats: ExpertCacheStats,
}

pub struct VramCache {
    inner: Mutex<Inner>,
}

/// VRAM left free for everything else when the budget is chosen automatically.
const HEADROOM_BYTES: u64 = 2 << 30;

impl VramCache {
    /// `budget`: bytes for experts; `None` sizes it from free memory at the first insert.
    pub fn new(budget: Option<u64>) -> Self {
        VramCache {
            inner: Mutex::new(Inner {
                entries: lru::LruCache::unbounded(),
                budget,
                stats: ExpertCacheStats::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn stats(&self) -> ExpertCacheStats {
        let inner = self.lock();
        ExpertCacheStats {
            budget_bytes: inner.budget.unwrap_or(0),
            ..inner.stats
        }
    }

    pub fn get(&self, layer: usize, index: usize) -> Option<CudaExpert> {
        let mut inner = self.lock();
        let found = inner.entries.get_mut(&(layer, index)).map(|e| {
            e.credit = e.credit.saturating_add(1).min(3);
            e.expert.clone()
        });
        if found.is_some() {
            inner.stats.hits += 1;
        }
        found
    }

    /// Copies a fetched expert to the device and keeps it when the budget allows.
    pub fn insert(&self, backend: &CudaBackend, layer: usize, index: usize, view: &ExpertView) -> Result<CudaExpert> {
        let expert = CudaExpert(Arc::new(backend.upload_expert(view)?));
        let bytes = view.storage_bytes() as u64;
        let mut inner = self.lock();
        inner.stats.misses += 1;
        inner.stats.uploaded_bytes += bytes;
        let budget = match inner.budget {
            Some(b) => b,
            None => {
                let (free, _) = backend.memory()?;
                let b = (free as u64).saturating_sub(HEADROOM_BYTES);
                inner.budget = Some(b);
                b
            }
        };
        let size = expert.bytes();
        if size > budget {
            return Ok(expert);
        }
        while inner.stats.resident_bytes + size > budget {
            let Some((key, mut old)) = inner.entries.pop_lru() else {
                break;
            };
            if old.credit > 0 {
                old.credit -= 1;
                inner.entries.put(key, old);
                continue;
            }
            inner.stats.resident_bytes -= old.expert.bytes();
        }
        inner.stats.resident_bytes += size;
        inner.entries.put(
            (layer, index),
            Entry {
                expert: expert.clone(),
                credit: 0,
            },
        );
        Ok(expert)
    }
}
