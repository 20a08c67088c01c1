//! `trainer eval`: held-out evaluation of a model as a solver on a task set in SWE-bench's
//! instance format (see `crate::eval`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};

use super::validate::runtime;
use crate::engine::local::Isolation;
use crate::engine::policy::Policy as _;
use crate::eval::{
    AttemptReport, EvalOptions, EvalPool, EvalProgress, EvalReport, EvalTask, Outcome,
    SeededAttempts, TaskReport, TestHarness, evaluate, load_instances, tasks_in_pool,
};
use crate::policy::CandlePolicy;
use crate::train::config::{self, LocalRun};
use crate::train::device::device;
use crate::train::local::{engine_settings, local_provider, model_dtype};

/// Arguments of `trainer eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The model: a Hugging Face directory or a checkpoint (`out/RUN/checkpoints/step-N`).
    /// Default: the run's model (the built-in default's tiny seeded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The task set: a JSON array or JSON Lines of SWE-bench-style instances.
    #[arg(long)]
    pub tasks: PathBuf,
    /// The k of pass@k.
    #[arg(long, default_value_t = 1)]
    pub k: usize,
    /// Attempts per instance (default: k).
    #[arg(long)]
    pub attempts: Option<usize>,
    /// Seed of the attempts' sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object (solve_rate, pass_at_k, tasks) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The repository the instances are based on: a directory or a git bundle (sandboxes
    /// as `trainer local` makes them). Default: the run's first pool.
    #[arg(long, conflicts_with = "image")]
    pub repo: Option<PathBuf>,
    /// A Docker image holding the repository (SWE-bench's layout by default: /testbed).
    /// Without --repo or --image, instances with an `image_name` run in that image.
    #[arg(long)]
    pub image: Option<String>,
    /// Where the repository lives in --image.
    #[arg(long, default_value = selfplay_crds::environments::SWE_BENCH_WORKDIR)]
    pub workdir: String,
    /// Shell activation of --image's environment (default: SWE-bench's conda activation).
    #[arg(long)]
    pub shell_init: Option<String>,
    /// The test script for instances without `selfplay.test_script` (bash, run in the
    /// repository's root).
    #[arg(long)]
    pub test_script: Option<PathBuf>,
    /// The test-output parser for instances without `selfplay.test_parser` (Python: reads
    /// the script's output on stdin, prints {test: status} as JSON).
    #[arg(long)]
    pub test_parser: Option<PathBuf>,
    /// A SelfPlayRun YAML whose episode budgets, sampling settings, timeouts and pools are
    /// used (default: the built-in run, as `trainer local`).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Attempts in flight at once (the samples do not depend on it: each attempt has its
    /// own seeded generator).
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// Run sandboxes without bubblewrap even where it is available.
    #[arg(long)]
    pub no_isolation: bool,
}

/// One line per attempt and per instance on stderr.
struct StderrProgress;

impl EvalProgress for StderrProgress {
    fn attempt_done(&self, task: &EvalTask, a: &AttemptReport) {
        let mut line = format!(
            "  {} attempt {}: {} ({}, {} turn(s), {:.1}s)",
            task.id,
            a.attempt + 1,
            outcome_word(a.outcome),
            a.end_reason,
            a.turns,
            a.seconds
        );
        if let Some(d) = &a.detail {
            line.push_str(&format!(": {}", first_line(d, 160)));
        }
        eprintln!("{line}");
    }

    fn task_done(&self, t: &TaskReport, done: usize, total: usize) {
        eprintln!(
            "[{done}/{total}] {}: {}/{} solved",
            t.id, t.solved, t.attempts
        );
    }
}

fn outcome_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Solved => "solved",
        Outcome::Unsolved => "not solved",
        Outcome::AgentFailure => "not solved (the agent broke its sandbox)",
        Outcome::InfraError => "not graded (sandbox errors)",
    }
}

fn first_line(s: &str, max: usize) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.len() <= max {
        return l.to_string();
    }
    let mut cut = max;
    while !l.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &l[..cut])
}

