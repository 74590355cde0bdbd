//! Runtime CPU-feature dispatch for lmstack's hand-written f32 loops.
//!
//! The workspace builds for baseline x86-64 (SSE2), so a release binary runs on any x86-64
//! machine; the `gemm` crate picks AVX2/FMA kernels at run time, but lmstack's own loops
//! (decode attention, activations, norms) would stay 4 lanes wide
//! without fused multiply-adds. [`dispatch`] runs a closure compiled a second time with AVX2 and
//! FMA enabled when the CPU has them: the closure (marked `#[inline(always)]`, as are the helpers
//! here) is inlined into a `#[target_feature]` function, so LLVM vectorises its loops 8 lanes
//! wide. The closure receives `fma`: `true` in the AVX2 build, where [`fmadd`] becomes one fused
//! instruction, and `false` in the portable build, where `mul_add` would be a libm call.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};

/// e^x for f32 (Cephes' `expf` scheme: x = n·ln2 + r, a degree-6 polynomial in r, then
/// scaling by 2^n through the exponent bits), branch-free so loops over it vectorise; relative
/// error below 2e-7 on [-87, 88]. Inputs are clamped to that range (e^-87 ≈ 1.6e-38).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Sum with eight independent accumulators (so the loop vectorises; the order is fixed, so
/// results are reproducible).
#[inline(always)]
pub(crate) fn sum8<T: num_traits::Zero + Copy + std::ops::AddAssign>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    let mut s = T::zero();
    for a in acc {
        s += a;
    }
    for &v in rest {
        s += f(v);
    }
    s
}

const UNKNOWN: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

fn detect() -> bool {
    std::env::var("LMSTACK_SIMD").map_or(true, |v| v != "0") && cpu_has_avx2_fma()
}

