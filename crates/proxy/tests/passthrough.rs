//! Mutual TLS between two real proxies carrying an application's own TLS untouched: the app's
//! client and server complete their handshake end to end, inside the sidecars' mTLS.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_identity::{Ca, Credentials, SpiffeId, WorkloadKey};

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
async fn an_applications_own_tls_passes_through_the_sidecars_mutual_tls() {
    // The application: a TLS echo server with its own (self-signed) certificate.
    let (app_addr, app_cert) = tls_echo_app().await;

    // Two sidecars with mesh identities; the receiving one is strict.
    let ca = Ca::load(&Ca::generate("mesh.test", Duration::from_secs(86400)).unwrap()).unwrap();
    let inbound = start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: server}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound: [{{name: in, address: 127.0.0.1:0, forwardTo: '{app_addr}', service: app}}]
---
{}---
apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{mtls: {{mode: Strict}}}}
",
        service_yaml("app", 443, &[])
    ))
    .await;
    inbound.proxy.set_identity(creds(&ca, "server"));
    let in_addr = inbound.addr("in").await;
    let outbound = start_proxy(&format!(
        "{}---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 443}}]
  endpoints: [{{address: '{in_addr}', identity: spiffe://mesh.test/ns/default/sa/server}}]
",
        proxy_yaml("app")
    ))
    .await;
    outbound.proxy.set_identity(creds(&ca, "client"));

    // The application's client speaks TLS to app.example through its sidecar.
    app_tls_roundtrip(outbound.addr("out").await, &app_cert).await;
    // And the hop between the sidecars was mutual TLS, from the client's identity.
    assert_eq!(
        inbound.metric("trellis_inbound_connections_total{listener=\"in\",security=\"mtls\"}"),
        1.0
    );
    assert_eq!(
        inbound.metric("trellis_inbound_mtls_peer_connections_total{listener=\"in\",peer=\"spiffe://mesh.test/ns/default/sa/client\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_services_mode_overrides_the_mesh_wide_one() {
    let app = upstream("app").await;
    // Mesh-wide strict, but this service is permissive: plaintext is served.
    let yaml = |service_mode: &str, mesh_mode: &str| {
        format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: server}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound: [{{name: in, address: 127.0.0.1:0, forwardTo: '{}', service: app}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 80}}]
  mtls: {{mode: {service_mode}}}
---
apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{mtls: {{mode: {mesh_mode}}}}}
",
            app.addr
        )
    };
    let p = start_proxy(&yaml("Permissive", "Strict")).await;
    assert_eq!(get(p.addr("in").await, "/x").await.status, 200);
    // And the other way round: a strict service in a permissive mesh closes plaintext.
    let p = start_proxy(&yaml("Strict", "Permissive")).await;
    let client = h1_client();
    let req = http::Request::get(format!("http://{}/x", p.addr("in").await))
        .body(Default::default())
        .unwrap();
    assert!(
        client.request(req).await.is_err(),
        "the connection is closed"
    );
    assert_eq!(
        p.metric(
            "trellis_inbound_connections_total{listener=\"in\",security=\"refused_plaintext\"}"
        ),
        1.0
    );
}

/// A server sidecar in strict mutual TLS in front of `app`, whose service port is opaque TCP.
async fn tcp_server_sidecar(ca: &Ca, app: std::net::SocketAddr) -> TestProxy {
    let p = start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: server}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound: [{{name: in, address: 127.0.0.1:0, forwardTo: '{app}', service: app}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 7000, appProtocol: tcp}}]
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

/// The client sidecar's file config: service `app` (opaque TCP) with these endpoints.
fn tcp_client_config(endpoints: &[std::net::SocketAddr]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{address: '{a}', identity: spiffe://mesh.test/ns/default/sa/server}}"))
        .collect();
    format!(
        "{}---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 7000, appProtocol: tcp}}]
  endpoints: [{}]
",
        proxy_yaml("app"),
        eps.join(", ")
    )
}

/// Writes `text` to `path` and waits (bounded) for the watching proxy to apply it.
async fn reload(p: &TestProxy, path: &std::path::Path, text: &str) {
    let before = p.proxy.snapshot().version;
    std::fs::write(path, text).unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while p.proxy.snapshot().version == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the proxy applied the new file");
}

#[tokio::test]
async fn opaque_tcp_follows_endpoints_that_arrive_and_change_after_the_sidecar_started() {
    let ca = Ca::load(&Ca::generate("mesh.test", Duration::from_secs(86400)).unwrap()).unwrap();
    let echo = tcp_server_sidecar(&ca, tcp_echo().await).await;
    let banner = tcp_server_sidecar(&ca, banner_server(b"220 banner ready\r\n").await).await;

    // The client sidecar starts from a file that knows no endpoint yet, and watches it.
    let dir = std::env::temp_dir().join(format!("trellis-tcp-follow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.yaml");
    let text = tcp_client_config(&[]);
    std::fs::write(&file, &text).unwrap();
    let client = start_proxy(&text).await;
    client.proxy.set_identity(creds(&ca, "client"));
    tokio::spawn(trellis_proxy::watch_file(
        client.proxy.clone(),
        file.clone(),
        text.into_bytes(),
        Duration::from_millis(50),
    ));
    let out = client.addr("out").await;
    let read_all = |mut s: tokio::net::TcpStream| async move {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("the connection ends")
            .map(|_| got)
    };
    // No endpoint yet: closed.
    let s = tokio::net::TcpStream::connect(out).await.unwrap();
    assert_eq!(read_all(s).await.unwrap_or_default(), b"");

    // The endpoint arrives by a hot reload: echo, and a half-close that still gets its reply.
    reload(&client, &file, &tcp_client_config(&[echo.addr("in").await])).await;
    let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("echo answered")
        .unwrap();
    assert_eq!(&buf, b"hello");
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_all(s).await.unwrap(), b"last words");

    // The endpoint changes (the old server goes away): new connections go to the new one,
    // whose server speaks first.
    echo.proxy.drain(Duration::from_secs(1)).await;
    reload(
        &client,
        &file,
        &tcp_client_config(&[banner.addr("in").await]),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
    let mut buf = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("the banner arrived")
        .unwrap();
    assert_eq!(&buf, b"220 banner ready\r\n");
    assert_eq!(
        banner.metric("trellis_inbound_connections_total{listener=\"in\",security=\"mtls\"}"),
        1.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
