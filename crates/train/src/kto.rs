//! KTO (`train finetune --task kto`, TRL's `KTOTrainer`): preference tuning on answers
//! labelled good or bad one by one ([`preference::read_unpaired`]; pairs are split into one of
//! each), full or LoRA, against a reference model as DPO has it (LoRA: the base with the
//! adapters off; full: a frozen copy of the base; or `ref_model`).
//!
//! Each example has a KL pair fixed when the data are read, as TRL's `_get_kl_dataset` fixes
//! it: its prompt with the previous example's answer within its block of `batch_size` examples
//! (16 for held-out ones), in data order, the first taking the block's last (the answers
//! rotated by one); an answer to the same prompt (the other half of a split pair) is passed
//! over for the one before it. Each step draws `batch_size` examples. The KL estimate comes
//! first, without gradients: `mean(log π − log π_ref)` over their KL pairs, clamped at 0. Then
//! each parallel slice computes [`preference::kto_loss`] with it. With
//! `precompute_ref_log_probs` the reference's log-probabilities of every answer and KL pair are
//! computed once and kept in `reference_logps.json`.
//! Logged as TRL logs them: `kl`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
//! `logps/chosen`, `logps/rejected` (chosen: the desirable answers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use lmstack_core::{Model, Tokenizer};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::batches::parallel_grads;
use crate::dpo::{reference_cache, seq_logps, setup, Batching, Prepared, RefLogps, Setup};
use crate::finetune::{self, FinetuneConfig, Method, TruncationMode};
use crate::optim::AdamW;
use crate::preference::{self, Unpaired};
use crate::runlog::Record;
use crate::sft::{ChatFormat, Tokenized};
use crate::trainer::{frozen, peak_rss_mib, Evaluation, MicroBatch, Objective, RunOptions};
use crate::{Error, Result};

/// An unpaired example and its tokens.
#[derive(Debug, Clone)]
pub struct KtoItem {
    /// The example.
    pub ex: Unpaired,
    /// Prompt + answer, scored on the answer.
    pub tokens: Tokenized,
    /// Its KL pair: the prompt with another example's answer ([`assign_kl_pairs`]).
    pub kl: Tokenized,
}

/// Gives each item its KL pair: within consecutive blocks of `block` items, the prompt with
/// the previous item's answer (the first item takes the block's last: TRL's +1 offset),
/// passing over answers to the same prompt; with no other prompt in the block, its own answer.
pub fn assign_kl_pairs(items: &mut [KtoItem], block: usize, tok: &Tokenizer, fmt: &ChatFormat) -> Result<()> {
    for chunk in items.chunks_mut(block.max(1)) {
        let k = chunk.len();
        let pairs: Vec<Tokenized> = (0..k)
            .map(|j| {
                let prompt = &chunk[j].ex.prompt;
                let other = (1..k)
                    .map(|d| &chunk[(j + k - d) % k].ex)
                    .find(|o| &o.prompt != prompt)
                    .map_or(&chunk[j].ex.completion, |o| &o.completion);
                preference::tokenize_answer(prompt, other, tok, fmt)
            })
            .collect::<Result<_>>()?;
        for (item, kl) in chunk.iter_mut().zip(pairs) {
            item.kl = kl;
        }
    }
    Ok(())
}

/// TRL's advice on unbalanced data (KTO paper, eq. 8): with `n_d` desirable and `n_u`
/// undesirable examples, `w_d n_d / (w_u n_u)` should lie in `[1, 4/3]`. `None` when the data
/// are balanced or one of the weights is in its range; otherwise the ranges (TRL's rounding),
/// for one weight or the other.
pub fn weight_advice(n_d: usize, n_u: usize, w_d: f64, w_u: f64) -> Option<String> {
    let (n_d, n_u) = (n_d.max(1) as f64, n_u.max(1) as f64);
    if n_d == n_u {
        return None;
    }
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let d = (round(n_u * w_u / n_d), round(n_u * w_u / n_d * 1.33));
    let u = (round(n_d * w_d / n_u / 1.33), round(n_d * w_d / n_u));
    let within = |w: f64, (lo, hi): (f64, f64)| lo <= w && w <= hi;
    if within(w_d, d) || within(w_u, u) {
        return None;
    }
    Some(format!(
        "{n_d} desirable and {n_u} undesirable examples with weights {w_d} / {w_u}: for balance (the KTO paper's eq. 8, as TRL advises) set EITHER --desirable-weight in [{}, {}] OR --undesirable-weight in [{}, {}]",
        d.0, d.1, u.0, u.1
    ))
}

