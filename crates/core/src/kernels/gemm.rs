//! A bounds-checked, safe wrapper over the `gemm` crate (the matrix-multiply kernels candle
//! itself uses on CPU), for the fused training kernels in [`crate::kernels::ops`].
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
    check_inputs(m, n, k, a, av, b, bv);
    assert!(ov.last(m, n) < out.len(), "gemm: output view out of bounds");
    assert!((m == 1 || ov.rs > 0) && (n == 1 || ov.cs > 0), "gemm: output view aliases itself");
    // SAFETY: the inputs' views lie inside their slices (checked above and in `check_inputs`),
    // so does the output's, `out` is borrowed mutably so it aliases neither input, and distinct
    // output coordinates map to distinct offsets (non-zero strides where the dimension exceeds 1).
    unsafe { raw(m, n, k, out.as_mut_ptr().add(ov.off), ov, accumulate, a, av, b, bv, alpha, parallel) }
}

/// `alpha · A[m×k] · B[k×n]` as a new row-major `m × n` vector. The output is written by the
/// kernel without being zeroed first (a fresh buffer the size of the result would otherwise be
/// written twice).
///
/// # Panics
/// If a view reaches outside its slice.
#[allow(clippy::too_many_arguments)]
pub fn matmul_new<T: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    alpha: T,
    parallel: bool,
) -> Vec<T> {
    if m == 0 || n == 0 || k == 0 {
        return vec![T::zero(); m * n];
    }
    let mut out = Vec::with_capacity(m * n);
    fill_spare(&mut out, m, n, k, a, av, b, bv, alpha, parallel);
    out
}

/// Replaces `out`'s contents with the `m × n` product, written into its spare capacity.
#[allow(clippy::too_many_arguments)]
fn fill_spare<T: GemmElem>(
    out: &mut Vec<T>,
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    alpha: T,
    parallel: bool,
) {
    assert!(m > 0 && n > 0 && k > 0);
    check_inputs(m, n, k, a, av, b, bv);
    out.clear();
    out.reserve(m * n);
    // SAFETY: as in `matmul_par` for the inputs; the output is the vector's own allocation of
    // at least `m · n` elements, viewed row-major. With `accumulate` false the kernel never
    // reads the destination and, for `m, n, k > 0`, writes every one of its `m · n` elements
    // (tested in `writes_every_output_element`), so the first `m · n` elements are initialised.
    unsafe {
        raw(m, n, k, out.as_mut_ptr(), View::rows(0, n), false, a, av, b, bv, alpha, parallel);
        out.set_len(m * n);
    }
}

fn check_inputs<T>(m: usize, n: usize, k: usize, a: &[T], av: View, b: &[T], bv: View) {
    if k > 0 {
        assert!(av.last(m, k) < a.len(), "gemm: lhs view out of bounds");
        assert!(bv.last(k, n) < b.len(), "gemm: rhs view out of bounds");
    }
}

/// # Safety
/// `dst` points to an output whose view `ov` is valid for writes (and reads when
/// `accumulate`) at every `(r, c)` in `m × n`, aliasing neither input; the input views lie
/// inside `a` and `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn raw<T: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    ov: View,
    accumulate: bool,
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    alpha: T,
    parallel: bool,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_output_element() {
        // A buffer full of NaN, emptied: every element the product leaves unwritten stays NaN.
        for (m, n, k) in [(1, 1, 1), (1, 7, 3), (9, 1, 5), (3, 4, 1), (17, 13, 8), (64, 48, 33), (200, 9, 128)] {
            for (ta, tb, par) in [(false, false, false), (true, false, true), (false, true, false), (true, true, true)]
            {
                let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
                let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect();
                let av = if ta { View::rows(0, m).t() } else { View::rows(0, k) };
                let bv = if tb { View::rows(0, k).t() } else { View::rows(0, n) };
                let mut want = vec![0.0f32; m * n];
                matmul_par(m, n, k, &a, av, &b, bv, &mut want, View::rows(0, n), false, 2.0, false);
                let mut out = vec![f32::NAN; m * n + 5];
                fill_spare(&mut out, m, n, k, &a, av, &b, bv, 2.0, par);
                assert_eq!(out, want, "{m}x{n}x{k} transposed {ta}/{tb}");
                assert_eq!(matmul_new(m, n, k, &a, av, &b, bv, 2.0, par), want);
            }
        }
        assert_eq!(matmul_new::<f32>(2, 3, 0, &[], View::rows(0, 0), &[], View::rows(0, 3), 1.0, false), vec![0.0; 6]);
    }
}
