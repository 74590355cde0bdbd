//! Per-sequence key/value cache for incremental decoding.
//!
//! Prefill writes the keys and values of all prompt tokens; each decode step appends one.
//! Storage per layer is `[kv_heads, capacity, head_dim]`, grown by doubling (never past the
//! model's context length) and written in place, so appending is amortised O(new tokens).
//! One cache belongs to one sequence, which is what lets a server batch unrelated requests,
//! each at its own position.
//!
//! On CPU in f32 the cache lives in plain host vectors instead (token-major:
//! `[len, kv_heads, head_dim]`, f32 or, on request, bf16), read directly by [`packed_attention`](crate::kernels::attention::packed_attention): a step over many
//! sequences then costs two tensor copies per layer instead of a dozen tensor ops per sequence,
//! which is what makes batching many small decode streams pay off.

use candle_core::{DType, Device, Tensor};

use crate::kernels::simd::{f32_to_bf16, Rows};
use crate::{Error, Result};

/// Tokens a host cache reserves at its first append (its expectation, when smaller): short
/// requests never regrow, long ones start small.
pub const FIRST_ROOM: usize = 256;

/// One layer's keys or values in a host cache: f32, or bf16 ([`KvCache::store_bf16`]) for half
/// the bytes.
#[derive(Debug, Clone)]
enum HostBuf {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl HostBuf {
    fn empty_like(&self) -> Self {
        match self {
            HostBuf::F32(_) => HostBuf::F32(Vec::new()),
            HostBuf::Bf16(_) => HostBuf::Bf16(Vec::new()),
        }
    }

    fn len(&self) -> usize {
        self.rows().len()
    }

    fn capacity(&self) -> usize {
        match self {
            HostBuf::F32(x) => x.capacity(),
            HostBuf::Bf16(x) => x.capacity(),
        }
    }

    fn elem_bytes(&self) -> usize {
        match self {
            HostBuf::F32(_) => 4,
            HostBuf::Bf16(_) => 2,
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            HostBuf::F32(x) => x.truncate(n),
            HostBuf::Bf16(x) => x.truncate(n),
        }
    }

    fn reserve_exact(&mut self, additional: usize) {
        match self {
            HostBuf::F32(x) => x.reserve_exact(additional),
            HostBuf::Bf16(x) => x.reserve_exact(additional),
        }
    }

    /// Appends `new`, rounded to bf16 when stored so (exact when it already is bf16).
    fn extend(&mut self, new: Rows<'_>) {
        match (self, new) {
            (HostBuf::F32(x), Rows::F32(n)) => x.extend_from_slice(n),
            (HostBuf::F32(x), Rows::Bf16(n)) => x.extend(n.iter().map(|&h| crate::kernels::simd::bf16_to_f32(h))),
            (HostBuf::Bf16(x), Rows::F32(n)) => x.extend(n.iter().map(|&v| f32_to_bf16(v))),
            (HostBuf::Bf16(x), Rows::Bf16(n)) => x.extend_from_slice(n),
        }
    }

    fn rows(&self) -> Rows<'_> {
        match self {
            HostBuf::F32(x) => Rows::F32(x),
            HostBuf::Bf16(x) => Rows::Bf16(x),
        }
    }

    /// A copy with as much room as this buffer has (a plain clone would have none to spare).
    fn copy_with_room(&self) -> Self {
        let mut c = self.empty_like();
        c.reserve_exact(self.capacity());
        c.extend(self.rows());
        c
    }
}

impl Rows<'_> {
    /// The first `n` values.
    fn prefix(self, n: usize) -> Self {
        match self {
            Rows::F32(x) => Rows::F32(&x[..n]),
            Rows::Bf16(x) => Rows::Bf16(&x[..n]),
        }
    }
}

