//! The pure decisions, from the YAML fixtures: pool scaling, failed and expired sandboxes,
//! template rollout; run lifecycle, suspend/resume, backoff, deadline, sticky terminal
//! states; checkpoint retention.

mod common;

use std::time::Duration;

use common::{docs, one, ts};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use selfplay_crds::conditions::{ConditionType, find_condition, is_true};
use selfplay_crds::{Checkpoint, RunPhase, SandboxPool, SelfPlayRun, SelfPlayRunStatus};
use selfplay_operator::build::ResumePoint;
use selfplay_operator::config::OperatorConfig;
use selfplay_operator::decide::checkpoint::{CheckpointInfo, latest_ready, retention};
use selfplay_operator::decide::pool::{
    CrashBackoff, DeleteReason, Holder, Holders, Sandbox, StaleClaim, decide_pool,
    mark_stale_claims, pool_status,
};
use selfplay_operator::decide::run::{
    ResumeFrom, RunAction, RunObservation, Trainer, TrainerPhase, decide_run, restart_backoff,
};
use selfplay_operator::validate::validate_pool;

const NOW: &str = "2025-06-01T12:00:00Z";

fn sandbox(name: &str, hash: &str, created: Timestamp, ready: bool) -> Sandbox {
    Sandbox {
        name: name.into(),
        resource_version: Some("1".into()),
        created,
        ready,
        finished: false,
        claimed_by: None,
        template_hash: Some(hash.into()),
        ..Sandbox::default()
    }
}

