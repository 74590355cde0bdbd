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

/// The published families built from the Llama block, each a variation of it: what
/// `model_type` names, and so which of [`LlamaConfig`]'s switches apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    /// Llama 1–3 (`"llama"`), SmolLM and other Llama-architecture models.
    #[default]
    Llama,
    /// Mistral (`"mistral"`): Llama with a sliding attention window on every layer.
    Mistral,
    /// Qwen2 and Qwen2.5 (`"qwen2"`): biases on the query, key and value projections (none on
    /// the output projection); an optional window on the layers from `max_window_layers` on.
    Qwen2,
    /// Qwen3 (`"qwen3"`): an RMSNorm over each query and key head before RoPE; `head_dim`
    /// independent of the width; the window as Qwen2's.
    Qwen3,
    /// Gemma 2 (`"gemma2"`): RMSNorms scaling by `1 + w`, embeddings scaled by √width, GeGLU,
    /// norms before and after attention and MLP, soft-capped attention scores and logits,
    /// `query_pre_attn_scalar`, local (windowed) and global layers alternating.
    Gemma2,
    /// Gemma 3's text model (`"gemma3_text"`): Gemma 2's block without the soft caps, with
    /// query/key head norms, five local layers to a global one, and a RoPE base of its own
    /// (`rope_local_base_freq`) on the local layers.
    Gemma3,
    /// Phi-3 and Phi-3.5 (`"phi3"`): one `qkv_proj` for queries, keys and values, one
    /// `gate_up_proj` for the MLP's two inputs, RoPE on the first `partial_rotary_factor` of
    /// each head, a window on every layer where `sliding_window` is set.
    Phi3,
}

impl Family {
    /// Every family, in the order error messages list them.
    pub const ALL: [Family; 7] =
        [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3, Family::Gemma2, Family::Gemma3, Family::Phi3];

    /// The family a `model_type` names.
    pub fn of(model_type: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    /// The `model_type` written to `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
        }
    }

    /// Whether this is a Gemma (2 or 3): the block with norms around attention and MLP.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// The `transformers` class of the causal LM.
    pub fn causal_lm_class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// The defaults of the family's `transformers` config class where they differ from
    /// `LlamaConfig`'s, filled in for keys a `config.json` leaves out.
    fn defaults(self) -> Vec<(&'static str, Value)> {
        use serde_json::json;
        let qwen = || {
            vec![
                ("vocab_size", json!(151936)),
                ("intermediate_size", json!(22016)),
                ("max_position_embeddings", json!(32768)),
                ("use_sliding_window", json!(false)),
                ("sliding_window", json!(4096)),
                ("max_window_layers", json!(28)),
            ]
        };
        match self {
            Family::Llama => Vec::new(),
            Family::Mistral => vec![
                ("intermediate_size", json!(14336)),
                ("num_key_value_heads", json!(8)),
                ("max_position_embeddings", json!(4096 * 32)),
                ("sliding_window", json!(4096)),
            ],
            Family::Qwen2 => qwen(),
            Family::Qwen3 => {
                let mut d = qwen();
                d.push(("head_dim", json!(128)));
                d
            }
            Family::Phi3 => vec![
                ("vocab_size", json!(32064)),
                ("hidden_size", json!(3072)),
                ("intermediate_size", json!(8192)),
                ("max_position_embeddings", json!(4096)),
                ("original_max_position_embeddings", json!(4096)),
                ("rms_norm_eps", json!(1e-5)),
            ],
            Family::Gemma2 | Family::Gemma3 => {
                let gemma2 = self == Family::Gemma2;
                let mut d = vec![
                    ("vocab_size", json!(if gemma2 { 256000 } else { 262208 })),
                    ("hidden_size", json!(2304)),
                    ("intermediate_size", json!(9216)),
                    ("num_hidden_layers", json!(26)),
                    ("num_attention_heads", json!(8)),
                    ("num_key_value_heads", json!(4)),
                    ("head_dim", json!(256)),
                    ("hidden_act", json!("gelu_pytorch_tanh")),
                    ("hidden_activation", json!("gelu_pytorch_tanh")),
                    ("max_position_embeddings", json!(if gemma2 { 8192 } else { 131072 })),
                    ("tie_word_embeddings", json!(true)),
                    ("query_pre_attn_scalar", json!(256)),
                    ("sliding_window", json!(4096)),
                    ("final_logit_softcapping", if gemma2 { json!(30.0) } else { Value::Null }),
                    ("attn_logit_softcapping", if gemma2 { json!(50.0) } else { Value::Null }),
                ];
                if !gemma2 {
                    d.extend([
                        ("rope_theta", json!(1_000_000.0)),
                        ("rope_local_base_freq", json!(10000.0)),
                        ("sliding_window_pattern", json!(6)),
                    ]);
                }
                d
            }
        }
    }
}

