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

use super::cpu::{OutPtr, rows_per_task, with_slice};

/// Up to this many rows take this path; more rows amortise GEMM's packing. A turn's appended
/// tool output (tens of tokens) is such a product too: with 16 here, a rollout's 65-token
/// appends cost 0.20 ms a token through the GEMM, with 128 0.16 (`trainer bench rollout`,
/// "ms/prefill-tok"); prompts of hundreds of tokens stay with the GEMM.
pub(crate) const MAX_ROWS: usize = 128;

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
    let y = with_slice::<f32, _>(x, |xs| {
        with_slice::<f32, _>(w, |ws| {
            let xs = Aligned::copy(&xs[..n * k]);
            let xs = xs.as_slice();
            let mut y = vec![0f32; n * o];
            // A few tasks per thread: with tasks of the usual 16k elements, the 32k-row LM
            // head became a thousand tasks whose scheduling and scatter cost more than
            // their imbalance saves.
            let rows = rows_per_task(o, k).max(o.div_ceil(4 * rayon::current_num_threads()));
            let out = OutPtr(y.as_mut_ptr());
            ws.par_chunks(rows * k).enumerate().for_each(|(t, wblock)| {
                // The task's products by weight row, `(rows, n)`, then into their columns of
                // `y (n, o)`: the caller's layout, without a transposing copy of the whole.
                let mut local = vec![0f32; wblock.len() / k * n];
                block_on(xs, n, k, wblock, &mut local, STREAM_AHEAD);
                let j0 = t * rows;
                for (jj, products) in local.chunks_exact(n).enumerate() {
                    for (r, &v) in products.iter().enumerate() {
                        // SAFETY: j0 + jj < o and r < n, so the index is inside `y`, and
                        // each task writes only its own columns j0..j0 + rows.
                        unsafe { *out.at(r * o + j0 + jj) = v };
                    }
                }
            });
            Ok(y)
        })
    })?;
    Tensor::from_vec(y, (n, o), x.device())
}

/// How far ahead of the product the weights are prefetched when they stream from L3 or
/// memory, in values (16 KiB): at least one tile ahead, more when the tile is short. With
/// eight input rows a tile of two weight rows of 512 values takes about 100 ns of FMAs, less
/// than a line's trip from memory, so a prefetch one tile ahead came too late. Measured on
/// the 2-core Xeon with a C replica of the 8-row tile over 112 MB of weights (2 threads):
/// 2.24–2.45 ms one tile ahead, 2.04–2.12 at 16 KiB, 2.03–2.16 at 64 KiB; the 1-row product
/// (1.9 ms, bound by the stream) did not move.
const STREAM_AHEAD: usize = 4096;

/// `n` rows of `k` values in a buffer of their own that starts on a cache line. The
/// activations a product reads come from the allocator 16 bytes past a line, so each 64-byte
/// load of an input row straddled two lines: with eight input rows, eight of a tile step's
/// ten loads. The C replica above: 2.31–2.42 ms with the inputs misaligned, 2.09–2.25 with
/// them on a line (weights as the allocator left them, in both).
struct Aligned {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn copy(xs: &[f32]) -> Self {
        const LINE: usize = 64 / std::mem::size_of::<f32>();
        let mut buf = vec![0f32; xs.len() + LINE];
        // Values from the buffer's start to the next line (an f32 buffer is 4-byte aligned).
        let start = (buf.as_ptr() as usize).wrapping_neg() % 64 / std::mem::size_of::<f32>();
        buf[start..start + xs.len()].copy_from_slice(xs);
        Self {
            buf,
            start,
            len: xs.len(),
        }
    }

