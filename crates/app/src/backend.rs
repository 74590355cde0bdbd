//! Where log-likelihoods and generations come from. [`LocalBackend`] runs a model directory
//! in-process through `lmstack-core`, batching requests (padded whole-sequence forwards for
//! scoring, a shared cached decode loop for generation).

use lmstack_core::sampling::{argmax, logprobs_of};
use lmstack_core::tokenizer::common_prefix;
use lmstack_core::{DType, Decoding, Device, Pretrained, SamplingParams, StopConditions, Tensor};

use crate::schema::GenerationKwargs;

/// A backend error.
pub type BackendResult<T> = anyhow::Result<T>;

/// What an eval needs from a model.
pub trait Backend {
    /// A short description for reports.
    fn name(&self) -> String;
    /// For each (context, continuation): the continuation's total log-likelihood and whether
    /// it is the greedy continuation.
    fn loglikelihood(&mut self, reqs: &[(String, String)]) -> BackendResult<Vec<(f64, bool)>>;
    /// Each text's total log-likelihood (every token scored, in context windows).
    fn loglikelihood_rolling(&mut self, texts: &[String]) -> BackendResult<Vec<f64>>;
    /// Greedy continuations, cut at the first stop string.
    fn generate(&mut self, reqs: &[(String, GenerationKwargs)]) -> BackendResult<Vec<String>>;
}

/// lm-eval's rolling windows for perplexity (`get_rolling_token_windows` with `context_len` 1,
/// then `make_disjoint_window`) over `n` tokens that follow a prefix token, as
/// `(start, end, scored)` into `full = [prefix, tokens…]`: the model reads
/// `full[start..end - 1]` and the last `scored` tokens of `full[..end]` are scored. Every token
/// is scored exactly once; the first window starts at the prefix, every later one reads a full
/// `max_seq` tokens of context (the last one too).
pub fn rolling_windows(n: usize, max_seq: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    if n == 0 || max_seq == 0 {
        return out;
    }
    let first = max_seq.min(n);
    out.push((0, first + 1, first));
    let mut predicted = first;
    while predicted < n {
        let scored = (n - predicted).min(max_seq);
        let end = predicted + scored; // in `tokens`; `full` is one further on
        out.push((end - max_seq, end + 1, scored));
        predicted = end;
    }
    out
}

/// A model directory run in-process.
pub struct LocalBackend {
    p: Pretrained,
    name: String,
    batch: usize,
    chat: bool,
    max_length: Option<usize>,
    /// Compiles output constraints; made for the first task that asks for one.
    constrainer: Option<lmstack_core::Constrainer>,
}

impl LocalBackend {
    /// Loads `dir` (f32, CPU).
    pub fn load(dir: &std::path::Path) -> BackendResult<Self> {
        let mut p = Pretrained::load(dir, DType::F32, &Device::Cpu)?;
        p.model.repack_for_inference()?;
        if !p.model.config().is_causal() {
            anyhow::bail!("{}: eval needs a causal language model (gpt2 or llama)", dir.display());
        }
        if p.model.is_scorer() {
            anyhow::bail!(
                "{}: a reward model (no LM head) cannot be evaluated as a language model; pass it as --reward-model for the `reward` metric",
                dir.display()
            );
        }
        Ok(Self { p, name: dir.display().to_string(), batch: 32, chat: false, max_length: None, constrainer: None })
    }

    /// Reads at most `n` tokens at once (lm-eval's `max_length`) instead of the model's whole
    /// context: longer contexts are cut from the left, rolling windows are `n` long.
    pub fn with_max_length(mut self, n: Option<usize>) -> BackendResult<Self> {
        if let Some(n) = n {
            if !(2..=self.p.model.max_len()).contains(&n) {
                anyhow::bail!("--max-length {n} is outside 2..={} (the model's context)", self.p.model.max_len());
            }
        }
        self.max_length = n;
        Ok(self)
    }

    /// Attaches a PEFT LoRA adapter directory to the model.
    pub fn with_adapter(mut self, dir: &std::path::Path) -> BackendResult<Self> {
        let n = lmstack_core::lora::load_peft(&mut self.p.model, dir)?;
        if n == 0 {
            anyhow::bail!("{}: the adapter fits no projection of {}", dir.display(), self.name);
        }
        self.name = format!("{} + {}", self.name, dir.display());
        Ok(self)
    }

