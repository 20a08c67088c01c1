//! Persistent bash sessions.

mod common;

use std::time::{Duration, Instant};

use sandbox_sidecar::client::{Limits, SessionOpenRequest, limits_with_timeout};

#[tokio::test]
async fn cwd_and_env_persist_and_exit_codes_come_back() {
    let h = common::start().await;
    std::fs::create_dir_all(h.path("pkg/inner")).unwrap();
    let c = &h.client;
    let r = c
        .session_run(
            "s",
            "cd pkg/inner && export GREETING=hello && X=local",
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0);
    let r = c
        .session_run("s", "pwd; echo $GREETING $X", None)
        .await
        .unwrap();
    let out = String::from_utf8(r.stdout).unwrap();
    assert!(
        out.starts_with(&format!(
            "{}\n",
            h.path("pkg/inner").canonicalize().unwrap().display()
        )),
        "{out}"
    );
    assert!(out.ends_with("hello local\n"), "{out}");
    let r = c.session_run("s", "false", None).await.unwrap();
    assert_eq!(r.exit_code, 1);
    let r = c.session_run("s", "(exit 42)", None).await.unwrap();
    assert_eq!(r.exit_code, 42);
    // Output without a trailing newline is returned exactly.
    let r = c
        .session_run("s", "printf abc; printf err >&2", None)
        .await
        .unwrap();
    assert_eq!(r.stdout, b"abc");
    assert_eq!(r.stderr, b"err");
    // A syntax error is the command's failure, not the session's.
    let r = c.session_run("s", "if then fi (", None).await.unwrap();
    assert_eq!(r.exit_code, 2);
    let r = c.session_run("s", "echo $GREETING", None).await.unwrap();
    assert_eq!(r.stdout, b"hello\n");
    assert!(!r.session_restarted);
    // Commands cannot read the protocol: stdin is /dev/null.
    let r = c.session_run("s", "cat; echo after", None).await.unwrap();
    assert_eq!(r.stdout, b"after\n");
}

#[tokio::test]
async fn sessions_are_isolated_and_run_concurrently() {
    let h = common::start().await;
    let mut tasks = Vec::new();
    let start = Instant::now();
    for i in 0..6 {
        let c = h.client.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("s{i}");
            c.session_run(&id, &format!("export MINE={i}; cd /tmp"), None)
                .await
                .unwrap();
            let r = c
                .session_run(&id, "sleep 0.5; echo $MINE $(pwd)", None)
                .await
                .unwrap();
            (i, String::from_utf8(r.stdout).unwrap())
        }));
    }
    for t in tasks {
        let (i, out) = t.await.unwrap();
        assert_eq!(out, format!("{i} /tmp\n"));
    }
    // Six half-second commands in parallel, not in series.
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
    let health = h.client.health().await.unwrap();
    assert_eq!(health.sessions_active, 6);
    assert!(h.client.session_close("s0").await.unwrap());
    assert!(!h.client.session_close("s0").await.unwrap());
    assert_eq!(h.client.health().await.unwrap().sessions_active, 5);
}

