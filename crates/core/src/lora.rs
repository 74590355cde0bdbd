//! LoRA adapters in Hugging Face PEFT's layout: `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight`
//! (`[r, in]`) and `.lora_B.weight` (`[out, r]`). An adapter adds `scale · B(A x)` to the frozen
//! projection's output, with `scale = lora_alpha / r` (or `lora_alpha / √r` with `use_rslora`).
//!
//! Modules listed in `modules_to_save` (a reward model's new `score` head) are trained whole
//! beside the adapters and saved whole, as PEFT saves them: `base_model.model.score.weight`.

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
    /// e.g. `"CAUSAL_LM"`, `"SEQ_CLS"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Modules trained and saved whole beside the adapters (`["score"]` for a reward model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
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

/// A PEFT adapter read from disk: its config and, per module path, `(A, B)`.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    /// `adapter_config.json`, validated.
    pub config: LoraConfig,
    /// Module path → (`A [r, in]`, `B [out, r]`).
    pub weights: BTreeMap<String, (Tensor, Tensor)>,
    /// Whole weights of `modules_to_save`, by the base model's tensor name (`score.weight`).
    pub modules: BTreeMap<String, Tensor>,
    /// The weights file (for messages).
    pub file: String,
}

/// Reads a PEFT adapter directory; every tensor must be a `lora_A`/`lora_B` pair of rank `r`,
/// or a whole weight of a module in `modules_to_save`.
pub fn read_peft(dir: &Path) -> Result<PeftAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    let config: LoraConfig = crate::io::read_json(&cfg_path)?;
    config.validate(&cfg_path.display().to_string())?;
    let st = dir.join("adapter_model.safetensors");
    let file = st.display().to_string();
    let tensors: HashMap<String, Tensor> = crate::models::read_safetensors(&st)?;
    let mut a_of = BTreeMap::new();
    let mut b_of = BTreeMap::new();
    let mut modules = BTreeMap::new();
    let saved = config.modules_to_save.clone().unwrap_or_default();
    for (k, t) in tensors {
        let path = k.strip_prefix("base_model.model.");
        let module = path.and_then(|p| p.rsplit_once('.')).map(|(m, _)| m);
        if let (Some(p), Some(m)) = (path, module) {
            if !p.contains(".lora_") && saved.iter().any(|s| m == s || m.ends_with(&format!(".{s}"))) {
                modules.insert(p.to_owned(), t);
                continue;
            }
        }
        match path.and_then(|p| p.strip_suffix(".lora_A.weight")) {
            Some(m) => a_of.insert(m.to_owned(), t),
            None => match path.and_then(|p| p.strip_suffix(".lora_B.weight")) {
                Some(m) => b_of.insert(m.to_owned(), t),
                None => {
                    return Err(weight(
                        &file,
                        &k,
                        "is not a PEFT LoRA key (base_model.model.<path>.lora_A/B.weight) nor a weight of `modules_to_save`".into(),
                    ))
                }
            },
        };
    }
    let mut weights = BTreeMap::new();
    for (m, a) in a_of {
        let b = b_of
            .remove(&m)
            .ok_or_else(|| weight(&file, &peft_key(&m, "A"), format!("has no matching `{}`", peft_key(&m, "B"))))?;
        if a.rank() != 2 || b.rank() != 2 || a.dim(0)? != config.r || b.dim(1)? != config.r {
            return Err(weight(
                &file,
                &peft_key(&m, "A"),
                format!("shapes A {:?}, B {:?} are not [r, in], [out, r] with r = {}", a.dims(), b.dims(), config.r),
            ));
        }
        weights.insert(m, (a, b));
    }
    if let Some(m) = b_of.keys().next() {
        return Err(weight(&file, &peft_key(m, "B"), format!("has no matching `{}`", peft_key(m, "A"))));
    }
    if weights.is_empty() {
        return Err(weight(&file, "", "the adapter has no LoRA weights".into()));
    }
    Ok(PeftAdapter { config, weights, modules, file })
}

