//! Sampling on the model's device: temperature, nucleus (top-p) and the draw are tensor ops
//! on the logits where they were computed; only the chosen id and its log-prob of each row
//! come back to the host.
//!
//! * The nucleus is found without sorting the vocabulary: a bisection on a threshold of the
//!   tempered logits keeps the largest threshold whose tokens at or above it still hold
//!   `top_p` of the mass. After [`BISECTION_STEPS`] halvings the bracket is narrower than
//!   the f32 spacing of the logits, so the kept set is the full-sort nucleus (the smallest
//!   most-likely prefix whose mass reaches `top_p`) except for tokens whose tempered logits
//!   tie within that spacing at the boundary, which are all kept.
//! * The draw inverts the kept distribution's CDF in vocabulary order with a uniform from
//!   the row's own random stream (uploaded as one scalar per row). The CDF is found in two
//!   levels, block sums then one block, because candle's `cumsum` is a matmul with a
//!   triangular matrix: quadratic in its length.
//! * The log-prob is that of the unmodified distribution (before temperature and top-p),
//!   as the GRPO ratio needs (`shared/reference/method.md`, "Work in tokens end to end").
//! * On the CPU the same draw runs as a few passes per row over the logits where they
//!   already are ([`sample_rows_cpu`]), nucleus included: the tensor ops above cost a
//!   decoding step of 8 rows about as much as its transformer layers on a 32k vocabulary
//!   without a nucleus, and three times as much with one (34 bisection steps of three
//!   full-vocabulary ops each). The CPU pass finds the nucleus by a selection instead of a
//!   sort or a bisection ([`nucleus_floor`]): one pass sums the tempered weights into
//!   buckets by their top bits (a positive f32's bits order as its value), the buckets from
//!   the top give the one where the mass reaches `top_p`, and only that bucket's weights are
//!   sorted. The kept set is the same as the tensor ops' (ties at the boundary all kept).

use candle_core::{D, DType, Device, Result, Storage, Tensor, bail};
use rayon::prelude::*;

use super::ops::cpu::{Real, lane_max, lane_sum, multiversion};

/// Halvings of the threshold bracket: the tempered logits span well under 2^10 after the
/// maximum is subtracted, so 2^-24 of that is below an f32 ulp of the larger ones.
pub const BISECTION_STEPS: usize = 34;

/// One row's sampling settings and its uniform draw in [0, 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowDraw {
    /// 0 is greedy (the first most likely token).
    pub temperature: f32,
    pub top_p: f32,
    pub uniform: f32,
}

/// Samples one token per row of `logits (n, vocab)`; returns `(id, log π(id))` per row.
pub fn sample_rows(logits: &Tensor, rows: &[RowDraw]) -> Result<Vec<(u32, f32)>> {
    let (n, vocab) = logits.dims2()?;
    if n != rows.len() || n == 0 || vocab == 0 {
        bail!(
            "sample_rows: logits {:?} for {} rows",
            logits.dims(),
            rows.len()
        );
    }
    let dev = logits.device();
    let z = logits.to_dtype(DType::F32)?;
    if dev.is_cpu() {
        let z = z.contiguous()?;
        let (storage, layout) = z.storage_and_layout();
        if let (Storage::Cpu(s), Some((a, b))) = (&*storage, layout.contiguous_offsets())
            && let Some(picks) = sample_rows_cpu(&s.as_slice::<f32>()?[a..b], vocab, rows)
        {
            return Ok(picks);
        }
    }
    sample_rows_tensor(&z, rows)
}

