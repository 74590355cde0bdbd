//! [`EndpointBackend`]: any OpenAI-compatible server (lmstack `serve`, vLLM, llama.cpp …) over
//! HTTP, as lm-evaluation-harness's `local-completions` model uses one.
//!
//! - log-likelihood: `POST /v1/completions` with the context + continuation as the prompt,
//!   `echo: true, logprobs: 1, max_tokens: 1, temperature: 0`; the continuation's tokens are
//!   those whose `text_offset` lies inside it, greedy when each is its position's top token;
//! - rolling log-likelihood: `POST /tokenize` (vLLM's extension, also lmstack's) for the tokens,
//!   then token-id windows of the model's context (`GET /v1/models` → `max_model_len`);
//! - generation: `POST /v1/completions` with `stop` = `until`, greedy; or, as a chat model
//!   ([`EndpointBackend::with_chat`]), `POST /v1/chat/completions` with the context as one user
//!   message (chat endpoints give no prompt log-probabilities, so only generation tasks run).
//!
//! Requests run with bounded concurrency, are retried with exponential backoff on connection
//! errors, 429 (honouring `Retry-After`) and 5xx, and every answer goes to an append-only JSONL
//! cache, so an interrupted run resumes without asking again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::backend::{Backend, BackendResult};
use crate::schema::GenerationKwargs;

/// An OpenAI-compatible completions endpoint.
pub struct EndpointBackend {
    base: String,
    model: String,
    api_key: Option<String>,
    client: reqwest::blocking::Client,
    concurrency: usize,
    retries: usize,
    chat: bool,
    max_length: Option<usize>,
    /// The token rolling windows start from (the server's BOS, else EOS), asked once.
    prefix: OnceLock<Option<u64>>,
    /// Whether the server scores a prompt without generating (`max_tokens: 0`), asked once.
    score_only: OnceLock<bool>,
    cache: Mutex<Cache>,
}

struct Cache {
    map: HashMap<String, Value>,
    file: Option<std::fs::File>,
}

