//! The engine: one thread that owns the model and runs **continuous batching**.
//!
//! Requests arrive through an [`EngineHandle`] into a bounded waiting queue. Each step the
//! scheduler
//! 1. drops sequences whose client went away (their KV cache is freed at once) or whose
//!    deadline passed,
//! 2. admits waiting requests while there is room: at most `max_num_seqs` running, and the KV
//!    tokens each may need (prompt + `max_tokens`) within the KV budget,
//! 3. plans one batch of at most `max_batch_tokens` tokens: one **decode** token for every
//!    running sequence, then **prefill** chunks of the prompts not yet in cache (a long prompt
//!    is prefilled over several steps so decoding streams keep flowing),
//! 4. runs one packed forward over all of them ([`Model::forward_cached`], every sequence at its
//!    own position in its own cache), samples each sequence's next token with its own
//!    [`Sampler`], and streams the result to the client. Finished sequences leave at once.
//!
//! Model compute runs on this thread (and the rayon pool its matrix products use), never on
//! the async runtime that serves HTTP.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use lmstack_core::sampling::logprobs_of;
use lmstack_core::tokenizer::common_prefix;
use lmstack_core::{Decoding, Finish, KvCache, Model, SamplingParams, SeqStep, StepThreads, StopConditions, Tokenizer};
use tokio::sync::mpsc as tmpsc;

use crate::metrics::Metrics;

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most tokens (decode + prefill) in one forward step.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most requests waiting for a slot; beyond it requests are refused.
    pub max_queued: usize,
    /// KV-cache budget in tokens over all running sequences (0: `max_num_seqs` × context).
    pub kv_cache_tokens: usize,
    /// Whether a step of several sequences runs as two halves on two threads.
    pub split_steps: SplitSteps,
    /// Keep finished sequences' KV caches (within the budget's free part) and start a request
    /// whose prompt begins like one of them, or like a running sequence, from a copy of those
    /// tokens' keys and values instead of prefilling them again.
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            max_num_seqs: 32,
            max_queued: 256,
            kv_cache_tokens: 0,
            split_steps: SplitSteps::Auto,
            prefix_caching: true,
        }
    }
}

/// Whether the engine runs a step of several sequences of a small model as two halves on two
/// threads or on its own thread alone ([`Model::can_split`], [`Model::forward_cached_on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitSteps {
    /// Steps of at least 8 tokens (`SPLIT_MIN_TOKENS`) run whichever way this machine
    /// measures faster: a [`SplitTuner`] alternates the two over windows of such steps, keeps
    /// the one that generated more tokens per second, and measures again every few seconds.
    /// (A split step costs thread wake-ups and a core the HTTP side may need; whether its
    /// halves' saving is larger depends on the CPU and the load.) Smaller steps run alone.
    Auto,
    /// Split every step the model can.
    Always,
    /// The engine thread runs every such step alone.
    Never,
}

/// Tokens from which [`SplitSteps::Auto`] considers splitting a step: a smaller step's halves
/// take less time than the hand-off's thread wake-ups.
pub const SPLIT_MIN_TOKENS: usize = 8;

/// [`SplitSteps::Auto`]'s choice, by measurement. Over a trial, windows of `window` eligible
/// steps alternate between one thread and two halves (`pairs` windows each), each window
/// measured after `settle` steps in its mode so that the previous mode's after-effects fade;
/// a window's rate is the tokens of all steps started in it over the wall time from its first
/// measured step to the step after its last, so the cost a split puts on the rest of the
/// engine loop (sampling, streaming, a core taken from the HTTP side) counts as well as the
/// step itself. The mode with the higher median rate then runs for `hold` eligible steps, and
/// a new trial starts. An idle engine (a gap of over [`SplitTuner::MAX_GAP`] between steps)
/// starts the trial over, since the load after it may differ.
#[derive(Debug, Clone)]
pub struct SplitTuner {
    window: usize,
    settle: usize,
    pairs: usize,
    hold: usize,
    state: TunerState,
    last: Option<Instant>,
    chosen: Option<bool>,
}

