//! Safe views over `matrixmultiply::sgemm`, the blocked, vectorised f32 GEMM every CPU op is
//! built on. Callers split work over threads themselves (rayon); each call here runs on one.

/// A strided read-only matrix view: element (r, c) is `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    pub fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        let view = MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        };
        assert!(
            view.span() <= data.len(),
            "matrix view {rows}×{cols} (strides {row_stride}, {col_stride}) exceeds {} values",
            data.len()
        );
        view
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// One past the largest index the view touches (0 when empty).
    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }
}

/// `c ← a·b + beta·c` with `c` row-major `a.rows × b.cols` (beta 0 ignores what c held).
pub fn gemm(a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut [f32]) {
    gemm_strided(a, b, beta, c, b.cols)
}

/// `gemm` into rows of `c` that start `c_row_stride` values apart.
pub fn gemm_strided(a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut [f32], c_row_stride: usize) {
    assert_eq!(a.cols, b.rows, "inner dimensions of a GEMM differ");
    assert!(
        a.rows == 0 || (a.rows - 1) * c_row_stride + b.cols <= c.len(),
        "GEMM output too small"
    );
    // SAFETY: the views were bounds-checked against their slices at construction and `c` holds
    // a.rows rows of b.cols values at the stride (checked above); `c` is exclusive.
    unsafe {
        gemm_raw(a, b, beta, c.as_mut_ptr(), c_row_stride);
    }
}

/// `c ← a·b + beta·c` into a raw destination with row stride `c_row_stride`, for callers that
/// write disjoint column ranges of one output matrix from several threads.
///
/// # Safety
/// `c` must be valid for writes at `r·c_row_stride + j` for all r < a.rows, j < b.cols, and no
/// other thread may touch those elements during the call.
pub unsafe fn gemm_raw(a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: *mut f32, c_row_stride: usize) {
    assert_eq!(a.cols, b.rows, "inner dimensions of a GEMM differ");
    // SAFETY: a and b were bounds-checked at construction; the caller vouches for c.
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            1.0,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            beta,
            c,
            c_row_stride as isize,
            1,
        );
    }
}
