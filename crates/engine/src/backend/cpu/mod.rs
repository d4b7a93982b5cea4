//! The CPU backend: f32 arithmetic on host memory, parallel over rows and heads with rayon.
//! Weights stay in their stored encoding (memory-mapped where the checkpoint allows) and are
//! decoded row by row as they are used.

mod attention;
mod delta_chunks;
mod fixed_point;
mod gemm;
mod linear_attention;
mod matmul;
mod moe;
mod norm;

use rayon::prelude::*;

use crate::backend::{AttentionShape, Backend, ExpertRows, Route, SharedExpert, expert_output, shared_expert_ffn};
use crate::error::{Error, Result};
use crate::model::config::LinearAttentionConfig;
use crate::model::weights::ExpertView;
use crate::storage::quant::MatrixView;

/// A row-major `[rows, cols]` f32 matrix in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(rows * cols, data.len());
        CpuTensor { rows, cols, data }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Computes on the host CPU with rayon's global thread pool.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

fn same_shape(op: &str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    if (a.rows, a.cols) == (b.rows, b.cols) {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "{op}: shapes [{}, {}] and [{}, {}] differ",
            a.rows, a.cols, b.rows, b.cols
        )))
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Matrix = MatrixView;
    type Expert = ExpertView;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn load_matrix(&self, w: &MatrixView) -> Result<MatrixView> {
        Ok(w.clone())
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        if data.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "upload: {} values for a [{rows}, {cols}] tensor",
                data.len()
            )));
        }
        Ok(CpuTensor::new(rows, cols, data.to_vec()))
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor::new(rows, cols, vec![0.0; rows * cols]))
    }

    fn copy(&self, t: &CpuTensor) -> Result<CpuTensor> {
        Ok(t.clone())
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn append_rows(&self, dst: &mut CpuTensor, src: &CpuTensor) -> Result<()> {
        if dst.cols != src.cols {
            return Err(Error::InvalidInput("append_rows: column counts differ".into()));
        }
        dst.data.extend_from_slice(&src.data);
        dst.rows += src.rows;
        Ok(())
    }

    fn embed(&self, table: &MatrixView, ids: &[u32]) -> Result<CpuTensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(Error::TokenOutOfRange {
                id,
                vocab_size: table.rows,
            });
        }
        Ok(matmul::embed(table, ids))
    }

    fn matmul(&self, x: &CpuTensor, w: &MatrixView) -> Result<CpuTensor> {
        if x.cols != w.cols {
            return Err(Error::InvalidInput(format!(
                "matmul with `{}`: input has {} columns, the matrix {}",
                w.name, x.cols, w.cols
            )));
        }
        Ok(matmul::matmul(x, w))
    }

    fn matmul_many(&self, x: &CpuTensor, ws: &[&MatrixView]) -> Result<Vec<CpuTensor>> {
        if let Some(w) = ws.iter().find(|w| w.cols != x.cols) {
            return Err(Error::InvalidInput(format!(
                "matmul with `{}`: input has {} columns, the matrix {}",
                w.name, x.cols, w.cols
            )));
        }
        Ok(matmul::matmul_many(x, ws))
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        Ok(norm::rms_norm(x, &weight.data, eps))
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        same_shape("add", x, y)?;
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn mul_sigmoid(&self, x: &mut CpuTensor, gate: &CpuTensor) -> Result<()> {
        if gate.cols == 1 && gate.rows == x.rows {
            for (row, &g) in x.data.chunks_exact_mut(x.cols).zip(&gate.data) {
                let s = norm::sigmoid(g);
                row.iter_mut().for_each(|v| *v *= s);
            }
            return Ok(());
        }
        same_shape("mul_sigmoid", x, gate)?;
        x.data
            .iter_mut()
            .zip(&gate.data)
            .for_each(|(v, &g)| *v *= norm::sigmoid(g));
        Ok(())
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        same_shape("silu_mul", gate, up)?;
        let data = gate
            .data
            .iter()
            .zip(&up.data)
            .map(|(&g, &u)| norm::silu(g) * u)
            .collect();
        Ok(CpuTensor::new(gate.rows, gate.cols, data))
    }

    /// Gate and up as one product of two matrices ([`Self::matmul_many`]).
    fn swiglu(&self, x: &CpuTensor, gate: &MatrixView, up: &MatrixView) -> Result<CpuTensor> {
        match <[CpuTensor; 2]>::try_from(self.matmul_many(x, &[gate, up])?) {
            Ok([g, u]) => self.silu_mul(&g, &u),
            Err(_) => Err(Error::InvalidInput("swiglu: two products expected".into())),
        }
    }

    fn split_query_gate(&self, qg: &CpuTensor, num_heads: usize, head_dim: usize) -> Result<(CpuTensor, CpuTensor)> {
        if qg.cols != num_heads * head_dim * 2 {
            return Err(Error::InvalidInput(
                "split_query_gate: width is not heads * 2 * head_dim".into(),
            ));
        }
        Ok(attention::split_query_gate(qg, head_dim))
    }

    fn rope(&self, x: &mut CpuTensor, head_dim: usize, rotary_dim: usize, theta: f64, pos0: usize) -> Result<()> {
        attention::rope(x, head_dim, rotary_dim, theta, pos0);
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        keys: &CpuTensor,
        values: &CpuTensor,
        shape: AttentionShape,
        pos0: usize,
    ) -> Result<CpuTensor> {
        crate::backend::check_kv_cache(self, q, keys, values, pos0)?;
        Ok(attention::attention(q, keys, values, shape, pos0))
    }

    fn causal_conv1d_silu(&self, x: &CpuTensor, weight: &CpuTensor, state: &mut CpuTensor) -> Result<CpuTensor> {
        if weight.rows != x.cols || state.cols != x.cols || state.rows + 1 != weight.cols {
            return Err(Error::InvalidInput(
                "causal_conv1d: weight, state and input disagree".into(),
            ));
        }
        Ok(linear_attention::causal_conv1d_silu(x, weight, state))
    }

    fn gated_delta_rule(
        &self,
        qkv: &CpuTensor,
        a: &CpuTensor,
        b: &CpuTensor,
        a_log: &CpuTensor,
        dt_bias: &CpuTensor,
        state: &mut CpuTensor,
        dims: &LinearAttentionConfig,
    ) -> Result<CpuTensor> {
        let nv = dims.num_value_heads;
        if qkv.cols != dims.conv_dim()
            || a.cols != nv
            || b.cols != nv
            || state.rows != nv
            || state.cols != dims.key_head_dim * dims.value_head_dim
        {
            return Err(Error::InvalidInput(
                "gated_delta_rule: input shapes disagree with the config".into(),
            ));
        }
        Ok(linear_attention::gated_delta_rule(
            qkv,
            a,
            b,
            &a_log.data,
            &dt_bias.data,
            state,
            dims,
        ))
    }

    fn gated_rms_norm(&self, x: &CpuTensor, z: &CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        same_shape("gated_rms_norm", x, z)?;
        Ok(norm::gated_rms_norm(x, z, &weight.data, eps))
    }

    fn route_top_k(&self, logits: &CpuTensor, k: usize, renormalize: bool) -> Result<Vec<Route>> {
        Ok(moe::route_top_k(logits, k, renormalize))
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r));
        }
        Ok(CpuTensor::new(rows.len(), x.cols, data))
    }

    /// The experts side by side (each one's products are too small to keep every thread
    /// busy), their outputs added to `out` in the experts' order: the same sum, bit for bit,
    /// as one expert after the other.
    fn experts_ffn_one_token(
        &self,
        x: &CpuTensor,
        experts: &[&ExpertView],
        weights: &[f32],
        shared: Option<&SharedExpert<'_, Self>>,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let outputs: Vec<CpuTensor> = experts
            .par_iter()
            .zip(weights)
            .map(|(expert, &w)| {
                let mut y = CpuTensor::new(1, out.cols, vec![0.0; out.cols]);
                self.expert_ffn(x, expert, &[0], &[w], &mut y)?;
                Ok(y)
            })
            .collect::<Result<_>>()?;
        for y in outputs {
            self.add_assign(out, &y)?;
        }
        match shared {
            Some(s) => shared_expert_ffn(self, x, s, out),
            None => Ok(()),
        }
    }

    /// Several experts at once, as many as there are threads: one expert's products split
    /// into too few tiles of rows to keep a many-core CPU busy (an expert's gate of 512 rows
    /// is four). Their outputs are added to `out` in the order given: the same sums, bit for
    /// bit, as one expert after the other.
    fn experts_ffn_rows(&self, x: &CpuTensor, work: &[ExpertRows<'_, ExpertView>], out: &mut CpuTensor) -> Result<()> {
        for chunk in work.chunks(rayon::current_num_threads().max(1)) {
            let outputs: Vec<CpuTensor> = chunk
                .par_iter()
                .map(|w| expert_output(self, x, w.expert, w.rows))
                .collect::<Result<_>>()?;
            for (w, y) in chunk.iter().zip(&outputs) {
                self.scatter_add_rows(out, y, w.rows, w.weights)?;
            }
        }
        Ok(())
    }

    fn scatter_add_rows(&self, out: &mut CpuTensor, y: &CpuTensor, rows: &[usize], weights: &[f32]) -> Result<()> {
        if y.cols != out.cols || y.rows != rows.len() || weights.len() != rows.len() {
            return Err(Error::InvalidInput("scatter_add_rows: shapes disagree".into()));
        }
        for ((&r, &w), src) in rows.iter().zip(weights).zip(y.data.chunks_exact(y.cols)) {
            let cols = out.cols;
            for (d, &s) in out.data[r * cols..(r + 1) * cols].iter_mut().zip(src) {
                *d += w * s;
            }
        }
        Ok(())
    }

    /// Host memory is the store's to cache; nothing is held here.
    fn cached_expert(&self, _layer: usize, _index: usize) -> Option<ExpertView> {
        None
    }

    fn load_expert(&self, _layer: usize, _index: usize, view: &ExpertView) -> Result<ExpertView> {
        Ok(view.clone())
    }

    fn expert_matrices<'a>(&self, expert: &'a ExpertView) -> Result<[&'a MatrixView; 3]> {
        Ok([&expert.gate, &expert.up, &expert.down])
    }
}

