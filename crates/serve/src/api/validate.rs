//! Request validation: a request body becomes a validated request (what to submit to the
//! engine and how to answer) or an error naming the field.

use std::time::Instant;

use lmstack_core::tools::{self, Tool, ToolChoice};
use lmstack_core::{Grammar, SamplingParams, StopConditions, Tokenizer};
use serde_json::{Map, Value};

use super::{AppState, Ready};
use crate::engine::Request;
use crate::openai::{self, ApiError, ChatRequest, CompletionRequest, Prompt, Sampling};

/// Tokenizes a prompt (or a rendered conversation) that must fit the context: a long one is
/// refused by [`refuse_surely_too_long`] before it is tokenized whole.
pub(super) fn encode_prompt(r: &Ready, text: &str, special: bool, field: &str) -> Result<Vec<u32>, ApiError> {
    refuse_surely_too_long(r, &[text], field)?;
    encode(&r.tokenizer, text, special, field)
}

/// Refuses texts that will not fit the context together (a prompt, or the contents of a
/// conversation before it is rendered: the rendering holds them all). Texts past 4 KiB in all
/// are counted a 4 KiB piece at a time, and refused as soon as the pieces so far surely hold
/// more tokens than the context, so a request of megabytes costs the tokens of its first few
/// pieces (and the tokenizer's working memory of one piece: ~200 bytes a byte of text), not of
/// all of it.
pub(super) fn refuse_surely_too_long(r: &Ready, texts: &[&str], field: &str) -> Result<(), ApiError> {
    const PIECE: usize = 4 << 10;
    let max_len = r.engine.max_len();
    let total: usize = texts.iter().map(|t| t.len()).sum();
    if total <= PIECE {
        return Ok(());
    }
    let (mut n, mut cuts, mut seen) = (0, 0, 0);
    for text in texts {
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + PIECE).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            // Cut before a space where one is near (a word is not split: the count is exact
            // for most tokenizers).
            if end < text.len() {
                if let Some(i) = text[start..end].rfind(' ').filter(|&i| i > PIECE / 2) {
                    end = start + i;
                }
            }
            cuts += 1;
            n += encode(&r.tokenizer, &text[start..end], false, field)?.len();
            seen += end - start;
            // A cut (or the seams between texts) may split a token in two or three: two more
            // per cut than the context holds is surely too long.
            if n > max_len + 1 + 2 * cuts {
                let what = match field {
                    "messages" => "the conversation",
                    _ => "the prompt",
                };
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "this model's maximum context length is {max_len} tokens, but {what} is longer: its first {seen} of {total} bytes are already {n} tokens"
                    ),
                )
                .code("context_length_exceeded"));
            }
            start = end;
        }
    }
    Ok(())
}

pub(super) fn encode(tok: &Tokenizer, text: &str, special: bool, field: &str) -> Result<Vec<u32>, ApiError> {
    tok.encode(text, special).map_err(|e| ApiError::invalid(field, format!("could not tokenize: {e}")))
}

pub(super) fn check_ids(ids: &[u32], vocab: usize, field: &str) -> Result<(), ApiError> {
    match ids.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(ApiError::invalid(
            format!("{field}[{i}]"),
            format!("token id {} is outside the vocabulary of {vocab}", ids[i]),
        )),
        None => Ok(()),
    }
}

/// A core error about a request field as a 400 naming it.
pub(super) fn field_error(e: lmstack_core::Error) -> ApiError {
    match e {
        lmstack_core::Error::Field { field, message } => {
            ApiError::invalid(field.clone(), format!("{field}: {message}"))
        }
        lmstack_core::Error::InvalidArgument { name, message } => ApiError::invalid(name, format!("{name}: {message}")),
        other => ApiError::invalid("body", other.to_string()),
    }
}

/// Renders chat messages (taken, so a long one is not copied); `content` given as a list of
/// text parts is joined first. `tools` are described to the model: through the template when
/// it renders tools itself (`tools` in its context), else by lmstack's default tool prompt in
/// the system message; earlier calls and `tool` results are rendered likewise (see
/// [`lmstack_core::tools`]).
pub(super) fn render_chat(
    r: &Ready,
    mut messages: Vec<Value>,
    add_generation_prompt: bool,
    mut extra: Map<String, Value>,
    tools: &[Tool],
) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "at least one message is required"));
    }
    for (i, m) in messages.iter_mut().enumerate() {
        let Some(obj) = m.as_object_mut() else {
            return Err(ApiError::invalid(format!("messages[{i}]"), "each message must be an object"));
        };
        let role = match obj.get("role") {
            Some(Value::String(role)) => role.clone(),
            _ => return Err(ApiError::invalid(format!("messages[{i}].role"), "a message needs a string `role`")),
        };
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
    }
    let messages = if r.template.renders_tool_calls() {
        tools::messages_for_template(&mut messages).map_err(field_error)?;
        if !tools.is_empty() {
            extra.entry("tools").or_insert_with(|| tools::template_tools(tools));
        }
        messages
    } else {
        tools::messages_for_default_prompt(messages, tools).map_err(field_error)?
    };
    r.template
        .render(&Value::Array(messages), add_generation_prompt, r.tokenizer.special_tokens(), &extra)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// Engine requests and response metadata common to both endpoints.
