//! RMSNorm, as Qwen2 computes it: `w · x / sqrt(mean(x²) + ε)` over the last dimension.

use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::OpsMode;
use super::cpu::{Real, check_float, lane_dot_f64, multiversion, rows_per_task, slice, with_slice};

/// RMSNorm of `x` (any shape, normalised over the last dim) with weight `w` (last dim).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: OpsMode) -> Result<Tensor> {
    if mode.fused(x) && x.dtype() == w.dtype() {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNormOp { eps })
    } else {
        // Qwen2RMSNorm computes the statistics in f32 whatever the weight dtype.
        let dtype = x.dtype();
        let xf = match dtype {
            DType::BF16 | DType::F16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        xf.broadcast_mul(&r)?.to_dtype(dtype)?.broadcast_mul(w)
    }
}

struct RmsNormOp {
    eps: f64,
}

fn fwd<T: Real>(x: &[T], w: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let rows = x.len() / d;
    let chunk = rows_per_task(rows, d) * d;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, x)| fwd_rows(o, x, w, d, eps));
    out
}

multiversion! {
    fn fwd_rows<T: Real>(o: &mut [T], x: &[T], w: &[T], d: usize, eps: f64) {
        for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let ms = lane_dot_f64(x, x) / d as f64;
            let r = T::of(1.0 / (ms + eps).sqrt());
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        }
    }
}

/// dx = r·(g⊙w) − x·r³·Σ(g⊙w⊙x)/d;  dw = Σ_rows g⊙x·r.
fn bwd<T: Real>(x: &[T], w: &[T], g: &[T], d: usize, eps: f64) -> (Vec<T>, Vec<T>) {
    let mut dx = vec![T::zero(); x.len()];
    let rows = x.len() / d;
    let chunk = rows_per_task(rows, d) * d;
    let dw = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![0f64; d];
            bwd_rows(dx, x, g, w, &mut dw, d, eps);
            dw
        })
        .reduce(
            || vec![0f64; d],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    (dx, dw.into_iter().map(T::of).collect())
}

multiversion! {
    /// [`bwd`] for a few rows; their share of dw is added to `dw`.
    fn bwd_rows<T: Real>(dx: &mut [T], x: &[T], g: &[T], w: &[T], dw: &mut [f64], d: usize, eps: f64) {
        let mut gw = vec![T::zero(); d];
        for ((dx, x), g) in dx
            .chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .zip(g.chunks_exact(d))
        {
            let r = 1.0 / (lane_dot_f64(x, x) / d as f64 + eps).sqrt();
            for ((gw, &g), &w) in gw.iter_mut().zip(g).zip(w) {
                *gw = g * w;
            }
            let c = T::of(r * r * r * lane_dot_f64(x, &gw) / d as f64);
            let rt = T::of(r);
            for ((((dx, &x), &g), &gw), dw) in dx.iter_mut().zip(x).zip(g).zip(&gw).zip(dw.iter_mut()) {
                *dx = rt * gw - x * c;
                *dw += g.f64() * x.f64() * r;
            }
        }
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "selfplay-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(0);
        if l2.dims() != [d] || d == 0 {
            bail!(
                "rms_norm: weight {:?} does not match input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(fwd(slice(s1, l1)?, slice(s2, l2)?, d, self.eps))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(fwd(slice(s1, l1)?, slice(s2, l2)?, d, self.eps))
            }
            _ => bail!(
                "rms_norm: unsupported dtypes {:?}/{:?}",
                candle_core::backend::BackendStorage::dtype(s1),
                candle_core::backend::BackendStorage::dtype(s2)
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        check_float(x.dtype(), "rms_norm backward")?;
        let d = w.dim(0)?;
        macro_rules! run {
            ($t:ty) => {
                with_slice::<$t, _>(x, |xs| {
                    with_slice::<$t, _>(w, |ws| {
                        with_slice::<$t, _>(g, |gs| {
                            let (dx, dw) = bwd(xs, ws, gs, d, self.eps);
                            Ok((
                                Tensor::from_vec(dx, x.shape(), x.device())?,
                                Tensor::from_vec(dw, d, x.device())?,
                            ))
                        })
                    })
                })?
            };
        }
        let (dx, dw) = if x.dtype() == DType::F32 {
            run!(f32)
        } else {
            run!(f64)
        };
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_kernels_match_their_baseline_build() {
        let (n, d) = (3, 389);
        let x: Vec<f32> = (0..n * d)
            .map(|i| ((i * 37 % 101) as f32) / 7.0 - 7.0)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 1.0 + (i % 5) as f32 / 10.0).collect();
        let g: Vec<f32> = (0..n * d)
            .map(|i| ((i * 17 % 23) as f32) / 5.0 - 2.0)
            .collect();
        let (fast, base) = super::super::cpu::both_builds(|| {
            let mut o = vec![0f32; n * d];
            fwd_rows(&mut o, &x, &w, d, 1e-6);
            let (mut dx, mut dw) = (vec![0f32; n * d], vec![0f64; d]);
            bwd_rows(&mut dx, &x, &g, &w, &mut dw, d, 1e-6);
            (o, dx, dw)
        });
        assert_eq!(fast, base);
    }
}
