//! Leader election with a `coordination.k8s.io/v1` Lease: our own small lease loop on
//! kube's `Api<Lease>` (no extra crate). One replica leads; the others wait. Every write is
//! a replace carrying the Lease's resourceVersion, so two candidates racing for an expired
//! lease cannot both win: the loser gets a 409 Conflict and stays a follower.
//!
//! As in client-go, clocks of different machines are never compared: another replica's lease
//! expires when *we* have not seen its record change for `duration` on our own monotonic clock,
//! and a leader stops leading when it has not renewed for `renew_deadline` (shorter than the
//! lease), so it has stepped down before any follower can consider the lease expired.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub identity: String,
    /// A lease whose record we have not seen change for this long may be taken over.
    pub duration: Duration,
    /// A leader that has not renewed for this long stops leading. Shorter than `duration`, so
    /// that the old leader has stopped before a follower may take over.
    pub renew_deadline: Duration,
    /// How often the holder renews (and a follower checks).
    pub renew_every: Duration,
}

impl LeaseSettings {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(name: String, identity: String) -> Self {
        Self {
            name,
            identity,
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
        }
    }
}

/// What to do with the lease as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// No lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Someone else held it and let it expire (or released it): take it over.
    TakeOver,
    /// Someone else holds a live lease.
    Follow { holder: String },
}

/// The other holder's record as we last saw it, and when we saw it change (our clock).
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    record: LeaseSpec,
    at: Instant,
}

/// Decides from the lease and from what this replica observed before. `observed` is updated
/// whenever the record differs from the last one seen, stamped with our `now`: the holder's
/// `renewTime` is only a change marker, never compared with our clock.
pub fn decide_lease(
    lease: Option<&Lease>,
    identity: &str,
    observed: &mut Option<Observation>,
    now: Instant,
    default_duration: Duration,
) -> LeaseDecision {
    let Some(lease) = lease else {
        *observed = None;
        return LeaseDecision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    if observed.as_ref().is_none_or(|o| o.record != spec) {
        *observed = Some(Observation {
            record: spec.clone(),
            at: now,
        });
    }
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return LeaseDecision::Renew;
    }
    if holder.is_empty() {
        return LeaseDecision::TakeOver;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|d| u64::try_from(d).ok())
        .map_or(default_duration, Duration::from_secs);
    let seen_at = observed.as_ref().map_or(now, |o| o.at);
    if now.saturating_duration_since(seen_at) < duration {
        LeaseDecision::Follow { holder }
    } else {
        LeaseDecision::TakeOver
    }
}

/// Whether a leader that last renewed at `last_renewed` may still act at `now`.
pub fn still_leading(
    last_renewed: Option<Instant>,
    now: Instant,
    renew_deadline: Duration,
) -> bool {
    last_renewed.is_some_and(|t| now.saturating_duration_since(t) < renew_deadline)
}

