//! BERT: "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"
//! (Devlin et al., 2019).
//!
//! Mirrors `transformers.models.bert.modeling_bert`: word + position + token-type embeddings,
//! post-LN encoder layers with bidirectional (padding-masked) attention, the masked-LM head
//! `cls.predictions` (transform dense + GELU + LayerNorm, decoder tied to the word embeddings,
//! output bias `cls.predictions.bias`), and the pooled classification head of
//! `BertForSequenceClassification` (`bert.pooler.dense` + tanh on `[CLS]`, then `classifier`).

use std::collections::HashMap;

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::{Activation, BertConfig};
use crate::nn::{attention, AttnCtx, Embedding, LayerNorm, Linear};
use crate::Result;

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_ln: LayerNorm,
}

#[derive(Debug, Clone)]
struct MlmHead {
    dense: Linear,
    ln: LayerNorm,
    decoder: Linear,
}

/// A BERT encoder with an optional masked-LM head and optional pooled classifier.
#[derive(Debug, Clone)]
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    mlm: Option<MlmHead>,
    classifier: Option<Linear>,
    cfg: BertConfig,
}

/// Which heads a BERT model carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BertHeads {
    /// The masked-LM head (`cls.predictions`).
    pub mlm: bool,
    /// The pooler (`bert.pooler.dense`).
    pub pooler: bool,
    /// The sequence classifier (`classifier`), with this many labels.
    pub classifier: Option<usize>,
}

impl BertHeads {
    /// The heads implied by `architectures` and, for a checkpoint, by the tensors present.
    pub fn infer(cfg: &BertConfig, archs: &[String], has: &dyn Fn(&str) -> bool) -> Self {
        let classify = archs.iter().any(|a| a == "BertForSequenceClassification") || has("classifier.weight");
        let mlm = archs.iter().any(|a| a == "BertForMaskedLM" || a == "BertForPreTraining")
            || has("cls.predictions.transform.dense.weight")
            || (archs.is_empty() && !classify);
        Self {
            mlm,
            pooler: classify || has("bert.pooler.dense.weight"),
            classifier: if classify { Some(cfg.num_labels().unwrap_or(2)) } else { None },
        }
    }
}

