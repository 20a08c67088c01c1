//! `trainer bench`: measurements a user can rerun (`bench memory`; `bench rollout` is added
//! by the rollout work).

pub mod memory;
pub mod peak_alloc;

use std::process::ExitCode;

use clap::Subcommand;

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Peak memory and time of one GRPO training step per sequence length.
    Memory(memory::MemoryArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Memory(a) => memory::run(a),
    }
}
