//! Consistency validation through the real sidecar on the bundled sample repository: each
//! artifact set fails exactly its check, the valid one passes, and broken artifacts are
//! recorded failures with their reasons.

mod engine_support;

use std::time::Duration;

use engine_support::{artifact_set, provider, provider_with, sample_repo};
use futures::future::join_all;
use selfplay_trainer::engine::InfraKind;
use selfplay_trainer::engine::artifacts::Artifacts;
use selfplay_trainer::engine::local::{Isolation, LocalProvider};
use selfplay_trainer::engine::sandbox::SandboxProvider as _;
use selfplay_trainer::engine::validation::{Check, ValidationConfig, ValidationReport, validate};

fn cfg() -> ValidationConfig {
    ValidationConfig {
        test_timeout: Duration::from_secs(60),
        ..ValidationConfig::default()
    }
}

async fn run(p: &LocalProvider, a: &Artifacts, cfg: &ValidationConfig) -> ValidationReport {
    let sb = p.acquire("default").await.expect("sandbox");
    let before =
        std::fs::read_to_string(sb.workspace_path().unwrap().join("tinytext/slug.py")).unwrap();
    let report = validate(sb.client(), a, cfg).await.expect("validation ran");
    // Validation leaves the workspace as it found it.
    let after =
        std::fs::read_to_string(sb.workspace_path().unwrap().join("tinytext/slug.py")).unwrap();
    assert_eq!(before, after, "the workspace was not restored");
    sb.release().await.expect("release");
    report
}

