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

    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Makes room for `extra` more positions, at least doubling the buffers when they grow
    /// (a conversation's cache grows turn by turn; doubling keeps the copies linear).
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if need <= self.capacity {
            return Ok(());
        }
        let capacity = need.max(2 * self.capacity);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            let (b, kvh, _, hd) = buf.dims4()?;
            let grown = Tensor::zeros((b, kvh, capacity, hd), buf.dtype(), buf.device())?;
            if self.len > 0 {
                grown.slice_set(&buf.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            *buf = grown;
        }
        self.capacity = capacity;
        Ok(())
    }

    /// A new cache holding a copy of this one's first `len` positions, with room for
    /// `capacity`: a conversation that starts with the same tokens as this one takes their
    /// keys and values instead of computing them again (the buffers are written in place, so
    /// they are copied, never shared).
    pub fn prefix_copy(&self, len: usize, capacity: usize) -> Result<Self> {
        if len > self.len || len > capacity {
            bail!(
                "kv cache: a prefix of {len} positions from a cache of {} into a capacity of {capacity}",
                self.len
            );
        }
        let copy = |buf: &Tensor| -> Result<Tensor> {
            let (b, kvh, _, hd) = buf.dims4()?;
            let new = Tensor::zeros((b, kvh, capacity, hd), buf.dtype(), buf.device())?;
            if len > 0 {
                new.slice_set(&buf.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            Ok(new)
        };
        Ok(Self {
            k: self.k.iter().map(copy).collect::<Result<_>>()?,
            v: self.v.iter().map(copy).collect::<Result<_>>()?,
            len,
            capacity,
        })
    }

    /// Forgets every position from `len` on (a conversation that went back on its tokens).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Called once per forward, after every layer appended `t` positions.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
