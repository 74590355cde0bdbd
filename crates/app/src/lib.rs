//! `lmstack-app`: prompt templates, evaluation suites, scorers and reports, behind
//! `cargo xtask eval`.
//!
//! - [`template`]: prompt templates with strict variables, a system prompt and few-shot examples
//!   (first-n or seeded-random) rendered as text or chat messages. Chat templates (the model's
//!   own, rendered as `transformers` does) live in `lmstack_core::chat`.
//!
//! - [`schema`]: the task file's serde types (lm-eval's task YAML, the offline subset, and the
//!   `assert` extension); a leaf module.
//! - [`task`]: loading and checking task files, their local datasets and prompts.
//! - [`assertions`]: promptfoo-style checks on generations; [`judge`]: `llm-rubric` grading by
//!   a judge model over HTTP; [`reward`]: the `reward` metric, a reward model scoring each
//!   generated answer in-process.
//! - [`backend`]: log-likelihoods and generations from a model directory in-process;
//!   [`endpoint`]: the same from any OpenAI-compatible server over HTTP.
//! - [`scores`]: lm-eval's metric definitions, filters, standard errors (the eval's scores;
//!   not serve's Prometheus metrics nor train's run log).
//! - [`eval`]: running tasks and suites, results in lm-eval's shape, thresholds.
//! - the `lmstack-eval` binary (`cargo xtask eval`).
//!
//! Depends on `lmstack-core`; may call a server over HTTP but never links `lmstack-serve`.
#![deny(missing_docs)]

pub mod assertions;
pub mod backend;
pub mod compare;
pub mod endpoint;
pub mod eval;
pub mod judge;
pub mod report;
pub mod reward;
pub mod schema;
pub mod scores;
pub mod task;
pub mod template;
