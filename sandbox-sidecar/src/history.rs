//! Removing git history: delete `.git` and, where git is installed, initialise a new
//! repository in its place holding the workspace as one initial commit, so that the
//! agent's `git diff` and `git status` show its own changes.

use std::path::Path;
use std::process::Stdio;

use crate::error::{Result, SidecarError};
use crate::paths::Workspace;
use crate::process::find_in_path;

pub struct HistoryOutcome {
    pub removed: bool,
    pub initialized: bool,
    pub git_available: bool,
    pub message: String,
}

pub fn git_available() -> bool {
    find_in_path("git").is_some()
}

/// Runs git in the workspace with no configuration but its own: no system or user config
/// (HOME is `home`, a private directory), a fixed identity, no signing, no hooks.
async fn git(
    git: &Path,
    ws: &Workspace,
    home: &Path,
    args: &[&str],
) -> Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new(git);
    cmd.args([
        "-c",
        "safe.directory=*",
        "-c",
        "commit.gpgsign=false",
        "-c",
        "core.hooksPath=/dev/null",
    ])
    .args(args)
    .current_dir(ws.root())
    .env("GIT_CONFIG_NOSYSTEM", "1")
    // HOME alone is not enough where it is hidden from commands (serve --confine): git
    // stops on a config file it may not read.
    .env("GIT_CONFIG_GLOBAL", "/dev/null")
    .env("HOME", home)
    .env("GIT_AUTHOR_NAME", "selfplay")
    .env("GIT_AUTHOR_EMAIL", "selfplay@localhost")
    .env("GIT_COMMITTER_NAME", "selfplay")
    .env("GIT_COMMITTER_EMAIL", "selfplay@localhost")
    // No templates: hooks and sample files from the image are not wanted either.
    .env("GIT_TEMPLATE_DIR", "")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let what = format!("running git {}", args.first().copied().unwrap_or_default());
    crate::process::harden(&mut cmd).map_err(|e| SidecarError::io(what.clone(), e))?;
    let child =
        crate::process::spawn_tracked(&mut cmd).map_err(|e| SidecarError::io(what.clone(), e))?;
    let pid = child.id().unwrap_or(0);
    let out = child.wait_with_output().await;
    crate::process::untrack(pid);
    out.map_err(|e| SidecarError::io(what, e))
}

/// `home` is a private directory git may use as HOME (the state directory).
pub async fn reset_history(ws: &Workspace, home: &Path) -> Result<HistoryOutcome> {
    let git_dir = ws.root().join(".git");
    let removed = match std::fs::symlink_metadata(&git_dir) {
        // `.git` may be a directory, or a file pointing elsewhere (worktrees, submodules).
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(&git_dir).map_err(|e| SidecarError::io("removing .git", e))?;
            true
        }
        Ok(_) => {
            std::fs::remove_file(&git_dir).map_err(|e| SidecarError::io("removing .git", e))?;
            true
        }
        Err(_) => false,
    };
    let Some(git_bin) = find_in_path("git") else {
        return Ok(HistoryOutcome {
            removed,
            initialized: false,
            git_available: false,
            message: "git is not installed in this image: .git was removed but no new repository was initialised".into(),
        });
    };
    let failed = |step: &str, out: &std::process::Output| HistoryOutcome {
        removed,
        initialized: false,
        git_available: true,
        message: format!(
            "git {step} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    };
    let out = git(&git_bin, ws, home, &["init", "--quiet"]).await?;
    if !out.status.success() {
        return Ok(failed("init", &out));
    }
    let out = git(&git_bin, ws, home, &["add", "-A"]).await?;
    if !out.status.success() {
        return Ok(failed("add", &out));
    }
    let out = git(
        &git_bin,
        ws,
        home,
        // An empty workspace still gets its commit, so HEAD always exists.
        &[
            "commit",
            "-q",
            "--no-verify",
            "--allow-empty",
            "-m",
            "Initial commit",
        ],
    )
    .await?;
    if !out.status.success() {
        return Ok(failed("commit", &out));
    }
    Ok(HistoryOutcome {
        removed,
        initialized: true,
        git_available: true,
        message: if removed {
            "history removed; new repository with the workspace as one initial commit".into()
        } else {
            "there was no .git; new repository with the workspace as one initial commit".into()
        },
    })
}
