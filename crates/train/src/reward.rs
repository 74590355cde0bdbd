//! Reward models (`train finetune --task reward`, TRL's `RewardTrainer`): a causal LM with a
//! one-label sequence-classification head (`score`, pooled at the last non-pad token:
//! [`Model::score`]) trained on chosen/rejected pairs ([`crate::preference`]) with the
//! Bradley–Terry loss `−log σ(r(chosen) − r(rejected))`. Every weight trains; the result is a
//! `…ForSequenceClassification` model directory (`num_labels` 1, `pad_token_id` set) that
//! `transformers` loads, and that [`score_text`] (`train sample --reward`) runs.
//!
//! Logged as TRL logs them: the loss, `accuracy` (chosen scored above rejected), `margin`,
//! `min_reward`, `mean_reward`, `max_reward`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use lmstack_core::examples::pad_right;
use lmstack_core::params::ParamStore;
use lmstack_core::{Model, ModelConfig, Pretrained, Tokenizer};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::batches::parallel_grads;
use crate::dpo::PairTokens;
use crate::finetune::{self, FinetuneConfig, Method};
use crate::optim::AdamW;
use crate::runlog::{DataOrder, Record};
use crate::sft::{self, ChatFormat, Example};
use crate::trainer::{peak_rss_mib, Evaluation, MicroBatch, Objective, RunOptions};
use crate::{Error, Result};

/// The scores of pairs' chosen and rejected sequences (`[n]` each), one padded batch.
fn pair_scores(model: &Model, pairs: &[&PairTokens], pad: u32) -> Result<(Tensor, Tensor)> {
    let n = pairs.len();
    let rows: Vec<&[u32]> =
        pairs.iter().map(|p| p.chosen.ids.as_slice()).chain(pairs.iter().map(|p| p.rejected.ids.as_slice())).collect();
    let s = model.score(&pad_right(&rows, pad, model.device())?)?.squeeze(1)?;
    Ok((s.narrow(0, 0, n)?, s.narrow(0, n, n)?))
}

/// Bradley–Terry loss of scored pairs, and its statistics.
fn bradley_terry(chosen: &Tensor, rejected: &Tensor) -> Result<(Tensor, Stats)> {
    let d = (chosen - rejected)?;
    // −log σ(d) = max(−d, 0) + log(1 + e^{−|d|}), stable and differentiable.
    let loss = ((d.neg()?.relu()? + (d.abs()?.neg()?.exp()? + 1.0)?.log()?)?).mean_all()?;
    let v = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.detach().to_dtype(DType::F64)?.to_vec1()?) };
    Ok((loss, Stats { chosen: v(chosen)?, rejected: v(rejected)? }))
}

/// Scores of a batch's chosen and rejected sequences.
#[derive(Debug, Default)]
struct Stats {
    chosen: Vec<f64>,
    rejected: Vec<f64>,
}

impl Stats {
    fn extend(&mut self, o: Stats) {
        self.chosen.extend(o.chosen);
        self.rejected.extend(o.rejected);
    }

