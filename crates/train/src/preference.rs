//! Preference data for DPO and its relatives: a prompt with a chosen and a rejected answer, in
//! the shapes TRL's `DPOTrainer` reads, tokenized with the loss on the answers only.
//!
//! Four line shapes (TRL's "preference" dataset type), text or conversational:
//! - explicit prompt, text: `{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}`;
//! - explicit prompt, conversational: `{"prompt": [{"role": "user", …}], "chosen":
//!   [{"role": "assistant", …}], "rejected": [{"role": "assistant", …}]}`;
//! - implicit prompt: `{"chosen": …, "rejected": …}`, each the whole text or conversation; the
//!   prompt is their common beginning, as TRL's `extract_prompt` finds it (by character, a space
//!   before the first difference going to the answers; or by message).
//!
//! A conversation is rendered with the chat template, a text pair is prompt then answer then the
//! end-of-sequence token (as [`crate::sft`] does for `prompt`/`completion` lines). Only the
//! answer's tokens are scored, never the prompt's, even where the prompt holds earlier
//! assistant turns. A bad line is an error naming `file:line` and the field; a pair whose
//! answers are the same is left out and counted ([`PairFile::identical`]).

use std::path::Path;

use lmstack_core::Tokenizer;
use serde_json::Value;

use crate::sft::{ChatFormat, Example, Tokenized};
use crate::{Error, Result};

/// A prompt or an answer: text, or chat messages `(role, content)`.
#[derive(Debug, Clone, PartialEq)]
pub enum Turns {
    /// Plain text.
    Text(String),
    /// Chat messages.
    Chat(Vec<(String, String)>),
}

impl Turns {
    fn parse(v: &Value, field: &str) -> std::result::Result<Self, String> {
        match v {
            Value::String(s) => Ok(Turns::Text(s.clone())),
            Value::Array(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, m) in list.iter().enumerate() {
                    let role = m["role"].as_str().ok_or_else(|| format!("{field}[{i}].role: expected a string"))?;
                    if !matches!(role, "system" | "user" | "assistant") {
                        return Err(format!("{field}[{i}].role: `{role}` is not system, user or assistant"));
                    }
                    let content =
                        m["content"].as_str().ok_or_else(|| format!("{field}[{i}].content: expected a string"))?;
                    out.push((role.to_owned(), content.to_owned()));
                }
                Ok(Turns::Chat(out))
            }
            other => Err(format!("{field}: expected a string or a list of messages, found {other}")),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Turns::Text(s) => s.is_empty(),
            Turns::Chat(m) => m.is_empty(),
        }
    }
}

/// One preference example.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The context both answers continue (may be empty).
    pub prompt: Turns,
    /// The better answer.
    pub chosen: Turns,
    /// The worse answer.
    pub rejected: Turns,
}

impl Pair {
    /// Parses one JSON line in any of the shapes the module describes; errors name the field.
    pub fn from_value(v: &Value) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("expected a JSON object")?;
        let get = |k: &str| obj.get(k).ok_or_else(|| format!("`{k}` is missing"));
        let chosen = Turns::parse(get("chosen")?, "chosen")?;
        let rejected = Turns::parse(get("rejected")?, "rejected")?;
        let pair = match obj.get("prompt") {
            Some(p) => Pair { prompt: Turns::parse(p, "prompt")?, chosen, rejected },
            None => extract_prompt(chosen, rejected)?,
        };
        let kinds = [&pair.prompt, &pair.chosen, &pair.rejected].map(|t| matches!(t, Turns::Chat(_)));
        if kinds[1] != kinds[2] || (obj.contains_key("prompt") && kinds[0] != kinds[1]) {
            return Err("`prompt`, `chosen` and `rejected` must all be text or all be messages".into());
        }
        for (field, t) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
            if t.is_empty() {
                return Err(format!("`{field}` has no answer once the common prompt is taken out"));
            }
            if let Turns::Chat(m) = t {
                if !m.iter().any(|(r, _)| r == "assistant") {
                    return Err(format!("`{field}` has no assistant turn to score"));
                }
            }
        }
        Ok(pair)
    }

    /// Whether the two answers are the same (nothing to prefer).
    pub fn is_tie(&self) -> bool {
        self.chosen == self.rejected
    }
}

