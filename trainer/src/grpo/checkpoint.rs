//! Checkpoints: a directory holding the (f32 master) weights as transformers reads them
//! (`model.safetensors` + `config.json`, and `tokenizer.json` where the model had one), the
//! AdamW moments (`optimizer.safetensors`) and `trainer_state.json` (step, policy version,
//! sampling RNG state, settings seed).
//!
//! Written atomically: everything goes to a hidden temporary directory beside the target,
//! is synced, and is renamed into place; a crash leaves either the complete checkpoint or
//! none. Non-finite weights or moments are refused before anything is written.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::engine::policy::Policy;
use crate::policy::model::master_dtype;
use crate::policy::{CandlePolicy, weights};

use super::optimizer::global_grad_norm;
use super::{GrpoError, GrpoSettings, GrpoTrainer};

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    /// Updates applied.
    pub step: u64,
    pub policy_version: u64,
    /// xoshiro256++ state of the sampling RNG.
    pub rng_state: [u64; 4],
    /// AdamW's update count (bias correction).
    pub adam_step: u64,
    pub seed: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GrpoError + '_ {
    move |e| GrpoError::Checkpoint(format!("{}: {e}", path.display()))
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

fn sync_file(path: &Path) -> Result<(), GrpoError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), GrpoError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

impl GrpoTrainer {
    /// Writes a checkpoint to `dir` (which must not exist yet) and returns it.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<PathBuf, GrpoError> {
        if dir.exists() {
            return Err(GrpoError::Checkpoint(format!(
                "{} already exists",
                dir.display()
            )));
        }
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            GrpoError::Checkpoint(format!("bad checkpoint path {}", dir.display()))
        })?;
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let policy = self.policy();
        let model = policy.model();
        let params = model.parameters();
        let opt = self.optimizer();
        // Refuse to persist a diverged model: a checkpoint is only ever a usable one.
        let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.as_tensor().clone()).collect();
        let moments: Vec<Tensor> = opt
            .m
            .iter()
            .chain(&opt.v)
            .map(|t| t.as_tensor().clone())
            .collect();
        if !global_grad_norm(&tensors)?.is_finite() || !global_grad_norm(&moments)?.is_finite() {
            return Err(GrpoError::NonFiniteState);
        }
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        let result = (|| {
            let named: Vec<(String, Tensor)> = params
                .iter()
                .map(|(n, p)| (n.clone(), p.as_tensor().clone()))
                .collect();
            let model_path = tmp.join("model.safetensors");
            weights::save_file(&model_path, &named)?;
            sync_file(&model_path)?;
            // The weights written are the f32 masters, whatever the model computes in.
            let stored = master_dtype(model.dtype());
            let cfg = serde_json::to_vec_pretty(&model.config().to_json(dtype_name(stored)))
                .map_err(|e| GrpoError::Checkpoint(e.to_string()))?;
            write_synced(&tmp.join("config.json"), &cfg)?;
            if let Some(src) = policy.source_dir() {
                for f in [
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "generation_config.json",
                ] {
                    let from = src.join(f);
                    if from.is_file() {
                        let to = tmp.join(f);
                        std::fs::copy(&from, &to).map_err(io(&from))?;
                        sync_file(&to)?;
                    }
                }
            }
            let mut opt_named = Vec::new();
            for (i, (n, _)) in params.iter().enumerate() {
                opt_named.push((format!("exp_avg.{n}"), opt.m[i].as_tensor().clone()));
                opt_named.push((format!("exp_avg_sq.{n}"), opt.v[i].as_tensor().clone()));
            }
            let opt_path = tmp.join(OPTIMIZER_FILE);
            weights::save_file(&opt_path, &opt_named)?;
            sync_file(&opt_path)?;
            let state = TrainerState {
                format: FORMAT,
                step: self.step(),
                policy_version: policy.version(),
                rng_state: policy.rng_state(),
                adam_step: opt.t,
                seed: self.settings().seed,
            };
            let state = serde_json::to_vec_pretty(&state)
                .map_err(|e| GrpoError::Checkpoint(e.to_string()))?;
            write_synced(&tmp.join(STATE_FILE), &state)?;
            File::open(&tmp)
                .and_then(|d| d.sync_all())
                .map_err(io(&tmp))?;
            std::fs::rename(&tmp, dir).map_err(io(dir))?;
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io(parent))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.map(|()| dir.to_path_buf())
    }

    /// Continues from a checkpoint: weights, optimiser moments, step, version and RNG.
    pub fn resume(
        dir: &Path,
        settings: GrpoSettings,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, GrpoError> {
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
        let state: TrainerState = serde_json::from_str(&text)
            .map_err(|e| GrpoError::Checkpoint(format!("{}: {e}", state_path.display())))?;
        if state.format != FORMAT {
            return Err(GrpoError::Checkpoint(format!(
                "checkpoint format {} is not {FORMAT}",
                state.format
            )));
        }
        let policy = CandlePolicy::load(dir, None, dtype, device, settings.seed)?;
        policy.set_version(state.policy_version);
        policy.set_rng_state(state.rng_state);
        let names: Vec<String> = policy
            .model()
            .parameters()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let mut trainer = GrpoTrainer::new(Arc::new(policy), settings)?;
        let opt_path = dir.join(OPTIMIZER_FILE);
        let mut saved: HashMap<String, Tensor> =
            weights::load_files(std::slice::from_ref(&opt_path))?;
        let mut take = |key: String| {
            saved.remove(&key).ok_or_else(|| {
                GrpoError::Checkpoint(format!("{}: `{key}` is missing", opt_path.display()))
            })
        };
        let m = names
            .iter()
            .map(|n| take(format!("exp_avg.{n}")))
            .collect::<Result<Vec<_>, _>>()?;
        let v = names
            .iter()
            .map(|n| take(format!("exp_avg_sq.{n}")))
            .collect::<Result<Vec<_>, _>>()?;
        trainer.restore(state.step, state.adam_step, m, v)?;
        Ok(trainer)
    }
}
