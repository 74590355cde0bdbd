//! Llama: "LLaMA: Open and Efficient Foundation Language Models" (Touvron et al., 2023), with
//! grouped-query attention ("GQA", Ainslie et al., 2023).
//!
//! Mirrors `transformers.models.llama.modeling_llama`: RMSNorm pre-norm blocks, rotary
//! position embeddings in the "rotate half" layout with `rope_theta` (and `rope_scaling`:
//! linear, Llama 3.1's, YaRN), SwiGLU MLP (`down(act(gate(x)) * up(x))`),
//! `num_key_value_heads` shared K/V heads, tied or untied LM head.
//!
//! The families built from this block differ by switches of [`LlamaConfig`] ([`crate::config::Family`]), as
//! their `transformers` files differ from `modeling_llama` (`modular_*.py`):
//! - Mistral ("Mistral 7B", Jiang et al., 2023; `modeling_mistral`): a sliding attention
//!   window ([`LlamaConfig::layer_window`]).
//! - Qwen2 / Qwen2.5 ("Qwen2 Technical Report", 2024; `modeling_qwen2`): biases on the
//!   query, key and value projections, and a window on the upper layers when switched on.
//! - Qwen3 ("Qwen3 Technical Report", 2025; `modeling_qwen3`): RMSNorm over each query and
//!   key head before RoPE (`q_norm`, `k_norm`), `head_dim` set apart from the width.
//! - Gemma 2 ("Gemma 2: Improving Open Language Models at a Practical Size", 2024;
//!   `modeling_gemma2`): RMSNorms scaling by `1 + w`, embeddings times √width, GeGLU, a norm
//!   after attention and around the MLP (`pre_feedforward_layernorm`,
//!   `post_feedforward_layernorm`), soft-capped attention scores and logits,
//!   `query_pre_attn_scalar`, local (windowed) layers alternating with global ones.
//! - Gemma 3's text model ("Gemma 3 Technical Report", 2025; `modeling_gemma3`): Gemma 2's
//!   block with query/key head norms instead of soft caps, and a RoPE base of its own on the
//!   local layers.
//! - Phi-3 ("Phi-3 Technical Report", 2024; `modeling_phi3`): fused `qkv_proj` and
//!   `gate_up_proj` (kept fused, so checkpoints and PEFT adapters name them as Microsoft's do),
//!   RoPE on the first `partial_rotary_factor` of each head, a window where set.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::{Family, LlamaConfig};
use crate::nn::{attention, checkpointed, checkpoints, keep_rows, AttnCtx, Embedding, Linear, RmsNorm, Rotary, Scores};
use crate::Result;

/// Reads the language model of a multimodal checkpoint (Gemma 3's
/// `Gemma3ForConditionalGeneration`) as a text model: `language_model.model.*` (the layout on
/// the Hub) and `model.language_model.*` (`transformers` ≥ 5 in memory) become `model.*`, and
/// the vision tower and projector are dropped.
pub fn normalize_names(tensors: &mut std::collections::HashMap<String, Tensor>) {
    let names: Vec<String> = tensors.keys().cloned().collect();
    for name in names {
        let renamed = if let Some(rest) =
            name.strip_prefix("language_model.model.").or_else(|| name.strip_prefix("model.language_model."))
        {
            Some(format!("model.{rest}"))
        } else if let Some(rest) = name.strip_prefix("language_model.") {
            Some(rest.to_string())
        } else if ["vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."]
            .iter()
            .any(|p| name.starts_with(p))
        {
            tensors.remove(&name);
            None
        } else {
            None
        };
        if let Some(new) = renamed {
            if let Some(t) = tensors.remove(&name) {
                tensors.insert(new, t);
            }
        }
    }
}

/// `head(hidden)`, soft-capped by `cap`: `cap · tanh(logits / cap)`.
fn logits_of(head: &Linear, cap: Option<f64>, hidden: &Tensor) -> Result<Tensor> {
    let logits = head.forward(hidden)?;
    Ok(match cap {
        Some(c) => ((logits / c)?.tanh()? * c)?,
        None => logits,
    })
}

