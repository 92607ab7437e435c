//! The compiler: from the whole [`State`], the resources ONE proxy needs. A pure function of
//! the state and the proxy's declared needs, so every replica computes the same view, and
//! proxies with the same needs share one compiled view.
//!
//! A view holds the services the proxy reaches (its explicit upstreams, or every service in
//! HTTP proxy mode), everything routes attached to them send traffic to, transitively, and the
//! routes and backend policies attached to any of those. Services carry their endpoints: the
//! static ones and the healthy registered workloads their selector picks.

use crate::state::{State, Workload};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use trellis_api::meta::Metadata;
use trellis_api::service::{Endpoint, ServicePort, ServiceSpec};
use trellis_api::{Kind, Object, Resource, TRELLIS_API_VERSION};

/// What a proxy needs, from its hello.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ViewKey {
    /// Services reached through explicit listeners, as `(namespace, name)`, sorted.
    pub upstreams: Vec<(String, String)>,
    /// HTTP proxy mode: every service.
    pub all: bool,
    /// The service the proxy's own app is an instance of (its inbound side needs it).
    pub own: Option<(String, String)>,
    /// The proxy's namespace: consumer routes reach only clients in their own (GAMMA).
    pub namespace: String,
}

impl ViewKey {
    /// Reads a node's needs; upstream names without a namespace are in `namespace`.
    pub fn new(namespace: &str, upstreams: &[String], all: bool) -> ViewKey {
        let mut ups: Vec<(String, String)> = upstreams
            .iter()
            .map(|u| match u.split_once('/') {
                Some((ns, name)) => (ns.to_string(), name.to_string()),
                None => (namespace.to_string(), u.clone()),
            })
            .collect();
        ups.sort();
        ups.dedup();
        ViewKey {
            upstreams: ups,
            all,
            own: None,
            namespace: namespace.to_string(),
        }
    }
}

/// One resource as sent to proxies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// A hash of `json`: equal content has equal versions on every replica.
    pub version: String,
    /// The resource in the API's JSON form.
    pub json: Arc<str>,
}

/// A compiled view: store-independent key (`Kind/namespace/name`) → item.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// The resources.
    pub items: BTreeMap<String, Item>,
}

/// The view for `key`, compiled once per state and shared.
pub fn view(state: &State, key: &ViewKey) -> Arc<View> {
    let mut cache = state.views.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = cache.get(key) {
        return v.clone();
    }
    let v = Arc::new(compile(state, key));
    cache.insert(key.clone(), v.clone());
    v
}

/// The wire key of a resource.
pub fn item_key(r: &Resource) -> String {
    let m = r.metadata();
    format!("{}/{}/{}", r.kind(), m.namespace, m.name)
}

