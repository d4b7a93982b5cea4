//! Products of affine 2/4/8-bit matrices with many rows of x on the tensor cores
//! (`grouped_matmul_q` in kernels/prefill.cu): the matrices of a layer's experts on their gathered
//! rows of a prompt, and a dense layer's matrix on a whole chunk. x is first split into the
//! two f16 limbs the kernel reads (`split_rows_f16`); the weights stay codes.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};

use super::matvec::pow2_kernel;
use super::{CudaBackend, CudaMatrix, CudaTensor, cuda, grid_for};
use crate::error::{Error, Result};

/// Tile sizes of `grouped_matmul_mma` in kernels/prefill.cu (MT_ROWS, MT_TOKENS, MT_PIECES,
/// MT_STAGES).
pub(super) const TILE_ROWS: usize = 128;
pub(super) const TILE_TOKENS: usize = 32;
const STAGE_PIECES: usize = 2;
const STAGES: usize = 2;
/// Threads per block: a warp per 32 rows (MT_WARP_TILES MMA tiles of 16).
const TILE_THREADS: u32 = 128;

/// Shared memory of `grouped_matmul_mma`: `STAGES` stages of `mt_stage_bytes` in kernels/prefill.cu (per
/// row its pieces' codes and 16 bytes of padding; per token its pieces' two f16 limbs of x
/// and 64 bytes of padding; per token and piece two floats; per row two floats for each of
/// the stage's scale groups, at most one per piece).
fn shared_bytes(bits: usize) -> usize {
    let codes = TILE_ROWS * (STAGE_PIECES * 16 + 16);
    let x = TILE_TOKENS * (STAGE_PIECES * 512 / bits + 64);
    STAGES * (codes + x + TILE_TOKENS * STAGE_PIECES * 8 + TILE_ROWS * STAGE_PIECES * 8)
}

/// x as the kernel reads it: the limbs (as many bytes as x) and, per row and 16-byte piece
/// of codes, two floats.
pub(super) struct SplitRows {
    limbs: CudaTensor,
    meta: CudaTensor,
}

/// One matrix of each slot of a launch: (kernel index, bits), group, dtype, and per slot the
/// device addresses of codes, scales and biases.
pub(super) struct MmaTable {
    kernel: (usize, usize),
    group: i32,
    dtype: i32,
    addresses: CudaSlice<u64>,
}

impl CudaBackend {
    /// The kernel (index and bits) for matrices of `w`'s encoding and width when the GPU has
    /// the tensor-core instructions (compute capability 8.0) and the matrix suits the
    /// kernel: groups that are powers of two holding whole 16-byte pieces, widths in whole
    /// stages, codes 16-byte aligned.
    pub(super) fn mma_kernel(&self, w: &CudaMatrix) -> Option<(usize, usize)> {
        let (index, bits) = pow2_kernel(&w.encoding)?;
        let stage_cols = STAGE_PIECES * 128 / bits;
        (self.tensor_cores && w.cols.is_multiple_of(stage_cols) && w.data.0.is_multiple_of(16)).then_some((index, bits))
    }

    /// Whether a launch of `tiles` token tiles over `rows` rows gives every multiprocessor two
    /// blocks; smaller ones are left to SGEMM, which splits the work finer.
    pub(super) fn mma_fills_gpu(&self, rows: usize, tiles: usize) -> bool {
        rows.div_ceil(TILE_ROWS) * tiles >= 2 * self.sms
    }

    /// The table of `matrices` (one encoding, checked by the caller with `mma_kernel`).
    pub(super) fn mma_table(&self, kernel: (usize, usize), matrices: &[&CudaMatrix]) -> Result<MmaTable> {
        let first = matrices
            .first()
            .ok_or_else(|| Error::InvalidInput("a tensor-core product without matrices".into()))?;
        let mut addresses = Vec::with_capacity(3 * matrices.len());
        for m in matrices {
            let (sc, bi) = m.affine_parts()?;
            let (base, _guard) = m.mem.device_ptr(&self.stream);
            addresses.extend([m.data.0, sc.0, bi.0].map(|offset| base + offset as u64));
        }
        let (_, group, dtype) = first.format();
        Ok(MmaTable {
            kernel,
            group,
            dtype,
            addresses: self.to_device(&addresses)?,
        })
    }

