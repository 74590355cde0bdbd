//! Load generator for `serve` (run through `cargo xtask bench serve`).
//!
//! Starts the release `serve` binary on a model, then drives it with N concurrent streaming
//! clients sending a seeded mix of prompt and output lengths, and reports generated tokens/s,
//! time to first token and inter-token latency (p50/p99) per concurrency level; optionally a
//! single-stream decode run on a GPT-2 124M-shaped model (random weights), 1 against 16 streams
//! on its layers with a character vocabulary (memory-bound steps), and a memory soak of
//! thousands of requests that samples the server's resident memory.
//!
//! ```text
//! cargo run --release -p lmstack-serve --example bench_serve -- \
//!     [--model DIR] [--concurrency 1,16] [--seconds 15] [--gpt2] [--soak 3000] [--no-repack]
//!     [--split-steps auto|always|never] [--rounds N] [--prefix-chars N] [--no-prefix-caching]
//!     [--kv-cache-dtype bf16] [--kv-cache-tokens N] [--chat] [--llama-server PATH]
//! ```
//!
//! `--chat` sends chat requests (`/v1/chat/completions`, the prompt as a user message through
//! the model's chat template) instead of completions. `--llama-server PATH` (llama.cpp's
//! server, built outside the repository; `--model` a GGUF file) runs the same load against it
//! too, started with as many parallel slots as the highest concurrency and 2 threads, the two
//! servers alternating level by level.
//!
//! `--prefix-chars N` starts every prompt with the same N characters (a shared system prompt
//! or few-shot examples), which the server's prefix cache serves after the first request;
//! `--no-prefix-caching` turns that cache off for comparison.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/server.rs"]
mod server;

use futures_util::StreamExt;
use lmstack_core::{DType, Device, Model, ModelConfig, Pretrained, SeqStep, StepThreads, Tokenizer};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use server::{free_port, wait_ready, Server};

