//! The solver's task (DESIGN.md step 3), the evaluation of its patch (step 4) and
//! higher-order bugs (step 5).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sandbox_sidecar::SidecarClient;
use serde::{Deserialize, Serialize};

use super::artifacts::Artifacts;
use super::diffs::{DiffError, reverse_diff, split_files};
use super::error::{InfraError, InfraKind, OpError};
use super::ops::{Ops, TestRun, TestStatus};
use super::prompts::ARTIFACTS_DIR;
use super::surface::{framework_tampering, protected_reason};
use super::validation::ValidationReport;

/// Higher-order bugs stop here (the paper stops at order 2).
pub const MAX_BUG_ORDER: u8 = 2;

/// The snapshot of the solver's starting workspace; its patch is the diff against it.
pub const SOLVER_START: &str = "selfplay-solver-start";

/// A bug for solvers: validated artifacts plus what validation learnt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BugTask {
    pub bug_inject_diff: String,
    pub test_weaken_diff: String,
    /// The oracle test files, restored to their original content before grading.
    pub test_files: Vec<String>,
    pub test_script: String,
    pub test_parser: String,
    /// Tests that passed on the original code in both runs: solved means all of them pass.
    pub original_passing: BTreeSet<String>,
    /// 1 for an injector's bug; 2 for a bug made of a failed solver patch on top of it.
    pub order: u8,
    /// Failed solver patches applied after both diffs (one for order 2).
    pub failed_patches: Vec<String>,
}

impl BugTask {
    /// The task of a valid bug; `None` when validation failed.
    pub fn from_validated(artifacts: &Artifacts, report: &ValidationReport) -> Option<Self> {
        if !report.valid {
            return None;
        }
        Some(Self {
            bug_inject_diff: artifacts.bug_inject_diff.clone()?,
            test_weaken_diff: artifacts.test_weaken_diff.clone()?,
            test_files: artifacts.test_file_list(),
            test_script: artifacts.test_script.clone()?,
            test_parser: artifacts.test_parser.clone()?,
            original_passing: report.original_passing.clone(),
            order: 1,
            failed_patches: Vec::new(),
        })
    }

    /// The solver's task text: the reversed `test_weaken.diff` ("make these tests pass").
    pub fn task_diff(&self) -> Result<String, DiffError> {
        reverse_diff(&self.test_weaken_diff)
    }

    /// A failed solver patch (its code part, see [`SolverPatch::code`]) on top of this bug is
    /// a new, harder bug. `None` past [`MAX_BUG_ORDER`] or for an empty patch (the same bug).
    pub fn higher_order(&self, failed_code_patch: &str) -> Option<BugTask> {
        if self.order >= MAX_BUG_ORDER || failed_code_patch.trim().is_empty() {
            return None;
        }
        let mut next = self.clone();
        next.order += 1;
        next.failed_patches.push(failed_code_patch.to_string());
        Some(next)
    }

    /// Why `path` belongs to this bug's protected test surface (see [`super::surface`]).
    pub fn protected(&self, path: &str) -> Option<&'static str> {
        protected_reason(path, &self.test_files, &self.test_script)
    }

    /// Splits a patch into the changes grading applies and the files it drops because they
    /// are part of the protected test surface.
    pub fn filter_patch(&self, patch: &str) -> Result<FilteredPatch, DiffError> {
        let mut out = FilteredPatch::default();
        for file in split_files(patch)? {
            let protected: Vec<&String> = file
                .paths
                .iter()
                .filter(|p| self.protected(p).is_some())
                .collect();
            if protected.is_empty() {
                out.kept.push_str(&file.text);
            } else {
                out.dropped.extend(protected.into_iter().cloned());
            }
        }
        out.dropped.sort();
        out.dropped.dedup();
        Ok(out)
    }
}

/// A patch with the protected test surface taken out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FilteredPatch {
    /// What grading applies.
    pub kept: String,
    /// Files of the protected surface the patch changed; their changes were dropped.
    pub dropped: Vec<String>,
}

fn setup(what: &str, e: OpError) -> InfraError {
    match e {
        OpError::Infra(i) => i,
        OpError::Refused(m) => InfraError::new(InfraKind::Setup, format!("{what}: {m}")),
    }
}

/// Build leftovers of the original repository that the solver's workspace does without:
/// caches and metadata that could carry hints (compiled files of the original code) and
/// that a fresh checkout does not have. `build/` and `dist/` only at the top level.
const LEFTOVERS_SCRIPT: &str = "find . -path ./.git -prune -o \\( -name __pycache__ -o -name .pytest_cache \
    -o -name .mypy_cache -o -name .ruff_cache -o -name '*.egg-info' \\) -prune -exec rm -rf {} + \
    && rm -rf ./build ./dist";

