//! Softmax attention over the KV cache, GQA, causal.
//!
//! A few queries (decode) run in two kernels that walk the cache per (query, head). A prompt
//! runs as matrix products: per KV head, the scores of its query heads in one strided-batched
//! SGEMM, a masked softmax, and the weighted values in another SGEMM. The per-(query, head)
//! kernels read every key and value again for every query and head (17 TB of cache reads for
//! a 23k-token prompt on Qwen3.5's shapes); the products read each cache tile once per
//! block of queries. Either way the scores of a launch stay within ATTENTION_SCORES_FLOATS:
//! long prompts run their queries in blocks.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use super::{CudaBackend, CudaTensor, THREADS, blocks, cuda};
use crate::backend::AttentionShape;
use crate::error::{Error, Result};

/// The attention scores one launch may hold (floats): 256 MiB, rather than a size that grows
/// with the square of the prompt.
const ATTENTION_SCORES_FLOATS: usize = 64 << 20;

/// Queries from which attention runs as matrix products.
const GEMM_MIN_QUERIES: usize = 16;

/// Query rows per attention launch: as many as keep `heads` rows of scores over `keys` keys
/// within `budget` floats, and at least one.
fn attention_query_rows(heads: usize, keys: usize, budget: usize) -> usize {
    (budget / (heads * keys).max(1)).max(1)
}

/// One block of query rows: the queries `q` (rows of `heads * d`), their first position, how
/// many keys they see at most (`cap`), and where their outputs go.
struct QueryBlock<'a> {
    q: CudaView<'a, f32>,
    out: CudaViewMut<'a, f32>,
    rows: usize,
    pos0: usize,
    cap: usize,
}

impl CudaBackend {
    /// [`crate::backend::Backend::attention`].
    pub(super) fn attend(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        shape: AttentionShape,
        pos0: usize,
    ) -> Result<CudaTensor> {
        if keys.rows < pos0 + q.rows || values.rows != keys.rows {
            return Err(Error::InvalidInput(
                "attention: the KV cache is shorter than the positions".into(),
            ));
        }
        if shape.num_kv_heads == 0 || shape.num_heads % shape.num_kv_heads != 0 {
            return Err(Error::InvalidInput(format!(
                "attention: {} query heads over {} KV heads",
                shape.num_heads, shape.num_kv_heads
            )));
        }
        let mut out = self.tensor(q.rows, shape.num_heads * shape.head_dim)?;
        let width = shape.num_heads * shape.head_dim;
        let rows_per_block = attention_query_rows(shape.num_heads, pos0 + q.rows, ATTENTION_SCORES_FLOATS);
        for first in (0..q.rows).step_by(rows_per_block) {
            let rows = rows_per_block.min(q.rows - first);
            // Query rows first.. attend to the keys up to their own positions.
            let block = QueryBlock {
                q: q.buf.slice(first * width..(first + rows) * width),
                out: out.buf.slice_mut(first * width..(first + rows) * width),
                rows,
                pos0: pos0 + first,
                cap: pos0 + first + rows,
            };
            self.with_scratch(rows * shape.num_heads * block.cap, |scores| {
                if q.rows >= GEMM_MIN_QUERIES {
                    self.attend_products(block, keys, values, shape, scores)
                } else {
                    self.attend_per_query(block, keys, values, shape, scores)
                }
            })?;
        }
        Ok(out)
    }

    fn attend_per_query(
        &self,
        mut b: QueryBlock<'_>,
        keys: &CudaTensor,
        values: &CudaTensor,
        shape: AttentionShape,
        scores: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (heads, kv_heads, d) = (shape.num_heads as i32, shape.num_kv_heads as i32, shape.head_dim as i32);
        let scale = 1.0f32 / (shape.head_dim as f32).sqrt();
        let (p0, cap) = (b.pos0 as i32, b.cap as i32);
        let grid = blocks(b.rows * shape.num_heads, THREADS);
        launch!(
            self,
            &self.k.attention_scores,
            grid,
            &b.q,
            &*keys.buf,
            &heads,
            &kv_heads,
            &d,
            &p0,
            &cap,
            &scale,
            &*scores
        )?;
        launch!(
            self,
            &self.k.attention_values,
            grid,
            &*scores,
            &*values.buf,
            &heads,
            &kv_heads,
            &d,
            &p0,
            &cap,
            &mut b.out
        )
    }

