//! `serve`: an OpenAI-compatible, continuously batching inference server for an lmstack or
//! Hugging Face model directory.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use lmstack_core::DType;
use lmstack_serve::{EngineConfig, ServeOptions, SplitSteps};

/// Serve a model over an OpenAI-compatible HTTP API with continuous batching.
///
/// Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true),
/// GET /v1/models, POST /tokenize, POST /detokenize, GET /health, GET /ready, GET /metrics.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Model directory (config.json, model.safetensors, tokenizer.json) or GGUF file; the default is the
    /// README's training run.
    #[arg(long, default_value = "runs/shakespeare-char/model")]
    model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to
    /// apply on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Name clients pass as `model` (default: the directory's name, or its parent's for
    /// `.../model`).
    #[arg(long)]
    served_model_name: Option<String>,
    /// A Jinja chat template file to use instead of the model's.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one; the log says which).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Weight dtype: f32, bf16 or f16. With repacking on an AVX2 + FMA CPU, bf16 holds the
    /// projections as bf16 (half the memory) and computes in f32; otherwise bf16 and f16 compute
    /// in that dtype through candle's generic kernels, much slower than f32.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    /// Serve the weights as loaded, through `gemm`, instead of repacking the projections for
    /// the AVX2 linear kernel (which decodes faster; the originals are released after
    /// repacking, so memory is about the same either way).
    #[arg(long)]
    no_repack: bool,
    /// What the KV cache stores keys and values as: `auto` (the model's dtype) or `bf16`, half
    /// the memory per cached token and half the bytes a decode step reads, with outputs
    /// slightly different from f32 storage (attention still computes in f32).
    #[arg(long, value_enum, default_value_t = KvCacheDtype::Auto)]
    kv_cache_dtype: KvCacheDtype,
    /// Most tokens (prefill + decode) in one forward step; long prompts are prefilled in chunks
    /// of what is left.
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 32)]
    max_num_seqs: usize,
    /// Most requests waiting for a slot; more are refused with 429.
    #[arg(long, default_value_t = 256)]
    max_queued: usize,
    /// KV-cache budget in tokens over all sequences (default: max-num-seqs × context length).
    #[arg(long, default_value_t = 0)]
    kv_cache_tokens: usize,
    /// Whether a step of several sequences of a small model runs as two halves on two threads
    /// (`always`), on the engine thread alone (`never`), or (`auto`) whichever this machine
    /// measures faster for steps of 8 or more tokens, measured again every few seconds.
    #[arg(long, value_enum, default_value_t = SplitSteps::Auto)]
    split_steps: SplitSteps,
    /// Do not keep finished sequences' KV caches for later requests whose prompts begin the
    /// same way (prefix caching is on by default; kept caches give way when the budget is needed).
    #[arg(long)]
    no_prefix_caching: bool,
    /// Require `Authorization: Bearer KEY` (also read from LMSTACK_API_KEY); /health, /ready
    /// and /metrics stay open.
    #[arg(long, env = "LMSTACK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allowed CORS origin (repeatable; `*` for any). None by default.
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Refuse request fields lmstack does not know with a 400 naming them (by default they are
    /// ignored with a warning in the log, as vLLM does).
    #[arg(long)]
    strict_fields: bool,
    /// Seconds a request may take before it is cancelled (0 = no limit).
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds a client has to send a request's headers, counted from when the connection waits
    /// for a request (so also how long an idle kept-alive connection is held).
    #[arg(long, default_value_t = 30.0)]
    header_timeout: f64,
    /// Seconds a client has to send a request's whole body.
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// Most connections open at once; one more is answered 503 and closed (keep it under the
    /// process's open-file limit, `ulimit -n`).
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds in-flight requests may continue after SIGTERM / Ctrl-C.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
}

/// `--kv-cache-dtype` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KvCacheDtype {
    /// The model's dtype.
    Auto,
    /// bf16.
    Bf16,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(format!("`{other}`: expected f32, bf16 or f16")),
    }
}

fn seconds(name: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("--{name} {s}: expected a non-negative number of seconds"))
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns the pages mimalloc holds freed to the OS now. Loading frees tens of MiB (the file's
/// tensors as read, the tokenizer's JSON) that mimalloc would otherwise keep resident until
/// later allocations purge them: SmolLM2-135M Q4_1 measured 193 MiB resident when ready
/// without this, 143 MiB with it.
#[allow(unsafe_code)]
fn release_freed_memory() {
    // SAFETY: mi_collect only walks mimalloc's own heaps; it may be called at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() -> ExitCode {
    lmstack_core::prefer_rayon_threads();
    // Named, so per-thread CPU (`top -H`, `bench serve`) tells the model's thread pool from the
    // HTTP workers; unnamed, its threads would take the name of whichever thread first used it.
    if let Err(e) = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("lmstack-pool-{i}")).build_global() {
        eprintln!("warning: the thread pool was already set up: {e}");
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let timeouts = (|| -> Result<_, String> {
        Ok((
            seconds("request-timeout", cli.request_timeout)?,
            seconds("shutdown-timeout", cli.shutdown_timeout)?,
            seconds("header-timeout", cli.header_timeout)?,
            seconds("body-timeout", cli.body_timeout)?,
        ))
    })();
    let (request_timeout, shutdown_timeout, header_timeout, body_timeout) = match timeouts {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = ServeOptions {
        model: cli.model,
        adapter: cli.adapter,
        served_model_name: cli.served_model_name,
        chat_template: cli.chat_template,
        dtype: cli.dtype,
        repack: !cli.no_repack,
        kv_cache_dtype: match cli.kv_cache_dtype {
            KvCacheDtype::Auto => None,
            KvCacheDtype::Bf16 => Some(DType::BF16),
        },
        addr: SocketAddr::new(cli.host, cli.port),
        engine: EngineConfig {
            max_batch_tokens: cli.max_batch_tokens,
            max_num_seqs: cli.max_num_seqs,
            max_queued: cli.max_queued,
            kv_cache_tokens: cli.kv_cache_tokens,
            split_steps: cli.split_steps,
            prefix_caching: !cli.no_prefix_caching,
        },
        api_key: cli.api_key.filter(|k| !k.is_empty()),
        cors_origins: cli.cors_origins,
        strict_fields: cli.strict_fields,
        request_timeout: (!request_timeout.is_zero()).then_some(request_timeout),
        max_body_bytes: cli.max_body_bytes,
        header_timeout,
        body_timeout,
        max_connections: cli.max_connections,
        shutdown_timeout,
        after_load: Some(release_freed_memory),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(lmstack_serve::run(opts, lmstack_serve::server::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag's definition matches how it is read (clap checks that only at parse time).
    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["serve"]).unwrap();
        assert!(matches!((cli.dtype, cli.kv_cache_dtype), (DType::F32, KvCacheDtype::Auto)));
        let args = ["serve", "--dtype", "bf16", "--kv-cache-dtype", "bf16", "--split-steps", "never", "--no-repack"];
        let cli = Cli::try_parse_from(args).unwrap();
        assert!(matches!((cli.dtype, cli.kv_cache_dtype), (DType::BF16, KvCacheDtype::Bf16)));
        assert!(Cli::try_parse_from(["serve", "--kv-cache-dtype", "f16"]).is_err());
        assert!(Cli::try_parse_from(["serve", "--dtype", "f64"]).is_err());
    }
}