/// Whether [`dispatch`]ed code runs its AVX2 + FMA build: the CPU has them (x86-64), neither
/// `LMSTACK_SIMD=0` nor [`set_enabled`]`(false)` turned it off.
pub fn has_avx2_fma() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = detect();
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Whether the CPU itself has AVX2 + FMA, whatever `LMSTACK_SIMD` or [`set_enabled`] say: all
/// [`packed_linear`] needs. A layer that holds its weight only packed (see
/// [`crate::nn::Linear::release_weight`]) computes through it even when the switch is off.
pub fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Turns the AVX2 build on (where the CPU has it) or off, process-wide: for comparing the
/// two builds, as tests do.
pub fn set_enabled(on: bool) {
    STATE.store(if on && detect() { ON } else { OFF }, Ordering::Relaxed);
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

/// Softmax of a non-empty row in place.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let max = max(x);
    for v in x.iter_mut() {
        *v = exp_f32(*v - max);
    }
    let inv = 1.0 / sum8(x, |v| v);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
fn hsum(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
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
    k: Rows<'_>,
    v: Rows<'_>,
    (heads, kv_heads, d): (usize, usize, usize),
    valid: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> bool {
    decode_attention_groups(q, k, v, (heads, kv_heads, d), 0..kv_heads, valid, (scale, None), scores, out)
}

/// [`decode_attention`] for the heads of KV heads `groups` only (so two threads can share one
/// sequence's heads): `q` and `out` hold just those heads, `[groups.len() · heads / kv_heads, d]`,
/// while `k`/`v` are the whole cache rows. `(scale, softcap)`: with a soft cap, each score `s`
/// becomes `cap · tanh(s / cap)` before the softmax (Gemma 2).
///
/// # Panics
/// As [`decode_attention`], or if `groups` is empty or reaches past `kv_heads`.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_groups(
    q: &[f32],
    k: Rows<'_>,
    v: Rows<'_>,
    (heads, kv_heads, d): (usize, usize, usize),
    groups: std::ops::Range<usize>,
    valid: usize,
    (scale, softcap): (f32, Option<f32>),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> bool {
    if !has_avx2_fma() || d % 8 != 0 || d == 0 || valid == 0 {
        return false;
    }
    assert!(kv_heads > 0 && heads % kv_heads == 0, "decode_attention: heads {heads} over kv heads {kv_heads}");
    assert!(groups.start < groups.end && groups.end <= kv_heads, "decode_attention: kv heads {groups:?}");
    let (row, n_rep) = (kv_heads * d, heads / kv_heads);
    let gh = groups.len() * n_rep;
    assert!(q.len() >= gh * d && out.len() >= gh * d, "decode_attention: q or out too short");
    let reach = (valid - 1) * row + groups.end * d;
    assert!(k.len() >= reach && v.len() >= reach, "decode_attention: cache shorter than valid rows");
    scores.clear();
    scores.resize(gh * valid, 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        let (dims, off) = ((gh, n_rep, d, row), groups.start * d);
        // SAFETY: AVX2 and FMA are present (checked above); the kernel reads q[..gh·d], k/v from
        // `off` to `(valid-1)·row + groups.end·d`, and writes scores[..gh·valid] and out[..gh·d],
        // all checked above.
        unsafe {
            match (k, v) {
                (Rows::F32(k), Rows::F32(v)) => {
                    avx::decode_attention(q, &k[off..], &v[off..], dims, valid, (scale, softcap), scores, out)
                }
                (Rows::Bf16(k), Rows::Bf16(v)) => {
                    avx::decode_attention(q, &k[off..], &v[off..], dims, valid, (scale, softcap), scores, out)
                }
                _ => panic!("decode_attention: keys and values stored as different types"),
            }
        }
        return true;
    }
    #[allow(unreachable_code)]
    false
}

/// Gemma 2's soft cap in place: each score `s` becomes `cap · tanh(s / cap)` (tanh as the
/// training kernels compute it, [`crate::kernels::ops::tanh_f32`]).
pub fn soft_cap(scores: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    scores.iter_mut().for_each(|s| *s = cap * crate::kernels::ops::tanh_f32(*s * inv));
}

/// Stored values read as f32: f32 themselves, or bf16 ([`f32_to_bf16`]) widened exactly as they
/// are read (a key/value cache kept in half the bytes).
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values, the upper halves of f32s.
    Bf16(&'a [u16]),
}

impl<'a> Rows<'a> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::Bf16(x) => x.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values from the `n`-th on.
    pub fn skip(&self, n: usize) -> Rows<'a> {
        match self {
            Rows::F32(x) => Rows::F32(&x[n..]),
            Rows::Bf16(x) => Rows::Bf16(&x[n..]),
        }
    }

    /// Writes `n` runs of `width` values, run `r` starting at `off + r·stride`, as f32 into `out`
    /// (cleared first): e.g. one head's columns of a token-major cache.
    pub fn gather_f32(&self, off: usize, stride: usize, n: usize, width: usize, out: &mut Vec<f32>) {
        out.clear();
        out.reserve(n * width);
        for r in 0..n {
            let at = off + r * stride..off + r * stride + width;
            match self {
                Rows::F32(x) => out.extend_from_slice(&x[at]),
                Rows::Bf16(x) => out.extend(x[at].iter().map(|&h| bf16_to_f32(h))),
            }
        }
    }
}

/// Output features per panel of a [`PackedWeight`] (two AVX registers).
const PANEL: usize = 16;

/// A linear layer's weight `W [out, in]` repacked for [`packed_linear`]: panels of 16 output
/// features, each stored input-major (`panel[i][0..16]`, the last panel zero-padded), so the
/// kernel streams the weights through once, sequentially, for all the rows of a step.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    out: usize,
    inp: usize,
    panels: Panels,
}

/// The panels' values: f32, or bf16 (the upper half of an f32's bits, rounded to nearest even)
/// or IEEE f16 (a GGUF file's f16 matrices, kept as stored) widened back to f32 as they are
/// loaded, for half the bytes per step.
#[derive(Debug, Clone)]
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<half::f16>),
}

