//! Grouped-query attention under the causal/padding mask as one op:
//! `softmax(scale · q·kᵀ, masked) · v`.
//!
//! The composite form materialises the scores and the probabilities of every head, and
//! candle's backward then allocates a zero tensor and adds into it for each intermediate: at
//! 4 × 512 tokens that is several passes over 25 MB per layer. Fused, the forward walks
//! blocks of query rows and multiplies each only by the keys it can see (a causal block skips
//! the keys after its last row: about 40% of the products at 512 tokens), keeping the
//! probabilities for the backward, which runs the same blocks. The products go to `gemm`, the
//! crate candle's own CPU matmul uses. Values are read and the output written token-major,
//! in the layouts of the value and output projections, so no transpose or copy (and no
//! node of the backward graph) sits between them and the attention.
//!
//! Shapes: `q (b, heads, tq, hd)`, `k (b, kv_heads, tk, hd)`, `v (b·tk, kv_heads·hd)`, output
//! `(b·tq, heads·hd)`; the query heads `kv·groups .. (kv+1)·groups` share key/value head `kv`.
//! Row `i` of the queries is the position `offset + i` (see [`AttentionMask`]); a row that
//! sees no key comes out as zeros.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use super::OpsMode;
use super::cpu::{
    Real, check_float, lane_dot, lane_max, lane_sum, multiversion, product, slice, with_slice,
};
use super::softmax::{AttentionMask, masked_softmax};

/// Query rows per block: small enough that a causal block skips most of what it cannot see,
/// large enough for the products to run at GEMM speed.
const BLOCK_ROWS: usize = 64;

/// `softmax(scale · q·kᵀ under mask) · v` for token-major values `v (b·tk, kv_heads·hd)`;
/// the output is token-major, `(b·tq, heads·hd)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask,
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
    check(q, k, mask)?;
    if mode.fused(q) && q.dtype() == k.dtype() && q.dtype() == v.dtype() {
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            AttentionOp {
                scale,
                mask: mask.clone(),
                keep: q.track_op() || k.track_op() || v.track_op(),
                probs: Mutex::new(None),
            },
        );
    }
    let v = v.reshape((b, tk, kvh, hd))?.transpose(1, 2)?.contiguous()?;
    composite(q, k, &v, scale, mask, mode)
}

/// The same for head-major values `v (b, kv_heads, tk, hd)`, as a KV cache holds them
/// (strided views, so candle's primitives; copying the cache at every decoding step would
/// cost more than the fusion saves). Output `(b·tq, heads·hd)`.
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
    composite(q, k, v, scale, mask, mode)
}

/// Candle's primitives on checked, head-major inputs; output `(b·tq, heads·hd)`.
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
    // Query heads sharing a key/value head are stacked along the rows: no repeat_kv copy.
    let qg = q.reshape((b, kvh, (h / kvh) * tq, hd))?;
    let scores = qg.matmul(&k.t()?)?;
    let p = masked_softmax(&scores, scale, mask, mode)?;
    p.matmul(v)?
        .reshape((b, h, tq, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * tq, h * hd))
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

    /// gemm's own threads when there are fewer batch rows than workers.
    fn parallelism(&self) -> Parallelism {
        if self.b >= rayon::current_num_threads() {
            Parallelism::None
        } else {
            Parallelism::Rayon(0)
        }
    }
}

/// One block of query rows of one query head: rows `i0..i1` see keys `lo..lo + nk` at most.
struct Block {
    group: usize,
    i0: usize,
    i1: usize,
    lo: usize,
    nk: usize,
}

impl AttentionMask {
    /// The blocks of batch row `bi`, in the order their probabilities are stored.
    fn blocks(&self, bi: usize, d: &Dims) -> Vec<Block> {
        let lo = self.key_start[bi];
        let mut out = Vec::new();
        for group in 0..d.groups {
            for i0 in (0..d.tq).step_by(BLOCK_ROWS) {
                let i1 = (i0 + BLOCK_ROWS).min(d.tq);
                let hi = (self.offset + i1).min(d.tk);
                out.push(Block {
                    group,
                    i0,
                    i1,
                    lo,
                    nk: hi.saturating_sub(lo),
                });
            }
        }
        out
    }