/// Per-example rewards and log-probabilities, by label.
#[derive(Debug, Default)]
struct Stats {
    chosen: Vec<(f64, f64)>,
    rejected: Vec<(f64, f64)>,
    kl: Vec<f64>,
}

impl Stats {
    fn extend(&mut self, o: Stats) {
        self.chosen.extend(o.chosen);
        self.rejected.extend(o.rejected);
        self.kl.extend(o.kl);
    }

    fn metrics(&self) -> BTreeMap<String, f64> {
        let mean = |xs: &mut dyn Iterator<Item = f64>| {
            let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
            (n > 0).then(|| s / n as f64)
        };
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                m.insert(k.to_owned(), v);
            }
        };
        let (rc, rr) = (mean(&mut self.chosen.iter().map(|x| x.0)), mean(&mut self.rejected.iter().map(|x| x.0)));
        put("kl", mean(&mut self.kl.iter().copied()));
        put("rewards/chosen", rc);
        put("rewards/rejected", rr);
        put("rewards/margins", rc.zip(rr).map(|(c, r)| c - r));
        put("logps/chosen", mean(&mut self.chosen.iter().map(|x| x.1)));
        put("logps/rejected", mean(&mut self.rejected.iter().map(|x| x.1)));
        m
    }
}

/// KTO as the trainer sees it.
struct Kto<'a> {
    model: &'a Model,
    method: Method,
    /// A frozen reference model, or `None`: the trained model with its adapters off.
    reference: Option<&'a Model>,
    beta: f64,
    weights: (f64, f64),
    train: &'a [KtoItem],
    val: &'a [KtoItem],
    /// The reference's `[answer, KL pair]` log-probabilities, when precomputed.
    precomputed: Option<&'a RefLogps>,
    vars: &'a BTreeMap<String, Var>,
    batching: Batching,
    batch_size: usize,
    parallel_shards: usize,
    step: Arc<AtomicU64>,
    training: Arc<AtomicBool>,
}

/// A draw of examples: the items and, when precomputed, their reference log-probabilities.
struct Draw<'a> {
    items: Vec<&'a KtoItem>,
    refs: Option<Vec<[f64; 2]>>,
}

impl Draw<'_> {
    fn slice(&self, lo: usize, hi: usize) -> Draw<'_> {
        Draw { items: self.items[lo..hi].to_vec(), refs: self.refs.as_ref().map(|r| r[lo..hi].to_vec()) }
    }
}