impl EndpointBackend {
    /// A backend for `base` (e.g. `http://localhost:8000/v1`) and `model` (`None`: the first
    /// model `/v1/models` lists); `cache` is a JSONL file of earlier answers to reuse and extend.
    pub fn new(base: &str, model: Option<&str>, api_key: Option<String>, cache: Option<&Path>) -> BackendResult<Self> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .context("creating the HTTP client")?;
        let mut map = HashMap::new();
        let mut file = None;
        if let Some(p) = cache {
            if let Ok(text) = std::fs::read_to_string(p) {
                // A torn last line (interrupted write) is skipped; everything before it is kept.
                for line in text.lines() {
                    if let Ok(v) = serde_json::from_str::<Value>(line) {
                        if let (Some(k), Some(r)) = (v["key"].as_str(), v.get("response")) {
                            map.insert(k.to_owned(), r.clone());
                        }
                    }
                }
            }
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening the cache {}", p.display()))?,
            );
        }
        let mut b = Self {
            base: base.trim_end_matches('/').to_owned(),
            model: model.unwrap_or_default().to_owned(),
            api_key,
            client,
            concurrency: 8,
            retries: 5,
            chat: false,
            max_length: None,
            prefix: OnceLock::new(),
            score_only: OnceLock::new(),
            cache: Mutex::new(Cache { map, file }),
        };
        if b.model.is_empty() {
            let v = b.get("/models")?;
            b.model = v["data"][0]["id"]
                .as_str()
                .ok_or_else(|| anyhow!("{}/models lists no model; pass --endpoint-model", b.base))?
                .to_owned();
        }
        Ok(b)
    }

    /// Most requests in flight at once (default 8).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Retries per request (default 5).
    pub fn with_retries(mut self, n: usize) -> Self {
        self.retries = n;
        self
    }

    /// Generate through `/v1/chat/completions` (the server applies its chat template).
    pub fn with_chat(mut self, chat: bool) -> Self {
        self.chat = chat;
        self
    }

    /// Reads at most `n` tokens at once (lm-eval's `max_length`), as `LocalBackend`'s.
    pub fn with_max_length(mut self, n: Option<usize>) -> Self {
        self.max_length = n;
        self
    }

    /// Cached answers available.
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|c| c.map.len()).unwrap_or(0)
    }

    fn get(&self, path: &str) -> BackendResult<Value> {
        self.send(path, None)
    }

    /// One request to `base + path` with retries; `body` None is a GET.
    fn send(&self, path: &str, body: Option<&Value>) -> BackendResult<Value> {
        self.send_url(&format!("{}{path}", self.base), body)
    }

    /// One request with retries; `body` None is a GET.
    fn send_url(&self, url: &str, body: Option<&Value>) -> BackendResult<Value> {
        let url = url.to_owned();
        let mut delay = Duration::from_millis(250);
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            let mut req = match body {
                Some(b) => self.client.post(&url).json(b),
                None => self.client.get(&url),
            };
            if let Some(k) = &self.api_key {
                req = req.bearer_auth(k);
            }
            let resp = match req.send() {
                Ok(r) => r,
                Err(e) => {
                    last = format!("cannot reach {url}: {e}");
                    continue;
                }
            };
            let status = resp.status();
            if status.is_success() {
                return resp.json().with_context(|| format!("{url}: the response is not JSON"));
            }
            if let Some(s) = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<f64>().ok()) {
                delay = Duration::from_secs_f64(s.clamp(0.0, 60.0));
            }
            let text = resp.text().unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            last = format!("{url}: {status}: {msg}");
            if !(status.as_u16() == 429 || status.is_server_error()) {
                bail!(last);
            }
        }
        bail!("{last} (after {} attempts)", self.retries + 1)
    }

    /// A completion request through the cache.
    fn complete(&self, body: Value) -> BackendResult<Value> {
        self.post_cached("/completions", body)
    }

    /// One chat completion's text (through the cache).
    pub fn chat(
        &self,
        messages: &[Value],
        max_tokens: usize,
        temperature: f32,
        stop: &[String],
    ) -> BackendResult<String> {
        let kw = GenerationKwargs { until: stop.to_vec(), ..Default::default() };
        self.chat_with(messages, max_tokens, temperature, &kw)
    }

    /// One chat completion's text with `kw`'s stop strings and output constraint.
    fn chat_with(
        &self,
        messages: &[Value],
        max_tokens: usize,
        temperature: f32,
        kw: &GenerationKwargs,
    ) -> BackendResult<String> {
        let mut body = json!({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                              "temperature": temperature, "seed": 0});
        if !kw.until.is_empty() {
            body["stop"] = json!(kw.until);
        }
        kw.constrain(&mut body);
        let v = self.post_cached("/chat/completions", body)?;
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the response has no choices[0].message.content"))
    }

    /// A POST through the cache (completions keep their body as the key; other paths prefix it).
    fn post_cached(&self, path: &str, body: Value) -> BackendResult<Value> {
        let key = if path == "/completions" { body.to_string() } else { format!("{path} {body}") };
        if let Some(v) = self.cache.lock().map_err(|_| anyhow!("cache lock poisoned"))?.map.get(&key) {
            return Ok(v.clone());
        }
        let v = self.send(path, Some(&body))?;
        let mut c = self.cache.lock().map_err(|_| anyhow!("cache lock poisoned"))?;
        if let Some(f) = c.file.as_mut() {
            let line = json!({"key": key, "response": v}).to_string() + "\n";
            f.write_all(line.as_bytes()).context("writing the cache")?;
            f.flush()?;
        }
        c.map.insert(key, v.clone());
        Ok(v)
    }

    /// Runs `f` over `items` with bounded concurrency, keeping order.
    pub(crate) fn map<T: Sync, R: Send>(
        &self,
        items: &[T],
        f: impl Fn(&T) -> BackendResult<R> + Sync,
    ) -> BackendResult<Vec<R>> {
        let next = AtomicUsize::new(0);
        let out: Mutex<Vec<Option<BackendResult<R>>>> = Mutex::new((0..items.len()).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..self.concurrency.min(items.len()).max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= items.len() {
                        break;
                    }
                    let r = f(&items[i]);
                    let failed = r.is_err();
                    if let Ok(mut o) = out.lock() {
                        o[i] = Some(r);
                    }
                    if failed {
                        next.store(items.len(), Ordering::Relaxed);
                    }
                });
            }
        });
        let out = out.into_inner().map_err(|_| anyhow!("a worker panicked"))?;
        out.into_iter().map(|r| r.unwrap_or_else(|| Err(anyhow!("request not run (an earlier one failed)")))).collect()
    }

    /// Token ids from the server's `/tokenize` (beside `/v1`), if it has one.
    fn tokenize(&self, text: &str) -> BackendResult<Vec<u64>> {
        let root = self.base.strip_suffix("/v1").unwrap_or(&self.base);
        let body = json!({"model": self.model, "prompt": text, "add_special_tokens": false});
        let t = self.send_url(&format!("{root}/tokenize"), Some(&body))?;
        Ok(t["tokens"]
            .as_array()
            .ok_or_else(|| anyhow!("/tokenize returned no tokens"))?
            .iter()
            .filter_map(Value::as_u64)
            .collect())
    }

    /// Log-probabilities of the last `n` prompt tokens (generating nothing where the server
    /// allows `max_tokens: 0`, else one token that is left out).
    fn tail_logprobs(&self, ids: &[u64], n: usize) -> BackendResult<(f64, bool)> {
        let gen = if self.score_only.get() == Some(&true) { 0 } else { 1 };
        let v = self.complete(json!({"model": self.model, "prompt": ids, "max_tokens": gen, "echo": true,
                                     "logprobs": 1, "temperature": 0, "seed": 0}))?;
        let lp = &v["choices"][0]["logprobs"];
        let lps =
            lp["token_logprobs"].as_array().ok_or_else(|| anyhow!("the response has no logprobs.token_logprobs"))?;
        let tops = lp["top_logprobs"].as_array();
        let (mut sum, mut greedy) = (0.0, true);
        for k in ids.len() - n..ids.len() {
            let l = lps.get(k).and_then(Value::as_f64).ok_or_else(|| anyhow!("token {k} has no log-probability"))?;
            sum += l;
            if let Some(top) = tops.and_then(|t| t.get(k)).and_then(Value::as_object) {
                greedy &= l >= top.values().filter_map(Value::as_f64).fold(f64::NEG_INFINITY, f64::max) - 1e-6;
            }
        }
        Ok((sum, greedy))
    }

    /// The server's BOS token, else its EOS token (`/tokenizer_info`, as vLLM serves it, and
    /// `/tokenize`), which lm-eval puts before a text so its first token is scored too; `None`
    /// where the server does not say.
    fn prefix_token(&self) -> Option<u64> {
        *self.prefix.get_or_init(|| {
            let root = self.base.strip_suffix("/v1").unwrap_or(&self.base);
            let info = self.send_url(&format!("{root}/tokenizer_info"), None).ok()?;
            ["bos_token", "eos_token"].iter().find_map(|k| {
                // A string, or an AddedToken object as in some tokenizer_config.json files.
                let t = info[*k].as_str().or(info[*k]["content"].as_str())?;
                match self.tokenize(t).ok()?.as_slice() {
                    [id] => Some(*id),
                    _ => None,
                }
            })
        })
    }

    /// Whether the server returns a prompt's log-probabilities for `max_tokens: 0` (lmstack
    /// and OpenAI's legacy API do, vLLM refuses it), asked once with a one-token prompt
    /// (and cached, so a rerun asks nothing).
    fn scores_without_generating(&self, token: Option<u64>) -> bool {
        *self.score_only.get_or_init(|| {
            let body = json!({"model": self.model, "prompt": [token.unwrap_or(0)], "max_tokens": 0, "echo": true,
                              "logprobs": 1, "temperature": 0});
            self.complete(body).is_ok()
        })
    }

    /// How many tokens a scoring request may have the model read (lm-eval's `max_length`):
    /// `--max-length`, else what the endpoint's context leaves a prompt that holds them plus
    /// the last token scored (and the token generated where it cannot score without).
    fn scoring_context(&self, prefix: Option<u64>) -> BackendResult<usize> {
        let max = self.max_len()?;
        let room = max.saturating_sub(if self.scores_without_generating(prefix) { 1 } else { 2 });
        match self.max_length {
            Some(n) if n > room => {
                bail!("--max-length {n} does not fit the endpoint: its context of {max} allows at most {room}")
            }
            Some(n) => Ok(n),
            None if room < 1 => bail!("the endpoint's context of {max} tokens is too short to score anything"),
            None => Ok(room),
        }
    }

    fn max_len(&self) -> BackendResult<usize> {
        let v = self.get("/models")?;
        let models = v["data"].as_array().cloned().unwrap_or_default();
        models
            .iter()
            .find(|m| m["id"] == self.model.as_str())
            .or(models.first())
            .and_then(|m| m["max_model_len"].as_u64())
            .map(|n| n as usize)
            .ok_or_else(|| anyhow!("{}/models gives no max_model_len; rolling log-likelihoods need it", self.base))
    }
}

