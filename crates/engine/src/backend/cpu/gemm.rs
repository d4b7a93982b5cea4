//! A bounds-checked front for blocked sgemm: the `gemm` crate's (AVX-512 or AVX2 kernels,
//! chosen at run time), or `matrixmultiply`'s for products of few rows.

/// A matrix read in place: element (i, j) is `data[i * row_stride + j * col_stride]`.
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Strided<'_> {
    /// A `rows` by `cols` matrix stored row-major, or stored as its transpose (row-major,
    /// `cols` by `rows`) when `transposed`.
    pub fn of(data: &[f32], rows: usize, cols: usize, transposed: bool) -> Strided<'_> {
        let (row_stride, col_stride) = if transposed { (1, rows) } else { (cols, 1) };
        Strided {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// The same elements read as the transpose.
    pub fn transposed(self) -> Self {
        Strided {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies in `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `c = alpha * a · b`, with `c` row-major, `a.rows` by `b.cols`.
///
/// # Panics
/// When the shapes disagree or a view reaches past its data: the callers derive both from
/// tensors they have checked, so this is a bug, not bad input.
pub fn sgemm(alpha: f32, a: &Strided<'_>, b: &Strided<'_>, c: &mut [f32]) {
    assert!(
        a.cols == b.rows && a.in_bounds() && b.in_bounds() && c.len() == a.rows * b.cols,
        "sgemm: {}x{} by {}x{} into {} floats",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.len()
    );
    let stride = |s: usize| s as isize;
    if a.rows < SMALL_PRODUCT_ROWS {
        // SAFETY: checked above: every element of a and b the product reads lies in its
        // slice, and c holds exactly a.rows x b.cols floats written with row stride b.cols.
        unsafe {
            matrixmultiply::sgemm(
                a.rows,
                a.cols,
                b.cols,
                alpha,
                a.data.as_ptr(),
                stride(a.row_stride),
                stride(a.col_stride),
                b.data.as_ptr(),
                stride(b.row_stride),
                stride(b.col_stride),
                0.0,
                c.as_mut_ptr(),
                stride(b.cols),
                1,
            );
        }
        return;
    }
    // SAFETY: as above. `gemm` computes dst = alpha * dst + beta * a · b: with dst not read,
    // its beta is our alpha.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            c.as_mut_ptr(),
            1,
            stride(b.cols),
            false,
            a.data.as_ptr(),
            stride(a.col_stride),
            stride(a.row_stride),
            b.data.as_ptr(),
            stride(b.col_stride),
            stride(b.row_stride),
            0.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Products of fewer rows (a decode step's query heads over a chunk of keys) run on
/// `matrixmultiply`, the rest on `gemm`, each where it measured faster (docs/perf.md).
const SMALL_PRODUCT_ROWS: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_follow_the_strides() {
        // a = [[1, 2], [3, 4]]; b read as the transpose of [[5, 6], [7, 8]].
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let mut c = [0.0; 4];
        sgemm(1.0, &Strided::of(&a, 2, 2, false), &Strided::of(&b, 2, 2, true), &mut c);
        assert_eq!(c, [17.0, 23.0, 39.0, 53.0]);
        sgemm(
            2.0,
            &Strided::of(&a, 2, 2, false),
            &Strided::of(&b, 2, 2, false),
            &mut c,
        );
        assert_eq!(c, [38.0, 44.0, 86.0, 100.0]);
    }

    #[test]
    fn products_of_many_rows_follow_the_strides() {
        // Enough rows for the `gemm` crate's path; a read as stored, b through its transpose.
        let (m, k, n) = (SMALL_PRODUCT_ROWS + 9, 7, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
        let b_t: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
        let mut c = vec![0.0; m * n];
        sgemm(
            3.0,
            &Strided::of(&a, m, k, false),
            &Strided::of(&b_t, k, n, true),
            &mut c,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * b_t[j * k + p]).sum::<f32>() * 3.0;
                assert_eq!(c[i * n + j], want, "({i}, {j})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "sgemm")]
    fn a_view_past_its_data_is_refused() {
        let a = [1.0; 4];
        let mut c = [0.0; 4];
        let short = Strided {
            data: &a[..3],
            rows: 2,
            cols: 2,
            row_stride: 2,
            col_stride: 1,
        };
        sgemm(1.0, &short, &Strided::of(&a, 2, 2, false), &mut c);
    }
}
