//! Matrix products against weights in any stored encoding. Each weight row is decoded once
//! into f32 and then multiplied with every token of the batch, so a prompt of `T` tokens reads
//! the weights once, not `T` times.

use rayon::prelude::*;

use super::CpuTensor;
#[cfg(target_arch = "x86_64")]
use super::fixed_point::AffineRow;
use super::fixed_point::{FixedPointX, IntegerKernel};
use super::gemm::{Strided, sgemm};
use crate::storage::checkpoint::DType;
use crate::storage::quant::{Encoding, MatrixView, read_float};

/// Output rows handled by one rayon task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

/// Tokens from which a product runs as tiles of dequantized rows times all the tokens
/// (sgemm). Below, each row is read once and dotted with every token by the one-token integer
/// kernels, which beat the sgemm up to 12-16 tokens on the H200 machine's 16-vCPU host and up
/// to 32 or more on the 2-vCPU dev VM (docs/perf.md).
const GEMM_MIN_TOKENS: usize = 16;

/// The same without an integer kernel for the weights: below 8 tokens the sgemm and each row
/// dequantized once and dotted in floats are both bound by the dequantization.
const FLOAT_GEMM_MIN_TOKENS: usize = 8;

/// Rows per tile: 128 dequantized rows of 4096 columns are 2 MiB, reused by every token.
const GEMM_TILE_ROWS: usize = 128;

/// `x · wᵀ` for `x` of shape `[T, w.cols]`.
pub fn matmul(x: &CpuTensor, w: &MatrixView) -> CpuTensor {
    matmul_many(x, &[w]).remove(0)
}

/// `x · wᵀ` for each of `ws`: a layer's projections of one input. Where they share an affine
/// encoding and a few tokens, x is brought to fixed point once and one parallel loop covers
/// all their rows (each matrix on its own paid both: for an expert's gate and up about 10 us
/// of a 2-vCPU machine's 100-200).
pub fn matmul_many(x: &CpuTensor, ws: &[&MatrixView]) -> Vec<CpuTensor> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { matmul_many_avx2(x, ws) };
    }
    matmul_portable(x, ws, None)
}

/// The same code compiled for AVX2 and FMA, chosen at run time (the release binary targets
/// baseline x86-64 so that it runs everywhere), with products of few tokens in fixed point.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matmul_many_avx2(x: &CpuTensor, ws: &[&MatrixView]) -> Vec<CpuTensor> {
    matmul_portable(x, ws, IntegerKernel::detect())
}

/// `integer`: the fixed-point kernel this CPU runs, if any.
#[inline(always)]
fn matmul_portable(x: &CpuTensor, ws: &[&MatrixView], integer: Option<IntegerKernel>) -> Vec<CpuTensor> {
    let shared = ws
        .windows(2)
        .all(|p| p[0].encoding == p[1].encoding && p[0].cols == p[1].cols);
    if shared {
        return same_encoding(x, ws, integer);
    }
    ws.iter()
        .flat_map(|w| same_encoding(x, std::slice::from_ref(w), integer))
        .collect()
}

/// [`matmul_portable`] for matrices of one encoding and width: below [`GEMM_MIN_TOKENS`],
/// the fused kernels where the encoding suits them, all the matrices' rows in one loop.
#[inline(always)]
fn same_encoding(x: &CpuTensor, ws: &[&MatrixView], integer: Option<IntegerKernel>) -> Vec<CpuTensor> {
    let fused = match ws.first() {
        Some(w) if x.rows < GEMM_MIN_TOKENS => FusedAffine::new(w, x, integer),
        _ => None,
    };
    match fused {
        Some(fused) => fused_products(&fused, x, ws),
        None => ws.iter().map(|w| unfused(x, w)).collect(),
    }
}

/// `x · wᵀ` from dequantized rows: tiles through the sgemm from [`FLOAT_GEMM_MIN_TOKENS`],
/// below it each row dequantized once and dotted with every token.
fn unfused(x: &CpuTensor, w: &MatrixView) -> CpuTensor {
    let (t, k) = (x.rows, x.cols);
    debug_assert_eq!(k, w.cols);
    if t >= FLOAT_GEMM_MIN_TOKENS {
        return matmul_tiled(x, w);
    }
    // Computed as [n, t] so each task writes a contiguous block, then transposed.
    let mut out_nt = vec![0.0f32; w.rows * t];
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
    token_major(out_nt, t, w.rows)
}

