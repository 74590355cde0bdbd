//! Fused CPU kernels with a hand-written backward pass, for training.
//!
//! candle's fused softmax and norms have no backward pass (candle issue 2168), and the
//! differentiable compositions of primitive ops are slow on CPU: each primitive allocates a
//! full tensor and the backward pass doubles the count. These kernels compute the forward in
//! one pass over the data and implement `bwd`, so autograd flows through them at the cost of
//! one fused op each way. They run on contiguous f32/f64 CPU tensors; [`crate::nn`] falls back
//! to the compositions on other devices and dtypes. `tests/ops.rs` checks values and gradients
//! against the compositions and against finite differences.

// Kernels take shapes, strides and buffers as separate arguments, as BLAS-style code does.
#![allow(clippy::too_many_arguments)]

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use num_traits::Float;

use super::simd::{exp_f32, sum8};
use super::threads::{kept_on_one_thread, linear_in_parallel};
use rayon::prelude::*;

/// Target id that the cross-entropy kernel skips (no loss, no gradient).
pub const IGNORE_INDEX: u32 = u32::MAX;

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the fused kernels on or off process-wide (on by default). Off, training runs the
/// differentiable compositions of candle primitives; tests use this to cross-check the two.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the fused kernels can run on `t` (enabled, CPU, f32 or f64).
pub fn supported(t: &Tensor) -> bool {
    supported_for(t.dtype(), t.device())
}

/// Whether the fused kernels can run on tensors of `dtype` on `device`.
pub fn supported_for(dtype: DType, device: &candle_core::Device) -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed) && device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// Numeric element types the kernels run on.
pub(crate) trait Elem:
    crate::kernels::gemm::GemmElem
    + WithDType
    + Float
    + Send
    + Sync
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
{
    fn erf(self) -> Self;
    /// tanh; f32 uses [`tanh_f32`], a rational approximation that vectorises (libm's
    /// `tanhf` is a function call per element and dominated GELU's cost).
    fn fast_tanh(self) -> Self;
    /// e^x; f32 uses [`super::simd::exp_f32`], which vectorises.
    fn fast_exp(self) -> Self;
}
impl Elem for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn fast_tanh(self) -> Self {
        tanh_f32(self)
    }
    fn fast_exp(self) -> Self {
        exp_f32(self)
    }
}
impl Elem for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn fast_tanh(self) -> Self {
        self.tanh()
    }
    fn fast_exp(self) -> Self {
        self.exp()
    }
}

/// tanh(x) for f32 as a 13/6-degree rational function on [-7.9, 7.9] (the approximation
/// Eigen uses for `ptanh`), branch-free so loops over it vectorise; error below 1e-6.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    const A1: f32 = 4.893_524_6e-3;
    const A3: f32 = 6.372_619e-4;
    const A5: f32 = 1.485_722_4e-5;
    const A7: f32 = 5.122_297e-8;
    const A9: f32 = -8.604_672e-11;
    const A11: f32 = 2.000_188e-13;
    const A13: f32 = -2.760_768_4e-16;
    const B0: f32 = 4.893_525e-3;
    const B2: f32 = 2.268_434_6e-3;
    const B4: f32 = 1.185_347_1e-4;
    const B6: f32 = 1.198_258_4e-6;
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = x2 * A13 + A11;
    p = x2 * p + A9;
    p = x2 * p + A7;
    p = x2 * p + A5;
    p = x2 * p + A3;
    p = x2 * p + A1;
    p *= x;
    let mut q = x2 * B6 + B4;
    q = x2 * q + B2;
    q = x2 * q + B0;
    p / q
}

fn c<T: Elem>(v: f64) -> T {
    T::from_f64(v)
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("fused op: input must be contiguous".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Runs `f` on the contiguous CPU data of `t`.
fn with_data<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(cpu) => f(slice::<T>(cpu, l)?),
        _ => candle_core::bail!("fused op: CPU tensors only"),
    }
}

fn new_tensor<T: WithDType>(v: Vec<T>, shape: &Shape, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), like.device())
}

/// Rows per parallel task: enough work per task to amortise scheduling.
fn chunk_rows(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            d => candle_core::bail!("fused op: unsupported dtype {d:?}"),
        }
    };
}

// ---------------------------------------------------------------- elementwise activations

/// Which activation an [`Act`] op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActKind {
    /// GELU with the tanh approximation.
    GeluTanh,
    /// Exact GELU.
    GeluErf,
    /// SiLU (x · sigmoid(x)).
    Silu,
}

/// A fused activation with its derivative.
#[derive(Debug, Clone, Copy)]
pub struct Act(pub ActKind);

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

#[inline(always)]
fn act_f<T: Elem>(k: ActKind, x: T) -> T {
    let half = c::<T>(0.5);
    match k {
        ActKind::GeluTanh => {
            half * x * (T::one() + (c::<T>(SQRT_2_OVER_PI) * (x + c::<T>(GELU_C) * x * x * x)).fast_tanh())
        }
        ActKind::GeluErf => half * x * (T::one() + (x * c::<T>(std::f64::consts::FRAC_1_SQRT_2)).erf()),
        ActKind::Silu => x / (T::one() + (-x).exp()),
    }
}

#[inline(always)]
fn act_df<T: Elem>(k: ActKind, x: T) -> T {
    let half = c::<T>(0.5);
    match k {
        ActKind::GeluTanh => {
            let t = (c::<T>(SQRT_2_OVER_PI) * (x + c::<T>(GELU_C) * x * x * x)).fast_tanh();
            half * (T::one() + t)
                + half * x * (T::one() - t * t) * c::<T>(SQRT_2_OVER_PI) * (T::one() + c::<T>(3.0 * GELU_C) * x * x)
        }
        ActKind::GeluErf => {
            let cdf = half * (T::one() + (x * c::<T>(std::f64::consts::FRAC_1_SQRT_2)).erf());
            let pdf = (-(x * x) * half).exp() * c::<T>(0.398_942_280_401_432_7);
            cdf + x * pdf
        }
        ActKind::Silu => {
            let s = T::one() / (T::one() + (-x).exp());
            s * (T::one() + x * (T::one() - s))
        }
    }
}

