//! One request's trace span and access log line. [`Hop::begin`] reads the caller's trace
//! context and makes this hop's span (a child of it, or a new trace); the request path writes
//! the span into the request it sends on ([`Hop::inject`]) and notes what it decided (route,
//! policy, endpoint, why it answered itself); [`Hop::end`] takes the response and, when its
//! body ends, fails or is abandoned, exports the span (SERVER inbound, CLIENT outbound) and
//! queues the log line. Both sinks are bounded queues that never wait (modules `otlp`,
//! `accesslog`).
//!
//! With no `Telemetry` in force a request costs one atomic load here; with tracing on and the
//! request neither sampled nor logged, only the propagation headers.

use crate::accesslog::{Authority, Entry};
use crate::body::{Body, BodyError};
use crate::otlp::{self, attr};
use crate::telemetry::Sinks;
use crate::trace::{self, Formats};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body::{Frame, SizeHint};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;
use tokio::time::Instant;

/// Marks a response the proxy generated for an error: the error's label (`ProxyError::label`).
#[derive(Clone, Copy, Debug)]
pub struct Failed(pub &'static str);

/// The reason flag for a proxy error label: why the proxy answered itself.
pub fn reason(label: &str) -> &'static str {
    match label {
        "bad_request" => "bad_request",
        "unknown_host" | "no_route" => "no_route",
        "no_backends" | "backend_not_found" => "no_backend",
        "no_endpoint" => "no_endpoint",
        "connect" => "connect_failed",
        "not_sent" | "closed" => "upstream_reset",
        "upstream" => "upstream_protocol_error",
        "timeout" => "upstream_timeout",
        "denied" => "denied",
        "unauthenticated" => "unauthenticated",
        "circuit_breaker" => "overloaded",
        "rate_limited" => "rate_limited",
        "shed" => "shed",
        "fault" => "fault_abort",
        _ => "proxy_error",
    }
}

/// Reason flags that are answers the config asked for, not failures.
const ANSWERS: &[&str] = &["redirect", "direct_response"];

/// This request's tracing and logging; inert when nothing is configured.
#[derive(Default)]
pub struct Hop {
    /// The span to write into the request sent on, and in which formats.
    inject: Option<(trace::Span, Formats)>,
    /// What is recorded, when the span is sampled or the request logged.
    rec: Option<Box<Record>>,
}

/// What one request did, for its span and log line.
struct Record {
    sinks: Arc<Sinks>,
    /// This hop's span (tracing on); exported when sampled.
    span: Option<trace::Span>,
    start: Instant,
    answered: Option<Instant>,
    /// The values of the log line (and of the span), filled in as the request goes; the
    /// request's strings are kept in its own buffers, not copied.
    e: Entry,
}

