//! Tier 1 of the expert cache: routed experts kept in VRAM under a byte budget.
//!
//! Eviction is least-recently-used with a second chance for experts that were hit before:
//! an evicted candidate with hits left is moved back to the front with one hit fewer, so an
//! expert used in many tokens outlives a burst of one-off ones (recency and frequency). When
//! a token's misses outnumber what the cache holds, a missed expert is kept only if it was
//! used more often lately than the expert it would evict (`admission`); otherwise it serves
//! its token and is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::admission::Admission;
use super::experts::LayerTable;
use super::{CudaBackend, CudaMatrix};
use crate::backend::ExpertCacheStats;
use crate::error::Result;
use crate::model::weights::ExpertView;

/// A routed expert in VRAM: gate, up and down.
#[derive(Clone)]
pub struct CudaExpert(Arc<[CudaMatrix; 3]>);

impl CudaExpert {
    pub(super) fn new(matrices: [CudaMatrix; 3]) -> Self {
        CudaExpert(Arc::new(matrices))
    }

    pub fn matrices(&self) -> [&CudaMatrix; 3] {
        let [g, u, d] = &*self.0;
        [g, u, d]
    }

    /// VRAM the expert occupies (its three matrices share one allocation).
    fn bytes(&self) -> u64 {
        self.0[0].mem.len() as u64
    }