impl Kto<'_> {
    /// The examples at `idx` of `set` (the training or held-out items, `train` telling which
    /// precomputed list is theirs).
    fn draw<'s>(&'s self, set: &'s [KtoItem], train: bool, idx: &[usize]) -> Draw<'s> {
        let refs = self.precomputed.map(|r| {
            let list = if train { &r.train } else { &r.val };
            idx.iter().map(|&i| list[i]).collect()
        });
        Draw { items: idx.iter().map(|&i| &set[i]).collect(), refs }
    }

    /// The reference's log-probabilities of `rows` (`which` of the precomputed pair when
    /// there is one), without gradients.
    fn reference_logps(&self, rows: &[&Tokenized], refs: Option<&[[f64; 2]]>, which: usize) -> Result<Tensor> {
        if let Some(r) = refs {
            let v: Vec<f32> = r.iter().map(|x| x[which] as f32).collect();
            return Ok(Tensor::from_vec(v, rows.len(), self.model.device())?);
        }
        let pass = |m: &Model| lmstack_core::grad::no_grad(|| seq_logps(m, rows, self.batching));
        let (s, _) = match self.reference {
            Some(m) => pass(m)?,
            None => lmstack_core::nn::without_adapters(|| pass(self.model))?,
        };
        Ok(s.detach())
    }

    /// TRL's KL estimate over a draw: the mean policy-minus-reference log-probability of its
    /// items' KL pairs, clamped at 0.
    fn kl(&self, model: &Model, d: &Draw<'_>) -> Result<f64> {
        let rows: Vec<&Tokenized> = d.items.iter().map(|i| &i.kl).collect();
        let (policy, _) = lmstack_core::grad::no_grad(|| seq_logps(model, &rows, self.batching))?;
        let reference = self.reference_logps(&rows, d.refs.as_deref(), 1)?;
        let diff = (policy.detach().to_dtype(DType::F64)? - reference.to_dtype(DType::F64)?)?;
        Ok(diff.mean_all()?.to_scalar::<f64>()?.max(0.0))
    }

    /// The KTO loss of a draw with the estimate `kl`, and its statistics.
    fn items_loss(&self, model: &Model, d: &Draw<'_>, kl: f64) -> Result<(Tensor, Stats)> {
        let items = &d.items;
        let rows: Vec<&Tokenized> = items.iter().map(|i| &i.tokens).collect();
        let reference = self.reference_logps(&rows, d.refs.as_deref(), 0)?;
        let (policy, _) = seq_logps(model, &rows, self.batching)?;
        let labels: Vec<bool> = items.iter().map(|i| i.ex.label).collect();
        let out =
            preference::kto_loss(self.beta, kl, &policy, &reference.to_dtype(policy.dtype())?, &labels, self.weights)?;
        let logps: Vec<f64> = policy.detach().to_dtype(DType::F64)?.to_vec1()?;
        let (mut c, mut r) = (out.chosen_rewards.into_iter(), out.rejected_rewards.into_iter());
        let mut stats = Stats::default();
        for (&label, lp) in labels.iter().zip(logps) {
            match label {
                true => stats.chosen.push((c.next().expect("one reward per desirable answer"), lp)),
                false => stats.rejected.push((r.next().expect("one reward per undesirable answer"), lp)),
            }
        }
        stats.kl.push(kl);
        Ok((out.loss, stats))
    }

    /// Loss and statistics over the held-out examples, in chunks of 16 (each its own KL
    /// estimate); no graph, adapters' dropout off.
    fn val_stats(&self) -> Result<(f64, Stats)> {
        finetune::evaluating(self.model, self.method, &self.training, |model| -> Result<(f64, Stats)> {
            let (mut total, mut stats) = (0.0, Stats::default());
            let idx: Vec<usize> = (0..self.val.len()).collect();
            for chunk in idx.chunks(16) {
                let d = self.draw(self.val, false, chunk);
                let kl = self.kl(model, &d)?;
                let (loss, s) = self.items_loss(model, &d, kl)?;
                total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
                stats.extend(s);
            }
            Ok((total / self.val.len().max(1) as f64, stats))
        })
    }
}

impl Objective for Kto<'_> {
    fn micro_batch(&mut self, step: u64, opt: &AdamW, rng: &mut ChaCha8Rng) -> Result<MicroBatch> {
        self.step.store(step, Ordering::Relaxed);
        let k = self.batch_size.min(self.train.len());
        let picks = rand::seq::index::sample(rng, self.train.len(), k).into_vec();
        let d = self.draw(self.train, true, &picks);
        let kl = self.kl(self.model, &d)?;
        let (loss, grads, parts) = parallel_grads(opt, k, self.parallel_shards, |lo, hi| {
            let (loss, stats) = self.items_loss(self.model, &d.slice(lo, hi), kl)?;
            Ok(Some((loss, hi - lo, stats)))
        })?;
        let mut stats = Stats::default();
        parts.into_iter().for_each(|s| stats.extend(s));
        let tokens = d.items.iter().map(|i| i.tokens.n_scored() as u64).sum();
        Ok(MicroBatch { loss, grads, tokens, metrics: stats.metrics() })
    }

    fn evaluate(&mut self, _rng: &mut ChaCha8Rng) -> Result<Option<Evaluation>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let (loss, stats) = self.val_stats()?;
        let m = stats.metrics();
        let text = format!("val loss {loss:.4}, margin {:.3}", m.get("rewards/margins").copied().unwrap_or(f64::NAN));
        Ok(Some(Evaluation { loss, perplexity: false, text, tracks_best: true, metrics: m }))
    }

    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        crate::trainer::detached(self.vars)
    }
}

/// What a KTO run reports.
#[derive(Debug, Clone, Serialize)]
pub struct KtoSummary {
    /// Steps completed.
    pub steps: u64,
    /// Stopped early on request.
    pub interrupted: bool,
    /// Held-out loss before and after.
    pub val_loss: (f64, Option<f64>),
    /// Held-out `rewards/margins` after training (desirable minus undesirable mean reward).
    pub margin: Option<f64>,
    /// Training / held-out examples used, and of the training ones the desirable.
    pub examples: (usize, usize, usize),
    /// Examples with no answer token within the length limit, left out.
    pub too_long: usize,
    /// Examples kept but cut to the length limit.
    pub truncated: usize,
    /// Pairs with the same two answers, left out (`file:line`).
    pub ties: Vec<String>,
    /// Mean wall time of the training steps alone (ms).
    pub train_ms_per_step: f64,
    /// Peak resident memory (MiB).
    pub peak_rss_mib: Option<f64>,
    /// Where the result is: `model/` or `adapter/`.
    pub output: PathBuf,
}

