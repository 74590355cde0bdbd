//! Per-sequence key/value cache for incremental decoding.
//!
//! Prefill writes the keys and values of all prompt tokens; each decode step appends one.
//! Storage per layer is `[kv_heads, capacity, head_dim]`, grown by doubling (never past the
//! model's context length) and written in place, so appending is amortised O(new tokens).
//! One cache belongs to one sequence, which is what lets a server batch unrelated requests,
//! each at its own position.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

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
    kv_heads: usize,
    head_dim: usize,
    max_len: usize,
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
        Self { layers: vec![None; num_layers], kv_heads, head_dim, max_len, dtype, device: device.clone() }
    }

    /// Number of tokens cached (the position the next token takes).
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |l| l.len)
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
        self.layers.iter().flatten().map(|l| 2 * l.k.elem_count() * self.dtype.size_in_bytes()).sum()
    }

    /// Bytes one cached token takes across all layers (keys and values).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Forgets everything past the first `len` tokens (e.g. to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize) {
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
        Ok(Self {
            layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            max_len: self.max_len,
            dtype: self.dtype,
            device: self.device.clone(),
        })
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
}
