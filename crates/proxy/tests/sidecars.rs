//! Two sidecars with mutual TLS between them: the protocol they negotiate (HTTP/2 by ALPN,
//! HTTP/1.1 with an older peer, and for a request without a body while few are in flight),
//! session resumption and what crosses them untouched.

mod support;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use trellis_identity::Ca;

const SERVER_ID: &str = "spiffe://mesh.test/ns/default/sa/server";

/// A server sidecar (identity `server`, strict mutual TLS) in front of `app`, whose service
/// port declares `protocol` (or nothing).
async fn server_sidecar(ca: &Ca, app: SocketAddr, protocol: Option<&str>) -> TestProxy {
    server_sidecar_with(ca, app, protocol, "").await
}

/// [`server_sidecar`] with more fields (`spec` lines, two spaces in) in its Proxy.
async fn server_sidecar_with(
    ca: &Ca,
    app: SocketAddr,
    protocol: Option<&str>,
    more: &str,
) -> TestProxy {
    let proto = protocol.map_or(String::new(), |p| format!(", appProtocol: {p}"));
    let p = start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: server}}
spec:
  admin: {{address: 127.0.0.1:0}}
{more}  inbound: [{{name: in, address: 127.0.0.1:0, forwardTo: '{app}', service: app}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 80{proto}}}]
---
apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{mtls: {{mode: Strict}}}}
"
    ))
    .await;
    p.proxy.set_identity(creds(ca, "server"));
    p
}

/// A client sidecar (identity `client`) whose outbound listener `out` sends service `app`
/// to `peer`, which must prove identity `server`.
async fn client_sidecar(ca: &Ca, peer: SocketAddr, protocol: Option<&str>) -> TestProxy {
    let proto = protocol.map_or(String::new(), |p| format!(", appProtocol: {p}"));
    let p = start_proxy(&format!(
        "{}---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 80{proto}}}]
  endpoints: [{{address: '{peer}', identity: {SERVER_ID}}}]
",
        proxy_yaml("app")
    ))
    .await;
    p.proxy.set_identity(creds(ca, "client"));
    p
}

/// Sends `n` HTTP/1.1 requests at once, each on its own client connection, and returns
/// what the app saw of each (the echo upstream's JSON).
async fn burst(out: SocketAddr, n: usize) -> Vec<serde_json::Value> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(async move {
                let req = Request::post(format!("http://{out}/burst/{i}"))
                    .header("host", "app.example:8080")
                    .header("trellis-orig-proto", "HTTP/1.0")
                    .body(Full::new(Bytes::from(format!("body {i}"))))
                    .unwrap();
                let got = send(&h1_client(), req).await;
                assert_eq!(got.status, 200, "request {i}: {:?}", got.body);
                got.json()
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    seen
}

#[tokio::test]
async fn sidecars_carry_http1_over_one_http2_connection_and_the_app_sees_http1() {
    let ca = test_ca();
    let app = upstream("app").await;
    let server = server_sidecar(&ca, app.addr, None).await;
    let client = client_sidecar(&ca, server.addr("in").await, None).await;
    let out = client.addr("out").await;

    // 40 clients at once: with HTTP/1.1 between the sidecars each would need its own mutual
    // TLS connection; over HTTP/2 they share one.
    let seen = burst(out, 40).await;
    for (i, doc) in seen.iter().enumerate() {
        assert_eq!(
            doc["version"], "HTTP/1.1",
            "request {i} reached the app as {doc}"
        );
        assert_eq!(doc["headers"]["host"][0], "app.example:8080", "{doc}");
        // The marker is the mesh's own: neither a client's copy nor the sidecar's reaches the app.
        assert!(doc["headers"].get("trellis-orig-proto").is_none(), "{doc}");
        assert_eq!(doc["path"], format!("/burst/{i}"));
    }
    let mtls = "trellis_inbound_connections_total{listener=\"in\",security=\"mtls\"}";
    assert_eq!(
        server.metric(mtls),
        1.0,
        "one mutual TLS connection between the sidecars"
    );
    assert_eq!(
        server.metric("trellis_protocol_detections_total{direction=\"inbound\",protocol=\"http2\",how=\"alpn\"}"),
        1.0,
        "{}",
        server.proxy.metrics_text()
    );
    // A body of unknown length (chunked) crosses too, and comes back whole.
    let chunks = futures_util::stream::iter(
        ["one ", "two ", "three"]
            .map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(c)))),
    );
    let req = Request::post(format!("http://{out}/echo"))
        .body(http_body_util::StreamBody::new(chunks))
        .unwrap();
    let client_h1 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::StreamBody<_>>();
    let resp = client_h1.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"one two three");
}

