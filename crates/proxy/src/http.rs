//! The HTTP request path, top to bottom. Each step is one line in [`handle`]:
//! decide (route) → filters → mirror → endpoint → forward → response filters → metrics.

use crate::body::{self, Body};
use crate::decide::{self, Decision, Forward};
use crate::endpoint::{EndpointState, H2Limits, H2Stream, InFlight};
use crate::error::{Audience, ProxyError};
use crate::filters;
use crate::h1;
use crate::metrics::{Metrics, ResponseLabels, RouteLabels, RouteStats};
use crate::rand;
use crate::server::Shared;
use crate::snapshot::{Backend, HashOn, Listener, ListenerKind};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// Largest request body copied for RequestMirror; larger or unsized bodies are not mirrored.
const MIRROR_BODY_LIMIT: u64 = 64 * 1024;
/// Attempts for a request that never left the proxy (connect failed, or a pooled connection
/// closed before the request was written).
const SEND_ATTEMPTS: usize = 3;

/// The empty label, for requests that never reached a route or backend.
static NONE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "".into());

/// Per-connection facts every request on it shares.
pub struct ConnInfo {
    /// The listener the connection arrived on, as of accept time.
    pub listener: Arc<Listener>,
    /// The client's address.
    pub client: SocketAddr,
    /// The client sidecar's SPIFFE id, for connections over mutual TLS.
    pub peer_identity: Option<Arc<str>>,
    /// What the connection is doing, for its idle watchdog.
    pub activity: Option<Arc<crate::io::Activity>>,
    /// Its streams, for the stream idle timeout.
    pub streams: Arc<crate::streams::Streams>,
}

/// Request header carrying the calling sidecar's SPIFFE id to the app (mutual TLS only).
pub const PEER_IDENTITY: &str = "x-trellis-peer-identity";