    /// Query as a chat model (lm-eval's `--apply_chat_template`): each context of a generation
    /// or log-likelihood request becomes one user message rendered with the model's chat
    /// template (`tokenizer_config.json`) and the generation prompt; rolling log-likelihoods
    /// score raw text.
    pub fn with_chat(mut self, chat: bool) -> BackendResult<Self> {
        if chat && self.p.tokenizer.chat_template().is_none() {
            anyhow::bail!("{}: the tokenizer has no chat_template, so --chat cannot be used", self.name);
        }
        self.chat = chat;
        Ok(self)
    }

    /// The context as the model sees it: as is, or (chat mode) one user message through the
    /// chat template with the generation prompt.
    fn chat_context(&self, ctx: &str) -> BackendResult<String> {
        if !self.chat {
            return Ok(ctx.to_owned());
        }
        let msgs = serde_json::json!([{"role": "user", "content": ctx}]);
        Ok(self.p.tokenizer.apply_chat_template(&msgs, true)?)
    }

    fn max_len(&self) -> usize {
        self.max_length.unwrap_or(self.p.model.max_len())
    }

    /// A token that may stand before the first one so it gets scored (BOS, else EOS).
    fn prefix_token(&self) -> Option<u32> {
        self.p.tokenizer.bos_id().or(self.p.tokenizer.eos_id())
    }

