//! Softmax attention over the KV cache, GQA, causal.
//!
//! A few queries (decode) run split over the keys: a block per (query, KV head, chunk of
//! keys) for all the query heads of that KV head, then a launch that merges the chunks. A
//! prompt runs as matrix products: per KV head, the scores of its query heads in one
//! strided-batched SGEMM, a masked softmax, and the weighted values in another SGEMM; the
//! scores of a launch stay within ATTENTION_SCORES_FLOATS (long prompts run their queries in
//! blocks). The kernels they replace took a block per (query, head), which read every key
//! and value again for each query head (16 times for Qwen3.5) from only `heads` blocks per
//! token, and 17 TB of cache reads for a 23k-token prompt.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::kernels::MAX_DYNAMIC_SHARED;
use super::{CudaBackend, CudaTensor, THREADS, blocks, cuda};
use crate::backend::{AttentionShape, HeadPrep};
use crate::error::{Error, Result};

/// The attention scores one launch may hold (floats): 256 MiB, rather than a size that grows
/// with the square of the prompt.
const ATTENTION_SCORES_FLOATS: usize = 64 << 20;

/// Queries from which attention runs as matrix products.
const GEMM_MIN_QUERIES: usize = 16;

/// Query heads per KV head of each `attention_split` kernel (the group is padded up to one).
const SPLIT_GROUPS: [usize; 4] = [4, 8, 16, 32];
/// Threads of an `attention_split` block (`SPLIT_THREADS` in kernels.cu).
const SPLIT_THREADS: usize = 256;
/// Columns of the output per `attention_combine` block (`COMBINE_COLUMNS` in kernels.cu).
const COMBINE_COLUMNS: usize = 32;

/// Shared memory of an `attention_split` block: the queries of `group` (padded) heads of `d`
/// (rounded up to 4), or the values' partial sums (16 per thread), whichever is larger, then
/// `chunk` rows of `group + 4` scores.
fn split_shared_bytes(group: usize, d: usize, chunk: usize) -> usize {
    4 * ((group * d.next_multiple_of(4)).max(16 * SPLIT_THREADS) + chunk * (group + 4))
}

/// Keys per block of the split attention: enough blocks for two per multiprocessor over the
/// `lanes` (query, KV head) pairs, a multiple of 8 between 8 and 256. A short context thus
/// still spreads over several blocks (each warp of a block takes a key at a time).
fn split_chunk(keys: usize, lanes: usize, sms: usize) -> usize {
    let per_lane = (2 * sms).div_ceil(lanes.max(1));
    keys.div_ceil(per_lane).next_multiple_of(8).clamp(8, 256)
}

/// Query rows per attention launch: as many as keep `heads` rows of scores over `keys` keys
/// within `budget` floats, and at least one.
fn attention_query_rows(heads: usize, keys: usize, budget: usize) -> usize {
    (budget / (heads * keys).max(1)).max(1)
}

/// One block of query rows: the queries `q` (rows of `heads * d`), their first position and
/// where their outputs go.
struct QueryBlock<'a> {
    q: CudaView<'a, f32>,
    out: CudaViewMut<'a, f32>,
    rows: usize,
    pos0: usize,
}

impl QueryBlock<'_> {
    /// The keys the block's last query sees: at most this many for any of its queries.
    fn cap(&self) -> usize {
        self.pos0 + self.rows
    }
}

impl CudaBackend {
    /// Room in `dst` (a KV cache) for `extra` more rows: a buffer of twice the size, the rows
    /// so far copied over, when it is full.
    pub(super) fn reserve_rows(&self, dst: &mut CudaTensor, extra: usize) -> Result<()> {
        let needed = (dst.rows + extra) * dst.cols;
        if needed > dst.buf.len() {
            let mut grown = self.alloc((2 * dst.buf.len()).max(needed).max(64 * dst.cols))?;
            if dst.len() > 0 {
                self.stream
                    .memcpy_dtod(&dst.buf.slice(0..dst.len()), &mut grown.slice_mut(0..dst.len()))
                    .map_err(cuda("growing a cache"))?;
            }
            dst.buf = grown;
        }
        Ok(())
    }

