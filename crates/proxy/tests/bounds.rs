//! No client can take what others need: idle timeouts, connection caps, stream timeouts, the
//! upstream HTTP/2 pool, metric series of removed config, and HTTP/2 floods. Real servers and
//! clients on loopback; timeouts are configured short.

mod support;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy with `settings` (indented `Proxy` spec lines) and one outbound listener `out` to
/// service `app` at `upstream`, whose port declares `app_protocol` when given.
async fn proxy_with(
    settings: &str,
    listener_protocol: Option<&str>,
    upstream: SocketAddr,
    app_protocol: Option<&str>,
) -> TestProxy {
    let lp = listener_protocol
        .map(|p| format!(", protocol: {p}"))
        .unwrap_or_default();
    let ap = app_protocol
        .map(|p| format!(", appProtocol: {p}"))
        .unwrap_or_default();
    start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: test}}
spec:
  admin: {{address: 127.0.0.1:0}}
  detectTimeout: 100ms
  requestTimeout: 3s
{settings}  outbound:
    - {{name: out, address: 127.0.0.1:0, service: {{name: app}}{lp}}}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 80{ap}}}]
  endpoints: [{{address: \"{upstream}\"}}]
"
    ))
    .await
}

/// Reads until the peer closes (true) or `within` passes (false); data is discarded.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The 99th percentile of `samples`.
fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

#[tokio::test]
async fn quiet_opaque_tcp_is_closed_and_silent_connections_sooner() {
    let echo = tcp_echo().await;
    let settings = "  firstByteTimeout: 400ms\n  tcpIdleTimeout: 1200ms\n";
    // Declared TCP, and auto-detected (a silent connection falls back to TCP).
    for protocol in [Some("tcp"), None] {
        let p = proxy_with(settings, protocol, echo, None).await;
        let addr = p.addr("out").await;

        // Never sends a byte: closed after the first-byte deadline.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let t = Instant::now();
        assert!(
            closed_within(&mut silent, Duration::from_secs(5)).await,
            "{protocol:?}: a silent connection stays open"
        );
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_millis(1100),
            "{protocol:?}: silent connection closed after {took:?}"
        );

        // Talks, then goes quiet: closed after the (longer) idle time, not the first-byte one.
        let mut quiet = TcpStream::connect(addr).await.unwrap();
        quiet.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        quiet.read_exact(&mut got).await.unwrap();
        let t = Instant::now();
        assert!(closed_within(&mut quiet, Duration::from_secs(5)).await);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(1100) && took < Duration::from_millis(2500),
            "{protocol:?}: quiet connection closed after {took:?}"
        );

        // Keeps talking for longer than both: stays open.
        let mut busy = TcpStream::connect(addr).await.unwrap();
        for _ in 0..12 {
            busy.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            busy.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(p.metric("trellis_idle_closed_total{kind=\"tcp\"}") >= 2.0);
    }
}

#[tokio::test]
async fn quiet_websocket_is_closed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws = ws_echo().await;
    let p = proxy_with("  tcpIdleTimeout: 600ms\n", None, ws, None).await;
    let addr = p.addr("out").await;
    let (mut sock, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/socket"))
        .await
        .unwrap();
    // Messages every 200ms keep it open past the idle time.
    for i in 0..6 {
        sock.send(Message::text(format!("m{i}"))).await.unwrap();
        assert!(sock.next().await.unwrap().unwrap().is_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), sock.next()).await;
    assert!(
        matches!(end, Ok(None | Some(Err(_)))),
        "a quiet upgraded stream stays open: {end:?}"
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(1500),
        "closed after {took:?}"
    );
    assert_eq!(p.metric("trellis_idle_closed_total{kind=\"upgrade\"}"), 1.0);
}

