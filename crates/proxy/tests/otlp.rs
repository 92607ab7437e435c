//! Span export over OTLP to a collector on loopback, decoded with the official OpenTelemetry
//! definitions (opentelemetry-proto): both protocols deliver every span intact, and a
//! collector that hangs costs dropped, counted spans, never a waiting request.

mod support;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::collector::Collector;
use trellis_proxy::otlp::{self, ExportConfig, Exporter, Protocol};

fn config(endpoint: String, protocol: Protocol) -> ExportConfig {
    ExportConfig {
        endpoint,
        protocol,
        queue: 64,
        batch: 4,
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
        resource: vec![otlp::attr("service.name", "catalog")],
    }
}

fn span(i: u8) -> otlp::Span {
    otlp::Span {
        trace_id: vec![i; 16],
        span_id: vec![i; 8],
        parent_span_id: if i.is_multiple_of(2) {
            vec![0xab; 8]
        } else {
            vec![]
        },
        name: format!("GET /products/{i}"),
        kind: otlp::kind::CLIENT,
        start_time_unix_nano: 1_000 + u64::from(i),
        end_time_unix_nano: 2_000 + u64::from(i),
        attributes: vec![
            otlp::attr("http.request.method", "GET"),
            otlp::attr("http.response.status_code", 200i64),
        ],
        flags: 1,
        ..Default::default()
    }
}

/// Checks the spans a collector decoded against what was sent.
fn check(got: Vec<ExportTraceServiceRequest>, n: u8) {
    let mut spans = Vec::new();
    for req in got {
        for rs in req.resource_spans {
            let res = rs.resource.expect("resource");
            assert_eq!(res.attributes[0].key, "service.name");
            for ss in rs.scope_spans {
                assert_eq!(ss.scope.expect("scope").name, "trellis-proxy");
                spans.extend(ss.spans);
            }
        }
    }
    spans.sort_by_key(|s| s.trace_id.clone());
    assert_eq!(spans.len(), usize::from(n));
    for (i, s) in (1..=n).zip(&spans) {
        assert_eq!(s.trace_id, vec![i; 16]);
        assert_eq!(s.span_id, vec![i; 8]);
        assert_eq!(s.name, format!("GET /products/{i}"));
        assert_eq!(s.kind, 3, "client");
        assert_eq!(s.end_time_unix_nano, 2_000 + u64::from(i));
        assert_eq!(s.flags, 1);
        let status = s
            .attributes
            .iter()
            .find(|a| a.key == "http.response.status_code")
            .and_then(|a| a.value.clone()?.value);
        assert_eq!(status, Some(any_value::Value::IntValue(200)));
    }
}

#[tokio::test]
async fn spans_reach_an_http_collector_intact_in_batches() {
    let mut collector = Collector::http(false).await;
    let e = Exporter::start(config(collector.endpoint(), Protocol::HttpProtobuf));
    for i in 1..=10 {
        e.record(span(i));
    }
    let got = collector.requests(10).await;
    // Batches of at most 4.
    assert!(got.len() >= 3, "{} requests", got.len());
    check(got, 10);
    // Counted once the collector has answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.counts().exported.load(Ordering::Relaxed) < 10 {
        assert!(Instant::now() < deadline, "exports not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(e.counts().exported.load(Ordering::Relaxed), 10);
}

#[tokio::test]
async fn spans_reach_a_grpc_collector_intact() {
    let mut collector = Collector::grpc().await;
    let e = Exporter::start(config(collector.endpoint(), Protocol::Grpc));
    for i in 1..=6 {
        e.record(span(i));
    }
    check(collector.requests(6).await, 6);
}

#[tokio::test]
async fn a_hung_collector_costs_dropped_spans_not_waiting_requests() {
    let collector = Collector::http(true).await;
    let mut c = config(collector.endpoint(), Protocol::HttpProtobuf);
    c.queue = 8;
    c.timeout = Duration::from_millis(300);
    let e = Exporter::start(c);
    // Recording never waits, however many spans the hung collector leaves queued.
    let start = Instant::now();
    for i in 0..1_000u32 {
        e.record(span((i % 200) as u8 + 1));
    }
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    let full = e.counts().dropped_queue_full.load(Ordering::Relaxed);
    assert!(
        full >= 1_000 - 8 - 4,
        "only {full} dropped for a full queue"
    );
    // The batch in flight times out and is counted; nothing was exported.
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.counts().dropped_export_failed.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the hung export never timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(e.counts().exported.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_collector_that_is_not_there_costs_counted_drops() {
    // A port nothing listens on.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let e = Exporter::start(config(format!("http://{addr}"), Protocol::HttpProtobuf));
    for i in 1..=4 {
        e.record(span(i));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.counts().dropped_export_failed.load(Ordering::Relaxed) < 4 {
        assert!(Instant::now() < deadline, "drops not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(e.counts().exported.load(Ordering::Relaxed), 0);
}
