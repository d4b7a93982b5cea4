//! One-token products of 2-, 4- and 8-bit affine weights in integer arithmetic, as the CUDA
//! kernels do them. x becomes 24-bit fixed point per group, the only rounding (at most half
//! a unit of its 24th bit, about f32's own), split so that every code's product with a part
//! of it is an exact integer multiply-add: three byte limbs for `vpdpbusd` (AVX-512 VNNI,
//! 2- and 4-bit codes, [`limbs`]), or two 16-bit halves for `vpdpwssd` and `vpmaddwd`
//! (everything else, [`halves`]). The float kernel spent about a cycle on each code.

mod halves;
mod limbs;

use crate::storage::checkpoint::DType;

use halves::Halves;
use limbs::Limbs;

/// The integer kernels a CPU can run, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntegerKernel {
    /// 16-bit halves, 16-byte pieces of codes (`vpmaddwd`).
    Avx2,
    /// 16-bit halves, 32-byte pieces (`vpdpwssd`).
    Avx512Words,
    /// Byte limbs, 64-byte blocks (`vpdpbusd`).
    Avx512Bytes,
}

impl IntegerKernel {
    /// The widest kernel this CPU runs, if any.
    pub fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("avx2") && has!("fma") {
                return Some(IntegerKernel::Avx512Bytes);
            }
            if has!("avx2") && has!("fma") {
                return Some(IntegerKernel::Avx2);
            }
        }
        None
    }

    /// The widest kernel, up to `self`, whose pieces fit groups of `group_bytes` and rows of
    /// `row_bytes` bytes of `bits`-bit codes. The 16-bit AVX-512 kernel also takes 16-byte
    /// groups, two to a piece; the byte limbs take groups of 16, 32 or a multiple of 64 bytes,
    /// up to four to a block, and 2- or 4-bit codes only (at 8 bits a lane's sum of four
    /// products with 24-bit limbs could overflow 32 bits).
    fn for_encoding(self, bits: u32, group_bytes: usize, row_bytes: usize) -> Option<Self> {
        let bytes =
            matches!(bits, 2 | 4) && group_bytes.is_power_of_two() && group_bytes >= 16 && row_bytes.is_multiple_of(64);
        let words = (group_bytes.is_multiple_of(32) || group_bytes == 16) && row_bytes.is_multiple_of(32);
        let avx2 = group_bytes.is_multiple_of(16) && row_bytes.is_multiple_of(16);
        match self {
            IntegerKernel::Avx512Bytes if bytes => Some(IntegerKernel::Avx512Bytes),
            IntegerKernel::Avx512Bytes | IntegerKernel::Avx512Words if words => Some(IntegerKernel::Avx512Words),
            _ if avx2 => Some(IntegerKernel::Avx2),
            _ => None,
        }
    }

    /// Bytes of codes one step of the 16-bit kernels reads: one load, widened to 16-bit lanes.
    fn piece(self) -> usize {
        match self {
            IntegerKernel::Avx2 => 16,
            IntegerKernel::Avx512Words | IntegerKernel::Avx512Bytes => 32,
        }
    }
}

/// A one-token input in fixed point, per group of the weights it multiplies.
pub struct FixedPointX {
    /// `2^(E - 22)` per group, where every |x| of the group is below `2^E`.
    units: Vec<f32>,
    /// `X = rint(x / unit)`, split for the kernel that takes it.
    parts: Parts,
}

enum Parts {
    Halves(Halves),
    Limbs(Limbs),
}

impl FixedPointX {
    /// `None` where no kernel up to `kernel` takes the encoding (see
    /// [`IntegerKernel::for_encoding`]) or x has a value that is not finite (the float kernel
    /// then keeps the IEEE semantics).
    pub fn new(x: &[f32], bits: u32, group: usize, kernel: IntegerKernel) -> Option<Self> {
        if !matches!(bits, 2 | 4 | 8) || group == 0 || !x.len().is_multiple_of(group) {
            return None;
        }
        let kernel = kernel.for_encoding(bits, group * bits as usize / 8, x.len() * bits as usize / 8)?;
        // |v|'s bits order as |v| does, and every infinity and NaN lies above the finite
        // values: one pass that vectorises finds both the groups' bounds and what cannot be
        // represented.
        let max_bits: Vec<i32> = x
            .chunks_exact(group)
            .map(|xs| xs.iter().fold(0, |m, v| m.max((v.to_bits() & 0x7fff_ffff) as i32)))
            .collect();
        if max_bits.iter().any(|&m| m >= 0x7f80_0000) {
            return None;
        }
        let exponents: Vec<i32> = max_bits
            .iter()
            .map(|&m| exponent_above(f32::from_bits(m as u32)))
            .collect();
        let units = exponents.iter().map(|&e| power_of_two(e - 22)).collect();
        let to_fixed: Vec<f32> = exponents.iter().map(|&e| power_of_two(22 - e)).collect();
        let parts = match kernel {
            IntegerKernel::Avx512Bytes => Parts::Limbs(Limbs::new(x, bits, group, &to_fixed)),
            k => Parts::Halves(Halves::new(x, bits, group, &to_fixed, k)),
        };
        Some(FixedPointX { units, parts })
    }

    /// The kernel that takes this input.
    #[cfg(test)]
    pub fn kernel(&self) -> IntegerKernel {
        match &self.parts {
            Parts::Halves(h) => h.kernel,
            Parts::Limbs(_) => IntegerKernel::Avx512Bytes,
        }
    }

