//! Matrix products against weights in any stored encoding. Each weight row is decoded once
//! into f32 and then multiplied with every token of the batch, so a prompt of `T` tokens reads
//! the weights once, not `T` times.

use rayon::prelude::*;

use super::CpuTensor;
use crate::storage::checkpoint::DType;
use crate::storage::quant::{Encoding, MatrixView, read_float};

/// Output rows handled by one rayon task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

/// `x · wᵀ` for `x` of shape `[T, w.cols]`.
pub fn matmul(x: &CpuTensor, w: &MatrixView) -> CpuTensor {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { matmul_avx2(x, w) };
    }
    matmul_portable(x, w)
}

/// The same code compiled for AVX2 and FMA, chosen at run time: the release binary targets
/// baseline x86-64 so that it runs everywhere.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matmul_avx2(x: &CpuTensor, w: &MatrixView) -> CpuTensor {
    matmul_portable(x, w)
}

#[inline(always)]
fn matmul_portable(x: &CpuTensor, w: &MatrixView) -> CpuTensor {
    let (t, k) = (x.rows, x.cols);
    debug_assert_eq!(k, w.cols);
    let n = w.rows;
    let fused = FusedAffine::new(w, x);
    // Computed as [n, t] so each task writes a contiguous block, then transposed.
    let mut out_nt = vec![0.0f32; n * t];
    out_nt
        .par_chunks_mut(t * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(chunk, block)| {
            let first = chunk * ROWS_PER_TASK;
            if let Some(f) = &fused {
                for (i, o) in block.iter_mut().enumerate() {
                    *o = f.row_dot(w, first + i, &x.data);
                }
                return;
            }
            let mut row = vec![0.0f32; k];
            for (i, outs) in block.chunks_mut(t).enumerate() {
                w.dequantize_row(first + i, &mut row);
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

/// One-token products with 2-, 4- or 8-bit affine weights in the fused form
/// `sum_g(scale_g * (q_g . x_g) + bias_g * sum(x_g))`, which never materialises the
/// dequantized row.
struct FusedAffine {
    bits: u32,
    group: usize,
    scale_dtype: DType,
    /// `sum(x_g)` per group.
    group_sums: Vec<f32>,
}

impl FusedAffine {
    #[inline(always)]
    fn new(w: &MatrixView, x: &CpuTensor) -> Option<Self> {
        let Encoding::Affine {
            bits,
            group_size,
            scale_dtype,
        } = w.encoding
        else {
            return None;
        };
        if x.rows != 1 || !matches!(bits, 2 | 4 | 8) {
            return None;
        }
        Some(FusedAffine {
            bits,
            group: group_size,
            scale_dtype,
            group_sums: x.data.chunks_exact(group_size).map(|g| g.iter().sum()).collect(),
        })
    }

    #[inline(always)]
    fn row_dot(&self, w: &MatrixView, r: usize, x: &[f32]) -> f32 {
        let rb = w.row_bytes();
        let row = &w.data.bytes()[r * rb..(r + 1) * rb];
        let groups = self.group_sums.len();
        let sb = groups * self.scale_dtype.size();
        let scales = &w.scales.as_ref().map_or(&[][..], |b| b.bytes())[r * sb..(r + 1) * sb];
        let biases = &w.biases.as_ref().map_or(&[][..], |b| b.bytes())[r * sb..(r + 1) * sb];
        let gb = self.group * self.bits as usize / 8;
        let mut acc = 0.0f32;
        for (g, (codes, xg)) in row.chunks_exact(gb).zip(x.chunks_exact(self.group)).enumerate() {
            let d = match self.bits {
                4 => dot_codes::<4>(codes, xg),
                8 => dot_codes::<8>(codes, xg),
                _ => dot_codes::<2>(codes, xg),
            };
            acc += read_float(scales, self.scale_dtype, g) * d
                + read_float(biases, self.scale_dtype, g) * self.group_sums[g];
        }
        acc
    }
}

/// `q . x` for `BITS`-bit codes packed low bits first in little-endian 32-bit words: lane
/// `j` of each word multiplies `x[j]`, which vectorises as a shift-and-mask per lane.
#[inline(always)]
fn dot_codes<const BITS: usize>(codes: &[u8], x: &[f32]) -> f32 {
    let per_word = 32 / BITS;
    let mask = (1u32 << BITS) - 1;
    let mut acc = [0.0f32; 16];
    for (word, xs) in codes.chunks_exact(4).zip(x.chunks_exact(per_word)) {
        let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        for j in 0..per_word {
            acc[j] += ((w >> (BITS * j)) & mask) as f32 * xs[j];
        }
    }
    acc.iter().sum()
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
