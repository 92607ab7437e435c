//! `trellis explain`: what this proxy would do with a request, and why, from its own
//! snapshot and live endpoint state. Every step calls the decision the request path calls
//! (`decide`, `route`, `authz`, `ratelimit`, `balance`, `breaker`, `snapshot::Backend`'s
//! fallback), in the order `http::serve` calls them, only without I/O and without charging
//! anything (rate limit buckets are peeked, fallbacks are not counted).
//!
//! The answer is JSON (the shape is in docs/operations.md, "Explaining a request"): a
//! one-line `summary`, an `outcome`, the `status` and `reason` the client would get, and one
//! section per step, each with a `why`.

use crate::decide::{self, Decision};
use crate::error::ProxyError;
use crate::route::RequestView;
use crate::snapshot::{Backend, Listener, ListenerKind, Snapshot};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A request to explain.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ask {
    /// `outbound` (the default: this proxy sends the request) or `inbound` (this proxy
    /// receives it for its application).
    #[serde(default)]
    pub direction: Option<String>,
    /// The caller's SPIFFE id, for inbound authorization and per-caller rate limits.
    #[serde(default)]
    pub source: Option<String>,
    /// The method; `GET` when empty.
    #[serde(default)]
    pub method: String,
    /// `Host` (service name, `name.namespace`, with or without a port) or an outbound
    /// listener's `IP:PORT`.
    #[serde(default)]
    pub authority: String,
    /// Path and query; `/` when empty.
    #[serde(default)]
    pub path: String,
    /// Request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The listener, by name, instead of finding it from the authority.
    #[serde(default)]
    pub listener: Option<String>,
}

/// Why a request cannot be explained at all (not what the proxy would answer).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request description is malformed.
    #[error("request: {0}")]
    Request(String),
    /// No listener of this proxy takes the request.
    #[error("{0}")]
    NoListener(String),
}

