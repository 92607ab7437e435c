//! Route status as Gateway API controllers write it: for each parent of each HTTPRoute and
//! GRPCRoute, an `Accepted` and a `ResolvedRefs` condition. A pure function of the whole
//! config, so the control plane (on read) and `trellis validate` (offline) say the same thing.
//! A `status` given in input is never read: status is always computed.

use crate::meta::ObjectKey;
use crate::resource::Resource;
use crate::route::{BackendRef, HttpBackendRef, HttpRouteFilter, ParentRef};
use crate::service::ServiceSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `controllerName` Trellis writes in route status.
pub const CONTROLLER_NAME: &str = "trellis.dev/mesh";

/// `status` of an `HTTPRoute` or `GRPCRoute` (Gateway API `RouteStatus`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteStatus {
    /// One entry per `spec.parentRefs` entry, in the same order.
    pub parents: Vec<RouteParentStatus>,
}

/// The route's status with respect to one parent (Gateway API `RouteParentStatus`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteParentStatus {
    /// The parent, as written in `spec.parentRefs`.
    pub parent_ref: ParentRef,
    /// Always [`CONTROLLER_NAME`].
    pub controller_name: String,
    /// `Accepted`, then `ResolvedRefs`.
    pub conditions: Vec<Condition>,
}

/// One condition (the Kubernetes `metav1.Condition` shape).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// `Accepted` or `ResolvedRefs`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `"True"` or `"False"`.
    pub status: String,
    /// Why, as one of the Gateway API's reasons (`Accepted`, `NoMatchingParent`,
    /// `UnsupportedValue`, `ResolvedRefs`, `BackendNotFound`, `InvalidKind`).
    pub reason: String,
    /// What, for a person.
    pub message: String,
    /// Trellis resources carry no `metadata.generation`, so this is never set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the condition last changed status; set by the control plane, absent offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The field the condition is about (`spec.parentRefs[0]`, the first unresolved
    /// reference), so offline output can name its line. Not part of the status.
    #[serde(skip)]
    pub field: Option<String>,
}

impl Condition {
    /// Whether `status` is `"True"`.
    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// The condition type saying whether the parent takes the route.
pub const ACCEPTED: &str = "Accepted";
/// The condition type saying whether every backend reference resolves.
pub const RESOLVED_REFS: &str = "ResolvedRefs";

fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
    field: Option<String>,
) -> Condition {
    Condition {
        kind: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: None,
        last_transition_time: None,
        field,
    }
}

/// The status of every `HTTPRoute` and `GRPCRoute` in `resources`, which must be the whole
/// config: the services in it decide which references resolve.
pub fn routes<'a, I>(resources: I) -> BTreeMap<ObjectKey, RouteStatus>
where
    I: IntoIterator<Item = &'a Resource> + Clone,
{
    let services: BTreeMap<(&str, &str), &ServiceSpec> = resources
        .clone()
        .into_iter()
        .filter_map(|r| match r {
            Resource::Service(s) => Some((
                (s.metadata.namespace.as_str(), s.metadata.name.as_str()),
                &s.spec,
            )),
            _ => None,
        })
        .collect();
    let mut out = BTreeMap::new();
    for r in resources {
        let (parents, refs) = match r {
            Resource::HttpRoute(h) => (
                &h.spec.parent_refs,
                references(
                    h.spec
                        .rules
                        .iter()
                        .map(|rule| (&rule.backend_refs[..], &rule.filters[..])),
                ),
            ),
            Resource::GrpcRoute(g) => (
                &g.spec.parent_refs,
                references(
                    g.spec
                        .rules
                        .iter()
                        .map(|rule| (&rule.backend_refs[..], &rule.filters[..])),
                ),
            ),
            _ => continue,
        };
        let ns = r.metadata().namespace.as_str();
        let resolved = resolved_refs(ns, &refs, &services);
        let parents = parents
            .iter()
            .enumerate()
            .map(|(i, p)| RouteParentStatus {
                parent_ref: p.clone(),
                controller_name: CONTROLLER_NAME.into(),
                conditions: vec![accepted(ns, i, p, &services), resolved.clone()],
            })
            .collect();
        out.insert(r.key(), RouteStatus { parents });
    }
    out
}