#[tokio::test]
async fn a_request_alone_goes_over_pooled_http1_and_a_burst_shares_http2() {
    let ca = test_ca();
    let app = upstream("app").await;
    let server = server_sidecar(&ca, app.addr, None).await;
    let client = client_sidecar(&ca, server.addr("in").await, None).await;
    let out = client.addr("out").await;
    let mtls = "trellis_inbound_connections_total{listener=\"in\",security=\"mtls\"}";
    let alpn_h2 =
        "trellis_protocol_detections_total{direction=\"inbound\",protocol=\"http2\",how=\"alpn\"}";
    let h1 = "trellis_protocol_detections_total{direction=\"inbound\",protocol=\"http1\"";
    // One request at a time, without a body: HTTP/1.1 on one pooled mutual TLS connection
    // (cheaper per request than HTTP/2 when nothing shares the connection).
    let client_h1 = h1_client();
    for i in 0..10 {
        let got = get_via(&client_h1, out, &format!("/alone/{i}")).await;
        assert_eq!(got.status, 200, "request {i}");
        assert_eq!(got.json()["version"], "HTTP/1.1");
    }
    assert_eq!(server.metric(mtls), 1.0, "{}", server.proxy.metrics_text());
    assert_eq!(server.metric(h1), 1.0, "{}", server.proxy.metrics_text());
    assert_eq!(
        server.metric(alpn_h2),
        0.0,
        "{}",
        server.proxy.metrics_text()
    );
    // 40 clients at once, without bodies: beyond a few in flight they share one HTTP/2
    // connection, so the burst costs a few handshakes, not 40.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            tokio::spawn(async move {
                let req = Request::get(format!("http://{out}/burst/{i}"))
                    .header("host", "app.example:8080")
                    .body(Full::default())
                    .unwrap();
                let got = send(&h1_client(), req).await;
                assert_eq!(got.status, 200, "request {i}: {:?}", got.body);
                let doc = got.json();
                assert_eq!(doc["version"], "HTTP/1.1", "request {i}: {doc}");
                assert_eq!(doc["headers"]["host"][0], "app.example:8080", "{doc}");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        server.metric(alpn_h2),
        1.0,
        "{}",
        server.proxy.metrics_text()
    );
    // The pooled HTTP/1.1 connection, at most 4 more HTTP/1.1 ones (a request opens one
    // only while at most 4 are in flight to the peer) and the HTTP/2 one.
    let conns = server.metric(mtls);
    assert!(
        conns <= 6.0,
        "{conns} mutual TLS connections for a burst of 40"
    );
}

/// The inbound sidecar says how long it keeps an idle HTTP/1.1 connection (`Keep-Alive:
/// timeout=3` for `clientIdleTimeout: 3s`), and the outbound does not reuse its pooled
/// connection after 2 s idle: reused later, a request could cross the inbound's close (it
/// closes between 3 and 4.5 s). Within that, the connection is reused.
#[tokio::test]
async fn the_outbound_heeds_the_inbounds_keep_alive_timeout() {
    let ca = test_ca();
    let app = upstream("app").await;
    let server = server_sidecar_with(&ca, app.addr, None, "  clientIdleTimeout: 3s\n").await;
    let client = client_sidecar(&ca, server.addr("in").await, None).await;
    let out = client.addr("out").await;
    let mtls = "trellis_inbound_connections_total{listener=\"in\",security=\"mtls\"}";
    let c = h1_client();
    for i in 0..3 {
        let got = get_via(&c, out, &format!("/soon/{i}")).await;
        assert_eq!(got.status, 200);
        // The outbound says its own (default) clientIdleTimeout to its client; the inbound's
        // header was for the outbound alone and is not passed on.
        assert_eq!(got.headers["keep-alive"], "timeout=30", "{:?}", got.headers);
    }
    assert_eq!(server.metric(mtls), 1.0, "{}", server.proxy.metrics_text());
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(get_via(&c, out, "/later").await.status, 200);
    assert_eq!(server.metric(mtls), 2.0, "{}", server.proxy.metrics_text());
}