fn read_text(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

/// Points the run's first pool at where this evaluation's repository comes from; `true` when
/// each instance runs in an environment of its own (its `image_name`).
fn place(
    run: &mut LocalRun,
    args: &EvalArgs,
    tasks_text: &str,
    has_image: bool,
) -> anyhow::Result<bool> {
    let pool = run.pools.first_mut().context("the run names no pool")?;
    pool.environments.clear();
    if let Some(repo) = &args.repo {
        let abs =
            std::path::absolute(repo).with_context(|| format!("resolving {}", repo.display()))?;
        if !abs.exists() {
            bail!("--repo {}: no such directory or bundle", repo.display());
        }
        pool.repo_dir = Some(abs);
        return Ok(false);
    }
    if let Some(image) = &args.image {
        pool.repo_dir = None;
        pool.spec.template.image = image.clone();
        pool.spec.template.workdir = args.workdir.clone();
        pool.spec.template.shell_init = Some(
            args.shell_init
                .clone()
                .unwrap_or_else(|| selfplay_crds::environments::SWE_BENCH_SHELL_INIT.into()),
        );
        return Ok(false);
    }
    if has_image {
        // SWE-bench's mapping of instances to images, as a pool's `environmentsFrom` reads it.
        let envs = selfplay_crds::environments::parse_instances(
            tasks_text,
            &selfplay_crds::EnvironmentsSource::default(),
        )
        .context("mapping the instances to images")?;
        pool.repo_dir = None;
        pool.environments = envs;
        return Ok(true);
    }
    if pool.repo_dir.is_none() {
        bail!("the instances name no image_name: give --repo PATH or --image IMAGE");
    }
    Ok(false)
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    if args.k == 0 {
        bail!("--k must be at least 1");
    }
    let attempts = args.attempts.unwrap_or(args.k);
    if attempts < args.k {
        bail!(
            "--attempts {attempts} is fewer than --k {}: pass@k needs k attempts",
            args.k
        );
    }
    let tasks_text = read_text(&args.tasks)?;
    let instances = load_instances(&args.tasks)?;
    let harness = TestHarness {
        test_script: args.test_script.as_deref().map(read_text).transpose()?,
        test_parser: args.test_parser.as_deref().map(read_text).transpose()?,
    };
    let mut run = config::load(args.run.as_deref())?;
    let has_image = instances.iter().any(|i| i.image_name.is_some());
    let environments = place(&mut run, &args, &tasks_text, has_image)?;
    let first = run.pools.first().context("the run names no pool")?;
    let pool = if environments {
        EvalPool::Environments { name: &first.name }
    } else {
        EvalPool::Repository {
            name: &first.name,
            // Images are at their instance's commit already (SWE-bench's layout), and may
            // have no history to check it out from.
            history: first.repo_dir.is_some(),
        }
    };
    let tasks = tasks_in_pool(&instances, &harness, pool)?;

    // The run's `trainer.gpus`: a CUDA request fails here rather than evaluating on the CPU.
    let device = device(run.run.spec.trainer.gpus)?;
    let policy = match &args.model {
        Some(dir) => CandlePolicy::load(
            dir,
            None,
            model_dtype(&run.run.spec.model, &device),
            &device,
            args.seed,
        )
        .with_context(|| format!("loading the model in {}", dir.display()))?,
        None => CandlePolicy::from_source(&run.run.spec.model, &device, args.seed)
            .context("building the run's model")?,
    };
    policy.sample_in_spec_precision(run.run.spec.model.dtype);
    // The markup training used for this model (a byte-level model loaded from a directory,
    // e.g. `trainer sft`'s output, was trained in ChatML).
    let chat = policy.chat_markup();
    let engine = engine_settings(&run, chat)?;
    let policy = Arc::new(policy);
    let work = tempfile::Builder::new()
        .prefix("selfplay-eval-")
        .tempdir()
        .context("creating a work directory")?;
    let isolation = if args.no_isolation {
        Isolation::Off
    } else {
        Isolation::Auto
    };
    let opts = EvalOptions {
        attempts,
        k: args.k,
        seed: args.seed,
        concurrency: args.concurrency.max(1),
        engine,
    };
    eprintln!(
        "eval: {} instance(s) × {attempts} attempt(s), seed {}, model {} (policy v{})",
        tasks.len(),
        args.seed,
        args.model
            .as_deref()
            .map_or_else(|| model_description(&run), |p| p.display().to_string()),
        policy.version()
    );
    let rt = runtime()?;
    let report = rt.block_on(async {
        let provider = local_provider(&run, work.path(), isolation)
            .context("setting up the sandbox provider")?;
        eprintln!("sandboxes: {}", provider.describe());
        let r = evaluate(
            &SeededAttempts(policy.clone()),
            &provider,
            &tasks,
            &opts,
            &StderrProgress,
        )
        .await?;
        anyhow::Ok(r)
    })?;
    print_report(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

fn model_description(run: &LocalRun) -> String {
    let m = &run.run.spec.model;
    match (&m.path, &m.tiny) {
        (Some(p), _) => p.clone(),
        (None, Some(t)) => format!("the run's tiny model (seed {})", t.seed),
        (None, None) => "the run's model".to_string(),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{:.1}%", x * 100.0))
}

fn print_report(r: &EvalReport, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(r)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<40} {:>8} {:>8} {:>9}",
        "instance",
        "solved",
        "graded",
        format!("pass@{}", r.k)
    )?;
    for t in &r.tasks {
        writeln!(
            out,
            "{:<40} {:>8} {:>8} {:>9}",
            t.id,
            t.solved,
            t.attempts,
            pct(t.pass_at_k)
        )?;
    }
    writeln!(
        out,
        "solve rate {} ({}/{} attempts) | pass@{} {} | instances solved {}/{} | not graded {} | {:.1}s",
        pct(r.solve_rate),
        r.solved,
        r.attempts,
        r.k,
        pct(r.pass_at_k),
        r.tasks_solved,
        r.tasks.len(),
        r.infra_errors,
        r.seconds
    )?;
    Ok(())
}
