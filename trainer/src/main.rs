//! `trainer`: the selfplay trainer binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use selfplay_trainer::cli;

#[derive(Parser, Debug)]
#[command(
    name = "trainer",
    version,
    about = "selfplay trainer: self-play SWE-RL with GRPO"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run self-play training on this machine (no Kubernetes).
    Local(cli::local::LocalArgs),
    /// Run the training loop inside the trainer pod, against the operator's broker.
    Cluster(cli::cluster::ClusterArgs),
    /// Run the consistency checks on a set of injector artifacts.
    Validate(cli::validate::ValidateArgs),
    /// Grade a solver patch against a bug's artifacts.
    Evaluate(cli::evaluate::EvaluateArgs),
    /// Print the log-prob of each token given its prefix.
    Score(cli::score::ScoreArgs),
}

fn main() -> ExitCode {
    selfplay_trainer::policy::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Local(a) => cli::local::run(a),
        Command::Cluster(a) => cli::cluster::run(a),
        Command::Validate(a) => cli::validate::run(a),
        Command::Evaluate(a) => cli::evaluate::run(a),
        Command::Score(a) => cli::score::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trainer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
