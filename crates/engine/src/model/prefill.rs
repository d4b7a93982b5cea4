//! Prompt prefill, layer by layer: within a window of the prompt, each layer runs its
//! attention (or linear attention) chunk by chunk, which bounds the activations those need,
//! and its MoE block on every token of the window at once, so that each routed expert is
//! fetched once per layer and window instead of once per chunk. A prompt's chunks pick
//! nearly every expert of every layer, so with experts streamed from host RAM or disk the
//! chunk-by-chunk order moved a whole model's experts per chunk.

use super::profile::Phase;
use super::{Logits, Model, ModelState};
use crate::backend::Backend;
use crate::error::{Error, Result};

/// Chunks per window: the MoE block's activations (the window's rows, gathered per expert in
/// bounded groups by the backend) grow with it.
pub const WINDOW_CHUNKS: usize = 8;

impl<B: Backend> Model<B> {
    /// Prompt tokens per attention pass in [`Model::prefill`].
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// Sets the prompt tokens per attention pass of [`Model::prefill`] (at least 1).
    pub fn set_prefill_chunk(&mut self, tokens: usize) -> Result<()> {
        if tokens == 0 {
            return Err(Error::InvalidInput("the prefill chunk must be at least 1 token".into()));
        }
        self.prefill_chunk = tokens;
        Ok(())
    }

    /// Prompt tokens per window of [`Model::prefill`]: the unit a caller can stop between.
    pub fn prefill_window(&self) -> usize {
        self.prefill_chunk.saturating_mul(WINDOW_CHUNKS)
    }

    /// Runs `ids` after what `state` holds and returns the logits of the last token.
    pub fn prefill(&self, ids: &[u32], state: &mut ModelState<B>) -> Result<B::Tensor> {
        let mut logits = None;
        for window in ids.chunks(self.prefill_window()) {
            logits = Some(self.prefill_window_pass(window, state)?);
        }
        logits.ok_or_else(|| Error::InvalidInput("no tokens to run".into()))
    }

    /// One window as one pass whose layers run their mixer per chunk and their FFN on all of
    /// the window's rows.
    fn prefill_window_pass(&self, ids: &[u32], state: &mut ModelState<B>) -> Result<B::Tensor> {
        if ids.len() <= self.prefill_chunk {
            return self.forward(ids, state, Logits::Last);
        }
        let b = &self.backend;
        let pos0 = state.position;
        // Each chunk's first row and its rows of the window, the same for every layer.
        let chunks: Vec<(usize, Vec<usize>)> = (0..ids.len())
            .step_by(self.prefill_chunk)
            .map(|start| (start, (start..(start + self.prefill_chunk).min(ids.len())).collect()))
            .collect();
        let (mut x, mut clock) = self.embed_timed(ids, state)?;
        for (_, layer, layer_state, times, log) in self.layers_with(state) {
            let mut mixed: Option<B::Tensor> = None;
            for (start, rows) in &chunks {
                let mut part = b.gather_rows(&x, rows)?;
                self.mixer_step(layer, layer_state, pos0 + start, times, &mut clock, &mut part)?;
                match &mut mixed {
                    Some(rows) => b.append_rows(rows, &part)?,
                    None => mixed = Some(part),
                }
                clock.charge(times, Phase::Other);
            }
            x = mixed.ok_or_else(|| Error::InvalidInput("no tokens to run".into()))?;
            self.ffn_step(layer, times, &mut clock, log, &mut x)?;
        }
        self.finish_pass(ids.len(), x, state, Logits::Last, clock)
    }
}