#[derive(Debug, Clone)]
enum TunerState {
    Trying { split: bool, start: Option<Instant>, steps: usize, tokens: usize, rates: [Vec<f64>; 2] },
    Holding { split: bool, left: usize },
}

impl TunerState {
    /// A new trial whose first window runs `split`.
    fn trying(split: bool) -> Self {
        Self::Trying { split, start: None, steps: 0, tokens: 0, rates: [vec![], vec![]] }
    }
}

impl Default for SplitTuner {
    fn default() -> Self {
        Self::new(128, 16, 3, 4000)
    }
}

impl SplitTuner {
    /// A gap between steps longer than this starts the current trial over.
    pub const MAX_GAP: std::time::Duration = std::time::Duration::from_millis(50);

    /// A tuner with `window` eligible steps per measured window, each after `settle` unmeasured
    /// steps in its mode, `pairs` windows per mode per trial, and `hold` eligible steps between
    /// trials.
    pub fn new(window: usize, settle: usize, pairs: usize, hold: usize) -> Self {
        let state = TunerState::trying(false);
        Self { window: window.max(1), settle, pairs: pairs.max(1), hold, state, last: None, chosen: None }
    }

    /// Called as each step starts, at `now`, with its `tokens` and whether it could split;
    /// returns whether it runs as two halves. The gap that counts as idle runs from the end
    /// of the previous step ([`SplitTuner::after_step`]; without it, from its start).
    pub fn on_step(&mut self, now: Instant, tokens: usize, eligible: bool) -> bool {
        let gap = self.last.is_some_and(|l| now.saturating_duration_since(l) > Self::MAX_GAP);
        self.last = Some(now);
        match &mut self.state {
            TunerState::Holding { split, left } => {
                let choice = *split && eligible;
                if eligible {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        self.state = TunerState::trying(!*split);
                    }
                }
                choice
            }
            TunerState::Trying { split, start, steps, tokens: toks, rates } => {
                if gap {
                    // The engine idled: the load may differ now, so the trial starts over.
                    (*start, *steps, *toks) = (None, 0, 0);
                    rates.iter_mut().for_each(Vec::clear);
                }
                if *steps >= self.settle + self.window {
                    // This step starts after the window's last: close the window.
                    if let Some(t0) = *start {
                        let dt = now.saturating_duration_since(t0).as_secs_f64();
                        if dt > 0.0 {
                            rates[usize::from(*split)].push(*toks as f64 / dt);
                        }
                    }
                    (*start, *steps, *toks) = (None, 0, 0);
                    *split = !*split;
                    if rates.iter().all(|r| r.len() >= self.pairs) {
                        let [one, two] = rates.clone().map(median);
                        tracing::debug!(one_thread = one, two_halves = two, "split-step trial (tokens/s)");
                        self.state = TunerState::Holding { split: two > one, left: self.hold.max(1) };
                        self.chosen = Some(two > one);
                        // This step is the first of the hold (`last` is now: no gap).
                        return self.on_step(now, tokens, eligible);
                    }
                }
                if !eligible {
                    if start.is_some() {
                        *toks += tokens;
                    }
                    return false;
                }
                *steps += 1;
                if *steps > self.settle {
                    // Past the steps that let the previous mode's after-effects fade.
                    start.get_or_insert(now);
                    *toks += tokens;
                }
                *split
            }
        }
    }

    /// Called when a step (forward, sampling and streaming) has finished, at `now`: a long
    /// step is not an idle engine.
    pub fn after_step(&mut self, now: Instant) {
        self.last = Some(now);
    }

    /// Whether the last finished trial chose two halves (`None` until one has finished).
    pub fn chosen(&self) -> Option<bool> {
        self.chosen
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

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
    tx: mpsc::Sender<(Request, tmpsc::UnboundedSender<Event>, Instant)>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    max_len: usize,
    kv_budget: usize,
    stopped: Arc<AtomicBool>,
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

/// Starts the engine thread for `model`; it runs until every handle is dropped and all work is
/// done.
pub fn start(
    model: Model,
    tokenizer: Tokenizer,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let max_len = model.max_len();
    let kv_budget = if config.kv_cache_tokens == 0 { config.max_num_seqs * max_len } else { config.kv_cache_tokens };
    let queued = Arc::new(AtomicUsize::new(0));
    let handle = EngineHandle {
        tx,
        queued: queued.clone(),
        max_queued: config.max_queued,
        max_len,
        kv_budget,
        stopped: Arc::new(AtomicBool::new(false)),
    };
    metrics.kv_cache_capacity_tokens.set(kv_budget as i64);
    let bytes_per_token = model.new_cache().bytes_per_token();
    let engine = Engine {
        model,
        tokenizer,
        config,
        kv_budget,
        bytes_per_token,
        metrics,
        queued,
        rx,
        waiting: VecDeque::new(),
        running: Vec::new(),
        reserved: 0,
        prefixes: Vec::new(),
        prefix_tokens: 0,
        clock: 0,
        tuner: SplitTuner::default(),
    };
    let join = std::thread::Builder::new().name("lmstack-engine".into()).spawn(move || engine.run()).expect("spawn");
    (handle, join)
}

struct Waiting {
    req: Request,
    tx: tmpsc::UnboundedSender<Event>,
    arrived: Instant,
}

struct Seq {
    req: Request,
    tx: tmpsc::UnboundedSender<Event>,
    cache: KvCache,
    /// Sampling, detokenizing and the stop conditions.
    decoding: Decoding,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Prompt tokens copied from the prefix cache at admission.
    cached: usize,
    /// Generated tokens already in the cache (after the prompt's).
    fed: Vec<u32>,
    /// Last sampled token, not yet in the cache.
    pending: Option<u32>,
    prompt_lps: Vec<Option<TokenLogprob>>,
    arrived: Instant,
    last_token: Option<Instant>,
    reserve: usize,
    /// Identifies the sequence to others waiting on its prefill ([`Share`]).
    id: u64,
    /// Waiting for another sequence to prefill the beginning of this one's prompt.
    share: Option<Share>,
}

/// A sequence admitted while another was still prefilling a long common beginning of both
/// prompts (the `n` choices of one prompt; clients sending the same system prompt together):
/// it computes nothing until `donor` holds `want` of those tokens, then starts from a copy.
#[derive(Clone, Copy)]
struct Share {
    donor: u64,
    want: usize,
}

/// Fewest prompt tokens worth waiting on another sequence's prefill for, rather than computing
/// them beside it (waiting costs a step or more of latency).
const MIN_SHARED_PREFILL: usize = 16;

/// Where a prompt's cached beginning is: a kept cache or a running sequence (by index).
#[derive(Clone, Copy)]
enum Donor {
    Kept(usize),
    Running(usize),
}

struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    config: EngineConfig,
    kv_budget: usize,
    bytes_per_token: usize,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
    rx: mpsc::Receiver<(Request, tmpsc::UnboundedSender<Event>, Instant)>,
    waiting: VecDeque<Waiting>,
    running: Vec<Seq>,
    reserved: usize,
    /// Caches of finished sequences kept for prefix caching, and the tokens of room they hold.
    prefixes: Vec<Prefix>,
    prefix_tokens: usize,
    /// Ticks at each admission; orders [`Prefix::used`] and numbers sequences ([`Seq::id`]).
    clock: u64,
    /// [`SplitSteps::Auto`]'s measurements.
    tuner: SplitTuner,
}

