//! How a mesh route attaches (GAMMA): which Service ports a `parentRef` names, whose route it
//! is (producer or consumer) and so which clients it applies to, and which of a match's header
//! and query conditions count. Pure functions shared by validation, the proxy and the control
//! plane, so all three read a route the same way.

use crate::route::{HeaderMatch, ParentRef};
use crate::service::ServiceSpec;

/// Why a `parentRef` names no port of its Service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParentPortError {
    /// `port` is not one of the Service's ports.
    #[error("Service {service} has no port {port}")]
    NoPort {
        /// `namespace/name` of the Service.
        service: String,
        /// The port asked for.
        port: u16,
    },
    /// `sectionName` names no port of the Service.
    #[error(
        "Service {service} has no port named {name:?} (sectionName names a Service port by its name)"
    )]
    NoPortNamed {
        /// `namespace/name` of the Service.
        service: String,
        /// The name asked for.
        name: String,
    },
    /// `sectionName` and `port` name different ports.
    #[error(
        "Service {service}'s port named {name:?} is port {named}, not {port}: sectionName and port must name the same port"
    )]
    Disagree {
        /// `namespace/name` of the Service.
        service: String,
        /// The name asked for.
        name: String,
        /// The number of the port with that name.
        named: u16,
        /// The port asked for.
        port: u16,
    },
}

impl ParentPortError {
    /// The `parentRef` field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            ParentPortError::NoPort { .. } => "port",
            ParentPortError::NoPortNamed { .. } | ParentPortError::Disagree { .. } => "sectionName",
        }
    }
}

/// The ports of `svc` (named `service` in errors) that parent reference `p` attaches to:
/// every port, or the one `port` and/or `sectionName` (a port's `name`) select. Both set,
/// they must name the same port.
pub fn parent_ports(
    p: &ParentRef,
    service: &str,
    svc: &ServiceSpec,
) -> Result<Vec<u16>, ParentPortError> {
    // The spec reads an empty sectionName as unset: the whole Service.
    let section = p.section_name.as_deref().filter(|s| !s.is_empty());
    if let Some(port) = p.port
        && !svc.ports.iter().any(|sp| sp.port == port)
    {
        return Err(ParentPortError::NoPort {
            service: service.into(),
            port,
        });
    }
    if let Some(name) = section {
        let Some(named) = svc.ports.iter().find(|sp| sp.name.as_deref() == Some(name)) else {
            return Err(ParentPortError::NoPortNamed {
                service: service.into(),
                name: name.into(),
            });
        };
        if let Some(port) = p.port
            && port != named.port
        {
            return Err(ParentPortError::Disagree {
                service: service.into(),
                name: name.into(),
                named: named.port,
                port,
            });
        }
        return Ok(vec![named.port]);
    }
    Ok(svc
        .ports
        .iter()
        .map(|sp| sp.port)
        .filter(|port| p.port.is_none_or(|want| want == *port))
        .collect())
}

/// What is wrong with a `parentRef`'s `group` and `kind`, as `(field, message)`: a mesh route's
/// parent is a core Service. Omitted, `group` reads as `""` and `kind` as `Service` (the
/// Gateway API's own defaults, `gateway.networking.k8s.io` and `Gateway`, name a Gateway,
/// which Trellis does not have).
pub fn parent_kind_problem(p: &ParentRef) -> Option<(&'static str, String)> {
    const WANT: &str = "a mesh route's parent is a Service (group \"\", kind Service)";
    if p.kind != "Service" {
        return Some(("kind", format!("kind {:?}: not supported; {WANT}", p.kind)));
    }
    if !p.group.is_empty() {
        return Some((
            "group",
            format!("group {:?}: not supported; {WANT}", p.group),
        ));
    }
    None
}

/// Whose route a route is, for one of its parents (GAMMA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// In the Service's own namespace: applies to clients in every namespace that has no
    /// consumer route for that Service port.
    Producer,
    /// In another namespace: applies only to clients in the route's own namespace, where it
    /// replaces the producer's routes.
    Consumer,
}

/// The role of a route in `route_ns` for a parent Service in `parent_ns`.
pub fn role(route_ns: &str, parent_ns: &str) -> Role {
    if route_ns == parent_ns {
        Role::Producer
    } else {
        Role::Consumer
    }
}

