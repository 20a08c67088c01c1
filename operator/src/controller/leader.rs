//! Leader election with a `coordination.k8s.io/v1` Lease: our own small lease loop on
//! kube's `Api<Lease>` (no extra crate). One replica leads; the others wait. Every write is
//! a replace carrying the Lease's resourceVersion, so two candidates racing for an expired
//! lease cannot both win: the loser gets a 409 Conflict and stays a follower.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub identity: String,
    /// A lease not renewed for this long may be taken over.
    pub duration: Duration,
    /// How often the holder renews (and a follower checks).
    pub renew_every: Duration,
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

pub fn decide_lease(
    lease: Option<&Lease>,
    identity: &str,
    now: Timestamp,
    default_duration: Duration,
) -> LeaseDecision {
    let Some(lease) = lease else {
        return LeaseDecision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder == identity {
        return LeaseDecision::Renew;
    }
    if holder.is_empty() {
        return LeaseDecision::TakeOver;
    }
    let duration = spec
        .lease_duration_seconds
        .map_or(default_duration.as_secs() as i64, i64::from);
    let renewed = spec.renew_time.or(spec.acquire_time).map(|t| t.0);
    match renewed {
        Some(t) if now.as_second() - t.as_second() < duration => LeaseDecision::Follow { holder },
        _ => LeaseDecision::TakeOver,
    }
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

/// One round: observe the lease and act. Returns whether we hold it afterwards.
pub async fn try_acquire_or_renew(
    api: &Api<Lease>,
    s: &LeaseSettings,
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&s.name).await?;
    let decision = decide_lease(current.as_ref(), &s.identity, now, s.duration);
    let result = match (&decision, current) {
        (LeaseDecision::Follow { .. }, _) => return Ok(false),
        (LeaseDecision::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    ..Default::default()
                },
                spec: Some(held_spec(None, s, now, true)),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        (_, Some(mut lease)) => {
            // `lease` carries the resourceVersion we read: the replace is conditional on it.
            lease.spec = Some(held_spec(
                lease.spec.as_ref(),
                s,
                now,
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

/// Runs the lease loop forever, publishing leadership on `leader`. A leader that cannot renew
/// within the lease duration reports `false`, and the process must stop leading at once.
pub async fn run(api: Api<Lease>, s: LeaseSettings, leader: watch::Sender<bool>) {
    let mut last_renewed: Option<std::time::Instant> = None;
    loop {
        match try_acquire_or_renew(&api, &s, Timestamp::now()).await {
            Ok(true) => {
                last_renewed = Some(std::time::Instant::now());
                leader.send_replace(true);
            }
            Ok(false) => {
                last_renewed = None;
                leader.send_replace(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                if last_renewed.is_none_or(|t| t.elapsed() >= s.duration) {
                    leader.send_replace(false);
                }
            }
        }
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
