//! What crosses between the HTTP side and the engine thread: [`Request`] in, [`Event`]s out,
//! through an [`EngineHandle`] that refuses what can never run ([`SubmitError`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use lmstack_core::{SamplingParams, StopConditions};
use tokio::sync::mpsc as tmpsc;

/// One generation request, already tokenized and validated by the API layer.
#[derive(Debug, Clone)]
pub struct Request {
    /// Request id (for logs).
    pub id: String,
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Sampling parameters.
    pub params: SamplingParams,
    /// `max_tokens` (0: only score the prompt), stop strings and tokens, `min_tokens`.
    pub stop: StopConditions,
    /// Report log-probabilities of generated tokens with this many alternatives.
    pub logprobs: Option<usize>,
    /// Report log-probabilities of prompt tokens with this many alternatives (`echo`).
    pub prompt_logprobs: Option<usize>,
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
    /// Give up (with [`Event::Failed`]) after this instant.
    pub deadline: Option<Instant>,
    /// What the output must match (a fresh constraint; each choice gets its own copy).
    pub constraint: Option<lmstack_core::Constraint>,
}

/// A token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// The token's own text.
    pub text: String,
    /// Log-probability under the model.
    pub logprob: f32,
    /// Most likely tokens at this position: (id, text, log-probability).
    pub top: Vec<(u32, String, f32)>,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence, a stop string or a stop token.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    /// OpenAI's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What the engine streams back for one request.
#[derive(Debug, Clone)]
pub enum Event {
    /// Log-probabilities of the prompt tokens (the first has none); sent once, before tokens.
    Prompt(Vec<Option<TokenLogprob>>),
    /// One generated token: the text it released (may be empty while a multi-byte character
    /// or a possible stop string is incomplete) and, if asked, its log-probability.
    Token {
        /// Text released by this token.
        text: String,
        /// The token and its log-probability (when `logprobs` was asked for).
        logprob: Option<TokenLogprob>,
    },
    /// The end: any text still held back, why, and token counts.
    Finished {
        /// Text released at the end (held-back bytes).
        text: String,
        /// Why generation stopped.
        reason: FinishReason,
        /// Prompt tokens whose keys and values were copied from the prefix cache, not computed.
        cached_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The request failed; the message is safe to show.
    Failed {
        /// The deadline passed (rather than an internal fault).
        timeout: bool,
        /// What happened.
        message: String,
    },
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full.
    #[error("the server is overloaded: {0} requests are already waiting")]
    QueueFull(usize),
    /// The request can never fit.
    #[error("{0}")]
    TooLong(String),
    /// The engine has stopped (shutting down).
    #[error("the server is shutting down")]
    Stopped,
}

/// A cloneable handle to submit requests to the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    pub(super) tx: mpsc::Sender<(Request, tmpsc::UnboundedSender<Event>, Instant)>,
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) max_queued: usize,
    pub(super) max_len: usize,
    pub(super) kv_budget: usize,
    pub(super) stopped: Arc<AtomicBool>,
}

impl EngineHandle {
    /// Queues `req`; events arrive on the returned receiver. Dropping the receiver cancels the
    /// request at the next step.
    pub fn submit(&self, req: Request) -> Result<tmpsc::UnboundedReceiver<Event>, SubmitError> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(SubmitError::Stopped);
        }
        let need = req.prompt.len() + req.stop.max_tokens;
        if need > self.max_len {
            return Err(SubmitError::TooLong(format!(
                "this model's maximum context length is {} tokens, but {need} were requested ({} in the prompt, {} to \
                 generate); shorten the prompt or lower max_tokens",
                self.max_len,
                req.prompt.len(),
                req.stop.max_tokens
            )));
        }
        if need > self.kv_budget {
            return Err(SubmitError::TooLong(format!(
                "the request needs {need} KV-cache tokens but the server's whole budget is {} (--kv-cache-tokens)",
                self.kv_budget
            )));
        }
        let q = self.queued.fetch_add(1, Ordering::SeqCst);
        if q >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(q));
        }
        let (etx, erx) = tmpsc::unbounded_channel();
        if self.tx.send((req, etx, Instant::now())).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(erx)
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The model's context length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Refuses further requests (graceful shutdown); running ones finish.
    pub fn stop_accepting(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}