/// Runs `f` through [`crate::kernels::simd::dispatch`]: the AVX2 build of its loops where the CPU has
/// it. `f` and what it calls should be `#[inline(always)]` (see there).
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    crate::kernels::simd::dispatch(
        #[inline(always)]
        |_| f(),
    )
}

/// `f(y_chunk, x_chunk)` over matching `chunk`-sized pieces of `y` and `x`, in parallel, each in
/// the AVX2 build where available (mark `f` `#[inline(always)]`). A single chunk runs on the
/// calling thread (from outside the pool, a parallel iterator would hand it to a worker and
/// back), and so does everything inside [`super::threads::on_one_thread`].
fn par_zip<T: Elem>(y: &mut [T], x: &[T], chunk: usize, f: impl Fn(&mut [T], &[T]) + Sync) {
    if x.len() <= chunk || kept_on_one_thread() {
        wide(
            #[inline(always)]
            || f(y, x),
        )
    } else {
        y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(y, x)| {
            wide(
                #[inline(always)]
                || f(y, x),
            )
        });
    }
}

/// `y[i] = f(x[i])` in parallel chunks; `f` is monomorphic so the inner loop vectorises.
fn map1<T: Elem>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    par_zip(
        &mut y,
        x,
        16384,
        #[inline(always)]
        |y, x| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = f(x);
            }
        },
    );
    y
}

/// `y[i] = f(x[i], g[i])` in parallel chunks.
fn map2<T: Elem>(x: &[T], g: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(16384).zip(x.par_chunks(16384).zip(g.par_chunks(16384))).for_each(|(y, (x, g))| {
        wide(
            #[inline(always)]
            || {
                for ((y, &x), &g) in y.iter_mut().zip(x).zip(g) {
                    *y = f(x, g);
                }
            },
        )
    });
    y
}

// The activation kind is matched once, outside the loops.
fn act_fwd<T: Elem>(k: ActKind, x: &[T]) -> Vec<T> {
    match k {
        ActKind::GeluTanh => map1(x, |x| act_f(ActKind::GeluTanh, x)),
        ActKind::GeluErf => map1(x, |x| act_f(ActKind::GeluErf, x)),
        ActKind::Silu => map1(x, |x| act_f(ActKind::Silu, x)),
    }
}

fn act_bwd<T: Elem>(k: ActKind, x: &[T], g: &[T]) -> Vec<T> {
    match k {
        ActKind::GeluTanh => map2(x, g, |x, g| g * act_df(ActKind::GeluTanh, x)),
        ActKind::GeluErf => map2(x, g, |x, g| g * act_df(ActKind::GeluErf, x)),
        ActKind::Silu => map2(x, g, |x, g| g * act_df(ActKind::Silu, x)),
    }
}

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        "lmstack-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Elem>(k: ActKind, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(act_fwd(k, slice::<T>(s, l)?)))
        }
        let out = dispatch!(s.dtype(), go(self.0, s, l))?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        fn go<T: Elem>(k: ActKind, arg: &Tensor, grad: &Tensor) -> Result<Tensor> {
            let dx = with_data::<T, _>(arg, |x| with_data::<T, _>(grad, |g| Ok(act_bwd(k, x, g))))?;
            new_tensor(dx, arg.shape(), arg)
        }
        Ok(Some(dispatch!(arg.dtype(), go(self.0, arg, grad))?))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension with its backward pass.
#[derive(Debug, Clone, Copy)]
pub struct Softmax;

/// `f(y_row, x_row)` over every `d`-long row of `x` into a new vector, rows in parallel
/// chunks ([`par_zip`]; mark `f` `#[inline(always)]`).
fn map_rows<T: Elem>(x: &[T], d: usize, f: impl Fn(&mut [T], &[T]) + Sync) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    par_zip(
        &mut y,
        x,
        chunk_rows(d) * d,
        #[inline(always)]
        |y, x| y.chunks_mut(d).zip(x.chunks(d)).for_each(|(y, x)| f(y, x)),
    );
    y
}

fn softmax_rows<T: Elem>(x: &[T], d: usize) -> Vec<T> {
    map_rows(
        x,
        d,
        #[inline(always)]
        |y, x| {
            let max = x.iter().copied().fold(T::neg_infinity(), Float::max);
            let mut sum = T::zero();
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y;
            }
            let inv = T::one() / sum;
            y.iter_mut().for_each(|v| *v *= inv);
        },
    )
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lmstack-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.shape().dims().last().copied().unwrap_or(1);
        fn go<T: Elem>(s: &CpuStorage, l: &Layout, d: usize) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(softmax_rows(slice::<T>(s, l)?, d)))
        }
        Ok((dispatch!(s.dtype(), go(s, l, d))?, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.dims().last().copied().unwrap_or(1);
        fn go<T: Elem>(res: &Tensor, grad: &Tensor, d: usize) -> Result<Tensor> {
            let dx = with_data::<T, _>(res, |p| {
                with_data::<T, _>(grad, |g| {
                    let mut dx = vec![T::zero(); p.len()];
                    let rows = chunk_rows(d) * d;
                    dx.par_chunks_mut(rows).zip(p.par_chunks(rows).zip(g.par_chunks(rows))).for_each(|(dx, (p, g))| {
                        for ((dx, p), g) in dx.chunks_mut(d).zip(p.chunks(d)).zip(g.chunks(d)) {
                            let dot: T = p.iter().zip(g).map(|(&p, &g)| p * g).sum();
                            for ((dx, &p), &g) in dx.iter_mut().zip(p).zip(g) {
                                *dx = p * (g - dot);
                            }
                        }
                    });
                    Ok(dx)
                })
            })?;
            new_tensor(dx, res.shape(), res)
        }
        Ok(Some(dispatch!(arg.dtype(), go(res, grad, d))?))
    }
}

