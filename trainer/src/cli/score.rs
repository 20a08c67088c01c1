//! `trainer score`: the log-prob of each token after the first, given its prefix. Useful to
//! check a model conversion against another implementation.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device};

use crate::policy;

/// Arguments of `trainer score`.
#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// Hugging Face model directory (config.json and *.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated token ids (at least two).
    #[arg(long, value_delimiter = ',', num_args = 1.., required = true)]
    pub token_ids: Vec<u32>,
    /// Print `{"logprobs": [...]}` instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Compute in f64 instead of f32.
    #[arg(long)]
    pub f64: bool,
}

pub fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    if args.token_ids.len() < 2 {
        anyhow::bail!("--token-ids needs at least two tokens (the first one is only a prefix)");
    }
    let dtype = if args.f64 { DType::F64 } else { DType::F32 };
    let model = policy::load_model(&args.model, dtype, &Device::Cpu)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    let scores = model.score_sequences(std::slice::from_ref(&args.token_ids))?;
    let logprobs = &scores[0].logprobs;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &serde_json::json!({ "logprobs": logprobs }))?;
        writeln!(out)?;
    } else {
        writeln!(out, "{:>6} {:>10} {:>12}", "index", "token", "logprob")?;
        for (i, lp) in logprobs.iter().enumerate() {
            writeln!(
                out,
                "{:>6} {:>10} {:>12.6}",
                i + 1,
                args.token_ids[i + 1],
                lp
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
