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
    /// The resource, shared with the snapshot's `/config` text (see [`HeldSet::parse`]).
    #[serde(with = "shared_str")]
    pub json: Arc<str>,
}

/// `Arc<str>` as a JSON string (serde's `rc` feature would rebuild every crate using serde).
mod shared_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(s: &Arc<str>, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_str(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        String::deserialize(d).map(Arc::from)
    }
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
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        // Owner-only, like the rest of the state directory.
        trellis_identity::files::write_private(path, &bytes).map_err(|e| match e {
            trellis_identity::files::FileModeError::Io { source, .. } => io(source),
            other => io(std::io::Error::other(other.to_string())),
        })
    }

    /// The resources, parsed; each keeps its JSON text (shared, not copied), which is what
    /// `/config` shows: the control plane's text is the API's serialization of the resource.
    pub fn parse(&self) -> Result<Vec<Located<Resource>>, HeldError> {
        self.resources
            .iter()
            .map(|(key, h)| {
                Resource::from_json(&h.json)
                    .map(|r| {
                        Located::unsourced(r, &format!("{SOURCE} {key}")).with_json(h.json.clone())
                    })
                    .map_err(|message| HeldError::Parse {
                        key: key.clone(),
                        message,
                    })
            })
            .collect()
    }

    /// The set after applying one response's delta.
    pub fn with(&self, response: wire::StreamResponse) -> HeldSet {
        let mut next = self.clone();
        next.add(response);
        next
    }

    /// Applies one response, or one part of it, moving its resources in.
    pub fn add(&mut self, response: wire::StreamResponse) {
        self.version = response.system_version;
        for key in &response.removed {
            self.resources.remove(key);
        }
        for r in response.resources {
            self.resources.insert(
                r.key,
                Held {
                    version: r.version,
                    json: r.json.into(),
                },
            );
        }
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

/// How this process secures its connections to the control plane.
#[derive(Clone, Debug, Default)]
pub struct ControlTls {
    /// Plaintext (`--insecure` with an `http://` URL): tests and benchmarks only.
    pub insecure: bool,
    /// The trust bundle from `--ca-file`, for a proxy that holds no certificate yet.
    pub ca_bundle: Option<String>,
    /// The join token: authenticates before the first certificate, and its CA fingerprint
    /// pins the control plane when nothing else does.
    pub token: Option<String>,
}

/// The control plane presented a certificate this process does not trust: an impostor or
/// a misconfiguration; retrying does not help.
#[derive(Debug, thiserror::Error)]
#[error("untrusted control plane: {0}")]
pub struct Untrusted(pub String);

impl ControlTls {
    /// How the server is verified now: the bundle that came with this proxy's certificate,
    /// else `--ca-file`, else the join token's CA fingerprint.
    pub fn trust(
        &self,
        creds: Option<&Arc<trellis_identity::Credentials>>,
    ) -> Result<trellis_identity::ControlTrust, String> {
        use trellis_identity::ControlTrust;
        if let Some(c) = creds {
            return Ok(ControlTrust::Bundle(c.bundle_pem()));
        }
        if let Some(b) = &self.ca_bundle {
            return Ok(ControlTrust::Bundle(b.clone()));
        }
        if let Some(t) = &self.token {
            let parsed = trellis_identity::control::parse_token(t)?;
            if let Some(fp) = parsed.ca_fingerprint {
                return Ok(ControlTrust::Fingerprint(fp.to_string()));
            }
        }
        Err("no way to verify the control plane: pass --ca-file (the ca.pem `trellis control` writes) or a join token that carries the CA fingerprint (trellis token create)".into())
    }

    /// A channel to `url`, configured by `configure` (timeouts, keepalive): TLS with the
    /// server verified and `creds` presented as the client certificate, unless insecure.
    pub async fn connect(
        &self,
        url: &str,
        creds: Option<&Arc<trellis_identity::Credentials>>,
        configure: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Channel, String> {
        let endpoint = configure(self.endpoint(url)?);
        let result = match self.connector(creds)? {
            Some(c) => endpoint.connect_with_connector(c).await,
            None => endpoint.connect().await,
        };
        result.map_err(|e| format!("{url}: {}", error_chain(&e)))
    }

    /// Like [`ControlTls::connect`], connecting on first use.
    pub fn connect_lazy(
        &self,
        url: &str,
        creds: Option<&Arc<trellis_identity::Credentials>>,
        configure: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Channel, String> {
        let endpoint = configure(self.endpoint(url)?);
        Ok(match self.connector(creds)? {
            Some(c) => endpoint.connect_with_connector_lazy(c),
            None => endpoint.connect_lazy(),
        })
    }

    fn endpoint(&self, url: &str) -> Result<tonic::transport::Endpoint, String> {
        check_scheme(url, self.insecure)?;
        tonic::transport::Endpoint::from_shared(url.to_string()).map_err(|e| format!("{url}: {e}"))
    }

    fn connector(
        &self,
        creds: Option<&Arc<trellis_identity::Credentials>>,
    ) -> Result<Option<TlsConnect>, String> {
        if self.insecure {
            return Ok(None);
        }
        let trust = self.trust(creds)?;
        let config = trellis_identity::control::control_client_config(&trust, creds, &[b"h2"])
            .map_err(|e| e.to_string())?;
        Ok(Some(tls_connector(config)))
    }
}

/// Checks that `url` fits the security mode: `https://` normally, `http://` only with
/// `--insecure`.
pub fn check_scheme(url: &str, insecure: bool) -> Result<(), String> {
    match (url.split_once("://").map(|(s, _)| s), insecure) {
        (Some("https"), _) => Ok(()),
        (Some("http"), true) => Ok(()),
        (Some("http"), false) => Err(format!(
            "{url}: plaintext to the control plane needs --insecure (use https:// URLs)"
        )),
        _ => Err(format!("{url}: control plane URLs start with https://")),
    }
}

/// Every message in an error's source chain, so a TLS refusal is not reduced to
/// "transport error".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
type TlsConnect = tower::util::BoxCloneSyncService<http::Uri, TlsIo, std::io::Error>;

/// TCP then TLS to the URI's host, verifying the server by `config`.
fn tls_connector(config: Arc<rustls::ClientConfig>) -> TlsConnect {
    let connector = tokio_rustls::TlsConnector::from(config);
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| std::io::Error::other(format!("{host}: {e}")))?;
            let tls = connector.connect(name, tcp).await.map_err(|e| {
                let refused = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| {
                        matches!(
                            r,
                            rustls::Error::InvalidCertificate(_) | rustls::Error::General(_)
                        )
                    });
                if refused {
                    std::io::Error::other(Untrusted(e.to_string()))
                } else {
                    e
                }
            })?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    }))
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
    /// TLS and credentials for the control channel.
    pub tls: ControlTls,
    /// Called after every update, once its temporary copies are dropped, on the thread that
    /// applied it: the binary hands its allocator's freed pages back to the OS here. An idle
    /// sidecar's allocator would otherwise keep the apply's peak (docs/ARCHITECTURE.md).
    pub release: Option<fn()>,
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
    let creds = proxy.credentials();
    let channel = cfg
        .tls
        .connect(endpoint, creds.as_ref(), |e| {
            e.connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .await
        .map_err(tonic::Status::unavailable)?;
    let mut client = MeshClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    // The admin address as bound (a port 0 resolved), for the control plane's discovery.
    let node = wire::Node {
        metrics_address: proxy.admin_addr().to_string(),
        ..cfg.node.clone()
    };
    let hello = wire::StreamRequest {
        node: Some(wire::Node {
            // A mesh-wide view is megabytes: in parts, neither side keeps a stream buffer
            // that large.
            parts: true,
            ..node
        }),
        initial_versions: held
            .resources
            .iter()
            .map(|(k, h)| (k.clone(), h.version.clone()))
            .collect(),
        ..Default::default()
    };
    let _ = tx.send(hello).await;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    crate::identity::authorize(&mut request, proxy, &cfg.tls);
    let mut responses = client.stream(request).await?.into_inner();
    tracing::info!(%endpoint, "connected to the control plane");
    proxy.shared.metrics.control_connected.set(1);
    backoff.reset();
    // The parts received so far of a response sent in parts: its nonce and the set with them.
    let mut partial: Option<(String, HeldSet)> = None;
    while let Some(response) = responses.message().await? {
        let (nonce, version, more) = (
            response.nonce.clone(),
            response.system_version.clone(),
            response.more,
        );
        let next = match partial.take() {
            None => held.with(response),
            Some((n, mut next)) if n == nonce => {
                next.add(response);
                next
            }
            Some((n, _)) => {
                return Err(tonic::Status::internal(format!(
                    "the control plane sent response {nonce} before the last part of {n}"
                )));
            }
        };
        if more {
            partial = Some((nonce, next));
            continue;
        }
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
                drop(next);
                tracing::error!(%version, "config from the control plane refused; previous config keeps serving:\n{e}")
            }
        }
        // The parsed view, the old snapshot (or the refused set) and the persisted bytes are
        // gone by now. (mimalloc collects this thread's heap: with `--threads 1` that is the
        // data path's whole heap; other workers' freed pages wait for their own activity.)
        if let Some(release) = cfg.release {
            release();
        }
        let answer = wire::StreamRequest {
            response_nonce: nonce,
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
        let one = set.with(wire::StreamResponse {
            system_version: "5".into(),
            nonce: "1".into(),
            resources: vec![r("a", "1"), r("b", "1")],
            ..Default::default()
        });
        let two = one.with(wire::StreamResponse {
            system_version: "7".into(),
            nonce: "2".into(),
            resources: vec![r("b", "2")],
            removed: vec!["a".into()],
            ..Default::default()
        });
        assert_eq!(two.version, "7");
        assert_eq!(two.resources.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(two.resources["b"].version, "2");
        assert_eq!(one.resources.len(), 2, "the original is untouched");
    }

    /// `/config` shows a held resource from the held set's own text, not from a second copy,
    /// and that text is what serializing the parsed resource gives (what `/config` showed).
    #[test]
    fn the_snapshot_shares_the_held_text_for_config() {
        let local = trellis_api::parse_documents(
            "proxy.yaml",
            "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {name: p}\nspec:\n  outbound: [{name: mesh, address: \"127.0.0.1:0\", httpProxy: true}]\n",
        )
        .unwrap();
        let service = trellis_api::parse_documents(
            "svc.yaml",
            "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80}]\n  endpoints: [{address: \"127.0.0.1:1\"}]\n",
        )
        .unwrap()
        .remove(0)
        .value;
        let mut set = HeldSet::default();
        set.resources.insert(
            "Service/default/a".into(),
            Held {
                version: "1".into(),
                json: service.to_json().into(),
            },
        );
        let all = assemble(&local, set.parse().unwrap());
        let snap = crate::Snapshot::build(&all, 1, SOURCE, None, &crate::Shared::new()).unwrap();
        assert_eq!(snap.config.len(), 2);
        assert_eq!(*snap.config[0], *local[0].value.to_json());
        let held = &set.resources["Service/default/a"].json;
        assert!(Arc::ptr_eq(&snap.config[1], held), "a second copy");
        assert_eq!(*snap.config[1], *all[1].value.to_json());
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