/// TRL's `extract_prompt`: the longest common beginning of `chosen` and `rejected` (characters
/// or messages) is the prompt; a space just before the first difference stays with the answers.
fn extract_prompt(chosen: Turns, rejected: Turns) -> std::result::Result<Pair, String> {
    fn split<T: PartialEq>(a: &[T], b: &[T], is_space: impl Fn(&T) -> bool) -> usize {
        // As TRL's loop: the index of the first difference, or the last index compared.
        let n = a.len().min(b.len());
        let mut idx = n.saturating_sub(1);
        if let Some(i) = (0..n).find(|&i| a[i] != b[i]) {
            idx = i;
            if i > 0 && is_space(&a[i - 1]) {
                idx -= 1;
            }
        }
        idx
    }
    match (chosen, rejected) {
        (Turns::Text(c), Turns::Text(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let idx = split(&cc, &rc, |ch| *ch == ' ');
            let s = |v: &[char]| v.iter().collect::<String>();
            Ok(Pair {
                prompt: Turns::Text(s(&cc[..idx])),
                chosen: Turns::Text(s(&cc[idx..])),
                rejected: Turns::Text(s(&rc[idx..])),
            })
        }
        (Turns::Chat(c), Turns::Chat(r)) => {
            let idx = split(&c, &r, |_| false);
            Ok(Pair {
                prompt: Turns::Chat(c[..idx].to_vec()),
                chosen: Turns::Chat(c[idx..].to_vec()),
                rejected: Turns::Chat(r[idx..].to_vec()),
            })
        }
        _ => Err("`chosen` and `rejected` must both be text or both be messages".into()),
    }
}

/// The pairs of a JSONL file.
#[derive(Debug, Clone)]
pub struct PairFile {
    /// The pairs, in file order (ties left out).
    pub pairs: Vec<Pair>,
    /// The line of each pair in the file (1-based).
    pub lines: Vec<usize>,
    /// Lines whose chosen and rejected answers are the same: left out.
    pub identical: Vec<usize>,
}

/// Reads a JSONL file of preference pairs; a bad line is an error naming `file:line` and the
/// field; pairs with the same two answers are counted, not kept.
pub fn read_pairs(path: &Path) -> Result<PairFile> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    let mut out = PairFile { pairs: Vec::new(), lines: Vec::new(), identical: Vec::new() };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Msg(format!("{at}: not JSON: {e}")))?;
        let pair = Pair::from_value(&v).map_err(|e| Error::Msg(format!("{at}: {e}")))?;
        if pair.is_tie() {
            out.identical.push(i + 1);
        } else {
            out.pairs.push(pair);
            out.lines.push(i + 1);
        }
    }
    if out.pairs.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no preference pairs{}",
            path.display(),
            if out.identical.is_empty() { String::new() } else { " with two different answers".into() }
        )));
    }
    Ok(out)
}

/// The chosen and the rejected sequence of `pair`, each scored on its answer alone (the
/// end-of-turn markup of a chat answer, or the end-of-sequence token after a text one,
/// included), both beginning with the same prompt tokens.
pub fn tokenize_pair(pair: &Pair, tok: &Tokenizer, fmt: &ChatFormat) -> Result<(Tokenized, Tokenized)> {
    let one = |answer: &Turns| -> Result<Tokenized> {
        match (&pair.prompt, answer) {
            (Turns::Text(p), Turns::Text(a)) => {
                crate::sft::tokenize(&Example::Completion { prompt: p.clone(), completion: a.clone() }, tok, fmt, false)
            }
            (Turns::Chat(p), Turns::Chat(a)) => {
                let msgs: Vec<(String, String)> = p.iter().chain(a).cloned().collect();
                crate::sft::tokenize_from(&Example::Chat(msgs), tok, fmt, p.len())
            }
            _ => Err(Error::Msg("the prompt and the answers must all be text or all be messages".into())),
        }
    };
    Ok((one(&pair.chosen)?, one(&pair.rejected)?))
}
