//! Grouped-query attention under the causal/padding mask as one op:
//! `softmax(scale · q·kᵀ, masked) · v`, in memory linear in the sequence length.
//!
//! Neither direction ever holds more than one block of query rows against their keys per
//! head (as flash attention does): the forward walks blocks of [`BLOCK_ROWS`] query rows,
//! multiplies each only by the keys it can see (a causal block skips the keys after its last
//! row) and keeps, per query row, only the log-sum-exp of its scores; the backward recomputes
//! each block's probabilities from those statistics. Keeping the probabilities instead cost
//! `heads · t²/2` floats per layer (4 GiB per layer at 16k tokens and 8 heads), recomputing
//! them costs one product of five in the backward.
//!
//! On the CPU the products go to `gemm`, one task per (batch row, head), and values are read
//! and the output written token-major, in the layouts of the value and output projections, so
//! no transpose (and no node of the backward graph) sits between them and the attention. On
//! other devices (CUDA) the same blocks are candle primitives inside a custom op whose
//! backward recomputes them (`attention_blocked`).
//!
//! Shapes: `q (b, heads, tq, hd)`, `k (b, kv_heads, tk, hd)`, `v (b·tk, kv_heads·hd)`, output
//! `(b·tq, heads·hd)`; the query heads `kv·groups .. (kv+1)·groups` share key/value head `kv`.
//! Row `i` of the queries is the position `offset + i` (see [`AttentionMask`]); with packed
//! sequences ([`KeyRanges::packed`]) it sees only the keys of its own sequence. A row that
//! sees no key comes out as zeros.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use super::OpsMode;
use super::attention_blocked;
use super::attention_cached;
use super::cpu::{
    Real, check_float, lane_dot, lane_max, lane_sum, multiversion, product, slice, with_slice,
};
use super::softmax::AttentionMask;

/// Query rows per block: small enough that a causal block skips most of what it cannot see
/// and that a block's scores stay small, large enough for the products to run at GEMM speed.
const BLOCK_ROWS: usize = 64;

/// The keys every query row of an attention call sees: the mask, and when several sequences
/// are packed end to end into one batch row, the start of each query's own sequence.
#[derive(Clone, Debug)]
pub struct KeyRanges {
    pub(crate) mask: AttentionMask,
    /// Per query row (`b·tq`, row-major): the first key of its sequence.
    segments: Option<Arc<Vec<u32>>>,
}

impl KeyRanges {
    /// The ranges `mask` gives.
    pub fn new(mask: AttentionMask) -> Self {
        Self {
            mask,
            segments: None,
        }
    }

    /// Sequences of `lens` tokens packed end to end into one batch row: causal within each
    /// sequence, nothing across them.
    pub fn packed(lens: &[usize]) -> Self {
        let t: usize = lens.iter().sum();
        let mut starts = Vec::with_capacity(t);
        let mut at = 0u32;
        for &n in lens {
            starts.extend(std::iter::repeat_n(at, n));
            at += n as u32;
        }
        Self {
            mask: AttentionMask::causal(1, t),
            segments: Some(Arc::new(starts)),
        }
    }

    /// Keys `lo..hi` of query row `i` of batch row `bi` (empty when `hi ≤ lo`). Both bounds
    /// never decrease with `i`, so a block's range is that of its first and last rows.
    pub(crate) fn row(&self, bi: usize, i: usize, tk: usize) -> (usize, usize) {
        let m = &self.mask;
        let mut lo = m.key_start[bi];
        if let Some(s) = &self.segments {
            lo = lo.max(s[bi * m.tq + i] as usize);
        }
        (lo, (m.offset + i + 1).min(tk))
    }

    /// Keys `lo, lo + nk` that rows `i0..i1` of batch row `bi` see between them.
    fn block(&self, bi: usize, i0: usize, i1: usize, tk: usize) -> (usize, usize) {
        let (lo, _) = self.row(bi, i0, tk);
        let (_, hi) = self.row(bi, i1 - 1, tk);
        (lo, hi.saturating_sub(lo))
    }

    fn check_segments(&self, b: usize) -> Result<()> {
        if let Some(s) = &self.segments
            && s.len() != b * self.mask.tq
        {
            bail!(
                "attention: {} segment starts for {b} × {} query rows",
                s.len(),
                self.mask.tq
            );
        }
        Ok(())
    }
}

