//! One-token products of 2-, 4- and 8-bit affine weights in integer arithmetic, as the CUDA
//! kernels do them. x becomes 24-bit fixed point per group, the only rounding (at most half
//! a unit of its 24th bit, about f32's own), split into a high and a low 12-bit half so that
//! every code's product with it is an exact 16-bit multiply-add (`vpmaddwd`, or `vpdpwssd`
//! with AVX-512 VNNI, which also adds): 16 or 32 codes per instruction, where the float
//! kernel spent about a cycle on each code.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::storage::checkpoint::DType;
use std::ops::Range;

use super::matmul::dot;
use crate::storage::quant::decode_floats;

/// The integer kernels a CPU can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntegerKernel {
    Avx2,
    Avx512Vnni,
}

impl IntegerKernel {
    /// The widest kernel this CPU runs, if any.
    pub fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("avx2") && has!("fma") {
                return Some(IntegerKernel::Avx512Vnni);
            }
            if has!("avx2") && has!("fma") {
                return Some(IntegerKernel::Avx2);
            }
        }
        None
    }

    /// Bytes of codes one step reads: one load, widened to 16-bit lanes.
    fn piece(self) -> usize {
        match self {
            IntegerKernel::Avx2 => 16,
            IntegerKernel::Avx512Vnni => 32,
        }
    }
}

/// A one-token input in fixed point, per group of the weights it multiplies.
pub struct FixedPointX {
    kernel: IntegerKernel,
    bits: u32,
    group: usize,
    /// `2^(E - 22)` per group, where every |x| of the group is below `2^E`.
    units: Vec<f32>,
    /// `X = rint(x / unit) = 4096 * hi + lo` with `lo` in `0..4096`, laid out in the order the
    /// codes unpack: within each piece, field `f` of lane `i` holds code `per * i + f`, where
    /// `per` codes share a byte.
    hi: Vec<i16>,
    lo: Vec<i16>,
}

impl FixedPointX {
    /// `None` where the encoding's groups neither fill whole pieces nor pair up into one
    /// (AVX-512's 32-byte pieces take two 16-byte groups), or x has a value that is not
    /// finite (the float kernel then keeps the IEEE semantics). Shorter groups take the
    /// AVX2 kernel.
    pub fn new(x: &[f32], bits: u32, group: usize, kernel: IntegerKernel) -> Option<Self> {
        let group_bytes = group * bits as usize / 8;
        let row_bytes = x.len() * bits as usize / 8;
        let kernel = match kernel {
            IntegerKernel::Avx512Vnni if !(group_bytes.is_multiple_of(32) || group_bytes == 16) => IntegerKernel::Avx2,
            k => k,
        };
        let piece = kernel.piece();
        let pairs = kernel == IntegerKernel::Avx512Vnni && group_bytes == 16;
        let fits = group_bytes.is_multiple_of(piece) || pairs;
        if !matches!(bits, 2 | 4 | 8) || !fits || !x.len().is_multiple_of(group) || !row_bytes.is_multiple_of(piece) {
            return None;
        }
        if !x.iter().all(|v| v.is_finite()) {
            return None;
        }
        let per = 8 / bits as usize;
        let exponents: Vec<i32> = x
            .chunks_exact(group)
            .map(|xs| exponent_above(xs.iter().fold(0f32, |m, v| m.max(v.abs()))))
            .collect();
        let units = exponents.iter().map(|&e| 2f64.powi(e - 22) as f32).collect();
        let to_fixed: Vec<f64> = exponents.iter().map(|&e| 2f64.powi(22 - e)).collect();
        let (mut hi, mut lo) = (vec![0i16; x.len()], vec![0i16; x.len()]);
        // Within a piece (one group or more, or two of 16 bytes), code `per * i + f` goes to
        // field `f`, lane `i`.
        for (p, piece_x) in x.chunks_exact(piece * per).enumerate() {
            let at = p * piece * per;
            for (i, lane) in piece_x.chunks_exact(per).enumerate() {
                let scale = to_fixed[(at + i * per) / group];
                for (f, &v) in lane.iter().enumerate() {
                    // |fixed| <= 2^22: hi fits 12 bits with its sign, lo is the low 12 bits.
                    let fixed = round_to_int(f64::from(v) * scale);
                    hi[at + f * piece + i] = (fixed >> 12) as i16;
                    lo[at + f * piece + i] = (fixed & 4095) as i16;
                }
            }
        }
        Some(FixedPointX {
            kernel,
            bits,
            group,
            units,
            hi,
            lo,
        })
    }

