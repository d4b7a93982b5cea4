//! A layer's routed experts for a batch of tokens (prompt prefill) in a few launches: the
//! rows of every expert gathered at once, each expert's three products on its own rows, one
//! SiLU for all, and one launch that adds each token's weighted expert outputs in expert
//! order. The per-expert path it replaces paid two uploads, a gather, a SiLU and a scatter
//! for every expert.

use cudarc::driver::PushKernelArg;

use super::mma::{MmaTable, tiles_of};
use super::{CudaBackend, CudaExpert, CudaTensor, cuda, grid_for};
use crate::backend::ExpertRows;
use crate::error::{Error, Result};

/// Gathered rows per group of experts: bounds the group's activations (four buffers of this
/// many rows, the widest `hidden` floats: about 270 MB for Qwen3.5-397B).
const ROWS_PER_GROUP: usize = 4096;

/// Where a group's rows go: `rows[p]` is the row of x at position p of the gathered batch
/// (experts one after another, in order); `tokens` are the rows with outputs, ascending, and
/// the outputs of `tokens[u]` are at positions `positions[start[u]..start[u + 1]]` with
/// weights `weights[..]`, in expert order.
#[derive(Debug, PartialEq)]
struct RowsPlan {
    rows: Vec<i32>,
    tokens: Vec<i32>,
    start: Vec<i32>,
    positions: Vec<i32>,
    weights: Vec<f32>,
}

impl RowsPlan {
    fn new<E>(work: &[ExpertRows<'_, E>], tokens: usize) -> Result<Self> {
        let mut per_token: Vec<Vec<(i32, f32)>> = vec![Vec::new(); tokens];
        let mut rows = Vec::new();
        for w in work {
            if w.rows.len() != w.weights.len() {
                return Err(Error::InvalidInput(
                    "experts_ffn_rows: rows and weights differ in length".into(),
                ));
            }
            for (&r, &weight) in w.rows.iter().zip(w.weights) {
                let slot = per_token
                    .get_mut(r)
                    .ok_or_else(|| Error::InvalidInput(format!("experts_ffn_rows: row {r} of {tokens}")))?;
                slot.push((rows.len() as i32, weight));
                rows.push(r as i32);
            }
        }
        let (mut with_outputs, mut start) = (Vec::new(), vec![0]);
        let (mut positions, mut weights) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
        for (t, list) in per_token.into_iter().enumerate().filter(|(_, l)| !l.is_empty()) {
            with_outputs.push(t as i32);
            for (p, w) in list {
                positions.push(p);
                weights.push(w);
            }
            start.push(positions.len() as i32);
        }
        Ok(RowsPlan {
            rows,
            tokens: with_outputs,
            start,
            positions,
            weights,
        })
    }
}

/// `work` split into consecutive groups of at most `budget` rows (at least one expert each).
fn groups<'a, 'b, E>(work: &'b [ExpertRows<'a, E>], budget: usize) -> Vec<&'b [ExpertRows<'a, E>]> {
    let mut out = Vec::new();
    let (mut first, mut rows) = (0, 0);
    for (i, w) in work.iter().enumerate() {
        if i > first && rows + w.rows.len() > budget {
            out.push(&work[first..i]);
            (first, rows) = (i, 0);
        }
        rows += w.rows.len();
    }
    if first < work.len() {
        out.push(&work[first..]);
    }
    out
}