    /// Keys row `i` sees, counted from the block's first key.
    fn visible(&self, i: usize, block: &Block, tk: usize) -> usize {
        ((self.offset + i + 1).min(tk))
            .saturating_sub(block.lo)
            .min(block.nk)
    }
}

multiversion! {
    /// Softmax over the first `n` entries of `row`; the rest (keys the row cannot see) become 0.
    fn softmax_row<T: Real>(row: &mut [T], n: usize) {
        let (seen, unseen) = row.split_at_mut(n);
        let max = lane_max(seen);
        for x in seen.iter_mut() {
            *x = (*x - max).fast_exp();
        }
        let inv = T::one() / lane_sum(seen);
        for x in seen.iter_mut() {
            *x *= inv;
        }
        unseen.fill(T::zero());
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

/// The probabilities of the forward: one vector per (batch row, kv head), blocks in order,
/// each block `(i1 − i0) × nk`.
enum Probs {
    F32(Vec<Vec<f32>>),
    F64(Vec<Vec<f64>>),
}

struct AttentionOp {
    scale: f64,
    mask: AttentionMask,
    /// Keep the probabilities for a backward; without one, a block's buffer is reused.
    keep: bool,
    probs: Mutex<Option<Probs>>,
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

    /// The output and, per (batch row, kv head) pair in order, the kept probabilities.
    fn fwd<T: Real>(&self, q: &[T], k: &[T], v: &[T], d: Dims) -> Result<(Vec<T>, Vec<Vec<T>>)> {
        let (tq, tk, hd, g, kvh, h) = (d.tq, d.tk, d.hd, d.groups, d.kvh, d.heads());
        let par = d.parallelism();
        let sc = T::of(self.scale);
        let mut out = vec![T::zero(); d.b * tq * h * hd];
        let per_row = out
            .par_chunks_mut(tq * h * hd)
            .enumerate()
            .map(|(bi, ob)| -> Result<Vec<Vec<T>>> {
                let vb = &v[bi * tk * kvh * hd..(bi + 1) * tk * kvh * hd];
                let blocks = self.mask.blocks(bi, &d);
                let mut per_pair = Vec::with_capacity(kvh);
                for kv in 0..kvh {
                    let pair = bi * kvh + kv;
                    let qp = &q[pair * g * tq * hd..(pair + 1) * g * tq * hd];
                    let kp = &k[pair * tk * hd..(pair + 1) * tk * hd];
                    let kept: usize = if self.keep {
                        blocks.iter().map(|b| (b.i1 - b.i0) * b.nk).sum()
                    } else {
                        0
                    };
                    let mut saved = Vec::with_capacity(kept);
                    for blk in &blocks {
                        let (m, nk) = (blk.i1 - blk.i0, blk.nk);
                        if nk == 0 {
                            continue; // `out` is zero already
                        }
                        if !self.keep {
                            saved.clear();
                        }
                        let start = saved.len();
                        saved.resize(start + m * nk, T::zero());
                        let p = &mut saved[start..];
                        product(
                            (m, nk, hd),
                            p,
                            nk,
                            false,
                            (&qp[(blk.group * tq + blk.i0) * hd..], hd, 1),
                            (&kp[blk.lo * hd..], 1, hd),
                            sc,
                            par,
                        )?;
                        for (r, row) in p.chunks_exact_mut(nk).enumerate() {
                            let n = self.mask.visible(blk.i0 + r, blk, tk);
                            if n == 0 {
                                row.fill(T::zero());
                                continue;
                            }
                            softmax_row(row, n);
                        }
                        let head = kv * g + blk.group;
                        product(
                            (m, hd, nk),
                            &mut ob[(blk.i0 * h + head) * hd..],
                            h * hd,
                            false,
                            (p, nk, 1),
                            (&vb[(blk.lo * kvh + kv) * hd..], kvh * hd, 1),
                            T::one(),
                            par,
                        )?;
                    }
                    per_pair.push(saved);
                }
                Ok(per_pair)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((out, per_row.into_iter().flatten().collect()))
    }

    /// (dq, dk, dv) from the output gradient `go`, the output `o` and the saved probabilities.
    fn bwd<T: Real>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        (o, go): (&[T], &[T]),
        probs: &[Vec<T>],
        d: Dims,
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let (tq, tk, hd, g, kvh, h) = (d.tq, d.tk, d.hd, d.groups, d.kvh, d.heads());
        let par = d.parallelism();
        let sc = T::of(self.scale);
        let mut dq = vec![T::zero(); q.len()];
        let mut dk = vec![T::zero(); k.len()];
        let mut dv = vec![T::zero(); v.len()];
        let row_span = tq * h * hd;
        dq.par_chunks_mut(h * tq * hd)
            .zip(
                dk.par_chunks_mut(kvh * tk * hd)
                    .zip(dv.par_chunks_mut(tk * kvh * hd)),
            )
            .enumerate()
            .try_for_each(|(bi, (dqb, (dkb, dvb)))| -> Result<()> {
                let (ob, gb) = (
                    &o[bi * row_span..(bi + 1) * row_span],
                    &go[bi * row_span..(bi + 1) * row_span],
                );
                let vb = &v[bi * tk * kvh * hd..(bi + 1) * tk * kvh * hd];
                let blocks = self.mask.blocks(bi, &d);
                let mut ds = Vec::new();
                for kv in 0..kvh {
                    let pair = bi * kvh + kv;
                    let qp = &q[pair * g * tq * hd..(pair + 1) * g * tq * hd];
                    let kp = &k[pair * tk * hd..(pair + 1) * tk * hd];
                    let dqp = &mut dqb[kv * g * tq * hd..(kv + 1) * g * tq * hd];
                    let dkp = &mut dkb[kv * tk * hd..(kv + 1) * tk * hd];
                    let saved = &probs[pair];
                    let mut at = 0;
                    for blk in &blocks {
                        let (m, nk) = (blk.i1 - blk.i0, blk.nk);
                        if nk == 0 {
                            continue;
                        }
                        let head = kv * g + blk.group;
                        let qrow = (blk.group * tq + blk.i0) * hd;
                        let orow = (blk.i0 * h + head) * hd;
                        let vrow = (blk.lo * kvh + kv) * hd;
                        let p = saved.get(at..at + m * nk).ok_or_else(|| {
                            candle_core::Error::Msg(
                                "attention: saved probabilities do not match".into(),
                            )
                        })?;
                        at += m * nk;
                        // dP = dO · Vᵀ, then dS = scale · P ⊙ (dP − rowsum(dO ⊙ O)).
                        ds.clear();
                        ds.resize(m * nk, T::zero());
                        product(
                            (m, nk, hd),
                            &mut ds,
                            nk,
                            false,
                            (&gb[orow..], h * hd, 1),
                            (&vb[vrow..], 1, kvh * hd),
                            T::one(),
                            par,
                        )?;
                        for r in 0..m {
                            let at_row = orow + r * h * hd;
                            let dot = lane_dot(&gb[at_row..at_row + hd], &ob[at_row..at_row + hd]);
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
                            &mut dqp[qrow..],
                            hd,
                            false,
                            (&ds, nk, 1),
                            (&kp[blk.lo * hd..], hd, 1),
                            T::one(),
                            par,
                        )?;
                        product(
                            (nk, hd, m),
                            &mut dkp[blk.lo * hd..],
                            hd,
                            true,
                            (&ds, 1, nk),
                            (&qp[qrow..], hd, 1),
                            T::one(),
                            par,
                        )?;
                        product(
                            (nk, hd, m),
                            &mut dvb[vrow..],
                            kvh * hd,
                            true,
                            (p, 1, nk),
                            (&gb[orow..], h * hd, 1),
                            T::one(),
                            par,
                        )?;
                    }
                }
                Ok(())
            })?;
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
        let (out, probs) = match q {
            CpuStorage::F32(_) => {
                let (o, p) = self.fwd(slice::<f32>(q, ql)?, slice(k, kl)?, slice(v, vl)?, d)?;
                (CpuStorage::F32(o), Probs::F32(p))
            }
            CpuStorage::F64(_) => {
                let (o, p) = self.fwd(slice::<f64>(q, ql)?, slice(k, kl)?, slice(v, vl)?, d)?;
                (CpuStorage::F64(o), Probs::F64(p))
            }
            _ => bail!(
                "attention: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(q)
            ),
        };
        if self.keep {
            *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = Some(probs);
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
        let guard = self.probs.lock().unwrap_or_else(|e| e.into_inner());
        macro_rules! run {
            ($t:ty, $probs:expr) => {
                with_slice::<$t, _>(q, |qs| {
                    with_slice::<$t, _>(k, |ks| {
                        with_slice::<$t, _>(v, |vs| {
                            with_slice::<$t, _>(res, |os| {
                                with_slice::<$t, _>(grad, |gs| {
                                    self.bwd((qs, ks, vs), (os, gs), $probs, d)
                                })
                            })
                        })
                    })
                })?
            };
        }
        let dev = q.device();
        let (dq, dk, dv) = match (&*guard, q.dtype()) {
            (Some(Probs::F32(p)), DType::F32) => {
                let (a, b, c) = run!(f32, p);
                (
                    Tensor::from_vec(a, q.shape(), dev)?,
                    Tensor::from_vec(b, k.shape(), dev)?,
                    Tensor::from_vec(c, v.shape(), dev)?,
                )
            }
            (Some(Probs::F64(p)), DType::F64) => {
                let (a, b, c) = run!(f64, p);
                (
                    Tensor::from_vec(a, q.shape(), dev)?,
                    Tensor::from_vec(b, k.shape(), dev)?,
                    Tensor::from_vec(c, v.shape(), dev)?,
                )
            }
            _ => bail!("attention backward: the forward's probabilities are missing"),
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
            softmax_row(&mut p, 217);
            let mut ds = g.clone();
            softmax_grad_row(&mut ds, &p, 0.125, 0.5);
            (p, ds)
        });
        assert!((fast.0.iter().map(|&x| x as f64).sum::<f64>() - 1.0).abs() < 1e-5);
        assert!(fast.0[217..].iter().all(|&x| x == 0.0));
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
        mask: &AttentionMask,
    ) -> Vec<Tensor> {
        let (q, k, v) = (
            Var::from_tensor(q).unwrap(),
            Var::from_tensor(k).unwrap(),
            Var::from_tensor(v).unwrap(),
        );
        let o = attention(&q, &k, &v, 0.125, mask, mode).unwrap();
        let grads = (&o * w).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![o];
        for x in [&q, &k, &v] {
            out.push(grads.get(x).expect("a gradient").clone());
        }
        out
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
            let fused = run(OpsMode::Auto, (&q, &k, &v, &w), &mask);
            let composite = run(OpsMode::Composite, (&q, &k, &v, &w), &mask);
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
            for (name, (f, c)) in ["output", "dq", "dk", "dv"]
                .iter()
                .zip(fused.iter().zip(&composite))
            {
                let diff = max_abs_diff(f, c);
                assert!(diff < 1e-10, "{name} differs by {diff} ({what})");
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 8, 16), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 3, 8, 16), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((8, 48), DType::F32, &dev).unwrap();
        let mask = AttentionMask::causal(1, 8);
        assert!(attention(&q, &k, &v, 0.25, &mask, OpsMode::Auto).is_err());
        let k = Tensor::zeros((1, 2, 8, 16), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((8, 32), DType::F32, &dev).unwrap();
        let short = AttentionMask::causal(1, 4);
        assert!(attention(&q, &k, &v, 0.25, &short, OpsMode::Auto).is_err());
        let v_wrong = Tensor::zeros((8, 16), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &v_wrong, 0.25, &mask, OpsMode::Auto).is_err());
        assert!(attention(&q, &k, &v, 0.25, &mask, OpsMode::Auto).is_ok());
    }
}