/// `x · wᵀ` for each of `ws` (of `fused`'s encoding) by the fused kernels, the rows of all of
/// them in one parallel loop.
#[inline(always)]
fn fused_products(fused: &FusedAffine, x: &CpuTensor, ws: &[&MatrixView]) -> Vec<CpuTensor> {
    let t = x.rows;
    // Computed as [n, t] so each task writes a contiguous block, then transposed.
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0f32; w.rows * t]).collect();
    let tasks: Vec<(&MatrixView, usize, &mut [f32])> = ws
        .iter()
        .zip(outs.iter_mut())
        .flat_map(|(&w, out)| {
            let blocks = out.chunks_mut(t * ROWS_PER_TASK).enumerate();
            blocks.map(move |(chunk, block)| (w, chunk * ROWS_PER_TASK, block))
        })
        .collect();
    tasks.into_par_iter().for_each(|(w, first, block)| {
        for (i, outs) in block.chunks_mut(t).enumerate() {
            fused.row_dots(w, first + i, &x.data, outs);
        }
    });
    outs.into_iter()
        .zip(ws)
        .map(|(out, w)| token_major(out, t, w.rows))
        .collect()
}

/// `[n, t]` products as a `[t, n]` tensor.
fn token_major(out_nt: Vec<f32>, t: usize, n: usize) -> CpuTensor {
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

/// `x · wᵀ` for many tokens: tiles of `GEMM_TILE_ROWS` rows, each dequantized once and
/// multiplied with every token by a blocked sgemm (`matrixmultiply`), tiles in parallel.
fn matmul_tiled(x: &CpuTensor, w: &MatrixView) -> CpuTensor {
    let (t, k, n) = (x.rows, x.cols, w.rows);
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(GEMM_TILE_ROWS))
        .into_par_iter()
        .map(|tile| {
            let first = tile * GEMM_TILE_ROWS;
            let rows = GEMM_TILE_ROWS.min(n - first);
            let mut tile_w = vec![0.0f32; rows * k];
            for (i, row) in tile_w.chunks_exact_mut(k).enumerate() {
                w.dequantize_row(first + i, row);
            }
            let mut block = vec![0.0f32; t * rows];
            let x = Strided::of(&x.data, t, k, false);
            sgemm(1.0, &x, &Strided::of(&tile_w, k, rows, true), &mut block);
            block
        })
        .collect();
    let mut out = vec![0.0f32; t * n];
    for (tile, block) in blocks.iter().enumerate() {
        let first = tile * GEMM_TILE_ROWS;
        let rows = block.len() / t;
        for (dst, src) in out.chunks_exact_mut(n).zip(block.chunks_exact(rows)) {
            dst[first..first + rows].copy_from_slice(src);
        }
    }
    CpuTensor::new(t, n, out)
}

/// Products of a few tokens with 2-, 4- or 8-bit affine weights in the fused form
/// `sum_g(scale_g * (q_g . x_g) + bias_g * sum(x_g))`, which never materialises the
/// dequantized row: each row is read once, for every token while it is in L1.
struct FusedAffine {
    bits: u32,
    group: usize,
    scale_dtype: DType,
    tokens: Vec<FusedToken>,
}

/// One token's input to [`FusedAffine`].
struct FusedToken {
    /// `sum(x_g)` per group.
    group_sums: Vec<f32>,
    /// x in fixed point, where the CPU and the encoding suit an integer kernel.
    fixed: Option<FixedPointX>,
}

impl FusedAffine {
    /// `integer`: the fixed-point kernel this CPU runs, if any.
    #[inline(always)]
    fn new(w: &MatrixView, x: &CpuTensor, integer: Option<IntegerKernel>) -> Option<Self> {
        let Encoding::Affine {
            bits,
            group_size,
            scale_dtype,
        } = w.encoding
        else {
            return None;
        };
        if !matches!(bits, 2 | 4 | 8) {
            return None;
        }
        let tokens: Vec<FusedToken> = x
            .data
            .chunks_exact(x.cols)
            .map(|x| FusedToken {
                group_sums: x.chunks_exact(group_size).map(|g| g.iter().sum()).collect(),
                fixed: integer.and_then(|k| FixedPointX::new(x, bits, group_size, k)),
            })
            .collect();
        // Without the integer kernel, several tokens are better served by dequantizing each
        // row once than by the float form once per token.
        if tokens.len() > 1 && tokens.iter().any(|t| t.fixed.is_none()) {
            return None;
        }
        Some(FusedAffine {
            bits,
            group: group_size,
            scale_dtype,
            tokens,
        })
    }