    /// Orders the compute stream's work from now on after the expert's copy to the device.
    pub(super) fn ready(&self) -> Result<()> {
        self.0[0].mem.ready()
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
    /// Device memory an automatic budget leaves free for the sequence state.
    reserve: u64,
    stats: ExpertCacheStats,
    /// Resident experts per layer.
    per_layer: HashMap<usize, usize>,
    /// Device-side tables of the layers whose experts are all resident (`None`: they cannot
    /// run as one batch). Dropped when the layer loses an expert.
    tables: HashMap<usize, Option<Arc<LayerTable>>>,
    /// Lookups and misses per cycle of the layers, for the admission rule.
    admission: Admission,
}

pub struct VramCache {
    inner: Mutex<Inner>,
}

/// VRAM left free for everything else when the budget is chosen automatically.
const HEADROOM_BYTES: u64 = 2 << 30;

impl Inner {
    /// Books an expert that left the cache: its bytes, its layer's count, its layer's table.
    fn forget(&mut self, layer: usize, expert: &CudaExpert) {
        self.stats.resident_bytes -= expert.bytes();
        if let Some(n) = self.per_layer.get_mut(&layer) {
            *n = n.saturating_sub(1);
        }
        self.tables.remove(&layer);
    }
}

impl VramCache {
    /// `budget`: bytes for experts; `None` sizes it from free memory at first use.
    pub fn new(budget: Option<u64>) -> Self {
        VramCache {
            inner: Mutex::new(Inner {
                entries: lru::LruCache::unbounded(),
                budget,
                reserve: 0,
                stats: ExpertCacheStats::default(),
                per_layer: HashMap::new(),
                tables: HashMap::new(),
                admission: Admission::default(),
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
        inner.admission.record(layer, index, found.is_some());
        found
    }

    /// Whether expert `index` of `layer` is resident (not counted as a use).
    pub fn contains(&self, layer: usize, index: usize) -> bool {
        self.lock().entries.contains(&(layer, index))
    }

    /// The byte budget, sizing it from free memory now when it was left to the backend.
    pub fn budget(&self, backend: &CudaBackend) -> Result<u64> {
        Self::resolve_budget(&mut self.lock(), backend)
    }

    fn resolve_budget(inner: &mut Inner, backend: &CudaBackend) -> Result<u64> {
        if let Some(b) = inner.budget {
            return Ok(b);
        }
        let (free, _) = backend.memory()?;
        let b = (free as u64).saturating_sub(HEADROOM_BYTES + inner.reserve);
        inner.budget = Some(b);
        Ok(b)
    }

    /// Sets the memory an automatic budget, sized at first use, leaves for the sequence state
    /// (KV caches, recurrent state, snapshots) besides the headroom for activations.
    pub fn reserve(&self, bytes: u64) {
        self.lock().reserve = bytes;
    }

    /// Evicts the least recently used experts until `bytes` are freed or none is left, and
    /// lowers the budget to what stays, so that the cache does not grow back into the room
    /// made. Returns the bytes freed (on the device once the launches using them are done).
    pub fn release(&self, bytes: u64) -> u64 {
        let mut inner = self.lock();
        let mut freed = 0;
        while freed < bytes {
            let Some(((layer, _), entry)) = inner.entries.pop_lru() else {
                break;
            };
            freed += entry.expert.bytes();
            inner.forget(layer, &entry.expert);
        }
        if freed > 0 {
            inner.budget = Some(inner.stats.resident_bytes);
        }
        freed
    }

    /// Copies a fetched expert to the device and keeps it when the budget allows, evicting
    /// the least recently used (or, while the cache holds less than a cycle's misses, only
    /// colder ones).
    pub fn insert(&self, backend: &CudaBackend, layer: usize, index: usize, view: &ExpertView) -> Result<CudaExpert> {
        let expert = backend.upload_expert(view)?;
        let bytes = view.storage_bytes() as u64;
        let mut inner = self.lock();
        inner.stats.misses += 1;
        inner.stats.uploaded_bytes += bytes;
        let budget = Self::resolve_budget(&mut inner, backend)?;
        let size = expert.bytes();
        if size > budget {
            return Ok(expert);
        }
        let filtered = inner.admission.filters(size, budget);
        while inner.stats.resident_bytes + size > budget {
            let Some((&key, old)) = inner.entries.peek_lru() else {
                break;
            };
            if filtered && old.credit == 0 && !inner.admission.admits((layer, index), key) {
                return Ok(expert);
            }
            let Some((key, mut old)) = inner.entries.pop_lru() else {
                break;
            };
            if old.credit > 0 {
                old.credit -= 1;
                inner.entries.put(key, old);
                continue;
            }
            inner.forget(key.0, &old.expert);
        }
        inner.stats.resident_bytes += size;
        *inner.per_layer.entry(layer).or_default() += 1;
        let entry = Entry {
            expert: expert.clone(),
            credit: 0,
        };
        if let Some(replaced) = inner.entries.put((layer, index), entry) {
            inner.forget(layer, &replaced.expert);
        }
        Ok(expert)
    }

    /// The device-side table of `layer` when all `num_experts` of its experts are resident
    /// (built on first use), for routing on the device.
    pub fn layer_table(
        &self,
        backend: &CudaBackend,
        layer: usize,
        num_experts: usize,
    ) -> Result<Option<Arc<LayerTable>>> {
        let mut inner = self.lock();
        if let Some(table) = inner.tables.get(&layer) {
            return Ok(table.clone());
        }
        if inner.per_layer.get(&layer) != Some(&num_experts) {
            return Ok(None);
        }
        let experts: Option<Vec<CudaExpert>> = (0..num_experts)
            .map(|e| inner.entries.peek(&(layer, e)).map(|entry| entry.expert.clone()))
            .collect();
        let Some(experts) = experts else {
            return Ok(None);
        };
        let table = backend.layer_table(&experts)?.map(Arc::new);
        inner.tables.insert(layer, table.clone());
        Ok(table)
    }

    /// The table of `layer`, when it has one now (without building it).
    pub fn current_table(&self, layer: usize) -> Option<Arc<LayerTable>> {
        self.lock().tables.get(&layer).cloned().flatten()
    }

    /// Counts a layer step replayed from a recording.
    pub fn count_replayed(&self) {
        self.lock().stats.replayed_steps += 1;
    }

    /// Counts a layer step routed on the device and the `experts` it used (all hits).
    pub fn count_device_routed(&self, experts: usize) {
        let mut inner = self.lock();
        inner.stats.hits += experts as u64;
        inner.stats.device_routed += 1;
    }
}
