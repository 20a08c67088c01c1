//! Batched, KV-cached generation with temperature, top-p, stop strings and a token budget,
//! sampled on the host: the unbatched reference path. `CandlePolicy` generates through the
//! continuous batching scheduler (`batcher`) and samples on the device (`device_sampling`);
//! this module keeps the exact full-sort sampler and the one-call generation loop that tests
//! compare them with.
//!
//! Contexts of different lengths are left-padded into one batch; each row keeps its own
//! positions and never attends to its padding. Every row returns the exact sampled ids and
//! log π(token | prefix) of the unmodified distribution (before temperature and top-p), as
//! the GRPO ratio needs (`shared/reference/method.md`, "Work in tokens end to end").

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::engine::policy::{FinishReason, Generation, PolicyError, SamplingParams, TokenCodec};

use super::ModelError;
use super::kv_cache::KvCache;
use super::model::{BatchInput, Qwen2Model};
use super::ops::AttentionMask;
use super::rng::Rng;

/// Continues every context; see the module doc.
pub fn generate(
    model: &Qwen2Model,
    codec: &dyn TokenCodec,
    eos: &[u32],
    contexts: &[Vec<u32>],
    params: &SamplingParams,
    rng: &mut Rng,
) -> Result<Vec<Generation>, PolicyError> {
    if contexts.is_empty() {
        return Ok(Vec::new());
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0 && params.temperature.is_finite())
        || params.temperature < 0.0
    {
        return Err(PolicyError::Failed(format!(
            "bad sampling parameters: temperature {} top_p {}",
            params.temperature, params.top_p
        )));
    }
    let max_pos = model.rope().max_positions();
    let longest = contexts.iter().map(Vec::len).max().unwrap_or(0);
    if longest + params.max_new_tokens > max_pos {
        return Err(PolicyError::ContextTooLong {
            len: longest + params.max_new_tokens,
            max: max_pos,
        });
    }
    if contexts.iter().any(Vec::is_empty) {
        return Err(PolicyError::Failed("empty context".into()));
    }
    let mut rows: Vec<Row> = contexts.iter().map(|_| Row::default()).collect();
    if params.max_new_tokens == 0 {
        return Ok(rows
            .into_iter()
            .map(|_| Generation {
                tokens: vec![],
                logprobs: vec![],
                finish: FinishReason::Length,
            })
            .collect());
    }
    run(model, codec, eos, contexts, params, rng, &mut rows).map_err(PolicyError::from)?;
    Ok(rows
        .into_iter()
        .map(|r| Generation {
            tokens: r.tokens,
            logprobs: r.logprobs,
            finish: r.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}

#[derive(Default)]
struct Row {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    finish: Option<FinishReason>,
}

fn run(
    model: &Qwen2Model,
    codec: &dyn TokenCodec,
    eos: &[u32],
    contexts: &[Vec<u32>],
    params: &SamplingParams,
    rng: &mut Rng,
    rows: &mut [Row],
) -> Result<(), ModelError> {
    let cfg = model.config();
    let b = contexts.len();
    let l = contexts.iter().map(Vec::len).max().unwrap_or(0);
    let pads: Vec<usize> = contexts.iter().map(|c| l - c.len()).collect();
    let vocab = cfg.vocab_size as u32;
    let mut ids = vec![0u32; b * l];
    for (r, c) in contexts.iter().enumerate() {
        if let Some(bad) = c.iter().find(|&&id| id >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        ids[r * l + pads[r]..(r + 1) * l].copy_from_slice(c);
    }
    let positions: Vec<u32> = (0..b)
        .flat_map(|r| {
            let pad = pads[r];
            (0..l).map(move |i| i.saturating_sub(pad) as u32)
        })
        .collect();
    let key_start = Arc::new(pads.clone());
    let dev = model.device();
    let mut cache = KvCache::new(
        cfg.num_hidden_layers,
        b,
        cfg.num_key_value_heads,
        l + params.max_new_tokens,
        cfg.head_dim,
        model.dtype(),
        dev,
    )?;
    let ids_t = Tensor::from_vec(ids, (b, l), dev)?;
    let input = BatchInput {
        ids: &ids_t,
        positions: Arc::new(positions),
        mask: AttentionMask {
            tq: l,
            offset: 0,
            key_start: key_start.clone(),
        },
    };
    let hidden = model.hidden(&input, Some(&mut cache), false)?;
    let last: Vec<u32> = (0..b).map(|r| (r * l + l - 1) as u32).collect();
    let mut logits = model.logits(
        &hidden.index_select(&Tensor::from_vec(last, b, dev)?, 0)?,
        false,
    )?;
    let max_stop = params
        .stop
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(0);
    for step in 0..params.max_new_tokens {
        let z = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = vec![0u32; b];
        for (r, row) in rows.iter_mut().enumerate() {
            if row.finish.is_some() {
                continue;
            }
            let (tok, lp) = sample(&z[r], params, rng);
            row.tokens.push(tok);
            row.logprobs.push(lp);
            next[r] = tok;
            if eos.contains(&tok) || stop_hit(codec, &row.tokens, &params.stop, max_stop) {
                row.finish = Some(FinishReason::Stop);
            } else if row.tokens.len() >= params.max_new_tokens {
                row.finish = Some(FinishReason::Length);
            }
        }
        if rows.iter().all(|r| r.finish.is_some()) || step + 1 == params.max_new_tokens {
            break;
        }
        let cur = l + step;
        let positions: Vec<u32> = (0..b).map(|r| (cur - pads[r]) as u32).collect();
        let ids_t = Tensor::from_vec(next, (b, 1), dev)?;
        let input = BatchInput {
            ids: &ids_t,
            positions: Arc::new(positions),
            mask: AttentionMask {
                tq: 1,
                offset: cur,
                key_start: key_start.clone(),
            },
        };
        let hidden = model.hidden(&input, Some(&mut cache), false)?;
        logits = model.logits(&hidden, false)?;
    }
    Ok(())
}

/// Whether a stop string appears in the decoded tail of `tokens` (enough tokens to hold the
/// longest stop string, since every token decodes to at least one character or a part of one).
pub(crate) fn stop_hit(
    codec: &dyn TokenCodec,
    tokens: &[u32],
    stop: &[String],
    max_stop_chars: usize,
) -> bool {
    if stop.is_empty() {
        return false;
    }
    let tail = &tokens[tokens.len().saturating_sub(max_stop_chars + 4)..];
    let text = codec.decode(tail);
    stop.iter()
        .any(|s| !s.is_empty() && text.contains(s.as_str()))
}

/// Draws one token; returns it with its log-prob under the unmodified softmax.
pub fn sample(z: &[f32], params: &SamplingParams, rng: &mut Rng) -> (u32, f32) {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = (z.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>()).ln();
    let logprob = |i: usize| ((z[i] - max) as f64 - lse) as f32;
    let greedy = || {
        z.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv { (i, v) } else { (bi, bv) }
            })
            .0
    };
    if params.temperature <= 0.0 {
        let i = greedy();
        return (i as u32, logprob(i));
    }
    let inv_t = 1.0 / params.temperature as f64;
    let mut w: Vec<f64> = z
        .iter()
        .map(|&x| (((x - max) as f64) * inv_t).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let pick = if params.top_p < 1.0 {
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_unstable_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
        let mut kept = 0.0;
        let mut n = 0;
        for &i in &order {
            kept += w[i];
            n += 1;
            if kept >= params.top_p as f64 * total {
                break;
            }
        }
        let u = rng.next_f64() * kept;
        let mut acc = 0.0;
        let mut pick = order[n - 1];
        for &i in &order[..n] {
            acc += w[i];
            if u < acc {
                pick = i;
                break;
            }
        }
        pick
    } else {
        let u = rng.next_f64() * total;
        let mut acc = 0.0;
        let mut pick = greedy();
        for (i, wi) in w.iter_mut().enumerate() {
            acc += *wi;
            if u < acc {
                pick = i;
                break;
            }
        }
        pick
    };
    (pick as u32, logprob(pick))
}
