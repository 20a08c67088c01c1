//! Snapshots of the workspace without git: a manifest of every entry plus a content store
//! (files named by their SHA-256) kept outside the workspace.
//!
//! A file whose size, mtime, ctime and inode equal the manifest's is taken as unchanged
//! (git's own rule); any other is hashed and compared. Reset restores added, changed and
//! deleted files, directories, symlinks and permission bits, and puts back mtimes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest as _, Sha256};

use crate::error::{Result, SidecarError};
use crate::files::write_atomic;
use crate::paths::Workspace;
use crate::proto::FileChange;

#[derive(Debug, Clone, PartialEq, Eq)]
struct StatKey {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

impl StatKey {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
        }
    }
}

#[derive(Debug, Clone)]
enum Entry {
    File {
        hash: String,
        mode: u32,
        stat: StatKey,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: OsString,
    },
}

#[derive(Debug)]
pub struct Manifest {
    entries: BTreeMap<String, Entry>,
    excludes: Vec<String>,
}

pub struct SnapshotStats {
    pub files: u64,
    pub bytes: u64,
    pub duration_us: u64,
}

pub struct ResetStats {
    pub restored: u64,
    pub removed: u64,
    pub unchanged: u64,
    pub duration_us: u64,
}

pub struct DiffResult {
    pub diff: Vec<u8>,
    pub files: Vec<FileChange>,
    pub binary_files: Vec<String>,
}

/// The most a snapshot or diff walks before refusing (`serve --max-workspace-*`): an
/// agent can make the workspace big enough to run every walk into its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkLimits {
    /// Sum of the sizes of regular files (as stat reports them: sparse files count whole).
    pub max_bytes: u64,
    /// Entries: files, directories and symlinks.
    pub max_files: u64,
}

impl Default for WalkLimits {
    fn default() -> Self {
        Self {
            max_bytes: 8 << 30,
            max_files: 1_000_000,
        }
    }
}

/// All snapshots of one workspace, sharing one content store.
pub struct Snapshots {
    ws: Workspace,
    objects: PathBuf,
    manifests: HashMap<String, Arc<Manifest>>,
    limits: WalkLimits,
}

/// Reads a file, giving the owner's bits back once if the agent locked it.
fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    crate::perms::retry_accessible(path, || std::fs::read(path))
}

/// Counts what a walk saw against the limits.
struct Tally<'a> {
    limits: Option<&'a WalkLimits>,
    files: u64,
    bytes: u64,
}

impl Tally<'_> {
    fn add(&mut self, m: &std::fs::Metadata) -> Result<()> {
        let Some(l) = self.limits else { return Ok(()) };
        self.files += 1;
        if m.is_file() {
            self.bytes = self.bytes.saturating_add(m.size());
        }
        if self.files > l.max_files {
            return Err(SidecarError::WorkspaceTooLarge(format!(
                "more than {} entries (--max-workspace-files {}); remove files or exclude them",
                l.max_files, l.max_files
            )));
        }
        if self.bytes > l.max_bytes {
            return Err(SidecarError::WorkspaceTooLarge(format!(
                "at least {} bytes in files, over --max-workspace-bytes {}; remove files or exclude them",
                self.bytes, l.max_bytes
            )));
        }
        Ok(())
    }
}

/// Is `path` the same as `prefix` or under it (component-wise)?
fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn is_git_path(path: &str) -> bool {
    path == ".git"
        || path.starts_with(".git/")
        || path.contains("/.git/")
        || path.ends_with("/.git")
}

fn norm_excludes(ws: &Workspace, excludes: &[String]) -> Result<Vec<String>> {
    excludes
        .iter()
        .map(|e| {
            // Checks the syntax (no `..`, not absolute) and normalises `./a//b` to `a/b`.
            let abs = ws.join_lexical(e)?;
            Ok(ws.relative(&abs).unwrap_or_default())
        })
        .collect()
}

impl Snapshots {
    pub fn new(ws: Workspace, state_dir: &Path) -> std::io::Result<Self> {
        let objects = state_dir.join("objects");
        std::fs::create_dir_all(&objects)?;
        Ok(Self {
            ws,
            objects,
            manifests: HashMap::new(),
            limits: WalkLimits::default(),
        })
    }

