//! `trainer local`.

/// Arguments of `trainer local`.
#[derive(clap::Args, Debug)]
pub struct LocalArgs {}

pub fn run(_args: LocalArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("trainer local is not implemented yet")
}
