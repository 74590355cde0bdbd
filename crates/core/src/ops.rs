//! Fused CPU kernels with a hand-written backward pass, for training.
//!
//! candle's fused softmax and norms have no backward pass (candle issue 2168), and the
//! differentiable compositions of primitive ops are slow on CPU: each primitive allocates a
//! full tensor and the backward pass doubles the count. These kernels compute the forward in
//! one pass over the data and implement `bwd`, so autograd flows through them at the cost of
//! one fused op each way. They run on contiguous f32/f64 CPU tensors; [`crate::nn`] falls back
//! to the compositions on other devices and dtypes. `tests/ops.rs` checks values and gradients
//! against the compositions and against finite differences.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use num_traits::Float;
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
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
        && t.device().is_cpu()
        && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Numeric element types the kernels run on.
trait Elem:
    WithDType + Float + Send + Sync + std::iter::Sum + std::ops::AddAssign + std::ops::SubAssign + std::ops::MulAssign
{
    fn erf(self) -> Self;
    /// tanh; f32 uses `1 - 2 / (1 + e^{2x})`, several times faster than libm's `tanhf` and
    /// accurate to a few ULP of 1, which is what GELU needs.
    fn fast_tanh(self) -> Self;
}
impl Elem for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn fast_tanh(self) -> Self {
        1.0 - 2.0 / (1.0 + (2.0 * self.clamp(-20.0, 20.0)).exp())
    }
}
impl Elem for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn fast_tanh(self) -> Self {
        self.tanh()
    }
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

fn act_fwd<T: Elem>(k: ActKind, x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(y, x)| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = act_f(k, x);
        }
    });
    y
}

fn act_bwd<T: Elem>(k: ActKind, x: &[T], g: &[T]) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(16384).zip(x.par_chunks(16384).zip(g.par_chunks(16384))).for_each(|(dx, (x, g))| {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            *dx = g * act_df(k, x);
        }
    });
    dx
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

fn softmax_rows<T: Elem>(x: &[T], d: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    let rows = chunk_rows(d) * d;
    y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(y, x)| {
        for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
            let max = x.iter().copied().fold(T::neg_infinity(), Float::max);
            let mut sum = T::zero();
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y;
            }
            let inv = T::one() / sum;
            y.iter_mut().for_each(|v| *v *= inv);
        }
    });
    y
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
fn row_stats<T: Elem>(x: &[T], eps: f64, rms: bool) -> (T, T) {
    let n = c::<T>(x.len() as f64);
    let mean = if rms { T::zero() } else { x.iter().copied().sum::<T>() / n };
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
    (mean, T::one() / (var + c::<T>(eps)).sqrt())
}

fn norm_fwd<T: Elem>(x: &[T], w: &[T], b: Option<&[T]>, eps: f64, rms: bool) -> Vec<T> {
    let d = w.len();
    let mut y = vec![T::zero(); x.len()];
    let rows = chunk_rows(d) * d;
    y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(y, x)| {
        for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
            let (mean, rstd) = row_stats(x, eps, rms);
            for i in 0..d {
                let v = (x[i] - mean) * rstd * w[i];
                y[i] = match b {
                    Some(b) => v + b[i],
                    None => v,
                };
            }
        }
    });
    y
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
    let tv = targets.to_vec1::<u32>()?;
    let count = tv.iter().filter(|&&t| t != IGNORE_INDEX).count();
    if count == 0 {
        return Err(crate::Error::invalid("targets", "every target is ignored; nothing to score"));
    }
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
    Ok(((per_row.sum_all()? / count as f64)?, count))
}