/// Explains `ask` against `snap` at `now` (endpoint state, buckets) and `wall` (time
/// windows of authorization rules).
pub fn explain(
    snap: &Snapshot,
    ask: &Ask,
    now: tokio::time::Instant,
    wall: jiff::Timestamp,
) -> Result<Value, Error> {
    let parts = head(ask)?;
    let inbound = ask.direction.as_deref() == Some("inbound");
    if let Some(d) = ask.direction.as_deref()
        && d != "inbound"
        && d != "outbound"
    {
        return Err(Error::Request(format!(
            "direction {d:?}: use inbound or outbound"
        )));
    }
    let listener = listener(snap, ask, &parts, inbound)?;
    let mut out = Out::default();
    out.set("direction", json!(listener.direction()));
    out.set("listener", json!(&*listener.name));
    out.set("snapshotVersion", json!(snap.version));
    let (mut parts, request) = (parts, describe_request(ask));
    out.set("request", json!(request));

    // The one canonical path the request path routes on.
    if let Some(pq) = parts.uri.path_and_query() {
        match trellis_api::path::normalize(pq.path()) {
            Ok(std::borrow::Cow::Borrowed(_)) => {}
            Ok(std::borrow::Cow::Owned(p)) => {
                let with_query = match pq.query() {
                    Some(q) => format!("{p}?{q}"),
                    None => p,
                };
                parts.uri = with_query
                    .parse()
                    .map_err(|e| Error::Request(format!("path {with_query:?}: {e}")))?;
            }
            Err(e) => {
                let err = ProxyError::BadRequest(format!("path {:?}: {e}", pq.path()));
                return Ok(out.fail(&err, "the path cannot be made canonical", "bad_request"));
            }
        }
    }

    if let ListenerKind::Inbound {
        authz, authn, port, ..
    } = &listener.kind
    {
        // 0. Authentication and authorization.
        let mut claims = None;
        if !authn.is_empty() {
            let secs = wall.as_second().max(0) as u64;
            match authn.check(&parts.headers, secs) {
                crate::jwt::Outcome::Valid(c) => {
                    out.set("authentication", json!({"why": "the token is valid"}));
                    claims = Some(c);
                }
                crate::jwt::Outcome::Anonymous => {
                    out.set(
                        "authentication",
                        json!({"why": "no token, and none is required"}),
                    );
                }
                crate::jwt::Outcome::Refused(why) => {
                    out.set("authentication", json!({ "why": why }));
                    let err = ProxyError::Unauthenticated(why.clone());
                    return Ok(out.fail(
                        &err,
                        &format!("request authentication refused it: {why}"),
                        "denied",
                    ));
                }
            }
        }
        let req = crate::authz::Request {
            peer: ask.source.as_deref(),
            http: Some((&parts.method, parts.uri.path(), &parts.headers)),
            port: *port,
            claims: claims.as_ref(),
        };
        let section = authorization(authz, &req, wall);
        let denied = section.1;
        out.set("authorization", section.0);
        if let Some(policy) = denied {
            let why = out.why("authorization");
            return Ok(out.fail(&ProxyError::Denied(policy), &why, "denied"));
        }
        // 0a. The caller's share of this service (inbound rate limits).
        let caller = crate::ratelimit::Caller {
            identity: ask.source.as_deref(),
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        let sets = [snap.limits.inbound.get(&listener.name)];
        if let Some(refusal) = rate_limits(&mut out, &sets, &caller, now) {
            let why = format!(
                "rate limit {}/{} is exhausted",
                refusal.policy, refusal.limit
            );
            let err = ProxyError::RateLimited(Box::new(refusal));
            return Ok(out.fail(&err, &why, "rate_limited"));
        }
    }

    // 1. The route: every weighted choice of the matched rule, each through `decide`.
    route_section(&mut out, snap, listener, &parts);
    let decisions = decisions(snap, listener, &parts);
    let mut branches = Vec::new();
    for (share, decision) in decisions {
        branches.push(branch(snap, listener, &parts, decision, share, now));
    }
    // The heaviest branch speaks for the request; all of them are listed when several.
    let main = branches
        .iter()
        .enumerate()
        .max_by(|a, b| {
            a.1.share
                .partial_cmp(&b.1.share)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(b.0.cmp(&a.0))
        })
        .map(|(i, _)| i)
        .unwrap_or(0);
    if branches.len() > 1 {
        out.set(
            "backends",
            Value::Array(branches.iter().map(|b| b.summary_json()).collect()),
        );
    }
    let Some(b) = branches.into_iter().nth(main) else {
        return Ok(out.finish());
    };
    for (k, v) in b.sections {
        out.set(&k, v);
    }
    out.outcome = b.outcome;
    out.status = b.status;
    out.reason = b.reason;
    out.error = b.error;
    out.summary = b.summary;
    Ok(out.finish())
}

/// The explanation being built: fixed fields first, then sections in step order.
#[derive(Default)]
struct Out {
    sections: serde_json::Map<String, Value>,
    summary: String,
    outcome: &'static str,
    status: u16,
    reason: Option<String>,
    error: Option<&'static str>,
}

impl Out {
    fn set(&mut self, k: &str, v: Value) {
        self.sections.insert(k.into(), v);
    }

    fn why(&self, section: &str) -> String {
        self.sections
            .get(section)
            .and_then(|s| s.get("why"))
            .and_then(|w| w.as_str())
            .unwrap_or_default()
            .to_string()
    }

    /// Ends with the error the proxy would answer.
    fn fail(mut self, err: &ProxyError, why: &str, outcome: &'static str) -> Value {
        self.outcome = outcome;
        self.status = err.status().as_u16();
        self.reason = Some(err.to_string());
        self.error = Some(err.label());
        self.summary = format!("{} {}: {why}", self.status, outcome.replace('_', " "));
        self.finish()
    }

    fn finish(self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("summary".into(), json!(self.summary));
        m.insert("outcome".into(), json!(self.outcome));
        if self.status != 0 {
            m.insert("status".into(), json!(self.status));
        }
        if let Some(r) = self.reason {
            m.insert("reason".into(), json!(r));
        }
        if let Some(e) = self.error {
            m.insert("error".into(), json!(e));
        }
        m.extend(self.sections);
        Value::Object(m)
    }
}

/// The request head the request path would see.
fn head(ask: &Ask) -> Result<http::request::Parts, Error> {
    let method = if ask.method.is_empty() {
        "GET"
    } else {
        &ask.method
    };
    let path = if ask.path.is_empty() { "/" } else { &ask.path };
    if !path.starts_with('/') {
        return Err(Error::Request(format!(
            "path {path:?}: must start with '/'"
        )));
    }
    let mut b = http::Request::builder()
        .method(
            http::Method::from_bytes(method.as_bytes())
                .map_err(|e| Error::Request(format!("method {method:?}: {e}")))?,
        )
        .uri(path);
    if !ask.authority.is_empty() {
        b = b.header(http::header::HOST, &ask.authority);
    }
    for (k, v) in &ask.headers {
        let name = http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| Error::Request(format!("header {k:?}: {e}")))?;
        let value = http::HeaderValue::from_str(v)
            .map_err(|e| Error::Request(format!("header {k}: value {v:?}: {e}")))?;
        b = b.header(name, value);
    }
    let (parts, ()) = b
        .body(())
        .map_err(|e| Error::Request(e.to_string()))?
        .into_parts();
    Ok(parts)
}

