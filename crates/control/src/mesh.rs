//! The proxy protocol's server side: one delta stream per proxy (send what changed in its
//! view, one response in flight, ACK/NACK per nonce) and the registry calls.

use crate::Control;
use crate::compile::{self, View, ViewKey};
use crate::config::now_rfc3339;
use crate::registry::{Registration, RegistryError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_api::wire::{self, mesh_server::Mesh};

/// What `trellis get proxies` shows about one connected proxy.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// The proxy's node id.
    pub node: String,
    /// Its namespace.
    pub namespace: String,
    /// The service it fronts, if any.
    pub service: String,
    /// Its explicit upstreams.
    pub upstreams: Vec<String>,
    /// Whether it runs in HTTP proxy mode (needs every service).
    pub all_services: bool,
    /// Its version.
    pub proxy_version: String,
    /// Its address as seen by the control plane.
    pub peer: String,
    /// When it connected (RFC 3339).
    pub connected_at: String,
    /// The config revision it last acknowledged; empty before its first ACK.
    pub acked_version: String,
    /// How many resources its view holds.
    pub resources: usize,
    /// Whether an update awaits its ACK.
    pub pending: bool,
    /// Its error text for the last update it refused; it keeps its previous config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nack: Option<String>,
    /// The config revision it refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nack_version: Option<String>,
    /// Where Prometheus scrapes its metrics (`IP:PORT`); empty when it reported none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metrics_address: String,
    /// The identity and expiry (Unix seconds) of the certificate it holds, as far as this
    /// replica knows: the one it connected with, or the renewal issued for it since.
    #[serde(skip)]
    pub(crate) certificate: Option<(String, i64)>,
    /// The namespace and service its credentials prove (what it may speak for, whatever it
    /// claims).
    #[serde(skip)]
    pub(crate) principal: (String, String),
    /// Which stream of the node this is (see `ProxyKey`).
    #[serde(skip)]
    pub(crate) stream: u64,
}

/// Who is on the other end of a proxy stream, as its connection shows.
struct Connected {
    /// Its address.
    peer: Option<std::net::SocketAddr>,
    /// Its client certificate's identity and expiry.
    certificate: Option<(String, i64)>,
}

pub(crate) struct MeshService {
    pub(crate) control: Arc<Control>,
}

pub(crate) fn identity_status(e: crate::identity::IdentityError) -> Status {
    use crate::identity::IdentityError as E;
    match e {
        E::Unauthenticated(m) => Status::unauthenticated(m),
        E::Denied(m) => Status::permission_denied(m),
        E::Invalid(m) => Status::invalid_argument(m),
        E::Unavailable(m) => Status::unavailable(m),
    }
}

impl MeshService {
    /// Heartbeats and deregistrations only for one's own instances.
    fn check_instance(&self, p: &crate::identity::Principal, id: &str) -> Result<(), Status> {
        match self.control.state().workloads.get(id) {
            Some(w) => Self::check_owner(p, &w.namespace, &w.service),
            // Unknown: the call reports NOT_FOUND itself.
            None => Ok(()),
        }
    }

    /// Who sent `r`: as the intake layer authenticated it, else (a request that did not
    /// pass through it) from its metadata and TLS peer.
    fn principal<T>(&self, r: &Request<T>) -> Result<crate::identity::Principal, Status> {
        if let Some(p) = r.extensions().get::<crate::identity::Principal>() {
            return Ok(p.clone());
        }
        self.control
            .authenticate_proxy(r.metadata(), r.extensions().get::<crate::tls::Peer>())
            .map_err(identity_status)
    }

    /// The node a stream's first message names: it must have an id, and a proxy that names
    /// a service may speak only for a service its credentials prove.
    fn hello(
        principal: &crate::identity::Principal,
        node: Option<wire::Node>,
    ) -> Result<wire::Node, Status> {
        let node = node.filter(|n| !n.id.is_empty()).ok_or_else(|| {
            Status::invalid_argument("the first message must carry a node with an id")
        })?;
        check_node(&node).map_err(Status::invalid_argument)?;
        if !node.service.is_empty() {
            let ns = if node.namespace.is_empty() {
                trellis_api::meta::DEFAULT_NAMESPACE
            } else {
                &node.namespace
            };
            Self::check_owner(principal, ns, &node.service)?;
        }
        Ok(node)
    }