/// `softmax(scale · q·kᵀ under ranges) · v` for token-major values `v (b·tk, kv_heads·hd)`;
/// the output is token-major, `(b·tq, heads·hd)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    ranges: &KeyRanges,
    mode: OpsMode,
) -> Result<Tensor> {
    let (b, _h, _tq, hd) = q.dims4()?;
    let (_, kvh, tk, _) = k.dims4()?;
    if v.dims() != [b * tk, kvh * hd] {
        bail!(
            "attention: values {:?} are not token-major for keys {:?}",
            v.dims(),
            k.dims()
        );
    }
    check(q, k, &ranges.mask)?;
    ranges.check_segments(b)?;
    if mode.fused(q) && q.dtype() == k.dtype() && q.dtype() == v.dtype() {
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            AttentionOp {
                scale,
                ranges: ranges.clone(),
                keep: q.track_op() || k.track_op() || v.track_op(),
                lse: Mutex::new(None),
            },
        );
    }
    attention_blocked::attention(q, k, v, scale, ranges)
}

/// The same for head-major values `v (b, kv_heads, tk, hd)`, as a KV cache holds them
/// (strided views; copying the cache at every decoding step would cost more than the fusion
/// saves). Output `(b·tq, heads·hd)`. A few query rows on the CPU outside a backward (a
/// decoding step) read the cache in place (`attention_cached`); otherwise [`attention`] on
/// a token-major copy of the values.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask,
    mode: OpsMode,
) -> Result<Tensor> {
    check(q, k, mask)?;
    if v.dims() != k.dims() {
        bail!(
            "attention: values {:?} differ from keys {:?}",
            v.dims(),
            k.dims()
        );
    }
    if mode.fused(q) && attention_cached::applies(q, k, v) {
        return attention_cached::attention(q, k, v, scale, mask);
    }
    // More query rows (a prompt, a long tool output) or another device: the blocked
    // attention, in memory linear in the length, on the values made token-major (one copy
    // of the cache view, also linear). Candle's primitives here held every head's scores at
    // once: `heads · tq · tk` floats per layer, 8 GiB for one 16k-token prompt of 8 heads.
    let (b, kvh, tk, hd) = v.dims4()?;
    let v = v
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * tk, kvh * hd))?;
    attention(q, k, &v, scale, &KeyRanges::new(mask.clone()), mode)
}

