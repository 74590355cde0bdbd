//! The parameter store behind every model: hands tensors to model constructors by their
//! Hugging Face names, from a checkpoint or freshly initialised, frozen or trainable.
//!
//! Models are written once, against candle's `VarBuilder`; this store is the `VarBuilder`
//! backend that decides what a parameter is:
//! - [`ParamStore::frozen`]: plain tensors loaded from a checkpoint (inference, or the frozen
//!   base under a LoRA adapter);
//! - [`ParamStore::trainable`]: every parameter a [`Var`], loaded from a checkpoint or, when
//!   absent and initialisation is allowed, drawn from a seeded RNG (pretraining, full finetuning,
//!   a new classification head).
//!
//! The store records every parameter it hands out under its canonical name, so saving a model
//! writes exactly the tensors the model uses (tied weights once), and the optimizer gets exactly
//! the trainable ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One parameter handed to a model.
#[derive(Debug, Clone)]
pub struct Param {
    /// The tensor the model computes with (a `Var`'s tensor when trainable).
    pub tensor: Tensor,
    /// The variable, when the store is trainable.
    pub var: Option<Var>,
}

#[derive(Debug)]
struct Inner {
    source: HashMap<String, Tensor>,
    used: std::collections::HashSet<String>,
    file: String,
    trainable: bool,
    /// In a frozen store, the parameters that train all the same ([`ParamStore::frozen_except`]).
    trainable_names: std::collections::HashSet<String>,
    init_rng: Option<ChaCha8Rng>,
    params: BTreeMap<String, Param>,
    /// Parameters dropped by [`ParamStore::release`]: name → element count.
    released: BTreeMap<String, usize>,
    /// Quantized weights by name ([`ParamStore::frozen_quantized`]); the model is handed a
    /// placeholder of each, whose id maps back here ([`ParamStore::quantized_of`]).
    quantized: HashMap<String, Arc<QTensor>>,
    quantized_ids: HashMap<candle_core::TensorId, String>,
    /// The quantized weights held as the transpose of their placeholders.
    transposed: std::collections::HashSet<String>,
}

/// A shared, named collection of model parameters (see the module docs).
#[derive(Debug, Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
}