/// [`sample_rows`] as tensor ops on the logits' device.
fn sample_rows_tensor(z: &Tensor, rows: &[RowDraw]) -> Result<Vec<(u32, f32)>> {
    let dev = z.device();
    let max = z.max_keepdim(D::Minus1)?;
    let shifted = z.broadcast_sub(&max)?; // ≤ 0, the top token at 0
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let greedy_ids = z.argmax_keepdim(D::Minus1)?; // (n, 1) u32, first maximum
    let ids = if rows.iter().all(|r| r.temperature <= 0.0) {
        greedy_ids
    } else {
        let (sampled, landed) = draw(&shifted, rows, dev)?;
        let greedy_rows = column(rows.iter().map(|r| u8::from(r.temperature <= 0.0)), dev)?;
        // A draw that rounding carried past its block's last kept token takes the top token
        // (always kept): an event of the order of f32 rounding, not a change of distribution
        // one can measure.
        let sampled = landed.where_cond(&sampled, &greedy_ids)?;
        greedy_rows.where_cond(&greedy_ids, &sampled)?
    };
    let logprobs = shifted.gather(&ids, 1)?.sub(&lse)?;
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    let logprobs = logprobs.flatten_all()?.to_vec1::<f32>()?;
    Ok(ids.into_iter().zip(logprobs).collect())
}

/// The draw of [`sample_rows`] on the host's copy of the logits `z (n, vocab)`: the same
/// first maximum, the same nucleus, the same inverse CDF in vocabulary order and the same
/// log-prob of the unmodified softmax, with sums in f64. `None` when a row holds a
/// non-finite logit (the tensor path then decides what that gives).
pub(crate) fn sample_rows_cpu(
    z: &[f32],
    vocab: usize,
    rows: &[RowDraw],
) -> Option<Vec<(u32, f32)>> {
    z.par_chunks(vocab)
        .zip(rows.par_iter())
        .map(|(row, r)| sample_row(row, r))
        .collect()
}

fn sample_row(row: &[f32], r: &RowDraw) -> Option<(u32, f32)> {
    let max = row_max(row);
    // The log-sum-exp and, for a draw without a nucleus, the first level of the inverse CDF:
    // one pass that keeps a sum per block instead of every weight (a vocabulary's worth of
    // weights written and read again per row was most of an 8-row step's draw).
    let mut sums = Vec::with_capacity(row.len().div_ceil(CDF_BLOCK));
    let total = block_exp_sums(row, max, 1.0, &mut sums);
    if !(max.is_finite() && total.is_finite()) {
        return None;
    }
    let first_max = || row.iter().position(|&x| x == max);
    let lse = total.ln();
    let id = if r.temperature <= 0.0 {
        first_max()?
    } else {
        let u = f64::from(r.uniform.clamp(0.0, 1.0));
        let scale = 1.0 / r.temperature;
        let drawn = if r.top_p < 1.0 {
            let mut w = vec![0f32; row.len()];
            exp_into(row, max, scale, &mut w);
            let floor = nucleus_floor(&w, f64::from(r.top_p));
            let kept = zero_below(&mut w, floor);
            inverse_cdf_host(&w, u * kept)
        } else {
            let tempered = if r.temperature == 1.0 {
                total
            } else {
                sums.clear();
                block_exp_sums(row, max, scale, &mut sums)
            };
            inverse_cdf_blocks(row, max, scale, &sums, u * tempered)
        };
        match drawn {
            Some(i) => i,
            None => first_max()?,
        }
    };
    Some((id as u32, ((row[id] - max) as f64 - lse) as f32))
}

/// Values per block of the two-level inverse CDF.
const CDF_BLOCK: usize = 256;

/// The smallest weight of the nucleus of `w` (non-negative tempered weights, the top one
/// 1): the weights at or above it are the smallest most-likely set whose mass reaches
/// `top_p` of the whole, with every weight equal to the last one taken (ties) kept too.
fn nucleus_floor(w: &[f32], top_p: f64) -> f32 {
    // Buckets by sign, exponent and the top 3 mantissa bits: a bucket spans at most 12.5 %
    // of its values, and the weights lie in [0, 1], so the keys stop at 1.0's (0x3F8).
    const SHIFT: u32 = 20;
    const BUCKETS: usize = (0x3F80_0000 >> SHIFT) + 1;
    let key = |v: f32| ((v.to_bits() >> SHIFT) as usize).min(BUCKETS - 1);
    let mut mass = [0f64; BUCKETS];
    for &v in w {
        mass[key(v)] += f64::from(v);
    }
    let target = top_p * mass.iter().sum::<f64>();
    let mut above = 0f64;
    let mut b = BUCKETS - 1;
    while b > 0 && above + mass[b] < target {
        above += mass[b];
        b -= 1;
    }
    let mut edge: Vec<f32> = w.iter().copied().filter(|&v| key(v) == b).collect();
    edge.sort_unstable_by(|x, y| y.total_cmp(x));
    let mut floor = edge.last().copied().unwrap_or(0.0);
    for v in edge {
        above += f64::from(v);
        if above >= target {
            floor = v;
            break;
        }
    }
    floor
}

