//! Proxy metrics. The registry is a value owned by the proxy (never a global), so tests can
//! read the metrics of the proxy they started.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::ops::Deref;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use crate::golden::Latency;
use crate::parties::{Hop, Parties, Workload};
use arc_swap::ArcSwap;

/// Labels of a routed request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Route rule id (`namespace/route/rule`), `default` or `inbound`.
    pub route: Arc<str>,
    /// Backend (`namespace/service:port`), or empty when none was chosen.
    pub backend: Arc<str>,
}

/// Labels of a request and its latency: where it went and who the parties were.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Route rule id (`namespace/route/rule`), `default` or `inbound`.
    pub route: Arc<str>,
    /// Backend (`namespace/service:port`), or empty when none was chosen.
    pub backend: Arc<str>,
    /// Who sent it and who answered ([`crate::parties`]).
    #[prometheus(flatten)]
    pub parties: Parties,
}

/// Labels of a response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Route rule id.
    pub route: Arc<str>,
    /// Backend.
    pub backend: Arc<str>,
    /// Who sent it and who answered.
    #[prometheus(flatten)]
    pub parties: Parties,
    /// HTTP status code.
    pub status: u16,
    /// `1xx` .. `5xx`.
    pub class: &'static str,
    /// A gRPC response's numeric `grpc-status` (`0`..`16`), else empty.
    pub grpc_status: &'static str,
    /// Proxy error label when the proxy answered itself (`connect`, `timeout`, ...), else empty.
    pub error: &'static str,
}

/// Labels of a forwarded opaque TCP connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Backend (`namespace/service:port`, or `inbound/LISTENER`).
    pub backend: Arc<str>,
    /// Who connected and who answered.
    #[prometheus(flatten)]
    pub parties: Parties,
}

/// Labels of a forwarded opaque TCP connection's bytes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Backend.
    pub backend: Arc<str>,
    /// Who connected and who answered.
    #[prometheus(flatten)]
    pub parties: Parties,
    /// `sent` (client to backend) or `received` (backend to client).
    pub way: &'static str,
}

/// Labels of a connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Listener name.
    pub listener: Arc<str>,
}

/// Labels of an inbound connection's transport security.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecurityLabels {
    /// Listener name.
    pub listener: Arc<str>,
    /// `mtls`, `plaintext`, `refused_plaintext` (strict mode) or `refused_handshake`.
    pub security: &'static str,
}

/// Labels of a mutual TLS connection's caller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// Listener name.
    pub listener: Arc<str>,
    /// The caller's SPIFFE id.
    pub peer: Arc<str>,
}

/// Labels of an authorization decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// Listener name.
    pub listener: Arc<str>,
    /// `allow`, `deny`, or `audit_deny` (allowed, but an audit-mode policy would deny).
    pub decision: &'static str,
    /// What decided: a policy `namespace/name`, a `MeshConfig`, `default`, or
    /// `no-allow-policy-matched`.
    pub policy: Arc<str>,
}

/// Labels of a protocol detection outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `http1`, `http2`, `tcp`.
    pub protocol: &'static str,
    /// `detected`, `declared` or `timeout` (no bytes in time: treated as TCP).
    pub how: &'static str,
}

/// Labels of an inbound connection refused because its port's policy needs HTTP.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// Listener name.
    pub listener: Arc<str>,
    /// `detect_timeout` (no HTTP request line in time), `not_http` (bytes that are not an
    /// HTTP/1.0, HTTP/1.1 or HTTP/2 start), `request_line_too_long` or `declared_tcp` (the
    /// port is declared TCP).
    pub reason: &'static str,
}

/// Labels of a connection refused or shed at a cap.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// Listener name.
    pub listener: Arc<str>,
    /// `listener` (its own cap), `total` (the proxy's cap) or `accept_error` (the system
    /// refused, for example out of file descriptors).
    pub limit: &'static str,
}

/// Labels of a connection or stream closed for being quiet.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdleLabels {
    /// `tcp` (opaque TCP, including one that never sent a byte), `upgrade` (WebSocket and
    /// other upgraded streams), `http2` (a client connection with no open stream) or
    /// `stream` (an HTTP/2 stream that made no progress).
    pub kind: &'static str,
}

/// Labels of a failure counted against an endpoint: per backend, not per address, so the
/// series stay as few as the config's backends.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointFailureLabels {
    /// `namespace/name:port`.
    pub backend: Arc<str>,
    /// `connect`, `reset` (closed before a response), `protocol`, `timeout` or `5xx`.
    pub kind: &'static str,
}

/// Labels of a retry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// `namespace/name:port`.
    pub backend: Arc<str>,
    /// What failed: `connect_failure`, `reset`, `not_sent`, `timeout`, `5xx`,
    /// `gateway_error`, `status_code` or `grpc`.
    pub reason: &'static str,
}

/// Labels of an outlier ejection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutlierLabels {
    /// `namespace/name:port`.
    pub backend: Arc<str>,
    /// `consecutive_5xx`, `gateway_errors`, `latency` or `probe_failed`.
    pub reason: &'static str,
}

