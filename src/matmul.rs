//! A safe front for the `gemm` crate over strided row-major views: the CPU engine's
//! convolutions, linear layers and losses, and the MIL heads' f64 products.

use gemm::Parallelism;

/// A read-only `rows x cols` matrix inside a slice: element `(r, c)` is
/// `data[r * row_stride + c * col_stride]`. Transposing is swapping the strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T = f32> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A dense row-major matrix.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// Row-major rows of `cols` values, `row_stride` apart.
    pub fn strided(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(
                last < self.data.len(),
                "{what} matrix reaches past its slice"
            );
        }
    }
}

/// The element types products are taken in: f32 for the engine, f64 where exactness
/// matters more than speed (the MIL head).
pub(crate) trait Scalar: Copy + 'static {
    const ONE: Self;
}

impl Scalar for f32 {
    const ONE: Self = 1.0;
}

impl Scalar for f64 {
    const ONE: Self = 1.0;
}

/// `dst = lhs * rhs`, or `dst += lhs * rhs` when `accumulate`; `dst` is row-major with
/// rows `dst_row_stride` apart. Uses every rayon thread for products big enough to share.
pub(crate) fn gemm<T: Scalar>(
    dst: &mut [T],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions differ");
    lhs.check("left");
    rhs.check("right");
    Mat::strided(dst, m, n, dst_row_stride).check("destination");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every index the product touches was bounds-checked above, strides are
    // non-negative, and `dst` is exclusively borrowed, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        )
    }
}
