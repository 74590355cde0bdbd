//! The HTTP API (axum): OpenAI's `/v1/completions`, `/v1/chat/completions` (both streaming as
//! Server-Sent Events) and `/v1/models`, vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info`, `/health`,
//! `/ready` and `/metrics`.
//!
//! Handlers validate and tokenize (`validate`: a body becomes a validated request or an error
//! naming the field), submit one engine request per choice and read the engine's events as
//! updates (`choices`, shared by streaming and non-streaming answers), and turn them into
//! OpenAI's response or chunk objects (`completions`, `chat`; streams through `sse`). This file
//! is the router, its middleware and the small endpoints. Dropping a response (the client went
//! away) drops the engine receivers, which cancels the sequences at the next step.

mod chat;
mod choices;
mod completions;
mod sse;
mod validate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lmstack_core::chat::ChatTemplate;
use lmstack_core::Tokenizer;
use serde_json::{json, Map, Value};

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::openai::{self, ApiError};
use chat::chat_completions;
use completions::completions;
use validate::{check_ids, encode, render_chat};

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
    /// Compiles output constraints for the vocabulary; made by the first request that asks
    /// for one (its token trie takes a moment for a large vocabulary).
    pub constrainer: OnceLock<Result<lmstack_core::Constrainer, String>>,
}

impl Ready {
    /// The constrainer; a request asking for a constraint through `field` is refused (naming
    /// it) when the vocabulary cannot be read for one.
    fn constrainer(&self, field: &'static str) -> Result<&lmstack_core::Constrainer, ApiError> {
        self.constrainer
            .get_or_init(|| lmstack_core::Constrainer::new(&self.tokenizer, self.vocab_size).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| ApiError::invalid(field, format!("this model's vocabulary cannot be constrained: {e}")))
    }
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
    /// Refuse unknown request fields with a 400 instead of ignoring them with a warning.
    pub strict_fields: bool,
    /// Longest time to receive a request's whole body.
    pub body_timeout: Duration,
    /// Set when the shutdown grace period is over: requests still running end at once (a
    /// stream with an error event and `[DONE]`, a whole response with a 503).
    pub cut: tokio::sync::watch::Sender<bool>,
    /// Requests ended that way.
    pub requests_cut: AtomicU64,
    /// Bodies parsed, rendered and tokenized at once (`validate::off_runtime`): as many as
    /// there are cores. More would not go faster, and each thread keeps the tokenizer's
    /// working memory (regex caches, a piece's encoding: ~7 MB) as its own.
    validating: tokio::sync::Semaphore,
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
            strict_fields: false,
            body_timeout: Duration::from_secs(30),
            cut: tokio::sync::watch::Sender::new(false),
            requests_cut: AtomicU64::new(0),
            validating: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
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

