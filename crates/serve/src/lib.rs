//! `lmstack-serve`: the continuously batching inference engine, the OpenAI-compatible HTTP API,
//! Prometheus metrics and the web playground, behind the `serve` binary.
//!
//! Depends on `lmstack-core` for models, KV caches and sampling; the only crate that knows HTTP.
//! Being built under the "serve" and "playground" issues; see docs/ARCHITECTURE.md.
#![deny(missing_docs)]