/// Handles one request; never fails (errors become responses).
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    // The connection is not idle while this request is handled, or its response streams
    // (its idle watchdog).
    let busy = conn.activity.as_ref().map(|a| a.busy());
    let snap = shared.snapshot();
    // The listener as currently configured (a reload may have changed where it points).
    let listener = snap
        .listeners
        .iter()
        .find(|l| l.name == conn.listener.name)
        .unwrap_or(&conn.listener);
    let direction = listener.direction();
    let downstream_upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // Before anything reads or sets a header: the client's hop-by-hop headers go now, so its
    // `Connection` cannot remove what the mesh adds below (identity, route filters).
    strip_hop_by_hop(&mut parts.headers, downstream_upgrade.is_some());
    let grpc = decide::is_grpc(&parts);
    // One canonical path, before authentication, authorization and routing read it.
    if let Err(e) = canonical_path(&mut parts) {
        return Ok(shared.fail(direction, &NONE, &NONE, e, grpc, start));
    }
    if matches!(listener.kind, ListenerKind::Inbound { .. }) {
        // The app learns who called it from the sidecar alone: a client-sent value is dropped.
        if parts.headers.contains_key(PEER_IDENTITY) {
            parts.headers.remove(PEER_IDENTITY);
        }
        if let Some(id) = &conn.peer_identity
            && let Ok(v) = http::HeaderValue::from_str(id)
        {
            parts.headers.insert(PEER_IDENTITY, v);
        }
    }
    // 0. Authenticate the request's token and authorize it, at the inbound sidecar (pure
    //    decisions over the snapshot and the clock).
    let mut claims = None;
    if let ListenerKind::Inbound { authn, .. } = &listener.kind
        && !authn.is_empty()
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match authn.check(&parts.headers, now) {
            crate::jwt::Outcome::Valid(c) => claims = Some(c),
            crate::jwt::Outcome::Anonymous => {}
            crate::jwt::Outcome::Refused(why) => {
                shared.metrics.authz_verdict(
                    &listener.name,
                    &crate::authz::Verdict {
                        allow: false,
                        policy: "request-authentication".into(),
                        audit_denied_by: None,
                    },
                    &format_args!("{} {}: {why}", parts.method, parts.uri.path()),
                );
                return Ok(shared.fail(
                    direction,
                    &NONE,
                    &NONE,
                    ProxyError::Unauthenticated(why),
                    grpc,
                    start,
                ));
            }
        }
    }
    if let ListenerKind::Inbound { authz, port, .. } = &listener.kind
        && !authz.is_open()
    {
        let request = crate::authz::Request {
            peer: conn.peer_identity.as_deref(),
            http: Some((&parts.method, parts.uri.path(), &parts.headers)),
            port: *port,
            claims: claims.as_ref(),
        };
        let verdict = authz.decide(&request, jiff::Timestamp::now());
        shared.metrics.authz_verdict(
            &listener.name,
            &verdict,
            &format_args!(
                "{} {} from {}",
                parts.method,
                parts.uri.path(),
                conn.peer_identity.as_deref().unwrap_or("(no identity)")
            ),
        );
        if !verdict.allow {
            return Ok(shared.fail(
                direction,
                &NONE,
                &NONE,
                ProxyError::Denied(verdict.policy),
                grpc,
                start,
            ));
        }
    }

    // 1. Decide: which rule, which backend (pure).
    let fwd = match decide::decide(&snap, listener, &parts, rand::u64()) {
        Decision::Forward(f) => f,
        Decision::Fail(e) => return Ok(shared.fail(direction, &NONE, &NONE, e, grpc, start)),
        Decision::Redirect {
            route,
            location,
            status,
        } => {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = status;
            if let Some((n, v)) = filters::location_header(&location) {
                resp.headers_mut().insert(n, v);
            }
            shared.record(None, direction, &route, &NONE, status, "", start.elapsed());
            return Ok(resp);
        }
    };

    // 1b. Fault injection (the rule's FaultInjection): maybe a delay, then maybe an abort.
    if let Some(fault) = fwd.rule.as_ref().and_then(|r| r.filters.fault.as_deref()) {
        let deadline = fwd.timeout.map(|t| (start + t, t));
        let injected =
            crate::fault::inject(fault, &fwd.route, grpc, deadline, &shared.metrics).await;
        match injected {
            Ok(None) => {}
            Ok(Some(resp)) => {
                let (route, backend) = (&fwd.route, &fwd.backend.name);
                shared.record(
                    None,
                    direction,
                    route,
                    backend,
                    resp.status(),
                    "fault",
                    start.elapsed(),
                );
                return Ok(resp);
            }
            Err(e) => {
                return Ok(shared.fail(direction, &fwd.route, &fwd.backend.name, e, grpc, start));
            }
        }
    }

    // 2. Request filters: the rule's, then the chosen backend's.
    if let Some(rule) = &fwd.rule {
        filters::apply_request(&rule.filters, &mut parts, fwd.prefix_len);
        if let Some(i) = fwd.backend_index {
            filters::apply_request(&rule.backends[i].filters, &mut parts, fwd.prefix_len);
        }
    }

    // 3. Mirror: copy the request to mirror backends, when its body is small enough to copy.
    let mut body = Body::from(body);
    if let Some(rule) = fwd.rule.as_ref().filter(|r| !r.filters.mirrors.is_empty()) {
        body = mirror(
            &shared,
            direction,
            &fwd.route,
            &rule.filters.mirrors,
            &parts,
            body,
            conn.client,
        )
        .await;
    }

    // 4–5. Endpoint and forward, retrying other endpoints only when a connection failed.
    //    A stream on HTTP/2 (either side) that moves no data for the stream idle timeout
    //    is reset, so that a client that never reads cannot hold an upstream stream.
    let bounds = &snap.settings.bounds;
    let watch =
        (parts.version == Version::HTTP_2 || use_http2(&fwd.backend, parts.version)).then(|| {
            let expired = shared
                .metrics
                .idle_closed
                .get_or_create(&crate::metrics::IdleLabels { kind: "stream" });
            conn.streams.watch(bounds.stream_idle_timeout, &expired)
        });
    if let Some(w) = &watch
        && !body.is_end_stream()
    {
        body = w.request(body);
    }
    let req = Request::from_parts(parts, body);
    let result = forward(&fwd, req, conn.client, start, bounds.h2(), &shared.metrics).await;
    let (mut resp, endpoint, answered) = match result {
        Ok(r) => r,
        Err(e) => return Ok(shared.fail(direction, &fwd.route, &fwd.backend.name, e, grpc, start)),
    };

    // 6. Response filters.
    if let Some(rule) = &fwd.rule {
        if let Some(edit) = &rule.filters.response_headers {
            edit.apply(resp.headers_mut());
        }
        if let Some(edit) = fwd
            .backend_index
            .and_then(|i| rule.backends[i].filters.response_headers.as_ref())
        {
            edit.apply(resp.headers_mut());
        }
    }

    // 7. Upgrades (WebSocket): splice the two upgraded connections together.
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(down) = downstream_upgrade
    {
        let up = hyper::upgrade::on(&mut resp);
        let idle = snap.settings.bounds.tcp_idle_timeout;
        let shared = shared.clone();
        tokio::spawn(async move {
            match tokio::try_join!(down, up) {
                Ok((d, u)) => {
                    // Quiet both ways for the idle time: closed, like opaque TCP.
                    let (d, u) = (TokioIo::new(d), TokioIo::new(u));
                    if let Ok(crate::io::Spliced::Idle) =
                        crate::io::splice(d, u, idle, idle, true).await
                    {
                        shared.metrics.idle("upgrade");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
            drop(endpoint);
        });
    }

    shared.record(
        fwd.stats.as_deref(),
        direction,
        &fwd.route,
        &fwd.backend.name,
        resp.status(),
        "",
        answered - start,
    );
    if let Some(busy) = busy {
        resp.body_mut().hold(busy);
    }
    if let Some(w) = watch
        && !resp.body().is_end_stream()
    {
        let resp = resp.map(|b| w.response(b));
        return Ok(resp);
    }
    Ok(resp)
}

/// Sends the request to an endpoint of the backend, within the forward's timeout. A request
/// that never left the proxy (connect failed, or a pooled connection closed before it was
/// written) is tried again on another connection. Returns the response and, for upgrades,
/// the in-flight guard (otherwise the response body holds it), and when the response head
/// arrived. The timeout runs from `start`, when the request arrived.
async fn forward(
    fwd: &Forward,
    mut req: Request<Body>,
    client: SocketAddr,
    start: Instant,
    h2_limits: H2Limits,
    metrics: &Metrics,
) -> Result<(Response<Body>, Option<InFlight>, Instant), ProxyError> {
    let backend = &fwd.backend;
    let hash = backend
        .hash_on
        .as_ref()
        .and_then(|on| hash_key(on, req.headers(), client));
    let h2 = use_http2(backend, req.version());
    let upgrade = prepare_upstream(&mut req, h2);
    let deadline = fwd.timeout.map(|t| start + t);
    // A request without a body goes through the lean HTTP/1.1 client (module h1), which
    // only reads it: sending it again needs no copy.
    let lean = !h2 && !upgrade && req.body().is_end_stream() && req.method() != Method::CONNECT;
    // An idempotent request without a body can be sent again if the connection closes before
    // any response (RFC 9110 §9.2.2): the keep-alive race where the upstream closes an idle
    // connection just as it is reused.
    let replay = if lean {
        None
    } else {
        Replay::of(&req, upgrade)
    };
    let replayable = replay.is_some() || (lean && idempotent(req.method()));
    let mut pending = Some(req);
    let mut last_err = None;
    // Endpoints this request failed on: a re-attempt goes elsewhere while it can (allocates
    // only once something failed).
    let mut tried: Vec<&EndpointState> = Vec::new();
    // Counts a failure against the endpoint (its backoff) and in metrics.
    let fail = |endpoint: &EndpointState, e: &ProxyError| {
        if let Some(kind) = failure_kind(e) {
            endpoint.failed(Instant::now());
            metrics.endpoint_failure(&backend.name, kind);
        }
    };
    for _ in 0..SEND_ATTEMPTS {
        let Some(endpoint) = backend.balancer.pick_avoiding(hash, &tried) else {
            return Err(ProxyError::NoEndpoint(backend.name.to_string()));
        };
        // The circuit breaker admits the attempt; it holds the permit while in flight.
        let permit = match &backend.gate {
            Some(g) => Some(
                g.request()
                    .map_err(|l| ProxyError::Overloaded(backend.name.clone(), l, g.limits.of(l)))?,
            ),
            None => None,
        };
        let guard = endpoint.start();
        let attempt = async {
            match &pending {
                Some(req) if lean => send_lean(endpoint, backend, req, start).await,
                _ => send(endpoint, backend, h2, h2_limits, &mut pending, start).await,
            }
        };
        let outcome = match deadline {
            Some(d) => match tokio::time::timeout_at(d, attempt).await {
                Ok(r) => r,
                Err(_) => Err(ProxyError::Timeout(fwd.timeout.unwrap_or_default())),
            },
            None => attempt.await,
        };
        let (resp, tx, sent, stream) = match outcome {
            Err(e) if e.retryable() && pending.is_some() => {
                tracing::debug!(endpoint = %endpoint.addr, error = %e, "request not sent; trying again");
                fail(endpoint, &e);
                tried.push(endpoint);
                last_err = Some(e);
                continue;
            }
            Err(e @ ProxyError::Closed(..)) if replayable => {
                tracing::debug!(endpoint = %endpoint.addr, error = %e, "connection closed before a response; replaying");
                fail(endpoint, &e);
                tried.push(endpoint);
                if !lean {
                    pending = replay.as_ref().map(Replay::request);
                }
                last_err = Some(e);
                continue;
            }
            Err(e) => {
                fail(endpoint, &e);
                return Err(e);
            }
            Ok(r) => r,
        };
        // A 5xx is a failure of the endpoint however fast it came: counted, so that an
        // endpoint answering errors at once does not look like the fastest one.
        if resp.status().is_server_error() {
            endpoint.failed(Instant::now());
            metrics.endpoint_failure(&backend.name, "5xx");
        } else {
            endpoint.succeeded();
        }
        let answered = Instant::now();
        if let Some(sent) = sent {
            backend
                .balancer
                .observe(endpoint, answered - sent, answered);
        }
        let (mut parts, incoming) = resp.into_parts();
        let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(&mut parts.headers, upgraded);
        if upgraded {
            // The connection now belongs to the upgraded stream: not pooled.
            return Ok((
                Response::from_parts(
                    parts,
                    Tracked {
                        inner: incoming,
                        guard: None,
                        permit,
                        pool: None,
                        tx: None,
                        busy: None,
                        stream,
                    }
                    .into(),
                ),
                Some(guard),
                answered,
            ));
        }
        // Only HTTP/1.1 connections are pooled per exchange (HTTP/2's is shared).
        let pooled = tx.is_some() || matches!(incoming, UpstreamBody::Lean(_));
        let mut tracked = Tracked {
            inner: incoming,
            guard: Some(guard),
            permit,
            pool: pooled.then(|| endpoint.clone()),
            tx,
            busy: None,
            stream,
        };
        if tracked.inner.is_end_stream() {
            // Nothing to read (204, HEAD, empty body): the writer will never poll this body,
            // so the exchange is complete now.
            tracked.finish();
        }
        return Ok((Response::from_parts(parts, tracked.into()), None, answered));
    }
    Err(last_err.unwrap_or_else(|| ProxyError::NoEndpoint(backend.name.to_string())))
}

/// The `kind` label of an attempt's error that counts against its endpoint, or `None` for
/// one that says nothing about it (a pooled connection found closed before the request was
/// written is the keep-alive race, not a failing endpoint).
fn failure_kind(e: &ProxyError) -> Option<&'static str> {
    match e {
        ProxyError::Connect(..) => Some("connect"),
        ProxyError::Closed(..) => Some("reset"),
        ProxyError::UpstreamProtocol(..) => Some("protocol"),
        ProxyError::Timeout(..) => Some("timeout"),
        _ => None,
    }
}

/// One attempt through the lean client, for a request without a body.
async fn send_lean(
    endpoint: &Arc<EndpointState>,
    backend: &Backend,
    req: &Request<Body>,
    start: Instant,
) -> Result<Sent, ProxyError> {
    let conn = endpoint
        .lean(
            backend.connect_timeout,
            backend.idle_timeout,
            start,
            backend.gate.as_ref(),
        )
        .await?;
    let sent = backend.balancer.measures_latency().then(Instant::now);
    match conn.send(req.method(), req.uri(), req.headers()).await {
        Ok(resp) => Ok((resp.map(UpstreamBody::Lean), None, sent, None)),
        Err(e @ h1::Error::NotSent(_)) => Err(ProxyError::NotSent(endpoint.addr, e.to_string())),
        Err(e @ h1::Error::Closed(_)) => Err(ProxyError::Closed(endpoint.addr, e.to_string())),
        Err(e @ h1::Error::Malformed(_)) => {
            Err(ProxyError::UpstreamProtocol(endpoint.addr, e.to_string()))
        }
    }
}

/// One attempt on one endpoint. On a retryable failure the request is left in `pending`.
/// Also returns, when the balancer uses latency, when the request was handed to a ready
/// connection: latency is measured from there, so connection setup does not count against
/// the endpoint. `start` (when the request arrived) dates an idle pooled connection.
async fn send(
    endpoint: &Arc<EndpointState>,
    backend: &Backend,
    h2: bool,
    h2_limits: H2Limits,
    pending: &mut Option<Request<Body>>,
    start: Instant,
) -> Result<Sent, ProxyError> {
    let no_request = || ProxyError::NoEndpoint(backend.name.to_string());
    let clock = || backend.balancer.measures_latency().then(Instant::now);
    if h2 {
        let (mut tx, stream) = endpoint
            .http2(backend.connect_timeout, h2_limits, backend.gate.as_ref())
            .await?;
        let sent = clock();
        let result = tx
            .try_send_request(pending.take().ok_or_else(no_request)?)
            .await;
        settle(result, endpoint, pending)
            .map(|resp| (resp.map(UpstreamBody::Hyper), None, sent, Some(stream)))
    } else {
        let mut tx = endpoint
            .http1(
                backend.connect_timeout,
                backend.idle_timeout,
                start,
                backend.gate.as_ref(),
            )
            .await?;
        let sent = clock();
        let result = tx
            .try_send_request(pending.take().ok_or_else(no_request)?)
            .await;
        settle(result, endpoint, pending)
            .map(|resp| (resp.map(UpstreamBody::Hyper), Some(tx), sent, None))
    }
}

/// A response, the HTTP/1.1 connection to pool afterwards, when the request was sent (read
/// only for a balancer that uses latency), and its stream on a pooled HTTP/2 connection.
type Sent = (
    Response<UpstreamBody>,
    Option<http1::SendRequest<Body>>,
    Option<Instant>,
    Option<H2Stream>,
);

/// Classifies a send failure: unsent (the request comes back into `pending`), closed before
/// any response, or a protocol failure.
fn settle(
    result: Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Body>>>,
    endpoint: &EndpointState,
    pending: &mut Option<Request<Body>>,
) -> Result<Response<Incoming>, ProxyError> {
    let mut e = match result {
        Ok(resp) => return Ok(resp),
        Err(e) => e,
    };
    if let Some(req) = e.take_message() {
        *pending = Some(req);
        return Err(ProxyError::NotSent(
            endpoint.addr,
            e.into_error().to_string(),
        ));
    }
    let e = e.into_error();
    Err(if connection_lost(&e) {
        ProxyError::Closed(endpoint.addr, e.to_string())
    } else {
        ProxyError::UpstreamProtocol(endpoint.addr, e.to_string())
    })
}

/// Whether a send failed because the connection went away (closed, reset, broken) before any
/// response, as opposed to the endpoint answering with something malformed.
fn connection_lost(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        return true;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

/// What is needed to send a bodiless idempotent request again.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

/// Methods whose requests may be sent twice with the effect of once (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl Replay {
    /// `upgrade`: the request asks the upstream for a protocol upgrade (never replayed).
    fn of(req: &Request<Body>, upgrade: bool) -> Option<Replay> {
        (idempotent(req.method()) && req.body().is_end_stream() && !upgrade).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn request(&self) -> Request<Body> {
        let mut r = Request::new(body::empty());
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// Whether to speak HTTP/2 to the backend: when the client did, or the port says so.
fn use_http2(backend: &Backend, version: Version) -> bool {
    use trellis_api::service::AppProtocol;
    match backend.protocol {
        Some(AppProtocol::Http2 | AppProtocol::Grpc) => true,
        Some(AppProtocol::Http) => version == Version::HTTP_2,
        _ => version == Version::HTTP_2,
    }
}

/// Rewrites the request head for the upstream protocol: origin-form and `Host` for HTTP/1.1,
/// an absolute URI (`:authority`) for HTTP/2, and no hop-by-hop headers. Returns whether
/// the request asks the upstream for a protocol upgrade (HTTP/1.1 only).
fn prepare_upstream(req: &mut Request<Body>, h2: bool) -> bool {
    let upgrade = !h2 && wants_upgrade(req.headers());
    strip_hop_by_hop(req.headers_mut(), upgrade);
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        if req.uri().authority().is_none() {
            // HTTP/1.1 in, HTTP/2 out: `Host` becomes `:authority`.
            let auth = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost")
                .to_string();
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(auth)
                .path_and_query(pq)
                .build()
            {
                *req.uri_mut() = uri;
            }
        }
        req.headers_mut().remove(header::HOST);
    } else {
        *req.version_mut() = Version::HTTP_11;
        // The common case — origin-form URI with a Host header — passes through untouched;
        // absolute-form (HTTP proxy mode) and HTTP/2 requests become origin-form + Host.
        if let Some(auth) = req.uri().authority() {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
            let pq = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
        }
    }
    upgrade
}

/// Replaces the request's path with its canonical form (`trellis_api::path`), for origin-form,
/// absolute-form and HTTP/2 requests alike; the query stays as sent. `OPTIONS *` and an
/// authority-form CONNECT (`CONNECT host:port`) have no path to normalize; a CONNECT with a
/// path does (apps that route on the path alone serve it).
fn canonical_path(parts: &mut http::request::Parts) -> Result<(), ProxyError> {
    let Some(pq) = parts.uri.path_and_query() else {
        return Ok(());
    };
    let path = pq.path();
    if path == "*" && parts.method == Method::OPTIONS {
        return Ok(());
    }
    let bad = |why: String| ProxyError::BadRequest(format!("path {path:?}: {why}"));
    let canonical = match trellis_api::path::normalize(path) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(p)) => p,
        Err(e) => return Err(bad(e.to_string())),
    };
    let with_query = match pq.query() {
        Some(q) => format!("{canonical}?{q}"),
        None => canonical,
    };
    let pq = http::uri::PathAndQuery::try_from(with_query).map_err(|e| bad(e.to_string()))?;
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = Some(pq);
    parts.uri = Uri::from_parts(uri).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// Whether the client asks for a protocol upgrade the proxy will pass. Never to `h2c`: after
/// the app's 101 the connection would carry HTTP/2 requests that no policy sees (h2c
/// smuggling); such a request goes on as a plain request, its `Upgrade` removed.
fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("upgrade"))
        })
        && !h.get_all(header::UPGRADE).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
        })
}

