//! The pretraining loop: causal LM (gpt2, llama) or masked LM (bert) on a text corpus, with
//! AdamW, warmup + cosine schedule, gradient clipping and accumulation, periodic validation,
//! atomic checkpoints, exact resumption, best-model tracking, metrics and a loss curve.
//!
//! A run directory holds:
//! - `config.toml`: the resolved configuration;
//! - `tokenizer/`: the tokenizer the run was started with (reused on resume);
//! - `checkpoints/`: resumable state (see [`crate::checkpoint`]);
//! - `model/`: the final model, a Hugging Face directory `serve` and `eval` load;
//! - `best/`: the model with the lowest validation loss so far;
//! - `metrics.jsonl`, `loss.svg`, `sample.txt`, `summary.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lmstack_core::decoding::{self, StopConditions};
use lmstack_core::params::ParamStore;
use lmstack_core::{Model, ModelConfig, Pretrained, SamplingParams, Tokenizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::batches::{self, batch_loss, shard_grads, SelfSupervised};
use crate::checkpoint::TrainerState;
use crate::config::PretrainConfig;
use crate::data::{Dataset, Tokens};
use crate::optim::{AdamW, AdamWConfig};
use crate::trainer::{
    frozen, open_run_dir, peak_rss_mib, Evaluation, LoopConfig, MicroBatch, Objective, RunOptions, Trainer,
};
use crate::{corpus, Error, Result};

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Steps completed.
    pub steps: u64,
    /// Whether the run stopped early on request.
    pub interrupted: bool,
    /// Validation loss over the whole validation split at the end (not when interrupted).
    pub val_loss: Option<f64>,
    /// Best periodic validation estimate and its step.
    pub best_val: Option<(u64, f64)>,
    /// Mean training throughput of this invocation.
    pub tokens_per_sec: f64,
    /// Mean wall time of an optimizer step in this invocation, periodic evaluations and
    /// checkpoints included.
    pub ms_per_step: f64,
    /// Mean wall time of the training steps alone (batches, forward, backward, optimizer),
    /// without the periodic evaluations and checkpoints: what nanoGPT's per-iteration time
    /// shows between evaluations.
    pub train_ms_per_step: f64,
    /// Peak resident memory of the process (MiB), where the OS reports it.
    pub peak_rss_mib: Option<f64>,
    /// Parameters in the model.
    pub num_parameters: usize,
    /// Tokens in the train / validation splits.
    pub split_tokens: (usize, usize),
    /// The generated sample, if any.
    pub sample: Option<String>,
    /// The run directory.
    pub out_dir: PathBuf,
}

/// This machine's physical memory in bytes (Linux `MemTotal`).
fn physical_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses a configuration whose attention scores alone — one `[batch, heads, block, block]`
/// f32 tensor per layer, kept for the backward pass — exceed `memory` bytes: such a run could
/// only end when the kernel kills it. A floor, not an estimate, so nothing that fits is refused.
fn check_attention_fits(cfg: &PretrainConfig, memory: u64) -> Result<()> {
    let t = cfg.block_size as u128;
    let need = (cfg.n_layer * cfg.batch_size * cfg.n_head) as u128 * t * t * 4;
    if need > memory as u128 {
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        return Err(Error::Msg(format!(
            "config fields `block_size` = {} and `batch_size` = {}: the attention scores alone need {:.1} GiB (n_layer × batch_size × n_head × block_size² × 4 bytes), more than this machine's {:.1} GiB; lower block_size or batch_size (grad_accum keeps the tokens per step)",
            cfg.block_size,
            cfg.batch_size,
            gib(need),
            gib(memory as u128)
        )));
    }
    Ok(())
}

fn build_tokenizer(cfg: &PretrainConfig, text: &str, out_dir: &Path) -> Result<Tokenizer> {
    let mut tok = crate::data::tokenizer_from_spec(&cfg.tokenizer, &[text], &[text], out_dir)?;
    if cfg.arch == "bert" && tok.mask_id().is_none() {
        tok.add_special_tokens(&["[MASK]"]);
        let mut sp = tok.special_tokens().clone();
        sp.mask = Some("[MASK]".into());
        tok.set_special_tokens(sp)?;
    }
    tok.set_model_max_length(Some(cfg.block_size));
    Ok(tok)
}