    /// The error a request cut off by the end of the grace period gets.
    pub(crate) fn cut_error() -> ApiError {
        ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server shut down before the request finished (its shutdown grace period ran out)",
        )
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
        axum::response::Html(include_str!("../playground.html")),
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
        .route("/v1/models/{id}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn(require_json))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), refuse_oversized))
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
            // The scheme name is case-insensitive (RFC 6750, RFC 9110 §11.1).
            let token = given.and_then(|g| {
                let (scheme, token) = g.trim_start().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
            if token != Some(key.as_str()) {
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

/// A body declared longer than the limit is refused at once with 413 (and the connection
/// closed), without waiting for bytes that would be thrown away.
async fn refuse_oversized(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > state.max_body_bytes as u64) {
        let msg = format!("the request body is {n} bytes, larger than {} bytes", state.max_body_bytes);
        let mut resp = ApiError::status(StatusCode::PAYLOAD_TOO_LARGE, msg).into_response();
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    next.run(req).await
}

/// Reads a request's whole body within `body_timeout` (a client trickling its body cannot
/// hold a connection and a task: 408 when it runs out) and the size limit (413), before any
/// handler runs.
async fn read_body(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let limit = state.max_body_bytes;
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let bytes = match tokio::time::timeout(state.body_timeout, collect_body(body, declared, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let mut resp = e.into_response();
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        Err(_) => {
            let msg = format!("the request body did not arrive within {:.0} s", state.body_timeout.as_secs_f64());
            let mut resp = ApiError::status(StatusCode::REQUEST_TIMEOUT, msg).into_response();
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    next.run(HttpRequest::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Reads a body of at most `limit` bytes into one buffer sized from its declared length, each
/// frame copied in and released as it comes: a body is held once, not as hyper's frames plus
/// their joined copy (`to_bytes`), which for 4 MiB prompts doubled the memory of each.
async fn collect_body(mut body: axum::body::Body, declared: Option<usize>, limit: usize) -> Result<Bytes, ApiError> {
    use hyper::body::Body as _;
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(frame) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame
            .map_err(|e| ApiError::status(StatusCode::BAD_REQUEST, format!("could not read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ApiError::status(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {limit} bytes"),
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

/// The JSON endpoints (every POST route) take only JSON: a body declared as anything else
/// (`text/plain`, a form, nothing) is refused with 415 before it is read. A web page may post
/// `text/plain` to any server without a CORS preflight; requiring JSON makes the browser ask
/// first, so a page cannot drive a local server that has no API key.
async fn require_json(req: HttpRequest, next: Next) -> Response {
    if req.method() == Method::POST && req.extensions().get::<MatchedPath>().is_some() {
        let declared = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = declared.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let json = essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !json {
            let got = if declared.is_empty() { "no Content-Type".to_owned() } else { format!("`{declared}`") };
            return ApiError::status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("send the body as JSON with `Content-Type: application/json` (got {got})"),
            )
            .code("unsupported_media_type")
            .into_response();
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
    // An unmatched route is logged with its path (the metric's label stays `unmatched`, so
    // probing clients cannot grow the label set); a path longer than 200 bytes is cut.
    let path = (endpoint == "unmatched").then(|| {
        let p = req.uri().path();
        let cut = (0..=p.len().min(200)).rev().find(|&i| p.is_char_boundary(i)).unwrap_or(0);
        p[..cut].to_owned()
    });
    let t0 = Instant::now();
    let mut resp = next.run(req).await;
    let status = resp.status();
    let ms = t0.elapsed().as_millis() as u64;
    match path {
        Some(path) => tracing::info!(request_id = %id, %method, %endpoint, %path, status = status.as_u16(), ms),
        None => tracing::info!(request_id = %id, %method, %endpoint, status = status.as_u16(), ms),
    }
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

/// The served model as OpenAI's model object.
fn model_object(state: &AppState, r: &Ready) -> Value {
    json!({"id": state.model_name, "object": "model", "created": state.created, "owned_by": "lmstack",
           "root": state.model_name, "max_model_len": r.engine.max_len()})
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let r = state.loaded()?;
    Ok(Json(json!({"object": "list", "data": [model_object(&state, r)]})))
}

/// `GET /v1/models/{id}`: the served model, or 404 `model_not_found`.
async fn model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.check_model(Some(&id))?;
    Ok(Json(model_object(&state, state.loaded()?)))
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
    Ok(Json(validate::off_runtime(&state, body, tokenize_body).await?))
}

/// `/tokenize`'s answer to `body` (tokenizing runs off the runtime's workers).
fn tokenize_body(state: &AppState, body: &[u8]) -> Result<Value, ApiError> {
    let req: openai::TokenizeRequest = openai::parse(body, &openai::TOKENIZE_FIELDS, state.strict_fields)?;
    state.check_model(req.model.as_deref())?;
    let r = state.loaded()?;
    let ids = match (req.prompt, req.messages) {
        (Some(p), None) => encode(&r.tokenizer, &p, req.add_special_tokens.unwrap_or(true), "prompt")?,
        (None, Some(m)) => {
            let text = render_chat(r, m, req.add_generation_prompt.unwrap_or(true), Map::new(), &[])?;
            encode(&r.tokenizer, &text, false, "messages")?
        }
        _ => return Err(ApiError::invalid("prompt", "give exactly one of `prompt` and `messages`")),
    };
    Ok(json!({"count": ids.len(), "max_model_len": r.engine.max_len(), "tokens": ids}))
}

/// vLLM's `/tokenizer_info`: the tokenizer's `tokenizer_config.json` (special tokens, chat
/// template, `model_max_length`), which lm-eval-style clients read the BOS/EOS token from.
async fn tokenizer_info(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.loaded()?.tokenizer.config_json()))
}

async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(body, state.max_body_bytes)?;
    let req: openai::DetokenizeRequest = openai::parse(&body, &openai::DETOKENIZE_FIELDS, state.strict_fields)?;
    state.check_model(req.model.as_deref())?;
    let r = state.loaded()?;
    check_ids(&req.tokens, r.vocab_size, "tokens")?;
    let text = r.tokenizer.decode(&req.tokens, false).map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(json!({"prompt": text})))
}
