//! Following the control plane: one gRPC stream, deltas applied to the held resources,
//! every update ACKed or NACKed, the last accepted set persisted so a restarted proxy boots
//! from it when the control plane is unreachable (static stability), and reconnection with
//! exponential backoff and full jitter.

use crate::Proxy;
use crate::packed::{Packed, Unpacked};
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

/// One resource as received: its version and JSON (the persisted file's form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The control plane's version of it.
    pub version: String,
    /// The resource.
    pub json: String,
}

/// What a proxy holds from the control plane; persisted after every accepted update.
///
/// The resources' texts are kept packed, compressed together in key order (3,000 resources:
/// ~1.9 MB of JSON, ~110 KB packed), and inflated only while all of them are needed: to apply
/// a delta, to parse, to persist, and for `/config`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldSet {
    /// The control plane's revision of this set.
    pub version: String,
    /// Key → the control plane's version of that resource (for reconnecting).
    versions: BTreeMap<String, String>,
    /// The resources' texts in the order of `versions`; shared with the snapshot built
    /// from them, for `/config`.
    texts: Arc<Packed>,
}

/// The persisted file, as read: `{"version":…,"resources":{key:{"version":…,"json":…}}}`.
#[derive(Deserialize)]
struct Stored {
    version: String,
    resources: BTreeMap<String, Held>,
}

/// The persisted file, written from the inflated texts without copying them.
struct Persisting<'a> {
    version: &'a str,
    versions: &'a BTreeMap<String, String>,
    texts: &'a Unpacked,
}

