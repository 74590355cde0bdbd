//! Building blocks shared by the model files: projections that accept adapters, embeddings,
//! normalisation, rotary embeddings and attention (batched, or packed over per-sequence KV
//! caches).
//!
//! Every block picks candle's fused kernels only when no gradient can flow through it
//! (`Tensor::track_op` is false, i.e. no `Var` upstream) and a differentiable composition of
//! primitive ops otherwise: candle's fused softmax and norms have no backward pass (candle issue
//! 2168), so training through them would silently get zero gradients.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::kv_cache::KvCache;
use crate::Result;

thread_local! {
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every [`Linear`]'s adapter switched off on this thread (restored afterwards,
/// also on a panic): the base model's output without a second copy of its weights, as PEFT's
/// `disable_adapter()` gives DPO its reference model. Work `f` hands to other threads (rayon
/// tasks that call the model) must switch adapters off there too.
pub fn without_adapters<R>(f: impl FnOnce() -> R) -> R {
    crate::grad::with_flag(&ADAPTERS_OFF, true, f)
}

/// Whether adapters are switched off on this thread ([`without_adapters`]).
pub fn adapters_off() -> bool {
    ADAPTERS_OFF.with(std::cell::Cell::get)
}

/// A learned addition to a [`Linear`]'s output, such as a LoRA adapter.
///
/// The adapter receives the same input as the layer and returns `[.., out_features]`, which is
/// added to the frozen projection: `y = x Wᵀ + b + adapter(x)`.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// The additive delta for input `xs` of shape `[.., in_features]`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor>;
}

/// A linear projection `y = x Wᵀ + b` with a stable module path (its Hugging Face name, such
/// as `model.layers.0.self_attn.q_proj`) and an optional [`LinearAdapter`].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    /// For a `Conv1D`, the stored `[in, out]` tensor that `weight` is a transposed view of:
    /// the fused op takes it directly, so its gradient needs no transposing copy.
    in_out: Option<Tensor>,
    bias: Option<Tensor>,
    path: String,
    adapter: Option<Arc<dyn LinearAdapter>>,
    /// The weight repacked for inference ([`Linear::repack`]).
    packed: Option<Arc<crate::kernels::simd::PackedWeight>>,
    /// The original weight was released ([`Linear::release_weight`]): `weight` is a
    /// placeholder of its shape and only the packed copy computes.
    released: bool,
    /// The weight held quantized ([`Linear::set_quantized`]): `weight` is a placeholder of its
    /// shape and this computes.
    quant: Option<Arc<QTensor>>,
    /// Products through `quant` are exact even where no gradient flows
    /// ([`Linear::set_exact_products`]).
    exact: bool,
}

impl Linear {
    /// Loads `{prefix}.weight` of shape `[out, in]` (and `{prefix}.bias` when `bias`),
    /// initialised `N(0, std)` when the store creates it.
    pub fn load(vb: VarBuilder<'_>, in_dim: usize, out_dim: usize, bias: bool, std: f64) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Randn { mean: 0.0, stdev: std })?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
        Ok(Self {
            weight,
            in_out: None,
            bias,
            path: vb.prefix(),
            adapter: None,
            packed: None,
            released: false,
            exact: false,
            quant: None,
        })
    }