impl Hop {
    /// Starts this hop: reads the trace context of `req` (which arrived on `conn`).
    pub fn begin<B>(
        telemetry: &crate::telemetry::Telemetry,
        conn: &crate::http::ConnInfo,
        req: &Request<B>,
    ) -> Hop {
        let sinks = telemetry.sinks();
        if !sinks.active() {
            return Hop::default();
        }
        let inject = sinks.tracer.as_ref().map(|t| {
            let incoming = trace::extract(req.headers());
            let formats = if incoming.formats == Formats::default() {
                t.formats
            } else {
                incoming.formats
            };
            (trace::child(&incoming, t.rate, crate::rand::u64), formats)
        });
        let sampled = inject.as_ref().is_some_and(|(s, _)| s.sampled);
        if !sampled && sinks.log.is_none() {
            return Hop { inject, rec: None };
        }
        let span = inject.as_ref().map(|(s, _)| s.clone());
        let e = Entry {
            start_time: SystemTime::now(),
            trace_id: span.as_ref().map(|s| s.trace_id),
            span_id: span.as_ref().map(|s| s.span_id),
            request_id: req.headers().get("x-request-id").cloned(),
            direction: conn.listener.direction(),
            client: conn.client,
            peer_identity: conn.peer_identity.clone(),
            method: Some(req.method().clone()),
            authority: authority(req),
            path: req.uri().path_and_query().cloned(),
            protocol: match req.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            request_bytes: req
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok()),
            ..Entry::default()
        };
        let rec = Record {
            sinks: arc_swap::Guard::into_inner(sinks),
            span,
            start: Instant::now(),
            answered: None,
            e,
        };
        Hop {
            inject,
            rec: Some(Box::new(rec)),
        }
    }

    /// The trace id of this hop's span when it is sampled (for metric exemplars).
    pub fn sampled_trace_id(&self) -> Option<trace::TraceId> {
        let span = match &self.inject {
            Some((s, _)) => Some(s),
            None => self.rec.as_ref()?.span.as_ref(),
        };
        span.filter(|s| s.sampled).map(|s| s.trace_id)
    }

    /// Writes this hop's span into the request sent on, as its parent.
    pub fn inject(&mut self, headers: &mut HeaderMap) {
        if let Some((span, formats)) = self.inject.take() {
            trace::inject(headers, &span, formats);
        }
    }

    /// The route rule and backend chosen.
    pub fn route(&mut self, route: &Arc<str>, backend: &Arc<str>) {
        if let Some(r) = &mut self.rec {
            r.e.route = Some(route.clone());
            r.e.backend = Some(backend.clone());
        }
    }

    /// The authorization policy that allowed or denied the request.
    pub fn policy(&mut self, policy: &Arc<str>) {
        if let Some(r) = &mut self.rec {
            r.e.policy = Some(policy.clone());
        }
    }

    /// Why the proxy answered itself (a reason flag).
    pub fn reason(&mut self, why: &'static str) {
        if let Some(r) = &mut self.rec {
            r.e.reason = Some(why);
        }
    }

    /// The endpoint that answered, when its response head arrived, and the identity it proved.
    pub fn upstream(&mut self, addr: SocketAddr, answered: Instant, verified: Option<&Arc<str>>) {
        if let Some(r) = &mut self.rec {
            r.e.upstream = Some(addr);
            r.answered = Some(answered);
            // Outbound, the peer is the endpoint, as the identity it proved over mutual TLS.
            if r.e.direction == "outbound" {
                r.e.peer_identity = verified.cloned();
            }
        }
    }

    /// Takes the response sent to the client; the hop ends with its body.
    pub fn end(self, resp: Response<Body>) -> Response<Body> {
        let Some(mut rec) = self.rec else {
            return resp;
        };
        rec.e.status = resp.status().as_u16();
        if let Some(Failed(label)) = resp.extensions().get::<Failed>() {
            rec.e.reason.get_or_insert(reason(label));
        }
        rec.e.grpc_status = grpc_status(resp.headers());
        if http_body::Body::is_end_stream(resp.body()) {
            rec.finish(None);
            return resp;
        }
        resp.map(|inner| {
            Body::from(Box::new(Observed {
                inner,
                rec: Some(rec),
            }))
        })
    }
}

fn authority<B>(req: &Request<B>) -> Authority {
    match (req.uri().authority(), req.headers().get(http::header::HOST)) {
        (Some(a), _) => Authority::Uri(a.clone()),
        (None, Some(h)) => Authority::Host(h.clone()),
        (None, None) => Authority::None,
    }
}