fn describe_request(ask: &Ask) -> String {
    let method = if ask.method.is_empty() {
        "GET"
    } else {
        &ask.method
    };
    let path = if ask.path.is_empty() { "/" } else { &ask.path };
    let from = ask
        .source
        .as_deref()
        .map(|s| format!(" from {s}"))
        .unwrap_or_default();
    format!("{method} {}{path}{from}", ask.authority)
}

/// The listener that would take the request: named, or the inbound one, or the outbound
/// listener for the authority's service (or its address), else the HTTP proxy listener.
fn listener<'a>(
    snap: &'a Snapshot,
    ask: &Ask,
    parts: &http::request::Parts,
    inbound: bool,
) -> Result<&'a Listener, Error> {
    let names = || {
        snap.listeners
            .iter()
            .map(|l| format!("{} ({})", l.name, l.direction()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(name) = &ask.listener {
        return snap
            .listeners
            .iter()
            .find(|l| &*l.name == name)
            .ok_or_else(|| {
                Error::NoListener(format!("no listener {name:?}; this proxy has {}", names()))
            });
    }
    if inbound {
        return snap
            .listeners
            .iter()
            .find(|l| matches!(l.kind, ListenerKind::Inbound { .. }))
            .ok_or_else(|| {
                Error::NoListener(format!(
                    "this proxy has no inbound listener (it fronts no service); it has {}",
                    names()
                ))
            });
    }
    let authority = decide::authority(parts).unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h, p.parse::<u16>().ok()),
        _ => (authority, None),
    };
    let host = host.to_ascii_lowercase();
    let key = snap.hosts.get(host.trim_end_matches('.'));
    let by_service = snap.listeners.iter().find(|l| match &l.kind {
        ListenerKind::Service(k, p, _) => {
            key.is_some_and(|key| **key == *k) && port.is_none_or(|want| want == *p)
                || l.addr.to_string() == authority
        }
        _ => false,
    });
    by_service
        .or_else(|| {
            snap.listeners
                .iter()
                .find(|l| matches!(l.kind, ListenerKind::HttpProxy))
        })
        .ok_or_else(|| {
            Error::NoListener(format!(
                "no outbound listener of this proxy reaches {authority:?}; it has {}",
                if snap.listeners.is_empty() {
                    "none".to_string()
                } else {
                    names()
                }
            ))
        })
}

/// The authorization section, and the denying policy when it denies.
fn authorization(
    authz: &crate::authz::Authz,
    req: &crate::authz::Request<'_>,
    wall: jiff::Timestamp,
) -> (Value, Option<Arc<str>>) {
    if authz.is_open() {
        return (
            json!({"why": "no AuthorizationPolicy applies and the default allows: every caller may call"}),
            None,
        );
    }
    let (verdict, policies, (default_action, default_mode, default_name)) =
        authz.explain(req, wall);
    let caller = req.peer.unwrap_or("a caller without an identity");
    let decided = policies.iter().find(|p| p.name == verdict.policy);
    let why = match decided {
        Some(p) => {
            let rule = p
                .matched_rule()
                .map(|r| format!("rule {r}"))
                .unwrap_or_default();
            format!(
                "{} {} by {} {rule} ({:?})",
                caller,
                if verdict.allow { "allowed" } else { "denied" },
                p.name,
                p.action
            )
        }
        None if &*verdict.policy == "no-allow-policy-matched" => {
            format!("{caller} denied: Allow policies apply here and no rule of any of them matched")
        }
        None => format!(
            "{caller} {} by the default ({default_name}: {default_action:?}, {default_mode:?}): no policy matched",
            if verdict.allow { "allowed" } else { "denied" },
        ),
    };
    let list: Vec<Value> = policies
        .iter()
        .map(|p| {
            let rules: Vec<Value> = p
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| match r {
                    Ok(()) => json!({"rule": i, "matched": true}),
                    Err(field) => json!({"rule": i, "matched": false, "why": format!("{field} does not match")}),
                })
                .collect();
            json!({
                "policy": &*p.name,
                "action": format!("{:?}", p.action),
                "mode": format!("{:?}", p.mode),
                "matchedRule": p.matched_rule(),
                "rules": rules,
            })
        })
        .collect();
    let mut section = json!({
        "why": why,
        "allow": verdict.allow,
        "decidedBy": &*verdict.policy,
        "policies": list,
    });
    if let Some(a) = &verdict.audit_denied_by {
        section["auditWouldDeny"] = json!(&**a);
    }
    let denied = (!verdict.allow).then(|| verdict.policy.clone());
    (section, denied)
}

