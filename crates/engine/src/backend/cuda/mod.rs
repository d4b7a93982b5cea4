//! The CUDA backend: every operation of the forward pass on an NVIDIA GPU.
//!
//! The CUDA libraries are loaded at run time (`cudarc` with dynamic loading), so the binary
//! builds and runs where there is no CUDA at all; kernels are CUDA C compiled at start-up
//! with NVRTC for the GPU found (`kernels.rs`). Weights keep their stored encoding in VRAM;
//! one-token products read them with fused dequantizing kernels, batched products
//! (prefill) dequantize row blocks to f32 and call cuBLAS SGEMM.
//!
//! Here: the device, its tensors and matrices, and the operations of the backend seam.
//! `matvec.rs`: the matrix products; `experts.rs`: expert uploads and the batched expert
//! launches; `expert_cache.rs`: the VRAM tier of the expert cache; `graphs.rs`: layer steps
//! recorded as CUDA graphs and replayed; `pool.rs`: reused activation buffers;
//! `memory.rs`: room made for the sequence state when the device runs out; `kernels/`: the
//! CUDA C, and `kernels.rs`: its compilation.

mod admission;
mod expert_cache;
mod graphs;
pub mod kernels;
mod memory;
mod pool;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg};

pub use expert_cache::CudaExpert;
use expert_cache::VramCache;
use graphs::StepGraphs;
use kernels::Kernels;
use memory::{DeviceBytes, keep_freed_memory, out_of_memory};
use pool::{BufferPool, PooledBuf};

use crate::backend::{
    AttentionShape, Backend, DeviceRouting, ExpertCacheStats, ExpertRows, HeadPrep, LogitPenalty, Route, SharedExpert,
    StepKey,
};
use crate::error::{Error, Result};
use crate::model::config::LinearAttentionConfig;
use crate::model::weights::ExpertView;
use crate::storage::checkpoint::DType;
use crate::storage::io::{AlignedBuf, HostAllocator, HostBuffer};
use crate::storage::quant::{Encoding, MatrixView};

fn cuda<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// Whether the CUDA driver library can be loaded and reports a device.
pub fn is_available() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    present && CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// Activations on the GPU: row-major f32 `[rows, cols]`, in a buffer that may hold more
/// rows (KV caches grow in place).
pub struct CudaTensor {
    rows: usize,
    cols: usize,
    buf: PooledBuf,
}

impl CudaTensor {
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// A weight matrix in VRAM, in its stored encoding: codes (or values), scales and biases as
/// byte ranges of one allocation (its own, or a slot of the expert cache).
pub struct CudaMatrix {
    rows: usize,
    cols: usize,
    encoding: Encoding,
    mem: Arc<DeviceBytes>,
    data: (usize, usize),
    scales: Option<(usize, usize)>,
    biases: Option<(usize, usize)>,
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 | DType::U32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

impl CudaMatrix {
    /// The device bytes of one part (`(offset, len)` in the allocation).
    fn part(&self, (offset, len): (usize, usize)) -> cudarc::driver::CudaView<'_, u8> {
        self.mem.slice(offset..offset + len)
    }

    fn affine_parts(&self) -> Result<((usize, usize), (usize, usize))> {
        self.scales
            .zip(self.biases)
            .ok_or_else(|| Error::Cuda("an affine matrix without scales and biases".into()))
    }

