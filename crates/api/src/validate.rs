//! Whole-set validation: every resource on its own, then the references between them. Returns
//! every problem at once so a user fixes a file in one pass.

use crate::load::{Diagnostic, Diagnostics, Located};
use crate::meta::check_name;
use crate::policy::Algorithm;
use crate::resource::{Object, Resource};
use crate::route::{
    BackendRef, FilterType, GrpcRouteSpec, HeaderMatch, HttpBackendRef, HttpRouteFilter,
    HttpRouteSpec, ParentRef, PathMatchType, PathModifier, PathModifierType, ValueMatchType,
};
use crate::service::ServiceSpec;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// Validates a complete set of resources: each one's schema-level rules, duplicates, and that
/// every reference (parent, backend, mirror, policy target, listener service) resolves.
pub fn validate(resources: &[Located<Resource>]) -> Result<(), Diagnostics> {
    let mut v = Validator { out: Vec::new() };
    let mut seen = BTreeMap::new();
    let mut services: BTreeMap<(String, String), &ServiceSpec> = BTreeMap::new();
    for r in resources {
        if let Resource::Service(s) = &r.value {
            services.insert(
                (s.metadata.namespace.clone(), s.metadata.name.clone()),
                &s.spec,
            );
        }
    }
    let faults: BTreeSet<(String, String)> = resources
        .iter()
        .filter_map(|r| match &r.value {
            Resource::FaultInjection(f) => {
                Some((f.metadata.namespace.clone(), f.metadata.name.clone()))
            }
            _ => None,
        })
        .collect();
    // Routes a RateLimitPolicy may target: (kind, namespace, name) → rule names.
    let routes: BTreeMap<(&str, String, String), Vec<Option<String>>> = resources
        .iter()
        .filter_map(|r| {
            let m = r.value.metadata();
            let rules = match &r.value {
                Resource::HttpRoute(h) => h.spec.rules.iter().map(|r| r.name.clone()).collect(),
                Resource::GrpcRoute(g) => g.spec.rules.iter().map(|r| r.name.clone()).collect(),
                _ => return None,
            };
            Some((
                (r.value.kind().as_str(), m.namespace.clone(), m.name.clone()),
                rules,
            ))
        })
        .collect();
    let mut overload_targets: BTreeMap<(String, String), &Located<Resource>> = BTreeMap::new();
    let mut mesh_configs: BTreeMap<String, &Located<Resource>> = BTreeMap::new();
    let mut telemetry_scopes: BTreeMap<(String, Option<String>), &Located<Resource>> =
        BTreeMap::new();
    let mut fallbacks = Fallbacks::new();
    let mut policy_targets: BTreeMap<(String, String), &Located<Resource>> = BTreeMap::new();
    for r in resources {
        let m = r.value.metadata();
        if let Err(e) = check_name(&m.name) {
            v.at(r, "metadata.name", e);
        }
        if let Err(e) = check_name(&m.namespace) {
            v.at(r, "metadata.namespace", e);
        }
        if let Err(e) = m.created() {
            v.at(r, "metadata.creationTimestamp", e);
        }
        if let Some(prev) = seen.insert(r.value.key(), r) {
            v.at(
                r,
                "metadata.name",
                format!(
                    "duplicate {}; first defined at {}:{}",
                    r.value.key(),
                    prev.file,
                    prev.first_line
                ),
            );
        }
        let ctx = Ctx {
            r,
            services: &services,
            faults: &faults,
            routes: &routes,
            ns: &m.namespace,
        };
        match &r.value {
            Resource::MeshConfig(_) => {
                if let Some(first) = mesh_configs.insert(m.namespace.clone(), r) {
                    v.at(
                        r,
                        "metadata.name",
                        format!(
                            "namespace {} already has MeshConfig {} ({}:{}); one per namespace",
                            m.namespace,
                            first.value.metadata().name,
                            first.file,
                            first.first_line
                        ),
                    );
                }
            }
            Resource::AuthorizationPolicy(a) => v.authorization(&ctx, &a.spec),
            Resource::RequestAuthentication(a) => v.authentication(&ctx, &a.spec),
            Resource::FaultInjection(f) => v.fault(&ctx, &f.spec),
            Resource::RateLimitPolicy(p) => v.rate_limit(&ctx, &p.spec),
            Resource::OverloadPolicy(p) => {
                v.overload(&ctx, &p.spec);
                let t = &p.spec.target_ref;
                let target = (
                    t.namespace.clone().unwrap_or_else(|| m.namespace.clone()),
                    t.name.clone(),
                );
                if let Some(first) = overload_targets.insert(target, r) {
                    v.at(
                        r,
                        "spec.targetRef",
                        format!(
                            "Service {}/{} already has OverloadPolicy {} ({}:{}); one per Service",
                            m.namespace,
                            t.name,
                            first.value.metadata().name,
                            first.file,
                            first.first_line
                        ),
                    );
                }
            }
            Resource::Telemetry(t) => {
                v.telemetry(&ctx, &t.spec);
                let scope = (m.namespace.clone(), t.spec.service.clone());
                if let Some(first) = telemetry_scopes.insert(scope, r) {
                    let what = match &t.spec.service {
                        Some(s) => format!("service {}/{s}", m.namespace),
                        None => format!("namespace {}", m.namespace),
                    };
                    v.at(
                        r,
                        "metadata.name",
                        format!(
                            "{what} already has Telemetry {} ({}:{}); one per scope, so merge them",
                            first.value.metadata().name,
                            first.file,
                            first.first_line
                        ),
                    );
                }
            }
            Resource::Proxy(p) => v.proxy(&ctx, p),
            Resource::Service(s) => v.service(&ctx, s),
            Resource::HttpRoute(h) => v.http_route(&ctx, &h.spec),
            Resource::GrpcRoute(g) => v.grpc_route(&ctx, &g.spec),
            Resource::BackendPolicy(b) => {
                let t = &b.spec.target_ref;
                if t.kind != "Service" || !t.group.is_empty() {
                    v.at(
                        r,
                        "spec.targetRef.kind",
                        format!(
                            "only core Services can be targeted, not {}/{}",
                            t.group, t.kind
                        ),
                    );
                } else if let Some(first) = policy_targets.insert(
                    (
                        t.namespace.clone().unwrap_or_else(|| m.namespace.clone()),
                        t.name.clone(),
                    ),
                    r,
                ) {
                    // One policy per Service: a second would silently replace the first.
                    // Reported where the user can fix it (a file over the store).
                    let (at, other) = if r.first_line == 0 && first.first_line > 0 {
                        (first, r)
                    } else {
                        (r, first)
                    };
                    v.at(
                        at,
                        "spec.targetRef",
                        format!(
                            "Service {}/{} already has BackendPolicy {} ({}:{}); one per Service, so merge them",
                            t.namespace.as_deref().unwrap_or(ctx.ns),
                            t.name,
                            other.value.metadata().name,
                            other.file,
                            other.first_line
                        ),
                    );
                } else if ctx.service(t.namespace.as_deref(), &t.name).is_none() {
                    v.at(
                        r,
                        "spec.targetRef.name",
                        format!(
                            "no Service {}/{}",
                            t.namespace.as_deref().unwrap_or(ctx.ns),
                            t.name
                        ),
                    );
                }
                for (field, e) in b.spec.retry.iter().flat_map(|p| p.problems()) {
                    v.at(r, &format!("spec.retry.{field}"), e);
                }
                v.locality(&ctx, &b.spec, &mut fallbacks);
                for (field, message) in
                    crate::health::problems(&b.spec.outlier_detection, b.spec.health_check.as_ref())
                {
                    v.at(r, field, message);
                }
                if let Some(cb) = &b.spec.circuit_breaker {
                    for (field, value) in [
                        ("maxConnections", cb.max_connections),
                        ("maxRequests", cb.max_requests),
                    ] {
                        if value == Some(0) {
                            v.at(
                                r,
                                &format!("spec.circuitBreaker.{field}"),
                                "must be at least 1 (leave it out for no limit)",
                            );
                        }
                    }
                    if cb.max_pending_requests.is_some() && cb.max_connections.is_none() {
                        v.at(
                            r,
                            "spec.circuitBreaker.maxPendingRequests",
                            "requests wait only when maxConnections is reached: set maxConnections too",
                        );
                    }
                }
                let lb = &b.spec.load_balancer;
                match (lb.algorithm, &lb.consistent_hash) {
                    (Algorithm::ConsistentHash, None) => v.at(
                        r,
                        "spec.loadBalancer.consistentHash",
                        "required when algorithm is ConsistentHash",
                    ),
                    (Algorithm::ConsistentHash, Some(h)) => {
                        let keys = [h.header.is_some(), h.cookie.is_some(), h.source_ip]
                            .iter()
                            .filter(|x| **x)
                            .count();
                        if keys != 1 {
                            v.at(
                                r,
                                "spec.loadBalancer.consistentHash",
                                "set exactly one of header, cookie, sourceIP",
                            );
                        }
                        if let Some(name) = &h.header
                            && http_header_name(name).is_err()
                        {
                            v.at(
                                r,
                                "spec.loadBalancer.consistentHash.header",
                                format!("{name:?} is not a valid header name"),
                            );
                        }
                        if !(h.bounded_load >= 1.0 && h.bounded_load.is_finite()) {
                            v.at(
                                r,
                                "spec.loadBalancer.consistentHash.boundedLoad",
                                "must be at least 1.0",
                            );
                        }
                    }
                    (_, Some(_)) => v.at(
                        r,
                        "spec.loadBalancer.consistentHash",
                        "only valid with algorithm ConsistentHash",
                    ),
                    _ => {}
                }
            }
        }
    }
    fallback_cycles(&mut v, &fallbacks);
    if v.out.is_empty() {
        Ok(())
    } else {
        Err(Diagnostics(v.out))
    }
}

/// Each service's fallback (from its `BackendPolicy`), and the policy that names it.
type Fallbacks<'a> = BTreeMap<(String, String), ((String, String), &'a Located<Resource>)>;

/// A chain of fallbacks that comes back to where it started would pass traffic round in a
/// circle when every member is down: reported at each policy on the cycle.
fn fallback_cycles(v: &mut Validator, fallbacks: &Fallbacks) {
    for (start, (_, r)) in fallbacks {
        let mut path = vec![start];
        let mut at = start;
        while let Some((next, _)) = fallbacks.get(at) {
            if next == start {
                let names: Vec<String> = path
                    .iter()
                    .chain([&start])
                    .map(|(ns, n)| format!("{ns}/{n}"))
                    .collect();
                v.at(
                    r,
                    "spec.fallback.name",
                    format!("fallbacks form a cycle: {}", names.join(" -> ")),
                );
                break;
            }
            if path.contains(&next) {
                // A cycle further on, reported at its own members.
                break;
            }
            path.push(next);
            at = next;
        }
    }
}

struct Validator {
    out: Vec<Diagnostic>,
}

impl Validator {
    fn authentication(&mut self, ctx: &Ctx, spec: &crate::authn::RequestAuthenticationSpec) {
        let r = ctx.r;
        if let Some(t) = &spec.target_ref
            && ctx.service(t.namespace.as_deref(), &t.name).is_none()
        {
            self.at(
                r,
                "spec.targetRef.name",
                format!("no Service {}/{}", ctx.ns, t.name),
            );
        }
        if spec.jwt_rules.is_empty() {
            self.at(r, "spec.jwtRules", "at least one issuer");
        }
        let mut issuers = BTreeSet::new();
        for (i, j) in spec.jwt_rules.iter().enumerate() {
            let at = |f: &str| format!("spec.jwtRules[{i}].{f}");
            if j.issuer.is_empty() {
                self.at(r, &at("issuer"), "must not be empty");
            } else if !issuers.insert(j.issuer.clone()) {
                self.at(r, &at("issuer"), format!("duplicate issuer {:?}", j.issuer));
            }
            match (&j.jwks_file, &j.jwks_uri) {
                (Some(_), None) => {}
                (None, Some(u)) if u.starts_with("http://") => {}
                (None, Some(u)) => self.at(
                    r,
                    &at("jwksUri"),
                    format!("{u:?}: only http:// URLs are supported"),
                ),
                _ => self.at(
                    r,
                    &at("jwksFile"),
                    "set exactly one of jwksFile and jwksUri",
                ),
            }
            if j.algorithms.is_empty() {
                self.at(r, &at("algorithms"), "at least one algorithm");
            }
            for (k, a) in j.algorithms.iter().enumerate() {
                if !crate::authn::ALGORITHMS.contains(&a.as_str()) {
                    self.at(
                        r,
                        &at(&format!("algorithms[{k}]")),
                        format!(
                            "{a:?} is not allowed; use one of {}",
                            crate::authn::ALGORITHMS.join(", ")
                        ),
                    );
                }
            }
            if j.clock_skew.get() > std::time::Duration::from_secs(600) {
                self.at(r, &at("clockSkew"), "at most 10m");
            }
        }
    }

