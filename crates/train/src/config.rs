//! Pretraining configuration: a TOML file and/or command-line flags (flags win). The resolved
//! configuration is saved as `config.toml` in the run directory.
//!
//! The defaults are nanoGPT's CPU configuration on tiny Shakespeare at character level: a
//! 4-layer, 4-head, 128-wide GPT-2 with a 64-token context, batch 12, 2000 steps, lr 1e-3
//! decaying by cosine to 1e-4 after 100 warmup steps, AdamW β₂ = 0.99, weight decay 0.1.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The architectures `train pretrain` initialises.
pub const ARCHS: [&str; 9] = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "bert"];

/// Everything a pretraining run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Where the run writes its model, checkpoints and metrics.
    pub out_dir: PathBuf,
    /// Training text: a file or directory of `.txt` files; empty means the embedded tiny
    /// Shakespeare corpus.
    pub data: Option<PathBuf>,
    /// `char`, `bpe:VOCAB_SIZE`, or a directory holding `tokenizer.json`.
    pub tokenizer: String,
    /// Fraction of the text held out for validation (taken from the end, as nanoGPT does).
    pub val_fraction: f64,
    /// The architecture: `gpt2`, `llama`, `mistral`, `qwen2`, `qwen3`, `gemma2`, `gemma3`,
    /// `phi3` (causal LMs; Gemma 3's text model) or `bert` (masked LM), with the block and the
    /// `model_type` of that family.
    pub arch: String,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Key/value heads (llama; 0 means `n_head`).
    pub n_kv_head: usize,
    /// Hidden width.
    pub n_embd: usize,
    /// Standard deviation of the initial weights (`initializer_range` in `config.json`); GPT-2's
    /// residual projections get it over √(2·n_layer). 0 means 1/√n_embd, the scale at which a
    /// projection keeps its input's variance; GPT-2 and nanoGPT fix 0.02, which suits their
    /// 768-wide models but, at the default width of 128, trains markedly worse in the same
    /// steps (docs/training.md).
    pub init_std: f64,
    /// Context length in tokens.
    pub block_size: usize,
    /// Sliding attention window in tokens (mistral, qwen2, qwen3, phi3: every layer; gemma2,
    /// gemma3: the local layers); 0 = none.
    pub sliding_window: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Slices of each micro-batch computed in parallel (data parallelism over cores). Fixed
    /// rather than taken from the machine so a seed gives the same run everywhere.
    pub parallel_shards: usize,
    /// Optimizer steps.
    pub max_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate floor after the cosine decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `min_lr` (0 means `max_steps`).
    pub lr_decay_steps: u64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// Decoupled weight decay (not applied to biases, norms, embeddings).
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Fraction of tokens masked for the masked-LM objective.
    pub mlm_probability: f64,
    /// Seed for initialisation and data order.
    pub seed: u64,
    /// Steps between validation evaluations.
    pub eval_interval: u64,
    /// Batches per periodic validation estimate.
    pub eval_iters: usize,
    /// Steps between log lines in `metrics.jsonl`.
    pub log_interval: u64,
    /// Steps between checkpoints (0 = only at the end and on Ctrl-C).
    pub checkpoint_interval: u64,
    /// Tokens generated as a sample at the end (0 = none).
    pub sample_tokens: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs/shakespeare-char"),
            data: None,
            tokenizer: "char".into(),
            val_fraction: 0.1,
            arch: "gpt2".into(),
            n_layer: 4,
            n_head: 4,
            n_kv_head: 0,
            n_embd: 128,
            init_std: 0.0,
            block_size: 64,
            sliding_window: 0,
            batch_size: 12,
            grad_accum: 1,
            parallel_shards: 2,
            max_steps: 2000,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            lr_decay_steps: 0,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.1,
            grad_clip: 1.0,
            mlm_probability: 0.15,
            seed: 1337,
            eval_interval: 250,
            eval_iters: 20,
            log_interval: 10,
            checkpoint_interval: 500,
            sample_tokens: 300,
        }
    }
}

