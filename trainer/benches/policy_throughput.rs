//! Candle side of trainer/bench/run.sh: times a GRPO training step and batched sampling on
//! the model and inputs that bench_torch.py wrote. Prints one JSON line.
//!
//! `cargo bench -p selfplay-trainer --bench policy_throughput -- --model-dir DIR`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use selfplay_trainer::engine::policy::{Policy, SamplingParams};
use selfplay_trainer::grpo::{GrpoSettings, GrpoTrainer, Sample};
use selfplay_trainer::policy::{ByteCodec, CandlePolicy, load_model};

fn main() -> anyhow::Result<()> {
    // As the trainer binary does.
    selfplay_trainer::policy::tune_allocator();
    selfplay_trainer::policy::pin_cpu_threads();
    let mut dir = None;
    let mut only = None;
    let mut composite = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model-dir" => dir = args.next().map(PathBuf::from),
            "--only" => only = args.next(),
            // Differentiable candle primitives only (the CUDA path), for comparison.
            "--composite" => composite = true,
            _ => {} // cargo bench passes --bench
        }
    }
    let dir = dir.ok_or_else(|| anyhow::anyhow!("--model-dir DIR is required"))?;
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bench_inputs.json"))?)?;
    let train: Vec<Vec<u32>> = serde_json::from_value(inputs["train"].clone())?;
    let prompts: Vec<Vec<u32>> = serde_json::from_value(inputs["prompts"].clone())?;
    let new_tokens = inputs["new_tokens"].as_u64().unwrap_or(128) as usize;
    let steps = inputs["steps"].as_u64().unwrap_or(3) as usize;

    let mut model = load_model(&dir, DType::F32, &Device::Cpu)?;
    if composite {
        model.set_ops_mode(selfplay_trainer::policy::OpsMode::Composite);
    }
    let policy = Arc::new(CandlePolicy::new(model, Arc::new(ByteCodec), vec![], 0));
    let mut out = serde_json::json!({
        "impl": if composite { "candle 0.11 (composite ops)" } else { "candle 0.11" },
        "threads": candle_core::utils::get_num_threads(),
    });

    if only.as_deref() != Some("sample") {
        let old = policy.score(&train)?;
        let n = train.len();
        let samples: Vec<Sample> = train
            .iter()
            .zip(&old)
            .enumerate()
            .map(|(k, (t, s))| {
                let mut old_lp = vec![0f32];
                old_lp.extend(&s.logprobs);
                Sample {
                    tokens: t.clone(),
                    policy_mask: (0..t.len()).map(|i| i > 0).collect(),
                    old_logprobs: old_lp,
                    ref_logprobs: None,
                    advantage: -1.0 + 2.0 * k as f64 / (n - 1).max(1) as f64,
                    policy_version: 0,
                    group: k as u64,
                }
            })
            .collect();
        let settings = GrpoSettings {
            learning_rate: 1e-5,
            micro_batch_size: n,
            ..GrpoSettings::default()
        };
        let mut trainer = GrpoTrainer::new(policy.clone(), settings)?;
        let mut times = Vec::new();
        for i in 0..=steps {
            let t = Instant::now();
            trainer.train_step(&samples)?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let tokens: usize = train.iter().map(Vec::len).sum();
        out["train_tokens_per_s"] =
            (tokens as f64 * times.len() as f64 / times.iter().sum::<f64>()).into();
        out["train_step_s"] = times.into();
    }
    if only.as_deref() != Some("train") {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: new_tokens,
            stop: vec![],
        };
        let mut times = Vec::new();
        let mut produced = 0;
        for i in 0..steps.max(2) {
            let t = Instant::now();
            let gens = policy.generate(&prompts, &params)?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
                produced = gens.iter().map(|g| g.tokens.len()).sum::<usize>();
            }
        }
        out["sample_tokens_per_s"] =
            (produced as f64 * times.len() as f64 / times.iter().sum::<f64>()).into();
        out["sample_s"] = times.into();
    }
    println!("{out}");
    Ok(())
}
