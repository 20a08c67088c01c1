//! `x · wᵀ` for the few rows of a decoding step, from bf16 weights, on AVX-512: the bf16
//! sampling of CPUs whose AMX tiles are missing or hidden (virtual machines often hide AMX;
//! older Xeons never had it) and that are not AMD's Zen 4 or later, which take
//! [`super::bf16_dot`] instead.
//!
//! A decoding step is bound by streaming every weight once; bf16 copies halve those bytes.
//! Each weight vector is widened to f32 in registers (a bf16 value is the top half of the
//! f32 with the same bits) and multiplied with f32 FMAs by inputs rounded to bf16: the
//! products are exactly those of bf16 inputs, the sums f32, as on AMX ([`super::amx`]) and on
//! a GPU. `vdpbf16ps` (AVX512-BF16) would do 32 products per instruction, but it issued at a
//! quarter of the FMA's rate on the development machine (1.6 against 6.2 G instructions/s a
//! core), half the products per second: prefills (many rows, bound by arithmetic) therefore
//! stay with the f32 products on such CPUs, and only products of up to [`MAX_ROWS`] rows
//! come here. On an AMD EPYC (Zen 4) `vdpbf16ps` issues at the FMA's rate (3.6 G/s each),
//! twice the products; a `vdpbf16ps` version of this kernel's layout, tried there, gained
//! nothing (each tile ends with sixteen horizontal sums), but one that keeps 16 output
//! columns in a vector's lanes halved the 8-row step's products: [`super::bf16_dot`].
//!
//! The loops follow the f32 few-row kernel ([`super::small_matmul`]): tiles of up to eight
//! input rows by up to eight weight rows keep their sums in registers, each weight vector
//! loaded serves every input row of the tile, and the next tile's weights are prefetched a
//! tile ahead. The weights come from the AMX path's bf16 copies (rows of a multiple of 32
//! values, row count a multiple of 16, zero-padded).

use rayon::prelude::*;

use super::amx::bf16_bits;
use super::cpu::OutPtr;

/// Values per vector step: 16 lanes.
const STEP: usize = 16;
/// Values per row of the bf16 copies and of the converted inputs: a multiple of this.
const ROW_MULTIPLE: usize = 32;
/// Weight rows per block of the bf16 copies (their row count is padded to a multiple of it).
const BLOCK: usize = 16;
/// Bytes of input rows per pass over a task's weights, to stay in the 48 KiB of L1 beside
/// the weight tile.
const CHUNK_BYTES: usize = 24 * 1024;

/// Up to this many input rows take this path (see [`super::amx::applies`]).
pub(crate) const MAX_ROWS: usize = 16;

/// Whether this CPU has AVX-512.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Input rows and weight rows of the register tile for `n` input rows: all sums of the tile
/// (rows × weight rows ≤ 16) and its weight and input vectors fit the 32 vector registers.
fn tile_shape(n: usize) -> (usize, usize) {
    match n {
        0..=1 => (1, 8),
        2 => (2, 8),
        3..=4 => (4, 4),
        _ => (8, 2),
    }
}