/// Whether a route in `route_ns` attached to a Service in `parent_ns` can apply to clients in
/// `client_ns` (a producer route still gives way to consumer routes there: see [`Role`]).
pub fn reaches(route_ns: &str, parent_ns: &str, client_ns: &str) -> bool {
    match role(route_ns, parent_ns) {
        Role::Producer => true,
        Role::Consumer => route_ns == client_ns,
    }
}

/// The header conditions of one match that count: the first of each name (names compare
/// case-insensitively); the spec has later ones with an equivalent name ignored.
pub fn effective_headers(list: &[HeaderMatch]) -> Vec<&HeaderMatch> {
    first_of_each(list, |a, b| a.eq_ignore_ascii_case(b))
}

/// The query parameter conditions of one match that count: the first of each name (names
/// are case-sensitive).
pub fn effective_query_params(list: &[HeaderMatch]) -> Vec<&HeaderMatch> {
    first_of_each(list, |a, b| a == b)
}

fn first_of_each(list: &[HeaderMatch], same: impl Fn(&str, &str) -> bool) -> Vec<&HeaderMatch> {
    let mut out: Vec<&HeaderMatch> = Vec::with_capacity(list.len());
    for h in list {
        if !out.iter().any(|o| same(&o.name, &h.name)) {
            out.push(h);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::ValueMatchType;
    use crate::service::ServicePort;

    fn svc() -> ServiceSpec {
        let port = |name: Option<&str>, port| ServicePort {
            name: name.map(String::from),
            port,
            ..ServicePort::default()
        };
        ServiceSpec {
            ports: vec![
                port(Some("http"), 80),
                port(Some("admin"), 8080),
                port(None, 9090),
            ],
            ..ServiceSpec::default()
        }
    }

    #[test]
    fn parent_ports_follow_port_and_section_name() {
        let parent = |port: Option<u16>, section: Option<&str>| ParentRef {
            kind: "Service".into(),
            name: "echo".into(),
            port,
            section_name: section.map(String::from),
            ..ParentRef::default()
        };
        type Want = Result<Vec<u16>, &'static str>;
        let cases: &[(Option<u16>, Option<&str>, Want)] = &[
            (None, None, Ok(vec![80, 8080, 9090])),
            (Some(8080), None, Ok(vec![8080])),
            (None, Some("admin"), Ok(vec![8080])),
            (None, Some(""), Ok(vec![80, 8080, 9090])),
            (Some(80), Some("http"), Ok(vec![80])),
            (Some(81), None, Err("port")),
            (None, Some("grpc"), Err("sectionName")),
            (None, Some("HTTP"), Err("sectionName")),
            (Some(80), Some("admin"), Err("sectionName")),
            (Some(81), Some("http"), Err("port")),
        ];
        for (port, section, want) in cases {
            let got = parent_ports(&parent(*port, *section), "default/echo", &svc());
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "{port:?} {section:?}"),
                (Err(e), Err(field)) => assert_eq!(e.field(), *field, "{port:?} {section:?}: {e}"),
                (got, want) => panic!("{port:?} {section:?}: got {got:?}, want {want:?}"),
            }
        }
        let e = parent_ports(&parent(Some(80), Some("admin")), "default/echo", &svc())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Service default/echo's port named \"admin\" is port 8080, not 80: sectionName and port must name the same port"
        );
    }

    #[test]
    fn parent_kinds_other_than_a_core_service_are_not_supported() {
        let parent = |group: &str, kind: &str| ParentRef {
            group: group.into(),
            kind: kind.into(),
            name: "x".into(),
            ..ParentRef::default()
        };
        let cases = [
            ("", "Service", None),
            ("", "Gateway", Some("kind")),
            ("gateway.networking.k8s.io", "Gateway", Some("kind")),
            ("gateway.networking.k8s.io", "Service", Some("group")),
            ("example.com", "Service", Some("group")),
            ("", "Pod", Some("kind")),
        ];
        for (group, kind, want) in cases {
            let got = parent_kind_problem(&parent(group, kind));
            assert_eq!(got.as_ref().map(|g| g.0), want, "{group}/{kind}");
            if let Some((_, msg)) = got {
                assert!(msg.contains("not supported"), "{msg}");
            }
        }
    }

    #[test]
    fn roles_decide_which_clients_a_route_reaches() {
        // (route namespace, parent namespace, client namespace, role, reaches)
        let cases = [
            ("prod", "prod", "prod", Role::Producer, true),
            ("prod", "prod", "shop", Role::Producer, true),
            ("shop", "prod", "shop", Role::Consumer, true),
            ("shop", "prod", "prod", Role::Consumer, false),
            ("shop", "prod", "other", Role::Consumer, false),
        ];
        for (route, parent, client, want_role, want_reaches) in cases {
            assert_eq!(role(route, parent), want_role, "{route} {parent}");
            assert_eq!(
                reaches(route, parent, client),
                want_reaches,
                "{route} {parent} {client}"
            );
        }
    }

    #[test]
    fn only_the_first_condition_of_each_name_counts() {
        let h = |name: &str, value: &str| HeaderMatch {
            kind: ValueMatchType::Exact,
            name: name.into(),
            value: value.into(),
        };
        let list = [
            h("X-A", "1"),
            h("x-a", "2"),
            h("b", "3"),
            h("B", "4"),
            h("x-a", "5"),
        ];
        let values = |v: Vec<&HeaderMatch>| v.iter().map(|h| h.value.clone()).collect::<Vec<_>>();
        assert_eq!(values(effective_headers(&list)), ["1", "3"]);
        assert_eq!(values(effective_query_params(&list)), ["1", "2", "3", "4"]);
    }
}