#[tokio::test]
async fn timeout_kills_everything_and_the_next_reply_says_the_session_restarted() {
    let h = common::start().await;
    let c = &h.client;
    let marker = "sleep 100.5151";
    c.session_run("t", "cd /tmp; export KEEP=1", None)
        .await
        .unwrap();
    let r = c
        .session_run(
            "t",
            &format!("bash -c '{marker} & {marker}'"),
            Some(limits_with_timeout(Duration::from_millis(400))),
        )
        .await
        .unwrap();
    assert!(r.timed_out);
    assert!(r.notice.contains("timed out"), "{}", r.notice);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !common::processes_matching(marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left running: {:?}",
            common::processes_matching(marker)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = c
        .session_run("t", "echo \"[$KEEP]\"; pwd", None)
        .await
        .unwrap();
    assert!(r.session_restarted);
    assert!(r.notice.contains("restarted"), "{}", r.notice);
    let out = String::from_utf8(r.stdout).unwrap();
    assert!(out.starts_with("[]\n"), "{out}");
    let r = c.session_run("t", "true", None).await.unwrap();
    assert!(!r.session_restarted);
}

#[tokio::test]
async fn background_job_in_a_session_keeps_running_until_timeout_or_close() {
    let h = common::start().await;
    let marker = "sleep 100.6161";
    let r = h
        .client
        .session_run("bg", &format!("{marker} &"), None)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0);
    // The reply can beat the background job's exec of `sleep`; wait for it to show.
    let deadline = Instant::now() + Duration::from_secs(3);
    while common::processes_matching(marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the background job never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(common::processes_matching(marker).len(), 1);
    h.client.session_close("bg").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !common::processes_matching(marker).is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn exit_ends_the_shell_and_the_next_command_gets_a_new_one() {
    let h = common::start().await;
    let c = &h.client;
    let r = c.session_run("e", "echo bye; exit 5", None).await.unwrap();
    assert_eq!(r.exit_code, 5);
    assert_eq!(r.stdout, b"bye\n");
    let r = c.session_run("e", "echo again", None).await.unwrap();
    assert!(r.session_restarted);
    assert_eq!(r.stdout, b"again\n");
}

#[tokio::test]
async fn large_and_binary_output_in_a_session() {
    let h = common::start().await;
    let start = Instant::now();
    let r = h
        .client
        .session_run(
            "big",
            "head -c 10000000 /dev/zero | tr '\\0' y; printf '\\xff\\xfe'",
            None,
        )
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(r.truncated);
    assert_eq!(r.stdout_total_bytes, 10_000_002);
    assert!(r.stdout.ends_with(&[b'y', 0xff, 0xfe]));
    // The session is still in sync afterwards.
    let r = h.client.session_run("big", "echo ok", None).await.unwrap();
    assert_eq!(r.stdout, b"ok\n");
}

#[tokio::test]
async fn open_with_cwd_env_and_a_small_cap() {
    let h = common::start().await;
    std::fs::create_dir_all(h.path("d")).unwrap();
    let r = h
        .client
        .session_open(SessionOpenRequest {
            session_id: "o".into(),
            cwd: "d".into(),
            env: [("ABC".to_string(), "xyz".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.created);
    let r = h
        .client
        .session_run(
            "o",
            "echo $ABC; basename $(pwd); seq 1 100000",
            Some(Limits {
                output_cap_bytes: 100,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let out = String::from_utf8(r.stdout).unwrap();
    assert!(out.starts_with("xyz\nd\n1\n"), "{out}");
    assert!(out.ends_with("99999\n100000\n"), "{out}");
    assert!(r.truncated);
    let again = h
        .client
        .session_open(SessionOpenRequest {
            session_id: "o".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!again.created);
    // A session cwd outside the workspace is refused.
    let e = h
        .client
        .session_open(SessionOpenRequest {
            session_id: "p".into(),
            cwd: "../".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, sandbox_sidecar::client::Error::PathRefused(_)),
        "{e:?}"
    );
}

#[tokio::test]
async fn command_text_arrives_exactly_inline_or_through_a_file() {
    let h = common::start().await;
    let c = &h.client;
    // Quotes, backslashes, leading blanks, a heredoc and trailing newlines survive.
    let cmd = "  printf '%s|' 'a  b' \"c\\\\d\" e\\\\f\ncat <<'EOF'\n  x $HOME \\n\nEOF\n\n\n";
    let r = c.session_run("s", cmd, None).await.unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(
        String::from_utf8(r.stdout).unwrap(),
        "a  b|c\\d|e\\f|  x $HOME \\n\n"
    );
    // An unterminated quote is a syntax error of that command alone.
    let r = c.session_run("s", "echo 'open", None).await.unwrap();
    assert_eq!(r.exit_code, 2);
    assert!(!r.session_restarted);
    // A command longer than the inline limit goes through a file, same semantics.
    let long = format!("V={}; echo ${{#V}}; X=kept", "y".repeat(40_000));
    let r = c.session_run("s", &long, None).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"40000\n"[..]));
    let r = c.session_run("s", "echo $X; (exit 3)", None).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (3, &b"kept\n"[..]));
    // A NUL byte cannot travel inline; the command still runs (bash drops the NUL).
    let r = c.session_run("s", "echo a\0b", None).await.unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(!r.session_restarted);
    let r = c.session_run("s", "echo still here", None).await.unwrap();
    assert_eq!(r.stdout, b"still here\n");
}

#[tokio::test]
async fn commands_run_at_the_top_level_of_the_shell() {
    let h = common::start().await;
    let c = &h.client;
    // Not inside a function: `declare` makes globals, `local` and `return` are errors.
    let r = c
        .session_run("s", "declare -A M=([k]=v); declare N=1", None)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let r = c.session_run("s", "echo ${M[k]}$N", None).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"v1\n"[..]));
    let r = c.session_run("s", "local x=1", None).await.unwrap();
    assert_eq!(r.exit_code, 1, "{r:?}");
    let r = c.session_run("s", "return 7", None).await.unwrap();
    assert_eq!(r.exit_code, 2, "{r:?}");
    // A user's own `printf` does not replace the sentinels.
    let r = c
        .session_run("s", "printf() { echo mine; }; printf x", None)
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"mine\n"[..]));
    let r = c.session_run("s", "echo after", None).await.unwrap();
    assert_eq!(
        (r.stdout.as_slice(), r.session_restarted),
        (&b"after\n"[..], false)
    );
}