    /// A principal may only act for its own service's instances.
    fn check_owner(
        p: &crate::identity::Principal,
        namespace: &str,
        service: &str,
    ) -> Result<(), Status> {
        if p.service() == (namespace, service) {
            Ok(())
        } else {
            let (ns, svc) = p.service();
            Err(Status::permission_denied(format!(
                "credentials for {ns}/{svc} cannot act for {namespace}/{service}"
            )))
        }
    }
}

fn status_of(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(m) => Status::invalid_argument(m),
        RegistryError::NotFound(_) => Status::not_found(e.to_string()),
        RegistryError::Superseded { .. } => Status::failed_precondition(e.to_string()),
        RegistryError::Store(e) => Status::unavailable(e.to_string()),
    }
}

#[tonic::async_trait]
impl Mesh for MeshService {
    type StreamStream = ReceiverStream<Result<wire::StreamResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<wire::StreamRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let principal = self.principal(&request)?;
        let tls_peer = request.extensions().get::<crate::tls::Peer>();
        let connected = Connected {
            peer: tls_peer.map(|p| p.addr).or_else(|| request.remote_addr()),
            certificate: tls_peer
                .and_then(|p| {
                    p.certs
                        .as_ref()?
                        .first()
                        .and_then(trellis_identity::inspect)
                })
                .map(|(id, not_after)| (id.to_string(), unix_seconds(not_after))),
        };
        // Each stream holds what its hello announced, and tonic its read buffer: a
        // service's credentials open a bounded number of them.
        let service = {
            let (ns, service) = principal.service();
            (ns.to_string(), service.to_string())
        };
        if !self.control.config_streams.open(&service.0, &service.1) {
            return Err(Status::resource_exhausted(format!(
                "{}/{} already has {} config streams open on this control plane replica",
                service.0,
                service.1,
                crate::fleet::MAX_SERVICE_STREAMS
            )));
        }
        let mut inbound = request.into_inner();
        let hello = async {
            let first = inbound
                .message()
                .await?
                .ok_or_else(|| Status::invalid_argument("stream closed before its hello"))?;
            // A proxy receives its own service's inbound policies: only for its own service.
            let node = Self::hello(&principal, first.node)?;
            Ok::<_, Status>((node, first.initial_versions))
        };
        let (node, initial_versions) = match hello.await {
            Ok(x) => x,
            Err(e) => {
                self.control.config_streams.close(&service.0, &service.1);
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let control = self.control.clone();
        let principal = service;
        tokio::spawn(async move {
            let key = ProxyKey::of(principal.clone(), &node);
            run_stream(
                &control,
                node,
                &key,
                connected,
                initial_versions,
                inbound,
                tx,
            )
            .await;
            control.config_streams.close(&principal.0, &principal.1);
            // Unless a newer stream of the same node took the entry over.
            let mut proxies = control.proxies.lock().unwrap_or_else(|e| e.into_inner());
            if proxies
                .get(&key.name)
                .is_some_and(|p| p.stream == key.stream)
            {
                proxies.remove(&key.name);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ReportStream = ReceiverStream<Result<wire::ReportResponse, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<wire::ReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let principal = self.principal(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before its hello"))?;
        let node = Self::hello(&principal, first.node)?;
        // Whatever the messages say, the reports are the authenticated caller's own.
        let (namespace, service) = principal.service();
        let who = crate::fleet::Reporter {
            namespace: namespace.into(),
            service: service.into(),
            identity: match &principal {
                crate::identity::Principal::Workload(id) => id.to_string(),
                crate::identity::Principal::Token { .. } => String::new(),
            },
            node: node.id,
        };
        if !self.control.fleet.open_stream(&who) {
            return Err(Status::resource_exhausted(format!(
                "{}/{} already has {} report streams open on this control plane replica",
                who.namespace,
                who.service,
                crate::fleet::MAX_SERVICE_STREAMS
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let control = self.control.clone();
        tokio::spawn(async move {
            let fleet = &control.fleet;
            let trust_domain = control.trust().map(|(td, _)| td).unwrap_or_default();
            crate::fleet::serve_reports(fleet, &who, &trust_domain, inbound, tx).await;
            fleet.close_stream(&who);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type QuotaStream = ReceiverStream<Result<wire::QuotaResponse, Status>>;

    async fn quota(
        &self,
        request: Request<Streaming<wire::QuotaRequest>>,
    ) -> Result<Response<Self::QuotaStream>, Status> {
        let principal = self.principal(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before its hello"))?;
        let node = Self::hello(&principal, first.node.clone())?;
        // Node ids are the proxies' to choose: the instance a share is for is also its
        // credentials' service, so another service's proxy naming the same node neither
        // replaces its demand nor receives its share.
        let (ns, service) = principal.service();
        let instance = format!("{ns}/{service}/{}", node.id);
        let service = (ns.to_string(), service.to_string());
        if !self.control.quota.streams.open(&service.0, &service.1) {
            return Err(Status::resource_exhausted(format!(
                "{}/{} already has {} quota streams open on this control plane replica",
                service.0,
                service.1,
                crate::fleet::MAX_SERVICE_STREAMS
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let control = self.control.clone();
        tokio::spawn(async move {
            crate::quota::serve(&control, instance, service.clone(), first, inbound, tx).await;
            control.quota.streams.close(&service.0, &service.1);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn register(
        &self,
        request: Request<wire::RegisterRequest>,
    ) -> Result<Response<wire::RegisterResponse>, Status> {
        let principal = self.principal(&request)?;
        let r = request.into_inner();
        let i = r
            .instance
            .ok_or_else(|| Status::invalid_argument("missing instance"))?;
        let ns = if i.namespace.is_empty() {
            trellis_api::meta::DEFAULT_NAMESPACE
        } else {
            &i.namespace
        };
        Self::check_owner(&principal, ns, &i.service)?;
        // Endpoints carry the identity other sidecars will require: only a proven one.
        if let crate::identity::Principal::Workload(id) = &principal
            && !i.identity.is_empty()
            && i.identity != id.to_string()
        {
            return Err(Status::permission_denied(format!(
                "an instance proven as {id} cannot register identity {}",
                i.identity
            )));
        }
        if matches!(principal, crate::identity::Principal::Token { .. }) && !i.identity.is_empty() {
            return Err(Status::permission_denied(
                "register with a certificate proof to announce an identity",
            ));
        }
        let port = u16::try_from(i.port)
            .map_err(|_| Status::invalid_argument(format!("port {} out of range", i.port)))?;
        let (id, ttl) = self
            .control
            .register(Registration {
                namespace: if i.namespace.is_empty() {
                    trellis_api::meta::DEFAULT_NAMESPACE.into()
                } else {
                    i.namespace
                },
                service: i.service,
                address: i.address,
                port,
                labels: i.labels.into_iter().collect(),
                zone: Some(i.zone).filter(|z| !z.is_empty()),
                region: Some(i.region).filter(|z| !z.is_empty()),
                cluster: Some(i.cluster).filter(|z| !z.is_empty()),
                healthy: i.healthy,
                node: i.node,
                identity: Some(i.identity).filter(|x| !x.is_empty()),
                slot: Some(i.slot).filter(|x| !x.is_empty()),
                epoch: i.epoch,
                ttl: (r.ttl_seconds > 0).then(|| Duration::from_secs(r.ttl_seconds.into())),
            })
            .await
            .map_err(status_of)?;
        Ok(Response::new(wire::RegisterResponse {
            id,
            ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<wire::HeartbeatRequest>,
    ) -> Result<Response<wire::HeartbeatResponse>, Status> {
        let principal = self.principal(&request)?;
        let r = request.into_inner();
        self.check_instance(&principal, &r.id)?;
        self.control
            .heartbeat(&r.id, r.healthy)
            .await
            .map_err(status_of)?;
        Ok(Response::new(wire::HeartbeatResponse {}))
    }

    async fn certify(
        &self,
        request: Request<wire::CertifyRequest>,
    ) -> Result<Response<wire::CertifyResponse>, Status> {
        use crate::identity::IdentityError as E;
        let r = request.into_inner();
        let (id, issued, bundle_pem, trust_domain) = self
            .control
            .certify(&r.token, &r.csr_pem, &r.current_chain_pem)
            .await
            .map_err(|e| match e {
                E::Unauthenticated(m) => Status::unauthenticated(m),
                E::Denied(m) => Status::permission_denied(m),
                E::Invalid(m) => Status::invalid_argument(m),
                E::Unavailable(m) => Status::unavailable(m),
            })?;
        Ok(Response::new(wire::CertifyResponse {
            chain_pem: issued.chain_pem,
            bundle_pem,
            trust_domain,
            spiffe_id: id.to_string(),
            not_after_unix: issued
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        }))
    }

    async fn deregister(
        &self,
        request: Request<wire::DeregisterRequest>,
    ) -> Result<Response<wire::DeregisterResponse>, Status> {
        let principal = self.principal(&request)?;
        self.check_instance(&principal, &request.get_ref().id)?;
        self.control
            .deregister(&request.into_inner().id)
            .await
            .map_err(status_of)?;
        Ok(Response::new(wire::DeregisterResponse {}))
    }
}

/// Largest JSON (and keys) one response part carries, for a proxy that accepts parts; a
/// larger resource goes alone. Each side's stream buffer keeps the capacity of the largest
/// message it saw, so this bounds what a connected proxy costs both.
pub const PART_BYTES: usize = 64 * 1024;

/// What a proxy holds: the versions its hello announced, or the view it last acknowledged
/// (an `Arc` shared with every proxy of the same view, not a private copy of its keys).
#[derive(Clone, Debug)]
pub enum Holds {
    /// Key → version, from the hello (what it persisted).
    Announced(BTreeMap<String, String>),
    /// The view it acknowledged.
    View(Arc<View>),
}

impl Holds {
    fn version(&self, key: &str) -> Option<&str> {
        match self {
            Holds::Announced(m) => m.get(key).map(String::as_str),
            Holds::View(v) => v.items.get(key).map(|i| i.version.as_str()),
        }
    }

    fn keys(&self) -> Box<dyn Iterator<Item = &String> + '_> {
        match self {
            Holds::Announced(m) => Box::new(m.keys()),
            Holds::View(v) => Box::new(v.items.keys()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Holds::Announced(m) => m.len(),
            Holds::View(v) => v.items.len(),
        }
    }
}

/// What changed between what a proxy holds and its view.
#[derive(Debug)]
pub struct Delta<'a> {
    /// Resources to send (new or changed), in key order.
    pub changed: Vec<(&'a str, &'a crate::compile::Item)>,
    /// Keys of resources to drop.
    pub removed: Vec<String>,
}

impl Delta<'_> {
    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }

    /// The responses that carry this delta: one, or with `part` set, parts of at most that
    /// many bytes of JSON and keys each, every one but the last marked `more`. The JSON is
    /// copied into a part only when the part is made, so a stream holds a few parts, not
    /// the whole view.
    pub fn responses<'d>(
        &'d self,
        version: &'d str,
        nonce: &'d str,
        part: Option<usize>,
    ) -> impl Iterator<Item = wire::StreamResponse> + 'd {
        let budget = part.unwrap_or(usize::MAX);
        let (mut changed, mut removed) = (0, 0);
        let mut done = false;
        std::iter::from_fn(move || {
            if done {
                return None;
            }
            let mut r = wire::StreamResponse {
                system_version: version.to_string(),
                nonce: nonce.to_string(),
                ..Default::default()
            };
            let mut size = 0;
            while let Some((key, item)) = self.changed.get(changed) {
                let n = key.len() + item.json.len();
                if size > 0 && size + n > budget {
                    break;
                }
                size += n;
                changed += 1;
                r.resources.push(wire::Resource {
                    key: key.to_string(),
                    version: item.version.clone(),
                    json: item.json.to_string(),
                });
            }
            while let Some(key) = self.removed.get(removed) {
                if size > 0 && size + key.len() > budget {
                    break;
                }
                size += key.len();
                removed += 1;
                r.removed.push(key.clone());
            }
            done = changed == self.changed.len() && removed == self.removed.len();
            r.more = !done;
            Some(r)
        })
    }
}

/// What changed between what a proxy holds and its view.
pub fn diff<'a>(view: &'a View, held: &Holds) -> Delta<'a> {
    let changed = view
        .items
        .iter()
        .filter(|(k, item)| held.version(k) != Some(item.version.as_str()))
        .map(|(k, item)| (k.as_str(), item))
        .collect();
    let removed = held
        .keys()
        .filter(|k| !view.items.contains_key(*k))
        .cloned()
        .collect();
    Delta { changed, removed }
}

struct Pending {
    nonce: String,
    version: String,
    /// The view it brings the proxy to.
    view: Arc<View>,
    /// When the change it carries was first seen, for the push latency.
    since: tokio::time::Instant,
}

fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The needs of a connected proxy, as its stream compiles its view (`run_stream`).
pub(crate) fn view_key(p: &ProxyStatus) -> ViewKey {
    let mut key = ViewKey::new(&p.namespace, &p.upstreams, p.all_services);
    if !p.service.is_empty() {
        key.own = Some((p.namespace.clone(), p.service.clone()));
    }
    key
}

/// Where a proxy stream keeps its [`ProxyStatus`]: under the namespace and service its
/// credentials prove and its node id, since node ids (and, without a service, namespaces)
/// are the proxies' to claim: a proxy of another service naming the same node must not
/// replace, or remove, this one's entry. And which stream it is.
struct ProxyKey {
    name: String,
    principal: (String, String),
    stream: u64,
}

impl ProxyKey {
    fn of(principal: (String, String), node: &wire::Node) -> ProxyKey {
        static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        ProxyKey {
            name: format!("{}/{}/{}", principal.0, principal.1, node.id),
            principal,
            stream: STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

async fn run_stream(
    control: &Control,
    node: wire::Node,
    entry: &ProxyKey,
    connected: Connected,
    initial: std::collections::HashMap<String, String>,
    mut inbound: Streaming<wire::StreamRequest>,
    tx: mpsc::Sender<Result<wire::StreamResponse, Status>>,
) {
    let namespace = if node.namespace.is_empty() {
        trellis_api::meta::DEFAULT_NAMESPACE.to_string()
    } else {
        node.namespace.clone()
    };
    let mut key = ViewKey::new(&namespace, &node.upstreams, node.all_services);
    if !node.service.is_empty() {
        key.own = Some((namespace.clone(), node.service.clone()));
    }
    let update = |f: &dyn Fn(&mut ProxyStatus)| {
        let mut proxies = control.proxies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = proxies
            .get_mut(&entry.name)
            .filter(|s| s.stream == entry.stream)
        {
            f(s);
        }
    };
    control
        .proxies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            entry.name.clone(),
            ProxyStatus {
                node: node.id.clone(),
                namespace,
                service: node.service.clone(),
                upstreams: node.upstreams.clone(),
                all_services: node.all_services,
                proxy_version: node.proxy_version.clone(),
                peer: connected.peer.map(|a| a.to_string()).unwrap_or_default(),
                connected_at: now_rfc3339(),
                acked_version: String::new(),
                resources: initial.len(),
                pending: false,
                nack: None,
                nack_version: None,
                metrics_address: crate::discovery::scrape_address(
                    &node.metrics_address,
                    connected.peer.map(|a| a.ip()),
                )
                .unwrap_or_default(),
                certificate: connected.certificate,
                principal: entry.principal.clone(),
                stream: entry.stream,
            },
        );
    tracing::debug!(node = %node.id, "proxy connected");

    let mut held = Holds::Announced(initial.into_iter().collect());
    let part = node.parts.then_some(PART_BYTES);
    let mut states = control.subscribe();
    let mut pending: Option<Pending> = None;
    let mut dirty = true;
    // When the first change not yet sent was seen (None: the initial push, timed from send).
    let mut changed_at: Option<tokio::time::Instant> = None;
    let mut counter = 0u64;
    loop {
        if dirty && pending.is_none() {
            dirty = false;
            let state = states.borrow_and_update().clone();
            let view = compile::view(&state, &key);
            let delta = diff(&view, &held);
            let version = state.revision.to_string();
            let since = changed_at.take().unwrap_or_else(tokio::time::Instant::now);
            if delta.is_empty() {
                drop(delta);
                // It holds exactly this view: share it rather than pin an older, equal one
                // (each registration makes a new state and a new view).
                held = Holds::View(view.clone());
                update(&|s| {
                    s.acked_version = version.clone();
                    s.resources = view.items.len();
                });
            } else {
                counter += 1;
                let nonce = format!("{counter}");
                for response in delta.responses(&version, &nonce, part) {
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                drop(delta);
                update(&|s| s.pending = true);
                pending = Some(Pending {
                    nonce,
                    version,
                    view,
                    since,
                });
            }
        }
        tokio::select! {
            // Watched while an update is pending too, so its push time starts when seen.
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
                changed_at.get_or_insert_with(tokio::time::Instant::now);
                dirty = true;
            }
            message = inbound.message() => {
                let Ok(Some(m)) = message else {
                    tracing::debug!(node = %node.id, "proxy disconnected");
                    return;
                };
                let Some(p) = pending.take_if(|p| p.nonce == m.response_nonce) else {
                    continue; // an answer to an older response
                };
                if m.error.is_empty() {
                    control.metrics.push_seconds.observe(p.since.elapsed().as_secs_f64());
                    held = Holds::View(p.view);
                    let n = held.len();
                    update(&|s| {
                        s.acked_version = p.version.clone();
                        s.resources = n;
                        s.pending = false;
                        s.nack = None;
                        s.nack_version = None;
                    });
                    dirty = true;
                } else {
                    tracing::warn!(node = %node.id, version = %p.version, error = %m.error, "proxy refused config");
                    control.metrics.nacks.inc();
                    update(&|s| {
                        s.pending = false;
                        s.nack = Some(m.error.clone());
                        s.nack_version = Some(p.version.clone());
                    });
                    // Resend only when the state changes again; the same update would
                    // be refused the same way.
                }
            }
            () = tx.closed() => return,
        }
    }
}

/// Longest node id (a 253-byte name and a process id, with room): the control plane keys
/// streams, reports and quota shares by it.
const MAX_NODE_ID: usize = 320;
/// Most explicit upstreams a node may name, and the longest (`namespace/name`, 253 bytes
/// each).
const MAX_UPSTREAMS: usize = 10_000;
const MAX_UPSTREAM: usize = 507;
/// Longest proxy version and metrics address.
const MAX_NODE_TEXT: usize = 256;

/// Whether a node's hello is within what a real proxy sends (pure): the control plane
/// keeps these texts as long as the stream lasts and longer, so a crafted hello must not
/// make it hold megabytes.
fn check_node(n: &wire::Node) -> Result<(), String> {
    if n.id.len() > MAX_NODE_ID || n.id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "node id must be at most {MAX_NODE_ID} bytes without spaces or control characters (got {} bytes)",
            n.id.len()
        ));
    }
    if n.upstreams.len() > MAX_UPSTREAMS {
        return Err(format!(
            "node {} names {} upstreams; at most {MAX_UPSTREAMS}",
            n.id,
            n.upstreams.len()
        ));
    }
    if let Some(u) = n.upstreams.iter().find(|u| u.len() > MAX_UPSTREAM) {
        return Err(format!(
            "node {}: upstream of {} bytes; at most {MAX_UPSTREAM}",
            n.id,
            u.len()
        ));
    }
    for (what, text) in [
        ("namespace", &n.namespace),
        ("service", &n.service),
        ("proxy version", &n.proxy_version),
        ("metrics address", &n.metrics_address),
    ] {
        if text.len() > MAX_NODE_TEXT {
            return Err(format!(
                "node {}: {what} of {} bytes; at most {MAX_NODE_TEXT}",
                n.id,
                text.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::Item;

    fn item(v: &str, json: &str) -> Item {
        Item {
            version: v.into(),
            json: json.into(),
        }
    }

    #[test]
    fn diff_sends_changes_and_removals_only() {
        let view = View {
            items: BTreeMap::from([
                ("Service/default/a".to_string(), item("1", "{}")),
                ("Service/default/b".to_string(), item("2", "{}")),
                ("Service/default/c".to_string(), item("3", "{}")),
            ]),
        };
        let held = Holds::Announced(BTreeMap::from([
            ("Service/default/a".to_string(), "1".to_string()),
            ("Service/default/b".to_string(), "old".to_string()),
            ("Service/default/gone".to_string(), "9".to_string()),
        ]));
        let delta = diff(&view, &held);
        let keys: Vec<_> = delta.changed.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["Service/default/b", "Service/default/c"]);
        assert_eq!(delta.removed, ["Service/default/gone"]);
        // Once it acknowledged the view, it holds exactly that view.
        assert!(diff(&view, &Holds::View(Arc::new(view.clone()))).is_empty());
    }

    /// A delta in parts: every part within the budget (a larger resource alone), one nonce
    /// and version, `more` on all but the last, and together exactly the one-message delta.
    #[test]
    fn parts_stay_within_the_budget_and_add_up_to_the_whole_delta() {
        let json = |n: usize| format!("{{\"x\":\"{}\"}}", "a".repeat(n));
        let items: BTreeMap<String, Item> = [10, 300, 40, 2_000, 50, 60, 70, 700, 5]
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("Service/default/s{i}"), item("1", &json(*n))))
            .collect();
        let view = View { items };
        let held = Holds::Announced(
            (0..40)
                .map(|i| (format!("Service/default/old{i:02}"), "1".to_string()))
                .collect(),
        );
        let delta = diff(&view, &held);
        let whole: Vec<_> = delta.responses("7", "3", None).collect();
        assert_eq!(whole.len(), 1);
        assert!(!whole[0].more);
        for budget in [1, 64, 500, 1_000, 100_000] {
            let parts: Vec<_> = delta.responses("7", "3", Some(budget)).collect();
            let (mut resources, mut removed) = (vec![], vec![]);
            for (i, p) in parts.iter().enumerate() {
                assert_eq!((p.system_version.as_str(), p.nonce.as_str()), ("7", "3"));
                assert_eq!(p.more, i + 1 < parts.len(), "budget {budget}, part {i}");
                let size: usize = p
                    .resources
                    .iter()
                    .map(|r| r.key.len() + r.json.len())
                    .sum::<usize>()
                    + p.removed.iter().map(String::len).sum::<usize>();
                let items = p.resources.len() + p.removed.len();
                assert!(items >= 1, "budget {budget}: an empty part");
                assert!(
                    size <= budget || items == 1,
                    "budget {budget}: part {i} has {size} bytes"
                );
                resources.extend(p.resources.iter().cloned());
                removed.extend(p.removed.iter().cloned());
            }
            assert_eq!(resources, whole[0].resources, "budget {budget}");
            assert_eq!(removed, whole[0].removed, "budget {budget}");
            if budget < 1_000 {
                assert!(parts.len() > 2, "budget {budget}: {} parts", parts.len());
            }
        }
    }

    #[test]
    fn a_hello_is_within_what_a_proxy_sends() {
        let node = |f: &dyn Fn(&mut wire::Node)| {
            let mut n = wire::Node {
                id: "web-4121".into(),
                namespace: "default".into(),
                service: "web".into(),
                upstreams: vec!["default/payment".into()],
                proxy_version: "0.1.0".into(),
                metrics_address: "10.0.0.7:9901".into(),
                ..Default::default()
            };
            f(&mut n);
            check_node(&n)
        };
        type Change<'a> = &'a dyn Fn(&mut wire::Node);
        // (change, refused with a message naming)
        let cases: [(Change, Option<&str>); 9] = [
            (&|_| {}, None),
            (&|n| n.id = "a".repeat(MAX_NODE_ID), None),
            (&|n| n.id = "a".repeat(MAX_NODE_ID + 1), Some("node id")),
            (&|n| n.id = "web 1".into(), Some("node id")),
            (&|n| n.id = "web\n1".into(), Some("node id")),
            (
                &|n| n.upstreams = vec!["x".into(); MAX_UPSTREAMS + 1],
                Some("upstreams"),
            ),
            (
                &|n| n.upstreams = vec!["x".repeat(MAX_UPSTREAM + 1)],
                Some("upstream of"),
            ),
            (
                &|n| n.proxy_version = "v".repeat(5000),
                Some("proxy version"),
            ),
            (
                &|n| n.metrics_address = "m".repeat(5000),
                Some("metrics address"),
            ),
        ];
        for (i, (change, want)) in cases.into_iter().enumerate() {
            match (node(change), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "case {i}: {e}"),
                (got, want) => panic!("case {i}: {got:?}, wanted {want:?}"),
            }
        }
    }
}