#[tokio::test]
async fn http2_client_connection_without_streams_is_closed() {
    let up = upstream("a").await;
    let p = proxy_with("  clientIdleTimeout: 400ms\n", None, up.addr, None).await;
    let addr = p.addr("out").await;
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = tx
        .send_request(
            Request::get(format!("http://{addr}/"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    let t = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "an unused HTTP/2 connection stays open");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_millis(2000),
        "closed after {took:?}"
    );
    assert_eq!(p.metric("trellis_idle_closed_total{kind=\"http2\"}"), 1.0);
}

#[tokio::test]
async fn at_the_cap_silent_connections_are_shed_and_busy_ones_kept() {
    let echo = tcp_echo().await;
    let settings = "  maxConnectionsPerListener: 3\n  firstByteTimeout: 30s\n";
    let p = proxy_with(settings, Some("tcp"), echo, None).await;
    let addr = p.addr("out").await;
    assert_eq!(
        p.metric("trellis_connection_limit{direction=\"outbound\",listener=\"out\"}"),
        3.0
    );
    let echo_once = |mut s: TcpStream| async move {
        s.write_all(b"ping").await.ok()?;
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .ok()?
            .ok()?;
        Some(s)
    };
    // Three silent connections fill the listener.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A client with something to say still gets in: the oldest silent one makes room.
    let good = echo_once(TcpStream::connect(addr).await.unwrap())
        .await
        .expect("the well-behaved client is served at the cap");
    assert!(closed_within(&mut silent[0], Duration::from_secs(2)).await);
    assert_eq!(p.metric("trellis_connections_shed_total"), 1.0);
    // The others speak up: now every connection works, so a newcomer is refused.
    let mut busy = vec![good];
    for s in silent.drain(1..) {
        busy.push(echo_once(s).await.expect("a connection that spoke is kept"));
    }
    let mut late = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut late, Duration::from_secs(2)).await);
    assert_eq!(
        p.metric("trellis_connections_refused_total{listener=\"out\",limit=\"listener\"}"),
        1.0
    );
    // Busy connections were not touched.
    for s in busy {
        echo_once(s).await.expect("busy connections keep working");
    }
}