fn reasons(plan: &selfplay_operator::decide::pool::PoolPlan) -> Vec<(&str, DeleteReason)> {
    let mut v: Vec<(&str, DeleteReason)> =
        plan.delete.iter().map(|(n, r)| (n.as_str(), *r)).collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

// ---- pools ----

/// Issue 17 defect 5: claims of a deleted, recreated or finished run, or of a replaced trainer
/// attempt, go back to the pool instead of counting toward `max` until their TTL.
#[test]
fn pool_reclaims_claims_whose_run_or_attempt_is_gone() {
    let pool: SandboxPool = one("pool-basic.yaml");
    let now = ts(NOW);
    let claimed = |name: &str, run: &str, uid: &str, attempt: i32| Sandbox {
        claimed_by: Some(run.into()),
        claim_run_uid: Some(uid.into()),
        claim_attempt: Some(attempt),
        ..sandbox(name, "h", ts("2025-06-01T11:55:00Z"), true)
    };
    let mut sandboxes = vec![
        claimed("live", "a", "uid-a", 1),
        claimed("old-attempt", "a", "uid-a", 0),
        claimed("later-attempt", "a", "uid-a", 2),
        claimed("recreated", "a", "uid-old", 1),
        claimed("finished", "b", "uid-b", 0),
        claimed("deleted", "c", "uid-c", 0),
        // Claimed before claims carried a UID and an attempt: only the run's existence counts.
        Sandbox {
            claimed_by: Some("a".into()),
            ..sandbox("legacy", "h", ts("2025-06-01T11:55:00Z"), true)
        },
    ];
    let runs: Holders = [
        (
            "a".to_string(),
            Holder {
                uid: Some("uid-a".into()),
                attempt: 1,
                finished: false,
            },
        ),
        (
            "b".to_string(),
            Holder {
                uid: Some("uid-b".into()),
                attempt: 0,
                finished: true,
            },
        ),
    ]
    .into();
    mark_stale_claims(&mut sandboxes, &runs);
    let stale: Vec<(&str, Option<StaleClaim>)> = sandboxes
        .iter()
        .map(|s| (s.name.as_str(), s.stale_claim))
        .collect();
    assert_eq!(
        stale,
        [
            ("live", None),
            ("old-attempt", Some(StaleClaim::OldAttempt)),
            ("later-attempt", None),
            ("recreated", Some(StaleClaim::RunGone)),
            ("finished", Some(StaleClaim::RunFinished)),
            ("deleted", Some(StaleClaim::RunGone)),
            ("legacy", None),
        ]
    );
    let plan = decide_pool(&pool.spec, "h", &sandboxes, now);
    assert_eq!(
        reasons(&plan),
        [
            ("deleted", DeleteReason::Reclaimed),
            ("finished", DeleteReason::Reclaimed),
            ("old-attempt", DeleteReason::Reclaimed),
            ("recreated", DeleteReason::Reclaimed),
        ]
    );
    assert_eq!(plan.counts.claimed, 3);
}

#[test]
fn pool_observes_fixture_pods_and_replaces_failed_and_expired_ones() {
    let pool: SandboxPool = one("pool-basic.yaml");
    let cfg = OperatorConfig::default();
    let v = validate_pool(&pool, &cfg).expect("valid");
    let pods: Vec<Pod> = docs("sandboxes-mixed.yaml", &v.template_hash);
    let sandboxes: Vec<Sandbox> = pods.iter().filter_map(Sandbox::from_pod).collect();
    assert_eq!(sandboxes.len(), 6);
    let plan = decide_pool(&pool.spec, &v.template_hash, &sandboxes, ts(NOW));
    assert_eq!(
        reasons(&plan),
        [
            ("pyrepo-crashed", DeleteReason::Failed),
            ("pyrepo-expired", DeleteReason::Expired)
        ],
        "the failed pod and the claimed-but-expired one go; the terminating one is left alone"
    );
    // warm = 2 and two Ready unclaimed remain: nothing to create.
    assert_eq!(plan.create, 0);
    assert_eq!(
        (
            plan.counts.ready,
            plan.counts.claimed,
            plan.counts.pending,
            plan.counts.replicas
        ),
        (2, 1, 0, 3)
    );
    assert_eq!(plan.versions["pyrepo-crashed"], "14");

    let st = pool_status(
        "pyrepo",
        &pool.spec,
        &v.template_hash,
        &plan,
        None,
        Some(3),
        ts(NOW),
    );
    assert_eq!((st.replicas, st.ready_replicas, st.claimed), (3, 2, 1));
    assert_eq!(
        st.selector,
        "selfplay.dev/component=sandbox,selfplay.dev/pool=pyrepo"
    );
    assert_eq!(st.observed_generation, Some(3));
    assert!(is_true(&st.conditions, ConditionType::Ready));
    let degraded = find_condition(&st.conditions, ConditionType::Degraded).expect("Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "SandboxFailed")
    );
    assert!(
        st.conditions
            .iter()
            .all(|c| c.observed_generation == Some(3))
    );
}

#[test]
fn pool_scales_up_from_empty_but_never_past_max() {
    let mut pool: SandboxPool = one("pool-full.yaml");
    let now = ts(NOW);
    // warm 4, max 6, nothing yet.
    let plan = decide_pool(&pool.spec, "h1", &[], now);
    assert_eq!(
        (plan.create, plan.counts.pending, plan.counts.ready),
        (4, 4, 0)
    );
    let st = pool_status("rustrepo", &pool.spec, "h1", &plan, None, Some(1), now);
    assert!(!is_true(&st.conditions, ConditionType::Ready));
    assert!(is_true(&st.conditions, ConditionType::Progressing));

    // 5 claimed: only 1 more fits under max.
    let mut claimed: Vec<Sandbox> = (0..5)
        .map(|i| Sandbox {
            claimed_by: Some("r".into()),
            ..sandbox(&format!("c{i}"), "h1", ts("2025-06-01T11:55:00Z"), true)
        })
        .collect();
    let plan = decide_pool(&pool.spec, "h1", &claimed, now);
    assert_eq!(plan.create, 1);
    claimed.push(sandbox("c5", "h1", now, false));
    claimed[5].claimed_by = Some("r".into());
    assert_eq!(
        decide_pool(&pool.spec, "h1", &claimed, now).create,
        0,
        "at max: no more"
    );

    // Raising warm creates the difference.
    pool.spec.warm = 6;
    pool.spec.max = 10;
    let existing: Vec<Sandbox> = (0..4)
        .map(|i| sandbox(&format!("w{i}"), "h1", now, true))
        .collect();
    assert_eq!(decide_pool(&pool.spec, "h1", &existing, now).create, 2);
}

#[test]
fn pool_scales_down_pending_first_then_oldest() {
    let mut pool: SandboxPool = one("pool-basic.yaml");
    pool.spec.warm = 1;
    let s = vec![
        sandbox("old-ready", "h", ts("2025-06-01T11:10:00Z"), true),
        sandbox("new-ready", "h", ts("2025-06-01T11:50:00Z"), true),
        sandbox("pending", "h", ts("2025-06-01T11:59:00Z"), false),
    ];
    let plan = decide_pool(&pool.spec, "h", &s, ts(NOW));
    assert_eq!(
        reasons(&plan),
        [
            ("old-ready", DeleteReason::ScaleDown),
            ("pending", DeleteReason::ScaleDown)
        ]
    );
    assert_eq!((plan.create, plan.counts.ready), (0, 1));
    // warm 0: everything unclaimed goes, claimed stays.
    pool.spec.warm = 0;
    let mut s2 = s.clone();
    s2[0].claimed_by = Some("r".into());
    let plan = decide_pool(&pool.spec, "h", &s2, ts(NOW));
    assert_eq!(plan.delete.len(), 2);
    assert_eq!(plan.counts.claimed, 1);
    let st = pool_status("pyrepo", &pool.spec, "h", &plan, None, None, ts(NOW));
    assert!(
        is_true(&st.conditions, ConditionType::Ready),
        "warm 0 is trivially Ready"
    );
}

#[test]
fn pool_expires_sandboxes_at_their_ttl_claimed_or_not() {
    let pool: SandboxPool = one("pool-basic.yaml");
    let created = ts("2025-06-01T11:00:00Z");
    let mut claimed = sandbox("claimed", "h", created, true);
    claimed.claimed_by = Some("run".into());
    let s = vec![sandbox("idle", "h", created, true), claimed];
    // 3599 s later both live; at 3600 s both go and two new ones are made.
    let plan = decide_pool(&pool.spec, "h", &s, ts("2025-06-01T11:59:59Z"));
    assert!(plan.delete.is_empty());
    let plan = decide_pool(&pool.spec, "h", &s, ts(NOW));
    assert_eq!(
        reasons(&plan),
        [
            ("claimed", DeleteReason::Expired),
            ("idle", DeleteReason::Expired)
        ]
    );
    assert_eq!(plan.create, 2);
}

#[test]
fn template_change_rolls_the_pool_without_dropping_availability() {
    let pool: SandboxPool = one("pool-basic.yaml"); // warm 2, max 16
    let now = ts(NOW);
    let t0 = ts("2025-06-01T11:30:00Z");
    let mut claimed_old = sandbox("claimed-old", "old", t0, true);
    claimed_old.claimed_by = Some("run".into());
    let mut pods = vec![
        sandbox("old-a", "old", t0, true),
        sandbox("old-b", "old", t0, true),
        claimed_old,
    ];

    // Step 1: the two old Ready ones stand in while two new ones start.
    let plan = decide_pool(&pool.spec, "new", &pods, now);
    assert!(plan.delete.is_empty());
    assert_eq!(plan.create, 2);
    assert!(plan.rolling);
    assert_eq!(plan.counts.ready, 2);
    let st = pool_status("pyrepo", &pool.spec, "new", &plan, None, Some(4), now);
    let progressing =
        find_condition(&st.conditions, ConditionType::Progressing).expect("Progressing");
    assert_eq!(progressing.reason, "Rolling");
    assert_eq!(st.template_hash.as_deref(), Some("new"));

    // Step 2: new ones pending, nothing changes.
    pods.push(sandbox("new-a", "new", now, false));
    pods.push(sandbox("new-b", "new", now, false));
    let plan = decide_pool(&pool.spec, "new", &pods, now);
    assert!(plan.delete.is_empty() && plan.create == 0);

    // Step 3: one new Ready: one old one goes.
    pods[3].ready = true;
    let plan = decide_pool(&pool.spec, "new", &pods, now);
    assert_eq!(plan.delete.len(), 1);
    assert_eq!(plan.delete[0].1, DeleteReason::Outdated);

    // Step 4: both new Ready: all unclaimed old ones go; the claimed old one stays with its trainer.
    pods[4].ready = true;
    let plan = decide_pool(&pool.spec, "new", &pods, now);
    assert_eq!(
        reasons(&plan),
        [
            ("old-a", DeleteReason::Outdated),
            ("old-b", DeleteReason::Outdated)
        ]
    );
    assert_eq!(plan.counts.claimed, 1);
    // Outdated deletions carry the version they were decided on.
    assert_eq!(plan.versions.get("old-a").map(String::as_str), Some("1"));
}

#[test]
fn rolling_at_max_makes_room_instead_of_stalling() {
    let mut pool: SandboxPool = one("pool-basic.yaml");
    pool.spec.warm = 2;
    pool.spec.max = 2;
    let t0 = ts("2025-06-01T11:30:00Z");
    let pods = vec![
        sandbox("old-a", "old", t0, true),
        sandbox("old-b", "old", t0, true),
    ];
    let plan = decide_pool(&pool.spec, "new", &pods, ts(NOW));
    assert_eq!(plan.create, 2);
    assert_eq!(plan.deleted(DeleteReason::Outdated), 2);
    assert!(plan.counts.replicas <= 2);
}

// ---- runs ----

fn obs(now: &str) -> RunObservation {
    RunObservation {
        generation: Some(2),
        trainers: Vec::new(),
        latest_checkpoint: None,
        resume_from: ResumeFrom::None,
        missing_pools: Vec::new(),
        warnings: Vec::new(),
        now: ts(now),
    }
}

fn trainer(attempt: i32, phase: TrainerPhase) -> Trainer {
    Trainer {
        name: format!("qwen-ssr-trainer-{attempt}"),
        attempt,
        phase,
        terminating: false,
        message: None,
        stuck: None,
    }
}

fn cond(st: &SelfPlayRunStatus, t: ConditionType) -> (&str, &str) {
    let c = find_condition(&st.conditions, t).unwrap_or_else(|| panic!("{t:?} missing"));
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn trainer_pods_are_read_from_fixture() {
    let pods: Vec<Pod> = docs("trainers.yaml", "");
    let t: Vec<Trainer> = pods.iter().filter_map(Trainer::from_pod).collect();
    assert_eq!(t[0].attempt, 0);
    assert_eq!(t[0].phase, TrainerPhase::Failed);
    assert_eq!(t[0].message.as_deref(), Some("exit code 137 (OOMKilled)"));
    assert_eq!((t[1].attempt, t[1].phase), (1, TrainerPhase::Running));
}

#[test]
fn new_run_creates_its_trainer_then_runs() {
    let run: SelfPlayRun = one("run-gpu.yaml");
    let plan = decide_run(&run.spec, None, &obs(NOW));
    assert_eq!(
        plan.actions,
        [RunAction::CreateTrainer {
            attempt: 0,
            resume: None
        }]
    );
    let st = &plan.status;
    assert_eq!(st.phase, Some(RunPhase::Pending));
    assert_eq!(st.observed_generation, Some(2));
    assert_eq!(
        cond(st, ConditionType::Progressing),
        ("True", "TrainerCreated")
    );
    for t in [
        ConditionType::Succeeded,
        ConditionType::Failed,
        ConditionType::Suspended,
        ConditionType::Degraded,
    ] {
        assert_eq!(cond(st, t).0, "False", "{t:?}");
    }
    assert!(
        st.conditions
            .iter()
            .all(|c| c.observed_generation == Some(2))
    );
    assert_eq!(plan.events[0].reason, "TrainerCreated");

    // The pod runs: Running, startTime set; nothing created again.
    let mut o = obs("2025-06-01T12:01:00Z");
    o.trainers = vec![trainer(0, TrainerPhase::Running)];
    let plan = decide_run(&run.spec, Some(st), &o);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(RunPhase::Running));
    assert_eq!(
        plan.status.start_time,
        Some(Time(ts("2025-06-01T12:01:00Z")))
    );
    assert_eq!(
        cond(&plan.status, ConditionType::Progressing),
        ("True", "Training")
    );
    // The deadline (86400 s) is the next wake-up.
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(86400)));
}