    pub fn with_limits(mut self, limits: WalkLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn has(&self, name: &str) -> bool {
        self.manifests.contains_key(name)
    }

    fn object_path(&self, hash: &str) -> PathBuf {
        self.objects.join(hash)
    }

    /// Walks the workspace (without following symlinks), skipping excluded paths, calling
    /// `f` with each relative path and its metadata, parents before children. A directory
    /// the agent locked gets its owner's bits back (u+rwx) and is read once more; with
    /// `capped`, the walk stops with `WorkspaceTooLarge` past the limits.
    fn walk(
        &self,
        excludes: &[String],
        capped: bool,
        f: &mut dyn FnMut(&str, &Path, &std::fs::Metadata) -> Result<()>,
    ) -> Result<()> {
        let mut tally = Tally {
            limits: capped.then_some(&self.limits),
            files: 0,
            bytes: 0,
        };
        let mut stack = vec![self.ws.root().to_path_buf()];
        while let Some(dir) = stack.pop() {
            let listed = |d: &Path| -> std::io::Result<Vec<PathBuf>> {
                let rd = std::fs::read_dir(d)?;
                rd.map(|e| e.map(|e| e.path())).collect()
            };
            let mut children = crate::perms::retry_accessible(&dir, || listed(&dir))
                .map_err(|e| SidecarError::io(format!("listing {}", dir.display()), e))?;
            children.sort();
            for path in children.into_iter().rev() {
                let Some(rel) = self.ws.relative(&path) else {
                    continue;
                };
                if excludes.iter().any(|e| under(&rel, e)) {
                    continue;
                }
                let m = match std::fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) if crate::perms::is_permission_error(&e) => {
                        // A directory readable but not searchable (u-x): fix it, stat again.
                        crate::perms::make_owner_accessible(&dir, false)
                            .and_then(|()| std::fs::symlink_metadata(&path))
                            .map_err(|e| SidecarError::io(format!("stat {rel}"), e))?
                    }
                    Err(e) => return Err(SidecarError::io(format!("stat {rel}"), e)),
                };
                tally.add(&m)?;
                f(&rel, &path, &m)?;
                if m.is_dir() {
                    stack.push(path);
                }
            }
        }
        Ok(())
    }

    fn store(&self, data: &[u8]) -> std::io::Result<String> {
        let hash = hex::encode(Sha256::digest(data));
        let obj = self.object_path(&hash);
        if !obj.exists() {
            write_atomic(&obj, data, 0o600)?;
        }
        Ok(hash)
    }

    fn read_entry_content(&self, entry: &Entry) -> Result<Vec<u8>> {
        match entry {
            Entry::File { hash, .. } => std::fs::read(self.object_path(hash))
                .map_err(|e| SidecarError::io(format!("reading stored object {hash}"), e)),
            Entry::Symlink { target } => Ok(target.clone().into_vec()),
            Entry::Dir { .. } => Ok(Vec::new()),
        }
    }

    pub fn take(&mut self, name: &str, excludes: &[String]) -> Result<SnapshotStats> {
        let start = Instant::now();
        let excludes = norm_excludes(&self.ws, excludes)?;
        let mut entries = BTreeMap::new();
        let mut bytes = 0u64;
        let mut files = 0u64;
        self.walk(&excludes, true, &mut |rel, path, m| {
            let ft = m.file_type();
            let entry = if ft.is_symlink() {
                let target = std::fs::read_link(path)
                    .map_err(|e| SidecarError::io(format!("readlink {rel}"), e))?;
                Entry::Symlink {
                    target: target.into_os_string(),
                }
            } else if ft.is_dir() {
                Entry::Dir {
                    mode: m.permissions().mode() & 0o7777,
                }
            } else if ft.is_file() {
                let data =
                    read_file(path).map_err(|e| SidecarError::io(format!("reading {rel}"), e))?;
                bytes += data.len() as u64;
                files += 1;
                let hash = self
                    .store(&data)
                    .map_err(|e| SidecarError::io("writing the snapshot store", e))?;
                Entry::File {
                    hash,
                    mode: m.permissions().mode() & 0o7777,
                    stat: StatKey::of(m),
                }
            } else {
                // Sockets, FIFOs, devices: not part of a snapshot.
                return Ok(());
            };
            entries.insert(rel.to_string(), entry);
            Ok(())
        })?;
        self.manifests
            .insert(name.to_string(), Arc::new(Manifest { entries, excludes }));
        Ok(SnapshotStats {
            files,
            bytes,
            duration_us: start.elapsed().as_micros() as u64,
        })
    }

    fn manifest(&self, name: &str) -> Result<Arc<Manifest>> {
        self.manifests
            .get(name)
            .cloned()
            .ok_or_else(|| SidecarError::NoSnapshot(name.to_string()))
    }

    /// Is the file at `path` (with metadata `m`) the same as the manifest's `entry`?
    fn same_file(&self, entry: &Entry, path: &Path, m: &std::fs::Metadata) -> Result<bool> {
        let Entry::File { hash, mode, stat } = entry else {
            return Ok(false);
        };
        if m.permissions().mode() & 0o7777 != *mode {
            return Ok(false);
        }
        if StatKey::of(m) == *stat {
            return Ok(true);
        }
        if m.size() != stat.size {
            return Ok(false);
        }
        let data = read_file(path)
            .map_err(|e| SidecarError::io(format!("reading {}", path.display()), e))?;
        Ok(hex::encode(Sha256::digest(&data)) == *hash)
    }

    pub fn reset(&self, name: &str) -> Result<ResetStats> {
        let start = Instant::now();
        let manifest = self.manifest(name)?;
        let mut stats = ResetStats {
            restored: 0,
            removed: 0,
            unchanged: 0,
            duration_us: 0,
        };
        // 1. Remove what the snapshot does not have, or has as another kind.
        let mut present = BTreeSet::new();
        let mut to_remove: Vec<(PathBuf, bool)> = Vec::new();
        let mut to_restore: BTreeSet<String> = BTreeSet::new();
        self.walk(&manifest.excludes, false, &mut |rel, path, m| {
            if to_remove
                .iter()
                .any(|(p, is_dir)| *is_dir && path.starts_with(p))
            {
                return Ok(());
            }
            let ft = m.file_type();
            match manifest.entries.get(rel) {
                Some(Entry::Dir { mode }) if ft.is_dir() => {
                    present.insert(rel.to_string());
                    if m.permissions().mode() & 0o7777 != *mode {
                        std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                            .map_err(|e| SidecarError::io(format!("chmod {rel}"), e))?;
                    }
                }
                Some(Entry::Symlink { target }) if ft.is_symlink() => {
                    let now = std::fs::read_link(path)
                        .map_err(|e| SidecarError::io(format!("readlink {rel}"), e))?;
                    if now.as_os_str() == target.as_os_str() {
                        present.insert(rel.to_string());
                        stats.unchanged += 1;
                    } else {
                        to_remove.push((path.to_path_buf(), false));
                    }
                }
                Some(e @ Entry::File { .. }) if ft.is_file() => {
                    present.insert(rel.to_string());
                    if self.same_file(e, path, m)? {
                        stats.unchanged += 1;
                    } else {
                        to_restore.insert(rel.to_string());
                    }
                }
                _ => to_remove.push((path.to_path_buf(), ft.is_dir())),
            }
            Ok(())
        })?;
        for (path, is_dir) in &to_remove {
            let r = crate::perms::retry_accessible(path, || {
                if *is_dir {
                    std::fs::remove_dir_all(path).or_else(|e| {
                        // Somewhere inside, a directory the agent locked.
                        if crate::perms::is_permission_error(&e) {
                            crate::perms::make_tree_owner_accessible(path)?;
                            std::fs::remove_dir_all(path)
                        } else {
                            Err(e)
                        }
                    })
                } else {
                    std::fs::remove_file(path)
                }
            });
            r.map_err(|e| SidecarError::io(format!("removing {}", path.display()), e))?;
            stats.removed += 1;
        }
        // 2. Create what is missing (parents first: the manifest is sorted) and rewrite
        //    changed files.
        for (rel, entry) in &manifest.entries {
            let missing = !present.contains(rel);
            if !missing && !to_restore.contains(rel) {
                continue;
            }
            let abs = self.ws.root().join(rel);
            match entry {
                Entry::Dir { mode } => {
                    crate::perms::retry_accessible(&abs, || std::fs::create_dir_all(&abs))
                        .map_err(|e| SidecarError::io(format!("mkdir {rel}"), e))?;
                    std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(*mode))
                        .map_err(|e| SidecarError::io(format!("chmod {rel}"), e))?;
                }
                Entry::Symlink { target } => {
                    crate::perms::retry_accessible(&abs, || {
                        std::os::unix::fs::symlink(target, &abs)
                    })
                    .map_err(|e| SidecarError::io(format!("symlink {rel}"), e))?;
                }
                Entry::File { mode, stat, .. } => {
                    let data = self.read_entry_content(entry)?;
                    crate::perms::retry_accessible(&abs, || write_atomic(&abs, &data, *mode))
                        .map_err(|e| SidecarError::io(format!("restoring {rel}"), e))?;
                    restore_mtime(&abs, stat.mtime);
                }
            }
            stats.restored += 1;
        }
        stats.duration_us = start.elapsed().as_micros() as u64;
        Ok(stats)
    }

    /// The workspace's changes since snapshot `name`, as a `git diff`-compatible patch.
    /// `.git` is always left out.
    pub fn diff(&self, name: &str, include: &[String], exclude: &[String]) -> Result<DiffResult> {
        let manifest = self.manifest(name)?;
        let include = norm_excludes(&self.ws, include)?;
        let exclude = norm_excludes(&self.ws, exclude)?;
        let wanted = |rel: &str| {
            !is_git_path(rel)
                && (include.is_empty() || include.iter().any(|i| under(rel, i)))
                && !exclude.iter().any(|e| under(rel, e))
        };
        // Current files (and symlinks), as (path, metadata).
        let mut current: BTreeMap<String, (PathBuf, std::fs::Metadata)> = BTreeMap::new();
        let mut skip: Vec<String> = manifest.excludes.clone();
        skip.push(".git".into());
        self.walk(&skip, true, &mut |rel, path, m| {
            if (m.is_file() || m.file_type().is_symlink()) && wanted(rel) && !is_git_path(rel) {
                current.insert(rel.to_string(), (path.to_path_buf(), m.clone()));
            }
            Ok(())
        })?;
        let old: BTreeMap<&String, &Entry> = manifest
            .entries
            .iter()
            .filter(|(rel, e)| !matches!(e, Entry::Dir { .. }) && wanted(rel))
            .collect();
        let mut paths: BTreeSet<&str> = current.keys().map(|s| s.as_str()).collect();
        paths.extend(old.keys().map(|s| s.as_str()));

        let mut out = DiffResult {
            diff: Vec::new(),
            files: Vec::new(),
            binary_files: Vec::new(),
        };
        for rel in paths {
            let before = old.get(&rel.to_string()).copied();
            let after = current.get(rel);
            if let (Some(e @ Entry::File { .. }), Some((path, m))) = (before, after)
                && m.is_file()
                && self.same_file(e, path, m)?
            {
                continue;
            }
            let (old_content, old_mode) = match before {
                Some(e) => (Some(self.read_entry_content(e)?), git_mode_of_entry(e)),
                None => (None, 0),
            };
            let (new_content, new_mode) = match after {
                Some((path, m)) if m.file_type().is_symlink() => (
                    Some(
                        std::fs::read_link(path)
                            .map_err(|e| SidecarError::io(format!("readlink {rel}"), e))?
                            .into_os_string()
                            .into_vec(),
                    ),
                    0o120000,
                ),
                Some((path, m)) => (
                    Some(
                        read_file(path)
                            .map_err(|e| SidecarError::io(format!("reading {rel}"), e))?,
                    ),
                    if m.permissions().mode() & 0o111 != 0 {
                        0o100755
                    } else {
                        0o100644
                    },
                ),
                None => (None, 0),
            };
            if old_content == new_content && old_mode == new_mode {
                continue;
            }
            let kind = match (&old_content, &new_content) {
                (None, Some(_)) => "added",
                (Some(_), None) => "deleted",
                _ => "modified",
            };
            out.files.push(FileChange {
                path: rel.to_string(),
                change: kind.into(),
                old_path: String::new(),
            });
            let binary = file_diff(
                &mut out.diff,
                rel,
                old_content.as_deref(),
                old_mode,
                new_content.as_deref(),
                new_mode,
            );
            if binary {
                out.binary_files.push(rel.to_string());
            }
        }
        Ok(out)
    }

    /// Drops `.git` from every manifest and deletes objects no manifest uses any more, so
    /// that removed history cannot be read back from the store.
    pub fn forget_git(&mut self) -> std::io::Result<()> {
        for m in self.manifests.values_mut() {
            let mut owned = Manifest {
                entries: m.entries.clone(),
                excludes: m.excludes.clone(),
            };
            owned.entries.retain(|rel, _| !is_git_path(rel));
            *m = Arc::new(owned);
        }
        let used: BTreeSet<String> = self
            .manifests
            .values()
            .flat_map(|m| m.entries.values())
            .filter_map(|e| match e {
                Entry::File { hash, .. } => Some(hash.clone()),
                _ => None,
            })
            .collect();
        for obj in std::fs::read_dir(&self.objects)?.flatten() {
            let name = obj.file_name().to_string_lossy().into_owned();
            if !used.contains(&name) {
                std::fs::remove_file(obj.path())?;
            }
        }
        Ok(())
    }
}