/// A reload that removes 2,000 services removes their series: `/metrics` stays small.
#[tokio::test]
async fn series_of_removed_services_are_dropped() {
    let up = upstream("a").await;
    let proxy = "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: test}
spec:
  admin: {address: 127.0.0.1:0}
  outbound:
    - {name: http-proxy, address: 127.0.0.1:0, httpProxy: true}
    - {name: extra, address: 127.0.0.1:0, service: {name: keep}}
";
    let mut many = String::from(proxy);
    many.push_str(&service_yaml("keep", 80, &[up.addr]));
    for i in 0..2000 {
        // Half with an endpoint, half without (those answer 503: more series).
        let eps: Vec<SocketAddr> = if i % 2 == 0 { vec![up.addr] } else { vec![] };
        many.push_str(&service_yaml(&format!("svc-{i}"), 80, &eps));
    }
    let resources = trellis_api::parse_documents("many.yaml", &many).unwrap();
    let p = TestProxy {
        proxy: trellis_proxy::Proxy::start(&resources, "many.yaml")
            .await
            .unwrap(),
    };
    let addr = p.addr("http-proxy").await;
    let client = h1_client();
    for i in 0..200 {
        let got = send(
            &client,
            Request::get(format!("http://{addr}/"))
                .header("host", format!("svc-{i}"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        let want = if i % 2 == 0 { 200 } else { 503 };
        assert_eq!(got.status.as_u16(), want, "svc-{i}");
    }
    let before = p.proxy.metrics_text();
    assert!(
        before.contains("svc-1999"),
        "series exist before the reload"
    );
    let big = before.len();

    // The reload keeps one service and drops the listener `extra`.
    let mut few = proxy.replace(
        "    - {name: extra, address: 127.0.0.1:0, service: {name: keep}}\n",
        "",
    );
    few.push_str(&service_yaml("keep", 80, &[up.addr]));
    let resources = trellis_api::parse_documents("few.yaml", &few).unwrap();
    p.proxy.apply(&resources, "few.yaml").await.unwrap();
    let after = p.proxy.metrics_text();
    let stale: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("svc-") || l.contains("listener=\"extra\""))
        .take(5)
        .collect();
    assert!(
        stale.is_empty(),
        "series of removed config remain: {stale:?}"
    );
    assert!(
        after.len() < 20_000,
        "/metrics is {} bytes after the reload ({big} before)",
        after.len()
    );
    // What remains still counts.
    let got = send(
        &client,
        Request::get(format!("http://{addr}/"))
            .header("host", "keep")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(p.metric("trellis_http_requests_total{direction=\"outbound\",route=\"default\",backend=\"default/keep:80\",src_service=\"\",src_namespace=\"default\",src_identity=\"\",dst_service=\"keep\",dst_namespace=\"default\",dst_identity=\"\",tls=\"false\"}") >= 1.0);
}

/// An HTTP/2 upstream that allows `max_streams` concurrent streams. `/stall` answers a body
/// that never ends (counted in `stalled` while the stream lives); anything else answers "ok".
async fn h2_backend(max_streams: u32) -> (SocketAddr, Arc<AtomicUsize>) {
    stalling_backend(Some(max_streams)).await
}

/// A backend whose `/stall` streams an endless body, counting the responses alive; HTTP/2
/// with `max_streams`, else HTTP/1.1.
async fn stalling_backend(h2_max_streams: Option<u32>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = Arc::new(AtomicUsize::new(0));
    let s = stalled.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        if req.uri().path() != "/stall" {
                            // The whole request body first (uploads).
                            let _ = req.into_body().collect().await;
                            let body = Full::new(Bytes::from_static(b"ok"))
                                .map_err(|n| match n {})
                                .boxed();
                            return Ok::<_, Infallible>(Response::new(body));
                        }
                        // Counted until the stream is dropped (finished or reset).
                        struct Live(Arc<AtomicUsize>);
                        impl Drop for Live {
                            fn drop(&mut self) {
                                self.0.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        s.fetch_add(1, Ordering::SeqCst);
                        let live = Live(s);
                        let chunks = futures_util::stream::unfold(live, |live| async move {
                            let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
                            Some((Ok::<_, hyper::Error>(Frame::data(chunk)), live))
                        });
                        Ok(Response::new(StreamBody::new(chunks).boxed()))
                    }
                });
                let io = TokioIo::new(stream);
                let _ = match h2_max_streams {
                    Some(max) => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .max_concurrent_streams(max)
                            .serve_connection(io, svc)
                            .await
                    }
                    None => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    }
                };
            });
        }
    });
    (addr, stalled)
}

/// A client that opens `n` streams to `/stall` and never reads a byte of their bodies (its
/// flow-control window is 0). Returns the responses, to be held.
async fn stalling_client(addr: SocketAddr, n: usize) -> Vec<Response<Incoming>> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut pending = Vec::new();
    for _ in 0..n {
        let mut tx = tx.clone();
        let req = Request::get(format!("http://{addr}/stall"))
            .body(Full::<Bytes>::default())
            .unwrap();
        pending.push(tokio::spawn(async move { tx.send_request(req).await }));
    }
    let mut held = Vec::new();
    for p in pending {
        held.push(p.await.unwrap().expect("stalled stream opened"));
    }
    held
}

async fn wait_for(what: &str, within: Duration, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Flood: a window-0 client holds 100 streams to a backend that allows 100; a second client's
/// requests to that backend still succeed promptly.
#[tokio::test]
async fn stalled_streams_of_one_client_do_not_starve_another() {
    let (backend, stalled) = h2_backend(100).await;
    let p = proxy_with("", None, backend, Some("http2")).await;
    let addr = p.addr("out").await;
    // The well-behaved client comes first, so that an upstream connection exists that the
    // stalling client's streams would share.
    let client = h2_client();
    assert_eq!(get_via(&client, addr, "/ok").await.status, StatusCode::OK);
    let _held = stalling_client(addr, 100).await;
    wait_for(
        "100 stalled upstream streams",
        Duration::from_secs(10),
        || stalled.load(Ordering::SeqCst) == 100,
    )
    .await;
    let mut took = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let got = get_via(&client, addr, "/ok").await;
        took.push(t.elapsed());
        assert_eq!(got.status, StatusCode::OK, "{:?}", got.body);
    }
    let p99 = p99(&mut took);
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    assert_eq!(
        stalled.load(Ordering::SeqCst),
        100,
        "the stalled client is still served"
    );
}

