//! Durable, versioned key-value storage with leases: what the control plane keeps its config
//! and registry in. Two backends with the same semantics: redb (embedded, one file in the data
//! directory; the default) and etcd (shared by several control-plane replicas).
//!
//! Semantics, modelled on etcd's so both backends agree:
//! - Every commit is atomic and gets the next store-wide revision; a key's `version` is the
//!   revision of the commit that last wrote it.
//! - A commit's ops carry preconditions ([`Expect`]); if any fails, nothing is written and the
//!   error names the key.
//! - A key may be attached to a lease; when the lease lapses (no keep-alive within its TTL)
//!   or is revoked, its keys are deleted by a commit of their own.
//! - [`Store::open`] returns the current entries and a channel of every later change in
//!   revision order (including changes made by other replicas and by lease expiry).

#[cfg(feature = "etcd")]
mod etcd;
mod redb;

#[cfg(feature = "etcd")]
pub use self::etcd::EtcdStore;
pub use self::redb::{FILE as REDB_FILE, RedbStore};

use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// A store-wide revision, increasing with every commit.
pub type Revision = u64;
/// A lease id.
pub type LeaseId = u64;

/// One stored key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key, for example `config/HTTPRoute/default/canary`.
    pub key: String,
    /// The value (JSON for everything the control plane stores).
    pub value: Vec<u8>,
    /// The revision that last wrote this key.
    pub version: Revision,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A precondition on one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// No precondition.
    Any,
    /// The key must not exist.
    Absent,
    /// The key must exist with this version.
    Version(Revision),
}

/// One write in a commit.
#[derive(Clone, Debug)]
pub struct Op {
    /// The key.
    pub key: String,
    /// The new value, or `None` to delete the key (deleting a missing key is not an error).
    pub value: Option<Vec<u8>>,
    /// The precondition.
    pub expect: Expect,
    /// Attach the key to this lease (puts only).
    pub lease: Option<LeaseId>,
}

impl Op {
    /// Put `value` at `key`.
    pub fn put(key: impl Into<String>, value: Vec<u8>, expect: Expect) -> Op {
        Op {
            key: key.into(),
            value: Some(value),
            expect,
            lease: None,
        }
    }

    /// Delete `key`.
    pub fn delete(key: impl Into<String>, expect: Expect) -> Op {
        Op {
            key: key.into(),
            value: None,
            expect,
            lease: None,
        }
    }
}

/// One change to one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was created or replaced.
    Put(Entry),
    /// The key was deleted.
    Delete(String),
}

/// What one commit changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The commit's revision.
    pub revision: Revision,
    /// The changes, in op order.
    pub events: Vec<Event>,
    /// When true, `events` holds the whole store as puts and replaces everything the consumer
    /// knew (after an etcd watch had to restart from a compacted revision).
    pub reset: bool,
}

/// The store's content when it was opened.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// The revision of the content.
    pub revision: Revision,
    /// Every entry.
    pub entries: Vec<Entry>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A precondition failed; nothing was written.
    #[error("{key} was changed concurrently (expected {expected}, found {found})")]
    Conflict {
        /// The key whose precondition failed.
        key: String,
        /// What the commit expected, readable.
        expected: String,
        /// What the store holds, readable.
        found: String,
    },
    /// The lease lapsed or never existed.
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The backend refused the commit as larger than it takes in one transaction (etcd's
    /// `--max-txn-ops` and `--max-request-bytes`); nothing was written. Says which limit.
    #[error("{0}")]
    TooLarge(String),
    /// The backend failed (I/O, connection, corruption).
    #[error("{0}")]
    Backend(String),
}

impl StoreError {
    pub(crate) fn backend(context: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend(format!("{context}: {e}"))
    }
}

/// Where the store lives, from `--store`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// A redb file inside this data directory.
    Dir(PathBuf),
    /// etcd endpoints (`http://host:port`), and the key prefix to keep everything under.
    Etcd {
        /// Client URLs.
        endpoints: Vec<String>,
        /// Key prefix, `/trellis/` by default.
        prefix: String,
    },
}