impl ParamStore {
    fn new(source: HashMap<String, Tensor>, file: &str, trainable: bool, init_seed: Option<u64>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                source,
                used: Default::default(),
                file: file.to_owned(),
                trainable,
                trainable_names: Default::default(),
                init_rng: init_seed.map(ChaCha8Rng::seed_from_u64),
                params: BTreeMap::new(),
                released: BTreeMap::new(),
                quantized: HashMap::new(),
                quantized_ids: HashMap::new(),
                transposed: Default::default(),
            })),
        }
    }

    /// Frozen parameters from checkpoint tensors; a missing tensor is an error naming `file`.
    pub fn frozen(tensors: HashMap<String, Tensor>, file: &str) -> Self {
        Self::new(tensors, file, false, None)
    }

    /// Frozen parameters of which some are quantized (a GGUF file): the model is handed an
    /// f32 placeholder of each quantized weight (its shape, no values) and its projections
    /// compute with the quantized tensor ([`ParamStore::quantized_of`]).
    ///
    /// The tensors named in `transposed` are stored transposed (a GPT-2 `Conv1D` weight, `[in,
    /// out]`, held quantized as `[out, in]`): their placeholders have the transposed shape.
    pub fn frozen_quantized(
        mut tensors: HashMap<String, Tensor>,
        quantized: HashMap<String, Arc<QTensor>>,
        transposed: &std::collections::HashSet<String>,
        file: &str,
    ) -> Self {
        for (name, q) in &quantized {
            let mut dims = q.shape().dims().to_vec();
            if transposed.contains(name) {
                dims.reverse();
            }
            let placeholder = crate::nn::placeholder_of(&dims.into(), DType::F32, &Device::Cpu)
                .expect("a scalar broadcasts to any shape");
            tensors.insert(name.clone(), placeholder);
        }
        let store = Self::new(tensors, file, false, None);
        store.lock().quantized = quantized;
        store.lock().transposed = transposed.clone();
        store
    }

    /// The quantized weight that `tensor` (a placeholder this store handed out) stands for.
    pub fn quantized_of(&self, tensor: &Tensor) -> Option<Arc<QTensor>> {
        let inner = self.lock();
        inner.quantized.get(inner.quantized_ids.get(&tensor.id())?).cloned()
    }

    /// Whether any parameter is held quantized.
    pub fn has_quantized(&self) -> bool {
        !self.lock().quantized.is_empty()
    }

    /// Bytes the parameters take: quantized ones as stored, the others at `dtype`'s size.
    pub fn bytes(&self, dtype: DType) -> usize {
        let inner = self.lock();
        let mut n = inner.released.values().sum::<usize>() * dtype.size_in_bytes();
        for (name, p) in &inner.params {
            n += match inner.quantized.get(name) {
                Some(q) => q.storage_size_in_bytes(),
                None => p.tensor.elem_count() * dtype.size_in_bytes(),
            };
        }
        n
    }

    /// Trainable parameters: checkpoint tensors become variables, and tensors absent from
    /// `tensors` are initialised from an RNG seeded with `init_seed` (or are an error when
    /// `init_seed` is `None`).
    pub fn trainable(tensors: HashMap<String, Tensor>, file: &str, init_seed: Option<u64>) -> Self {
        Self::new(tensors, file, true, init_seed)
    }

    /// Frozen parameters except those named in `trainable` (a new head trained beside LoRA
    /// adapters: PEFT's `modules_to_save`), which become variables, initialised from an RNG
    /// seeded with `init_seed` when `tensors` lacks them. Any other missing tensor is an error.
    pub fn frozen_except(
        tensors: HashMap<String, Tensor>,
        file: &str,
        trainable: &[&str],
        init_seed: Option<u64>,
    ) -> Self {
        let store = Self::new(tensors, file, false, init_seed);
        store.lock().trainable_names = trainable.iter().map(|s| (*s).to_owned()).collect();
        store
    }

    /// Freshly initialised trainable parameters (pretraining from scratch).
    pub fn init(seed: u64) -> Self {
        Self::new(HashMap::new(), "<new model>", true, Some(seed))
    }

    /// A `VarBuilder` over this store with the given dtype and device.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every parameter handed out so far, by canonical name.
    pub fn params(&self) -> BTreeMap<String, Param> {
        self.lock().params.clone()
    }

    /// The current value of every parameter, by canonical name (what a checkpoint holds).
    ///
    /// Quantized weights are dequantized to f32 here (their placeholders hold no values).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let inner = self.lock();
        inner
            .params
            .iter()
            .map(|(k, p)| {
                let t = match inner.quantized.get(k) {
                    Some(q) => {
                        let t = q.dequantize(&Device::Cpu).expect("a CPU quantized tensor dequantizes");
                        // Held transposed (`frozen_quantized`): back to the placeholder's layout.
                        if inner.transposed.contains(k) {
                            t.t().and_then(|t| t.contiguous()).expect("a matrix transposes")
                        } else {
                            t
                        }
                    }
                    None => p.tensor.clone(),
                };
                (k.clone(), t)
            })
            .collect()
    }

    /// The trainable variables, by name.
    pub fn vars(&self) -> BTreeMap<String, Var> {
        self.lock().params.iter().filter_map(|(k, p)| Some((k.clone(), p.var.clone()?))).collect()
    }

    /// Total number of scalar parameters (tied tensors counted once; released ones too).
    pub fn num_parameters(&self) -> usize {
        let inner = self.lock();
        inner.params.values().map(|p| p.tensor.elem_count()).sum::<usize>() + inner.released.values().sum::<usize>()
    }

    /// Drops the store's hold on the frozen parameter `name` when it is `tensor` (the same
    /// tensor, not a copy), so its memory is freed once the model lets go of it too: for a
    /// weight that now lives in another form (repacked for inference). Returns whether it was
    /// released; a trainable store keeps everything. A store with released parameters cannot
    /// be saved ([`ParamStore::released`]).
    pub fn release(&self, name: &str, tensor: &Tensor) -> bool {
        let mut inner = self.lock();
        if inner.trainable || inner.params.get(name).is_none_or(|p| p.tensor.id() != tensor.id()) {
            return false;
        }
        let p = inner.params.remove(name).expect("checked above");
        inner.released.insert(name.to_owned(), p.tensor.elem_count());
        true
    }

    /// The parameters dropped by [`ParamStore::release`], by name.
    pub fn released(&self) -> Vec<String> {
        self.lock().released.keys().cloned().collect()
    }

    /// Checkpoint tensors that no model component asked for.
    pub fn unused(&self) -> Vec<String> {
        let inner = self.lock();
        let mut v: Vec<String> = inner.source.keys().filter(|k| !inner.used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    /// Drops the checkpoint tensors once the model is built, so memory is held once.
    pub fn release_source(&self) {
        let mut inner = self.lock();
        inner.source = HashMap::new();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn init_tensor(rng: &mut ChaCha8Rng, shape: &Shape, init: Init) -> Vec<f32> {
    let n = shape.elem_count();
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> f32 {
        // Box-Muller: two uniforms give one standard normal.
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        (mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => (0..n).map(|_| normal(rng, mean, stdev)).collect(),
        Init::Uniform { lo, up } => (0..n).map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32).collect(),
        Init::Kaiming { .. } => {
            // Fan-in of a `[out, in]` weight; the models here always pass explicit normals.
            let fan_in = shape.dims().last().copied().unwrap_or(1).max(1) as f64;
            let std = (1.0 / fan_in).sqrt();
            (0..n).map(|_| normal(rng, 0.0, std)).collect()
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for ParamStore {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut inner = self.lock();
        if let Some(p) = inner.params.get(name) {
            if p.tensor.shape() != &s {
                candle_core::bail!(
                    "{}: tensor `{name}` is used with shape {:?} and {:?}",
                    inner.file,
                    p.tensor.dims(),
                    s.dims()
                );
            }
            return Ok(p.tensor.clone());
        }
        let trainable = inner.trainable || inner.trainable_names.contains(name);
        let tensor = if let Some(t) = inner.source.get(name).cloned() {
            if t.shape() != &s {
                candle_core::bail!(
                    "{}: tensor `{name}` has shape {:?}, the config implies {:?}",
                    inner.file,
                    t.dims(),
                    s.dims()
                );
            }
            inner.used.insert(name.to_owned());
            t.to_dtype(dtype)?.to_device(dev)?
        } else if let (true, Some(rng)) = (trainable, inner.init_rng.as_mut()) {
            let data = init_tensor(rng, &s, h);
            Tensor::from_vec(data, s, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?
        } else {
            candle_core::bail!("{}: tensor `{name}` is missing", inner.file);
        };
        let param = if trainable {
            let var = Var::from_tensor(&tensor)?;
            Param { tensor: var.as_tensor().clone(), var: Some(var) }
        } else {
            Param { tensor, var: None }
        };
        let t = param.tensor.clone();
        if inner.quantized.contains_key(name) {
            if dtype != DType::F32 || !dev.is_cpu() {
                candle_core::bail!("{}: tensor `{name}` is quantized; it computes in f32 on the CPU only", inner.file);
            }
            inner.quantized_ids.insert(t.id(), name.to_owned());
        }
        inner.params.insert(name.to_owned(), param);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = {
            let inner = self.lock();
            match inner.params.get(name) {
                Some(p) => p.tensor.shape().clone(),
                None => match inner.source.get(name) {
                    Some(t) => t.shape().clone(),
                    None => candle_core::bail!("{}: tensor `{name}` is missing", inner.file),
                },
            }
        };
        self.get(shape, name, Init::Const(0.0), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let inner = self.lock();
        inner.params.contains_key(name) || inner.source.contains_key(name)
    }
}