/// Labels of a per-backend series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `namespace/name:port`.
    pub backend: Arc<str>,
}

/// Labels of an endpoint choice made by the locality step.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalityLabels {
    /// `namespace/name:port`.
    pub backend: Arc<str>,
    /// The priority chosen: `zone`, `cluster`, `region` or `remote`.
    pub priority: &'static str,
}

/// Labels of a session persistence decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    /// Route rule id.
    pub route: Arc<str>,
    /// `new`, `resumed`, `moved`, `expired` or `invalid` (see `session::Outcome`).
    pub outcome: &'static str,
}

/// Labels of a request sent to a backend's fallback.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// The backend with no usable endpoint.
    pub backend: Arc<str>,
    /// The backend that took the request instead.
    pub fallback: Arc<str>,
}

/// Labels of an active health check's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthCheckLabels {
    /// `namespace/name:port`.
    pub backend: Arc<str>,
    /// `pass` or `fail`.
    pub result: &'static str,
}

/// Labels of a request or connection the circuit breaker refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    /// `namespace/name:port`.
    pub backend: Arc<str>,
    /// The limit: `maxConnections`, `maxPendingRequests` or `maxRequests`.
    pub limit: &'static str,
}

/// Labels of a Global rate limit's share.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GlobalShareLabels {
    /// The policy, `namespace/name`.
    pub policy: Arc<str>,
    /// The limit's name.
    pub limit: Arc<str>,
}

/// Labels of an injected fault.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    /// Route rule id.
    pub route: Arc<str>,
    /// `delay` or `abort`.
    pub kind: &'static str,
}

/// Labels of a mirrored copy that was cut off.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorDropLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Route rule id.
    pub route: Arc<str>,
    /// The mirror backend.
    pub backend: Arc<str>,
    /// `slow` (fell behind the request's body) or `failed` (its request failed).
    pub reason: &'static str,
}

/// Labels with a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Handles to one route and backend's series, made when a snapshot is built so the request
/// path does not hash label sets: the size histograms, and per set of parties (this
/// workload and the other side's identity, a handful per route) the request counter,
/// latency histogram and the counters of the common responses. Every series is created by
/// the route's first request, not with the snapshot: a sidecar that sees thousands of
/// routes sends to a few of them, and each pair of empty histograms cost ~1.3 KB. The
/// handles themselves are boxed behind one pointer until then, for the same reason.
#[derive(Debug)]
pub struct RouteStats {
    direction: &'static str,
    route: Arc<str>,
    backend: Arc<str>,
    used: OnceLock<Box<Used>>,
}

/// The handles of a route and backend that has had requests.
#[derive(Debug, Default)]
struct Used {
    sizes: OnceLock<Sizes>,
    parties: RwLock<Vec<Arc<PartyStats>>>,
}

/// A route and backend's body size histograms.
#[derive(Debug)]
pub struct Sizes {
    /// Request body bytes.
    pub request: Histogram,
    /// Response body bytes.
    pub response: Histogram,
}

/// One route, backend and set of parties' handles.
#[derive(Debug)]
pub struct PartyStats {
    own: Arc<Workload>,
    other: Option<Arc<str>>,
    /// The identity labels.
    pub parties: Parties,
    /// Requests routed.
    pub requests: Counter,
    /// Time to response headers.
    pub latency: Latency,
    /// Responses with status 200 (the common case, so it needs no label lookup either).
    pub ok: Counter,
    /// Responses with status 200 by gRPC status, made when first seen.
    grpc_ok: [OnceLock<Counter>; 17],
}

impl RouteStats {
    /// The size histograms, made by the first request.
    pub fn sizes(&self, metrics: &Metrics) -> &Sizes {
        self.used().sizes.get_or_init(|| {
            let labels = RouteLabels {
                direction: self.direction,
                route: self.route.clone(),
                backend: self.backend.clone(),
            };
            Sizes {
                request: metrics.request_size.get_or_create(&labels).clone(),
                response: metrics.response_size.get_or_create(&labels).clone(),
            }
        })
    }

    fn used(&self) -> &Used {
        self.used.get_or_init(Box::default)
    }

    /// The handles for the parties of `hop`, made when first seen.
    pub fn party(&self, metrics: &Metrics, own: &Arc<Workload>, hop: Hop<'_>) -> Arc<PartyStats> {
        let other = hop.identity();
        let same = |p: &&Arc<PartyStats>| Arc::ptr_eq(&p.own, own) && p.other.as_deref() == other;
        let used = self.used();
        if let Some(p) = read(&used.parties).iter().find(same) {
            return p.clone();
        }
        let mut all = used.parties.write().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = all.iter().find(same) {
            return p.clone();
        }
        let p = Arc::new(metrics.party_stats(
            self.direction,
            &self.route,
            &self.backend,
            own.clone(),
            hop,
        ));
        all.push(p.clone());
        p
    }
}

