//! Continuous batching of generation over conversations that keep their KV caches.
//!
//! Every caller of [`Batcher::run`] (an episode's turn, or a whole `generate` batch) queues
//! its requests and waits. One waiting caller at a time drives: it admits everything queued
//! into the running batch, samples one token for every row with logits at once on the device,
//! and runs one forward over the batch: what each conversation added since its last turn (its
//! cache holds the rest) and the token each other row just drew. Rows leave the batch as soon
//! as they stop and new ones join at the next step. A driver whose own requests are done hands the running batch to
//! another waiting caller. Driving from the callers' threads (rather than a dedicated thread)
//! keeps the model borrowed, never owned, and runs the work from outside the rayon pool as
//! the rest of the policy does.
//!
//! Each conversation draws from its own random stream, so what a row samples does not depend
//! on which other rows share its batch. Caches are bounded: when they would exceed the
//! budget, idle conversations' caches are dropped, least recently used first, and rebuilt by
//! a prefill at their next turn (counted in [`RolloutStats`]).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::engine::policy::{FinishReason, Generation, PolicyError, SamplingParams, TokenCodec};

use super::ModelError;
use super::device_sampling::{RowDraw, sample_rows};
use super::kv_cache::KvCache;
use super::model::Qwen2Model;
use super::rng::Rng;
use super::sampling::stop_hit;

/// Counters of the work generation did, since the policy was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RolloutStats {
    /// Context tokens run through the model (prompts, appended tool outputs, and what an
    /// evicted cache had to recompute).
    pub prefill_tokens: u64,
    /// Tokens sampled.
    pub sampled_tokens: u64,
    /// Forwards that carried decoding rows, and the decoding rows they carried in all.
    pub decode_steps: u64,
    pub decode_rows: u64,
    /// Of those, the forwards that also prefilled context (decoding rows riding along).
    pub mixed_steps: u64,
    /// Caches dropped to stay within the budget, and the tokens their rebuilding recomputed.
    pub evictions: u64,
    pub reprefill_tokens: u64,
    /// Context tokens whose keys and values were copied from another conversation of the
    /// batch that began with the same tokens (a GRPO group's shared prompt), not computed.
    pub shared_prefix_tokens: u64,
    /// Wall time of the forwards that prefilled context (with any decoding rows riding along)
    /// and of the forwards that only decoded, in microseconds (each forward with its LM head;
    /// sampling not included): where a rollout's time goes.
    pub prefill_micros: u64,
    pub decode_micros: u64,
}

/// What generation needs of the policy.
pub(crate) struct ModelView<'a> {
    pub model: &'a Qwen2Model,
    pub codec: &'a dyn TokenCodec,
    pub eos: &'a [u32],
    pub weights_lock: &'a RwLock<()>,
    /// Products of the forwards may take bf16 inputs (`CandlePolicy::set_sampling_bf16`):
    /// the policy's bf16 weight copies and its weights' version.
    pub bf16_products: Option<(std::sync::Arc<super::ops::amx::Bf16Weights>, u64)>,
}

/// A conversation between its turns.
struct Conversation {
    /// Tokens whose keys and values are in `cache`.
    fed: Vec<u32>,
    cache: Option<KvCache>,
    rng: Rng,
    last_used: u64,
    /// Tokens the cache held when the budget dropped it.
    evicted: usize,
}

/// A turn in the running batch.
struct Job {
    id: u64,
    conv: Conversation,
    params: SamplingParams,
    max_stop: usize,
    /// Context tokens to run before the next draw.
    pending: Vec<u32>,
    /// Logits of the next draw: row `.1` of a step's `(rows, vocab)` logits.
    logits: Option<(Tensor, usize)>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    finish: Option<FinishReason>,
}

impl Job {
    fn result(&self) -> Generation {
        Generation {
            tokens: self.tokens.clone(),
            logprobs: self.logprobs.clone(),
            finish: self.finish.unwrap_or(FinishReason::Length),
        }
    }
}

