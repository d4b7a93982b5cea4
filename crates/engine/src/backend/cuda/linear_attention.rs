//! The Gated DeltaNet steps on the device: the causal depthwise conv with its rolling state,
//! the gated delta rule with its recurrent state, and the gated RMSNorm.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaTensor, blocks, cuda, grid_for};
use crate::error::{Error, Result};
use crate::model::config::LinearAttentionConfig;

/// Prompts at least this long run the conv with a thread per channel and CONV_ROWS rows
/// (`causal_conv1d_silu_rows`) instead of a thread per channel walking every row; at least the
/// conv's kernel size (up to 8), so that the new state comes from x alone.
const CONV_BY_ROWS_MIN_TOKENS: usize = 16;
const CONV_ROWS: u32 = 16;

/// Prompts at least this long run the delta rule in chunks (`gated_delta_chunks`), as on the
/// CPU; fewer tokens, decode among them, scan token by token (`gated_delta_rule`).
const CHUNKED_MIN_TOKENS: usize = 16;

/// Tokens per chunk and value columns per block of `gated_delta_chunks` (DC, DCOLS).
const DELTA_CHUNK: u32 = 32;
const DELTA_CHUNK_COLUMNS: u32 = 32;

/// Dynamic shared memory of `gated_delta_chunks` (the layout of `DeltaChunk`): the block's
/// columns of the state; two buffers of the chunk's keys and one of its queries (rows padded
/// by 4); two of its values and two of its decay and strength inputs; two triangles of pairs
/// (rows padded by 1); three `[chunk, columns]` arrays and five per token.
fn delta_chunks_shared_bytes(dk: usize) -> u32 {
    let (dk, c, cols) = (dk as u32, DELTA_CHUNK, DELTA_CHUNK_COLUMNS);
    4 * (dk * cols + 3 * c * (dk + 4) + 2 * c * cols + 4 * c + 2 * c * (c + 1) + 3 * c * cols + 5 * c)
}

impl CudaBackend {
    /// Causal depthwise conv + SiLU over `x`, moving the rolling `state` on.
    pub(super) fn conv1d_silu(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        state: &mut CudaTensor,
    ) -> Result<CudaTensor> {
        if weight.rows != x.cols || state.cols != x.cols || state.rows + 1 != weight.cols {
            return Err(Error::InvalidInput(
                "causal_conv1d: weight, state and input disagree".into(),
            ));
        }
        if weight.cols > 8 {
            return Err(Error::InvalidInput(format!(
                "causal_conv1d: kernel of {} taps (the CUDA kernel takes up to 8)",
                weight.cols
            )));
        }
        let out = self.tensor(x.rows, x.cols)?;
        let (rows, c, kernel) = (x.rows as i32, x.cols as i32, weight.cols as i32);
        let row_blocks = (x.rows as u32).div_ceil(CONV_ROWS);
        // (A grid's second dimension stops at 65535 blocks: a million rows in one call.)
        if x.rows < CONV_BY_ROWS_MIN_TOKENS || row_blocks > 65535 {
            launch!(
                self,
                &self.k.causal_conv1d_silu,
                grid_for(x.cols),
                &*x.buf,
                &*weight.buf,
                &mut *state.buf,
                &rows,
                &c,
                &kernel,
                &*out.buf
            )?;
            return Ok(out);
        }
        let mut cfg = grid_for(x.cols);
        cfg.grid_dim.1 = row_blocks;
        launch!(
            self,
            &self.k.causal_conv1d_silu_rows,
            cfg,
            &*x.buf,
            &*weight.buf,
            &*state.buf,
            &rows,
            &c,
            &kernel,
            &*out.buf
        )?;
        // The new state: the last kernel - 1 rows of x, contiguous in both.
        let (kept, len) = (state.len(), x.len());
        self.stream
            .memcpy_dtod(&x.buf.slice(len - kept..len), &mut state.buf.slice_mut(0..kept))
            .map_err(cuda("moving the conv state on"))?;
        Ok(out)
    }

    /// The gated delta rule over the conv's output, continuing the recurrent `state`, with
    /// the decay and update inputs `a`, `b`, `a_log` and `dt_bias`.
    pub(super) fn delta_rule(
        &self,
        qkv: &CudaTensor,
        [a, b, a_log, dt_bias]: [&CudaTensor; 4],
        state: &mut CudaTensor,
        dims: &LinearAttentionConfig,
    ) -> Result<CudaTensor> {
        let (nk, nv, dk, dv) = (
            dims.num_key_heads,
            dims.num_value_heads,
            dims.key_head_dim,
            dims.value_head_dim,
        );
        if dk > 256 || qkv.cols != dims.conv_dim() || state.rows != nv || state.cols != dk * dv {
            return Err(Error::InvalidInput(
                "gated_delta_rule: shapes disagree or key head dim > 256".into(),
            ));
        }
        let out = self.tensor(qkv.rows, nv * dv)?;
        // The chunked kernel copies keys, queries and values as float4s, and its block holds a
        // chunk's keys and queries (97 KB at a key head dim of 128).
        let chunked = dk % 4 == 0 && dv % 4 == 0 && delta_chunks_shared_bytes(dk) as usize <= self.k.max_shared;
        let (kernel, cfg) = if qkv.rows >= CHUNKED_MIN_TOKENS && chunked {
            // 256 threads per block of DCOLS value columns.
            let cfg = LaunchConfig {
                grid_dim: (nv as u32, (dv as u32).div_ceil(DELTA_CHUNK_COLUMNS), 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: delta_chunks_shared_bytes(dk),
            };
            (&self.k.gated_delta_chunks, cfg)
        } else {
            // One warp per 16 key rows, one block per 32 value columns (DELTA_ROWS_PER_WARP).
            let cfg = LaunchConfig {
                grid_dim: (nv as u32, (dv as u32).div_ceil(32), 1),
                block_dim: (32 * (dk as u32).div_ceil(16), 1, 1),
                shared_mem_bytes: 0,
            };
            (&self.k.gated_delta_rule, cfg)
        };
        let (rows, nk, nv, dk, dv) = (qkv.rows as i32, nk as i32, nv as i32, dk as i32, dv as i32);
        launch!(
            self,
            kernel,
            cfg,
            &*qkv.buf,
            &*a.buf,
            &*b.buf,
            &*a_log.buf,
            &*dt_bias.buf,
            &mut *state.buf,
            &rows,
            &nk,
            &nv,
            &dk,
            &dv,
            &*out.buf
        )?;
        Ok(out)
    }

    /// RMSNorm of each head's slice of `x`, times `weight` and `silu(z)`.
    pub(super) fn gated_norm(
        &self,
        x: &CudaTensor,
        z: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        Self::check_same("gated_rms_norm", x, z)?;
        let n = weight.len() as i32;
        let out = self.tensor(x.rows, x.cols)?;
        launch!(
            self,
            &self.k.gated_rms_norm,
            blocks(x.len() / weight.len(), 128),
            &*x.buf,
            &*z.buf,
            &*weight.buf,
            &n,
            &eps,
            &*out.buf
        )?;
        Ok(out)
    }
}
