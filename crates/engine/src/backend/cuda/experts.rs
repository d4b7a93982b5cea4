//! Routed experts on the device: uploading a fetched expert (one copy per record), the
//! batched launches that run all of a token's experts in two kernels, and routing on the
//! device when a layer's experts are all in VRAM.

use std::sync::{Arc, PoisonError};

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaExpert, CudaMatrix, CudaTensor, DeviceBytes, cuda};
use crate::backend::{DeviceRouting, SharedExpert};
use crate::error::{Error, Result};
use crate::model::weights::ExpertView;
use crate::storage::blob::Blob;

/// Experts per batched launch (`MAX_BATCH` in kernels/matvec.cu).
const MAX_BATCH: usize = 16;

/// The `ExpertBatch` kernel parameter of kernels/matvec.cu: per expert the device addresses of
/// gate, up and down (codes, scales, biases), the routing weights and the count; the slot of
/// the shared expert (-1 for none), weighted by the sigmoid of the logit at `shared_logit`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ExpertBatchParams {
    w: [[u64; 9]; MAX_BATCH],
    weight: [f32; MAX_BATCH],
    shared_logit: u64,
    count: i32,
    shared_slot: i32,
}

// SAFETY: plain old data laid out as the C struct the kernels take by value.
unsafe impl cudarc::driver::DeviceRepr for ExpertBatchParams {}

/// The `ExpertPtrs` kernel parameter: the device addresses of an expert's gate, up and down
/// (codes, scales, biases each).
#[repr(C)]
#[derive(Clone, Copy)]
struct ExpertPtrs([u64; 9]);

// SAFETY: plain old data laid out as the C struct the routing kernel takes by value.
unsafe impl cudarc::driver::DeviceRepr for ExpertPtrs {}

/// The `DeviceRoute` kernel parameter: the router logits, the layer's table, the shared
/// expert and its gate logit, where the batch goes, and the routing's sizes.
#[repr(C)]
#[derive(Clone, Copy)]
struct DeviceRouteParams {
    logits: u64,
    table: u64,
    shared: ExpertPtrs,
    shared_logit: u64,
    batch: u64,
    experts: i32,
    k: i32,
    renormalize: i32,
}

// SAFETY: plain old data laid out as the C struct the routing gate/up kernel takes by value.
unsafe impl cudarc::driver::DeviceRepr for DeviceRouteParams {}

/// How a batch of experts of one shape and format launches.
#[derive(Clone, Copy)]
struct BatchPlan {
    /// Kernel index (2, 4, 8 bits).
    index: usize,
    gate_cfg: LaunchConfig,
    /// Per expert: the down kernel stages every expert's activation.
    down_cfg: LaunchConfig,
    group: i32,
    dtype: i32,
    inter: usize,
    hidden: usize,
    /// Experts per launch.
    max_count: usize,
}

impl BatchPlan {
    /// Whether experts of `other`'s plan can share a batch with this one's.
    fn same_launch(&self, other: &BatchPlan) -> bool {
        (self.index, self.group, self.dtype, self.inter, self.hidden)
            == (other.index, other.group, other.dtype, other.inter, other.hidden)
    }
}

/// Every expert of one layer in VRAM, for routing on the device: `table` holds each expert's
/// nine addresses, `batch` the batch the routing gate/up launch writes for the down launch
/// (reused token after token: the launches of one stream run in order). The cache drops the
/// table when it evicts any of its experts; the table holds them too, so that one evicted
/// while a launch still has the table is freed after that launch (frees are stream-ordered).
pub(super) struct LayerTable {
    table: CudaSlice<u64>,
    batch: CudaSlice<u8>,
    plan: BatchPlan,
    experts: Vec<CudaExpert>,
}

