//! Supervised finetuning of a causal LM on instruction data: full (every weight trains) or
//! LoRA (the base is frozen — not even in the optimizer — and only low-rank adapters train).
//!
//! It is an objective of the one training loop ([`crate::trainer`]), so it shares pretraining's
//! machinery: the same AdamW with checkpointable moments, warmup + cosine schedule, gradient
//! clipping and accumulation, data-parallel slices ([`crate::batches::shard_grads`]), atomic
//! verified checkpoints with exact `--resume`, `metrics.jsonl` and `loss.svg`. Batches are
//! seeded random draws of examples, padded (or packed, `padding_free`), with the loss on
//! assistant tokens only ([`crate::sft`]). LoRA takes the base as loaded, so a GGUF base stays
//! quantized (QLoRA); `gradient_checkpointing` trades a forward pass for most of the
//! activations' memory ([`lmstack_core::grad`]).
//!
//! A run directory holds `finetune.json` (the resolved configuration), `checkpoints/`,
//! `metrics.jsonl`, `loss.svg`, `summary.json`, `data_order.jsonl` (the held-out examples and
//! each step's, by index in the data file), and the result: `model/` (full: a complete model
//! directory, its tokenizer carrying the chat template used) or `adapter/` (LoRA: PEFT's
//! `adapter_config.json` + `adapter_model.safetensors`, loadable by Python `peft`, by
//! `serve --adapter` and by `train merge`).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use lmstack_core::lora::{LoraConfig, TargetModules};
use lmstack_core::nn::LinearAdapter;
use lmstack_core::params::ParamStore;
use lmstack_core::{Model, Pretrained};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::batches::{batch_loss, shard_grads};
use crate::checkpoint::{self, TrainerState};
use crate::optim::{AdamW, AdamWConfig};
use crate::runlog::{self, Record};
use crate::sft::{self, ChatFormat, Tokenized};
use crate::trainer::{
    frozen, open_run_dir, peak_rss_mib, Evaluation, LoopConfig, MicroBatch, Objective, RunOptions, Trainer,
};
use crate::{Error, Result};

/// `full` or `lora`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every weight trains.
    Full,
    /// Low-rank adapters on a frozen base.
    Lora,
}

/// `sft` ([`run`]), `classify` ([`crate::classify::run`]) or `dpo` ([`crate::dpo::run`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Instruction finetuning of a causal LM.
    #[default]
    Sft,
    /// A classification head on a masked LM (bert).
    Classify,
    /// Preference tuning of a causal LM on chosen/rejected pairs (DPO and its relatives:
    /// `loss_type`).
    Dpo,
    /// A reward model: a causal LM with a one-label score head, trained on chosen/rejected
    /// pairs ([`crate::reward::run`]).
    Reward,
    /// KTO on answers labelled good or bad one by one ([`crate::kto::run`]).
    Kto,
}

/// Which end of a preference sequence longer than `max_length` is kept (TRL's
/// `truncation_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// The first `max_length` tokens (the answer's end is cut); a sequence whose prompt alone
    /// fills them is left out.
    #[default]
    #[value(name = "keep_start")]
    KeepStart,
    /// The last `max_length` tokens (the prompt's beginning is cut); `dpo` only, as in TRL.
    #[value(name = "keep_end")]
    KeepEnd,
}

impl TruncationMode {
    /// TRL's name.
    pub fn as_str(self) -> &'static str {
        match self {
            TruncationMode::KeepStart => "keep_start",
            TruncationMode::KeepEnd => "keep_end",
        }
    }
}

/// The preference loss of a `dpo` run (TRL's `loss_type`; see
/// [`crate::preference::PreferenceLoss`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// DPO: `−log σ(βΔ)`.
    #[default]
    Sigmoid,
    /// DPO robust to flipped labels (`label_smoothing`).
    Robust,
    /// IPO: the squared distance of the length-normalised margin from `1/(2β)`.
    Ipo,
    /// SLiC's hinge: `max(0, 1 − βΔ)`.
    Hinge,
    /// EXO's pairwise loss (`label_smoothing` ε > 0 is the target's mass on the rejected answer).
    #[serde(rename = "exo_pair")]
    #[value(name = "exo_pair")]
    ExoPair,
    /// NCA's pairwise loss: each answer's own log-ratio, not only their difference.
    #[serde(rename = "nca_pair")]
    #[value(name = "nca_pair")]
    NcaPair,
    /// BCO on pairs: the chosen log-ratio pushed up and the rejected one down, each on its own.
    #[serde(rename = "bco_pair")]
    #[value(name = "bco_pair")]
    BcoPair,
    /// SPPO with hard probabilities: the log-ratios' squared distances from `±1/(2β)`.
    #[serde(rename = "sppo_hard")]
    #[value(name = "sppo_hard")]
    SppoHard,
    /// APO-zero: the chosen answers' likelihood up, the rejected ones' down.
    #[serde(rename = "apo_zero")]
    #[value(name = "apo_zero")]
    ApoZero,
    /// APO-down: both down, the rejected ones more.
    #[serde(rename = "apo_down")]
    #[value(name = "apo_down")]
    ApoDown,
    /// DPO on length-normalised log-ratios (each divided by its answer's tokens).
    #[serde(rename = "sigmoid_norm")]
    #[value(name = "sigmoid_norm")]
    SigmoidNorm,
    /// DiscoPOP: a blend of the logistic and the exponential loss, by `--discopop-tau`.
    Discopop,
    /// AOT: the policy's and the reference's log-ratio differences, each sorted over the
    /// (per-shard) batch, compared by conservative DPO's loss.
    Aot,
    /// AOT on the chosen and the rejected log-ratios sorted apart (for unpaired data).
    #[serde(rename = "aot_unpaired")]
    #[value(name = "aot_unpaired")]
    AotUnpaired,
    /// ORPO (no reference model): the chosen answers' NLL minus β × the log-sigmoid of the
    /// log odds ratio of the per-token log-probabilities.
    Orpo,
}

/// The f-divergence DPO regularises with (TRL's `f_divergence_type`; see
/// [`crate::preference::FDivergence`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FDivergenceType {
    /// Standard DPO.
    #[default]
    #[value(name = "reverse_kl")]
    ReverseKl,
    /// Forward KL.
    #[value(name = "forward_kl")]
    ForwardKl,
    /// Jensen–Shannon.
    #[value(name = "js_divergence")]
    JsDivergence,
    /// α-divergence, α from `--f-alpha-divergence-coef`.
    #[value(name = "alpha_divergence")]
    AlphaDivergence,
}

fn default_alpha() -> f64 {
    0.5
}

fn default_tau() -> f64 {
    0.05
}

fn default_beta() -> f64 {
    0.1
}

fn one() -> f64 {
    1.0
}