struct Args {
    model: Option<PathBuf>,
    concurrency: Vec<usize>,
    seconds: f64,
    gpt2: bool,
    soak: usize,
    /// Sweeps of the concurrency levels, one after another (medians are printed when > 1).
    rounds: usize,
    serve: PathBuf,
    /// Extra flags for `serve` (`--no-repack`, `--split-steps WAY`, `--no-prefix-caching`,
    /// `--kv-cache-dtype bf16`, `--kv-cache-tokens N`).
    serve_flags: Vec<String>,
    /// Characters every prompt starts with.
    prefix_chars: usize,
    /// Chat requests instead of completions.
    chat: bool,
    /// llama.cpp's `llama-server`, run under the same load for comparison.
    llama_server: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut a = Args {
        model: None,
        concurrency: vec![1, 16],
        seconds: 15.0,
        gpt2: false,
        soak: 0,
        rounds: 1,
        serve: root.join("target/release/serve"),
        serve_flags: Vec::new(),
        prefix_chars: 0,
        chat: false,
        llama_server: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(val()?.into()),
            "--concurrency" => {
                a.concurrency = val()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|_| format!("--concurrency: `{s}` is not a number")))
                    .collect::<Result<_, _>>()?
            }
            "--seconds" => a.seconds = val()?.parse().map_err(|_| "--seconds: not a number")?,
            "--soak" => a.soak = val()?.parse().map_err(|_| "--soak: not a number")?,
            "--rounds" => {
                a.rounds = val()?.parse().map_err(|_| "--rounds: not a number")?;
                if a.rounds == 0 {
                    return Err("--rounds: at least 1".into());
                }
            }
            "--serve" => a.serve = val()?.into(),
            "--gpt2" => a.gpt2 = true,
            "--chat" => a.chat = true,
            "--llama-server" => a.llama_server = Some(val()?.into()),
            "--no-repack" | "--no-prefix-caching" => a.serve_flags.push(flag.clone()),
            "--prefix-chars" => a.prefix_chars = val()?.parse().map_err(|_| "--prefix-chars: not a number")?,
            "--split-steps" | "--kv-cache-dtype" | "--kv-cache-tokens" => {
                let v = val()?;
                a.serve_flags.extend([flag.clone(), v]);
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// A random-weight model directory of the given GPT-2 shape, with a character tokenizer over
/// the Shakespeare text (written once, reused).
fn random_model(name: &str, n_layer: usize, n_head: usize, n_embd: usize, ctx: usize, vocab: Option<usize>) -> PathBuf {
    let dir = root().join("target/bench-models").join(name);
    if dir.join("model.safetensors").is_file() {
        return dir;
    }
    let text = std::fs::read_to_string(root().join("data/tinyshakespeare.txt")).expect("data/tinyshakespeare.txt");
    let tok = Tokenizer::from_chars(text.chars()).expect("char tokenizer");
    let cfg = json!({"model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
                     "n_positions": ctx, "vocab_size": vocab.unwrap_or(tok.vocab_size())});
    let model = Model::init(ModelConfig::from_value(cfg, name).expect("config"), 1, DType::F32, &Device::Cpu)
        .expect("init model");
    eprintln!("writing a random-weight {name} ({} parameters) to {}", model.num_parameters(), dir.display());
    Pretrained { model, tokenizer: tok, dir: None }.save(&dir).expect("save model");
    dir
}

async fn start_server(serve: &Path, model: &Path, extra: &[&str]) -> Result<Server, String> {
    let port = free_port()?;
    let child = Command::new(serve)
        .args(["--model", &model.display().to_string(), "--port", &port.to_string(), "--max-queued", "10000"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            format!("starting {}: {e} (build it with `cargo build --release -p lmstack-serve`)", serve.display())
        })?;
    wait_ready(Server { child, url: format!("http://127.0.0.1:{port}") }, "ready").await
}

/// llama.cpp's server on the GGUF `model`: `slots` parallel sequences of 512 tokens each, two
/// threads for decode and prefill.
async fn start_llama_server(exe: &Path, model: &Path, slots: usize) -> Result<Server, String> {
    let port = free_port()?;
    let child = Command::new(exe)
        .args(["-m", &model.display().to_string(), "--port", &port.to_string(), "-np", &slots.to_string()])
        .args(["-c", &(slots * 512).to_string(), "-t", "2", "-tb", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    wait_ready(Server { child, url: format!("http://127.0.0.1:{port}") }, "health").await
}

#[derive(Default)]
struct Stats {
    tokens: usize,
    requests: usize,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

/// One streaming request; returns (generated tokens, TTFT, inter-token gaps).
async fn one_request(client: &reqwest::Client, url: &str, body: &Value) -> Result<(usize, f64, Vec<f64>), String> {
    let t0 = Instant::now();
    let path = if body.get("messages").is_some() { "v1/chat/completions" } else { "v1/completions" };
    // A server may close an idle kept-alive connection just as the next request goes out on it
    // (llama-server's HTTP library closes them after a few requests): that request never
    // reached it, so it is sent again, once.
    let resp = match client.post(format!("{url}/{path}")).json(body).send().await {
        Ok(r) => r,
        Err(e) if e.is_request() || e.is_connect() => {
            client.post(format!("{url}/{path}")).json(body).send().await.map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    if !resp.status().is_success() {
        return Err(format!("status {}: {}", resp.status(), resp.text().await.unwrap_or_default()));
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut times = Vec::new();
    let mut tokens = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let now = Instant::now();
        buf.extend_from_slice(&chunk);
        // Complete events (`data: …\n\n`); the client's own work per token is kept small, as
        // it shares the machine with the server.
        let mut used = 0;
        while let Some(end) = buf[used..].windows(2).position(|w| w == b"\n\n") {
            let event = &buf[used..used + end];
            used += end + 2;
            let Some(data) = event.split(|&b| b == b'\n').find_map(|l| l.strip_prefix(b"data: ")) else { continue };
            if data == b"[DONE]" {
                continue;
            }
            let c: Chunk<'_> = serde_json::from_slice(data).map_err(|e| e.to_string())?;
            if let Some(u) = c.usage {
                tokens = u.completion_tokens;
            }
            // Each chunk carrying text is a token (a character-level model's tokens are single
            // characters; with `logprobs` every token gets a chunk).
            if c.choices.first().is_some_and(|c| {
                c.text.as_ref().is_some_and(|t| !t.is_empty())
                    || c.delta.as_ref().and_then(|d| d.content.as_ref()).is_some_and(|t| !t.is_empty())
                    || c.logprobs.as_ref().is_some_and(|l| !l.tokens.is_empty())
            }) {
                times.push(now);
            }
        }
        buf.drain(..used);
    }
    let Some(&first) = times.first() else { return Err("no tokens streamed".into()) };
    // A server that reports no usage: one chunk per token.
    let tokens = if tokens == 0 { times.len() } else { tokens };
    let gaps = times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    Ok((tokens, (first - t0).as_secs_f64(), gaps))
}

/// The fields of a streamed completion chunk the load generator reads.
#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Vec<ChunkChoice<'a>>,
    usage: Option<ChunkUsage>,
}

#[derive(serde::Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    delta: Option<ChunkDelta<'a>>,
    logprobs: Option<ChunkLogprobs>,
}

#[derive(serde::Deserialize)]
struct ChunkDelta<'a> {
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct ChunkLogprobs {
    #[serde(default)]
    tokens: Vec<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct ChunkUsage {
    completion_tokens: usize,
}

/// Most tokens a request may generate: `ctx` less the longest prompt, at most 96.
fn max_out(ctx: usize, prefix_chars: usize) -> usize {
    ctx.saturating_sub(24 + prefix_chars).clamp(16, 96)
}

/// A request: the shared `prefix`, then 8..=24 characters from a random place in `text`;
/// 16..=[`max_out`] tokens out.
fn request_body(rng: &mut impl Rng, text: &str, prefix: &str, ctx: usize, chat: bool) -> Value {
    let plen = rng.random_range(8..=24usize);
    let start = rng.random_range(0..text.len() - 64);
    let start = (start..).find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let prompt: String = prefix.chars().chain(text[start..].chars().take(plen)).collect();
    let max_out = max_out(ctx, prefix.chars().count());
    let max_tokens = rng.random_range(16..=max_out);
    let mut body = json!({"max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": true, "stream": true,
           "stream_options": {"include_usage": true}, "seed": rng.random::<u32>()});
    if chat {
        body["messages"] = json!([{"role": "user", "content": prompt}]);
    } else {
        body["prompt"] = json!(prompt);
    }
    body
}

/// What the clients send: prompts from `text` after the shared `prefix`, for a model of context
/// `ctx`, as chats or completions.
#[derive(Clone)]
struct Workload {
    text: Arc<String>,
    prefix: Arc<String>,
    ctx: usize,
    chat: bool,
}

/// `clients` concurrent clients sending back-to-back requests for `seconds` (or until
/// `max_requests` have been sent).
async fn load(url: &str, clients: usize, seconds: f64, w: &Workload, max_requests: Option<usize>) -> (Stats, f64) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, url, w, counter) = (client.clone(), url.to_owned(), w.clone(), counter.clone());
            tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c as u64);
                let mut s = Stats::default();
                loop {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let done = match max_requests {
                        Some(m) => n >= m,
                        None => Instant::now() >= deadline,
                    };
                    if done {
                        break;
                    }
                    let body = request_body(&mut rng, &w.text, &w.prefix, w.ctx, w.chat);
                    match one_request(&client, &url, &body).await {
                        Ok((tokens, ttft, gaps)) => {
                            s.tokens += tokens;
                            s.requests += 1;
                            s.ttft.push(ttft);
                            s.itl.extend(gaps);
                        }
                        Err(e) => panic!("request failed: {e}"),
                    }
                }
                s
            })
        })
        .collect();
    let mut all = Stats::default();
    for t in tasks {
        let s = t.await.expect("client task");
        all.tokens += s.tokens;
        all.requests += s.requests;
        all.ttft.extend(s.ttft);
        all.itl.extend(s.itl);
    }
    (all, t0.elapsed().as_secs_f64())
}