// ---------------------------------------------------------------- layer norm / rms norm

/// LayerNorm over the last dimension (`x`, `weight`, `bias`) with its backward pass.
#[derive(Debug, Clone, Copy)]
pub struct LayerNormOp {
    /// Epsilon added to the variance.
    pub eps: f64,
}

/// RMSNorm over the last dimension (`x`, `weight`) with its backward pass.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormOp {
    /// Epsilon added to the mean square.
    pub eps: f64,
}

/// Mean and reciprocal standard deviation of one row (`rms`: no centring).
#[inline(always)]
fn row_stats<T: Elem>(x: &[T], eps: f64, rms: bool) -> (T, T) {
    let n = c::<T>(x.len() as f64);
    let mean = if rms { T::zero() } else { sum8(x, |v| v) / n };
    let var = sum8(x, |v| (v - mean) * (v - mean)) / n;
    (mean, T::one() / (var + c::<T>(eps)).sqrt())
}

fn norm_fwd<T: Elem>(x: &[T], w: &[T], b: Option<&[T]>, eps: f64, rms: bool) -> Vec<T> {
    map_rows(
        x,
        w.len(),
        #[inline(always)]
        |y, x| {
            {
                let (mean, rstd) = row_stats(x, eps, rms);
                // Separate loops with and without a bias, so each vectorises.
                match b {
                    Some(b) => {
                        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                            *y = (x - mean) * rstd * w + b;
                        }
                    }
                    None => {
                        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                            *y = (x - mean) * rstd * w;
                        }
                    }
                }
            }
        },
    )
}

/// Returns `(dx, dw, db)`.
fn norm_bwd<T: Elem>(x: &[T], w: &[T], g: &[T], eps: f64, rms: bool) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = w.len();
    let mut dx = vec![T::zero(); x.len()];
    let rows = chunk_rows(d) * d;
    let (dw, db) = dx
        .par_chunks_mut(rows)
        .zip(x.par_chunks(rows).zip(g.par_chunks(rows)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![T::zero(); d];
            let mut db = vec![T::zero(); d];
            for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let (mean, rstd) = row_stats(x, eps, rms);
                let mut sum_dxhat = T::zero();
                let mut sum_dxhat_xhat = T::zero();
                for i in 0..d {
                    let xhat = (x[i] - mean) * rstd;
                    dw[i] += g[i] * xhat;
                    db[i] += g[i];
                    let dxhat = g[i] * w[i];
                    sum_dxhat += dxhat;
                    sum_dxhat_xhat += dxhat * xhat;
                }
                let n = c::<T>(d as f64);
                let (m1, m2) = (if rms { T::zero() } else { sum_dxhat / n }, sum_dxhat_xhat / n);
                for i in 0..d {
                    let xhat = (x[i] - mean) * rstd;
                    dx[i] = rstd * (g[i] * w[i] - m1 - xhat * m2);
                }
            }
            (dw, db)
        })
        .collect::<Vec<_>>()
        .into_iter()
        // Summed in chunk order, so gradients are bitwise reproducible whatever the threads do.
        .fold((vec![T::zero(); d], vec![T::zero(); d]), |(mut a, mut b), (c2, d2)| {
            a.iter_mut().zip(&c2).for_each(|(a, c)| *a += *c);
            b.iter_mut().zip(&d2).for_each(|(b, d)| *b += *d);
            (a, b)
        });
    (dx, dw, db)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "lmstack-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn go<T: Elem>(eps: f64, s: [(&CpuStorage, &Layout); 3]) -> Result<CpuStorage> {
            let (x, w, b) = (slice::<T>(s[0].0, s[0].1)?, slice::<T>(s[1].0, s[1].1)?, slice::<T>(s[2].0, s[2].1)?);
            Ok(T::to_cpu_storage_owned(norm_fwd(x, w, Some(b), eps, false)))
        }
        let out = dispatch!(s1.dtype(), go(self.eps, [(s1, l1), (s2, l2), (s3, l3)]))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn go<T: Elem>(eps: f64, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
            let (dx, dw, db) = with_data::<T, _>(x, |xs| {
                with_data::<T, _>(w, |ws| with_data::<T, _>(g, |gs| Ok(norm_bwd(xs, ws, gs, eps, false))))
            })?;
            Ok((new_tensor(dx, x.shape(), x)?, new_tensor(dw, w.shape(), w)?, new_tensor(db, w.shape(), w)?))
        }
        let (dx, dw, db) = dispatch!(x.dtype(), go(self.eps, x, w, grad))?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "lmstack-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Elem>(eps: f64, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(norm_fwd(slice::<T>(s1, l1)?, slice::<T>(s2, l2)?, None, eps, true)))
        }
        let out = dispatch!(s1.dtype(), go(self.eps, s1, l1, s2, l2))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn go<T: Elem>(eps: f64, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
            let (dx, dw, _) = with_data::<T, _>(x, |xs| {
                with_data::<T, _>(w, |ws| with_data::<T, _>(g, |gs| Ok(norm_bwd(xs, ws, gs, eps, true))))
            })?;
            Ok((new_tensor(dx, x.shape(), x)?, new_tensor(dw, w.shape(), w)?))
        }
        let (dx, dw) = dispatch!(x.dtype(), go(self.eps, x, w, grad))?;
        Ok((Some(dx), Some(dw)))
    }
}

