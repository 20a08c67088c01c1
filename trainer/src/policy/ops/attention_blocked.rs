//! Attention in blocks of query rows with candle's primitives, for devices without the CPU
//! kernels (CUDA), with the memory of [`super::attention`]'s fused op: the forward keeps the
//! log-sum-exp of each query row's scores, the backward recomputes each block's
//! probabilities from it (flash attention's scheme, method of Dao et al.). Every block's
//! masks come from per-row key bounds that are uploaded once per call, `O(b·tq)` integers,
//! and compared on the device with the key indices.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, D, DType, Layout, Result, Shape, Tensor};

use super::attention::KeyRanges;
use super::precomputed::Precomputed;

/// Score elements (`b · heads · rows · keys`) per block at most: 2^25 f32 values is 128 MiB
/// (small in tests, so that they cross blocks).
const BLOCK_ELEMS: usize = if cfg!(test) { 1 << 12 } else { 1 << 25 };

/// Stands in for −∞ in masked scores: exp of it minus any real score is exactly 0, and a
/// row that sees nothing stays finite (it is zeroed by its `has_key` factor).
const MASKED: f64 = -1e30;

/// Per query row, the bounds of the keys it sees, on the device.
struct RowBounds {
    /// `(b, 1, 1, tq, 1)` u32: first key seen, one past the last.
    lo: Tensor,
    hi: Tensor,
    /// `(b, 1, 1, tq, 1)` in the working dtype: 1 where the row sees a key, else 0.
    has_key: Tensor,
    /// Per block of rows `i0..i1`: the keys any batch row's rows see, `lo..lo + nk`.
    blocks: Vec<(usize, usize, usize, usize)>,
}

impl RowBounds {
    fn new(
        ranges: &KeyRanges,
        (b, h, tq, tk): (usize, usize, usize, usize),
        work: DType,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let (mut lo, mut hi, mut has) =
            (vec![0u32; b * tq], vec![0u32; b * tq], vec![0f32; b * tq]);
        for bi in 0..b {
            for i in 0..tq {
                let (l, u) = ranges.row(bi, i, tk);
                lo[bi * tq + i] = l as u32;
                hi[bi * tq + i] = u as u32;
                has[bi * tq + i] = if u > l { 1.0 } else { 0.0 };
            }
        }
        let rows = (BLOCK_ELEMS / (b * h * tk).max(1)).clamp(16, 1024);
        let mut blocks = Vec::new();
        for i0 in (0..tq).step_by(rows) {
            let i1 = (i0 + rows).min(tq);
            let first = (0..b)
                .map(|bi| lo[bi * tq + i0] as usize)
                .min()
                .unwrap_or(0);
            let last = (0..b)
                .map(|bi| hi[bi * tq + i1 - 1] as usize)
                .max()
                .unwrap_or(0);
            blocks.push((i0, i1, first, last.saturating_sub(first)));
        }
        let shape = (b, 1, 1, tq, 1);
        Ok(Self {
            lo: Tensor::from_vec(lo, shape, dev)?,
            hi: Tensor::from_vec(hi, shape, dev)?,
            has_key: Tensor::from_vec(has, shape, dev)?.to_dtype(work)?,
            blocks,
        })
    }
}

/// The inputs of one block, head-major and grouped: rows of the query heads that share a
/// key/value head are stacked, so no key or value is repeated.
struct BlockInputs {
    /// `(b, kvh, g·m, hd)`
    q: Tensor,
    /// `(b, kvh, nk, hd)`
    k: Tensor,
    v: Tensor,
}

struct Shapes {
    b: usize,
    h: usize,
    kvh: usize,
    tq: usize,
    tk: usize,
    hd: usize,
}

impl Shapes {
    fn g(&self) -> usize {
        self.h / self.kvh
    }
}

fn block_inputs(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    s: &Shapes,
    (i0, m, lo, nk): (usize, usize, usize, usize),
) -> Result<BlockInputs> {
    Ok(BlockInputs {
        q: q.narrow(2, i0, m)?
            .contiguous()?
            .reshape((s.b, s.kvh, s.g() * m, s.hd))?,
        k: k.narrow(2, lo, nk)?.contiguous()?,
        v: v.narrow(2, lo, nk)?.contiguous()?,
    })
}

/// The block's scaled, masked scores `(b, kvh, g, m, nk)` in the working dtype.
fn block_scores(
    x: &BlockInputs,
    bounds: &RowBounds,
    s: &Shapes,
    (i0, m, lo, nk): (usize, usize, usize, usize),
    scale: f64,
    work: DType,
) -> Result<Tensor> {
    let shape = (s.b, s.kvh, s.g(), m, nk);
    let scores =
        x.q.matmul(&x.k.t()?)?
            .to_dtype(work)?
            .affine(scale, 0.)?
            .reshape(shape)?;
    let keys =
        Tensor::arange(lo as u32, (lo + nk) as u32, scores.device())?.reshape((1, 1, 1, 1, nk))?;
    let seen = keys
        .broadcast_ge(&bounds.lo.narrow(3, i0, m)?)?
        .mul(&keys.broadcast_lt(&bounds.hi.narrow(3, i0, m)?)?)?
        .broadcast_as(shape)?;
    let masked = Tensor::full(MASKED, (), scores.device())?
        .to_dtype(work)?
        .broadcast_as(shape)?;
    seen.where_cond(&scores, &masked)
}