/// Whether the CPU converts f16 to f32 in vector registers (F16C), which f16 panels need.
pub fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to bf16 (nearest, ties to even; NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// A bf16 value as f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

impl PackedWeight {
    /// Packs `W [out, in]` whose element `(o, i)` is `w[off + o·rs + i·cs]` (any strides: a
    /// row-major weight or the transposed view of a GPT-2 `Conv1D`).
    ///
    /// # Panics
    /// If the view reaches outside `w`.
    pub fn new(w: &[f32], (off, rs, cs): (usize, usize, usize), out: usize, inp: usize) -> Self {
        if out > 0 && inp > 0 {
            assert!(off + (out - 1) * rs + (inp - 1) * cs < w.len(), "PackedWeight: view outside the weight");
        }
        let n_panels = out.div_ceil(PANEL);
        let mut panels = vec![0.0; n_panels * inp * PANEL];
        for (p, panel) in panels.chunks_mut(inp * PANEL).enumerate() {
            for j in 0..PANEL.min(out - p * PANEL) {
                let row = off + (p * PANEL + j) * rs;
                for i in 0..inp {
                    panel[i * PANEL + j] = w[row + i * cs];
                }
            }
        }
        Self { out, inp, panels: Panels::F32(panels) }
    }

    /// The same weight with its values rounded to bf16: half the bytes, and the kernel widens
    /// each value back to f32 as it loads it, so the arithmetic stays f32 (the product of an f32
    /// input and a bf16 weight is the f32 product with that weight rounded).
    pub fn to_bf16(&self) -> Self {
        let panels = match &self.panels {
            Panels::F32(v) => Panels::Bf16(v.iter().map(|&x| f32_to_bf16(x)).collect()),
            Panels::Bf16(v) => Panels::Bf16(v.clone()),
            Panels::F16(v) => Panels::Bf16(v.iter().map(|&x| f32_to_bf16(x.to_f32())).collect()),
        };
        Self { out: self.out, inp: self.inp, panels }
    }

    /// The same weight with its values rounded to IEEE f16 (nearest even): exact for weights
    /// that were f16 (a GGUF file's f16 matrices), half the bytes of f32, the arithmetic still
    /// f32. `None` where the CPU lacks F16C ([`has_f16c`]).
    pub fn to_f16(&self) -> Option<Self> {
        if !has_f16c() {
            return None;
        }
        let panels = match &self.panels {
            Panels::F32(v) => Panels::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
            Panels::Bf16(v) => Panels::F16(v.iter().map(|&h| half::f16::from_f32(bf16_to_f32(h))).collect()),
            Panels::F16(v) => Panels::F16(v.clone()),
        };
        Some(Self { out: self.out, inp: self.inp, panels })
    }

    /// The type the values are held as: `F32`, `BF16` or `F16`.
    pub fn dtype(&self) -> candle_core::DType {
        match self.panels {
            Panels::F32(_) => candle_core::DType::F32,
            Panels::Bf16(_) => candle_core::DType::BF16,
            Panels::F16(_) => candle_core::DType::F16,
        }
    }

    /// Whether the values are held as bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self.panels, Panels::Bf16(_))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Bytes held by the packed copy.
    pub fn bytes(&self) -> usize {
        match &self.panels {
            Panels::F32(v) => v.len() * 4,
            Panels::Bf16(v) => v.len() * 2,
            Panels::F16(v) => v.len() * 2,
        }
    }

    /// Rows `ids` of `W` (`[ids.len(), in]`), gathered from their panels: an embedding lookup
    /// in a table that is also an output projection (tied weights) and is held only packed.
    /// `None` when an id is not below `out`.
    pub fn rows(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * self.inp);
        for &id in ids {
            let id = id as usize;
            if id >= self.out {
                return None;
            }
            let at = id / PANEL * self.inp * PANEL;
            match &self.panels {
                Panels::F32(v) => out.extend(v[at..][..self.inp * PANEL].iter().skip(id % PANEL).step_by(PANEL)),
                Panels::Bf16(v) => out.extend(
                    v[at..][..self.inp * PANEL].iter().skip(id % PANEL).step_by(PANEL).map(|&h| bf16_to_f32(h)),
                ),
                Panels::F16(v) => {
                    out.extend(v[at..][..self.inp * PANEL].iter().skip(id % PANEL).step_by(PANEL).map(|h| h.to_f32()))
                }
            }
        }
        Some(out)
    }
}

