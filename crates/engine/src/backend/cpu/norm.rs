//! Normalisations and activations.

use rayon::prelude::*;

use super::CpuTensor;

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// `x * rsqrt(mean(x²) + eps)` over one group.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (mean + eps).sqrt()
}

/// RMSNorm over every `weight.len()`-wide group of each row (whole rows or single heads).
pub fn rms_norm(x: &CpuTensor, weight: &[f32], eps: f32) -> CpuTensor {
    let mut out = x.data.clone();
    out.par_chunks_mut(weight.len()).for_each(|group| {
        let s = inv_rms(group, eps);
        group.iter_mut().zip(weight).for_each(|(v, w)| *v = *v * s * w);
    });
    CpuTensor::new(x.rows, x.cols, out)
}

/// Per-group RMSNorm times `weight`, times `silu(z)` (the output norm of Gated DeltaNet).
pub fn gated_rms_norm(x: &CpuTensor, z: &CpuTensor, weight: &[f32], eps: f32) -> CpuTensor {
    let mut out = x.data.clone();
    let n = weight.len();
    out.par_chunks_mut(n)
        .zip(z.data.par_chunks(n))
        .for_each(|(group, gate)| {
            let s = inv_rms(group, eps);
            for ((v, w), &g) in group.iter_mut().zip(weight).zip(gate) {
                *v = w * (*v * s) * silu(g);
            }
        });
    CpuTensor::new(x.rows, x.cols, out)
}
