//! `trainer bench memory`: one GRPO training step (forward, backward, AdamW) on one sequence
//! of N tokens for each N, on a random Qwen2-shaped model whose activations, not its weights,
//! dominate the memory of a step. Prints the peak of live heap bytes during the step above
//! what was live before it (see [`super::peak_alloc`]) and the step's time.
//!
//! The model: hidden 256, 4 layers, 8 query heads of 32 dims over 2 key/value heads,
//! intermediate 768, vocabulary 4 096 (5.3M parameters, 21 MB in f32). At 2 048 tokens the
//! activations of a layer alone (hidden states, projections, MLP) outweigh all the weights.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use serde_json::json;

use super::peak_alloc;
use crate::engine::policy::Policy;
use crate::grpo::{GrpoSettings, GrpoTrainer, Sample};
use crate::policy::{ByteCodec, CandlePolicy, Qwen2Config, Qwen2Model, Rng};

/// Arguments of `trainer bench memory`.
#[derive(clap::Args, Debug)]
pub struct MemoryArgs {
    /// Sequence lengths, comma-separated; one step each, in this order.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192,16384")]
    pub tokens: Vec<usize>,
    /// One JSON object per line: `{"tokens": N, "peak_bytes": B, "seconds": S}`.
    #[arg(long)]
    pub json: bool,
    /// `cpu` (peak heap bytes) or `cuda` (not measured by this build, see below).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Checkpoint the layers of steps of at least this many tokens (0: every step); the
    /// trainer's default otherwise.
    #[arg(long)]
    pub checkpoint_from: Option<usize>,
}

/// The benchmark's model (see the module documentation).
pub fn bench_config(max_positions: usize) -> anyhow::Result<Qwen2Config> {
    Ok(Qwen2Config::from_json(json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": false,
    }))?)
}

/// One step's figures.
#[derive(Clone, Copy, Debug)]
pub struct StepMemory {
    pub tokens: usize,
    pub peak_bytes: usize,
    pub seconds: f64,
}

pub fn run(args: MemoryArgs) -> anyhow::Result<ExitCode> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => bail!(
            "bench memory --device cuda: peak GPU memory is not measured by this build; \
             the CPU figures (--device cpu) are the reference"
        ),
        other => bail!("unknown device `{other}` (cpu or cuda)"),
    };
    if !peak_alloc::installed() {
        bail!("this process does not allocate through the counting allocator");
    }
    if args.tokens.iter().any(|&t| t < 2) {
        bail!("every length must be at least 2 tokens");
    }
    let longest = args.tokens.iter().copied().max().unwrap_or(2);
    let cfg = bench_config(longest.max(2))?;
    let mut model = Qwen2Model::random(cfg, 7, DType::F32, &device)?;
    if let Some(from) = args.checkpoint_from {
        model.set_checkpointing(Some(from));
    }
    let checkpoint_from = model.checkpointing();
    let policy = Arc::new(CandlePolicy::new(model, Arc::new(ByteCodec), vec![], 0));
    let settings = GrpoSettings {
        learning_rate: 1e-5,
        micro_batch_size: 1,
        ..GrpoSettings::default()
    };
    let mut trainer = GrpoTrainer::new(policy, settings)?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "one GRPO step per length, f32 on the CPU; layers checkpointed from {} tokens",
            checkpoint_from.map_or("no length".into(), |n| n.to_string())
        )?;
        writeln!(
            out,
            "{:>8} {:>14} {:>16} {:>10}",
            "tokens", "peak MiB", "bytes/token", "seconds"
        )?;
    }
    let mut rows = Vec::new();
    for &n in &args.tokens {
        let r = step(&mut trainer, n).with_context(|| format!("step of {n} tokens"))?;
        if args.json {
            writeln!(
                out,
                "{}",
                json!({"tokens": r.tokens, "peak_bytes": r.peak_bytes, "seconds": r.seconds})
            )?;
        } else {
            writeln!(
                out,
                "{:>8} {:>14.1} {:>16.0} {:>10.2}",
                r.tokens,
                r.peak_bytes as f64 / (1 << 20) as f64,
                r.peak_bytes as f64 / r.tokens as f64,
                r.seconds
            )?;
        }
        out.flush()?;
        rows.push(r);
    }
    if !args.json && rows.len() > 1 {
        writeln!(
            out,
            "\nincrement per added token between consecutive lengths:"
        )?;
        for w in rows.windows(2) {
            let dt = w[1].tokens as f64 - w[0].tokens as f64;
            let db = w[1].peak_bytes as f64 - w[0].peak_bytes as f64;
            writeln!(
                out,
                "{:>8} → {:<8} {:>12.0} bytes/token",
                w[0].tokens,
                w[1].tokens,
                if dt != 0.0 { db / dt } else { 0.0 }
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One training step on one random sequence of `n` tokens, every token after the first
/// trained on with a non-zero advantage.
pub fn step(trainer: &mut GrpoTrainer, n: usize) -> anyhow::Result<StepMemory> {
    let vocab = trainer.policy().model().config().vocab_size as u64;
    let mut rng = Rng::seed(n as u64);
    let tokens: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let mut old = vec![0f32; n];
    old[1..].fill(-(vocab as f32).ln());
    let sample = Sample {
        tokens,
        policy_mask: (0..n).map(|i| i > 0).collect(),
        old_logprobs: old,
        ref_logprobs: None,
        advantage: 1.0,
        policy_version: trainer.policy().version(),
        group: 0,
    };
    let samples = [sample];
    let before = peak_alloc::reset_peak();
    let t = Instant::now();
    trainer.train_step(&samples)?;
    let seconds = t.elapsed().as_secs_f64();
    Ok(StepMemory {
        tokens: n,
        peak_bytes: peak_alloc::peak().saturating_sub(before),
        seconds,
    })
}