    fn rate_limit(&mut self, ctx: &Ctx, spec: &crate::ratelimit::RateLimitPolicySpec) {
        use crate::ratelimit::{LimitDirection, LimitUnit};
        let r = ctx.r;
        let t = &spec.target_ref;
        let ns = t.namespace.clone().unwrap_or_else(|| ctx.ns.to_string());
        let route = match (t.group.as_str(), t.kind.as_str()) {
            ("", "Service") => {
                if ctx.service(Some(&ns), &t.name).is_none() {
                    self.at(
                        r,
                        "spec.targetRef.name",
                        format!("no Service {ns}/{}", t.name),
                    );
                }
                if t.section_name.is_some() {
                    self.at(
                        r,
                        "spec.targetRef.sectionName",
                        "only a route's rule can be named",
                    );
                }
                false
            }
            ("" | "gateway.networking.k8s.io", kind @ ("HTTPRoute" | "GRPCRoute")) => {
                match ctx.routes.get(&(kind, ns.clone(), t.name.clone())) {
                    None => self.at(
                        r,
                        "spec.targetRef.name",
                        format!("no {kind} {ns}/{}", t.name),
                    ),
                    Some(rules) => {
                        if let Some(section) = &t.section_name
                            && !rules.iter().any(|n| n.as_deref() == Some(section.as_str()))
                        {
                            self.at(
                                r,
                                "spec.targetRef.sectionName",
                                format!("{kind} {ns}/{} has no rule named {section:?}", t.name),
                            );
                        }
                    }
                }
                true
            }
            (g, k) => {
                self.at(
                    r,
                    "spec.targetRef.kind",
                    format!("a Service, HTTPRoute or GRPCRoute can be targeted, not {g}/{k}"),
                );
                false
            }
        };
        let inbound = spec.direction() == LimitDirection::Inbound;
        if route && inbound {
            self.at(
                r,
                "spec.direction",
                "a route's limit is enforced by its callers' sidecars, where routes are applied: use Outbound",
            );
        }
        if spec.limits.is_empty() {
            self.at(r, "spec.limits", "at least one limit");
        }
        let mut names = BTreeSet::new();
        for (i, l) in spec.limits.iter().enumerate() {
            let at = |f: &str| format!("spec.limits[{i}].{f}");
            if let Err(e) = check_name(&l.name) {
                self.at(r, &at("name"), e);
            } else if !names.insert(l.name.as_str()) {
                self.at(r, &at("name"), format!("duplicate limit name {:?}", l.name));
            }
            if l.rate == 0 {
                self.at(r, &at("rate"), "must be at least 1");
            }
            if l.burst == Some(0) {
                self.at(r, &at("burst"), "must be at least 1");
            }
            if l.per.get().is_zero() || l.per.get() > std::time::Duration::from_secs(3600) {
                self.at(r, &at("per"), "must be more than 0s and at most 1h");
            }
            let by_caller = l.per_source || l.from.is_some() || !l.overrides.is_empty();
            if by_caller && !inbound {
                self.at(
                    r,
                    &at(if l.per_source { "perSource" } else if l.from.is_some() { "from" } else { "overrides" }),
                    "an Outbound limit's caller is always the sidecar's own app; callers are told apart Inbound only",
                );
            }
            if l.unit == LimitUnit::Connections {
                if route {
                    self.at(r, &at("unit"), "a route sees requests, not connections");
                }
                if by_caller {
                    self.at(
                        r,
                        &at("unit"),
                        "a connection is limited before its caller is known: Connections limits take no perSource, from or overrides",
                    );
                }
            }
            if !l.overrides.is_empty() && !l.per_source {
                self.at(r, &at("overrides"), "overrides need perSource: true");
            }
            if let Some(from) = &l.from {
                self.source(r, &at("from"), from);
            }
            for (j, o) in l.overrides.iter().enumerate() {
                self.source(r, &at(&format!("overrides[{j}].from")), &o.from);
                if o.from.identities.is_empty() && o.from.namespaces.is_empty() {
                    self.at(
                        r,
                        &at(&format!("overrides[{j}].from")),
                        "name at least one identity or namespace",
                    );
                }
                if o.rate == 0 {
                    self.at(
                        r,
                        &at(&format!("overrides[{j}].rate")),
                        "must be at least 1",
                    );
                }
                if o.burst == Some(0) {
                    self.at(
                        r,
                        &at(&format!("overrides[{j}].burst")),
                        "must be at least 1",
                    );
                }
            }
        }
    }

    fn overload(&mut self, ctx: &Ctx, spec: &crate::ratelimit::OverloadPolicySpec) {
        let r = ctx.r;
        let t = &spec.target_ref;
        if t.kind != "Service" || !t.group.is_empty() {
            self.at(
                r,
                "spec.targetRef.kind",
                "only core Services can be targeted",
            );
        } else if t.namespace.as_deref().is_some_and(|ns| ns != ctx.ns) {
            self.at(
                r,
                "spec.targetRef.namespace",
                "a policy applies in its own namespace only",
            );
        } else if ctx.service(None, &t.name).is_none() {
            self.at(
                r,
                "spec.targetRef.name",
                format!("no Service {}/{}", ctx.ns, t.name),
            );
        }
        let a = &spec.adaptive_concurrency;
        if a.min_limit == 0 {
            self.at(r, "spec.adaptiveConcurrency.minLimit", "must be at least 1");
        }
        if a.max_limit < a.min_limit || a.max_limit > 100_000 {
            self.at(
                r,
                "spec.adaptiveConcurrency.maxLimit",
                "must be at least minLimit and at most 100000",
            );
        }
        if a.retry_after.get() < std::time::Duration::from_secs(1) {
            self.at(
                r,
                "spec.adaptiveConcurrency.retryAfter",
                "Retry-After counts whole seconds: at least 1s",
            );
        }
        let mut names = BTreeSet::new();
        for (i, c) in spec.priorities.iter().enumerate() {
            let at = |f: &str| format!("spec.priorities[{i}].{f}");
            if let Err(e) = check_name(&c.name) {
                self.at(r, &at("name"), e);
            } else if !names.insert(c.name.as_str()) {
                self.at(r, &at("name"), format!("duplicate class name {:?}", c.name));
            }
            if c.priority == crate::ratelimit::Priority::Normal {
                self.at(
                    r,
                    &at("priority"),
                    "High or Low (Normal is what an unmatched request gets)",
                );
            }
            for (j, m) in c.matches.iter().enumerate() {
                self.http_match(ctx, &at(&format!("matches[{j}]")), m);
            }
            if let Some(from) = &c.from {
                self.source(r, &at("from"), from);
            }
        }
    }

    /// Callers named by SPIFFE id or namespace.
    fn source(&mut self, r: &Located<Resource>, field: &str, from: &crate::authz::AuthzSource) {
        for (j, id) in from.identities.iter().enumerate() {
            let ok = id.strip_prefix("spiffe://").is_some_and(|rest| {
                let parts: Vec<&str> = rest.split('/').collect();
                matches!(parts.as_slice(), [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty())
            });
            if !ok {
                self.at(
                    r,
                    &format!("{field}.identities[{j}]"),
                    format!("{id:?} is not spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT"),
                );
            }
        }
        for (j, ns) in from.namespaces.iter().enumerate() {
            if let Err(e) = check_name(ns) {
                self.at(r, &format!("{field}.namespaces[{j}]"), e);
            }
        }
    }

    fn authorization(&mut self, ctx: &Ctx, spec: &crate::authz::AuthorizationPolicySpec) {
        let r = ctx.r;
        if let Some(t) = &spec.target_ref {
            if t.kind != "Service" || !t.group.is_empty() {
                self.at(
                    r,
                    "spec.targetRef.kind",
                    "only core Services can be targeted",
                );
            } else if t.namespace.as_deref().is_some_and(|ns| ns != ctx.ns) {
                self.at(
                    r,
                    "spec.targetRef.namespace",
                    "a policy applies in its own namespace only",
                );
            } else if ctx.service(None, &t.name).is_none() {
                self.at(
                    r,
                    "spec.targetRef.name",
                    format!("no Service {}/{}", ctx.ns, t.name),
                );
            }
        }
        if spec.rules.is_empty() {
            self.at(
                r,
                "spec.rules",
                "at least one rule (a rule with no conditions matches everything)",
            );
        }
        for (i, rule) in spec.rules.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{i}].{f}");
            if let Some(from) = &rule.from {
                self.source(r, &at("from"), from);
            }
            if let Some(to) = &rule.to {
                for (j, p) in to.paths.iter().enumerate() {
                    let body = p.strip_suffix("/*").unwrap_or(p);
                    if p != "*" && (!p.starts_with('/') || body.contains('*')) {
                        self.at(
                            r,
                            &at(&format!("to.paths[{j}]")),
                            format!("{p:?}: use an exact path (/a/b), a prefix (/a/*) or *"),
                        );
                    } else if let Err(e) = authz_path_canonical(p) {
                        self.at(r, &at(&format!("to.paths[{j}]")), e);
                    }
                }
                for (j, m) in to.methods.iter().enumerate() {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                        self.at(
                            r,
                            &at(&format!("to.methods[{j}]")),
                            format!("{m:?} is not an HTTP method (uppercase, for example GET)"),
                        );
                    }
                }
                for (j, h) in to.headers.iter().enumerate() {
                    if http_header_name(&h.name).is_err() {
                        self.at(
                            r,
                            &at(&format!("to.headers[{j}].name")),
                            format!("{:?} is not a valid header name", h.name),
                        );
                    }
                    if h.values.is_empty() {
                        self.at(
                            r,
                            &at(&format!("to.headers[{j}].values")),
                            "at least one value",
                        );
                    }
                }
                if to.ports.contains(&0) {
                    self.at(r, &at("to.ports"), "ports are 1-65535");
                }
            }
            if let Some(w) = &rule.when {
                let start = crate::authz::parse_hhmm(&w.start);
                let end = crate::authz::parse_hhmm(&w.end);
                if start.is_none() {
                    self.at(r, &at("when.start"), format!("{:?} is not HH:MM", w.start));
                }
                if end.is_none() {
                    self.at(r, &at("when.end"), format!("{:?} is not HH:MM", w.end));
                }
                if start.is_some() && start == end {
                    self.at(r, &at("when.end"), "the window is empty (start equals end)");
                }
                if jiff::tz::TimeZone::get(&w.time_zone).is_err() {
                    self.at(
                        r,
                        &at("when.timeZone"),
                        format!("unknown time zone {:?}", w.time_zone),
                    );
                }
            }
        }
    }
}

struct Ctx<'a> {
    r: &'a Located<Resource>,
    services: &'a BTreeMap<(String, String), &'a ServiceSpec>,
    /// Every `FaultInjection`, as `(namespace, name)`.
    faults: &'a BTreeSet<(String, String)>,
    /// Every route, as `(kind, namespace, name)`, with its rules' names.
    routes: &'a BTreeMap<(&'a str, String, String), Vec<Option<String>>>,
    ns: &'a str,
}

impl Ctx<'_> {
    fn service(&self, ns: Option<&str>, name: &str) -> Option<&ServiceSpec> {
        self.services
            .get(&(ns.unwrap_or(self.ns).to_string(), name.to_string()))
            .copied()
    }
}

fn http_header_name(name: &str) -> Result<(), ()> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok { Ok(()) } else { Err(()) }
}