/// Compiles the view for `key` (see the module docs).
pub fn compile(state: &State, key: &ViewKey) -> View {
    let attached: Vec<(&Resource, trellis_api::ServiceRefs)> =
        // A Service-targeted RateLimitPolicy travels with its Service: to its own sidecars
        // (Inbound) and to its callers (Outbound).
        [
            Kind::HttpRoute,
            Kind::GrpcRoute,
            Kind::BackendPolicy,
            Kind::RateLimitPolicy,
        ]
            .into_iter()
            .flat_map(|k| state.of_kind(k))
            .map(|s| (&*s.resource, s.resource.service_refs()))
            .collect();

    let defined = all_services(state);
    let mut want: BTreeSet<(String, String)> = if key.all {
        defined.clone()
    } else {
        key.upstreams.iter().cloned().collect()
    };
    want.extend(key.own.clone());
    let mut queue: Vec<_> = want.iter().cloned().collect();
    let mut included: BTreeSet<usize> = BTreeSet::new();
    while let Some(svc) = queue.pop() {
        for (i, (r, refs)) in attached.iter().enumerate() {
            if !reaches(r, refs, &svc, &key.namespace) || !included.insert(i) {
                continue;
            }
            // A route's other parents and its backends must be in the view too, or the
            // proxy's own validation of the view would fail on a dangling reference. A
            // route's backend that nothing defines stays out: the proxy answers its share
            // with 500 and the route's status says BackendNotFound (the Gateway API's way).
            let route = matches!(
                attached[i].0,
                Resource::HttpRoute(_) | Resource::GrpcRoute(_)
            );
            for s in &refs.attaches_to {
                if want.insert(s.clone()) {
                    queue.push(s.clone());
                }
            }
            for s in &refs.sends_to {
                if (!route || defined.contains(s)) && want.insert(s.clone()) {
                    queue.push(s.clone());
                }
            }
        }
    }

    let mut view = View::default();
    let mut add = |r: &Resource| {
        let json: Arc<str> = r.to_json().into();
        view.items.insert(
            item_key(r),
            Item {
                version: format!("{:016x}", fnv1a(json.as_bytes())),
                json,
            },
        );
    };
    for (ns, name) in &want {
        add(&effective_service(state, ns, name, &attached));
    }
    for i in included {
        add(attached[i].0);
        // The FaultInjections its rules reference travel with the route.
        for (ns, name) in attached[i].0.fault_refs() {
            let k = trellis_api::ObjectKey {
                kind: Kind::FaultInjection.as_str().into(),
                namespace: ns,
                name,
            };
            if let Some(f) = state.config.get(&k) {
                add(&f.resource);
            }
        }
        // So do the rate limits that target the route (its callers enforce them).
        for s in state.of_kind(Kind::RateLimitPolicy) {
            if let Resource::RateLimitPolicy(p) = &*s.resource
                && targets_route(p, attached[i].0)
            {
                add(&s.resource);
            }
        }
    }
    // Mesh-wide settings reach every proxy.
    for s in state.of_kind(Kind::MeshConfig) {
        add(&s.resource);
    }
    // Telemetry of the mesh and of the proxy's namespace; the proxy picks the most specific.
    for s in state.of_kind(Kind::Telemetry) {
        let ns = &s.resource.metadata().namespace;
        if ns == "default" || ns == &key.namespace {
            add(&s.resource);
        }
    }
    // Authorization is enforced where the calls arrive: only a service's own sidecars get
    // the policies of its namespace that target it (or every service there).
    if let Some((ns, name)) = &key.own {
        for s in state.of_kind(Kind::AuthorizationPolicy) {
            if let Resource::AuthorizationPolicy(p) = &*s.resource
                && &p.metadata.namespace == ns
                && p.spec.target_ref.as_ref().is_none_or(|t| &t.name == name)
            {
                add(&s.resource);
            }
        }
        for s in state.of_kind(Kind::RequestAuthentication) {
            if let Resource::RequestAuthentication(a) = &*s.resource
                && &a.metadata.namespace == ns
                && a.spec.target_ref.as_ref().is_none_or(|t| &t.name == name)
            {
                add(&s.resource);
            }
        }
        // Overload protection is the service's own sidecars' too (its callers never shed).
        for s in state.of_kind(Kind::OverloadPolicy) {
            if let Resource::OverloadPolicy(p) = &*s.resource
                && &p.metadata.namespace == ns
                && &p.spec.target_ref.name == name
            {
                add(&s.resource);
            }
        }
    }
    view
}

/// Whether `r` (a route or policy) attaches to `svc` for clients in `client_ns`: a consumer
/// route (parent in another namespace) reaches only clients in its own namespace. The proxy
/// then makes consumer routes replace the producer's (`trellis_proxy::attach`).
fn reaches(
    r: &Resource,
    refs: &trellis_api::ServiceRefs,
    svc: &(String, String),
    client_ns: &str,
) -> bool {
    refs.attaches_to.contains(svc)
        && match r {
            Resource::HttpRoute(_) | Resource::GrpcRoute(_) => {
                trellis_api::attach::reaches(&r.metadata().namespace, &svc.0, client_ns)
            }
            _ => true,
        }
}

/// Whether a RateLimitPolicy targets `route` (an HTTPRoute or GRPCRoute).
fn targets_route(
    p: &trellis_api::Object<trellis_api::ratelimit::RateLimitPolicySpec>,
    route: &Resource,
) -> bool {
    let t = &p.spec.target_ref;
    let m = route.metadata();
    let ns = t.namespace.as_deref().unwrap_or(&p.metadata.namespace);
    t.kind == route.kind().as_str() && t.name == m.name && ns == m.namespace
}

/// Every service: stored ones and those that exist because instances registered.
pub fn all_services(state: &State) -> BTreeSet<(String, String)> {
    state
        .of_kind(Kind::Service)
        .map(|s| {
            let m = s.resource.metadata();
            (m.namespace.clone(), m.name.clone())
        })
        .chain(
            state
                .workloads
                .values()
                .map(|w| (w.namespace.clone(), w.service.clone())),
        )
        .collect()
}

