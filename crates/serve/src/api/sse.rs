//! Server-Sent Events: streamed chunks, assembled as text from a head serialized once, and the
//! response body that polls its producer so a token costs no wake-up of a task of its own.

use std::convert::Infallible;
use std::task::Poll;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::choices::{Answer, Update};

/// Streams `answer`: the chunks `chunks_of` makes of each update (none, one, or more), each
/// with the usage so far when `continuous`, an error event if a choice fails, then the usage
/// chunk when `include_usage`. Returns early when the client is gone; ends with an error event
/// when the shutdown grace period runs out (`[DONE]` follows, as after any error).
pub(super) async fn stream_answer(
    tx: &SseTx,
    mut answer: Answer,
    head: &ChunkHead,
    (include_usage, continuous): (bool, bool),
    mut chunks_of: impl FnMut(usize, Update) -> Vec<String>,
) {
    while let Some(update) = answer.next().await {
        let chunks = match update {
            Ok((i, u)) => chunks_of(i, u),
            Err(e) => {
                let _ = send(tx, e.body().to_string()).await;
                break;
            }
        };
        for mut chunk in chunks {
            if continuous {
                add_usage(&mut chunk, &answer.counts.usage_so_far());
            }
            if !send(tx, chunk).await {
                return;
            }
        }
    }
    if include_usage {
        let _ = send(tx, format!("{}[],\"usage\":{}}}", head.prefix, answer.counts.usage())).await;
    }
}

/// Adds `usage` to a chunk: `…]}` becomes `…],"usage":{…}}`.
pub(super) fn add_usage(chunk: &mut String, usage: &Value) {
    chunk.pop();
    chunk.push_str(&format!(",\"usage\":{usage}}}"));
}

/// What every chunk of one streamed response starts with, serialized once:
/// `{"id":…,"object":…,"created":…,"model":…,"choices":` (a chunk is written per token, so
/// it is assembled as text rather than through a `Value` tree).
pub(super) struct ChunkHead {
    prefix: String,
}

impl ChunkHead {
    pub fn new(id: &str, object: &str, model: &str) -> Self {
        let head = json!({"id": id, "object": object, "created": now(), "model": model}).to_string();
        Self { prefix: format!("{},\"choices\":", &head[..head.len() - 1]) }
    }

    /// The chunk carrying one choice.
    pub fn chunk(&self, choice: &impl serde::Serialize) -> String {
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
pub(super) struct TextChoice<'a> {
    pub index: usize,
    pub text: &'a str,
    pub logprobs: &'a Value,
    pub finish_reason: Option<&'a str>,
}

/// One choice of a `chat.completion.chunk`.
#[derive(serde::Serialize)]
pub(super) struct ChatChoice<'a> {
    pub index: usize,
    pub delta: Delta<'a>,
    pub logprobs: &'a Value,
    pub finish_reason: Option<&'a str>,
}

/// A chat chunk's `delta`: the role in a choice's first chunk, then content or a piece of a
/// tool call.
#[derive(serde::Serialize)]
pub(super) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
}

impl<'a> Delta<'a> {
    pub fn content(text: &'a str) -> Self {
        Self { role: None, content: Some(text), tool_calls: None }
    }

    /// Nothing (the last chunk's, which carries `finish_reason`).
    pub fn empty() -> Self {
        Self { role: None, content: None, tool_calls: None }
    }
}

pub(super) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(super) type SseTx = tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>;

/// Sends one `data:` JSON chunk; false once the client is gone.
pub(super) async fn send(tx: &SseTx, chunk: String) -> bool {
    tx.send(Ok(SseEvent::default().data(chunk))).await.is_ok()
}

/// An SSE response fed by `produce`, ending in `data: [DONE]`. When the client disconnects the
/// producer is dropped at once, which drops its engine receivers and so cancels the sequences.
pub(super) fn sse<F, Fut>(produce: F) -> Response
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
