//! The golden metrics of a request (requests, responses by status, class and gRPC status,
//! latency with trace exemplars, body sizes) and of a forwarded TCP connection, recorded when
//! they end; and the two text formats `/metrics` speaks.

use crate::metrics::{
    HttpLabels, Metrics, ResponseLabels, RouteLabels, RouteStats, TcpBytesLabels, TcpLabels,
};
use crate::parties::{Hop, Parties};
use crate::trace::TraceId;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::histogram::Histogram;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The latency histogram: its buckets carry the trace id of a sampled request that fell in.
pub type Latency = HistogramWithExemplars<TraceExemplar>;

/// An exemplar's labels: `trace_id`, 32 hex digits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceExemplar(pub TraceId);

impl EncodeLabelSet for TraceExemplar {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        // Hex only when scraped: the request path stores the 16 bytes.
        [("trace_id", crate::trace::trace_hex(&self.0))].encode(encoder)
    }
}

/// `grpc_status` label values, by code.
pub const GRPC_STATUS: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// `1xx` .. `5xx` (empty for a code outside them).
pub fn class(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "",
    }
}

/// A response's gRPC status, as far as its head tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grpc {
    /// Not a gRPC call.
    No,
    /// The code (`0`..`16`; anything else is `2`, UNKNOWN, as gRPC reads it).
    Status(u8),
    /// A gRPC call whose status comes in the trailers: counted when the body ends.
    Trailers,
}

impl Grpc {
    /// What the head of a response to a gRPC call (`grpc`) or another request says.
    pub fn of(grpc: bool, headers: &HeaderMap) -> Grpc {
        if !grpc {
            return Grpc::No;
        }
        match headers.get("grpc-status") {
            Some(v) => Grpc::Status(code(v.as_bytes())),
            None => Grpc::Trailers,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Grpc::Status(c) => GRPC_STATUS[usize::from(c)],
            _ => "",
        }
    }
}

fn code(v: &[u8]) -> u8 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .filter(|c| *c <= 16)
        .unwrap_or(2)
}

/// What every record of one request shares.
pub struct Req<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The caller's SPIFFE id (inbound, mutual TLS).
    pub peer: Option<&'a str>,
    /// Whether it is a gRPC call.
    pub grpc: bool,
    /// When it arrived.
    pub start: tokio::time::Instant,
    /// Its incoming trace, when sampled: the latency exemplar. (Once the proxy starts traces
    /// itself, the trace it started.)
    pub trace_id: Option<TraceId>,
}

impl<'a> Req<'a> {
    /// The hop's parties for `backend` and the identity its endpoint proved.
    pub fn hop(&self, backend: &'a str, verified: Option<&'a str>) -> Hop<'a> {
        if self.direction == "inbound" {
            Hop::Inbound { peer: self.peer }
        } else {
            Hop::Outbound { backend, verified }
        }
    }
}

/// The sampled trace id of a request's `traceparent`.
pub fn sampled_trace(h: &HeaderMap) -> Option<TraceId> {
    let v = h.get(crate::trace::TRACEPARENT)?;
    let (trace, _, sampled) = crate::trace::parse_traceparent(v.as_bytes())?;
    sampled.then_some(trace)
}

/// A request's end, at its response's headers.
pub struct End<'a> {
    /// The route and backend's handles, when the snapshot resolved them.
    pub stats: Option<&'a Arc<RouteStats>>,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Route rule id (empty: none was reached).
    pub route: &'a Arc<str>,
    /// Backend (empty: none was chosen).
    pub backend: &'a Arc<str>,
    /// What the hop knows of the other party.
    pub hop: Hop<'a>,
    /// Response status.
    pub status: StatusCode,
    /// Its gRPC status.
    pub grpc: Grpc,
    /// The proxy's reason when it answered itself.
    pub error: &'static str,
    /// Time to response headers.
    pub latency: Duration,
    /// The trace of a sampled request, for the latency bucket's exemplar.
    pub trace_id: Option<TraceId>,
    /// The response body's size when the proxy made it (`None`: streamed, measured by
    /// [`ResponseMeter`]).
    pub body: Option<u64>,
}

