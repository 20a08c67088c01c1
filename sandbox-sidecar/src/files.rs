//! Reading, writing and listing files inside the workspace.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use crate::error::{Result, SidecarError};
use crate::paths::Workspace;
use crate::proto::{FileEntry, FileKind};

/// Largest read returned in one call when the client asks for "everything".
pub const READ_CAP: u64 = 64 * 1024 * 1024;
pub const DEFAULT_LIST_MAX: usize = 10_000;

pub struct ReadResult {
    pub content: Vec<u8>,
    pub size: u64,
    pub truncated: bool,
    pub mode: u32,
}

pub fn read(ws: &Workspace, rel: &str, offset: u64, max_bytes: u64) -> Result<ReadResult> {
    let path = ws.resolve(rel)?;
    let meta = std::fs::metadata(&path).map_err(|e| not_found_or_io(rel, e))?;
    if meta.is_dir() {
        return Err(SidecarError::InvalidArgument(format!(
            "{rel:?} is a directory; use ListFiles"
        )));
    }
    let size = meta.len();
    let limit = if max_bytes == 0 {
        READ_CAP
    } else {
        max_bytes.min(READ_CAP)
    };
    let mut f = std::fs::File::open(&path).map_err(|e| not_found_or_io(rel, e))?;
    if offset > 0 {
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| SidecarError::io(format!("seeking in {rel}"), e))?;
    }
    let mut content = Vec::new();
    f.take(limit)
        .read_to_end(&mut content)
        .map_err(|e| SidecarError::io(format!("reading {rel}"), e))?;
    let truncated = offset.saturating_add(content.len() as u64) < size;
    Ok(ReadResult {
        content,
        size,
        truncated,
        mode: meta.permissions().mode() & 0o7777,
    })
}

/// Writes `content` atomically (temporary file in the same directory, then rename).
/// Returns whether the file was created.
pub fn write(
    ws: &Workspace,
    rel: &str,
    content: &[u8],
    create_parents: bool,
    mode: u32,
) -> Result<bool> {
    let path = ws.resolve(rel)?;
    if path == ws.root() {
        return Err(SidecarError::InvalidArgument(
            "cannot write the workspace root".into(),
        ));
    }
    let Some(parent) = path.parent() else {
        return Err(SidecarError::InvalidArgument(format!(
            "{rel:?} has no parent directory"
        )));
    };
    if !parent.exists() {
        if create_parents {
            std::fs::create_dir_all(parent)
                .map_err(|e| SidecarError::io(format!("creating parents of {rel}"), e))?;
        } else {
            return Err(SidecarError::NotFound(format!(
                "parent directory of {rel:?} does not exist (set create_parents)"
            )));
        }
    }
    let existing = std::fs::metadata(&path).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(SidecarError::InvalidArgument(format!(
            "{rel:?} is a directory"
        )));
    }
    let mode = if mode != 0 {
        mode & 0o7777
    } else {
        existing
            .as_ref()
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644)
    };
    write_atomic(&path, content, mode)
        .map_err(|e| SidecarError::io(format!("writing {rel}"), e))?;
    Ok(existing.is_none())
}

pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".{name}.sidecar-{}",
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let result = (|| {
        std::fs::write(&tmp, content)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn list(
    ws: &Workspace,
    rel: &str,
    recursive: bool,
    include_hidden: bool,
    max: usize,
) -> Result<(Vec<FileEntry>, bool)> {
    let dir = ws.resolve(rel)?;
    let meta = std::fs::metadata(&dir).map_err(|e| not_found_or_io(rel, e))?;
    if !meta.is_dir() {
        return Err(SidecarError::InvalidArgument(format!(
            "{rel:?} is not a directory"
        )));
    }
    let max = if max == 0 { DEFAULT_LIST_MAX } else { max };
    let mut out = Vec::new();
    let mut stack = vec![dir];
    let mut truncated = false;
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = match std::fs::read_dir(&d) {
            Ok(rd) => rd.flatten().collect(),
            Err(e) => return Err(SidecarError::io(format!("listing {}", d.display()), e)),
        };
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in entries {
            let name = e.file_name();
            if !include_hidden && name.to_string_lossy().starts_with('.') {
                continue;
            }
            if out.len() >= max {
                truncated = true;
                break;
            }
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            let ft = m.file_type();
            let kind = if ft.is_symlink() {
                FileKind::Symlink
            } else if ft.is_dir() {
                FileKind::Dir
            } else if ft.is_file() {
                FileKind::File
            } else {
                FileKind::Other
            };
            let Some(path) = ws.relative(&e.path()) else {
                continue;
            };
            if kind == FileKind::Dir && recursive {
                subdirs.push(e.path());
            }
            out.push(FileEntry {
                path,
                kind: kind as i32,
                size: m.len(),
                mode: m.permissions().mode() & 0o7777,
            });
        }
        if truncated {
            break;
        }
        // Depth-first in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok((out, truncated))
}

pub fn not_found_or_io(rel: &str, e: std::io::Error) -> SidecarError {
    if e.kind() == std::io::ErrorKind::NotFound {
        SidecarError::NotFound(format!("{rel:?} does not exist"))
    } else {
        SidecarError::io(format!("accessing {rel}"), e)
    }
}
