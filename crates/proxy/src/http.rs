//! The HTTP request path, top to bottom. Each step is one line in [`handle`]:
//! decide (route) → filters → mirror → forward (deadline → retries → one try: endpoint,
//! send, report) → response filters → metrics.

use crate::attempt;
use crate::body::{self, Body};
use crate::deadline;
use crate::decide::{self, Decision, Forward};
use crate::endpoint::{EndpointState, H2Limits, H2Stream, InFlight};
use crate::error::{Audience, ProxyError};
use crate::filters;
use crate::golden;
use crate::h1;
use crate::metrics::{Metrics, RouteLabels, RouteStats};
use crate::rand;
use crate::replay::Replay;
use crate::retry;
use crate::server::Shared;
use crate::snapshot::{Backend, HashOn, Listener, ListenerKind};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

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
    /// A peer sidecar's HTTP/2 connection (ALPN `trellis/h2`): a request marked
    /// [`ORIG_PROTO`] on it was HTTP/1.1 at the caller and goes on as HTTP/1.1.
    pub mesh_h2: bool,
}

/// Marks a request the calling sidecar carries over HTTP/2 for an HTTP/1.1 client; honoured
/// only on a peer sidecar's `trellis/h2` connection, and removed from every other request.
pub const ORIG_PROTO: http::HeaderName = http::HeaderName::from_static("trellis-orig-proto");

/// The header list a sidecar-to-sidecar HTTP/2 connection takes, either way: HTTP/1.1
/// requests and responses ride on it, whose heads hyper's HTTP/1.1 side takes up to
/// ~400 KB; HTTP/2's usual 16 KiB would refuse big cookies and tokens that passed before.
pub const MESH_H2_MAX_HEADER_LIST: u32 = 256 * 1024;

/// What decided when a request's token was refused (metrics, access log).
static REQUEST_AUTHENTICATION: std::sync::LazyLock<Arc<str>> =
    std::sync::LazyLock::new(|| "request-authentication".into());

/// Request header carrying the calling sidecar's SPIFFE id to the app (mutual TLS only).
pub const PEER_IDENTITY: &str = "x-trellis-peer-identity";

/// Handles one request; never fails (errors become responses).
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // The fleet view (module `tap`) sees every request from its arrival to its response head;
    // this hop's span and access log line (module `hop`) end with the response body.
    let start = Instant::now();
    let mut seen = crate::tap::Seen::begin(&shared.report.taps, &conn, &req);
    let mut hop = crate::hop::Hop::begin(&shared.telemetry, &conn, &req);
    let resp = serve(shared.clone(), conn, req, &mut seen, &mut hop).await;
    seen.end(&shared.report, &resp, start.elapsed());
    Ok(hop.end(resp))
}