// ---------------------------------------------------------------- cross-entropy

/// Per-row cross-entropy of logits `[n, vocab]` against targets `[n]` (u32); rows whose
/// target is [`IGNORE_INDEX`] get loss 0 and no gradient.
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropy;

fn check_targets(t: &[u32], v: usize) -> Result<()> {
    match t.iter().find(|&&t| t != IGNORE_INDEX && t as usize >= v) {
        Some(&bad) => candle_core::bail!("cross-entropy: target {bad} is outside the vocabulary of {v}"),
        None => Ok(()),
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "lmstack-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let targets = slice::<u32>(s2, l2)?;
        if targets.len() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len());
        }
        check_targets(targets, v)?;
        fn go<T: Elem>(x: &[T], t: &[u32], v: usize) -> Vec<T> {
            x.par_chunks(v)
                .zip(t.par_iter())
                .map(|(row, &t)| {
                    if t == IGNORE_INDEX {
                        return T::zero();
                    }
                    let max = row.iter().copied().fold(T::neg_infinity(), Float::max);
                    let lse = row.iter().map(|&x| (x - max).exp()).sum::<T>().ln() + max;
                    lse - row[t as usize]
                })
                .collect()
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(go(slice::<f32>(s1, l1)?, targets, v)),
            DType::F64 => CpuStorage::F64(go(slice::<f64>(s1, l1)?, targets, v)),
            d => candle_core::bail!("cross-entropy: unsupported dtype {d:?}"),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let v = logits.dim(1)?;
        fn go<T: Elem>(logits: &Tensor, targets: &Tensor, grad: &Tensor, v: usize) -> Result<Tensor> {
            let dx = with_data::<T, _>(logits, |x| {
                with_data::<u32, _>(targets, |t| {
                    with_data::<T, _>(grad, |g| {
                        let mut dx = vec![T::zero(); x.len()];
                        dx.par_chunks_mut(v).zip(x.par_chunks(v)).zip(t.par_iter().zip(g.par_iter())).for_each(
                            |((dx, row), (&t, &g))| {
                                if t == IGNORE_INDEX {
                                    return;
                                }
                                let max = row.iter().copied().fold(T::neg_infinity(), Float::max);
                                let mut sum = T::zero();
                                for (d, &x) in dx.iter_mut().zip(row) {
                                    *d = (x - max).exp();
                                    sum += *d;
                                }
                                let scale = g / sum;
                                dx.iter_mut().for_each(|d| *d *= scale);
                                dx[t as usize] -= g;
                            },
                        );
                        Ok(dx)
                    })
                })
            })?;
            new_tensor(dx, logits.shape(), logits)
        }
        Ok((Some(dispatch!(logits.dtype(), go(logits, targets, grad, v))?), None))
    }
}

/// Mean cross-entropy over the rows whose target is not [`IGNORE_INDEX`], and the number of
/// such rows. Differentiable with respect to `logits`; runs the fused kernel on CPU f32/f64 and
/// a gather-and-mask composition elsewhere.
///
/// # Shapes
/// `logits`: `[n, vocab]`, `targets`: `[n]` (u32) → scalar.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> crate::Result<(Tensor, usize)> {
    let (per_row, count) = token_nll(logits, targets)?;
    if count == 0 {
        return Err(crate::Error::invalid("targets", "every target is ignored; nothing to score"));
    }
    Ok(((per_row.sum_all()? / count as f64)?, count))
}

/// Each row's negative log-likelihood of its target, `logsumexp(row) − row[target]` (0 where
/// the target is [`IGNORE_INDEX`]), and the number of scored rows. Differentiable with respect
/// to `logits`, by the same kernels as [`cross_entropy`].
///
/// # Shapes
/// `logits`: `[n, vocab]`, `targets`: `[n]` (u32) → `[n]`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> crate::Result<(Tensor, usize)> {
    let tv = targets.to_vec1::<u32>()?;
    let count = tv.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let per_row = if supported(logits) {
        logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)?
    } else {
        let v = logits.dim(1)?;
        check_targets(&tv, v)?;
        let keep: Vec<f32> = tv.iter().map(|&t| if t == IGNORE_INDEX { 0.0 } else { 1.0 }).collect();
        let safe: Vec<u32> = tv.iter().map(|&t| if t == IGNORE_INDEX { 0 } else { t }).collect();
        let safe = Tensor::from_vec(safe, tv.len(), logits.device())?;
        let keep = Tensor::from_vec(keep, tv.len(), logits.device())?.to_dtype(logits.dtype())?;
        let lsm = candle_nn::ops::log_softmax(logits, 1)?;
        let picked = lsm.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
        (picked.neg()? * keep)?
    };
    Ok((per_row, count))
}

// ---------------------------------------------------------------- linear

/// `y = x Wᵀ (+ b)` for `x [n, in]` (contiguous rows), `W [out, in]` (any strides) and optional
/// `b [out]`, as one autograd node.
///
/// With `in_out`, the weight argument is `[in, out]`, as GPT-2's `Conv1D` stores it, and its
/// gradient comes out in that layout. Passing the stored tensor rather than a transposed view of
/// it keeps a transpose out of the graph, whose backward would hand candle a strided gradient
/// to copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinearOp {
    /// The weight argument is `[in, out]`.
    pub in_out: bool,
}

fn w_view(l: &Layout) -> Result<crate::kernels::gemm::View> {
    let s = l.stride();
    if s.len() != 2 {
        candle_core::bail!("linear: weight must be 2-D");
    }
    Ok(crate::kernels::gemm::View { off: l.start_offset(), rs: s[0], cs: s[1] })
}

