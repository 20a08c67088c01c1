//! `trainer validate`.

/// Arguments of `trainer validate`.
#[derive(clap::Args, Debug)]
pub struct ValidateArgs {}

pub fn run(_args: ValidateArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("trainer validate is not implemented yet")
}
