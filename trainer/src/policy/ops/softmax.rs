//! Attention softmax with the causal mask and left padding, fused with the score scaling.
//!
//! Scores come as `(b, kv_heads, groups·tq, tk)`: the query heads that share a key/value head
//! are stacked along the rows so that grouped-query attention needs no copy of the keys.
//! Row `r` is the query at absolute position `offset + r % tq`; it sees the keys
//! `key_start[b] ..= offset + r % tq`. Rows that see no key (left padding) come out as zeros.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::OpsMode;
use super::cpu::{
    Real, check_float, lane_dot, lane_max, lane_sum, rows_per_task, slice, with_slice,
};

/// The mask of one attention call.
#[derive(Clone, Debug)]
pub struct AttentionMask {
    /// Query positions in this call.
    pub tq: usize,
    /// Absolute position of the first query (the KV-cache length before this call).
    pub offset: usize,
    /// Per batch row: the first key that is not left padding.
    pub key_start: Arc<Vec<usize>>,
}

impl AttentionMask {
    /// Plain causal attention over `t` positions, no padding, for `b` rows.
    pub fn causal(b: usize, t: usize) -> Self {
        Self {
            tq: t,
            offset: 0,
            key_start: Arc::new(vec![0; b]),
        }
    }

    fn range(&self, b: usize, r: usize, tk: usize) -> (usize, usize) {
        let last = (self.offset + r % self.tq).min(tk.saturating_sub(1));
        (self.key_start[b], last + 1)
    }
}

/// softmax(scale · scores) under `mask`.
pub fn masked_softmax(
    scores: &Tensor,
    scale: f64,
    mask: &AttentionMask,
    mode: OpsMode,
) -> Result<Tensor> {
    let (b, _kv, rows, tk) = scores.dims4()?;
    if mask.key_start.len() != b || rows % mask.tq != 0 || mask.offset + mask.tq > tk {
        bail!(
            "masked_softmax: scores {:?} do not match the mask (tq {}, offset {})",
            scores.dims(),
            mask.tq,
            mask.offset
        );
    }
    if mode.fused(scores) {
        scores.contiguous()?.apply_op1(SoftmaxOp {
            scale,
            mask: mask.clone(),
        })
    } else {
        let dtype = scores.dtype();
        let work = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        // Each row's key bounds, O(b·rows), are uploaded; the (b, rows, tk) mask is made on
        // the device by comparing them with the key indices.
        let (mut lo, mut hi, mut visible) = (
            vec![0u32; b * rows],
            vec![0u32; b * rows],
            vec![0f32; b * rows],
        );
        for bi in 0..b {
            for r in 0..rows {
                let (l, h) = mask.range(bi, r, tk);
                lo[bi * rows + r] = l as u32;
                hi[bi * rows + r] = h as u32;
                visible[bi * rows + r] = if h > l { 1.0 } else { 0.0 };
            }
        }
        let dev = scores.device();
        let keys = Tensor::arange(0u32, tk as u32, dev)?.reshape((1, 1, 1, tk))?;
        let seen = keys
            .broadcast_ge(&Tensor::from_vec(lo, (b, 1, rows, 1), dev)?)?
            .mul(&keys.broadcast_lt(&Tensor::from_vec(hi, (b, 1, rows, 1), dev)?)?)?
            .broadcast_as(scores.shape())?;
        let s = scores.to_dtype(work)?.affine(scale, 0.)?;
        let masked = Tensor::full(-1e9, (), dev)?
            .to_dtype(work)?
            .broadcast_as(scores.shape())?;
        let s = seen.where_cond(&s, &masked)?;
        let max = s.max_keepdim(D::Minus1)?.detach();
        let e = s.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        // Rows with no visible key (left padding) would attend uniformly; zero them instead.
        let visible = Tensor::from_vec(visible, (b, 1, rows, 1), dev)?.to_dtype(work)?;
        p.broadcast_mul(&visible)?.to_dtype(dtype)
    }
}

struct SoftmaxOp {
    scale: f64,
    mask: AttentionMask,
}

impl SoftmaxOp {
    fn fwd<T: Real>(&self, s: &[T], dims: (usize, usize, usize, usize)) -> Vec<T> {
        let (_b, kv, rows, tk) = dims;
        let mut out = vec![T::zero(); s.len()];
        let per = rows_per_task(s.len() / tk, tk);
        out.par_chunks_mut(per * tk)
            .zip(s.par_chunks(per * tk))
            .enumerate()
            .for_each(|(ci, (o, s))| {
                for (k, (o, s)) in o.chunks_exact_mut(tk).zip(s.chunks_exact(tk)).enumerate() {
                    let row = ci * per + k;
                    let (bi, r) = (row / (kv * rows), row % rows);
                    let (lo, hi) = self.mask.range(bi, r, tk);
                    if hi <= lo {
                        continue;
                    }
                    let sc = T::of(self.scale);
                    // sc > 0, so max(sc·s) = sc·max(s).
                    let max = lane_max(&s[lo..hi]) * sc;
                    for (o, &x) in o[lo..hi].iter_mut().zip(&s[lo..hi]) {
                        *o = (x * sc - max).fast_exp();
                    }
                    let sum = lane_sum(&o[lo..hi]);
                    let inv = T::one() / sum;
                    for v in &mut o[lo..hi] {
                        *v *= inv;
                    }
                }
            });
        out
    }

    /// ds = scale · p ⊙ (g − Σ p⊙g), row by row.
    fn bwd<T: Real>(&self, p: &[T], g: &[T], dims: (usize, usize, usize, usize)) -> Vec<T> {
        let (_b, kv, rows, tk) = dims;
        let mut out = vec![T::zero(); p.len()];
        let per = rows_per_task(p.len() / tk, tk);
        let sc = T::of(self.scale);
        out.par_chunks_mut(per * tk)
            .zip(p.par_chunks(per * tk).zip(g.par_chunks(per * tk)))
            .enumerate()
            .for_each(|(ci, (o, (p, g)))| {
                for (k, ((o, p), g)) in o
                    .chunks_exact_mut(tk)
                    .zip(p.chunks_exact(tk))
                    .zip(g.chunks_exact(tk))
                    .enumerate()
                {
                    let row = ci * per + k;
                    let (bi, r) = (row / (kv * rows), row % rows);
                    let (lo, hi) = self.mask.range(bi, r, tk);
                    if hi <= lo {
                        continue;
                    }
                    let dot = lane_dot(&p[lo..hi], &g[lo..hi]);
                    for j in lo..hi {
                        o[j] = sc * p[j] * (g[j] - dot);
                    }
                }
            });
        out
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "selfplay-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.fwd(slice::<f32>(s, l)?, dims)),
            CpuStorage::F64(_) => CpuStorage::F64(self.fwd(slice::<f64>(s, l)?, dims)),
            _ => bail!(
                "masked_softmax: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(s)
            ),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, s: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        check_float(s.dtype(), "masked_softmax backward")?;
        let dims = s.dims4()?;
        macro_rules! run {
            ($t:ty) => {
                with_slice::<$t, _>(res, |p| {
                    with_slice::<$t, _>(g, |g| {
                        Tensor::from_vec(self.bwd(p, g, dims), s.shape(), s.device())
                    })
                })?
            };
        }
        let ds = if s.dtype() == DType::F32 {
            run!(f32)
        } else {
            run!(f64)
        };
        Ok(Some(ds))
    }
}
