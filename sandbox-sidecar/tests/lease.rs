//! `serve --lease-file PATH`: the sidecar stops once nobody holds the lock on PATH.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use sandbox_sidecar::lease::{Lease, probe};

mod common;

/// A process holding an exclusive flock on `path` through its own open file (as the
/// trainer would), until it is killed.
fn lock_holder(path: &Path) -> std::process::Child {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("1000");
    // SAFETY: open and flock are async-signal-safe; the path was allocated before fork.
    unsafe {
        cmd.pre_exec(move || {
            // Not close-on-exec: `sleep` keeps the descriptor, and with it the lock.
            let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY);
            if fd < 0 || libc::flock(fd, libc::LOCK_EX) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[tokio::test]
async fn serve_shuts_down_soon_after_the_lease_holder_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let lease = dir.path().join("lease");
    std::fs::write(&lease, b"").unwrap();
    let mut holder = lock_holder(&lease);
    assert!(matches!(probe(&lease), Lease::Held));
    let mut s = common::serve(
        dir.path(),
        &[],
        &[
            "--listen",
            "127.0.0.1:0",
            "--lease-file",
            lease.to_str().unwrap(),
        ],
    )
    .await;
    let c = s.client().await;
    let r = c.session_run("s", "echo $$", None).await.unwrap();
    let shell_pid: u32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    assert!(alive(shell_pid));

    // Several looks at the lease pass while the holder lives.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(s.child.try_wait().unwrap().is_none(), "serve stopped early");
    c.health().await.unwrap();
    assert!(matches!(probe(&lease), Lease::Held), "looks take no lock");

    holder.kill().unwrap();
    holder.wait().unwrap();
    let killed = Instant::now();
    let status = s.exit_within(Duration::from_secs(6)).await;
    let took = killed.elapsed();
    assert!(status.success(), "exits as on SIGTERM: {status}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(!alive(shell_pid), "its session was killed");
}

#[tokio::test]
async fn serve_shuts_down_when_the_lease_file_cannot_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let lease = dir.path().join("lease");
    std::fs::write(&lease, b"").unwrap();
    let mut holder = lock_holder(&lease);
    let mut s = common::serve(
        dir.path(),
        &[],
        &[
            "--listen",
            "127.0.0.1:0",
            "--lease-file",
            lease.to_str().unwrap(),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(s.child.try_wait().unwrap().is_none());
    std::fs::remove_file(&lease).unwrap();
    let status = s.exit_within(Duration::from_secs(4)).await;
    assert!(status.success(), "{status}");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn a_lease_file_that_cannot_be_opened_at_startup_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-lease");
    let (code, stdout, stderr) =
        common::serve_failing(dir.path(), &["--lease-file", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("--lease-file"), "{stderr}");
    assert!(stderr.contains(&*missing.to_string_lossy()), "{stderr}");
}

#[tokio::test]
async fn serve_without_a_lease_holder_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let lease = dir.path().join("lease");
    std::fs::write(&lease, b"").unwrap();
    let mut s = common::serve(
        dir.path(),
        &[],
        &[
            "--listen",
            "127.0.0.1:0",
            "--lease-file",
            lease.to_str().unwrap(),
        ],
    )
    .await;
    let status = s.exit_within(Duration::from_secs(3)).await;
    assert!(status.success(), "{status}");
}
