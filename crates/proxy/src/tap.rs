//! Live request metadata for `trellis tap`: the control plane sends the active taps on the
//! report stream (module `report`); a request that matches one becomes an event queued for
//! that stream. With no tap active a request costs one atomic load here. The queue is
//! bounded: when the stream cannot keep up, events are dropped and counted, never waited for.

use crate::body::Body;
use crate::http::ConnInfo;
use arc_swap::ArcSwap;
use http::{HeaderMap, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use trellis_api::wire;

/// Headers whose values a tap never shows.
pub const SENSITIVE: [&str; 5] = [
    "authorization",
    "cookie",
    "set-cookie",
    "proxy-authorization",
    "x-api-key",
];

/// What replaces a redacted header's value.
pub const REDACTED: &str = "[redacted]";

/// The route and backend of a request that reached neither.
static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "".into());

/// Events queued per proxy before new ones are dropped.
const QUEUE: usize = 1024;

/// Proxies in this process with a tap active: only then does the request path note the
/// upstream endpoint for taps (an optimisation gate; each proxy still checks its own taps).
static TAPPING: AtomicUsize = AtomicUsize::new(0);

/// Which statuses a tap shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFilter {
    /// Every status.
    Any,
    /// One code.
    Code(u16),
    /// One class: `5` for 5xx.
    Class(u16),
    /// An unparsable filter: nothing matches.
    Never,
}

impl StatusFilter {
    /// `""`, `"503"` or `"5xx"`.
    pub fn parse(s: &str) -> Result<StatusFilter, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(StatusFilter::Any);
        }
        if let Some(c) = s.strip_suffix("xx").or_else(|| s.strip_suffix("XX"))
            && let Ok(c @ 1..=5) = c.parse::<u16>()
        {
            return Ok(StatusFilter::Class(c));
        }
        match s.parse::<u16>() {
            Ok(code @ 100..=599) => Ok(StatusFilter::Code(code)),
            _ => Err(format!(
                "status {s:?}: use an HTTP status (503) or a class (5xx)"
            )),
        }
    }

    fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Any => true,
            StatusFilter::Code(c) => c == status,
            StatusFilter::Class(c) => status / 100 == c,
            StatusFilter::Never => false,
        }
    }
}

/// One active tap.
#[derive(Clone, Debug)]
pub struct Tap {
    /// The control plane's id for it.
    pub id: String,
    direction: String,
    route: String,
    path_prefix: String,
    method: String,
    status: StatusFilter,
    headers: bool,
    redact: Vec<String>,
}

impl From<wire::TapRequest> for Tap {
    fn from(t: wire::TapRequest) -> Tap {
        Tap {
            status: StatusFilter::parse(&t.status).unwrap_or(StatusFilter::Never),
            id: t.id,
            direction: t.direction,
            route: t.route,
            path_prefix: t.path_prefix,
            method: t.method.to_ascii_uppercase(),
            headers: t.headers,
            redact: t.redact.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }
}

/// What a tap filter looks at.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'a str,
    /// The route id.
    pub route: &'a str,
    /// The request path.
    pub path: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The response status.
    pub status: u16,
}

impl Tap {
    /// Whether a request with these facts is shown.
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        (self.direction.is_empty() || self.direction == f.direction)
            && (self.route.is_empty() || self.route == f.route)
            && f.path.starts_with(&self.path_prefix)
            && (self.method.is_empty() || self.method == f.method)
            && self.status.matches(f.status)
    }
}

/// Request headers as a tap shows them: each name once (repeated values joined), the
/// sensitive ones and those in `extra` (lowercase) replaced by [`REDACTED`].
pub fn redact(headers: &HeaderMap, extra: &[String]) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        let v = if SENSITIVE.contains(&n) || extra.iter().any(|e| e == n) {
            REDACTED.to_string()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        out.entry(n.to_string())
            .and_modify(|old| {
                if v != REDACTED {
                    old.push_str(", ");
                    old.push_str(&v);
                }
            })
            .or_insert(v);
    }
    out
}

/// A proxy's active taps and the queue of their events.
#[derive(Default)]
pub struct Taps {
    active: AtomicBool,
    set: ArcSwap<Vec<Tap>>,
    queue: arc_swap::ArcSwapOption<mpsc::Sender<wire::TapEvent>>,
    dropped: Mutex<HashMap<String, u64>>,
}

