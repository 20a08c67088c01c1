//! The reward table (DESIGN.md step 5, method.md "Injector reward") and higher-order bug
//! construction.

use std::collections::BTreeSet;

use selfplay_trainer::engine::ops::TestStatus;
use selfplay_trainer::engine::rewards::{DEFAULT_ALPHA, injector_reward, solver_reward};
use selfplay_trainer::engine::solver::{BugTask, MAX_BUG_ORDER, grade};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn solver_rewards() {
    assert_eq!(solver_reward(true), 1.0);
    assert_eq!(solver_reward(false), -1.0);
}

#[test]
fn injector_reward_table() {
    let a = DEFAULT_ALPHA;
    assert_eq!(a, 0.8);
    // Invalid: −1, whatever the solvers did.
    assert_eq!(injector_reward(false, 0, 8, a), Some(-1.0));
    assert_eq!(injector_reward(false, 3, 8, a), Some(-1.0));
    // s = 0 and s = 1: −α.
    assert_eq!(injector_reward(true, 0, 8, a), Some(-0.8));
    assert_eq!(injector_reward(true, 8, 8, a), Some(-0.8));
    // In between: 1 − (1+α)·s.
    let cases = [
        (1, 8, 1.0 - 1.8 / 8.0),
        (4, 8, 1.0 - 1.8 * 0.5),
        (7, 8, 1.0 - 1.8 * 7.0 / 8.0),
        (1, 3, 1.0 - 1.8 / 3.0),
    ];
    for (solved, n, expected) in cases {
        let r = injector_reward(true, solved, n, a).unwrap();
        assert!(close(r, expected), "{solved}/{n}: {r} vs {expected}");
    }
    // Positive only below s = 1/(1+α) ≈ 0.556.
    assert!(injector_reward(true, 5, 10, a).unwrap() > 0.0);
    assert!(close(injector_reward(true, 5, 9, a).unwrap(), 0.0));
    assert!(injector_reward(true, 6, 10, a).unwrap() < 0.0);
    // Another α.
    assert!(close(
        injector_reward(true, 1, 4, 0.5).unwrap(),
        1.0 - 1.5 * 0.25
    ));
    assert_eq!(injector_reward(true, 4, 4, 0.5), Some(-0.5));
    // No graded attempt: masked.
    assert_eq!(injector_reward(true, 0, 0, a), None);
}

fn task() -> BugTask {
    BugTask {
        bug_inject_diff: "--- a/m.py\n+++ b/m.py\n@@ -1 +1 @@\n-a\n+b\n".into(),
        test_weaken_diff: "--- a/t.py\n+++ b/t.py\n@@ -1,2 +1 @@\n x\n-y\n".into(),
        test_files: vec!["t.py".into()],
        test_script: "true".into(),
        test_parser: "print('{}')".into(),
        original_passing: ["t1", "t2"].into_iter().map(String::from).collect(),
        order: 1,
        failed_patches: vec![],
    }
}

#[test]
fn higher_order_bugs() {
    let t = task();
    let patch = "--- a/m.py\n+++ b/m.py\n@@ -1 +1 @@\n-b\n+c\n";
    let o2 = t.higher_order(patch).expect("order 2");
    assert_eq!(o2.order, 2);
    assert_eq!(o2.failed_patches, [patch]);
    // Everything else is the parent's: same oracle, same grading set, same task text.
    assert_eq!(o2.original_passing, t.original_passing);
    assert_eq!(o2.test_files, t.test_files);
    assert_eq!(o2.task_diff().unwrap(), t.task_diff().unwrap());
    assert_eq!(
        t.task_diff().unwrap(),
        "--- a/t.py\n+++ b/t.py\n@@ -1 +1,2 @@\n x\n+y\n"
    );
    // Order 2 is the limit; an empty patch is the same bug, not a new one.
    assert_eq!(MAX_BUG_ORDER, 2);
    assert!(o2.higher_order(patch).is_none());
    assert!(t.higher_order("  \n").is_none());
}

#[test]
fn grading_is_per_test() {
    let passing: BTreeSet<String> = ["a", "b"].into_iter().map(String::from).collect();
    let st = |v: &[(&str, TestStatus)]| v.iter().map(|(k, s)| (k.to_string(), *s)).collect();
    let (ok, f) = grade(
        &passing,
        &st(&[
            ("a", TestStatus::Passed),
            ("b", TestStatus::Passed),
            ("c", TestStatus::Failed),
        ]),
    );
    assert!(
        ok && f.is_empty(),
        "tests outside the grading set do not count"
    );
    let (ok, f) = grade(&passing, &st(&[("a", TestStatus::Passed)]));
    assert!(!ok);
    assert_eq!(f, ["b"], "a missing test fails");
    let (ok, f) = grade(
        &passing,
        &st(&[("a", TestStatus::Passed), ("b", TestStatus::Skipped)]),
    );
    assert!(!ok);
    assert_eq!(f, ["b"]);
    assert!(
        !grade(&BTreeSet::new(), &st(&[])).0,
        "an empty grading set solves nothing"
    );
}
