//! Gated DeltaNet linear attention: input projections, causal depthwise conv + SiLU with a
//! rolling conv state, the gated delta rule with a recurrent state per value head, gated
//! RMSNorm with `silu(z)`, and `out_proj`.

use super::config::{LinearAttentionConfig, ModelConfig};
use super::weights::{LayerWeight as W, Weight, WeightSource};
use crate::backend::{Backend, norm_project};
use crate::error::Result;

pub struct GatedDeltaNet<B: Backend> {
    in_proj_qkv: B::Matrix,
    in_proj_z: B::Matrix,
    in_proj_b: B::Matrix,
    in_proj_a: B::Matrix,
    conv_weight: B::Tensor,
    dt_bias: B::Tensor,
    a_log: B::Tensor,
    norm: B::Tensor,
    out_proj: B::Matrix,
    dims: LinearAttentionConfig,
    eps: f32,
}

/// The recurrent state of one linear-attention layer.
pub struct DeltaState<B: Backend> {
    /// The last `kernel - 1` conv inputs, `[kernel - 1, conv_dim]`.
    pub conv: B::Tensor,
    /// `[value_heads, key_head_dim * value_head_dim]`, f32.
    pub recurrent: B::Tensor,
}

impl<B: Backend> DeltaState<B> {
    pub fn snapshot(&self, b: &B) -> Result<Self> {
        Ok(DeltaState {
            conv: b.copy(&self.conv)?,
            recurrent: b.copy(&self.recurrent)?,
        })
    }
}

impl<B: Backend> GatedDeltaNet<B> {
    pub fn load(backend: &B, cfg: &ModelConfig, src: &dyn WeightSource, layer: usize) -> Result<Self> {
        let d = &cfg.linear;
        let h = cfg.hidden_size;
        let matrix = |w, rows, cols| backend.load_matrix(&src.matrix(Weight::Layer(layer, w), rows, cols)?);
        let vector = |w, len| src.vector(Weight::Layer(layer, w), len);
        let conv = vector(W::Conv1d, d.conv_dim() * d.conv_kernel)?;
        Ok(GatedDeltaNet {
            in_proj_qkv: matrix(W::InProjQkv, d.conv_dim(), h)?,
            in_proj_z: matrix(W::InProjZ, d.value_dim(), h)?,
            in_proj_b: matrix(W::InProjB, d.num_value_heads, h)?,
            in_proj_a: matrix(W::InProjA, d.num_value_heads, h)?,
            conv_weight: backend.upload(&conv, d.conv_dim(), d.conv_kernel)?,
            dt_bias: backend.upload(&vector(W::DtBias, d.num_value_heads)?, 1, d.num_value_heads)?,
            a_log: backend.upload(&vector(W::ALog, d.num_value_heads)?, 1, d.num_value_heads)?,
            norm: backend.upload(&vector(W::GatedNorm, d.value_head_dim)?, 1, d.value_head_dim)?,
            out_proj: matrix(W::OutProj, h, d.value_dim())?,
            dims: d.clone(),
            eps: cfg.rms_norm_eps,
        })
    }

    pub fn new_state(backend: &B, cfg: &ModelConfig) -> Result<DeltaState<B>> {
        let d = &cfg.linear;
        Ok(DeltaState {
            conv: backend.zeros(d.conv_kernel - 1, d.conv_dim())?,
            recurrent: backend.zeros(d.num_value_heads, d.key_head_dim * d.value_head_dim)?,
        })
    }

    /// Adds the layer's output for `residual` normalized with `norm` (weight, eps) to
    /// `residual`, continuing `state`.
    pub fn forward_into(
        &self,
        b: &B,
        norm: (&B::Tensor, f32),
        state: &mut DeltaState<B>,
        residual: &mut B::Tensor,
    ) -> Result<()> {
        let projections = [&self.in_proj_qkv, &self.in_proj_z, &self.in_proj_b, &self.in_proj_a];
        let (_, [mixed, z, beta_logits, a]) = norm_project(b, residual, norm, projections)?;
        let qkv = b.causal_conv1d_silu(&mixed, &self.conv_weight, &mut state.conv)?;
        let core = b.gated_delta_rule(
            &qkv,
            &a,
            &beta_logits,
            &self.a_log,
            &self.dt_bias,
            &mut state.recurrent,
            &self.dims,
        )?;
        let normed = b.gated_rms_norm(&core, &z, &self.norm, self.eps)?;
        b.matmul_add(&normed, &self.out_proj, residual)
    }
}
