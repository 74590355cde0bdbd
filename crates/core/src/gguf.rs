//! GGUF files (llama.cpp, Ollama, LM Studio): a model, its tokenizer and its chat template in
//! one file, with weights that may be quantized.
//!
//! The file is parsed by candle's [`gguf_file`] reader; this module maps what it holds onto
//! lmstack's types:
//! - the `{arch}.*` metadata onto a [`ModelConfig`] (only what the network honours; a key that
//!   would change the network and is not implemented is refused naming the key);
//! - `tokenizer.ggml.*` onto a `tokenizer.json` equal to the one `transformers` ships with the
//!   model (GPT-2-style byte-level BPE with its pre-tokenizer, or a SentencePiece vocabulary
//!   with scores, whose merges are derived as `tokenizers`' converter derives them), with the
//!   special tokens and `tokenizer.chat_template`;
//! - tensors onto Hugging Face names. Quantized tensors (Q4_0, Q4_1, Q8_0, k-quants …) stay
//!   quantized: the [`ParamStore`] hands the model a placeholder and keeps the [`QTensor`],
//!   which [`crate::nn::Linear`] then multiplies as such. F32/F16/BF16 tensors become ordinary
//!   tensors of the model's dtype.
//!
//! Architectures: `llama` (Llama, SmolLM; Mistral's files are `llama` ones, without a window),
//! `qwen2`, `qwen3` (as the families of [`crate::config::Family`]) and `gpt2`.
//!
//! llama.cpp stores a `llama` model's query and key projections with the rows of each head
//! interleaved for its rotary layout (`convert_hf_to_gguf.py`'s `permute`); they are put back in
//! the "rotate half" order `transformers` and lmstack use. Rows are whole quantization blocks,
//! so this is a reordering of bytes and keeps quantized weights exact. `qwen2` and `qwen3`
//! rotate halves themselves and are stored unpermuted.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};

use crate::config::{Family, ModelConfig};
use crate::params::ParamStore;
use crate::tokenizer::{SpecialTokens, Tokenizer};
use crate::{Error, Result};

/// Whether `path` names a GGUF file (by its first four bytes, `GGUF`).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    if !path.is_file() {
        return false;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// A parsed GGUF file: its metadata and tensor directory (tensors are read on demand).
pub struct GgufFile {
    path: std::path::PathBuf,
    content: gguf_file::Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("metadata", &self.content.metadata.len())
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

/// The weights of a GGUF model under Hugging Face names.
#[derive(Debug)]
pub struct GgufTensors {
    /// The type every unquantized matrix (rank-2 tensor) had in the file, where all had the
    /// same narrower one (F16 or BF16); else F32.
    pub matrix_dtype: DType,
    /// Unquantized tensors (F32, F16, BF16 in the file), as f32.
    pub plain: HashMap<String, Tensor>,
    /// Quantized tensors, kept as they are in the file.
    pub quantized: HashMap<String, Arc<QTensor>>,
    /// The quantized tensors whose Hugging Face layout is the transpose of the file's (GPT-2's
    /// `Conv1D` weights, `[in, out]`): the model's placeholder has the Hugging Face shape, the
    /// quantized weight the file's `[out, in]`, as a projection computes with it.
    pub transposed: std::collections::HashSet<String>,
}

impl GgufFile {
    /// Reads the header (metadata and tensor directory) of `path`; a truncated or corrupt file is
    /// an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io("reading", path, e))?;
        let mut reader = std::io::BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| Error::Weight {
            file: path.display().to_string(),
            name: "<header>".into(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self { path: path.to_owned(), content })
    }

    /// The file name used in errors.
    fn source(&self) -> String {
        self.path.display().to_string()
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GValue> {
        self.content.metadata.get(key)
    }

    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(self.source(), key, msg)
    }