#[derive(Default)]
struct State {
    driving: bool,
    idle: HashMap<u64, Conversation>,
    queue: Vec<Job>,
    /// A batch left by a driver whose own requests were done.
    running: Vec<Job>,
    done: HashMap<u64, Result<Generation, PolicyError>>,
    next_id: u64,
    clock: u64,
    stats: RolloutStats,
}

/// The continuous batching scheduler (see the module doc).
pub struct Batcher {
    state: Mutex<State>,
    wake: Condvar,
    kv_budget_bytes: Mutex<usize>,
}

impl Default for Batcher {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            kv_budget_bytes: Mutex::new(DEFAULT_KV_BUDGET_BYTES),
        }
    }
}

/// Cache memory of all conversations together unless set otherwise.
pub const DEFAULT_KV_BUDGET_BYTES: usize = 4 << 30;

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> RolloutStats {
        self.lock().stats
    }

    pub fn set_kv_budget_bytes(&self, bytes: usize) {
        *self
            .kv_budget_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = bytes;
    }

    fn kv_budget(&self) -> usize {
        *self
            .kv_budget_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a conversation drawing from `rng`; returns its id.
    pub fn open(&self, rng: Rng) -> u64 {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        let clock = st.clock;
        st.idle.insert(
            id,
            Conversation {
                fed: Vec::new(),
                cache: None,
                rng,
                last_used: clock,
                evicted: 0,
            },
        );
        id
    }

    /// Frees a conversation and its cache.
    pub fn close(&self, id: u64) {
        let mut st = self.lock();
        st.idle.remove(&id);
        st.done.remove(&id);
    }

    /// Continues each conversation `(id, context, params)`: `context` is everything so far
    /// (what the conversation already ran is its prefix and is not run again). Blocks until
    /// all are done, driving the batch when no other caller does.
    pub(crate) fn run(
        &self,
        view: &ModelView<'_>,
        requests: Vec<(u64, &[u32], &SamplingParams)>,
    ) -> Vec<Result<Generation, PolicyError>> {
        let ids: Vec<u64> = requests.iter().map(|r| r.0).collect();
        {
            let mut st = self.lock();
            for (id, context, params) in requests {
                if let Err(e) = check_request(view.model, context, params) {
                    st.done.insert(id, Err(e));
                    continue;
                }
                let Some(conv) = st.idle.remove(&id) else {
                    st.done.insert(
                        id,
                        Err(PolicyError::Failed(format!(
                            "conversation {id} is closed or already running a turn"
                        ))),
                    );
                    continue;
                };
                if params.max_new_tokens == 0 {
                    st.idle.insert(id, conv);
                    st.done.insert(
                        id,
                        Ok(Generation {
                            tokens: vec![],
                            logprobs: vec![],
                            finish: FinishReason::Length,
                        }),
                    );
                    continue;
                }
                let job = admit(id, conv, context, params, &mut st.stats);
                st.queue.push(job);
            }
        }
        loop {
            let mut st = self.lock();
            if ids.iter().all(|id| st.done.contains_key(id)) {
                return ids
                    .iter()
                    .map(|id| {
                        st.done.remove(id).unwrap_or_else(|| {
                            Err(PolicyError::Failed(format!(
                                "conversation {id} was listed twice in one call"
                            )))
                        })
                    })
                    .collect();
            }
            if !st.driving {
                st.driving = true;
                drop(st);
                self.drive(view, &ids);
                continue;
            }
            drop(self.wake.wait(st).unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Runs the batch until the requests `mine` are done (see the module doc).
    fn drive(&self, view: &ModelView<'_>, mine: &[u64]) {
        let mut driver = Driver {
            batcher: self,
            running: Vec::new(),
        };
        let per_position = bytes_per_position(view);
        loop {
            {
                let mut st = self.lock();
                let st = &mut *st;
                driver.running.append(&mut st.running);
                driver.running.append(&mut st.queue);
                if driver.running.is_empty() || mine.iter().all(|id| st.done.contains_key(id)) {
                    st.running = std::mem::take(&mut driver.running);
                    st.driving = false;
                    self.wake.notify_all();
                    return;
                }
                st.clock += 1;
                let need: usize = driver
                    .running
                    .iter()
                    .map(|j| {
                        let held = j.conv.cache.as_ref().map_or(0, KvCache::bytes);
                        held.max(
                            (j.conv.fed.len() + j.pending.len() + j.params.max_new_tokens)
                                * per_position,
                        )
                    })
                    .sum();
                evict(st, need, self.kv_budget());
            }
            let outcome = {
                let _weights = view.weights_lock.read().unwrap_or_else(|p| p.into_inner());
                // Work from outside the pool, as `CandlePolicy::generate` explains.
                rayon::scope(|_| step(view, &mut driver.running))
            };
            let mut st = self.lock();
            let st = &mut *st;
            let clock = st.clock;
            match outcome {
                Ok(counts) => {
                    st.stats.prefill_tokens += counts.prefill_tokens;
                    st.stats.sampled_tokens += counts.sampled_tokens;
                    st.stats.decode_steps += counts.decode_steps;
                    st.stats.decode_rows += counts.decode_rows;
                    st.stats.mixed_steps += counts.mixed_steps;
                    st.stats.shared_prefix_tokens += counts.shared_prefix_tokens;
                    st.stats.prefill_micros += counts.prefill_micros;
                    st.stats.decode_micros += counts.decode_micros;
                    let (finished, running): (Vec<Job>, Vec<Job>) =
                        driver.running.drain(..).partition(|j| j.finish.is_some());
                    driver.running = running;
                    for mut job in finished {
                        st.done.insert(job.id, Ok(job.result()));
                        job.conv.last_used = clock;
                        st.idle.insert(job.id, job.conv);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "a generation step failed");
                    for mut job in driver.running.drain(..) {
                        st.done
                            .insert(job.id, Err(PolicyError::Failed(e.to_string())));
                        // The cache may hold part of the failed step: rebuild it next time.
                        job.conv.cache = None;
                        job.conv.fed.clear();
                        st.idle.insert(job.id, job.conv);
                    }
                }
            }
            self.wake.notify_all();
        }
    }
}

/// Ends a drive: on a panic, fails the batch it held instead of leaving its callers waiting.
struct Driver<'a> {
    batcher: &'a Batcher,
    running: Vec<Job>,
}

impl Drop for Driver<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut st = self.batcher.lock();
        for job in self.running.drain(..) {
            st.done.insert(
                job.id,
                Err(PolicyError::Failed("generation panicked".into())),
            );
        }
        st.driving = false;
        self.batcher.wake.notify_all();
    }
}

