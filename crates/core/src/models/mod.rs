//! Model architectures (one file each) and [`Model`], the type the rest of lmstack uses.
//!
//! A [`Model`] is built from a [`ModelConfig`] and a [`ParamStore`]; it offers
//! - [`Model::forward`]: whole sequences `[b, t]` with an optional padding mask, built only
//!   from differentiable ops when parameters are trainable (training, scoring);
//! - [`Model::forward_cached`]: new tokens of several sequences packed together, each continuing
//!   its own [`KvCache`] at its own position: prefill (many tokens) and decode (one token) mixed
//!   in one call, as a continuously batching server needs;
//! - [`Model::classify`] and masked-LM logits for BERT.

pub mod bert;
pub mod gpt2;
pub mod llama;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};

use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::nn::{batch_mask, AttnCtx, Linear, Segments};
use crate::params::ParamStore;
use crate::{Error, Result};

// One per model: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Arch {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
    Bert(bert::Bert),
}

/// A language model of any supported architecture.
#[derive(Debug, Clone)]
pub struct Model {
    arch: Arch,
    config: ModelConfig,
    store: ParamStore,
    dtype: DType,
    device: Device,
    /// Bytes of all weights, known once the store has them (see [`Model::forward_cached`]).
    weight_bytes: usize,
    /// Whether new caches store keys and values as bf16 ([`Model::set_kv_cache_dtype`]).
    kv_bf16: bool,
    /// The type the file held its unquantized matrices in, which
    /// [`Model::repack_for_inference`] keeps ([`Model::stored_matrix_dtype`]).
    stored: DType,
    /// Rows per loss chunk under checkpointing ([`Model::set_loss_chunk_rows`]).
    loss_chunk_rows: Option<usize>,
    /// A causal model's sequence-classification head (`score`: hidden → labels, no bias), in
    /// place of the LM head ([`Model::score`]).
    score: Option<Linear>,
}

/// Above this many bytes of weights, [`Model::forward_cached`] parallelises each matrix
/// product instead of splitting a step's sequences over two threads.
pub const SPLIT_MAX_WEIGHT_BYTES: usize = 16 << 20;

/// The threads a cached forward step runs on ([`Model::forward_cached_on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepThreads {
    /// Two halves of the step's sequences on two threads where [`Model::can_split`], else each
    /// large product spread over the pool ([`Model::forward_cached`]'s choice).
    Auto,
    /// The calling thread only: no hand-off to the pool at all. Faster when the other cores are
    /// busy with other work and the steps are small.
    One,
}

/// One sequence's part of a [`Model::forward_cached`] call.
#[derive(Debug)]
pub struct SeqStep<'a> {
    /// The new tokens: the whole prompt (or a chunk of it) for prefill, one token for decode.
    pub tokens: &'a [u32],
    /// The sequence's cache; the tokens take positions `cache.len()..`.
    pub cache: &'a mut KvCache,
    /// Return logits for every new token (prompt scoring) instead of only the last one.
    pub all_logits: bool,
}

/// What [`Model`]'s scored-rows head sums over chunks: `(logits, targets, start)` → a tensor.
type ScoredReduce = std::sync::Arc<dyn Fn(&Tensor, &Tensor, usize) -> crate::Result<Tensor> + Send + Sync>;

