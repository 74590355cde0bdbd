//! Masked-LM classification: a BERT-type model pretrained with the masked-LM objective (or any
//! Hugging Face bert directory) gets `BertForSequenceClassification`'s head — a pooler (dense +
//! tanh on the first token) and a linear classifier, freshly initialised — and every weight
//! trains on JSONL `{"text", "label"}` (labels are strings or integers). Accuracy is reported
//! on the held-out split before and after; the saved model directory carries `id2label`, so it
//! predicts label names for new text ([`predict`], `train sample --model DIR --classify TEXT`).
//!
//! An objective of the one training loop ([`crate::trainer`]), so the same machinery as the other runs: AdamW with checkpointable moments, warmup + cosine,
//! clipping, seeded batches, atomic checkpoints with `--resume`, `metrics.jsonl`, `loss.svg`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lmstack_core::kernels::ops::cross_entropy;
use lmstack_core::params::ParamStore;
use lmstack_core::{Model, ModelConfig, Pretrained, Tokenizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use crate::finetune::FinetuneConfig;
use crate::optim::{self, AdamW};
use crate::runlog::{self, Record};
use crate::trainer::{frozen, peak_rss_mib, Evaluation, LoopConfig, MicroBatch, Objective, RunOptions};
use crate::{Error, Result};

/// A labelled text.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    /// The text.
    pub text: String,
    /// The label, as written.
    pub label: String,
}

/// Reads `{"text", "label"}` lines; errors name `file:line` and the field.
pub fn read_labelled(path: &Path) -> Result<Vec<Labelled>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Msg(format!("{at}: not JSON: {e}")))?;
        let t = v["text"].as_str().ok_or_else(|| Error::Msg(format!("{at}: `text`: expected a string")))?;
        let label = match &v["label"] {
            Value::String(s) => s.clone(),
            Value::Number(n) if n.is_u64() => n.to_string(),
            _ => return Err(Error::Msg(format!("{at}: `label`: expected a string or a non-negative integer"))),
        };
        out.push(Labelled { text: t.to_owned(), label });
    }
    if out.is_empty() {
        return Err(Error::Msg(format!("{}: no examples", path.display())));
    }
    Ok(out)
}

/// Token ids, cut to `max_len`.
fn encode(tok: &Tokenizer, text: &str, max_len: usize) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, true)?;
    if ids.is_empty() {
        ids.push(tok.pad_id().unwrap_or(0));
    }
    ids.truncate(max_len);
    Ok(ids)
}

/// Input ids and attention mask `[b, t]`, right-padded.
fn pad_batch(seqs: &[&Vec<u32>], pad: u32, dev: &Device) -> Result<(Tensor, Tensor)> {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad, t - s.len()));
        mask.extend(std::iter::repeat_n(1u32, s.len()));
        mask.extend(std::iter::repeat_n(0u32, t - s.len()));
    }
    Ok((Tensor::from_vec(ids, (seqs.len(), t), dev)?, Tensor::from_vec(mask, (seqs.len(), t), dev)?))
}

/// Label probabilities for each text, most likely first.
pub fn predict(p: &Pretrained, texts: &[&str]) -> Result<Vec<Vec<(String, f32)>>> {
    let names = match p.model.config() {
        ModelConfig::Bert(b) => b.labels(),
        _ => return Err(Error::Msg("label prediction needs a bert classification model".into())),
    };
    let pad = p.tokenizer.pad_id().unwrap_or(0);
    let mut out = Vec::new();
    for chunk in texts.chunks(64) {
        let seqs: Vec<Vec<u32>> =
            chunk.iter().map(|t| encode(&p.tokenizer, t, p.model.max_len())).collect::<Result<_>>()?;
        let refs: Vec<&Vec<u32>> = seqs.iter().collect();
        let (ids, mask) = pad_batch(&refs, pad, p.model.device())?;
        let logits = p.model.classify(&ids, Some(&mask), None)?.to_vec2::<f32>()?;
        for row in logits {
            let probs: Vec<f32> = lmstack_core::sampling::log_softmax(&row).iter().map(|l| l.exp()).collect();
            let mut v: Vec<(String, f32)> = probs
                .iter()
                .enumerate()
                .map(|(i, &q)| (names.get(i).cloned().unwrap_or_else(|| format!("LABEL_{i}")), q))
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            out.push(v);
        }
    }
    Ok(out)
}

