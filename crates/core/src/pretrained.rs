//! A model directory in the Hugging Face layout: `config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`. What lmstack writes loads in `transformers`
//! (`AutoModel*.from_pretrained`, `AutoTokenizer.from_pretrained`) and vice versa.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::{Error, Model, Result, Tokenizer};

/// A model with its tokenizer, as stored in one directory.
#[derive(Debug, Clone)]
pub struct Pretrained {
    /// The network.
    pub model: Model,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Where it was loaded from, if anywhere.
    pub dir: Option<PathBuf>,
}

impl Pretrained {
    /// Loads a directory for inference (frozen weights).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                "opening model directory",
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            ));
        }
        let model = Model::load(dir, dtype, device)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        check_vocab(&model, &tokenizer, dir)?;
        Ok(Self { model, tokenizer, dir: Some(dir.to_owned()) })
    }

    /// Writes all four files into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.model.save(dir)?;
        self.tokenizer.save(dir)
    }
}

/// The tokenizer must not produce ids the embedding table lacks.
fn check_vocab(model: &Model, tok: &Tokenizer, dir: &Path) -> Result<()> {
    let (m, t) = (model.config().vocab_size(), tok.vocab_size());
    if t > m {
        return Err(Error::config(
            dir.join("config.json").display().to_string(),
            "vocab_size",
            format!("{m} is smaller than the tokenizer's {t} tokens"),
        ));
    }
    Ok(())
}
