//! `x · wᵀ` for the few rows of a decoding step, on the CPU, without a backward.
//!
//! A decoding step multiplies a handful of rows (one per sequence) by every weight matrix.
//! The GEMM behind `Tensor::matmul` first packs its right-hand side, and `wᵀ` of a row-major
//! `(out, in)` weight is strided, so each step copied every weight element by element
//! (half of a sampling run's time in a profile). Here each weight row is read once, in place,
//! and dotted with every input row while it sits in L1: the step is bound by reading the
//! weights, as it should be.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::cpu::{rows_per_task, with_slice};

/// Up to this many rows take this path; more rows amortise GEMM's packing.
pub(crate) const MAX_ROWS: usize = 16;

/// Whether [`linear_nt`] applies: a CPU f32 product of few rows outside any backward graph.
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.rank() == 2
        && w.rank() == 2
        && x.dim(0).is_ok_and(|n| n <= MAX_ROWS)
        && !x.track_op()
        && !w.track_op()
}

/// `x (n, k) · wᵀ` for `w (o, k)`: `(n, o)`.
pub(crate) fn linear_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let (o, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("linear: x has {k} columns, the weight {k2}");
    }
    let yt = with_slice::<f32, _>(x, |xs| {
        with_slice::<f32, _>(w, |ws| {
            let mut yt = vec![0f32; o * n];
            let rows = rows_per_task(o, k);
            yt.par_chunks_mut(rows * n)
                .zip(ws.par_chunks(rows * k))
                .for_each(|(out, wblock)| block(xs, n, k, wblock, out));
            Ok(yt)
        })
    })?;
    // `yt` is `(o, n)`; the caller wants `(n, o)`.
    Tensor::from_vec(yt, (o, n), x.device())?.t()?.contiguous()
}

fn block(xs: &[f32], n: usize, k: usize, wblock: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            unsafe { avx2::block(xs, n, k, wblock, out) };
            return;
        }
    }
    for (wrow, orow) in wblock.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
        for (xrow, y) in xs.chunks_exact(k).zip(orow.iter_mut()) {
            *y = dot(xrow, wrow);
        }
    }
}

/// A dot product in 16 independent lanes, so the compiler keeps it in vector registers.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, ar) = a.split_at(a.len() / L * L);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(L).zip(bc.chunks_exact(L)) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Four input rows at a time against each weight row: each weight vector is loaded once
    /// for four products, and eight independent accumulators hide the FMA latency.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block(xs: &[f32], n: usize, k: usize, wblock: &[f32], out: &mut [f32]) {
        let quads = n / 4 * 4;
        for (wrow, orow) in wblock.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
            for i in (0..quads).step_by(4) {
                let d = dot4(&xs[i * k..(i + 4) * k], wrow);
                orow[i..i + 4].copy_from_slice(&d);
            }
            for i in quads..n {
                // Inlined here, the shared loop is compiled for AVX2 too.
                orow[i] = super::dot(&xs[i * k..(i + 1) * k], wrow);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// `x` holds four rows of `w.len()` values.
    #[target_feature(enable = "avx2,fma")]
    fn dot4(x: &[f32], w: &[f32]) -> [f32; 4] {
        let k = w.len();
        assert!(x.len() == 4 * k);
        let full = k / 16 * 16;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let z = _mm256_setzero_ps();
        let (mut a0, mut a1, mut b0, mut b1, mut c0, mut c1, mut d0, mut d1) =
            (z, z, z, z, z, z, z, z);
        let mut c = 0;
        while c < full {
            // SAFETY: c + 16 <= k, so every load reads inside `w` and inside row r of `x`.
            unsafe {
                let y0 = _mm256_loadu_ps(wp.add(c));
                let y1 = _mm256_loadu_ps(wp.add(c + 8));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c)), y0, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c + 8)), y1, a1);
                b0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(k + c)), y0, b0);
                b1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(k + c + 8)), y1, b1);
                c0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(2 * k + c)), y0, c0);
                c1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(2 * k + c + 8)), y1, c1);
                d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(3 * k + c)), y0, d0);
                d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(3 * k + c + 8)), y1, d1);
            }
            c += 16;
        }
        let mut out = [
            hsum(_mm256_add_ps(a0, a1)),
            hsum(_mm256_add_ps(b0, b1)),
            hsum(_mm256_add_ps(c0, c1)),
            hsum(_mm256_add_ps(d0, d1)),
        ];
        for (r, o) in out.iter_mut().enumerate() {
            for c in full..k {
                *o += x[r * k + c] * w[c];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_gemm_for_every_small_shape() {
        let dev = Device::Cpu;
        for &(n, k, o) in &[
            (1, 384, 8192),
            (8, 384, 1024),
            (3, 37, 5),
            (7, 100, 9),
            (16, 1024, 384),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (o, k), &dev).unwrap();
            assert!(applies(&x, &w));
            let fast = linear_nt(&x, &w).unwrap();
            let gemm = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(fast.dims(), gemm.dims());
            let diff = super::super::cpu::max_abs_diff(&fast, &gemm);
            assert!(diff < 1e-3, "({n}, {k}, {o}): {diff}");
        }
    }

    #[test]
    fn does_not_apply_to_many_rows_or_a_graph() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        let many = Tensor::zeros((MAX_ROWS + 1, 8), DType::F32, &dev).unwrap();
        assert!(!applies(&many, &w));
        let var = candle_core::Var::zeros((4, 8), DType::F32, &dev).unwrap();
        let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
        assert!(!applies(&x, var.as_tensor()));
        let f64x = Tensor::zeros((2, 8), DType::F64, &dev).unwrap();
        assert!(!applies(&f64x, &w));
    }
}