impl EndpointBackend {
    fn no_chat(&self) -> BackendResult<()> {
        if self.chat {
            bail!("log-likelihood tasks need /v1/completions with echo and logprobs; a chat endpoint cannot score them (drop --chat)");
        }
        Ok(())
    }
}

/// Log-probabilities of the prompt tokens whose offsets fall in `[from, to)` (characters),
/// and whether each was its position's most likely token.
fn span_logprobs(v: &Value, from: usize, to: usize) -> BackendResult<(f64, bool, usize)> {
    let lp = &v["choices"][0]["logprobs"];
    let offsets = lp["text_offset"].as_array().ok_or_else(|| anyhow!("the response has no logprobs.text_offset"))?;
    let lps = lp["token_logprobs"].as_array().ok_or_else(|| anyhow!("the response has no logprobs.token_logprobs"))?;
    let tops = lp["top_logprobs"].as_array();
    let (mut sum, mut greedy, mut n) = (0.0, true, 0);
    for (i, off) in offsets.iter().enumerate() {
        let off = off.as_u64().unwrap_or(u64::MAX) as usize;
        if off < from || off >= to {
            continue;
        }
        let l = lps
            .get(i)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("token {i} has no log-probability (is the context empty?)"))?;
        sum += l;
        n += 1;
        if let Some(top) = tops.and_then(|t| t.get(i)).and_then(Value::as_object) {
            let best = top.values().filter_map(Value::as_f64).fold(f64::NEG_INFINITY, f64::max);
            greedy &= l >= best - 1e-6;
        }
    }
    Ok((sum, greedy, n))
}

