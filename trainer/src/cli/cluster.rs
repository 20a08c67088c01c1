//! `trainer cluster`: the loop inside the trainer pod, against the operator's broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use selfplay_broker::BrokerClient;

use crate::train::cluster::{ClusterOptions, run_cluster};

/// Arguments of `trainer cluster` (the operator sets them; the broker address and
/// credentials come from `SELFPLAY_BROKER_ADDR`, `SELFPLAY_BROKER_TOKEN`,
/// `SELFPLAY_RUN_NAME` and `SELFPLAY_RUN_NAMESPACE`).
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// The SelfPlayRun (as the operator mounts it).
    #[arg(long)]
    pub run_file: PathBuf,
    /// Where checkpoints of this run go (`step-N` folders).
    #[arg(long)]
    pub checkpoint_dir: PathBuf,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// The model directory (overrides `spec.model.path`).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Continue from this checkpoint directory.
    #[arg(long)]
    pub resume_from: Option<PathBuf>,
}

pub fn run(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let broker = BrokerClient::from_env()?;
        let steps = run_cluster(
            ClusterOptions {
                run_file: args.run_file,
                checkpoint_dir: args.checkpoint_dir,
                metrics_listen: args.metrics_listen,
                model_dir: args.model_dir,
                resume_from: args.resume_from,
            },
            broker,
        )
        .await?;
        tracing::info!(steps, "done");
        Ok(ExitCode::SUCCESS)
    })
}