    /// Loads a Hugging Face `Conv1D` (GPT-2), whose weight is stored `[in, out]`; the layer
    /// keeps a transposed view so it behaves as any other `Linear`.
    pub fn load_conv1d(vb: VarBuilder<'_>, in_dim: usize, out_dim: usize, std: f64) -> Result<Self> {
        let w = vb.get_with_hints((in_dim, out_dim), "weight", Init::Randn { mean: 0.0, stdev: std })?;
        let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight: w.t()?,
            in_out: Some(w),
            bias: Some(bias),
            path: vb.prefix(),
            adapter: None,
            packed: None,
            released: false,
            exact: false,
            quant: None,
        })
    }

    /// A linear layer from explicit tensors (weight `[out, in]`).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>, path: impl Into<String>) -> Self {
        Self {
            weight,
            in_out: None,
            bias,
            path: path.into(),
            adapter: None,
            packed: None,
            released: false,
            exact: false,
            quant: None,
        }
    }

    /// The module path, e.g. `transformer.h.0.attn.c_attn`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The weight, logically `[out_features, in_features]` (after
    /// [`Linear::release_weight`], a placeholder of that shape holding no values).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[1], d[0])
    }

    /// Attaches (or with `None`, removes) an adapter.
    pub fn set_adapter(&mut self, adapter: Option<Arc<dyn LinearAdapter>>) {
        self.adapter = adapter;
    }

    /// The attached adapter, if any.
    pub fn adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        self.adapter.as_ref()
    }

    /// Replaces the weight (same logical shape), e.g. when merging an adapter.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if weight.dims() != self.weight.dims() {
            return Err(crate::Error::invalid(
                "weight",
                format!("{}: shape {:?} does not match {:?}", self.path, weight.dims(), self.weight.dims()),
            ));
        }
        self.weight = weight;
        self.in_out = None;
        self.packed = None;
        self.released = false;
        self.quant = None;
        Ok(())
    }

    /// Computes with the quantized tensor `q` (`[out, in]`, the same shape as the weight, whose
    /// stored tensor is then only a placeholder): candle's quantized kernels when no gradient
    /// flows, a dequantized copy per call when one does (the input's gradient).
    pub fn set_quantized(&mut self, q: Arc<QTensor>) -> Result<()> {
        if q.shape().dims() != self.weight.dims() {
            return Err(crate::Error::invalid(
                "weight",
                format!(
                    "{}: quantized shape {:?} does not match {:?}",
                    self.path,
                    q.shape().dims(),
                    self.weight.dims()
                ),
            ));
        }
        self.quant = Some(q);
        self.packed = None;
        Ok(())
    }

    /// With `on`, products through a quantized weight are the exact ones (the weight
    /// dequantized, as training computes them) whether or not a gradient flows; without, a pass
    /// without gradients takes candle's quantized kernels, which round activations to 8 bits.
    /// Training sets it: a preference loss compares the policy's pass (with gradients) with the
    /// reference's (without), and the two must compute the same function — on SmolLM2's Q4_1
    /// file the kernels' rounding alone moved a sequence's log-probability by 0.15–0.45.
    pub fn set_exact_products(&mut self, on: bool) {
        self.exact = on;
    }

    /// The quantized weight, when the layer holds one ([`Linear::set_quantized`]).
    pub fn quantized(&self) -> Option<&Arc<QTensor>> {
        self.quant.as_ref()
    }

    /// The weight's values, `[out, in]` (a quantized weight dequantized to f32).
    pub fn weight_values(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => Ok(q.dequantize(self.weight.device())?),
            None => Ok(self.weight.clone()),
        }
    }

    /// The tensor the weight is stored as: for a `Conv1D`, the `[in, out]` tensor
    /// [`Linear::weight`] is a view of.
    pub fn stored_weight(&self) -> &Tensor {
        self.in_out.as_ref().unwrap_or(&self.weight)
    }

    /// Lets go of the original weight of a repacked layer, keeping only the packed copy (the
    /// caller makes sure nothing else needs the original: see
    /// [`crate::Model::repack_for_inference`]). `weight` becomes a placeholder of the same
    /// shape; a projection the packed kernel cannot compute (input that tracks gradients, or
    /// not f32) is then an error. Returns whether the weight was released (only packed ones).
    pub fn release_weight(&mut self) -> Result<bool> {
        if self.packed.is_none() {
            return Ok(false);
        }
        self.weight = placeholder(&self.weight)?;
        self.in_out = None;
        self.released = true;
        Ok(true)
    }

    /// Keeps a copy of the weight repacked for the AVX2 inference kernel
    /// ([`crate::kernels::simd::packed_linear`]), which then computes the projection whenever no
    /// gradient can flow (the input does not track ops). Only f32 weights on the CPU, where the
    /// CPU has AVX2 + FMA; returns whether the layer was packed. The copy is taken now: a later
    /// [`Linear::set_weight`] drops it, but an in-place update of a `Var` would not be seen, so
    /// this is for models that only run inference.
    pub fn repack(&mut self) -> Result<bool> {
        self.repack_as(DType::F32)
    }

    /// [`Linear::repack`], holding the packed values as `dtype`: `F32`, `BF16` or `F16` (each
    /// value rounded to bf16 or f16, half the bytes; the kernel widens them back and computes
    /// in f32). `F16` needs F16C; without it the layer is packed as f32.
    pub fn repack_as(&mut self, dtype: DType) -> Result<bool> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(crate::Error::invalid("dtype", format!("packed weights are f32, bf16 or f16, not {dtype:?}")));
        }
        let w = &self.weight;
        if self.quant.is_some()
            || w.dtype() != DType::F32
            || !w.device().is_cpu()
            || !crate::kernels::simd::has_avx2_fma()
        {
            return Ok(false);
        }
        let (out, inp) = w.dims2()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { return Ok(false) };
        let data = cpu.as_slice::<f32>()?;
        let st = layout.stride();
        let mut packed = crate::kernels::simd::PackedWeight::new(data, (layout.start_offset(), st[0], st[1]), out, inp);
        drop(storage);
        if dtype == DType::BF16 {
            packed = packed.to_bf16();
        } else if dtype == DType::F16 {
            packed = packed.to_f16().unwrap_or(packed);
        }
        self.packed = Some(Arc::new(packed));
        Ok(true)
    }

    /// Bytes held by the repacked copy of the weight (0 when not packed).
    pub fn packed_bytes(&self) -> usize {
        self.packed.as_ref().map_or(0, |p| p.bytes())
    }

    /// The projection through the repacked weight, when packed and no gradient can flow.
    fn packed_forward(&self, xs: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(p) = &self.packed else { return Ok(None) };
        // The AVX2 switch (`LMSTACK_SIMD`, `simd::set_enabled`) steers layers that still hold
        // their weight; a released one has only this copy.
        let switched_off = !crate::kernels::simd::has_avx2_fma() && !self.released;
        if xs.dtype() != DType::F32 || !xs.device().is_cpu() || xs.track_op() || switched_off {
            return Ok(None);
        }
        let (out, inp) = p.dims();
        let dims = xs.dims();
        if dims.last() != Some(&inp) {
            candle_core::bail!("{}: input has {:?} features, the weight {inp}", self.path, dims.last());
        }
        let rows = xs.elem_count() / inp.max(1);
        let x = xs.contiguous()?;
        let bias = self.bias.as_ref().map(|b| b.contiguous()).transpose()?;
        let parallel = crate::kernels::threads::linear_in_parallel(rows, inp, out);
        let y = {
            let (xs_, xl) = x.storage_and_layout();
            let candle_core::Storage::Cpu(xc) = &*xs_ else { return Ok(None) };
            let xd = &xc.as_slice::<f32>()?[xl.start_offset()..];
            let bguard = bias.as_ref().map(|b| b.storage_and_layout());
            let bd = match &bguard {
                Some((bs, bl)) => {
                    let candle_core::Storage::Cpu(bc) = &**bs else { return Ok(None) };
                    Some(&bc.as_slice::<f32>()?[bl.start_offset()..bl.start_offset() + out])
                }
                None => None,
            };
            crate::kernels::simd::packed_linear(xd, rows, p, bd, parallel)
        };
        let Some(y) = y else { return Ok(None) };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("non-empty") = out;
        Ok(Some(Tensor::from_vec(y, shape, xs.device())?))
    }
}

