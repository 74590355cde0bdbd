//! Supervised finetuning data: instruction examples read from JSONL, rendered with a chat
//! template, tokenized with a loss mask, and padded into batches.
//!
//! Two line shapes are read (bad lines are reported with file and line number):
//! - chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": "…"}, …]}` — rendered
//!   with the chat template; by default only the assistant turns (their content and the
//!   template's end-of-turn text) are scored;
//! - `{"prompt": "…", "completion": "…"}` — plain text: the prompt is context, the completion
//!   (plus the end-of-sequence token when the tokenizer has one) is scored; a chat template is
//!   not applied (as TRL treats non-conversational data).
//!
//! Tokenization with the loss mask is core's ([`lmstack_core::examples`], re-exported here),
//! shared with preference tuning and reward scoring. Labels are the next token; every unscored
//! position (and all padding) carries [`IGNORE_INDEX`], so padding never contributes to the
//! loss.

use std::path::Path;

use candle_core::{Device, Tensor};
pub use lmstack_core::examples::{parse_messages, tokenize, tokenize_from, ChatFormat, Example, Tokenized};
use lmstack_core::kernels::ops::IGNORE_INDEX;
use lmstack_core::nn::Segments;
use serde_json::Value;

use crate::{Error, Result};

/// Reads a JSONL file of examples; a bad line is an error naming `file:line` and the field.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Msg(format!("{at}: not JSON: {e}")))?;
        out.push(Example::from_value(&v).map_err(|e| Error::Msg(format!("{at}: {e}")))?);
    }
    if out.is_empty() {
        return Err(Error::Msg(format!("{}: no examples", path.display())));
    }
    Ok(out)
}

/// A batch: inputs `[b, t]` and labels `[b, t]` (next token where scored, else
/// [`IGNORE_INDEX`]; padding is never scored), an example per row ([`batch`]) or several
/// packed in a row ([`packed`]).
pub struct SftBatch {
    /// Input ids.
    pub inputs: Tensor,
    /// Labels.
    pub labels: Tensor,
    /// Scored positions in the batch.
    pub n_scored: usize,
    /// Where each example sits when several share a row ([`packed`]).
    pub segments: Option<Segments>,
}

impl SftBatch {
    /// As the training loop takes it.
    pub fn into_batch(self) -> crate::batches::Batch {
        crate::batches::Batch { inputs: self.inputs, labels: self.labels, segments: self.segments }
    }
}

/// One example's inputs and labels (cut to `max_len + 1` tokens from the left): next token
/// where scored, else [`IGNORE_INDEX`].
fn inputs_and_labels(x: &Tokenized, max_len: usize) -> (Vec<u32>, Vec<u32>) {
    let keep = x.ids.len().min(max_len + 1);
    let s = x.ids.len() - keep;
    let (ids, scored) = (&x.ids[s..], &x.scored[s..]);
    let n = ids.len().saturating_sub(1);
    let labels = (0..n).map(|p| if scored[p + 1] { ids[p + 1] } else { IGNORE_INDEX }).collect();
    (ids[..n].to_vec(), labels)
}

/// Padding-free batch (TRL's `padding_free`): the examples packed end to end into `rows`
/// rows (each to the row with the fewest tokens so far, longest first), each attending only
/// within itself with positions from 0; rows shorter than the longest are padded at the end.
/// The same loss and gradients as [`batch`], without computing padding.
pub fn packed(items: &[&Tokenized], rows: usize, max_len: usize, pad: u32, dev: &Device) -> Result<SftBatch> {
    Ok(packed_with_order(items, rows, max_len, pad, dev)?.0)
}

