//! The policy: a Qwen2-family model in candle that samples (batched, KV-cached) and trains.
//!
//! * [`Qwen2Model`] — the decoder, from a Hugging Face directory or a seed; logits,
//!   per-token log-probs and entropies, with gradients.
//! * [`CandlePolicy`] — the model with its codec, sampling RNG and policy version;
//!   implements [`crate::engine::policy::Policy`].

mod allocator;
pub mod batcher;
pub mod codec;
pub mod config;
pub mod device_sampling;
pub mod kv_cache;
mod layer_checkpoint;
pub mod model;
pub mod ops;
pub mod rng;
pub mod sampling;
pub mod scoring;
mod threads;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Device};
use thiserror::Error;

use crate::engine::policy::{
    Generation, Policy, PolicyError, PolicySession, SamplingParams, TokenCodec,
};

pub use allocator::tune_allocator;
pub use batcher::RolloutStats;
pub use codec::{ByteCodec, HfCodec};
pub use config::Qwen2Config;
pub use model::Qwen2Model;
pub use ops::OpsMode;
pub use rng::Rng;
pub use scoring::SequenceScores;
pub use threads::pin_cpu_threads;

/// Errors of loading, running and saving the model.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("model config: {0}")]
    Config(String),
    #[error("model weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("bad model input: {0}")]
    Input(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<ModelError> for PolicyError {
    fn from(e: ModelError) -> Self {
        PolicyError::Failed(e.to_string())
    }
}

/// The dtype a run's model computes in on `device`. On the CPU a half-precision request
/// runs in f32: candle's CPU matmul has no bf16 kernel (it widens to f32 and narrows back)
/// and the fused CPU ops are f32/f64 only, so bf16 there is slower and no smaller in compute.
/// Code that wants bf16 compute on the CPU (the mixed-precision tests) builds the model with
/// that dtype directly ([`Qwen2Model::random`], [`Qwen2Model::from_tensors`]). Either way the
/// master weights stay in f32 ([`model::master_dtype`]).
pub fn compute_dtype(requested: DType, device: &Device) -> DType {
    match requested {
        DType::BF16 | DType::F16 if device.is_cpu() => {
            tracing::info!(?requested, "computing in f32 on the CPU");
            DType::F32
        }
        d => d,
    }
}

/// The model, its codec and the state sampling needs; implements [`Policy`].
///
/// Weights are updated in place by the optimiser (`crate::grpo`); an update holds the write
/// half of `weights_lock` and each decoding step the read half, so a step never sees half an
/// update. A session's cache keeps the keys and values of the weights its turns ran with: the
/// training loop plays a step's episodes to their end before it updates.
/// Generation goes through a continuous batching scheduler (`batcher`): concurrent calls and
/// sessions decode together, each conversation with its own random stream drawn from `rng`.
pub struct CandlePolicy {
    model: Qwen2Model,
    codec: Arc<dyn TokenCodec>,
    eos: Vec<u32>,
    rng: Mutex<Rng>,
    version: AtomicU64,
    weights_lock: RwLock<()>,
    source_dir: Option<PathBuf>,
    batcher: batcher::Batcher,
    /// Whether sampling's products may take bf16 inputs (CPU only: AMX, AVX512-BF16 or AVX-512), and the
    /// bf16 copies of the weights they read (dropped whenever the weights change).
    sampling_bf16: std::sync::atomic::AtomicBool,
    bf16_weights: Arc<ops::amx::Bf16Weights>,
}

impl std::fmt::Debug for CandlePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandlePolicy")
            .field("model", &self.model)
            .field("version", &self.version())
            .finish()
    }
}

impl CandlePolicy {
    pub fn new(model: Qwen2Model, codec: Arc<dyn TokenCodec>, eos: Vec<u32>, seed: u64) -> Self {
        Self {
            model,
            codec,
            eos,
            rng: Mutex::new(Rng::seed(seed)),
            version: AtomicU64::new(0),
            weights_lock: RwLock::new(()),
            source_dir: None,
            batcher: batcher::Batcher::default(),
            sampling_bf16: std::sync::atomic::AtomicBool::new(false),
            bf16_weights: Arc::default(),
        }
    }