/// A finetuning run's configuration (saved as `finetune.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// What is trained (runs saved before this field existed read as `sft`).
    #[serde(default)]
    pub task: Task,
    /// The base model directory (lmstack's or a Hugging Face gpt2/llama directory).
    pub base: PathBuf,
    /// Training examples (JSONL).
    pub data: PathBuf,
    /// Validation examples (JSONL); without it `val_fraction` of `data` is held out.
    pub val_data: Option<PathBuf>,
    /// Held out for validation when there is no `val_data`.
    pub val_fraction: f64,
    /// The run directory.
    pub out_dir: PathBuf,
    /// `full` or `lora`.
    pub method: Method,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA scaling numerator (`scale = alpha / r`).
    pub lora_alpha: f64,
    /// Dropout on the adapters' input while training.
    pub lora_dropout: f64,
    /// Module names the adapters go on (suffixes of module paths), or `all-linear`.
    pub target_modules: Vec<String>,
    /// `model` (the base tokenizer's template, else `plain`), `plain`, `chatml`, or a file.
    pub chat_template: String,
    /// Score the prompt tokens too.
    pub train_on_inputs: bool,
    /// Optimizer steps.
    pub max_steps: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Parallel slices of each micro-batch.
    pub parallel_shards: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Floor of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// Validation every this many steps.
    pub eval_interval: u64,
    /// Checkpoint every this many steps (0: only at the end and on Ctrl-C).
    pub checkpoint_interval: u64,
    /// Seed of the split, batch order, adapter init and dropout.
    pub seed: u64,
    /// Activation checkpointing: each block's activations are recomputed in the backward
    /// pass instead of kept, and the loss runs in chunks of rows (less memory, about one more
    /// forward pass per step; [`lmstack_core::Model::set_gradient_checkpointing`]).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Padding-free batches (TRL's `padding_free`): each micro-batch's examples packed end to
    /// end, each attending only within itself ([`sft::packed`]): one row per parallel slice
    /// (SFT), rows of about the context's length (DPO, KTO).
    #[serde(default)]
    pub padding_free: bool,
    /// `dpo`: the strength β of the pull towards the reference model (TRL's `beta`).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// `dpo`: the preference loss.
    #[serde(default)]
    pub loss_type: LossType,
    /// `dpo` with `loss_type` `robust`: the assumed fraction ε of flipped labels.
    #[serde(default)]
    pub label_smoothing: f64,
    /// `dpo`: weight of the chosen answers' mean token negative log-likelihood added to the
    /// preference loss (TRL's `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, w]`; RPO's
    /// `rpo_alpha`): it keeps the chosen answers likely while the margin grows.
    #[serde(default)]
    pub sft_weight: f64,
    /// `kto`: the weight of the desirable answers' losses (TRL's `desirable_weight`).
    #[serde(default = "one")]
    pub desirable_weight: f64,
    /// `kto`: the weight of the undesirable answers' losses.
    #[serde(default = "one")]
    pub undesirable_weight: f64,
    /// `dpo`: the reference model (a model directory with the base's tokenizer); without it
    /// the base is the reference (LoRA: the base with the adapters switched off, no second
    /// copy of its weights).
    #[serde(default)]
    pub ref_model: Option<PathBuf>,
    /// `dpo`: compute the reference's log-probabilities of every pair once before training
    /// (kept in the run directory) instead of at every step (TRL's `precompute_ref_log_probs`).
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    /// `dpo`, `kto`: the most tokens of a sequence (prompt and answer); longer ones are cut as
    /// `truncation_mode` says (TRL's `max_length`). Default: what the model's context holds.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// `dpo`, `kto`: which end of a longer sequence is kept.
    #[serde(default)]
    pub truncation_mode: TruncationMode,
    /// `dpo`: the f-divergence of the loss (TRL's `f_divergence_type`).
    #[serde(default)]
    pub f_divergence_type: FDivergenceType,
    /// `dpo` with `alpha_divergence`: α (TRL's `f_alpha_divergence_coef`).
    #[serde(default = "default_alpha")]
    pub f_alpha_divergence_coef: f64,
    /// `dpo` with `discopop`: τ (TRL's `discopop_tau`).
    #[serde(default = "default_tau")]
    pub discopop_tau: f64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            task: Task::Sft,
            base: PathBuf::from("runs/shakespeare-char/model"),
            data: PathBuf::new(),
            val_data: None,
            val_fraction: 0.05,
            out_dir: PathBuf::from("runs/finetune"),
            method: Method::Lora,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: vec!["all-linear".into()],
            chat_template: "model".into(),
            train_on_inputs: false,
            max_steps: 1500,
            batch_size: 16,
            grad_accum: 1,
            parallel_shards: 2,
            lr: 5e-3,
            min_lr: 5e-4,
            warmup_steps: 20,
            weight_decay: 0.0,
            grad_clip: 1.0,
            eval_interval: 250,
            checkpoint_interval: 100,
            seed: 1337,
            gradient_checkpointing: false,
            padding_free: false,
            beta: default_beta(),
            loss_type: LossType::Sigmoid,
            label_smoothing: 0.0,
            sft_weight: 0.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            ref_model: None,
            precompute_ref_log_probs: false,
            max_length: None,
            truncation_mode: TruncationMode::KeepStart,
            f_divergence_type: FDivergenceType::ReverseKl,
            f_alpha_divergence_coef: default_alpha(),
            discopop_tau: default_tau(),
        }
    }
}

impl Task {
    /// Where a run of this task goes unless told otherwise.
    pub fn default_out_dir(self) -> PathBuf {
        PathBuf::from(match self {
            Task::Sft => "runs/finetune",
            Task::Classify => "runs/classify",
            Task::Dpo => "runs/dpo",
            Task::Reward => "runs/reward",
            Task::Kto => "runs/kto",
        })
    }
}

