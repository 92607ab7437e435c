//! One listener for the control plane: the config API as HTTP/JSON under `/v1/`, and the
//! proxy protocol as gRPC, told apart by path (axum routes both).

use crate::Control;
use crate::config::{SourceFile, WriteError};
use crate::mesh::MeshService;
use crate::tls;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_api::status::RouteStatus;
use trellis_api::wire::mesh_server::MeshServer;
use trellis_api::{Kind, ObjectKey, Resource};

type Shared = Arc<Control>;

/// An error body: `{"errors": [...]}`, one line per problem.
#[derive(Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub errors: Vec<String>,
}

fn error(status: StatusCode, errors: Vec<String>) -> Response {
    (status, Json(ErrorBody { errors })).into_response()
}

impl IntoResponse for WriteError {
    fn into_response(self) -> Response {
        match self {
            WriteError::Invalid(d) => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                d.0.iter().map(ToString::to_string).collect(),
            ),
            WriteError::Conflict(m) => error(StatusCode::CONFLICT, lines(&m)),
            WriteError::NotFound(m) => error(StatusCode::NOT_FOUND, lines(&m)),
            WriteError::TooLarge(m) => error(StatusCode::PAYLOAD_TOO_LARGE, vec![m]),
            WriteError::Store(e) => error(StatusCode::SERVICE_UNAVAILABLE, vec![e.to_string()]),
        }
    }
}

fn lines(m: &str) -> Vec<String> {
    m.lines().map(String::from).collect()
}

/// Body of `POST /v1/apply`.
#[derive(Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The files, as read by the client.
    pub files: Vec<SourceFile>,
    /// Validate and report, but write nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Body of `POST /v1/delete`.
#[derive(Serialize, Deserialize)]
pub struct DeleteRequest {
    /// What to delete.
    pub keys: Vec<ObjectKey>,
}

/// A list of resources and the revision it was read at.
#[derive(Serialize, Deserialize)]
pub struct List<T> {
    /// The store revision.
    pub revision: u64,
    /// The items.
    pub items: Vec<T>,
}

