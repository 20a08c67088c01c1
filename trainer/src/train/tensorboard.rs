//! Curves: a run's per-step scalars as TensorBoard event files, so `tensorboard --logdir
//! out/<run>` plots them (issue 19, point 5).
//!
//! The format is TensorFlow's, written without TensorFlow: a file whose name holds
//! `tfevents`, made of TFRecords (u64 length, masked CRC-32C of the length, the bytes, masked
//! CRC-32C of the bytes; all little-endian) each holding one `tensorboard.Event` protobuf
//! (`tensorboard/compat/proto/event.proto`). The first event carries only `file_version:
//! "brain.Event:2"`; each step then writes one event with a `Summary` of `simple_value`s.
//! Every file's first event after that is `SessionLog{START}` at the first step the writer
//! will write, which makes TensorBoard drop the points of earlier files from that step on:
//! a resumed run went back to a checkpoint and redoes the steps after it, and a run started
//! afresh in the same directory replaces the old one (those points belong to a branch that
//! no longer exists).
//!
//! The messages are declared here by hand with their field numbers (prost derives the
//! encoding); CRC-32C is the table-driven Castagnoli CRC below, 20 lines not worth a crate.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use super::driver::StepSummary;
use super::report::ReportError;

/// `tensorboard.Event` (event.proto): only the members this writer uses.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorboard.Summary` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorboard.Summary.Value`, scalars only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorboard.SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// `SessionLog.SessionStatus`: 1 = START.
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(string, tag = "2")]
    pub checkpoint_path: String,
    #[prost(string, tag = "3")]
    pub msg: String,
}

const SESSION_START: i32 = 1;
const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord framing uses.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC (a CRC of data that holds CRCs is weak, so it is rotated and offset).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn tf_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends events to one new event file in a directory.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Starts a new event file in `dir` for a run whose next step is `next_step`;
    /// TensorBoard then forgets the points earlier files hold from that step on.
    pub fn create(dir: &Path, next_step: u64) -> Result<Self, ReportError> {
        // Files of one directory are read in name order: seconds first (fixed width for
        // years to come), then a counter, so a later writer of this process sorts later.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReportError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let secs = now() as u64;
        let pid = std::process::id();
        let (file, path) = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("events.out.tfevents.{secs:010}.selfplay.{pid}.{n}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&path)(e)),
            }
        };
        let mut w = Self { file, path };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        })?;
        w.write(&Event {
            wall_time: now(),
            step: i64::try_from(next_step).unwrap_or(i64::MAX),
            what: Some(What::SessionLog(SessionLog {
                status: SESSION_START,
                checkpoint_path: String::new(),
                msg: format!("the run continues at step {next_step}"),
            })),
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the scalars of one step; non-finite values are left out (a gap in the curve
    /// says more than a spike to infinity).
    pub fn write_scalars(
        &mut self,
        step: u64,
        wall_time: f64,
        scalars: &[(&str, f64)],
    ) -> Result<(), ReportError> {
        let value = scalars
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue {
                tag: (*tag).to_string(),
                simple_value: Some(*v as f32),
            })
            .collect();
        self.write(&Event {
            wall_time,
            step: i64::try_from(step).unwrap_or(i64::MAX),
            what: Some(What::Summary(Summary { value })),
        })
    }

    /// Writes one step's summary (see [`step_scalars`]).
    pub fn write_step(&mut self, summary: &StepSummary) -> Result<(), ReportError> {
        let step = u64::try_from(summary.snapshot.step).unwrap_or(0);
        self.write_scalars(step, now(), &step_scalars(summary))
    }

    fn write(&mut self, event: &Event) -> Result<(), ReportError> {
        // One write per record and no buffering: TensorBoard polls the file while the run
        // goes on, and a reader that meets half a record waits for the rest.
        let record = tf_record(&event.encode_to_vec());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(|source| ReportError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// The curves of one step: what the progress line shows, and the update's statistics.
/// Absent values (no valid bug, so no solve rate; no update) are left out.
pub fn step_scalars(s: &StepSummary) -> Vec<(&'static str, f64)> {
    let snap = &s.snapshot;
    let mut out: Vec<(&'static str, f64)> = [
        ("reward/injector", snap.mean_reward_injector),
        ("reward/solver", snap.mean_reward_solver),
        ("selfplay/valid_rate", snap.injector_validity_rate),
        ("selfplay/solve_rate", snap.solve_rate),
        ("train/loss", snap.loss),
        ("perf/tokens_per_second", snap.tokens_per_second),
    ]
    .into_iter()
    .filter_map(|(tag, v)| v.map(|v| (tag, v)))
    .collect();
    // The held-out solve rate is a point at each evaluation, not repeated at every step.
    if let (Some(r), Some(at)) = (snap.heldout_solve_rate, snap.heldout_step)
        && at == snap.step
    {
        out.push(("eval/heldout_solve_rate", r));
    }
    out.extend([
        ("selfplay/sandbox_errors", snap.sandbox_errors as f64),
        ("selfplay/injector_episodes", s.rollouts_injectors as f64),
        ("selfplay/valid_bugs", s.valid_bugs as f64),
        ("selfplay/solver_attempts", s.solver_attempts as f64),
        ("train/policy_version", snap.policy_version as f64),
        ("perf/step_seconds", s.seconds),
    ]);
    if let Some(st) = &s.stats {
        out.extend([
            (
                "train/dropped_groups",
                st.dropped_zero_advantage_groups as f64,
            ),
            ("train/stale_samples", st.stale_samples as f64),
            ("train/tokens", st.tokens as f64),
        ]);
        // Without trained tokens these are zeros by construction, not measurements.
        if st.tokens > 0 {
            out.extend([
                ("train/grad_norm", st.grad_norm),
                ("train/learning_rate", st.learning_rate),
                ("train/entropy", st.entropy),
                ("train/clip_fraction", st.clip_fraction),
                ("train/ratio_mean", st.ratio_mean),
                ("train/kl", st.kl),
                ("train/logprob_mismatch_mean", st.logprob_mismatch_mean),
                ("train/logprob_mismatch_max", st.logprob_mismatch_max),
                ("train/is_truncated_fraction", st.is_truncated_fraction),
                ("train/staleness_mean", st.staleness_mean),
            ]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's published check value (RFC 3720 B.4 lists the same polynomial) and the
    /// iSCSI test vectors of 32 zero and 32 0xff bytes.
    #[test]
    fn crc32c_matches_the_published_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn a_record_frames_its_bytes_with_checked_lengths() {
        let r = tf_record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc32c(&r[..8]).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc32c(b"abc").to_le_bytes());
        assert_ne!(masked_crc32c(b"abc"), crc32c(b"abc"), "the CRC is masked");
    }
}
