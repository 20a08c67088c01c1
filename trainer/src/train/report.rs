//! Where progress and checkpoints go. The single-machine mode writes `status.json` and keeps
//! checkpoints on disk; the cluster mode reports both to the operator's broker. The loop is
//! generic over these traits, so both modes run the very same loop.

use std::future::Future;
use std::path::{Path, PathBuf};

use selfplay_crds::ProgressSnapshot;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the status: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the broker refused the report: {0}")]
    Remote(String),
}

/// Receives the bounded progress snapshot after every step.
pub trait ProgressReporter: Send + Sync {
    fn report(
        &self,
        snapshot: &ProgressSnapshot,
    ) -> impl Future<Output = Result<(), ReportError>> + Send;
}

/// A complete checkpoint on storage.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointRecord {
    pub step: u64,
    pub policy_version: u64,
    pub dir: PathBuf,
    pub size_bytes: u64,
    pub metrics: ProgressSnapshot,
}

/// Registers checkpoints once they are complete on storage.
pub trait CheckpointSink: Send + Sync {
    fn register(
        &self,
        record: &CheckpointRecord,
    ) -> impl Future<Output = Result<(), ReportError>> + Send;
}

/// Writes `DIR/status.json` atomically (temp file + rename), so readers never see half a file.
pub struct StatusFile {
    path: PathBuf,
}

impl StatusFile {
    pub fn new(out_dir: &Path) -> Self {
        Self {
            path: out_dir.join("status.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ProgressReporter for StatusFile {
    async fn report(&self, snapshot: &ProgressSnapshot) -> Result<(), ReportError> {
        let json = serde_json::to_vec_pretty(snapshot)?;
        write_atomic(&self.path, &json)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let io = |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("status")
    ));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Keeps the last `keep_last` checkpoints under a local directory (`step-N` folders) and
/// deletes older ones once a newer one is complete.
pub struct LocalCheckpoints {
    dir: PathBuf,
    keep_last: usize,
}

impl LocalCheckpoints {
    pub fn new(dir: PathBuf, keep_last: usize) -> Self {
        Self {
            dir,
            keep_last: keep_last.max(1),
        }
    }

    /// `step-N` directories, oldest first.
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        list_step_dirs(&self.dir)
    }
}

/// The `step-N` directories of `dir`, oldest first; temp and partial directories are ignored.
pub fn list_step_dirs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort();
    steps
}

impl CheckpointSink for LocalCheckpoints {
    async fn register(&self, record: &CheckpointRecord) -> Result<(), ReportError> {
        let steps = self.list();
        let excess = steps.len().saturating_sub(self.keep_last);
        for (_, path) in steps.into_iter().take(excess) {
            if path != record.dir {
                std::fs::remove_dir_all(&path).map_err(|source| ReportError::Io {
                    path: path.clone(),
                    source,
                })?;
                tracing::info!(path = %path.display(), "deleted old checkpoint (keepLast)");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_file_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = StatusFile::new(dir.path());
        let snap = ProgressSnapshot {
            step: 1,
            policy_version: 1,
            ..Default::default()
        };
        f.report(&snap).await.expect("write");
        let back: ProgressSnapshot =
            serde_json::from_slice(&std::fs::read(f.path()).expect("read")).expect("json");
        assert_eq!(back.step, 1);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
    }

    #[tokio::test]
    async fn keeps_the_last_k() {
        let dir = tempfile::tempdir().expect("tmp");
        for s in [2, 4, 6, 8] {
            std::fs::create_dir_all(dir.path().join(format!("step-{s}"))).expect("mkdir");
        }
        std::fs::create_dir_all(dir.path().join(".tmp-step-10")).expect("mkdir");
        let sink = LocalCheckpoints::new(dir.path().to_path_buf(), 2);
        let rec = CheckpointRecord {
            step: 8,
            policy_version: 8,
            dir: dir.path().join("step-8"),
            size_bytes: 0,
            metrics: ProgressSnapshot::default(),
        };
        sink.register(&rec).await.expect("retention");
        let left: Vec<u64> = sink.list().into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, vec![6, 8]);
    }
}