/// `y [m, out] = x [m, in] · Wᵀ (+ bias)` with a [`PackedWeight`], in AVX2 + FMA; `None` where
/// the CPU lacks them (the caller then uses `gemm`; honouring the AVX2 switch,
/// [`has_avx2_fma`], is also the caller's). `parallel` spreads the panels over the rayon pool.
///
/// Each output is `bias + Σᵢ x[i]·W[o, i]` summed in input order by one chain of fused
/// multiply-adds, whatever `m` and however the panels are split: a row's result does not
/// depend on the other rows of the batch.
///
/// # Panics
/// If `x` or `bias` is shorter than the shapes say.
pub fn packed_linear(x: &[f32], m: usize, w: &PackedWeight, bias: Option<&[f32]>, parallel: bool) -> Option<Vec<f32>> {
    if !cpu_has_avx2_fma() {
        return None;
    }
    let (out, inp) = (w.out, w.inp);
    assert!(x.len() >= m * inp, "packed_linear: x has {} values for {m} rows of {inp}", x.len());
    if let Some(b) = bias {
        assert!(b.len() >= out, "packed_linear: bias has {} values for {out} outputs", b.len());
    }
    if m == 0 || out == 0 {
        return Some(Vec::new());
    }
    let n_panels = out.div_ceil(PANEL);
    let threads = if parallel { rayon::current_num_threads().min(n_panels) } else { 1 };
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (both calls): AVX2 and FMA are present (checked above); the kernel reads
        // x[..m·inp], the panels [p0, p1) of `w` and bias[..out] (checked above and by
        // construction of `PackedWeight`), and writes the `m` rows of `cols` columns of an output
        // whose row stride is `cols` — exactly the buffer allocated for it here.
        if threads <= 1 {
            let mut y = vec![0.0; m * out];
            unsafe { avx::packed_linear(x, m, w, bias, 0, n_panels, &mut y, out) };
            return Some(y);
        }
        use rayon::prelude::*;
        let per = n_panels.div_ceil(threads);
        let parts: Vec<(usize, Vec<f32>)> = (0..n_panels.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let (p0, p1) = (t * per, ((t + 1) * per).min(n_panels));
                let cols = (p1 * PANEL).min(out) - p0 * PANEL;
                let mut part = vec![0.0; m * cols];
                unsafe { avx::packed_linear(x, m, w, bias, p0, p1, &mut part, cols) };
                (p0 * PANEL, part)
            })
            .collect();
        let mut y = vec![0.0; m * out];
        for (c0, part) in parts {
            let cols = part.len() / m;
            for (dst, src) in y.chunks_mut(out).zip(part.chunks(cols)) {
                dst[c0..c0 + cols].copy_from_slice(src);
            }
        }
        return Some(y);
    }
    #[allow(unreachable_code)]
    None
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over register arrays read as the math does
mod avx {
    use std::arch::x86_64::*;

