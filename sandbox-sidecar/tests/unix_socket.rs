//! `serve --listen-unix PATH` and the client's `unix:/path` addresses.

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::time::Duration;

use nix::sys::signal::Signal;
use sandbox_sidecar::SidecarClient;
use sandbox_sidecar::client::Error;

mod common;

fn is_socket(p: &std::path::Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test]
async fn serves_on_a_unix_socket_replacing_a_stale_one_and_removes_it_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let sock = run.join("sidecar.sock");
    // What a sidecar killed with SIGKILL leaves: a socket file nobody accepts on.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(is_socket(&sock));
    let ready = dir.path().join("ready");
    let mut s = common::serve(
        dir.path(),
        &[],
        &[
            "--listen-unix",
            sock.to_str().unwrap(),
            "--ready-file",
            ready.to_str().unwrap(),
        ],
    )
    .await;
    let want = format!("unix:{}", sock.display());
    assert_eq!(s.addr, want);
    assert_eq!(std::fs::read_to_string(&ready).unwrap(), want);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o666,
        "another user (the host's) must be able to connect"
    );

    let c = s.client().await;
    assert_eq!(c.addr(), want);
    let r = c.exec_shell("echo over-unix", None).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "over-unix\n");
    let r = c
        .session_run("s", "x=41; echo $((x+1))", None)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "42\n");

    // The command-line client takes the same address.
    let out = std::process::Command::new(common::bin())
        .args(["client", "--addr", &want, "--token-file"])
        .arg(dir.path().join("secret/token"))
        .args(["exec", "--", "echo", "from-cli"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("from-cli"));

    common::signal(&s.child, Signal::SIGTERM);
    let status = s.exit_within(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "the socket is removed at shutdown");
}

#[tokio::test]
async fn a_path_that_is_not_a_socket_or_a_live_socket_is_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let (code, stdout, stderr) =
        common::serve_failing(dir.path(), &["--listen-unix", file.to_str().unwrap()]);
    // serve_failing passes --listen too, which --listen-unix conflicts with: usage error.
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--listen-unix"), "{stderr}");
    assert!(stdout.is_empty());

    // Without --listen: the path holds a regular file.
    let (tf, _) = common::serve_dirs(dir.path());
    let out = std::process::Command::new(common::bin())
        .args(["serve", "--listen-unix"])
        .arg(&file)
        .arg("--workspace")
        .arg(dir.path().join("ws"))
        .arg("--token-file")
        .arg(&tf)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&*file.to_string_lossy()), "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    // A socket a live sidecar accepts on.
    let a_dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("live.sock");
    let mut a = common::serve(
        a_dir.path(),
        &[],
        &["--listen-unix", sock.to_str().unwrap()],
    )
    .await;
    let out = std::process::Command::new(common::bin())
        .args(["serve", "--listen-unix"])
        .arg(&sock)
        .arg("--workspace")
        .arg(dir.path().join("ws"))
        .arg("--token-file")
        .arg(&tf)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another server"), "{stderr}");
    let c = a.client().await;
    c.health().await.expect("the first sidecar still serves");
    common::signal(&a.child, Signal::SIGTERM);
    assert!(a.exit_within(Duration::from_secs(5)).await.success());
}

#[tokio::test]
async fn a_client_reconnects_to_a_sidecar_restarted_on_the_same_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let sock_s = sock.to_str().unwrap();
    let mut first = common::serve(&dir.path().join("a"), &[], &["--listen-unix", sock_s]).await;
    let c = first.client().await;
    let pid_a = c.health().await.unwrap().pid;
    // SIGKILL: the socket file stays, as after a crash.
    common::signal(&first.child, Signal::SIGKILL);
    first.exit_within(Duration::from_secs(5)).await;
    assert!(is_socket(&sock));
    let mut second = common::serve(&dir.path().join("b"), &[], &["--listen-unix", sock_s]).await;
    let mut pid_b = None;
    for _ in 0..50 {
        match c.health().await {
            Ok(h) => {
                pid_b = Some(h.pid);
                break;
            }
            Err(e) => assert!(e.is_infrastructure(), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid_b = pid_b.expect("the same client reached the new sidecar");
    assert_ne!(pid_a, pid_b);
    common::signal(&second.child, Signal::SIGTERM);
    assert!(second.exit_within(Duration::from_secs(5)).await.success());
}

#[tokio::test]
async fn unix_addresses_must_be_absolute_and_a_missing_socket_is_a_connect_error() {
    let e = SidecarClient::connect("unix:relative/sock", "t")
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, Error::InvalidAddress(_)), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("unix:{}", dir.path().join("nothing.sock").display());
    let e = SidecarClient::connect(&missing, "t")
        .await
        .err()
        .expect("nothing listens");
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(e.is_infrastructure());
    assert!(e.to_string().contains(&missing), "{e}");
}
