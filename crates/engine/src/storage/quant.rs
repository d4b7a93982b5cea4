//! Weight encodings: plain f32/f16/bf16 and MLX-compatible affine quantization
//! (`value = scale * q + bias` per group of `group_size` inputs, codes packed low bits
//! first into a little-endian bit stream along each row).

use super::blob::Blob;
use super::checkpoint::DType;
use crate::error::{Error, Result};

/// Bit widths of affine quantization that mlx writes and the engine reads.
pub const AFFINE_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];

/// How a matrix's values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// One value per element, in a float dtype.
    Dense(DType),
    /// Affine quantization with per-group scales and biases stored as `scale_dtype`.
    Affine {
        bits: u32,
        group_size: usize,
        scale_dtype: DType,
    },
}

impl Encoding {
    /// A short human-readable name, e.g. `bf16` or `q4/g64`.
    pub fn label(&self) -> String {
        match self {
            Encoding::Dense(d) => d.name().to_ascii_lowercase(),
            Encoding::Affine { bits, group_size, .. } => format!("q{bits}/g{group_size}"),
        }
    }
}

/// A 2-D weight `[rows, cols]` (PyTorch `Linear` layout: one row per output) in its
/// stored encoding. Cheap to clone: the bytes are shared.
#[derive(Clone, Debug)]
pub struct MatrixView {
    /// The checkpoint tensor it came from, for error messages.
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub encoding: Encoding,
    pub data: Blob,
    pub scales: Option<Blob>,
    pub biases: Option<Blob>,
}

impl MatrixView {
    /// A dense matrix over `data`, checking its size.
    pub fn dense(name: &str, rows: usize, cols: usize, dtype: DType, data: Blob) -> Result<Self> {
        let m = MatrixView {
            name: name.into(),
            rows,
            cols,
            encoding: Encoding::Dense(dtype),
            data,
            scales: None,
            biases: None,
        };
        m.validate()?;
        Ok(m)
    }

    /// An affine-quantized matrix, checking the sizes of codes, scales and biases.
    #[allow(clippy::too_many_arguments)]
    pub fn affine(
        name: &str,
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: usize,
        scale_dtype: DType,
        data: Blob,
        scales: Blob,
        biases: Blob,
    ) -> Result<Self> {
        let m = MatrixView {
            name: name.into(),
            rows,
            cols,
            encoding: Encoding::Affine {
                bits,
                group_size,
                scale_dtype,
            },
            data,
            scales: Some(scales),
            biases: Some(biases),
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks the sizes of a matrix built field by field.
    pub fn validated(self) -> Result<Self> {
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> Result<()> {
        let bad = |message: String| Error::Quantization {
            name: self.name.clone(),
            message,
        };
        match self.encoding {
            Encoding::Dense(d) => {
                if !matches!(d, DType::F32 | DType::F16 | DType::BF16) {
                    return Err(bad(format!("dense weights must be f32, f16 or bf16, not {}", d.name())));
                }
            }
            Encoding::Affine {
                bits,
                group_size,
                scale_dtype,
            } => {
                if !AFFINE_BITS.contains(&bits) {
                    return Err(bad(format!(
                        "{bits}-bit affine is not supported (supported: 2, 3, 4, 5, 6, 8)"
                    )));
                }
                if group_size == 0
                    || !self.cols.is_multiple_of(group_size)
                    || !(group_size * bits as usize).is_multiple_of(8)
                {
                    return Err(bad(format!(
                        "group size {group_size} does not divide the {} input columns into whole bytes",
                        self.cols
                    )));
                }
                let groups = self.rows * self.groups_per_row() * scale_dtype.size();
                for (what, blob) in [("scales", &self.scales), ("biases", &self.biases)] {
                    let len = blob.as_ref().map_or(0, Blob::len);
                    if len != groups {
                        return Err(bad(format!("{what} hold {len} bytes, expected {groups}")));
                    }
                }
            }
        }
        let expected = self.rows * self.row_bytes();
        if self.data.len() != expected {
            return Err(bad(format!(
                "data holds {} bytes, a [{}, {}] {} matrix needs {expected}",
                self.data.len(),
                self.rows,
                self.cols,
                self.encoding.label()
            )));
        }
        Ok(())
    }

    /// Bytes of one stored row (codes only for quantized matrices).
    pub fn row_bytes(&self) -> usize {
        match self.encoding {
            Encoding::Dense(d) => self.cols * d.size(),
            Encoding::Affine { bits, .. } => self.cols * bits as usize / 8,
        }
    }

    fn groups_per_row(&self) -> usize {
        match self.encoding {
            Encoding::Dense(_) => 0,
            Encoding::Affine { group_size, .. } => self.cols / group_size,
        }
    }

    /// All bytes the matrix occupies: codes, scales and biases.
    pub fn storage_bytes(&self) -> usize {
        self.data.len() + self.scales.as_ref().map_or(0, Blob::len) + self.biases.as_ref().map_or(0, Blob::len)
    }

    /// Decodes row `r` into `out` (length `cols`) as f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.cols);
        let rb = self.row_bytes();
        let row = &self.data.bytes()[r * rb..(r + 1) * rb];
        match self.encoding {
            Encoding::Dense(dtype) => decode_floats(row, dtype, out),
            Encoding::Affine {
                bits,
                group_size,
                scale_dtype,
            } => {
                let groups = self.groups_per_row();
                let gb = groups * scale_dtype.size();
                let scales = &self.scales.as_ref().map_or(&[][..], Blob::bytes)[r * gb..(r + 1) * gb];
                let biases = &self.biases.as_ref().map_or(&[][..], Blob::bytes)[r * gb..(r + 1) * gb];
                let group_bytes = group_size * bits as usize / 8;
                for g in 0..groups {
                    let scale = read_float(scales, scale_dtype, g);
                    let bias = read_float(biases, scale_dtype, g);
                    let codes = &row[g * group_bytes..(g + 1) * group_bytes];
                    let dst = &mut out[g * group_size..(g + 1) * group_size];
                    unpack_codes(codes, bits, dst);
                    for v in dst.iter_mut() {
                        *v = scale * *v + bias;
                    }
                }
            }
        }
    }

    /// A new matrix holding the given rows, in order (used to split fused projections).
    pub fn select_rows(&self, rows: &[usize], name: &str) -> MatrixView {
        let gather = |blob: &Blob, per_row: usize| {
            let bytes = blob.bytes();
            let mut out = Vec::with_capacity(rows.len() * per_row);
            for &r in rows {
                out.extend_from_slice(&bytes[r * per_row..(r + 1) * per_row]);
            }
            Blob::from_vec(out)
        };
        let scale_row = match self.encoding {
            Encoding::Affine { scale_dtype, .. } => self.groups_per_row() * scale_dtype.size(),
            Encoding::Dense(_) => 0,
        };
        MatrixView {
            name: name.into(),
            rows: rows.len(),
            cols: self.cols,
            encoding: self.encoding,
            data: gather(&self.data, self.row_bytes()),
            scales: self.scales.as_ref().map(|b| gather(b, scale_row)),
            biases: self.biases.as_ref().map(|b| gather(b, scale_row)),
        }
    }
}

/// Unpacks `out.len()` codes of `bits` bits from a little-endian bit stream.
fn unpack_codes(codes: &[u8], bits: u32, out: &mut [f32]) {
    match bits {
        8 => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = f32::from(c);
            }
        }
        4 => {
            for (pair, &c) in out.chunks_exact_mut(2).zip(codes) {
                pair[0] = f32::from(c & 0x0f);
                pair[1] = f32::from(c >> 4);
            }
        }
        2 => {
            for (quad, &c) in out.chunks_exact_mut(4).zip(codes) {
                for (i, o) in quad.iter_mut().enumerate() {
                    *o = f32::from((c >> (2 * i)) & 0x03);
                }
            }
        }
        _ => {
            let mask = (1u32 << bits) - 1;
            for (i, o) in out.iter_mut().enumerate() {
                let bit = i * bits as usize;
                let byte = bit / 8;
                let mut window = [0u8; 4];
                let end = (byte + 4).min(codes.len());
                window[..end - byte].copy_from_slice(&codes[byte..end]);
                *o = ((u32::from_le_bytes(window) >> (bit % 8)) & mask) as f32;
            }
        }
    }
}

