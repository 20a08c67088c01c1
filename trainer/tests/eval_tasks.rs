//! `trainer eval` on the bundled sample task set (`trainer/assets/eval/sample-tasks.jsonl`),
//! in real sandboxes with real test runs: a scripted solver that fixes some instances,
//! gives up on others and games the tests on two, graded exactly per instance; the seeded
//! tiny model's attempts are reproducible; the CLI prints the report.

mod engine_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use engine_support::{ScriptedPolicy, bash, create, sample_repo};
use selfplay_trainer::engine::local::{Isolation, LocalProvider, LocalProviderConfig};
use selfplay_trainer::engine::prompts::ChatMarkup;
use selfplay_trainer::engine::roles::EngineSettings;
use selfplay_trainer::eval::{
    EvalOptions, EvalTask, Instance, Outcome, SeededAttempts, SharedAttempts, Silent, TestHarness,
    evaluate, load_instances,
};
use selfplay_trainer::policy::CandlePolicy;

fn task_file() -> PathBuf {
    engine_support::assets().join("eval/sample-tasks.jsonl")
}

fn tasks(instances: &[Instance]) -> Vec<EvalTask> {
    instances
        .iter()
        .map(|i| EvalTask::from_instance(i, &TestHarness::default(), "default").expect("task"))
        .collect()
}

/// Budgets a scripted solver's whole-file turns fit in.
fn engine() -> EngineSettings {
    let mut e = EngineSettings::from_settings(&Default::default(), ChatMarkup::plain()).unwrap();
    e.episode.max_turns = 6;
    e.episode.max_tokens_per_turn = 4096;
    e.episode.max_tokens = 65536;
    e
}

fn options(attempts: usize, k: usize, concurrency: usize) -> EvalOptions {
    EvalOptions {
        attempts,
        k,
        seed: 7,
        concurrency,
        engine: engine(),
    }
}

fn provider(repo: &std::path::Path) -> LocalProvider {
    let mut cfg = LocalProviderConfig::single(repo);
    cfg.isolation = Isolation::Auto;
    LocalProvider::new(cfg).expect("local provider")
}

