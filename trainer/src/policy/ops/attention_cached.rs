//! Attention of a conversation's few new query rows against its cached keys and values, on
//! the CPU, without a backward: the attention of a decoding step.
//!
//! Through candle's primitives, each row of a decoding batch cost a dozen small ops per layer
//! (the key transpose, two products, the softmax, the head transpose) and copies of the cache
//! view, about 130 µs a row and layer at 600 cached tokens: at eight rows, half of the step.
//! Here a step's conversations ([`Segment`]s, each with its own cache) go in one call per
//! layer, one task per (conversation, key/value head): it reads the keys and values where the
//! cache holds them (each head's positions are rows of `head_dim` contiguous values inside
//! the preallocated buffer), dots the group's query rows with every key it may see
//! ([`small_matmul::block`]), takes the softmax of each query row over its visible keys and
//! sums the value rows it weighs.
//!
//! Caches may hold bf16 keys and values (a policy sampling with bf16 products keeps them so,
//! `policy/batcher.rs`): a decoding step's rows each read their whole cache, which the
//! weights streaming through the last-level cache every step have evicted, so the attention
//! of eight rows at a few hundred cached tokens is bound by the memory's rate, and half the
//! bytes is about half the time. Their rows are widened to f32 a chunk of [`WIDEN_KEYS`]
//! positions at a time into a buffer that stays in L1, and the sums are the f32 ones.
//!
//! Same maths and shapes as [`super::attention_heads`]: `q (b, heads, tq, hd)`, `k` and `v`
//! `(b, kv_heads, tk, hd)`, output `(b·tq, heads·hd)`, the query heads `kv·groups ..
//! (kv+1)·groups` sharing key/value head `kv`, row `t` at position `offset + t` seeing the
//! keys `key_start[b] ..= offset + t`.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, bail};
use rayon::prelude::*;

use super::cpu::{Real, lane_max, multiversion};
use super::small_matmul;
use super::softmax::AttentionMask;

/// Query positions per conversation up to which this path applies: a decoding step's one, or
/// a turn's appended tool output. Longer calls (prompts) go to candle's products, which
/// scale better; this path computes a call's scores against every key up to its last query
/// and discards the masked ones, at most half of them (a call starting an empty cache).
pub(crate) const MAX_QUERY_ROWS: usize = 128;

/// Whether [`attention`] applies: f32 on the CPU outside any backward graph, few query
/// rows, and keys and values whose head rows are contiguous.
pub(crate) fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    queries_apply(q) && q.dim(2).is_ok_and(|tq| tq <= MAX_QUERY_ROWS) && cache_applies(k, v)
}

fn queries_apply(q: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == DType::F32 && !q.track_op()
}

/// Keys and values f32 or bf16 (both the same) on the CPU outside any graph, each head's
/// positions rows of `hd` contiguous values (a cache buffer, or a view of its first
/// positions).
fn cache_applies(k: &Tensor, v: &Tensor) -> bool {
    k.dtype() == v.dtype()
        && [k, v].iter().all(|t| {
            let s = t.layout().stride();
            t.device().is_cpu()
                && matches!(t.dtype(), DType::F32 | DType::BF16)
                && !t.track_op()
                && t.rank() == 4
                && s[3] == 1
                && t.dim(3).is_ok_and(|hd| s[2] == hd)
        })
}

/// Positions of a bf16 cache widened at a time: 64 rows of 64 values are 16 KiB of f32, which
/// stay in L1 while the group's queries use them.
pub(crate) const WIDEN_KEYS: usize = 64;

/// A head's cached rows, as the cache holds them.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
}

/// Where a head's rows of a key or value tensor start, by (batch row, head).
struct HeadRows<'a> {
    data: Rows<'a>,
    start: usize,
    batch_stride: usize,
    head_stride: usize,
}