/// Peeks every limit of `sets` in order, as the request path checks them; the first that
/// would refuse, if any.
fn rate_limits(
    out: &mut Out,
    sets: &[Option<&crate::ratelimit::LimitSet>],
    caller: &crate::ratelimit::Caller<'_>,
    now: tokio::time::Instant,
) -> Option<crate::ratelimit::Refusal> {
    let mut list = Vec::new();
    let mut refused = None;
    for l in sets.iter().flatten().flat_map(|s| s.limits()) {
        let r = &l.rule;
        let name = format!("{}/{}", r.policy, r.name);
        match l.peek(caller, now) {
            None => list.push(json!({"limit": name, "applies": false,
                "why": "this limit does not count this caller"})),
            Some((crate::ratelimit::Take::Allowed { remaining }, n)) => list.push(json!({
                "limit": name, "applies": true, "allowed": true, "remaining": remaining,
                "why": format!("{remaining} more allowed now ({} per {}s)", n.quota, n.window),
            })),
            Some((crate::ratelimit::Take::Limited { retry_after }, n)) => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                list.push(json!({
                    "limit": name, "applies": true, "allowed": false,
                    "retryAfterSeconds": secs.max(1),
                    "why": format!("exhausted ({} per {}s); a request passes again in {:.1}s",
                        n.quota, n.window, retry_after.as_secs_f64()),
                }));
                if refused.is_none() {
                    refused = Some(crate::ratelimit::Refusal {
                        policy: r.policy.clone(),
                        limit: r.name.clone(),
                        quota: n.quota,
                        window: n.window,
                        retry_after: secs.max(1),
                    });
                }
            }
        }
    }
    if !list.is_empty() {
        out.set("rateLimits", Value::Array(list));
    }
    refused
}

/// The route section: the rule that matched (or the closest), and why every rule of
/// higher precedence did not.
fn route_section(
    out: &mut Out,
    snap: &Snapshot,
    listener: &Listener,
    parts: &http::request::Parts,
) {
    match &listener.kind {
        ListenerKind::Service(_, _, e) => route_table(out, e, parts),
        // HTTP proxy mode: the port entry the Host names, found as `decide` finds it.
        ListenerKind::HttpProxy => {
            if let Ok(e) = decide::by_host(snap, parts) {
                route_table(out, e, parts);
            }
        }
        ListenerKind::Inbound { .. } => out.set(
            "route",
            json!({"id": "inbound", "why": "inbound requests go to the local application; routes apply at the caller's sidecar"}),
        ),
    }
}

