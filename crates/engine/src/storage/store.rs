//! The expert store: fetches a routed expert's bytes only when the router picks it.
//!
//! An expert is a *record*: the concatenation of a few byte ranges (*segments*) of one or
//! more files. A packed model (`flash-moe convert`) has one 4 KiB-aligned segment per expert;
//! a downloaded HF or MLX checkpoint has one segment per tensor slice (data, scales, biases
//! of gate, up and down). A [`RecordLayout`] says where each matrix sits in the record.
//!
//! Reads go through a persistent pool of I/O threads into recycled page-aligned buffers, all
//! experts of a call in flight at once, each one `pread` per segment, in page-cache or
//! `O_DIRECT` mode; an optional in-process LRU cache with a byte budget keeps hot experts.
//! Memory stays bounded: experts live only in those buffers and that cache.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::blob::Blob;
use super::io::{BufferPool, DIRECT_ALIGN, HostAllocator, IoMode, IoPool, PooledBuf, SourceFile, Warmth};
use super::quant::{Encoding, MatrixView};
use crate::error::{Error, Result};
use crate::model::weights::{ExpertSource, ExpertView, PendingExpert};

/// How experts reach memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertIo {
    /// Memory-map the files and let page faults bring experts in (RSS grows with use).
    Mmap,
    /// `pread` into the store's buffers.
    Read(IoMode),
}

/// Settings of an [`ExpertStore`].
#[derive(Clone)]
pub struct StoreConfig {
    pub io: ExpertIo,
    /// Byte budget of the in-process LRU expert cache (0: no cache).
    pub cache_bytes: u64,
    pub io_threads: usize,
    /// Where expert buffers come from (default: pageable, page-aligned heap memory).
    pub host_memory: Option<Arc<HostAllocator>>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            io: ExpertIo::Read(IoMode::PageCache),
            cache_bytes: 0,
            io_threads: 8,
            host_memory: None,
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("io", &self.io)
            .field("cache_bytes", &self.cache_bytes)
            .field("io_threads", &self.io_threads)
            .field("host_memory", &self.host_memory.as_ref().map(|_| "custom"))
            .finish()
    }
}

/// A byte range of a file.
#[derive(Clone)]
pub struct Segment {
    pub file: Arc<SourceFile>,
    pub offset: u64,
    pub len: usize,
}

/// Where one part (codes, scales or biases) of a matrix sits: in segment `segment`, at
/// `offset`, `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotAddr {
    pub segment: usize,
    pub offset: usize,
    pub len: usize,
}

/// One expert matrix: its shape and encoding, and where its parts are.
#[derive(Clone, Debug)]
pub struct MatrixSlots {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub encoding: Encoding,
    pub data: SlotAddr,
    pub scales: Option<SlotAddr>,
    pub biases: Option<SlotAddr>,
}

/// The layout of one layer's expert records: gate, up and down, and the segment lengths.
#[derive(Clone, Debug)]
pub struct RecordLayout {
    pub gate: MatrixSlots,
    pub up: MatrixSlots,
    pub down: MatrixSlots,
    pub segment_lens: Vec<usize>,
}

impl RecordLayout {
    pub fn record_bytes(&self) -> usize {
        self.segment_lens.iter().sum()
    }

    /// Builds expert `expert`'s matrices over the blobs of its segments.
    pub fn views(&self, segments: &[Blob], expert: usize) -> Result<ExpertView> {
        let matrix = |m: &MatrixSlots| {
            let part = |a: SlotAddr| segments[a.segment].sub(a.offset, a.len);
            let name = format!("{}[{expert}]", m.name);
            match (m.encoding, m.scales, m.biases) {
                (Encoding::Dense(dtype), _, _) => MatrixView::dense(&name, m.rows, m.cols, dtype, part(m.data)),
                (
                    Encoding::Affine {
                        bits,
                        group_size,
                        scale_dtype,
                    },
                    Some(s),
                    Some(b),
                ) => MatrixView::affine(
                    &name,
                    m.rows,
                    m.cols,
                    bits,
                    group_size,
                    scale_dtype,
                    part(m.data),
                    part(s),
                    part(b),
                ),
                _ => Err(Error::Quantization {
                    name,
                    message: "affine matrix without scales and biases".into(),
                }),
            }
        };
        Ok(ExpertView {
            gate: matrix(&self.gate)?,
            up: matrix(&self.up)?,
            down: matrix(&self.down)?,
        })
    }
}

