//! A tiny random-weight GPT-2 with a character tokenizer, an end-of-sequence token and a ChatML
//! template, and helpers to serve it.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lmstack_core::chat::{CHATML, CHATML_TOKENS};
use lmstack_core::{DType, Device, Model, ModelConfig, Pretrained, SpecialTokens, Tokenizer};
use lmstack_serve::api::{self, AppState};
use lmstack_serve::metrics::Metrics;
use lmstack_serve::{server, EngineConfig, ServeOptions};

pub const CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'-\n{}[]\"_<>/";

/// Writes the model directory (context 128) into `dir`.
pub fn write_model(dir: &Path) {
    write_model_ctx(dir, 128);
}

/// Writes the model directory with context `ctx` into `dir`.
pub fn write_model_ctx(dir: &Path, ctx: usize) {
    write_model_sized(dir, ctx, 32, 2);
}

/// Writes a model of width `n_embd` and `n_layer` blocks with context `ctx` into `dir`.
pub fn write_model_sized(dir: &Path, ctx: usize, n_embd: usize, n_layer: usize) {
    let mut tok = Tokenizer::from_chars(CHARS.chars()).unwrap();
    tok.add_special_tokens(&["<|endoftext|>"]);
    tok.add_special_tokens(&CHATML_TOKENS);
    tok.set_special_tokens(SpecialTokens {
        eos: Some("<|endoftext|>".into()),
        bos: Some("<|endoftext|>".into()),
        unk: Some("<unk>".into()),
        ..Default::default()
    })
    .unwrap();
    tok.set_chat_template(Some(CHATML.into()));
    let cfg = format!(
        r#"{{"model_type": "gpt2", "n_embd": {n_embd}, "n_head": 4, "n_layer": {n_layer}, "n_positions": {ctx}, "vocab_size": {}}}"#,
        tok.vocab_size()
    );
    let model = Model::init(ModelConfig::from_json(&cfg, "test").unwrap(), 7, DType::F32, &Device::Cpu).unwrap();
    Pretrained { model, tokenizer: tok, dir: None }.save(dir).unwrap();
}

pub fn options(dir: &Path) -> ServeOptions {
    ServeOptions {
        model: dir.to_owned(),
        adapter: None,
        served_model_name: Some("tiny".into()),
        chat_template: None,
        dtype: DType::F32,
        repack: true,
        kv_cache_dtype: None,
        addr: "127.0.0.1:0".parse().unwrap(),
        engine: EngineConfig::default(),
        api_key: None,
        cors_origins: Vec::new(),
        strict_fields: false,
        request_timeout: None,
        max_body_bytes: 1 << 20,
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        max_connections: 512,
        shutdown_timeout: Duration::from_secs(10),
        after_load: None,
    }
}

/// A loaded state (engine running) for `tower::ServiceExt::oneshot` tests.
pub fn loaded_state(opts: &ServeOptions) -> Arc<AppState> {
    let metrics = Arc::new(Metrics::new());
    let state = server::state(opts, metrics.clone());
    let ready = server::load(opts, metrics).unwrap();
    assert!(state.ready.set(ready).is_ok());
    Arc::new(state)
}

pub fn router(opts: &ServeOptions) -> axum::Router {
    api::router(loaded_state(opts))
}
