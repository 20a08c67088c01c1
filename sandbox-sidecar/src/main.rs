//! `sandbox-sidecar`: see [`sandbox_sidecar::cli`].

fn main() -> std::process::ExitCode {
    sandbox_sidecar::cli::main_with_args(std::env::args_os())
}