    /// A tiny randomly initialised model with the byte-level vocabulary.
    pub fn tiny(
        seed: u64,
        hidden_size: usize,
        num_layers: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let cfg = Qwen2Config::tiny(hidden_size, num_layers)?;
        let model = Qwen2Model::random(cfg, seed, compute_dtype(dtype, device), device)?;
        Ok(Self::new(
            model,
            Arc::new(ByteCodec),
            vec![ByteCodec::EOS],
            seed,
        ))
    }

    /// Loads a Hugging Face model directory: `config.json`, safetensors (sharded or not)
    /// and `tokenizer.json` (or `tokenizer`, when given). `seed` seeds sampling.
    pub fn load(
        dir: &Path,
        tokenizer: Option<&Path>,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let model = load_model(dir, dtype, device)?;
        let cfg = model.config();
        let (codec, eos): (Arc<dyn TokenCodec>, Vec<u32>) =
            if cfg.byte_tokenizer() && tokenizer.is_none() {
                (Arc::new(ByteCodec), vec![ByteCodec::EOS])
            } else {
                let path = tokenizer
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| dir.join("tokenizer.json"));
                let codec = HfCodec::from_file(&path)?;
                let mut eos = cfg.eos_token_ids.clone();
                eos.extend(generation_eos(dir));
                // Chat models end a turn with <|im_end|> even where config.json names <|endoftext|>.
                eos.extend(codec.token_id("<|im_end|>"));
                eos.sort_unstable();
                eos.dedup();
                (Arc::new(codec), eos)
            };
        let mut p = Self::new(model, codec, eos, seed);
        p.source_dir = Some(dir.to_path_buf());
        Ok(p)
    }

    /// Builds the policy a run's `model` field names. `path` and `tiny` are exclusive.
    pub fn from_source(
        src: &selfplay_crds::run::ModelSource,
        device: &Device,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let dtype = match src.dtype {
            selfplay_crds::run::ModelDtype::F32 => DType::F32,
            selfplay_crds::run::ModelDtype::Bf16 => DType::BF16,
        };
        match (&src.path, &src.tiny) {
            (Some(path), None) => Self::load(
                Path::new(path),
                src.tokenizer.as_deref().map(Path::new),
                dtype,
                device,
                seed,
            ),
            (None, Some(t)) => {
                let hidden = usize::try_from(t.hidden_size)
                    .map_err(|_| ModelError::Config("tiny.hiddenSize is negative".into()))?;
                let layers = usize::try_from(t.num_layers)
                    .map_err(|_| ModelError::Config("tiny.numLayers is negative".into()))?;
                Self::tiny(t.seed, hidden, layers, dtype, device)
            }
            _ => Err(ModelError::Config(
                "exactly one of model.path and model.tiny must be set".into(),
            )),
        }
    }

    /// A copy of this policy on `device` (weights, tokenizer, version, sampling state), for a
    /// data-parallel worker: it trains beside this one and never samples.
    pub fn replica_on(&self, device: &Device) -> Result<Self, ModelError> {
        let mut p = Self::new(
            self.model.replica_on(device)?,
            self.codec.clone(),
            self.eos.clone(),
            0,
        );
        p.set_version(self.version());
        p.set_rng_state(self.rng_state());
        p.source_dir = self.source_dir.clone();
        Ok(p)
    }

    pub fn model(&self) -> &Qwen2Model {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut Qwen2Model {
        &mut self.model
    }

    pub fn codec_arc(&self) -> Arc<dyn TokenCodec> {
        self.codec.clone()
    }

    /// Token ids that end a generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The directory the model was loaded from (its `tokenizer.json` is copied into checkpoints).
    pub fn source_dir(&self) -> Option<&Path> {
        self.source_dir.as_deref()
    }

    /// Whether episodes are marked up in ChatML: for every model loaded from a directory (a
    /// Hugging Face model, a checkpoint, `trainer sft`'s output, byte-level or not), not for
    /// a tiny model built from a seed. Training, `trainer sft` and `trainer eval` all follow
    /// this one rule: a model evaluated in another markup than it was trained in is another
    /// model.
    pub fn chat_markup(&self) -> bool {
        self.source_dir.is_some()
    }

    pub fn set_version(&self, v: u64) {
        // A new version may come with new weights (a checkpoint loaded into this policy).
        self.bf16_weights.clear();
        self.version.store(v, Ordering::SeqCst);
    }

    pub fn rng_state(&self) -> [u64; 4] {
        self.rng
            .lock()
            .map(|r| r.state())
            .unwrap_or_else(|p| p.into_inner().state())
    }

    pub fn set_rng_state(&self, s: [u64; 4]) {
        let mut g = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *g = Rng::from_state(s);
    }

    /// Counters of the generation work done so far (prefill, decoding batches, evictions).
    pub fn rollout_stats(&self) -> RolloutStats {
        self.batcher.stats()
    }

    /// Bounds the KV caches that sessions keep between turns (all sessions together).
    pub fn set_kv_budget_bytes(&self, bytes: usize) {
        self.batcher.set_kv_budget_bytes(bytes);
    }

    /// Lets sampling on the CPU multiply in bf16 (inputs rounded to bf16, sums in f32) on the
    /// AMX tiles of CPUs that have them, or for decoding steps from bf16 weights with AVX-512, as a GPU samples in
    /// bf16; scoring and training keep their precision. Returns whether it takes effect:
    /// false on a CPU with neither (the products then stay f32) or when `on` is false. See
    /// `ops/amx.rs` and `ops/bf16_few_rows.rs`.
    pub fn set_sampling_bf16(&self, on: bool) -> bool {
        let effective = on && ops::amx::available();
        self.sampling_bf16
            .store(effective, std::sync::atomic::Ordering::Relaxed);
        if !effective {
            self.bf16_weights.clear();
        }
        effective
    }

    /// What multiplies bf16 on this CPU for [`CandlePolicy::set_sampling_bf16`]: `"AMX"`,
    /// `"AVX512-BF16"` (`vdpbf16ps`, AMD), `"AVX-512"`, or `None` where none is available.
    pub fn bf16_products_backend() -> Option<&'static str> {
        ops::amx::backend().map(|b| match b {
            ops::amx::Backend::Amx => "AMX",
            ops::amx::Backend::Avx512 => "AVX-512",
            ops::amx::Backend::Avx512Bf16 => "AVX512-BF16",
        })
    }

    /// The sampling precision a run's `model.dtype` asks for. On the CPU, where training
    /// computes in f32 whatever the dtype ([`compute_dtype`]), `bf16` samples with bf16
    /// products where the CPU has them ([`CandlePolicy::set_sampling_bf16`]), as the same spec
    /// samples in bf16 on a GPU, and `f32` samples in f32; elsewhere the compute dtype decides
    /// already. Returns whether sampling multiplies in bf16 on the CPU.
    pub fn sample_in_spec_precision(&self, dtype: selfplay_crds::run::ModelDtype) -> bool {
        if !self.model.device().is_cpu() {
            return false;
        }
        let asked = dtype == selfplay_crds::run::ModelDtype::Bf16;
        let on = self.set_sampling_bf16(asked);
        match (asked, Self::bf16_products_backend()) {
            (true, Some(backend)) => {
                tracing::info!(
                    backend,
                    "model.dtype bf16: sampling with bf16 products on the CPU"
                )
            }
            (true, None) => tracing::info!(
                "model.dtype bf16: this CPU has neither AMX nor AVX-512, sampling in f32"
            ),
            (false, _) => {}
        }
        on
    }

    /// Whether sampling multiplies in bf16 (see [`CandlePolicy::set_sampling_bf16`]).
    pub fn sampling_bf16(&self) -> bool {
        self.sampling_bf16
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A new conversation's random stream: drawn from the policy's, so the checkpointed
    /// state fixes every later conversation's samples.
    fn next_stream(&self) -> Rng {
        let mut g = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        Rng::seed(g.next_u64())
    }

    fn view(&self) -> batcher::ModelView<'_> {
        batcher::ModelView {
            model: &self.model,
            codec: self.codec.as_ref(),
            eos: &self.eos,
            weights_lock: &self.weights_lock,
            bf16_products: self
                .sampling_bf16()
                .then(|| (self.bf16_weights.clone(), self.version())),
        }
    }

    /// Runs `f` while no generation reads the weights (the optimiser's in-place update).
    pub(crate) fn with_weights_locked<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = self.weights_lock.write().unwrap_or_else(|p| p.into_inner());
        let r = f();
        self.bf16_weights.clear();
        r
    }

    /// log π(token | prefix) and the entropy of π(· | prefix) for every token after the first
    /// of each sequence (no gradient).
    pub fn score(&self, seqs: &[Vec<u32>]) -> Result<Vec<SequenceScores>, ModelError> {
        let _guard = self.weights_lock.read().unwrap_or_else(|p| p.into_inner());
        rayon::scope(|_| self.model.score_sequences(seqs))
    }
}