fn route_table(out: &mut Out, entry: &crate::snapshot::PortEntry, parts: &http::request::Parts) {
    let path = parts.uri.path();
    if decide::is_grpc(parts)
        && let Some(grpc) = &entry.grpc
    {
        let (won, missed) = grpc.explain(path, &parts.headers);
        let not: Vec<Value> = missed
            .iter()
            .map(|i| json!({"route": &*grpc.entries[*i].1.id, "why": format!("does not match gRPC call {path}")}))
            .collect();
        out.set("notMatched", Value::Array(not));
        match won {
            Some(i) => out.set(
                "route",
                json!({"id": &*grpc.entries[i].1.id, "kind": "GRPCRoute", "why": format!("first GRPCRoute match for {path}")}),
            ),
            None => out.set(
                "route",
                json!({"id": null, "kind": "GRPCRoute", "why": format!("no GRPCRoute rule matches {path}")}),
            ),
        }
        return;
    }
    let Some(http) = &entry.http else {
        out.set(
            "route",
            json!({"id": "default", "why": format!("no route is attached to port {}: the service itself", entry.port)}),
        );
        return;
    };
    let view = RequestView {
        method: &parts.method,
        path,
        query: parts.uri.query(),
        headers: &parts.headers,
    };
    let (won, missed) = http.explain(&view);
    let not: Vec<Value> = missed
        .iter()
        .map(|(i, miss)| {
            let (m, rule) = &http.entries[*i];
            json!({"route": &*rule.id, "match": m.describe_conditions(), "why": m.describe(*miss, &view)})
        })
        .collect();
    match won {
        Some(i) => {
            let (m, rule) = &http.entries[i];
            let why = if missed.is_empty() {
                format!(
                    "the first rule in precedence order matches ({})",
                    m.describe_conditions()
                )
            } else {
                format!(
                    "matches {}; the {} rule(s) of higher precedence did not",
                    m.describe_conditions(),
                    missed.len()
                )
            };
            out.set(
                "route",
                json!({"id": &*rule.id, "kind": "HTTPRoute", "match": m.describe_conditions(), "why": why}),
            );
        }
        None => {
            // The closest: the match that failed latest in its checks; among path misses,
            // the pattern sharing most of its start with the path and leaving least of
            // itself unmatched; then the one with fewest other conditions to meet.
            let closest = missed.iter().max_by_key(|(i, miss)| {
                let m = &http.entries[*i].0;
                let others = usize::from(m.method.is_some()) + m.headers.len() + m.query.len();
                let near = match &m.path {
                    crate::route::PathMatch::Exact(p) | crate::route::PathMatch::Prefix(p) => {
                        let shared = p
                            .bytes()
                            .zip(path.bytes())
                            .take_while(|(a, b)| a == b)
                            .count() as i64;
                        2 * shared - p.len() as i64
                    }
                    crate::route::PathMatch::Regex(_) => i64::MIN,
                };
                (
                    *miss,
                    near,
                    std::cmp::Reverse(others),
                    std::cmp::Reverse(*i),
                )
            });
            let mut section = json!({"id": null, "kind": "HTTPRoute",
                "why": format!("none of the {} rule(s) on port {} matches {} {path}", missed.len(), entry.port, parts.method)});
            if let Some((i, miss)) = closest {
                let (m, rule) = &http.entries[*i];
                section["closest"] = json!({"route": &*rule.id, "match": m.describe_conditions(), "why": m.describe(*miss, &view)});
            }
            out.set("route", section);
        }
    }
    out.set("notMatched", Value::Array(not));
}

/// Every weighted outcome of `decide`, with its share of requests: the random number that
/// lands on each backend of the matched rule is passed to the same function.
fn decisions(
    snap: &Snapshot,
    listener: &Listener,
    parts: &http::request::Parts,
) -> Vec<(f64, Decision)> {
    let first = decide::decide(snap, listener, parts, 0);
    let Decision::Forward(f) = &first else {
        return vec![(1.0, first)];
    };
    let Some(rule) = f.rule.clone() else {
        return vec![(1.0, first)];
    };
    let weights: Vec<u64> = rule
        .backends
        .iter()
        .map(|b| u64::from(b.weight))
        .chain(rule.unresolved.iter().map(|u| u64::from(u.weight)))
        .collect();
    let total: u64 = weights.iter().sum();
    if weights.len() <= 1 || total == 0 {
        return vec![(1.0, first)];
    }
    let mut out = Vec::new();
    let mut at = 0;
    for w in weights {
        if w > 0 {
            out.push((
                w as f64 / total as f64,
                decide::decide(snap, listener, parts, at),
            ));
        }
        at += w;
    }
    out
}

/// One weighted outcome, explained to its end.
struct Branch {
    share: f64,
    name: String,
    sections: Vec<(String, Value)>,
    summary: String,
    outcome: &'static str,
    status: u16,
    reason: Option<String>,
    error: Option<&'static str>,
}

impl Branch {
    fn summary_json(&self) -> Value {
        json!({
            "backend": self.name,
            "share": (self.share * 1000.0).round() / 1000.0,
            "outcome": self.outcome,
            "status": self.status,
            "why": self.summary,
        })
    }