fn held_spec(
    prev: Option<&LeaseSpec>,
    s: &LeaseSettings,
    now: Timestamp,
    take_over: bool,
) -> LeaseSpec {
    let prev = prev.cloned().unwrap_or_default();
    LeaseSpec {
        holder_identity: Some(s.identity.clone()),
        lease_duration_seconds: Some(s.duration.as_secs() as i32),
        acquire_time: if take_over {
            Some(MicroTime(now))
        } else {
            prev.acquire_time.or(Some(MicroTime(now)))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(prev.lease_transitions.unwrap_or(0) + i32::from(take_over)),
        ..prev
    }
}

/// One round: observe the lease and act. Returns whether we hold it afterwards. `wall` is
/// only written into the lease (for people reading it); `now` drives every decision.
pub async fn try_acquire_or_renew(
    api: &Api<Lease>,
    s: &LeaseSettings,
    observed: &mut Option<Observation>,
    wall: Timestamp,
    now: Instant,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&s.name).await?;
    let decision = decide_lease(current.as_ref(), &s.identity, observed, now, s.duration);
    let result = match (&decision, current) {
        (LeaseDecision::Follow { .. }, _) => return Ok(false),
        (LeaseDecision::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    ..Default::default()
                },
                spec: Some(held_spec(None, s, wall, true)),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        (_, Some(mut lease)) => {
            // `lease` carries the resourceVersion we read: the replace is conditional on it.
            lease.spec = Some(held_spec(
                lease.spec.as_ref(),
                s,
                wall,
                decision == LeaseDecision::TakeOver,
            ));
            api.replace(&s.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        (_, None) => return Ok(false),
    };
    match result {
        Ok(()) => {
            if decision != LeaseDecision::Renew {
                tracing::info!(lease = %s.name, identity = %s.identity, "became leader");
            }
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.is_conflict() || e.is_already_exists() => Ok(false),
        Err(e) => Err(e),
    }
}

/// The state of one candidate between rounds.
#[derive(Debug, Default)]
pub struct Elector {
    observed: Option<Observation>,
    last_renewed: Option<Instant>,
}

impl Elector {
    /// One round; returns whether this replica may act as the leader now. A failed or lost
    /// renewal keeps leadership only until `renew_deadline` after the last success.
    pub async fn round(
        &mut self,
        api: &Api<Lease>,
        s: &LeaseSettings,
        wall: Timestamp,
        now: Instant,
    ) -> bool {
        match try_acquire_or_renew(api, s, &mut self.observed, wall, now).await {
            Ok(true) => self.last_renewed = Some(now),
            // Someone else holds it, or won the race: whatever we held is gone.
            Ok(false) => self.last_renewed = None,
            Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
        }
        self.leading(now, s.renew_deadline)
    }

    pub fn leading(&self, now: Instant, renew_deadline: Duration) -> bool {
        still_leading(self.last_renewed, now, renew_deadline)
    }
}

/// Runs the lease loop forever, publishing leadership on `leader`. A leader that cannot renew
/// within the renew deadline reports `false`, and the process must stop leading at once.
pub async fn run(api: Api<Lease>, s: LeaseSettings, leader: watch::Sender<bool>) {
    let mut elector = Elector::default();
    loop {
        // A hung API call must not keep us leading past the deadline either.
        let round = elector.round(&api, &s, Timestamp::now(), Instant::now());
        let leading = match tokio::time::timeout(s.renew_deadline, round).await {
            Ok(leading) => leading,
            Err(_) => {
                tracing::warn!("lease renewal timed out");
                elector.leading(Instant::now(), s.renew_deadline)
            }
        };
        leader.send_replace(leading);
        tokio::time::sleep(s.renew_every).await;
    }
}

/// Gives the lease up on shutdown so that a standby takes over without waiting for expiry.
pub async fn release(api: &Api<Lease>, s: &LeaseSettings) {
    if let Ok(Some(mut lease)) = api.get_opt(&s.name).await {
        let ours = lease
            .spec
            .as_ref()
            .and_then(|l| l.holder_identity.as_deref())
            == Some(s.identity.as_str());
        if ours {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
            }
            if let Err(e) = api.replace(&s.name, &PostParams::default(), &lease).await {
                tracing::warn!(error = %e, "cannot release the lease");
            }
        }
    }
}

/// Label on the operator pod whose broker serves; the chart's Service selects it, so trainers
/// reach the leader only. Readiness cannot do this: a standby that is never Ready would stall
/// every rolling update (`maxUnavailable: 0`) behind the leader it is meant to replace.
pub const LABEL_SERVING: &str = "selfplay.dev/broker-serving";

/// The merge patch that marks (or unmarks) this replica's pod as the one serving the broker.
pub fn serving_patch(serving: bool) -> serde_json::Value {
    let value = if serving {
        serde_json::Value::String("true".into())
    } else {
        serde_json::Value::Null
    };
    serde_json::json!({ "metadata": { "labels": { LABEL_SERVING: value } } })
}

/// Marks or unmarks our own pod. Unmarked at start (a restarted container may find the label
/// its previous run left) and at shutdown; marked once the broker serves.
pub async fn mark_serving(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    pod: &str,
    serving: bool,
) -> Result<(), kube::Error> {
    pods.patch(
        pod,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&serving_patch(serving)),
    )
    .await
    .map(|_| ())
}
