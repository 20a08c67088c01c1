//! Helpers of the CPU kernels: typed slices of tensors and the float trait they are generic over.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType, bail};
use gemm::Parallelism;
use rayon::prelude::*;

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

/// An output buffer that parallel tasks write at disjoint indices (each task its own rows or
/// columns of a product), where slices cannot express the split.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: the tasks sharing it write disjoint elements, and the buffer outlives them (the
// users' contract).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so that closures capture the whole (Sync) wrapper.
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        // SAFETY (of the callers' writes): in bounds and disjoint, by each user's contract.
        self.0.wrapping_add(i)
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
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    scale: T,
    par: Parallelism,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if (m - 1) * dst_rs + n > dst.len() {
        bail!("selfplay op: a product's output is out of bounds ({m}×{n})");
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(T::zero());
            }
        }
        return Ok(());
    }
    // SAFETY: `dst` holds the m×n output at row stride `dst_rs` (checked above) and does not
    // alias `lhs` or `rhs` (it is a distinct `&mut`).
    unsafe {
        gemm_checked(
            (m, n, k),
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            lhs,
            rhs,
            scale,
            par,
        )
    }
}

/// Two independent products of about the same size, `a` and `b`, each given the threads it
/// may use. Large ones run side by side, each on half the workers, rather than one after the
/// other with each split across all of them: on 2 cores that measured ~5% faster per
/// training step (gemm synchronises and re-packs less when it has fewer threads).
pub(crate) fn side_by_side<A: Send, B: Send>(
    large: bool,
    a: impl FnOnce(Parallelism) -> Result<A> + Send,
    b: impl FnOnce(Parallelism) -> Result<B> + Send,
) -> Result<(A, B)> {
    let threads = rayon::current_num_threads();
    if !large || threads < 2 {
        return Ok((a(Parallelism::None)?, b(Parallelism::None)?));
    }
    let half = if threads >= 4 {
        Parallelism::Rayon(threads / 2)
    } else {
        Parallelism::None
    };
    let (a, b) = rayon::join(|| a(half), || b(half));
    Ok((a?, b?))
}

/// A new row-major `m×n` matrix `scale · lhs (m×k) · rhs (k×n)`. The output is not zeroed
/// first: `gemm` told not to read its destination (`read_dst = false`) writes every element
/// without loading any (the test `product_new_never_reads_its_output` checks this on shapes
/// that take each of gemm's paths), and a memset of every fresh gradient buffer was ~4% of a
/// training step.
pub(crate) fn product_new<T: Real>(
    (m, n, k): (usize, usize, usize),
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    scale: T,
    par: Parallelism,
) -> Result<Vec<T>> {
    let len = m * n;
    if k == 0 || len == 0 {
        return Ok(vec![T::zero(); len]);
    }
    let mut dst = Vec::with_capacity(len);
    // SAFETY: the buffer has room for the m×n output at row stride n; gemm writes all of it
    // (k > 0, read_dst = false) before `set_len` exposes it, and never reads it.
    unsafe {
        gemm_checked((m, n, k), dst.as_mut_ptr(), n, false, lhs, rhs, scale, par)?;
        dst.set_len(len);
    }
    Ok(dst)
}