/// Why a path that is compared with request paths may not be written non-canonically.
const NEVER_MATCHES: &str =
    "requests are made canonical before anything matches them, so it would never match";
/// Why a path the proxy sends may not be written non-canonically.
const SENT_AS_WRITTEN: &str =
    "the proxy sends it as written, and the app would see a path no policy was written for";

/// Checks that `path` is in the one form the proxy gives request paths (`crate::path`), so
/// that a rule or a rewrite means what it says. The error names the canonical spelling.
fn path_canonical(path: &str, why: &str) -> Result<(), String> {
    match crate::path::normalize(path) {
        Ok(c) if c == path => Ok(()),
        Ok(c) => Err(format!(
            "{path:?} is not a canonical path ({why}); use {c:?} instead"
        )),
        Err(e) => Err(format!(
            "{path:?} is not a valid request path ({e}); the proxy refuses such requests with 400"
        )),
    }
}

/// [`path_canonical`] for an `AuthorizationPolicy` path (already known to start with `/` or
/// be `*`): `*`, an exact path, or a prefix `/a/*` whose `/a` is canonical and has no
/// trailing slash (`/a//*` would match only `/a/`).
fn authz_path_canonical(pattern: &str) -> Result<(), String> {
    let Some(body) = pattern.strip_suffix("/*") else {
        return if pattern == "*" {
            Ok(())
        } else {
            path_canonical(pattern, NEVER_MATCHES)
        };
    };
    if body.is_empty() {
        return Ok(());
    }
    match crate::path::normalize(body) {
        Ok(c) => {
            let want = format!("{}/*", c.trim_end_matches('/'));
            if want == pattern {
                Ok(())
            } else {
                Err(format!(
                    "{pattern:?} is not a canonical path ({NEVER_MATCHES}); use {want:?} instead"
                ))
            }
        }
        Err(e) => Err(format!(
            "{pattern:?} is not a valid request path ({e}); the proxy refuses such requests with 400"
        )),
    }
}

