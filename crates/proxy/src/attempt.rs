//! One try of a request: pick an endpoint (avoiding those the request already failed on),
//! send within the try's time, and report what came back to the endpoint, the balancer and
//! the metrics ([`report`], once per try). The retry loop around it is `http::forward`.

use crate::body::Body;
use crate::endpoint::{EndpointState, H2Limits, H2Stream, InFlight};
use crate::error::ProxyError;
use crate::h1;
use crate::http::UpstreamBody;
use crate::metrics::Metrics;
use crate::snapshot::Backend;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What every try of one request shares.
pub(crate) struct Try<'a> {
    pub backend: &'a Backend,
    /// Consistent-hash key.
    pub hash: Option<u64>,
    /// A session's endpoint: a member of this backend (session persistence).
    pub pin: Option<(&'a Backend, usize)>,
    /// HTTP/2 to the endpoint.
    pub h2: bool,
    /// An HTTP/1.1 request that may go over HTTP/2 to an endpoint that is a peer sidecar
    /// speaking it (ALPN `trellis/h2`).
    pub mesh_h2: bool,
    /// Through the lean HTTP/1.1 client (no body, nothing to upgrade).
    pub lean: bool,
    pub h2_limits: H2Limits,
    /// When the request arrived: dates an idle pooled connection.
    pub start: Instant,
}

/// A response head, and what keeps its exchange going.
pub(crate) struct Answer {
    pub resp: Response<UpstreamBody>,
    /// The endpoint's in-flight count, raised until the response ends.
    pub guard: InFlight,
    /// The circuit breaker's count of this request, until the response ends.
    pub permit: Option<crate::breaker::RequestPermit>,
    /// The HTTP/1.1 connection to pool afterwards (hyper's client).
    pub tx: Option<http1::SendRequest<Body>>,
    /// The stream on a pooled HTTP/2 connection.
    pub stream: Option<H2Stream>,
    pub answered: Instant,
}

/// What one try came to, and where.
pub(crate) struct Tried<'a> {
    pub endpoint: &'a Arc<EndpointState>,
    pub outcome: Result<Answer, ProxyError>,
}

/// Sends the request once, to an endpoint not in `tried` while another can take it. The
/// try ends at `until` (answering `Timeout(timeout)`). A request that was not sent stays in
/// `pending` (the lean client only borrows it). `Err`: no endpoint at all, or the circuit
/// breaker refused the try (neither is worth another try).
pub(crate) async fn attempt<'a>(
    t: &Try<'a>,
    tried: &[&EndpointState],
    pending: &mut Option<Request<Body>>,
    until: Option<(Instant, Duration)>,
    metrics: &Metrics,
) -> Result<Tried<'a>, ProxyError> {
    let backend = t.backend;
    // A session's endpoint counts only on its own backend (not on a fallback).
    let bound = t
        .pin
        .filter(|(b, _)| std::ptr::eq(*b, backend))
        .map(|(_, m)| m);
    let Some(endpoint) = backend.balancer.pick_bound(bound, t.hash, tried) else {
        return Err(ProxyError::NoEndpoint(backend.name.to_string()));
    };
    // The circuit breaker admits the try; the permit is held while it is in flight.
    let permit = match &backend.gate {
        Some(g) => Some(
            g.request()
                .map_err(|l| ProxyError::Overloaded(backend.name.clone(), l, g.limits.of(l)))?,
        ),
        None => None,
    };
    let guard = endpoint.start();
    let how = if t.h2 {
        How::H2
    } else if t.mesh_h2 && endpoint.speaks_mesh_h2(t.start) {
        mesh_how(t.lean, endpoint.in_flight())
    } else {
        How::H1
    };
    // HTTP/2 needs an authority: a request without a usable Host keeps HTTP/1.1 (the app
    // must get the Host its client sent, not one HTTP/2 made up). Parsed once, here.
    let authority = match how {
        How::MeshH2 => pending.as_ref().and_then(crate::http::authority),
        _ => None,
    };
    let how = if how == How::MeshH2 && authority.is_none() {
        How::H1
    } else {
        how
    };
    let send = async {
        let sent = match (&*pending, how) {
            // The lean client only borrows the request, which stays for another try: HTTP/2
            // takes a copy of its head.
            (Some(req), How::MeshH2) if t.lean => {
                let mut copy = Some(crate::http::copy_head(req));
                send(
                    endpoint,
                    backend,
                    how,
                    authority,
                    t.h2_limits,
                    &mut copy,
                    t.start,
                )
                .await
            }
            (Some(req), How::H1) if t.lean => send_lean(endpoint, backend, req, t.start).await,
            _ => {
                let h2 = t.h2_limits;
                send(endpoint, backend, how, authority, h2, pending, t.start).await
            }
        };
        match sent {
            // An older peer (it answered ALPN `trellis/1`): the same endpoint, over HTTP/1.1,
            // within this try (the request was not sent).
            Err(ProxyError::NotSent(..))
                if how == How::MeshH2 && !endpoint.speaks_mesh_h2(Instant::now()) =>
            {
                match &*pending {
                    Some(req) if t.lean => send_lean(endpoint, backend, req, t.start).await,
                    _ => {
                        let h2 = t.h2_limits;
                        send(endpoint, backend, How::H1, None, h2, pending, t.start).await
                    }
                }
            }
            other => other,
        }
    };
    // Pinned where it is: the future holds both clients' states, and moving it into the
    // timeout and then into the await copied it twice per request (callgrind).
    let send = std::pin::pin!(send);
    let outcome = match until {
        Some((at, timeout)) => tokio::time::timeout_at(at, send)
            .await
            .unwrap_or(Err(ProxyError::Timeout(timeout))),
        None => send.await,
    };
    let now = Instant::now();
    let outcome = match outcome {
        Ok((resp, tx, sent, stream)) => {
            let latency = sent.map(|s| now - s);
            // A shed answer says the service is busy, not that this endpoint is broken.
            if !crate::overload::is_shed(&resp) {
                report(backend, endpoint, metrics, Ok(resp.status()), latency, now);
            }
            Ok(Answer {
                resp,
                guard,
                permit,
                tx,
                stream,
                answered: now,
            })
        }
        Err(e) => {
            report(backend, endpoint, metrics, Err(&e), None, now);
            Err(e)
        }
    };
    Ok(Tried { endpoint, outcome })
}

