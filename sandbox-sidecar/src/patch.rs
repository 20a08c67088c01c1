//! Applying unified diffs (plain or `git diff` style) to the workspace, all or nothing.
//!
//! Parsing and hunk matching are `diffy`'s. Every file patch is first applied in memory;
//! only when all of them apply are the results written. A write that fails half way
//! restores the files already written.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use diffy::patch_set::{FileMode, FileOperation, ParseOptions, PatchKind, PatchSet};

use crate::error::{Result, SidecarError};
use crate::files::write_atomic;
use crate::paths::Workspace;
use crate::proto::FileChange;

/// A file's state in the in-memory plan: its content and mode, or absent.
type State = Option<(Vec<u8>, u32)>;

struct Plan<'w> {
    ws: &'w Workspace,
    /// Path (relative) -> (absolute path, original state on disk, planned state).
    files: BTreeMap<String, (PathBuf, State, State)>,
}

impl<'w> Plan<'w> {
    fn current(&mut self, rel: &str) -> Result<State> {
        if let Some((_, _, planned)) = self.files.get(rel) {
            return Ok(planned.clone());
        }
        let abs = self.ws.resolve(rel)?;
        let state = match std::fs::symlink_metadata(&abs) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(SidecarError::PatchRejected(format!(
                    "{rel}: is a symlink; patching symlinks is not supported"
                )));
            }
            Ok(m) if m.is_dir() => {
                return Err(SidecarError::PatchRejected(format!(
                    "{rel}: is a directory"
                )));
            }
            Ok(m) => {
                let data = std::fs::read(&abs)
                    .map_err(|e| SidecarError::io(format!("reading {rel}"), e))?;
                Some((data, m.permissions().mode() & 0o7777))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(SidecarError::io(format!("reading {rel}"), e)),
        };
        self.files
            .insert(rel.to_string(), (abs, state.clone(), state.clone()));
        Ok(state)
    }

    fn set(&mut self, rel: &str, state: State) -> Result<()> {
        self.current(rel)?;
        if let Some(entry) = self.files.get_mut(rel) {
            entry.2 = state;
        }
        Ok(())
    }
}

fn strip(path: &str, prefix: &str) -> String {
    path.strip_prefix(prefix).unwrap_or(path).to_string()
}

fn mode_bits(mode: Option<&FileMode>, fallback: u32) -> Result<u32> {
    match mode {
        None => Ok(fallback),
        Some(FileMode::Regular) => Ok(0o644),
        Some(FileMode::Executable) => Ok(0o755),
        Some(other) => Err(SidecarError::PatchRejected(format!(
            "file mode {other:?} (symlinks, submodules) is not supported"
        ))),
    }
}

/// Applies `patch` to the workspace (or only checks it). Returns the files it changes.
pub fn apply(
    ws: &Workspace,
    patch: &[u8],
    reverse: bool,
    check_only: bool,
) -> Result<Vec<FileChange>> {
    let git_style = patch.starts_with(b"diff --git ")
        || memchr::memmem::find(patch, b"\ndiff --git ").is_some();
    let opts = if git_style {
        ParseOptions::gitdiff()
    } else {
        ParseOptions::unidiff()
    };
    let mut plan = Plan {
        ws,
        files: BTreeMap::new(),
    };
    let mut changes = Vec::new();
    for (index, fp) in PatchSet::parse_bytes(patch, opts).enumerate() {
        let fp =
            fp.map_err(|e| SidecarError::PatchRejected(format!("cannot parse the patch: {e}")))?;
        let text = match fp.patch() {
            PatchKind::Text(p) => p,
            PatchKind::Binary(_) => {
                return Err(SidecarError::PatchRejected(format!(
                    "file patch {}: binary patches are not supported",
                    index + 1
                )));
            }
        };
        let op = path_op(fp.operation(), git_style)?;
        let (op, hunks, old_mode, new_mode) = if reverse {
            (
                op.reversed(),
                text.reverse(),
                fp.new_mode().copied(),
                fp.old_mode().copied(),
            )
        } else {
            (
                op,
                text.clone(),
                fp.old_mode().copied(),
                fp.new_mode().copied(),
            )
        };
        let _ = old_mode;
        let apply_to = |base: &[u8], what: &str| -> Result<Vec<u8>> {
            diffy::apply_bytes(base, &hunks).map_err(|e| {
                SidecarError::PatchRejected(format!("{what}: {e} (context does not match)"))
            })
        };
        match op {
            PathOp::Modify(path) => {
                let Some((base, mode)) = plan.current(&path)? else {
                    return Err(SidecarError::PatchRejected(format!(
                        "{path}: does not exist"
                    )));
                };
                let out = apply_to(&base, &path)?;
                let mode = mode_bits(new_mode.as_ref(), mode)?;
                plan.set(&path, Some((out, mode)))?;
                changes.push(change(&path, "modified", ""));
            }
            PathOp::Create(path) => {
                if plan.current(&path)?.is_some() {
                    return Err(SidecarError::PatchRejected(format!(
                        "{path}: already exists"
                    )));
                }
                let out = apply_to(b"", &path)?;
                let mode = mode_bits(new_mode.as_ref(), 0o644)?;
                plan.set(&path, Some((out, mode)))?;
                changes.push(change(&path, "added", ""));
            }
            PathOp::Delete(path) => {
                let Some((base, _)) = plan.current(&path)? else {
                    return Err(SidecarError::PatchRejected(format!(
                        "{path}: does not exist"
                    )));
                };
                let out = apply_to(&base, &path)?;
                if !out.is_empty() {
                    return Err(SidecarError::PatchRejected(format!(
                        "{path}: the patch deletes the file but its content differs from the patch's"
                    )));
                }
                plan.set(&path, None)?;
                changes.push(change(&path, "deleted", ""));
            }
            PathOp::Rename { from, to } | PathOp::Copy { from, to, .. } if from == to => {
                return Err(SidecarError::PatchRejected(format!(
                    "{from}: renamed onto itself"
                )));
            }
            PathOp::Rename { from, to } => {
                let Some((base, mode)) = plan.current(&from)? else {
                    return Err(SidecarError::PatchRejected(format!(
                        "{from}: does not exist"
                    )));
                };
                if plan.current(&to)?.is_some() {
                    return Err(SidecarError::PatchRejected(format!("{to}: already exists")));
                }
                let out = apply_to(&base, &from)?;
                let mode = mode_bits(new_mode.as_ref(), mode)?;
                plan.set(&from, None)?;
                plan.set(&to, Some((out, mode)))?;
                changes.push(change(&to, "renamed", &from));
            }
            PathOp::Copy { from, to } => {
                let Some((base, mode)) = plan.current(&from)? else {
                    return Err(SidecarError::PatchRejected(format!(
                        "{from}: does not exist"
                    )));
                };
                if plan.current(&to)?.is_some() {
                    return Err(SidecarError::PatchRejected(format!("{to}: already exists")));
                }
                let out = apply_to(&base, &from)?;
                let mode = mode_bits(new_mode.as_ref(), mode)?;
                plan.set(&to, Some((out, mode)))?;
                changes.push(change(&to, "added", &from));
            }
        }
    }
    if changes.is_empty() {
        return Err(SidecarError::PatchRejected(
            "the patch changes no file".into(),
        ));
    }
    if !check_only {
        commit(ws, &plan)?;
    }
    Ok(changes)
}