#[test]
fn missing_pools_keep_the_run_pending() {
    let run: SelfPlayRun = one("run-gpu.yaml");
    let mut o = obs(NOW);
    o.missing_pools = vec!["rustrepo".into()];
    let plan = decide_run(&run.spec, None, &o);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(RunPhase::Pending));
    assert_eq!(
        cond(&plan.status, ConditionType::Degraded),
        ("True", "PoolsNotFound")
    );
}

#[test]
fn failed_trainer_restarts_with_backoff_from_the_latest_checkpoint_then_fails() {
    let run: SelfPlayRun = one("run-gpu.yaml"); // backoffLimit 2
    let latest = ResumePoint {
        checkpoint: "qwen-ssr-step-30".into(),
        location: "/checkpoints/qwen-ssr/step-30".into(),
        step: 30,
    };
    let mut st = decide_run(&run.spec, None, &obs(NOW)).status;

    // Attempt 0 fails: restart 1 scheduled in 10 s, Degraded, Warning event.
    let mut o = obs("2025-06-01T12:10:00Z");
    o.trainers = vec![Trainer {
        message: Some("exit code 137 (OOMKilled)".into()),
        ..trainer(0, TrainerPhase::Failed)
    }];
    o.latest_checkpoint = Some(latest.clone());
    let plan = decide_run(&run.spec, Some(&st), &o);
    assert!(plan.actions.is_empty(), "waits for the backoff");
    assert_eq!(plan.status.restarts, 1);
    assert_eq!(
        plan.status.next_restart_time,
        Some(Time(ts("2025-06-01T12:10:10Z")))
    );
    assert_eq!(
        plan.status.latest_checkpoint.as_deref(),
        Some("qwen-ssr-step-30")
    );
    assert_eq!(
        cond(&plan.status, ConditionType::Degraded),
        ("True", "TrainerFailed")
    );
    assert!(
        plan.events
            .iter()
            .any(|e| e.warning && e.reason == "TrainerFailed" && e.note.contains("OOMKilled"))
    );
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(10)));
    st = plan.status;

    // Before the backoff ends: nothing.
    let mut o2 = o.clone();
    o2.now = ts("2025-06-01T12:10:05Z");
    let plan = decide_run(&run.spec, Some(&st), &o2);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(5)));

    // After it: attempt 1, resuming from the latest Ready checkpoint.
    o2.now = ts("2025-06-01T12:10:11Z");
    let plan = decide_run(&run.spec, Some(&st), &o2);
    assert_eq!(
        plan.actions,
        [RunAction::CreateTrainer {
            attempt: 1,
            resume: Some(latest.clone())
        }]
    );
    assert_eq!(plan.status.next_restart_time, None);
    st = plan.status;

    // Attempt 1 fails: restart 2 with a 20 s backoff.
    let mut o3 = o.clone();
    o3.now = ts("2025-06-01T13:00:00Z");
    o3.trainers = vec![
        trainer(0, TrainerPhase::Failed),
        trainer(1, TrainerPhase::Failed),
    ];
    let plan = decide_run(&run.spec, Some(&st), &o3);
    assert_eq!(plan.status.restarts, 2);
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(20)));
    st = plan.status;

    // Attempt 2 fails: the limit (2) is reached: Failed, terminal.
    o3.trainers.push(trainer(2, TrainerPhase::Failed));
    o3.now = ts("2025-06-01T14:00:00Z");
    let plan = decide_run(&run.spec, Some(&st), &o3);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(RunPhase::Failed));
    assert_eq!(
        cond(&plan.status, ConditionType::Failed),
        ("True", "BackoffLimitExceeded")
    );
    assert_eq!(cond(&plan.status, ConditionType::Progressing).0, "False");
    assert_eq!(
        plan.status.completion_time,
        Some(Time(ts("2025-06-01T14:00:00Z")))
    );
    st = plan.status;

    // Sticky: whatever is observed later, no trainer is ever created again.
    for trainers in [vec![], vec![trainer(2, TrainerPhase::Failed)]] {
        let mut o4 = obs("2025-06-02T00:00:00Z");
        o4.trainers = trainers;
        let plan = decide_run(&run.spec, Some(&st), &o4);
        assert!(
            plan.actions
                .iter()
                .all(|a| !matches!(a, RunAction::CreateTrainer { .. }))
        );
        assert_eq!(plan.status.phase, Some(RunPhase::Failed));
    }
}

