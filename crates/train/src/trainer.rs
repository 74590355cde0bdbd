//! The one training loop. Every task — pretraining ([`crate::pretrain`]), supervised and LoRA
//! finetuning ([`crate::finetune`]), classification ([`crate::classify`]) — is an
//! [`Objective`]: it draws a micro-batch and returns its loss and gradients, evaluates, and
//! names the tensors a checkpoint keeps. [`Trainer::run`] does the rest, the same way for all:
//! the stop flag, the learning-rate schedule, gradient accumulation and clipping, the guard
//! against a non-finite loss, `metrics.jsonl` and the progress bar, evaluation and checkpoint
//! cadence, best-so-far tracking, and the final checkpoint. Resuming is loading a checkpoint's
//! [`TrainerState`] and optimizer moments into a [`Trainer`]: the loop then draws exactly the
//! batches an uninterrupted run would.
//!
//! A new training task (a preference loss, say) is a new `Objective`, not another loop.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Tensor, Var};
use lmstack_core::params::ParamStore;
use lmstack_core::Model;
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::{self, TrainerState};
use crate::optim::{self, AdamW, AdamWConfig};
use crate::runlog::{self, MetricsLog, Record};
use crate::{Error, Result};

/// How a run is driven (not part of the saved configuration).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// With `resume`, continue from the newest checkpoint that verifies when the latest does
    /// not.
    pub resume_verified: bool,
    /// Show a progress bar on the terminal.
    pub progress: bool,
    /// Set (e.g. by Ctrl-C) to checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Print one line per evaluation.
    pub verbose: bool,
    /// Start afresh in a run directory that already holds a run, replacing it.
    pub overwrite: bool,
}

/// Prepares the run directory `out` for a run as `opts` say: with `resume`, returns the
/// checkpoint to continue from ([`checkpoint::resume`]); otherwise refuses a directory that
/// holds checkpoints (`latest` or not) unless `overwrite`, which removes the `outputs` a run
/// writes there (never other files). Temporary files an interrupted write left are removed.
/// `what` names the run in the refusal ("a run", "a finetuning run").
pub fn open_run_dir(out: &Path, opts: &RunOptions, outputs: &[&str], what: &str) -> Result<Option<checkpoint::Loaded>> {
    let root = out.join("checkpoints");
    checkpoint::clean_leftovers(&root)?;
    if opts.resume {
        return Ok(Some(checkpoint::resume(&root, opts.resume_verified)?));
    }
    if checkpoint::holds_checkpoints(&root)? {
        if !opts.overwrite {
            return Err(Error::Msg(format!(
                "{} already holds {what}; pass --resume to continue it, --overwrite to start again, or another --out-dir",
                out.display()
            )));
        }
        for d in outputs {
            let p = out.join(d);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::Msg(format!("removing {}: {e}", p.display())))?;
            }
        }
    }
    Ok(None)
}

/// How the loop runs: the schedule and the cadence of logging, evaluation and checkpoints.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Optimizer steps of the whole run.
    pub max_steps: u64,
    /// Micro-batches per optimizer step (their gradients averaged).
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Floor of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Step at which the cosine decay reaches `min_lr`.
    pub decay_steps: u64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// A training record every this many steps (the mean loss over them).
    pub log_interval: u64,
    /// Evaluation every this many steps (and after the last).
    pub eval_interval: u64,
    /// Checkpoint every this many steps (0: only at the end and on a stop request).
    pub checkpoint_interval: u64,
    /// Log training throughput (tokens/s) with each training record.
    pub throughput: bool,
    /// Print a line per evaluation.
    pub print_evals: bool,
    /// How errors name the learning-rate setting (`--lr`, or a config field).
    pub lr_setting: &'static str,
}

/// One micro-batch's contribution to a step.
#[derive(Debug, Default)]
pub struct MicroBatch {
    /// Its mean loss.
    pub loss: f64,
    /// Gradients of the loss by trainable parameter name.
    pub grads: HashMap<String, Vec<f32>>,
    /// Training tokens it consumed (counted in [`TrainerState::tokens_seen`]).
    pub tokens: u64,
    /// What the task logs beside the loss (means over the micro-batch), averaged like the loss
    /// into each training record.
    pub metrics: BTreeMap<String, f64>,
}

/// An evaluation's result.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The `val` record's value (lower is better: a loss, or an error rate).
    pub loss: f64,
    /// Whether `loss` is in nats per token, so the record carries its perplexity.
    pub perplexity: bool,
    /// What the evaluation line says after the training loss (`val loss 1.2345`).
    pub text: String,
    /// Whether it competes for [`TrainerState::best_val`].
    pub tracks_best: bool,
    /// What the task logs beside the loss, in the `val` record.
    pub metrics: BTreeMap<String, f64>,
}