    /// See [`super::packed_linear`]: panels `[p0, p1)` into `y`, whose rows are `ld` long and
    /// start at the first panel's first column.
    /// F16 panels need F16C besides ([`super::PackedWeight::to_f16`] makes them only where
    /// the CPU has it).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx,avx2,fma")]
    pub(super) unsafe fn packed_linear(
        x: &[f32],
        m: usize,
        w: &super::PackedWeight,
        bias: Option<&[f32]>,
        p0: usize,
        p1: usize,
        y: &mut [f32],
        ld: usize,
    ) {
        match &w.panels {
            super::Panels::F32(v) => panels_linear(v.as_ptr(), x, m, w, bias, p0, p1, y, ld),
            super::Panels::Bf16(v) => panels_linear(v.as_ptr(), x, m, w, bias, p0, p1, y, ld),
            super::Panels::F16(v) => packed_linear_f16(v.as_ptr(), x, m, w, bias, p0, p1, y, ld),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    unsafe fn packed_linear_f16(
        panels: *const half::f16,
        x: &[f32],
        m: usize,
        w: &super::PackedWeight,
        bias: Option<&[f32]>,
        p0: usize,
        p1: usize,
        y: &mut [f32],
        ld: usize,
    ) {
        panels_linear(panels, x, m, w, bias, p0, p1, y, ld)
    }

    /// A panel value type the kernel can load eight of into f32 lanes.
    pub(super) trait PanelElem: Copy {
        /// Eight consecutive values from `p`, as f32.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl PanelElem for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl PanelElem for half::f16 {
        /// IEEE f16, converted exactly (F16C; only called from code compiled with it).
        #[inline(always)]
        unsafe fn load8(p: *const half::f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
    }

    impl PanelElem for u16 {
        /// bf16: zero-extended to 32 bits and shifted into the upper half, exactly its f32.
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn panels_linear<E: PanelElem>(
        panels: *const E,
        x: &[f32],
        m: usize,
        w: &super::PackedWeight,
        bias: Option<&[f32]>,
        p0: usize,
        p1: usize,
        y: &mut [f32],
        ld: usize,
    ) {
        const P: usize = super::PANEL;
        let (out, inp) = (w.out, w.inp);
        let xp = x.as_ptr();
        for p in p0..p1 {
            let panel = panels.add(p * inp * P);
            let col = p * P;
            let cols = P.min(out - col);
            let mut b = [0f32; P];
            if let Some(bias) = bias {
                b[..cols].copy_from_slice(&bias[col..col + cols]);
            }
            let (b0, b1) = (_mm256_loadu_ps(b.as_ptr()), _mm256_loadu_ps(b.as_ptr().add(8)));
            let mut r = 0;
            while r < m {
                // Four rows share each load of the panel; fewer at the end, with the same
                // arithmetic per row.
                let rows = (m - r).min(4);
                let mut acc = [_mm256_setzero_ps(); 8];
                let xr = xp.add(r * inp);
                if rows == 4 {
                    for i in 0..inp {
                        let w0 = E::load8(panel.add(i * P));
                        let w1 = E::load8(panel.add(i * P + 8));
                        for j in 0..4 {
                            let v = _mm256_broadcast_ss(&*xr.add(j * inp + i));
                            acc[2 * j] = _mm256_fmadd_ps(w0, v, acc[2 * j]);
                            acc[2 * j + 1] = _mm256_fmadd_ps(w1, v, acc[2 * j + 1]);
                        }
                    }
                } else {
                    for i in 0..inp {
                        let w0 = E::load8(panel.add(i * P));
                        let w1 = E::load8(panel.add(i * P + 8));
                        for j in 0..rows {
                            let v = _mm256_broadcast_ss(&*xr.add(j * inp + i));
                            acc[2 * j] = _mm256_fmadd_ps(w0, v, acc[2 * j]);
                            acc[2 * j + 1] = _mm256_fmadd_ps(w1, v, acc[2 * j + 1]);
                        }
                    }
                }
                let c0 = col - p0 * P;
                for j in 0..rows {
                    let (lo, hi) = (_mm256_add_ps(acc[2 * j], b0), _mm256_add_ps(acc[2 * j + 1], b1));
                    let dst = (r + j) * ld + c0;
                    let out = &mut y[dst..dst + cols];
                    if cols == P {
                        // A whole panel: two stores (a 64-byte `copy_from_slice` is a call).
                        _mm256_storeu_ps(out.as_mut_ptr(), lo);
                        _mm256_storeu_ps(out.as_mut_ptr().add(8), hi);
                    } else {
                        let mut o = [0f32; P];
                        _mm256_storeu_ps(o.as_mut_ptr(), lo);
                        _mm256_storeu_ps(o.as_mut_ptr().add(8), hi);
                        out.copy_from_slice(&o[..cols]);
                    }
                }
                r += rows;
            }
        }
    }

    /// See [`super::decode_attention`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx,avx2,fma")]
    /// See [`super::decode_attention_groups`]: `heads` query heads, `n_rep` per KV head, whose
    /// keys/values start at `k`/`v` in rows `row` apart.
    pub(super) unsafe fn decode_attention<E: PanelElem>(
        q: &[f32],
        k: &[E],
        v: &[E],
        (heads, n_rep, d, row): (usize, usize, usize, usize),
        valid: usize,
        (scale, softcap): (f32, Option<f32>),
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let (qp, kp, vp, sp) = (q.as_ptr(), k.as_ptr(), v.as_ptr(), scores.as_mut_ptr());
        // scores[h, j] = scale · q[h] · k[j, g(h)]: eight cached rows at a time per head (their
        // block stays in L1 across heads), each row's sum kept in its own register and the eight
        // reduced together; the last rows one by one.
        let scale8 = _mm256_set1_ps(scale);
        let mut j0 = 0;
        while j0 + 8 <= valid {
            for h in 0..heads {
                let (qh, kh) = (qp.add(h * d), kp.add(j0 * row + h / n_rep * d));
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < d {
                    let qv = _mm256_loadu_ps(qh.add(c));
                    for r in 0..8 {
                        acc[r] = _mm256_fmadd_ps(qv, E::load8(kh.add(r * row + c)), acc[r]);
                    }
                    c += 8;
                }
                _mm256_storeu_ps(sp.add(h * valid + j0), _mm256_mul_ps(hsum8(acc), scale8));
            }
            j0 += 8;
        }
        for j in j0..valid {
            let kr = kp.add(j * row);
            for h in 0..heads {
                let (qh, kh) = (qp.add(h * d), kr.add(h / n_rep * d));
                let mut acc = _mm256_mul_ps(_mm256_loadu_ps(qh), E::load8(kh));
                let mut c = 8;
                while c < d {
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(c)), E::load8(kh.add(c)), acc);
                    c += 8;
                }
                let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
                *sp.add(h * valid + j) = _mm_cvtss_f32(s1) * scale;
            }
        }
        if let Some(cap) = softcap {
            super::soft_cap(scores, cap);
        }
        scores.chunks_mut(valid).for_each(super::softmax);
        // out[h] = Σ_j p[h, j] · v[j, g(h)], 32 columns at a time in registers.
        for h in 0..heads {
            let p = &scores[h * valid..(h + 1) * valid];
            let (vh, oh) = (vp.add(h / n_rep * d), out.as_mut_ptr().add(h * d));
            let mut c = 0;
            while c + 32 <= d {
                weighted_rows::<E, 4>(p, vh.add(c), row, oh.add(c));
                c += 32;
            }
            while c < d {
                weighted_rows::<E, 1>(p, vh.add(c), row, oh.add(c));
                c += 8;
            }
        }
    }

    /// The horizontal sums of eight registers, as the eight lanes of one.
    #[inline]
    #[target_feature(enable = "avx,avx2,fma")]
    unsafe fn hsum8(a: [__m256; 8]) -> __m256 {
        // Pairwise adds leave, per 128-bit half, the four partial sums of rows 0-3 (and 4-7);
        // adding the halves gives the totals.
        let h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31))
    }

