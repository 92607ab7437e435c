//! The routing decision for one HTTP request: a pure function of the snapshot, the listener
//! and the request head. No I/O here; `http.rs` carries the decision out.

use crate::cors::Answer;
use crate::error::ProxyError;
use crate::route::{Pick, RequestView, Rule};
use crate::snapshot::{Backend, Listener, ListenerKind, PortEntry, Snapshot};
use http::header::HOST;
use http::{StatusCode, request::Parts};
use std::sync::Arc;
use std::time::Duration;

/// Route label for inbound traffic (no routes apply there yet).
pub(crate) static INBOUND: std::sync::LazyLock<Arc<str>> =
    std::sync::LazyLock::new(|| "inbound".into());
/// Route label for a service port with no route attached.
pub(crate) static DEFAULT: std::sync::LazyLock<Arc<str>> =
    std::sync::LazyLock::new(|| "default".into());

/// What to do with a request.
#[derive(Debug)]
pub enum Decision {
    /// Answer with this error.
    Fail(ProxyError),
    /// Answer with a redirect.
    Redirect {
        /// Rule that redirected.
        route: Arc<str>,
        /// `Location`.
        location: String,
        /// 301, 302, ...
        status: StatusCode,
    },
    /// Answer with this status and these headers, no body: a CORS preflight, or a
    /// redirect that carries CORS headers.
    Respond {
        /// Rule that answered.
        route: Arc<str>,
        /// Status.
        status: StatusCode,
        /// Headers.
        headers: http::HeaderMap,
    },
    /// Forward to a backend.
    Forward(Forward),
}

/// A request to forward.
#[derive(Debug)]
pub struct Forward {
    /// The rule's id, `default` (no routes attached) or `inbound`.
    pub route: Arc<str>,
    /// The matched rule, whose filters apply.
    pub rule: Option<Arc<Rule>>,
    /// Index of the chosen backend within the rule, whose filters apply too.
    pub backend_index: Option<usize>,
    /// The backend.
    pub backend: Arc<Backend>,
    /// Length of the path prefix matched, for `ReplacePrefixMatch`.
    pub prefix_len: usize,
    /// Time allowed until response headers, retries included.
    pub timeout: Option<Duration>,
    /// Time allowed for one try (`timeouts.backendRequest`).
    pub try_timeout: Option<Duration>,
    /// The rule's retry policy, when it has its own (else the backend's).
    pub retry: Option<Arc<crate::retry::Policy>>,
    /// Request metrics for this route and backend (none for mirrored copies).
    pub stats: Option<Arc<crate::metrics::RouteStats>>,
}

/// Whether a request is gRPC.
pub fn is_grpc(parts: &Parts) -> bool {
    parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The request's authority: the URI's (HTTP/2, absolute-form HTTP/1) or the `Host` header.
pub fn authority(parts: &Parts) -> Option<&str> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get(HOST).and_then(|h| h.to_str().ok()))
}

/// Decides what to do with a request arriving on `listener`. `random` drives the weighted
/// backend choice.
pub fn decide(snap: &Snapshot, listener: &Listener, parts: &Parts, random: u64) -> Decision {
    let (entry, listener_port) = match &listener.kind {
        ListenerKind::Inbound { app, stats, .. } => {
            return Decision::Forward(Forward {
                route: INBOUND.clone(),
                rule: None,
                backend_index: None,
                backend: app.clone(),
                prefix_len: 0,
                timeout: app.request_timeout,
                try_timeout: None,
                retry: None,
                stats: Some(stats.clone()),
            });
        }
        ListenerKind::Service(_, port, entry) => (&**entry, *port),
        ListenerKind::HttpProxy => match by_host(snap, parts) {
            Ok(e) => (e, e.port),
            Err(err) => return Decision::Fail(err),
        },
    };
    route(entry, listener_port, parts, random)
}