multiversion! {
    /// Zeroes the weights below `floor`; returns the sum of those left.
    fn zero_below<T: Real>(w: &mut [T], floor: T) -> f64 {
        const L: usize = 16;
        let mut acc = [T::zero(); L];
        let mut chunks = w.chunks_exact_mut(L);
        for c in &mut chunks {
            for l in 0..L {
                c[l] = if c[l] >= floor { c[l] } else { T::zero() };
                acc[l] += c[l];
            }
        }
        let mut total = 0f64;
        for v in chunks.into_remainder() {
            if *v < floor {
                *v = T::zero();
            }
            total += v.f64();
        }
        total + acc.iter().map(|a| a.f64()).sum::<f64>()
    }
}

/// The first index whose cumulative weight exceeds `target`: whole blocks are skipped by
/// their sums, then one block is scanned. `None` when rounding ran past the end.
fn inverse_cdf_host(w: &[f32], target: f64) -> Option<usize> {
    let mut acc = 0f64;
    for (b, block) in w.chunks(CDF_BLOCK).enumerate() {
        let s = f64::from(block_sum(block));
        if acc + s <= target {
            acc += s;
            continue;
        }
        for (i, &v) in block.iter().enumerate() {
            acc += f64::from(v);
            if acc > target {
                return Some(b * CDF_BLOCK + i);
            }
        }
    }
    None
}

/// [`inverse_cdf_host`] on the weights `e^((x − shift)·scale)` of `row` without holding them:
/// whole blocks are skipped by their sums (`sums`, from [`block_exp_sums`] with the same
/// shift and scale), and only the block where the target lies has its weights computed again
/// (the same operations, so the same values).
fn inverse_cdf_blocks(
    row: &[f32],
    shift: f32,
    scale: f32,
    sums: &[f64],
    target: f64,
) -> Option<usize> {
    let mut acc = 0f64;
    for (b, (block, &s)) in row.chunks(CDF_BLOCK).zip(sums).enumerate() {
        if acc + s <= target {
            acc += s;
            continue;
        }
        for (i, &v) in block.iter().enumerate() {
            acc += f64::from(((v - shift) * scale).fast_exp());
            if acc > target {
                return Some(b * CDF_BLOCK + i);
            }
        }
    }
    None
}

multiversion! {
    fn row_max<T: Real>(x: &[T]) -> T {
        lane_max(x)
    }
}

multiversion! {
    fn block_sum<T: Real>(x: &[T]) -> T {
        lane_sum(x)
    }
}

multiversion! {
    /// Pushes to `sums` the sum of `e^((x − shift)·scale)` over each block of [`CDF_BLOCK`]
    /// values of `x` (in 16 lanes, then in f64); returns the sum of all.
    fn block_exp_sums<T: Real>(x: &[T], shift: T, scale: T, sums: &mut Vec<f64>) -> f64 {
        const L: usize = 16;
        let mut total = 0f64;
        for block in x.chunks(CDF_BLOCK) {
            let mut acc = [T::zero(); L];
            let mut lanes = block.chunks_exact(L);
            for c in &mut lanes {
                for l in 0..L {
                    acc[l] += ((c[l] - shift) * scale).fast_exp();
                }
            }
            let mut s = acc.iter().map(|a| a.f64()).sum::<f64>();
            for &v in lanes.remainder() {
                s += ((v - shift) * scale).fast_exp().f64();
            }
            sums.push(s);
            total += s;
        }
        total
    }
}

