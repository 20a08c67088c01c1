//! The SwiGLU gate of Qwen2's MLP: `silu(gate) ⊙ up`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::OpsMode;
use super::cpu::{Real, check_float, multiversion, slice, with_slice};

const CHUNK: usize = 16 * 1024;

pub fn swiglu(gate: &Tensor, up: &Tensor, mode: OpsMode) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    if mode.fused(gate) && gate.dtype() == up.dtype() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGluOp)
    } else {
        gate.silu()? * up
    }
}

struct SwiGluOp;

#[inline(always)]
fn sigmoid<T: Real>(a: T) -> T {
    T::one() / (T::one() + (-a).fast_exp())
}

fn fwd<T: Real>(a: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(o, (a, u))| fwd_chunk(o, a, u));
    out
}

multiversion! {
    fn fwd_chunk<T: Real>(o: &mut [T], a: &[T], u: &[T]) {
        for ((o, &a), &u) in o.iter_mut().zip(a).zip(u) {
            *o = a * sigmoid(a) * u;
        }
    }
}

fn bwd<T: Real>(a: &[T], u: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
    let mut da = vec![T::zero(); a.len()];
    let mut du = vec![T::zero(); a.len()];
    da.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            a.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(g.par_chunks(CHUNK)),
        )
        .for_each(|((da, du), ((a, u), g))| bwd_chunk(da, du, a, u, g));
    (da, du)
}

multiversion! {
    fn bwd_chunk<T: Real>(da: &mut [T], du: &mut [T], a: &[T], u: &[T], g: &[T]) {
        for ((((da, du), &a), &u), &g) in da.iter_mut().zip(du.iter_mut()).zip(a).zip(u).zip(g) {
            let s = sigmoid(a);
            *da = g * u * s * (T::one() + a * (T::one() - s));
            *du = g * a * s;
        }
    }
}

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "selfplay-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(fwd(slice(s1, l1)?, slice(s2, l2)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(fwd(slice(s1, l1)?, slice(s2, l2)?))
            }
            _ => bail!(
                "swiglu: unsupported dtypes {:?}/{:?}",
                candle_core::backend::BackendStorage::dtype(s1),
                candle_core::backend::BackendStorage::dtype(s2)
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        check_float(a.dtype(), "swiglu backward")?;
        macro_rules! run {
            ($t:ty) => {
                with_slice::<$t, _>(a, |av| {
                    with_slice::<$t, _>(u, |uv| {
                        with_slice::<$t, _>(g, |gv| {
                            let (da, du) = bwd(av, uv, gv);
                            Ok((
                                Tensor::from_vec(da, a.shape(), a.device())?,
                                Tensor::from_vec(du, a.shape(), a.device())?,
                            ))
                        })
                    })
                })?
            };
        }
        let (da, du) = if a.dtype() == DType::F32 {
            run!(f32)
        } else {
            run!(f64)
        };
        Ok((Some(da), Some(du)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_kernels_match_their_baseline_build() {
        let n = 1037;
        let a: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32) / 7.0 - 7.0)
            .collect();
        let u: Vec<f32> = (0..n)
            .map(|i| ((i * 53 % 89) as f32) / 11.0 - 4.0)
            .collect();
        let g: Vec<f32> = (0..n).map(|i| ((i * 17 % 23) as f32) / 5.0 - 2.0).collect();
        let (fast, base) = super::super::cpu::both_builds(|| {
            let mut o = vec![0f32; n];
            fwd_chunk(&mut o, &a, &u);
            let (mut da, mut du) = (vec![0f32; n], vec![0f32; n]);
            bwd_chunk(&mut da, &mut du, &a, &u, &g);
            (o, da, du)
        });
        assert_eq!(fast, base);
    }
}
