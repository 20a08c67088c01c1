//! Log-probability of the target token and entropy of each row of logits, in one pass; and
//! the same from hidden states through the LM head without the full logits tensor.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor, bail,
};
use gemm::Parallelism;
use rayon::prelude::*;

use super::OpsMode;
use super::cpu::{
    Real, check_float, lane_exp_sums, lane_max, multiversion, product, product_new, rows_per_task,
    side_by_side, slice, with_slice,
};
use super::linear::linear;

mod blocked;

/// For `logits: (n, vocab)` and `targets: (n,)` (u32), returns `(n, 2)`: column 0 is
/// `log softmax(logits)[target]`, column 1 the entropy of `softmax(logits)`. Both are in f32
/// for half-precision logits (f64 for f64): a bf16 log-prob would quantise the GRPO ratio by
/// 1–3%. Only the log-probs are differentiable: the entropy is a reported figure that no
/// loss uses, so it is detached (see [`detach_entropy`]).
pub fn token_logprobs_entropy(logits: &Tensor, targets: &Tensor, mode: OpsMode) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        bail!(
            "token_logprobs: targets {:?} {:?} do not match logits {:?}",
            targets.dims(),
            targets.dtype(),
            logits.dims()
        );
    }
    check_targets(targets, v)?;
    if mode.fused(logits) {
        detach_entropy(
            &logits
                .contiguous()?
                .apply_op2(&targets.contiguous()?, LogprobOp)?,
        )
    } else {
        let dtype = logits.dtype();
        let z = logits.to_dtype(if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        })?;
        let max = z.max_keepdim(D::Minus1)?.detach();
        let zs = z.broadcast_sub(&max)?;
        let lse = zs.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let logp = zs.broadcast_sub(&lse)?;
        let target_lp = logp.gather(&targets.reshape((n, 1))?, 1)?;
        // From the detached log-probs: under autograd, `exp(logp)` and `p · logp` would be
        // two more (n, vocab) tensors kept alive until the backward.
        let logp = logp.detach();
        let entropy = (logp.exp()? * &logp)?.sum_keepdim(D::Minus1)?.neg()?;
        Tensor::cat(&[&target_lp, &entropy], 1)
    }
}

/// `out (n, 2)` (log-probs, entropies) with the entropy column cut from the graph. The
/// trainers differentiate only the log-probs; a differentiable entropy would only make the
/// backward carry (and the composite path keep) work for a gradient that is always zero.
/// The fused ops' backward still accepts an entropy gradient; after this it is always zero.
fn detach_entropy(out: &Tensor) -> Result<Tensor> {
    if !out.track_op() {
        return Ok(out.clone());
    }
    Tensor::cat(&[&out.narrow(1, 0, 1)?, &out.narrow(1, 1, 1)?.detach()], 1)
}

fn check_targets(targets: &Tensor, v: usize) -> Result<()> {
    if targets.elem_count() == 0 {
        return Ok(());
    }
    let max_target = targets.max(0)?.to_scalar::<u32>()?;
    if max_target as usize >= v {
        bail!("token_logprobs: target id {max_target} is outside the vocabulary of {v}");
    }
    Ok(())
}

struct LogprobOp;

fn fwd<T: Real>(z: &[T], t: &[u32], v: usize) -> Vec<T> {
    let n = t.len();
    let mut out = vec![T::zero(); 2 * n];
    let per = rows_per_task(n, v);
    out.par_chunks_mut(2 * per)
        .zip(z.par_chunks(per * v).zip(t.par_chunks(per)))
        .for_each(|(o, (z, t))| fwd_rows(o, z, t, v));
    out
}

multiversion! {
    /// [`fwd`] for a few rows.
    fn fwd_rows<T: Real>(o: &mut [T], z: &[T], t: &[u32], v: usize) {
        for ((o, z), &t) in o.chunks_exact_mut(2).zip(z.chunks_exact(v)).zip(t) {
            let max = lane_max(z);
            let (sum, wsum) = lane_exp_sums(z, max);
            let lse = sum.ln();
            o[0] = T::of((z[t as usize] - max).f64() - lse);
            // H = lse − Σ p·(z − max)
            o[1] = T::of(lse - wsum / sum);
        }
    }
}

