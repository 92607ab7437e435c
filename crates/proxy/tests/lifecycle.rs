//! Failures as answers, hot reload under load, rejected config, and graceful drain.

mod support;

use http::Request;
use http_body_util::Full;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use support::*;
use trellis_proxy::ERROR_HEADER;

fn reason(got: &Got) -> String {
    got.headers
        .get(ERROR_HEADER)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A loopback port with nothing listening.
async fn dead_port() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn failures_are_answers() {
    let slow = upstream("slow").await;
    let dead = dead_port().await;
    let yaml = format!(
        "{}{}{}{}---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: slow}}
spec:
  targetRef: {{name: slow}}
  timeouts: {{request: 200ms}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{name: app}}]
  rules:
    - matches: [{{path: {{value: /dead}}}}]
      backendRefs: [{{name: dead, port: 80}}]
    - matches: [{{path: {{value: /empty}}}}]
      backendRefs: [{{name: empty, port: 80}}]
    - matches: [{{path: {{value: /delay}}}}]
      backendRefs: [{{name: slow, port: 80}}]
",
        proxy_yaml("app"),
        service_yaml("app", 80, &[slow.addr]),
        service_yaml("dead", 80, &[dead]),
        service_yaml("empty", 80, &[]),
    );
    let yaml = format!("{yaml}{}", service_yaml("slow", 80, &[slow.addr]));
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;

    let got = get(addr, "/dead").await;
    assert_eq!(got.status, 502);
    assert!(
        reason(&got).contains(&format!("upstream connect failed: {dead}")),
        "{}",
        reason(&got)
    );

    let got = get(addr, "/empty").await;
    assert_eq!(got.status, 503);
    assert_eq!(reason(&got), "no available endpoint for default/empty:80");

    let got = get(addr, "/delay/2000").await;
    assert_eq!(got.status, 504);
    assert_eq!(reason(&got), "upstream did not respond within 200ms");

    // Each is counted with its reason.
    assert_eq!(p.metric("trellis_http_responses_total{direction=\"outbound\",route=\"default/r/0\",backend=\"default/dead:80\",src_service=\"\",src_namespace=\"default\",src_identity=\"\",dst_service=\"dead\",dst_namespace=\"default\",dst_identity=\"\",tls=\"false\",status=\"502\",class=\"5xx\",grpc_status=\"\",error=\"connect\"}"), 1.0);
    assert_eq!(p.metric("trellis_http_responses_total{direction=\"outbound\",route=\"default/r/2\",backend=\"default/slow:80\",src_service=\"\",src_namespace=\"default\",src_identity=\"\",dst_service=\"slow\",dst_namespace=\"default\",dst_identity=\"\",tls=\"false\",status=\"504\",class=\"5xx\",grpc_status=\"\",error=\"timeout\"}"), 1.0);
}

#[tokio::test]
async fn connect_failure_tries_another_endpoint() {
    let up = upstream("live").await;
    let dead = dead_port().await;
    let yaml = format!(
        "{}{}",
        proxy_yaml("app"),
        service_yaml("app", 80, &[dead, up.addr])
    );
    let policy = "---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {name: rr}
spec:
  targetRef: {name: app}
  loadBalancer: {algorithm: RoundRobin}
";
    let p = start_proxy(&format!("{yaml}{policy}")).await;
    let addr = p.addr("out").await;
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
}

