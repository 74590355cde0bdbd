//! Preference tuning (`train finetune --task dpo`): DPO and its relatives (TRL's
//! `DPOTrainer` `loss_type`s `sigmoid`, `robust`, `ipo`, `hinge`) on chosen/rejected pairs
//! ([`crate::preference`]), full or LoRA, as an objective of the one training loop.
//!
//! Each step draws `batch_size` pairs; their chosen and rejected sequences go through the
//! model as one padded batch per parallel slice (TRL's `concatenated_forward`), giving each
//! answer's summed log-probability ([`Model::sequence_logps`]). The reference model's come
//! from, in order of cost:
//! - the run directory's `reference_logps.json`, computed once before training
//!   (`precompute_ref_log_probs`, TRL's option of that name);
//! - for LoRA, the same model with its adapters switched off
//!   ([`lmstack_core::nn::without_adapters`], PEFT's `disable_adapter()`): a forward pass
//!   without gradients and without a second copy of the weights, so a quantized GGUF base
//!   serves as its own reference;
//! - a frozen model: the base (full finetuning keeps its weights apart from the trained copy)
//!   or `ref_model`, whose tokenizer must be the base's.
//!
//! Logged per step, as TRL logs them: the loss, `rewards/chosen`, `rewards/rejected`,
//! `rewards/margins`, `rewards/accuracies`, `logps/chosen` and `logps/rejected`; each
//! evaluation logs the same over the held-out pairs. Pairs whose answers are the same, and
//! pairs longer than the model's context, are left out and counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use lmstack_core::{Model, Pretrained, Tokenizer};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::batches::parallel_grads;
use crate::finetune::{self, FinetuneConfig, LossType, Method, TruncationMode};
use crate::optim::AdamW;
use crate::preference::{self, PairLogps, PreferenceLoss};
use crate::runlog::{self, DataOrder, Record};
use crate::sft::{self, ChatFormat, Tokenized};
use crate::trainer::{frozen, peak_rss_mib, Evaluation, MicroBatch, Objective, RunOptions};
use crate::{Error, Result};

/// A tokenized preference pair: the chosen and the rejected sequence, each scored on its
/// answer alone ([`preference::tokenize_pair`]).
#[derive(Debug, Clone)]
pub struct PairTokens {
    /// Prompt + chosen answer.
    pub chosen: Tokenized,
    /// Prompt + rejected answer.
    pub rejected: Tokenized,
    /// Its 0-based line in the data file (for `data_order.jsonl`).
    pub index: usize,
}

/// Where the reference model's log-probabilities come from.
enum Reference<'a> {
    /// The trained model with its adapters switched off (LoRA on the base).
    AdaptersOff,
    /// A frozen model: the base, or `ref_model`.
    Frozen(&'a Model),
    /// Computed before training: `[chosen, rejected]` per training and per held-out pair.
    Precomputed(&'a RefLogps),
    /// None (ORPO).
    None,
}

/// The reference's sequence log-probabilities of every example, computed once
/// (`reference_logps.json` in the run directory): `[chosen, rejected]` of a DPO pair, `[answer,
/// KL pair]` of a KTO example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefLogps {
    /// The reference model they were computed with.
    pub reference: PathBuf,
    /// The two log-probabilities of each training example, in data order.
    pub train: Vec<[f64; 2]>,
    /// The same of each held-out example.
    pub val: Vec<[f64; 2]>,
}

/// The run's precomputed reference log-probabilities (TRL's `precompute_ref_log_probs`): read
/// back from `reference_logps.json` on resume (refused when the data no longer have
/// `counts` = (training, held-out) examples), computed once by `compute` when asked for, or
/// `None`.
pub(crate) fn reference_cache(
    cfg: &FinetuneConfig,
    resume: bool,
    counts: (usize, usize),
    compute: impl FnOnce() -> Result<RefLogps>,
) -> Result<Option<RefLogps>> {
    let ref_path = cfg.out_dir.join("reference_logps.json");
    if resume && ref_path.is_file() {
        let r: RefLogps = lmstack_core::io::read_json(&ref_path)?;
        if (r.train.len(), r.val.len()) != counts {
            return Err(Error::Msg(format!(
                "{}: {} training and {} held-out examples, the data now {} and {}",
                ref_path.display(),
                r.train.len(),
                r.val.len(),
                counts.0,
                counts.1
            )));
        }
        Ok(Some(r))
    } else if cfg.precompute_ref_log_probs {
        let r = compute()?;
        lmstack_core::io::write_json(&ref_path, &r)?;
        Ok(Some(r))
    } else {
        Ok(None)
    }
}

