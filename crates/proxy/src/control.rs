//! Following the control plane: one gRPC stream, deltas applied to the held resources,
//! every update ACKed or NACKed, the last accepted set persisted so a restarted proxy boots
//! from it when the control plane is unreachable (static stability), and reconnection with
//! exponential backoff and full jitter.

use crate::Proxy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_api::meta::Metadata;
use trellis_api::service::{ServicePort, ServiceSpec};
use trellis_api::wire::{self, mesh_client::MeshClient};
use trellis_api::{Kind, Located, Object, Resource, TRELLIS_API_VERSION};

/// The label resources from the control plane carry in errors and `/config`.
pub const SOURCE: &str = "control-plane";

/// One resource as received: its version and JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The control plane's version of it.
    pub version: String,
    /// The resource.
    pub json: String,
}

/// What a proxy holds from the control plane; persisted after every accepted update.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSet {
    /// The control plane's revision of this set.
    pub version: String,
    /// Key → resource.
    pub resources: BTreeMap<String, Held>,
}

/// Why the held set could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    /// A resource did not parse.
    #[error("{key}: {message}")]
    Parse {
        /// Its key.
        key: String,
        /// The parser's message.
        message: String,
    },
    /// Reading or writing the persisted file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl HeldSet {
    /// Reads a persisted set; `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<HeldSet>, HeldError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| HeldError::Parse {
                    key: path.display().to_string(),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HeldError::Io {
                path: path.into(),
                source,
            }),
        }
    }

    /// Writes the set atomically (temporary file, fsync, rename).
    pub fn persist(&self, path: &Path) -> Result<(), HeldError> {
        let io = |source| HeldError::Io {
            path: path.into(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The resources, parsed.
    pub fn parse(&self) -> Result<Vec<Located<Resource>>, HeldError> {
        self.resources
            .iter()
            .map(|(key, h)| {
                Resource::from_json(&h.json)
                    .map(|r| Located::unsourced(r, &format!("{SOURCE} {key}")))
                    .map_err(|message| HeldError::Parse {
                        key: key.clone(),
                        message,
                    })
            })
            .collect()
    }

    /// The set after applying one response's delta.
    pub fn with(&self, response: &wire::StreamResponse) -> HeldSet {
        let mut next = self.clone();
        next.version = response.system_version.clone();
        for key in &response.removed {
            next.resources.remove(key);
        }
        for r in &response.resources {
            next.resources.insert(
                r.key.clone(),
                Held {
                    version: r.version.clone(),
                    json: r.json.clone(),
                },
            );
        }
        next
    }
}

/// The full config: the proxy's local resources (its `Proxy`), what it holds from the
/// control plane, and an empty placeholder for every upstream the control plane has not
/// described yet (so the listener exists and answers 503 until it does).
pub fn assemble(
    local: &[Located<Resource>],
    remote: Vec<Located<Resource>>,
) -> Vec<Located<Resource>> {
    let mut out: Vec<Located<Resource>> = local.to_vec();
    let known: std::collections::BTreeSet<(String, String)> = local
        .iter()
        .chain(&remote)
        .filter(|r| r.value.kind() == Kind::Service)
        .map(|r| {
            let m = r.value.metadata();
            (m.namespace.clone(), m.name.clone())
        })
        .collect();
    let mut missing = std::collections::BTreeMap::new();
    for r in local {
        if let Resource::Proxy(p) = &r.value {
            for svc in p.spec.inbound.iter().filter_map(|l| l.service.as_ref()) {
                let k = (p.metadata.namespace.clone(), svc.clone());
                if !known.contains(&k) {
                    missing.entry(k).or_insert(80);
                }
            }
            for l in &p.spec.outbound {
                if let Some(t) = &l.service {
                    let ns = t
                        .namespace
                        .clone()
                        .unwrap_or_else(|| p.metadata.namespace.clone());
                    if !known.contains(&(ns.clone(), t.name.clone())) {
                        missing.insert((ns, t.name.clone()), t.port.unwrap_or(80));
                    }
                }
            }
        }
    }
    out.extend(remote);
    for ((namespace, name), port) in missing {
        out.push(Located::unsourced(
            Resource::Service(Object {
                api_version: TRELLIS_API_VERSION.into(),
                kind: Kind::Service.as_str().into(),
                metadata: Metadata {
                    name,
                    namespace,
                    ..Metadata::default()
                },
                spec: ServiceSpec {
                    ports: vec![ServicePort {
                        port,
                        ..ServicePort::default()
                    }],
                    ..ServiceSpec::default()
                },
                status: None,
            }),
            "placeholder (not yet known to the control plane)",
        ));
    }
    out
}

/// How to follow the control plane.
#[derive(Clone, Debug)]
pub struct Follow {
    /// Control plane URLs, for example `http://127.0.0.1:7070`; replicas are tried in turn.
    pub endpoints: Vec<String>,
    /// Who this proxy is and what it needs.
    pub node: wire::Node,
    /// The proxy's local resources.
    pub local: Vec<Located<Resource>>,
    /// Where the accepted set is persisted.
    pub state_file: Option<PathBuf>,
    /// A join token, to authenticate before this proxy has a certificate.
    pub token: Option<String>,
}

/// Follows the control plane until the proxy drains: connects, applies every update, and
/// reconnects with backoff after any failure. `held` is what the proxy booted with.
pub async fn follow(proxy: Arc<Proxy>, cfg: Follow, mut held: HeldSet) {
    let draining = proxy.shared.draining.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut next = 0;
    loop {
        let Some(endpoint) = cfg.endpoints.get(next % cfg.endpoints.len().max(1)) else {
            return;
        };
        let result = tokio::select! {
            () = draining.cancelled() => return,
            r = session(&proxy, &cfg, endpoint, &mut held, &mut backoff) => r,
        };
        // The next attempt goes to the next replica.
        next += 1;
        let delay = backoff.next_delay();
        match result {
            Ok(()) => {
                tracing::warn!(%endpoint, "control plane closed the stream; reconnecting in {delay:?}")
            }
            Err(e) => {
                tracing::warn!(%endpoint, error = %e.message(), "control plane unreachable; serving the last accepted config; retrying in {delay:?}")
            }
        }
        proxy.shared.metrics.control_connected.set(0);
        tokio::select! {
            () = draining.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: returns when the stream ends.
async fn session(
    proxy: &Proxy,
    cfg: &Follow,
    endpoint: &str,
    held: &mut HeldSet,
    backoff: &mut Backoff,
) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = MeshClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let hello = wire::StreamRequest {
        node: Some(cfg.node.clone()),
        initial_versions: held
            .resources
            .iter()
            .map(|(k, h)| (k.clone(), h.version.clone()))
            .collect(),
        ..Default::default()
    };
    let _ = tx.send(hello).await;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    crate::identity::authorize(&mut request, proxy, cfg.token.as_deref());
    let mut responses = client.stream(request).await?.into_inner();
    tracing::info!(%endpoint, "connected to the control plane");
    proxy.shared.metrics.control_connected.set(1);
    backoff.reset();
    while let Some(response) = responses.message().await? {
        let next = held.with(&response);
        let error = match next.parse() {
            Ok(remote) => match proxy.apply(&assemble(&cfg.local, remote), SOURCE).await {
                Ok(_) => None,
                Err(e) => Some(e.to_string()),
            },
            Err(e) => Some(e.to_string()),
        };
        match &error {
            None => {
                *held = next;
                tracing::info!(version = %held.version, resources = held.resources.len(), "config from the control plane applied");
                if let Some(path) = &cfg.state_file
                    && let Err(e) = held.persist(path)
                {
                    tracing::warn!(error = %e, "could not persist the accepted config");
                }
            }
            Some(e) => {
                tracing::error!(version = %response.system_version, "config from the control plane refused; previous config keeps serving:\n{e}")
            }
        }
        let answer = wire::StreamRequest {
            response_nonce: response.nonce,
            error: error.unwrap_or_default(),
            ..Default::default()
        };
        if tx.send(answer).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Exponential backoff with full jitter: each delay is uniform in `[0, cap]`, the cap
/// doubling up to `max`, so a fleet of proxies does not reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    cap: Duration,
}

impl Backoff {
    /// Starts at `base`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            cap: base,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap;
        self.cap = (self.cap * 2).min(self.max);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(crate::rand::below(nanos.max(1)))
    }

    /// Back to the first delay, after a successful connection.
    pub fn reset(&mut self) {
        self.cap = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let caps = [100, 200, 400, 800, 1000, 1000];
        for cap in caps {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(cap), "{d:?} > {cap}ms");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // Jitter: delays at the cap are not all equal.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::BTreeSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10);
    }

    #[test]
    fn deltas_add_replace_and_remove() {
        let set = HeldSet::default();
        let r = |key: &str, v: &str| wire::Resource {
            key: key.into(),
            version: v.into(),
            json: format!("{{\"v\":\"{v}\"}}"),
        };
        let one = set.with(&wire::StreamResponse {
            system_version: "5".into(),
            nonce: "1".into(),
            resources: vec![r("a", "1"), r("b", "1")],
            removed: vec![],
        });
        let two = one.with(&wire::StreamResponse {
            system_version: "7".into(),
            nonce: "2".into(),
            resources: vec![r("b", "2")],
            removed: vec!["a".into()],
        });
        assert_eq!(two.version, "7");
        assert_eq!(two.resources.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(two.resources["b"].version, "2");
        assert_eq!(one.resources.len(), 2, "the original is untouched");
    }

    #[test]
    fn persisted_set_round_trips() {
        let dir = std::env::temp_dir().join(format!("trellis-held-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snapshot.json");
        assert_eq!(HeldSet::load(&path).unwrap(), None);
        let mut set = HeldSet {
            version: "3".into(),
            ..HeldSet::default()
        };
        set.resources.insert(
            "Service/default/a".into(),
            Held {
                version: "x".into(),
                json: "{}".into(),
            },
        );
        set.persist(&path).unwrap();
        assert_eq!(HeldSet::load(&path).unwrap(), Some(set));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
