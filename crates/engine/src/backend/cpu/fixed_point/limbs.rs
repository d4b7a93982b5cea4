//! x as three byte limbs, `X = 2^16 d2 + 2^8 d1 + d0` with `d0`, `d1` X's two low bytes
//! (unsigned) and `d2` the rest (signed: `X >> 16` lies in [-64, 64]), for `vpdpbusd`, which
//! multiplies 64 unsigned bytes by 64 signed ones and adds each four neighbours' products into
//! a 32-bit lane: the codes are the unsigned operand against `d2` and the signed one (they are
//! below 128) against `d0` and `d1`. A lane's sums join exactly as `((S2 << 8) + S1) << 8 + S0`
//! (the shifts applied to the running sum between the limbs), and its total stays below 2^29:
//! 8 four-bit codes of at most 15, or 16 two-bit ones of at most 3, times `|X| <= 2^22`. So a
//! 64-byte block of 4-bit codes takes three unpacking steps, six multiply-adds, two shifts and
//! one conversion to float, where the 16-bit halves took 22 instructions for the same bytes.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::ops::Range;

use super::{AffineRow, PREFETCH_BYTES, fixed};
use crate::storage::checkpoint::DType;

/// Bytes of codes a step reads.
const BLOCK: usize = 64;

pub(super) struct Limbs {
    bits: u32,
    group: usize,
    /// Per block of codes and per field `f` (code `f` of each byte, `per` codes sharing a
    /// byte), the limbs `d0`, `d1`, `d2` of the block's codes in that field, 64 bytes each:
    /// byte `j` of limb `l` of field `f` of block `b`, at `((b * per + f) * 3 + l) * 64 + j`,
    /// belongs to code `(64 b + j) * per + f`.
    limbs: Vec<u8>,
}

