//! `x · wᵀ` with bf16 inputs and f32 sums on Intel AMX tiles, for sampling on the CPU when
//! the policy allows bf16 products (`CandlePolicy::set_sampling_bf16`). Where the CPU has no
//! AMX, an AMD CPU with AVX512-BF16 (Zen 4 and later) takes every product to `vdpbf16ps`
//! ([`super::bf16_dot`]), and other CPUs with AVX-512 take decoding steps' products to bf16
//! weights widened to f32 ([`super::bf16_few_rows`]). This module holds what they share: the
//! per-thread setting, the weights' bf16 copies, the choice of backend.
//!
//! Sampling on the CPU is two kinds of work: decoding steps, bound by streaming every weight
//! once per step, and the prefill of prompts and tool outputs, arithmetic that batching
//! cannot share. f32 FMAs do that arithmetic at about 400 GFLOP/s on a 2-core Xeon; its AMX
//! tiles multiply bf16 at about 5.8 TFLOP/s (both measured on the development machine), so a
//! prefilled token and the extra rows of a batched decoding step become nearly free, which is
//! what makes 8 concurrent episodes cost little more than one. The result is what a GPU's
//! bf16 sampling computes: inputs rounded to bf16, sums in f32. The trainer's own forward
//! recomputes the behaviour log-probs in its precision before an update (point 5 of the
//! design), so the difference shows up only in the truncated importance weights.
//!
//! The policy keeps a bf16 copy of each weight ([`Bf16Weights`]), made on first use and
//! dropped whenever the weights change: a decoding step then streams half the bytes. The
//! input rows, few or a prefill's hundreds, are packed once per call in the tiles'
//! pair-interleaved layout.
//!
//! AMX has no stable intrinsics in Rust; the instructions are written as inline assembly
//! (the assembler knows them), on tile registers the compiler never allocates.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::cpu::{OutPtr, with_slice};

thread_local! {
    /// Where products on this thread may take bf16 inputs (set around a sampling forward):
    /// the policy's bf16 weight copies and the weights' version.
    static BF16_PRODUCTS: RefCell<Option<(Arc<Bf16Weights>, u64)>> = const { RefCell::new(None) };
}

/// Runs `f` with bf16 products allowed (`Some`: the policy's copies and its weights' version)
/// or not (`None`) on this thread, restoring the previous setting after, also when `f`
/// unwinds.
pub(crate) fn with_bf16_products<R>(
    on: Option<(Arc<Bf16Weights>, u64)>,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore(Option<(Arc<Bf16Weights>, u64)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            BF16_PRODUCTS.with(|c| *c.borrow_mut() = before);
        }
    }
    let _restore = Restore(BF16_PRODUCTS.with(|c| c.replace(on)));
    f()
}

/// A policy's weights as bf16, made on first use after each update (by the weights' version)
/// and kept: a decoding step then streams half the bytes of the f32 weights, and the tiles
/// load them as they lie. Keyed by the address and length of each weight's f32 data, which
/// the optimiser updates in place; a new version drops every copy.
#[derive(Default)]
pub(crate) struct Bf16Weights {
    copies: Mutex<(u64, CopyMap)>,
}

/// bf16 copies by the address and length of the f32 weight they were made from, and whether
/// in pairs of columns ([`super::bf16_dot`]) or in rows.
type CopyMap = HashMap<(usize, usize, bool), Arc<Vec<u16>>>;

impl std::fmt::Debug for Bf16Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bf16Weights").finish_non_exhaustive()
    }
}

impl Bf16Weights {
    /// The bf16 copy of `ws` (`o` rows of `k`) in the layout of the backend `on`: for AMX and
    /// the widening kernel, `o` padded to a multiple of 16 rows and `k` to a multiple of 32
    /// values with zeros; for `vdpbf16ps`, [`super::bf16_dot::convert_weights`]'s.
    fn get(&self, version: u64, ws: &[f32], o: usize, k: usize, on: Backend) -> Arc<Vec<u16>> {
        let pairs = on == Backend::Avx512Bf16;
        let key = (ws.as_ptr() as usize, ws.len(), pairs);
        let mut g = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != version {
            *g = (version, HashMap::new());
        }
        g.1.entry(key)
            .or_insert_with(|| {
                Arc::new(if pairs {
                    super::bf16_dot::convert_weights(ws, o, k)
                } else {
                    convert_weights(ws, o, k)
                })
            })
            .clone()
    }

