//! Paths inside the workspace.

use std::path::PathBuf;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// `charts/selfplay`.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/selfplay")
}

/// Argo CD health checks: `charts/argocd/resource_customizations/selfplay.dev`.
pub fn argocd_dir() -> PathBuf {
    workspace_root().join("charts/argocd/resource_customizations/selfplay.dev")
}

/// A fresh scratch directory under `target/tmp/<name>-<pid>`, removed first if present.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = target_dir()
        .join("tmp")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}
