//! Softmax attention over the KV cache, GQA, causal.
//!
//! A few queries (decode) run split over the keys: a block per (query, KV head, chunk of
//! keys) for all the query heads of that KV head, then a launch that merges the chunks; on
//! the tensor cores (`attention_decode`, compute capability 8.0, up to 16 query heads per KV
//! head of 64, 128 or 256) with f32 operands as pairs of tf32, elsewhere in FP32. A
//! prompt runs on the tensor cores (`attention_flash`, compute capability 8.0 and head dims
//! of 32, 64, 128 or 256): the queries, keys and values split into 16-bit limbs, then per KV
//! head blocks of its (query, head) rows walk the keys with an online softmax, so that no
//! scores reach memory and no causal tile past a block's last query is read. Elsewhere a
//! prompt runs as matrix products: per KV head, the scores of its query heads in one
//! strided-batched SGEMM, a masked softmax, and the weighted values in another SGEMM; the
//! scores of a launch stay within ATTENTION_SCORES_FLOATS (long prompts run their queries in
//! blocks).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

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
/// Threads of an `attention_split` block (`SPLIT_THREADS` in kernels/attention.cu).
const SPLIT_THREADS: usize = 256;
/// Columns of the output per `attention_combine` block (`COMBINE_COLUMNS` in kernels/attention.cu).
const COMBINE_COLUMNS: usize = 32;

/// Head dims of the `attention_decode` kernels, the query heads per KV head they take at
/// most, their keys per tile, stages and threads per block (`DT_KEYS`, `DT_STAGES`,
/// `DT_WARPS` in kernels/attention.cu).
const DECODE_DIMS: [usize; 3] = [64, 128, 256];
const DECODE_MAX_GROUP: usize = 16;
const DECODE_KEYS: usize = 32;
const DECODE_STAGES: usize = 3;
const DECODE_THREADS: u32 = 256;

/// Shared memory of an `attention_decode` block: its stages of key rows (padded by 16 floats)
/// and value rows (by 4), then the two halves of a tile's scores (16 heads each, rows of 8
/// more floats than keys).
fn decode_shared_bytes(d: usize) -> usize {
    4 * (DECODE_STAGES * DECODE_KEYS * (2 * d + 20) + 2 * 16 * (DECODE_KEYS + 8))
}

/// Head dims of the `attention_flash` kernels.
const FLASH_DIMS: [usize; 4] = [32, 64, 128, 256];
/// (Query, head) rows per `attention_flash` block, keys per tile, warps per block (`FA_ROWS`,
/// `FA_KEYS`, `FA_WARPS`).
const FLASH_ROWS: usize = 64;
const FLASH_KEYS: usize = 32;
const FLASH_WARPS: u32 = 8;

/// Shared memory of an `attention_flash` block: its rows of query limbs, then two tiles of
/// key and value limbs and the keys' scales. A limb row holds hi and lo (2 bytes each per
/// value) and 16 bytes of padding.
fn flash_shared_bytes(d: usize) -> usize {
    let row = 4 * d + 16;
    FLASH_ROWS * row + 2 * (2 * FLASH_KEYS * row + 4 * FLASH_KEYS)
}

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

/// Blocks of `attention_decode` for head dim `d` one multiprocessor holds at once, by their
/// shared memory and registers (`DT_MIN_BLOCKS` in kernels/attention.cu).
fn decode_resident(d: usize) -> usize {
    match d {
        256.. => 1,
        128.. => 2,
        _ => 3,
    }
}

/// Keys per block of `attention_decode` for head dim `d`: enough blocks to fill the
/// multiprocessors once over the `lanes` (query, KV head) pairs, in whole tiles.
fn decode_chunk(keys: usize, lanes: usize, sms: usize, d: usize) -> usize {
    let per_lane = (decode_resident(d) * sms).div_ceil(lanes.max(1));
    keys.div_ceil(per_lane).next_multiple_of(DECODE_KEYS)
}

/// Query rows per attention launch: as many as keep `heads` rows of scores over `keys` keys
/// within `budget` floats, and at least one.
fn attention_query_rows(heads: usize, keys: usize, budget: usize) -> usize {
    (budget / (heads * keys).max(1)).max(1)
}

