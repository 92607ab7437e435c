//! The control plane's own metrics, served at `/metrics`: its connections (the cap the
//! channel enforces, what it refused), the proxies it serves, how fast they take config,
//! the store and the CA. Counts and times only: nothing here names a workload, a token or
//! a key, so the page needs no credentials.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why a connection was closed before it could serve a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `limit` (the connection cap was reached), `handshake` (TLS failed) or
    /// `handshake_timeout` (the client sent no complete handshake in time).
    pub reason: &'static str,
}

/// One store call and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabels {
    /// `commit`, `grant`, `keep_alive`, `revoke` or `compact`.
    pub op: &'static str,
    /// `ok`, `conflict` (a precondition failed), `not_found` (a lapsed lease) or `error`.
    pub result: &'static str,
}

/// How a certificate was obtained.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    /// `join` (with a join token) or `renewal` (with the current certificate).
    pub kind: &'static str,
}

/// Which budget a gRPC request is read under.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// `anonymous` (no credentials: a first `Certify`, its join token in the body) or
    /// `authenticated`.
    pub class: &'static str,
}

/// A gauge that is absent while it has no value (an empty family), so an alert on it
/// cannot fire on a made-up zero.
type Optional = Family<Vec<(String, String)>, Gauge>;

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
    /// From a config change (this replica seeing it) to the proxy's ACK of the update.
    pub push_seconds: Histogram,
    /// Updates proxies refused.
    pub nacks: Counter,
    /// Store calls by operation and result.
    pub store_ops: Family<StoreOpLabels, Counter>,
    /// Workload certificates issued, by kind.
    pub issued: Family<IssuedLabels, Counter>,
    /// Global limits: divisions made.
    pub quota_rebalances: Counter,
    /// Global limits: keys (policy, limit, source) being divided.
    pub quota_keys: Gauge,
    /// Global limits: sidecars whose demand counts.
    pub quota_instances: Gauge,
    /// Bytes charged to gRPC requests being read or decoded, by class (`intake`).
    pub request_bytes: Family<ClassLabels, Gauge>,
    /// The soonest expiry (Unix seconds) among connected proxies' certificates.
    cert_expiry: Optional,
    /// The CA certificate's expiry (Unix seconds).
    ca_expiry: Optional,
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
        // 1 ms to about 16 s.
        let push_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "config_push_seconds",
            "From a config change to the proxy's ACK of the update",
            push_seconds.clone(),
        );
        let nacks = Counter::default();
        registry.register(
            "config_nacks",
            "Config updates proxies refused",
            nacks.clone(),
        );
        let store_ops = Family::<StoreOpLabels, Counter>::default();
        registry.register(
            "store_operations",
            "Store calls by operation and result",
            store_ops.clone(),
        );
        let issued = Family::<IssuedLabels, Counter>::default();
        registry.register(
            "certificates_issued",
            "Workload certificates issued, by kind (join or renewal)",
            issued.clone(),
        );
        let (cert_expiry, ca_expiry) = (Optional::default(), Optional::default());
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Soonest expiry (Unix seconds) among connected proxies' certificates; absent without one",
            cert_expiry.clone(),
        );
        registry.register(
            "ca_expiry_timestamp_seconds",
            "Expiry (Unix seconds) of the CA certificate",
            ca_expiry.clone(),
        );
        let (quota_rebalances, quota_keys, quota_instances) =
            (Counter::default(), Gauge::default(), Gauge::default());
        registry.register(
            "quota_rebalances",
            "Global rate limits: divisions of every limit among its instances",
            quota_rebalances.clone(),
        );
        registry.register(
            "quota_keys",
            "Global rate limits: budgets (policy, limit, source) being divided",
            quota_keys.clone(),
        );
        registry.register(
            "quota_instances",
            "Global rate limits: sidecars whose recent demand counts",
            quota_instances.clone(),
        );
        let request_bytes = Family::<ClassLabels, Gauge>::default();
        registry.register(
            "grpc_request_bytes",
            "Bytes charged to gRPC requests being read or decoded (their messages and what \
             those may decode to), by budget class",
            request_bytes.clone(),
        );
        Metrics {
            registry,
            request_bytes,
            quota_rebalances,
            quota_keys,
            quota_instances,
            open,
            limit: cap,
            accepted,
            refused,
            proxies,
            push_seconds,
            nacks,
            store_ops,
            issued,
            cert_expiry,
            ca_expiry,
        }
    }

    /// Sets the soonest proxy certificate expiry, or removes it (`None`).
    pub fn set_certificate_expiry(&self, at: Option<i64>) {
        set_optional(&self.cert_expiry, at);
    }

    /// Sets the CA's expiry.
    pub fn set_ca_expiry(&self, at: Option<i64>) {
        set_optional(&self.ca_expiry, at);
    }

    /// Counts a refused connection.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.encode_with("")
    }

    /// The exposition with more families (`extra`, without an `# EOF`) before its end.
    pub fn encode_with(&self, extra: &str) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        out.push_str(extra);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

impl crate::Control {
    /// Sets the gauges read from state at scrape time: connected proxies, the soonest
    /// certificate expiry among them, and the CA's expiry.
    pub fn refresh_gauges(&self) {
        let (count, soonest) = {
            let proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
            let soonest = proxies
                .values()
                .filter_map(|p| p.certificate.as_ref().map(|(_, t)| *t))
                .min();
            (proxies.len(), soonest)
        };
        self.metrics
            .proxies
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.metrics.set_certificate_expiry(soonest);
        let ca = self
            .trust()
            .ok()
            .and_then(|(_, bundle)| trellis_identity::pem_not_after(&bundle));
        self.metrics.set_ca_expiry(ca);
        let (anonymous, authenticated) = self.intake.held();
        for (class, held) in [("anonymous", anonymous), ("authenticated", authenticated)] {
            self.metrics
                .request_bytes
                .get_or_create(&ClassLabels { class })
                .set(i64::try_from(held).unwrap_or(i64::MAX));
        }
    }
}

/// Counts one store call in `ops`.
pub(crate) fn count_store_op<T>(
    ops: &Family<StoreOpLabels, Counter>,
    op: &'static str,
    r: &Result<T, crate::store::StoreError>,
) {
    use crate::store::StoreError as E;
    let result = match r {
        Ok(_) => "ok",
        Err(E::Conflict { .. }) => "conflict",
        Err(E::LeaseNotFound(_)) => "not_found",
        Err(_) => "error",
    };
    ops.get_or_create(&StoreOpLabels { op, result }).inc();
}

fn set_optional(g: &Optional, at: Option<i64>) {
    match at {
        Some(t) => {
            g.get_or_create(&Vec::new()).set(t);
        }
        None => g.clear(),
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
