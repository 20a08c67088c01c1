//! Pure decisions: given what was observed, what to create, delete and report. No clock and
//! no API here: `now` and the observations are arguments, so every case is a unit test.

pub mod checkpoint;
pub mod pool;
pub mod run;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Seconds from `earlier` to `later` (negative when `later` is before `earlier`).
pub fn seconds_between(earlier: Timestamp, later: Timestamp) -> i64 {
    later.as_second() - earlier.as_second()
}

pub fn time(ts: Timestamp) -> Time {
    Time(ts)
}
