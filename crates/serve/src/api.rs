//! The HTTP API (axum): OpenAI's `/v1/completions`, `/v1/chat/completions` (both streaming as
//! Server-Sent Events) and `/v1/models`, vLLM's `/tokenize` and `/detokenize`, `/health`,
//! `/ready` and `/metrics`.
//!
//! Handlers validate and tokenize, submit one engine request per choice, and turn the engine's
//! events into OpenAI's response or chunk objects. Dropping a response (the client went away)
//! drops the engine receivers, which cancels the sequences at the next step.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, SelectAll, StreamExt};
use lmstack_core::chat::ChatTemplate;
use lmstack_core::{SamplingParams, StopConditions, Tokenizer};
use serde_json::{json, Map, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{EngineHandle, Event, Request, SubmitError, TokenLogprob};
use crate::metrics::Metrics;
use crate::openai::{self, ApiError, ChatRequest, CompletionRequest, Prompt, Sampling};

/// The loaded model: available once loading finished (`/ready`).
pub struct Ready {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template (the model's, `--chat-template`, or a plain fallback).
    pub template: ChatTemplate,
    /// The engine.
    pub engine: EngineHandle,
    /// The model's vocabulary size (token ids must be below it).
    pub vocab_size: usize,
}

/// Server-wide settings and state shared by every handler.
pub struct AppState {
    /// The name clients use in `model`.
    pub model_name: String,
    /// Set when the model is loaded.
    pub ready: OnceLock<Ready>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Per-request deadline.
    pub request_timeout: Option<Duration>,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Allowed CORS origins (`*` for any); empty = no CORS headers.
    pub cors_origins: Vec<String>,
    created: u64,
    next_id: AtomicU64,
}

impl AppState {
    /// State for a server of `model_name`; set [`AppState::ready`] once the model is loaded.
    pub fn new(model_name: String, metrics: Arc<Metrics>) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self {
            model_name,
            ready: OnceLock::new(),
            metrics,
            api_key: None,
            request_timeout: None,
            max_body_bytes: 4 << 20,
            cors_origins: Vec::new(),
            created,
            next_id: AtomicU64::new(rand::random::<u32>() as u64),
        }
    }

    fn loaded(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| {
            let mut e = ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the model is still loading; retry shortly");
            e.retry_after = Some(1);
            e
        })
    }

    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model_name => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("the model `{m}` does not exist; this server serves `{}`", self.model_name),
                param: Some("model".into()),
                code: Some("model_not_found"),
                retry_after: None,
            }),
            _ => Ok(()),
        }
    }

    fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:016x}", self.next_id.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

/// The web playground: one self-contained page (HTML, CSS and JavaScript, no external assets)
/// that talks to this server's own API.
async fn playground() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-cache"), (header::CONTENT_SECURITY_POLICY, PLAYGROUND_CSP)],
        axum::response::Html(include_str!("playground.html")),
    )
}

/// The playground loads nothing from elsewhere and talks only to this server.
const PLAYGROUND_CSP: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:";

/// The application router with all middleware.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    let mut app = Router::new()
        .route("/", get(playground))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(limit));
    if !state.cors_origins.is_empty() {
        use tower_http::cors::{AllowOrigin, Any, CorsLayer};
        let cors = CorsLayer::new().allow_methods([Method::GET, Method::POST]).allow_headers(Any);
        let cors = if state.cors_origins.iter().any(|o| o == "*") {
            cors.allow_origin(Any)
        } else {
            let origins: Vec<HeaderValue> = state.cors_origins.iter().filter_map(|o| o.parse().ok()).collect();
            cors.allow_origin(AllowOrigin::list(origins))
        };
        app = app.layer(cors);
    }
    app.with_state(state)
}

/// Paths open without the API key.
const OPEN_PATHS: [&str; 3] = ["/health", "/ready", "/metrics"];

async fn authenticate(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let path = req.uri().path();
        if req.method() != Method::OPTIONS && !OPEN_PATHS.contains(&path) && path != "/" {
            let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if given.and_then(|g| g.strip_prefix("Bearer ")) != Some(key.as_str()) {
                let msg = if given.is_none() {
                    "missing API key: send `Authorization: Bearer <key>`"
                } else {
                    "incorrect API key"
                };
                return ApiError::status(StatusCode::UNAUTHORIZED, msg).code("invalid_api_key").into_response();
            }
        }
    }
    next.run(req).await
}

