//! Matrix products: the one-token kernels (2/4/8-bit affine, one launch for matrices that
//! read the same input, the general fallbacks) and the batched prefill path (the tensor-core
//! kernel of `mma.rs` where it applies, else rows decoded to f32, then cuBLAS SGEMM).

use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::pool::PooledBuf;
use super::{CudaBackend, CudaMatrix, CudaTensor, THREADS, blocks, cuda, grid_for};
use crate::error::Result;
use crate::storage::quant::Encoding;

/// Matrices of one same-input launch, as `struct MatvecMulti` in kernels/matvec.cu.
const MAX_MULTI: usize = 4;

#[repr(C)]
#[derive(Clone, Copy)]
struct MatvecMultiParams {
    w: [[u64; 3]; MAX_MULTI],
    y: [u64; MAX_MULTI],
    rows: [i32; MAX_MULTI],
    count: i32,
}

// SAFETY: plain old data laid out as the C struct the kernels take by value.
unsafe impl cudarc::driver::DeviceRepr for MatvecMultiParams {}

/// Shared memory of one vector staged for the one-token kernels (`staged_bytes` in
/// kernels/matvec.cu): per 16-byte piece of codes, its columns of x as three limb bytes each, padded
/// to an odd number of 16-byte units, and 8 bytes (the piece's sum of x and scale); rounded up
/// to 16 bytes (the batched down projection stacks one per expert).
pub(super) fn staged_bytes(bits: usize, cols: usize) -> usize {
    let words = 8 / bits;
    let record = 3 * 16 * words + if (3 * words).is_multiple_of(2) { 16 } else { 0 };
    ((cols / (128 / bits)) * (record + 8)).next_multiple_of(16)
}

/// An RMSNorm for `matvec_multi` to apply to its input: the weight, eps, and where the
/// normalized input goes.
pub(super) struct RowNorm<'a> {
    pub(super) weight: &'a CudaTensor,
    pub(super) eps: f32,
    pub(super) normed: &'a CudaTensor,
}

/// The index (2, 4, 8 bits) and the bits of the kernels that read whole 16-byte pieces of
/// codes, when `encoding` suits them: 2, 4 or 8 bits in groups that hold whole pieces and are
/// powers of two (the kernels find a piece's group with a shift; MLX uses 32, 64 or 128).
pub(super) fn pow2_kernel(encoding: &Encoding) -> Option<(usize, usize)> {
    let Encoding::Affine { bits, group_size, .. } = *encoding else {
        return None;
    };
    let index = match bits {
        2 => 0,
        4 => 1,
        8 => 2,
        _ => return None,
    };
    let bits = bits as usize;
    (group_size.is_power_of_two() && group_size % (128 / bits) == 0).then_some((index, bits))
}

