//! Watching a list of namespaces as one: kube-runtime watches one namespace or all, and a
//! reflector store expects one stream whose `Init … InitDone` describes the whole store.
//! [`merge`] turns one watcher per namespace into such a stream, so that the operator can
//! run with a Role in each watched namespace instead of a ClusterRole.
//!
//! - The first listing of every namespace becomes one `Init`, all their `InitApply`s, and one
//!   `InitDone` once the last namespace has listed.
//! - A later re-list of one namespace (after a watch error) may not reset the store (that
//!   would drop the other namespaces): its objects are applied, and those of that namespace
//!   the re-list no longer has are deleted at its `InitDone`. (A namespace that re-lists
//!   before every other has listed once keeps, until its next re-list, an object deleted in
//!   that gap: the store's initial buffer cannot drop one namespace's objects.)

use std::collections::BTreeSet;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::reflector::Store;
use kube::runtime::watcher::{self, Event};

struct State {
    /// Namespaces whose first listing has not finished.
    initial: BTreeSet<usize>,
    started: bool,
    /// Per namespace, during a re-list: the names seen so far.
    relisting: Vec<Option<BTreeSet<String>>>,
}

/// One stream of events over `streams` (one watcher per namespace, in `namespaces` order);
/// `store` is the reader of the store this stream is reflected into (for re-lists).
pub fn merge<K, S>(
    namespaces: Vec<String>,
    streams: Vec<S>,
    store: Store<K>,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let n = streams.len();
    let tagged = futures::stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |e| (i, e)).boxed()),
    );
    let mut st = State {
        initial: (0..n).collect(),
        started: false,
        relisting: vec![None; n],
    };
    tagged
        .map(move |(i, ev)| {
            let out: Vec<Result<Event<K>, watcher::Error>> = match ev {
                Err(e) => vec![Err(e)],
                Ok(ev) => step(&mut st, &namespaces, &store, i, ev)
                    .into_iter()
                    .map(Ok)
                    .collect(),
            };
            futures::stream::iter(out)
        })
        .flatten()
}

fn step<K>(
    st: &mut State,
    namespaces: &[String],
    store: &Store<K>,
    i: usize,
    ev: Event<K>,
) -> Vec<Event<K>>
where
    K: Resource + Clone,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let first = st.initial.contains(&i);
    match ev {
        Event::Init if first => {
            if st.started {
                Vec::new()
            } else {
                st.started = true;
                vec![Event::Init]
            }
        }
        Event::InitApply(o) if first => vec![Event::InitApply(o)],
        Event::InitDone if first => {
            st.initial.remove(&i);
            if st.initial.is_empty() {
                vec![Event::InitDone]
            } else {
                Vec::new()
            }
        }
        // A re-list of one namespace, the others untouched.
        Event::Init => {
            st.relisting[i] = Some(BTreeSet::new());
            Vec::new()
        }
        Event::InitApply(o) => {
            if let (Some(seen), Some(name)) = (st.relisting[i].as_mut(), o.meta().name.clone()) {
                seen.insert(name);
            }
            vec![Event::Apply(o)]
        }
        Event::InitDone => {
            let Some(seen) = st.relisting[i].take() else {
                return Vec::new();
            };
            let ns = namespaces.get(i).cloned();
            store
                .state()
                .into_iter()
                .filter(|o| o.meta().namespace == ns)
                .filter(|o| o.meta().name.as_ref().is_none_or(|n| !seen.contains(n)))
                .map(|o| Event::Delete((*o).clone()))
                .collect()
        }
        other => vec![other],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;

    fn cm(ns: &str, name: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.namespace = Some(ns.into());
        c.metadata.name = Some(name.into());
        c
    }

    fn names(store: &Store<ConfigMap>) -> Vec<String> {
        let mut v: Vec<String> = store
            .state()
            .iter()
            .map(|c| {
                format!(
                    "{}/{}",
                    c.metadata.namespace.clone().unwrap_or_default(),
                    c.metadata.name.clone().unwrap_or_default()
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Two namespaces listed one after the other, then one re-listed: a store fed by the
    /// merged stream holds both, and the re-list drops only what left that namespace.
    #[tokio::test]
    async fn namespaces_list_into_one_store_and_relist_alone() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let (tx_a, rx_a) = futures::channel::mpsc::unbounded();
        let (tx_b, rx_b) = futures::channel::mpsc::unbounded();
        let mut merged = Box::pin(merge(
            vec!["a".into(), "b".into()],
            vec![rx_a, rx_b],
            store.clone(),
        ));
        let feed = |tx: &futures::channel::mpsc::UnboundedSender<_>, e: Event<ConfigMap>| {
            tx.unbounded_send(Ok(e)).expect("send");
        };
        feed(&tx_a, Event::Init);
        feed(&tx_a, Event::InitApply(cm("a", "x")));
        feed(&tx_a, Event::InitApply(cm("a", "y")));
        feed(&tx_a, Event::InitDone);
        feed(&tx_b, Event::Init);
        feed(&tx_b, Event::InitApply(cm("b", "z")));
        feed(&tx_b, Event::InitDone);
        let mut events = Vec::new();
        for _ in 0..5 {
            let ev = merged.next().await.expect("event").expect("ok");
            writer.apply_watcher_event(&ev);
            events.push(ev);
        }
        assert!(matches!(events[0], Event::Init));
        assert!(matches!(events[4], Event::InitDone), "one InitDone, last");
        assert_eq!(names(&store), vec!["a/x", "a/y", "b/z"]);
        // a re-lists without y: b's object stays.
        feed(&tx_a, Event::Init);
        feed(&tx_a, Event::InitApply(cm("a", "x")));
        feed(&tx_a, Event::InitDone);
        for _ in 0..2 {
            let ev = merged.next().await.expect("event").expect("ok");
            writer.apply_watcher_event(&ev);
        }
        assert_eq!(names(&store), vec!["a/x".to_string(), "b/z".to_string()]);
    }
}