impl FinetuneConfig {
    /// The defaults of a `task` run (`method` unless given: LoRA for SFT, full for
    /// classification), each task's learning rate, step count, base model and data.
    pub fn for_task(task: Task, method: Option<Method>) -> FinetuneConfig {
        if task == Task::Dpo {
            return FinetuneConfig::for_dpo(method.unwrap_or(Method::Lora));
        }
        if task == Task::Kto {
            // TRL's KTOConfig: β = 0.1; there is no NLL term.
            return FinetuneConfig {
                task,
                out_dir: task.default_out_dir(),
                beta: default_beta(),
                sft_weight: 0.0,
                ..FinetuneConfig::for_dpo(method.unwrap_or(Method::Lora))
            };
        }
        if task == Task::Reward {
            // Three epochs of the synthetic pairs: the held-out accuracy is 0.77 after one, 0.81
            // after three; LoRA (with the head whole) 0.805 at 3e-3, 0.735 at 3e-4
            // (docs/finetuning.md).
            let method = method.unwrap_or(Method::Full);
            let lr = if method == Method::Lora { 3e-3 } else { 3e-4 };
            return FinetuneConfig {
                max_steps: 750,
                eval_interval: 250,
                checkpoint_interval: 250,
                method,
                task,
                out_dir: task.default_out_dir(),
                lr,
                min_lr: lr / 10.0,
                beta: default_beta(),
                sft_weight: 0.0,
                ..FinetuneConfig::for_dpo(Method::Full)
            };
        }
        let classify = task == Task::Classify;
        let method = method.unwrap_or(if classify { Method::Full } else { Method::Lora });
        let lr = match (classify, method) {
            (true, _) => 1e-4,
            (false, Method::Lora) => 5e-3,
            (false, Method::Full) => 1e-3,
        };
        let pick = |sft: &str, cls: &str| PathBuf::from(if classify { cls } else { sft });
        FinetuneConfig {
            task,
            base: pick("runs/shakespeare-char/model", "runs/shakespeare-bert/model"),
            data: pick("data/synth/train.jsonl", "data/classify/train.jsonl"),
            val_data: classify.then(|| "data/classify/test.jsonl".into()),
            out_dir: task.default_out_dir(),
            method,
            max_steps: if classify { 600 } else { 1500 },
            lr,
            min_lr: lr / 10.0,
            ..FinetuneConfig::default()
        }
    }

    /// A `dpo` run's defaults: the README's SFT model (`runs/finetune-merged`: the LoRA
    /// adapter of `train finetune` merged into its base by `train merge`) as the base and the
    /// reference, the synthetic preference pairs (`train data synth --preference`), no
    /// dropout (TRL's `disable_dropout`: dropout would make the policy differ from the
    /// reference before any training), and β = 0.5 with the chosen answers' NLL at weight 1:
    /// on that model DPO alone (TRL's β = 0.1) widens the margin by making the chosen answers
    /// unlikely too, and its greedy answers get worse (docs/finetuning.md).
    fn for_dpo(method: Method) -> FinetuneConfig {
        let lr = match method {
            Method::Lora => 1e-3,
            Method::Full => 1e-4,
        };
        FinetuneConfig {
            task: Task::Dpo,
            base: "runs/finetune-merged".into(),
            data: "data/synth-preference/train.jsonl".into(),
            val_data: Some("data/synth-preference/test.jsonl".into()),
            out_dir: Task::Dpo.default_out_dir(),
            method,
            lora_dropout: 0.0,
            beta: 0.5,
            sft_weight: 1.0,
            max_steps: 250,
            lr,
            min_lr: lr / 10.0,
            warmup_steps: 10,
            eval_interval: 50,
            checkpoint_interval: 50,
            ..FinetuneConfig::default()
        }
    }

    /// The loss against a reference model a `dpo` run trains with; `None` for ORPO, which has
    /// no reference ([`crate::preference::orpo_loss`]).
    pub fn preference_loss(&self) -> Option<crate::preference::PreferenceLoss> {
        use crate::preference::PreferenceLoss as P;
        match self.loss_type {
            LossType::Sigmoid => Some(P::Sigmoid),
            LossType::Robust => Some(P::Robust { label_smoothing: self.label_smoothing }),
            LossType::Ipo => Some(P::Ipo),
            LossType::Hinge => Some(P::Hinge),
            LossType::ExoPair => Some(P::ExoPair { label_smoothing: self.label_smoothing }),
            LossType::NcaPair => Some(P::NcaPair),
            LossType::BcoPair => Some(P::BcoPair),
            LossType::SppoHard => Some(P::SppoHard),
            LossType::ApoZero => Some(P::ApoZero),
            LossType::ApoDown => Some(P::ApoDown),
            LossType::SigmoidNorm => Some(P::SigmoidNorm),
            LossType::Discopop => Some(P::Discopop { tau: self.discopop_tau }),
            LossType::Aot => Some(P::Aot { label_smoothing: self.label_smoothing }),
            LossType::AotUnpaired => Some(P::AotUnpaired { label_smoothing: self.label_smoothing }),
            LossType::Orpo => None,
        }
    }

    /// The f-divergence a `dpo` run's loss takes.
    pub fn f_divergence(&self) -> crate::preference::FDivergence {
        use crate::preference::FDivergence as F;
        match self.f_divergence_type {
            FDivergenceType::ReverseKl => F::ReverseKl,
            FDivergenceType::ForwardKl => F::ForwardKl,
            FDivergenceType::JsDivergence => F::JsDivergence,
            FDivergenceType::AlphaDivergence => F::Alpha(self.f_alpha_divergence_coef),
        }
    }