    fn req(&self, key: &str) -> Result<&GValue> {
        self.get(key).ok_or_else(|| self.err(key, "missing from the GGUF metadata"))
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("expected a string, found {:?}", v.value_type()))),
        }
    }

    fn uint(&self, key: &str) -> Result<Option<u64>> {
        use GValue::*;
        let v = match self.get(key) {
            None => return Ok(None),
            Some(U8(v)) => *v as u64,
            Some(U16(v)) => *v as u64,
            Some(U32(v)) => *v as u64,
            Some(U64(v)) => *v,
            Some(I8(v)) if *v >= 0 => *v as u64,
            Some(I16(v)) if *v >= 0 => *v as u64,
            Some(I32(v)) if *v >= 0 => *v as u64,
            Some(I64(v)) if *v >= 0 => *v as u64,
            Some(v) => return Err(self.err(key, format!("expected a non-negative integer, found {v:?}"))),
        };
        Ok(Some(v))
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.uint(key)?.map(|v| v as usize).ok_or_else(|| self.err(key, "missing from the GGUF metadata"))
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::F32(v)) => Ok(Some(*v as f64)),
            Some(GValue::F64(v)) => Ok(Some(*v)),
            Some(_) => self.uint(key).map(|v| v.map(|v| v as f64)),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected a boolean, found {:?}", v.value_type()))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let GValue::Array(items) = self.req(key)? else {
            return Err(self.err(key, "expected an array of strings"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                GValue::String(s) => Ok(s.clone()),
                other => {
                    Err(self.err(&format!("{key}[{i}]"), format!("expected a string, found {:?}", other.value_type())))
                }
            })
            .collect()
    }

    fn numbers(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let GValue::Array(items) = v else {
            return Err(self.err(key, "expected an array of numbers"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                use GValue::*;
                Ok(match v {
                    U8(x) => *x as f64,
                    I8(x) => *x as f64,
                    U16(x) => *x as f64,
                    I16(x) => *x as f64,
                    U32(x) => *x as f64,
                    I32(x) => *x as f64,
                    U64(x) => *x as f64,
                    I64(x) => *x as f64,
                    F32(x) => *x as f64,
                    F64(x) => *x,
                    other => {
                        return Err(self
                            .err(&format!("{key}[{i}]"), format!("expected a number, found {:?}", other.value_type())))
                    }
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String> {
        self.string("general.architecture")?
            .ok_or_else(|| self.err("general.architecture", "missing from the GGUF metadata"))
    }

    /// `general.name`, if present.
    pub fn name(&self) -> Option<String> {
        self.string("general.name").ok().flatten()
    }

    /// The model configuration from the `{arch}.*` metadata, as `transformers` would write it
    /// in `config.json` (token ids from `tokenizer.ggml.*`, `general.name` as `_name_or_path`).
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        if arch == "gpt2" {
            return self.gpt2_config();
        }
        // llama.cpp's architectures of the Llama block; Mistral's files are `llama` ones.
        let Some(family) = Family::ALL.into_iter().find(|&f| f != Family::Mistral && llama_cpp_arch(f) == arch) else {
            return Err(self.err(
                "general.architecture",
                format!(
                    "`{arch}` is not supported; GGUF files of architecture `llama` (Llama, SmolLM, Mistral without a \
                     window), `qwen2`, `qwen3`, `gemma2`, `gemma3`, `phi3` and `gpt2` load"
                ),
            ));
        };
        let k = |s: &str| format!("{arch}.{s}");
        for key in [k("expert_count"), k("expert_used_count")] {
            if self.uint(&key)?.unwrap_or(0) > 0 {
                return Err(self.err(&key, "mixture-of-experts models are not supported"));
            }
        }
        let rope_scaling = match self.string(&k("rope.scaling.type"))?.as_deref() {
            None | Some("none") => None,
            Some("linear") => {
                let factor = self.float(&k("rope.scaling.factor"))?.unwrap_or(1.0);
                Some(json!({"rope_type": "linear", "factor": factor}))
            }
            Some(t) => {
                return Err(self.err(&k("rope.scaling.type"), format!("`{t}` RoPE scaling is not supported")));
            }
        };
        for name in ["rope_factors_long.weight", "rope_factors_short.weight"] {
            if self.content.tensor_infos.contains_key(name) {
                return Err(Error::Weight {
                    file: self.source(),
                    name: name.into(),
                    message: "LongRoPE factors (Phi-3's long-context models) are not supported".into(),
                });
            }
        }
        // llama.cpp windows Gemma's local layers and every Phi-3 layer; its `llama`, `qwen2`
        // and `qwen3` have no window.
        let window = self.uint(&k("attention.sliding_window"))?.filter(|&w| w > 0);
        if let (Some(_), Family::Llama | Family::Qwen2 | Family::Qwen3) = (window, family) {
            return Err(self.err(&k("attention.sliding_window"), "sliding-window attention is not supported here"));
        }
        let hidden = self.usize_req(&k("embedding_length"))?;
        let heads = self.usize_req(&k("attention.head_count"))?;
        let kv_heads = self.uint(&k("attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(heads);
        if heads == 0 {
            return Err(self.err(&k("attention.head_count"), "must be at least 1"));
        }
        let head_dim = self.uint(&k("attention.key_length"))?.map(|v| v as usize).unwrap_or(hidden / heads);
        if let Some(v) = self.uint(&k("attention.value_length"))? {
            if v as usize != head_dim {
                return Err(
                    self.err(&k("attention.value_length"), format!("{v} differs from the key length {head_dim}"))
                );
            }
        }
        let rotary = self.uint(&k("rope.dimension_count"))?.map_or(head_dim, |r| r as usize);
        if rotary != head_dim && (family != Family::Phi3 || rotary > head_dim || rotary % 2 != 0) {
            return Err(self.err(
                &k("rope.dimension_count"),
                format!("{rotary} differs from the head width {head_dim}; only phi3 rotates part of a head"),
            ));
        }
        let vocab = match self.uint(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => self.strings("tokenizer.ggml.tokens")?.len(),
        };
        let mut cfg = Map::new();
        cfg.insert("model_type".into(), json!(family.model_type()));
        cfg.insert("architectures".into(), json!([family.causal_lm_class()]));
        cfg.insert("vocab_size".into(), json!(vocab));
        cfg.insert("hidden_size".into(), json!(hidden));
        cfg.insert("intermediate_size".into(), json!(self.usize_req(&k("feed_forward_length"))?));
        cfg.insert("num_hidden_layers".into(), json!(self.usize_req(&k("block_count"))?));
        cfg.insert("num_attention_heads".into(), json!(heads));
        cfg.insert("num_key_value_heads".into(), json!(kv_heads));
        // Always given: a family's own default (Qwen3's 128) is not hidden / heads.
        cfg.insert("head_dim".into(), json!(head_dim));
        cfg.insert("max_position_embeddings".into(), json!(self.usize_req(&k("context_length"))?));
        let eps = self.float(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5);
        // Stored as f32 in the file: print the f32's shortest decimal (1e-5, not 9.99…e-6).
        cfg.insert("rms_norm_eps".into(), json!((eps as f32).to_string().parse::<f64>().unwrap_or(eps)));
        let theta = self.float(&k("rope.freq_base"))?.unwrap_or(10000.0);
        cfg.insert("rope_theta".into(), json!((theta as f32).to_string().parse::<f64>().unwrap_or(theta)));
        cfg.insert("hidden_act".into(), json!("silu"));
        cfg.insert("tie_word_embeddings".into(), json!(!self.content.tensor_infos.contains_key("output.weight")));
        if family != Family::Qwen2 {
            // (Qwen2's query, key and value projections always have biases, its output none.)
            let bias = self.content.tensor_infos.contains_key("blk.0.attn_q.bias");
            cfg.insert("attention_bias".into(), json!(bias));
        }
        if let Some(s) = rope_scaling {
            cfg.insert("rope_scaling".into(), s);
        }
        if self.content.tensor_infos.contains_key(ROPE_FREQS) {
            // Llama 3.1's scaling, as llama.cpp's converter stores it: a divisor per frequency.
            let file = std::fs::File::open(&self.path).map_err(|e| Error::io("reading", &self.path, e))?;
            let bad = |message: String| Error::Weight { file: self.source(), name: ROPE_FREQS.into(), message };
            let t = self
                .content
                .tensor(&mut std::io::BufReader::new(file), ROPE_FREQS, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| bad(e.to_string()))?;
            let theta = self.float(&k("rope.freq_base"))?.unwrap_or(10000.0);
            let fit = llama3_scaling_of(&t, rotary, theta).ok_or_else(|| {
                bad(format!(
                    "{} per-frequency RoPE divisors that are not Llama 3.1's scaling (low/high frequency factors 1 or \
                     2 / 2, 4 or 8, an original context of 2K to 128K); other factors are not supported",
                    t.len()
                ))
            })?;
            cfg.insert("rope_scaling".into(), fit);
        }
        if let Some(w) = window {
            cfg.insert("sliding_window".into(), json!(w));
        }
        match family {
            Family::Gemma2 | Family::Gemma3 => {
                cfg.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
                cfg.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
                if window.is_none() {
                    cfg.insert("sliding_window".into(), Value::Null);
                }
                // llama.cpp scales scores by width / heads in the 27B models (46 and 62 layers),
                // by head_dim otherwise: transformers' query_pre_attn_scalar of each.
                let layers = self.usize_req(&k("block_count"))?;
                let big = (family == Family::Gemma2 && layers == 46) || (family == Family::Gemma3 && layers == 62);
                cfg.insert("query_pre_attn_scalar".into(), json!(if big { hidden / heads } else { head_dim }));
                if family == Family::Gemma2 {
                    // llama.cpp's defaults where the file says nothing.
                    for (key, field, default) in [
                        ("attn_logit_softcapping", "attn_logit_softcapping", 50.0),
                        ("final_logit_softcapping", "final_logit_softcapping", 30.0),
                    ] {
                        let v = self.float(&k(key))?.unwrap_or(default);
                        cfg.insert(field.into(), json!((v as f32).to_string().parse::<f64>().unwrap_or(v)));
                    }
                } else {
                    let local = self.float(&k("rope.freq_base_swa"))?.unwrap_or(10000.0);
                    cfg.insert("rope_local_base_freq".into(), json!(local));
                    let pattern = self.uint(&k("attention.sliding_window_pattern"))?.unwrap_or(6);
                    cfg.insert("sliding_window_pattern".into(), json!(pattern));
                }
            }
            Family::Phi3 => {
                if rotary != head_dim {
                    cfg.insert("partial_rotary_factor".into(), json!(rotary as f64 / head_dim as f64));
                }
                if let Some(n) = self.uint(&k("rope.scaling.original_context_length"))? {
                    cfg.insert("original_max_position_embeddings".into(), json!(n));
                }
            }
            _ => {}
        }
        for (field, key) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(id) = self.uint(key)? {
                cfg.insert(field.into(), json!(id));
            }
        }
        if let Some(name) = self.name() {
            cfg.insert("_name_or_path".into(), json!(name));
        }
        ModelConfig::from_value(Value::Object(cfg), &self.source())
    }

    /// [`GgufFile::config`] of a `gpt2` file: llama.cpp's GPT-2 (learned positions, LayerNorm
    /// with biases, a fused query/key/value projection, GELU with the tanh approximation).
    fn gpt2_config(&self) -> Result<ModelConfig> {
        let k = |s: &str| format!("gpt2.{s}");
        let hidden = self.usize_req(&k("embedding_length"))?;
        let heads = self.usize_req(&k("attention.head_count"))?;
        if heads == 0 || hidden % heads != 0 {
            return Err(self.err(&k("attention.head_count"), format!("{heads} heads do not divide the width {hidden}")));
        }
        if let Some(kv) = self.uint(&k("attention.head_count_kv"))? {
            if kv as usize != heads {
                return Err(self.err(&k("attention.head_count_kv"), "GPT-2 has as many key/value heads as query heads"));
            }
        }
        let vocab = match self.uint(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => self.strings("tokenizer.ggml.tokens")?.len(),
        };
        let eps = self.float(&k("attention.layer_norm_epsilon"))?.unwrap_or(1e-5);
        let mut cfg = Map::new();
        cfg.insert("model_type".into(), json!("gpt2"));
        cfg.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
        cfg.insert("vocab_size".into(), json!(vocab));
        cfg.insert("n_embd".into(), json!(hidden));
        cfg.insert("n_head".into(), json!(heads));
        cfg.insert("n_layer".into(), json!(self.usize_req(&k("block_count"))?));
        cfg.insert("n_positions".into(), json!(self.usize_req(&k("context_length"))?));
        cfg.insert("n_inner".into(), json!(self.usize_req(&k("feed_forward_length"))?));
        cfg.insert("activation_function".into(), json!("gelu_new"));
        cfg.insert("layer_norm_epsilon".into(), json!((eps as f32).to_string().parse::<f64>().unwrap_or(eps)));
        cfg.insert("tie_word_embeddings".into(), json!(!self.content.tensor_infos.contains_key("output.weight")));
        for (field, key) in
            [("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")]
        {
            if let Some(id) = self.uint(key)? {
                cfg.insert(field.into(), json!(id));
            }
        }
        if let Some(name) = self.name() {
            cfg.insert("_name_or_path".into(), json!(name));
        }
        ModelConfig::from_value(Value::Object(cfg), &self.source())
    }

    /// The tokenizer from `tokenizer.ggml.*`, with special tokens, the chat template and the
    /// context length as `model_max_length`.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self
            .string("tokenizer.ggml.model")?
            .ok_or_else(|| self.err("tokenizer.ggml.model", "missing from the GGUF metadata"))?;
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let types = self.numbers("tokenizer.ggml.token_type")?;
        if let Some(t) = &types {
            if t.len() != tokens.len() {
                return Err(
                    self.err("tokenizer.ggml.token_type", format!("{} entries for {} tokens", t.len(), tokens.len()))
                );
            }
        }
        let id = |key: &str| -> Result<Option<u32>> {
            match self.uint(key)? {
                None => Ok(None),
                Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
                Some(i) => Err(self.err(key, format!("{i} is outside the vocabulary of {} tokens", tokens.len()))),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let pad = id("tokenizer.ggml.padding_token_id")?;
        let unk = id("tokenizer.ggml.unknown_token_id")?;
        let add_bos = self.boolean("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama");
        let add_eos = self.boolean("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let tok_of = |i: Option<u32>| i.map(|i| tokens[i as usize].clone());
        let json = match model.as_str() {
            "gpt2" => {
                let merges = self.strings("tokenizer.ggml.merges")?;
                let pre = self.string("tokenizer.ggml.pre")?.unwrap_or_else(|| "default".into());
                gpt2_tokenizer_json(&tokens, types.as_deref(), &merges, &pre)
                    .map_err(|m| self.err("tokenizer.ggml.pre", m))?
            }
            "llama" => {
                let scores = self.numbers("tokenizer.ggml.scores")?.ok_or_else(|| {
                    self.err("tokenizer.ggml.scores", "missing; a SentencePiece vocabulary needs scores")
                })?;
                if scores.len() != tokens.len() {
                    return Err(self
                        .err("tokenizer.ggml.scores", format!("{} scores for {} tokens", scores.len(), tokens.len())));
                }
                let prefix = self.boolean("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                spm_tokenizer_json(&tokens, types.as_deref(), &scores, tok_of(unk), prefix)
            }
            other => {
                return Err(self.err(
                    "tokenizer.ggml.model",
                    format!(
                    "`{other}` tokenizers are not supported; `gpt2` (byte-level BPE) and `llama` (SentencePiece) are"
                ),
                ))
            }
        };
        let mut json = json;
        if add_bos || add_eos {
            let special = |on: bool, tid: Option<u32>, key: &str| -> Result<Option<(String, u32)>> {
                match (on, tid) {
                    (false, _) => Ok(None),
                    (true, Some(i)) => Ok(Some((tokens[i as usize].clone(), i))),
                    (true, None) => Err(self.err(key, "missing, but the tokenizer adds that token")),
                }
            };
            let b = special(add_bos, bos, "tokenizer.ggml.bos_token_id")?;
            let e = special(add_eos, eos, "tokenizer.ggml.eos_token_id")?;
            let piece = |t: &Option<(String, u32)>, type_id: u32| {
                t.as_ref().map(|(t, _)| json!({"SpecialToken": {"id": t, "type_id": type_id}}))
            };
            let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
            let single: Vec<Value> = [piece(&b, 0), Some(seq("A", 0)), piece(&e, 0)].into_iter().flatten().collect();
            let pair: Vec<Value> =
                [piece(&b, 0), Some(seq("A", 0)), piece(&e, 0), piece(&b, 1), Some(seq("B", 1)), piece(&e, 1)]
                    .into_iter()
                    .flatten()
                    .collect();
            let specials: Map<String, Value> = [&b, &e]
                .into_iter()
                .flatten()
                .map(|(t, i)| (t.clone(), json!({"id": t, "ids": [i], "tokens": [t]})))
                .collect();
            let template =
                json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials});
            let post = match json.get("post_processor") {
                Some(p) if !p.is_null() => json!({"type": "Sequence", "processors": [p.clone(), template]}),
                _ => template,
            };
            json["post_processor"] = post;
        }
        let text = serde_json::to_string(&json).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| {
            Error::Tokenizer(format!("{}: the tokenizer built from tokenizer.ggml.*: {e}", self.source()))
        })?;
        let special =
            SpecialTokens { bos: tok_of(bos), eos: tok_of(eos), pad: tok_of(pad), unk: tok_of(unk), mask: None };
        let mut tok = Tokenizer::new(inner, special);
        tok.set_chat_template(self.string("tokenizer.chat_template")?);
        let arch = self.architecture()?;
        tok.set_model_max_length(self.uint(&format!("{arch}.context_length"))?.map(|v| v as usize));
        Ok(tok)
    }

    /// Reads every tensor under its Hugging Face name for `config` (a Llama or GPT-2 model).
    /// Unquantized tensors become f32 in the Hugging Face layout; quantized ones stay as they
    /// are (a GPT-2 `Conv1D` weight then stays `[out, in]`: [`GgufTensors::transposed`]). An
    /// unknown tensor, a shape that disagrees with the config, or a tensor type candle cannot
    /// compute with is an error naming the tensor.
    pub fn tensors(&self, config: &ModelConfig) -> Result<GgufTensors> {
        let map = tensor_map(config).map_err(|e| self.err("general.architecture", e))?;
        let arch = match config {
            ModelConfig::Gpt2(_) => "gpt2",
            ModelConfig::Llama(c) => llama_cpp_arch(c.family),
            ModelConfig::Bert(_) => "bert",
        };
        if let Some(e) = map.iter().find(|e| e.required && !self.content.tensor_infos.contains_key(e.gg.as_str())) {
            return Err(Error::Weight { file: self.source(), name: e.gg.clone(), message: "is missing".into() });
        }
        let by_name: HashMap<&str, &TensorEntry> = map.iter().map(|e| (e.gg.as_str(), e)).collect();
        let file = std::fs::File::open(&self.path).map_err(|e| Error::io("reading", &self.path, e))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut out = GgufTensors {
            matrix_dtype: DType::F32,
            plain: HashMap::new(),
            quantized: HashMap::new(),
            transposed: Default::default(),
        };
        // The quantized matrices go to one arena (see WeightArena), sized from the file's index.
        let quantized_bytes = self
            .content
            .tensor_infos
            .values()
            .filter(|i| is_block_quantized(i.ggml_dtype))
            .map(|i| i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size());
        let arena =
            crate::kernels::quant::WeightArena::new(crate::kernels::quant::WeightArena::size_for(quantized_bytes))
                .map_err(|e| Error::io("allocating the weights of", &self.path, e))?;
        // The types of the unquantized matrices: (F16 seen, BF16 seen, F32 seen).
        let mut matrix_types = (false, false, false);
        // In file order: one sequential pass over the data.
        let mut names: Vec<(&String, u64)> = self.content.tensor_infos.iter().map(|(n, i)| (n, i.offset)).collect();
        names.sort_by_key(|&(_, o)| o);
        for (name, _) in names {
            let bad = |message: String| Error::Weight { file: self.source(), name: name.clone(), message };
            if name == ROPE_FREQS {
                // Read into the config's `rope_scaling` (`GgufFile::config`).
                continue;
            }
            let entry = by_name.get(name.as_str()).ok_or_else(|| {
                bad(format!("not a tensor of a {arch} model of this configuration that lmstack knows"))
            })?;
            let hf = entry.hf.clone();
            let info = &self.content.tensor_infos[name];
            let mut want = entry.shape.clone();
            if entry.layout == Layout::Transpose {
                want.reverse();
            }
            if info.shape.dims() != want.as_slice() {
                return Err(bad(format!("has shape {:?} (as {hf}), the metadata implies {want:?}", info.shape.dims())));
            }
            check_type(info.ggml_dtype).map_err(bad)?;
            let mut q = self.content.tensor(&mut reader, name, &Device::Cpu).map_err(|e| bad(format!("{e}")))?;
            let heads = match entry.layout {
                Layout::Permute(h) => Some(h),
                _ => None,
            };
            if is_block_quantized(q.dtype()) {
                if q.shape().rank() != 2 {
                    return Err(bad(format!("a quantized tensor of shape {:?}; only matrices are", q.shape().dims())));
                }
                let order = heads.map(|h| file_rows(q.shape().dims()[0], h)).transpose().map_err(bad)?;
                if entry.layout == Layout::Transpose {
                    out.transposed.insert(hf.clone());
                }
                out.quantized.insert(hf, Arc::new(arena.adopt(q, order.as_deref()).map_err(bad)?));
                continue;
            }
            if let Some(h) = heads {
                q = unpermute_rows(&q, h).map_err(bad)?;
            }
            match q.dtype() {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                    if q.shape().rank() == 2 {
                        match q.dtype() {
                            GgmlDType::F16 => matrix_types.0 = true,
                            GgmlDType::BF16 => matrix_types.1 = true,
                            _ => matrix_types.2 = true,
                        }
                    }
                    let mut t = q.dequantize(&Device::Cpu).map_err(|e| bad(e.to_string()))?;
                    if entry.layout == Layout::Transpose {
                        t = t.t()?.contiguous()?;
                    }
                    if entry.layout == Layout::PlusOne {
                        t = (t - 1.0)?;
                    }
                    out.plain.insert(hf, t);
                }
                other => return Err(bad(format!("tensor type {other:?} is not supported"))),
            }
        }
        out.matrix_dtype = match matrix_types {
            (true, false, false) => DType::F16,
            (false, true, false) => DType::BF16,
            _ => DType::F32,
        };
        Ok(out)
    }

    /// A frozen [`ParamStore`] over [`GgufFile::tensors`], with the type the file held its
    /// unquantized matrices in ([`GgufTensors::matrix_dtype`]).
    pub fn param_store(&self, config: &ModelConfig) -> Result<(ParamStore, DType)> {
        let t = self.tensors(config)?;
        Ok((ParamStore::frozen_quantized(t.plain, t.quantized, &t.transposed, &self.source()), t.matrix_dtype))
    }
}

/// Whether `t` is a block-quantized type (not f32, f16 or bf16).
fn is_block_quantized(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Tensor types candle computes with on the CPU (others are refused, named).
fn check_type(t: GgmlDType) -> std::result::Result<(), String> {
    use GgmlDType::*;
    match t {
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => Ok(()),
        #[allow(unreachable_patterns)]
        other => Err(format!("tensor type {other:?} is not supported")),
    }
}

/// One tensor of a model as llama.cpp names and lays it out.
struct TensorEntry {
    /// llama.cpp's name.
    gg: String,
    /// The Hugging Face name.
    hf: String,
    /// The Hugging Face shape.
    shape: Vec<usize>,
    layout: Layout,
    /// Whether a file without it is refused (the others are read where present).
    required: bool,
}

/// Every tensor a Llama or GPT-2 model of `config` has, in llama.cpp's order: what
/// [`write_model`] writes and [`GgufFile::tensors`] reads.
fn tensor_map(config: &ModelConfig) -> std::result::Result<Vec<TensorEntry>, String> {
    let mut out = Vec::new();
    let mut push = |gg: String, hf: String, shape: Vec<usize>, layout: Layout, required: bool| {
        out.push(TensorEntry { gg, hf, shape, layout, required })
    };
    match config {
        ModelConfig::Llama(cfg) => {
            let (d, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
            let (hd, q, kv) =
                (cfg.head_dim(), cfg.num_attention_heads * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
            // llama.cpp's `llama` rotates interleaved pairs, so its converter permutes the query
            // and key rows; Qwen's architectures rotate halves as Hugging Face does.
            let (hq, hkv) = match llama_cpp_arch(cfg.family) {
                "llama" => (Layout::Permute(cfg.num_attention_heads), Layout::Permute(cfg.kv_heads())),
                _ => (Layout::Same, Layout::Same),
            };
            // Gemma's norms are stored as their scales (`1 + w`).
            let norm = if cfg.family.is_gemma() { Layout::PlusOne } else { Layout::Same };
            push("token_embd.weight".into(), "model.embed_tokens.weight".into(), vec![v, d], Layout::Same, true);
            for i in 0..cfg.num_hidden_layers {
                let (qkv_bias, o_bias) = (cfg.qkv_bias(), cfg.o_bias());
                let mut named = |gg: &str, hf: &str, shape: Vec<usize>, layout: Layout| {
                    let (gg, hf) = (format!("blk.{i}.{gg}.weight"), format!("model.layers.{i}.{hf}.weight"));
                    push(gg, hf, shape, layout, true)
                };
                if cfg.qk_norm() {
                    named("attn_q_norm", "self_attn.q_norm", vec![hd], norm);
                    named("attn_k_norm", "self_attn.k_norm", vec![hd], norm);
                }
                if cfg.family.is_gemma() {
                    // llama.cpp's names: `ffn_norm` is the norm before the MLP.
                    named("post_attention_norm", "post_attention_layernorm", vec![d], norm);
                    named("ffn_norm", "pre_feedforward_layernorm", vec![d], norm);
                    named("post_ffw_norm", "post_feedforward_layernorm", vec![d], norm);
                } else {
                    named("ffn_norm", "post_attention_layernorm", vec![d], Layout::Same);
                }
                named("attn_norm", "input_layernorm", vec![d], norm);
                let mut projections =
                    vec![("attn_output", "self_attn.o_proj", vec![d, q], Some(d), Layout::Same, o_bias)];
                if cfg.fused_projections() {
                    // Phi-3: llama.cpp's `ffn_up` is the fused gate and up projection.
                    let qkv = q + 2 * kv;
                    projections.extend([
                        ("attn_qkv", "self_attn.qkv_proj", vec![qkv, d], Some(qkv), Layout::Same, qkv_bias),
                        ("ffn_up", "mlp.gate_up_proj", vec![2 * f, d], Some(2 * f), Layout::Same, false),
                    ]);
                } else {
                    projections.extend([
                        ("attn_q", "self_attn.q_proj", vec![q, d], Some(q), hq, qkv_bias),
                        ("attn_k", "self_attn.k_proj", vec![kv, d], Some(kv), hkv, qkv_bias),
                        ("attn_v", "self_attn.v_proj", vec![kv, d], Some(kv), Layout::Same, qkv_bias),
                        ("ffn_gate", "mlp.gate_proj", vec![f, d], Some(f), Layout::Same, false),
                        ("ffn_up", "mlp.up_proj", vec![f, d], Some(f), Layout::Same, false),
                    ]);
                }
                projections.push(("ffn_down", "mlp.down_proj", vec![d, f], Some(d), Layout::Same, false));
                for (gg, hf, w, b, layout, b_required) in projections {
                    let (gg, hf) = (format!("blk.{i}.{gg}"), format!("model.layers.{i}.{hf}"));
                    push(format!("{gg}.weight"), format!("{hf}.weight"), w, layout, true);
                    if let Some(b) = b {
                        push(format!("{gg}.bias"), format!("{hf}.bias"), vec![b], layout, b_required);
                    }
                }
            }
            push("output_norm.weight".into(), "model.norm.weight".into(), vec![d], norm, true);
            if !cfg.tie_word_embeddings {
                push("output.weight".into(), "lm_head.weight".into(), vec![v, d], Layout::Same, true);
            }
        }
        ModelConfig::Gpt2(cfg) => {
            let (d, v, f) = (cfg.n_embd, cfg.vocab_size, cfg.inner());
            push("token_embd.weight".into(), "transformer.wte.weight".into(), vec![v, d], Layout::Same, true);
            push(
                "position_embd.weight".into(),
                "transformer.wpe.weight".into(),
                vec![cfg.n_positions, d],
                Layout::Same,
                true,
            );
            for i in 0..cfg.n_layer {
                for (gg, hf, w, b, layout) in [
                    ("attn_norm", "ln_1", vec![d], d, Layout::Same),
                    ("attn_qkv", "attn.c_attn", vec![d, 3 * d], 3 * d, Layout::Transpose),
                    ("attn_output", "attn.c_proj", vec![d, d], d, Layout::Transpose),
                    ("ffn_norm", "ln_2", vec![d], d, Layout::Same),
                    ("ffn_up", "mlp.c_fc", vec![d, f], f, Layout::Transpose),
                    ("ffn_down", "mlp.c_proj", vec![f, d], d, Layout::Transpose),
                ] {
                    let (gg, hf) = (format!("blk.{i}.{gg}"), format!("transformer.h.{i}.{hf}"));
                    push(format!("{gg}.weight"), format!("{hf}.weight"), w, layout, true);
                    push(format!("{gg}.bias"), format!("{hf}.bias"), vec![b], Layout::Same, true);
                }
            }
            push("output_norm.weight".into(), "transformer.ln_f.weight".into(), vec![d], Layout::Same, true);
            push("output_norm.bias".into(), "transformer.ln_f.bias".into(), vec![d], Layout::Same, true);
            if !cfg.tie_word_embeddings {
                push("output.weight".into(), "lm_head.weight".into(), vec![v, d], Layout::Same, true);
            }
        }
        ModelConfig::Bert(_) => {
            return Err("only gpt2 and the Llama-block families (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3) are read from and written to GGUF".into())
        }
    }
    Ok(out)
}

/// llama.cpp's tensor of per-frequency RoPE divisors (Llama 3.1's scaling).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The divisor of each RoPE frequency that Llama 3.1's `scaling` makes (what llama.cpp's
/// converter writes as `rope_freqs.weight`), for `dim` rotated dimensions with base `theta`.
fn llama3_divisors(scaling: &crate::config::RopeScaling, dim: usize, theta: f64) -> Vec<f64> {
    let (plain, _) = crate::config::RopeScaling::None.frequencies(dim, theta);
    let (scaled, _) = scaling.frequencies(dim, theta);
    plain.iter().zip(&scaled).map(|(p, s)| p / s).collect()
}

/// The `rope_scaling` of type `llama3` whose divisors are `divisors` (within 1e-5, relative),
/// searched over the values Llama 3.1–3.3 and their derivatives publish; `None` if none fits.
fn llama3_scaling_of(divisors: &[f32], dim: usize, theta: f64) -> Option<Value> {
    let factor = *divisors.last()? as f64;
    if divisors.len() != dim / 2 || !(factor.is_finite() && factor > 0.0) {
        return None;
    }
    for original in [8192.0, 4096.0, 2048.0, 16384.0, 32768.0, 65536.0, 131072.0] {
        for (low, high) in [(1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0)] {
            let s = crate::config::RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            };
            let fits = llama3_divisors(&s, dim, theta)
                .iter()
                .zip(divisors)
                .all(|(a, &b)| (a - b as f64).abs() <= 1e-5 * a.abs().max(1.0));
            if fits {
                let factor = (factor as f32).to_string().parse::<f64>().unwrap_or(factor);
                return Some(json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original as u64,
                }));
            }
        }
    }
    None
}

/// The llama.cpp architecture (`general.architecture`) of a family of the Llama block: Mistral
/// is converted as `llama`.
fn llama_cpp_arch(family: Family) -> &'static str {
    match family {
        Family::Llama | Family::Mistral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
        Family::Gemma2 => "gemma2",
        Family::Gemma3 => "gemma3",
        Family::Phi3 => "phi3",
    }
}

/// The inverse of llama.cpp's `permute` of a query/key projection with `heads` heads: for each
/// row of the Hugging Face weight, the row of the file holding it (row `h*hd + j*hd/2 + i` of
/// the Hugging Face weight is row `h*hd + 2i + j` of the file).
fn file_rows(rows: usize, heads: usize) -> std::result::Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!("{rows} rows do not split into {heads} heads of even width"));
    }
    let hd = rows / heads;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                order[h * hd + j * hd / 2 + i] = h * hd + 2 * i + j;
            }
        }
    }
    Ok(order)
}