/// Attachment as `trellis validate` sees it: located errors for what is refused, and no error
/// for what the spec accepts.
#[cfg(test)]
mod validation_tests {
    use crate::{parse_documents, validate};

    const SERVICES: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  ports: [{name: http, port: 8080}, {name: admin, port: 9090}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: echo, namespace: prod}
spec:
  ports: [{name: http, port: 80}]
";

    fn route(kind: &str, ns: &str, name: &str, parent: &str, rules: &str) -> String {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs:\n    - {parent}\n  rules:\n{rules}"
        )
    }

    /// Checks `extra` after the services: valid when `want` is `None`, else one error at
    /// `field`, on the line that contains `line_of`, with `words` in its message.
    /// An expected error: field, text of its line, words of its message.
    type Want<'a> = Option<(&'a str, &'a str, &'a str)>;

    fn check(extra: &str, want: Want) {
        let text = format!("{SERVICES}{extra}");
        let got = parse_documents("t.yaml", &text).and_then(|r| validate(&r));
        match (got, want) {
            (Ok(()), None) => {}
            (Err(e), Some((field, line_of, words))) => {
                let line = text.lines().position(|l| l.contains(line_of)).unwrap() + 1;
                let d = e.0.iter().find(|d| d.field == field);
                let d = d.unwrap_or_else(|| panic!("{extra}\nno error at {field}: {e}"));
                assert_eq!(d.line as usize, line, "{d}");
                assert!(d.message.contains(words), "{d}");
            }
            (got, want) => panic!("{extra}\ngot {got:?}, want {want:?}"),
        }
    }

    const TO_CATALOG: &str = "    - backendRefs: [{name: catalog, port: 8080}]\n";

    #[test]
    fn parent_refs_name_a_service_port_by_number_or_name() {
        let cases: &[(&str, Want)] = &[
            ("{name: catalog}", None),
            ("{group: \"\", kind: Service, name: catalog}", None),
            ("{name: catalog, sectionName: admin}", None),
            ("{name: catalog, sectionName: http, port: 8080}", None),
            ("{name: echo, namespace: prod, sectionName: http}", None),
            (
                "{name: catalog, sectionName: grpc}",
                Some((
                    "spec.parentRefs[0].sectionName",
                    "sectionName: grpc",
                    "Service default/catalog has no port named \"grpc\"",
                )),
            ),
            (
                "{name: catalog, sectionName: http, port: 9090}",
                Some((
                    "spec.parentRefs[0].sectionName",
                    "sectionName: http, port: 9090",
                    "is port 8080, not 9090",
                )),
            ),
            (
                "{name: catalog, port: 1}",
                Some((
                    "spec.parentRefs[0].port",
                    "port: 1}",
                    "Service default/catalog has no port 1",
                )),
            ),
            (
                "{kind: Gateway, name: catalog}",
                Some((
                    "spec.parentRefs[0].kind",
                    "kind: Gateway",
                    "kind \"Gateway\": not supported",
                )),
            ),
            (
                "{group: gateway.networking.k8s.io, kind: Gateway, name: gw}",
                Some(("spec.parentRefs[0].kind", "kind: Gateway", "not supported")),
            ),
            (
                // The spec's defaults name a Gateway; an explicit Gateway API group too.
                "{group: gateway.networking.k8s.io, name: catalog}",
                Some((
                    "spec.parentRefs[0].group",
                    "group: gateway",
                    "group \"gateway.networking.k8s.io\": not supported",
                )),
            ),
        ];
        for (parent, want) in cases {
            check(
                &route("HTTPRoute", "default", "r", parent, TO_CATALOG),
                *want,
            );
            let grpc = "    - backendRefs: [{name: catalog, port: 9090}]\n";
            check(&route("GRPCRoute", "default", "g", parent, grpc), *want);
        }
    }

    #[test]
    fn identical_matches_and_repeated_names_are_accepted() {
        let m = "      matches: [{path: {value: /a}, headers: [{name: x, value: \"1\"}]}]\n";
        let rule = format!("{TO_CATALOG}{m}");
        let producer = "{name: echo}";
        let consumer = "{name: echo, namespace: prod}";
        let to_echo =
            format!("    - backendRefs: [{{name: echo, namespace: prod, port: 80}}]\n{m}");
        let cases = [
            // Two routes on one parent: the older (then namespace/name) wins.
            route("HTTPRoute", "default", "a", "{name: catalog}", &rule)
                + &route("HTTPRoute", "default", "b", "{name: catalog}", &rule),
            // Two rules of one route: the first wins.
            route(
                "HTTPRoute",
                "default",
                "a",
                "{name: catalog}",
                &(rule.clone() + &rule),
            ),
            // A producer and a consumer route apply to different clients.
            route("HTTPRoute", "prod", "p", producer, &to_echo)
                + &route("HTTPRoute", "shop", "c", consumer, &to_echo),
            // The first of each header name (any case) and query name counts.
            route(
                "HTTPRoute",
                "default",
                "h",
                "{name: catalog}",
                &format!(
                    "{TO_CATALOG}      matches: [{{headers: [{{name: X-A, value: \"1\"}}, {{name: x-a, value: \"2\"}}], queryParams: [{{name: q, value: \"1\"}}, {{name: q, value: \"2\"}}]}}]\n"
                ),
            ),
            route(
                "GRPCRoute",
                "default",
                "g",
                "{name: catalog}",
                &format!(
                    "{TO_CATALOG}      matches: [{{headers: [{{name: X-A, value: \"1\"}}, {{name: x-A, value: \"2\"}}]}}]\n"
                ),
            ),
            route("GRPCRoute", "default", "g1", "{name: catalog}", TO_CATALOG)
                + &route("GRPCRoute", "default", "g2", "{name: catalog}", TO_CATALOG),
        ];
        for text in &cases {
            check(text, None);
        }
    }

    #[test]
    fn creation_timestamps_and_port_names_are_checked() {
        let stamped = |ts: &str| {
            format!(
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\n  creationTimestamp: \"{ts}\"\nspec:\n  parentRefs: [{{name: catalog}}]\n"
            )
        };
        check(&stamped("2026-01-31T12:00:00.25+01:00"), None);
        check(
            &stamped("2026-01-31 12:00:00"),
            Some((
                "metadata.creationTimestamp",
                "creationTimestamp",
                "is not an RFC 3339 time",
            )),
        );
        check(
            "---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: twice}\nspec:\n  ports:\n    - {name: web, port: 80}\n    - {name: web, port: 81}\n",
            Some((
                "spec.ports[1].name",
                "port: 81",
                "duplicate port name \"web\"",
            )),
        );
    }
}
