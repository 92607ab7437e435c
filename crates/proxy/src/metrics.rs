//! Proxy metrics. The registry is a value owned by the proxy (never a global), so tests can
//! read the metrics of the proxy they started.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

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

/// Labels of a response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Route rule id.
    pub route: Arc<str>,
    /// Backend.
    pub backend: Arc<str>,
    /// HTTP status code.
    pub status: u16,
    /// Proxy error label when the proxy answered itself (`connect`, `timeout`, ...), else empty.
    pub error: &'static str,
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

/// Labels with a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Handles to one route and backend's request counter and latency histogram, resolved when a
/// snapshot is built so the request path does not hash label sets.
#[derive(Debug)]
pub struct RouteStats {
    /// Requests routed.
    pub requests: Counter,
    /// Time to response headers.
    pub latency: Histogram,
    /// Responses with status 200 (the common case, so it needs no label lookup either).
    pub ok: Counter,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests routed.
    pub requests: Family<RouteLabels, Counter>,
    /// Responses by status.
    pub responses: Family<ResponseLabels, Counter>,
    /// Time to response headers.
    pub latency: Family<RouteLabels, Histogram>,
    /// Requests copied by RequestMirror.
    pub mirrored: Family<RouteLabels, Counter>,
    /// Connections accepted.
    pub connections: Family<ConnLabels, Counter>,
    /// Connections open now.
    pub open_connections: Family<ConnLabels, Gauge>,
    /// Bytes read from clients.
    pub read_bytes: Family<ConnLabels, Counter>,
    /// Bytes written to clients.
    pub write_bytes: Family<ConnLabels, Counter>,
    /// Protocol detection outcomes.
    pub detect: Family<DetectLabels, Counter>,
    /// Config reloads.
    pub reloads: Family<ResultLabels, Counter>,
    /// Version of the active config snapshot.
    pub config_version: Gauge,
    /// 1 while a control-plane stream is up, 0 otherwise.
    pub control_connected: Gauge,
    /// Inbound connections by transport security.
    pub inbound_security: Family<SecurityLabels, Counter>,
    /// Expiry of this proxy's certificate, Unix seconds (0 without one).
    pub cert_expiry: Gauge,
    /// Authorization decisions at inbound listeners.
    pub authz: Family<AuthzLabels, Counter>,
    /// Mutual TLS connections by the caller's identity.
    pub peers: Family<PeerLabels, Counter>,
    /// Inbound connections refused because their port's policy needs HTTP and they were not.
    pub inbound_refused: Family<RefusedLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 100µs .. ~26s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let m = Metrics {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            mirrored: Family::default(),
            connections: Family::default(),
            open_connections: Family::default(),
            read_bytes: Family::default(),
            write_bytes: Family::default(),
            detect: Family::default(),
            reloads: Family::default(),
            config_version: Gauge::default(),
            control_connected: Gauge::default(),
            inbound_security: Family::default(),
            cert_expiry: Gauge::default(),
            authz: Family::default(),
            peers: Family::default(),
            inbound_refused: Family::default(),
            registry: Registry::default(),
        };
        registry.register("http_requests", "HTTP requests routed", m.requests.clone());
        registry.register(
            "http_responses",
            "HTTP responses by status",
            m.responses.clone(),
        );
        registry.register(
            "http_response_latency_seconds",
            "Time from request to response headers",
            m.latency.clone(),
        );
        registry.register(
            "http_mirrored_requests",
            "Requests copied by RequestMirror",
            m.mirrored.clone(),
        );
        registry.register(
            "tcp_connections",
            "Connections accepted",
            m.connections.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "Connections open now",
            m.open_connections.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from clients",
            m.read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to clients",
            m.write_bytes.clone(),
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
            m.inbound_security.clone(),
        );
        registry.register(
            "identity_certificate_expiry_timestamp_seconds",
            "When this proxy's workload certificate expires (Unix seconds; 0 without one)",
            m.cert_expiry.clone(),
        );
        registry.register(
            "inbound_mtls_peer_connections",
            "Inbound mutual TLS connections by the calling workload's SPIFFE id",
            m.peers.clone(),
        );
        registry.register(
            "authz_decisions",
            "Authorization decisions at inbound listeners, with the policy that decided",
            m.authz.clone(),
        );
        registry.register(
            "inbound_refused",
            "Inbound connections refused, never forwarded, because their port's policy needs HTTP and they were not HTTP",
            m.inbound_refused.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The counter and histogram for `route` and `backend`.
    pub fn route_stats(
        &self,
        direction: &'static str,
        route: &Arc<str>,
        backend: &Arc<str>,
    ) -> Arc<RouteStats> {
        let labels = RouteLabels {
            direction,
            route: route.clone(),
            backend: backend.clone(),
        };
        let ok = ResponseLabels {
            direction,
            route: route.clone(),
            backend: backend.clone(),
            status: 200,
            error: "",
        };
        Arc::new(RouteStats {
            requests: self.requests.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            ok: self.responses.get_or_create(&ok).clone(),
        })
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Metrics {
    /// Counts an authorization verdict (and logs denials and audited denials).
    pub fn authz_verdict(
        &self,
        listener: &Arc<str>,
        v: &crate::authz::Verdict,
        what: &dyn std::fmt::Display,
    ) {
        let (decision, policy) = match (&v.audit_denied_by, v.allow) {
            (_, false) => ("deny", v.policy.clone()),
            (Some(a), true) => ("audit_deny", a.clone()),
            (None, true) => ("allow", v.policy.clone()),
        };
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
