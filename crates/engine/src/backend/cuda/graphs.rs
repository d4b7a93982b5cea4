//! Layer steps recorded as CUDA graphs and replayed.
//!
//! One token through a linear-attention layer whose experts are routed on the device is the
//! same nine launches token after token, on the same buffers; so is the MoE block of a
//! full-attention layer (its attention reads the position, and is not recorded). Recorded
//! once (stream capture), the step is replayed as one launch: the host saves the launches
//! and the device the gaps between them (docs/perf.md: about 1.4 us per launch on an H200).
//!
//! A key runs unrecorded the first time it is seen, which leaves in the buffer pool every
//! buffer the step takes (a recording may not allocate: the allocation would become part of
//! the graph) and builds the layer's expert table; the second time, it is recorded. A
//! recording that fails (something in the step cannot be captured) is discarded, the step
//! runs unrecorded, and the key waits twice as many sightings as before for its next try.
//!
//! A recording holds the pool buffers its kernels use and the expert tables it routes with.
//! It is dropped when the VRAM cache no longer has one of those tables (it evicted an expert
//! of the layer), and the least recently used one goes when there are too many.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice};

use super::experts::LayerTable;
use super::{CudaBackend, cuda};
use crate::backend::StepKey;
use crate::error::Result;

/// Recordings kept at once: one per MoE layer for each of a few sequences (Qwen3.5-397B has
/// 60; a recording holds about 0.3 MB of buffers).
const MAX_RECORDINGS: usize = 256;
/// Sightings a key waits, at most, before its next recording attempt.
const MAX_WAIT: u32 = 1024;
/// Keys remembered at most (recorded or waiting).
const MAX_KEYS: usize = 8 * MAX_RECORDINGS;

/// A layer whose experts a recording routes with, and how many it uses per token.
pub(super) struct RoutedLayer {
    pub(super) layer: usize,
    pub(super) experts: usize,
    pub(super) table: Arc<LayerTable>,
}

/// A recorded step.
struct Recording {
    graph: SendGraph,
    /// The pool buffers its kernels use.
    buffers: Vec<CudaSlice<f32>>,
    routed: Vec<RoutedLayer>,
    last_used: u64,
}

/// A CUDA graph, used only under the `StepGraphs` lock once it is stored there: the external
/// serialization the CUDA documentation asks of graph objects.
struct SendGraph(CudaGraph);

// SAFETY: see above; a stored graph is launched and dropped only while the lock is held (or
// when the backend itself is dropped, with no other user left).
unsafe impl Send for SendGraph {}

enum Slot {
    Waiting(Sightings),
    Recorded(Recording),
}

/// When a key not recorded yet is recorded: the sighting after `wait` sightings since the
/// last attempt (the first attempt at the second sighting); each failed attempt doubles
/// `wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sightings {
    seen: u32,
    wait: u32,
}

impl Sightings {
    const FIRST: Sightings = Sightings { seen: 0, wait: 1 };

    /// Counts a sighting; true when this one is to be recorded.
    fn see(&mut self) -> bool {
        self.seen += 1;
        self.seen > self.wait
    }

    /// After a failed attempt.
    fn back_off(&mut self) {
        self.seen = 0;
        self.wait = (self.wait * 2).min(MAX_WAIT);
    }
}

#[derive(Default)]
struct Slots {
    by_key: HashMap<StepKey, Slot>,
    /// Counts lookups, for least-recently-used eviction.
    clock: u64,
}

/// The recordings of one backend, and the routing noted while one is made.
#[derive(Default)]
pub(super) struct StepGraphs {
    slots: Mutex<Slots>,
    /// `Some` while a step is recorded: the layers it routed on the device.
    routed: Mutex<Option<Vec<RoutedLayer>>>,
}

impl StepGraphs {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn routed(&self) -> MutexGuard<'_, Option<Vec<RoutedLayer>>> {
        self.routed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// While a step is recorded, notes that it routed `layer` with `table`, and returns true
    /// (the use is counted when the recording runs); false otherwise.
    pub(super) fn note_routed(&self, layer: usize, experts: usize, table: &Arc<LayerTable>) -> bool {
        match self.routed().as_mut() {
            Some(routed) => {
                routed.push(RoutedLayer {
                    layer,
                    experts,
                    table: Arc::clone(table),
                });
                true
            }
            None => false,
        }
    }
}

/// What to do with a step.
enum Action {
    Run,
    Record,
    Replayed,
}

impl CudaBackend {
    /// [`crate::backend::Backend::run_step`]: replays the recording of `key`, records it, or
    /// runs `step` as it is.
    pub(super) fn run_recorded_step(&self, key: &StepKey, step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        match self.replay(key)? {
            Action::Replayed => Ok(()),
            Action::Run => step(),
            Action::Record => self.record(key, step),
        }
    }

