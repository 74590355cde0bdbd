//! `lmstack-serve`: the continuously batching inference engine, the OpenAI-compatible HTTP API
//! and Prometheus metrics, behind the `serve` binary.
//!
//! - [`engine`]: one thread owning the model; the scheduler mixes prefill chunks of new
//!   requests with decode steps of running ones in every batched forward, each sequence with its
//!   own KV cache, sampler and stop conditions.
//! - [`api`]: axum handlers for `/v1/completions`, `/v1/chat/completions`, `/v1/models`,
//!   `/tokenize`, `/detokenize`, `/health`, `/ready`, `/metrics`; SSE streaming.
//! - [`openai`]: request bodies, validation and the OpenAI error shape.
//! - [`metrics`]: the Prometheus registry.
//! - [`server`]: start-up, background model loading and graceful shutdown.
//!
//! Depends on `lmstack-core` for models, KV caches, chat templates and sampling; the only crate
//! that knows HTTP.
#![deny(missing_docs)]

pub mod api;
pub mod engine;
pub mod listen;
pub mod metrics;
pub mod openai;
pub mod server;

pub use engine::{EngineConfig, EngineHandle, SplitSteps};
pub use server::{run, ServeOptions};