/// The request path proper; `seen` and `hop` note what it decided.
async fn serve(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
    seen: &mut crate::tap::Seen,
    hop: &mut crate::hop::Hop,
) -> Response<Body> {
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
    // The client connection's own protocol (its streams' idle timeout), before a request
    // a peer sidecar carried over HTTP/2 for an HTTP/1.1 client becomes HTTP/1.1 again.
    let client_h2 = parts.version == Version::HTTP_2;
    let (orig_proto, peer_identity) = mesh_headers(&parts.headers);
    if orig_proto
        && let Some(v) = parts.headers.remove(ORIG_PROTO)
        && conn.mesh_h2
        && v == "HTTP/1.1"
    {
        parts.version = Version::HTTP_11;
    }
    let grpc = decide::is_grpc(&parts);
    // Two Hosts: one hop would route on the first while the next might read the other
    // (RFC 9112 §3.2: a 400).
    let two_hosts = parts.headers.get_all(header::HOST).iter().nth(1).is_some();
    let at = golden::Req {
        direction,
        peer: conn.peer_identity.as_deref(),
        grpc,
        start,
        // The exemplar's trace: this hop's sampled span, else a sampled caller's (tracing off).
        trace_id: hop
            .sampled_trace_id()
            .or_else(|| golden::sampled_trace(&parts.headers)),
    };
    if two_hosts {
        return shared.fail(
            &at,
            &NONE,
            &NONE,
            ProxyError::BadRequest("more than one Host header".into()),
        );
    }
    // Before anything reads or sets a header: the client's hop-by-hop headers go now, so its
    // `Connection` cannot remove what the mesh adds below (identity, route filters).
    strip_hop_by_hop(&mut parts.headers, downstream_upgrade.is_some());
    // The next hop's parent is this hop's span.
    hop.inject(&mut parts.headers);
    // One canonical path, before authentication, authorization and routing read it.
    if let Err(e) = canonical_path(&mut parts) {
        return shared.fail(&at, &NONE, &NONE, e);
    }
    if matches!(listener.kind, ListenerKind::Inbound { .. }) {
        // The app learns who called it from the sidecar alone: a client-sent value is dropped.
        if peer_identity {
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
                hop.policy(&REQUEST_AUTHENTICATION);
                shared.authz_verdict(
                    &listener.name,
                    &crate::authz::Verdict {
                        allow: false,
                        policy: REQUEST_AUTHENTICATION.clone(),
                        rule: None,
                        audit_denied_by: None,
                        audit_rule: None,
                    },
                    &format_args!("{} {}: {why}", parts.method, parts.uri.path()),
                );
                return shared.fail(&at, &NONE, &NONE, ProxyError::Unauthenticated(why));
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
        shared.authz_verdict(
            &listener.name,
            &verdict,
            &format_args!(
                "{} {} from {}",
                parts.method,
                parts.uri.path(),
                conn.peer_identity.as_deref().unwrap_or("(no identity)")
            ),
        );
        hop.policy(&verdict.policy);
        if !verdict.allow {
            return shared.fail(&at, &NONE, &NONE, ProxyError::Denied(verdict.policy));
        }
    }
    // 0a. Rate limits: the caller's share of this listener's service (module `ratelimit`).
    if let Err(e) = crate::ratelimit::inbound(&shared, &snap, listener, &conn, hop) {
        return shared.fail(&at, &NONE, &NONE, e);
    }

    // 0b. Admission (overload): a concurrency slot, held until the response body ends, or
    //     shed at once (module `overload`).
    let mut slot =
        match crate::overload::admit(listener, &parts, conn.peer_identity.as_deref(), hop) {
            Ok(slot) => slot,
            Err(e) => return shared.fail(&at, &NONE, &NONE, e),
        };

    // 1. Decide: which rule, which backend (pure).
    let mut fwd = match decide::decide(&snap, listener, &parts, rand::u64()) {
        Decision::Forward(f) => {
            hop.route(&f.route, &f.backend.name);
            f
        }
        Decision::Fail(e) => return shared.fail(&at, &NONE, &NONE, e),
        Decision::Redirect {
            route,
            location,
            status,
        } => {
            seen.routed(&route, &NONE);
            hop.route(&route, &NONE);
            hop.reason("redirect");
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = status;
            if let Some((n, v)) = filters::location_header(&location) {
                resp.headers_mut().insert(n, v);
            }
            shared.made(&at, &route, &NONE, &resp, "");
            return resp;
        }
        Decision::Respond {
            route,
            status,
            headers,
        } => {
            seen.routed(&route, &NONE);
            hop.route(&route, &NONE);
            hop.reason("direct_response");
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            shared.made(&at, &route, &NONE, &resp, "");
            return resp;
        }
    };
    seen.routed(&fwd.route, &fwd.backend.name);
    // CORS for an actual request: the Origin as the client sent it, before filters run.
    let cors = fwd.rule.as_ref().and_then(|r| {
        let c = r.filters.cors.as_ref()?;
        match c.decide(&parts.method, &parts.headers) {
            crate::cors::Answer::Actual(origin) => Some((c.clone(), origin)),
            _ => None,
        }
    });

    // 1a. Session persistence: a live session's token takes the request back to its backend
    //     (and, when it forwards, to its endpoint).
    let session = crate::session::resume(&mut fwd, &parts.headers, start);

    // A gRPC call's own deadline counts when it is the sooner.
    if grpc && let Some(t) = parts.headers.get(deadline::GRPC_TIMEOUT) {
        fwd.timeout = deadline::effective(fwd.timeout, deadline::parse(t));
    }

    // Rate limits of the chosen backend and the rule, outbound (module `ratelimit`).
    if let Err(e) = crate::ratelimit::outbound(&shared, &snap, &fwd, &conn, hop) {
        return shared.fail(&at, &fwd.route, &fwd.backend.name, e);
    }

    // 1b. Fault injection (the rule's FaultInjection): maybe a delay, then maybe an abort.
    if let Some(fault) = fwd.rule.as_ref().and_then(|r| r.filters.fault.as_deref()) {
        let deadline = fwd.timeout.map(|t| (start + t, t));
        let injected =
            crate::fault::inject(fault, &fwd.route, grpc, deadline, &shared.metrics).await;
        match injected {
            Ok(None) => {}
            Ok(Some(resp)) => {
                hop.reason("fault_abort");
                let (route, backend) = (&fwd.route, &fwd.backend.name);
                shared.made(&at, route, backend, &resp, "fault");
                return resp;
            }
            Err(e) => {
                return shared.fail(&at, &fwd.route, &fwd.backend.name, e);
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

    // 3. Mirror: the rule's and the chosen backend's mirrors get copies as the body streams
    //    (module `mirror`; a copy never holds the request back).
    let size = golden::request_size(
        &shared.metrics,
        fwd.stats.as_ref(),
        direction,
        &fwd.route,
        &fwd.backend.name,
    );
    let mut body = if body.is_end_stream() {
        size.observe(0.0);
        Body::from(body)
    } else {
        Body::counted(body, golden::RequestMeter::new(size))
    };
    if let Some(rule) = &fwd.rule {
        count_unresolved_mirrors(&shared, direction, &fwd.route, &rule.filters);
        if let Some(i) = fwd.backend_index {
            count_unresolved_mirrors(&shared, direction, &fwd.route, &rule.backends[i].filters);
        }
        let own = fwd
            .backend_index
            .map_or(&[][..], |i| &rule.backends[i].filters.mirrors[..]);
        if !rule.filters.mirrors.is_empty() || !own.is_empty() {
            let mirrors = rule.filters.mirrors.iter().chain(own);
            body = crate::mirror::start(
                &shared,
                direction,
                &fwd.route,
                mirrors,
                &parts,
                body,
                conn.client,
            );
        }
    }

    // 4–5. Endpoint and forward, with retries.
    //    A stream on HTTP/2 (either side) that moves no data for the stream idle timeout
    //    is reset, so that a client that never reads cannot hold an upstream stream.
    let bounds = &snap.settings.bounds;
    let watch = (client_h2 || use_http2(&fwd.backend, parts.version)).then(|| {
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
    let result = forward(
        &fwd,
        req,
        conn.client,
        start,
        bounds.h2(),
        &shared.metrics,
        grpc,
        session.as_ref(),
    )
    .await;
    let (mut resp, endpoint, answered, verified, upstream) = match result {
        Ok(r) => r,
        Err(e) => return shared.fail(&at, &fwd.route, &fwd.backend.name, e),
    };
    hop.upstream(upstream, answered, verified.as_ref());
    if let Some(s) = &mut slot {
        s.answered(answered);
    }

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
    if let Some((c, origin)) = &cors {
        c.apply(origin, resp.headers_mut());
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

    let pending = shared.record(
        &at,
        fwd.stats.as_ref(),
        &fwd.route,
        &fwd.backend.name,
        verified.as_deref(),
        &resp,
        "",
        answered - start,
        false,
    );
    if let Some(p) = pending {
        // Not a streamed upstream body: dropped here, it records what it has.
        let _ = resp
            .body_mut()
            .meter(golden::ResponseMeter::new(&shared, p));
    }
    if let Some(busy) = busy {
        resp.body_mut().hold(busy);
    }
    if let Some(s) = slot {
        resp.body_mut().hold_slot(s);
    }
    if let Some(w) = watch
        && !resp.body().is_end_stream()
    {
        let resp = resp.map(|b| w.response(b));
        return resp;
    }
    resp
}

/// A response, the in-flight guard of an upgrade, when its head arrived, the identity its
/// endpoint proved over mutual TLS, and the endpoint's address.
pub(crate) type Answered = (
    Response<Body>,
    Option<Upgraded>,
    Instant,
    Option<Arc<str>>,
    SocketAddr,
);

/// Sends the request to the backend, top to bottom: the request's deadline (the route's
/// timeout, or a gRPC call's own if sooner; `start` is when the request arrived) → the
/// retry loop (eligibility, budget, backoff, replay; module `retry`) → one try (module
/// `attempt`). Returns the response and, for upgrades, the in-flight guard (otherwise the
/// response body holds it), and when the response head arrived. A `session` sends the first
/// try to its endpoint and gets its token onto the response.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    fwd: &Forward,
    mut req: Request<Body>,
    client: SocketAddr,
    start: Instant,
    h2_limits: H2Limits,
    metrics: &Metrics,
    grpc: bool,
    session: Option<&crate::session::Sticky>,
) -> Result<Answered, ProxyError> {
    // The fallback step: another service while this one has no usable endpoint.
    let backend = fwd.backend.or_fallback();
    let version = req.version();
    let policy = fwd.retry.as_deref().unwrap_or(&backend.retry);
    let hash = backend
        .hash_on
        .as_ref()
        .and_then(|on| hash_key(on, req.headers(), client));
    let h2 = use_http2(backend, req.version());
    let upgrade = prepare_upstream(&mut req, h2);
    // A request without a body goes through the lean HTTP/1.1 client (module h1), which
    // only reads it: sending it again needs no copy.
    let lean = !h2 && !upgrade && req.body().is_end_stream() && req.method() != Method::CONNECT;
    let mut t = attempt::Try {
        backend,
        hash,
        pin: session.and_then(|s| s.pin()),
        h2,
        // To a peer sidecar that speaks it, an HTTP/1.1 request may go over HTTP/2 (not an
        // upgrade or CONNECT, which take the connection over; module attempt decides).
        mesh_h2: !h2 && !upgrade && req.method() != Method::CONNECT,
        lean,
        h2_limits,
        start,
    };
    // 1. The deadline bounds the whole request, retries included.
    let deadline = fwd.timeout.map(|d| start + d);
    // 2. Retries: the budget counts every request; what a retry replays is kept as the
    //    first try streams (an upgrade or CONNECT is never sent twice).
    backend.budget.request(start);
    let may_retry = !upgrade
        && req.method() != Method::CONNECT
        && retry::may_replay(policy, req.method(), grpc);
    let replay = if lean || !may_retry {
        None
    } else {
        Replay::of(&mut req, policy.max_body)
    };
    let mut retries = Retries {
        policy,
        backend,
        metrics,
        method: req.method().clone(),
        deadline,
        sent: 0,
        resent: 0,
    };
    let mut pending = Some(req);
    // Endpoints this request failed on: a retry goes elsewhere while it can (allocates
    // only once something failed).
    let mut tried: Vec<&EndpointState> = Vec::new();
    loop {
        // A retry once nothing usable is left untried here goes to the fallback (when it
        // speaks the same protocol upstream, as the request is already prepared for it).
        if !tried.is_empty()
            && let Some(f) = t.backend.fallback_avoiding(&tried)
            && use_http2(f, version) == h2
        {
            t.backend = f;
        }
        // 3. One try, within its own timeout and the deadline.
        // (The clock is read only when a per-try timeout or a gRPC deadline needs it.)
        let now = (fwd.try_timeout.is_some() || grpc).then(Instant::now);
        let until = match now {
            Some(now) => deadline::try_limit(now, deadline, fwd.try_timeout),
            None => deadline,
        }
        .map(|at| {
            let own = deadline.is_none_or(|d| at < d);
            let timeout = if own { fwd.try_timeout } else { fwd.timeout };
            (at, timeout.unwrap_or_default())
        });
        if let (Some(now), Some((at, _)), Some(req)) =
            (now.filter(|_| grpc), until, pending.as_mut())
        {
            // The upstream learns how long the caller still waits.
            let left = at.saturating_duration_since(now);
            req.headers_mut()
                .insert(deadline::GRPC_TIMEOUT, deadline::format(left));
        }
        let attempt::Tried { endpoint, outcome } =
            attempt::attempt(&t, &tried, &mut pending, until, metrics).await?;
        // 4. Retry? Only while nothing reached the client, and when the policy, the method,
        //    the count, the time left and the budget all allow it.
        let why = match &outcome {
            Ok(a) => {
                let grpc_status = grpc.then(|| retry::grpc_status(a.resp.headers())).flatten();
                retry::reason(
                    policy,
                    retry::Outcome::Response(a.resp.status(), grpc_status),
                )
            }
            Err(e) => retry::reason(policy, retry::Outcome::Error(e)),
        };
        let wait = why.and_then(|why| {
            let replayable = pending.is_some() || replay.as_ref().is_some_and(Replay::available);
            retries.wait(why, &outcome, replayable)
        });
        let Some(wait) = wait else {
            return match outcome {
                Ok(a) => {
                    let mut r = respond(endpoint, a);
                    crate::tap::note_upstream(&mut r.0, endpoint);
                    if let Some(s) = session {
                        s.stamp(t.backend, endpoint, r.0.headers_mut(), r.2);
                    }
                    Ok(r)
                }
                Err(e) => Err(e),
            };
        };
        let why = why.unwrap_or_default();
        metrics.retry(&backend.name, why);
        tracing::debug!(endpoint = %endpoint.addr, reason = why, ?wait, "retrying");
        tried.push(endpoint);
        // The failed try's response (and its connection) goes now, before the wait.
        drop(outcome);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if pending.is_none() {
            pending = replay.as_ref().map(Replay::request);
        }
    }
}

/// One request's retries so far, and what decides the next.
struct Retries<'a> {
    policy: &'a retry::Policy,
    backend: &'a Backend,
    metrics: &'a Metrics,
    method: Method,
    deadline: Option<Instant>,
    /// Retries sent.
    sent: u32,
    /// Unsent requests sent again.
    resent: u32,
}

impl Retries<'_> {
    /// The wait before retrying a try that failed for `why`, or `None` when it is not
    /// retried: the method, the count, the time left (with `Retry-After`) and last the
    /// backend's budget (a refusal counted) decide. `replayable`: the request is at hand.
    fn wait(
        &mut self,
        why: &'static str,
        outcome: &Result<attempt::Answer, ProxyError>,
        replayable: bool,
    ) -> Option<Duration> {
        if why == retry::reason::NOT_SENT {
            // Never left the proxy: sent again at once, outside policy and budget.
            self.resent += 1;
            return (self.resent <= NOT_SENT_RESENDS && replayable).then_some(Duration::ZERO);
        }
        if self.sent >= self.policy.retries
            || !replayable
            || !retry::method_allows(self.policy, &self.method, why)
        {
            return None;
        }
        let now = Instant::now();
        let remaining = self.deadline.map(|d| d.saturating_duration_since(now));
        let retry_after = outcome.as_ref().ok().and_then(|a| {
            let v = a.resp.headers().get(header::RETRY_AFTER)?;
            retry::retry_after(v, jiff::Timestamp::now())
        });
        let n = self.sent + 1;
        // A refused connection never reached its endpoint and the retry goes to another:
        // the first one is sent at once (a dead host must not add a backoff to every
        // request that drew it). Later ones back off like any other.
        let wait = if why == retry::reason::CONNECT_FAILURE && n == 1 {
            Duration::ZERO
        } else {
            retry::wait(&self.policy.backoff, n, rand::u64(), retry_after, remaining)?
        };
        if !self.backend.budget.try_retry(now) {
            self.metrics.retry_budget_exhausted(&self.backend.name);
            return None;
        }
        self.sent = n;
        Some(wait)
    }
}

/// Times a request that never left the proxy (a pooled connection found closed before it
/// was written) is sent again, beyond the policy's retries.
const NOT_SENT_RESENDS: u32 = 2;

/// The response to hand on: its hop-by-hop headers gone, its body releasing the endpoint
/// and pooling the connection when it ends.
fn respond(endpoint: &Arc<EndpointState>, a: attempt::Answer) -> Answered {
    let attempt::Answer {
        resp,
        guard,
        permit,
        tx,
        stream,
        answered,
    } = a;
    let (mut parts, incoming) = resp.into_parts();
    let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    // How long the upstream keeps hyper's connection idle, read before the hop-by-hop
    // headers go (the lean client reads its own).
    let tx = tx.map(|tx| (tx, crate::h1::idle_allowed(&parts.headers)));
    strip_hop_by_hop(&mut parts.headers, upgraded);
    if upgraded {
        // The connection now belongs to the upgraded stream: not pooled. The stream stays
        // in flight (endpoint and circuit breaker) until it ends, not until the 101 is sent.
        let body = Tracked {
            inner: incoming,
            guard: None,
            permit: None,
            pool: None,
            tx: None,
            busy: None,
            stream,
            meter: None,
            slot: None,
        };
        return (
            Response::from_parts(parts, body.into()),
            Some(Upgraded {
                _guard: guard,
                _permit: permit,
            }),
            answered,
            endpoint.verified().cloned(),
            endpoint.addr,
        );
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
        meter: None,
        slot: None,
    };
    if tracked.inner.is_end_stream() {
        // Nothing to read (204, HEAD, empty body): the writer will never poll this body,
        // so the exchange is complete now.
        tracked.finish();
    }
    (
        Response::from_parts(parts, tracked.into()),
        None,
        answered,
        endpoint.verified().cloned(),
        endpoint.addr,
    )
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
        h2_form(req);
    } else {
        h1_form(req);
    }
    upgrade
}

/// The authority HTTP/2 would carry for a request in HTTP/1.1 form: its URI's, else its
/// `Host` when that parses as one.
pub(crate) fn authority<B>(req: &Request<B>) -> Option<http::uri::Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    let b = req.headers().get(header::HOST)?.as_bytes();
    if b.is_empty() {
        return None;
    }
    http::uri::Authority::try_from(b).ok()
}

/// HTTP/2's request head: an absolute URI whose authority was `Host`.
fn h2_form<B>(req: &mut Request<B>) {
    let auth = authority(req);
    h2_form_with(req, auth);
}

/// [`h2_form`] with the request's [`authority`] already at hand.
fn h2_form_with<B>(req: &mut Request<B>, auth: Option<http::uri::Authority>) {
    *req.version_mut() = Version::HTTP_2;
    if req.uri().authority().is_none() {
        // HTTP/1.1 in, HTTP/2 out: `Host` becomes `:authority` (the path is kept as is).
        let auth = auth.unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(auth);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req.headers_mut().remove(header::HOST);
}

/// HTTP/1.1's request head: origin-form with `Host`.
fn h1_form<B>(req: &mut Request<B>) {
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

/// An HTTP/1.1 request prepared for its upstream, as it goes to a peer sidecar over HTTP/2:
/// HTTP/2's head, marked [`ORIG_PROTO`] so that the peer sends it on as HTTP/1.1.
/// `authority`: [`authority`] of the request, which it must have.
pub(crate) fn to_mesh_h2<B>(req: &mut Request<B>, authority: http::uri::Authority) {
    h2_form_with(req, Some(authority));
    req.headers_mut()
        .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
}

/// Undoes [`to_mesh_h2`] (a request that was not sent goes to a peer over HTTP/1.1 instead).
pub(crate) fn from_mesh_h2<B>(req: &mut Request<B>) {
    if req.headers_mut().remove(ORIG_PROTO).is_some() {
        h1_form(req);
    }
}

/// A copy of a request without a body (the lean client keeps the original to send again).
pub(crate) fn copy_head(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(crate::body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
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

/// Whether a request carries [`ORIG_PROTO`] and [`PEER_IDENTITY`], found in one pass over
/// its (few) names without hashing: most carry neither, and then nothing is looked up.
fn mesh_headers(h: &HeaderMap) -> (bool, bool) {
    let (mut orig_proto, mut peer_identity) = (false, false);
    for n in h.keys() {
        if *n == ORIG_PROTO {
            orig_proto = true;
        } else if n.as_str() == PEER_IDENTITY {
            peer_identity = true;
        }
    }
    (orig_proto, peer_identity)
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

/// Counts the copies that mirrors to backends that do not resolve would have sent, sampled
/// as real mirrors are: the Gateway API drops such a mirror.
fn count_unresolved_mirrors(
    shared: &Shared,
    direction: &'static str,
    route: &Arc<str>,
    filters: &filters::Filters,
) {
    for (backend, per_million) in &filters.unresolved_mirrors {
        if rand::below(1_000_000) < u64::from(*per_million) {
            shared
                .metrics
                .mirror_backend_not_found
                .get_or_create(&RouteLabels {
                    direction,
                    route: route.clone(),
                    backend: backend.clone(),
                })
                .inc();
        }
    }
}

impl Shared {
    fn fail(
        &self,
        at: &golden::Req<'_>,
        route: &Arc<str>,
        backend: &Arc<str>,
        e: ProxyError,
    ) -> Response<Body> {
        let direction = at.direction;
        tracing::debug!(error = %e, %route, %backend, direction, "request failed");
        if let ProxyError::Overloaded(backend, limit, _) = &e {
            self.metrics.breaker_rejected(backend, *limit);
        }
        let label = e.label();
        // A remote caller learns no addresses, OS errors or policy names; the local app
        // gets the whole reason.
        let audience = if direction == "inbound" {
            Audience::Remote
        } else {
            Audience::App
        };
        let mut resp = e.into_response(at.grpc, audience);
        self.made(at, route, backend, &resp, label);
        // For the access log's and span's reason flag (module hop).
        resp.extensions_mut().insert(crate::hop::Failed(label));
        resp
    }

    /// Records a response the proxy made itself.
    fn made(
        &self,
        at: &golden::Req<'_>,
        route: &Arc<str>,
        backend: &Arc<str>,
        resp: &Response<Body>,
        error: &'static str,
    ) {
        let elapsed = at.start.elapsed();
        self.record(at, None, route, backend, None, resp, error, elapsed, true);
    }

    /// Records a response (module `golden`). `stats`, when the snapshot resolved them, saves
    /// the label lookups; `made`: the proxy made the response (its body's size is known).
    /// Returns what is left to record when a streamed body ends.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        at: &golden::Req<'_>,
        stats: Option<&Arc<RouteStats>>,
        route: &Arc<str>,
        backend: &Arc<str>,
        verified: Option<&str>,
        resp: &Response<Body>,
        error: &'static str,
        elapsed: std::time::Duration,
        made: bool,
    ) -> Option<golden::Pending> {
        golden::record(
            &self.metrics,
            golden::End {
                stats,
                direction: at.direction,
                route,
                backend,
                hop: at.hop(backend, verified),
                status: resp.status(),
                grpc: golden::Grpc::of(at.grpc, resp.headers()),
                error,
                latency: elapsed,
                trace_id: at.trace_id,
                body: made.then(|| resp.body().size_hint().exact().unwrap_or(0)),
            },
        )
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

/// An upgraded exchange's counts, held until the spliced stream ends.
pub(crate) struct Upgraded {
    _guard: InFlight,
    _permit: Option<crate::breaker::RequestPermit>,
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
    /// hyper's handle on the connection, with how long its upstream keeps it idle; the
    /// lean client's connection is in its body.
    tx: Option<(http1::SendRequest<Body>, Option<Duration>)>,
    busy: Option<crate::io::Busy>,
    /// The stream counted on its HTTP/2 connection until the response ends.
    stream: Option<H2Stream>,
    /// The response's size (and gRPC status from trailers), recorded when it is dropped.
    meter: Option<crate::golden::ResponseMeter>,
    /// The OverloadPolicy's concurrency slot, until the response ends (boxed: most
    /// responses have none, and every body pays for this one's size).
    slot: Option<Box<crate::overload::Slot>>,
}

impl Tracked {
    pub(crate) fn hold(&mut self, busy: crate::io::Busy) {
        self.busy = Some(busy);
    }

    pub(crate) fn meter(&mut self, m: crate::golden::ResponseMeter) {
        self.meter = Some(m);
    }

    pub(crate) fn hold_slot(&mut self, slot: crate::overload::Slot) {
        self.slot = Some(Box::new(slot));
    }

    /// The exchange ended cleanly: release the endpoint and pool the connection.
    fn finish(&mut self) {
        self.guard.take();
        self.permit.take();
        self.busy.take();
        self.stream.take();
        self.slot.take();
        let Some(endpoint) = self.pool.take() else {
            return;
        };
        match (&mut self.inner, self.tx.take()) {
            (UpstreamBody::Hyper(_), Some((tx, allowed))) => endpoint.release_http1(tx, allowed),
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
        if let (Some(m), Poll::Ready(Some(Ok(f)))) = (&mut this.meter, &res) {
            m.frame(f);
        }
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
