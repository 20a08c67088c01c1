//! AdamW (PyTorch's update, decoupled weight decay) and global gradient-norm clipping.
//!
//! On the CPU the update runs in place, in parallel, as three fused passes (first moment,
//! second moment, parameter); elsewhere it is composed of candle ops.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, Var, bail};
use rayon::prelude::*;

/// Moments of every parameter, in the order of the model's parameter list.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates applied so far (PyTorch's `step`).
    pub t: u64,
    pub m: Vec<Var>,
    pub v: Vec<Var>,
}

impl AdamW {
    pub fn new(
        params: &[(String, Var)],
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let zeros = |p: &Var| Var::zeros(p.shape(), p.dtype(), p.device());
        Ok(Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            m: params
                .iter()
                .map(|(_, p)| zeros(p))
                .collect::<Result<_>>()?,
            v: params
                .iter()
                .map(|(_, p)| zeros(p))
                .collect::<Result<_>>()?,
        })
    }

    /// One update with learning rate `lr`, gradients multiplied by `grad_scale` (the clip).
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        if grads.len() != params.len() {
            bail!(
                "adamw: {} gradients for {} parameters",
                grads.len(),
                params.len()
            );
        }
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - self.beta2.powi(self.t as i32)).sqrt();
        for (i, ((_, p), g)) in params.iter().zip(grads).enumerate() {
            let (m, v) = (&self.m[i], &self.v[i]);
            let g = g.contiguous()?;
            let fused = p.device().is_cpu()
                && matches!(p.dtype(), DType::F32 | DType::F64)
                && g.dtype() == p.dtype();
            if fused {
                m.as_tensor().inplace_op2(
                    &g,
                    &Moment {
                        beta: self.beta1,
                        scale: grad_scale,
                        square: false,
                    },
                )?;
                v.as_tensor().inplace_op2(
                    &g,
                    &Moment {
                        beta: self.beta2,
                        scale: grad_scale,
                        square: true,
                    },
                )?;
                p.as_tensor().inplace_op3(
                    m.as_tensor(),
                    v.as_tensor(),
                    &Apply {
                        lr,
                        wd: self.weight_decay,
                        bc1,
                        bc2_sqrt,
                        eps: self.eps,
                    },
                )?;
            } else {
                let g = (g.to_dtype(m.dtype())? * grad_scale)?;
                let new_m = ((m.as_tensor() * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
                let new_v = ((v.as_tensor() * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
                let denom = ((new_v.sqrt()? / bc2_sqrt)? + self.eps)?;
                let decayed = (p.as_tensor() * (1.0 - lr * self.weight_decay))?;
                let new_p = (decayed - (new_m.div(&denom)? * (lr / bc1))?)?;
                m.set(&new_m)?;
                v.set(&new_v)?;
                p.set(&new_p)?;
            }
        }
        Ok(())
    }
}

/// √Σ‖g‖² over all gradients, accumulated in f64.
pub fn global_grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += if g.device().is_cpu() && matches!(g.dtype(), DType::F32 | DType::F64) {
            let g = g.contiguous()?;
            let (s, l) = g.storage_and_layout();
            let Storage::Cpu(s) = &*s else {
                bail!("expected a CPU gradient")
            };
            match s {
                CpuStorage::F32(d) => sum_sq(&d[range(l)?]),
                CpuStorage::F64(d) => sum_sq(&d[range(l)?]),
                _ => bail!("unexpected gradient dtype"),
            }
        } else {
            g.to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?
        };
    }
    Ok(total.sqrt())
}

/// torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)); 0 disables.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        1.0
    } else {
        (max_norm / (norm + 1e-6)).min(1.0)
    }
}

fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => bail!("expected a contiguous tensor"),
    }
}

fn sum_sq<T: Copy + Into<f64> + Send + Sync>(d: &[T]) -> f64 {
    d.par_chunks(16 * 1024)
        .map(|c| c.iter().map(|&x| x.into() * x.into()).sum::<f64>())
        .sum()
}

const CHUNK: usize = 16 * 1024;

/// m ← β·m + (1−β)·(s·g), or with `square`, v ← β·v + (1−β)·(s·g)².
struct Moment {
    beta: f64,
    scale: f64,
    square: bool,
}

impl Moment {
    fn run<T: crate::policy::ops::cpu::Real>(&self, dst: &mut [T], g: &[T]) {
        let (b, s) = (T::of(self.beta), T::of(self.scale));
        let one_minus = T::of(1.0 - self.beta);
        let square = self.square;
        dst.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(d, g)| {
                for (d, &g) in d.iter_mut().zip(g) {
                    let g = g * s;
                    let x = if square { g * g } else { g };
                    *d = b * *d + one_minus * x;
                }
            });
    }
}

impl candle_core::InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "selfplay-adam-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let r = range(dst_l)?;
        match (dst, g) {
            (CpuStorage::F32(d), CpuStorage::F32(g)) => self.run(&mut d[r], &g[range(gl)?]),
            (CpuStorage::F64(d), CpuStorage::F64(g)) => self.run(&mut d[r], &g[range(gl)?]),
            _ => bail!("adam moment: unsupported dtypes"),
        }
        Ok(())
    }
}

/// p ← p·(1 − lr·wd) − (lr/bc1) · m / (√v/√bc2 + ε).
struct Apply {
    lr: f64,
    wd: f64,
    bc1: f64,
    bc2_sqrt: f64,
    eps: f64,
}

impl Apply {
    fn run<T: crate::policy::ops::cpu::Real>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let decay = T::of(1.0 - self.lr * self.wd);
        let step = T::of(self.lr / self.bc1);
        let bc2 = T::of(self.bc2_sqrt);
        let eps = T::of(self.eps);
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    *p = *p * decay - step * m / (v.sqrt() / bc2 + eps);
                }
            });
    }
}

impl candle_core::InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "selfplay-adam-apply"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let r = range(dst_l)?;
        match (dst, m, v) {
            (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                self.run(&mut p[r], &m[range(ml)?], &v[range(vl)?])
            }
            (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                self.run(&mut p[r], &m[range(ml)?], &v[range(vl)?])
            }
            _ => bail!("adam apply: unsupported dtypes"),
        }
        Ok(())
    }
}
