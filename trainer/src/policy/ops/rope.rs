//! Rotary position embedding (Qwen2/Llama "rotate half" layout), fused with the move of the
//! head axis in front of the time axis: `(b, t, heads, hd)` in, `(b, heads, t, hd)` out.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::OpsMode;
use super::cpu::{Real, check_float, slice, with_slice};

/// cos/sin of every position up to `max_positions`, computed like transformers does: inverse
/// frequencies and angles in f32 (whatever the model dtype), then cast.
pub struct RopeTables {
    half: usize,
    max_positions: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// `(max_positions, head_dim)` tables on the model's device for the composite path.
    cos_full: Tensor,
    sin_full: Tensor,
}

impl std::fmt::Debug for RopeTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RopeTables")
            .field("half", &self.half)
            .field("max_positions", &self.max_positions)
            .finish()
    }
}

impl RopeTables {
    pub fn new(
        head_dim: usize,
        theta: f64,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !head_dim.is_multiple_of(2) || head_dim == 0 {
            bail!("rope: head_dim {head_dim} must be even");
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let full = |v: &[f32]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(max_positions * head_dim);
            for row in v.chunks_exact(half) {
                out.extend_from_slice(row);
                out.extend_from_slice(row);
            }
            Tensor::from_vec(out, (max_positions, head_dim), device)?.to_dtype(dtype)
        };
        let (cos_full, sin_full) = (full(&cos)?, full(&sin)?);
        Ok(Self {
            half,
            max_positions,
            cos,
            sin,
            cos_full,
            sin_full,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }
}

/// The positions of one forward pass (`b·t`, row-major) and, for the composite path, their
/// cos/sin rows gathered on the device once for every layer (`(b, 1, t, hd)` each).
#[derive(Debug)]
pub struct RopePositions {
    positions: Arc<Vec<u32>>,
    gathered: OnceLock<(Tensor, Tensor)>,
}

impl RopePositions {
    pub fn new(positions: Arc<Vec<u32>>) -> Self {
        Self {
            positions,
            gathered: OnceLock::new(),
        }
    }

    /// cos and sin at every position, `(b, 1, t, hd)` on the tables' device.
    fn gathered(&self, tables: &RopeTables, b: usize, t: usize) -> Result<&(Tensor, Tensor)> {
        if let Some(g) = self.gathered.get() {
            return Ok(g);
        }
        let hd = 2 * tables.half;
        let idx = Tensor::from_slice(self.positions.as_slice(), b * t, tables.cos_full.device())?;
        let cos = tables
            .cos_full
            .index_select(&idx, 0)?
            .reshape((b, 1, t, hd))?;
        let sin = tables
            .sin_full
            .index_select(&idx, 0)?
            .reshape((b, 1, t, hd))?;
        Ok(self.gathered.get_or_init(|| (cos, sin)))
    }
}

/// Applies RoPE to the `b` rows of `x: (b·t, heads·hd)` (a projection's output, token-major)
/// at `positions` (`b·t` of them, row-major) and returns `(b, heads, t, hd)`, contiguous.
/// Taking the projection's layout as it is keeps a reshape node out of the backward graph.
pub fn rope_to_heads(
    x: &Tensor,
    b: usize,
    tables: &Arc<RopeTables>,
    at: &RopePositions,
    mode: OpsMode,
) -> Result<Tensor> {
    let positions = &at.positions;
    let (rows, cols) = x.dims2()?;
    let hd = 2 * tables.half;
    if b == 0 || rows % b != 0 || hd == 0 || cols % hd != 0 || positions.len() != rows {
        bail!(
            "rope: input {:?} in {b} rows does not match the tables or {} positions",
            x.dims(),
            positions.len()
        );
    }
    let (t, h) = (rows / b, cols / hd);
    if let Some(&p) = positions.iter().max()
        && p as usize >= tables.max_positions
    {
        bail!(
            "rope: position {p} is past the model's {} positions",
            tables.max_positions
        );
    }
    if mode.fused(x) {
        x.contiguous()?.apply_op1(RopeOp {
            tables: tables.clone(),
            positions: positions.clone(),
            dims: (b, t, h, hd),
        })
    } else {
        let x = x.reshape((b, t, h, hd))?;
        let (cos, sin) = at.gathered(tables, b, t)?;
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        let x = x.transpose(1, 2)?;
        let half = tables.half;
        let x1 = x.narrow(3, 0, half)?;
        let x2 = x.narrow(3, half, half)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        (x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?.contiguous()
    }
}

struct RopeOp {
    tables: Arc<RopeTables>,
    positions: Arc<Vec<u32>>,
    /// `(b, t, heads, hd)` of the token-major input.
    dims: (usize, usize, usize, usize),
}

impl RopeOp {
    /// `inverse` rotates by −angle: the backward of the rotation is its transpose.
    fn run<T: Real>(
        &self,
        x: &[T],
        dims: (usize, usize, usize, usize),
        to_heads: bool,
        inverse: bool,
    ) -> Vec<T> {
        let (b, t, h, hd) = dims;
        let half = hd / 2;
        let mut out = vec![T::zero(); x.len()];
        let tab = &self.tables;
        // One task per (batch, time) row of the `(b, t, h, hd)` side.
        let rows: Vec<usize> = (0..b * t).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        rows.par_iter().for_each(|&row| {
            let (bi, ti) = (row / t, row % t);
            let p = self.positions[row] as usize;
            let cos = &tab.cos[p * half..(p + 1) * half];
            let sin = &tab.sin[p * half..(p + 1) * half];
            for hi in 0..h {
                let btd = ((bi * t + ti) * h + hi) * hd;
                let bhd = ((bi * h + hi) * t + ti) * hd;
                let (src, dst) = if to_heads { (btd, bhd) } else { (bhd, btd) };
                let xs = &x[src..src + hd];
                // SAFETY: every (row, head) pair writes its own disjoint `hd` elements.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(dst), hd) };
                for j in 0..half {
                    let (c, s) = (T::of(cos[j] as f64), T::of(sin[j] as f64));
                    let s = if inverse { -s } else { s };
                    let (x1, x2) = (xs[j], xs[j + half]);
                    o[j] = x1 * c - x2 * s;
                    o[j + half] = x2 * c + x1 * s;
                }
            }
        });
        out
    }
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint output ranges to rayon tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "selfplay-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, h, hd) = self.dims;
        if l.shape().elem_count() != b * t * h * hd {
            bail!("rope: input {:?} does not hold {:?}", l.shape(), self.dims);
        }
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.run(slice::<f32>(s, l)?, (b, t, h, hd), true, false))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.run(slice::<f64>(s, l)?, (b, t, h, hd), true, false))
            }
            _ => bail!(
                "rope: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(s)
            ),
        };
        Ok((out, Shape::from((b, h, t, hd))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        check_float(x.dtype(), "rope backward")?;
        let (b, t, h, hd) = self.dims;
        let dx = if x.dtype() == DType::F32 {
            with_slice::<f32, _>(g, |gs| {
                Tensor::from_vec(
                    self.run(gs, (b, t, h, hd), false, true),
                    x.shape(),
                    x.device(),
                )
            })?
        } else {
            with_slice::<f64, _>(g, |gs| {
                Tensor::from_vec(
                    self.run(gs, (b, t, h, hd), false, true),
                    x.shape(),
                    x.device(),
                )
            })?
        };
        Ok(Some(dx))
    }
}
