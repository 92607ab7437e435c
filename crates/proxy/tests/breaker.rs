//! Circuit breaking (limits hold exactly; excess fails fast with a reason) and fault
//! injection (the configured share, only for the rule's traffic), through a real proxy.

mod support;

use http::Request;
use http_body_util::Full;
use std::time::{Duration, Instant};
use support::*;

/// The proxy config for service `app` at `upstream`, with a circuit breaker.
fn breaker_yaml(upstream: std::net::SocketAddr, limits: &str) -> String {
    format!(
        "{}{}---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: limits}}
spec:
  targetRef: {{kind: Service, name: app}}
  circuitBreaker: {limits}
",
        proxy_yaml("app"),
        service_yaml("app", 80, &[upstream])
    )
}

/// Starts `n` concurrent GETs, each on its own connection; results arrive on the channel
/// as they complete.
fn clients(addr: std::net::SocketAddr, n: usize) -> tokio::sync::mpsc::UnboundedReceiver<Got> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..n {
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(get(addr, "/").await);
        });
    }
    rx
}

/// The next `n` results, waiting at most 10 s in all.
async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Got>, n: usize) -> Vec<Got> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut out = Vec::new();
        while out.len() < n {
            out.push(rx.recv().await.expect("client task ended"));
        }
        out
    })
    .await
    .unwrap_or_else(|_| panic!("fewer than {n} responses in 10 s"))
}

fn reason(g: &Got) -> String {
    g.headers
        .get(trellis_proxy::ERROR_HEADER)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn max_requests_admits_exactly_n_and_fails_the_rest_at_once() {
    let (n, k) = (4, 3);
    let up = held_upstream().await;
    let yaml = breaker_yaml(up.addr, "{maxRequests: 4}");
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    let mut rx = clients(addr, n + k);
    up.wait_arrived(n as u64).await;
    // While the upstream holds N, the other k are refused without waiting for it.
    for g in next(&mut rx, k).await {
        assert_eq!(g.status, 503, "{g:?}");
        assert_eq!(
            reason(&g),
            "circuit breaker: default/app:80 is at its maxRequests limit of 4"
        );
    }
    // A reload of the same config keeps the count of what is in flight.
    let resources = trellis_api::parse_documents("test.yaml", &yaml).unwrap();
    p.proxy.apply(&resources, "reload").await.unwrap();
    let again = get(addr, "/").await;
    assert_eq!(again.status, 503, "after a reload: {again:?}");
    assert_eq!(up.arrived_now(), n as u64);
    up.release();
    for g in next(&mut rx, n).await {
        assert_eq!(g.status, 200, "{g:?}");
    }
    // Room again: new requests pass.
    assert_eq!(get(addr, "/").await.status, 200);
    assert_eq!(
        p.metric(
            "trellis_circuit_breaker_rejected_total{backend=\"default/app:80\",limit=\"maxRequests\"}"
        ),
        (k + 1) as f64
    );
}

#[tokio::test]
async fn max_connections_queues_max_pending_requests_and_refuses_the_rest() {
    let (conns, pending, k) = (2, 2, 3);
    let up = held_upstream().await;
    let p = start_proxy(&breaker_yaml(
        up.addr,
        "{maxConnections: 2, maxPendingRequests: 2}",
    ))
    .await;
    let addr = p.addr("out").await;
    let mut rx = clients(addr, conns + pending + k);
    up.wait_arrived(conns as u64).await;
    for g in next(&mut rx, k).await {
        assert_eq!(g.status, 503, "{g:?}");
        assert!(
            reason(&g).contains("maxPendingRequests limit of 2"),
            "{g:?}"
        );
    }
    assert_eq!(up.arrived_now(), conns as u64);
    up.release();
    // The waiting requests go out on the connections the first ones free: never a third.
    for g in next(&mut rx, conns + pending).await {
        assert_eq!(g.status, 200, "{g:?}");
    }
    assert_eq!(up.arrived_now(), (conns + pending) as u64);
    assert_eq!(up.conns.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(
        p.metric("trellis_circuit_breaker_rejected_total{backend=\"default/app:80\",limit=\"maxPendingRequests\"}"),
        k as f64
    );
}

#[tokio::test]
async fn grpc_requests_over_the_limit_get_resource_exhausted() {
    let up = held_upstream().await;
    let p = start_proxy(&breaker_yaml(up.addr, "{maxRequests: 1}")).await;
    let addr = p.addr("out").await;
    let call = move || {
        Request::post(format!("http://{addr}/shop.Catalog/List"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(bytes::Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let first = tokio::spawn(async move { send(&h2_client(), call()).await });
    up.wait_arrived(1).await;
    let got = send(&h2_client(), call()).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["grpc-status"], "8", "{got:?}");
    up.release();
    assert_eq!(first.await.unwrap().status, 200);
}

/// An `app` service with an HTTPRoute whose first rule (header `x-fault: yes`) references
/// FaultInjection `outage` with `spec`, and whose second takes everything else.
fn fault_yaml(upstream: std::net::SocketAddr, spec: &str) -> String {
    format!(
        "{}{}---
apiVersion: trellis.dev/v1alpha1
kind: FaultInjection
metadata: {{name: outage}}
spec: {spec}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{name: app}}]
  rules:
    - matches: [{{headers: [{{name: x-fault, value: 'yes'}}]}}]
      filters: [{{type: ExtensionRef, extensionRef: {{group: trellis.dev, kind: FaultInjection, name: outage}}}}]
      backendRefs: [{{name: app, port: 80}}]
    - backendRefs: [{{name: app, port: 80}}]
",
        proxy_yaml("app"),
        service_yaml("app", 80, &[upstream])
    )
}

/// Sends `total` GETs (with `x-fault: yes` when `faulted`) from 8 workers; returns how
/// many were aborted by the fault (and checks that all others succeeded).
async fn count_aborts(addr: std::net::SocketAddr, total: usize, faulted: bool) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut aborted = 0;
            for _ in 0..total / 8 {
                let mut b = Request::get(format!("http://{addr}/"));
                if faulted {
                    b = b.header("x-fault", "yes");
                }
                let got = send(&client, b.body(Full::default()).unwrap()).await;
                match got.status.as_u16() {
                    200 => {}
                    503 if reason(&got) == "fault injected" => aborted += 1,
                    _ => panic!("{got:?}"),
                }
            }
            aborted
        }));
    }
    let mut aborted = 0;
    for t in tasks {
        aborted += t.await.unwrap();
    }
    aborted
}

