//! The host-to-device link's bandwidth, measured once: what a missed expert's copy costs,
//! against which the host CPU's share of the missed experts is set.

use cudarc::driver::sys::CUevent_flags;

use super::{CudaBackend, cuda};
use crate::error::Result;

/// Bytes one timed copy moves: a few experts' worth, long enough to hide the launch.
const PROBE_BYTES: usize = 64 << 20;

impl CudaBackend {
    /// Page-locked host-to-device bytes per second on the copy stream: the best of four copies.
    pub(super) fn measure_link(&self) -> Result<f64> {
        let copies = &self.copies;
        // SAFETY: the buffer's bytes are only copied, never read as values.
        let host = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(PROBE_BYTES, 0) }.map_err(cuda("pinned memory"))?;
        let mut device = copies.alloc_zeros::<u8>(PROBE_BYTES).map_err(cuda("device memory"))?;
        let mut best = f64::INFINITY;
        for _ in 0..4 {
            let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
            let start = self.ctx.new_event(flags).map_err(cuda("an event"))?;
            let end = self.ctx.new_event(flags).map_err(cuda("an event"))?;
            start.record(copies).map_err(cuda("an event"))?;
            copies.memcpy_htod(&host, &mut device).map_err(cuda("a timed copy"))?;
            end.record(copies).map_err(cuda("an event"))?;
            end.synchronize().map_err(cuda("a timed copy"))?;
            let ms = start.elapsed_ms(&end).map_err(cuda("an event"))?;
            best = best.min(f64::from(ms) * 1e-3);
        }
        Ok(PROBE_BYTES as f64 / best)
    }
}
