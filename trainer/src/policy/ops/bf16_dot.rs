//! `x · wᵀ` with bf16 inputs and f32 sums by `vdpbf16ps` (AVX512-BF16), for every row count:
//! the bf16 sampling of AMD's Zen 4 and later, which have no AMX but run `vdpbf16ps` at the
//! rate of an f32 FMA while it does twice the products (32 against 16 a vector).
//!
//! Measured on a 2-core AMD EPYC (Zen 4), the bench model of `trainer bench rollout`: the
//! widening kernel ([`super::bf16_few_rows`]) took an 8-row decoding step to 4.19 ms against
//! 1.54 ms for one row, bound by its FMAs and by the sixteen horizontal sums each tile ends
//! with, and prefills stayed with f32 products (0.2 ms a token). This kernel keeps the sums
//! of 16 output columns in the lanes of one vector, so a tile ends with vector stores and no
//! horizontal sum, and the same tiles serve a prefill's hundreds of rows.
//!
//! Layouts. The weights' bf16 copy is in blocks of 16 output rows; a block holds, for each
//! pair `p` of input positions, the pairs `(w[j][2p], w[j][2p+1])` of its 16 rows, one
//! 64-byte vector (the layout AMX and VNNI instructions call pair-interleaved). An input row
//! is its pairs of bf16 values, one 32-bit word each, which the kernel broadcasts: one
//! `vdpbf16ps` multiplies one input row's pair into the 16 columns of a block. A tile holds
//! up to eight input rows against up to eight blocks in registers.
//!
//! Sums: `vdpbf16ps` adds the pair's two products to the f32 sum one after the other, rounding
//! to nearest even, and flushes subnormal inputs and results to zero (Intel's definition,
//! which Zen 4 follows), so its sums equal an f32 sum of the bf16 products up to the order and
//! to values below 2^-126. Intel CPUs take AMX ([`super::amx`]) where they have it: the Xeon
//! this was developed on issued `vdpbf16ps` at a quarter of its FMA rate, so where AMX is
//! hidden there the widening kernel stays.

use rayon::prelude::*;

use super::amx::bf16_bits;
use super::cpu::OutPtr;

/// Output columns per block: the lanes of a vector.
pub(crate) const BLOCK: usize = 16;
/// Bytes of input pairs per pass over a task's weights: a chunk of rows stays in the 1 MiB
/// L2 beside a tile's weight blocks while those pass every row of the chunk.
const CHUNK_BYTES: usize = 192 * 1024;

/// Whether this CPU runs this kernel well: AVX512-BF16 on an AMD CPU (Zen 4 or later). Asked
/// once: in a virtual machine every CPUID is a trip to the hypervisor.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && is_amd()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the CPU says it is AMD's (CPUID leaf 0's vendor string).
#[cfg(target_arch = "x86_64")]
fn is_amd() -> bool {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 0 exists on every x86-64 CPU (it reads registers).
    let leaf = unsafe { std::arch::x86_64::__cpuid(0) };
    // "AuthenticAMD" in EBX, EDX, ECX.
    leaf.ebx == 0x6874_7541 && leaf.edx == 0x6974_6e65 && leaf.ecx == 0x444d_4163
}

/// Pairs of values per row for `k` inputs.
fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// The bf16 copy of `ws` (`o` rows of `k`) in this kernel's layout: `o.div_ceil(16)` blocks of
/// `pairs(k)` vectors of 16 pairs; zeros past `k` and past `o`. Rounded as [`bf16_bits`].
pub(crate) fn convert_weights(ws: &[f32], o: usize, k: usize) -> Vec<u16> {
    let kq = pairs(k);
    let mut out = vec![0u16; o.div_ceil(BLOCK) * kq * BLOCK * 2];
    out.par_chunks_mut(kq * BLOCK * 2)
        .zip(ws[..o * k].par_chunks(BLOCK * k))
        .for_each(|(dst, rows)| {
            for (lane, row) in rows.chunks_exact(k).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    dst[((c / 2) * BLOCK + lane) * 2 + c % 2] = bf16_bits(v);
                }
            }
        });
    out
}