impl StoreSpec {
    /// Parses `--store`: `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`, or a directory path.
    pub fn parse(text: &str) -> Result<StoreSpec, String> {
        let Some(rest) = text.strip_prefix("etcd://") else {
            if text.contains("://") {
                return Err(format!(
                    "unknown store {text:?}: use a directory path or etcd://HOST:PORT"
                ));
            }
            return Ok(StoreSpec::Dir(PathBuf::from(text)));
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) if !p.is_empty() => (h, format!("/{}/", p.trim_matches('/'))),
            Some((h, _)) => (h, "/trellis/".to_string()),
            None => (rest, "/trellis/".to_string()),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{text:?} names no etcd endpoint"));
        }
        Ok(StoreSpec::Etcd { endpoints, prefix })
    }
}

/// An open store.
pub enum Store {
    /// The embedded backend.
    Redb(RedbStore),
    /// The etcd backend.
    #[cfg(feature = "etcd")]
    Etcd(EtcdStore),
}

impl Store {
    /// Opens (creating if needed) the store: its content now and every later change.
    pub async fn open(
        spec: &StoreSpec,
    ) -> Result<(Store, Loaded, mpsc::UnboundedReceiver<Change>), StoreError> {
        match spec {
            StoreSpec::Dir(dir) => {
                let (s, loaded, rx) = RedbStore::open(dir).await?;
                Ok((Store::Redb(s), loaded, rx))
            }
            #[cfg(feature = "etcd")]
            StoreSpec::Etcd { endpoints, prefix } => {
                let (s, loaded, rx) = EtcdStore::open(endpoints, prefix).await?;
                Ok((Store::Etcd(s), loaded, rx))
            }
            #[cfg(not(feature = "etcd"))]
            StoreSpec::Etcd { .. } => Err(StoreError::Backend(
                "this trellis was built without etcd support; build it with `--features etcd` (needs protoc: Debian's protobuf-compiler and libprotobuf-dev)".into(),
            )),
        }
    }

    /// Applies `ops` atomically if every precondition holds; returns the new revision.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        match self {
            Store::Redb(s) => s.commit(ops).await,
            #[cfg(feature = "etcd")]
            Store::Etcd(s) => s.commit(ops).await,
        }
    }

    /// Creates a lease that lapses `ttl` after its last keep-alive.
    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        match self {
            Store::Redb(s) => s.grant(ttl).await,
            #[cfg(feature = "etcd")]
            Store::Etcd(s) => s.grant(ttl).await,
        }
    }

    /// Renews a lease; [`StoreError::LeaseNotFound`] once it has lapsed.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self {
            Store::Redb(s) => s.keep_alive(lease).await,
            #[cfg(feature = "etcd")]
            Store::Etcd(s) => s.keep_alive(lease).await,
        }
    }

    /// Ends a lease now, deleting its keys.
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self {
            Store::Redb(s) => s.revoke(lease).await,
            #[cfg(feature = "etcd")]
            Store::Etcd(s) => s.revoke(lease).await,
        }
    }

    /// Whether the backend keeps history that needs [`Store::compact`] (etcd keeps every
    /// version of every key until compacted; redb keeps none).
    pub fn keeps_history(&self) -> bool {
        !matches!(self, Store::Redb(_))
    }

    /// The backend's revision now (redb: 0; it keeps no history).
    pub async fn head(&self) -> Result<Revision, StoreError> {
        match self {
            Store::Redb(_) => Ok(0),
            #[cfg(feature = "etcd")]
            Store::Etcd(s) => s.head().await,
        }
    }

    /// Drops the history before `revision` (redb: nothing to drop).
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        match self {
            Store::Redb(_) => Ok(()),
            #[cfg(feature = "etcd")]
            Store::Etcd(s) => s.compact(revision).await,
        }
    }
}

/// One etcd endpoint's answer to a status request (`trellis check`).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHealth {
    /// The endpoint's URL.
    pub endpoint: String,
    /// It answered and reported no errors.
    pub healthy: bool,
    /// What went wrong, when it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// It is the cluster's leader.
    #[serde(default)]
    pub leader: bool,
}

