//! The registry: instances register with a lease, renew it with heartbeats that carry their
//! health, and deregister when their app exits. A sidecar that vanishes stops renewing, its
//! lease lapses, and the store deletes its workload: every proxy's view follows.

use crate::Control;
use crate::state::{Workload, workload_key};
use crate::store::{Expect, LeaseId, Op, StoreError};
use std::time::Duration;
use trellis_api::meta::check_name;

/// Shortest and longest lease an instance may ask for.
pub const TTL_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registration is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The instance is unknown: its lease lapsed or it deregistered. Register again.
    #[error("instance {0} is not registered (lease lapsed or deregistered); register again")]
    NotFound(String),
    /// A newer process of the same instance (same slot) is registered: this one is stale.
    #[error(
        "instance slot {slot} is held by a newer process (instance {by}); not registering a stale one"
    )]
    Superseded {
        /// The slot.
        slot: String,
        /// The newer registration's id.
        by: String,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(StoreError),
}

/// What a registration for `slot` at `epoch` does to the instances registered before it.
#[derive(Debug, PartialEq, Eq)]
pub enum Supersede {
    /// Register, after removing these registrations (the same slot, from older or the same
    /// process): a restarted instance replaces its stale registration at once.
    Replace(Vec<String>),
    /// A newer process holds the slot: refuse, so a stale process cannot come back.
    Refuse {
        /// The newer registration.
        by: String,
    },
}

/// Pure: decides [`Supersede`] from `existing` (id, slot, epoch) registrations of the same
/// service. Without a slot nothing is superseded; epoch 0 (unknown) is the oldest.
pub fn supersede<'a>(
    slot: Option<&str>,
    epoch: u64,
    existing: impl IntoIterator<Item = (&'a str, Option<&'a str>, u64)>,
) -> Supersede {
    let Some(slot) = slot else {
        return Supersede::Replace(Vec::new());
    };
    let mut older = Vec::new();
    for (id, s, e) in existing {
        if s != Some(slot) {
            continue;
        }
        if e > epoch {
            return Supersede::Refuse { by: id.to_string() };
        }
        older.push(id.to_string());
    }
    Supersede::Replace(older)
}

/// What an instance registers.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// `IP:PORT` of its inbound sidecar.
    pub address: String,
    /// Service port.
    pub port: u16,
    /// Labels (`app` is set to the service).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Zone.
    pub zone: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Cluster.
    pub cluster: Option<String>,
    /// Initial health.
    pub healthy: bool,
    /// Registering node.
    pub node: String,
    /// The SPIFFE id its sidecar presents.
    pub identity: Option<String>,
    /// What stays the same when the instance restarts (the app's `IP:PORT`).
    pub slot: Option<String>,
    /// When the registering process started (Unix ms).
    pub epoch: u64,
    /// Requested lease; the default when `None`.
    pub ttl: Option<Duration>,
}

fn parse_id(id: &str) -> Result<LeaseId, RegistryError> {
    u64::from_str_radix(id, 16).map_err(|_| RegistryError::NotFound(id.to_string()))
}

