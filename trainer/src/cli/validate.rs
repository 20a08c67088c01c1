//! `trainer validate`: the consistency checks on a set of injector artifacts, in a local
//! sandbox of the repository.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use crate::engine::artifacts::Artifacts;
use crate::engine::local::{Isolation, LocalProvider, LocalProviderConfig};
use crate::engine::sandbox::{Sandbox, SandboxProvider as _};
use crate::engine::validation::{ValidationConfig, validate};

/// How the local sandbox is isolated.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum IsolationArg {
    /// bubblewrap when it works here, else none.
    #[default]
    Auto,
    Bwrap,
    Off,
}

impl From<IsolationArg> for Isolation {
    fn from(a: IsolationArg) -> Self {
        match a {
            IsolationArg::Auto => Isolation::Auto,
            IsolationArg::Bwrap => Isolation::Bubblewrap,
            IsolationArg::Off => Isolation::Off,
        }
    }
}

/// Arguments of `trainer validate`.
#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// The repository (its original code).
    #[arg(long)]
    pub repo: PathBuf,
    /// Directory holding bug_inject.diff, test_weaken.diff, test_files.txt, test_script.sh
    /// and test_parser.py.
    #[arg(long)]
    pub artifacts: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub min_passing_tests: usize,
    #[arg(long, default_value_t = 1)]
    pub min_failing_tests: usize,
    #[arg(long, default_value_t = 1)]
    pub min_changed_files: usize,
    /// Inverse mutation reverts at most this many bug files.
    #[arg(long, default_value_t = 8)]
    pub max_inverse_mutation_files: usize,
    /// Timeout of one run of the test script, in seconds.
    #[arg(long, default_value_t = 300)]
    pub test_timeout_secs: u64,
    #[arg(long, value_enum, default_value_t = IsolationArg::Auto)]
    pub isolation: IsolationArg,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A tokio runtime, a local provider on `repo`, and one sandbox from it.
pub(crate) async fn local_sandbox(
    repo: &std::path::Path,
    isolation: IsolationArg,
) -> anyhow::Result<(LocalProvider, Sandbox)> {
    let mut cfg = LocalProviderConfig::single(repo);
    cfg.isolation = isolation.into();
    let provider = LocalProvider::new(cfg).context("setting up the local sandbox provider")?;
    let sandbox = provider
        .acquire("default")
        .await
        .context("starting a sandbox")?;
    Ok((provider, sandbox))
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let artifacts = Artifacts::from_dir(&args.artifacts)
        .with_context(|| format!("reading the artifacts in {}", args.artifacts.display()))?;
    let cfg = ValidationConfig {
        min_passing_tests: args.min_passing_tests,
        min_failing_tests: args.min_failing_tests,
        min_changed_files: args.min_changed_files,
        max_inverse_mutation_files: args.max_inverse_mutation_files,
        test_timeout: Duration::from_secs(args.test_timeout_secs.max(1)),
    };
    let started = Instant::now();
    let rt = runtime()?;
    let (report, isolated) = rt.block_on(async {
        let (provider, sandbox) = local_sandbox(&args.repo, args.isolation).await?;
        let report = validate(sandbox.client(), &artifacts, &cfg).await;
        let released = sandbox.release().await;
        let report = report.context("validation stopped on an infrastructure error")?;
        released.context("tearing the sandbox down")?;
        anyhow::Ok((report, provider.isolated()))
    })?;
    if args.json {
        let out = json!({
            "valid": report.valid,
            "failed_check": report.failed_check_name(),
            "checks": report.checks,
            "original_passing": report.original_passing,
            "flaky": report.flaky,
            "bug_failing": report.bug_failing,
            "hidden": report.hidden,
            "bug_files": report.bug_files,
            "isolated": isolated,
            "duration_ms": started.elapsed().as_millis() as u64,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for c in &report.checks {
            println!(
                "{} {:<18} {}",
                if c.passed { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        match report.failed_check_name() {
            None => println!("valid"),
            Some(name) => println!("invalid: {name}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