/// A training task, as the loop sees it.
pub trait Objective {
    /// Draws a micro-batch of optimizer step `step` with `rng` and returns its loss and the
    /// gradients of the parameters `opt` trains.
    fn micro_batch(&mut self, step: u64, opt: &AdamW, rng: &mut ChaCha8Rng) -> Result<MicroBatch>;

    /// Evaluates the model as it is now (`rng` draws validation batches where the task samples
    /// them); `None` when there is nothing to evaluate on.
    fn evaluate(&mut self, rng: &mut ChaCha8Rng) -> Result<Option<Evaluation>>;

    /// Called when an evaluation at `step` is the best so far.
    fn on_best(&mut self, _step: u64) -> Result<()> {
        Ok(())
    }

    /// The tensors a checkpoint keeps (the trainable ones, by the names resuming loads).
    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor>;
}

/// What a call of [`Trainer::run`] did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Stopped early on request.
    pub interrupted: bool,
    /// Optimizer steps taken in this call.
    pub steps_run: u64,
    /// Training tokens consumed in this call.
    pub tokens: u64,
    /// Wall time of the call (s), the final checkpoint included.
    pub secs: f64,
    /// Of which periodic evaluations and checkpoints (and the final checkpoint) took (s).
    pub side_secs: f64,
}

impl Outcome {
    /// Mean wall time of an optimizer step (ms), evaluations and checkpoints included.
    pub fn ms_per_step(&self) -> f64 {
        self.secs * 1e3 / self.steps_run.max(1) as f64
    }

    /// Mean wall time of the training steps alone (ms): batches, forward, backward, optimizer.
    pub fn train_ms_per_step(&self) -> f64 {
        (self.secs - self.side_secs).max(0.0) * 1e3 / self.steps_run.max(1) as f64
    }

    /// Training throughput of the call (tokens/s).
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.secs.max(1e-9)
    }
}

/// The optimizer, the resumable state and the run's log, driven by [`Trainer::run`].
#[derive(Debug)]
pub struct Trainer {
    /// AdamW over the trainable parameters.
    pub opt: AdamW,
    /// Step, RNGs, best validation value, tokens seen.
    pub state: TrainerState,
    /// `metrics.jsonl`.
    pub log: MetricsLog,
    ckpt_root: PathBuf,
    stop: Arc<AtomicBool>,
    progress: bool,
}

impl Trainer {
    /// A trainer over `vars` for the run directory `out`: fresh (`resumed` is `None`: `fresh`
    /// state, a new `metrics.jsonl`) or resumed from a checkpoint's state and optimizer moments
    /// (the log cut back to the checkpoint's step).
    pub fn new(
        out: &Path,
        vars: BTreeMap<String, Var>,
        adam: AdamWConfig,
        resumed: Option<(TrainerState, HashMap<String, Tensor>)>,
        fresh: TrainerState,
        stop: Arc<AtomicBool>,
        progress: bool,
    ) -> Result<Trainer> {
        let mut opt = AdamW::new(vars, adam);
        let resuming = resumed.is_some();
        let state = match resumed {
            Some((state, moments)) => {
                opt.load_state(&moments, state.step, "optimizer.safetensors")?;
                state
            }
            None => fresh,
        };
        let log = MetricsLog::open(&out.join("metrics.jsonl"), resuming.then_some(state.step))?;
        Ok(Trainer { opt, state, log, ckpt_root: out.join("checkpoints"), stop, progress })
    }

    fn save_checkpoint(&self, obj: &dyn Objective) -> Result<()> {
        checkpoint::save(
            &self.ckpt_root,
            self.state.clone(),
            &obj.checkpoint_tensors(),
            &self.opt.state_tensors()?,
            2,
        )?;
        Ok(())
    }