fn accuracy(model: &Model, xs: &[(Vec<u32>, u32)], pad: u32) -> Result<f64> {
    let mut right = 0usize;
    for chunk in xs.chunks(64) {
        let refs: Vec<&Vec<u32>> = chunk.iter().map(|x| &x.0).collect();
        let (ids, mask) = pad_batch(&refs, pad, model.device())?;
        let logits = model.classify(&ids, Some(&mask), None)?.to_vec2::<f32>()?;
        for (row, (_, y)) in logits.iter().zip(chunk) {
            right += usize::from(lmstack_core::sampling::argmax(row) == *y);
        }
    }
    Ok(right as f64 / xs.len().max(1) as f64)
}

/// What a classification run reports.
#[derive(Debug, Clone, Serialize)]
pub struct ClassifySummary {
    /// Steps completed.
    pub steps: u64,
    /// Stopped early on request.
    pub interrupted: bool,
    /// The labels, by id.
    pub labels: Vec<String>,
    /// Held-out accuracy with the fresh head (chance level) and after training.
    pub accuracy: (f64, Option<f64>),
    /// Accuracy of always answering the most frequent training label.
    pub majority_baseline: f64,
    /// Training / held-out examples.
    pub examples: (usize, usize),
    /// Parameters.
    pub parameters: usize,
    /// Mean wall time per step (ms).
    pub ms_per_step: f64,
    /// Peak resident memory (MiB).
    pub peak_rss_mib: Option<f64>,
    /// The saved model directory.
    pub output: PathBuf,
}

/// Classification as the trainer sees it: a random batch of labelled texts and the
/// cross-entropy of the head's logits; evaluation is the held-out error rate (1 − accuracy).
struct Classification<'a> {
    model: &'a Model,
    train: &'a [(Vec<u32>, u32)],
    val: &'a [(Vec<u32>, u32)],
    pad: u32,
    batch_size: usize,
}

impl Objective for Classification<'_> {
    fn micro_batch(&mut self, _step: u64, opt: &AdamW, rng: &mut ChaCha8Rng) -> Result<MicroBatch> {
        let k = self.batch_size.min(self.train.len());
        let picks = rand::seq::index::sample(rng, self.train.len(), k);
        let refs: Vec<&Vec<u32>> = picks.iter().map(|i| &self.train[i].0).collect();
        let ys: Vec<u32> = picks.iter().map(|i| self.train[i].1).collect();
        let dev = self.model.device();
        let (ids, mask) = pad_batch(&refs, self.pad, dev)?;
        let logits = self.model.classify(&ids, Some(&mask), None)?;
        let (loss, _) = cross_entropy(&logits, &Tensor::new(ys.as_slice(), dev)?)?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = if l.is_finite() { optim::collect_grads(opt, &loss.backward()?)? } else { HashMap::new() };
        Ok(MicroBatch { loss: l, grads, tokens: 0, metrics: BTreeMap::new() })
    }

    fn evaluate(&mut self, _rng: &mut ChaCha8Rng) -> Result<Option<Evaluation>> {
        let acc = accuracy(&frozen(self.model)?, self.val, self.pad)?;
        let text = format!("held-out accuracy {acc:.3}");
        Ok(Some(Evaluation { loss: 1.0 - acc, perplexity: false, text, tracks_best: false, metrics: BTreeMap::new() }))
    }

    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        self.model.params().tensors()
    }
}