/// How sequences go through the model: cut to the context (`max_len`), padded with `pad` into
/// one batch, or (`padding_free`, TRL's) packed end to end in rows of about the context's
/// length, each attending only within itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batching {
    pub max_len: usize,
    pub pad: u32,
    pub padding_free: bool,
}

/// Sequence log-probabilities of `pairs` under `model`: `[n]` chosen, `[n]` rejected (one
/// batch, chosen rows first), and the answers' lengths in scored tokens.
fn pair_logps(
    model: &Model,
    pairs: &[&PairTokens],
    batching: Batching,
) -> Result<(Tensor, Tensor, Vec<usize>, Vec<usize>)> {
    let n = pairs.len();
    let rows: Vec<&Tokenized> = pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect();
    let (sums, counts) = seq_logps(model, &rows, batching)?;
    Ok((sums.narrow(0, 0, n)?, sums.narrow(0, n, n)?, counts[..n].to_vec(), counts[n..].to_vec()))
}

/// Each row's summed log-probability of its scored tokens under `model` (`[n]`, in `rows`'
/// order, however they are batched), and how many tokens each scores.
pub(crate) fn seq_logps(model: &Model, rows: &[&Tokenized], batching: Batching) -> Result<(Tensor, Vec<usize>)> {
    let Batching { max_len, pad, padding_free } = batching;
    if !padding_free {
        let b = sft::batch(rows, max_len, pad, model.device())?;
        return Ok(model.sequence_logps(&b.inputs, &b.labels, None)?);
    }
    let tokens: usize = rows.iter().map(|r| r.ids.len().min(max_len + 1).saturating_sub(1)).sum();
    let (b, order) = sft::packed_with_order(rows, tokens.div_ceil(max_len).max(1), max_len, pad, model.device())?;
    if order.len() != rows.len() {
        return Err(Error::Msg("a sequence of one token has nothing to score".into()));
    }
    let (sums, counts) = model.sequence_logps(&b.inputs, &b.labels, b.segments.as_ref())?;
    // Segment `k` holds row `order[k]`: back to the rows' order.
    let mut at = vec![0u32; rows.len()];
    for (k, &row) in order.iter().enumerate() {
        at[row] = k as u32;
    }
    let counts = at.iter().map(|&k| counts[k as usize]).collect();
    let sums = sums.index_select(&Tensor::from_vec(at, rows.len(), sums.device())?, 0)?;
    Ok((sums, counts))
}

/// The reference's log-probabilities of `pairs` from a model, without gradients; `adapters_off`
/// switches the model's adapters off for the pass.
fn reference_pass(
    model: &Model,
    adapters_off: bool,
    pairs: &[&PairTokens],
    batching: Batching,
) -> Result<(Tensor, Tensor)> {
    let pass = || lmstack_core::grad::no_grad(|| pair_logps(model, pairs, batching));
    let (c, r, _, _) = if adapters_off { lmstack_core::nn::without_adapters(pass)? } else { pass()? };
    Ok((c.detach(), r.detach()))
}

/// What one slice of pairs gives back besides its loss: per pair, the rewards and the policy's
/// log-probabilities.
#[derive(Debug, Default)]
struct PairStats {
    chosen_rewards: Vec<f64>,
    rejected_rewards: Vec<f64>,
    logps_chosen: Vec<f64>,
    logps_rejected: Vec<f64>,
    /// The loss's own metrics (ORPO's), each with the pairs it is the mean over.
    extra: Vec<(&'static str, f64, usize)>,
}

impl PairStats {
    fn extend(&mut self, o: PairStats) {
        self.chosen_rewards.extend(o.chosen_rewards);
        self.rejected_rewards.extend(o.rejected_rewards);
        self.logps_chosen.extend(o.logps_chosen);
        self.logps_rejected.extend(o.logps_rejected);
        self.extra.extend(o.extra);
    }

