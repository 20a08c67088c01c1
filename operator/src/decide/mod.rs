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

/// Marks an object Degraded because the API server refused to create one of its pods (quota,
/// a missing RuntimeClass, Pod Security admission): the reason is the refusal's, for `kubectl
/// describe` to show instead of a reconcile that fails before any status is written.
pub fn mark_create_failed(
    conditions: &mut Vec<selfplay_crds::conditions::Condition>,
    what: &str,
    error: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    selfplay_crds::conditions::set_condition(
        conditions,
        selfplay_crds::conditions::ConditionType::Degraded,
        selfplay_crds::conditions::ConditionStatus::True,
        "CreateFailed",
        &format!("cannot create {what}: {error}"),
        generation,
        time(now),
    );
}