    /// `out[..8·NC] = Σ_j p[j] · v[j·row ..][..8·NC]`, two rows per iteration (independent sums).
    #[inline]
    #[target_feature(enable = "avx,avx2,fma")]
    unsafe fn weighted_rows<E: PanelElem, const NC: usize>(p: &[f32], v: *const E, row: usize, out: *mut f32) {
        let mut a = [_mm256_setzero_ps(); NC];
        let mut b = [_mm256_setzero_ps(); NC];
        let mut j = 0;
        while j + 2 <= p.len() {
            let (p0, p1) = (_mm256_set1_ps(p[j]), _mm256_set1_ps(p[j + 1]));
            let (r0, r1) = (v.add(j * row), v.add((j + 1) * row));
            for c in 0..NC {
                a[c] = _mm256_fmadd_ps(p0, E::load8(r0.add(8 * c)), a[c]);
                b[c] = _mm256_fmadd_ps(p1, E::load8(r1.add(8 * c)), b[c]);
            }
            j += 2;
        }
        if j < p.len() {
            let p0 = _mm256_set1_ps(p[j]);
            let r0 = v.add(j * row);
            for c in 0..NC {
                a[c] = _mm256_fmadd_ps(p0, E::load8(r0.add(8 * c)), a[c]);
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
    fn decode_attention_matches_a_reference() {
        if !has_avx2_fma() {
            return;
        }
        // Grouped heads (4 over 2), lengths around the eight-row blocks of the score loop.
        let (heads, kv_heads, d) = (4, 2, 16);
        let row = kv_heads * d;
        for valid in [1, 7, 8, 9, 16, 23, 40] {
            let (q, k, v) = (data(heads * d, 7), data(valid * row, 8), data(valid * row, 9));
            let scale = 0.25;
            let mut out = vec![0.0; heads * d];
            assert!(decode_attention(
                &q,
                Rows::F32(&k),
                Rows::F32(&v),
                (heads, kv_heads, d),
                valid,
                scale,
                &mut Vec::new(),
                &mut out
            ));
            // The heads of each KV head alone give the same bits.
            let dims = (heads, kv_heads, d);
            for g in 0..kv_heads {
                let (q, mut part) = (&q[g * 2 * d..(g + 1) * 2 * d], vec![0.0; 2 * d]);
                let (kr, vr) = (Rows::F32(&k), Rows::F32(&v));
                assert!(decode_attention_groups(
                    q,
                    kr,
                    vr,
                    dims,
                    g..g + 1,
                    valid,
                    (scale, None),
                    &mut Vec::new(),
                    &mut part
                ));
                assert_eq!(part, out[g * 2 * d..(g + 1) * 2 * d], "valid {valid}, kv head {g}");
            }
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let s: Vec<f64> = (0..valid)
                    .map(|j| (0..d).map(|c| q[h * d + c] as f64 * k[j * row + g * d + c] as f64).sum::<f64>() * 0.25)
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    let want: f64 = (0..valid).map(|j| e[j] / z * v[j * row + g * d + c] as f64).sum();
                    let got = out[h * d + c] as f64;
                    assert!((got - want).abs() < 1e-5, "valid {valid}, head {h}, column {c}: {got} vs {want}");
                }
            }
            // Keys and values stored as bf16 give exactly what f32 storage of the rounded values
            // gives (widening is exact and the arithmetic is the same).
            let half = |x: &[f32]| -> Vec<u16> { x.iter().map(|&x| f32_to_bf16(x)).collect() };
            let (kh, vh) = (half(&k), half(&v));
            let widen = |x: &[u16]| -> Vec<f32> { x.iter().map(|&h| bf16_to_f32(h)).collect() };
            let (kw, vw) = (widen(&kh), widen(&vh));
            let (mut a, mut b) = (vec![0.0; heads * d], vec![0.0; heads * d]);
            let (kr, vr) = (Rows::Bf16(&kh), Rows::Bf16(&vh));
            assert!(decode_attention(&q, kr, vr, dims, valid, scale, &mut Vec::new(), &mut a));
            assert!(decode_attention(&q, Rows::F32(&kw), Rows::F32(&vw), dims, valid, scale, &mut Vec::new(), &mut b));
            assert_eq!(a, b, "valid {valid}: bf16 storage");
            let mut g = Vec::new();
            kr.gather_f32(d, row, valid, d, &mut g);
            assert_eq!(g, (0..valid).flat_map(|j| kw[j * row + d..j * row + 2 * d].to_vec()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn packed_linear_matches_a_reference_and_is_batch_invariant() {
        if !has_avx2_fma() {
            return;
        }
        for (out, inp) in [(16, 8), (65, 128), (384, 128), (7, 3), (33, 512)] {
            // A transposed view (GPT-2's Conv1D layout) for some shapes, row-major for others.
            let conv1d = out % 2 == 1;
            let w = data(out * inp, 3);
            let at = |o: usize, i: usize| if conv1d { w[i * out + o] } else { w[o * inp + i] };
            let view = if conv1d { (0, 1, out) } else { (0, inp, 1) };
            let pw = PackedWeight::new(&w, view, out, inp);
            assert_eq!(pw.dims(), (out, inp));
            let bias = data(out, 4);
            for m in [1, 3, 4, 9] {
                let x = data(m * inp, 5 + m as u32);
                for b in [None, Some(&bias[..])] {
                    let y = packed_linear(&x, m, &pw, b, false).expect("AVX2");
                    for r in 0..m {
                        for o in 0..out {
                            let want: f64 = (0..inp).map(|i| x[r * inp + i] as f64 * at(o, i) as f64).sum::<f64>()
                                + b.map_or(0.0, |b| b[o] as f64);
                            let got = y[r * out + o] as f64;
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{out}x{inp} m={m}: {got} vs {want}"
                            );
                        }
                        // The same row alone gives the same bits, and so does the panel split.
                        let alone = packed_linear(&x[r * inp..(r + 1) * inp], 1, &pw, b, false).expect("AVX2");
                        assert_eq!(alone[..], y[r * out..(r + 1) * out]);
                    }
                    assert_eq!(packed_linear(&x, m, &pw, b, true).expect("AVX2"), y);
                }
            }
        }
    }

    /// bf16 panels compute exactly what f32 panels of the bf16-rounded weight compute (the same
    /// values, summed in the same order), and their rows (a tied embedding's lookup) are those
    /// rounded values; the rounding is to nearest, ties to even.
    #[test]
    fn bf16_panels_equal_f32_panels_of_the_rounded_weight() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0, "a tie rounds to the even neighbour");
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0, "a tie rounds up to even");
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.5 / 256.0)), 1.0 + 2.0 / 256.0, "above the tie rounds up");
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        if !has_avx2_fma() {
            return;
        }
        for (out, inp) in [(16, 8), (65, 128), (33, 512)] {
            let w = data(out * inp, 7);
            let rounded: Vec<f32> = w.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect();
            let half = PackedWeight::new(&w, (0, inp, 1), out, inp).to_bf16();
            let full = PackedWeight::new(&rounded, (0, inp, 1), out, inp);
            assert!(half.is_bf16() && !full.is_bf16());
            assert_eq!(half.bytes() * 2, full.bytes());
            let bias = data(out, 8);
            for m in [1, 3, 4, 9] {
                let x = data(m * inp, 9 + m as u32);
                for parallel in [false, true] {
                    assert_eq!(
                        packed_linear(&x, m, &half, Some(&bias), parallel),
                        packed_linear(&x, m, &full, Some(&bias), parallel),
                        "{out}x{inp} m={m}"
                    );
                }
            }
            let ids = [0u32, (out - 1) as u32, 5];
            assert_eq!(half.rows(&ids), full.rows(&ids));
            assert_eq!(half.rows(&ids).unwrap()[..inp], rounded[..inp]);
        }
    }

    /// f16 panels compute exactly what f32 panels of the f16-rounded weight compute, their
    /// rows are those rounded values, and they take half the bytes.
    #[test]
    fn f16_panels_equal_f32_panels_of_the_rounded_weight() {
        if !has_avx2_fma() || !has_f16c() {
            eprintln!("skipped: no AVX2/FMA/F16C");
            return;
        }
        for (out, inp) in [(16, 8), (65, 128), (33, 512)] {
            let w = data(out * inp, 11);
            let rounded: Vec<f32> = w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            let f16 = PackedWeight::new(&w, (0, inp, 1), out, inp).to_f16().expect("F16C");
            let full = PackedWeight::new(&rounded, (0, inp, 1), out, inp);
            assert_eq!((f16.dtype(), full.dtype()), (candle_core::DType::F16, candle_core::DType::F32));
            assert_eq!(f16.bytes() * 2, full.bytes());
            for m in [1, 4, 9] {
                let x = data(m * inp, 12 + m as u32);
                for parallel in [false, true] {
                    assert_eq!(
                        packed_linear(&x, m, &f16, None, parallel),
                        packed_linear(&x, m, &full, None, parallel),
                        "{out}x{inp} m={m}"
                    );
                }
            }
            let ids = [0u32, (out - 1) as u32, 5];
            assert_eq!(f16.rows(&ids), full.rows(&ids));
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
