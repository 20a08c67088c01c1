//! `trainer export` end to end: a scripted one-step `trainer local` run on the sample
//! repository whose two injectors write the same valid bug, exported (one instance, the
//! observed solve rate, FAIL_TO_PASS from validation), then evaluated as it was written:
//! the fix solves it, giving up does not, and the CLI loads the file unchanged.

mod engine_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use engine_support::{ScriptedPolicy, bash, create};
use selfplay_trainer::engine::local::{Isolation, LocalProvider, LocalProviderConfig};
use selfplay_trainer::engine::policy::{
    FinishReason, Generation, Policy, PolicyError, SamplingParams, TokenCodec,
};
use selfplay_trainer::engine::prompts::{ChatMarkup, PromptSet};
use selfplay_trainer::engine::roles::EngineSettings;
use selfplay_trainer::eval::export::export_run;
use selfplay_trainer::eval::instance::to_jsonl;
use selfplay_trainer::eval::{
    EvalOptions, EvalTask, Outcome, SharedAttempts, Silent, TestHarness, evaluate, load_instances,
};
use selfplay_trainer::policy::CandlePolicy;
use selfplay_trainer::train::driver::PolicyView;
use selfplay_trainer::train::local::{LocalOptions, run_local};

const ARTIFACTS: [&str; 5] = [
    "bug_inject.diff",
    "test_weaken.diff",
    "test_files.txt",
    "test_script.sh",
    "test_parser.py",
];

fn artifact(name: &str) -> String {
    engine_support::read_asset(&format!("artifacts/valid/{name}"))
}

/// Injectors write the sample's valid bug (both the same); solvers alternate between the
/// fix and giving up. Every turn starts with a tag naming the episode's plan and turn.
struct Scripted {
    model: Arc<CandlePolicy>,
    solvers: AtomicUsize,
}

impl Scripted {
    fn turn(&self, text: &str) -> String {
        let taken = text.matches("# turn ").count();
        let injector = text.contains("bug_inject.diff");
        let fixes = if injector {
            false
        } else if let Some(i) = text.find("# plan: ") {
            text[i..].starts_with("# plan: fix")
        } else {
            self.solvers
                .fetch_add(1, Ordering::SeqCst)
                .is_multiple_of(2)
        };
        let plan = if injector {
            "bug"
        } else if fixes {
            "fix"
        } else {
            "give-up"
        };
        let call = match (plan, taken) {
            ("bug", n) if n < ARTIFACTS.len() => create(
                &format!(".selfplay/{}", ARTIFACTS[n]),
                &artifact(ARTIFACTS[n]),
            ),
            ("fix", 0) => create("fix.diff", &artifact("bug_inject.diff")),
            ("fix", 1) => bash("git apply -R fix.diff && rm fix.diff"),
            _ => "<submit/>".to_string(),
        };
        format!("# plan: {plan}\n# turn {taken}\n{call}")
    }
}

impl Policy for Scripted {
    fn codec(&self) -> &dyn TokenCodec {
        self.model.codec()
    }

