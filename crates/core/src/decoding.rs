//! One sequence's decoding: the sampler, the incremental detokenizer, the stop conditions
//! (end-of-sequence, stop tokens, stop strings with the text that might begin one held back,
//! `min_tokens`, `max_tokens`) and the log-probabilities of what was chosen. Everything that
//! turns a model's logits into a stream of text goes through [`Decoding`]: `serve`'s engine
//! (many sequences in one step), the eval's local backend (batches of prompts) and `train
//! sample` ([`generate`], one sequence).
//!
//! The model step is the caller's: a [`Decoding`] sees one row of logits per generated token
//! and says what text it releases and whether the sequence is finished.

use crate::constraint::Constraint;
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::{Model, Result, SeqStep};

/// When a sequence stops, besides the caller's own limits (the context length).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopConditions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation; not included in the output unless `include_stop_str`.
    pub stop: Vec<String>,
    /// Keep the stop string that ended generation at the end of the output (vLLM's
    /// `include_stop_str_in_output`).
    pub include_stop_str: bool,
    /// Generate at least this many tokens: until then end-of-sequence and the stop tokens are
    /// not sampled and stop strings are not looked for (vLLM's `min_tokens`).
    pub min_tokens: usize,
    /// Token ids that end generation (besides end-of-sequence).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence.
    pub ignore_eos: bool,
}

impl StopConditions {
    /// At most `max_tokens` tokens, ending at end-of-sequence.
    pub fn max_tokens(max_tokens: usize) -> Self {
        Self { max_tokens, ..Default::default() }
    }
}

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence, a stop string or a stop token.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

/// What one generated token did.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The token, its log-probability and the alternatives asked for.
    pub sampled: Sampled,
    /// Text this token released: empty while a multi-byte character or a possible stop string
    /// is incomplete, and for end-of-sequence and stop tokens.
    pub text: String,
    /// Set when the sequence is finished; [`Decoding::finish`] then gives any text still held.
    pub finish: Option<Finish>,
}

/// One sequence's decoding state.
#[derive(Debug)]
pub struct Decoding {
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopConditions,
    eos: Option<u32>,
    generated: usize,
    /// Output text decoded so far (truncated at a stop string) and how much of it was released.
    text: String,
    sent: usize,
    /// A stop string ended the output.
    stop_hit: bool,
    /// What the output must match, if anything.
    constraint: Option<Constraint>,
}

impl Decoding {
    /// Decoding after `prompt` (whose tokens the repetition penalty counts) with `params`,
    /// reporting `top_logprobs` alternatives per token; special tokens are left out of the text
    /// when `skip_special_tokens`.
    pub fn new(
        tok: &Tokenizer,
        params: SamplingParams,
        prompt: &[u32],
        top_logprobs: usize,
        stop: StopConditions,
        skip_special_tokens: bool,
    ) -> Result<Decoding> {
        Ok(Decoding {
            sampler: Sampler::new(params, prompt, top_logprobs)?,
            decoder: tok.incremental_decoder(skip_special_tokens),
            eos: tok.eos_id(),
            stop,
            generated: 0,
            text: String::new(),
            sent: 0,
            stop_hit: false,
            constraint: None,
        })
    }

    /// Only tokens `constraint` allows are sampled; the sequence stops when its output is
    /// complete.
    pub fn with_constraint(mut self, constraint: Option<Constraint>) -> Self {
        self.constraint = constraint;
        self
    }

    /// Whether the output is constrained.
    pub fn is_constrained(&self) -> bool {
        self.constraint.is_some()
    }

