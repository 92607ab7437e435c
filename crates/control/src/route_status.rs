//! Route status on read: the conditions `trellis_api::status` computes from the current
//! state (stored resources and the services registered instances define), stamped with
//! when each last changed. Nothing is written to the store: status is derived, so it can
//! never disagree with the config it describes.

use crate::compile;
use crate::state::State;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use trellis_api::status::RouteStatus;
use trellis_api::{Kind, ObjectKey, Resource};

/// A condition: route, parent index, condition type.
type ConditionKey = (ObjectKey, usize, String);

/// When each condition took its current status (status, time), as this replica saw it: the
/// first read after it changed, or after the replica started.
#[derive(Default)]
pub struct Transitions(Mutex<BTreeMap<ConditionKey, (String, String)>>);

impl Transitions {
    /// The status of every route in `state`, `lastTransitionTime` set from `now` (RFC 3339)
    /// for conditions whose status differs from the last read.
    pub fn routes(&self, state: &State, now: &str) -> BTreeMap<ObjectKey, RouteStatus> {
        let mut all = routes(state);
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut live = BTreeSet::new();
        for (key, status) in &mut all {
            for (i, parent) in status.parents.iter_mut().enumerate() {
                for c in &mut parent.conditions {
                    let k = (key.clone(), i, c.kind.clone());
                    let entry = seen
                        .entry(k.clone())
                        .or_insert_with(|| (c.status.clone(), now.to_string()));
                    if entry.0 != c.status {
                        *entry = (c.status.clone(), now.to_string());
                    }
                    c.last_transition_time = Some(entry.1.clone());
                    live.insert(k);
                }
            }
        }
        // Forget deleted routes and parents.
        seen.retain(|k, _| live.contains(k));
        all
    }
}

/// The status of every route in `state`, without transition times. Pure.
pub fn routes(state: &State) -> BTreeMap<ObjectKey, RouteStatus> {
    let registered: Vec<Resource> = compile::all_services(state)
        .into_iter()
        .filter(|(ns, name)| {
            !state.config.contains_key(&ObjectKey {
                kind: Kind::Service.as_str().into(),
                namespace: ns.clone(),
                name: name.clone(),
            })
        })
        .map(|(ns, name)| compile::effective_service(state, &ns, &name, &[]))
        .collect();
    trellis_api::status::routes(
        state
            .config
            .values()
            .map(|s| &*s.resource)
            .chain(registered.iter()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn state(yaml: &str) -> State {
        State::of_yaml(yaml)
    }

    const ROUTE: &str = "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec: {ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: catalog}]
  rules:
    - backendRefs: [{name: later, port: 80}]
";

    const LATER: &str = "---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: later}
spec: {ports: [{port: 80}]}
";

    fn resolved(s: &BTreeMap<ObjectKey, RouteStatus>) -> (String, String, Option<String>) {
        let c = &s.values().next().unwrap().parents[0].conditions[1];
        (
            c.status.clone(),
            c.reason.clone(),
            c.last_transition_time.clone(),
        )
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let t = Transitions::default();
        let missing = state(ROUTE);
        let present = state(&format!("{ROUTE}{LATER}"));
        let f = |s: &str| s.to_string();
        assert_eq!(
            resolved(&t.routes(&missing, "T1")),
            (f("False"), f("BackendNotFound"), Some(f("T1")))
        );
        assert_eq!(
            resolved(&t.routes(&missing, "T2")),
            (f("False"), f("BackendNotFound"), Some(f("T1")))
        );
        assert_eq!(
            resolved(&t.routes(&present, "T3")),
            (f("True"), f("ResolvedRefs"), Some(f("T3")))
        );
        // Accepted never changed.
        let s = t.routes(&present, "T4");
        let accepted = &s.values().next().unwrap().parents[0].conditions[0];
        assert_eq!(accepted.last_transition_time.as_deref(), Some("T1"));
    }

    #[test]
    fn services_of_registered_instances_resolve() {
        let mut s = state(ROUTE);
        assert_eq!(resolved(&routes(&s)).0, "False");
        s.workloads.insert(
            "w".into(),
            Arc::new(crate::state::Workload::for_test(
                "w",
                "later",
                "127.0.0.1:7001",
            )),
        );
        assert_eq!(resolved(&routes(&s)).0, "True");
    }
}
