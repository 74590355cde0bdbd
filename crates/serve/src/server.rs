//! Starting and stopping the server: bind, load the model in the background (`/ready` turns
//! 200 when done), serve, and on SIGTERM / Ctrl-C stop accepting, let in-flight requests finish
//! within a grace period, then return.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lmstack_core::chat::{self, ChatTemplate};
use lmstack_core::{DType, Device, Pretrained};

use crate::api::{self, AppState, Ready};
use crate::engine::{self, EngineConfig};
use crate::metrics::Metrics;

/// Everything `serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Model directory (HF layout).
    pub model: PathBuf,
    /// Name clients use in `model` (default: the directory name).
    pub served_model_name: Option<String>,
    /// A PEFT LoRA adapter directory applied on top of the model.
    pub adapter: Option<PathBuf>,
    /// Chat template file overriding the model's.
    pub chat_template: Option<PathBuf>,
    /// Weight dtype (`--dtype`): bf16 is packed as bf16 with f32 arithmetic where the projections
    /// are repacked, else the model computes in this dtype.
    pub dtype: DType,
    /// Repack the projections' weights for the AVX2 linear kernel (a second copy of them).
    pub repack: bool,
    /// The type the KV cache stores keys and values as (`--kv-cache-dtype`); `None` is the
    /// model's own. bf16 halves the cache's memory on a CPU model computing in f32.
    pub kv_cache_dtype: Option<DType>,
    /// Address to bind.
    pub addr: SocketAddr,
    /// Scheduler limits.
    pub engine: EngineConfig,
    /// Required bearer token.
    pub api_key: Option<String>,
    /// Allowed CORS origins.
    pub cors_origins: Vec<String>,
    /// Refuse unknown request fields with a 400 (`--strict-fields`) instead of ignoring them
    /// with a warning.
    pub strict_fields: bool,
    /// Per-request deadline.
    pub request_timeout: Option<Duration>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Longest wait for a request's headers (also how long an idle kept-alive connection is
    /// held).
    pub header_timeout: Duration,
    /// Longest time to receive a request's whole body.
    pub body_timeout: Duration,
    /// Most connections open at once; one more gets a 503 and is closed.
    pub max_connections: usize,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// Called on the loading thread once the model is loaded, before the server reports
    /// ready: the binary hands the memory that loading freed back to its allocator's OS
    /// pages there (mimalloc keeps freed pages until later allocator calls purge them, and an
    /// idle server makes none).
    pub after_load: Option<fn()>,
}

/// The name a model directory is served under: its last path component, or the parent's
/// when that is a generic `model` (so `runs/shakespeare-char/model` is `shakespeare-char`); a
/// GGUF file's name without `.gguf`.
pub fn default_model_name(dir: &Path) -> String {
    if dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        if let Some(stem) = dir.file_stem() {
            return stem.to_string_lossy().into_owned();
        }
    }
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let last = canon.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    if matches!(last.as_str(), "model" | "best") {
        if let Some(parent) = canon.parent().and_then(Path::file_name) {
            return parent.to_string_lossy().into_owned();
        }
    }
    last
}

/// Loads the model directory and starts the engine.
pub fn load(opts: &ServeOptions, metrics: Arc<Metrics>) -> anyhow::Result<Ready> {
    // bf16 where the packed kernel runs: weights held (packed) as bf16, arithmetic in f32 —
    // candle's own bf16 CPU kernels are several times slower than f32.
    let packed_bf16 = opts.dtype == DType::BF16 && opts.repack && lmstack_core::kernels::simd::has_avx2_fma();
    let load_dtype = if packed_bf16 { DType::F32 } else { opts.dtype };
    let mut p = Pretrained::load(&opts.model, load_dtype, &Device::Cpu)
        .with_context(|| format!("loading the model directory {}", opts.model.display()))?;
    if p.model.is_scorer() {
        anyhow::bail!(
            "{} is a reward model (a sequence classifier, no LM head): it scores texts and cannot generate; serve a language model",
            opts.model.display()
        );
    }
    if let Some(dir) = &opts.adapter {
        let n = lmstack_core::lora::load_peft(&mut p.model, dir)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
        tracing::info!(adapter = %dir.display(), projections = n, "LoRA adapter attached");
    }
    let source = match &opts.chat_template {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading the chat template {}", f.display()))?,
        None => match p.tokenizer.chat_template() {
            Some(t) => t.to_owned(),
            None => {
                tracing::warn!("the model has no chat template; chat requests use a plain `role: content` template");
                chat::PLAIN.to_owned()
            }
        },
    };
    let origin = match &opts.chat_template {
        Some(f) => f.display().to_string(),
        None => format!("the chat template of the model directory {}", opts.model.display()),
    };
    let template = ChatTemplate::new(&source).with_context(|| format!("compiling {origin}"))?;
    if opts.engine.max_num_seqs == 0 || opts.engine.max_batch_tokens < opts.engine.max_num_seqs {
        anyhow::bail!(
            "--max-batch-tokens ({}) must be at least --max-num-seqs ({}), which must be positive",
            opts.engine.max_batch_tokens,
            opts.engine.max_num_seqs
        );
    }
    if opts.repack {
        let packed = if packed_bf16 { DType::BF16 } else { p.model.stored_matrix_dtype() };
        let bytes = p.model.repack_for_inference_as(packed).context("repacking the weights")?;
        if bytes > 0 {
            let mib = bytes as f64 / (1 << 20) as f64;
            tracing::info!(mib, dtype = ?packed, "weights repacked for the AVX2 linear kernel");
        }
    }
    if let Some(kv) = opts.kv_cache_dtype {
        p.model.set_kv_cache_dtype(kv).context("--kv-cache-dtype")?;
        tracing::info!(dtype = ?kv, bytes_per_token = p.model.new_cache().bytes_per_token(), "KV cache storage");
    }
    if opts.dtype != DType::F32 && !packed_bf16 {
        // Measured on a GPT-2 124M shape: 5.6 tokens/s in bf16 through candle against 39 in f32.
        tracing::warn!(
            dtype = ?opts.dtype,
            "on the CPU a {:?} model computes through generic kernels, several times slower than f32 and not repacked; --dtype f32 converts the weights once at load{}",
            opts.dtype,
            if opts.dtype == DType::BF16 { ", and bf16 with repacking (on AVX2 + FMA) holds them as bf16 but computes in f32" } else { "" }
        );
    }
    let vocab_size = p.model.config().vocab_size();
    let tokenizer = p.tokenizer.clone();
    let (engine, _join) = engine::start(p.model, p.tokenizer, opts.engine.clone(), metrics);
    Ok(Ready { tokenizer, template, engine, vocab_size, constrainer: std::sync::OnceLock::new() })
}

