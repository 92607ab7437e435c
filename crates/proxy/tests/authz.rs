//! Authorization at an inbound listener, end to end on real sockets: HTTP gets 403, gRPC gets
//! PERMISSION_DENIED, TCP is closed, audit mode denies nothing, and every decision is counted
//! with the policy that made it.

mod support;

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
async fn http_denials_are_403_with_the_policy_named_and_counted() {
    let up = upstream("app").await;
    let p = inbound(up.addr, None, DENY_ADMIN).await;
    let addr = p.addr("in").await;
    let ok = get(addr, "/public").await;
    assert_eq!(ok.status, 200);
    let denied = get(addr, "/admin/users").await;
    assert_eq!(denied.status, 403);
    assert_eq!(
        denied.headers.get("trellis-proxy-error").unwrap(),
        "denied by default/no-admin"
    );
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
    assert!(
        status.message().contains("default/no-admin"),
        "{}",
        status.message()
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
