//! `trainer export`: every valid bug of a run as a task instance (SWE-bench's format with
//! our `selfplay` fields, see [`super::instance`]), deduplicated by the bug's diff.
//!
//! A bug comes from an injector record of `DIR/episodes/step-N/episodes.jsonl` that passed
//! validation. The instance's base is the pool's clean repository (`base_commit`: its HEAD
//! when the run kept a clone with history under `DIR/repos/POOL`), `selfplay.bug_patch` the
//! bug, `test_patch` the weakening reversed (it restores the oracle tests), `patch` the bug
//! reversed (the gold fix), FAIL_TO_PASS the originally passing tests the bug breaks and
//! PASS_TO_PASS the rest of the grading set, and `problem_statement` the task the solvers
//! were given. Evaluating the instance replays exactly the workspace and the grading the
//! run's solvers had.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use super::instance::{Instance, SelfplayFields};
use crate::engine::diffs::{DiffError, reverse_diff};
use crate::engine::prompts::PromptSet;
use crate::train::step::ValidationSummary;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no episodes/ directory: is it the output directory of a run?")]
    NotARun { path: PathBuf },
    #[error("{path} line {line}: {message}")]
    Record {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("bug of {origin}: {source}")]
    Diff { origin: String, source: DiffError },
    #[error("the solver prompt: {0}")]
    Prompt(#[from] crate::engine::prompts::PromptError),
}

/// What the export found.
#[derive(Debug, Default)]
pub struct Export {
    pub instances: Vec<Instance>,
    /// Valid bugs read (duplicates included).
    pub valid_bugs: usize,
    /// Valid bugs recorded without their validation result (runs older than the export):
    /// left out, since they have no FAIL_TO_PASS.
    pub without_validation: usize,
}

#[derive(Deserialize)]
struct Record {
    role: String,
    pool: String,
    index: usize,
    #[serde(default)]
    injector: Option<Injector>,
}

#[derive(Deserialize)]
struct Injector {
    valid: bool,
    artifacts: Artifacts,
    #[serde(default)]
    solve_rate: Option<f64>,
    #[serde(default)]
    solver_attempts: usize,
    #[serde(default)]
    validation: Option<ValidationSummary>,
}

#[derive(Deserialize)]
struct Artifacts {
    bug_inject_diff: Option<String>,
    test_weaken_diff: Option<String>,
    test_files: Option<String>,
    test_script: Option<String>,
    test_parser: Option<String>,
}