/// Request ids, access log and the requests counter.
async fn track(State(state): State<Arc<AppState>>, mut req: HttpRequest, next: Next) -> Response {
    let endpoint = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| state.new_id("req"));
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let t0 = Instant::now();
    let mut resp = next.run(req).await;
    let status = resp.status();
    tracing::info!(request_id = %id, %method, %endpoint, status = status.as_u16(), ms = t0.elapsed().as_millis() as u64);
    state.metrics.requests.with_label_values(&[endpoint.as_str(), status.as_str()]).inc();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

#[derive(Clone)]
struct RequestId(String);

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::status(StatusCode::NOT_FOUND, format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::status(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}", uri.path()))
}

async fn ready(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    state.loaded().map(|_| "ready")
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let r = state.loaded()?;
    Ok(Json(json!({"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": state.created, "owned_by": "lmstack",
        "root": state.model_name, "max_model_len": r.engine.max_len(),
    }]})))
}

fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::status(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than {limit} bytes"))
        } else {
            ApiError::status(e.status(), format!("could not read the request body: {e}"))
        }
    })
}

async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(body, state.max_body_bytes)?;
    let req: openai::TokenizeRequest = openai::parse(&body, &openai::TOKENIZE_FIELDS)?;
    state.check_model(req.model.as_deref())?;
    let r = state.loaded()?;
    let ids = match (req.prompt, req.messages) {
        (Some(p), None) => encode(&r.tokenizer, &p, req.add_special_tokens.unwrap_or(true), "prompt")?,
        (None, Some(m)) => {
            let text = render_chat(r, &m, req.add_generation_prompt.unwrap_or(true), &Map::new())?;
            encode(&r.tokenizer, &text, false, "messages")?
        }
        _ => return Err(ApiError::invalid("prompt", "give exactly one of `prompt` and `messages`")),
    };
    Ok(Json(json!({"count": ids.len(), "max_model_len": r.engine.max_len(), "tokens": ids})))
}

async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(body, state.max_body_bytes)?;
    let req: openai::DetokenizeRequest = openai::parse(&body, &openai::DETOKENIZE_FIELDS)?;
    state.check_model(req.model.as_deref())?;
    let r = state.loaded()?;
    check_ids(&req.tokens, r.vocab_size, "tokens")?;
    let text = r.tokenizer.decode(&req.tokens, false).map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(json!({"prompt": text})))
}

fn encode(tok: &Tokenizer, text: &str, special: bool, field: &str) -> Result<Vec<u32>, ApiError> {
    tok.encode(text, special).map_err(|e| ApiError::invalid(field, format!("could not tokenize: {e}")))
}

fn check_ids(ids: &[u32], vocab: usize, field: &str) -> Result<(), ApiError> {
    match ids.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(ApiError::invalid(
            format!("{field}[{i}]"),
            format!("token id {} is outside the vocabulary of {vocab}", ids[i]),
        )),
        None => Ok(()),
    }
}

/// Renders chat messages; `content` given as a list of text parts is joined first.
fn render_chat(
    r: &Ready,
    messages: &[Value],
    add_generation_prompt: bool,
    extra: &Map<String, Value>,
) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "at least one message is required"));
    }
    let mut norm = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(ApiError::invalid(format!("messages[{i}]"), "each message must be an object"));
        };
        let role = match obj.get("role") {
            Some(Value::String(role)) => role.as_str(),
            _ => return Err(ApiError::invalid(format!("messages[{i}].role"), "a message needs a string `role`")),
        };
        let mut obj = obj.clone();
        match obj.get("content") {
            Some(Value::String(_)) => {}
            // OpenAI allows an assistant message without content (it carried tool calls); a
            // template reading `content` then sees empty text rather than failing on undefined.
            None | Some(Value::Null) if role == "assistant" => {
                obj.insert("content".into(), Value::String(String::new()));
            }
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    format!("a `{role}` message needs `content`"),
                ))
            }
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                "only {\"type\": \"text\", \"text\": …} content parts are supported",
                            ))
                        }
                    }
                }
                obj.insert("content".into(), Value::String(text));
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    "content must be a string or a list of text parts",
                ))
            }
        }
        norm.push(Value::Object(obj));
    }
    r.template
        .render(&Value::Array(norm), add_generation_prompt, r.tokenizer.special_tokens(), extra)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// Engine requests and response metadata common to both endpoints.
