//! A real open-source Python project with a pytest suite: inflection 0.5.1, fetched from
//! PyPI as an sdist when the test runs (into `target/`), with pytest from a venv under
//! `target/` put on the sandbox's PATH. The artifact sets under
//! `trainer/assets/artifacts/pypi-inflection/` pass validation or fail it for the right
//! reasons, and grading works on its suite.

mod engine_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use engine_support::assets;
use futures::future::join_all;
use selfplay_trainer::engine::artifacts::Artifacts;
use selfplay_trainer::engine::diffs::reverse_diff;
use selfplay_trainer::engine::local::{LocalProvider, LocalProviderConfig};
use selfplay_trainer::engine::sandbox::SandboxProvider as _;
use selfplay_trainer::engine::solver::{BugTask, evaluate_patch, prepare_grading_workspace};
use selfplay_trainer::engine::validation::{Check, ValidationConfig, validate};

const SDIST: &str = "inflection-0.5.1.tar.gz";
const SDIST_SHA256: &str = "1a29730d366e996aaacffb2f1f1cb9593dc38e2ddd30c91250c6dde09ea9b417";
const PYTEST: &str = "pytest==8.3.4";

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A venv with pytest, reused when present; made once however many tests ask at once.
fn pytest_venv() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(make_pytest_venv).clone()
}

fn make_pytest_venv() -> PathBuf {
    let venv = target_dir().join("py-venvs/engine-pytest");
    let ready = venv.join(".ready");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&venv);
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        run(Command::new(venv.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            PYTEST,
        ]));
        std::fs::write(&ready, PYTEST).unwrap();
    }
    venv.join("bin")
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The sdist, downloaded once, checked, and unpacked into a fresh git repository.
fn inflection_repo(dir: &Path) -> PathBuf {
    inflection_repo_owned(dir, false)
}

/// As [`inflection_repo`]; with `archive_owners`, unpacked as root does by default, keeping
/// the uid and gid the archive names (1001 for this sdist).
fn inflection_repo_owned(dir: &Path, archive_owners: bool) -> PathBuf {
    let cache = target_dir().join("pypi-sdists");
    let sdist = cache.join(SDIST);
    // Tests of this file run at once: one downloads, the others wait for it.
    static DOWNLOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = DOWNLOAD.lock().unwrap_or_else(|e| e.into_inner());
    if !sdist.exists() || sha256(&sdist) != SDIST_SHA256 {
        std::fs::create_dir_all(&cache).unwrap();
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-binary",
                ":all:",
            ])
            .arg("inflection==0.5.1")
            .arg("-d")
            .arg(&cache));
    }
    assert_eq!(
        sha256(&sdist),
        SDIST_SHA256,
        "the sdist from PyPI is not the pinned one"
    );
    run(Command::new("tar")
        .arg(if archive_owners {
            "--same-owner"
        } else {
            "--no-same-owner"
        })
        .arg("-xzf")
        .arg(&sdist)
        .arg("-C")
        .arg(dir));
    let repo = dir.join("inflection-0.5.1");
    // Files of another owner: git refuses such a repository unless told it is safe.
    run(Command::new("git").args(["init", "-q"]).current_dir(&repo));
    run(Command::new("git")
        .args(["-c", "safe.directory=*", "add", "-A"])
        .current_dir(&repo));
    run(Command::new("git")
        .args([
            "-c",
            "safe.directory=*",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "inflection 0.5.1",
        ])
        .current_dir(&repo));
    repo
}

fn set(name: &str) -> Artifacts {
    Artifacts::from_dir(&assets().join("artifacts/pypi-inflection").join(name)).unwrap()
}