/// Turns a fresh sandbox of the original repository into the solver's workspace: build
/// leftovers removed, both diffs (and any failed patches) applied, the history replaced by
/// a single initial commit (so `git diff` and `git status` work), and a snapshot taken to
/// diff the solver's work against.
pub async fn prepare_solver_workspace(
    client: &SidecarClient,
    task: &BugTask,
) -> Result<(), InfraError> {
    let ops = Ops::new(client);
    match ops
        .exec_shell(LEFTOVERS_SCRIPT, Duration::from_secs(120))
        .await
    {
        Ok(r) if r.exit_code == 0 => {}
        Ok(r) => {
            return Err(InfraError::new(
                InfraKind::Setup,
                format!(
                    "removing build leftovers failed: {}",
                    String::from_utf8_lossy(&r.stderr).trim()
                ),
            ));
        }
        Err(e) => return Err(setup("removing build leftovers", e)),
    }
    apply_bug(ops, task, true).await?;
    ops.reset_history().await?;
    ops.snapshot(SOLVER_START).await
}

/// Applies the bug: `bug_inject.diff`, with `weaken` also `test_weaken.diff`, then the
/// failed solver patches of a higher-order bug.
async fn apply_bug(ops: Ops<'_>, task: &BugTask, weaken: bool) -> Result<(), InfraError> {
    ops.apply_patch(&task.bug_inject_diff, false, false)
        .await
        .map_err(|e| setup("applying bug_inject.diff", e))?;
    if weaken {
        ops.apply_patch(&task.test_weaken_diff, false, false)
            .await
            .map_err(|e| setup("applying test_weaken.diff", e))?;
    }
    for (i, p) in task.failed_patches.iter().enumerate() {
        ops.apply_patch(p, false, false)
            .await
            .map_err(|e| setup(&format!("applying failed solver patch {}", i + 1), e))?;
    }
    Ok(())
}

/// Turns a fresh sandbox of the original repository, one the solver never touched, into
/// the grading workspace: the bug and any failed patches applied, and not the weakening, so
/// every test file is the original (the oracle). Nothing of the solver's sandbox (processes,
/// files outside its patch, the test runner's configuration) reaches it.
pub async fn prepare_grading_workspace(
    client: &SidecarClient,
    task: &BugTask,
) -> Result<(), InfraError> {
    apply_bug(Ops::new(client), task, false).await
}

/// What the solver changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SolverPatch {
    /// Everything, against the starting workspace (binary files and the artifacts
    /// directory left out).
    pub full: String,
    /// Without the protected test surface: what grading applies, and what a higher-order
    /// bug is made of.
    pub code: String,
    /// Files of the protected surface the solver changed (dropped from `code`).
    pub dropped: Vec<String>,
}

/// The solver's changes so far.
pub async fn solver_patch(
    client: &SidecarClient,
    task: &BugTask,
) -> Result<SolverPatch, InfraError> {
    let ops = Ops::new(client);
    let full = ops.diff(SOLVER_START, &[ARTIFACTS_DIR.to_string()]).await?;
    let filtered = task.filter_patch(&full).map_err(|e| {
        InfraError::new(
            InfraKind::Sidecar,
            format!("the sidecar's diff is not a unified diff: {e}"),
        )
    })?;
    Ok(SolverPatch {
        full,
        code: filtered.kept,
        dropped: filtered.dropped,
    })
}

/// The grade of one solver attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Evaluation {
    pub solved: bool,
    /// Tests of the grading set that do not pass.
    pub failing: Vec<String>,
    /// False when the submitted patch did not apply (then nothing was graded).
    pub patch_applied: bool,
    /// Why grading went wrong, when it did (patch rejected, script timed out, parser failed).
    pub detail: Option<String>,
    /// Every status of the grading run, as lower-case words.
    pub statuses: BTreeMap<String, String>,
    /// Files of the protected test surface the patch changed: dropped, not graded.
    pub dropped: Vec<String>,
    /// The patch's code reaches into the test framework (graded unsolved, counted).
    pub tampering: bool,
}

impl Evaluation {
    pub fn reward(&self) -> f64 {
        super::rewards::solver_reward(self.solved)
    }
}

pub fn status_word(s: TestStatus) -> &'static str {
    match s {
        TestStatus::Passed => "passed",
        TestStatus::Failed => "failed",
        TestStatus::Skipped => "skipped",
        TestStatus::Error => "error",
        TestStatus::Xfail => "xfail",
        TestStatus::Xpass => "xpass",
        TestStatus::Unspecified => "unknown",
    }
}