impl Backend for EndpointBackend {
    fn name(&self) -> String {
        format!("{} ({})", self.base, self.model)
    }

    fn loglikelihood(&mut self, reqs: &[(String, String)]) -> BackendResult<Vec<(f64, bool)>> {
        self.no_chat()?;
        // With /tokenize (vLLM, lmstack): token-id prompts cut from the left to the context, as
        // lm-eval's tokenized requests; without: text prompts and `text_offset`.
        let max = self.max_len().ok();
        let tokenized = max.is_some() && self.tokenize("a").is_ok();
        let prefix = if tokenized { self.prefix_token() } else { None };
        let max_seq = if tokenized { Some(self.scoring_context(prefix)?) } else { None };
        self.map(reqs, |(ctx, cont)| {
            let prompt = format!("{ctx}{cont}");
            if let Some(max_seq) = max_seq {
                let ctx_ids = self.tokenize(ctx)?;
                let mut whole = self.tokenize(&prompt)?;
                let mut split = ctx_ids.iter().zip(&whole).take_while(|(a, b)| a == b).count();
                if split == 0 {
                    // An empty context: the prefix token stands before the continuation, as
                    // in-process; without one its first token is context.
                    whole.splice(0..0, prefix);
                    split = 1;
                }
                let n = whole.len().saturating_sub(split);
                if n == 0 {
                    bail!("the continuation {cont:?} has no tokens");
                }
                if n > max_seq {
                    bail!("the continuation is {n} tokens, beyond the {max_seq} the endpoint can score at once");
                }
                // The model reads the last `max_seq` tokens before the last one, as in-process.
                let keep = whole.len().min(max_seq + 1);
                return self.tail_logprobs(&whole[whole.len() - keep..], n);
            }
            let v = self.complete(json!({"model": self.model, "prompt": prompt, "max_tokens": 1, "echo": true,
                                         "logprobs": 1, "temperature": 0, "seed": 0}))?;
            let from = ctx.chars().count();
            let (ll, greedy, n) = span_logprobs(&v, from, prompt.chars().count())?;
            if n == 0 {
                bail!("no token of the continuation {cont:?} came back");
            }
            Ok((ll, greedy))
        })
    }

