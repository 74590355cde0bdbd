//! A bounds-checked, safe wrapper over the `gemm` crate (the matrix-multiply kernels candle
//! itself uses on CPU), for the fused training kernels in [`crate::ops`].
#![allow(unsafe_code)]

/// A matrix view into a slice: element `(r, c)` is at `off + r * rs + c * cs`.
#[derive(Debug, Clone, Copy)]
pub struct View {
    /// Offset of element `(0, 0)`.
    pub off: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl View {
    /// A row-major `rows × cols` view at `off` with leading dimension `ld`.
    pub fn rows(off: usize, ld: usize) -> Self {
        Self { off, rs: ld, cs: 1 }
    }

    /// The transpose of this view.
    pub fn t(self) -> Self {
        Self { off: self.off, rs: self.cs, cs: self.rs }
    }

    fn last(&self, rows: usize, cols: usize) -> usize {
        self.off + rows.saturating_sub(1) * self.rs + cols.saturating_sub(1) * self.cs
    }
}

/// Element types the wrapper accepts.
pub trait GemmElem: Copy + 'static + Send + Sync + num_traits::Zero + num_traits::One {}
impl GemmElem for f32 {}
impl GemmElem for f64 {}

/// `out[m×n] = (accumulate ? out : 0) + alpha · A[m×k] · B[k×n]`, single-threaded.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    out: &mut [T],
    ov: View,
    accumulate: bool,
    alpha: T,
) {
    matmul_par(m, n, k, a, av, b, bv, out, ov, accumulate, alpha, false)
}

/// [`matmul`], spread over the rayon thread pool when `parallel`.
///
/// # Panics
/// If a view reaches outside its slice, or `out`'s view overlaps itself (a stride of 0).
#[allow(clippy::too_many_arguments)]
pub fn matmul_par<T: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    out: &mut [T],
    ov: View,
    accumulate: bool,
    alpha: T,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        assert!(av.last(m, k) < a.len(), "gemm: lhs view out of bounds");
        assert!(bv.last(k, n) < b.len(), "gemm: rhs view out of bounds");
    }
    assert!(ov.last(m, n) < out.len(), "gemm: output view out of bounds");
    assert!((m == 1 || ov.rs > 0) && (n == 1 || ov.cs > 0), "gemm: output view aliases itself");
    // SAFETY: every element the kernel reads or writes lies inside its slice (checked above:
    // the largest offset of each view is in bounds and strides are non-negative), `out` is
    // borrowed mutably so it aliases neither input, and distinct output coordinates map to
    // distinct offsets (non-zero strides where the dimension exceeds 1).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().add(ov.off),
            ov.cs as isize,
            ov.rs as isize,
            accumulate,
            a.as_ptr().add(av.off),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr().add(bv.off),
            bv.cs as isize,
            bv.rs as isize,
            if accumulate { T::one() } else { T::zero() },
            alpha,
            false,
            false,
            false,
            if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None },
        )
    }
}