fn header_value_ok(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

impl Validator {
    fn at(&mut self, r: &Located<Resource>, field: &str, message: impl Into<String>) {
        self.out.push(r.diagnostic(field, message));
    }

    fn addr(&mut self, r: &Located<Resource>, field: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.at(r, field, format!("{text:?} is not an IP:PORT address"));
                None
            }
        }
    }

    fn proxy(&mut self, ctx: &Ctx, p: &Object<crate::proxy::ProxySpec>) {
        let r = ctx.r;
        let s = &p.spec;
        let mut bound: BTreeMap<SocketAddr, String> = BTreeMap::new();
        let mut names = BTreeSet::new();
        let mut bind = |v: &mut Self, field: String, text: &str| {
            // Port 0 asks the OS for any free port, so it never conflicts.
            if let Some(a) = v.addr(r, &field, text)
                && a.port() != 0
                && let Some(prev) = bound.insert(a, field.clone())
            {
                v.at(r, &field, format!("address {a} is already used by {prev}"));
            }
        };
        bind(self, "spec.admin.address".into(), &s.admin.address);
        for (i, l) in s.inbound.iter().enumerate() {
            bind(self, format!("spec.inbound[{i}].address"), &l.address);
            self.addr(r, &format!("spec.inbound[{i}].forwardTo"), &l.forward_to);
            if let Some(svc) = &l.service
                && ctx.service(None, svc).is_none()
            {
                self.at(
                    r,
                    &format!("spec.inbound[{i}].service"),
                    format!("no Service {}/{svc}", ctx.ns),
                );
            }
            if l.service_port.is_some() && l.service.is_none() {
                self.at(
                    r,
                    &format!("spec.inbound[{i}].servicePort"),
                    "servicePort needs `service`",
                );
            }
            if !names.insert(l.name.clone()) {
                self.at(
                    r,
                    &format!("spec.inbound[{i}].name"),
                    format!("duplicate listener name {:?}", l.name),
                );
            }
        }
        for (i, l) in s.outbound.iter().enumerate() {
            bind(self, format!("spec.outbound[{i}].address"), &l.address);
            if !names.insert(l.name.clone()) {
                self.at(
                    r,
                    &format!("spec.outbound[{i}].name"),
                    format!("duplicate listener name {:?}", l.name),
                );
            }
            match (&l.service, l.http_proxy) {
                (Some(_), true) | (None, false) => self.at(
                    r,
                    &format!("spec.outbound[{i}]"),
                    "set exactly one of `service` and `httpProxy: true`",
                ),
                (Some(t), false) => match ctx.service(t.namespace.as_deref(), &t.name) {
                    None => self.at(
                        r,
                        &format!("spec.outbound[{i}].service.name"),
                        format!(
                            "no Service {}/{}",
                            t.namespace.as_deref().unwrap_or(ctx.ns),
                            t.name
                        ),
                    ),
                    Some(svc) => match t.port {
                        Some(port) if !svc.ports.iter().any(|p| p.port == port) => self.at(
                            r,
                            &format!("spec.outbound[{i}].service.port"),
                            format!("Service {} has no port {port}", t.name),
                        ),
                        None if svc.ports.len() > 1 => self.at(
                            r,
                            &format!("spec.outbound[{i}].service.port"),
                            format!("Service {} has several ports; name one", t.name),
                        ),
                        _ => {}
                    },
                },
                (None, true) => {}
            }
        }
        if s.detect_timeout.get().is_zero()
            || s.detect_timeout.get() > std::time::Duration::from_secs(10)
        {
            self.at(r, "spec.detectTimeout", "must be between 1ms and 10s");
        }
        if s.connect_timeout.get().is_zero() {
            self.at(r, "spec.connectTimeout", "must be more than 0s");
        }
        if s.client_idle_timeout.get() < std::time::Duration::from_millis(100) {
            self.at(r, "spec.clientIdleTimeout", "must be at least 100ms");
        }
        let at_least_100ms = [
            ("spec.tcpIdleTimeout", s.tcp_idle_timeout),
            ("spec.firstByteTimeout", s.first_byte_timeout),
            ("spec.streamIdleTimeout", s.stream_idle_timeout),
        ];
        for (field, d) in at_least_100ms {
            if d.get() < std::time::Duration::from_millis(100) {
                self.at(r, field, "must be at least 100ms");
            }
        }
        if s.max_connections == Some(0) {
            self.at(r, "spec.maxConnections", "must be at least 1");
        }
        if s.max_connections_per_listener == Some(0) {
            self.at(r, "spec.maxConnectionsPerListener", "must be at least 1");
        }
        if !(1..=10_000).contains(&s.upstream_http2_max_streams) {
            self.at(
                r,
                "spec.upstreamHttp2MaxStreams",
                "must be between 1 and 10000",
            );
        }
        if !(1..=1_000).contains(&s.upstream_http2_max_connections) {
            self.at(
                r,
                "spec.upstreamHttp2MaxConnections",
                "must be between 1 and 1000",
            );
        }
    }

    /// `spec.locality` and `spec.fallback` of a `BackendPolicy`; records the fallback for the
    /// cycle check.
    fn locality<'a>(
        &mut self,
        ctx: &Ctx<'a>,
        spec: &crate::policy::BackendPolicySpec,
        fallbacks: &mut Fallbacks<'a>,
    ) {
        let r = ctx.r;
        let f = spec.locality.overprovisioning_factor;
        if !(f.is_finite() && f >= 1.0) {
            self.at(
                r,
                "spec.locality.overprovisioningFactor",
                format!("must be a number of at least 1.0, not {f}"),
            );
        }
        let Some(fb) = &spec.fallback else { return };
        let t = &spec.target_ref;
        let target = (
            t.namespace.clone().unwrap_or_else(|| ctx.ns.to_string()),
            t.name.clone(),
        );
        let to = (
            fb.namespace.clone().unwrap_or_else(|| ctx.ns.to_string()),
            fb.name.clone(),
        );
        if to == target {
            self.at(
                r,
                "spec.fallback.name",
                format!("{}/{} cannot be its own fallback", to.0, to.1),
            );
            return;
        }
        let Some(svc) = ctx.service(Some(&to.0), &to.1) else {
            self.at(
                r,
                "spec.fallback.name",
                format!("no Service {}/{}", to.0, to.1),
            );
            return;
        };
        if let Some(p) = fb.port
            && !svc.ports.iter().any(|sp| sp.port == p)
        {
            self.at(
                r,
                "spec.fallback.port",
                format!("Service {}/{} has no port {p}", to.0, to.1),
            );
        }
        fallbacks.insert(target, (to, r));
    }

    fn service(&mut self, ctx: &Ctx, s: &Object<ServiceSpec>) {
        let r = ctx.r;
        if s.spec.ports.is_empty() {
            self.at(r, "spec.ports", "a Service needs at least one port");
        }
        let mut ports = BTreeSet::new();
        let mut names = BTreeSet::new();
        for (i, p) in s.spec.ports.iter().enumerate() {
            if p.port == 0 {
                self.at(r, &format!("spec.ports[{i}].port"), "must be 1-65535");
            }
            if !ports.insert(p.port) {
                self.at(
                    r,
                    &format!("spec.ports[{i}].port"),
                    format!("duplicate port {}", p.port),
                );
            }
            // A route's `sectionName` names a port by its name.
            if let Some(name) = &p.name
                && !names.insert(name)
            {
                self.at(
                    r,
                    &format!("spec.ports[{i}].name"),
                    format!("duplicate port name {name:?}"),
                );
            }
        }
        let mut addrs = BTreeSet::new();
        for (i, e) in s.spec.endpoints.iter().enumerate() {
            if let Some(a) = self.addr(r, &format!("spec.endpoints[{i}].address"), &e.address)
                && !addrs.insert(a)
            {
                self.at(
                    r,
                    &format!("spec.endpoints[{i}].address"),
                    format!("duplicate endpoint {a}"),
                );
            }
            if e.weight > 1_000_000 {
                self.at(
                    r,
                    &format!("spec.endpoints[{i}].weight"),
                    "must be at most 1000000",
                );
            }
        }
    }

    fn parents(&mut self, ctx: &Ctx, parents: &[ParentRef]) {
        if parents.is_empty() {
            self.at(
                ctx.r,
                "spec.parentRefs",
                "a mesh route needs at least one Service parent",
            );
        }
        for (i, p) in parents.iter().enumerate() {
            let f = format!("spec.parentRefs[{i}]");
            if let Some((field, e)) = crate::attach::parent_kind_problem(p) {
                self.at(ctx.r, &format!("{f}.{field}"), e);
                continue;
            }
            let ns = p.namespace.as_deref().unwrap_or(ctx.ns);
            match ctx.service(Some(ns), &p.name) {
                None => self.at(
                    ctx.r,
                    &format!("{f}.name"),
                    format!("no Service {ns}/{}", p.name),
                ),
                Some(svc) => {
                    // Refused here; the spec's answer would be Accepted=False on this parent.
                    if let Err(e) = crate::attach::parent_ports(p, &format!("{ns}/{}", p.name), svc)
                    {
                        self.at(ctx.r, &format!("{f}.{}", e.field()), e.to_string());
                    }
                }
            }
        }
    }

    /// A reference that does not resolve (another kind, a Service that does not exist) is
    /// valid, as the Gateway API specifies: the route's status says `ResolvedRefs: False`
    /// (`crate::status`) and the proxy answers 500 for that backend's share.
    fn backend(&mut self, ctx: &Ctx, field: &str, b: &BackendRef) {
        if b.kind != "Service" || !b.group.is_empty() {
            return;
        }
        match (ctx.service(b.namespace.as_deref(), &b.name), b.port) {
            (_, None) => self.at(
                ctx.r,
                &format!("{field}.port"),
                "a Service backend needs a port",
            ),
            (Some(svc), Some(port)) if !svc.ports.iter().any(|sp| sp.port == port) => self.at(
                ctx.r,
                &format!("{field}.port"),
                format!("Service {} has no port {port}", b.name),
            ),
            _ => {}
        }
    }

    fn backends(&mut self, ctx: &Ctx, field: &str, refs: &[HttpBackendRef], grpc: bool) {
        for (i, b) in refs.iter().enumerate() {
            let f = format!("{field}.backendRefs[{i}]");
            self.backend(ctx, &f, &b.backend());
            if b.weight > 1_000_000 {
                self.at(ctx.r, &format!("{f}.weight"), "must be at most 1000000");
            }
            self.filters(ctx, &f, &b.filters, None, grpc);
        }
    }

    fn regex(&mut self, ctx: &Ctx, field: &str, pattern: &str) {
        if let Err(e) = regex::Regex::new(pattern) {
            let msg = e.to_string();
            let last = msg.lines().last().unwrap_or("invalid").trim().to_string();
            self.at(
                ctx.r,
                field,
                format!("invalid regular expression {pattern:?}: {last}"),
            );
        }
    }

    fn value_matches(&mut self, ctx: &Ctx, field: &str, list: &[HeaderMatch], headers: bool) {
        // Repeated names are allowed: the spec has the first of each count, the rest ignored.
        for (i, h) in list.iter().enumerate() {
            let f = format!("{field}[{i}]");
            if headers && http_header_name(&h.name).is_err() {
                self.at(
                    ctx.r,
                    &format!("{f}.name"),
                    format!("{:?} is not a valid header name", h.name),
                );
            }
            if h.kind == ValueMatchType::RegularExpression {
                self.regex(ctx, &format!("{f}.value"), &h.value);
            }
        }
    }

    fn path_modifier(
        &mut self,
        ctx: &Ctx,
        field: &str,
        p: &PathModifier,
        prefix_matched: Option<bool>,
    ) {
        match p.kind {
            PathModifierType::ReplaceFullPath => match &p.replace_full_path {
                Some(v) if v.starts_with('/') => {
                    if let Err(e) = path_canonical(v, SENT_AS_WRITTEN) {
                        self.at(ctx.r, &format!("{field}.replaceFullPath"), e);
                    }
                }
                _ => self.at(
                    ctx.r,
                    &format!("{field}.replaceFullPath"),
                    "required, and must start with '/'",
                ),
            },
            PathModifierType::ReplacePrefixMatch => {
                match &p.replace_prefix_match {
                    // The Gateway API allows "": the matched prefix is removed.
                    Some(v) if v.is_empty() => {}
                    Some(v) if v.starts_with('/') => {
                        if let Err(e) = path_canonical(v, SENT_AS_WRITTEN) {
                            self.at(ctx.r, &format!("{field}.replacePrefixMatch"), e);
                        }
                    }
                    _ => self.at(
                        ctx.r,
                        &format!("{field}.replacePrefixMatch"),
                        "required, and must be empty or start with '/'",
                    ),
                }
                if prefix_matched == Some(false) {
                    self.at(
                        ctx.r,
                        &format!("{field}.type"),
                        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
                    );
                }
            }
        }
    }

    /// `prefix_matched`: for rule-level filters of HTTP rules, whether every match is a prefix
    /// match (ReplacePrefixMatch needs that); `None` where it cannot apply.
    fn filters(
        &mut self,
        ctx: &Ctx,
        field: &str,
        filters: &[HttpRouteFilter],
        prefix_matched: Option<bool>,
        grpc: bool,
    ) {
        let mut redirect = false;
        let mut rewrite = false;
        let mut kinds = BTreeSet::new();
        for (i, f) in filters.iter().enumerate() {
            let ff = format!("{field}.filters[{i}]");
            let set = [
                (
                    FilterType::RequestHeaderModifier,
                    f.request_header_modifier.is_some(),
                    "requestHeaderModifier",
                ),
                (
                    FilterType::ResponseHeaderModifier,
                    f.response_header_modifier.is_some(),
                    "responseHeaderModifier",
                ),
                (
                    FilterType::RequestRedirect,
                    f.request_redirect.is_some(),
                    "requestRedirect",
                ),
                (
                    FilterType::UrlRewrite,
                    f.url_rewrite.is_some(),
                    "urlRewrite",
                ),
                (
                    FilterType::RequestMirror,
                    f.request_mirror.is_some(),
                    "requestMirror",
                ),
                (
                    FilterType::ExtensionRef,
                    f.extension_ref.is_some(),
                    "extensionRef",
                ),
                (FilterType::Cors, f.cors.is_some(), "cors"),
            ];
            for (kind, present, name) in set {
                if kind == f.kind && !present {
                    self.at(
                        ctx.r,
                        &ff,
                        format!("type {kind:?} needs the `{name}` field"),
                    );
                } else if kind != f.kind && present {
                    self.at(
                        ctx.r,
                        &format!("{ff}.{name}"),
                        format!("does not belong to a filter of type {:?}", f.kind),
                    );
                }
            }
            if grpc
                && matches!(
                    f.kind,
                    FilterType::RequestRedirect | FilterType::UrlRewrite | FilterType::Cors
                )
            {
                self.at(ctx.r, &format!("{ff}.type"), "GRPCRoute supports RequestHeaderModifier, ResponseHeaderModifier, RequestMirror and ExtensionRef");
            }
            if let Some(e) = &f.extension_ref {
                self.extension_ref(ctx, &ff, e, field.contains(".backendRefs["));
            }
            // A backend's filters run once it is chosen: too late to answer for the rule.
            if field.contains(".backendRefs[")
                && matches!(f.kind, FilterType::RequestRedirect | FilterType::Cors)
            {
                let name = if f.kind == FilterType::Cors {
                    "CORS"
                } else {
                    "RequestRedirect"
                };
                self.at(
                    ctx.r,
                    &ff,
                    format!("{name} is not supported on a backendRef; set it on the rule"),
                );
            }
            if let Some(c) = &f.cors {
                for (cf, e) in c.problems() {
                    self.at(ctx.r, &format!("{ff}.cors.{cf}"), e);
                }
            }
            if f.kind != FilterType::RequestMirror && !kinds.insert(f.kind) {
                self.at(
                    ctx.r,
                    &format!("{ff}.type"),
                    format!("{:?} may appear only once per rule", f.kind),
                );
            }
            for (m, name) in [
                (&f.request_header_modifier, "requestHeaderModifier"),
                (&f.response_header_modifier, "responseHeaderModifier"),
            ] {
                let Some(m) = m else { continue };
                let mut seen = BTreeSet::new();
                for (j, h) in m.set.iter().chain(&m.add).enumerate() {
                    if http_header_name(&h.name).is_err() {
                        self.at(
                            ctx.r,
                            &format!("{ff}.{name}"),
                            format!("{:?} is not a valid header name", h.name),
                        );
                    }
                    if !header_value_ok(&h.value) {
                        self.at(
                            ctx.r,
                            &format!("{ff}.{name}"),
                            format!("header {:?} has a control character in its value", h.name),
                        );
                    }
                    if !seen.insert(h.name.to_ascii_lowercase()) && j < m.set.len() {
                        self.at(
                            ctx.r,
                            &format!("{ff}.{name}.set"),
                            format!("header {:?} is set twice", h.name),
                        );
                    }
                }
                for r in &m.remove {
                    if http_header_name(r).is_err() {
                        self.at(
                            ctx.r,
                            &format!("{ff}.{name}.remove"),
                            format!("{r:?} is not a valid header name"),
                        );
                    }
                }
            }
            if let Some(rd) = &f.request_redirect {
                redirect = true;
                if let Some(s) = &rd.scheme
                    && s != "http"
                    && s != "https"
                {
                    self.at(
                        ctx.r,
                        &format!("{ff}.requestRedirect.scheme"),
                        "must be http or https",
                    );
                }
                if rd.port == Some(0) {
                    self.at(
                        ctx.r,
                        &format!("{ff}.requestRedirect.port"),
                        "must be 1-65535",
                    );
                }
                if let Some(Err(e)) = rd.hostname.as_deref().map(crate::cors::precise_hostname) {
                    self.at(ctx.r, &format!("{ff}.requestRedirect.hostname"), e);
                }
                if ![301, 302, 303, 307, 308].contains(&rd.status_code) {
                    self.at(
                        ctx.r,
                        &format!("{ff}.requestRedirect.statusCode"),
                        "must be 301, 302, 303, 307 or 308",
                    );
                }
                if let Some(p) = &rd.path {
                    self.path_modifier(
                        ctx,
                        &format!("{ff}.requestRedirect.path"),
                        p,
                        prefix_matched,
                    );
                }
            }
            if let Some(rw) = &f.url_rewrite {
                rewrite = true;
                if let Some(Err(e)) = rw.hostname.as_deref().map(crate::cors::precise_hostname) {
                    self.at(ctx.r, &format!("{ff}.urlRewrite.hostname"), e);
                }
                if let Some(p) = &rw.path {
                    self.path_modifier(ctx, &format!("{ff}.urlRewrite.path"), p, prefix_matched);
                }
            }
            if let Some(m) = &f.request_mirror {
                self.backend(
                    ctx,
                    &format!("{ff}.requestMirror.backendRef"),
                    &m.backend_ref,
                );
                if m.percent.is_some() && m.fraction.is_some() {
                    self.at(
                        ctx.r,
                        &format!("{ff}.requestMirror"),
                        "set percent or fraction, not both",
                    );
                }
                if m.percent.is_some_and(|p| p > 100) {
                    self.at(
                        ctx.r,
                        &format!("{ff}.requestMirror.percent"),
                        "must be 0-100",
                    );
                }
                if let Some(fr) = &m.fraction
                    && (fr.denominator == 0 || fr.numerator > fr.denominator)
                {
                    self.at(
                        ctx.r,
                        &format!("{ff}.requestMirror.fraction"),
                        "needs denominator > 0 and numerator <= denominator",
                    );
                }
            }
        }
        if redirect && rewrite {
            self.at(
                ctx.r,
                &format!("{field}.filters"),
                "RequestRedirect and URLRewrite cannot be used together",
            );
        }
    }

    /// What the Gateway API forbids across an HTTP rule: a redirect with backends, and a
    /// backend's `ReplacePrefixMatch` rewrite unless every match is a prefix match.
    fn filter_combinations(
        &mut self,
        ctx: &Ctx,
        field: &str,
        filters: &[HttpRouteFilter],
        backends: &[HttpBackendRef],
        all_prefix: bool,
    ) {
        for (i, f) in filters.iter().enumerate() {
            if f.kind == FilterType::RequestRedirect && !backends.is_empty() {
                self.at(
                    ctx.r,
                    &format!("{field}.filters[{i}]"),
                    "RequestRedirect cannot be used together with backendRefs: the redirect answers every request of the rule",
                );
            }
        }
        for (j, b) in backends.iter().enumerate() {
            for (k, f) in b.filters.iter().enumerate() {
                let prefix = f.url_rewrite.as_ref().and_then(|r| r.path.as_ref());
                if !all_prefix
                    && prefix.is_some_and(|p| p.kind == PathModifierType::ReplacePrefixMatch)
                {
                    self.at(
                        ctx.r,
                        &format!("{field}.backendRefs[{j}].filters[{k}].urlRewrite.path.type"),
                        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
                    );
                }
            }
        }
    }

    /// An `ExtensionRef` filter: only a `FaultInjection` of the route's namespace, on a
    /// rule (a fault applies before a backend is chosen).
    fn extension_ref(
        &mut self,
        ctx: &Ctx,
        field: &str,
        e: &crate::route::LocalObjectReference,
        on_backend: bool,
    ) {
        let fault = crate::Kind::FaultInjection.as_str();
        if e.group != crate::fault::GROUP || e.kind != fault {
            self.at(
                ctx.r,
                &format!("{field}.extensionRef.kind"),
                format!(
                    "only {}/{fault} is supported, not {}/{}",
                    crate::fault::GROUP,
                    e.group,
                    e.kind
                ),
            );
            return;
        }
        if on_backend {
            self.at(
                ctx.r,
                &format!("{field}.type"),
                "a FaultInjection applies to a rule's filters, not a backend's",
            );
        }
        if !ctx.faults.contains(&(ctx.ns.to_string(), e.name.clone())) {
            let rule = field.split(".filters").next().unwrap_or(field);
            self.at(
                ctx.r,
                &format!("{field}.extensionRef.name"),
                format!(
                    "{} {rule} references FaultInjection {}/{}, which does not exist",
                    ctx.r.value.key(),
                    ctx.ns,
                    e.name
                ),
            );
        }
    }

    fn telemetry(&mut self, ctx: &Ctx, spec: &crate::telemetry::TelemetrySpec) {
        use crate::telemetry::{ACCESS_LOG_FIELDS, MAX_QUEUE};
        let r = ctx.r;
        if let Some(s) = &spec.service
            && let Err(e) = check_name(s)
        {
            self.at(r, "spec.service", e);
        }
        if let Some(t) = &spec.tracing {
            match (&t.collector, t.enabled) {
                (None, true) => self.at(
                    r,
                    "spec.tracing.collector",
                    "required when tracing is enabled (http://HOST:PORT)",
                ),
                (Some(c), _) => {
                    if !crate::telemetry::collector_ok(c) {
                        self.at(
                            r,
                            "spec.tracing.collector",
                            format!("{c:?} is not http://HOST:PORT"),
                        );
                    }
                }
                (None, false) => {}
            }
            if !(t.sampling_percent.is_finite() && (0.0..=100.0).contains(&t.sampling_percent)) {
                self.at(r, "spec.tracing.samplingPercent", "must be 0-100");
            }
            if t.propagation.is_empty() {
                self.at(r, "spec.tracing.propagation", "name at least one format");
            }
            if !(1..=MAX_QUEUE).contains(&t.queue_size) {
                self.at(
                    r,
                    "spec.tracing.queueSize",
                    format!("must be 1-{MAX_QUEUE}"),
                );
            }
            if t.batch_size == 0 || t.batch_size > t.queue_size {
                self.at(r, "spec.tracing.batchSize", "must be 1-queueSize");
            }
            if t.flush_interval.get().is_zero() {
                self.at(r, "spec.tracing.flushInterval", "must be more than 0s");
            }
        }
        if let Some(l) = &spec.access_log {
            if l.path != "stdout" && !l.path.starts_with('/') {
                self.at(
                    r,
                    "spec.accessLog.path",
                    format!("{:?} is neither stdout nor an absolute path", l.path),
                );
            }
            for (i, f) in l.fields.iter().enumerate() {
                if !ACCESS_LOG_FIELDS.contains(&f.as_str()) {
                    self.at(
                        r,
                        &format!("spec.accessLog.fields[{i}]"),
                        format!(
                            "unknown field {f:?}; known: {}",
                            ACCESS_LOG_FIELDS.join(", ")
                        ),
                    );
                }
            }
            if !(1..=MAX_QUEUE).contains(&l.queue_size) {
                self.at(
                    r,
                    "spec.accessLog.queueSize",
                    format!("must be 1-{MAX_QUEUE}"),
                );
            }
        }
    }

    fn fault(&mut self, ctx: &Ctx, spec: &crate::fault::FaultInjectionSpec) {
        let r = ctx.r;
        if spec.delay.is_none() && spec.abort.is_none() {
            self.at(r, "spec", "set delay, abort or both");
        }
        let share = |p: f64| p.is_finite() && (0.0..=100.0).contains(&p);
        if let Some(d) = &spec.delay {
            if d.fixed_delay.get().is_zero() {
                self.at(r, "spec.delay.fixedDelay", "must be more than 0s");
            }
            if !share(d.percentage) {
                self.at(r, "spec.delay.percentage", "must be 0-100");
            }
        }
        if let Some(a) = &spec.abort {
            if !share(a.percentage) {
                self.at(r, "spec.abort.percentage", "must be 0-100");
            }
            match (a.http_status, a.grpc_status) {
                (Some(s), None) if !(200..=599).contains(&s) => {
                    self.at(r, "spec.abort.httpStatus", "must be 200-599")
                }
                (None, Some(s)) if !(1..=16).contains(&s) => self.at(
                    r,
                    "spec.abort.grpcStatus",
                    "must be a gRPC status code 1-16 (0 is OK, not an abort)",
                ),
                (Some(_), None) | (None, Some(_)) => {}
                _ => self.at(
                    r,
                    "spec.abort",
                    "set exactly one of httpStatus and grpcStatus",
                ),
            }
        }
    }

    /// One HTTPRoute match; whether its path is a prefix (or left out).
    fn http_match(&mut self, ctx: &Ctx, mf: &str, m: &crate::route::HttpRouteMatch) -> bool {
        let mut prefix = true;
        if let Some(p) = &m.path {
            match p.kind {
                PathMatchType::Exact | PathMatchType::PathPrefix => {
                    if !p.value.starts_with('/') {
                        self.at(ctx.r, &format!("{mf}.path.value"), "must start with '/'");
                    } else if let Err(e) = path_canonical(&p.value, NEVER_MATCHES) {
                        self.at(ctx.r, &format!("{mf}.path.value"), e);
                    }
                }
                PathMatchType::RegularExpression => {
                    self.regex(ctx, &format!("{mf}.path.value"), &p.value)
                }
            }
            prefix = p.kind == PathMatchType::PathPrefix;
        }
        self.value_matches(ctx, &format!("{mf}.headers"), &m.headers, true);
        self.value_matches(ctx, &format!("{mf}.queryParams"), &m.query_params, false);
        if let Some(method) = &m.method
            && ![
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
            ]
            .contains(&method.as_str())
        {
            self.at(
                ctx.r,
                &format!("{mf}.method"),
                format!("{method:?} is not an HTTP method (use upper case)"),
            );
        }
        prefix
    }

    fn http_route(&mut self, ctx: &Ctx, spec: &HttpRouteSpec) {
        self.parents(ctx, &spec.parent_refs);
        for (i, rule) in spec.rules.iter().enumerate() {
            let field = format!("spec.rules[{i}]");
            let mut all_prefix = true;
            for (j, m) in rule.matches.iter().enumerate() {
                let mf = format!("{field}.matches[{j}]");
                all_prefix &= self.http_match(ctx, &mf, m);
            }
            self.filters(ctx, &field, &rule.filters, Some(all_prefix), false);
            self.filter_combinations(ctx, &field, &rule.filters, &rule.backend_refs, all_prefix);
            self.backends(ctx, &field, &rule.backend_refs, false);
            for (f, e) in rule.retry.iter().flat_map(|p| p.problems()) {
                self.at(ctx.r, &format!("{field}.retry.{f}"), e);
            }
            self.timeouts(ctx, &field, rule.timeouts.as_ref());
            self.session(ctx, &field, rule.session_persistence.as_ref());
        }
    }

    fn timeouts(&mut self, ctx: &Ctx, field: &str, t: Option<&crate::route::HttpRouteTimeouts>) {
        if let Some(t) = t
            && let (Some(req), Some(be)) = (t.request, t.backend_request)
            && !req.get().is_zero()
            && be > req
        {
            self.at(
                ctx.r,
                &format!("{field}.timeouts.backendRequest"),
                "must not exceed timeouts.request",
            );
        }
    }

    fn session(&mut self, ctx: &Ctx, field: &str, s: Option<&crate::session::SessionPersistence>) {
        for (f, e) in s.iter().flat_map(|s| s.problems()) {
            self.at(ctx.r, &format!("{field}.sessionPersistence.{f}"), e);
        }
    }

    fn grpc_route(&mut self, ctx: &Ctx, spec: &GrpcRouteSpec) {
        self.parents(ctx, &spec.parent_refs);
        for (i, rule) in spec.rules.iter().enumerate() {
            let field = format!("spec.rules[{i}]");
            for (j, m) in rule.matches.iter().enumerate() {
                let mf = format!("{field}.matches[{j}]");
                if let Some(mm) = &m.method {
                    if mm.service.is_none() && mm.method.is_none() {
                        self.at(
                            ctx.r,
                            &format!("{mf}.method"),
                            "set service, method or both",
                        );
                    }
                    for (v, name) in [(&mm.service, "service"), (&mm.method, "method")] {
                        let Some(v) = v else { continue };
                        match mm.kind {
                            ValueMatchType::RegularExpression => {
                                self.regex(ctx, &format!("{mf}.method.{name}"), v)
                            }
                            ValueMatchType::Exact => {
                                let ok = !v.is_empty()
                                    && v.chars().all(|c| {
                                        c.is_ascii_alphanumeric()
                                            || c == '_'
                                            || (c == '.' && name == "service")
                                    });
                                if !ok {
                                    self.at(
                                        ctx.r,
                                        &format!("{mf}.method.{name}"),
                                        format!("{v:?} is not a valid gRPC {name} name"),
                                    );
                                }
                            }
                        }
                    }
                }
                self.value_matches(ctx, &format!("{mf}.headers"), &m.headers, true);
            }
            self.filters(ctx, &field, &rule.filters, None, true);
            self.backends(ctx, &field, &rule.backend_refs, true);
            self.timeouts(ctx, &field, rule.timeouts.as_ref());
            self.session(ctx, &field, rule.session_persistence.as_ref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_documents;

    const BASE: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  ports: [{port: 8080}]
  endpoints: [{address: 127.0.0.1:9001}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2}
spec:
  ports: [{port: 8080}]
";

    pub(super) fn check(extra: &str) -> Result<(), Diagnostics> {
        let text = format!("{BASE}---\n{extra}");
        validate(
            &parse_documents("t.yaml", &text)
                .map_err(|e| panic!("parse: {e}"))
                .unwrap(),
        )
    }

    #[test]
    fn rate_limits_and_overload_policies_are_refused_at_their_field() {
        let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{kind: Service, name: catalog}]\n  rules:\n    - name: api\n      backendRefs: [{name: catalog, port: 8080}]\n---\n";
        let rl = |spec: &str| {
            format!(
                "{route}apiVersion: trellis.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  {spec}\n"
            )
        };
        let ol = |spec: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: OverloadPolicy\nmetadata: {{name: o}}\nspec:\n  {spec}\n"
            )
        };
        let id = "spiffe://td/ns/default/sa/web";
        let ok = [
            rl("{targetRef: {name: catalog}, limits: [{name: a, rate: 10}]}"),
            rl(&format!(
                "{{targetRef: {{name: catalog}}, limits: [{{name: a, rate: 10, perSource: true, scope: Global, overrides: [{{from: {{identities: [{id}]}}, rate: 50}}]}}]}}"
            )),
            rl(
                "{targetRef: {kind: HTTPRoute, name: r, sectionName: api}, limits: [{name: a, rate: 10}]}",
            ),
            rl(
                "{targetRef: {name: catalog}, direction: Outbound, limits: [{name: c, rate: 10, unit: Connections}]}",
            ),
            ol("{targetRef: {name: catalog}}"),
            ol(
                "{targetRef: {name: catalog}, priorities: [{name: hi, priority: High, matches: [{path: {type: PathPrefix, value: /checkout}}]}]}",
            ),
        ];
        for text in &ok {
            check(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        let cases: &[(String, &str, &str)] = &[
            (
                rl("{targetRef: {name: nope}, limits: [{name: a, rate: 1}]}"),
                "spec.targetRef.name",
                "no Service default/nope",
            ),
            (
                rl(
                    "{targetRef: {kind: HTTPRoute, name: r, sectionName: x}, limits: [{name: a, rate: 1}]}",
                ),
                "spec.targetRef.sectionName",
                "no rule named \"x\"",
            ),
            (
                rl(
                    "{targetRef: {kind: HTTPRoute, name: r}, direction: Inbound, limits: [{name: a, rate: 1}]}",
                ),
                "spec.direction",
                "use Outbound",
            ),
            (
                rl("{targetRef: {kind: Gateway, name: r}, limits: [{name: a, rate: 1}]}"),
                "spec.targetRef.kind",
                "not /Gateway",
            ),
            (
                rl("{targetRef: {name: catalog}, limits: []}"),
                "spec.limits",
                "at least one",
            ),
            (
                rl("{targetRef: {name: catalog}, limits: [{name: a, rate: 0}]}"),
                "spec.limits[0].rate",
                "at least 1",
            ),
            (
                rl(
                    "{targetRef: {name: catalog}, limits: [{name: a, rate: 1}, {name: a, rate: 2}]}",
                ),
                "spec.limits[1].name",
                "duplicate",
            ),
            (
                rl("{targetRef: {name: catalog}, limits: [{name: a, rate: 1, per: 0s}]}"),
                "spec.limits[0].per",
                "more than 0s",
            ),
            (
                rl(
                    "{targetRef: {name: catalog}, direction: Outbound, limits: [{name: a, rate: 1, perSource: true}]}",
                ),
                "spec.limits[0].perSource",
                "Inbound only",
            ),
            (
                rl(
                    "{targetRef: {name: catalog}, limits: [{name: a, rate: 1, unit: Connections, perSource: true}]}",
                ),
                "spec.limits[0].unit",
                "before its caller is known",
            ),
            (
                rl(
                    "{targetRef: {name: catalog}, limits: [{name: a, rate: 1, overrides: [{from: {namespaces: [x]}, rate: 2}]}]}",
                ),
                "spec.limits[0].overrides",
                "need perSource",
            ),
            (
                rl(
                    "{targetRef: {name: catalog}, limits: [{name: a, rate: 1, from: {identities: [web]}}]}",
                ),
                "spec.limits[0].from.identities[0]",
                "is not spiffe://",
            ),
            (
                ol(
                    "{targetRef: {name: catalog}, adaptiveConcurrency: {minLimit: 10, maxLimit: 5}}",
                ),
                "spec.adaptiveConcurrency.maxLimit",
                "at least minLimit",
            ),
            (
                ol("{targetRef: {name: catalog}, adaptiveConcurrency: {retryAfter: 100ms}}"),
                "spec.adaptiveConcurrency.retryAfter",
                "at least 1s",
            ),
            (
                ol("{targetRef: {name: catalog}, priorities: [{name: n, priority: Normal}]}"),
                "spec.priorities[0].priority",
                "High or Low",
            ),
            (
                ol(
                    "{targetRef: {name: catalog}, priorities: [{name: n, priority: High, matches: [{method: get}]}]}",
                ),
                "spec.priorities[0].matches[0].method",
                "not an HTTP method",
            ),
            (
                format!(
                    "{}---\n{}",
                    ol("{targetRef: {name: catalog}}"),
                    ol("{targetRef: {name: catalog}}").replace("name: o", "name: o2")
                ),
                "spec.targetRef",
                "already has OverloadPolicy o",
            ),
        ];
        for (text, field, msg) in cases {
            let err = check(text).expect_err(text);
            let d = err
                .0
                .iter()
                .find(|d| d.field == *field)
                .unwrap_or_else(|| panic!("{text}: no error at {field}: {err}"));
            assert!(d.message.contains(msg), "{text}: {d}");
        }
    }

    #[test]
    fn retries_are_validated() {
        let policy = |retry: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: catalog}}\n  retry:\n{retry}"
            )
        };
        let route = |retry: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{kind: Service, name: catalog}}]\n  rules:\n    - backendRefs: [{{name: catalog-v2, port: 8080}}]\n      retry: {retry}\n"
            )
        };
        let cases: &[(String, Option<&str>)] = &[
            (
                policy(
                    "    on: [connect-failure, 5xx, retriable-status-codes]\n    codes: [429]\n    attempts: 3\n    backoff: {base: 10ms, max: 1s}\n    grpcStatuses: [UNAVAILABLE]\n    allowNonIdempotent: true\n    maxBodyBytes: 1024\n    budget: {ratio: 0.1, minPerSecond: 5, window: 30s}\n",
                ),
                None,
            ),
            (
                policy("    on: [retriable-status-codes]\n"),
                Some("spec.retry.codes: required when `on` has retriable-status-codes"),
            ),
            (
                policy("    codes: [503]\n"),
                Some("spec.retry.on: add retriable-status-codes"),
            ),
            (
                policy("    on: [retriable-status-codes]\n    codes: [302]\n"),
                Some("spec.retry.codes[0]: 302 is not between 400 and 599"),
            ),
            (
                policy("    attempts: 11\n"),
                Some("spec.retry.attempts: at most 10"),
            ),
            (
                policy("    backoff: {base: 0s}\n"),
                Some("spec.retry.backoff.base: must be more than 0s"),
            ),
            (
                policy("    backoff: {base: 1s, max: 100ms}\n"),
                Some("spec.retry.backoff.max: must not be less than backoff.base"),
            ),
            (
                policy("    grpcStatuses: [unavailable]\n"),
                Some("spec.retry.grpcStatuses[0]: \"unavailable\" is not a gRPC error status"),
            ),
            (
                policy("    grpcStatuses: [OK]\n"),
                Some("spec.retry.grpcStatuses[0]"),
            ),
            (
                policy("    budget: {ratio: -1}\n"),
                Some("spec.retry.budget.ratio: must be between 0 and 10"),
            ),
            (
                policy("    budget: {window: 0s}\n"),
                Some("spec.retry.budget.window: must be between 1s and 300s"),
            ),
            (
                policy("    maxBodyBytes: 100000000\n"),
                Some("spec.retry.maxBodyBytes: at most 16777216"),
            ),
            (
                route("{codes: [500, 503], attempts: 2, backoff: 100ms}"),
                None,
            ),
            (
                route("{codes: [200]}"),
                Some("spec.rules[0].retry.codes[0]: 200 is not between 400 and 599"),
            ),
            (
                route("{attempts: 20}"),
                Some("spec.rules[0].retry.attempts: at most 10"),
            ),
            (
                route("{attempts: 0}"),
                Some("spec.rules[0].retry.attempts: must be at least 1"),
            ),
            (
                route("{backoff: 0s}"),
                Some("spec.rules[0].retry.backoff: must be more than 0s"),
            ),
        ];
        for (doc, want) in cases {
            match (check(doc), want) {
                (Ok(()), None) => {}
                (Err(d), Some(w)) => assert!(d.to_string().contains(w), "want {w}: {d}"),
                (got, want) => panic!("{doc}: got {got:?}, want {want:?}"),
            }
        }
        // Unknown fields are refused at parse time, naming the field.
        let bad = format!("{BASE}---\n{}", policy("    retries: 3\n"));
        let e = parse_documents("t.yaml", &bad).unwrap_err().to_string();
        assert!(e.contains("retries"), "{e}");
    }

    #[test]
    fn outlier_detection_and_health_checks_are_validated() {
        let policy = |fields: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: catalog}}\n{fields}"
            )
        };
        let cases: &[(&str, Option<&str>)] = &[
            ("", None),
            (
                "  outlierDetection: {consecutive5xx: 0, latency: {factor: 2, minLatency: 50ms}}\n  healthCheck: {http: {path: /healthz, expectedStatuses: [200, 204]}, interval: 2s}\n",
                None,
            ),
            ("  healthCheck: {grpc: {service: x}}\n", None),
            ("  healthCheck: {tcp: {}}\n", None),
            (
                "  outlierDetection: {maxEjectionPercent: 101}\n",
                Some("spec.outlierDetection.maxEjectionPercent: 101 is above 100"),
            ),
            (
                "  outlierDetection: {baseEjectionTime: 60s, maxEjectionTime: 10s}\n",
                Some("spec.outlierDetection.maxEjectionTime: must be at least baseEjectionTime"),
            ),
            (
                "  outlierDetection: {latency: {factor: 0.5}}\n",
                Some("spec.outlierDetection.latency.factor: 0.5 must be above 1"),
            ),
            (
                "  healthCheck: {interval: 5s}\n",
                Some("spec.healthCheck: set exactly one of http, grpc, tcp"),
            ),
            (
                "  healthCheck: {tcp: {}, grpc: {}}\n",
                Some("spec.healthCheck: set exactly one of http, grpc, tcp"),
            ),
            (
                "  healthCheck: {http: {path: healthz}}\n",
                Some("spec.healthCheck.http.path: \"healthz\" is not an absolute path"),
            ),
            (
                "  healthCheck: {http: {expectedStatuses: [999]}}\n",
                Some("spec.healthCheck.http.expectedStatuses: 999 is not an HTTP status"),
            ),
            (
                "  healthCheck: {tcp: {}, unhealthyThreshold: 0}\n",
                Some("spec.healthCheck.unhealthyThreshold: must be at least 1"),
            ),
            (
                "  healthCheck: {tcp: {}, timeout: 0s}\n",
                Some("spec.healthCheck.timeout: must be above 0s"),
            ),
            (
                "  healthCheck: {tcp: {}, jitter: 150}\n",
                Some("spec.healthCheck.jitter: 150% is above 100%"),
            ),
        ];
        for (fields, want) in cases {
            match (check(&policy(fields)), want) {
                (Ok(()), None) => {}
                (Err(d), Some(w)) => assert!(d.to_string().contains(w), "want {w}: {d}"),
                (got, want) => panic!("{fields}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn connection_bounds_are_validated() {
        let proxy = |fields: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p}}\nspec:\n{fields}"
            )
        };
        let cases: &[(&str, Option<&str>)] = &[
            (
                "  tcpIdleTimeout: 2h\n  firstByteTimeout: 5s\n  streamIdleTimeout: 1m\n  maxConnections: 500\n  maxConnectionsPerListener: 100\n  upstreamHttp2MaxStreams: 50\n  upstreamHttp2MaxConnections: 4\n",
                None,
            ),
            (
                "  tcpIdleTimeout: 0s\n",
                Some("spec.tcpIdleTimeout: must be at least 100ms"),
            ),
            (
                "  firstByteTimeout: 10ms\n",
                Some("spec.firstByteTimeout: must be at least 100ms"),
            ),
            (
                "  streamIdleTimeout: 0s\n",
                Some("spec.streamIdleTimeout: must be at least 100ms"),
            ),
            (
                "  maxConnections: 0\n",
                Some("spec.maxConnections: must be at least 1"),
            ),
            (
                "  maxConnectionsPerListener: 0\n",
                Some("spec.maxConnectionsPerListener: must be at least 1"),
            ),
            (
                "  upstreamHttp2MaxStreams: 0\n",
                Some("spec.upstreamHttp2MaxStreams: must be between 1 and 10000"),
            ),
            (
                "  upstreamHttp2MaxConnections: 5000\n",
                Some("spec.upstreamHttp2MaxConnections: must be between 1 and 1000"),
            ),
        ];
        for (fields, want) in cases {
            match (check(&proxy(fields)), want) {
                (Ok(()), None) => {}
                (Err(d), Some(w)) => assert!(d.to_string().contains(w), "want {w}: {d}"),
                (got, want) => panic!("{fields}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn paths_must_be_canonical() {
        let policy = |path: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n  action: Deny\n  rules:\n    - to: {{paths: ['{path}']}}\n"
            )
        };
        let route = |rule: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n    - backendRefs: [{{name: catalog, port: 8080}}]\n      {rule}\n"
            )
        };
        let m = |kind: &str, value: &str| {
            route(&format!(
                "matches: [{{path: {{type: {kind}, value: '{value}'}}}}]"
            ))
        };
        let rewrite = |kind: &str, field: &str, value: &str| {
            route(&format!(
                "matches: [{{path: {{type: PathPrefix, value: /api}}}}]\n      filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: {kind}, {field}: '{value}'}}}}}}]"
            ))
        };
        // A redirect rule has no backendRefs (the Gateway API forbids both): a name instead
        // keeps the lines where they are.
        let redirect = |value: &str| {
            route(&format!(
                "filters: [{{type: RequestRedirect, requestRedirect: {{path: {{type: ReplaceFullPath, replaceFullPath: '{value}'}}}}}}]"
            ))
            .replace("backendRefs: [{name: catalog, port: 8080}]", "name: redirect")
        };
        let to = "spec.rules[0].to.paths[0]";
        let mv = "spec.rules[0].matches[0].path.value";
        let rw = "spec.rules[0].filters[0].urlRewrite.path";
        // (document, Some((line, field, message)) or None when valid)
        type Want<'a> = Option<(u32, String, &'a str)>;
        let cases: Vec<(String, Want)> = vec![
            // AuthorizationPolicy: `*`, exact, prefix; canonical ones pass.
            (policy("*"), None),
            (policy("/*"), None),
            (policy("/admin"), None),
            (policy("/admin/"), None),
            (policy("/admin/*"), None),
            (policy("/a%3Fb/*"), None),
            (policy("/a;b=c/*"), None),
            (
                policy("/admin//*"),
                Some((
                    20,
                    to.into(),
                    "\"/admin//*\" is not a canonical path (requests are made canonical before anything matches them, so it would never match); use \"/admin/*\" instead",
                )),
            ),
            (policy("//*"), Some((20, to.into(), "use \"/*\" instead"))),
            (
                policy("/%61dmin/*"),
                Some((20, to.into(), "use \"/admin/*\" instead")),
            ),
            (
                policy("/a/./b"),
                Some((20, to.into(), "use \"/a/b\" instead")),
            ),
            (
                policy("/a/../admin"),
                Some((20, to.into(), "use \"/admin\" instead")),
            ),
            (
                policy("/a/../admin/*"),
                Some((20, to.into(), "use \"/admin/*\" instead")),
            ),
            (
                policy("//admin"),
                Some((20, to.into(), "use \"/admin\" instead")),
            ),
            (
                policy("/a%3fb"),
                Some((20, to.into(), "use \"/a%3Fb\" instead")),
            ),
            (
                policy("/caf\u{e9}/*"),
                Some((20, to.into(), "use \"/caf%C3%A9/*\" instead")),
            ),
            (
                policy("/a%2Fb/*"),
                Some((
                    20,
                    to.into(),
                    "\"/a%2Fb/*\" is not a valid request path (encoded slash (%2F) at byte 2); the proxy refuses such requests with 400",
                )),
            ),
            (
                policy("/a\\b"),
                Some((20, to.into(), "backslash at byte 2")),
            ),
            // HTTPRoute path matches, Exact and PathPrefix; RegularExpression is not a path.
            (m("Exact", "/api/v1"), None),
            (m("PathPrefix", "/api/"), None),
            (m("PathPrefix", "/"), None),
            (m("RegularExpression", "/api//.*"), None),
            (
                m("Exact", "/api//v1"),
                Some((21, mv.into(), "use \"/api/v1\" instead")),
            ),
            (
                m("Exact", "/api/./v1"),
                Some((21, mv.into(), "use \"/api/v1\" instead")),
            ),
            (
                m("PathPrefix", "/x/../admin"),
                Some((21, mv.into(), "use \"/admin\" instead")),
            ),
            (
                m("PathPrefix", "/%61pi"),
                Some((21, mv.into(), "use \"/api\" instead")),
            ),
            (
                m("PathPrefix", "/api/.."),
                Some((21, mv.into(), "use \"/\" instead")),
            ),
            (
                m("Exact", "/search?q=1"),
                Some((21, mv.into(), "use \"/search%3Fq=1\" instead")),
            ),
            (
                m("Exact", "/a#b"),
                Some((21, mv.into(), "use \"/a%23b\" instead")),
            ),
            (
                m("Exact", "/a%"),
                Some((21, mv.into(), "invalid percent-encoding at byte 2")),
            ),
            // Paths the proxy sends: rewrites and redirects.
            (
                rewrite("ReplacePrefixMatch", "replacePrefixMatch", "/v2/"),
                None,
            ),
            (rewrite("ReplaceFullPath", "replaceFullPath", "/v2/x"), None),
            (
                rewrite("ReplacePrefixMatch", "replacePrefixMatch", "/v2//x"),
                Some((
                    22,
                    format!("{rw}.replacePrefixMatch"),
                    "(the proxy sends it as written, and the app would see a path no policy was written for); use \"/v2/x\" instead",
                )),
            ),
            (
                rewrite("ReplaceFullPath", "replaceFullPath", "/x/../admin"),
                Some((
                    22,
                    format!("{rw}.replaceFullPath"),
                    "use \"/admin\" instead",
                )),
            ),
            (
                redirect("/a/./b"),
                Some((
                    21,
                    "spec.rules[0].filters[0].requestRedirect.path.replaceFullPath".into(),
                    "use \"/a/b\" instead",
                )),
            ),
        ];
        for (doc, want) in &cases {
            match (check(doc), want) {
                (Ok(()), None) => {}
                (Err(d), Some((line, field, msg))) => {
                    let want = format!("t.yaml:{line}: {field}: ");
                    assert!(
                        d.0.len() == 1
                            && d.to_string().contains(&want)
                            && d.to_string().contains(msg),
                        "{doc}want {want}...{msg}\ngot {d}"
                    );
                }
                (got, want) => panic!("{doc}got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn accepts_valid_route() {
        check(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{name: catalog, kind: Service, group: \"\", port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
      backendRefs:
        - {name: catalog, port: 8080, weight: 90}
        - {name: catalog-v2, port: 8080, weight: 10}
",
        )
        .unwrap();
    }

    #[test]
    fn rejects_with_located_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "backendRefs: [{name: catalog, port: 1}]",
                "spec.rules[0].backendRefs[0].port",
                "has no port 1",
            ),
            (
                "backendRefs: [{name: catalog}]",
                "spec.rules[0].backendRefs[0].port",
                "needs a port",
            ),
            (
                "matches: [{path: {type: RegularExpression, value: '(['}}]",
                "spec.rules[0].matches[0].path.value",
                "invalid regular expression",
            ),
            (
                "matches: [{path: {value: 'api'}}]",
                "spec.rules[0].matches[0].path.value",
                "must start with '/'",
            ),
            (
                "matches: [{method: get}]",
                "spec.rules[0].matches[0].method",
                "not an HTTP method",
            ),
            (
                "filters: [{type: RequestRedirect}]",
                "spec.rules[0].filters[0]",
                "needs the `requestRedirect` field",
            ),
            (
                "matches: [{path: {type: Exact, value: /a}}]\n      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]",
                "spec.rules[0].filters[0].urlRewrite.path.type",
                "PathPrefix",
            ),
            (
                "filters: [{type: RequestMirror, requestMirror: {backendRef: {name: catalog, port: 8080}, percent: 101}}]",
                "spec.rules[0].filters[0].requestMirror.percent",
                "0-100",
            ),
        ];
        for (rule, field, msg) in cases {
            let text = format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n    - {rule}\n"
            );
            let err = check(&text).expect_err(rule);
            let d = err
                .0
                .iter()
                .find(|d| d.field == *field)
                .unwrap_or_else(|| panic!("{rule}: no error at {field}: {err}"));
            assert!(d.message.contains(msg), "{rule}: {d}");
            assert!(d.line >= 13, "{rule}: line {}", d.line);
        }
    }

    #[test]
    fn telemetry_is_refused_at_its_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "accessLog: {fields: [trace_id, body]}",
                "spec.accessLog.fields[1]",
                "unknown field \"body\"",
            ),
            (
                "accessLog: {path: logs/access.log}",
                "spec.accessLog.path",
                "neither stdout nor an absolute path",
            ),
            (
                "tracing: {samplingPercent: 5}",
                "spec.tracing.collector",
                "required",
            ),
            (
                "tracing: {collector: 'otel:4317'}",
                "spec.tracing.collector",
                "not http://HOST:PORT",
            ),
            (
                "tracing: {collector: 'http://otel:4317', samplingPercent: 101}",
                "spec.tracing.samplingPercent",
                "0-100",
            ),
            (
                "tracing: {collector: 'http://otel:4317', queueSize: 10, batchSize: 11}",
                "spec.tracing.batchSize",
                "1-queueSize",
            ),
            (
                "tracing: {collector: 'http://otel:4317', propagation: []}",
                "spec.tracing.propagation",
                "at least one",
            ),
        ];
        for (spec, field, msg) in cases {
            let text = format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: Telemetry\nmetadata: {{name: t}}\nspec:\n  {spec}\n"
            );
            let err = check(&text).expect_err(spec);
            let d = err
                .0
                .iter()
                .find(|d| d.field == *field)
                .unwrap_or_else(|| panic!("{spec}: no error at {field}: {err}"));
            assert!(d.message.contains(msg), "{spec}: {d}");
            assert_eq!(d.line, 18, "{spec}: {d}");
        }
        // Switched off, a block needs nothing else; a second one for the same scope is refused.
        check("apiVersion: trellis.dev/v1alpha1\nkind: Telemetry\nmetadata: {name: t}\nspec: {tracing: {enabled: false}, accessLog: {enabled: false}}\n").unwrap();
        let two = "apiVersion: trellis.dev/v1alpha1\nkind: Telemetry\nmetadata: {name: a, namespace: shop}\nspec: {service: orders}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Telemetry\nmetadata: {name: b, namespace: shop}\nspec: {service: orders}\n";
        let err = check(two).unwrap_err();
        assert!(
            err.to_string()
                .contains("service shop/orders already has Telemetry a"),
            "{err}"
        );
    }

    /// Filter combinations and values the Gateway API forbids, and filters Trellis cannot
    /// apply where they are written, are refused at their field.
    #[test]
    fn filter_misuse_is_refused_at_its_field() {
        let route = |rule: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n    - {rule}\n"
            )
        };
        let cases: &[(&str, &str, &str)] = &[
            (
                "backendRefs: [{name: catalog, port: 8080, filters: [{type: RequestRedirect, requestRedirect: {hostname: a.org}}]}]",
                "spec.rules[0].backendRefs[0].filters[0]",
                "RequestRedirect is not supported on a backendRef",
            ),
            (
                "backendRefs: [{name: catalog, port: 8080, filters: [{type: CORS, cors: {allowOrigins: ['*']}}]}]",
                "spec.rules[0].backendRefs[0].filters[0]",
                "CORS is not supported on a backendRef",
            ),
            (
                "filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]\n      backendRefs: [{name: catalog, port: 8080}]",
                "spec.rules[0].filters[0]",
                "cannot be used together with backendRefs",
            ),
            (
                "filters: [{type: RequestRedirect, requestRedirect: {port: 0}}]",
                "spec.rules[0].filters[0].requestRedirect.port",
                "must be 1-65535",
            ),
            (
                "filters: [{type: RequestRedirect, requestRedirect: {hostname: 'a.org:8080'}}]",
                "spec.rules[0].filters[0].requestRedirect.hostname",
                "no port",
            ),
            (
                "filters: [{type: RequestRedirect, requestRedirect: {hostname: '*.a.org'}}]",
                "spec.rules[0].filters[0].requestRedirect.hostname",
                "no wildcard",
            ),
            (
                "filters: [{type: RequestRedirect, requestRedirect: {hostname: 'bad_host'}}]",
                "spec.rules[0].filters[0].requestRedirect.hostname",
                "not a valid host name",
            ),
            (
                "filters: [{type: URLRewrite, urlRewrite: {hostname: 'Upper.example'}}]\n      backendRefs: [{name: catalog, port: 8080}]",
                "spec.rules[0].filters[0].urlRewrite.hostname",
                "lower case",
            ),
            (
                "filters: [{type: CORS, cors: {allowOrigins: ['https://a.*.com']}}]\n      backendRefs: [{name: catalog, port: 8080}]",
                "spec.rules[0].filters[0].cors.allowOrigins[0]",
                "is not `*` or an origin",
            ),
            (
                "matches: [{path: {type: Exact, value: /a}}]\n      backendRefs: [{name: catalog, port: 8080, filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]",
                "spec.rules[0].backendRefs[0].filters[0].urlRewrite.path.type",
                "PathPrefix",
            ),
            (
                "filters: [{type: CORS}]\n      backendRefs: [{name: catalog, port: 8080}]",
                "spec.rules[0].filters[0]",
                "needs the `cors` field",
            ),
            (
                "filters: [{type: CORS, cors: {}}, {type: CORS, cors: {}}]\n      backendRefs: [{name: catalog, port: 8080}]",
                "spec.rules[0].filters[1].type",
                "only once per rule",
            ),
        ];
        for (rule, field, msg) in cases {
            let err = check(&route(rule)).expect_err(rule);
            let d = err
                .0
                .iter()
                .find(|d| d.field == *field)
                .unwrap_or_else(|| panic!("{rule}: no error at {field}: {err}"));
            assert!(d.message.contains(msg), "{rule}: {d}");
            assert!(d.line >= 13, "{rule}: line {}", d.line);
        }
        let grpc = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec:\n  parentRefs: [{name: catalog}]\n  rules:\n    - filters: [{type: CORS, cors: {allowOrigins: ['*']}}]\n      backendRefs: [{name: catalog, port: 8080}]\n";
        let err = check(grpc).expect_err("CORS on a GRPCRoute");
        assert!(
            err.0
                .iter()
                .any(|d| d.field == "spec.rules[0].filters[0].type"),
            "{err}"
        );
        // Spec-valid: an empty replacePrefixMatch strips the prefix; a mirror on a backend;
        // a CORS filter on the rule; a redirect alone.
        for rule in [
            "matches: [{path: {type: PathPrefix, value: /foo}}]\n      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}]\n      backendRefs: [{name: catalog, port: 8080}]",
            "matches: [{path: {type: PathPrefix, value: /foo}}]\n      filters: [{type: RequestRedirect, requestRedirect: {hostname: a.example, port: 8443, path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}]",
            "backendRefs: [{name: catalog, port: 8080, filters: [{type: RequestMirror, requestMirror: {backendRef: {name: catalog-v2, port: 8080}}}]}]",
            "filters: [{type: CORS, cors: {allowOrigins: ['https://*.a.com', 'http://b.com:8080'], allowMethods: [PUT], allowHeaders: [x-a], exposeHeaders: ['*'], allowCredentials: true, maxAge: 60}}]\n      backendRefs: [{name: catalog, port: 8080}]",
        ] {
            if let Err(e) = check(&route(rule)) {
                panic!("{rule}: {e}");
            }
        }
    }

    #[test]
    fn fault_injections_and_their_references_are_validated() {
        let fault = |spec: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: FaultInjection\nmetadata: {{name: outage}}\nspec: {spec}\n"
            )
        };
        let route = |kind: &str, filter: &str| {
            let api = "gateway.networking.k8s.io/v1";
            format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n    - backendRefs: [{{name: catalog, port: 8080}}]\n      filters: [{filter}]\n"
            )
        };
        let ext = |group: &str, kind: &str, name: &str| {
            format!(
                "{{type: ExtensionRef, extensionRef: {{group: {group}, kind: {kind}, name: {name}}}}}"
            )
        };
        let ok_fault = fault("{abort: {httpStatus: 503, percentage: 30}}");
        let good = ext("trellis.dev", "FaultInjection", "outage");
        // (resources, field with the error, words of the message); no field: valid.
        let cases: Vec<(String, &str, &str)> = vec![
            (
                format!("{ok_fault}---\n{}", route("HTTPRoute", &good)),
                "",
                "",
            ),
            (
                format!("{ok_fault}---\n{}", route("GRPCRoute", &good)),
                "",
                "",
            ),
            (
                fault("{delay: {fixedDelay: 50ms}, abort: {grpcStatus: 14, percentage: 0.5}}"),
                "",
                "",
            ),
            (
                route("HTTPRoute", &ext("trellis.dev", "FaultInjection", "nope")),
                "spec.rules[0].filters[0].extensionRef.name",
                "HTTPRoute default/r spec.rules[0] references FaultInjection default/nope, which does not exist",
            ),
            (
                format!(
                    "{ok_fault}---\n{}",
                    route("HTTPRoute", &ext("example.com", "Thing", "outage"))
                ),
                "spec.rules[0].filters[0].extensionRef.kind",
                "only trellis.dev/FaultInjection",
            ),
            (
                format!(
                    "{ok_fault}---\n{}",
                    route("HTTPRoute", "{type: ExtensionRef}")
                ),
                "spec.rules[0].filters[0]",
                "needs the `extensionRef` field",
            ),
            (fault("{}"), "spec", "set delay, abort or both"),
            (
                fault("{delay: {fixedDelay: 0s}}"),
                "spec.delay.fixedDelay",
                "more than 0s",
            ),
            (
                fault("{delay: {fixedDelay: 1s, percentage: 100.5}}"),
                "spec.delay.percentage",
                "0-100",
            ),
            (
                fault("{abort: {httpStatus: 503, percentage: -1}}"),
                "spec.abort.percentage",
                "0-100",
            ),
            (
                fault("{abort: {httpStatus: 99}}"),
                "spec.abort.httpStatus",
                "200-599",
            ),
            (
                fault("{abort: {grpcStatus: 0}}"),
                "spec.abort.grpcStatus",
                "1-16",
            ),
            (
                fault("{abort: {grpcStatus: 17}}"),
                "spec.abort.grpcStatus",
                "1-16",
            ),
            (
                fault("{abort: {httpStatus: 503, grpcStatus: 14}}"),
                "spec.abort",
                "exactly one of httpStatus and grpcStatus",
            ),
            (
                fault("{abort: {percentage: 5}}"),
                "spec.abort",
                "exactly one",
            ),
        ];
        for (text, field, msg) in &cases {
            match (check(text), *field) {
                (Ok(()), "") => {}
                (Err(e), "") => panic!("{text}: {e}"),
                (Ok(()), _) => panic!("{text}: accepted, want {field}: {msg}"),
                (Err(e), _) => {
                    let d =
                        e.0.iter()
                            .find(|d| d.field == *field)
                            .unwrap_or_else(|| panic!("{text}: no error at {field}: {e}"));
                    assert!(d.message.contains(msg), "{text}: {d}");
                }
            }
        }
        // Only on a rule: on a backend the fault would apply after the backend was chosen.
        let on_backend = format!(
            "{ok_fault}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n    - backendRefs: [{{name: catalog, port: 8080, filters: [{good}]}}]\n"
        );
        let e = check(&on_backend).unwrap_err().to_string();
        assert!(
            e.contains("spec.rules[0].backendRefs[0].filters[0].type: a FaultInjection applies to a rule's filters"),
            "{e}"
        );
    }

    #[test]
    fn circuit_breaker_limits_are_validated() {
        let policy = |cb: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: catalog}}\n  circuitBreaker: {cb}\n"
            )
        };
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("{}", None),
            (
                "{maxConnections: 10, maxPendingRequests: 0, maxRequests: 100}",
                None,
            ),
            (
                "{maxConnections: 0}",
                Some(("spec.circuitBreaker.maxConnections", "at least 1")),
            ),
            (
                "{maxRequests: 0}",
                Some(("spec.circuitBreaker.maxRequests", "at least 1")),
            ),
            (
                "{maxPendingRequests: 5}",
                Some((
                    "spec.circuitBreaker.maxPendingRequests",
                    "set maxConnections too",
                )),
            ),
        ];
        for (cb, want) in cases {
            match (check(&policy(cb)), want) {
                (Ok(()), None) => {}
                (Err(e), Some((field, msg))) => {
                    let d =
                        e.0.iter()
                            .find(|d| d.field == *field)
                            .unwrap_or_else(|| panic!("{cb}: no error at {field}: {e}"));
                    assert!(d.message.contains(msg), "{cb}: {d}");
                }
                (got, want) => panic!("{cb}: got {got:?}, want {want:?}"),
            }
        }
        let unknown = parse_documents("t.yaml", &policy("{maxRetries: 3}"))
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("maxRetries"), "{unknown}");
    }

    #[test]
    fn rejects_duplicates_and_bad_listeners() {
        let err = check(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: p}
spec:
  admin: {address: 127.0.0.1:9990}
  outbound:
    - {name: a, address: 127.0.0.1:9990, service: {name: catalog}}
    - {name: b, address: nonsense, httpProxy: true}
    - {name: c, address: 127.0.0.1:7000}
  inbound:
    - {name: d, address: 127.0.0.1:0, forwardTo: 127.0.0.1:8080, servicePort: 80}
",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("spec.inbound[0].servicePort: servicePort needs `service`"),
            "{text}"
        );
        assert!(text.contains("t.yaml:20: spec.outbound[0].address: address 127.0.0.1:9990 is already used by spec.admin.address"), "{text}");
        assert!(
            text.contains(
                "t.yaml:21: spec.outbound[1].address: \"nonsense\" is not an IP:PORT address"
            ),
            "{text}"
        );
        assert!(text.contains("spec.outbound[2]: set exactly one"), "{text}");
        let err = check("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: catalog}\nspec: {ports: [{port: 1}]}\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("duplicate Service default/catalog"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod locality_tests {
    use super::*;
    use crate::parse_documents;

    const SERVICES: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: a}