struct Plan {
    base: Request,
    n: usize,
    stream: bool,
    include_usage: bool,
}

/// OpenAI's `logit_bias`: token ids (as the map's keys) below `vocab` to biases (their range is
/// checked with the other sampling parameters).
fn logit_bias(map: &serde_json::Map<String, Value>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    map.iter()
        .map(|(k, v)| {
            let token = k.trim().parse::<u32>().ok().filter(|&t| (t as usize) < vocab).ok_or_else(|| {
                ApiError::invalid("logit_bias", format!("logit_bias: key {k:?} is not a token id below {vocab}"))
            })?;
            let bias = v.as_f64().filter(|b| b.is_finite()).ok_or_else(|| {
                ApiError::invalid("logit_bias", format!("logit_bias: the bias of token {token} is not a number: {v}"))
            })?;
            Ok((token, bias as f32))
        })
        .collect()
}

fn plan(
    state: &AppState,
    r: &Ready,
    s: &Sampling,
    max_tokens: usize,
    logprobs: Option<usize>,
) -> Result<Plan, ApiError> {
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid("top_k", format!("{k} must be positive, or -1/0 for off"))),
    };
    let params = SamplingParams {
        temperature: s.temperature.unwrap_or(1.0),
        top_k,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        seed: s.seed,
        logit_bias: s.logit_bias.as_ref().map(|b| logit_bias(b, r.vocab_size)).transpose()?.unwrap_or_default(),
    };
    params.validate().map_err(|e| match e {
        lmstack_core::Error::InvalidArgument { name, message } => ApiError::invalid(name, format!("{name}: {message}")),
        other => ApiError::invalid("body", other.to_string()),
    })?;
    let n = s.n.unwrap_or(1) as usize;
    if !(1..=64).contains(&n) {
        return Err(ApiError::invalid("n", format!("{n} is outside 1..=64")));
    }
    if logprobs.is_some_and(|l| l > 20) {
        return Err(ApiError::invalid("logprobs", "at most 20 alternatives per token"));
    }
    let stop = s.stop.clone().map(openai::Stop::into_vec).transpose()?.unwrap_or_default();
    let min_tokens = s.min_tokens.unwrap_or(0) as usize;
    if min_tokens > max_tokens {
        return Err(ApiError::invalid("min_tokens", format!("{min_tokens} is more than max_tokens = {max_tokens}")));
    }
    let base = Request {
        id: String::new(),
        prompt: Vec::new(),
        params,
        stop: StopConditions {
            max_tokens,
            stop,
            include_stop_str: s.include_stop_str_in_output,
            min_tokens,
            stop_token_ids: s.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: s.ignore_eos,
        },
        logprobs,
        prompt_logprobs: None,
        skip_special_tokens: s.skip_special_tokens.unwrap_or(true),
        deadline: state.request_timeout.map(|t| Instant::now() + t),
    };
    let opts = s.stream_options.clone().unwrap_or_default();
    if s.stream_options.is_some() && !s.stream {
        return Err(ApiError::invalid("stream_options", "stream_options needs stream: true"));
    }
    Ok(Plan { base, n, stream: s.stream, include_usage: opts.include_usage })
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull(_) => {
            let mut err = ApiError::status(StatusCode::TOO_MANY_REQUESTS, e.to_string()).code("queue_full");
            err.retry_after = Some(1);
            err
        }
        SubmitError::TooLong(m) => ApiError::invalid("max_tokens", m).code("context_length_exceeded"),
        SubmitError::Stopped => ApiError::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// One choice's engine stream, tagged with its index.
type Choices = SelectAll<stream::BoxStream<'static, (usize, Event)>>;

/// Submits one engine request per (prompt, choice): index = prompt × n + choice.
fn submit_all(r: &Ready, plan: &Plan, prompts: &[Vec<u32>], req_id: &str) -> Result<Choices, ApiError> {
    let mut all = SelectAll::new();
    for (pi, p) in prompts.iter().enumerate() {
        for j in 0..plan.n {
            let mut req = plan.base.clone();
            req.id = format!("{req_id}/{}", pi * plan.n + j);
            req.prompt = p.clone();
            req.params.seed = req.params.seed.map(|s| s.wrapping_add(j as u64));
            let rx = r.engine.submit(req).map_err(submit_error)?;
            let idx = pi * plan.n + j;
            all.push(UnboundedReceiverStream::new(rx).map(move |e| (idx, e)).boxed());
        }
    }
    Ok(all)
}