/// `q` with its rows in Hugging Face order (see [`file_rows`]); rows (whole blocks of a
/// quantized tensor) are moved as bytes.
fn unpermute_rows(q: &QTensor, heads: usize) -> std::result::Result<QTensor, String> {
    let dims = q.shape().dims().to_vec();
    let order = file_rows(dims[0], heads)?;
    let data = q.data().map_err(|e| e.to_string())?;
    let row_bytes = data.len() / order.len();
    if row_bytes * order.len() != data.len() {
        return Err(format!("{} bytes do not divide into {} rows", data.len(), order.len()));
    }
    let mut out = vec![0u8; data.len()];
    for (dst, &src) in out.chunks_exact_mut(row_bytes).zip(&order) {
        dst.copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, q.dtype()).map_err(|e| e.to_string())?;
    QTensor::new(storage, dims).map_err(|e| e.to_string())
}

/// GGUF token types (`llama_token_type`).
const TYPE_UNKNOWN: u32 = 2;
const TYPE_CONTROL: u32 = 3;
const TYPE_USER_DEFINED: u32 = 4;

/// `added_tokens` entries: control and unknown tokens as special tokens, user-defined ones as
/// plain added tokens (as `transformers`' converters declare them).
fn added_tokens(tokens: &[String], types: Option<&[f64]>, normalized_user: bool) -> Vec<Value> {
    let Some(types) = types else { return Vec::new() };
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter_map(|(i, (t, &ty))| {
            let ty = ty as u32;
            let special = matches!(ty, TYPE_CONTROL | TYPE_UNKNOWN);
            if !special && ty != TYPE_USER_DEFINED {
                return None;
            }
            Some(json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": !special && normalized_user, "special": special,
            }))
        })
        .collect()
}

