//! What of the host a local sandbox sees besides its workspace: the system directories and
//! the toolchain, read-only.
//!
//! The toolchain is the set of directories whose programs a sandbox's commands run: by
//! default the trainer's own `PATH` (the interpreter environment a user runs the CLIs with,
//! wherever it lives, e.g. a venv under `/tmp`), or the directories a pool names
//! (`spec.source.toolchain`). Each `PATH` entry is made visible through its *root*: a
//! venv or prefix for its `bin` directory (its `lib` holds the packages), a tool manager's
//! directory in the home (`~/.pyenv`, `~/.cargo`: shims need the whole of it), else the
//! directory itself. Symlinks in those directories (a venv's `python3` → the base
//! interpreter) bring their targets' roots too. The home directory itself, the run's
//! output and the pool's repository are never visible.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// Directories of the operating system, read-only in every sandbox (links such as `/bin` →
/// `usr/bin` are recreated as links).
pub const SYSTEM_DIRS: [&str; 10] = [
    "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/nix", "/gnu",
];

/// Whether `p` lies in a system directory (always visible).
pub fn is_system_path(p: &Path) -> bool {
    SYSTEM_DIRS.iter().any(|d| p.starts_with(d))
}

/// The toolchain of one pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Toolchain {
    /// PATH inside the sandbox, in order.
    pub path: Vec<PathBuf>,
    /// Directories bound read-only (outside the system directories).
    pub roots: Vec<PathBuf>,
}

impl Toolchain {
    /// `extra` first, then every entry of `path` that exists.
    pub fn from_path(extra: &[PathBuf], path: &OsStr) -> Self {
        let entries: Vec<PathBuf> = extra
            .iter()
            .cloned()
            .chain(std::env::split_paths(path))
            .collect();
        Self::build(entries)
    }

    /// `extra`, then each named directory's `bin` (or the directory itself when it has
    /// none), then the system's own `bin` directories.
    pub fn from_dirs(extra: &[PathBuf], dirs: &[PathBuf]) -> Self {
        let mut entries: Vec<PathBuf> = extra.to_vec();
        for d in dirs {
            let bin = d.join("bin");
            entries.push(if bin.is_dir() { bin } else { d.clone() });
        }
        let mut t = Self::build(entries.into_iter().chain(system_bins()).collect());
        // A named directory is visible as a whole, whatever its layout.
        for d in dirs {
            if !is_system_path(d) && !t.roots.contains(d) {
                t.roots.push(d.clone());
            }
        }
        t
    }

    fn build(entries: Vec<PathBuf>) -> Self {
        let mut t = Toolchain::default();
        for e in entries {
            if !e.is_absolute() || !e.is_dir() || t.path.contains(&e) {
                continue;
            }
            t.add_root(&e);
            if !is_system_path(&e) {
                for target in link_targets(&e) {
                    t.add_root(&target);
                }
            }
            t.path.push(e);
        }
        t
    }

    fn add_root(&mut self, dir: &Path) {
        let Some(root) = root_of(dir) else { return };
        if self.roots.iter().any(|r| root.starts_with(r)) {
            return;
        }
        self.roots.retain(|r| !r.starts_with(&root));
        self.roots.push(root);
    }

    /// Leaves out every root that holds one of `hidden` or lies inside one, and every root
    /// that holds one of `parents` (directories such as the one sandboxes are made in, which
    /// may hold unrelated toolchains, a venv under `/tmp`), with a warning: a PATH entry must
    /// not open the run's output, a repository or another sandbox to the agent.
    pub fn without(mut self, hidden: &[PathBuf], parents: &[PathBuf]) -> Self {
        let hides = |r: &Path| {
            hidden.iter().any(|h| h.starts_with(r) || r.starts_with(h))
                || parents.iter().any(|p| p.starts_with(r))
        };
        self.roots.retain(|r| {
            let keep = !hides(r);
            if !keep {
                tracing::warn!(dir = %r.display(), "a toolchain directory holds the run's files; sandboxes do not see it");
            }
            keep
        });
        self.path.retain(|p| is_system_path(p) || !hides(p));
        self
    }
}

fn system_bins() -> Vec<PathBuf> {
    [
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
    ]
    .iter()
    .map(PathBuf::from)
    .collect()
}

/// The directory to make visible for `dir`; `None` when the system directories hold it.
fn root_of(dir: &Path) -> Option<PathBuf> {
    if is_system_path(dir) {
        return None;
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from)
        && home != Path::new("/")
        && let Ok(rest) = dir.strip_prefix(&home)
        && let Some(first) = rest.components().next()
        && first.as_os_str().to_string_lossy().starts_with('.')
    {
        // `~/.pyenv/shims`: the manager's whole directory.
        return Some(home.join(first));
    }
    if dir.file_name() == Some(OsStr::new("bin"))
        && let Some(parent) = dir.parent()
        && parent != Path::new("/")
        && (parent.join("pyvenv.cfg").is_file() || parent.join("lib").is_dir())
    {
        return Some(parent.to_path_buf());
    }
    Some(dir.to_path_buf())
}

/// Where the symlinks in `dir` lead (resolved), for links that leave `dir`.
fn link_targets(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten().take(4096) {
        let p = e.path();
        let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
        if !is_link {
            continue;
        }
        if let Ok(target) = std::fs::canonicalize(&p)
            && let Some(parent) = target.parent()
            && !parent.starts_with(dir)
            && !out.iter().any(|o| o == parent)
        {
            out.push(parent.to_path_buf());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_venv_brings_itself_and_its_base_interpreter() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        std::fs::create_dir_all(base.join("bin")).unwrap();
        std::fs::create_dir_all(base.join("lib")).unwrap();
        std::fs::write(base.join("bin/python3"), "").unwrap();
        let venv = tmp.path().join("venv");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::write(venv.join("pyvenv.cfg"), "home = x\n").unwrap();
        std::os::unix::fs::symlink(base.join("bin/python3"), venv.join("bin/python3")).unwrap();
        let plain = tmp.path().join("tools");
        std::fs::create_dir_all(&plain).unwrap();
        let path =
            std::env::join_paths([venv.join("bin"), plain.clone(), "/usr/bin".into()]).unwrap();
        let t = Toolchain::from_path(&[], &path);
        assert_eq!(
            t.path,
            vec![venv.join("bin"), plain.clone(), PathBuf::from("/usr/bin")]
        );
        for root in [&venv, &base, &plain] {
            assert!(t.roots.contains(root), "{root:?} in {:?}", t.roots);
        }
        assert!(!t.roots.iter().any(|r| is_system_path(r)));
        // A root that holds the run's files is left out.
        let t = t.without(&[plain.join("out")], &[]);
        assert!(!t.roots.contains(&plain) && !t.path.contains(&plain));
        // A directory sandboxes are made in hides only what holds it.
        let t = Toolchain::from_path(&[], &path).without(&[], &[tmp.path().to_path_buf()]);
        assert!(t.roots.contains(&venv));
        let t = Toolchain::from_path(&[], &path).without(&[], &[venv.join("bin/sandboxes")]);
        assert!(!t.roots.contains(&venv));
    }
}
