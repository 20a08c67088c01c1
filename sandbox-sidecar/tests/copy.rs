//! `sandbox-sidecar copy --from SRC --to DST`, run as a non-root user copying a root-owned
//! tree when the tests run as root (as the Kubernetes init container does), else as
//! whoever runs the tests.

use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

const NOBODY: u32 = 65534;

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn is_root() -> bool {
    euid() == 0
}

/// Who the copy runs as.
fn copier() -> u32 {
    if is_root() { NOBODY } else { euid() }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The binary the copier runs: when that is another user, a copy in a directory anyone
/// may enter (made once per test process), whatever the build directory's permissions.
fn copier_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    if !is_root() {
        return common::bin();
    }
    BIN.get_or_init(|| {
        let d = scratch();
        let b = d.path().join("sandbox-sidecar");
        std::fs::copy(common::bin(), &b).unwrap();
        chmod(&b, 0o755);
        (d, b)
    })
    .1
    .clone()
}

/// Runs `sandbox-sidecar copy` as [`copier`].
fn run_copy(from: &Path, to: &Path) -> std::process::Output {
    let mut cmd = Command::new(copier_bin());
    cmd.arg("copy").arg("--from").arg(from).arg("--to").arg(to);
    if is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    // Another test's thread forking while the binary was being written holds a writable
    // descriptor of it until its child execs: ETXTBSY for a moment.
    for _ in 0..100 {
        match cmd.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.unwrap(),
        }
    }
    panic!("the copied binary stayed busy");
}

/// A directory the copier may create things in, and others may enter.
fn scratch() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    chmod(d.path(), 0o755);
    d
}