fn linear_fwd<T: Elem>(
    x: &[T],
    w: &[T],
    wv: crate::kernels::gemm::View,
    b: Option<&[T]>,
    n: usize,
    i: usize,
    o: usize,
) -> Vec<T> {
    use crate::kernels::gemm::{matmul_new, matmul_par, View};
    let par = linear_in_parallel(n, i, o);
    let Some(b) = b else { return matmul_new(n, o, i, x, View::rows(0, i), w, wv.t(), T::one(), par) };
    // The bias rows, then the product added onto them (no zero-filled buffer first).
    let mut y = Vec::with_capacity(n * o);
    (0..n).for_each(|_| y.extend_from_slice(b));
    matmul_par(n, o, i, x, View::rows(0, i), w, wv.t(), &mut y, View::rows(0, o), true, T::one(), par);
    y
}

impl LinearOp {
    /// `(out, in)` of a weight argument of this shape.
    fn out_in(&self, shape: &Shape) -> Result<(usize, usize)> {
        let (r, c) = shape.dims2()?;
        Ok(if self.in_out { (c, r) } else { (r, c) })
    }

    /// The weight argument's view as `[out, in]`.
    fn logical(&self, v: crate::kernels::gemm::View) -> crate::kernels::gemm::View {
        if self.in_out {
            v.t()
        } else {
            v
        }
    }

    fn fwd_any(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xl.shape().dims();
        let i = *dims.last().unwrap_or(&0);
        let n = xl.shape().elem_count() / i.max(1);
        let (o, wi) = self.out_in(wl.shape())?;
        if wi != i {
            candle_core::bail!("linear: input has {i} features, the weight {wi}");
        }
        let wv = self.logical(w_view(wl)?);
        fn go<T: Elem>(
            xs: &CpuStorage,
            xl: &Layout,
            ws: &CpuStorage,
            wv: crate::kernels::gemm::View,
            b: Option<(&CpuStorage, &Layout)>,
            n: usize,
            i: usize,
            o: usize,
        ) -> Result<CpuStorage> {
            let x = slice::<T>(xs, xl)?;
            let w = ws.as_slice::<T>()?;
            let b = match b {
                Some((s, l)) => Some(slice::<T>(s, l)?),
                None => None,
            };
            Ok(T::to_cpu_storage_owned(linear_fwd(x, w, wv, b, n, i, o)))
        }
        let out = dispatch!(xs.dtype(), go(xs, xl, ws, wv, b, n, i, o))?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("non-empty") = o;
        Ok((out, Shape::from(shape)))
    }
}

/// Returns `(dx, dw, db)`, `dw` contiguous in the weight argument's shape.
/// The linear op's gradients: of the input, the weight and the bias, each only where that
/// tensor gets a gradient at all (a frozen weight — LoRA's base, a frozen layer — is not
/// tracked: its gradient, a matmul as large as the forward's, is not computed).
fn linear_bwd<T: Elem>(
    op: LinearOp,
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    use crate::kernels::gemm::{matmul_new, View};
    let (o, i) = op.out_in(w.shape())?;
    let n = x.elem_count() / i.max(1);
    let (want_dx, want_dw, want_db) = (x.track_op(), w.track_op(), bias.is_some_and(Tensor::track_op));
    // The weight is read through its own strides: no copy.
    let (wstore, wl) = w.storage_and_layout();
    let Storage::Cpu(wcpu) = &*wstore else { candle_core::bail!("fused op: CPU tensors only") };
    let ws = wcpu.as_slice::<T>()?;
    let wv = op.logical(w_view(wl)?);
    let (dx, dw, db) = with_data::<T, _>(x, |xs| {
        {
            with_data::<T, _>(g, |gs| {
                let par = n * o * i > 1 << 16 && rayon::current_thread_index().is_none();
                let dx = want_dx.then(|| matmul_new(n, i, o, gs, View::rows(0, o), ws, wv, T::one(), par));
                let dw = want_dw.then(|| {
                    if op.in_out {
                        matmul_new(i, o, n, xs, View::rows(0, i).t(), gs, View::rows(0, o), T::one(), par)
                    } else {
                        matmul_new(o, i, n, gs, View::rows(0, o).t(), xs, View::rows(0, i), T::one(), par)
                    }
                });
                let db = want_db.then(|| {
                    let mut db = vec![T::zero(); o];
                    for r in gs.chunks(o) {
                        db.iter_mut().zip(r).for_each(|(d, &v)| *d += v);
                    }
                    db
                });
                Ok((dx, dw, db))
            })
        }
    })?;
    drop(wstore);
    Ok((
        dx.map(|d| new_tensor(d, x.shape(), x)).transpose()?,
        dw.map(|d| new_tensor(d, w.shape(), w)).transpose()?,
        db.map(|d| new_tensor(d, &Shape::from(o), w)).transpose()?,
    ))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "lmstack-linear"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd_any(s1, l1, s2, l2, None)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = dispatch!(x.dtype(), linear_bwd(*self, x, w, g, None))?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "lmstack-linear-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd_any(s1, l1, s2, l2, Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        dispatch!(x.dtype(), linear_bwd(*self, x, w, g, Some(b)))
    }
}

// ---------------------------------------------------------------- attention

/// A 4-D `[batch, time, heads, head_dim]` view into a slice (last dimension contiguous).
#[derive(Debug, Clone, Copy)]
struct Heads {
    off: usize,
    sb: usize,
    st: usize,
    sh: usize,
}

impl Heads {
    fn of(l: &Layout) -> Result<Self> {
        let s = l.stride();
        if s.len() != 4 || s[3] != 1 {
            candle_core::bail!("attention: expected a [b, t, heads, d] input with a contiguous last dimension");
        }
        Ok(Self { off: l.start_offset(), sb: s[0], st: s[1], sh: s[2] })
    }
    fn at(&self, b: usize, h: usize) -> crate::kernels::gemm::View {
        crate::kernels::gemm::View::rows(self.off + b * self.sb + h * self.sh, self.st)
    }
}