/// A service as proxies see it: the stored `Service` (or, for a service that exists only
/// through registered instances, one with their ports) with its selected healthy workloads
/// added to its endpoints. A service nothing defines (its last instance left, or it is not
/// registered yet) that the proxy needs as an upstream, a route's parent or a policy's
/// target or fallback is sent with no endpoints, so requests get a clear 503 rather than the
/// whole view being rejected for a dangling reference.
pub fn effective_service(
    state: &State,
    namespace: &str,
    name: &str,
    attached: &[(&Resource, trellis_api::ServiceRefs)],
) -> Resource {
    let stored = state
        .config
        .get(&trellis_api::ObjectKey {
            kind: Kind::Service.as_str().into(),
            namespace: namespace.into(),
            name: name.into(),
        })
        .and_then(|s| match &*s.resource {
            Resource::Service(o) => Some(o),
            _ => None,
        });
    let (metadata, mut spec) = match stored {
        Some(o) => (o.metadata.clone(), o.spec.clone()),
        None => {
            let mut ports: BTreeSet<u16> = state
                .workloads_of(namespace, name)
                .map(|w| w.port)
                .collect();
            if ports.is_empty() {
                ports = referenced_ports(namespace, name, attached);
            }
            let spec = ServiceSpec {
                ports: ports
                    .into_iter()
                    .map(|port| ServicePort {
                        port,
                        ..ServicePort::default()
                    })
                    .collect(),
                ..ServiceSpec::default()
            };
            let metadata = Metadata {
                name: name.into(),
                namespace: namespace.into(),
                ..Metadata::default()
            };
            (metadata, spec)
        }
    };
    let mut seen: BTreeSet<String> = spec.endpoints.iter().map(|e| e.address.clone()).collect();
    for w in state.workloads.values() {
        if w.healthy
            && selects(namespace, name, spec.selector.as_ref(), w)
            && seen.insert(w.address.clone())
        {
            spec.endpoints.push(Endpoint {
                address: w.address.clone(),
                weight: 1,
                zone: w.zone.clone(),
                region: w.region.clone(),
                cluster: w.cluster.clone(),
                labels: w.labels.clone(),
                identity: w.identity.clone(),
            });
        }
    }
    let mut metadata = metadata;
    metadata.resource_version = None;
    Resource::Service(Object {
        api_version: TRELLIS_API_VERSION.into(),
        kind: Kind::Service.as_str().into(),
        metadata,
        spec,
        status: None,
    })
}

/// Whether a service (by its selector, or by name when it has none) picks workload `w`.
pub fn selects(
    namespace: &str,
    name: &str,
    selector: Option<&BTreeMap<String, String>>,
    w: &Workload,
) -> bool {
    if w.namespace != namespace {
        return false;
    }
    match selector {
        None => w.service == name,
        Some(sel) => sel
            .iter()
            .all(|(k, v)| w.labels.get(k) == Some(v) || (k == "app" && w.service == *v)),
    }
}

/// Ports that routes name for a service no one defines; port 80 when they name none.
fn referenced_ports(
    namespace: &str,
    name: &str,
    attached: &[(&Resource, trellis_api::ServiceRefs)],
) -> BTreeSet<u16> {
    let mut ports: BTreeSet<u16> = attached
        .iter()
        .flat_map(|(_, refs)| &refs.ports)
        .filter(|(ns, n, _)| ns == namespace && n == name)
        .map(|(_, _, p)| *p)
        .collect();
    if ports.is_empty() {
        ports.insert(80);
    }
    ports
}