    fn as_slice(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Every row of `xs` (`n` rows of `k`) dotted with every row of `wblock`, on this thread:
/// `out[j·n + r] = wblock[j] · xs[r]`.
pub(crate) fn block(xs: &[f32], n: usize, k: usize, wblock: &[f32], out: &mut [f32]) {
    block_on(xs, n, k, wblock, out, 0);
}

/// [`block`], prefetching the weights `ahead` values ahead of the tile that reads them (at
/// least one tile; 0: one tile, for a `wblock` that does not continue past itself).
fn block_on(xs: &[f32], n: usize, k: usize, wblock: &[f32], out: &mut [f32], ahead: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature the function is compiled for (checked above).
            unsafe { avx512::block(xs, n, k, wblock, out, ahead) };
            return;
        }
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

/// The same with 16 lanes, on tiles of up to eight input rows by up to eight weight rows
/// (`avx512::tile_rows`): with 32 vector registers the tile's accumulators, its weight
/// vectors and one input vector fit, so each input vector loaded serves several products and
/// each weight vector up to eight (loads, not FMAs, bounded the one-weight-row version: 8 rows
/// of a 32k-vocabulary head ran 20–25% faster with two weight rows per tile).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Weight rows per tile for up to eight input rows, so that the tile's accumulators
    /// (input rows × weight rows) fill the 16 lanes of [`hsum16`]: eight for one or two rows
    /// (a single row's product, and an attention group's queries against the keys), four for
    /// three or four, two beyond.
    pub(super) fn tile_rows(n: usize) -> usize {
        match n {
            0..=2 => 8,
            3..=4 => 4,
            _ => 2,
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn block(
        xs: &[f32],
        n: usize,
        k: usize,
        wblock: &[f32],
        out: &mut [f32],
        ahead: usize,
    ) {
        let wrows = wblock.len() / k;
        let wide = tile_rows(n);
        let mut j = 0;
        while j < wrows {
            let t = if wrows - j >= wide { wide } else { 1 };
            let w = &wblock[j * k..(j + t) * k];
            let mut i = 0;
            while i < n {
                let r = (n - i).min(8);
                let x = &xs[i * k..(i + r) * k];
                // Every arm keeps R·W ≤ 16 (`tile_rows` gives W from n ≥ R).
                match (t, r) {
                    (8, 2) => put(out, n, j, i, &tile::<2, 8>(x, w, k, ahead)),
                    (8, _) => put(out, n, j, i, &tile::<1, 8>(x, w, k, ahead)),
                    (4, 4) => put(out, n, j, i, &tile::<4, 4>(x, w, k, ahead)),
                    (4, 3) => put(out, n, j, i, &tile::<3, 4>(x, w, k, ahead)),
                    (4, 2) => put(out, n, j, i, &tile::<2, 4>(x, w, k, ahead)),
                    (4, _) => put(out, n, j, i, &tile::<1, 4>(x, w, k, ahead)),
                    (2, 8) => put(out, n, j, i, &tile::<8, 2>(x, w, k, ahead)),
                    (2, 7) => put(out, n, j, i, &tile::<7, 2>(x, w, k, ahead)),
                    (2, 6) => put(out, n, j, i, &tile::<6, 2>(x, w, k, ahead)),
                    (2, 5) => put(out, n, j, i, &tile::<5, 2>(x, w, k, ahead)),
                    (2, 4) => put(out, n, j, i, &tile::<4, 2>(x, w, k, ahead)),
                    (2, 3) => put(out, n, j, i, &tile::<3, 2>(x, w, k, ahead)),
                    (2, 2) => put(out, n, j, i, &tile::<2, 2>(x, w, k, ahead)),
                    (2, _) => put(out, n, j, i, &tile::<1, 2>(x, w, k, ahead)),
                    (_, 8) => put(out, n, j, i, &tile::<8, 1>(x, w, k, ahead)),
                    (_, 7) => put(out, n, j, i, &tile::<7, 1>(x, w, k, ahead)),
                    (_, 6) => put(out, n, j, i, &tile::<6, 1>(x, w, k, ahead)),
                    (_, 5) => put(out, n, j, i, &tile::<5, 1>(x, w, k, ahead)),
                    (_, 4) => put(out, n, j, i, &tile::<4, 1>(x, w, k, ahead)),
                    (_, 3) => put(out, n, j, i, &tile::<3, 1>(x, w, k, ahead)),
                    (_, 2) => put(out, n, j, i, &tile::<2, 1>(x, w, k, ahead)),
                    _ => put(out, n, j, i, &tile::<1, 1>(x, w, k, ahead)),
                }
                i += r;
            }
            j += t;
        }
    }

    /// Writes a tile's products: weight row `j + a`, input row `i + r` at `out[(j + a)·n + i + r]`.
    #[inline(always)]
    fn put<const R: usize, const W: usize>(
        out: &mut [f32],
        n: usize,
        j: usize,
        i: usize,
        d: &[[f32; R]; W],
    ) {
        for (a, row) in d.iter().enumerate() {
            out[(j + a) * n + i..(j + a) * n + i + R].copy_from_slice(row);
        }
    }

    /// `x` holds `R` rows of `k` values, `w` `W` rows; every row of `x` dotted with every row
    /// of `w`, by weight row.
    #[target_feature(enable = "avx512f")]
    fn tile<const R: usize, const W: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        ahead: usize,
    ) -> [[f32; R]; W] {
        assert!(x.len() == R * k && w.len() == W * k);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        // Row a's value c is prefetched from `ahead` values on: the tile's W rows are one
        // contiguous run, so the lines ahead of it are each prefetched once.
        let ahead = ahead.max(W * k);
        // By input row, then weight row.
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        let full = k / 16 * 16;
        let mut c = 0;
        while c < full {
            // SAFETY: c + 16 <= k, so every load reads inside row a of `w` and row r of `x`.
            unsafe {
                let mut y = [_mm512_setzero_ps(); W];
                for (a, ya) in y.iter_mut().enumerate() {
                    *ya = _mm512_loadu_ps(wp.add(a * k + c));
                    // The weights ahead, one line per row and step ([`super::STREAM_AHEAD`]):
                    // they stream from L3 or memory, and with eight rows the FMAs left the
                    // hardware prefetcher too little ahead (a prefetch never faults, and the
                    // address is only formed, with wrapping arithmetic, past the weights).
                    // Into L2, not L1: on a Zen 4, L1 prefetches took the line-fill buffers
                    // the demand loads need, and a C replica over 112 MB of weights ran the
                    // 8-row product in 7.6–8.5 ms with them, 4.5–5.7 with these, and the
                    // 1-row one in 4.6–4.9 against 3.5–3.7 (none: 3.6–4.1).
                    _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(a * k + c + ahead) as *const i8);
                }
                for (r, by_w) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(xp.add(r * k + c));
                    for (s, ya) in by_w.iter_mut().zip(&y) {
                        *s = _mm512_fmadd_ps(xv, *ya, *s);
                    }
                }
            }
            c += 16;
        }
        if c < k {
            // The last k % 16 values; masked-off lanes are neither read nor faulted on.
            let m: __mmask16 = (1u16 << (k - c)) - 1;
            // SAFETY: the mask limits every load to the lanes below k.
            unsafe {
                let mut y = [_mm512_setzero_ps(); W];
                for (a, ya) in y.iter_mut().enumerate() {
                    *ya = _mm512_maskz_loadu_ps(m, wp.add(a * k + c));
                }
                for (r, by_w) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(m, xp.add(r * k + c));
                    for (s, ya) in by_w.iter_mut().zip(&y) {
                        *s = _mm512_fmadd_ps(xv, *ya, *s);
                    }
                }
            }
        }
        // The tile's horizontal sums in one tree (R·W ≤ 16 vectors into one): a reduction
        // per accumulator took four shuffles and four adds each, on the ports the FMAs use,
        // which with 64-value rows (attention scores) cost more than the products.
        let mut v = [_mm512_setzero_ps(); 16];
        for (r, by_w) in acc.iter().enumerate() {
            for (a, s) in by_w.iter().enumerate() {
                v[r * W + a] = *s;
            }
        }
        let mut sums = [0f32; 16];
        // SAFETY: `sums` holds 16 floats.
        unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), hsum16(&v)) };
        let mut out = [[0f32; R]; W];
        for (r, row) in sums.chunks_exact(W).take(R).enumerate() {
            for (o, &s) in out.iter_mut().zip(row) {
                o[r] = s;
            }
        }
        out
    }

    /// Lane `i` of the result is the sum of the lanes of `v[i]`: 30 shuffles and 15 adds in
    /// all. Each level pairs vectors and halves what is left to add per vector: 512-bit
    /// halves, then 128-bit quarters (each vector then holds four inputs, one per quarter),
    /// then within quarters; the inputs enter transposed (4 × 4) so that the sums come out in
    /// order.
    #[target_feature(enable = "avx512f")]
    pub(super) fn hsum16(v: &[__m512; 16]) -> __m512 {
        let u = |j: usize| v[(j % 4) * 4 + j / 4];
        let mut c = [_mm512_setzero_ps(); 8];
        for (i, ci) in c.iter_mut().enumerate() {
            let (a, b) = (u(2 * i), u(2 * i + 1));
            *ci = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            );
        }
        let mut e = [_mm512_setzero_ps(); 4];
        for (i, ei) in e.iter_mut().enumerate() {
            let (a, b) = (c[2 * i], c[2 * i + 1]);
            *ei = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            );
        }
        let g0 = _mm512_add_ps(
            _mm512_unpacklo_ps(e[0], e[1]),
            _mm512_unpackhi_ps(e[0], e[1]),
        );
        let g1 = _mm512_add_ps(
            _mm512_unpacklo_ps(e[2], e[3]),
            _mm512_unpackhi_ps(e[2], e[3]),
        );
        let (g0, g1) = (_mm512_castps_pd(g0), _mm512_castps_pd(g1));
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(g0, g1)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(g0, g1)),
        )
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
            (5, 33, 17),
            (11, 200, 31),
            (13, 15, 3),
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
    fn aligned_copies_start_on_a_cache_line_and_hold_the_values() {
        let src: Vec<f32> = (0..4099).map(|i| i as f32 * 0.5 - 7.0).collect();
        for (from, len) in [(0, 0), (0, 1), (1, 16), (3, 512), (5, 4094), (7, 3000)] {
            let a = Aligned::copy(&src[from..from + len]);
            assert_eq!(a.as_slice(), &src[from..from + len]);
            assert_eq!(
                a.as_slice().as_ptr() as usize % 64,
                0,
                "from {from}, {len} values"
            );
        }
    }

    /// The prefetch distance and the aligned copy of the inputs change where values are read
    /// from, never which lanes sum them: the products are bit for bit those of the plain
    /// kernel on the caller's (misaligned) rows.
    #[test]
    fn streaming_and_aligned_inputs_leave_the_products_bit_exact() {
        let (k, o) = (512, 67);
        let xs: Vec<f32> = (0..9 * k + 3)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let ws: Vec<f32> = (0..o * k)
            .map(|i| ((i * 104729) % 997) as f32 / 500.0 - 1.0)
            .collect();
        for n in [1, 2, 3, 5, 8] {
            // Three values in: rows that start 12 bytes past wherever the allocator put them.
            let x = &xs[3..3 + n * k];
            let mut plain = vec![0f32; o * n];
            block(x, n, k, &ws, &mut plain);
            let mut streamed = vec![0f32; o * n];
            block_on(x, n, k, &ws, &mut streamed, STREAM_AHEAD);
            assert_eq!(plain, streamed, "{n} rows");
            let xt = Tensor::from_slice(x, (n, k), &Device::Cpu).unwrap();
            let wt = Tensor::from_slice(&ws, (o, k), &Device::Cpu).unwrap();
            let y: Vec<f32> = linear_nt(&xt, &wt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for j in 0..o {
                for r in 0..n {
                    assert_eq!(
                        y[r * o + j].to_bits(),
                        plain[j * n + r].to_bits(),
                        "{n} rows"
                    );
                }
            }
        }
    }

    /// Every kernel this CPU can run, not only the one `block` picks, against an f64
    /// reference: CI machines differ in their vector extensions.
    #[test]
    fn every_kernel_matches_an_f64_reference() {
        type Kernel = Box<dyn Fn(&[f32], usize, usize, &[f32], &mut [f32])>;
        let mut kernels: Vec<(&str, Kernel)> = vec![(
            "portable",
            Box::new(|xs, n, k, w, out| {
                for (wrow, orow) in w.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
                    for (xrow, y) in xs.chunks_exact(k).zip(orow.iter_mut()) {
                        *y = dot(xrow, wrow);
                    }
                }
            }),
        )];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has the features (checked above).
                kernels.push((
                    "avx2",
                    Box::new(|xs, n, k, w, out| unsafe { avx2::block(xs, n, k, w, out) }),
                ));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the feature (checked above).
                kernels.push((
                    "avx512",
                    Box::new(|xs, n, k, w, out| unsafe { avx512::block(xs, n, k, w, out, 0) }),
                ));
            }
        }
        let mut rng = crate::policy::Rng::seed(3);
        for &(n, k, o) in &[
            (1, 64, 5),
            (8, 512, 7),
            (3, 37, 4),
            (9, 16, 3),
            (16, 100, 6),
            (5, 1, 2),
            // Full tiles of eight and four weight rows (one to four input rows) and their tails.
            (1, 64, 17),
            (2, 48, 19),
            (3, 40, 9),
            (4, 33, 10),
            (600, 64, 2),
        ] {
            let xs: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..o * k).map(|_| rng.normal() as f32).collect();
            for (name, kernel) in &kernels {
                let mut out = vec![f32::NAN; o * n];
                kernel(&xs, n, k, &w, &mut out);
                for j in 0..o {
                    for r in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| xs[r * k + c] as f64 * w[j * k + c] as f64)
                            .sum();
                        let got = out[j * n + r] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{name} ({n}, {k}, {o}) [{j}, {r}]: {got} vs {want}"
                        );
                    }
                }
            }
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
