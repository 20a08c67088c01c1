//! Key/value cache of batched generation: one preallocated `(b, kv_heads, capacity, hd)`
//! buffer per layer, filled in place.

use candle_core::{DType, Device, Result, Tensor, bail};

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(
        layers: usize,
        b: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mk = || Tensor::zeros((b, kv_heads, capacity, head_dim), dtype, device);
        Ok(Self {
            k: (0..layers).map(|_| mk()).collect::<Result<_>>()?,
            v: (0..layers).map(|_| mk()).collect::<Result<_>>()?,
            len: 0,
            capacity,
        })
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes this call's keys/values `(b, kv, t, hd)` of `layer` after the cached ones and
    /// returns views of everything cached, this call included.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if self.len + t > self.capacity {
            bail!(
                "kv cache: {} + {t} positions exceed its capacity of {}",
                self.len,
                self.capacity
            );
        }
        self.k[layer].slice_set(&k.contiguous()?, 2, self.len)?;
        self.v[layer].slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((
            self.k[layer].narrow(2, 0, self.len + t)?,
            self.v[layer].narrow(2, 0, self.len + t)?,
        ))
    }

    /// Called once per forward, after every layer appended `t` positions.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
