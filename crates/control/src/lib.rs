//! The Trellis control plane: config API, durable store, registry, per-proxy view compiler
//! and the delta distribution stream. See `docs/ARCHITECTURE.md`.
//!
//! Data flow: writes (config applies, registrations) go to the [`store`]; every replica
//! rebuilds its in-memory [`State`](state::State) from the store's change stream, never from
//! its own writes, so replicas sharing an etcd converge on the same state; each proxy stream
//! compiles its [view](compile) of the latest state and sends the difference.
#![forbid(unsafe_code)]

pub mod access;
pub mod capacity;
pub mod check;
pub mod compile;
pub mod config;
pub mod discovery;
mod explain;
pub mod fleet;
mod fleet_api;
mod http;
pub mod identity;
mod intake;
mod mesh;
pub mod metrics;
pub mod quota;
pub mod registry;
pub mod route_status;
pub mod state;
pub mod store;
mod tls;
mod ui;

pub use config::{SourceFile, WriteError, WriteResult};
pub use mesh::{PART_BYTES, ProxyStatus};
pub use tls::{Limits, Peer};

use state::State;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Store, StoreError, StoreSpec};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A control-plane replica.
pub struct Control {
    pub(crate) store: store::Counted,
    state: watch::Receiver<Arc<State>>,
    /// Connected proxies, by namespace, claimed service and node id (`mesh::ProxyKey`).
    pub(crate) proxies: Mutex<BTreeMap<String, ProxyStatus>>,
    pub(crate) settings: Settings,
    pub(crate) ca_cache: identity::CaCache,
    /// Spends of join tokens on this replica, one at a time: a fleet starting with one token
    /// would otherwise lose its compare-and-swaps to itself (other replicas still race).
    pub(crate) token_spends: tokio::sync::Mutex<()>,
    /// Connection and proxy counts, served at `/metrics`.
    pub metrics: metrics::Metrics,
    /// When each route condition last changed, for the status `get` shows.
    pub(crate) transitions: route_status::Transitions,
    /// Proxies' traffic reports and open taps (`trellis stat`, `top`, `edges`, `tap`).
    pub fleet: Arc<fleet::Fleet>,
    /// Global rate limits: every sidecar's demand and this replica's division.
    pub(crate) quota: Arc<quota::Quota>,
    /// What gRPC requests may hold while they are read.
    pub(crate) intake: intake::Budgets,
    /// Open config streams per service (as many as report streams may be).
    pub(crate) config_streams: fleet::PerService,
}

/// Tunables.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Lease length granted to registered instances when they ask for none.
    pub default_ttl: Duration,
    /// The CA and workload certificates.
    pub identity: identity::IdentitySettings,
    /// Where a newly created admin token is written.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Where the trust bundle (public) is written for the CLI, `ca.pem` beside the admin
    /// token by default.
    pub ca_file: Option<std::path::PathBuf>,
    /// Serve plaintext instead of TLS (tests and benchmarks only).
    pub insecure: bool,
    /// Names (DNS or IP) for the server certificate besides the loopback names and the
    /// listen address.
    pub server_names: Vec<String>,
    /// Connection bounds.
    pub limits: Limits,
    /// What the capacity report and its metric aim for by default.
    pub capacity: capacity::Objective,
    /// How often etcd's history is compacted (to the revision of the time before); zero
    /// leaves it to etcd's own `--auto-compaction-retention`.
    pub store_compaction: Duration,
    /// Bytes the gRPC requests of one authenticated service's proxies may hold while read
    /// and decoded (`intake`); requests without credentials share a sixteenth of it.
    pub read_budget: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_ttl: Duration::from_secs(10),
            identity: identity::IdentitySettings::default(),
            admin_token_file: None,
            ca_file: None,
            insecure: false,
            server_names: Vec::new(),
            limits: Limits::default(),
            capacity: capacity::Objective::default(),
            store_compaction: Duration::from_secs(300),
            read_budget: intake::SERVICE_BUDGET,
        }
    }
}

impl Control {
    /// Opens the store and starts following its changes.
    pub async fn open(spec: &StoreSpec, settings: Settings) -> Result<Arc<Control>, StoreError> {
        // Keys and tokens at rest: refuse a store, token or key file others can read.
        let secret = |e: trellis_identity::files::FileModeError| StoreError::Backend(e.to_string());
        if let StoreSpec::Dir(dir) = spec {
            trellis_identity::files::private_dir(dir).map_err(secret)?;
            trellis_identity::files::check_private(&dir.join(store::REDB_FILE)).map_err(secret)?;
        }
        if let Some(f) = &settings.admin_token_file {
            trellis_identity::files::check_private(f).map_err(secret)?;
        }
        if let Some(f) = &settings.identity.key_file {
            trellis_identity::files::check_private(f).map_err(secret)?;
        }
        let (store, loaded, mut changes) = Store::open(spec).await?;
        let (tx, rx) = watch::channel(Arc::new(State::load(&loaded)));
        let quota = Arc::new(quota::Quota::default());
        quota.load(&loaded.entries);
        let records = quota.clone();
        tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                // Quota records change every interval: they must not rebuild the state
                // (and every proxy's view) each time.
                if !records.observe(&change) {
                    continue;
                }
                let next = tx.borrow().apply(&change);
                if tx.send(Arc::new(next)).is_err() {
                    break;
                }
            }
        });
        let metrics = metrics::Metrics::new(settings.limits.max_connections);
        let control = Arc::new(Control {
            store: store::Counted::new(store, &metrics),
            state: rx,
            proxies: Mutex::default(),
            metrics,
            intake: intake::Budgets::new(settings.read_budget),
            settings,
            ca_cache: identity::CaCache::default(),
            token_spends: tokio::sync::Mutex::new(()),
            transitions: route_status::Transitions::default(),
            fleet: Arc::default(),
            quota,
            config_streams: fleet::PerService::default(),
        });
        tokio::spawn(quota::run(Arc::downgrade(&control)));
        let every = control.settings.store_compaction;
        if control.store.inner().keeps_history() && !every.is_zero() {
            tokio::spawn(store::compact_history(Arc::downgrade(&control), every));
        }
        if let StoreSpec::Dir(dir) = spec {
            // redb creates its file with the process umask.
            trellis_identity::files::restrict(&dir.join(store::REDB_FILE)).map_err(secret)?;
        }
        control.ensure_ca().await?;
        control.ensure_admin().await?;
        control
            .trust()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        control.write_ca_file()?;
        Ok(control)
    }

    /// The latest state.
    pub fn state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    /// A receiver that sees every new state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.state.clone()
    }

    /// Waits (bounded) until the state reflects `revision`, so a reader of this replica
    /// sees its own writes.
    pub(crate) async fn wait_for(&self, revision: u64) {
        let mut rx = self.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|s| s.revision >= revision),
        )
        .await;
    }

    /// Waits (bounded) until the state moves past `revision`.
    pub(crate) async fn wait_newer(&self, revision: u64) {
        let mut rx = self.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            rx.wait_for(|s| s.revision > revision),
        )
        .await;
    }

    /// Connected proxies and what they last accepted or refused.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        self.proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Serves the config API (HTTP/JSON under `/v1/`) and the proxy protocol (gRPC) on one
/// listener until `shutdown` fires.
pub async fn serve(
    control: Arc<Control>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    http::serve(control, listener, shutdown).await
}