fn failed(timeout: bool, message: String) -> ApiError {
    let status = if timeout { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::INTERNAL_SERVER_ERROR };
    ApiError::status(status, message)
}

/// Token counts of one response, as OpenAI and vLLM count them: each prompt once however many
/// choices it has (`n` per prompt), every choice's completion, and of a prompt's tokens those
/// whose keys and values came from the prefix cache (the fewest any of its choices had).
struct Counts {
    prompt: usize,
    n: usize,
    /// Per prompt, the fewest cached tokens of its choices finished so far (`None`: none yet).
    cached: Vec<Option<usize>>,
    completion: usize,
}

impl Counts {
    fn new(prompts: &[Vec<u32>], n: usize) -> Self {
        Self { prompt: prompts.iter().map(Vec::len).sum(), n, cached: vec![None; prompts.len()], completion: 0 }
    }

    /// Choice `i` finished.
    fn add(&mut self, i: usize, cached: usize, completion: usize) {
        let c = &mut self.cached[i / self.n];
        *c = Some(c.map_or(cached, |c| c.min(cached)));
        self.completion += completion;
    }

    /// OpenAI's `usage` object.
    fn usage(&self) -> Value {
        let cached: usize = self.cached.iter().flatten().sum();
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion,
               "total_tokens": self.prompt + self.completion, "prompt_tokens_details": {"cached_tokens": cached}})
    }
}

/// Accumulates one choice of a non-streamed response.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    prompt_lps: Vec<Option<TokenLogprob>>,
    lps: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    cached_tokens: usize,
    completion_tokens: usize,
}

async fn collect(mut choices: Choices, count: usize) -> Result<Vec<ChoiceAcc>, ApiError> {
    let mut acc: Vec<ChoiceAcc> = (0..count).map(|_| ChoiceAcc::default()).collect();
    while let Some((i, ev)) = choices.next().await {
        let a = &mut acc[i];
        match ev {
            Event::Prompt(p) => a.prompt_lps = p,
            Event::Token { text, logprob } => {
                a.text.push_str(&text);
                a.lps.extend(logprob);
            }
            Event::Finished { text, reason, cached_tokens, completion_tokens, .. } => {
                a.text.push_str(&text);
                a.finish = Some(reason.as_str());
                a.cached_tokens = cached_tokens;
                a.completion_tokens = completion_tokens;
            }
            Event::Failed { timeout, message } => return Err(failed(timeout, message)),
        }
    }
    if acc.iter().any(|a| a.finish.is_none()) {
        return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the engine stopped before finishing"));
    }
    Ok(acc)
}

/// OpenAI's legacy completion `logprobs` object for `tokens`, offsets starting at `offset`.
fn completion_logprobs(tokens: &[Option<&TokenLogprob>], fallback: &[String], offset: usize) -> Value {
    let mut toks = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offs = Vec::new();
    let mut off = offset;
    for (i, t) in tokens.iter().enumerate() {
        let text = t.map_or_else(|| fallback.get(i).cloned().unwrap_or_default(), |t| t.text.clone());
        offs.push(off);
        off += text.chars().count();
        toks.push(Value::String(text));
        match t {
            Some(t) => {
                lps.push(json!(t.logprob));
                let mut m = Map::new();
                for (_, s, l) in &t.top {
                    m.entry(s.clone()).or_insert(json!(l));
                }
                tops.push(Value::Object(m));
            }
            None => {
                lps.push(Value::Null);
                tops.push(Value::Null);
            }
        }
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |text: &str, lp: f32| json!({"token": text, "logprob": lp, "bytes": text.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.text, t.logprob);
            e["top_logprobs"] = Value::Array(t.top.iter().map(|(_, s, l)| entry(s, *l)).collect());
            e
        })
        .collect();
    json!({"content": content})
}

