//! The sidecar as PID 1, as in a container: run as the first process of a new PID
//! namespace (`unshare --pid --fork --mount-proc`), it must reap orphans re-parented to it
//! and stop on SIGTERM and SIGINT, which the kernel drops for PID 1 when no handler is
//! installed. Needs the privilege to create namespaces (root); skipped without it.

use std::time::Duration;

use nix::sys::signal::Signal;

mod common;

/// `--kill-child`: the sidecar dies with unshare (a failing test drops it), instead of
/// living on, orphaned, holding the test's output pipes.
const UNSHARE: [&str; 5] = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"];

fn namespaces_available() -> bool {
    std::process::Command::new(UNSHARE[0])
        .args(&UNSHARE[1..])
        .arg("true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The host pid of the one child of `parent` (unshare's child: the sidecar).
fn only_child_of(parent: u32) -> i32 {
    for _ in 0..50 {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(parent) {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no child of {parent}");
}

/// (pid, state, ppid) of every process the namespace's /proc shows, listed with bash
/// builtins by a command of the sidecar.
async fn processes(c: &sandbox_sidecar::SidecarClient) -> Vec<(u32, char, u32)> {
    let r = c
        .exec_shell(
            "for f in /proc/[0-9]*/stat; do read -r l < \"$f\" 2>/dev/null && echo \"$l\"; done",
            None,
        )
        .await
        .unwrap();
    String::from_utf8_lossy(&r.stdout)
        .lines()
        .filter_map(|l| {
            let pid = l.split_whitespace().next()?.parse().ok()?;
            let mut rest = l.rsplit(')').next()?.split_whitespace();
            let state = rest.next()?.chars().next()?;
            let ppid = rest.next()?.parse().ok()?;
            Some((pid, state, ppid))
        })
        .collect()
}

#[tokio::test]
async fn as_pid_1_it_reaps_orphans_and_stops_on_sigterm_and_sigint() {
    if !namespaces_available() {
        eprintln!("skipped: cannot create a PID namespace here (needs root)");
        return;
    }
    for (round, sig) in [Signal::SIGTERM, Signal::SIGINT].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sidecar.sock");
        let mut s = common::serve(
            dir.path(),
            &UNSHARE,
            &["--listen-unix", sock.to_str().unwrap()],
        )
        .await;
        let c = s.client().await;
        assert_eq!(c.health().await.unwrap().pid, 1, "the sidecar is PID 1");

        if round == 0 {
            // A daemon in a session of its own outlives the command that started it and is
            // re-parented to PID 1; when it exits, only PID 1 can reap it.
            // The command waits until the daemon left its session: its process group is
            // killed as soon as it exits.
            let r = c
                .exec_shell(
                    "setsid sh -c ': > orphan-started; sleep 0.3; : > orphan-done' \
                     </dev/null >/dev/null 2>&1 &\n\
                     while [ ! -e orphan-started ]; do sleep 0.01; done",
                    Some(Duration::from_secs(10)),
                )
                .await
                .unwrap();
            assert_eq!(r.exit_code, 0, "{r:?}");
            let done = dir.path().join("ws/orphan-done");
            for _ in 0..100 {
                if done.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(done.exists(), "the orphan ran");
            let mut zombies = Vec::new();
            for _ in 0..40 {
                zombies = processes(&c)
                    .await
                    .into_iter()
                    .filter(|(_, state, ppid)| *state == 'Z' && *ppid == 1)
                    .collect();
                if zombies.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                zombies.is_empty(),
                "unreaped children of PID 1: {zombies:?}"
            );
        }

        let unshare_pid = s.child.id().unwrap();
        let sidecar = only_child_of(unshare_pid);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(sidecar), sig).unwrap();
        // unshare --fork exits with its child's status.
        let status = s.exit_within(Duration::from_secs(5)).await;
        assert!(status.success(), "{sig}: {status}");
        assert!(!sock.exists(), "{sig}: the socket is removed");
    }
}
