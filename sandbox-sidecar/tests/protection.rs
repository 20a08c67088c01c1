//! Commands cannot signal or trace the sidecar (seccomp, see `confine`).

mod common;

use std::path::{Path, PathBuf};

use sandbox_sidecar::SidecarClient;

async fn shell(c: &SidecarClient, cmd: &str) -> (i32, String, String) {
    let r = c.exec_shell(cmd, None).await.unwrap();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

async fn assert_refused(c: &SidecarClient, cmd: &str) {
    let (_, out, err) = shell(c, &format!("{cmd}; echo \"rc=$?\"")).await;
    assert!(
        err.contains("Operation not permitted"),
        "{cmd}: stdout {out:?} stderr {err:?}"
    );
    assert!(!out.contains("rc=0"), "{cmd}: {out}");
    // Still serving.
    c.health().await.unwrap();
}

#[tokio::test]
async fn commands_cannot_signal_the_sidecar_but_can_signal_their_own() {
    let h = common::start().await;
    let pid = h.client.health().await.unwrap().pid;
    assert_eq!(pid, h.sidecar.pid());
    assert_refused(&h.client, &format!("kill -TERM {pid}")).await;
    assert_refused(&h.client, &format!("kill -KILL -- -{pid}")).await;
    assert_refused(&h.client, &format!("kill -STOP {pid}")).await;
    // A thread of the sidecar: kill(tid) signals the whole process.
    let (_, tids, _) = shell(&h.client, &format!("ls /proc/{pid}/task")).await;
    let tid = tids
        .split_whitespace()
        .rfind(|t| *t != pid.to_string())
        .expect("the sidecar has threads")
        .to_string();
    assert_refused(&h.client, &format!("kill -TERM {tid}")).await;
    // Tracing and SIGIO ownership.
    let (_, out, _) = shell(
        &h.client,
        &format!(
            "python3 - <<'PY' 2>&1 || true
import ctypes, fcntl, os
libc = ctypes.CDLL(None, use_errno=True)
r = libc.ptrace(16, {pid}, 0, 0)
print('ptrace', r, ctypes.get_errno())
rd, wr = os.pipe()
try:
    fcntl.fcntl(rd, fcntl.F_SETOWN, {pid})
    print('setown ok')
except OSError as e:
    print('setown', e.errno)
PY"
        ),
    )
    .await;
    if !out.contains("No such file") && !out.contains("not found") {
        assert!(out.contains("ptrace -1 1"), "{out}");
        assert!(out.contains("setown 1"), "{out}");
    }
    // Its own processes it may kill.
    let (code, out, err) = shell(
        &h.client,
        "sleep 100 & kill $!; wait $!; echo \"status=$?\"",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "status=143");
    // From a session, whose parent is the sidecar.
    let r = h
        .client
        .session_run("s", "echo $PPID; kill $PPID; echo rc=$?", None)
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(out.starts_with(&format!("{pid}\n")), "{out}");
    assert!(out.contains("rc=1"), "{out}");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("Operation not permitted"),
        "{r:?}"
    );
    h.client.health().await.unwrap();
    h.client
        .session_run("s", "sleep 100 & kill $!", None)
        .await
        .unwrap();
}

/// Whether bwrap can make a PID namespace here.
fn bwrap_pidns() -> Option<PathBuf> {
    let bwrap = ["/usr/bin/bwrap", "/bin/bwrap", "/usr/local/bin/bwrap"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let ok = std::process::Command::new(&bwrap)
        .args(pidns_args())
        .args(["--", "true"])
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bwrap)
}

fn pidns_args() -> [&'static str; 10] {
    [
        "--die-with-parent",
        "--unshare-pid",
        "--unshare-user",
        "--dev-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
}

/// A script that runs the sidecar under bwrap in its own PID namespace, so that
/// `kill -9 -1` and `kill 1`, were they let through, could only hit the test's sidecar.
fn wrapper(bwrap: &Path, dir: &Path, as_pid_1: bool) -> PathBuf {
    let w = dir.join(if as_pid_1 { "wrap-pid1" } else { "wrap" });
    let extra = if as_pid_1 { "--as-pid-1" } else { "" };
    std::fs::write(
        &w,
        format!(
            "#!/bin/sh\nexec {} {} {extra} -- {} \"$@\"\n",
            bwrap.display(),
            pidns_args().join(" "),
            common::bin().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
    w
}

#[tokio::test]
async fn kill_minus_one_and_init_are_refused_in_a_pid_namespace() {
    let Some(bwrap) = bwrap_pidns() else {
        eprintln!("skipped: bwrap cannot create a PID namespace here");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    for as_pid_1 in [false, true] {
        let w = wrapper(&bwrap, scratch.path(), as_pid_1);
        let h = common::start_with(|o| o.binary = Some(w)).await;
        let pid = h.client.health().await.unwrap().pid;
        assert_eq!(pid == 1, as_pid_1);
        assert_refused(&h.client, "kill -9 -1").await;
        assert_refused(&h.client, "kill -KILL 1").await;
        assert_refused(&h.client, "kill -TERM -1").await;
        assert_refused(&h.client, &format!("kill -TERM {pid}")).await;
        let (code, out, _) = shell(&h.client, "sleep 100 & kill $!; wait $!; echo $?").await;
        assert_eq!((code, out.trim()), (0, "143"));
    }
}
