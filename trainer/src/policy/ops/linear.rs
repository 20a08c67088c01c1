//! `x · wᵀ (+ b)` for `x: (n, in)`, `w: (out, in)`, `b: (out)` as one op.
//!
//! Composed from candle primitives a linear layer is a transpose, a matmul and a broadcast
//! add. Its backward then turns the weight's gradient back with a strided, element-by-element
//! add, and for each of the three nodes allocates a zero tensor to add the gradient into.
//! Fused, the forward is one `gemm` that starts from the bias, and the backward is two
//! `gemm`s that write the gradients in the layouts they are kept in, plus a column sum for
//! the bias.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;

use super::OpsMode;
use super::cpu::{Real, check_float, product, product_new, side_by_side, slice, with_slice};

/// `x · wᵀ (+ b)`: the fused op on the CPU, candle primitives elsewhere.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, mode: OpsMode) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let (o, k2) = w.dims2()?;
    if k != k2 || bias.is_some_and(|b| b.dims() != [o]) {
        bail!(
            "linear: x {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            w.dims(),
            bias.map(|b| b.dims().to_vec())
        );
    }
    let same_dtype = w.dtype() == x.dtype() && bias.is_none_or(|b| b.dtype() == x.dtype());
    if mode.fused(x) && same_dtype && n > 0 {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return match bias {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBias),
            None => x.apply_op2(&w, Linear),
        };
    }
    let y = x.matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `residual + x · wᵀ`: the residual connection folded into the product (it starts the
/// accumulation), which keeps an add node and its two gradient buffers out of the graph.
pub fn linear_residual(residual: &Tensor, x: &Tensor, w: &Tensor, mode: OpsMode) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let (o, k2) = w.dims2()?;
    if k != k2 || residual.dims() != [n, o] {
        bail!(
            "linear_residual: residual {:?}, x {:?} and weight {:?} do not fit",
            residual.dims(),
            x.dims(),
            w.dims()
        );
    }
    let same_dtype = w.dtype() == x.dtype() && residual.dtype() == x.dtype();
    if mode.fused(x) && same_dtype && n > 0 {
        return residual.contiguous()?.apply_op3(
            &x.contiguous()?,
            &w.contiguous()?,
            LinearResidual,
        );
    }
    residual + linear(x, w, None, mode)?
}

/// gemm's threads for products worth splitting.
fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if m * n * k >= 64 * 64 * 64 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// Where the product starts from: zero, a bias on every row, or a residual `(n, o)`.
enum Start<'a, T> {
    Zero,
    Bias(&'a [T]),
    Residual(&'a [T]),
}

fn fwd<T: Real>(
    x: &[T],
    w: &[T],
    start: Start<'_, T>,
    (n, k, o): (usize, usize, usize),
) -> Result<Vec<T>> {
    let (x, w, par) = ((x, k, 1), (w, 1, k), parallelism(n, o, k));
    let mut y = match start {
        Start::Bias(b) => {
            let mut y = Vec::with_capacity(n * o);
            for _ in 0..n {
                y.extend_from_slice(b);
            }
            y
        }
        Start::Residual(r) => r.to_vec(),
        Start::Zero => return product_new((n, o, k), x, w, T::one(), par),
    };
    product((n, o, k), &mut y, o, true, x, w, T::one(), par)?;
    Ok(y)
}

/// (dx, dw, db) as flat vectors.
type RawGrads<T> = (Vec<T>, Vec<T>, Option<Vec<T>>);

/// (dx, dw, db) from the output gradient `g (n, o)`.
fn bwd<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    with_bias: bool,
    (n, k, o): (usize, usize, usize),
) -> Result<RawGrads<T>> {
    let (dx, dw) = side_by_side(
        n * k * o >= 64 * 64 * 64,
        |par| product_new((n, k, o), (g, o, 1), (w, k, 1), T::one(), par),
        |par| product_new((o, k, n), (g, 1, o), (x, k, 1), T::one(), par),
    )?;
    let db = with_bias.then(|| {
        let mut db = vec![T::zero(); o];
        for row in g.chunks_exact(o) {
            for (d, &v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
        db
    });
    Ok((dx, dw, db))
}

fn dims(x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
    let (n, k) = x.shape().dims2()?;
    let (o, _) = w.shape().dims2()?;
    Ok((n, k, o))
}

/// What a fused forward starts its product from (see [`Start`]).
enum StartArg<'a> {
    Zero,
    Bias(&'a CpuStorage, &'a Layout),
    Residual(&'a CpuStorage, &'a Layout),
}

impl<'a> StartArg<'a> {
    fn slice<T: candle_core::WithDType>(&self) -> Result<Start<'a, T>> {
        Ok(match *self {
            StartArg::Zero => Start::Zero,
            StartArg::Bias(s, l) => Start::Bias(slice(s, l)?),
            StartArg::Residual(s, l) => Start::Residual(slice(s, l)?),
        })
    }
}

fn cpu_forward(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    start: StartArg<'_>,
) -> Result<(CpuStorage, Shape)> {
    let d = dims(x.1, w.1)?;
    let out = match x.0 {
        CpuStorage::F32(_) => CpuStorage::F32(fwd(
            slice::<f32>(x.0, x.1)?,
            slice(w.0, w.1)?,
            start.slice()?,
            d,
        )?),
        CpuStorage::F64(_) => CpuStorage::F64(fwd(
            slice::<f64>(x.0, x.1)?,
            slice(w.0, w.1)?,
            start.slice()?,
            d,
        )?),
        _ => bail!(
            "linear: unsupported dtype {:?}",
            candle_core::backend::BackendStorage::dtype(x.0)
        ),
    };
    Ok((out, Shape::from((d.0, d.2))))
}