fn git_mode_of_entry(e: &Entry) -> u32 {
    match e {
        Entry::File { mode, .. } if mode & 0o111 != 0 => 0o100755,
        Entry::File { .. } => 0o100644,
        Entry::Symlink { .. } => 0o120000,
        Entry::Dir { .. } => 0o040000,
    }
}

fn restore_mtime(path: &Path, mtime: (i64, i64)) {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let ts = TimeSpec::new(mtime.0, mtime.1);
    // Best effort: a wrong mtime only makes build tools redo work.
    let _ = utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    );
}

/// git's rule: a NUL byte in the first 8000 bytes makes a file binary.
fn is_binary(data: &[u8]) -> bool {
    memchr::memchr(0, &data[..data.len().min(8000)]).is_some()
}

fn quote_path(p: &str) -> String {
    // git quotes paths with special characters; plain ones go as they are.
    if p.bytes()
        .all(|b| b > 0x20 && b < 0x7f && b != b'"' && b != b'\\')
    {
        p.to_string()
    } else {
        let mut s = String::from("\"");
        for b in p.bytes() {
            match b {
                b'"' => s.push_str("\\\""),
                b'\\' => s.push_str("\\\\"),
                b'\t' => s.push_str("\\t"),
                b'\n' => s.push_str("\\n"),
                0x20..=0x7e => s.push(b as char),
                _ => s.push_str(&format!("\\{b:03o}")),
            }
        }
        s.push('"');
        s
    }
}