impl Model {
    /// Builds a model from `config` with parameters from `store`.
    pub fn new(config: ModelConfig, store: &ParamStore, dtype: DType, device: &Device) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::invalid("dtype", format!("{dtype:?} is not a float type")));
        }
        let vb = store.var_builder(dtype, device);
        let labels = config.score_labels();
        let score = match labels {
            Some(n) => {
                let std = config.extra().get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
                Some(Linear::load(vb.pp("score"), config.hidden_size(), n, false, std)?)
            }
            None => None,
        };
        let arch = match &config {
            ModelConfig::Gpt2(c) => Arch::Gpt2(gpt2::Gpt2::load(vb, c, labels.is_none())?),
            ModelConfig::Llama(c) => Arch::Llama(llama::Llama::load(vb, c, dtype, device, labels.is_none())?),
            ModelConfig::Bert(c) => {
                let heads = bert::BertHeads::infer(c, &config.architectures(), &|n| store_has(store, n));
                Arch::Bert(bert::Bert::load(vb, c, heads)?)
            }
        };
        let weight_bytes = store.bytes(dtype);
        let mut m = Self {
            arch,
            config,
            store: store.clone(),
            dtype,
            device: device.clone(),
            weight_bytes,
            kv_bf16: false,
            stored: DType::F32,
            loss_chunk_rows: None,
            score,
        };
        if store.has_quantized() {
            m.attach_quantized()?;
        }
        Ok(m)
    }

    /// Gives every projection and embedding whose weight the store holds quantized its
    /// quantized tensor; a quantized weight no layer takes is an error naming it (its
    /// placeholder holds no values, so computing with it would be silently wrong).
    fn attach_quantized(&mut self) -> Result<()> {
        let store = self.store.clone();
        let mut attached = std::collections::HashSet::new();
        for l in self.linears_mut() {
            if let Some(q) = store.quantized_of(l.stored_weight()) {
                attached.insert(l.stored_weight().id());
                l.set_quantized(q)?;
            }
        }
        if let Some(emb) = self.token_embedding_mut() {
            if let Some(q) = store.quantized_of(emb.table()) {
                attached.insert(emb.table().id());
                emb.set_quantized(q)?;
            }
        }
        for (name, p) in store.params() {
            if store.quantized_of(&p.tensor).is_some() && !attached.contains(&p.tensor.id()) {
                return Err(Error::Weight {
                    file: "<model>".into(),
                    name,
                    message: "is quantized, but the layer that uses it cannot compute with quantized weights".into(),
                });
            }
        }
        Ok(())
    }

    /// A new model with freshly initialised trainable parameters (seeded).
    pub fn init(config: ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::new(config, &ParamStore::init(seed), dtype, device)
    }

    /// Loads `config.json` and `model.safetensors` (or a sharded index) from `dir` with frozen
    /// parameters, for inference.
    ///
    /// `dir` may also be a GGUF file ([`crate::gguf`]): its quantized weights stay quantized.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            return Ok(crate::gguf::load_model(dir, dtype, device)?.0);
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let (tensors, file) = load_checkpoint(dir, &config)?;
        let store = ParamStore::frozen(tensors, &file);
        let m = Self::new(config, &store, dtype, device)?;
        store.release_source();
        Ok(m)
    }

    /// Loads a model directory with trainable parameters; tensors the checkpoint lacks (a new
    /// head) are initialised from `init_seed` when given, else are an error.
    pub fn load_trainable(dir: &Path, dtype: DType, device: &Device, init_seed: Option<u64>) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let (tensors, file) = load_checkpoint(dir, &config)?;
        let store = ParamStore::trainable(tensors, &file, init_seed);
        let m = Self::new(config, &store, dtype, device)?;
        store.release_source();
        Ok(m)
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (created if needed), in the
    /// Hugging Face layout; both change together or, on an error, neither does.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with_config(dir, &self.config_json())
    }

    /// [`Model::save`] with `config` (e.g. [`Model::config_json`] with more keys) as
    /// `config.json`.
    pub fn save_with_config(&self, dir: &Path, config: &serde_json::Value) -> Result<()> {
        let mut files = crate::io::FileSet::in_dir(dir)?;
        self.stage(dir, config, &mut files)?;
        files.commit()
    }

    /// Stages `config.json` (`config` as its content) and `model.safetensors` in `dir` into
    /// `files`, to change together with other files ([`crate::Pretrained::save`]).
    pub fn stage(&self, dir: &Path, config: &serde_json::Value, files: &mut crate::io::FileSet) -> Result<()> {
        if let Some(name) = self.store.released().first() {
            return Err(Error::invalid(
                "model",
                format!(
                    "`{name}` and other weights were released after repacking for inference \
                     (Model::repack_for_inference); load the model again to save it"
                ),
            ));
        }
        files.write_json(&dir.join("config.json"), config)?;
        let path = dir.join("model.safetensors");
        files.write(&path, &safetensors_bytes(&self.store.tensors(), &path)?)
    }

    /// The `config.json` content for this model (with `architectures` and `torch_dtype`).
    pub fn config_json(&self) -> serde_json::Value {
        let mut cfg = self.config.clone();
        let archs = match &self.arch {
            Arch::Gpt2(_) if self.score.is_some() => "GPT2ForSequenceClassification".to_owned(),
            Arch::Gpt2(_) => "GPT2LMHeadModel".into(),
            Arch::Llama(_) => {
                let class = match &self.config {
                    ModelConfig::Llama(c) => c.family.causal_lm_class(),
                    _ => "LlamaForCausalLM",
                };
                match self.score {
                    Some(_) => class.replace("ForCausalLM", "ForSequenceClassification"),
                    None => class.into(),
                }
            }
            Arch::Bert(b) if b.heads().classifier.is_some() => "BertForSequenceClassification".into(),
            Arch::Bert(b) if b.heads().mlm => "BertForMaskedLM".into(),
            Arch::Bert(_) => "BertModel".into(),
        };
        let extra = cfg.extra_mut();
        extra.insert("architectures".into(), serde_json::json!([archs]));
        let dt = match self.dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        };
        extra.insert("torch_dtype".into(), dt.into());
        extra.remove("dtype");
        cfg.to_value()
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parameter store (names, tensors, trainable variables).
    pub fn params(&self) -> &ParamStore {
        &self.store
    }

    /// Number of parameters (tied weights counted once), as `model.num_parameters()` reports.
    pub fn num_parameters(&self) -> usize {
        self.store.num_parameters()
    }

    /// The dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The context length.
    pub fn max_len(&self) -> usize {
        self.config.max_position_embeddings()
    }

    /// Repacks every projection's weight for the AVX2 inference kernel ([`Linear::repack`]):
    /// faster decoding and prefill for a model that only runs inference from now on (serving,
    /// sampling, evaluation). The original of each repacked weight is then released (unless
    /// it is shared, as GPT-2's output projection shares the token embedding), so the weights
    /// are held once; the model can no longer be saved. Returns the bytes the packed copies
    /// take (0 where the CPU lacks AVX2 + FMA or the weights are not f32). The packed values
    /// keep the precision the file stored them in ([`Model::stored_matrix_dtype`]): a GGUF
    /// file's f16 matrices stay f16, half the bytes of f32 read per step.
    pub fn repack_for_inference(&mut self) -> Result<usize> {
        self.repack_for_inference_as(self.stored)
    }

    /// The type the loaded file held the unquantized matrices in where that is narrower than
    /// f32 and every such matrix had it: `F16` or `BF16` for a GGUF file stored so, else `F32`
    /// (a model directory loads as f32 whatever its safetensors hold).
    pub fn stored_matrix_dtype(&self) -> DType {
        self.stored
    }

    /// Records the type the file held the unquantized matrices in (see
    /// [`Model::stored_matrix_dtype`]); for loaders.
    pub(crate) fn set_stored_matrix_dtype(&mut self, dtype: DType) {
        self.stored = dtype;
    }

    /// [`Model::repack_for_inference`] with the packed weights held as `dtype`: `F32`, `BF16`
    /// or `F16` for half the weight memory and bytes read per step (each weight rounded to
    /// bf16 or f16 — exact for weights stored so — the arithmetic still f32; `F16` where the
    /// CPU has F16C, else f32).
    pub fn repack_for_inference_as(&mut self, dtype: DType) -> Result<usize> {
        let store = self.store.clone();
        let mut bytes = 0;
        for l in self.linears_mut() {
            if !l.repack_as(dtype)? {
                continue;
            }
            bytes += l.packed_bytes();
            if store.release(&format!("{}.weight", l.path()), l.stored_weight()) {
                l.release_weight()?;
            }
        }
        // A token embedding tied to the output projection reads its rows from the packed copy.
        let tied = match &mut self.arch {
            Arch::Gpt2(m) => Some(m.embedding_and_head()),
            Arch::Llama(m) => Some(m.embedding_and_head()),
            Arch::Bert(m) => m.embedding_and_head(),
        };
        if let Some((emb, head)) = tied {
            let name = format!("{}.weight", emb.path());
            // Checked before the store lets go, so a table is never released unshared.
            if emb.is_packed_in(head) && store.release(&name, emb.table()) {
                emb.share_packed(head)?;
                head.release_weight()?;
            }
        }
        Ok(bytes)
    }

    /// Replaces every quantized weight by an f32 copy of its values (what `transformers` does
    /// when it loads a GGUF file): a reference for the quantized kernels, at 4-8x the memory.
    /// Returns how many weights were dequantized.
    pub fn dequantize(&mut self) -> Result<usize> {
        let mut n = 0;
        for l in self.linears_mut() {
            if l.quantized().is_some() {
                let w = l.weight_values()?;
                l.set_weight(w)?;
                n += 1;
            }
        }
        if let Some(e) = self.token_embedding_mut() {
            n += usize::from(e.dequantize()?);
        }
        Ok(n)
    }

    /// The token embedding of a causal model (the one a GGUF file may hold quantized).
    fn token_embedding_mut(&mut self) -> Option<&mut crate::nn::Embedding> {
        match &mut self.arch {
            Arch::Gpt2(m) => Some(m.embedding_and_head().0),
            Arch::Llama(m) => Some(m.embedding_and_head().0),
            Arch::Bert(_) => None,
        }
    }

    /// Every linear projection, by module path, so adapters can be attached by name.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match &mut self.arch {
            Arch::Gpt2(m) => m.linears_mut(),
            Arch::Llama(m) => m.linears_mut(),
            Arch::Bert(m) => m.linears_mut(),
        }
    }

    /// Makes every quantized projection compute exactly whether or not a gradient flows
    /// ([`Linear::set_exact_products`]): what a training run needs, whose passes without
    /// gradients (a reference model's, evaluations) are compared with those with.
    pub fn set_exact_products(&mut self, on: bool) {
        for lin in self.linears_mut() {
            lin.set_exact_products(on);
        }
    }

    /// The BERT model, for its encoder-specific methods.
    pub fn as_bert(&self) -> Option<&bert::Bert> {
        match &self.arch {
            Arch::Bert(b) => Some(b),
            _ => None,
        }
    }

    /// An empty KV cache sized for this model, storing keys and values as
    /// [`Model::set_kv_cache_dtype`] chose.
    pub fn new_cache(&self) -> KvCache {
        let (kvh, hd) = self.config.kv_shape();
        let mut c = KvCache::new(self.config.num_layers(), kvh, hd, self.max_len(), self.dtype, &self.device);
        if self.kv_bf16 {
            c.store_bf16().expect("checked by set_kv_cache_dtype");
        }
        c
    }

    /// The type caches from [`Model::new_cache`] store keys and values as: the model's own
    /// (`dtype` equal to [`Model::dtype`]), or bf16 on a CPU model computing in f32
    /// ([`KvCache::store_bf16`]: half the cache memory, slightly different outputs).
    pub fn set_kv_cache_dtype(&mut self, dtype: DType) -> Result<()> {
        if dtype == self.dtype {
            self.kv_bf16 = false;
            return Ok(());
        }
        if dtype != DType::BF16 {
            return Err(Error::invalid(
                "kv_cache_dtype",
                format!("{dtype:?} keys and values are not supported (the model's {:?}, or bf16)", self.dtype),
            ));
        }
        let (kvh, hd) = self.config.kv_shape();
        KvCache::new(self.config.num_layers(), kvh, hd, self.max_len(), self.dtype, &self.device).store_bf16()?;
        self.kv_bf16 = true;
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.config.vocab_size();
        match ids.iter().find(|&&i| i as usize >= v) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab_size: v }),
            None => Ok(()),
        }
    }

    /// Logits for whole sequences: next-token logits for causal models, masked-LM logits for
    /// BERT. `attention_mask` (`[b, t]`, 1 = token, 0 = padding) hides padded keys; positions
    /// are `0..t` for every row, so pad on the right.
    ///
    /// # Shapes
    /// `input_ids`: `[b, t]` (u32) → `[b, t, vocab_size]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.check_lm_head()?;
        let hidden = self.hidden_states(input_ids, attention_mask, None)?;
        match &self.arch {
            Arch::Gpt2(m) => Ok(m.lm_head().forward(&hidden)?),
            Arch::Llama(m) => m.logits(&hidden),
            Arch::Bert(m) => m.mlm_logits(&hidden),
        }
    }

    /// Activation checkpointing ("gradient checkpointing" in transformers): with it on, while
    /// gradients are on, each block of a whole-sequence forward keeps only its input and reruns
    /// in the backward pass ([`crate::grad::checkpoint`]; collect gradients with
    /// [`crate::grad::backward`]), and [`Model::lm_loss`] computes the loss in chunks of
    /// rows. Memory for activations falls from every block's intermediates to one block's;
    /// a step costs about one more forward pass. Causal models only.
    pub fn set_gradient_checkpointing(&mut self, on: bool) -> Result<()> {
        match &mut self.arch {
            Arch::Gpt2(m) => m.set_checkpointing(on),
            Arch::Llama(m) => m.set_checkpointing(on),
            Arch::Bert(_) if on => {
                return Err(Error::invalid("gradient_checkpointing", "not implemented for bert models"));
            }
            Arch::Bert(_) => {}
        }
        Ok(())
    }

    /// Whether activation checkpointing is on ([`Model::set_gradient_checkpointing`]).
    pub fn gradient_checkpointing(&self) -> bool {
        match &self.arch {
            Arch::Gpt2(m) => m.checkpointing(),
            Arch::Llama(m) => m.checkpointing(),
            Arch::Bert(_) => false,
        }
    }

    /// Rows of output logits per chunk of [`Model::lm_loss`] under checkpointing: by default
    /// about 32 MB of f32 logits (and as much again for their gradient).
    fn loss_chunk_rows(&self) -> usize {
        self.loss_chunk_rows.unwrap_or(((8usize << 20) / self.config.vocab_size().max(1)).max(16))
    }

    /// Sets the rows per chunk of [`Model::lm_loss`] under checkpointing (`None`: the
    /// default of about 32 MB of logits).
    pub fn set_loss_chunk_rows(&mut self, rows: Option<usize>) {
        self.loss_chunk_rows = rows.map(|r| r.max(1));
    }

    /// Mean cross-entropy over the positions whose label is not
    /// [`crate::kernels::ops::IGNORE_INDEX`], and their number (next-token labels for causal
    /// models, masked positions for BERT; differentiable when the model is trainable).
    /// `segments`: several sequences packed in a row (padding-free batches; see
    /// [`Segments`]).
    ///
    /// Only the scored rows go through the output head, so the full `[b, t, vocab]` logits
    /// never exist (an SFT batch scores its answers only). With
    /// [`Model::set_gradient_checkpointing`] on, the head and loss run in chunks of rows,
    /// each a checkpoint, so at most one chunk's logits and their gradient exist at once (as
    /// Liger's fused linear cross-entropy and cut-cross-entropy avoid materialising them).
    ///
    /// # Shapes
    /// `input_ids`, `labels`: `[b, t]` (u32) → scalar.
    pub fn lm_loss(&self, input_ids: &Tensor, labels: &Tensor, segments: Option<&Segments>) -> Result<(Tensor, usize)> {
        use crate::kernels::ops::cross_entropy;
        let (total, n) = self.over_scored(
            input_ids,
            labels,
            segments,
            std::sync::Arc::new(|logits: &Tensor, targets: &Tensor, _: usize| {
                let (mean, k) = cross_entropy(logits, targets)?;
                Ok((mean * k as f64)?)
            }),
        )?;
        Ok(((total / n as f64)?, n))
    }

    /// The log-probability of each row's scored labels, summed over the row (a DPO answer's
    /// sequence log-probability), and how many labels each row scores (rows scoring none sum
    /// to 0). With `segments` (sequences packed along rows, padding-free) the sums are per
    /// segment, in span order. The same scored-rows-only head and chunking as
    /// [`Model::lm_loss`]; differentiable when the model is trainable. Causal models.
    ///
    /// # Shapes
    /// `input_ids`, `labels`: `[b, t]` (u32) → `[b]`, or `[segments]`.
    pub fn sequence_logps(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        segments: Option<&Segments>,
    ) -> Result<(Tensor, Vec<usize>)> {
        use crate::kernels::ops::{token_nll, IGNORE_INDEX};
        if !self.config.is_causal() {
            return Err(Error::invalid("model", "sequence log-probabilities need a causal model"));
        }
        let (rows, t) = labels.dims2()?;
        let lv = labels.flatten_all()?.to_vec1::<u32>()?;
        // The sequence each position belongs to: its row, or its segment.
        let (b, seq_of): (usize, Vec<Option<usize>>) = match segments {
            None => (rows, (0..rows * t).map(|i| Some(i / t)).collect()),
            Some(s) => {
                let mut of = vec![None; rows * t];
                for (k, &(row, start, len)) in s.spans().iter().enumerate() {
                    of[row * t + start..row * t + start + len].iter_mut().for_each(|x| *x = Some(k));
                }
                (s.spans().len(), of)
            }
        };
        // Sequence of each scored position, in the order the scored rows go through the head.
        let mut row_of = Vec::new();
        for (i, &l) in lv.iter().enumerate().filter(|(_, &l)| l != IGNORE_INDEX) {
            row_of.push(seq_of[i].ok_or_else(|| {
                Error::invalid("labels", format!("position {i} is scored (label {l}) outside every segment"))
            })?);
        }
        let mut counts = vec![0usize; b];
        row_of.iter().for_each(|&r| counts[r] += 1);
        let row_of = std::sync::Arc::new(row_of);
        let (sums, _) = self.over_scored(
            input_ids,
            labels,
            segments,
            std::sync::Arc::new(move |logits: &Tensor, targets: &Tensor, start: usize| {
                let (nll, _) = token_nll(logits, targets)?;
                let len = nll.dim(0)?;
                // A [b, len] 0/1 matrix gathers each scored token into its row's sum.
                let mut assign = vec![0f32; b * len];
                for (j, &r) in row_of[start..start + len].iter().enumerate() {
                    assign[r * len + j] = 1.0;
                }
                let assign = Tensor::from_vec(assign, (b, len), nll.device())?.to_dtype(nll.dtype())?;
                Ok(assign.matmul(&nll.unsqueeze(1)?)?.squeeze(1)?.neg()?)
            }),
        )?;
        Ok((sums, counts))
    }

    /// Runs the output head on the positions `labels` scores (not [`IGNORE_INDEX`]) and sums
    /// `reduce(logits, targets, start)` over chunks of them (`start`: the chunk's first scored
    /// position), each chunk a checkpoint under [`Model::set_gradient_checkpointing`]; one
    /// chunk otherwise. Returns the sum and the number of scored positions (at least one).
    ///
    /// [`IGNORE_INDEX`]: crate::kernels::ops::IGNORE_INDEX
    fn over_scored(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        segments: Option<&Segments>,
        reduce: ScoredReduce,
    ) -> Result<(Tensor, usize)> {
        use crate::kernels::ops::IGNORE_INDEX;
        self.check_lm_head()?;
        if labels.dims() != input_ids.dims() {
            return Err(Error::invalid(
                "labels",
                format!("shape {:?} does not match input_ids {:?}", labels.dims(), input_ids.dims()),
            ));
        }
        let lv = labels.flatten_all()?.to_vec1::<u32>()?;
        let (rows, targets): (Vec<u32>, Vec<u32>) =
            lv.iter().enumerate().filter(|(_, &l)| l != IGNORE_INDEX).map(|(i, &l)| (i as u32, l)).unzip();
        if targets.is_empty() {
            return Err(Error::invalid("labels", "every label is ignored; nothing to score"));
        }
        let hidden = self.hidden_states_in(input_ids, None, None, segments)?;
        let (b, t, d) = hidden.dims3()?;
        let n = targets.len();
        let h = hidden.reshape((b * t, d))?;
        let h = if n < b * t { h.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)? } else { h };
        let head = self.output_head();
        if !self.gradient_checkpointing() || !crate::grad::enabled() {
            let logits = head(&h)?;
            return Ok((reduce(&logits, &Tensor::from_vec(targets, n, &self.device)?, 0)?, n));
        }
        let chunk = self.loss_chunk_rows();
        let mut total: Option<Tensor> = None;
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let tc = Tensor::from_slice(&targets[start..start + len], len, &self.device)?;
            let (head, reduce) = (head.clone(), reduce.clone());
            let part = crate::grad::checkpoint(
                &h.narrow(0, start, len)?,
                std::sync::Arc::new(move |h: &Tensor| Ok(reduce(&head(h)?, &tc, start)?)),
            )?;
            total = Some(match total {
                Some(t) => (t + part)?,
                None => part,
            });
        }
        Ok((total.expect("n > 0"), n))
    }

    /// The output head as a function of hidden rows (`[.., d]` → `[.., vocab]`): the LM head
    /// of a causal model, the masked-LM head of BERT.
    fn output_head(&self) -> crate::grad::BlockFn {
        match &self.arch {
            Arch::Gpt2(m) => {
                let head = m.lm_head().clone();
                std::sync::Arc::new(move |h| head.forward(h))
            }
            Arch::Llama(m) => {
                let logits = m.logits_fn();
                std::sync::Arc::new(move |h| Ok(logits(h)?))
            }
            Arch::Bert(m) => {
                let m = m.clone();
                std::sync::Arc::new(move |h| Ok(m.mlm_logits(h)?))
            }
        }
    }

    /// Final hidden states for whole sequences (see [`Model::forward`]); `token_type_ids` is
    /// used by BERT only (zeros when `None`).
    ///
    /// # Shapes
    /// `input_ids`: `[b, t]` (u32) → `[b, t, hidden_size]`.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.hidden_states_in(input_ids, attention_mask, token_type_ids, None)
    }

    /// [`Model::hidden_states`], with several sequences packed in a row where `segments`
    /// says (each attends only within itself, positions from 0).
    fn hidden_states_in(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
        segments: Option<&Segments>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let longest = segments.map_or(t, Segments::max_len);
        if longest > self.max_len() {
            return Err(Error::ContextOverflow { len: longest, max: self.max_len() });
        }
        if let Some(s) = segments {
            if let Some(&(row, start, len)) = s.spans().iter().find(|&&(r, st, l)| r >= b || st + l > t) {
                return Err(Error::invalid(
                    "segments",
                    format!("({row}, {start}, {len}) is outside the [{b}, {t}] batch"),
                ));
            }
        }
        self.check_ids(&input_ids.flatten_all()?.to_vec1::<u32>()?)?;
        let positions = match segments {
            Some(s) => Tensor::from_vec(s.positions(b, t), (b, t), &self.device)?,
            None => Tensor::arange(0u32, t as u32, &self.device)?.unsqueeze(0)?.repeat((b, 1))?,
        };
        let causal = self.config.is_causal();
        if let Some(m) = attention_mask {
            if m.dims() != [b, t] {
                return Err(Error::invalid(
                    "attention_mask",
                    format!("shape {:?} does not match input_ids {:?}", m.dims(), [b, t]),
                ));
            }
        }
        let key_mask = match attention_mask {
            Some(m) => Some(
                m.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?.into_iter().map(|x| (x != 0) as u8).collect(),
            ),
            None => None,
        };
        let mask = if crate::kernels::ops::supported_for(self.dtype, &self.device) {
            None
        } else {
            batch_mask(b, t, causal, attention_mask, segments, &self.device)?
        };
        let mut ctx = AttnCtx::Batch { mask, causal, key_mask, segments: segments.cloned() };
        match &self.arch {
            Arch::Gpt2(m) => m.hidden(input_ids, &positions, &mut ctx, None),
            Arch::Llama(m) => m.hidden(input_ids, &positions, &mut ctx, None),
            Arch::Bert(m) => {
                let tt = match token_type_ids {
                    Some(t) => t.clone(),
                    None => input_ids.zeros_like()?,
                };
                m.hidden(input_ids, &positions, &tt, &mut ctx)
            }
        }
    }

    /// Sequence-classification logits of a BERT model with a classifier head.
    ///
    /// # Shapes
    /// `input_ids`: `[b, t]` (u32) → `[b, num_labels]`.
    pub fn classify(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let bert = self.as_bert().ok_or_else(|| Error::invalid("model", "classification needs a bert model"))?;
        let hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)?;
        bert.classify(&hidden)
    }

    /// A sequence classifier's scores (a reward model's: one label): the `score` head on the
    /// final hidden state of each row's last token that is not `pad_token_id`, as
    /// `transformers`' `…ForSequenceClassification` pools (without `pad_token_id`, the last
    /// token, for one row only). Differentiable when the model is trainable.
    ///
    /// # Shapes
    /// `input_ids`: `[b, t]` (u32) → `[b, labels]`.
    pub fn score(&self, input_ids: &Tensor) -> Result<Tensor> {
        let head = self.score.as_ref().ok_or_else(|| {
            Error::invalid("model", "this model has no sequence-classification head (`score`); it is a language model")
        })?;
        let (b, t) = input_ids.dims2()?;
        let last: Vec<u32> = match self.config.token_id("pad_token_id") {
            Some(pad) => input_ids
                .to_vec2::<u32>()?
                .iter()
                .map(|row| row.iter().rposition(|&x| x != pad).unwrap_or(0) as u32)
                .collect(),
            None if b == 1 => vec![t as u32 - 1],
            None => return Err(Error::invalid(
                "pad_token_id",
                "the config has none, so the last token of each padded row cannot be found (score one row at a time)",
            )),
        };
        let hidden = self.hidden_states_in(input_ids, None, None, None)?;
        let d = hidden.dim(2)?;
        let rows: Vec<u32> = last.iter().enumerate().map(|(i, &p)| i as u32 * t as u32 + p).collect();
        let pooled = hidden.reshape((b * t, d))?.index_select(&Tensor::from_vec(rows, b, &self.device)?, 0)?;
        Ok(head.forward(&pooled)?)
    }

    /// Whether the model is a sequence classifier (a reward model: [`Model::score`]).
    pub fn is_scorer(&self) -> bool {
        self.score.is_some()
    }

    /// Refuses LM computations on a sequence classifier, whose LM head is only a stand-in.
    fn check_lm_head(&self) -> Result<()> {
        match self.score {
            Some(_) => Err(Error::invalid(
                "model",
                "a sequence classifier (reward model) has no LM head; score texts with Model::score",
            )),
            None => Ok(()),
        }
    }

    /// Runs the new tokens of several sequences in one batched forward, each continuing its
    /// own KV cache at its own position (prefill and decode steps may be mixed). Returns, per
    /// sequence, f32 logits `[n_new, vocab]` when `all_logits`, else `[1, vocab]` for the last
    /// new token.
    ///
    /// On CPU, a step of several sequences of a small model is split into two halves of about
    /// equal cost (token counts, a pruned prompt token counting less) that run on two threads:
    /// per-operation parallelism costs a thread
    /// hand-off per matrix product, which small decode batches cannot amortise, while two
    /// independent halves synchronise once per step. A model whose weights outgrow the caches
    /// (over [`SPLIT_MAX_WEIGHT_BYTES`]) is instead memory-bound: there each matrix product is
    /// spread over the threads by output features, so the weights are streamed once per step,
    /// not once per half. A caller sharing the cores with other work may find one thread
    /// faster ([`Model::forward_cached_on`] with [`StepThreads::One`]).
    pub fn forward_cached(&self, steps: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        self.forward_cached_on(steps, StepThreads::Auto)
    }

    /// Whether [`StepThreads::Auto`] runs this step as two halves: several sequences and at
    /// least 4 tokens, on CPU, a model of at most [`SPLIT_MAX_WEIGHT_BYTES`], a thread pool of
    /// two or more, called from outside the pool.
    pub fn can_split(&self, steps: &[SeqStep<'_>]) -> bool {
        let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
        steps.len() >= 2
            && total >= 4
            && self.weight_bytes <= SPLIT_MAX_WEIGHT_BYTES
            && self.device.is_cpu()
            && rayon::current_num_threads() >= 2
            && rayon::current_thread_index().is_none()
    }

    /// [`Model::forward_cached`] on the threads `threads` says. Every sequence gets the same
    /// logits whichever is chosen.
    pub fn forward_cached_on(&self, steps: &mut [SeqStep<'_>], threads: StepThreads) -> Result<Vec<Tensor>> {
        self.check_lm_head()?;
        // Check every sequence first, so a bad one fails the step before any cache advances.
        for s in steps.iter() {
            if s.tokens.is_empty() {
                return Err(Error::invalid("tokens", "each sequence needs at least one new token"));
            }
            self.check_ids(s.tokens)?;
            if s.cache.len() + s.tokens.len() > self.max_len() {
                return Err(Error::ContextOverflow { len: s.cache.len() + s.tokens.len(), max: self.max_len() });
            }
        }
        if threads == StepThreads::One {
            return crate::kernels::threads::on_one_thread(|| self.forward_cached_one(steps));
        }
        if self.can_split(steps) {
            // Halves of about equal cost: a token whose logits are not wanted skips about three
            // quarters of the last layer (`nn::keep_rows`).
            let layers = self.config.num_layers() as f32;
            let cost = |s: &SeqStep<'_>| {
                let pruned = if s.all_logits { 0 } else { s.tokens.len() - 1 };
                s.tokens.len() as f32 - pruned as f32 * 0.75 / layers
            };
            let total: f32 = steps.iter().map(cost).sum();
            let mut acc = 0.0;
            let cut = steps
                .iter()
                .position(|s| {
                    acc += cost(s);
                    2.0 * acc >= total
                })
                .map_or(steps.len() / 2, |i| i + 1)
                .clamp(1, steps.len() - 1);
            let (a, b) = steps.split_at_mut(cut);
            let (ra, rb) = rayon::join(|| self.forward_cached_one(a), || self.forward_cached_one(b));
            let mut out = ra?;
            out.extend(rb?);
            return Ok(out);
        }
        if self.device.is_cpu() {
            return crate::kernels::threads::in_pool(|| self.forward_cached_one(steps));
        }
        self.forward_cached_one(steps)
    }

    fn forward_cached_one(&self, steps: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        if !self.config.is_causal() {
            return Err(Error::invalid("model", "cached decoding needs a causal (gpt2 or llama) model"));
        }
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut spans = Vec::with_capacity(steps.len());
        let mut rows = Vec::new();
        for s in steps.iter() {
            if s.tokens.is_empty() {
                return Err(Error::invalid("tokens", "each sequence needs at least one new token"));
            }
            self.check_ids(s.tokens)?;
            let p0 = s.cache.len();
            if p0 + s.tokens.len() > self.max_len() {
                return Err(Error::ContextOverflow { len: p0 + s.tokens.len(), max: self.max_len() });
            }
            let start = ids.len();
            spans.push((start, s.tokens.len()));
            ids.extend_from_slice(s.tokens);
            pos.extend((p0..p0 + s.tokens.len()).map(|p| p as u32));
            if s.all_logits {
                rows.extend((start..start + s.tokens.len()).map(|r| r as u32));
            } else {
                rows.push((start + s.tokens.len() - 1) as u32);
            }
        }
        let n = ids.len();
        let ids_t = Tensor::from_vec(ids, (1, n), &self.device)?;
        let pos_t = Tensor::from_vec(pos, (1, n), &self.device)?;
        let mut caches: Vec<&mut KvCache> = steps.iter_mut().map(|s| &mut *s.cache).collect();
        let mut ctx = AttnCtx::Packed { spans: &spans, caches: &mut caches };
        // Only the rows whose logits are wanted go through the last layer's MLP (a prompt's
        // other tokens are needed for their keys and values alone).
        let n_rows = rows.len();
        let keep = Tensor::from_vec(rows, n_rows, &self.device)?;
        let logits = match &self.arch {
            Arch::Gpt2(m) => m.lm_head().forward(&m.hidden(&ids_t, &pos_t, &mut ctx, Some(&keep))?.i(0)?)?,
            Arch::Llama(m) => m.logits(&m.hidden(&ids_t, &pos_t, &mut ctx, Some(&keep))?.i(0)?)?,
            Arch::Bert(_) => unreachable!("checked above"),
        }
        .to_dtype(DType::F32)?;
        let mut out = Vec::with_capacity(steps.len());
        let mut r = 0;
        for s in steps.iter() {
            let k = if s.all_logits { s.tokens.len() } else { 1 };
            out.push(logits.narrow(0, r, k)?);
            r += k;
        }
        Ok(out)
    }
}

