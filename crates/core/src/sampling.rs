//! Token sampling: greedy, temperature, top-k, top-p (nucleus), min-p, repetition / frequency /
//! presence penalties, OpenAI's logit bias, a seeded RNG per sequence, and log-probabilities of
//! the chosen and top tokens.
//!
//! Order of operations follows Hugging Face `generate` and vLLM: logit bias, penalties, then
//! temperature, then the top-k / top-p / min-p filters, then a draw. Reported log-probabilities
//! are those of the model's raw distribution (before bias, penalties and temperature), as vLLM
//! reports by default.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How to choose the next token. The defaults sample from the unmodified distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// CTRL-style penalty on tokens already in the prompt or output (1 = off): positive logits
    /// are divided by it, negative ones multiplied.
    pub repetition_penalty: f32,
    /// OpenAI-style penalty subtracted once per earlier occurrence in the output (0 = off).
    pub frequency_penalty: f32,
    /// OpenAI-style penalty subtracted once if the token occurred in the output (0 = off).
    pub presence_penalty: f32,
    /// RNG seed; `None` draws a fresh one.
    pub seed: Option<u64>,
    /// OpenAI's `logit_bias`: `(token, bias)` pairs added to those tokens' logits before
    /// anything else, each bias in [-100, 100] (-100 in effect bans a token, 100 forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::invalid(name, format!("{v} is not a finite number")))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        if self.temperature < 0.0 {
            return Err(Error::invalid("temperature", format!("{} is negative", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", format!("{} is outside (0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::invalid("min_p", format!("{} is outside [0, 1]", self.min_p)));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(Error::invalid("repetition_penalty", format!("{} must be positive", self.repetition_penalty)));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(Error::invalid("frequency_penalty", format!("{} is outside [-2, 2]", self.frequency_penalty)));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(Error::invalid("presence_penalty", format!("{} is outside [-2, 2]", self.presence_penalty)));
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(Error::invalid("logit_bias", format!("token {t}: {b} is outside [-100, 100]")));
        }
        Ok(())
    }
}

/// The outcome of one sampling step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability under the model's raw distribution.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Samples the tokens of one sequence; holds its RNG and the token counts penalties need.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    seen: HashMap<u32, ()>,
    output_counts: HashMap<u32, u32>,
    top_n: usize,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt`, reporting `top_n` alternatives.
    pub fn new(params: SamplingParams, prompt: &[u32], top_n: usize) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            seen: prompt.iter().map(|&t| (t, ())).collect(),
            output_counts: HashMap::new(),
            params,
            top_n,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits` (one row, vocabulary-sized) and records it.
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sampled> {
        self.sample_except(logits, &[])
    }

    /// [`Sampler::sample`] with the tokens `banned` left out of the choice (vLLM's `min_tokens`
    /// keeps end-of-sequence and stop tokens out this way); log-probabilities are the model's,
    /// as for every other adjustment. An error if nothing is left to choose.
    pub fn sample_except(&mut self, logits: &[f32], banned: &[u32]) -> Result<Sampled> {
        if logits.is_empty() {
            return Err(Error::invalid("logits", "empty logits"));
        }
        // Log-probabilities need only the log-sum-exp: no vocabulary-sized vector per token.
        let lse = logsumexp(logits);
        let logp = |i: u32| (logits[i as usize] as f64 - lse) as f32;
        let mut l: Vec<f32> = logits.to_vec();
        self.adjust_logits(&mut l);
        for &t in banned {
            if let Some(x) = l.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        if !banned.is_empty() && l.iter().all(|&x| x == f32::NEG_INFINITY) {
            return Err(Error::invalid("logits", "every token is banned"));
        }
        let token = if self.params.temperature == 0.0 { argmax(&l) } else { self.draw(&l) };
        self.seen.insert(token, ());
        *self.output_counts.entry(token).or_insert(0) += 1;
        let top_logprobs = top_n(logits, self.top_n).into_iter().map(|(i, _)| (i, logp(i))).collect();
        Ok(Sampled { token, logprob: logp(token), top_logprobs })
    }

    /// Records a token chosen elsewhere (e.g. forced), for the penalties.
    pub fn observe(&mut self, token: u32) {
        self.seen.insert(token, ());
        *self.output_counts.entry(token).or_insert(0) += 1;
    }

    fn adjust_logits(&self, l: &mut [f32]) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(x) = l.get_mut(t as usize) {
                *x += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in self.seen.keys() {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= c as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
    }

    fn draw(&mut self, l: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Candidates as (token, unnormalised probability); the exponentials vectorised.
        let w: Vec<f32> = crate::kernels::simd::dispatch(
            #[inline(always)]
            |_| l.iter().map(|&x| crate::kernels::simd::exp_f32((x - max) * inv_t)).collect(),
        );
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // No filter: draw over the whole vocabulary in token order.
            return pick(&mut self.rng, w.iter().enumerate().map(|(t, &w)| (t as u32, w)));
        }
        let mut cand: Vec<(u32, f32)> = w.into_iter().enumerate().map(|(i, w)| (i as u32, w)).collect();
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, desc);
            cand.truncate(p.top_k);
        }
        if p.top_p < 1.0 || p.min_p > 0.0 {
            cand.sort_unstable_by(desc);
            if p.min_p > 0.0 {
                let cut = cand[0].1 * p.min_p;
                let keep = cand.iter().take_while(|c| c.1 >= cut).count().max(1);
                cand.truncate(keep);
            }
            if p.top_p < 1.0 {
                let total: f32 = cand.iter().map(|c| c.1).sum();
                let mut acc = 0.0;
                let mut keep = cand.len();
                for (i, c) in cand.iter().enumerate() {
                    acc += c.1 / total;
                    if acc >= p.top_p {
                        keep = i + 1;
                        break;
                    }
                }
                cand.truncate(keep.max(1));
            }
        }
        pick(&mut self.rng, cand.into_iter())
    }
}