async fn apply(State(c): State<Shared>, Json(req): Json<ApplyRequest>) -> Response {
    match c.apply(&req.files, req.dry_run).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete(State(c): State<Shared>, Json(req): Json<DeleteRequest>) -> Response {
    match c.delete(&req.keys).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    namespace: Option<String>,
}

fn kind_of(text: &str) -> Result<Kind, Box<Response>> {
    Kind::parse(text).ok_or_else(|| Box::new(unknown_kind(text)))
}

fn unknown_kind(text: &str) -> Response {
    let known: Vec<_> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    error(
        StatusCode::NOT_FOUND,
        vec![format!(
            "unknown kind {text:?}; expected one of {}, proxies or workloads",
            known.join(", ")
        )],
    )
}

async fn list(
    State(c): State<Shared>,
    Path(kind): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let state = c.state();
    match kind.to_ascii_lowercase().as_str() {
        // Proxy resources are never stored (they are local); `get proxies` lists the
        // connected proxies and what they accepted or refused.
        "proxies" | "proxy" => {
            let mut items = c.proxies();
            items.retain(|p| q.namespace.as_ref().is_none_or(|ns| &p.namespace == ns));
            return Json(List {
                revision: state.revision,
                items,
            })
            .into_response();
        }
        "workloads" | "workload" => {
            let items: Vec<_> = state
                .workloads
                .values()
                .filter(|w| q.namespace.as_ref().is_none_or(|ns| &w.namespace == ns))
                .map(|w| (**w).clone())
                .collect();
            return Json(List {
                revision: state.revision,
                items,
            })
            .into_response();
        }
        _ => {}
    }
    let kind = match kind_of(&kind) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let statuses = route_statuses(&c, &state, kind);
    let items: Vec<serde_json::Value> = state
        .of_kind(kind)
        .filter(|s| {
            q.namespace
                .as_ref()
                .is_none_or(|ns| &s.resource.metadata().namespace == ns)
        })
        .map(|s| shown(s.with_version(), &statuses))
        .collect();
    Json(List {
        revision: state.revision,
        items,
    })
    .into_response()
}

async fn get_one(
    State(c): State<Shared>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Response {
    let kind = match kind_of(&kind) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let key = ObjectKey {
        kind: kind.as_str().into(),
        namespace,
        name,
    };
    let state = c.state();
    let statuses = route_statuses(&c, &state, kind);
    match state.config.get(&key) {
        Some(s) => Json(shown(s.with_version(), &statuses)).into_response(),
        None => error(StatusCode::NOT_FOUND, vec![format!("{key} not found")]),
    }
}

/// Every route's status, computed now from `state`, when `kind` is a route kind.
fn route_statuses(
    c: &Control,
    state: &crate::state::State,
    kind: Kind,
) -> BTreeMap<ObjectKey, RouteStatus> {
    if matches!(kind, Kind::HttpRoute | Kind::GrpcRoute) {
        c.transitions.routes(state, &crate::config::now_rfc3339())
    } else {
        BTreeMap::new()
    }
}

/// A resource as `get` shows it: a route with its computed `status`.
fn shown(r: Resource, statuses: &BTreeMap<ObjectKey, RouteStatus>) -> serde_json::Value {
    let status = statuses.get(&r.key());
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let (Some(status), Some(obj)) = (status, v.as_object_mut()) {
        obj.insert(
            "status".into(),
            serde_json::to_value(status).unwrap_or_default(),
        );
    }
    v
}

/// Body of `POST /v1/tokens`.
#[derive(Serialize, Deserialize)]
pub struct TokenRequest {
    /// The service whose identity the token grants (a join token).
    #[serde(default)]
    pub service: String,
    /// A read-only API token instead of a join token (`service`, `namespace` and `uses`
    /// are then ignored).
    #[serde(default, rename = "readOnly")]
    pub read_only: bool,
    /// Its namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Lifetime in seconds (default one hour).
    #[serde(default = "default_token_ttl")]
    pub ttl_seconds: u64,
    /// How many certificates it may obtain (default one).
    #[serde(default = "default_uses")]
    pub uses: u32,
}

fn default_uses() -> u32 {
    1
}

fn default_namespace() -> String {
    trellis_api::meta::DEFAULT_NAMESPACE.into()
}

fn default_token_ttl() -> u64 {
    3600
}

async fn create_token(State(c): State<Shared>, Json(req): Json<TokenRequest>) -> Response {
    use crate::identity::IdentityError as E;
    if req.read_only {
        return match c
            .create_reader(std::time::Duration::from_secs(req.ttl_seconds))
            .await
        {
            Ok((token, expires_at)) => Json(serde_json::json!({
                "token": token,
                "expiresAt": expires_at,
                "readOnly": true,
            }))
            .into_response(),
            Err(E::Invalid(m)) => error(StatusCode::UNPROCESSABLE_ENTITY, vec![m]),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, vec![e.to_string()]),
        };
    }
    if req.service.is_empty() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            vec!["service: required for a join token (or readOnly: true)".into()],
        );
    }
    match c
        .create_token(
            &req.namespace,
            &req.service,
            std::time::Duration::from_secs(req.ttl_seconds),
            req.uses,
        )
        .await
    {
        Ok((token, expires_at)) => Json(serde_json::json!({
            "token": token,
            "expiresAt": expires_at,
            "identity": format!("ns/{}/sa/{}", req.namespace, req.service),
        }))
        .into_response(),
        Err(E::Invalid(m)) => error(StatusCode::UNPROCESSABLE_ENTITY, vec![m]),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, vec![e.to_string()]),
    }
}

/// Prometheus text: counts and times, and the capacity recommendation per service (which
/// names services, as any scrape of the sidecars does; no credentials needed).
async fn metrics(State(c): State<Shared>) -> Response {
    c.refresh_gauges();
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        c.metrics.encode_with(&crate::capacity::encode_metrics(
            &c.capacity(&c.settings.capacity, crate::capacity::DEFAULT_WINDOW),
        )),
    )
        .into_response()
}

/// Prometheus HTTP service discovery: every connected proxy's metrics endpoint and this
/// replica's own, at the authority the request used. It names workloads, so it needs the
/// admin token like the other read APIs.
async fn prometheus_targets(State(c): State<Shared>, req: axum::extract::Request) -> Response {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(String::from)
        });
    let groups = crate::discovery::targets(&c.proxies(), authority.as_deref(), c.settings.insecure);
    Json(groups).into_response()
}

async fn trust(State(c): State<Shared>) -> Response {
    match c.trust() {
        Ok((trust_domain, bundle)) => Json(serde_json::json!({
            "trustDomain": trust_domain,
            "bundlePem": bundle,
        }))
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, vec![e.to_string()]),
    }
}