    /// Row `r` of `w` dotted with each token of `x` (`outs.len()` rows of `w.cols`).
    #[inline(always)]
    fn row_dots(&self, w: &MatrixView, r: usize, x: &[f32], outs: &mut [f32]) {
        let rb = w.row_bytes();
        let row = &w.data.bytes()[r * rb..(r + 1) * rb];
        let groups = w.cols / self.group;
        let sb = groups * self.scale_dtype.size();
        let scales = &w.scales.as_ref().map_or(&[][..], |b| b.bytes())[r * sb..(r + 1) * sb];
        let biases = &w.biases.as_ref().map_or(&[][..], |b| b.bytes())[r * sb..(r + 1) * sb];
        for ((out, token), x) in outs.iter_mut().zip(&self.tokens).zip(x.chunks_exact(w.cols)) {
            #[cfg(target_arch = "x86_64")]
            if let Some(fixed) = &token.fixed {
                let row = AffineRow {
                    codes: row,
                    scales,
                    biases,
                    dtype: self.scale_dtype,
                };
                // SAFETY: `fixed` exists only for a kernel the CPU runs; the row has every
                // group's codes, scale and bias.
                *out = unsafe { fixed.row_dot(row, &token.group_sums) };
                continue;
            }
            let gb = self.group * self.bits as usize / 8;
            let mut acc = 0.0f32;
            for (g, (codes, xg)) in row.chunks_exact(gb).zip(x.chunks_exact(self.group)).enumerate() {
                let d = match self.bits {
                    4 => dot_codes::<4>(codes, xg),
                    8 => dot_codes::<8>(codes, xg),
                    _ => dot_codes::<2>(codes, xg),
                };
                acc += read_float(scales, self.scale_dtype, g) * d
                    + read_float(biases, self.scale_dtype, g) * token.group_sums[g];
            }
            *out = acc;
        }
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

#[cfg(test)]
pub(in crate::backend::cpu) mod tests {
    use super::*;
    use crate::storage::blob::Blob;

    pub(in crate::backend::cpu) fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut state = seed | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    pub(in crate::backend::cpu) fn affine(rows: usize, cols: usize, bits: u32, group: usize) -> MatrixView {
        affine_scaled(rows, cols, bits, group, DType::BF16)
    }

    /// [`affine`] with scales and biases stored as `dtype`.
    fn affine_scaled(rows: usize, cols: usize, bits: u32, group: usize, dtype: DType) -> MatrixView {
        let groups = rows * cols / group;
        let floats = |seed, base: f32| -> Vec<u8> {
            noise(seed, groups)
                .iter()
                .flat_map(|&b| {
                    let v = base + f32::from(b) * 1e-4;
                    match dtype {
                        DType::F16 => half::f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                        DType::F32 => v.to_le_bytes().to_vec(),
                        _ => half::bf16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                    }
                })
                .collect()
        };
        MatrixView::affine(
            "test",
            rows,
            cols,
            bits,
            group,
            dtype,
            Blob::from_vec(noise(7 + rows as u64, rows * cols * bits as usize / 8)),
            Blob::from_vec(floats(11, 0.01)),
            Blob::from_vec(floats(13, -0.05)),
        )
        .expect("valid matrix")
    }

    /// A prompt's product (tiles of dequantized rows through sgemm, the last tile partial)
    /// against the same tokens one at a time (the one-token kernels).
    #[test]
    fn many_token_products_match_one_token_ones() {
        let (rows, cols, tokens) = (2 * GEMM_TILE_ROWS + 44, 256, GEMM_MIN_TOKENS + 13);
        let w = affine(rows, cols, 4, 64);
        let x: Vec<f32> = noise(5, tokens * cols)
            .iter()
            .map(|&b| f32::from(b) / 64.0 - 2.0)
            .collect();
        let many = matmul(&CpuTensor::new(tokens, cols, x.clone()), &w);
        assert_eq!((many.rows, many.cols), (tokens, rows));
        for (t, xt) in x.chunks_exact(cols).enumerate() {
            let one = matmul(&CpuTensor::new(1, cols, xt.to_vec()), &w);
            for (r, (&a, &b)) in many.data[t * rows..(t + 1) * rows].iter().zip(&one.data).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "token {t}, row {r}: {a} vs {b}"
                );
            }
        }
    }

