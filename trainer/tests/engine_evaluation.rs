//! Solver setup and evaluation through the real sidecar on the sample repository's valid
//! bug: a correct fix is solved, a partial fix is not, weakening the tests further gains
//! nothing, and edits to the oracle test files change nothing.

mod engine_support;

use std::process::Command;
use std::time::Duration;

use engine_support::{artifact_set, assets, provider, sample_repo};
use futures::future::join_all;
use selfplay_trainer::engine::diffs::reverse_diff;
use selfplay_trainer::engine::local::LocalProvider;
use selfplay_trainer::engine::sandbox::SandboxProvider as _;
use selfplay_trainer::engine::solver::{
    BugTask, Evaluation, evaluate_patch, prepare_grading_workspace, prepare_solver_workspace,
};
use selfplay_trainer::engine::validation::{ValidationConfig, validate};

const TIMEOUT: Duration = Duration::from_secs(60);

async fn valid_task(p: &LocalProvider) -> BugTask {
    let a = artifact_set("valid");
    let sb = p.acquire("default").await.unwrap();
    let report = validate(sb.client(), &a, &ValidationConfig::default())
        .await
        .unwrap();
    sb.release().await.unwrap();
    BugTask::from_validated(&a, &report).expect("the valid set is valid")
}

async fn grade(p: &LocalProvider, task: &BugTask, patch: &str) -> Evaluation {
    let sb = p.acquire("default").await.unwrap();
    prepare_grading_workspace(sb.client(), task).await.unwrap();
    let e = evaluate_patch(sb.client(), task, patch, TIMEOUT)
        .await
        .unwrap();
    sb.release().await.unwrap();
    e
}

/// The part of a multi-file diff that touches `path`.
fn file_part(diff: &str, path: &str) -> String {
    let header = format!("diff --git a/{path} b/{path}");
    let start = diff.find(&header).expect("file in diff");
    let rest = &diff[start..];
    let end = rest[1..].find("diff --git ").map_or(rest.len(), |i| i + 1);
    rest[..end].to_string()
}