/// A response counted when its body ends (its gRPC status is in the trailers), and the
/// response size histogram of a streamed body.
pub struct Pending {
    size: Histogram,
    // Boxed: only gRPC calls whose status is in the trailers carry one.
    response: Option<Box<Deferred>>,
}

struct Deferred {
    labels: ResponseLabels,
    fast: Option<(Arc<RouteStats>, Arc<crate::metrics::PartyStats>)>,
    /// The metrics to count it in, set by [`ResponseMeter::new`].
    shared: Option<Arc<crate::Shared>>,
    /// The status the trailers brought.
    grpc: Option<u8>,
}

/// Records a request's end. Returns what is left to record when the response body ends.
pub fn record(m: &Metrics, mut e: End<'_>) -> Option<Pending> {
    if e.body.is_some() && e.grpc == Grpc::Trailers {
        // The proxy's own answer has no trailers to wait for.
        e.grpc = Grpc::No;
    }
    let own = m.workload();
    let secs = e.latency.as_secs_f64();
    let exemplar = e.trace_id.map(TraceExemplar);
    let plain = e.error.is_empty() && e.status == StatusCode::OK;
    let (parties, fast, size) = match e.stats {
        Some(stats) => {
            let p = stats.party(m, &own, e.hop);
            p.requests.inc();
            p.latency.observe(secs, exemplar, None);
            let size = &stats.sizes(m).response;
            if let Some(n) = e.body {
                size.observe(n as f64);
            }
            match e.grpc {
                Grpc::No if plain => p.ok.inc(),
                Grpc::Status(c) if plain => p.grpc_ok(m, stats, c).inc(),
                _ => 0,
            };
            let size = size.clone();
            let counted = plain && e.grpc != Grpc::Trailers;
            if counted {
                return e.body.is_none().then_some(Pending {
                    size,
                    response: None,
                });
            }
            (p.parties.clone(), Some((stats.clone(), p)), size)
        }
        None => {
            let parties = crate::parties::parties(&own, e.hop);
            let labels = HttpLabels {
                direction: e.direction,
                route: e.route.clone(),
                backend: e.backend.clone(),
                parties,
            };
            m.requests.get_or_create(&labels).inc();
            m.latency
                .get_or_create(&labels)
                .observe(secs, exemplar, None);
            let size = m
                .response_size
                .get_or_create(&RouteLabels {
                    direction: e.direction,
                    route: e.route.clone(),
                    backend: e.backend.clone(),
                })
                .clone();
            if let Some(n) = e.body {
                size.observe(n as f64);
            }
            (labels.parties, None, size)
        }
    };
    let labels = ResponseLabels {
        direction: e.direction,
        route: e.route.clone(),
        backend: e.backend.clone(),
        parties,
        status: e.status.as_u16(),
        class: class(e.status),
        grpc_status: e.grpc.label(),
        error: e.error,
    };
    if e.grpc == Grpc::Trailers {
        return Some(Pending {
            size,
            response: Some(Box::new(Deferred {
                labels,
                fast,
                shared: None,
                grpc: None,
            })),
        });
    }
    m.responses.get_or_create(&labels).inc();
    e.body.is_none().then_some(Pending {
        size,
        response: None,
    })
}

/// Measures a streamed response body and, for a gRPC call, reads its status from the
/// trailers; records both when the body is dropped (ended, failed or abandoned). Small: it
/// rides in every upstream response body.
pub struct ResponseMeter {
    pending: Pending,
    bytes: u64,
}

impl ResponseMeter {
    /// A meter for what `record` left pending.
    pub fn new(shared: &Arc<crate::Shared>, mut pending: Pending) -> ResponseMeter {
        if let Some(d) = &mut pending.response {
            d.shared = Some(shared.clone());
        }
        ResponseMeter { pending, bytes: 0 }
    }

    /// Sees a frame pass.
    pub fn frame(&mut self, f: &Frame<Bytes>) {
        if let Some(d) = f.data_ref() {
            self.bytes += d.len() as u64;
        } else if let Some(t) = f.trailers_ref()
            && let Some(d) = &mut self.pending.response
            && let Some(v) = t.get("grpc-status")
        {
            d.grpc = Some(code(v.as_bytes()));
        }
    }
}