async fn completions(
    State(state): State<Arc<AppState>>,
    axum::Extension(RequestId(req_id)): axum::Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, state.max_body_bytes)?;
    let v = openai::parse_object(&body, &openai::completion_fields())?;
    let req = CompletionRequest { sampling: openai::from_value(&v)?, ..openai::from_value(&v)? };
    state.check_model(req.sampling.model.as_deref())?;
    let r = state.loaded()?;
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "suffix (insertion) is not supported"));
    }
    if req.best_of.is_some_and(|b| b != req.sampling.n.unwrap_or(1)) {
        return Err(ApiError::invalid("best_of", "best_of is supported only equal to n"));
    }
    let special = req.add_special_tokens.unwrap_or(true);
    let (texts, prompts): (Vec<Option<String>>, Vec<Vec<u32>>) = match req.prompt {
        Prompt::Text(t) => (vec![Some(t.clone())], vec![encode(&r.tokenizer, &t, special, "prompt")?]),
        Prompt::Texts(ts) => {
            let ids = ts.iter().map(|t| encode(&r.tokenizer, t, special, "prompt")).collect::<Result<_, _>>()?;
            (ts.into_iter().map(Some).collect(), ids)
        }
        Prompt::Ids(ids) => (vec![None], vec![ids]),
        Prompt::IdLists(l) => (vec![None; l.len()], l),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "the list of prompts is empty"));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ApiError::invalid("prompt", format!("prompt {i} is empty (no tokens)")));
        }
        check_ids(p, r.vocab_size, "prompt")?;
    }
    let logprobs = req.logprobs.map(|l| l as usize);
    let mut plan = plan(&state, r, &req.sampling, req.max_tokens.unwrap_or(16) as usize, logprobs)?;
    if req.echo && logprobs.is_some() {
        plan.base.prompt_logprobs = logprobs;
    }
    let choices = submit_all(r, &plan, &prompts, &req_id)?;
    let id = state.new_id("cmpl");
    let n = plan.n;
    let mut counts = Counts::new(&prompts, n);
    // Echoed prompt text per prompt.
    let echo: Vec<Option<String>> = if req.echo {
        texts
            .into_iter()
            .zip(&prompts)
            .map(|(t, ids)| Some(t.unwrap_or_else(|| r.tokenizer.decode(ids, false).unwrap_or_default())))
            .collect()
    } else {
        vec![None; prompts.len()]
    };
    if !plan.stream {
        let head = json!({"id": id, "object": "text_completion", "created": now(), "model": state.model_name});
        let acc = collect(choices, prompts.len() * n).await?;
        let out: Vec<Value> = acc
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                counts.add(i, a.cached_tokens, a.completion_tokens);
                let prefix = echo[i / n].clone().unwrap_or_default();
                let lp = logprobs.map(|_| {
                    let mut toks: Vec<Option<&TokenLogprob>> = Vec::new();
                    let mut fallback = Vec::new();
                    if req.echo {
                        toks.extend(a.prompt_lps.iter().map(Option::as_ref));
                        fallback = prompt_pieces(&r.tokenizer, &prompts[i / n]);
                    }
                    toks.extend(a.lps.iter().map(Some));
                    completion_logprobs(&toks, &fallback, 0)
                });
                json!({"index": i, "text": prefix + &a.text, "logprobs": lp, "finish_reason": a.finish})
            })
            .collect();
        let mut body = head;
        body["choices"] = Value::Array(out);
        body["usage"] = counts.usage();
        return Ok(Json(body).into_response());
    }
    let tokenizer = r.tokenizer.clone();
    let prompts_c = prompts.clone();
    let include_usage = plan.include_usage;
    let with_logprobs = logprobs.is_some();
    let echo_flag = req.echo;
    let head = ChunkHead::new(&id, "text_completion", &state.model_name);
    Ok(sse(move |tx| async move {
        let mut choices = choices;
        let mut offsets = vec![0usize; prompts_c.len() * n];
        let chunk = |index: usize, text: String, lp: Value, finish: Option<&str>| {
            head.chunk(&TextChoice { index, text: &text, logprobs: &lp, finish_reason: finish })
        };
        // Without echoed log-probabilities, the prompt text goes out first.
        if echo_flag && !with_logprobs {
            for i in 0..prompts_c.len() * n {
                let t = echo[i / n].clone().unwrap_or_default();
                offsets[i] += t.chars().count();
                if !send(&tx, chunk(i, t, Value::Null, None)).await {
                    return;
                }
            }
        }
        while let Some((i, ev)) = choices.next().await {
            let msg = match ev {
                Event::Prompt(p) => {
                    let toks: Vec<Option<&TokenLogprob>> = p.iter().map(Option::as_ref).collect();
                    let lp = completion_logprobs(&toks, &prompt_pieces(&tokenizer, &prompts_c[i / n]), 0);
                    let t = echo[i / n].clone().unwrap_or_default();
                    offsets[i] += t.chars().count();
                    chunk(i, t, lp, None)
                }
                Event::Token { text, logprob } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let lp = logprob.as_ref().map_or(Value::Null, |l| completion_logprobs(&[Some(l)], &[], offsets[i]));
                    offsets[i] += text.chars().count();
                    chunk(i, text, lp, None)
                }
                Event::Finished { text, reason, cached_tokens, completion_tokens, .. } => {
                    counts.add(i, cached_tokens, completion_tokens);
                    chunk(i, text, Value::Null, Some(reason.as_str()))
                }
                Event::Failed { timeout, message } => {
                    let _ = send(&tx, failed(timeout, message).body().to_string()).await;
                    break;
                }
            };
            if !send(&tx, msg).await {
                return;
            }
        }
        finish_stream(&tx, include_usage, &head, &counts).await;
    }))
}