impl CandlePolicy {
    /// Generates as [`Policy::generate`] does, drawing from `rng` instead of the policy's own
    /// generator: evaluation gives each attempt its own seeded stream, so its samples do not
    /// depend on which attempts ran before it or beside it.
    pub fn generate_with_rng(
        &self,
        contexts: &[Vec<u32>],
        params: &SamplingParams,
        rng: &mut Rng,
    ) -> Result<Vec<Generation>, PolicyError> {
        // Locks on the caller's thread, never on a rayon worker (see `generate`).
        let _guard = self.weights_lock.read().unwrap_or_else(|p| p.into_inner());
        rayon::scope(|_| {
            sampling::generate(
                &self.model,
                self.codec.as_ref(),
                &self.eos,
                contexts,
                params,
                rng,
            )
        })
    }
}

/// Loads the model of a Hugging Face directory (`config.json` and safetensors, sharded or
/// not) without its tokenizer.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Qwen2Model, ModelError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let raw = serde_json::from_str(&text)
        .map_err(|e| ModelError::Config(format!("{}: {e}", cfg_path.display())))?;
    let cfg = Qwen2Config::from_json(raw)?;
    let tensors = weights::load_files(&weights::weight_files(dir)?)?;
    Qwen2Model::from_tensors(cfg, tensors, compute_dtype(dtype, device), device)
}