/// Several conversations' few new queries, each against its own cache, in one call (the
/// rows of a decoding step): `q (b, heads, t, hd)` holds every segment's queries; `Some`
/// output `(Σ tq, heads·hd)`, the segments' rows in order, where the CPU kernel applies
/// (`attention_cached`), `None` where the caller attends segment by segment.
pub(crate) fn attention_segments(
    q: &Tensor,
    segments: &[attention_cached::Segment<'_>],
    scale: f64,
    mode: OpsMode,
) -> Result<Option<Tensor>> {
    if !(mode.fused(q) && attention_cached::applies_to_segments(q, segments)) {
        return Ok(None);
    }
    attention_cached::segments_attention(q, segments, scale).map(Some)
}

fn check(q: &Tensor, k: &Tensor, mask: &AttentionMask) -> Result<()> {
    let (b, h, tq, hd) = q.dims4()?;
    let (kb, kvh, tk, khd) = k.dims4()?;
    if kb != b
        || khd != hd
        || kvh == 0
        || h % kvh != 0
        || mask.tq != tq
        || mask.key_start.len() != b
        || mask.offset + tq > tk
    {
        bail!(
            "attention: q {:?} and k {:?} do not fit together or with the mask (tq {}, offset {})",
            q.dims(),
            k.dims(),
            mask.tq,
            mask.offset
        );
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    kvh: usize,
    groups: usize,
    tq: usize,
    tk: usize,
    hd: usize,
}

impl Dims {
    fn heads(&self) -> usize {
        self.kvh * self.groups
    }

    /// gemm's own threads when there are fewer (batch row, head) tasks than workers.
    fn parallelism(&self) -> Parallelism {
        if self.b * self.heads() >= rayon::current_num_threads() {
            Parallelism::None
        } else {
            Parallelism::Rayon(0)
        }
    }
}

multiversion! {
    /// Softmax over entries `a..n` of `row`; the rest (keys the row cannot see) become 0.
    /// Returns the log-sum-exp of the visible entries, from which the backward recomputes
    /// the row.
    fn softmax_row<T: Real>(row: &mut [T], a: usize, n: usize) -> T {
        let (head, unseen) = row.split_at_mut(n);
        let (before, seen) = head.split_at_mut(a);
        before.fill(T::zero());
        unseen.fill(T::zero());
        let max = lane_max(seen);
        for x in seen.iter_mut() {
            *x = (*x - max).fast_exp();
        }
        let sum = lane_sum(seen);
        let inv = T::one() / sum;
        for x in seen.iter_mut() {
            *x *= inv;
        }
        max + sum.ln()
    }
}

multiversion! {
    /// The probabilities of a row again from its scores and log-sum-exp: `exp(s − lse)` on
    /// entries `a..n`, 0 elsewhere.
    fn recompute_row<T: Real>(row: &mut [T], a: usize, n: usize, lse: T) {
        let (head, unseen) = row.split_at_mut(n);
        let (before, seen) = head.split_at_mut(a);
        before.fill(T::zero());
        unseen.fill(T::zero());
        for x in seen.iter_mut() {
            *x = (*x - lse).fast_exp();
        }
    }
}

multiversion! {
    /// One row of dS = scale · P ⊙ (dP − rowsum(dO ⊙ O)), in place of dP.
    fn softmax_grad_row<T: Real>(ds: &mut [T], p: &[T], sc: T, dot: T) {
        for (x, &pj) in ds.iter_mut().zip(p) {
            *x = sc * pj * (*x - dot);
        }
    }
}

/// The log-sum-exp of every query row's scaled scores, `(b, heads, tq)` row-major.
enum Lse {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

struct AttentionOp {
    scale: f64,
    ranges: KeyRanges,
    /// Keep the row statistics for a backward.
    keep: bool,
    lse: Mutex<Option<Lse>>,
}

/// A task's view of one (batch row, query head) pair.
struct Head {
    bi: usize,
    head: usize,
    kv: usize,
}

impl AttentionOp {
    fn dims(&self, q: &Layout, k: &Layout) -> Result<Dims> {
        let (b, h, tq, hd) = q.shape().dims4()?;
        let (_, kvh, tk, _) = k.shape().dims4()?;
        Ok(Dims {
            b,
            kvh,
            groups: h / kvh,
            tq,
            tk,
            hd,
        })
    }

    fn head(task: usize, d: &Dims) -> Head {
        let (bi, head) = (task / d.heads(), task % d.heads());
        Head {
            bi,
            head,
            kv: head / d.groups,
        }
    }

    /// One block's scaled scores `sc · q_blk · k_blkᵀ` (`m × nk`) into `buf`.
    #[allow(clippy::too_many_arguments)]
    fn scores<T: Real>(
        &self,
        buf: &mut Vec<T>,
        (qh, kp): (&[T], &[T]),
        (i0, m, lo, nk): (usize, usize, usize, usize),
        hd: usize,
        par: Parallelism,
    ) -> Result<()> {
        buf.clear();
        buf.resize(m * nk, T::zero());
        product(
            (m, nk, hd),
            buf,
            nk,
            false,
            (&qh[i0 * hd..], hd, 1),
            (&kp[lo * hd..], 1, hd),
            T::of(self.scale),
            par,
        )
    }

    /// The output and the row statistics (empty unless kept).
    fn fwd<T: Real>(&self, q: &[T], k: &[T], v: &[T], d: Dims) -> Result<(Vec<T>, Vec<T>)> {
        let (tq, tk, hd, kvh, h) = (d.tq, d.tk, d.hd, d.kvh, d.heads());
        let par = d.parallelism();
        let keep = self.keep;
        // One task per (batch row, head); each writes its head's output head-major, then the
        // heads are interleaved into the token-major output.
        let per_head = (0..d.b * h)
            .into_par_iter()
            .map(|task| -> Result<(Vec<T>, Vec<T>)> {
                let Head { bi, kv, .. } = Self::head(task, &d);
                let pair = bi * kvh + kv;
                let qh = &q[task * tq * hd..(task + 1) * tq * hd];
                let kp = &k[pair * tk * hd..(pair + 1) * tk * hd];
                let vb = &v[bi * tk * kvh * hd..(bi + 1) * tk * kvh * hd];
                let mut oh = vec![T::zero(); tq * hd];
                let mut lse = vec![T::infinity(); if keep { tq } else { 0 }];
                let mut buf = Vec::new();
                for i0 in (0..tq).step_by(BLOCK_ROWS) {
                    let i1 = (i0 + BLOCK_ROWS).min(tq);
                    let (lo, nk) = self.ranges.block(bi, i0, i1, tk);
                    if nk == 0 {
                        continue; // `oh` is zero already
                    }
                    let m = i1 - i0;
                    self.scores(&mut buf, (qh, kp), (i0, m, lo, nk), hd, par)?;
                    for (r, row) in buf.chunks_exact_mut(nk).enumerate() {
                        let (a, n) = self.ranges.row(bi, i0 + r, tk);
                        let (a, n) = (a.saturating_sub(lo), n.saturating_sub(lo).min(nk));
                        if n <= a {
                            row.fill(T::zero());
                            continue;
                        }
                        let l = softmax_row(row, a, n);
                        if keep {
                            lse[i0 + r] = l;
                        }
                    }
                    product(
                        (m, hd, nk),
                        &mut oh[i0 * hd..],
                        hd,
                        false,
                        (&buf, nk, 1),
                        (&vb[(lo * kvh + kv) * hd..], kvh * hd, 1),
                        T::one(),
                        par,
                    )?;
                }
                Ok((oh, lse))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![T::zero(); d.b * tq * h * hd];
        out.par_chunks_mut(h * hd).enumerate().for_each(|(row, o)| {
            let (bi, i) = (row / tq, row % tq);
            for (head, o) in o.chunks_exact_mut(hd).enumerate() {
                o.copy_from_slice(&per_head[bi * h + head].0[i * hd..(i + 1) * hd]);
            }
        });
        let lse = if keep {
            per_head.into_iter().flat_map(|(_, l)| l).collect()
        } else {
            Vec::new()
        };
        Ok((out, lse))
    }

    /// (dq, dk, dv) from the output gradient `go`, the output `o` and the row statistics.
    fn bwd<T: Real>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        (o, go): (&[T], &[T]),
        lse: &[T],
        d: Dims,
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let (tq, tk, hd, g, kvh, h) = (d.tq, d.tk, d.hd, d.groups, d.kvh, d.heads());
        if lse.len() != d.b * h * tq {
            bail!("attention backward: the forward's row statistics do not match");
        }
        let par = d.parallelism();
        let sc = T::of(self.scale);
        let mut dq = vec![T::zero(); q.len()];
        // Per (batch row, head): its share of dk and dv (`tk × hd` each), summed over the
        // heads of a key/value head afterwards.
        let parts = dq
            .par_chunks_mut(tq * hd)
            .enumerate()
            .map(|(task, dqh)| -> Result<(Vec<T>, Vec<T>)> {
                let Head { bi, head, kv } = Self::head(task, &d);
                let pair = bi * kvh + kv;
                let qh = &q[task * tq * hd..(task + 1) * tq * hd];
                let kp = &k[pair * tk * hd..(pair + 1) * tk * hd];
                let vb = &v[bi * tk * kvh * hd..(bi + 1) * tk * kvh * hd];
                let rows = bi * tq * h * hd;
                let (ob, gb) = (&o[rows..rows + tq * h * hd], &go[rows..rows + tq * h * hd]);
                let lse = &lse[task * tq..(task + 1) * tq];
                let mut dkp = vec![T::zero(); tk * hd];
                let mut dvp = vec![T::zero(); tk * hd];
                let (mut p, mut ds) = (Vec::new(), Vec::new());
                for i0 in (0..tq).step_by(BLOCK_ROWS) {
                    let i1 = (i0 + BLOCK_ROWS).min(tq);
                    let (lo, nk) = self.ranges.block(bi, i0, i1, tk);
                    if nk == 0 {
                        continue;
                    }
                    let m = i1 - i0;
                    let orow = i0 * h * hd + head * hd;
                    self.scores(&mut p, (qh, kp), (i0, m, lo, nk), hd, par)?;
                    for (r, row) in p.chunks_exact_mut(nk).enumerate() {
                        let (a, n) = self.ranges.row(bi, i0 + r, tk);
                        let (a, n) = (a.saturating_sub(lo), n.saturating_sub(lo).min(nk));
                        if n <= a {
                            row.fill(T::zero());
                        } else {
                            recompute_row(row, a, n, lse[i0 + r]);
                        }
                    }
                    // dP = dO · Vᵀ, then dS = scale · P ⊙ (dP − rowsum(dO ⊙ O)).
                    ds.clear();
                    ds.resize(m * nk, T::zero());
                    product(
                        (m, nk, hd),
                        &mut ds,
                        nk,
                        false,
                        (&gb[orow..], h * hd, 1),
                        (&vb[(lo * kvh + kv) * hd..], 1, kvh * hd),
                        T::one(),
                        par,
                    )?;
                    for r in 0..m {
                        let at = orow + r * h * hd;
                        let dot = lane_dot(&gb[at..at + hd], &ob[at..at + hd]);
                        softmax_grad_row(
                            &mut ds[r * nk..(r + 1) * nk],
                            &p[r * nk..(r + 1) * nk],
                            sc,
                            dot,
                        );
                    }
                    // dQ = dS · K; dK += dSᵀ · Q; dV += Pᵀ · dO.
                    product(
                        (m, hd, nk),
                        &mut dqh[i0 * hd..],
                        hd,
                        false,
                        (&ds, nk, 1),
                        (&kp[lo * hd..], hd, 1),
                        T::one(),
                        par,
                    )?;
                    product(
                        (nk, hd, m),
                        &mut dkp[lo * hd..],
                        hd,
                        true,
                        (&ds, 1, nk),
                        (&qh[i0 * hd..], hd, 1),
                        T::one(),
                        par,
                    )?;
                    product(
                        (nk, hd, m),
                        &mut dvp[lo * hd..],
                        hd,
                        true,
                        (&p, 1, nk),
                        (&gb[orow..], h * hd, 1),
                        T::one(),
                        par,
                    )?;
                }
                Ok((dkp, dvp))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut dk = vec![T::zero(); k.len()];
        dk.par_chunks_mut(tk * hd)
            .enumerate()
            .for_each(|(pair, dkp)| {
                let (bi, kv) = (pair / kvh, pair % kvh);
                for grp in 0..g {
                    let part = &parts[bi * h + kv * g + grp].0;
                    for (x, y) in dkp.iter_mut().zip(part) {
                        *x += *y;
                    }
                }
            });
        let mut dv = vec![T::zero(); v.len()];
        dv.par_chunks_mut(kvh * hd)
            .enumerate()
            .for_each(|(row, dvr)| {
                let (bi, j) = (row / tk, row % tk);
                for (kv, dvr) in dvr.chunks_exact_mut(hd).enumerate() {
                    for grp in 0..g {
                        let part = &parts[bi * h + kv * g + grp].1[j * hd..(j + 1) * hd];
                        for (x, y) in dvr.iter_mut().zip(part) {
                            *x += *y;
                        }
                    }
                }
            });
        Ok((dq, dk, dv))
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "selfplay-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(ql, kl)?;
        let (out, lse) = match q {
            CpuStorage::F32(_) => {
                let (o, l) = self.fwd(slice::<f32>(q, ql)?, slice(k, kl)?, slice(v, vl)?, d)?;
                (CpuStorage::F32(o), Lse::F32(l))
            }
            CpuStorage::F64(_) => {
                let (o, l) = self.fwd(slice::<f64>(q, ql)?, slice(k, kl)?, slice(v, vl)?, d)?;
                (CpuStorage::F64(o), Lse::F64(l))
            }
            _ => bail!(
                "attention: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(q)
            ),
        };
        if self.keep {
            *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        }
        Ok((out, Shape::from((d.b * d.tq, d.heads() * d.hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        check_float(q.dtype(), "attention backward")?;
        let d = self.dims(q.layout(), k.layout())?;
        let guard = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        macro_rules! run {
            ($t:ty, $lse:expr) => {
                with_slice::<$t, _>(q, |qs| {
                    with_slice::<$t, _>(k, |ks| {
                        with_slice::<$t, _>(v, |vs| {
                            with_slice::<$t, _>(res, |os| {
                                with_slice::<$t, _>(grad, |gs| {
                                    self.bwd((qs, ks, vs), (os, gs), $lse, d)
                                })
                            })
                        })
                    })
                })?
            };
        }
        let dev = q.device();
        let (dq, dk, dv) = match (&*guard, q.dtype()) {
            (Some(Lse::F32(l)), DType::F32) => {
                let (a, b, c) = run!(f32, l);
                (
                    Tensor::from_vec(a, q.shape(), dev)?,
                    Tensor::from_vec(b, k.shape(), dev)?,
                    Tensor::from_vec(c, v.shape(), dev)?,
                )
            }
            (Some(Lse::F64(l)), DType::F64) => {
                let (a, b, c) = run!(f64, l);
                (
                    Tensor::from_vec(a, q.shape(), dev)?,
                    Tensor::from_vec(b, k.shape(), dev)?,
                    Tensor::from_vec(c, v.shape(), dev)?,
                )
            }
            _ => bail!("attention backward: the forward's row statistics are missing"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn softmax_rows_match_their_baseline_build() {
        let row: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32) / 9.0 - 5.0)
            .collect();
        let g: Vec<f32> = (0..300)
            .map(|i| ((i * 17 % 23) as f32) / 5.0 - 2.0)
            .collect();
        let (fast, base) = super::super::cpu::both_builds(|| {
            let mut p = row.clone();
            let lse = softmax_row(&mut p, 13, 217);
            let mut again = row.clone();
            recompute_row(&mut again, 13, 217, lse);
            let mut ds = g.clone();
            softmax_grad_row(&mut ds, &p, 0.125, 0.5);
            (p, again, ds)
        });
        assert!((fast.0.iter().map(|&x| x as f64).sum::<f64>() - 1.0).abs() < 1e-5);
        assert!(fast.0[..13].iter().chain(&fast.0[217..]).all(|&x| x == 0.0));
        // The backward's recomputation gives the forward's probabilities.
        let worst = fast
            .0
            .iter()
            .zip(&fast.1)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "recomputed probabilities differ by {worst}");
        assert_eq!(fast, base);
    }

    use std::sync::Arc;

    use candle_core::{Device, Var};

    use super::super::cpu::max_abs_diff;
    use super::*;

    /// Output and the gradients of Σ o ⊙ w with respect to q, k and the token-major v.
    fn run(
        mode: OpsMode,
        (q, k, v, w): (&Tensor, &Tensor, &Tensor, &Tensor),
        ranges: &KeyRanges,
    ) -> Vec<Tensor> {
        let (q, k, v) = (
            Var::from_tensor(q).unwrap(),
            Var::from_tensor(k).unwrap(),
            Var::from_tensor(v).unwrap(),
        );
        let o = attention(&q, &k, &v, 0.125, ranges, mode).unwrap();
        grads_of(o, (&q, &k, &v), w)
    }

    fn grads_of(o: Tensor, (q, k, v): (&Var, &Var, &Var), w: &Tensor) -> Vec<Tensor> {
        let grads = (&o * w).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![o];
        for x in [q, k, v] {
            out.push(grads.get(x).expect("a gradient").clone());
        }
        out
    }

    /// Every head's scores at once through candle's primitives, head-major values; output
    /// `(b·tq, heads·hd)`. What [`attention_heads`] did for prompts before it took the
    /// blocked attention; kept as the unblocked reference.
    fn composite(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        mask: &AttentionMask,
        mode: OpsMode,
    ) -> Result<Tensor> {
        let (b, h, tq, hd) = q.dims4()?;
        let kvh = k.dim(1)?;
        // Query heads sharing a key/value head are stacked along the rows: no repeat_kv.
        let qg = q.reshape((b, kvh, (h / kvh) * tq, hd))?;
        let scores = qg.matmul(&k.t()?)?;
        let p = super::super::softmax::masked_softmax(&scores, scale, mask, mode)?;
        p.matmul(v)?
            .reshape((b, h, tq, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * tq, h * hd))
    }

    /// Prompts and long appends (more query rows than the cached kernel takes) against
    /// cache views (strided: the buffer has room for more positions): the blocked attention
    /// on the CPU (fused) and through candle's primitives (the CUDA path) give what every
    /// score at once gives, with left padding, grouped heads and queries that continue a
    /// cache.
    #[test]
    fn long_queries_on_a_cache_view_match_every_score_at_once() {
        let dev = Device::Cpu;
        let cases = [
            // (b, heads, kv heads, tq, tk, offset, key_start, hd)
            (1, 8, 4, 300, 300, 0, vec![0], 64),
            (2, 4, 2, 200, 350, 150, vec![0, 7], 32),
            (1, 6, 2, 129, 140, 11, vec![0], 16),
        ];
        for (b, h, kvh, tq, tk, offset, key_start, hd) in cases {
            let mut rng = crate::policy::Rng::seed(tq as u64);
            let mut normal =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
            let q = Tensor::from_vec(normal(b * h * tq * hd), (b, h, tq, hd), &dev).unwrap();
            let cap = tk + 5;
            let view = |data: Vec<f32>| {
                Tensor::from_vec(data, (b, kvh, cap, hd), &dev)
                    .and_then(|t| t.narrow(2, 0, tk))
                    .unwrap()
            };
            let k = view(normal(b * kvh * cap * hd));
            let v = view(normal(b * kvh * cap * hd));
            assert!(!k.is_contiguous());
            let mask = AttentionMask {
                tq,
                offset,
                key_start: Arc::new(key_start),
            };
            let f64s = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
            let want = composite(
                &f64s(&q),
                &f64s(&k),
                &f64s(&v),
                0.125,
                &mask,
                OpsMode::Composite,
            )
            .unwrap();
            for mode in [OpsMode::Auto, OpsMode::Composite] {
                let got = attention_heads(&q, &k, &v, 0.125, &mask, mode).unwrap();
                assert_eq!(got.dims(), [b * tq, h * hd]);
                let diff = max_abs_diff(&f64s(&got), &want);
                assert!(
                    diff < 1e-5,
                    "{mode:?} ({b}, {h}, {kvh}, {tq}, {tk}, {offset}): {diff}"
                );
            }
        }
    }

    /// The reference: all scores at once through candle's primitives (`masked_softmax`).
    fn run_unblocked(
        (q, k, v, w): (&Tensor, &Tensor, &Tensor, &Tensor),
        mask: &AttentionMask,
    ) -> Vec<Tensor> {
        let (q, k, v) = (
            Var::from_tensor(q).unwrap(),
            Var::from_tensor(k).unwrap(),
            Var::from_tensor(v).unwrap(),
        );
        let (b, _, _, hd) = q.dims4().unwrap();
        let (_, kvh, tk, _) = k.dims4().unwrap();
        let vh = v
            .reshape((b, tk, kvh, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let o = composite(&q, &k, &vh, 0.125, mask, OpsMode::Composite).unwrap();
        grads_of(o, (&q, &k, &v), w)
    }

    /// Packed sequences (one batch row, several of them end to end) give each sequence's
    /// output and gradients as if it were alone: fused and blocked composite agree with the
    /// sequences run one by one.
    #[test]
    fn packed_sequences_match_separate_ones() {
        let dev = Device::Cpu;
        let (h, kvh, hd) = (4, 2, 8);
        let lens = [70usize, 1, 130, 33];
        let t: usize = lens.iter().sum();
        let q = Tensor::randn(0f64, 1., (1, h, t, hd), &dev).unwrap();
        let k = Tensor::randn(0f64, 1., (1, kvh, t, hd), &dev).unwrap();
        let v = Tensor::randn(0f64, 1., (t, kvh * hd), &dev).unwrap();
        let w = Tensor::randn(0f64, 1., (t, h * hd), &dev).unwrap();
        let packed = KeyRanges::packed(&lens);
        for mode in [OpsMode::Auto, OpsMode::Composite] {
            let all = run(mode, (&q, &k, &v, &w), &packed);
            let mut at = 0;
            for &n in &lens {
                let one = run(
                    mode,
                    (
                        &q.narrow(2, at, n).unwrap(),
                        &k.narrow(2, at, n).unwrap(),
                        &v.narrow(0, at, n).unwrap(),
                        &w.narrow(0, at, n).unwrap(),
                    ),
                    &KeyRanges::new(AttentionMask::causal(1, n)),
                );
                let parts = [
                    all[0].narrow(0, at, n).unwrap(),
                    all[1].narrow(2, at, n).unwrap(),
                    all[2].narrow(2, at, n).unwrap(),
                    all[3].narrow(0, at, n).unwrap(),
                ];
                for (name, (p, o)) in ["output", "dq", "dk", "dv"]
                    .iter()
                    .zip(parts.iter().zip(&one))
                {
                    let diff = max_abs_diff(p, o);
                    assert!(
                        diff < 1e-10,
                        "{mode:?}: {name} of the {n}-token sequence differs by {diff}"
                    );
                }
                at += n;
            }
        }
    }

    /// Several blocks of query rows, grouped heads, left padding, a row that sees no key,
    /// and queries that continue a cache (offset > 0): fused and composite agree in f64, and
    /// the head-major form (as with a KV cache) gives the same output.
    #[test]
    fn fused_matches_composite_in_value_and_gradient() {
        let dev = Device::Cpu;
        let cases = [
            // (b, heads, kv heads, tq, tk, offset, key_start)
            (2, 4, 2, 150, 150, 0, vec![0, 37]),
            (1, 6, 2, 20, 170, 150, vec![0]),
            (2, 2, 1, 65, 65, 0, vec![64, 0]),
            (1, 3, 3, 1, 9, 8, vec![0]),
            (3, 4, 1, 70, 70, 0, vec![0, 5, 69]),
        ];
        for (b, h, kvh, tq, tk, offset, key_start) in cases {
            let hd = 16;
            let q = Tensor::randn(0f64, 1., (b, h, tq, hd), &dev).unwrap();
            let k = Tensor::randn(0f64, 1., (b, kvh, tk, hd), &dev).unwrap();
            let v = Tensor::randn(0f64, 1., (b * tk, kvh * hd), &dev).unwrap();
            let w = Tensor::randn(0f64, 1., (b * tq, h * hd), &dev).unwrap();
            let mask = AttentionMask {
                tq,
                offset,
                key_start: Arc::new(key_start.clone()),
            };
            let ranges = KeyRanges::new(mask.clone());
            let fused = run(OpsMode::Auto, (&q, &k, &v, &w), &ranges);
            let composite = run(OpsMode::Composite, (&q, &k, &v, &w), &ranges);
            let unblocked = run_unblocked((&q, &k, &v, &w), &mask);
            let v_heads = v
                .reshape((b, tk, kvh, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let by_heads = attention_heads(&q, &k, &v_heads, 0.125, &mask, OpsMode::Auto).unwrap();
            let what = format!(
                "b {b}, heads {h}/{kvh}, tq {tq}, tk {tk}, offset {offset}, key_start {key_start:?}"
            );
            assert!(
                max_abs_diff(&by_heads, &fused[0]) < 1e-10,
                "head-major output ({what})"
            );
            for (name, ((f, c), u)) in ["output", "dq", "dk", "dv"]
                .iter()
                .zip(fused.iter().zip(&composite).zip(&unblocked))
            {
                let diff = max_abs_diff(f, c);
                assert!(diff < 1e-10, "{name} differs by {diff} ({what})");
                let diff = max_abs_diff(f, u);
                assert!(
                    diff < 1e-10,
                    "{name} differs from softmax(q·kᵀ)·v by {diff} ({what})"
                );
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 8, 16), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 3, 8, 16), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((8, 48), DType::F32, &dev).unwrap();
        let mask = KeyRanges::new(AttentionMask::causal(1, 8));
        assert!(attention(&q, &k, &v, 0.25, &mask, OpsMode::Auto).is_err());
        let k = Tensor::zeros((1, 2, 8, 16), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((8, 32), DType::F32, &dev).unwrap();
        let short = KeyRanges::new(AttentionMask::causal(1, 4));
        assert!(attention(&q, &k, &v, 0.25, &short, OpsMode::Auto).is_err());
        let v_wrong = Tensor::zeros((8, 16), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &v_wrong, 0.25, &mask, OpsMode::Auto).is_err());
        assert!(attention(&q, &k, &v, 0.25, &mask, OpsMode::Auto).is_ok());
    }
}