    /// Scores `targets` positions of each input: (input ids, first target row, target ids).
    fn score(&self, items: &[(Vec<u32>, usize, Vec<u32>)]) -> BackendResult<Vec<(f64, bool)>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.batch) {
            let t = chunk.iter().map(|c| c.0.len()).max().unwrap_or(1);
            let mut ids = Vec::with_capacity(chunk.len() * t);
            let mut mask = Vec::with_capacity(chunk.len() * t);
            for (inp, _, _) in chunk {
                ids.extend_from_slice(inp);
                ids.extend(std::iter::repeat_n(0u32, t - inp.len()));
                mask.extend(std::iter::repeat_n(1u32, inp.len()));
                mask.extend(std::iter::repeat_n(0u32, t - inp.len()));
            }
            let dev = self.p.model.device();
            let ids = Tensor::from_vec(ids, (chunk.len(), t), dev)?;
            let mask = Tensor::from_vec(mask, (chunk.len(), t), dev)?;
            let logits = self.p.model.forward(&ids, Some(&mask))?;
            for (b, (_, first, targets)) in chunk.iter().enumerate() {
                let rows = logits.get(b)?.narrow(0, *first, targets.len())?.to_vec2::<f32>()?;
                let mut ll = 0.0;
                let mut greedy = true;
                for (row, &tgt) in rows.iter().zip(targets) {
                    ll += logprobs_of(row, tgt, 0).0 as f64;
                    greedy &= argmax(row) == tgt;
                }
                out.push((ll, greedy));
            }
        }
        Ok(out)
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn loglikelihood(&mut self, reqs: &[(String, String)]) -> BackendResult<Vec<(f64, bool)>> {
        let tok = &self.p.tokenizer;
        let max = self.max_len();
        let mut items = Vec::with_capacity(reqs.len());
        for (ctx, cont) in reqs {
            let ctx = &self.chat_context(ctx)?;
            // lm-eval: the continuation's tokens are those the whole text has beyond the context's.
            let mut ctx_ids = tok.encode(ctx, false)?;
            let whole = tok.encode(&format!("{ctx}{cont}"), false)?;
            let split = if whole.starts_with(&ctx_ids) { ctx_ids.len() } else { common_prefix(&ctx_ids, &whole) };
            let cont_ids = whole[split..].to_vec();
            ctx_ids = whole[..split].to_vec();
            if cont_ids.is_empty() {
                anyhow::bail!("the continuation {cont:?} has no tokens");
            }
            if ctx_ids.is_empty() {
                ctx_ids = vec![self.prefix_token().ok_or_else(|| {
                    anyhow::anyhow!("an empty context needs a BOS or EOS token to score the first token")
                })?];
            }
            if cont_ids.len() > max {
                anyhow::bail!("the continuation is {} tokens, beyond the model's context of {max}", cont_ids.len());
            }
            let mut all = ctx_ids;
            all.extend_from_slice(&cont_ids);
            let keep = (max + 1).min(all.len());
            let all = all[all.len() - keep..].to_vec();
            let input = all[..all.len() - 1].to_vec();
            let first = input.len() - cont_ids.len();
            items.push((input, first, cont_ids));
        }
        self.score(&items)
    }

    fn loglikelihood_rolling(&mut self, texts: &[String]) -> BackendResult<Vec<f64>> {
        let max = self.max_len();
        let mut items = Vec::new();
        let mut owner = Vec::new();
        for (k, text) in texts.iter().enumerate() {
            // With a prefix token every text token is scored; without, all but the first.
            let mut full: Vec<u32> = self.prefix_token().into_iter().collect();
            full.extend(self.p.tokenizer.encode(text, false)?);
            for (s, e, n) in rolling_windows(full.len().saturating_sub(1), max) {
                items.push((full[s..e - 1].to_vec(), e - 1 - n - s, full[e - n..e].to_vec()));
                owner.push(k);
            }
        }
        let scores = self.score(&items)?;
        let mut out = vec![0.0; texts.len()];
        for (k, (ll, _)) in owner.into_iter().zip(scores) {
            out[k] += ll;
        }
        Ok(out)
    }

    fn generate(&mut self, reqs: &[(String, GenerationKwargs)]) -> BackendResult<Vec<String>> {
        let tok = self.p.tokenizer.clone();
        let max = self.max_len();
        let mut requests = Vec::with_capacity(reqs.len());
        for (ctx, kw) in reqs {
            let limit = kw.max_gen_toks.unwrap_or(256).min(max - 1);
            let mut ids = tok.encode(&self.chat_context(ctx)?, false)?;
            if ids.is_empty() {
                ids = self.prefix_token().into_iter().collect();
            }
            let keep = (max - limit).min(ids.len()).max(1);
            let ids = ids[ids.len() - keep..].to_vec();
            // Greedy, ending at end-of-sequence, the `until` strings (left out) or `limit`.
            let stop = StopConditions { max_tokens: limit, stop: kw.until.clone(), ..Default::default() };
            let mut decoding = Decoding::new(&tok, SamplingParams::greedy(), &ids, 0, stop, true)?;
            if let Some(g) = kw.grammar().map_err(anyhow::Error::msg)? {
                if self.constrainer.is_none() {
                    self.constrainer = Some(lmstack_core::Constrainer::new(&tok, self.p.model.config().vocab_size())?);
                }
                let c = self.constrainer.as_ref().expect("made above");
                decoding = decoding.with_constraint(Some(c.constraint(&g)?));
            }
            requests.push((ids, decoding));
        }
        let out = lmstack_core::decoding::generate_batch(&self.p.model, requests, self.batch)?;
        Ok(out.into_iter().map(|g| g.text).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::rolling_windows;

    /// The windows lm-eval 0.4.13 makes (`make_disjoint_window` over
    /// `get_rolling_token_windows(range(1, n + 1), prefix 0, max_seq, 1)`, printed as the model's
    /// input `(ctx + cont)[:-1]` and the scored tokens), so `full[i] = i`.
    #[test]
    fn rolling_windows_are_lm_evals() {
        type W = (Vec<usize>, Vec<usize>);
        let ours = |n: usize, m: usize| -> Vec<W> {
            rolling_windows(n, m).into_iter().map(|(s, e, k)| ((s..e - 1).collect(), (e - k..e).collect())).collect()
        };
        let w = |a: &[usize], b: &[usize]| (a.to_vec(), b.to_vec());
        assert_eq!(ours(1, 4), vec![w(&[0], &[1])]);
        assert_eq!(ours(4, 4), vec![w(&[0, 1, 2, 3], &[1, 2, 3, 4])]);
        assert_eq!(ours(5, 4), vec![w(&[0, 1, 2, 3], &[1, 2, 3, 4]), w(&[1, 2, 3, 4], &[5])]);
        assert_eq!(
            ours(11, 4),
            vec![w(&[0, 1, 2, 3], &[1, 2, 3, 4]), w(&[4, 5, 6, 7], &[5, 6, 7, 8]), w(&[7, 8, 9, 10], &[9, 10, 11])]
        );
        assert_eq!(
            ours(12, 4),
            vec![
                w(&[0, 1, 2, 3], &[1, 2, 3, 4]),
                w(&[4, 5, 6, 7], &[5, 6, 7, 8]),
                w(&[8, 9, 10, 11], &[9, 10, 11, 12])
            ]
        );
        assert_eq!(ours(9, 3), vec![w(&[0, 1, 2], &[1, 2, 3]), w(&[3, 4, 5], &[4, 5, 6]), w(&[6, 7, 8], &[7, 8, 9])]);
        assert!(ours(0, 4).is_empty());
    }
}
