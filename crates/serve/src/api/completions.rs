//! `/v1/completions`: validated ([`super::validate::completion`]), one engine request per
//! (prompt, choice), answered as one `text_completion` object or as a stream of chunks.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::choices::{completion_logprobs, prompt_pieces, Answer, Update};
use super::sse::{add_usage, now, send, sse, stream_answer, ChunkHead, TextChoice};
use super::{body_bytes, validate, AppState, RequestId};
use crate::engine::TokenLogprob;
use crate::openai::ApiError;

pub(super) async fn completions(
    State(state): State<Arc<AppState>>,
    axum::Extension(RequestId(req_id)): axum::Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, state.max_body_bytes)?;
    let req = validate::off_runtime(&state, body, validate::completion).await?;
    let r = state.loaded()?;
    let answer = Answer::submit(&state, r, &req.plan, &req.prompts, &req_id)?;
    let id = state.new_id("cmpl");
    let n = req.plan.n;
    if !req.plan.stream {
        let (acc, counts) = answer.collect().await?;
        let out: Vec<Value> = acc
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                let prefix = req.echo[i / n].clone().unwrap_or_default();
                let lp = req.logprobs.map(|_| {
                    let mut toks: Vec<Option<&TokenLogprob>> = Vec::new();
                    let mut fallback = Vec::new();
                    if req.echoed {
                        toks.extend(a.prompt_lps.iter().map(Option::as_ref));
                        fallback = prompt_pieces(&r.tokenizer, &req.prompts[i / n]);
                    }
                    toks.extend(a.lps.iter().map(Some));
                    completion_logprobs(&toks, &fallback, 0)
                });
                json!({"index": i, "text": prefix + &a.text, "logprobs": lp, "finish_reason": a.finish})
            })
            .collect();
        let mut body = json!({"id": id, "object": "text_completion", "created": now(), "model": state.model_name});
        body["choices"] = Value::Array(out);
        body["usage"] = counts.usage();
        return Ok(Json(body).into_response());
    }
    let tokenizer = r.tokenizer.clone();
    let head = ChunkHead::new(&id, "text_completion", &state.model_name);
    Ok(sse(move |tx| async move {
        // Characters of each choice's text so far (`text_offset` of its log-probabilities).
        let mut offsets = vec![0usize; answer.len];
        let chunk = |index: usize, text: String, lp: Value, finish: Option<&str>| {
            head.chunk(&TextChoice { index, text: &text, logprobs: &lp, finish_reason: finish })
        };
        // Without echoed log-probabilities, the prompt text goes out first.
        if req.echoed && req.logprobs.is_none() {
            for (i, offset) in offsets.iter_mut().enumerate() {
                let t = req.echo[i / n].clone().unwrap_or_default();
                *offset += t.chars().count();
                let mut c = chunk(i, t, Value::Null, None);
                if req.plan.continuous_usage {
                    add_usage(&mut c, &answer.counts.usage_so_far());
                }
                if !send(&tx, c).await {
                    return;
                }
            }
        }
        stream_answer(&tx, answer, &head, (req.plan.include_usage, req.plan.continuous_usage), |i, update| {
            vec![match update {
                Update::Prompt(p) => {
                    let toks: Vec<Option<&TokenLogprob>> = p.iter().map(Option::as_ref).collect();
                    let lp = completion_logprobs(&toks, &prompt_pieces(&tokenizer, &req.prompts[i / n]), 0);
                    let t = req.echo[i / n].clone().unwrap_or_default();
                    offsets[i] += t.chars().count();
                    chunk(i, t, lp, None)
                }
                Update::Token { text, logprob } => {
                    let lp = logprob.as_ref().map_or(Value::Null, |l| completion_logprobs(&[Some(l)], &[], offsets[i]));
                    offsets[i] += text.chars().count();
                    chunk(i, text, lp, None)
                }
                Update::Finished { text, reason } => chunk(i, text, Value::Null, Some(reason)),
            }]
        })
        .await;
    }))
}
