//! Where each routed expert of a downloaded checkpoint lives: one tensor per expert matrix
//! (HF `experts.E.gate_proj.weight`), or all experts of a layer stacked in one tensor (MLX
//! `switch_mlp`, HF fused `gate_up_proj`). Either way an expert matrix part is a contiguous
//! byte range of a file, so the store reads it with one `pread`, or maps it, without copying.

use std::sync::Arc;

use super::io::SourceFile;
use super::quant::Encoding;
use super::store::{ExpertLocator, MatrixSlots, RecordLayout, Segment, SlotAddr};

/// Where one part (codes, scales or biases) of one expert matrix lives, for every expert.
#[derive(Clone)]
pub enum PartSource {
    /// All experts in one tensor: expert `e` at `base + e * stride + inner`.
    Stacked {
        file: Arc<SourceFile>,
        base: u64,
        stride: u64,
        inner: u64,
    },
    /// One tensor per expert: `(file, offset)` of each.
    PerExpert(Vec<(Arc<SourceFile>, u64)>),
}

impl PartSource {
    fn segment(&self, expert: usize, len: usize) -> Segment {
        match self {
            PartSource::Stacked {
                file,
                base,
                stride,
                inner,
            } => Segment {
                file: Arc::clone(file),
                offset: base + expert as u64 * stride + inner,
                len,
            },
            PartSource::PerExpert(list) => Segment {
                file: Arc::clone(&list[expert].0),
                offset: list[expert].1,
                len,
            },
        }
    }
}

/// One expert matrix of a checkpoint: shape, encoding and the sources of its parts.
pub struct MatrixParts {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub encoding: Encoding,
    pub data: PartSource,
    /// Scales and biases, for affine matrices.
    pub scales: Option<(PartSource, PartSource)>,
}

impl MatrixParts {
    /// Bytes of the codes (or values) and of the scales (and of the biases) per expert.
    fn part_lens(&self) -> (usize, usize) {
        match self.encoding {
            Encoding::Dense(d) => (self.rows * self.cols * d.size(), 0),
            Encoding::Affine {
                bits,
                group_size,
                scale_dtype,
            } => (
                self.rows * self.cols * bits as usize / 8,
                self.rows * (self.cols / group_size) * scale_dtype.size(),
            ),
        }
    }
}

/// The experts of one checkpoint layer, one segment per matrix part.
pub struct CheckpointExperts {
    layout: RecordLayout,
    parts: Vec<PartSource>,
    count: usize,
}

impl CheckpointExperts {
    /// Gate, up and down of `count` experts.
    pub fn new(count: usize, matrices: [MatrixParts; 3]) -> Self {
        let mut segment_lens = Vec::new();
        let mut parts = Vec::new();
        let mut add = |source: &PartSource, len: usize| {
            segment_lens.push(len);
            parts.push(source.clone());
            SlotAddr {
                segment: segment_lens.len() - 1,
                offset: 0,
                len,
            }
        };
        let [gate, up, down] = matrices.map(|m| {
            let (data_len, scale_len) = m.part_lens();
            let data = add(&m.data, data_len);
            let (scales, biases) = match &m.scales {
                Some((s, b)) => (Some(add(s, scale_len)), Some(add(b, scale_len))),
                None => (None, None),
            };
            MatrixSlots {
                name: m.name,
                rows: m.rows,
                cols: m.cols,
                encoding: m.encoding,
                data,
                scales,
                biases,
            }
        });
        CheckpointExperts {
            layout: RecordLayout {
                gate,
                up,
                down,
                segment_lens,
            },
            parts,
            count,
        }
    }
}

impl ExpertLocator for CheckpointExperts {
    fn layout(&self) -> &RecordLayout {
        &self.layout
    }

    fn count(&self) -> usize {
        self.count
    }

    fn segments(&self, expert: usize) -> Vec<Segment> {
        self.parts
            .iter()
            .zip(&self.layout.segment_lens)
            .map(|(p, &len)| p.segment(expert, len))
            .collect()
    }
}
