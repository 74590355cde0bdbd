//! Supervised finetuning data: instruction examples read from JSONL, rendered with a chat
//! template, tokenized with a loss mask, and padded into batches.
//!
//! Two line shapes are read (bad lines are reported with file and line number):
//! - chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": "…"}, …]}` — rendered
//!   with the chat template; by default only the assistant turns (their content and the
//!   template's end-of-turn text) are scored;
//! - `{"prompt": "…", "completion": "…"}` — plain text: the prompt is context, the completion
//!   (plus the end-of-sequence token when the tokenizer has one) is scored; a chat template is
//!   not applied (as TRL treats non-conversational data).
//!
//! The rendering is incremental, as torchtune and TRL mask: the conversation rendered up to
//! each message, the difference being that message's text, so a template's own markup lands
//! on the right side of the mask. Labels are the next token; every unscored position (and all
//! padding) carries [`IGNORE_INDEX`], so padding never contributes to the loss.

use std::path::Path;

use candle_core::{Device, Tensor};
use lmstack_core::kernels::ops::IGNORE_INDEX;
use lmstack_core::nn::Segments;
use lmstack_core::Tokenizer;
use serde_json::{json, Value};

use crate::{Error, Result};

/// One instruction example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A conversation (`messages`).
    Chat(Vec<(String, String)>),
    /// A prompt and its completion.
    Completion {
        /// Context.
        prompt: String,
        /// The scored continuation.
        completion: String,
    },
}

impl Example {
    /// Parses one JSON line; errors name the field.
    pub fn from_value(v: &Value) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("expected a JSON object")?;
        if let Some(m) = obj.get("messages") {
            let list = m.as_array().ok_or("`messages` must be a list")?;
            if list.is_empty() {
                return Err("`messages` is empty".into());
            }
            let out = parse_messages(list, "messages")?;
            if !out.iter().any(|(r, _)| r == "assistant") {
                return Err("`messages` has no assistant turn to learn from".into());
            }
            return Ok(Self::Chat(out));
        }
        match (obj.get("prompt"), obj.get("completion")) {
            (Some(Value::String(p)), Some(Value::String(c))) => {
                Ok(Self::Completion { prompt: p.clone(), completion: c.clone() })
            }
            (Some(_), Some(_)) => Err("`prompt` and `completion` must be strings".into()),
            _ => Err("expected `messages`, or `prompt` and `completion`".into()),
        }
    }
}

/// Chat messages `(role, content)` from a JSON list; errors name `field[i].role` or
/// `field[i].content`.
pub fn parse_messages(list: &[Value], field: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = Vec::with_capacity(list.len());
    for (i, msg) in list.iter().enumerate() {
        let role = msg["role"].as_str().ok_or_else(|| format!("{field}[{i}].role: expected a string"))?;
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(format!("{field}[{i}].role: `{role}` is not system, user or assistant"));
        }
        let content = msg["content"].as_str().ok_or_else(|| format!("{field}[{i}].content: expected a string"))?;
        out.push((role.to_owned(), content.to_owned()));
    }
    Ok(out)
}

/// Reads a JSONL file of examples; a bad line is an error naming `file:line` and the field.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Msg(format!("{at}: not JSON: {e}")))?;
        out.push(Example::from_value(&v).map_err(|e| Error::Msg(format!("{at}: {e}")))?);
    }
    if out.is_empty() {
        return Err(Error::Msg(format!("{}: no examples", path.display())));
    }
    Ok(out)
}

/// How conversations become text: a chat template compiled once, and its source when it is
/// not the tokenizer's own (to save with the finetuned model).
#[derive(Debug)]
pub struct ChatFormat {
    template: lmstack_core::chat::ChatTemplate,
    source: Option<String>,
}

impl ChatFormat {
    /// `model` (the tokenizer's template, else `plain`), `plain`, `chatml`, or a template file.
    pub fn from_spec(spec: &str, tok: &Tokenizer) -> Result<Self> {
        let source = match spec {
            "model" if tok.chat_template().is_some() => None,
            "model" | "plain" => Some(lmstack_core::chat::PLAIN.to_owned()),
            "chatml" => {
                if let Some(t) = lmstack_core::chat::CHATML_TOKENS.iter().find(|t| tok.token_to_id(t).is_none()) {
                    return Err(Error::Msg(format!(
                        "--chat-template chatml: the base tokenizer has no `{t}` token (its vocabulary would have to grow); use `plain` or a base that has ChatML's tokens"
                    )));
                }
                Some(lmstack_core::chat::CHATML.to_owned())
            }
            file => Some(std::fs::read_to_string(file).map_err(|e| {
                Error::Msg(format!("--chat-template: `{file}` is not model, plain, chatml or a readable file: {e}"))
            })?),
        };
        let src = source.as_deref().or(tok.chat_template()).unwrap_or_default();
        Ok(Self { template: lmstack_core::chat::ChatTemplate::new(src)?, source })
    }

