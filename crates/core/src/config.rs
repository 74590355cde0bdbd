//! Model configuration read from a Hugging Face `config.json`, dispatching on `model_type`.
//!
//! Each architecture has a serde struct whose field names and defaults mirror the
//! corresponding `transformers` config class (`GPT2Config`, `LlamaConfig`, `BertConfig`), so a
//! file written by either side reads in the other. Keys common to every `PretrainedConfig`
//! (`architectures`, `torch_dtype`, token ids, generation defaults …) are kept for round trips;
//! any other unknown key, and any value lmstack cannot honour, is an error naming the field.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Keys of `PretrainedConfig` that every architecture accepts and that do not change the
/// network: they are kept verbatim and written back on save.
const COMMON_KEYS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "chunk_size_feed_forward",
    "finetuning_task",
    "prefix",
    "task_specific_params",
    "tokenizer_class",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "diversity_penalty",
    "num_beam_groups",
    "pruned_heads",
    "cross_attention_hidden_size",
    "initializer_range",
    "gradient_checkpointing",
    "tf_legacy_loss",
    "use_bfloat16",
    "output_router_logits",
    "max_new_tokens",
    "min_new_tokens",
    "forced_decoder_ids",
    "sep_token",
    "keys_to_ignore_at_inference",
    "transformers.js_config",
    "is_llama_config",
    "torch_compile",
    "label_smoothing",
];

/// Whether `key` is bookkeeping that every architecture accepts: a [`COMMON_KEYS`] entry,
/// a private key (`_name_or_path`, `_commit_hash`, `_attn_implementation` …, which
/// `transformers` and the Hub add), or a token id (`unk_token_id`, `image_token_ids` …).
fn is_common_key(key: &str) -> bool {
    COMMON_KEYS.contains(&key) || key.starts_with('_') || key.ends_with("_token_id") || key.ends_with("_token_ids")
}

/// Activation functions named by `activation_function` / `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// Exact GELU with `erf` (`"gelu"`).
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU with the tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    /// ReLU.
    #[serde(rename = "relu")]
    Relu,
    /// SiLU, also called swish.
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

fn d_true() -> bool {
    true
}
fn d_false() -> bool {
    false
}

/// GPT-2 (`model_type: "gpt2"`), mirroring `transformers.GPT2Config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    #[serde(default = "Gpt2Config::d_vocab")]
    pub vocab_size: usize,
    /// Maximum sequence length (learned position table).
    #[serde(default = "Gpt2Config::d_positions")]
    pub n_positions: usize,
    /// Hidden width.
    #[serde(default = "Gpt2Config::d_embd")]
    pub n_embd: usize,
    /// Number of blocks.
    #[serde(default = "Gpt2Config::d_layer")]
    pub n_layer: usize,
    /// Number of attention heads.
    #[serde(default = "Gpt2Config::d_head")]
    pub n_head: usize,
    /// MLP width; `None` means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// MLP activation.
    #[serde(default = "Gpt2Config::d_act")]
    pub activation_function: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "Gpt2Config::d_eps")]
    pub layer_norm_epsilon: f64,
    /// Dropout on residual branches (training only).
    #[serde(default = "Gpt2Config::d_drop")]
    pub resid_pdrop: f64,
    /// Dropout on embeddings (training only).
    #[serde(default = "Gpt2Config::d_drop")]
    pub embd_pdrop: f64,
    /// Dropout on attention weights (training only).
    #[serde(default = "Gpt2Config::d_drop")]
    pub attn_pdrop: f64,
    /// Scale attention scores by `1/sqrt(head_dim)`.
    #[serde(default = "d_true")]
    pub scale_attn_weights: bool,
    /// Whether the LM head shares the token embedding matrix.
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Unsupported when true (checked in validation).
    #[serde(default = "d_false")]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Numerics-only option of transformers; accepted and ignored (lmstack upcasts anyway).
    #[serde(default = "d_false")]
    pub reorder_and_upcast_attn: bool,
    /// Other keys, kept for round trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Gpt2Config {
    fn d_vocab() -> usize {
        50257
    }
    fn d_positions() -> usize {
        1024
    }
    fn d_embd() -> usize {
        768
    }
    fn d_layer() -> usize {
        12
    }
    fn d_head() -> usize {
        12
    }
    fn d_act() -> Activation {
        Activation::GeluTanh
    }
    fn d_eps() -> f64 {
        1e-5
    }
    fn d_drop() -> f64 {
        0.1
    }
    const KEYS: &'static [&'static str] = &[
        "n_ctx",
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_first_dropout",
        "add_bias_linear",
    ];

    /// The MLP width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// Llama (`model_type: "llama"`, also `"mistral"` without a sliding window), mirroring
