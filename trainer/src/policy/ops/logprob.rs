//! Log-probability of the target token and entropy of each row of logits, in one pass.

use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::OpsMode;
use super::cpu::{Real, check_float, lane_exp_sums, lane_max, rows_per_task, slice, with_slice};

/// For `logits: (n, vocab)` and `targets: (n,)` (u32), returns `(n, 2)`: column 0 is
/// `log softmax(logits)[target]`, column 1 the entropy of `softmax(logits)`. Both columns
/// are differentiable.
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
    let max_target = targets.max(0)?.to_scalar::<u32>().unwrap_or(0);
    if n > 0 && max_target as usize >= v {
        bail!("token_logprobs: target id {max_target} is outside the vocabulary of {v}");
    }
    if mode.fused(logits) {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, LogprobOp)
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
        let entropy = (logp.exp()? * &logp)?.sum_keepdim(D::Minus1)?.neg()?;
        Tensor::cat(&[&target_lp, &entropy], 1)?.to_dtype(dtype)
    }
}

struct LogprobOp;

fn fwd<T: Real>(z: &[T], t: &[u32], v: usize) -> Vec<T> {
    let n = t.len();
    let mut out = vec![T::zero(); 2 * n];
    let per = rows_per_task(n, v);
    out.par_chunks_mut(2 * per)
        .zip(z.par_chunks(per * v).zip(t.par_chunks(per)))
        .for_each(|(o, (z, t))| {
            for ((o, z), &t) in o.chunks_exact_mut(2).zip(z.chunks_exact(v)).zip(t) {
                let max = lane_max(z);
                let (sum, wsum) = lane_exp_sums(z, max);
                let lse = sum.ln();
                o[0] = T::of((z[t as usize] - max).f64() - lse);
                // H = lse − Σ p·(z − max)
                o[1] = T::of(lse - wsum / sum);
            }
        });
    out
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
        .for_each(|(dz, (z, (t, (g, res))))| {
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
        });
    dz
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