/// A diff that edits `tests/test_slug.py` (an oracle file) in the solver's workspace: the
/// max_length tests (absent there) are not touched; one remaining test is made trivial.
const EDIT_ORACLE: &str = "diff --git a/tests/test_slug.py b/tests/test_slug.py\n--- a/tests/test_slug.py\n+++ b/tests/test_slug.py\n@@ -5,7 +5,7 @@ from tinytext import slugify\n \n class SlugTest(unittest.TestCase):\n     def test_simple(self):\n-        self.assertEqual(slugify(\"Hello World\"), \"hello-world\")\n+        self.assertTrue(True)\n \n     def test_punctuation_is_dropped(self):\n         self.assertEqual(slugify(\"Rust, Python & Go!\"), \"rust-python-go\")\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grading_per_test_with_oracle_files_restored() {
    let (_dir, repo) = sample_repo();
    let p = provider(&repo);
    let task = valid_task(&p).await;
    assert_eq!(task.original_passing.len(), 30);
    let fix = reverse_diff(&task.bug_inject_diff).unwrap();
    let partial = file_part(&fix, "tinytext/__init__.py");
    // Weakening further: the partial fix, plus a slug test made trivial.
    let weaken_more = format!("{partial}{EDIT_ORACLE}");
    let cases = [
        ("correct fix", fix.clone()),
        ("partial fix", partial.clone()),
        ("partial fix and weakened tests", weaken_more),
        (
            "correct fix and an edited oracle file",
            format!("{fix}{EDIT_ORACLE}"),
        ),
        ("only an edited oracle file", EDIT_ORACLE.to_string()),
        ("no change", String::new()),
        (
            "a patch that does not apply",
            "--- a/tinytext/wrap.py\n+++ b/tinytext/wrap.py\n@@ -1 +1 @@\n-no such line\n+x\n"
                .to_string(),
        ),
    ];
    let evals = join_all(cases.iter().map(|(_, patch)| grade(&p, &task, patch))).await;
    let by = |name: &str| &evals[cases.iter().position(|(n, _)| *n == name).unwrap()];

    let correct = by("correct fix");
    assert!(correct.solved, "{correct:#?}");
    assert!(correct.failing.is_empty());
    assert_eq!(correct.reward(), 1.0);

    let partial_e = by("partial fix");
    assert!(!partial_e.solved);
    assert_eq!(partial_e.reward(), -1.0);
    assert_eq!(
        partial_e.failing,
        [
            "tests.test_slug.SlugTest.test_max_length_cuts_a_long_first_word",
            "tests.test_slug.SlugTest.test_max_length_keeps_whole_words"
        ]
    );
    // The oracle files come back: tests the solver removed or weakened count as before.
    let weakened = by("partial fix and weakened tests");
    assert!(!weakened.solved);
    assert_eq!(weakened.failing, partial_e.failing);
    assert_eq!(weakened.statuses, partial_e.statuses);
    // Editing oracle files changes nothing, with or without a fix.
    assert_eq!(
        by("correct fix and an edited oracle file").statuses,
        correct.statuses
    );
    assert!(by("correct fix and an edited oracle file").solved);
    // Changes to the protected test surface are dropped, and recorded.
    assert_eq!(
        by("correct fix and an edited oracle file").dropped,
        ["tests/test_slug.py"]
    );
    assert!(correct.dropped.is_empty());
    let untouched = by("no change");
    assert!(!untouched.solved);
    assert_eq!(untouched.failing.len(), 3, "the three tests the bug breaks");
    assert_eq!(
        by("only an edited oracle file").statuses,
        untouched.statuses
    );
    let rejected = by("a patch that does not apply");
    assert!(!rejected.solved && !rejected.patch_applied);
    assert!(
        rejected
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("does not apply"),
        "{rejected:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn solver_workspace_has_both_diffs_and_no_history() {
    let (_dir, repo) = sample_repo();
    // Build leftovers of the original, which could carry its compiled code.
    for d in [
        "tinytext/__pycache__",
        ".pytest_cache/v",
        "build/lib",
        "dist",
        "tinytext.egg-info",
        ".mypy_cache",
    ] {
        std::fs::create_dir_all(repo.join(d)).unwrap();
        std::fs::write(repo.join(d).join("leftover"), "x").unwrap();
    }
    let p = provider(&repo);
    let task = valid_task(&p).await;
    let sb = p.acquire("default").await.unwrap();
    prepare_solver_workspace(sb.client(), &task).await.unwrap();
    let ws = sb.workspace_path().unwrap();
    // Both diffs applied: the bug is in, the package test file is gone, the slug tests are weakened.
    assert!(
        !std::fs::read_to_string(ws.join("tinytext/slug.py"))
            .unwrap()
            .contains("max_length")
    );
    assert!(!ws.join("tests/test_package.py").exists());
    assert!(
        !std::fs::read_to_string(ws.join("tests/test_slug.py"))
            .unwrap()
            .contains("max_length")
    );
    for d in [
        "tinytext/__pycache__",
        ".pytest_cache",
        "build",
        "dist",
        "tinytext.egg-info",
        ".mypy_cache",
    ] {
        assert!(!ws.join(d).exists(), "{d} is still there");
    }
    assert!(ws.join("tinytext/slug.py").is_file());
    // A fresh repository: one initial commit of the workspace as it is (so `git diff` and
    // `git status` work), nothing of the original history.
    let git = |args: &[&str], dir: &std::path::Path| {
        let o = Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let log = git(&["log", "--format=%s"], ws);
    assert_eq!(log.trim(), "Initial commit", "history: {log}");
    assert_eq!(git(&["status", "--porcelain"], ws).trim(), "");
    let original_head = git(&["rev-parse", "HEAD"], &repo);
    let found = Command::new("git")
        .args(["cat-file", "-e", original_head.trim()])
        .current_dir(ws)
        .status()
        .unwrap();
    assert!(!found.success(), "the original history's commits survived");
    // The task is the reversed weakening: it restores the removed tests.
    let task_diff = task.task_diff().unwrap();
    assert!(
        task_diff.contains("+    def test_max_length_keeps_whole_words(self):"),
        "{task_diff}"
    );
    assert!(
        task_diff.contains("new file mode 100644")
            && task_diff.contains("+++ b/tests/test_package.py")
    );
    // And it applies to the solver's workspace.
    let applied = sb
        .client()
        .apply_patch(task_diff.into_bytes(), false, true)
        .await;
    assert!(applied.is_ok(), "{applied:?}");
    sb.release().await.unwrap();
}

fn trainer(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trainer {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn command_line_validate_and_evaluate() {
    let (dir, repo) = sample_repo();
    let arts = |s: &str| {
        assets()
            .join("artifacts")
            .join(s)
            .to_string_lossy()
            .into_owned()
    };
    let repo_s = repo.to_string_lossy().into_owned();
    let v = trainer(&[
        "validate",
        "--repo",
        &repo_s,
        "--artifacts",
        &arts("valid"),
        "--json",
    ]);
    assert_eq!(v["valid"], true, "{v:#}");
    assert_eq!(v["failed_check"], serde_json::Value::Null);
    assert_eq!(v["checks"].as_array().unwrap().len(), 7);
    assert_eq!(v["checks"][0]["name"], "test_files_exist");
    assert_eq!(v["checks"][6]["passed"], true);

    let v = trainer(&[
        "validate",
        "--repo",
        &repo_s,
        "--artifacts",
        &arts("fail-bug-scope"),
        "--json",
        "--min-changed-files",
        "1",
    ]);
    assert_eq!(v["valid"], false);
    assert_eq!(v["failed_check"], "bug_scope");
    assert_eq!(v["checks"][3]["passed"], false);
    assert!(
        v["checks"][3]["detail"]
            .as_str()
            .unwrap()
            .contains("tests/test_wrap.py")
    );
    // A threshold from the command line: 31 passing tests are needed, 30 pass.
    let v = trainer(&[
        "validate",
        "--repo",
        &repo_s,
        "--artifacts",
        &arts("valid"),
        "--json",
        "--min-passing-tests",
        "31",
    ]);
    assert_eq!(v["failed_check"], "original_passes");

    let bug = std::fs::read_to_string(assets().join("artifacts/valid/bug_inject.diff")).unwrap();
    let fix = dir.path().join("fix.diff");
    std::fs::write(&fix, reverse_diff(&bug).unwrap()).unwrap();
    let e = trainer(&[
        "evaluate",
        "--repo",
        &repo_s,
        "--artifacts",
        &arts("valid"),
        "--patch",
        &fix.to_string_lossy(),
        "--json",
    ]);
    assert_eq!(e["solved"], true, "{e:#}");
    assert_eq!(e["reward"], 1);
    assert_eq!(e["failing"].as_array().unwrap().len(), 0);
    let empty = dir.path().join("empty.diff");
    std::fs::write(&empty, "").unwrap();
    let e = trainer(&[
        "evaluate",
        "--repo",
        &repo_s,
        "--artifacts",
        &arts("valid"),
        "--patch",
        &empty.to_string_lossy(),
        "--json",
    ]);
    assert_eq!(e["solved"], false);
    assert_eq!(e["reward"], -1);
    assert_eq!(e["failing"].as_array().unwrap().len(), 3);
}