    /// TRL's logged means: `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
    /// `rewards/accuracies`, `logps/chosen`, `logps/rejected`.
    fn metrics(&self) -> BTreeMap<String, f64> {
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        let pairs = || self.chosen_rewards.iter().zip(&self.rejected_rewards);
        let margins: Vec<f64> = pairs().map(|(c, r)| c - r).collect();
        let wins: Vec<f64> = pairs().map(|(c, r)| f64::from(u8::from(c > r))).collect();
        [
            ("rewards/chosen", mean(&self.chosen_rewards)),
            ("rewards/rejected", mean(&self.rejected_rewards)),
            ("rewards/margins", mean(&margins)),
            ("rewards/accuracies", mean(&wins)),
            ("logps/chosen", mean(&self.logps_chosen)),
            ("logps/rejected", mean(&self.logps_rejected)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(self.extra_means())
        .collect()
    }

    /// The loss's own metrics, averaged over the slices weighted by their pairs.
    fn extra_means(&self) -> Vec<(String, f64)> {
        let mut sums: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
        for &(k, v, n) in &self.extra {
            let e = sums.entry(k).or_default();
            e.0 += v * n as f64;
            e.1 += n;
        }
        sums.into_iter().map(|(k, (s, n))| (k.to_owned(), s / n.max(1) as f64)).collect()
    }

    /// The fraction of pairs whose chosen answer the policy finds the more likely.
    fn likelihood_accuracy(&self) -> f64 {
        let wins = self.logps_chosen.iter().zip(&self.logps_rejected).filter(|(c, r)| c > r).count();
        wins as f64 / self.logps_chosen.len().max(1) as f64
    }
}

/// Which pairs a slice holds: training pairs by index, or held-out ones.
#[derive(Clone, Copy)]
enum Split {
    Train,
    Val,
}

/// The preference objective as the trainer sees it.
struct Dpo<'a> {
    model: &'a Model,
    method: Method,
    /// `data_order.jsonl`: the pairs each micro-batch drew.
    order: DataOrder,
    reference: Reference<'a>,
    /// The loss against the reference, or `None`: ORPO, without one.
    loss: Option<PreferenceLoss>,
    /// The f-divergence of `loss`.
    divergence: preference::FDivergence,
    beta: f64,
    /// Weight of the chosen answers' token NLL added to the loss.
    sft_weight: f64,
    train: &'a [PairTokens],
    val: &'a [PairTokens],
    vars: &'a BTreeMap<String, Var>,
    batching: Batching,
    batch_size: usize,
    parallel_shards: usize,
    /// The step adapters' dropout masks are drawn for.
    step: Arc<AtomicU64>,
    /// Whether adapters' dropout is on.
    training: Arc<AtomicBool>,
}

impl Dpo<'_> {
    /// The reference's log-probabilities of the pairs `idx` of `split` (not called for ORPO).
    fn reference(&self, split: Split, idx: &[usize]) -> Result<(Tensor, Tensor)> {
        let (set, val) = match split {
            Split::Train => (self.train, false),
            Split::Val => (self.val, true),
        };
        let pairs = || -> Vec<&PairTokens> { idx.iter().map(|&i| &set[i]).collect() };
        match self.reference {
            Reference::Precomputed(r) => {
                let pre = if val { &r.val } else { &r.train };
                let col =
                    |j: usize| Tensor::new(idx.iter().map(|&i| pre[i][j] as f32).collect::<Vec<_>>(), &Device::Cpu);
                Ok((col(0)?, col(1)?))
            }
            Reference::AdaptersOff => reference_pass(self.model, true, &pairs(), self.batching),
            Reference::Frozen(m) => reference_pass(m, false, &pairs(), self.batching),
            Reference::None => Err(Error::Msg("this loss has no reference model".into())),
        }
    }