/// Each prompt token's own text (for echoed `logprobs.tokens`).
fn prompt_pieces(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&t| crate::engine::piece(tok, t)).collect()
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    axum::Extension(RequestId(req_id)): axum::Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, state.max_body_bytes)?;
    let v = openai::parse_object(&body, &openai::chat_fields())?;
    let req = ChatRequest { sampling: openai::from_value(&v)?, ..openai::from_value(&v)? };
    state.check_model(req.sampling.model.as_deref())?;
    let r = state.loaded()?;
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::invalid("tools", "tool calling is not supported"));
    }
    if req.tool_choice.as_ref().is_some_and(|t| !t.is_null() && t != "none") {
        return Err(ApiError::invalid("tool_choice", "tool calling is not supported"));
    }
    if let Some(f) = &req.response_format {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid("response_format", "only {\"type\": \"text\"} is supported"));
        }
    }
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs needs logprobs: true"));
    }
    let extra = req.chat_template_kwargs.clone().unwrap_or_default();
    let text = render_chat(r, &req.messages, req.add_generation_prompt.unwrap_or(true), &extra)?;
    let ids = encode(&r.tokenizer, &text, false, "messages")?;
    if ids.is_empty() {
        return Err(ApiError::invalid("messages", "the rendered conversation has no tokens"));
    }
    let max_len = r.engine.max_len();
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(m) => m as usize,
        None if ids.len() < max_len => max_len - ids.len(),
        None => {
            return Err(ApiError::invalid(
                "messages",
                format!("the conversation is {} tokens; this model's context is {max_len}", ids.len()),
            )
            .code("context_length_exceeded"))
        }
    };
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0) as usize);
    let plan = plan(&state, r, &req.sampling, max_tokens, logprobs)?;
    let n = plan.n;
    let choices = submit_all(r, &plan, std::slice::from_ref(&ids), &req_id)?;
    let mut counts = Counts::new(std::slice::from_ref(&ids), n);
    let id = state.new_id("chatcmpl");
    if !plan.stream {
        let acc = collect(choices, n).await?;
        for (i, a) in acc.iter().enumerate() {
            counts.add(i, a.cached_tokens, a.completion_tokens);
        }
        let out: Vec<Value> = acc
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                json!({"index": i, "message": {"role": "assistant", "content": a.text},
                       "logprobs": logprobs.map(|_| chat_logprobs(&a.lps)), "finish_reason": a.finish})
            })
            .collect();
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": now(), "model": state.model_name,
            "choices": out, "usage": counts.usage(),
        }))
        .into_response());
    }
    let head = ChunkHead::new(&id, "chat.completion.chunk", &state.model_name);
    let include_usage = plan.include_usage;
    Ok(sse(move |tx| async move {
        let mut choices = choices;
        let chunk = |index: usize, delta: Delta<'_>, lp: Value, finish: Option<&str>| {
            head.chunk(&ChatChoice { index, delta, logprobs: &lp, finish_reason: finish })
        };
        for i in 0..n {
            let first = Delta { role: Some("assistant"), content: Some("") };
            if !send(&tx, chunk(i, first, Value::Null, None)).await {
                return;
            }
        }
        while let Some((i, ev)) = choices.next().await {
            let msg = match ev {
                Event::Prompt(_) => continue,
                Event::Token { text, logprob } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let lp = logprob.map_or(Value::Null, |l| chat_logprobs(std::slice::from_ref(&l)));
                    chunk(i, Delta::content(&text), lp, None)
                }
                Event::Finished { text, reason, cached_tokens, completion_tokens, .. } => {
                    counts.add(i, cached_tokens, completion_tokens);
                    if !text.is_empty() && !send(&tx, chunk(i, Delta::content(&text), Value::Null, None)).await {
                        return;
                    }
                    chunk(i, Delta { role: None, content: None }, Value::Null, Some(reason.as_str()))
                }
                Event::Failed { timeout, message } => {
                    let _ = send(&tx, failed(timeout, message).body().to_string()).await;
                    break;
                }
            };
            if !send(&tx, msg).await {
                return;
            }
        }
        finish_stream(&tx, include_usage, &head, &counts).await;
    }))
}

