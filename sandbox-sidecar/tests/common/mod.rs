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