multiversion! {
    /// `out = e^((x − shift)·scale)`; returns Σ out.
    fn exp_into<T: Real>(x: &[T], shift: T, scale: T, out: &mut [T]) -> f64 {
        const L: usize = 16;
        let mut acc = [T::zero(); L];
        let mut total = 0f64;
        let (xc, oc) = (x.chunks_exact(L), out.chunks_exact_mut(L));
        let (xr, or) = (xc.remainder(), x.len() / L * L);
        for (xs, os) in xc.zip(oc) {
            for l in 0..L {
                os[l] = ((xs[l] - shift) * scale).fast_exp();
                acc[l] += os[l];
            }
        }
        for (i, &v) in xr.iter().enumerate() {
            let e = ((v - shift) * scale).fast_exp();
            out[or + i] = e;
            total += e.f64();
        }
        total + acc.iter().map(|a| a.f64()).sum::<f64>()
    }
}

/// A `(n, 1)` column tensor of per-row values.
fn column<T: candle_core::WithDType>(
    values: impl Iterator<Item = T>,
    dev: &Device,
) -> Result<Tensor> {
    let v: Vec<T> = values.collect();
    let n = v.len();
    Tensor::from_vec(v, (n, 1), dev)
}

/// Draws from the tempered nucleus of each row of `shifted (n, vocab)` (max-subtracted
/// logits); returns `(n, 1)` u32 ids and whether each landed on a kept token.
fn draw(shifted: &Tensor, rows: &[RowDraw], dev: &Device) -> Result<(Tensor, Tensor)> {
    let inv_t = column(
        rows.iter().map(|r| {
            if r.temperature > 0.0 {
                1.0 / r.temperature
            } else {
                1.0
            }
        }),
        dev,
    )?;
    let s = shifted.broadcast_mul(&inv_t)?; // tempered, max 0
    let w = s.exp()?;
    let kept = if rows.iter().all(|r| r.top_p >= 1.0) {
        w
    } else {
        nucleus(&s, &w, rows, dev)?
    };
    inverse_cdf(&kept, rows, dev)
}

/// `w` with the tokens outside each row's nucleus zeroed (see the module doc).
fn nucleus(s: &Tensor, w: &Tensor, rows: &[RowDraw], dev: &Device) -> Result<Tensor> {
    let total = w.sum_keepdim(D::Minus1)?;
    let top_p = column(rows.iter().map(|r| r.top_p.min(1.0)), dev)?;
    let target = total.mul(&top_p)?;
    // mass(s ≥ lo) ≥ target always; mass(s ≥ hi) < target always (nothing is above 0).
    let mut lo = s.min_keepdim(D::Minus1)?;
    let mut hi = lo.ones_like()?;
    let zeros = w.zeros_like()?;
    for _ in 0..BISECTION_STEPS {
        let mid = ((&lo + &hi)? * 0.5)?;
        let mass = s
            .broadcast_ge(&mid)?
            .where_cond(w, &zeros)?
            .sum_keepdim(D::Minus1)?;
        let enough = mass.ge(&target)?;
        lo = enough.where_cond(&mid, &lo)?;
        hi = enough.where_cond(&hi, &mid)?;
    }
    // A row with top_p = 1 keeps everything, whatever rounding did to its sum.
    let all = column(rows.iter().map(|r| u8::from(r.top_p >= 1.0)), dev)?;
    let floor = s.min_keepdim(D::Minus1)?;
    let lo = all.where_cond(&floor, &lo)?;
    w * s.broadcast_ge(&lo)?.to_dtype(DType::F32)?
}