    /// The template source to save with the finetuned model (`None`: the tokenizer's own).
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// Renders `msgs` (role, content) with the tokenizer's special tokens.
    pub fn render(&self, tok: &Tokenizer, msgs: &[(String, String)], add_generation_prompt: bool) -> Result<String> {
        let v: Vec<Value> = msgs.iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
        Ok(self.template.render(&Value::Array(v), add_generation_prompt, tok.special_tokens(), &Default::default())?)
    }
}

/// A tokenized example: input ids and, per position, the label (next token or [`IGNORE_INDEX`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Whether each token is scored (predicted from the tokens before it).
    pub scored: Vec<bool>,
}

impl Tokenized {
    /// Number of scored tokens.
    pub fn n_scored(&self) -> usize {
        self.scored.iter().filter(|s| **s).count()
    }
}

fn encode_checked(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let ids = tok.encode(text, false)?;
    let unk = tok.special_tokens().unk.as_deref().and_then(|u| tok.token_to_id(u));
    if let (Some(u), true) = (unk, !text.contains("<unk>")) {
        if ids.contains(&u) {
            let missing: Vec<String> = text
                .chars()
                .filter(|c| tok.encode(&c.to_string(), false).is_ok_and(|v| v.contains(&u)))
                .collect::<std::collections::BTreeSet<char>>()
                .into_iter()
                .map(|c| format!("{c:?}"))
                .collect();
            return Err(Error::Msg(format!(
                "the base model's vocabulary has no token for {}; finetune a base whose tokenizer covers the data (a byte-level BPE covers any text)",
                missing.join(", ")
            )));
        }
    }
    Ok(ids)
}

/// Tokenizes one example; with `train_on_inputs` every token is scored, otherwise only
/// assistant turns / the completion. The first token is never scored (nothing precedes it).
pub fn tokenize(ex: &Example, tok: &Tokenizer, fmt: &ChatFormat, train_on_inputs: bool) -> Result<Tokenized> {
    scored_from(ex, tok, fmt, train_on_inputs, 0)
}

/// [`tokenize`] of a conversation scoring only the assistant turns from message `first` on
/// (a preference pair's answer after its prompt, which may hold earlier assistant turns).
pub fn tokenize_from(ex: &Example, tok: &Tokenizer, fmt: &ChatFormat, first: usize) -> Result<Tokenized> {
    scored_from(ex, tok, fmt, false, first)
}

fn scored_from(
    ex: &Example,
    tok: &Tokenizer,
    fmt: &ChatFormat,
    train_on_inputs: bool,
    first: usize,
) -> Result<Tokenized> {
    // BOS first, unless the chat template writes it itself (Llama 3's `{{ bos_token }}`;
    // SmolLM2's ChatML, whose BOS is `<|im_start|>`): as `apply_chat_template` gives it, not twice.
    let bos_text = tok.special_tokens().bos.clone().unwrap_or_default();
    let template_writes_bos = match ex {
        Example::Chat(msgs) if !bos_text.is_empty() => {
            fmt.render(tok, &msgs[..msgs.len().min(1)], false)?.starts_with(bos_text.as_str())
        }
        _ => false,
    };
    let mut ids: Vec<u32> = tok.bos_id().filter(|_| !template_writes_bos).into_iter().collect();
    let mut scored = vec![false; ids.len()];
    let mut push = |text: &str, score: bool| -> Result<()> {
        let t = encode_checked(tok, text)?;
        scored.extend(std::iter::repeat_n(score || train_on_inputs, t.len()));
        ids.extend(t);
        Ok(())
    };
    match ex {
        Example::Completion { prompt, completion } => {
            push(prompt, false)?;
            push(completion, true)?;
            if let Some(e) = tok.eos_id() {
                ids.push(e);
                scored.push(true);
            }
        }
        Example::Chat(msgs) => {
            let mut done = String::new();
            for (i, (role, _)) in msgs.iter().enumerate() {
                let is_assistant = role == "assistant" && i >= first;
                if is_assistant {
                    // The generation prompt belongs to the context.
                    let with_prompt = fmt.render(tok, &msgs[..i], true)?;
                    let piece = with_prompt.strip_prefix(done.as_str()).ok_or_else(|| not_incremental(i))?;
                    push(piece, false)?;
                    done = with_prompt;
                }
                let upto = fmt.render(tok, &msgs[..=i], false)?;
                let piece = upto.strip_prefix(done.as_str()).ok_or_else(|| not_incremental(i))?;
                push(piece, is_assistant)?;
                done = upto;
            }
        }
    }
    if let Some(s) = scored.first_mut() {
        *s = false;
    }
    Ok(Tokenized { ids, scored })
}