/// Non-standard hop-by-hop names, built at compile time (a `from_static` at run time parses).
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes headers that describe one connection, not the message (RFC 9110 §7.6.1). `te:
/// trailers` survives (gRPC needs it); `upgrade` survives when the exchange is an upgrade,
/// with `Connection: upgrade` alone. `Connection` cannot remove a header the message needs
/// or the mesh sets ([`protected`]): such tokens are ignored.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the (few) names, comparing without hashing, finds what is there: most
    // messages carry only `connection: keep-alive`, or nothing at all.
    let (mut connection, mut others) = (false, false);
    for n in h.keys() {
        if n == header::CONNECTION {
            connection = true;
        } else if n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == header::TE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
        {
            others = true;
        }
    }
    if connection {
        // `Connection` may name further hop-by-hop headers. Its usual tokens (`keep-alive`,
        // `close`, `upgrade`) name none beyond those handled here; compared as bytes, a value
        // made of one of them costs no split, no UTF-8 check and no allocation.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in h.get_all(header::CONNECTION) {
            if plain_connection_token(value.as_bytes()) {
                continue;
            }
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if !plain_connection_token(token)
                    && let Ok(n) = HeaderName::from_bytes(token)
                    && !protected(&n)
                {
                    named.push(n);
                }
            }
        }
        for n in named {
            h.remove(n);
        }
        if keep_upgrade {
            // Its other tokens were acted on here: none may act again after the mesh's
            // filters ran.
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        } else {
            h.remove(header::CONNECTION);
        }
    }
    if others {
        h.remove(header::TRANSFER_ENCODING);
        h.remove(KEEP_ALIVE);
        h.remove(PROXY_CONNECTION);
        if !keep_upgrade {
            h.remove(header::UPGRADE);
        }
        if h.get(header::TE).is_some_and(|v| v != "trailers") {
            h.remove(header::TE);
        }
    }
}

