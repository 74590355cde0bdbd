//! `lmstack-core`: the tokenizer and model types every other lmstack crate shares.
//!
//! - [`tokenizer`]: Hugging Face `tokenizer.json` loading, BPE and character-level training,
//!   incremental (streaming) decoding.
//! - [`chat`]: Hugging Face chat templates rendered as `transformers` renders them.
//! - [`examples`]: conversations and prompt/completion pairs as token ids with a loss mask, as
//!   finetuning trains on them and reward models score them.
//! - [`config`]: `config.json` for `gpt2`, `llama` (and `mistral`) and `bert`.
//! - [`models`]: the transformer architectures and [`Model`], with a differentiable
//!   whole-batch forward and a KV-cached prefill/decode forward over per-sequence caches.
//! - [`gguf`]: GGUF files (llama.cpp's format) with quantized weights kept quantized.
//! - [`lora`]: LoRA adapters in Hugging Face PEFT's layout.
//! - [`decoding`]: one sequence's decoding (sampler, detokenizer, stop strings), used by every
//!   generation loop.
//! - [`kv_cache`], [`sampling`], [`params`] (the parameter store), [`pretrained`] (model
//!   directories), [`nn`] (building blocks, including the adapter hook on every projection).
//!
//! No HTTP, no CLI, no training loop: those live in `lmstack-serve`, the binaries and
//! `lmstack-train`.
#![deny(missing_docs)]

pub mod chat;
pub mod config;
pub mod constraint;
pub mod decoding;
pub mod error;
pub mod examples;
pub mod gguf;
pub mod grad;
pub mod io;
pub mod kernels;
pub mod kv_cache;
pub mod lora;
pub mod models;
pub mod nn;
pub mod params;
pub mod pretrained;
pub mod sampling;
pub mod tokenizer;
pub mod tools;

pub use candle_core::{DType, Device, Tensor};

/// Gives candle's own CPU thread pool one thread unless `CANDLE_NUM_THREADS` is set. Call at the
/// start of `main`, before any tensor work.
///
/// candle runs elementwise ops on a pool of its own beside rayon's (which `gemm` and lmstack's
/// kernels use); on a small machine the two pools' spinning workers slow each other down
/// (measured 10-20% slower training steps on 2 cores), and the work is dominated by the rayon
/// side.
pub fn prefer_rayon_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Hands memory the allocator holds free back to the system (glibc's `malloc_trim`): after a
/// phase that allocated much and freed it (an evaluation pass), so the resident size falls
/// back instead of staying at the phase's peak. Does nothing on other allocators.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub use config::{Family, ModelConfig, ModelType, RopeScaling};
pub use constraint::{Constrainer, Constraint, Grammar};
pub use decoding::{Decoding, Finish, StopConditions};
pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use models::{Model, SeqStep, StepThreads};
pub use pretrained::Pretrained;
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use tokenizer::{IncrementalDecoder, SpecialTokens, Tokenizer};