impl Drop for ResponseMeter {
    fn drop(&mut self) {
        self.pending.size.observe(self.bytes as f64);
        let Some(d) = self.pending.response.take() else {
            return;
        };
        let Deferred {
            mut labels,
            fast,
            shared,
            grpc,
        } = *d;
        let Some(shared) = shared else {
            return;
        };
        let m = &shared.metrics;
        // A call that ended without trailers (reset, abandoned) has no status to count.
        labels.grpc_status = grpc.map_or("", |c| GRPC_STATUS[usize::from(c)]);
        match (grpc, fast) {
            (Some(c), Some((stats, p))) if labels.status == 200 && labels.error.is_empty() => {
                p.grpc_ok(m, &stats, c).inc();
            }
            _ => {
                m.responses.get_or_create(&labels).inc();
            }
        }
    }
}

/// Counts a request body's bytes and observes them when it is dropped.
pub struct RequestMeter {
    size: Histogram,
    bytes: u64,
}

impl RequestMeter {
    /// A meter observing into `stats`' request size histogram.
    pub fn new(size: Histogram) -> RequestMeter {
        RequestMeter { size, bytes: 0 }
    }

    /// Sees a frame pass.
    pub fn frame(&mut self, f: &Frame<Bytes>) {
        if let Some(d) = f.data_ref() {
            self.bytes += d.len() as u64;
        }
    }
}

impl Drop for RequestMeter {
    fn drop(&mut self) {
        self.size.observe(self.bytes as f64);
    }
}

/// The request size histogram for a route and backend.
pub fn request_size(
    m: &Metrics,
    stats: Option<&Arc<RouteStats>>,
    direction: &'static str,
    route: &Arc<str>,
    backend: &Arc<str>,
) -> Histogram {
    match stats {
        Some(s) => s.sizes(m).request.clone(),
        None => m
            .request_size
            .get_or_create(&RouteLabels {
                direction,
                route: route.clone(),
                backend: backend.clone(),
            })
            .clone(),
    }
}

/// A forwarded opaque TCP connection's counters, resolved once per connection.
pub struct TcpCounters {
    sent: Counter,
    received: Counter,
}

/// Counts a forwarded TCP connection and returns its byte counters.
pub fn tcp_forwarded(
    m: &Metrics,
    direction: &'static str,
    backend: &Arc<str>,
    hop: Hop<'_>,
) -> TcpCounters {
    let parties: Parties = crate::parties::parties(&m.workload(), hop);
    m.tcp_forwarded
        .get_or_create(&TcpLabels {
            direction,
            backend: backend.clone(),
            parties: parties.clone(),
        })
        .inc();
    let bytes = |way| {
        m.tcp_forwarded_bytes
            .get_or_create(&TcpBytesLabels {
                direction,
                backend: backend.clone(),
                parties: parties.clone(),
                way,
            })
            .clone()
    };
    TcpCounters {
        sent: bytes("sent"),
        received: bytes("received"),
    }
}

/// An upstream connection whose bytes count as they move: sent (written to it) and received
/// (read from it). Live, so a long connection shows in every scrape.
pub struct Counted<T> {
    inner: T,
    counters: TcpCounters,
}

impl<T> Counted<T> {
    /// Counts `inner`'s bytes.
    pub fn new(inner: T, counters: TcpCounters) -> Counted<T> {
        Counted { inner, counters }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counters.received.inc_by(n as u64);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.counters.sent.inc_by(n as u64);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.counters.sent.inc_by(n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether a scrape's `Accept` asks for OpenMetrics (any `application/openmetrics-text`
/// range not refused with `q=0`); everything else gets Prometheus text 0.0.4.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .is_some_and(|q| q.parse::<f64>().is_ok_and(|q| q <= 0.0))
                })
        })
    })
}

/// Content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of Prometheus text 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus text format 0.0.4 from OpenMetrics text: exemplars, `# UNIT` and `# EOF` go,
/// and a counter's `HELP` and `TYPE` name its `_total` samples, as that format wants.
pub fn to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some(h) = help.take() {
                let text = h["# HELP ".len()..].split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(without_exemplar(line));
        out.push('\n');
    }
    out
}