/// `transformers.LlamaConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    #[serde(default = "LlamaConfig::d_vocab")]
    pub vocab_size: usize,
    /// Hidden width.
    #[serde(default = "LlamaConfig::d_hidden")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "LlamaConfig::d_inter")]
    pub intermediate_size: usize,
    /// Number of blocks.
    #[serde(default = "LlamaConfig::d_layers")]
    pub num_hidden_layers: usize,
    /// Number of query heads.
    #[serde(default = "LlamaConfig::d_heads")]
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); `None` means one per query head.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; `None` means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation (gate branch).
    #[serde(default = "LlamaConfig::d_act")]
    pub hidden_act: Activation,
    /// Context length.
    #[serde(default = "LlamaConfig::d_positions")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "LlamaConfig::d_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE parameters in the newer transformers layout (`{"rope_type", "rope_theta"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Map<String, Value>>,
    /// RoPE scaling; only `null` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// Biases on the q/k/v/o projections.
    #[serde(default = "d_false")]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default = "d_false")]
    pub mlp_bias: bool,
    /// Attention dropout (training only).
    #[serde(default)]
    pub attention_dropout: f64,
    /// Whether the LM head shares the token embedding matrix.
    #[serde(default = "d_false")]
    pub tie_word_embeddings: bool,
    /// Tensor-parallel pretraining degree; only 1 is supported.
    #[serde(default = "LlamaConfig::d_tp")]
    pub pretraining_tp: usize,
    /// Mistral's sliding window; must be absent, `null` or at least the context length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Other keys, kept for round trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl LlamaConfig {
    fn d_vocab() -> usize {
        32000
    }
    fn d_hidden() -> usize {
        4096
    }
    fn d_inter() -> usize {
        11008
    }
    fn d_layers() -> usize {
        32
    }
    fn d_heads() -> usize {
        32
    }
    fn d_act() -> Activation {
        Activation::Silu
    }
    fn d_positions() -> usize {
        2048
    }
    fn d_eps() -> f64 {
        1e-6
    }
    fn d_tp() -> usize {
        1
    }
    const KEYS: &'static [&'static str] =
        &["max_window_layers", "use_sliding_window", "rope_interleaved", "layer_types"];

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    /// RoPE base frequency from `rope_theta` or `rope_parameters.rope_theta` (default 10000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64()).unwrap_or(10000.0)
    }
}

/// BERT (`model_type: "bert"`), mirroring `transformers.BertConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    #[serde(default = "BertConfig::d_vocab")]
    pub vocab_size: usize,
    /// Hidden width.
    #[serde(default = "BertConfig::d_hidden")]
    pub hidden_size: usize,
    /// Number of encoder layers.
    #[serde(default = "BertConfig::d_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    #[serde(default = "BertConfig::d_heads")]
    pub num_attention_heads: usize,
    /// MLP width.
    #[serde(default = "BertConfig::d_inter")]
    pub intermediate_size: usize,
    /// MLP activation.
    #[serde(default = "BertConfig::d_act")]
    pub hidden_act: Activation,
    /// Dropout on hidden states (training only).
    #[serde(default = "BertConfig::d_drop")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention weights (training only).
    #[serde(default = "BertConfig::d_drop")]
    pub attention_probs_dropout_prob: f64,
    /// Context length (learned position table).
    #[serde(default = "BertConfig::d_positions")]
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "BertConfig::d_types")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "BertConfig::d_eps")]
    pub layer_norm_eps: f64,
    /// Only `"absolute"` is supported.
    #[serde(default = "BertConfig::d_pos_type")]
    pub position_embedding_type: String,
    /// Dropout before the classifier; `None` means `hidden_dropout_prob`.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Whether the masked-LM decoder shares the token embedding matrix.
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Other keys, kept for round trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl BertConfig {
    fn d_vocab() -> usize {
        30522
    }
    fn d_hidden() -> usize {
        768
    }
    fn d_layers() -> usize {
        12
    }
    fn d_heads() -> usize {
        12
    }
    fn d_inter() -> usize {
        3072
    }
    fn d_act() -> Activation {
        Activation::Gelu
    }
    fn d_drop() -> f64 {
        0.1
    }
    fn d_positions() -> usize {
        512
    }
    fn d_types() -> usize {
        2
    }
    fn d_eps() -> f64 {
        1e-12
    }
    fn d_pos_type() -> String {
        "absolute".into()
    }
    const KEYS: &'static [&'static str] = &[];

    /// Number of labels of the classification head (from `id2label`), if the config has one.
    pub fn num_labels(&self) -> Option<usize> {
        if let Some(Value::Object(m)) = self.extra.get("id2label") {
            return Some(m.len());
        }
        self.extra.get("num_labels").and_then(Value::as_u64).map(|n| n as usize)
    }

    /// The label names by id, from `id2label` (`LABEL_i` where absent).
    pub fn labels(&self) -> Vec<String> {
        let n = self.num_labels().unwrap_or(0);
        let map = self.extra.get("id2label").and_then(Value::as_object);
        (0..n)
            .map(|i| {
                map.and_then(|m| m.get(&i.to_string()))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect()
    }
}

/// A validated model configuration, one variant per supported `model_type`.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    /// `gpt2`.
    Gpt2(Gpt2Config),
    /// `llama` (and `mistral` without a sliding window).
    Llama(LlamaConfig),
    /// `bert`.
    Bert(BertConfig),
}