/// Tokenized examples of a file, each cut to `limit` tokens as `mode` says; left out: the
/// `file:line` of pairs that are ties, and examples with no answer token within the limit.
fn prepare(
    path: &Path,
    tok: &Tokenizer,
    fmt: &ChatFormat,
    (limit, mode): (usize, TruncationMode),
) -> Result<Prepared<KtoItem>> {
    let mut out = Prepared { items: Vec::new(), ties: Vec::new(), too_long: 0, truncated: 0 };
    let (examples, ties) = preference::read_unpaired(path)?;
    for ex in examples {
        let mut tokens = preference::tokenize_answer(&ex.prompt, &ex.completion, tok, fmt)
            .map_err(|e| Error::Msg(format!("{}:{}: {e}", path.display(), ex.line)))?;
        let cut = tokens.ids.len() > limit;
        if preference::truncate(&mut tokens, limit, mode) {
            out.truncated += usize::from(cut);
            // The KL pair comes once every item is read ([`assign_kl_pairs`]).
            out.items.push(KtoItem { ex, tokens, kl: Tokenized::default() });
        } else {
            out.too_long += 1;
        }
    }
    out.ties = ties.iter().map(|l| format!("{}:{l}", path.display())).collect();
    Ok(out)
}

/// The reference's `[answer, KL pair]` log-probabilities of every example, computed with
/// `model` before anything trains, in parallel chunks, without gradients.
fn precompute(model: &Model, reference: &Path, sets: [&[KtoItem]; 2], batching: Batching) -> Result<RefLogps> {
    use rayon::prelude::*;
    let one = |set: &[KtoItem]| -> Result<Vec<[f64; 2]>> {
        let parts: Vec<Result<Vec<[f64; 2]>>> = set
            .par_chunks(8)
            .map(|chunk| {
                let logps = |rows: Vec<&Tokenized>| -> Result<Vec<f64>> {
                    let (s, _) = lmstack_core::grad::no_grad(|| seq_logps(model, &rows, batching))?;
                    Ok(s.to_dtype(DType::F64)?.to_vec1()?)
                };
                let answers = logps(chunk.iter().map(|i| &i.tokens).collect())?;
                let kl = logps(chunk.iter().map(|i| &i.kl).collect())?;
                Ok(answers.into_iter().zip(kl).map(|(a, k)| [a, k]).collect())
            })
            .collect();
        Ok(parts.into_iter().collect::<Result<Vec<_>>>()?.concat())
    };
    Ok(RefLogps { reference: reference.to_owned(), train: one(sets[0])?, val: one(sets[1])? })
}