fn not_incremental(i: usize) -> Error {
    Error::Msg(format!(
        "the chat template does not render messages incrementally (the conversation up to message {i} is not a prefix of the next); the loss mask cannot be placed"
    ))
}

/// A batch: inputs `[b, t]` and labels `[b, t]` (next token where scored, else
/// [`IGNORE_INDEX`]; padding is never scored), an example per row ([`batch`]) or several
/// packed in a row ([`packed`]).
pub struct SftBatch {
    /// Input ids.
    pub inputs: Tensor,
    /// Labels.
    pub labels: Tensor,
    /// Scored positions in the batch.
    pub n_scored: usize,
    /// Where each example sits when several share a row ([`packed`]).
    pub segments: Option<Segments>,
}

impl SftBatch {
    /// As the training loop takes it.
    pub fn into_batch(self) -> crate::batches::Batch {
        crate::batches::Batch { inputs: self.inputs, labels: self.labels, segments: self.segments }
    }
}

/// One example's inputs and labels (cut to `max_len + 1` tokens from the left): next token
/// where scored, else [`IGNORE_INDEX`].
fn inputs_and_labels(x: &Tokenized, max_len: usize) -> (Vec<u32>, Vec<u32>) {
    let keep = x.ids.len().min(max_len + 1);
    let s = x.ids.len() - keep;
    let (ids, scored) = (&x.ids[s..], &x.scored[s..]);
    let n = ids.len().saturating_sub(1);
    let labels = (0..n).map(|p| if scored[p + 1] { ids[p + 1] } else { IGNORE_INDEX }).collect();
    (ids[..n].to_vec(), labels)
}

/// Padding-free batch (TRL's `padding_free`): the examples packed end to end into `rows`
/// rows (each to the row with the fewest tokens so far, longest first), each attending only
/// within itself with positions from 0; rows shorter than the longest are padded at the end.
/// The same loss and gradients as [`batch`], without computing padding.
pub fn packed(items: &[&Tokenized], rows: usize, max_len: usize, pad: u32, dev: &Device) -> Result<SftBatch> {
    let rows = rows.clamp(1, items.len().max(1));
    let mut seqs: Vec<(Vec<u32>, Vec<u32>)> =
        items.iter().map(|x| inputs_and_labels(x, max_len)).filter(|(x, _)| !x.is_empty()).collect();
    seqs.sort_by_key(|(x, _)| std::cmp::Reverse(x.len()));
    let mut fill: Vec<Vec<usize>> = vec![Vec::new(); rows];
    let mut lens = vec![0usize; rows];
    for (i, (x, _)) in seqs.iter().enumerate() {
        let r = (0..rows).min_by_key(|&r| (lens[r], r)).expect("rows > 0");
        fill[r].push(i);
        lens[r] += x.len();
    }
    let t = lens.iter().copied().max().unwrap_or(0).max(1);
    let (mut inputs, mut labels, mut spans) = (Vec::with_capacity(rows * t), Vec::with_capacity(rows * t), Vec::new());
    for (r, members) in fill.iter().enumerate() {
        let mut at = 0;
        for &i in members {
            let (x, y) = &seqs[i];
            spans.push((r, at, x.len()));
            inputs.extend_from_slice(x);
            labels.extend_from_slice(y);
            at += x.len();
        }
        inputs.extend(std::iter::repeat_n(pad, t - at));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, t - at));
    }
    let n_scored = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    Ok(SftBatch {
        inputs: Tensor::from_vec(inputs, (rows, t), dev)?,
        labels: Tensor::from_vec(labels, (rows, t), dev)?,
        n_scored,
        segments: Some(Segments::new(spans, rows, t)?),
    })
}

