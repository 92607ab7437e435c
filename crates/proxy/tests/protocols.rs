//! Every protocol end to end through a real proxy, with real clients and servers.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn proxy_to(addr: std::net::SocketAddr, app_protocol: Option<&str>) -> TestProxy {
    let mut svc = service_yaml("app", 8080, &[addr]);
    if let Some(p) = app_protocol {
        svc = svc.replace(
            "ports: [{port: 8080}]",
            &format!("ports: [{{port: 8080, appProtocol: {p}}}]"),
        );
    }
    start_proxy(&format!("{}{svc}", proxy_yaml("app"))).await
}

#[tokio::test]
async fn http1_chunked_request_body() {
    let up = upstream("a").await;
    let p = proxy_to(up.addr, None).await;
    let addr = p.addr("out").await;
    // A streamed body with no content-length goes out chunked.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..5)
        .map(|i| Ok(Frame::data(Bytes::from(format!("chunk-{i};")))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = Request::post(format!("http://{addr}/echo"))
        .body(body)
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "a");
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, "chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;");
    // Keep-alive: a second request reuses the client connection.
    let got = get(addr, "/x").await;
    assert_eq!(got.json()["version"], "HTTP/1.1");
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let up = upstream("a").await;
    let p = proxy_to(up.addr, None).await;
    let addr = p.addr("out").await;
    let client = h2_client();
    for _ in 0..3 {
        let got = send(
            &client,
            Request::get(format!("http://{addr}/h2"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
        // HTTP/2 in, HTTP/2 out.
        assert_eq!(got.json()["version"], "HTTP/2.0");
    }
    assert!(
        p.metric("trellis_protocol_detections_total{direction=\"outbound\",protocol=\"http2\"")
            >= 1.0
    );
}

#[tokio::test]
async fn grpc_bidirectional_stream() {
    let up = upstream("grpc").await;
    let p = proxy_to(up.addr, None).await;
    let addr = p.addr("out").await;
    grpc_chat(addr, &["one", "two", "three"]).await;
}

#[tokio::test]
async fn websocket_echo() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws = ws_echo().await;
    let p = proxy_to(ws, None).await;
    let addr = p.addr("out").await;
    let (mut sock, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/socket"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    // The connection is no longer HTTP/1.1: no keep-alive timeout is announced for it.
    assert!(resp.headers().get("keep-alive").is_none(), "{resp:?}");
    for text in ["hello", "over", "websocket"] {
        sock.send(Message::text(text)).await.unwrap();
        let back = sock.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    sock.close(None).await.unwrap();
}

#[tokio::test]
async fn raw_tcp_echo() {
    let echo = tcp_echo().await;
    let p = proxy_to(echo, None).await;
    let addr = p.addr("out").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Not HTTP: detected as TCP on the first bytes, without waiting for the timeout.
    let start = Instant::now();
    s.write_all(b"\x00\x01binary protocol\n").await.unwrap();
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"\x00\x01binary protocol\n");
    assert!(
        start.elapsed() < Duration::from_millis(150),
        "detection waited: {:?}",
        start.elapsed()
    );
    s.write_all(b"more").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"more");
    drop(s);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        p.metric("trellis_tcp_read_bytes_total{direction=\"outbound\",listener=\"out\"}") >= 22.0
    );
}

#[tokio::test]
async fn server_speaks_first_is_not_stalled() {
    let banner = banner_server(b"220 smtp.example ready\r\n").await;
    let p = proxy_to(banner, None).await;
    let addr = p.addr("out").await;
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 24];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .expect("stalled")
        .unwrap();
    assert_eq!(&buf, b"220 smtp.example ready\r\n");
    // The detect timeout (200ms here) bounds the delay.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_millis(1000),
        "{waited:?}"
    );
    assert_eq!(p.metric("trellis_protocol_detections_total{direction=\"outbound\",protocol=\"tcp\",how=\"timeout\"}"), 1.0);

    // Declaring the port opaque skips detection entirely: no delay at all.
    let p = proxy_to(banner, Some("tcp")).await;
    let addr = p.addr("out").await;
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn malformed_http_gets_400_and_proxy_survives() {
    let up = upstream("a").await;
    let p = proxy_to(up.addr, Some("http")).await;
    let addr = p.addr("out").await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"\x16\x03\x01garbage\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{garbage:?} -> {text:?}");
    }
    // Still serving.
    assert_eq!(get(addr, "/").await.status, 200);
}

