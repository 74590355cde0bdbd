//! Runtime CPU-feature dispatch for lmstack's hand-written f32 loops.
//!
//! The workspace builds for baseline x86-64 (SSE2), so a release binary runs on any x86-64
//! machine; the `gemm` crate picks AVX2/FMA kernels at run time, but lmstack's own loops
//! (decode attention, the small-batch linear kernel, activations) would stay 4 lanes wide
//! without fused multiply-adds. [`dispatch`] runs a closure compiled a second time with AVX2 and
//! FMA enabled when the CPU has them: the closure (marked `#[inline(always)]`, as are the helpers
//! here) is inlined into a `#[target_feature]` function, so LLVM vectorises its loops 8 lanes
//! wide. The closure receives `fma`: `true` in the AVX2 build, where [`fmadd`] becomes one fused
//! instruction, and `false` in the portable build, where `mul_add` would be a libm call.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// Whether this CPU runs the AVX2 + FMA build of [`dispatch`]ed code (x86-64 only). Setting
/// `LMSTACK_SIMD=0` forces the portable build (for comparison and testing).
pub fn has_avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        if std::env::var("LMSTACK_SIMD").is_ok_and(|v| v == "0") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Runs `f(true)` compiled for AVX2 + FMA when [`has_avx2_fma`], else `f(false)` (portable).
/// Mark `f` `#[inline(always)]`, or its body is compiled once, without the features.
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce(bool) -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX, AVX2 and FMA (detected at run time just above), which
        // is the only requirement of calling a `#[target_feature]` function.
        return unsafe { avx2_fma(f) };
    }
    f(false)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma")]
unsafe fn avx2_fma<R>(f: impl FnOnce(bool) -> R) -> R {
    f(true)
}

/// `a · b + c`, fused when `fma` (see [`dispatch`]).
#[inline(always)]
pub fn fmadd(fma: bool, a: f32, b: f32, c: f32) -> f32 {
    if fma {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product of equal-length slices, in eight lanes (one AVX register).
#[inline(always)]
pub fn dot(fma: bool, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = fmadd(fma, *x, *y, tail);
    }
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = fmadd(fma, x[i], y[i], acc[i]);
        }
    }
    hsum(acc) + tail
}

/// `y += alpha · x` over the shorter of the two.
#[inline(always)]
pub fn axpy(fma: bool, alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = fmadd(fma, alpha, *x, *y);
    }
}

/// Sum of a slice, in eight lanes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for x in c {
        for i in 0..8 {
            acc[i] += x[i];
        }
    }
    hsum(acc) + tail
}