    /// The first `rows` rows of `x` (`cols` wide) split into f16 limbs for the matrices of
    /// `table`.
    pub(super) fn split_rows(
        &self,
        x: &CudaView<'_, f32>,
        rows: usize,
        cols: usize,
        table: &MmaTable,
    ) -> Result<SplitRows> {
        let bits = table.kernel.1;
        let pieces = cols / (128 / bits);
        // x's factor is shared by the pieces of a stage that share a scale group.
        let per_factor = (table.group as usize / (128 / bits)).clamp(1, STAGE_PIECES);
        let lanes = 4 * per_factor as i32;
        let (limbs, meta) = (self.tensor(rows, cols)?, self.tensor(rows, 2 * pieces)?);
        let words = rows * pieces * 4;
        let (bits, n) = (bits as i32, words as i64);
        launch!(
            self,
            &self.k.split_rows_f16,
            grid_for(words),
            x,
            &bits,
            &n,
            &lanes,
            &*limbs.buf,
            &*meta.buf
        )?;
        Ok(SplitRows { limbs, meta })
    }

    /// `y[p, r] = x[p] . w_e[r]` for each tile `[slot e, first row p, rows, 0]` of `tiles`
    /// (`tile_count` of them), `w_e` the matrix of slot e of `table`, `rows` rows each.
    pub(super) fn mma_products(
        &self,
        table: &MmaTable,
        tiles: &CudaSlice<i32>,
        tile_count: usize,
        x: &SplitRows,
        rows: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (index, bits) = table.kernel;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(TILE_ROWS) as u32, tile_count as u32, 1),
            block_dim: (TILE_THREADS, 1, 1),
            shared_mem_bytes: shared_bytes(bits) as u32,
        };
        let (rows, cols) = (rows as i32, x.limbs.cols as i32);
        launch!(
            self,
            &self.k.grouped_matmul_q[index],
            cfg,
            &table.addresses,
            tiles,
            &table.group,
            &table.dtype,
            &*x.limbs.buf,
            &*x.meta.buf,
            &rows,
            &cols,
            y
        )
    }

    /// `out = x . Wᵀ` for the `t` rows of x on the tensor cores, when `w` suits the kernel
    /// and the product fills the GPU; `Ok(false)` leaves it to the caller.
    pub(super) fn mma_matmul(
        &self,
        x: &CudaView<'_, f32>,
        t: usize,
        w: &CudaMatrix,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<bool> {
        let Some(kernel) = self.mma_kernel(w) else {
            return Ok(false);
        };
        let tiles = tiles_of(&[t]);
        if !self.mma_fills_gpu(w.rows, tiles.len() / 4) {
            return Ok(false);
        }
        let table = self.mma_table(kernel, &[w])?;
        let split = self.split_rows(x, t, w.cols, &table)?;
        self.mma_products(&table, &self.to_device(&tiles)?, tiles.len() / 4, &split, w.rows, out)?;
        Ok(true)
    }
}

/// The tiles of `grouped_matmul_q` for slots with `counts[e]` rows each, the slots' rows one
/// after another: `[slot, first row, rows, 0]`, at most `TILE_TOKENS` rows each.
pub(super) fn tiles_of(counts: &[usize]) -> Vec<i32> {
    let mut tiles = Vec::new();
    let mut at = 0;
    for (slot, &count) in counts.iter().enumerate() {
        for first in (0..count).step_by(TILE_TOKENS) {
            let rows = TILE_TOKENS.min(count - first);
            tiles.extend([slot as i32, (at + first) as i32, rows as i32, 0]);
        }
        at += count;
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_each_slots_rows_in_order() {
        assert_eq!(tiles_of(&[40, 3]), [0, 0, 32, 0, 0, 32, 8, 0, 1, 40, 3, 0]);
        assert_eq!(tiles_of(&[0, 2]), [1, 0, 2, 0]);
    }

    /// Worked out by hand from the layout in kernels/prefill.cu.
    #[test]
    fn shared_memory_holds_two_stages() {
        // 4 bits: codes 128 x (2 x 16 + 16), x 32 x (2 x 128 + 64), meta 32 x 16, scales and
        // biases 128 x 2 x 8.
        assert_eq!(shared_bytes(4), 2 * (6144 + 10240 + 512 + 2048));
        // 2 bits: x 32 x (2 x 256 + 64).
        assert_eq!(shared_bytes(2), 2 * (6144 + 18432 + 512 + 2048));
    }
}