/// `Accepted` for one parent: the parent must be a core Service that exists and, when the
/// reference names a port, has that port.
fn accepted(
    ns: &str,
    index: usize,
    p: &ParentRef,
    services: &BTreeMap<(&str, &str), &ServiceSpec>,
) -> Condition {
    let field = Some(format!("spec.parentRefs[{index}]"));
    let pns = p.namespace.as_deref().unwrap_or(ns);
    let name = format!("Service {pns}/{}", p.name);
    let refuse =
        |reason: &str, message: String| condition(ACCEPTED, false, reason, message, field.clone());
    if p.kind != "Service" || !p.group.is_empty() {
        return refuse(
            "UnsupportedValue",
            format!(
                "mesh routes attach to core Services, not {}/{}",
                p.group, p.kind
            ),
        );
    }
    let Some(svc) = services.get(&(pns, p.name.as_str())) else {
        return refuse("NoMatchingParent", format!("{name} does not exist"));
    };
    if let Some(port) = p.port
        && !svc.ports.iter().any(|sp| sp.port == port)
    {
        return refuse("NoMatchingParent", format!("{name} has no port {port}"));
    }
    // A parent's sectionName names a port of the Service (GAMMA); how routing honours it
    // is the router's business, but one that names no port matches no parent.
    if let Some(section) = &p.section_name
        && !svc
            .ports
            .iter()
            .any(|sp| sp.name.as_deref() == Some(section))
    {
        return refuse(
            "NoMatchingParent",
            format!("{name} has no port named {section:?}"),
        );
    }
    condition(
        ACCEPTED,
        true,
        "Accepted",
        format!(
            "attached to {name}{}",
            p.port.map_or(String::new(), |port| format!(" port {port}"))
        ),
        None,
    )
}

/// Every backend reference of a route's rules, with its field path: weighted backends, and
/// the mirrors of rules and of backends.
fn references<'a>(
    rules: impl Iterator<Item = (&'a [HttpBackendRef], &'a [HttpRouteFilter])>,
) -> Vec<(String, BackendRef)> {
    fn mirrors(out: &mut Vec<(String, BackendRef)>, field: &str, filters: &[HttpRouteFilter]) {
        for (k, f) in filters.iter().enumerate() {
            if let Some(m) = &f.request_mirror {
                out.push((
                    format!("{field}.filters[{k}].requestMirror.backendRef"),
                    m.backend_ref.clone(),
                ));
            }
        }
    }
    let mut out = Vec::new();
    for (i, (backends, filters)) in rules.enumerate() {
        let rule = format!("spec.rules[{i}]");
        mirrors(&mut out, &rule, filters);
        for (j, b) in backends.iter().enumerate() {
            let field = format!("{rule}.backendRefs[{j}]");
            out.push((field.clone(), b.backend()));
            mirrors(&mut out, &field, &b.filters);
        }
    }
    out
}

/// How one backend reference resolves: `None` when it names an existing Service, else the
/// Gateway API reason and a message. In the mesh, references to other namespaces need no
/// ReferenceGrant (GEP-1294: routes only reach what callers could reach anyway).
pub fn unresolved(
    route_ns: &str,
    b: &BackendRef,
    exists: impl Fn(&str, &str) -> bool,
) -> Option<(&'static str, String)> {
    if b.kind != "Service" || !b.group.is_empty() {
        let kind = if b.group.is_empty() {
            b.kind.clone()
        } else {
            format!("{}/{}", b.group, b.kind)
        };
        return Some((
            "InvalidKind",
            format!(
                "{kind} {} is not supported: backends are core Services",
                b.name
            ),
        ));
    }
    let ns = b.namespace.as_deref().unwrap_or(route_ns);
    (!exists(ns, &b.name)).then(|| {
        (
            "BackendNotFound",
            format!("Service {ns}/{} does not exist", b.name),
        )
    })
}

