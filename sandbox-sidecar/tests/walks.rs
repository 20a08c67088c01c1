//! Snapshot, diff and reset get past what the agent does to permissions, and refuse a
//! workspace over the caps instead of walking it until a deadline.

mod common;

use std::path::PathBuf;

/// Runs the sidecar without capabilities (bwrap, user namespace): root here would read
/// through any mode and hide the problem.
fn no_caps_wrapper(dir: &std::path::Path) -> Option<PathBuf> {
    let bwrap = ["/usr/bin/bwrap", "/bin/bwrap", "/usr/local/bin/bwrap"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let args =
        "--die-with-parent --unshare-user --cap-drop ALL --dev-bind / / --proc /proc --dev /dev";
    let ok = std::process::Command::new(&bwrap)
        .args(args.split(' '))
        .args(["--", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return None;
    }
    let w = dir.join("wrap-nocaps");
    std::fs::write(
        &w,
        format!(
            "#!/bin/sh\nexec {} {args} -- {} \"$@\"\n",
            bwrap.display(),
            common::bin().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(w)
}

#[tokio::test]
async fn locked_files_and_directories_do_not_stop_snapshot_diff_or_reset() {
    let scratch = tempfile::tempdir().unwrap();
    let wrapper = no_caps_wrapper(scratch.path());
    if wrapper.is_none() {
        eprintln!("bwrap unavailable: running with the test's own privileges");
    }
    let h = common::start_with(|o| {
        if let Some(w) = wrapper {
            o.binary = Some(w);
        }
    })
    .await;
    h.write("a/b.txt", "b\n");
    h.write("c.txt", "c\n");
    h.client.snapshot(None, &[]).await.unwrap();
    let r = h
        .client
        .exec_shell(
            "echo changed > c.txt && echo new > d.txt && mkdir -p e/f && echo g > e/f/g && \
             chmod 000 e/f e c.txt a && chmod u-w . && \
             (cat c.txt 2>/dev/null && echo READABLE || echo LOCKED)",
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let locked = String::from_utf8_lossy(&r.stdout).contains("LOCKED");
    let d = h.client.diff(None, &[], &[]).await.unwrap();
    let text = String::from_utf8_lossy(&d.diff);
    assert!(text.contains("+changed"), "{text}");
    assert!(
        text.contains("b/d.txt") && text.contains("b/e/f/g"),
        "{text}"
    );
    h.client.snapshot(Some("locked"), &[]).await.unwrap();
    let r = h.client.reset(None).await.unwrap();
    assert!(r.removed >= 2, "{r:?}");
    assert_eq!(h.read("c.txt"), "c\n");
    assert_eq!(h.read("a/b.txt"), "b\n");
    assert!(!h.path("d.txt").exists() && !h.path("e").exists());
    eprintln!("commands really were locked out: {locked}");
}

#[tokio::test]
async fn snapshots_and_diffs_over_the_caps_are_refused() {
    let h = common::start_with(|o| {
        o.extra_args.extend([
            "--max-workspace-files".into(),
            "10".into(),
            "--max-workspace-bytes".into(),
            "1000".into(),
        ]);
    })
    .await;
    h.write("small.txt", "x");
    h.client.snapshot(None, &[]).await.unwrap();
    h.write("big.bin", &"y".repeat(2000));
    let e = h.client.diff(None, &[], &[]).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("--max-workspace-bytes 1000"), "{msg}");
    assert!(msg.contains("2001"), "the size found: {msg}");
    assert!(!e.is_infrastructure(), "{e:?}");
    let e = h.client.snapshot(Some("two"), &[]).await.unwrap_err();
    assert!(e.to_string().contains("--max-workspace-bytes"), "{e}");
    // Excluded paths do not count.
    h.client.snapshot(Some("two"), &["big.bin"]).await.unwrap();
    std::fs::remove_file(h.path("big.bin")).unwrap();
    for i in 0..20 {
        h.write(&format!("many/{i}"), "");
    }
    let e = h.client.snapshot(Some("three"), &[]).await.unwrap_err();
    assert!(e.to_string().contains("--max-workspace-files 10"), "{e}");
    // Reset is not capped: it is how the workspace gets small again.
    h.client.reset(None).await.unwrap();
    assert!(!h.path("many").exists());
    h.client.diff(None, &[], &[]).await.unwrap();
}