/// The `config.json` of the model a configuration describes.
pub fn model_config(cfg: &PretrainConfig, vocab_size: usize) -> Result<ModelConfig> {
    let d = cfg.n_embd;
    let mut json = match cfg.arch.as_str() {
        "gpt2" => serde_json::json!({
            "model_type": "gpt2", "vocab_size": vocab_size, "n_positions": cfg.block_size, "n_embd": d,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "activation_function": "gelu_new",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }),
        arch @ ("llama" | "mistral" | "qwen2" | "qwen3" | "gemma2" | "gemma3" | "phi3") => {
            let family = if arch == "gemma3" { "gemma3_text" } else { arch };
            // SwiGLU width ≈ 8/3 · d, rounded up to a multiple of 32 (as Llama does with 256).
            let inter = (8 * d / 3).div_ceil(32) * 32;
            let mut json = serde_json::json!({
                "model_type": family, "vocab_size": vocab_size, "hidden_size": d, "intermediate_size": inter,
                "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "num_key_value_heads": if cfg.n_kv_head == 0 { cfg.n_head } else { cfg.n_kv_head },
                "head_dim": d / cfg.n_head,
                "max_position_embeddings": cfg.block_size, "rope_theta": 10000.0, "tie_word_embeddings": true,
            });
            let window = (cfg.sliding_window > 0).then_some(cfg.sliding_window);
            json["sliding_window"] = serde_json::json!(window);
            if family.starts_with("qwen") {
                // Every layer slides when a window is set (Qwen's window starts at layer
                // `max_window_layers`).
                json["use_sliding_window"] = serde_json::json!(window.is_some());
                json["max_window_layers"] = serde_json::json!(0);
            }
            if family.starts_with("gemma") {
                // Gemma's block as published: GeGLU, scores scaled by head_dim^-½, soft caps
                // (Gemma 2) and local/global layers as the family alternates them.
                json["hidden_activation"] = serde_json::json!("gelu_pytorch_tanh");
                json["hidden_act"] = serde_json::json!("gelu_pytorch_tanh");
                json["query_pre_attn_scalar"] = serde_json::json!(d / cfg.n_head);
            }
            json
        }
        "bert" => serde_json::json!({
            "model_type": "bert", "vocab_size": vocab_size, "hidden_size": d, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "intermediate_size": 4 * d, "max_position_embeddings": cfg.block_size,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "architectures": ["BertForMaskedLM"],
        }),
        other => {
            return Err(Error::Msg(format!(
                "config field `arch`: `{other}` is not one of {}",
                crate::config::ARCHS.join(", ")
            )))
        }
    };
    json["initializer_range"] = serde_json::json!(cfg.resolved_init_std());
    Ok(ModelConfig::from_value(json, "pretrain config")?)
}

fn labels(cfg: &PretrainConfig, tok: &Tokenizer, vocab: usize) -> Result<SelfSupervised> {
    if cfg.arch != "bert" {
        return Ok(SelfSupervised::Causal);
    }
    let mask_id = tok.mask_id().ok_or_else(|| Error::Msg("the tokenizer has no mask token".into()))?;
    Ok(SelfSupervised::Masked { mask_id, vocab_size: vocab as u32, prob: cfg.mlm_probability })
}

/// Loss over `iters` random validation batches.
fn estimate(
    model: &Model,
    data: &dyn Tokens,
    cfg: &PretrainConfig,
    obj: SelfSupervised,
    iters: usize,
    rng: &mut ChaCha8Rng,
) -> Result<f64> {
    let eval = frozen(model)?;
    let batches = (0..iters)
        .map(|_| batches::sample_batch(data, cfg.batch_size, cfg.block_size, obj, rng, eval.device()))
        .collect::<Result<Vec<_>>>()?;
    let (total, count) = summed_loss(&eval, &batches)?;
    Ok(total / count.max(1) as f64)
}