/// Which architecture family a configuration describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// GPT-2.
    Gpt2,
    /// Llama / Mistral.
    Llama,
    /// BERT.
    Bert,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: Value = crate::io::read_json(path)?;
        Self::from_value(value, &path.display().to_string())
    }

    /// Parses and validates a configuration given as JSON text; `source` names it in errors.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::config(source, "<json>", format!("line {}: {e}", e.line())))?;
        Self::from_value(value, source)
    }

    /// Parses and validates a configuration from a JSON value; `source` names it in errors.
    pub fn from_value(value: Value, source: &str) -> Result<Self> {
        let Value::Object(mut map) = value else {
            return Err(Error::config(source, "<root>", "expected a JSON object"));
        };
        let model_type = match map.remove("model_type") {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(Error::config(source, "model_type", format!("expected a string, found {other}")))
            }
            None => {
                return Err(Error::config(source, "model_type", "missing; expected one of gpt2, llama, mistral, bert"))
            }
        };
        let value = Value::Object(map);
        fn parse<T: serde::de::DeserializeOwned>(v: Value, source: &str) -> Result<T> {
            serde_path_to_error(v, source)
        }
        let cfg = match model_type.as_str() {
            "gpt2" => ModelConfig::Gpt2(parse(value, source)?),
            "llama" | "mistral" => ModelConfig::Llama(parse(value, source)?),
            "bert" => ModelConfig::Bert(parse(value, source)?),
            other => {
                return Err(Error::config(
                    source,
                    "model_type",
                    format!("unsupported model type `{other}`; expected one of gpt2, llama, mistral, bert"),
                ))
            }
        };
        cfg.validate(source)?;
        Ok(cfg)
    }

    /// The architecture family.
    pub fn model_type(&self) -> ModelType {
        match self {
            ModelConfig::Gpt2(_) => ModelType::Gpt2,
            ModelConfig::Llama(_) => ModelType::Llama,
            ModelConfig::Bert(_) => ModelType::Bert,
        }
    }

    /// The `model_type` string written to `config.json`.
    pub fn model_type_str(&self) -> &'static str {
        match self {
            ModelConfig::Gpt2(_) => "gpt2",
            ModelConfig::Llama(_) => "llama",
            ModelConfig::Bert(_) => "bert",
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Bert(c) => c.vocab_size,
        }
    }

    /// Context length in tokens.
    pub fn max_position_embeddings(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Llama(c) => c.max_position_embeddings,
            ModelConfig::Bert(c) => c.max_position_embeddings,
        }
    }

    /// Hidden width.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_embd,
            ModelConfig::Llama(c) => c.hidden_size,
            ModelConfig::Bert(c) => c.hidden_size,
        }
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_layer,
            ModelConfig::Llama(c) => c.num_hidden_layers,
            ModelConfig::Bert(c) => c.num_hidden_layers,
        }
    }

    /// `(num_kv_heads, head_dim)` of the attention, which sizes a KV cache.
    pub fn kv_shape(&self) -> (usize, usize) {
        match self {
            ModelConfig::Gpt2(c) => (c.n_head, c.n_embd / c.n_head),
            ModelConfig::Llama(c) => (c.kv_heads(), c.head_dim()),
            ModelConfig::Bert(c) => (c.num_attention_heads, c.hidden_size / c.num_attention_heads),
        }
    }

    /// Whether this is a causal (autoregressive) language model, as opposed to a masked one.
    pub fn is_causal(&self) -> bool {
        !matches!(self, ModelConfig::Bert(_))
    }

    /// The kept keys shared by all architectures (`architectures`, token ids …).
    pub fn extra(&self) -> &Map<String, Value> {
        match self {
            ModelConfig::Gpt2(c) => &c.extra,
            ModelConfig::Llama(c) => &c.extra,
            ModelConfig::Bert(c) => &c.extra,
        }
    }

    /// Mutable access to the kept keys.
    pub fn extra_mut(&mut self) -> &mut Map<String, Value> {
        match self {
            ModelConfig::Gpt2(c) => &mut c.extra,
            ModelConfig::Llama(c) => &mut c.extra,
            ModelConfig::Bert(c) => &mut c.extra,
        }
    }

    /// The `architectures` list, if present.
    pub fn architectures(&self) -> Vec<String> {
        self.extra()
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// A token id field such as `eos_token_id` (the first one when it is a list).
    pub fn token_id(&self, field: &str) -> Option<u32> {
        match self.extra().get(field)? {
            Value::Number(n) => n.as_u64().map(|v| v as u32),
            Value::Array(a) => a.first()?.as_u64().map(|v| v as u32),
            _ => None,
        }
    }

    /// The configuration as `config.json` content, with `model_type` set.
    pub fn to_value(&self) -> Value {
        let mut v = match self {
            ModelConfig::Gpt2(c) => serde_json::to_value(c),
            ModelConfig::Llama(c) => serde_json::to_value(c),
            ModelConfig::Bert(c) => serde_json::to_value(c),
        }
        .expect("config structs serialise");
        if let Value::Object(m) = &mut v {
            m.insert("model_type".into(), Value::String(self.model_type_str().into()));
            let sorted: BTreeMap<_, _> = std::mem::take(m).into_iter().collect();
            *m = sorted.into_iter().collect();
        }
        v
    }

    /// Checks that the values are ones lmstack can honour and that they agree with each other.
    pub fn validate(&self, source: &str) -> Result<()> {
        let err = |field: &str, msg: String| Err(Error::config(source, field, msg));
        let positive = |field: &str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(Error::config(source, field, "must be at least 1"));
            }
            Ok(())
        };
        let (extra, keys): (&Map<String, Value>, &[&str]) = match self {
            ModelConfig::Gpt2(c) => (&c.extra, Gpt2Config::KEYS),
            ModelConfig::Llama(c) => (&c.extra, LlamaConfig::KEYS),
            ModelConfig::Bert(c) => (&c.extra, BertConfig::KEYS),
        };
        for k in extra.keys() {
            if k == "quantization_config" {
                return err(
                    k,
                    "pre-quantized Hugging Face checkpoints (bitsandbytes, GPTQ, AWQ …) are not supported; \
                     load a GGUF file or unquantized weights"
                        .into(),
                );
            }
            if !is_common_key(k) && !keys.contains(&k.as_str()) {
                return err(k, format!("unknown field for model type `{}`", self.model_type_str()));
            }
        }
        match self {
            ModelConfig::Gpt2(c) => {
                positive("vocab_size", c.vocab_size)?;
                positive("n_positions", c.n_positions)?;
                positive("n_layer", c.n_layer)?;
                positive("n_head", c.n_head)?;
                positive("n_embd", c.n_embd)?;
                if c.n_embd % c.n_head != 0 {
                    return err("n_embd", format!("{} is not divisible by n_head = {}", c.n_embd, c.n_head));
                }
                if c.scale_attn_by_inverse_layer_idx {
                    return err("scale_attn_by_inverse_layer_idx", "only false is supported".into());
                }
                if let Some(n_ctx) = c.extra.get("n_ctx").and_then(Value::as_u64) {
                    if n_ctx as usize != c.n_positions {
                        return err("n_ctx", format!("{n_ctx} disagrees with n_positions = {}", c.n_positions));
                    }
                }
            }
            ModelConfig::Llama(c) => {
                positive("vocab_size", c.vocab_size)?;
                positive("hidden_size", c.hidden_size)?;
                positive("intermediate_size", c.intermediate_size)?;
                positive("num_hidden_layers", c.num_hidden_layers)?;
                positive("num_attention_heads", c.num_attention_heads)?;
                positive("max_position_embeddings", c.max_position_embeddings)?;
                positive("num_key_value_heads", c.kv_heads())?;
                if c.num_attention_heads % c.kv_heads() != 0 {
                    return err(
                        "num_key_value_heads",
                        format!("{} does not divide num_attention_heads = {}", c.kv_heads(), c.num_attention_heads),
                    );
                }
                if c.head_dim.is_none() && c.hidden_size % c.num_attention_heads != 0 {
                    return err(
                        "hidden_size",
                        format!(
                            "{} is not divisible by num_attention_heads = {}",
                            c.hidden_size, c.num_attention_heads
                        ),
                    );
                }
                if c.head_dim() % 2 != 0 {
                    return err("head_dim", format!("{} must be even for rotary embeddings", c.head_dim()));
                }
                match &c.rope_scaling {
                    None | Some(Value::Null) => {}
                    Some(Value::Object(m)) => {
                        let t = m.get("rope_type").or_else(|| m.get("type")).and_then(Value::as_str);
                        if t != Some("default") {
                            return err(
                                "rope_scaling.rope_type",
                                format!("{} is not supported; only no RoPE scaling", t.unwrap_or("a missing type")),
                            );
                        }
                    }
                    Some(other) => return err("rope_scaling", format!("expected an object or null, found {other}")),
                }
                if let Some(p) = &c.rope_parameters {
                    match p.get("rope_type").and_then(Value::as_str) {
                        None | Some("default") => {}
                        Some(t) => {
                            return err("rope_parameters.rope_type", format!("`{t}` is not supported; only `default`"))
                        }
                    }
                }
                if let Some(v) = c.extra.get("rope_interleaved") {
                    if v != &Value::Bool(false) {
                        return err("rope_interleaved", format!("{v} is not supported; only false (rotate-half RoPE)"));
                    }
                }
                // `use_sliding_window: false` (Qwen2's layout) switches a window off.
                let window_off = c.extra.get("use_sliding_window").and_then(Value::as_bool) == Some(false);
                if let Some(types) = c.extra.get("layer_types") {
                    let Some(list) = types.as_array() else {
                        return err("layer_types", format!("expected a list, found {types}"));
                    };
                    // A "sliding_attention" layer attends fully unless a window is active,
                    // which the `sliding_window` check below refuses.
                    let known = |t: &Value| matches!(t.as_str(), Some("full_attention" | "sliding_attention"));
                    if let Some((i, t)) = list.iter().enumerate().find(|(_, t)| !known(t)) {
                        return err(&format!("layer_types[{i}]"), format!("{t} is not supported"));
                    }
                    if list.len() != c.num_hidden_layers {
                        return err(
                            "layer_types",
                            format!("{} entries for num_hidden_layers = {}", list.len(), c.num_hidden_layers),
                        );
                    }
                }
                if c.pretraining_tp != 1 {
                    return err("pretraining_tp", format!("{} is not supported; only 1", c.pretraining_tp));
                }
                if let Some(w) = c.sliding_window.filter(|_| !window_off) {
                    if w < c.max_position_embeddings {
                        return err(
                            "sliding_window",
                            format!(
                                "{w} is below max_position_embeddings = {}; sliding-window attention is not supported",
                                c.max_position_embeddings
                            ),
                        );
                    }
                }
                if c.hidden_act != Activation::Silu
                    && c.hidden_act != Activation::GeluTanh
                    && c.hidden_act != Activation::Gelu
                {
                    return err("hidden_act", "llama supports silu or gelu".into());
                }
            }
            ModelConfig::Bert(c) => {
                positive("vocab_size", c.vocab_size)?;
                positive("hidden_size", c.hidden_size)?;
                positive("num_hidden_layers", c.num_hidden_layers)?;
                positive("num_attention_heads", c.num_attention_heads)?;
                positive("max_position_embeddings", c.max_position_embeddings)?;
                positive("type_vocab_size", c.type_vocab_size)?;
                if c.hidden_size % c.num_attention_heads != 0 {
                    return err(
                        "hidden_size",
                        format!(
                            "{} is not divisible by num_attention_heads = {}",
                            c.hidden_size, c.num_attention_heads
                        ),
                    );
                }
                if c.position_embedding_type != "absolute" {
                    return err(
                        "position_embedding_type",
                        format!("`{}` is not supported; only `absolute`", c.position_embedding_type),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Deserialises `v` into `T`, naming the offending field in the error.
fn serde_path_to_error<T: serde::de::DeserializeOwned>(v: Value, source: &str) -> Result<T> {
    // serde_json reports "invalid type: …, expected …" without the key; find the key by
    // checking each top-level field against a deserialisation of the object without it.
    match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => Ok(t),
        Err(e) => {
            let msg = e.to_string();
            if let Value::Object(map) = &v {
                for key in map.keys() {
                    let mut without = map.clone();
                    without.remove(key);
                    if serde_json::from_value::<T>(Value::Object(without)).is_ok() {
                        return Err(Error::config(source, key.clone(), msg));
                    }
                }
            }
            Err(Error::config(source, "<config>", msg))
        }
    }
}
