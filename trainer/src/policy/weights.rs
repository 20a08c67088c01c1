//! Reading and writing transformers-style safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::ModelError;

/// The weight files of a model directory: those named by `model.safetensors.index.json`
/// (sharded), else `model.safetensors`, else every `model*.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Weights(format!("{}: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Weights(format!("{}: no weight_map", index.display())))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for f in map.values() {
            let name = f.as_str().ok_or_else(|| {
                ModelError::Weights(format!("{}: bad file name {f}", index.display()))
            })?;
            if name.contains('/') || name.contains("..") {
                return Err(ModelError::Weights(format!(
                    "{}: file name `{name}` leaves the directory",
                    index.display()
                )));
            }
            let p = dir.join(name);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("model") && n.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Weights(format!(
            "no model*.safetensors in {}",
            dir.display()
        )));
    }
    Ok(files)
}

/// Loads every tensor of `files` onto the CPU.
pub fn load_files(files: &[PathBuf]) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut out = HashMap::new();
    for f in files {
        let part = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| ModelError::Weights(format!("{}: {e}", f.display())))?;
        for (name, t) in part {
            if out.insert(name.clone(), t).is_some() {
                return Err(ModelError::Weights(format!(
                    "tensor `{name}` appears in two files"
                )));
            }
        }
    }
    Ok(out)
}

/// Writes `tensors` as one safetensors file with the `format: pt` metadata transformers expects.
pub fn save_file(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), ModelError> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    safetensors::serialize_to_file(
        cpu.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| ModelError::Weights(format!("{}: {e}", path.display())))
}
