//! Removing git history: delete `.git` and, where git is installed, initialise an empty
//! repository in its place.

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

pub async fn reset_history(ws: &Workspace) -> Result<HistoryOutcome> {
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
    let Some(git) = find_in_path("git") else {
        return Ok(HistoryOutcome {
            removed,
            initialized: false,
            git_available: false,
            message: "git is not installed in this image: .git was removed but no new repository was initialised".into(),
        });
    };
    let mut cmd = tokio::process::Command::new(git);
    cmd.args(["init", "--quiet"])
        .current_dir(ws.root())
        // No templates: hooks and sample files from the image are not wanted either.
        .env("GIT_TEMPLATE_DIR", "")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::process::harden(&mut cmd).map_err(|e| SidecarError::io("preparing git", e))?;
    let child = crate::process::spawn_tracked(&mut cmd)
        .map_err(|e| SidecarError::io("running git init", e))?;
    let pid = child.id().unwrap_or(0);
    let out = child.wait_with_output().await;
    crate::process::untrack(pid);
    let out = out.map_err(|e| SidecarError::io("running git init", e))?;
    if !out.status.success() {
        return Ok(HistoryOutcome {
            removed,
            initialized: false,
            git_available: true,
            message: format!(
                "git init failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(HistoryOutcome {
        removed,
        initialized: true,
        git_available: true,
        message: if removed {
            "history removed; empty repository initialised".into()
        } else {
            "there was no .git; empty repository initialised".into()
        },
    })
}