/// Summed loss and scored tokens of `batches` under the frozen model `eval`: whole batches are
/// spread over the thread pool (each runs on one core, as training's slices do, which beats
/// splitting every op of one batch over both) and their losses summed in batch order, so the
/// result does not depend on the split. A batch that scores nothing (a masked-LM window with
/// nothing masked) is left out.
fn summed_loss(eval: &Model, batches: &[batches::Batch]) -> Result<(f64, usize)> {
    use rayon::prelude::*;
    let parts: Vec<Result<Option<(f64, usize)>>> = batches
        .par_iter()
        .map(|b| {
            if b.scored()? == 0 {
                return Ok(None);
            }
            let (l, n) = batch_loss(eval, b)?;
            Ok(Some((l.to_dtype(DType::F64)?.to_scalar::<f64>()?, n)))
        })
        .collect();
    let (mut total, mut count) = (0.0, 0usize);
    for (l, n) in parts.into_iter().collect::<Result<Vec<_>>>()?.into_iter().flatten() {
        total += l * n as f64;
        count += n;
    }
    Ok((total, count))
}

/// Loss over the whole validation split in consecutive windows (masked LM: a fixed masking).
pub fn full_eval(model: &Model, data: &dyn Tokens, cfg: &PretrainConfig, obj: SelfSupervised) -> Result<f64> {
    let eval = frozen(model)?;
    let t = cfg.block_size;
    let starts: Vec<usize> = (0..(data.len() - 1) / t).map(|i| i * t).filter(|&s| s + t < data.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // A few batches per thread at a time, so a large split is never held in memory at once.
    let per_group = 4 * rayon::current_num_threads().max(1);
    let (mut total, mut count) = (0.0, 0usize);
    for group in starts.chunks(cfg.batch_size.max(32) * per_group) {
        let batches = group
            .chunks(cfg.batch_size.max(32))
            .map(|chunk| batches::windows(data, chunk, t, obj, &mut rng, eval.device()))
            .collect::<Result<Vec<_>>>()?;
        let (l, n) = summed_loss(&eval, &batches)?;
        total += l;
        count += n;
    }
    Ok(total / count.max(1) as f64)
}

/// The end-of-run sample: nanoGPT's sampling defaults (temperature 0.8, top-k 200).
pub fn sample(model: &Model, tok: &Tokenizer, prompt: &str, n: usize, seed: u64) -> Result<String> {
    let params = SamplingParams { temperature: 0.8, top_k: 200, seed: Some(seed), ..Default::default() };
    let ids = tok.encode(prompt, false)?;
    Ok(decoding::generate(&frozen(model)?, tok, &ids, params, StopConditions::max_tokens(n), |_| {})?)
}

fn save_model_dir(model: &Model, tok: &Tokenizer, dir: &Path) -> Result<()> {
    let p = Pretrained { model: frozen(model)?, tokenizer: tok.clone(), dir: None };
    p.save(dir)?;
    Ok(())
}

/// Pretraining as the trainer sees it: random windows of the training split, the mean
/// next-token (or masked-token) loss over data-parallel slices, and a validation estimate over
/// random windows; the best model so far is kept in `best/`.
struct Pretraining<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    train: &'a dyn Tokens,
    val: &'a dyn Tokens,
    cfg: &'a PretrainConfig,
    labels: SelfSupervised,
    out: &'a Path,
}

impl Objective for Pretraining<'_> {
    fn micro_batch(&mut self, _step: u64, opt: &AdamW, rng: &mut ChaCha8Rng) -> Result<MicroBatch> {
        let (cfg, dev) = (self.cfg, self.model.device());
        let b = batches::sample_batch(self.train, cfg.batch_size, cfg.block_size, self.labels, rng, dev)?;
        let (loss, grads) = shard_grads(self.model, opt, &b, cfg.parallel_shards)?;
        Ok(MicroBatch { loss, grads, tokens: (cfg.batch_size * cfg.block_size) as u64, metrics: Default::default() })
    }

    fn evaluate(&mut self, rng: &mut ChaCha8Rng) -> Result<Option<Evaluation>> {
        let v = estimate(self.model, self.val, self.cfg, self.labels, self.cfg.eval_iters, rng)?;
        let text = format!("val loss {v:.4} (perplexity {:.2})", v.exp());
        Ok(Some(Evaluation { loss: v, perplexity: true, text, tracks_best: true, metrics: Default::default() }))
    }

    fn on_best(&mut self, _step: u64) -> Result<()> {
        save_model_dir(self.model, self.tok, &self.out.join("best"))
    }

    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        self.model.params().tensors()
    }
}