    /// Scores of head h in `scores[h]` (`rows x cap`, row-major), as cuBLAS's column-major
    /// `cap x rows`: per KV head, `S_h = K Q_hᵀ` over its query heads (batched, K shared),
    /// then the masked softmax, then `O_hᵀ = Vᵀ P_hᵀ`.
    fn attend_products(
        &self,
        mut b: QueryBlock<'_>,
        keys: &CudaTensor,
        values: &CudaTensor,
        shape: AttentionShape,
        scores: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (heads, kv_heads, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let group = heads / kv_heads;
        let (rows, cap) = (b.rows, b.cap);
        let per_head = rows * cap;
        let batched = |gemm: GemmConfig<f32>, stride_a: usize, stride_b: usize, stride_c: usize| StridedBatchedConfig {
            gemm,
            batch_size: group as i32,
            stride_a: stride_a as i64,
            stride_b: stride_b as i64,
            stride_c: stride_c as i64,
        };
        for kv in 0..kv_heads {
            let h0 = kv * group;
            let cfg = batched(
                GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: cap as i32,
                    n: rows as i32,
                    k: d as i32,
                    alpha: 1.0 / (d as f32).sqrt(),
                    lda: (kv_heads * d) as i32,
                    ldb: (heads * d) as i32,
                    beta: 0.0,
                    ldc: cap as i32,
                },
                0,
                d,
                per_head,
            );
            let k_view = keys.buf.slice(kv * d..cap * kv_heads * d);
            let q_view = b.q.slice(h0 * d..);
            let mut s_view = scores.slice_mut(h0 * per_head..(h0 + group) * per_head);
            // SAFETY: A is the cap keys of KV head kv (row stride kv_heads * d), B the rows
            // queries of head h0 + i at i * d (row stride heads * d), C the group's scores.
            unsafe { self.blas.gemm_strided_batched(cfg, &k_view, &q_view, &mut s_view) }
                .map_err(cuda("cuBLAS attention scores"))?;
        }
        let (r, p0, c) = (rows as i32, b.pos0 as i32, cap as i32);
        launch!(
            self,
            &self.k.attention_softmax,
            blocks(heads * rows, THREADS),
            &*scores,
            &r,
            &p0,
            &c
        )?;
        for kv in 0..kv_heads {
            let h0 = kv * group;
            let cfg = batched(
                GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_N,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: d as i32,
                    n: rows as i32,
                    k: cap as i32,
                    alpha: 1.0,
                    lda: (kv_heads * d) as i32,
                    ldb: cap as i32,
                    beta: 0.0,
                    ldc: (heads * d) as i32,
                },
                0,
                per_head,
                d,
            );
            let v_view = values.buf.slice(kv * d..cap * kv_heads * d);
            let p_view = scores.slice(h0 * per_head..(h0 + group) * per_head);
            let mut o_view = b.out.slice_mut(h0 * d..);
            // SAFETY: A is the cap values of KV head kv, B the group's weights, C the rows
            // outputs of head h0 + i at i * d (row stride heads * d).
            unsafe { self.blas.gemm_strided_batched(cfg, &v_view, &p_view, &mut o_view) }
                .map_err(cuda("cuBLAS attention values"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::attention_query_rows;

    #[test]
    fn attention_runs_long_prompts_in_query_blocks_within_the_budget() {
        // 32 heads over 8192 keys: 256 rows of scores per 64 Mi floats.
        assert_eq!(attention_query_rows(32, 8192, 64 << 20), 256);
        // A short prompt fits in one launch.
        assert!(attention_query_rows(32, 512, 64 << 20) >= 512);
        // At least one row, however long the cache.
        assert_eq!(attention_query_rows(64, 1 << 30, 64 << 20), 1);
    }
}