#[test]
fn backoff_doubles_and_is_capped() {
    let secs: Vec<u64> = (1..=8).map(|r| restart_backoff(r).as_secs()).collect();
    assert_eq!(secs, [10, 20, 40, 80, 160, 300, 300, 300]);
}

#[test]
fn suspend_removes_the_trainer_and_resume_restarts_from_the_latest_checkpoint() {
    let mut run: SelfPlayRun = one("run-gpu.yaml");
    let mut o = obs("2025-06-01T10:00:00Z");
    o.trainers = vec![trainer(0, TrainerPhase::Running)];
    let running = decide_run(&run.spec, None, &o).status;
    assert_eq!(running.start_time, Some(Time(ts("2025-06-01T10:00:00Z"))));

    // Suspend at 11:00: the running trainer is deleted.
    run.spec.suspend = true;
    o.now = ts("2025-06-01T11:00:00Z");
    let plan = decide_run(&run.spec, Some(&running), &o);
    assert_eq!(
        plan.actions,
        [RunAction::DeleteTrainer {
            name: "qwen-ssr-trainer-0".into(),
            reason: "Suspended"
        }]
    );
    assert_eq!(plan.status.phase, Some(RunPhase::Suspended));
    assert_eq!(
        cond(&plan.status, ConditionType::Suspended),
        ("True", "Suspended")
    );
    assert_eq!(cond(&plan.status, ConditionType::Progressing).0, "False");
    let suspended = plan.status;

    // Still suspended, trainer gone: nothing happens, no restart counted.
    let mut o2 = obs("2025-06-01T12:00:00Z");
    let plan = decide_run(&run.spec, Some(&suspended), &o2);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.restarts, 0);

    // Resume at 13:00: a trainer of the same attempt, from the latest Ready checkpoint;
    // the two suspended hours are recorded.
    run.spec.suspend = false;
    o2.now = ts("2025-06-01T13:00:00Z");
    let latest = ResumePoint {
        checkpoint: "qwen-ssr-step-20".into(),
        location: "/checkpoints/qwen-ssr/step-20".into(),
        step: 20,
    };
    o2.latest_checkpoint = Some(latest.clone());
    let plan = decide_run(&run.spec, Some(&suspended), &o2);
    assert_eq!(
        plan.actions,
        [RunAction::CreateTrainer {
            attempt: 0,
            resume: Some(latest)
        }]
    );
    assert_eq!(plan.status.suspended_seconds, 7200);
    assert_eq!(
        cond(&plan.status, ConditionType::Suspended),
        ("False", "Resumed")
    );
    assert!(plan.events.iter().any(|e| e.reason == "Resumed"));

    // If the old pod is still terminating, wait for it instead of creating.
    let mut o3 = o2.clone();
    o3.trainers = vec![Trainer {
        terminating: true,
        ..trainer(0, TrainerPhase::Running)
    }];
    let plan = decide_run(&run.spec, Some(&suspended), &o3);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(5)));
}

#[test]
fn deadline_counts_active_time_only_and_fails_the_run() {
    let mut run: SelfPlayRun = one("run-gpu.yaml");
    run.spec.active_deadline_seconds = Some(3600);
    let st = SelfPlayRunStatus {
        phase: Some(RunPhase::Running),
        start_time: Some(Time(ts("2025-06-01T10:00:00Z"))),
        suspended_seconds: 1800,
        ..Default::default()
    };
    let mut o = obs("2025-06-01T11:20:00Z"); // 80 min since start, 30 suspended: 50 active
    o.trainers = vec![trainer(0, TrainerPhase::Running)];
    let plan = decide_run(&run.spec, Some(&st), &o);
    assert_eq!(plan.status.phase, Some(RunPhase::Running));
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(600)));

    o.now = ts("2025-06-01T11:30:00Z"); // 60 active minutes
    let plan = decide_run(&run.spec, Some(&st), &o);
    assert_eq!(
        plan.actions,
        [RunAction::DeleteTrainer {
            name: "qwen-ssr-trainer-0".into(),
            reason: "DeadlineExceeded"
        }]
    );
    assert_eq!(plan.status.phase, Some(RunPhase::Failed));
    assert_eq!(
        cond(&plan.status, ConditionType::Failed),
        ("True", "DeadlineExceeded")
    );
    assert!(
        plan.events
            .iter()
            .any(|e| e.warning && e.reason == "DeadlineExceeded")
    );

    // Terminal: a later reconcile that still sees the pod only deletes it.
    let failed = plan.status;
    let plan = decide_run(&run.spec, Some(&failed), &o);
    assert_eq!(
        plan.actions,
        [RunAction::DeleteTrainer {
            name: "qwen-ssr-trainer-0".into(),
            reason: "RunFinished"
        }]
    );
    assert_eq!(plan.status.phase, Some(RunPhase::Failed));
}