    /// Checks values; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(Error::Msg(format!("--{f}: {m}")));
        if self.task == Task::Reward && lmstack_core::gguf::is_gguf(&self.base) {
            return Err(Error::Msg(format!(
                "--base {}: a reward model is built on a model directory (safetensors); a GGUF base is not supported for --task reward",
                self.base.display()
            )));
        }
        if self.padding_free && matches!(self.task, Task::Classify | Task::Reward) {
            return bad(
                "padding-free",
                "not supported for --task classify or reward (each sequence is read at one pooled token)".into(),
            );
        }
        if self.task == Task::Classify && self.method == Method::Lora {
            return Err(Error::Msg(
                "--task classify trains every weight; --method lora is not supported for it".into(),
            ));
        }
        if self.max_steps == 0 {
            return bad("max-steps", "must be positive".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.parallel_shards == 0 {
            return bad("batch-size", "batch size, grad accumulation and shards must be positive".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) || self.min_lr < 0.0 || self.min_lr > self.lr {
            return bad("lr", format!("{} (min {}) must satisfy 0 ≤ min-lr ≤ lr, lr > 0", self.lr, self.min_lr));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return bad("val-fraction", format!("{} is outside [0, 1)", self.val_fraction));
        }
        if self.eval_interval == 0 {
            return bad("eval-interval", "must be positive".into());
        }
        if self.method == Method::Lora {
            self.lora_config().validate("--lora-*")?;
        }
        if self.task == Task::Kto {
            if !(self.beta.is_finite() && self.beta > 0.0) {
                return bad("beta", format!("{} must be positive", self.beta));
            }
            for (f, w) in [("desirable-weight", self.desirable_weight), ("undesirable-weight", self.undesirable_weight)]
            {
                if !(w.is_finite() && w > 0.0) {
                    return bad(f, format!("{w} must be positive"));
                }
            }
            if self.sft_weight > 0.0 || self.loss_type != LossType::Sigmoid || self.label_smoothing > 0.0 {
                return bad(
                    "loss-type",
                    "--task kto has its own loss; --loss-type, --label-smoothing and --sft-weight belong to --task dpo"
                        .into(),
                );
            }
        } else if self.task == Task::Dpo {
            if !(self.beta.is_finite() && self.beta > 0.0) {
                return bad("beta", format!("{} must be positive", self.beta));
            }
            if !(0.0..0.5).contains(&self.label_smoothing) {
                return bad("label-smoothing", format!("{} is outside [0, 0.5)", self.label_smoothing));
            }
            let smoothed =
                matches!(self.loss_type, LossType::Robust | LossType::ExoPair | LossType::Aot | LossType::AotUnpaired);
            if self.label_smoothing > 0.0 && !smoothed {
                return bad(
                    "label-smoothing",
                    "applies to --loss-type robust (TRL's conservative DPO) and exo_pair; the other losses have none"
                        .into(),
                );
            }
            if self.loss_type == LossType::ExoPair && self.label_smoothing == 0.0 {
                return bad("label-smoothing", "exo_pair needs ε > 0 (its loss has log ε; e.g. 1e-3)".into());
            }
            if !(self.sft_weight.is_finite() && self.sft_weight >= 0.0) {
                return bad("sft-weight", format!("{} must be 0 or more", self.sft_weight));
            }
            if self.f_divergence_type != FDivergenceType::ReverseKl
                && !self.preference_loss().is_some_and(|l| l.takes_f_divergence())
            {
                return bad(
                    "f-divergence-type",
                    format!(
                        "{:?} is defined for the reverse KL divergence only; the others apply to sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust and discopop (as TRL)",
                        self.loss_type
                    ),
                );
            }
            if !self.f_alpha_divergence_coef.is_finite() {
                return bad("f-alpha-divergence-coef", format!("{} must be finite", self.f_alpha_divergence_coef));
            }
            if !(self.discopop_tau.is_finite() && self.discopop_tau > 0.0) {
                return bad("discopop-tau", format!("{} must be positive", self.discopop_tau));
            }
            if self.loss_type == LossType::Orpo {
                if self.ref_model.is_some() || self.precompute_ref_log_probs {
                    return bad("ref-model", "ORPO has no reference model".into());
                }
                if self.sft_weight > 0.0 {
                    return bad("sft-weight", "ORPO's loss holds the chosen answers' NLL already".into());
                }
            }
        } else if self.task != Task::Kto && (self.ref_model.is_some() || self.precompute_ref_log_probs) {
            return bad("ref-model", "a reference model belongs to --task dpo".into());
        }
        let preference = matches!(self.task, Task::Dpo | Task::Kto);
        if !preference && (self.max_length.is_some() || self.truncation_mode != TruncationMode::KeepStart) {
            return bad(
                "max-length",
                "--max-length and --truncation-mode belong to --task dpo and kto (SFT and reward data longer than the context are left out and counted)".into(),
            );
        }
        if self.task != Task::Dpo && self.f_divergence_type != FDivergenceType::ReverseKl {
            return bad("f-divergence-type", "belongs to --task dpo".into());
        }
        if self.task == Task::Kto && self.truncation_mode == TruncationMode::KeepEnd {
            return bad(
                "truncation-mode",
                "KTO keeps the start of a sequence (as TRL's KTOTrainer): keep_end belongs to --task dpo".into(),
            );
        }
        if self.max_length.is_some_and(|n| n < 2) {
            return bad("max-length", "a sequence needs at least 2 tokens (a prompt token and an answer token)".into());
        }
        Ok(())
    }

    /// Reads a run's saved `finetune.json`; one saved before `task` was recorded takes `task`
    /// (the caller's) when given, else reads as `sft`.
    pub fn read_saved(path: &Path, task: Option<Task>) -> Result<FinetuneConfig> {
        let mut v: serde_json::Value = lmstack_core::io::read_json(path)?;
        if let (Some(obj), Some(task)) = (v.as_object_mut(), task) {
            obj.entry("task").or_insert(serde_json::json!(task));
        }
        serde_json::from_value(v).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
    }

    /// The settings of `other` that differ from this run's, as flags with both values
    /// (`--lr (0.005 there, 0.5 here)`); the run directory and `max_steps` are not compared,
    /// since a resumed run may have moved and may run longer.
    pub fn differences(&self, other: &FinetuneConfig) -> Result<Vec<String>> {
        let as_map = |c: &FinetuneConfig| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            other => Err(Error::Msg(format!("finetune configuration did not serialize to an object: {other:?}"))),
        };
        let (a, b) = (as_map(self)?, as_map(other)?);
        Ok(a.iter()
            .filter(|(k, v)| {
                !matches!(
                    k.as_str(),
                    "out_dir" | "max_steps" | "gradient_checkpointing" | "padding_free" | "precompute_ref_log_probs"
                ) && b.get(k.as_str()) != Some(*v)
            })
            .map(|(k, v)| {
                let here = b.get(k.as_str()).cloned().unwrap_or(serde_json::Value::Null);
                format!("--{} ({v} there, {here} here)", k.replace('_', "-"))
            })
            .collect())
    }

    /// How the training loop runs: a record per step, an evaluation line per evaluation, the
    /// cosine decay ending at the last step.
    pub fn loop_config(&self) -> LoopConfig {
        LoopConfig {
            max_steps: self.max_steps,
            grad_accum: self.grad_accum,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            decay_steps: self.max_steps,
            grad_clip: self.grad_clip,
            log_interval: 1,
            eval_interval: self.eval_interval,
            checkpoint_interval: self.checkpoint_interval,
            throughput: false,
            print_evals: true,
            lr_setting: "--lr",
        }
    }

    /// The PEFT adapter configuration this run writes.
    pub fn lora_config(&self) -> LoraConfig {
        let targets = match self.target_modules.as_slice() {
            [one] if one == "all-linear" => TargetModules::Special(one.clone()),
            list => TargetModules::List(list.to_vec()),
        };
        LoraConfig {
            peft_type: "LORA".into(),
            r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: targets,
            use_rslora: false,
            bias: "none".into(),
            base_model_name_or_path: Some(self.base.display().to_string()),
            // A reward model's new head trains whole beside the adapters (PEFT's SEQ_CLS task).
            task_type: Some(if self.task == Task::Reward { "SEQ_CLS" } else { "CAUSAL_LM" }.into()),
            modules_to_save: (self.task == Task::Reward).then(|| vec!["score".into()]),
            extra: Default::default(),
        }
    }
}

/// A LoRA adapter being trained: `A` and `B` are variables; dropout on the input while
/// `training` is set (masks drawn from a seed, the step and the input, so runs repeat, and a
/// checkpointed block's rerun draws the same); read as constants, building no graph, with
/// gradients off ([`lmstack_core::grad::no_grad`]: evaluation, a checkpointed forward).
#[derive(Debug)]
pub struct TrainableLora {
    /// `[r, in]`, Kaiming-uniform as PEFT initialises it.
    pub a: Var,
    /// `[out, r]`, zero: a fresh adapter changes nothing.
    pub b: Var,
    scale: f64,
    dropout: f64,
    seed: u64,
    step: Arc<AtomicU64>,
    training: Arc<AtomicBool>,
}

impl LinearAdapter for TrainableLora {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            // Each row's mask is drawn from the seed, the step and the row's own values, so a
            // row gets the same mask however the rows are batched or chunked (the loss's
            // chunks, a checkpointed block's rerun).
            let width = xs.dim(candle_core::D::Minus1)?;
            let rows: Vec<f32> = xs.flatten_all()?.to_vec1()?;
            let keep = 1.0 - self.dropout;
            let mut mask = Vec::with_capacity(rows.len());
            for row in rows.chunks(width) {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (self.seed, self.step.load(Ordering::Relaxed), width).hash(&mut h);
                row.iter().take(8).for_each(|x| x.to_bits().hash(&mut h));
                let mut rng = ChaCha8Rng::seed_from_u64(h.finish());
                mask.extend((0..width).map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }));
            }
            (xs * Tensor::from_vec(mask, xs.shape(), xs.device())?)?
        } else {
            xs.clone()
        };
        // With gradients off nothing builds a graph: the adapters are read as constants.
        let (a, b) = if !lmstack_core::grad::enabled() {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        } else {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        };
        // The scale goes into B (r columns), not onto the output (a tensor as large as the
        // layer's output, kept for the backward pass).
        let h = xs.broadcast_matmul(&a.t()?)?;
        h.broadcast_matmul(&(b * self.scale)?.t()?)
    }
}

