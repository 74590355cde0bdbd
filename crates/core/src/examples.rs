//! Examples as token ids: a conversation rendered with a chat template, or a prompt and its
//! completion, with the mask of the tokens a loss scores. Finetuning (SFT, preference tuning,
//! reward models) and reward scoring in evals tokenize through here, so a text becomes the same
//! ids wherever it is trained on or scored.
//!
//! A conversation's rendering is incremental, as torchtune and TRL mask: the conversation
//! rendered up to each message, the difference being that message's text, so a template's own
//! markup lands on the right side of the mask. A prompt/completion pair is not given a chat
//! template (as TRL treats non-conversational data): prompt, completion, then the
//! end-of-sequence token when the tokenizer has one.

use serde_json::{json, Value};

use candle_core::{Device, Tensor};

use crate::{Error, Result, Tokenizer};

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

/// A prompt or an answer: text, or chat messages `(role, content)` (the fields of TRL's
/// preference and prompt-only datasets).
#[derive(Debug, Clone, PartialEq)]
pub enum Turns {
    /// Plain text.
    Text(String),
    /// Chat messages.
    Chat(Vec<(String, String)>),
}

impl Turns {
    /// A JSON string or list of messages; errors name `field`.
    pub fn parse(v: &Value, field: &str) -> std::result::Result<Self, String> {
        match v {
            Value::String(s) => Ok(Turns::Text(s.clone())),
            Value::Array(list) => Ok(Turns::Chat(parse_messages(list, field)?)),
            other => Err(format!("{field}: expected a string or a list of messages, found {other}")),
        }
    }

    /// No text, or no messages.
    pub fn is_empty(&self) -> bool {
        match self {
            Turns::Text(s) => s.is_empty(),
            Turns::Chat(m) => m.is_empty(),
        }
    }

    /// As JSON: the string, or the list of `{"role", "content"}` messages.
    pub fn to_value(&self) -> Value {
        match self {
            Turns::Text(s) => json!(s),
            Turns::Chat(m) => Value::Array(m.iter().map(|(r, c)| json!({"role": r, "content": c})).collect()),
        }
    }

    /// An answer of this prompt's kind: one assistant message, or the text.
    pub fn answer(&self, text: &str) -> Turns {
        match self {
            Turns::Chat(_) => Turns::Chat(vec![("assistant".into(), text.to_owned())]),
            Turns::Text(_) => Turns::Text(text.to_owned()),
        }
    }

