//! The control plane's in-memory view of the store: config resources and registered
//! workloads, rebuilt from the store's change stream. Immutable; each change makes a new one.

use crate::compile::{View, ViewKey};
use crate::store::{Change, Entry, Event, Loaded, Revision};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use trellis_api::{Kind, ObjectKey, Resource};

/// Store key of the marker every config commit updates, so that an apply validated against
/// one config revision cannot commit on top of another (see `api::apply`).
pub const CONFIG_MARKER: &str = "meta/config";

/// Store key of a config resource.
pub fn config_key(k: &ObjectKey) -> String {
    format!("config/{}/{}/{}", k.kind, k.namespace, k.name)
}

/// Store key of a registered workload.
pub fn workload_key(w: &Workload) -> String {
    format!("workloads/{}/{}/{}", w.namespace, w.service, w.id)
}

/// One registered instance of a service, written by the registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// The instance id; also its lease id, in hex.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// The service it registered as.
    pub service: String,
    /// `IP:PORT` of the instance's inbound sidecar.
    pub address: String,
    /// The service port clients address.
    pub port: u16,
    /// Labels; `app: <service>` is always present.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Locality zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Locality region (absent in registrations stored before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Locality cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The latest health the sidecar reported.
    pub healthy: bool,
    /// The registering proxy's node id.
    #[serde(default)]
    pub node: String,
    /// The SPIFFE id its sidecar presents, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// What stays the same across restarts of this instance (the app's `IP:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// When the registering process started (Unix ms): the newest one of a slot wins.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
}

#[cfg(test)]
impl Workload {
    /// A healthy instance of `default/service` at `address`, port 80, for tests.
    pub(crate) fn for_test(id: &str, service: &str, address: &str) -> Workload {
        Workload {
            id: id.into(),
            namespace: "default".into(),
            service: service.into(),
            address: address.into(),
            port: 80,
            labels: BTreeMap::new(),
            zone: None,
            region: None,
            cluster: None,
            healthy: true,
            node: String::new(),
            identity: None,
            slot: None,
            epoch: 0,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A stored join token, with what a compare-and-swap of its use count needs.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    /// The record.
    pub token: crate::identity::Token,
    /// The store revision that last wrote it.
    pub version: Revision,
    /// Its lease (it lapses with the token).
    pub lease: Option<crate::store::LeaseId>,
}

/// A stored config resource and its version.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The resource (without `resourceVersion`; [`Stored::with_version`] adds it).
    pub resource: Arc<Resource>,
    /// The store revision that last wrote it.
    pub version: Revision,
}

impl Stored {
    /// The resource as users see it, with `metadata.resourceVersion`.
    pub fn with_version(&self) -> Resource {
        let mut r = (*self.resource).clone();
        r.metadata_mut().resource_version = Some(self.version.to_string());
        r
    }
}

/// Everything the control plane knows, at one store revision.
#[derive(Default)]
pub struct State {
    /// The store revision this state reflects.
    pub revision: Revision,
    /// The version of [`CONFIG_MARKER`], if any config was ever written.
    pub config_marker: Option<Revision>,
    /// Config resources by key.
    pub config: BTreeMap<ObjectKey, Stored>,
    /// Registered workloads by id.
    pub workloads: BTreeMap<String, Arc<Workload>>,
    /// The certificate authority, once stored.
    pub ca: Option<Arc<crate::identity::StoredCa>>,
    /// Join tokens by hash.
    pub tokens: BTreeMap<String, TokenEntry>,
    /// SHA-256 of the admin token.
    pub admin_hash: Option<String>,
    /// Read-only API tokens by hash.
    pub readers: BTreeMap<String, crate::access::Reader>,
    /// Compiled proxy views, shared by every proxy with the same needs.
    pub(crate) views: Mutex<HashMap<ViewKey, Arc<View>>>,
}

impl State {
    /// A state holding the resources of `yaml` (tests).
    #[cfg(test)]
    pub(crate) fn of_yaml(yaml: &str) -> State {
        let mut state = State::default();
        for r in trellis_api::parse_documents("t.yaml", yaml).unwrap() {
            state.config.insert(
                r.value.key(),
                Stored {
                    resource: Arc::new(r.value),
                    version: 1,
                },
            );
        }
        state
    }