    /// `(bits, group, dtype code)`: bits 0 for dense matrices.
    fn format(&self) -> (i32, i32, i32) {
        match self.encoding {
            Encoding::Dense(d) => (0, 0, dtype_code(d)),
            Encoding::Affine {
                bits,
                group_size,
                scale_dtype,
            } => (bits as i32, group_size as i32, dtype_code(scale_dtype)),
        }
    }
}

/// Page-locked host memory from the CUDA driver, for expert buffers.
struct PinnedBuf {
    _slice: cudarc::driver::PinnedHostSlice<u8>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the memory is plain page-locked host memory owned by `_slice`.
unsafe impl Send for PinnedBuf {}
// SAFETY: shared access is read-only.
unsafe impl Sync for PinnedBuf {}

impl HostBuffer for PinnedBuf {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes while `_slice` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Scratch buffers reused across calls.
#[derive(Default)]
struct Scratch {
    f32s: Option<PooledBuf>,
    /// Page-locked host memory that downloads land in (a copy to pageable memory goes
    /// through the driver's own staging, several times slower for the logits).
    host: Option<cudarc::driver::PinnedHostSlice<f32>>,
}

/// Computes on one NVIDIA GPU.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Expert uploads: the copy engine works on them while the compute stream computes.
    copies: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    name: String,
    scratch: Mutex<Scratch>,
    pool: Arc<BufferPool>,
    cache: VramCache,
    /// Multiprocessors, to size grids.
    sms: usize,
    /// Whether the GPU has the tensor-core instructions the grouped prefill products use
    /// (compute capability 8.0 and later).
    tensor_cores: bool,
    in_flight: Mutex<InFlight>,
    /// Recorded layer steps (CUDA graphs), used when `record_steps` is set.
    graphs: StepGraphs,
    record_steps: bool,
    /// Whether attention may run on the tensor cores (`attention_flash` for prompts,
    /// `attention_decode` for a few queries).
    flash_attention: bool,
}

const THREADS: u32 = 256;
/// Experts one token's routing takes at most (`ROUTE_MAX_K` in kernels/matvec.cu).
const ROUTE_MAX_K: usize = 32;

/// Launches kernel `$f` on the backend's stream with the arguments in declared order.
macro_rules! launch {
    ($self:expr, $f:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let cfg = $cfg;
        let mut builder = $self.stream.launch_builder($f);
        $( builder.arg($arg); )*
        // SAFETY: the arguments match the kernel's parameter list in kernels/, in order and
        // type, and every buffer is sized for the launch configuration.
        unsafe { builder.launch(cfg) }.map(|_| ()).map_err(cuda("launching a kernel"))
    }};
}

// After `launch!`, which they use.
mod attention;
mod expert_rows;
mod experts;
mod linear_attention;
mod matvec;
mod mma;
mod sampling;

use experts::{BatchSlot, InFlight};

fn grid_for(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(THREADS).max(1), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn blocks(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles the kernels for it and sets aside `expert_cache_bytes` of
    /// VRAM for routed experts (`None`: what is free after `reserve_bytes`, with headroom).
    pub fn new(ordinal: usize, expert_cache_bytes: Option<u64>) -> Result<Self> {
        // SAFETY: these only probe whether the shared libraries can be opened.
        let libraries = unsafe {
            [
                ("the CUDA driver (libcuda.so)", cudarc::driver::sys::is_culib_present()),
                ("NVRTC (libnvrtc.so)", cudarc::nvrtc::sys::is_culib_present()),
                ("cuBLAS (libcublas.so)", cudarc::cublas::sys::is_culib_present()),
            ]
        };
        if let Some((name, _)) = libraries.iter().find(|(_, present)| !present) {
            return Err(Error::Cuda(format!(
                "{name} was not found; install the NVIDIA driver and CUDA 13 libraries"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda("opening the GPU"))?;
        // One stream orders the compute; cudarc's per-buffer event tracking would only add
        // an event record per kernel argument.
        // SAFETY: the only buffers used on two streams are experts, written on the copy
        // stream: the compute stream waits for each copy before its first read, and frees
        // them itself after its kernels (`DeviceBytes`).
        unsafe { ctx.disable_event_tracking() };
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda("reading the multiprocessor count"))? as usize;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda("reading the compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        keep_freed_memory(&ctx)?;
        let k = Kernels::load(&ctx, &arch)?;
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(cuda("creating a stream"))?;
        let copies = ctx.new_stream().map_err(cuda("creating a stream"))?;
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(cuda("creating the cuBLAS handle"))?;
        let name = format!(
            "cuda:{ordinal} ({}, {arch})",
            ctx.name().unwrap_or_else(|_| "unknown GPU".into())
        );
        let cache = VramCache::new(expert_cache_bytes);
        Ok(CudaBackend {
            ctx,
            pool: BufferPool::new(Arc::clone(&stream)),
            stream,
            copies,
            blas,
            k,
            name,
            scratch: Mutex::default(),
            cache,
            sms,
            tensor_cores: major >= 8,
            in_flight: Mutex::default(),
            graphs: StepGraphs::default(),
            record_steps: true,
            flash_attention: true,
        })
    }

    /// Whether attention runs on the tensor cores where the GPU, the group and the head dim
    /// allow (on by default); off, prompts run as SGEMMs and a few queries on the FP32 split
    /// kernels, which the benchmarks compare against.
    pub fn flash_attention(mut self, on: bool) -> Self {
        self.flash_attention = on;
        self
    }

    /// Takes the paths a smaller GPU would: at most `shared_per_block` bytes of shared memory
    /// per block (99 KiB on Ada and most of Ampere, 163 KiB on the A100) and, with
    /// `tensor_cores` false, no tensor-core kernels (as before compute capability 8.0). For
    /// tests of those paths on a larger GPU; it never enables what this GPU lacks.
    pub fn emulate_smaller_gpu(mut self, shared_per_block: usize, tensor_cores: bool) -> Self {
        self.k.limit_shared(shared_per_block);
        self.tensor_cores &= tensor_cores;
        self
    }

    /// Whether one-token steps of linear-attention layers routed on the device are recorded
    /// as CUDA graphs and replayed (on by default).
    pub fn record_steps(mut self, on: bool) -> Self {
        self.record_steps = on;
        self
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(cuda("querying device memory"))
    }

    /// An allocator of page-locked host buffers (page-aligned, as direct I/O needs), falling
    /// back to ordinary memory when the driver refuses.
    pub fn pinned_allocator(&self) -> Arc<HostAllocator> {
        let ctx = Arc::clone(&self.ctx);
        Arc::new(move |len: usize| -> Box<dyn HostBuffer> {
            let size = len.max(1).next_multiple_of(4096);
            // SAFETY: the memory is written by reads before anything reads it.
            let pinned = unsafe { ctx.alloc_pinned_with_flags::<u8>(size, 0) };
            if let Ok(mut slice) = pinned
                && let Ok(ptr) = slice.as_mut_ptr()
                && (ptr as usize).is_multiple_of(4096)
            {
                return Box::new(PinnedBuf {
                    _slice: slice,
                    ptr,
                    len: size,
                });
            }
            Box::new(AlignedBuf::new(len))
        })
    }

    /// The stream every operation runs on (benchmarks time it with events).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `n` zeroed floats.
    fn alloc(&self, n: usize) -> Result<PooledBuf> {
        let mut buf = self.take(n)?;
        self.stream
            .memset_zeros(&mut *buf)
            .map_err(cuda("zeroing device memory"))?;
        Ok(buf)
    }

    /// An output tensor the next kernel writes in full (not zeroed).
    fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        // Every caller launches a kernel that writes all rows * cols elements before the
        // tensor is read.
        let buf = self.take(rows * cols)?;
        Ok(CudaTensor { rows, cols, buf })
    }

    /// `data` in a new device allocation (room made in the expert cache if need be).
    fn to_device<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.to_device_as(data, "a host buffer")
    }

    /// [`Self::to_device`], naming `what` the data is should the device have no room.
    fn to_device_as<T: cudarc::driver::DeviceRepr>(&self, data: &[T], what: &str) -> Result<CudaSlice<T>> {
        // SAFETY: the copy below writes all `data.len()` elements before anything reads them.
        let alloc = || unsafe { self.stream.alloc::<T>(data.len()) };
        let mut buf = self.allocating(|| alloc().map_err(|e| out_of_memory(e, what, std::mem::size_of_val(data))))?;
        self.stream
            .memcpy_htod(data, &mut buf)
            .map_err(|e| Error::Cuda(format!("copying {what} to the device: {e}")))?;
        Ok(buf)
    }

    /// `out = silu(gate) * up` over the first `n` elements; `out` may be `gate` itself (each
    /// element reads and writes only its own).
    fn silu_mul_into(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, out: &CudaSlice<f32>, n: usize) -> Result<()> {
        let len = n as i64;
        launch!(self, &self.k.silu_mul, grid_for(n), gate, up, out, &len)
    }

    /// The rows of `x` whose indices `rows` holds on the device, in that order.
    fn gather_device_rows(&self, x: &CudaTensor, rows: &CudaView<'_, i32>) -> Result<CudaTensor> {
        let out = self.tensor(rows.len(), x.cols)?;
        let (cols, n) = (x.cols as i32, out.len() as i64);
        launch!(
            self,
            &self.k.gather_rows,
            grid_for(out.len()),
            &*x.buf,
            rows,
            &cols,
            &*out.buf,
            &n
        )?;
        Ok(out)
    }

    fn scratch(&self) -> MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A scratch buffer of at least `n` floats (grown on demand, kept between calls).
    fn with_scratch<T>(&self, n: usize, f: impl FnOnce(&mut CudaSlice<f32>) -> Result<T>) -> Result<T> {
        let mut s = self.scratch();
        if s.f32s.as_ref().is_none_or(|b| b.len() < n) {
            s.f32s = Some(self.alloc(n)?);
        }
        match s.f32s.as_mut() {
            Some(buf) => f(buf),
            None => Err(Error::Cuda("scratch buffer missing".into())),
        }
    }

    /// Copies `n` floats from the device and waits for them.
    fn download_floats(&self, src: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        /// Larger downloads (the logits of a whole prompt, for evaluation) go straight to
        /// pageable memory rather than pinning a buffer as large as the result.
        const PINNED_MAX_FLOATS: usize = 1 << 22;
        if n == 0 {
            return Ok(Vec::new());
        }
        if n > PINNED_MAX_FLOATS {
            return self
                .stream
                .clone_dtoh(&src.slice(0..n))
                .map_err(cuda("copying from the device"));
        }
        let mut s = self.scratch();
        if s.host.as_ref().is_none_or(|h| h.len() < n) {
            // SAFETY: the copy below writes the first `n` floats before they are read; flags 0
            // (not write-combined) keep host reads of it fast.
            s.host = Some(
                unsafe { self.ctx.alloc_pinned_with_flags::<f32>(n.next_power_of_two(), 0) }
                    .map_err(cuda("allocating page-locked memory"))?,
            );
        }
        let Some(host) = s.host.as_mut() else {
            return Err(Error::Cuda("page-locked buffer missing".into()));
        };
        // A slice of exactly `n` floats: the copy's size is the destination's. Into
        // page-locked memory the copy is truly asynchronous, hence the wait.
        let all = host.as_mut_slice().map_err(cuda("reaching page-locked memory"))?;
        self.stream
            .memcpy_dtoh(&src.slice(0..n), &mut all[..n])
            .map_err(cuda("copying from the device"))?;
        self.stream.synchronize().map_err(cuda("waiting for the device"))?;
        Ok(all[..n].to_vec())
    }

    /// Uploads a host matrix as one allocation: data, scales, biases at 256-byte offsets.
    fn upload_matrix(&self, w: &MatrixView) -> Result<CudaMatrix> {
        let mut bytes = Vec::with_capacity(w.storage_bytes() + 512);
        let mut place = |part: &[u8]| {
            let at = bytes.len().next_multiple_of(256);
            bytes.resize(at, 0);
            bytes.extend_from_slice(part);
            (at, part.len())
        };
        let data = place(w.data.bytes());
        let scales = w.scales.as_ref().map(|s| place(s.bytes()));
        let biases = w.biases.as_ref().map(|b| place(b.bytes()));
        Ok(CudaMatrix {
            rows: w.rows,
            cols: w.cols,
            encoding: w.encoding,
            mem: Arc::new(DeviceBytes::new(
                self.to_device_as(&bytes, &format!("tensor `{}`", w.name))?,
            )),
            data,
            scales,
            biases,
        })
    }

    fn check_same(op: &str, a: &CudaTensor, b: &CudaTensor) -> Result<()> {
        if (a.rows, a.cols) == (b.rows, b.cols) {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "{op}: shapes [{}, {}] and [{}, {}] differ",
                a.rows, a.cols, b.rows, b.cols
            )))
        }
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Matrix = CudaMatrix;
    type Expert = CudaExpert;

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn load_matrix(&self, w: &MatrixView) -> Result<CudaMatrix> {
        self.upload_matrix(w)
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "upload: {} values for [{rows}, {cols}]",
                data.len()
            )));
        }
        let mut buf = self.take(data.len())?;
        if data.is_empty() {
            self.stream
                .memset_zeros(&mut *buf)
                .map_err(cuda("zeroing device memory"))?;
        } else {
            self.stream
                .memcpy_htod(data, &mut *buf)
                .map_err(cuda("copying to the device"))?;
        }
        Ok(CudaTensor { rows, cols, buf })
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        if t.len() == 0 {
            return Ok(Vec::new());
        }
        self.download_floats(&t.buf, t.len())
    }

    fn argmax_last_row(&self, logits: &CudaTensor) -> Result<u32> {
        self.argmax_of_last_row(logits)
    }

    fn penalized_last_row(&self, logits: &CudaTensor, penalties: &[LogitPenalty]) -> Result<Option<CudaTensor>> {
        self.penalized_copy_of_last_row(logits, penalties).map(Some)
    }

    fn draw_candidates(&self, logits: &CudaTensor, span: f32, top_k: usize) -> Result<Option<Vec<(u32, f32)>>> {
        self.draw_candidates_of_last_row(logits, span, top_k)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            buf: self.alloc(rows * cols)?,
        })
    }

    /// The copy holds `t`'s rows only, not the room a growing cache keeps past them.
    fn copy(&self, t: &CudaTensor) -> Result<CudaTensor> {
        let mut copy = self.tensor(t.rows, t.cols)?;
        if t.len() > 0 {
            self.stream
                .memcpy_dtod(&t.buf.slice(0..t.len()), &mut copy.buf.slice_mut(0..t.len()))
                .map_err(cuda("copying device memory"))?;
        }
        Ok(copy)
    }

    fn shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn append_rows(&self, dst: &mut CudaTensor, src: &CudaTensor) -> Result<()> {
        if dst.cols != src.cols {
            return Err(Error::InvalidInput("append_rows: column counts differ".into()));
        }
        self.reserve_rows(dst, src.rows)?;
        if src.len() > 0 {
            let at = dst.len();
            self.stream
                .memcpy_dtod(&src.buf.slice(0..src.len()), &mut dst.buf.slice_mut(at..at + src.len()))
                .map_err(cuda("appending to a cache"))?;
        }
        dst.rows += src.rows;
        Ok(())
    }

    fn attention_inputs(
        &self,
        query_gate: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        prep: &HeadPrep<'_, CudaTensor>,
        pos0: usize,
        keys: &mut CudaTensor,
        values: &mut CudaTensor,
    ) -> Result<(CudaTensor, CudaTensor)> {
        self.prepare_attention(query_gate, k, v, prep, pos0, keys, values)
    }

    fn embed(&self, table: &CudaMatrix, ids: &[u32]) -> Result<CudaTensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(Error::TokenOutOfRange {
                id,
                vocab_size: table.rows,
            });
        }
        let dev_ids = self.to_device(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
        let mut out = self.tensor(ids.len(), table.cols)?;
        self.dequant_rows(table, Some(&dev_ids), 0, ids.len(), &mut out.buf)?;
        Ok(out)
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaMatrix) -> Result<CudaTensor> {
        if x.cols != w.cols {
            return Err(Error::InvalidInput(format!(
                "matmul: input has {} columns, the matrix {}",
                x.cols, w.cols
            )));
        }
        if x.rows == 1 {
            self.matvec(x, w)
        } else {
            self.matmul_batched(x, w)
        }
    }

    fn matmul_many(&self, x: &CudaTensor, ws: &[&CudaMatrix]) -> Result<Vec<CudaTensor>> {
        if x.rows == 1
            && ws.iter().all(|w| w.cols == x.cols)
            && let Some(outs) = self.matvec_multi(x, ws, None)?
        {
            return Ok(outs);
        }
        ws.iter().map(|w| self.matmul(x, w)).collect()
    }

    fn rms_norm_project(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
        ws: &[&CudaMatrix],
    ) -> Result<(CudaTensor, Vec<CudaTensor>)> {
        if x.rows == 1 && weight.len() == x.cols && ws.iter().all(|w| w.cols == x.cols) {
            let normed = self.tensor(1, x.cols)?;
            let norm = matvec::RowNorm {
                weight,
                eps,
                normed: &normed,
            };
            if let Some(outs) = self.matvec_multi(x, ws, Some(norm))? {
                return Ok((normed, outs));
            }
        }
        crate::backend::rms_norm_project_unfused(self, x, weight, eps, ws)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let n = weight.len() as i32;
        let out = self.tensor(x.rows, x.cols)?;
        launch!(
            self,
            &self.k.rms_norm,
            blocks(x.len() / weight.len(), THREADS),
            &*x.buf,
            &*weight.buf,
            &n,
            &eps,
            &*out.buf
        )?;
        Ok(out)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        Self::check_same("add", x, y)?;
        let n = x.len() as i64;
        launch!(self, &self.k.add_assign, grid_for(x.len()), &mut *x.buf, &*y.buf, &n)
    }

    fn mul_sigmoid(&self, x: &mut CudaTensor, gate: &CudaTensor) -> Result<()> {
        if !(gate.cols == 1 && gate.rows == x.rows) {
            Self::check_same("mul_sigmoid", x, gate)?;
        }
        let (n, cols, gate_cols) = (x.len() as i64, x.cols as i32, gate.cols as i32);
        launch!(
            self,
            &self.k.mul_sigmoid,
            grid_for(x.len()),
            &mut *x.buf,
            &*gate.buf,
            &cols,
            &gate_cols,
            &n
        )
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        Self::check_same("silu_mul", gate, up)?;
        let out = self.tensor(gate.rows, gate.cols)?;
        self.silu_mul_into(&gate.buf, &up.buf, &out.buf, gate.len())?;
        Ok(out)
    }

    fn split_query_gate(&self, qg: &CudaTensor, num_heads: usize, head_dim: usize) -> Result<(CudaTensor, CudaTensor)> {
        if qg.cols != num_heads * head_dim * 2 {
            return Err(Error::InvalidInput(
                "split_query_gate: width is not heads * 2 * head_dim".into(),
            ));
        }
        let q = self.tensor(qg.rows, num_heads * head_dim)?;
        let gate = self.tensor(qg.rows, num_heads * head_dim)?;
        let (heads, d, n) = (num_heads as i32, head_dim as i32, q.len() as i64);
        launch!(
            self,
            &self.k.split_query_gate,
            grid_for(q.len()),
            &*qg.buf,
            &heads,
            &d,
            &*q.buf,
            &*gate.buf,
            &n
        )?;
        Ok((q, gate))
    }

    fn rope(&self, x: &mut CudaTensor, head_dim: usize, rotary_dim: usize, theta: f64, pos0: usize) -> Result<()> {
        let n = x.rows * (x.cols / head_dim) * (rotary_dim / 2);
        let (cols, hd, rot, theta, pos0, count) = (
            x.cols as i32,
            head_dim as i32,
            rotary_dim as i32,
            theta as f32,
            pos0 as i32,
            n as i64,
        );
        launch!(
            self,
            &self.k.rope,
            grid_for(n),
            &mut *x.buf,
            &cols,
            &hd,
            &rot,
            &theta,
            &pos0,
            &count
        )
    }

    fn attention(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        shape: AttentionShape,
        pos0: usize,
    ) -> Result<CudaTensor> {
        self.attend(q, keys, values, shape, pos0)
    }

    fn causal_conv1d_silu(&self, x: &CudaTensor, weight: &CudaTensor, state: &mut CudaTensor) -> Result<CudaTensor> {
        self.conv1d_silu(x, weight, state)
    }

    fn gated_delta_rule(
        &self,
        qkv: &CudaTensor,
        a: &CudaTensor,
        b: &CudaTensor,
        a_log: &CudaTensor,
        dt_bias: &CudaTensor,
        state: &mut CudaTensor,
        dims: &LinearAttentionConfig,
    ) -> Result<CudaTensor> {
        self.delta_rule(qkv, [a, b, a_log, dt_bias], state, dims)
    }

    fn gated_rms_norm(&self, x: &CudaTensor, z: &CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        self.gated_norm(x, z, weight, eps)
    }

    fn max_experts_per_token(&self) -> Option<usize> {
        Some(ROUTE_MAX_K)
    }

    fn route_top_k(&self, logits: &CudaTensor, k: usize, renormalize: bool) -> Result<Vec<Route>> {
        let (t, experts) = (logits.rows, logits.cols);
        if k == 0 || k > experts.min(ROUTE_MAX_K) {
            return Err(Error::InvalidInput(format!(
                "routing {k} of {experts} experts per token (the CUDA routing takes 1 to {ROUTE_MAX_K})"
            )));
        }
        // Indices and weights in one buffer, so the host waits for one copy only.
        let mut routes = self.tensor(2 * t, k)?;
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            // One block per token (ROUTE_THREADS in kernels/matvec.cu).
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (e, kk, renorm) = (experts as i32, k as i32, i32::from(renormalize));
        {
            let (mut idx, weights) = routes.buf.split_at_mut(t * k);
            // SAFETY: i32 and f32 have the same size; the kernel writes indices as i32.
            let mut idx =
                unsafe { idx.transmute_mut::<i32>(t * k) }.ok_or_else(|| Error::Cuda("route buffer layout".into()))?;
            let mut weights = weights;
            launch!(
                self,
                &self.k.route_top_k,
                cfg,
                &*logits.buf,
                &e,
                &kk,
                &renorm,
                &mut idx,
                &mut weights
            )?;
        }
        let host = self.download_floats(&routes.buf, 2 * t * k)?;
        let (idx, weights) = host.split_at(t * k);
        Ok(idx
            .chunks(k)
            .zip(weights.chunks(k))
            .map(|(i, w)| i.iter().map(|e| e.to_bits() as usize).zip(w.iter().copied()).collect())
            .collect())
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let dev_rows = self.to_device(&rows.iter().map(|&r| r as i32).collect::<Vec<_>>())?;
        self.gather_device_rows(x, &dev_rows.slice(..))
    }

    fn scatter_add_rows(&self, out: &mut CudaTensor, y: &CudaTensor, rows: &[usize], weights: &[f32]) -> Result<()> {
        if y.cols != out.cols || y.rows != rows.len() || weights.len() != rows.len() {
            return Err(Error::InvalidInput("scatter_add_rows: shapes disagree".into()));
        }
        let dev_rows = self.to_device(&rows.iter().map(|&r| r as i32).collect::<Vec<_>>())?;
        let dev_weights = self.to_device(weights)?;
        let (cols, n) = (y.cols as i32, y.len() as i64);
        launch!(
            self,
            &self.k.scatter_add_rows,
            grid_for(y.len()),
            &mut *out.buf,
            &*y.buf,
            &dev_rows,
            &dev_weights,
            &cols,
            &n
        )
    }

    fn cached_expert(&self, layer: usize, index: usize) -> Option<CudaExpert> {
        self.cache.get(layer, index)
    }

    fn holds_expert(&self, layer: usize, index: usize) -> bool {
        self.cache.contains(layer, index)
    }

    fn load_expert(&self, layer: usize, index: usize, view: &ExpertView) -> Result<CudaExpert> {
        self.cache.insert(self, layer, index, view)
    }

    fn experts_ffn_rows(
        &self,
        x: &CudaTensor,
        work: &[ExpertRows<'_, CudaExpert>],
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.expert_rows(x, work, out)
    }

    fn expert_matrices<'a>(&self, expert: &'a CudaExpert) -> Result<[&'a CudaMatrix; 3]> {
        expert.ready()?;
        Ok(expert.matrices())
    }

    fn swiglu(&self, x: &CudaTensor, gate: &CudaMatrix, up: &CudaMatrix) -> Result<CudaTensor> {
        let plan = self
            .pow2_plan(gate)
            .filter(|_| x.rows == 1 && gate.encoding == up.encoding && up.data.0.is_multiple_of(16));
        let Some((index, cfg)) = plan else {
            return self.silu_mul(&self.matmul(x, gate)?, &self.matmul(x, up)?);
        };
        let mut act = self.tensor(1, gate.rows)?;
        let (_, group, dtype) = gate.format();
        let ((gs, gb), (us, ub)) = (gate.affine_parts()?, up.affine_parts()?);
        let (gd, gsv, gbv) = (gate.part(gate.data), gate.part(gs), gate.part(gb));
        let (ud, usv, ubv) = (up.part(up.data), up.part(us), up.part(ub));
        let (rows, cols) = (gate.rows as i32, gate.cols as i32);
        launch!(
            self,
            &self.k.swiglu_q[index],
            cfg,
            &gd,
            &gsv,
            &gbv,
            &ud,
            &usv,
            &ubv,
            &group,
            &dtype,
            &*x.buf,
            &rows,
            &cols,
            &mut *act.buf
        )?;
        Ok(act)
    }

    fn expert_ffn(
        &self,
        x: &CudaTensor,
        expert: &CudaExpert,
        rows: &[usize],
        weights: &[f32],
        out: &mut CudaTensor,
    ) -> Result<()> {
        if x.rows != 1 || rows != [0] {
            return crate::backend::expert_ffn_unfused(self, x, expert, rows, weights, out);
        }
        // One token: gate, up and SiLU in one launch; down and the weighted sum in another.
        let [gate, up, down] = self.expert_matrices(expert)?;
        let act = self.swiglu(x, gate, up)?;
        self.matvec_into(&act.buf, down, &mut out.buf, weights[0], 1.0)
    }

    fn matmul_add(&self, x: &CudaTensor, w: &CudaMatrix, out: &mut CudaTensor) -> Result<()> {
        if x.rows != 1 || x.cols != w.cols || out.rows != 1 || out.cols != w.rows {
            return self.add_assign(out, &self.matmul(x, w)?);
        }
        self.matvec_into(&x.buf, w, &mut out.buf, 1.0, 1.0)
    }

    fn experts_ffn_one_token(
        &self,
        x: &CudaTensor,
        experts: &[&CudaExpert],
        weights: &[f32],
        shared: Option<&SharedExpert<'_, Self>>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let mut slots: Vec<BatchSlot> = experts
            .iter()
            .zip(weights)
            .map(|(e, &w)| {
                Ok(BatchSlot {
                    matrices: self.expert_matrices(e)?,
                    weight: Some(w),
                })
            })
            .collect::<Result<_>>()?;
        if let Some(s) = shared {
            slots.push(BatchSlot {
                matrices: [s.gate_proj, s.up_proj, s.down_proj],
                weight: None,
            });
        }
        if x.rows == 1 && self.expert_batch(x, &slots, shared.map(|s| s.gate_logit), out)? {
            return Ok(());
        }
        crate::backend::experts_ffn_one_by_one(self, x, experts, weights, shared, out)
    }

    fn route_and_run_experts(
        &self,
        routing: &DeviceRouting,
        x: &CudaTensor,
        router_logits: &CudaTensor,
        shared: Option<&SharedExpert<'_, Self>>,
        out: &mut CudaTensor,
    ) -> Result<bool> {
        if x.rows != 1 {
            return Ok(false);
        }
        let Some(table) = self.cache.layer_table(self, routing.layer, router_logits.cols)? else {
            return Ok(false);
        };
        let done = self.route_and_run(&table, x, router_logits, routing, shared, out)?;
        let k = routing.experts_per_token;
        if done && !self.graphs.note_routed(routing.layer, k, &table) {
            self.cache.count_device_routed(k);
        }
        Ok(done)
    }

    fn routes_on_device(&self, layer: usize) -> bool {
        self.cache.current_table(layer).is_some()
    }

    fn expert_cache_budget(&self) -> Result<Option<u64>> {
        self.cache.budget(self).map(Some)
    }

    fn reserve_state_memory(&self, bytes: u64) {
        self.cache.reserve(bytes);
    }

    fn expert_cache_stats(&self) -> Option<ExpertCacheStats> {
        Some(self.cache.stats())
    }

    fn has_host_link(&self) -> bool {
        true
    }

    fn step_key(&self, layer: usize, experts_per_token: usize, buffers: &[&CudaTensor]) -> Option<StepKey> {
        use cudarc::driver::DevicePtr;
        self.record_steps.then(|| StepKey {
            layer,
            experts_per_token,
            buffers: buffers.iter().map(|t| t.buf.device_ptr(&self.stream).0).collect(),
        })
    }

    fn run_step(&self, key: &StepKey, step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.run_recorded_step(key, step)
    }
}