    /// Drops every copy (the weights changed: an update, a checkpoint loaded).
    pub(crate) fn clear(&self) {
        let mut g = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        g.1.clear();
    }

    /// Bytes held by the copies.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        let g = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        g.1.values().map(|c| c.len() * 2).sum()
    }
}

/// `ws` (`o` rows of `k`) as bf16 rows of `kp` values, `o` padded to 16 rows.
fn convert_weights(ws: &[f32], o: usize, k: usize) -> Vec<u16> {
    let kp = k.div_ceil(KC) * KC;
    let mut out = vec![0u16; o.div_ceil(TR) * TR * kp];
    out.par_chunks_mut(TR * kp)
        .zip(ws.par_chunks(TR * k))
        .for_each(|(dst, src)| convert_block(src, k, kp, dst));
    out
}

/// What multiplies bf16 on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    /// AMX tiles (Sapphire Rapids and later, where the kernel exposes them).
    Amx,
    /// bf16 weights widened to f32 on AVX-512, for decoding steps ([`super::bf16_few_rows`]):
    /// where AMX is missing or hidden.
    Avx512,
    /// `vdpbf16ps` for every row count, on AMD CPUs with AVX512-BF16 ([`super::bf16_dot`]).
    Avx512Bf16,
}

/// The fastest bf16 products this CPU and kernel allow, if any. Linux hands a process the
/// (8 KiB) AMX tile state only on request, once, for all its threads.
pub(crate) fn backend() -> Option<Backend> {
    static BACKEND: OnceLock<Option<Backend>> = OnceLock::new();
    *BACKEND.get_or_init(|| {
        if detect() {
            Some(Backend::Amx)
        } else if super::bf16_dot::available() {
            Some(Backend::Avx512Bf16)
        } else if super::bf16_few_rows::available() {
            Some(Backend::Avx512)
        } else {
            None
        }
    })
}

/// Whether bf16 products can run here at all.
pub(crate) fn available() -> bool {
    backend().is_some()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that runs this (it reads registers).
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks the kernel for permission to use the
    // tile state; it reads and writes no memory of ours.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if granted != 0 {
        tracing::info!("the CPU has AMX but the kernel did not grant its tile state");
    }
    granted == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Whether [`linear_nt`] applies: bf16 products allowed on this thread and on this CPU, and a
/// CPU f32 product outside any backward graph whose weight lies contiguous (its bf16 copy is
/// found by the weight's address: a strided weight would be copied to a new one every call).
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    BF16_PRODUCTS.with(|c| c.borrow().is_some())
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.rank() == 2
        && w.rank() == 2
        && w.is_contiguous()
        && !x.track_op()
        && !w.track_op()
        && match backend() {
            Some(Backend::Amx | Backend::Avx512Bf16) => true,
            Some(Backend::Avx512) => x.dim(0).is_ok_and(|n| n <= super::bf16_few_rows::MAX_ROWS),
            None => false,
        }
}

/// Values of k per tile step: 16 pairs of bf16.
const KC: usize = 32;
/// Rows of a tile: weight rows per block, and input rows per column group.
const TR: usize = 16;

/// f32 → bf16, rounding to nearest even (the conversion of PyTorch and of the GPU kernels).
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    // A NaN stays a (quiet) NaN; a select rather than a branch, so the loops vectorise.
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

/// The value a bf16 bit pattern stands for.
#[cfg(test)]
fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `xs` (`n` rows of `k`) as the B operands of the tile products: for each group `g` of 16
/// input rows and each step `c` of 32 values of k, a 16 × 64-byte tile (at `(g·steps + c)`
/// tiles) whose row `p` holds, for each input row `r` of the group, its values `32c + 2p` and
/// `32c + 2p + 1`. Past `k` and past `n`, zeros. Groups are packed in parallel.
pub(crate) fn pack_inputs(xs: &[f32], n: usize, k: usize) -> Vec<u16> {
    let steps = k.div_ceil(KC);
    let groups = n.div_ceil(TR);
    let mut b = vec![0u16; groups * steps * TR * KC];
    b.par_chunks_mut(steps * TR * KC)
        .zip(xs[..n * k].par_chunks(TR * k))
        .for_each(|(tiles, rows)| pack_group(rows, k, tiles));
    b
}