impl PartyStats {
    /// The counter of 200 responses with gRPC status `code` (0..=16).
    pub fn grpc_ok(&self, metrics: &Metrics, rs: &RouteStats, code: u8) -> Counter {
        let i = usize::from(code.min(16));
        self.grpc_ok[i]
            .get_or_init(|| {
                metrics
                    .responses
                    .get_or_create(&ResponseLabels {
                        direction: rs.direction,
                        route: rs.route.clone(),
                        backend: rs.backend.clone(),
                        parties: self.parties.clone(),
                        status: 200,
                        class: "2xx",
                        grpc_status: crate::golden::GRPC_STATUS[i],
                        error: "",
                    })
                    .clone()
            })
            .clone()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// A metric family that remembers its label sets, so that series of routes, backends and
/// listeners a config no longer has can be found and dropped ([`Metrics::prune`]).
pub struct Tracked<S, M, C = fn() -> M> {
    family: Family<S, M, C>,
    index: Mutex<HashSet<S>>,
}

impl<S: Clone + Hash + Eq, M: Default> Default for Tracked<S, M> {
    fn default() -> Self {
        Tracked::new(Family::default())
    }
}

impl<S: Clone + Hash + Eq, M, C: MetricConstructor<M> + Clone> Tracked<S, M, C> {
    fn new(family: Family<S, M, C>) -> Self {
        Tracked {
            family,
            index: Mutex::default(),
        }
    }

    /// The family, for registration.
    fn family(&self) -> Family<S, M, C> {
        self.family.clone()
    }

    /// The series for `labels`, created (and remembered) if new.
    pub fn get_or_create(&self, labels: &S) -> impl Deref<Target = M> + '_ {
        if let Some(m) = self.family.get(labels) {
            return m;
        }
        self.lock().insert(labels.clone());
        self.family.get_or_create(labels)
    }

    /// Drops every series whose labels `keep` refuses.
    pub(crate) fn retain(&self, keep: impl Fn(&S) -> bool) {
        let mut gone = Vec::new();
        self.lock().retain(|l| {
            let k = keep(l);
            if !k {
                gone.push(l.clone());
            }
            k
        });
        for l in &gone {
            self.family.remove(l);
        }
    }

    /// Series in the family.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the family has no series.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<S>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A route's (or the default route's) stats key: direction, route, backend.
type StatsKey = (&'static str, Arc<str>, Arc<str>);

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests routed.
    pub requests: Tracked<HttpLabels, Counter>,
    /// Responses by status.
    pub responses: Tracked<ResponseLabels, Counter>,
    /// Time to response headers, with trace exemplars.
    pub latency: Tracked<HttpLabels, Latency>,
    /// Request body bytes.
    pub request_size: Tracked<RouteLabels, Histogram>,
    /// Response body bytes.
    pub response_size: Tracked<RouteLabels, Histogram>,
    /// How long client connections stayed open.
    pub tcp_duration: Tracked<ConnLabels, Histogram>,
    /// Opaque TCP connections forwarded.
    pub tcp_forwarded: Tracked<TcpLabels, Counter>,
    /// Bytes of forwarded opaque TCP connections.
    pub tcp_forwarded_bytes: Tracked<TcpBytesLabels, Counter>,
    /// This proxy's workload, as of the active snapshot and certificate.
    workload: ArcSwap<Workload>,
    /// Identities of the active snapshot's endpoints: series of others go at the next prune.
    identities: Mutex<HashSet<Arc<str>>>,
    /// Requests copied by RequestMirror.
    pub mirrored: Tracked<RouteLabels, Counter>,
    /// Mirrored copies cut off or failed (the request they copy is never affected).
    pub mirror_dropped: Tracked<MirrorDropLabels, Counter>,
    /// Copies RequestMirror did not send because its backend does not resolve.
    pub mirror_backend_not_found: Tracked<RouteLabels, Counter>,
    /// Connections accepted.
    pub connections: Tracked<ConnLabels, Counter>,
    /// Connections open now.
    pub open_connections: Tracked<ConnLabels, Gauge>,
    /// Bytes read from clients.
    pub read_bytes: Tracked<ConnLabels, Counter>,
    /// Bytes written to clients.
    pub write_bytes: Tracked<ConnLabels, Counter>,
    /// Protocol detection outcomes.
    pub detect: Family<DetectLabels, Counter>,
    /// Config reloads.
    pub reloads: Family<ResultLabels, Counter>,
    /// Version of the active config snapshot.
    pub config_version: Gauge,
    /// 1 while a control-plane stream is up, 0 otherwise.
    pub control_connected: Gauge,
    /// Inbound connections by transport security.
    pub inbound_security: Tracked<SecurityLabels, Counter>,
    /// Expiry of this proxy's certificate, Unix seconds (0 without one).
    pub cert_expiry: Gauge,
    /// Authorization decisions at inbound listeners.
    pub authz: Tracked<AuthzLabels, Counter>,
    /// Mutual TLS connections by the caller's identity.
    pub peers: Tracked<PeerLabels, Counter>,
    /// Connections refused at a cap (none silent to shed) or by an accept error.
    pub refused: Tracked<LimitLabels, Counter>,
    /// Silent connections closed to make room for a new one.
    pub shed: Tracked<LimitLabels, Counter>,
    /// The configured cap on open connections, per listener.
    pub listener_limit: Tracked<ConnLabels, Gauge>,
    /// The configured cap on open connections over all listeners.
    pub total_limit: Gauge,
    /// Connections and streams closed for being quiet.
    pub idle_closed: Family<IdleLabels, Counter>,
    /// The stats handed to snapshots, by route and backend: a pair is live while some
    /// snapshot (or a listener or request still using one) holds its stats.
    stats: Mutex<HashMap<StatsKey, Weak<RouteStats>>>,
    /// Listeners of the active snapshot.
    listeners: Mutex<HashSet<Arc<str>>>,
    /// Inbound connections refused because their port's policy needs HTTP and they were not.
    pub inbound_refused: Tracked<RefusedLabels, Counter>,
    /// Failures counted against endpoints, which back them off in balancing.
    pub endpoint_failures: Tracked<EndpointFailureLabels, Counter>,
    /// Retries sent, by reason.
    pub retries: Tracked<RetryLabels, Counter>,
    /// Retries refused because the backend's retry budget was spent.
    pub retry_budget_exhausted: Tracked<BackendLabels, Counter>,
    /// Endpoint choices by locality priority.
    pub locality_picks: Tracked<LocalityLabels, Counter>,
    /// Requests sent to a fallback backend.
    pub fallbacks: Tracked<FallbackLabels, Counter>,
    /// Answered requests of rules with session persistence, by what their token said.
    pub sessions: Tracked<SessionLabels, Counter>,
    /// Outlier ejections by backend and reason.
    pub outlier_ejections: Tracked<OutlierLabels, Counter>,
    /// Endpoints ejected now, by backend (set when scraped).
    pub outlier_ejected: Tracked<BackendLabels, Gauge>,
    /// Active health check results by backend.
    pub health_checks: Tracked<HealthCheckLabels, Counter>,
    /// Active health checker tasks running.
    pub health_checkers: Gauge,
    /// Requests and connections refused by a backend's circuit breaker.
    pub breaker_rejected: Tracked<BreakerLabels, Counter>,
    /// What each circuit breaker limit counts now, and the limit (set when scraped).
    pub breaker_current: Tracked<BreakerLabels, Gauge>,
    /// The configured limits of each circuit breaker.
    pub breaker_limit: Tracked<BreakerLabels, Gauge>,
    /// Faults injected by a `FaultInjection`.
    pub faults: Tracked<FaultLabels, Counter>,
    // Rate limits (module `ratelimit`).
    /// Rate limit decisions, by policy, limit, unit and decision.
    pub rate_limit_decisions: Tracked<RateLimitLabels, Counter>,
    /// Requests of callers beyond a perSource limit's live-source bound, charged to its
    /// shared overflow bucket.
    pub rate_limit_overflow: Tracked<RateLimitOverflowLabels, Counter>,
    // Global rate limits (quota client).
    /// This sidecar's share of each Global limit, units per second, summed over sources.
    pub global_share: Tracked<GlobalShareLabels, Gauge<f64, AtomicU64>>,
    // Overload (adaptive concurrency): `trellis_concurrency_*`, read from the policies'
    // state at scrape time.
    /// Every OverloadPolicy state a snapshot holds.
    pub concurrency: Arc<crate::overload::Live>,
}

/// Labels of a rate limit decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// `inbound` or `outbound` (the policy's direction).
    pub direction: &'static str,
    /// The policy, `namespace/name`.
    pub policy: Arc<str>,
    /// The limit's name.
    pub limit: Arc<str>,
    /// `requests` or `connections`.
    pub unit: &'static str,
    /// `allowed` or `limited`.
    pub decision: &'static str,
}

/// Labels of a perSource limit's overflow.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitOverflowLabels {
    /// The policy, `namespace/name`.
    pub policy: Arc<str>,
    /// The limit's name.
    pub limit: Arc<str>,
}

