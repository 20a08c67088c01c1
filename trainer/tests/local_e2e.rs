//! `trainer local` end to end on the embedded default (the bundled sample repository, the
//! tiny seeded model), in real sandboxes (sidecar processes, bubblewrap where it works).
//!
//! The policy that samples is scripted — a random tiny model writes no valid artifacts —
//! but every token it writes is scored by the tiny model, so the GRPO update trains the
//! real model on them with true old log-probs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use selfplay_trainer::engine::local::Isolation;
use selfplay_trainer::engine::policy::{
    FinishReason, Generation, Policy, PolicyError, SamplingParams, TokenCodec,
};
use selfplay_trainer::engine::prompts::ChatMarkup;
use selfplay_trainer::grpo::{GrpoSettings, GrpoTrainer};
use selfplay_trainer::policy::{ByteCodec, CandlePolicy};
use selfplay_trainer::sft::{LoadOptions, load_dataset};
use selfplay_trainer::train::driver::PolicyView;
use selfplay_trainer::train::local::{LocalOptions, run_local};

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// The valid artifact set the scripted injector writes, file by file, through the
/// sandbox's own API (`<create>` tool calls are the sidecar's file writes): a sandbox sees
/// nothing of the host but its system and toolchain directories.
fn artifacts() -> Vec<(&'static str, String)> {
    [
        "bug_inject.diff",
        "test_weaken.diff",
        "test_files.txt",
        "test_script.sh",
        "test_parser.py",
    ]
    .into_iter()
    .map(|f| {
        let text =
            std::fs::read_to_string(assets().join("artifacts/valid").join(f)).expect("artifact");
        (f, text)
    })
    .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plan {
    /// Writes the valid artifact set, then submits.
    ValidBug,
    /// Submits without artifacts (validation fails: −1).
    NoBug,
    /// Its sandbox is killed from outside before it acts, then it submits: a failure the
    /// agent could not have caused (masked, retried on a fresh sandbox).
    KilledFromOutside,
    /// Reverts the bug, then submits (solved).
    Fix,
    /// Submits without a change (not solved).
    GiveUp,
}

const PLANS: [(&str, Plan); 5] = [
    ("valid-bug", Plan::ValidBug),
    ("no-bug", Plan::NoBug),
    ("killed-from-outside", Plan::KilledFromOutside),
    ("fix", Plan::Fix),
    ("give-up", Plan::GiveUp),
];

struct Scripted {
    model: Arc<CandlePolicy>,
    /// The run's output directory (its sandboxes' sidecars name it on their command line).
    out: PathBuf,
    injectors: Arc<AtomicUsize>,
    solvers: Arc<AtomicUsize>,
    kill_first: bool,
}

impl Scripted {
    /// The plan of an episode and how many turns it has taken: each turn of this policy
    /// starts with `# plan: NAME`.
    fn plan_for(&self, text: &str) -> (Plan, usize) {
        let taken = text.matches("# plan: ").count();
        if let Some(i) = text.find("# plan: ") {
            let rest = &text[i + "# plan: ".len()..];
            for (name, plan) in PLANS {
                if rest.starts_with(name) && rest[name.len()..].starts_with('\n') {
                    return (plan, taken);
                }
            }
        }
        let plan = if text.contains("bug_inject.diff") {
            let n = self.injectors.fetch_add(1, Ordering::SeqCst);
            match (self.kill_first, n) {
                (true, 0) => Plan::KilledFromOutside,
                (true, _) => Plan::ValidBug,
                (false, n) if n.is_multiple_of(2) => Plan::ValidBug,
                _ => Plan::NoBug,
            }
        } else if self
            .solvers
            .fetch_add(1, Ordering::SeqCst)
            .is_multiple_of(2)
        {
            Plan::Fix
        } else {
            Plan::GiveUp
        };
        (plan, 0)
    }

    fn turn(&self, plan: Plan, taken: usize) -> String {
        let name = PLANS
            .iter()
            .find(|(_, p)| *p == plan)
            .map_or("?", |(n, _)| n);
        let tag = format!("# plan: {name}\n");
        let files = artifacts();
        let call = match (plan, taken) {
            (Plan::ValidBug, n) if n < files.len() => {
                let (f, text) = &files[n];
                format!("<create path=\".selfplay/{f}\">\n{text}</create>")
            }
            (Plan::NoBug | Plan::GiveUp, 0) => "<bash>\nls\n</bash>".into(),
            (Plan::KilledFromOutside, 0) => {
                kill_sandboxes(&self.out);
                "<submit/>".into()
            }
            (Plan::Fix, 0) => {
                let (_, bug) = &files[0];
                format!("<create path=\"fix.diff\">\n{bug}</create>")
            }
            (Plan::Fix, 1) => {
                "<bash>\ngit apply -R fix.diff && rm fix.diff && echo fixed\n</bash>".into()
            }
            _ => "<submit/>".into(),
        };
        format!("{tag}{call}")
    }
}

/// Kills, from outside, the sidecars of the run's live sandboxes (as a node failure would).
fn kill_sandboxes(out: &Path) {
    let needle = out.join("sandboxes").to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) && cmd.contains(" serve ") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
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
            let (plan, taken) = self.plan_for(&text);
            let mut tokens = self.codec().encode(&self.turn(plan, taken));
            tokens.truncate(params.max_new_tokens);
            // The model's own log-probs of the scripted tokens: an on-policy update.
            let mut seq = ctx.clone();
            seq.extend_from_slice(&tokens);
            let scores = self
                .model
                .score(&[seq])
                .map_err(|e| PolicyError::Failed(e.to_string()))?;
            let lps = &scores[0].logprobs;
            let logprobs = lps[lps.len() - tokens.len()..].to_vec();
            out.push(Generation {
                tokens,
                logprobs,
                finish: FinishReason::Stop,
            });
        }
        Ok(out)
    }

    fn version(&self) -> u64 {
        self.model.version()
    }
}