    /// Computes the constraint's next mask ahead of [`Decoding::step`] (see
    /// [`Constraint::prepare`]): a caller may run it beside the model's forward pass.
    pub fn prepare(&mut self) {
        if let Some(c) = &mut self.constraint {
            c.prepare();
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Chooses the next token from `logits` (one vocabulary-sized row) and applies the stop
    /// conditions.
    pub fn step(&mut self, logits: &[f32]) -> Result<Step> {
        let eos = self.eos.filter(|_| !self.stop.ignore_eos);
        let banned: Vec<u32> = if self.generated < self.stop.min_tokens {
            self.stop.stop_token_ids.iter().copied().chain(eos).collect()
        } else {
            Vec::new()
        };
        let sampled = match &mut self.constraint {
            Some(c) => {
                let mut masked = logits.to_vec();
                c.mask(&mut masked)?;
                let sampled = self.sampler.sample_except(&masked, &banned)?;
                c.commit(sampled.token)?;
                sampled
            }
            None => self.sampler.sample_except(logits, &banned)?,
        };
        self.accept(sampled)
    }

    /// The tokens the constraint forces next (where its grammar allows one continuation only:
    /// a JSON key, the punctuation between values, a tool call's name), at most `limit`, taken
    /// as generated without asking the model: the caller feeds them with the sampled token in
    /// one step (fast-forward). Their `logprob` is 0 (certain under the constraint; the model's
    /// own is not computed), so callers reporting log-probabilities should not fast-forward.
    /// Empty without a constraint, or once the sequence is finished.
    pub fn forced(&mut self, limit: usize) -> Result<Vec<Step>> {
        let mut out = Vec::new();
        let Some(c) = &mut self.constraint else { return Ok(out) };
        let room = limit.min(self.stop.max_tokens.saturating_sub(self.generated));
        if room == 0 || c.is_finished() {
            return Ok(out);
        }
        let tokens = c.forced();
        for t in tokens.into_iter().take(room) {
            if let Some(c) = &mut self.constraint {
                c.commit(t)?;
            }
            self.sampler.observe(t);
            let step = self.accept(Sampled { token: t, logprob: 0.0, top_logprobs: Vec::new() })?;
            let done = step.finish.is_some();
            out.push(step);
            if done {
                break;
            }
        }
        Ok(out)
    }

    /// Counts a chosen token and applies the stop conditions.
    fn accept(&mut self, sampled: Sampled) -> Result<Step> {
        let eos = self.eos.filter(|_| !self.stop.ignore_eos);
        self.generated += 1;
        if Some(sampled.token) == eos || self.stop.stop_token_ids.contains(&sampled.token) {
            return Ok(Step { sampled, text: String::new(), finish: Some(Finish::Stop) });
        }
        let piece = self.decoder.push(sampled.token)?.unwrap_or_default();
        let (text, stopped) = self.push_text(&piece);
        let complete = self.constraint.as_ref().is_some_and(Constraint::is_finished);
        let finish = if stopped || complete {
            Some(Finish::Stop)
        } else if self.generated >= self.stop.max_tokens {
            Some(Finish::Length)
        } else {
            None
        };
        Ok(Step { sampled, text, finish })
    }

    /// Ends the sequence: the text still held back (incomplete bytes, a possible beginning of
    /// a stop string that never completed); nothing after a stop string.
    pub fn finish(&mut self) -> String {
        let mut text = String::new();
        if self.stop_hit {
            return text;
        }
        if let Ok(Some(rest)) = self.decoder.finish() {
            let (t, _) = self.push_text(&rest);
            text.push_str(&t);
        }
        if !self.stop_hit && self.sent < self.text.len() {
            text.push_str(&self.text[self.sent..]);
            self.sent = self.text.len();
        }
        text
    }

    /// Appends decoded text; returns the text that may be released now and whether a stop
    /// string ended the output.
    fn push_text(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        let stops = &self.stop.stop;
        // Before `min_tokens` (this token counted) stop strings are not looked for.
        if stops.is_empty() || self.generated < self.stop.min_tokens {
            let out = self.text[self.sent..].to_owned();
            self.sent = self.text.len();
            return (out, false);
        }
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        let from = floor_char_boundary(&self.text, self.sent.saturating_sub(longest));
        // The earliest stop string that takes in new text (one wholly inside text already
        // released, as after `min_tokens`, does not count), and where the output ends with it.
        let hit = stops
            .iter()
            .filter_map(|st| {
                let mut p = from;
                while let Some(i) = self.text[p..].find(st.as_str()) {
                    let start = p + i;
                    if start + st.len() > self.sent {
                        return Some((start, start + st.len()));
                    }
                    // Occurrences may overlap: go on from the next character.
                    p = start + self.text[start..].chars().next().map_or(1, char::len_utf8);
                }
                None
            })
            .min();
        if let Some((start, end)) = hit {
            let pos = if self.stop.include_stop_str { end } else { start }.max(self.sent);
            let out = self.text[self.sent..pos].to_owned();
            self.text.truncate(pos);
            self.sent = pos;
            self.stop_hit = true;
            return (out, true);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let mut release = self.text.len();
        for (p, _) in self.text[self.sent..].char_indices() {
            let tail = &self.text[self.sent + p..];
            if stops.iter().any(|st| st.starts_with(tail)) {
                release = self.sent + p;
                break;
            }
        }
        let out = self.text[self.sent..release].to_owned();
        self.sent = release;
        (out, false)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Generates after `prompt` with `model` (a frozen, inference model), one sequence, handing
/// each piece of released text to `on_text`; returns the whole text. When the context fills
/// up, the window slides: the last half is prefilled again (as nanoGPT crops its context).
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    params: SamplingParams,
    stop: StopConditions,
    mut on_text: impl FnMut(&str),
) -> Result<String> {
    let mut ids = prompt.to_vec();
    if ids.is_empty() {
        ids.push(tok.bos_id().unwrap_or(0));
    }
    let max = model.max_len();
    let mut cache = model.new_cache();
    let mut dec = Decoding::new(tok, params, &ids, 0, stop, true)?;
    let mut text = String::new();
    let mut next = ids.clone();
    if dec.stop.max_tokens > 0 {
        loop {
            if cache.len() + next.len() > max {
                next = ids[ids.len().saturating_sub(max / 2)..].to_vec();
                cache.clear();
            }
            let logits =
                model.forward_cached(&mut [SeqStep { tokens: &next, cache: &mut cache, all_logits: false }])?;
            let step = dec.step(&logits[0].squeeze(0)?.to_vec1::<f32>()?)?;
            if !step.text.is_empty() {
                on_text(&step.text);
                text.push_str(&step.text);
            }
            if step.finish.is_some() {
                break;
            }
            ids.push(step.sampled.token);
            next = vec![step.sampled.token];
        }
    }
    let rest = dec.finish();
    if !rest.is_empty() {
        on_text(&rest);
        text.push_str(&rest);
    }
    Ok(text)
}

/// What [`generate_batch`] gives for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The released text (the stop string that ended it left out, as [`Decoding`] keeps it).
    pub text: String,
    /// The sampled token ids, the last one (end-of-sequence, a stop token) included.
    pub tokens: Vec<u32>,
    /// Why it ended; [`Finish::Length`] also when the context filled up.
    pub finish: Finish,
}

/// Generates after each prompt with its own [`Decoding`] (sampling, stop conditions, a
/// constraint), `batch` sequences per model step. A prompt must leave room in the context
/// for at least one token; a sequence ends when its decoding finishes or the context is full
/// (no sliding window: a batch keeps what each sequence was conditioned on).
pub fn generate_batch(model: &Model, requests: Vec<(Vec<u32>, Decoding)>, batch: usize) -> Result<Vec<Generated>> {
    let max = model.max_len();
    for (i, (ids, _)) in requests.iter().enumerate() {
        if ids.is_empty() || ids.len() >= max {
            return Err(crate::Error::invalid(
                "prompt",
                format!("request {i}: {} prompt tokens (the context holds {max}; at least one is needed)", ids.len()),
            ));
        }
    }
    struct Seq {
        cache: crate::KvCache,
        next: Vec<u32>,
        decoding: Decoding,
        out: Generated,
        done: bool,
    }
    let mut out = Vec::with_capacity(requests.len());
    let mut requests = requests.into_iter();
    loop {
        let mut seqs: Vec<Seq> = requests
            .by_ref()
            .take(batch.max(1))
            .map(|(next, decoding)| Seq {
                cache: model.new_cache(),
                next,
                decoding,
                out: Generated { text: String::new(), tokens: Vec::new(), finish: Finish::Length },
                done: false,
            })
            .collect();
        if seqs.is_empty() {
            return Ok(out);
        }
        for s in seqs.iter_mut().filter(|s| s.decoding.stop.max_tokens == 0) {
            s.done = true;
        }
        while seqs.iter().any(|s| !s.done) {
            let mut which = Vec::new();
            let mut steps: Vec<SeqStep<'_>> = Vec::new();
            for (i, s) in seqs.iter_mut().enumerate().filter(|(_, s)| !s.done) {
                s.decoding.prepare();
                steps.push(SeqStep { tokens: &s.next, cache: &mut s.cache, all_logits: false });
                which.push(i);
            }
            let logits = model.forward_cached(&mut steps)?;
            drop(steps);
            for (i, l) in which.into_iter().zip(logits) {
                let s = &mut seqs[i];
                let step = s.decoding.step(&l.squeeze(0)?.to_vec1::<f32>()?)?;
                s.out.text.push_str(&step.text);
                s.out.tokens.push(step.sampled.token);
                if let Some(f) = step.finish {
                    s.out.finish = f;
                    s.done = true;
                } else if s.cache.len() >= max {
                    s.done = true;
                }
                s.next = vec![step.sampled.token];
            }
        }
        for mut s in seqs {
            s.out.text.push_str(&s.decoding.finish());
            out.push(s.out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::from_chars("abcdefghijklmnopqrstuvwxyz .!".chars()).unwrap()
    }

    /// Logits choosing `id` for sure.
    fn one_hot(v: usize, id: u32) -> Vec<f32> {
        let mut l = vec![0.0; v];
        l[id as usize] = 100.0;
        l
    }

    /// Runs the decoding over the text `out` (one token per character); returns the released
    /// pieces, the text after finishing and why it finished.
    fn drive(stop: StopConditions, out: &str) -> (Vec<String>, String, Option<Finish>) {
        let t = tok();
        let mut d = Decoding::new(&t, SamplingParams::greedy(), &[], 0, stop, true).unwrap();
        let mut pieces = Vec::new();
        let mut finish = None;
        for c in out.chars() {
            let id = t.token_to_id(&c.to_string()).unwrap();
            let s = d.step(&one_hot(t.vocab_size(), id)).unwrap();
            assert_eq!(s.sampled.token, id);
            pieces.push(s.text);
            if s.finish.is_some() {
                finish = s.finish;
                break;
            }
        }
        (pieces, d.finish(), finish)
    }

    #[test]
    fn stop_strings_are_held_back_until_they_cannot_begin() {
        let stop = StopConditions { max_tokens: 100, stop: vec!["end".into()], ..Default::default() };
        // "e" and "en" might begin "end": held, then released when "x" rules it out.
        let (pieces, rest, finish) = drive(stop.clone(), "a enx");
        assert_eq!(pieces, ["a", " ", "", "", "enx"]);
        assert_eq!((rest.as_str(), finish), ("", None));
        // The stop string ends the output and is left out of it.
        let (pieces, rest, finish) = drive(stop.clone(), "ab end more");
        assert_eq!(pieces.concat(), "ab ");
        assert_eq!((rest.as_str(), finish), ("", Some(Finish::Stop)));
        // Kept when asked.
        let keep = StopConditions { include_stop_str: true, ..stop.clone() };
        assert_eq!(drive(keep, "ab end more").0.concat(), "ab end");
        // Text held back when the sequence ends otherwise is released by `finish`.
        let short = StopConditions { max_tokens: 4, ..stop };
        let (pieces, rest, finish) = drive(short, "ab en");
        assert_eq!((pieces.concat() + &rest, finish), ("ab e".to_owned(), Some(Finish::Length)));
    }

    #[test]
    fn min_tokens_bans_stop_tokens_and_ignores_stop_strings_until_reached() {
        let t = tok();
        let dot = t.token_to_id(".").unwrap();
        let a = t.token_to_id("a").unwrap();
        let stop = StopConditions {
            max_tokens: 10,
            stop_token_ids: vec![dot],
            min_tokens: 2,
            stop: vec!["a".into()],
            ..Default::default()
        };
        let mut d = Decoding::new(&t, SamplingParams::greedy(), &[], 0, stop, true).unwrap();
        // The stop token is the likeliest, but banned: the next one is chosen.
        let mut l = one_hot(t.vocab_size(), dot);
        l[a as usize] = 50.0;
        let s = d.step(&l).unwrap();
        assert_eq!((s.sampled.token, s.text.as_str(), s.finish), (a, "a", None));
        // Still banned for the second token; the stop string is looked for from it on, and the
        // second "a" (not the first, already released) ends the output.
        let s = d.step(&l).unwrap();
        assert_eq!((s.sampled.token, s.text.as_str(), s.finish), (a, "", Some(Finish::Stop)));
        assert_eq!(d.finish(), "");
        // From the third token on, the stop token may be chosen.
        let stop = StopConditions { max_tokens: 10, stop_token_ids: vec![dot], min_tokens: 2, ..Default::default() };
        let mut d = Decoding::new(&t, SamplingParams::greedy(), &[], 0, stop, true).unwrap();
        let got: Vec<(u32, Option<Finish>)> =
            (0..3).map(|_| d.step(&l).map(|s| (s.sampled.token, s.finish)).unwrap()).collect();
        assert_eq!(got, [(a, None), (a, None), (dot, Some(Finish::Stop))]);
    }
}