fn store_has(store: &ParamStore, name: &str) -> bool {
    use candle_nn::var_builder::SimpleBackend;
    store.contains_tensor(name)
}

/// Reads `model.safetensors` (or the shards listed in `model.safetensors.index.json`) from
/// `dir`, normalising tensor names for `config`'s architecture. Returns the tensors and the
/// file name used in errors.
pub fn load_checkpoint(dir: &Path, config: &ModelConfig) -> Result<(HashMap<String, Tensor>, String)> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let (mut tensors, file) = if single.exists() {
        (read_safetensors(&single)?, single.display().to_string())
    } else if index.exists() {
        let idx: serde_json::Value = crate::io::read_json(&index)?;
        let map = idx
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(index.display().to_string(), "weight_map", "missing or not an object"))?;
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort();
        shards.dedup();
        let mut all = HashMap::new();
        for s in shards {
            all.extend(read_safetensors(&dir.join(s))?);
        }
        (all, index.display().to_string())
    } else {
        return Err(Error::io(
            "reading",
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors (nor a sharded index) in the model directory",
            ),
        ));
    };
    match config {
        ModelConfig::Gpt2(_) => gpt2::normalize_names(&mut tensors),
        ModelConfig::Bert(_) => bert::normalize_names(&mut tensors),
        ModelConfig::Llama(_) => llama::normalize_names(&mut tensors),
    }
    Ok((tensors, file))
}

