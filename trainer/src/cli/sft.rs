//! `trainer sft`: supervised fine-tuning on trajectories (warm start, or rejection-sampling
//! fine-tuning on a run's own solved episodes).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::DType;

use crate::engine::prompts::ChatMarkup;
use crate::policy::CandlePolicy;
use crate::sft::{LoadOptions, SftOptions, SftTrainer, load_dataset, mean_nll};
use crate::train::device::device;
use crate::train::report::list_step_dirs;
use crate::train::tensorboard::EventWriter;

/// Examples scored before and after fine-tuning.
const PROBE_EXAMPLES: usize = 256;

/// Arguments of `trainer sft`.
#[derive(clap::Args, Debug)]
pub struct SftArgs {
    /// Model directory (config.json, *.safetensors, tokenizer.json), e.g. a checkpoint.
    #[arg(long, required_unless_present = "tiny", conflicts_with = "tiny")]
    pub model: Option<PathBuf>,
    /// Start from the tiny byte-level model of `trainer local`'s `model.tiny` instead:
    /// SEED,HIDDEN_SIZE,LAYERS (e.g. 0,64,2, the built-in default's).
    #[arg(long, value_name = "SEED,HIDDEN,LAYERS")]
    pub tiny: Option<String>,
    /// JSONL of chat records ({"messages": [...]}) and/or episode records, or a directory
    /// searched for episodes.jsonl files (a `trainer local` output directory).
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory: model/ (the fine-tuned model), checkpoints/step-N/, sft_metrics.jsonl
    /// and TensorBoard event files.
    #[arg(long, default_value = "out/sft")]
    pub out: PathBuf,
    /// Passes over the data (ignored with --steps).
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Updates in all (default: from --epochs).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate (after warmup; cosine decay to zero at the last step).
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Warmup updates (default: 5% of the steps).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Sequences per update.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Sequences per forward/backward pass.
    #[arg(long, default_value_t = 1)]
    pub micro_batch_size: usize,
    /// Leave out sequences longer than this many tokens (default: the model's context; a
    /// sequence longer than the context is an error).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Global gradient-norm clip (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seeds the order of the examples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Of episode records, take only solver episodes that solved their bug (rejection
    /// sampling); `--solved-only=false` takes every episode record.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    pub solved_only: bool,
    /// Write a checkpoint every this many updates (0: only the final model).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Checkpoints kept (the oldest are removed; 0 keeps all).
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Continue from the latest checkpoint in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Compute in bfloat16 (f32 master weights and optimizer state).
    #[arg(long)]
    pub bf16: bool,
    /// GPUs to train on: 0 trains on the CPU; 1 needs a CUDA build and a usable GPU (no
    /// silent fallback to the CPU).
    #[arg(long, default_value_t = 0)]
    pub gpus: i32,
}