/// How an expert's parts travel to its device allocation: the copies (host range, device
/// offset), each part's device offset, and the allocation's size. One copy of the whole
/// record when the parts lie close together in one host buffer (a record read from disk or
/// held in the host cache): the per-copy cost of a DMA transfer is paid once, not nine times.
/// Device offsets keep each part's host alignment modulo 256, so the kernels' 16-byte loads
/// stay aligned wherever the host's were. Otherwise one copy per part, each at a multiple of 256.
fn expert_copies(blobs: &[&Blob]) -> (Vec<(Blob, usize)>, Vec<usize>, usize) {
    /// Padding between a record's parts that one copy may carry along.
    const SLACK: usize = 64 << 10;
    let sum: usize = blobs.iter().map(|b| b.len()).sum();
    if let Some((span, within)) = Blob::enclosing(blobs)
        && span.len() <= sum + SLACK
    {
        let lead = span.bytes().as_ptr() as usize % 256;
        let total = lead + span.len();
        return (
            vec![(span, lead)],
            within.into_iter().map(|o| lead + o).collect(),
            total,
        );
    }
    let mut total = 0usize;
    let offsets = blobs
        .iter()
        .map(|b| {
            let at = total.next_multiple_of(256);
            total = at + b.len();
            at
        })
        .collect::<Vec<_>>();
    let copies = blobs.iter().zip(&offsets).map(|(b, &at)| ((*b).clone(), at)).collect();
    (copies, offsets, total)
}

/// One expert of a batched launch: its gate, up and down, and how its output is weighted.
pub(super) struct BatchSlot<'a> {
    pub(super) matrices: [&'a CudaMatrix; 3],
    /// The routing weight; `None` for the shared expert (sigmoid of its gate logit).
    pub(super) weight: Option<f32>,
}

/// Host blobs whose asynchronous copies to the device are still in flight.
#[derive(Default)]
pub(super) struct InFlight(pub(super) Vec<(cudarc::driver::CudaEvent, Vec<Blob>)>);

