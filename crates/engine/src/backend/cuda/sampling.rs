//! The next token's choice where the logits are: greedy decoding's argmax, and a temperature
//! draw's candidates (each block's top k, or the logits near the largest), so that a few
//! bytes come back per token instead of the vocabulary's logits.

use cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaTensor, THREADS, cuda, grid_for};
use crate::backend::cuda::pool::PooledBuf;
use crate::backend::{LogitPenalty, keep_top_k};
use crate::error::{Error, Result};

/// Candidates a draw without top-k brings back at most (32 KiB); with more, the sampler
/// downloads the row.
const MAX_CANDIDATES: usize = 4096;

/// The largest top-k taken from each block's sorted logits (`top_keys`: blocks of 1024).
const MAX_TOP_K: usize = 64;
const TOP_BLOCK: usize = 1024;

impl CudaBackend {
    /// [`crate::backend::argmax`] of the last row of `logits`.
    pub(super) fn argmax_of_last_row(&self, logits: &CudaTensor) -> Result<u32> {
        let key = self.argmax_key(&last_row(logits)?)?;
        let halves = self.download_floats(&key, 2)?;
        let key = u64::from(halves[0].to_bits()) | u64::from(halves[1].to_bits()) << 32;
        // The low half is the index's complement; no key at all (every logit NaN) is index 0,
        // as on the host.
        Ok(if key == 0 { 0 } else { !(key as u32) })
    }

    /// The last row of `logits` with the sampler's `penalties` applied, in a new tensor.
    pub(super) fn penalized_copy_of_last_row(
        &self,
        logits: &CudaTensor,
        penalties: &[LogitPenalty],
    ) -> Result<CudaTensor> {
        let row = last_row(logits)?;
        let mut out = self.tensor(1, row.len())?;
        self.stream
            .memcpy_dtod(&row, &mut out.buf.slice_mut(0..row.len()))
            .map_err(cuda("copying the logits"))?;
        if penalties.is_empty() {
            return Ok(out);
        }
        let triples: Vec<u32> = penalties
            .iter()
            .flat_map(|p| [p.token, p.repetition.to_bits(), p.minus.to_bits()])
            .collect();
        let dev = self.to_device(&triples)?;
        let (cols, n) = (row.len() as i64, penalties.len() as i32);
        launch!(
            self,
            &self.k.penalize_logits,
            grid_for(penalties.len()),
            &mut *out.buf,
            &cols,
            &dev,
            &n
        )?;
        Ok(out)
    }

    /// [`crate::backend::Backend::draw_candidates`] of the last row of `logits`.
    pub(super) fn draw_candidates_of_last_row(
        &self,
        logits: &CudaTensor,
        span: f32,
        top_k: usize,
    ) -> Result<Option<Vec<(u32, f32)>>> {
        let row = last_row(logits)?;
        if (1..=MAX_TOP_K).contains(&top_k) {
            return self.top_candidates(&row, span, top_k).map(Some);
        }
        self.candidates_near_max(&row, span)
    }

    /// The `top_k` largest logits of those at least the largest minus `span`: each block's
    /// top k on the device (the global top k is among them), the top k of those here.
    fn top_candidates(&self, row: &CudaView<'_, f32>, span: f32, top_k: usize) -> Result<Vec<(u32, f32)>> {
        let floats = 2 * top_k * row.len().div_ceil(TOP_BLOCK);
        let mut found = self.tensor(1, floats)?;
        {
            // SAFETY: u32 and f32 have the same size; the kernel writes bits as u32.
            let mut out = unsafe { found.buf.transmute_mut::<u32>(floats) }
                .ok_or_else(|| Error::Cuda("top-k buffer layout".into()))?;
            let (n, k) = (row.len() as i64, top_k as i32);
            let cfg = LaunchConfig {
                grid_dim: (row.len().div_ceil(TOP_BLOCK) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, &self.k.top_keys, cfg, row, &n, &k, &mut out)?;
        }
        let host = self.download_floats(&found.buf, floats)?;
        let mut candidates: Vec<(u32, f32)> = host
            .chunks_exact(2)
            .map(|pair| (pair[0].to_bits(), pair[1]))
            .filter(|&(index, _)| index != u32::MAX)
            .collect();
        // The global top k among the blocks'.
        keep_top_k(&mut candidates, top_k);
        let max = candidates.iter().map(|&(_, l)| l).fold(f32::NEG_INFINITY, f32::max);
        candidates.retain(|&(_, l)| l >= max - span);
        Ok(candidates)
    }

    /// The logits at least the largest minus `span` (the kernel appends them in no order);
    /// `None` when there are more than [`MAX_CANDIDATES`], or none (every logit NaN).
    fn candidates_near_max(&self, row: &CudaView<'_, f32>, span: f32) -> Result<Option<Vec<(u32, f32)>>> {
        let key = self.argmax_key(row)?;
        // A count, then (index, logit bits) pairs: two floats each, zeroed (the count).
        let floats = 2 * (MAX_CANDIDATES + 1);
        let mut found = self.alloc(floats)?;
        {
            // SAFETY: two f32 are the size of one u64, and pool buffers are 256-byte aligned.
            let key = unsafe { key.transmute::<u64>(1) }.ok_or_else(|| Error::Cuda("argmax key layout".into()))?;
            // SAFETY: u32 and f32 have the same size; the kernel writes bits as u32.
            let mut out = unsafe { found.transmute_mut::<u32>(floats) }
                .ok_or_else(|| Error::Cuda("candidate buffer layout".into()))?;
            let (n, cap) = (row.len() as i64, MAX_CANDIDATES as i32);
            launch!(
                self,
                &self.k.logits_near_max,
                self.row_grid(row.len()),
                row,
                &n,
                &key,
                &span,
                &cap,
                &mut out
            )?;
        }
        let host = self.download_floats(&found, floats)?;
        let count = host[0].to_bits() as usize;
        if count == 0 || count > MAX_CANDIDATES {
            return Ok(None);
        }
        Ok(Some(
            host[2..2 + 2 * count]
                .chunks_exact(2)
                .map(|pair| (pair[0].to_bits(), pair[1]))
                .collect(),
        ))
    }

    /// The argmax key of `row` (`argmax_f32` in kernels/sampling.cu) in a zeroed buffer of two floats.
    fn argmax_key(&self, row: &CudaView<'_, f32>) -> Result<PooledBuf> {
        let mut key = self.alloc(2)?;
        {
            // SAFETY: two f32 are the size of one u64, and pool buffers are 256-byte aligned.
            let mut key =
                unsafe { key.transmute_mut::<u64>(1) }.ok_or_else(|| Error::Cuda("argmax key layout".into()))?;
            let n = row.len() as i64;
            launch!(self, &self.k.argmax_f32, self.row_grid(row.len()), row, &n, &mut key)?;
        }
        Ok(key)
    }

    /// Blocks for one pass over a row of `n` floats: four per thread, at most two blocks per
    /// multiprocessor.
    fn row_grid(&self, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((n as u32).div_ceil(THREADS * 4).clamp(1, 2 * self.sms as u32), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

fn last_row(t: &CudaTensor) -> Result<CudaView<'_, f32>> {
    let (rows, cols) = (t.rows, t.cols);
    if rows == 0 || cols == 0 {
        return Err(Error::InvalidInput(
            "the next token from an empty tensor of logits".into(),
        ));
    }
    Ok(t.buf.slice((rows - 1) * cols..rows * cols))
}