    /// `sum_g(scale_g * (q_g . x_g) + bias_g * sums[g])` over one row of codes, its scales and
    /// biases (`dtype` each), with `sums[g] = sum(x_g)`.
    ///
    /// # Safety
    /// The CPU must run the kernel `self` was made for ([`IntegerKernel::detect`]); `codes`
    /// must hold a row of `units.len()` groups and `scales`, `biases` one value per group.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn row_dot(&self, row: AffineRow, sums: &[f32]) -> f32 {
        // SAFETY: the caller's.
        unsafe {
            match &self.parts {
                Parts::Halves(h) => h.row_dot(row, &self.units, sums),
                Parts::Limbs(l) => l.row_dot(row, &self.units, sums),
            }
        }
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

/// `v` in fixed point at `2^(22 - E)` per unit (`to_fixed`), rounded to the nearest integer
/// (ties to even): `v * to_fixed` is exact (a power of two, below `2^22` in magnitude), and
/// adding 1.5 * 2^23 leaves no fraction bits, so the float's low bits hold the integer.
fn fixed(v: f32, to_fixed: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    (v * to_fixed + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// `2^e` for `e` in -126..=127.
fn power_of_two(e: i32) -> f32 {
    f32::from_bits(((127 + e) as u32) << 23)
}

/// The least `e >= -100` with `m < 2^e` for finite `m >= 0`. The bound keeps `2^(22 - e)` and
/// `2^(e - 22)` normal floats, as the CUDA kernels do: a group whose values are all below
/// `2^-100` needs no precision.
fn exponent_above(m: f32) -> i32 {
    let biased = ((m.to_bits() >> 23) & 0xff) as i32;
    (biased - 126).max(-100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponent_bounds_the_group() {
        for m in [0.0f32, 1e-40, 1e-31, 0.3, 0.5, 1.0, 1.5, 2.0, 3.9, 1e30, f32::MAX] {
            let e = exponent_above(m);
            assert!(f64::from(m) < 2f64.powi(e), "{m} vs 2^{e}");
            assert!(e == -100 || f64::from(m) >= 2f64.powi(e - 1), "{m} vs 2^{e}");
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
            (-4194303.5, -4194304),
        ] {
            assert_eq!(fixed(v, 1.0), r, "{v}");
            assert_eq!(fixed(v / 1024.0, 1024.0), r, "{v} / 1024");
        }
    }

    #[test]
    fn refuses_what_it_cannot_represent() {
        let k = IntegerKernel::Avx512Bytes;
        let kernel = |x: &[f32], bits, group| FixedPointX::new(x, bits, group, k).map(|x| x.kernel());
        assert!(kernel(&[1.0, f32::NAN].repeat(64), 4, 64).is_none());
        assert!(kernel(&[1.0; 64], 4, 16).is_none(), "8-byte groups");
        assert!(kernel(&[1.0; 64], 3, 64).is_none());
        assert_eq!(kernel(&[1.0; 128], 4, 64), Some(k));
        assert_eq!(kernel(&[1.0; 128], 4, 32), Some(k), "16-byte groups, four to a block");
        assert_eq!(kernel(&[1.0; 512], 2, 256), Some(k), "64-byte groups");
        let words = Some(IntegerKernel::Avx512Words);
        assert_eq!(kernel(&[1.0; 64], 4, 64), words, "a row shorter than a block");
        assert_eq!(kernel(&[1.0; 128], 8, 64), words, "8-bit codes");
        assert_eq!(
            kernel(&[1.0; 96], 4, 96),
            Some(IntegerKernel::Avx2),
            "groups of 48 bytes"
        );
        assert_eq!(
            kernel(&[1.0; 32], 4, 32),
            Some(IntegerKernel::Avx2),
            "a row shorter than a piece"
        );
    }

    /// Reconstructing x from the halves in their unpacked order gives x within half a unit.
    #[test]
    fn the_halves_hold_x() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        for (bits, kernel) in [2, 4, 8]
            .into_iter()
            .flat_map(|b| [(b, IntegerKernel::Avx2), (b, IntegerKernel::Avx512Words)])
        {
            // Groups of 64 and, where they are 16 bytes, two to an AVX-512 piece.
            let group = if bits == 8 { 64 } else { 128 / bits as usize };
            let fx = FixedPointX::new(&x, bits, group, kernel).expect("representable");
            let Parts::Halves(h) = &fx.parts else {
                panic!("{bits}-bit: not halves")
            };
            let (per, piece) = (8 / bits as usize, kernel.piece());
            assert_eq!(h.kernel, kernel, "{bits}-bit, groups of {group}");
            for (i, &v) in x.iter().enumerate() {
                let r = i % (piece * per);
                let at = (i - r) + (r % per) * piece + r / per;
                let fixed = 4096 * i32::from(h.hi[at]) + i32::from(h.lo[at]);
                let unit = fx.units[i / group];
                assert!((fixed as f32 * unit - v).abs() <= unit / 2.0, "bits {bits}, x[{i}]");
            }
        }
    }

    /// Reconstructing x from the byte limbs in their unpacked order gives x within half a unit.
    #[test]
    fn the_limbs_hold_x() {
        let x: Vec<f32> = (0..1024).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        for (bits, group) in [(2, 64), (4, 32), (4, 64), (4, 256)] {
            let fx = FixedPointX::new(&x, bits, group, IntegerKernel::Avx512Bytes).expect("representable");
            let Parts::Limbs(l) = &fx.parts else {
                panic!("{bits}-bit, groups of {group}: not limbs")
            };
            for (i, &v) in x.iter().enumerate() {
                let fixed = l.value(i);
                let unit = fx.units[i / group];
                assert!((fixed as f32 * unit - v).abs() <= unit / 2.0, "bits {bits}, x[{i}]");
            }
        }
    }
}
