//! `sandbox-sidecar install --to DIR`: copies the running executable into DIR.
//!
//! The sidecar image is `FROM scratch` (no shell, no `cp`), so a Kubernetes init container
//! runs this to put the binary on a volume the sandbox container then executes from. The
//! copy is written to a temporary file in DIR, synced and renamed over the target, so a
//! container starting concurrently never sees a half-written binary.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The file name the binary is installed as.
pub const INSTALLED_NAME: &str = "sandbox-sidecar";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the running executable {path}: {source}")]
    ReadSelf {
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
}

/// Copies `/proc/self/exe` to `dir/sandbox-sidecar` and returns that path.
pub fn install_self(dir: &Path) -> Result<PathBuf, InstallError> {
    install_from(Path::new("/proc/self/exe"), dir)
}

/// Copies `source` to `dir/sandbox-sidecar` (mode 0755) atomically and returns that path.
pub fn install_from(source: &Path, dir: &Path) -> Result<PathBuf, InstallError> {
    std::fs::create_dir_all(dir).map_err(|e| InstallError::CreateDir {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let target = dir.join(INSTALLED_NAME);
    let tmp = dir.join(format!(
        ".{INSTALLED_NAME}.tmp-{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 4]>())
    ));
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Write { path, source }
    };
    let mut input = std::fs::File::open(source).map_err(|e| InstallError::ReadSelf {
        path: source.to_path_buf(),
        source: e,
    })?;
    let result = (|| {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .open(&tmp)
            .map_err(write_err(&tmp))?;
        // io::copy does not say which side failed; the target is the likelier one (a full
        // volume), the source having just been opened.
        std::io::copy(&mut input, &mut out).map_err(write_err(&tmp))?;
        out.flush().map_err(write_err(&tmp))?;
        // The umask must not decide the mode: set it explicitly.
        out.set_permissions(std::fs::Permissions::from_mode(0o755))
            .map_err(write_err(&tmp))?;
        out.sync_all().map_err(write_err(&tmp))?;
        drop(out);
        std::fs::rename(&tmp, &target).map_err(write_err(&target))?;
        // The rename is durable only once the directory itself is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(target.clone())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_with_mode_and_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src-bin");
        std::fs::write(&src, b"\x7fELF pretend").unwrap();
        let to = dir.path().join("a/b");
        std::fs::create_dir_all(&to).unwrap();
        std::fs::write(to.join(INSTALLED_NAME), b"old").unwrap();
        let p = install_from(&src, &to).unwrap();
        assert_eq!(p, to.join(INSTALLED_NAME));
        assert_eq!(std::fs::read(&p).unwrap(), b"\x7fELF pretend");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        let names: Vec<_> = std::fs::read_dir(&to)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(INSTALLED_NAME)]);
    }

    #[test]
    fn a_missing_source_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = install_from(&dir.path().join("nope"), dir.path()).unwrap_err();
        assert!(matches!(e, InstallError::ReadSelf { .. }), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