    /// The state of freshly opened store content.
    pub fn load(loaded: &Loaded) -> State {
        let mut s = State {
            revision: loaded.revision,
            ..State::default()
        };
        for e in &loaded.entries {
            s.put(e);
        }
        s
    }

    /// The state after `change`.
    pub fn apply(&self, change: &Change) -> State {
        let mut s = if change.reset {
            State::default()
        } else {
            State {
                revision: self.revision,
                config_marker: self.config_marker,
                config: self.config.clone(),
                workloads: self.workloads.clone(),
                ca: self.ca.clone(),
                tokens: self.tokens.clone(),
                admin_hash: self.admin_hash.clone(),
                readers: self.readers.clone(),
                views: Mutex::default(),
            }
        };
        s.revision = change.revision;
        for ev in &change.events {
            match ev {
                Event::Put(e) => s.put(e),
                Event::Delete(key) => s.delete(key),
            }
        }
        s
    }

    /// Registered workloads of one service, in id order.
    pub fn workloads_of<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads
            .values()
            .filter(move |w| w.namespace == namespace && w.service == service)
    }

    fn put(&mut self, e: &Entry) {
        let text = String::from_utf8_lossy(&e.value);
        if e.key == CONFIG_MARKER {
            self.config_marker = Some(e.version);
        } else if let Some(rest) = e.key.strip_prefix("config/") {
            match Resource::from_json(&text) {
                Ok(r) => {
                    self.config.insert(
                        r.key(),
                        Stored {
                            resource: Arc::new(r),
                            version: e.version,
                        },
                    );
                }
                // Only this control plane writes these keys, after validation; an entry it
                // cannot read comes from a newer version sharing the store.
                Err(err) => tracing::warn!(key = rest, %err, "skipping unreadable resource"),
            }
        } else if e.key == crate::identity::CA_KEY {
            match serde_json::from_str(&text) {
                Ok(ca) => self.ca = Some(Arc::new(ca)),
                Err(err) => tracing::warn!(%err, "skipping unreadable CA"),
            }
        } else if e.key == crate::identity::ADMIN_KEY {
            self.admin_hash = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["sha256"].as_str().map(String::from));
        } else if let Some(hash) = e.key.strip_prefix(crate::access::READER_PREFIX) {
            if let Ok(reader) = serde_json::from_str(&text) {
                self.readers.insert(hash.to_string(), reader);
            }
        } else if let Some(hash) = e.key.strip_prefix("tokens/") {
            if let Ok(token) = serde_json::from_str(&text) {
                self.tokens.insert(
                    hash.to_string(),
                    TokenEntry {
                        token,
                        version: e.version,
                        lease: e.lease,
                    },
                );
            }
        } else if e.key.starts_with("workloads/") {
            match serde_json::from_str::<Workload>(&text) {
                Ok(w) => {
                    self.workloads.insert(w.id.clone(), Arc::new(w));
                }
                Err(err) => tracing::warn!(key = e.key, %err, "skipping unreadable workload"),
            }
        }
    }

    fn delete(&mut self, key: &str) {
        if key == CONFIG_MARKER {
            self.config_marker = None;
        } else if let Some(rest) = key.strip_prefix("config/") {
            let mut parts = rest.splitn(3, '/');
            if let (Some(kind), Some(namespace), Some(name)) =
                (parts.next(), parts.next(), parts.next())
            {
                self.config.remove(&ObjectKey {
                    kind: kind.into(),
                    namespace: namespace.into(),
                    name: name.into(),
                });
            }
        } else if key == crate::identity::CA_KEY {
            self.ca = None;
        } else if let Some(hash) = key.strip_prefix("tokens/") {
            self.tokens.remove(hash);
        } else if let Some(hash) = key.strip_prefix(crate::access::READER_PREFIX) {
            self.readers.remove(hash);
        } else if let Some(rest) = key.strip_prefix("workloads/")
            && let Some(id) = rest.rsplit('/').next()
        {
            self.workloads.remove(id);
        }
    }

    /// Config resources of one kind, in key order.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Stored> {
        self.config
            .iter()
            .filter(move |(k, _)| k.kind == kind.as_str())
            .map(|(_, s)| s)
    }
}
