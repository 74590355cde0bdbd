//! `lmstack-train`: dataset engineering, pretraining and finetuning, and the `train` binary.
//!
//! Depends on `lmstack-core` for tokenizers and models; owns the training loop, the optimizer
//! with checkpointable state, data pipelines and checkpoints. Being built under the "train"
//! and "finetune" issues; see docs/ARCHITECTURE.md.
#![deny(missing_docs)]
