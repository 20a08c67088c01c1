//! Test runs leave no processes behind, and a clean start also empties the scratch
//! directories and kills what the agent daemonised.

mod common;

use sandbox_sidecar::proto::{BuiltinParser, RunTestsRequest};

fn req(script: String, clean_start: bool) -> RunTestsRequest {
    RunTestsRequest {
        script,
        builtin: BuiltinParser::Unittest as i32,
        clean_start,
        ..Default::default()
    }
}

async fn stdout_of(h: &common::Harness, script: String, clean: bool) -> String {
    let r = h.client.run_tests(req(script, clean)).await.unwrap();
    String::from_utf8_lossy(&r.run.unwrap().stdout).into_owned()
}

#[tokio::test]
async fn daemons_and_scratch_files_do_not_survive() {
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path().display().to_string();
    let h = common::start_with(|o| {
        o.extra_args.extend(["--scratch-dir".into(), s.clone()]);
    })
    .await;
    // The test script's own daemon is killed once it ends.
    let out = stdout_of(
        &h,
        format!(
            "setsid sleep 1001 </dev/null >/dev/null 2>&1 & echo hi > {s}/from-test; echo started"
        ),
        false,
    )
    .await;
    assert!(out.contains("started"), "{out}");
    assert!(common::processes_matching("sleep 1001").is_empty());
    assert!(
        scratch.path().join("from-test").exists(),
        "no clean start asked"
    );

    // What the agent left: a daemon (double fork, own session), files, a locked directory
    // and a symlink pointing out of the scratch directory.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep-me"), "x").unwrap();
    let r = h
        .client
        .exec_shell(
            &format!(
                "(setsid nohup sleep 1002 </dev/null >/dev/null 2>&1 &) ; \
                 mkdir -p {s}/locked/deep && touch {s}/locked/deep/f {s}/.hidden && \
                 chmod 000 {s}/locked/deep {s}/locked && ln -s {} {s}/link",
                outside.path().display()
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    h.client
        .session_run(
            "agent",
            "setsid sleep 1003 </dev/null >/dev/null 2>&1 &",
            None,
        )
        .await
        .unwrap();
    // The daemons fork on their own time (setsid forks again): wait until both run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (common::processes_matching("sleep 1002").is_empty()
        || common::processes_matching("sleep 1003").is_empty())
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(common::processes_matching("sleep 1002").len(), 1);
    assert_eq!(common::processes_matching("sleep 1003").len(), 1);

    let out = stdout_of(
        &h,
        format!("pgrep -f 'sleep 100[23]' | wc -l; ls -A {s} | wc -l"),
        true,
    )
    .await;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "0"],
        "{out}"
    );
    assert!(common::processes_matching("sleep 100").is_empty());
    assert!(
        outside.path().join("keep-me").exists(),
        "symlinks are not followed"
    );
    assert!(scratch.path().exists());
    assert_eq!(h.client.health().await.unwrap().sessions_active, 0);
    // The sessions still work, afresh.
    let r = h
        .client
        .session_run("agent", "echo back", None)
        .await
        .unwrap();
    assert_eq!(r.stdout, b"back\n");

    // A script counting its runs in the scratch directory always sees its first run.
    let count = format!(
        "n=$(cat {s}/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > {s}/count; echo count=$n"
    );
    for _ in 0..2 {
        assert!(stdout_of(&h, count.clone(), true).await.contains("count=1"));
    }
    assert!(
        stdout_of(&h, count.clone(), false)
            .await
            .contains("count=2")
    );
}

#[tokio::test]
async fn the_state_directory_inside_a_scratch_directory_is_kept() {
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path().to_path_buf();
    let h = common::start_with(|o| {
        // Spelled with a `.` so that only real paths compare equal.
        o.extra_args[1] = s.join("./deeper/state").display().to_string();
        o.extra_args
            .extend(["--scratch-dir".into(), s.display().to_string()]);
    })
    .await;
    h.write("a.txt", "one");
    h.client.snapshot(None, &[]).await.unwrap();
    std::fs::write(s.join("junk"), "x").unwrap();
    std::fs::write(s.join("deeper/junk"), "x").unwrap();
    let out = stdout_of(&h, "echo ran".into(), true).await;
    assert!(out.contains("ran"));
    assert!(!s.join("junk").exists());
    assert!(!s.join("deeper/junk").exists());
    h.write("a.txt", "two");
    h.client.reset(None).await.unwrap();
    assert_eq!(h.read("a.txt"), "one", "the snapshot store survived");
}