/// One group's rows (up to 16 of `k`) into its tiles.
fn pack_group(rows: &[f32], k: usize, tiles: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the feature the function is compiled for (checked above).
        unsafe { pack_group_avx512(rows, k, tiles) };
        return;
    }
    pack_group_any(rows, k, tiles);
}

#[inline(always)]
fn pack_group_any(rows: &[f32], k: usize, tiles: &mut [u16]) {
    for (r, x) in rows.chunks_exact(k).enumerate() {
        for (c, chunk) in x.chunks(KC).enumerate() {
            let tile = &mut tiles[c * TR * KC..(c + 1) * TR * KC];
            for (p, pair) in chunk.chunks(2).enumerate() {
                for (e, &v) in pair.iter().enumerate() {
                    tile[p * KC + 2 * r + e] = bf16_bits(v);
                }
            }
        }
    }
}

/// The same packing with AVX-512: each row's 32 values of a step are rounded to bf16 as
/// [`bf16_bits`] does and narrowed into one vector of 16 pairs, then the group's 16 such
/// vectors are transposed as a 16 × 16 matrix of 32-bit pairs, which is the tile. The
/// compiled scalar loop wrote one 2-byte value at a time, 64 bytes apart: 40 % of a
/// prefill's product time in a profile (2048 rows × 512 → 1408: 5.5 ms a product before).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_group_avx512(rows: &[f32], k: usize, tiles: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = rows.len() / k;
    let steps = k.div_ceil(KC);
    assert!(n <= TR && rows.len() == n * k && tiles.len() >= steps * TR * KC);
    let round = |v: __m512| -> __m512i {
        let b = _mm512_castps_si512(v);
        let hi = _mm512_srli_epi32::<16>(b);
        let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
            b,
            _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)),
        ));
        // A NaN keeps its top bits and is made quiet, as in `bf16_bits`.
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)))
    };
    for c in 0..steps {
        let left = (k - c * KC).min(KC);
        let lo_mask: __mmask16 = if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        };
        let hi_mask: __mmask16 = if left >= 32 {
            0xffff
        } else if left > 16 {
            (1u16 << (left - 16)) - 1
        } else {
            0
        };
        let mut r = [_mm512_setzero_si512(); TR];
        for (i, ri) in r.iter_mut().enumerate().take(n) {
            let at = i * k + c * KC;
            // SAFETY: the masks limit the loads to the values below k of row i (inside `rows`).
            let (lo, hi) = unsafe {
                (
                    _mm512_maskz_loadu_ps(lo_mask, rows.as_ptr().add(at)),
                    _mm512_maskz_loadu_ps(hi_mask, rows.as_ptr().wrapping_add(at + 16)),
                )
            };
            let lo = _mm512_cvtepi32_epi16(round(lo));
            let hi = _mm512_cvtepi32_epi16(round(hi));
            // Row i's values 32c.. in order: as 32-bit lanes, its pairs.
            *ri = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        }
        // Tile row p: pair p of each of the group's rows.
        let tile = &mut tiles[c * TR * KC..(c + 1) * TR * KC];
        for (p, v) in transpose16(&r).iter().enumerate() {
            // SAFETY: tile row p is 32 values (64 bytes) inside `tile`.
            unsafe { _mm512_storeu_si512(tile.as_mut_ptr().add(p * KC).cast(), *v) };
        }
    }
}

/// Weight rows `rows` (each `k` long) as bf16 into `a` (16 rows of `kp`), zeros past `k` and
/// past the last row.
fn convert_block(rows: &[f32], k: usize, kp: usize, a: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the feature the function is compiled for (checked above).
        unsafe { convert_block_avx512(rows, k, kp, a) };
        return;
    }
    convert_block_any(rows, k, kp, a);
}

#[inline(always)]
fn convert_block_any(rows: &[f32], k: usize, kp: usize, a: &mut [u16]) {
    a.fill(0);
    for (src, dst) in rows.chunks_exact(k).zip(a.chunks_exact_mut(kp)) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16_bits(s);
        }
    }
}

/// The same loop, vectorised by the compiler for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn convert_block_avx512(rows: &[f32], k: usize, kp: usize, a: &mut [u16]) {
    convert_block_any(rows, k, kp, a);
}