    /// Replays `key`'s recording when it is still valid, and says what to do otherwise.
    fn replay(&self, key: &StepKey) -> Result<Action> {
        let mut slots = self.graphs.slots();
        slots.clock += 1;
        let now = slots.clock;
        if slots.by_key.len() >= MAX_KEYS && !slots.by_key.contains_key(key) {
            // Keys of sequences long gone (the addresses of their buffers) pile up: forget
            // those not recorded.
            slots.by_key.retain(|_, slot| matches!(slot, Slot::Recorded(_)));
        }
        let slot = slots
            .by_key
            .entry(key.clone())
            .or_insert(Slot::Waiting(Sightings::FIRST));
        match slot {
            Slot::Waiting(sightings) => {
                return Ok(if sightings.see() { Action::Record } else { Action::Run });
            }
            Slot::Recorded(r) if self.still_valid(r) => {
                r.graph.0.launch().map_err(cuda("replaying a recorded step"))?;
                r.last_used = now;
                self.count_routed(&r.routed, true);
                return Ok(Action::Replayed);
            }
            Slot::Recorded(_) => {}
        }
        // The VRAM cache evicted an expert the recording routes to: record afresh.
        if let Some(Slot::Recorded(stale)) = slots
            .by_key
            .insert(key.clone(), Slot::Waiting(Sightings { seen: 1, wait: 1 }))
        {
            self.retire([stale])?;
        }
        Ok(Action::Run)
    }

    fn still_valid(&self, r: &Recording) -> bool {
        r.routed.iter().all(|l| {
            self.cache
                .current_table(l.layer)
                .is_some_and(|t| Arc::ptr_eq(&t, &l.table))
        })
    }

    fn count_routed(&self, routed: &[RoutedLayer], replayed: bool) {
        for l in routed {
            self.cache.count_device_routed(l.experts);
        }
        if replayed {
            self.cache.count_replayed();
        }
    }

    /// Records `step` and runs the recording; when the recording fails, runs `step` as it is.
    fn record(&self, key: &StepKey, step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.pool.start_recording();
        *self.graphs.routed() = Some(Vec::new());
        let captured = self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .ok()
            .and_then(|()| {
                let ran = step();
                // Always ends the capture, so that the stream leaves capture mode.
                let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
                ran.ok().and(graph.ok().flatten())
            });
        let routed = self.graphs.routed().take().unwrap_or_default();
        let buffers = self.pool.finish_recording(captured.is_some());
        let (Some(graph), Some(buffers)) = (captured, buffers) else {
            self.back_off(key);
            return step();
        };
        graph.launch().map_err(cuda("running a recorded step"))?;
        self.count_routed(&routed, false);
        let mut slots = self.graphs.slots();
        let recording = Recording {
            graph: SendGraph(graph),
            buffers,
            routed,
            last_used: slots.clock,
        };
        if let Some(Slot::Recorded(old)) = slots.by_key.insert(key.clone(), Slot::Recorded(recording)) {
            self.retire([old])?;
        }
        self.evict_oldest(&mut slots)
    }

    /// After a failed recording: the key waits twice as long before the next attempt.
    fn back_off(&self, key: &StepKey) {
        if let Some(Slot::Waiting(sightings)) = self.graphs.slots().by_key.get_mut(key) {
            sightings.back_off();
        }
    }

    fn evict_oldest(&self, slots: &mut Slots) -> Result<()> {
        let recorded = slots.by_key.values().filter(|s| matches!(s, Slot::Recorded(_))).count();
        if recorded <= MAX_RECORDINGS {
            return Ok(());
        }
        let oldest = slots
            .by_key
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Recorded(r) => Some((r.last_used, k.clone())),
                Slot::Waiting(_) => None,
            })
            .min_by_key(|(used, _)| *used)
            .map(|(_, k)| k);
        if let Some(Slot::Recorded(r)) = oldest.and_then(|k| slots.by_key.remove(&k)) {
            self.retire([r])?;
        }
        Ok(())
    }

    /// Drops the recordings that route with a table the VRAM cache no longer has, freeing
    /// the experts those tables hold.
    pub(super) fn retire_stale_recordings(&self) -> Result<()> {
        let stale: Vec<Recording> = {
            let mut slots = self.graphs.slots();
            let keys: Vec<StepKey> = slots
                .by_key
                .iter()
                .filter(|(_, slot)| matches!(slot, Slot::Recorded(r) if !self.still_valid(r)))
                .map(|(key, _)| key.clone())
                .collect();
            keys.iter()
                .filter_map(|key| match slots.by_key.remove(key) {
                    Some(Slot::Recorded(r)) => Some(r),
                    _ => None,
                })
                .collect()
        };
        self.retire(stale)
    }

    /// Drops recordings once the device is done with them (one wait covers them all), their
    /// buffers back to the pool.
    fn retire(&self, recordings: impl IntoIterator<Item = Recording>) -> Result<()> {
        let mut recordings = recordings.into_iter().peekable();
        if recordings.peek().is_none() {
            return Ok(());
        }
        self.stream.synchronize().map_err(cuda("waiting for the device"))?;
        for r in recordings {
            self.pool.give_back_all(r.buffers);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sightings, of the first `n`, on which a key is recorded when every attempt fails.
    fn attempts(n: u32) -> Vec<u32> {
        let mut s = Sightings::FIRST;
        (1..=n)
            .filter(|_| {
                let record = s.see();
                if record {
                    s.back_off();
                }
                record
            })
            .collect()
    }

    #[test]
    fn a_key_is_recorded_at_its_second_sighting_and_failures_back_off() {
        let mut s = Sightings::FIRST;
        assert!(!s.see(), "the first sighting runs unrecorded");
        assert!(s.see(), "the second is recorded");
        // Failing every time: attempts at sightings 2, 5 (after 2 more), 10 (4), 19 (8).
        assert_eq!(attempts(20), [2, 5, 10, 19]);
    }

    #[test]
    fn back_off_stops_growing() {
        let mut s = Sightings::FIRST;
        for _ in 0..20 {
            s.back_off();
        }
        assert_eq!(s.wait, MAX_WAIT);
    }
}