/// An HTTP/1.1 upstream that answers each request path with a canned response, written as
/// is; `close` paths close the connection after answering. Returns its address and a count
/// of accepted connections.
async fn scripted_upstream(
    script: &'static [(&'static str, &'static [u8], bool)],
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let mut line = head.split(' ');
                    let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
                    let Some((_, resp, close)) = script.iter().find(|(p, ..)| *p == path) else {
                        return;
                    };
                    let resp = if method == "HEAD" {
                        // The head alone: a response to HEAD has no body.
                        let end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                        &resp[..end + 4]
                    } else {
                        resp
                    };
                    if s.write_all(resp).await.is_err() || *close {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// Every way an HTTP/1.1 response can be framed (RFC 9112 §6.3) arrives whole through the
/// proxy, and what breaks the framing rules is a 502 that says why.
#[tokio::test]
async fn upstream_responses_are_framed_as_rfc_9112_says() {
    use std::sync::atomic::Ordering;
    static SCRIPT: &[(&str, &[u8], bool)] = &[
        ("/length", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false),
        (
            "/chunked",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
            false,
        ),
        ("/close", b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
        ("/http10", b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", true),
        (
            "/early",
            b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
            false,
        ),
        ("/nothing", b"HTTP/1.1 204 No Content\r\n\r\n", false),
        (
            "/coded-and-sized",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            true,
        ),
        (
            "/conflict",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
            true,
        ),
        ("/garbage", b"SSH-2.0-OpenSSH_9.2\r\n\r\n", true),
        ("/short", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhel", true),
    ];
    let (up, conns) = scripted_upstream(SCRIPT).await;
    let p = proxy_to(up, None).await;
    let addr = p.addr("out").await;
    let client = h1_client();
    let get = |path: &str| {
        Request::get(format!("http://{addr}{path}"))
            .body(Full::default())
            .unwrap()
    };
    for (path, status, body) in [
        ("/length", 200, &b"hello"[..]),
        ("/chunked", 200, b"hello world"),
        ("/close", 200, b"until the end"),
        ("/http10", 200, b"ok"),
        ("/early", 200, b"final"),
        ("/nothing", 204, b""),
        // The coding wins over the length, and the length does not travel on.
        ("/coded-and-sized", 200, b"hello"),
        ("/length", 200, b"hello"),
    ] {
        let got = send(&client, get(path)).await;
        assert_eq!(got.status, status, "{path}");
        assert_eq!(got.body, body, "{path}");
    }
    let head = send(
        &client,
        Request::head(format!("http://{addr}/length"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!((head.status, head.body.len()), (http::StatusCode::OK, 0));
    assert_eq!(head.headers["content-length"], "5");
    // Connections the upstream kept alive were reused; /close, /http10 and /coded-and-sized
    // each ended theirs.
    assert_eq!(conns.load(Ordering::Relaxed), 4);

    for (path, why) in [
        ("/conflict", "conflicting content-length"),
        ("/garbage", "malformed response"),
    ] {
        let got = send(&client, get(path)).await;
        assert_eq!(got.status, 502, "{path}");
        let reason = got.headers[trellis_proxy::ERROR_HEADER].to_str().unwrap();
        assert!(reason.contains(why), "{path}: {reason}");
    }
    // A body cut short reaches the client broken (here the head and the first bytes go out
    // together, so the whole response is cut short), never as a complete one.
    if let Ok(resp) = client.request(get("/short")).await {
        assert!(resp.into_body().collect().await.is_err());
    }

    // Declared trailers of a chunked response reach a client that accepts them.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /chunked HTTP/1.1\r\nhost: app\r\nte: trailers\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(raw.contains("x-sum: 42"), "{raw}");
}