/// `x (n, k) · wᵀ` for `w (o, k)`: `(n, o)`, inputs rounded to bf16, sums in f32, on this
/// CPU's [`backend`]. The caller checks [`applies`].
pub(crate) fn linear_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    match backend() {
        Some(b) => linear_nt_on(b, x, w),
        None => candle_core::bail!("bf16 products asked for on a CPU without AMX or AVX-512"),
    }
}

/// [`linear_nt`] on the given backend, which the caller knows this CPU has.
pub(crate) fn linear_nt_on(on: Backend, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let (o, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("linear: x has {k} columns, the weight {k2}");
    }
    if n == 0 || o == 0 || k == 0 {
        return Tensor::zeros((n, o), DType::F32, x.device());
    }
    let Some((copies, version)) = BF16_PRODUCTS.with(|c| c.borrow().clone()) else {
        candle_core::bail!("bf16 products outside a sampling forward");
    };
    let kp = k.div_ceil(KC) * KC;
    let mut y = vec![0f32; n * o];
    let out = OutPtr(y.as_mut_ptr());
    with_slice::<f32, _>(x, |xs| {
        with_slice::<f32, _>(w, |ws| {
            let wb = copies.get(version, ws, o, k, on);
            if on == Backend::Avx512Bf16 {
                return super::bf16_dot::linear(xs, n, k, &wb, o, &mut y);
            }
            if on == Backend::Avx512 {
                return super::bf16_few_rows::linear(xs, n, k, &wb, o, &mut y);
            }
            if backend() != Some(Backend::Amx) {
                candle_core::bail!("AMX products asked for on a CPU without AMX");
            }
            let blocks = o.div_ceil(TR);
            // A few tasks per thread, each a run of 16-row blocks.
            let per_task = blocks.div_ceil(4 * rayon::current_num_threads()).max(1);
            // The inputs in chunks of rows whose packed tiles stay in L2 while every weight
            // block passes them (a prefill's thousands of rows would not).
            for (ci, chunk) in xs.chunks(CHUNK_ROWS * k).enumerate() {
                let rows = chunk.len() / k;
                let b = pack_inputs(chunk, rows, k);
                wb.par_chunks(per_task * TR * kp)
                    .enumerate()
                    .for_each(|(t, wtask)| {
                        let j0 = t * per_task * TR;
                        // SAFETY: available() granted the tile state (checked above); `wtask`
                        // holds whole 16-row blocks of `kp` values; the task writes only
                        // rows ci·CHUNK_ROWS.. of the chunk and the columns j0.. its blocks
                        // cover, which no other task writes.
                        unsafe { task(&b, rows, kp, wtask, out, o, j0, ci * CHUNK_ROWS) };
                    });
            }
            Ok(())
        })
    })?;
    Tensor::from_vec(y, (n, o), x.device())
}

/// Input rows per pass over the weights: 256 rows of 1408 values pack into 720 KiB of tiles.
const CHUNK_ROWS: usize = 256;

