//! The curves of a local run are TensorBoard event files that TensorBoard itself reads: the
//! `tensorboard` package from PyPI (in a venv under `target/`, made once and reused)
//! checks every record's CRCs and loads the scalars as its server does
//! (`trainer/scripts/read_tfevents.py`); they come back at the steps and with the values the
//! trainer wrote; a resumed run replaces the steps it redid, and a fresh run in the same
//! directory the whole old run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use selfplay_crds::ProgressSnapshot;
use selfplay_trainer::grpo::StepStats;
use selfplay_trainer::train::driver::StepSummary;
use selfplay_trainer::train::tensorboard::{EventWriter, step_scalars};

const TENSORBOARD: &str = "tensorboard==2.21.0";

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The venv's python, with TensorBoard installed; reused while its stamp names the same
/// version (about 9 s and 180 MB to make, from PyPI).
fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = target_dir().join("py-venvs/tensorboard");
            let stamp = venv.join(".ready");
            if std::fs::read_to_string(&stamp).ok().as_deref() != Some(TENSORBOARD) {
                let _ = std::fs::remove_dir_all(&venv);
                run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
                run(Command::new(venv.join("bin/python")).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    TENSORBOARD,
                ]));
                std::fs::write(&stamp, TENSORBOARD).expect("venv stamp");
            }
            venv.join("bin/python")
        })
        .clone()
}

fn read_tfevents_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/read_tfevents.py"))
        .arg(dir)
        // TensorBoard warns that TensorFlow is absent; nothing else should be said.
        .env("TF_CPP_MIN_LOG_LEVEL", "3");
    cmd
}

/// What TensorBoard read: the files, and per tag its (step, value) points in order.
fn read_back(dir: &Path) -> (serde_json::Value, BTreeMap<String, Vec<(u64, f32)>>) {
    let out = run(&mut read_tfevents_cmd(dir));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reader's JSON");
    let scalars = v["scalars"]
        .as_object()
        .expect("scalars")
        .iter()
        .map(|(tag, points)| {
            let points = points
                .as_array()
                .expect("points")
                .iter()
                .map(|p| {
                    (
                        p[0].as_u64().expect("step"),
                        p[1].as_f64().expect("value") as f32,
                    )
                })
                .collect();
            (tag.clone(), points)
        })
        .collect();
    (v["files"].clone(), scalars)
}

/// A step's summary whose every value depends on `step` and `run` (so a point read at the
/// wrong step, or from the replaced run, has the wrong value). Steps divisible by 3 have
/// no valid bug, hence no solve rate or solver reward; sandbox errors are always 0 (a
/// zero must still be written, not taken for "absent").
fn summary(step: u64, run: f64) -> StepSummary {
    let x = step as f64 + run;
    let no_bug = step.is_multiple_of(3);
    StepSummary {
        snapshot: ProgressSnapshot {
            step: step as i64,
            policy_version: step as i64,
            solve_rate: (!no_bug).then_some(0.125 * x),
            injector_validity_rate: Some(0.1 * x),
            mean_reward_solver: (!no_bug).then_some(-0.5 + 0.01 * x),
            mean_reward_injector: Some(-1.0 + 0.2 * x),
            tokens_per_second: Some(100.0 + x),
            loss: Some(0.03 * x),
            sandbox_errors: 0,
            ..ProgressSnapshot::default()
        },
        stats: Some(StepStats {
            step,
            tokens: 10 * step as usize,
            grad_norm: 1.5 * x,
            learning_rate: 1e-4,
            entropy: 2.0 + x,
            ..StepStats::default()
        }),
        rollouts_injectors: 2,
        valid_bugs: usize::from(!no_bug),
        solver_attempts: 2 * usize::from(!no_bug),
        seconds: 5.0 + x,
        nonfinite: None,
        checkpoint: None,
    }
}

/// The points a reader should see: per tag, the step and value of every written summary.
fn expected(summaries: &[StepSummary]) -> BTreeMap<String, Vec<(u64, f32)>> {
    let mut want: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for s in summaries {
        for (tag, v) in step_scalars(s) {
            want.entry(tag.to_string())
                .or_default()
                .push((s.snapshot.step as u64, v as f32));
        }
    }
    want
}

#[test]
fn tensorboard_reads_the_scalars_at_their_steps_and_restarts_replace_redone_steps() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A run of four steps, then a resume from its checkpoint of step 2 that redoes 3 and 4.
    let first: Vec<StepSummary> = (1..=4).map(|s| summary(s, 0.0)).collect();
    let mut w = EventWriter::create(dir.path(), 1).expect("writer");
    for s in &first {
        w.write_step(s).expect("write");
    }
    drop(w);
    let redone: Vec<StepSummary> = (3..=4).map(|s| summary(s, 0.5)).collect();
    let mut w = EventWriter::create(dir.path(), 3).expect("resumed writer");
    for s in &redone {
        w.write_step(s).expect("write");
    }
    drop(w);

    let (files, got) = read_back(dir.path());
    let files = files.as_array().expect("files");
    assert_eq!(files.len(), 2, "one event file per writer: {files:?}");
    assert_eq!(
        files[0]["kinds"],
        serde_json::json!([
            "file_version",
            "session_log",
            "summary",
            "summary",
            "summary",
            "summary"
        ]),
    );
    assert_eq!(
        files[1]["kinds"],
        serde_json::json!(["file_version", "session_log", "summary", "summary"]),
    );

    let mut kept = first[..2].to_vec();
    kept.extend(redone);
    let want = expected(&kept);
    assert!(
        want.contains_key("selfplay/sandbox_errors") && want.contains_key("reward/solver"),
        "{want:?}"
    );
    assert_eq!(
        got, want,
        "TensorBoard's scalars differ from what was written"
    );
    // Steps without a valid bug have no solve rate: a gap, not a zero.
    assert_eq!(
        got["selfplay/solve_rate"]
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        vec![1, 2, 4]
    );

    // A run started afresh in the same directory: nothing of the old one is left.
    let fresh = summary(1, 0.25);
    let mut w = EventWriter::create(dir.path(), 1).expect("fresh writer");
    w.write_step(&fresh).expect("write");
    drop(w);
    let (files, got) = read_back(dir.path());
    assert_eq!(files.as_array().map(Vec::len), Some(3));
    assert_eq!(got, expected(std::slice::from_ref(&fresh)));
}

#[test]
fn a_record_with_a_bad_crc_is_rejected_by_tensorboard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = EventWriter::create(dir.path(), 1).expect("writer");
    w.write_step(&summary(1, 0.0)).expect("write");
    let path = w.path().to_path_buf();
    drop(w);
    // The file is accepted as written…
    let (_, got) = read_back(dir.path());
    assert_eq!(got["train/loss"].len(), 1);
    // …and not with one byte of the summary's data changed (the last 4 bytes are its CRC).
    let mut bytes = std::fs::read(&path).expect("read");
    let n = bytes.len();
    bytes[n - 6] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    let out = read_tfevents_cmd(dir.path()).output().expect("reader");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("crc"),
        "a corrupted record was accepted: {stderr}"
    );
}