impl Limbs {
    /// `to_fixed`: `2^(22 - E)` per group. Rows hold whole blocks and groups are 16 or 32 bytes,
    /// or whole blocks, of 2- or 4-bit codes (the caller's [`super::IntegerKernel::for_encoding`]).
    pub(super) fn new(x: &[f32], bits: u32, group: usize, to_fixed: &[f32]) -> Self {
        let mut limbs = vec![0u8; 3 * x.len()];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512.
            unsafe { split_avx512(x, bits, group, to_fixed, &mut limbs) };
            return Limbs { bits, group, limbs };
        }
        split(x, bits, group, to_fixed, &mut limbs);
        Limbs { bits, group, limbs }
    }

    /// X of value `i`, joined from its limbs.
    #[cfg(test)]
    pub(super) fn value(&self, i: usize) -> i32 {
        let per = 8 / self.bits as usize;
        let (b, r) = (i / (BLOCK * per), i % (BLOCK * per));
        let at = (b * per + r % per) * 3 * BLOCK + r / per;
        let limb = |l: usize| self.limbs[at + l * BLOCK];
        i32::from(limb(0)) + (i32::from(limb(1)) << 8) + (i32::from(limb(2) as i8) << 16)
    }

    /// `sum_g(scale_g * unit_g * (q_g . X_g) + bias_g * sums[g])` over `row`.
    ///
    /// # Safety
    /// The CPU runs AVX-512 VNNI; `row` holds `units.len()` groups.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn row_dot(&self, row: AffineRow, units: &[f32], sums: &[f32]) -> f32 {
        // SAFETY: the caller's.
        unsafe {
            match (self.bits, self.group * self.bits as usize / 8) {
                (4, 16) => self.row_blocks::<4, 4>(row, units, sums),
                (4, 32) => self.row_blocks::<4, 2>(row, units, sums),
                (4, _) => self.row_blocks::<4, 1>(row, units, sums),
                (_, 16) => self.row_blocks::<2, 4>(row, units, sums),
                (_, 32) => self.row_blocks::<2, 2>(row, units, sums),
                (_, _) => self.row_blocks::<2, 1>(row, units, sums),
            }
        }
    }

    /// [`Self::row_dot`] with `GROUPS` groups to a block (1: groups of a block or more). A
    /// chunk of groups at a time, its factors (scale times unit) are decoded sixteen at a time
    /// and its biases' products with the sums of x added into sixteen lanes: done one by one,
    /// outside the kernel, that was most of a short row's time (about 80 ns a row).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn row_blocks<const BITS: u32, const GROUPS: usize>(
        &self,
        row: AffineRow,
        units: &[f32],
        sums: &[f32],
    ) -> f32 {
        const CHUNK: usize = 64;
        let groups = units.len();
        debug_assert!(sums.len() == groups && row.scales.len() == groups * row.dtype.size());
        debug_assert!(row.biases.len() == row.scales.len());
        let mut factors = [0f32; CHUNK];
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut biased = _mm512_setzero_ps();
        for first in (0..groups).step_by(CHUNK) {
            let n = CHUNK.min(groups - first);
            for s in (0..n).step_by(16) {
                let (g, mask) = (first + s, (((1u32 << (n - s).min(16)) - 1) & 0xffff) as u16);
                // SAFETY: the lanes read lie within the row's groups (masked loads do not
                // touch the others), and those written within the chunk.
                unsafe {
                    let scale = masked_floats(row.scales, row.dtype, g, mask);
                    let unit = _mm512_maskz_loadu_ps(mask, units.as_ptr().add(g));
                    _mm512_mask_storeu_ps(factors.as_mut_ptr().add(s), mask, _mm512_mul_ps(scale, unit));
                    let bias = masked_floats(row.biases, row.dtype, g, mask);
                    biased = _mm512_fmadd_ps(bias, _mm512_maskz_loadu_ps(mask, sums.as_ptr().add(g)), biased);
                }
            }
            // SAFETY: the caller's.
            acc = unsafe { self.blocks::<BITS, GROUPS>(row.codes, first..first + n, &factors, acc) };
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), biased))
    }

    /// `acc` plus `factor_g * (q_g . X_g)` over `groups` of a row's `codes`, with `factors`
    /// from the first, in sixteen lanes of two accumulators: alternate blocks go to the two
    /// (swapped each time), so that no chain of dependent additions sets the pace.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn blocks<const BITS: u32, const GROUPS: usize>(
        &self,
        codes: &[u8],
        groups: Range<usize>,
        factors: &[f32],
        [mut acc, mut other]: [__m512; 2],
    ) -> [__m512; 2] {
        let per = 8 / BITS as usize;
        let group_bytes = self.group * BITS as usize / 8;
        let group_shift = group_bytes.trailing_zeros(); // a power of two
        let (start, end) = (groups.start * group_bytes, groups.end * group_bytes);
        debug_assert!(start.is_multiple_of(BLOCK) && end.is_multiple_of(BLOCK) && codes.len() >= end);
        debug_assert!(self.limbs.len() >= 3 * per * end && factors.len() >= groups.len());
        // Lane k (bytes 4k to 4k + 3 of a block) belongs to the block's group k * GROUPS / 16.
        let lane_groups: [i32; 16] = std::array::from_fn(|k| (k * GROUPS / 16) as i32);
        // SAFETY: sixteen lanes.
        let lane_groups = unsafe { _mm512_loadu_si512(lane_groups.as_ptr().cast()) };
        let mask = _mm512_set1_epi8(((1u32 << BITS) - 1) as i8);
        for at in (start..end).step_by(BLOCK) {
            let ahead = codes.as_ptr().wrapping_add(at + PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            // SAFETY: the block lies within the row, and x has a block's limbs for it.
            let (z, x) = unsafe {
                (
                    _mm512_loadu_si512(codes.as_ptr().add(at).cast()),
                    self.limbs.as_ptr().add(3 * per * at),
                )
            };
            let mut q = [_mm512_setzero_si512(); 4];
            for (f, q) in q.iter_mut().enumerate().take(per) {
                let shifted = match (BITS, f) {
                    (_, 0) => z,
                    (2, 1) => _mm512_srli_epi16::<2>(z),
                    (2, 3) => _mm512_srli_epi16::<6>(z),
                    _ => _mm512_srli_epi16::<4>(z),
                };
                *q = _mm512_and_si512(shifted, mask);
            }
            // SAFETY: as above: limb l of field f.
            let limb = |f: usize, l: usize| unsafe { _mm512_loadu_si512(x.add((3 * f + l) * BLOCK).cast()) };
            let mut sum = _mm512_setzero_si512();
            for (f, &q) in q.iter().enumerate().take(per) {
                sum = _mm512_dpbusd_epi32(sum, q, limb(f, 2));
            }
            sum = _mm512_slli_epi32::<8>(sum);
            for (f, &q) in q.iter().enumerate().take(per) {
                sum = _mm512_dpbusd_epi32(sum, limb(f, 1), q);
            }
            sum = _mm512_slli_epi32::<8>(sum);
            for (f, &q) in q.iter().enumerate().take(per) {
                sum = _mm512_dpbusd_epi32(sum, limb(f, 0), q);
            }
            let g = (at - start) >> group_shift;
            // SAFETY: the block's groups lie within the chunk's factors.
            let factor = unsafe {
                match GROUPS {
                    1 => _mm512_set1_ps(*factors.get_unchecked(g)),
                    2 => {
                        let two = _mm_castpd_ps(_mm_load_sd(factors.as_ptr().add(g).cast()));
                        _mm512_permutexvar_ps(lane_groups, _mm512_castps128_ps512(two))
                    }
                    _ => {
                        let four = _mm_loadu_ps(factors.as_ptr().add(g));
                        _mm512_permutexvar_ps(lane_groups, _mm512_castps128_ps512(four))
                    }
                }
            };
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), factor, acc);
            std::mem::swap(&mut acc, &mut other);
        }
        [acc, other]
    }
}