#[tokio::test]
async fn aborts_hit_the_configured_share_of_the_rules_requests_only() {
    let up = upstream("app").await;
    let p = start_proxy(&fault_yaml(
        up.addr,
        "{abort: {httpStatus: 503, percentage: 30}}",
    ))
    .await;
    let addr = p.addr("out").await;
    let total = 2_000;
    let aborted = tokio::time::timeout(Duration::from_secs(60), count_aborts(addr, total, true))
        .await
        .unwrap();
    // Binomial(2000, 0.3): sd ~10 requests (0.5 points); ±4 points is 8 sd.
    let share = aborted as f64 * 100.0 / total as f64;
    assert!(
        (26.0..=34.0).contains(&share),
        "{aborted} of {total} aborted"
    );
    assert_eq!(
        p.metric("trellis_faults_injected_total{route=\"default/r/0\",kind=\"abort\"}"),
        aborted as f64
    );
    // Traffic the rule does not match is never faulted.
    let other = tokio::time::timeout(Duration::from_secs(60), count_aborts(addr, 400, false))
        .await
        .unwrap();
    assert_eq!(other, 0);
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::Relaxed),
        (total - aborted + 400) as u64
    );
}

#[tokio::test]
async fn a_delay_holds_matching_requests_for_the_configured_time() {
    let up = upstream("app").await;
    let p = start_proxy(&fault_yaml(
        up.addr,
        "{delay: {fixedDelay: 300ms, percentage: 100}}",
    ))
    .await;
    let addr = p.addr("out").await;
    let client = h1_client();
    let timed = |faulted: bool| {
        let mut b = Request::get(format!("http://{addr}/"));
        if faulted {
            b = b.header("x-fault", "yes");
        }
        let req = b.body(Full::default()).unwrap();
        let client = client.clone();
        async move {
            let t0 = Instant::now();
            let got = send(&client, req).await;
            assert_eq!(got.status, 200);
            t0.elapsed()
        }
    };
    for _ in 0..3 {
        let d = timed(true).await;
        // Loosely: at least the delay, and not wildly more on a loaded machine.
        assert!(
            d >= Duration::from_millis(300) && d < Duration::from_secs(5),
            "{d:?}"
        );
    }
    assert_eq!(
        p.metric("trellis_faults_injected_total{route=\"default/r/0\",kind=\"delay\"}"),
        3.0
    );
    // A request the rule does not match is not delayed.
    timed(false).await;
    assert_eq!(
        p.metric("trellis_faults_injected_total{route=\"default/r/0\",kind=\"delay\"}"),
        3.0
    );
}