type Grads = (Tensor, Tensor, Option<Tensor>);

fn backward(x: &Tensor, w: &Tensor, g: &Tensor, with_bias: bool) -> Result<Grads> {
    check_float(x.dtype(), "linear backward")?;
    let d = dims(x.layout(), w.layout())?;
    let dev = x.device();
    macro_rules! run {
        ($t:ty) => {{
            let (dx, dw, db) = with_slice::<$t, _>(x, |xs| {
                with_slice::<$t, _>(w, |ws| {
                    with_slice::<$t, _>(g, |gs| bwd(xs, ws, gs, with_bias, d))
                })
            })?;
            (
                Tensor::from_vec(dx, x.shape(), dev)?,
                Tensor::from_vec(dw, w.shape(), dev)?,
                db.map(|db| Tensor::from_vec(db, d.2, dev)).transpose()?,
            )
        }};
    }
    Ok(if x.dtype() == DType::F32 {
        run!(f32)
    } else {
        run!(f64)
    })
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "selfplay-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_forward((x, xl), (w, wl), StartArg::Zero)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, g, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "selfplay-linear-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_forward((x, xl), (w, wl), StartArg::Bias(b, bl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(x, w, g, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

struct LinearResidual;

impl CustomOp3 for LinearResidual {
    fn name(&self) -> &'static str {
        "selfplay-linear-residual"
    }

    fn cpu_fwd(
        &self,
        r: &CpuStorage,
        rl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_forward((x, xl), (w, wl), StartArg::Residual(r, rl))
    }

    fn bwd(
        &self,
        _r: &Tensor,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, g, false)?;
        Ok((Some(g.clone()), Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::super::cpu::max_abs_diff;
    use super::*;

    /// Output and the gradients of Σ y ⊙ r for x, w and b.
    fn run(mode: OpsMode, x: &Tensor, w: &Tensor, b: Option<&Tensor>, r: &Tensor) -> Vec<Tensor> {
        let (x, w) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let b = b.map(|b| Var::from_tensor(b).unwrap());
        let y = linear(&x, &w, b.as_ref().map(|b| b.as_tensor()), mode).unwrap();
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![
            y,
            grads.get(&x).unwrap().clone(),
            grads.get(&w).unwrap().clone(),
        ];
        if let Some(b) = &b {
            out.push(grads.get(b).unwrap().clone());
        }
        out
    }

    #[test]
    fn fused_matches_composite_in_value_and_gradient() {
        let dev = Device::Cpu;
        for (n, k, o, bias) in [
            (1, 3, 2, true),
            (70, 48, 33, true),
            (129, 64, 200, false),
            (5, 1, 7, false),
        ] {
            let x = Tensor::randn(0f64, 1., (n, k), &dev).unwrap();
            let w = Tensor::randn(0f64, 1., (o, k), &dev).unwrap();
            let b = Tensor::randn(0f64, 1., o, &dev).unwrap();
            let r = Tensor::randn(0f64, 1., (n, o), &dev).unwrap();
            let b = bias.then_some(&b);
            let fused = run(OpsMode::Auto, &x, &w, b, &r);
            let composite = run(OpsMode::Composite, &x, &w, b, &r);
            assert_eq!(fused.len(), composite.len());
            for (i, (f, c)) in fused.iter().zip(&composite).enumerate() {
                let diff = max_abs_diff(f, c);
                assert!(
                    diff < 1e-10,
                    "tensor {i} of ({n}, {k}, {o}, bias {bias}) differs by {diff}"
                );
            }
        }
    }

    #[test]
    fn residual_form_matches_composite_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (n, k, o) = (37, 20, 24);
        let r = Tensor::randn(0f64, 1., (n, o), &dev).unwrap();
        let x = Tensor::randn(0f64, 1., (n, k), &dev).unwrap();
        let w = Tensor::randn(0f64, 1., (o, k), &dev).unwrap();
        let s = Tensor::randn(0f64, 1., (n, o), &dev).unwrap();
        let run = |mode: OpsMode| {
            let (r, x, w) = (
                Var::from_tensor(&r).unwrap(),
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&w).unwrap(),
            );
            let y = linear_residual(&r, &x, &w, mode).unwrap();
            let g = (&y * &s).unwrap().sum_all().unwrap().backward().unwrap();
            [
                y,
                g.get(&r).unwrap().clone(),
                g.get(&x).unwrap().clone(),
                g.get(&w).unwrap().clone(),
            ]
        };
        let (fused, composite) = (run(OpsMode::Auto), run(OpsMode::Composite));
        for (i, (f, c)) in fused.iter().zip(&composite).enumerate() {
            let diff = max_abs_diff(f, c);
            assert!(diff < 1e-10, "tensor {i} differs by {diff}");
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 7), DType::F32, &dev).unwrap();
        assert!(linear(&x, &w, None, OpsMode::Auto).is_err());
        let w = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        assert!(linear(&x, &w, Some(&b), OpsMode::Auto).is_err());
    }
}
