//! Gated full attention (Qwen3.5 / Qwen3-Next): `q_proj` emits a query and a gate per head,
//! per-head RMSNorm on q and k, partial rotate-half RoPE, GQA softmax attention over the KV
//! cache, output times `sigmoid(gate)`, then `o_proj`.

use super::config::ModelConfig;
use super::weights::{LayerWeight as W, Weight, WeightSource};
use crate::backend::{AttentionShape, Backend, HeadPrep, norm_project};
use crate::error::Result;

pub struct GatedAttention<B: Backend> {
    q_proj: B::Matrix,
    k_proj: B::Matrix,
    v_proj: B::Matrix,
    o_proj: B::Matrix,
    q_norm: B::Tensor,
    k_norm: B::Tensor,
    shape: AttentionShape,
    rotary_dim: usize,
    rope_theta: f64,
    eps: f32,
}

/// The KV cache of one attention layer: `[positions, kv_heads * head_dim]` each.
pub struct KvCache<B: Backend> {
    pub keys: B::Tensor,
    pub values: B::Tensor,
}

impl<B: Backend> KvCache<B> {
    pub fn snapshot(&self, b: &B) -> Result<Self> {
        Ok(KvCache {
            keys: b.copy(&self.keys)?,
            values: b.copy(&self.values)?,
        })
    }
}

impl<B: Backend> GatedAttention<B> {
    pub fn load(backend: &B, cfg: &ModelConfig, src: &dyn WeightSource, layer: usize) -> Result<Self> {
        let a = &cfg.attention;
        let (h, q_width, kv_width) = (cfg.hidden_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        let matrix = |w, rows, cols| backend.load_matrix(&src.matrix(Weight::Layer(layer, w), rows, cols)?);
        let vector = |w, len| backend.upload(&src.vector(Weight::Layer(layer, w), len)?, 1, len);
        Ok(GatedAttention {
            q_proj: matrix(W::QProj, 2 * q_width, h)?,
            k_proj: matrix(W::KProj, kv_width, h)?,
            v_proj: matrix(W::VProj, kv_width, h)?,
            o_proj: matrix(W::OProj, h, q_width)?,
            q_norm: vector(W::QNorm, a.head_dim)?,
            k_norm: vector(W::KNorm, a.head_dim)?,
            shape: AttentionShape {
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_dim: a.head_dim,
            },
            rotary_dim: a.rotary_dim,
            rope_theta: a.rope_theta,
            eps: cfg.rms_norm_eps,
        })
    }

    pub fn new_cache(backend: &B, cfg: &ModelConfig) -> Result<KvCache<B>> {
        let width = cfg.attention.num_kv_heads * cfg.attention.head_dim;
        Ok(KvCache {
            keys: backend.zeros(0, width)?,
            values: backend.zeros(0, width)?,
        })
    }

    /// Attention for `T` tokens at positions `pos0..pos0 + T` of `residual` normalized with
    /// `norm` (weight, eps), appending them to `cache`; the output is added to `residual`.
    pub fn forward_into(
        &self,
        b: &B,
        norm: (&B::Tensor, f32),
        cache: &mut KvCache<B>,
        pos0: usize,
        residual: &mut B::Tensor,
    ) -> Result<()> {
        let (_, [query_gate, k, v]) = norm_project(b, residual, norm, [&self.q_proj, &self.k_proj, &self.v_proj])?;
        let prep = HeadPrep {
            shape: self.shape,
            q_norm: &self.q_norm,
            k_norm: &self.k_norm,
            eps: self.eps,
            rotary_dim: self.rotary_dim,
            rope_theta: self.rope_theta,
        };
        let (q, gate) = b.attention_inputs(&query_gate, &k, &v, &prep, pos0, &mut cache.keys, &mut cache.values)?;
        let mut out = b.attention(&q, &cache.keys, &cache.values, self.shape, pos0)?;
        b.mul_sigmoid(&mut out, &gate)?;
        b.matmul_add(&out, &self.o_proj, residual)
    }
}
