//! Turning test runner output into per-test statuses.
//!
//! Built-in parsers for pytest (`-rA`, and `-v` lines), Python unittest (`-v`), `cargo test`
//! and `go test -json`; or a parser script that reads the output on stdin and prints JSON
//! `{test_id: status}`. When a test is reported twice (pytest reports a test that passed
//! but errored in teardown twice), a failing status wins.

use std::collections::BTreeMap;

use crate::proto::TestStatus;

pub type Statuses = BTreeMap<String, TestStatus>;

fn is_failing(s: TestStatus) -> bool {
    matches!(s, TestStatus::Failed | TestStatus::Error)
}

fn record(map: &mut Statuses, id: &str, status: TestStatus) {
    let id = id.trim();
    if id.is_empty() {
        return;
    }
    match map.get(id) {
        Some(old) if is_failing(*old) && !is_failing(status) => {}
        _ => {
            map.insert(id.to_string(), status);
        }
    }
}

/// Maps a status word (any case) to a status; used by parser scripts and runners alike.
pub fn status_from_word(word: &str) -> Option<TestStatus> {
    Some(match word.trim().to_ascii_lowercase().as_str() {
        "passed" | "pass" | "ok" | "success" | "succeeded" => TestStatus::Passed,
        "failed" | "fail" | "failure" => TestStatus::Failed,
        "skipped" | "skip" | "ignored" => TestStatus::Skipped,
        "error" | "errored" | "erroneous" => TestStatus::Error,
        "xfail" | "xfailed" | "expected failure" => TestStatus::Xfail,
        "xpass" | "xpassed" | "unexpected success" => TestStatus::Xpass,
        _ => return None,
    })
}

const PYTEST_WORDS: [(&str, TestStatus); 6] = [
    ("PASSED", TestStatus::Passed),
    ("FAILED", TestStatus::Failed),
    ("ERROR", TestStatus::Error),
    ("SKIPPED", TestStatus::Skipped),
    ("XFAIL", TestStatus::Xfail),
    ("XPASS", TestStatus::Xpass),
];

/// pytest: the `-rA` short summary (`PASSED path::test`, `FAILED path::test - msg`) and the
/// verbose lines (`path::test PASSED [ 50%]`), which also name skipped tests.
pub fn parse_pytest(output: &str) -> Statuses {
    let mut map = Statuses::new();
    for raw in output.lines() {
        let line = strip_ansi(raw);
        let line = line.trim_end();
        // Summary form: STATUS nodeid [- message]
        if let Some((word, status)) = PYTEST_WORDS
            .iter()
            .find(|(w, _)| line.starts_with(w) && line.as_bytes().get(w.len()) == Some(&b' '))
        {
            let rest = &line[word.len() + 1..];
            if rest.starts_with('[') {
                // `SKIPPED [1] file.py:12: reason` names no test; the verbose line does.
                continue;
            }
            let id = rest.split(" - ").next().unwrap_or(rest);
            if id.contains("::") {
                record(&mut map, id, *status);
            }
            continue;
        }
        // Verbose form: nodeid STATUS [extra]
        for (word, status) in PYTEST_WORDS {
            let needle = format!(" {word}");
            if let Some(at) = line.find(&needle) {
                let id = &line[..at];
                let after = &line[at + needle.len()..];
                if id.contains("::")
                    && !id.contains(' ')
                    && (after.is_empty() || after.starts_with(' '))
                {
                    record(&mut map, id, status);
                    break;
                }
            }
        }
    }
    map
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn unittest_status(rest: &str) -> Option<TestStatus> {
    let r = rest.trim();
    if r == "ok" {
        Some(TestStatus::Passed)
    } else if r == "FAIL" {
        Some(TestStatus::Failed)
    } else if r == "ERROR" {
        Some(TestStatus::Error)
    } else if r.starts_with("skipped") {
        Some(TestStatus::Skipped)
    } else if r == "expected failure" {
        Some(TestStatus::Xfail)
    } else if r == "unexpected success" {
        Some(TestStatus::Xpass)
    } else {
        None
    }
}

/// `name (module.Class.name)` (3.11+) or `name (module.Class)` (older) -> `module.Class.name`.
fn unittest_id(head: &str) -> Option<String> {
    let (name, rest) = head.split_once(" (")?;
    let inner = rest.strip_suffix(')')?;
    if name.is_empty() || name.contains(' ') || inner.contains(' ') {
        return None;
    }
    if inner.ends_with(&format!(".{name}")) {
        Some(inner.to_string())
    } else {
        Some(format!("{inner}.{name}"))
    }
}

/// Python unittest run with `-v`: `test_x (mod.Class.test_x) ... ok`, including tests whose
/// docstring or printed output splits the line. Without `-v`, only the `FAIL:`/`ERROR:`
/// headers name tests.
pub fn parse_unittest(output: &str) -> Statuses {
    let mut map = Statuses::new();
    let mut pending: Option<String> = None;
    for line in output.lines() {
        let line = line.trim_end();
        if let Some((head, rest)) = line.split_once(" ... ") {
            if let Some(id) = unittest_id(head) {
                match unittest_status(rest) {
                    Some(s) => {
                        record(&mut map, &id, s);
                        pending = None;
                    }
                    None => pending = Some(id),
                }
                continue;
            }
            // A docstring line: `First line of the docstring ... ok`.
            if let (Some(id), Some(s)) = (&pending, unittest_status(rest)) {
                record(&mut map, id, s);
                pending = None;
                continue;
            }
        }
        if let Some(id) = unittest_id(line) {
            pending = Some(id);
            continue;
        }
        if let Some(id) = &pending
            && let Some(s) = unittest_status(line)
        {
            record(&mut map, id, s);
            pending = None;
            continue;
        }
        for (prefix, status) in [
            ("FAIL: ", TestStatus::Failed),
            ("ERROR: ", TestStatus::Error),
        ] {
            if let Some(head) = line.strip_prefix(prefix)
                && let Some(id) = unittest_id(head)
            {
                record(&mut map, &id, status);
            }
        }
    }
    map
}

fn cargo_status(rest: &str) -> Option<TestStatus> {
    let r = rest.trim();
    if r == "ok" {
        Some(TestStatus::Passed)
    } else if r == "FAILED" {
        Some(TestStatus::Failed)
    } else if r.starts_with("ignored") {
        Some(TestStatus::Skipped)
    } else {
        None
    }
}

/// `cargo test`: `test path::name ... ok|FAILED|ignored[, reason]`.
pub fn parse_cargo(output: &str) -> Statuses {
    let mut map = Statuses::new();
    let mut pending: Option<String> = None;
    for line in output.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("test ") {
            // `test name ...` alone: the test's output (`--nocapture`) comes before its status.
            if let Some(id) = rest.strip_suffix(" ...") {
                pending = Some(id.to_string());
                continue;
            }
            if let Some((id, status)) = rest.split_once(" ... ") {
                match cargo_status(status) {
                    Some(s) => {
                        record(&mut map, id, s);
                        pending = None;
                    }
                    // Output of the test came first (`--nocapture`); the status follows.
                    None => pending = Some(id.to_string()),
                }
                continue;
            }
        }
        if let Some(id) = &pending
            && let Some(s) = cargo_status(line)
        {
            record(&mut map, id, s);
            pending = None;
        }
    }
    map
}

