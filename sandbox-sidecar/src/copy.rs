//! `sandbox-sidecar copy --from SRC --to DST`: copies a directory tree.
//!
//! On Kubernetes the sandbox runs as a non-root user, but a repository image's repository
//! (`/testbed`) belongs to root. An init container copies it into a volume the sandbox's user
//! owns, with the sidecar binary itself since the image may have no `cp`. The copy belongs to
//! whoever runs it (nothing is chowned), and keeps what tests can depend on: permission bits
//! (executable scripts), modification times (build tools compare them), symlinks exactly as
//! they are (never followed: a link may point outside the tree or nowhere). Directories get
//! u+w on top of their bits: a read-only directory of the image would otherwise be one the
//! agent could not edit in. Hard links become separate files (a volume cannot share inodes
//! with an image layer anyway). Fifos, sockets and devices are skipped and counted.
//!
//! Directories are walked first, in one thread; files are then copied by several threads
//! with `std::fs::copy` (`copy_file_range`, so the kernel moves the data), which matters on
//! a repository of 100 000 files; directory modes and times are set last, deepest first,
//! since creating entries changes a directory's mtime and a read-only mode would stop the
//! copy.

use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

/// Below this many files one thread does the copying.
const PARALLEL_FROM: usize = 64;
const MAX_THREADS: usize = 8;

/// What a copy did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopySummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Fifos, sockets and devices, which are not copied.
    pub skipped: u64,
}

impl std::fmt::Display for CopySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} files, {} directories, {} symlinks, {} bytes, {} skipped",
            self.files, self.dirs, self.symlinks, self.bytes, self.skipped
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("--from {path}: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--from {0} is not a directory")]
    SourceNotDir(PathBuf),
    #[error("--to {path}: {source}")]
    Dest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--to {to} lies inside --from {from}: the copy would copy itself")]
    DestInsideSource { from: PathBuf, to: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is a directory on one side and not on the other; a directory is never replaced")]
    TypeConflict(PathBuf),
}

fn times(m: &std::fs::Metadata) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(m.atime(), m.atime_nsec()),
        TimeSpec::new(m.mtime(), m.mtime_nsec()),
    )
}

fn set_times(path: &Path, t: (TimeSpec, TimeSpec)) -> Result<(), CopyError> {
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t.0,
        &t.1,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| CopyError::Write {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// A directory whose mode and times are set once everything inside it exists.
struct DirFinish {
    path: PathBuf,
    mode: u32,
    times: (TimeSpec, TimeSpec),
}

impl DirFinish {
    fn apply(&self) -> Result<(), CopyError> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            &self.path,
            std::fs::Permissions::from_mode((self.mode & 0o7777) | 0o200),
        )
        .map_err(|source| CopyError::Write {
            path: self.path.clone(),
            source,
        })?;
        set_times(&self.path, self.times)
    }
}

struct FileJob {
    from: PathBuf,
    to: PathBuf,
    times: (TimeSpec, TimeSpec),
}

/// Makes room for a non-directory at `to` in a directory that existed before the copy: an
/// older file or link there is replaced, a directory is not.
fn clear_for_entry(to: &Path) -> Result<(), CopyError> {
    match std::fs::symlink_metadata(to) {
        Ok(m) if m.is_dir() => Err(CopyError::TypeConflict(to.to_path_buf())),
        Ok(_) => std::fs::remove_file(to).map_err(|source| CopyError::Write {
            path: to.to_path_buf(),
            source,
        }),
        Err(_) => Ok(()),
    }
}

/// Creates directory `to` for copying into (owner-only until finished); `Ok(true)` when it
/// is new, `Ok(false)` when a directory was already there (it is given u+rwx).
fn make_dir(to: &Path) -> Result<bool, CopyError> {
    match std::fs::DirBuilder::new().mode(0o700).create(to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(to).map_err(|source| CopyError::Write {
                path: to.to_path_buf(),
                source,
            })?;
            if !m.is_dir() {
                return Err(CopyError::TypeConflict(to.to_path_buf()));
            }
            if m.mode() & 0o700 != 0o700 {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(
                    to,
                    std::fs::Permissions::from_mode((m.mode() & 0o7777) | 0o700),
                )
                .map_err(|source| CopyError::Write {
                    path: to.to_path_buf(),
                    source,
                })?;
            }
            Ok(false)
        }
        Err(source) => Err(CopyError::Write {
            path: to.to_path_buf(),
            source,
        }),
    }
}

