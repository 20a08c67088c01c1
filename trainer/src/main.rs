//! `trainer`: the selfplay trainer binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use selfplay_trainer::cli;
use selfplay_trainer::engine::local::{TRAINER_SIDECAR_ARG, serve_sidecar_from_this_executable};

/// Counts heap bytes for `trainer bench memory`.
#[global_allocator]
static ALLOC: cli::bench::peak_alloc::CountingAlloc = cli::bench::peak_alloc::CountingAlloc;

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
    /// Evaluate a model as a solver on a task set (SWE-bench's instance format): solve rate
    /// and pass@k, graded as training grades.
    Eval(cli::eval::EvalArgs),
    /// Write a run's valid bugs as a task set (SWE-bench's instance format).
    Export(cli::export::ExportArgs),
    /// Print the log-prob of each token given its prefix.
    Score(cli::score::ScoreArgs),
    /// Fine-tune a model on trajectories (chat JSONL or a run's solved episodes), loss on the
    /// policy's tokens only; writes a model directory the other commands load.
    Sft(cli::sft::SftArgs),
    /// Open a sandbox of a pool exactly as an episode would and run a command in it (without
    /// one, an interactive shell).
    Sandbox(cli::sandbox::SandboxArgs),
    /// Benchmarks that print tables (or JSON lines).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the sandbox sidecar (the same command line as `sandbox-sidecar`): the trainer
    /// serves its local sandboxes itself, so no second binary is needed.
    #[command(disable_help_flag = true)]
    Sidecar {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Aggregate sampling throughput of N concurrent multi-turn episodes, and the prefill
    /// tokens per episode with and without sessions.
    Rollout(cli::bench_rollout::RolloutArgs),
    /// Peak memory and time of one GRPO training step per sequence length.
    Memory(cli::bench::memory::MemoryArgs),
    /// The device (CUDA) against the CPU on the committed fixtures: log-probs, entropies and
    /// gradients in f32 and bf16.
    Parity(cli::bench::parity::ParityArgs),
}

fn main() -> ExitCode {
    // `trainer sidecar …` is the sidecar's own command line, with nothing of the trainer's
    // start-up (allocator tuning, logging) before it.
    let mut args = std::env::args_os();
    // Under the sidecar's name (a static trainer bind-mounted into a Docker sandbox as
    // `/selfplay/bin/sandbox-sidecar`), the trainer is the sidecar.
    let argv0 = args.next();
    if argv0
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "sandbox-sidecar")
    {
        return sandbox_sidecar::cli::main_with_args(argv0.into_iter().chain(args));
    }
    if args.next().as_deref() == Some(std::ffi::OsStr::new(TRAINER_SIDECAR_ARG)) {
        return sandbox_sidecar::cli::main_with_args(
            std::iter::once(std::ffi::OsString::from("sandbox-sidecar")).chain(args),
        );
    }
    serve_sidecar_from_this_executable();
    selfplay_trainer::policy::tune_allocator();
    selfplay_trainer::policy::pin_cpu_threads();
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
        Command::Eval(a) => cli::eval::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Score(a) => cli::score::run(a),
        Command::Sft(a) => cli::sft::run(a),
        Command::Sandbox(a) => cli::sandbox::run(a),
        Command::Bench(BenchCommand::Rollout(a)) => cli::bench_rollout::run(a),
        Command::Bench(BenchCommand::Memory(a)) => cli::bench::memory::run(a),
        Command::Bench(BenchCommand::Parity(a)) => cli::bench::parity::run(a),
        // Handled before parsing, above.
        Command::Sidecar { .. } => Ok(ExitCode::FAILURE),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trainer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
