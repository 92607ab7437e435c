//! Outlier detection, active health checks and the one view of usable endpoints, end to end
//! with real servers on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::*;

/// A proxy for service `app` over `endpoints`, with a `BackendPolicy` whose spec has the
/// given extra lines (none: no policy at all).
async fn proxy_over(endpoints: &[SocketAddr], spec: &str) -> (TestProxy, SocketAddr) {
    let p = start_proxy(&yaml(endpoints, spec)).await;
    let addr = p.addr("out").await;
    (p, addr)
}

fn yaml(endpoints: &[SocketAddr], spec: &str) -> String {
    let mut yaml = format!(
        "{}{}",
        proxy_yaml("app"),
        service_yaml("app", 8080, endpoints)
    );
    if !spec.is_empty() {
        yaml.push_str(&format!(
            "---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: app}}
spec:
  targetRef: {{kind: Service, name: app}}
{spec}"
        ));
    }
    yaml
}

/// Ejections counted so far.
fn ejections(p: &TestProxy) -> f64 {
    p.metric("trellis_outlier_ejections_total{")
}

/// Sends GETs one after another until `done` or `limit` passes; panics on the limit.
async fn until(
    addr: SocketAddr,
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> usize {
    let client = h1_client();
    let start = Instant::now();
    let mut sent = 0;
    while !done() {
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?} ({sent} requests)"
        );
        let _ = get_via(&client, addr, "/").await;
        sent += 1;
    }
    sent
}

/// Sends `n` GETs from 4 clients; returns how many did not get 200, and the latencies.
async fn load(addr: SocketAddr, n: usize) -> (usize, Vec<Duration>) {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut failed = 0;
            let mut lat = Vec::new();
            for _ in 0..n / 4 {
                let t = Instant::now();
                if get_via(&client, addr, "/").await.status != 200 {
                    failed += 1;
                }
                lat.push(t.elapsed());
            }
            (failed, lat)
        }));
    }
    let (mut failed, mut lat) = (0, Vec::new());
    for t in tasks {
        let (f, l) = t.await.unwrap();
        failed += f;
        lat.extend(l);
    }
    lat.sort();
    (failed, lat)
}

fn p99(lat: &[Duration]) -> Duration {
    lat[lat.len() * 99 / 100]
}

/// The `/endpoints` entry of the endpoint at `addr`.
async fn endpoint_view(p: &TestProxy, addr: SocketAddr) -> serde_json::Value {
    let view = admin_json(p, "/endpoints").await;
    view["default/app:8080"]["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("no backend in {view}"))
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("no {addr} in {view}"))
        .clone()
}

#[tokio::test]
async fn an_endpoint_answering_500_at_once_is_ejected_with_no_config() {
    let (a, b) = (
        status_upstream("a", 200).await,
        status_upstream("b", 200).await,
    );
    let bad = status_upstream("bad", 500).await;
    let (p, addr) = proxy_over(&[a.addr, bad.addr, b.addr], "").await;
    // Failure-aware balancing sends it a request per backoff; the fifth 500 in a row ejects.
    until(addr, Duration::from_secs(20), "ejection", || {
        ejections(&p) >= 1.0
    })
    .await;
    assert_eq!(
        p.metric("trellis_outlier_ejections_total{backend=\"default/app:8080\",reason=\"consecutive_5xx\"}"),
        1.0
    );
    let view = endpoint_view(&p, bad.addr).await;
    assert_eq!(view["usable"], false, "{view}");
    assert_eq!(view["reason"], "ejected", "{view}");
    assert!(view["ejectedSeconds"].as_f64().unwrap() > 25.0, "{view}");
    assert_eq!(view["timesEjected"], 1, "{view}");
    assert!(p.metric("trellis_outlier_ejected{") == 1.0);
    // Once ejected: below 1% of 1,000 requests fail, and it gets none of them (it is out
    // for 30 s).
    let before = bad.hits.load(Ordering::Relaxed);
    let (failed, _) = load(addr, 1000).await;
    assert!(failed < 10, "{failed} of 1000 failed");
    assert_eq!(
        bad.hits.load(Ordering::Relaxed),
        before,
        "the ejected endpoint got traffic"
    );
}