impl<'a> HeadRows<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let s = layout.stride();
        let data = match storage {
            CpuStorage::BF16(v) => Rows::Bf16(half::slice::HalfFloatSliceExt::reinterpret_cast(
                v.as_slice(),
            )),
            other => Rows::F32(other.as_slice::<f32>()?),
        };
        Ok(Self {
            data,
            start: layout.start_offset(),
            batch_stride: s[0],
            head_stride: s[1],
        })
    }

    /// The first `rows` rows of `hd` values of head `h` of batch row `b`.
    fn rows(&self, b: usize, h: usize, rows: usize, hd: usize) -> Result<Rows<'a>> {
        let a = self.start + b * self.batch_stride + h * self.head_stride;
        let got = match self.data {
            Rows::F32(d) => d.get(a..a + rows * hd).map(Rows::F32),
            Rows::Bf16(d) => d.get(a..a + rows * hd).map(Rows::Bf16),
        };
        match got {
            Some(r) => Ok(r),
            None => bail!("cached attention: head rows outside the key/value storage"),
        }
    }
}

/// One conversation's part of an attention call: its query positions, its cached keys and
/// values (batch row `batch` of `k` and `v`), and which of them each query sees.
pub(crate) struct Segment<'a> {
    /// Batch row of the queries, and their first position in it.
    pub q_batch: usize,
    pub q_start: usize,
    pub tq: usize,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub kv_batch: usize,
    /// Cached positions before this call: query `t` sits at `offset + t`.
    pub offset: usize,
    /// The first key that is not left padding.
    pub key_start: usize,
}

/// Whether [`segments_attention`] applies to these segments of `q`: [`applies`] to each
/// (few query rows each).
pub(crate) fn applies_to_segments(q: &Tensor, segments: &[Segment<'_>]) -> bool {
    queries_apply(q)
        && segments
            .iter()
            .all(|s| s.tq <= MAX_QUERY_ROWS && cache_applies(s.k, s.v))
}

/// `softmax(scale · q·kᵀ, masked) · v` for inputs [`applies`] accepted.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask,
) -> Result<Tensor> {
    let b = q.dim(0)?;
    let segments: Vec<Segment<'_>> = (0..b)
        .map(|bi| Segment {
            q_batch: bi,
            q_start: 0,
            tq: mask.tq,
            k,
            v,
            kv_batch: bi,
            offset: mask.offset,
            key_start: mask.key_start.get(bi).copied().unwrap_or(0),
        })
        .collect();
    segments_attention(q, &segments, scale)
}

