//! A bounds-checked front for `matrixmultiply`'s blocked sgemm.

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
    // SAFETY: checked above: every element of a and b the product reads lies in its slice,
    // and c holds exactly a.rows x b.cols floats written with row stride b.cols.
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
}

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
