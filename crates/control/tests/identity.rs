//! The control plane's CA over the real protocol: join tokens decide identities, and every
//! way of asking without the right to is refused.

use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trellis_api::wire::{self, mesh_client::MeshClient};
use trellis_control::store::StoreSpec;
use trellis_control::{Control, Settings};
use trellis_identity::{Credentials, SpiffeId, WorkloadKey};
use trellis_proxy::control::ControlTls;

async fn start() -> (Arc<Control>, String, CancellationToken, std::path::PathBuf) {
    start_with(|_| {}).await
}

/// A control plane serving TLS on a loopback port, with `tune` applied to its settings.
async fn start_with(
    tune: impl FnOnce(&mut Settings),
) -> (Arc<Control>, String, CancellationToken, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "trellis-identity-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut settings = Settings::default();
    settings.identity.trust_domain = "mesh.test".into();
    tune(&mut settings);
    let control = Control::open(&StoreSpec::Dir(dir.clone()), settings)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(trellis_control::serve(
        control.clone(),
        listener,
        stop.clone(),
    ));
    (control, url, stop, dir)
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("mesh.test", "default", sa).unwrap()
}

/// TLS to the control plane, verified with its bundle; `creds` as the client certificate.
fn tls_for(control: &Control) -> ControlTls {
    ControlTls {
        ca_bundle: Some(control.trust().unwrap().1),
        ..ControlTls::default()
    }
}

async fn mesh(
    control: &Control,
    url: &str,
    creds: Option<&Arc<Credentials>>,
) -> MeshClient<tonic::transport::Channel> {
    MeshClient::new(tls_for(control).connect(url, creds, |e| e).await.unwrap())
}

async fn certify_with(
    control: &Control,
    url: &str,
    req: wire::CertifyRequest,
) -> Result<wire::CertifyResponse, tonic::Status> {
    let mut c = mesh(control, url, None).await;
    c.certify(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn tokens_decide_identities_and_everything_else_is_refused() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (control, url, stop, dir) = start().await;
        // Two uses: one certificate below, and registrations while it has uses left.
        let (orders_token, _) = control
            .create_token("default", "orders", Duration::from_secs(3600), 2)
            .await
            .unwrap();
        let key = WorkloadKey::generate().unwrap();

        // The token grants its own identity.
        let ok = certify_with(
            &control,
            &url,
            wire::CertifyRequest {
                token: orders_token.clone(),
                csr_pem: key.csr(None).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(ok.spiffe_id, id("orders").to_string());
        assert_eq!(ok.trust_domain, "mesh.test");
        assert!(ok.bundle_pem.contains("BEGIN CERTIFICATE"));
        assert!(!ok.chain_pem.contains("PRIVATE KEY") && !ok.bundle_pem.contains("PRIVATE KEY"));

        // A token for orders cannot obtain payment's identity.
        let e = certify_with(
            &control,
            &url,
            wire::CertifyRequest {
                token: orders_token.clone(),
                csr_pem: key.csr(Some(&id("payment"))).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("payment"), "{}", e.message());

        // Unknown tokens, no credential at all, and garbage are refused.
        for (req, code) in [
            (
                wire::CertifyRequest {
                    token: "0".repeat(64),
                    csr_pem: key.csr(None).unwrap(),
                    ..Default::default()
                },
                tonic::Code::Unauthenticated,
            ),
            (
                wire::CertifyRequest {
                    csr_pem: key.csr(None).unwrap(),
                    ..Default::default()
                },
                tonic::Code::Unauthenticated,
            ),
            (
                wire::CertifyRequest {
                    token: orders_token.clone(),
                    csr_pem: "not a CSR".into(),
                    ..Default::default()
                },
                tonic::Code::InvalidArgument,
            ),
        ] {
            let e = certify_with(&control, &url, req).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
        }

        // An expired token is refused.
        let (short, _) = control
            .create_token("default", "orders", Duration::from_secs(1), 1)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let e = certify_with(
            &control,
            &url,
            wire::CertifyRequest {
                token: short,
                csr_pem: key.csr(None).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        // Renewal: the current certificate and its key renew it; another key cannot.
        let renewed = certify_with(
            &control,
            &url,
            wire::CertifyRequest {
                csr_pem: key.csr(None).unwrap(),
                current_chain_pem: ok.chain_pem.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(renewed.spiffe_id, id("orders").to_string());
        let thief = WorkloadKey::generate().unwrap();
        let e = certify_with(
            &control,
            &url,
            wire::CertifyRequest {
                csr_pem: thief.csr(None).unwrap(),
                current_chain_pem: ok.chain_pem,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

        // The proxy protocol: nothing without credentials; a token acts only for its service.
        let mut mesh = mesh(&control, &url, None).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(wire::StreamRequest {
            node: Some(wire::Node {
                id: "spy".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let e = mesh
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let instance = |service: &str| wire::RegisterRequest {
            instance: Some(wire::Instance {
                service: service.into(),
                address: "127.0.0.1:1".into(),
                port: 80,
                ..Default::default()
            }),
            ttl_seconds: 5,
        };
        let e = mesh.register(instance("orders")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let with_token = |body| {
            let mut r = tonic::Request::new(body);
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {orders_token}").parse().unwrap(),
            );
            r
        };
        let e = mesh
            .register(with_token(instance("payment")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(mesh.register(with_token(instance("orders"))).await.is_ok());

        // The CA survives a restart: the same root signs after reopening the store.
        let bundle = ok.bundle_pem;
        stop.cancel();
        drop(control);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut settings = Settings::default();
        settings.identity.trust_domain = "mesh.test".into();
        let again = Control::open(&StoreSpec::Dir(dir.clone()), settings)
            .await
            .unwrap();
        assert_eq!(again.trust().unwrap().1, bundle);
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_fleet_starting_at_once_with_one_token_gets_every_certificate() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let (control, url, stop, dir) = start().await;
        let n = 24;
        let (token, _) = control
            .create_token("default", "orders", Duration::from_secs(3600), n)
            .await
            .unwrap();
        let mut fleet = tokio::task::JoinSet::new();
        for _ in 0..n + 2 {
            let (control, url, token) = (control.clone(), url.clone(), token.clone());
            fleet.spawn(async move {
                let key = WorkloadKey::generate().unwrap();
                let req = wire::CertifyRequest {
                    token,
                    csr_pem: key.csr(None).unwrap(),
                    ..Default::default()
                };
                certify_with(&control, &url, req).await
            });
        }
        let (mut ok, mut refused) = (0, Vec::new());
        while let Some(r) = fleet.join_next().await {
            match r.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => refused.push(e.message().to_string()),
            }
        }
        // Exactly the token's uses, however they race; the rest told why.
        assert_eq!(ok, n, "{refused:?}");
        assert_eq!(refused.len(), 2);
        assert!(
            refused.iter().all(|m| m.contains("already used")),
            "{refused:?}"
        );
        stop.cancel();
        let _ = std::fs::remove_dir_all(dir);
    })
    .await
    .unwrap();
}
