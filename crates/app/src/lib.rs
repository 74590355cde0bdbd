//! `lmstack-app`: prompt templates, evaluation suites, scorers and reports, behind
//! `cargo xtask eval`.
//!
//! - [`template`]: prompt templates with strict variables, a system prompt and few-shot examples
//!   (first-n or seeded-random) rendered as text or chat messages. Chat templates (the model's
//!   own, rendered as `transformers` does) live in `lmstack_core::chat`.
//!
//! Depends on `lmstack-core`; may call a server over HTTP but never links `lmstack-serve`.
//! Eval suites, scorers and reports are being built under the "app" issue; see
//! docs/ARCHITECTURE.md.
#![deny(missing_docs)]

pub mod template;