impl Serialize for Persisting<'_> {
    fn serialize<S: serde::Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        #[derive(Serialize)]
        struct Entry<'a> {
            version: &'a str,
            json: &'a str,
        }
        struct Resources<'a>(&'a Persisting<'a>);
        impl Serialize for Resources<'_> {
            fn serialize<S: serde::Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
                let p = self.0;
                out.collect_map(
                    p.versions
                        .iter()
                        .zip(p.texts.iter())
                        .map(|((key, version), json)| (key, Entry { version, json })),
                )
            }
        }
        let mut s = out.serialize_struct("HeldSet", 2)?;
        s.serialize_field("version", self.version)?;
        s.serialize_field("resources", &Resources(self))?;
        s.end()
    }
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
    /// A set of `resources` at `version`.
    pub fn new(version: String, resources: BTreeMap<String, Held>) -> HeldSet {
        let texts = Arc::new(Packed::pack(resources.values().map(|h| h.json.as_str())));
        HeldSet {
            version,
            versions: resources.into_iter().map(|(k, h)| (k, h.version)).collect(),
            texts,
        }
    }

    /// How many resources.
    pub fn len(&self) -> usize {
        self.versions.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    /// Key → the control plane's version of that resource.
    pub fn versions(&self) -> &BTreeMap<String, String> {
        &self.versions
    }

    /// The packed texts, in key order.
    pub fn packed(&self) -> &Arc<Packed> {
        &self.texts
    }

    /// Every resource, inflated (a copy: for tests and tools, not kept).
    pub fn resources(&self) -> BTreeMap<String, Held> {
        let texts = self.texts.unpack();
        self.versions
            .iter()
            .zip(texts.iter())
            .map(|((k, v), json)| {
                (
                    k.clone(),
                    Held {
                        version: v.clone(),
                        json: json.into(),
                    },
                )
            })
            .collect()
    }

    /// Reads a persisted set; `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<HeldSet>, HeldError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice::<Stored>(&bytes)
                .map(|s| Some(HeldSet::new(s.version, s.resources)))
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
        let texts = self.texts.unpack();
        let bytes = serde_json::to_vec(&Persisting {
            version: &self.version,
            versions: &self.versions,
            texts: &texts,
        })
        .unwrap_or_default();
        drop(texts);
        // Owner-only, like the rest of the state directory.
        trellis_identity::files::write_private(path, &bytes).map_err(|e| match e {
            trellis_identity::files::FileModeError::Io { source, .. } => io(source),
            other => io(std::io::Error::other(other.to_string())),
        })
    }

    /// The resources, parsed; each notes its text's place in the packed set (shared, not
    /// copied), which is what `/config` shows: the control plane's text is the API's
    /// serialization of the resource.
    pub fn parse(&self) -> Result<Vec<Located<Resource>>, HeldError> {
        let texts = self.texts.unpack();
        let store: Arc<dyn std::any::Any + Send + Sync> = self.texts.clone();
        self.versions
            .keys()
            .zip(texts.iter())
            .enumerate()
            .map(|(i, (key, json))| {
                Resource::from_json(json)
                    .map(|r| {
                        Located::unsourced(r, &format!("{SOURCE} {key}"))
                            .with_text(store.clone(), i)
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
        self.with_parts(vec![response])
    }

    /// The set after applying the parts of one response, in order.
    pub fn with_parts(&self, parts: Vec<wire::StreamResponse>) -> HeldSet {
        let mut next = self.clone();
        next.add_parts(parts);
        next
    }

    /// Applies one response, moving its resources in.
    pub fn add(&mut self, response: wire::StreamResponse) {
        self.add_parts(vec![response]);
    }

    /// Applies responses in order, inflating and packing the texts once for all of them.
    fn add_parts(&mut self, parts: Vec<wire::StreamResponse>) {
        let Some(last) = parts.last() else { return };
        self.version = last.system_version.clone();
        if parts
            .iter()
            .all(|p| p.removed.is_empty() && p.resources.is_empty())
        {
            return;
        }
        let old = self.texts.unpack();
        let mut texts: BTreeMap<&str, &str> = self
            .versions
            .keys()
            .map(String::as_str)
            .zip(old.iter())
            .collect();
        for p in &parts {
            for key in &p.removed {
                texts.remove(key.as_str());
            }
            for r in &p.resources {
                texts.insert(&r.key, &r.json);
            }
        }
        let packed = Packed::pack(texts.into_values());
        drop(old);
        for p in parts {
            for key in &p.removed {
                self.versions.remove(key);
            }
            for r in p.resources {
                self.versions.insert(r.key, r.version);
            }
        }
        debug_assert_eq!(self.versions.len(), packed.len());
        self.texts = Arc::new(packed);
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
    /// The most one response may take while its parts are gathered ([`MAX_RESPONSE_BYTES`]).
    pub max_response_bytes: usize,
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

/// The most memory one response may take while its parts are gathered, by default
/// (`Follow::max_response_bytes`): its texts plus what holding each item costs. A mesh-wide
/// view of 1,000 services and 2,000 routes is ~2 MB, so this is ~30 such views; a control
/// plane that never sends the last part would otherwise grow the sidecar without end. Past
/// it the response is refused (NACK after its last part) and the previous config keeps
/// serving; past twice it, the stream is ended.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Gathers the parts of responses sent in parts (`StreamResponse.more`).
#[derive(Debug, Default)]
struct Gathering {
    /// The nonce of the response being gathered, once its first part is in.
    nonce: Option<String>,
    parts: Vec<wire::StreamResponse>,
    /// What the parts so far take ([`held_bytes`]), parts dropped after a refusal included.
    bytes: usize,
    /// Parts so far.
    count: usize,
    /// Why the response being gathered is refused: its further parts are dropped as they
    /// come, and the refusal is answered after its last.
    refused: Option<String>,
}

/// What one more message makes of the response it belongs to.
#[derive(Debug)]
enum Gathered {
    /// More parts follow.
    More,
    /// The last part is in: every part, in order.
    Whole(Vec<wire::StreamResponse>),
    /// The last part is in, and the response is refused for this reason.
    Refused(String),
}

impl Gathering {
    /// Adds `part`. A part of another response while one is unfinished breaks the protocol:
    /// an error, which ends the stream.
    fn add(&mut self, part: wire::StreamResponse, limit: usize) -> Result<Gathered, tonic::Status> {
        if let Some(n) = &self.nonce
            && *n != part.nonce
        {
            return Err(tonic::Status::internal(format!(
                "the control plane sent response {} before the last part of {n}",
                part.nonce
            )));
        }
        self.bytes = self.bytes.saturating_add(held_bytes(&part));
        self.count += 1;
        let more = part.more;
        if more && self.bytes > limit.saturating_mul(2) {
            // Still going: a NACK is only read after the last part, which may never come.
            return Err(tonic::Status::resource_exhausted(format!(
                "response {} goes on past twice the {limit} bytes a response may take ({} parts): ending the stream",
                part.nonce, self.count
            )));
        }
        if more && self.nonce.is_none() {
            self.nonce = Some(part.nonce.clone());
        }
        if self.refused.is_none() {
            if self.bytes > limit {
                self.parts = Vec::new();
                self.refused = Some(format!(
                    "response {} takes more than the {limit} bytes a response may ({} in its first {} parts): refused",
                    part.nonce, self.bytes, self.count
                ));
            } else {
                self.parts.push(part);
            }
        }
        if more {
            return Ok(Gathered::More);
        }
        let done = std::mem::take(self);
        Ok(match done.refused {
            Some(why) => Gathered::Refused(why),
            None => Gathered::Whole(done.parts),
        })
    }
}

/// What holding `part` until its response is whole costs: its texts, and each item's
/// own size, so that empty items (a few bytes on the wire each) count too.
fn held_bytes(part: &wire::StreamResponse) -> usize {
    let resources = part
        .resources
        .iter()
        .map(|r| size_of::<wire::Resource>() + r.key.len() + r.version.len() + r.json.len());
    let removed = part.removed.iter().map(|k| size_of::<String>() + k.len());
    size_of::<wire::StreamResponse>()
        + part.nonce.len()
        + part.system_version.len()
        + resources.chain(removed).sum::<usize>()
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
            .versions()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
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
    // A response sent in parts is applied once its last part is in (the held texts are
    // repacked once, not once a part), and refused past `max_response_bytes`.
    let mut gathering = Gathering::default();
    while let Some(response) = responses.message().await? {
        let (nonce, version) = (response.nonce.clone(), response.system_version.clone());
        let error = match gathering.add(response, cfg.max_response_bytes)? {
            Gathered::More => continue,
            Gathered::Refused(why) => Some(why),
            Gathered::Whole(parts) => take(proxy, cfg, held, parts).await.err(),
        };
        if let Some(e) = &error {
            tracing::error!(%version, "config from the control plane refused; previous config keeps serving:\n{e}");
        }
        // The parsed view, the old snapshot (or the refused set or parts) and the persisted
        // bytes are gone by now. (mimalloc collects this thread's heap: with `--threads 1`
        // that is the data path's whole heap; other workers' freed pages wait for their own
        // activity.)
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

/// Applies a whole response: the held set it makes, parsed and applied over the local
/// resources, becomes `held` (and is persisted) only if all of that succeeds.
async fn take(
    proxy: &Proxy,
    cfg: &Follow,
    held: &mut HeldSet,
    parts: Vec<wire::StreamResponse>,
) -> Result<(), String> {
    let next = held.with_parts(parts);
    let remote = next.parse().map_err(|e| e.to_string())?;
    proxy
        .apply(&assemble(&cfg.local, remote), SOURCE)
        .await
        .map_err(|e| e.to_string())?;
    *held = next;
    tracing::info!(version = %held.version, resources = held.len(), "config from the control plane applied");
    if let Some(path) = &cfg.state_file
        && let Err(e) = held.persist(path)
    {
        tracing::warn!(error = %e, "could not persist the accepted config");
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

    /// A wire resource whose text names its key and version.
    fn wire(key: &str, version: &str) -> wire::Resource {
        wire::Resource {
            key: key.into(),
            version: version.into(),
            json: format!("{{\"key\":\"{key}\",\"v\":\"{version}\"}}"),
        }
    }

    /// Deltas (in one response or in parts) give the texts and versions that applying them
    /// to a plain map gives, and leave the set they were applied to as it was.
    #[test]
    fn deltas_add_replace_and_remove() {
        /// One response: its resources as (key, version), and the keys it removes.
        type Response = (Vec<(&'static str, &'static str)>, Vec<&'static str>);
        struct Case {
            name: &'static str,
            responses: Vec<Response>,
        }
        let cases = [
            Case {
                name: "add to an empty set",
                responses: vec![(vec![("a", "1"), ("b", "1")], vec![])],
            },
            Case {
                name: "replace and remove",
                responses: vec![
                    (vec![("a", "1"), ("b", "1"), ("c", "1")], vec![]),
                    (vec![("b", "2")], vec!["a"]),
                ],
            },
            Case {
                name: "remove everything, then add back",
                responses: vec![
                    (vec![("a", "1"), ("b", "1")], vec![]),
                    (vec![], vec!["a", "b", "unknown"]),
                    (vec![("b", "3")], vec![]),
                ],
            },
            Case {
                name: "a removal and a re-add in one response",
                responses: vec![
                    (vec![("a", "1"), ("z", "1")], vec![]),
                    (vec![("a", "2"), ("m", "1")], vec!["a", "z"]),
                ],
            },
            Case {
                name: "nothing changes but the version",
                responses: vec![(vec![("a", "1")], vec![]), (vec![], vec![])],
            },
        ];
        for case in cases {
            let mut set = HeldSet::default();
            let mut parts = HeldSet::default();
            let mut model: BTreeMap<String, Held> = BTreeMap::new();
            for (n, (resources, removed)) in case.responses.iter().enumerate() {
                let version = format!("v{n}");
                let response = wire::StreamResponse {
                    system_version: version.clone(),
                    nonce: n.to_string(),
                    resources: resources.iter().map(|(k, v)| wire(k, v)).collect(),
                    removed: removed.iter().map(|k| k.to_string()).collect(),
                    ..Default::default()
                };
                for key in removed {
                    model.remove(*key);
                }
                for r in &response.resources {
                    model.insert(
                        r.key.clone(),
                        Held {
                            version: r.version.clone(),
                            json: r.json.clone(),
                        },
                    );
                }
                // The same response in parts: removals in one, each resource in its own.
                let mut split = vec![wire::StreamResponse {
                    removed: response.removed.clone(),
                    more: true,
                    ..response.clone()
                }];
                split[0].resources.clear();
                split.extend(response.resources.iter().map(|r| wire::StreamResponse {
                    resources: vec![r.clone()],
                    removed: vec![],
                    more: true,
                    ..response.clone()
                }));
                let before = set.clone();
                let next = set.with(response);
                assert_eq!(set, before, "{}: the original is untouched", case.name);
                set = next;
                parts = parts.with_parts(split);
                assert_eq!(set.version, version, "{}", case.name);
                assert_eq!(set.resources(), model, "{}: response {n}", case.name);
                assert_eq!(parts, set, "{}: in parts, response {n}", case.name);
                assert_eq!(set.len(), model.len());
                let versions: BTreeMap<_, _> = model
                    .iter()
                    .map(|(k, h)| (k.clone(), h.version.clone()))
                    .collect();
                assert_eq!(*set.versions(), versions, "{}", case.name);
            }
        }
    }

    fn part(nonce: &str, json_bytes: usize, more: bool) -> wire::StreamResponse {
        wire::StreamResponse {
            system_version: "v2".into(),
            nonce: nonce.into(),
            resources: vec![wire::Resource {
                key: String::new(),
                version: String::new(),
                json: "x".repeat(json_bytes),
            }],
            more,
            ..Default::default()
        }
    }

    /// What each message of a stream makes of its response. `o` is what a part with no
    /// JSON takes; the limit is ten of those.
    #[test]
    fn gathering_parts() {
        #[derive(Debug, PartialEq)]
        enum Want {
            More,
            Whole(usize),
            Refused,
            Broken(&'static str),
        }
        use Want::*;
        let o = held_bytes(&part("a", 0, true));
        let limit = 10 * o;
        let other = "before the last part of a";
        /// A message (its nonce, bytes of JSON, whether more follow) and what it makes.
        type Step = (&'static str, usize, bool, Want);
        let cases: Vec<(&str, Vec<Step>)> = vec![
            ("one message", vec![("a", 10, false, Whole(1))]),
            (
                "three parts",
                vec![
                    ("a", 10, true, More),
                    ("a", 10, true, More),
                    ("a", 10, false, Whole(3)),
                ],
            ),
            (
                "at the limit",
                vec![("a", 4 * o, true, More), ("a", 4 * o, false, Whole(2))],
            ),
            (
                "past the limit, then the next response",
                vec![
                    ("a", 4 * o, true, More),
                    ("a", 4 * o, true, More),
                    ("a", 1, false, Refused),
                    ("b", 10, false, Whole(1)),
                ],
            ),
            (
                "one message past the limit",
                vec![("a", 10 * o, false, Refused)],
            ),
            (
                "still going past twice the limit",
                vec![
                    ("a", 10 * o, true, More),
                    ("a", 10 * o, true, Broken("goes on past twice")),
                ],
            ),
            (
                "another response before the last part",
                vec![("a", 10, true, More), ("b", 10, false, Broken(other))],
            ),
            (
                "another response before the last part of a refused one",
                vec![("a", 10 * o, true, More), ("b", 10, false, Broken(other))],
            ),
        ];
        for (name, steps) in &cases {
            let mut g = Gathering::default();
            for (i, (nonce, bytes, more, want)) in steps.iter().enumerate() {
                let got = match g.add(part(nonce, *bytes, *more), limit) {
                    Ok(Gathered::More) => More,
                    Ok(Gathered::Whole(parts)) => {
                        assert!(parts.iter().all(|p| p.nonce == *nonce), "{name}");
                        Whole(parts.len())
                    }
                    Ok(Gathered::Refused(why)) => {
                        let said = format!("response {nonce} takes more than the {limit} bytes");
                        assert!(why.contains(&said), "{name}: {why}");
                        Refused
                    }
                    Err(e) => match want {
                        Broken(says) => {
                            assert!(e.message().contains(says), "{name}: {}", e.message());
                            Broken(says)
                        }
                        _ => Broken(""),
                    },
                };
                assert_eq!(&got, want, "{name}, message {i}");
            }
        }
    }

    /// Empty items cost memory though they carry no text: a part of empty resources and
    /// removals, a few bytes each on the wire, counts what holding them takes.
    #[test]
    fn empty_items_count() {
        let mut empty = part("a", 0, false);
        empty.resources = vec![wire::Resource::default(); 1000];
        empty.removed = vec![String::new(); 1000];
        let held = held_bytes(&empty);
        assert!(held >= 1000 * (size_of::<wire::Resource>() + size_of::<String>()));
        let mut g = Gathering::default();
        assert!(matches!(g.add(empty, 16 * 1024), Ok(Gathered::Refused(_))));
    }

    /// A response that never ends holds little once it is past the limit (its parts are
    /// dropped as they come), and the stream is ended once it goes past twice the limit.
    #[test]
    fn a_response_that_never_ends_is_not_kept() {
        let mut g = Gathering::default();
        let limit = 10_000;
        for i in 0..1000 {
            match g.add(part("a", 1000, true), limit) {
                Ok(Gathered::More) => {
                    let kept: usize = g.parts.iter().map(held_bytes).sum();
                    assert!(kept <= limit, "{kept} bytes kept after {i} parts");
                }
                Ok(other) => panic!("{other:?} after {i} parts"),
                Err(e) => {
                    assert!(
                        e.message().contains("goes on past twice"),
                        "{}",
                        e.message()
                    );
                    assert!(i < 25, "ended only after {i} parts");
                    assert!(g.parts.is_empty());
                    return;
                }
            }
        }
        panic!("the stream was never ended");
    }

    /// A response's parts apply in order, each its removals and then its resources: a key
    /// added in one part and removed in a later one is gone, one removed and added back is
    /// there, and the last version of a key sent twice wins, in texts and versions alike.
    #[test]
    fn parts_apply_in_their_order() {
        let part = |resources: &[(&str, &str)], removed: &[&str]| wire::StreamResponse {
            system_version: "v2".into(),
            resources: resources.iter().map(|(k, v)| wire(k, v)).collect(),
            removed: removed.iter().map(|k| k.to_string()).collect(),
            more: true,
            ..Default::default()
        };
        let set =
            HeldSet::default().with(part(&[("keep", "1"), ("gone", "1"), ("back", "1")], &[]));
        let next = set.with_parts(vec![
            part(&[("a", "1")], &[]),
            part(&[], &["a", "gone", "back"]),
            part(&[("b", "1"), ("back", "2")], &[]),
            part(&[("b", "2")], &[]),
        ]);
        let want: BTreeMap<String, Held> = [("back", "2"), ("b", "2"), ("keep", "1")]
            .into_iter()
            .map(|(k, v)| {
                let w = wire(k, v);
                (
                    w.key,
                    Held {
                        version: w.version,
                        json: w.json,
                    },
                )
            })
            .collect();
        assert_eq!(next.resources(), want);
        assert_eq!(next.version, "v2");
        let versions: Vec<_> = next
            .versions()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(versions, [("b", "2"), ("back", "2"), ("keep", "1")]);
    }

    /// A mesh-wide view like bench/memory.sh's: `services` Services and twice as many
    /// HTTPRoutes, each the text the control plane sends (the API's serialization).
    fn mesh_view(services: usize) -> BTreeMap<String, Held> {
        let mut yaml = String::new();
        for i in 0..services {
            let ns = i / 100;
            yaml.push_str(&format!(
                "---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc{i}, namespace: ns{ns}, labels: {{app: svc{i}, team: t{}}}}}\nspec:\n  ports: [{{port: 80, name: http, appProtocol: http}}]\n  endpoints:\n    - {{address: \"127.0.{}.{}:8080\", zone: z0}}\n    - {{address: \"127.1.{}.{}:8080\", zone: z1}}\n",
                i % 17,
                i / 250,
                i % 250 + 1,
                i / 250,
                i % 250 + 1,
            ));
        }
        for r in 0..services * 2 {
            let i = r % services;
            yaml.push_str(&format!(
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: svc{i}-r{r}, namespace: ns{}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: svc{i}, port: 80}}]\n  rules:\n    - name: api\n      matches:\n        - path: {{type: PathPrefix, value: /api/r{r}/v1}}\n      backendRefs: [{{name: svc{i}, port: 80, weight: 90}}]\n      timeouts: {{request: 5s}}\n",
                i / 100
            ));
        }
        trellis_api::parse_documents("mesh.yaml", &yaml)
            .unwrap()
            .into_iter()
            .map(|r| {
                let m = r.value.metadata();
                let key = format!("{}/{}/{}", r.value.kind().as_str(), m.namespace, m.name);
                let json = r.value.to_json();
                (
                    key,
                    Held {
                        version: "1".into(),
                        json,
                    },
                )
            })
            .collect()
    }

    /// The held texts are kept compressed together: a repetitive 3,000-resource view keeps
    /// under a tenth of its texts' size (compressing each text alone only halves it).
    #[test]
    fn a_mesh_wide_view_is_kept_packed() {
        let resources = mesh_view(1000);
        assert_eq!(resources.len(), 3000);
        let texts: usize = resources.values().map(|h| h.json.len()).sum();
        let set = HeldSet::new("1".into(), resources.clone());
        let kept = set.packed().packed_len();
        assert!(kept * 10 < texts, "{kept} bytes kept for {texts} of texts");
        assert_eq!(set.resources(), resources);
        assert_eq!(set.parse().unwrap().len(), 3000);
    }

    /// `/config` shows a held resource from the held set's own packed texts, not from a
    /// second copy, and that text is what serializing the parsed resource gives (what
    /// `/config` showed).
    #[test]
    fn the_snapshot_shares_the_held_text_for_config() {
        let local = trellis_api::parse_documents(
            "proxy.yaml",
            "apiVersion: trellis.dev/v1alpha1\nkind: Proxy\nmetadata: {name: p}\nspec:\n  outbound: [{name: mesh, address: \"127.0.0.1:0\", httpProxy: true}]\n",
        )
        .unwrap();
        let service = |name: &str| {
            trellis_api::parse_documents(
                "svc.yaml",
                &format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: 80}}]\n  endpoints: [{{address: \"127.0.0.1:1\"}}]\n"),
            )
            .unwrap()
            .remove(0)
            .value
        };
        let resources = ["a", "b"]
            .map(|n| {
                let held = Held {
                    version: "1".into(),
                    json: service(n).to_json(),
                };
                (format!("Service/default/{n}"), held)
            })
            .into();
        let set = HeldSet::new("1".into(), resources);
        let all = assemble(&local, set.parse().unwrap());
        let snap = crate::Snapshot::build(&all, 1, SOURCE, None, &crate::Shared::new()).unwrap();
        use crate::snapshot::ConfigText;
        let [ConfigText::Own(proxy), ConfigText::Packed(packed, range)] = &snap.config[..] else {
            panic!("{:?}", snap.config);
        };
        assert_eq!(**proxy, *local[0].value.to_json());
        assert!(Arc::ptr_eq(packed, set.packed()), "a second copy");
        assert_eq!(*range, 0..2);
        let texts = packed.unpack();
        let texts: Vec<&str> = texts.iter().collect();
        assert_eq!(texts, [all[1].value.to_json(), all[2].value.to_json()]);
    }

    /// The persisted file keeps its format: a file written before the texts were packed
    /// loads, and what is written now is that format, byte for byte.
    #[test]
    fn persisted_set_round_trips() {
        let dir = std::env::temp_dir().join(format!("trellis-held-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snapshot.json");
        assert_eq!(HeldSet::load(&path).unwrap(), None);
        let files = [
            r#"{"version":"","resources":{}}"#,
            r#"{"version":"3","resources":{"Service/default/a":{"version":"x","json":"{}"}}}"#,
            r#"{"version":"9","resources":{"HTTPRoute/ns/r":{"version":"2","json":"{\"kind\":\"HTTPRoute\",\"n\":\"ü \\\" \\n\"}"},"Service/default/a":{"version":"x","json":"{}"}}}"#,
        ];
        for old in files {
            std::fs::write(&path, old).unwrap();
            let set = HeldSet::load(&path).unwrap().unwrap();
            // What the file holds, read as the file's own form.
            let want: Stored = serde_json::from_str(old).unwrap();
            assert_eq!(set.version, want.version);
            assert_eq!(set.resources(), want.resources, "{old}");
            set.persist(&path).unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap(), old);
            assert_eq!(HeldSet::load(&path).unwrap(), Some(set));
        }
        std::fs::write(&path, r#"{"version":"3","resources":"#).unwrap();
        let e = HeldSet::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(e.contains("EOF"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