    /// TRL's logged figures: `accuracy`, `margin`, `min_reward`, `mean_reward`, `max_reward`.
    fn metrics(&self) -> BTreeMap<String, f64> {
        let n = self.chosen.len().max(1) as f64;
        let pairs = || self.chosen.iter().zip(&self.rejected);
        let all = || self.chosen.iter().chain(&self.rejected).copied();
        [
            ("accuracy", pairs().filter(|(c, r)| c > r).count() as f64 / n),
            ("margin", pairs().map(|(c, r)| c - r).sum::<f64>() / n),
            ("min_reward", all().fold(f64::INFINITY, f64::min)),
            ("mean_reward", all().sum::<f64>() / (2.0 * n)),
            ("max_reward", all().fold(f64::NEG_INFINITY, f64::max)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// Reward modelling as the trainer sees it.
struct RewardObjective<'a> {
    model: &'a Model,
    /// `data_order.jsonl`: the pairs each micro-batch drew.
    order: DataOrder,
    train: &'a [PairTokens],
    val: &'a [PairTokens],
    vars: &'a BTreeMap<String, Var>,
    pad: u32,
    batch_size: usize,
    parallel_shards: usize,
    method: Method,
    /// The step, for the adapters' dropout masks.
    step: Arc<AtomicU64>,
    /// Whether the adapters' dropout is on.
    training: Arc<AtomicBool>,
}

impl RewardObjective<'_> {
    /// Loss and scores over the held-out pairs (no graph).
    fn val_stats(&self) -> Result<(f64, Stats)> {
        finetune::evaluating(self.model, self.method, &self.training, |model| {
            let (mut total, mut stats) = (0.0, Stats::default());
            for chunk in self.val.chunks(16) {
                let pairs: Vec<&PairTokens> = chunk.iter().collect();
                let (c, r) = pair_scores(model, &pairs, self.pad)?;
                let (loss, s) = bradley_terry(&c, &r)?;
                total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
                stats.extend(s);
            }
            Ok((total / self.val.len().max(1) as f64, stats))
        })
    }
}

impl Objective for RewardObjective<'_> {
    fn micro_batch(&mut self, step: u64, opt: &AdamW, rng: &mut ChaCha8Rng) -> Result<MicroBatch> {
        self.step.store(step, Ordering::Relaxed);
        let k = self.batch_size.min(self.train.len());
        let picks = rand::seq::index::sample(rng, self.train.len(), k).into_vec();
        self.order.step(step, picks.iter().map(|&i| self.train[i].index))?;
        let (loss, grads, parts) = parallel_grads(opt, k, self.parallel_shards, |lo, hi| {
            let pairs: Vec<&PairTokens> = picks[lo..hi].iter().map(|&i| &self.train[i]).collect();
            let (c, r) = pair_scores(self.model, &pairs, self.pad)?;
            let (loss, stats) = bradley_terry(&c, &r)?;
            Ok(Some((loss, hi - lo, stats)))
        })?;
        let mut stats = Stats::default();
        parts.into_iter().for_each(|s| stats.extend(s));
        let tokens = picks.iter().map(|&i| (self.train[i].chosen.ids.len() + self.train[i].rejected.ids.len()) as u64);
        Ok(MicroBatch { loss, grads, tokens: tokens.sum(), metrics: stats.metrics() })
    }

    fn evaluate(&mut self, _rng: &mut ChaCha8Rng) -> Result<Option<Evaluation>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let (loss, stats) = self.val_stats()?;
        let m = stats.metrics();
        let text = format!("val loss {loss:.4}, accuracy {:.3}, margin {:.3}", m["accuracy"], m["margin"]);
        Ok(Some(Evaluation { loss, perplexity: false, text, tracks_best: true, metrics: m }))
    }

    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        crate::trainer::detached(self.vars)
    }
}

/// What a reward-model run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RewardSummary {
    /// Steps completed.
    pub steps: u64,
    /// Stopped early on request.
    pub interrupted: bool,
    /// Held-out accuracy (chosen scored above rejected) before (the fresh head) and after.
    pub accuracy: (f64, Option<f64>),
    /// Held-out loss before and after.
    pub val_loss: (f64, Option<f64>),
    /// Training / held-out pairs used.
    pub pairs: (usize, usize),
    /// Pairs left out: the same two answers (their lines), longer than the context.
    pub left_out: (Vec<String>, usize),
    /// Mean wall time of the training steps alone (ms).
    pub train_ms_per_step: f64,
    /// Peak resident memory (MiB).
    pub peak_rss_mib: Option<f64>,
    /// The model directory written.
    pub output: PathBuf,
}

/// The pad token that ends each row's scored part: the config's, else the tokenizer's pad or
/// EOS, else id 0.
pub(crate) fn pad_id(cfg: &ModelConfig, tok: &Tokenizer) -> u32 {
    cfg.token_id("pad_token_id").or(tok.pad_id()).or(tok.eos_id()).unwrap_or(0)
}

/// The configuration of `base` as a one-label sequence classifier, its pad token set.
pub(crate) fn scorer_config(base: &ModelConfig, pad: u32) -> Result<ModelConfig> {
    let mut j = base.to_value();
    let class = match base {
        ModelConfig::Gpt2(_) => "GPT2ForSequenceClassification".to_owned(),
        ModelConfig::Llama(c) => c.family.causal_lm_class().replace("ForCausalLM", "ForSequenceClassification"),
        ModelConfig::Bert(_) => return Err(Error::Msg("a reward model needs a causal LM base".into())),
    };
    j["architectures"] = serde_json::json!([class]);
    j["id2label"] = serde_json::json!({"0": "LABEL_0"});
    j["label2id"] = serde_json::json!({"LABEL_0": 0});
    j["pad_token_id"] = serde_json::json!(pad);
    Ok(ModelConfig::from_value(j, "reward model config")?)
}

