//! Constrained decoding: the output is valid by construction, not by hoping the model
//! complies. A [`Grammar`] (a JSON schema, a regular expression, a Lark grammar or a list of
//! choices) is compiled by [llguidance](https://github.com/guidance-ai/llguidance) — the
//! library behind structured outputs in llama.cpp, vLLM and mistral.rs — against the model's
//! vocabulary; a [`Constraint`] then masks each step's logits to the tokens the grammar allows
//! there and advances with each sampled token. [`Decoding`](crate::Decoding) applies it.
//!
//! A [`Constrainer`] is made once per tokenizer (it builds the token trie: every token's
//! bytes) and compiles each distinct grammar once, keeping the last 64 compiled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::Value;

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// What the output must match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Grammar {
    /// A JSON value valid against a JSON schema (the schema's canonical JSON text).
    JsonSchema(String),
    /// Text matching a regular expression.
    Regex(String),
    /// Text of a Lark grammar (llguidance's dialect, which also embeds JSON schemas and
    /// regular expressions).
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl Grammar {
    /// A JSON value valid against `schema`, written compactly (`", "` between items, `": "`
    /// after keys, no other whitespace: a small model given free whitespace may write nothing
    /// else). A schema with llguidance's own `x-guidance` options keeps them.
    pub fn json_schema(schema: &Value) -> Grammar {
        let mut schema = schema.clone();
        if let Some(obj) = schema.as_object_mut().filter(|o| !o.contains_key("x-guidance")) {
            obj.insert(
                "x-guidance".into(),
                serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
        }
        Grammar::JsonSchema(schema.to_string())
    }

    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    pub fn json_object() -> Grammar {
        Grammar::json_schema(&serde_json::json!({"type": "object"}))
    }

    /// OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type":
    /// "json_object"}`, or `{"type": "json_schema", "json_schema": {"schema": …}}`. Returns the
    /// grammar and the field it came from; errors name the field (`response_format.type`).
    pub fn from_response_format(v: &Value) -> Result<Option<(&'static str, Grammar)>> {
        match v.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(("response_format", Grammar::json_object()))),
            Some("json_schema") => {
                let schema = v.pointer("/json_schema/schema").filter(|v| v.is_object() || v.is_boolean());
                let schema = schema.ok_or_else(|| {
                    Error::field(
                        "response_format.json_schema.schema",
                        "a json_schema response format needs `json_schema.schema`, a JSON schema object",
                    )
                })?;
                Ok(Some(("response_format.json_schema.schema", Grammar::json_schema(schema))))
            }
            Some(other) => Err(Error::field(
                "response_format.type",
                format!("`{other}` is not a response format; use text, json_object or json_schema"),
            )),
            None => Err(Error::field("response_format.type", "response_format needs a string `type`")),
        }
    }

    /// A JSON schema given as an object (or `true`/`false`) or as JSON text (vLLM's
    /// `guided_json` takes either); `field` names it in errors.
    pub fn from_schema_value(v: &Value, field: &str) -> Result<Grammar> {
        match v {
            Value::String(t) => serde_json::from_str::<Value>(t)
                .map(|schema| Grammar::json_schema(&schema))
                .map_err(|e| Error::field(field, format!("not a JSON schema: {e}"))),
            Value::Object(_) | Value::Bool(_) => Ok(Grammar::json_schema(v)),
            _ => Err(Error::field(field, "expected a JSON schema")),
        }
    }

    /// A choice of strings; `field` names it in errors.
    pub fn from_choices(c: &[String], field: &str) -> Result<Grammar> {
        if c.is_empty() {
            return Err(Error::field(field, "give at least one choice"));
        }
        Ok(Grammar::Choice(c.to_vec()))
    }

    /// vLLM's `structured_outputs`: one of `json` (a schema), `regex`, `choice` (strings),
    /// `grammar` (Lark) or `json_object: true`. Keys set to `null` (or `json_object: false`)
    /// are skipped; errors name the key.
    pub fn from_structured_outputs(v: &Value) -> Result<Vec<Grammar>> {
        let obj = v.as_object().ok_or_else(|| Error::field("structured_outputs", "must be an object"))?;
        let mut found = Vec::new();
        for (k, v) in obj {
            found.push(match (k.as_str(), v) {
                (_, Value::Null) | ("json_object", Value::Bool(false)) => continue,
                ("json", v) => Grammar::from_schema_value(v, "structured_outputs.json")?,
                ("regex", Value::String(r)) => Grammar::Regex(r.clone()),
                ("grammar", Value::String(g)) => Grammar::Lark(g.clone()),
                ("choice", Value::Array(c)) => {
                    let c: Option<Vec<String>> = c.iter().map(|x| x.as_str().map(str::to_owned)).collect();
                    let c = c.ok_or_else(|| Error::field("structured_outputs.choice", "choices must be strings"))?;
                    Grammar::from_choices(&c, "structured_outputs.choice")?
                }
                ("json_object", Value::Bool(true)) => Grammar::json_object(),
                ("regex" | "grammar" | "choice" | "json_object", _) => {
                    return Err(Error::field(format!("structured_outputs.{k}"), "has the wrong type"))
                }
                (other, _) => {
                    return Err(Error::field(
                        format!("structured_outputs.{other}"),
                        "is not supported (json, regex, choice, grammar, json_object are)",
                    ))
                }
            });
        }
        Ok(found)
    }

    fn top_level(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Grammar::JsonSchema(s) => {
                let schema: Value = serde_json::from_str(s).map_err(|e| invalid(format!("not JSON: {e}")))?;
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
            Grammar::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
            Grammar::Choice(c) => {
                if c.is_empty() {
                    return Err(invalid("a choice needs at least one string".into()));
                }
                // Lark string literals: JSON string syntax is a valid spelling of each.
                let alts: Vec<String> = c.iter().map(|s| Value::String(s.clone()).to_string()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
        })
    }
}