/// Draws one token from `(token, unnormalised weight)` pairs, in their order.
fn pick(rng: &mut ChaCha8Rng, cand: impl Iterator<Item = (u32, f32)> + Clone) -> u32 {
    let total: f32 = cand.clone().map(|c| c.1).sum();
    let mut r = rng.random::<f32>() * total;
    let mut last = 0;
    for (t, w) in cand {
        if r < w {
            return t;
        }
        r -= w;
        last = t;
    }
    last
}

/// Index of the largest value (the first on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// `ln Σ exp(x)` of one row, computed stably: the terms `exp(x - max)` in f32 (vectorised; the
/// dominant ones are exact to ~2e-7), summed in f64.
pub fn logsumexp(xs: &[f32]) -> f64 {
    crate::kernels::simd::dispatch(
        #[inline(always)]
        |_| {
            let max = crate::kernels::simd::max(xs);
            if !max.is_finite() {
                let max = max as f64;
                return xs.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
            }
            let mut acc = [0f64; 8];
            let c = xs.chunks_exact(8);
            let tail: f64 = c.remainder().iter().map(|&x| crate::kernels::simd::exp_f32(x - max) as f64).sum();
            for x in c {
                for i in 0..8 {
                    acc[i] += crate::kernels::simd::exp_f32(x[i] - max) as f64;
                }
            }
            (acc.iter().sum::<f64>() + tail).ln() + max as f64
        },
    )
}

/// Log-softmax of one row, computed stably in f64.
pub fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let lse = logsumexp(xs);
    xs.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// The `n` largest entries as `(index, value)`, largest first (the lower index first on
/// ties). A few are picked in one pass without copying the row.
pub fn top_n(xs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if n == 0 {
        return Vec::new();
    }
    if n <= 16 {
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
        for (i, &x) in xs.iter().enumerate() {
            // Later indices lose ties, so only a strictly larger value enters a full list.
            if best.len() == n && best[n - 1].1.total_cmp(&x).is_ge() {
                continue;
            }
            let at = best.partition_point(|b| b.1.total_cmp(&x).is_ge());
            best.insert(at, (i as u32, x));
            best.truncate(n);
        }
        return best;
    }
    let mut v: Vec<(u32, f32)> = xs.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    if n < v.len() {
        v.select_nth_unstable_by(n - 1, desc);
        v.truncate(n);
    }
    v.sort_unstable_by(desc);
    v
}

/// The log-probability of entry `id` and of the `top` most likely entries of one row of
/// logits, without building the whole log-softmax row: each is `(x − logsumexp) as f32`, the
/// value [`log_softmax`] gives. An `id` outside the row has log-probability −∞.
pub fn logprobs_of(xs: &[f32], id: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let lse = logsumexp(xs);
    let lp = |x: f32| (x as f64 - lse) as f32;
    let own = xs.get(id as usize).map_or(f32::NEG_INFINITY, |&x| lp(x));
    (own, top_n(xs, top).into_iter().map(|(t, x)| (t, lp(x))).collect())
}