    fn loglikelihood_rolling(&mut self, texts: &[String]) -> BackendResult<Vec<f64>> {
        self.no_chat()?;
        let prefix = self.prefix_token();
        let max_seq = self.scoring_context(prefix)?;
        self.map(texts, |text| {
            let ids = self.tokenize(text).context("rolling log-likelihoods need the server's /tokenize endpoint")?;
            // lm-eval's windows after the prefix token; without one, the first token is
            // context only.
            let full: Vec<u64> = prefix.into_iter().chain(ids).collect();
            let mut total = 0.0;
            for (s, e, n) in crate::backend::rolling_windows(full.len().saturating_sub(1), max_seq) {
                total += self.tail_logprobs(&full[s..e], n)?.0;
            }
            Ok(total)
        })
    }

    fn generate(&mut self, reqs: &[(String, GenerationKwargs)]) -> BackendResult<Vec<String>> {
        // With /tokenize and the context length: the context cut from the left to leave room
        // for the tokens to generate, as in-process (and lm-eval) do; without, the text as is.
        let max = if self.chat { None } else { self.max_len().ok().filter(|_| self.tokenize("a").is_ok()) };
        self.map(reqs, |(ctx, kw)| {
            if self.chat {
                let msg = [json!({"role": "user", "content": ctx})];
                return self.chat_with(&msg, kw.max_gen_toks.unwrap_or(256), kw.temperature.unwrap_or(0.0), kw);
            }
            let mut max_tokens = kw.max_gen_toks.unwrap_or(256);
            let prompt = match max {
                Some(max) => {
                    max_tokens = max_tokens.min(max - 1);
                    let ids = self.tokenize(ctx)?;
                    let keep = (max - max_tokens).min(ids.len()).max(1);
                    if ids.is_empty() {
                        json!(ctx)
                    } else {
                        json!(ids[ids.len() - keep..])
                    }
                }
                None => json!(ctx),
            };
            let mut body = json!({"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                                  "temperature": kw.temperature.unwrap_or(0.0), "seed": 0});
            if !kw.until.is_empty() {
                body["stop"] = json!(kw.until);
            }
            kw.constrain(&mut body);
            let v = self.complete(body)?;
            v["choices"][0]["text"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("the response has no choices[0].text"))
        })
    }
}

/// The default cache file of an eval run.
pub fn default_cache(out: &Path) -> PathBuf {
    out.join("endpoint_cache.jsonl")
}