/// The default run with budgets the scripted policy's turns fit in (it writes whole files).
fn run_file(dir: &Path, extra: &str) -> PathBuf {
    let text = include_str!("../assets/default-run.yaml")
        .replace(
            "localPath: sample-repo.bundle",
            &format!(
                "localPath: {}",
                assets().join("sample-repo.bundle").display()
            ),
        )
        .replace("    maxTurns: 4", "    maxTurns: 8")
        .replace("    maxTokens: 6144", "    maxTokens: 16384")
        .replace(
            "    maxTokensPerTurn: 128",
            &format!("    maxTokensPerTurn: 2048{extra}"),
        );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write run");
    path
}

fn view(out: PathBuf, kill_first: bool) -> (PolicyView, Arc<AtomicUsize>) {
    let injectors = Arc::new(AtomicUsize::new(0));
    let inj = injectors.clone();
    let view: PolicyView = Arc::new(move |model: Arc<CandlePolicy>| {
        Arc::new(Scripted {
            model,
            out: out.clone(),
            injectors: inj.clone(),
            solvers: Arc::new(AtomicUsize::new(0)),
            kill_first,
        }) as Arc<dyn Policy>
    });
    (view, injectors)
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("safetensors")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_full_step_trains_and_checkpoints() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let out = dir.path().join("out");
    let (view, injectors) = view(out.clone(), false);
    let opts = LocalOptions {
        spec: Some(run_file(dir.path(), "")),
        steps: Some(1),
        out: Some(out.clone()),
        resume: false,
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        isolation: Isolation::Auto,
        progress: false,
    };
    let outcome = run_local(opts, Some(view)).await.expect("local run");
    assert_eq!(outcome.steps_done, 1);
    assert_eq!(injectors.load(Ordering::SeqCst), 2, "two injector episodes");

    // status.json: the custom resource's progress snapshot.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("status.json")).expect("status.json"))
            .expect("json");
    assert_eq!(status["step"], 1, "{status}");
    assert_eq!(status["injectorValidityRate"], 0.5, "{status}");
    assert_eq!(status["solveRate"], 0.5, "{status}");
    assert_eq!(status["policyVersion"], 1, "{status}");

    // Episodes ran in real sandboxes: real validation, real grading.
    let records =
        std::fs::read_to_string(out.join("episodes/step-000001/episodes.jsonl")).expect("records");
    let records: Vec<serde_json::Value> = records
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    assert_eq!(records.len(), 4, "2 injectors + 2 solvers");
    let valid = records
        .iter()
        .find(|r| r["injector"]["valid"] == true)
        .expect("a valid bug");
    assert!(
        (valid["reward"].as_f64().expect("reward") - 0.1).abs() < 1e-9,
        "1 − 1.8·0.5: {valid}"
    );
    let invalid = records
        .iter()
        .find(|r| r["injector"]["valid"] == false)
        .expect("an invalid bug");
    assert_eq!(invalid["injector"]["failed_check"], "test_files_exist");
    assert_eq!(invalid["reward"], -1.0);
    let solved: Vec<bool> = records
        .iter()
        .filter(|r| r["role"] == "solver")
        .map(|r| r["solver"]["solved"] == true)
        .collect();
    assert_eq!(
        solved.iter().filter(|s| **s).count(),
        1,
        "one solver fixed the bug: {solved:?}"
    );

    // Rejection-sampling fine-tuning reads the run's directory: exactly the solved solver
    // episode, replayed token for token with the policy's tokens as the loss mask.
    let data = load_dataset(
        &out,
        &ByteCodec,
        &ChatMarkup::chatml(),
        &LoadOptions {
            solved_only: true,
            max_tokens: 1 << 20,
            context: 1 << 20,
            vocab_size: ByteCodec::VOCAB_SIZE,
        },
    )
    .expect("the run's episodes as fine-tuning data");
    assert_eq!((data.episode_records, data.examples.len()), (4, 1));
    let winner = records
        .iter()
        .find(|r| r["solver"]["solved"] == true)
        .expect("solved");
    let replay = &data.examples[0];
    assert_eq!(
        replay.policy_tokens() as u64,
        winner["policy_tokens"].as_u64().expect("count")
    );
    let trained: Vec<u32> = replay
        .tokens
        .iter()
        .zip(&replay.mask)
        .filter(|(_, m)| **m)
        .map(|(t, _)| *t)
        .collect();
    let first_turn = winner["transcript"][0].as_str().expect("turn");
    assert!(
        first_turn.ends_with("…[cut]") || ByteCodec.decode(&trained).starts_with(first_turn),
        "{first_turn}"
    );

    // A checkpoint, and the update changed the weights.
    let ckpt = out.join("checkpoints/step-1");
    assert!(ckpt.join("model.safetensors").is_file() && ckpt.join("loop_state.json").is_file());
    let initial = dir.path().join("initial");
    let policy = CandlePolicy::tiny(0, 64, 2, DType::F32, &Device::Cpu).expect("tiny");
    GrpoTrainer::new(Arc::new(policy), GrpoSettings::default())
        .expect("trainer")
        .save_checkpoint(&initial)
        .expect("save initial");
    let (before, after) = (
        tensors(&initial.join("model.safetensors")),
        tensors(&ckpt.join("model.safetensors")),
    );
    assert_eq!(before.len(), after.len());
    let changed = before
        .iter()
        .filter(|(name, t)| {
            let d = (*t - &after[*name])
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            d > 0.0
        })
        .count();
    assert!(
        changed > before.len() / 2,
        "the update changed {changed} of {} tensors",
        before.len()
    );

    // The curves: one TensorBoard event file in the run's directory, grown by the step's
    // summary past its file-version record (tensorboard_events.rs has TensorBoard read one).
    let events = event_files(&out);
    assert_eq!(events.len(), 1, "{events:?}");
    let size = std::fs::metadata(&events[0]).expect("event file").len();
    assert!(size > 100, "{} holds {size} bytes", events[0].display());

    // The metrics endpoint served while it ran.
    let addr = outcome.metrics_addr.expect("metrics addr");
    let body = reqwest_get(addr).await;
    assert!(
        body.contains("selfplay_trainer_step{run=\"local-default\"} 1"),
        "{body}"
    );
}

