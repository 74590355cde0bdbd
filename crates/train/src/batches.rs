//! Self-supervised batches from a stream of token ids: the labels come from the data itself.
//!
//! - Causal LM: a window of `block + 1` tokens gives inputs `x = w[..block]` and labels
//!   `y = w[1..]`, the next token at every position.
//! - Masked LM (BERT): 15% of the positions are chosen; of those, 80% become the mask token,
//!   10% a random token and 10% stay unchanged; labels are the original tokens at the chosen
//!   positions and [`IGNORE_INDEX`] elsewhere, so only chosen positions are scored.
//!
//! Window offsets are drawn from a seeded RNG whose state is part of a checkpoint, so a
//! resumed run sees exactly the batches an uninterrupted one would.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lmstack_core::kernels::ops::IGNORE_INDEX;
use lmstack_core::nn::Segments;
use lmstack_core::Model;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::Tokens;
use crate::optim::{self, AdamW};
use crate::{Error, Result};

/// A batch of inputs and labels.
#[derive(Debug)]
pub struct Batch {
    /// Input ids `[batch, block]` (u32).
    pub inputs: Tensor,
    /// Labels `[batch, block]` (u32), [`IGNORE_INDEX`] where nothing is scored.
    pub labels: Tensor,
    /// Several sequences packed in a row (padding-free batches), or `None`: a row each.
    pub segments: Option<Segments>,
}

/// Which self-supervised labels batches are built with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SelfSupervised {
    /// Predict the next token (GPT-2, Llama).
    Causal,
    /// Predict masked tokens (BERT).
    Masked {
        /// Id of the mask token.
        mask_id: u32,
        /// Vocabulary size, for the random replacements.
        vocab_size: u32,
        /// Fraction of positions chosen (0.15 in BERT).
        prob: f64,
    },
}

/// Checks that `tokens` can hold at least one window of `block + 1` tokens.
pub fn check_len(tokens: &dyn Tokens, block: usize, what: &str) -> Result<()> {
    if tokens.len() < block + 2 {
        return Err(Error::Msg(format!(
            "the {what} split has {} tokens, fewer than the context length {block} + 2; use a shorter `block_size` or more data",
            tokens.len()
        )));
    }
    Ok(())
}