impl CudaBackend {
    /// [`crate::backend::Backend::experts_ffn_rows`].
    pub(super) fn expert_rows(
        &self,
        x: &CudaTensor,
        work: &[ExpertRows<'_, CudaExpert>],
        out: &mut CudaTensor,
    ) -> Result<()> {
        if out.rows != x.rows || out.cols != x.cols {
            return Err(Error::InvalidInput(
                "experts_ffn_rows: x and out differ in shape".into(),
            ));
        }
        for group in groups(work, ROWS_PER_GROUP) {
            self.expert_rows_group(x, group, out)?;
        }
        Ok(())
    }

    fn expert_rows_group(
        &self,
        x: &CudaTensor,
        work: &[ExpertRows<'_, CudaExpert>],
        out: &mut CudaTensor,
    ) -> Result<()> {
        // Waits for this group's copies only: later groups' copies run meanwhile.
        for w in work {
            w.expert.ready()?;
        }
        let Some(first) = work.first() else {
            return Ok(());
        };
        let (hidden, inter) = (x.cols, first.expert.matrices()[0].rows);
        let fits = work.iter().all(|w| {
            let [g, u, d] = w.expert.matrices();
            [g, u].iter().all(|m| m.rows == inter && m.cols == hidden) && d.rows == hidden && d.cols == inter
        });
        if !fits {
            return Err(Error::InvalidInput(
                "experts_ffn_rows: the experts' shapes disagree with each other or with x".into(),
            ));
        }
        let plan = RowsPlan::new(work, x.rows)?;
        let n = plan.rows.len();
        if n == 0 {
            return Ok(());
        }
        // The index tables in one upload: rows, tokens, start, positions.
        let ints = self.to_device(&[&plan.rows[..], &plan.tokens, &plan.start, &plan.positions].concat())?;
        let (rows_at, tokens_at) = (0, plan.rows.len());
        let start_at = tokens_at + plan.tokens.len();
        let positions_at = start_at + plan.start.len();
        let xs = self.gather_device_rows(x, &ints.slice(rows_at..tokens_at))?;
        let cols = hidden as i32;
        let (mut gate, mut up, mut y) = (self.tensor(n, inter)?, self.tensor(n, inter)?, self.tensor(n, hidden)?);
        // The grouped kernel runs a block per tile of 128 rows by 32 tokens: a group too small
        // to give every multiprocessor two of them (with experts streamed in, a group is often
        // one expert) goes through SGEMM, which splits the work finer.
        let tiles = tiles_of(&work.iter().map(|w| w.rows.len()).collect::<Vec<_>>());
        match self.grouped_tables(work, tiles.len() / 4)? {
            Some(tables) => self.grouped_products(tables, &tiles, &xs, [&mut gate, &mut up, &mut y])?,
            None => self.products_per_expert(work, &xs, [&mut gate, &mut up, &mut y])?,
        }
        let tokens = ints.slice(tokens_at..start_at);
        let start = ints.slice(start_at..positions_at);
        let positions = ints.slice(positions_at..);
        let weights = self.to_device(&plan.weights)?;
        let outputs = plan.tokens.len() * hidden;
        let len = outputs as i64;
        launch!(
            self,
            &self.k.combine_rows,
            grid_for(outputs),
            &mut *out.buf,
            &*y.buf,
            &tokens,
            &start,
            &positions,
            &weights,
            &cols,
            &len
        )
    }
}

impl CudaBackend {
    /// The tables of the grouped kernel for gate, up and down when every matrix of every
    /// expert suits it (one encoding) and the launches fill the GPU.
    fn grouped_tables(&self, work: &[ExpertRows<'_, CudaExpert>], tiles: usize) -> Result<Option<[MmaTable; 3]>> {
        let Some(first) = work.first() else {
            return Ok(None);
        };
        let [gate, ..] = first.expert.matrices();
        let Some(kernel) = self.mma_kernel(gate) else {
            return Ok(None);
        };
        let suits = work
            .iter()
            .flat_map(|w| w.expert.matrices())
            .all(|m| m.encoding == gate.encoding && self.mma_kernel(m) == Some(kernel));
        if !suits || !self.mma_fills_gpu(gate.rows, tiles) {
            return Ok(None);
        }
        let table = |k: usize| {
            let matrices: Vec<_> = work.iter().map(|w| w.expert.matrices()[k]).collect();
            self.mma_table(kernel, &matrices)
        };
        Ok(Some([table(0)?, table(1)?, table(2)?]))
    }

    /// gate and up products of every expert on its gathered rows, SiLU, down: the
    /// per-expert way (each matrix decoded to f32, then SGEMM).
    fn products_per_expert(
        &self,
        work: &[ExpertRows<'_, CudaExpert>],
        xs: &CudaTensor,
        [gate, up, y]: [&mut CudaTensor; 3],
    ) -> Result<()> {
        let (hidden, inter) = (xs.cols, gate.cols);
        let mut at = 0;
        for w in work {
            let [g, u, _] = w.expert.matrices();
            let m = w.rows.len();
            let x_rows = xs.buf.slice(at * hidden..(at + m) * hidden);
            self.gemm_into(&x_rows, m, g, &mut gate.buf.slice_mut(at * inter..(at + m) * inter))?;
            self.gemm_into(&x_rows, m, u, &mut up.buf.slice_mut(at * inter..(at + m) * inter))?;
            at += m;
        }
        self.silu_in_place(gate, up)?;
        at = 0;
        for w in work {
            let [_, _, d] = w.expert.matrices();
            let m = w.rows.len();
            let act = gate.buf.slice(at * inter..(at + m) * inter);
            self.gemm_into(&act, m, d, &mut y.buf.slice_mut(at * hidden..(at + m) * hidden))?;
            at += m;
        }
        Ok(())
    }

    /// The same products in four launches on the tensor cores (`grouped_matmul_q`), each
    /// input split into f16 limbs first.
    fn grouped_products(
        &self,
        tables: [MmaTable; 3],
        tiles: &[i32],
        xs: &CudaTensor,
        [gate, up, y]: [&mut CudaTensor; 3],
    ) -> Result<()> {
        let [gate_table, up_table, down_table] = tables;
        let (count, dev_tiles) = (tiles.len() / 4, self.to_device(tiles)?);
        let split = self.split_rows(&xs.buf.slice(..), xs.rows, xs.cols, &gate_table)?;
        let inter = gate.cols;
        self.mma_products(
            &gate_table,
            &dev_tiles,
            count,
            &split,
            inter,
            &mut gate.buf.slice_mut(..),
        )?;
        self.mma_products(&up_table, &dev_tiles, count, &split, inter, &mut up.buf.slice_mut(..))?;
        self.silu_in_place(gate, up)?;
        let split = self.split_rows(&gate.buf.slice(..), gate.rows, inter, &down_table)?;
        self.mma_products(&down_table, &dev_tiles, count, &split, y.cols, &mut y.buf.slice_mut(..))
    }

    /// `gate = silu(gate) * up` (each element reads and writes only its own).
    fn silu_in_place(&self, gate: &mut CudaTensor, up: &CudaTensor) -> Result<()> {
        self.silu_mul_into(&gate.buf, &up.buf, &gate.buf, gate.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows<'a>(rows: &'a [usize], weights: &'a [f32]) -> ExpertRows<'a, ()> {
        ExpertRows {
            expert: &(),
            rows,
            weights,
        }
    }

    #[test]
    fn plan_lists_each_tokens_outputs_in_expert_order() {
        // Expert A on tokens 0 and 2, expert B on tokens 2 and 1; token 3 chose neither.
        let work = [rows(&[0, 2], &[0.5, 0.25]), rows(&[2, 1], &[0.75, 1.0])];
        let plan = RowsPlan::new(&work, 4).unwrap();
        assert_eq!(plan.rows, [0, 2, 2, 1]);
        // Token 0: position 0; token 1: position 3; token 2: positions 1 (A) then 2 (B);
        // token 3 has no outputs to add.
        assert_eq!(plan.tokens, [0, 1, 2]);
        assert_eq!(plan.start, [0, 1, 2, 4]);
        assert_eq!(plan.positions, [0, 3, 1, 2]);
        assert_eq!(plan.weights, [0.5, 1.0, 0.25, 0.75]);
        assert!(RowsPlan::new(&[rows(&[4], &[1.0])], 4).is_err());
    }

    #[test]
    fn groups_stay_within_the_row_budget_and_keep_order() {
        let (a, b, c) = ([0usize; 3], [0usize; 2], [0usize; 5]);
        let w = [0.0f32; 5];
        let work = [rows(&a, &w[..3]), rows(&b, &w[..2]), rows(&c, &w)];
        let sizes: Vec<usize> = groups(&work, 5).iter().map(|g| g.len()).collect();
        assert_eq!(sizes, [2, 1]);
        // An expert larger than the budget still runs, alone.
        let sizes: Vec<usize> = groups(&work, 4).iter().map(|g| g.len()).collect();
        assert_eq!(sizes, [1, 1, 1]);
        assert!(groups::<()>(&[], 4).is_empty());
    }
}