/// Reads a PEFT adapter directory and attaches its adapters to `model`'s projections; returns
/// how many were attached. Every tensor in the file must belong to a projection of the model,
/// with shapes that fit it.
pub fn load_peft(model: &mut Model, dir: &Path) -> Result<usize> {
    let PeftAdapter { config, mut weights, modules, file } = read_peft(dir)?;
    if let Some(k) = modules.keys().next() {
        return Err(weight(
            &file,
            &format!("base_model.model.{k}"),
            "is a whole module trained beside the adapters (`modules_to_save`: a reward model's head); fold the adapter into its base with `train merge` and load the merged directory".into(),
        ));
    }
    let dtype: DType = model.dtype();
    let device = model.device().clone();
    let scale = config.scale();
    let mut attached = 0;
    for lin in model.linears_mut() {
        let path = lin.path().to_owned();
        let Some((a, b)) = weights.remove(&path) else { continue };
        let (i, o) = lin.dims();
        if a.dims() != [config.r, i] || b.dims() != [o, config.r] {
            return Err(weight(
                &file,
                &peft_key(&path, "A"),
                format!(
                    "adapter shapes A {:?}, B {:?} do not fit r = {} on a {i} → {o} projection",
                    a.dims(),
                    b.dims(),
                    config.r
                ),
            ));
        }
        let a = a.to_dtype(dtype)?.to_device(&device)?;
        let b = b.to_dtype(dtype)?.to_device(&device)?;
        lin.set_adapter(Some(Arc::new(Lora { a, b, scale })));
        attached += 1;
    }
    if let Some(k) = weights.keys().next() {
        return Err(weight(&file, &peft_key(k, "A"), "does not belong to any projection of this model".into()));
    }
    Ok(attached)
}

/// Folds an adapter into a model's stored weights: `W ← W + scale · B A` for each adapted
/// projection (`{path}.weight`; GPT-2's `Conv1D` weights are stored transposed, `[in, out]`),
/// and the whole weights of `modules_to_save` in place of (or beside) the base's. The merged
/// model computes what base + adapter computes, with no adapter at run time.
pub fn merge_into(
    weights: &mut HashMap<String, Tensor>,
    model: &crate::ModelConfig,
    adapter: &PeftAdapter,
) -> Result<()> {
    let scale = adapter.config.scale();
    let conv1d = model.model_type_str() == "gpt2";
    for (path, (a, b)) in &adapter.weights {
        let key = format!("{path}.weight");
        let w = weights
            .get(&key)
            .ok_or_else(|| weight(&adapter.file, &peft_key(path, "A"), format!("the base model has no `{key}`")))?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?; // [out, in]
        let delta = if conv1d && !path.ends_with("lm_head") { delta.t()? } else { delta };
        if delta.dims() != w.dims() {
            return Err(weight(
                &adapter.file,
                &peft_key(path, "A"),
                format!("the update's shape {:?} does not fit `{key}` {:?}", delta.dims(), w.dims()),
            ));
        }
        let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
        weights.insert(key, merged);
    }
    for (name, t) in &adapter.modules {
        if let Some(w) = weights.get(name) {
            if w.dims() != t.dims() {
                return Err(weight(
                    &adapter.file,
                    &format!("base_model.model.{name}"),
                    format!("shape {:?} does not fit the base's `{name}` {:?}", t.dims(), w.dims()),
                ));
            }
        }
        weights.insert(name.clone(), t.clone());
    }
    Ok(())
}

fn weight(file: &str, name: &str, message: String) -> Error {
    Error::Weight { file: file.to_owned(), name: name.to_owned(), message }
}

/// Writes `adapters` (module path → A, B), the whole weights of `modules` (tensor name →
/// weight; `cfg.modules_to_save` names their modules) and `cfg` as a PEFT adapter directory
/// (both files or, on an error, neither).
pub fn save_peft(
    dir: &Path,
    cfg: &LoraConfig,
    adapters: &BTreeMap<String, (Tensor, Tensor)>,
    modules: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let mut files = crate::io::FileSet::in_dir(dir)?;
    let mut t: BTreeMap<String, Tensor> =
        modules.iter().map(|(k, v)| (format!("base_model.model.{k}"), v.clone())).collect();
    for (path, (a, b)) in adapters {
        t.insert(peft_key(path, "A"), a.clone());
        t.insert(peft_key(path, "B"), b.clone());
    }
    let st = dir.join("adapter_model.safetensors");
    files.write(&st, &crate::models::safetensors_bytes(&t, &st)?)?;
    files.write_json(&dir.join("adapter_config.json"), cfg)?;
    files.commit()
}
