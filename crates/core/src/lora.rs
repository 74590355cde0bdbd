//! LoRA adapters in Hugging Face PEFT's layout: `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight`
//! (`[r, in]`) and `.lora_B.weight` (`[out, r]`). An adapter adds `scale · B(A x)` to the frozen
//! projection's output, with `scale = lora_alpha / r` (or `lora_alpha / √r` with `use_rslora`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::LinearAdapter;
use crate::{Error, Model, Result};

/// `adapter_config.json` (the fields lmstack reads and writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "lora")]
    pub peft_type: String,
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Dropout on the adapter input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (suffixes of module paths), or `"all-linear"`.
    pub target_modules: TargetModules,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Only `"none"` is supported.
    #[serde(default = "none")]
    pub bias: String,
    /// The base model (informational).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// e.g. `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Fields lmstack does not interpret, kept so a round trip preserves them.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn lora() -> String {
    "LORA".into()
}

fn none() -> String {
    "none".into()
}

/// Which projections carry adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names matched against the end of each module path (`q_proj` matches
    /// `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// `"all-linear"` (every projection but the output head), as PEFT.
    Special(String),
}

impl LoraConfig {
    /// The factor applied to `B(A x)`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Whether the module at `path` is targeted.
    pub fn targets(&self, path: &str) -> Result<bool> {
        match &self.target_modules {
            TargetModules::List(names) => Ok(names.iter().any(|n| path == n || path.ends_with(&format!(".{n}")))),
            TargetModules::Special(s) if s == "all-linear" => Ok(!path.ends_with("lm_head") && !path.is_empty()),
            TargetModules::Special(s) => Err(Error::invalid(
                "target_modules",
                format!("`{s}`: a regular expression is not supported; list module names or use \"all-linear\""),
            )),
        }
    }

    /// Checks the values; errors name the field.
    pub fn validate(&self, file: &str) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config(file.to_owned(), field, msg));
        if self.peft_type != "LORA" {
            return bad("peft_type", format!("`{}` is not supported (only LORA)", self.peft_type));
        }
        if self.r == 0 {
            return bad("r", "the rank must be positive".into());
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            return bad("lora_alpha", format!("{} must be a positive number", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("lora_dropout", format!("{} is outside [0, 1)", self.lora_dropout));
        }
        if self.bias != "none" {
            return bad("bias", format!("`{}` is not supported (only \"none\")", self.bias));
        }
        self.targets("x")?;
        Ok(())
    }
}

/// One projection's low-rank update.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `lora_alpha / r`.
    pub scale: f64,
}

impl LinearAdapter for Lora {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = xs.broadcast_matmul(&self.a.t()?)?;
        h.broadcast_matmul(&self.b.t()?)? * self.scale
    }
}

/// The safetensors key of a module's A or B matrix.
pub fn peft_key(path: &str, which: &str) -> String {
    format!("base_model.model.{path}.lora_{which}.weight")
}

/// Reads a PEFT adapter directory and attaches its adapters to `model`'s projections; returns
/// how many were attached. Every tensor in the file must belong to a projection of the model,
/// with shapes that fit it.
pub fn load_peft(model: &mut Model, dir: &Path) -> Result<usize> {
    let cfg_path = dir.join("adapter_config.json");
    let file = cfg_path.display().to_string();
    let cfg: LoraConfig = crate::io::read_json(&cfg_path)?;
    cfg.validate(&file)?;
    let st = dir.join("adapter_model.safetensors");
    let mut tensors: HashMap<String, Tensor> = crate::models::read_safetensors(&st)?;
    let stf = st.display().to_string();
    let dtype: DType = model.dtype();
    let device = model.device().clone();
    let scale = cfg.scale();
    let mut attached = 0;
    for lin in model.linears_mut() {
        let path = lin.path().to_owned();
        let (ka, kb) = (peft_key(&path, "A"), peft_key(&path, "B"));
        let (a, b) = match (tensors.remove(&ka), tensors.remove(&kb)) {
            (Some(a), Some(b)) => (a, b),
            (None, None) => continue,
            (Some(_), None) => return Err(weight(&stf, &ka, format!("has no matching `{kb}`"))),
            (None, Some(_)) => return Err(weight(&stf, &kb, format!("has no matching `{ka}`"))),
        };
        let (i, o) = lin.dims();
        if a.dims() != [cfg.r, i] || b.dims() != [o, cfg.r] {
            return Err(weight(
                &stf,
                &ka,
                format!(
                    "adapter shapes A {:?}, B {:?} do not fit r = {} on a {i} → {o} projection",
                    a.dims(),
                    b.dims(),
                    cfg.r
                ),
            ));
        }
        let a = a.to_dtype(dtype)?.to_device(&device)?;
        let b = b.to_dtype(dtype)?.to_device(&device)?;
        lin.set_adapter(Some(Arc::new(Lora { a, b, scale })));
        attached += 1;
    }
    if let Some(k) = tensors.keys().min() {
        return Err(weight(&stf, k, "does not belong to any projection of this model".into()));
    }
    if attached == 0 {
        return Err(weight(&stf, "", "the adapter has no LoRA weights".into()));
    }
    Ok(attached)
}

fn weight(file: &str, name: &str, message: String) -> Error {
    Error::Weight { file: file.to_owned(), name: name.to_owned(), message }
}

/// Writes `adapters` (module path → A, B) and `cfg` as a PEFT adapter directory.
pub fn save_peft(dir: &Path, cfg: &LoraConfig, adapters: &BTreeMap<String, (Tensor, Tensor)>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let mut t = BTreeMap::new();
    for (path, (a, b)) in adapters {
        t.insert(peft_key(path, "A"), a.clone());
        t.insert(peft_key(path, "B"), b.clone());
    }
    crate::models::save_safetensors(&dir.join("adapter_model.safetensors"), &t)?;
    crate::io::write_json(&dir.join("adapter_config.json"), cfg)
}
