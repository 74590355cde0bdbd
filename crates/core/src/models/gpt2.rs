//! GPT-2: "Language Models are Unsupervised Multitask Learners" (Radford et al., 2019).
//!
//! Mirrors `transformers.models.gpt2.modeling_gpt2`: learned absolute positions, pre-LN blocks,
//! fused `c_attn` q/k/v projection and HF `Conv1D` weights stored `[in, out]`, GELU (tanh) MLP,
//! LM head tied to the token embedding. Weight names are HF's (`transformer.h.0.attn.c_attn`).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::config::Gpt2Config;
use crate::nn::{attention_qkv, checkpointed, checkpoints, keep_rows, AttnCtx, Embedding, LayerNorm, Linear};
use crate::Result;

#[derive(Debug, Clone)]
struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    scale: f64,
}

#[derive(Debug, Clone)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// A GPT-2 language model.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    cfg: Gpt2Config,
    checkpointing: bool,
}

impl Block {
    /// One pre-LN block on the residual stream `x` (`[b, t, d]`); the attention output and
    /// residual keep only the `keep` rows when given (the last layer, see [`keep_rows`]).
    fn forward(
        &self,
        x: Tensor,
        ctx: &mut AttnCtx<'_, '_>,
        layer: usize,
        act: crate::config::Activation,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let qkv = self.attn.c_attn.forward(&self.ln_1.forward(&x)?)?;
        let a = attention_qkv(&qkv, self.attn.n_head, ctx, layer, self.attn.scale)?;
        let (x, a) = keep_rows(x, a, keep)?;
        let x = (x + self.attn.c_proj.forward(&a)?)?;
        let m = self.mlp.c_fc.forward(&self.ln_2.forward(&x)?)?;
        Ok((&x + self.mlp.c_proj.forward(&act.forward(&m)?)?)?)
    }
}

impl Gpt2 {
    /// Loads (or initialises) the model from `vb` rooted at the checkpoint's top level.
    /// Without `lm_head` (a sequence classifier, whose checkpoint has none) the head is a
    /// view of the token embedding that nothing computes with.
    pub fn load(vb: VarBuilder<'_>, cfg: &Gpt2Config, lm_head: bool) -> Result<Self> {
        let t = vb.pp("transformer");
        let d = cfg.n_embd;
        // `initializer_range` (GPT-2 and nanoGPT: 0.02), and GPT-2's scaled init of the
        // residual projections: that over sqrt(2 * n_layer).
        let std = cfg.extra.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
        let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        let wte = Embedding::load(t.pp("wte"), cfg.vocab_size, d, std)?;
        let wpe = Embedding::load(t.pp("wpe"), cfg.n_positions, d, std)?;
        let h = (0..cfg.n_layer)
            .map(|i| {
                let b = t.pp("h").pp(i);
                Ok(Block {
                    ln_1: LayerNorm::load(b.pp("ln_1"), d, cfg.layer_norm_epsilon)?,
                    attn: Attention {
                        c_attn: Linear::load_conv1d(b.pp("attn").pp("c_attn"), d, 3 * d, std)?,
                        c_proj: Linear::load_conv1d(b.pp("attn").pp("c_proj"), d, d, proj_std)?,
                        n_head: cfg.n_head,
                        scale: if cfg.scale_attn_weights { 1.0 / ((d / cfg.n_head) as f64).sqrt() } else { 1.0 },
                    },
                    ln_2: LayerNorm::load(b.pp("ln_2"), d, cfg.layer_norm_epsilon)?,
                    mlp: Mlp {
                        c_fc: Linear::load_conv1d(b.pp("mlp").pp("c_fc"), d, cfg.inner(), std)?,
                        c_proj: Linear::load_conv1d(b.pp("mlp").pp("c_proj"), cfg.inner(), d, proj_std)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(t.pp("ln_f"), d, cfg.layer_norm_epsilon)?;
        let lm_head = if cfg.tie_word_embeddings || !lm_head {
            Linear::from_tensors(wte.table().clone(), None, "lm_head")
        } else {
            Linear::load(vb.pp("lm_head"), d, cfg.vocab_size, false, std)?
        };
        Ok(Self { wte, wpe, h, ln_f, lm_head, cfg: cfg.clone(), checkpointing: false })
    }

    /// Final hidden states (after `ln_f`): of every token, or of the tokens `keep` lists (see
    /// [`keep_rows`]).
    ///
    /// # Shapes
    /// `ids`, `positions`: `[b, t]` (u32) → `[b, t, n_embd]`; with `keep` (`[k]`, u32),
    /// `[b, k, n_embd]`.
    pub fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        ctx: &mut AttnCtx<'_, '_>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut x = self.wte.forward(ids)?.broadcast_add(&self.wpe.forward(positions)?)?;
        let act = self.cfg.activation_function;
        for (i, blk) in self.h.iter().enumerate() {
            x = if self.checkpointing && checkpoints(ctx, keep) {
                let blk = blk.clone();
                checkpointed(&x, ctx, move |x, ctx| blk.forward(x.clone(), ctx, i, act, None))?
            } else {
                let keep = if i + 1 == self.h.len() { keep } else { None };
                blk.forward(x, ctx, i, act, keep)?
            };
        }
        Ok(self.ln_f.forward(&x)?)
    }

    /// Whether [`Gpt2::hidden`] runs each block through [`crate::grad::checkpoint`] when
    /// gradients are on (activation checkpointing: less memory, one more forward per block).
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Whether blocks run through [`crate::grad::checkpoint`] ([`Gpt2::set_checkpointing`]).
    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// The LM head: hidden states to vocabulary logits.
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// The token embedding and the output projection, for reading both from one packed copy
    /// when they are tied ([`Embedding::share_packed`] checks that they are).
    pub fn embedding_and_head(&mut self) -> (&mut Embedding, &mut Linear) {
        (&mut self.wte, &mut self.lm_head)
    }

    /// Every projection, for adapters.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for b in &mut self.h {
            v.extend([&mut b.attn.c_attn, &mut b.attn.c_proj, &mut b.mlp.c_fc, &mut b.mlp.c_proj]);
        }
        v.push(&mut self.lm_head);
        v
    }
}

/// Renames checkpoint tensors to the canonical `transformer.*` layout (the original OpenAI
/// checkpoints have no prefix; a sequence classifier's `score` head keeps its name) and drops
/// the attention-mask buffers older files carry.
pub fn normalize_names(tensors: &mut std::collections::HashMap<String, Tensor>) {
    let keys: Vec<String> = tensors.keys().cloned().collect();
    for k in keys {
        if k.ends_with(".attn.bias") || k.ends_with(".attn.masked_bias") {
            tensors.remove(&k);
            continue;
        }
        if !k.starts_with("transformer.") && !k.starts_with("lm_head.") && !k.starts_with("score.") {
            if let Some(t) = tensors.remove(&k) {
                tensors.insert(format!("transformer.{k}"), t);
            }
        }
    }
}