    /// The loss of pairs `idx` of `split` and their statistics (differentiable when gradients
    /// are on).
    fn pairs_loss(&self, model: &Model, split: Split, idx: &[usize]) -> Result<(Tensor, PairStats)> {
        let set = match split {
            Split::Train => self.train,
            Split::Val => self.val,
        };
        let pairs: Vec<&PairTokens> = idx.iter().map(|&i| &set[i]).collect();
        let (pc, pr, lc, lr) = pair_logps(model, &pairs, self.batching)?;
        let out = match self.loss {
            None => preference::orpo_loss(self.beta, &pc, &pr, &lc, &lr)?,
            Some(kind) => {
                let (ref_c, ref_r) = self.reference(split, idx)?;
                let p = PairLogps {
                    policy_chosen: &pc,
                    policy_rejected: &pr,
                    ref_chosen: &ref_c.to_dtype(pc.dtype())?,
                    ref_rejected: &ref_r.to_dtype(pr.dtype())?,
                    len_chosen: &lc,
                    len_rejected: &lr,
                };
                preference::preference_loss(kind, self.beta, self.divergence, p)?
            }
        };
        // TRL's "sft" loss beside the preference loss: the chosen answers' token NLL.
        let loss = match self.sft_weight {
            w if w > 0.0 => (out.loss + (preference::chosen_nll(&pc, &lc)? * w)?)?,
            _ => out.loss,
        };
        let values = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.detach().to_dtype(DType::F64)?.to_vec1()?) };
        let stats = PairStats {
            logps_chosen: values(&pc)?,
            logps_rejected: values(&pr)?,
            chosen_rewards: out.chosen_rewards,
            rejected_rewards: out.rejected_rewards,
            extra: out.metrics.into_iter().map(|(k, v)| (k, v, idx.len())).collect(),
        };
        Ok((loss, stats))
    }

    /// Loss and statistics over the held-out pairs (no graph, adapters' dropout off).
    fn val_stats(&self) -> Result<(f64, PairStats)> {
        finetune::evaluating(self.model, self.method, &self.training, |model| -> Result<(f64, PairStats)> {
            let mut stats = PairStats::default();
            let mut total = 0.0;
            let idx: Vec<usize> = (0..self.val.len()).collect();
            for chunk in idx.chunks(16) {
                let (loss, s) = self.pairs_loss(model, Split::Val, chunk)?;
                total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
                stats.extend(s);
            }
            Ok((total / self.val.len().max(1) as f64, stats))
        })
    }
}

impl Objective for Dpo<'_> {
    fn micro_batch(&mut self, step: u64, opt: &AdamW, rng: &mut ChaCha8Rng) -> Result<MicroBatch> {
        self.step.store(step, Ordering::Relaxed);
        let k = self.batch_size.min(self.train.len());
        let picks = rand::seq::index::sample(rng, self.train.len(), k).into_vec();
        self.order.step(step, picks.iter().map(|&i| self.train[i].index))?;
        let (loss, grads, parts) = parallel_grads(opt, k, self.parallel_shards, |lo, hi| {
            let (loss, stats) = self.pairs_loss(self.model, Split::Train, &picks[lo..hi])?;
            Ok(Some((loss, hi - lo, stats)))
        })?;
        let mut stats = PairStats::default();
        parts.into_iter().for_each(|s| stats.extend(s));
        let tokens =
            picks.iter().map(|&i| (self.train[i].chosen.n_scored() + self.train[i].rejected.n_scored()) as u64);
        Ok(MicroBatch { loss, grads, tokens: tokens.sum(), metrics: stats.metrics() })
    }

    fn evaluate(&mut self, _rng: &mut ChaCha8Rng) -> Result<Option<Evaluation>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let (loss, stats) = self.val_stats()?;
        let m = stats.metrics();
        let text = format!(
            "val loss {loss:.4}, reward accuracy {:.3}, margin {:.3}",
            m["rewards/accuracies"], m["rewards/margins"]
        );
        Ok(Some(Evaluation { loss, perplexity: false, text, tracks_best: true, metrics: m }))
    }

    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        crate::trainer::detached(self.vars)
    }
}

/// What a preference run reports.
#[derive(Debug, Clone, Serialize)]
pub struct DpoSummary {
    /// Steps completed.
    pub steps: u64,
    /// Stopped early on request.
    pub interrupted: bool,
    /// Held-out preference loss before (the reference itself: `ln 2` for DPO) and after.
    pub val_loss: (f64, Option<f64>),
    /// Held-out implicit reward accuracy after training: the fraction of pairs whose chosen
    /// answer gains more log-probability over the reference than the rejected one.
    pub reward_accuracy: Option<f64>,
    /// Held-out fraction of pairs whose chosen answer the model finds the more likely, before
    /// (the base) and after.
    pub likelihood_accuracy: (f64, Option<f64>),
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Parameters of the base model.
    pub base_parameters: usize,
    /// Training / held-out pairs used.
    pub pairs: (usize, usize),
    /// Pairs left out: the same two answers (their lines), and those with no answer token
    /// within the length limit (counted).
    pub left_out: (Vec<String>, usize),
    /// Pairs kept but cut to the length limit.
    pub truncated: usize,
    /// Mean wall time per step (ms), evaluations and checkpoints included.
    pub ms_per_step: f64,
    /// Mean wall time of the training steps alone (ms).
    pub train_ms_per_step: f64,
    /// Peak resident memory (MiB).
    pub peak_rss_mib: Option<f64>,
    /// Where the result is: `model/` or `adapter/`.
    pub output: PathBuf,
}