/// Sizes and options of an attention call.
#[derive(Debug, Clone)]
struct AttnSpec {
    b: usize,
    t: usize,
    h: usize,
    kvh: usize,
    d: usize,
    causal: bool,
    scale: f64,
    /// `[b * t]`, 0 where the key is padding.
    key_mask: Option<Arc<Vec<u8>>>,
    /// Independent sequences packed along `t` (padding-free batches): `(row, start, len)`,
    /// each attending only within itself; `None`: each row is one sequence. Tokens outside
    /// every segment get a zero output.
    segments: Option<Arc<Vec<(usize, usize, usize)>>>,
    /// Sliding window: a causal query sees only itself and the `window - 1` keys before it.
    window: Option<usize>,
    /// Soft cap (Gemma 2): scores become `cap · tanh(scores / cap)` before the softmax.
    softcap: Option<f64>,
}

use std::sync::Arc;

/// `v` moved down `rows` rows.
fn down(v: crate::kernels::gemm::View, rows: usize) -> crate::kernels::gemm::View {
    crate::kernels::gemm::View { off: v.off + rows * v.rs, ..v }
}

impl AttnSpec {
    /// Whole rows, every earlier key (no segments, window or soft cap).
    fn new(
        (b, t, h, kvh, d): (usize, usize, usize, usize, usize),
        causal: bool,
        scale: f64,
        key_mask: Option<Vec<u8>>,
    ) -> Self {
        let key_mask = key_mask.map(Arc::new);
        Self { b, t, h, kvh, d, causal, scale, key_mask, segments: None, window: None, softcap: None }
    }

    /// The sequences attention runs over: `(row, start, len)`.
    fn seqs(&self) -> Vec<(usize, usize, usize)> {
        match &self.segments {
            Some(s) => s.as_ref().clone(),
            None => (0..self.b).map(|b| (b, 0, self.t)).collect(),
        }
    }

