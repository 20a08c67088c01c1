//! `trainer score`.

/// Arguments of `trainer score`.
#[derive(clap::Args, Debug)]
pub struct ScoreArgs {}

pub fn run(_args: ScoreArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("trainer score is not implemented yet")
}
