//! `lmstack-train`: dataset engineering, pretraining and finetuning; the `train` binary.
//!
//! - [`config`]: the pretraining configuration (TOML and flags).
//! - [`trainer`]: the one training loop; each task below is an [`trainer::Objective`] of it.
//! - [`batches`]: self-supervised batches (next-token and masked-LM labels), their loss and
//!   data-parallel gradients.
//! - [`optim`]: AdamW with checkpointable state, gradient clipping, the learning-rate schedule.
//! - [`checkpoint`]: atomic, verified checkpoints for exact resumption.
//! - [`runlog`]: a run's log, `metrics.jsonl`, its loss-curve SVG and progress bar.
//! - [`pretrain`]: pretraining (causal or masked LM on a corpus).
//! - [`sft`], [`finetune`]: instruction data with loss masks; full and LoRA finetuning, merging.
//! - [`classify`]: a classification head on a masked LM.
//! - [`preference`], [`dpo`]: chosen/rejected pairs and TRL's preference losses; preference
//!   tuning (DPO, IPO, hinge, ORPO) against a reference model, full or LoRA.
//! - [`reward`]: reward models (a score head on a causal LM, Bradley–Terry loss).
//! - [`kto`]: KTO on answers labelled good or bad one by one.
//! - [`onpolicy`]: preference pairs from a model's own sampled answers, ranked by a checker or
//!   a reward model.
//!
//! Depends on `lmstack-core` for tokenizers and models; knows nothing of HTTP or serving.
#![deny(missing_docs)]

pub mod batches;
pub mod checkpoint;
pub mod classify;
pub mod config;
pub mod corpus;
pub mod data;
pub mod dpo;
pub mod finetune;
pub mod kto;
pub mod onpolicy;
pub mod optim;
pub mod preference;
pub mod pretrain;
pub mod reward;
pub mod runlog;
pub mod sft;
pub mod synth;
pub mod trainer;

/// Errors of the training crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From tokenizers, models and file helpers of `lmstack-core`.
    #[error(transparent)]
    Core(#[from] lmstack_core::Error),
    /// From candle tensor operations.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Anything else, with its context in the message.
    #[error("{0}")]
    Msg(String),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