#[test]
fn succeeded_trainer_finishes_the_run_for_good() {
    let run: SelfPlayRun = one("run-tiny.yaml");
    let mut o = obs(NOW);
    o.trainers = vec![trainer(0, TrainerPhase::Succeeded)];
    let prev = SelfPlayRunStatus {
        phase: Some(RunPhase::Running),
        // totalSteps is 20: the trainer got there.
        progress: Some(selfplay_crds::ProgressSnapshot {
            step: 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    let plan = decide_run(&run.spec, Some(&prev), &o);
    assert!(
        plan.actions.is_empty(),
        "a completed pod is kept for its logs"
    );
    assert_eq!(plan.status.phase, Some(RunPhase::Succeeded));
    assert_eq!(
        cond(&plan.status, ConditionType::Succeeded),
        ("True", "TrainerSucceeded")
    );
    assert_eq!(cond(&plan.status, ConditionType::Degraded).0, "False");

    // The pod is deleted by someone: the run does not start again, even when un-suspended.
    let done = plan.status;
    let mut spec = run.spec.clone();
    spec.suspend = true;
    let plan = decide_run(&spec, Some(&done), &obs("2025-06-02T12:00:00Z"));
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(RunPhase::Succeeded));
}

#[test]
fn resume_from_waits_for_a_ready_checkpoint_on_the_runs_volume() {
    let mut run: SelfPlayRun = one("run-gpu.yaml");
    run.spec.resume_from = Some("base-step-100".into());
    let mut o = obs(NOW);
    o.resume_from = ResumeFrom::NotReady("base-step-100".into());
    let plan = decide_run(&run.spec, None, &o);
    assert!(plan.actions.is_empty());
    assert_eq!(
        cond(&plan.status, ConditionType::Progressing),
        ("False", "CheckpointNotReady")
    );

    o.resume_from = ResumeFrom::OtherVolume {
        checkpoint: "base-step-100".into(),
        pvc: "elsewhere".into(),
    };
    let plan = decide_run(&run.spec, None, &o);
    assert!(plan.actions.is_empty());
    assert_eq!(
        cond(&plan.status, ConditionType::Degraded),
        ("True", "CheckpointOnOtherVolume")
    );

    let p = ResumePoint {
        checkpoint: "base-step-100".into(),
        location: "/checkpoints/base/step-100".into(),
        step: 100,
    };
    o.resume_from = ResumeFrom::Ready(p.clone());
    let plan = decide_run(&run.spec, None, &o);
    assert_eq!(
        plan.actions,
        [RunAction::CreateTrainer {
            attempt: 0,
            resume: Some(p)
        }]
    );
}

#[test]
fn unsupported_node_count_is_reported_as_degraded() {
    let run: SelfPlayRun = one("run-tiny.yaml");
    let mut o = obs(NOW);
    o.warnings = vec!["trainer.nodes is 4; only 1 trainer node is supported".into()];
    let plan = decide_run(&run.spec, None, &o);
    assert_eq!(plan.actions.len(), 1, "the run still starts, on one node");
    assert_eq!(
        cond(&plan.status, ConditionType::Degraded),
        ("True", "Unsupported")
    );
}

// ---- checkpoints ----

#[test]
fn retention_keeps_the_last_k_ready_checkpoints() {
    let ckpts: Vec<Checkpoint> = docs("checkpoints.yaml", "");
    let infos: Vec<CheckpointInfo> = ckpts.iter().map(CheckpointInfo::from_object).collect();
    assert_eq!(infos.iter().filter(|c| c.ready).count(), 4);
    assert_eq!(
        latest_ready(&infos).map(|c| c.name.as_str()),
        Some("qwen-ssr-step-30")
    );
    let mut doomed = retention(&infos, 2, &[]);
    doomed.sort();
    assert_eq!(
        doomed,
        ["qwen-ssr-step-10", "qwen-ssr-step-5"],
        "step 40 is not Ready: kept"
    );
    assert_eq!(
        retention(&infos, 2, &["qwen-ssr-step-5"]),
        ["qwen-ssr-step-10"],
        "a run's resumeFrom is kept"
    );
    assert!(retention(&infos, 10, &[]).is_empty());
    assert_eq!(retention(&infos, 1, &[]).len(), 3);
}

// ---- defects found reading against a real cluster ----

#[test]
fn restart_without_a_pvc_starts_from_scratch_and_says_why() {
    let run: SelfPlayRun = one("run-tiny.yaml"); // checkpoints in an emptyDir
    let st = SelfPlayRunStatus {
        restarts: 1,
        phase: Some(RunPhase::Pending),
        ..Default::default()
    };
    let mut o = obs(NOW);
    o.trainers = vec![Trainer {
        name: "smoke-trainer-0".into(),
        ..trainer(0, TrainerPhase::Failed)
    }];
    o.latest_checkpoint = Some(ResumePoint {
        checkpoint: "smoke-step-10".into(),
        location: "/checkpoints/smoke/step-10".into(),
        step: 10,
    });
    let plan = decide_run(&run.spec, Some(&st), &o);
    assert_eq!(
        plan.actions,
        [RunAction::CreateTrainer {
            attempt: 1,
            resume: None
        }],
        "the checkpoint died with the emptyDir of attempt 0"
    );
    let c = find_condition(&plan.status.conditions, ConditionType::Progressing).expect("cond");
    assert!(
        c.message.contains("emptyDir") && c.message.contains("smoke-step-10"),
        "{}",
        c.message
    );
    assert!(
        plan.events
            .iter()
            .any(|e| e.warning && e.reason == "CheckpointsLost")
    );

    // A resumeFrom checkpoint is unreachable without a PVC too: refused, not silently ignored.
    let mut run = run;
    run.spec.resume_from = Some("base-step-100".into());
    let mut o = obs(NOW);
    o.resume_from = ResumeFrom::Ready(ResumePoint {
        checkpoint: "base-step-100".into(),
        location: "/checkpoints/base/step-100".into(),
        step: 100,
    });
    let plan = decide_run(&run.spec, None, &o);
    assert!(plan.actions.is_empty());
    assert_eq!(
        cond(&plan.status, ConditionType::Degraded),
        ("True", "CheckpointUnreachable")
    );
}

#[test]
fn exit_code_zero_before_the_target_step_is_a_failure() {
    let run: SelfPlayRun = one("run-tiny.yaml"); // totalSteps 20, backoffLimit default
    let prev = SelfPlayRunStatus {
        phase: Some(RunPhase::Running),
        progress: Some(selfplay_crds::ProgressSnapshot {
            step: 7,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut o = obs(NOW);
    o.trainers = vec![trainer(0, TrainerPhase::Succeeded)];
    let plan = decide_run(&run.spec, Some(&prev), &o);
    assert_ne!(plan.status.phase, Some(RunPhase::Succeeded));
    assert_eq!(plan.status.restarts, 1);
    let c = find_condition(&plan.status.conditions, ConditionType::Degraded).expect("cond");
    assert_eq!(c.reason, "TrainerFailed");
    assert!(c.message.contains("step 7 of 20"), "{}", c.message);
}

/// Issue 17 defect 7: a sandbox stuck before Ready (image pull, unschedulable) makes the pool
/// Degraded with the pod's own reason instead of an endless "WarmingUp".
#[test]
fn pool_reports_why_its_sandboxes_are_stuck_pending() {
    let pool: SandboxPool = one("pool-basic.yaml");
    let pod = |name: &str, status: serde_json::Value| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "team-a", "resourceVersion": "1",
                "creationTimestamp": "2025-06-01T11:58:00Z",
                "labels": {"selfplay.dev/template-hash": "h"}},
            "status": status
        }))
        .expect("pod")
    };
    let pull = pod(
        "pull",
        serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "sandbox", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff",
                "message": "Back-off pulling image \"registry.example.com/envs/pyrepo:1.2\""}}}]}),
    );
    let unschedulable = pod(
        "unschedulable",
        serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient memory."}]}),
    );
    let starting = pod(
        "starting",
        serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "sandbox", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
    );
    let sandboxes: Vec<Sandbox> = [pull, unschedulable, starting]
        .iter()
        .filter_map(Sandbox::from_pod)
        .collect();
    let mut spec = pool.spec.clone();
    spec.warm = 3;
    let plan = decide_pool(&spec, "h", &sandboxes, ts(NOW));
    let st = pool_status("pyrepo", &spec, "h", &plan, None, Some(1), ts(NOW));
    let degraded = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "SandboxPending");
    assert!(
        degraded.message.contains("2 sandbox pod(s) stuck")
            && degraded.message.contains("ImagePullBackOff"),
        "{}",
        degraded.message
    );

    // Normal start-up is not stuck.
    let only_starting: Vec<Sandbox> = sandboxes[2..].to_vec();
    let plan = decide_pool(&spec, "h", &only_starting, ts(NOW));
    let st = pool_status("pyrepo", &spec, "h", &plan, None, Some(1), ts(NOW));
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "False")
    );
}

