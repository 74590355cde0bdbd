//! One response's choices: one engine request per (prompt, choice), their events read as
//! [`Update`]s by streaming and non-streaming answers alike, token counts, and OpenAI's
//! log-probability objects.

use axum::http::StatusCode;
use futures_util::stream::{self, SelectAll, StreamExt};
use lmstack_core::Tokenizer;
use serde_json::{json, Map, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::validate::Plan;
use super::{AppState, Ready};
use crate::engine::{Event, SubmitError, TokenLogprob};
use crate::openai::ApiError;

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
pub(super) struct Counts {
    prompt: usize,
    n: usize,
    /// Per prompt, the fewest cached tokens of its choices finished so far (`None`: none yet).
    cached: Vec<Option<usize>>,
    completion: usize,
    /// Tokens generated so far, over all choices (finished or not).
    pub generated: usize,
}

impl Counts {
    fn new(prompts: &[Vec<u32>], n: usize) -> Self {
        let prompt = prompts.iter().map(Vec::len).sum();
        Self { prompt, n, cached: vec![None; prompts.len()], completion: 0, generated: 0 }
    }

    /// Choice `i` finished.
    fn add(&mut self, i: usize, cached: usize, completion: usize) {
        let c = &mut self.cached[i / self.n];
        *c = Some(c.map_or(cached, |c| c.min(cached)));
        self.completion += completion;
    }

    /// The `usage` object so far, while choices still run (vLLM's continuous usage stats):
    /// completion tokens are those generated until now.
    pub fn usage_so_far(&self) -> Value {
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.generated,
               "total_tokens": self.prompt + self.generated})
    }

    /// OpenAI's `usage` object.
    pub fn usage(&self) -> Value {
        let cached: usize = self.cached.iter().flatten().sum();
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion,
               "total_tokens": self.prompt + self.completion, "prompt_tokens_details": {"cached_tokens": cached}})
    }
}

/// What happened to one choice, as both kinds of answer read it.
pub(super) enum Update {
    /// Log-probabilities of the prompt tokens (`echo` with `logprobs`).
    Prompt(Vec<Option<TokenLogprob>>),
    /// Text released by one generated token, and its log-probability if asked for.
    Token { text: String, logprob: Option<TokenLogprob> },
    /// The end: text still held back, and OpenAI's `finish_reason`.
    Finished { text: String, reason: &'static str },
}

/// The choices of one response while they run: their events as [`Update`]s, token counts
/// kept as choices finish.
pub(super) struct Answer {
    choices: Choices,
    /// The server's state, and its shutdown cut, which ends the answer.
    state: std::sync::Arc<AppState>,
    cut: tokio::sync::watch::Receiver<bool>,
    /// How many choices (prompts × n).
    pub len: usize,
    /// Token counts of the choices finished so far.
    pub counts: Counts,
}

impl Answer {
    /// Submits one engine request per (prompt, choice) of `plan`.
    pub fn submit(
        state: &std::sync::Arc<AppState>,
        r: &Ready,
        plan: &Plan,
        prompts: &[Vec<u32>],
        req_id: &str,
    ) -> Result<Answer, ApiError> {
        let choices = submit_all(r, plan, prompts, req_id)?;
        let (len, counts) = (prompts.len() * plan.n, Counts::new(prompts, plan.n));
        Ok(Answer { choices, state: state.clone(), cut: state.cut.subscribe(), len, counts })
    }

    /// The next update of any choice, or the error it failed with (or the server's shutdown
    /// cut, once its grace period is over); `None` once every engine stream has ended. Tokens
    /// that released no text and carry no log-probability are skipped.
    pub async fn next(&mut self) -> Option<Result<(usize, Update), ApiError>> {
        loop {
            let (i, ev) = tokio::select! {
                ev = self.choices.next() => ev?,
                _ = self.cut.wait_for(|&c| c) => {
                    self.state.requests_cut.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Some(Err(AppState::cut_error()));
                }
            };
            if matches!(ev, Event::Token { .. }) {
                self.counts.generated += 1;
            }
            let u = match ev {
                Event::Prompt(p) => Update::Prompt(p),
                Event::Token { text, logprob } if text.is_empty() && logprob.is_none() => continue,
                Event::Token { text, logprob } => Update::Token { text, logprob },
                Event::Finished { text, reason, cached_tokens, completion_tokens } => {
                    self.counts.add(i, cached_tokens, completion_tokens);
                    Update::Finished { text, reason: reason.as_str() }
                }
                Event::Failed { timeout, message } => return Some(Err(failed(timeout, message))),
            };
            return Some(Ok((i, u)));
        }
    }

    /// Runs every choice to its end (a non-streamed answer).
    pub async fn collect(mut self) -> Result<(Vec<ChoiceAcc>, Counts), ApiError> {
        let mut acc: Vec<ChoiceAcc> = (0..self.len).map(|_| ChoiceAcc::default()).collect();
        while let Some(u) = self.next().await {
            let (i, u) = u?;
            let a = &mut acc[i];
            match u {
                Update::Prompt(p) => a.prompt_lps = p,
                Update::Token { text, logprob } => {
                    a.text.push_str(&text);
                    a.lps.extend(logprob);
                }
                Update::Finished { text, reason } => {
                    a.text.push_str(&text);
                    a.finish = Some(reason);
                }
            }
        }
        if acc.iter().any(|a| a.finish.is_none()) {
            return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the engine stopped before finishing"));
        }
        Ok((acc, self.counts))
    }
}

/// One choice of a non-streamed answer.
#[derive(Default)]
pub(super) struct ChoiceAcc {
    pub text: String,
    pub prompt_lps: Vec<Option<TokenLogprob>>,
    pub lps: Vec<TokenLogprob>,
    pub finish: Option<&'static str>,
}

/// OpenAI's legacy completion `logprobs` object for `tokens`, offsets starting at `offset`.
pub(super) fn completion_logprobs(tokens: &[Option<&TokenLogprob>], fallback: &[String], offset: usize) -> Value {
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

pub(super) fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
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

/// Each prompt token's own text (for echoed `logprobs.tokens`).
pub(super) fn prompt_pieces(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&t| crate::engine::piece(tok, t)).collect()
}