/// FNV-1a, 64 bit: a stable content hash (the same on every replica and every release).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Stored;

    #[test]
    fn a_routes_fault_injections_travel_with_it() {
        let service = |name: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: 80}}]}}\n---\n"
            )
        };
        let fault = |name: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: FaultInjection\nmetadata: {{name: {name}}}\nspec: {{abort: {{httpStatus: 503}}}}\n---\n"
            )
        };
        let yaml = format!(
            "{}{}{}{}apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{name: catalog}}]
  rules:
    - backendRefs: [{{name: catalog, port: 80}}]
      filters: [{{type: ExtensionRef, extensionRef: {{group: trellis.dev, kind: FaultInjection, name: outage}}}}]
",
            service("catalog"),
            service("orders"),
            fault("outage"),
            fault("unused")
        );
        let mut state = State::default();
        for r in trellis_api::parse_documents("t.yaml", &yaml).unwrap() {
            state.config.insert(
                r.value.key(),
                Stored {
                    resource: Arc::new(r.value),
                    version: 1,
                },
            );
        }
        let faults = |upstream: &str| -> Vec<String> {
            compile(&state, &ViewKey::new("default", &[upstream.into()], false))
                .items
                .into_keys()
                .filter(|k| k.starts_with("FaultInjection/"))
                .collect()
        };
        assert_eq!(faults("catalog"), ["FaultInjection/default/outage"]);
        assert!(faults("orders").is_empty());
    }

    #[test]
    fn rate_limits_travel_with_their_service_or_route() {
        let yaml = "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec: {ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec: {ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{kind: Service, name: catalog}]
  rules: [{name: api, backendRefs: [{name: catalog, port: 80}]}]
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: catalog-in}
spec:
  targetRef: {kind: Service, name: catalog}
  limits: [{name: all, rate: 10}]
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: api}
spec:
  targetRef: {kind: HTTPRoute, name: r, sectionName: api}
  limits: [{name: api, rate: 5}]
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: orders-out}
spec:
  targetRef: {kind: Service, name: orders}
  direction: Outbound
  limits: [{name: all, rate: 10}]
";
        let state = state_of(yaml);
        let limits = |key: ViewKey| -> Vec<String> {
            compile(&state, &key)
                .items
                .into_keys()
                .filter(|k| k.starts_with("RateLimitPolicy/"))
                .collect()
        };
        // A caller of catalog: catalog's policy and its route's.
        assert_eq!(
            limits(ViewKey::new("default", &["catalog".into()], false)),
            [
                "RateLimitPolicy/default/api",
                "RateLimitPolicy/default/catalog-in"
            ]
        );
        assert_eq!(
            limits(ViewKey::new("default", &["orders".into()], false)),
            ["RateLimitPolicy/default/orders-out"]
        );
        // Catalog's own sidecar, calling nothing.
        let mut own = ViewKey::new("default", &[], false);
        own.own = Some(("default".into(), "catalog".into()));
        assert_eq!(
            limits(own),
            [
                "RateLimitPolicy/default/api",
                "RateLimitPolicy/default/catalog-in"
            ]
        );
    }

    #[test]
    fn an_overload_policy_reaches_only_its_services_own_sidecars() {
        let yaml = "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: OverloadPolicy
metadata: {name: catalog-overload, namespace: shop}
spec: {targetRef: {kind: Service, name: catalog}}
";
        let state = state_of(yaml);
        let policies = |own: &str, upstreams: &[String]| -> Vec<String> {
            let mut key = ViewKey::new("shop", upstreams, false);
            key.own = Some(("shop".into(), own.into()));
            compile(&state, &key)
                .items
                .into_keys()
                .filter(|k| k.starts_with("OverloadPolicy/"))
                .collect()
        };
        assert_eq!(
            policies("catalog", &[]),
            ["OverloadPolicy/shop/catalog-overload"]
        );
        // A caller of catalog does not get it.
        assert!(policies("web", &["shop/catalog".into()]).is_empty());
    }

    #[test]
    fn telemetry_of_the_mesh_and_the_proxys_namespace_reaches_it() {
        let t = |name: &str, ns: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{accessLog: {{path: stdout}}}}\n---\n"
            )
        };
        let yaml = format!(
            "{}{}{}",
            t("mesh", "default"),
            t("s", "shop"),
            t("b", "bank")
        );
        let state = state_of(&yaml);
        let got: Vec<String> = compile(&state, &ViewKey::new("shop", &[], false))
            .items
            .into_keys()
            .filter(|k| k.starts_with("Telemetry/"))
            .collect();
        assert_eq!(got, ["Telemetry/default/mesh", "Telemetry/shop/s"]);
    }

    /// A route's backend that nothing defines is left out of views (the proxy answers its
    /// share with 500), and comes in once a Service or an instance defines it.
    #[test]
    fn a_routes_missing_backend_is_not_invented() {
        let yaml = "apiVersion: trellis.dev/v1alpha1
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
    - backendRefs: [{name: catalog, port: 80}, {name: later, port: 80}]
";
        let mut state = state_of(yaml);
        let services = |state: &State| -> Vec<String> {
            compile(state, &ViewKey::new("default", &["catalog".into()], false))
                .items
                .into_keys()
                .filter(|k| k.starts_with("Service/"))
                .collect()
        };
        assert_eq!(services(&state), ["Service/default/catalog"]);
        state.workloads.insert(
            "w1".into(),
            Arc::new(Workload::for_test("w1", "later", "127.0.0.1:7001")),
        );
        assert_eq!(
            services(&state),
            ["Service/default/catalog", "Service/default/later"]
        );
    }

    /// A service in `prod` with a producer route, and consumer routes for it in `shop` and
    /// `other`; each route sends to its own backend service.
    const CONSUMERS: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: echo, namespace: prod}
