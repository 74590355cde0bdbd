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

use candle_core::{Device, Tensor};
use lmstack_core::ops::IGNORE_INDEX;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::Tokens;
use crate::{Error, Result};

/// A batch of inputs and labels.
#[derive(Debug)]
pub struct Batch {
    /// Input ids `[batch, block]` (u32).
    pub inputs: Tensor,
    /// Labels `[batch, block]` (u32), [`IGNORE_INDEX`] where nothing is scored.
    pub labels: Tensor,
}

/// Which self-supervised objective batches are built for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
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
    objective: Objective,
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
    objective: Objective,
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
            Objective::Causal => {
                x.extend_from_slice(&w[..block]);
                y.extend_from_slice(&w[1..]);
            }
            Objective::Masked { mask_id, vocab_size, prob } => {
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
    Ok(Batch { inputs: Tensor::from_vec(x, (b, block), device)?, labels: Tensor::from_vec(y, (b, block), device)? })
}