    /// [`crate::backend::Backend::attention_inputs`] in one launch: a block per (row, head)
    /// of the queries, the keys and the values.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prepare_attention(
        &self,
        query_gate: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        prep: &HeadPrep<'_, CudaTensor>,
        pos0: usize,
        keys: &mut CudaTensor,
        values: &mut CudaTensor,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
        } = prep.shape;
        let rows = query_gate.rows;
        let kv_width = kv_heads * d;
        let shapes_agree = query_gate.cols == 2 * heads * d
            && [k, v].iter().all(|t| t.rows == rows && t.cols == kv_width)
            && [&*keys, &*values].iter().all(|t| t.cols == kv_width)
            && keys.rows == values.rows
            && prep.q_norm.len() == d
            && prep.k_norm.len() == d
            && prep.rotary_dim <= d
            && prep.rotary_dim.is_multiple_of(2);
        if !shapes_agree {
            return Err(Error::InvalidInput(format!(
                "attention inputs: {heads} query and {kv_heads} KV heads of {d} (rotary {}) do not match \
                 the projections, norms or caches",
                prep.rotary_dim
            )));
        }
        self.reserve_rows(keys, rows)?;
        self.reserve_rows(values, rows)?;
        let q = self.tensor(rows, heads * d)?;
        let gate = self.tensor(rows, heads * d)?;
        let cfg = LaunchConfig {
            grid_dim: ((rows * (heads + 2 * kv_heads)) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (4 * d) as u32,
        };
        let (h, kvh, di, rot) = (heads as i32, kv_heads as i32, d as i32, prep.rotary_dim as i32);
        let (theta, p0, at) = (prep.rope_theta as f32, pos0 as i32, keys.rows as i64);
        launch!(
            self,
            &self.k.attention_inputs,
            cfg,
            &*query_gate.buf,
            &*k.buf,
            &*v.buf,
            &*prep.q_norm.buf,
            &*prep.k_norm.buf,
            &prep.eps,
            &h,
            &kvh,
            &di,
            &rot,
            &theta,
            &p0,
            &at,
            &*q.buf,
            &*gate.buf,
            &mut *keys.buf,
            &mut *values.buf
        )?;
        keys.rows += rows;
        values.rows += rows;
        Ok((q, gate))
    }

    /// [`crate::backend::Backend::attention`].
    pub(super) fn attend(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        shape: AttentionShape,
        pos0: usize,
    ) -> Result<CudaTensor> {
        crate::backend::check_kv_cache(self, q, keys, values, pos0)?;
        if shape.num_kv_heads == 0 || !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
            return Err(Error::InvalidInput(format!(
                "attention: {} query heads over {} KV heads",
                shape.num_heads, shape.num_kv_heads
            )));
        }
        let mut out = self.tensor(q.rows, shape.num_heads * shape.head_dim)?;
        if q.rows < GEMM_MIN_QUERIES {
            self.attend_split(q, keys, values, shape, pos0, &mut out)?;
            return Ok(out);
        }
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
            };
            self.with_scratch(rows * shape.num_heads * block.cap(), |scores| {
                self.attend_products(block, keys, values, shape, scores)
            })?;
        }
        Ok(out)
    }

    fn attend_split(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        shape: AttentionShape,
        pos0: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (heads, kv_heads, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let group = heads / kv_heads;
        let keys_seen = pos0 + q.rows;
        let chunk = split_chunk(keys_seen, q.rows * kv_heads, self.sms);
        let chunks = keys_seen.div_ceil(chunk);
        let Some(kernel) = SPLIT_GROUPS.iter().position(|&g| group <= g) else {
            return Err(Error::InvalidInput(format!(
                "attention: {group} query heads per KV head (the CUDA kernel takes up to 32)"
            )));
        };
        let shared = split_shared_bytes(SPLIT_GROUPS[kernel], d, chunk);
        if shared > MAX_DYNAMIC_SHARED as usize {
            return Err(Error::InvalidInput(format!(
                "attention: {group} query heads of {d} per KV head need {shared} bytes of shared memory"
            )));
        }
        let split = LaunchConfig {
            grid_dim: ((q.rows * kv_heads * chunks) as u32, 1, 1),
            block_dim: (SPLIT_THREADS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let combine = LaunchConfig {
            grid_dim: ((q.rows * heads) as u32, d.div_ceil(COMBINE_COLUMNS) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 4 * chunks as u32,
        };
        let scale = 1.0f32 / (d as f32).sqrt();
        let (h, kvh, di, p0, ch, n) = (
            heads as i32,
            kv_heads as i32,
            d as i32,
            pos0 as i32,
            chunk as i32,
            chunks as i32,
        );
        self.with_scratch(q.rows * heads * chunks * (d + 2), |partial| {
            launch!(
                self,
                &self.k.attention_split[kernel],
                split,
                &*q.buf,
                &*keys.buf,
                &*values.buf,
                &h,
                &kvh,
                &di,
                &p0,
                &ch,
                &n,
                &scale,
                &*partial
            )?;
            launch!(
                self,
                &self.k.attention_combine,
                combine,
                &*partial,
                &di,
                &n,
                &mut *out.buf
            )
        })
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
        let (rows, cap) = (b.rows, b.cap());
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
    use super::{attention_query_rows, split_chunk};

    #[test]
    fn split_attention_fills_the_gpu_with_chunks_of_8_to_256_keys() {
        // One token, 2 KV heads, 132 multiprocessors: 132 blocks per KV head wanted.
        assert_eq!(split_chunk(23_000, 2, 132), 176);
        assert_eq!(split_chunk(100, 2, 132), 8);
        assert_eq!(split_chunk(1 << 20, 2, 132), 256);
    }

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
