//! Leaving nothing behind between test runs: every process the sidecar started, and the
//! contents of the scratch directories (`serve --scratch-dir`).
//!
//! The sidecar is a child subreaper (set at startup), so a command that daemonises
//! (`setsid nohup server &`) leaves a process re-parented to the sidecar rather than to
//! init: walking the parent links in `/proc` from the sidecar finds everything.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::read_stat;

/// Makes orphaned descendants re-parent to the sidecar (see the module's documentation).
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: a prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Every live (not zombie) descendant of this process.
pub fn descendants() -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(st) = read_stat(pid)
                && st.state != 'Z'
            {
                children.entry(st.ppid).or_default().push(pid);
            }
        }
    }
    let mut out = BTreeSet::new();
    let mut todo = vec![me];
    while let Some(p) = todo.pop() {
        for c in children.get(&p).into_iter().flatten() {
            if out.insert(*c) {
                todo.push(*c);
            }
        }
    }
    out
}

/// SIGKILLs every descendant not in `keep` until none is left (a process caught mid-fork
/// may have a child the first pass did not see), for at most `patience`. Returns how many
/// were killed.
pub fn kill_descendants_except(keep: &BTreeSet<i32>, patience: Duration) -> usize {
    let start = Instant::now();
    let mut killed = BTreeSet::new();
    loop {
        let now: Vec<i32> = descendants()
            .into_iter()
            .filter(|p| !keep.contains(p))
            .collect();
        if now.is_empty() || start.elapsed() > patience {
            break;
        }
        for p in now {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            killed.insert(p);
        }
        // Orphans are our children now; the ones nobody waits for are reaped here.
        crate::process::reap_orphans();
        std::thread::sleep(Duration::from_millis(5));
    }
    crate::process::reap_orphans();
    killed.len()
}

/// Every mount point of this process's mount namespace (`/proc/self/mountinfo`'s fifth
/// field, octal escapes decoded): a scratch directory may hold bind mounts (the workspace,
/// the state directory, the token, a toolchain under `/tmp`) that emptying must leave alone.
pub fn mount_points() -> Vec<std::path::PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            let mut out = Vec::new();
            let b = p.as_bytes();
            let mut i = 0;
            while i < b.len() {
                let octal = b
                    .get(i + 1..i + 4)
                    .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
                match (b[i], octal) {
                    (b'\\', Some(d)) => {
                        out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                        i += 4;
                    }
                    (c, _) => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
            let os: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(out);
            std::path::PathBuf::from(os)
        })
        .collect()
}

/// Removes everything inside `dir` (not `dir` itself), never following symlinks, and
/// leaving each path of `keep` (the state directory, mount points) and the directories
/// leading to it in place.
pub fn empty_dir(dir: &Path, keep: &[std::path::PathBuf]) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            crate::perms::make_owner_accessible(dir, true)?;
            std::fs::read_dir(dir)?
        }
        Err(e) => return Err(e),
    };
    let mut first_error = None;
    for e in entries.flatten() {
        let path = e.path();
        if keep.contains(&path) {
            continue;
        }
        let r = if keep.iter().any(|k| k.starts_with(&path)) {
            // Only a real directory can lead to `keep`: starts_with compares names.
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => empty_dir(&path, keep),
                Ok(_) => std::fs::remove_file(&path),
                Err(e) => Err(e),
            }
        } else {
            remove_entry(&path)
        };
        if let Err(e) = r
            && first_error.is_none()
        {
            first_error = Some(io::Error::new(
                e.kind(),
                format!("removing {}: {e}", path.display()),
            ));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Removes a file, symlink or directory tree (std's `remove_dir_all` does not follow
/// symlinks); a tree the agent made unreadable gets its owner bits back and one retry.
fn remove_entry(path: &Path) -> io::Result<()> {
    let m = std::fs::symlink_metadata(path)?;
    if !m.is_dir() {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_dir_all(path) {
        Err(e) if crate::perms::is_permission_error(&e) => {
            crate::perms::make_tree_owner_accessible(path)?;
            std::fs::remove_dir_all(path)
        }
        r => r,
    }
}
