//! Gradient control candle lacks: a no-grad scope (`torch.no_grad`) and activation
//! checkpointing (`torch.utils.checkpoint`).
//!
//! candle builds a graph whenever an operand is a variable; it has no switch to stop that, and
//! no way to drop a block's intermediate activations after its forward and recompute them in
//! the backward pass. Finetuning a real model on a small machine needs both: evaluation should
//! build no graph, and a transformer's activations kept for backward (megabytes per token)
//! dominate its memory.
//!
//! - [`no_grad`] runs a closure with gradients off on this thread. Code that holds variables
//!   it does not own as model parameters (lmstack's LoRA adapters) reads them as constants when
//!   [`enabled`] is false. Tensors that are not variables never build a graph anyway.
//! - [`checkpoint`] runs a function (a transformer block, one chunk of the loss) under
//!   [`no_grad`] and records one graph node in its place, holding only the input. In the
//!   backward pass the node reruns the function with gradients on, backpropagates through it,
//!   hands the input's gradient on and adds the variables' gradients to the enclosing
//!   [`backward`] call's store. Only [`backward`] can collect them: a plain `loss.backward()`
//!   through a checkpoint is refused rather than silently losing gradients.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId, Var};

use crate::Result;

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
    /// Inside a [`checkpoint`]'s first forward (whose values the rerun must reproduce).
    static CHECKPOINTED: Cell<bool> = const { Cell::new(false) };
    /// One sink per [`backward`] in progress on this thread, innermost last: a thread waiting
    /// inside one (a rayon join in a kernel) may run another task's whole backward pass.
    static SINKS: RefCell<Vec<Sink>> = const { RefCell::new(Vec::new()) };
}

/// Where checkpointed blocks' backward passes put their variables' gradients.
struct Sink {
    vars: Vec<Tensor>,
    grads: HashMap<TensorId, Tensor>,
}

/// Whether this thread is in the first forward of a [`checkpoint`]: gradients are off, but
/// the values must be those the rerun (with gradients) computes, so layers with a fast
/// approximate path for inference (quantized products that round activations to 8 bits)
/// take their exact one.
pub fn in_checkpointed_forward() -> bool {
    CHECKPOINTED.with(Cell::get)
}

/// Whether gradients are on for this thread (false inside [`no_grad`]).
pub fn enabled() -> bool {
    !NO_GRAD.with(Cell::get)
}

/// Runs `f` with gradients off on this thread (restored afterwards, also on a panic).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    set_enabled_in(false, f)
}

/// Runs `f` with gradients on on this thread, outside any checkpointed forward (both restored
/// afterwards). A task that builds a graph and may run on a rayon worker starts with it: a
/// worker waiting inside another task's [`no_grad`] scope (a checkpointed forward) can pick
/// it up, and would otherwise build nothing.
pub fn with_grad<R>(f: impl FnOnce() -> R) -> R {
    with_flag(&CHECKPOINTED, false, || set_enabled_in(true, f))
}

fn set_enabled_in<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_flag(&NO_GRAD, !on, f)
}

/// Runs `f` with this thread's `flag` set to `value`, restored afterwards (also on a panic).
pub(crate) fn with_flag<R>(flag: &'static std::thread::LocalKey<Cell<bool>>, value: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(&'static std::thread::LocalKey<Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(flag, flag.with(|c| c.replace(value)));
    f()
}

/// Backpropagates from the scalar `loss` and returns the gradients, including those that
/// checkpointed blocks ([`checkpoint`]) computed for `vars` while rerunning.
pub fn backward(loss: &Tensor, vars: &[Tensor]) -> Result<GradStore> {
    struct Pop(usize);
    impl Drop for Pop {
        fn drop(&mut self) {
            SINKS.with(|s| s.borrow_mut().truncate(self.0));
        }
    }
    let depth = SINKS.with(|s| {
        let mut s = s.borrow_mut();
        s.push(Sink { vars: vars.to_vec(), grads: HashMap::new() });
        s.len() - 1
    });
    let _pop = Pop(depth);
    let mut grads = with_grad(|| loss.backward())?;
    let mut extra = SINKS.with(|s| std::mem::take(&mut s.borrow_mut()[depth].grads));
    for v in vars {
        if let Some(g) = extra.remove(&v.id()) {
            let total = match grads.get(v) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(v, total);
        }
    }
    Ok(grads)
}

/// A function of one tensor that [`checkpoint`] can rerun.
pub type BlockFn = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// `f(x)` without keeping `f`'s intermediate activations for the backward pass: they are
/// recomputed there (see the module's description). With gradients off ([`no_grad`]) it is
/// simply `f(x)`. An `x` that is not part of a graph (a frozen embedding's output) is made a
/// leaf so the node is reached by the backward pass; its own gradient is discarded.
///
/// `f` must compute the same function when rerun (dropout masks drawn from a seed, not a
/// running generator), must not depend on gradients being on, and `x` must be f32 or f64 on
/// the CPU.
///
/// # Shapes
/// Whatever `f` maps `x` to.
pub fn checkpoint(x: &Tensor, f: BlockFn) -> Result<Tensor> {
    if !enabled() {
        return Ok(f(x)?);
    }
    let x = if x.track_op() { x.contiguous()? } else { Var::from_tensor(&x.contiguous()?)?.as_tensor().clone() };
    Ok(x.apply_op1(Checkpoint(f))?)
}

struct Checkpoint(BlockFn);