/// Says where each expert of one layer lives.
pub trait ExpertLocator: Send + Sync {
    fn layout(&self) -> &RecordLayout;
    fn count(&self) -> usize;
    /// The segments of `expert`, in the order and lengths of `layout().segment_lens`.
    fn segments(&self, expert: usize) -> Vec<Segment>;
    /// The xxh3-64 of the record's bytes, when the format records one.
    fn checksum(&self, _expert: usize) -> Option<u64> {
        None
    }
}

/// Counters of the store's work, shared by all layers; read them at any time.
#[derive(Debug, Default)]
pub struct IoStats {
    /// Experts handed to the model.
    pub fetches: AtomicU64,
    /// Served by the in-process cache.
    pub cache_hits: AtomicU64,
    /// Handed over in place from the memory-mapped files.
    pub mapped: AtomicU64,
    /// Read from the OS page cache without touching the device.
    pub page_cache_hits: AtomicU64,
    /// Read at least partly from the device.
    pub cold_reads: AtomicU64,
    /// Read with no way to tell (kernel without `RWF_NOWAIT`).
    pub unknown_reads: AtomicU64,
    /// Bytes read from files (page cache or device).
    pub bytes_read: AtomicU64,
    /// Bytes of the reads that touched the device (cold or unknown).
    pub bytes_cold: AtomicU64,
    /// Wall time during which at least one read was in progress.
    pub io_window_nanos: AtomicU64,
    busy: BusyClock,
}

/// A snapshot of [`IoStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoTotals {
    pub fetches: u64,
    pub cache_hits: u64,
    pub mapped: u64,
    pub page_cache_hits: u64,
    pub cold_reads: u64,
    pub unknown_reads: u64,
    pub bytes_read: u64,
    pub bytes_cold: u64,
    pub io_window_nanos: u64,
}

impl IoStats {
    pub fn totals(&self) -> IoTotals {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoTotals {
            fetches: get(&self.fetches),
            cache_hits: get(&self.cache_hits),
            mapped: get(&self.mapped),
            page_cache_hits: get(&self.page_cache_hits),
            cold_reads: get(&self.cold_reads),
            unknown_reads: get(&self.unknown_reads),
            bytes_read: get(&self.bytes_read),
            bytes_cold: get(&self.bytes_cold),
            io_window_nanos: get(&self.io_window_nanos),
        }
    }
}

impl IoTotals {
    /// The difference `self - earlier`.
    pub fn since(&self, earlier: &IoTotals) -> IoTotals {
        IoTotals {
            fetches: self.fetches - earlier.fetches,
            cache_hits: self.cache_hits - earlier.cache_hits,
            mapped: self.mapped - earlier.mapped,
            page_cache_hits: self.page_cache_hits - earlier.page_cache_hits,
            cold_reads: self.cold_reads - earlier.cold_reads,
            unknown_reads: self.unknown_reads - earlier.unknown_reads,
            bytes_read: self.bytes_read - earlier.bytes_read,
            bytes_cold: self.bytes_cold - earlier.bytes_cold,
            io_window_nanos: self.io_window_nanos - earlier.io_window_nanos,
        }
    }

    /// Read throughput while reads were in flight, in bytes per second.
    pub fn read_bytes_per_second(&self) -> f64 {
        self.bytes_read as f64 / (self.io_window_nanos as f64 * 1e-9).max(1e-12)
    }
}

