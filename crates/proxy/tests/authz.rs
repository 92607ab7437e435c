//! Authorization at an inbound listener, end to end on real sockets: HTTP gets 403, gRPC gets
//! PERMISSION_DENIED, TCP is closed, audit mode denies nothing, and every decision is counted
//! with the policy that made it.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy with one inbound listener `in` (for service `app`) forwarding to `app`, plus `extra`
/// resources (policies, MeshConfig).
async fn inbound(app: std::net::SocketAddr, protocol: Option<&str>, extra: &str) -> TestProxy {
    let protocol = protocol.map_or(String::new(), |p| format!(", protocol: {p}"));
    start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: test}}
spec:
  admin: {{address: 127.0.0.1:0}}
  detectTimeout: 200ms
  inbound:
    - {{name: in, address: 127.0.0.1:0, forwardTo: '{app}', service: app{protocol}}}
---
{}---
{extra}",
        service_yaml("app", 80, &[])
    ))
    .await
}

const DENY_ADMIN: &str = "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  targetRef: {kind: Service, name: app}
  action: Deny
  rules:
    - to: {paths: [/admin/*, /echo.Echo/*]}
";

#[tokio::test]
async fn http_denials_are_403_and_counted_with_the_policy() {
    let up = upstream("app").await;
    let p = inbound(up.addr, None, DENY_ADMIN).await;
    let addr = p.addr("in").await;
    let ok = get(addr, "/public").await;
    assert_eq!(ok.status, 200);
    let denied = get(addr, "/admin/users").await;
    assert_eq!(denied.status, 403);
    // The caller is remote: it learns that it was denied, not by which policy.
    assert_eq!(denied.headers.get("trellis-proxy-error").unwrap(), "denied");
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the denied request never reached the app"
    );
    assert_eq!(p.metric("trellis_authz_decisions_total{listener=\"in\",decision=\"deny\",policy=\"default/no-admin\"}"), 1.0);
    assert_eq!(
        p.metric("trellis_authz_decisions_total{listener=\"in\",decision=\"allow\""),
        1.0
    );
}

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

#[tokio::test]
async fn grpc_denials_are_permission_denied() {
    let up = upstream("grpc").await;
    let p = inbound(up.addr, None, DENY_ADMIN).await;
    let addr = p.addr("in").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<Msg, Msg>::default();
    let path = http::uri::PathAndQuery::from_static("/echo.Echo/Chat");
    let outbound = futures_util::stream::iter(vec![Msg { text: "hi".into() }]);
    let status = client
        .streaming(tonic::Request::new(outbound), path, codec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.message(),
        "denied",
        "no policy name for a remote caller"
    );
}

#[tokio::test]
async fn tcp_connections_denied_by_default_are_closed_and_audit_mode_denies_nothing() {
    let echo = tcp_echo().await;
    let deny_all = "apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  authorization: {defaultAction: Deny}
";
    let p = inbound(echo, Some("tcp"), deny_all).await;
    let mut s = tokio::net::TcpStream::connect(p.addr("in").await)
        .await
        .unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 5];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without echo: {read:?}"
    );
    assert_eq!(p.metric("trellis_authz_decisions_total{listener=\"in\",decision=\"deny\",policy=\"MeshConfig default/mesh\"}"), 1.0);

    // The same default in audit mode: the connection goes through, and is reported.
    let audit = deny_all.replace("defaultAction: Deny}", "defaultAction: Deny, mode: Audit}");
    let p = inbound(echo, Some("tcp"), &audit).await;
    let mut s = tokio::net::TcpStream::connect(p.addr("in").await)
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(p.metric("trellis_authz_decisions_total{listener=\"in\",decision=\"audit_deny\",policy=\"MeshConfig default/mesh\"}"), 1.0);
}

mod jwt {
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    /// A JWKS server on loopback for one ES256 key; returns its URL and the signing key.
    async fn jwks_server() -> (String, EncodingKey) {
        let kp = rcgen::KeyPair::generate().unwrap();
        let raw = kp.public_key_raw().to_vec();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]})
        .to_string();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", l.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let body = jwks.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                });
            }
        });
        (url, EncodingKey::from_ec_der(&kp.serialize_der()))
    }

    #[tokio::test]
    async fn keys_can_come_from_a_jwks_file() {
        let kp = rcgen::KeyPair::generate().unwrap();
        let raw = kp.public_key_raw().to_vec();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let file = std::env::temp_dir().join(format!("trellis-jwks-{}.json", std::process::id()));
        std::fs::write(
            &file,
            serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]})
                .to_string(),
        )
        .unwrap();
        let up = upstream("app").await;
        let p = inbound(
            up.addr,
            None,
            &format!(
                "apiVersion: trellis.dev/v1alpha1
kind: RequestAuthentication
metadata: {{name: users}}
spec:
  required: true
  jwtRules: [{{issuer: https://auth.test, jwksFile: '{}', algorithms: [ES256]}}]
",
                file.display()
            ),
        )
        .await;
        let key = EncodingKey::from_ec_der(&kp.serialize_der());
        let addr = p.addr("in").await;
        let req = |t: &str| {
            http::Request::get(format!("http://{addr}/x"))
                .header("authorization", format!("Bearer {t}"))
                .body(Default::default())
                .unwrap()
        };
        assert_eq!(
            send(&h1_client(), req(&token(&key, "any", 300)))
                .await
                .status,
            200
        );
        assert_eq!(send(&h1_client(), req("garbage")).await.status, 401);
        let _ = std::fs::remove_file(&file);
    }

    fn token(key: &EncodingKey, role: &str, exp_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        let claims = serde_json::json!({
            "iss": "https://auth.test", "aud": "app", "sub": "alice", "role": role,
            "exp": now + exp_in, "nbf": now - 5,
        });
        encode(&h, &claims, key).unwrap()
    }

    #[tokio::test]
    async fn tokens_are_verified_and_their_claims_authorize() {
        let (url, key) = jwks_server().await;
        let up = upstream("app").await;
        let p = inbound(
            up.addr,
            None,
            &format!(
                "apiVersion: trellis.dev/v1alpha1
kind: RequestAuthentication
metadata: {{name: users}}
spec:
  required: true
  jwtRules:
    - {{issuer: https://auth.test, audiences: [app], jwksUri: '{url}', algorithms: [ES256], clockSkew: 10s}}
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: admins}}
spec:
  action: Allow
  rules:
    - claims: [{{name: role, values: [admin]}}]
"
            ),
        )
        .await;
        let addr = p.addr("in").await;
        let call = |t: Option<String>| {
            let client = h1_client();
            async move {
                let mut req = http::Request::get(format!("http://{addr}/x"));
                if let Some(t) = t {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                send(&client, req.body(Default::default()).unwrap()).await
            }
        };
        // The keys arrive from the URL in the background: wait for a good token to pass.
        let mut ok = None;
        for _ in 0..100 {
            let r = call(Some(token(&key, "admin", 300))).await;
            if r.status == 200 {
                ok = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok.is_some(), "a valid admin token never passed");
        let metric = "trellis_authz_decisions_total{listener=\"in\",decision=\"deny\",policy=\"request-authentication\"}";
        let before = p.metric(metric);
        let missing = call(None).await;
        assert_eq!(missing.status, 401);
        // A remote caller is told no more than that (the reason is in the decision log).
        assert_eq!(missing.headers["trellis-proxy-error"], "unauthenticated");
        let expired = call(Some(token(&key, "admin", -60))).await;
        assert_eq!(expired.status, 401);
        assert_eq!(expired.headers["trellis-proxy-error"], "unauthenticated");
        let reader = call(Some(token(&key, "reader", 300))).await;
        assert_eq!(
            reader.status, 403,
            "a valid token whose claims no rule allows"
        );
        assert_eq!(p.metric(metric) - before, 2.0, "both refusals counted");
    }
}

#[tokio::test]
async fn the_admin_port_explains_a_denial_as_the_listener_decides_it() {
    let up = upstream("app").await;
    let p = inbound(up.addr, None, DENY_ADMIN).await;
    let addr = p.addr("in").await;
    let explain = |path: &str| {
        let body = serde_json::json!({"direction": "inbound", "path": path}).to_string();
        let req = Request::post(format!("http://{}/explain", p.proxy.admin_addr()))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        async move { send(&h1_client(), req).await.json() }
    };
    for (path, outcome, status) in [
        ("/admin/users", "denied", 403),
        ("/public", "forwarded", 200),
    ] {
        let got = explain(path).await;
        assert_eq!(got["outcome"], outcome, "{got:#}");
        assert_eq!(
            got["authorization"]["policies"][0]["policy"],
            "default/no-admin"
        );
        // What the listener did with the same request.
        assert_eq!(get(addr, path).await.status, status, "{path}");
    }
    let denied = explain("/admin/users").await;
    assert_eq!(denied["authorization"]["decidedBy"], "default/no-admin");
    assert_eq!(denied["authorization"]["policies"][0]["matchedRule"], 0);
    // A malformed request is a clear error, not an answer.
    let req = Request::post(format!("http://{}/explain", p.proxy.admin_addr()))
        .body(Full::new(Bytes::from("{\"pth\": \"/\"}")))
        .unwrap();
    let bad = send(&h1_client(), req).await;
    assert_eq!(bad.status, 400);
}