/// dz = g_lp·(onehot − p) − g_H·p·(log p + H), with log p = z − (z_t − logp_t) from the
/// forward's output (no second reduction).
fn bwd<T: Real>(z: &[T], t: &[u32], res: &[T], g: &[T], v: usize) -> Vec<T> {
    let n = t.len();
    let mut dz = vec![T::zero(); n * v];
    let per = rows_per_task(n, v);
    dz.par_chunks_mut(per * v)
        .zip(
            z.par_chunks(per * v).zip(
                t.par_chunks(per)
                    .zip(g.par_chunks(2 * per).zip(res.par_chunks(2 * per))),
            ),
        )
        .for_each(|(dz, (z, (t, (g, res))))| bwd_rows(dz, z, t, g, res, v));
    dz
}

multiversion! {
    /// [`bwd`] for a few rows.
    fn bwd_rows<T: Real>(dz: &mut [T], z: &[T], t: &[u32], g: &[T], res: &[T], v: usize) {
        for (((dz, z), &t), (g, res)) in dz
            .chunks_exact_mut(v)
            .zip(z.chunks_exact(v))
            .zip(t)
            .zip(g.chunks_exact(2).zip(res.chunks_exact(2)))
        {
            let (g_lp, g_h) = (g[0], g[1]);
            let lse = z[t as usize] - res[0];
            let h = res[1];
            for (dz, &x) in dz.iter_mut().zip(z) {
                let logp = x - lse;
                let p = logp.fast_exp();
                *dz = -g_lp * p - g_h * p * (logp + h);
            }
            dz[t as usize] += g_lp;
        }
    }
}

impl CustomOp2 for LogprobOp {
    fn name(&self) -> &'static str {
        "selfplay-token-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let t = slice::<u32>(s2, l2)?;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(fwd(slice::<f32>(s1, l1)?, t, v)),
            CpuStorage::F64(_) => CpuStorage::F64(fwd(slice::<f64>(s1, l1)?, t, v)),
            _ => bail!(
                "token_logprobs: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(s1)
            ),
        };
        Ok((out, Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        check_float(z.dtype(), "token_logprobs backward")?;
        let (_n, v) = z.dims2()?;
        let dz = with_slice::<u32, _>(t, |ts| {
            if z.dtype() == DType::F32 {
                with_slice::<f32, _>(z, |zs| {
                    with_slice::<f32, _>(g, |gs| {
                        with_slice::<f32, _>(res, |rs| {
                            Tensor::from_vec(bwd(zs, ts, rs, gs, v), z.shape(), z.device())
                        })
                    })
                })
            } else {
                with_slice::<f64, _>(z, |zs| {
                    with_slice::<f64, _>(g, |gs| {
                        with_slice::<f64, _>(res, |rs| {
                            Tensor::from_vec(bwd(zs, ts, rs, gs, v), z.shape(), z.device())
                        })
                    })
                })
            }
        })?;
        Ok((Some(dz), None))
    }
}

/// [`token_logprobs_entropy`] of `hidden (n, d) · headᵀ` for `head: (vocab, d)`, without
/// the `(n, vocab)` logits as one tensor. As there, only the log-probs are differentiable.
///
/// The logits of a training batch are the largest tensors of the step (2 048 × 8 192 floats
/// for the benchmark model, 67 MB; 1.2 GB at Qwen2's vocabulary, 9.7 GB at 16k tokens), and
/// candle's backward adds a zero tensor and a gradient of the same size. Here they are made
/// and used a block of rows at a time; for the backward the first blocks are kept, up to
/// [`KEEP_ELEMS`] logits, and the others recomputed from the hidden rows and the head (one
/// more product per block), so memory stays bounded however many rows there are. The
/// backward turns each block's logit gradient into the hidden and head gradients at once.
/// Other devices run the same blocks with candle's primitives (`blocked`), always
/// recomputing.
pub fn lm_head_logprobs(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    mode: OpsMode,
) -> Result<Tensor> {
    let (n, d) = hidden.dims2()?;
    let (v, d2) = head.dims2()?;
    if d != d2 || targets.dims() != [n] || targets.dtype() != DType::U32 {
        bail!(
            "lm_head_logprobs: hidden {:?}, head {:?} and targets {:?} {:?} do not fit",
            hidden.dims(),
            head.dims(),
            targets.dims(),
            targets.dtype()
        );
    }
    if n == 0 {
        return token_logprobs_entropy(&linear(hidden, head, None, mode)?, targets, mode);
    }
    if !(mode.fused(hidden) && head.dtype() == hidden.dtype()) {
        check_targets(targets, v)?;
        return blocked::lm_head_logprobs(hidden, head, targets);
    }
    check_targets(targets, v)?;
    let keep = hidden.track_op() || head.track_op();
    lm_head_fused(hidden, head, targets, keep.then_some(KEEP_ELEMS))
}