/// Trains a classification head (and the encoder under it) as `cfg` says; `val_data` (or a
/// `val_fraction` of `data`) is the held-out split accuracy is measured on.
pub fn run(cfg: &FinetuneConfig, opts: &RunOptions) -> Result<ClassifySummary> {
    let resume = opts.resume;
    cfg.validate()?;
    if cfg.task != crate::finetune::Task::Classify {
        return Err(Error::Msg("classification runs need `task: classify` in their configuration".into()));
    }
    let out = &cfg.out_dir;
    let resume_from = crate::finetune::prepare_run_dir(cfg, opts)?;
    let dev = Device::Cpu;
    let base = Pretrained::load(&cfg.base, DType::F32, &dev)?;
    if base.model.as_bert().is_none() {
        return Err(Error::Msg(format!(
            "--base {}: classification needs a bert model (pretrain one with `train --arch bert`); this is {}",
            cfg.base.display(),
            base.model.config().model_type_str()
        )));
    }
    let tok = base.tokenizer.clone();
    let max_len = base.model.max_len();
    let pad = tok.pad_id().unwrap_or(0);
    let train_raw = read_labelled(&cfg.data)?;
    let (train_raw, val_raw) = match &cfg.val_data {
        Some(p) => (train_raw, read_labelled(p)?),
        None => {
            use rand::seq::SliceRandom;
            let mut all = train_raw;
            all.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
            let n_val = ((all.len() as f64 * cfg.val_fraction).round() as usize).clamp(1, all.len() - 1);
            let train = all.split_off(n_val);
            (train, all)
        }
    };
    let labels: Vec<String> = {
        let mut l: Vec<String> = train_raw.iter().map(|x| x.label.clone()).collect();
        l.sort();
        l.dedup();
        l
    };
    if labels.len() < 2 {
        return Err(Error::Msg(format!("{}: `label` takes only one value; nothing to classify", cfg.data.display())));
    }
    let id_of: HashMap<&str, u32> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i as u32)).collect();
    let prep = |xs: &[Labelled], file: &Path| -> Result<Vec<(Vec<u32>, u32)>> {
        xs.iter()
            .map(|x| {
                let y = *id_of.get(x.label.as_str()).ok_or_else(|| {
                    Error::Msg(format!("{}: label `{}` never occurs in the training data", file.display(), x.label))
                })?;
                Ok((encode(&tok, &x.text, max_len)?, y))
            })
            .collect()
    };
    let train = prep(&train_raw, &cfg.data)?;
    let val = prep(&val_raw, cfg.val_data.as_deref().unwrap_or(&cfg.data))?;
    let mut counts = vec![0usize; labels.len()];
    train.iter().for_each(|x| counts[x.1 as usize] += 1);
    let majority = counts.iter().enumerate().max_by_key(|c| c.1).map(|c| c.0 as u32).unwrap_or(0);
    let majority_baseline = val.iter().filter(|x| x.1 == majority).count() as f64 / val.len() as f64;

    // The classification model: the base's config with the head and its labels.
    let mut cj = base.model.config_json();
    cj["architectures"] = json!(["BertForSequenceClassification"]);
    cj["id2label"] =
        json!(labels.iter().enumerate().map(|(i, l)| (i.to_string(), l.clone())).collect::<BTreeMap<_, _>>());
    cj["label2id"] = json!(labels.iter().enumerate().map(|(i, l)| (l.clone(), i)).collect::<BTreeMap<_, _>>());
    let mcfg = ModelConfig::from_value(cj, "classification config")?;
    let mut weights: HashMap<String, Tensor> = base.model.params().tensors().into_iter().collect();
    let parameters_src = cfg.base.join("model.safetensors").display().to_string();
    drop(base);
    if let Some(l) = &resume_from {
        weights = l.weights.clone();
    }
    let store = ParamStore::trainable(weights, &parameters_src, Some(cfg.seed));
    let model = Model::new(mcfg, &store, DType::F32, &dev)?;
    let parameters = model.num_parameters();
    let mut trainer = crate::finetune::new_trainer(cfg, model.params().vars(), resume_from, opts)?;
    // The log's step-0 record is the error rate before training (1 − accuracy); a resumed run
    // reports that as its "before", not the accuracy of the partly trained model it resumes.
    let logged = if resume { runlog::initial_val(trainer.log.path())? } else { None };
    let acc_before = match logged {
        Some(err) => 1.0 - err,
        None => accuracy(&frozen(&model)?, &val, pad)?,
    };
    if !resume && !val.is_empty() {
        trainer.log.write(&Record::val(0, 1.0 - acc_before, false))?;
    }
    println!(
        "classification finetuning of {} ({parameters} parameters): labels {labels:?}; {} train / {} held-out examples; held-out accuracy {}: {acc_before:.3} (majority label: {majority_baseline:.3})",
        cfg.base.display(),
        train.len(),
        val.len(),
        if resume && logged.is_none() { format!("at step {}", trainer.state.step) } else { "before".to_owned() }
    );
    if resume {
        println!("resuming at step {} of {}", trainer.state.step, cfg.max_steps);
    }
    // One batch per step: classification runs never accumulated.
    let loop_cfg = LoopConfig { grad_accum: 1, ..cfg.loop_config() };
    let mut objective = Classification { model: &model, train: &train, val: &val, pad, batch_size: cfg.batch_size };
    let outcome = trainer.run(&loop_cfg, &mut objective)?;
    let title = format!("classification, {} steps (val: error rate)", trainer.state.step);
    trainer.write_loss_plot(out, &title)?;
    let output = out.join("model");
    let after = if outcome.interrupted {
        None
    } else {
        let m = frozen(&model)?;
        let acc = accuracy(&m, &val, pad)?;
        Pretrained { model: m, tokenizer: tok, dir: None }.save(&output)?;
        Some(acc)
    };
    let summary = ClassifySummary {
        steps: trainer.state.step,
        interrupted: outcome.interrupted,
        labels,
        accuracy: (acc_before, after),
        majority_baseline,
        examples: (train.len(), val.len()),
        parameters,
        ms_per_step: outcome.ms_per_step(),
        peak_rss_mib: peak_rss_mib(),
        output,
    };
    lmstack_core::io::write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}

