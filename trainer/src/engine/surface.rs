//! The protected test surface: every file that decides what a test run reports rather than
//! what the code under test does. A solver's changes to it are dropped before grading (and
//! recorded), and an injector's bug may not touch it.
//!
//! Under RL a policy finds every way to make the tests *report* success: edit the tests,
//! add a `conftest.py` that marks every test passed, deselect tests in `pytest.ini`, drop a
//! `sitecustomize.py` or a `.pth` file that patches the runner at interpreter start-up,
//! rewrite a helper the test script sources. None of that is a fix, so none of it reaches
//! grading.

use super::prompts::ARTIFACTS_DIR;

/// Directory names whose whole contents are test code or test data.
const TEST_DIRS: [&str; 7] = [
    "test",
    "tests",
    "testing",
    "__tests__",
    "testdata",
    "spec",
    "specs",
];

/// File names a test runner or the interpreter loads as configuration or plugins, in the
/// ecosystems we support: Python (pytest, unittest, tox, nox, coverage, the `site` module),
/// JavaScript (npm scripts, jest, vitest, mocha, karma) and Go (test data, see `TEST_DIRS`).
const CONFIG_FILES: [&str; 16] = [
    "conftest.py",
    "pytest.ini",
    "tox.ini",
    "setup.cfg",
    "pyproject.toml",
    "noxfile.py",
    ".coveragerc",
    "sitecustomize.py",
    "usercustomize.py",
    "package.json",
    ".mocharc.js",
    ".mocharc.json",
    ".mocharc.yml",
    ".mocharc.yaml",
    "karma.conf.js",
    ".babelrc",
];

/// Name prefixes of configuration files with many extensions (`jest.config.ts`, …).
const CONFIG_PREFIXES: [&str; 3] = ["jest.config.", "vitest.config.", "babel.config."];

/// Why `path` belongs to the protected test surface, or `None` when it is code.
///
/// `listed` are the oracle test files (`test_files.txt`); `test_script` is the engine's copy
/// of `test_script.sh`: a file it names (a Makefile, a helper it sources) decides how the
/// tests run, so it is protected too.
pub fn protected_reason(path: &str, listed: &[String], test_script: &str) -> Option<&'static str> {
    let path = path.trim_start_matches("./");
    if listed.iter().any(|t| t == path) {
        return Some("a listed test file");
    }
    let parts: Vec<&str> = path.split('/').collect();
    let (name, dirs) = parts.split_last()?;
    if parts.first() == Some(&ARTIFACTS_DIR) {
        return Some("the artifacts directory");
    }
    if dirs.iter().any(|d| TEST_DIRS.contains(d)) {
        return Some("under a test directory");
    }
    if super::diffs::looks_like_test_file(path) {
        return Some("a test file");
    }
    if CONFIG_FILES.contains(name)
        || CONFIG_PREFIXES.iter().any(|p| name.starts_with(p))
        || name.ends_with(".pth")
    {
        return Some("test runner or interpreter configuration");
    }
    if named_by_script(path, name, test_script) {
        return Some("named by test_script.sh");
    }
    None
}

/// Whether `test_script` names `path` or, for a name with an extension, its file name, as a
/// whole word; a Makefile counts as named when the script runs `make`.
fn named_by_script(path: &str, name: &str, script: &str) -> bool {
    let word = |needle: &str| {
        !needle.is_empty()
            && script.match_indices(needle).any(|(i, _)| {
                let before = script[..i].chars().next_back();
                let after = script[i + needle.len()..].chars().next();
                let boundary =
                    |c: Option<char>| c.is_none_or(|c| !(c.is_alphanumeric() || "_-.".contains(c)));
                boundary(before.filter(|c| *c != '/')) && boundary(after)
            })
    };
    let makefile = matches!(name, "Makefile" | "makefile" | "GNUmakefile");
    word(path) || (name.contains('.') && word(name)) || (makefile && word("make"))
}

/// What code may not reach for: the test frameworks' internals and the interpreter's hooks
/// that decide what a test run reports. A change to library code that patches
/// `unittest.TestCase.run` or pytest's reporting makes every test "pass" without a fix; no
/// bug fix needs it. Matched on added lines only, case-sensitively.
const TAMPERING: [&str; 12] = [
    "import unittest",
    "from unittest",
    "import pytest",
    "from pytest",
    "_pytest",
    "TestCase",
    "addSuccess",
    "TestResult",
    "sys.settrace",
    "sys.setprofile",
    "sys.excepthook",
    "os._exit",
];

/// The first line a patch adds that reaches into the test framework or the interpreter's
/// reporting hooks (see [`TAMPERING`]); `None` when there is none. Repositories that are
/// themselves test frameworks would trip it: their pools are not supported for self-play.
pub fn framework_tampering(patch: &str) -> Option<String> {
    patch
        .lines()
        .filter(|l| l.starts_with('+') && !l.starts_with("+++"))
        .find(|l| TAMPERING.iter().any(|t| l.contains(t)))
        .map(|l| l[1..].trim().chars().take(120).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tampering_is_found_on_added_lines_only() {
        let p = "--- a/pkg/a.py\n+++ b/pkg/a.py\n@@ -1,2 +1,3 @@\n-import unittest\n x = 1\n+import unittest as _u\n";
        assert_eq!(
            framework_tampering(p).as_deref(),
            Some("import unittest as _u")
        );
        let clean = "--- a/pkg/a.py\n+++ b/pkg/a.py\n@@ -1 +1 @@\n-import unittest\n+x = 2\n";
        assert_eq!(framework_tampering(clean), None);
    }

    #[test]
    fn the_surface_covers_tests_configuration_and_what_the_script_names() {
        let listed = vec!["pkg/checks.py".to_string()];
        let script = "set -e\nsource ci/env.sh\nmake test\npython -m pytest -q tests/\n";
        for (path, protected) in [
            ("pkg/checks.py", true),
            ("tests/test_a.py", true),
            ("pkg/tests/helpers.py", true),
            ("test_b.py", true),
            ("conftest.py", true),
            ("pkg/sub/conftest.py", true),
            ("pytest.ini", true),
            ("tox.ini", true),
            ("setup.cfg", true),
            ("pyproject.toml", true),
            ("sitecustomize.py", true),
            ("lib/usercustomize.py", true),
            ("evil.pth", true),
            ("package.json", true),
            ("jest.config.ts", true),
            (".selfplay/test_script.sh", true),
            ("ci/env.sh", true),
            ("Makefile", true),
            ("pkg/core.py", false),
            ("pkg/env.py", false),
            ("README.md", false),
            ("setup.py", false),
        ] {
            assert_eq!(
                protected_reason(path, &listed, script).is_some(),
                protected,
                "{path}"
            );
        }
    }
}
