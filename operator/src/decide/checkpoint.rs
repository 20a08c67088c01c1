//! Checkpoint decisions: which checkpoint a run resumes from, and keep-last-K retention.

use kube::ResourceExt;
use selfplay_crds::Checkpoint;
use selfplay_crds::conditions::{ConditionType, is_true};

use crate::build::ResumePoint;

/// What retention and resume need to know about one Checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointInfo {
    pub name: String,
    pub step: i64,
    pub location: String,
    pub pvc: Option<String>,
    pub ready: bool,
    pub terminating: bool,
}

impl CheckpointInfo {
    pub fn from_object(c: &Checkpoint) -> Self {
        Self {
            name: c.name_any(),
            step: c.spec.step,
            location: c.spec.location.clone(),
            pvc: c.spec.pvc.clone(),
            ready: c
                .status
                .as_ref()
                .is_some_and(|s| is_true(&s.conditions, ConditionType::Ready)),
            terminating: c.metadata.deletion_timestamp.is_some(),
        }
    }

    pub fn resume_point(&self) -> ResumePoint {
        ResumePoint {
            checkpoint: self.name.clone(),
            location: self.location.clone(),
            step: self.step,
        }
    }
}

/// The Ready checkpoint with the highest step (ties: the later name), if any.
pub fn latest_ready(checkpoints: &[CheckpointInfo]) -> Option<&CheckpointInfo> {
    checkpoints
        .iter()
        .filter(|c| c.ready && !c.terminating)
        .max_by(|a, b| a.step.cmp(&b.step).then_with(|| a.name.cmp(&b.name)))
}

/// Names of the checkpoints to delete so that the `keep_last` newest Ready ones remain.
/// Checkpoints that are not Ready yet are never deleted, and neither is any in `protected`
/// (a run's `resumeFrom`).
pub fn retention(
    checkpoints: &[CheckpointInfo],
    keep_last: i32,
    protected: &[&str],
) -> Vec<String> {
    let mut ready: Vec<&CheckpointInfo> = checkpoints
        .iter()
        .filter(|c| c.ready && !c.terminating)
        .collect();
    ready.sort_by(|a, b| b.step.cmp(&a.step).then_with(|| b.name.cmp(&a.name)));
    ready
        .into_iter()
        .skip(keep_last.max(1) as usize)
        .filter(|c| !protected.contains(&c.name.as_str()))
        .map(|c| c.name.clone())
        .collect()
}