/// The last chunk of a stream: usage, when the client asked for it.
async fn finish_stream(tx: &SseTx, include_usage: bool, head: &ChunkHead, counts: &Counts) {
    if include_usage {
        let _ = send(tx, format!("{}[],\"usage\":{}}}", head.prefix, counts.usage())).await;
    }
}

/// What every chunk of one streamed response starts with, serialized once:
/// `{"id":…,"object":…,"created":…,"model":…,"choices":` (a chunk is written per token, so
/// it is assembled as text rather than through a `Value` tree).
struct ChunkHead {
    prefix: String,
}

impl ChunkHead {
    fn new(id: &str, object: &str, model: &str) -> Self {
        let head = json!({"id": id, "object": object, "created": now(), "model": model}).to_string();
        Self { prefix: format!("{},\"choices\":", &head[..head.len() - 1]) }
    }

    /// The chunk carrying one choice.
    fn chunk(&self, choice: &impl serde::Serialize) -> String {
        let mut out = Vec::with_capacity(self.prefix.len() + 128);
        out.extend_from_slice(self.prefix.as_bytes());
        out.push(b'[');
        serde_json::to_writer(&mut out, choice).expect("a choice serializes");
        out.extend_from_slice(b"]}");
        String::from_utf8(out).expect("JSON is UTF-8")
    }
}

/// One choice of a `text_completion` chunk.
#[derive(serde::Serialize)]
struct TextChoice<'a> {
    index: usize,
    text: &'a str,
    logprobs: &'a Value,
    finish_reason: Option<&'a str>,
}

/// One choice of a `chat.completion.chunk`.
#[derive(serde::Serialize)]
struct ChatChoice<'a> {
    index: usize,
    delta: Delta<'a>,
    logprobs: &'a Value,
    finish_reason: Option<&'a str>,
}

/// A chat chunk's `delta`: the role in a choice's first chunk, then content.
#[derive(serde::Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

impl<'a> Delta<'a> {
    fn content(text: &'a str) -> Self {
        Self { role: None, content: Some(text) }
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

type SseTx = tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>;

/// Sends one `data:` JSON chunk; false once the client is gone.
async fn send(tx: &SseTx, chunk: String) -> bool {
    tx.send(Ok(SseEvent::default().data(chunk))).await.is_ok()
}

/// An SSE response fed by `produce`, ending in `data: [DONE]`. When the client disconnects the
/// producer is dropped at once, which drops its engine receivers and so cancels the sequences.
fn sse<F, Fut>(produce: F) -> Response
where
    F: FnOnce(SseTx) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let events = Produced { producer: Some(Box::pin(produce(tx))), rx, done: false };
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// The events of an SSE response and the future that produces them, both polled by the
/// response body, so a token costs no wake-up of a task of its own: the producer runs whenever
/// the connection asks for the next event and none is queued.
struct Produced<Fut> {
    producer: Option<std::pin::Pin<Box<Fut>>>,
    rx: tokio::sync::mpsc::Receiver<Result<SseEvent, Infallible>>,
    done: bool,
}

impl<Fut: std::future::Future<Output = ()>> futures_util::Stream for Produced<Fut> {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(Some(ev)) = this.rx.poll_recv(cx) {
                return Poll::Ready(Some(ev));
            }
            let Some(producer) = this.producer.as_mut() else {
                // The producer (the only sender) is gone and its events are all out.
                if this.done {
                    return Poll::Ready(None);
                }
                this.done = true;
                return Poll::Ready(Some(Ok(SseEvent::default().data("[DONE]"))));
            };
            match producer.as_mut().poll(cx) {
                Poll::Ready(()) => this.producer = None,
                // It may have queued events before waiting.
                Poll::Pending => {
                    return match this.rx.poll_recv(cx) {
                        Poll::Ready(Some(ev)) => Poll::Ready(Some(ev)),
                        _ => Poll::Pending,
                    }
                }
            }
        }
    }
}