/// The attention of several conversations in one call, each against its own cache: `q`
/// `(b, heads, t, hd)` holds every segment's queries; the output is `(Σ tq, heads·hd)`, the
/// segments' rows in order. One task per (segment, key/value head), so that a decoding
/// step's rows share one dispatch per layer.
pub(crate) fn segments_attention(
    q: &Tensor,
    segments: &[Segment<'_>],
    scale: f64,
) -> Result<Tensor> {
    let (qb, h, qt, hd) = q.dims4()?;
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let Storage::Cpu(qs) = &*qs else {
        bail!("cached attention: expected CPU tensors");
    };
    let qs = super::cpu::slice::<f32>(qs, ql)?;
    struct Plan<'a> {
        keys: HeadRows<'a>,
        values: HeadRows<'a>,
        kvh: usize,
    }
    let guards: Vec<_> = segments
        .iter()
        .map(|s| (s.k.storage_and_layout(), s.v.storage_and_layout()))
        .collect();
    let mut plans = Vec::with_capacity(segments.len());
    let mut rows_before = Vec::with_capacity(segments.len());
    let mut total = 0;
    for (s, ((ks, kl), (vs, vl))) in segments.iter().zip(&guards) {
        let (_, kvh, tk, khd) = s.k.dims4()?;
        if s.v.dims() != s.k.dims()
            || khd != hd
            || kvh == 0
            || h % kvh != 0
            || s.q_batch >= qb
            || s.q_start + s.tq > qt
            || s.offset + s.tq > tk
        {
            bail!(
                "cached attention: queries {:?} (rows {}..{}) and keys {:?} do not fit (offset {})",
                q.dims(),
                s.q_start,
                s.q_start + s.tq,
                s.k.dims(),
                s.offset
            );
        }
        let (Storage::Cpu(ks), Storage::Cpu(vs)) = (&**ks, &**vs) else {
            bail!("cached attention: expected CPU tensors");
        };
        plans.push(Plan {
            keys: HeadRows::new(ks, kl)?,
            values: HeadRows::new(vs, vl)?,
            kvh,
        });
        rows_before.push(total);
        total += s.tq;
    }
    let tasks: Vec<(usize, usize)> = plans
        .iter()
        .enumerate()
        .flat_map(|(i, p)| (0..p.kvh).map(move |kv| (i, kv)))
        .collect();
    let blocks: Vec<Vec<f32>> = tasks
        .par_iter()
        .enumerate()
        .map(|(t, &(i, kv))| -> Result<Vec<f32>> {
            let (s, p) = (&segments[i], &plans[i]);
            let g = h / p.kvh;
            // Keys past the last query's position are never seen.
            let seen = s.offset + s.tq;
            let krows = p.keys.rows(s.kv_batch, kv, seen, hd)?;
            let vrows = p.values.rows(s.kv_batch, kv, seen, hd)?;
            // rayon runs a thread's tasks in order, so the next task is most often this
            // thread's next: its first chunk of keys comes from memory while this one runs
            // (8 rows' steps about 5 % faster on the rollout bench; two chunks gained nothing).
            if let Some(&(ni, nkv)) = tasks.get(t + 1) {
                let ns = &segments[ni];
                let first = (ns.offset + ns.tq).min(WIDEN_KEYS);
                if let Ok(Rows::Bf16(keys)) = plans[ni].keys.rows(ns.kv_batch, nkv, first, hd) {
                    prefetch_l2(keys);
                }
            }
            let n = g * s.tq;
            let mut out = vec![0f32; n * hd];
            // The group's query rows, by head then position (contiguous in `q` only when the
            // call holds one segment).
            let mut qrows = Vec::with_capacity(n * hd);
            for head in kv * g..(kv + 1) * g {
                let first = ((s.q_batch * h + head) * qt + s.q_start) * hd;
                qrows.extend_from_slice(&qs[first..first + s.tq * hd]);
            }
            // The keys as the product's rows and the queries as its "weights": the scores
            // come out by query row, each row's keys contiguous for the softmax, and the
            // kernel's tiles (eight keys by two queries) stay full.
            let mut scores = vec![0f32; n * seen];
            // Which keys row r sees: key_start ..= its position (none when it is before the
            // first key that is not padding: zeros, as the other paths give).
            let last = |r: usize| s.offset + r % s.tq;
            match (krows, vrows) {
                (Rows::F32(krows), Rows::F32(vrows)) => {
                    small_matmul::block(krows, seen, hd, &qrows, &mut scores);
                    for (r, (o, row)) in out
                        .chunks_exact_mut(hd)
                        .zip(scores.chunks_exact_mut(seen))
                        .enumerate()
                    {
                        if s.key_start > last(r) {
                            continue;
                        }
                        let row = &mut row[s.key_start..last(r) + 1];
                        attend_row(row, scale as f32, &vrows[s.key_start * hd..], o);
                    }
                }
                (Rows::Bf16(krows), Rows::Bf16(vrows)) => {
                    let mut wide = vec![0f32; WIDEN_KEYS * hd];
                    let mut part = vec![0f32; n * WIDEN_KEYS];
                    for c0 in (0..seen).step_by(WIDEN_KEYS) {
                        let cn = WIDEN_KEYS.min(seen - c0);
                        // This chunk's value rows are read after the softmax: asked for now,
                        // they come from memory while the keys' scores are computed, instead
                        // of one stream at a time (8 rows' attention on the rollout bench
                        // about 10 % faster; asking for all of them at once gained nothing).
                        prefetch_l2(&vrows[c0 * hd..(c0 + cn) * hd]);
                        widen(&krows[c0 * hd..(c0 + cn) * hd], &mut wide[..cn * hd]);
                        small_matmul::block(&wide[..cn * hd], cn, hd, &qrows, &mut part[..n * cn]);
                        for (row, p) in scores.chunks_exact_mut(seen).zip(part.chunks_exact(cn)) {
                            row[c0..c0 + cn].copy_from_slice(p);
                        }
                    }
                    for (r, row) in scores.chunks_exact_mut(seen).enumerate() {
                        if s.key_start <= last(r) {
                            softmax_in_place(&mut row[s.key_start..last(r) + 1], scale as f32);
                        }
                    }
                    for c0 in (s.key_start..seen).step_by(WIDEN_KEYS) {
                        let cn = WIDEN_KEYS.min(seen - c0);
                        widen(&vrows[c0 * hd..(c0 + cn) * hd], &mut wide[..cn * hd]);
                        for (r, (o, row)) in out
                            .chunks_exact_mut(hd)
                            .zip(scores.chunks_exact(seen))
                            .enumerate()
                        {
                            if s.key_start > last(r) || c0 > last(r) {
                                continue;
                            }
                            let end = (last(r) + 1).min(c0 + cn);
                            add_weighted_rows(&row[c0..end], &wide[..(end - c0) * hd], o);
                        }
                    }
                }
                _ => bail!("cached attention: keys and values of different dtypes"),
            }
            Ok(out)
        })
        .collect::<Result<_>>()?;
    // Block (segment, kv) holds rows (gi, t) of heads kv·g + gi; the output is token-major.
    let mut y = vec![0f32; total * h * hd];
    for (&(i, kv), block) in tasks.iter().zip(&blocks) {
        let tq = segments[i].tq;
        let g = h / plans[i].kvh;
        for (r, row) in block.chunks_exact(hd).enumerate() {
            let (gi, t) = (r / tq, r % tq);
            let at = (rows_before[i] + t) * h * hd + (kv * g + gi) * hd;
            y[at..at + hd].copy_from_slice(row);
        }
    }
    drop(guards);
    Tensor::from_vec(y, (total, h * hd), q.device())
}