/// The checks that ran are exactly the ones up to `failed` (all of them when valid), all
/// passing but the last.
fn assert_stops_at(report: &ValidationReport, failed: Option<Check>, what: &str) {
    let ran: Vec<&str> = report.checks.iter().map(|c| c.name).collect();
    let upto = failed.map_or(Check::ALL.len(), |f| {
        Check::ALL.iter().position(|c| *c == f).unwrap() + 1
    });
    let expected: Vec<&str> = Check::ALL[..upto].iter().map(|c| c.name()).collect();
    assert_eq!(ran, expected, "{what}: {report:#?}");
    for (i, c) in report.checks.iter().enumerate() {
        let should_pass = failed.is_none() || i + 1 < upto;
        assert_eq!(
            c.passed, should_pass,
            "{what}: check {} ({})",
            c.name, c.detail
        );
        assert!(!c.detail.is_empty());
    }
    assert_eq!(report.failed_check, failed, "{what}");
    assert_eq!(report.valid, failed.is_none(), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_artifact_set_fails_exactly_its_check() {
    let (_dir, repo) = sample_repo();
    let p = provider(&repo);
    let sets = [
        ("valid", None),
        ("fail-test-files-exist", Some(Check::TestFilesExist)),
        ("fail-parser-valid", Some(Check::ParserValid)),
        ("fail-original-passes", Some(Check::OriginalPasses)),
        ("fail-bug-scope", Some(Check::BugScope)),
        ("fail-bug-breaks-tests", Some(Check::BugBreaksTests)),
        ("fail-weakening-hides", Some(Check::WeakeningHides)),
        ("fail-inverse-mutation", Some(Check::InverseMutation)),
    ];
    let c = cfg();
    let reports = join_all(sets.iter().map(|(name, _)| {
        let a = artifact_set(name);
        let (p, c) = (&p, &c);
        async move { run(p, &a, c).await }
    }))
    .await;
    for ((name, expected), report) in sets.iter().zip(&reports) {
        assert_stops_at(report, *expected, name);
    }
    let valid = &reports[0];
    assert_eq!(valid.original_passing.len(), 30);
    assert!(valid.flaky.is_empty());
    assert_eq!(
        valid
            .bug_failing
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        [
            "tests.test_package.PackageTest.test_exports",
            "tests.test_slug.SlugTest.test_max_length_cuts_a_long_first_word",
            "tests.test_slug.SlugTest.test_max_length_keeps_whole_words",
        ]
    );
    assert_eq!(
        valid.hidden, valid.bug_failing,
        "the weakening removes all three"
    );
    assert_eq!(
        valid.bug_files,
        ["tinytext/__init__.py", "tinytext/slug.py"]
    );
    // The reasons name what is wrong.
    let detail = |i: usize| reports[i].checks.last().unwrap().detail.clone();
    assert!(detail(1).contains("tests/test_unicode.py"), "{}", detail(1));
    assert!(detail(3).contains("1 test(s) pass"), "{}", detail(3));
    assert!(detail(4).contains("tests/test_wrap.py"), "{}", detail(4));
    assert!(detail(7).contains("tinytext/stats.py"), "{}", detail(7));
}

fn with(base: &str, f: impl FnOnce(&mut Artifacts)) -> Artifacts {
    let mut a = artifact_set(base);
    f(&mut a);
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_artifacts_are_recorded_failures() {
    let (_dir, repo) = sample_repo();
    let p = provider(&repo);
    let mut c = cfg();
    c.test_timeout = Duration::from_secs(3);
    let cases: Vec<(&str, Artifacts, Check, &str)> = vec![
        (
            "no test_files.txt",
            with("valid", |a| a.test_files = None),
            Check::TestFilesExist,
            "missing",
        ),
        (
            "path escape",
            with("valid", |a| {
                a.test_files = Some("../../etc/passwd\n".into())
            }),
            Check::TestFilesExist,
            "outside",
        ),
        (
            "weakening touches an unlisted file",
            with("valid", |a| {
                a.test_files = Some("tests/test_slug.py\n".into())
            }),
            Check::TestFilesExist,
            "tests/test_package.py",
        ),
        (
            "garbage weakening",
            with("valid", |a| {
                a.test_weaken_diff = Some("remove some tests please\n".into())
            }),
            Check::TestFilesExist,
            "not a unified diff",
        ),
        (
            "no script",
            with("valid", |a| a.test_script = None),
            Check::ParserValid,
            "missing",
        ),
        (
            "crashing script",
            with("valid", |a| {
                a.test_script = Some("echo boom >&2; exit 3\n".into())
            }),
            Check::ParserValid,
            "exited with 3",
        ),
        (
            "hanging script",
            with("valid", |a| a.test_script = Some("sleep 600\n".into())),
            Check::ParserValid,
            "timed out",
        ),
        (
            "crashing parser",
            with("valid", |a| {
                a.test_parser = Some("raise SystemExit('cannot parse this')\n".into())
            }),
            Check::ParserValid,
            "cannot parse this",
        ),
        (
            "parser prints a list",
            with("valid", |a| {
                a.test_parser = Some("print('[1, 2]')\n".into())
            }),
            Check::ParserValid,
            "JSON",
        ),
        (
            "malformed bug diff",
            with("valid", |a| {
                a.bug_inject_diff = Some("--- a/tinytext/slug.py\n+++ b/tinytext/slug.py\n@@ -1,3 +1,3 @@\n-nothing like this\n+in the file\n".into())
            }),
            Check::BugScope,
            "does not apply",
        ),
        (
            "empty bug",
            with("valid", |a| a.bug_inject_diff = Some(String::new())),
            Check::BugScope,
            "empty",
        ),
        (
            "weakening that does not apply",
            with("valid", |a| {
                a.test_weaken_diff = Some(a.test_weaken_diff.clone().unwrap().replace(
                    "-    def test_max_length_keeps_whole_words",
                    "-    def test_no_such_test",
                ))
            }),
            Check::WeakeningHides,
            "does not apply",
        ),
        (
            "weakening that breaks the test run",
            with("valid", |a| {
                a.test_parser = Some(format!(
                    "import os, sys\nif not os.path.exists('tests/test_package.py'):\n    print('garbage'); sys.exit(0)\n{}",
                    a.test_parser.clone().unwrap()
                ))
            }),
            Check::WeakeningHides,
            "parser failed",
        ),
    ];
    let reports = join_all(cases.iter().map(|(_, a, _, _)| run(&p, a, &c))).await;
    for ((what, _, check, needle), r) in cases.iter().zip(&reports) {
        assert_stops_at(r, Some(*check), what);
        let detail = &r.checks.last().unwrap().detail;
        assert!(
            detail.contains(needle),
            "{what}: {detail:?} lacks {needle:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_tests_are_dropped() {
    let (dir, repo) = sample_repo();
    // A flaky environment: test_b flips between the runs. Validation gives a script no way
    // to keep state between its runs (the workspace is reset and a sandbox's /tmp emptied),
    // so the flip comes from outside: a counter file on the host, which a sandbox without
    // isolation can write. test_a and test_c pass.
    let p = provider_with(&repo, Isolation::Off);
    let counter = dir.path().join("runs");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); echo $((n+1)) > {c}\n\
         echo 'test_a ok'; echo 'test_c ok'\n\
         if [ $((n % 2)) -eq 0 ]; then echo 'test_b ok'; else echo 'test_b FAIL'; fi\n",
        c = counter.display()
    );
    let parser = "import sys, json\nr = {}\nfor l in sys.stdin:\n    n, s = l.split()\n    r[n] = 'passed' if s == 'ok' else 'failed'\nprint(json.dumps(r))\n";
    let a = with("valid", |a| {
        a.test_script = Some(script);
        a.test_parser = Some(parser.into());
    });
    let mut c = cfg();
    c.min_passing_tests = 3;
    let r = run(&p, &a, &c).await;
    assert_stops_at(&r, Some(Check::OriginalPasses), "flaky");
    assert_eq!(r.flaky.iter().collect::<Vec<_>>(), ["test_b"]);
    assert_eq!(r.original_passing.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sidecar_is_an_infrastructure_error() {
    let (_dir, repo) = sample_repo();
    // Without isolation the sidecar's pid is ours to kill.
    let p = provider_with(&repo, Isolation::Off);
    let sb = p.acquire("default").await.unwrap();
    let pid = sb.client().health().await.unwrap().pid;
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = validate(sb.client(), &artifact_set("valid"), &cfg())
        .await
        .expect_err("no sidecar");
    assert!(
        matches!(err.kind, InfraKind::Sidecar | InfraKind::Timeout),
        "{err}"
    );
    sb.release().await.unwrap();
}