/// Headers `Connection` may not name: the ones that route and frame the message, and the
/// ones the mesh sets (`x-trellis-*`).
fn protected(n: &HeaderName) -> bool {
    n == header::HOST
        || n == header::CONTENT_LENGTH
        || n == header::CONTENT_TYPE
        || n == header::TE
        || n.as_str().starts_with("x-trellis-")
}

/// A `Connection` token that names no header to remove beyond those always removed.
fn plain_connection_token(t: &[u8]) -> bool {
    t.is_empty()
        || t.eq_ignore_ascii_case(b"keep-alive")
        || t.eq_ignore_ascii_case(b"close")
        || t.eq_ignore_ascii_case(b"upgrade")
}

/// The consistent-hash key of a request.
pub fn hash_key(on: &HashOn, headers: &HeaderMap, client: SocketAddr) -> Option<u64> {
    match on {
        HashOn::Header(name) => headers.get(name).map(|v| rand::hash_bytes(v.as_bytes())),
        HashOn::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(';'))
            .find_map(|kv| {
                kv.trim()
                    .strip_prefix(name.as_str())
                    .and_then(|r| r.strip_prefix('='))
            })
            .map(|v| rand::hash_bytes(v.as_bytes())),
        HashOn::SourceIp => Some(rand::hash_bytes(client.ip().to_string().as_bytes())),
    }
}