/// Pre-tokenizer regular expressions of llama.cpp's `tokenizer.ggml.pre` values, as the
/// models' own `tokenizer.json` files state them.
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.json` for a GPT-2-style byte-level BPE vocabulary.
fn gpt2_tokenizer_json(
    tokens: &[String],
    types: Option<&[f64]>,
    merges: &[String],
    pre: &str,
) -> std::result::Result<Value, String> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let (normalizer, pre_tokenizer) = match pre {
        "default" | "gpt2" | "gpt-2" | "phi-2" | "olmo" | "starcoder" | "refact" | "jina-es" | "jina-de" => {
            (Value::Null, byte_level(true))
        }
        // SmolLM: digits one by one, then GPT-2's split.
        "smollm" | "stablelm2" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "pixtral" => {
            (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(REGEX_LLAMA3), byte_level(false)]}))
        }
        "qwen2" | "deepseek-r1-qwen" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(REGEX_QWEN2), byte_level(false)]}),
        ),
        other => return Err(format!("`{other}` pre-tokenization is not supported")),
    };
    let vocab: Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    if vocab.len() != tokens.len() {
        return Err(format!("the vocabulary of {} tokens has duplicates", tokens.len()));
    }
    let merges: Vec<Value> = merges.iter().map(|m| Value::String(m.clone())).collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types, false),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

/// `tokenizer.json` for a SentencePiece (BPE-type) vocabulary with scores, as `transformers`'
/// `LlamaConverter` writes it: byte fallback, `▁` for spaces, merges ordered by the score of
/// the piece they make (the pairs of every piece that are both in the vocabulary).
fn spm_tokenizer_json(
    tokens: &[String],
    types: Option<&[f64]>,
    scores: &[f64],
    unk: Option<String>,
    prefix: bool,
) -> Value {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // (score of the piece, the piece's id, left id, right id, left, right)
    let mut merges: Vec<(f64, usize, usize, usize, &str, &str)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores[i], i, li, ri, l, r));
            }
        }
    }
    // Higher-scoring pieces merge first; ties in vocabulary order (as `tokenizers`'
    // SentencePieceExtractor orders them).
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    let merges: Vec<Value> = merges.iter().map(|m| json!([m.4, m.5])).collect();
    let vocab: BTreeMap<usize, &String> = tokens.iter().enumerate().collect();
    let vocab: Map<String, Value> = vocab.into_iter().map(|(i, t)| (t.clone(), json!(i))).collect();
    let mut norm = Vec::new();
    if prefix {
        norm.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    norm.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut dec = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types, true),
        "normalizer": {"type": "Sequence", "normalizers": norm},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": dec},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    })
}

/// Loads a GGUF model for inference: frozen weights, quantized ones kept quantized.
pub fn load_model(path: &Path, dtype: DType, device: &Device) -> Result<(crate::Model, Tokenizer)> {
    if dtype != DType::F32 || !device.is_cpu() {
        return Err(Error::invalid(
            "dtype",
            format!("GGUF models compute in f32 on the CPU (asked for {dtype:?} on {device:?})"),
        ));
    }
    let g = GgufFile::open(path)?;
    let config = g.config()?;
    let tokenizer = g.tokenizer()?;
    let (store, stored) = g.param_store(&config)?;
    let mut model = crate::Model::new(config, &store, dtype, device)?;
    model.set_stored_matrix_dtype(stored);
    let unused = store.unused();
    if let Some(name) = unused.first() {
        return Err(Error::Weight {
            file: path.display().to_string(),
            name: name.clone(),
            message: format!("not used by the model ({} unused tensors)", unused.len()),
        });
    }
    store.release_source();
    Ok((model, tokenizer))
}

/// How [`write_model`] stores the projection and embedding matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteType {
    /// f32 (exact).
    F32,
    /// f16.
    F16,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale.
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and minimum.
    Q4_1,
    /// 4-bit k-quant (super-blocks of 256).
    Q4K,
    /// 6-bit k-quant (super-blocks of 256).
    Q6K,
}

impl std::str::FromStr for WriteType {
    type Err = String;

    /// llama.cpp's names: `f32`, `f16`, `q8_0`, `q4_0`, `q4_1`, `q4_k`, `q6_k`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => WriteType::F32,
            "f16" => WriteType::F16,
            "q8_0" => WriteType::Q8_0,
            "q4_0" => WriteType::Q4_0,
            "q4_1" => WriteType::Q4_1,
            "q4_k" | "q4_k_m" => WriteType::Q4K,
            "q6_k" => WriteType::Q6K,
            other => return Err(format!("`{other}` is not one of f32, f16, q8_0, q4_0, q4_1, q4_k, q6_k")),
        })
    }
}

impl WriteType {
    fn ggml(self) -> GgmlDType {
        match self {
            WriteType::F32 => GgmlDType::F32,
            WriteType::F16 => GgmlDType::F16,
            WriteType::Q8_0 => GgmlDType::Q8_0,
            WriteType::Q4_0 => GgmlDType::Q4_0,
            WriteType::Q4_1 => GgmlDType::Q4_1,
            WriteType::Q4K => GgmlDType::Q4K,
            WriteType::Q6K => GgmlDType::Q6K,
        }
    }

    /// llama.cpp's `general.file_type` for a file mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            WriteType::F32 => 0,
            WriteType::F16 => 1,
            WriteType::Q4_0 => 2,
            WriteType::Q4_1 => 3,
            WriteType::Q8_0 => 7,
            WriteType::Q4K => 15,
            WriteType::Q6K => 18,
        }
    }
}

/// llama.cpp's row order for a query/key projection with `heads` heads (the inverse of
/// [`unpermute_rows`]), on an f32 `[rows, cols]` tensor.
fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = match t.dims() {
        [r, c] => (*r, *c),
        [r] => (*r, 1),
        d => return Err(Error::invalid("tensor", format!("cannot permute a tensor of shape {d:?}"))),
    };
    let mut idx = vec![0u32; rows];
    for (hf, file) in file_rows(rows, heads).map_err(|e| Error::invalid("tensor", e))?.into_iter().enumerate() {
        idx[file] = hf as u32;
    }
    let idx = Tensor::from_vec(idx, rows, t.device())?;
    let out = t.reshape((rows, cols))?.index_select(&idx, 0)?;
    Ok(out.reshape(t.shape())?)
}

/// GGUF's code for a string value.
const STRING_TYPE: u32 = 8;

/// Sets the element type of the empty array under `key` in the written GGUF `bytes` (the key,
/// as GGUF writes it, then the array's type 9, its element type and its length 0) to `ty`.
fn retype_empty_array(bytes: &mut [u8], key: &str, ty: u32) -> Result<()> {
    let mut pattern = (key.len() as u64).to_le_bytes().to_vec();
    pattern.extend_from_slice(key.as_bytes());
    pattern.extend_from_slice(&9u32.to_le_bytes());
    let at = bytes
        .windows(pattern.len() + 12)
        .position(|w| w.starts_with(&pattern) && w[pattern.len() + 4..] == [0u8; 8])
        .ok_or_else(|| Error::invalid("gguf", format!("no empty array `{key}` in the written metadata")))?;
    bytes[at + pattern.len()..at + pattern.len() + 4].copy_from_slice(&ty.to_le_bytes());
    Ok(())
}

/// A token of a character-level vocabulary as the token of a byte-level one (GPT-2's mapping
/// of bytes to printable characters): one byte, one character. A character of several bytes
/// would need merges through tokens the vocabulary lacks, and is refused naming it.
fn byte_level_char(token: &str, id: u64) -> Result<String> {
    match token.as_bytes() {
        [b] => {
            let keep = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
            let c = if keep(*b) {
                *b as char
            } else {
                let n = (0..*b).filter(|&x| !keep(x)).count() as u32;
                char::from_u32(256 + n).expect("below 0x200")
            };
            Ok(c.to_string())
        }
        bytes => Err(Error::Tokenizer(format!(
            "token {id} of the character vocabulary, {token:?}, takes {} bytes in UTF-8: a character-level \
             vocabulary is written to GGUF as byte-level BPE, where only single-byte (ASCII) characters are \
             tokens of their own",
            bytes.len()
        ))),
    }
}

/// How a tensor is changed on its way into a GGUF file.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// As it is.
    Same,
    /// llama.cpp's row order for a query/key projection with this many heads.
    Permute(usize),
    /// An HF `Conv1D` weight (`[in, out]`) as llama.cpp's `[out, in]`.
    Transpose,
    /// Gemma's norm weight `w` (the scale minus one) stored as the scale `1 + w`, as
    /// llama.cpp's converter writes it.
    PlusOne,
}

/// Writes a Llama or GPT-2 `model` with its byte-level BPE or character-level `tokenizer` as a
/// GGUF file llama.cpp loads: matrices as `wtype` (q8_0, or f16 at f16 and f32's own type,
/// where a row does not split into its blocks), norms and biases as f32. Written to a
/// temporary file and renamed.
pub fn write_model(model: &crate::Model, tokenizer: &Tokenizer, path: &Path, wtype: WriteType) -> Result<()> {
    let s = |v: &str| GValue::String(v.to_owned());
    let u = |v: usize| GValue::U32(v as u32);
    // Per architecture: its metadata.
    // Tensors llama.cpp wants that the model does not hold as parameters (f32).
    let mut extra_tensors: Vec<(String, Tensor)> = Vec::new();
    let (arch, vocab_size, name, mut meta) = match model.config() {
        ModelConfig::Llama(cfg) => {
            let arch = llama_cpp_arch(cfg.family);
            let refuse =
                |field: &'static str, what: String| Err(Error::invalid(field, format!("llama.cpp's {arch} {what}")));
            let (gemma, layers) = (cfg.family.is_gemma(), cfg.num_hidden_layers);
            let act = if gemma { crate::config::Activation::GeluTanh } else { crate::config::Activation::Silu };
            if cfg.activation() != act {
                return refuse("hidden_act", format!("architecture computes {act:?} only"));
            }
            // What llama.cpp fixes for each architecture, which the model must agree with.
            let windowed: Vec<bool> = (0..layers).map(|i| cfg.layer_window(i).is_some()).collect();
            let window = (0..layers).find_map(|i| cfg.layer_window(i));
            let llama_cpp_windows: Vec<bool> = match cfg.family {
                Family::Gemma2 => (0..layers).map(|i| i % 2 == 0).collect(),
                Family::Gemma3 => (0..layers).map(|i| (i + 1) % 6 != 0).collect(),
                Family::Phi3 => vec![true; layers],
                _ => vec![false; layers],
            };
            if window.is_some() && windowed != llama_cpp_windows {
                return refuse(
                    "sliding_window",
                    format!("architecture windows layers {llama_cpp_windows:?}; this model windows {windowed:?}"),
                );
            }
            if cfg.family == Family::Gemma3 && cfg.rope_for(true)? != (10000.0, crate::config::RopeScaling::None) {
                return refuse("rope_local_base_freq", "architecture rotates local layers by base 10000".into());
            }
            let (theta, scaling) = cfg.rope_for(false)?;
            let mut meta_scaling = Vec::new();
            let mut rope_freqs = None;
            match scaling {
                crate::config::RopeScaling::None => {}
                s @ crate::config::RopeScaling::Llama3 { .. } if arch == "llama" => {
                    let d: Vec<f32> = llama3_divisors(&s, cfg.rotary_dim(), theta).iter().map(|&x| x as f32).collect();
                    let n = d.len();
                    rope_freqs = Some(Tensor::from_vec(d, n, &Device::Cpu)?);
                }
                crate::config::RopeScaling::Linear { factor } => {
                    meta_scaling.push((format!("{arch}.rope.scaling.type"), GValue::String("linear".into())));
                    meta_scaling.push((format!("{arch}.rope.scaling.factor"), GValue::F32(factor as f32)));
                }
                other => {
                    return Err(Error::invalid(
                        "rope_scaling",
                        format!("{other:?} is not written to GGUF files yet (linear is, and llama3 for llama)"),
                    ))
                }
            }
            if gemma {
                let big =
                    (cfg.family == Family::Gemma2 && layers == 46) || (cfg.family == Family::Gemma3 && layers == 62);
                let scalar = if big { cfg.hidden_size / cfg.num_attention_heads } else { cfg.head_dim() };
                if cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim()) != scalar {
                    return refuse("query_pre_attn_scalar", format!("architecture scales scores by {scalar}^-½ here"));
                }
            }
            if cfg.family == Family::Gemma2
                && (cfg.attn_logit_softcapping.is_none() || cfg.final_logit_softcapping.is_none())
            {
                return refuse("attn_logit_softcapping", "architecture soft-caps scores and logits always".into());
            }
            if cfg.o_bias() || cfg.mlp_bias || (cfg.qkv_bias() && cfg.family != Family::Qwen2) {
                return Err(Error::invalid(
                    "attention_bias",
                    format!("llama.cpp's {arch} architecture has no biases on these projections"),
                ));
            }
            let k = |key: &str| format!("{arch}.{key}");
            let meta = vec![
                (k("vocab_size"), u(cfg.vocab_size)),
                (k("context_length"), u(cfg.max_position_embeddings)),
                (k("embedding_length"), u(cfg.hidden_size)),
                (k("feed_forward_length"), u(cfg.intermediate_size)),
                (k("block_count"), u(cfg.num_hidden_layers)),
                (k("attention.head_count"), u(cfg.num_attention_heads)),
                (k("attention.head_count_kv"), u(cfg.kv_heads())),
                (k("attention.key_length"), u(cfg.head_dim())),
                (k("attention.value_length"), u(cfg.head_dim())),
                (k("rope.dimension_count"), u(cfg.rotary_dim())),
                (k("rope.freq_base"), GValue::F32(theta as f32)),
                (k("attention.layer_norm_rms_epsilon"), GValue::F32(cfg.rms_norm_eps as f32)),
            ];
            let mut meta = meta;
            meta.extend(meta_scaling);
            extra_tensors.extend(rope_freqs.map(|t| (ROPE_FREQS.to_string(), t)));
            if let Some(w) = window {
                meta.push((k("attention.sliding_window"), u(w)));
            }
            if let Some(c) = cfg.attn_logit_softcapping {
                meta.push((k("attn_logit_softcapping"), GValue::F32(c as f32)));
            }
            if let Some(c) = cfg.final_logit_softcapping {
                meta.push((k("final_logit_softcapping"), GValue::F32(c as f32)));
            }
            if cfg.family == Family::Phi3 {
                let original = cfg
                    .extra
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map_or(cfg.max_position_embeddings, |n| n as usize);
                meta.push((k("rope.scaling.original_context_length"), u(original)));
            }
            (arch, cfg.vocab_size, cfg.extra.get("_name_or_path").and_then(Value::as_str), meta)
        }
        ModelConfig::Gpt2(cfg) => {
            if cfg.activation_function != crate::config::Activation::GeluTanh {
                return Err(Error::invalid(
                    "activation_function",
                    "llama.cpp's gpt2 architecture computes GELU with the tanh approximation (gelu_new) only",
                ));
            }
            let meta = vec![
                ("gpt2.context_length".to_string(), u(cfg.n_positions)),
                ("gpt2.embedding_length".into(), u(cfg.n_embd)),
                ("gpt2.feed_forward_length".into(), u(cfg.inner())),
                ("gpt2.block_count".into(), u(cfg.n_layer)),
                ("gpt2.attention.head_count".into(), u(cfg.n_head)),
                ("gpt2.attention.layer_norm_epsilon".into(), GValue::F32(cfg.layer_norm_epsilon as f32)),
            ];
            ("gpt2", cfg.vocab_size, cfg.extra.get("_name_or_path").and_then(Value::as_str), meta)
        }
        ModelConfig::Bert(_) => {
            return Err(Error::invalid(
                "model",
                "only gpt2 and the Llama-block families (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3) are written as GGUF; bert is not",
            ))
        }
    };
    let tj: Value =
        serde_json::from_str(&tokenizer.inner().to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
    if tj["model"]["type"] != "BPE" {
        return Err(Error::Tokenizer("only BPE tokenizers are written to GGUF".into()));
    }
    // A character-level vocabulary (`Tokenizer::from_chars`: BPE without merges, nothing
    // before it, tokens joined as they are) is written as byte-level BPE without merges: for
    // single-byte characters each is then its own token there too.
    let chars = tj["pre_tokenizer"].is_null()
        && tj["decoder"]["type"] == "Fuse"
        && tj["model"]["merges"].as_array().is_some_and(|m| m.is_empty());
    let pre = match (&tj["pre_tokenizer"]["type"], &tj["pre_tokenizer"]["pretokenizers"]) {
        _ if chars => "gpt-2",
        (Value::String(t), _) if t == "ByteLevel" => "gpt-2",
        (Value::String(t), Value::Array(list))
            if t == "Sequence"
                && list.len() == 2
                && list[0]["type"] == "Digits"
                && list[0]["individual_digits"] == true
                && list[1]["type"] == "ByteLevel" =>
        {
            "smollm"
        }
        _ => {
            return Err(Error::Tokenizer(
                "only byte-level BPE tokenizers (GPT-2's or SmolLM's pre-tokenization) and character-level ones \
                 are written to GGUF"
                    .into(),
            ))
        }
    };
    let vocab = tj["model"]["vocab"].as_object().cloned().unwrap_or_default();
    let n = tokenizer.vocab_size().max(vocab_size);
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (t, id) in &vocab {
        if let Some(i) = id.as_u64().filter(|&i| (i as usize) < n) {
            let added = tj["added_tokens"].as_array().into_iter().flatten().any(|a| a["content"] == t.as_str());
            tokens[i as usize] = Some(if chars && !added { byte_level_char(t, i)? } else { t.clone() });
        }
    }
    let mut types = vec![1i32; n];
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(i), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) {
            if (i as usize) < n {
                tokens[i as usize] = Some(c.to_owned());
                types[i as usize] = if a["special"] == true { TYPE_CONTROL as i32 } else { TYPE_USER_DEFINED as i32 };
            }
        }
    }
    // Ids the embedding has but the tokenizer never produces get unused placeholders.
    let tokens: Vec<String> =
        tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
    let merges: Vec<String> = tj["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(p) => format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")),
            _ => String::new(),
        })
        .collect();
    meta.splice(
        0..0,
        [
            ("general.architecture".to_string(), s(arch)),
            ("general.name".into(), s(name.unwrap_or("lmstack model"))),
            ("general.file_type".into(), GValue::U32(wtype.file_type())),
            ("general.quantization_version".into(), GValue::U32(2)),
        ],
    );
    meta.extend([
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        ("tokenizer.ggml.tokens".into(), GValue::Array(tokens.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.token_type".into(), GValue::Array(types.iter().map(|&t| GValue::I32(t)).collect())),
        ("tokenizer.ggml.merges".into(), GValue::Array(merges.iter().map(|m| s(m)).collect())),
        ("tokenizer.ggml.add_bos_token".into(), GValue::Bool(false)),
    ]);
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", tokenizer.bos_id()),
        ("tokenizer.ggml.eos_token_id", tokenizer.eos_id()),
        ("tokenizer.ggml.padding_token_id", tokenizer.pad_id()),
        (
            "tokenizer.ggml.unknown_token_id",
            tokenizer.special_tokens().unk.as_deref().and_then(|t| tokenizer.token_to_id(t)),
        ),
    ] {
        if let Some(id) = id {
            meta.push((key.into(), GValue::U32(id)));
        }
    }
    if let Some(t) = tokenizer.chat_template() {
        meta.push(("tokenizer.chat_template".into(), s(t)));
    }
    let tensors = model.params().tensors();
    let mut qts: Vec<(String, QTensor)> = Vec::new();
    for TensorEntry { hf, gg, layout, .. } in tensor_map(model.config()).map_err(|e| Error::invalid("model", e))? {
        let Some(t) = tensors.get(&hf) else { continue };
        let mut t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        match layout {
            Layout::Same => {}
            Layout::Permute(heads) => t = permute_rows(&t, heads)?,
            Layout::Transpose => t = t.t()?.contiguous()?,
            Layout::PlusOne => t = (t + 1.0)?,
        }
        // Position tables stay f32 (llama.cpp's converter does not quantize them either).
        let ty = if t.rank() == 2 && gg != "position_embd.weight" {
            let cols = t.dim(1)?;
            if cols % wtype.ggml().block_size() == 0 {
                wtype.ggml()
            } else if cols % GgmlDType::Q8_0.block_size() == 0 && wtype != WriteType::F32 && wtype != WriteType::F16 {
                // llama.cpp's fallback for rows that do not split into k-quant super-blocks.
                GgmlDType::Q8_0
            } else if wtype == WriteType::F32 {
                GgmlDType::F32
            } else {
                GgmlDType::F16
            }
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&t, ty).map_err(|e| Error::Weight {
            file: path.display().to_string(),
            name: gg.clone(),
            message: e.to_string(),
        })?;
        qts.push((gg, q));
    }
    for (name, t) in extra_tensors {
        let q = QTensor::quantize(&t, GgmlDType::F32).map_err(|e| Error::Weight {
            file: path.display().to_string(),
            name: name.clone(),
            message: e.to_string(),
        })?;
        qts.push((name, q));
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    let meta_refs: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut buf, &meta_refs, &q_refs).map_err(|e| Error::Weight {
        file: path.display().to_string(),
        name: "<file>".into(),
        message: e.to_string(),
    })?;
    let mut bytes = buf.into_inner();
    if merges.is_empty() {
        // candle writes an empty array as one of u32s; llama.cpp wants the merges as strings
        // even when there are none.
        retype_empty_array(&mut bytes, "tokenizer.ggml.merges", STRING_TYPE)?;
    }
    crate::io::write_atomic(path, &bytes)
}