/// The query, key and value projections: three (`q_proj`, `k_proj`, `v_proj`), or Phi-3's
/// one `qkv_proj` whose output holds the three side by side.
#[derive(Debug, Clone)]
enum Qkv {
    Split { q_proj: Linear, k_proj: Linear, v_proj: Linear },
    Fused { qkv_proj: Linear },
}

/// The MLP's gate and up projections: two, or Phi-3's one `gate_up_proj` (gate first).
#[derive(Debug, Clone)]
enum GateUp {
    Split { gate_proj: Linear, up_proj: Linear },
    Fused { gate_up_proj: Linear },
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Qkv,
    o_proj: Linear,
    /// Qwen3's and Gemma 3's RMSNorm over each query head and each key head (`[head_dim]`
    /// weights).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// How the layer scores keys: scale, window ([`LlamaConfig::layer_window`]), soft cap.
    scores: Scores,
    /// Whether it rotates by the local RoPE base (Gemma 3's local layers).
    local_rope: bool,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// Llama's norm before the MLP; Gemma's after attention.
    post_attention_layernorm: RmsNorm,
    /// Gemma's norms before and after the MLP.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    mlp: Mlp,
}

/// A Llama language model.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    /// Gemma 3's RoPE of the local layers.
    local_rotary: Option<Rotary>,
    /// Gemma's embeddings are multiplied by √width.
    embed_scale: Option<f64>,
    cfg: LlamaConfig,
    checkpointing: bool,
}

/// What a block needs of the configuration.
#[derive(Debug, Clone, Copy)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    act: crate::config::Activation,
}

impl Block {
    /// One pre-norm block on the residual stream `x` (`[b, t, d]`); the attention output and
    /// residual keep only the `keep` rows when given (the last layer, see [`keep_rows`]).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: Tensor,
        rotary: &Rotary,
        positions: &Tensor,
        ctx: &mut AttnCtx<'_, '_>,
        layer: usize,
        s: Shape,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let xn = self.input_layernorm.forward(&x)?;
        let a = &self.self_attn;
        let (q, k, v) = match &a.qkv {
            Qkv::Split { q_proj, k_proj, v_proj } => (q_proj.forward(&xn)?, k_proj.forward(&xn)?, v_proj.forward(&xn)?),
            Qkv::Fused { qkv_proj } => {
                let y = qkv_proj.forward(&xn)?;
                let (nq, nk) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
                (y.narrow(D::Minus1, 0, nq)?, y.narrow(D::Minus1, nq, nk)?, y.narrow(D::Minus1, nq + nk, nk)?)
            }
        };
        let mut q = q.reshape((b, t, s.heads, s.head_dim))?;
        let mut k = k.reshape((b, t, s.kv_heads, s.head_dim))?;
        let v = v.reshape((b, t, s.kv_heads, s.head_dim))?;
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = rotary.apply(&q, positions)?;
        let k = rotary.apply(&k, positions)?;
        let o = attention(&q, &k, &v, ctx, layer, a.scores)?;
        let (x, o) = keep_rows(x, o, keep)?;
        let o = a.o_proj.forward(&o)?;
        let f = &self.mlp;
        let mlp = |xn: &Tensor| -> Result<Tensor> {
            let (g, u) = match &f.gate_up {
                GateUp::Split { gate_proj, up_proj } => (gate_proj.forward(xn)?, up_proj.forward(xn)?),
                GateUp::Fused { gate_up_proj } => {
                    let y = gate_up_proj.forward(xn)?;
                    let n = y.dim(D::Minus1)? / 2;
                    (y.narrow(D::Minus1, 0, n)?, y.narrow(D::Minus1, n, n)?)
                }
            };
            Ok(f.down_proj.forward(&(s.act.forward(&g)? * u)?)?)
        };
        match &self.feedforward_norms {
            None => {
                let x = (x + o)?;
                let y = mlp(&self.post_attention_layernorm.forward(&x)?)?;
                Ok((x + y)?)
            }
            Some((pre, post)) => {
                let x = (x + self.post_attention_layernorm.forward(&o)?)?;
                let y = post.forward(&mlp(&pre.forward(&x)?)?)?;
                Ok((x + y)?)
            }
        }
    }
}