/// Reads element `i` of a float array stored as `dtype`.
pub fn read_float(bytes: &[u8], dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::F32 | DType::U32 => {
            f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]])
        }
        DType::BF16 => half::bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
        DType::F16 => half::f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
    }
}

/// Decodes a float array stored as `dtype` into `out`.
pub fn decode_floats(bytes: &[u8], dtype: DType, out: &mut [f32]) {
    match dtype {
        DType::F32 | DType::U32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

/// Decodes a whole float array stored as `dtype`.
pub fn floats_to_vec(bytes: &[u8], dtype: DType) -> Vec<f32> {
    let mut out = vec![0.0; bytes.len() / dtype.size()];
    decode_floats(bytes, dtype, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs codes into a little-endian bit stream, the way mlx does.
    fn pack(codes: &[u32], bits: u32) -> Vec<u8> {
        let mut out = vec![0u8; codes.len() * bits as usize / 8];
        for (i, &c) in codes.iter().enumerate() {
            for b in 0..bits as usize {
                let bit = i * bits as usize + b;
                if (c >> b) & 1 == 1 {
                    out[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
        out
    }

    #[test]
    fn unpack_matches_bit_stream_for_every_width() {
        for bits in AFFINE_BITS {
            let codes: Vec<u32> = (0..64u32).map(|i| (i * 7 + 3) % (1 << bits)).collect();
            let packed = pack(&codes, bits);
            let mut out = vec![0.0; 64];
            unpack_codes(&packed, bits, &mut out);
            let expected: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
            assert_eq!(out, expected, "{bits}-bit");
        }
    }

    #[test]
    fn affine_row_applies_scale_and_bias_per_group() {
        let codes: Vec<u32> = (0..128u32).map(|i| i % 16).collect();
        let data = Blob::from_vec(pack(&codes, 4));
        let scales = Blob::from_vec([0.5f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect());
        let biases = Blob::from_vec([1.0f32, -3.0].iter().flat_map(|v| v.to_le_bytes()).collect());
        let m = MatrixView::affine("w", 1, 128, 4, 64, DType::F32, data, scales, biases).unwrap();
        let mut row = vec![0.0; 128];
        m.dequantize_row(0, &mut row);
        assert_eq!(row[5], 0.5 * 5.0 + 1.0);
        assert_eq!(row[64 + 7], 2.0 * 7.0 - 3.0);
    }

    #[test]
    fn wrong_sizes_are_rejected_with_the_tensor_name() {
        let data = Blob::from_vec(vec![0; 10]);
        let err = MatrixView::dense("layer.w", 2, 4, DType::F32, data).unwrap_err();
        assert!(err.to_string().contains("layer.w"), "{err}");
        let data = Blob::from_vec(vec![0; 64]);
        let s = Blob::from_vec(vec![0; 4]);
        let err = MatrixView::affine("q.w", 1, 128, 7, 64, DType::F32, data, s.clone(), s).unwrap_err();
        assert!(err.to_string().contains("7-bit"), "{err}");
    }
}