/// The tile configuration `ldtilecfg` reads (palette 1): every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// One task's bf16 weight blocks `wtask` (16 rows of `kp` each, its first row is weight row
/// `j0`) against the packed inputs `b`: writes `y[(r0 + r)·o + j]`, weight row `j` dotted with
/// input row `r`, for its rows below `o`.
///
/// A decoding step (one group of up to 16 input rows) is bound by streaming the weights: per
/// block, two accumulators over even and odd steps (tmm0/tmm1, weights in tmm4/tmm5, inputs
/// in tmm6/tmm7), so that consecutive products do not wait for each other and a tile load
/// never waits for the product that read its register.
///
/// More groups (a prefill) are bound by the tile loads, not the products. There the task
/// walks pairs of its weight blocks and, for each, pairs of input groups: four accumulators
/// (tmm0–3) from two weight tiles (tmm4/tmm5) and two input tiles (tmm6/tmm7) per step, one
/// load per product (four groups per weight block took five loads per four products).
/// Measured on the 2-core Xeon, 2048 rows × 512 → 1408 (with the vector packing): 3.8–4.0
/// ms either way round (group pairs outside, or block pairs); the T1 hint on the weight
/// loads, to keep the inputs in L1, made it slower (4.6 ms). About 400 G products/s, a
/// sixth of what the tiles can do: what bounds it now is not found.
///
/// # Safety
/// The process must hold the AMX tile state ([`available`]), and the CPU AVX-512 (every AMX
/// CPU has it); `y` must point at the output, whose rows `r0..r0 + n` of `o` floats this task
/// writes in the columns it covers, which no other thread writes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn task(
    b: &[u16],
    n: usize,
    kp: usize,
    wtask: &[u16],
    y: OutPtr,
    o: usize,
    j0: usize,
    r0: usize,
) {
    use std::arch::asm;

    let steps = kp / KC;
    let groups = n.div_ceil(TR);
    // The blocks that hold weight rows below `o` (the copy pads `o` to 16 rows).
    let blocks = (wtask.len() / (TR * kp)).min(o.saturating_sub(j0).div_ceil(TR));
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    cfg.colsb[..8].fill(64);
    cfg.rows[..8].fill(TR as u8);
    let mut c = [[0f32; TR * TR]; 4];
    let a_stride = kp * 2;
    let ap = |blk: usize, s: usize| wtask.as_ptr().wrapping_add(blk * TR * kp + s * KC);
    let bp = |g: usize, s: usize| b.as_ptr().wrapping_add((g * steps + s) * TR * KC);
    // Accumulator tile `c` of weight block `blk` × input group `g` into `y`.
    let write = |c: &[f32; TR * TR], blk: usize, g: usize| {
        let jb = j0 + blk * TR;
        let col0 = g * TR;
        // SAFETY: rows r0 + col0.. (below r0 + n) and columns jb..jb + min(16, o − jb) of
        // `y`, this task's (the caller's contract); the CPU has AVX-512 (this function's).
        unsafe { write_tile(c, y, o, r0 + col0, (n - col0).min(TR), jb, (o - jb).min(TR)) };
    };
    // SAFETY (every asm block below): the tile loads read 16 rows of 64 bytes at the given
    // stride, inside `wtask` (block `blk < blocks`: 16 rows of kp values, the step's 32
    // values at offset 32·s) and inside `b` (tile (g, s), g < groups, at offset
    // (g·steps + s)·512 values, rows of 64 bytes); the stores write 16 rows of 64 bytes into
    // one of `c` (256 floats each). The compiler does not allocate tile registers, and the
    // configuration is loaded before any tile is used.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
    }
    macro_rules! load {
        ($t:literal, $ptr:expr, $stride:expr) => {
            asm!(concat!("tileloadd tmm", $t, ", [{0} + {1}*1]"), in(reg) $ptr, in(reg) $stride, options(nostack, readonly))
        };
    }
    macro_rules! dot {
        ($acc:literal, $a:literal, $b:literal) => {
            asm!(
                concat!("tdpbf16ps tmm", $acc, ", tmm", $a, ", tmm", $b),
                options(nostack, nomem)
            )
        };
    }
    macro_rules! store {
        ($t:literal, $ptr:expr) => {
            asm!(concat!("tilestored [{0} + {1}*1], tmm", $t), in(reg) $ptr, in(reg) 64usize, options(nostack))
        };
    }
    if groups == 1 {
        for blk in 0..blocks {
            unsafe {
                asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                let mut s = 0;
                while s < steps {
                    load!("4", ap(blk, s), a_stride);
                    load!("6", bp(0, s), 64usize);
                    dot!("0", "4", "6");
                    if s + 1 < steps {
                        load!("5", ap(blk, s + 1), a_stride);
                        load!("7", bp(0, s + 1), 64usize);
                        dot!("1", "5", "7");
                    }
                    s += 2;
                }
                store!("0", c[0].as_mut_ptr());
                store!("1", c[1].as_mut_ptr());
            }
            let [c0, c1, ..] = &mut c;
            for (v, w) in c0.iter_mut().zip(c1.iter()) {
                *v += w;
            }
            write(&c[0], blk, 0);
        }
    } else {
        let mut blk = 0;
        while blk < blocks {
            let two_blocks = blk + 1 < blocks;
            let mut g = 0;
            while g < groups {
                let two_groups = g + 1 < groups;
                unsafe {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                    for s in 0..steps {
                        load!("4", ap(blk, s), a_stride);
                        load!("6", bp(g, s), 64usize);
                        dot!("0", "4", "6");
                        if two_blocks {
                            load!("5", ap(blk + 1, s), a_stride);
                            dot!("2", "5", "6");
                        }
                        if two_groups {
                            load!("7", bp(g + 1, s), 64usize);
                            dot!("1", "4", "7");
                            if two_blocks {
                                dot!("3", "5", "7");
                            }
                        }
                    }
                    store!("0", c[0].as_mut_ptr());
                    if two_groups {
                        store!("1", c[1].as_mut_ptr());
                    }
                    if two_blocks {
                        store!("2", c[2].as_mut_ptr());
                    }
                    if two_groups && two_blocks {
                        store!("3", c[3].as_mut_ptr());
                    }
                }
                write(&c[0], blk, g);
                if two_groups {
                    write(&c[1], blk, g + 1);
                }
                if two_blocks {
                    write(&c[2], blk + 1, g);
                }
                if two_groups && two_blocks {
                    write(&c[3], blk + 1, g + 1);
                }
                g += 2;
            }
            blk += 2;
        }
    }
    unsafe {
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// A 16 × 16 matrix of 32-bit lanes transposed: lane `p` of `r[i]` to lane `i` of row `p`.
/// Within 128-bit lanes (pairs of rows, then quads), then across them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: &[std::arch::x86_64::__m512i; TR]) -> [std::arch::x86_64::__m512i; TR] {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); TR];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); TR];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // u[4i + j], 128-bit lane l: rows 4i..4i + 4 of column 4l + j.
    let mut out = [_mm512_setzero_si512(); TR];
    for j in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
        let v1 = _mm512_shuffle_i32x4::<0xdd>(u[j], u[4 + j]);
        let w0 = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
        let w1 = _mm512_shuffle_i32x4::<0xdd>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[4 + j] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[8 + j] = _mm512_shuffle_i32x4::<0xdd>(v0, w0);
        out[12 + j] = _mm512_shuffle_i32x4::<0xdd>(v1, w1);
    }
    out
}

