//! `status.conditions`, shared by every kind: the standard `metav1.Condition`, kept as a
//! list-map keyed on `type` so server-side apply merges conditions one by one.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Condition types used across the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// The object is usable: a pool has Ready sandboxes, a checkpoint is complete.
    Ready,
    /// Work is under way: a run is training, a pool is scaling or rolling.
    Progressing,
    /// Something is wrong but the object may recover (restarts, sandbox errors).
    Degraded,
    /// The run is suspended (`spec.suspend`).
    Suspended,
    /// The run finished successfully (terminal).
    Succeeded,
    /// The run failed (terminal).
    Failed,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Progressing => "Progressing",
            Self::Degraded => "Degraded",
            Self::Suspended => "Suspended",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }
}

/// The three values of `condition.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// Sets a condition in `conditions`, keeping `lastTransitionTime` unless the status changes.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: ConditionType,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) {
    let existing = conditions.iter_mut().find(|c| c.type_ == type_.as_str());
    match existing {
        Some(c) => {
            if c.status != status.as_str() {
                c.last_transition_time = now;
            }
            c.status = status.as_str().to_string();
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.as_str().to_string(),
            status: status.as_str().to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation,
            last_transition_time: now,
        }),
    }
}

/// Looks up a condition by type.
pub fn find_condition(conditions: &[Condition], type_: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// True when the condition exists with status `True`.
pub fn is_true(conditions: &[Condition], type_: ConditionType) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).expect("valid"))
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut cs = Vec::new();
        set_condition(
            &mut cs,
            ConditionType::Ready,
            ConditionStatus::False,
            "A",
            "",
            Some(1),
            t(10),
        );
        set_condition(
            &mut cs,
            ConditionType::Ready,
            ConditionStatus::False,
            "B",
            "m",
            Some(2),
            t(20),
        );
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_time, t(10));
        assert_eq!(cs[0].reason, "B");
        assert_eq!(cs[0].observed_generation, Some(2));
        set_condition(
            &mut cs,
            ConditionType::Ready,
            ConditionStatus::True,
            "C",
            "",
            Some(2),
            t(30),
        );
        assert_eq!(cs[0].last_transition_time, t(30));
        assert!(is_true(&cs, ConditionType::Ready));
        assert!(!is_true(&cs, ConditionType::Degraded));
    }
}