/// The CPU op, keeping at most `keep` logits for a backward (`None`: no backward).
fn lm_head_fused(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    keep: Option<usize>,
) -> Result<Tensor> {
    detach_entropy(&hidden.contiguous()?.apply_op3(
        &head.contiguous()?,
        &targets.contiguous()?,
        LmHeadOp {
            keep,
            logits: Mutex::new(None),
        },
    )?)
}

/// Logit elements per block of rows: a few MB, so blocks come from the heap and are reused
/// from step to step instead of being fresh pages each time.
const BLOCK_ELEMS: usize = 1 << 21;

/// Logits kept for the backward at most (64 MiB in f32): below it, a short batch's backward
/// skips the recompute; above it, blocks are recomputed and memory stops growing.
const KEEP_ELEMS: usize = 1 << 24;

fn block_rows(v: usize) -> usize {
    (BLOCK_ELEMS / v.max(1)).clamp(16, 1024)
}

enum Blocks {
    F32(Vec<Vec<f32>>),
    F64(Vec<Vec<f64>>),
}

struct LmHeadOp {
    /// Keep each block's logits for the backward.
    keep: Option<usize>,
    logits: Mutex<Option<Blocks>>,
}

fn head_fwd<T: Real>(
    h: &[T],
    w: &[T],
    t: &[u32],
    (n, d, v): (usize, usize, usize),
    keep: Option<usize>,
) -> Result<(Vec<T>, Vec<Vec<T>>)> {
    let rows = block_rows(v);
    let mut out = Vec::with_capacity(2 * n);
    let mut kept = Vec::new();
    let mut kept_elems = 0;
    for r0 in (0..n).step_by(rows) {
        let m = rows.min(n - r0);
        let z = product_new(
            (m, v, d),
            (&h[r0 * d..], d, 1),
            (w, 1, d),
            T::one(),
            Parallelism::Rayon(0),
        )?;
        out.extend(fwd(&z, &t[r0..r0 + m], v));
        if keep.is_some_and(|most| kept_elems + z.len() <= most) {
            kept_elems += z.len();
            kept.push(z);
        }
    }
    Ok((out, kept))
}

/// (dh, dw) from the gradient `g (n, 2)` of the output `res (n, 2)`.
#[allow(clippy::too_many_arguments)]
fn head_bwd<T: Real>(
    h: &[T],
    w: &[T],
    t: &[u32],
    res: &[T],
    g: &[T],
    logits: &[Vec<T>],
    (n, d, v): (usize, usize, usize),
) -> Result<(Vec<T>, Vec<T>)> {
    let rows = block_rows(v);
    let mut dh = vec![T::zero(); n * d];
    let mut dw = vec![T::zero(); v * d];
    for (bi, r0) in (0..n).step_by(rows).enumerate() {
        let m = rows.min(n - r0);
        let recomputed;
        let z = match logits.get(bi) {
            Some(z) if z.len() == m * v => z,
            Some(_) => bail!("lm_head_logprobs: the forward's logits do not match"),
            None => {
                recomputed = product_new(
                    (m, v, d),
                    (&h[r0 * d..], d, 1),
                    (w, 1, d),
                    T::one(),
                    Parallelism::Rayon(0),
                )?;
                &recomputed
            }
        };
        let dz = bwd(
            z,
            &t[r0..r0 + m],
            &res[2 * r0..2 * (r0 + m)],
            &g[2 * r0..2 * (r0 + m)],
            v,
        );
        let dh_rows = &mut dh[r0 * d..];
        let dw = &mut dw;
        side_by_side(
            m * d * v >= 64 * 64 * 64,
            |par| {
                product(
                    (m, d, v),
                    dh_rows,
                    d,
                    false,
                    (&dz, v, 1),
                    (w, d, 1),
                    T::one(),
                    par,
                )
            },
            |par| {
                let h_rows = (&h[r0 * d..], d, 1);
                product((v, d, m), dw, d, bi > 0, (&dz, 1, v), h_rows, T::one(), par)
            },
        )?;
    }
    Ok((dh, dw))
}

