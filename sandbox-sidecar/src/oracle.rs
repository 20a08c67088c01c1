//! Oracle files: copies of given files kept in the sidecar's memory (not on disk, where the
//! agent's commands could read them), written back on request.
//!
//! The sidecar marks itself non-dumpable at start, so processes of the same user cannot
//! read its memory through ptrace or `/proc/<pid>/mem`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;

use crate::error::{Result, SidecarError};
use crate::files::write_atomic;
use crate::paths::Workspace;

#[derive(Default)]
pub struct Oracle {
    /// Relative path -> content and mode, or None when the file did not exist.
    files: BTreeMap<String, Option<(Vec<u8>, u32)>>,
}

impl Oracle {
    /// Puts `paths` aside (replacing an earlier stash of the same paths). Returns the number
    /// stashed and the paths that did not exist.
    pub fn stash(
        &mut self,
        ws: &Workspace,
        paths: &[String],
        remove: bool,
    ) -> Result<(u64, Vec<String>)> {
        let mut staged = Vec::new();
        let mut missing = Vec::new();
        for rel in paths {
            let abs = ws.resolve(rel)?;
            let key = ws.relative(&abs).unwrap_or_else(|| rel.clone());
            match std::fs::metadata(&abs) {
                Ok(m) if m.is_file() => {
                    let data = std::fs::read(&abs)
                        .map_err(|e| SidecarError::io(format!("reading {rel}"), e))?;
                    staged.push((key, abs, Some((data, m.permissions().mode() & 0o7777))));
                }
                Ok(_) => {
                    return Err(SidecarError::InvalidArgument(format!(
                        "{rel:?} is not a regular file"
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    missing.push(rel.clone());
                    staged.push((key, abs, None));
                }
                Err(e) => return Err(SidecarError::io(format!("reading {rel}"), e)),
            }
        }
        let mut stashed = 0;
        for (key, abs, state) in staged {
            if state.is_some() {
                stashed += 1;
                if remove {
                    std::fs::remove_file(&abs)
                        .map_err(|e| SidecarError::io(format!("removing {key}"), e))?;
                }
            }
            self.files.insert(key, state);
        }
        Ok((stashed, missing))
    }

    /// Writes every stashed file back (and deletes those that did not exist when stashed).
    pub fn restore(&self, ws: &Workspace) -> Result<(u64, u64)> {
        let (mut restored, mut removed) = (0, 0);
        for (rel, state) in &self.files {
            let abs = ws.resolve(rel)?;
            match state {
                Some((data, mode)) => {
                    if let Some(parent) = abs.parent() {
                        std::fs::create_dir_all(parent)
                            .map_err(|e| SidecarError::io(format!("mkdir for {rel}"), e))?;
                    }
                    if std::fs::symlink_metadata(&abs).is_ok_and(|m| m.is_dir()) {
                        std::fs::remove_dir_all(&abs)
                            .map_err(|e| SidecarError::io(format!("removing {rel}"), e))?;
                    }
                    write_atomic(&abs, data, *mode)
                        .map_err(|e| SidecarError::io(format!("restoring {rel}"), e))?;
                    restored += 1;
                }
                None => {
                    if std::fs::symlink_metadata(&abs).is_ok() {
                        std::fs::remove_file(&abs)
                            .map_err(|e| SidecarError::io(format!("removing {rel}"), e))?;
                        removed += 1;
                    }
                }
            }
        }
        Ok((restored, removed))
    }
}