/// Sends copies of the request to mirror backends (responses discarded) and returns the body
/// for the main request. Copying needs the body in memory, so only bodies of a known size up
/// to [`MIRROR_BODY_LIMIT`] are mirrored.
async fn mirror(
    shared: &Arc<Shared>,
    direction: &'static str,
    route: &Arc<str>,
    mirrors: &[filters::Mirror],
    parts: &http::request::Parts,
    body: Body,
    client: SocketAddr,
) -> Body {
    let chosen: Vec<_> = mirrors
        .iter()
        .filter(|m| rand::below(1_000_000) < u64::from(m.per_million))
        .collect();
    if chosen.is_empty() {
        return body;
    }
    let size = body.size_hint().exact();
    if size.is_none_or(|s| s > MIRROR_BODY_LIMIT) && !body.is_end_stream() {
        return body;
    }
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return body::empty(),
    };
    let h2_limits = shared.snapshot().settings.bounds.h2();
    for m in chosen {
        let mut copy = Request::new(body::full(bytes.clone()));
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        let fwd = Forward {
            route: route.clone(),
            rule: None,
            backend_index: None,
            backend: m.backend.clone(),
            prefix_len: 0,
            timeout: m.backend.request_timeout,
            stats: None,
        };
        shared
            .metrics
            .mirrored
            .get_or_create(&RouteLabels {
                direction,
                route: route.clone(),
                backend: m.backend.name.clone(),
            })
            .inc();
        let shared = shared.clone();
        tokio::spawn(async move {
            let sent = forward(
                &fwd,
                copy,
                client,
                Instant::now(),
                h2_limits,
                &shared.metrics,
            );
            if let Ok((resp, ..)) = sent.await {
                // Drain so the pooled connection can be reused.
                let _ = resp.into_body().collect().await;
            }
        });
    }
    body::full(bytes)
}

