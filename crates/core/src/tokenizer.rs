//! Tokenizers on the Hugging Face `tokenizers` crate: loading `tokenizer.json` with the special
//! tokens and chat template of `tokenizer_config.json`, training byte-level BPE and
//! character-level vocabularies, encoding and decoding, and an incremental decoder for
//! streaming.
//!
//! Files are written in the standard layout, so Python `tokenizers` and
//! `transformers.AutoTokenizer` load a directory lmstack writes.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::AddedToken;

use crate::{Error, Result};

/// The special tokens a model directory declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<String>,
    /// End of sequence.
    pub eos: Option<String>,
    /// Padding.
    pub pad: Option<String>,
    /// Unknown.
    pub unk: Option<String>,
    /// Mask (masked-LM models).
    pub mask: Option<String>,
}

/// Token ids with the byte span each covers in the encoded text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedText {
    /// The token ids.
    pub ids: Vec<u32>,
    /// `(start, end)` byte offsets into the text, one per token.
    pub offsets: Vec<(usize, usize)>,
}

/// A tokenizer with its special tokens and chat template. Cheap to clone.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    special: SpecialTokens,
    chat_template: Option<String>,
    model_max_length: Option<usize>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Reads a special-token entry that is either a string or an `AddedToken` object.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Wraps a `tokenizers::Tokenizer` with the given special tokens.
    pub fn new(inner: tokenizers::Tokenizer, special: SpecialTokens) -> Self {
        Self { inner: Arc::new(inner), special, chat_template: None, model_max_length: None }
    }

    /// Loads `tokenizer.json` from `dir`, plus `tokenizer_config.json` (special tokens, chat
    /// template, `model_max_length`) and `chat_template.jinja` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut tok = Self::from_file(&path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let cfg: Value = crate::io::read_json(&cfg_path)?;
            tok.special = SpecialTokens {
                bos: token_str(cfg.get("bos_token")),
                eos: token_str(cfg.get("eos_token")),
                pad: token_str(cfg.get("pad_token")),
                unk: token_str(cfg.get("unk_token")),
                mask: token_str(cfg.get("mask_token")),
            };
            for (name, t) in [
                ("bos_token", &tok.special.bos),
                ("eos_token", &tok.special.eos),
                ("pad_token", &tok.special.pad),
                ("unk_token", &tok.special.unk),
                ("mask_token", &tok.special.mask),
            ] {
                if let Some(t) = t {
                    if tok.inner.token_to_id(t).is_none() {
                        return Err(Error::config(
                            cfg_path.display().to_string(),
                            name,
                            format!("`{t}` is not in the vocabulary of tokenizer.json"),
                        ));
                    }
                }
            }
            tok.chat_template = match cfg.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
                Some(other) => {
                    return Err(Error::config(
                        cfg_path.display().to_string(),
                        "chat_template",
                        format!("expected a string or a list of {{name, template}}, found {other}"),
                    ))
                }
            };
            // transformers stores a huge sentinel when the length is unknown.
            tok.model_max_length = cfg
                .get("model_max_length")
                .and_then(Value::as_f64)
                .filter(|&n| n > 0.0 && n < 1e12)
                .map(|n| n as usize);
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            tok.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io("reading", &jinja, e))?);
        }
        Ok(tok)
    }

    /// Loads a bare `tokenizer.json` (no special-token configuration).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::new(inner, SpecialTokens::default()))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`: both or (on an error)
    /// neither.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut files = crate::io::FileSet::in_dir(dir)?;
        self.stage(dir, &mut files)?;
        files.commit()
    }

    /// Stages `tokenizer.json` and `tokenizer_config.json` in `dir` into `files`.
    pub fn stage(&self, dir: &Path, files: &mut crate::io::FileSet) -> Result<()> {
        let text = self.inner.to_string(true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        files.write(&dir.join("tokenizer.json"), text.as_bytes())?;
        files.write_json(&dir.join("tokenizer_config.json"), &self.config_json())
    }

    /// The `tokenizer_config.json` content.
    pub fn config_json(&self) -> Value {
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
        });
        let m = cfg.as_object_mut().expect("object literal");
        for (k, v) in [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("pad_token", &self.special.pad),
            ("unk_token", &self.special.unk),
            ("mask_token", &self.special.mask),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), Value::String(v.clone()));
            }
        }
        if let Some(t) = &self.chat_template {
            m.insert("chat_template".into(), Value::String(t.clone()));
        }
        if let Some(n) = self.model_max_length {
            m.insert("model_max_length".into(), json!(n));
        }
        cfg
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The special tokens.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Sets the special tokens; each must be in the vocabulary.
    pub fn set_special_tokens(&mut self, special: SpecialTokens) -> Result<()> {
        for t in [&special.bos, &special.eos, &special.pad, &special.unk, &special.mask].into_iter().flatten() {
            if self.inner.token_to_id(t).is_none() {
                return Err(Error::Tokenizer(format!("special token `{t}` is not in the vocabulary")));
            }
        }
        self.special = special;
        Ok(())
    }

    /// Adds special tokens (e.g. `[MASK]`) that are not yet in the vocabulary; returns how many
    /// were added. New tokens take the next ids.
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> usize {
        let new: Vec<AddedToken> = tokens
            .iter()
            .filter(|t| self.inner.token_to_id(t).is_none())
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        if new.is_empty() {
            return 0;
        }
        Arc::make_mut(&mut self.inner).add_special_tokens(&new)
    }

    /// The chat template (Jinja), if the tokenizer has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Sets the chat template.
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// Renders `messages` with the chat template (see [`crate::chat`]); an error if the
    /// tokenizer has none. Encode the result with `add_special_tokens = false`: templates write
    /// their own `bos_token`.
    pub fn apply_chat_template(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let src = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::invalid("chat_template", "the tokenizer has no chat template"))?;
        crate::chat::ChatTemplate::new(src)?.render(messages, add_generation_prompt, &self.special, &Default::default())
    }

    /// `model_max_length` from the configuration, if set.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Sets `model_max_length`.
    pub fn set_model_max_length(&mut self, n: Option<usize>) {
        self.model_max_length = n;
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the end-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The id of the beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The id of the padding token.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The id of the mask token.
    pub fn mask_id(&self) -> Option<u32> {
        self.special.mask.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Encodes `text`; `add_special_tokens` applies the post-processor (e.g. BERT's `[CLS]`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// Encodes `text`, also returning each token's byte span in `text`.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<EncodedText> {
        let e = self.inner.encode(text, add_special_tokens)?;
        Ok(EncodedText { ids: e.get_ids().to_vec(), offsets: e.get_offsets().to_vec() })
    }

    /// Encodes a long `text` (no special tokens) a piece of about `piece_bytes` at a time, so
    /// memory is that of one piece rather than of the whole (the `tokenizers` crate keeps about
    /// 100 bytes a token and 16 a byte of text while encoding). A cut is made only where it
    /// changes nothing for this tokenizer, as checked on the text's own beginning (cut at every
    /// candidate place of its first 4 KiB, the ids must equal those of that beginning whole):
    /// anywhere for a character tokenizer; before a space that follows a non-space for
    /// byte-level BPE, WordPiece and Metaspace tokenizers; nowhere (the text encoded whole)
    /// for a normaliser that prepends to the text (SentencePiece's `▁`). The ids are
    /// `encode(text, false)`'s.
    pub fn encode_long(&self, text: &str, piece_bytes: usize) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        self.encode_pieces(text, piece_bytes, |piece| {
            ids.extend(piece);
            Ok::<_, Error>(())
        })?;
        Ok(ids)
    }

    /// [`Tokenizer::encode_long`] handing each piece's ids to `f` as they are made, so a caller
    /// can store them (packed, on disk) without holding them all twice.
    pub fn encode_pieces<E: From<Error>>(
        &self,
        text: &str,
        piece_bytes: usize,
        mut f: impl FnMut(Vec<u32>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        if text.len() <= piece_bytes.max(1) {
            return f(self.encode(text, false)?);
        }
        let anywhere = |t: &str, i: usize| t.is_char_boundary(i);
        let before_space = |t: &str, i: usize| t.as_bytes()[i] == b' ' && !t.as_bytes()[i - 1].is_ascii_whitespace();
        let can_cut: &dyn Fn(&str, usize) -> bool = if self.cuts_keep_ids(text, &anywhere)? {
            &anywhere
        } else if self.cuts_keep_ids(text, &before_space)? {
            &before_space
        } else {
            return f(self.encode(text, false)?);
        };
        let mut start = 0;
        while start < text.len() {
            // The first cut at or after `piece_bytes` on (a piece may run long to find one).
            let mut end = (start + piece_bytes.max(1)).min(text.len());
            while end < text.len() && !can_cut(text, end) {
                end += 1;
            }
            f(self.encode(&text[start..end], false)?)?;
            start = end;
        }
        Ok(())
    }

    /// Whether cutting `text`'s first 4 KiB at every place `can_cut` allows gives the ids of
    /// that beginning whole (and there is such a place).
    fn cuts_keep_ids(&self, text: &str, can_cut: &dyn Fn(&str, usize) -> bool) -> Result<bool> {
        let mut end = 4096.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let probe = &text[..end];
        let cuts: Vec<usize> = (1..probe.len()).filter(|&i| can_cut(probe, i)).collect();
        if cuts.is_empty() {
            return Ok(false);
        }
        let mut pieces = Vec::new();
        let mut from = 0;
        for &c in cuts.iter().chain(std::iter::once(&probe.len())) {
            pieces.extend(self.encode(&probe[from..c], false)?);
            from = c;
        }
        Ok(pieces == self.encode(probe, false)?)
    }

    /// Encodes several texts (in parallel where the crate allows).
    pub fn encode_batch(&self, texts: &[&str], add_special_tokens: bool) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.to_vec();
        let enc = self.inner.encode_batch(inputs, add_special_tokens)?;
        Ok(enc.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        Ok(self.inner.decode(ids, skip_special_tokens)?)
    }

    /// A streaming decoder that emits only complete UTF-8 text.
    pub fn incremental_decoder(&self, skip_special_tokens: bool) -> IncrementalDecoder {
        IncrementalDecoder { tok: self.clone(), ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special_tokens }
    }

    /// Trains a byte-level BPE tokenizer (GPT-2 style) on `files` with `vocab_size` tokens,
    /// `special` tokens first. The first special token serves as bos, eos and unk.
    pub fn train_bpe(files: &[&Path], vocab_size: usize, special: &[&str]) -> Result<Self> {
        let min = ByteLevel::alphabet().len() + special.len();
        if vocab_size < min {
            return Err(Error::invalid(
                "vocab_size",
                format!("{vocab_size} is below the {min} tokens of the byte alphabet and special tokens"),
            ));
        }
        check_files(files)?;
        let specials: Vec<AddedToken> = special.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut tok = tokenizers::Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        tok.with_post_processor(Some(ByteLevelProcessor::new(false, true, true)));
        let paths: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        tok.train_from_files(&mut trainer, paths)?;
        let first = special.first().map(|s| s.to_string());
        let special = SpecialTokens { bos: first.clone(), eos: first.clone(), unk: first, ..Default::default() };
        Ok(Self::new(tok, special))
    }

    /// Builds a character-level tokenizer (nanoGPT style): one token per distinct character
    /// of `files`, ids in sorted character order, plus `<unk>` last for characters never seen.
    pub fn train_chars(files: &[&Path]) -> Result<Self> {
        check_files(files)?;
        let mut chars = BTreeSet::new();
        for f in files {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io("reading", *f, e))?;
            chars.extend(text.chars());
        }
        Self::from_chars(chars)
    }

    /// A character-level tokenizer over `chars` (see [`Tokenizer::train_chars`]).
    pub fn from_chars(chars: impl IntoIterator<Item = char>) -> Result<Self> {
        // Inserted one at a time: `collect` into a set first gathers every item in a vector
        // to sort it (4 bytes a character of the corpus).
        let mut set = BTreeSet::new();
        chars.into_iter().for_each(|c| {
            set.insert(c);
        });
        let chars = set;
        let unk = "<unk>".to_string();
        let mut vocab = serde_json::Map::new();
        for (i, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        vocab.insert(unk.clone(), json!(chars.len()));
        // A BPE model without merges maps each character to its own token; the `Fuse`
        // decoder joins tokens without separators.
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{
                "id": chars.len(), "content": unk, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }],
            "normalizer": null,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": []
            }
        });
        let tok = tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes())?;
        Ok(Self::new(tok, SpecialTokens { unk: Some(unk), ..Default::default() }))
    }
}

fn check_files(files: &[&Path]) -> Result<()> {
    if files.is_empty() {
        return Err(Error::invalid("files", "no training files given"));
    }
    for f in files {
        if !f.is_file() {
            return Err(Error::io("reading", *f, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")));
        }
    }
    Ok(())
}

/// Turns a stream of token ids into text pieces that are always complete UTF-8 characters.
///
/// Byte-level tokens may split a multi-byte character; the decoder holds such bytes back until
/// the character is complete. Decoding a window that starts at an earlier token keeps
/// tokenizers that strip a leading space (SentencePiece) correct.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tok: Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// Adds one token and returns the new complete text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Returns whatever is still held back (at the end of the stream); incomplete bytes
    /// decode to U+FFFD.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let prefix = self.tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(Some(full[prefix.len()..].to_string()))
        } else {
            Ok(None)
        }
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Length of the common beginning of two token sequences.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
