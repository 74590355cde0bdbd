//! AdamW ("Decoupled Weight Decay Regularization", Loshchilov & Hutter, 2019) whose state can
//! be saved and resumed, global gradient-norm clipping, and the warmup + cosine learning-rate
//! schedule.
//!
//! Mirrors `torch.optim.AdamW`: bias-corrected moments, weight decay applied to the weights
//! (not the gradient) and scaled by the learning rate. Parameters whose names mark them as
//! biases, norms or embeddings are not decayed. The update runs over plain slices in one pass
//! per parameter.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay for the decayed group.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Whether a parameter is exempt from weight decay: biases, normalisation weights and
/// embedding tables (by Hugging Face name).
pub fn no_decay(name: &str, rank: usize) -> bool {
    rank < 2
        || name.ends_with(".bias")
        || name.contains("norm")
        || name.contains("LayerNorm")
        || name.contains(".ln_")
        || name.contains("embed")
        || name.contains(".wte.")
        || name.contains(".wpe.")
}

struct Slot {
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
    decay: bool,
}

/// AdamW over named variables, with checkpointable moments.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    step: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("cfg", &self.cfg)
            .field("params", &self.slots.len())
            .field("step", &self.step)
            .finish()
    }
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl AdamW {
    /// An optimizer over `vars` (name → variable), moments at zero.
    pub fn new(vars: BTreeMap<String, Var>, cfg: AdamWConfig) -> Self {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let n = var.elem_count();
                let decay = !no_decay(&name, var.rank());
                (name, Slot { var, m: vec![0.0; n], v: vec![0.0; n], decay })
            })
            .collect();
        Self { cfg, slots, step: 0 }
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the parameters that are weight-decayed and of those that are not.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let decayed = self.slots.iter().filter(|(_, s)| s.decay).map(|(k, _)| k.as_str()).collect();
        let plain = self.slots.iter().filter(|(_, s)| !s.decay).map(|(k, _)| k.as_str()).collect();
        (decayed, plain)
    }

    /// Applies one update with learning rate `lr`, given each variable's gradient. Variables
    /// without a gradient are left unchanged (their moments too).
    pub fn step(&mut self, grads: &HashMap<String, Vec<f32>>, lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.step as i32);
        let bc2 = 1.0 - beta2.powi(self.step as i32);
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        use rayon::prelude::*;
        let mut slots: Vec<(&String, &mut Slot)> = self.slots.iter_mut().collect();
        // Parameters are independent: update them in parallel.
        slots
            .par_iter_mut()
            .map(|(name, slot)| -> Result<()> {
                let Some(g) = grads.get(*name) else { return Ok(()) };
                let mut w = to_f32(slot.var.as_tensor())?;
                if g.len() != w.len() {
                    return Err(Error::Msg(format!(
                        "gradient of `{name}` has {} values, the parameter {}",
                        g.len(),
                        w.len()
                    )));
                }
                let decay = if slot.decay { (lr * weight_decay) as f32 } else { 0.0 };
                let (m, v) = (&mut slot.m, &mut slot.v);
                let eps = eps as f32;
                // Zipped (no bounds checks) and compiled for AVX2 where the CPU has it: eight
                // lanes of the same IEEE operations (no fused multiply-adds), so both builds
                // give the same bits.
                lmstack_core::kernels::simd::dispatch(
                    #[inline(always)]
                    |_| {
                        for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                            *m = b1 * *m + (1.0 - b1) * g;
                            *v = b2 * *v + (1.0 - b2) * g * g;
                            *w -= decay * *w;
                            *w -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                        }
                    },
                );
                let t = Tensor::from_vec(w, slot.var.shape(), slot.var.device())?.to_dtype(slot.var.dtype())?;
                slot.var.set(&t)?;
                Ok(())
            })
            .collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// The moments as tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`), for a checkpoint.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, s) in &self.slots {
            out.insert(format!("exp_avg.{name}"), Tensor::from_slice(&s.m, s.m.len(), &Device::Cpu)?);
            out.insert(format!("exp_avg_sq.{name}"), Tensor::from_slice(&s.v, s.v.len(), &Device::Cpu)?);
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count. Every parameter
    /// must be present with the right size.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64, file: &str) -> Result<()> {
        for (name, s) in self.slots.iter_mut() {
            for (prefix, dst) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| Error::Msg(format!("{file}: optimizer state `{key}` is missing")))?;
                let v = to_f32(t)?;
                if v.len() != dst.len() {
                    return Err(Error::Msg(format!(
                        "{file}: optimizer state `{key}` has {} values, expected {}",
                        v.len(),
                        dst.len()
                    )));
                }
                *dst = v;
            }
        }
        self.step = step;
        Ok(())
    }

    /// The variables, by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|(k, s)| (k.as_str(), &s.var))
    }
}

/// Collects each variable's gradient as f32 values.
pub fn collect_grads(opt: &AdamW, grads: &candle_core::backprop::GradStore) -> Result<HashMap<String, Vec<f32>>> {
    let mut out = HashMap::new();
    for (name, var) in opt.vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            out.insert(name.to_owned(), to_f32(g)?);
        }
    }
    Ok(out)
}

/// Adds `scale · more` into `acc` (gradient accumulation over micro-batches and slices).
pub fn accumulate(acc: &mut HashMap<String, Vec<f32>>, more: HashMap<String, Vec<f32>>, scale: f32) {
    for (k, mut v) in more {
        match acc.get_mut(&k) {
            Some(a) => lmstack_core::kernels::simd::dispatch(
                #[inline(always)]
                |_| a.iter_mut().zip(&v).for_each(|(a, b)| *a += scale * b),
            ),
            None => {
                if scale != 1.0 {
                    v.iter_mut().for_each(|x| *x *= scale);
                }
                acc.insert(k, v);
            }
        }
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Vec<f32>>, max_norm: f64) -> f64 {
    // Summed in name order: a map's iteration order changes from run to run, and so would the
    // last bits of the norm (and, through the clip factor, of the weights).
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let norm = names.iter().flat_map(|k| grads[*k].iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    if norm > max_norm && norm.is_finite() {
        let c = (max_norm / (norm + 1e-6)) as f32;
        grads.values_mut().for_each(|v| v.iter_mut().for_each(|x| *x *= c));
    }
    norm
}

/// Linear warmup to `max_lr` over `warmup` steps, then cosine decay to `min_lr` at
/// `decay_steps`, then `min_lr` (nanoGPT's schedule). `step` counts from 0.
pub fn lr_at(step: u64, max_lr: f64, min_lr: f64, warmup: u64, decay_steps: u64) -> f64 {
    if step < warmup {
        return max_lr * (step + 1) as f64 / (warmup + 1) as f64;
    }
    if step >= decay_steps {
        return min_lr;
    }
    let ratio = (step - warmup) as f64 / (decay_steps - warmup).max(1) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    min_lr + coeff * (max_lr - min_lr)
}