/// RoPE frequency scaling (`rope_scaling`, or `rope_parameters` in newer `transformers`), as
/// `transformers`' `ROPE_INIT_FUNCTIONS` compute it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Every frequency divided by `factor` (position interpolation).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length of pretraining.
        original_max_position_embeddings: f64,
    },
    /// YaRN: a ramp between interpolated and original frequencies by dimension, and cos/sin
    /// multiplied by `attention_factor`.
    Yarn {
        /// Interpolation divisor.
        factor: f64,
        /// Multiplier of cos and sin.
        attention_factor: f64,
        /// Rotations bounding the ramp.
        beta_fast: f64,
        /// Rotations bounding the ramp.
        beta_slow: f64,
        /// The context length of pretraining.
        original_max_position_embeddings: f64,
        /// Whether the ramp's ends are rounded to whole dimensions.
        truncate: bool,
    },
}

impl RopeScaling {
    /// The inverse frequencies of a head of width `dim` with base `theta` (`dim / 2` of them),
    /// and the factor cos and sin are multiplied by.
    pub fn frequencies(&self, dim: usize, theta: f64) -> (Vec<f64>, f64) {
        let base: Vec<f64> = (0..dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / dim as f64)).collect();
        match *self {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let inv = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                attention_factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings: old,
                truncate,
            } => {
                let d = dim as f64;
                let correction = |rot: f64| d * (old / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let inv = base
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        f / factor * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect();
                (inv, attention_factor)
            }
        }
    }
}

