//! Task instances in SWE-bench's format, and how one becomes the engine's [`BugTask`].
//!
//! An instance names a repository state (`base_commit`, or the repository as the sandbox
//! provider hands it out), the oracle tests (`test_patch`), the grading set (`FAIL_TO_PASS`
//! ∪ `PASS_TO_PASS`) and the task text (`problem_statement`). Our own fields live in a
//! `selfplay` object that other tools ignore:
//!
//! * `bug_patch`: for instances whose base is the *clean* repository (exported self-play
//!   bugs, the bundled sample set): the diff that injects the bug. Without it the base is
//!   already buggy, as in SWE-bench.
//! * `test_script`, `test_parser`: how tests run and how their output is read (SWE-bench
//!   keeps these in its harness, per repository; here they travel with the instance, or
//!   come from the command line).
//! * `test_files`: further protected test files, beyond those `test_patch` touches.
//! * `solve_rate`, `solver_attempts`: what self-play observed (exports only; informative).
//!
//! The mapping keeps every instance on the training path: the state that grading starts
//! from (the *oracle state*) is `base + bug_patch` (the clean repository's tests are the
//! oracle) or `base + test_patch` (SWE-bench: the test patch adds the oracle tests), and
//! the solver's workspace is the oracle state with `test_patch` reversed. In the engine's
//! terms, `bug_inject_diff` turns the base into the oracle state and `test_weaken_diff` is
//! `test_patch` reversed, exactly as an injector's bug is played and graded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::engine::diffs::{reverse_diff, touched_paths};
use crate::engine::solver::BugTask;

#[derive(Debug, Error)]
pub enum InstanceError {
    #[error("reading the task file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("task file entry {entry}: {message}")]
    Entry { entry: usize, message: String },
    #[error("task file: instance_id {0:?} appears twice")]
    Duplicate(String),
    #[error("task file: no instance")]
    Empty,
    #[error("instance {id}: {message}")]
    Invalid { id: String, message: String },
}

/// The fields of ours, in an instance's `selfplay` object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SelfplayFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bug_patch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_script: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_parser: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_files: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solve_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_attempts: Option<usize>,
    /// Anything else (where an export came from, …), kept as it is.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// One task instance, as SWE-bench writes it (unknown fields are kept, so an exported file
/// loads and writes back unchanged).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub instance_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_commit: Option<String>,
    pub problem_statement: String,
    #[serde(default)]
    pub test_patch: String,
    /// The gold patch (against the solver's workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(rename = "FAIL_TO_PASS", deserialize_with = "test_list")]
    pub fail_to_pass: Vec<String>,
    #[serde(rename = "PASS_TO_PASS", default, deserialize_with = "test_list")]
    pub pass_to_pass: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selfplay: Option<SelfplayFields>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// SWE-bench's files hold the test lists as JSON text (`"[\"a\", \"b\"]"`); others as lists.
fn test_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    match Either::deserialize(d)? {
        Either::List(v) => Ok(v),
        Either::Text(t) if t.trim().is_empty() => Ok(Vec::new()),
        Either::Text(t) => serde_json::from_str(&t).map_err(|e| {
            serde::de::Error::custom(format!("a test list as JSON text must be an array: {e}"))
        }),
    }
}

/// Reads a task file: a JSON array of instances, or JSON Lines.
pub fn load_instances(path: &Path) -> Result<Vec<Instance>, InstanceError> {
    let text = std::fs::read_to_string(path).map_err(|source| InstanceError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_instances(&text)
}

/// Parses a task file's text (see [`load_instances`]).
pub fn parse_instances(text: &str) -> Result<Vec<Instance>, InstanceError> {
    let entries: Vec<(usize, Result<Instance, String>)> = if text.trim_start().starts_with('[') {
        let values: Vec<serde_json::Value> =
            serde_json::from_str(text).map_err(|e| InstanceError::Entry {
                entry: 0,
                message: format!("not a JSON array: {e}"),
            })?;
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, serde_json::from_value(v).map_err(|e| e.to_string())))
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, serde_json::from_str(l).map_err(|e| e.to_string())))
            .collect()
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (entry, r) in entries {
        let inst = r.map_err(|message| InstanceError::Entry { entry, message })?;
        if !seen.insert(inst.instance_id.clone()) {
            return Err(InstanceError::Duplicate(inst.instance_id));
        }
        out.push(inst);
    }
    if out.is_empty() {
        return Err(InstanceError::Empty);
    }
    Ok(out)
}