/// Whether two tokenizers map the same strings to the same ids.
fn same_vocab(a: &Tokenizer, b: &Tokenizer) -> bool {
    a.inner().get_vocab(true) == b.inner().get_vocab(true)
}

/// The pairs or examples of a file, tokenized and cut to the run's length limit, with what
/// was left out.
pub(crate) struct Prepared<T> {
    pub items: Vec<T>,
    /// Pairs with the same two answers (`file:line`).
    pub ties: Vec<String>,
    /// Left out: no answer token within the limit.
    pub too_long: usize,
    /// Kept, cut to the limit.
    pub truncated: usize,
}

impl<T> Prepared<T> {
    /// Adds `other`'s counts of what was left out or cut to these; returns its items.
    pub fn count(&mut self, mut other: Prepared<T>) -> Vec<T> {
        self.ties.append(&mut other.ties);
        self.too_long += other.too_long;
        self.truncated += other.truncated;
        other.items
    }
}

/// Tokenized pairs of a file, each sequence cut to `limit` tokens as `mode` says; left out:
/// ties (their `file:line`) and pairs with an answer cut away entirely (counted).
pub(crate) fn prepare(
    path: &Path,
    tok: &Tokenizer,
    fmt: &ChatFormat,
    (limit, mode): (usize, TruncationMode),
) -> Result<Prepared<PairTokens>> {
    let file = preference::read_pairs(path)?;
    let mut out = Prepared { items: Vec::new(), ties: Vec::new(), too_long: 0, truncated: 0 };
    for (pair, line) in file.pairs.iter().zip(&file.lines) {
        let (mut chosen, mut rejected) = preference::tokenize_pair(pair, tok, fmt)
            .map_err(|e| Error::Msg(format!("{}:{line}: {e}", path.display())))?;
        let cut = chosen.ids.len().max(rejected.ids.len()) > limit;
        let kept = [&mut chosen, &mut rejected].map(|t| preference::truncate(t, limit, mode));
        if kept != [true, true] {
            out.too_long += 1;
        } else {
            out.truncated += usize::from(cut);
            out.items.push(PairTokens { chosen, rejected, index: line - 1 });
        }
    }
    out.ties = file.identical.iter().map(|l| format!("{}:{l}", path.display())).collect();
    Ok(out)
}

/// Computes the reference's log-probabilities of every pair with `model` (before any adapter
/// attaches or any weight trains), in parallel chunks, without gradients.
fn precompute(model: &Model, reference: &Path, sets: [&[PairTokens]; 2], batching: Batching) -> Result<RefLogps> {
    use rayon::prelude::*;
    let one = |set: &[PairTokens]| -> Result<Vec<[f64; 2]>> {
        let chunks: Vec<&[PairTokens]> = set.chunks(8).collect();
        let parts: Vec<Result<Vec<[f64; 2]>>> = chunks
            .par_iter()
            .map(|chunk| {
                let pairs: Vec<&PairTokens> = chunk.iter().collect();
                let (c, r) = reference_pass(model, false, &pairs, batching)?;
                let (c, r): (Vec<f64>, Vec<f64>) =
                    (c.to_dtype(DType::F64)?.to_vec1()?, r.to_dtype(DType::F64)?.to_vec1()?);
                Ok(c.into_iter().zip(r).map(|(c, r)| [c, r]).collect())
            })
            .collect();
        Ok(parts.into_iter().collect::<Result<Vec<_>>>()?.concat())
    };
    Ok(RefLogps { reference: reference.to_owned(), train: one(sets[0])?, val: one(sets[1])? })
}

/// What every preference run starts from: the base, its tokenizer and chat format, its
/// context, the pad token, the reference model `ref_model` names (its tokenizer checked), and
/// the checkpoint to resume.
pub(crate) struct Setup {
    pub base: Pretrained,
    pub tok: Tokenizer,
    pub fmt: ChatFormat,
    pub max_len: usize,
    /// Most tokens of a sequence (`max_length`, else what the context holds) and which end of
    /// a longer one is kept.
    pub limit: (usize, TruncationMode),
    pub pad: u32,
    pub ref_model: Option<Model>,
    pub resume_from: Option<crate::checkpoint::Loaded>,
}