#[tokio::test]
async fn an_ejected_endpoint_returns_after_its_ejection_time() {
    let (a, b) = (
        status_upstream("a", 200).await,
        status_upstream("b", 200).await,
    );
    let bad = status_upstream("bad", 500).await;
    let spec = "  loadBalancer: {algorithm: RoundRobin}\n  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 1s}\n";
    let (p, addr) = proxy_over(&[a.addr, bad.addr, b.addr], spec).await;
    until(addr, Duration::from_secs(20), "ejection", || {
        ejections(&p) >= 1.0
    })
    .await;
    let ejected_at = Instant::now();
    bad.status.store(200, Ordering::Relaxed);
    let before = bad.hits.load(Ordering::Relaxed);
    let hits = bad.hits.clone();
    until(addr, Duration::from_secs(10), "return", || {
        hits.load(Ordering::Relaxed) > before
    })
    .await;
    let back = ejected_at.elapsed();
    // Out for its 1 s (less the time it took to notice the ejection), back soon after.
    assert!(back >= Duration::from_millis(800), "back after {back:?}");
    assert!(back < Duration::from_secs(5), "back only after {back:?}");
    // Its probe succeeded: in full rotation again.
    let (failed, _) = load(addr, 300).await;
    assert_eq!(failed, 0);
    let got = bad.hits.load(Ordering::Relaxed) - before;
    assert!(
        got >= 80,
        "round robin gave the returned endpoint only {got} of 300"
    );
    let view = endpoint_view(&p, bad.addr).await;
    assert_eq!(view["usable"], true, "{view}");
    assert_eq!(view["reason"], "healthy", "{view}");
}

#[tokio::test]
async fn a_hung_endpoint_loses_its_traffic_by_gateway_failures() {
    let (a, b) = (
        status_upstream("a", 200).await,
        status_upstream("b", 200).await,
    );
    let (hung, accepted) = hung_upstream().await;
    let spec = "  loadBalancer: {algorithm: RoundRobin}\n  timeouts: {request: 200ms}\n  outlierDetection: {consecutiveGatewayErrors: 3}\n";
    let (p, addr) = proxy_over(&[a.addr, hung, b.addr], spec).await;
    // Each timeout backs it off (100, 200 ms), so the third comes within about a second,
    // and ejects it: the stated time is 5 s.
    let start = Instant::now();
    until(addr, Duration::from_secs(5), "ejection", || {
        ejections(&p) >= 1.0
    })
    .await;
    assert_eq!(
        p.metric("trellis_outlier_ejections_total{backend=\"default/app:8080\",reason=\"gateway_errors\"}"),
        1.0,
        "ejected after {:?}",
        start.elapsed()
    );
    let conns = accepted.load(Ordering::Relaxed);
    let (failed, lat) = load(addr, 400).await;
    assert_eq!(failed, 0);
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        conns,
        "the hung endpoint got traffic"
    );
    assert!(
        p99(&lat) < Duration::from_millis(150),
        "p99 {:?}",
        p99(&lat)
    );
}

#[tokio::test]
async fn a_slow_endpoint_is_ejected_as_a_latency_outlier_and_p99_recovers() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let slow = upstream_with_delay("slow", 200).await;
    let spec = "  loadBalancer: {algorithm: RoundRobin}\n  outlierDetection: {latency: {factor: 3, minLatency: 50ms}, interval: 1s}\n";
    let (p, addr) = proxy_over(&[a.addr, slow.addr, b.addr], spec).await;
    // Round robin gives it a third until it has enough samples.
    until(addr, Duration::from_secs(20), "ejection", || {
        ejections(&p) >= 1.0
    })
    .await;
    assert_eq!(
        p.metric(
            "trellis_outlier_ejections_total{backend=\"default/app:8080\",reason=\"latency\"}"
        ),
        1.0
    );
    let before = slow.hits.load(Ordering::Relaxed);
    let (failed, lat) = load(addr, 400).await;
    assert_eq!(failed, 0);
    assert_eq!(
        slow.hits.load(Ordering::Relaxed),
        before,
        "its share did not drop"
    );
    assert!(
        p99(&lat) < Duration::from_millis(100),
        "p99 {:?}",
        p99(&lat)
    );
}

#[tokio::test]
async fn max_ejection_percent_keeps_capacity() {
    let good = status_upstream("good", 200).await;
    let mut bad = Vec::new();
    for _ in 0..3 {
        bad.push(status_upstream("bad", 500).await);
    }
    let spec = "  loadBalancer: {algorithm: RoundRobin}\n  outlierDetection: {consecutive5xx: 2}\n";
    let eps: Vec<SocketAddr> = bad.iter().map(|u| u.addr).chain([good.addr]).collect();
    let (p, addr) = proxy_over(&eps, spec).await;
    until(addr, Duration::from_secs(20), "two ejections", || {
        ejections(&p) >= 2.0
    })
    .await;
    // Keep failing long after: the third never goes out while two are (50% of 4).
    let (_, _) = load(addr, 400).await;
    assert_eq!(ejections(&p), 2.0);
    assert_eq!(p.metric("trellis_outlier_ejected{"), 2.0);
    let view = admin_json(&p, "/endpoints").await;
    let out = view["default/app:8080"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "ejected")
        .count();
    assert_eq!(out, 2, "{view}");
}

