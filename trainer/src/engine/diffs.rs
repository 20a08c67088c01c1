//! Reading unified diffs as text: the files a diff touches, and the reversed diff (the
//! solver's task is the reversed test weakening). Applying diffs is the sidecar's job.

use std::collections::BTreeSet;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiffError {
    #[error("line {line}: {message}")]
    Malformed { line: usize, message: String },
}

fn strip_prefix_path(p: &str) -> Option<String> {
    // `--- a/path\t2024-01-01 …`: drop a timestamp after a tab.
    let p = p.split('\t').next().unwrap_or(p).trim_end();
    if p == "/dev/null" {
        return None;
    }
    let p = p
        .strip_prefix("a/")
        .or_else(|| p.strip_prefix("b/"))
        .unwrap_or(p);
    Some(p.to_string())
}

/// Old and new line counts of a hunk header `@@ -a,b +c,d @@`.
fn hunk_counts(line: &str, n: usize) -> Result<(usize, usize), DiffError> {
    let bad = || DiffError::Malformed {
        line: n,
        message: format!("bad hunk header {line:?}"),
    };
    let inner = line.strip_prefix("@@ -").ok_or_else(bad)?;
    let end = inner.find(" @@").ok_or_else(bad)?;
    let (old, new) = inner[..end].split_once(" +").ok_or_else(bad)?;
    let count = |r: &str| -> Result<usize, DiffError> {
        match r.split_once(',') {
            Some((_, c)) => c.parse().map_err(|_| bad()),
            None => r.parse::<usize>().map(|_| 1).map_err(|_| bad()),
        }
    };
    Ok((count(old)?, count(new)?))
}

/// Lines of a diff, each tagged as hunk body or not, following the hunk headers' counts (a
/// removed line `--- x` inside a hunk is content, not a file header).
fn classify(diff: &str) -> Result<Vec<(&str, bool)>, DiffError> {
    let mut out = Vec::new();
    let (mut old_left, mut new_left) = (0usize, 0usize);
    for (i, line) in diff.lines().enumerate() {
        if old_left > 0 || new_left > 0 {
            match line.as_bytes().first() {
                Some(b'+') => new_left = new_left.saturating_sub(1),
                Some(b'-') => old_left = old_left.saturating_sub(1),
                Some(b'\\') => {}
                Some(b' ') | None => {
                    old_left = old_left.saturating_sub(1);
                    new_left = new_left.saturating_sub(1);
                }
                _ => {
                    return Err(DiffError::Malformed {
                        line: i + 1,
                        message: "hunk ends before its header's line counts".into(),
                    });
                }
            }
            out.push((line, true));
            continue;
        }
        if line.starts_with('\\') {
            // "\ No newline at end of file" after a hunk's last line.
            out.push((line, true));
            continue;
        }
        if line.starts_with("@@ ") {
            (old_left, new_left) = hunk_counts(line, i + 1)?;
        }
        out.push((line, false));
    }
    if old_left > 0 || new_left > 0 {
        return Err(DiffError::Malformed {
            line: diff.lines().count(),
            message: "the diff ends inside a hunk".into(),
        });
    }
    Ok(out)
}

/// One file's part of a unified diff: its exact text and the paths it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDiff {
    pub paths: BTreeSet<String>,
    pub text: String,
}

/// Splits a unified diff into its files, each with its headers and hunks, text unchanged
/// (concatenating the parts gives the diff back).
pub fn split_files(diff: &str) -> Result<Vec<FileDiff>, DiffError> {
    let mut parts: Vec<String> = Vec::new();
    // Whether the current part already has its `---` header (a second one starts a file).
    let mut has_old_header = false;
    let mut in_git_header = false;
    for ((line, in_hunk), raw) in classify(diff)?.into_iter().zip(diff.split_inclusive('\n')) {
        let starts_file = !in_hunk
            && (line.starts_with("diff --git ")
                || (line.starts_with("--- ") && (has_old_header || !in_git_header)));
        if starts_file || parts.is_empty() {
            parts.push(String::new());
            has_old_header = false;
            in_git_header = line.starts_with("diff --git ");
        }
        if !in_hunk && line.starts_with("--- ") {
            has_old_header = true;
        }
        if !in_hunk && line.starts_with("@@ ") {
            in_git_header = false;
        }
        if let Some(p) = parts.last_mut() {
            p.push_str(raw);
        }
    }
    parts
        .into_iter()
        .filter(|t| !t.trim().is_empty())
        .map(|text| {
            Ok(FileDiff {
                paths: touched_paths(&text)?,
                text,
            })
        })
        .collect()
}