/// An LRU of whole expert records with a byte budget.
struct ExpertCache {
    entries: lru::LruCache<(usize, usize), Blob>,
    bytes: u64,
    budget: u64,
}

impl ExpertCache {
    fn get(&mut self, key: (usize, usize)) -> Option<Blob> {
        self.entries.get(&key).cloned()
    }

    fn insert(&mut self, key: (usize, usize), blob: Blob) {
        let len = blob.len() as u64;
        if len > self.budget || self.entries.contains(&key) {
            return;
        }
        while self.bytes + len > self.budget {
            match self.entries.pop_lru() {
                Some((_, old)) => self.bytes -= old.len() as u64,
                None => break,
            }
        }
        self.bytes += len;
        self.entries.put(key, blob);
    }
}

/// Fetches experts for every layer of a model.
pub struct ExpertStore {
    config: StoreConfig,
    io: IoPool,
    buffers: Arc<BufferPool>,
    cache: Option<Mutex<ExpertCache>>,
    stats: Arc<IoStats>,
    /// Records whose checksum has been checked once already.
    verified: Arc<Mutex<HashSet<(usize, usize)>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ExpertStore {
    pub fn new(config: StoreConfig) -> Arc<Self> {
        let cache = (config.cache_bytes > 0).then(|| {
            Mutex::new(ExpertCache {
                entries: lru::LruCache::unbounded(),
                bytes: 0,
                budget: config.cache_bytes,
            })
        });
        Arc::new(ExpertStore {
            io: IoPool::new(config.io_threads),
            // Enough idle buffers for a few layers' worth of experts in flight.
            buffers: match &config.host_memory {
                Some(alloc) => BufferPool::with_allocator(256 << 20, Arc::clone(alloc)),
                None => BufferPool::new(256 << 20),
            },
            cache,
            stats: Arc::default(),
            verified: Arc::default(),
            config,
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Reads submitted ahead of the expert being waited for: enough to keep every I/O
    /// thread busy while the model computes.
    fn read_ahead(&self) -> usize {
        (2 * self.config.io_threads).max(4)
    }

    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// The experts of `layer`, read through this store.
    pub fn layer(self: &Arc<Self>, layer: usize, locator: Arc<dyn ExpertLocator>) -> Arc<dyn ExpertSource> {
        Arc::new(StoreExperts {
            store: Arc::clone(self),
            layer,
            locator,
        })
    }
}

/// Reads one expert record on the calling thread: each segment lands at a page-aligned
/// offset of one buffer. Returns the record, whether it came from the page cache, and the
/// bytes read.
pub fn read_record(
    buffers: &Arc<BufferPool>,
    mode: IoMode,
    layout: &RecordLayout,
    segments: &[Segment],
) -> Result<(Blob, Warmth, u64)> {
    let aligned = |x: usize| x.next_multiple_of(DIRECT_ALIGN);
    // Segments are placed at aligned offsets so direct reads can land in place.
    let starts: Vec<usize> = layout
        .segment_lens
        .iter()
        .scan(0, |pos, &len| {
            let start = *pos;
            *pos += aligned(len);
            Some(start)
        })
        .collect();
    let total = starts
        .last()
        .map_or(0, |s| s + aligned(*layout.segment_lens.last().unwrap_or(&0)));
    let mut buf = buffers.take(total.max(DIRECT_ALIGN));
    let mut warmth = Warmth::Warm;
    let mut bytes = 0u64;
    for (seg, &start) in segments.iter().zip(&starts) {
        let w = match mode {
            IoMode::PageCache => seg
                .file
                .read_cached(&mut buf.as_mut_slice()[start..start + seg.len], seg.offset)?,
            IoMode::Direct => read_direct(buffers, seg, &mut buf.as_mut_slice()[start..start + aligned(seg.len)])?,
        };
        bytes += seg.len as u64;
        warmth = match (warmth, w) {
            (Warmth::Cold, _) | (_, Warmth::Cold) => Warmth::Cold,
            (Warmth::Unknown, _) | (_, Warmth::Unknown) => Warmth::Unknown,
            _ => Warmth::Warm,
        };
    }
    Ok((buf.into_blob(total.max(DIRECT_ALIGN)), warmth, bytes))
}

/// Direct read of a segment into `dst` (page-aligned, the segment length rounded up to a
/// page): in place when the file offset is aligned, else through an aligned bounce buffer.
fn read_direct(buffers: &Arc<BufferPool>, seg: &Segment, dst: &mut [u8]) -> Result<Warmth> {
    let align = DIRECT_ALIGN as u64;
    let needed = seg.offset + seg.len as u64;
    if seg.offset.is_multiple_of(align) {
        seg.file.read_direct(dst, seg.offset, needed)?;
        return Ok(Warmth::Cold);
    }
    let start = seg.offset - seg.offset % align;
    let mut bounce: PooledBuf = buffers.take((needed.next_multiple_of(align) - start) as usize);
    seg.file.read_direct(bounce.as_mut_slice(), start, needed)?;
    let skip = (seg.offset - start) as usize;
    dst[..seg.len].copy_from_slice(&bounce.as_ref()[skip..skip + seg.len]);
    Ok(Warmth::Cold)
}

/// The experts of one layer, fetched through a store.
struct StoreExperts {
    store: Arc<ExpertStore>,
    layer: usize,
    locator: Arc<dyn ExpertLocator>,
}

impl StoreExperts {
    fn segment_blobs(&self, record: &Blob) -> Vec<Blob> {
        let mut pos = 0;
        self.locator
            .layout()
            .segment_lens
            .iter()
            .map(|&len| {
                let b = record.sub(pos, len);
                pos += len.next_multiple_of(DIRECT_ALIGN);
                b
            })
            .collect()
    }

    /// Expert `expert` in the mapped files. The first time, it is checked against its
    /// checksum on an I/O thread (all of a fetch's experts side by side) before it is handed
    /// over.
    fn mapped(&self, expert: usize) -> Result<PendingExpert> {
        let segments = self.locator.segments(expert);
        let blobs = segments
            .iter()
            .map(|s| Ok(s.file.mapped()?.sub(s.offset as usize, s.len)))
            .collect::<Result<Vec<_>>>()?;
        let view = self.locator.layout().views(&blobs, expert)?;
        let key = (self.layer, expert);
        let Some(expected) = self.locator.checksum(expert) else {
            return Ok(PendingExpert::ready(view));
        };
        if lock(&self.store.verified).contains(&key) {
            return Ok(PendingExpert::ready(view));
        }
        let (sender, receiver) = crossbeam_channel::bounded(1);
        let verified = Arc::clone(&self.store.verified);
        self.store.io.spawn(move || {
            let _ = sender.send(verify_once(&verified, key, &blobs, &segments, expected));
        });
        let layer = self.layer;
        Ok(PendingExpert::deferred(move || {
            let checked = receiver
                .recv()
                .unwrap_or_else(|_| Err(Error::InvalidInput("the I/O thread stopped".into())));
            checked.map(|()| view).map_err(in_expert(layer, expert))
        }))
    }

    fn context(&self, expert: usize) -> impl Fn(Error) -> Error + Copy {
        in_expert(self.layer, expert)
    }
}

/// Wraps an error with the layer and expert it concerns.
fn in_expert(layer: usize, expert: usize) -> impl Fn(Error) -> Error + Copy {
    move |error| Error::Expert {
        layer,
        expert,
        error: Box::new(error),
    }
}

impl ExpertSource for StoreExperts {
    fn num_experts(&self) -> usize {
        self.locator.count()
    }

    fn fetch(&self, experts: &[usize]) -> Result<Vec<PendingExpert>> {
        let stats = &self.store.stats;
        stats.fetches.fetch_add(experts.len() as u64, Ordering::Relaxed);
        if let Some(&bad) = experts.iter().find(|&&e| e >= self.locator.count()) {
            return Err(Error::InvalidInput(format!(
                "layer {}: expert {bad} of {}",
                self.layer,
                self.locator.count()
            )));
        }
        let mode = match self.store.config.io {
            ExpertIo::Mmap => {
                stats.mapped.fetch_add(experts.len() as u64, Ordering::Relaxed);
                return experts
                    .iter()
                    .map(|&e| self.mapped(e).map_err(self.context(e)))
                    .collect();
            }
            ExpertIo::Read(mode) => mode,
        };
        let queue = Arc::new(FetchQueue::default());
        let mut pending = Vec::with_capacity(experts.len());
        for (position, &e) in experts.iter().enumerate() {
            let cached = self.store.cache.as_ref().and_then(|c| lock(c).get((self.layer, e)));
            if let Some(record) = cached {
                stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                let view = self
                    .locator
                    .layout()
                    .views(&self.segment_blobs(&record), e)
                    .map_err(self.context(e))?;
                pending.push(PendingExpert::ready(view));
                continue;
            }
            let (sender, receiver) = crossbeam_channel::bounded(1);
            let job = ReadJob {
                buffers: Arc::clone(&self.store.buffers),
                stats: Arc::clone(&self.store.stats),
                verified: Arc::clone(&self.store.verified),
                layout: self.locator.layout().clone(),
                segments: self.locator.segments(e),
                checksum: self.locator.checksum(e),
                key: (self.layer, e),
                mode,
            };
            queue.push(position, job, sender);
            let store = Arc::clone(&self.store);
            let queue = Arc::clone(&queue);
            let layout = self.locator.layout().clone();
            let layer = self.layer;
            pending.push(PendingExpert::deferred(move || {
                let wrap = in_expert(layer, e);
                queue.submit_through(&store, position + store.read_ahead());
                let record = receiver
                    .recv()
                    .map_err(|_| wrap(Error::InvalidInput("the I/O thread stopped".into())))?
                    .map_err(wrap)?;
                if let Some(cache) = &store.cache {
                    lock(cache).insert((layer, e), record.clone());
                }
                let blobs = split_segments(&record, &layout.segment_lens);
                layout.views(&blobs, e).map_err(wrap)
            }));
        }
        queue.submit_through(&self.store, self.store.read_ahead().saturating_sub(1));
        Ok(pending)
    }
}

fn split_segments(record: &Blob, lens: &[usize]) -> Vec<Blob> {
    let mut pos = 0;
    lens.iter()
        .map(|&len| {
            let b = record.sub(pos, len);
            pos += len.next_multiple_of(DIRECT_ALIGN);
            b
        })
        .collect()
}

/// The reads of one fetch call not yet handed to the I/O threads. Reads are submitted a
/// window ahead of the expert the model waits for, so a prompt touching hundreds of experts
/// never holds more than the window's buffers at once.
#[derive(Default)]
struct FetchQueue {
    waiting: Mutex<std::collections::VecDeque<QueuedRead>>,
}

/// A read waiting for its turn: its position in the fetch call, the job, where the result goes.
type QueuedRead = (usize, ReadJob, crossbeam_channel::Sender<Result<Blob>>);

impl FetchQueue {
    fn push(&self, position: usize, job: ReadJob, sender: crossbeam_channel::Sender<Result<Blob>>) {
        lock(&self.waiting).push_back((position, job, sender));
    }

    /// Submits every queued read at a position up to `last`.
    fn submit_through(&self, store: &ExpertStore, last: usize) {
        let mut waiting = lock(&self.waiting);
        while waiting.front().is_some_and(|(p, _, _)| *p <= last) {
            if let Some((_, job, sender)) = waiting.pop_front() {
                store.io.spawn(move || {
                    let _ = sender.send(job.run());
                });
            }
        }
    }
}

/// Tracks the wall time during which at least one read is in progress.
#[derive(Debug, Default)]
struct BusyClock {
    in_flight: AtomicUsize,
    since: Mutex<Option<Instant>>,
}

impl BusyClock {
    fn start(&self) {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            *lock(&self.since) = Some(Instant::now());
        }
    }

    fn stop(&self, stats: &IoStats) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(since) = lock(&self.since).take()
        {
            stats
                .io_window_nanos
                .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// One expert read, run on an I/O thread.
struct ReadJob {
    buffers: Arc<BufferPool>,
    stats: Arc<IoStats>,
    verified: Arc<Mutex<HashSet<(usize, usize)>>>,
    layout: RecordLayout,
    segments: Vec<Segment>,
    checksum: Option<u64>,
    key: (usize, usize),
    mode: IoMode,
}

impl ReadJob {
    fn run(self) -> Result<Blob> {
        self.stats.busy.start();
        let result = read_record(&self.buffers, self.mode, &self.layout, &self.segments);
        self.stats.busy.stop(&self.stats);
        let (record, warmth, bytes) = result?;
        let s = &self.stats;
        s.bytes_read.fetch_add(bytes, Ordering::Relaxed);
        match warmth {
            Warmth::Warm => s.page_cache_hits.fetch_add(1, Ordering::Relaxed),
            Warmth::Cold => s.cold_reads.fetch_add(1, Ordering::Relaxed),
            Warmth::Unknown => s.unknown_reads.fetch_add(1, Ordering::Relaxed),
        };
        if warmth != Warmth::Warm {
            s.bytes_cold.fetch_add(bytes, Ordering::Relaxed);
        }
        if let Some(expected) = self.checksum {
            self.verify(&record, expected)?;
        }
        Ok(record)
    }

    /// Checks a record against its recorded xxh3 the first time it is read.
    fn verify(&self, record: &Blob, expected: u64) -> Result<()> {
        let blobs = split_segments(record, &self.layout.segment_lens);
        verify_once(&self.verified, self.key, &blobs, &self.segments, expected)
    }
}

/// Checks an expert's segments (`blobs`, read or mapped from `segments`) against the xxh3
/// its manifest records, unless `verified` already holds `key`; adds it when they match.
fn verify_once(
    verified: &Mutex<HashSet<(usize, usize)>>,
    key: (usize, usize),
    blobs: &[Blob],
    segments: &[Segment],
    expected: u64,
) -> Result<()> {
    if lock(verified).contains(&key) {
        return Ok(());
    }
    // twox-hash picks AVX2 at run time (xxhash-rust compiled SSE2 for baseline x86-64): the
    // first use of each mapped expert hashes it, 1.5x faster.
    let mut hasher = twox_hash::XxHash3_64::default();
    for b in blobs {
        std::hash::Hasher::write(&mut hasher, b.bytes());
    }
    let found = std::hash::Hasher::finish(&hasher);
    if found != expected {
        let file = segments
            .first()
            .map(|s| s.file.path.display().to_string())
            .unwrap_or_default();
        return Err(Error::InvalidInput(format!(
            "{file}: expert record is corrupted (xxh3 {found:016x}, manifest says {expected:016x}); \
             run `flash-moe verify` on the model"
        )));
    }
    lock(verified).insert(key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(len: usize) -> Blob {
        Blob::from_vec(vec![0; len])
    }

    #[test]
    fn cache_evicts_least_recently_used_within_budget() {
        let mut cache = ExpertCache {
            entries: lru::LruCache::unbounded(),
            bytes: 0,
            budget: 300,
        };
        cache.insert((0, 1), blob(100));
        cache.insert((0, 2), blob(100));
        cache.insert((0, 3), blob(100));
        assert!(cache.get((0, 1)).is_some(), "touch 1 so 2 is the oldest");
        cache.insert((0, 4), blob(100));
        assert!(cache.get((0, 2)).is_none());
        assert!(cache.get((0, 1)).is_some() && cache.get((0, 4)).is_some());
        assert_eq!(cache.bytes, 300);
        cache.insert((0, 5), blob(400));
        assert!(cache.get((0, 5)).is_none(), "larger than the budget: not cached");
    }
}