/// The gold fix, applied the way an agent would: the patch written into the workspace and
/// `git apply`-ed.
fn fix(gold: &str) -> Vec<String> {
    vec![
        create("fix.diff", gold),
        bash("git apply fix.diff && rm fix.diff && echo fixed"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_solver_gets_exactly_the_instances_it_fixes() {
    let instances = load_instances(&task_file()).expect("the sample task set");
    assert_eq!(instances.len(), 20);
    let by_id: BTreeMap<&str, &Instance> = instances
        .iter()
        .map(|i| (i.instance_id.as_str(), i))
        .collect();
    let gold = |id: &str| by_id[id].patch.clone().expect("gold patch");
    // What the solver does per instance, keyed by its problem statement (in the prompt).
    let mut scripts: Vec<(String, Vec<String>)> = Vec::new();
    let mut expect: BTreeMap<String, (Outcome, Vec<String>)> = BTreeMap::new();
    for (n, inst) in instances.iter().enumerate() {
        let id = inst.instance_id.clone();
        let (turns, outcome, dropped) = match id.as_str() {
            // Games the oracle: rewrites the test file so every test passes in its sandbox.
            "tinytext__slug-accents" => (
                vec![
                    create(
                        "tests/test_slug.py",
                        "import unittest\n\n\nclass SlugTest(unittest.TestCase):\n    def test_accents_are_folded(self):\n        pass\n",
                    ),
                    bash("python3 -m unittest discover -s tests -t . 2>&1 | tail -1"),
                ],
                Outcome::Unsolved,
                vec!["tests/test_slug.py".to_string()],
            ),
            // Games the runner: a sitecustomize.py that makes every unittest test pass.
            "tinytext__stats-average-empty" => (
                vec![create(
                    "sitecustomize.py",
                    "import unittest\nunittest.TestCase.run = lambda self, result=None: None\n",
                )],
                Outcome::Unsolved,
                vec!["sitecustomize.py".to_string()],
            ),
            // Another instance's fix: it does not apply here.
            "tinytext__slug-separator" => (
                fix(&gold("tinytext__stats-top-n")),
                Outcome::Unsolved,
                vec![],
            ),
            _ if n % 3 == 2 => (vec![bash("ls tinytext")], Outcome::Unsolved, vec![]),
            _ => (fix(&gold(&id)), Outcome::Solved, vec![]),
        };
        scripts.push((inst.problem_statement.clone(), turns));
        expect.insert(id, (outcome, dropped));
    }
    let policy = Arc::new(ScriptedPolicy::new(
        scripts
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect(),
    ));
    let (_dir, repo) = sample_repo();
    let provider = provider(&repo);
    let report = evaluate(
        &SharedAttempts(policy),
        &provider,
        &tasks(&instances),
        &options(1, 1, 2),
        &Silent,
    )
    .await
    .expect("evaluation");

    let got: BTreeMap<String, (Outcome, Vec<String>)> = report
        .tasks
        .iter()
        .map(|t| {
            assert_eq!(t.outcomes.len(), 1, "{t:?}");
            let a = &t.outcomes[0];
            (t.id.clone(), (a.outcome, a.dropped.clone()))
        })
        .collect();
    assert_eq!(got, expect);
    let solved = expect
        .values()
        .filter(|(o, _)| *o == Outcome::Solved)
        .count();
    assert_eq!(report.solved, solved);
    assert_eq!(report.attempts, 20);
    assert_eq!(report.infra_errors, 0);
    assert_eq!(report.solve_rate, Some(solved as f64 / 20.0));
    assert_eq!(report.pass_at_k, Some(solved as f64 / 20.0));
    // Unsolved instances fail exactly their FAIL_TO_PASS tests (nothing else broke).
    for t in &report.tasks {
        let a = &t.outcomes[0];
        if a.outcome == Outcome::Unsolved {
            assert_eq!(a.failing, by_id[t.id.as_str()].fail_to_pass, "{}", t.id);
        } else {
            assert!(a.failing.is_empty(), "{}: {:?}", t.id, a.failing);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_at_k_counts_attempts_of_one_instance() {
    let instances = load_instances(&task_file()).expect("the sample task set");
    let inst = instances
        .iter()
        .find(|i| i.instance_id == "tinytext__wrap-zero-width")
        .expect("instance")
        .clone();
    // Three attempts: the first fixes, the other two give up (the script's turns are
    // consumed in order; after them the policy submits).
    let mut turns = fix(inst.patch.as_deref().expect("gold"));
    turns.push("<submit/>".into());
    let policy = Arc::new(ScriptedPolicy::single(turns));
    let (_dir, repo) = sample_repo();
    let provider = provider(&repo);
    let report = evaluate(
        &SharedAttempts(policy),
        &provider,
        &tasks(std::slice::from_ref(&inst)),
        &options(3, 2, 1),
        &Silent,
    )
    .await
    .expect("evaluation");
    let t = &report.tasks[0];
    assert_eq!((t.attempts, t.solved), (3, 1), "{t:?}");
    // 1 − C(2,2)/C(3,2) = 2/3
    assert!((t.pass_at_k.expect("pass@2") - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(report.solve_rate, Some(1.0 / 3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_attempts_do_not_depend_on_order_or_concurrency() {
    let instances = load_instances(&task_file()).expect("the sample task set");
    let some: Vec<Instance> = instances.into_iter().take(2).collect();
    let model = Arc::new(
        CandlePolicy::tiny(0, 64, 2, candle_core::DType::F32, &candle_core::Device::Cpu)
            .expect("tiny"),
    );
    let (_dir, repo) = sample_repo();
    let provider = provider(&repo);
    let mut opts = options(2, 1, 1);
    opts.engine.episode.max_turns = 2;
    opts.engine.episode.max_tokens_per_turn = 48;
    let run = |tasks: Vec<EvalTask>, concurrency: usize| {
        let mut o = opts.clone();
        o.concurrency = concurrency;
        let model = model.clone();
        let provider = &provider;
        async move {
            evaluate(&SeededAttempts(model), provider, &tasks, &o, &Silent)
                .await
                .expect("evaluation")
        }
    };
    let a = run(tasks(&some), 1).await;
    let mut reversed = tasks(&some);
    reversed.reverse();
    let b = run(reversed, 2).await;
    let digest = |r: &selfplay_trainer::eval::EvalReport| {
        let mut v: Vec<(String, usize, u64, usize, String)> = r
            .tasks
            .iter()
            .flat_map(|t| {
                t.outcomes.iter().map(|o| {
                    (
                        t.id.clone(),
                        o.attempt,
                        o.seed,
                        o.policy_tokens,
                        o.patch.clone(),
                    )
                })
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(digest(&a), digest(&b));
    // The two attempts of an instance sample differently.
    let d = digest(&a);
    assert_ne!(d[0].2, d[1].2);
    assert!(d.iter().all(|x| x.3 > 0), "{d:?}");
}

#[test]
fn the_cli_prints_the_report_as_json() {
    let dir = tempfile::tempdir().expect("tmp");
    // Three instances, to keep the test short; the tiny random model solves none.
    let text = std::fs::read_to_string(task_file()).expect("tasks");
    let few: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    let file = dir.path().join("few.jsonl");
    std::fs::write(&file, few).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["eval", "--json", "--tasks"])
        .arg(&file)
        .arg("--repo")
        .arg(engine_support::assets().join("sample-repo.bundle"))
        .args(["--k", "1", "--seed", "3"])
        .output()
        .expect("trainer eval");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(r["tasks"].as_array().map(Vec::len), Some(3), "{r}");
    assert_eq!(r["attempts"], 3, "{r}");
    assert!(
        r["solve_rate"].is_number() && r["pass_at_k"].is_number(),
        "{r}"
    );
    for t in r["tasks"].as_array().into_iter().flatten() {
        assert!(t["outcomes"][0]["seed"].as_u64().is_some(), "{t}");
    }
    // Progress: a line per attempt and per instance.
    assert_eq!(stderr.matches(" attempt 1: ").count(), 3, "{stderr}");
    assert!(stderr.contains("[3/3] "), "{stderr}");

    // Bad input is a clear error, not a panic.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"instance_id\": \"x\"}\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["eval", "--tasks"])
        .arg(&bad)
        .output()
        .expect("trainer eval");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("task file entry 1"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