/// The first id whose cumulative weight exceeds `uniform · total`, per row, and whether it
/// holds weight (rounding between the two levels can run past a block's last kept token).
fn inverse_cdf(w: &Tensor, rows: &[RowDraw], dev: &Device) -> Result<(Tensor, Tensor)> {
    let (n, vocab) = w.dims2()?;
    let block = (vocab as f64).sqrt().ceil().max(1.0) as usize;
    let blocks = vocab.div_ceil(block);
    let w = w.pad_with_zeros(1, 0, blocks * block - vocab)?;
    let wb = w.reshape((n, blocks, block))?;
    let block_sums = wb.sum(D::Minus1)?; // (n, blocks)
    let block_cdf = block_sums.cumsum(1)?;
    let total = block_cdf.narrow(1, blocks - 1, 1)?;
    let u = column(rows.iter().map(|r| r.uniform.clamp(0.0, 1.0)), dev)?;
    let x = total.mul(&u)?; // (n, 1)
    // Blocks wholly at or below x; the draw lies in the next one.
    let before = block_cdf
        .broadcast_le(&x)?
        .to_dtype(DType::U32)?
        .sum_keepdim(1)?;
    let j = before.minimum(blocks as u32 - 1)?; // (n, 1)
    let mass_before = block_cdf.pad_with_zeros(1, 1, 0)?.gather(&j, 1)?; // cumulative mass of blocks < j
    let rest = x.sub(&mass_before)?;
    let inner = wb
        .gather(
            &j.unsqueeze(2)?.broadcast_as((n, 1, block))?.contiguous()?,
            1,
        )?
        .squeeze(1)?; // (n, block)
    let inner_cdf = inner.cumsum(1)?;
    let k = inner_cdf
        .broadcast_le(&rest)?
        .to_dtype(DType::U32)?
        .sum_keepdim(1)?
        .minimum(block as u32 - 1)?;
    let landed = inner.gather(&k, 1)?.gt(0f32)?;
    let id = j.broadcast_mul(&Tensor::new(block as u32, dev)?)?.add(&k)?;
    Ok((id, landed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::rng::Rng;

    /// The nucleus of the full-sort reference (`sampling::sample`): probabilities of the
    /// tempered distribution renormalised over the smallest most-likely prefix reaching top_p.
    fn reference(z: &[f32], t: f32, top_p: f32) -> Vec<f64> {
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let w: Vec<f64> = z
            .iter()
            .map(|&x| (((x - max) as f64) / t as f64).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_unstable_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
        let mut kept = vec![0.0; z.len()];
        let mut acc = 0.0;
        for &i in &order {
            kept[i] = w[i];
            acc += w[i];
            if acc >= top_p as f64 * total {
                break;
            }
        }
        let s: f64 = kept.iter().sum();
        kept.iter().map(|k| k / s).collect()
    }

    /// The inverse CDF of `p` at `x` in vocabulary order, and whether `x` lies within 1e-5
    /// of one of its steps (where an f32 draw may legitimately land on either side).
    fn reference_draw(p: &[f64], x: f64) -> (Option<usize>, bool) {
        let mut acc = 0.0;
        let (mut want, mut near_edge) = (None, false);
        for (i, pi) in p.iter().enumerate() {
            let prev = acc;
            acc += pi;
            near_edge |= (acc - x).abs() < 1e-5 || (prev - x).abs() < 1e-5;
            if want.is_none() && x < acc {
                want = Some(i);
            }
        }
        (want, near_edge)
    }

    /// log softmax(z)[id] in f64.
    fn exact_logprob(z: &[f32], id: u32) -> f64 {
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let lse = z
            .iter()
            .map(|&v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln();
        (z[id as usize] - max) as f64 - lse
    }

    fn logits(rng: &mut Rng, n: usize, vocab: usize, spread: f64) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| (0..vocab).map(|_| (spread * rng.normal()) as f32).collect())
            .collect()
    }

    /// For a grid of uniforms, the draw is the inverse CDF (in vocabulary order) of the exact
    /// full-sort nucleus distribution, and the log-prob that of the unmodified softmax.
    #[test]
    fn draws_invert_the_exact_nucleus_distribution() {
        let mut rng = Rng::seed(11);
        let vocab = 1000; // not a square: the last block is padded
        for &(t, top_p, spread) in &[
            (1.0f32, 1.0f32, 2.0),
            (0.7, 0.9, 2.0),
            (1.3, 0.5, 3.0),
            (1.0, 0.95, 0.5),
            (0.5, 0.3, 4.0),
        ] {
            let z = logits(&mut rng, 3, vocab, spread);
            let flat: Vec<f32> = z.concat();
            let lt = Tensor::from_vec(flat, (3, vocab), &Device::Cpu).unwrap();
            for step in 0..50 {
                let u: Vec<f32> = (0..3)
                    .map(|r| ((step * 3 + r) as f32 + 0.5) / 150.0)
                    .collect();
                let rows: Vec<RowDraw> = u
                    .iter()
                    .map(|&uniform| RowDraw {
                        temperature: t,
                        top_p,
                        uniform,
                    })
                    .collect();
                // The CPU pass (what `sample_rows` takes here) and the tensor ops (CUDA's).
                for got in [
                    sample_rows(&lt, &rows).unwrap(),
                    sample_rows_tensor(&lt, &rows).unwrap(),
                ] {
                    for r in 0..3 {
                        let p = reference(&z[r], t, top_p);
                        let x = u[r] as f64;
                        let (want, near_edge) = reference_draw(&p, x);
                        let (id, lp) = got[r];
                        assert!(p[id as usize] > 0.0, "drew {id}, outside the nucleus");
                        if !near_edge {
                            assert_eq!(Some(id as usize), want, "t {t} top_p {top_p} u {x}");
                        }
                        let want_lp = exact_logprob(&z[r], id);
                        assert!((lp as f64 - want_lp).abs() < 1e-5, "{lp} vs {want_lp}");
                    }
                }
            }
        }
    }

    /// The CPU pass and the tensor ops draw the same ids (but where `u` is within 1e-5 of a
    /// step of the exact f64 inverse CDF) with the same log-probs, for tempered, untempered
    /// and greedy rows, with and without a nucleus, and vocabularies that fill no block evenly.
    #[test]
    fn the_cpu_pass_draws_as_the_tensor_ops_and_the_exact_distribution() {
        let mut rng = Rng::seed(12);
        for &(vocab, spread) in &[(1000usize, 2.0), (37, 1.0), (4099, 4.0), (32000, 0.5)] {
            let settings = [(1.0f32, 1.0f32), (0.7, 1.0), (0.0, 1.0), (1.6, 1.0)]
                .into_iter()
                .chain([(1.0, 0.9), (0.7, 0.5), (1.6, 0.95), (1.0, 0.05)]);
            let (temps, top_ps): (Vec<f32>, Vec<f32>) = settings.unzip();
            let z = logits(&mut rng, temps.len(), vocab, spread);
            let flat: Vec<f32> = z.concat();
            let lt = Tensor::from_vec(flat.clone(), (temps.len(), vocab), &Device::Cpu).unwrap();
            for step in 0..40 {
                let rows: Vec<RowDraw> = temps
                    .iter()
                    .zip(&top_ps)
                    .enumerate()
                    .map(|(r, (&temperature, &top_p))| RowDraw {
                        temperature,
                        top_p,
                        uniform: ((step * 8 + r) as f32 + 0.5) / 320.0,
                    })
                    .collect();
                let cpu = sample_rows_cpu(&flat, vocab, &rows).expect("finite logits");
                let tensor = sample_rows_tensor(&lt, &rows).unwrap();
                assert_eq!(
                    cpu,
                    sample_rows(&lt, &rows).unwrap(),
                    "dispatch takes the CPU pass"
                );
                for (r, row) in rows.iter().enumerate() {
                    let (id, lp) = cpu[r];
                    let (tid, tlp) = tensor[r];
                    if row.temperature <= 0.0 {
                        assert_eq!(id, tid, "greedy: the first maximum");
                    } else {
                        let p = reference(&z[r], row.temperature, row.top_p);
                        let x = row.uniform as f64;
                        let (want, near_edge) = reference_draw(&p, x);
                        assert!(p[id as usize] > 0.0, "drew {id}, outside the nucleus");
                        if !near_edge {
                            assert_eq!(
                                Some(id as usize),
                                want,
                                "vocab {vocab} t {} top_p {} u {x}",
                                row.temperature,
                                row.top_p
                            );
                            assert_eq!(id, tid);
                        }
                    }
                    let want_lp = exact_logprob(&z[r], id);
                    assert!((lp as f64 - want_lp).abs() < 1e-5, "{lp} vs {want_lp}");
                    if id == tid {
                        assert!((lp - tlp).abs() < 1e-5, "{lp} vs tensor {tlp}");
                    }
                }
            }
        }
    }

    /// The floor keeps the smallest most-likely set reaching `top_p` (a full sort's), all
    /// ties of its last weight, and at least the top weight: for spreads that put thousands
    /// of weights in one bucket and for heavy ties.
    #[test]
    fn the_nucleus_floor_is_the_full_sort_boundary() {
        let mut rng = Rng::seed(13);
        for &(vocab, spread, levels) in &[
            (32000usize, 0.05, 0usize),
            (32000, 3.0, 0),
            (1000, 1.0, 7),
            (5, 1.0, 0),
            (1, 1.0, 0),
        ] {
            let mut z: Vec<f32> = (0..vocab).map(|_| (spread * rng.normal()) as f32).collect();
            if levels > 0 {
                // Few distinct values: every boundary is a tie.
                for v in &mut z {
                    *v = (*v * levels as f32).round() / levels as f32;
                }
            }
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let w: Vec<f32> = z.iter().map(|&x| (x - max).exp()).collect();
            let total: f64 = w.iter().map(|&v| f64::from(v)).sum();
            let mut sorted = w.clone();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            for top_p in [1e-6, 0.05, 0.3, 0.5, 0.9, 0.95, 0.999] {
                let floor = nucleus_floor(&w, top_p);
                let mut acc = 0f64;
                let want = sorted
                    .iter()
                    .copied()
                    .find(|&v| {
                        acc += f64::from(v);
                        acc >= top_p * total
                    })
                    .unwrap_or(sorted[vocab - 1]);
                assert_eq!(floor, want, "vocab {vocab} spread {spread} top_p {top_p}");
                let mut kept = w.clone();
                let mass = zero_below(&mut kept, floor);
                assert!(mass >= top_p * total * (1.0 - 1e-6), "{mass} of {total}");
                assert!(kept.iter().all(|&v| v == 0.0 || v >= floor));
                assert_eq!(
                    kept.iter().filter(|&&v| v > 0.0).count(),
                    w.iter().filter(|&&v| v >= floor).count()
                );
            }
        }
    }

    #[test]
    fn a_non_finite_logit_leaves_the_cpu_pass() {
        let rows = [RowDraw {
            temperature: 1.0,
            top_p: 1.0,
            uniform: 0.5,
        }];
        for bad in [f32::NAN, f32::INFINITY] {
            let z = [0.0f32, 1.0, bad, 2.0];
            assert_eq!(sample_rows_cpu(&z, 4, &rows), None);
            let lt = Tensor::from_vec(z.to_vec(), (1, 4), &Device::Cpu).unwrap();
            // Whatever the tensor ops make of it, it is an answer or an error, not a panic.
            let _ = sample_rows(&lt, &rows);
        }
    }

    #[test]
    fn greedy_rows_take_the_first_maximum_and_mix_with_sampled_rows() {
        let z = [vec![0.0f32, 3.0, 3.0, 1.0], vec![5.0, 0.0, 0.0, 0.0]];
        let lt = Tensor::from_vec(z.concat(), (2, 4), &Device::Cpu).unwrap();
        // (Exact ties at a nucleus boundary are all kept, unlike the full sort: see the
        // module doc; the greedy row here ties on purpose, the nucleus rows below do not.)
        let rows = [
            RowDraw {
                temperature: 0.0,
                top_p: 1.0,
                uniform: 0.99,
            },
            RowDraw {
                temperature: 1.0,
                top_p: 1.0,
                uniform: 0.999_9,
            },
        ];
        let got = sample_rows(&lt, &rows).unwrap();
        assert_eq!(got[0].0, 1);
        assert_eq!(got[1].0, 3, "u near 1 takes the last token");
        // A nucleus far below the top token's mass is the top token alone.
        let tiny = [RowDraw {
            temperature: 1.0,
            top_p: 1e-6,
            uniform: 0.99,
        }; 2];
        let z = [0.0f32, 3.0, 2.9, 1.0, 5.0, 0.0, 0.0, 0.0];
        let lt = Tensor::from_vec(z.to_vec(), (2, 4), &Device::Cpu).unwrap();
        let got = sample_rows(&lt, &tiny).unwrap();
        assert_eq!((got[0].0, got[1].0), (1, 0));
        assert!(sample_rows(&lt, &tiny[..1]).is_err(), "rows must match");
    }
}
