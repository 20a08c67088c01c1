//! Getting back into files and directories the agent locked (`chmod 000`, `chmod -w`).
//!
//! The agent's commands run as the sidecar's user, so the sidecar may give the owner's
//! bits back; walks that hit EACCES or EPERM do so and retry once.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

pub fn is_permission_error(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EPERM)
}

/// Adds u+rwx (directories) or u+rw (files) to `path` itself, and u+wx to its parent when
/// `parent_too` (needed to create, remove or rename entries). Symlinks are left alone.
pub fn make_owner_accessible(path: &Path, parent_too: bool) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_symlink() => {
            let want = if m.is_dir() { 0o700 } else { 0o600 };
            let mode = m.permissions().mode() & 0o7777;
            if mode & want != want {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | want))?;
            }
        }
        Ok(_) => {}
        // Not there yet (about to be created): only the parent matters.
        Err(e) if parent_too && e.kind() == io::ErrorKind::NotFound => {}
        // Not reachable: the parent needs its bits first.
        Err(e) if parent_too && is_permission_error(&e) => {}
        Err(e) => return Err(e),
    }
    if parent_too
        && let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        make_owner_accessible(parent, false)?;
        if std::fs::symlink_metadata(path).is_ok() {
            make_owner_accessible(path, false)?;
        }
    }
    Ok(())
}

/// [`make_owner_accessible`] on every directory of the tree at `root` (files need no bits
/// to be removed), without following symlinks.
pub fn make_tree_owner_accessible(root: &Path) -> io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        make_owner_accessible(&d, false)?;
        for e in std::fs::read_dir(&d)?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// Runs `f`; when it fails for want of permission on `path`, gives the owner's bits back
/// (on `path` and its parent) and runs it once more.
pub fn retry_accessible<T>(path: &Path, mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    match f() {
        Err(e) if is_permission_error(&e) => {
            if make_owner_accessible(path, true).is_err() {
                return Err(e);
            }
            f()
        }
        r => r,
    }
}