fn grpc_status(h: &HeaderMap) -> Option<u32> {
    // A `HeaderName`, not a `&str`: the name is not parsed again on every response.
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    h.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

impl Record {
    /// Exports the span (when sampled) and queues the log line (when logging).
    fn finish(mut self: Box<Self>, failure: Option<&'static str>) {
        if let Some(f) = failure {
            self.e.reason.get_or_insert(f);
        }
        let end = Instant::now();
        if let (Some(t), Some(span)) = (&self.sinks.tracer, &self.span)
            && span.sampled
        {
            t.record(self.otlp_span(span, end));
        }
        let Record {
            sinks,
            start,
            answered,
            mut e,
            ..
        } = *self;
        if let Some(log) = &sinks.log {
            e.upstream_time = answered.map(|a| a - start);
            e.duration = end - start;
            log.record(e);
        }
    }

    fn failed(&self) -> bool {
        let e = &self.e;
        let proxy_failed = e.reason.is_some_and(|r| !ANSWERS.contains(&r));
        // OpenTelemetry's HTTP conventions: 4xx is the client's failure, so an error of the
        // client span only.
        proxy_failed || e.status >= 500 || (e.direction == "outbound" && e.status >= 400)
    }

    fn otlp_span(&self, span: &trace::Span, end: Instant) -> otlp::Span {
        let e = &self.e;
        let method = e.method.as_ref().map_or("", Method::as_str);
        let route = e.route.as_deref().unwrap_or_default();
        let mut a = Vec::with_capacity(18);
        a.push(attr("http.request.method", method));
        a.push(attr("url.path", e.path.as_ref().map_or("", |p| p.path())));
        if !route.is_empty() {
            a.push(attr("http.route", route));
        }
        a.push(attr("http.response.status_code", i64::from(e.status)));
        let (host, port) = split_authority(e.authority.as_str());
        if !host.is_empty() {
            a.push(attr("server.address", host));
        }
        if let Some(p) = port {
            a.push(attr("server.port", i64::from(p)));
        }
        let peer = if e.direction == "inbound" {
            Some(e.client)
        } else {
            e.upstream
        };
        if let Some(p) = peer {
            a.push(attr("network.peer.address", p.ip().to_string()));
            a.push(attr("network.peer.port", i64::from(p.port())));
        }
        a.push(attr(
            "network.protocol.version",
            match e.protocol {
                "HTTP/2" => "2",
                "HTTP/1.0" => "1.0",
                _ => "1.1",
            },
        ));
        let failed = self.failed();
        if failed {
            let kind = match e.reason {
                Some(r) => r.to_string(),
                None => e.status.to_string(),
            };
            a.push(attr("error.type", kind));
        }
        if let Some(g) = e.grpc_status {
            a.push(attr("rpc.system", "grpc"));
            a.push(attr("rpc.grpc.status_code", i64::from(g)));
        }
        a.push(attr("trellis.direction", e.direction));
        if let Some(b) = e.backend.as_deref().filter(|b| !b.is_empty()) {
            a.push(attr("trellis.backend", b));
        }
        if let Some(u) = e.upstream {
            a.push(attr("trellis.upstream", u.to_string()));
        }
        if let Some(p) = &e.peer_identity {
            a.push(attr("trellis.peer.identity", &**p));
        }
        if let Some(p) = &e.policy {
            a.push(attr("trellis.policy", &**p));
        }
        if let Some(r) = e.reason {
            a.push(attr("trellis.reason", r));
        }
        let name = if route.is_empty() {
            method.to_string()
        } else {
            format!("{method} {route}")
        };
        otlp::Span {
            trace_id: span.trace_id.to_vec(),
            span_id: span.span_id.to_vec(),
            trace_state: span
                .tracestate
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            parent_span_id: span.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
            name,
            kind: if e.direction == "inbound" {
                otlp::kind::SERVER
            } else {
                otlp::kind::CLIENT
            },
            start_time_unix_nano: otlp::unix_nanos(e.start_time),
            end_time_unix_nano: otlp::unix_nanos(e.start_time + (end - self.start)),
            attributes: a,
            status: failed.then(|| otlp::Status {
                message: e.reason.unwrap_or_default().to_string(),
                code: 2,
            }),
            flags: 1,
        }
    }
}

/// A forwarded (opaque) TCP connection's access log line, written when the connection ends.
pub struct TcpHop(Option<Box<TcpRecord>>);

struct TcpRecord {
    sinks: Arc<Sinks>,
    direction: &'static str,
    wall: SystemTime,
    start: Instant,
    client: SocketAddr,
    peer: Option<Arc<str>>,
    backend: Arc<str>,
    /// `None` until the connection ended on its own.
    reason: Option<Option<&'static str>>,
}

impl TcpHop {
    /// A connection from `client` about to be forwarded to `backend`.
    pub fn begin(
        telemetry: &crate::telemetry::Telemetry,
        direction: &'static str,
        client: SocketAddr,
        peer: Option<Arc<str>>,
        backend: &Arc<str>,
    ) -> TcpHop {
        let sinks = telemetry.sinks();
        if sinks.log.is_none() {
            return TcpHop(None);
        }
        TcpHop(Some(Box::new(TcpRecord {
            sinks: arc_swap::Guard::into_inner(sinks),
            direction,
            wall: SystemTime::now(),
            start: Instant::now(),
            client,
            peer,
            backend: backend.clone(),
            reason: None,
        })))
    }

    /// How forwarding ended (`None`: no endpoint could be reached).
    pub fn end(mut self, outcome: &std::io::Result<Option<crate::io::Spliced>>) {
        if let Some(r) = &mut self.0 {
            r.reason = Some(match outcome {
                Ok(Some(_)) => None,
                Ok(None) => Some("connect_failed"),
                Err(_) => Some("stream_reset"),
            });
        }
    }
}

impl Drop for TcpHop {
    fn drop(&mut self) {
        let Some(r) = self.0.take() else { return };
        let Some(log) = &r.sinks.log else { return };
        let end = Instant::now();
        log.record(Entry {
            start_time: r.wall,
            direction: r.direction,
            client: r.client,
            peer_identity: r.peer.clone(),
            protocol: "TCP",
            backend: Some(r.backend.clone()),
            // Dropped before it ended: the proxy is draining.
            reason: r.reason.unwrap_or(Some("drained")),
            duration: end - r.start,
            ..Default::default()
        });
    }
}

/// `host[:port]` (an IPv6 host in brackets).
fn split_authority(a: &str) -> (&str, Option<u16>) {
    match a.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse().ok()),
        _ => (a, None),
    }
}