/// Writes instances as JSON Lines, one per line.
pub fn to_jsonl(instances: &[Instance]) -> Result<String, serde_json::Error> {
    let mut out = String::new();
    for i in instances {
        out.push_str(&serde_json::to_string(i)?);
        out.push('\n');
    }
    Ok(out)
}

/// The test command and parser for instances that carry none.
#[derive(Clone, Debug, Default)]
pub struct TestHarness {
    pub test_script: Option<String>,
    pub test_parser: Option<String>,
}

/// An instance ready to evaluate: its id, where its sandboxes come from, the engine's task
/// and the solver's task text.
#[derive(Clone, Debug)]
pub struct EvalTask {
    pub id: String,
    /// Check out this commit in every sandbox before use (a local repository with history).
    pub base_commit: Option<String>,
    /// The sandbox pool (or `POOL/ENVIRONMENT`) its sandboxes come from.
    pub pool: String,
    pub bug: BugTask,
    pub problem_statement: String,
}

impl EvalTask {
    /// The engine's task of `inst` (see the module's docs); the instance's own test script
    /// and parser win over `harness`'s.
    pub fn from_instance(
        inst: &Instance,
        harness: &TestHarness,
        pool: impl Into<String>,
    ) -> Result<Self, InstanceError> {
        let invalid = |message: String| InstanceError::Invalid {
            id: inst.instance_id.clone(),
            message,
        };
        let extra = inst.selfplay.clone().unwrap_or_default();
        if inst.test_patch.trim().is_empty() {
            return Err(invalid(
                "test_patch is empty: the oracle tests are what grading runs, so an instance \
                 needs them"
                    .into(),
            ));
        }
        let weaken = reverse_diff(&inst.test_patch)
            .map_err(|e| invalid(format!("test_patch is not a unified diff: {e}")))?;
        let mut test_files: BTreeSet<String> = touched_paths(&inst.test_patch)
            .map_err(|e| invalid(format!("test_patch is not a unified diff: {e}")))?
            .into_iter()
            .filter(|p| p != "/dev/null")
            .collect();
        test_files.extend(extra.test_files.iter().cloned());
        let bug_inject_diff = match extra.bug_patch.as_deref() {
            Some(b) if !b.trim().is_empty() => {
                touched_paths(b).map_err(|e| {
                    invalid(format!("selfplay.bug_patch is not a unified diff: {e}"))
                })?;
                b.to_string()
            }
            _ => inst.test_patch.clone(),
        };
        let test_script = extra
            .test_script
            .clone()
            .or_else(|| harness.test_script.clone())
            .ok_or_else(|| {
                invalid("no test script: give selfplay.test_script or --test-script".into())
            })?;
        let test_parser = extra
            .test_parser
            .clone()
            .or_else(|| harness.test_parser.clone())
            .ok_or_else(|| {
                invalid("no test parser: give selfplay.test_parser or --test-parser".into())
            })?;
        let original_passing: BTreeSet<String> = inst
            .fail_to_pass
            .iter()
            .chain(&inst.pass_to_pass)
            .cloned()
            .collect();
        if inst.fail_to_pass.is_empty() {
            return Err(invalid(
                "FAIL_TO_PASS is empty: nothing tells a fix from no fix".into(),
            ));
        }
        Ok(Self {
            id: inst.instance_id.clone(),
            base_commit: inst.base_commit.clone().filter(|c| !c.trim().is_empty()),
            pool: pool.into(),
            bug: BugTask {
                bug_inject_diff,
                test_weaken_diff: weaken,
                test_files: test_files.into_iter().collect(),
                test_script,
                test_parser,
                original_passing,
                order: 1,
                failed_patches: Vec::new(),
            },
            problem_statement: inst.problem_statement.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_PATCH: &str =
        "--- a/tests/test_x.py\n+++ b/tests/test_x.py\n@@ -1,1 +1,2 @@\n a = 1\n+b = 2\n";

    fn instance(extra: &str) -> String {
        format!(
            "{{\"instance_id\": \"o__r-1\", \"repo\": \"o/r\", \"base_commit\": \"abc\", \
             \"problem_statement\": \"broken\", \"test_patch\": {}, \"patch\": \"\", \
             \"FAIL_TO_PASS\": \"[\\\"t1\\\"]\", \"PASS_TO_PASS\": [\"t2\"], \
             \"version\": \"1.0\"{extra}}}",
            serde_json::to_string(TEST_PATCH).unwrap()
        )
    }

    #[test]
    fn swe_bench_lines_load_and_write_back_unchanged() {
        let text = format!(
            "{}\n\n{}\n",
            instance(""),
            instance("").replace("r-1", "r-2")
        );
        let insts = parse_instances(&text).unwrap();
        assert_eq!(insts.len(), 2);
        assert_eq!(insts[0].fail_to_pass, vec!["t1"]);
        assert_eq!(insts[0].pass_to_pass, vec!["t2"]);
        assert_eq!(insts[0].other["version"], "1.0");
        let again = parse_instances(&to_jsonl(&insts).unwrap()).unwrap();
        assert_eq!(again, insts);
        let array = format!("[{}]", instance(""));
        assert_eq!(parse_instances(&array).unwrap()[0], insts[0]);
    }

    #[test]
    fn a_swe_bench_instance_grades_on_its_test_patch() {
        let inst = &parse_instances(&instance("")).unwrap()[0];
        let harness = TestHarness {
            test_script: Some("run".into()),
            test_parser: Some("parse".into()),
        };
        let t = EvalTask::from_instance(inst, &harness, "p").unwrap();
        assert_eq!(t.bug.bug_inject_diff, TEST_PATCH);
        assert_eq!(t.bug.test_weaken_diff, reverse_diff(TEST_PATCH).unwrap());
        assert_eq!(t.bug.test_files, vec!["tests/test_x.py"]);
        assert_eq!(t.base_commit.as_deref(), Some("abc"));
        assert_eq!(
            t.bug.original_passing,
            ["t1", "t2"].map(String::from).into()
        );
        // Without a harness, the instance says what is missing.
        let e = EvalTask::from_instance(inst, &TestHarness::default(), "p").unwrap_err();
        assert!(e.to_string().contains("no test script"), "{e}");
    }

    #[test]
    fn the_selfplay_object_brings_the_bug_and_the_harness() {
        let extra = format!(
            ", \"selfplay\": {{\"bug_patch\": {}, \"test_script\": \"s\", \"test_parser\": \"p\", \"source\": \"run x\"}}",
            serde_json::to_string("--- a/m.py\n+++ b/m.py\n@@ -1 +1 @@\n-x\n+y\n").unwrap()
        );
        let inst = &parse_instances(&instance(&extra)).unwrap()[0];
        let t = EvalTask::from_instance(inst, &TestHarness::default(), "p").unwrap();
        assert!(t.bug.bug_inject_diff.contains("+y"));
        assert_eq!(t.bug.test_script, "s");
        assert_eq!(
            inst.selfplay.as_ref().unwrap().other["source"],
            serde_json::json!("run x")
        );
    }

    #[test]
    fn bad_files_are_clear_errors() {
        assert!(matches!(parse_instances(""), Err(InstanceError::Empty)));
        let e = parse_instances("{\"instance_id\": 3}").unwrap_err();
        assert!(e.to_string().contains("entry 1"), "{e}");
        let dup = format!("{}\n{}", instance(""), instance(""));
        assert!(matches!(
            parse_instances(&dup),
            Err(InstanceError::Duplicate(_))
        ));
        let no_tests = instance("").replace(&serde_json::to_string(TEST_PATCH).unwrap(), "\"\"");
        let inst = &parse_instances(&no_tests).unwrap()[0];
        let e = EvalTask::from_instance(inst, &TestHarness::default(), "p").unwrap_err();
        assert!(e.to_string().contains("test_patch is empty"), "{e}");
    }
}

/// Where an evaluation's sandboxes come from.
#[derive(Clone, Copy, Debug)]
pub enum EvalPool<'a> {
    /// One repository (a local path, or an image): every task in pool `name`; `history` when
    /// the repository has the commits of the instances' `base_commit` (a local clone or
    /// bundle; images are at their instance's commit already, SWE-bench's layout).
    Repository { name: &'a str, history: bool },
    /// A pool of environments: each task in its instance's environment (`POOL/ENV`, the
    /// environment named after the instance id, as `environmentsFrom` names them).
    Environments { name: &'a str },
}

/// The tasks of `instances` in `pool`.
pub fn tasks_in_pool(
    instances: &[Instance],
    harness: &TestHarness,
    pool: EvalPool<'_>,
) -> Result<Vec<EvalTask>, InstanceError> {
    instances
        .iter()
        .map(|inst| {
            let (key, history) = match pool {
                EvalPool::Repository { name, history } => (name.to_string(), history),
                EvalPool::Environments { name } => (
                    selfplay_crds::environments::environment_key(
                        name,
                        &selfplay_crds::environments::environment_name(&inst.instance_id),
                    ),
                    false,
                ),
            };
            let mut t = EvalTask::from_instance(inst, harness, key)?;
            if !history {
                t.base_commit = None;
            }
            Ok(t)
        })
        .collect()
}