/// `t`'s values as a CPU storage (for a custom op's output).
pub(crate) fn storage_of(t: &Tensor) -> candle_core::Result<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        candle_core::DType::F32 => CpuStorage::F32(t.to_vec1()?),
        candle_core::DType::F64 => CpuStorage::F64(t.to_vec1()?),
        d => candle_core::bail!("checkpoint: unsupported dtype {d:?}"),
    })
}

/// A custom op's (contiguous, f32 or f64) input as a tensor of its own (a copy).
pub(crate) fn tensor_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("custom op: input must be contiguous".into()))?;
    let dev = candle_core::Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        _ => candle_core::bail!("custom op: unsupported dtype {:?}", s.dtype()),
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "lmstack-checkpoint"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = tensor_of(s, l)?;
        let y = with_flag(&CHECKPOINTED, true, || no_grad(|| (self.0)(&x)))?;
        Ok((storage_of(&y)?, y.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if SINKS.with(|s| s.borrow().is_empty()) {
            candle_core::bail!(
                "a checkpointed block was reached by a backward pass outside lmstack_core::grad::backward; \
                 its variables' gradients would be lost"
            );
        }
        let x = Var::from_tensor(&arg.detach())?;
        let y = (self.0)(x.as_tensor())?;
        let s = (y * grad_res)?.sum_all()?;
        let inner = s.backward()?;
        SINKS.with(|s| -> candle_core::Result<()> {
            let mut s = s.borrow_mut();
            let sink = s.last_mut().expect("checked above");
            for v in &sink.vars {
                if let Some(g) = inner.get(v) {
                    let total = match sink.grads.remove(&v.id()) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    sink.grads.insert(v.id(), total);
                }
            }
            Ok(())
        })?;
        Ok(inner.get(x.as_tensor()).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn mlp(w1: &Var, w2: &Var) -> BlockFn {
        let (w1, w2) = (w1.as_tensor().clone(), w2.as_tensor().clone());
        Arc::new(move |x: &Tensor| {
            // Variables read as constants with gradients off, as lmstack's adapters do.
            let (w1, w2) = if enabled() { (w1.clone(), w2.clone()) } else { (w1.detach(), w2.detach()) };
            let h = x.matmul(&w1.t()?)?.tanh()?;
            x + h.matmul(&w2.t()?)?
        })
    }

    #[test]
    fn checkpointed_blocks_give_the_gradients_of_the_plain_graph() -> Result<()> {
        let dev = Device::Cpu;
        let vars: Vec<Var> = (0..4)
            .map(|i| {
                Var::from_tensor(&(Tensor::randn(0f32, 0.5, (6, 6), &dev).unwrap() * (1.0 + i as f64 * 0.1)).unwrap())
            })
            .collect::<candle_core::Result<_>>()?;
        let head = Var::from_tensor(&Tensor::randn(0f32, 0.5, (3, 6), &dev)?)?;
        let x = Tensor::randn(0f32, 1.0, (5, 6), &dev)?;
        let run = |ckpt: bool| -> Result<(f32, GradStore)> {
            let mut h = x.clone();
            for pair in vars.chunks(2) {
                let f = mlp(&pair[0], &pair[1]);
                h = if ckpt { checkpoint(&h, f)? } else { f(&h)? };
            }
            let loss = h.matmul(&head.as_tensor().t()?)?.sqr()?.mean_all()?;
            let all: Vec<Tensor> = vars.iter().chain([&head]).map(|v| v.as_tensor().clone()).collect();
            let g = backward(&loss, &all)?;
            Ok((loss.to_scalar()?, g))
        };
        let (l0, g0) = run(false)?;
        let (l1, g1) = run(true)?;
        assert!((l0 - l1).abs() < 1e-6);
        for v in vars.iter().chain([&head]) {
            let a = g0.get(v.as_tensor()).expect("plain gradient");
            let b = g1.get(v.as_tensor()).expect("checkpointed gradient");
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let size = a.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(size > 0.0 && diff <= 1e-5 * size.max(1.0), "diff {diff} of {size}");
        }
        Ok(())
    }

    #[test]
    fn a_plain_backward_through_a_checkpoint_is_refused() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones((2, 2), DType::F32, &dev)?)?;
        let w2 = Var::from_tensor(&Tensor::ones((2, 2), DType::F32, &dev)?)?;
        let y = checkpoint(&Tensor::ones((1, 2), DType::F32, &dev)?, mlp(&w, &w2))?;
        let err = y.sum_all()?.backward().unwrap_err().to_string();
        assert!(err.contains("outside lmstack_core::grad::backward"), "{err}");
        Ok(())
    }

    #[test]
    fn a_checkpointed_forward_is_marked_and_its_rerun_is_not() -> Result<()> {
        let dev = Device::Cpu;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let w = Var::from_tensor(&Tensor::ones((2, 2), DType::F32, &dev)?)?;
        let wt = w.as_tensor().clone();
        let f: BlockFn = Arc::new(move |x: &Tensor| {
            log.lock().unwrap().push((in_checkpointed_forward(), enabled()));
            let w = if enabled() { wt.clone() } else { wt.detach() };
            x.matmul(&w)
        });
        let y = checkpoint(&Tensor::ones((1, 2), DType::F32, &dev)?, f)?;
        backward(&y.sum_all()?, &[w.as_tensor().clone()])?;
        assert_eq!(*seen.lock().unwrap(), vec![(true, false), (false, true)]);
        assert!(!in_checkpointed_forward());
        Ok(())
    }

    #[test]
    fn no_grad_turns_gradients_off_and_back_on() {
        assert!(enabled());
        no_grad(|| assert!(!enabled()));
        assert!(enabled());
        let _ = std::panic::catch_unwind(|| no_grad(|| panic!("inside")));
        assert!(enabled());
    }
}