/// Attaches fresh trainable adapters to the targeted projections of `model`; returns the
/// variables by PEFT key (`base_model.model.<path>.lora_A.weight` …). `step` and `training`
/// drive their dropout.
pub fn attach_lora(
    model: &mut Model,
    cfg: &LoraConfig,
    seed: u64,
    step: Arc<AtomicU64>,
    training: Arc<AtomicBool>,
) -> Result<BTreeMap<String, Var>> {
    let mut vars = BTreeMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x10BA);
    let dev = model.device().clone();
    for lin in model.linears_mut() {
        let path = lin.path().to_owned();
        if !cfg.targets(&path)? {
            continue;
        }
        let (i, o) = lin.dims();
        let bound = 1.0 / (i as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * i).map(|_| rng.random_range(-bound..bound) as f32).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, i), &dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros((o, cfg.r), DType::F32, &dev)?)?;
        vars.insert(lmstack_core::lora::peft_key(&path, "A"), a.clone());
        vars.insert(lmstack_core::lora::peft_key(&path, "B"), b.clone());
        lin.set_adapter(Some(Arc::new(TrainableLora {
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.lora_dropout,
            seed,
            step: step.clone(),
            training: training.clone(),
        })));
    }
    if vars.is_empty() {
        return Err(Error::Msg(format!(
            "--target-modules {:?} matches no projection of the base model",
            cfg.target_modules
        )));
    }
    // A quantized base computes every pass of the run alike, with gradients or without (the
    // evaluations'): the exact products the gradient is taken through.
    model.set_exact_products(true);
    Ok(vars)
}

/// Writes the trained adapters in PEFT's layout, with the whole modules trained beside them
/// (variables named `base_model.model.<tensor name>`, as PEFT saves `modules_to_save`).
pub fn save_adapter(dir: &Path, cfg: &LoraConfig, vars: &BTreeMap<String, Var>) -> Result<()> {
    let mut adapters = BTreeMap::new();
    let mut modules = BTreeMap::new();
    for (k, v) in vars {
        let Some(name) = k.strip_prefix("base_model.model.") else { continue };
        if let Some(path) = name.strip_suffix(".lora_A.weight") {
            let b = &vars[&lmstack_core::lora::peft_key(path, "B")];
            adapters.insert(path.to_owned(), (v.as_tensor().detach(), b.as_tensor().detach()));
        } else if !name.ends_with(".lora_B.weight") {
            modules.insert(name.to_owned(), v.as_tensor().detach());
        }
    }
    lmstack_core::lora::save_peft(dir, cfg, &adapters, &modules)?;
    Ok(())
}

/// What a finetuning run reports.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneSummary {
    /// Steps completed.
    pub steps: u64,
    /// Stopped early on request.
    pub interrupted: bool,
    /// Masked validation loss at the start (the base model) and at the end.
    pub val_loss: (f64, Option<f64>),
    /// Trainable and total parameters.
    pub trainable_parameters: usize,
    /// Parameters of the base model.
    pub base_parameters: usize,
    /// Training / validation examples, and examples skipped as longer than the context.
    pub examples: (usize, usize, usize),
    /// Mean wall time per step (ms), evaluations and checkpoints included.
    pub ms_per_step: f64,
    /// Mean wall time of the training steps alone (ms).
    pub train_ms_per_step: f64,
    /// Scored (loss-bearing) tokens per second of the training steps alone.
    pub tokens_per_sec: f64,
    /// Peak resident memory (MiB).
    pub peak_rss_mib: Option<f64>,
    /// Where the result is: `model/` or `adapter/`.
    pub output: PathBuf,
}

/// Supervised finetuning as the trainer sees it: random examples, padded, the loss on the
/// scored (assistant) tokens over data-parallel slices; evaluation is the masked loss over the
/// validation examples, adapters' dropout off.
struct Sft<'a> {
    model: &'a Model,
    method: Method,
    train: &'a [Tokenized],
    /// Each training example's index in the data file.
    train_index: &'a [usize],
    /// `data_order.jsonl`: the examples each micro-batch drew.
    order: crate::runlog::DataOrder,
    val: &'a [Tokenized],
    vars: &'a BTreeMap<String, Var>,
    max_len: usize,
    pad: u32,
    batch_size: usize,
    parallel_shards: usize,
    /// Pack each micro-batch's examples, a row per slice ([`sft::packed`]).
    padding_free: bool,
    /// The step adapters' dropout masks are drawn for.
    step: Arc<AtomicU64>,
    /// Whether adapters' dropout is on.
    training: Arc<AtomicBool>,
}

impl Sft<'_> {
    /// Masked loss over the validation examples (no graph, adapters' dropout off).
    fn val_loss(&self) -> Result<f64> {
        evaluating(self.model, self.method, &self.training, |m| self.masked_loss(m))
    }

    fn masked_loss(&self, model: &Model) -> Result<f64> {
        let (mut total, mut n) = (0.0, 0usize);
        for chunk in self.val.chunks(32) {
            let refs: Vec<&Tokenized> = chunk.iter().collect();
            let b = sft::batch(&refs, self.max_len, self.pad, model.device())?;
            if b.n_scored == 0 {
                continue;
            }
            let (l, k) = batch_loss(model, &b.into_batch())?;
            total += l.to_dtype(DType::F64)?.to_scalar::<f64>()? * k as f64;
            n += k;
        }
        Ok(total / n.max(1) as f64)
    }
}

