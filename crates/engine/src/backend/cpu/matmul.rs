//! Matrix products against weights in any stored encoding. Each weight row is decoded once
//! into f32 and then multiplied with every token of the batch, so a prompt of `T` tokens reads
//! the weights once, not `T` times.

use rayon::prelude::*;

use super::CpuTensor;
use crate::storage::quant::MatrixView;

/// Output rows handled by one rayon task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

/// `x · wᵀ` for `x` of shape `[T, w.cols]`.
pub fn matmul(x: &CpuTensor, w: &MatrixView) -> CpuTensor {
    let (t, k) = (x.rows, x.cols);
    debug_assert_eq!(k, w.cols);
    let n = w.rows;
    // Computed as [n, t] so each task writes a contiguous block, then transposed.
    let mut out_nt = vec![0.0f32; n * t];
    out_nt
        .par_chunks_mut(t * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(chunk, block)| {
            let mut row = vec![0.0f32; k];
            for (i, outs) in block.chunks_mut(t).enumerate() {
                w.dequantize_row(chunk * ROWS_PER_TASK + i, &mut row);
                for (o, xt) in outs.iter_mut().zip(x.data.chunks_exact(k)) {
                    *o = dot(&row, xt);
                }
            }
        });
    if t == 1 {
        return CpuTensor::new(1, n, out_nt);
    }
    let mut out = vec![0.0f32; t * n];
    for (r, col) in out_nt.chunks_exact(t).enumerate() {
        for (ti, &v) in col.iter().enumerate() {
            out[ti * n + r] = v;
        }
    }
    CpuTensor::new(t, n, out)
}

/// Rows `ids` of an embedding table, decoded to f32.
pub fn embed(table: &MatrixView, ids: &[u32]) -> CpuTensor {
    let k = table.cols;
    let mut out = vec![0.0f32; ids.len() * k];
    for (dst, &id) in out.chunks_exact_mut(k).zip(ids) {
        table.dequantize_row(id as usize, dst);
    }
    CpuTensor::new(ids.len(), k, out)
}

/// A dot product with eight independent accumulators, which the compiler vectorises.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
