//! `trainer sandbox`: a sandbox of a pool exactly as an episode gets it (same provider,
//! isolation, limits, environment and workspace preparation), and a command run in it as
//! the agent's own bash session runs it. It is how to debug an environment, and how to see
//! what an agent sees.

use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::validate::runtime;
use crate::engine::artifacts::Artifacts;
use crate::engine::episode::AGENT_SESSION;
use crate::engine::local::Isolation;
use crate::engine::ops::Ops;
use crate::engine::sandbox::{Sandbox, SandboxProvider as _};
use crate::engine::solver::{BugTask, prepare_solver_workspace};
use crate::train::config;
use crate::train::local::local_provider;

/// Arguments of `trainer sandbox`.
#[derive(clap::Args, Debug)]
pub struct SandboxArgs {
    /// A SelfPlayRun YAML with its SandboxPools (default: the built-in run).
    pub run: Option<PathBuf>,
    /// The pool (default: the run's first), or `POOL/ENVIRONMENT` for one of a pool's
    /// environments (default: its first).
    #[arg(long)]
    pub pool: Option<String>,
    /// Prepare the workspace as a solver's for the bug in --artifacts (bug and weakening
    /// applied, fresh history, no build leftovers) instead of an injector's.
    #[arg(long, requires = "artifacts")]
    pub solver: bool,
    /// The bug's artifacts (the five injector files), for --solver.
    #[arg(long)]
    pub artifacts: Option<PathBuf>,
    /// Timeout of each command, in seconds (default: the pool's commandTimeoutSeconds).
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Run sandboxes without bubblewrap even where it is available.
    #[arg(long)]
    pub no_isolation: bool,
    /// The command, run by bash in the agent's session; without one, commands are read from
    /// standard input, one per line, as the agent would send them.
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub fn run(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let run = config::load(args.run.as_deref())?;
    let (pool_name, env) = match &args.pool {
        Some(p) => {
            let (p, e) = selfplay_crds::environments::split_key(p);
            (Some(p), e)
        }
        None => (None, None),
    };
    let pool = match pool_name {
        Some(p) => run
            .pools
            .iter()
            .find(|lp| lp.name == p)
            .with_context(|| format!("the run has no pool named {p:?}"))?,
        None => run.pools.first().context("the run names no pool")?,
    };
    // The key the provider serves: the pool, or one of its environments.
    let key = match (env, pool.environments.first()) {
        (Some(e), _) => {
            if !pool.environments.iter().any(|x| x.name == e) {
                anyhow::bail!("pool {} has no environment named {e:?}", pool.name);
            }
            selfplay_crds::environments::environment_key(&pool.name, e)
        }
        (None, Some(first)) => {
            selfplay_crds::environments::environment_key(&pool.name, &first.name)
        }
        (None, None) => pool.name.clone(),
    };
    let timeout = Duration::from_secs(
        args.timeout_secs
            .unwrap_or(pool.spec.command_timeout_seconds.max(1) as u64),
    );
    let task = match (&args.artifacts, args.solver) {
        (Some(dir), true) => {
            let a = Artifacts::from_dir(dir)
                .with_context(|| format!("reading the artifacts in {}", dir.display()))?;
            Some(BugTask {
                bug_inject_diff: a.bug_inject_diff.clone().context("no bug_inject.diff")?,
                test_weaken_diff: a.test_weaken_diff.clone().context("no test_weaken.diff")?,
                test_files: a.test_file_list(),
                test_script: a.test_script.clone().unwrap_or_default(),
                test_parser: a.test_parser.clone().unwrap_or_default(),
                original_passing: Default::default(),
                order: 1,
                failed_patches: Vec::new(),
            })
        }
        _ => None,
    };
    let scratch = tempfile::Builder::new()
        .prefix("selfplay-sandbox-cli-")
        .tempdir()
        .context("creating a scratch directory")?;
    let isolation = if args.no_isolation {
        Isolation::Off
    } else {
        Isolation::Auto
    };
    let rt = runtime()?;
    rt.block_on(async {
        let provider = local_provider(&run, scratch.path(), isolation)?;
        eprintln!(
            "sandbox of pool {} ({}; {})",
            key,
            provider.describe(),
            if task.is_some() { "solver" } else { "injector" },
        );
        let sandbox = provider
            .acquire(&key)
            .await
            .context("starting the sandbox")?;
        let result = drive(&sandbox, task.as_ref(), &args.command, timeout).await;
        let released = sandbox.release().await;
        let code = result?;
        released.context("tearing the sandbox down")?;
        anyhow::Ok(code)
    })
}

async fn drive(
    sandbox: &Sandbox,
    task: Option<&BugTask>,
    command: &[String],
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let ops = Ops::new(sandbox.client());
    if let Some(task) = task {
        prepare_solver_workspace(sandbox.client(), task)
            .await
            .context("preparing the solver's workspace")?;
    }
    ops.session_open(AGENT_SESSION).await?;
    if !command.is_empty() {
        let r = ops
            .session_run(AGENT_SESSION, &command.join(" "), timeout)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::io::stdout().write_all(&r.stdout)?;
        std::io::stderr().write_all(&r.stderr)?;
        if r.timed_out {
            bail!("the command timed out after {}s", timeout.as_secs());
        }
        return Ok(ExitCode::from(u8::try_from(r.exit_code).unwrap_or(1)));
    }
    eprintln!("one command per line; end with Ctrl-D");
    let stdin = std::io::stdin();
    let mut last = 0;
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let r = ops
            .session_run(AGENT_SESSION, &line, timeout)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::io::stdout().write_all(&r.stdout)?;
        std::io::stdout().write_all(&r.stderr)?;
        println!(
            "[exit {}{}]",
            r.exit_code,
            if r.timed_out { ", timed out" } else { "" }
        );
        last = r.exit_code;
    }
    Ok(ExitCode::from(u8::try_from(last).unwrap_or(1)))
}
