//! Routed experts held in checkpoint tensors: one tensor per expert matrix, or all experts of
//! a layer stacked in one tensor (MLX `switch_mlp`, HF fused `gate_up_proj`). Every expert
//! matrix is a contiguous byte range, so handing one out copies nothing.

use super::blob::Blob;
use super::checkpoint::{DType, TensorEntry};
use super::quant::{Encoding, MatrixView};
use crate::error::{Error, Result};
use crate::model::weights::{ExpertSource, ExpertView};

/// Per-expert matrices stacked along a leading expert dimension.
#[derive(Clone, Debug)]
pub struct StackedMatrix {
    name: String,
    rows: usize,
    cols: usize,
    encoding: Encoding,
    data: Blob,
    /// Bytes from one expert's slab to the next, and this matrix's offset inside a slab.
    data_stride: usize,
    data_offset: usize,
    /// Scales and biases with their per-expert stride (affine only).
    scales: Option<(Blob, Blob, usize)>,
}

impl StackedMatrix {
    pub fn dense(
        name: &str,
        experts: usize,
        rows: usize,
        cols: usize,
        dtype: DType,
        data: Blob,
    ) -> Result<Self> {
        let stride = rows * cols * dtype.size();
        check_len(name, &data, experts * stride)?;
        Ok(StackedMatrix {
            name: name.into(),
            rows,
            cols,
            encoding: Encoding::Dense(dtype),
            data,
            data_stride: stride,
            data_offset: 0,
            scales: None,
        })
    }

    /// HF's fused `gate_up_proj` `[E, 2I, H]`: rows `0..I` of each expert are the gate, `I..2I` the up projection.
    pub fn split_fused(
        name: &str,
        experts: usize,
        inter: usize,
        hidden: usize,
        dtype: DType,
        data: Blob,
    ) -> Result<(Self, Self)> {
        let half = inter * hidden * dtype.size();
        check_len(name, &data, experts * 2 * half)?;
        let part = |offset| StackedMatrix {
            name: name.into(),
            rows: inter,
            cols: hidden,
            encoding: Encoding::Dense(dtype),
            data: data.clone(),
            data_stride: 2 * half,
            data_offset: offset,
            scales: None,
        };
        Ok((part(0), part(half)))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn affine(
        name: &str,
        experts: usize,
        rows: usize,
        cols: usize,
        encoding: Encoding,
        data: &TensorEntry,
        scales: &TensorEntry,
        biases: &TensorEntry,
    ) -> Result<Self> {
        let Encoding::Affine {
            bits,
            group_size,
            scale_dtype,
        } = encoding
        else {
            return Err(Error::Quantization {
                name: name.into(),
                message: "expected an affine encoding".into(),
            });
        };
        let stride = rows * cols * bits as usize / 8;
        let scale_stride = rows * (cols / group_size) * scale_dtype.size();
        check_len(name, &data.data, experts * stride)?;
        check_len(&scales.name, &scales.data, experts * scale_stride)?;
        check_len(&biases.name, &biases.data, experts * scale_stride)?;
        Ok(StackedMatrix {
            name: name.into(),
            rows,
            cols,
            encoding,
            data: data.data.clone(),
            data_stride: stride,
            data_offset: 0,
            scales: Some((scales.data.clone(), biases.data.clone(), scale_stride)),
        })
    }

    /// The matrix of expert `e`.
    pub fn expert(&self, e: usize) -> Result<MatrixView> {
        let name = format!("{}[{e}]", self.name);
        let data_len = match self.encoding {
            Encoding::Dense(d) => self.rows * self.cols * d.size(),
            Encoding::Affine { bits, .. } => self.rows * self.cols * bits as usize / 8,
        };
        let data = self
            .data
            .sub(e * self.data_stride + self.data_offset, data_len);
        match (&self.scales, self.encoding) {
            (
                Some((scales, biases, stride)),
                Encoding::Affine {
                    bits,
                    group_size,
                    scale_dtype,
                },
            ) => MatrixView::affine(
                &name,
                self.rows,
                self.cols,
                bits,
                group_size,
                scale_dtype,
                data,
                scales.sub(e * stride, *stride),
                biases.sub(e * stride, *stride),
            ),
            (_, Encoding::Dense(dtype)) => {
                MatrixView::dense(&name, self.rows, self.cols, dtype, data)
            }
            _ => Err(Error::Quantization {
                name,
                message: "affine matrix without scales".into(),
            }),
        }
    }
}

fn check_len(name: &str, blob: &Blob, expected: usize) -> Result<()> {
    if blob.len() == expected {
        Ok(())
    } else {
        Err(Error::Quantization {
            name: name.into(),
            message: format!(
                "holds {} bytes, the expert stack needs {expected}",
                blob.len()
            ),
        })
    }
}

/// How one layer's experts are stored in the checkpoint.
// One value per layer, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum ExpertLayout {
    PerExpert(Vec<ExpertView>),
    Stacked {
        gate: StackedMatrix,
        up: StackedMatrix,
        down: StackedMatrix,
    },
}

/// Experts read in place from checkpoint tensors (memory-mapped).
pub struct TableExperts {
    layout: ExpertLayout,
    count: usize,
}

impl TableExperts {
    pub fn new(layout: ExpertLayout) -> Self {
        let count = match &layout {
            ExpertLayout::PerExpert(v) => v.len(),
            ExpertLayout::Stacked { gate, .. } => gate.data.len() / gate.data_stride.max(1),
        };
        TableExperts { layout, count }
    }
}

impl ExpertSource for TableExperts {
    fn num_experts(&self) -> usize {
        self.count
    }

    fn expert(&self, index: usize) -> Result<ExpertView> {
        if index >= self.count {
            return Err(Error::InvalidInput(format!(
                "expert {index} of {}",
                self.count
            )));
        }
        match &self.layout {
            ExpertLayout::PerExpert(v) => Ok(v[index].clone()),
            ExpertLayout::Stacked { gate, up, down } => Ok(ExpertView {
                gate: gate.expert(index)?,
                up: up.expert(index)?,
                down: down.expert(index)?,
            }),
        }
    }
}