impl Shared {
    fn fail(
        &self,
        direction: &'static str,
        route: &Arc<str>,
        backend: &Arc<str>,
        e: ProxyError,
        grpc: bool,
        start: Instant,
    ) -> Response<Body> {
        tracing::debug!(error = %e, %route, %backend, direction, "request failed");
        if let ProxyError::Overloaded(backend, limit, _) = &e {
            self.metrics.breaker_rejected(backend, *limit);
        }
        self.record(
            None,
            direction,
            route,
            backend,
            e.status(),
            e.label(),
            start.elapsed(),
        );
        // A remote caller learns no addresses, OS errors or policy names; the local app
        // gets the whole reason.
        let audience = if direction == "inbound" {
            Audience::Remote
        } else {
            Audience::App
        };
        e.into_response(grpc, audience)
    }

    /// Records a response. `stats`, when the snapshot resolved them, saves two label lookups.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        stats: Option<&RouteStats>,
        direction: &'static str,
        route: &Arc<str>,
        backend: &Arc<str>,
        status: StatusCode,
        error: &'static str,
        elapsed: std::time::Duration,
    ) {
        // Labels share the snapshot's strings: no allocation unless the series is new.
        let elapsed = elapsed.as_secs_f64();
        if let Some(s) = stats {
            s.requests.inc();
            s.latency.observe(elapsed);
            if status == StatusCode::OK && error.is_empty() {
                s.ok.inc();
                return;
            }
        } else {
            let labels = RouteLabels {
                direction,
                route: route.clone(),
                backend: backend.clone(),
            };
            self.metrics.requests.get_or_create(&labels).inc();
            self.metrics.latency.get_or_create(&labels).observe(elapsed);
        }
        let labels = ResponseLabels {
            direction,
            route: route.clone(),
            backend: backend.clone(),
            status: status.as_u16(),
            error,
        };
        self.metrics.responses.get_or_create(&labels).inc();
    }
}