/// Runs (or with `resume`, continues) a KTO run.
pub fn run(cfg: &FinetuneConfig, opts: &RunOptions) -> Result<KtoSummary> {
    let resume = opts.resume;
    let out = &cfg.out_dir;
    let Setup { base, tok, fmt, max_len, limit, pad, ref_model, resume_from } = setup(cfg, opts, finetune::Task::Kto)?;
    let mut data = prepare(&cfg.data, &tok, &fmt, limit)?;
    let mut train = std::mem::take(&mut data.items);
    let mut val = match &cfg.val_data {
        Some(p) => data.count(prepare(p, &tok, &fmt, limit)?),
        None => finetune::split_off_val(&mut train, cfg),
    };
    let Prepared { ties, too_long, truncated, .. } = data;
    if train.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no example has an answer within {} tokens ({too_long} left out)",
            cfg.data.display(),
            limit.0
        )));
    }
    assign_kl_pairs(&mut train, cfg.batch_size, &tok, &fmt)?;
    assign_kl_pairs(&mut val, 16, &tok, &fmt)?;
    // KL pairs (a prompt with another prompt's answer) are cut to the same limit, as TRL cuts
    // its KL sequences; one left without an answer token adds nothing to the KL estimate.
    for item in train.iter_mut().chain(val.iter_mut()) {
        preference::truncate(&mut item.kl, limit.0, limit.1);
    }
    let desirable = train.iter().filter(|i| i.ex.label).count();
    // The reference's log-probabilities computed once, before any weight changes (a resumed
    // run reads them back).
    let ref_name = cfg.ref_model.clone().unwrap_or_else(|| cfg.base.clone());
    let batching = Batching { max_len, pad, padding_free: cfg.padding_free };
    let precomputed = reference_cache(cfg, resume, (train.len(), val.len()), || {
        precompute(ref_model.as_ref().unwrap_or(&base.model), &ref_name, [&train, &val], batching)
    })?;
    // Full finetuning with the base as the reference keeps a frozen copy of the base's weights.
    let base_reference = (precomputed.is_none() && ref_model.is_none() && cfg.method == Method::Full)
        .then(|| frozen(&base.model))
        .transpose()?;
    let step_counter = Arc::new(AtomicU64::new(0));
    let training = Arc::new(AtomicBool::new(false));
    let (mut model, vars) =
        finetune::trainable_model(cfg, base.model, &tok, resume_from.as_ref(), step_counter.clone(), training.clone())?;
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)?;
    let mut trainer = finetune::new_trainer(cfg, vars.clone(), resume_from, opts)?;
    let mut objective = Kto {
        model: &model,
        method: cfg.method,
        reference: ref_model.as_ref().or(base_reference.as_ref()),
        beta: cfg.beta,
        weights: (cfg.desirable_weight, cfg.undesirable_weight),
        train: &train,
        val: &val,
        precomputed: precomputed.as_ref(),
        vars: &vars,
        batching,
        batch_size: cfg.batch_size,
        parallel_shards: cfg.parallel_shards,
        step: step_counter,
        training: training.clone(),
    };
    let before = if val.is_empty() || resume { None } else { Some(objective.val_stats()?) };
    if let Some((loss, stats)) = &before {
        trainer.log.write(&Record::val(0, *loss, false).with_metrics(stats.metrics()))?;
    }
    println!(
        "{:?} KTO (beta {}, weights {} / {}) of {}: {} train ({desirable} desirable) / {} held-out examples ({too_long} with no answer token within {} tokens and {} tied pairs left out; {truncated} cut to {} tokens)",
        cfg.method,
        cfg.beta,
        cfg.desirable_weight,
        cfg.undesirable_weight,
        cfg.base.display(),
        train.len(),
        val.len(),
        limit.0,
        ties.len(),
        limit.0,
    );
    if let Some(advice) =
        weight_advice(desirable, train.len() - desirable, cfg.desirable_weight, cfg.undesirable_weight)
    {
        eprintln!("note: {advice}");
    }
    if resume {
        println!("resuming at step {} of {}", trainer.state.step, cfg.max_steps);
    }
    training.store(true, Ordering::Relaxed);
    let outcome = trainer.run(&cfg.loop_config(), &mut objective)?;
    training.store(false, Ordering::Relaxed);
    trainer.write_loss_plot(out, &format!("{:?} KTO, {} steps", cfg.method, trainer.state.step))?;
    let after = if outcome.interrupted || val.is_empty() { None } else { Some(objective.val_stats()?) };
    let output = finetune::write_result(cfg, &mut model, tok.clone(), &fmt, &vars)?;
    let summary = KtoSummary {
        steps: trainer.state.step,
        interrupted: outcome.interrupted,
        val_loss: (before.as_ref().map_or(f64::NAN, |b| b.0), after.as_ref().map(|a| a.0)),
        margin: after.as_ref().and_then(|a| a.1.metrics().get("rewards/margins").copied()),
        examples: (train.len(), val.len(), desirable),
        too_long,
        truncated,
        ties,
        train_ms_per_step: outcome.train_ms_per_step(),
        peak_rss_mib: peak_rss_mib(),
        output,
    };
    lmstack_core::io::write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::weight_advice;

    /// The ranges TRL 1.16's `KTOTrainer` prints for the same counts and weights.
    #[test]
    fn weight_advice_gives_trls_ranges() {
        let a = weight_advice(23699, 8301, 1.0, 1.0).unwrap();
        assert!(
            a.contains("--desirable-weight in [0.35, 0.47]") && a.contains("--undesirable-weight in [2.15, 2.85]"),
            "{a}"
        );
        assert_eq!(weight_advice(23699, 8301, 1.0, 2.5), None);
        assert_eq!(weight_advice(23699, 8301, 0.4, 1.0), None);
        // 100 / 80 with equal weights: the ratio 1.25 is within [1, 4/3].
        assert_eq!(weight_advice(100, 80, 1.0, 1.0), None);
        assert_eq!(weight_advice(64, 64, 1.0, 3.0), None, "balanced data");
    }
}