/// `go test -json`: one JSON event a line; tests are `Package/TestName` (subtests keep
/// their own `/`). A package that failed without any failing test (a build error) is
/// reported as `Package` with status error. Lines that are not JSON are ignored.
pub fn parse_go_json(output: &str) -> Statuses {
    let mut map = Statuses::new();
    let mut failed_pkgs: Vec<String> = Vec::new();
    let mut pkgs_with_failed_test: std::collections::BTreeSet<String> = Default::default();
    for line in output.lines() {
        let line = line.trim();
        if !line.starts_with('{') {
            // Older Go prints build failures as text: `FAIL\tpkg [build failed]`.
            if let Some(rest) = line.strip_prefix("FAIL")
                && let Some(pkg) = rest
                    .trim()
                    .strip_suffix("[build failed]")
                    .or_else(|| rest.trim().strip_suffix("[setup failed]"))
            {
                failed_pkgs.push(pkg.trim().to_string());
            }
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let action = v.get("Action").and_then(|a| a.as_str()).unwrap_or("");
        let pkg = v.get("Package").and_then(|a| a.as_str()).unwrap_or("");
        let test = v.get("Test").and_then(|a| a.as_str());
        let status = match action {
            "pass" => TestStatus::Passed,
            "fail" => TestStatus::Failed,
            "skip" => TestStatus::Skipped,
            _ => continue,
        };
        match test {
            Some(t) => {
                if status == TestStatus::Failed {
                    pkgs_with_failed_test.insert(pkg.to_string());
                }
                let id = if pkg.is_empty() {
                    t.to_string()
                } else {
                    format!("{pkg}/{t}")
                };
                record(&mut map, &id, status);
            }
            None if status == TestStatus::Failed => failed_pkgs.push(pkg.to_string()),
            None => {}
        }
    }
    for pkg in failed_pkgs {
        if !pkgs_with_failed_test.contains(&pkg) {
            record(&mut map, &pkg, TestStatus::Error);
        }
    }
    map
}

/// Parses a parser script's stdout: a JSON object of test id -> status word.
pub fn parse_script_json(stdout: &str) -> Result<Statuses, String> {
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .map_err(|e| format!("the parser did not print a JSON object: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "the parser printed JSON that is not an object".to_string())?;
    let mut map = Statuses::new();
    for (id, status) in obj {
        let word = status
            .as_str()
            .ok_or_else(|| format!("status of {id:?} is not a string"))?;
        let s = status_from_word(word)
            .ok_or_else(|| format!("unknown status {word:?} for {id:?} (use passed, failed, skipped, error, xfail, xpass)"))?;
        map.insert(id.clone(), s);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_status_wins() {
        let mut m = Statuses::new();
        record(&mut m, "t", TestStatus::Error);
        record(&mut m, "t", TestStatus::Passed);
        assert_eq!(m["t"], TestStatus::Error);
    }

    #[test]
    fn unittest_ids_old_and_new() {
        assert_eq!(unittest_id("test_a (m.T.test_a)").unwrap(), "m.T.test_a");
        assert_eq!(unittest_id("test_a (m.T)").unwrap(), "m.T.test_a");
        assert!(unittest_id("some text").is_none());
    }

    #[test]
    fn script_json_rejects_unknown_status() {
        assert!(parse_script_json(r#"{"a": "passed", "b": "FAIL"}"#).is_ok());
        assert!(parse_script_json(r#"{"a": "maybe"}"#).is_err());
        assert!(parse_script_json("not json").is_err());
    }
}