/// Largest element of a slice (`-inf` when empty), in eight lanes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let c = x.chunks_exact(8);
    let tail = c.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in c {
        for i in 0..8 {
            acc[i] = acc[i].max(x[i]);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

#[inline(always)]
fn hsum(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// `y[n×o] += x[n×i] · Wᵀ` for a few rows `n` (decode steps), where `W[o×i]` is read from `w`
/// through `wv` (`(off, row stride, column stride)`) and is either output-major (column stride 1,
/// `nn.Linear`) or input-major (row stride 1, GPT-2's `Conv1D`). Returns `false`, touching
/// nothing, when the CPU lacks AVX2/FMA or the layout is neither (the caller then uses `gemm`).
///
/// For a handful of rows `gemm` spends most of its time packing the weight and in edge kernels;
/// these kernels read the weight once, in place.
///
/// # Panics
/// If a view reaches outside its slice.
#[allow(clippy::too_many_arguments)]
pub fn small_linear(
    x: &[f32],
    n: usize,
    i: usize,
    w: &[f32],
    (off, rs, cs): (usize, usize, usize),
    o: usize,
    y: &mut [f32],
) -> bool {
    if !has_avx2_fma() || n == 0 || i == 0 || o == 0 {
        return false;
    }
    assert!(x.len() >= n * i && y.len() >= n * o, "small_linear: x or y too short");
    let last = off + (o - 1) * rs + (i - 1) * cs;
    assert!(last < w.len(), "small_linear: weight view out of bounds");
    #[cfg(target_arch = "x86_64")]
    {
        if cs == 1 && rs >= i {
            // SAFETY: AVX2 and FMA are present (checked above); every weight element read,
            // `off + r * rs + c` for r < o, c < i, is at most `last`, in bounds; x and y reads and
            // writes stay below n·i and n·o (checked above).
            unsafe { avx::out_major(x, n, i, &w[off..], rs, o, y) };
            return true;
        }
        if rs == 1 && cs >= o {
            // SAFETY: as above, with elements at `off + r + c * cs`.
            unsafe { avx::in_major(x, n, i, &w[off..], cs, o, y) };
            return true;
        }
    }
    let _ = (rs, cs);
    false
}

/// One new token's attention over a sequence's cached keys and values, all heads at once:
/// `out[h] = softmax(scale · q[h] · K[..valid, g(h)]ᵀ) · V[..valid, g(h)]`, where `q` and `out`
/// are `[heads, d]`, `k`/`v` token-major `[len, kv_heads, d]` and head `h` reads KV head
/// `h / (heads / kv_heads)`. `scores` is scratch. Returns `false`, touching nothing, when the CPU
/// lacks AVX2/FMA or `d` is not a multiple of 8 (the caller then uses its portable path).
///
/// Keys are read row by row, every head of a row together, so the cache streams through once.
///
/// # Panics
/// If a slice is shorter than the shapes say, or `heads` is not a multiple of `kv_heads`.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (heads, kv_heads, d): (usize, usize, usize),
    valid: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> bool {
    if !has_avx2_fma() || d % 8 != 0 || d == 0 || valid == 0 {
        return false;
    }
    assert!(kv_heads > 0 && heads % kv_heads == 0, "decode_attention: heads {heads} over kv heads {kv_heads}");
    let row = kv_heads * d;
    assert!(q.len() >= heads * d && out.len() >= heads * d, "decode_attention: q or out too short");
    assert!(k.len() >= valid * row && v.len() >= valid * row, "decode_attention: cache shorter than valid rows");
    scores.clear();
    scores.resize(heads * valid, 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX2 and FMA are present (checked above); the kernel reads q[..heads·d],
        // k/v[..valid·row] and writes scores[..heads·valid] and out[..heads·d], all checked above.
        unsafe { avx::decode_attention(q, k, v, (heads, kv_heads, d), valid, scale, scores, out) };
        return true;
    }
    #[allow(unreachable_code)]
    false
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over register arrays read as the math does
mod avx {
    use std::arch::x86_64::*;

    /// `W` stored `[o, ld]` (row r = output r): tiles of 2 rows of x × 4 outputs, dot products
    /// eight inputs at a time.
    #[target_feature(enable = "avx,avx2,fma")]
    pub(super) unsafe fn out_major(x: &[f32], n: usize, i: usize, w: &[f32], ld: usize, o: usize, y: &mut [f32]) {
        let mut o0 = 0;
        while o0 < o {
            let no = (o - o0).min(4);
            let mut t0 = 0;
            while t0 < n {
                let mt = (n - t0).min(2);
                match (mt, no) {
                    (2, 4) => dot_tile::<2, 4>(x, i, w, ld, o, y, t0, o0),
                    (1, 4) => dot_tile::<1, 4>(x, i, w, ld, o, y, t0, o0),
                    (2, 3) => dot_tile::<2, 3>(x, i, w, ld, o, y, t0, o0),
                    (1, 3) => dot_tile::<1, 3>(x, i, w, ld, o, y, t0, o0),
                    (2, 2) => dot_tile::<2, 2>(x, i, w, ld, o, y, t0, o0),
                    (1, 2) => dot_tile::<1, 2>(x, i, w, ld, o, y, t0, o0),
                    (2, _) => dot_tile::<2, 1>(x, i, w, ld, o, y, t0, o0),
                    _ => dot_tile::<1, 1>(x, i, w, ld, o, y, t0, o0),
                }
                t0 += mt;
            }
            o0 += no;
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx,avx2,fma")]
    unsafe fn dot_tile<const MT: usize, const NO: usize>(
        x: &[f32],
        i: usize,
        w: &[f32],
        ld: usize,
        o: usize,
        y: &mut [f32],
        t0: usize,
        o0: usize,
    ) {
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); NO]; MT];
        let full = i / 8 * 8;
        let mut k = 0;
        while k < full {
            let mut wv = [_mm256_setzero_ps(); NO];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add((o0 + j) * ld + k));
            }
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add((t0 + t) * i + k));
                for j in 0..NO {
                    a[j] = _mm256_fmadd_ps(xv, wv[j], a[j]);
                }
            }
            k += 8;
        }
        for (t, a) in acc.iter().enumerate() {
            for j in 0..NO {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), a[j]);
                let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                for kk in full..i {
                    s += *xp.add((t0 + t) * i + kk) * *wp.add((o0 + j) * ld + kk);
                }
                *y.get_unchecked_mut((t0 + t) * o + o0 + j) += s;
            }
        }
    }

    /// `W` stored `[i, ld]` (row k = input k, GPT-2's `Conv1D`): tiles of 4 rows of x × 16
    /// outputs (eight accumulators; twelve spill), broadcasting one input at a time.
    #[target_feature(enable = "avx,avx2,fma")]
    pub(super) unsafe fn in_major(x: &[f32], n: usize, i: usize, w: &[f32], ld: usize, o: usize, y: &mut [f32]) {
        let mut o0 = 0;
        while o0 + 8 <= o {
            let nv = ((o - o0) / 8).min(2);
            let mut t0 = 0;
            while t0 < n {
                let mt = (n - t0).min(4);
                match (mt, nv) {
                    (4, 2) => bcast_tile::<4, 2>(x, i, w, ld, o, y, t0, o0),
                    (3, 2) => bcast_tile::<3, 2>(x, i, w, ld, o, y, t0, o0),
                    (2, 2) => bcast_tile::<2, 2>(x, i, w, ld, o, y, t0, o0),
                    (1, 2) => bcast_tile::<1, 2>(x, i, w, ld, o, y, t0, o0),
                    (4, _) => bcast_tile::<4, 1>(x, i, w, ld, o, y, t0, o0),
                    (3, _) => bcast_tile::<3, 1>(x, i, w, ld, o, y, t0, o0),
                    (2, _) => bcast_tile::<2, 1>(x, i, w, ld, o, y, t0, o0),
                    _ => bcast_tile::<1, 1>(x, i, w, ld, o, y, t0, o0),
                }
                t0 += mt;
            }
            o0 += 8 * nv;
        }
        // The last o % 8 outputs.
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        for t in 0..n {
            for oo in o0..o {
                let mut s = 0f32;
                for k in 0..i {
                    s += *xp.add(t * i + k) * *wp.add(k * ld + oo);
                }
                *y.get_unchecked_mut(t * o + oo) += s;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx,avx2,fma")]
    unsafe fn bcast_tile<const MT: usize, const NV: usize>(
        x: &[f32],
        i: usize,
        w: &[f32],
        ld: usize,
        o: usize,
        y: &mut [f32],
        t0: usize,
        o0: usize,
    ) {
        let (xp, wp, yp) = (x.as_ptr(), w.as_ptr(), y.as_mut_ptr());
        let mut acc = [[_mm256_setzero_ps(); NV]; MT];
        for (t, a) in acc.iter_mut().enumerate() {
            for (j, v) in a.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(yp.add((t0 + t) * o + o0 + 8 * j));
            }
        }
        for k in 0..i {
            let mut wv = [_mm256_setzero_ps(); NV];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(k * ld + o0 + 8 * j));
            }
            for (t, a) in acc.iter_mut().enumerate() {
                let xb = _mm256_set1_ps(*xp.add((t0 + t) * i + k));
                for j in 0..NV {
                    a[j] = _mm256_fmadd_ps(xb, wv[j], a[j]);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                _mm256_storeu_ps(yp.add((t0 + t) * o + o0 + 8 * j), *v);
            }
        }
    }

    /// See [`super::decode_attention`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx,avx2,fma")]
    pub(super) unsafe fn decode_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (heads, kv_heads, d): (usize, usize, usize),
        valid: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let row = kv_heads * d;
        let n_rep = heads / kv_heads;
        let (qp, kp, vp, sp) = (q.as_ptr(), k.as_ptr(), v.as_ptr(), scores.as_mut_ptr());
        // scores[h, j] = scale · q[h] · k[j, g(h)], the cache read row by row.
        for j in 0..valid {
            let kr = kp.add(j * row);
            for h in 0..heads {
                let (qh, kh) = (qp.add(h * d), kr.add(h / n_rep * d));
                let mut acc = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(kh));
                let mut c = 8;
                while c < d {
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(c)), _mm256_loadu_ps(kh.add(c)), acc);
                    c += 8;
                }
                let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
                *sp.add(h * valid + j) = _mm_cvtss_f32(s1) * scale;
            }
        }
        for s in scores.chunks_mut(valid) {
            let max = super::max(s);
            for x in s.iter_mut() {
                *x = crate::ops::exp_f32(*x - max);
            }
            let inv = 1.0 / super::sum(s);
            for x in s.iter_mut() {
                *x *= inv;
            }
        }
        // out[h] = Σ_j p[h, j] · v[j, g(h)], 32 columns at a time in registers.
        for h in 0..heads {
            let p = &scores[h * valid..(h + 1) * valid];
            let (vh, oh) = (vp.add(h / n_rep * d), out.as_mut_ptr().add(h * d));
            let mut c = 0;
            while c + 32 <= d {
                weighted_rows::<4>(p, vh.add(c), row, oh.add(c));
                c += 32;
            }
            while c < d {
                weighted_rows::<1>(p, vh.add(c), row, oh.add(c));
                c += 8;
            }
        }
    }

    /// `out[..8·NC] = Σ_j p[j] · v[j·row ..][..8·NC]`, two rows per iteration (independent sums).
    #[inline]
    #[target_feature(enable = "avx,avx2,fma")]
    unsafe fn weighted_rows<const NC: usize>(p: &[f32], v: *const f32, row: usize, out: *mut f32) {
        let mut a = [_mm256_setzero_ps(); NC];
        let mut b = [_mm256_setzero_ps(); NC];
        let mut j = 0;
        while j + 2 <= p.len() {
            let (p0, p1) = (_mm256_set1_ps(p[j]), _mm256_set1_ps(p[j + 1]));
            let (r0, r1) = (v.add(j * row), v.add((j + 1) * row));
            for c in 0..NC {
                a[c] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(r0.add(8 * c)), a[c]);
                b[c] = _mm256_fmadd_ps(p1, _mm256_loadu_ps(r1.add(8 * c)), b[c]);
            }
            j += 2;
        }
        if j < p.len() {
            let p0 = _mm256_set1_ps(p[j]);
            let r0 = v.add(j * row);
            for c in 0..NC {
                a[c] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(r0.add(8 * c)), a[c]);
            }
        }
        for c in 0..NC {
            _mm256_storeu_ps(out.add(8 * c), _mm256_add_ps(a[c], b[c]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn small_linear_matches_plain_loops_in_both_layouts() {
        for (n, i, o) in [(1, 8, 8), (3, 13, 5), (4, 128, 65), (7, 32, 100), (9, 64, 24), (16, 17, 31)] {
            let x = data(n * i, 3);
            let w = data(o * i, 4);
            let want: Vec<f64> = (0..n * o)
                .map(|r| (0..i).map(|k| x[r / o * i + k] as f64 * w[r % o * i + k] as f64).sum::<f64>() + 0.25)
                .collect();
            // Output-major [o, i] with a padded leading dimension, and its input-major transpose.
            let ld = i + 3;
            let mut wo = vec![f32::NAN; 2 + o * ld];
            let mut wi = vec![f32::NAN; 1 + i * (o + 2)];
            for r in 0..o {
                for k in 0..i {
                    wo[2 + r * ld + k] = w[r * i + k];
                    wi[1 + k * (o + 2) + r] = w[r * i + k];
                }
            }
            for (buf, view) in [(&wo, (2, ld, 1)), (&wi, (1, 1, o + 2))] {
                let mut y = vec![0.25f32; n * o];
                if !small_linear(&x, n, i, buf, view, o, &mut y) {
                    assert!(!has_avx2_fma(), "AVX2 machines take the kernel");
                    continue;
                }
                for (g, w) in y.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-4, "n={n} i={i} o={o} {view:?}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn both_builds_agree_with_plain_loops() {
        for n in [0, 1, 7, 8, 9, 32, 100] {
            let (a, b) = (data(n, 1), data(n, 2));
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            for got in [dot(false, &a, &b), dispatch(|fma| dot(fma, &a, &b))] {
                assert!((got as f64 - want).abs() < 1e-4, "dot n={n}: {got} vs {want}");
            }
            let want_sum: f64 = a.iter().map(|x| *x as f64).sum();
            assert!((dispatch(|_| sum(&a)) as f64 - want_sum).abs() < 1e-4);
            let want_max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(dispatch(|_| max(&a)), want_max);
            let mut y1 = b.clone();
            let mut y2 = b.clone();
            axpy(false, 0.5, &a, &mut y1);
            dispatch(|fma| axpy(fma, 0.5, &a, &mut y2));
            for ((p, q), (x, y)) in y1.iter().zip(&y2).zip(a.iter().zip(&b)) {
                assert!((p - (0.5 * x + y)).abs() < 1e-6 && (q - (0.5 * x + y)).abs() < 1e-6);
            }
        }
    }
}