/// A response body that ends its hop when it ends, fails or is dropped.
pub struct Observed {
    inner: Body,
    rec: Option<Box<Record>>,
}

impl Observed {
    fn done(&mut self, failure: Option<&'static str>) {
        if let Some(r) = self.rec.take() {
            r.finish(failure);
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // Dropped before its end: the client went away.
        self.done(Some("client_gone"));
    }
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(r) = &mut this.rec {
                    if let Some(d) = f.data_ref() {
                        r.e.response_bytes += d.len() as u64;
                    } else if let Some(t) = f.trailers_ref()
                        && let Some(g) = grpc_status(t)
                    {
                        r.e.grpc_status = Some(g);
                    }
                }
                // The writer stops polling once the body says it ended.
                if http_body::Body::is_end_stream(&this.inner) {
                    this.done(None);
                }
            }
            Poll::Ready(None) => this.done(None),
            Poll::Ready(Some(Err(_))) => this.done(Some("stream_reset")),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_label_has_a_reason_flag() {
        let labels = [
            ("bad_request", "bad_request"),
            ("unknown_host", "no_route"),
            ("no_route", "no_route"),
            ("no_backends", "no_backend"),
            ("backend_not_found", "no_backend"),
            ("no_endpoint", "no_endpoint"),
            ("connect", "connect_failed"),
            ("not_sent", "upstream_reset"),
            ("closed", "upstream_reset"),
            ("upstream", "upstream_protocol_error"),
            ("timeout", "upstream_timeout"),
            ("denied", "denied"),
            ("unauthenticated", "unauthenticated"),
            ("circuit_breaker", "overloaded"),
            ("fault", "fault_abort"),
        ];
        for (label, want) in labels {
            assert_eq!(reason(label), want, "{label}");
        }
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("orders:8080"), ("orders", Some(8080)));
        assert_eq!(split_authority("orders"), ("orders", None));
        assert_eq!(split_authority("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_authority("[::1]"), ("[::1]", None));
    }
}