/// `GET /v1/certificates`: the CA's expiry and, per connected proxy, the identity and
/// expiry of the workload certificate it holds (no key material).
async fn certificates(State(c): State<Shared>) -> Response {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let expiry = |not_after: i64| {
        serde_json::json!({
            "notAfter": crate::config::rfc3339(u64::try_from(not_after).unwrap_or(0)),
            "notAfterUnix": not_after,
            "secondsLeft": not_after - now,
        })
    };
    let ca = c
        .trust()
        .ok()
        .and_then(|(td, bundle)| Some((td, trellis_identity::pem_not_after(&bundle)?)))
        .map(|(td, na)| {
            let mut v = expiry(na);
            v["trustDomain"] = td.into();
            v
        });
    let mut workloads: Vec<serde_json::Value> = c
        .proxies()
        .into_iter()
        .filter_map(|p| {
            let (identity, not_after) = p.certificate?;
            let mut v = expiry(not_after);
            v["identity"] = identity.into();
            v["namespace"] = p.namespace.into();
            v["service"] = p.service.into();
            v["node"] = p.node.into();
            Some(v)
        })
        .collect();
    workloads.sort_by_key(|v| v["notAfterUnix"].as_i64());
    Json(serde_json::json!({ "ca": ca, "workloads": workloads })).into_response()
}

/// Lets the admin token through everywhere, and a read-only token where
/// [`permits`](crate::access::permits) says.
async fn require_token(
    State(c): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token.map(|t| c.access_of(t.trim())) {
        Some(Some(access))
            if crate::access::permits(access, req.method(), req.uri().path()) =>
        {
            next.run(req).await
        }
        Some(Some(_)) => error(
            StatusCode::FORBIDDEN,
            vec![format!(
                "{} {}: a read-only token may only read (and POST /v1/explain); this needs the admin token",
                req.method(),
                req.uri().path()
            )],
        ),
        Some(None) => error(
            StatusCode::UNAUTHORIZED,
            vec!["wrong admin token (or an unknown or expired read-only token)".into()],
        ),
        None => error(
            StatusCode::UNAUTHORIZED,
            vec!["the config API needs the admin token: set TRELLIS_ADMIN_TOKEN_FILE to the file `trellis control` wrote (or TRELLIS_ADMIN_TOKEN)".into()],
        ),
    }
}