/// Per-test grading: solved iff every test of `original_passing` passed in `run` (a test
/// that is missing from the run counts as failing).
pub fn grade(
    original_passing: &BTreeSet<String>,
    statuses: &BTreeMap<String, TestStatus>,
) -> (bool, Vec<String>) {
    let failing: Vec<String> = original_passing
        .iter()
        .filter(|t| statuses.get(*t) != Some(&TestStatus::Passed))
        .cloned()
        .collect();
    (failing.is_empty() && !original_passing.is_empty(), failing)
}

fn evaluation_of(task: &BugTask, run: Result<TestRun, String>) -> Evaluation {
    match run {
        Err(m) => Evaluation {
            solved: false,
            failing: task.original_passing.iter().cloned().collect(),
            patch_applied: true,
            detail: Some(format!("the tests could not run: {m}")),
            statuses: BTreeMap::new(),
            dropped: Vec::new(),
            tampering: false,
        },
        Ok(run) => {
            let (solved, failing) = grade(&task.original_passing, &run.statuses);
            let detail = match (&run.parser_error, run.timed_out) {
                (_, true) => Some("test_script.sh timed out".to_string()),
                (Some(e), _) => Some(format!("the parser failed: {e}")),
                _ => None,
            };
            Evaluation {
                solved,
                failing,
                patch_applied: true,
                detail,
                statuses: run
                    .statuses
                    .iter()
                    .map(|(k, v)| (k.clone(), status_word(*v).to_string()))
                    .collect(),
                dropped: Vec::new(),
                tampering: false,
            }
        }
    }
}

/// Grades `patch` (against the solver's starting workspace) in a grading workspace (see
/// [`prepare_grading_workspace`]): its changes to the protected test surface are dropped
/// (and recorded), the rest is applied, and the engine's own test script and parser run. A
/// patch that is not a diff or does not apply is graded unsolved. An error here comes after
/// the solver's code is in place, so the caller holds the solver responsible for it.
pub async fn evaluate_patch(
    client: &SidecarClient,
    task: &BugTask,
    patch: &str,
    test_timeout: Duration,
) -> Result<Evaluation, InfraError> {
    let ops = Ops::new(client);
    let unsolved = |detail: String, dropped: Vec<String>| Evaluation {
        solved: false,
        failing: task.original_passing.iter().cloned().collect(),
        patch_applied: false,
        detail: Some(detail),
        statuses: BTreeMap::new(),
        dropped,
        tampering: false,
    };
    let filtered = match task.filter_patch(patch) {
        Ok(f) => f,
        Err(e) => {
            return Ok(unsolved(
                format!("the patch is not a unified diff: {e}"),
                Vec::new(),
            ));
        }
    };
    if let Some(line) = framework_tampering(&filtered.kept) {
        return Ok(Evaluation {
            tampering: true,
            ..unsolved(
                format!("the patch reaches into the test framework: {line}"),
                filtered.dropped,
            )
        });
    }
    if !filtered.kept.trim().is_empty() {
        match ops.apply_patch(&filtered.kept, false, false).await {
            Ok(_) => {}
            Err(OpError::Infra(i)) => return Err(i),
            Err(OpError::Refused(m)) => {
                return Ok(unsolved(
                    format!("the patch does not apply: {m}"),
                    filtered.dropped,
                ));
            }
        }
    }
    let run = match ops
        .run_tests(&task.test_script, &task.test_parser, test_timeout)
        .await
    {
        Ok(r) => Ok(r),
        Err(OpError::Refused(m)) => Err(m),
        Err(OpError::Infra(i)) => return Err(i),
    };
    let mut e = evaluation_of(task, run);
    e.dropped = filtered.dropped;
    Ok(e)
}

/// Runs the tests twice on the workspace as it is (the original code) and returns the tests
/// that passed both times, for grading without a validation report.
pub async fn stable_passing(
    client: &SidecarClient,
    script: &str,
    parser: &str,
    test_timeout: Duration,
) -> Result<Result<BTreeSet<String>, String>, InfraError> {
    let ops = Ops::new(client);
    let mut runs = Vec::new();
    for _ in 0..2 {
        match ops.run_tests(script, parser, test_timeout).await {
            Ok(r) if r.timed_out => {
                return Ok(Err("test_script.sh timed out on the original code".into()));
            }
            Ok(r) => match r.parser_error {
                Some(e) => return Ok(Err(format!("the parser failed on the original code: {e}"))),
                None => runs.push(r),
            },
            Err(OpError::Refused(m)) => return Ok(Err(m)),
            Err(OpError::Infra(i)) => return Err(i),
        }
    }
    Ok(Ok(runs[0]
        .statuses
        .keys()
        .filter(|t| runs.iter().all(|r| r.passed(t)))
        .cloned()
        .collect()))
}