/// The dtype of new caches: bf16 on the CPU when sampling multiplies in bf16 (the products
/// round their inputs to bf16 already; a decoding step of eight rows at a few hundred
/// cached tokens spent a third of its time reading f32 caches from memory), else the
/// model's.
fn cache_dtype(view: &ModelView<'_>) -> DType {
    if view.bf16_products.is_some() && view.model.device().is_cpu() {
        DType::BF16
    } else {
        view.model.dtype()
    }
}

/// Bytes of keys and values one cached position takes.
fn bytes_per_position(view: &ModelView<'_>) -> usize {
    let cfg = view.model.config();
    2 * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * cfg.head_dim
        * cache_dtype(view).size_in_bytes()
}

/// Drops idle caches, least recently used first, until `running` more bytes fit the budget.
fn evict(st: &mut State, running: usize, budget: usize) {
    let mut held: usize = st
        .idle
        .values()
        .filter_map(|c| c.cache.as_ref().map(KvCache::bytes))
        .sum();
    while held + running > budget {
        let Some((_, conv)) = st
            .idle
            .iter_mut()
            .filter(|(_, c)| c.cache.is_some())
            .min_by_key(|(id, c)| (c.last_used, **id))
        else {
            break;
        };
        held -= conv.cache.as_ref().map_or(0, KvCache::bytes);
        conv.cache = None;
        conv.evicted = conv.fed.len();
        conv.fed.clear();
        st.stats.evictions += 1;
    }
}