    fn fail(&mut self, err: &ProxyError, outcome: &'static str, why: String) {
        self.outcome = outcome;
        self.status = err.status().as_u16();
        self.reason = Some(err.to_string());
        self.error = Some(err.label());
        self.summary = format!("{} {}: {why}", self.status, outcome.replace('_', " "));
    }

    fn set(&mut self, k: &str, v: Value) {
        self.sections.push((k.into(), v));
    }
}

fn branch(
    snap: &Snapshot,
    listener: &Listener,
    parts: &http::request::Parts,
    decision: Decision,
    share: f64,
    now: tokio::time::Instant,
) -> Branch {
    let mut b = Branch {
        share,
        name: String::new(),
        sections: Vec::new(),
        summary: String::new(),
        outcome: "",
        status: 0,
        reason: None,
        error: None,
    };
    let target = format!(
        "{} {}",
        parts.method,
        decide::authority(parts).map_or(String::new(), str::to_string) + parts.uri.path()
    );
    let f = match decision {
        Decision::Fail(e) => {
            let (outcome, why) = match &e {
                ProxyError::NoRoute(_) => ("no_route", format!("no route rule matches {target}")),
                ProxyError::UnknownHost(h) => (
                    "no_route",
                    format!("no service this proxy knows is called {h:?}"),
                ),
                ProxyError::BadRequest(w) => ("bad_request", w.clone()),
                ProxyError::BackendNotFound(rule, w) => {
                    b.name = rule.clone();
                    ("unavailable", format!("rule {rule}: {w}"))
                }
                ProxyError::NoBackends(rule) => (
                    "unavailable",
                    format!("rule {rule} has no backend with weight"),
                ),
                other => ("failed", other.to_string()),
            };
            b.fail(&e, outcome, why);
            return b;
        }
        Decision::Redirect {
            route,
            location,
            status,
        } => {
            b.outcome = "redirected";
            b.status = status.as_u16();
            b.summary = format!("{status} redirect to {location} by rule {route}");
            b.set("redirect", json!({"location": location, "why": format!("rule {route} has a RequestRedirect filter")}));
            return b;
        }
        Decision::Respond { route, status, .. } => {
            b.outcome = "direct_response";
            b.status = status.as_u16();
            b.summary = format!("{status} answered by the proxy for rule {route} (CORS)");
            b.set("directResponse", json!({"why": format!("rule {route} answers this request itself (a CORS preflight, or a redirect with CORS headers)")}));
            return b;
        }
        Decision::Forward(f) => f,
    };
    b.name = f.backend.name.to_string();

    // Outbound rate limits: the backend's, then the rule's.
    if !matches!(listener.kind, ListenerKind::Inbound { .. }) {
        let l = &snap.limits;
        let rule = f.rule.as_ref().and_then(|r| l.rules.get(&r.id));
        let caller = crate::ratelimit::Caller {
            identity: None,
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        let mut out = Out::default();
        let refused = rate_limits(
            &mut out,
            &[l.backends.get(&f.backend.name), rule],
            &caller,
            now,
        );
        for (k, v) in out.sections {
            b.set(&k, v);
        }
        if let Some(r) = refused {
            let why = format!("rate limit {}/{} is exhausted", r.policy, r.limit);
            b.fail(&ProxyError::RateLimited(Box::new(r)), "rate_limited", why);
            return b;
        }
    }

    // Fault injection, as configured (sampled per request).
    if let Some(fault) = f.rule.as_ref().and_then(|r| r.filters.fault.as_deref()) {
        let pct = |m: u32| f64::from(m) / 10_000.0;
        b.set(
            "fault",
            json!({
                "delay": fault.delay.map(|(d, m)| json!({"seconds": d.as_secs_f64(), "percent": pct(m)})),
                "abort": fault.abort.map(|(a, m)| json!({"abort": format!("{a:?}"), "percent": pct(m)})),
                "why": "the rule references a FaultInjection: these shares of requests are delayed or aborted",
            }),
        );
    }

    // The fallback step, then the endpoints as the balancer ranks them.
    let mut backend: &Backend = &f.backend;
    let mut backend_why = match &f.rule {
        Some(r) => format!(
            "rule {} sends {:.0}% of its requests here",
            r.id,
            share * 100.0
        ),
        None => format!("route {} sends every request here", f.route),
    };
    if let Some(fb) = f.backend.fallback_now() {
        backend_why += &format!(
            "; it has no usable endpoint, so its fallback {} takes the request",
            fb.name
        );
        backend = fb;
    }
    b.set(
        "backend",
        json!({"name": &*backend.name, "algorithm": format!("{:?}", backend.balancer.algorithm()), "why": backend_why}),
    );
    let members = backend.balancer.members();
    let loads = backend.balancer.loads(now);
    let views: Vec<Value> = members
        .iter()
        .zip(&loads)
        .map(|(m, l)| {
            let mut v = crate::outlier::endpoint_view(m, backend.balancer.decay(), now);
            v["rank"] = json!(l.rank());
            v
        })
        .collect();
    b.set("endpoints", Value::Array(views));
    let best = members
        .iter()
        .zip(&loads)
        .filter(|(m, _)| m.weight > 0)
        .map(|(_, l)| l.rank())
        .min();
    let Some(best) = best else {
        let err = ProxyError::NoEndpoint(backend.name.to_string());
        let why = if members.is_empty() {
            format!(
                "{} has no endpoints: no healthy instance is registered",
                backend.name
            )
        } else {
            format!("every endpoint of {} has weight 0", backend.name)
        };
        b.set("unavailable", json!({"why": why}));
        b.fail(&err, "unavailable", why);
        return b;
    };
    let chosen: Vec<String> = members
        .iter()
        .zip(&loads)
        .filter(|(m, l)| m.weight > 0 && l.rank() == best)
        .map(|(m, _)| m.state.addr.to_string())
        .collect();
    let endpoint_why = match best {
        0 => format!(
            "{:?} chooses among the healthy endpoints: {}",
            backend.balancer.algorithm(),
            chosen.join(", ")
        ),
        1 => format!(
            "every endpoint failed recently; the least failing are tried: {}",
            chosen.join(", ")
        ),
        _ => format!(
            "every endpoint is out (ejected or failing its health check); the proxy still tries {} rather than refuse",
            chosen.join(", ")
        ),
    };
    b.set(
        "endpoint",
        json!({"candidates": chosen, "rank": best, "why": endpoint_why}),
    );

    // The circuit breaker: whether one more request is admitted now.
    if let Some(gate) = &backend.gate {
        let (conns, pending, requests) = gate.state.counts();
        let l = &gate.limits;
        let admission = crate::breaker::request(requests, l);
        let mut section = json!({
            "maxConnections": l.max_connections, "maxPendingRequests": l.max_pending_requests,
            "maxRequests": l.max_requests, "connections": conns, "pending": pending,
            "requests": requests,
        });
        if let crate::breaker::Admission::Reject(limit) = admission {
            let err = ProxyError::Overloaded(gate.name.clone(), limit, l.of(limit));
            let why = format!(
                "the circuit breaker of {} is open: {} at its limit of {}",
                gate.name,
                limit.field(),
                l.of(limit)
            );
            section["why"] = json!(why);
            b.set("circuitBreaker", section);
            b.fail(&err, "unavailable", why);
            return b;
        }
        section["why"] = json!("under every limit: a request is admitted");
        b.set("circuitBreaker", section);
    }

    // Retries and timeouts.
    let retry = f.retry.as_deref().unwrap_or(&backend.retry);
    b.set(
        "retries",
        json!({
            "retries": retry.retries,
            "backoffBaseSeconds": retry.backoff.base.as_secs_f64(),
            "backoffMaxSeconds": retry.backoff.max.as_secs_f64(),
            "allMethods": retry.all_methods,
            "maxBodyBytes": retry.max_body,
            "why": if f.retry.is_some() { "the rule's retry policy over the backend's" } else { "the backend's retry policy (or the defaults)" },
        }),
    );
    let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64());
    b.set(
        "timeouts",
        json!({
            "requestSeconds": secs(f.timeout),
            "backendRequestSeconds": secs(f.try_timeout),
            "connectSeconds": backend.connect_timeout.as_secs_f64(),
            "why": match f.timeout {
                Some(t) => format!("the whole request, retries included, has {:.3}s", t.as_secs_f64()),
                None => "no request timeout".into(),
            },
        }),
    );
    b.outcome = "forwarded";
    b.status = 0;
    b.summary = format!(
        "forwarded by {} to {} ({})",
        f.route,
        backend.name,
        match best {
            0 => format!("{} healthy endpoint(s)", chosen.len()),
            _ => "no healthy endpoint: last resort".into(),
        }
    );
    b
}

