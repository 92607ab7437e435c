//! Tracing on the request path, end to end on loopback: a client, an outbound proxy, an
//! inbound proxy and an app, with a real OTLP collector decoding the spans with the official
//! protobuf definitions. Context propagates in W3C and B3 forms, sampling honours the parent,
//! a request the proxy answers itself still gets a (failed) span, and a stuck collector never
//! slows a request.

mod support;

use http::Request;
use http_body_util::Full;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::collector::{Collector, Got};
use support::*;

fn telemetry(tracing: &str) -> String {
    format!(
        "---
apiVersion: trellis.dev/v1alpha1
kind: Telemetry
metadata: {{name: mesh}}
spec:
  tracing: {tracing}
"
    )
}

fn tracing_to(c: &Collector, percent: f64) -> String {
    format!(
        "{{collector: '{}', samplingPercent: {percent}, flushInterval: 20ms}}",
        c.endpoint()
    )
}

/// An inbound proxy `inbound-hop` in front of `app`.
async fn inbound_proxy(app: SocketAddr, extra: &str) -> TestProxy {
    start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: inbound-hop}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound:
    - {{name: in, address: 127.0.0.1:0, forwardTo: '{app}'}}
{extra}"
    ))
    .await
}

/// An outbound proxy (`test`) whose `out` listener goes to service `app` at `endpoints`.
async fn outbound_proxy(endpoints: &[SocketAddr], extra: &str) -> TestProxy {
    start_proxy(&format!(
        "{}{}{extra}",
        proxy_yaml("app"),
        service_yaml("app", 80, endpoints)
    ))
    .await
}

async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got2 {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let got = send(&h1_client(), req.body(Full::default()).unwrap()).await;
    Got2(got)
}

struct Got2(support::Got);

