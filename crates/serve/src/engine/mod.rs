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
//!    [`Decoding`], and streams the result to the client. Finished sequences leave at once.
//!
//! Model compute runs on this thread (and the rayon pool its matrix products use), never on
//! the async runtime that serves HTTP.

//!
//! Its parts: [`request`] (what crosses between the HTTP side and this thread), `scheduler`
//! (admission and batch planning, testable without a model), `seq` (a running sequence and its
//! phase), `prefix` (the prefix cache) and [`tuner`] (whether a step runs as two halves);
//! this file is the loop that drives them.

mod prefix;
pub mod request;
mod scheduler;
mod seq;
pub mod tuner;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use lmstack_core::sampling::logprobs_of;
use lmstack_core::tokenizer::common_prefix;
use lmstack_core::{Decoding, Finish, KvCache, Model, SeqStep, StepThreads, Tokenizer};
use tokio::sync::mpsc as tmpsc;

use crate::metrics::Metrics;
use prefix::PrefixCache;
pub use request::{EngineHandle, Event, FinishReason, Request, SubmitError, TokenLogprob};
use seq::{Phase, Seq, Share, Waiting};
pub use tuner::{SplitSteps, SplitTuner, SPLIT_MIN_TOKENS};

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
        prefixes: PrefixCache::new(bytes_per_token),
        clock: 0,
        tuner: SplitTuner::default(),
    };
    let join = std::thread::Builder::new().name("lmstack-engine".into()).spawn(move || engine.run()).expect("spawn");
    (handle, join)
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
    /// Caches of finished sequences kept for prefix caching.
    prefixes: PrefixCache,
    /// Ticks at each admission; orders the prefix cache's uses and numbers sequences.
    clock: u64,
    /// [`SplitSteps::Auto`]'s measurements.
    tuner: SplitTuner,
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
            let c = &self.config;
            if !scheduler::admits(self.running.len(), self.reserved, reserve, c.max_num_seqs, self.kv_budget) {
                break;
            }
            let w = self.waiting.pop_front().expect("front exists");
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue_time.observe(w.arrived.elapsed().as_secs_f64());
            self.metrics.prompt_tokens.inc_by(w.req.prompt.len() as u64);
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
                Ok(d) => d.with_constraint(r.constraint.clone()),
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
                phase: share.map_or(Phase::Prefilling, Phase::Sharing),
                cache,
                decoding,
                prefilled: cached,
                cached,
                fed: Vec::new(),
                forced: Vec::new(),
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
        // Every prompt token is looked up (vLLM's count); at most all but the last can be found,
        // since its logits must be computed.
        self.metrics.prefix_cache_queries.inc_by(req.prompt.len() as u64);
        let limit = req.prompt.len().saturating_sub(1);
        let (best, from) = self.best_prefix(&req.prompt, limit);
        let pending = self
            .running
            .iter()
            .filter(|s| s.prefilling())
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
        let (mut best, mut from) = match self.prefixes.longest(prompt, limit) {
            Some((i, n)) => (n, Some(Donor::Kept(i))),
            None => (0, None),
        };
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
            Some(Donor::Kept(i)) => Some(self.prefixes.use_cache(i, self.clock)),
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
            let Phase::Sharing(share) = self.running[i].phase else { continue };
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
            (s.cache, s.prefilled, s.cached, s.phase) = (cache, n, n, Phase::Prefilling);
        }
    }

    /// Keeps a sequence's cache for prefix caching (when on and it holds anything); then
    /// evicts down to the budget.
    fn keep_prefix(&mut self, s: Seq) {
        if !self.config.prefix_caching || s.cache.is_empty() {
            return;
        }
        let ids = s.cached_ids();
        if ids.len() != s.cache.len() {
            tracing::error!(
                tokens = ids.len(),
                cached = s.cache.len(),
                "a sequence's cache and tokens disagree; not kept"
            );
            return;
        }
        self.prefixes.keep(ids, s.cache, self.clock);
        self.evict_prefixes();
    }

    /// Drops the least recently used kept caches until they fit in the budget's free part.
    fn evict_prefixes(&mut self) {
        self.prefixes.evict_to(self.kv_budget.saturating_sub(self.reserved));
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
        m.prefix_cache_tokens.set(self.prefixes.tokens() as i64);
    }

    /// One forward over a batch of decode tokens and prefill chunks.
    fn step(&mut self) {
        self.resolve_shares();
        let wants: Vec<_> = self.running.iter().map(Seq::want).collect();
        let scheduler::Batch { tokens: mut plan, prefill_tokens: n_prefill } =
            scheduler::plan(&wants, self.config.max_batch_tokens);
        drop(wants);
        let mut steps: Vec<SeqStep<'_>> = Vec::new();
        let mut idx = Vec::new();
        // Constrained sequences that sample after this step: their masks are computed while
        // the model runs it.
        let mut masks: Vec<&mut lmstack_core::Decoding> = Vec::new();
        for (i, (s, p)) in self.running.iter_mut().zip(&plan).enumerate() {
            if let Some((tokens, all_logits)) = p {
                let samples = matches!(s.phase, Phase::Decoding(_)) || s.prefilled + tokens.len() >= s.req.prompt.len();
                if samples && s.decoding.is_constrained() {
                    masks.push(&mut s.decoding);
                }
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
        let model = &self.model;
        let forward = |steps: &mut Vec<SeqStep<'_>>| {
            model.forward_cached_on(steps, threads).and_then(|ls| {
                ls.into_iter().map(|l| l.to_vec2::<f32>().map_err(Into::into)).collect::<lmstack_core::Result<Vec<_>>>()
            })
        };
        let result = if masks.is_empty() {
            forward(&mut steps)
        } else {
            std::thread::scope(|scope| {
                scope.spawn(move || masks.into_iter().for_each(lmstack_core::Decoding::prepare));
                forward(&mut steps)
            })
        };
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
        m.prompt_tokens_computed.inc_by(n_prefill as u64);
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
        if let Phase::Decoding(_) = s.phase {
            // The sampled token and any forced after it.
            s.fed.extend_from_slice(tokens);
            s.forced.clear();
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
        let finish = |f: Option<Finish>| match f {
            Some(Finish::Stop) => Some(FinishReason::Stop),
            Some(Finish::Length) => Some(FinishReason::Length),
            None => None,
        };
        if let Some(reason) = finish(step.finish) {
            return Outcome::Finished(reason);
        }
        if s.cache.len() + 1 > max_len {
            return Outcome::Finished(FinishReason::Length);
        }
        // Tokens the constraint forces next go out now and are fed with this one (not when
        // log-probabilities are asked for: the model's own for them are not computed).
        if s.req.logprobs.is_none() {
            let room = max_len - (s.cache.len() + 1);
            let forced = match s.decoding.forced(room) {
                Ok(f) => f,
                Err(e) => {
                    let _ = s.tx.send(Event::Failed { timeout: false, message: e.to_string() });
                    return Outcome::Finished(FinishReason::Stop);
                }
            };
            for f in forced {
                self.metrics.generation_tokens.inc();
                self.metrics.forced_tokens.inc();
                let _ = s.tx.send(Event::Token { text: f.text, logprob: None });
                if let Some(reason) = finish(f.finish) {
                    return Outcome::Finished(reason);
                }
                s.forced.push(f.sampled.token);
            }
        }
        s.phase = Phase::Decoding(step.sampled.token);
        Outcome::Continue
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