impl Module for Linear {
    /// # Shapes
    /// `xs`: `[.., in]` → `[.., out]`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.project(xs)?;
        match &self.adapter {
            Some(a) if !adapters_off() => y + a.forward(xs)?,
            _ => Ok(y),
        }
    }
}

impl Linear {
    /// `x Wᵀ + b`: through the repacked weight, lmstack's fused op, or candle's matmul.
    fn project(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dequantized;
        let (weight, in_out) = match &self.quant {
            Some(q) if !xs.track_op() && !crate::grad::in_checkpointed_forward() && !self.exact => {
                let y = match quantized_forward(q, xs)? {
                    Some(y) => y,
                    None => QMatMul::QTensor(q.clone()).forward(&xs.contiguous()?)?,
                };
                return match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                };
            }
            // Training (a gradient flows to the input, a checkpointed forward the backward pass
            // reruns, or a pass compared with those: `exact`): the exact product with the
            // weight dequantized a slice of rows at a time, forward and backward (no f32 copy
            // of the weight is made or kept).
            Some(q) if xs.device().is_cpu() && xs.dtype() == DType::F32 => {
                let y = xs.contiguous()?.apply_op1(QuantizedLinear::new(q.clone()))?;
                return match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                };
            }
            Some(q) => {
                dequantized = q.dequantize(xs.device())?;
                (&dequantized, None)
            }
            None => {
                if let Some(y) = self.packed_forward(xs)? {
                    return Ok(y);
                }
                if self.released {
                    candle_core::bail!(
                        "{}: the weight was released after repacking for inference; only f32 input \
                         without gradients can be projected",
                        self.path
                    );
                }
                (&self.weight, self.in_out.as_ref())
            }
        };
        if crate::kernels::ops::supported(xs) && weight.dtype() == xs.dtype() && weight.device().is_cpu() {
            let x = xs.contiguous()?;
            let (w, op) = match in_out {
                Some(w) => (w, crate::kernels::ops::LinearOp { in_out: true }),
                None => (weight, crate::kernels::ops::LinearOp::default()),
            };
            return match &self.bias {
                Some(b) => x.apply_op3(w, b, op),
                None => x.apply_op2(w, op),
            };
        }
        let dims = xs.dims();
        let (in_dim, out_dim) = self.dims();
        let lead: Vec<usize> = dims[..dims.len() - 1].to_vec();
        let rows: usize = lead.iter().product();
        let x2 = xs.reshape((rows, in_dim))?;
        let mut y = x2.matmul(&weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_shape = lead;
        out_shape.push(out_dim);
        y.reshape(out_shape)
    }
}

/// `x Wᵀ` through lmstack's own kernel for the quantized type of `q`, where it has one
/// ([`crate::kernels::quant`]: Q4_0, Q4_1, Q8_0 on AVX2) and `xs` is f32 on the CPU; `None` leaves it
/// to candle.
fn quantized_forward(q: &QTensor, xs: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some(kind) = crate::kernels::quant::Kind::of(q.dtype()) else { return Ok(None) };
    if xs.dtype() != DType::F32 || !xs.device().is_cpu() || !crate::kernels::quant::has_kernels() {
        return Ok(None);
    }
    let (out, inp) = q.shape().dims2()?;
    let dims = xs.dims();
    if dims.last() != Some(&inp) {
        candle_core::bail!("input has {:?} features, the quantized weight {inp}", dims.last());
    }
    let rows = xs.elem_count() / inp.max(1);
    let x = xs.contiguous()?;
    let data = q.data()?;
    let y = {
        let (xs_, xl) = x.storage_and_layout();
        let candle_core::Storage::Cpu(xc) = &*xs_ else { return Ok(None) };
        let xd = &xc.as_slice::<f32>()?[xl.start_offset()..];
        crate::kernels::quant::matmul(
            kind,
            xd,
            rows,
            &data,
            out,
            inp,
            crate::kernels::threads::linear_in_parallel(rows, inp, out),
        )
    };
    let Some(y) = y else { return Ok(None) };
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("non-empty") = out;
    Ok(Some(Tensor::from_vec(y, shape, xs.device())?))
}

/// `x Wᵀ` for a frozen quantized `W` (`[out, in]`), exact and with a backward pass to `x`,
/// for training through a quantized base (QLoRA): `W` is dequantized a slice of rows (about
/// 4 MB) at a time for the product and again for the input's gradient `g W`, so no f32 copy
/// of it is ever whole or kept in the graph. (Inference uses the quantized kernels, which
/// round activations to 8 bits: faster, but not the function whose gradient this computes.)
/// The weight, and how many of its rows are dequantized at a time.
struct QuantizedLinear(Arc<QTensor>, usize);

impl QuantizedLinear {
    /// Dequantizing about 1M values (4 MB) at a time.
    fn new(q: Arc<QTensor>) -> Self {
        let inp = q.shape().dims().last().copied().unwrap_or(1);
        let step = ((1usize << 20) / inp.max(1)).max(1);
        Self(q, step)
    }

    /// Rows `r0..r0 + n` of `W`, dequantized: `[n, in]`.
    fn rows(&self, r0: usize, n: usize) -> candle_core::Result<Tensor> {
        let (_, inp) = self.0.shape().dims2()?;
        let dtype = self.0.dtype();
        let row_bytes = inp / dtype.block_size() * dtype.type_size();
        let data = self.0.data()?;
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &data[r0 * row_bytes..(r0 + n) * row_bytes],
            vec![n, inp],
            &Device::Cpu,
        )?
        .dequantize(&Device::Cpu)
    }
}

