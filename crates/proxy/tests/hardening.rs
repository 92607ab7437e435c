//! Adversarial requests, end to end on real sockets: path forms that try to walk around an
//! authorization policy, error responses that must not tell a stranger anything, and a
//! `Connection` header that tries to remove what the mesh sets. Requests are written as raw
//! bytes so that the path arrives exactly as written.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use trellis_identity::{Ca, Credentials, SpiffeId, WorkloadKey};

const DENY_ADMIN: &str = "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  targetRef: {kind: Service, name: app}
  action: Deny
  rules:
    - to: {paths: [/admin/*, /admin]}
";

/// A proxy with one inbound listener `in` (for service `app`) forwarding to `app`, plus
/// `extra` resources.
async fn inbound(app: SocketAddr, extra: &str) -> TestProxy {
    start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: test}}
spec:
  admin: {{address: 127.0.0.1:0}}
  detectTimeout: 200ms
  inbound:
    - {{name: in, address: 127.0.0.1:0, forwardTo: '{app}', service: app}}
---
{}---
{extra}",
        service_yaml("app", 80, &[])
    ))
    .await
}

/// A response read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Writes `request` (a whole request, as bytes on the wire; it asks to close the
/// connection) and reads the whole response.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &[u8]) -> Raw {
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the response in time")
        .expect("a readable response");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    Raw {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// `GET target` over plain TCP, the target exactly as given.
async fn get_raw(addr: SocketAddr, target: &str) -> Raw {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {target} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
    exchange(s, req.as_bytes()).await
}

#[tokio::test]
async fn every_spelling_of_a_denied_path_is_denied_or_refused() {
    let up = upstream("app").await;
    let p = inbound(up.addr, DENY_ADMIN).await;
    let addr = p.addr("in").await;
    // Each form, and what it must get: 403 when it normalizes to /admin..., 400 when it
    // cannot be normalized safely.
    let cases: &[(&str, u16)] = &[
        ("/admin", 403),
        ("/admin/x", 403),
        ("/admin/x?debug=1", 403),
        ("//admin/x", 403),
        ("///admin//x", 403),
        ("/./admin/x", 403),
        ("/x/../admin/x", 403),
        ("/x/y/../../admin/x", 403),
        ("/../admin/x", 403),
        ("/%61dmin/x", 403),
        ("/%61%64%6D%69%6E", 403),
        ("/%2e%2e/admin/x", 403),
        ("/%2E/admin/x", 403),
        ("/x/.%2e/admin/x", 403),
        ("/admin/.", 403),
        ("/admin/x/..", 403),
        ("http://app//admin/x", 403),
        ("http://app/x/../admin/x", 403),
        ("/x/..%2fadmin/x", 400),
        ("/admin%2fx", 400),
        ("/x%2F..%2Fadmin", 400),
        ("/%5cadmin/x", 400),
        ("/x/..\\admin/x", 400),
        ("/admin%00/x", 400),
        ("/adm%in/x", 400),
        ("/%", 400),
    ];
    for (target, want) in cases {
        let got = get_raw(addr, target).await;
        assert_eq!(got.status, *want, "{target}: {got:?}");
    }
    assert_eq!(
        up.hits.load(Ordering::Relaxed),
        0,
        "no spelling of /admin reached the app"
    );

    // Allowed paths still reach the app, in their canonical form; the query is as sent.
    let allowed: &[(&str, &str)] = &[
        ("/public", "/public"),
        ("//public/./a/../b?q=%2e&r=..//", "/public/b?q=%2e&r=..//"),
        ("/%7Euser/%61%3f", "/~user/a%3F"),
        ("/admin-area/../public/", "/public/"),
        ("/administrator", "/administrator"),
        ("http://app//public//x", "/public/x"),
    ];
    for (target, want) in allowed {
        let got = get_raw(addr, target).await;
        assert_eq!(got.status, 200, "{target}: {got:?}");
        assert_eq!(got.json()["path"], *want, "{target}");
    }
    // `OPTIONS *` has no path to normalize and passes as it is.
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let got = exchange(
        s,
        b"OPTIONS * HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((got.status, &got.json()["path"]), (200, &"*".into()));
}

#[tokio::test]
async fn http2_paths_are_normalized_before_authorization() {
    let up = upstream("app").await;
    let p = inbound(up.addr, DENY_ADMIN).await;
    let addr = p.addr("in").await;
    let client = h2_client();
    for path in ["//admin/x", "/./admin/x", "/x/../admin/x", "/%61dmin/x"] {
        let got = get_via(&client, addr, path).await;
        assert_eq!(got.status, 403, "{path}");
    }
    let got = get_via(&client, addr, "/a%2fb").await;
    assert_eq!(got.status, 400);
    assert_eq!(up.hits.load(Ordering::Relaxed), 0);
    let got = get_via(&client, addr, "//%70ublic/./x?y=1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["path"], "/public/x?y=1");
    assert_eq!(got.json()["version"], "HTTP/2.0");
}

/// A loopback port with nothing listening.
async fn dead_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn inbound_errors_name_no_address_and_no_policy() {
    let dead = dead_port().await;
    let p = inbound(dead, DENY_ADMIN).await;
    let addr = p.addr("in").await;

    let got = get_raw(addr, "/x").await;
    assert_eq!(got.status, 502, "{got:?}");
    assert_eq!(
        got.header("trellis-proxy-error"),
        Some("upstream unavailable")
    );
    assert_eq!(got.body, "upstream unavailable\n");
    let port = dead.port().to_string();
    for secret in ["127.0.0.1", port.as_str(), "os error", "refused"] {
        assert!(
            !got.head.contains(secret) && !got.body.contains(secret),
            "{secret} in {got:?}"
        );
    }
    // The failure is still counted, under its bounded label.
    let metrics = p.proxy.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("trellis_http_responses_total{")
                && l.contains("direction=\"inbound\"")
                && l.contains("error=\"connect\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );

    let got = get_raw(addr, "/admin/x").await;
    assert_eq!(got.status, 403);
    assert_eq!(got.header("trellis-proxy-error"), Some("denied"));
    assert_eq!(got.body, "denied\n");
    assert!(!got.head.contains("no-admin") && !got.body.contains("no-admin"));
    assert_eq!(p.metric("trellis_authz_decisions_total{listener=\"in\",decision=\"deny\",policy=\"default/no-admin\"}"), 1.0);

    let got = get_raw(addr, "/a%2fb").await;
    assert_eq!(got.status, 400);
    assert_eq!(got.header("trellis-proxy-error"), Some("bad request"));
}

#[tokio::test]
async fn outbound_errors_keep_the_detail_for_the_local_app() {
    let dead = dead_port().await;
    let p = app_proxy(&[dead]).await;
    let addr = p.addr("out").await;
    let got = get_raw(addr, "/x").await;
    assert_eq!(got.status, 502);
    let reason = got.header("trellis-proxy-error").unwrap();
    assert!(reason.contains(&dead.to_string()), "{reason}");
    let got = get_raw(addr, "/a%2Fb").await;
    assert_eq!(got.status, 400);
    let reason = got.header("trellis-proxy-error").unwrap();
    assert!(reason.contains("encoded slash"), "{reason}");
}

#[tokio::test]
async fn connection_cannot_remove_host_or_headers_a_route_filter_adds() {
    let up = upstream("web").await;
    let yaml = format!(
        "{}{}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{kind: Service, name: web, port: 8080}}]
  rules:
    - filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {{set: [{{name: x-added, value: by-mesh}}]}}
      backendRefs: [{{name: web, port: 8080}}]
",
        proxy_yaml("web"),
        service_yaml("web", 8080, &[up.addr]),
    );
    let p = start_proxy(&yaml).await;
    let s = tokio::net::TcpStream::connect(p.addr("out").await)
        .await
        .unwrap();
    let got = exchange(
        s,
        b"GET /h HTTP/1.1\r\nHost: web.example\r\n\
          Connection: close, host, x-added, x-trellis-peer-identity, x-private\r\n\
          x-private: 1\r\nx-public: 2\r\n\r\n",
    )
    .await;
    assert_eq!(got.status, 200, "{got:?}");
    let seen = &got.json()["headers"];
    assert_eq!(seen["host"][0], "web.example", "{seen}");
    assert_eq!(seen["x-added"][0], "by-mesh", "{seen}");
    assert_eq!(seen["x-public"][0], "2", "{seen}");
    assert!(
        seen.get("x-private").is_none(),
        "a named header still goes: {seen}"
    );
    assert!(seen.get("connection").is_none(), "{seen}");
}

fn creds(ca: &Ca, sa: &str) -> Arc<Credentials> {
    let id = SpiffeId::new("mesh.test", "default", sa).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = ca
        .sign(
            &key.csr(Some(&id)).unwrap(),
            &id,
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
    Credentials::new("mesh.test", &issued.chain_pem, &key.pem(), ca.bundle_pem()).unwrap()
}

#[tokio::test]
async fn connection_cannot_remove_the_peer_identity_and_a_sent_one_is_dropped() {
    let up = upstream("app").await;
    let p = inbound(up.addr, "").await;
    let ca = Ca::load(&Ca::generate("mesh.test", Duration::from_secs(86400)).unwrap()).unwrap();
    p.proxy.set_identity(creds(&ca, "server"));
    let client = creds(&ca, "client");
    // A mesh peer over mutual TLS, speaking HTTP/1.1 as raw bytes.
    let tcp = tokio::net::TcpStream::connect(p.addr("in").await)
        .await
        .unwrap();
    let name = trellis_proxy::tls::server_name("spiffe://mesh.test/ns/default/sa/server").unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(client.client_config()).connect(name, tcp),
    )
    .await
    .unwrap()
    .expect("the mesh handshake");
    let got = exchange(
        tls,
        b"GET /h HTTP/1.1\r\nHost: app.example\r\n\
          Connection: close, host, x-trellis-peer-identity\r\n\
          x-trellis-peer-identity: spiffe://mesh.test/ns/default/sa/admin\r\n\r\n",
    )
    .await;
    assert_eq!(got.status, 200, "{got:?}");
    let seen = &got.json()["headers"];
    assert_eq!(seen["host"][0], "app.example", "{seen}");
    assert_eq!(
        seen["x-trellis-peer-identity"],
        serde_json::json!(["spiffe://mesh.test/ns/default/sa/client"]),
        "{seen}"
    );
}

/// CONNECT may carry an origin-form target (`CONNECT /admin/x HTTP/1.1`), and apps that route
/// on the path alone serve it: its path is made canonical like any other.
#[tokio::test]
async fn connect_with_a_path_is_normalized_before_authorization() {
    let up = upstream("app").await;
    let p = inbound(up.addr, DENY_ADMIN).await;
    let addr = p.addr("in").await;
    let cases: &[(&str, u16)] = &[
        ("/admin/x", 403),
        ("//admin/x", 403),
        ("/x/../admin/x", 403),
        ("/%61dmin/x", 403),
        ("/admin%2fx", 400),
    ];
    for (target, want) in cases {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
        let got = exchange(s, req.as_bytes()).await;
        assert_eq!(got.status, *want, "CONNECT {target}: {got:?}");
    }
    assert_eq!(
        up.hits.load(Ordering::Relaxed),
        0,
        "CONNECT reached the app"
    );
}

/// An app that accepts `Upgrade: h2c`: it answers 101, then serves HTTP/2 on the same
/// connection and records every path it serves there.
async fn h2c_upgrading_app() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = served.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                let log = log.clone();
                async move {
                    let h2c = req
                        .headers()
                        .get("upgrade")
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"));
                    if !h2c {
                        let resp = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"plain"),
                        ));
                        return Ok::<_, std::convert::Infallible>(resp);
                    }
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(io) = upgrade.await else { return };
                        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                            log.lock().unwrap().push(req.uri().path().to_string());
                            async {
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"secret")),
                                ))
                            }
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    });
                    let mut resp =
                        http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut()
                        .insert("connection", "Upgrade".parse().unwrap());
                    resp.headers_mut().insert("upgrade", "h2c".parse().unwrap());
                    Ok(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades(),
            );
        }
    });
    (addr, served)
}

/// h2c smuggling: an allowed request asks to upgrade to HTTP/2 in clear; if the app agrees,
/// the connection becomes a tunnel whose HTTP/2 requests the proxy never sees. The proxy
/// must not offer the app that upgrade.
#[tokio::test]
async fn an_h2c_upgrade_cannot_tunnel_past_authorization() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (app, served) = h2c_upgrading_app().await;
    let p = inbound(app, DENY_ADMIN).await;
    let addr = p.addr("in").await;
    for upgrade in ["h2c", "H2C"] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /public HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        // The response head, byte by byte so that nothing after it is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
                .await
                .expect("a response in time")
                .unwrap();
            assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if head.starts_with("HTTP/1.1 101") {
            // The tunnel is open: try the denied path through it.
            let (mut tx, conn) = hyper::client::conn::http2::handshake::<
                _,
                _,
                http_body_util::Empty<bytes::Bytes>,
            >(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
            tokio::spawn(conn);
            let req = http::Request::get("http://app/admin/x")
                .body(http_body_util::Empty::new())
                .unwrap();
            let status = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
                .await
                .expect("an answer in time")
                .map(|r| r.status());
            panic!("{upgrade}: the proxy passed the upgrade; /admin/x through it: {status:?}");
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{upgrade}: {head}");
    }
    assert!(
        served.lock().unwrap().is_empty(),
        "{:?}",
        served.lock().unwrap()
    );
}
