//! Held-out evaluation inside a training run (`spec.evaluation`): `trainer local` evaluates
//! the policy before its first update and every `everySteps` steps, with the real sampler and
//! the real grading path, and reports the rate in `status.json`, the progress line's snapshot
//! and the TensorBoard curves.
//!
//! The task set has two instances of the bundled sample repository: a real bug the random tiny
//! model cannot fix, and the same instance whose "bug" is a harmless comment, so its oracle
//! tests pass whatever the solver does. The held-out solve rate is therefore exactly 1/2 at
//! every evaluation; anything else means the wiring or the grading is wrong.

use std::path::{Path, PathBuf};

use selfplay_crds::ProgressSnapshot;
use selfplay_trainer::train::local::{LocalOptions, run_local};

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets")
}

fn tasks_file(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(assets().join("eval/sample-tasks.jsonl")).expect("tasks");
    let first: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("an instance")).expect("json");
    let mut harmless = first.clone();
    harmless["instance_id"] = "tinytext__harmless-comment".into();
    harmless["selfplay"]["bug_patch"] = concat!(
        "diff --git a/tinytext/wrap.py b/tinytext/wrap.py\n",
        "--- a/tinytext/wrap.py\n",
        "+++ b/tinytext/wrap.py\n",
        "@@ -1,4 +1,5 @@\n",
        " \"\"\"Greedy word wrapping.\"\"\"\n",
        "+# A comment changes no behaviour.\n",
        " \n",
        " \n",
        " def wrap(text, width):\n",
    )
    .into();
    let path = dir.join("heldout.jsonl");
    std::fs::write(&path, format!("{first}\n{harmless}\n")).expect("write tasks");
    path
}

fn run_file(dir: &Path, tasks: &Path) -> PathBuf {
    let text = include_str!("../assets/default-run.yaml")
        .replace(
            "localPath: sample-repo.bundle",
            &format!(
                "localPath: {}",
                assets().join("sample-repo.bundle").display()
            ),
        )
        .replace(
            "  checkpoint:\n",
            &format!(
                "  evaluation:\n    tasks: {{file: {}}}\n    pool: sample\n    everySteps: 1\n  checkpoint:\n",
                tasks.display()
            ),
        );
    assert!(
        text.contains("evaluation:"),
        "the run names its held-out set"
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, text).expect("write run");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_evaluates_its_held_out_set_and_reports_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let tasks = tasks_file(dir.path());
    let out = dir.path().join("out");
    let opts = LocalOptions {
        spec: Some(run_file(dir.path(), &tasks)),
        steps: Some(2),
        out: Some(out.clone()),
        resume: false,
        metrics_listen: None,
        isolation: selfplay_trainer::engine::local::Isolation::Auto,
        progress: false,
    };
    let outcome = run_local(opts, None).await.expect("local run");
    assert_eq!(outcome.steps_done, 2);

    let status: ProgressSnapshot =
        serde_json::from_slice(&std::fs::read(out.join("status.json")).expect("status"))
            .expect("status json");
    assert_eq!(status.heldout_step, Some(2), "{status:?}");
    assert_eq!(
        status.heldout_solve_rate,
        Some(0.5),
        "the harmless instance is solved, the real bug is not: {status:?}"
    );

    // The curve: one point per evaluation after an update (steps 1 and 2).
    let mut tagged = 0;
    for entry in std::fs::read_dir(&out).expect("out").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("events.out.tfevents") {
            let bytes = std::fs::read(entry.path()).expect("events");
            tagged += bytes
                .windows(b"eval/heldout_solve_rate".len())
                .filter(|w| *w == b"eval/heldout_solve_rate")
                .count();
        }
    }
    assert_eq!(tagged, 2, "a held-out point at steps 1 and 2");
}