impl Objective for Sft<'_> {
    fn micro_batch(&mut self, step: u64, opt: &AdamW, rng: &mut ChaCha8Rng) -> Result<MicroBatch> {
        self.step.store(step, Ordering::Relaxed);
        let k = self.batch_size.min(self.train.len());
        let picks = rand::seq::index::sample(rng, self.train.len(), k);
        let refs: Vec<&Tokenized> = picks.iter().map(|i| &self.train[i]).collect();
        let dev = self.model.device();
        let b = match self.padding_free {
            true => sft::packed(&refs, self.parallel_shards, self.max_len, self.pad, dev)?,
            false => sft::batch(&refs, self.max_len, self.pad, dev)?,
        };
        let tokens = b.n_scored as u64;
        self.order.step(step, picks.iter().map(|i| self.train_index[i]))?;
        let (loss, grads) = shard_grads(self.model, opt, &b.into_batch(), self.parallel_shards)?;
        Ok(MicroBatch { loss, grads, tokens, metrics: BTreeMap::new() })
    }

    fn evaluate(&mut self, _rng: &mut ChaCha8Rng) -> Result<Option<Evaluation>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let v = self.val_loss()?;
        Ok(Some(Evaluation {
            loss: v,
            perplexity: true,
            text: format!("val loss {v:.4}"),
            tracks_best: true,
            metrics: BTreeMap::new(),
        }))
    }

    fn checkpoint_tensors(&self) -> BTreeMap<String, Tensor> {
        crate::trainer::detached(self.vars)
    }
}