/// 100µs .. ~26s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 19)
}

fn latency_histogram() -> Latency {
    Latency::new(latency_buckets())
}

fn duration_histogram() -> Histogram {
    // 1ms .. ~9h: connections live from a request to a database session.
    Histogram::new(exponential_buckets(0.001, 4.0, 13))
}

fn size_histogram() -> Histogram {
    // 64 B .. 64 MiB.
    Histogram::new(exponential_buckets(64.0, 4.0, 11))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let m = Metrics {
            requests: Tracked::default(),
            responses: Tracked::default(),
            latency: Tracked::new(Family::new_with_constructor(
                latency_histogram as fn() -> Latency,
            )),
            request_size: Tracked::new(Family::new_with_constructor(
                size_histogram as fn() -> Histogram,
            )),
            response_size: Tracked::new(Family::new_with_constructor(
                size_histogram as fn() -> Histogram,
            )),
            tcp_duration: Tracked::new(Family::new_with_constructor(
                duration_histogram as fn() -> Histogram,
            )),
            tcp_forwarded: Tracked::default(),
            tcp_forwarded_bytes: Tracked::default(),
            workload: ArcSwap::from_pointee(Workload::default()),
            identities: Mutex::default(),
            mirrored: Tracked::default(),
            mirror_dropped: Tracked::default(),
            mirror_backend_not_found: Tracked::default(),
            connections: Tracked::default(),
            open_connections: Tracked::default(),
            read_bytes: Tracked::default(),
            write_bytes: Tracked::default(),
            detect: Family::default(),
            reloads: Family::default(),
            config_version: Gauge::default(),
            control_connected: Gauge::default(),
            inbound_security: Tracked::default(),
            cert_expiry: Gauge::default(),
            authz: Tracked::default(),
            peers: Tracked::default(),
            refused: Tracked::default(),
            shed: Tracked::default(),
            listener_limit: Tracked::default(),
            total_limit: Gauge::default(),
            idle_closed: Family::default(),
            stats: Mutex::default(),
            listeners: Mutex::default(),
            inbound_refused: Tracked::default(),
            endpoint_failures: Tracked::default(),
            retries: Tracked::default(),
            retry_budget_exhausted: Tracked::default(),
            locality_picks: Tracked::default(),
            fallbacks: Tracked::default(),
            sessions: Tracked::default(),
            outlier_ejections: Tracked::default(),
            outlier_ejected: Tracked::default(),
            health_checks: Tracked::default(),
            health_checkers: Gauge::default(),
            breaker_rejected: Tracked::default(),
            breaker_current: Tracked::default(),
            breaker_limit: Tracked::default(),
            faults: Tracked::default(),
            rate_limit_decisions: Tracked::default(),
            rate_limit_overflow: Tracked::default(),
            global_share: Tracked::default(),
            concurrency: Arc::default(),
            registry: Registry::default(),
        };
        registry.register("http_requests", "HTTP requests routed", m.requests.family());
        registry.register(
            "http_responses",
            "HTTP responses by status, class and gRPC status",
            m.responses.family(),
        );
        registry.register(
            "http_response_latency_seconds",
            "Time from request to response headers",
            m.latency.family(),
        );
        registry.register(
            "http_request_size_bytes",
            "Request body bytes",
            m.request_size.family(),
        );
        registry.register(
            "http_response_size_bytes",
            "Response body bytes",
            m.response_size.family(),
        );
        registry.register(
            "tcp_connection_duration_seconds",
            "How long client connections stayed open",
            m.tcp_duration.family(),
        );
        registry.register(
            "tcp_forwarded_connections",
            "Opaque TCP connections forwarded to a backend",
            m.tcp_forwarded.family(),
        );
        registry.register(
            "tcp_forwarded_bytes",
            "Bytes of forwarded opaque TCP connections, sent to the backend or received from it",
            m.tcp_forwarded_bytes.family(),
        );
        registry.register(
            "http_mirrored_requests",
            "Requests copied by RequestMirror",
            m.mirrored.family(),
        );
        registry.register(
            "http_mirror_dropped",
            "Mirrored copies dropped: slow (fell behind the request body they copy) or failed",
            m.mirror_dropped.family(),
        );
        registry.register(
            "http_mirror_backend_not_found",
            "Requests RequestMirror would have copied to a backend that does not resolve",
            m.mirror_backend_not_found.family(),
        );
        registry.register(
            "tcp_connections",
            "Connections accepted",
            m.connections.family(),
        );
        registry.register(
            "tcp_open_connections",
            "Connections open now",
            m.open_connections.family(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from clients",
            m.read_bytes.family(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to clients",
            m.write_bytes.family(),
        );
        registry.register(
            "protocol_detections",
            "Protocol detection outcomes",
            m.detect.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reload attempts",
            m.reloads.clone(),
        );
        registry.register(
            "config_version",
            "Version of the active config snapshot",
            m.config_version.clone(),
        );
        registry.register(
            "control_plane_connected",
            "1 while the stream to the control plane is up",
            m.control_connected.clone(),
        );
        registry.register(
            "inbound_connections",
            "Inbound connections by transport security (mtls, plaintext, refused_plaintext, refused_handshake)",
            m.inbound_security.family(),
        );
        registry.register(
            "identity_certificate_expiry_timestamp_seconds",
            "When this proxy's workload certificate expires (Unix seconds; 0 without one)",
            m.cert_expiry.clone(),
        );
        registry.register(
            "inbound_mtls_peer_connections",
            "Inbound mutual TLS connections by the calling workload's SPIFFE id",
            m.peers.family(),
        );
        registry.register(
            "authz_decisions",
            "Authorization decisions at inbound listeners, with the policy that decided",
            m.authz.family(),
        );
        registry.register(
            "connections_refused",
            "Client connections refused at a cap with no silent connection to shed, or by an accept error",
            m.refused.family(),
        );
        registry.register(
            "connections_shed",
            "Client connections that had sent nothing, closed to make room at a cap",
            m.shed.family(),
        );
        registry.register(
            "connection_limit",
            "Cap on open client connections per listener",
            m.listener_limit.family(),
        );
        registry.register(
            "connection_limit_total",
            "Cap on open client connections over all listeners",
            m.total_limit.clone(),
        );
        registry.register(
            "idle_closed",
            "Connections and streams closed because nothing moved for their idle timeout",
            m.idle_closed.clone(),
        );
        registry.register(
            "inbound_refused",
            "Inbound connections refused, never forwarded, because their port's policy needs HTTP and they were not HTTP",
            m.inbound_refused.family(),
        );
        registry.register(
            "endpoint_failures",
            "Failures counted against an endpoint (it is then backed off in balancing), by backend and kind",
            m.endpoint_failures.family(),
        );
        registry.register(
            "retries",
            "Retries sent to a backend, by what failed",
            m.retries.family(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the backend's retry budget was spent",
            m.retry_budget_exhausted.family(),
        );
        registry.register(
            "locality_picks",
            "Endpoint choices by the locality step, by backend and the priority chosen (zone, cluster, region, remote)",
            m.locality_picks.family(),
        );
        registry.register(
            "fallback",
            "Requests sent to a backend's fallback because it had no usable endpoint",
            m.fallbacks.family(),
        );
        registry.register(
            "sessions",
            "Answered requests of rules with session persistence, by what their token said",
            m.sessions.family(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by backend and reason",
            m.outlier_ejections.family(),
        );
        registry.register(
            "outlier_ejected",
            "Endpoints of a backend ejected by outlier detection now",
            m.outlier_ejected.family(),
        );
        registry.register(
            "health_checks",
            "Active health check probes, by backend and result",
            m.health_checks.family(),
        );
        registry.register(
            "health_checkers",
            "Active health checker tasks running (one per checked endpoint and check)",
            m.health_checkers.clone(),
        );
        registry.register(
            "circuit_breaker_rejected",
            "Requests (and opaque TCP connections) refused at once because a backend's circuit breaker limit was reached, by backend and limit",
            m.breaker_rejected.family(),
        );
        registry.register(
            "circuit_breaker_current",
            "What a backend's circuit breaker limit counts now (maxConnections: connections open, maxPendingRequests: requests waiting for one, maxRequests: requests and upgraded streams in flight)",
            m.breaker_current.family(),
        );
        registry.register(
            "circuit_breaker_limit",
            "A backend's circuit breaker limit as configured",
            m.breaker_limit.family(),
        );
        registry.register(
            "faults_injected",
            "Faults injected by a FaultInjection, by route rule and kind (delay, abort)",
            m.faults.family(),
        );
        registry.register(
            "rate_limit_decisions",
            "Rate limit decisions (allowed, limited) by direction, policy, limit and unit",
            m.rate_limit_decisions.family(),
        );
        registry.register(
            "rate_limit_source_overflow",
            "Requests of callers beyond a perSource limit's 10,000 live sources, charged to its shared overflow bucket",
            m.rate_limit_overflow.family(),
        );
        registry.register(
            "rate_limit_global_share",
            "This sidecar's share of a Global rate limit (units per second, summed over per-source buckets), leased by the control plane",
            m.global_share.family(),
        );
        registry.register_collector(crate::overload::collector(&m.concurrency));
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The handles for `route` and `backend`: the ones already handed out while some
    /// snapshot holds them, else new.
    pub fn route_stats(
        &self,
        direction: &'static str,
        route: &Arc<str>,
        backend: &Arc<str>,
    ) -> Arc<RouteStats> {
        let key = (direction, route.clone(), backend.clone());
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = stats.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(RouteStats {
            direction,
            route: route.clone(),
            backend: backend.clone(),
            used: OnceLock::new(),
        });
        stats.insert(key, Arc::downgrade(&s));
        s
    }

    fn party_stats(
        &self,
        direction: &'static str,
        route: &Arc<str>,
        backend: &Arc<str>,
        own: Arc<Workload>,
        hop: Hop<'_>,
    ) -> PartyStats {
        let parties = crate::parties::parties(&own, hop);
        let labels = HttpLabels {
            direction,
            route: route.clone(),
            backend: backend.clone(),
            parties: parties.clone(),
        };
        let ok = ResponseLabels {
            direction,
            route: route.clone(),
            backend: backend.clone(),
            parties: parties.clone(),
            status: 200,
            class: "2xx",
            grpc_status: "",
            error: "",
        };
        PartyStats {
            own,
            other: hop.identity().map(Arc::from),
            requests: self.requests.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            ok: self.responses.get_or_create(&ok).clone(),
            parties,
            grpc_ok: Default::default(),
        }
    }

    /// This proxy's workload now.
    pub fn workload(&self) -> Arc<Workload> {
        self.workload.load_full()
    }

    /// Sets this proxy's workload (kept as is when unchanged, so the handles made for it
    /// stay valid) and the identities its endpoints have; series of other workloads and
    /// identities go at the next prune.
    pub fn set_parties(&self, w: Workload, identities: impl IntoIterator<Item = Arc<str>>) {
        if **self.workload.load() != w {
            self.workload.store(Arc::new(w));
        }
        *self.identities.lock().unwrap_or_else(|e| e.into_inner()) =
            identities.into_iter().collect();
    }

    /// Whether series with `parties` belong to the current workload and, outbound, to an
    /// identity some endpoint still has.
    fn parties_live(
        &self,
        direction: &str,
        p: &Parties,
        own: &Workload,
        identities: &HashSet<Arc<str>>,
    ) -> bool {
        if direction == "inbound" {
            p.dst_service == own.service
                && p.dst_namespace == own.namespace
                && p.dst_identity == own.identity
        } else {
            p.src_service == own.service
                && p.src_namespace == own.namespace
                && p.src_identity == own.identity
                && (p.dst_identity.is_empty() || identities.contains(&p.dst_identity))
        }
    }

    /// Records the listeners of the snapshot just installed, and prunes.
    pub fn set_listeners(&self, names: impl IntoIterator<Item = Arc<str>>) {
        *self.listeners.lock().unwrap_or_else(|e| e.into_inner()) = names.into_iter().collect();
        self.prune();
    }

    /// Drops the series of routes and backends no snapshot holds any more, and of listeners
    /// the active snapshot does not have, so that `/metrics` follows the config instead of
    /// growing with every service that ever existed. Runs after each reload and scrape.
    pub fn prune(&self) {
        let (pairs, routes) = {
            let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.retain(|_, s| s.strong_count() > 0);
            let pairs: HashSet<StatsKey> = stats.keys().cloned().collect();
            let routes: HashSet<Arc<str>> = pairs.iter().map(|(_, r, _)| r.clone()).collect();
            (pairs, routes)
        };
        // Requests that never reached a route or backend carry empty labels: always kept.
        let live = |direction: &'static str, route: &Arc<str>, backend: &Arc<str>| {
            route.is_empty()
                || (backend.is_empty() && routes.contains(route))
                || pairs.contains(&(direction, route.clone(), backend.clone()))
        };
        let own = self.workload.load_full();
        let identities = self
            .identities
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let party = |d: &str, p: &Parties| self.parties_live(d, p, &own, &identities);
        // Handles of gone parties are forgotten first, so none counts into a dropped series.
        for s in self
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(Weak::upgrade)
        {
            let Some(used) = s.used.get() else { continue };
            let mut all = used.parties.write().unwrap_or_else(|e| e.into_inner());
            all.retain(|p| party(s.direction, &p.parties));
        }
        self.requests
            .retain(|l| live(l.direction, &l.route, &l.backend) && party(l.direction, &l.parties));
        self.latency
            .retain(|l| live(l.direction, &l.route, &l.backend) && party(l.direction, &l.parties));
        self.responses
            .retain(|l| live(l.direction, &l.route, &l.backend) && party(l.direction, &l.parties));
        self.request_size
            .retain(|l| live(l.direction, &l.route, &l.backend));
        self.response_size
            .retain(|l| live(l.direction, &l.route, &l.backend));
        let backend_live = |b: &Arc<str>| pairs.iter().any(|(_, _, p)| p == b);
        self.tcp_forwarded
            .retain(|l| backend_live(&l.backend) && party(l.direction, &l.parties));
        self.tcp_forwarded_bytes
            .retain(|l| backend_live(&l.backend) && party(l.direction, &l.parties));
        self.mirrored.retain(|l| routes.contains(&l.route));
        self.mirror_dropped.retain(|l| routes.contains(&l.route));
        self.mirror_backend_not_found
            .retain(|l| routes.contains(&l.route));
        self.endpoint_failures.retain(|l| backend_live(&l.backend));
        self.retries.retain(|l| backend_live(&l.backend));
        self.retry_budget_exhausted
            .retain(|l| backend_live(&l.backend));
        self.locality_picks.retain(|l| backend_live(&l.backend));
        self.fallbacks
            .retain(|l| backend_live(&l.backend) && backend_live(&l.fallback));
        self.outlier_ejections.retain(|l| backend_live(&l.backend));
        self.outlier_ejected.retain(|l| backend_live(&l.backend));
        self.health_checks.retain(|l| backend_live(&l.backend));
        self.breaker_rejected.retain(|l| backend_live(&l.backend));
        self.breaker_current.retain(|l| backend_live(&l.backend));
        self.breaker_limit.retain(|l| backend_live(&l.backend));
        self.faults.retain(|l| routes.contains(&l.route));
        self.sessions.retain(|l| routes.contains(&l.route));
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let on = |l: &Arc<str>| listeners.contains(l);
        for f in [&self.connections, &self.read_bytes, &self.write_bytes] {
            f.retain(|l| on(&l.listener));
        }
        self.tcp_duration.retain(|l| on(&l.listener));
        self.open_connections.retain(|l| on(&l.listener));
        self.listener_limit.retain(|l| on(&l.listener));
        self.inbound_security.retain(|l| on(&l.listener));
        self.inbound_refused.retain(|l| on(&l.listener));
        self.authz.retain(|l| on(&l.listener));
        self.peers.retain(|l| on(&l.listener));
        self.refused.retain(|l| on(&l.listener));
        self.shed.retain(|l| on(&l.listener));
    }

    /// Adds metrics read at scrape time from state another module owns.
    pub fn register_collector(&mut self, c: Box<dyn prometheus_client::collector::Collector>) {
        self.registry.register_collector(c);
    }

    /// OpenMetrics text exposition, with exemplars and `# EOF`.
    pub fn encode(&self) -> String {
        // Series of a route removed while a request still held its old snapshot go now.
        self.prune();
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Prometheus text format 0.0.4: no exemplars, no `# EOF`.
    pub fn encode_text(&self) -> String {
        crate::golden::to_prometheus_text(&self.encode())
    }
}

impl Metrics {
    /// Counts an outlier ejection from `backend`.
    pub fn outlier_ejection(&self, backend: &Arc<str>, reason: &'static str) {
        self.outlier_ejections
            .get_or_create(&OutlierLabels {
                backend: backend.clone(),
                reason,
            })
            .inc();
    }

    /// Counts a health check probe of an endpoint of `backend`.
    pub fn health_check(&self, backend: &Arc<str>, passed: bool) {
        self.health_checks
            .get_or_create(&HealthCheckLabels {
                backend: backend.clone(),
                result: if passed { "pass" } else { "fail" },
            })
            .inc();
    }

    /// Counts a failure against an endpoint of `backend`.
    pub fn endpoint_failure(&self, backend: &Arc<str>, kind: &'static str) {
        self.endpoint_failures
            .get_or_create(&EndpointFailureLabels {
                backend: backend.clone(),
                kind,
            })
            .inc();
    }

    /// Counts a request or connection refused by `backend`'s circuit breaker.
    pub fn breaker_rejected(&self, backend: &Arc<str>, limit: crate::breaker::Limit) {
        self.breaker_rejected
            .get_or_create(&BreakerLabels {
                backend: backend.clone(),
                limit: limit.field(),
            })
            .inc();
    }

    /// Counts a fault injected on `route`.
    pub fn fault(&self, route: &Arc<str>, kind: &'static str) {
        self.faults
            .get_or_create(&FaultLabels {
                route: route.clone(),
                kind,
            })
            .inc();
    }

    /// Counts a retry sent to `backend`.
    pub fn retry(&self, backend: &Arc<str>, reason: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                backend: backend.clone(),
                reason,
            })
            .inc();
    }

    /// Counts a retry the budget of `backend` refused.
    pub fn retry_budget_exhausted(&self, backend: &Arc<str>) {
        self.retry_budget_exhausted
            .get_or_create(&BackendLabels {
                backend: backend.clone(),
            })
            .inc();
    }

    /// The counter of locality choices of `backend` at `priority` (an index into
    /// [`crate::locality::LABELS`]), handed to its balancer when the snapshot is built.
    pub fn locality_counter(&self, backend: &Arc<str>, priority: usize) -> Counter {
        self.locality_picks
            .get_or_create(&LocalityLabels {
                backend: backend.clone(),
                priority: crate::locality::LABELS[priority],
            })
            .clone()
    }

    /// The counter of requests `backend` sends to `fallback`.
    pub fn fallback_counter(&self, backend: &Arc<str>, fallback: &Arc<str>) -> Counter {
        self.fallbacks
            .get_or_create(&FallbackLabels {
                backend: backend.clone(),
                fallback: fallback.clone(),
            })
            .clone()
    }

    /// Counts a connection or stream closed for being quiet.
    pub fn idle(&self, kind: &'static str) {
        self.idle_closed.get_or_create(&IdleLabels { kind }).inc();
    }

    /// Counts an authorization verdict (and logs denials and audited denials).
    pub fn authz_verdict(
        &self,
        listener: &Arc<str>,
        v: &crate::authz::Verdict,
        what: &dyn std::fmt::Display,
    ) {
        let (decision, policy, _) = v.decision();
        let policy = policy.clone();
        if decision != "allow" {
            tracing::info!(listener = %listener, decision, policy = %policy, "authorization: {what}");
        }
        self.authz
            .get_or_create(&AuthzLabels {
                listener: listener.clone(),
                decision,
                policy,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route's handles take little room until its first request: a mesh-wide view makes
    /// one per rule and backend, thousands, and a sidecar sends to a few of them.
    #[test]
    fn unused_route_stats_are_small() {
        let shared = crate::Shared::new();
        let s =
            shared
                .metrics
                .route_stats("outbound", &"default/r/0".into(), &"default/a:80".into());
        assert!(s.used.get().is_none());
        let size = size_of::<RouteStats>();
        assert!(size <= 64, "{size} bytes");
    }
}
