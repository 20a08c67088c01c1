//! Key/value cache of batched generation: one preallocated `(b, kv_heads, capacity, hd)`
//! buffer per layer, filled in place. Its dtype may be narrower than the model's: a policy
//! sampling with bf16 products on the CPU caches bf16 (half the bytes each decoding step
//! reads, and twice the positions in the same budget); appends are rounded to it.

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

    /// The dtype the buffers hold.
    pub fn dtype(&self) -> DType {
        self.k.first().map_or(DType::F32, |t| t.dtype())
    }

    /// Writes this call's keys/values `(b, kv, t, hd)` of `layer` after the cached ones (in
    /// the cache's dtype) and returns views of everything cached, this call included.
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
        let dtype = self.dtype();
        self.k[layer].slice_set(&k.to_dtype(dtype)?.contiguous()?, 2, self.len)?;
        self.v[layer].slice_set(&v.to_dtype(dtype)?.contiguous()?, 2, self.len)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A bf16 cache stores what it is given rounded to bf16, in half the bytes of an f32 one,
    /// and its copies and grown buffers stay bf16.
    #[test]
    fn a_bf16_cache_rounds_its_appends_in_half_the_bytes() {
        let dev = Device::Cpu;
        let f32_cache = KvCache::new(2, 1, 2, 8, 4, DType::F32, &dev).unwrap();
        let mut cache = KvCache::new(2, 1, 2, 8, 4, DType::BF16, &dev).unwrap();
        assert_eq!(cache.dtype(), DType::BF16);
        assert_eq!(2 * cache.bytes(), f32_cache.bytes());
        let vals: Vec<f32> = (0..2 * 3 * 4).map(|i| 1.0 + i as f32 / 300.0).collect();
        let k = Tensor::from_vec(vals, (1, 2, 3, 4), &dev).unwrap();
        let v = (&k * 2.0).unwrap();
        for layer in 0..2 {
            let (ck, cv) = cache.append(layer, &k, &v).unwrap();
            assert_eq!((ck.dtype(), cv.dtype()), (DType::BF16, DType::BF16));
            let want = k
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = ck.to_dtype(DType::F32).unwrap();
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            // Rounded, not the values as given.
            assert_ne!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                k.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        cache.advance(3);
        cache.reserve(20).unwrap();
        assert_eq!(cache.dtype(), DType::BF16);
        assert_eq!(cache.prefix_copy(2, 4).unwrap().dtype(), DType::BF16);
    }
}
