//! Consistency validation of injector artifacts (DESIGN.md step 2): seven checks in order,
//! stopping at the first failure. Everything the artifacts can do wrong (a malformed diff, a
//! crashing or hanging script, a parser printing garbage) is a failed check with its reason;
//! only a failing sandbox is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sandbox_sidecar::SidecarClient;
use serde::Serialize;

use super::artifacts::Artifacts;
use super::diffs::touched_paths;
use super::error::{InfraError, InfraKind, OpError};
use super::ops::{Ops, TestRun, TestStatus};
use super::surface::{framework_tampering, protected_reason};

/// The checks, in the order they run. Their names are stable: they are metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    TestFilesExist,
    ParserValid,
    OriginalPasses,
    BugScope,
    BugBreaksTests,
    WeakeningHides,
    InverseMutation,
}

impl Check {
    pub const ALL: [Check; 7] = [
        Check::TestFilesExist,
        Check::ParserValid,
        Check::OriginalPasses,
        Check::BugScope,
        Check::BugBreaksTests,
        Check::WeakeningHides,
        Check::InverseMutation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::TestFilesExist => "test_files_exist",
            Check::ParserValid => "parser_valid",
            Check::OriginalPasses => "original_passes",
            Check::BugScope => "bug_scope",
            Check::BugBreaksTests => "bug_breaks_tests",
            Check::WeakeningHides => "weakening_hides",
            Check::InverseMutation => "inverse_mutation",
        }
    }

    pub fn from_name(name: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// Thresholds of the checks (`SelfPlaySettings` in the run spec).
#[derive(Clone, Debug, PartialEq)]
pub struct ValidationConfig {
    pub min_passing_tests: usize,
    pub min_failing_tests: usize,
    pub min_changed_files: usize,
    /// Inverse mutation reverts at most this many bug files, one at a time.
    pub max_inverse_mutation_files: usize,
    /// Timeout of one run of the test script (and, separately, of its parser).
    pub test_timeout: Duration,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            min_passing_tests: 2,
            min_failing_tests: 1,
            min_changed_files: 1,
            max_inverse_mutation_files: 8,
            test_timeout: Duration::from_secs(300),
        }
    }
}

impl ValidationConfig {
    pub fn from_settings(s: &selfplay_crds::run::SelfPlaySettings) -> Self {
        let n = |v: i32| usize::try_from(v).unwrap_or(0);
        Self {
            min_passing_tests: n(s.min_passing_tests),
            min_failing_tests: n(s.min_failing_tests),
            min_changed_files: n(s.min_changed_files),
            max_inverse_mutation_files: n(s.max_inverse_mutation_files),
            ..Self::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// What validation found. `checks` holds the checks that ran, the failed one last.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ValidationReport {
    pub valid: bool,
    pub failed_check: Option<Check>,
    pub checks: Vec<CheckResult>,
    /// Tests that passed on the original code in both runs (the grading set).
    pub original_passing: BTreeSet<String>,
    /// Tests whose result differed between the two original runs; ignored after check 3.
    pub flaky: BTreeSet<String>,
    /// Originally passing tests that fail with the bug.
    pub bug_failing: BTreeSet<String>,
    /// Of those, the ones that pass or disappear with the weakening applied too.
    pub hidden: BTreeSet<String>,
    /// Files the bug diff touches.
    pub bug_files: Vec<String>,
    /// The bug touched the protected test surface (tests, test-runner configuration).
    pub protected_change: bool,
}

impl ValidationReport {
    pub fn failed_check_name(&self) -> Option<&'static str> {
        self.failed_check.map(Check::name)
    }
}

const SNAP_ORIGINAL: &str = "selfplay-validate-original";
const SNAP_BUGGY: &str = "selfplay-validate-buggy";

/// Validates `artifacts` in a sandbox whose workspace holds the original repository; the
/// workspace is put back as it was afterwards.
pub async fn validate(
    client: &SidecarClient,
    artifacts: &Artifacts,
    cfg: &ValidationConfig,
) -> Result<ValidationReport, InfraError> {
    let ops = Ops::new(client);
    ops.snapshot(SNAP_ORIGINAL).await?;
    let mut v = Validator {
        ops,
        a: artifacts,
        cfg,
        report: ValidationReport::default(),
    };
    let outcome = v.run().await;
    let restored = ops.reset(SNAP_ORIGINAL).await;
    match outcome {
        Ok(()) => {}
        Err(Stop::Failed) => {}
        Err(Stop::Infra(e)) => return Err(e),
    }
    restored?;
    let mut report = v.report;
    report.valid = report.failed_check.is_none();
    Ok(report)
}

/// Why the checks stopped early.
enum Stop {
    Failed,
    Infra(InfraError),
}

impl From<InfraError> for Stop {
    fn from(e: InfraError) -> Self {
        Stop::Infra(e)
    }
}

struct Validator<'a> {
    ops: Ops<'a>,
    a: &'a Artifacts,
    cfg: &'a ValidationConfig,
    report: ValidationReport,
}