/// `softmax(scale · q·kᵀ under ranges) · v` for token-major `v (b·tk, kv_heads·hd)`, output
/// `(b·tq, heads·hd)`; differentiable, with the memory of one block at a time.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    ranges: &KeyRanges,
) -> Result<Tensor> {
    let (b, h, tq, hd) = q.dims4()?;
    let (_, kvh, tk, _) = k.dims4()?;
    let s = Shapes {
        b,
        h,
        kvh,
        tq,
        tk,
        hd,
    };
    let v = v.reshape((b, tk, kvh, hd))?.transpose(1, 2)?.contiguous()?;
    let work = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let bounds = RowBounds::new(ranges, (b, h, tq, tk), work, q.device())?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let mut outs = Vec::with_capacity(bounds.blocks.len());
    let mut lses = Vec::with_capacity(bounds.blocks.len());
    for &(i0, i1, lo, nk) in &bounds.blocks {
        let m = i1 - i0;
        if nk == 0 {
            outs.push(Tensor::zeros((b, h, m, hd), q.dtype(), q.device())?);
            lses.push(Tensor::zeros((b, kvh, s.g(), m, 1), work, q.device())?);
            continue;
        }
        let x = block_inputs((&qd, &kd, &vd), &s, (i0, m, lo, nk))?;
        let sc = block_scores(&x, &bounds, &s, (i0, m, lo, nk), scale, work)?;
        let max = sc.max_keepdim(D::Minus1)?;
        let e = sc.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let has = bounds.has_key.narrow(3, i0, m)?;
        let p = e.broadcast_div(&sum)?.broadcast_mul(&has)?;
        lses.push((max + sum.log()?)?);
        let o = p
            .to_dtype(q.dtype())?
            .reshape((b, kvh, s.g() * m, nk))?
            .matmul(&x.v)?
            .reshape((b, h, m, hd))?;
        outs.push(o);
    }
    let out = Tensor::cat(&outs, 2)?
        .transpose(1, 2)?
        .reshape((b * tq, h * hd))?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let lse = Tensor::cat(&lses, 3)?;
    q.apply_op3(
        k,
        &v,
        BlockedAttention {
            out: Precomputed::new(&out)?,
            lse,
            bounds,
            shapes: s,
            scale,
            work,
        },
    )
}

struct BlockedAttention {
    out: Precomputed,
    /// `(b, kvh, g, tq, 1)`
    lse: Tensor,
    bounds: RowBounds,
    shapes: Shapes,
    scale: f64,
    work: DType,
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "selfplay-blocked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = &self.shapes;
        let (b, h, kvh, tq, tk, hd, g) = (s.b, s.h, s.kvh, s.tq, s.tk, s.hd, s.g());
        let work = self.work;
        let heads = |t: &Tensor| -> Result<Tensor> {
            t.reshape((b, tq, h, hd))?.transpose(1, 2)?.contiguous()
        };
        let (go, o) = (heads(&grad.detach())?, heads(&res.detach())?);
        let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
        // rowsum(dO ⊙ O), the softmax backward's correction per row.
        let dsum = (go.to_dtype(work)? * o.to_dtype(work)?)?
            .sum_keepdim(D::Minus1)?
            .reshape((b, kvh, g, tq, 1))?;
        let mut dqs = Vec::with_capacity(self.bounds.blocks.len());
        let mut dk = Tensor::zeros((b, kvh, tk, hd), work, q.device())?;
        let mut dv = Tensor::zeros((b, kvh, tk, hd), work, q.device())?;
        for &(i0, i1, lo, nk) in &self.bounds.blocks {
            let m = i1 - i0;
            if nk == 0 {
                dqs.push(Tensor::zeros((b, h, m, hd), work, q.device())?);
                continue;
            }
            let blk = (i0, m, lo, nk);
            let x = block_inputs((&qd, &kd, &vd), s, blk)?;
            let sc = block_scores(&x, &self.bounds, s, blk, self.scale, work)?;
            let p = sc
                .broadcast_sub(&self.lse.narrow(3, i0, m)?)?
                .exp()?
                .broadcast_mul(&self.bounds.has_key.narrow(3, i0, m)?)?;
            let gob = go
                .narrow(2, i0, m)?
                .contiguous()?
                .reshape((b, kvh, g * m, hd))?;
            let dp = gob
                .matmul(&x.v.t()?)?
                .to_dtype(work)?
                .reshape((b, kvh, g, m, nk))?;
            let ds = (p.clone() * dp.broadcast_sub(&dsum.narrow(3, i0, m)?)?)?
                .affine(self.scale, 0.)?
                .reshape((b, kvh, g * m, nk))?
                .to_dtype(q.dtype())?;
            let p = p.reshape((b, kvh, g * m, nk))?.to_dtype(q.dtype())?;
            dqs.push(ds.matmul(&x.k)?.reshape((b, h, m, hd))?.to_dtype(work)?);
            let pad = |t: Tensor| t.to_dtype(work)?.pad_with_zeros(2, lo, tk - lo - nk);
            dk = (dk + pad(ds.t()?.matmul(&x.q)?)?)?;
            dv = (dv + pad(p.t()?.matmul(&gob)?)?)?;
        }
        let dq = Tensor::cat(&dqs, 2)?.to_dtype(q.dtype())?;
        Ok((
            Some(dq),
            Some(dk.to_dtype(k.dtype())?),
            Some(dv.to_dtype(v.dtype())?),
        ))
    }
}