pub fn run(args: SftArgs) -> anyhow::Result<ExitCode> {
    let device = device(args.gpus)?;
    let dtype = if args.bf16 { DType::BF16 } else { DType::F32 };
    let final_dir = args.out.join("model");
    if final_dir.exists() {
        bail!(
            "{} exists: this output directory holds a finished fine-tuning; choose another --out",
            final_dir.display()
        );
    }
    let checkpoints = args.out.join("checkpoints");
    let latest = list_step_dirs(&checkpoints).into_iter().next_back();
    if latest.is_some() && !args.resume {
        bail!(
            "{} holds checkpoints: pass --resume to continue, or choose another --out",
            checkpoints.display()
        );
    }
    let policy = match (&args.model, &args.tiny) {
        (Some(dir), _) => CandlePolicy::load(dir, None, dtype, &device, args.seed)
            .with_context(|| format!("loading the model in {}", dir.display()))?,
        (None, Some(spec)) => {
            let (seed, hidden, layers) = parse_tiny(spec)?;
            CandlePolicy::tiny(seed, hidden, layers, dtype, &device)?
        }
        (None, None) => bail!("give --model DIR or --tiny SEED,HIDDEN,LAYERS"),
    };
    let cfg = policy.model().config();
    let (context, vocab_size) = (cfg.max_position_embeddings, cfg.vocab_size);
    let max_tokens = args.max_tokens.unwrap_or(context).min(context);
    // The engine marks up turns in ChatML for every model loaded from a directory
    // (`CandlePolicy::chat_markup`), and what this command writes is one.
    let markup = ChatMarkup::chatml();
    let data = load_dataset(
        &args.data,
        policy.codec_arc().as_ref(),
        &markup,
        &LoadOptions {
            solved_only: args.solved_only,
            max_tokens,
            context,
            vocab_size,
        },
    )?;
    eprintln!(
        "data: {} examples, {} policy tokens ({} chat records, {} episode records of which {} left out as not solved, {} sequences over {max_tokens} tokens left out) from {} file(s)",
        data.examples.len(),
        data.policy_tokens(),
        data.chat_records,
        data.episode_records,
        data.skipped_episodes,
        data.skipped_long,
        data.files.len()
    );
    let n = data.examples.len();
    let total_steps = match args.steps {
        Some(s) => s,
        None => {
            if !(args.epochs > 0.0 && args.epochs.is_finite()) {
                bail!("--epochs must be positive, got {}", args.epochs);
            }
            ((args.epochs * n as f64) / args.batch_size.max(1) as f64).ceil() as u64
        }
    }
    .max(1);
    let opts = SftOptions {
        learning_rate: args.lr,
        warmup_steps: args.warmup.unwrap_or(total_steps / 20),
        total_steps,
        batch_size: args.batch_size,
        micro_batch_size: args.micro_batch_size,
        max_grad_norm: args.max_grad_norm,
        weight_decay: args.weight_decay,
        seed: args.seed,
    };
    let mut trainer = match (&latest, args.resume) {
        (Some((step, dir)), true) => {
            eprintln!("resuming from {} (step {step})", dir.display());
            // The checkpoint holds the weights: free the starting model's.
            drop(policy);
            SftTrainer::resume(dir, opts, n, dtype, &device)?
        }
        _ => SftTrainer::new(Arc::new(policy), opts)?,
    };
    let start = trainer.step();
    // The before/after figure on a bounded probe: scoring a large data set twice would cost
    // two extra passes over it.
    let probe = &data.examples[..n.min(PROBE_EXAMPLES)];
    let probe_name = if probe.len() == n {
        "all examples".to_string()
    } else {
        format!("the first {} examples", probe.len())
    };
    let before = mean_nll(trainer.policy(), probe)?;
    eprintln!(
        "mean NLL of the policy tokens of {probe_name} before: {before:.4} (step {start} of {total_steps})"
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut curves = EventWriter::create(&args.out, start + 1)?;
    let metrics_path = args.out.join("sft_metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    let began = Instant::now();
    while trainer.step() < total_steps {
        let s = trainer.train_step(&data.examples)?;
        let line = serde_json::to_string(&s)?;
        writeln!(metrics, "{line}")?;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        curves.write_scalars(
            s.step,
            wall,
            &[
                ("sft/loss", s.loss),
                ("sft/grad_norm", s.grad_norm),
                ("sft/learning_rate", s.learning_rate),
                ("sft/entropy", s.entropy),
            ],
        )?;
        eprintln!(
            "step {}/{total_steps}: loss {:.4}  grad norm {:.3}  lr {:.2e}  {} tokens  {:.1}s",
            s.step,
            s.loss,
            s.grad_norm,
            s.learning_rate,
            s.tokens,
            began.elapsed().as_secs_f64()
        );
        if args.checkpoint_every > 0 && s.step % args.checkpoint_every == 0 && s.step < total_steps
        {
            let dir = checkpoint_dir(&checkpoints, s.step);
            trainer.save_checkpoint(&dir, n)?;
            eprintln!("checkpoint {}", dir.display());
            prune_checkpoints(&checkpoints, args.keep_last)?;
        }
    }
    let after = mean_nll(trainer.policy(), probe)?;
    trainer.save_checkpoint(&final_dir, n)?;
    eprintln!(
        "mean NLL of the policy tokens of {probe_name} after: {after:.4} (before: {before:.4})"
    );
    eprintln!("fine-tuned model: {}", final_dir.display());
    Ok(ExitCode::SUCCESS)
}

fn checkpoint_dir(checkpoints: &Path, step: u64) -> PathBuf {
    checkpoints.join(format!("step-{step}"))
}

/// `SEED,HIDDEN,LAYERS` of `--tiny`.
fn parse_tiny(spec: &str) -> anyhow::Result<(u64, usize, usize)> {
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let [seed, hidden, layers] = parts.as_slice() else {
        bail!("--tiny takes SEED,HIDDEN,LAYERS (e.g. 0,64,2), got `{spec}`");
    };
    let num = |s: &str, what: &str| {
        s.parse::<u64>()
            .with_context(|| format!("--tiny: {what} `{s}` is not a number"))
    };
    Ok((
        num(seed, "SEED")?,
        num(hidden, "HIDDEN")? as usize,
        num(layers, "LAYERS")? as usize,
    ))
}

/// Removes all but the newest `keep` checkpoints (`keep` 0: none removed).
fn prune_checkpoints(checkpoints: &Path, keep: usize) -> anyhow::Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let steps = list_step_dirs(checkpoints);
    for (_, dir) in &steps[..steps.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}