/// The top `k` tokens (and probabilities) for each `[MASK]` in `text`, from a masked LM.
pub fn fill_mask(p: &Pretrained, text: &str, k: usize) -> Result<Vec<Vec<(String, f32)>>> {
    let mask_tok =
        p.tokenizer.special_tokens().mask.clone().ok_or_else(|| {
            Error::Msg("the model's tokenizer has no mask token; --fill needs a masked LM (bert)".into())
        })?;
    let mask_id = p.tokenizer.mask_id().ok_or_else(|| Error::Msg("the tokenizer has no mask token id".into()))?;
    if !text.contains(mask_tok.as_str()) {
        return Err(Error::Msg(format!("--fill: the text has no `{mask_tok}` to fill")));
    }
    let bert = p.model.as_bert().ok_or_else(|| Error::Msg("--fill needs a bert model".into()))?;
    let ids = encode(&p.tokenizer, text, p.model.max_len())?;
    let input = Tensor::new(ids.as_slice(), p.model.device())?.unsqueeze(0)?;
    let hidden = p.model.hidden_states(&input, None, None)?;
    let logits = bert.mlm_logits(&hidden)?.squeeze(0)?.to_vec2::<f32>()?;
    let mut out = Vec::new();
    for (pos, _) in ids.iter().enumerate().filter(|(_, &t)| t == mask_id) {
        let probs: Vec<f32> = lmstack_core::sampling::log_softmax(&logits[pos]).iter().map(|l| l.exp()).collect();
        let mut v: Vec<(u32, f32)> = probs.iter().enumerate().map(|(i, &q)| (i as u32, q)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        out.push(
            v.into_iter()
                .filter(|(t, _)| *t != mask_id)
                .take(k)
                .map(|(t, q)| (p.tokenizer.decode(&[t], false).unwrap_or_default(), q))
                .collect(),
        );
    }
    Ok(out)
}
