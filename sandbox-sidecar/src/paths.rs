//! Confinement of client-given paths to the workspace.
//!
//! Paths are relative to the workspace root. Absolute paths and `..` components are refused
//! outright; symlinks are resolved and the result must stay inside the workspace.

use std::path::{Component, Path, PathBuf};

use crate::error::{Result, SidecarError};

#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// `root` must exist; it is canonicalised once so later checks compare real paths.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        Ok(Self {
            root: root.canonicalize()?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Checks the syntax of `rel` (no absolute path, no `..`) and joins it to the root
    /// without following symlinks.
    pub fn join_lexical(&self, rel: &str) -> Result<PathBuf> {
        if rel.contains('\0') {
            return Err(SidecarError::PathRefused(format!(
                "{rel:?}: contains a NUL byte"
            )));
        }
        let p = Path::new(rel);
        let mut out = self.root.clone();
        for c in p.components() {
            match c {
                Component::Normal(part) => out.push(part),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(SidecarError::PathRefused(format!(
                        "{rel:?}: '..' is not allowed"
                    )));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(SidecarError::PathRefused(format!(
                        "{rel:?}: absolute paths are not allowed; give a path relative to the workspace"
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Resolves `rel` to a real path inside the workspace. The path itself may not exist
    /// (for writes); its deepest existing ancestor is resolved and checked, and the path
    /// itself is checked too when it is a symlink.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf> {
        let joined = self.join_lexical(rel)?;
        let mut existing = joined.as_path();
        let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
        loop {
            match existing.symlink_metadata() {
                Ok(_) => break,
                Err(_) => {
                    let Some(parent) = existing.parent() else {
                        return Err(SidecarError::PathRefused(format!("{rel:?}: no such path")));
                    };
                    if let Some(name) = existing.file_name() {
                        rest.push(name);
                    }
                    existing = parent;
                }
            }
        }
        let real = match existing.canonicalize() {
            Ok(r) => r,
            // A dangling symlink: refuse it rather than guess where it points.
            Err(e) => {
                return Err(SidecarError::PathRefused(format!(
                    "{rel:?}: cannot resolve {}: {e}",
                    existing.display()
                )));
            }
        };
        if !real.starts_with(&self.root) {
            return Err(SidecarError::PathRefused(format!(
                "{rel:?}: resolves outside the workspace (symlink to {})",
                real.display()
            )));
        }
        let mut out = real;
        for name in rest.into_iter().rev() {
            out.push(name);
        }
        Ok(out)
    }

    /// The path of `abs` relative to the root, with `/` separators.
    pub fn relative(&self, abs: &Path) -> Option<String> {
        abs.strip_prefix(&self.root)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_parent_and_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::new(dir.path()).unwrap();
        assert!(matches!(
            ws.resolve("../x"),
            Err(SidecarError::PathRefused(_))
        ));
        assert!(matches!(
            ws.resolve("a/../../x"),
            Err(SidecarError::PathRefused(_))
        ));
        assert!(matches!(
            ws.resolve("/etc/passwd"),
            Err(SidecarError::PathRefused(_))
        ));
        assert_eq!(ws.resolve("a/b.txt").unwrap(), ws.root().join("a/b.txt"));
        assert_eq!(ws.resolve("").unwrap(), ws.root());
    }

    #[test]
    fn refuses_symlink_out() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink("inner", dir.path().join("in")).unwrap();
        std::fs::create_dir(dir.path().join("inner")).unwrap();
        let ws = Workspace::new(dir.path()).unwrap();
        assert!(matches!(
            ws.resolve("out/x"),
            Err(SidecarError::PathRefused(_))
        ));
        assert!(matches!(
            ws.resolve("out"),
            Err(SidecarError::PathRefused(_))
        ));
        assert_eq!(ws.resolve("in/x").unwrap(), ws.root().join("inner/x"));
    }
}
