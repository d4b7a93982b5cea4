//! Device memory past the weights: the device's memory pool, and room made for the sequence
//! state when the device runs out.
//!
//! Routed experts fill what the weights leave free (the VRAM cache's budget), while the KV
//! cache, prompt snapshots and activations grow with use. When an allocation for them fails,
//! the cache gives back its least recently used experts and lowers its budget, and the
//! allocation is tried again: a long conversation slows down (fewer experts hit in VRAM)
//! instead of failing. Only when no expert is left to give back does the error reach the
//! caller.

use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DriverError};

use super::CudaBackend;
use super::pool::PooledBuf;
use crate::error::{Error, Result};

/// Device memory of uploaded weights. An expert is written on the copy stream and read on
/// the compute stream: the compute stream waits for the copy before its first read
/// (`ready`), and the memory is freed on the compute stream, after the kernels that read it,
/// so that a free never holds up the copies queued behind it.
pub(super) struct DeviceBytes {
    slice: ManuallyDrop<CudaSlice<u8>>,
    /// For memory copied in on another stream: the stream that reads and frees it, and the
    /// copy's event until that stream has waited for it.
    copied: Option<(Arc<CudaStream>, Mutex<Option<CudaEvent>>)>,
}

impl DeviceBytes {
    /// Memory read on the stream it was allocated on.
    pub(super) fn new(slice: CudaSlice<u8>) -> Self {
        DeviceBytes {
            slice: ManuallyDrop::new(slice),
            copied: None,
        }
    }

    /// Memory whose contents the work before `copied` (on the stream it was allocated on)
    /// writes, read by kernels on `readers`.
    pub(super) fn copied_in(slice: CudaSlice<u8>, copied: CudaEvent, readers: &Arc<CudaStream>) -> Self {
        DeviceBytes {
            slice: ManuallyDrop::new(slice),
            copied: Some((Arc::clone(readers), Mutex::new(Some(copied)))),
        }
    }

    /// Orders what the reading stream is given from now on after the copy. Once done (or
    /// once the copy is seen finished) it costs nothing.
    pub(super) fn ready(&self) -> Result<()> {
        let Some((readers, copying)) = &self.copied else {
            return Ok(());
        };
        let mut copying = copying.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(event) = copying.take()
            && !event.is_complete()
        {
            readers
                .wait(&event)
                .map_err(super::cuda("waiting for an expert's copy"))?;
        }
        Ok(())
    }
}

impl Deref for DeviceBytes {
    type Target = CudaSlice<u8>;

    fn deref(&self) -> &CudaSlice<u8> {
        &self.slice
    }
}

impl Drop for DeviceBytes {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `self.slice` is not used after.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        let Some((readers, _)) = &self.copied else {
            return drop(slice);
        };
        if self.ready().is_err() {
            // The reading stream cannot be ordered after the copy: wait for the copy here.
            let _ = slice.stream().synchronize();
        }
        let len = slice.len();
        let ptr = slice.leak();
        // SAFETY: `ptr` is the allocation just leaked, `len` bytes; the slice made here owns
        // it alone and frees it on the reading stream, after the kernels queued there.
        drop(unsafe { readers.upgrade_device_ptr::<u8>(ptr, len) });
    }
}

/// An allocation's error: [`Error::OutOfDeviceMemory`] when the device ran out of memory (so
/// that the backend can make room and try again), otherwise the driver's error.
pub(super) fn out_of_memory(e: DriverError, what: &str, bytes: usize) -> Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfDeviceMemory {
            what: what.into(),
            bytes: bytes as u64,
        }
    } else {
        Error::Cuda(format!("allocating {what}: {e}"))
    }
}

/// The device's default memory pool, which cudarc's stream-ordered allocations draw from
/// (`None` where the device has no pools: some virtualised GPUs).
fn default_pool(ctx: &CudaContext) -> Result<Option<sys::CUmemoryPool>> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` receives the device's default pool, which lives as long as the context.
    match unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) } {
        CUresult::CUDA_SUCCESS => Ok(Some(pool)),
        CUresult::CUDA_ERROR_NOT_SUPPORTED => Ok(None),
        e => Err(Error::Cuda(format!("finding the device's memory pool: {e:?}"))),
    }
}

/// Keeps memory freed to the device's default pool (evicted experts) in the pool. Its
/// release threshold is 0 by default, so every synchronisation (one per layer, at the
/// routing decision) handed freed memory back to the driver, and the next expert's
/// allocation had to map fresh memory.
pub(super) fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    let Some(pool) = default_pool(ctx)? else {
        return Ok(());
    };
    let mut threshold = u64::MAX;
    // SAFETY: the attribute takes a pointer to a u64.
    let status = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    };
    match status {
        CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(Error::Cuda(format!(
            "setting the memory pool's release threshold: {e:?}"
        ))),
    }
}

impl CudaBackend {
    /// `f`, an allocation; when the device is out of memory, makes room by giving back
    /// experts and runs it once more.
    pub(super) fn allocating<T>(&self, f: impl Fn() -> Result<T>) -> Result<T> {
        match f() {
            Err(Error::OutOfDeviceMemory { bytes, .. }) if self.make_room(bytes)? => f(),
            result => result,
        }
    }

    /// A pool buffer of `len` floats, contents undefined.
    pub(super) fn take(&self, len: usize) -> Result<PooledBuf> {
        self.allocating(|| self.pool.take(len))
    }

    /// Gives back experts from the VRAM cache until `bytes` (and a margin, so that a growing
    /// cache does not come back at every step) are free again; false when it held none.
    fn make_room(&self, bytes: u64) -> Result<bool> {
        /// Room made beyond the request: the KV caches grow by doubling, and each growth
        /// should not cost a round of eviction.
        const MARGIN: u64 = 256 << 20;
        let freed = self.cache.release(bytes + MARGIN);
        if freed == 0 {
            return Ok(false);
        }
        // Recordings hold the tables of the layers that lost experts, and tables hold experts.
        self.retire_stale_recordings()?;
        self.pool.clear();
        // Freed memory stays in the pool (`keep_freed_memory`); once the frees have completed,
        // hand it back to the device, where an allocation of any size can use it.
        for stream in [&self.stream, &self.copies] {
            stream.synchronize().map_err(super::cuda("waiting for the device"))?;
        }
        if let Some(pool) = default_pool(&self.ctx)? {
            // SAFETY: trimming only releases memory no allocation holds.
            let status = unsafe { sys::cuMemPoolTrimTo(pool, 0) };
            if status != CUresult::CUDA_SUCCESS {
                return Err(Error::Cuda(format!("releasing pooled memory: {status:?}")));
            }
        }
        let stats = self.cache.stats();
        tracing::warn!(
            "GPU memory is short: the expert cache gave back {} MiB for the sequence state and now holds {} MiB",
            freed >> 20,
            stats.resident_bytes >> 20
        );
        Ok(true)
    }
}