fn change(path: &str, kind: &str, old: &str) -> FileChange {
    FileChange {
        path: path.to_string(),
        change: kind.to_string(),
        old_path: old.to_string(),
    }
}

enum PathOp {
    Modify(String),
    Create(String),
    Delete(String),
    Rename { from: String, to: String },
    Copy { from: String, to: String },
}

impl PathOp {
    fn reversed(self) -> PathOp {
        match self {
            PathOp::Modify(p) => PathOp::Modify(p),
            PathOp::Create(p) => PathOp::Delete(p),
            PathOp::Delete(p) => PathOp::Create(p),
            PathOp::Rename { from, to } => PathOp::Rename { from: to, to: from },
            // Undoing a copy deletes the copy.
            PathOp::Copy { to, .. } => PathOp::Delete(to),
        }
    }
}

/// Paths without their `a/` `b/` prefixes. git-style patches always have them (unless made
/// with `--no-prefix`, which we detect by their absence); plain ones only sometimes.
fn path_op(op: &FileOperation<'_, [u8]>, _git_style: bool) -> Result<PathOp> {
    let s = |b: &[u8]| -> Result<String> {
        String::from_utf8(b.to_vec())
            .map_err(|_| SidecarError::PatchRejected("a path in the patch is not UTF-8".into()))
    };
    Ok(match op {
        FileOperation::Create(p) => PathOp::Create(strip(&s(p)?, "b/")),
        FileOperation::Delete(p) => PathOp::Delete(strip(&s(p)?, "a/")),
        FileOperation::Modify { original, modified } => {
            let (o, m) = (s(original)?, s(modified)?);
            let (o, m) = if o.starts_with("a/") && m.starts_with("b/") {
                (strip(&o, "a/"), strip(&m, "b/"))
            } else {
                (o, m)
            };
            if o == m {
                PathOp::Modify(o)
            } else {
                PathOp::Rename { from: o, to: m }
            }
        }
        FileOperation::Rename { from, to } => {
            let (f, t) = (s(from)?, s(to)?);
            PathOp::Rename {
                from: strip(&f, "a/"),
                to: strip(&t, "b/"),
            }
        }
        FileOperation::Copy { from, to } => PathOp::Copy {
            from: strip(&s(from)?, "a/"),
            to: strip(&s(to)?, "b/"),
        },
    })
}

fn commit(ws: &Workspace, plan: &Plan<'_>) -> Result<()> {
    let mut done: Vec<(&PathBuf, &State)> = Vec::new();
    for (rel, (abs, original, planned)) in &plan.files {
        if original == planned {
            continue;
        }
        let r = write_state(abs, planned);
        if let Err(e) = r {
            // Put back what was already written, then report.
            for (p, orig) in done.into_iter().rev() {
                let _ = write_state(p, orig);
            }
            return Err(SidecarError::io(format!("writing {rel}"), e));
        }
        if planned.is_none() {
            remove_empty_parents(ws, abs);
        }
        done.push((abs, original));
    }
    Ok(())
}

fn write_state(abs: &PathBuf, state: &State) -> std::io::Result<()> {
    match state {
        Some((data, mode)) => {
            if let Some(parent) = abs.parent() {
                std::fs::create_dir_all(parent)?;
            }
            write_atomic(abs, data, *mode)
        }
        None => match std::fs::remove_file(abs) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

fn remove_empty_parents(ws: &Workspace, abs: &std::path::Path) {
    let mut dir = abs.parent();
    while let Some(d) = dir {
        if d == ws.root() || !d.starts_with(ws.root()) {
            break;
        }
        // Fails (and stops) on the first non-empty directory.
        if std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}