    /// A product of a few tokens (each row read once for all of them) against the same tokens
    /// one at a time: the same kernel per token, so the same bits where the CPU runs an
    /// integer kernel.
    #[test]
    fn few_token_products_are_one_token_products() {
        let exact = IntegerKernel::detect().is_some();
        let cols = 512;
        for (bits, tokens) in [(4, 2), (4, GEMM_MIN_TOKENS - 1), (2, 3), (8, 5)] {
            let w = affine(3 * ROWS_PER_TASK + 5, cols, bits, 64);
            let x: Vec<f32> = noise(9, tokens * cols)
                .iter()
                .map(|&b| f32::from(b) / 32.0 - 4.0)
                .collect();
            let few = matmul(&CpuTensor::new(tokens, cols, x.clone()), &w);
            for (t, xt) in x.chunks_exact(cols).enumerate() {
                let one = matmul(&CpuTensor::new(1, cols, xt.to_vec()), &w);
                for (r, (&a, &b)) in few.data[t * w.rows..(t + 1) * w.rows].iter().zip(&one.data).enumerate() {
                    let tolerance = if exact { 0.0 } else { 1e-4 * (1.0 + b.abs()) };
                    assert!(
                        (a - b).abs() <= tolerance,
                        "{bits}-bit, token {t} of {tokens}, row {r}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Several matrices of one input give what each gives alone, bit for bit: sharing x's
    /// fixed point and one loop changes no arithmetic.
    #[test]
    fn products_of_one_input_match_each_alone() {
        let cols = 512;
        let (a, b, c) = (affine(40, cols, 4, 64), affine(3, cols, 4, 64), affine(17, cols, 8, 64));
        for tokens in [1, 3] {
            let x = CpuTensor::new(
                tokens,
                cols,
                noise(4, tokens * cols)
                    .iter()
                    .map(|&v| f32::from(v) / 50.0 - 2.5)
                    .collect(),
            );
            for ws in [vec![&a, &b], vec![&a, &c, &b]] {
                let many = matmul_many(&x, &ws);
                assert_eq!(many.len(), ws.len());
                for (got, w) in many.iter().zip(&ws) {
                    assert_eq!(
                        got.data,
                        matmul(&x, w).data,
                        "{tokens} tokens, `{}` of {}",
                        w.name,
                        ws.len()
                    );
                }
            }
        }
    }

    /// The fixed-point kernel against the float one, on inputs whose groups span many
    /// magnitudes (and one that is all zeros).
    #[test]
    fn fixed_point_products_match_the_float_ones() {
        let kernels = match IntegerKernel::detect() {
            Some(IntegerKernel::Avx512Bytes) => vec![
                IntegerKernel::Avx2,
                IntegerKernel::Avx512Words,
                IntegerKernel::Avx512Bytes,
            ],
            Some(k) => {
                eprintln!("the AVX-512 VNNI kernels are not checked: this CPU does not run them");
                vec![k]
            }
            None => {
                eprintln!("skipped: this CPU runs no fixed-point kernel");
                return;
            }
        };
        // 80 groups of 32 in a row: more than the kernels decode at a time.
        let cols = 2560;
        let x: Vec<f32> = noise(3, cols)
            .iter()
            .enumerate()
            .map(|(i, &b)| match i / 64 {
                2 => 0.0,
                g => (f32::from(b) - 127.5) * 10f32.powi((g % 8) as i32 - 4),
            })
            .collect();
        let x = CpuTensor::new(1, cols, x);
        // Groups of 16, 32, 64 and 128 bytes of codes.
        let encodings = [
            (4, 64),
            (4, 32),
            (4, 128),
            (4, 256),
            (2, 64),
            (2, 128),
            (2, 256),
            (8, 64),
            (8, 32),
            (8, 16),
        ];
        // Scales and biases in each float type, for the encodings where the kernels decode them
        // differently.
        let dtypes = |bits, group| match (bits, group) {
            (4, 64) | (2, 64) | (8, 64) => vec![DType::BF16, DType::F16, DType::F32],
            _ => vec![DType::BF16],
        };
        let cases = encodings
            .iter()
            .flat_map(|&(b, g)| dtypes(b, g).into_iter().map(move |d| (b, g, d)));
        let cases: Vec<_> = cases.collect();
        let mut used = Vec::new();
        for (kernel, &(bits, group, dtype)) in kernels.iter().flat_map(|k| cases.iter().map(move |c| (*k, c))) {
            let w = affine_scaled(40, cols, bits, group, dtype);
            let fixed = FusedAffine::new(&w, &x, Some(kernel)).expect("fused");
            let Some(taken) = fixed.tokens[0].fixed.as_ref().map(FixedPointX::kernel) else {
                panic!("{bits}-bit, groups of {group}: no integer kernel")
            };
            used.push(taken);
            let float = FusedAffine::new(&w, &x, None).expect("fused");
            for r in 0..w.rows {
                let dot = |f: &FusedAffine| {
                    let mut out = [0f32];
                    f.row_dots(&w, r, &x.data, &mut out);
                    out[0]
                };
                let (a, b) = (dot(&fixed), dot(&float));
                // The largest |weight|: scales up to 0.0356 times the largest code, biases -0.05.
                let w_max = 0.0356 * ((1u32 << bits) - 1) as f32 + 0.05;
                let scale: f32 = x.data.iter().map(|v| v.abs()).sum::<f32>() * w_max;
                assert!(
                    (a - b).abs() <= 1e-6 * scale,
                    "{bits}-bit, groups of {group}, {dtype:?}, row {r}: {a} vs {b}"
                );
            }
        }
        assert!(
            kernels.iter().all(|k| used.contains(k)),
            "kernels {kernels:?}, used {used:?}"
        );
    }
}