/// `DIR/episodes/step-N` directories in step order.
fn step_dirs(run: &Path) -> Result<Vec<(u64, PathBuf)>, ExportError> {
    let episodes = run.join("episodes");
    if !episodes.is_dir() {
        return Err(ExportError::NotARun {
            path: run.to_path_buf(),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(&episodes).map_err(io(&episodes))? {
        let e = e.map_err(io(&episodes))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The task text of the run's solvers, without the tool documentation around it.
fn solver_statement(prompts: &PromptSet, task_diff: &str) -> Result<String, ExportError> {
    let full = prompts.solver_task(task_diff)?;
    const HEADING: &str = "## Your task";
    Ok(match full.find(HEADING) {
        Some(at) => full[at + HEADING.len()..].trim().to_string(),
        // A run's own template without the heading: all of it but the tool documentation.
        None => PromptSet {
            tools: String::new(),
            ..prompts.clone()
        }
        .solver_task(task_diff)?
        .trim()
        .to_string(),
    })
}

/// The HEAD of the run's clone of `pool`, when it kept one with history.
fn pool_head(run: &Path, pool: &str) -> Option<String> {
    let repo = run.join("repos").join(pool);
    if !repo.join(".git").exists() {
        return None;
    }
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A short stable name for a bug: FNV-1a of its diff.
fn bug_hash(diff: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in diff.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Lines without trailing blanks: diffs that differ only there are the same bug.
fn normalise(diff: &str) -> String {
    diff.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

/// Reads the run in `run` and turns its valid bugs into instances, in the order they were
/// first found; `name` prefixes the instance ids.
pub fn export_run(run: &Path, name: &str, prompts: &PromptSet) -> Result<Export, ExportError> {
    let mut out = Export::default();
    // bug (normalised) → index in out.instances, with solved and graded attempts so far.
    let mut seen: BTreeMap<String, (usize, f64, usize)> = BTreeMap::new();
    let mut heads: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (step, dir) in step_dirs(run)? {
        let path = dir.join("episodes.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ExportError::Io { path, source }),
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec: Record = serde_json::from_str(line).map_err(|e| ExportError::Record {
                path: path.clone(),
                line: i + 1,
                message: e.to_string(),
            })?;
            let Some(inj) = rec.injector.filter(|j| j.valid && rec.role == "injector") else {
                continue;
            };
            out.valid_bugs += 1;
            let Some(validation) = inj.validation else {
                out.without_validation += 1;
                continue;
            };
            let origin = format!("step {step} injector {}", rec.index);
            let a = inj.artifacts;
            let (Some(bug), Some(weaken), Some(script), Some(parser)) = (
                a.bug_inject_diff,
                a.test_weaken_diff,
                a.test_script,
                a.test_parser,
            ) else {
                // A valid bug has all five artifacts; a record without them is not one.
                continue;
            };
            let key = normalise(&bug);
            let solved = inj.solve_rate.unwrap_or(0.0) * inj.solver_attempts as f64;
            if let Some((idx, s, n)) = seen.get_mut(&key) {
                *s += solved;
                *n += inj.solver_attempts;
                let inst = &mut out.instances[*idx];
                if let Some(sp) = inst.selfplay.as_mut() {
                    sp.solver_attempts = Some(*n);
                    sp.solve_rate = (*n > 0).then(|| *s / *n as f64);
                }
                continue;
            }
            let diff_err = |source| ExportError::Diff {
                origin: origin.clone(),
                source,
            };
            let test_patch = reverse_diff(&weaken).map_err(diff_err)?;
            let gold = reverse_diff(&bug).map_err(diff_err)?;
            let statement = solver_statement(prompts, &test_patch)?;
            let failing: Vec<String> = validation.bug_failing.clone();
            let passing: Vec<String> = validation
                .original_passing
                .iter()
                .filter(|t| !failing.contains(t))
                .cloned()
                .collect();
            let base_commit = heads
                .entry(rec.pool.clone())
                .or_insert_with(|| pool_head(run, &rec.pool))
                .clone();
            let test_files: Vec<String> = a
                .test_files
                .unwrap_or_default()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            let mut other = BTreeMap::new();
            other.insert("run".to_string(), serde_json::json!(name));
            other.insert("step".to_string(), serde_json::json!(step));
            other.insert("injector".to_string(), serde_json::json!(rec.index));
            let instance = Instance {
                instance_id: format!("{name}__bug-{}", &bug_hash(&key)[..12]),
                repo: Some(rec.pool.clone()),
                image_name: None,
                base_commit,
                problem_statement: statement,
                test_patch,
                patch: Some(gold),
                fail_to_pass: failing,
                pass_to_pass: passing,
                selfplay: Some(SelfplayFields {
                    bug_patch: Some(bug),
                    test_script: Some(script),
                    test_parser: Some(parser),
                    test_files,
                    solve_rate: inj.solve_rate,
                    solver_attempts: Some(inj.solver_attempts),
                    other,
                }),
                other: BTreeMap::new(),
            };
            seen.insert(key, (out.instances.len(), solved, inj.solver_attempts));
            out.instances.push(instance);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalising_ignores_trailing_blanks_only() {
        assert_eq!(normalise("a \nb\n\n"), normalise("a\nb"));
        assert_ne!(normalise("a\nb"), normalise("a\nc"));
    }

    #[test]
    fn not_a_run_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = export_run(d.path(), "x", &PromptSet::default()).unwrap_err();
        assert!(e.to_string().contains("no episodes/"), "{e}");
    }
}