/// Checks the run directory for a fresh run or a resume (same settings but `max_steps`), writes
/// `finetune.json`, and returns the checkpoint to resume from.
pub fn prepare_run_dir(cfg: &FinetuneConfig, opts: &RunOptions) -> Result<Option<checkpoint::Loaded>> {
    let out = &cfg.out_dir;
    let loaded = open_run_dir(out, opts, &["checkpoints", "adapter", "model"], "a finetuning run")?;
    if opts.resume {
        let saved_at = out.join("finetune.json");
        let saved = FinetuneConfig::read_saved(&saved_at, Some(cfg.task))?;
        let differ = saved.differences(cfg)?;
        if !differ.is_empty() {
            return Err(Error::Msg(format!(
                "--resume: {} differ{} from the run's {} (only --max-steps may change on resume; leave the other flags out to keep the run's settings)",
                differ.join(", "),
                if differ.len() == 1 { "s" } else { "" },
                saved_at.display()
            )));
        }
    }
    let gguf = lmstack_core::gguf::is_gguf(&cfg.base);
    if gguf && cfg.method != Method::Lora {
        return Err(Error::Msg(format!(
            "--base {}: a GGUF model's weights may be quantized; finetune it with --method lora (the base stays frozen, as in QLoRA)",
            cfg.base.display()
        )));
    }
    if !gguf && !cfg.base.join("config.json").is_file() {
        return Err(Error::Msg(format!(
            "--base {}: no model directory or GGUF file there (train one with `cargo run --release --bin train`, or give a Hugging Face model directory)",
            cfg.base.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::Msg(format!("creating {}: {e}", out.display())))?;
    lmstack_core::io::write_json(&out.join("finetune.json"), cfg)?;
    Ok(loaded)
}

/// Grows the token embeddings (and an untied output head) to `new_vocab` rows, new rows set to
/// the mean of the old ones (as `transformers`' `resize_token_embeddings` does), and returns
/// the config with the new `vocab_size`.
pub fn grow_vocab(
    weights: &mut HashMap<String, Tensor>,
    cfg: &lmstack_core::ModelConfig,
    new_vocab: usize,
) -> Result<lmstack_core::ModelConfig> {
    let keys: &[&str] = match cfg.model_type() {
        lmstack_core::ModelType::Gpt2 => &["transformer.wte.weight", "lm_head.weight"],
        lmstack_core::ModelType::Llama => &["model.embed_tokens.weight", "lm_head.weight"],
        lmstack_core::ModelType::Bert => {
            return Err(Error::Msg(format!(
                "growing the vocabulary of a {} model is not supported",
                cfg.model_type_str()
            )))
        }
    };
    for k in keys {
        let Some(w) = weights.get(*k) else { continue };
        let (v, d) = w.dims2()?;
        if v >= new_vocab {
            continue;
        }
        let mean = w.mean_keepdim(0)?;
        let extra = mean.broadcast_as((new_vocab - v, d))?.contiguous()?;
        let grown = Tensor::cat(&[w, &extra], 0)?;
        weights.insert((*k).to_owned(), grown);
    }
    let mut j = cfg.to_value();
    j["vocab_size"] = serde_json::json!(new_vocab);
    Ok(lmstack_core::ModelConfig::from_value(j, "finetune config")?)
}

/// Which of `n` examples are held out for validation: `val_fraction` of them (at least one
/// when any is asked for and two or more exist), drawn with `seed`.
pub(crate) fn held_out(n: usize, val_fraction: f64, seed: u64) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let asked = (n as f64 * val_fraction).round() as usize;
    let n_val = asked.max(usize::from(val_fraction > 0.0)).min(n.saturating_sub(1));
    let mut held = vec![false; n];
    idx[..n_val].iter().for_each(|&i| held[i] = true);
    held
}

/// Runs `f` on the model as evaluation sees it: gradients off, adapters' dropout off
/// (`training` cleared for the call), and for full finetuning a frozen copy sharing the
/// weights (LoRA's adapters, with gradients off, are read as constants: nothing builds a
/// graph); frees the memory the pass used afterwards.
pub(crate) fn evaluating<R>(
    model: &Model,
    method: Method,
    training: &AtomicBool,
    f: impl FnOnce(&Model) -> Result<R>,
) -> Result<R> {
    let was = training.swap(false, Ordering::Relaxed);
    let result = (|| {
        let frozen_copy;
        let model = match method {
            Method::Full => {
                frozen_copy = frozen(model)?;
                &frozen_copy
            }
            Method::Lora => model,
        };
        lmstack_core::grad::no_grad(|| f(model))
    })();
    training.store(was, Ordering::Relaxed);
    lmstack_core::release_free_memory();
    result
}

/// The trainer of a finetuning run over `vars`: AdamW (β 0.9/0.999, `cfg`'s weight decay),
/// fresh from `cfg`'s seed or resumed from `resumed`'s state and moments.
pub(crate) fn new_trainer(
    cfg: &FinetuneConfig,
    vars: BTreeMap<String, Var>,
    resumed: Option<checkpoint::Loaded>,
    opts: &RunOptions,
) -> Result<Trainer> {
    let adam = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: cfg.weight_decay };
    let resumed = resumed.map(|l| (l.state, l.optimizer));
    let fresh = TrainerState::fresh(cfg.seed ^ 0xDA7A, cfg.seed);
    Trainer::new(&cfg.out_dir, vars, adam, resumed, fresh, opts.stop.clone(), opts.progress)
}

/// Moves the held-out part of `train` (as [`held_out`] draws it with `cfg`'s fraction and seed)
/// out and returns it; both keep their order.
pub(crate) fn split_off_val<T>(train: &mut Vec<T>, cfg: &FinetuneConfig) -> Vec<T> {
    let held = held_out(train.len(), cfg.val_fraction, cfg.seed);
    let (v, t): (Vec<_>, Vec<_>) = std::mem::take(train).into_iter().enumerate().partition(|(i, _)| held[*i]);
    *train = t.into_iter().map(|x| x.1).collect();
    v.into_iter().map(|x| x.1).collect()
}

/// The model a finetuning run trains, and its trainable variables: every weight (`full`: a
/// trainable copy of the base's, or the checkpoint's, the embeddings grown to `tok`'s
/// vocabulary) or adapters on the frozen base (`lora`: the base as loaded, quantized where
/// its file is — QLoRA on a GGUF, no f32 copy — the adapters fresh or the checkpoint's).
/// `step` and `training` drive the adapters' dropout.
pub(crate) fn trainable_model(
    cfg: &FinetuneConfig,
    base: Model,
    tok: &lmstack_core::Tokenizer,
    resume_from: Option<&checkpoint::Loaded>,
    step: Arc<AtomicU64>,
    training: Arc<AtomicBool>,
) -> Result<(Model, BTreeMap<String, Var>)> {
    let mut mcfg = base.config().clone();
    if cfg.method == Method::Lora && tok.vocab_size() > mcfg.vocab_size() {
        return Err(Error::Msg(format!(
            "the tokenizer has {} tokens, the base model's embedding {}; LoRA cannot train new embeddings (use --method full)",
            tok.vocab_size(),
            mcfg.vocab_size()
        )));
    }
    match cfg.method {
        Method::Lora => {
            let mut m = base;
            let vars = attach_lora(&mut m, &cfg.lora_config(), cfg.seed, step, training)?;
            if let Some(l) = resume_from {
                for (k, v) in &vars {
                    let t = l
                        .weights
                        .get(k)
                        .ok_or_else(|| Error::Msg(format!("{}: the checkpoint has no `{k}`", l.dir.display())))?;
                    v.set(t)?;
                }
            }
            Ok((m, vars))
        }
        Method::Full => {
            let mut weights: HashMap<String, Tensor> = match resume_from {
                Some(l) => l.weights.clone(),
                None => base.params().tensors().into_iter().collect(),
            };
            let dev = base.device().clone();
            drop(base);
            if tok.vocab_size() > mcfg.vocab_size() && resume_from.is_none() {
                mcfg = grow_vocab(&mut weights, &mcfg, tok.vocab_size())?;
            } else if tok.vocab_size() > mcfg.vocab_size() {
                let mut j = mcfg.to_value();
                j["vocab_size"] = serde_json::json!(tok.vocab_size());
                mcfg = lmstack_core::ModelConfig::from_value(j, "finetune config")?;
            }
            let src = cfg.base.join("model.safetensors").display().to_string();
            let store = ParamStore::trainable(weights, &src, None);
            let m = Model::new(mcfg, &store, DType::F32, &dev)?;
            let vars = m.params().vars();
            Ok((m, vars))
        }
    }
}

/// Runs (or with `resume`, continues) a finetuning run.
pub fn run(cfg: &FinetuneConfig, opts: &RunOptions) -> Result<FinetuneSummary> {
    let resume = opts.resume;
    cfg.validate()?;
    if cfg.task != Task::Sft {
        return Err(Error::Msg(
            format!(
                "finetune::run trains sft runs; a {:?} run has its own (`train finetune --task {:?}`)",
                cfg.task, cfg.task
            )
            .to_lowercase(),
        ));
    }
    let out = &cfg.out_dir;
    let resume_from = prepare_run_dir(cfg, opts)?;
    let dev = Device::Cpu;
    let base = Pretrained::load(&cfg.base, DType::F32, &dev)?;
    if !base.model.config().is_causal() {
        return Err(Error::Msg(format!(
            "--base {}: a {} model is a masked LM; instruction finetuning needs gpt2 or llama (use --task classify for bert)",
            cfg.base.display(),
            base.model.config().model_type_str()
        )));
    }
    let mut tok = base.tokenizer.clone();
    // ChatML on a base without its tokens: add them (full finetuning grows the embeddings).
    let missing = lmstack_core::chat::CHATML_TOKENS.iter().any(|t| tok.token_to_id(t).is_none());
    if cfg.chat_template == "chatml" && missing {
        if cfg.method == Method::Lora {
            return Err(Error::Msg(
                "--chat-template chatml adds <|im_start|> and <|im_end|> to the vocabulary, whose new embeddings must train; use --method full, or --chat-template plain with LoRA".into(),
            ));
        }
        tok.add_special_tokens(&lmstack_core::chat::CHATML_TOKENS);
        if tok.eos_id().is_none() {
            let mut sp = tok.special_tokens().clone();
            sp.eos = Some("<|im_end|>".into());
            tok.set_special_tokens(sp)?;
        }
    }
    let fmt = ChatFormat::from_spec(&cfg.chat_template, &tok)?;
    let max_len = base.model.max_len();
    let pad = tok.pad_id().or(tok.eos_id()).unwrap_or(0);

    // Data: tokenize, drop what cannot fit, split; each example keeps its index in its file.
    let prepare = |path: &Path| -> Result<(Vec<(usize, Tokenized)>, usize)> {
        let examples = sft::read_examples(path)?;
        let mut kept = Vec::new();
        let mut skipped = 0;
        for (i, ex) in examples.iter().enumerate() {
            let t = sft::tokenize(ex, &tok, &fmt, cfg.train_on_inputs)
                .map_err(|e| Error::Msg(format!("{} example {}: {e}", path.display(), i + 1)))?;
            if t.ids.len() > max_len + 1 || t.n_scored() == 0 {
                skipped += 1;
            } else {
                kept.push((i, t));
            }
        }
        Ok((kept, skipped))
    };
    let (mut train, mut skipped) = prepare(&cfg.data)?;
    let val = match &cfg.val_data {
        Some(p) => {
            let (v, s) = prepare(p)?;
            skipped += s;
            v
        }
        None => split_off_val(&mut train, cfg),
    };
    let (train_index, train): (Vec<usize>, Vec<Tokenized>) = train.into_iter().unzip();
    let (val_index, val): (Vec<usize>, Vec<Tokenized>) = val.into_iter().unzip();
    // Which examples each step drew, for a peer run on the same data order
    // (`crates/train/examples/peft_reference.py --order`).
    let order = crate::runlog::DataOrder::open(out, resume, &val_index, cfg.val_data.is_some())?;
    if train.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no example fits the model's context of {max_len} tokens",
            cfg.data.display()
        )));
    }

    let base_parameters = base.model.num_parameters();
    let step_counter = Arc::new(AtomicU64::new(0));
    let training = Arc::new(AtomicBool::new(false));
    let (mut model, vars) =
        trainable_model(cfg, base.model, &tok, resume_from.as_ref(), step_counter.clone(), training.clone())?;
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)?;
    let trainable_parameters: usize = vars.values().map(|v| v.elem_count()).sum();
    let mut trainer = new_trainer(cfg, vars.clone(), resume_from, opts)?;
    let mut objective = Sft {
        model: &model,
        method: cfg.method,
        train: &train,
        train_index: &train_index,
        order,
        val: &val,
        vars: &vars,
        max_len,
        pad,
        batch_size: cfg.batch_size,
        parallel_shards: cfg.parallel_shards,
        padding_free: cfg.padding_free,
        step: step_counter,
        training: training.clone(),
    };
    // A resumed run's "before" is the base's loss its log recorded at step 0, not the loss of
    // the partly trained model it resumes.
    let logged = if resume { runlog::initial_val(trainer.log.path())? } else { None };
    let base_val = match logged {
        _ if val.is_empty() => f64::NAN,
        Some(v) => v,
        None => objective.val_loss()?,
    };
    if !resume && !val.is_empty() {
        trainer.log.write(&Record::val(0, base_val, true))?;
    }
    println!(
        "{} finetuning of {} ({} parameters; {} trainable, {:.2}%): {} train / {} val examples ({} skipped: longer than {max_len} tokens or nothing to score); {}",
        match cfg.method {
            Method::Full => "full",
            Method::Lora => "LoRA",
        },
        cfg.base.display(),
        base_parameters,
        trainable_parameters,
        100.0 * trainable_parameters as f64 / base_parameters as f64,
        train.len(),
        val.len(),
        skipped,
        if val.is_empty() {
            "no validation examples (pass --val-data)".to_owned()
        } else if resume && logged.is_none() {
            format!("validation loss at step {}: {base_val:.4}", trainer.state.step)
        } else {
            format!("validation loss before: {base_val:.4}")
        }
    );
    if resume {
        println!("resuming at step {} of {}", trainer.state.step, cfg.max_steps);
    }

    let loop_cfg = cfg.loop_config();
    training.store(true, Ordering::Relaxed);
    let outcome = trainer.run(&loop_cfg, &mut objective)?;
    training.store(false, Ordering::Relaxed);
    let title = format!("{:?} finetuning, {} steps", cfg.method, trainer.state.step);
    trainer.write_loss_plot(out, &title)?;
    let final_val = if outcome.interrupted || val.is_empty() { None } else { Some(objective.val_loss()?) };
    let output = write_result(cfg, &mut model, tok, &fmt, &vars)?;
    let summary = FinetuneSummary {
        steps: trainer.state.step,
        interrupted: outcome.interrupted,
        val_loss: (base_val, final_val),
        trainable_parameters,
        base_parameters,
        examples: (train.len(), val.len(), skipped),
        ms_per_step: outcome.ms_per_step(),
        train_ms_per_step: outcome.train_ms_per_step(),
        tokens_per_sec: outcome.tokens as f64 / (outcome.secs - outcome.side_secs).max(1e-9),
        peak_rss_mib: peak_rss_mib(),
        output,
    };
    lmstack_core::io::write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}