multiversion! {
    /// One query row: the softmax of its scaled scores over the keys it sees (in place), then
    /// the sum of their value rows (`vrows`, from the first of those keys) so weighted, into
    /// `o`.
    fn attend_row<T: Real>(scores: &mut [T], scale: T, vrows: &[T], o: &mut [T]) {
        let inv = exp_row(scores, scale);
        o.fill(T::zero());
        add_weighted_into(scores, vrows, o);
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
}

multiversion! {
    /// A query row's softmax of its scaled scores over the keys it sees, in place.
    fn softmax_in_place<T: Real>(scores: &mut [T], scale: T) {
        let inv = exp_row(scores, scale);
        for s in scores.iter_mut() {
            *s *= inv;
        }
    }
}

/// `x ← e^(scale·x − max)` over a row of scores, returning 1 / Σ of the results.
#[inline(always)]
fn exp_row<T: Real>(scores: &mut [T], scale: T) -> T {
    for s in scores.iter_mut() {
        *s *= scale;
    }
    let max = lane_max(scores);
    T::one() / lane_exp_in_place(scores, max)
}

multiversion! {
    /// [`add_weighted_into`] on its own (a chunk of a bf16 cache's widened value rows).
    fn add_weighted_rows<T: Real>(w: &[T], vrows: &[T], o: &mut [T]) {
        add_weighted_into(w, vrows, o)
    }
}

/// `o += Σ_j w[j] · vrows[j]` (rows of `o.len()` values), the output row in registers across
/// the keys for the head sizes Qwen2 uses (64 and 128), through memory otherwise.
#[inline(always)]
fn add_weighted_into<T: Real>(w: &[T], vrows: &[T], o: &mut [T]) {
    match o.len() {
        64 => add_weighted::<T, 64>(w, vrows, o),
        128 => add_weighted::<T, 128>(w, vrows, o),
        hd => {
            for (&p, vrow) in w.iter().zip(vrows.chunks_exact(hd)) {
                for (x, &vv) in o.iter_mut().zip(vrow) {
                    *x += p * vv;
                }
            }
        }
    }
}

#[inline(always)]
fn add_weighted<T: Real, const D: usize>(w: &[T], vrows: &[T], o: &mut [T]) {
    let mut acc = [T::zero(); D];
    acc.copy_from_slice(&o[..D]);
    for (&wj, vrow) in w.iter().zip(vrows.chunks_exact(D)) {
        for d in 0..D {
            acc[d] += wj * vrow[d];
        }
    }
    o[..D].copy_from_slice(&acc);
}

/// Asks for the cache lines of `data` (bf16 bit patterns) into L2: a hint, no effect on what
/// is computed.
#[inline]
fn prefetch_l2(data: &[u16]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(32) {
        #[allow(unused_unsafe)]
        // SAFETY: a prefetch never faults, and the address lies inside `data`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// bf16 bit patterns to f32 (exact: a bf16 value is the top half of its f32).
fn widen(src: &[u16], dst: &mut [f32]) {
    #[inline(always)]
    fn imp(src: &[u16], dst: &mut [f32]) {
        for (d, &b) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(b) << 16);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn v4(src: &[u16], dst: &mut [f32]) {
            imp(src, dst)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature `v4` is compiled for.
            return unsafe { v4(src, dst) };
        }
    }
    imp(src, dst)
}

/// `x ← e^(x − shift)` and Σ of the results, in lanes.
#[inline(always)]
fn lane_exp_in_place<T: Real>(x: &mut [T], shift: T) -> T {
    const L: usize = 16;
    let mut acc = [T::zero(); L];
    let mut chunks = x.chunks_exact_mut(L);
    for c in &mut chunks {
        for l in 0..L {
            c[l] = (c[l] - shift).fast_exp();
            acc[l] += c[l];
        }
    }
    let mut tail = T::zero();
    for v in chunks.into_remainder() {
        *v = (*v - shift).fast_exp();
        tail += *v;
    }
    acc.into_iter().fold(tail, |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{Device, Var};

    use super::*;
    use crate::policy::ops::OpsMode;
    use crate::policy::ops::attention_heads;
    use crate::policy::ops::cpu::max_abs_diff;

    /// Keys and values as a cache holds them: the first `tk` positions of buffers with room
    /// for more, so the views are strided between heads.
    fn cache_view(b: usize, kvh: usize, tk: usize, hd: usize, seed: u64) -> Tensor {
        let capacity = tk + 7;
        let mut rng = crate::policy::Rng::seed(seed);
        let data: Vec<f32> = (0..b * kvh * capacity * hd)
            .map(|_| rng.normal() as f32)
            .collect();
        Tensor::from_vec(data, (b, kvh, capacity, hd), &Device::Cpu)
            .and_then(|t| t.narrow(2, 0, tk))
            .unwrap()
    }

    /// Against candle's primitives in f64 on the same values: decoding rows, short appends,
    /// grouped heads, left padding, and a row that sees no key (zeros).
    #[test]
    fn reads_the_cache_in_place_as_the_composite_computes() {
        let dev = Device::Cpu;
        let cases = [
            // (b, heads, kv heads, tq, tk, offset, key_start, hd)
            (1, 8, 4, 1, 600, 599, vec![0], 64),
            (2, 4, 2, 1, 37, 36, vec![0, 5], 64),
            (1, 6, 2, 16, 170, 154, vec![0], 64),
            (1, 8, 4, 65, 400, 335, vec![0], 64),
            (2, 4, 2, 128, 128, 0, vec![0, 3], 32),
            (3, 2, 1, 3, 20, 17, vec![0, 19, 18], 16),
            (1, 3, 3, 5, 9, 4, vec![0], 24),
            (2, 2, 2, 2, 40, 38, vec![0, 40], 32),
        ];
        for (b, h, kvh, tq, tk, offset, key_start, hd) in cases {
            let mut rng = crate::policy::Rng::seed(tk as u64);
            let q: Vec<f32> = (0..b * h * tq * hd).map(|_| rng.normal() as f32).collect();
            let q = Tensor::from_vec(q, (b, h, tq, hd), &dev).unwrap();
            let k = cache_view(b, kvh, tk, hd, 1);
            let v = cache_view(b, kvh, tk, hd, 2);
            assert!(!k.is_contiguous() && applies(&q, &k, &v));
            let mask = AttentionMask {
                tq,
                offset,
                key_start: Arc::new(key_start.clone()),
            };
            let scale = 1.0 / (hd as f64).sqrt();
            let fast = attention(&q, &k, &v, scale, &mask).unwrap();
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let reference = attention_heads(
                &f64s(&q),
                &f64s(&k),
                &f64s(&v),
                scale,
                &mask,
                OpsMode::Composite,
            )
            .unwrap();
            let what = format!("b {b}, heads {h}/{kvh}, tq {tq}, tk {tk}, key_start {key_start:?}");
            assert_eq!(fast.dims(), reference.dims(), "{what}");
            let diff = max_abs_diff(&f64s(&fast), &reference);
            assert!(diff < 1e-5, "differs by {diff} ({what})");
            // The fused entry point takes this path for these inputs.
            let auto = attention_heads(&q, &k, &v, scale, &mask, OpsMode::Auto).unwrap();
            assert_eq!(max_abs_diff(&auto, &fast), 0.0, "{what}");
        }
    }

    /// bf16 caches (as a policy sampling in bf16 keeps them) give what f32 caches holding the
    /// same rounded values give: every case above, several chunks of widened positions and
    /// partial ones, rows that see no key, appends of up to 128 rows; and keys and values of
    /// different dtypes are refused.
    #[test]
    fn bf16_caches_attend_as_f32_caches_of_their_values() {
        let dev = Device::Cpu;
        let cases = [
            // (b, heads, kv heads, tq, tk, offset, key_start, hd)
            (1, 8, 4, 1, 600, 599, vec![0], 64),
            (2, 4, 2, 1, 37, 36, vec![0, 5], 64),
            (1, 6, 2, 16, 170, 154, vec![0], 64),
            (1, 8, 4, 65, 400, 335, vec![70], 64),
            (2, 4, 2, 128, 128, 0, vec![0, 3], 32),
            (1, 4, 2, 128, 257, 129, vec![0], 128),
            (3, 2, 1, 3, 20, 17, vec![0, 19, 18], 16),
            (1, 3, 3, 5, 9, 4, vec![0], 24),
            (2, 2, 2, 2, 140, 138, vec![0, 140], 32),
            // Qwen2.5-0.5B's heads: 14 queries over 2 key/value heads.
            (2, 14, 2, 1, 300, 299, vec![0, 0], 64),
        ];
        for (b, h, kvh, tq, tk, offset, key_start, hd) in cases {
            let mut rng = crate::policy::Rng::seed(tk as u64 + 3);
            let q: Vec<f32> = (0..b * h * tq * hd).map(|_| rng.normal() as f32).collect();
            let q = Tensor::from_vec(q, (b, h, tq, hd), &dev).unwrap();
            // Buffers with room for more positions, so the views are strided as a cache's.
            let bf16_view = |seed: u64| {
                let full = cache_view(b, kvh, tk + 7, hd, seed).contiguous().unwrap();
                full.to_dtype(DType::BF16)
                    .unwrap()
                    .narrow(2, 0, tk)
                    .unwrap()
            };
            let (k, v) = (bf16_view(1), bf16_view(2));
            assert!(!k.is_contiguous() && applies(&q, &k, &v));
            let rounded = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let mask = AttentionMask {
                tq,
                offset,
                key_start: Arc::new(key_start.clone()),
            };
            let scale = 1.0 / (hd as f64).sqrt();
            let got = attention(&q, &k, &v, scale, &mask).unwrap();
            let want = attention(&q, &rounded(&k), &rounded(&v), scale, &mask).unwrap();
            let what = format!(
                "b {b}, heads {h}/{kvh}, tq {tq}, tk {tk}, key_start {key_start:?}, hd {hd}"
            );
            assert_eq!(got.dims(), want.dims(), "{what}");
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "differs by {diff} ({what})");
            assert!(!applies(&q, &k, &rounded(&v)), "{what}");
        }
    }

    /// A decoding step's rows in one call, each against its own cache (its length, its
    /// query count), give what each gives alone through candle's primitives.
    #[test]
    fn segments_of_one_call_attend_each_to_its_own_cache() {
        let dev = Device::Cpu;
        let (h, kvh, hd) = (4, 2, 32);
        // (tq, cached before the call)
        let shapes = [(1, 40), (3, 0), (1, 1), (16, 100), (2, 7)];
        let total: usize = shapes.iter().map(|s| s.0).sum();
        let mut rng = crate::policy::Rng::seed(11);
        let q: Vec<f32> = (0..h * total * hd).map(|_| rng.normal() as f32).collect();
        let q = Tensor::from_vec(q, (1, h, total, hd), &dev).unwrap();
        let caches: Vec<(Tensor, Tensor)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(tq, before))| {
                let seed = 100 + i as u64;
                (
                    cache_view(1, kvh, before + tq, hd, seed),
                    cache_view(1, kvh, before + tq, hd, seed + 50),
                )
            })
            .collect();
        let mut segments = Vec::new();
        let mut start = 0;
        for (&(tq, before), (k, v)) in shapes.iter().zip(&caches) {
            segments.push(Segment {
                q_batch: 0,
                q_start: start,
                tq,
                k,
                v,
                kv_batch: 0,
                offset: before,
                key_start: 0,
            });
            start += tq;
        }
        assert!(applies_to_segments(&q, &segments));
        let scale = 1.0 / (hd as f64).sqrt();
        let together = segments_attention(&q, &segments, scale).unwrap();
        assert_eq!(together.dims(), &[total, h * hd]);
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        for s in &segments {
            let mask = AttentionMask {
                tq: s.tq,
                offset: s.offset,
                key_start: Arc::new(vec![0]),
            };
            let qs = q.narrow(2, s.q_start, s.tq).unwrap().contiguous().unwrap();
            let alone = attention_heads(
                &f64s(&qs),
                &f64s(s.k),
                &f64s(s.v),
                scale,
                &mask,
                OpsMode::Composite,
            )
            .unwrap();
            let part = together.narrow(0, s.q_start, s.tq).unwrap();
            let diff = max_abs_diff(&f64s(&part), &alone);
            assert!(diff < 1e-5, "segment at {}: {diff}", s.q_start);
        }
        // A segment of more rows than the kernel takes leaves the call to the caller.
        let long = Tensor::zeros((1, h, MAX_QUERY_ROWS + 1, hd), DType::F32, &dev).unwrap();
        let kv = cache_view(1, kvh, MAX_QUERY_ROWS + 1, hd, 1);
        let one = [Segment {
            q_batch: 0,
            q_start: 0,
            tq: MAX_QUERY_ROWS + 1,
            k: &kv,
            v: &kv,
            kv_batch: 0,
            offset: 0,
            key_start: 0,
        }];
        assert!(!applies_to_segments(&long, &one));
    }

    #[test]
    fn leaves_graphs_long_calls_and_f64_to_the_other_paths() {
        let dev = Device::Cpu;
        let k = cache_view(1, 2, 40, 16, 1);
        let q = |tq: usize| Tensor::zeros((1, 4, tq, 16), DType::F32, &dev).unwrap();
        assert!(applies(&q(MAX_QUERY_ROWS), &k, &k));
        assert!(!applies(&q(MAX_QUERY_ROWS + 1), &k, &k));
        let tracked = Var::zeros((1, 4, 1, 16), DType::F32, &dev).unwrap();
        assert!(!applies(tracked.as_tensor(), &k, &k));
        let k64 = k.to_dtype(DType::F64).unwrap();
        assert!(!applies(&q(1).to_dtype(DType::F64).unwrap(), &k64, &k64));
        // Head rows that are not contiguous (positions strided): not this path.
        let strided = cache_view(1, 2, 40, 32, 1).narrow(3, 0, 16).unwrap();
        assert!(!applies(&q(1), &strided, &strided));
    }
}
