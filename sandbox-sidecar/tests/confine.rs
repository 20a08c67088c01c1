//! `serve --confine` under bwrap: commands cannot see the state directory or the token,
//! hold no capabilities, and everything the sidecar does still works.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sandbox_sidecar::SidecarClient;
use sandbox_sidecar::proto::{BuiltinParser, RunTestsRequest};
use tokio::io::{AsyncBufReadExt as _, BufReader};

fn bwrap() -> Option<PathBuf> {
    let b = ["/usr/bin/bwrap", "/bin/bwrap", "/usr/local/bin/bwrap"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let ok = std::process::Command::new(&b)
        .args(BWRAP_ARGS)
        .args(["--", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(b)
}

/// A user namespace (CAP_SYS_ADMIN in it) and a PID namespace; the network is shared so
/// the test reaches the sidecar on loopback.
const BWRAP_ARGS: [&str; 11] = [
    "--die-with-parent",
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--dev-bind",
    "/",
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
];

struct Confined {
    _child: tokio::process::Child,
    client: SidecarClient,
}

struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        for d in ["ws", "state", "secret", "extra"] {
            std::fs::create_dir(root.path().join(d)).unwrap();
        }
        std::fs::write(root.path().join("secret/token"), "tok-confine-test").unwrap();
        std::fs::write(root.path().join("extra/hidden.txt"), "hidden").unwrap();
        Self { root }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }
}

fn command(bwrap: &Path, d: &Dirs, extra_bwrap: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(bwrap);
    c.args(BWRAP_ARGS)
        .args(extra_bwrap)
        .arg("--")
        .arg(common::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--confine"])
        .arg("--workspace")
        .arg(d.p("ws"))
        .arg("--state-dir")
        .arg(d.p("state"))
        .arg("--token-file")
        .arg(d.p("secret/token"))
        .arg("--hide")
        .arg(d.p("extra"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

async fn start(bwrap: &Path, d: &Dirs) -> Confined {
    let mut child = command(bwrap, d, &[]).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), out.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix(sandbox_sidecar::spawn::READY_PREFIX)
        .unwrap_or_else(|| panic!("not ready: {line:?}"))
        .to_string();
    let client = SidecarClient::connect(addr, "tok-confine-test")
        .await
        .unwrap();
    Confined {
        _child: child,
        client,
    }
}

async fn sh(c: &SidecarClient, cmd: &str) -> (i32, String, String) {
    let r = c.exec_shell(cmd, None).await.unwrap();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

#[tokio::test]
async fn confined_commands_see_no_state_no_token_and_no_capabilities() {
    let Some(bwrap) = bwrap() else {
        eprintln!("skipped: bwrap is missing or cannot create namespaces here");
        return;
    };
    let d = Dirs::new();
    std::fs::write(d.p("ws/solution.py"), "answer = 42\n").unwrap();
    std::fs::write(d.p("ws/test_it.py"), "def test_x():\n    pass\n").unwrap();
    let s = start(&bwrap, &d).await;
    let c = &s.client;
    c.snapshot(None, &[]).await.unwrap();
    c.oracle_stash(&["test_it.py"], false).await.unwrap();
    assert!(
        std::fs::read_dir(d.p("state/objects")).unwrap().count() > 0,
        "the snapshot store is on disk"
    );

    for dir in ["state", "state/objects", "secret", "extra"] {
        let (_, out, _) = sh(c, &format!("ls -A {} 2>&1", d.p(dir).display())).await;
        assert!(
            out.trim().is_empty() || out.contains("Permission denied") || out.contains("No such"),
            "{dir}: {out}"
        );
    }
    let (code, out, _) = sh(c, &format!("cat {}", d.p("secret/token").display())).await;
    assert_ne!(code, 0);
    assert!(!out.contains("tok-confine-test"));
    let (_, out, _) = sh(c, &format!("cat {}", d.p("extra/hidden.txt").display())).await;
    assert!(!out.contains("hidden"));
    let (_, out, _) = sh(c, "grep -E '^Cap(Eff|Prm|Bnd|Amb)' /proc/self/status").await;
    for l in out.lines() {
        assert!(l.ends_with("0000000000000000"), "{out}");
    }
    assert_eq!(out.lines().count(), 4, "{out}");
    let (code, _, _) = sh(c, &format!("umount {}", d.p("state").display())).await;
    assert_ne!(code, 0, "the cover cannot be removed");

    // Everything the sidecar does itself still works.
    let (code, _, err) = sh(c, "echo changed > solution.py").await;
    assert_eq!(code, 0, "{err}");
    let diff = c.diff(None, &[], &[]).await.unwrap();
    assert!(String::from_utf8_lossy(&diff.diff).contains("+changed"));
    c.reset(None).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(d.p("ws/solution.py")).unwrap(),
        "answer = 42\n"
    );
    std::fs::remove_file(d.p("ws/test_it.py")).unwrap();
    c.oracle_restore().await.unwrap();
    assert!(d.p("ws/test_it.py").exists());
    let r = c
        .session_run(
            "s",
            "cd /; echo $((6*7)); grep CapEff /proc/self/status",
            None,
        )
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.starts_with("42\n"), "{out}");
    assert!(out.contains("0000000000000000"), "{out}");
    let long = format!("V={}; echo ${{#V}}", "y".repeat(40_000));
    let r = c.session_run("s", &long, None).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "40000");
    let r = c
        .run_tests(RunTestsRequest {
            script: "echo 'test_a ... ok'; echo 'test_b ... FAIL'; exit 1".into(),
            parser_script: "import sys, json\n\
                 out = {}\n\
                 for l in sys.stdin:\n\
                 \x20   p = l.split()\n\
                 \x20   out[p[0]] = 'PASSED' if p[-1] == 'ok' else 'FAILED'\n\
                 print(json.dumps(out))\n"
                .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.parser_error, "", "{r:?}");
    assert_eq!(r.statuses.len(), 2, "{r:?}");
    let r = c
        .run_tests(RunTestsRequest {
            script: "cd \"$(dirname \"$0\")\" 2>/dev/null; echo 'test it ... ok' >&2".into(),
            builtin: BuiltinParser::Unittest as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&r.run.unwrap().stdout).contains("test it ... ok"),
        "the script ran"
    );
}

#[tokio::test]
async fn confine_refuses_to_start_without_the_capability() {
    let Some(bwrap) = bwrap() else {
        eprintln!("skipped: bwrap is missing or cannot create namespaces here");
        return;
    };
    let d = Dirs::new();
    let out = command(&bwrap, &d, &["--cap-drop", "ALL"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--confine"), "{err}");
    assert!(err.contains("CAP_SYS_ADMIN"), "{err}");
}
