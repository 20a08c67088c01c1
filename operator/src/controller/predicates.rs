//! Which changes of a watched object are worth a reconcile. The broker writes a run's
//! `status.progress` at every training step; without these filters each report re-reconciled
//! the run and every pool it uses, each of them listing pods.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use kube::{Resource, ResourceExt};
use selfplay_crds::{RunPhase, SandboxPool, SelfPlayRun};

fn hash_of(v: impl Hash) -> Option<u64> {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    Some(h.finish())
}

/// The common part: spec (through `generation`), deletion, finalizers and identity. The
/// finalizer helper relies on seeing its own finalizer patch come back.
fn lifecycle<K: Resource>(obj: &K) -> (Option<i64>, bool, Vec<String>, Option<String>) {
    let meta = obj.meta();
    (
        meta.generation,
        meta.deletion_timestamp.is_some(),
        meta.finalizers.clone().unwrap_or_default(),
        meta.uid.clone(),
    )
}

/// A run, for its own controller: its status is its own (or the broker's progress), so only
/// its spec and lifecycle count.
pub fn run_for_run_controller(run: &SelfPlayRun) -> Option<u64> {
    hash_of(lifecycle(run))
}

/// A run, for the pools it uses: which pools (the NetworkPolicy's allow-list), its identity,
/// trainer attempt and whether it finished (claims to reclaim). Never its progress.
pub fn run_for_pools(run: &SelfPlayRun) -> Option<u64> {
    let st = run.status.as_ref();
    let mut pools: Vec<&str> = run.spec.pools.iter().map(|p| p.name.as_str()).collect();
    pools.extend(run.spec.evaluation.as_ref().map(|e| e.pool.as_str()));
    hash_of((
        run.uid(),
        run.meta().deletion_timestamp.is_some(),
        pools,
        st.map(|s| s.restarts),
        st.and_then(|s| s.phase).is_some_and(RunPhase::is_terminal),
    ))
}

/// A pool, for its own controller: its status is its own.
pub fn pool_for_pool_controller(pool: &SandboxPool) -> Option<u64> {
    hash_of(lifecycle(pool))
}

/// The objects of a watch worth a reconcile: applied ones whose `predicate` hash changed since
/// last seen, and every deleted one (kube's `predicate_filter` sees only applied objects, and
/// a run's deletion must still reach its pools, to shrink their allow-list and reclaim its
/// sandboxes).
pub fn changed_objects<K, S, P>(
    events: S,
    predicate: P,
) -> impl futures::Stream<Item = Result<K, kube::runtime::watcher::Error>>
where
    K: Resource + Clone,
    S: futures::Stream<
            Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>,
        >,
    P: Fn(&K) -> Option<u64>,
{
    use futures::StreamExt;
    use kube::runtime::watcher::Event;
    let mut seen: std::collections::HashMap<(Option<String>, String), Option<u64>> =
        std::collections::HashMap::new();
    events
        .map(move |ev| {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => return vec![Err(e)],
            };
            match ev {
                Event::Apply(obj) | Event::InitApply(obj) => {
                    let key = (obj.namespace(), obj.name_any());
                    let h = predicate(&obj);
                    // No hash (no such property): always a change, as in kube's predicates.
                    let changed = h.is_none() || seen.get(&key) != Some(&h);
                    seen.insert(key, h);
                    if changed { vec![Ok(obj)] } else { Vec::new() }
                }
                Event::Delete(obj) => {
                    seen.remove(&(obj.namespace(), obj.name_any()));
                    vec![Ok(obj)]
                }
                Event::Init | Event::InitDone => Vec::new(),
            }
        })
        .flat_map(futures::stream::iter)
}