/// A sandbox killed from outside before its agent acted is a failure the agent could not
/// have caused: masked (never −1), counted, and the episode retried on a fresh sandbox. (An
/// agent that kills its own sandbox earns the failing reward: `red_team.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_killed_from_outside_is_masked_and_the_step_completes() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let out = dir.path().join("out");
    let (view, injectors) = view(out.clone(), true);
    let opts = LocalOptions {
        spec: Some(run_file(dir.path(), "")),
        steps: Some(1),
        out: Some(out.clone()),
        resume: false,
        metrics_listen: None,
        isolation: Isolation::Auto,
        progress: false,
    };
    let outcome = run_local(opts, Some(view))
        .await
        .expect("the step completes");
    assert_eq!(outcome.steps_done, 1);
    assert_eq!(
        injectors.load(Ordering::SeqCst),
        3,
        "the killed episode was retried on a fresh sandbox"
    );
    let summary = &outcome.summaries[0];
    assert_eq!(summary.snapshot.sandbox_errors, 1, "the error is counted");
    let records =
        std::fs::read_to_string(out.join("episodes/step-000001/episodes.jsonl")).expect("records");
    let first: serde_json::Value = serde_json::from_str(
        records
            .lines()
            .find(|l| l.contains("\"injector\""))
            .expect("injector"),
    )
    .expect("json");
    assert_eq!(
        first["infra_errors"].as_array().map(Vec::len),
        Some(1),
        "{first}"
    );
    // Never a −1 for the sandbox's death: the retry's own result stands.
    assert_eq!(first["injector"]["valid"], true, "{first}");
    assert_eq!(summary.snapshot.injector_validity_rate, Some(1.0));
}