fn set_mtime(p: &Path, secs: i64, nsecs: i64) {
    let t = nix::sys::time::TimeSpec::new(secs, nsecs);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

fn file(p: &Path, content: &str, mode: u32, mtime: i64) {
    std::fs::write(p, content).unwrap();
    chmod(p, mode);
    set_mtime(p, mtime, 123_456_789);
}

#[test]
fn copies_files_dirs_and_links_keeping_modes_and_times_as_another_user() {
    let top = scratch();
    let src = top.path().join("testbed");
    std::fs::create_dir(&src).unwrap();
    file(
        &src.join("run.sh"),
        "#!/bin/sh\necho hi\n",
        0o755,
        1_000_000_000,
    );
    file(&src.join("readonly.txt"), "ro", 0o444, 1_000_000_001);
    file(&src.join("odd-mode"), "o", 0o604, 1_000_000_002);
    let non_utf8 = PathBuf::from(std::ffi::OsStr::from_bytes(b"caf\xe9.txt"));
    file(&src.join(&non_utf8), "latin-1 name", 0o644, 1_000_000_003);
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    file(
        &src.join("sub/deeper/data.bin"),
        &"x".repeat(100_000),
        0o644,
        1_000_000_004,
    );
    // A read-only directory of the image: the copy must still get its content inside.
    std::fs::create_dir(src.join("rodir")).unwrap();
    file(
        &src.join("rodir/inside.txt"),
        "inside",
        0o644,
        1_000_000_005,
    );
    chmod(&src.join("rodir"), 0o555);
    std::fs::create_dir(src.join("empty")).unwrap();
    std::fs::hard_link(src.join("run.sh"), src.join("hardlink.sh")).unwrap();
    std::os::unix::fs::symlink("run.sh", src.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("no/such/target", src.join("link-dangling")).unwrap();
    std::os::unix::fs::symlink("sub", src.join("link-dir")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("link-abs")).unwrap();
    nix::unistd::mkfifo(
        &src.join("a-fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("a-socket")).unwrap();
    if is_root() {
        // Owned by someone else again: the copy must belong to the copier all the same.
        std::os::unix::fs::chown(src.join("odd-mode"), Some(1234), None).unwrap();
    }
    // Directory times last: creating entries changed them.
    set_mtime(&src.join("sub/deeper"), 1_100_000_000, 5);
    set_mtime(&src.join("sub"), 1_100_000_001, 6);
    set_mtime(&src.join("rodir"), 1_100_000_002, 7);

    // The destination's parent belongs to the copier (an emptyDir); DST itself is new.
    let vol = top.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::os::unix::fs::chown(&vol, Some(copier()), None).unwrap();
    let dst = vol.join("testbed");

    let files = [
        Path::new("run.sh"),
        Path::new("readonly.txt"),
        Path::new("odd-mode"),
        &non_utf8,
        Path::new("sub/deeper/data.bin"),
        Path::new("rodir/inside.txt"),
        Path::new("hardlink.sh"),
    ];
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(src.join(f)).unwrap().len())
        .sum();

    let out = run_copy(&src, &dst);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        format!(
            "copied {} to {}: 7 files, 4 directories, 4 symlinks, {bytes} bytes, 2 skipped",
            src.display(),
            dst.display(),
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("a-fifo") && stderr.contains("a fifo"),
        "{stderr}"
    );
    assert!(
        stderr.contains("a-socket") && stderr.contains("a socket"),
        "{stderr}"
    );
    assert!(!dst.join("a-fifo").exists() && !dst.join("a-socket").exists());

    let me = copier();
    for rel in files {
        let (s, d) = (src.join(rel), dst.join(rel));
        let (sm, dm) = (
            std::fs::symlink_metadata(&s).unwrap(),
            std::fs::symlink_metadata(&d).unwrap(),
        );
        assert!(dm.is_file(), "{rel:?}");
        assert_eq!(
            std::fs::read(&s).unwrap(),
            std::fs::read(&d).unwrap(),
            "{rel:?}"
        );
        assert_eq!(sm.mode() & 0o7777, dm.mode() & 0o7777, "mode of {rel:?}");
        assert_eq!(
            (sm.mtime(), sm.mtime_nsec()),
            (dm.mtime(), dm.mtime_nsec()),
            "mtime of {rel:?}"
        );
        assert_eq!(dm.uid(), me, "owner of {rel:?}");
        assert_eq!(dm.nlink(), 1, "{rel:?} is a file of its own");
    }
    assert_ne!(
        std::fs::metadata(dst.join("run.sh")).unwrap().ino(),
        std::fs::metadata(dst.join("hardlink.sh")).unwrap().ino()
    );

    for (rel, target) in [
        ("link-rel", "run.sh"),
        ("link-dangling", "no/such/target"),
        ("link-dir", "sub"),
        ("link-abs", "/etc/passwd"),
    ] {
        let d = dst.join(rel);
        assert!(
            std::fs::symlink_metadata(&d)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{rel} stays a symlink"
        );
        assert_eq!(std::fs::read_link(&d).unwrap(), Path::new(target), "{rel}");
    }

    // Directories: their modes plus u+w, their times, the copier's.
    for (rel, mode) in [
        ("", 0o755),
        ("sub", 0o755),
        ("sub/deeper", 0o755),
        ("rodir", 0o755),
        ("empty", 0o755),
    ] {
        let (sm, dm) = (
            std::fs::metadata(src.join(rel)).unwrap(),
            std::fs::metadata(dst.join(rel)).unwrap(),
        );
        assert!(dm.is_dir());
        assert_eq!(dm.mode() & 0o7777, mode, "mode of {rel:?}");
        assert_eq!(dm.uid(), me, "owner of {rel:?}");
        if !rel.is_empty() {
            assert_eq!(
                (sm.mtime(), sm.mtime_nsec()),
                (dm.mtime(), dm.mtime_nsec()),
                "mtime of {rel:?}"
            );
        }
    }
    // The copy is usable: the executable runs, the read-only directory takes a new file.
    let ran = Command::new(dst.join("run.sh")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "hi\n");
    assert!(std::fs::symlink_metadata(dst.join("rodir")).unwrap().mode() & 0o200 != 0);
}

#[test]
fn an_unreadable_entry_fails_naming_it() {
    for what in ["file", "dir"] {
        let top = scratch();
        let src = top.path().join("src");
        std::fs::create_dir(&src).unwrap();
        file(&src.join("fine.txt"), "ok", 0o644, 1_000_000_000);
        let bad = src.join("secret");
        if what == "file" {
            file(&bad, "no", 0o600, 1_000_000_000);
        } else {
            std::fs::create_dir(&bad).unwrap();
            file(&bad.join("x"), "x", 0o644, 1_000_000_000);
        }
        if is_root() {
            // Root reads everything; the copier is someone else. The secret stays root's.
            chmod(&bad, if what == "file" { 0o600 } else { 0o700 });
        } else {
            chmod(&bad, 0o000);
        }
        let dst = top.path().join("dst");
        std::fs::create_dir(&dst).unwrap();
        std::os::unix::fs::chown(&dst, Some(copier()), None).unwrap();
        let out = run_copy(&src, &dst);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(&*bad.to_string_lossy()),
            "{what}: names the path: {stderr}"
        );
        assert!(stderr.contains("ermission denied"), "{what}: {stderr}");
        if !is_root() {
            chmod(&bad, 0o755);
        }
    }
}

#[test]
fn a_missing_source_is_an_error_and_an_existing_destination_keeps_its_mode() {
    let top = scratch();
    let out = run_copy(&top.path().join("nope"), &top.path().join("dst"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from"));

    let src = top.path().join("src");
    std::fs::create_dir(&src).unwrap();
    chmod(&src, 0o555);
    let dst = top.path().join("existing");
    std::fs::create_dir(&dst).unwrap();
    chmod(&dst, 0o777);
    let out = run_copy(&src, &dst);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&dst).unwrap().mode() & 0o7777,
        0o777,
        "an existing destination (an emptyDir) is left as it is"
    );
}
