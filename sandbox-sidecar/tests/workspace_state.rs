//! Patches, diffs, snapshots, oracle files and history, checked against real git.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{git, tree};
use sandbox_sidecar::client::Error;

/// A small repository with a commit, in the harness's workspace.
fn make_repo(h: &common::Harness) {
    h.write(
        "src/lib.py",
        "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    );
    h.write("src/util.py", "X = 1\nY = 2\n");
    h.write(
        "tests/test_lib.py",
        "from src.lib import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n",
    );
    h.write("README.md", "hello\n");
    h.write("data/blob.bin", "");
    std::fs::write(h.path("data/blob.bin"), [0u8, 1, 2, 3, 255]).unwrap();
    git(&h.ws(), &["init", "-q"]);
    git(&h.ws(), &["add", "-A"]);
    git(&h.ws(), &["commit", "-qm", "initial"]);
}

/// Changes of every kind: modify, add (nested dir), delete, mode change.
fn mutate(ws: &std::path::Path) {
    std::fs::write(
        ws.join("src/lib.py"),
        "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n",
    )
    .unwrap();
    std::fs::create_dir_all(ws.join("src/new/deep")).unwrap();
    std::fs::write(ws.join("src/new/deep/mod.py"), "Z = 3\n").unwrap();
    std::fs::remove_file(ws.join("src/util.py")).unwrap();
    std::fs::write(ws.join("tests/test_lib.py"), "def test_add():\n    pass\n").unwrap();
    std::fs::set_permissions(ws.join("README.md"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn diff_matches_git_and_applies_with_git_apply() {
    let h = common::start().await;
    make_repo(&h);
    h.client.snapshot(None, &[]).await.unwrap();
    mutate(&h.ws());
    let before_reset = tree(&h.ws());
    let d = h.client.diff(None, &[], &[]).await.unwrap();
    let mut changed: Vec<(String, String)> = d
        .files
        .iter()
        .map(|f| (f.path.clone(), f.change.clone()))
        .collect();
    changed.sort();
    assert_eq!(
        changed,
        vec![
            ("README.md".into(), "modified".into()),
            ("src/lib.py".into(), "modified".into()),
            ("src/new/deep/mod.py".into(), "added".into()),
            ("src/util.py".into(), "deleted".into()),
            ("tests/test_lib.py".into(), "modified".into()),
        ]
    );
    // git sees the same set of changed files.
    git(&h.ws(), &["add", "-A"]);
    let git_names = git(&h.ws(), &["diff", "--cached", "--name-only"]);
    let mut git_names: Vec<&str> = git_names.lines().collect();
    git_names.sort();
    assert_eq!(
        git_names,
        changed.iter().map(|c| c.0.as_str()).collect::<Vec<_>>()
    );
    git(&h.ws(), &["reset", "-q"]);

    // Our diff applied with `git apply` to a clean checkout gives the mutated tree.
    let other = tempfile::tempdir().unwrap();
    git(
        other.path(),
        &["clone", "-q", h.ws().to_str().unwrap(), "c"],
    );
    let clone = other.path().join("c");
    std::fs::write(other.path().join("p.diff"), &d.diff).unwrap();
    git(
        &clone,
        &[
            "apply",
            "--whitespace=nowarn",
            other.path().join("p.diff").to_str().unwrap(),
        ],
    );
    assert_eq!(tree(&clone), before_reset);

    // Include / exclude.
    let only_tests = h.client.diff(None, &["tests"], &[]).await.unwrap();
    assert_eq!(only_tests.files.len(), 1);
    assert_eq!(only_tests.files[0].path, "tests/test_lib.py");
    let no_tests = h.client.diff(None, &[], &["tests/"]).await.unwrap();
    assert_eq!(no_tests.files.len(), 4);
    assert!(!String::from_utf8_lossy(&no_tests.diff).contains("test_lib"));

    // Binary files are flagged.
    std::fs::write(h.path("data/blob.bin"), [0u8, 9, 9]).unwrap();
    let d = h.client.diff(None, &["data"], &[]).await.unwrap();
    assert_eq!(d.binary_files, vec!["data/blob.bin".to_string()]);
    assert!(
        String::from_utf8_lossy(&d.diff)
            .contains("Binary files a/data/blob.bin and b/data/blob.bin differ")
    );
}

#[tokio::test]
async fn reset_restores_exactly() {
    let h = common::start().await;
    make_repo(&h);
    std::os::unix::fs::symlink("src/lib.py", h.path("link")).unwrap();
    std::fs::create_dir(h.path("empty-dir")).unwrap();
    let baseline = tree(&h.ws());
    let git_head = git(&h.ws(), &["rev-parse", "HEAD"]);
    let git_status = git(&h.ws(), &["status", "--porcelain"]);
    let s = h.client.snapshot(None, &[]).await.unwrap();
    assert!(s.files >= 5);

    mutate(&h.ws());
    std::fs::remove_file(h.path("link")).unwrap();
    std::os::unix::fs::symlink("README.md", h.path("link")).unwrap();
    std::fs::remove_dir(h.path("empty-dir")).unwrap();
    std::fs::create_dir_all(h.path("junk/dir")).unwrap();
    std::fs::write(h.path("junk/dir/x"), "x").unwrap();
    std::fs::write(h.path("empty-dir2"), "").unwrap();
    // Same size, same second: only the content hash can tell.
    std::fs::write(h.path("README.md"), "HELLO\n").unwrap();
    // The agent also committed: .git changes are reset too.
    git(&h.ws(), &["add", "-A"]);
    git(&h.ws(), &["commit", "-qm", "agent"]);

    let r = h.client.reset(None).await.unwrap();
    assert!(
        r.restored >= 4 && r.removed >= 3,
        "restored {} removed {}",
        r.restored,
        r.removed
    );
    // A second reset has nothing to do (checked before git runs: `git status` refreshes
    // .git/index, which a reset would then rightly restore).
    let again = h.client.reset(None).await.unwrap();
    assert_eq!((again.restored, again.removed), (0, 0));
    assert_eq!(tree(&h.ws()), baseline);
    assert_eq!(git(&h.ws(), &["rev-parse", "HEAD"]), git_head);
    assert_eq!(git(&h.ws(), &["status", "--porcelain"]), git_status);
    assert_eq!(h.client.diff(None, &[], &[]).await.unwrap().files.len(), 0);

    // Named snapshots, and resetting to one that does not exist.
    std::fs::write(h.path("README.md"), "v2\n").unwrap();
    h.client.snapshot(Some("v2"), &[]).await.unwrap();
    h.client.reset(None).await.unwrap();
    assert_eq!(h.read("README.md"), "hello\n");
    h.client.reset(Some("v2")).await.unwrap();
    assert_eq!(h.read("README.md"), "v2\n");
    assert!(matches!(
        h.client.reset(Some("nope")).await.unwrap_err(),
        Error::NoSnapshot(_)
    ));
}

#[tokio::test]
async fn patches_from_git_apply_and_failing_patches_change_nothing() {
    let h = common::start().await;
    make_repo(&h);
    h.client.snapshot(None, &[]).await.unwrap();
    let baseline = tree(&h.ws());
    // A real `git diff` of every kind of change.
    mutate(&h.ws());
    git(&h.ws(), &["add", "-A"]);
    let patch = git(&h.ws(), &["diff", "--cached"]);
    let wanted = tree(&h.ws());
    git(&h.ws(), &["reset", "-q"]);
    h.client.reset(None).await.unwrap();
    assert_eq!(tree(&h.ws()), baseline);

    let checked = h
        .client
        .apply_patch(patch.clone(), false, true)
        .await
        .unwrap();
    assert_eq!(checked.files.len(), 5);
    assert_eq!(tree(&h.ws()), baseline, "check_only changed files");
    h.client
        .apply_patch(patch.clone(), false, false)
        .await
        .unwrap();
    assert_eq!(tree(&h.ws()), wanted);
    // Applying it again fails (already applied) and changes nothing.
    assert!(matches!(
        h.client
            .apply_patch(patch.clone(), false, false)
            .await
            .unwrap_err(),
        Error::PatchRejected(_)
    ));
    assert_eq!(tree(&h.ws()), wanted);
    // Reverse undoes it.
    h.client
        .apply_patch(patch.clone(), true, false)
        .await
        .unwrap();
    assert_eq!(tree(&h.ws()), baseline);

    // A two-file patch whose second file does not apply: the first is not touched either.
    let bad = "\
--- a/src/lib.py
+++ b/src/lib.py
@@ -1,2 +1,2 @@
 def add(a, b):
-    return a + b
+    return a * b
--- a/README.md
+++ b/README.md
@@ -1 +1 @@
-this line is not in the file
+bye
";
    match h.client.apply_patch(bad, false, false).await.unwrap_err() {
        Error::PatchRejected(msg) => assert!(msg.contains("README.md"), "{msg}"),
        e => panic!("{e:?}"),
    }
    assert_eq!(tree(&h.ws()), baseline);
    // Garbage and escaping paths are refused.
    assert!(matches!(
        h.client
            .apply_patch("not a patch", false, false)
            .await
            .unwrap_err(),
        Error::PatchRejected(_)
    ));
    let escape = "--- /dev/null\n+++ b/../escape.txt\n@@ -0,0 +1 @@\n+x\n";
    let e = h
        .client
        .apply_patch(escape, false, false)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PathRefused(_)), "{e:?}");
    assert!(!h.dir.path().join("escape.txt").exists());

    // A plain `diff -u` patch (no a/ b/ prefixes) applies too.
    let plain = "--- src/util.py\n+++ src/util.py\n@@ -1,2 +1,2 @@\n X = 1\n-Y = 2\n+Y = 20\n";
    h.client.apply_patch(plain, false, false).await.unwrap();
    assert_eq!(h.read("src/util.py"), "X = 1\nY = 20\n");
}

#[tokio::test]
async fn oracle_files_are_put_aside_and_restored() {
    let h = common::start().await;
    make_repo(&h);
    let original = h.read("tests/test_lib.py");
    let r = h
        .client
        .oracle_stash(&["tests/test_lib.py", "tests/test_new.py"], false)
        .await
        .unwrap();
    assert_eq!(r.stashed, 1);
    assert_eq!(r.missing, vec!["tests/test_new.py".to_string()]);
    // The agent weakens the test and adds one.
    h.write("tests/test_lib.py", "def test_add():\n    pass\n");
    h.write("tests/test_new.py", "def test_fake():\n    pass\n");
    // The stash is not in the workspace nor in the state directory.
    let grep = std::process::Command::new("grep")
        .args(["-rl", "assert add(1, 2) == 3"])
        .arg(h.dir.path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&grep.stdout),
        "",
        "oracle content found on disk"
    );
    let r = h.client.oracle_restore().await.unwrap();
    assert_eq!((r.restored, r.removed), (1, 1));
    assert_eq!(h.read("tests/test_lib.py"), original);
    assert!(!h.path("tests/test_new.py").exists());
    // remove=true takes the files out of the workspace.
    h.client.oracle_stash(&["README.md"], true).await.unwrap();
    assert!(!h.path("README.md").exists());
    h.client.oracle_restore().await.unwrap();
    assert_eq!(h.read("README.md"), "hello\n");
}

#[tokio::test]
async fn history_removal_leaves_no_objects() {
    let h = common::start().await;
    make_repo(&h);
    h.write("src/lib.py", "SECRET_OLD_VERSION = 1\n");
    git(&h.ws(), &["commit", "-qam", "second"]);
    let old_commit = git(&h.ws(), &["rev-parse", "HEAD~1"]).trim().to_string();
    git(&h.ws(), &["tag", "v1", "HEAD~1"]);
    // A snapshot that includes .git must not keep the history around either.
    h.client.snapshot(None, &[]).await.unwrap();
    let r = h.client.reset_history().await.unwrap();
    assert!(r.removed && r.initialized && r.git_available, "{r:?}");
    let ws = h.ws();
    // A new repository: one commit of the work tree as it is, nothing of the old history.
    assert_eq!(git(&ws, &["log", "--oneline"]).lines().count(), 1);
    assert_eq!(git(&ws, &["status", "--porcelain"]), "");
    assert_eq!(
        git(&ws, &["log", "-1", "--format=%an <%ae>|%cn <%ce>|%s"]).trim(),
        "selfplay <selfplay@localhost>|selfplay <selfplay@localhost>|Initial commit"
    );
    assert_eq!(
        git(&ws, &["show", "HEAD:src/lib.py"]),
        "SECRET_OLD_VERSION = 1\n"
    );
    assert!(r.message.contains("initial commit"), "{r:?}");
    let cat = std::process::Command::new("git")
        .args(["cat-file", "-e", &old_commit])
        .current_dir(&ws)
        .output()
        .unwrap();
    assert!(!cat.status.success());
    assert_eq!(git(&ws, &["tag"]), "");
    // Work tree untouched.
    assert_eq!(h.read("src/lib.py"), "SECRET_OLD_VERSION = 1\n");
    // The snapshot store holds no git object any more: nothing stored mentions the old commit.
    let state_files = walk_files(&h.dir.path().join("state"));
    for f in state_files {
        let data = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&data).contains(&old_commit),
            "{} holds the old commit id",
            f.display()
        );
    }
}

#[tokio::test]
async fn history_without_git_reports_it() {
    // A PATH with bash tools but no git.
    let bin = tempfile::tempdir().unwrap();
    for tool in ["bash", "sh", "ls", "cat"] {
        if let Some(p) = sandbox_sidecar::process::find_in_path(tool) {
            std::os::unix::fs::symlink(p, bin.path().join(tool)).unwrap();
        }
    }
    let path = bin.path().to_string_lossy().into_owned();
    let h = common::start_with(|o| o.env.push(("PATH".into(), path))).await;
    std::fs::create_dir_all(h.path(".git/objects/ab")).unwrap();
    std::fs::write(h.path(".git/objects/ab/cdef"), "obj").unwrap();
    let r = h.client.reset_history().await.unwrap();
    assert!(r.removed);
    assert!(!r.git_available && !r.initialized);
    assert!(r.message.contains("git is not installed"), "{}", r.message);
    assert!(!h.path(".git").exists());
    assert!(!h.client.health().await.unwrap().git_available);
}

fn walk_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