/// Runs (or resumes) pretraining as configured.
pub fn run(cfg: &PretrainConfig, opts: &RunOptions) -> Result<Summary> {
    cfg.validate()?;
    let out = &cfg.out_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::Msg(format!("creating {}: {e}", out.display())))?;
    let resume_from = open_run_dir(out, opts, &["checkpoints", "model", "best", "tokenizer"], "a run")?;
    if resume_from.is_some() {
        let saved = PretrainConfig::from_toml_file(&out.join("config.toml"))?;
        if let Some(field) = cfg.model_field_differing_from(&saved) {
            return Err(Error::Msg(format!(
                "--resume: `{field}` differs from the run's {}; the model, its tokenizer and its data must stay the same (training settings such as max_steps may change)",
                out.join("config.toml").display()
            )));
        }
    }
    lmstack_core::io::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;

    let tok_dir = out.join("tokenizer");
    let dataset_dir = cfg.data.as_ref().filter(|d| d.join("manifest.json").is_file());
    let (train_vec, val_vec);
    let dataset;
    let (train, val, tok): (&dyn Tokens, &dyn Tokens, Tokenizer) = if let Some(dir) = dataset_dir {
        // A prepared dataset: memory-mapped shards and the tokenizer they were made with.
        dataset = Dataset::open(dir)?;
        let mut t = dataset.tokenizer.clone();
        if cfg.tokenizer != PretrainConfig::default().tokenizer {
            // The shards hold this tokenizer's ids: another one would silently mislabel them.
            let given = Path::new(&cfg.tokenizer);
            let same = given.join("tokenizer.json").is_file()
                && Tokenizer::from_dir(given).is_ok_and(|g| g.inner().get_vocab(true) == t.inner().get_vocab(true));
            if !same {
                return Err(Error::Msg(format!(
                    "config field `tokenizer`: `{}` is not the tokenizer the prepared dataset {} was made with \
                     ({}, {} tokens), which training on it uses; leave --tokenizer out",
                    cfg.tokenizer,
                    dir.display(),
                    dir.join(&dataset.manifest.tokenizer).display(),
                    t.vocab_size()
                )));
            }
        }
        if cfg.arch == "bert" && t.mask_id().is_none() {
            return Err(Error::Msg(format!(
                "{}: bert needs a tokenizer with a mask token; prepare the dataset with one",
                dir.display()
            )));
        }
        t.set_model_max_length(Some(cfg.block_size));
        if resume_from.is_none() {
            t.save(&tok_dir)?;
        }
        (&dataset.train, &dataset.val, t)
    } else {
        let text = corpus::load(cfg.data.as_deref())?;
        let t = if resume_from.is_some() {
            Tokenizer::from_dir(&tok_dir)?
        } else {
            let t = build_tokenizer(cfg, &text, out)?;
            t.save(&tok_dir)?;
            t
        };
        let tokens = corpus::tokenize(&t, &text)?;
        let (a, b) = corpus::split(&tokens, cfg.val_fraction);
        (train_vec, val_vec) = (a.to_vec(), b.to_vec());
        (&train_vec, &val_vec, t)
    };
    batches::check_len(train, cfg.block_size, "training")?;
    batches::check_len(val, cfg.block_size, "validation")?;
    if let Some(memory) = physical_memory_bytes() {
        check_attention_fits(cfg, memory)?;
    }
    let vocab = tok.vocab_size();
    let obj = labels(cfg, &tok, vocab)?;
    let mcfg = model_config(cfg, vocab)?;
    let dev = Device::Cpu;
    let (model, resumed) = match resume_from {
        Some(l) => {
            let store = ParamStore::trainable(l.weights, &l.dir.join("model.safetensors").display().to_string(), None);
            let model = Model::new(mcfg, &store, DType::F32, &dev)?;
            store.release_source();
            (model, Some((l.state, l.optimizer)))
        }
        None => (Model::init(mcfg, cfg.seed, DType::F32, &dev)?, None),
    };
    let adam = AdamWConfig { beta1: cfg.beta1, beta2: cfg.beta2, eps: 1e-8, weight_decay: cfg.weight_decay };
    let fresh = TrainerState::fresh(cfg.seed, cfg.seed ^ 0x5EED);
    let mut trainer = Trainer::new(out, model.params().vars(), adam, resumed, fresh, opts.stop.clone(), opts.progress)?;
    let n_params = model.num_parameters();
    if opts.verbose {
        println!(
            "{} model, {} parameters ({:.2}M); vocabulary {vocab}; {} train / {} val tokens; {} steps of {} tokens{}",
            cfg.arch,
            n_params,
            n_params as f64 / 1e6,
            train.len(),
            val.len(),
            cfg.max_steps,
            cfg.batch_size * cfg.block_size * cfg.grad_accum,
            if opts.resume { format!("; resuming at step {}", trainer.state.step) } else { String::new() }
        );
    }

    let loop_cfg = LoopConfig {
        max_steps: cfg.max_steps,
        grad_accum: cfg.grad_accum,
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: cfg.warmup_steps,
        decay_steps: cfg.decay_steps(),
        grad_clip: cfg.grad_clip,
        log_interval: cfg.log_interval,
        eval_interval: cfg.eval_interval,
        checkpoint_interval: cfg.checkpoint_interval,
        throughput: true,
        print_evals: opts.verbose,
        lr_setting: "`lr`",
    };
    let mut objective = Pretraining { model: &model, tok: &tok, train, val, cfg, labels: obj, out };
    let outcome = trainer.run(&loop_cfg, &mut objective)?;
    let state = &trainer.state;
    let title = format!("{} {}L {}H {}d, {} steps", cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_embd, state.step);
    trainer.write_loss_plot(out, &title)?;
    let mut summary = Summary {
        steps: state.step,
        interrupted: outcome.interrupted,
        val_loss: None,
        best_val: state.best_val,
        tokens_per_sec: outcome.tokens_per_sec(),
        ms_per_step: outcome.ms_per_step(),
        train_ms_per_step: outcome.train_ms_per_step(),
        peak_rss_mib: peak_rss_mib(),
        num_parameters: n_params,
        split_tokens: (train.len(), val.len()),
        sample: None,
        out_dir: out.clone(),
    };
    if !outcome.interrupted {
        save_model_dir(&model, &tok, &out.join("model"))?;
        summary.val_loss = Some(full_eval(&model, val, cfg, obj)?);
        if cfg.sample_tokens > 0 && cfg.arch != "bert" {
            let s = sample(&model, &tok, "\n", cfg.sample_tokens, cfg.seed)?;
            lmstack_core::io::write_atomic(&out.join("sample.txt"), s.as_bytes())?;
            summary.sample = Some(s);
        }
    }
    lmstack_core::io::write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_beyond_memory_is_refused_naming_the_fields() {
        let gib = 1u64 << 30;
        let cfg = PretrainConfig::default();
        check_attention_fits(&cfg, gib).unwrap();
        // 4 layers × 12 × 4 heads × 4096² × 4 bytes = 12 GiB.
        let long = PretrainConfig { block_size: 4096, ..PretrainConfig::default() };
        check_attention_fits(&long, 24 * gib).unwrap();
        let err = check_attention_fits(&long, 8 * gib).unwrap_err().to_string();
        assert!(err.contains("`block_size` = 4096") && err.contains("`batch_size` = 12"), "{err}");
        assert!(err.contains("12.0 GiB") && err.contains("8.0 GiB"), "{err}");
    }
}
