//! Whole episodes driven by scripted policies through the real sidecar and the real tool
//! protocol: an injector that reverts a real commit and writes its artifacts (validated),
//! solvers that fix the bug or fail (a higher-order bug), batching, budgets, format errors
//! and infrastructure failures.

mod engine_support;

use std::sync::Arc;

use engine_support::{
    ScriptedPolicy, artifact_set, bash, create, edit, provider, read_asset, sample_fix_calls,
    sample_repo,
};
use selfplay_crds::run::FormatErrorPolicy;
use selfplay_trainer::engine::episode::{Episode, run_episode, run_episodes};
use selfplay_trainer::engine::policy::Policy;
use selfplay_trainer::engine::prompts::ChatMarkup;
use selfplay_trainer::engine::roles::{
    EngineSettings, finish_injector, finish_solver, grade_solver, run_injector, run_solver,
    start_injector, start_solver,
};
use selfplay_trainer::engine::sandbox::SandboxProvider as _;
use selfplay_trainer::engine::solver::BugTask;
use selfplay_trainer::engine::trajectory::{EndReason, Role, Trajectory};
use selfplay_trainer::engine::validation::validate;

const INJECTOR_KEY: &str = "bug injector";
const SOLVER_KEY: &str = "fixing a bug";

fn settings() -> EngineSettings {
    let mut s = EngineSettings::from_settings(&Default::default(), ChatMarkup::chatml()).unwrap();
    s.episode.max_turns = 20;
    s.episode.max_tokens = 60_000;
    s
}

/// An injector that reads `git log`, reverts the code of a real commit, weakens the tests
/// with the editor and bash, writes the other artifacts with `create`, makes one malformed
/// call and one failing edit on the way, checks its parser, and submits.
fn injector_script() -> Vec<String> {
    vec![
        bash("git log --oneline | head -3"),
        bash(
            "mkdir -p .selfplay\n\
             c=$(git log --format=%h --grep='max_length cut at a word boundary')\n\
             git show $c -- tinytext/ | git apply -R && git diff > .selfplay/bug_inject.diff && wc -l .selfplay/bug_inject.diff",
        ),
        edit(
            "tests/test_slug.py",
            "    def test_no_such_test(self):\n",
            "",
        ),
        edit(
            "tests/test_slug.py",
            "    def test_max_length_keeps_whole_words(self):\n        self.assertEqual(slugify(\"The quick brown fox\", max_length=15), \"the-quick-brown\")\n\n    def test_max_length_cuts_a_long_first_word(self):\n        self.assertEqual(slugify(\"Supercalifragilistic\", max_length=5), \"super\")\n",
            "",
        ),
        bash(
            "git rm -q tests/test_package.py && git diff HEAD -- tests > .selfplay/test_weaken.diff",
        ),
        "I think the tests are weakened now, so I will write the remaining files next.".to_string(),
        create(
            ".selfplay/test_files.txt",
            "tests/test_slug.py\ntests/test_package.py\n",
        ),
        create(
            ".selfplay/test_script.sh",
            &read_asset("artifacts/valid/test_script.sh"),
        ),
        create(
            ".selfplay/test_parser.py",
            &read_asset("artifacts/valid/test_parser.py"),
        ),
        bash("bash .selfplay/test_script.sh | python3 .selfplay/test_parser.py | head -c 120"),
        "All five artifacts are written.\n<submit/>".to_string(),
    ]
}

/// A solver that fixes both files of the valid bug (the whole slug.py, the exports).
fn full_fix() -> Vec<String> {
    let mut turns = vec![bash("ls tinytext && git log --oneline 2>&1 | head -2")];
    turns.extend(sample_fix_calls());
    turns.push(bash(
        "python3 -m unittest discover -s tests -t . 2>&1 | tail -1",
    ));
    turns.push("<submit/>".to_string());
    turns
}

fn decode(policy: &dyn Policy, ids: &[u32]) -> String {
    policy.codec().decode(ids)
}