impl CustomOp3 for LmHeadOp {
    fn name(&self) -> &'static str {
        "selfplay-lm-head-logprob"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        hl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d) = hl.shape().dims2()?;
        let (v, _) = wl.shape().dims2()?;
        let t = slice::<u32>(t, tl)?;
        let (out, kept) = match h {
            CpuStorage::F32(_) => {
                let (o, k) =
                    head_fwd(slice::<f32>(h, hl)?, slice(w, wl)?, t, (n, d, v), self.keep)?;
                (CpuStorage::F32(o), Blocks::F32(k))
            }
            CpuStorage::F64(_) => {
                let (o, k) =
                    head_fwd(slice::<f64>(h, hl)?, slice(w, wl)?, t, (n, d, v), self.keep)?;
                (CpuStorage::F64(o), Blocks::F64(k))
            }
            _ => bail!(
                "lm_head_logprobs: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(h)
            ),
        };
        if self.keep.is_some() {
            *self.logits.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
        }
        Ok((out, Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        t: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        check_float(h.dtype(), "lm_head_logprobs backward")?;
        let (n, d) = h.dims2()?;
        let (v, _) = w.dims2()?;
        let guard = self.logits.lock().unwrap_or_else(|e| e.into_inner());
        macro_rules! run {
            ($ty:ty, $blocks:expr) => {
                with_slice::<u32, _>(t, |ts| {
                    with_slice::<$ty, _>(h, |hs| {
                        with_slice::<$ty, _>(w, |ws| {
                            with_slice::<$ty, _>(res, |rs| {
                                with_slice::<$ty, _>(g, |gs| {
                                    let (dh, dw) =
                                        head_bwd(hs, ws, ts, rs, gs, $blocks, (n, d, v))?;
                                    Ok((
                                        Tensor::from_vec(dh, h.shape(), h.device())?,
                                        Tensor::from_vec(dw, w.shape(), w.device())?,
                                    ))
                                })
                            })
                        })
                    })
                })?
            };
        }
        let (dh, dw) = match (&*guard, h.dtype()) {
            (Some(Blocks::F32(b)), DType::F32) => run!(f32, b),
            (Some(Blocks::F64(b)), DType::F64) => run!(f64, b),
            _ => bail!("lm_head_logprobs backward: the forward's logits were not kept"),
        };
        Ok((Some(dh), Some(dw), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::super::cpu::max_abs_diff;
    use super::*;

    /// The AVX builds of the row kernels give the baseline build's results bit for bit (the
    /// lanes fix the order of every sum, and nothing is fused into an FMA).
    #[test]
    fn row_kernels_match_their_baseline_build() {
        let (n, v) = (5, 1000);
        let z: Vec<f32> = (0..n * v)
            .map(|i| ((i * 7919 % 2003) as f32) / 97.0 - 10.0)
            .collect();
        let t: Vec<u32> = (0..n as u32).map(|i| i * 131 % v as u32).collect();
        let (fast, base) = super::super::cpu::both_builds(|| {
            let mut o = vec![0f32; 2 * n];
            fwd_rows(&mut o, &z, &t, v);
            let g: Vec<f32> = (0..2 * n).map(|i| 0.3 - 0.1 * i as f32).collect();
            let mut dz = vec![0f32; n * v];
            bwd_rows(&mut dz, &z, &t, &g, &o, v);
            (o, dz)
        });
        assert!(fast.0.iter().chain(&fast.1).all(|x| x.is_finite()));
        assert_eq!(fast, base);
    }

    /// How the head's log-probs are computed in a test.
    #[derive(Clone, Copy, Debug)]
    enum Path {
        /// The fused CPU op, keeping this many logits for the backward.
        Fused(usize),
        /// The blocked candle primitives (the CUDA path).
        Blocked,
        /// Full logits, then log-probs through candle's primitives.
        Plain,
        /// Full logits, then log-probs through the fused CPU op.
        PlainFused,
    }

    /// Values and the gradients of Σ out ⊙ r for hidden and head, over several blocks.
    fn run(path: Path, h: &Tensor, w: &Tensor, t: &Tensor, r: &Tensor) -> Vec<Tensor> {
        let (h, w) = (Var::from_tensor(h).unwrap(), Var::from_tensor(w).unwrap());
        let out = match path {
            Path::Fused(keep) => lm_head_fused(&h, &w, t, Some(keep)).unwrap(),
            Path::Blocked => lm_head_logprobs(&h, &w, t, OpsMode::Composite).unwrap(),
            Path::Plain | Path::PlainFused => {
                let logits = h.matmul(&w.t().unwrap()).unwrap();
                let mode = match path {
                    Path::Plain => OpsMode::Composite,
                    _ => OpsMode::Auto,
                };
                token_logprobs_entropy(&logits, t, mode).unwrap()
            }
        };
        let grads = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
        // No gradient at all counts as a zero one (a loss that reaches no input).
        let grad = |v: &Var| {
            grads
                .get(v)
                .cloned()
                .unwrap_or_else(|| v.zeros_like().unwrap())
        };
        vec![out.detach(), grad(&h), grad(&w)]
    }

    /// Every path gives the plain computation's values and gradients, whether the fused op
    /// keeps all its logits, some (the later blocks recomputed) or none.
    #[test]
    fn fused_head_matches_logits_then_logprobs() {
        let dev = Device::Cpu;
        // 4 096 columns: 512 rows per block, so 1 100 rows make three blocks.
        for (n, d, v) in [(1100, 24, 4096), (3, 8, 50)] {
            let h = Tensor::randn(0f64, 1., (n, d), &dev).unwrap();
            let w = Tensor::randn(0f64, 0.3, (v, d), &dev).unwrap();
            let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
            let t = Tensor::from_vec(ids, n, &dev).unwrap();
            let r = Tensor::randn(0f64, 1., (n, 2), &dev).unwrap();
            let plain = run(Path::Plain, &h, &w, &t, &r);
            for path in [
                Path::Fused(KEEP_ELEMS),
                Path::Fused(512 * 4096),
                Path::Fused(0),
                Path::Blocked,
                Path::PlainFused,
            ] {
                let other = run(path, &h, &w, &t, &r);
                for (i, (a, b)) in other.iter().zip(&plain).enumerate() {
                    let diff = max_abs_diff(a, b);
                    assert!(
                        diff < 1e-9,
                        "{path:?}: tensor {i} of ({n}, {d}, {v}) differs by {diff}"
                    );
                }
            }
        }
    }

    /// The entropy is a reported figure, never differentiated: on every path a loss of the
    /// entropies alone gives the inputs no gradient, and a loss weighing both columns gives
    /// exactly the gradients of its log-prob part. (Were the entropy in the graph, both would
    /// fail, and its backward would cost a block-sized term per block of rows.)
    #[test]
    fn entropy_carries_no_gradient_on_any_path() {
        let dev = Device::Cpu;
        // Several blocks of rows on the fused and blocked paths (see the test above).
        let (n, d, v) = (1100, 24, 4096);
        let h = Tensor::randn(0f64, 1., (n, d), &dev).unwrap();
        let w = Tensor::randn(0f64, 0.3, (v, d), &dev).unwrap();
        let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
        let t = Tensor::from_vec(ids, n, &dev).unwrap();
        let r = Tensor::randn(0f64, 1., (n, 2), &dev).unwrap();
        let zero = Tensor::zeros((n, 1), DType::F64, &dev).unwrap();
        let lp_only = Tensor::cat(&[&r.narrow(1, 0, 1).unwrap(), &zero], 1).unwrap();
        let entropy_only = Tensor::cat(&[&zero, &r.narrow(1, 1, 1).unwrap()], 1).unwrap();
        for path in [
            Path::Fused(KEEP_ELEMS),
            Path::Fused(0),
            Path::Blocked,
            Path::Plain,
            Path::PlainFused,
        ] {
            let both = run(path, &h, &w, &t, &r);
            let lp = run(path, &h, &w, &t, &lp_only);
            let ent = run(path, &h, &w, &t, &entropy_only);
            for i in 1..3 {
                let diff = max_abs_diff(&both[i], &lp[i]);
                assert!(
                    diff == 0.0,
                    "{path:?}: the entropy moved gradient {i} by {diff}"
                );
                let zeros = ent[i].zeros_like().unwrap();
                let g = max_abs_diff(&ent[i], &zeros);
                assert!(
                    g == 0.0,
                    "{path:?}: the entropy has a gradient {i} of size {g}"
                );
            }
            // And the entropies are still computed.
            let h_col = both[0].narrow(1, 1, 1).unwrap();
            assert!(h_col.min_all().unwrap().to_scalar::<f64>().unwrap() > 0.0);
        }
    }

    #[test]
    fn out_of_vocabulary_targets_are_an_error() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((10, 4), DType::F32, &dev).unwrap();
        let t = Tensor::from_vec(vec![3u32, 10], 2, &dev).unwrap();
        assert!(lm_head_logprobs(&h, &w, &t, OpsMode::Auto).is_err());
    }
}