    /// Scores `S = scale · Q Kᵀ` for one head of the sequence `(b, start, n)` (`qv`, `kv`
    /// at its first token), soft-capped, masked, then softmax in place into `p` (`n × n`); rows
    /// with no visible key become all zeros. With a soft cap, `capped` (when given) receives
    /// the capped scores divided by the cap (`tanh` of them), for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn probs<T: Elem>(
        &self,
        q: &[T],
        qv: crate::kernels::gemm::View,
        k: &[T],
        kv: crate::kernels::gemm::View,
        (b, start, n): (usize, usize, usize),
        p: &mut [T],
        mut capped: Option<&mut [T]>,
    ) {
        let t = self.t;
        crate::kernels::gemm::matmul(
            n,
            n,
            self.d,
            q,
            qv,
            k,
            kv.t(),
            p,
            crate::kernels::gemm::View::rows(0, n),
            false,
            c::<T>(self.scale),
        );
        let key_mask = self.key_mask.as_ref().map(|m| &m[b * t + start..b * t + start + n]);
        wide(
            #[inline(always)]
            || {
                for i in 0..n {
                    let row = &mut p[i * n..(i + 1) * n];
                    // Visible keys: a causal row sees 0..=i, within a window only its last
                    // `window`; padded keys are then zeroed after the exp.
                    let visible = if self.causal { i + 1 } else { n };
                    let first = match self.window {
                        Some(w) if self.causal => visible.saturating_sub(w),
                        _ => 0,
                    };
                    let keys = |j: usize| key_mask.is_none_or(|m| m[j] != 0);
                    if let Some(cap) = self.softcap {
                        let (cap, inv) = (c::<T>(cap), c::<T>(1.0 / cap));
                        for s in row[first..visible].iter_mut() {
                            *s = (*s * inv).fast_tanh();
                        }
                        if let Some(out) = capped.as_deref_mut() {
                            out[i * n..(i + 1) * n].copy_from_slice(row);
                        }
                        row[first..visible].iter_mut().for_each(|s| *s *= cap);
                    }
                    let mut max = T::neg_infinity();
                    for (j, &s) in row[..visible].iter().enumerate().skip(first) {
                        if s > max && keys(j) {
                            max = s;
                        }
                    }
                    if max == T::neg_infinity() {
                        row.iter_mut().for_each(|s| *s = T::zero());
                        continue;
                    }
                    for s in row[first..visible].iter_mut() {
                        *s = (*s - max).fast_exp();
                    }
                    row[..first].iter_mut().for_each(|s| *s = T::zero());
                    row[visible..].iter_mut().for_each(|s| *s = T::zero());
                    if let Some(m) = key_mask {
                        for (j, s) in row[..visible].iter_mut().enumerate() {
                            if m[j] == 0 {
                                *s = T::zero();
                            }
                        }
                    }
                    let sum = sum8(&row[first..visible], |v| v);
                    let inv = T::one() / sum;
                    row[first..visible].iter_mut().for_each(|s| *s *= inv);
                }
            },
        );
    }

    /// Output `[b, t, h * d]`.
    fn forward<T: Elem>(&self, q: &[T], ql: Heads, k: &[T], kl: Heads, v: &[T], vl: Heads) -> Vec<T> {
        let (t, d, h) = (self.t, self.d, self.h);
        let rep = h / self.kvh;
        let seqs = self.seqs();
        let blocks: Vec<Vec<T>> = (0..seqs.len() * h)
            .into_par_iter()
            .map(|sh| {
                let ((b, start, n), hh) = (seqs[sh / h], sh % h);
                let mut p = vec![T::zero(); n * n];
                let (qv, kv) = (down(ql.at(b, hh), start), down(kl.at(b, hh / rep), start));
                self.probs(q, qv, k, kv, (b, start, n), &mut p, None);
                let mut o = vec![T::zero(); n * d];
                crate::kernels::gemm::matmul(
                    n,
                    d,
                    n,
                    &p,
                    crate::kernels::gemm::View::rows(0, n),
                    v,
                    down(vl.at(b, hh / rep), start),
                    &mut o,
                    crate::kernels::gemm::View::rows(0, d),
                    false,
                    T::one(),
                );
                o
            })
            .collect();
        let mut out = vec![T::zero(); self.b * t * h * d];
        for (sh, o) in blocks.iter().enumerate() {
            let ((b, start, n), hh) = (seqs[sh / h], sh % h);
            for i in 0..n {
                let dst = ((b * t + start + i) * h + hh) * d;
                out[dst..dst + d].copy_from_slice(&o[i * d..(i + 1) * d]);
            }
        }
        out
    }

    /// Gradients `(dq [b,t,h,d], dk [b,t,kvh,d], dv [b,t,kvh,d])`, contiguous.
    #[allow(clippy::type_complexity)]
    fn backward<T: Elem>(
        &self,
        q: &[T],
        ql: Heads,
        k: &[T],
        kl: Heads,
        v: &[T],
        vl: Heads,
        dout: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        use crate::kernels::gemm::{matmul, View};
        let (t, d, h, kvh) = (self.t, self.d, self.h, self.kvh);
        let rep = h / kvh;
        let scale = c::<T>(self.scale);
        let seqs = self.seqs();
        let groups: Vec<(Vec<Vec<T>>, Vec<T>, Vec<T>)> = (0..seqs.len() * kvh)
            .into_par_iter()
            .map(|sg| {
                let ((b, start, n), g) = (seqs[sg / kvh], sg % kvh);
                let (kv_k, kv_v) = (down(kl.at(b, g), start), down(vl.at(b, g), start));
                let mut dk = vec![T::zero(); n * d];
                let mut dv = vec![T::zero(); n * d];
                let mut dqs = Vec::with_capacity(rep);
                let mut p = vec![T::zero(); n * n];
                let mut dp = vec![T::zero(); n * n];
                let mut tanh = vec![T::zero(); if self.softcap.is_some() { n * n } else { 0 }];
                for r in 0..rep {
                    let hh = g * rep + r;
                    let qv = down(ql.at(b, hh), start);
                    let capped = self.softcap.map(|_| tanh.as_mut_slice());
                    self.probs(q, qv, k, kv_k, (b, start, n), &mut p, capped);
                    let dov = View::rows(((b * t + start) * h + hh) * d, h * d);
                    // dV += Pᵀ dO ; dP = dO Vᵀ
                    matmul(n, d, n, &p, View::rows(0, n).t(), dout, dov, &mut dv, View::rows(0, d), true, T::one());
                    matmul(n, n, d, dout, dov, v, kv_v.t(), &mut dp, View::rows(0, n), false, T::one());
                    // dS = P ⊙ (dP − rowsum(dP ⊙ P)); through a soft cap, times 1 − tanh²
                    // (masked entries have P = 0, so whatever `tanh` holds there is unused).
                    for i in 0..n {
                        let (pr, dr) = (&p[i * n..(i + 1) * n], &mut dp[i * n..(i + 1) * n]);
                        let dot: T = pr.iter().zip(dr.iter()).map(|(&a, &b)| a * b).sum();
                        for (dv_, &pv) in dr.iter_mut().zip(pr) {
                            *dv_ = pv * (*dv_ - dot);
                        }
                        if self.softcap.is_some() {
                            for (dv_, &th) in dr.iter_mut().zip(&tanh[i * n..(i + 1) * n]) {
                                *dv_ *= T::one() - th * th;
                            }
                        }
                    }
                    // dQ = scale · dS K ; dK += scale · dSᵀ Q
                    let mut dq = vec![T::zero(); n * d];
                    matmul(n, d, n, &dp, View::rows(0, n), k, kv_k, &mut dq, View::rows(0, d), false, scale);
                    matmul(n, d, n, &dp, View::rows(0, n).t(), q, qv, &mut dk, View::rows(0, d), true, scale);
                    dqs.push(dq);
                }
                (dqs, dk, dv)
            })
            .collect();
        let mut dq = vec![T::zero(); self.b * t * h * d];
        let mut dk = vec![T::zero(); self.b * t * kvh * d];
        let mut dv = vec![T::zero(); self.b * t * kvh * d];
        for (sg, (dqs, gk, gv)) in groups.iter().enumerate() {
            let ((b, start, n), g) = (seqs[sg / kvh], sg % kvh);
            for i in 0..n {
                let row = b * t + start + i;
                let kd = (row * kvh + g) * d;
                dk[kd..kd + d].copy_from_slice(&gk[i * d..(i + 1) * d]);
                dv[kd..kd + d].copy_from_slice(&gv[i * d..(i + 1) * d]);
                for (r, gq) in dqs.iter().enumerate() {
                    let qd = (row * h + g * rep + r) * d;
                    dq[qd..qd + d].copy_from_slice(&gq[i * d..(i + 1) * d]);
                }
            }
        }
        (dq, dk, dv)
    }
}

/// Fused scaled dot-product attention over `q [b,t,h,d]`, `k`, `v` `[b,t,kvh,d]` (grouped
/// heads), causal and/or with a key padding mask; output `[b, t, h·d]`. Backward recomputes
/// the probabilities instead of storing them.
#[derive(Debug, Clone)]
pub struct Attention {
    spec: AttnSpec,
}

impl Attention {
    /// An attention op; `key_mask` is `[b·t]` with 0 for padded keys.
    pub fn new(
        b: usize,
        t: usize,
        h: usize,
        kvh: usize,
        d: usize,
        causal: bool,
        scale: f64,
        key_mask: Option<Vec<u8>>,
    ) -> Self {
        Self { spec: AttnSpec::new((b, t, h, kvh, d), causal, scale, key_mask) }
    }