spec: {ports: [{port: 80}], endpoints: [{address: '127.0.0.1:7001'}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: echo-producer, namespace: prod}
spec: {ports: [{port: 80}], endpoints: [{address: '127.0.0.1:7002'}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: echo-shop, namespace: prod}
spec: {ports: [{port: 80}], endpoints: [{address: '127.0.0.1:7003'}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: echo-other, namespace: prod}
spec: {ports: [{port: 80}], endpoints: [{address: '127.0.0.1:7004'}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer, namespace: prod}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules: [{backendRefs: [{name: echo-producer, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, namespace: prod}]
  rules: [{backendRefs: [{name: echo-shop, namespace: prod, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: other}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, namespace: prod}]
  rules: [{backendRefs: [{name: echo-other, namespace: prod, port: 80}]}]
";

    fn state_of(yaml: &str) -> State {
        State::of_yaml(yaml)
    }

    #[test]
    fn consumer_routes_reach_only_proxies_in_their_namespace() {
        let state = state_of(CONSUMERS);
        let routes = |ns: &str, all: bool| -> Vec<String> {
            let ups = if all {
                vec![]
            } else {
                vec!["prod/echo".to_string()]
            };
            compile(&state, &ViewKey::new(ns, &ups, all))
                .items
                .into_keys()
                .filter(|k| k.starts_with("HTTPRoute/"))
                .collect()
        };
        for all in [false, true] {
            assert_eq!(
                routes("shop", all),
                ["HTTPRoute/prod/producer", "HTTPRoute/shop/consumer"]
            );
            assert_eq!(routes("prod", all), ["HTTPRoute/prod/producer"]);
            assert_eq!(routes("default", all), ["HTTPRoute/prod/producer"]);
        }
    }

    /// The compiled view, as a proxy in `ns` with a listener for `prod/echo` builds it: which
    /// rule a request takes there.
    #[test]
    fn a_proxys_view_routes_by_its_namespace_end_to_end() {
        let state = state_of(CONSUMERS);
        let chosen = |ns: &str| -> String {
            let view = compile(&state, &ViewKey::new(ns, &["prod/echo".into()], false));
            let mut resources = trellis_api::parse_documents(
                "local.yaml",
                &format!(
                    "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p, namespace: {ns}}}\nspec:\n  admin: {{address: 127.0.0.1:0}}\n  outbound: [{{name: out, address: 127.0.0.1:0, service: {{name: echo, namespace: prod}}}}]\n"
                ),
            )
            .unwrap();
            for item in view.items.values() {
                resources.push(trellis_api::Located::unsourced(
                    Resource::from_json(&item.json).unwrap(),
                    "view",
                ));
            }
            let snap = trellis_proxy::snapshot::Snapshot::build(
                &resources,
                1,
                "view",
                None,
                &trellis_proxy::Shared::new(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let (parts, _) = http::Request::get("/").body(()).unwrap().into_parts();
            match trellis_proxy::decide::decide(&snap, &snap.listeners[0], &parts, 0) {
                trellis_proxy::decide::Decision::Forward(f) => f.backend.name.to_string(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(chosen("shop"), "prod/echo-shop:80");
        assert_eq!(chosen("other"), "prod/echo-other:80");
        assert_eq!(chosen("prod"), "prod/echo-producer:80");
        assert_eq!(chosen("default"), "prod/echo-producer:80");
    }
}