/// Values `g..g + 16` of a float array stored as `dtype`, the lanes outside `mask` zero and
/// not read.
///
/// # Safety
/// The lanes in `mask` lie within `bytes`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn masked_floats(bytes: &[u8], dtype: DType, g: usize, mask: u16) -> __m512 {
    // SAFETY: the caller's; masked lanes are not read.
    unsafe {
        match dtype {
            DType::F32 | DType::U32 => _mm512_maskz_loadu_ps(mask, bytes.as_ptr().cast::<f32>().add(g)),
            DType::BF16 | DType::F16 => {
                let halves = _mm512_maskz_loadu_epi16(u32::from(mask), bytes.as_ptr().cast::<i16>().add(g));
                let halves = _mm512_castsi512_si256(halves);
                if dtype == DType::BF16 {
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
                } else {
                    _mm512_cvtph_ps(halves)
                }
            }
        }
    }
}

/// x's limbs into `limbs`, laid out as [`Limbs::limbs`] describes, one value at a time.
fn split(x: &[f32], bits: u32, group: usize, to_fixed: &[f32], limbs: &mut [u8]) {
    let per = 8 / bits as usize;
    let blocks = x.chunks_exact(BLOCK * per).zip(limbs.chunks_exact_mut(3 * BLOCK * per));
    for (b, (block_x, block)) in blocks.enumerate() {
        for (j, byte_x) in block_x.chunks_exact(per).enumerate() {
            let to_fixed = to_fixed[(b * BLOCK + j) * per / group];
            for (f, &v) in byte_x.iter().enumerate() {
                let fixed = fixed(v, to_fixed);
                let field = &mut block[f * 3 * BLOCK..(f + 1) * 3 * BLOCK];
                field[j] = fixed as u8;
                field[BLOCK + j] = (fixed >> 8) as u8;
                field[2 * BLOCK + j] = (fixed >> 16) as u8;
            }
        }
    }
}

/// [`split`] sixteen bytes of a field at a time: their values (every `per`-th of x) gathered,
/// scaled by their group's factor (sixteen bytes of codes never straddle a group), rounded as
/// [`fixed`] does, and each limb's bytes taken by truncation. A tenth of the scalar loop's time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn split_avx512(x: &[f32], bits: u32, group: usize, to_fixed: &[f32], limbs: &mut [u8]) {
    const MAGIC: f32 = 12_582_912.0;
    let per = 8 / bits as usize;
    debug_assert!(x.len().is_multiple_of(BLOCK * per) && limbs.len() == 3 * x.len());
    let strides: [i32; 16] = std::array::from_fn(|t| (t * per) as i32);
    // SAFETY: sixteen lanes.
    let strides = unsafe { _mm512_loadu_si512(strides.as_ptr().cast()) };
    for (b, block) in limbs.chunks_exact_mut(3 * BLOCK * per).enumerate() {
        for (f, field) in block.chunks_exact_mut(3 * BLOCK).enumerate() {
            for j in (0..BLOCK).step_by(16) {
                let first = (b * BLOCK + j) * per + f;
                // SAFETY: the last value gathered, `first + 15 * per`, lies in this block of x.
                let v = unsafe { _mm512_i32gather_ps::<4>(strides, x.as_ptr().add(first)) };
                let scaled = _mm512_mul_ps(v, _mm512_set1_ps(to_fixed[first / group]));
                let rounded = _mm512_castps_si512(_mm512_add_ps(scaled, _mm512_set1_ps(MAGIC)));
                let fixed = _mm512_sub_epi32(rounded, _mm512_set1_epi32(MAGIC.to_bits() as i32));
                let limbs = [fixed, _mm512_srai_epi32::<8>(fixed), _mm512_srai_epi32::<16>(fixed)];
                for (l, limb) in limbs.into_iter().enumerate() {
                    let out = &mut field[l * BLOCK + j..l * BLOCK + j + 16];
                    // SAFETY: sixteen bytes.
                    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(limb)) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{exponent_above, power_of_two};
    use super::*;

    /// The vector split gives the scalar one's bytes, over groups of many magnitudes.
    #[test]
    fn the_vector_split_matches_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx512f") {
                eprintln!("skipped: this CPU has no AVX-512");
                return;
            }
            let x: Vec<f32> = (0..2048)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.5) * 10f32.powi((i / 128) - 8))
                .collect();
            for (bits, group) in [(2, 64), (4, 32), (4, 64), (4, 256)] {
                let to_fixed: Vec<f32> = x
                    .chunks_exact(group)
                    .map(|g| power_of_two(22 - exponent_above(g.iter().fold(0f32, |m, v| m.max(v.abs())))))
                    .collect();
                let (mut scalar, mut vector) = (vec![0u8; 3 * x.len()], vec![0u8; 3 * x.len()]);
                split(&x, bits, group, &to_fixed, &mut scalar);
                // SAFETY: checked above.
                unsafe { split_avx512(&x, bits, group, &to_fixed, &mut vector) };
                assert!(scalar == vector, "{bits}-bit, groups of {group}");
            }
        }
    }
}
