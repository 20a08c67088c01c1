//! Shared by the policy_* and grpo_* tests: the PyTorch fixtures (trainer/fixtures, written
//! by trainer/scripts/make_fixtures.py) and comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use selfplay_trainer::grpo::Sample;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

pub struct Reference {
    pub meta: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let dir = fixture(name);
        let meta =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        Self { meta, tensors }
    }

    pub fn vec(&self, key: &str) -> Vec<f64> {
        self.tensors[key]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub fn sequences(&self) -> Vec<Vec<u32>> {
        serde_json::from_value(self.meta["sequences"].clone()).unwrap()
    }

    /// The fixture's GRPO batch as samples (old log-probs aligned with tokens).
    pub fn samples(&self) -> Vec<Sample> {
        let masks: Vec<Vec<bool>> =
            serde_json::from_value(self.meta["policy_mask"].clone()).unwrap();
        let advs: Vec<f64> = serde_json::from_value(self.meta["advantages"].clone()).unwrap();
        self.sequences()
            .into_iter()
            .enumerate()
            .map(|(k, tokens)| {
                let old = self.vec(&format!("old_logprobs.{k}"));
                let mut old_lp = vec![0f32; tokens.len()];
                for i in 1..tokens.len() {
                    old_lp[i] = old[i - 1] as f32;
                }
                Sample {
                    policy_mask: masks[k].clone(),
                    old_logprobs: old_lp,
                    ref_logprobs: None,
                    advantage: advs[k],
                    policy_version: 0,
                    group: k as u64,
                    tokens,
                }
            })
            .collect()
    }
}

/// max |a − b|.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}