impl Taps {
    /// Replaces the active taps.
    pub fn set(&self, taps: Vec<wire::TapRequest>) {
        let now = !taps.is_empty();
        self.set
            .store(Arc::new(taps.into_iter().map(Tap::from).collect()));
        let was = self.active.swap(now, Ordering::AcqRel);
        match (was, now) {
            (false, true) => {
                TAPPING.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                TAPPING.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }

    /// Whether any tap is active.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// A fresh event queue for a new report stream (the previous one is closed).
    pub fn events(&self) -> mpsc::Receiver<wire::TapEvent> {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.queue.store(Some(Arc::new(tx)));
        rx
    }

    /// Events dropped since the last call, by tap id.
    pub fn take_dropped(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.dropped.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn emit(&self, event: wire::TapEvent) {
        let queue = self.queue.load();
        let sent = queue
            .as_ref()
            .is_some_and(|q| q.try_send(event.clone()).is_ok());
        if !sent {
            *self
                .dropped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(event.tap_id)
                .or_default() += 1;
        }
    }
}

impl Drop for Taps {
    fn drop(&mut self) {
        if self.active() {
            TAPPING.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The upstream a response came from, noted for taps.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    addr: SocketAddr,
    identity: Option<String>,
}

/// Notes `endpoint` on the response while some proxy in this process taps.
pub(crate) fn note_upstream(resp: &mut Response<Body>, endpoint: &crate::endpoint::EndpointState) {
    if TAPPING.load(Ordering::Relaxed) == 0 {
        return;
    }
    let identity = endpoint.identity.as_ref().map(|n| match n {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_string(),
        other => format!("{other:?}"),
    });
    resp.extensions_mut().insert(Upstream {
        addr: endpoint.addr,
        identity,
    });
}

/// The request head as a tap shows it, kept only while a tap is active.
struct Head {
    time_unix_ms: i64,
    method: http::Method,
    authority: String,
    path: String,
    headers: HeaderMap,
}

/// One request as the fleet view sees it, from its arrival to its response head.
pub(crate) struct Seen {
    pub(crate) direction: &'static str,
    pub(crate) route: Arc<str>,
    pub(crate) backend: Arc<str>,
    /// The caller's verified identity (inbound, mutual TLS).
    pub(crate) peer: Option<Arc<str>>,
    pub(crate) tls: bool,
    head: Option<Box<Head>>,
}

impl Seen {
    /// At a request's arrival on `conn`.
    pub(crate) fn begin<B>(taps: &Taps, conn: &ConnInfo, req: &http::Request<B>) -> Seen {
        let direction = conn.listener.direction();
        let peer = conn.peer_identity.clone();
        let head = taps.active().then(|| {
            Box::new(Head {
                time_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                method: req.method().clone(),
                authority: req
                    .uri()
                    .authority()
                    .map(|a| a.as_str().to_string())
                    .or_else(|| {
                        req.headers()
                            .get(http::header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .map(String::from)
                    })
                    .unwrap_or_default(),
                // The path only: a query can carry secrets.
                path: req.uri().path().to_string(),
                headers: req.headers().clone(),
            })
        });
        Seen {
            direction,
            route: EMPTY.clone(),
            backend: EMPTY.clone(),
            tls: peer.is_some(),
            peer,
            head,
        }
    }

    #[cfg(test)]
    pub(crate) fn for_test(
        direction: &'static str,
        route: Arc<str>,
        backend: Arc<str>,
        peer: Option<Arc<str>>,
    ) -> Seen {
        Seen {
            direction,
            route,
            backend,
            tls: peer.is_some(),
            peer,
            head: None,
        }
    }

    /// The request was routed.
    pub(crate) fn routed(&mut self, route: &Arc<str>, backend: &Arc<str>) {
        self.route = route.clone();
        self.backend = backend.clone();
    }

    /// At the response head: counts the request and shows it to matching taps.
    pub(crate) fn end(
        self,
        report: &crate::report::Collector,
        resp: &Response<Body>,
        latency: Duration,
    ) {
        let status = resp.status().as_u16();
        let grpc_status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok());
        report.observe(
            &self,
            status,
            grpc_status.is_some_and(|s| s != "0"),
            latency,
        );
        let Some(head) = &self.head else { return };
        let taps = report.taps.set.load();
        let facts = Facts {
            direction: self.direction,
            route: &self.route,
            path: &head.path,
            method: head.method.as_str(),
            status,
        };
        let upstream = resp.extensions().get::<Upstream>();
        for tap in taps.iter().filter(|t| t.matches(&facts)) {
            let (src, dst) = match self.direction {
                "inbound" => (
                    self.peer.as_deref().unwrap_or_default().to_string(),
                    String::new(),
                ),
                _ => (
                    String::new(),
                    upstream
                        .and_then(|u| u.identity.clone())
                        .unwrap_or_default(),
                ),
            };
            report.taps.emit(wire::TapEvent {
                tap_id: tap.id.clone(),
                time_unix_ms: head.time_unix_ms,
                direction: self.direction.into(),
                src_identity: src,
                tls: if self.direction == "inbound" {
                    self.tls
                } else {
                    upstream.is_some_and(|u| u.identity.is_some())
                },
                dst_identity: dst,
                method: head.method.to_string(),
                authority: head.authority.clone(),
                path: head.path.clone(),
                route: self.route.to_string(),
                backend: self.backend.to_string(),
                status: u32::from(status),
                grpc_status: grpc_status.unwrap_or_default().into(),
                latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
                endpoint: upstream.map(|u| u.addr.to_string()).unwrap_or_default(),
                headers: if tap.headers {
                    redact(&head.headers, &tap.redact)
                } else {
                    HashMap::new()
                },
                proxy_service: String::new(),
                proxy_node: String::new(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap(route: &str, prefix: &str, method: &str, status: &str, direction: &str) -> Tap {
        Tap::from(wire::TapRequest {
            id: "t".into(),
            route: route.into(),
            path_prefix: prefix.into(),
            method: method.into(),
            status: status.into(),
            direction: direction.into(),
            ..Default::default()
        })
    }

    #[test]
    fn filters_match_each_fact() {
        let f = Facts {
            direction: "inbound",
            route: "default/r/0",
            path: "/orders/7",
            method: "POST",
            status: 503,
        };
        for (t, want) in [
            (tap("", "", "", "", ""), true),
            (tap("default/r/0", "", "", "", ""), true),
            (tap("default/other/0", "", "", "", ""), false),
            (tap("", "/orders", "", "", ""), true),
            (tap("", "/products", "", "", ""), false),
            (tap("", "", "post", "", ""), true),
            (tap("", "", "GET", "", ""), false),
            (tap("", "", "", "503", ""), true),
            (tap("", "", "", "500", ""), false),
            (tap("", "", "", "5xx", ""), true),
            (tap("", "", "", "2xx", ""), false),
            (tap("", "", "", "bogus", ""), false),
            (tap("", "", "", "", "inbound"), true),
            (tap("", "", "", "", "outbound"), false),
        ] {
            assert_eq!(t.matches(&f), want, "{t:?}");
        }
    }

    #[test]
    fn status_filters_parse() {
        for (s, want) in [
            ("", Ok(StatusFilter::Any)),
            ("404", Ok(StatusFilter::Code(404))),
            ("4xx", Ok(StatusFilter::Class(4))),
            ("4XX", Ok(StatusFilter::Class(4))),
        ] {
            assert_eq!(StatusFilter::parse(s), want, "{s}");
        }
        for bad in ["6xx", "99", "abc", "0xx"] {
            assert!(StatusFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let taps = Taps::default();
        let event = || wire::TapEvent {
            tap_id: "t1".into(),
            ..Default::default()
        };
        // No stream yet: nothing to queue into.
        taps.emit(event());
        assert_eq!(taps.take_dropped(), HashMap::from([("t1".to_string(), 1)]));
        let mut rx = taps.events();
        for _ in 0..QUEUE + 5 {
            taps.emit(event());
        }
        assert_eq!(taps.take_dropped(), HashMap::from([("t1".to_string(), 5)]));
        assert!(taps.take_dropped().is_empty(), "taken");
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, QUEUE);
    }

    #[test]
    fn setting_taps_turns_the_gate_on_and_off() {
        let taps = Taps::default();
        assert!(!taps.active());
        taps.set(vec![wire::TapRequest {
            id: "t1".into(),
            ..Default::default()
        }]);
        assert!(taps.active());
        assert!(TAPPING.load(Ordering::Relaxed) >= 1);
        taps.set(Vec::new());
        assert!(!taps.active());
    }

    #[test]
    fn sensitive_and_named_headers_are_redacted() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer secret".parse().unwrap());
        h.insert("cookie", "a=b".parse().unwrap());
        h.insert("x-api-key", "k".parse().unwrap());
        h.insert("x-tenant", "t1".parse().unwrap());
        h.insert("accept", "text/plain".parse().unwrap());
        h.append("accept", "application/json".parse().unwrap());
        let shown = redact(&h, &["x-tenant".to_string()]);
        assert_eq!(shown["authorization"], REDACTED);
        assert_eq!(shown["cookie"], REDACTED);
        assert_eq!(shown["x-api-key"], REDACTED);
        assert_eq!(shown["x-tenant"], REDACTED);
        assert_eq!(shown["accept"], "text/plain, application/json");
        assert!(!format!("{shown:?}").contains("secret"));
    }
}