#[tokio::test]
async fn hot_reload_under_load_drops_nothing() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let dir = std::env::temp_dir().join(format!("trellis-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.yaml");
    let config = |weight_v2: u32, extra_listener: bool| {
        let mut y = proxy_yaml("app");
        if extra_listener {
            y.push_str("    - {name: extra, address: 127.0.0.1:0, service: {name: v2}}\n");
        }
        format!(
            "{y}{}{}{}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: split}}
spec:
  parentRefs: [{{name: app}}]
  rules:
    - backendRefs: [{{name: v1, port: 80, weight: {}}}, {{name: v2, port: 80, weight: {weight_v2}}}]
",
            service_yaml("app", 80, &[v1.addr]),
            service_yaml("v1", 80, &[v1.addr]),
            service_yaml("v2", 80, &[v2.addr]),
            100 - weight_v2
        )
    };
    std::fs::write(&path, config(0, false)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let resources = trellis_api::parse_documents(&path.display().to_string(), &text).unwrap();
    let proxy = trellis_proxy::Proxy::start(&resources, "proxy.yaml")
        .await
        .unwrap();
    tokio::spawn(trellis_proxy::watch_file(
        proxy.clone(),
        path.clone(),
        text.into_bytes(),
        Duration::from_millis(50),
    ));
    let addr = proxy.listener_addr("out").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get(format!("http://{addr}/"))
                    .body(Full::default())
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // Shift traffic in steps, adding and removing a listener along the way.
    for (i, w) in [25, 50, 75, 100].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        std::fs::write(&path, config(w, i % 2 == 0)).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before_v2 = v2.hits.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v1_before = v1.hits.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 200,
        "too little load: {}",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(proxy.snapshot().version, 5);
    // All traffic now on v2.
    assert!(v2.hits.load(Ordering::Relaxed) > before_v2);
    assert_eq!(
        v1.hits.load(Ordering::Relaxed),
        v1_before,
        "v1 still receiving after weight 0"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn invalid_config_is_rejected_and_old_keeps_serving() {
    let up = upstream("a").await;
    let dir = std::env::temp_dir().join(format!("trellis-invalid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.yaml");
    let good = format!(
        "{}{}",
        proxy_yaml("app"),
        service_yaml("app", 80, &[up.addr])
    );
    std::fs::write(&path, &good).unwrap();
    let resources = trellis_api::parse_documents("proxy.yaml", &good).unwrap();
    let proxy = trellis_proxy::Proxy::start(&resources, "proxy.yaml")
        .await
        .unwrap();
    tokio::spawn(trellis_proxy::watch_file(
        proxy.clone(),
        path.clone(),
        good.clone().into_bytes(),
        Duration::from_millis(50),
    ));
    let addr = proxy.listener_addr("out").await.unwrap();

    // A reference to a missing service: rejected whole, with file, line and field.
    let bad = good.replace("service: {name: app}", "service: {name: nope}");
    let err = proxy
        .apply(
            &trellis_api::parse_documents("proxy.yaml", &bad).unwrap(),
            "proxy.yaml",
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "proxy.yaml:9: spec.outbound[0].service.name: no Service default/nope"
    );
    // A syntax error and a type error through the file watcher.
    for broken in [
        good.replace("ports: [{port: 80}]", "ports: [{port: 80}"),
        good.replace("port: 80", "port: eighty"),
    ] {
        let rejected = |p: &trellis_proxy::Proxy| {
            let t = p.metrics_text();
            t.lines()
                .find(|l| l.starts_with("trellis_config_reloads_total{result=\"error\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let before = rejected(&proxy);
        std::fs::write(&path, broken).unwrap();
        // Wait for the watcher to see and reject it (bounded, for slow machines).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while rejected(&proxy) == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the watcher never rejected the file"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(get(addr, "/").await.upstream(), "a");
    }
    assert_eq!(proxy.snapshot().version, 1);
    let text = proxy.metrics_text();
    assert!(
        text.contains("trellis_config_reloads_total{result=\"error\"} 3"),
        "{text}"
    );
    // A port conflict is also rejected before anything changes.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = good.replace(
        "{name: http-proxy, address: 127.0.0.1:0",
        &format!(
            "{{name: http-proxy2, address: {}",
            blocker.local_addr().unwrap()
        ),
    );
    let err = proxy
        .apply(
            &trellis_api::parse_documents("proxy.yaml", &taken).unwrap(),
            "proxy.yaml",
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot bind"), "{err}");
    assert!(proxy.listener_addr("http-proxy").await.is_some());
    assert_eq!(get(addr, "/").await.status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn graceful_drain_completes_in_flight_requests() {
    let up = upstream("a").await;
    let p = app_proxy(&[up.addr]).await;
    let addr = p.addr("out").await;
    let admin = p.proxy.admin_addr();
    assert_eq!(get(admin, "/ready").await.status, 200);
    // Two requests in flight, on HTTP/1.1 and HTTP/2.
    let h1 = tokio::spawn(async move { get(addr, "/delay/500").await });
    let h2 = tokio::spawn(async move {
        send(
            &h2_client(),
            Request::get(format!("http://{addr}/delay/500"))
                .body(Full::default())
                .unwrap(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let proxy = p.proxy.clone();
    let drain = tokio::spawn(async move { proxy.drain(Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Draining: new connections are refused, readiness fails.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting while draining"
    );
    assert_eq!(get(admin, "/ready").await.status, 503);
    assert_eq!(h1.await.unwrap().status, 200);
    assert_eq!(h2.await.unwrap().status, 200);
    assert!(
        drain.await.unwrap(),
        "drain did not finish before its deadline"
    );
}

#[tokio::test]
async fn admin_endpoints() {
    let up = upstream("a").await;
    let p = app_proxy(&[up.addr]).await;
    let addr = p.addr("out").await;
    get(addr, "/").await;
    let admin = p.proxy.admin_addr();
    assert_eq!(get(admin, "/live").await.status, 200);
    let config = get(admin, "/config").await.json();
    assert_eq!(config["version"], 1);
    assert_eq!(config["resources"][1]["kind"], "Service");
    let metrics = String::from_utf8(get(admin, "/metrics").await.body.to_vec()).unwrap();
    for needle in [
        "trellis_http_requests_total{direction=\"outbound\",route=\"default\",backend=\"default/app:80\",src_service=\"\",src_namespace=\"default\",src_identity=\"\",dst_service=\"app\",dst_namespace=\"default\",dst_identity=\"\",tls=\"false\"} 1",
        "trellis_http_responses_total{direction=\"outbound\",route=\"default\",backend=\"default/app:80\",src_service=\"\",src_namespace=\"default\",src_identity=\"\",dst_service=\"app\",dst_namespace=\"default\",dst_identity=\"\",tls=\"false\",status=\"200\",class=\"2xx\",grpc_status=\"\",error=\"\"} 1",
        "trellis_http_response_latency_seconds_bucket{le=",
        "trellis_tcp_connections_total{direction=\"outbound\",listener=\"out\"} 1",
        "trellis_tcp_read_bytes_total",
        "trellis_config_version 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}

/// Timeouts run on tokio's clock: with time paused, a 30-second upstream and a 10-second
/// timeout resolve instantly and exactly.
#[tokio::test(start_paused = true)]
async fn request_timeout_on_paused_clock() {
    let up = upstream("slow").await;
    let yaml = format!(
        "{}{}",
        proxy_yaml("app"),
        service_yaml("app", 80, &[up.addr])
    )
    .replace("requestTimeout: 5s", "requestTimeout: 10s");
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    let started = tokio::time::Instant::now();
    let got = get(addr, "/delay/30000").await;
    assert_eq!(got.status, 504);
    assert_eq!(reason(&got), "upstream did not respond within 10s");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
}

/// An upstream that closes every connection right after answering, without saying so: the
/// proxy's pooled connection goes stale between requests, and no request may fail for it.
/// (This exercises the pool's closed-connection checks; the narrower race where a connection
/// closes between checkout and write is covered by retrying `NotSent` requests, which this
/// test cannot trigger deterministically.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pooled_connections_are_not_errors() {
    let (up, _) = one_answer_upstream(false).await;
    let p = app_proxy(&[up]).await;
    let addr = p.addr("out").await;
    let client = h1_client();
    for i in 0..200 {
        let got = get_via(&client, addr, &format!("/{i}")).await;
        assert_eq!(got.status, 200, "request {i}: {}", reason(&got));
    }
}

/// Upstream connections are pooled: sequential requests of every body shape share one
/// connection (a body with a known length, a streamed one, an empty one, a HEAD).
#[tokio::test]
async fn upstream_connections_are_reused() {
    let up = upstream("a").await;
    let p = app_proxy(&[up.addr]).await;
    let addr = p.addr("out").await;
    let client = h1_client();
    for i in 0..30 {
        let req = match i % 3 {
            0 => Request::get(format!("http://{addr}/json"))
                .body(Full::default())
                .unwrap(),
            1 => Request::post(format!("http://{addr}/echo"))
                .body(Full::new(bytes::Bytes::from_static(b"x")))
                .unwrap(),
            _ => Request::head(format!("http://{addr}/json"))
                .body(Full::default())
                .unwrap(),
        };
        assert_eq!(send(&client, req).await.status, 200);
        // Let the connection task see the end of the exchange before the next checkout.
        tokio::task::yield_now().await;
    }
    assert_eq!(up.hits.load(Ordering::Relaxed), 30);
    // One connection per client: the lean one carries the GETs and HEADs (no body), hyper's
    // the POSTs.
    assert_eq!(
        up.conns.load(Ordering::Relaxed),
        2,
        "upstream connections were not reused"
    );
}

/// The keep-alive race made deterministic: the upstream answers only the first request on
/// each connection and closes on the next one after reading it. A bodiless GET is replayed on
/// a new connection (RFC 9110 §9.2.2); a POST is not, and gets a 502 saying why.
#[tokio::test]
async fn idempotent_requests_replay_when_a_reused_connection_closes() {
    let (up, conns) = one_answer_upstream(true).await;
    let p = app_proxy(&[up]).await;
    let addr = p.addr("out").await;
    let client = h1_client();
    for i in 0..10 {
        let got = get_via(&client, addr, &format!("/{i}")).await;
        assert_eq!(got.status, 200, "GET {i}: {}", reason(&got));
        tokio::task::yield_now().await;
    }
    // Every reuse failed and was replayed on a fresh connection.
    assert!(conns.load(Ordering::Relaxed) >= 10);
    // A POST on a pooled connection is not replayed, whichever client carries it: hyper's
    // (a request with a body) or the lean one (without). The first POST with a body primes
    // hyper's pool; the GET primes the lean client's.
    let post = |body: &'static [u8]| {
        Request::post(format!("http://{addr}/"))
            .body(Full::new(bytes::Bytes::from_static(body)))
            .unwrap()
    };
    assert_eq!(send(&client, post(b"data")).await.status, 200);
    get_via(&client, addr, "/").await;
    tokio::task::yield_now().await;
    for body in [&b"data"[..], b""] {
        let got = send(&client, post(body)).await;
        assert_eq!(got.status, 502, "POST with {} body bytes", body.len());
        assert!(
            reason(&got).contains("closed the connection before responding"),
            "{}",
            reason(&got)
        );
    }
}

/// An upstream that says `Keep-Alive: timeout=3` and, like a server whose idle timer fires
/// as a request arrives, closes unanswered a connection whose next request comes two seconds
/// or more after its last answer. Counts connections.
async fn keep_alive_upstream() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    use tokio::io::AsyncWriteExt;
    support::counting_upstream(|mut s| async move {
        let mut answered: Option<tokio::time::Instant> = None;
        loop {
            if !read_request(&mut s).await {
                return;
            }
            if answered.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)) {
                return;
            }
            let answer = b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=3\r\ncontent-length: 2\r\n\r\nok";
            if s.write_all(answer).await.is_err() {
                return;
            }
            answered = Some(tokio::time::Instant::now());
        }
    })
    .await
}

/// Reads one request with a `content-length` body (or none) from a raw connection; false
/// when the connection closed first.
async fn read_request(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let len: usize = String::from_utf8_lossy(&buf[..head_end])
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// A pooled connection is not reused past what its upstream said it keeps idle connections
/// (`Keep-Alive: timeout=3`, so two seconds of idle here): a POST, which is never replayed,
/// would otherwise be sent as the upstream closes the connection and get a 502. Both pools:
/// the lean client's (no body) and hyper's (a body).
#[tokio::test]
async fn a_pooled_connection_is_not_reused_past_the_upstreams_keep_alive_timeout() {
    for body in ["", "hello"] {
        let (up, conns) = keep_alive_upstream().await;
        let p = app_proxy(&[up]).await;
        let addr = p.addr("out").await;
        let client = h1_client();
        let post = || {
            Request::post(format!("http://{addr}/"))
                .body(Full::new(bytes::Bytes::from(body)))
                .unwrap()
        };
        assert_eq!(send(&client, post()).await.status, 200, "body {body:?}");
        // Within the two seconds: the pooled connection carries it (once the proxy has
        // parked it, as in `upstream_connections_are_reused`).
        tokio::task::yield_now().await;
        assert_eq!(send(&client, post()).await.status, 200, "body {body:?}");
        assert_eq!(
            conns.load(Ordering::Relaxed),
            1,
            "not pooled, body {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(2300)).await;
        let got = send(&client, post()).await;
        assert_eq!(got.status, 200, "body {body:?}: {}", reason(&got));
        assert_eq!(conns.load(Ordering::Relaxed), 2, "body {body:?}");
    }
}

/// Reads one HTTP/1.1 response with a `content-length` body from a raw connection; returns
/// its head.
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside a response body");
        buf.extend_from_slice(&chunk[..n]);
    }
    head
}

/// Reads from `s` into `buf` until it contains `needle`.
async fn read_until(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
    use tokio::io::AsyncReadExt;
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed; got {}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How long until the proxy closes `s` (EOF or reset), waiting at most `limit`.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut chunk = [0u8; 1024];
    match tokio::time::timeout(limit, s.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(start.elapsed()),
        Ok(Ok(n)) => panic!("unexpected {n} bytes from the proxy"),
        Err(_) => None,
    }
}

#[tokio::test]
async fn idle_client_connections_are_closed_and_busy_ones_are_not() {
    use tokio::io::AsyncWriteExt;
    let up = upstream("app").await;
    let yaml = format!(
        "{}{}",
        proxy_yaml("app").replace(
            "  requestTimeout: 5s\n",
            "  requestTimeout: 5s\n  clientIdleTimeout: 400ms\n"
        ),
        service_yaml("app", 80, &[up.addr])
    );
    let proxy = start_proxy(&yaml).await;
    let addr = proxy.addr("out").await;

    // A request the upstream answers after 1.2 s, three idle timeouts: the connection is busy,
    // not idle, so the answer arrives, and the connection serves another request after it.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /delay/1200 HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    s.write_all(b"GET /again HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // A streaming exchange that pauses for three idle timeouts is not idle either: the
    // response is still open (server-sent events, long polls).
    s.write_all(
        b"POST /echo HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    read_until(&mut s, &mut got, b"hello").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.write_all(b"5\r\nworld\r\n0\r\n\r\n").await.unwrap();
    read_until(&mut s, &mut got, b"\r\n0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("world"),
        "{text}"
    );
    // Then idle keep-alive: closed between one and one and a half idle timeouts later.
    let closed = closed_within(&mut s, Duration::from_secs(5)).await;
    let closed = closed.expect("an idle keep-alive connection is closed");
    assert!(
        closed >= Duration::from_millis(350),
        "closed after {closed:?}"
    );

    // A request head trickled a byte at a time never completes: reading bytes is not
    // progress, so the connection is closed all the same.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: app\r\nx-slow: ")
        .await
        .unwrap();
    let trickle = async {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow.write_all(b"a").await.is_err() {
                return;
            }
        }
    };
    let start = std::time::Instant::now();
    trickle.await;
    assert!(
        start.elapsed() < Duration::from_millis(3900),
        "a trickled request head kept its connection open for {:?}",
        start.elapsed()
    );
    let _ = closed_within(&mut slow, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_draining_proxy_answers_every_connection_it_accepted() {
    use tokio::io::AsyncReadExt;
    let up = upstream("a").await;
    let p = app_proxy(&[up.addr]).await;
    let addr = p.addr("out").await;
    // Connections the kernel completed, each with a request sent, made without yielding to
    // the proxy (blocking calls on this runtime's only thread): when the drain starts they
    // are all still in the listen queue, accepted by the kernel but not yet by the proxy.
    let mut conns = Vec::new();
    for _ in 0..20 {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /delay/100 HTTP/1.1\r\nhost: app\r\n\r\n")
            .unwrap();
        s.set_nonblocking(true).unwrap();
        conns.push(tokio::net::TcpStream::from_std(s).unwrap());
    }
    let proxy = p.proxy.clone();
    let drain = tokio::spawn(async move { proxy.drain(Duration::from_secs(10)).await });
    for (i, mut s) in conns.into_iter().enumerate() {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "connection {i} got {text:?}"
        );
        // Served once, then closed: the proxy is stopping.
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
    }
    assert!(drain.await.unwrap(), "drain finished before its deadline");
}