pub(super) struct Plan {
    /// The engine request of every choice (its `id` and `prompt` filled in per choice).
    pub base: Request,
    /// Choices per prompt.
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Usage so far in every chunk too (vLLM's `continuous_usage_stats`, with `include_usage`).
    pub continuous_usage: bool,
}

/// A validated `/v1/completions` request.
pub(super) struct Completion {
    pub plan: Plan,
    /// The prompts' token ids.
    pub prompts: Vec<Vec<u32>>,
    /// Per prompt, its text when `echo` asks for it back (decoded from ids given as ids).
    pub echo: Vec<Option<String>>,
    pub echoed: bool,
    /// Alternatives per token when log-probabilities were asked for.
    pub logprobs: Option<usize>,
}

/// Runs `validate` (parsing, rendering, tokenizing: CPU work that grows with the request) on
/// tokio's blocking pool rather than on a worker that serves connections, as many at once as
/// there are cores (the rest wait their turn).
pub(super) async fn off_runtime<T: Send + 'static>(
    state: &std::sync::Arc<AppState>,
    body: axum::body::Bytes,
    validate: fn(&AppState, &[u8]) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let _slot =
        state.validating.acquire().await.map_err(|_| {
            ApiError::status(axum::http::StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down")
        })?;
    let state = state.clone();
    tokio::task::spawn_blocking(move || validate(&state, &body)).await.map_err(|e| {
        tracing::error!(error = %e, "request validation failed");
        ApiError::status(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal error while reading the request")
    })?
}

/// Validates a `/v1/completions` body.
pub(super) fn completion(state: &AppState, body: &[u8]) -> Result<Completion, ApiError> {
    // Read from the bytes into the types (no tree in between: the prompt is copied once).
    openai::check_object(body, &openai::completion_fields(), state.strict_fields)?;
    let req = CompletionRequest { sampling: openai::from_slice(body)?, ..openai::from_slice(body)? };
    state.check_model(req.sampling.model.as_deref())?;
    let r = state.loaded()?;
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "suffix (insertion) is not supported"));
    }
    if req.best_of.is_some_and(|b| b != req.sampling.n.unwrap_or(1)) {
        return Err(ApiError::invalid("best_of", "best_of is supported only equal to n"));
    }
    let special = req.add_special_tokens.unwrap_or(true);
    let (texts, prompts): (Vec<Option<std::borrow::Cow<'_, str>>>, Vec<Vec<u32>>) = match req.prompt {
        Prompt::Text(t) => {
            let ids = encode_prompt(r, &t, special, "prompt")?;
            (vec![Some(t)], vec![ids])
        }
        Prompt::Texts(ts) => {
            let ids = ts.iter().map(|t| encode_prompt(r, t, special, "prompt")).collect::<Result<_, _>>()?;
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
    let mut plan = plan(state, r, &req.sampling, req.max_tokens.unwrap_or(16) as usize, logprobs, None)?;
    if req.echo && logprobs.is_some() {
        plan.base.prompt_logprobs = logprobs;
    }
    let echo: Vec<Option<String>> = if req.echo {
        texts
            .into_iter()
            .zip(&prompts)
            .map(|(t, ids)| {
                Some(t.map_or_else(|| r.tokenizer.decode(ids, false).unwrap_or_default(), |t| t.into_owned()))
            })
            .collect()
    } else {
        vec![None; prompts.len()]
    };
    Ok(Completion { plan, prompts, echo, echoed: req.echo, logprobs })
}

/// What the output must match, from OpenAI's `response_format` or vLLM's `structured_outputs`
/// (or its older `guided_*` fields), with the field it came from; at most one may be given.
fn grammar(s: &Sampling) -> Result<Option<(&'static str, Grammar)>, ApiError> {
    let mut found: Vec<(&'static str, Grammar)> = Vec::new();
    if let Some(f) = &s.response_format {
        found.extend(Grammar::from_response_format(f).map_err(field_error)?);
    }
    if let Some(so) = &s.structured_outputs {
        let g = Grammar::from_structured_outputs(so).map_err(field_error)?;
        found.extend(g.into_iter().map(|g| ("structured_outputs", g)));
    }
    if let Some(v) = &s.guided_json {
        found.push(("guided_json", Grammar::from_schema_value(v, "guided_json").map_err(field_error)?));
    }
    if let Some(r) = &s.guided_regex {
        found.push(("guided_regex", Grammar::Regex(r.clone())));
    }
    if let Some(c) = &s.guided_choice {
        found.push(("guided_choice", Grammar::from_choices(c, "guided_choice").map_err(field_error)?));
    }
    if let Some(g) = &s.guided_grammar {
        found.push(("guided_grammar", Grammar::Lark(g.clone())));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(f, _)| *f).collect();
        return Err(ApiError::invalid(
            found[1].0,
            format!("give one output constraint, not several ({})", names.join(", ")),
        ));
    }
    Ok(found.pop())
}

/// A validated `/v1/chat/completions` request.
pub(super) struct Chat {
    pub plan: Plan,
    /// The rendered conversation's token ids.
    pub ids: Vec<u32>,
    /// Alternatives per token when log-probabilities were asked for.
    pub logprobs: Option<usize>,
    /// Whether the answers are read for tool calls (`tools` given, `tool_choice` not `none`).
    pub tools: bool,
}

/// Validates a `/v1/chat/completions` body and renders its conversation.
pub(super) fn chat(state: &AppState, body: &[u8]) -> Result<Chat, ApiError> {
    openai::check_object(body, &openai::chat_fields(), state.strict_fields)?;
    let req = ChatRequest { sampling: openai::from_slice(body)?, ..openai::from_slice(body)? };
    state.check_model(req.sampling.model.as_deref())?;
    let r = state.loaded()?;
    let tool_list = tools::tools_from_openai(req.tools.as_ref()).map_err(field_error)?;
    let choice = ToolChoice::from_openai(req.tool_choice.as_ref(), &tool_list).map_err(field_error)?;
    let tool_grammar = tools::grammar(&tool_list, &choice, req.parallel_tool_calls.unwrap_or(true));
    // With `tool_choice: none` the tools are left out of the prompt.
    let shown: &[Tool] = if choice == ToolChoice::None { &[] } else { &tool_list };
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs needs logprobs: true"));
    }
    // Contents that cannot fit are refused before the template copies them.
    let contents: Vec<&str> = req.messages.iter().filter_map(|m| m.get("content")?.as_str()).collect();
    refuse_surely_too_long(r, &contents, "messages")?;
    drop(contents);
    let extra = req.chat_template_kwargs.clone().unwrap_or_default();
    let text = render_chat(r, req.messages, req.add_generation_prompt.unwrap_or(true), extra, shown)?;
    let ids = encode_prompt(r, &text, false, "messages")?;
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
    let tools = tool_grammar.is_some();
    let plan = plan(state, r, &req.sampling, max_tokens, logprobs, tool_grammar)?;
    Ok(Chat { plan, ids, logprobs, tools })
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

/// The engine request common to every choice; `tools`: the grammar of the tool calls
/// `tool_choice` allows.
fn plan(
    state: &AppState,
    r: &Ready,
    s: &Sampling,
    max_tokens: usize,
    logprobs: Option<usize>,
    tools: Option<Grammar>,
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
    let grammar = match (grammar(s)?, tools) {
        (Some((field, _)), Some(_)) => {
            return Err(ApiError::invalid(
                field,
                format!("{field} cannot be combined with tools; give tool_choice: \"none\" or leave one out"),
            ))
        }
        (g, None) => g,
        (None, Some(t)) => Some(("tools", t)),
    };
    let constraint = match grammar {
        Some((field, g)) => Some(r.constrainer(field)?.constraint(&g).map_err(|e| {
            ApiError::invalid(
                field,
                format!(
                    "{field}: llguidance cannot use it: {}",
                    e.to_string().trim_start_matches("invalid argument `grammar`: ")
                ),
            )
        })?),
        None => None,
    };
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
        constraint,
    };
    let opts = s.stream_options.clone().unwrap_or_default();
    if s.stream_options.is_some() && !s.stream {
        return Err(ApiError::invalid("stream_options", "stream_options needs stream: true"));
    }
    let continuous_usage = opts.include_usage && opts.continuous_usage_stats;
    Ok(Plan { base, n, stream: s.stream, include_usage: opts.include_usage, continuous_usage })
}