spec:
  ports: [{port: 8080}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: b}
spec:
  ports: [{port: 8080}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: c}
spec:
  ports: [{port: 9090}]
";

    fn policy(name: &str, target: &str, extra: &str) -> String {
        format!(
            "---\napiVersion: trellis.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{name: {target}}}\n{extra}"
        )
    }

    #[test]
    fn locality_and_fallback_are_validated() {
        let cases: Vec<(String, Option<(&str, &str)>)> = vec![
            (
                policy(
                    "p",
                    "a",
                    "  locality: {enabled: true, overprovisioningFactor: 1.2}\n  fallback: {name: b}\n",
                ),
                None,
            ),
            (
                policy("p", "a", "  fallback: {name: c, port: 9090}\n"),
                None,
            ),
            // A chain without a cycle is fine.
            (
                policy("p", "a", "  fallback: {name: b}\n")
                    + &policy("q", "b", "  fallback: {name: c}\n"),
                None,
            ),
            (
                policy("p", "a", "  locality: {overprovisioningFactor: 0.5}\n"),
                Some((
                    "spec.locality.overprovisioningFactor",
                    "must be a number of at least 1.0",
                )),
            ),
            (
                policy("p", "a", "  locality: {spill: 3}\n"),
                // A parse error: it names the field and the ones allowed.
                Some(("", "unknown field `spill`, expected one of enabled")),
            ),
            (
                policy("p", "a", "  fallback: {name: nope}\n"),
                Some(("spec.fallback.name", "no Service default/nope")),
            ),
            (
                policy("p", "a", "  fallback: {name: a}\n"),
                Some(("spec.fallback.name", "default/a cannot be its own fallback")),
            ),
            (
                policy("p", "a", "  fallback: {name: c, port: 8080}\n"),
                Some(("spec.fallback.port", "Service default/c has no port 8080")),
            ),
            (
                policy("p", "a", "") + &policy("q", "a", ""),
                Some((
                    "spec.targetRef",
                    "Service default/a already has BackendPolicy p (t.yaml:",
                )),
            ),
            (
                policy("p", "a", "  fallback: {name: b}\n")
                    + &policy("q", "b", "  fallback: {name: c}\n")
                    + &policy("r", "c", "  fallback: {name: a}\n"),
                Some((
                    "spec.fallback.name",
                    "fallbacks form a cycle: default/a -> default/b -> default/c -> default/a",
                )),
            ),
        ];
        for (extra, want) in &cases {
            let text = format!("{SERVICES}{extra}");
            let got = parse_documents("t.yaml", &text).and_then(|r| validate(&r));
            match (got, want) {
                (Ok(()), None) => {}
                (Err(d), Some((field, msg))) => assert!(
                    d.0.iter()
                        .any(|x| x.field.starts_with(field) && x.message.contains(msg)),
                    "{extra}\nwant {field}: {msg}\ngot {d}"
                ),
                (got, want) => panic!("{extra}\ngot {got:?}, want {want:?}"),
            }
        }
    }

    /// The Gateway API accepts a route whose backends do not resolve and reports it in the
    /// route's status (`crate::status`); a Service backend still needs a port.
    #[test]
    fn unresolved_backends_are_valid() {
        use super::tests::check;
        let route = |kind: &str, rule: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n    - {rule}\n"
            )
        };
        let mirror =
            "filters: [{type: RequestMirror, requestMirror: {backendRef: {name: nope, port: 80}}}]";
        for ok in [
            route("HTTPRoute", "backendRefs: [{name: nope, port: 8080}]"),
            route(
                "HTTPRoute",
                "backendRefs: [{name: nope, namespace: other, port: 8080}]",
            ),
            route(
                "HTTPRoute",
                "backendRefs: [{group: example.com, kind: Bucket, name: b}]",
            ),
            route("HTTPRoute", mirror),
            route("GRPCRoute", "backendRefs: [{name: nope, port: 50051}]"),
            route("GRPCRoute", mirror),
        ] {
            check(&ok).unwrap_or_else(|d| panic!("{ok}\n{d}"));
        }
        let d = check(&route("HTTPRoute", "backendRefs: [{name: nope}]")).unwrap_err();
        assert!(
            d.0.iter()
                .any(|x| x.field == "spec.rules[0].backendRefs[0].port"
                    && x.message.contains("needs a port")),
            "{d}"
        );
    }
}