/// A conversation's next turn: only what its cache lacks of `context` is left to run.
fn admit(
    id: u64,
    mut conv: Conversation,
    context: &[u32],
    params: &SamplingParams,
    stats: &mut RolloutStats,
) -> Job {
    let common = conv
        .fed
        .iter()
        .zip(context)
        .take_while(|(a, b)| a == b)
        .count()
        // The last context token is always run: its logits give the first draw.
        .min(context.len() - 1);
    if common < conv.fed.len() {
        conv.fed.truncate(common);
        if let Some(c) = conv.cache.as_mut() {
            c.truncate(common);
        }
    }
    if conv.evicted > 0 {
        stats.reprefill_tokens += conv.evicted.min(context.len()) as u64;
        conv.evicted = 0;
    }
    Job {
        id,
        conv,
        params: params.clone(),
        max_stop: params
            .stop
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0),
        pending: context[common..].to_vec(),
        logits: None,
        tokens: Vec::new(),
        logprobs: Vec::new(),
        finish: None,
    }
}

/// Fewer shared tokens than this are run rather than copied: a few positions cost
/// less to run than a cache to allocate.
const MIN_SHARED_PREFIX: usize = 16;

/// Another row of the batch whose cache begins with what row `i`, a conversation with nothing
/// cached, is about to run, and how many of its tokens it can take from there (the longest
/// such prefix, short of the last token, whose logits the row needs). The members of a GRPO
/// group start from the same prompt: one prefills it and the others copy its keys and values,
/// which are the same numbers, since a position's keys and values depend only on the tokens
/// up to it. Donors are rows of the running batch only, so they hold keys and values of the
/// weights this step runs with.
fn prefix_donor(jobs: &[Job], i: usize) -> Option<(usize, usize)> {
    let job = &jobs[i];
    if !job.conv.fed.is_empty() || job.pending.len() <= MIN_SHARED_PREFIX {
        return None;
    }
    jobs.iter()
        .enumerate()
        .filter(|(d, j)| {
            *d != i
                && j.conv
                    .cache
                    .as_ref()
                    .is_some_and(|c| c.len() == j.conv.fed.len())
        })
        .map(|(d, j)| (d, copyable(&j.conv.fed, &job.pending)))
        .filter(|&(_, n)| n >= MIN_SHARED_PREFIX)
        .max_by_key(|&(d, n)| (n, std::cmp::Reverse(d)))
}