/// Every path a unified diff names (old and new sides), without `a/` / `b/` prefixes.
/// A non-empty text that names no file is malformed.
pub fn touched_paths(diff: &str) -> Result<BTreeSet<String>, DiffError> {
    let mut paths = BTreeSet::new();
    for (line, in_hunk) in classify(diff)? {
        if in_hunk {
            continue;
        }
        if let Some(rest) = line.strip_prefix("diff --git ") {
            // Pure renames and mode changes have no ---/+++ lines.
            if let Some((a, b)) = rest.split_once(" b/") {
                paths.extend(strip_prefix_path(a));
                paths.extend(strip_prefix_path(&format!("b/{b}")));
            }
        } else if let Some(p) = line
            .strip_prefix("rename from ")
            .or_else(|| line.strip_prefix("rename to "))
        {
            paths.insert(p.to_string());
        } else if let Some(p) = line
            .strip_prefix("--- ")
            .or_else(|| line.strip_prefix("+++ "))
        {
            paths.extend(strip_prefix_path(p));
        }
    }
    if paths.is_empty() && !diff.trim().is_empty() {
        return Err(DiffError::Malformed {
            line: 1,
            message: "no file header (--- / +++ or diff --git) found".into(),
        });
    }
    Ok(paths)
}

fn swap_hunk_header(line: &str, n: usize) -> Result<String, DiffError> {
    // @@ -a,b +c,d @@ tail
    let bad = || DiffError::Malformed {
        line: n,
        message: format!("bad hunk header {line:?}"),
    };
    let inner = line.strip_prefix("@@ ").ok_or_else(bad)?;
    let end = inner.find(" @@").ok_or_else(bad)?;
    let (ranges, tail) = (&inner[..end], &inner[end + 3..]);
    let (old, new) = ranges.split_once(' ').ok_or_else(bad)?;
    let old = old.strip_prefix('-').ok_or_else(bad)?;
    let new = new.strip_prefix('+').ok_or_else(bad)?;
    Ok(format!("@@ -{new} +{old} @@{tail}"))
}

fn swap_ab(p: &str) -> String {
    if let Some(x) = p.strip_prefix("a/") {
        format!("b/{x}")
    } else if let Some(x) = p.strip_prefix("b/") {
        format!("a/{x}")
    } else {
        p.to_string()
    }
}

/// The diff that undoes `diff`: old and new sides swapped, `-` lines before `+` lines in
/// every change run, as `git diff -R` would print it.
pub fn reverse_diff(diff: &str) -> Result<String, DiffError> {
    let lines = classify(diff)?;
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    // The current change run: removed and added lines, each with its "\ No newline" note.
    let mut minus: Vec<String> = Vec::new();
    let mut plus: Vec<String> = Vec::new();
    let mut last_was_plus = false;
    let mut i = 0;
    while i < lines.len() {
        let (line, in_hunk) = lines[i];
        i += 1;
        if in_hunk {
            if let Some(rest) = line.strip_prefix('+') {
                minus.push(format!("-{rest}"));
                last_was_plus = false;
                continue;
            }
            if let Some(rest) = line.strip_prefix('-') {
                plus.push(format!("+{rest}"));
                last_was_plus = true;
                continue;
            }
            if line.starts_with('\\') {
                let target = if last_was_plus { &mut plus } else { &mut minus };
                if target.is_empty() {
                    out.push(line.to_string());
                } else {
                    target.push(line.to_string());
                }
                continue;
            }
        }
        out.append(&mut minus);
        out.append(&mut plus);
        if in_hunk {
            out.push(line.to_string());
        } else if line.starts_with("@@ ") {
            out.push(swap_hunk_header(line, i)?);
        } else if let Some(rest) = line.strip_prefix("diff --git ") {
            out.push(match rest.split_once(" b/") {
                Some((a, b)) => format!("diff --git {} {}", swap_ab(&format!("b/{b}")), swap_ab(a)),
                None => line.to_string(),
            });
        } else if line.starts_with("--- ")
            && lines
                .get(i)
                .is_some_and(|(l, h)| !h && l.starts_with("+++ "))
        {
            let new = &lines[i].0[4..];
            out.push(format!("--- {}", swap_ab(new)));
            out.push(format!("+++ {}", swap_ab(&line[4..])));
            i += 1;
        } else if let Some(m) = line.strip_prefix("new file mode ") {
            out.push(format!("deleted file mode {m}"));
        } else if let Some(m) = line.strip_prefix("deleted file mode ") {
            out.push(format!("new file mode {m}"));
        } else if let Some(m) = line.strip_prefix("old mode ") {
            out.push(format!("new mode {m}"));
        } else if let Some(m) = line.strip_prefix("new mode ") {
            out.push(format!("old mode {m}"));
        } else if let Some(p) = line.strip_prefix("rename from ") {
            out.push(format!("rename to {p}"));
        } else if let Some(p) = line.strip_prefix("rename to ") {
            out.push(format!("rename from {p}"));
        } else if let Some(rest) = line.strip_prefix("index ") {
            let (hashes, mode) = rest
                .split_once(' ')
                .map_or((rest, None), |(h, m)| (h, Some(m)));
            let swapped = match hashes.split_once("..") {
                Some((a, b)) => format!("index {b}..{a}"),
                None => format!("index {hashes}"),
            };
            out.push(match mode {
                Some(m) => format!("{swapped} {m}"),
                None => swapped,
            });
        } else {
            out.push(line.to_string());
        }
    }
    out.append(&mut minus);
    out.append(&mut plus);
    let mut text = out.join("\n");
    if diff.ends_with('\n') {
        text.push('\n');
    }
    // git prints `old mode` before `new mode` and `rename from` before `rename to`.
    Ok(fix_mode_order(&text))
}

