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

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::{CudaSlice, CudaStream};

use super::cuda;
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
            if slice.is_some() {
                lists.bytes -= 4 * len;
            }
            slice
        };
        let slice = match reused {
            Some(slice) => slice,
            // SAFETY: callers write a buffer before reading it, or zero it (`take_zeroed`).
            None => unsafe { self.stream.alloc::<f32>(len) }.map_err(cuda("allocating device memory"))?,
        };
        Ok(PooledBuf {
            slice: ManuallyDrop::new(slice),
            pool: Arc::clone(self),
        })
    }

    /// A buffer of `len` floats, all zero.
    pub(super) fn take_zeroed(self: &Arc<Self>, len: usize) -> Result<PooledBuf> {
        let mut buf = self.take(len)?;
        self.stream
            .memset_zeros(&mut *buf)
            .map_err(cuda("zeroing device memory"))?;
        Ok(buf)
    }

    fn give_back(&self, slice: CudaSlice<f32>) {
        let bytes = 4 * slice.len();
        let mut lists = self.lists();
        if lists.bytes + bytes <= POOL_BYTES {
            lists.bytes += bytes;
            lists.by_len.entry(slice.len()).or_default().push(slice);
        }
        // Otherwise `slice` is dropped here: an ordinary stream-ordered free.
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

impl Clone for PooledBuf {
    /// A device-side copy in a buffer of the same length (snapshots of model state).
    fn clone(&self) -> Self {
        let copy = self.pool.take(self.len()).and_then(|mut copy| {
            self.pool
                .stream
                .memcpy_dtod(&**self, &mut *copy)
                .map_err(cuda("copying device memory"))?;
            Ok(copy)
        });
        // `Clone` cannot fail; cudarc's own `CudaSlice::clone` panics the same way.
        copy.unwrap_or_else(|e| panic!("cloning a GPU tensor: {e}"))
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        // SAFETY: the slice is taken once, here, and `self` is not used after.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        self.pool.give_back(slice);
    }
}