/// `ResolvedRefs`: true when every reference resolves; otherwise false with the first
/// problem's reason and every problem in the message.
fn resolved_refs(
    ns: &str,
    refs: &[(String, BackendRef)],
    services: &BTreeMap<(&str, &str), &ServiceSpec>,
) -> Condition {
    let problems: Vec<(&String, &'static str, String)> = refs
        .iter()
        .filter_map(|(field, b)| {
            unresolved(ns, b, |ns, name| services.contains_key(&(ns, name)))
                .map(|(reason, message)| (field, reason, message))
        })
        .collect();
    match problems.first() {
        None => condition(
            RESOLVED_REFS,
            true,
            "ResolvedRefs",
            "every backend reference resolves".into(),
            None,
        ),
        Some((field, reason, _)) => condition(
            RESOLVED_REFS,
            false,
            reason,
            problems
                .iter()
                .map(|(f, _, m)| format!("{f}: {m}"))
                .collect::<Vec<_>>()
                .join("; "),
            Some(field.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICES: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  ports: [{port: 8080, name: http}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: payments, namespace: pay}
spec:
  ports: [{port: 50051}]
";

    /// (condition type, status, reason, message fragment) for each parent of the route.
    type Want = &'static [&'static [(&'static str, &'static str, &'static str, &'static str)]];

    fn status_of(route: &str) -> RouteStatus {
        let text = format!("{SERVICES}---\n{route}");
        let parsed = crate::parse_documents("t.yaml", &text).unwrap();
        let all = routes(parsed.iter().map(|r| &r.value));
        let key = parsed.last().unwrap().value.key();
        all.get(&key).cloned().unwrap()
    }

    fn http(spec: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n{spec}"
        )
    }

    fn grpc(spec: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn conditions_per_parent() {
        let cases: &[(&str, String, Want)] = &[
            (
                "everything resolves",
                http(
                    "  parentRefs: [{name: catalog, port: 8080}]\n  rules:\n    - backendRefs: [{name: catalog, port: 8080}]\n",
                ),
                &[&[
                    (
                        "Accepted",
                        "True",
                        "Accepted",
                        "attached to Service default/catalog port 8080",
                    ),
                    (
                        "ResolvedRefs",
                        "True",
                        "ResolvedRefs",
                        "every backend reference resolves",
                    ),
                ]],
            ),
            (
                "a missing backend Service",
                http(
                    "  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs:\n        - {name: catalog, port: 8080}\n        - {name: nope, port: 8080}\n",
                ),
                &[&[
                    (
                        "Accepted",
                        "True",
                        "Accepted",
                        "attached to Service default/catalog",
                    ),
                    (
                        "ResolvedRefs",
                        "False",
                        "BackendNotFound",
                        "spec.rules[0].backendRefs[1]: Service default/nope does not exist",
                    ),
                ]],
            ),
            (
                "a backend of another kind",
                http(
                    "  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{group: example.com, kind: Bucket, name: b}]\n",
                ),
                &[&[
                    ("Accepted", "True", "Accepted", ""),
                    (
                        "ResolvedRefs",
                        "False",
                        "InvalidKind",
                        "spec.rules[0].backendRefs[0]: example.com/Bucket b is not supported",
                    ),
                ]],
            ),
            (
                "a mirror to a missing Service, on the rule and on a backend",
                http(
                    "  parentRefs: [{name: catalog}]\n  rules:\n    - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]\n      backendRefs:\n        - name: catalog\n          port: 8080\n          filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow2, port: 80}}}]\n",
                ),
                &[&[
                    ("Accepted", "True", "Accepted", ""),
                    (
                        "ResolvedRefs",
                        "False",
                        "BackendNotFound",
                        "spec.rules[0].filters[0].requestMirror.backendRef: Service default/shadow does not exist; spec.rules[0].backendRefs[0].filters[0].requestMirror.backendRef: Service default/shadow2 does not exist",
                    ),
                ]],
            ),
            (
                "a Service in another namespace resolves without a ReferenceGrant",
                http(
                    "  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{name: payments, namespace: pay, port: 50051}]\n",
                ),
                &[&[
                    ("Accepted", "True", "Accepted", ""),
                    ("ResolvedRefs", "True", "ResolvedRefs", ""),
                ]],
            ),
            (
                "the namespace defaults to the route's",
                http(
                    "  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{name: payments, port: 50051}]\n",
                ),
                &[&[
                    ("Accepted", "True", "Accepted", ""),
                    (
                        "ResolvedRefs",
                        "False",
                        "BackendNotFound",
                        "Service default/payments does not exist",
                    ),
                ]],
            ),
            (
                "the first problem gives the reason",
                http(
                    "  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{kind: Bucket, name: b}]\n    - backendRefs: [{name: gone, port: 1}]\n",
                ),
                &[&[
                    ("Accepted", "True", "Accepted", ""),
                    (
                        "ResolvedRefs",
                        "False",
                        "InvalidKind",
                        "spec.rules[0].backendRefs[0]: Bucket b is not supported: backends are core Services; spec.rules[1].backendRefs[0]: Service default/gone does not exist",
                    ),
                ]],
            ),
            (
                "each parent has its own Accepted",
                http(
                    "  parentRefs:\n    - {name: catalog}\n    - {name: gone}\n    - {name: catalog, port: 9090}\n    - {name: catalog, sectionName: grpc}\n    - {name: catalog, sectionName: http}\n    - {group: example.com, kind: Mesh, name: m}\n    - {name: payments, namespace: pay}\n",
                ),
                &[
                    &[
                        (
                            "Accepted",
                            "True",
                            "Accepted",
                            "attached to Service default/catalog",
                        ),
                        ("ResolvedRefs", "True", "ResolvedRefs", ""),
                    ],
                    &[
                        (
                            "Accepted",
                            "False",
                            "NoMatchingParent",
                            "Service default/gone does not exist",
                        ),
                        ("ResolvedRefs", "True", "ResolvedRefs", ""),
                    ],
                    &[
                        (
                            "Accepted",
                            "False",
                            "NoMatchingParent",
                            "Service default/catalog has no port 9090",
                        ),
                        ("ResolvedRefs", "True", "ResolvedRefs", ""),
                    ],
                    &[
                        (
                            "Accepted",
                            "False",
                            "NoMatchingParent",
                            "Service default/catalog has no port named \"grpc\"",
                        ),
                        ("ResolvedRefs", "True", "ResolvedRefs", ""),
                    ],
                    &[
                        ("Accepted", "True", "Accepted", ""),
                        ("ResolvedRefs", "True", "ResolvedRefs", ""),
                    ],
                    &[
                        (
                            "Accepted",
                            "False",
                            "UnsupportedValue",
                            "not example.com/Mesh",
                        ),
                        ("ResolvedRefs", "True", "ResolvedRefs", ""),
                    ],
                    &[
                        (
                            "Accepted",
                            "True",
                            "Accepted",
                            "attached to Service pay/payments",
                        ),
                        ("ResolvedRefs", "True", "ResolvedRefs", ""),
                    ],
                ],
            ),
            (
                "GRPCRoute: a missing backend",
                grpc(
                    "  parentRefs: [{name: payments, namespace: pay}]\n  rules:\n    - backendRefs: [{name: payments-v2, port: 50051}]\n",
                ),
                &[&[
                    (
                        "Accepted",
                        "True",
                        "Accepted",
                        "attached to Service pay/payments",
                    ),
                    (
                        "ResolvedRefs",
                        "False",
                        "BackendNotFound",
                        "spec.rules[0].backendRefs[0]: Service default/payments-v2 does not exist",
                    ),
                ]],
            ),
            (
                "GRPCRoute: a mirror to a missing Service",
                grpc(
                    "  parentRefs: [{name: catalog}]\n  rules:\n    - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]\n      backendRefs: [{name: catalog, port: 8080}]\n",
                ),
                &[&[
                    ("Accepted", "True", "Accepted", ""),
                    (
                        "ResolvedRefs",
                        "False",
                        "BackendNotFound",
                        "spec.rules[0].filters[0].requestMirror.backendRef: Service default/shadow does not exist",
                    ),
                ]],
            ),
        ];
        for (name, route, want) in cases {
            let got = status_of(route);
            assert_eq!(got.parents.len(), want.len(), "{name}");
            for (p, w) in got.parents.iter().zip(want.iter()) {
                assert_eq!(p.controller_name, CONTROLLER_NAME, "{name}");
                assert_eq!(p.conditions.len(), w.len(), "{name}");
                for (c, (kind, status, reason, message)) in p.conditions.iter().zip(w.iter()) {
                    assert_eq!(
                        (c.kind.as_str(), c.status.as_str(), c.reason.as_str()),
                        (*kind, *status, *reason),
                        "{name}: {c:?}"
                    );
                    assert!(c.message.contains(message), "{name}: {c:?}");
                }
            }
        }
    }

    #[test]
    fn unresolved_conditions_name_the_field() {
        let s = status_of(&http(
            "  parentRefs: [{name: gone}]\n  rules:\n    - backendRefs: [{name: catalog, port: 8080}, {name: nope, port: 1}]\n",
        ));
        let c = &s.parents[0].conditions;
        assert_eq!(c[0].field.as_deref(), Some("spec.parentRefs[0]"));
        assert_eq!(c[1].field.as_deref(), Some("spec.rules[0].backendRefs[1]"));
    }

    #[test]
    fn status_in_input_is_ignored_and_output_has_the_gateway_api_shape() {
        // A stale status in the input says everything is fine; the computed one does not.
        let s = status_of(&format!(
            "{}status:\n  parents:\n    - parentRef: {{name: catalog}}\n      controllerName: trellis.dev/mesh\n      conditions: [{{type: ResolvedRefs, status: \"True\", reason: ResolvedRefs}}]\n",
            http(
                "  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{name: nope, port: 1}]\n"
            )
        ));
        assert_eq!(s.parents[0].conditions[1].status, "False");
        let json = serde_json::to_value(&s).unwrap();
        let c = &json["parents"][0];
        assert_eq!(c["controllerName"], "trellis.dev/mesh");
        assert_eq!(c["parentRef"]["name"], "catalog");
        assert_eq!(c["conditions"][1]["type"], "ResolvedRefs");
        assert_eq!(c["conditions"][1]["reason"], "BackendNotFound");
        assert!(c["conditions"][1].get("field").is_none());
        assert!(c["conditions"][1].get("lastTransitionTime").is_none());
    }
}