impl Got2 {
    /// A request header the app saw.
    fn seen(&self, name: &str) -> Option<String> {
        self.0.json()["headers"][name][0]
            .as_str()
            .map(str::to_string)
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn by_kind(spans: &[Got], kind: i32) -> &Got {
    spans
        .iter()
        .find(|s| s.span.kind == kind)
        .unwrap_or_else(|| panic!("no span of kind {kind}: {spans:#?}"))
}

#[tokio::test]
async fn one_request_yields_a_client_and_a_server_span_linked_to_the_caller() {
    let mut c = Collector::grpc().await;
    let app = upstream("app").await;
    let inbound = inbound_proxy(app.addr, &telemetry(&tracing_to(&c, 0.0))).await;
    let outbound = outbound_proxy(
        &[inbound.addr("in").await],
        &telemetry(&tracing_to(&c, 0.0)),
    )
    .await;
    let got = get_with(
        outbound.addr("out").await,
        "/orders/7?secret=1",
        &[
            ("traceparent", &format!("00-{TRACE}-{CALLER}-01")),
            ("tracestate", "vendor=x"),
        ],
    )
    .await;
    assert_eq!(got.0.status, 200);
    let spans = c.spans(2).await;
    let client = by_kind(&spans, 3);
    let server = by_kind(&spans, 2);
    for s in [client, server] {
        assert_eq!(s.trace_hex(), TRACE, "one trace");
        assert_eq!(s.attr("http.request.method").as_deref(), Some("GET"));
        assert_eq!(s.attr("url.path").as_deref(), Some("/orders/7"), "no query");
        assert_eq!(s.attr("http.response.status_code").as_deref(), Some("200"));
        assert_eq!(s.status_code(), 0, "{s:?}");
        assert_eq!(s.span.trace_state, "vendor=x");
        assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
    }
    // The caller's span → the outbound proxy's CLIENT span → the inbound proxy's SERVER span.
    assert_eq!(client.parent_hex(), CALLER);
    assert_eq!(server.parent_hex(), client.span_hex());
    assert_eq!(
        client.attr("trellis.direction").as_deref(),
        Some("outbound")
    );
    assert_eq!(client.attr("http.route").as_deref(), Some("default"));
    assert_eq!(
        client.attr("trellis.backend").as_deref(),
        Some("default/app:80")
    );
    let hop = inbound.addr("in").await;
    assert_eq!(
        client.attr("trellis.upstream").as_deref(),
        Some(hop.to_string().as_str())
    );
    assert_eq!(
        client.attr("network.peer.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(server.attr("trellis.direction").as_deref(), Some("inbound"));
    assert_eq!(
        server.resource_attr("service.name").as_deref(),
        Some("inbound-hop")
    );
    assert_eq!(
        client.resource_attr("service.name").as_deref(),
        Some("test")
    );
    assert_eq!(
        client.resource_attr("service.namespace").as_deref(),
        Some("default")
    );
    // The app sees the inbound proxy's span as its parent, in the format the caller used.
    let tp = got.seen("traceparent").expect("traceparent to the app");
    assert_eq!(tp, format!("00-{TRACE}-{}-01", server.span_hex()));
    assert_eq!(got.seen("tracestate").as_deref(), Some("vendor=x"));
    assert!(got.seen("b3").is_none() && got.seen("x-b3-traceid").is_none());
    // Both proxies count what they exported.
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbound.metric("trellis_tracing_spans_total{result=\"exported\"}") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "{}",
            outbound.proxy.metrics_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn b3_single_and_multi_header_contexts_are_continued_in_their_own_format() {
    let mut c = Collector::http(false).await;
    let app = upstream("app").await;
    let p = outbound_proxy(
        &[app.addr],
        &telemetry(&format!(
            "{{collector: '{}', protocol: http/protobuf, samplingPercent: 0, flushInterval: 20ms}}",
            c.endpoint()
        )),
    )
    .await;
    let out = p.addr("out").await;
    let single = get_with(out, "/", &[("b3", &format!("{TRACE}-{CALLER}-1"))]).await;
    let multi = get_with(
        out,
        "/",
        &[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", CALLER),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let spans = c.spans(2).await;
    let of = |trace: &str| {
        spans
            .iter()
            .find(|s| s.trace_hex() == trace)
            .unwrap_or_else(|| panic!("no span of {trace}: {spans:#?}"))
    };
    let s1 = of(TRACE);
    assert_eq!(s1.parent_hex(), CALLER);
    assert_eq!(
        single.seen("b3"),
        Some(format!("{TRACE}-{}-1-{CALLER}", s1.span_hex()))
    );
    assert!(single.seen("traceparent").is_none());
    // A 64-bit B3 trace id is left-padded to 128 bits.
    let s2 = of("0000000000000000a3ce929d0e0e4736");
    assert_eq!(s2.parent_hex(), CALLER);
    assert_eq!(
        multi.seen("x-b3-traceid").as_deref(),
        Some("0000000000000000a3ce929d0e0e4736")
    );
    assert_eq!(multi.seen("x-b3-spanid"), Some(s2.span_hex()));
    assert_eq!(multi.seen("x-b3-parentspanid").as_deref(), Some(CALLER));
    assert_eq!(multi.seen("x-b3-sampled").as_deref(), Some("1"));
}

#[tokio::test]
async fn sampling_honours_the_parent_and_the_rate() {
    let mut c = Collector::grpc().await;
    let app = upstream("app").await;
    let at = |percent: f64| telemetry(&tracing_to(&c, percent));
    let all = outbound_proxy(&[app.addr], &at(100.0)).await;
    let none = outbound_proxy(&[app.addr], &at(0.0)).await;
    let unsampled = format!("00-{TRACE}-{CALLER}-00");
    let sampled_trace = "11111111111111111111111111111111";
    let sampled = format!("00-{sampled_trace}-{CALLER}-01");
    // At 100%, an unsampled parent is not recorded, but its decision is passed on.
    let got = get_with(all.addr("out").await, "/", &[("traceparent", &unsampled)]).await;
    let tp = got.seen("traceparent").unwrap();
    assert!(
        tp.starts_with(&format!("00-{TRACE}-")) && tp.ends_with("-00"),
        "{tp}"
    );
    // At 0%, no context: not recorded, and passed on as unsampled (a new trace).
    let got = get_with(none.addr("out").await, "/", &[]).await;
    let fresh = got.seen("traceparent").unwrap();
    assert!(fresh.ends_with("-00"), "{fresh}");
    let fresh_trace = fresh[3..35].to_string();
    // At 0%, a sampled parent is recorded; at 100% a request without context starts one.
    get_with(none.addr("out").await, "/", &[("traceparent", &sampled)]).await;
    let got = get_with(all.addr("out").await, "/", &[]).await;
    let started = got.seen("traceparent").unwrap();
    assert!(started.ends_with("-01"), "{started}");
    let started_trace = started[3..35].to_string();
    let mut seen = Vec::new();
    c.until(&mut seen, |s| {
        s.iter().any(|g| g.trace_hex() == sampled_trace)
            && s.iter().any(|g| g.trace_hex() == started_trace)
    })
    .await;
    // The unsampled ones ended before the sampled ones on the same proxies: had they been
    // recorded, they would have been exported first.
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert!(
        seen.iter()
            .all(|g| g.trace_hex() != TRACE && g.trace_hex() != fresh_trace)
    );
    let root = seen
        .iter()
        .find(|g| g.trace_hex() == started_trace)
        .unwrap();
    assert!(root.span.parent_span_id.is_empty(), "a new trace's root");
}

#[tokio::test]
async fn a_request_the_proxy_answers_itself_gets_a_failed_span() {
    let mut c = Collector::grpc().await;
    // No endpoints: the proxy answers 503 itself.
    let p = outbound_proxy(&[], &telemetry(&tracing_to(&c, 100.0))).await;
    let got = get_with(p.addr("out").await, "/nowhere", &[]).await;
    assert_eq!(got.0.status, 503);
    let spans = c.spans(1).await;
    let s = &spans[0];
    assert_eq!(s.span.kind, 3);
    assert_eq!(s.status_code(), 2, "ERROR: {s:?}");
    assert_eq!(s.attr("error.type").as_deref(), Some("no_endpoint"));
    assert_eq!(s.attr("trellis.reason").as_deref(), Some("no_endpoint"));
    assert_eq!(s.attr("http.response.status_code").as_deref(), Some("503"));
    assert!(s.attr("trellis.upstream").is_none());
}

#[tokio::test]
async fn a_stuck_collector_never_slows_requests_and_drops_are_counted() {
    let c = Collector::http(true).await;
    let app = upstream("app").await;
    let p = outbound_proxy(
        &[app.addr],
        &telemetry(&format!(
            "{{collector: '{}', protocol: http/protobuf, samplingPercent: 100, queueSize: 4, batchSize: 2, flushInterval: 10ms}}",
            c.endpoint()
        )),
    )
    .await;
    let out = p.addr("out").await;
    let client = h1_client();
    let start = Instant::now();
    for _ in 0..60 {
        assert_eq!(get_via(&client, out, "/").await.status, 200);
    }
    // Sixty requests through a debug build on two cores: seconds at worst; a request waiting
    // for the hung collector would wait forever.
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    // The queue (4) and the batch stuck in export (2) hold some; the rest are dropped.
    let dropped = p.metric("trellis_tracing_spans_total{result=\"dropped_queue_full\"}");
    assert!(
        dropped >= 60.0 - 4.0 - 2.0 - 2.0,
        "{}",
        p.proxy.metrics_text()
    );
    assert_eq!(
        p.metric("trellis_tracing_spans_total{result=\"exported\"}"),
        0.0
    );
}