/// Appends one file's diff to `out`; returns true if the file is binary.
fn file_diff(
    out: &mut Vec<u8>,
    rel: &str,
    old: Option<&[u8]>,
    old_mode: u32,
    new: Option<&[u8]>,
    new_mode: u32,
) -> bool {
    let a = quote_path(&format!("a/{rel}"));
    let b = quote_path(&format!("b/{rel}"));
    out.extend_from_slice(format!("diff --git {a} {b}\n").as_bytes());
    match (old, new) {
        (None, Some(_)) => {
            out.extend_from_slice(format!("new file mode {new_mode:o}\n").as_bytes())
        }
        (Some(_), None) => {
            out.extend_from_slice(format!("deleted file mode {old_mode:o}\n").as_bytes())
        }
        _ if old_mode != new_mode => out.extend_from_slice(
            format!("old mode {old_mode:o}\nnew mode {new_mode:o}\n").as_bytes(),
        ),
        _ => {}
    }
    let old_b = old.unwrap_or(b"");
    let new_b = new.unwrap_or(b"");
    if old_b == new_b {
        // Mode change only, or an empty file added or deleted: headers say it all.
        return false;
    }
    let from = if old.is_some() {
        a.clone()
    } else {
        "/dev/null".to_string()
    };
    let to = if new.is_some() {
        b.clone()
    } else {
        "/dev/null".to_string()
    };
    if is_binary(old_b) || is_binary(new_b) {
        out.extend_from_slice(format!("Binary files {from} and {to} differ\n").as_bytes());
        return true;
    }
    let mut opts = diffy::DiffOptions::new();
    opts.set_original_filename(from).set_modified_filename(to);
    let patch = opts.create_patch_bytes(old_b, new_b);
    out.extend_from_slice(&patch.to_bytes());
    false
}