impl candle_core::CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "lmstack-quantized-linear"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = crate::grad::tensor_of(s, l)?;
        let (out, inp) = self.0.shape().dims2()?;
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, inp))?.to_dtype(DType::F32)?;
        let step = self.1;
        let mut parts = Vec::with_capacity(out.div_ceil(step));
        for r0 in (0..out).step_by(step) {
            parts.push(x2.matmul(&self.rows(r0, step.min(out - r0))?.t()?)?);
        }
        let mut shape = dims;
        *shape.last_mut().expect("non-empty") = out;
        let y = Tensor::cat(&parts, 1)?.reshape(shape)?.to_dtype(x.dtype())?;
        Ok((crate::grad::storage_of(&y)?, y.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (out, _) = self.0.shape().dims2()?;
        let rows: usize = arg.dims()[..arg.rank() - 1].iter().product();
        let g = grad.reshape((rows, out))?.to_dtype(DType::F32)?;
        let step = self.1;
        let mut dx: Option<Tensor> = None;
        for r0 in (0..out).step_by(step) {
            let n = step.min(out - r0);
            let w = self.rows(r0, n)?;
            let part = g.narrow(1, r0, n)?.matmul(&w)?;
            dx = Some(match dx {
                Some(d) => (d + part)?,
                None => part,
            });
        }
        let dx = dx.ok_or_else(|| candle_core::Error::Msg("quantized linear: empty weight".into()))?;
        Ok(Some(dx.reshape(arg.shape())?.to_dtype(arg.dtype())?))
    }
}

/// A tensor of `t`'s shape, dtype and device that holds no values (one broadcast zero): what a
/// layer keeps in place of a weight it now holds only packed.
fn placeholder(t: &Tensor) -> Result<Tensor> {
    placeholder_of(t.shape(), t.dtype(), t.device())
}

/// A placeholder (one broadcast zero) of `shape`: what a layer keeps in place of a weight held
/// in another form (packed, or quantized: see [`crate::params::ParamStore::frozen_quantized`]).
pub(crate) fn placeholder_of(shape: &candle_core::Shape, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((), dtype, device)?.broadcast_as(shape)?)
}

/// A token or position embedding table `[num, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
    path: String,
    /// The table as packed for an output projection it is tied to
    /// ([`Embedding::share_packed`]); `table` is then a placeholder of its shape.
    packed: Option<Arc<crate::kernels::simd::PackedWeight>>,
    /// The table held quantized ([`Embedding::set_quantized`]); `table` is a placeholder.
    quant: Option<Arc<QTensor>>,
}

impl Embedding {
    /// Loads `{prefix}.weight` of shape `[num, dim]`, initialised `N(0, std)`.
    pub fn load(vb: VarBuilder<'_>, num: usize, dim: usize, std: f64) -> Result<Self> {
        let table = vb.get_with_hints((num, dim), "weight", Init::Randn { mean: 0.0, stdev: std })?;
        Ok(Self { table, path: vb.prefix(), packed: None, quant: None })
    }