/// A finished sequence's KV cache, kept for requests whose prompts begin with its tokens.
struct Prefix {
    /// The tokens whose keys and values `cache` holds.
    ids: Vec<u32>,
    cache: KvCache,
    /// Tokens of room the cache's storage takes.
    room: usize,
    /// [`Engine::clock`] at its last use: the least recently used is evicted first.
    used: u64,
}

enum Outcome {
    Continue,
    Finished(FinishReason),
}

impl Engine {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok((req, tx, arrived)) => self.waiting.push_back(Waiting { req, tx, arrived }),
                    Err(_) => break,
                }
            }
            while let Ok((req, tx, arrived)) = self.rx.try_recv() {
                self.waiting.push_back(Waiting { req, tx, arrived });
            }
            self.reap();
            self.admit();
            if !self.running.is_empty() {
                self.step();
                self.tuner.after_step(Instant::now());
            }
            self.update_gauges();
        }
        self.update_gauges();
    }

    /// Drops cancelled and timed-out requests, running or waiting.
    fn reap(&mut self) {
        let now = Instant::now();
        let expired = |r: &Request| r.deadline.is_some_and(|d| now >= d);
        let before = self.waiting.len();
        self.waiting.retain(|w| {
            if expired(&w.req) {
                let _ = w.tx.send(Event::Failed {
                    timeout: true,
                    message: "the request timed out while waiting in the queue".into(),
                });
                return false;
            }
            !w.tx.is_closed()
        });
        self.queued.fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.tx.is_closed() {
                self.metrics.cancelled.inc();
                let s = self.remove(i);
                self.keep_prefix(s);
            } else if expired(&s.req) {
                let _ = s.tx.send(Event::Failed { timeout: true, message: "the request timed out".into() });
                let s = self.remove(i);
                self.keep_prefix(s);
            } else {
                i += 1;
            }
        }
    }

    fn remove(&mut self, i: usize) -> Seq {
        let s = self.running.remove(i);
        self.reserved -= s.reserve;
        s
    }

    fn admit(&mut self) {
        while let Some(w) = self.waiting.front() {
            let reserve = w.req.prompt.len() + w.req.stop.max_tokens;
            if self.running.len() >= self.config.max_num_seqs || self.reserved + reserve > self.kv_budget {
                break;
            }
            let w = self.waiting.pop_front().expect("front exists");
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue_time.observe(w.arrived.elapsed().as_secs_f64());
            let top = w.req.logprobs.unwrap_or(0);
            let r = &w.req;
            let decoding = match Decoding::new(
                &self.tokenizer,
                r.params.clone(),
                &r.prompt,
                top,
                r.stop.clone(),
                r.skip_special_tokens,
            ) {
                Ok(d) => d,
                Err(e) => {
                    let _ = w.tx.send(Event::Failed { timeout: false, message: e.to_string() });
                    continue;
                }
            };
            self.reserved += reserve;
            let (cache, cached, share) = self.prefix_for(&w.req, reserve);
            self.evict_prefixes();
            self.running.push(Seq {
                id: self.clock,
                share,
                cache,
                decoding,
                prefilled: cached,
                cached,
                fed: Vec::new(),
                pending: None,
                prompt_lps: Vec::new(),
                arrived: w.arrived,
                last_token: None,
                reserve,
                req: w.req,
                tx: w.tx,
            });
        }
    }

    /// A cache for a new request expected to reach `reserve` tokens: a copy of the longest
    /// beginning of its prompt found among the kept caches and the running sequences (at most
    /// all but the prompt's last token, whose logits are needed), or an empty one. Returns it
    /// with the number of prompt tokens it holds — or, where a running sequence is still
    /// prefilling a beginning longer by [`MIN_SHARED_PREFILL`] or more, an empty cache and a
    /// [`Share`] to wait for that sequence instead of computing the same tokens beside it.
    fn prefix_for(&mut self, req: &Request, reserve: usize) -> (KvCache, usize, Option<Share>) {
        self.clock += 1;
        // Prompt log-probabilities need every prompt token's logits, so nothing is skipped.
        if !self.config.prefix_caching || req.prompt_logprobs.is_some() {
            let (cache, n) = self.fork_from(None, 0, reserve);
            return (cache, n, None);
        }
        let limit = req.prompt.len().saturating_sub(1);
        self.metrics.prefix_cache_queries.inc_by(limit as u64);
        let (best, from) = self.best_prefix(&req.prompt, limit);
        let pending = self
            .running
            .iter()
            .filter(|s| s.share.is_none() && s.prefilled < s.req.prompt.len())
            .map(|s| (common_prefix(&s.req.prompt, &req.prompt).min(limit), s.id))
            .max_by_key(|&(want, _)| want);
        if let Some((want, donor)) = pending.filter(|&(want, _)| want >= best + MIN_SHARED_PREFILL) {
            let (cache, n) = self.fork_from(None, 0, reserve);
            return (cache, n, Some(Share { donor, want }));
        }
        let (cache, n) = self.fork_from(from, best, reserve);
        (cache, n, None)
    }

    /// The longest beginning of `prompt`, at most `limit` tokens, held by a kept cache or a
    /// running sequence, and where.
    fn best_prefix(&self, prompt: &[u32], limit: usize) -> (usize, Option<Donor>) {
        let (mut best, mut from) = (0, None);
        for (i, p) in self.prefixes.iter().enumerate() {
            let n = common_prefix(&p.ids, prompt).min(limit).min(p.cache.len());
            if n > best {
                (best, from) = (n, Some(Donor::Kept(i)));
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            // A running sequence's cache holds its prompt's prefilled tokens, then its output's.
            let mut n = common_prefix(&s.req.prompt[..s.prefilled], prompt);
            if n == s.req.prompt.len() {
                n += common_prefix(&s.fed, &prompt[n..]);
            }
            let n = n.min(limit);
            if n > best {
                (best, from) = (n, Some(Donor::Running(i)));
            }
        }
        (best, from)
    }

    /// A copy of the first `n` tokens of `from`'s cache with room for `reserve`, counted as
    /// cache hits; an empty cache where there is nothing to copy (or the copy fails).
    fn fork_from(&mut self, from: Option<Donor>, n: usize, reserve: usize) -> (KvCache, usize) {
        let donor = match from {
            Some(_) if n == 0 => None,
            Some(Donor::Kept(i)) => {
                self.prefixes[i].used = self.clock;
                Some(&self.prefixes[i].cache)
            }
            Some(Donor::Running(i)) => Some(&self.running[i].cache),
            None => None,
        };
        if let Some(donor) = donor {
            match donor.fork_prefix(n, reserve) {
                Ok(cache) => {
                    self.metrics.prefix_cache_hits.inc_by(n as u64);
                    return (cache, n);
                }
                Err(e) => tracing::error!(error = %e, "copying a cached prefix failed; prefilling the whole prompt"),
            }
        }
        let mut cache = self.model.new_cache();
        cache.expect_tokens(reserve);
        (cache, 0)
    }

    /// Sequences waiting on another's prefill ([`Share`]) start from a copy of its cache once it
    /// holds what they wait for; if it has left (finished, cancelled), from whatever beginning
    /// of their prompt is found now.
    fn resolve_shares(&mut self) {
        for i in 0..self.running.len() {
            let Some(share) = self.running[i].share else { continue };
            let donor = self.running.iter().position(|s| s.id == share.donor);
            let (from, n) = match donor {
                Some(d) if self.running[d].prefilled < share.want => continue,
                Some(d) => (Some(Donor::Running(d)), share.want),
                None => {
                    let prompt = &self.running[i].req.prompt;
                    let (n, from) = self.best_prefix(prompt, prompt.len().saturating_sub(1));
                    (from, n)
                }
            };
            let (cache, n) = self.fork_from(from, n, self.running[i].reserve);
            let s = &mut self.running[i];
            (s.cache, s.prefilled, s.cached, s.share) = (cache, n, n, None);
        }
    }

    /// Keeps a sequence's cache for prefix caching (when on and it holds anything), replacing
    /// a kept cache whose tokens it begins with; then evicts down to the budget.
    fn keep_prefix(&mut self, s: Seq) {
        if !self.config.prefix_caching || s.cache.is_empty() {
            return;
        }
        let mut ids = s.req.prompt[..s.prefilled].to_vec();
        if s.prefilled == s.req.prompt.len() {
            ids.extend_from_slice(&s.fed);
        }
        if ids.len() != s.cache.len() {
            tracing::error!(
                tokens = ids.len(),
                cached = s.cache.len(),
                "a sequence's cache and tokens disagree; not kept"
            );
            return;
        }
        // A kept cache that is a beginning of this one serves no request this one cannot; one
        // this is a beginning of makes this one redundant.
        if let Some(p) = self.prefixes.iter_mut().find(|p| common_prefix(&p.ids, &ids) == ids.len()) {
            p.used = self.clock;
            return;
        }
        let mut freed = 0;
        self.prefixes.retain(|p| {
            let covered = common_prefix(&p.ids, &ids) == p.ids.len();
            if covered {
                freed += p.room;
            }
            !covered
        });
        self.prefix_tokens -= freed;
        let room = s.cache.allocated_bytes().div_ceil(self.bytes_per_token.max(1));
        self.prefix_tokens += room;
        self.prefixes.push(Prefix { ids, cache: s.cache, room, used: self.clock });
        self.evict_prefixes();
    }

    /// Drops the least recently used kept caches until they fit in the budget's free part.
    fn evict_prefixes(&mut self) {
        while self.reserved + self.prefix_tokens > self.kv_budget && !self.prefixes.is_empty() {
            let lru = (0..self.prefixes.len()).min_by_key(|&i| self.prefixes[i].used).expect("not empty");
            let p = self.prefixes.swap_remove(lru);
            self.prefix_tokens -= p.room;
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.queue_length.set(self.waiting.len() as i64);
        m.running.set(self.running.len() as i64);
        let used: usize = self.running.iter().map(|s| s.cache.len()).sum();
        m.kv_cache_used_tokens.set(used as i64);
        m.kv_cache_used_bytes.set((used * self.bytes_per_token) as i64);
        m.kv_cache_usage.set(used as f64 / self.kv_budget.max(1) as f64);
        m.kv_cache_reserved_tokens.set(self.reserved as i64);
        m.prefix_cache_tokens.set(self.prefix_tokens as i64);
    }

    /// One forward over a batch of decode tokens and prefill chunks.
    fn step(&mut self) {
        self.resolve_shares();
        let mut budget = self.config.max_batch_tokens;
        let mut plan: Vec<Option<(Vec<u32>, bool)>> = vec![None; self.running.len()];
        let mut n_prefill = 0;
        for (p, s) in plan.iter_mut().zip(&self.running) {
            if let Some(t) = s.pending {
                *p = Some((vec![t], false));
                budget = budget.saturating_sub(1);
            }
        }
        for (p, s) in plan.iter_mut().zip(&self.running) {
            if budget == 0 {
                break;
            }
            if s.pending.is_none() && s.share.is_none() && s.prefilled < s.req.prompt.len() {
                let n = (s.req.prompt.len() - s.prefilled).min(budget);
                *p = Some((s.req.prompt[s.prefilled..s.prefilled + n].to_vec(), s.req.prompt_logprobs.is_some()));
                budget -= n;
                n_prefill += n;
            }
        }
        let mut steps: Vec<SeqStep<'_>> = Vec::new();
        let mut idx = Vec::new();
        for (i, (s, p)) in self.running.iter_mut().zip(&plan).enumerate() {
            if let Some((tokens, all_logits)) = p {
                steps.push(SeqStep { tokens, cache: &mut s.cache, all_logits: *all_logits });
                idx.push(i);
            }
        }
        if steps.is_empty() {
            return;
        }
        let n_tokens: usize = steps.iter().map(|s| s.tokens.len()).sum();
        // A step the model could split runs as two halves only where that pays ([`SplitSteps`]);
        // otherwise on this thread alone. A larger model spreads each product (`Auto`).
        let can_split = self.model.can_split(&steps);
        let t0 = Instant::now();
        let split = match self.config.split_steps {
            SplitSteps::Always => can_split,
            SplitSteps::Never => false,
            SplitSteps::Auto => self.tuner.on_step(t0, n_tokens, can_split && n_tokens >= SPLIT_MIN_TOKENS),
        };
        let threads = if can_split && !split { StepThreads::One } else { StepThreads::Auto };
        let result = self.model.forward_cached_on(&mut steps, threads).and_then(|ls| {
            ls.into_iter().map(|l| l.to_vec2::<f32>().map_err(Into::into)).collect::<lmstack_core::Result<Vec<_>>>()
        });
        drop(steps);
        let dt = t0.elapsed().as_secs_f64();
        let m = &self.metrics;
        if split {
            m.split_steps.inc();
        }
        m.batch_size.observe(idx.len() as f64);
        m.batch_tokens.observe(n_tokens as f64);
        if n_prefill > 0 {
            m.prefill_step.observe(dt);
        } else {
            m.decode_step.observe(dt);
        }
        m.prompt_tokens.inc_by(n_prefill as u64);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward step failed");
                let mut failed: Vec<usize> = idx;
                failed.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in failed {
                    let s = self.remove(i);
                    let _ = s.tx.send(Event::Failed {
                        timeout: false,
                        message: "internal error while running the model".into(),
                    });
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (&i, rows) in idx.iter().zip(logits) {
            let (tokens, _) = plan[i].take().expect("planned");
            match self.advance(i, &tokens, rows) {
                Outcome::Continue => {}
                Outcome::Finished(reason) => finished.push((i, reason)),
            }
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let mut s = self.remove(i);
            self.finish(&mut s, reason);
            self.keep_prefix(s);
        }
    }

    /// Takes one sequence's logits from the step and samples or records as needed.
    fn advance(&mut self, i: usize, tokens: &[u32], rows: Vec<Vec<f32>>) -> Outcome {
        // Disjoint borrows: no per-token clone of the tokenizer on this hot path.
        let tok = &self.tokenizer;
        let max_len = self.model.max_len();
        let s = &mut self.running[i];
        if let Some(t) = s.pending.take() {
            s.fed.push(t);
        } else {
            // A prefill chunk.
            let start = s.prefilled;
            s.prefilled += tokens.len();
            if let Some(top) = s.req.prompt_logprobs {
                if start == 0 {
                    s.prompt_lps.push(None);
                }
                for (r, row) in rows.iter().enumerate() {
                    let p = start + r + 1;
                    if p < s.req.prompt.len() {
                        s.prompt_lps.push(Some(token_logprob(tok, row, s.req.prompt[p], top)));
                    }
                }
            }
            if s.prefilled < s.req.prompt.len() {
                return Outcome::Continue;
            }
            if s.req.prompt_logprobs.is_some() {
                let _ = s.tx.send(Event::Prompt(std::mem::take(&mut s.prompt_lps)));
            }
            if s.req.stop.max_tokens == 0 {
                return Outcome::Finished(FinishReason::Length);
            }
        }
        let row = rows.last().expect("at least one row");
        let step = match s.decoding.step(row) {
            Ok(x) => x,
            Err(e) => {
                let _ = s.tx.send(Event::Failed { timeout: false, message: e.to_string() });
                return Outcome::Finished(FinishReason::Stop);
            }
        };
        let now = Instant::now();
        match s.last_token {
            None => self.metrics.ttft.observe((now - s.arrived).as_secs_f64()),
            Some(t) => self.metrics.itl.observe((now - t).as_secs_f64()),
        }
        s.last_token = Some(now);
        self.metrics.generation_tokens.inc();
        let sampled = &step.sampled;
        let logprob = s.req.logprobs.map(|_| TokenLogprob {
            id: sampled.token,
            text: piece(tok, sampled.token),
            logprob: sampled.logprob,
            top: sampled.top_logprobs.iter().map(|&(id, lp)| (id, piece(tok, id), lp)).collect(),
        });
        let _ = s.tx.send(Event::Token { text: step.text, logprob });
        match step.finish {
            Some(Finish::Stop) => Outcome::Finished(FinishReason::Stop),
            Some(Finish::Length) => Outcome::Finished(FinishReason::Length),
            None if s.cache.len() + 1 > max_len => Outcome::Finished(FinishReason::Length),
            None => {
                s.pending = Some(step.sampled.token);
                Outcome::Continue
            }
        }
    }

    fn finish(&self, s: &mut Seq, reason: FinishReason) {
        let text = s.decoding.finish();
        self.metrics.e2e.observe(s.arrived.elapsed().as_secs_f64());
        self.metrics.finished.with_label_values(&[reason.as_str()]).inc();
        let completion_tokens = s.decoding.generated();
        let _ = s.tx.send(Event::Finished { text, reason, cached_tokens: s.cached, completion_tokens });
    }
}

/// The text of one token on its own (as OpenAI's `logprobs.tokens` reports it).
pub(crate) fn piece(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

fn token_logprob(tok: &Tokenizer, row: &[f32], id: u32, top: usize) -> TokenLogprob {
    let (logprob, top) = logprobs_of(row, id, top);
    TokenLogprob {
        id,
        text: piece(tok, id),
        logprob,
        top: top.into_iter().map(|(t, l)| (t, piece(tok, t), l)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a tuner steps of 16 tokens from `start`, each lasting as long as its mode takes;
    /// returns the choices it made once a trial had finished, and the time it ends at.
    fn drive_from(
        t: &mut SplitTuner,
        start: Instant,
        steps: usize,
        ms_one: f64,
        ms_two: f64,
    ) -> ((usize, usize), Instant) {
        let mut now = start;
        let (mut split, mut alone) = (0, 0);
        for _ in 0..steps {
            let two = t.on_step(now, 16, true);
            if t.chosen().is_some() {
                *(if two { &mut split } else { &mut alone }) += 1;
            }
            now += std::time::Duration::from_secs_f64(if two { ms_two } else { ms_one } / 1e3);
        }
        ((split, alone), now)
    }

    #[test]
    fn auto_keeps_whichever_mode_generates_faster_and_measures_again() {
        // Two halves faster: after the first trial nearly every step splits.
        let mut t = SplitTuner::new(8, 2, 3, 200);
        let ((split, alone), _) = drive_from(&mut t, Instant::now(), 1000, 1.6, 1.1);
        assert_eq!(t.chosen(), Some(true));
        assert!(split > 5 * alone, "{split} split, {alone} alone");
        // One thread faster (e.g. the halves wait for a core): it settles on one thread.
        let mut t = SplitTuner::new(8, 2, 3, 200);
        let ((split, alone), end) = drive_from(&mut t, Instant::now(), 1000, 1.0, 1.3);
        assert_eq!(t.chosen(), Some(false));
        assert!(alone > 5 * split, "{split} split, {alone} alone");
        // The machine changes: the next trials follow.
        let ((split, _), _) = drive_from(&mut t, end, 1000, 1.6, 1.1);
        assert!(split > 500 && t.chosen() == Some(true), "{split}");
        // Steps too small to split never do.
        let mut t = SplitTuner::new(4, 0, 1, 10);
        let mut now = Instant::now();
        assert!(!t.on_step(now, 3, false));
        // An idle second inside a window is not measured as a slow window: the step after it
        // measures the same mode again, and the faster mode still wins.
        let ms = std::time::Duration::from_millis(1);
        for _ in 0..4 {
            assert!(!t.on_step(now, 16, true));
            now += ms;
        }
        now += std::time::Duration::from_secs(1);
        assert!(!t.on_step(now, 16, true), "the window before the gap was closed");
        drive_from(&mut t, now, 100, 1.0, 1.3);
        assert_eq!(t.chosen(), Some(false));
        // A long step is not idleness: a step of 80 ms ended just before the next keeps the
        // window (it closes on schedule and the trial moves on to the other mode).
        let mut t = SplitTuner::new(2, 0, 2, 10);
        let now = Instant::now();
        assert!(!t.on_step(now, 16, true));
        t.after_step(now + std::time::Duration::from_millis(80));
        assert!(!t.on_step(now + std::time::Duration::from_millis(81), 16, true));
        t.after_step(now + std::time::Duration::from_millis(161));
        assert!(t.on_step(now + std::time::Duration::from_millis(162), 16, true), "the window closed, two halves next");
    }

    #[test]
    fn split_steps_names() {
        use clap::ValueEnum;
        assert_eq!(SplitSteps::from_str("never", false), Ok(SplitSteps::Never));
        assert_eq!(SplitSteps::from_str("always", false), Ok(SplitSteps::Always));
        assert!(SplitSteps::from_str("sometimes", false).is_err());
        let names: Vec<String> = SplitSteps::value_variants()
            .iter()
            .filter_map(|v| Some(v.to_possible_value()?.get_name().to_string()))
            .collect();
        assert!(names.join(", ").contains("auto, always, never"), "{names:?}");
    }
}