impl Control {
    /// Registers an instance; returns its id and lease length.
    pub async fn register(&self, r: Registration) -> Result<(String, Duration), RegistryError> {
        check_name(&r.namespace).map_err(|e| RegistryError::Invalid(format!("namespace: {e}")))?;
        check_name(&r.service).map_err(|e| RegistryError::Invalid(format!("service: {e}")))?;
        if r.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(RegistryError::Invalid(format!(
                "address: {:?} is not an IP:PORT address",
                r.address
            )));
        }
        if let Some(id) = &r.identity
            && let Err(e) = trellis_identity::SpiffeId::parse(id)
        {
            return Err(RegistryError::Invalid(format!("identity: {e}")));
        }
        if r.port == 0 {
            return Err(RegistryError::Invalid("port: must be 1-65535".into()));
        }
        // A restarted instance replaces its stale registration now, not when its lease
        // lapses (a control-plane restart renews every lease it finds).
        let stale = {
            let state = self.state();
            let same = state
                .workloads
                .values()
                .filter(|w| w.namespace == r.namespace && w.service == r.service);
            supersede(
                r.slot.as_deref(),
                r.epoch,
                same.map(|w| (w.id.as_str(), w.slot.as_deref(), w.epoch)),
            )
        };
        match stale {
            Supersede::Refuse { by } => {
                return Err(RegistryError::Superseded {
                    slot: r.slot.unwrap_or_default(),
                    by,
                });
            }
            Supersede::Replace(ids) => {
                for id in ids {
                    match self.store.revoke(parse_id(&id)?).await {
                        Ok(()) | Err(StoreError::LeaseNotFound(_)) => {
                            tracing::info!(id, service = %r.service, "superseded by a newer process of the same instance")
                        }
                        Err(e) => return Err(RegistryError::Store(e)),
                    }
                }
            }
        }
        let ttl = r
            .ttl
            .unwrap_or(self.settings.default_ttl)
            .clamp(TTL_RANGE.0, TTL_RANGE.1);
        let lease = self.store.grant(ttl).await.map_err(RegistryError::Store)?;
        let mut labels = r.labels;
        labels.insert("app".into(), r.service.clone());
        let w = Workload {
            id: format!("{lease:x}"),
            namespace: r.namespace,
            service: r.service,
            address: r.address,
            port: r.port,
            labels,
            zone: r.zone,
            region: r.region,
            cluster: r.cluster,
            healthy: r.healthy,
            node: r.node,
            identity: r.identity,
            slot: r.slot,
            epoch: r.epoch,
        };
        self.put(&w, lease).await?;
        tracing::info!(id = %w.id, service = %w.service, address = %w.address, "registered");
        Ok((w.id, ttl))
    }

    /// Renews an instance's lease and records its health.
    pub async fn heartbeat(&self, id: &str, healthy: bool) -> Result<(), RegistryError> {
        let lease = parse_id(id)?;
        self.store.keep_alive(lease).await.map_err(|e| match e {
            StoreError::LeaseNotFound(_) => RegistryError::NotFound(id.to_string()),
            e => RegistryError::Store(e),
        })?;
        let current = self.state().workloads.get(id).cloned();
        if let Some(w) = current
            && w.healthy != healthy
        {
            let mut w = (*w).clone();
            w.healthy = healthy;
            tracing::info!(id, service = %w.service, healthy, "health changed");
            self.put(&w, lease).await?;
        }
        Ok(())
    }

    /// Removes an instance now.
    pub async fn deregister(&self, id: &str) -> Result<(), RegistryError> {
        let lease = parse_id(id)?;
        match self.store.revoke(lease).await {
            Ok(()) => {
                tracing::info!(id, "deregistered");
                Ok(())
            }
            Err(StoreError::LeaseNotFound(_)) => Err(RegistryError::NotFound(id.to_string())),
            Err(e) => Err(RegistryError::Store(e)),
        }
    }

    async fn put(&self, w: &Workload, lease: LeaseId) -> Result<(), RegistryError> {
        let value = serde_json::to_vec(w).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let mut op = Op::put(workload_key(w), value, Expect::Any);
        op.lease = Some(lease);
        let revision = self.store.commit(vec![op]).await.map_err(|e| match e {
            StoreError::LeaseNotFound(_) => RegistryError::NotFound(w.id.clone()),
            e => RegistryError::Store(e),
        })?;
        self.wait_for(revision).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_process_of_a_slot_replaces_older_ones_and_an_older_one_is_refused() {
        let a = "10.0.0.1:8080";
        let b = "10.0.0.2:8080";
        let existing = [
            ("1", Some(a), 100),
            ("2", Some(b), 300),
            ("3", None, 0),
            ("4", Some(a), 0),
        ];
        let replace =
            |ids: &[&str]| Supersede::Replace(ids.iter().map(|s| s.to_string()).collect());
        let cases: &[(Option<&str>, u64, Supersede)] = &[
            // No slot: nothing is superseded.
            (None, 500, replace(&[])),
            // A newer process: the older registrations of its slot go, others stay.
            (Some(a), 200, replace(&["1", "4"])),
            // The same process registering again (its lease lapsed): it replaces itself.
            (Some(a), 100, replace(&["1", "4"])),
            // An older process than the one registered: refused.
            (Some(b), 200, Supersede::Refuse { by: "2".into() }),
            // A slot nobody holds.
            (Some("10.0.0.3:1"), 1, replace(&[])),
        ];
        for (slot, epoch, want) in cases {
            assert_eq!(
                &supersede(*slot, *epoch, existing.iter().copied()),
                want,
                "{slot:?} at {epoch}"
            );
        }
    }
}