    /// Trains `obj` from the current step to `cfg.max_steps` (or until the stop flag is set),
    /// then checkpoints.
    pub fn run(&mut self, cfg: &LoopConfig, obj: &mut dyn Objective) -> Result<Outcome> {
        let bar = runlog::progress_bar(self.progress, cfg.max_steps, self.state.step);
        let started = Instant::now();
        let (first_step, first_tokens) = (self.state.step, self.state.tokens_seen);
        let clip = (cfg.grad_clip > 0.0).then_some(cfg.grad_clip);
        let accum = cfg.grad_accum.max(1);
        // Training loss summed since the last record, steps and tokens in it, and its start;
        // the task's metrics summed over the same steps.
        let mut window = (0.0f64, 0u64, 0u64, Instant::now());
        let mut window_metrics: BTreeMap<String, f64> = BTreeMap::new();
        let mut interrupted = false;
        let mut side_secs = 0.0f64;
        while self.state.step < cfg.max_steps {
            if self.stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let step = self.state.step;
            let lr = optim::lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps);
            let mut grads = HashMap::new();
            let (mut loss_sum, mut tokens) = (0.0, 0u64);
            for _ in 0..accum {
                let m = obj.micro_batch(step, &self.opt, &mut self.state.data_rng)?;
                loss_sum += m.loss;
                tokens += m.tokens;
                optim::accumulate(&mut grads, m.grads, 1.0 / accum as f32);
                for (k, v) in m.metrics {
                    *window_metrics.entry(k).or_default() += v / accum as f64;
                }
            }
            let norm = clip.map(|c| optim::clip_grad_norm(&mut grads, c));
            let loss = loss_sum / accum as f64;
            if !loss.is_finite() {
                self.save_checkpoint(obj)?;
                return Err(Error::Msg(format!(
                    "step {step}: the loss is {loss}; stopping (checkpoint of step {step} saved). Try a lower {}",
                    cfg.lr_setting
                )));
            }
            self.opt.step(&grads, lr)?;
            self.state.step += 1;
            self.state.tokens_seen += tokens;
            window.0 += loss;
            window.1 += 1;
            window.2 += tokens;
            let done = self.state.step;
            if done.is_multiple_of(cfg.log_interval.max(1)) || done == cfg.max_steps {
                let mean = window.0 / window.1 as f64;
                let tps = cfg.throughput.then(|| window.2 as f64 / window.3.elapsed().as_secs_f64().max(1e-9));
                let metrics =
                    std::mem::take(&mut window_metrics).into_iter().map(|(k, v)| (k, v / window.1 as f64)).collect();
                self.log.write(&Record::train(done, mean, lr, tps, norm).with_metrics(metrics))?;
                bar.set_message(match tps {
                    Some(tps) => format!("loss {mean:.4} lr {lr:.2e} {tps:.0} tok/s"),
                    None => format!("loss {mean:.4} lr {lr:.2e}"),
                });
                window = (0.0, 0, 0, Instant::now());
            }
            bar.set_position(done);
            let side = Instant::now();
            if done.is_multiple_of(cfg.eval_interval.max(1)) || done == cfg.max_steps {
                if let Some(e) = obj.evaluate(&mut self.state.eval_rng)? {
                    self.log.write(&Record::val(done, e.loss, e.perplexity).with_metrics(e.metrics.clone()))?;
                    if cfg.print_evals {
                        runlog::bar_println(&bar, format!("step {done}: train loss {loss:.4}, {}", e.text));
                    }
                    if e.tracks_best && self.state.best_val.is_none_or(|(_, b)| e.loss < b) {
                        self.state.best_val = Some((done, e.loss));
                        obj.on_best(done)?;
                    }
                }
            }
            if cfg.checkpoint_interval > 0 && done.is_multiple_of(cfg.checkpoint_interval) && done < cfg.max_steps {
                self.save_checkpoint(obj)?;
            }
            side_secs += side.elapsed().as_secs_f64();
        }
        bar.finish_and_clear();
        let side = Instant::now();
        self.save_checkpoint(obj)?;
        side_secs += side.elapsed().as_secs_f64();
        Ok(Outcome {
            interrupted,
            steps_run: self.state.step - first_step,
            tokens: self.state.tokens_seen - first_tokens,
            secs: started.elapsed().as_secs_f64(),
            side_secs,
        })
    }

    /// Draws the run's `loss.svg` from its `metrics.jsonl`.
    pub fn write_loss_plot(&self, out: &Path, title: &str) -> Result<()> {
        let records = runlog::read(self.log.path())?;
        lmstack_core::io::write_atomic(&out.join("loss.svg"), runlog::loss_svg(&records, title).as_bytes())?;
        Ok(())
    }
}

/// The current values of trainable variables, detached (what a checkpoint of them keeps).
pub fn detached(vars: &BTreeMap<String, Var>) -> BTreeMap<String, Tensor> {
    vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
}

/// A frozen copy of `model` sharing its current weights, for evaluation and sampling without
/// building a backward graph.
pub fn frozen(model: &Model) -> Result<Model> {
    let tensors: HashMap<String, Tensor> = model.params().tensors().into_iter().map(|(k, t)| (k, t.detach())).collect();
    let store = ParamStore::frozen(tensors, "<training weights>");
    Ok(Model::new(model.config().clone(), &store, model.dtype(), model.device())?)
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
