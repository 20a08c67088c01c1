//! The local sandbox provider: a fresh copy per sandbox, a real sidecar process, isolation
//! with bubblewrap where it works, the host toolchain on PATH, and no process left behind.

mod engine_support;

use std::path::Path;
use std::time::Duration;

use engine_support::{assets, provider_with, sample_repo};
use selfplay_trainer::engine::local::{Isolation, LocalProvider, LocalProviderConfig};
use selfplay_trainer::engine::processes_inside;
use selfplay_trainer::engine::sandbox::{Sandbox, SandboxProvider as _};

async fn sh(sb: &Sandbox, cmd: &str) -> (i32, String) {
    let r = sb
        .client()
        .session_run(
            "t",
            cmd,
            Some(sandbox_sidecar::client::limits_with_timeout(
                Duration::from_secs(20),
            )),
        )
        .await
        .unwrap();
    (
        r.exit_code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        ),
    )
}

fn bwrap_usable() -> bool {
    LocalProvider::new({
        let mut c = LocalProviderConfig::single(assets().join("sample-repo"));
        c.isolation = Isolation::Bubblewrap;
        c
    })
    .is_ok()
}

async fn teardown_leaves_nothing(isolation: Isolation) {
    let (_dir, repo) = sample_repo();
    let p = provider_with(&repo, isolation);
    let sb = p.acquire("default").await.unwrap();
    let ws = sb.workspace_path().unwrap().to_path_buf();
    let root = ws.parent().unwrap().to_path_buf();
    // Background jobs in the session, a job that left the session's process group, a
    // daemonised one in its own session, and one from a one-off command.
    sh(
        &sb,
        "sleep 1000 & (setsid sleep 1001 &) ; nohup sleep 1002 >/dev/null 2>&1 &",
    )
    .await;
    sb.client()
        .exec_shell("sleep 1003 >/dev/null 2>&1 &", Some(Duration::from_secs(5)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = processes_inside(&root);
    assert!(
        before.len() >= 3,
        "{isolation:?}: expected sleeping processes, found {before:?}"
    );
    sb.release().await.unwrap();
    let mut left = processes_inside(&root);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = processes_inside(&root);
    }
    assert!(
        left.is_empty(),
        "{isolation:?}: processes left behind: {left:?}"
    );
    assert!(!root.exists(), "the sandbox directory was not removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_without_isolation_leaves_no_process() {
    teardown_leaves_nothing(Isolation::Off).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_with_bubblewrap_leaves_no_process() {
    if !bwrap_usable() {
        eprintln!("bubblewrap is not installed or does not work here; isolation not tested");
        return;
    }
    teardown_leaves_nothing(Isolation::Bubblewrap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_are_fresh_copies_with_the_host_toolchain() {
    let (_dir, repo) = sample_repo();
    let p = provider_with(&repo, Isolation::Auto);
    let (a, b) = (
        p.acquire("default").await.unwrap(),
        p.acquire("default").await.unwrap(),
    );
    assert_ne!(a.workspace_path(), b.workspace_path());
    sh(&a, "echo changed > tinytext/wrap.py").await;
    let (_, b_wrap) = sh(&b, "head -1 tinytext/wrap.py").await;
    assert!(b_wrap.contains("Greedy word wrapping"), "{b_wrap}");
    assert!(
        std::fs::read_to_string(repo.join("tinytext/wrap.py"))
            .unwrap()
            .contains("Greedy"),
        "the source repository is untouched"
    );
    // The repository's history came along, and the host's python3 and PATH (the directories
    // that exist, once each, in order) are there.
    let (code, log) = sh(&a, "git log --oneline | wc -l").await;
    assert_eq!((code, log.trim()), (0, "5"));
    let (code, out) = sh(
        &a,
        "python3 -c 'import sys; print(sys.version_info[0])' && echo \"$PATH\"",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("3\n"), "{out}");
    let mut host: Vec<std::path::PathBuf> = Vec::new();
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap()) {
        if d.is_dir() && !host.contains(&d) {
            host.push(d);
        }
    }
    let inside: Vec<std::path::PathBuf> =
        std::env::split_paths(out.lines().nth(1).unwrap_or("")).collect();
    assert_eq!(inside, host, "{out}");
    a.release().await.unwrap();
    b.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bubblewrap_isolation_no_network_read_only_host() {
    if !bwrap_usable() {
        eprintln!("bubblewrap is not installed or does not work here; isolation not tested");
        let (_dir, repo) = sample_repo();
        assert!(
            !provider_with(&repo, Isolation::Auto).isolated(),
            "auto falls back"
        );
        return;
    }
    let (_dir, repo) = sample_repo();
    let p = provider_with(&repo, Isolation::Auto);
    assert!(p.isolated());
    let sb = p.acquire("default").await.unwrap();
    let ws = sb.workspace_path().unwrap().to_path_buf();
    // The sidecar's own port is on the host's loopback; the sandbox has a loopback of its own.
    let port = sb.client().addr().rsplit(':').next().unwrap().to_string();
    let probe = format!(
        "python3 -c \"import socket; s=socket.socket(); s.settimeout(2); print('connected' if s.connect_ex(('127.0.0.1', {port})) == 0 else 'refused')\""
    );
    let (_, out) = sh(&sb, &probe).await;
    assert_eq!(
        out.trim(),
        "refused",
        "the sandbox reached the host's loopback"
    );
    // /proc is the sandbox's own: its network namespace has only a loopback device.
    let (_, links) = sh(&sb, "tail -n +3 /proc/net/dev | cut -d: -f1").await;
    assert_eq!(
        links.split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "{links}"
    );
    // Only the workspace is writable.
    let (code, _) = sh(&sb, "touch created_here && test -f created_here").await;
    assert_eq!(code, 0);
    assert!(ws.join("created_here").exists());
    let outside = repo.join("escaped");
    let (code, out) = sh(&sb, &format!("touch {}", outside.display())).await;
    assert_ne!(code, 0, "{out}");
    assert!(!outside.exists());
    let (code, _) = sh(&sb, "touch /usr/selfplay-escape").await;
    assert_ne!(code, 0);
    assert!(!Path::new("/usr/selfplay-escape").exists());
    // The tests of the repository still run, with the host's python3.
    let (code, out) = sh(
        &sb,
        "python3 -m unittest discover -s tests -t . 2>&1 | tail -1",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "OK"));
    sb.release().await.unwrap();
}

#[test]
fn the_bundle_holds_the_sample_repository() {
    let (_dir, repo) = sample_repo();
    let tree = assets().join("sample-repo");
    let mut files = Vec::new();
    let mut stack = vec![tree.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 10);
    for f in &files {
        let rel = f.strip_prefix(&tree).unwrap();
        assert_eq!(
            std::fs::read(f).unwrap(),
            std::fs::read(repo.join(rel)).unwrap(),
            "{}",
            rel.display()
        );
    }
    let out = std::process::Command::new("git")
        .args(["ls-files"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        files.len(),
        "same files in both"
    );
    let st = std::process::Command::new("git")
        .args(["status", "--porcelain"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(st.stdout.is_empty());
}

/// A repository whose files belong to another user (an archive unpacked as root keeps its
/// uid): the workspace copy belongs to the sandbox's user, so a sandbox without
/// capabilities can edit, patch and validate it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_owned_by_another_user_is_writable_in_its_sandbox() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: changing a file's owner needs root");
        return;
    }
    assert!(bwrap_usable(), "bubblewrap is needed for this test");
    let (_dir, repo) = sample_repo();
    let chown = std::process::Command::new("chown")
        .args(["-R", "1001:1001"])
        .arg(&repo)
        .status()
        .unwrap();
    assert!(chown.success());
    let p = provider_with(&repo, Isolation::Bubblewrap);
    let sb = p.acquire("default").await.unwrap();
    let (code, out) = sh(
        &sb,
        "stat -c %u tinytext/slug.py; echo '# edited' >> tinytext/slug.py && tail -1 tinytext/slug.py",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("# edited\n"), "{out}");
    assert!(!out.starts_with("1001"), "{out}");
    sb.client()
        .write_file("tinytext/new.py", b"x = 1\n".to_vec())
        .await
        .unwrap();
    sb.release().await.unwrap();
    // And the whole of validation works on it.
    let sb = p.acquire("default").await.unwrap();
    let report = selfplay_trainer::engine::validation::validate(
        sb.client(),
        &engine_support::artifact_set("valid"),
        &Default::default(),
    )
    .await
    .unwrap();
    sb.release().await.unwrap();
    assert!(report.valid, "{report:#?}");
}
