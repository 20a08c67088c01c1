//! RunTests with the built-in parsers on real runner output, and with parser scripts.
//!
//! unittest, pytest and cargo run live; `go test -json` output is the committed capture in
//! fixtures/go_test.json (made by fixtures/gen_go_test_json.sh with Go 1.19.8), since Go is
//! not assumed to be installed.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use sandbox_sidecar::client::{
    BuiltinParser, Limits, RunTestsRequest, RunTestsResponse, TestStatus,
};

fn statuses(r: &RunTestsResponse) -> BTreeMap<String, TestStatus> {
    r.statuses_typed()
}

fn req(script: &str, builtin: BuiltinParser) -> RunTestsRequest {
    RunTestsRequest {
        script: script.into(),
        builtin: builtin as i32,
        limits: Some(Limits {
            timeout_ms: 240_000,
            ..Default::default()
        }),
        ..Default::default()
    }
}

const UNITTEST_MODULE: &str = r#"
import unittest

class T(unittest.TestCase):
    def test_pass(self):
        self.assertEqual(1 + 1, 2)

    def test_fail(self):
        self.assertEqual(1 + 1, 3)

    def test_error(self):
        raise RuntimeError("boom")

    @unittest.skip("not now")
    def test_skip(self):
        pass

    @unittest.expectedFailure
    def test_xfail(self):
        self.assertEqual(1, 2)

    @unittest.expectedFailure
    def test_xpass(self):
        pass

    def test_docstring(self):
        """A docstring shown by -v."""
        pass

    def test_prints(self):
        print("noise from the test")

class U(unittest.TestCase):
    def test_other(self):
        pass
"#;

#[tokio::test]
async fn unittest_live() {
    let h = common::start().await;
    h.write("test_mod.py", UNITTEST_MODULE);
    let r = h
        .client
        .run_tests(req(
            "python3 -m unittest -v test_mod",
            BuiltinParser::Unittest,
        ))
        .await
        .unwrap();
    let run = r.run.as_ref().unwrap();
    assert_eq!(run.exit_code, 1, "{}", String::from_utf8_lossy(&run.stdout));
    let s = statuses(&r);
    let want: BTreeMap<String, TestStatus> = [
        ("test_mod.T.test_pass", TestStatus::Passed),
        ("test_mod.T.test_fail", TestStatus::Failed),
        ("test_mod.T.test_error", TestStatus::Error),
        ("test_mod.T.test_skip", TestStatus::Skipped),
        ("test_mod.T.test_xfail", TestStatus::Xfail),
        ("test_mod.T.test_xpass", TestStatus::Xpass),
        ("test_mod.T.test_docstring", TestStatus::Passed),
        ("test_mod.T.test_prints", TestStatus::Passed),
        ("test_mod.U.test_other", TestStatus::Passed),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(s, want, "output:\n{}", String::from_utf8_lossy(&run.stdout));
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A venv with pytest under target/py-venvs, created once and reused.
fn pytest_venv() -> PathBuf {
    let venv = target_dir().join("py-venvs/sidecar-pytest");
    let py = venv.join("bin/python");
    let ok = |py: &PathBuf| {
        std::process::Command::new(py)
            .args(["-c", "import pytest"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&py) {
        let st = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(st.success(), "python3 -m venv failed");
        let st = std::process::Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "pytest>=7,<9",
            ])
            .status()
            .unwrap();
        assert!(st.success(), "pip install pytest failed");
    }
    py
}

const PYTEST_MODULE: &str = r#"
import pytest

def test_pass():
    assert True

def test_fail():
    assert 1 == 2

@pytest.fixture
def broken():
    raise RuntimeError("fixture boom")

def test_error(broken):
    pass

@pytest.mark.skip(reason="not now")
def test_skip():
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="fixed already")
def test_xpass():
    assert True

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    assert x == 1

class TestGroup:
    def test_method(self):
        assert True
"#;

#[tokio::test]
async fn pytest_live() {
    let py = pytest_venv();
    let h = common::start().await;
    h.write("tests/test_p.py", PYTEST_MODULE);
    let py = py.display();
    let summary_only = h
        .client
        .run_tests(req(
            &format!("{py} -m pytest -rA -p no:cacheprovider tests"),
            BuiltinParser::Pytest,
        ))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&summary_only.run.as_ref().unwrap().stdout).into_owned();
    let s = statuses(&summary_only);
    let mut want: BTreeMap<String, TestStatus> = [
        ("tests/test_p.py::test_pass", TestStatus::Passed),
        ("tests/test_p.py::test_fail", TestStatus::Failed),
        ("tests/test_p.py::test_error", TestStatus::Error),
        ("tests/test_p.py::test_xfail", TestStatus::Xfail),
        ("tests/test_p.py::test_xpass", TestStatus::Xpass),
        ("tests/test_p.py::test_param[1]", TestStatus::Passed),
        ("tests/test_p.py::test_param[2]", TestStatus::Failed),
        (
            "tests/test_p.py::TestGroup::test_method",
            TestStatus::Passed,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // `-rA` names skipped tests only by file and line; `-v` names them.
    assert_eq!(s, want, "output:\n{out}");
    let verbose = h
        .client
        .run_tests(req(
            &format!("{py} -m pytest -rA -v -p no:cacheprovider tests"),
            BuiltinParser::Pytest,
        ))
        .await
        .unwrap();
    want.insert("tests/test_p.py::test_skip".into(), TestStatus::Skipped);
    let out = String::from_utf8_lossy(&verbose.run.as_ref().unwrap().stdout).into_owned();
    assert_eq!(statuses(&verbose), want, "output:\n{out}");
}

#[tokio::test]
async fn cargo_test_live() {
    let h = common::start().await;
    h.write(
        "crate/Cargo.toml",
        "[package]\nname = \"tiny\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    );
    h.write(
        "crate/src/lib.rs",
        r#"
pub fn add(a: i32, b: i32) -> i32 { a + b }

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn adds() { assert_eq!(add(2, 2), 4); }
    #[test]
    fn fails() { assert_eq!(add(2, 2), 5); }
    #[test]
    #[ignore]
    fn ignored() {}
    #[test]
    fn prints() { println!("some output"); }
}
"#,
    );
    let target = target_dir().join("sidecar-tiny-crate");
    let script = format!(
        "cd crate && CARGO_TARGET_DIR={} cargo test --offline -- --test-threads=1 --nocapture",
        target.display()
    );
    let r = h
        .client
        .run_tests(req(&script, BuiltinParser::Cargo))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&r.run.as_ref().unwrap().stdout).into_owned();
    let want: BTreeMap<String, TestStatus> = [
        ("tests::adds", TestStatus::Passed),
        ("tests::fails", TestStatus::Failed),
        ("tests::ignored", TestStatus::Skipped),
        ("tests::prints", TestStatus::Passed),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(statuses(&r), want, "output:\n{out}");
}

#[tokio::test]
async fn go_test_json_captured() {
    let h = common::start().await;
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/go_test.json"
    ))
    .unwrap();
    h.write("go_test.json", &fixture);
    let r = h
        .client
        .run_tests(req("cat go_test.json; exit 1", BuiltinParser::GoTestJson))
        .await
        .unwrap();
    let p = "example.com/fixture/calc";
    let want: BTreeMap<String, TestStatus> = [
        (format!("{p}/TestAddPasses"), TestStatus::Passed),
        (format!("{p}/TestAddFails"), TestStatus::Failed),
        (format!("{p}/TestSkipped"), TestStatus::Skipped),
        (format!("{p}/TestTable"), TestStatus::Failed),
        (format!("{p}/TestTable/zero"), TestStatus::Passed),
        (format!("{p}/TestTable/wrong"), TestStatus::Failed),
        ("example.com/fixture/broken".to_string(), TestStatus::Error),
    ]
    .into_iter()
    .collect();
    assert_eq!(statuses(&r), want);
}

