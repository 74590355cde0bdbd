//! OpenAI request bodies and the error shape, with validation that names the offending field.
//!
//! Fields OpenAI defines but lmstack cannot honour (`suffix`, non-text content …) are refused with a 400
//! naming them rather than silently ignored. Fields that change nothing about the answer
//! (`store`, `metadata`, `service_tier`, `user`, …: [`IGNORED_FIELDS`]) are accepted and
//! ignored. Unknown fields are ignored with a warning in the log, as vLLM does, or refused
//! with a 400 naming them under `--strict-fields`. vLLM's extensions (`top_k`, `min_p`,
//! `repetition_penalty`, `stop_token_ids`, `ignore_eos`, `skip_special_tokens`, …) are
//! accepted.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// The offending request field, if any.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds after which to retry (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    /// Any status without a field.
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, code: None, retry_after: None }
    }

    /// With a machine-readable code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Parses a JSON object body into `T`, refusing keys outside `fields` (see [`check_object`]);
/// errors name the field path (`messages[1].content`).
pub fn parse<T: DeserializeOwned>(bytes: &[u8], fields: &[&str], strict: bool) -> Result<T, ApiError> {
    check_object(bytes, fields, strict)?;
    from_slice(bytes)
}

/// Fields of OpenAI's chat and completions requests that change nothing lmstack returns
/// (storage, billing, tracing, hints for other models): accepted, logged at debug, ignored.
pub const IGNORED_FIELDS: [&str; 11] = [
    "store",
    "metadata",
    "service_tier",
    "prediction",
    "reasoning_effort",
    "modalities",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
    "web_search_options",
    "audio",
];

/// Checks that a body is one JSON object whose keys are among `fields`: others are refused (a
/// 400 naming the first) when `strict`, else ignored with a warning in the log, as vLLM does.
/// Reads the bytes without building a tree (values are skipped), so a body of megabytes is not
/// copied; [`from_slice`] then reads it into its types, which ignore keys they don't know.
pub fn check_object(bytes: &[u8], fields: &[&str], strict: bool) -> Result<(), ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid("body", "the request body is empty; send a JSON object"));
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() {
        let e = serde_json::from_slice::<Value>(bytes).err().map_or_else(String::new, |e| e.to_string());
        return Err(ApiError::invalid("body", format!("the request body is not valid JSON: {e}")));
    }
    let keys: std::collections::BTreeMap<String, serde::de::IgnoredAny> = serde_json::from_slice(bytes)
        .map_err(|_| ApiError::invalid("body", "the request body must be a JSON object"))?;
    let unknown: Vec<&String> = keys.keys().filter(|k| !fields.contains(&k.as_str())).collect();
    if let (true, Some(k)) = (strict, unknown.first()) {
        return Err(ApiError::invalid(
            k.to_string(),
            format!("unknown field `{k}`; expected one of: {}", fields.join(", ")),
        ));
    }
    if !unknown.is_empty() {
        tracing::warn!(fields = ?unknown, "ignoring unknown request fields (--strict-fields refuses them)");
    }
    let ignored: Vec<&String> = keys.keys().filter(|k| IGNORED_FIELDS.contains(&k.as_str())).collect();
    if !ignored.is_empty() {
        tracing::debug!(fields = ?ignored, "ignoring request fields that change nothing here");
    }
    Ok(())
}

/// Deserializes `T` from a body [`check_object`] accepted; errors name the field path.
pub fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(path_error)
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let msg = e.into_inner().to_string();
    // serde_json appends the position (" at line 1 column 99"): the path says where.
    let msg = match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(" column ") => msg[..i].to_owned(),
        _ => msg,
    };
    let msg = msg.replace("data did not match any variant of untagged enum ", "unexpected type for ");
    if path == "." {
        // Missing top-level fields come without a path; serde names them.
        let param = msg.split('`').nth(1).unwrap_or("body").to_owned();
        ApiError::invalid(param, msg)
    } else {
        ApiError::invalid(path.clone(), format!("{path}: {msg}"))
    }
}

const SAMPLING_FIELDS: [&str; 26] = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "n",
    "stream",
    "stream_options",
    "logit_bias",
    "user",
    "model",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];

/// Fields of [`CompletionRequest`].
pub fn completion_fields() -> Vec<&'static str> {
    let mut f = SAMPLING_FIELDS.to_vec();
    f.extend(IGNORED_FIELDS);
    f.extend(["prompt", "max_tokens", "logprobs", "echo", "best_of", "suffix", "add_special_tokens"]);
    f
}