impl Bert {
    /// Loads (or initialises) the model and the given heads.
    pub fn load(vb: VarBuilder<'_>, cfg: &BertConfig, heads: BertHeads) -> Result<Self> {
        let b = vb.pp("bert");
        let d = cfg.hidden_size;
        let std = cfg.extra.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
        let eps = cfg.layer_norm_eps;
        let e = b.pp("embeddings");
        let word = Embedding::load(e.pp("word_embeddings"), cfg.vocab_size, d, std)?;
        let position = Embedding::load(e.pp("position_embeddings"), cfg.max_position_embeddings, d, std)?;
        let token_type = Embedding::load(e.pp("token_type_embeddings"), cfg.type_vocab_size, d, std)?;
        let emb_ln = LayerNorm::load(e.pp("LayerNorm"), d, eps)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = b.pp("encoder").pp("layer").pp(i);
                let s = l.pp("attention").pp("self");
                let o = l.pp("attention").pp("output");
                Ok(Layer {
                    query: Linear::load(s.pp("query"), d, d, true, std)?,
                    key: Linear::load(s.pp("key"), d, d, true, std)?,
                    value: Linear::load(s.pp("value"), d, d, true, std)?,
                    attn_out: Linear::load(o.pp("dense"), d, d, true, std)?,
                    attn_ln: LayerNorm::load(o.pp("LayerNorm"), d, eps)?,
                    intermediate: Linear::load(l.pp("intermediate").pp("dense"), d, cfg.intermediate_size, true, std)?,
                    output: Linear::load(l.pp("output").pp("dense"), cfg.intermediate_size, d, true, std)?,
                    output_ln: LayerNorm::load(l.pp("output").pp("LayerNorm"), d, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pooler = if heads.pooler { Some(Linear::load(b.pp("pooler").pp("dense"), d, d, true, std)?) } else { None };
        let mlm = if heads.mlm {
            let p = vb.pp("cls").pp("predictions");
            let decoder_w = if cfg.tie_word_embeddings {
                word.table().clone()
            } else {
                p.pp("decoder").get_with_hints((cfg.vocab_size, d), "weight", Init::Randn { mean: 0.0, stdev: std })?
            };
            let bias = p.get_with_hints(cfg.vocab_size, "bias", Init::Const(0.0))?;
            Some(MlmHead {
                dense: Linear::load(p.pp("transform").pp("dense"), d, d, true, std)?,
                ln: LayerNorm::load(p.pp("transform").pp("LayerNorm"), d, eps)?,
                decoder: Linear::from_tensors(decoder_w, Some(bias), "cls.predictions.decoder"),
            })
        } else {
            None
        };
        let classifier = match heads.classifier {
            Some(n) => Some(Linear::load(vb.pp("classifier"), d, n, true, std)?),
            None => None,
        };
        Ok(Self { word, position, token_type, emb_ln, layers, pooler, mlm, classifier, cfg: cfg.clone() })
    }

    /// The heads this model carries.
    pub fn heads(&self) -> BertHeads {
        BertHeads {
            mlm: self.mlm.is_some(),
            pooler: self.pooler.is_some(),
            classifier: self.classifier.as_ref().map(|c| c.dims().1),
        }
    }

    /// Encoder output (one vector per token).
    ///
    /// # Shapes
    /// `ids`, `positions`, `token_types`: `[b, t]` (u32) → `[b, t, hidden_size]`.
    pub fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        token_types: &Tensor,
        ctx: &mut AttnCtx<'_, '_>,
    ) -> Result<Tensor> {
        let x = (self.word.forward(ids)? + self.position.forward(positions)?)?;
        let mut x = self.emb_ln.forward(&(x + self.token_type.forward(token_types)?)?)?;
        let nh = self.cfg.num_attention_heads;
        let hd = self.cfg.hidden_size / nh;
        let scale = 1.0 / (hd as f64).sqrt();
        for (i, l) in self.layers.iter().enumerate() {
            let (b, t, _) = x.dims3()?;
            let q = l.query.forward(&x)?.reshape((b, t, nh, hd))?;
            let k = l.key.forward(&x)?.reshape((b, t, nh, hd))?;
            let v = l.value.forward(&x)?.reshape((b, t, nh, hd))?;
            let a = attention(&q, &k, &v, ctx, i, crate::nn::Scores::scaled(scale))?;
            x = l.attn_ln.forward(&(l.attn_out.forward(&a)? + &x)?)?;
            let m = self.cfg.hidden_act.forward(&l.intermediate.forward(&x)?)?;
            x = l.output_ln.forward(&(l.output.forward(&m)? + &x)?)?;
        }
        Ok(x)
    }

    /// Masked-LM logits from encoder output.
    ///
    /// # Shapes
    /// `hidden`: `[.., hidden_size]` → `[.., vocab_size]`.
    pub fn mlm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self
            .mlm
            .as_ref()
            .ok_or_else(|| crate::Error::invalid("model", "this BERT model has no masked-LM head (cls.predictions)"))?;
        let x = self.cfg.hidden_act.forward(&head.dense.forward(hidden)?)?;
        let x = head.ln.forward(&x)?;
        Ok(head.decoder.forward(&x)?)
    }

    /// Pooled `[CLS]` representation (`tanh(dense(h[:, 0]))`).
    ///
    /// # Shapes
    /// `hidden`: `[b, t, hidden_size]` → `[b, hidden_size]`.
    pub fn pooled(&self, hidden: &Tensor) -> Result<Tensor> {
        let pooler =
            self.pooler.as_ref().ok_or_else(|| crate::Error::invalid("model", "this BERT model has no pooler"))?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(pooler.forward(&cls)?.tanh()?)
    }

    /// Classification logits from encoder output.
    ///
    /// # Shapes
    /// `hidden`: `[b, t, hidden_size]` → `[b, num_labels]`.
    pub fn classify(&self, hidden: &Tensor) -> Result<Tensor> {
        let c = self
            .classifier
            .as_ref()
            .ok_or_else(|| crate::Error::invalid("model", "this BERT model has no classification head (classifier)"))?;
        Ok(c.forward(&self.pooled(hidden)?)?)
    }

    /// The word embedding and the masked-LM decoder (when the model has that head), for reading
    /// both from one packed copy when they are tied ([`Embedding::share_packed`] checks that).
    pub fn embedding_and_head(&mut self) -> Option<(&mut Embedding, &mut Linear)> {
        Some((&mut self.word, &mut self.mlm.as_mut()?.decoder))
    }

    /// Every projection, for adapters.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for l in &mut self.layers {
            v.extend([&mut l.query, &mut l.key, &mut l.value, &mut l.attn_out, &mut l.intermediate, &mut l.output]);
        }
        v.extend(self.pooler.as_mut());
        if let Some(h) = self.mlm.as_mut() {
            v.push(&mut h.dense);
        }
        v.extend(self.classifier.as_mut());
        v
    }

    /// The activation of the MLP (for tests and docs).
    pub fn activation(&self) -> Activation {
        self.cfg.hidden_act
    }
}

/// Renames checkpoint tensors to the canonical layout: TF-era `gamma`/`beta` LayerNorm names,
/// a base `BertModel` saved without the `bert.` prefix, and `cls.predictions.decoder.bias`
/// (tied to `cls.predictions.bias`).
pub fn normalize_names(tensors: &mut HashMap<String, Tensor>) {
    let keys: Vec<String> = tensors.keys().cloned().collect();
    for k in keys {
        let mut n = k.clone();
        if n.ends_with(".gamma") {
            n = format!("{}.weight", &n[..n.len() - 6]);
        } else if n.ends_with(".beta") {
            n = format!("{}.bias", &n[..n.len() - 5]);
        }
        if n.starts_with("embeddings.") || n.starts_with("encoder.") || n.starts_with("pooler.") {
            n = format!("bert.{n}");
        }
        if n == "cls.predictions.decoder.bias" {
            if tensors.contains_key("cls.predictions.bias") {
                tensors.remove(&k);
                continue;
            }
            n = "cls.predictions.bias".into();
        }
        if n.ends_with(".position_ids") {
            tensors.remove(&k);
            continue;
        }
        if n != k {
            if let Some(t) = tensors.remove(&k) {
                tensors.insert(n, t);
            }
        }
    }
}