/// Tile `c` (element `(m, r)`: weight row `jb + m`, input row `row0 + r`) into `y`, by input
/// row: its first `cols` rows, `nrows` columns each from `jb` on, one masked store a row
/// (the scalar loop it replaces wrote 256 floats one by one, 64 bytes apart in `c`).
///
/// # Safety
/// The CPU has AVX-512; `y` holds rows `row0..row0 + cols` of `o` floats, and columns
/// `jb..jb + nrows ≤ o` of them are the caller's to write.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn write_tile(
    c: &[f32; TR * TR],
    y: OutPtr,
    o: usize,
    row0: usize,
    cols: usize,
    jb: usize,
    nrows: usize,
) {
    use std::arch::x86_64::*;
    let mut rows = [_mm512_setzero_si512(); TR];
    for (m, v) in rows.iter_mut().enumerate() {
        // SAFETY: row m of the tile is 16 floats inside `c`.
        *v = unsafe { _mm512_loadu_si512(c.as_ptr().add(m * TR).cast()) };
    }
    let by_input = transpose16(&rows);
    let mask: __mmask16 = if nrows >= TR {
        0xffff
    } else {
        (1u16 << nrows) - 1
    };
    for (r, v) in by_input.iter().enumerate().take(cols) {
        // SAFETY: the mask limits the store to columns jb..jb + nrows of row row0 + r (the
        // caller's contract).
        unsafe { _mm512_mask_storeu_ps(y.at((row0 + r) * o + jb), mask, _mm512_castsi512_ps(*v)) };
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn task(_: &[u16], _: usize, _: usize, _: &[u16], _: OutPtr, _: usize, _: usize, _: usize) {
    unreachable!("AMX is x86-64 only, and available() says no elsewhere")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rounds_to_nearest_even_as_pytorch_does() {
        // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: to even (1). 1 + 3·2^-8 is halfway
        // between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6).
        assert_eq!(bf16_value(bf16_bits(1.0 + 2f32.powi(-8))), 1.0);
        assert_eq!(
            bf16_value(bf16_bits(1.0 + 3.0 * 2f32.powi(-8))),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(
            bf16_value(bf16_bits(1.0 + 2f32.powi(-8) + 2f32.powi(-20))),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(bf16_value(bf16_bits(-2.5)), -2.5);
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        // The largest finite f32 rounds up to infinity, as in PyTorch.
        assert_eq!(bf16_value(bf16_bits(f32::MAX)), f32::INFINITY);
    }

    /// The AVX-512 packing against the scalar loop it replaces, bit for bit: every group
    /// size, k on and off the 32-value step, and the values whose rounding is special
    /// (halfway cases, NaN, infinities, the largest f32, subnormals, signed zeros).
    #[test]
    fn vector_packing_matches_the_scalar_loop() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bw") {
            let special = [
                1.0 + 2f32.powi(-8),
                1.0 + 3.0 * 2f32.powi(-8),
                f32::NAN,
                -f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                f32::MIN_POSITIVE / 3.0,
                -0.0,
                0.0,
            ];
            let mut seed = 17u64;
            for k in [1usize, 5, 16, 17, 31, 32, 33, 64, 100, 512] {
                for n in 1..=16 {
                    let rows: Vec<f32> = (0..n * k)
                        .map(|i| {
                            seed = seed
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            if i % 7 == 3 {
                                special[(seed >> 33) as usize % special.len()]
                            } else {
                                ((seed >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0) as f32
                            }
                        })
                        .collect();
                    let len = k.div_ceil(KC) * TR * KC;
                    let mut want = vec![0u16; len];
                    pack_group_any(&rows, k, &mut want);
                    let mut got = vec![0u16; len];
                    // SAFETY: the CPU has AVX-512 F and BW (checked above).
                    unsafe { pack_group_avx512(&rows, k, &mut got) };
                    assert_eq!(got, want, "{n} rows of {k}");
                }
            }
        }
    }

    #[test]
    fn packs_pairs_of_each_input_row_by_step_and_group() {
        let (n, k) = (18, 40);
        let xs: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let b = pack_inputs(&xs, n, k);
        let (steps, groups) = (2, 2);
        assert_eq!(b.len(), steps * groups * TR * KC);
        for row in 0..n {
            for i in 0..k {
                let (g, r, c, p, e) = (row / TR, row % TR, i / KC, (i % KC) / 2, i % 2);
                let at = ((g * steps + c) * TR + p) * KC + 2 * r + e;
                assert_eq!(
                    bf16_value(b[at]),
                    bf16_value(bf16_bits((row * k + i) as f32))
                );
            }
        }
        // Past k (step 1 holds values 32..40 only) and past n (group 1 rows 2..16): zeros.
        let nonzero = b.iter().filter(|&&v| v != 0).count();
        assert_eq!(
            nonzero,
            n * k - 1,
            "only x[0][0] = 0 is a zero inside the inputs"
        );
    }

    /// `x · wᵀ` in f64 from the bf16-rounded inputs: what the tiles compute, up to f32 sums.
    fn reference(xs: &[f32], ws: &[f32], n: usize, o: usize, k: usize) -> Vec<f64> {
        let r = |v: f32| bf16_value(bf16_bits(v)) as f64;
        let mut y = vec![0f64; n * o];
        for i in 0..n {
            for j in 0..o {
                y[i * o + j] = (0..k).map(|c| r(xs[i * k + c]) * r(ws[j * k + c])).sum();
            }
        }
        y
    }

    #[test]
    fn tile_products_match_the_bf16_reference() {
        // Every backend this CPU has: an AMX machine checks the AVX-512 kernel too.
        let mut backends = Vec::new();
        if backend() == Some(Backend::Amx) {
            backends.push(Backend::Amx);
        }
        if super::super::bf16_dot::available() {
            backends.push(Backend::Avx512Bf16);
        }
        if super::super::bf16_few_rows::available() {
            backends.push(Backend::Avx512);
        }
        if backends.is_empty() {
            eprintln!("no AMX or AVX-512 on this CPU: the bf16 kernels are not exercised");
            return;
        }
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        };
        // Rows and columns off the tile sizes, several column groups, k off the 32-value
        // step, more rows than a chunk (AMX: 256 rows; AVX-512: 24 KiB of input rows, 6 rows
        // of 1024), every register tile shape.
        let shapes = [
            (1, 1, 32),
            (1, 33, 64),
            (2, 19, 40),
            (3, 17, 70),
            (5, 16, 32),
            (8, 100, 512),
            (17, 40, 96),
            (30, 50, 1024),
            (70, 20, 64),
            (300, 35, 64),
            // Tasks of several weight blocks (an odd number) against an odd number of groups:
            // every corner of the 2 × 2 prefill kernel.
            (33, 16 * 17 + 5, 64),
            // An odd k (a half pair) and tasks ending in fewer blocks than a tile's.
            (9, 16 * 13 + 3, 33),
            (3, 16 * 11 + 9, 45),
            (1, 16 * 29 + 1, 64),
            (2, 16 * 21, 31),
        ];
        for (&(n, o, k), &b) in shapes
            .iter()
            .flat_map(|s| backends.iter().map(move |b| (s, b)))
        {
            let xs: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let ws: Vec<f32> = (0..o * k).map(|_| next()).collect();
            let x = Tensor::from_vec(xs.clone(), (n, k), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(ws.clone(), (o, k), &Device::Cpu).unwrap();
            let copies = Arc::new(Bf16Weights::default());
            let got: Vec<f32> = with_bf16_products(Some((copies, 0)), || linear_nt_on(b, &x, &w))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = reference(&xs, &ws, n, o, k);
            let exact: Vec<f64> = (0..n * o)
                .map(|t| {
                    let (i, j) = (t / o, t % o);
                    (0..k)
                        .map(|c| xs[i * k + c] as f64 * ws[j * k + c] as f64)
                        .sum()
                })
                .collect();
            let mut worst_bf16 = 0f64;
            for (t, ((&g, &w), &e)) in got.iter().zip(&want).zip(&exact).enumerate() {
                // f32 sums of k products of bf16 inputs: a few ulps of the sum's magnitude.
                let err = (g as f64 - w).abs();
                assert!(
                    err < 1e-5 * (k as f64).sqrt() + 1e-6,
                    "{b:?} ({n},{o},{k}) [{t}] {g} vs {w}"
                );
                worst_bf16 = worst_bf16.max((g as f64 - e).abs());
            }
            // And it is the bf16 product, not the f32 one: inputs rounded to 8 bits of mantissa
            // move a sum of k unit-scale products by about 2^-9·sqrt(k).
            if k >= 64 {
                assert!(
                    worst_bf16 > 1e-4,
                    "{b:?} ({n},{o},{k}) no bf16 rounding seen: {worst_bf16}"
                );
            }
        }
    }

    #[test]
    fn a_new_version_of_the_weights_is_converted_again() {
        if !available() {
            eprintln!("no AMX or AVX-512 on this CPU: the bf16 kernels are not exercised");
            return;
        }
        let x = Tensor::ones((1, 32), DType::F32, &Device::Cpu).unwrap();
        let var = candle_core::Var::ones((2, 32), DType::F32, &Device::Cpu).unwrap();
        let w = var.as_tensor().clone();
        let copies = Arc::new(Bf16Weights::default());
        let run = |version: u64| {
            with_bf16_products(Some((copies.clone(), version)), || linear_nt(&x, &w))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(run(0), vec![32.0, 32.0]);
        assert_eq!(copies.bytes(), 16 * 32 * 2, "one weight, padded to 16 rows");
        // The optimiser updates the weights in place (same buffer); the copy of version 0
        // would still give 32.
        var.set(&Tensor::full(2f32, (2, 32), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(run(0), vec![32.0, 32.0], "same version: the copy is reused");
        assert_eq!(run(1), vec![64.0, 64.0]);
    }

    #[test]
    fn the_setting_is_per_thread_and_restored() {
        let x = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(!applies(&x, &w));
        let on = || Some((Arc::new(Bf16Weights::default()), 0));
        let inside = with_bf16_products(on(), || {
            let here = applies(&x, &w);
            let other = std::thread::scope(|s| s.spawn(|| applies(&x, &w)).join().unwrap());
            (here, other)
        });
        assert_eq!(inside, (available(), false));
        // A strided weight (a transposed view) keeps the f32 path.
        let wt = Tensor::zeros((32, 4), DType::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(!with_bf16_products(on(), || applies(&x, &wt)));
        assert!(!applies(&x, &w));
        let _ = std::panic::catch_unwind(|| with_bf16_products(on(), || panic!("unwinds")));
        assert!(!applies(&x, &w));
    }
}
