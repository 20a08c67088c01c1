//! The policy: a Qwen2-family model in candle that samples (batched, KV-cached) and trains.
//!
//! * [`Qwen2Model`] — the decoder, from a Hugging Face directory or a seed; logits,
//!   per-token log-probs and entropies, with gradients.
//! * [`CandlePolicy`] — the model with its codec, sampling RNG and policy version;
//!   implements [`crate::engine::policy::Policy`].

mod allocator;
pub mod codec;
pub mod config;
pub mod kv_cache;
mod layer_checkpoint;
pub mod model;
pub mod ops;
pub mod rng;
pub mod sampling;
pub mod scoring;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Device};
use thiserror::Error;

use crate::engine::policy::{Generation, Policy, PolicyError, SamplingParams, TokenCodec};

pub use allocator::tune_allocator;
pub use codec::{ByteCodec, HfCodec};
pub use config::Qwen2Config;
pub use model::Qwen2Model;
pub use ops::OpsMode;
pub use rng::Rng;
pub use scoring::SequenceScores;

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

/// The dtype the model computes in on `device`: candle's CPU matmul has no bf16/f16, so
/// half-precision requests run in f32 there.
pub fn compute_dtype(requested: DType, device: &Device) -> DType {
    match requested {
        DType::BF16 | DType::F16 if device.is_cpu() => {
            tracing::warn!(
                ?requested,
                "the CPU has no half-precision matmul in candle: computing in f32"
            );
            DType::F32
        }
        d => d,
    }
}

/// The model, its codec and the state sampling needs; implements [`Policy`].
///
/// Weights are updated in place by the optimiser (`crate::grpo`); an update holds the write
/// half of `weights_lock` and generation the read half, so a generation never sees half an update.
pub struct CandlePolicy {
    model: Qwen2Model,
    codec: Arc<dyn TokenCodec>,
    eos: Vec<u32>,
    rng: Mutex<Rng>,
    version: AtomicU64,
    weights_lock: RwLock<()>,
    source_dir: Option<PathBuf>,
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

    pub fn set_version(&self, v: u64) {
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

    /// Runs `f` while no generation reads the weights (the optimiser's in-place update).
    pub(crate) fn with_weights_locked<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = self.weights_lock.write().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// log π(token | prefix) and the entropy of π(· | prefix) for every token after the first
    /// of each sequence (no gradient).
    pub fn score(&self, seqs: &[Vec<u32>]) -> Result<Vec<SequenceScores>, ModelError> {
        let _guard = self.weights_lock.read().unwrap_or_else(|p| p.into_inner());
        rayon::scope(|_| self.model.score_sequences(seqs))
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

    fn generate(
        &self,
        contexts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> Result<Vec<Generation>, PolicyError> {
        let _guard = self.weights_lock.read().unwrap_or_else(|p| p.into_inner());
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let rng: &mut Rng = &mut rng;
        // The whole decoding loop runs on a worker of the rayon pool: its many small parallel
        // ops then fork on the spot instead of each being injected from outside the pool and
        // waking a worker while this thread sleeps (a context switch per op). Both locks are
        // taken here, on the caller's thread, never on a worker: a worker that blocked on a
        // lock while another job it had stolen held it would deadlock the pool.
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

    fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }
}