#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// The key/value cache of one sequence, all layers.
///
/// Not `Clone`: storage is written in place, so two handles would corrupt each other; use
/// [`KvCache::fork`] for a deep copy.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Host storage per layer (keys, values), used instead of `layers` when `host`.
    host_kv: Vec<(HostBuf, HostBuf)>,
    host: bool,
    kv_heads: usize,
    head_dim: usize,
    max_len: usize,
    /// Tokens the sequence is expected to reach ([`KvCache::expect_tokens`]); 0 when unknown.
    expected: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    /// An empty cache for `num_layers` layers of `kv_heads × head_dim`, holding at most
    /// `max_len` tokens.
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let host = dtype == DType::F32 && crate::kernels::ops::supported_for(dtype, device);
        Self {
            layers: vec![None; if host { 0 } else { num_layers }],
            host_kv: vec![(HostBuf::F32(Vec::new()), HostBuf::F32(Vec::new())); if host { num_layers } else { 0 }],
            host,
            kv_heads,
            head_dim,
            max_len,
            expected: 0,
            dtype,
            device: device.clone(),
        }
    }

    /// Tells a host cache how many tokens its sequence will reach at most (a server knows the
    /// prompt and `max_tokens`), capped at the cache's `max_len`. The cache then never holds
    /// more room than that: up to [`FIRST_ROOM`] tokens are reserved at the first append (no
    /// regrowth, each of which copies the cache), a longer expectation by doubling as it fills.
    pub fn expect_tokens(&mut self, tokens: usize) {
        self.expected = tokens.min(self.max_len);
    }

    /// Whether the cache lives in host vectors (CPU, f32) for [`packed_attention`](crate::kernels::attention::packed_attention).
    pub fn is_host(&self) -> bool {
        self.host
    }

    /// Keeps this (empty, host) cache's keys and values as bf16: half the memory and half the
    /// bytes each decode step reads, at the cost of rounding each key and value to bf16's 8
    /// significant bits (attention still computes in f32). What vLLM's `--kv-cache-dtype` and
    /// llama.cpp's `--cache-type-k/v` offer; outputs then differ slightly from f32 storage.
    pub fn store_bf16(&mut self) -> Result<()> {
        if !self.host {
            return Err(Error::invalid("kv_cache_dtype", "bf16 keys and values need a CPU model computing in f32"));
        }
        if !self.is_empty() {
            return Err(Error::invalid("kv_cache_dtype", "the storage type of a cache holding tokens cannot change"));
        }
        for (k, v) in &mut self.host_kv {
            (*k, *v) = (HostBuf::Bf16(Vec::new()), HostBuf::Bf16(Vec::new()));
        }
        Ok(())
    }

    /// Whether keys and values are stored as bf16 ([`KvCache::store_bf16`]).
    pub fn is_bf16(&self) -> bool {
        self.host_kv.first().is_some_and(|(k, _)| matches!(k, HostBuf::Bf16(_)))
    }

    /// Number of tokens cached (the position the next token takes).
    pub fn len(&self) -> usize {
        if self.host {
            return self.host_layer_len(0);
        }
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |l| l.len)
    }

    fn host_layer_len(&self, layer: usize) -> usize {
        self.host_kv.get(layer).map_or(0, |l| l.0.len() / (self.kv_heads * self.head_dim))
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most tokens this cache may hold (the model's context length).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Bytes of key/value storage currently allocated.
    pub fn allocated_bytes(&self) -> usize {
        if self.host {
            return self.host_kv.iter().map(|(k, v)| (k.capacity() + v.capacity()) * k.elem_bytes()).sum();
        }
        self.layers.iter().flatten().map(|l| 2 * l.k.elem_count() * self.dtype.size_in_bytes()).sum()
    }

    /// Bytes one cached token takes across all layers (keys and values).
    pub fn bytes_per_token(&self) -> usize {
        let elem = self.host_kv.first().map_or(self.dtype.size_in_bytes(), |(k, _)| k.elem_bytes());
        2 * self.layers.len().max(self.host_kv.len()) * self.kv_heads * self.head_dim * elem
    }

    /// Forgets everything past the first `len` tokens (e.g. to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        let row = self.kv_heads * self.head_dim;
        for (k, v) in &mut self.host_kv {
            k.truncate(len * row);
            v.truncate(len * row);
        }
        for l in self.layers.iter_mut().flatten() {
            l.len = l.len.min(len);
        }
    }

    /// A deep copy (e.g. to branch a shared prompt into several samples).
    pub fn fork(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(|l| Ok(LayerKv { k: l.k.copy()?, v: l.v.copy()?, len: l.len })).transpose())
            .collect::<Result<Vec<_>>>()?;
        let host_kv = self.host_kv.iter().map(|(k, v)| (k.copy_with_room(), v.copy_with_room())).collect();
        Ok(Self {
            layers,
            host_kv,
            host: self.host,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            max_len: self.max_len,
            expected: self.expected,
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// A new cache holding a copy of the first `len` tokens only, for a sequence expected to
    /// reach `expected` tokens ([`KvCache::expect_tokens`]; 0 when unknown): a server starts
    /// a request whose prompt begins like an earlier sequence from that sequence's keys and
    /// values instead of computing them again (prefix caching). Keys and values depend only on
    /// the tokens before them, so the copy is what a prefill of those tokens would write.
    pub fn fork_prefix(&self, len: usize, expected: usize) -> Result<Self> {
        if len > self.len() {
            return Err(Error::invalid("len", format!("{len} tokens asked of a cache holding {}", self.len())));
        }
        let mut out = Self {
            layers: vec![None; self.layers.len()],
            host_kv: self.host_kv.iter().map(|(k, v)| (k.empty_like(), v.empty_like())).collect(),
            host: self.host,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            max_len: self.max_len,
            expected: 0,
            dtype: self.dtype,
            device: self.device.clone(),
        };
        out.expect_tokens(expected);
        if len == 0 {
            return Ok(out);
        }
        let row = self.kv_heads * self.head_dim;
        for (layer, (k, v)) in self.host_kv.iter().enumerate() {
            out.host_append_rows(layer, k.rows().prefix(len * row), v.rows().prefix(len * row))?;
        }
        for (layer, l) in self.layers.iter().enumerate() {
            if let Some(l) = l {
                out.append(layer, &l.k.narrow(1, 0, len)?, &l.v.narrow(1, 0, len)?)?;
            }
        }
        Ok(out)
    }

    /// Empties the cache, keeping its allocation.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Appends keys and values for `layer` and returns views of everything cached there.
    ///
    /// # Shapes
    /// `k`, `v`: `[kv_heads, n, head_dim]` → `([kv_heads, len, head_dim], [kv_heads, len, head_dim])`.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        if self.host {
            // [kvh, n, d] → token-major rows.
            let kr = k.transpose(0, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let vr = v.transpose(0, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            self.host_append(layer, &kr, &vr)?;
            let (kh, vh) = self.host_kv(layer);
            let l = kh.len() / (self.kv_heads * self.head_dim);
            let shape = (l, self.kv_heads, self.head_dim);
            let (mut kf, mut vf) = (Vec::new(), Vec::new());
            kh.gather_f32(0, 0, 1, kh.len(), &mut kf);
            vh.gather_f32(0, 0, 1, vh.len(), &mut vf);
            let kt = Tensor::from_vec(kf, shape, &self.device)?.transpose(0, 1)?;
            let vt = Tensor::from_vec(vf, shape, &self.device)?.transpose(0, 1)?;
            return Ok((kt, vt));
        }
        let (kvh, hd, max_len, dtype) = (self.kv_heads, self.head_dim, self.max_len, self.dtype);
        let device = self.device.clone();
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::invalid("layer", format!("layer {layer} is outside the cache")))?;
        let len = slot.as_ref().map_or(0, |l| l.len);
        if len + n > max_len {
            return Err(Error::ContextOverflow { len: len + n, max: max_len });
        }
        let cap = slot.as_ref().map_or(0, |l| l.k.dim(1).unwrap_or(0));
        if len + n > cap {
            let new_cap = (len + n).next_power_of_two().max(16).min(max_len);
            let nk = Tensor::zeros((kvh, new_cap, hd), dtype, &device)?;
            let nv = Tensor::zeros((kvh, new_cap, hd), dtype, &device)?;
            if let Some(old) = slot.as_ref() {
                if old.len > 0 {
                    nk.slice_set(&old.k.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
                    nv.slice_set(&old.v.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
                }
            }
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let l = slot.as_mut().expect("slot allocated above");
        l.k.slice_set(&k.to_dtype(dtype)?.contiguous()?, 1, len)?;
        l.v.slice_set(&v.to_dtype(dtype)?.contiguous()?, 1, len)?;
        l.len = len + n;
        Ok((l.k.narrow(1, 0, l.len)?, l.v.narrow(1, 0, l.len)?))
    }

    /// Appends token-major keys and values (`[n, kv_heads, head_dim]`, flattened) to a host
    /// cache.
    pub fn host_append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        self.host_append_rows(layer, Rows::F32(k), Rows::F32(v))
    }

    fn host_append_rows(&mut self, layer: usize, k: Rows<'_>, v: Rows<'_>) -> Result<()> {
        let row = self.kv_heads * self.head_dim;
        if !self.host || k.len() != v.len() || !k.len().is_multiple_of(row) {
            return Err(Error::invalid("kv", "host append needs a host cache and whole [n, kv_heads, head_dim] rows"));
        }
        let len = self.host_layer_len(layer);
        if len + k.len() / row > self.max_len {
            return Err(Error::ContextOverflow { len: len + k.len() / row, max: self.max_len });
        }
        let (kc, vc) = self
            .host_kv
            .get_mut(layer)
            .ok_or_else(|| Error::invalid("layer", format!("layer {layer} is outside the cache")))?;
        let need = len + k.len() / row;
        if need * row > kc.capacity() {
            // Never more room than the sequence may reach (its expectation, or the context), and
            // a sequence expecting little gets all of it at once; a long expectation is reserved
            // as it fills, doubling, so a request that stops early holds only what it used.
            let limit = if self.expected > 0 { self.expected } else { self.max_len };
            let have = kc.capacity() / row;
            let grown = if have == 0 { need.next_power_of_two().max(FIRST_ROOM) } else { 2 * have };
            let room = grown.min(limit).max(need) * row;
            kc.reserve_exact(room - kc.len());
            vc.reserve_exact(room - vc.len());
        }
        kc.extend(k);
        vc.extend(v);
        Ok(())
    }

    /// A host cache's keys and values for `layer` (token-major).
    pub fn host_kv(&self, layer: usize) -> (Rows<'_>, Rows<'_>) {
        self.host_kv.get(layer).map_or((Rows::F32(&[]), Rows::F32(&[])), |(k, v)| (k.rows(), v.rows()))
    }
}