impl CudaBackend {
    /// The launch of the 2/4/8-bit one-token kernels for `w` (kernel index, configuration),
    /// when its shape suits them: whole 16-byte pieces per group, aligned rows, and x small
    /// enough for shared memory.
    pub(super) fn pow2_plan(&self, w: &CudaMatrix) -> Option<(usize, LaunchConfig)> {
        let (index, bits) = pow2_kernel(&w.encoding)?;
        let per_piece = 128 / bits;
        if !w.cols.is_multiple_of(per_piece) || !w.data.0.is_multiple_of(16) {
            return None;
        }
        let smem = staged_bytes(bits, w.cols);
        if smem > 48 * 1024 {
            return None;
        }
        // As many blocks as the GPU holds at once (registers bound them: four per
        // multiprocessor at 4 bits), each staging x once: as fast as eight per multiprocessor
        // on lm_head, 8% faster on the mid-size in_proj (docs/perf.md).
        let resident = self.k.matvec_resident[index].max(1) as usize;
        let blocks = w.rows.div_ceil(8).min(resident * self.sms);
        Some((
            index,
            LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            },
        ))
    }

    /// One-token products of matrices that read the same `x`, in one launch when they share
    /// a 2/4/8-bit encoding and width (any heights); `None`, having done nothing, otherwise.
    /// With `norm`, the products read `rms_norm(x, weight, eps)`, which the launch also
    /// writes to `normed`.
    pub(super) fn matvec_multi(
        &self,
        x: &CudaTensor,
        ws: &[&CudaMatrix],
        norm: Option<RowNorm<'_>>,
    ) -> Result<Option<Vec<CudaTensor>>> {
        let Some((&first, _)) = ws.split_first() else {
            return Ok(Some(Vec::new()));
        };
        let Some((index, cfg)) = self.pow2_plan(first) else {
            return Ok(None);
        };
        let same = ws.len() <= MAX_MULTI
            && ws.iter().all(|w| {
                w.encoding == first.encoding
                    && w.cols == first.cols
                    && self.pow2_plan(w).is_some_and(|(i, _)| i == index)
            });
        if !same {
            return Ok(None);
        }
        let outs = ws.iter().map(|w| self.tensor(1, w.rows)).collect::<Result<Vec<_>>>()?;
        let mut params = MatvecMultiParams {
            w: [[0; 3]; MAX_MULTI],
            y: [0; MAX_MULTI],
            rows: [0; MAX_MULTI],
            count: ws.len() as i32,
        };
        use cudarc::driver::DevicePtr;
        for (k, (w, out)) in ws.iter().zip(&outs).enumerate() {
            let (sc, bi) = w.affine_parts()?;
            let (base, _guard) = w.mem.device_ptr(&self.stream);
            for (j, offset) in [w.data.0, sc.0, bi.0].into_iter().enumerate() {
                params.w[k][j] = base + offset as u64;
            }
            params.y[k] = out.buf.device_ptr(&self.stream).0;
            params.rows[k] = w.rows as i32;
        }
        let total: usize = ws.iter().map(|w| w.rows).sum();
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(8).min(8 * self.sms) as u32, 1, 1),
            ..cfg
        };
        let (_, group, dtype) = first.format();
        let cols = first.cols as i32;
        let (norm_weight, eps, normed) = match norm {
            Some(n) => (
                n.weight.buf.device_ptr(&self.stream).0,
                n.eps,
                n.normed.buf.device_ptr(&self.stream).0,
            ),
            None => (0, 0.0, 0),
        };
        launch!(
            self,
            &self.k.matvec_multi_q[index],
            cfg,
            &params,
            &group,
            &dtype,
            &*x.buf,
            &cols,
            &norm_weight,
            &eps,
            &normed
        )?;
        Ok(Some(outs))
    }

    /// One-token product into `y`: `y = alpha * (W x) + beta * y`.
    pub(super) fn matvec_into(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaMatrix,
        y: &mut CudaSlice<f32>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let (bits, group, dtype) = w.format();
        let (rows, cols) = (w.rows as i32, w.cols as i32);
        let data = w.part(w.data);
        if let Some((index, cfg)) = self.pow2_plan(w) {
            // A warp takes a pair of neighbouring rows, so that each piece of x it reads from
            // shared memory serves both, where the pairs still give every multiprocessor a
            // block (lm_head 13% faster, 4096-row products 7-13%; with fewer rows, pairs left
            // multiprocessors idle: 1024 rows 18% slower, docs/perf.md).
            let (f, cfg) = if w.rows.div_ceil(16) >= self.sms {
                let resident = self.k.matvec_pairs_resident[index].max(1) as usize;
                let blocks = w.rows.div_ceil(16).min(resident * self.sms) as u32;
                let cfg = LaunchConfig {
                    grid_dim: (blocks, 1, 1),
                    ..cfg
                };
                (&self.k.matvec_pairs_q[index], cfg)
            } else {
                (&self.k.matvec_q[index], cfg)
            };
            let (s, b) = w.affine_parts()?;
            let (scales, biases) = (w.part(s), w.part(b));
            return launch!(
                self, f, cfg, &data, &scales, &biases, &group, &dtype, x, &rows, &cols, y, &alpha, &beta
            );
        }
        if alpha != 1.0 || beta != 0.0 {
            let tmp = self.matvec_plain(x, w, bits, group, dtype)?;
            let n = w.rows as i64;
            let zero = 0i32;
            return launch!(self, &self.k.axpy, grid_for(w.rows), y, &*tmp, &alpha, &zero, &n);
        }
        let tmp = self.matvec_plain(x, w, bits, group, dtype)?;
        self.stream.memcpy_dtod(&*tmp, y).map_err(cuda("copying"))
    }

    /// The general (warp per row, x from global memory) one-token kernels.
    pub(super) fn matvec_plain(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaMatrix,
        bits: i32,
        group: i32,
        dtype: i32,
    ) -> Result<PooledBuf> {
        let out = self.tensor(1, w.rows)?.buf;
        let (rows, cols) = (w.rows as i32, w.cols as i32);
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(THREADS / 32), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let data = w.part(w.data);
        if bits == 0 {
            launch!(self, &self.k.matvec_dense, cfg, &data, &dtype, x, &rows, &cols, &*out)?;
        } else {
            let (s, b) = w.affine_parts()?;
            let (scales, biases) = (w.part(s), w.part(b));
            launch!(
                self,
                &self.k.matvec_affine_any,
                cfg,
                &data,
                &scales,
                &biases,
                &bits,
                &group,
                &dtype,
                x,
                &rows,
                &cols,
                &*out
            )?;
        }
        Ok(out)
    }

    /// One-token product `y = W x`.
    pub(super) fn matvec(&self, x: &CudaTensor, w: &CudaMatrix) -> Result<CudaTensor> {
        let mut out = self.tensor(1, w.rows)?;
        self.matvec_into(&x.buf, w, &mut out.buf, 1.0, 0.0)?;
        Ok(out)
    }

    /// Decodes rows of `w` to f32 into `out`: rows `ids` when given, else `first..first + n`.
    pub(super) fn dequant_rows(
        &self,
        w: &CudaMatrix,
        ids: Option<&CudaSlice<i32>>,
        first: usize,
        n: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (bits, group, dtype) = w.format();
        let data = w.part(w.data);
        // Dense matrices have no scales; any valid pointer stands in.
        let (s, bi) = (w.scales.unwrap_or(w.data), w.biases.unwrap_or(w.data));
        let scales = w.part(s);
        let biases = w.part(bi);
        let null_ids = self.stream.null::<i32>().map_err(cuda("allocating"))?;
        let ids = ids.unwrap_or(&null_ids);
        let (first, cols) = (first as i64, w.cols as i32);
        launch!(
            self,
            &self.k.dequant_rows,
            blocks(n, THREADS),
            &data,
            &scales,
            &biases,
            &bits,
            &group,
            &dtype,
            ids,
            &first,
            &cols,
            out
        )
    }

    /// Batched product `x . Wᵀ` for several tokens (`gemm_into`).
    pub(super) fn matmul_batched(&self, x: &CudaTensor, w: &CudaMatrix) -> Result<CudaTensor> {
        let mut out = self.tensor(x.rows, w.rows)?;
        self.gemm_into(&x.buf.slice(..), x.rows, w, &mut out.buf.slice_mut(..))?;
        Ok(out)
    }

    /// `out = x . Wᵀ` for the `t` rows of `x` (`[t, w.cols]`) into `out` (`[t, w.rows]`): on
    /// the tensor cores when `mma_matmul` takes it, else row blocks of W decoded to f32, then
    /// SGEMM into the matching columns of the output.
    pub(super) fn gemm_into(
        &self,
        x: &CudaView<'_, f32>,
        t: usize,
        w: &CudaMatrix,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (k, n) = (w.cols, w.rows);
        if x.len() < t * k || out.len() < t * n {
            return Err(crate::error::Error::InvalidInput(format!(
                "batched product: {t} rows of {k} against views of {} and {} floats",
                x.len(),
                out.len()
            )));
        }
        if self.mma_matmul(x, t, w, out)? {
            return Ok(());
        }
        let block_rows = (64usize << 20) / k.max(1);
        let block_rows = block_rows.clamp(1, n);
        self.with_scratch(block_rows * k, |scratch| {
            for first in (0..n).step_by(block_rows) {
                let rows = block_rows.min(n - first);
                self.dequant_rows(w, None, first, rows, scratch)?;
                let cfg = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: rows as i32,
                    n: t as i32,
                    k: k as i32,
                    alpha: 1.0f32,
                    lda: k as i32,
                    ldb: k as i32,
                    beta: 0.0f32,
                    ldc: n as i32,
                };
                let mut c = out.slice_mut(first..);
                // SAFETY: A is rows x k in the scratch, B is x (t x k), C starts at column
                // `first` of the t x n output with leading dimension n.
                unsafe { self.blas.gemm(cfg, &scratch.slice(0..rows * k), x, &mut c) }.map_err(cuda("cuBLAS SGEMM"))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::staged_bytes;

    /// The layout kernels/matvec.cu stages x in, worked out by hand: per piece three limbs of one
    /// byte per column (128 / bits columns), padded to an odd number of 16-byte units, plus
    /// 8 bytes of sum and scale.
    #[test]
    fn staged_x_takes_three_limb_bytes_per_column_padded_per_piece() {
        // 4 bits: 32 columns per piece, 96 limb bytes -> 112 (7 units), 128 pieces.
        assert_eq!(staged_bytes(4, 4096), 128 * (112 + 8));
        // 8 bits: 16 columns per piece, 48 limb bytes (3 units, odd already), 256 pieces.
        assert_eq!(staged_bytes(8, 4096), 256 * (48 + 8));
        // 2 bits: 64 columns per piece, 192 limb bytes -> 208 (13 units), 64 pieces.
        assert_eq!(staged_bytes(2, 4096), 64 * (208 + 8));
        // One piece: rounded up to 16 bytes.
        assert_eq!(staged_bytes(4, 32), 128);
    }
}