impl EndpointHealth {
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    fn failed(endpoint: &str, e: impl std::fmt::Display) -> EndpointHealth {
        EndpointHealth {
            endpoint: endpoint.into(),
            healthy: false,
            error: e.to_string(),
            leader: false,
        }
    }
}

impl Store {
    /// The backend's name: `redb` or `etcd`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Redb(_) => "redb",
            #[cfg(feature = "etcd")]
            Store::Etcd(_) => "etcd",
        }
    }

    /// Whether the store serves reads now, and (etcd) each endpoint's status.
    pub async fn check(&self) -> Result<Vec<EndpointHealth>, StoreError> {
        match self {
            Store::Redb(s) => s.check().await.map(|()| Vec::new()),
            #[cfg(feature = "etcd")]
            Store::Etcd(s) => s.check().await,
        }
    }
}

/// A [`Store`] whose every call is counted in the control plane's metrics by operation and
/// result (the same methods, so callers do not change).
pub struct Counted {
    inner: Store,
    ops: prometheus_client::metrics::family::Family<
        crate::metrics::StoreOpLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Counted {
    /// Counts `inner`'s calls into `metrics`.
    pub fn new(inner: Store, metrics: &crate::metrics::Metrics) -> Counted {
        Counted {
            inner,
            ops: metrics.store_ops.clone(),
        }
    }

    fn count<T>(&self, op: &'static str, r: Result<T, StoreError>) -> Result<T, StoreError> {
        crate::metrics::count_store_op(&self.ops, op, &r);
        r
    }

    /// The store underneath (its kind and health).
    pub fn inner(&self) -> &Store {
        &self.inner
    }

    /// See [`Store::commit`].
    pub async fn commit(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        let r = self.inner.commit(ops).await;
        self.count("commit", r)
    }

    /// See [`Store::grant`].
    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let r = self.inner.grant(ttl).await;
        self.count("grant", r)
    }

    /// See [`Store::keep_alive`].
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let r = self.inner.keep_alive(lease).await;
        self.count("keep_alive", r)
    }

    /// See [`Store::revoke`].
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let r = self.inner.revoke(lease).await;
        self.count("revoke", r)
    }

    /// See [`Store::compact`].
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let r = self.inner.compact(revision).await;
        self.count("compact", r)
    }
}

/// Every `every` while the control plane lives: compacts the store's history to the revision
/// it was at the previous time, so etcd keeps one to two intervals of history, as
/// kube-apiserver does with its own. Without it etcd keeps every version of every key (each
/// replica writes Global rate-limit records four times a second) until its backend quota
/// fills and it refuses all writes. Compacting to a revision another replica already passed
/// is harmless.
pub(crate) async fn compact_history(control: std::sync::Weak<crate::Control>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = None;
    loop {
        tick.tick().await;
        let Some(control) = control.upgrade() else {
            return;
        };
        if let Some(revision) = previous.take() {
            match control.store.compact(revision).await {
                Ok(()) => tracing::debug!(revision, "store history compacted"),
                Err(e) => tracing::warn!(error = %e, revision, "store history not compacted"),
            }
        }
        match control.store.inner().head().await {
            Ok(revision) => previous = Some(revision),
            Err(e) => tracing::warn!(error = %e, "store revision not read for compaction"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_spec_parsing() {
        let cases: &[(&str, Result<StoreSpec, &str>)] = &[
            (
                "/var/lib/trellis",
                Ok(StoreSpec::Dir("/var/lib/trellis".into())),
            ),
            (
                "etcd://127.0.0.1:2379",
                Ok(StoreSpec::Etcd {
                    endpoints: vec!["http://127.0.0.1:2379".into()],
                    prefix: "/trellis/".into(),
                }),
            ),
            (
                "etcd://a:1,b:2/mesh-a",
                Ok(StoreSpec::Etcd {
                    endpoints: vec!["http://a:1".into(), "http://b:2".into()],
                    prefix: "/mesh-a/".into(),
                }),
            ),
            ("etcd://", Err("names no etcd endpoint")),
            ("redis://x", Err("unknown store")),
        ];
        for (text, want) in cases {
            match (StoreSpec::parse(text), want) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "{text}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{text}: {got}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }
}