/// Checks `cfg` for a `task` run, prepares the run directory and loads what [`Setup`] holds.
pub(crate) fn setup(cfg: &FinetuneConfig, opts: &RunOptions, task: finetune::Task) -> Result<Setup> {
    cfg.validate()?;
    if cfg.task != task {
        return Err(Error::Msg(format!("this function trains --task {task:?} runs").to_lowercase()));
    }
    let resume_from = finetune::prepare_run_dir(cfg, opts)?;
    let dev = Device::Cpu;
    let mut base = Pretrained::load(&cfg.base, DType::F32, &dev)?;
    // The reference's passes (without gradients, precomputed or not) compute what the policy's
    // (with) do: on a quantized base, the exact products rather than the 8-bit kernels.
    base.model.set_exact_products(true);
    if !base.model.config().is_causal() {
        return Err(Error::Msg(format!(
            "--base {}: a {} model is a masked LM; preference tuning needs a causal LM",
            cfg.base.display(),
            base.model.config().model_type_str()
        )));
    }
    let tok = base.tokenizer.clone();
    let ref_model = match &cfg.ref_model {
        Some(dir) => {
            let r = Pretrained::load(dir, DType::F32, &dev)?;
            if !same_vocab(&r.tokenizer, &tok) {
                return Err(Error::Msg(format!(
                    "--ref-model {}: its tokenizer ({} tokens) is not the base's, {} ({} tokens); the reference must score the same token ids",
                    dir.display(),
                    r.tokenizer.vocab_size(),
                    cfg.base.display(),
                    tok.vocab_size()
                )));
            }
            Some(r.model)
        }
        None => None,
    };
    let fmt = ChatFormat::from_spec(&cfg.chat_template, &tok)?;
    let max_len = base.model.max_len();
    // A sequence of `max_len + 1` tokens fits: its last token is only a label.
    let limit = cfg.max_length.unwrap_or(max_len + 1);
    if limit > max_len + 1 {
        return Err(Error::Msg(format!(
            "--max-length {limit}: the model's context of {max_len} holds sequences of at most {} tokens",
            max_len + 1
        )));
    }
    let pad = tok.pad_id().or(tok.eos_id()).unwrap_or(0);
    Ok(Setup { base, tok, fmt, max_len, limit: (limit, cfg.truncation_mode), pad, ref_model, resume_from })
}