/// Tells the endpoint (its failure backoff), the balancer (its latency estimate) and the
/// metrics how a try went: a response's status, or the error it failed with. A 5xx counts
/// against the endpoint however fast it came, so an endpoint that fails at once does not
/// look like the fastest one.
pub(crate) fn report(
    backend: &Backend,
    endpoint: &EndpointState,
    metrics: &Metrics,
    outcome: Result<StatusCode, &ProxyError>,
    latency: Option<Duration>,
    now: Instant,
) {
    let (kind, judged) = match outcome {
        Ok(s) => (
            s.is_server_error().then_some("5xx"),
            crate::outlier::Outcome::of_status(s.as_u16()),
        ),
        Err(e) => match failure_kind(e) {
            Some(kind) => (Some(kind), crate::outlier::Outcome::Gateway),
            // Says nothing about the endpoint.
            None => return,
        },
    };
    // The endpoint's backoff, outlier detection and their metrics.
    crate::outlier::report(backend, endpoint, judged, kind, latency, metrics);
    if let Some(rtt) = latency {
        backend.balancer.observe(endpoint, rtt, now);
    }
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
    let sent = backend.measures_latency().then(Instant::now);
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
    how: How,
    authority: Option<http::uri::Authority>,
    h2_limits: H2Limits,
    pending: &mut Option<Request<Body>>,
    start: Instant,
) -> Result<Sent, ProxyError> {
    let no_request = || ProxyError::NoEndpoint(backend.name.to_string());
    let clock = || backend.measures_latency().then(Instant::now);
    if how != How::H1 {
        let mesh = how == How::MeshH2;
        let (mut tx, stream) = endpoint
            .http2(
                backend.connect_timeout,
                h2_limits,
                backend.gate.as_ref(),
                mesh,
            )
            .await?;
        let sent = clock();
        let mut req = pending.take().ok_or_else(no_request)?;
        if let Some(authority) = authority.filter(|_| mesh) {
            crate::http::to_mesh_h2(&mut req, authority);
        }
        let result = tx.try_send_request(req).await;
        settle(result, endpoint, pending)
            .map(|resp| (resp.map(UpstreamBody::Hyper), None, sent, Some(stream)))
    } else {
        // A request that was not sent over HTTP/2 to a peer goes as it came.
        if let Some(req) = pending
            .as_mut()
            .filter(|r| r.version() == http::Version::HTTP_2)
        {
            crate::http::from_mesh_h2(req);
        }
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

/// Requests in flight to a peer sidecar (the one deciding included) up to which a request
/// without a body goes over HTTP/1.1, on a pooled mutual TLS connection of the lean client,
/// rather than over the shared HTTP/2 connection. A request alone on the path costs about
/// half the user-space instructions over HTTP/1.1 (no HTTP/2 framing, HPACK, stream state,
/// nor the task hyper spawns per HTTP/2 request and per stream), and HTTP/2's batching of
/// many requests into one record and system call only pays when many are in flight. It
/// also bounds the HTTP/1.1 connections to the peer: one opens only when none is idle, and
/// no more than this many requests are then in flight, so a burst of clients still shares
/// HTTP/2 connections instead of becoming a burst of handshakes.
pub(crate) const MESH_H1_IN_FLIGHT: u64 = 4;

/// How an HTTP/1.1 request goes to a peer sidecar that speaks HTTP/2 (pure): HTTP/1.1 when
/// it has no body and few requests are in flight to the peer, else HTTP/2.
fn mesh_how(lean: bool, in_flight: u64) -> How {
    if lean && in_flight <= MESH_H1_IN_FLIGHT {
        How::H1
    } else {
        How::MeshH2
    }
}

/// How a try reaches its endpoint.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum How {
    /// HTTP/1.1 (hyper's client, or the lean one for a request without a body).
    H1,
    /// HTTP/2, as the client or the service port asks.
    H2,
    /// An HTTP/1.1 request over HTTP/2 to a peer sidecar, which sends it on as HTTP/1.1.
    MeshH2,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_alone_goes_over_http1_and_a_crowd_over_http2() {
        // (no body, requests in flight to the peer including this one, how)
        let cases = [
            (true, 1, How::H1),
            (true, MESH_H1_IN_FLIGHT, How::H1),
            (true, MESH_H1_IN_FLIGHT + 1, How::MeshH2),
            (true, 1_000, How::MeshH2),
            // A body needs reading and writing at once: hyper's HTTP/2 client carries it.
            (false, 1, How::MeshH2),
            (false, 1_000, How::MeshH2),
        ];
        for (lean, in_flight, want) in cases {
            assert_eq!(
                mesh_how(lean, in_flight),
                want,
                "lean={lean} in_flight={in_flight}"
            );
        }
    }
}