/// Writes a finetuning run's result into its directory and returns where: `model/` (full: a
/// complete model directory, its tokenizer carrying the chat template `fmt` trained with) or
/// `adapter/` (LoRA: PEFT's files, and the tokenizer with its chat template when that is not
/// the base's own; the adapters are then detached from `model`).
pub(crate) fn write_result(
    cfg: &FinetuneConfig,
    model: &mut Model,
    mut tok: lmstack_core::Tokenizer,
    fmt: &ChatFormat,
    vars: &BTreeMap<String, Var>,
) -> Result<PathBuf> {
    match cfg.method {
        Method::Full => {
            let dir = cfg.out_dir.join("model");
            if let Some(src) = fmt.source() {
                tok.set_chat_template(Some(src.to_owned()));
            }
            Pretrained { model: frozen(model)?, tokenizer: tok, dir: None }.save(&dir)?;
            Ok(dir)
        }
        Method::Lora => {
            let dir = cfg.out_dir.join("adapter");
            save_adapter(&dir, &cfg.lora_config(), vars)?;
            // The chat template trained with, when it is not the base tokenizer's own, goes
            // beside the adapter (as TRL saves the tokenizer), so `train merge` keeps it.
            if let Some(src) = fmt.source() {
                tok.set_chat_template(Some(src.to_owned()));
                tok.save(&dir)?;
            }
            // Detach the adapters so the frozen model can be dropped cleanly.
            for lin in model.linears_mut() {
                lin.set_adapter(None);
            }
            Ok(dir)
        }
    }
}

/// `train merge`: folds a PEFT adapter into its base and writes a complete model directory.
pub fn merge(base: &Path, adapter: &Path, out: &Path) -> Result<()> {
    let p = Pretrained::load(base, DType::F32, &Device::Cpu)?;
    let a = lmstack_core::lora::read_peft(adapter)?;
    let mut weights: HashMap<String, Tensor> = p.model.params().tensors().into_iter().collect();
    lmstack_core::lora::merge_into(&mut weights, p.model.config(), &a)?;
    // A reward model's adapter (its `score` head saved whole) turns its LM base into a
    // sequence classifier, as PEFT's SEQ_CLS adapter on `AutoModelForSequenceClassification`.
    let mcfg = if a.modules.contains_key("score.weight") && !p.model.is_scorer() {
        weights.remove("lm_head.weight");
        crate::reward::scorer_config(p.model.config(), crate::reward::pad_id(p.model.config(), &p.tokenizer))?
    } else {
        p.model.config().clone()
    };
    let store = ParamStore::frozen(weights, "<merged weights>");
    let model = Model::new(mcfg, &store, DType::F32, &Device::Cpu)?;
    let mut tok = p.tokenizer.clone();
    // A tokenizer saved beside the adapter (with the chat template it was trained with) wins.
    if adapter.join("tokenizer.json").is_file() {
        tok = lmstack_core::Tokenizer::from_dir(adapter)?;
    }
    Pretrained { model, tokenizer: tok, dir: None }.save(out)?;
    Ok(())
}