/// The shared state for `opts` (model not loaded yet).
pub fn state(opts: &ServeOptions, metrics: Arc<Metrics>) -> AppState {
    let name = opts.served_model_name.clone().unwrap_or_else(|| default_model_name(&opts.model));
    let mut st = AppState::new(name, metrics);
    st.api_key = opts.api_key.clone();
    st.cors_origins = opts.cors_origins.clone();
    st.strict_fields = opts.strict_fields;
    st.request_timeout = opts.request_timeout;
    st.max_body_bytes = opts.max_body_bytes;
    st.body_timeout = opts.body_timeout;
    st
}

/// How long responses cut off at the end of the grace period get to reach their clients.
const CUT_FLUSH: Duration = Duration::from_secs(2);

/// Runs the server until a shutdown signal (or `shutdown` resolves) and in-flight requests are
/// done or the grace period is over.
pub async fn run(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if !opts.model.is_dir() && !lmstack_core::gguf::is_gguf(&opts.model) {
        anyhow::bail!(
            "no model directory or GGUF file at {}; train one with `cargo run --release --bin train` or pass --model DIR|FILE.gguf",
            opts.model.display()
        );
    }
    let listener = tokio::net::TcpListener::bind(opts.addr).await.with_context(|| format!("binding {}", opts.addr))?;
    serve_on(listener, opts, shutdown).await
}

/// [`run`] on a listener bound already (e.g. to port 0 in tests).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(state(&opts, metrics.clone()));
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %state.model_name, "listening; loading the model");
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::channel::<anyhow::Error>(1);
    {
        let (state, opts) = (state.clone(), opts.clone());
        tokio::task::spawn_blocking(move || match load(&opts, metrics) {
            Ok(ready) => {
                if let Some(f) = opts.after_load {
                    f();
                }
                let _ = state.ready.set(ready);
                tracing::info!(model = %state.model_name, "model loaded; ready");
            }
            Err(e) => {
                let _ = fail_tx.blocking_send(e);
            }
        });
    }
    let (sig_tx, sig_rx) = tokio::sync::watch::channel(false);
    let stopping = {
        let state = state.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: no new requests; waiting for in-flight ones");
            if let Some(r) = state.ready.get() {
                r.engine.stop_accepting();
            }
            let _ = sig_tx.send(true);
        }
    };
    // Connections past the process's open-file limit would fail to be accepted rather than
    // get their 503: keep the bound under it, with room for the model's and logs' files.
    let max_connections = match open_files_limit() {
        Some(files) if opts.max_connections as u64 + 64 > files => {
            let fit = files.saturating_sub(64).max(8) as usize;
            tracing::warn!(
                max_connections = fit,
                open_files = files,
                "--max-connections lowered under the open-file limit (ulimit -n)"
            );
            fit
        }
        _ => opts.max_connections,
    };
    let limits = crate::listen::ConnLimits { header_timeout: opts.header_timeout, max_connections };
    let server = crate::listen::serve(listener, api::router(state.clone()), limits, stopping);
    let mut server = std::pin::pin!(server);
    let grace = opts.shutdown_timeout;
    let mut sig_rx2 = sig_rx.clone();
    tokio::select! {
        () = &mut server => return Ok(()),
        Some(e) = fail_rx.recv() => return Err(e),
        () = async move {
            let _ = sig_rx2.wait_for(|&v| v).await;
            tokio::time::sleep(grace).await;
        } => {}
    }
    drop(sig_rx);
    // The grace period is over: requests still running end now, a stream with an error event
    // and `[DONE]`, a whole response with a 503, and their connections close.
    let _ = state.cut.send(true);
    let _ = tokio::time::timeout(CUT_FLUSH, &mut server).await;
    let cut = state.requests_cut.load(std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(
        seconds = grace.as_secs_f64(),
        requests = cut,
        "grace period over; requests still running were cut off"
    );
    if cut > 0 {
        anyhow::bail!(
            "the shutdown grace period ({:.0} s) ran out: {cut} request(s) were cut off",
            grace.as_secs_f64()
        );
    }
    Ok(())
}

/// The process's soft limit on open files (Linux `/proc/self/limits`), if known.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
