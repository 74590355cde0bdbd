//! `/v1/chat/completions`: validated and rendered through the chat template
//! ([`super::validate::chat`]), one engine request per choice, answered as one
//! `chat.completion` object or as a stream of `chat.completion.chunk`s.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lmstack_core::tools::{self, ToolCallReader, ToolEvent};
use serde_json::{json, Value};

use super::choices::{chat_logprobs, Answer, Update};
use super::sse::{add_usage, now, send, sse, stream_answer, ChatChoice, ChunkHead, Delta};
use super::{body_bytes, validate, AppState, RequestId};
use crate::openai::ApiError;

pub(super) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    axum::Extension(RequestId(req_id)): axum::Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, state.max_body_bytes)?;
    let req = validate::off_runtime(&state, body, validate::chat).await?;
    let r = state.loaded()?;
    let n = req.plan.n;
    let answer = Answer::submit(&state, r, &req.plan, std::slice::from_ref(&req.ids), &req_id)?;
    let id = state.new_id("chatcmpl");
    if !req.plan.stream {
        let (acc, counts) = answer.collect().await?;
        let out: Vec<Value> = acc
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                let logprobs = req.logprobs.map(|_| chat_logprobs(&a.lps));
                if !req.tools {
                    return json!({"index": i, "message": {"role": "assistant", "content": a.text},
                                  "logprobs": logprobs, "finish_reason": a.finish});
                }
                let (content, calls) = tools::read_answer(&a.text);
                let mut message = json!({"role": "assistant", "content": content});
                if !calls.is_empty() {
                    let calls: Vec<Value> = calls
                        .into_iter()
                        .map(|(name, arguments)| {
                            json!({"id": call_id(), "type": "function",
                                   "function": {"name": name, "arguments": arguments}})
                        })
                        .collect();
                    message["tool_calls"] = Value::Array(calls);
                }
                let finish = finish_reason(a.finish.unwrap_or("stop"), message.get("tool_calls").is_some());
                json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            })
            .collect();
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": now(), "model": state.model_name,
            "choices": out, "usage": counts.usage(),
        }))
        .into_response());
    }
    let head = ChunkHead::new(&id, "chat.completion.chunk", &state.model_name);
    Ok(sse(move |tx| async move {
        let chunk = |index: usize, delta: Delta<'_>, lp: Value, finish: Option<&str>| {
            head.chunk(&ChatChoice { index, delta, logprobs: &lp, finish_reason: finish })
        };
        for i in 0..n {
            let first = Delta { role: Some("assistant"), content: Some(""), tool_calls: None };
            let mut c = chunk(i, first, Value::Null, None);
            if req.plan.continuous_usage {
                add_usage(&mut c, &answer.counts.usage_so_far());
            }
            if !send(&tx, c).await {
                return;
            }
        }
        // With tools, each choice's text is read for calls as it comes.
        let mut readers: Vec<ToolCallReader> =
            if req.tools { (0..answer.len).map(|_| ToolCallReader::new()).collect() } else { Vec::new() };
        let mut ids: Vec<Vec<String>> = vec![Vec::new(); readers.len()];
        stream_answer(
            &tx,
            answer,
            &head,
            (req.plan.include_usage, req.plan.continuous_usage),
            |i, update| match update {
                Update::Prompt(_) => Vec::new(),
                Update::Token { text, logprob } => {
                    let lp = logprob.map_or(Value::Null, |l| chat_logprobs(std::slice::from_ref(&l)));
                    match readers.get_mut(i) {
                        None => vec![chunk(i, Delta::content(&text), lp, None)],
                        Some(r) => {
                            let events = r.push(&text);
                            tool_chunks(events, &mut ids[i], lp, |d, lp| chunk(i, d, lp, None))
                        }
                    }
                }
                Update::Finished { text, reason } => {
                    let mut out = match readers.get_mut(i) {
                        None if text.is_empty() => Vec::new(),
                        None => vec![chunk(i, Delta::content(&text), Value::Null, None)],
                        Some(r) => {
                            let mut events = r.push(&text);
                            events.extend(r.finish());
                            tool_chunks(events, &mut ids[i], Value::Null, |d, lp| chunk(i, d, lp, None))
                        }
                    };
                    let called = readers.get(i).is_some_and(|r| r.calls() > 0);
                    out.push(chunk(i, Delta::empty(), Value::Null, Some(finish_reason(reason, called))));
                    out
                }
            },
        )
        .await;
    }))
}

/// OpenAI's `finish_reason`: `tool_calls` when an answer that ended by itself made calls.
fn finish_reason(reason: &'static str, called: bool) -> &'static str {
    if called && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

/// A new tool call's id (`call_` and 24 letters and digits, as OpenAI's).
fn call_id() -> String {
    use rand::Rng;
    let tail: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(24).map(char::from).collect();
    format!("call_{tail}")
}

/// The chunks of one token's tool events, as OpenAI streams them: content, a call's first
/// chunk (index, id, type, name, empty arguments), then pieces of its arguments. The token's
/// log-probabilities go with its first chunk. `ids`: the answer's call ids so far.
fn tool_chunks(
    events: Vec<ToolEvent>,
    ids: &mut Vec<String>,
    mut lp: Value,
    mut chunk: impl FnMut(Delta<'_>, Value) -> String,
) -> Vec<String> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let lp = std::mem::take(&mut lp);
        out.push(match e {
            ToolEvent::Content(t) => chunk(Delta::content(&t), lp),
            ToolEvent::Call { index, name } => {
                ids.push(call_id());
                let call = json!([{"index": index, "id": ids[index], "type": "function",
                                   "function": {"name": name, "arguments": ""}}]);
                chunk(Delta { tool_calls: Some(call), ..Delta::empty() }, lp)
            }
            ToolEvent::Arguments { index, delta } => {
                let call = json!([{"index": index, "function": {"arguments": delta}}]);
                chunk(Delta { tool_calls: Some(call), ..Delta::empty() }, lp)
            }
        });
    }
    out
}