/// Rows of `heads` heads of `d` as `attention_limbs` lays them out: per KV head (`heads /
/// group` of them), `rows * group` limb rows.
#[derive(Clone, Copy)]
struct LimbRows {
    rows: usize,
    heads: usize,
    group: usize,
    d: usize,
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
        if let Some(kernel) = self.flash_kernel(shape.head_dim) {
            self.attend_flash(q, keys, values, shape, pos0, kernel, &mut out)?;
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

    /// Of tensor-core kernels for head dims `dims`, the one for `d`, where it is on and this
    /// GPU can run it with `shared` bytes of shared memory.
    fn tensor_core_kernel(&self, dims: &[usize], d: usize, shared: usize) -> Option<usize> {
        let runs = self.flash_attention && self.tensor_cores && shared <= self.k.max_shared;
        dims.iter().position(|&x| x == d).filter(|_| runs)
    }

    /// The `attention_flash` kernel for head dim `d`, where this GPU can run one.
    fn flash_kernel(&self, d: usize) -> Option<usize> {
        self.tensor_core_kernel(&FLASH_DIMS, d, flash_shared_bytes(d))
    }

    /// The `attention_decode` kernel for `group` query heads per KV head of `d`, where this
    /// GPU can run one.
    fn decode_kernel(&self, group: usize, d: usize) -> Option<usize> {
        let kernel = self.tensor_core_kernel(&DECODE_DIMS, d, decode_shared_bytes(d));
        kernel.filter(|_| group <= DECODE_MAX_GROUP)
    }

    /// Prompt attention on the tensor cores: the limbs of the queries (scaled by
    /// log2(e) / sqrt(d), as the kernel's softmax is in powers of two), keys and values, then
    /// a block per 64 (query, head) rows of each KV head.
    #[allow(clippy::too_many_arguments)]
    fn attend_flash(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        shape: AttentionShape,
        pos0: usize,
        kernel: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (heads, kv_heads, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let (group, queries, cap) = (heads / kv_heads, q.rows, pos0 + q.rows);
        // Two 16-bit limbs take a float's room; every part starts 16 bytes aligned.
        let q_limbs = (queries * heads * d).next_multiple_of(4);
        let q_scales = (queries * heads).next_multiple_of(4);
        let kv_limbs = (cap * kv_heads * d).next_multiple_of(4);
        let k_scales = (cap * kv_heads).next_multiple_of(4);
        let extra = std::f32::consts::LOG2_E / (d as f32).sqrt();
        self.with_scratch(q_limbs + q_scales + 2 * kv_limbs + k_scales, |scratch| {
            let (mut ql, mut rest) = scratch.split_at_mut(q_limbs);
            let (mut qs, mut rest) = rest.split_at_mut(q_scales);
            let (mut kl, mut rest) = rest.split_at_mut(kv_limbs);
            let (mut vl, mut ks) = rest.split_at_mut(kv_limbs);
            let q_rows = LimbRows {
                rows: queries,
                heads,
                group,
                d,
            };
            let cache_rows = LimbRows {
                rows: cap,
                heads: kv_heads,
                group: 1,
                d,
            };
            self.split_limbs(&q.buf, q_rows, Some(extra), &mut ql, &mut qs)?;
            self.split_limbs(&keys.buf, cache_rows, Some(1.0), &mut kl, &mut ks)?;
            self.split_limbs(&values.buf, cache_rows, None, &mut vl, &mut ks)?;
            let cfg = LaunchConfig {
                grid_dim: ((queries * group).div_ceil(FLASH_ROWS) as u32, kv_heads as u32, 1),
                block_dim: (32 * FLASH_WARPS, 1, 1),
                shared_mem_bytes: flash_shared_bytes(d) as u32,
            };
            let (n, g, p0, h) = (queries as i32, group as i32, pos0 as i32, heads as i32);
            let (ql, qs, kl, ks, vl) = (ql.as_view(), qs.as_view(), kl.as_view(), ks.as_view(), vl.as_view());
            launch!(
                self,
                &self.k.attention_flash[kernel],
                cfg,
                &ql,
                &qs,
                &kl,
                &ks,
                &vl,
                &n,
                &g,
                &p0,
                &h,
                &mut *out.buf
            )
        })
    }

    /// `attention_limbs`: the rows of `src` as f16 limbs scaled per row, with `extra` over the
    /// scale in `scales`, or (`extra` None) as bf16 limbs, unscaled (`scales` untouched).
    fn split_limbs(
        &self,
        src: &CudaSlice<f32>,
        at: LimbRows,
        extra: Option<f32>,
        limbs: &mut CudaViewMut<'_, f32>,
        scales: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: ((at.rows * at.heads) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, heads, group, d) = (at.rows as i32, at.heads as i32, at.group as i32, at.d as i32);
        let (as_f16, extra) = (extra.is_some() as i32, extra.unwrap_or(1.0));
        launch!(
            self,
            &self.k.attention_limbs,
            cfg,
            src,
            &rows,
            &heads,
            &group,
            &d,
            &as_f16,
            &extra,
            limbs,
            scales
        )
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
        let lanes = q.rows * kv_heads;
        let (kernel, chunk, threads, shared) = match self.decode_kernel(group, d) {
            Some(kernel) => {
                let chunk = decode_chunk(keys_seen, lanes, self.sms, d);
                (
                    &self.k.attention_decode[kernel],
                    chunk,
                    DECODE_THREADS,
                    decode_shared_bytes(d),
                )
            }
            None => {
                let Some(kernel) = SPLIT_GROUPS.iter().position(|&g| group <= g) else {
                    return Err(Error::InvalidInput(format!(
                        "attention: {group} query heads per KV head (the CUDA kernel takes up to 32)"
                    )));
                };
                let chunk = split_chunk(keys_seen, lanes, self.sms);
                let shared = split_shared_bytes(SPLIT_GROUPS[kernel], d, chunk);
                (&self.k.attention_split[kernel], chunk, SPLIT_THREADS as u32, shared)
            }
        };
        if shared > self.k.max_shared {
            return Err(Error::InvalidInput(format!(
                "attention: {group} query heads of {d} per KV head need {shared} bytes of shared memory"
            )));
        }
        let chunks = keys_seen.div_ceil(chunk);
        let split = LaunchConfig {
            grid_dim: ((lanes * chunks) as u32, 1, 1),
            block_dim: (threads, 1, 1),
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
                kernel,
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
    use super::{
        DECODE_DIMS, DECODE_KEYS, FLASH_DIMS, FLASH_KEYS, FLASH_ROWS, attention_query_rows, decode_chunk,
        decode_resident, decode_shared_bytes, flash_shared_bytes, split_chunk,
    };

    /// Dynamic shared memory a block may take on Hopper (bytes).
    const HOPPER_SHARED: usize = 227 * 1024;

    #[test]
    fn flash_attention_blocks_fit_in_shared_memory() {
        // Qwen3.5's heads of 256: 64 query rows and two tiles of 32 key and 32 value rows, each
        // row 1040 bytes (hi and lo of 256 values, 16 of padding), and 32 key scales per tile.
        assert_eq!(flash_shared_bytes(256), 64 * 1040 + 2 * (64 * 1040 + 128));
        for d in FLASH_DIMS {
            assert!(flash_shared_bytes(d) <= HOPPER_SHARED, "head dim {d}");
            // The merge at the end reuses the tiles' room: per lane of the first half's 4
            // warps, the output's d / 2 values, two maxima and two sums.
            let tiles = flash_shared_bytes(d) - FLASH_ROWS * (4 * d + 16);
            assert!((d / 2 + 4) * 128 * 4 <= tiles, "head dim {d}");
        }
        assert_eq!(FLASH_KEYS % 16, 0, "each warp takes 16 keys of a tile");
    }

    #[test]
    fn decode_attention_blocks_fit_as_many_as_the_kernels_expect() {
        // Heads of 256: three stages of 32 key rows of 1088 bytes and 32 value rows of 1040,
        // then twice 16 rows of 40 scores. One block per multiprocessor on Hopper.
        assert_eq!(decode_shared_bytes(256), 3 * 32 * (1088 + 1040) + 2 * 16 * 40 * 4);
        assert_eq!(DECODE_DIMS.map(decode_resident), [3, 2, 1]);
        for d in DECODE_DIMS {
            assert!(
                decode_resident(d) * decode_shared_bytes(d) <= HOPPER_SHARED,
                "head dim {d}"
            );
            assert_eq!(d % 64, 0, "each of 4 warps takes whole 16-column tiles");
        }
        // One token, 2 KV heads of 256, 132 multiprocessors: 66 blocks per KV head wanted,
        // in whole tiles.
        assert_eq!(decode_chunk(32_768, 2, 132, 256), 512);
        assert_eq!(decode_chunk(131_072, 2, 132, 256), 2016);
        assert_eq!(decode_chunk(100, 2, 132, 256), DECODE_KEYS);
        assert_eq!(decode_chunk(32_768, 2, 132, 64), 192);
    }

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