/// `v` as a short comma-separated list (as measured, in order).
fn fmt_list(v: &[f64]) -> String {
    v.iter().map(|x| if *x >= 100.0 { format!("{x:.0}") } else { format!("{x:.2}") }).collect::<Vec<_>>().join(", ")
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A `/proc/PID/status` memory line (`VmRSS:`, `VmHWM:` for the peak) in MiB.
fn status_mib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The server's `/metrics` text (empty if it cannot be read).
async fn scrape(url: &str) -> String {
    match reqwest::get(format!("{url}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of the unlabelled sample `name` in a `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
}

async fn metric_mean(url: &str, name: &str) -> f64 {
    let text = scrape(url).await;
    let get = |suffix: &str| metric(&text, &format!("{name}{suffix}")).unwrap_or(f64::NAN);
    get("_sum") / get("_count")
}

/// CPU seconds so far of each of a process's threads (`/proc/PID/task/*/schedstat`, nanoseconds
/// on the CPU), by thread id, with the thread's name.
fn thread_cpu(pid: &str) -> HashMap<String, (String, f64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return HashMap::new() };
    dir.flatten()
        .filter_map(|task| {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?.trim().to_owned();
            let ns: f64 =
                std::fs::read_to_string(path.join("schedstat")).ok()?.split_whitespace().next()?.parse().ok()?;
            Some((task.file_name().to_string_lossy().into_owned(), (comm, ns * 1e-9)))
        })
        .collect()
}

/// CPU seconds spent between two [`thread_cpu`] snapshots: `[engine thread and its thread
/// pool, HTTP side (tokio workers), all threads]`. Per thread, so one that exits in between
/// (tokio's blocking threads, which share the workers' name) drops out of both rather than
/// taking its whole lifetime's CPU off the sum.
fn cpu_between(before: &HashMap<String, (String, f64)>, after: &HashMap<String, (String, f64)>) -> [f64; 3] {
    let mut t = [0.0; 3];
    for (tid, (comm, secs)) in after {
        let s = secs - before.get(tid).map_or(0.0, |b| b.1);
        match comm.as_str() {
            c if c == "lmstack-engine" || c.starts_with("lmstack-pool") => t[0] += s,
            "tokio-rt-worker" => t[1] += s,
            _ => {}
        }
        t[2] += s;
    }
    t
}

/// The model's decode steps alone — this thread, no thread pool, no HTTP — at 1 and at 16
/// sequences of about 30 cached tokens: how much more a core computes per second on a batch
/// than on one token, the ceiling of what batching can give the server on this CPU when, as
/// for a small model whose weights stay in cache, a step costs arithmetic rather than memory
/// traffic.
fn bare_forward_gain(dir: &Path) {
    let mut model = Model::load(dir, DType::F32, &Device::Cpu).expect("load the model");
    model.repack_for_inference().expect("repack");
    let (ctx, vocab) = (model.max_len(), model.config().vocab_size());
    let prompt: Vec<u32> = (0..(ctx / 2).min(30)).map(|i| (i * 7 % vocab) as u32).collect();
    let rate = |b: usize| -> f64 {
        let mut caches: Vec<_> = (0..b).map(|_| model.new_cache()).collect();
        for c in caches.iter_mut() {
            let mut first = [SeqStep { tokens: &prompt, cache: c, all_logits: false }];
            model.forward_cached_on(&mut first, StepThreads::One).expect("prefill");
        }
        let (t0, mut tokens) = (Instant::now(), 0);
        while t0.elapsed() < Duration::from_millis(1500) {
            let toks: Vec<[u32; 1]> = (0..b).map(|i| [((tokens + i) % vocab) as u32]).collect();
            let mut steps: Vec<SeqStep<'_>> =
                caches.iter_mut().zip(&toks).map(|(c, t)| SeqStep { tokens: t, cache: c, all_logits: false }).collect();
            model.forward_cached_on(&mut steps, StepThreads::One).expect("decode step");
            tokens += b;
            if caches[0].len() + 1 >= ctx {
                caches.iter_mut().for_each(|c| c.truncate(prompt.len()));
            }
        }
        tokens as f64 / t0.elapsed().as_secs_f64()
    };
    let (one, many) = (rate(1), rate(16));
    println!(
        "bare forward (one thread, no HTTP): 1 sequence {one:.0} tokens/s, 16 sequences {many:.0} tokens/s: {:.1}x, what batching gains the model's arithmetic on this CPU",
        many / one
    );
}

/// Sums and counts of the batch-size, batch-token and step-duration histograms, and the steps
/// split over two threads.
async fn server_stats(url: &str) -> [f64; 10] {
    let text = scrape(url).await;
    let get = |name: &str| metric(&text, name).unwrap_or(0.0);
    [
        get("lmstack_batch_size_sum"),
        get("lmstack_batch_size_count"),
        get("lmstack_batch_tokens_sum"),
        get("lmstack_decode_step_duration_seconds_sum"),
        get("lmstack_decode_step_duration_seconds_count"),
        get("lmstack_prefill_step_duration_seconds_sum"),
        get("lmstack_prefill_step_duration_seconds_count"),
        get("lmstack_split_steps_total"),
        get("lmstack_prefix_cache_hits_total"),
        get("lmstack_prefix_cache_queries_total"),
    ]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let text =
        Arc::new(std::fs::read_to_string(root().join("data/tinyshakespeare.txt")).expect("data/tinyshakespeare.txt"));
    let flags: Vec<&str> = args.serve_flags.iter().map(String::as_str).collect();
    let default = root().join("runs/shakespeare-char/model");
    let (model, what) = match &args.model {
        Some(m) => (m.clone(), m.display().to_string()),
        None if default.is_dir() => (default.clone(), "the default model (runs/shakespeare-char/model)".into()),
        None => (
            random_model("shakespeare-char-shape", 4, 4, 128, 64, None),
            "a random-weight model of the default shape (train the default model for the real one)".into(),
        ),
    };
    let ctx = if lmstack_core::gguf::is_gguf(&model) {
        lmstack_core::gguf::GgufFile::open(&model).and_then(|g| g.config()).expect("the GGUF file's config")
    } else {
        ModelConfig::from_file(&model.join("config.json")).expect("config.json")
    }
    .max_position_embeddings();
    if args.prefix_chars + 24 + 16 > ctx {
        eprintln!(
            "error: --prefix-chars {}: a prompt would not fit the context of {ctx} (at most {})",
            args.prefix_chars,
            ctx.saturating_sub(40)
        );
        std::process::exit(2);
    }
    // The shared beginning: the corpus's opening characters.
    let prefix = Arc::new(text.chars().take(args.prefix_chars).collect::<String>());
    let work = Workload { text: text.clone(), prefix: prefix.clone(), ctx, chat: args.chat };
    let shared =
        if args.prefix_chars > 0 { format!("the same {} chars, then ", args.prefix_chars) } else { String::new() };
    println!(
        "\n== bench serve: {what}, context {ctx}; streaming clients, prompts {shared}8-24 chars, outputs 16-{} tokens",
        max_out(ctx, args.prefix_chars)
    );
    let server = start_server(&args.serve, &model, &flags).await.unwrap_or_else(|e| panic!("{e}"));
    // Warm-up.
    let _ = load(&server.url, 2, 1.0, &work, None).await;
    let peer = match &args.llama_server {
        Some(exe) => {
            let slots = args.concurrency.iter().copied().max().unwrap_or(1);
            let peer = start_llama_server(exe, &model, slots).await.unwrap_or_else(|e| panic!("{e}"));
            let _ = load(&peer.url, 2, 1.0, &work, None).await;
            println!("llama-server: {} with {slots} slots of 512 tokens, 2 threads", exe.display());
            Some(peer)
        }
        None => None,
    };
    let mut peer_rounds: Vec<Vec<f64>> = Vec::new();
    // Tokens/s per round and level.
    let mut rounds: Vec<Vec<f64>> = Vec::new();
    for round in 0..args.rounds {
        let mut single = None;
        rounds.push(Vec::new());
        if args.rounds > 1 {
            println!("-- round {} of {}", round + 1, args.rounds);
        }
        println!(
            "{:>11} {:>9} {:>12} {:>11} {:>11} {:>11} {:>11}",
            "concurrency", "requests", "tokens/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"
        );
        for &c in &args.concurrency {
            let before = server_stats(&server.url).await;
            let pid = server.child.id().to_string();
            let (cpu0, own0) = (thread_cpu(&pid), thread_cpu("self"));
            let (mut s, wall) = load(&server.url, c, args.seconds, &work, None).await;
            let (cpu, own) = (cpu_between(&cpu0, &thread_cpu(&pid)), cpu_between(&own0, &thread_cpu("self"))[2]);
            let after = server_stats(&server.url).await;
            let tps = s.tokens as f64 / wall;
            if c == 1 {
                single = Some(tps);
            }
            println!(
                "{c:>11} {:>9} {tps:>12.0} {:>9.1}ms {:>9.1}ms {:>9.1}ms {:>9.1}ms",
                s.requests,
                pct(&mut s.ttft, 0.5) * 1e3,
                pct(&mut s.ttft, 0.99) * 1e3,
                pct(&mut s.itl, 0.5) * 1e3,
                pct(&mut s.itl, 0.99) * 1e3
            );
            let d = |i: usize| after[i] - before[i];
            println!(
            "{:>11} server: {:.1} sequences and {:.1} tokens per step, {:.2} ms per step, {:.0} % of steps split over two threads, {:.0} % of prompt tokens found in the prefix cache",
            "",
            d(0) / d(1),
            d(2) / d(1),
            (d(3) + d(5)) / (d(4) + d(6)) * 1e3,
            d(7) / d(1) * 100.0,
            d(8) / d(9) * 100.0
        );
            let per_token = |secs: f64| secs / s.tokens.max(1) as f64 * 1e6;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            println!(
                "{:>11} CPU per generated token: engine {:.0} us, server HTTP {:.0} us, load generator {:.0} us; \
             {:.0} % of the machine's {cores} cores busy with these",
                "",
                per_token(cpu[0]),
                per_token(cpu[1]),
                per_token(own),
                (cpu[2] + own) / (wall * cores) * 100.0
            );
            rounds[round].push(tps);
            if let (Some(one), true) = (single, c > 1) {
                println!("{:>11} aggregate / single-stream = {:.1}x   (target at 16 streams: >= 4x)", "", tps / one);
            }
            if let Some(peer) = &peer {
                let (mut p, wall) = load(&peer.url, c, args.seconds, &work, None).await;
                let ptps = p.tokens as f64 / wall;
                println!(
                    "{:>11} {:>9} {ptps:>12.0} {:>9.1}ms {:>9.1}ms {:>9.1}ms {:>9.1}ms   llama-server, same load ({:.2}x lmstack's)",
                    "",
                    p.requests,
                    pct(&mut p.ttft, 0.5) * 1e3,
                    pct(&mut p.ttft, 0.99) * 1e3,
                    pct(&mut p.itl, 0.5) * 1e3,
                    pct(&mut p.itl, 0.99) * 1e3,
                    ptps / tps
                );
                if peer_rounds.len() <= round {
                    peer_rounds.push(Vec::new());
                }
                peer_rounds[round].push(ptps);
            }
        }
    }
    if args.rounds > 1 {
        // The machine's speed drifts between runs; the median of each round's own ratio is
        // steadier than a ratio of figures measured minutes apart.
        println!("-- medians over {} rounds", args.rounds);
        let one = args.concurrency.iter().position(|&c| c == 1);
        for (i, &c) in args.concurrency.iter().enumerate() {
            let mut t: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
            // Each round's ratio to the single-stream figure of the same round.
            let mut q: Vec<f64> = rounds.iter().map(|r| one.map_or(f64::NAN, |j| r[i] / r[j])).collect();
            let (t_list, q_list) = (fmt_list(&t), fmt_list(&q));
            let ratio = if c > 1 && q.iter().all(|x| x.is_finite()) {
                format!(", {:.1}x one stream (each round's ratio: {q_list})", pct(&mut q, 0.5))
            } else {
                String::new()
            };
            println!("{c:>11} {:>12.0} tokens/s (rounds: {t_list}){ratio}", pct(&mut t, 0.5));
            if !peer_rounds.is_empty() {
                let mut p: Vec<f64> = peer_rounds.iter().map(|r| r[i]).collect();
                let list = fmt_list(&p);
                println!("{:>11} {:>12.0} tokens/s llama-server (rounds: {list})", "", pct(&mut p, 0.5));
            }
        }
    }
    println!(
        "server: mean batch size {:.1}, mean decode step {:.2} ms",
        metric_mean(&server.url, "lmstack_batch_size").await,
        metric_mean(&server.url, "lmstack_decode_step_duration_seconds").await * 1e3
    );
    if args.soak > 0 {
        let pid = server.child.id();
        println!("\n== memory soak: {} requests at 16 concurrent streams", args.soak);
        let chunk = (args.soak / 6).max(1);
        let mut done = 0;
        while done < args.soak {
            let n = chunk.min(args.soak - done);
            let (s, wall) = load(&server.url, 16, 0.0, &work, Some(n)).await;
            done += s.requests;
            println!(
                "after {done:>6} requests: server RSS {:>7.1} MiB  ({:.0} tokens/s)",
                rss_mib(pid),
                s.tokens as f64 / wall
            );
        }
    }
    drop(peer);
    drop(server);
    bare_forward_gain(&model);
    if args.gpt2 {
        let dir = random_model("gpt2-124m", 12, 12, 768, 1024, Some(50257));
        println!("\n== single-stream decode, GPT-2 124M shape (random weights, f32)");
        let server = start_server(&args.serve, &dir, &flags).await.unwrap_or_else(|e| panic!("{e}"));
        let client = reqwest::Client::new();
        let body = json!({"prompt": "ROMEO: But soft, what light", "max_tokens": 128, "temperature": 0, "ignore_eos": true,
                          "stream": true, "logprobs": 0, "stream_options": {"include_usage": true}});
        let _ = one_request(
            &client,
            &server.url,
            &json!({"prompt": "warm up", "max_tokens": 8, "stream": true, "logprobs": 0}),
        )
        .await;
        let mut best: f64 = 0.0;
        for _ in 0..3 {
            let t0 = Instant::now();
            let (tokens, ttft, gaps) = one_request(&client, &server.url, &body).await.unwrap_or_else(|e| panic!("{e}"));
            let decode = gaps.iter().sum::<f64>();
            let tps = gaps.len() as f64 / decode;
            best = best.max(tps);
            println!(
                "{tokens} tokens in {:.2} s: TTFT {:.0} ms, decode {tps:.1} tokens/s",
                t0.elapsed().as_secs_f64(),
                ttft * 1e3
            );
        }
        println!(
            "best decode: {best:.1} tokens/s; engine decode step {:.1} ms   (Python transformers `generate`: ~24 tokens/s)",
            metric_mean(&server.url, "lmstack_decode_step_duration_seconds").await * 1e3
        );
        let pid = server.child.id();
        println!(
            "server memory: {:.0} MiB resident now, {:.0} MiB at the peak (loading)   (checkpoint: {:.0} MiB)",
            rss_mib(pid),
            status_mib(pid, "VmHWM:"),
            std::fs::metadata(dir.join("model.safetensors")).map_or(f64::NAN, |m| m.len() as f64 / (1 << 20) as f64)
        );
        drop(server);
        // Batching where a decode step is bound by reading the weights rather than by arithmetic:
        // the same load generator at 1 and 16 streams (the random 50,257-token model above
        // streams mostly empty text, so this one has a character vocabulary).
        let dir = random_model("gpt2-124m-layers-char", 12, 12, 768, 1024, None);
        println!("\n== batching a memory-bound model: GPT-2 124M's layers, character vocabulary (random weights), 20 s per level");
        let server = start_server(&args.serve, &dir, &flags).await.unwrap_or_else(|e| panic!("{e}"));
        let plain = Workload { text: text.clone(), prefix: Arc::new(String::new()), ctx: 1024, chat: false };
        let _ = load(&server.url, 2, 2.0, &plain, None).await;
        let mut rates = Vec::new();
        for c in [1, 16] {
            let (s, wall) = load(&server.url, c, 20.0, &plain, None).await;
            rates.push(s.tokens as f64 / wall);
            println!("{c:>2} streams: {:.0} tokens/s ({} requests)", rates[rates.len() - 1], s.requests);
        }
        println!("aggregate / single-stream = {:.1}x", rates[1] / rates[0]);
    }
}