/// Answers one explain request from the control plane: against the current snapshot, or
/// against a snapshot built (never installed) from a proposed view with the live endpoint
/// state, compared with the current answer.
pub fn answer(
    shared: &crate::Shared,
    req: trellis_api::wire::ExplainRequest,
) -> trellis_api::wire::ExplainAnswer {
    let id = req.id.clone();
    let result = (|| -> Result<Value, String> {
        let ask: Ask = serde_json::from_str(&req.ask_json).map_err(|e| format!("request: {e}"))?;
        let snap = shared.snapshot();
        let now = tokio::time::Instant::now();
        let wall = jiff::Timestamp::now();
        let current = explain(&snap, &ask, now, wall).map_err(|e| e.to_string())?;
        if !req.proposed {
            return Ok(current);
        }
        let proposed = proposed_snapshot(shared, &snap, &req.view)?;
        let mut next = explain(&proposed, &ask, now, wall).map_err(|e| e.to_string())?;
        let changes = changes(&current, &next);
        next["current"] = json!({
            "summary": current["summary"],
            "outcome": current["outcome"],
            "route": current["route"]["id"],
            "backend": current["backend"]["name"],
            "authorization": current["authorization"]["decidedBy"],
        });
        let line = if changes.is_empty() {
            "no change: ".to_string()
        } else {
            format!("{}; now: ", changes.join("; "))
        };
        next["summary"] = json!(format!(
            "with the proposed config: {}",
            next["summary"].as_str().unwrap_or_default()
        ));
        next["changes"] = json!(changes);
        next["changeSummary"] = json!(format!(
            "{line}{}",
            current["summary"].as_str().unwrap_or_default()
        ));
        Ok(next)
    })();
    match result {
        Ok(v) => trellis_api::wire::ExplainAnswer {
            id,
            json: v.to_string(),
            error: String::new(),
        },
        Err(error) => trellis_api::wire::ExplainAnswer {
            id,
            json: String::new(),
            error,
        },
    }
}