/// `eos_token_id` of `generation_config.json`, where present.
fn generation_eos(dir: &Path) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .into_iter()
            .collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

impl Policy for CandlePolicy {
    fn codec(&self) -> &dyn TokenCodec {
        self.codec.as_ref()
    }

    /// Each context becomes a conversation of the batcher for this call; other calls and
    /// sessions running at the same time share its decoding steps.
    fn generate(
        &self,
        contexts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> Result<Vec<Generation>, PolicyError> {
        let ids: Vec<u64> = contexts
            .iter()
            .map(|_| self.batcher.open(self.next_stream()))
            .collect();
        let requests = ids
            .iter()
            .zip(contexts)
            .map(|(id, c)| (*id, c.as_slice(), params))
            .collect();
        let out = self.batcher.run(&self.view(), requests);
        for id in ids {
            self.batcher.close(id);
        }
        out.into_iter().collect()
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    fn open_session(self: Arc<Self>) -> Option<Box<dyn PolicySession>> {
        let id = self.batcher.open(self.next_stream());
        Some(Box::new(CandleSession { policy: self, id }))
    }
}

/// A conversation whose KV cache the batcher keeps between turns; freed on drop.
struct CandleSession {
    policy: Arc<CandlePolicy>,
    id: u64,
}

impl PolicySession for CandleSession {
    fn continue_turn(
        &mut self,
        context: &[u32],
        params: &SamplingParams,
    ) -> Result<Generation, PolicyError> {
        let p = &self.policy;
        p.batcher
            .run(&p.view(), vec![(self.id, context, params)])
            .pop()
            .unwrap_or_else(|| Err(PolicyError::Failed("no generation for the turn".into())))
    }
}

impl Drop for CandleSession {
    fn drop(&mut self) {
        self.policy.batcher.close(self.id);
    }
}