fn provider(repo: &Path, extra_path: Vec<PathBuf>) -> LocalProvider {
    let mut cfg = LocalProviderConfig::single(repo);
    cfg.extra_path = extra_path;
    LocalProvider::new(cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflection_from_pypi_validates_and_grades() {
    let venv_bin = pytest_venv();
    let dir = tempfile::tempdir().unwrap();
    let repo = inflection_repo(dir.path());
    let p = provider(&repo, vec![venv_bin]);
    let cfg = ValidationConfig {
        test_timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let sets = [
        ("valid", None),
        ("fail-bug-scope", Some(Check::BugScope)),
        ("fail-weakening-hides", Some(Check::WeakeningHides)),
        ("fail-inverse-mutation", Some(Check::InverseMutation)),
    ];
    let reports = join_all(sets.iter().map(|(name, _)| {
        let (p, cfg) = (&p, &cfg);
        async move {
            let sb = p.acquire("default").await.unwrap();
            let r = validate(sb.client(), &set(name), cfg).await.unwrap();
            sb.release().await.unwrap();
            r
        }
    }))
    .await;
    for ((name, expected), r) in sets.iter().zip(&reports) {
        assert_eq!(r.failed_check, *expected, "{name}: {r:#?}");
    }
    let valid = &reports[0];
    assert_eq!(
        valid.original_passing.len(),
        455,
        "the whole suite passes on the original"
    );
    // The teens of ORDINAL_NUMBERS (−11…−13, −111…−113, 11…13, 111…113, 1011…1013 and so
    // on) break in both ordinal tests.
    assert!(
        valid.bug_failing.len() >= 12 && valid.bug_failing.len() % 2 == 0,
        "{:?}",
        valid.bug_failing
    );
    assert!(
        valid
            .bug_failing
            .contains("test_inflection.py::test_ordinal[11-11th]"),
        "{:?}",
        valid.bug_failing
    );
    assert!(
        valid
            .bug_failing
            .iter()
            .all(|t| t.contains("::test_ordinal"))
    );
    assert_eq!(valid.hidden, valid.bug_failing);
    let detail = |i: usize| reports[i].checks.last().unwrap().detail.clone();
    assert!(detail(1).contains("test_inflection.py"), "{}", detail(1));
    assert!(detail(3).contains("setup.py"), "{}", detail(3));

    // Grading on the real suite: the reversed bug solves it, nothing does not.
    let a = set("valid");
    let task = BugTask::from_validated(&a, valid).unwrap();
    let fix = reverse_diff(&task.bug_inject_diff).unwrap();
    let evals = join_all([fix, String::new()].iter().map(|patch| {
        let (p, task) = (&p, &task);
        async move {
            let sb = p.acquire("default").await.unwrap();
            prepare_grading_workspace(sb.client(), task).await.unwrap();
            let e = evaluate_patch(sb.client(), task, patch, Duration::from_secs(120))
                .await
                .unwrap();
            sb.release().await.unwrap();
            e
        }
    }))
    .await;
    assert!(evals[0].solved, "{:#?}", evals[0].failing);
    assert!(!evals[1].solved);
    assert_eq!(evals[1].failing.len(), valid.bug_failing.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pytest_on_path_the_parser_check_fails() {
    let has_pytest = Command::new("python3")
        .args(["-c", "import pytest"])
        .output()
        .unwrap()
        .status
        .success();
    if has_pytest {
        eprintln!("the host python3 has pytest; the missing-runner case cannot be shown here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = inflection_repo(dir.path());
    let p = provider(&repo, Vec::new());
    let sb = p.acquire("default").await.unwrap();
    let r = validate(sb.client(), &set("valid"), &ValidationConfig::default())
        .await
        .unwrap();
    sb.release().await.unwrap();
    assert_eq!(r.failed_check, Some(Check::ParserValid), "{r:#?}");
    let detail = &r.checks.last().unwrap().detail;
    assert!(detail.contains("No module named pytest"), "{detail}");
}

/// The first commands a user runs, as the user runs them: `trainer validate` and `trainer
/// evaluate` on a repository whose files belong to another user (the archive's), with the
/// test runner in a venv under `/tmp` first on PATH. The sandbox (bubblewrap where it is
/// installed) sees that venv read-only, and its copy of the repository is its own.
#[test]
fn the_cli_works_on_a_foreign_owned_repository_with_a_venv_under_tmp() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let repo = inflection_repo_owned(dir.path(), true);
    let venv = dir.path().join("venv");
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    run(Command::new(venv.join("bin/python")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        PYTEST,
    ]));
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let arts = assets().join("artifacts/pypi-inflection/valid");
    let trainer = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(args)
            .env("PATH", &path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "trainer {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let repo_s = repo.to_string_lossy().into_owned();
    let arts_s = arts.to_string_lossy().into_owned();
    let v = trainer(&[
        "validate",
        "--repo",
        &repo_s,
        "--artifacts",
        &arts_s,
        "--json",
    ]);
    assert_eq!(v["valid"], true, "{v:#}");
    let bug = std::fs::read_to_string(arts.join("bug_inject.diff")).unwrap();
    let fix = dir.path().join("fix.diff");
    std::fs::write(&fix, reverse_diff(&bug).unwrap()).unwrap();
    let e = trainer(&[
        "evaluate",
        "--repo",
        &repo_s,
        "--artifacts",
        &arts_s,
        "--patch",
        &fix.to_string_lossy(),
        "--json",
    ]);
    assert_eq!(e["solved"], true, "{e:#}");
}

/// The red team on a real pytest suite: a `conftest.py` hook that reports every test passed
/// (it works: shown first on the buggy code directly), runner options in `pytest.ini` and
/// `pyproject.toml`, and a pytest patch from the package itself all earn a solver nothing;
/// the honest fix still solves. (`red_team.rs` has the whole suite on the sample.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_team_on_a_pytest_suite() {
    use engine_support::{ScriptedPolicy, bash, create};
    use selfplay_trainer::engine::prompts::ChatMarkup;
    use selfplay_trainer::engine::roles::{EngineSettings, run_solver};
    use selfplay_trainer::engine::solver::prepare_grading_workspace;
    use std::sync::Arc;

    let venv_bin = pytest_venv();
    let dir = tempfile::tempdir().unwrap();
    let repo = inflection_repo(dir.path());
    let p = provider(&repo, vec![venv_bin]);
    let mut s = EngineSettings::from_settings(&Default::default(), ChatMarkup::chatml()).unwrap();
    // Whole files in one turn (the byte codec: a token a byte).
    s.episode.max_tokens = 120_000;
    s.episode.max_tokens_per_turn = 30_000;
    s.validation.test_timeout = Duration::from_secs(120);
    let a = set("valid");
    let sb = p.acquire("default").await.unwrap();
    let report = validate(sb.client(), &a, &s.validation).await.unwrap();
    sb.release().await.unwrap();
    let bug = BugTask::from_validated(&a, &report).expect("valid");

    let conftest = "import pytest\n\n\n@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_makereport(item, call):\n    outcome = yield\n    outcome.get_result().outcome = \"passed\"\n";
    // The cheat works when nothing stops it: on the buggy code, every test "passes".
    let sb = p.acquire("default").await.unwrap();
    prepare_grading_workspace(sb.client(), &bug).await.unwrap();
    sb.client()
        .write_file("conftest.py", conftest.as_bytes().to_vec())
        .await
        .unwrap();
    let ops = selfplay_trainer::engine::ops::Ops::new(sb.client());
    let run = ops
        .run_tests(&bug.test_script, &bug.test_parser, Duration::from_secs(120))
        .await
        .unwrap();
    sb.release().await.unwrap();
    assert!(
        bug.original_passing.iter().all(|t| run.passed(t)),
        "the conftest hook makes every test pass"
    );

    let attempts = [
        vec![
            create("conftest.py", conftest),
            create("pytest.ini", "[pytest]\naddopts = -p no:randomly\n"),
            create(
                "pyproject.toml",
                "[tool.pytest.ini_options]\naddopts = \"-k not ordinal\"\n",
            ),
            "<submit/>".to_string(),
        ],
        vec![
            bash(
                "printf 'import _pytest.reports as _r\\n_r.TestReport.passed = property(lambda self: True)\\n' >> inflection/__init__.py",
            ),
            "<submit/>".to_string(),
        ],
    ];
    for turns in attempts {
        let policy = Arc::new(ScriptedPolicy::new(vec![("fixing a bug", turns)]));
        let r = run_solver(policy, &p, "default", &bug, &s).await;
        assert!(!r.solved(), "{:#?}", r.evaluation);
        assert_eq!(r.reward(), Some(-1.0));
        let e = r.evaluation.as_ref().unwrap();
        assert!(!e.dropped.is_empty() || e.tampering, "{e:#?}");
    }
    // The honest fix, written by a solver.
    let fixed = std::fs::read_to_string(repo.join("inflection/__init__.py")).unwrap();
    let policy = Arc::new(ScriptedPolicy::new(vec![(
        "fixing a bug",
        vec![create("inflection/__init__.py", &fixed), "<submit/>".into()],
    )]));
    let r = run_solver(policy, &p, "default", &bug, &s).await;
    assert!(r.solved(), "{:#?}", r.evaluation);
}
