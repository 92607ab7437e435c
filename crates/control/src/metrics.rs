//! The control plane's own metrics, served at `/metrics`: its connections (the cap the
//! channel enforces, what it refused) and the proxies it serves. Counts only: nothing here
//! names a workload, a token or a key, so the page needs no credentials.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why a connection was closed before it could serve a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `limit` (the connection cap was reached), `handshake` (TLS failed) or
    /// `handshake_timeout` (the client sent no complete handshake in time).
    pub reason: &'static str,
}

/// Registry and handles.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections open now.
    pub open: Gauge,
    /// The configured cap on open connections.
    pub limit: Gauge,
    /// Connections accepted (counted before the handshake).
    pub accepted: Counter,
    /// Connections closed before serving, by reason.
    pub refused: Family<RefusedLabels, Counter>,
    /// Proxies connected to this replica now.
    pub proxies: Gauge,
}

impl Metrics {
    /// A registry with every family registered; `limit` is the connection cap.
    pub fn new(limit: usize) -> Metrics {
        let (open, cap, accepted, proxies) = (
            Gauge::default(),
            Gauge::default(),
            Counter::default(),
            Gauge::default(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        cap.set(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut registry = Registry::with_prefix("trellis_control");
        registry.register("connections", "Open connections", open.clone());
        registry.register(
            "connection_limit",
            "Cap on open connections (--max-connections)",
            cap.clone(),
        );
        registry.register(
            "connections_accepted",
            "Connections accepted",
            accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed before serving a request, by reason",
            refused.clone(),
        );
        registry.register("proxies", "Proxies connected now", proxies.clone());
        Metrics {
            registry,
            open,
            limit: cap,
            accepted,
            refused,
            proxies,
        }
    }

    /// Counts a refused connection.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Holds one open connection in the `open` gauge.
pub(crate) struct OpenConnection(Gauge);

impl OpenConnection {
    pub(crate) fn new(g: &Gauge) -> Self {
        g.inc();
        OpenConnection(g.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