/// An upstream response body, as read by hyper's client or by the lean one.
pub(crate) enum UpstreamBody {
    Hyper(Incoming),
    Lean(h1::ResponseBody),
}

impl UpstreamBody {
    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::Lean(b) => b.is_end_stream(),
        }
    }
}

/// A response body that keeps its endpoint's in-flight count raised until it ends, and
/// returns the HTTP/1.1 connection to the pool when the exchange finished cleanly.
pub(crate) struct Tracked {
    inner: UpstreamBody,
    guard: Option<InFlight>,
    /// The circuit breaker's count of this request, until the response ends.
    permit: Option<crate::breaker::RequestPermit>,
    /// The endpoint whose pool takes the connection back (none: the connection is not
    /// pooled, e.g. after an upgrade).
    pool: Option<Arc<EndpointState>>,
    /// hyper's handle on the connection; the lean client's connection is in its body.
    tx: Option<http1::SendRequest<Body>>,
    busy: Option<crate::io::Busy>,
    /// The stream counted on its HTTP/2 connection until the response ends.
    stream: Option<H2Stream>,
}

impl Tracked {
    pub(crate) fn hold(&mut self, busy: crate::io::Busy) {
        self.busy = Some(busy);
    }

    /// The exchange ended cleanly: release the endpoint and pool the connection.
    fn finish(&mut self) {
        self.guard.take();
        self.permit.take();
        self.busy.take();
        self.stream.take();
        let Some(endpoint) = self.pool.take() else {
            return;
        };
        match (&mut self.inner, self.tx.take()) {
            (UpstreamBody::Hyper(_), Some(tx)) => release(tx, endpoint),
            (UpstreamBody::Lean(b), _) => {
                if let Some(conn) = b.take_reusable() {
                    endpoint.release_lean(conn);
                }
            }
            (UpstreamBody::Hyper(_), None) => {}
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = body::BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, body::BodyError>>> {
        // Both kinds of body are `Unpin`.
        let this = self.get_mut();
        let res: Poll<Option<Result<Frame<Bytes>, body::BodyError>>> = match &mut this.inner {
            UpstreamBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Into::into))),
            UpstreamBody::Lean(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Into::into))),
        };
        match &res {
            // The writer stops polling once `is_end_stream` says so (a body with a known
            // length ends with its last data frame), so check after every frame.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(),
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                this.guard.take();
                this.permit.take();
                this.pool.take();
                this.tx.take();
                this.busy.take();
                this.stream.take();
            }
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::Lean(b) => b.size_hint(),
        }
    }
}