/// Original content of one path of the bug, to revert it.
struct Original {
    path: String,
    content: Option<Vec<u8>>,
}

/// One file change of the bug (two paths for a rename), reverted as a unit.
struct Unit {
    name: String,
    originals: Vec<Original>,
}

fn list(set: &BTreeSet<String>, max: usize) -> String {
    let mut s: Vec<&str> = set.iter().map(String::as_str).take(max).collect();
    if set.len() > max {
        s.push("…");
    }
    s.join(", ")
}

impl Validator<'_> {
    fn pass(&mut self, check: Check, detail: impl Into<String>) {
        self.report.checks.push(CheckResult {
            name: check.name(),
            passed: true,
            detail: detail.into(),
        });
    }

    fn fail(&mut self, check: Check, detail: impl Into<String>) -> Stop {
        self.report.checks.push(CheckResult {
            name: check.name(),
            passed: false,
            detail: detail.into(),
        });
        self.report.failed_check = Some(check);
        Stop::Failed
    }

    /// A refusal fails `check` with `what`; an infrastructure error stops validation.
    fn refused(&mut self, check: Check, what: &str, e: OpError) -> Stop {
        match e {
            OpError::Refused(m) => self.fail(check, format!("{what}: {m}")),
            OpError::Infra(i) => Stop::Infra(i),
        }
    }

    async fn run(&mut self) -> Result<(), Stop> {
        let tests = self.test_files_exist().await?;
        let (script, parser, run1) = self.parser_valid().await?;
        self.original_passes(&script, &parser, &run1).await?;
        let units = self.bug_scope(&tests).await?;
        self.bug_breaks_tests(&script, &parser).await?;
        self.weakening_hides(&script, &parser).await?;
        self.inverse_mutation(&script, &parser, &units).await
    }

    async fn test_files_exist(&mut self) -> Result<Vec<String>, Stop> {
        let c = Check::TestFilesExist;
        if self.a.test_files.is_none() {
            return Err(self.fail(c, "test_files.txt is missing"));
        }
        let tests = self.a.test_file_list();
        if tests.is_empty() {
            return Err(self.fail(c, "test_files.txt lists no file"));
        }
        for t in &tests {
            if t.starts_with('/') || t.split('/').any(|p| p == "..") {
                return Err(self.fail(c, format!("listed test file {t} is outside the repository")));
            }
            match self.ops.file_exists(t).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(self.fail(c, format!("listed test file {t} does not exist")));
                }
                Err(e) => return Err(self.refused(c, "checking the test files", e)),
            }
        }
        let weaken = self.a.test_weaken_diff.as_deref().unwrap_or("");
        let touched = match touched_paths(weaken) {
            Ok(t) => t,
            Err(e) => {
                return Err(self.fail(c, format!("test_weaken.diff is not a unified diff: {e}")));
            }
        };
        if let Some(t) = touched.iter().find(|t| !tests.contains(t)) {
            return Err(self.fail(
                c,
                format!("test_weaken.diff touches {t}, which test_files.txt does not list"),
            ));
        }
        self.pass(
            c,
            format!(
                "{} listed test file(s) exist; the weakening touches {} of them",
                tests.len(),
                touched.len()
            ),
        );
        Ok(tests)
    }

    /// One run of the test script on the workspace as it is now. The run starts with no
    /// process left from earlier runs and an empty `/tmp` (the sidecar's clean start), so a
    /// script cannot count its runs and answer each check as expected; callers reset the
    /// workspace to the state under test first, for the same reason.
    async fn run_tests(&self, script: &str, parser: &str) -> Result<Result<TestRun, String>, Stop> {
        match self
            .ops
            .run_tests(script, parser, self.cfg.test_timeout)
            .await
        {
            Ok(r) => Ok(Ok(r)),
            Err(OpError::Refused(m)) => Ok(Err(m)),
            Err(OpError::Infra(i)) => Err(Stop::Infra(i)),
        }
    }

    async fn parser_valid(&mut self) -> Result<(String, String, TestRun), Stop> {
        let c = Check::ParserValid;
        let Some(script) = self.a.test_script.clone() else {
            return Err(self.fail(c, "test_script.sh is missing"));
        };
        let Some(parser) = self.a.test_parser.clone() else {
            return Err(self.fail(c, "test_parser.py is missing"));
        };
        let run = match self.run_tests(&script, &parser).await? {
            Ok(r) => r,
            Err(m) => return Err(self.fail(c, format!("the tests cannot run: {m}"))),
        };
        if run.timed_out {
            return Err(self.fail(
                c,
                format!(
                    "test_script.sh timed out after {:?} on the original code",
                    self.cfg.test_timeout
                ),
            ));
        }
        if let Some(e) = &run.parser_error {
            return Err(self.fail(
                c,
                format!("test_parser.py did not print a JSON object of test ids: {e}"),
            ));
        }
        if run.statuses.is_empty() {
            return Err(self.fail(
                c,
                format!(
                    "test_parser.py found no tests (test_script.sh exited with {}; its output ends with: {})",
                    run.exit_code,
                    run.output_tail.trim_end()
                ),
            ));
        }
        self.pass(
            c,
            format!("the parser reports {} test(s)", run.statuses.len()),
        );
        Ok((script, parser, run))
    }

    async fn original_passes(
        &mut self,
        script: &str,
        parser: &str,
        run1: &TestRun,
    ) -> Result<(), Stop> {
        let c = Check::OriginalPasses;
        self.ops.reset(SNAP_ORIGINAL).await?;
        // A second run that fails as a whole makes every test of the first one flaky.
        let run2 = match self.run_tests(script, parser).await? {
            Ok(r) if !r.timed_out && r.parser_error.is_none() => r.statuses,
            _ => BTreeMap::new(),
        };
        let ids: BTreeSet<&String> = run1.statuses.keys().chain(run2.keys()).collect();
        for id in ids {
            let (a, b) = (run1.statuses.get(id), run2.get(id));
            if a != b {
                self.report.flaky.insert(id.clone());
            } else if a == Some(&TestStatus::Passed) {
                self.report.original_passing.insert(id.clone());
            }
        }
        let n = self.report.original_passing.len();
        if n < self.cfg.min_passing_tests {
            return Err(self.fail(
                c,
                format!(
                    "{n} test(s) pass on the original code in both runs ({} flaky); at least {} needed",
                    self.report.flaky.len(),
                    self.cfg.min_passing_tests
                ),
            ));
        }
        self.pass(
            c,
            format!(
                "{n} test(s) pass in both runs; {} flaky test(s) dropped",
                self.report.flaky.len()
            ),
        );
        Ok(())
    }

    async fn bug_scope(&mut self, tests: &[String]) -> Result<Vec<Unit>, Stop> {
        let c = Check::BugScope;
        let Some(bug) = self.a.bug_inject_diff.as_deref() else {
            return Err(self.fail(c, "bug_inject.diff is missing"));
        };
        if bug.trim().is_empty() {
            return Err(self.fail(c, "bug_inject.diff is empty"));
        }
        self.ops.reset(SNAP_ORIGINAL).await?;
        let changes = match self.ops.apply_patch(bug, false, true).await {
            Ok(ch) => ch,
            Err(e) => {
                return Err(self.refused(
                    c,
                    "bug_inject.diff does not apply to the original code",
                    e,
                ));
            }
        };
        let mut files: BTreeSet<String> = BTreeSet::new();
        for ch in &changes {
            files.insert(ch.path.clone());
            if !ch.old_path.is_empty() {
                files.insert(ch.old_path.clone());
            }
        }
        let script = self.a.test_script.as_deref().unwrap_or("");
        if let Some((f, why)) = files
            .iter()
            .find_map(|f| protected_reason(f, tests, script).map(|why| (f, why)))
        {
            self.report.protected_change = true;
            return Err(self.fail(
                c,
                format!("bug_inject.diff may change source files only; it touches {f} ({why})"),
            ));
        }
        if let Some(line) = framework_tampering(bug) {
            self.report.protected_change = true;
            return Err(self.fail(
                c,
                format!("bug_inject.diff reaches into the test framework: {line}"),
            ));
        }
        if files.len() < self.cfg.min_changed_files {
            return Err(self.fail(
                c,
                format!(
                    "bug_inject.diff touches {} file(s); at least {} needed",
                    files.len(),
                    self.cfg.min_changed_files
                ),
            ));
        }
        let mut units = Vec::new();
        for ch in &changes {
            // Reverting a change restores what the original held at its path(s).
            let mut paths = vec![ch.path.clone()];
            if !ch.old_path.is_empty() && ch.old_path != ch.path {
                paths.push(ch.old_path.clone());
            }
            let mut originals = Vec::new();
            for p in paths {
                let content = self.ops.read_file(&p).await.map_err(|e| match e {
                    OpError::Infra(i) => Stop::Infra(i),
                    OpError::Refused(m) => Stop::Infra(InfraError::new(InfraKind::Sidecar, m)),
                })?;
                originals.push(Original { path: p, content });
            }
            units.push(Unit {
                name: ch.path.clone(),
                originals,
            });
        }
        units.sort_by(|a, b| a.name.cmp(&b.name));
        self.report.bug_files = files.iter().cloned().collect();
        self.pass(
            c,
            format!(
                "the bug changes {} code file(s): {}",
                files.len(),
                list(&files, 8)
            ),
        );
        Ok(units)
    }

    /// A run in which most of the tests the original reported are gone (a collection error,
    /// a crash, a deselecting configuration) says nothing about single tests: it fails the
    /// artifacts instead of counting every missing test as broken or hidden.
    fn vanished(&self, run: &TestRun) -> Option<String> {
        let before = self.report.original_passing.len() + self.report.flaky.len();
        let now = run.statuses.len();
        (now * 2 < before).then(|| {
            format!("only {now} of the {before} tests the original code reports are reported")
        })
    }

    async fn bug_breaks_tests(&mut self, script: &str, parser: &str) -> Result<(), Stop> {
        let c = Check::BugBreaksTests;
        let bug = self.a.bug_inject_diff.as_deref().unwrap_or("");
        self.ops.reset(SNAP_ORIGINAL).await?;
        if let Err(e) = self.ops.apply_patch(bug, false, false).await {
            return Err(self.refused(c, "bug_inject.diff does not apply", e));
        }
        self.ops.snapshot(SNAP_BUGGY).await?;
        let run = match self.run_tests(script, parser).await? {
            Ok(r) => r,
            Err(m) => return Err(self.fail(c, format!("the tests cannot run with the bug: {m}"))),
        };
        // Only what the parser reports of a run it could read counts: a test that is
        // missing (the run crashed, timed out, or was deselected) is not a broken test.
        if let Some(e) = &run.parser_error {
            return Err(self.fail(c, format!("the parser failed on the run with the bug: {e}")));
        }
        if let Some(why) = self.vanished(&run) {
            return Err(self.fail(c, format!("with the bug, {why}")));
        }
        self.report.bug_failing = self
            .report
            .original_passing
            .iter()
            .filter(|t| {
                matches!(
                    run.statuses.get(*t),
                    Some(TestStatus::Failed | TestStatus::Error)
                )
            })
            .cloned()
            .collect();
        let n = self.report.bug_failing.len();
        let note = if run.timed_out {
            " (the test script timed out)"
        } else {
            ""
        };
        if n < self.cfg.min_failing_tests {
            return Err(self.fail(
                c,
                format!(
                    "{n} previously passing test(s) are reported failed with the bug; at least {} needed{note}",
                    self.cfg.min_failing_tests
                ),
            ));
        }
        self.pass(
            c,
            format!(
                "{n} previously passing test(s) fail with the bug{note}: {}",
                list(&self.report.bug_failing, 10)
            ),
        );
        Ok(())
    }

    async fn weakening_hides(&mut self, script: &str, parser: &str) -> Result<(), Stop> {
        let c = Check::WeakeningHides;
        let Some(weaken) = self.a.test_weaken_diff.as_deref() else {
            return Err(self.fail(c, "test_weaken.diff is missing"));
        };
        if weaken.trim().is_empty() {
            return Err(self.fail(c, "test_weaken.diff is empty"));
        }
        self.ops.reset(SNAP_BUGGY).await?;
        if let Err(e) = self.ops.apply_patch(weaken, false, false).await {
            return Err(self.refused(c, "test_weaken.diff does not apply on top of the bug", e));
        }
        let run = match self.run_tests(script, parser).await? {
            Ok(r) => r,
            Err(m) => {
                return Err(self.fail(c, format!("the tests cannot run with the weakening: {m}")));
            }
        };
        // A run that breaks as a whole would make every failure "disappear".
        if run.timed_out {
            return Err(self.fail(c, "test_script.sh timed out with the weakening applied"));
        }
        if let Some(e) = &run.parser_error {
            return Err(self.fail(
                c,
                format!("the parser failed with the weakening applied: {e}"),
            ));
        }
        if let Some(why) = self.vanished(&run) {
            return Err(self.fail(c, format!("with the weakening applied, {why}")));
        }
        self.report.hidden = self
            .report
            .bug_failing
            .iter()
            .filter(|t| run.passed(t) || !run.statuses.contains_key(*t))
            .cloned()
            .collect();
        if self.report.hidden.is_empty() {
            return Err(self.fail(
                c,
                "with the weakening applied, every test the bug breaks still fails",
            ));
        }
        let n = self.report.hidden.len();
        self.pass(
            c,
            format!(
                "the weakening hides {n} of {} failing test(s)",
                self.report.bug_failing.len()
            ),
        );
        Ok(())
    }

    async fn inverse_mutation(
        &mut self,
        script: &str,
        parser: &str,
        units: &[Unit],
    ) -> Result<(), Stop> {
        let c = Check::InverseMutation;
        let cap = self.cfg.max_inverse_mutation_files.max(1);
        for unit in units.iter().take(cap) {
            self.ops.reset(SNAP_BUGGY).await?;
            for o in &unit.originals {
                let r = match &o.content {
                    Some(bytes) => self.ops.write_file(&o.path, bytes).await,
                    None => self.ops.remove_file(&o.path).await,
                };
                if let Err(e) = r {
                    return Err(self.refused(c, &format!("reverting {}", o.path), e));
                }
            }
            let file = &unit.name;
            let run = match self.run_tests(script, parser).await? {
                Ok(r) => r,
                Err(m) => {
                    return Err(
                        self.fail(c, format!("the tests cannot run with {file} reverted: {m}"))
                    );
                }
            };
            if !self.report.bug_failing.iter().any(|t| run.passed(t)) {
                return Err(self.fail(
                    c,
                    format!("reverting {file} alone makes none of the failing tests pass; the change to it is not needed"),
                ));
            }
        }
        let skipped = units.len().saturating_sub(cap);
        let more = if skipped > 0 {
            format!(" ({skipped} more not tried, cap {cap})")
        } else {
            String::new()
        };
        self.pass(
            c,
            format!(
                "reverting each of {} changed file(s) alone makes a failing test pass{more}",
                units.len().min(cap)
            ),
        );
        Ok(())
    }
}
