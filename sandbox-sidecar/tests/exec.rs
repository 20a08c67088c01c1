//! One-off commands: argv and shell, stdin, env, cwd, limits, binary output, streaming.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use sandbox_sidecar::client::{ExecRequest, Limits, exec_event};

#[tokio::test]
async fn argv_shell_stdin_env_cwd() {
    let h = common::start().await;
    std::fs::create_dir_all(h.path("sub")).unwrap();
    let r = h
        .client
        .exec_argv(&["printf", "%s-%s", "a b", "c"], None)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stdout, b"a b-c");

    let r = h
        .client
        .exec(ExecRequest {
            shell: "cat; echo \"$FOO\" >&2; pwd; exit 7".into(),
            stdin: b"from stdin\n".to_vec(),
            env: [("FOO".to_string(), "bar".to_string())].into(),
            cwd: "sub".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.exit_code, 7);
    let out = String::from_utf8(r.stdout).unwrap();
    assert!(out.starts_with("from stdin\n"), "{out}");
    assert!(out.trim_end().ends_with("/ws/sub"), "{out}");
    assert_eq!(r.stderr, b"bar\n");
    assert!(!r.timed_out && !r.truncated);
}

#[tokio::test]
async fn missing_program_is_a_result_not_an_error() {
    let h = common::start().await;
    let r = h
        .client
        .exec_argv(&["definitely-not-a-program-xyz"], None)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 127);
    assert!(String::from_utf8_lossy(&r.stderr).contains("definitely-not-a-program-xyz"));
}

#[tokio::test]
async fn invalid_utf8_output_survives() {
    let h = common::start().await;
    let r = h
        .client
        .exec_shell(r"printf '\xff\xfe\x00ok\x80'; printf '\xc3\x28' >&2", None)
        .await
        .unwrap();
    assert_eq!(r.stdout, vec![0xff, 0xfe, 0x00, b'o', b'k', 0x80]);
    assert_eq!(r.stderr, vec![0xc3, 0x28]);
}

#[tokio::test]
async fn ten_megabytes_come_back_capped_and_fast() {
    let h = common::start().await;
    let start = Instant::now();
    // 10,000,000 bytes: a numbered first line, filler, a numbered last line.
    let r = h
        .client
        .exec_shell(
            "echo FIRST; head -c 9999980 /dev/zero | tr '\\0' x; echo; echo LAST",
            None,
        )
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(r.exit_code, 0);
    assert!(r.truncated);
    assert_eq!(r.stdout_total_bytes, 6 + 9_999_980 + 1 + 5);
    assert!(r.stdout.len() <= 480 * 1024 + 100, "{}", r.stdout.len());
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.starts_with("FIRST\n"));
    assert!(text.ends_with("\nLAST\n"));
    assert!(text.contains("bytes omitted"));
    // The bench measures the real latency; here only guard against pathologies (debug build,
    // shared 2-core machine).
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test]
async fn timeout_kills_the_whole_process_tree() {
    let h = common::start().await;
    let marker = "sleep 100.4242";
    let start = Instant::now();
    let r = h
        .client
        .exec_shell(
            &format!("bash -c '{marker} & {marker}' & {marker}"),
            Some(Duration::from_millis(500)),
        )
        .await
        .unwrap();
    assert!(r.timed_out);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(r.notice.contains("timed out"));
    // Killed processes may take a moment to disappear from /proc.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = common::processes_matching(marker);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left running: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn background_jobs_that_left_the_process_group_are_killed_on_timeout() {
    let h = common::start().await;
    let marker = "sleep 100.4343";
    // `set -m` puts the background job in its own process group (same session).
    let r = h
        .client
        .exec_shell(
            &format!("set -m; {marker} & sleep 100"),
            Some(Duration::from_millis(400)),
        )
        .await
        .unwrap();
    assert!(r.timed_out);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !common::processes_matching(marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left running: {:?}",
            common::processes_matching(marker)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn rlimits_apply() {
    let h = common::start().await;
    // File size: writing past 1 MiB fails with SIGXFSZ / EFBIG.
    let r = h
        .client
        .exec(ExecRequest {
            shell: "head -c 2000000 /dev/zero > big.bin".into(),
            limits: Some(Limits {
                max_file_size_bytes: 1 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_ne!(r.exit_code, 0);
    assert_eq!(std::fs::metadata(h.path("big.bin")).unwrap().len(), 1 << 20);

    // Memory: a 512 MiB allocation fails under a 256 MiB address-space limit.
    let r = h
        .client
        .exec(ExecRequest {
            argv: vec![
                "python3".into(),
                "-c".into(),
                "b = bytearray(512 * 1024 * 1024)".into(),
            ],
            limits: Some(Limits {
                memory_bytes: 256 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_ne!(r.exit_code, 0);
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("MemoryError"),
        "{r:?}"
    );

    // Processes: with RLIMIT_NPROC at 1 (counted per user) a fork fails.
    let r = h
        .client
        .exec(ExecRequest {
            argv: vec![
                "python3".into(),
                "-c".into(),
                "import os\ntry:\n os.fork()\nexcept OSError as e:\n print('fork failed', e.errno)"
                    .into(),
            ],
            limits: Some(Limits {
                max_processes: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&r.stdout);
    // Root ignores RLIMIT_NPROC; everyone else must see the fork refused.
    if is_root() {
        eprintln!(
            "running as root: RLIMIT_NPROC does not bind root, only checked that it was accepted"
        );
        assert_eq!(r.exit_code, 0);
    } else {
        assert!(out.contains("fork failed"), "{out}");
    }
}

#[tokio::test]
async fn streaming_sends_output_as_it_comes() {
    let h = common::start().await;
    let mut s = h
        .client
        .exec_stream(ExecRequest {
            shell: "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three; exit 3".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let start = Instant::now();
    let mut chunks = Vec::new();
    let mut result = None;
    while let Some(ev) = s.next().await {
        match ev.unwrap().event.unwrap() {
            exec_event::Event::Output(c) => chunks.push((
                start.elapsed(),
                c.stream,
                String::from_utf8(c.data).unwrap(),
            )),
            exec_event::Event::Result(r) => result = Some(r),
        }
    }
    let r = result.unwrap();
    assert_eq!(r.exit_code, 3);
    let texts: Vec<&str> = chunks.iter().map(|c| c.2.as_str()).collect();
    assert_eq!(texts, vec!["one\n", "two\n", "three\n"]);
    // The first chunk arrived long before the command ended.
    assert!(chunks[0].0 < Duration::from_millis(250), "{chunks:?}");
    assert!(chunks[2].0 >= Duration::from_millis(500), "{chunks:?}");
}

#[tokio::test]
async fn concurrent_commands_run_in_parallel() {
    let h = common::start().await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = h.client.clone();
        tasks.push(tokio::spawn(async move {
            c.exec_argv(&["sleep", "0.5"], None).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().exit_code, 0);
    }
    assert!(
        start.elapsed() < Duration::from_millis(2000),
        "{:?}",
        start.elapsed()
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}
