//! A request inside the engine: waiting for a slot ([`Waiting`]), then a running sequence
//! ([`Seq`]) moving through its [`Phase`]s.

use std::time::Instant;

use lmstack_core::{Decoding, KvCache};
use tokio::sync::mpsc as tmpsc;

use super::request::{Event, Request, TokenLogprob};
use super::scheduler::Want;

/// A request in the waiting queue.
pub(super) struct Waiting {
    pub req: Request,
    pub tx: tmpsc::UnboundedSender<Event>,
    pub arrived: Instant,
}

/// Where a running sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Computing nothing until another sequence has prefilled a long beginning of this one's
    /// prompt, which it then starts from a copy of.
    Sharing(Share),
    /// Its prompt goes into the cache, a chunk per step ([`Seq::prefilled`] tokens so far).
    Prefilling,
    /// Generating: the token sampled last, which the next step feeds.
    Decoding(u32),
}

/// A sequence admitted while another was still prefilling a long common beginning of both
/// prompts (the `n` choices of one prompt; clients sending the same system prompt together):
/// it computes nothing until `donor` holds `want` of those tokens, then starts from a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Share {
    pub donor: u64,
    pub want: usize,
}

/// A running sequence.
pub(super) struct Seq {
    pub req: Request,
    pub tx: tmpsc::UnboundedSender<Event>,
    pub phase: Phase,
    pub cache: KvCache,
    /// Sampling, detokenizing and the stop conditions.
    pub decoding: Decoding,
    /// Prompt tokens already in the cache.
    pub prefilled: usize,
    /// Prompt tokens copied from the prefix cache at admission.
    pub cached: usize,
    /// Generated tokens already in the cache (after the prompt's).
    pub fed: Vec<u32>,
    /// Tokens the output constraint forced after the last sampled one, fed with it next step.
    pub forced: Vec<u32>,
    pub prompt_lps: Vec<Option<TokenLogprob>>,
    pub arrived: Instant,
    pub last_token: Option<Instant>,
    /// KV-cache tokens reserved for it (prompt + `max_tokens`).
    pub reserve: usize,
    /// Identifies the sequence to others waiting on its prefill ([`Share`]).
    pub id: u64,
}

impl Seq {
    /// Whether it is still putting its prompt into the cache by itself (not waiting on
    /// another's prefill).
    pub fn prefilling(&self) -> bool {
        self.phase == Phase::Prefilling && self.prefilled < self.req.prompt.len()
    }

    /// What it needs from the next step.
    pub fn want(&self) -> Want<'_> {
        match self.phase {
            Phase::Decoding(token) => Want::Decode { token, forced: &self.forced },
            Phase::Prefilling if self.prefilled < self.req.prompt.len() => Want::Prefill {
                rest: &self.req.prompt[self.prefilled..],
                all_logits: self.req.prompt_logprobs.is_some(),
            },
            _ => Want::Nothing,
        }
    }

    /// The tokens whose keys and values its cache holds: the prefilled prompt, then, once the
    /// whole prompt is in, the generated tokens fed back.
    pub fn cached_ids(&self) -> Vec<u32> {
        let mut ids = self.req.prompt[..self.prefilled].to_vec();
        if self.prefilled == self.req.prompt.len() {
            ids.extend_from_slice(&self.fed);
        }
        ids
    }
}
