//! `train tokenizer`: train a byte-level BPE or character-level tokenizer.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use lmstack_core::Tokenizer;

#[derive(Args, Debug)]
pub(crate) struct TokenizerArgs {
    /// Text files to train on.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// `bpe` (byte-level) or `char`.
    #[arg(long, default_value = "bpe")]
    kind: String,
    /// Vocabulary size (bpe).
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Output directory for tokenizer.json and tokenizer_config.json.
    #[arg(long)]
    out: PathBuf,
    /// Train on the raw text instead of the cleaned text (NFC, control characters removed,
    /// whitespace normalised, as `train data` cleans it).
    #[arg(long)]
    no_clean: bool,
}

pub(crate) fn tokenizer_cmd(a: &TokenizerArgs) -> Result<ExitCode> {
    // Clean each input into a scratch directory first, so the vocabulary is learnt on the same
    // text `train data` would tokenize.
    let scratch = a.out.join(".clean-inputs.tmp");
    let cleaned: Vec<PathBuf> = if a.no_clean {
        a.input.clone()
    } else {
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let mut v = Vec::new();
        for (i, f) in a.input.iter().enumerate() {
            let text = lmstack_train::corpus::load(Some(f))?;
            let p = scratch.join(format!("{i}.txt"));
            std::fs::write(&p, lmstack_train::data::clean::clean(&text))
                .with_context(|| format!("writing {}", p.display()))?;
            v.push(p);
        }
        v
    };
    let files: Vec<&std::path::Path> = cleaned.iter().map(PathBuf::as_path).collect();
    let tok = match a.kind.as_str() {
        "bpe" => Tokenizer::train_bpe(&files, a.vocab_size, &["<|endoftext|>"]),
        "char" => Tokenizer::train_chars(&files),
        other => Err(lmstack_core::Error::invalid("kind", format!("`{other}`: expected bpe or char"))),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    let tok = tok?;
    tok.save(&a.out)?;
    println!("{} tokenizer, {} tokens, saved to {}", a.kind, tok.vocab_size(), a.out.display());
    Ok(ExitCode::SUCCESS)
}