/// Pads `items` to the longest (cut to `max_len + 1` tokens from the left) and builds inputs and
/// labels; `pad` fills inputs (its value never matters: nothing attends forward into padding
/// in a causal model, and padded positions are not scored).
pub fn batch(items: &[&Tokenized], max_len: usize, pad: u32, dev: &Device) -> Result<SftBatch> {
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = items.iter().map(|x| inputs_and_labels(x, max_len)).collect();
    let t = seqs.iter().map(|(x, _)| x.len()).max().unwrap_or(0).max(1);
    let mut inputs = Vec::with_capacity(items.len() * t);
    let mut labels = Vec::with_capacity(items.len() * t);
    for (x, y) in &seqs {
        inputs.extend_from_slice(x);
        inputs.extend(std::iter::repeat_n(pad, t - x.len()));
        labels.extend_from_slice(y);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, t - y.len()));
    }
    let n_scored = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    Ok(SftBatch {
        inputs: Tensor::from_vec(inputs, (items.len(), t), dev)?,
        labels: Tensor::from_vec(labels, (items.len(), t), dev)?,
        n_scored,
        segments: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmstack_core::SpecialTokens;

    fn tok() -> Tokenizer {
        Tokenizer::from_chars("abcdefghijklmnopqrstuvwxyz:. \n".chars()).unwrap()
    }

    #[test]
    fn only_assistant_turns_are_scored() {
        let t = tok();
        let fmt = ChatFormat::from_spec("model", &t).unwrap(); // plain: no template in the tokenizer
        let ex = Example::from_value(&json!({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
        .unwrap();
        let x = tokenize(&ex, &t, &fmt, false).unwrap();
        let text = t.decode(&x.ids, false).unwrap();
        assert_eq!(text, "user: hi\nassistant: yo\n");
        let scored: String =
            x.ids.iter().zip(&x.scored).filter(|(_, s)| **s).map(|(i, _)| t.decode(&[*i], false).unwrap()).collect();
        assert_eq!(scored, " yo\n", "the answer and its end of turn, not the generation prompt");
        let all = tokenize(&ex, &t, &fmt, true).unwrap();
        assert_eq!(all.n_scored(), all.ids.len() - 1);
    }

    #[test]
    fn bos_comes_once_when_the_template_writes_it() {
        let mut t = tok();
        t.add_special_tokens(&["<s>"]);
        t.set_special_tokens(SpecialTokens { bos: Some("<s>".into()), ..Default::default() }).unwrap();
        let ex = Example::from_value(&json!({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
        .unwrap();
        let bos = t.bos_id().unwrap();
        let writes = ChatFormat::from_spec("model", &{
            let mut t2 = t.clone();
            t2.set_chat_template(Some(
                "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}".into(),
            ));
            t2
        })
        .unwrap();
        let x = tokenize(&ex, &t, &writes, false).unwrap();
        assert_eq!(x.ids.iter().filter(|&&i| i == bos).count(), 1, "{:?}", t.decode(&x.ids, false));
        assert_eq!(x.ids[0], bos);
        // A template that does not write it: BOS is added.
        let plain = ChatFormat::from_spec("plain", &t).unwrap();
        let y = tokenize(&ex, &t, &plain, false).unwrap();
        assert_eq!((y.ids[0], y.ids.iter().filter(|&&i| i == bos).count()), (bos, 1));
    }

    #[test]
    fn padding_is_never_scored() {
        let t = tok();
        let fmt = ChatFormat::from_spec("plain", &t).unwrap();
        let a =
            tokenize(&Example::Completion { prompt: "ab".into(), completion: "cd".into() }, &t, &fmt, false).unwrap();
        let b = tokenize(&Example::Completion { prompt: "abcdef".into(), completion: "g".into() }, &t, &fmt, false)
            .unwrap();
        let bt = batch(&[&a, &b], 64, 0, &Device::Cpu).unwrap();
        assert_eq!(bt.inputs.dims(), [2, 6]);
        let l = bt.labels.to_vec2::<u32>().unwrap();
        let c = t.token_to_id("c").unwrap();
        let d = t.token_to_id("d").unwrap();
        assert_eq!(l[0], [IGNORE_INDEX, c, d, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(bt.n_scored, 3);
    }

    #[test]
    fn bad_lines_name_the_field_and_uncovered_text_is_refused() {
        for (v, needle) in [
            (json!({"messages": [{"role": "bot", "content": "x"}]}), "messages[0].role"),
            (json!({"messages": [{"role": "user", "content": 3}]}), "messages[0].content"),
            (json!({"messages": [{"role": "user", "content": "x"}]}), "no assistant"),
            (json!({"prompt": "x"}), "expected `messages`"),
            (json!([1]), "object"),
        ] {
            let e = Example::from_value(&v).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let t = tok();
        let fmt = ChatFormat::from_spec("plain", &t).unwrap();
        let e = tokenize(&Example::Completion { prompt: "1 + 2".into(), completion: "3".into() }, &t, &fmt, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'1'") && e.contains("BPE"), "{e}");
    }
}
