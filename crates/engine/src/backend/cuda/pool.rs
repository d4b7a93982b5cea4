//! Reuse of activation buffers between operations.
//!
//! Decode makes a few dozen short-lived activation tensors per layer, each of a size seen
//! before. Asking the driver for each one (`cuMemAllocAsync`, then `cuMemFreeAsync` when it
//! is dropped) costs two driver calls per operation on the host, which at one token is
//! launch-bound time the GPU spends waiting. A dropped buffer goes back to a free list keyed
//! by its exact length instead and serves the next request of that length.
//!
//! Reuse is safe because every operation runs on the one stream the pool belongs to: work
//! that used a buffer before it was returned is ordered before work that uses it after.
//!
//! While a layer step is recorded into a CUDA graph, the pool notes the buffers the step
//! uses: the graph keeps them (its kernels have their addresses baked in), so they leave the
//! free lists when the recording ends.

use std::collections::{HashMap, HashSet};
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::out_of_memory;
use crate::error::Result;

/// At most this many bytes wait in the free lists; beyond it, dropped buffers are freed. It
/// holds a layer's decode activations many times over and a prefill chunk's several times.
const POOL_BYTES: usize = 256 << 20;

/// Free device buffers of one stream, by length in floats.
pub(super) struct BufferPool {
    stream: Arc<CudaStream>,
    free: Mutex<FreeLists>,
}

#[derive(Default)]
struct FreeLists {
    by_len: HashMap<usize, Vec<CudaSlice<f32>>>,
    bytes: usize,
    /// Set while a graph is recorded.
    recording: Option<Recording>,
}

/// The buffers of a recording, by device address: those handed out and not yet back, and
/// those that came back.
#[derive(Default)]
struct Recording {
    out: HashSet<u64>,
    returned: HashSet<u64>,
}

fn address(slice: &CudaSlice<f32>, stream: &CudaStream) -> u64 {
    slice.device_ptr(stream).0
}

impl BufferPool {
    pub(super) fn new(stream: Arc<CudaStream>) -> Arc<Self> {
        Arc::new(BufferPool {
            stream,
            free: Mutex::default(),
        })
    }

    fn lists(&self) -> MutexGuard<'_, FreeLists> {
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A buffer of exactly `len` floats (at least one), contents undefined.
    pub(super) fn take(self: &Arc<Self>, len: usize) -> Result<PooledBuf> {
        let len = len.max(1);
        let reused = {
            let mut lists = self.lists();
            let slice = lists.by_len.get_mut(&len).and_then(Vec::pop);
            if let Some(slice) = &slice {
                lists.bytes -= 4 * len;
                if let Some(rec) = lists.recording.as_mut() {
                    rec.out.insert(address(slice, &self.stream));
                }
            } else if lists.recording.is_some() {
                // An allocation would become part of the graph; the step runs unrecorded.
                return Err(crate::error::Error::Cuda(
                    "no free buffer while recording a graph".into(),
                ));
            }
            slice
        };
        let slice = match reused {
            Some(slice) => slice,
            // SAFETY: callers write a buffer before reading it, or zero it (`CudaBackend::alloc`).
            None => unsafe { self.stream.alloc::<f32>(len) }.map_err(|e| out_of_memory(e, "activations", 4 * len))?,
        };
        Ok(PooledBuf {
            slice: ManuallyDrop::new(slice),
            pool: Arc::clone(self),
        })
    }

    /// Frees every buffer waiting in the free lists (to make room on a full device).
    pub(super) fn clear(&self) {
        let mut lists = self.lists();
        if lists.recording.is_none() {
            lists.by_len.clear();
            lists.bytes = 0;
        }
    }

    fn give_back(&self, slice: CudaSlice<f32>) {
        let bytes = 4 * slice.len();
        let mut lists = self.lists();
        if let Some(rec) = lists.recording.as_mut() {
            let at = address(&slice, &self.stream);
            rec.out.remove(&at);
            rec.returned.insert(at);
        }
        // While recording, a free would become part of the graph: every buffer is kept.
        if lists.bytes + bytes <= POOL_BYTES || lists.recording.is_some() {
            lists.bytes += bytes;
            lists.by_len.entry(slice.len()).or_default().push(slice);
        }
        // Otherwise `slice` is dropped here: an ordinary stream-ordered free.
    }

    /// Starts noting the buffers handed out and returned, for a graph being recorded; until
    /// `finish_recording`, a request no free buffer can serve fails instead of allocating.
    pub(super) fn start_recording(&self) {
        self.lists().recording = Some(Recording::default());
    }

    /// Ends the recording. With `keep`, the buffers the recording used leave the free lists
    /// for the graph to hold (given back to the pool when it is dropped), or `None` when one
    /// it handed out was not returned (something outlives the step: not recordable).
    pub(super) fn finish_recording(&self, keep: bool) -> Option<Vec<CudaSlice<f32>>> {
        let mut lists = self.lists();
        let rec = lists.recording.take()?;
        if !keep || !rec.out.is_empty() {
            return None;
        }
        let mut held = Vec::with_capacity(rec.returned.len());
        let lists = &mut *lists;
        for slices in lists.by_len.values_mut() {
            let (used, free): (Vec<_>, Vec<_>) = std::mem::take(slices)
                .into_iter()
                .partition(|s| rec.returned.contains(&address(s, &self.stream)));
            *slices = free;
            held.extend(used);
        }
        lists.bytes -= held.iter().map(|s| 4 * s.len()).sum::<usize>();
        Some(held)
    }

    /// Returns buffers a graph held.
    pub(super) fn give_back_all(&self, slices: Vec<CudaSlice<f32>>) {
        for slice in slices {
            self.give_back(slice);
        }
    }
}

/// A device buffer that returns to its pool when dropped.
pub struct PooledBuf {
    slice: ManuallyDrop<CudaSlice<f32>>,
    pool: Arc<BufferPool>,
}

impl Deref for PooledBuf {
    type Target = CudaSlice<f32>;

    fn deref(&self) -> &CudaSlice<f32> {
        &self.slice
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.slice
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        // SAFETY: the slice is taken once, here, and `self` is not used after.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        self.pool.give_back(slice);
    }
}