impl PretrainConfig {
    /// Reads a TOML file; errors name the file, line and key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text; `source` names it in errors.
    pub fn from_toml(text: &str, source: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(l) => Error::Msg(format!("{source}:{l}: {}", e.message())),
                None => Error::Msg(format!("{source}: {}", e.message())),
            }
        })
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// The first setting that defines the model (architecture, sizes, tokenizer) and differs
    /// between `self` and `other`, if any; a resumed run must keep all of them.
    pub fn model_field_differing_from(&self, other: &Self) -> Option<&'static str> {
        [
            ("arch", self.arch == other.arch),
            ("n_layer", self.n_layer == other.n_layer),
            ("n_head", self.n_head == other.n_head),
            ("n_kv_head", self.n_kv_head == other.n_kv_head),
            ("n_embd", self.n_embd == other.n_embd),
            ("block_size", self.block_size == other.block_size),
            ("sliding_window", self.sliding_window == other.sliding_window),
            ("tokenizer", self.tokenizer == other.tokenizer),
            ("data", self.data == other.data),
        ]
        .into_iter()
        .find(|(_, same)| !same)
        .map(|(f, _)| f)
    }

    /// The standard deviation the model is initialised with ([`PretrainConfig::init_std`]).
    pub fn resolved_init_std(&self) -> f64 {
        if self.init_std > 0.0 {
            self.init_std
        } else {
            1.0 / (self.n_embd as f64).sqrt()
        }
    }

    /// The step at which the cosine decay ends.
    pub fn decay_steps(&self) -> u64 {
        if self.lr_decay_steps == 0 {
            self.max_steps
        } else {
            self.lr_decay_steps
        }
    }

    /// Checks ranges and combinations; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::Msg(format!("config field `{field}`: {msg}")));
        for (f, v) in [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("block_size", self.block_size),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("parallel_shards", self.parallel_shards),
        ] {
            if v == 0 {
                return bad(f, "must be at least 1".into());
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad("n_embd", format!("{} is not divisible by n_head = {}", self.n_embd, self.n_head));
        }
        if self.n_kv_head != 0 && !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad("n_kv_head", format!("{} does not divide n_head = {}", self.n_kv_head, self.n_head));
        }
        if !ARCHS.contains(&self.arch.as_str()) {
            return bad("arch", format!("`{}` is not one of {}", self.arch, ARCHS.join(", ")));
        }
        if self.sliding_window > 0 && ["gpt2", "llama", "bert"].contains(&self.arch.as_str()) {
            return bad(
                "sliding_window",
                format!(
                    "arch `{}` has no sliding window; mistral, qwen2, qwen3, gemma2, gemma3 and phi3 have",
                    self.arch
                ),
            );
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return bad("val_fraction", format!("{} is outside (0, 1)", self.val_fraction));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} must be positive", self.lr));
        }
        if !(0.0..=self.lr).contains(&self.min_lr) {
            return bad("min_lr", format!("{} must be in [0, lr = {}]", self.min_lr, self.lr));
        }
        for (f, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(f, format!("{v} is outside [0, 1)"));
            }
        }
        if !(self.init_std >= 0.0 && self.init_std.is_finite()) {
            return bad("init_std", format!("{} must be a standard deviation, or 0 for 1/sqrt(n_embd)", self.init_std));
        }
        if self.weight_decay < 0.0 {
            return bad("weight_decay", "must not be negative".into());
        }
        if self.grad_clip < 0.0 {
            return bad("grad_clip", "must not be negative (0 turns clipping off)".into());
        }
        if !(self.mlm_probability > 0.0 && self.mlm_probability < 1.0) {
            return bad("mlm_probability", format!("{} is outside (0, 1)", self.mlm_probability));
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be at least 1".into());
        }
        if self.eval_interval == 0 || self.log_interval == 0 {
            return bad("eval_interval", "eval_interval and log_interval must be at least 1".into());
        }
        if self.eval_iters == 0 {
            return bad("eval_iters", "must be at least 1".into());
        }
        Ok(())
    }
}
