//! The Trellis data plane: a protocol-aware sidecar proxy.
//!
//! A [`Proxy`] holds an immutable config [`Snapshot`](snapshot::Snapshot) that a source (a
//! file now, the control plane later) replaces atomically; the request path reads it without
//! locks. See `docs/ARCHITECTURE.md` for the request path and the threads and ports.
#![forbid(unsafe_code)]

pub mod accesslog;
mod admin;
pub mod attach;
mod attempt;
pub mod authz;
pub mod balance;
pub mod body;
pub mod breaker;
mod conns;
pub mod control;
pub mod cors;
mod deadline;
pub mod decide;
pub mod detect;
pub mod endpoint;
pub mod error;
pub mod explain;
pub mod fault;
pub mod filters;
pub mod golden;
mod h1;
pub mod health;
mod hop;
mod http;
pub mod identity;
mod io;
pub mod jwt;
pub mod limits;
pub mod locality;
pub mod metrics;
mod mirror;
pub mod otlp;
pub mod outlier;
pub mod overload;
pub mod packed;
pub mod parties;
pub mod quota;
mod rand;
pub mod ratelimit;
mod replay;
pub mod report;
pub mod retry;
pub mod route;
mod server;
pub mod session;
pub mod snapshot;
mod streams;
pub mod tap;
mod tcp;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod usage;
mod watch;

pub use error::{ERROR_HEADER, ProxyError};
pub use server::Shared;
pub use snapshot::Snapshot;
pub use watch::watch_file;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::Mutex;
use trellis_api::{Diagnostics, Located, Resource};

/// Why a config was not applied. The previous config keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The config is invalid.
    #[error("{0}")]
    Invalid(#[from] Diagnostics),
    /// A listener could not bind.
    #[error(transparent)]
    Bind(#[from] server::BindError),
    /// The access log cannot be opened.
    #[error(transparent)]
    Telemetry(#[from] telemetry::Error),
    /// The admin address cannot change while running.
    #[error("admin address cannot change while running ({0} -> {1}); restart the proxy")]
    AdminMoved(SocketAddr, SocketAddr),
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Mutex<server::Listeners>,
    admin: Arc<admin::AdminState>,
    admin_addr: SocketAddr,
    admin_configured: SocketAddr,
    admin_stop: tokio_util::sync::CancellationToken,
    checkers: health::Checkers,
}

impl Proxy {
    /// Validates and applies `resources`, binds the admin port and every listener, and
    /// starts serving.
    pub async fn start(
        resources: &[Located<Resource>],
        source: &str,
    ) -> Result<Arc<Proxy>, ApplyError> {
        let shared = Arc::new(Shared::new());
        let snap = Snapshot::build(resources, 1, source, None, &shared)?;
        let admin_std = std::net::TcpListener::bind(snap.settings.admin).map_err(|source| {
            server::BindError {
                name: "admin".into(),
                addr: snap.settings.admin,
                source,
            }
        })?;

        let admin = Arc::new(admin::AdminState {
            ready: false.into(),
        });
        let admin_stop = tokio_util::sync::CancellationToken::new();
        let admin_configured = snap.settings.admin;
        let admin_addr = admin::spawn(shared.clone(), admin.clone(), admin_std, admin_stop.clone())
            .map_err(|source| server::BindError {
                name: "admin".into(),
                addr: admin_configured,
                source,
            })?;
        let proxy = Arc::new(Proxy {
            shared,
            listeners: Mutex::new(server::Listeners::default()),
            admin,
            admin_addr,
            admin_configured,
            admin_stop,
            checkers: health::Checkers::default(),
        });
        if let Err(e) = proxy.install(snap).await {
            proxy.admin_stop.cancel();
            return Err(e);
        }
        proxy.admin.ready.store(true, Ordering::Release);
        Ok(proxy)
    }

    /// Validates `resources` as a whole and, only if everything is valid and every new
    /// listener binds, swaps it in. Returns the new version.
    pub async fn apply(
        &self,
        resources: &[Located<Resource>],
        source: &str,
    ) -> Result<u64, ApplyError> {
        let current = self.shared.snapshot();
        let built = Snapshot::build(
            resources,
            current.version + 1,
            source,
            Some(&current),
            &self.shared,
        );
        // The old snapshot is released as soon as the new one is in, so that its metric
        // series can be dropped.
        drop(current);
        let result = match built {
            Ok(snap) if snap.settings.admin != self.admin_configured => Err(
                ApplyError::AdminMoved(self.admin_configured, snap.settings.admin),
            ),
            Ok(snap) => self.install(snap).await,
            Err(e) => Err(e.into()),
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        self.shared
            .metrics
            .reloads
            .get_or_create(&metrics::ResultLabels { result: label })
            .inc();
        result
    }

    async fn install(&self, snap: Snapshot) -> Result<u64, ApplyError> {
        let mut listeners = self.listeners.lock().await;
        let sinks = self.shared.telemetry.prepare(&snap)?;
        let fresh = listeners.prepare(&snap)?;
        let version = snap.version;
        let snap = Arc::new(snap);
        self.shared.store(snap.clone());
        ratelimit::prune(&self.shared.metrics, &snap.limits);
        self.shared.telemetry.commit(sinks);
        listeners.commit(&self.shared, &snap, fresh);
        self.checkers.sync(&snap, &self.shared);
        self.shared.refresh_parties();
        self.shared
            .metrics
            .set_listeners(snap.listeners.iter().map(|l| l.name.clone()));
        Ok(version)
    }

    /// The active snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot()
    }

    /// Metrics in Prometheus text format 0.0.4.
    pub fn metrics_text(&self) -> String {
        outlier::refresh_gauges(&self.shared);
        breaker::refresh_gauges(&self.shared);
        self.shared.metrics.encode_text()
    }

    /// Metrics in OpenMetrics text format (with exemplars).
    pub fn metrics_openmetrics(&self) -> String {
        outlier::refresh_gauges(&self.shared);
        breaker::refresh_gauges(&self.shared);
        self.shared.metrics.encode()
    }

    /// Active health checker tasks that should be running.
    pub fn health_checkers(&self) -> usize {
        self.checkers.len()
    }

    /// The app this sidecar fronts (its process, which leads its own process group), whose
    /// CPU and memory the traffic reports carry.
    pub fn set_app_process(&self, pid: u32) {
        self.shared.report.app.set(pid);
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// A listener's bound address.
    pub async fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.lock().await.bound(name)
    }

    /// Graceful drain: stop accepting, let in-flight requests finish (HTTP/1 connections
    /// close after their current request, HTTP/2 ones get GOAWAY), and return when all work
    /// is done or `deadline` passes. Returns whether everything finished in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.admin.ready.store(false, Ordering::Release);
        self.shared.draining.cancel();
        self.shared.tasks.close();
        let done = tokio::time::timeout(deadline, self.shared.tasks.wait())
            .await
            .is_ok();
        self.admin_stop.cancel();
        done
    }
}
