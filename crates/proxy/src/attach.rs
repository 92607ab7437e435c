//! Which routes apply on each service port, as this proxy's clients see them: the ports a
//! route's `parentRefs` name (`port`, `sectionName`), and GAMMA's producer and consumer
//! routes. A consumer route (a route whose parent Service is in another namespace) applies
//! only to clients in the route's own namespace, and there it replaces the producer's routes
//! (those in the Service's namespace) on the ports it attaches to. Pure: table-tested below.

use crate::route::{Order, Rule};
use crate::snapshot::ServiceKey;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use trellis_api::attach::{Role, parent_ports, reaches, role};
use trellis_api::route::ParentRef;
use trellis_api::service::ServiceSpec;

/// One match of one rule, attached to a service port.
#[derive(Debug)]
pub struct Candidate<M> {
    /// The compiled match.
    pub m: M,
    /// Its rule.
    pub rule: Arc<Rule>,
    /// Its place among equally specific matches.
    pub order: Order,
    /// Whether its route is the Service's producer's or a consumer's.
    pub role: Role,
}

/// The matches attached to each service port, before the producer/consumer choice.
pub type Attached<M> = HashMap<(ServiceKey, u16), Vec<Candidate<M>>>;

/// The service ports a route in `route_ns` attaches to for clients in `client_ns`, with the
/// route's role on each. Parents that cannot reach these clients are left out. Validation
/// has checked every reference, so one that does not resolve is skipped rather than reported.
pub fn parents(
    services: &HashMap<ServiceKey, &ServiceSpec>,
    route_ns: &str,
    client_ns: &str,
    refs: &[ParentRef],
) -> Vec<(ServiceKey, u16, Role)> {
    let mut out: Vec<(ServiceKey, u16, Role)> = Vec::new();
    for p in refs {
        let key = ServiceKey {
            namespace: p.namespace.as_deref().unwrap_or(route_ns).to_string(),
            name: p.name.clone(),
        };
        if !reaches(route_ns, &key.namespace, client_ns) {
            continue;
        }
        let Some(spec) = services.get(&key) else {
            continue;
        };
        let role = role(route_ns, &key.namespace);
        for port in parent_ports(p, &key.name, spec).unwrap_or_default() {
            // Two references to one port attach the route there once.
            if !out.iter().any(|(k, p, _)| *k == key && *p == port) {
                out.push((key.clone(), port, role));
            }
        }
    }
    out
}

/// Attaches a compiled rule to every parent port, once per match; a rule without matches
/// matches every request (its default match).
pub fn attach<T: Default, M, E>(
    into: &mut Attached<M>,
    parents: &[(ServiceKey, u16, Role)],
    matches: &[T],
    rule: &Arc<Rule>,
    order: &Order,
    compile: impl Fn(&T) -> Result<M, E>,
) -> Result<(), E> {
    let everything = [T::default()];
    let matches = if matches.is_empty() {
        &everything[..]
    } else {
        matches
    };
    for (key, port, role) in parents {
        for (index, m) in matches.iter().enumerate() {
            into.entry((key.clone(), *port))
                .or_default()
                .push(Candidate {
                    m: compile(m)?,
                    rule: rule.clone(),
                    order: Order {
                        index,
                        ..order.clone()
                    },
                    role: *role,
                });
        }
    }
    Ok(())
}

