//! The command line as a library entry point, and `install`.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

mod common;

#[test]
fn install_copies_the_running_binary_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("new/bin");
    let out = Command::new(common::bin())
        .args(["install", "--to"])
        .arg(&to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = to.join("sandbox-sidecar");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        installed.display().to_string()
    );
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(common::bin()).unwrap()
    );
    let mode = std::fs::metadata(&installed).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    assert_eq!(
        std::fs::read_dir(&to).unwrap().count(),
        1,
        "no temporary left"
    );
    // The copy runs.
    let v = Command::new(&installed).arg("--version").output().unwrap();
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("sandbox-sidecar "));
}

#[test]
fn install_into_an_unwritable_place_fails_with_status_1() {
    let out = Command::new(common::bin())
        .args(["install", "--to", "/proc/no-such-dir"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/proc/no-such-dir"));
}

#[test]
fn main_with_args_answers_usage_errors_like_clap() {
    let code = sandbox_sidecar::cli::main_with_args(["trainer-sidecar", "no-such-command"]);
    assert_eq!(code, std::process::ExitCode::from(2));
    let code = sandbox_sidecar::cli::main_with_args(["trainer-sidecar", "--version"]);
    assert_eq!(code, std::process::ExitCode::SUCCESS);
}