    /// Attention within each of the sequences packed along `t` (`(row, start, len)`; see
    /// [`crate::nn::Segments`]) instead of within each row.
    pub fn with_segments(mut self, segments: Option<Arc<Vec<(usize, usize, usize)>>>) -> Self {
        self.spec.segments = segments;
        self
    }

    /// Sliding-window attention (see [`crate::nn::attention`]); `None`: every earlier key.
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.spec.window = window;
        self
    }

    /// Soft-capped scores (see [`crate::nn::Scores`]); `None`: plain.
    pub fn with_softcap(mut self, softcap: Option<f64>) -> Self {
        self.spec.softcap = softcap;
        self
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "lmstack-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let sp = &self.spec;
        fn go<T: Elem>(sp: &AttnSpec, s: [(&CpuStorage, &Layout); 3]) -> Result<CpuStorage> {
            // Whole storages: the head views carry each layout's offset and strides.
            let (q, k, v) = (s[0].0.as_slice::<T>()?, s[1].0.as_slice::<T>()?, s[2].0.as_slice::<T>()?);
            let out = sp.forward(q, Heads::of(s[0].1)?, k, Heads::of(s[1].1)?, v, Heads::of(s[2].1)?);
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = dispatch!(s1.dtype(), go(sp, [(s1, l1), (s2, l2), (s3, l3)]))?;
        Ok((out, Shape::from((sp.b, sp.t, sp.h * sp.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn go<T: Elem>(
            sp: &AttnSpec,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            g: &Tensor,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
            let (dq, dk, dv) = with_data::<T, _>(&q, |qs| {
                with_data::<T, _>(&k, |ks| {
                    with_data::<T, _>(&v, |vs| {
                        with_data::<T, _>(g, |gs| {
                            let hq = Heads { off: 0, sb: sp.t * sp.h * sp.d, st: sp.h * sp.d, sh: sp.d };
                            let hk = Heads { off: 0, sb: sp.t * sp.kvh * sp.d, st: sp.kvh * sp.d, sh: sp.d };
                            Ok(sp.backward(qs, hq, ks, hk, vs, hk, gs))
                        })
                    })
                })
            })?;
            Ok((new_tensor(dq, q.shape(), &q)?, new_tensor(dk, k.shape(), &k)?, new_tensor(dv, v.shape(), &v)?))
        }
        let (dq, dk, dv) = dispatch!(q.dtype(), go(&self.spec, q, k, v, grad))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Fused attention over GPT-2's packed projection `qkv [b, t, 3·h·d]` (q, k, v side by side),
/// returning `[b, t, h·d]`; the backward pass returns the gradient of `qkv` in one piece.
#[derive(Debug, Clone)]
pub struct AttentionQkv {
    spec: AttnSpec,
}

impl AttentionQkv {
    /// An attention op over packed projections; `key_mask` as in [`Attention::new`].
    pub fn new(b: usize, t: usize, h: usize, d: usize, causal: bool, scale: f64, key_mask: Option<Vec<u8>>) -> Self {
        Self { spec: AttnSpec::new((b, t, h, h, d), causal, scale, key_mask) }
    }

    /// As [`Attention::with_segments`].
    pub fn with_segments(mut self, segments: Option<Arc<Vec<(usize, usize, usize)>>>) -> Self {
        self.spec.segments = segments;
        self
    }

    fn views(&self, off: usize) -> [Heads; 3] {
        let sp = &self.spec;
        let w = 3 * sp.h * sp.d;
        let hv = |i: usize| Heads { off: off + i * sp.h * sp.d, sb: sp.t * w, st: w, sh: sp.d };
        [hv(0), hv(1), hv(2)]
    }
}

impl CustomOp1 for AttentionQkv {
    fn name(&self) -> &'static str {
        "lmstack-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if !l.is_contiguous() {
            candle_core::bail!("attention: qkv must be contiguous");
        }
        let [hq, hk, hv] = self.views(l.start_offset());
        fn go<T: Elem>(sp: &AttnSpec, s: &CpuStorage, h: [Heads; 3]) -> Result<CpuStorage> {
            let x = s.as_slice::<T>()?;
            Ok(T::to_cpu_storage_owned(sp.forward(x, h[0], x, h[1], x, h[2])))
        }
        let out = dispatch!(s.dtype(), go(&self.spec, s, [hq, hk, hv]))?;
        let sp = &self.spec;
        Ok((out, Shape::from((sp.b, sp.t, sp.h * sp.d))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        fn go<T: Elem>(op: &AttentionQkv, qkv: &Tensor, g: &Tensor) -> Result<Tensor> {
            let sp = &op.spec;
            let [hq, hk, hv] = op.views(0);
            let out = with_data::<T, _>(qkv, |x| {
                with_data::<T, _>(g, |gs| {
                    let (dq, dk, dv) = sp.backward(x, hq, x, hk, x, hv, gs);
                    let hd = sp.h * sp.d;
                    let mut out = vec![T::zero(); sp.b * sp.t * 3 * hd];
                    for row in 0..sp.b * sp.t {
                        let o = row * 3 * hd;
                        out[o..o + hd].copy_from_slice(&dq[row * hd..(row + 1) * hd]);
                        out[o + hd..o + 2 * hd].copy_from_slice(&dk[row * hd..(row + 1) * hd]);
                        out[o + 2 * hd..o + 3 * hd].copy_from_slice(&dv[row * hd..(row + 1) * hd]);
                    }
                    Ok(out)
                })
            })?;
            new_tensor(out, qkv.shape(), qkv)
        }
        Ok(Some(dispatch!(qkv.dtype(), go(self, qkv, grad))?))
    }
}