fn check_request(
    model: &Qwen2Model,
    context: &[u32],
    params: &SamplingParams,
) -> Result<(), PolicyError> {
    if !(params.top_p > 0.0 && params.top_p <= 1.0 && params.temperature.is_finite())
        || params.temperature < 0.0
    {
        return Err(PolicyError::Failed(format!(
            "bad sampling parameters: temperature {} top_p {}",
            params.temperature, params.top_p
        )));
    }
    if context.is_empty() {
        return Err(PolicyError::Failed("empty context".into()));
    }
    let max = model.rope().max_positions();
    if context.len() + params.max_new_tokens > max {
        return Err(PolicyError::ContextTooLong {
            len: context.len() + params.max_new_tokens,
            max,
        });
    }
    let vocab = model.config().vocab_size as u32;
    if let Some(bad) = context.iter().find(|&&id| id >= vocab) {
        return Err(PolicyError::Failed(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// One scheduling step of the running batch: a draw for every row with logits, then one
/// forward carrying both the context of the rows that joined or appended (prefill) and the
/// token each other row just drew (decoding). One forward rather than a prefill forward and
/// a decoding forward: a small batch's forward is bound by reading the weights, and the
/// decoding rows ride along with the prefill for the cost of their few products (the mixed
/// batches of vLLM's chunked prefill). A row that prefilled draws at the next step.
fn step(view: &ModelView<'_>, jobs: &mut [Job]) -> Result<RolloutStats, ModelError> {
    let model = view.model;
    let cfg = model.config();
    let mut counts = RolloutStats::default();
    for i in 0..jobs.len() {
        if jobs[i].pending.is_empty() {
            continue;
        }
        if let Some((d, shared)) = prefix_donor(jobs, i) {
            let capacity = jobs[i].pending.len() + jobs[i].params.max_new_tokens;
            let cache = jobs[d]
                .conv
                .cache
                .as_ref()
                .ok_or_else(|| ModelError::Input("a donor row has no cache".into()))?
                .prefix_copy(shared, capacity)?;
            let job = &mut jobs[i];
            job.conv.fed = job.pending.drain(..shared).collect();
            job.conv.cache = Some(cache);
            counts.shared_prefix_tokens += shared as u64;
        }
    }
    // Every row with logits draws.
    let ready: Vec<usize> = (0..jobs.len())
        .filter(|&i| jobs[i].logits.is_some())
        .collect();
    let mut decodes = vec![false; jobs.len()];
    if !ready.is_empty() {
        let rows: Vec<&(Tensor, usize)> = ready
            .iter()
            .filter_map(|&i| jobs[i].logits.as_ref())
            .collect();
        let logits = draw_logits(&rows)?;
        let draws: Vec<RowDraw> = ready
            .iter()
            .map(|&i| {
                let j = &mut jobs[i];
                RowDraw {
                    temperature: j.params.temperature,
                    top_p: j.params.top_p,
                    // 24 bits: exactly representable in f32 and strictly below 1.
                    uniform: (j.conv.rng.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32),
                }
            })
            .collect();
        let picks = sample_rows(&logits, &draws)?;
        for (&i, (tok, lp)) in ready.iter().zip(picks) {
            let job = &mut jobs[i];
            job.tokens.push(tok);
            job.logprobs.push(lp);
            job.logits = None;
            counts.sampled_tokens += 1;
            if view.eos.contains(&tok)
                || stop_hit(view.codec, &job.tokens, &job.params.stop, job.max_stop)
            {
                job.finish = Some(FinishReason::Stop);
            } else if job.tokens.len() >= job.params.max_new_tokens {
                job.finish = Some(FinishReason::Length);
            } else {
                decodes[i] = true;
            }
        }
    }
    // The rows with context to run, but a row that begins as another row of this forward
    // does waits a step, then copies that row's keys and values.
    let mut prefill = vec![false; jobs.len()];
    for i in 0..jobs.len() {
        let job = &jobs[i];
        if job.pending.is_empty() {
            continue;
        }
        let waits = job.conv.fed.is_empty()
            && jobs.iter().zip(&prefill).any(|(other, &runs)| {
                runs && other.conv.fed.is_empty()
                    && copyable(&other.pending, &job.pending) >= MIN_SHARED_PREFIX
            });
        prefill[i] = !waits;
    }
    let prefilling = prefill.iter().filter(|&&p| p).count();
    let decoding = decodes.iter().filter(|&&d| d).count();
    if prefilling + decoding == 0 {
        return Ok(counts);
    }
    // In the batch's order, each row's tokens: its context, or the token it just drew.
    let mut runs: Vec<Vec<u32>> = Vec::with_capacity(prefilling + decoding);
    let mut caches: Vec<&mut KvCache> = Vec::with_capacity(prefilling + decoding);
    let mut order: Vec<usize> = Vec::with_capacity(prefilling + decoding);
    for (i, job) in jobs.iter_mut().enumerate() {
        let run = if prefill[i] {
            let pending = std::mem::take(&mut job.pending);
            if job.conv.cache.is_none() {
                job.conv.cache = Some(KvCache::new(
                    cfg.num_hidden_layers,
                    1,
                    cfg.num_key_value_heads,
                    pending.len() + job.params.max_new_tokens,
                    cfg.head_dim,
                    cache_dtype(view),
                    model.device(),
                )?);
            }
            pending
        } else if decodes[i] {
            vec![job.tokens.last().copied().unwrap_or(0)]
        } else {
            continue;
        };
        let cache = job
            .conv
            .cache
            .as_mut()
            .ok_or_else(|| ModelError::Input("a running row has no cache".into()))?;
        caches.push(cache);
        runs.push(run);
        order.push(i);
    }
    let rows: Vec<&[u32]> = runs.iter().map(Vec::as_slice).collect();
    let started = Instant::now();
    let logits = super::ops::amx::with_bf16_products(view.bf16_products.clone(), || {
        let h = model.hidden_rows(&rows, &mut caches)?;
        model.logits(&h, false)
    })?;
    let micros = started.elapsed().as_micros() as u64;
    drop(caches);
    if prefilling > 0 {
        counts.prefill_micros += micros;
    } else {
        counts.decode_micros += micros;
    }
    if decoding > 0 {
        counts.decode_steps += 1;
        counts.decode_rows += decoding as u64;
        if prefilling > 0 {
            counts.mixed_steps += 1;
        }
    }
    for (r, (i, run)) in order.into_iter().zip(runs).enumerate() {
        let job = &mut jobs[i];
        job.logits = Some((logits.clone(), r));
        if prefill[i] {
            counts.prefill_tokens += run.len() as u64;
        }
        job.conv.fed.extend(run);
    }
    Ok(counts)
}

/// The `(rows, vocab)` logits the rows that draw, each row `.1` of a step's logits, draw from.
/// Usually every row of the last forward draws, in its order: its logits as they are, rather
/// than a copy of each row (a megabyte a step for 8 rows of a 32k vocabulary).
fn draw_logits(rows: &[&(Tensor, usize)]) -> candle_core::Result<Tensor> {
    let whole = rows.first().map(|(t, _)| t).filter(|t| {
        t.dim(0).ok() == Some(rows.len())
            && rows
                .iter()
                .enumerate()
                .all(|(k, (u, r))| *r == k && u.id() == t.id())
    });
    match whole {
        Some(t) => Ok(t.clone()),
        None => Tensor::cat(
            &rows
                .iter()
                .map(|(t, r)| t.narrow(0, *r, 1))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        ),
    }
}

/// How many of the tokens `pending` that a conversation with nothing cached is about to run
/// it could copy from a cache of `donor`: their common start, short of the last token
/// (whose logits the conversation needs).
fn copyable(donor: &[u32], pending: &[u32]) -> usize {
    let want = &pending[..pending.len().saturating_sub(1)];
    donor.iter().zip(want).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::draw_logits;

    fn step_logits(rows: usize, base: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * 3).map(|i| base + i as f32).collect();
        Tensor::from_vec(v, (rows, 3), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    /// Every row of one step's logits, in order: the step's tensor itself, not a copy. Any
    /// other selection (a subset, another order, rows of two steps) gathers the rows asked
    /// for, in the order asked.
    #[test]
    fn draws_read_a_whole_step_in_place_and_gather_anything_else() {
        let a = step_logits(3, 0.0);
        let b = step_logits(2, 100.0);
        let all: Vec<(Tensor, usize)> = (0..3).map(|r| (a.clone(), r)).collect();
        let got = draw_logits(&all.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(got.id(), a.id());

        let pick = |sel: &[(&Tensor, usize)]| {
            let owned: Vec<(Tensor, usize)> = sel.iter().map(|(t, r)| ((*t).clone(), *r)).collect();
            let got = draw_logits(&owned.iter().collect::<Vec<_>>()).unwrap();
            assert_ne!(got.id(), a.id());
            values(&got)
        };
        let (ra, rb) = (values(&a), values(&b));
        assert_eq!(
            pick(&[(&a, 0), (&a, 2)]),
            vec![ra[0].clone(), ra[2].clone()]
        );
        assert_eq!(
            pick(&[(&a, 1), (&a, 0), (&a, 2)]),
            vec![ra[1].clone(), ra[0].clone(), ra[2].clone()]
        );
        assert_eq!(
            pick(&[(&a, 0), (&b, 1), (&a, 2)]),
            vec![ra[0].clone(), rb[1].clone(), ra[2].clone()]
        );
        // As many rows as the first step has, but not all of them its own.
        assert_eq!(
            pick(&[(&a, 0), (&a, 1), (&b, 0)]),
            vec![ra[0].clone(), ra[1].clone(), rb[0].clone()]
        );
        // The other step whole: that step's tensor.
        let whole_b: Vec<(Tensor, usize)> = (0..2).map(|r| (b.clone(), r)).collect();
        let got = draw_logits(&whole_b.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(got.id(), b.id());
    }
}