/// This proxy's config with `view` in place of what the control plane sent: its own
/// `Proxy` resource, the view, and placeholders, built like an update (validated whole)
/// over the current snapshot so endpoint state, breakers and buckets are the live ones.
fn proposed_snapshot(
    shared: &crate::Shared,
    current: &Snapshot,
    view: &[trellis_api::wire::Resource],
) -> Result<Snapshot, String> {
    use trellis_api::{Located, Resource};
    let local: Vec<Located<Resource>> = current
        .resources
        .iter()
        .filter(|r| matches!(r, Resource::Proxy(_)))
        .map(|r| Located::unsourced(r.clone(), "this proxy"))
        .collect();
    if local.is_empty() {
        return Err("this proxy has no config yet".into());
    }
    let remote = view
        .iter()
        .map(|r| {
            Resource::from_json(&r.json)
                .map(|x| Located::unsourced(x, &format!("proposed {}", r.key)))
                .map_err(|e| format!("proposed {}: {e}", r.key))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let all = crate::control::assemble(&local, remote);
    Snapshot::build(&all, current.version, "proposed", Some(current), shared)
        .map_err(|e| format!("the proposed config does not build for this proxy: {e}"))
}

/// What differs between two explanations, one line per decision.
pub fn changes(current: &Value, next: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let text = |v: &Value| match v {
        Value::Null => "none".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (what, path) in [
        ("outcome", &["outcome"][..]),
        ("status", &["status"][..]),
        ("route", &["route", "id"][..]),
        ("backend", &["backend", "name"][..]),
        ("authorization", &["authorization", "decidedBy"][..]),
        ("request timeout", &["timeouts", "requestSeconds"][..]),
        ("retries", &["retries", "retries"][..]),
    ] {
        let get = |v: &Value| path.iter().fold(v.clone(), |v, k| v[*k].clone());
        let (a, b) = (get(current), get(next));
        if a != b {
            out.push(format!(
                "{what} would change from {} to {}",
                text(&a),
                text(&b)
            ));
        }
    }
    let shares = |v: &Value| v["backends"].clone();
    if shares(current) != shares(next) && !shares(next).is_null() {
        out.push(format!("backend shares would become {}", shares(next)));
    }
    out
}

#[cfg(test)]
mod tests;
