//! `trainer bench memory`: one GRPO training step (forward, backward, AdamW) on one sequence
//! of N tokens for each N, on a random Qwen2-shaped model whose activations, not its weights,
//! dominate the memory of a step. Prints the peak of live heap bytes during the step above
//! what was live before it (see [`super::peak_alloc`]) and the step's time.
//!
//! The model: hidden 256, 4 layers, 8 query heads of 32 dims over 2 key/value heads,
//! intermediate 768, vocabulary 4 096 (5.1M parameters, 20 MB in f32). At 2 048 tokens the
//! activations of a layer alone (hidden states, projections, MLP) outweigh all the weights.
//! `--shape qwen2.5-0.5b` takes Qwen2.5-0.5B's shape instead.
//!
//! With `--device cuda` the step runs on the first GPU, computing in bf16 on f32 masters as
//! a run does there; the heap count says nothing of GPU memory, so no peak is reported and
//! `trainer/scripts/gpu-check.sh` measures it from outside, matching each record's `started`
//! and `ended` times.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::DType;
use serde_json::json;

use super::{ModelShape, peak_alloc, unix_seconds};
use crate::engine::policy::Policy;
use crate::grpo::{GrpoSettings, GrpoTrainer, Sample};
use crate::policy::{ByteCodec, CandlePolicy, Qwen2Model, Rng};

/// Arguments of `trainer bench memory`.
#[derive(clap::Args, Debug)]
pub struct MemoryArgs {
    /// Sequence lengths, comma-separated; one step each, in this order.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192,16384")]
    pub tokens: Vec<usize>,
    /// One JSON object per line: `{"tokens": N, "peak_bytes": B, "seconds": S, …}`
    /// (`peak_bytes` null on CUDA; also `tokens_per_s`, `device`, `params`, and `started` /
    /// `ended` in Unix seconds).
    #[arg(long)]
    pub json: bool,
    /// `cpu` (f32, peak heap bytes) or `cuda` (the first GPU, bf16 compute on f32 masters;
    /// GPU memory is measured from outside, see the module documentation).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The model's shape.
    #[arg(long, value_enum, default_value = "bench")]
    pub shape: ModelShape,
    /// Run one unreported step of at most 256 tokens first (kernel loading, the optimiser's
    /// state), so that the first reported step is not the first one.
    #[arg(long)]
    pub warmup: bool,
    /// Checkpoint the layers of steps of at least this many tokens (0: every step); the
    /// trainer's default otherwise.
    #[arg(long)]
    pub checkpoint_from: Option<usize>,
}

/// One step's figures.
#[derive(Clone, Copy, Debug)]
pub struct StepMemory {
    pub tokens: usize,
    /// Live heap bytes above the step's start (meaningful on the CPU only).
    pub peak_bytes: usize,
    pub seconds: f64,
    /// Unix seconds at the step's start and end.
    pub started: f64,
    pub ended: f64,
}

pub fn run(args: MemoryArgs) -> anyhow::Result<ExitCode> {
    let device = super::device(&args.device)?;
    // bf16 on a GPU, as a run computes there (`model.dtype`'s default); f32 on the CPU.
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    if !peak_alloc::installed() {
        bail!("this process does not allocate through the counting allocator");
    }
    if args.tokens.iter().any(|&t| t < 2) {
        bail!("every length must be at least 2 tokens");
    }
    let longest = args.tokens.iter().copied().max().unwrap_or(2);
    let cfg = args.shape.config(longest.max(2))?;
    let mut model = Qwen2Model::random(cfg, 7, dtype, &device)?;
    let params: usize = model.parameters().iter().map(|(_, p)| p.elem_count()).sum();
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
    if args.warmup {
        let n = args.tokens.iter().copied().min().unwrap_or(2).min(256);
        step(&mut trainer, n).with_context(|| format!("warm-up step of {n} tokens"))?;
    }
    let on_cpu = device.is_cpu();
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "one GRPO step per length, {} on {:?}, {:.1}M parameters; layers checkpointed from {} tokens",
            dtype.as_str(),
            device.location(),
            params as f64 / 1e6,
            checkpoint_from.map_or("no length".into(), |n| n.to_string())
        )?;
        if !on_cpu {
            writeln!(
                out,
                "GPU memory is not counted here (trainer/scripts/gpu-check.sh measures it)"
            )?;
        }
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
                json!({
                    "tokens": r.tokens,
                    "peak_bytes": on_cpu.then_some(r.peak_bytes),
                    "seconds": r.seconds,
                    "tokens_per_s": r.tokens as f64 / r.seconds,
                    "device": args.device,
                    "params": params,
                    "started": r.started,
                    "ended": r.ended,
                })
            )?;
        } else if on_cpu {
            writeln!(
                out,
                "{:>8} {:>14.1} {:>16.0} {:>10.2}",
                r.tokens,
                r.peak_bytes as f64 / (1 << 20) as f64,
                r.peak_bytes as f64 / r.tokens as f64,
                r.seconds
            )?;
        } else {
            writeln!(
                out,
                "{:>8} {:>14} {:>16} {:>10.2}",
                r.tokens, "-", "-", r.seconds
            )?;
        }
        out.flush()?;
        rows.push(r);
    }
    if !args.json && on_cpu && rows.len() > 1 {
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
    let device = trainer.policy().model().device().clone();
    device.synchronize()?;
    let before = peak_alloc::reset_peak();
    let started = unix_seconds();
    let t = Instant::now();
    trainer.train_step(&samples)?;
    // A GPU may still be running the update's kernels: the step ends when they do.
    device.synchronize()?;
    let seconds = t.elapsed().as_secs_f64();
    Ok(StepMemory {
        tokens: n,
        peak_bytes: peak_alloc::peak().saturating_sub(before),
        seconds,
        started,
        ended: unix_seconds(),
    })
}
