//! Helpers of the CPU kernels: typed slices of tensors and the float trait they are generic over.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType, bail};
use gemm::Parallelism;

/// The element types the CPU kernels run on (f32 for training, f64 for gradient checks).
pub(crate) trait Real:
    num_traits::Float + num_traits::NumAssign + WithDType + Send + Sync + std::iter::Sum + 'static
{
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    /// e^x: vectorisable for f32 (see [`exp_f32`]), the exact libm call for f64.
    fn fast_exp(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
}

/// The contiguous elements of a custom op's input.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("selfplay op: input is not contiguous"),
    }
}

/// Runs `f` on the contiguous elements of a CPU tensor (copied first if strided).
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(slice::<T>(s, layout)?),
        _ => bail!("selfplay op: expected a CPU tensor"),
    }
}

/// The dtype-dispatch of the kernels: f32 and f64 only.
pub(crate) fn check_float(dtype: DType, op: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 => Ok(()),
        d => bail!("{op}: the CPU kernels support f32 and f64, not {d:?}"),
    }
}

/// Rows per rayon task: enough work per task that scheduling stays cheap.
pub(crate) fn rows_per_task(rows: usize, row_len: usize) -> usize {
    let per_task_elems = 16 * 1024;
    (per_task_elems / row_len.max(1)).clamp(1, rows.max(1))
}

/// `dst (m×n, row stride dst_rs) = [dst +] scale · lhs (m×k) · rhs (k×n)`, with the operands'
/// row and column strides given. Bounds are checked before `gemm` (the crate candle's own CPU
/// matmul uses) reads or writes anything.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
    scale: T,
    par: Parallelism,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(T::zero());
            }
        }
        return Ok(());
    }
    if last(m, dst_rs, n, 1) >= dst.len()
        || last(m, lhs_rs, k, lhs_cs) >= lhs.len()
        || last(k, rhs_rs, n, rhs_cs) >= rhs.len()
    {
        bail!("selfplay op: a product is out of bounds ({m}×{k}·{k}×{n})");
    }
    // SAFETY: every index gemm touches was checked against the slices above; `dst` does not
    // alias `lhs` or `rhs` (it is a distinct `&mut`); T is f32 or f64 (`Real`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { T::one() } else { T::zero() },
            scale,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// The largest |a − b| over all elements (tests of the kernels against candle's primitives).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f64>());
    d.expect("comparable tensors")
}

const LANES: usize = 8;

/// max of a slice, in independent lanes so that the loop vectorises.
#[inline]
pub(crate) fn lane_max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = rest
        .iter()
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
    for a in acc {
        m = if a > m { a } else { m };
    }
    m
}

/// Σ a, in lanes.
#[inline]
pub(crate) fn lane_sum<T: Real>(a: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let c = a.chunks_exact(LANES);
    let tail: T = c.remainder().iter().copied().sum();
    for x in c {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    acc.into_iter().sum::<T>() + tail
}

/// Σ a·b, in lanes.
#[inline]
pub(crate) fn lane_dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.into_iter().sum::<T>() + tail
}

/// (Σ e^(x−shift), Σ e^(x−shift)·(x−shift)), in lanes, accumulated in f64 at the end.
#[inline]
pub(crate) fn lane_exp_sums<T: Real>(x: &[T], shift: T) -> (f64, f64) {
    let mut s = [T::zero(); LANES];
    let mut w = [T::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - shift;
            let e = d.fast_exp();
            s[l] += e;
            w[l] += e * d;
        }
    }
    let (mut sum, mut wsum) = (0f64, 0f64);
    for &v in rest {
        let d = v - shift;
        let e = d.fast_exp();
        sum += e.f64();
        wsum += (e * d).f64();
    }
    for l in 0..LANES {
        sum += s[l].f64();
        wsum += w[l].f64();
    }
    (sum, wsum)
}

/// e^x for f32 without a libm call, so that loops over it vectorise: Cody–Waite reduction
/// by ln 2 and Cephes' degree-6 polynomial (relative error about 2e-7). Inputs below
/// −87.3 give about 1e-38 instead of a denormal or zero.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.336_55, 88.376_26);
    // Round x·log2(e) to the nearest integer with the 1.5·2²³ trick (no libm `round`).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert!(super::exp_f32(-1e30) < 1e-37);
    }
}