/// Llama and the families built from its block ([`Family`]: `model_type` `"llama"`,
/// `"mistral"`, `"qwen2"`, `"qwen3"`, `"gemma2"`, `"gemma3_text"`, `"phi3"`), mirroring
/// `transformers.LlamaConfig` and the fields the other families' config classes add.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which family the `model_type` named.
    #[serde(skip)]
    pub family: Family,
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
    /// RoPE scaling in the older layout (see [`LlamaConfig::rope_for`]).
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
    /// Gemma's name for the MLP activation (`hidden_act` is ignored where given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<Activation>,
    /// Gemma: attention scores are scaled by `query_pre_attn_scalar^-½` instead of
    /// `head_dim^-½`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<usize>,
    /// Gemma 2: attention scores `s` become `cap · tanh(s / cap)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: output logits `l` become `cap · tanh(l / cap)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// Phi-3: the fraction of each head RoPE rotates (the rest passes through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Gemma 3: the RoPE base of the local (sliding) layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// The attention window of the sliding layers (Mistral, Qwen2/3, Gemma, Phi-3; see
    /// [`LlamaConfig::layer_window`]): a token sees itself and the `sliding_window - 1` before it.
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
    const KEYS: &'static [&'static str] = &[
        "max_window_layers",
        "use_sliding_window",
        "rope_interleaved",
        "layer_types",
        "sliding_window_pattern",
        "use_bidirectional_attention",
        "cache_implementation",
        "original_max_position_embeddings",
        "resid_pdrop",
        "embd_pdrop",
    ];

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

    /// Whether the query, key and value projections have biases.
    pub fn qkv_bias(&self) -> bool {
        self.family == Family::Qwen2 || self.attention_bias
    }

    /// Whether the output projection has a bias.
    pub fn o_bias(&self) -> bool {
        self.family != Family::Qwen2 && self.attention_bias
    }

    /// Whether each query and key head is RMS-normalised before RoPE (Qwen3, Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.family, Family::Qwen3 | Family::Gemma3)
    }

    /// The attention window of layer `layer`, or `None` where it attends to every earlier
    /// token, as `transformers` decides it: Mistral windows every layer by `sliding_window`;
    /// Qwen2/3 only with `use_sliding_window`, from layer `max_window_layers` on; a
    /// `layer_types` list names the sliding layers itself. A window as long as the context is
    /// no window.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let w = match self.family {
            Family::Llama => None,
            Family::Mistral => self.sliding_window,
            Family::Qwen2 | Family::Qwen3 => {
                self.sliding_window.filter(|_| self.extra.get("use_sliding_window") == Some(&Value::Bool(true)))
            }
            Family::Gemma2 | Family::Gemma3 | Family::Phi3 => self.sliding_window,
        }
        .filter(|&w| w < self.max_position_embeddings)?;
        if self.family.is_gemma() {
            return self.is_sliding_layer(layer).then_some(w);
        }
        let sliding = match self.extra.get("layer_types").and_then(Value::as_array) {
            Some(types) => types.get(layer).and_then(Value::as_str) == Some("sliding_attention"),
            None => match self.family {
                Family::Qwen2 | Family::Qwen3 => {
                    layer as u64 >= self.extra.get("max_window_layers").and_then(Value::as_u64).unwrap_or(28)
                }
                _ => true,
            },
        };
        sliding.then_some(w)
    }

    /// Whether layer `layer` is a local one, as `layer_types` or the family's pattern says
    /// (Gemma 2: every other layer from the first; Gemma 3: all but every
    /// `sliding_window_pattern`-th): it attends through the window and, in Gemma 3, rotates
    /// by the local RoPE base.
    pub fn is_sliding_layer(&self, layer: usize) -> bool {
        if let Some(types) = self.extra.get("layer_types").and_then(Value::as_array) {
            return types.get(layer).and_then(Value::as_str) == Some("sliding_attention");
        }
        match self.family {
            Family::Gemma2 => layer.is_multiple_of(2),
            Family::Gemma3 => {
                let pattern = self.extra.get("sliding_window_pattern").and_then(Value::as_u64).unwrap_or(6);
                !(layer as u64 + 1).is_multiple_of(pattern.max(1))
            }
            _ => self.layer_window(layer).is_some(),
        }
    }

    /// Whether queries, keys and values come from one fused projection (`qkv_proj`), and the
    /// MLP's gate and up branches from another (`gate_up_proj`): Phi-3.
    pub fn fused_projections(&self) -> bool {
        self.family == Family::Phi3
    }

    /// How many of each head's dimensions RoPE rotates: `head_dim · partial_rotary_factor`
    /// (the field, or `rope_parameters.partial_rotary_factor`), all of them by default.
    pub fn rotary_dim(&self) -> usize {
        let f = self
            .partial_rotary_factor
            .or_else(|| self.rope_parameters.as_ref()?.get("partial_rotary_factor")?.as_f64());
        f.map_or(self.head_dim(), |f| (self.head_dim() as f64 * f) as usize)
    }

    /// The MLP activation (Gemma's `hidden_activation` where given).
    pub fn activation(&self) -> Activation {
        match self.family {
            Family::Gemma2 | Family::Gemma3 => self.hidden_activation.unwrap_or(self.hidden_act),
            _ => self.hidden_act,
        }
    }

    /// The multiplier of `q · k`: `query_pre_attn_scalar^-½` (Gemma) or `head_dim^-½`.
    pub fn attention_scale(&self) -> f64 {
        1.0 / (self.query_pre_attn_scalar.unwrap_or(self.head_dim()) as f64).sqrt()
    }

    /// The RoPE base and scaling of the local (`sliding`) or the global layers: one for every
    /// layer except in Gemma 3, whose local layers rotate by `rope_local_base_freq` without
    /// scaling. `rope_parameters` may hold one set per layer type (`transformers` ≥ 5).
    pub fn rope_for(&self, sliding: bool) -> Result<(f64, RopeScaling)> {
        self.rope_of(sliding).map_err(|(field, msg)| Error::config("config.json", field, msg))
    }

    fn rope_of(&self, sliding: bool) -> std::result::Result<(f64, RopeScaling), (String, String)> {
        let kind = if sliding { "sliding_attention" } else { "full_attention" };
        let nested = self.rope_parameters.as_ref().and_then(|p| p.get(kind)).and_then(Value::as_object);
        if let Some(m) = nested {
            let theta = m.get("rope_theta").and_then(Value::as_f64).unwrap_or_else(|| match sliding {
                true if self.family == Family::Gemma3 => self.rope_local_base_freq.unwrap_or(10000.0),
                _ => self.rope_theta(),
            });
            return Ok((theta, self.rope_spec_of(&format!("rope_parameters.{kind}"), m)?));
        }
        if sliding && self.family == Family::Gemma3 {
            return Ok((self.rope_local_base_freq.unwrap_or(10000.0), RopeScaling::None));
        }
        Ok((self.rope_theta(), self.rope_spec()?))
    }

    fn rope_spec(&self) -> std::result::Result<RopeScaling, (String, String)> {
        let (name, params) = match (&self.rope_scaling, &self.rope_parameters) {
            (Some(Value::Object(m)), _) => ("rope_scaling", m),
            (None | Some(Value::Null), Some(m)) => ("rope_parameters", m),
            (None | Some(Value::Null), None) => return Ok(RopeScaling::None),
            (Some(other), _) => {
                return Err(("rope_scaling".into(), format!("expected an object or null, found {other}")))
            }
        };
        if params.values().any(Value::is_object) {
            // One set per layer type: each is checked by `rope_of`.
            return Ok(RopeScaling::None);
        }
        self.rope_spec_of(name, params)
    }

    /// The scaling the RoPE parameters `params` (found at `name`) describe.
    fn rope_spec_of(
        &self,
        name: &str,
        params: &Map<String, Value>,
    ) -> std::result::Result<RopeScaling, (String, String)> {
        let field = |k: &str| format!("{name}.{k}");
        const KNOWN: &[&str] = &[
            "rope_type",
            "type",
            "rope_theta",
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
            "partial_rotary_factor",
            "short_factor",
            "long_factor",
        ];
        if let Some(k) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err((field(k), "is not a RoPE parameter lmstack knows".into()));
        }
        let num = |k: &str| -> std::result::Result<Option<f64>, (String, String)> {
            match params.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                    _ => Err((field(k), format!("expected a positive number, found {v}"))),
                },
            }
        };
        let need = |k: &str| num(k)?.ok_or_else(|| (field(k), "missing".to_string()));
        let kind = params.get("rope_type").or_else(|| params.get("type"));
        let kind = match kind {
            None => "default",
            Some(v) => v.as_str().ok_or_else(|| (field("rope_type"), format!("expected a string, found {v}")))?,
        };
        let original = || -> std::result::Result<f64, (String, String)> {
            Ok(num("original_max_position_embeddings")?.unwrap_or(self.max_position_embeddings as f64))
        };
        // transformers reads Phi-3's older names of LongRoPE as LongRoPE.
        let kind = if self.family == Family::Phi3 && matches!(kind, "su" | "yarn") { "longrope" } else { kind };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: need("factor")? },
            "llama3" => {
                let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
                if low >= high {
                    return Err((field("low_freq_factor"), format!("{low} is not below high_freq_factor = {high}")));
                }
                RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                }
            }
            "yarn" => {
                let original = original()?;
                let factor = match num("factor")? {
                    Some(f) => f,
                    None => self.max_position_embeddings as f64 / original,
                };
                let mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
                let attention_factor = match (num("attention_factor")?, num("mscale")?, num("mscale_all_dim")?) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) => mscale(m) / mscale(all),
                    _ => mscale(1.0),
                };
                let truncate = match params.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => return Err((field("truncate"), format!("expected true or false, found {v}"))),
                };
                RopeScaling::Yarn {
                    factor,
                    attention_factor,
                    beta_fast: num("beta_fast")?.unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.unwrap_or(1.0),
                    original_max_position_embeddings: original,
                    truncate,
                }
            }
            "longrope" => {
                return Err((
                    field("rope_type"),
                    "`longrope` (Phi-3's long-context models) is not supported yet: its frequencies switch from \
                     `short_factor` to `long_factor` once a sequence passes original_max_position_embeddings, which \
                     invalidates the cached keys; the 4k models use no scaling"
                        .into(),
                ))
            }
            "dynamic" => {
                return Err((
                    field("rope_type"),
                    "`dynamic` is not supported: its frequencies change with the length of each call, so cached \
                     keys would disagree with new ones"
                        .into(),
                ))
            }
            other => {
                return Err((
                    field("rope_type"),
                    format!("`{other}` is not supported; expected default, linear, llama3 or yarn"),
                ))
            }
        })
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
// One per model, never in a hot path: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum ModelConfig {
    /// `gpt2`.
    Gpt2(Gpt2Config),
    /// `llama` and the families of its block: `mistral`, `qwen2`, `qwen3`, `gemma2`,
    /// `gemma3_text` ([`Family`]).
    Llama(LlamaConfig),
    /// `bert`.
    Bert(BertConfig),
}

