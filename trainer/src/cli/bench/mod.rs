//! `trainer bench …`: peak memory of a training step per sequence length (`memory`), the
//! counting allocator it reads, the device against the CPU on the committed fixtures
//! (`parity`), and what the benchmarks share: model shapes and the device flag.

pub mod memory;
pub mod parity;
pub mod peak_alloc;

use anyhow::Context;
use candle_core::Device;
use serde_json::json;

use crate::policy::Qwen2Config;

/// A benchmark model's shape (random weights).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelShape {
    /// The memory benchmark's model: hidden 256, 4 layers, 8 query heads of 32 dims over 2
    /// key/value heads, intermediate 768, vocabulary 4 096, untied (5.1M parameters):
    /// activations, not weights, dominate a step's memory.
    Bench,
    /// Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 query heads of 64 dims over 2
    /// key/value heads, intermediate 4 864, vocabulary 151 936, tied (494M parameters).
    #[value(name = "qwen2.5-0.5b")]
    Qwen25_05b,
}

impl ModelShape {
    pub fn config(self, max_positions: usize) -> anyhow::Result<Qwen2Config> {
        let (vocab, hidden, inter, layers, heads, kv, head_dim, tied) = match self {
            ModelShape::Bench => (4096, 256, 768, 4, 8, 2, 32, false),
            ModelShape::Qwen25_05b => (151_936, 896, 4864, 24, 14, 2, 64, true),
        };
        Ok(Qwen2Config::from_json(json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": tied,
        }))?)
    }
}

/// The device of a `--device` flag: `cpu`, or `cuda` (the first GPU), which fails with the
/// reason (no CUDA build, no usable GPU) instead of falling back to the CPU.
pub fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context("--device cuda: CUDA is not available"),
        other => anyhow::bail!("--device {other}: expected cpu or cuda"),
    }
}

/// Seconds since the Unix epoch: benchmark records carry when they ran, so that a monitor
/// sampled outside the process (GPU memory, by `trainer/scripts/gpu-check.sh`) can be
/// matched to them.
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(f64::NAN, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::parameter_shapes;

    fn parameters(shape: ModelShape) -> usize {
        let cfg = shape.config(128).unwrap();
        parameter_shapes(&cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The shapes are the models they are named after: Qwen2.5-0.5B has 494 032 768
    /// parameters (its model card's 0.49B), tied embeddings included once.
    #[test]
    fn shapes_have_their_parameter_counts() {
        assert_eq!(parameters(ModelShape::Qwen25_05b), 494_032_768);
        assert_eq!(parameters(ModelShape::Bench), 5_115_648);
    }

    #[test]
    fn an_unknown_device_is_refused() {
        assert!(device("cpu").is_ok());
        assert!(device("tpu").is_err());
    }
}
