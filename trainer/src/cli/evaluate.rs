//! `trainer evaluate`: grades a solver patch against a bug's artifacts, in a local sandbox.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use super::validate::{IsolationArg, local_sandbox, runtime};
use crate::engine::artifacts::Artifacts;
use crate::engine::sandbox::SandboxProvider as _;
use crate::engine::solver::{BugTask, evaluate_patch, prepare_grading_workspace, stable_passing};

/// Arguments of `trainer evaluate`.
#[derive(clap::Args, Debug)]
pub struct EvaluateArgs {
    /// The repository (its original code).
    #[arg(long)]
    pub repo: PathBuf,
    /// The bug's artifacts (the five injector files).
    #[arg(long)]
    pub artifacts: PathBuf,
    /// The solver's patch, against the solver's workspace (both diffs applied).
    #[arg(long)]
    pub patch: PathBuf,
    /// Timeout of one run of the test script, in seconds.
    #[arg(long, default_value_t = 300)]
    pub test_timeout_secs: u64,
    #[arg(long, value_enum, default_value_t = IsolationArg::Auto)]
    pub isolation: IsolationArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvaluateArgs) -> anyhow::Result<ExitCode> {
    let a = Artifacts::from_dir(&args.artifacts)
        .with_context(|| format!("reading the artifacts in {}", args.artifacts.display()))?;
    let patch = std::fs::read_to_string(&args.patch)
        .with_context(|| format!("reading the patch {}", args.patch.display()))?;
    let missing: Vec<&str> = [
        ("bug_inject.diff", a.bug_inject_diff.is_none()),
        ("test_weaken.diff", a.test_weaken_diff.is_none()),
        ("test_files.txt", a.test_files.is_none()),
        ("test_script.sh", a.test_script.is_none()),
        ("test_parser.py", a.test_parser.is_none()),
    ]
    .into_iter()
    .filter_map(|(n, m)| m.then_some(n))
    .collect();
    if !missing.is_empty() {
        anyhow::bail!("the artifacts lack {}", missing.join(", "));
    }
    let timeout = Duration::from_secs(args.test_timeout_secs.max(1));
    let started = Instant::now();
    let rt = runtime()?;
    let (eval, original_passing, note) = rt.block_on(async {
        let (provider, sandbox) = local_sandbox(&args.repo, args.isolation).await?;
        let result = async {
            let script = a.test_script.clone().unwrap_or_default();
            let parser = a.test_parser.clone().unwrap_or_default();
            // The grading set: tests that pass on the original code in two runs.
            let (passing, note) =
                match stable_passing(sandbox.client(), &script, &parser, timeout).await? {
                    Ok(p) => (p, None),
                    Err(why) => (Default::default(), Some(format!("no grading set: {why}"))),
                };
            let task = BugTask {
                bug_inject_diff: a.bug_inject_diff.clone().unwrap_or_default(),
                test_weaken_diff: a.test_weaken_diff.clone().unwrap_or_default(),
                test_files: a.test_file_list(),
                test_script: script,
                test_parser: parser,
                original_passing: passing.clone(),
                order: 1,
                failed_patches: Vec::new(),
            };
            // Graded as in training: in a fresh sandbox, the bug applied, the patch without
            // its changes to the protected test surface.
            let grader = provider
                .acquire("default")
                .await
                .context("starting the grading sandbox")?;
            let eval = async {
                prepare_grading_workspace(grader.client(), &task).await?;
                evaluate_patch(grader.client(), &task, &patch, timeout).await
            }
            .await;
            let released = grader.release().await;
            let eval = eval?;
            released?;
            anyhow::Ok((eval, passing, note))
        }
        .await;
        let released = sandbox.release().await;
        let r = result.context("evaluation stopped on an infrastructure error")?;
        released.context("tearing the sandbox down")?;
        anyhow::Ok(r)
    })?;
    let detail = match (note, &eval.detail) {
        (Some(n), _) => Some(n),
        (None, d) => d.clone(),
    };
    if args.json {
        let out = json!({
            "solved": eval.solved,
            "reward": if eval.solved { 1 } else { -1 },
            "failing": eval.failing,
            "patch_applied": eval.patch_applied,
            "detail": detail,
            "original_passing": original_passing.len(),
            "statuses": eval.statuses,
            "dropped": eval.dropped,
            "duration_ms": started.elapsed().as_millis() as u64,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", if eval.solved { "solved" } else { "not solved" });
        for f in &eval.failing {
            println!("failing: {f}");
        }
        if let Some(d) = detail {
            println!("{d}");
        }
        for f in &eval.dropped {
            println!("dropped (protected test surface): {f}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