/// `y[r·o + j] = x[r] · w[j]` for `xs` (`n` rows of `k` f32) and `wb`, the bf16 copy of `w`
/// (`o` rows padded to a multiple of 16, each of `kp` values, `kp` the multiple of 32 at or
/// above `k`, zeros past `k`). `y` holds `n · o` values. The caller checks [`available`].
pub(crate) fn linear(
    xs: &[f32],
    n: usize,
    k: usize,
    wb: &[u16],
    o: usize,
    y: &mut [f32],
) -> candle_core::Result<()> {
    let kp = k.div_ceil(ROW_MULTIPLE) * ROW_MULTIPLE;
    let blocks = o.div_ceil(BLOCK);
    if xs.len() < n * k || y.len() < n * o || wb.len() < blocks * BLOCK * kp {
        candle_core::bail!(
            "bf16 product: {} inputs, {} weights, {} outputs for ({n}, {k}) · ({o}, {k})ᵀ",
            xs.len(),
            wb.len(),
            y.len()
        );
    }
    if n == 0 || o == 0 || kp == 0 {
        return Ok(());
    }
    let (rr, _) = tile_shape(n);
    // Zero rows up to a whole tile: their sums are computed and never written.
    let np = n.div_ceil(rr) * rr;
    let mut xb = vec![0f32; np * kp];
    for (dst, src) in xb.chunks_exact_mut(kp).zip(xs[..n * k].chunks_exact(k)) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((bf16_bits(v) as u32) << 16);
        }
    }
    let per_task = blocks.div_ceil(4 * rayon::current_num_threads()).max(1);
    let out = OutPtr(y.as_mut_ptr());
    let xb = &xb;
    wb[..blocks * BLOCK * kp]
        .par_chunks(per_task * BLOCK * kp)
        .enumerate()
        .for_each(|(t, wtask)| {
            let dims = Dims {
                n,
                np,
                kp,
                o,
                j0: t * per_task * BLOCK,
            };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available()` was checked by the caller; `wtask` holds whole padded
            // weight rows and `xb` whole padded input rows of `kp` values; the task writes
            // only the columns j0.. of its rows below `o`, which no other task writes.
            unsafe {
                task(xb, wtask, &dims, out)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (wtask, dims, out);
        });
    Ok(())
}

/// A task's place in the product.
struct Dims {
    /// Input rows, and rows of the converted inputs (a whole number of tiles).
    n: usize,
    np: usize,
    /// Values per converted row.
    kp: usize,
    /// Output columns, and the first weight row of the task.
    o: usize,
    j0: usize,
}

/// # Safety
/// See [`linear`]: the CPU has AVX-512, `xb` holds `np` rows and `wtask` whole rows of
/// `kp` values, `y` `n · o` floats of which this task alone writes its columns.
#[cfg(target_arch = "x86_64")]
unsafe fn task(xb: &[f32], wtask: &[u16], d: &Dims, y: OutPtr) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match tile_shape(d.n) {
            (1, _) => avx512::task::<1, 8>(xb, wtask, d, y),
            (2, _) => avx512::task::<2, 8>(xb, wtask, d, y),
            (4, _) => avx512::task::<4, 4>(xb, wtask, d, y),
            _ => avx512::task::<8, 2>(xb, wtask, d, y),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{CHUNK_BYTES, Dims, OutPtr, STEP};

    /// The task's weight rows in tiles of `W` against the inputs in tiles of `R` rows, input
    /// chunk by input chunk.
    ///
    /// # Safety
    /// See [`super::task`]; `np` is a multiple of `R`, the task's rows of `W`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn task<const R: usize, const W: usize>(
        xb: &[f32],
        wtask: &[u16],
        d: &Dims,
        y: OutPtr,
    ) {
        let kp = d.kp;
        let wrows = wtask.len() / kp;
        let chunk = (CHUNK_BYTES / (4 * kp)).max(1).div_ceil(R) * R;
        let mut x0 = 0;
        while x0 < d.np {
            let x1 = (x0 + chunk).min(d.np);
            let mut jt = 0;
            while jt + W <= wrows {
                let mut i = x0;
                while i < x1 {
                    // SAFETY: rows i..i + R of `xb` (np is a multiple of R) and rows
                    // jt..jt + W of `wtask` lie inside the slices.
                    let s = unsafe {
                        tile::<R, W>(xb.as_ptr().add(i * kp), wtask.as_ptr().add(jt * kp), kp)
                    };
                    for (r, by_w) in s.iter().enumerate() {
                        if i + r >= d.n {
                            break;
                        }
                        for (a, &v) in by_w.iter().enumerate() {
                            let j = d.j0 + jt + a;
                            if j < d.o {
                                // SAFETY: i + r < n and j < o: inside `y`, in this task's
                                // columns.
                                unsafe { *y.at((i + r) * d.o + j) = v };
                            }
                        }
                    }
                    i += R;
                }
                jt += W;
            }
            x0 = x1;
        }
    }

    /// Sums of `R` input rows at `x` (f32 holding bf16 values) by `W` weight rows at `w`
    /// (bf16), each `kp` values apart.
    ///
    /// # Safety
    /// `R` rows at `x` and `W` rows at `w` of `kp` values (a multiple of 16) are readable.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const W: usize>(
        x: *const f32,
        w: *const u16,
        kp: usize,
    ) -> [[f32; W]; R] {
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        let mut c = 0;
        while c < kp {
            let mut wv = [_mm512_setzero_ps(); W];
            for (a, v) in wv.iter_mut().enumerate() {
                // SAFETY: c + 16 <= kp, inside weight row a. A bf16 value is the top half
                // of the f32 with the same bits: widen, shift. The prefetch is of the next
                // tile's row, a tile ahead of the stream, into L2 as in the f32 kernel
                // (`small_matmul`) (it never faults; the address is formed with wrapping
                // arithmetic past the weights).
                unsafe {
                    let h = _mm256_loadu_si256(w.add(a * kp + c) as *const __m256i);
                    *v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
                    _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((W + a) * kp + c) as *const i8);
                }
            }
            for (r, sums) in acc.iter_mut().enumerate() {
                // SAFETY: c + 16 <= kp, inside input row r.
                let xv = unsafe { _mm512_loadu_ps(x.add(r * kp + c)) };
                for (s, &v) in sums.iter_mut().zip(&wv) {
                    *s = _mm512_fmadd_ps(xv, v, *s);
                }
            }
            c += STEP;
        }
        let mut out = [[0f32; W]; R];
        for (o, a) in out.iter_mut().zip(&acc) {
            for (v, s) in o.iter_mut().zip(a) {
                *v = _mm512_reduce_add_ps(*s);
            }
        }
        out
    }
}