fn invalid(message: String) -> Error {
    Error::invalid("grammar", message)
}

/// Compiles grammars for one tokenizer.
pub struct Constrainer {
    factory: ParserFactory,
    vocab_size: usize,
    /// The end-of-sequence token the trie was told (the last token when the tokenizer has
    /// none: ending is then the grammar's own completion).
    eos: TokenId,
    /// Compiled grammars by grammar, with the request each was last used by, and a count of
    /// requests.
    compiled: Mutex<(Compiled, u64)>,
}

impl std::fmt::Debug for Constrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constrainer").finish_non_exhaustive()
    }
}

/// Compiled grammars kept for reuse.
const KEEP: usize = 64;

/// A compiled grammar's parser and when it was last used.
type Compiled = HashMap<Grammar, (TokenParser, u64)>;

impl Constrainer {
    /// Builds the token trie of `tok`'s vocabulary (`vocab_size` rows of logits).
    pub fn new(tok: &Tokenizer, vocab_size: usize) -> Result<Constrainer> {
        let words = token_bytes(tok, vocab_size)?;
        let eos = tok.eos_id().unwrap_or(vocab_size as u32 - 1);
        let mut info = TokRxInfo::new(vocab_size as u32, eos);
        info.tok_bos = tok.bos_id();
        info.tok_pad = tok.pad_id();
        let trie = TokTrie::from(&info, &words);
        let mut env = Env { trie, tok: tok.clone(), canonical: false };
        env.check_canonical();
        let env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| Error::Constraint(format!("preparing the vocabulary: {e}")))?;
        factory.quiet();
        Ok(Constrainer { factory, vocab_size, eos, compiled: Mutex::new((HashMap::new(), 0)) })
    }

    /// A fresh constraint for `grammar` (compiled now, or copied from the last compilation).
    /// A grammar llguidance cannot compile is an error saying why.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint> {
        let parser = {
            let mut guard = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
            let (map, clock) = &mut *guard;
            *clock += 1;
            let now = *clock;
            match map.get_mut(grammar) {
                Some((p, used)) => {
                    *used = now;
                    Some(p.deep_clone())
                }
                None => None,
            }
        };
        let parser = match parser {
            Some(p) => p,
            None => {
                let p = self.factory.create_parser(grammar.top_level()?).map_err(|e| invalid(e.to_string()))?;
                let mut guard = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
                let (map, clock) = &mut *guard;
                if map.len() >= KEEP {
                    if let Some(oldest) = map.iter().min_by_key(|(_, (_, used))| *used).map(|(g, _)| g.clone()) {
                        map.remove(&oldest);
                    }
                }
                map.insert(grammar.clone(), (p.deep_clone(), *clock));
                p
            }
        };
        let mut c = Constraint { matcher: Matcher::new(Ok(parser)), ready: None };
        if let Some(e) = c.matcher.get_error() {
            return Err(invalid(e));
        }
        // The first step's mask (kept by the parser for that step): a grammar whose output
        // this vocabulary cannot even begin is refused now, not mid-generation (llguidance
        // then allows only end-of-sequence, which would end with an invalid empty output).
        const CANNOT_BEGIN: &str = "no token of the vocabulary can begin an output the grammar allows";
        let first = c.matcher.compute_mask().map_err(|e| {
            // llguidance stops with `NoExtensionBias` when no token may come first.
            if e.to_string().starts_with("NoExtensionBias") {
                invalid(CANNOT_BEGIN.into())
            } else {
                invalid(e.to_string())
            }
        })?;
        let begins = (0..self.vocab_size as TokenId).any(|t| t != self.eos && first.is_allowed(t));
        if !begins && !c.matcher.is_accepting().unwrap_or(false) {
            return Err(invalid(CANNOT_BEGIN.into()));
        }
        // Kept for the first step, which then need not compute it again.
        c.ready = Some(first);
        Ok(c)
    }
}