/// A sidecar of an older release: mutual TLS that answers ALPN `trellis/1` only, then HTTP/1.1
/// or HTTP/2 by what the client sends (as such a sidecar detects it), to an app that records
/// the protocol and the headers of every request.
struct OldPeer {
    addr: SocketAddr,
    /// (HTTP version, whether the request carried the HTTP/2 mesh marker) per request.
    seen: Arc<Mutex<Vec<(http::Version, bool)>>>,
    alpn: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
}

async fn old_peer(ca: &Ca) -> OldPeer {
    let creds = creds(ca, "server");
    let config = creds.server_config_with(&[trellis_identity::tls::ALPN_MESH]);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let alpn = Arc::new(Mutex::new(Vec::new()));
    let (s2, a2) = (seen.clone(), alpn.clone());
    tokio::spawn(async move {
        let _creds = creds;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen, alpn) = (acceptor.clone(), s2.clone(), a2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                alpn.lock()
                    .unwrap()
                    .push(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    seen.lock().unwrap().push((
                        req.version(),
                        req.headers().contains_key("trellis-orig-proto"),
                    ));
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"old"),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    OldPeer { addr, seen, alpn }
}

#[tokio::test]
async fn a_peer_that_offers_only_http1_gets_http1_and_no_request_is_lost() {
    let ca = test_ca();
    let peer = old_peer(&ca).await;
    let client = client_sidecar(&ca, peer.addr, None).await;
    let out = client.addr("out").await;
    // With a body, so that each offers HTTP/2 first (a bodiless request alone takes
    // HTTP/1.1 anyway) and must fall back on the same try.
    for i in 0..5 {
        let req = Request::post(format!("http://{out}/old/{i}"))
            .body(Full::new(Bytes::from(format!("body {i}"))))
            .unwrap();
        let got = send(&h1_client(), req).await;
        assert_eq!(got.status, 200, "request {i}");
        assert_eq!(&got.body[..], b"old");
    }
    // Concurrent ones too, and one with a body.
    let tasks: Vec<_> = (0..10)
        .map(|i| tokio::spawn(async move { get(out, &format!("/old/c{i}")).await.status }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let req = Request::post(format!("http://{out}/old/body"))
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    assert_eq!(send(&h1_client(), req).await.status, 200);
    let seen = peer.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        16,
        "every request reached the old peer once: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|(v, marked)| *v == http::Version::HTTP_11 && !marked),
        "the old peer only ever saw plain HTTP/1.1: {seen:?}"
    );
    let alpn = peer.alpn.lock().unwrap().clone();
    assert!(
        alpn.iter()
            .all(|a| a.as_deref() == Some(trellis_identity::tls::ALPN_MESH)),
        "{alpn:?}"
    );
}

#[tokio::test]
async fn grpc_streams_websockets_the_apps_own_tls_and_http2_cross_two_sidecars_untouched() {
    let ca = test_ca();
    // gRPC: a declared grpc port, bidirectional streaming through both sidecars.
    let app = upstream("grpc-app").await;
    let server = server_sidecar(&ca, app.addr, Some("grpc")).await;
    let client = client_sidecar(&ca, server.addr("in").await, Some("grpc")).await;
    let out = client.addr("out").await;
    tokio::time::timeout(
        Duration::from_secs(20),
        grpc_chat(out, &["one", "two", "three"]),
    )
    .await
    .expect("the stream is not buffered");
    // An h2c client to an undeclared port stays HTTP/2 all the way (no marker: not a
    // downgrade).
    let app2 = upstream("h2-app").await;
    let server2 = server_sidecar(&ca, app2.addr, None).await;
    let client2 = client_sidecar(&ca, server2.addr("in").await, None).await;
    let got = get_via(&h2_client(), client2.addr("out").await, "/h2").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["version"], "HTTP/2.0", "{:?}", got.json());

    // WebSocket: the upgrade goes over HTTP/1.1 between the sidecars, and messages flow
    // both ways after it.
    let ws_app = ws_echo().await;
    let server3 = server_sidecar(&ca, ws_app, None).await;
    let client3 = client_sidecar(&ca, server3.addr("in").await, None).await;
    let url = format!("ws://{}/chat", client3.addr("out").await);
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .unwrap()
    .expect("the upgrade crosses both sidecars");
    assert_eq!(resp.status(), 101);
    for word in ["hello", "mesh"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(word))
            .await
            .unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), word);
    }
    assert_eq!(
        server3.metric("trellis_inbound_connections_total{listener=\"in\",security=\"mtls\"}"),
        1.0
    );

    // The app's own TLS: its client's handshake completes end to end with the app's own
    // certificate, carried as opaque bytes inside the sidecars' mutual TLS.
    let (tls_app, app_cert) = tls_echo_app().await;
    let server4 = server_sidecar(&ca, tls_app, None).await;
    let client4 = client_sidecar(&ca, server4.addr("in").await, None).await;
    app_tls_roundtrip(client4.addr("out").await, &app_cert).await;
    assert_eq!(
        server4.metric("trellis_inbound_connections_total{listener=\"in\",security=\"mtls\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_resumed_session_is_checked_against_the_current_trust_bundle() {
    let ca = test_ca();
    let app = upstream("app").await;
    let server = server_sidecar(&ca, app.addr, None).await;
    let in_addr = server.addr("in").await;
    let name = rustls::pki_types::ServerName::try_from("server.default.trellis").unwrap();
    let me = creds(&ca, "client");
    let connector = tokio_rustls::TlsConnector::from(me.client_config());
    let connect = || {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(in_addr).await.unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            // A request, so that the server's tickets have arrived before the next connection.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            tls.write_all(b"GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
                .await?;
            let mut out = Vec::new();
            tls.read_to_end(&mut out).await?;
            let kind = tls.get_ref().1.handshake_kind();
            Ok::<_, std::io::Error>((kind, out))
        }
    };
    let (first, out) = connect().await.unwrap();
    assert_eq!(first, Some(rustls::HandshakeKind::Full));
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let (second, out) = connect().await.unwrap();
    assert_eq!(
        second,
        Some(rustls::HandshakeKind::Resumed),
        "sessions resume"
    );
    assert!(out.starts_with(b"HTTP/1.1 200"));

    // The server's trust bundle moves to a new CA that never signed the client: a full
    // handshake would fail, and so must resuming the old session.
    // (Rotated in place, as the control plane's renewal does: the session cache stays.)
    let other = test_ca();
    let id = trellis_identity::SpiffeId::new("mesh.test", "default", "server").unwrap();
    let key = trellis_identity::WorkloadKey::generate().unwrap();
    let issued = other
        .sign(
            &key.csr(Some(&id)).unwrap(),
            &id,
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap();
    server
        .proxy
        .credentials()
        .unwrap()
        .rotate(&issued.chain_pem, &key.pem(), other.bundle_pem())
        .unwrap();
    let refused =
        "trellis_inbound_connections_total{listener=\"in\",security=\"refused_handshake\"}";
    let before = server.metric(refused);
    let third = connect().await;
    assert!(
        !matches!(&third, Ok((_, out)) if out.starts_with(b"HTTP/1.1 200")),
        "a resumed session from a CA no longer trusted is refused: {:?}",
        third.map(|(kind, out)| (
            kind,
            String::from_utf8_lossy(&out[..out.len().min(20)]).into_owned()
        ))
    );
    assert_eq!(
        server.wait_metric(refused, before + 1.0).await,
        before + 1.0
    );
}

#[tokio::test]
async fn heads_http2_would_refuse_or_invent_cross_as_http1_sends_them() {
    let ca = test_ca();
    let app = upstream("app").await;
    let server = server_sidecar(&ca, app.addr, None).await;
    let client = client_sidecar(&ca, server.addr("in").await, None).await;
    let out = client.addr("out").await;
    // A 40 KB header (a big cookie): HTTP/2's usual 16 KiB header list would refuse it.
    // With a body, so that it crosses as HTTP/2 (a bodiless request alone takes HTTP/1.1).
    let big = "x".repeat(40 * 1024);
    let req = Request::post(format!("http://{out}/big"))
        .header("cookie", big.as_str())
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let got = send(&h1_client(), req).await;
    assert_eq!(got.status, 200, "{:?}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.json()["headers"]["cookie"][0], big.as_str());
    // HTTP/1.0 without a Host: the app must not receive one the mesh made up. With a body,
    // so that it would cross as HTTP/2 but for the missing authority.
    let text = raw_exchange(
        out,
        b"POST /nohost HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(
        !text.contains("localhost"),
        "the app saw an invented Host: {text}"
    );
    // Two Hosts: the sidecar would route on one and the app might read the other.
    let text = raw_exchange(
        out,
        b"GET /twohosts HTTP/1.1\r\nHost: app.example\r\nHost: admin.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(!text.contains("/twohosts"), "it reached the app: {text}");
}

/// Writes `request` as bytes on the wire to `addr` (it must end the connection) and reads
/// the whole response.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("the response in time")
        .expect("a readable response");
    String::from_utf8_lossy(&raw).into_owned()
}