/// An input row as pairs of bf16 values (`dst` holds `pairs(src.len())`): the value at `2p` in
/// the low half of word `p`, at `2p + 1` in the high half, rounded as [`bf16_bits`] except
/// that subnormal values become zeros, which `vdpbf16ps` makes of them anyway.
fn convert_row(src: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        unsafe { avx512::convert_row(src, dst) };
        return;
    }
    convert_row_any(src, dst);
}

fn convert_row_any(src: &[f32], dst: &mut [u32]) {
    for (d, pair) in dst.iter_mut().zip(src.chunks(2)) {
        let hi = pair.get(1).map_or(0, |&v| bf16_bits(v));
        *d = bf16_bits(pair[0]) as u32 | (hi as u32) << 16;
    }
}

/// Input and weight rows of the register tile for `n` input rows: `rows · blocks` sums, the
/// blocks' vectors and a broadcast fit the 32 vector registers.
fn tile_shape(n: usize) -> (usize, usize) {
    match n {
        0..=1 => (1, 8),
        2 => (2, 8),
        3..=4 => (4, 6),
        _ => (8, 3),
    }
}

/// `y[r·o + j] = x[r] · w[j]` for `xs` (`n` rows of `k` f32, rounded to bf16 here) and `wb`,
/// the copy of `w` made by [`convert_weights`]. `y` holds `n · o` values. The caller checks
/// [`available`].
pub(crate) fn linear(
    xs: &[f32],
    n: usize,
    k: usize,
    wb: &[u16],
    o: usize,
    y: &mut [f32],
) -> candle_core::Result<()> {
    let kq = pairs(k);
    let blocks = o.div_ceil(BLOCK);
    let block_len = kq * BLOCK * 2;
    if xs.len() < n * k || y.len() < n * o || wb.len() < blocks * block_len {
        candle_core::bail!(
            "bf16 product: {} inputs, {} weights, {} outputs for ({n}, {k}) · ({o}, {k})ᵀ",
            xs.len(),
            wb.len(),
            y.len()
        );
    }
    if n == 0 || o == 0 || k == 0 {
        return Ok(());
    }
    let (rr, wr) = tile_shape(n);
    // Zero rows up to a whole tile: their sums are computed and never written.
    let np = n.div_ceil(rr) * rr;
    let mut xp = vec![0u32; np * kq];
    xp.par_chunks_mut(kq)
        .zip(xs[..n * k].par_chunks(k))
        .for_each(|(dst, src)| convert_row(src, dst));
    // A few tasks per thread, each a run of whole tiles' blocks.
    let per_task = blocks
        .div_ceil(4 * rayon::current_num_threads())
        .div_ceil(wr)
        .max(1)
        * wr;
    let out = OutPtr(y.as_mut_ptr());
    let xp = &xp;
    wb[..blocks * block_len]
        .par_chunks(per_task * block_len)
        .enumerate()
        .for_each(|(t, wtask)| {
            let d = Dims {
                n,
                np,
                kq,
                o,
                j0: t * per_task * BLOCK,
            };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available()` was checked by the caller; `wtask` holds whole blocks and
            // `xp` whole padded rows of `kq` pairs; the task writes only the columns j0.. of
            // its blocks, of rows below `n` and columns below `o`, which no other task writes.
            unsafe {
                task(xp, wtask, &d, rr, wr, out)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (wtask, d, out);
        });
    Ok(())
}

/// A task's place in the product.
struct Dims {
    /// Input rows, and rows of the converted inputs (a whole number of tiles).
    n: usize,
    np: usize,
    /// Pairs per row.
    kq: usize,
    /// Output columns, and the first column of the task.
    o: usize,
    j0: usize,
}

/// The task's blocks, `wr` at a time (fewer at its end), against the inputs `rr` rows at a
/// time, chunk of rows by chunk.
///
/// # Safety
/// See [`linear`]: the CPU has AVX512-BF16, `np` is a multiple of `rr`.
#[cfg(target_arch = "x86_64")]
unsafe fn task(xp: &[u32], wtask: &[u16], d: &Dims, rr: usize, wr: usize, y: OutPtr) {
    let block_len = d.kq * BLOCK * 2;
    let nblocks = wtask.len() / block_len;
    let chunk = (CHUNK_BYTES / (4 * d.kq)).max(1).div_ceil(rr) * rr;
    let mut x0 = 0;
    while x0 < d.np {
        let x1 = (x0 + chunk).min(d.np);
        let mut b = 0;
        while b < nblocks {
            let wn = wr.min(nblocks - b);
            let mut i = x0;
            while i < x1 {
                let at = Tile {
                    x: xp[i * d.kq..].as_ptr(),
                    w: wtask[b * block_len..].as_ptr(),
                    rows: d.n.saturating_sub(i).min(rr),
                    j: d.j0 + b * BLOCK,
                    i,
                };
                // SAFETY: rows i..i + rr of `xp` and blocks b..b + wn of `wtask` lie inside
                // the slices (np is a multiple of rr); forwarded from the caller.
                unsafe {
                    match (rr, wn) {
                        (1, 8) => avx512::tile::<1, 8>(&at, d, y),
                        (1, w) => avx512::tile_dyn::<1>(w, &at, d, y),
                        (2, 8) => avx512::tile::<2, 8>(&at, d, y),
                        (2, w) => avx512::tile_dyn::<2>(w, &at, d, y),
                        (4, 6) => avx512::tile::<4, 6>(&at, d, y),
                        (4, w) => avx512::tile_dyn::<4>(w, &at, d, y),
                        (_, 3) => avx512::tile::<8, 3>(&at, d, y),
                        (_, w) => avx512::tile_dyn::<8>(w, &at, d, y),
                    }
                }
                i += rr;
            }
            b += wn;
        }
        x0 = x1;
    }
}

/// Where a tile starts: its first input row's pairs, its first block, how many of its rows
/// are real (the rest padding), the output column of its first block and its first row.
struct Tile {
    x: *const u32,
    w: *const u16,
    rows: usize,
    j: usize,
    i: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Dims, OutPtr, Tile};

    /// [`super::convert_row`] by `vcvtne2ps2bf16`: 32 values to 16 pairs an instruction,
    /// in order (a row's bf16 values in order are its pairs, low half first). The compiled
    /// scalar rounding took 6 % of an 8-episode rollout's time.
    ///
    /// # Safety
    /// The CPU has AVX512-BF16; `dst` holds at least `src.len().div_ceil(2)` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn convert_row(src: &[f32], dst: &mut [u32]) {
        let k = src.len();
        assert!(dst.len() >= k.div_ceil(2));
        let mask = |left: usize| -> __mmask16 {
            if left >= 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            }
        };
        let mut i = 0;
        while i < k {
            let left = k - i;
            // SAFETY: the masks limit the loads to values below k and the store to the
            // pairs they make, inside `dst`.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(mask(left), src.as_ptr().add(i));
                let hi = _mm512_maskz_loadu_ps(
                    mask(left.saturating_sub(16)),
                    src.as_ptr().wrapping_add(i + 16),
                );
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi32(
                    dst.as_mut_ptr().add(i / 2).cast(),
                    mask(left.div_ceil(2)),
                    v,
                );
            }
            i += 32;
        }
    }

    /// A tile of fewer blocks than its shape's at the end of a task: the largest shape of
    /// `R` rows that fits, then the rest.
    ///
    /// # Safety
    /// As [`tile`], for `w` blocks.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile_dyn<const R: usize>(w: usize, at: &Tile, d: &Dims, y: OutPtr) {
        let block_len = d.kq * BLOCK * 2;
        let mut b = 0;
        while b < w {
            let part = Tile {
                x: at.x,
                w: at.w.wrapping_add(b * block_len),
                rows: at.rows,
                j: at.j + b * BLOCK,
                i: at.i,
            };
            // SAFETY: the blocks b.. lie inside the caller's `w` blocks.
            unsafe {
                match w - b {
                    1 => tile::<R, 1>(&part, d, y),
                    2 => tile::<R, 2>(&part, d, y),
                    _ => tile::<R, 3>(&part, d, y),
                }
            }
            b += (w - b).min(3);
        }
    }

    /// Sums of `R` input rows by `W` blocks, written to `y` for the tile's real rows and for
    /// columns below `o`.
    ///
    /// # Safety
    /// `R` rows of `kq` pairs at `at.x` and `W` blocks at `at.w` are readable; the CPU has
    /// AVX512-BF16; the tile's outputs are this task's alone.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile<const R: usize, const W: usize>(at: &Tile, d: &Dims, y: OutPtr) {
        let kq = d.kq;
        let block_len = kq * BLOCK * 2;
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        for p in 0..kq {
            let mut wv = [_mm512_setzero_si512(); W];
            for (b, v) in wv.iter_mut().enumerate() {
                // SAFETY: pair p of block b, 64 bytes inside the block. The prefetch reads
                // the stream 2 KiB ahead into L2 (it never faults; the address is formed with
                // wrapping arithmetic past the weights).
                unsafe {
                    let src = at.w.add(b * block_len + p * BLOCK * 2);
                    *v = _mm512_loadu_si512(src.cast());
                    _mm_prefetch::<_MM_HINT_T1>(src.wrapping_add(1024).cast());
                }
            }
            for (r, sums) in acc.iter_mut().enumerate() {
                // SAFETY: pair p of input row r.
                let xv = _mm512_set1_epi32(unsafe { *at.x.add(r * kq + p) } as i32);
                for (s, &v) in sums.iter_mut().zip(&wv) {
                    // SAFETY: both are 64-byte vectors of 32 bf16 values.
                    let (a, b) = unsafe {
                        (
                            std::mem::transmute::<__m512i, __m512bh>(v),
                            std::mem::transmute::<__m512i, __m512bh>(xv),
                        )
                    };
                    *s = _mm512_dpbf16_ps(*s, a, b);
                }
            }
        }
        for (r, sums) in acc.iter().enumerate().take(at.rows) {
            let row = (at.i + r) * d.o;
            for (b, s) in sums.iter().enumerate() {
                let j = at.j + b * BLOCK;
                if j >= d.o {
                    break;
                }
                let left = d.o - j;
                let mask: __mmask16 = if left >= BLOCK {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                // SAFETY: row i + r < n, columns j.. below o (masked): inside `y`, this
                // task's columns.
                unsafe { _mm512_mask_storeu_ps(y.at(row + j), mask, *s) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_conversion_rounds_as_the_scalar_one() {
        if !available() {
            eprintln!("no AVX512-BF16 on an AMD CPU here: the vdpbf16ps kernel is not exercised");
            return;
        }
        let mut special = vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            // Halfway between two bf16 values, below and above an even one.
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x3f80_7fff),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        special.extend((0..200).map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            f32::from_bits((seed >> 32) as u32)
        }));
        for k in [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 214] {
            let src = &special[..k];
            let mut got = vec![0xdead_beefu32; k.div_ceil(2) + 3];
            let mut want = vec![0xdead_beefu32; k.div_ceil(2) + 3];
            convert_row(src, &mut got);
            convert_row_any(src, &mut want);
            for (p, (&g, &w)) in got.iter().zip(&want).enumerate() {
                for half in 0..2 {
                    let (g, w) = ((g >> (16 * half)) as u16, (w >> (16 * half)) as u16);
                    let v = src.get(2 * p + half).copied().unwrap_or(0.0);
                    if v.is_subnormal() {
                        assert_eq!(g & 0x7fff, 0, "k {k} value {v:e}: subnormals become zeros");
                    } else {
                        assert_eq!(g, w, "k {k} pair {p} half {half} value {v:e}");
                    }
                }
            }
        }
    }
}