/// Runs (or with `resume`, continues) a preference tuning run.
pub fn run(cfg: &FinetuneConfig, opts: &RunOptions) -> Result<DpoSummary> {
    let resume = opts.resume;
    let out = &cfg.out_dir;
    let Setup { base, tok, fmt, max_len, limit, pad, ref_model, resume_from } = setup(cfg, opts, finetune::Task::Dpo)?;
    let mut data = prepare(&cfg.data, &tok, &fmt, limit)?;
    let mut train = std::mem::take(&mut data.items);
    let val = match &cfg.val_data {
        Some(p) => data.count(prepare(p, &tok, &fmt, limit)?),
        None => finetune::split_off_val(&mut train, cfg),
    };
    let Prepared { ties, too_long, truncated, .. } = data;
    if train.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no pair has an answer within {} tokens ({too_long} left out)",
            cfg.data.display(),
            limit.0
        )));
    }

    // The reference computed once, before any weight changes (a resumed run reads it back).
    let ref_name = cfg.ref_model.clone().unwrap_or_else(|| cfg.base.clone());
    let batching = Batching { max_len, pad, padding_free: cfg.padding_free };
    let precomputed = reference_cache(cfg, resume, (train.len(), val.len()), || {
        precompute(ref_model.as_ref().unwrap_or(&base.model), &ref_name, [&train, &val], batching)
    })?;

    let base_parameters = base.model.num_parameters();
    // Full finetuning with the base as the reference keeps a frozen copy of the base's weights
    // (the trained model copies them into variables).
    let base_reference =
        (precomputed.is_none() && ref_model.is_none() && cfg.method == Method::Full && cfg.loss_type != LossType::Orpo)
            .then(|| frozen(&base.model))
            .transpose()?;
    let step_counter = Arc::new(AtomicU64::new(0));
    let training = Arc::new(AtomicBool::new(false));
    let (mut model, vars) =
        finetune::trainable_model(cfg, base.model, &tok, resume_from.as_ref(), step_counter.clone(), training.clone())?;
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)?;
    let reference = match (&precomputed, &ref_model, &base_reference) {
        _ if cfg.loss_type == LossType::Orpo => Reference::None,
        (Some(r), _, _) => Reference::Precomputed(r),
        (None, Some(m), _) | (None, None, Some(m)) => Reference::Frozen(m),
        (None, None, None) => Reference::AdaptersOff,
    };
    let trainable_parameters: usize = vars.values().map(|v| v.elem_count()).sum();
    let mut trainer = finetune::new_trainer(cfg, vars.clone(), resume_from, opts)?;
    let val_index: Vec<usize> = val.iter().map(|p| p.index).collect();
    let mut objective = Dpo {
        model: &model,
        method: cfg.method,
        order: DataOrder::open(out, resume, &val_index, cfg.val_data.is_some())?,
        reference,
        loss: cfg.preference_loss(),
        divergence: cfg.f_divergence(),
        beta: cfg.beta,
        sft_weight: cfg.sft_weight,
        train: &train,
        val: &val,
        vars: &vars,
        batching,
        batch_size: cfg.batch_size,
        parallel_shards: cfg.parallel_shards,
        step: step_counter,
        training: training.clone(),
    };
    // Before: the held-out loss and likelihood accuracy of the starting point. A resumed run
    // reads the loss its log recorded at step 0.
    let logged = if resume { runlog::initial_val(trainer.log.path())? } else { None };
    let (base_val, base_likelihood) = match logged {
        _ if val.is_empty() => (f64::NAN, f64::NAN),
        Some(v) => (v, f64::NAN),
        None => {
            let (loss, stats) = objective.val_stats()?;
            if !resume {
                trainer.log.write(&Record::val(0, loss, false).with_metrics(stats.metrics()))?;
            }
            (loss, stats.likelihood_accuracy())
        }
    };
    let reference_line = match &objective.reference {
        Reference::Precomputed(_) => format!("{} (precomputed)", ref_name.display()),
        Reference::AdaptersOff => format!("{} (adapters off)", cfg.base.display()),
        Reference::Frozen(_) => ref_name.display().to_string(),
        Reference::None => "none (ORPO)".into(),
    };
    println!(
        "{:?} preference tuning ({:?}, beta {}) of {} ({} parameters; {} trainable): {} train / {} held-out pairs ({} left out: {} with the same answers, {} with no answer token within {} tokens; {truncated} cut to {} tokens, {}); reference {reference_line}",
        cfg.method,
        cfg.loss_type,
        cfg.beta,
        cfg.base.display(),
        base_parameters,
        trainable_parameters,
        train.len(),
        val.len(),
        ties.len() + too_long,
        ties.len(),
        too_long,
        limit.0,
        limit.0,
        limit.1.as_str(),
    );
    if !val.is_empty() && !base_likelihood.is_nan() {
        println!(
            "held-out: loss {base_val:.4}; the model prefers the chosen answer of {:.1}% of pairs",
            100.0 * base_likelihood
        );
    }
    if resume {
        println!("resuming at step {} of {}", trainer.state.step, cfg.max_steps);
    }

    let loop_cfg = cfg.loop_config();
    training.store(true, Ordering::Relaxed);
    let outcome = trainer.run(&loop_cfg, &mut objective)?;
    training.store(false, Ordering::Relaxed);
    let title = format!("{:?} preference tuning ({:?}), {} steps", cfg.method, cfg.loss_type, trainer.state.step);
    trainer.write_loss_plot(out, &title)?;
    let after = if outcome.interrupted || val.is_empty() { None } else { Some(objective.val_stats()?) };
    let output = finetune::write_result(cfg, &mut model, tok, &fmt, &vars)?;
    let summary = DpoSummary {
        steps: trainer.state.step,
        interrupted: outcome.interrupted,
        val_loss: (base_val, after.as_ref().map(|a| a.0)),
        reward_accuracy: after.as_ref().map(|a| a.1.metrics()["rewards/accuracies"]),
        likelihood_accuracy: (base_likelihood, after.as_ref().map(|a| a.1.likelihood_accuracy())),
        trainable_parameters,
        base_parameters,
        pairs: (train.len(), val.len()),
        left_out: (ties, too_long),
        truncated,
        ms_per_step: outcome.ms_per_step(),
        train_ms_per_step: outcome.train_ms_per_step(),
        peak_rss_mib: peak_rss_mib(),
        output,
    };
    lmstack_core::io::write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}