    /// The module path, e.g. `transformer.wte`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The table `[num, dim]` (after [`Embedding::share_packed`], a placeholder of that shape
    /// holding no values).
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// Looks rows up in the packed copy of `head` instead of the table, when `head` is the
    /// output projection tied to this table (its weight is this very tensor) and has been
    /// repacked: the table's own copy can then be let go ([`crate::Model::repack_for_inference`]).
    /// Returns whether the table is now read from the packed copy.
    pub fn share_packed(&mut self, head: &Linear) -> Result<bool> {
        match &head.packed {
            Some(p) if self.is_packed_in(head) => {
                self.packed = Some(p.clone());
                self.table = placeholder(&self.table)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Looks rows up in the quantized table `q` (`[num, dim]`, the table's shape; the stored
    /// table is then only a placeholder), dequantizing the rows asked for.
    pub fn set_quantized(&mut self, q: Arc<QTensor>) -> Result<()> {
        if q.shape().dims() != self.table.dims() {
            return Err(crate::Error::invalid(
                "weight",
                format!("{}: quantized shape {:?} does not match {:?}", self.path, q.shape().dims(), self.table.dims()),
            ));
        }
        self.quant = Some(q);
        Ok(())
    }

    /// Replaces a quantized table by an f32 copy of its values; returns whether it was quantized.
    pub fn dequantize(&mut self) -> Result<bool> {
        match self.quant.take() {
            Some(q) => {
                self.table = q.dequantize(self.table.device())?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether `head` is a repacked output projection whose weight is this very table.
    pub fn is_packed_in(&self, head: &Linear) -> bool {
        head.packed.as_ref().is_some_and(|p| {
            head.stored_weight().id() == self.table.id() && self.table.dims2().is_ok_and(|d| d == p.dims())
        })
    }

    /// # Shapes
    /// `ids`: `[..]` (u32) → `[.., dim]`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        shape.push(self.table.dim(1)?);
        if let Some(q) = &self.quant {
            let ids = ids.flatten_all()?;
            let n = self.table.dim(0)?;
            if let Some(bad) = ids.to_vec1::<u32>()?.into_iter().find(|&i| i as usize >= n) {
                candle_core::bail!("{}: token id {bad} is outside the table of {n} rows", self.path);
            }
            return q.embedding(&ids)?.reshape(shape);
        }
        if let Some(p) = &self.packed {
            let ids = ids.flatten_all()?.to_vec1::<u32>()?;
            let Some(rows) = p.rows(&ids) else {
                let bad = ids.iter().find(|&&i| i as usize >= p.dims().0).copied().unwrap_or_default();
                candle_core::bail!("{}: token id {bad} is outside the table of {} rows", self.path, p.dims().0);
            };
            return Tensor::from_vec(rows, shape, self.table.device());
        }
        self.table.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
    }
}

/// LayerNorm with weight and bias (`{prefix}.weight`, `{prefix}.bias`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads a LayerNorm of width `dim`, initialised to the identity.
    pub fn load(vb: VarBuilder<'_>, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// # Shapes
    /// `xs`: `[.., dim]` → `[.., dim]`; computed in f32.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        let cd = compute_dtype(dtype);
        // lmstack's kernel first (it has a backward, and a small step runs on the calling
        // thread, where candle's fused op hands even one row to the thread pool and back).
        if crate::kernels::ops::supported(xs) && self.weight.dtype() == dtype {
            return xs.contiguous()?.apply_op3(
                &self.weight,
                &self.bias,
                crate::kernels::ops::LayerNormOp { eps: self.eps },
            );
        }
        if !xs.track_op() && !self.weight.track_op() {
            let x = xs.to_dtype(cd)?;
            let w = self.weight.to_dtype(cd)?;
            let b = self.bias.to_dtype(cd)?;
            return candle_nn::ops::layer_norm(&x.contiguous()?, &w, &b, self.eps as f32)?.to_dtype(dtype);
        }
        let x = xs.to_dtype(cd)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight.to_dtype(cd)?)?.broadcast_add(&self.bias.to_dtype(cd)?)?.to_dtype(dtype)
    }
}

/// RMSNorm with a weight (`{prefix}.weight`), as in Llama; Gemma's scales by `1 + weight`
/// ([`RmsNorm::load_gemma`]).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// Gemma's: the stored weight is the scale minus one.
    plus_one: bool,
    /// Gemma's scale `1 + weight` in the compute dtype, taken once when the weight is frozen
    /// (a trainable one is added to at each call, so the gradient reaches it).
    scale: Option<Tensor>,
}

impl RmsNorm {
    /// Loads an RMSNorm of width `dim`, initialised to the identity.
    pub fn load(vb: VarBuilder<'_>, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        Ok(Self { weight, eps, plus_one: false, scale: None })
    }

    /// Loads Gemma's RMSNorm, `x / rms(x) · (1 + weight)` computed in f32 (initialised to the
    /// identity: a zero weight).
    pub fn load_gemma(vb: VarBuilder<'_>, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(0.0))?;
        let scale =
            if weight.is_variable() { None } else { Some((weight.to_dtype(compute_dtype(weight.dtype()))? + 1.0)?) };
        Ok(Self { weight, eps, plus_one: true, scale })
    }

    /// # Shapes
    /// `xs`: `[.., dim]` → `[.., dim]`; computed in f32.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.plus_one {
            // Gemma multiplies in f32 before casting back (Llama after): the same for f32.
            let dtype = xs.dtype();
            let cd = compute_dtype(dtype);
            let w = match &self.scale {
                Some(s) if s.dtype() == cd => s.clone(),
                _ => (self.weight.to_dtype(cd)? + 1.0)?,
            };
            let unit = Self { weight: w, eps: self.eps, plus_one: false, scale: None };
            return unit.forward(&xs.to_dtype(cd)?)?.to_dtype(dtype);
        }
        let dtype = xs.dtype();
        let cd = compute_dtype(dtype);
        if crate::kernels::ops::supported(xs) && self.weight.dtype() == dtype {
            return xs.contiguous()?.apply_op2(&self.weight, crate::kernels::ops::RmsNormOp { eps: self.eps });
        }
        if !xs.track_op() && !self.weight.track_op() {
            let x = xs.to_dtype(cd)?;
            let w = self.weight.to_dtype(cd)?;
            return candle_nn::ops::rms_norm(&x.contiguous()?, &w, self.eps as f32)?.to_dtype(dtype);
        }
        let x = xs.to_dtype(cd)?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        // Llama multiplies in the activation dtype after normalising in f32.
        xn.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// The dtype normalisation and softmax run in: f32 for half-precision activations, else the
/// activations' own (so f64 stays f64 for gradient checks).
fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Softmax over the last dimension: fused for inference, differentiable when tracked.
pub fn softmax_last(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.track_op() && crate::kernels::ops::supported(xs) {
        return xs.contiguous()?.apply_op1(crate::kernels::ops::Softmax);
    }
    if xs.track_op() {
        let max = xs.max_keepdim(D::Minus1)?.detach();
        let e = xs.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

/// Rotary position embeddings (RoPE) in the Hugging Face (“rotate half”) layout, over the
/// first `dim` dimensions of each head (all of them, or Phi-3's `partial_rotary_factor`).
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Tables for positions `0..max_pos` rotating `head_dim` dimensions (the first ones of a
    /// head, which may be wider), with base `theta` and the frequencies and cos/sin factor of
    /// `scaling`.
    pub fn new(
        head_dim: usize,
        max_pos: usize,
        theta: f64,
        scaling: &crate::config::RopeScaling,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (inv, factor) = scaling.frequencies(head_dim, theta);
        // transformers holds the frequencies and angles in f32.
        let inv: Vec<f32> = inv.into_iter().map(|f| f as f32).collect();
        let factor = factor as f32;
        let mut cos = Vec::with_capacity(max_pos * head_dim);
        let mut sin = Vec::with_capacity(max_pos * head_dim);
        for p in 0..max_pos {
            // HF layout: the same frequencies for both halves of the head.
            for _half in 0..2 {
                for f in &inv {
                    let a = p as f32 * f;
                    cos.push(a.cos() * factor);
                    sin.push(a.sin() * factor);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (max_pos, head_dim), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_pos, head_dim), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// Rotates `xs` by the angles of `positions` (a head's dimensions past the table's width
    /// pass through).
    ///
    /// # Shapes
    /// `xs`: `[b, t, heads, head_dim]`, `positions`: `[b, t]` (u32) → `[b, t, heads, head_dim]`.
    pub fn apply(&self, xs: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _h, full) = xs.dims4()?;
        let d = self.cos.dim(1)?;
        if d < full {
            let rotated = self.apply(&xs.narrow(D::Minus1, 0, d)?, positions)?;
            return Tensor::cat(&[&rotated, &xs.narrow(D::Minus1, d, full - d)?], D::Minus1);
        }
        let idx = positions.flatten_all()?;
        let cos = self.cos.index_select(&idx, 0)?.reshape((b, t, 1, d))?;
        let sin = self.sin.index_select(&idx, 0)?.reshape((b, t, 1, d))?;
        let x1 = xs.narrow(D::Minus1, 0, d / 2)?;
        let x2 = xs.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        xs.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// A large negative number used to mask attention scores (finite, so a fully masked row gives
/// a uniform distribution instead of NaN).
pub const MASK_VALUE: f32 = -1e30;

/// An additive attention mask `[b, 1, t, t]` (f32): `causal` hides later keys,
/// `attention_mask` (`[b, t]`, 1 for real tokens and 0 for padding) hides padded keys, and
/// `segments` hides every key outside a query's own sequence.
pub fn batch_mask(
    b: usize,
    t: usize,
    causal: bool,
    attention_mask: Option<&Tensor>,
    segments: Option<&Segments>,
    device: &Device,
) -> Result<Option<Tensor>> {
    if !causal && attention_mask.is_none() && segments.is_none() {
        return Ok(None);
    }
    let mut m = vec![0f32; b * t * t];
    let pad: Option<Vec<Vec<u32>>> = match attention_mask {
        Some(am) => Some(am.to_dtype(DType::U32)?.to_vec2::<u32>()?),
        None => None,
    };
    let seg = segments.map(|s| s.ids(b, t));
    for bi in 0..b {
        for q in 0..t {
            for k in 0..t {
                let hidden = (causal && k > q)
                    || pad.as_ref().is_some_and(|p| p[bi][k] == 0)
                    || seg.as_ref().is_some_and(|s| s[bi * t + q] != s[bi * t + k] || s[bi * t + k] == usize::MAX);
                if hidden {
                    m[(bi * t + q) * t + k] = MASK_VALUE;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (b, 1, t, t), device)?))
}

/// Independent sequences packed along the time axis of a `[b, t]` batch (padding-free
/// training, TRL's `padding_free`): each `(row, start, len)` attends only within itself and
/// its positions start at 0. Tokens outside every sequence (a row's tail) are padding.
#[derive(Debug, Clone, PartialEq)]
pub struct Segments(std::sync::Arc<Vec<(usize, usize, usize)>>);

impl Segments {
    /// Checks that each `(row, start, len)` is non-empty, inside a `[b, t]` batch, and that
    /// none overlap.
    pub fn new(mut spans: Vec<(usize, usize, usize)>, b: usize, t: usize) -> Result<Self> {
        spans.sort_unstable();
        for (i, &(row, start, len)) in spans.iter().enumerate() {
            if len == 0 || row >= b || start + len > t {
                return Err(crate::Error::invalid(
                    "segments",
                    format!("({row}, {start}, {len}) is empty or outside the [{b}, {t}] batch"),
                ));
            }
            if let Some(&(r, s, l)) = i.checked_sub(1).map(|j| &spans[j]) {
                if r == row && s + l > start {
                    return Err(crate::Error::invalid(
                        "segments",
                        format!("({r}, {s}, {l}) overlaps ({row}, {start}, {len})"),
                    ));
                }
            }
        }
        Ok(Self(std::sync::Arc::new(spans)))
    }

    /// The `(row, start, len)` spans, sorted.
    pub fn spans(&self) -> &[(usize, usize, usize)] {
        &self.0
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        self.0.iter().map(|s| s.2).max().unwrap_or(0)
    }

    /// Each token's position within its sequence (0 outside every sequence), `[b · t]`.
    pub fn positions(&self, b: usize, t: usize) -> Vec<u32> {
        let mut p = vec![0u32; b * t];
        for &(row, start, len) in self.0.iter() {
            for i in 0..len {
                p[row * t + start + i] = i as u32;
            }
        }
        p
    }

    /// Each token's sequence index (`usize::MAX` outside every sequence), `[b · t]`.
    fn ids(&self, b: usize, t: usize) -> Vec<usize> {
        let mut ids = vec![usize::MAX; b * t];
        for (n, &(row, start, len)) in self.0.iter().enumerate() {
            ids[row * t + start..row * t + start + len].iter_mut().for_each(|x| *x = n);
        }
        ids
    }

    pub(crate) fn shared(&self) -> std::sync::Arc<Vec<(usize, usize, usize)>> {
        self.0.clone()
    }
}

/// How attention sees the keys and values of a forward pass.
pub enum AttnCtx<'a, 'c> {
    /// Whole sequences `[b, t]` with an optional additive mask `[b, 1, t, t]`.
    Batch {
        /// The mask (see [`batch_mask`]), used by the composed path.
        mask: Option<Tensor>,
        /// Whether later keys are hidden (causal LM), for the fused path.
        causal: bool,
        /// `[b · t]`, 0 where a key is padding, for the fused path.
        key_mask: Option<Vec<u8>>,
        /// Independent sequences packed along `t`, for the fused path (the composed path's
        /// `mask` includes them).
        segments: Option<Segments>,
    },
    /// The new tokens of several sequences packed as `[1, n_total]`, each sequence
    /// continuing its own KV cache: `spans[i] = (start, len)` in the packed axis.
    Packed {
        /// Where each sequence's new tokens sit in the packed axis.
        spans: &'a [(usize, usize)],
        /// One cache per sequence.
        caches: &'a mut [&'c mut KvCache],
    },
}

/// Attention over a packed `[b, t, 3 · heads · d]` q/k/v projection (GPT-2's `c_attn`).
///
/// # Shapes
/// `qkv`: `[b, t, 3 · heads · d]` → `[b, t, heads · d]`.
pub fn attention_qkv(
    qkv: &Tensor,
    heads: usize,
    ctx: &mut AttnCtx<'_, '_>,
    layer: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, w) = qkv.dims3()?;
    let d = w / 3 / heads;
    if let AttnCtx::Batch { causal, key_mask, segments, .. } = ctx {
        if crate::kernels::ops::supported(qkv) {
            let op = crate::kernels::ops::AttentionQkv::new(b, t, heads, d, *causal, scale, key_mask.clone())
                .with_segments(segments.as_ref().map(Segments::shared));
            return Ok(qkv.contiguous()?.apply_op1(op)?);
        }
    }
    let hd = heads * d;
    let q = qkv.narrow(2, 0, hd)?.reshape((b, t, heads, d))?;
    let k = qkv.narrow(2, hd, hd)?.reshape((b, t, heads, d))?;
    let v = qkv.narrow(2, 2 * hd, hd)?.reshape((b, t, heads, d))?;
    attention(&q, &k, &v, ctx, layer, Scores::scaled(scale))
}

/// Whether a block may run through [`crate::grad::checkpoint`]: gradients on, whole sequences
/// (not a KV-cached step), every row kept.
pub(crate) fn checkpoints(ctx: &AttnCtx<'_, '_>, keep: Option<&Tensor>) -> bool {
    crate::grad::enabled() && keep.is_none() && matches!(ctx, AttnCtx::Batch { .. })
}

/// `block(x, ctx)` through [`crate::grad::checkpoint`]; `ctx` must be [`AttnCtx::Batch`]
/// ([`checkpoints`]), which the rerun gets a copy of.
pub(crate) fn checkpointed(
    x: &Tensor,
    ctx: &AttnCtx<'_, '_>,
    block: impl Fn(&Tensor, &mut AttnCtx<'_, '_>) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let AttnCtx::Batch { mask, causal, key_mask, segments } = ctx else {
        return Err(crate::Error::invalid("checkpointing", "only whole sequences can be checkpointed"));
    };
    let (mask, causal, key_mask, segments) = (mask.clone(), *causal, key_mask.clone(), segments.clone());
    crate::grad::checkpoint(
        x,
        std::sync::Arc::new(move |x: &Tensor| {
            let mut ctx =
                AttnCtx::Batch { mask: mask.clone(), causal, key_mask: key_mask.clone(), segments: segments.clone() };
            Ok(block(x, &mut ctx)?)
        }),
    )
}

/// Keeps only the tokens `keep` lists of the residual stream `x` and the attention output
/// `attn` (both `[b, t, w]`, indices along `t`), or both whole when `keep` is `None`.
///
/// A causal model's last layer calls it after its attention: a prompt token's keys and values
/// are cached by then, and only the tokens whose logits are wanted (usually a sequence's last)
/// need the output projection, the MLP and the final norm — llama.cpp prunes its last layer
/// the same way. Every other token's row is exactly as without pruning.
pub fn keep_rows(x: Tensor, attn: Tensor, keep: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    match keep {
        Some(rows) if rows.dim(0)? < x.dim(1)? => Ok((x.index_select(rows, 1)?, attn.index_select(rows, 1)?)),
        _ => Ok((x, attn)),
    }
}

/// How a layer's attention scores its keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// The multiplier of `q · k` (usually `1 / √head_dim`).
    pub scale: f64,
    /// Sliding window: a causal query sees only itself and the `window - 1` keys before it
    /// (Mistral, Qwen2's upper layers, Gemma's local layers); `None`: every earlier key.
    pub window: Option<usize>,
    /// Soft cap (Gemma 2's `attn_logit_softcapping`): a score `s` becomes
    /// `cap · tanh(s / cap)` before the mask and the softmax.
    pub softcap: Option<f64>,
}

impl Scores {
    /// Plain scaled scores over every earlier key.
    pub fn scaled(scale: f64) -> Self {
        Self { scale, window: None, softcap: None }
    }
}

/// Scaled dot-product attention with grouped-query heads, scored as `scores` says.
///
/// # Shapes
/// `q`: `[b, t, heads, d]`, `k`/`v`: `[b, t, kv_heads, d]` → `[b, t, heads * d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    ctx: &mut AttnCtx<'_, '_>,
    layer: usize,
    how: Scores,
) -> Result<Tensor> {
    let Scores { scale, window, softcap } = how;
    // `cap · tanh(s / cap)`, differentiably.
    let cap = |s: Tensor| -> Result<Tensor> {
        Ok(match softcap {
            Some(c) => ((s / c)?.tanh()? * c)?,
            None => s,
        })
    };
    let (b, t, h, d) = q.dims4()?;
    let kvh = k.dim(2)?;
    let n_rep = h / kvh;
    // Whether query `i` (0-based position among its sequence's tokens) may not see key `j`
    // for the window alone.
    let outside = |i: usize, j: usize| window.is_some_and(|w| j + w <= i);
    match ctx {
        AttnCtx::Batch { causal, key_mask, segments, .. } if crate::kernels::ops::supported(q) => {
            let op = crate::kernels::ops::Attention::new(b, t, h, kvh, d, *causal, scale, key_mask.clone())
                .with_segments(segments.as_ref().map(Segments::shared))
                .with_window(window)
                .with_softcap(softcap);
            Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
        }
        AttnCtx::Batch { mask, .. } => {
            let q = q.transpose(1, 2)?.contiguous()?;
            let mut k = k.transpose(1, 2)?.contiguous()?;
            let mut v = v.transpose(1, 2)?.contiguous()?;
            if n_rep > 1 {
                k = k.unsqueeze(2)?.expand((b, kvh, n_rep, t, d))?.reshape((b, h, t, d))?;
                v = v.unsqueeze(2)?.expand((b, kvh, n_rep, t, d))?.reshape((b, h, t, d))?;
            }
            let dtype = q.dtype();
            let mut scores = cap((q.matmul(&k.t()?)? * scale)?.to_dtype(compute_dtype(dtype))?)?;
            if let Some(m) = mask {
                scores = scores.broadcast_add(&m.to_dtype(scores.dtype())?)?;
            }
            if window.is_some_and(|w| w < t) {
                // Tokens of a row (or of one packed sequence) are consecutive, so the distance
                // of their indices is that of their positions.
                let m: Vec<f32> = (0..t * t).map(|x| if outside(x / t, x % t) { MASK_VALUE } else { 0.0 }).collect();
                let m = Tensor::from_vec(m, (t, t), q.device())?.to_dtype(scores.dtype())?;
                scores = scores.broadcast_add(&m)?;
            }
            let probs = softmax_last(&scores)?.to_dtype(dtype)?;
            let out = probs.matmul(&v)?;
            Ok(out.transpose(1, 2)?.reshape((b, t, h * d))?)
        }
        AttnCtx::Packed { spans, caches } if b == 1 && caches.iter().all(|c| c.is_host()) => {
            let flat =
                |x: &Tensor| -> Result<Vec<f32>> { Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
            let out = crate::kernels::attention::packed_attention(
                &flat(q)?,
                &flat(k)?,
                &flat(v)?,
                (h, kvh, d),
                spans,
                caches,
                layer,
                how,
            )?;
            Ok(Tensor::from_vec(out, (1, t, h * d), q.device())?.to_dtype(q.dtype())?)
        }
        AttnCtx::Packed { spans, caches } => {
            let mut outs = Vec::with_capacity(spans.len());
            for (i, &(start, n)) in spans.iter().enumerate() {
                let qi = q.narrow(1, start, n)?.squeeze(0)?; // [n, h, d]
                let ki = k.narrow(1, start, n)?.squeeze(0)?.transpose(0, 1)?; // [kvh, n, d]
                let vi = v.narrow(1, start, n)?.squeeze(0)?.transpose(0, 1)?;
                let (k_all, v_all) = caches[i].append(layer, &ki, &vi)?; // [kvh, L, d]
                let l = k_all.dim(1)?;
                let p0 = l - n;
                // Heads sharing a KV head are stacked along the query axis: [kvh, n_rep * n, d].
                let qg = qi.transpose(0, 1)?.contiguous()?.reshape((kvh, n_rep * n, d))?;
                let dtype = qg.dtype();
                let mut scores = cap((qg.matmul(&k_all.t()?)? * scale)?.to_dtype(compute_dtype(dtype))?)?;
                if n > 1 || window.is_some_and(|w| w < l) {
                    let mut m = vec![0f32; n * l];
                    for qi in 0..n {
                        for kj in 0..l {
                            if kj > p0 + qi || outside(p0 + qi, kj) {
                                m[qi * l + kj] = MASK_VALUE;
                            }
                        }
                    }
                    let m = Tensor::from_vec(m, (n, l), q.device())?.to_dtype(scores.dtype())?;
                    scores = scores.reshape((kvh, n_rep, n, l))?.broadcast_add(&m)?.reshape((kvh, n_rep * n, l))?;
                }
                let probs = softmax_last(&scores)?.to_dtype(dtype)?;
                let out = probs.matmul(&v_all.contiguous()?)?; // [kvh, n_rep * n, d]
                let out = out.reshape((h, n, d))?.transpose(0, 1)?.reshape((n, h * d))?;
                outs.push(out);
            }
            Ok(Tensor::cat(&outs, 0)?.unsqueeze(0)?)
        }
    }
}

impl crate::config::Activation {
    /// Applies the activation elementwise (differentiable).
    pub fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        use crate::kernels::ops::{Act, ActKind};
        if crate::kernels::ops::supported(xs) {
            let kind = match self {
                crate::config::Activation::Gelu => Some(ActKind::GeluErf),
                crate::config::Activation::GeluTanh => Some(ActKind::GeluTanh),
                crate::config::Activation::Silu => Some(ActKind::Silu),
                crate::config::Activation::Relu => None,
            };
            if let Some(k) = kind {
                return xs.contiguous()?.apply_op1(Act(k));
            }
        }
        match self {
            crate::config::Activation::Gelu => xs.gelu_erf(),
            crate::config::Activation::GeluTanh => xs.gelu(),
            crate::config::Activation::Relu => xs.relu(),
            crate::config::Activation::Silu => xs.silu(),
        }
    }
}

#[cfg(test)]
mod quantized_linear_tests {
    use super::*;

    /// Slices of dequantized rows give the whole weight's product and input gradient.
    #[test]
    fn sliced_products_equal_the_whole_weights() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 64), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0).unwrap());
        let wd = q.dequantize(&dev).unwrap();
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1.0, (2, 3, 70), &dev).unwrap();
        for step in [1, 16, 70, 1000] {
            let y = x.as_tensor().apply_op1(QuantizedLinear(q.clone(), step)).unwrap();
            let want = x.as_tensor().broadcast_matmul(&wd.t().unwrap()).unwrap();
            let d = (&y - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "step {step}: product off by {d}");
            let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = g.get(x.as_tensor()).unwrap();
            let want = up.broadcast_matmul(&wd).unwrap();
            let d = (gx - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "step {step}: gradient off by {d}");
        }
    }
}