impl Llama {
    /// Loads (or initialises) the model from `vb` rooted at the checkpoint's top level.
    /// Without `lm_head` (a sequence classifier, whose checkpoint has none) the head is a
    /// view of the token embedding that nothing computes with.
    pub fn load(vb: VarBuilder<'_>, cfg: &LlamaConfig, dtype: DType, device: &Device, lm_head: bool) -> Result<Self> {
        let m = vb.pp("model");
        let d = cfg.hidden_size;
        let (h, kvh, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let std = cfg.extra.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
        let embed_tokens = Embedding::load(m.pp("embed_tokens"), cfg.vocab_size, d, std)?;
        let (qkv_b, o_b) = (cfg.qkv_bias(), cfg.o_bias());
        let mb = cfg.mlp_bias;
        let gemma = cfg.family.is_gemma();
        let norm = |vb: VarBuilder<'_>, dim: usize| -> Result<RmsNorm> {
            if gemma {
                RmsNorm::load_gemma(vb, dim, cfg.rms_norm_eps)
            } else {
                RmsNorm::load(vb, dim, cfg.rms_norm_eps)
            }
        };
        let head_norm = |vb: VarBuilder<'_>| -> Result<Option<RmsNorm>> {
            Ok(if cfg.qk_norm() { Some(norm(vb, hd)?) } else { None })
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let b = m.pp("layers").pp(i);
                let a = b.pp("self_attn");
                let f = b.pp("mlp");
                Ok(Block {
                    input_layernorm: norm(b.pp("input_layernorm"), d)?,
                    self_attn: Attention {
                        qkv: if cfg.fused_projections() {
                            Qkv::Fused { qkv_proj: Linear::load(a.pp("qkv_proj"), d, (h + 2 * kvh) * hd, qkv_b, std)? }
                        } else {
                            Qkv::Split {
                                q_proj: Linear::load(a.pp("q_proj"), d, h * hd, qkv_b, std)?,
                                k_proj: Linear::load(a.pp("k_proj"), d, kvh * hd, qkv_b, std)?,
                                v_proj: Linear::load(a.pp("v_proj"), d, kvh * hd, qkv_b, std)?,
                            }
                        },
                        o_proj: Linear::load(a.pp("o_proj"), h * hd, d, o_b, std)?,
                        q_norm: head_norm(a.pp("q_norm"))?,
                        k_norm: head_norm(a.pp("k_norm"))?,
                        scores: Scores {
                            scale: cfg.attention_scale(),
                            window: cfg.layer_window(i),
                            softcap: cfg.attn_logit_softcapping,
                        },
                        local_rope: cfg.family == Family::Gemma3 && cfg.is_sliding_layer(i),
                    },
                    post_attention_layernorm: norm(b.pp("post_attention_layernorm"), d)?,
                    feedforward_norms: if gemma {
                        Some((
                            norm(b.pp("pre_feedforward_layernorm"), d)?,
                            norm(b.pp("post_feedforward_layernorm"), d)?,
                        ))
                    } else {
                        None
                    },
                    mlp: Mlp {
                        gate_up: if cfg.fused_projections() {
                            GateUp::Fused {
                                gate_up_proj: Linear::load(
                                    f.pp("gate_up_proj"),
                                    d,
                                    2 * cfg.intermediate_size,
                                    mb,
                                    std,
                                )?,
                            }
                        } else {
                            GateUp::Split {
                                gate_proj: Linear::load(f.pp("gate_proj"), d, cfg.intermediate_size, mb, std)?,
                                up_proj: Linear::load(f.pp("up_proj"), d, cfg.intermediate_size, mb, std)?,
                            }
                        },
                        down_proj: Linear::load(f.pp("down_proj"), cfg.intermediate_size, d, mb, std)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = norm(m.pp("norm"), d)?;
        let lm_head = if cfg.tie_word_embeddings || !lm_head {
            Linear::from_tensors(embed_tokens.table().clone(), None, "lm_head")
        } else {
            Linear::load(vb.pp("lm_head"), d, cfg.vocab_size, false, std)?
        };
        // RoPE tables are computed in f32 as transformers does, then cast once.
        let rope = |sliding: bool| -> Result<Rotary> {
            let (theta, scaling) = cfg.rope_for(sliding)?;
            Rotary::new(cfg.rotary_dim(), cfg.max_position_embeddings, theta, &scaling, dtype, device)
        };
        let rotary = rope(false)?;
        let local_rotary = if cfg.family == Family::Gemma3 { Some(rope(true)?) } else { None };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            local_rotary,
            embed_scale: gemma.then(|| (d as f64).sqrt()),
            cfg: cfg.clone(),
            checkpointing: false,
        })
    }

    /// Final hidden states (after the last RMSNorm): of every token, or of the tokens `keep`
    /// lists (see [`keep_rows`]).
    ///
    /// # Shapes
    /// `ids`, `positions`: `[b, t]` (u32) → `[b, t, hidden_size]`; with `keep` (`[k]`, u32),
    /// `[b, k, hidden_size]`.
    pub fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        ctx: &mut AttnCtx<'_, '_>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let shape = Shape {
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.kv_heads(),
            head_dim: self.cfg.head_dim(),
            act: self.cfg.activation(),
        };
        let mut x = self.embed_tokens.forward(ids)?;
        if let Some(s) = self.embed_scale {
            // transformers multiplies by √width in the embedding's dtype.
            x = x.broadcast_mul(&Tensor::new(s as f32, x.device())?.to_dtype(x.dtype())?)?;
        }
        for (i, blk) in self.layers.iter().enumerate() {
            let rotary = match &self.local_rotary {
                Some(local) if blk.self_attn.local_rope => local,
                _ => &self.rotary,
            };
            x = if self.checkpointing && checkpoints(ctx, keep) {
                let (blk, rotary, positions) = (blk.clone(), rotary.clone(), positions.clone());
                checkpointed(&x, ctx, move |x, ctx| blk.forward(x.clone(), &rotary, &positions, ctx, i, shape, None))?
            } else {
                let keep = if i + 1 == self.layers.len() { keep } else { None };
                blk.forward(x, rotary, positions, ctx, i, shape, keep)?
            };
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Whether [`Llama::hidden`] runs each block through [`crate::grad::checkpoint`] when
    /// gradients are on (activation checkpointing: less memory, one more forward per block).
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Whether blocks run through [`crate::grad::checkpoint`] ([`Llama::set_checkpointing`]).
    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// The LM head: hidden states to vocabulary logits (before Gemma 2's soft cap: see
    /// [`Llama::logits`]).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// The output logits of final hidden states: the LM head, soft-capped where the config
    /// says (`final_logit_softcapping`, Gemma 2).
    ///
    /// # Shapes
    /// `hidden`: `[.., hidden_size]` → `[.., vocab_size]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        logits_of(&self.lm_head, self.cfg.final_logit_softcapping, hidden)
    }

    /// [`Llama::logits`] as a function that owns what it needs (for the chunked loss).
    pub fn logits_fn(&self) -> impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static {
        let (head, cap) = (self.lm_head.clone(), self.cfg.final_logit_softcapping);
        move |h| logits_of(&head, cap, h)
    }

    /// The token embedding and the output projection, for reading both from one packed copy
    /// when they are tied ([`Embedding::share_packed`] checks that they are).
    pub fn embedding_and_head(&mut self) -> (&mut Embedding, &mut Linear) {
        (&mut self.embed_tokens, &mut self.lm_head)
    }

    /// Every projection, for adapters.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for b in &mut self.layers {
            let a = &mut b.self_attn;
            match &mut a.qkv {
                Qkv::Split { q_proj, k_proj, v_proj } => v.extend([q_proj, k_proj, v_proj]),
                Qkv::Fused { qkv_proj } => v.push(qkv_proj),
            }
            v.push(&mut a.o_proj);
            let f = &mut b.mlp;
            match &mut f.gate_up {
                GateUp::Split { gate_proj, up_proj } => v.extend([gate_proj, up_proj]),
                GateUp::Fused { gate_up_proj } => v.push(gate_up_proj),
            }
            v.push(&mut f.down_proj);
        }
        v.push(&mut self.lm_head);
        v
    }
}
