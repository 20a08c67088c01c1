//! `trainer evaluate`.

/// Arguments of `trainer evaluate`.
#[derive(clap::Args, Debug)]
pub struct EvaluateArgs {}

pub fn run(_args: EvaluateArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("trainer evaluate is not implemented yet")
}