/// [`packed`], and which of `items` each segment holds, in span order (row by row, left to
/// right; items with nothing to read are left out).
pub fn packed_with_order(
    items: &[&Tokenized],
    rows: usize,
    max_len: usize,
    pad: u32,
    dev: &Device,
) -> Result<(SftBatch, Vec<usize>)> {
    let rows = rows.clamp(1, items.len().max(1));
    let mut seqs: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
    let mut item_of = Vec::new();
    for (k, x) in items.iter().enumerate() {
        let s = inputs_and_labels(x, max_len);
        if !s.0.is_empty() {
            seqs.push(s);
            item_of.push(k);
        }
    }
    let mut by_len: Vec<usize> = (0..seqs.len()).collect();
    by_len.sort_by_key(|&i| std::cmp::Reverse(seqs[i].0.len()));
    let mut fill: Vec<Vec<usize>> = vec![Vec::new(); rows];
    let mut lens = vec![0usize; rows];
    for i in by_len {
        let x = &seqs[i].0;
        let r = (0..rows).min_by_key(|&r| (lens[r], r)).expect("rows > 0");
        fill[r].push(i);
        lens[r] += x.len();
    }
    let t = lens.iter().copied().max().unwrap_or(0).max(1);
    let (mut inputs, mut labels, mut spans) = (Vec::with_capacity(rows * t), Vec::with_capacity(rows * t), Vec::new());
    let mut order = Vec::new();
    for (r, members) in fill.iter().enumerate() {
        let mut at = 0;
        for &i in members {
            let (x, y) = &seqs[i];
            spans.push((r, at, x.len()));
            order.push(item_of[i]);
            inputs.extend_from_slice(x);
            labels.extend_from_slice(y);
            at += x.len();
        }
        inputs.extend(std::iter::repeat_n(pad, t - at));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, t - at));
    }
    let n_scored = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    let batch = SftBatch {
        inputs: Tensor::from_vec(inputs, (rows, t), dev)?,
        labels: Tensor::from_vec(labels, (rows, t), dev)?,
        n_scored,
        segments: Some(Segments::new(spans, rows, t)?),
    };
    Ok((batch, order))
}

/// Pads `items` to the longest (cut to `max_len + 1` tokens from the left) and builds inputs and
/// labels; `pad` fills inputs (its value never matters: nothing attends forward into padding
/// in a causal model, and padded positions are not scored).
pub fn batch(items: &[&Tokenized], max_len: usize, pad: u32, dev: &Device) -> Result<SftBatch> {
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = items.iter().map(|x| inputs_and_labels(x, max_len)).collect();
    let t = seqs.iter().map(|(x, _)| x.len()).max().unwrap_or(0).max(1);
    let mut inputs = Vec::with_capacity(items.len() * t);
    let mut labels = Vec::with_capacity(items.len() * t);
    for (x, y) in &seqs {
        inputs.extend_from_slice(x);
        inputs.extend(std::iter::repeat_n(pad, t - x.len()));
        labels.extend_from_slice(y);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, t - y.len()));
    }
    let n_scored = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    Ok(SftBatch {
        inputs: Tensor::from_vec(inputs, (items.len(), t), dev)?,
        labels: Tensor::from_vec(labels, (items.len(), t), dev)?,
        n_scored,
        segments: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_never_scored() {
        let t = lmstack_core::Tokenizer::from_chars("abcdefg".chars()).unwrap();
        let fmt = ChatFormat::from_spec("plain", &t).unwrap();
        let a =
            tokenize(&Example::Completion { prompt: "ab".into(), completion: "cd".into() }, &t, &fmt, false).unwrap();
        let b = tokenize(&Example::Completion { prompt: "abcdef".into(), completion: "g".into() }, &t, &fmt, false)
            .unwrap();
        let bt = batch(&[&a, &b], 64, 0, &Device::Cpu).unwrap();
        assert_eq!(bt.inputs.dims(), [2, 6]);
        let l = bt.labels.to_vec2::<u32>().unwrap();
        let c = t.token_to_id("c").unwrap();
        let d = t.token_to_id("d").unwrap();
        assert_eq!(l[0], [IGNORE_INDEX, c, d, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(bt.n_scored, 3);
    }
}