fn fix_mode_order(text: &str) -> String {
    let mut lines: Vec<&str> = text.split('\n').collect();
    for i in 0..lines.len().saturating_sub(1) {
        if lines[i].starts_with("new mode ") && lines[i + 1].starts_with("old mode ") {
            lines.swap(i, i + 1);
        }
        if lines[i].starts_with("rename to ") && lines[i + 1].starts_with("rename from ") {
            lines.swap(i, i + 1);
        }
    }
    lines.join("\n")
}

/// Whether a path looks like a test file by the usual conventions (a `test`/`tests` directory,
/// `test_*.py`, `*_test.*`, `conftest.py`). The bug diff may not touch such files even when
/// the injector leaves them out of `test_files.txt`.
pub fn looks_like_test_file(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let Some((name, dirs)) = parts.split_last() else {
        return false;
    };
    if dirs
        .iter()
        .any(|d| matches!(*d, "test" | "tests" | "testing"))
    {
        return true;
    }
    let stem = name.rsplit_once('.').map_or(*name, |(s, _)| s);
    *name == "conftest.py"
        || stem.starts_with("test_")
        || stem.ends_with("_test")
        || stem.ends_with("_tests")
        || stem == "tests"
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFF: &str = "diff --git a/pkg/a.py b/pkg/a.py\nindex 1111111..2222222 100644\n--- a/pkg/a.py\n+++ b/pkg/a.py\n@@ -1,4 +1,3 @@ def f():\n x = 1\n-y = 2\n-z = 3\n+y = 5\n w = 4\ndiff --git a/new.py b/new.py\nnew file mode 100644\nindex 0000000..3333333\n--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+print(1)\n\\ No newline at end of file\n";

    #[test]
    fn split_files_gives_each_file_and_the_whole_text_back() {
        let parts = split_files(DIFF).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].paths.iter().collect::<Vec<_>>(), vec!["pkg/a.py"]);
        assert_eq!(parts[1].paths.iter().collect::<Vec<_>>(), vec!["new.py"]);
        assert_eq!(
            parts.iter().map(|p| p.text.as_str()).collect::<String>(),
            DIFF
        );
        // Plain `diff -u` output without `diff --git` lines, and a removed line that looks
        // like a header inside a hunk.
        let plain = "--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,1 @@\n---- not a header\n keep\n--- a/y.py\n+++ b/y.py\n@@ -1 +1 @@\n-a\n+b\n";
        let parts = split_files(plain).unwrap();
        assert_eq!(parts.len(), 2, "{parts:?}");
        assert!(parts[0].text.contains("---- not a header"));
        assert_eq!(parts[1].paths.iter().collect::<Vec<_>>(), vec!["y.py"]);
        assert!(split_files("").unwrap().is_empty());
    }

    #[test]
    fn paths() {
        let p = touched_paths(DIFF).unwrap();
        assert_eq!(
            p.into_iter().collect::<Vec<_>>(),
            vec!["new.py", "pkg/a.py"]
        );
        assert!(touched_paths("").unwrap().is_empty());
        assert!(touched_paths("this is not a diff\n").is_err());
        // Hunk lines that look like headers are content, not files.
        let tricky = "--- a/x\n+++ b/x\n@@ -1 +1 @@\n--- a/not_a_file\n+++ b/also_not\n";
        assert_eq!(
            touched_paths(tricky)
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["x"]
        );
    }

    #[test]
    fn reverse() {
        let r = reverse_diff(DIFF).unwrap();
        let expected = "diff --git a/pkg/a.py b/pkg/a.py\nindex 2222222..1111111 100644\n--- a/pkg/a.py\n+++ b/pkg/a.py\n@@ -1,3 +1,4 @@ def f():\n x = 1\n-y = 5\n+y = 2\n+z = 3\n w = 4\ndiff --git a/new.py b/new.py\ndeleted file mode 100644\nindex 3333333..0000000\n--- a/new.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-print(1)\n\\ No newline at end of file\n";
        assert_eq!(r, expected);
        assert_eq!(
            reverse_diff(&r).unwrap().lines().count(),
            DIFF.lines().count()
        );
    }

    #[test]
    fn test_file_heuristic() {
        for p in [
            "tests/test_x.py",
            "pkg/tests/helpers.py",
            "test_x.py",
            "x_test.go",
            "conftest.py",
            "a/testing/b.py",
        ] {
            assert!(looks_like_test_file(p), "{p}");
        }
        for p in [
            "pkg/core.py",
            "pkg/testament.py",
            "src/contest.rs",
            "latest.py",
        ] {
            assert!(!looks_like_test_file(p), "{p}");
        }
    }
}