/// Issue 17 defect 7: a pool whose sandboxes keep failing replaces them after a growing delay,
/// not in a tight delete/recreate loop; a Ready sandbox resets it.
#[test]
fn failing_sandboxes_are_replaced_with_backoff() {
    let pool: SandboxPool = one("pool-basic.yaml");
    let t0 = std::time::Instant::now();
    let s = |d| Duration::from_secs(d);
    let crashed = Sandbox {
        finished: true,
        ..sandbox("crashed", "h", ts("2025-06-01T11:59:00Z"), false)
    };
    let mut plan = decide_pool(&pool.spec, "h", &[crashed], ts(NOW));
    assert_eq!(plan.create, 2);
    let mut b = CrashBackoff::default();
    let held = b.observe(plan.deleted(DeleteReason::Failed) > 0, false, t0);
    assert_eq!(held, Some(t0 + s(5)));
    plan.hold_creates();
    assert_eq!(
        (plan.create, plan.counts.replicas, plan.counts.pending),
        (0, 0, 0)
    );
    // A reconcile in between (a watch event) keeps holding; after the delay, creates go.
    assert_eq!(b.observe(false, false, t0 + s(1)), Some(t0 + s(5)));
    assert_eq!(b.observe(false, false, t0 + s(5)), None);
    // Failing again: twice as long, and so on up to the cap.
    assert_eq!(b.observe(true, false, t0 + s(30)), Some(t0 + s(40)));
    assert_eq!(b.observe(true, false, t0 + s(60)), Some(t0 + s(80)));
    // A Ready sandbox: the template works, start over.
    assert_eq!(b.observe(false, true, t0 + s(100)), None);
    assert_eq!(b.observe(true, false, t0 + s(200)), Some(t0 + s(205)));
}

/// Issue 17 defect 7: a trainer stuck Pending (no node with a free GPU, an unbound PVC) makes
/// the run Degraded with the pod's reason and one Warning event, not a silent
/// "TrainerStarting".
#[test]
fn run_reports_a_trainer_stuck_pending() {
    let run: SelfPlayRun = one("run-gpu.yaml");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "qwen-ssr-trainer-0", "namespace": "team-a",
            "labels": {"selfplay.dev/attempt": "0"}},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable",
            "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}
    }))
    .expect("pod");
    let t = Trainer::from_pod(&pod).expect("trainer");
    let mut o = obs(NOW);
    o.trainers = vec![t];
    let first = decide_run(&run.spec, None, &o);
    let st = &first.status;
    assert_eq!(
        cond(st, ConditionType::Degraded),
        ("True", "TrainerPending")
    );
    let msg = &find_condition(&st.conditions, ConditionType::Degraded)
        .expect("Degraded")
        .message;
    assert!(msg.contains("Insufficient nvidia.com/gpu"), "{msg}");
    assert!(
        first
            .events
            .iter()
            .any(|e| e.warning && e.reason == "TrainerPending"),
        "{:?}",
        first.events
    );
    // Still stuck next time: the condition stays, the event is not repeated.
    let again = decide_run(&run.spec, Some(st), &o);
    assert_eq!(
        cond(&again.status, ConditionType::Degraded),
        ("True", "TrainerPending")
    );
    assert!(again.events.iter().all(|e| e.reason != "TrainerPending"));
}

