//! Shared helpers: a real sidecar process on loopback over a temporary workspace.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sandbox_sidecar::{SidecarClient, SpawnOptions, SpawnedSidecar};

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub sidecar: SpawnedSidecar,
    pub client: SidecarClient,
}

impl Harness {
    pub fn ws(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.ws().join(rel)
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(p, content).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sandbox-sidecar"))
}

pub async fn start() -> Harness {
    start_with(|_| {}).await
}

pub async fn start_with(f: impl FnOnce(&mut SpawnOptions)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let mut opts = SpawnOptions::new(&ws);
    opts.binary = Some(bin());
    opts.extra_args = vec![
        "--state-dir".into(),
        dir.path().join("state").to_string_lossy().into_owned(),
    ];
    f(&mut opts);
    let sidecar = SpawnedSidecar::spawn(opts).await.unwrap();
    let client = sidecar.connect().await.unwrap();
    Harness {
        dir,
        sidecar,
        client,
    }
}

/// Runs git in `dir`, panicking on failure; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `root` (not following symlinks, without `.git`) with its content and
/// mode: symlinks as "-> target", directories as "<dir>".
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, (String, u32)> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".git" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(
                    rel,
                    (
                        format!("-> {}", std::fs::read_link(&p).unwrap().display()),
                        0,
                    ),
                );
            } else if m.is_dir() {
                out.insert(rel, ("<dir>".into(), mode));
                stack.push(p);
            } else {
                out.insert(
                    rel,
                    (
                        String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned(),
                        mode,
                    ),
                );
            }
        }
    }
    out
}

/// Processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            // Zombies have an empty cmdline, so anything listed here is alive.
            out.push(format!("{pid}: {cmd}"));
        }
    }
    out
}

/// A `serve` process started by a test itself (for flags `SpawnedSidecar` does not pass,
/// or a wrapper such as `unshare`), with its token and directories.
pub struct Served {
    pub child: tokio::process::Child,
    /// What it printed after `listening on `.
    pub addr: String,
    pub token: String,
    _stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
}

impl Served {
    pub async fn client(&self) -> SidecarClient {
        SidecarClient::connect(self.addr.clone(), &self.token)
            .await
            .unwrap()
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn exit_within(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(s) => s.unwrap(),
            Err(_) => panic!("still running after {limit:?}"),
        }
    }
}

/// Writes a token file in `dir/secret/` and creates `dir/ws`; returns the token file.
pub fn serve_dirs(dir: &Path) -> (PathBuf, String) {
    std::fs::create_dir_all(dir.join("ws")).unwrap();
    std::fs::create_dir_all(dir.join("secret")).unwrap();
    let token = "test-token-0123456789".to_string();
    let tf = dir.join("secret/token");
    std::fs::write(&tf, &token).unwrap();
    (tf, token)
}

/// `PREFIX... sandbox-sidecar serve --workspace dir/ws --token-file ... --state-dir
/// dir/state EXTRA...`, started, its `listening on` line read (10 s at most; its stderr is
/// passed through).
pub async fn serve(dir: &Path, prefix: &[&str], extra: &[&str]) -> Served {
    use tokio::io::AsyncBufReadExt as _;
    let (tf, token) = serve_dirs(dir);
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = tokio::process::Command::new(p);
            c.args(rest).arg(bin());
            c
        }
        None => tokio::process::Command::new(bin()),
    };
    cmd.arg("serve")
        .arg("--workspace")
        .arg(dir.join("ws"))
        .arg("--token-file")
        .arg(&tf)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stdout.read_line(&mut line),
    )
    .await
    .expect("no `listening on` line within 10 s")
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix(sandbox_sidecar::spawn::READY_PREFIX)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Served {
        child,
        addr,
        token,
        _stdout: stdout,
    }
}

/// Runs `serve` expecting it to fail at startup; returns (exit code, stdout, stderr).
pub fn serve_failing(dir: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let (tf, _) = serve_dirs(dir);
    let out = Command::new(bin())
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--workspace")
        .arg(dir.join("ws"))
        .arg("--token-file")
        .arg(&tf)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn signal(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    let pid = child.id().expect("still running") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}
