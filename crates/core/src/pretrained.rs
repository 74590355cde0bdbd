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
    ///
    /// `dir` may also be a GGUF file: model, tokenizer and chat template all come from it
    /// ([`crate::gguf`]).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            let (model, tokenizer) = crate::gguf::load_model(dir, dtype, device)?;
            check_vocab(&model, &tokenizer, dir)?;
            return Ok(Self { model, tokenizer, dir: Some(dir.to_owned()) });
        }
        if !dir.is_dir() {
            return Err(Error::io(
                "opening model directory",
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "neither a model directory nor a GGUF file"),
            ));
        }
        let model = Model::load(dir, dtype, device)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        check_vocab(&model, &tokenizer, dir)?;
        Ok(Self { model, tokenizer, dir: Some(dir.to_owned()) })
    }

    /// Writes all four files into `dir`, all or (on an error) none of them. `config.json` gets the tokenizer's `bos_token_id` and
    /// `eos_token_id` (null when it has none) unless the model's config already names them:
    /// otherwise `transformers` falls back to GPT-2's 50256, outside a small vocabulary.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut cfg = self.model.config_json();
        if let Some(obj) = cfg.as_object_mut() {
            for (key, id) in [("bos_token_id", self.tokenizer.bos_id()), ("eos_token_id", self.tokenizer.eos_id())] {
                obj.entry(key).or_insert(id.map_or(serde_json::Value::Null, serde_json::Value::from));
            }
        }
        // All four change together: a failure (a full disk) leaves the directory as it was.
        let mut files = crate::io::FileSet::in_dir(dir)?;
        self.model.stage(dir, &cfg, &mut files)?;
        self.tokenizer.stage(dir, &mut files)?;
        files.commit()
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