// ---- environments ----

fn env(name: &str, warm: Option<i32>) -> selfplay_crds::Environment {
    selfplay_crds::Environment {
        name: name.into(),
        image: format!("img/{name}"),
        warm,
        ..Default::default()
    }
}

fn in_env(s: Sandbox, e: &str) -> Sandbox {
    Sandbox {
        environment: Some(e.into()),
        ..s
    }
}

/// Issue 17: hundreds of images never mean a warm pod per image: `warm` is spread
/// round-robin over the environments without their own count.
#[test]
fn warm_sandboxes_are_spread_over_environments_and_overridden_per_environment() {
    use selfplay_operator::decide::pool::warm_targets;
    let many: Vec<_> = (0..500).map(|i| env(&format!("e{i}"), None)).collect();
    let t = warm_targets(3, &many);
    assert_eq!(t.iter().sum::<i32>(), 3);
    assert_eq!(&t[..4], &[1, 1, 1, 0]);
    let t = warm_targets(
        5,
        &[
            env("a", None),
            env("b", Some(0)),
            env("c", None),
            env("d", Some(4)),
        ],
    );
    assert_eq!(t, vec![3, 0, 2, 4]);
    assert_eq!(warm_targets(0, &[env("a", None)]), vec![0]);
}

#[test]
fn pool_with_environments_keeps_each_environment_warm_within_the_pools_max() {
    use selfplay_operator::decide::pool::{EnvironmentTarget, decide_pool_environments};
    let mut pool: SandboxPool = one("pool-full.yaml");
    pool.spec.max = 6;
    let now = ts(NOW);
    let target = |name: &str, warm: i32| EnvironmentTarget {
        name: name.into(),
        template_hash: format!("h-{name}"),
        warm,
    };
    let targets = [target("a", 2), target("b", 1), target("c", 4)];
    let sandboxes = vec![
        // a: one Ready, one claimed (not warm).
        in_env(sandbox("a1", "h-a", now, true), "a"),
        in_env(
            Sandbox {
                claimed_by: Some("r".into()),
                ..sandbox("a2", "h-a", now, true)
            },
            "a",
        ),
        // b: from an older template of b: replaced.
        in_env(sandbox("b-old", "h-old", now, false), "b"),
        // an environment no longer listed: its unclaimed sandbox goes, a claimed one stays.
        in_env(sandbox("gone-1", "h-x", now, true), "removed"),
        in_env(
            Sandbox {
                claimed_by: Some("r".into()),
                ..sandbox("gone-2", "h-x", now, true)
            },
            "removed",
        ),
    ];
    let plan = decide_pool_environments(&pool.spec, &targets, &sandboxes, now);
    let deleted = reasons(&plan);
    assert_eq!(
        deleted,
        vec![
            ("b-old", DeleteReason::Outdated),
            ("gone-1", DeleteReason::Outdated)
        ]
    );
    // Kept: a1, a2, gone-2 (3 of max 6): a wants 1, b 1, c 4, but only 3 fit, in order.
    assert_eq!(
        plan.environment_creates,
        vec![
            ("a".to_string(), 1),
            ("b".to_string(), 1),
            ("c".to_string(), 1)
        ]
    );
    assert_eq!(plan.create, 3);
    assert_eq!(
        (plan.counts.replicas, plan.counts.claimed, plan.counts.ready),
        (6, 2, 1)
    );

    // A namespace-wide limit takes creates away from the last environments first.
    let mut limited = plan.clone();
    limited.limit_creates(1);
    assert_eq!(limited.environment_creates, vec![("a".to_string(), 1)]);
    assert_eq!((limited.create, limited.counts.replicas), (1, 4));
}

#[test]
fn environments_come_from_the_pool_and_its_config_map() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use selfplay_operator::environments::{EnvironmentsUnavailable, resolve};
    let mut pool: SandboxPool = one("pool-envs.yaml");
    assert_eq!(
        resolve(&pool.spec, None)
            .expect("listed")
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        vec!["astropy-12907", "django-11099"]
    );
    pool.spec.environments_from = Some(selfplay_crds::EnvironmentsSource {
        config_map: Some(selfplay_crds::pool::ConfigMapKey {
            name: "swe-bench-lite".into(),
            key: "instances.jsonl".into(),
        }),
        ..Default::default()
    });
    assert_eq!(
        resolve(&pool.spec, None),
        Err(EnvironmentsUnavailable::ConfigMapMissing(
            "swe-bench-lite".into()
        ))
    );
    let cm = |data: &str| -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "swe-bench-lite"},
            "data": {"instances.jsonl": data}
        }))
        .expect("cm")
    };
    let ok = resolve(
        &pool.spec,
        Some(&cm("{\"instance_id\": \"sympy__sympy-20590\"}\n")),
    )
    .expect("parsed");
    assert_eq!(ok.len(), 3);
    assert_eq!(ok[2].name, "sympy__sympy-20590");
    assert_eq!(ok[2].workdir.as_deref(), Some("/testbed"));
    let err = resolve(&pool.spec, Some(&cm("{\"repo\": \"x\"}\n"))).expect_err("malformed");
    assert!(
        err.to_string()
            .contains("ConfigMap \"swe-bench-lite\" key \"instances.jsonl\": instance list, entry 1: no instance_id"),
        "{err}"
    );
    let dup = resolve(
        &pool.spec,
        Some(&cm("{\"instance_id\": \"django-11099\"}\n")),
    )
    .expect_err("duplicate");
    assert!(dup.to_string().contains("listed twice"), "{dup}");
    let no_key: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "swe-bench-lite"}}))
            .expect("cm");
    assert!(matches!(
        resolve(&pool.spec, Some(&no_key)),
        Err(EnvironmentsUnavailable::KeyMissing { .. })
    ));
    // A file is the trainer's, not the cluster's.
    pool.spec.environments_from = Some(selfplay_crds::EnvironmentsSource {
        file: Some("instances.jsonl".into()),
        ..Default::default()
    });
    assert_eq!(
        resolve(&pool.spec, None),
        Err(EnvironmentsUnavailable::FileOnCluster)
    );
}