/// Runs (or with `resume`, continues) a reward-model run.
pub fn run(cfg: &FinetuneConfig, opts: &RunOptions) -> Result<RewardSummary> {
    let resume = opts.resume;
    cfg.validate()?;
    if cfg.task != finetune::Task::Reward {
        return Err(Error::Msg("reward::run trains --task reward runs".into()));
    }
    let out = &cfg.out_dir;
    let resume_from = finetune::prepare_run_dir(cfg, opts)?;
    let dev = Device::Cpu;
    let base = Pretrained::load(&cfg.base, DType::F32, &dev)?;
    if !base.model.config().is_causal() {
        return Err(Error::Msg(format!(
            "--base {}: a {} model is a masked LM; a reward model here is a causal LM with a score head",
            cfg.base.display(),
            base.model.config().model_type_str()
        )));
    }
    let tok: Tokenizer = base.tokenizer.clone();
    let fmt = ChatFormat::from_spec(&cfg.chat_template, &tok)?;
    let max_len = base.model.max_len();
    let pad = pad_id(base.model.config(), &tok);
    let fits = |p: &PairTokens| p.chosen.ids.len().max(p.rejected.ids.len()) <= max_len;
    let read = |path: &std::path::Path| -> Result<(Vec<PairTokens>, Vec<String>, usize)> {
        // Nothing cut (as TRL's RewardTrainer, longer pairs are left out).
        let all = crate::dpo::prepare(path, &tok, &fmt, (usize::MAX, Default::default()))?;
        let before = all.items.len();
        let kept: Vec<PairTokens> = all.items.into_iter().filter(|p| fits(p)).collect();
        let long = all.too_long + before - kept.len();
        Ok((kept, all.ties, long))
    };
    let (mut train, mut ties, mut too_long) = read(&cfg.data)?;
    let val = match &cfg.val_data {
        Some(p) => {
            let (v, t, l) = read(p)?;
            ties.extend(t);
            too_long += l;
            v
        }
        None => finetune::split_off_val(&mut train, cfg),
    };
    if train.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no pair fits the model's context of {max_len} tokens ({too_long} longer)",
            cfg.data.display()
        )));
    }

    // The model: the base's weights (its LM head dropped) and a fresh `score` head. Full:
    // every weight trains (from the checkpoint's values on resume). LoRA: the base stays
    // frozen, adapters train on its projections and the head trains whole beside them (PEFT's
    // `modules_to_save`), its variable named as PEFT saves it.
    let mcfg =
        if base.model.is_scorer() { base.model.config().clone() } else { scorer_config(base.model.config(), pad)? };
    let mut weights: HashMap<String, Tensor> = base.model.params().tensors().into_iter().collect();
    if !base.model.is_scorer() {
        weights.remove("lm_head.weight");
    }
    drop(base);
    let src = cfg.base.display().to_string();
    let step_counter = Arc::new(AtomicU64::new(0));
    let training = Arc::new(AtomicBool::new(false));
    let (mut model, vars) = match cfg.method {
        Method::Full => {
            if let Some(l) = &resume_from {
                weights = l.weights.clone();
            }
            let store = ParamStore::trainable(weights, &src, Some(cfg.seed));
            let model = Model::new(mcfg, &store, DType::F32, &dev)?;
            let vars = model.params().vars();
            (model, vars)
        }
        Method::Lora => {
            let store = ParamStore::frozen_except(weights, &src, &["score.weight"], Some(cfg.seed));
            let model = Model::new(mcfg, &store, DType::F32, &dev)?;
            let score = model.params().vars().remove("score.weight").ok_or_else(|| {
                Error::Msg(format!("--base {}: the model built no `score.weight` head", cfg.base.display()))
            })?;
            let (model, mut vars) = finetune::trainable_model(
                cfg,
                model,
                &tok,
                resume_from.as_ref(),
                step_counter.clone(),
                training.clone(),
            )?;
            let key = "base_model.model.score.weight";
            if let Some(l) = &resume_from {
                let t = l
                    .weights
                    .get(key)
                    .ok_or_else(|| Error::Msg(format!("{}: the checkpoint has no `{key}`", l.dir.display())))?;
                score.set(t)?;
            }
            vars.insert(key.to_owned(), score);
            (model, vars)
        }
    };
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)?;
    let trainable_parameters: usize = vars.values().map(|v| v.elem_count()).sum();
    let mut trainer = finetune::new_trainer(cfg, vars.clone(), resume_from, opts)?;
    let val_index: Vec<usize> = val.iter().map(|p| p.index).collect();
    let mut objective = RewardObjective {
        model: &model,
        order: DataOrder::open(out, resume, &val_index, cfg.val_data.is_some())?,
        train: &train,
        val: &val,
        vars: &vars,
        pad,
        batch_size: cfg.batch_size,
        parallel_shards: cfg.parallel_shards,
        method: cfg.method,
        step: step_counter,
        training: training.clone(),
    };
    let before = if val.is_empty() || resume { None } else { Some(objective.val_stats()?) };
    if let Some((loss, stats)) = &before {
        trainer.log.write(&Record::val(0, *loss, false).with_metrics(stats.metrics()))?;
    }
    println!(
        "{:?} reward model from {} ({} parameters; {trainable_parameters} trainable): {} train / {} held-out pairs ({} left out: {} with the same answers, {} longer than {max_len} tokens)",
        cfg.method,
        cfg.base.display(),
        model.num_parameters(),
        train.len(),
        val.len(),
        ties.len() + too_long,
        ties.len(),
        too_long
    );
    if resume {
        println!("resuming at step {} of {}", trainer.state.step, cfg.max_steps);
    }
    training.store(true, Ordering::Relaxed);
    let outcome = trainer.run(&cfg.loop_config(), &mut objective)?;
    training.store(false, Ordering::Relaxed);
    trainer.write_loss_plot(out, &format!("reward model, {} steps", trainer.state.step))?;
    let after = if outcome.interrupted || val.is_empty() { None } else { Some(objective.val_stats()?) };
    let output = match cfg.method {
        Method::Full => finetune::write_result(cfg, &mut model, tok, &fmt, &vars)?,
        // The adapter (PEFT's layout, which `AutoModelForSequenceClassification` + `PeftModel`
        // load), and the model it makes with its base, ready to score with.
        Method::Lora => {
            let adapter = finetune::write_result(cfg, &mut model, tok, &fmt, &vars)?;
            let merged = out.join("model");
            finetune::merge(&cfg.base, &adapter, &merged)?;
            merged
        }
    };
    let acc = |s: &Option<(f64, Stats)>| s.as_ref().map(|(_, st)| st.metrics()["accuracy"]);
    let summary = RewardSummary {
        steps: trainer.state.step,
        interrupted: outcome.interrupted,
        accuracy: (acc(&before).unwrap_or(f64::NAN), acc(&after)),
        val_loss: (before.as_ref().map_or(f64::NAN, |b| b.0), after.as_ref().map(|a| a.0)),
        pairs: (train.len(), val.len()),
        left_out: (ties, too_long),
        train_ms_per_step: outcome.train_ms_per_step(),
        peak_rss_mib: peak_rss_mib(),
        output,
    };
    lmstack_core::io::write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}

/// The reward `p` (a reward model) gives `text`: a JSON list of chat messages rendered with the
/// model's chat template, or plain text (followed by EOS), tokenized as training tokenized its
/// pairs ([`Pretrained::rewards`]).
pub fn score_text(p: &Pretrained, text: &str) -> Result<f64> {
    let ex = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(list)) => {
            Example::Chat(sft::parse_messages(&list, "--reward").map_err(|e| Error::Msg(format!("--reward: {e}")))?)
        }
        _ => Example::Completion { prompt: String::new(), completion: text.to_owned() },
    };
    let ids = p
        .reward_format()
        .and_then(|fmt| p.reward_tokens(&ex, &fmt))
        .map_err(|e| Error::Msg(format!("--reward: {e}")))?;
    Ok(p.rewards(&[ids], 1)?[0])
}