/// A sample line without its exemplar: cut at the first `#` outside quoted label values.
fn without_exemplar(line: &str) -> &str {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '#' if !quoted => return line[..i].trim_end(),
            _ => {}
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        let cases: &[(Option<&str>, bool)] = &[
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain"), false),
            (Some("text/plain;version=0.0.4;q=1,*/*;q=0.1"), false),
            (Some("application/openmetrics-text"), true),
            // What Prometheus sends.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                true,
            ),
            (Some("Application/OpenMetrics-Text; version=1.0.0"), true),
            (Some("application/openmetrics-text;q=0"), false),
            (
                Some("application/openmetrics-text; q=0.0, text/plain"),
                false,
            ),
        ];
        for (accept, want) in cases {
            assert_eq!(wants_openmetrics(*accept), *want, "{accept:?}");
        }
    }

    #[test]
    fn classes_and_grpc_codes() {
        for (s, c) in [
            (101, "1xx"),
            (200, "2xx"),
            (308, "3xx"),
            (404, "4xx"),
            (503, "5xx"),
        ] {
            assert_eq!(class(StatusCode::from_u16(s).unwrap()), c);
        }
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("grpc-status", v.parse().unwrap());
            m
        };
        assert_eq!(Grpc::of(false, &h("0")), Grpc::No);
        assert_eq!(Grpc::of(true, &HeaderMap::new()), Grpc::Trailers);
        assert_eq!(Grpc::of(true, &h("14")), Grpc::Status(14));
        // Out of range or not a number: UNKNOWN, so the label stays bounded.
        assert_eq!(Grpc::of(true, &h("99")), Grpc::Status(2));
        assert_eq!(Grpc::of(true, &h("x")), Grpc::Status(2));
    }

    #[test]
    fn the_proxys_own_answer_is_counted_at_once() {
        let m = Metrics::default();
        let (route, backend) = (Arc::from("default/r/0"), Arc::from("default/a:80"));
        let end = |grpc, body| End {
            stats: None,
            direction: "outbound",
            route: &route,
            backend: &backend,
            hop: Hop::Outbound {
                backend: "default/a:80",
                verified: None,
            },
            status: StatusCode::OK,
            grpc,
            error: "",
            latency: Duration::from_millis(1),
            trace_id: None,
            body,
        };
        // A gRPC call answered by the proxy without a status: nothing left for later.
        assert!(record(&m, end(Grpc::Trailers, Some(0))).is_none());
        assert_eq!(m.responses.len(), 1);
        // A streamed one waits for its trailers (and its size) until its body ends.
        let pending = record(&m, end(Grpc::Trailers, None));
        assert!(pending.as_ref().is_some_and(|p| p.response.is_some()));
        assert_eq!(m.responses.len(), 1);
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP trellis_http_requests HTTP requests routed.\n\
# TYPE trellis_http_requests counter\n\
trellis_http_requests_total{route=\"a # b\",x=\"q\\\"#\"} 3\n\
# HELP trellis_lat Latency.\n\
# TYPE trellis_lat histogram\n\
# UNIT trellis_lat seconds\n\
trellis_lat_bucket{le=\"0.1\"} 1 # {trace_id=\"0af7651916cd43dd8448eb211c80319c\"} 0.05\n\
trellis_lat_sum 0.05\n\
# HELP trellis_up Up.\n\
# TYPE trellis_up gauge\n\
trellis_up 1\n\
# EOF\n";
        let want = "# HELP trellis_http_requests_total HTTP requests routed.\n\
# TYPE trellis_http_requests_total counter\n\
trellis_http_requests_total{route=\"a # b\",x=\"q\\\"#\"} 3\n\
# HELP trellis_lat Latency.\n\
# TYPE trellis_lat histogram\n\
trellis_lat_bucket{le=\"0.1\"} 1\n\
trellis_lat_sum 0.05\n\
# HELP trellis_up Up.\n\
# TYPE trellis_up gauge\n\
trellis_up 1\n";
        assert_eq!(to_prometheus_text(om), want);
    }
}