pub(crate) fn by_host<'a>(snap: &'a Snapshot, parts: &Parts) -> Result<&'a PortEntry, ProxyError> {
    let Some(auth) = authority(parts) else {
        return Err(ProxyError::BadRequest("request has no Host".into()));
    };
    let (host, port) = match auth.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            Err(_) => (auth, None),
        },
        _ => (auth, None),
    };
    let host = host.to_ascii_lowercase();
    let key = snap
        .hosts
        .get(host.trim_end_matches('.'))
        .ok_or_else(|| ProxyError::UnknownHost(auth.to_string()))?;
    // A bare host means the service's only port, or port 80.
    snap.port(key, port)
        .or_else(|| {
            if port.is_none() {
                snap.port(key, Some(80))
            } else {
                None
            }
        })
        .ok_or_else(|| ProxyError::UnknownHost(auth.to_string()))
}

/// Chooses a rule and backend on a service port.
pub fn route(entry: &PortEntry, listener_port: u16, parts: &Parts, random: u64) -> Decision {
    let path = parts.uri.path();
    let (rule, prefix_len) = if let (true, Some(grpc)) = (is_grpc(parts), &entry.grpc) {
        match grpc.select(path, &parts.headers) {
            Some(rule) => (rule, 0),
            None => return Decision::Fail(ProxyError::NoRoute(format!("gRPC {path}"))),
        }
    } else if let Some(http) = &entry.http {
        let view = RequestView {
            method: &parts.method,
            path,
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        match http.select(&view) {
            Some(s) => (s.rule, s.prefix_len),
            None => {
                return Decision::Fail(ProxyError::NoRoute(format!("{} {}", parts.method, path)));
            }
        }
    } else {
        return Decision::Forward(Forward {
            route: DEFAULT.clone(),
            rule: None,
            backend_index: None,
            backend: entry.backend.clone(),
            prefix_len: 0,
            timeout: entry.backend.request_timeout,
            try_timeout: None,
            retry: None,
            stats: Some(entry.stats.clone()),
        });
    };
    // CORS: the proxy answers preflights itself, before a redirect or a backend.
    let cors = match rule
        .filters
        .cors
        .as_ref()
        .map(|c| (c, c.decide(&parts.method, &parts.headers)))
    {
        Some((_, Answer::Preflight(headers))) => {
            return Decision::Respond {
                route: rule.id.clone(),
                status: StatusCode::NO_CONTENT,
                headers,
            };
        }
        other => other,
    };
    if let Some(r) = &rule.filters.redirect {
        let host = authority(parts).unwrap_or("");
        let location = r.location(host, &parts.uri, prefix_len, listener_port);
        if let Some((c, Answer::Actual(origin))) = &cors {
            let mut headers = http::HeaderMap::new();
            if let Some((n, v)) = crate::filters::location_header(&location) {
                headers.insert(n, v);
            }
            c.apply(origin, &mut headers);
            return Decision::Respond {
                route: rule.id.clone(),
                status: r.status,
                headers,
            };
        }
        return Decision::Redirect {
            route: rule.id.clone(),
            location,
            status: r.status,
        };
    }
    let index = match rule.pick(random) {
        Some(Pick::Backend(i)) => i,
        // The Gateway API's answer for the share of a backend that does not resolve.
        Some(Pick::Unresolved(i)) => {
            let why = rule.unresolved[i].why.to_string();
            return Decision::Fail(ProxyError::BackendNotFound(rule.id.to_string(), why));
        }
        None => return Decision::Fail(ProxyError::NoBackends(rule.id.to_string())),
    };
    let backend = rule.backends[index].backend.clone();
    Decision::Forward(Forward {
        route: rule.id.clone(),
        timeout: rule.timeout.unwrap_or(backend.request_timeout),
        try_timeout: rule.try_timeout,
        retry: rule.backends[index].retry.clone(),
        rule: Some(rule.clone()),
        backend_index: Some(index),
        backend,
        prefix_len,
        stats: Some(rule.backends[index].stats.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy in `namespace` with a listener `echo` for `prod/echo` port 80, one for port 8080,
    /// one for `prod/ts`, and an HTTP proxy listener; the services and routes below.
    fn snapshot(namespace: &str) -> Snapshot {
        let svc = |ns: &str, name: &str, ports: &str| {
            format!(
                "---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: {ports}\n"
            )
        };
        let route = |kind: &str, ns: &str, name: &str, meta: &str, parent: &str, rules: &str| {
            format!(
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}{meta}}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}"
            )
        };
        let to = |backend: &str| {
            format!("    - backendRefs: [{{name: {backend}, namespace: prod, port: 80}}]\n")
        };
        let ts = |t: &str| format!(", creationTimestamp: '{t}'");
        let mut yaml = format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: p, namespace: {namespace}}}
spec:
  admin: {{address: 127.0.0.1:0}}
  outbound:
    - {{name: echo, address: 127.0.0.1:0, service: {{name: echo, namespace: prod, port: 80}}}}
    - {{name: echo-admin, address: 127.0.0.1:0, service: {{name: echo, namespace: prod, port: 8080}}}}
    - {{name: ts, address: 127.0.0.1:0, service: {{name: ts, namespace: prod}}}}
    - {{name: frac, address: 127.0.0.1:0, service: {{name: frac, namespace: prod}}}}
    - {{name: proxy, address: 127.0.0.1:0, httpProxy: true}}
"
        );
        yaml += &svc(
            "prod",
            "echo",
            "[{name: http, port: 80}, {name: admin, port: 8080}]",
        );
        for name in ["v1", "v2", "v3", "ts", "frac"] {
            yaml += &svc("prod", name, "[{port: 80}]");
        }
        // The producer's routes: one on the admin port only (by name), one on every port.
        yaml += &route(
            "HTTPRoute",
            "prod",
            "admin",
            "",
            "{name: echo, sectionName: admin}",
            &format!("{}      matches: [{{path: {{value: /admin}}}}]\n", to("v1")),
        );
        yaml += &route(
            "HTTPRoute",
            "prod",
            "all",
            "",
            "{name: echo}",
            &format!(
                "{}      matches: [{{path: {{value: /}}}}]\n{}      matches: [{{path: {{value: /}}}}]\n",
                to("v1"),
                to("v3")
            ),
        );
        // Two consumers' routes, for port 80 only.
        for consumer in ["shop", "other"] {
            yaml += &route(
                "HTTPRoute",
                consumer,
                "mine",
                "",
                "{group: '', kind: Service, name: echo, namespace: prod, port: 80}",
                &format!(
                    "{}      matches: [{{headers: [{{name: X-A, value: '1'}}, {{name: x-a, value: '2'}}]}}]\n{}",
                    to("v2"),
                    to(if consumer == "shop" { "v3" } else { "v1" })
                ),
            );
        }
        // Age ties: times compared as times, not text.
        let on = |svc: &str| format!("{{name: {svc}}}");
        for (svc, name, t) in [
            ("ts", "a", "2026-01-01T00:00:00.5Z"),
            ("ts", "b", "2026-01-01T00:00:00Z"),
            ("ts", "c", "2026-01-01T00:30:00+01:00"),
            ("frac", "a", "2026-01-01T00:00:00.5Z"),
            ("frac", "b", "2026-01-01T00:00:00Z"),
        ] {
            yaml += &route(
                "HTTPRoute",
                "prod",
                &format!("{svc}-{name}"),
                &ts(t),
                &on(svc),
                &to(svc),
            );
        }
        let resources = trellis_api::parse_documents("test.yaml", &yaml).unwrap();
        Snapshot::build(&resources, 1, "test.yaml", None, &crate::Shared::new())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// What `decide` did, in a line: the route and backend, or the error.
    fn outcome(
        snap: &Snapshot,
        listener: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> String {
        let l = snap
            .listeners
            .iter()
            .find(|l| &*l.name == listener)
            .unwrap_or_else(|| panic!("no listener {listener}"));
        let mut b = http::Request::get(path);
        if !host.is_empty() {
            b = b.header(HOST, host);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        match decide(snap, l, &parts, 0) {
            Decision::Forward(f) => format!("{} -> {}", f.route, f.backend.name),
            Decision::Redirect { location, .. } => format!("redirect {location}"),
            Decision::Respond { status, .. } => format!("respond {status}"),
            Decision::Fail(e) => format!("{e:?}"),
        }
    }

    #[test]
    fn decisions_follow_attachment_precedence_and_the_proxys_namespace() {
        // (proxy namespace, listener, Host, path, headers, outcome)
        type Case = (
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static [(&'static str, &'static str)],
            &'static str,
        );
        let cases: &[Case] = &[
            // sectionName: the admin route is on port 8080 only.
            (
                "prod",
                "echo-admin",
                "",
                "/admin",
                &[],
                "prod/admin/0 -> prod/v1:80",
            ),
            (
                "prod",
                "echo",
                "",
                "/admin",
                &[],
                "prod/all/0 -> prod/v1:80",
            ),
            // Identical matches in two rules: the first wins.
            ("prod", "echo", "", "/x", &[], "prod/all/0 -> prod/v1:80"),
            // Consumer routes replace the producer's for their namespace, on their port.
            (
                "shop",
                "echo",
                "",
                "/",
                &[("x-a", "1")],
                "shop/mine/0 -> prod/v2:80",
            ),
            ("shop", "echo", "", "/", &[], "shop/mine/1 -> prod/v3:80"),
            (
                "shop",
                "echo-admin",
                "",
                "/admin",
                &[],
                "prod/admin/0 -> prod/v1:80",
            ),
            ("other", "echo", "", "/", &[], "other/mine/1 -> prod/v1:80"),
            (
                "default",
                "echo",
                "",
                "/",
                &[("x-a", "1")],
                "prod/all/0 -> prod/v1:80",
            ),
            // Only the first header condition of a name counts.
            (
                "shop",
                "echo",
                "",
                "/",
                &[("x-a", "2")],
                "shop/mine/1 -> prod/v3:80",
            ),
            // By Host: the same port entries.
            (
                "shop",
                "proxy",
                "echo.prod",
                "/",
                &[("X-A", "1")],
                "shop/mine/0 -> prod/v2:80",
            ),
            (
                "shop",
                "proxy",
                "echo.prod.svc.cluster.local:8080",
                "/admin",
                &[],
                "prod/admin/0 -> prod/v1:80",
            ),
            (
                "default",
                "proxy",
                "echo.prod:80",
                "/",
                &[],
                "prod/all/0 -> prod/v1:80",
            ),
            (
                "default",
                "proxy",
                "nope",
                "/",
                &[],
                "UnknownHost(\"nope\")",
            ),
            (
                "default",
                "proxy",
                "echo.prod:9",
                "/",
                &[],
                "UnknownHost(\"echo.prod:9\")",
            ),
            (
                "default",
                "proxy",
                "",
                "/",
                &[],
                "BadRequest(\"request has no Host\")",
            ),
            // Ties: the oldest route, by time.
            ("prod", "ts", "", "/", &[], "prod/ts-c/0 -> prod/ts:80"),
            (
                "prod",
                "frac",
                "",
                "/",
                &[],
                "prod/frac-b/0 -> prod/frac:80",
            ),
        ];
        let snaps: std::collections::HashMap<&str, Snapshot> = ["prod", "shop", "other", "default"]
            .into_iter()
            .map(|ns| (ns, snapshot(ns)))
            .collect();
        for (ns, listener, host, path, headers, want) in cases {
            let got = outcome(&snaps[ns], listener, host, path, headers);
            assert_eq!(&got, want, "{ns} {listener} {host} {path} {headers:?}");
        }
    }
}
