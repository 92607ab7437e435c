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

fn by_host<'a>(snap: &'a Snapshot, parts: &Parts) -> Result<&'a PortEntry, ProxyError> {
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