/// Copies the contents of directory `from` into directory `to` (created when missing; an
/// existing one keeps its own mode and times). `skipped` is told each entry that is not
/// copied and what it is.
pub fn copy_tree(
    from: &Path,
    to: &Path,
    skipped: &mut dyn FnMut(&Path, &'static str),
) -> Result<CopySummary, CopyError> {
    // The top is followed when a symlink (`/testbed` -> `/repo`); nothing below it is.
    let from_meta = std::fs::metadata(from).map_err(|source| CopyError::Source {
        path: from.to_path_buf(),
        source,
    })?;
    if !from_meta.is_dir() {
        return Err(CopyError::SourceNotDir(from.to_path_buf()));
    }
    let to_created = match std::fs::metadata(to) {
        Ok(m) if m.is_dir() => false,
        Ok(_) => {
            return Err(CopyError::Dest {
                path: to.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a directory",
                ),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(to)
                .map_err(|source| CopyError::Dest {
                    path: to.to_path_buf(),
                    source,
                })?;
            true
        }
        Err(source) => {
            return Err(CopyError::Dest {
                path: to.to_path_buf(),
                source,
            });
        }
    };
    let real_from = from.canonicalize().map_err(|source| CopyError::Source {
        path: from.to_path_buf(),
        source,
    })?;
    let real_to = to.canonicalize().map_err(|source| CopyError::Dest {
        path: to.to_path_buf(),
        source,
    })?;
    if real_to.starts_with(&real_from) {
        if to_created {
            let _ = std::fs::remove_dir(to);
        }
        return Err(CopyError::DestInsideSource {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        });
    }

    let mut summary = CopySummary::default();
    let mut dirs: Vec<DirFinish> = Vec::new();
    if to_created {
        dirs.push(DirFinish {
            path: to.to_path_buf(),
            mode: from_meta.mode(),
            times: times(&from_meta),
        });
    }
    let mut files: Vec<FileJob> = Vec::new();
    // (source directory, destination directory, whether the destination is new: then
    // nothing can be in the way and no entry needs a look first).
    let mut todo: Vec<(PathBuf, PathBuf, bool)> =
        vec![(from.to_path_buf(), to.to_path_buf(), to_created)];
    while let Some((sdir, ddir, fresh)) = todo.pop() {
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CopyError::Read { path, source }
        };
        for entry in std::fs::read_dir(&sdir).map_err(read_err(&sdir))? {
            let entry = entry.map_err(read_err(&sdir))?;
            let sp = entry.path();
            let dp = ddir.join(entry.file_name());
            // Not followed: a symlink's own metadata.
            let meta = entry.metadata().map_err(read_err(&sp))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                let new = make_dir(&dp)?;
                dirs.push(DirFinish {
                    path: dp.clone(),
                    mode: meta.mode(),
                    times: times(&meta),
                });
                summary.dirs += 1;
                todo.push((sp, dp, new));
            } else if ft.is_file() {
                if !fresh {
                    clear_for_entry(&dp)?;
                }
                files.push(FileJob {
                    from: sp,
                    to: dp,
                    times: times(&meta),
                });
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&sp).map_err(read_err(&sp))?;
                if !fresh {
                    clear_for_entry(&dp)?;
                }
                std::os::unix::fs::symlink(&target, &dp).map_err(|source| CopyError::Write {
                    path: dp.clone(),
                    source,
                })?;
                set_times(&dp, times(&meta))?;
                summary.symlinks += 1;
            } else {
                let kind = if ft.is_fifo() {
                    "a fifo"
                } else if ft.is_socket() {
                    "a socket"
                } else if ft.is_block_device() {
                    "a block device"
                } else if ft.is_char_device() {
                    "a character device"
                } else {
                    "of an unknown type"
                };
                skipped(&sp, kind);
                summary.skipped += 1;
            }
        }
    }

    summary.bytes = copy_files(&files)?;
    summary.files = files.len() as u64;
    // Deepest first: a parent's mode must not stop the work inside it.
    for d in dirs.iter().rev() {
        d.apply()?;
    }
    Ok(summary)
}

fn copy_one(job: &FileJob) -> Result<u64, CopyError> {
    let n = std::fs::copy(&job.from, &job.to).map_err(|source| {
        // std does not say which side failed; an unreadable source is the likelier error
        // worth naming precisely.
        match std::fs::File::open(&job.from) {
            Err(e) => CopyError::Read {
                path: job.from.clone(),
                source: e,
            },
            Ok(_) => CopyError::Copy {
                from: job.from.clone(),
                to: job.to.clone(),
                source,
            },
        }
    })?;
    set_times(&job.to, job.times)?;
    Ok(n)
}

/// Copies every file, on several threads when there are many; returns the bytes copied.
fn copy_files(jobs: &[FileJob]) -> Result<u64, CopyError> {
    let threads = if jobs.len() < PARALLEL_FROM {
        1
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(2, MAX_THREADS)
    };
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<CopyError>> = Mutex::new(None);
    let work = || {
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(job) = jobs.get(i) else { break };
            match copy_one(job) {
                Ok(n) => {
                    bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(e);
                }
            }
        }
    };
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(work);
            }
        });
    }
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(bytes.into_inner()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_files_in_an_existing_destination_but_never_a_directory() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("f"), b"new").unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        // A link in the way must be replaced, not written through.
        std::fs::write(d.path().join("victim"), b"keep").unwrap();
        std::os::unix::fs::symlink(d.path().join("victim"), dst.join("f")).unwrap();
        let s = copy_tree(&src, &dst, &mut |_, _| {}).unwrap();
        assert_eq!((s.files, s.dirs), (1, 1));
        assert_eq!(std::fs::read(dst.join("f")).unwrap(), b"new");
        assert_eq!(std::fs::read(d.path().join("victim")).unwrap(), b"keep");

        std::fs::remove_file(dst.join("f")).unwrap();
        std::fs::create_dir(dst.join("f")).unwrap();
        let e = copy_tree(&src, &dst, &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, CopyError::TypeConflict(_)), "{e}");
    }

    #[test]
    fn refuses_to_copy_into_itself_and_from_a_file() {
        let d = tempfile::tempdir().unwrap();
        let e = copy_tree(d.path(), &d.path().join("inside"), &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, CopyError::DestInsideSource { .. }), "{e}");
        std::fs::write(d.path().join("file"), b"").unwrap();
        let e = copy_tree(&d.path().join("file"), &d.path().join("x"), &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, CopyError::SourceNotDir(_)), "{e}");
    }
}
