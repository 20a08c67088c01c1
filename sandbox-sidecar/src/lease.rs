//! `serve --lease-file PATH`: the sidecar lives only as long as the trainer that holds an
//! exclusive `flock` on PATH.
//!
//! In a container the sidecar is PID 1, so the container lasts exactly as long as the
//! sidecar; a trainer that dies (even by SIGKILL, which runs no cleanup) must not leave its
//! containers running. The kernel releases a dead process's flocks, so a lock the sidecar
//! can take means the holder is gone. The file is opened read-only (flock needs no write
//! access) and closed again after every look, which releases a lock taken by the look.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// How often the lease is looked at.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What one look at the lease file found.
#[derive(Debug)]
pub enum Lease {
    /// Someone holds the lock: the trainer is alive.
    Held,
    /// The lock was free: its holder is gone.
    Free,
    /// The file could not be opened (removed, its directory unmounted).
    Unopenable(std::io::Error),
    /// flock failed for another reason than the lock being held.
    Unlockable(std::io::Error),
}

/// Opens `path` read-only and tries a non-blocking exclusive lock on it.
pub fn probe(path: &Path) -> Lease {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return Lease::Unopenable(e),
    };
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        // Dropping the guard unlocks and closes the file.
        Ok(_guard) => Lease::Free,
        Err((_, Errno::EWOULDBLOCK)) => Lease::Held,
        Err((_, e)) => Lease::Unlockable(std::io::Error::from(e)),
    }
}

/// Why the lease ended, for the log.
fn ended(path: &Path, l: Lease) -> Option<String> {
    match l {
        Lease::Held => None,
        Lease::Free => Some(format!(
            "the lease {} is no longer locked: its holder exited",
            path.display()
        )),
        Lease::Unopenable(e) => Some(format!(
            "the lease {} cannot be opened: {e}",
            path.display()
        )),
        // Nothing would ever stop a sidecar whose lease cannot be checked.
        Lease::Unlockable(e) => Some(format!(
            "the lease {} cannot be locked to check it: {e}",
            path.display()
        )),
    }
}

/// Resolves, with the reason, once the lease is no longer held; looks every `interval`,
/// the first time at once.
pub async fn watch(path: PathBuf, interval: Duration) -> String {
    loop {
        let p = path.clone();
        // A file on a stuck mount must not stall a runtime worker.
        let look = tokio::task::spawn_blocking(move || probe(&p)).await;
        let look = match look {
            Ok(l) => l,
            Err(e) => Lease::Unlockable(std::io::Error::other(e.to_string())),
        };
        if let Some(why) = ended(&path, look) {
            return why;
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_free_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lease");
        assert!(matches!(probe(&p), Lease::Unopenable(_)));
        std::fs::write(&p, b"").unwrap();
        // Another open file description holding the lock, as the trainer's would.
        let holder =
            Flock::lock(std::fs::File::open(&p).unwrap(), FlockArg::LockExclusive).unwrap();
        assert!(matches!(probe(&p), Lease::Held));
        assert!(matches!(probe(&p), Lease::Held), "a look takes no lock");
        drop(holder);
        assert!(matches!(probe(&p), Lease::Free));
        assert!(matches!(probe(&p), Lease::Free), "a look leaves no lock");
    }
}