#[tokio::test]
async fn parser_scripts() {
    let h = common::start().await;
    let parser = r#"
import json, re, sys
out = {}
for line in sys.stdin:
    m = re.match(r"^(\w+): (PASS|FAIL)$", line.strip())
    if m:
        out[m.group(1)] = "passed" if m.group(2) == "PASS" else "failed"
print(json.dumps(out))
"#;
    let script = "echo 'alpha: PASS'; echo 'beta: FAIL' >&2; echo 'gamma: PASS'";
    let r = h
        .client
        .run_tests(RunTestsRequest {
            script: script.into(),
            parser_script: parser.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.parser_error, "");
    let s = statuses(&r);
    assert_eq!(s.len(), 3);
    assert_eq!(s["beta"], TestStatus::Failed);
    assert_eq!(s["alpha"], TestStatus::Passed);

    // A parser that prints no JSON, or an unknown status, is reported, not trusted.
    for (bad, why) in [
        ("print('hello')", "JSON"),
        ("print('{\"a\": \"great\"}')", "unknown status"),
        ("import sys; sys.exit(3)", "status 3"),
    ] {
        let r = h
            .client
            .run_tests(RunTestsRequest {
                script: "echo x".into(),
                parser_script: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(r.parser_error.contains(why), "{bad}: {}", r.parser_error);
        assert!(r.statuses.is_empty());
    }

    // The test script's own timeout kills it and says so.
    let r = h
        .client
        .run_tests(RunTestsRequest {
            script: "echo 'alpha: PASS'; sleep 30".into(),
            parser_script: parser.into(),
            limits: Some(sandbox_sidecar::client::limits_with_timeout(
                Duration::from_millis(1500),
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.run.as_ref().unwrap().timed_out);
    assert_eq!(statuses(&r)["alpha"], TestStatus::Passed);
}
