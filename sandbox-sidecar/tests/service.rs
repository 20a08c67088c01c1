//! Auth, infrastructure errors, idempotent request ids, metrics, the CLI, shutdown.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use sandbox_sidecar::client::{Error, ExecRequest, SidecarClient, WriteFileRequest};
use sandbox_sidecar::proto::sidecar_client::SidecarClient as RawClient;

#[tokio::test]
async fn wrong_or_missing_token_is_refused() {
    let h = common::start().await;
    let addr = h.sidecar.addr().to_string();
    let bad = SidecarClient::connect(addr.clone(), "not-the-token")
        .await
        .unwrap();
    let e = bad.exec_shell("touch pwned", None).await.unwrap_err();
    assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");
    assert!(e.is_infrastructure());
    assert!(matches!(
        bad.health().await.unwrap_err(),
        Error::Unauthenticated(_)
    ));
    // A token that differs only in its last character, and a prefix of the real one.
    let t = h.sidecar.token().to_string();
    let near = format!("{}x", &t[..t.len() - 1]);
    for wrong in [near.as_str(), &t[..t.len() - 1]] {
        let c = SidecarClient::connect(addr.clone(), wrong).await.unwrap();
        assert!(matches!(
            c.health().await.unwrap_err(),
            Error::Unauthenticated(_)
        ));
    }
    // No authorization header at all.
    let mut raw = RawClient::connect(format!("http://{addr}")).await.unwrap();
    let status = raw
        .exec(ExecRequest {
            shell: "touch pwned".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(!h.path("pwned").exists());
    assert!(h.client.health().await.is_ok());
}

#[tokio::test]
async fn a_dead_sidecar_is_an_infrastructure_error() {
    let h = common::start().await;
    let c = h.client.clone().with_retries(1);
    assert!(c.health().await.is_ok());
    h.sidecar.shutdown(Duration::from_secs(2)).await;
    let e = c.exec_shell("true", None).await.unwrap_err();
    assert!(e.is_infrastructure(), "{e:?}");
    // Nothing listens on a fresh port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = SidecarClient::connect(port.to_string(), "t")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(e, Error::Connect { .. }) && e.is_infrastructure(),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_request_id_runs_once() {
    let h = common::start().await;
    let c = &h.client;
    let req = ExecRequest {
        shell: "echo run >> log.txt; wc -l < log.txt".into(),
        request_id: "req-1".into(),
        ..Default::default()
    };
    let a = c.exec(req.clone()).await.unwrap();
    let b = c.exec(req.clone()).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(h.read("log.txt"), "run\n");
    // Concurrent duplicates also run once.
    let slow = ExecRequest {
        shell: "sleep 0.3; echo run >> log2.txt".into(),
        request_id: "req-2".into(),
        ..Default::default()
    };
    let (x, y) = tokio::join!(c.exec(slow.clone()), c.exec(slow.clone()));
    assert_eq!(x.unwrap(), y.unwrap());
    assert_eq!(h.read("log2.txt"), "run\n");
    // The same id with another request is refused.
    let e = c
        .exec(ExecRequest {
            shell: "echo other".into(),
            request_id: "req-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::RequestIdConflict(_)), "{e:?}");
    // Errors are remembered too: a retried write into a missing directory fails the same way
    // even after the directory appears.
    let w = WriteFileRequest {
        path: "nodir/f".into(),
        content: b"x".to_vec(),
        request_id: "req-3".into(),
        ..Default::default()
    };
    assert!(matches!(
        c.write_file_request(w.clone()).await.unwrap_err(),
        Error::NotFound(_)
    ));
    std::fs::create_dir(h.path("nodir")).unwrap();
    assert!(matches!(
        c.write_file_request(w).await.unwrap_err(),
        Error::NotFound(_)
    ));
    // Session commands too.
    let s = sandbox_sidecar::client::SessionRunRequest {
        session_id: "s".into(),
        command: "echo s >> log3.txt".into(),
        request_id: "req-4".into(),
        ..Default::default()
    };
    c.session_run_request(s.clone()).await.unwrap();
    c.session_run_request(s).await.unwrap();
    assert_eq!(h.read("log3.txt"), "s\n");
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let h = common::start_with(|o| {
        o.extra_args.push("--metrics-listen".into());
        o.extra_args.push("127.0.0.1:0".into());
    })
    .await;
    // The metrics port is only logged; find it from the sidecar's listening sockets.
    h.client.exec_shell("exit 3", None).await.unwrap();
    h.client.session_run("m", "echo hi", None).await.unwrap();
    h.client
        .exec_shell("sleep 5", Some(Duration::from_millis(100)))
        .await
        .unwrap();
    let metrics_port = listening_ports(h.sidecar.pid())
        .into_iter()
        .find(|p| *p != h.sidecar.addr().port())
        .expect("metrics port");
    let body = http_get(metrics_port, "/metrics");
    for name in sandbox_sidecar::metrics::metric_names() {
        assert!(body.contains(&name), "{name} missing from\n{body}");
    }
    assert!(
        body.contains(r#"selfplay_sidecar_commands_total{kind="exec",outcome="error"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"selfplay_sidecar_commands_total{kind="session",outcome="ok"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"selfplay_sidecar_timeouts_total{kind="exec"} 1"#),
        "{body}"
    );
    assert!(
        body.contains("selfplay_sidecar_sessions_active 1"),
        "{body}"
    );
    assert!(http_get(metrics_port, "/healthz").ends_with("ok"));
}

fn listening_ports(pid: u32) -> Vec<u16> {
    // Socket inodes of the process, matched against /proc/net/tcp's listening sockets.
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(i) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.insert(i.to_string());
            }
        }
    }
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[3] == "0A" && inodes.contains(f[9]))
                .then(|| u16::from_str_radix(f[1].split(':').nth(1).unwrap(), 16).unwrap())
        })
        .collect()
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn cli_prints_json_and_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, "cli-token\n").unwrap();
    let ready = dir.path().join("ready");
    let mut server = Command::new(common::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--workspace"])
        .arg(&ws)
        .arg("--token-file")
        .arg(&tok)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready.exists() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(20));
    let addr = std::fs::read_to_string(&ready).unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(common::bin())
            .args(["client", "--addr", &addr, "--token-file"])
            .arg(&tok)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = cli(&[
        "exec",
        "--timeout-ms",
        "5000",
        "--",
        "sh",
        "-c",
        "echo hi; exit 4",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exit_code"], 4);
    assert_eq!(v["stdout"], "hi\n");
    for key in ["stderr", "truncated", "timed_out", "duration_ms"] {
        assert!(v.get(key).is_some(), "{key} missing in {out}");
    }
    assert!(v.get("stdout_base64").is_none(), "{out}");
    // Bytes that are not UTF-8 also come exactly, in base64.
    let (code, out, _) = cli(&["exec", "--", "printf", "\\377\\000a\\n"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["stdout_base64"].as_str().expect("stdout_base64"))
        .unwrap();
    assert_eq!(raw, b"\xff\x00a\n");
    assert_eq!(v["stdout"], "\u{fffd}\u{0}a\n");
    let (code, _, _) = cli(&["write", "f.txt", "--content", "one two"]);
    assert_eq!(code, 0);
    let (code, out, _) = cli(&["read", "f.txt"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["content"],
        "one two"
    );
    let (code, _, err) = cli(&["edit", "f.txt", "--old", "three", "--new", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("no match"), "{err}");
    let (code, _, _) = cli(&["edit", "f.txt", "--old", "two", "--new", "2"]);
    assert_eq!(code, 0);
    let (code, _, err) = cli(&["read", "../etc/passwd"]);
    assert_eq!(code, 1);
    assert!(err.contains("'..' is not allowed"), "{err}");
    let (code, _, err) = cli(&["diff"]);
    assert_eq!(code, 1);
    assert!(err.contains("no snapshot"), "{err}");
    let (code, _, _) = cli(&["snapshot"]);
    assert_eq!(code, 0);
    std::fs::write(ws.join("f.txt"), "changed\n").unwrap();
    let (code, out, _) = cli(&["diff"]);
    assert_eq!(code, 0);
    assert!(out.contains("+changed"), "{out}");
    let (code, out, _) = cli(&["reset"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read_to_string(ws.join("f.txt")).unwrap(), "one 2");
    std::fs::write(dir.path().join("t.sh"), "echo 'test_a (m.T.test_a) ... ok'").unwrap();
    let (code, out, _) = cli(&[
        "test",
        "--script",
        dir.path().join("t.sh").to_str().unwrap(),
        "--builtin",
        "unittest",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("\"m.T.test_a\": \"passed\""), "{out}");
    // Wrong token: non-zero exit and a clear message.
    std::fs::write(dir.path().join("bad"), "nope").unwrap();
    let out = Command::new(common::bin())
        .args(["client", "--addr", &addr, "--token-file"])
        .arg(dir.path().join("bad"))
        .arg("health")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = server.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn shutdown_kills_sessions_and_running_commands() {
    let h = common::start().await;
    let marker = "sleep 100.7171";
    h.client
        .session_run("a", &format!("{marker} &"), None)
        .await
        .unwrap();
    let c = h.client.clone();
    let running = tokio::spawn(async move { c.exec_shell(marker, None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(common::processes_matching(marker).len(), 2);
    let start = Instant::now();
    h.sidecar.shutdown(Duration::from_secs(5)).await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let _ = running.await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !common::processes_matching(marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            common::processes_matching(marker)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
