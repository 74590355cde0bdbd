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

    /// The chat format a reward model reads conversations in: its tokenizer's template, else
    /// `plain`, as training rendered them. Refused when the model is not a reward model (a
    /// sequence classifier with one label).
    pub fn reward_format(&self) -> Result<crate::examples::ChatFormat> {
        if self.model.config().score_labels() != Some(1) {
            return Err(Error::invalid(
                "model",
                "rewards need a reward model (a …ForSequenceClassification directory with one label)",
            ));
        }
        crate::examples::ChatFormat::from_spec("model", &self.tokenizer)
    }

    /// An example as a reward model (a sequence classifier with one label: [`Model::score`])
    /// reads it: tokenized as finetuning tokenized its pairs ([`crate::examples::tokenize`])
    /// with `fmt`, the model's own chat template ([`Pretrained::reward_format`]). Refused when
    /// the example is longer than the model's context.
    pub fn reward_tokens(
        &self,
        example: &crate::examples::Example,
        fmt: &crate::examples::ChatFormat,
    ) -> Result<Vec<u32>> {
        let ids = crate::examples::tokenize(example, &self.tokenizer, fmt, false)?.ids;
        if ids.len() > self.model.max_len() {
            return Err(Error::ContextOverflow { len: ids.len(), max: self.model.max_len() });
        }
        Ok(ids)
    }

    /// The reward of each sequence ([`Pretrained::reward_tokens`]), `batch` at a time, padded on
    /// the right with the config's `pad_token_id` (one at a time without one).
    pub fn rewards(&self, rows: &[Vec<u32>], batch: usize) -> Result<Vec<f64>> {
        let pad = self.model.config().token_id("pad_token_id");
        let batch = if pad.is_some() { batch.max(1) } else { 1 };
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(batch) {
            let chunk: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let ids = crate::examples::pad_right(&chunk, pad.unwrap_or(0), self.model.device())?;
            let s = crate::grad::no_grad(|| self.model.score(&ids))?;
            out.extend(s.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        Ok(out)
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