async fn reqwest_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_continues_from_the_latest_checkpoint() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let out = dir.path().join("out");
    let spec = run_file(dir.path(), "");
    let opts = |steps, resume| LocalOptions {
        spec: Some(spec.clone()),
        steps: Some(steps),
        out: Some(out.clone()),
        resume,
        metrics_listen: None,
        isolation: Isolation::Auto,
        progress: false,
    };
    let first = run_local(opts(1, false), Some(view(out.clone(), false).0))
        .await
        .expect("step 1");
    assert_eq!(first.steps_done, 1);
    let second = run_local(opts(2, true), Some(view(out.clone(), false).0))
        .await
        .expect("resumed");
    assert_eq!(second.steps_done, 2);
    assert_eq!(second.summaries.len(), 1, "only step 2 ran");
    assert_eq!(second.summaries[0].snapshot.step, 2);
    assert_eq!(
        second.summaries[0].snapshot.policy_version, 2,
        "the policy version carried over"
    );
    assert!(out.join("checkpoints/step-2/model.safetensors").is_file());
    assert!(
        out.join("checkpoints/step-1").is_dir(),
        "keepLast 2 keeps step 1"
    );
}

/// TensorBoard event files directly in `dir`.
fn event_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("out dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
        })
        .collect()
}

/// Processes whose command line mentions `needle` (the sidecars of a run's sandboxes name
/// their workspace, which lives under the run's output directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && !cmd.contains("local_e2e") {
            found.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn ctrl_c_abandons_the_step_keeps_the_checkpoint_and_leaves_no_process() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let out = dir.path().join("out");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["local", "--steps", "5", "--no-metrics", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("trainer local");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !out.join("checkpoints/step-1/loop_state.json").is_file() {
        assert!(
            std::time::Instant::now() < deadline,
            "step 1 did not finish"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "trainer exited early"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Step 2 is under way, with sandboxes: Ctrl-C twice abandons it. Signal as soon as one
    // of its sandboxes exists (a fixed wait could outlast a fast step).
    let sandboxes = out.join("sandboxes");
    let live = || {
        std::fs::read_dir(&sandboxes)
            .map(|d| d.flatten().next().is_some())
            .unwrap_or(false)
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !live() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(live(), "step 2 started no sandbox within a minute");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    std::thread::sleep(std::time::Duration::from_millis(300));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let output = child.wait_with_output().expect("exit");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("abandoning the current step"), "{stderr}");
    assert!(
        stderr.contains(&format!("curves: tensorboard --logdir {}", out.display())),
        "{stderr}"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("status.json")).expect("status"))
            .expect("json");
    assert_eq!(status["step"], 1);
    assert!(
        out.join("checkpoints/step-1/model.safetensors").is_file(),
        "the last checkpoint is intact"
    );
    assert!(!out.join("checkpoints/step-2").exists());
    std::thread::sleep(std::time::Duration::from_millis(500));
    let left = processes_mentioning(&out.to_string_lossy());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// The same seed gives the same episodes: the sampled tokens of the tiny model, the
/// observations and the checkpointed weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_cpu_run_is_reproducible() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let spec = dir.path().join("run.yaml");
    let text = include_str!("../assets/default-run.yaml")
        .replace(
            "localPath: sample-repo.bundle",
            &format!(
                "localPath: {}",
                assets().join("sample-repo.bundle").display()
            ),
        )
        .replace("    maxTurns: 4", "    maxTurns: 2")
        .replace("    maxTokensPerTurn: 128", "    maxTokensPerTurn: 48");
    std::fs::write(&spec, text).expect("write");
    let mut transcripts = Vec::new();
    for i in 0..2 {
        let out = dir.path().join(format!("out-{i}"));
        let opts = LocalOptions {
            spec: Some(spec.clone()),
            steps: Some(1),
            out: Some(out.clone()),
            resume: false,
            metrics_listen: None,
            isolation: Isolation::Auto,
            progress: false,
        };
        run_local(opts, None).await.expect("run");
        let records = std::fs::read_to_string(out.join("episodes/step-000001/episodes.jsonl"))
            .expect("records");
        let t: Vec<serde_json::Value> = records
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("json")["transcript"].clone()
            })
            .collect();
        assert!(
            t.iter()
                .any(|x| x.as_array().is_some_and(|a| !a.is_empty())),
            "the model wrote something"
        );
        transcripts.push(t);
    }
    assert_eq!(transcripts[0], transcripts[1]);
}