/// Streams that make no progress are reset after the stream idle timeout, releasing their
/// upstream streams.
#[tokio::test]
async fn stalled_streams_are_reset_after_the_stream_idle_timeout() {
    let (backend, stalled) = h2_backend(100).await;
    let p = proxy_with("  streamIdleTimeout: 500ms\n", None, backend, Some("http2")).await;
    let addr = p.addr("out").await;
    let held = stalling_client(addr, 20).await;
    wait_for(
        "20 stalled upstream streams",
        Duration::from_secs(10),
        || stalled.load(Ordering::SeqCst) == 20,
    )
    .await;
    let t = Instant::now();
    wait_for(
        "the upstream streams to be reset",
        Duration::from_secs(5),
        || stalled.load(Ordering::SeqCst) == 0,
    )
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(p.metric("trellis_idle_closed_total{kind=\"stream\"}"), 20.0);
    drop(held);
    // A request that keeps moving is not cut: a body read steadily for 1.5s.
    let client = h2_client();
    let resp = client
        .request(
            Request::get(format!("http://{addr}/stall"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        body.frame().await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/1.1 client that never reads its response holds its upstream connection only
/// until the stream idle timeout: then its connection is dropped, and with it the upstream
/// one. A response read steadily is not cut.
#[tokio::test]
async fn an_http1_client_that_never_reads_is_dropped_after_the_stream_idle_timeout() {
    let (backend, stalled) = stalling_backend(None).await;
    let p = proxy_with("  streamIdleTimeout: 500ms\n", None, backend, Some("http")).await;
    let addr = p.addr("out").await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /stall HTTP/1.1\r\nhost: app\r\n\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    wait_for(
        "5 stalled upstream responses",
        Duration::from_secs(10),
        || stalled.load(Ordering::SeqCst) == 5,
    )
    .await;
    let t = Instant::now();
    wait_for(
        "the upstream responses to be dropped",
        Duration::from_secs(10),
        || stalled.load(Ordering::SeqCst) == 0,
    )
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(p.metric("trellis_idle_closed_total{kind=\"stream\"}"), 5.0);
    for s in &mut held {
        assert!(closed_within(s, Duration::from_secs(5)).await);
    }
    // An upload sent slowly but steadily for 1.5s is not cut.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 30\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b"x").await.unwrap();
    }
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
        .await
        .expect("an answer to the upload")
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    // A response read steadily for 1.5s is not cut.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the steadily read response was cut");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Raw HTTP/2 frames for the flood tests.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `GET http://a/`: indexed :method GET, :scheme http, :path /, and :authority
/// `a` as a literal without indexing.
fn get_block() -> Vec<u8> {
    vec![0x82, 0x86, 0x84, 0x01, 0x01, b'a']
}

/// A raw HTTP/2 connection that has sent the preface and empty SETTINGS.
async fn raw_h2(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    s
}

/// While `attack` runs, a second client's requests keep succeeding with a normal latency;
/// afterwards the proxy still serves.
async fn good_client_unaffected<F: std::future::Future<Output = ()>>(addr: SocketAddr, attack: F) {
    let good = async {
        let client = h1_client();
        let mut took = Vec::new();
        for _ in 0..100 {
            let t = Instant::now();
            let got = get_via(&client, addr, "/").await;
            took.push(t.elapsed());
            assert_eq!(got.status, StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        p99(&mut took)
    };
    let (p99, ()) = tokio::join!(good, attack);
    assert!(
        p99 < Duration::from_millis(500),
        "good client's p99 {p99:?}"
    );
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
}

/// Rapid reset (CVE-2023-44487): streams opened and cancelled at once, thousands of times.
#[tokio::test]
async fn rapid_reset_flood_is_cut_off() {
    let up = upstream("a").await;
    let p = proxy_with("", None, up.addr, None).await;
    let addr = p.addr("out").await;
    let attack = async {
        let mut s = raw_h2(addr).await;
        let mut burst = Vec::new();
        let mut sent = 0u32;
        let mut id = 1u32;
        let closed = loop {
            for _ in 0..100 {
                burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &get_block()));
                burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
                id += 2;
            }
            if s.write_all(&burst).await.is_err() {
                break true;
            }
            burst.clear();
            sent += 100;
            if sent >= 20_000 {
                break false;
            }
        };
        // Either the writes failed (connection closed) or it is closed now.
        assert!(
            closed || closed_within(&mut s, Duration::from_secs(5)).await,
            "the proxy kept accepting {sent} reset streams"
        );
    };
    good_client_unaffected(addr, attack).await;
    // Only a fraction of the cancelled streams reached the upstream.
    let hits = up.hits.load(Ordering::Relaxed);
    assert!(hits < 5_000, "{hits} requests reached the upstream");
}

/// CONTINUATION flood: a header block that never ends.
#[tokio::test]
async fn continuation_flood_is_cut_off() {
    let up = upstream("a").await;
    let p = proxy_with("", None, up.addr, None).await;
    let addr = p.addr("out").await;
    let attack = async {
        let mut s = raw_h2(addr).await;
        s.write_all(&frame(HEADERS, END_STREAM, 1, &get_block()))
            .await
            .unwrap();
        // Literal headers `x-N: 4 KiB`, without indexing, one per CONTINUATION frame.
        let mut sent = 0usize;
        let mut closed = false;
        for i in 0..4096u32 {
            let name = format!("x-{i}");
            let mut block = vec![0x00, name.len() as u8];
            block.extend_from_slice(name.as_bytes());
            block.extend_from_slice(&[0x7f, 0x81, 0x1f]); // length 4096 (127 + 3969)
            block.extend(std::iter::repeat_n(b'v', 4096));
            if s.write_all(&frame(CONTINUATION, 0, 1, &block))
                .await
                .is_err()
            {
                closed = true;
                break;
            }
            sent += block.len();
        }
        assert!(
            closed || closed_within(&mut s, Duration::from_secs(5)).await,
            "the proxy kept reading a {sent}-byte header block"
        );
    };
    good_client_unaffected(addr, attack).await;
}

/// A raw HTTP/1.1 upstream that answers `ok` to every request head and counts the bytes it
/// receives, however large the heads.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let total = Arc::new(AtomicUsize::new(0));
    let t = total.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let t = t.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    t.fetch_add(n, Ordering::Relaxed);
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, total)
}

/// HPACK bomb: one large header put in the dynamic table, then referenced many times, so a
/// small block decodes to megabytes.
#[tokio::test]
async fn hpack_bomb_is_refused() {
    let (up, received) = counting_upstream().await;
    let p = proxy_with("", None, up, None).await;
    let addr = p.addr("out").await;
    let attack = async {
        let mut s = raw_h2(addr).await;
        let mut block = get_block();
        // Literal with incremental indexing: `x-bomb: 4000 bytes` (fits the 4 KiB table).
        block.extend_from_slice(&[0x40, 0x06]);
        block.extend_from_slice(b"x-bomb");
        block.extend_from_slice(&[0x7f, 0xa1, 0x1e]); // length 4000 (127 + 3873)
        block.extend(std::iter::repeat_n(b'b', 4000));
        // Then the indexed entry 62 (the newest dynamic entry) 2,000 times: ~8 MB decoded.
        block.extend(std::iter::repeat_n(0xbe, 2000));
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
            .await
            .unwrap();
        // The request is refused (a 431 or a reset) or the connection closed; it never
        // reaches the upstream.
        let mut buf = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    };
    good_client_unaffected(addr, attack).await;
    // The good client's 101 small requests, and not the bomb's megabytes.
    let got = received.load(Ordering::Relaxed);
    assert!(got < 256 * 1024, "{got} bytes reached the upstream");
}
