//! `lmstack-app`: prompt templates, evaluation suites, scorers and reports, behind
//! `cargo xtask eval`.
//!
//! Depends on `lmstack-core`; may call a server over HTTP but never links `lmstack-serve`.
//! Being built under the "app" issue; see docs/ARCHITECTURE.md.
#![deny(missing_docs)]
