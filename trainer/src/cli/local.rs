//! `trainer local`: self-play training on this machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::engine::local::Isolation;
use crate::train::local::{LocalOptions, run_local};

/// Arguments of `trainer local`.
#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// A SelfPlayRun YAML (with the SandboxPools it names, each with `spec.source.localPath`).
    /// Without it, the built-in default runs: the bundled sample repository and a tiny model.
    pub run: Option<PathBuf>,
    /// Stop once this many steps are complete (default: the spec's `training.totalSteps`).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Output directory: status.json, checkpoints/, episodes/ (default: out/<run name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the latest complete checkpoint in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Serve Prometheus metrics on this address while training.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve no metrics.
    #[arg(long, conflicts_with = "metrics_listen")]
    pub no_metrics: bool,
    /// Run sandboxes without bubblewrap even where it is available.
    #[arg(long)]
    pub no_isolation: bool,
}

pub fn run(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let opts = LocalOptions {
        spec: args.run,
        steps: args.steps,
        out: args.out,
        resume: args.resume,
        metrics_listen: if args.no_metrics {
            None
        } else {
            args.metrics_listen
        },
        isolation: if args.no_isolation {
            Isolation::Off
        } else {
            Isolation::Auto
        },
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(run_local(opts, None))?;
    eprintln!(
        "done: {} step(s); status in {}",
        outcome.steps_done,
        outcome.out.join("status.json").display()
    );
    Ok(if outcome.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}
