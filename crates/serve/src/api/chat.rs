//! `/v1/chat/completions`: validated and rendered through the chat template
//! ([`super::validate::chat`]), one engine request per choice, answered as one
//! `chat.completion` object or as a stream of `chat.completion.chunk`s.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
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
                json!({"index": i, "message": {"role": "assistant", "content": a.text},
                       "logprobs": req.logprobs.map(|_| chat_logprobs(&a.lps)), "finish_reason": a.finish})
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
            let first = Delta { role: Some("assistant"), content: Some("") };
            let mut c = chunk(i, first, Value::Null, None);
            if req.plan.continuous_usage {
                add_usage(&mut c, &answer.counts.usage_so_far());
            }
            if !send(&tx, c).await {
                return;
            }
        }
        stream_answer(
            &tx,
            answer,
            &head,
            (req.plan.include_usage, req.plan.continuous_usage),
            |i, update| match update {
                Update::Prompt(_) => Vec::new(),
                Update::Token { text, logprob } => {
                    let lp = logprob.map_or(Value::Null, |l| chat_logprobs(std::slice::from_ref(&l)));
                    vec![chunk(i, Delta::content(&text), lp, None)]
                }
                Update::Finished { text, reason } => {
                    let last = chunk(i, Delta { role: None, content: None }, Value::Null, Some(reason));
                    if text.is_empty() {
                        vec![last]
                    } else {
                        vec![chunk(i, Delta::content(&text), Value::Null, None), last]
                    }
                }
            },
        )
        .await;
    }))
}