    /// `sum_g(scale_g * (q_g . x_g) + bias_g * sums[g])` over one row of codes, its scales and
    /// biases (`dtype` each), with `sums[g] = sum(x_g)`.
    ///
    /// # Safety
    /// The CPU must run the kernel `self` was made for ([`IntegerKernel::detect`]); `codes`
    /// must hold a row of `units.len()` groups and `scales`, `biases` one value per group.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn row_dot(&self, row: AffineRow, sums: &[f32]) -> f32 {
        // Scales and biases decoded a chunk of groups at a time, outside the kernels: read
        // one by one, with the type's dispatch, they cost as much as the codes' arithmetic.
        const CHUNK: usize = 64;
        let (mut scales, mut biases) = ([0f32; CHUNK], [0f32; CHUNK]);
        let size = row.dtype.size();
        let mut total = 0f32;
        for first in (0..self.units.len()).step_by(CHUNK) {
            let n = CHUNK.min(self.units.len() - first);
            decode_floats(
                &row.scales[first * size..(first + n) * size],
                row.dtype,
                &mut scales[..n],
            );
            // Each group's scale times its unit of x: the factor its integer dot product takes.
            for (s, u) in scales[..n].iter_mut().zip(&self.units[first..first + n]) {
                *s *= u;
            }
            decode_floats(
                &row.biases[first * size..(first + n) * size],
                row.dtype,
                &mut biases[..n],
            );
            let groups = first..first + n;
            // SAFETY: the caller's.
            total += unsafe {
                let pairs = self.group * self.bits as usize / 8 == 16;
                match (self.kernel, self.bits, pairs) {
                    (IntegerKernel::Avx2, 4, _) => self.codes_dot_avx2::<4>(row.codes, groups.clone(), &scales),
                    (IntegerKernel::Avx2, 8, _) => self.codes_dot_avx2::<8>(row.codes, groups.clone(), &scales),
                    (IntegerKernel::Avx2, _, _) => self.codes_dot_avx2::<2>(row.codes, groups.clone(), &scales),
                    (IntegerKernel::Avx512Vnni, 4, true) => {
                        self.pairs_dot_avx512::<4>(row.codes, groups.clone(), &scales)
                    }
                    (IntegerKernel::Avx512Vnni, 8, true) => {
                        self.pairs_dot_avx512::<8>(row.codes, groups.clone(), &scales)
                    }
                    (IntegerKernel::Avx512Vnni, _, true) => {
                        self.pairs_dot_avx512::<2>(row.codes, groups.clone(), &scales)
                    }
                    (IntegerKernel::Avx512Vnni, 4, _) => self.codes_dot_avx512::<4>(row.codes, groups.clone(), &scales),
                    (IntegerKernel::Avx512Vnni, 8, _) => self.codes_dot_avx512::<8>(row.codes, groups.clone(), &scales),
                    (IntegerKernel::Avx512Vnni, _, _) => self.codes_dot_avx512::<2>(row.codes, groups.clone(), &scales),
                }
            };
            total += dot(&biases[..n], &sums[groups]);
        }
        total
    }

    /// `sum_g(factor_g * (q_g . X_g))` over `groups`, with `factors` (scale times unit) from the
    /// first.
    /// Alternate groups go to two accumulators (swapped each time), so that no chain of
    /// dependent additions sets the pace.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn codes_dot_avx2<const BITS: u32>(&self, codes: &[u8], groups: Range<usize>, factors: &[f32]) -> f32 {
        let (mut acc, mut other) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let group_bytes = self.group * BITS as usize / 8;
        for (g, &factor) in groups.zip(factors) {
            let ahead = codes.as_ptr().wrapping_add(g * group_bytes + PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            // SAFETY: the caller's.
            let (hi, lo) = unsafe { self.group_avx2::<BITS>(codes, g) };
            // 4096 hi is exact, so the halves join with one rounding (their sums convert exactly
            // below 2^24, which holds for groups of up to 1024 codes of 4 bits).
            let q = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(4096.0), _mm256_cvtepi32_ps(lo));
            acc = _mm256_fmadd_ps(q, _mm256_set1_ps(factor), acc);
            std::mem::swap(&mut acc, &mut other);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` has room for eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc, other)) };
        lanes.iter().sum::<f32>()
    }

    /// Group `g`'s products with the high and low halves, in eight 32-bit lanes each.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn group_avx2<const BITS: u32>(&self, codes: &[u8], g: usize) -> (__m256i, __m256i) {
        const PIECE: usize = 16;
        let per = 8 / BITS as usize;
        let group_bytes = self.group * BITS as usize / 8;
        debug_assert!(codes.len() >= group_bytes * (g + 1));
        let mask = _mm256_set1_epi16((1i16 << BITS) - 1);
        let (mut sum_hi, mut sum_lo) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for at in (g * group_bytes..(g + 1) * group_bytes).step_by(PIECE) {
            // SAFETY: `at + PIECE` is within the row, and x's halves have `per * PIECE`
            // values for each piece of codes.
            let (v, hi, lo) = unsafe {
                (
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(codes.as_ptr().add(at).cast())),
                    self.hi.as_ptr().add(at * per).cast::<__m256i>(),
                    self.lo.as_ptr().add(at * per).cast::<__m256i>(),
                )
            };
            for f in 0..per {
                let q = match (BITS, f) {
                    (8, _) => v,
                    (4, 0) => _mm256_and_si256(v, mask),
                    (4, _) => _mm256_srli_epi16::<4>(v),
                    (_, 0) => _mm256_and_si256(v, mask),
                    (_, 1) => _mm256_and_si256(_mm256_srli_epi16::<2>(v), mask),
                    (_, 2) => _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
                    _ => _mm256_srli_epi16::<6>(v),
                };
                // SAFETY: as above.
                let (h, l) = unsafe { (_mm256_loadu_si256(hi.add(f)), _mm256_loadu_si256(lo.add(f))) };
                sum_hi = _mm256_add_epi32(sum_hi, _mm256_madd_epi16(q, h));
                sum_lo = _mm256_add_epi32(sum_lo, _mm256_madd_epi16(q, l));
            }
        }
        (sum_hi, sum_lo)
    }

    /// [`Self::codes_dot_avx2`] on 32-byte pieces, with the multiply-add and the sum in one
    /// instruction.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn codes_dot_avx512<const BITS: u32>(&self, codes: &[u8], groups: Range<usize>, factors: &[f32]) -> f32 {
        let (mut acc, mut other) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let group_bytes = self.group * BITS as usize / 8;
        for (g, &factor) in groups.zip(factors) {
            let ahead = codes.as_ptr().wrapping_add(g * group_bytes + PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            // SAFETY: the caller's.
            let (hi, lo) = unsafe { self.group_avx512::<BITS>(codes, g) };
            let q = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(4096.0), _mm512_cvtepi32_ps(lo));
            acc = _mm512_fmadd_ps(q, _mm512_set1_ps(factor), acc);
            std::mem::swap(&mut acc, &mut other);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc, other))
    }

    /// [`Self::codes_dot_avx512`] for groups of 16 bytes: each 32-byte piece holds two groups,
    /// the first in the low eight lanes of the sums, the second in the high eight, so a piece
    /// takes both groups' factors at once. `groups` starts even and has an even length (the
    /// rows hold whole pieces, and the caller's chunks of groups are even).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn pairs_dot_avx512<const BITS: u32>(&self, codes: &[u8], groups: Range<usize>, factors: &[f32]) -> f32 {
        debug_assert!(groups.start.is_multiple_of(2) && groups.len().is_multiple_of(2));
        let (mut acc, mut other) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (g, pair) in groups.step_by(2).zip(factors.chunks_exact(2)) {
            let ahead = codes.as_ptr().wrapping_add(g * 16 + PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            let zero = _mm512_setzero_si512();
            // SAFETY: the caller's: the row holds groups g and g + 1, one piece.
            let (hi, lo) = unsafe { self.piece_avx512::<BITS>(codes, g * 16, (zero, zero)) };
            let q = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(4096.0), _mm512_cvtepi32_ps(lo));
            let factor = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(pair[0]), _mm512_set1_ps(pair[1]));
            acc = _mm512_fmadd_ps(q, factor, acc);
            std::mem::swap(&mut acc, &mut other);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc, other))
    }

    /// `sums` plus the products of the 32-byte piece at byte `at` of the codes with x's high
    /// and low halves, in sixteen lanes each.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn piece_avx512<const BITS: u32>(
        &self,
        codes: &[u8],
        at: usize,
        (mut sum_hi, mut sum_lo): (__m512i, __m512i),
    ) -> (__m512i, __m512i) {
        let per = 8 / BITS as usize;
        debug_assert!(codes.len() >= at + 32);
        let mask = _mm512_set1_epi16((1i16 << BITS) - 1);
        // SAFETY: the caller's: 32 bytes of codes at `at`, and x's halves have `32 * per`
        // values for them.
        let (v, hi, lo) = unsafe {
            (
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(codes.as_ptr().add(at).cast())),
                self.hi.as_ptr().add(at * per),
                self.lo.as_ptr().add(at * per),
            )
        };
        for f in 0..per {
            let q = match (BITS, f) {
                (8, _) => v,
                (4, 0) => _mm512_and_si512(v, mask),
                (4, _) => _mm512_srli_epi16::<4>(v),
                (_, 0) => _mm512_and_si512(v, mask),
                (_, 1) => _mm512_and_si512(_mm512_srli_epi16::<2>(v), mask),
                (_, 2) => _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
                _ => _mm512_srli_epi16::<6>(v),
            };
            // SAFETY: as above.
            let (h, l) = unsafe {
                (
                    _mm512_loadu_si512(hi.add(f * 32).cast()),
                    _mm512_loadu_si512(lo.add(f * 32).cast()),
                )
            };
            sum_hi = _mm512_dpwssd_epi32(sum_hi, q, h);
            sum_lo = _mm512_dpwssd_epi32(sum_lo, q, l);
        }
        (sum_hi, sum_lo)
    }

    /// [`Self::group_avx2`] on 32-byte pieces, in sixteen lanes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn group_avx512<const BITS: u32>(&self, codes: &[u8], g: usize) -> (__m512i, __m512i) {
        let group_bytes = self.group * BITS as usize / 8;
        let mut sums = (_mm512_setzero_si512(), _mm512_setzero_si512());
        if group_bytes == 32 {
            // One piece (4 bits in groups of 64, the common case): without the loop, whose
            // bounds and steps cost as much as the piece.
            // SAFETY: the caller's: the row holds group g.
            return unsafe { self.piece_avx512::<BITS>(codes, g * 32, sums) };
        }
        for at in (g * group_bytes..(g + 1) * group_bytes).step_by(32) {
            // SAFETY: the caller's: the row holds group g.
            sums = unsafe { self.piece_avx512::<BITS>(codes, at, sums) };
        }
        sums
    }
}

/// How far ahead of the group being multiplied its row's codes are asked into L1: a row of
/// 4096 4-bit codes. The hardware's own prefetching left the kernels waiting on their loads
/// (matrices of 65536 x 4096 on the dev VM: 6-8 -> 10-13 GB/s with AVX-512, and a quarter
/// more with AVX2; 1-8 KiB ahead all did about as well).
const PREFETCH_BYTES: usize = 2048;

/// One row of an affine-quantized matrix.
#[derive(Clone, Copy)]
pub struct AffineRow<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [u8],
    pub biases: &'a [u8],
    pub dtype: DType,
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^31`: adding and taking
/// away 1.5 * 2^52 leaves no fraction bits (f64's default rounding does the rest), without
/// the library call `round_ties_even` is on baseline x86-64.
fn round_to_int(v: f64) -> i32 {
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    ((v + MAGIC) - MAGIC) as i32
}

/// The least `e` with `m < 2^e` for finite `m >= 0` (`-126` for zero and subnormals, which
/// are below it too).
fn exponent_above(m: f32) -> i32 {
    let biased = ((m.to_bits() >> 23) & 0xff) as i32;
    biased.max(1) - 126
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponent_bounds_the_group() {
        for m in [0.0f32, 1e-40, 0.3, 0.5, 1.0, 1.5, 2.0, 3.9, 1e30, f32::MAX] {
            let e = exponent_above(m);
            assert!(f64::from(m) < 2f64.powi(e), "{m} vs 2^{e}");
            assert!(
                m == 0.0 || m < 1e-38 || f64::from(m) >= 2f64.powi(e - 1),
                "{m} vs 2^{e}"
            );
        }
    }

    #[test]
    fn rounds_to_the_nearest_even() {
        for (v, r) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (3.2, 3),
            (-3.7, -4),
            (4194304.0, 4194304),
        ] {
            assert_eq!(round_to_int(v), r, "{v}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_represent() {
        let k = IntegerKernel::Avx512Vnni;
        assert!(FixedPointX::new(&[1.0, f32::NAN].repeat(32), 4, 64, k).is_none());
        assert!(FixedPointX::new(&[1.0; 64], 4, 16, k).is_none(), "8-byte groups");
        assert!(FixedPointX::new(&[1.0; 64], 3, 64, k).is_none());
        assert_eq!(FixedPointX::new(&[1.0; 64], 4, 64, k).map(|x| x.kernel), Some(k));
        let pairs = FixedPointX::new(&[1.0; 64], 4, 32, k).map(|x| x.kernel);
        assert_eq!(pairs, Some(k), "16-byte groups, two to a piece");
        assert!(
            FixedPointX::new(&[1.0; 32], 4, 32, k).is_none(),
            "a row shorter than a piece"
        );
        let short = FixedPointX::new(&[1.0; 32], 4, 32, IntegerKernel::Avx2).map(|x| x.kernel);
        assert_eq!(short, Some(IntegerKernel::Avx2));
    }

    /// Reconstructing x from the halves in their unpacked order gives x within half a unit.
    #[test]
    fn the_halves_hold_x() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        for (bits, kernel) in [2, 4, 8]
            .into_iter()
            .flat_map(|b| [(b, IntegerKernel::Avx2), (b, IntegerKernel::Avx512Vnni)])
        {
            // Groups of 64 and, where they are 16 bytes, two to an AVX-512 piece.
            let group = if bits == 8 { 64 } else { 128 / bits as usize };
            let fx = FixedPointX::new(&x, bits, group, kernel).expect("representable");
            let (per, piece) = (8 / bits as usize, fx.kernel.piece());
            assert_eq!(fx.kernel, kernel, "{bits}-bit, groups of {group}");
            for (i, &v) in x.iter().enumerate() {
                let r = i % (piece * per);
                let at = (i - r) + (r % per) * piece + r / per;
                let fixed = 4096 * i32::from(fx.hi[at]) + i32::from(fx.lo[at]);
                let unit = fx.units[i / group];
                assert!((fixed as f32 * unit - v).abs() <= unit / 2.0, "bits {bits}, x[{i}]");
            }
        }
    }
}
