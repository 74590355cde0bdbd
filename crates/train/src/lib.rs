//! `lmstack-train`: dataset engineering, pretraining and finetuning; the `train` binary.
//!
//! - [`config`]: the pretraining configuration (TOML and flags).
//! - [`batches`]: self-supervised batches (next-token and masked-LM labels).
//! - [`optim`]: AdamW with checkpointable state, gradient clipping, the learning-rate schedule.
//! - [`checkpoint`]: atomic, verified checkpoints for exact resumption.
//! - [`metrics`]: `metrics.jsonl` and the loss-curve SVG.
//! - [`pretrain`]: the training loop that ties them together.
//! - [`sft`], [`finetune`]: instruction data with loss masks; full and LoRA finetuning, merging.
//!
//! Depends on `lmstack-core` for tokenizers and models; knows nothing of HTTP or serving.
#![deny(missing_docs)]

pub mod batches;
pub mod checkpoint;
pub mod classify;
pub mod config;
pub mod corpus;
pub mod data;
pub mod finetune;
pub mod metrics;
pub mod optim;
pub mod pretrain;
pub mod sft;
pub mod synth;

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