/// One sequence's constraint: which tokens may come next.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The next step's mask, computed ahead by [`Constraint::prepare`].
    ready: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// Sets the logits of the tokens the grammar does not allow next to −∞ (end-of-sequence
    /// is allowed once the output is complete, and only then).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = match self.ready.take() {
            Some(m) => m,
            None => self.matcher.compute_mask().map_err(|e| Error::Constraint(e.to_string()))?,
        };
        if let Some(e) = self.matcher.get_error() {
            return Err(Error::Constraint(e));
        }
        let mut any = false;
        for (i, l) in logits.iter_mut().enumerate() {
            if allowed.is_allowed(i as TokenId) {
                any = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if !any {
            // The grammar needs bytes no token of this vocabulary spells.
            return Err(Error::Constraint("no token of the vocabulary can continue the output here".into()));
        }
        Ok(())
    }

    /// Computes the next step's mask now (e.g. on another thread while the model runs the
    /// step), so that [`Constraint::mask`] only applies it. Does nothing once finished or when
    /// it is already computed.
    pub fn prepare(&mut self) {
        if self.ready.is_none() && !self.matcher.is_stopped() {
            // An error is left for `mask` to report (it computes again and fails the same way).
            self.ready = self.matcher.compute_mask().ok();
        }
    }

    /// Advances past the sampled `token`.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.ready = None;
        self.matcher.consume_token(token).map_err(|e| Error::Constraint(e.to_string()))
    }

    /// The tokens the grammar forces next, without consuming them (empty where it allows a
    /// choice, or when the vocabulary's tokenization of the forced text is not canonical).
    pub fn forced(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// Whether the output is complete and nothing more may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// The vocabulary as llguidance sees it.
struct Env {
    trie: TokTrie,
    tok: Tokenizer,
    /// Whether tokenizing a piece of text gives the tokens the model would see for it
    /// ([`Env::check_canonical`]); forced tokens are fast-forwarded only then.
    canonical: bool,
}

impl Env {
    /// Tokenizes a few pieces of text (with and without a leading space, JSON punctuation) and
    /// checks the tokens spell them back exactly: not so for a tokenizer whose normaliser adds
    /// a leading space (Llama 2's SentencePiece), where a piece is tokenized as if it began a
    /// text.
    fn check_canonical(&mut self) {
        let probes = ["a", " a", "{\"", "ab c", "\": ", "\n", "x"];
        // Only pieces the vocabulary can spell at all tell anything.
        let spelled: Vec<&str> = probes
            .into_iter()
            .filter(|p| self.trie.decode_raw(&self.trie.greedy_tokenize(p.as_bytes())) == p.as_bytes())
            .collect();
        self.canonical = !spelled.is_empty()
            && spelled.iter().all(|p| {
                let ids = self.tokenize_bytes(p.as_bytes());
                self.trie.decode_raw(&ids) == p.as_bytes()
            });
    }
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokenizer's tokens for the longest valid UTF-8 beginning of `s`, then the vocabulary's
    /// longest matches for the bytes of an incomplete character after it.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let valid = match std::str::from_utf8(s) {
            Ok(t) => t.len(),
            Err(e) => e.valid_up_to(),
        };
        let text = std::str::from_utf8(&s[..valid]).unwrap_or_default();
        let mut ids = if text.is_empty() { Vec::new() } else { self.tok.encode(text, false).unwrap_or_default() };
        if valid < s.len() {
            ids.extend(self.trie.greedy_tokenize(&s[valid..]));
        }
        ids
    }

    fn tokenize_is_canonical(&self) -> bool {
        self.canonical
    }
}

/// Every token's bytes: byte-level (GPT-2 style) and byte-fallback (SentencePiece) vocabularies
/// through llguidance's reading of `tokenizer.json`; others (character vocabularies, WordPiece)
/// as their text. Special tokens carry llguidance's marker so they never match text.
fn token_bytes(tok: &Tokenizer, vocab_size: usize) -> Result<Vec<Vec<u8>>> {
    let json: Value = serde_json::from_str(&tok.inner().to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut words = match llguidance::token_bytes_from_tokenizer_json(&json) {
        Ok(w) => w,
        Err(_) => {
            let mut w = vec![Vec::new(); vocab_size];
            if let Some(vocab) = json["model"]["vocab"].as_object() {
                for (text, id) in vocab {
                    if let Some(id) = id.as_u64().map(|i| i as usize).filter(|&i| i < vocab_size) {
                        w[id] = text.replace('▁', " ").into_bytes();
                    }
                }
            }
            for t in json["added_tokens"].as_array().into_iter().flatten() {
                if let (Some(id), Some(text)) = (t["id"].as_u64(), t["content"].as_str()) {
                    if (id as usize) < vocab_size {
                        let mut b = text.as_bytes().to_vec();
                        if t["special"] == true {
                            b.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
                        }
                        w[id as usize] = b;
                    }
                }
            }
            w
        }
    };
    words.resize(vocab_size, Vec::new());
    Ok(words)
}