    /// This prompt answered with `answer`: the conversation with an assistant turn, or the
    /// text with its completion.
    pub fn answered(&self, answer: &str) -> Example {
        match self {
            Turns::Chat(m) => {
                let mut m = m.clone();
                m.push(("assistant".into(), answer.to_owned()));
                Example::Chat(m)
            }
            Turns::Text(p) => Example::Completion { prompt: p.clone(), completion: answer.to_owned() },
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

/// How conversations become text: a chat template compiled once, and its source when it is
/// not the tokenizer's own (to save with the finetuned model).
#[derive(Debug)]
pub struct ChatFormat {
    template: crate::chat::ChatTemplate,
    source: Option<String>,
}

impl ChatFormat {
    /// `model` (the tokenizer's template, else `plain`), `plain`, `chatml`, or a template file.
    pub fn from_spec(spec: &str, tok: &Tokenizer) -> Result<Self> {
        let source = match spec {
            "model" if tok.chat_template().is_some() => None,
            "model" | "plain" => Some(crate::chat::PLAIN.to_owned()),
            "chatml" => {
                if let Some(t) = crate::chat::CHATML_TOKENS.iter().find(|t| tok.token_to_id(t).is_none()) {
                    return Err(Error::field(
                        "chat_template",
                        format!("chatml: the tokenizer has no `{t}` token (its vocabulary would have to grow); use `plain` or a model that has ChatML's tokens"),
                    ));
                }
                Some(crate::chat::CHATML.to_owned())
            }
            file => Some(std::fs::read_to_string(file).map_err(|e| {
                Error::field("chat_template", format!("`{file}` is not model, plain, chatml or a readable file: {e}"))
            })?),
        };
        let src = source.as_deref().or(tok.chat_template()).unwrap_or_default();
        Ok(Self { template: crate::chat::ChatTemplate::new(src)?, source })
    }

    /// The template source to save with the finetuned model (`None`: the tokenizer's own).
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// Renders `msgs` (role, content) with the tokenizer's special tokens.
    pub fn render(&self, tok: &Tokenizer, msgs: &[(String, String)], add_generation_prompt: bool) -> Result<String> {
        let v: Vec<Value> = msgs.iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
        self.template.render(&Value::Array(v), add_generation_prompt, tok.special_tokens(), &Default::default())
    }

    /// The markup around an assistant answer after `prompt`: the text the template writes
    /// between its generation prompt and the answer's content (ChatML: none; `plain`: the
    /// space after `assistant:`), and the text that ends the turn (`<|im_end|>\n`, `\n`).
    /// A sampled answer is its text less the first, stopped at the second. `None` when the
    /// conversation with an answer does not begin with the generation prompt.
    pub fn answer_markup(&self, tok: &Tokenizer, prompt: &[(String, String)]) -> Result<Option<(String, String)>> {
        const MARK: &str = "\u{e000}answer\u{e000}";
        let open = self.render(tok, prompt, true)?;
        let mut msgs = prompt.to_vec();
        msgs.push(("assistant".into(), MARK.into()));
        let full = self.render(tok, &msgs, false)?;
        Ok(full.strip_prefix(open.as_str()).and_then(|rest| {
            let at = rest.find(MARK)?;
            Some((rest[..at].to_owned(), rest[at + MARK.len()..].to_owned()))
        }))
    }
}

/// A tokenized example: input ids and, per position, the label (next token or [`IGNORE_INDEX`](crate::kernels::ops::IGNORE_INDEX)).
#[derive(Debug, Clone, Default, PartialEq)]
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
            return Err(Error::Tokenizer(format!(
                "the vocabulary has no token for {}; use a model whose tokenizer covers the text (a byte-level BPE covers any text)",
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

/// The ids an answer to `prompt` is generated after: the prompt as [`tokenize`] writes it
/// before an answer (BOS, pieces encoded as training encodes them, the template's generation
/// prompt), so a sampled answer continues the very context a preference loss will score it in.
pub fn answer_context(prompt: &Turns, tok: &Tokenizer, fmt: &ChatFormat) -> Result<Vec<u32>> {
    let first = match prompt {
        Turns::Chat(msgs) => msgs.len(),
        Turns::Text(_) => 0,
    };
    // With an empty answer, the first scored token is its end-of-turn markup (or the EOS
    // after a text prompt): the context is all before it.
    Ok(context_of(&scored_from(&prompt.answered(""), tok, fmt, false, first)?))
}

/// The ids before the first scored one.
fn context_of(t: &Tokenized) -> Vec<u32> {
    let n = t.scored.iter().position(|&s| s).unwrap_or(t.ids.len());
    t.ids[..n].to_vec()
}

fn not_incremental(i: usize) -> Error {
    Error::field("chat_template", format!(
        "the chat template does not render messages incrementally (the conversation up to message {i} is not a prefix of the next); the loss mask cannot be placed"
    ))
}

/// Right-pads whole sequences with `pad` into `[b, t]` inputs (all of each sequence: a reward
/// model reads its last token too).
pub fn pad_right(rows: &[&[u32]], pad: u32, dev: &Device) -> Result<Tensor> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(pad, t - r.len()));
    }
    Ok(Tensor::from_vec(ids, (rows.len(), t), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpecialTokens;

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

    /// An answer is generated after exactly the ids training scores it after, and the
    /// template's markup around an answer is found for plain, ChatML and a template that ends
    /// a turn with one token and no newline (as Llama 3's `<|eot_id|>`).
    #[test]
    fn answers_continue_the_context_training_scores_them_in() {
        let mut t = tok();
        t.add_special_tokens(&["<s>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"]);
        t.set_special_tokens(SpecialTokens { bos: Some("<s>".into()), ..Default::default() }).unwrap();
        let prompt = vec![("system".to_owned(), "be brief".to_owned()), ("user".to_owned(), "hi".to_owned())];
        let eot = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n\n{{ m.content }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}";
        let file = std::env::temp_dir().join(format!("lmstack-answer-markup-{}.jinja", std::process::id()));
        std::fs::write(&file, eot).unwrap();
        for (spec, open, close) in
            [("plain", " ", "\n"), ("chatml", "", "<|im_end|>\n"), (file.to_str().unwrap(), "", "<|eot_id|>")]
        {
            let fmt = ChatFormat::from_spec(spec, &t).unwrap();
            let markup = fmt.answer_markup(&t, &prompt).unwrap();
            assert_eq!(markup, Some((open.to_owned(), close.to_owned())), "{spec}");
            let ctx = answer_context(&Turns::Chat(prompt.clone()), &t, &fmt).unwrap();
            let mut whole = prompt.clone();
            whole.push(("assistant".into(), "yo".into()));
            let x = tokenize_from(&Example::Chat(whole), &t, &fmt, prompt.len()).unwrap();
            let first = x.scored.iter().position(|&s| s).unwrap();
            assert_eq!(ctx, x.ids[..first], "{spec}: {:?}", t.decode(&ctx, false));
            assert_eq!(t.decode(&x.ids[first..], false).unwrap(), format!("{open}yo{close}"), "{spec}");
        }
        let _ = std::fs::remove_file(&file);
        // A text prompt: BOS and the prompt, as a completion is scored after it.
        let fmt = ChatFormat::from_spec("plain", &t).unwrap();
        let ctx = answer_context(&Turns::Text("hi ".into()), &t, &fmt);
        assert_eq!(t.decode(&ctx.unwrap(), false).unwrap(), "<s>hi ");
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