#[tokio::test]
async fn an_aborted_grpc_call_gets_a_trailers_only_status() {
    let up = upstream("web").await;
    let yaml = format!(
        "{}{}---
apiVersion: trellis.dev/v1alpha1
kind: FaultInjection
metadata: {{name: unavailable}}
spec: {{abort: {{grpcStatus: 14}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: g}}
spec:
  parentRefs: [{{name: web}}]
  rules:
    - matches: [{{method: {{service: shop.Catalog}}}}]
      filters: [{{type: ExtensionRef, extensionRef: {{group: trellis.dev, kind: FaultInjection, name: unavailable}}}}]
      backendRefs: [{{name: web, port: 8080}}]
    - backendRefs: [{{name: web, port: 8080}}]
",
        proxy_yaml("web"),
        service_yaml("web", 8080, &[up.addr])
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    let client = h2_client();
    let call = |path: &str| {
        Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(bytes::Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let got = send(&client, call("/shop.Catalog/List")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["grpc-status"], "14", "{got:?}");
    assert_eq!(got.headers["grpc-message"], "fault injected");
    assert!(got.body.is_empty(), "trailers-only: {got:?}");
    let other = send(&client, call("/shop.Orders/Get")).await;
    assert_eq!(other.upstream(), "web");
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn opaque_tcp_connections_count_against_max_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let echo = tcp_echo().await;
    let yaml = format!(
        "{}---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 80, appProtocol: tcp}}]
  endpoints: [{{address: \"{echo}\"}}]
---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: limits}}
spec:
  targetRef: {{name: app}}
  circuitBreaker: {{maxConnections: 1}}
",
        proxy_yaml("app")
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    let echoes = |mut s: TcpStream| async move {
        s.write_all(b"ping").await.ok()?;
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .ok()?
            .ok()?;
        (&got == b"ping").then_some(s)
    };
    let first = echoes(TcpStream::connect(addr).await.unwrap())
        .await
        .expect("first connection echoes");
    // The second is closed at once: the one connection allowed is in use.
    assert!(
        echoes(TcpStream::connect(addr).await.unwrap())
            .await
            .is_none()
    );
    assert_eq!(
        p.metric("trellis_circuit_breaker_rejected_total{backend=\"default/app:80\",limit=\"maxConnections\"}"),
        1.0
    );
    // Once the first has closed (the proxy's count of open client connections says so), a
    // new one gets through.
    drop(first);
    let open = "trellis_tcp_open_connections{direction=\"outbound\",listener=\"out\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.metric(open) > 0.0 {
        assert!(Instant::now() < deadline, "connections still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        echoes(TcpStream::connect(addr).await.unwrap())
            .await
            .is_some()
    );
}

/// Polls `metric` on `p` until it equals `want` (bounded: 10 s).
async fn wait_metric(p: &TestProxy, metric: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.metric(metric) != want {
        assert!(
            Instant::now() < deadline,
            "{metric} stayed {} (want {want})",
            p.metric(metric)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_upgraded_websocket_holds_its_connection_and_request_until_it_closes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws = ws_echo().await;
    let p = start_proxy(&breaker_yaml(
        ws,
        "{maxConnections: 1, maxPendingRequests: 0, maxRequests: 10}",
    ))
    .await;
    let addr = p.addr("out").await;
    let (mut sock, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/socket"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    sock.send(Message::text("hello")).await.unwrap();
    let back = sock.next().await.unwrap().unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), "hello");

    // The socket's upstream connection is the one allowed: a request needing another fails.
    let conns =
        "trellis_circuit_breaker_current{backend=\"default/app:80\",limit=\"maxConnections\"}";
    let reqs = "trellis_circuit_breaker_current{backend=\"default/app:80\",limit=\"maxRequests\"}";
    assert_eq!(p.metric(conns), 1.0);
    assert_eq!(p.metric(reqs), 1.0);
    assert_eq!(
        p.metric(
            "trellis_circuit_breaker_limit{backend=\"default/app:80\",limit=\"maxConnections\"}"
        ),
        1.0
    );
    let g = get(addr, "/").await;
    assert_eq!(g.status, 503, "{g:?}");
    assert!(reason(&g).contains("maxConnections limit of 1"), "{g:?}");

    // Closed: both counts drop and the connection is free for others.
    sock.close(None).await.unwrap();
    drop(sock);
    wait_metric(&p, conns, 0.0).await;
    wait_metric(&p, reqs, 0.0).await;
    let g = get(addr, "/socket").await;
    assert_ne!(g.status, 503, "{g:?}");
}