#[tokio::test]
async fn an_http_health_check_marks_an_endpoint_down_and_up_by_its_thresholds() {
    let a = status_upstream("a", 200).await;
    let b = status_upstream("b", 200).await;
    let spec = "  loadBalancer: {algorithm: RoundRobin}\n  outlierDetection: {consecutive5xx: 0, consecutiveGatewayErrors: 0}\n  healthCheck: {http: {path: /healthz}, interval: 100ms, healthyThreshold: 2, unhealthyThreshold: 3, jitter: 0}\n";
    let (p, addr) = proxy_over(&[a.addr, b.addr], spec).await;
    let state = |v: &serde_json::Value| v["check"].as_str().unwrap_or("").to_string();
    let wait = |want: &'static str| {
        let p = &p;
        async move {
            let start = Instant::now();
            loop {
                let v = endpoint_view(p, b.addr).await;
                if state(&v) == want {
                    return v;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "never {want}: {v}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait("healthy").await;
    let fails_before =
        p.metric("trellis_health_checks_total{backend=\"default/app:8080\",result=\"fail\"}");
    b.health.store(503, Ordering::Relaxed);
    let v = wait("unhealthy").await;
    assert_eq!(v["usable"], false, "{v}");
    assert_eq!(v["reason"], "health check failing", "{v}");
    let fails = p
        .metric("trellis_health_checks_total{backend=\"default/app:8080\",result=\"fail\"}")
        - fails_before;
    assert!(fails >= 3.0, "down after {fails} failed checks");
    // Traffic avoids it meanwhile, though the app itself answers.
    let before = b.hits.load(Ordering::Relaxed);
    let (failed, _) = load(addr, 100).await;
    assert_eq!(failed, 0);
    assert_eq!(
        b.hits.load(Ordering::Relaxed),
        before,
        "traffic went to the unhealthy endpoint"
    );
    b.health.store(200, Ordering::Relaxed);
    let checks = b.checks.load(Ordering::Relaxed);
    wait("healthy").await;
    assert!(
        b.checks.load(Ordering::Relaxed) - checks >= 2,
        "up before two passing checks"
    );
    // Back: both share the traffic again.
    let before = b.hits.load(Ordering::Relaxed);
    let (failed, _) = load(addr, 100).await;
    assert_eq!(failed, 0);
    assert!(b.hits.load(Ordering::Relaxed) - before >= 40);
}

#[tokio::test]
async fn traffic_avoids_an_endpoint_whose_health_check_fails() {
    let a = status_upstream("a", 200).await;
    // b answers traffic, but its health endpoint says 204, which this check does not expect.
    let b = status_upstream("b", 200).await;
    b.health.store(204, Ordering::Relaxed);
    let spec = "  loadBalancer: {algorithm: RoundRobin}\n  healthCheck: {http: {path: /healthz, expectedStatuses: [200]}, interval: 50ms, unhealthyThreshold: 1, jitter: 0}\n";
    let (p, addr) = proxy_over(&[a.addr, b.addr], spec).await;
    let start = Instant::now();
    while endpoint_view(&p, b.addr).await["check"] != "unhealthy" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never marked down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = b.hits.load(Ordering::Relaxed);
    let (failed, _) = load(addr, 200).await;
    assert_eq!(failed, 0);
    let got = b.hits.load(Ordering::Relaxed) - before;
    assert_eq!(
        got, 0,
        "the endpoint failing its check got {got} requests of 200"
    );
}

#[tokio::test]
async fn a_tcp_health_check_marks_a_closed_port_down() {
    let a = status_upstream("a", 200).await;
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let spec = "  healthCheck: {tcp: {}, interval: 50ms, unhealthyThreshold: 2, jitter: 0}\n";
    let (p, _) = proxy_over(&[a.addr, closed], spec).await;
    let start = Instant::now();
    loop {
        let (up, down) = (
            endpoint_view(&p, a.addr).await,
            endpoint_view(&p, closed).await,
        );
        if up["check"] == "healthy" && down["check"] == "unhealthy" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{up} {down}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn checker_tasks_follow_the_config() {
    let (a, b) = (
        status_upstream("a", 200).await,
        status_upstream("b", 200).await,
    );
    // One check per endpoint at start, then none for an hour: a restarted task would check
    // again at once.
    let spec = "  healthCheck: {http: {path: /healthz}, interval: 1h}\n";
    let with = yaml(&[a.addr, b.addr], spec);
    let (p, _) = proxy_over(&[a.addr, b.addr], spec).await;
    let checks = || a.checks.load(Ordering::Relaxed) + b.checks.load(Ordering::Relaxed);
    let start = Instant::now();
    while checks() < 2 || p.metric("trellis_health_checkers ") < 2.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "checks did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.proxy.health_checkers(), 2);
    // The same backend again: the tasks keep running, nothing is checked again.
    let apply = |text: String| {
        let p = &p;
        async move {
            let r = trellis_api::parse_documents("test.yaml", &text).unwrap();
            p.proxy.apply(&r, "test.yaml").await.unwrap();
        }
    };
    apply(with.clone()).await;
    apply(with.replace("requestTimeout: 5s", "requestTimeout: 6s")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(checks(), 2, "a reload restarted the checks");
    assert_eq!(p.proxy.health_checkers(), 2);
    // One endpoint leaves: its task stops.
    apply(yaml(&[a.addr], spec)).await;
    assert_eq!(p.proxy.health_checkers(), 1);
    let start = Instant::now();
    while p.metric("trellis_health_checkers ") != 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "task did not stop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The check leaves the config: none left.
    apply(yaml(&[a.addr], "  loadBalancer: {algorithm: RoundRobin}\n")).await;
    assert_eq!(p.proxy.health_checkers(), 0);
    let start = Instant::now();
    while p.metric("trellis_health_checkers ") != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tasks did not stop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(endpoint_view(&p, a.addr).await["check"], "unchecked");
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `grpc.health.v1.Health/Check` answered from `status` for service `""` and `"app"`,
/// `NOT_FOUND` for any other.
#[derive(Clone)]
struct HealthService(std::sync::Arc<std::sync::atomic::AtomicI32>);

impl tonic::server::UnaryService<HealthCheckRequest> for HealthService {
    type Response = HealthCheckResponse;
    type Future = std::future::Ready<Result<tonic::Response<HealthCheckResponse>, tonic::Status>>;
    fn call(&mut self, req: tonic::Request<HealthCheckRequest>) -> Self::Future {
        let r = match req.get_ref().service.as_str() {
            "" | "app" => Ok(tonic::Response::new(HealthCheckResponse {
                status: self.0.load(Ordering::Relaxed),
            })),
            other => Err(tonic::Status::not_found(format!("unknown service {other}"))),
        };
        std::future::ready(r)
    }
}

/// A real gRPC server (tonic's server-side codec and status handling, over hyper's HTTP/2)
/// serving the standard health service; returns its address and the status to answer
/// (1 `SERVING`, 2 `NOT_SERVING`).
async fn grpc_health_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicI32>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(1));
    let s = status.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            if req.uri().path() != "/grpc.health.v1.Health/Check" {
                                return Ok::<_, std::convert::Infallible>(
                                    tonic::Status::unimplemented("").into_http(),
                                );
                            }
                            let codec = tonic_prost::ProstCodec::<
                                HealthCheckResponse,
                                HealthCheckRequest,
                            >::default();
                            Ok(tonic::server::Grpc::new(codec)
                                .unary(HealthService(s), req)
                                .await)
                        }
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, status)
}

#[tokio::test]
async fn a_grpc_health_check_follows_the_serving_status() {
    let (a, status) = grpc_health_server().await;
    let (other, _) = grpc_health_server().await;
    let spec = "  healthCheck: {grpc: {service: app}, interval: 50ms, healthyThreshold: 2, unhealthyThreshold: 2, jitter: 0}\n";
    let (p, _) = proxy_over(&[a, other], spec).await;
    let wait = |addr: SocketAddr, want: &'static str| {
        let p = &p;
        async move {
            let start = Instant::now();
            loop {
                let v = endpoint_view(p, addr).await;
                if v["check"] == want {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "never {want}: {v}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let passes =
        || p.metric("trellis_health_checks_total{backend=\"default/app:8080\",result=\"pass\"}");
    let start = Instant::now();
    while passes() < 4.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no passing gRPC checks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait(a, "healthy").await;
    status.store(2, Ordering::Relaxed);
    wait(a, "unhealthy").await;
    status.store(1, Ordering::Relaxed);
    wait(a, "healthy").await;
    // A service the server does not know: NOT_FOUND fails the check.
    let spec = "  healthCheck: {grpc: {service: nope}, interval: 50ms, unhealthyThreshold: 1, jitter: 0}\n";
    let r = trellis_api::parse_documents("test.yaml", &yaml(&[a, other], spec)).unwrap();
    p.proxy.apply(&r, "test.yaml").await.unwrap();
    wait(a, "unhealthy").await;
}
