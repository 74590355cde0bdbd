//! Reading training text: the embedded tiny-Shakespeare corpus, a text file, or a directory of
//! `.txt` files; tokenizing it in parallel; splitting it into train and validation parts.

use std::path::{Path, PathBuf};

use lmstack_core::Tokenizer;

use crate::{Error, Result};

/// The tiny Shakespeare corpus (public domain; char-rnn and nanoGPT's classic dataset),
/// embedded so the default run needs no files and no network.
pub const TINY_SHAKESPEARE: &str = include_str!("../../../data/tinyshakespeare.txt");

/// Reads `path` (a file, or a directory whose `.txt` files are read in name order), or the
/// embedded corpus when `None`. Empty input and non-UTF-8 bytes are errors naming the file
/// (and byte offset).
pub fn load(path: Option<&Path>) -> Result<String> {
    let Some(path) = path else {
        return Ok(TINY_SHAKESPEARE.to_owned());
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::Msg(format!("reading directory {}: {e}", path.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt"))
            .collect();
        v.sort();
        if v.is_empty() {
            return Err(Error::Msg(format!("{}: no .txt files in this directory", path.display())));
        }
        v
    } else {
        vec![path.to_owned()]
    };
    let mut text = String::new();
    for f in &files {
        text.push_str(&crate::data::read_utf8(f)?);
    }
    if text.trim().is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(Error::Msg(format!("{}: the training text is empty", names.join(", "))));
    }
    Ok(text)
}

/// Tokenizes `text` in parallel pieces cut after newlines (so no token spans two pieces for
/// tokenizers that split on whitespace), in order.
pub fn tokenize(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    const PIECE: usize = 1 << 16;
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + PIECE).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        if end < text.len() {
            if let Some(nl) = text[end..].find('\n') {
                end += nl + 1;
            } else {
                end = text.len();
            }
        }
        pieces.push(&text[start..end]);
        start = end;
    }
    let ids = tok.encode_batch(&pieces, false)?;
    Ok(ids.concat())
}

/// Splits token ids into train and validation parts: the last `val_fraction` is validation.
pub fn split(tokens: &[u32], val_fraction: f64) -> (&[u32], &[u32]) {
    let n = (tokens.len() as f64 * (1.0 - val_fraction)) as usize;
    tokens.split_at(n)
}
