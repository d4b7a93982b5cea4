//! x as two 16-bit halves, `X = 4096 * hi + lo`, so that every code's product with a half is
//! an exact 16-bit multiply-add (`vpmaddwd`, or `vpdpwssd` with AVX-512 VNNI, which also
//! adds): 16 or 32 codes per instruction. Takes every encoding the byte limbs do not (8-bit
//! codes, short rows) on AVX-512, and all of them on AVX2.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::ops::Range;

use super::super::matmul::dot;
use super::{AffineRow, IntegerKernel, PREFETCH_BYTES, fixed};
use crate::storage::quant::decode_floats;

/// x's halves, laid out in the order the codes unpack: within each piece, field `f` of lane
/// `i` holds code `per * i + f`, where `per` codes share a byte.
pub(super) struct Halves {
    pub(super) kernel: IntegerKernel,
    bits: u32,
    group: usize,
    pub(super) hi: Vec<i16>,
    pub(super) lo: Vec<i16>,
}

impl Halves {
    /// `to_fixed`: `2^(22 - E)` per group. `kernel` is the AVX2 or the 16-bit AVX-512 one,
    /// whose pieces fit the groups and the row.
    pub(super) fn new(x: &[f32], bits: u32, group: usize, to_fixed: &[f32], kernel: IntegerKernel) -> Self {
        let per = 8 / bits as usize;
        let piece = kernel.piece();
        let (mut hi, mut lo) = (vec![0i16; x.len()], vec![0i16; x.len()]);
        // Within a piece (one group or more, or two of 16 bytes), code `per * i + f` goes to
        // field `f`, lane `i`.
        for (p, piece_x) in x.chunks_exact(piece * per).enumerate() {
            let at = p * piece * per;
            for (i, lane) in piece_x.chunks_exact(per).enumerate() {
                let scale = to_fixed[(at + i * per) / group];
                for (f, &v) in lane.iter().enumerate() {
                    // |X| <= 2^22: hi fits 12 bits with its sign, lo is the low 12 bits.
                    let fixed = fixed(v, scale);
                    hi[at + f * piece + i] = (fixed >> 12) as i16;
                    lo[at + f * piece + i] = (fixed & 4095) as i16;
                }
            }
        }
        Halves {
            kernel,
            bits,
            group,
            hi,
            lo,
        }
    }

    /// `sum_g(scale_g * unit_g * (q_g . X_g) + bias_g * sums[g])` over `row`.
    ///
    /// # Safety
    /// The CPU runs `self.kernel`; `row` holds `units.len()` groups.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn row_dot(&self, row: AffineRow, units: &[f32], sums: &[f32]) -> f32 {
        // Scales and biases decoded a chunk of groups at a time, outside the kernels: read
        // one by one, with the type's dispatch, they cost as much as the codes' arithmetic.
        const CHUNK: usize = 64;
        let (mut factors, mut biases) = ([0f32; CHUNK], [0f32; CHUNK]);
        let size = row.dtype.size();
        let mut total = 0f32;
        for first in (0..units.len()).step_by(CHUNK) {
            let n = CHUNK.min(units.len() - first);
            decode_floats(
                &row.scales[first * size..(first + n) * size],
                row.dtype,
                &mut factors[..n],
            );
            // Each group's scale times its unit of x: the factor its integer dot product takes.
            for (s, u) in factors[..n].iter_mut().zip(&units[first..first + n]) {
                *s *= u;
            }
            decode_floats(
                &row.biases[first * size..(first + n) * size],
                row.dtype,
                &mut biases[..n],
            );
            let groups = first..first + n;
            // SAFETY: the caller's.
            total += unsafe { self.codes_dot(row.codes, groups.clone(), &factors) };
            total += dot(&biases[..n], &sums[groups]);
        }
        total
    }

    /// `sum_g(factor_g * (q_g . X_g))` over `groups` of a row's `codes`, with `factors` (scale
    /// times unit) from the first.
    ///
    /// # Safety
    /// The CPU runs `self.kernel`; `codes` holds the row's groups.
    #[cfg(target_arch = "x86_64")]
    unsafe fn codes_dot(&self, codes: &[u8], groups: Range<usize>, factors: &[f32]) -> f32 {
        let pairs = self.group * self.bits as usize / 8 == 16;
        // SAFETY: the caller's.
        unsafe {
            match (self.kernel, self.bits, pairs) {
                (IntegerKernel::Avx2, 4, _) => self.codes_dot_avx2::<4>(codes, groups, factors),
                (IntegerKernel::Avx2, 8, _) => self.codes_dot_avx2::<8>(codes, groups, factors),
                (IntegerKernel::Avx2, _, _) => self.codes_dot_avx2::<2>(codes, groups, factors),
                (_, 4, true) => self.pairs_dot_avx512::<4>(codes, groups, factors),
                (_, 8, true) => self.pairs_dot_avx512::<8>(codes, groups, factors),
                (_, _, true) => self.pairs_dot_avx512::<2>(codes, groups, factors),
                (_, 4, _) => self.codes_dot_avx512::<4>(codes, groups, factors),
                (_, 8, _) => self.codes_dot_avx512::<8>(codes, groups, factors),
                (_, _, _) => self.codes_dot_avx512::<2>(codes, groups, factors),
            }
        }
    }

    /// [`Self::codes_dot`] on 16-byte pieces. Alternate groups go to two accumulators (swapped each time), so that no chain of
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