/// `gemm` after checking that every index it reads of `lhs` and `rhs` is in bounds.
///
/// # Safety
/// `dst` must be valid for writes (and for reads when `accumulate`) of the m×n output at row
/// stride `dst_rs`, must not alias `lhs` or `rhs`, and m, n, k must be non-zero.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_checked<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
    scale: T,
    par: Parallelism,
) -> Result<()> {
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    if last(m, lhs_rs, k, lhs_cs) >= lhs.len() || last(k, rhs_rs, n, rhs_cs) >= rhs.len() {
        bail!("selfplay op: a product is out of bounds ({m}×{k}·{k}×{n})");
    }
    // SAFETY: the operands' indices were checked above, the output's by the caller; T is f32
    // or f64 (`Real`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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

/// Defines a function whose body is compiled three times — for AVX-512, for AVX2 with FMA,
/// and for the build's baseline (SSE2 on x86-64) — and picks one at run time, so that the
/// element-wise kernels (exp, reductions) run 16 or 8 floats at a time while the binary stays
/// portable. What the body calls must be `#[inline(always)]` to be compiled the same way.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$T:ident: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name<$T: Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp<$T: Real>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(test)]
            if crate::policy::ops::cpu::BASELINE_ONLY.get() {
                return imp($($arg),*);
            }
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn v4<$T: Real>($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3<$T: Real>($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `v3` is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
thread_local! {
    /// Makes `multiversion!` functions called on this thread take their baseline build, so
    /// that tests can compare it with the vectorised one.
    pub(crate) static BASELINE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f()` with the vectorised builds and then with the baseline build of every
/// `multiversion!` function it calls on this thread.
#[cfg(test)]
pub(crate) fn both_builds<R>(f: impl Fn() -> R) -> (R, R) {
    let fast = f();
    BASELINE_ONLY.set(true);
    let base = f();
    BASELINE_ONLY.set(false);
    (fast, base)
}

const LANES: usize = 16;

/// max of a slice, in independent lanes so that the loop vectorises.
#[inline(always)]
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
#[inline(always)]
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
#[inline(always)]
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

/// Σ a·b accumulated in f64, in lanes (a sum in one f64 does not vectorise).
#[inline(always)]
pub(crate) fn lane_dot_f64<T: Real>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x.f64() * y.f64())
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l].f64() * y[l].f64();
        }
    }
    acc.into_iter().sum::<f64>() + tail
}

/// (Σ e^(x−shift), Σ e^(x−shift)·(x−shift)), in lanes, accumulated in f64 at the end.
#[inline(always)]
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
    // `clamp` keeps a NaN a NaN (so that the step's NaN check sees it).
    let x = x.clamp(-87.336_55, 88.376_26);
    // Round x·log2(e) to the nearest integer with the 1.5·2²³ trick (no libm `round`): the
    // sum's low mantissa bits then hold that integer, n, in two's complement, which gives 2ⁿ
    // below without `n as i32` (a saturating conversion that kept callers' loops scalar).
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    // 2ⁿ: n + 127 in the exponent field (0x4B40_0000 is the bits of 1.5·2²³).
    p * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `product_new` relies on gemm not reading a destination it was told not to read: with
    /// the destination full of NaN, any read would leave a NaN in the result. The shapes take
    /// gemm's paths: matrix-vector both ways, k ≤ 2, the small "horizontal" kernel, the main
    /// kernels with and without threads, and transposed operands.
    #[test]
    fn product_new_never_reads_its_output() {
        let shapes = [
            (1, 37, 19),
            (37, 1, 19),
            (23, 29, 1),
            (23, 29, 2),
            (9, 13, 17),
            (16, 16, 64),
            (70, 90, 33),
            (300, 130, 257),
        ];
        for &(m, n, k) in &shapes {
            for (lt, rt) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
                    .collect();
                let b: Vec<f32> = (0..k * n)
                    .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
                    .collect();
                let lhs = if lt { (&a[..], 1, m) } else { (&a[..], k, 1) };
                let rhs = if rt { (&b[..], 1, k) } else { (&b[..], n, 1) };
                let want: Vec<f64> = (0..m * n)
                    .map(|ij| {
                        let (i, j) = (ij / n, ij % n);
                        (0..k)
                            .map(|p| {
                                let x = a[i * lhs.1 + p * lhs.2] as f64;
                                x * b[p * rhs.1 + j * rhs.2] as f64
                            })
                            .sum::<f64>()
                            * 0.5
                    })
                    .collect();
                for par in [Parallelism::None, Parallelism::Rayon(2)] {
                    let mut dst = vec![f32::NAN; m * n];
                    product((m, n, k), &mut dst, n, false, lhs, rhs, 0.5, par).expect("product");
                    let fresh = product_new((m, n, k), lhs, rhs, 0.5, par).expect("product_new");
                    for (got, fresh, want) in dst
                        .iter()
                        .zip(&fresh)
                        .zip(&want)
                        .map(|((a, b), c)| (a, b, c))
                    {
                        assert!(
                            (*got as f64 - want).abs() < 1e-4,
                            "{m}×{n}×{k} {lt} {rt}: {got} vs {want}"
                        );
                        assert_eq!(got.to_bits(), fresh.to_bits(), "{m}×{n}×{k}");
                    }
                }
            }
        }
    }

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
        assert!(super::exp_f32(f32::NAN).is_nan());
        assert!(super::exp_f32(f32::INFINITY) > 1e38);
    }
}

/// `y + r` for a product `y (n, o)` just made on the CPU and `r` either a residual `(n, o)` or
/// a bias `(o)` added to every row, on rayon's threads. candle runs element-wise ops of 64 Ki
/// values or more on a thread pool of its own whose workers spin before they sleep; on a few
/// cores they contend with rayon's, and a bf16 prefill's profile spent 7 % of its time at that
/// pool's barrier. Other dtypes and devices take candle's add.
pub(crate) fn add_to_product(y: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (n, o) = y.dims2()?;
    let bias = r.dims() == [o];
    let ours = y.device().is_cpu()
        && y.dtype() == DType::F32
        && r.dtype() == DType::F32
        && (bias || r.dims() == [n, o]);
    if !ours {
        return if bias { y.broadcast_add(r) } else { y + r };
    }
    // Rows per task: about 16 Ki values.
    let rows = (16 * 1024 / o.max(1)).max(1);
    let mut out = vec![0f32; n * o];
    with_slice::<f32, _>(y, |ys| {
        with_slice::<f32, _>(r, |rs| {
            out.par_chunks_mut(rows * o)
                .zip(ys.par_chunks(rows * o))
                .enumerate()
                .for_each(|(c, (dst, src))| {
                    for (i, (d, s)) in dst.chunks_mut(o).zip(src.chunks(o)).enumerate() {
                        let add = if bias {
                            &rs[..o]
                        } else {
                            &rs[(c * rows + i) * o..(c * rows + i + 1) * o]
                        };
                        for ((d, &s), &a) in d.iter_mut().zip(s).zip(add) {
                            *d = s + a;
                        }
                    }
                });
            Ok(())
        })
    })?;
    Tensor::from_vec(out, (n, o), y.device())
}

#[cfg(test)]
mod add_tests {
    use candle_core::{Device, Tensor};

    use super::add_to_product;

    #[test]
    fn products_get_their_residual_or_bias_as_candle_adds_them() {
        // Below and above candle's parallel threshold (64 Ki values), rows off the task size.
        for (n, o) in [(1, 7), (3, 512), (300, 513), (129, 1024)] {
            let vals = |len: usize, seed: f32| -> Vec<f32> {
                (0..len).map(|i| (i as f32 * seed).sin() * 3.0).collect()
            };
            let y = Tensor::from_vec(vals(n * o, 0.37), (n, o), &Device::Cpu).unwrap();
            let r = Tensor::from_vec(vals(n * o, 1.13), (n, o), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(vals(o, 2.71), o, &Device::Cpu).unwrap();
            for (got, want) in [
                (add_to_product(&y, &r).unwrap(), (&y + &r).unwrap()),
                (
                    add_to_product(&y, &b).unwrap(),
                    y.broadcast_add(&b).unwrap(),
                ),
            ] {
                assert_eq!(got.dims(), [n, o]);
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got, want, "({n}, {o})");
            }
        }
        // A residual of the wrong shape is refused, as candle refuses it.
        let y = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let r = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(add_to_product(&y, &r).is_err());
    }
}