/// A run that Succeeded at 12:00 with `ttlSecondsAfterFinished: ttl`.
fn finished_run(ttl: Option<i64>) -> (SelfPlayRun, SelfPlayRunStatus) {
    let mut run: SelfPlayRun = one("run-tiny.yaml");
    run.spec.ttl_seconds_after_finished = ttl;
    let st = SelfPlayRunStatus {
        phase: Some(RunPhase::Succeeded),
        completion_time: Some(Time(ts(NOW))),
        ..Default::default()
    };
    (run, st)
}

#[test]
fn finished_run_is_kept_until_its_ttl_then_deleted() {
    let (run, st) = finished_run(Some(3600));

    // 10 minutes after: not due; wake up when the remaining 50 minutes are over.
    let plan = decide_run(&run.spec, Some(&st), &obs("2025-06-01T12:10:00Z"));
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(3000)));
    assert_eq!(plan.status.phase, Some(RunPhase::Succeeded));

    // One second before: still kept.
    let plan = decide_run(&run.spec, Some(&st), &obs("2025-06-01T12:59:59Z"));
    assert!(plan.actions.is_empty());
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(1)));

    // Due (and long past due): the run itself is deleted, nothing else happens.
    for (now, ago) in [
        ("2025-06-01T13:00:00Z", 3600),
        ("2025-06-03T12:00:00Z", 172800),
    ] {
        let plan = decide_run(&run.spec, Some(&st), &obs(now));
        assert_eq!(
            plan.actions,
            [RunAction::DeleteRun {
                finished_seconds_ago: ago
            }],
            "at {now}"
        );
    }

    // A leftover trainer is stopped in the same reconcile, before the run goes.
    let mut o = obs("2025-06-01T13:00:00Z");
    o.trainers = vec![trainer(0, TrainerPhase::Running)];
    let plan = decide_run(&run.spec, Some(&st), &o);
    assert_eq!(
        plan.actions,
        [
            RunAction::DeleteTrainer {
                name: "qwen-ssr-trainer-0".into(),
                reason: "RunFinished"
            },
            RunAction::DeleteRun {
                finished_seconds_ago: 3600
            }
        ]
    );
}

#[test]
fn finished_run_without_a_ttl_is_kept() {
    let (run, st) = finished_run(None);
    let plan = decide_run(&run.spec, Some(&st), &obs("2030-01-01T00:00:00Z"));
    assert!(plan.actions.is_empty());
    assert_eq!(plan.requeue_after, None);
    assert_eq!(plan.status.phase, Some(RunPhase::Succeeded));
    assert_eq!(plan.status.completion_time, st.completion_time);

    // Failed runs too.
    let failed = SelfPlayRunStatus {
        phase: Some(RunPhase::Failed),
        ..st
    };
    let plan = decide_run(&run.spec, Some(&failed), &obs("2030-01-01T00:00:00Z"));
    assert!(plan.actions.is_empty());
}

#[test]
fn ttl_of_zero_deletes_on_the_reconcile_after_the_one_that_finished() {
    let (run, _) = finished_run(Some(0));
    let running = SelfPlayRunStatus {
        phase: Some(RunPhase::Running),
        progress: Some(selfplay_crds::ProgressSnapshot {
            step: 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut o = obs(NOW);
    o.trainers = vec![trainer(0, TrainerPhase::Succeeded)];

    // The reconcile that sees the trainer succeed writes Succeeded (and its events) first.
    let plan = decide_run(&run.spec, Some(&running), &o);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.phase, Some(RunPhase::Succeeded));
    assert_eq!(plan.status.completion_time, Some(Time(ts(NOW))));
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(1)));

    // The next one deletes it.
    let plan = decide_run(&run.spec, Some(&plan.status), &o);
    assert_eq!(
        plan.actions,
        [RunAction::DeleteRun {
            finished_seconds_ago: 0
        }]
    );
}

#[test]
fn run_failing_its_deadline_wakes_up_when_its_ttl_is_due() {
    let mut run: SelfPlayRun = one("run-gpu.yaml");
    run.spec.active_deadline_seconds = Some(3600);
    run.spec.ttl_seconds_after_finished = Some(600);
    let st = SelfPlayRunStatus {
        phase: Some(RunPhase::Running),
        start_time: Some(Time(ts("2025-06-01T10:00:00Z"))),
        ..Default::default()
    };
    let plan = decide_run(&run.spec, Some(&st), &obs("2025-06-01T11:00:00Z"));
    assert_eq!(plan.status.phase, Some(RunPhase::Failed));
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(600)));
}

#[test]
fn finished_run_without_a_completion_time_counts_from_when_it_is_seen() {
    let (run, mut st) = finished_run(Some(60));
    st.completion_time = None;
    let plan = decide_run(&run.spec, Some(&st), &obs(NOW));
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.completion_time, Some(Time(ts(NOW))));
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(60)));
}

#[test]
fn run_created_suspended_never_gets_a_trainer_until_unsuspended() {
    // How a queue (Kueue) holds a run: created with suspend: true, admitted by setting it false.
    let mut run: SelfPlayRun = one("run-gpu.yaml");
    run.spec.suspend = true;
    let plan = decide_run(&run.spec, None, &obs(NOW));
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.phase, Some(RunPhase::Suspended));
    assert_eq!(
        cond(&plan.status, ConditionType::Suspended),
        ("True", "Suspended")
    );
    assert_eq!(plan.status.start_time, None, "the deadline has not started");
    let queued = plan.status;

    run.spec.suspend = false;
    let plan = decide_run(&run.spec, Some(&queued), &obs("2025-06-01T15:00:00Z"));
    assert_eq!(
        plan.actions,
        [RunAction::CreateTrainer {
            attempt: 0,
            resume: None
        }]
    );
    // Time spent queued before the first start is not "suspended time": it was never active.
    assert_eq!(plan.status.suspended_seconds, 0);
    assert_eq!(
        cond(&plan.status, ConditionType::Suspended),
        ("False", "Resumed")
    );
}