/// On every port where consumer routes apply (HTTP or gRPC), drops the producer's routes of
/// both kinds: the consumer namespace's routes replace them as a set.
pub fn prefer_consumers<A, B>(http: &mut Attached<A>, grpc: &mut Attached<B>) {
    let consumed: HashSet<(ServiceKey, u16)> = http
        .iter()
        .filter(|(_, c)| c.iter().any(|c| c.role == Role::Consumer))
        .map(|(k, _)| k.clone())
        .chain(
            grpc.iter()
                .filter(|(_, c)| c.iter().any(|c| c.role == Role::Consumer))
                .map(|(k, _)| k.clone()),
        )
        .collect();
    for port in &consumed {
        if let Some(l) = http.get_mut(port) {
            l.retain(|c| c.role == Role::Consumer);
        }
        if let Some(l) = grpc.get_mut(port) {
            l.retain(|c| c.role == Role::Consumer);
        }
    }
    http.retain(|_, l| !l.is_empty());
    grpc.retain(|_, l| !l.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Created;
    use trellis_api::service::ServicePort;

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn spec(ports: &[(&str, u16)]) -> ServiceSpec {
        ServiceSpec {
            ports: ports
                .iter()
                .map(|(name, port)| ServicePort {
                    name: Some(name.to_string()),
                    port: *port,
                    ..ServicePort::default()
                })
                .collect(),
            ..ServiceSpec::default()
        }
    }

    fn parent(ns: Option<&str>, name: &str, port: Option<u16>, section: Option<&str>) -> ParentRef {
        ParentRef {
            group: String::new(),
            kind: "Service".into(),
            name: name.into(),
            namespace: ns.map(String::from),
            port,
            section_name: section.map(String::from),
        }
    }

    #[test]
    fn parents_resolve_ports_and_skip_consumer_routes_of_other_namespaces() {
        let (echo, web) = (
            spec(&[("http", 80), ("admin", 8080)]),
            spec(&[("http", 80)]),
        );
        let services: HashMap<ServiceKey, &ServiceSpec> =
            [(key("prod", "echo"), &echo), (key("shop", "web"), &web)]
                .into_iter()
                .collect();
        use Role::{Consumer, Producer};
        type Case<'a> = (&'a str, &'a str, Vec<ParentRef>, Vec<(&'a str, u16, Role)>);
        let cases: Vec<Case> = vec![
            // producer routes reach every client
            (
                "prod",
                "prod",
                vec![parent(None, "echo", None, None)],
                vec![("echo", 80, Producer), ("echo", 8080, Producer)],
            ),
            (
                "prod",
                "shop",
                vec![parent(None, "echo", None, None)],
                vec![("echo", 80, Producer), ("echo", 8080, Producer)],
            ),
            // a port, a port name, both, and two references to one port
            (
                "prod",
                "prod",
                vec![parent(None, "echo", Some(8080), None)],
                vec![("echo", 8080, Producer)],
            ),
            (
                "prod",
                "prod",
                vec![parent(None, "echo", None, Some("http"))],
                vec![("echo", 80, Producer)],
            ),
            (
                "prod",
                "prod",
                vec![
                    parent(None, "echo", Some(80), Some("http")),
                    parent(None, "echo", Some(80), None),
                ],
                vec![("echo", 80, Producer)],
            ),
            // consumer routes reach only their own namespace's clients
            (
                "shop",
                "shop",
                vec![parent(Some("prod"), "echo", None, Some("admin"))],
                vec![("echo", 8080, Consumer)],
            ),
            (
                "shop",
                "prod",
                vec![parent(Some("prod"), "echo", None, None)],
                vec![],
            ),
            (
                "shop",
                "other",
                vec![parent(Some("prod"), "echo", None, None)],
                vec![],
            ),
            // one route, a parent of each kind
            (
                "shop",
                "other",
                vec![
                    parent(Some("prod"), "echo", None, None),
                    parent(None, "web", None, None),
                ],
                vec![("web", 80, Producer)],
            ),
            (
                "shop",
                "shop",
                vec![
                    parent(Some("prod"), "echo", Some(80), None),
                    parent(None, "web", None, None),
                ],
                vec![("echo", 80, Consumer), ("web", 80, Producer)],
            ),
        ];
        for (route_ns, client_ns, refs, want) in cases {
            let got: Vec<(String, u16, Role)> = parents(&services, route_ns, client_ns, &refs)
                .into_iter()
                .map(|(k, p, r)| (k.name, p, r))
                .collect();
            let want: Vec<(String, u16, Role)> = want
                .into_iter()
                .map(|(n, p, r)| (n.to_string(), p, r))
                .collect();
            assert_eq!(
                got, want,
                "route in {route_ns}, client in {client_ns}: {refs:?}"
            );
        }
    }

    #[test]
    fn consumer_routes_replace_the_producers_on_their_ports_only() {
        let order = |route: &str| Order {
            created: Created::Unknown,
            route: route.into(),
            rule: 0,
            index: 0,
        };
        let rule = Arc::new(Rule::default());
        let add = |into: &mut Attached<&'static str>, port: u16, name: &'static str, role: Role| {
            attach(
                into,
                &[(key("prod", "echo"), port, role)],
                &[()],
                &rule,
                &order(name),
                |_| Ok::<_, ()>(name),
            )
            .unwrap();
        };
        let names = |a: &Attached<&'static str>, port: u16| -> Vec<&'static str> {
            a.get(&(key("prod", "echo"), port))
                .map(|l| l.iter().map(|c| c.m).collect())
                .unwrap_or_default()
        };
        let (mut http, mut grpc): (Attached<&str>, Attached<&str>) = Default::default();
        add(&mut http, 80, "producer-http-80", Role::Producer);
        add(&mut grpc, 80, "producer-grpc-80", Role::Producer);
        add(&mut http, 80, "consumer-http-80", Role::Consumer);
        add(&mut http, 8080, "producer-http-8080", Role::Producer);
        add(&mut grpc, 9090, "producer-grpc-9090", Role::Producer);
        add(&mut grpc, 9090, "consumer-grpc-9090", Role::Consumer);
        add(&mut http, 9090, "producer-http-9090", Role::Producer);
        prefer_consumers(&mut http, &mut grpc);
        assert_eq!(names(&http, 80), ["consumer-http-80"]);
        // A consumer HTTPRoute replaces the producer's GRPCRoutes too: one set per port.
        assert_eq!(names(&grpc, 80), Vec::<&str>::new());
        assert!(!grpc.contains_key(&(key("prod", "echo"), 80)));
        assert_eq!(names(&http, 8080), ["producer-http-8080"]);
        assert_eq!(names(&grpc, 9090), ["consumer-grpc-9090"]);
        assert_eq!(names(&http, 9090), Vec::<&str>::new());
    }
}
