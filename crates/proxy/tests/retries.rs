//! Retries, their budget and timeouts, against real upstreams on loopback: what the
//! backend sees (attempts) and what the client sees (errors, time).

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::*;

/// A proxy to service `app` at `endpoints`, with `policy` (a BackendPolicy spec's fields,
/// indented two spaces) and extra documents.
async fn proxy(endpoints: &[SocketAddr], policy: &str, extra: &str) -> (TestProxy, SocketAddr) {
    let yaml = format!(
        "{}{}---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: p}}
spec:
  targetRef: {{kind: Service, name: app}}
{policy}
{extra}",
        proxy_yaml("app"),
        service_yaml("app", 80, endpoints),
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    (p, addr)
}

/// An HTTPRoute on `app` with one rule going back to `app`, with these rule fields.
fn route(rule: &str) -> String {
    format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{kind: Service, name: app}}]
  rules:
    - backendRefs: [{{name: app, port: 80}}]
{rule}"
    )
}

fn hits(u: &Upstream) -> u64 {
    u.hits.load(Ordering::Relaxed)
}

fn request(method: &str, addr: SocketAddr, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(body))
        .unwrap()
}

/// Sends `total` requests from `workers` clients; returns the statuses seen.
async fn load(addr: SocketAddr, total: usize, workers: usize, method: &'static str) -> Vec<u16> {
    let mut tasks = Vec::new();
    for _ in 0..workers {
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut out = Vec::new();
            for _ in 0..total / workers {
                let got = send(&client, request(method, addr, "/", Bytes::from("x"))).await;
                out.push(got.status.as_u16());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test]
async fn the_budget_bounds_attempts_against_a_backend_that_always_fails() {
    let down = scripted_upstream("down", |_, _| Script::status(503)).await;
    let policy = "  retry: {on: [5xx], attempts: 2, backoff: {base: 1ms, max: 5ms}}";
    let (p, addr) = proxy(&[down.addr], policy, "").await;
    let statuses = load(addr, 2000, 16, "GET").await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    // At most 20% of the requests plus 10/s over the 10 s window: 2000 + 400 + 100 attempts
    // (without a budget: 3 per request, 6000).
    let attempts = hits(&down);
    assert!(attempts <= 2500, "{attempts} attempts for 2000 requests");
    assert!(attempts > 2000, "no retries at all: {attempts}");
    let retried = p.metric("trellis_retries_total{backend=\"default/app:80\",reason=\"5xx\"}");
    assert_eq!(retried as u64, attempts - 2000);
    assert!(p.metric("trellis_retry_budget_exhausted_total{backend=\"default/app:80\"}") > 0.0);
}

#[tokio::test]
async fn a_flaky_endpoint_is_hidden_from_gets_retried_on_5xx() {
    let ok1 = upstream("ok1").await;
    let ok2 = upstream("ok2").await;
    let bad = scripted_upstream("bad", |_, _| Script::status(503)).await;
    let policy = "  loadBalancer: {algorithm: RoundRobin}\n  retry: {on: [5xx]}";
    let (_p, addr) = proxy(&[ok1.addr, bad.addr, ok2.addr], policy, "").await;
    let statuses = load(addr, 300, 3, "GET").await;
    let errors = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(errors, 0, "{errors} of 300 failed");
    assert!(hits(&bad) > 0, "the flaky endpoint was never tried");
}

/// Two endpoints, one answering 503: POSTs (echoed by the good one) under `retry`.
async fn post_setup(retry: &str) -> (TestProxy, SocketAddr, Upstream) {
    let good = scripted_upstream("good", |_, _| Script::status(200).echo()).await;
    let bad = scripted_upstream("bad", |_, _| Script::status(503)).await;
    let policy = format!("  loadBalancer: {{algorithm: RoundRobin}}\n  retry: {retry}");
    let (p, addr) = proxy(&[good.addr, bad.addr], &policy, "").await;
    (p, addr, bad)
}

/// Sends `n` POSTs with `body`; returns how many failed, checking the rest echo it.
async fn posts(addr: SocketAddr, n: usize, body: &Bytes) -> usize {
    let client = h1_client();
    let mut failed = 0;
    for _ in 0..n {
        let got = send(&client, request("POST", addr, "/", body.clone())).await;
        if got.status == 200 {
            assert_eq!(got.body, *body);
        } else {
            failed += 1;
        }
    }
    failed
}

#[tokio::test]
async fn posts_are_retried_only_when_the_policy_allows_them() {
    let body = Bytes::from("a small order");
    let (_p, addr, bad) = post_setup("{on: [5xx]}").await;
    assert!(posts(addr, 20, &body).await > 0, "POST retried by default");
    assert!(hits(&bad) > 0);

    let (_p, addr, bad) = post_setup("{on: [5xx], allowNonIdempotent: true}").await;
    assert_eq!(posts(addr, 20, &body).await, 0);
    assert!(hits(&bad) > 0);
}

#[tokio::test]
async fn a_body_over_the_bound_is_streamed_and_not_retried() {
    let retry = "{on: [5xx], allowNonIdempotent: true, maxBodyBytes: 1024}";
    let (_p, addr, bad) = post_setup(retry).await;
    // (Round robin: the second request goes to the failing endpoint, which is then backed
    // off for a while, so only the first failure shows.)
    let big = Bytes::from(vec![b'b'; 4096]);
    let failed = posts(addr, 4, &big).await;
    assert!(failed > 0, "a body over maxBodyBytes was retried");
    assert_eq!(failed as u64, hits(&bad));
    let (_p, addr, bad) = post_setup(retry).await;
    assert_eq!(posts(addr, 4, &Bytes::from(vec![b'a'; 1000])).await, 0);
    assert!(hits(&bad) > 0);
}

#[tokio::test]
async fn retry_after_delays_the_retry_up_to_the_backoff_max() {
    // The first request of each pair is asked to come back later.
    let up = scripted_upstream("up", |n, p| {
        let wait = p.uri.path().trim_start_matches('/').to_string();
        if n % 2 == 0 {
            Script::status(503).header("retry-after", wait)
        } else {
            Script::status(200)
        }
    })
    .await;
    let policy = "  retry: {on: [5xx], backoff: {base: 1ms, max: 2s}}";
    let (_p, addr) = proxy(&[up.addr], policy, "").await;
    let t = Instant::now();
    let got = get(addr, "/1").await;
    let took = t.elapsed();
    assert_eq!(got.status, 200);
    assert!(took >= Duration::from_secs(1), "retried after {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Asked to wait longer than the backoff's max: not retried, the 503 goes to the client.
    let t = Instant::now();
    let got = get(addr, "/5").await;
    assert_eq!(got.status, 503);
    assert_eq!(got.headers["retry-after"], "5");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(hits(&up), 3);
}

#[tokio::test]
async fn a_try_that_times_out_is_retried_on_another_endpoint() {
    let slow = upstream_with_delay("slow", 3000).await;
    let fast = upstream("fast").await;
    let rule = "      timeouts: {request: 5s, backendRequest: 200ms}\n      retry: {attempts: 2}\n";
    let policy = "  loadBalancer: {algorithm: RoundRobin}";
    let (_p, addr) = proxy(&[slow.addr, fast.addr], policy, &route(rule)).await;
    let client = h1_client();
    for i in 0..6 {
        let t = Instant::now();
        let got = get_via(&client, addr, "/").await;
        assert_eq!(got.status, 200, "request {i}");
        assert_eq!(got.upstream(), "fast");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "request {i}: {:?}",
            t.elapsed()
        );
    }
    assert!(hits(&slow) > 0, "the slow endpoint was never tried");
}

#[tokio::test]
async fn the_request_timeout_bounds_every_retry_together() {
    let slow = upstream_with_delay("slow", 3000).await;
    let rule = "      timeouts: {request: 700ms, backendRequest: 200ms}\n      retry: {attempts: 10, backoff: 10ms}\n";
    let (_p, addr) = proxy(&[slow.addr], "", &route(rule)).await;
    let t = Instant::now();
    let got = get(addr, "/").await;
    let took = t.elapsed();
    assert_eq!(got.status, 504);
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // Tries of 200 ms fit about three times in 700 ms: more than one, far fewer than 11.
    let tries = hits(&slow);
    assert!((2..=4).contains(&tries), "{tries} tries");
}

/// A gRPC request with one message, as an h2 client sends it.
fn grpc_request(addr: SocketAddr, path: &str, timeout: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        b = b.header("grpc-timeout", t);
    }
    b.body(Full::new(Bytes::from_static(b"\0\0\0\0\x03abc")))
        .unwrap()
}

/// The gRPC status of a response: its trailers' or, trailers-only, its headers'.
async fn grpc_status(resp: http::Response<hyper::body::Incoming>) -> String {
    if let Some(s) = resp.headers().get("grpc-status") {
        return s.to_str().unwrap().to_string();
    }
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    trailers["grpc-status"].to_str().unwrap().to_string()
}

/// Sends 30 unary gRPC calls to one endpoint answering UNAVAILABLE (trailers-only) and one
/// echoing; returns how many failed.
async fn grpc_calls(retry: &str) -> usize {
    let unavailable = scripted_upstream("unavailable", |_, _| {
        Script::status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
    })
    .await;
    let echo = upstream("echo").await;
    let policy = format!("  loadBalancer: {{algorithm: RoundRobin}}\n  retry: {retry}");
    let (_p, addr) = proxy(&[unavailable.addr, echo.addr], &policy, "").await;
    let client = h2_client();
    let mut failed = 0;
    for _ in 0..30 {
        let resp = client
            .request(grpc_request(addr, "/svc/M", None))
            .await
            .unwrap();
        if grpc_status(resp).await != "0" {
            failed += 1;
        }
    }
    assert!(hits(&unavailable) > 0);
    failed
}

#[tokio::test]
async fn grpc_trailers_only_unavailable_is_retried_when_listed() {
    assert!(grpc_calls("{on: []}").await > 0);
    assert_eq!(grpc_calls("{on: [], grpcStatuses: [UNAVAILABLE]}").await, 0);
}

#[tokio::test]
async fn grpc_timeout_is_respected_and_propagated_with_the_time_left() {
    // Tells what grpc-timeout it received, in a header of a trailers-only OK.
    let up = scripted_upstream("deadline", |_, p| {
        let got = p
            .headers
            .get("grpc-timeout")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let mut s = Script::status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .header("x-got-timeout", got);
        if p.uri.path() == "/svc/Slow" {
            s.delay = Duration::from_secs(3);
        }
        s
    })
    .await;
    let rule = "      timeouts: {request: 2s}\n";
    let (_p, addr) = proxy(&[up.addr], "", &route(rule)).await;
    let client = h2_client();
    let millis = |resp: &http::Response<hyper::body::Incoming>| {
        let v = resp.headers()["x-got-timeout"]
            .to_str()
            .unwrap()
            .to_string();
        let (n, unit) = v.split_at(v.len() - 1);
        let n: f64 = n.parse().unwrap();
        n * match unit {
            "n" => 1e-6,
            "u" => 1e-3,
            "m" => 1.0,
            "S" => 1e3,
            other => panic!("unit {other}"),
        }
    };
    // The call's own deadline (1 s) is sooner than the route's (2 s).
    let resp = client
        .request(grpc_request(addr, "/svc/M", Some("1S")))
        .await
        .unwrap();
    let ms = millis(&resp);
    assert!(ms > 500.0 && ms <= 1000.0, "upstream got {ms} ms");
    // The route's is sooner than the call's.
    let resp = client
        .request(grpc_request(addr, "/svc/M", Some("1M")))
        .await
        .unwrap();
    let ms = millis(&resp);
    assert!(ms > 1500.0 && ms <= 2000.0, "upstream got {ms} ms");
    // A call over its deadline ends with DEADLINE_EXCEEDED at the deadline.
    let t = Instant::now();
    let resp = client
        .request(grpc_request(addr, "/svc/Slow", Some("300m")))
        .await
        .unwrap();
    assert_eq!(grpc_status(resp).await, "4");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

/// One unary call through a real gRPC client; its result and how long it took.
async fn unary(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
) -> (Result<tonic::Response<Msg>, tonic::Status>, Duration) {
    client.ready().await.unwrap();
    let t = Instant::now();
    let got = client
        .unary(
            tonic::Request::new(Msg { text: "hi".into() }),
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::<Msg, Msg>::default(),
        )
        .await;
    (got, t.elapsed())
}

/// GRPCRoute `timeouts` (a Trellis extension): `request` bounds the call, `backendRequest`
/// each try, a call's own `grpc-timeout` wins when sooner, and running out answers the
/// caller as gRPC (DEADLINE_EXCEEDED), which a real gRPC client reads as such.
#[tokio::test]
async fn grpc_route_timeouts_bound_calls_and_answer_deadline_exceeded() {
    let slow = upstream_with_delay("slow", 3000).await;
    let fast = upstream("fast").await;
    let yaml = format!(
        "{}{}{}---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: g}}
spec:
  parentRefs: [{{kind: Service, name: app}}]
  rules:
    - matches: [{{method: {{service: test.Slow}}}}]
      backendRefs: [{{name: slow, port: 80}}]
      timeouts: {{request: 400ms}}
    - matches: [{{method: {{service: test.Try}}}}]
      backendRefs: [{{name: slow, port: 80}}]
      timeouts: {{request: 4s, backendRequest: 300ms}}
    - backendRefs: [{{name: app, port: 80}}]
      timeouts: {{request: 400ms}}
",
        proxy_yaml("app"),
        service_yaml("app", 80, &[fast.addr]),
        service_yaml("slow", 80, &[slow.addr]),
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    // Within its route's timeout: answered.
    let (got, _) = unary(&mut client, "/test.Fast/Call").await;
    assert_eq!(got.unwrap().into_inner().text, "hi");
    // The route's request timeout, then the try's own.
    for (path, limit) in [("/test.Slow/Call", 400), ("/test.Try/Call", 300)] {
        let (got, took) = unary(&mut client, path).await;
        let status = got.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::DeadlineExceeded,
            "{path}: {status:?}"
        );
        let limit = Duration::from_millis(limit);
        assert!(
            took >= limit - Duration::from_millis(20) && took < limit + Duration::from_millis(1000),
            "{path}: {took:?}"
        );
    }
    // A call's own deadline, sooner than the route's, wins (as a raw h2 client sends it).
    let t = Instant::now();
    let resp = h2_client()
        .request(grpc_request(addr, "/test.Slow/Call", Some("100m")))
        .await
        .unwrap();
    assert_eq!(grpc_status(resp).await, "4");
    assert!(
        t.elapsed() < Duration::from_millis(350),
        "{:?}",
        t.elapsed()
    );
}

/// HTTPRoute `retry` as the Gateway API's conformance cases use it: `attempts` counts
/// retries, `codes` may list any status from 400 to 599 (here 429), and statuses not
/// listed are not retried.
#[tokio::test]
async fn route_retry_counts_attempts_as_retries_and_retries_listed_codes() {
    // `/fail/N/STATUS`: the first N requests to that path answer STATUS, then 200.
    let counts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        u32,
    >::new()));
    let up = scripted_upstream("up", move |_, p| {
        let path = p.uri.path().to_string();
        let mut parts = path.trim_start_matches('/').split('/').skip(1);
        let n: u32 = parts.next().unwrap().parse().unwrap();
        let status: u16 = parts.next().unwrap().parse().unwrap();
        let mut c = counts.lock().unwrap();
        let seen = c.entry(path).or_default();
        *seen += 1;
        Script::status(if *seen <= n { status } else { 200 })
    })
    .await;
    let rule = "      retry: {codes: [429, 500], attempts: 3, backoff: 1ms}\n";
    let (_p, addr) = proxy(&[up.addr], "", &route(rule)).await;
    let cases = [
        ("/fail/2/429", 200),
        ("/fail/3/500", 200),
        ("/fail/4/500", 500),
        ("/fail/2/503", 503),
        ("/fail/1/404", 404),
    ];
    for (path, want) in cases {
        assert_eq!(get(addr, path).await.status, want, "{path}");
    }
    // 3 + 4 + 4 + 1 + 1 tries.
    assert_eq!(hits(&up), 13);
}