    fn generate(
        &self,
        contexts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> Result<Vec<Generation>, PolicyError> {
        let mut out = Vec::new();
        for ctx in contexts {
            let text = self.codec().decode(ctx);
            let mut tokens = self.codec().encode(&self.turn(&text));
            tokens.truncate(params.max_new_tokens);
            // The model's own log-probs of the scripted tokens, so the update is on-policy.
            let mut seq = ctx.clone();
            seq.extend_from_slice(&tokens);
            let scores = self
                .model
                .score(&[seq])
                .map_err(|e| PolicyError::Failed(e.to_string()))?;
            let lps = &scores[0].logprobs;
            out.push(Generation {
                logprobs: lps[lps.len() - tokens.len()..].to_vec(),
                tokens,
                finish: FinishReason::Stop,
            });
        }
        Ok(out)
    }

    fn version(&self) -> u64 {
        self.model.version()
    }
}

fn run_file(dir: &Path) -> PathBuf {
    let bundle = engine_support::assets().join("sample-repo.bundle");
    let text = include_str!("../assets/default-run.yaml")
        .replace(
            "localPath: sample-repo.bundle",
            &format!("localPath: {}", bundle.display()),
        )
        .replace("    maxTurns: 4", "    maxTurns: 8")
        .replace("    maxTokens: 6144", "    maxTokens: 16384")
        .replace("    maxTokensPerTurn: 128", "    maxTokensPerTurn: 2048");
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write run");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_bugs_export_once_each_and_evaluate_as_written() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let out = dir.path().join("out");
    let view: PolicyView = Arc::new(|model: Arc<CandlePolicy>| {
        Arc::new(Scripted {
            model,
            solvers: AtomicUsize::new(0),
        }) as Arc<dyn Policy>
    });
    let opts = LocalOptions {
        spec: Some(run_file(dir.path())),
        steps: Some(1),
        out: Some(out.clone()),
        resume: false,
        metrics_listen: None,
        isolation: Isolation::Auto,
        progress: false,
    };
    let outcome = run_local(opts, Some(view)).await.expect("local run");
    assert_eq!(outcome.steps_done, 1);

    // Two valid bugs, the same diff: one instance, with both groups' solve rate.
    let export = export_run(&out, "e2e", &PromptSet::default()).expect("export");
    assert_eq!(export.valid_bugs, 2);
    assert_eq!(export.without_validation, 0);
    assert_eq!(export.instances.len(), 1);
    let inst = &export.instances[0];
    let sp = inst.selfplay.as_ref().expect("selfplay fields");
    assert_eq!(sp.solver_attempts, Some(4));
    assert_eq!(sp.solve_rate, Some(0.5));
    assert_eq!(
        sp.bug_patch.as_deref(),
        Some(artifact("bug_inject.diff").as_str())
    );
    // FAIL_TO_PASS: the original tests the bug breaks (validation measured them).
    assert_eq!(
        inst.fail_to_pass,
        vec![
            "tests.test_package.PackageTest.test_exports".to_string(),
            "tests.test_slug.SlugTest.test_max_length_cuts_a_long_first_word".to_string(),
            "tests.test_slug.SlugTest.test_max_length_keeps_whole_words".to_string(),
        ]
    );
    assert!(inst.pass_to_pass.len() >= 20, "{:?}", inst.pass_to_pass);
    assert!(
        inst.pass_to_pass
            .iter()
            .all(|t| !inst.fail_to_pass.contains(t))
    );
    // The statement is the solvers' task: the hidden tests as a diff to restore.
    assert!(
        inst.problem_statement
            .contains("test_max_length_keeps_whole_words")
    );
    assert!(inst.problem_statement.contains("```diff"));
    assert_eq!(
        inst.test_patch,
        selfplay_trainer::engine::diffs::reverse_diff(&artifact("test_weaken.diff"))
            .expect("reverse")
    );
    let head = std::process::Command::new("git")
        .arg("-C")
        .arg(out.join("repos/sample"))
        .args(["rev-parse", "HEAD"])
        .output()
        .expect("git");
    assert_eq!(
        inst.base_commit.as_deref(),
        Some(String::from_utf8_lossy(&head.stdout).trim())
    );

    // The CLI writes the same file.
    let file = dir.path().join("bugs.jsonl");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["export", "--format", "swe-bench", "--name", "e2e", "--run"])
        .arg(&out)
        .arg("--out")
        .arg(&file)
        .status()
        .expect("trainer export");
    assert!(status.success());
    let written = std::fs::read_to_string(&file).expect("exported file");
    assert_eq!(written, to_jsonl(&export.instances).expect("jsonl"));

    // Loaded back unchanged and evaluated on the run's own repository clone: the bug's
    // fix solves it, giving up does not.
    let loaded = load_instances(&file).expect("load");
    assert_eq!(loaded, export.instances);
    let task =
        EvalTask::from_instance(&loaded[0], &TestHarness::default(), "default").expect("task");
    let mut cfg = LocalProviderConfig::single(out.join("repos/sample"));
    cfg.isolation = Isolation::Auto;
    let provider = LocalProvider::new(cfg).expect("provider");
    let mut engine =
        EngineSettings::from_settings(&Default::default(), ChatMarkup::plain()).unwrap();
    engine.episode.max_tokens_per_turn = 4096;
    engine.episode.max_tokens = 65536;
    let opts = EvalOptions {
        attempts: 2,
        k: 1,
        seed: 0,
        concurrency: 1,
        engine,
    };
    let fixer = ScriptedPolicy::single(vec![
        create("fix.diff", &artifact("bug_inject.diff")),
        bash("git apply -R fix.diff && rm fix.diff"),
        "<submit/>".into(),
    ]);
    let report = evaluate(
        &SharedAttempts(Arc::new(fixer)),
        &provider,
        std::slice::from_ref(&task),
        &opts,
        &Silent,
    )
    .await
    .expect("evaluation");
    let outcomes: Vec<Outcome> = report.tasks[0].outcomes.iter().map(|a| a.outcome).collect();
    // The script's turns are used up by the first attempt; the second submits at once.
    assert_eq!(outcomes, vec![Outcome::Solved, Outcome::Unsolved]);
    assert_eq!(report.tasks[0].outcomes[1].failing, inst.fail_to_pass);

    // The CLI evaluates the exported file as it is (the tiny model; it solves nothing).
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["eval", "--json", "--tasks"])
        .arg(&file)
        .arg("--repo")
        .arg(engine_support::assets().join("sample-repo.bundle"))
        .output()
        .expect("trainer eval");
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&cli.stdout).expect("json");
    assert_eq!(r["attempts"], 1, "{r}");
    assert_eq!(r["infra_errors"], 0, "{r}");
}