/// Draws `batch` random windows of `tokens` and builds inputs and labels for `objective`.
pub fn sample_batch(
    tokens: &dyn Tokens,
    batch: usize,
    block: usize,
    objective: SelfSupervised,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<Batch> {
    let starts: Vec<usize> = (0..batch).map(|_| rng.random_range(0..tokens.len() - block - 1)).collect();
    windows(tokens, &starts, block, objective, rng, device)
}

/// Builds a batch from windows starting at `starts`.
pub fn windows(
    tokens: &dyn Tokens,
    starts: &[usize],
    block: usize,
    objective: SelfSupervised,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<Batch> {
    let b = starts.len();
    let mut x = Vec::with_capacity(b * block);
    let mut y = Vec::with_capacity(b * block);
    let mut w = Vec::with_capacity(block + 1);
    for &s in starts {
        w.clear();
        tokens.extend_into(s, block + 1, &mut w);
        match objective {
            SelfSupervised::Causal => {
                x.extend_from_slice(&w[..block]);
                y.extend_from_slice(&w[1..]);
            }
            SelfSupervised::Masked { mask_id, vocab_size, prob } => {
                for &t in &w[..block] {
                    if rng.random::<f64>() < prob {
                        y.push(t);
                        let r = rng.random::<f64>();
                        x.push(if r < 0.8 {
                            mask_id
                        } else if r < 0.9 {
                            rng.random_range(0..vocab_size)
                        } else {
                            t
                        });
                    } else {
                        x.push(t);
                        y.push(IGNORE_INDEX);
                    }
                }
            }
        }
    }
    Ok(Batch {
        inputs: Tensor::from_vec(x, (b, block), device)?,
        labels: Tensor::from_vec(y, (b, block), device)?,
        segments: None,
    })
}

impl Batch {
    /// Rows `lo..hi`, with the sequences packed in them.
    pub fn rows(&self, lo: usize, hi: usize) -> Result<Batch> {
        let t = self.inputs.dim(1)?;
        let segments = match &self.segments {
            Some(s) => Some(Segments::new(
                s.spans().iter().filter(|sp| (lo..hi).contains(&sp.0)).map(|&(r, st, l)| (r - lo, st, l)).collect(),
                hi - lo,
                t,
            )?),
            None => None,
        };
        Ok(Batch { inputs: self.inputs.narrow(0, lo, hi - lo)?, labels: self.labels.narrow(0, lo, hi - lo)?, segments })
    }

    /// The number of scored positions (labels other than [`IGNORE_INDEX`]).
    pub fn scored(&self) -> Result<usize> {
        Ok(self.labels.flatten_all()?.to_vec1::<u32>()?.iter().filter(|&&t| t != IGNORE_INDEX).count())
    }
}

/// Mean loss of `model` on a batch (differentiable when the model is trainable), and the number
/// of scored positions. The batch must score at least one position ([`Batch::scored`]).
pub fn batch_loss(model: &Model, batch: &Batch) -> Result<(Tensor, usize)> {
    Ok(model.lm_loss(&batch.inputs, &batch.labels, batch.segments.as_ref())?)
}

/// Loss and gradients of `batch`, computed as `shards` slices of the batch in parallel (data
/// parallelism across cores: each slice is an independent forward and backward pass) and
/// combined weighted by their scored tokens, in slice order so the result is reproducible.
/// Equals the whole-batch loss and gradient up to float rounding. A slice that scores nothing
/// (a masked-LM slice with nothing masked) contributes nothing.
pub fn shard_grads(
    model: &Model,
    opt: &AdamW,
    batch: &Batch,
    shards: usize,
) -> Result<(f64, HashMap<String, Vec<f32>>)> {
    let b = batch.inputs.dim(0)?;
    let (loss, grads, _) = parallel_grads(opt, b, shards, |lo, hi| {
        let part = batch.rows(lo, hi)?;
        if part.scored()? == 0 {
            return Ok(None);
        }
        let (loss, n) = batch_loss(model, &part)?;
        Ok(Some((loss, n, ())))
    })?;
    Ok((loss, grads))
}

/// Gradients by trainable parameter name.
pub type Grads = HashMap<String, Vec<f32>>;

/// The data-parallel step every objective shares: `items` (a micro-batch's examples) cut into
/// `shards` contiguous slices, each run on its own core by `part(lo, hi)` (a forward pass
/// returning the slice's mean loss, its weight — the scored tokens or examples it averages
/// over — and what the objective wants back, or `None` when the slice carries no loss), then
/// one backward pass per slice; gradients and losses combined weighted by the slices'
/// weights, in slice order so the result is reproducible. Returns the combined loss,
/// gradients and each slice's extra.
pub fn parallel_grads<T: Send>(
    opt: &AdamW,
    items: usize,
    shards: usize,
    part: impl Fn(usize, usize) -> Result<Option<(Tensor, usize, T)>> + Sync,
) -> Result<(f64, Grads, Vec<T>)> {
    use rayon::prelude::*;
    let shards = shards.clamp(1, items.max(1));
    let bounds: Vec<(usize, usize)> = (0..shards).map(|i| (i * items / shards, (i + 1) * items / shards)).collect();
    type Part<T> = Option<(f64, usize, HashMap<String, Vec<f32>>, T)>;
    let parts: Vec<Result<Part<T>>> = bounds
        .par_iter()
        .map(|&(lo, hi)| -> Result<Part<T>> {
            // Gradients on for this slice whatever the worker was doing (it may pick the task
            // up while waiting inside another slice's checkpointed forward, under no_grad).
            lmstack_core::grad::with_grad(|| {
                let Some((loss, n, extra)) = part(lo, hi)? else { return Ok(None) };
                let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let vars: Vec<Tensor> = opt.vars().map(|(_, v)| v.as_tensor().clone()).collect();
                let g = lmstack_core::grad::backward(&loss, &vars)?;
                Ok(Some((l, n, optim::collect_grads(opt, &g)?, extra)))
            })
        })
        .collect();
    let parts: Vec<_> = parts.into_iter().collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
    let total: usize = parts.iter().map(|p| p.1).sum();
    if total == 0 {
        return Err(Error::Msg("the batch has no scored tokens".into()));
    }
    let mut grads = HashMap::new();
    let mut loss = 0.0;
    let mut extras = Vec::with_capacity(parts.len());
    for (l, n, g, extra) in parts {
        let w = n as f64 / total as f64;
        loss += l * w;
        optim::accumulate(&mut grads, g, w as f32);
        extras.push(extra);
    }
    Ok((loss, grads, extras))
}