#[cfg(test)]
mod tests {
    use super::matmul::tests::{affine, noise};
    use super::*;

    /// Experts run side by side give the same bits as one expert after the other, with more
    /// experts than threads and some on enough rows for the tiled products.
    #[test]
    fn experts_side_by_side_sum_as_one_after_the_other() {
        let (tokens, hidden, inter) = (24, 128, 64);
        let experts: Vec<ExpertView> = (0..7)
            .map(|_| ExpertView {
                gate: affine(inter, hidden, 4, 64),
                up: affine(inter, hidden, 8, 64),
                down: affine(hidden, inter, 4, 32),
            })
            .collect();
        let chosen: Vec<(Vec<usize>, Vec<f32>)> = (0..experts.len())
            .map(|e| {
                let rows: Vec<usize> = (0..tokens).filter(|t| (t + e) % (e + 1) == 0).collect();
                let weights = rows.iter().map(|&t| 0.1 + 0.01 * (t + e) as f32).collect();
                (rows, weights)
            })
            .collect();
        let work: Vec<ExpertRows<'_, ExpertView>> = experts
            .iter()
            .zip(&chosen)
            .map(|(expert, (rows, weights))| ExpertRows { expert, rows, weights })
            .collect();
        let x = CpuTensor::new(
            tokens,
            hidden,
            noise(3, tokens * hidden)
                .iter()
                .map(|&b| f32::from(b) / 128.0 - 1.0)
                .collect(),
        );
        let b = CpuBackend::new();
        let mut want = CpuTensor::new(tokens, hidden, vec![0.5; tokens * hidden]);
        for w in &work {
            b.expert_ffn(&x, w.expert, w.rows, w.weights, &mut want).unwrap();
        }
        let mut got = CpuTensor::new(tokens, hidden, vec![0.5; tokens * hidden]);
        b.experts_ffn_rows(&x, &work, &mut got).unwrap();
        assert!(work.iter().any(|w| w.rows.len() >= 16) && work.iter().any(|w| w.rows.len() < 8));
        assert_eq!(got, want);
    }
}
