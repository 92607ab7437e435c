//! What `trellis check` and `trellis report capacity` read, on the config API (admin token
//! required): `GET /v1/health` (this replica's version and clock, its store and each etcd
//! endpoint, the CA, the trust bundle it serves, the workload certificates it knows) and
//! `GET /v1/capacity` (the capacity report).

use crate::Control;
use crate::capacity::{self, Objective};
use crate::store::EndpointHealth;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The answer of `GET /v1/health`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// This replica's version.
    pub version: String,
    /// Its clock when it answered (Unix milliseconds), for the clock-skew check.
    pub time_unix_ms: i64,
    /// The state revision it serves.
    pub revision: u64,
    /// Its store.
    pub store: StoreHealth,
    /// Its CA and the trust bundle it serves.
    pub ca: CaHealth,
    /// The workload certificates of the proxies connected to it.
    pub certificates: Certificates,
}

/// The store as this replica sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreHealth {
    /// `redb` or `etcd`.
    pub kind: String,
    /// A read went through just now.
    pub reachable: bool,
    /// Why not, when it did not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// etcd: each endpoint's own status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointHealth>,
}

/// The CA and the trust bundle.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaHealth {
    /// The trust domain.
    pub trust_domain: String,
    /// When the first root expires (Unix seconds).
    pub not_after_unix: Option<i64>,
    /// SHA-256 of each root in the bundle this replica serves, in order: replicas must agree.
    pub roots: Vec<String>,
    /// Why the CA is unusable, when it is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Workload certificates.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificates {
    /// The lifetime the CA issues (sidecars renew at two thirds of it).
    pub ttl_seconds: u64,
    /// Per connected proxy that presented one.
    pub proxies: Vec<ProxyCertificate>,
}

/// One proxy's certificate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCertificate {
    /// The proxy's node id.
    pub node: String,
    /// Its SPIFFE id.
    pub identity: String,
    /// Expiry, Unix seconds.
    pub not_after_unix: i64,
}

fn roots(bundle: &str) -> Vec<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(bundle.as_bytes())
        .flatten()
        .map(|c| trellis_identity::control::fingerprint(&c))
        .collect()
}

pub(crate) async fn health(State(c): State<Arc<Control>>) -> Response {
    let store = c.store.inner();
    let checked = tokio::time::timeout(Duration::from_secs(8), store.check())
        .await
        .unwrap_or_else(|_| {
            Err(crate::store::StoreError::Backend(
                "no answer within 8s".into(),
            ))
        });
    let store = match checked {
        Ok(endpoints) => StoreHealth {
            kind: store.kind().into(),
            reachable: true,
            error: String::new(),
            endpoints,
        },
        Err(e) => StoreHealth {
            kind: store.kind().into(),
            reachable: false,
            error: e.to_string(),
            endpoints: Vec::new(),
        },
    };
    let ca = match c.trust() {
        Ok((trust_domain, bundle)) => CaHealth {
            trust_domain,
            not_after_unix: trellis_identity::pem_not_after(&bundle),
            roots: roots(&bundle),
            error: String::new(),
        },
        Err(e) => CaHealth {
            error: e.to_string(),
            ..CaHealth::default()
        },
    };
    let mut proxies: Vec<ProxyCertificate> = c
        .proxies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter_map(|p| {
            let (identity, at) = p.certificate.clone()?;
            Some(ProxyCertificate {
                node: p.node.clone(),
                identity,
                not_after_unix: at,
            })
        })
        .collect();
    proxies.sort_by_key(|p| p.not_after_unix);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Json(Health {
        version: env!("CARGO_PKG_VERSION").into(),
        time_unix_ms: i64::try_from(now.as_millis()).unwrap_or(i64::MAX),
        revision: c.state().revision,
        store,
        ca,
        certificates: Certificates {
            ttl_seconds: c.settings.identity.cert_ttl.as_secs(),
            proxies,
        },
    })
    .into_response()
}

/// Parameters of `GET /v1/capacity`; absent ones take the control plane's defaults
/// (`trellis control --capacity-latency-objective`, `--capacity-target-utilization`).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CapacityParams {
    latency_objective_ms: Option<f64>,
    target_utilization: Option<f64>,
    cores_per_instance: Option<f64>,
    window: Option<String>,
}

pub(crate) async fn capacity(
    State(c): State<Arc<Control>>,
    Query(p): Query<CapacityParams>,
) -> Response {
    let bad = |m: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(crate::http::ErrorBody { errors: vec![m] }),
        )
            .into_response()
    };
    let mut o = c.settings.capacity.clone();
    if let Some(ms) = p.latency_objective_ms {
        if !(ms > 0.0 && ms.is_finite() && ms < 3_600_000.0) {
            return bad(format!("latencyObjectiveMs {ms}: between 0 and 3600000"));
        }
        o.latency_objective = Duration::from_secs_f64(ms / 1e3);
    }
    if let Some(u) = p.target_utilization {
        o.target_utilization = u;
    }
    if p.cores_per_instance.is_some() {
        o.cores_per_instance = p.cores_per_instance;
    }
    if let Err(e) = o.check() {
        return bad(e);
    }
    let window = match p.window.as_deref().filter(|w| !w.is_empty()) {
        None => capacity::DEFAULT_WINDOW,
        Some(w) => match trellis_api::duration::parse(w) {
            Ok(d) if d.get() >= Duration::from_secs(5) && d.get() <= crate::fleet::MAX_WINDOW => {
                d.get()
            }
            Ok(_) => return bad(format!("window {w}: between 5s and 600s")),
            Err(e) => return bad(format!("window: {e}")),
        },
    };
    Json(c.capacity(&o, window)).into_response()
}

impl Control {
    /// The capacity report over the last `window`.
    pub fn capacity(&self, o: &Objective, window: Duration) -> capacity::CapacityView {
        let now = tokio::time::Instant::now();
        let stats = self
            .fleet
            .view(window, &crate::fleet::Query::default(), now);
        let usage = self.fleet.usage(window, now);
        capacity::view(&stats, &usage, o, window)
    }
}