/// Fields of [`ChatRequest`].
pub fn chat_fields() -> Vec<&'static str> {
    let mut f = SAMPLING_FIELDS.to_vec();
    f.extend(IGNORED_FIELDS);
    f.extend([
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "add_generation_prompt",
        "chat_template_kwargs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    ]);
    f
}

/// Fields of [`TokenizeRequest`].
pub const TOKENIZE_FIELDS: [&str; 5] = ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"];
/// Fields of [`DetokenizeRequest`].
pub const DETOKENIZE_FIELDS: [&str; 2] = ["model", "tokens"];

/// `prompt`: a string, a list of strings, token ids, or a list of token-id lists. Read as it
/// comes (not buffered to try each shape in turn, as `#[serde(untagged)]` would: that copies a
/// prompt of megabytes once more).
#[derive(Debug, Clone)]
pub enum Prompt<'a> {
    /// One text prompt (borrowed from the body where it has no escapes: not copied).
    Text(Cow<'a, str>),
    /// Several text prompts.
    Texts(Vec<Cow<'a, str>>),
    /// One tokenized prompt.
    Ids(Vec<u32>),
    /// Several tokenized prompts.
    IdLists(Vec<Vec<u32>>),
}

impl<'de: 'a, 'a> Deserialize<'de> for Prompt<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{DeserializeSeed, Error, SeqAccess, Visitor};
        /// One element of a list prompt.
        enum Elem<'a> {
            Text(Cow<'a, str>),
            Id(u32),
            Ids(Vec<u32>),
        }
        impl Elem<'_> {
            fn kind(&self) -> &'static str {
                match self {
                    Elem::Text(_) => "strings",
                    Elem::Id(_) => "token ids",
                    Elem::Ids(_) => "token-id lists",
                }
            }
        }
        /// Reads an element; after the first, one of the first's kind (else the error names
        /// this element).
        struct Like(Option<&'static str>);
        impl<'de> DeserializeSeed<'de> for Like {
            type Value = Elem<'de>;
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Elem<'de>, D::Error> {
                d.deserialize_any(self)
            }
        }
        impl<'de> Visitor<'de> for Like {
            type Value = Elem<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.0 {
                    Some(kind) => write!(f, "one of {kind}, as the first element is"),
                    None => f.write_str("a string, a token id or a list of token ids"),
                }
            }
            fn visit_borrowed_str<E: Error>(self, v: &'de str) -> Result<Elem<'de>, E> {
                self.check(Elem::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Elem<'de>, E> {
                self.check(Elem::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: Error>(self, v: String) -> Result<Elem<'de>, E> {
                self.check(Elem::Text(Cow::Owned(v)))
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<Elem<'de>, E> {
                let id = u32::try_from(v).map_err(|_| E::custom(format!("token id {v} is too large")))?;
                self.check(Elem::Id(id))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Elem<'de>, E> {
                Err(E::custom(format!("token id {v} is negative")))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Elem<'de>, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<u32>()? {
                    ids.push(id);
                }
                self.check(Elem::Ids(ids))
            }
        }
        impl Like {
            fn check<'e, E: Error>(&self, e: Elem<'e>) -> Result<Elem<'e>, E> {
                match self.0 {
                    Some(kind) if kind != e.kind() => Err(E::custom(format!(
                        "one of {kind} expected, as the first element is; found one of {}",
                        e.kind()
                    ))),
                    _ => Ok(e),
                }
            }
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Prompt<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, a list of strings, a list of token ids or a list of token-id lists")
            }
            fn visit_borrowed_str<E: Error>(self, v: &'de str) -> Result<Prompt<'de>, E> {
                Ok(Prompt::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Prompt<'de>, E> {
                Ok(Prompt::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: Error>(self, v: String) -> Result<Prompt<'de>, E> {
                Ok(Prompt::Text(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt<'de>, A::Error> {
                let Some(first) = seq.next_element_seed(Like(None))? else {
                    return Ok(Prompt::Texts(Vec::new()));
                };
                let like = Like(Some(first.kind()));
                // Each element is taken out as it comes (never a list of `Elem`s: ids would
                // take eight times their room).
                macro_rules! rest {
                    ($first:expr, $variant:path) => {{
                        let mut v = vec![$first];
                        while let Some(e) = seq.next_element_seed(Like(like.0))? {
                            if let $variant(x) = e {
                                v.push(x);
                            }
                        }
                        v
                    }};
                }
                Ok(match first {
                    Elem::Text(t) => Prompt::Texts(rest!(t, Elem::Text)),
                    Elem::Id(i) => Prompt::Ids(rest!(i, Elem::Id)),
                    Elem::Ids(ids) => Prompt::IdLists(rest!(ids, Elem::Ids)),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "expected a string or a list of strings")]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Up to several stop strings.
    Many(Vec<String>),
}

impl Stop {
    /// As a list, refusing empty strings.
    pub fn into_vec(self) -> Result<Vec<String>, ApiError> {
        let v = match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if v.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        Ok(v)
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
    /// Put usage in every chunk (vLLM).
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    /// 0 = greedy; default 1.
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// vLLM extension: keep the k most likely (0 or -1 = off).
    pub top_k: Option<i64>,
    /// vLLM extension.
    pub min_p: Option<f32>,
    /// vLLM extension.
    pub repetition_penalty: Option<f32>,
    /// OpenAI.
    pub presence_penalty: Option<f32>,
    /// OpenAI.
    pub frequency_penalty: Option<f32>,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// vLLM extension.
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM extension.
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM extension: generate at least this many tokens before end-of-sequence, a stop token
    /// or a stop string may end the output.
    pub min_tokens: Option<u32>,
    /// vLLM extension: end the output with the stop string that ended it.
    #[serde(default)]
    pub include_stop_str_in_output: bool,
    /// vLLM extension (default true).
    pub skip_special_tokens: Option<bool>,
    /// Number of choices per prompt.
    pub n: Option<u32>,
    /// Stream as Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Token ids (as strings) to biases in [-100, 100] added to their logits.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Accepted and ignored (an end-user id for abuse monitoring).
    pub user: Option<String>,
    /// Model name (optional: the served model).
    pub model: Option<String>,
    /// OpenAI: `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema", …}}`.
    pub response_format: Option<Value>,
    /// vLLM: `{"json" | "regex" | "choice" | "grammar" | "json_object": …}`.
    pub structured_outputs: Option<Value>,
    /// vLLM's older names of the same.
    pub guided_json: Option<Value>,
    /// vLLM: a regular expression.
    pub guided_regex: Option<String>,
    /// vLLM: one of these strings.
    pub guided_choice: Option<Vec<String>>,
    /// vLLM: a grammar (llguidance's Lark dialect).
    pub guided_grammar: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest<'a> {
    /// The prompt(s), borrowed from the body where they can be.
    #[serde(borrow)]
    pub prompt: Prompt<'a>,
    /// Default 16, as OpenAI.
    pub max_tokens: Option<u32>,
    /// Top-n log-probabilities per token (0..=20).
    pub logprobs: Option<u32>,
    /// Return the prompt before the completion (with its log-probabilities when `logprobs`).
    #[serde(default)]
    pub echo: bool,
    /// Must equal `n` when given.
    pub best_of: Option<u32>,
    /// Not supported.
    pub suffix: Option<String>,
    /// Add the tokenizer's special tokens (BOS) to text prompts (default true).
    pub add_special_tokens: Option<bool>,
    /// Shared sampling fields (read from the same object).
    #[serde(skip)]
    pub sampling: Sampling,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Value>,
    /// Most tokens to generate (default: the rest of the context).
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Return log-probabilities of the generated tokens.
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per token (0..=20), needs `logprobs`.
    pub top_logprobs: Option<u32>,
    /// Append the assistant-turn opener (default true).
    pub add_generation_prompt: Option<bool>,
    /// Extra variables for the chat template.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Functions the model may call: `[{"type": "function", "function": {"name", "description",
    /// "parameters"}}]`.
    pub tools: Option<Value>,
    /// `none`, `auto` (the default with tools), `required`, or `{"type": "function",
    /// "function": {"name": …}}`.
    pub tool_choice: Option<Value>,
    /// Several calls in one answer (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Shared sampling fields (read from the same object).
    #[serde(skip)]
    pub sampling: Sampling,
}

/// `POST /tokenize`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    /// Model name (optional).
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Or a conversation, rendered with the chat template first.
    pub messages: Option<Vec<Value>>,
    /// Add special tokens to `prompt` (default true).
    pub add_special_tokens: Option<bool>,
    /// With `messages` (default true).
    pub add_generation_prompt: Option<bool>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    /// Model name (optional).
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
}