/// Checks the token bookkeeping of a trajectory against what the policy was sent.
fn check_tokens(
    t: &Trajectory,
    policy: &ScriptedPolicy,
    script: &[String],
    max_turns: usize,
    max_tokens: usize,
) {
    let seq = t.sequence();
    assert_eq!(seq.tokens.len(), t.total_tokens());
    assert_eq!(seq.tokens.len(), seq.policy_mask.len());
    assert_eq!(
        seq.policy_mask.iter().filter(|m| **m).count(),
        t.policy_tokens()
    );
    let mut pos = t.prompt_tokens.len();
    for (i, turn) in t.turns.iter().enumerate() {
        // The exact sampled ids and log-probs, unmasked; observations masked.
        assert_eq!(
            turn.policy_tokens,
            policy.codec().encode(&script[i]),
            "turn {i}"
        );
        let lps: Vec<f32> = (0..turn.policy_tokens.len())
            .map(ScriptedPolicy::logprob)
            .collect();
        assert_eq!(turn.policy_logprobs, lps);
        assert_eq!(turn.policy_version, 7);
        assert!(
            seq.policy_mask[pos..pos + turn.policy_tokens.len()]
                .iter()
                .all(|m| *m)
        );
        assert_eq!(
            seq.old_logprobs[pos..pos + turn.policy_tokens.len()],
            lps[..]
        );
        pos += turn.policy_tokens.len();
        assert!(
            seq.policy_mask[pos..pos + turn.observation_tokens.len()]
                .iter()
                .all(|m| !*m)
        );
        pos += turn.observation_tokens.len();
        // Every tool result ends with an exact budget notice.
        if !turn.observation_tokens.is_empty() {
            let obs = decode(policy, &turn.observation_tokens);
            let expected = format!(
                "[budget: {} turns left, {} tokens left]",
                max_turns - (i + 1),
                max_tokens - pos
            );
            assert!(
                obs.contains(&expected),
                "turn {i}: {obs:?} lacks {expected:?}"
            );
            assert!(obs.starts_with("<|im_end|>\n<|im_start|>user\n"), "{obs:?}");
            assert!(obs.ends_with("<|im_start|>assistant\n"), "{obs:?}");
        }
    }
    // Each context the policy saw is a prefix of the final sequence.
    for ctx in policy.contexts.lock().unwrap().iter() {
        if ctx.len() <= seq.tokens.len() && ctx[..] == seq.tokens[..ctx.len()] {
            continue;
        }
        // Contexts of other episodes (batched tests) are checked by their own trajectories.
        assert!(
            !decode(policy, &ctx[..200.min(ctx.len())])
                .contains(&decode(policy, &t.prompt_tokens[..200]))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injector_episode_reverts_a_commit_and_its_artifacts_validate() {
    let (_dir, repo) = sample_repo();
    let p = provider(&repo);
    let script = injector_script();
    let policy = Arc::new(ScriptedPolicy::new(vec![(INJECTOR_KEY, script.clone())]));
    let s = settings();
    let sb = p.acquire("default").await.unwrap();
    let result = run_injector(policy.clone(), sb.client(), &s).await;
    let t = &result.trajectory;
    assert_eq!(t.role, Role::Injector);
    assert_eq!(
        t.end_reason,
        EndReason::Submitted,
        "{:?}",
        result.infra_error
    );
    assert_eq!(t.turns.len(), script.len());
    check_tokens(
        t,
        &policy,
        &script,
        s.episode.max_turns,
        s.episode.max_tokens,
    );
    let obs = |i: usize| decode(policy.as_ref(), &t.turns[i].observation_tokens);
    assert!(
        obs(0).contains("slugify: max_length cut at a word boundary"),
        "{}",
        obs(0)
    );
    assert!(obs(0).contains("[exit code 0]"));
    // The failing edit is a tool error, not a format error.
    assert!(t.turns[2].tool_failed && t.turns[2].format_error.is_none());
    assert!(obs(2).contains("error:"), "{}", obs(2));
    assert!(!t.turns[3].tool_failed, "{}", obs(3));
    // The malformed turn got an error observation and the episode went on.
    assert!(t.turns[5].format_error.is_some() && t.turns[5].tool.is_none());
    assert!(obs(5).contains("not a valid tool call"), "{}", obs(5));
    assert!(
        obs(9).contains("\"tests.test_case.CaseTest.test_camel_case\": \"passed\""),
        "{}",
        obs(9)
    );
    // Validation ran on the original code and passed.
    let report = result.validation.as_ref().expect("validated");
    assert!(report.valid, "{report:#?}");
    assert_eq!(result.failed_check, None);
    assert_eq!(
        report.bug_files,
        ["tinytext/__init__.py", "tinytext/slug.py"]
    );
    let bug = result.bug().expect("a bug for solvers");
    assert_eq!(bug.original_passing.len(), 30);
    // The workspace is the original again (the injector's edits were reset).
    let ws = sb.workspace_path().unwrap();
    assert!(ws.join("tests/test_package.py").exists());
    assert!(!ws.join(".selfplay").exists());
    sb.release().await.unwrap();

    // The same bug, solved by one solver and missed by another: s = 1/2.
    let solved = {
        let policy = Arc::new(ScriptedPolicy::new(vec![(SOLVER_KEY, full_fix())]));
        let r = run_solver(policy.clone(), &p, "default", &bug, &s).await;
        check_tokens(
            &r.trajectory,
            &policy,
            &full_fix(),
            s.episode.max_turns,
            s.episode.max_tokens,
        );
        // The history is one fresh commit: nothing of the original's.
        let first = decode(policy.as_ref(), &r.trajectory.turns[0].observation_tokens);
        assert!(first.contains("Initial commit"), "{first}");
        assert!(!first.contains("tinytext 0."), "{first}");
        r
    };
    assert!(solved.solved(), "{:#?}", solved.evaluation);
    assert_eq!(solved.reward(), Some(1.0));
    assert!(solved.patch.code.contains("+++ b/tinytext/slug.py"));
    assert!(
        solved.higher_order_bug(&bug).is_none(),
        "solved attempts make no bug"
    );
    assert_eq!(result.reward(1, 2, s.alpha), Some(1.0 - 1.8 * 0.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_solver_patch_becomes_an_order_2_bug() {
    let (_dir, repo) = sample_repo();
    let p = provider(&repo);
    let s = settings();
    let a = artifact_set("valid");
    let sb = p.acquire("default").await.unwrap();
    let report = validate(sb.client(), &a, &s.validation).await.unwrap();
    sb.release().await.unwrap();
    let bug = BugTask::from_validated(&a, &report).unwrap();

    // A solver that fixes only the exports, and edits a test file on the way.
    let partial = vec![
        edit(
            "tinytext/__init__.py",
            "from .slug import slugify\n",
            "from .slug import slugify\nfrom .stats import word_count, top_words\nfrom .case import snake_case, camel_case\n",
        ),
        edit(
            "tinytext/__init__.py",
            "__all__ = [\"wrap\", \"fill\", \"slugify\"]\n",
            "__all__ = [\"wrap\", \"fill\", \"slugify\", \"word_count\", \"top_words\", \"snake_case\", \"camel_case\"]\n",
        ),
        edit(
            "tests/test_slug.py",
            "    def test_simple(self):\n",
            "    def test_simple_renamed(self):\n",
        ),
        "<submit/>".to_string(),
    ];
    let policy = Arc::new(ScriptedPolicy::new(vec![(SOLVER_KEY, partial)]));
    let failed = run_solver(policy, &p, "default", &bug, &s).await;
    let eval = failed.evaluation.as_ref().unwrap();
    assert!(!eval.solved);
    assert_eq!(failed.reward(), Some(-1.0));
    assert_eq!(eval.failing.len(), 2, "{eval:#?}");
    // The full patch has the test edit; the code patch (what an order-2 bug is made of) not,
    // and the dropped file is recorded.
    assert!(failed.patch.full.contains("tests/test_slug.py"));
    assert!(!failed.patch.code.contains("tests/test_slug.py"));
    assert_eq!(failed.patch.dropped, ["tests/test_slug.py"]);
    assert!(failed.patch.code.contains("tinytext/__init__.py"));

    let order2 = failed.higher_order_bug(&bug).expect("an order-2 bug");
    assert_eq!(order2.order, 2);
    assert_eq!(
        order2.failed_patches,
        std::slice::from_ref(&failed.patch.code)
    );
    assert_eq!(order2.original_passing, bug.original_passing);
    assert!(
        order2.higher_order("--- a/x\n+++ b/x\n").is_none(),
        "order 2 is the limit"
    );

    // An order-2 solver starts from the failed attempt: the exports are there already.
    let slug = read_asset("sample-repo/tinytext/slug.py");
    let policy = Arc::new(ScriptedPolicy::new(vec![(
        SOLVER_KEY,
        vec![
            bash("grep -c word_count tinytext/__init__.py"),
            create("tinytext/slug.py", &slug),
            "<submit/>".into(),
        ],
    )]));
    let r = run_solver(policy.clone(), &p, "default", &order2, &s).await;
    assert_eq!(r.order, 2);
    let obs = decode(policy.as_ref(), &r.trajectory.turns[0].observation_tokens);
    assert!(obs.contains("2\n[exit code 0]"), "{obs}");
    assert!(r.solved(), "{:#?}", r.evaluation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn episodes_run_batched_in_their_own_sandboxes() {
    let (_dir, repo) = sample_repo();
    let p = provider(&repo);
    let s = settings();
    let a = artifact_set("valid");
    let sb = p.acquire("default").await.unwrap();
    let bug = BugTask::from_validated(&a, &validate(sb.client(), &a, &s.validation).await.unwrap())
        .unwrap();
    sb.release().await.unwrap();

    let inj_script = injector_script();
    let policy = Arc::new(ScriptedPolicy::new(vec![
        (INJECTOR_KEY, inj_script.clone()),
        (SOLVER_KEY, full_fix()),
    ]));
    let (sb1, sb2) = (
        p.acquire("default").await.unwrap(),
        p.acquire("default").await.unwrap(),
    );
    let inj = start_injector(sb1.client(), policy.codec(), &s)
        .await
        .unwrap();
    let sol = start_solver(sb2.client(), &bug, policy.codec(), &s)
        .await
        .unwrap();
    let mut eps = vec![inj, sol];
    run_episodes(policy.clone(), &mut eps, &[sb1.client(), sb2.client()]).await;
    // Rounds of two contexts while both ran, then the injector alone.
    let batches: Vec<usize> = {
        let ctx = policy.contexts.lock().unwrap().len();
        let calls = policy.params.lock().unwrap().len();
        vec![ctx, calls]
    };
    assert_eq!(batches[0], inj_script.len() + full_fix().len());
    assert_eq!(
        batches[1],
        inj_script.len(),
        "the solver's turns were batched with the injector's"
    );
    let [inj, sol]: [Episode; 2] = eps.try_into().ok().unwrap();
    let inj = finish_injector(sb1.client(), inj.into_trajectory(), &s).await;
    let mut sol = finish_solver(sb2.client(), &bug, sol.into_trajectory()).await;
    grade_solver(&p, "default", &bug, &mut sol, &s).await;
    assert!(inj.valid(), "{:#?}", inj.validation);
    assert!(sol.solved(), "{:#?}", sol.evaluation);
    sb1.release().await.unwrap();
    sb2.release().await.unwrap();
}

async fn one_episode(s: &EngineSettings, turns: Vec<String>) -> (Trajectory, Arc<ScriptedPolicy>) {
    let (_dir, repo) = sample_repo();
    let p = provider(&repo);
    let sb = p.acquire("default").await.unwrap();
    let policy = Arc::new(ScriptedPolicy::new(vec![(INJECTOR_KEY, turns)]));
    let ep = start_injector(sb.client(), policy.codec(), s)
        .await
        .unwrap();
    let t = run_episode(policy.clone(), ep, sb.client()).await;
    sb.release().await.unwrap();
    (t, policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_and_format_errors_end_episodes() {
    // Out of turns: the last turn runs but gets no observation.
    let mut s = settings();
    s.episode.max_turns = 3;
    let (t, _) = one_episode(&s, (0..5).map(|i| bash(&format!("echo {i}"))).collect()).await;
    assert_eq!(t.end_reason, EndReason::OutOfTurns);
    assert_eq!(t.turns.len(), 3);
    assert!(t.turns[2].observation_tokens.is_empty() && !t.turns[1].observation_tokens.is_empty());

    // Out of tokens: the output of `seq` does not fit the episode's budget.
    let mut s = settings();
    let prompt_len = {
        let (t, _) = one_episode(&s, vec!["<submit/>".into()]).await;
        t.prompt_tokens.len()
    };
    s.episode.max_tokens = prompt_len + 400;
    let (t, _) = one_episode(
        &s,
        vec![bash("echo small"), bash("seq 1 1000"), bash("echo never")],
    )
    .await;
    assert_eq!(t.end_reason, EndReason::OutOfTokens);
    assert_eq!(t.turns.len(), 2);
    assert!(t.total_tokens() <= s.episode.max_tokens);

    // A turn cut by the per-turn limit is a format error (observed).
    let mut s = settings();
    s.episode.max_tokens_per_turn = 16;
    let (t, p) = one_episode(
        &s,
        vec![
            bash("echo this command is far too long for the limit"),
            "<submit/>".into(),
        ],
    )
    .await;
    assert_eq!(t.end_reason, EndReason::Submitted);
    assert_eq!(t.turns[0].policy_tokens.len(), 16);
    let obs = p.codec().decode(&t.turns[0].observation_tokens);
    assert!(obs.contains("limit of 16 tokens"), "{obs}");
    assert!(
        p.params
            .lock()
            .unwrap()
            .iter()
            .all(|x| x.max_new_tokens == 16 && x.stop.contains(&"</bash>".to_string()))
    );

    // Format errors end the episode when configured so.
    let mut s = settings();
    s.episode.format_error_policy = FormatErrorPolicy::EndEpisode;
    let (t, _) = one_episode(
        &s,
        vec![bash("true"), "no call here".into(), bash("echo never")],
    )
    .await;
    assert_eq!(t.end_reason, EndReason::FormatError);
    assert_eq!(t.turns.len(), 2);
}