/// Reads one safetensors file onto the CPU; a truncated or corrupt file is an error naming it.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    use std::io::Read;
    let bad = |name: &str, message: String| Error::Weight {
        file: path.display().to_string(),
        name: name.into(),
        message: format!("not a valid safetensors file: {message}"),
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io("reading", path, e))?.len();
    // Tensor by tensor, so loading holds the weights once plus one tensor's bytes (reading the
    // whole file first would hold them twice).
    let mut f = std::io::BufReader::with_capacity(1 << 20, file);
    let mut read = |buf: &mut [u8], what: &str| {
        f.read_exact(buf).map_err(|e| bad("<file>", format!("{what} ({file_len}-byte file): {e}")))
    };
    let mut n = [0u8; 8];
    read(&mut n, "reading the header length")?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || n + 8 > file_len {
        return Err(bad("<file>", format!("a header of {n} bytes in a {file_len}-byte file")));
    }
    let mut header = vec![0u8; n as usize];
    read(&mut header, "reading the header")?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| bad("<file>", format!("header: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut at = 0usize;
    let mut out = HashMap::new();
    // In offset order, which is the order of the data in the file: one sequential read.
    for name in meta.offset_keys() {
        let info = meta.info(&name).ok_or_else(|| bad(&name, "listed but not described".into()))?;
        let (start, end) = info.data_offsets;
        if start != at || end < start || end as u64 > data_len {
            return Err(bad(
                &name,
                format!("data at bytes {start}..{end}, expected to start at {at} and end by {data_len}"),
            ));
        }
        let mut bytes = vec![0u8; end - start];
        read(&mut bytes, &format!("reading `{name}`"))?;
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), &bytes)
            .map_err(|e| bad(&name, e.to_string()))?;
        out.insert(name.clone(), view.load(&Device::Cpu).map_err(|e| bad(&name, e.to_string()))?);
        at = end;
    }
    if at as u64 != data_len {
        return Err(bad("<file>", format!("the tensors end at byte {at} of {data_len} bytes of data")));
    }
    Ok(out)
}

/// Serialises tensors (moved to the CPU, made contiguous) to safetensors bytes with
/// `{"format": "pt"}` metadata, as `transformers` expects; `file` names the target in errors.
pub fn safetensors_bytes(tensors: &std::collections::BTreeMap<String, Tensor>, file: &Path) -> Result<Vec<u8>> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(contiguous.iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).map_err(|e| Error::Weight {
        file: file.display().to_string(),
        name: "<file>".into(),
        message: e.to_string(),
    })
}

/// Writes tensors to a safetensors file atomically (see [`safetensors_bytes`]).
pub fn save_safetensors(path: &Path, tensors: &std::collections::BTreeMap<String, Tensor>) -> Result<()> {
    crate::io::write_atomic(path, &safetensors_bytes(tensors, path)?)
}
