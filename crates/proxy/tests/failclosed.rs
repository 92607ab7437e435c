//! Fail closed where a policy needs layer 7: on an inbound port whose authorization reads
//! requests, a connection that is not HTTP (too slow to say so, malformed, or another
//! protocol) is refused and counted, never forwarded to the app as bytes; ports whose policy
//! works on TCP keep passing TCP. Also: a service port's `appProtocol` holds on its inbound
//! listeners, and endpoint connections are per address and identity.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_identity::{Ca, Credentials, SpiffeId, WorkloadKey};

/// An app that answers 200 to whatever it reads, the way an app would serve `/admin/x` if
/// the bytes reached it. Counts connections and bytes.
struct RawApp {
    addr: SocketAddr,
    conns: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

async fn raw_app() -> RawApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conns, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (c, b) = (conns.clone(), bytes.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::Relaxed);
            let b = b.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    b.fetch_add(n as u64, Ordering::Relaxed);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecret";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    RawApp { addr, conns, bytes }
}

impl RawApp {
    fn untouched(&self) -> bool {
        self.conns.load(Ordering::Relaxed) == 0 && self.bytes.load(Ordering::Relaxed) == 0
    }
}

const DENY_ADMIN: &str = "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  targetRef: {kind: Service, name: app}
  action: Deny
  rules:
    - to: {paths: [/admin, /admin/*]}
";

/// A proxy with one inbound listener `in` for service `app` (port 80, `app_protocol` when
/// given) forwarding to `app`, plus `extra` resources.
fn inbound_yaml(app: SocketAddr, app_protocol: Option<&str>, extra: &str) -> String {
    let declared = app_protocol.map_or(String::new(), |p| format!(", appProtocol: {p}"));
    format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: test}}
spec:
  admin: {{address: 127.0.0.1:0}}
  detectTimeout: 200ms
  inbound:
    - {{name: in, address: 127.0.0.1:0, forwardTo: '{app}', service: app}}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 80{declared}}}]
---
{extra}"
    )
}

/// Writes `pieces` (pausing `gap` before each), then reads what comes back until the proxy
/// closes (bounded). Write errors are expected once the proxy has closed.
async fn exchange(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    pieces: &[&[u8]],
    gap: Duration,
) -> String {
    for p in pieces {
        tokio::time::sleep(gap).await;
        if s.write_all(p).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

const ADMIN: &[u8] = b"GET /admin/x HTTP/1.1\r\nHost: app\r\n\r\n";

fn refused(p: &TestProxy, reason: &str) -> f64 {
    p.metric(&format!(
        "trellis_inbound_refused_total{{listener=\"in\",reason=\"{reason}\"}}"
    ))
}

#[tokio::test]
async fn a_request_sent_after_the_detect_timeout_is_refused() {
    let app = raw_app().await;
    let p = start_proxy(&inbound_yaml(app.addr, None, DENY_ADMIN)).await;
    let s = TcpStream::connect(p.addr("in").await).await.unwrap();
    // Longer than detectTimeout (200ms): today's fallback would make this opaque TCP.
    let got = exchange(s, &[ADMIN], Duration::from_millis(500)).await;
    assert!(!got.contains("200 OK"), "{got:?}");
    assert!(app.untouched(), "the app saw the connection");
    assert_eq!(refused(&p, "detect_timeout"), 1.0);
    // An HTTP request in time is still authorized as usual.
    assert_eq!(get(p.addr("in").await, "/admin/x").await.status, 403);
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

fn mesh_ca() -> Ca {
    Ca::load(&Ca::generate("mesh.test", Duration::from_secs(86400)).unwrap()).unwrap()
}

#[tokio::test]
async fn a_mesh_peer_that_waits_after_its_handshake_is_refused() {
    let app = raw_app().await;
    let ca = mesh_ca();
    let p = start_proxy(&inbound_yaml(app.addr, None, DENY_ADMIN)).await;
    p.proxy.set_identity(creds(&ca, "server"));
    let peer = creds(&ca, "client");
    let tcp = TcpStream::connect(p.addr("in").await).await.unwrap();
    let name = trellis_proxy::tls::server_name("spiffe://mesh.test/ns/default/sa/server").unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(peer.client_config()).connect(name, tcp),
    )
    .await
    .unwrap()
    .expect("the mutual TLS handshake completes");
    let got = exchange(tls, &[ADMIN], Duration::from_millis(500)).await;
    assert!(!got.contains("200 OK"), "{got:?}");
    assert!(app.untouched(), "the app saw the connection");
    assert_eq!(
        p.metric("trellis_inbound_connections_total{listener=\"in\",security=\"mtls\"}"),
        1.0
    );
    assert_eq!(refused(&p, "detect_timeout"), 1.0);
}

#[tokio::test]
async fn malformed_request_lines_never_reach_the_app() {
    let app = raw_app().await;
    let p = start_proxy(&inbound_yaml(app.addr, None, DENY_ADMIN)).await;
    let addr = p.addr("in").await;
    let long = format!(
        "GET /admin/x?{} HTTP/1.1\r\nHost: app\r\n\r\n",
        "a".repeat(9000)
    );
    let long_pieces: Vec<&[u8]> = long.as_bytes().chunks(1000).collect();
    let cases: Vec<(&str, Vec<&[u8]>, &str)> = vec![
        (
            "HTTP/1.2",
            vec![b"GET /admin/x HTTP/1.2\r\nHost: app\r\n\r\n"],
            "not_http",
        ),
        (
            "lowercase version",
            vec![b"GET /admin/x http/1.1\r\nHost: app\r\n\r\n"],
            "not_http",
        ),
        (
            "tab",
            vec![b"GET\t/admin/x HTTP/1.1\r\nHost: app\r\n\r\n"],
            "not_http",
        ),
        (
            "request line over 8 KiB, in pieces",
            long_pieces,
            "request_line_too_long",
        ),
        (
            "not HTTP at all",
            vec![b"\x00\x01\x02admin please\r\n"],
            "not_http",
        ),
    ];
    let mut want_not_http = 0.0;
    for (what, pieces, reason) in &cases {
        let before = refused(&p, reason);
        let s = TcpStream::connect(addr).await.unwrap();
        let got = exchange(s, pieces, Duration::from_millis(10)).await;
        assert!(!got.contains("200 OK"), "{what}: {got:?}");
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 400"),
            "{what}: {got:?}"
        );
        assert!(app.untouched(), "{what}: the app saw the bytes");
        assert_eq!(refused(&p, reason) - before, 1.0, "{what}: counted");
        if *reason == "not_http" {
            want_not_http += 1.0;
        }
    }
    assert_eq!(refused(&p, "not_http"), want_not_http);
}

#[tokio::test]
async fn an_identity_only_policy_still_passes_opaque_tcp() {
    let echo = tcp_echo().await;
    let deny_web = "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: not-web}
spec:
  action: Deny
  rules:
    - from: {namespaces: [web]}
";
    let p = start_proxy(&inbound_yaml(echo, None, deny_web)).await;
    let mut s = TcpStream::connect(p.addr("in").await).await.unwrap();
    let opaque = b"\x00\x01 some database protocol";
    s.write_all(opaque).await.unwrap();
    let mut buf = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, opaque);
    assert_eq!(refused(&p, "not_http"), 0.0);
}

#[tokio::test]
async fn a_port_without_layer7_policy_still_passes_server_speaks_first() {
    let banner = banner_server(b"220 smtp ready\r\n").await;
    let p = start_proxy(&inbound_yaml(banner, None, "")).await;
    let mut s = TcpStream::connect(p.addr("in").await).await.unwrap();
    let mut buf = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"220 smtp ready\r\n");
}

#[tokio::test]
async fn a_request_authentication_makes_the_port_layer7() {
    let app = raw_app().await;
    let authn = "apiVersion: trellis.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: users}
spec:
  required: true
  jwtRules: [{issuer: https://auth.test, jwksUri: 'http://127.0.0.1:9/jwks.json'}]
";
    let p = start_proxy(&inbound_yaml(app.addr, None, authn)).await;
    let s = TcpStream::connect(p.addr("in").await).await.unwrap();
    let got = exchange(s, &[b"hello, no token here\r\n"], Duration::ZERO).await;
    assert!(!got.contains("200 OK"), "{got:?}");
    assert!(app.untouched(), "the app saw the bytes");
    assert_eq!(refused(&p, "not_http"), 1.0);
}

#[tokio::test]
async fn a_service_port_declared_http_never_falls_back_to_tcp() {
    let app = raw_app().await;
    // No policy: only the declaration keeps the port HTTP.
    let p = start_proxy(&inbound_yaml(app.addr, Some("http"), "")).await;
    let addr = p.addr("in").await;
    let s = TcpStream::connect(addr).await.unwrap();
    let got = exchange(
        s,
        &[b"GET /admin/x HTTP/1.2\r\nHost: app\r\n\r\n"],
        Duration::ZERO,
    )
    .await;
    assert!(!got.contains("200 OK"), "{got:?}");
    assert!(app.untouched(), "the app saw the bytes");

    // The declaration may arrive after the listener is bound (a sidecar that starts before
    // the control plane's view reaches it): it holds from then on.
    let app = raw_app().await;
    let p = start_proxy(&inbound_yaml(app.addr, None, "")).await;
    let addr = p.addr("in").await;
    let again =
        trellis_api::parse_documents("test.yaml", &inbound_yaml(app.addr, Some("http"), ""))
            .unwrap();
    p.proxy.apply(&again, "test.yaml").await.unwrap();
    assert_eq!(p.addr("in").await, addr, "the listener was not rebound");
    let s = TcpStream::connect(addr).await.unwrap();
    let got = exchange(s, &[b"\x00\x01 not http\r\n"], Duration::ZERO).await;
    assert!(!got.contains("200 OK"), "{got:?}");
    assert!(app.untouched(), "the app saw the bytes");
}

mod shared_address {
    use super::*;

    const A: &str = "spiffe://mesh.test/ns/default/sa/a";
    const B: &str = "spiffe://mesh.test/ns/default/sa/b";

    /// An outbound proxy with a listener per service: `alpha` and `beta` at `addr` with the
    /// given identities, and `plain` at `addr` with none.
    fn outbound_yaml(addr: SocketAddr, alpha: &str, beta: &str) -> String {
        let svc = |name: &str, identity: Option<&str>| {
            let id = identity.map_or(String::new(), |i| format!(", identity: '{i}'"));
            format!(
                "---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: {name}}}
spec:
  ports: [{{port: 80}}]
  endpoints: [{{address: '{addr}'{id}}}]
"
            )
        };
        format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: client}}
spec:
  admin: {{address: 127.0.0.1:0}}
  outbound:
    - {{name: alpha, address: 127.0.0.1:0, service: {{name: alpha}}}}
    - {{name: beta, address: 127.0.0.1:0, service: {{name: beta}}}}
    - {{name: plain, address: 127.0.0.1:0, service: {{name: plain}}}}
{}{}{}",
            svc("alpha", Some(alpha)),
            svc("beta", Some(beta)),
            svc("plain", None)
        )
    }

    /// The inbound sidecar of identity A (permissive) in front of a real app; an outbound
    /// sidecar where `alpha` expects `alpha_id` and `beta` the other identity. Requests go
    /// to the services in `order`; the one expecting B must fail verification, whether or not
    /// a verified connection to A is already pooled.
    async fn run(alpha_id: &str, order: &[&str]) {
        let ca = mesh_ca();
        let up = upstream("app").await;
        let inbound = start_proxy(&format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: a}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound: [{{name: in, address: 127.0.0.1:0, forwardTo: '{}', service: a}}]
---
{}",
            up.addr,
            service_yaml("a", 80, &[])
        ))
        .await;
        inbound.proxy.set_identity(creds(&ca, "a"));
        let in_addr = inbound.addr("in").await;
        let beta_id = if alpha_id == A { B } else { A };
        let out = start_proxy(&outbound_yaml(in_addr, alpha_id, beta_id)).await;
        out.proxy.set_identity(creds(&ca, "client"));
        let client = h1_client();
        for name in order {
            let expects = if *name == "alpha" { alpha_id } else { beta_id };
            let got = get_via(&client, out.addr(name).await, "/x").await;
            if expects == A {
                assert_eq!(got.status, 200, "{name} expects A: {:?}", got.body);
                assert_eq!(got.upstream(), "app");
            } else {
                assert_eq!(
                    got.status, 502,
                    "{name} expects B but the endpoint is A: it must fail verification"
                );
            }
        }
        // One verified connection served A; the service without an identity got its own
        // plaintext connection rather than A's.
        assert_eq!(
            get_via(&client, out.addr("plain").await, "/x").await.status,
            200
        );
        assert_eq!(
            inbound.metric("trellis_inbound_connections_total{listener=\"in\",security=\"mtls\"}"),
            1.0
        );
        assert_eq!(
            inbound.metric(
                "trellis_inbound_connections_total{listener=\"in\",security=\"plaintext\"}"
            ),
            1.0
        );
        assert_eq!(
            up.hits.load(Ordering::Relaxed),
            2,
            "A's request and plain's"
        );
    }

    #[tokio::test]
    async fn a_first_then_b() {
        run(A, &["alpha", "beta"]).await;
    }

    #[tokio::test]
    async fn b_first_then_a() {
        run(A, &["beta", "alpha"]).await;
    }

    #[tokio::test]
    async fn b_built_first_then_a() {
        run(B, &["alpha", "beta"]).await;
    }

    #[tokio::test]
    async fn b_built_first_and_asked_first() {
        run(B, &["beta", "alpha"]).await;
    }
}
