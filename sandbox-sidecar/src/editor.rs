//! The agent's editor: view with line numbers, exact-once search/replace, create.

use crate::error::{Result, SidecarError};
use crate::files::{self, not_found_or_io};
use crate::paths::Workspace;

/// Lines shown around an edit.
const SNIPPET_CONTEXT: usize = 4;

/// Numbers lines like `cat -n`: right-aligned number, a tab, the line.
pub fn number_lines(text: &str, first_line: usize, start: usize, end: usize) -> String {
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let n = first_line + i;
        if n < start || n > end {
            continue;
        }
        out.push_str(&format!("{n:6}\t{line}\n"));
    }
    out
}

fn read_text(ws: &Workspace, rel: &str) -> Result<(std::path::PathBuf, String)> {
    let path = ws.resolve(rel)?;
    let bytes = std::fs::read(&path).map_err(|e| not_found_or_io(rel, e))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        SidecarError::InvalidArgument(format!("{rel:?} is not UTF-8 text; use ReadFile/WriteFile"))
    })?;
    Ok((path, text))
}

pub fn view(ws: &Workspace, rel: &str, start: u32, end: u32) -> Result<(String, u32)> {
    let path = ws.resolve(rel)?;
    if path.is_dir() {
        let (entries, _) = files::list(ws, rel, false, false, 0)?;
        let listing = entries
            .iter()
            .map(|e| {
                e.path.clone()
                    + if e.kind == crate::proto::FileKind::Dir as i32 {
                        "/"
                    } else {
                        ""
                    }
            })
            .collect::<Vec<_>>()
            .join("\n");
        return Ok((listing, entries.len() as u32));
    }
    let (_, text) = read_text(ws, rel)?;
    let total = text.lines().count() as u32;
    let start = if start == 0 { 1 } else { start };
    let end = if end == 0 { u32::MAX } else { end };
    if start > end {
        return Err(SidecarError::InvalidArgument(format!(
            "start_line {start} is after end_line {end}"
        )));
    }
    if total > 0 && start > total {
        return Err(SidecarError::InvalidArgument(format!(
            "start_line {start} is past the end of {rel:?} ({total} lines)"
        )));
    }
    Ok((number_lines(&text, 1, start as usize, end as usize), total))
}

pub fn str_replace(ws: &Workspace, rel: &str, old: &str, new: &str) -> Result<String> {
    if old.is_empty() {
        return Err(SidecarError::InvalidArgument(
            "old_str must not be empty".into(),
        ));
    }
    let (path, text) = read_text(ws, rel)?;
    let count = text.matches(old).count();
    match count {
        0 => {
            return Err(SidecarError::NoMatch {
                path: rel.to_string(),
            });
        }
        1 => {}
        n => {
            return Err(SidecarError::MultipleMatches {
                path: rel.to_string(),
                count: n as u64,
            });
        }
    }
    let Some(at) = text.find(old) else {
        return Err(SidecarError::NoMatch {
            path: rel.to_string(),
        });
    };
    let updated = format!("{}{}{}", &text[..at], new, &text[at + old.len()..]);
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644)
    };
    files::write_atomic(&path, updated.as_bytes(), mode)
        .map_err(|e| SidecarError::io(format!("writing {rel}"), e))?;
    let first = text[..at].matches('\n').count() + 1;
    let last = first + new.matches('\n').count();
    Ok(number_lines(
        &updated,
        1,
        first.saturating_sub(SNIPPET_CONTEXT).max(1),
        last + SNIPPET_CONTEXT,
    ))
}

pub fn create(ws: &Workspace, rel: &str, content: &str, overwrite: bool) -> Result<String> {
    let path = ws.resolve(rel)?;
    if path.exists() && !overwrite {
        return Err(SidecarError::AlreadyExists(format!(
            "{rel:?} exists; set overwrite or use StrReplace"
        )));
    }
    files::write(ws, rel, content.as_bytes(), true, 0)?;
    Ok(number_lines(content, 1, 1, 2 * SNIPPET_CONTEXT + 1))
}
