//! Affine quantization of f32 rows into the MLX format: per group of `group_size` values a
//! scale and a bias, codes packed low bits first into a little-endian bit stream.
//!
//! The scale and bias follow `mx.quantize` exactly (bit for bit for f32 inputs): the group's
//! extreme of larger magnitude is represented exactly (code 0 or the top code), and an
//! all-equal group gets a zero bias. Scales and biases are then rounded to the stored dtype;
//! the codes are computed from the f32 scale and bias, as mlx does.

use super::checkpoint::DType;

/// The packed codes, scales and biases of a `[rows, cols]` matrix.
pub struct Quantized {
    pub codes: Vec<u8>,
    pub scales: Vec<u8>,
    pub biases: Vec<u8>,
}

/// Quantizes `values` (row-major, `cols` per row) with `bits` per value.
pub fn quantize_affine(values: &[f32], cols: usize, bits: u32, group_size: usize, scale_dtype: DType) -> Quantized {
    debug_assert_eq!(cols % group_size, 0);
    let groups = values.len() / group_size;
    let mut codes = vec![0u8; values.len() * bits as usize / 8];
    let mut scales = Vec::with_capacity(groups * scale_dtype.size());
    let mut biases = Vec::with_capacity(groups * scale_dtype.size());
    let levels = ((1u32 << bits) - 1) as f32;
    let mut bit = 0usize;
    for group in values.chunks_exact(group_size) {
        let (scale, bias) = group_scale_bias(group, levels);
        push_float(&mut scales, scale, scale_dtype);
        push_float(&mut biases, bias, scale_dtype);
        for &v in group {
            let q = ((v - bias) / scale).round_ties_even().clamp(0.0, levels) as u32;
            for b in 0..bits as usize {
                if (q >> b) & 1 == 1 {
                    codes[(bit + b) / 8] |= 1 << ((bit + b) % 8);
                }
            }
            bit += bits as usize;
        }
    }
    Quantized { codes, scales, biases }
}

/// The scale and bias `mx.quantize` picks for one group.
fn group_scale_bias(group: &[f32], levels: f32) -> (f32, f32) {
    let (min, max) = group.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    let min_is_edge = min.abs() > max.abs();
    let mut scale = ((max - min) / levels).max(1e-7);
    if !min_is_edge {
        scale = -scale;
    }
    let edge = if min_is_edge { min } else { max };
    let q0 = (edge / scale).round_ties_even();
    if q0 == 0.0 { (scale, 0.0) } else { (edge / q0, edge) }
}

fn push_float(out: &mut Vec<u8>, v: f32, dtype: DType) {
    match dtype {
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
        DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
        DType::F32 | DType::U32 => out.extend_from_slice(&v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bit-for-bit agreement with `mx.quantize` at every width is tested against the fixture in
    // crates/engine/tests/dequantize.rs; these cover the degenerate groups.

    #[test]
    fn zero_group_has_zero_bias_and_codes() {
        let q = quantize_affine(&[0.0; 64], 64, 4, 64, DType::F32);
        assert_eq!(f32::from_le_bytes(q.biases[..4].try_into().unwrap()), 0.0);
        assert!(q.codes.iter().all(|&c| c == 0));
    }

    #[test]
    fn constant_group_is_reconstructed_exactly() {
        let q = quantize_affine(&[0.5; 64], 64, 4, 64, DType::F32);
        let bias = f32::from_le_bytes(q.biases[..4].try_into().unwrap());
        assert_eq!(bias, 0.5);
        assert!(q.codes.iter().all(|&c| c == 0));
    }
}