/// The router: config API plus the gRPC proxy protocol.
pub fn router(control: Shared) -> axum::Router {
    // Reading or changing config and creating tokens need the admin token; reading (and
    // explaining) also takes a read-only token.
    let admin = axum::Router::new()
        .route("/v1/apply", post(apply))
        .route("/v1/delete", post(delete))
        .route("/v1/resources/{kind}", get(list))
        .route("/v1/resources/{kind}/{namespace}/{name}", get(get_one))
        .route("/v1/tokens", post(create_token))
        .route("/v1/prometheus/targets", get(prometheus_targets))
        .route("/v1/stats", get(crate::fleet_api::stats))
        .route("/v1/stats/history", get(crate::fleet_api::history))
        .route("/v1/certificates", get(certificates))
        .route("/v1/tap", get(crate::fleet_api::tap))
        .route("/v1/explain", post(crate::explain::explain))
        .route("/v1/health", get(crate::check::health))
        .route("/v1/capacity", get(crate::check::capacity))
        .route_layer(axum::middleware::from_fn_with_state(
            control.clone(),
            require_token,
        ));
    // The trust bundle is public; liveness and the metrics (counts only) tell nothing.
    let api = axum::Router::new()
        .merge(admin)
        .route("/v1/trust", get(trust))
        .route("/live", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        // The dashboard's static files hold no data: every figure comes from /v1 with a token.
        .merge(crate::ui::router())
        .with_state(control.clone());
    tonic::service::Routes::new(MeshServer::new(MeshService {
        control: control.clone(),
    }))
    .into_axum_router()
    .route_layer(axum::middleware::from_fn_with_state(control, intake))
    .merge(api)
}

/// Before tonic reads a gRPC request (`intake`): every method but `Certify` authenticates
/// from headers and the TLS peer, refused unread when it cannot, and the handler finds the
/// principal in the request; the body is held to its service's budget (requests without
/// credentials: the shared anonymous one).
async fn intake(
    State(control): State<Shared>,
    mut req: http::Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> Response {
    let certify = req.uri().path() == "/trellis.mesh.v1.Mesh/Certify";
    let md = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
    let principal = match control.authenticate_proxy(&md, req.extensions().get::<tls::Peer>()) {
        Ok(p) => Some(p),
        // A first certificate is asked for with a join token in the body.
        Err(_) if certify => None,
        Err(e) => {
            return crate::mesh::identity_status(e)
                .into_http::<axum::body::Body>()
                .into_response();
        }
    };
    let budget = match &principal {
        Some(p) => {
            let (namespace, service) = p.service();
            control.intake.service(namespace, service)
        }
        None => control.intake.anonymous(),
    };
    let anonymous = principal.is_none();
    if let Some(p) = principal {
        req.extensions_mut().insert(p);
    }
    let path = req.uri().path().to_string();
    let req = req.map(|b| {
        axum::body::Body::new(crate::intake::Charged::for_request(
            b, budget, &path, anonymous,
        ))
    });
    next.run(req).await
}

/// Serves HTTP/1.1 and HTTP/2 (gRPC) connections, over TLS unless the control plane runs
/// `--insecure`, until `shutdown` fires, then lets open connections finish their requests
/// (streams are closed).
pub async fn serve(
    control: Shared,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = control.settings.limits.clone();
    let server_tls = if control.settings.insecure {
        tracing::warn!(
            "--insecure: the control plane serves plaintext; join tokens and the admin token cross the network in clear and anyone on the path can impersonate it"
        );
        None
    } else {
        let names = tls::server_names(listener.local_addr()?, &control.settings.server_names);
        let t = tls::ServerTls::new(&control, &names)?;
        tracing::info!(?names, "control plane serving TLS");
        tokio::spawn(
            t.clone()
                .keep_renewed(control.clone(), names, shutdown.clone()),
        );
        Some(t)
    };
    let metrics = control.clone();
    let metrics = &metrics.metrics;
    let service = TowerToHyperService::new(router(control.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut warned: Option<tokio::time::Instant> = None;
    let tasks = TaskTracker::new();
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.refuse("limit");
            if warned.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(1)) {
                warned = Some(tokio::time::Instant::now());
                tracing::warn!(
                    max = limits.max_connections,
                    "connection limit reached; closing new connections"
                );
            }
            continue;
        };
        metrics.accepted.inc();
        let open = crate::metrics::OpenConnection::new(&metrics.open);
        let control = control.clone();
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let shutdown = shutdown.clone();
        let acceptor = match &server_tls {
            Some(t) => match t.acceptor() {
                Some(a) => Some(a),
                None => continue, // never plaintext when TLS is on
            },
            None => None,
        };
        let limits = limits.clone();
        tasks.spawn(async move {
            let _permit = (permit, open);
            let io = tls::Idle::new(stream, limits.handshake_timeout, limits.idle_timeout);
            match acceptor {
                Some(acceptor) => {
                    let accepted =
                        tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io)).await;
                    let stream = match accepted {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            // A silent client's handshake ends at the Idle deadline.
                            let reason = if e.kind() == std::io::ErrorKind::TimedOut {
                                "handshake_timeout"
                            } else {
                                "handshake"
                            };
                            control.metrics.refuse(reason);
                            tracing::debug!(%addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            control.metrics.refuse("handshake_timeout");
                            tracing::debug!(%addr, "TLS handshake deadline passed");
                            return;
                        }
                    };
                    let certs = stream.get_ref().1.peer_certificates().map(|c| {
                        Arc::new(c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>())
                    });
                    let peer = tls::Peer {
                        addr,
                        certs,
                        tls: true,
                    };
                    serve_connection(stream, peer, service, shutdown).await;
                }
                None => {
                    let peer = tls::Peer {
                        addr,
                        certs: None,
                        tls: false,
                    };
                    serve_connection(io, peer, service, shutdown).await;
                }
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// HTTP/2 flow-control window of a connection without a client certificate (both the
/// connection's and each stream's; hyper's default is 1 MiB).
const ANONYMOUS_WINDOW: u32 = 64 << 10;
/// Streams at once on a connection without a client certificate (hyper's default: 200).
const ANONYMOUS_STREAMS: u32 = 32;

/// One connection, with its [`Peer`](tls::Peer) attached to every request.
async fn serve_connection<S>(
    io: S,
    peer: tls::Peer,
    service: TowerToHyperService<axum::Router>,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Over TLS without a client certificate (Certify, or a proxy still on its join token);
    // an --insecure control plane's proxies authenticate in headers and keep the defaults.
    let peer_certs_absent = peer.tls && peer.certs.is_none();
    let service =
        hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            hyper::service::Service::call(&service, req)
        });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if peer_certs_absent {
        // Without a client certificate a connection carries `Certify`, or an insecure or
        // token-holding proxy's few streams: what it may leave unread here stays small.
        builder
            .http2()
            .initial_connection_window_size(ANONYMOUS_WINDOW)
            .initial_stream_window_size(ANONYMOUS_WINDOW)
            .max_concurrent_streams(ANONYMOUS_STREAMS);
    }
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
        }
    }
}