/// Which architecture family a configuration describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// GPT-2.
    Gpt2,
    /// Llama and the families of its block ([`Family`]).
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
                return Err(Error::config(source, "model_type", format!("missing; expected one of {}", known_types())))
            }
        };
        // Gemma 3's multimodal checkpoints (`Gemma3ForConditionalGeneration`): the text model
        // its `text_config` describes (the vision tower is not read).
        let model_type = if model_type == "gemma3" {
            let text = match map.remove("text_config") {
                Some(Value::Object(t)) => t,
                other => {
                    let found = other.map_or("nothing".to_string(), |v| v.to_string());
                    return Err(Error::config(source, "text_config", format!("expected an object, found {found}")));
                }
            };
            if let Some(tie) = map.get("tie_word_embeddings").cloned() {
                map = text;
                map.entry("tie_word_embeddings").or_insert(tie);
            } else {
                map = text;
            }
            match map.remove("model_type") {
                None => "gemma3_text".to_string(),
                Some(Value::String(s)) if s == "gemma3_text" => s,
                Some(other) => {
                    return Err(Error::config(source, "text_config.model_type", format!("{other} is not gemma3_text")))
                }
            }
        } else {
            model_type
        };
        let family = Family::of(&model_type);
        if let Some(f) = family {
            for (k, v) in f.defaults() {
                map.entry(k).or_insert(v);
            }
        }
        let value = Value::Object(map);
        fn parse<T: serde::de::DeserializeOwned>(v: Value, source: &str) -> Result<T> {
            serde_path_to_error(v, source)
        }
        let cfg = match model_type.as_str() {
            "gpt2" => ModelConfig::Gpt2(parse(value, source)?),
            _ if family.is_some() => {
                let mut c: LlamaConfig = parse(value, source)?;
                c.family = family.unwrap_or_default();
                ModelConfig::Llama(c)
            }
            "bert" => ModelConfig::Bert(parse(value, source)?),
            other => {
                return Err(Error::config(
                    source,
                    "model_type",
                    format!("unsupported model type `{other}`; expected one of {}", known_types()),
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
            ModelConfig::Llama(c) => c.family.model_type(),
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

    /// The number of outputs of a causal model's sequence-classification head (`score`, a
    /// `…ForSequenceClassification` architecture: a reward model has 1): from `id2label`, else
    /// `num_labels`, else `transformers`' default 2. `None` for a language model and for BERT
    /// (whose classifier is [`BertConfig::num_labels`]).
    pub fn score_labels(&self) -> Option<usize> {
        if !self.is_causal() || !self.architectures().iter().any(|a| a.ends_with("ForSequenceClassification")) {
            return None;
        }
        let extra = self.extra();
        let n = match extra.get("id2label") {
            Some(Value::Object(m)) => Some(m.len()),
            _ => extra.get("num_labels").and_then(Value::as_u64).map(|n| n as usize),
        };
        Some(n.unwrap_or(2))
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
            // A key the family defaults when absent is written as null where it is unset, so
            // that reading the file back does not fill the default in.
            if let ModelConfig::Llama(c) = self {
                for (k, _) in c.family.defaults() {
                    m.entry(k).or_insert(Value::Null);
                }
                // Written resolved: some `transformers` classes read a null `head_dim` or
                // `rope_theta` as given (Qwen2's attention, the RoPE of a scaled config).
                if m.get("head_dim").is_none_or(Value::is_null) {
                    m.insert("head_dim".into(), c.head_dim().into());
                }
                if c.family == Family::Phi3 {
                    // Phi3Config's default pad id (32000) is outside a smaller vocabulary, where
                    // transformers refuses it as the embedding's padding index.
                    m.entry("pad_token_id").or_insert(Value::Null);
                }
                if c.family.is_gemma() {
                    // Gemma's configs name the tanh GELU as PyTorch does.
                    for key in ["hidden_act", "hidden_activation"] {
                        if m.get(key) == Some(&Value::String("gelu_new".into())) {
                            m.insert(key.into(), "gelu_pytorch_tanh".into());
                        }
                    }
                }
                let theta_in_params = c.rope_parameters.as_ref().is_some_and(|p| p.contains_key("rope_theta"));
                if m.get("rope_theta").is_none_or(Value::is_null) && !theta_in_params {
                    m.insert("rope_theta".into(), c.rope_theta().into());
                }
            }
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
                for sliding in [false, true] {
                    if let Err((field, msg)) = c.rope_spec().and_then(|_| c.rope_of(sliding)) {
                        return err(&field, msg);
                    }
                }
                if !c.family.is_gemma() {
                    for (field, set) in [
                        ("hidden_activation", c.hidden_activation.is_some()),
                        ("query_pre_attn_scalar", c.query_pre_attn_scalar.is_some()),
                        ("attn_logit_softcapping", c.attn_logit_softcapping.is_some()),
                        ("final_logit_softcapping", c.final_logit_softcapping.is_some()),
                        ("rope_local_base_freq", c.rope_local_base_freq.is_some()),
                    ] {
                        if set {
                            return err(field, format!("is not a field of model type `{}`", c.family.model_type()));
                        }
                    }
                }
                if c.family != Family::Phi3 {
                    for key in ["resid_pdrop", "embd_pdrop", "original_max_position_embeddings"] {
                        if c.extra.contains_key(key) {
                            return err(key, format!("is not a field of model type `{}`", c.family.model_type()));
                        }
                    }
                    if c.partial_rotary_factor.is_some() {
                        return err(
                            "partial_rotary_factor",
                            format!("is not a field of model type `{}`", c.family.model_type()),
                        );
                    }
                }
                if c.family != Family::Gemma3 && c.extra.contains_key("sliding_window_pattern") {
                    return err(
                        "sliding_window_pattern",
                        format!("is not a field of model type `{}`", c.family.model_type()),
                    );
                }
                for key in ["resid_pdrop", "embd_pdrop"] {
                    if let Some(v) = c.extra.get(key).filter(|v| v.as_f64() != Some(0.0)) {
                        return err(
                            key,
                            format!("{v} is not supported; only 0 (lmstack trains this family without dropout)"),
                        );
                    }
                }
                let rd = c.rotary_dim();
                if rd == 0 || rd % 2 != 0 || rd > c.head_dim() {
                    return err(
                        "partial_rotary_factor",
                        format!(
                            "rotates {rd} of {} dimensions per head; must be an even number from 2 to head_dim",
                            c.head_dim()
                        ),
                    );
                }
                if c.query_pre_attn_scalar == Some(0) {
                    return err("query_pre_attn_scalar", "must be at least 1".into());
                }
                for (field, v) in [
                    ("attn_logit_softcapping", c.attn_logit_softcapping),
                    ("final_logit_softcapping", c.final_logit_softcapping),
                    ("rope_local_base_freq", c.rope_local_base_freq),
                ] {
                    if let Some(x) = v.filter(|x| !(x.is_finite() && *x > 0.0)) {
                        return err(field, format!("{x} must be a positive number"));
                    }
                }
                if let Some(v) = c.extra.get("use_bidirectional_attention").filter(|v| v.as_bool() == Some(true)) {
                    return err(
                        "use_bidirectional_attention",
                        format!("{v} is not supported; lmstack's Gemma is a causal language model"),
                    );
                }
                if let Some(v) = c.extra.get("rope_interleaved") {
                    if v != &Value::Bool(false) {
                        return err("rope_interleaved", format!("{v} is not supported; only false (rotate-half RoPE)"));
                    }
                }
                if let Some(v) = c.extra.get("use_sliding_window").filter(|v| !v.is_boolean()) {
                    return err("use_sliding_window", format!("expected true or false, found {v}"));
                }
                if let Some(v) = c.extra.get("max_window_layers").filter(|v| !v.is_u64()) {
                    return err("max_window_layers", format!("expected a layer count, found {v}"));
                }
                if let Some(types) = c.extra.get("layer_types") {
                    let Some(list) = types.as_array() else {
                        return err("layer_types", format!("expected a list, found {types}"));
                    };
                    // A "sliding_attention" layer attends fully unless the family has a window.
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
                if c.sliding_window == Some(0) {
                    return err("sliding_window", "must be at least 1".into());
                }
                let window_off = c.extra.get("use_sliding_window") == Some(&Value::Bool(false));
                if let (Family::Llama, Some(w), false) = (c.family, c.sliding_window, window_off) {
                    if w < c.max_position_embeddings {
                        return err(
                            "sliding_window",
                            format!(
                                "{w} is below max_position_embeddings = {}, and `llama` has no sliding window \
                                 (model_type `mistral` has)",
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

/// The `model_type`s lmstack reads, for error messages.
fn known_types() -> String {
    let mut v = vec!["gpt2", "bert"];
    v.extend(Family::ALL.iter().map(|f| f.model_type()));
    v.join(", ")
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