impl CudaBackend {
    /// Copies an expert's matrices into one new device allocation, asynchronously on the
    /// copy stream, so that the copy runs while the compute stream works on experts already
    /// there; the compute stream waits for it before the first kernel that reads the expert
    /// (`CudaExpert::ready`). The host bytes are kept alive until the copy has finished.
    pub(super) fn upload_expert(&self, view: &ExpertView) -> Result<CudaExpert> {
        let matrices = [&view.gate, &view.up, &view.down];
        let blobs: Vec<&Blob> = matrices
            .iter()
            .flat_map(|m| [Some(&m.data), m.scales.as_ref(), m.biases.as_ref()])
            .flatten()
            .collect();
        let (copies, offsets, total) = expert_copies(&blobs);
        let mem = self.allocating(|| {
            // SAFETY: every byte the kernels read is written by the copies below.
            unsafe { self.copies.alloc::<u8>(total.max(1)) }.map_err(|e| super::out_of_memory(e, "an expert", total))
        })?;
        {
            use cudarc::driver::DevicePtr;
            let (base, _guard) = mem.device_ptr(&self.copies);
            for (blob, at) in &copies {
                // SAFETY: the destination range lies inside `mem`; the source stays alive in
                // `in_flight` until the event recorded after these copies has completed.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(base + *at as u64, blob.bytes(), self.copies.cu_stream())
                }
                .map_err(cuda("copying an expert to the device"))?;
            }
        }
        let record = || self.copies.record_event(None).map_err(cuda("recording an event"));
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
            in_flight.0.retain(|(e, _)| !e.is_complete());
            in_flight
                .0
                .push((record()?, copies.into_iter().map(|(b, _)| b).collect()));
        }
        let mem = Arc::new(DeviceBytes::copied_in(mem, record()?, &self.stream));
        let mut placed = blobs.iter().zip(offsets).map(|(b, at)| (at, b.len()));
        let mut built = matrices.into_iter().map(|m| {
            let data = placed.next().unwrap_or_default();
            let scales = m.scales.as_ref().and_then(|_| placed.next());
            let biases = m.biases.as_ref().and_then(|_| placed.next());
            CudaMatrix {
                rows: m.rows,
                cols: m.cols,
                encoding: m.encoding,
                mem: Arc::clone(&mem),
                data,
                scales,
                biases,
            }
        });
        match (built.next(), built.next(), built.next()) {
            (Some(g), Some(u), Some(d)) => Ok(CudaExpert::new([g, u, d])),
            _ => Err(Error::Cuda("an expert has three matrices".into())),
        }
    }

    /// How a batch of these experts launches, when they share one 2/4/8-bit encoding and
    /// shape, with 16-byte aligned codes, as the batched kernels need; `None` otherwise.
    fn batch_plan<'a>(&self, mut experts: impl Iterator<Item = [&'a CudaMatrix; 3]>) -> Option<BatchPlan> {
        let [gate0, up0, down0] = experts.next()?;
        let ((index, gate_cfg), (_, down_cfg)) = (self.pow2_plan(gate0)?, self.pow2_plan(down0)?);
        let same = |[g, u, d]: [&CudaMatrix; 3]| {
            g.encoding == gate0.encoding
                && u.encoding == gate0.encoding
                && d.encoding == down0.encoding
                && (g.rows, g.cols, u.rows, u.cols) == (gate0.rows, gate0.cols, gate0.rows, gate0.cols)
                && (d.rows, d.cols) == (down0.rows, down0.cols)
                && [g.data.0, u.data.0, d.data.0].iter().all(|o| o % 16 == 0)
        };
        let max_count = MAX_BATCH.min(self.k.max_shared / down_cfg.shared_mem_bytes.max(1) as usize);
        if gate0.encoding != down0.encoding || max_count == 0 || !same([gate0, up0, down0]) || !experts.all(same) {
            return None;
        }
        let (_, group, dtype) = gate0.format();
        Some(BatchPlan {
            index,
            gate_cfg,
            down_cfg,
            group,
            dtype,
            inter: gate0.rows,
            hidden: gate0.cols,
            max_count,
        })
    }

    /// All experts of one token in two launches per `MAX_BATCH` of them (gate/up with SiLU,
    /// then down with the weighted sum into `out`), when they share one 2/4/8-bit encoding and
    /// shape. Returns false, having done nothing, when they do not.
    pub(super) fn expert_batch(
        &self,
        x: &CudaTensor,
        slots: &[BatchSlot],
        shared_logit: Option<&CudaTensor>,
        out: &mut CudaTensor,
    ) -> Result<bool> {
        if slots.is_empty() {
            return Ok(true);
        }
        let Some(plan) = self.batch_plan(slots.iter().map(|s| s.matrices)) else {
            return Ok(false);
        };
        for chunk in slots.chunks(plan.max_count) {
            let mut params = ExpertBatchParams {
                w: [[0; 9]; MAX_BATCH],
                weight: [0.0; MAX_BATCH],
                shared_logit: 0,
                count: chunk.len() as i32,
                shared_slot: -1,
            };
            use cudarc::driver::DevicePtr;
            // The shared expert's gate logit is read on the device by the down kernel.
            let _logit_guard = match (shared_logit, chunk.iter().position(|s| s.weight.is_none())) {
                (Some(logit), Some(slot)) => {
                    let (ptr, guard) = logit.buf.device_ptr(&self.stream);
                    params.shared_logit = ptr;
                    params.shared_slot = slot as i32;
                    Some(guard)
                }
                _ => None,
            };
            for (slot, s) in chunk.iter().enumerate() {
                params.weight[slot] = s.weight.unwrap_or(0.0);
                params.w[slot] = self.expert_addresses(s.matrices)?.0;
            }
            let kernels = [&self.k.swiglu_batch_q[plan.index], &self.k.down_batch_q[plan.index]];
            self.launch_batch(&plan, chunk.len(), kernels, (&params, &params), x, out)?;
        }
        Ok(true)
    }

    /// The device addresses of an expert's codes, scales and biases (gate, up, down).
    fn expert_addresses(&self, matrices: [&CudaMatrix; 3]) -> Result<ExpertPtrs> {
        use cudarc::driver::DevicePtr;
        let mut w = [0u64; 9];
        for (m, matrix) in matrices.iter().enumerate() {
            let (sc, bi) = matrix.affine_parts()?;
            let (base, _guard) = matrix.mem.device_ptr(&self.stream);
            for (k, offset) in [matrix.data.0, sc.0, bi.0].into_iter().enumerate() {
                w[3 * m + k] = base + offset as u64;
            }
        }
        Ok(ExpertPtrs(w))
    }

    /// The gate/up and down launches of one batch of `count` experts: `kernels` take the
    /// batch by value (`ExpertBatchParams`, routed by the host), or the gate/up kernel routes
    /// the token (`DeviceRouteParams`) and the down kernel reads the batch from the device
    /// address it wrote it to.
    fn launch_batch<A: cudarc::driver::DeviceRepr, D: cudarc::driver::DeviceRepr>(
        &self,
        plan: &BatchPlan,
        count: usize,
        kernels: [&CudaFunction; 2],
        (gate_up_batch, down_batch): (&A, &D),
        x: &CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (inter, hidden, index) = (plan.inter, plan.hidden, plan.index);
        let mut act = self.tensor(count, inter)?;
        let swiglu_cfg = LaunchConfig {
            // One wave at most: every block stages x (and on the device-routed path takes
            // the routing decision), so fewer blocks with more rows each do less of that; a
            // second wave cost 4% of a token at K=10 (docs/perf.md), a third, partial one left
            // most multiprocessors idle at the end.
            grid_dim: (
                (count * inter)
                    .div_ceil(8)
                    .min(self.k.swiglu_batch_resident[index].max(1) as usize * self.sms) as u32,
                1,
                1,
            ),
            ..plan.gate_cfg
        };
        let down_cfg = LaunchConfig {
            // 16 rows per block (two per warp): every block stages all the experts' inputs,
            // so fewer blocks stage less; 8% faster for ten experts (docs/perf.md).
            grid_dim: (hidden.div_ceil(16) as u32, 1, 1),
            shared_mem_bytes: plan.down_cfg.shared_mem_bytes * count as u32,
            ..plan.down_cfg
        };
        let (group, dtype) = (plan.group, plan.dtype);
        let (rows_i, cols_i, rows_d, cols_d) = (inter as i32, hidden as i32, hidden as i32, inter as i32);
        let [gate_up, down] = kernels;
        launch!(
            self,
            gate_up,
            swiglu_cfg,
            gate_up_batch,
            &group,
            &dtype,
            &*x.buf,
            &rows_i,
            &cols_i,
            &mut *act.buf
        )?;
        launch!(
            self,
            down,
            down_cfg,
            down_batch,
            &group,
            &dtype,
            &*act.buf,
            &rows_d,
            &cols_d,
            &mut *out.buf
        )
    }

    /// The device-side table of a layer's experts (`experts[e]` is expert e), when they can
    /// run as one batch; `None` when they cannot.
    pub(super) fn layer_table(&self, experts: &[CudaExpert]) -> Result<Option<LayerTable>> {
        for expert in experts {
            expert.ready()?;
        }
        let Some(plan) = self.batch_plan(experts.iter().map(CudaExpert::matrices)) else {
            return Ok(None);
        };
        let mut addresses = Vec::with_capacity(9 * experts.len());
        for expert in experts {
            addresses.extend(self.expert_addresses(expert.matrices())?.0);
        }
        Ok(Some(LayerTable {
            table: self.to_device(&addresses)?,
            batch: self.to_device(&[0u8; size_of::<ExpertBatchParams>()])?,
            plan,
            experts: experts.to_vec(),
        }))
    }

    /// One token's routing and experts on the device, from a layer's table: the gate/up
    /// launch routes the token and writes the batch that the down launch reads. Returns
    /// false, having done nothing, when the shared expert or the batch size does not fit the
    /// table's plan.
    pub(super) fn route_and_run(
        &self,
        table: &LayerTable,
        x: &CudaTensor,
        logits: &CudaTensor,
        routing: &DeviceRouting,
        shared: Option<&SharedExpert<'_, CudaBackend>>,
        out: &mut CudaTensor,
    ) -> Result<bool> {
        let k = routing.experts_per_token;
        let count = k + usize::from(shared.is_some());
        let shared_fits = shared.is_none_or(|s| {
            self.batch_plan(std::iter::once([s.gate_proj, s.up_proj, s.down_proj]))
                .is_some_and(|p| p.same_launch(&table.plan))
        });
        let experts = table.experts.len();
        if count > table.plan.max_count || k > experts || logits.rows != 1 || logits.cols != experts || !shared_fits {
            return Ok(false);
        }
        use cudarc::driver::DevicePtr;
        let (shared_ptrs, shared_logit) = match shared {
            Some(s) => {
                let (ptr, _guard) = s.gate_logit.buf.device_ptr(&self.stream);
                (self.expert_addresses([s.gate_proj, s.up_proj, s.down_proj])?, ptr)
            }
            None => (ExpertPtrs([0; 9]), 0),
        };
        let (table_ptr, _t) = table.table.device_ptr(&self.stream);
        let (batch_ptr, _b) = table.batch.device_ptr(&self.stream);
        let (logits_ptr, _l) = logits.buf.device_ptr(&self.stream);
        let route = DeviceRouteParams {
            logits: logits_ptr,
            table: table_ptr,
            shared: shared_ptrs,
            shared_logit,
            batch: batch_ptr,
            experts: experts as i32,
            k: k as i32,
            renormalize: i32::from(routing.renormalize),
        };
        let index = table.plan.index;
        let kernels = [&self.k.route_swiglu_batch_q[index], &self.k.down_batch_dev_q[index]];
        self.launch_batch(&table.plan, count, kernels, (&route, &batch_ptr), x, out)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where each part lands on the device, as a host address would (base 256-aligned).
    fn device_addrs(blobs: &[&Blob]) -> (Vec<usize>, usize, usize) {
        let (copies, offsets, total) = expert_copies(blobs);
        for (blob, at) in &copies {
            assert!(at + blob.len() <= total, "a copy overruns the allocation");
        }
        (offsets, copies.len(), total)
    }

    #[test]
    fn a_record_goes_in_one_copy_with_its_alignment_kept() {
        let record = Blob::from_vec(vec![7u8; 200_000]);
        let parts = [record.sub(48, 1000), record.sub(4096, 5000), record.sub(12_288, 64)];
        let refs: Vec<&Blob> = parts.iter().collect();
        let (offsets, copies, total) = device_addrs(&refs);
        assert_eq!(copies, 1);
        let lead = parts[0].bytes().as_ptr() as usize % 256;
        assert_eq!(offsets, [lead, lead + 4096 - 48, lead + 12_288 - 48]);
        assert_eq!(total, lead + 12_288 + 64 - 48);
        for (part, at) in parts.iter().zip(&offsets) {
            assert_eq!(part.bytes().as_ptr() as usize % 256, at % 256, "alignment kept");
        }
    }

    #[test]
    fn scattered_parts_go_one_copy_each_at_256_byte_offsets() {
        let (a, b) = (Blob::from_vec(vec![1u8; 1000]), Blob::from_vec(vec![2u8; 300]));
        let (offsets, copies, total) = device_addrs(&[&a, &b]);
        assert_eq!((offsets, copies, total), (vec![0, 1024], 2, 1324));
        // Parts of one buffer, but far apart: not worth one copy of everything between.
        let big = Blob::from_vec(vec![0u8; 1 << 20]);
        let (far_a, far_b) = (big.sub(0, 100), big.sub(900_000, 100));
        let (_, copies, total) = device_addrs(&[&far_a, &far_b]);
        assert_eq!((copies, total), (2, 356));
    }
}