/// Puts a connection whose exchange finished back in the pool. Its connection task may not
/// have seen the end of the response yet; checkout waits for readiness (`ready()`), which is
/// cheaper than a task per request waiting here.
fn release(tx: http1::SendRequest<Body>, endpoint: Arc<EndpointState>) {
    endpoint.release_http1(tx);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header map from name/value pairs (also used by `h1`'s tests).
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::try_from(*n).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    /// Headers in, whether the exchange is an upgrade, the names left.
    type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a [&'a str]);

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let cases: &[Case] = &[
            (
                &[("host", "a"), ("accept", "*/*")],
                false,
                &["accept", "host"],
            ),
            (
                &[("host", "a"), ("connection", "keep-alive")],
                false,
                &["host"],
            ),
            (
                &[("connection", "close"), ("keep-alive", "timeout=5")],
                false,
                &[],
            ),
            (
                &[
                    ("connection", "x-private, Keep-Alive"),
                    ("x-private", "1"),
                    ("x-public", "2"),
                ],
                false,
                &["x-public"],
            ),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("proxy-connection", "keep-alive"),
                ],
                false,
                &[],
            ),
            (
                &[("te", "trailers"), ("content-type", "application/grpc")],
                false,
                &["content-type", "te"],
            ),
            (&[("te", "gzip")], false, &[]),
            (
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                true,
                &["connection", "upgrade"],
            ),
            (
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                false,
                &[],
            ),
            (&[("upgrade", "websocket")], false, &[]),
            (
                &[("connection", "Keep-Alive"), ("x-a", "1")],
                false,
                &["x-a"],
            ),
            (
                &[("connection", " close ,x-b,,"), ("x-b", "1"), ("x-c", "2")],
                false,
                &["x-c"],
            ),
            (
                &[("connection", "not a name"), ("x-d", "1")],
                false,
                &["x-d"],
            ),
            // `Connection` cannot remove what routes and frames the message, or what the
            // mesh sets.
            (
                &[
                    (
                        "connection",
                        "host, Content-Length, x-trellis-peer-identity, x-e",
                    ),
                    ("host", "a"),
                    ("content-length", "0"),
                    ("x-trellis-peer-identity", "spiffe://t/ns/a/sa/b"),
                    ("x-e", "1"),
                ],
                false,
                &["content-length", "host", "x-trellis-peer-identity"],
            ),
            (
                &[
                    ("connection", "te, content-type"),
                    ("te", "trailers"),
                    ("content-type", "application/grpc"),
                ],
                false,
                &["content-type", "te"],
            ),
        ];
        for (input, keep_upgrade, left) in cases {
            let mut h = headers(input);
            strip_hop_by_hop(&mut h, *keep_upgrade);
            assert_eq!(names(&h), *left, "{input:?} keep_upgrade={keep_upgrade}");
        }
    }

    #[test]
    fn an_upgrade_keeps_connection_upgrade_alone() {
        let mut h = headers(&[
            ("connection", "Upgrade, x-a"),
            ("upgrade", "websocket"),
            ("x-a", "1"),
            ("x-b", "2"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "upgrade", "x-b"]);
        assert_eq!(h[header::CONNECTION], "upgrade");
        // A second pass (after the mesh's filters) removes nothing more.
        h.insert("x-a", HeaderValue::from_static("by-mesh"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["x-a"], "by-mesh");
    }

    #[test]
    fn paths_become_canonical_in_every_request_form() {
        let cases: &[(Method, &str, Result<&str, &str>)] = &[
            (Method::GET, "/a/../b?x=%2e/../", Ok("/b?x=%2e/../")),
            (Method::GET, "/plain?q", Ok("/plain?q")),
            (
                Method::GET,
                "http://h.example//%61/./b",
                Ok("http://h.example/a/b"),
            ),
            (Method::GET, "http://h.example", Ok("http://h.example/")),
            (Method::OPTIONS, "*", Ok("*")),
            (Method::CONNECT, "h.example:443", Ok("h.example:443")),
            (
                Method::GET,
                "/a%2fb?c",
                Err("encoded slash (%2F) at byte 2"),
            ),
            (Method::GET, "/%zz", Err("invalid percent-encoding")),
        ];
        for (method, uri, want) in cases {
            let (mut parts, ()) = Request::builder()
                .method(method.clone())
                .uri(*uri)
                .body(())
                .unwrap()
                .into_parts();
            match (canonical_path(&mut parts), want) {
                (Ok(()), Ok(want)) => assert_eq!(parts.uri.to_string(), *want, "{uri}"),
                (Err(e), Err(want)) => {
                    assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                    assert!(e.to_string().contains(want), "{uri}: {e}");
                }
                (got, want) => panic!("{uri}: {got:?}, want {want:?}"),
            }
        }
    }
}
