//! The control channel: TLS verified against the mesh CA or the fingerprint a join token
//! pins, proxy identity from the TLS client certificate (no replayable proofs), single-use
//! join tokens, secrets at rest, and bounded connections.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trellis_api::wire::{self, mesh_client::MeshClient};
use trellis_control::store::StoreSpec;
use trellis_control::{Control, ProxyStatus, Settings};
use trellis_identity::{Credentials, WorkloadKey};
use trellis_proxy::control::ControlTls;

#[cfg(feature = "etcd")]
#[path = "support/etcd.rs"]
mod etcd;

struct Plane {
    control: Arc<Control>,
    url: String,
    stop: CancellationToken,
    dir: PathBuf,
}

impl Plane {
    /// Stops serving and removes the data directory.
    fn finish(self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "trellis-channel-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ))
}

/// The settings every test's control plane starts from.
fn mesh_settings() -> Settings {
    let mut s = Settings::default();
    s.identity.trust_domain = "mesh.test".into();
    s
}

/// The store at `prefix` on `etcd`.
#[cfg(feature = "etcd")]
fn etcd_spec(etcd: &etcd::Etcd, prefix: &str) -> StoreSpec {
    StoreSpec::Etcd {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: prefix.into(),
    }
}

async fn start(tag: &str, tune: impl FnOnce(&mut Settings)) -> Plane {
    let dir = temp_dir(tag);
    let mut settings = mesh_settings();
    settings.admin_token_file = Some(dir.join("store/admin-token"));
    tune(&mut settings);
    let control = Control::open(&StoreSpec::Dir(dir.join("store")), settings)
        .await
        .unwrap();
    serving(control, dir).await
}

/// `control` serving on a loopback port; `dir` is removed when it finishes.
async fn serving(control: Arc<Control>, dir: PathBuf) -> Plane {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(trellis_control::serve(
        control.clone(),
        listener,
        stop.clone(),
    ));
    Plane {
        control,
        url,
        stop,
        dir,
    }
}

impl Plane {
    fn bundle(&self) -> String {
        self.control.trust().unwrap().1
    }

    fn tls(&self) -> ControlTls {
        ControlTls {
            ca_bundle: Some(self.bundle()),
            ..ControlTls::default()
        }
    }

    async fn client(
        &self,
        creds: Option<&Arc<Credentials>>,
    ) -> MeshClient<tonic::transport::Channel> {
        MeshClient::new(self.tls().connect(&self.url, creds, |e| e).await.unwrap())
    }

    async fn token(&self, service: &str, uses: u32) -> String {
        self.control
            .create_token("default", service, Duration::from_secs(600), uses)
            .await
            .unwrap()
            .0
    }

    /// A certificate for `service` through the protocol, as a proxy gets it.
    async fn credentials(&self, service: &str) -> Arc<Credentials> {
        let key = WorkloadKey::generate().unwrap();
        let r = self
            .client(None)
            .await
            .certify(wire::CertifyRequest {
                token: self.token(service, 1).await,
                csr_pem: key.csr(None).unwrap(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        Credentials::new(&r.trust_domain, &r.chain_pem, &key.pem(), &r.bundle_pem).unwrap()
    }
}

fn register(service: &str) -> wire::RegisterRequest {
    wire::RegisterRequest {
        instance: Some(wire::Instance {
            service: service.into(),
            address: "127.0.0.1:1".into(),
            port: 80,
            ..Default::default()
        }),
        ttl_seconds: 5,
    }
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}

#[tokio::test]
async fn a_captured_proof_replayed_on_a_new_connection_is_refused() {
    bounded(async {
        let cp = start("replay", |_| {}).await;
        let creds = cp.credentials("orders").await;
        // What an observer of the old protocol captured: a signed time and the chain.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (chain, signature) = creds.prove(now).unwrap();
        let mut replayed = tonic::Request::new(register("orders"));
        {
            use tonic::metadata::{BinaryMetadataValue, MetadataValue};
            use trellis_identity::proof_metadata as md;
            let m = replayed.metadata_mut();
            m.insert(md::TIME, MetadataValue::try_from(now.to_string()).unwrap());
            for c in &chain {
                m.append_bin(md::CHAIN, BinaryMetadataValue::from_bytes(c.as_ref()));
            }
            m.insert_bin(md::SIGNATURE, BinaryMetadataValue::from_bytes(&signature));
        }
        // Replayed on a new connection without the key: refused.
        let e = cp.client(None).await.register(replayed).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(
            e.message().contains("client certificate"),
            "{}",
            e.message()
        );
        // The holder of the key proves itself in the handshake, and acts as itself only.
        let mut own = cp.client(Some(&creds)).await;
        assert!(own.register(register("orders")).await.is_ok());
        let e = own.register(register("payment")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        cp.finish();
    })
    .await;
}

#[tokio::test]
async fn join_tokens_are_single_use_unless_created_with_more_uses() {
    bounded(async {
        let cp = start("uses", |_| {}).await;
        let certify = |token: String| {
            let cp = &cp;
            async move {
                let key = WorkloadKey::generate().unwrap();
                cp.client(None)
                    .await
                    .certify(wire::CertifyRequest {
                        token,
                        csr_pem: key.csr(None).unwrap(),
                        ..Default::default()
                    })
                    .await
            }
        };
        let once = cp.token("orders", 1).await;
        assert!(once.starts_with("trellis1."), "{once}");
        assert!(certify(once.clone()).await.is_ok());
        let e = certify(once.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("already used"), "{}", e.message());
        // A spent token authorizes nothing else either.
        let mut r = tonic::Request::new(register("orders"));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {once}").parse().unwrap());
        let e = cp.client(None).await.register(r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        let twice = cp.token("orders", 2).await;
        assert!(certify(twice.clone()).await.is_ok());
        assert!(certify(twice.clone()).await.is_ok());
        assert!(certify(twice).await.is_err());

        // Racing uses of one single-use token: exactly one wins.
        let racy = cp.token("orders", 1).await;
        let results = futures_util::future::join_all((0..6).map(|_| certify(racy.clone()))).await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{results:?}");
        cp.finish();
    })
    .await;
}

#[tokio::test]
async fn an_impostor_control_plane_is_refused_by_fingerprint_and_by_bundle() {
    bounded(async {
        let real = start("real", |_| {}).await;
        let impostor = start("impostor", |_| {}).await;
        let token = real.token("orders", 1).await;
        let pinned = ControlTls {
            token: Some(token.clone()),
            ..ControlTls::default()
        };
        // A first-time proxy with only its token: the impostor's CA is not the pinned one.
        let e = pinned
            .connect(&impostor.url, None, |e| e)
            .await
            .unwrap_err();
        assert!(e.contains("untrusted control plane"), "{e}");
        assert!(e.contains("pinned by the join token"), "{e}");
        // With the real bundle, the same.
        let e = real
            .tls()
            .connect(&impostor.url, None, |e| e)
            .await
            .unwrap_err();
        assert!(e.contains("not issued by the trusted mesh CA"), "{e}");
        // The real control plane passes the pin and hands out the bundle.
        let key = WorkloadKey::generate().unwrap();
        let r = MeshClient::new(pinned.connect(&real.url, None, |e| e).await.unwrap())
            .certify(wire::CertifyRequest {
                token,
                csr_pem: key.csr(None).unwrap(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.bundle_pem, real.bundle());
        // Plaintext needs --insecure on the client side.
        let plain = real.url.replace("https://", "http://");
        let e = real.tls().connect(&plain, None, |e| e).await.unwrap_err();
        assert!(e.contains("--insecure"), "{e}");
        real.finish();
        impostor.finish();
    })
    .await;
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn store_and_key_files_are_owner_only_and_open_ones_are_refused() {
    bounded(async {
        let key_file = temp_dir("cakey").join("ca.key");
        let cp = start("modes", |s| s.identity.key_file = Some(key_file.clone())).await;
        let store = cp.dir.join("store");
        assert_eq!(mode(&store), 0o700);
        assert_eq!(mode(&store.join("trellis.redb")), 0o600);
        assert_eq!(mode(&store.join("admin-token")), 0o600);
        assert_eq!(mode(&key_file), 0o600);
        // The CA key is in its file, not in the store.
        let redb = std::fs::read(store.join("trellis.redb")).unwrap();
        let key = std::fs::read_to_string(&key_file).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        assert!(
            !redb.windows(11).any(|w| w == b"PRIVATE KEY"),
            "the store holds a private key"
        );
        // It still signs (a certificate comes from the key in the file).
        cp.credentials("orders").await;
        let dir = cp.dir.clone();
        cp.stop.cancel();
        drop(cp);
        tokio::time::sleep(Duration::from_millis(300)).await;

        let reopen = |key_file: PathBuf| {
            let dir = dir.clone();
            async move {
                let mut s = mesh_settings();
                s.identity.key_file = Some(key_file);
                s.admin_token_file = Some(dir.join("store/admin-token"));
                Control::open(&StoreSpec::Dir(dir.join("store")), s)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        for (path, open, fix) in [
            (store.join("trellis.redb"), 0o644, "chmod 600"),
            (store.join("admin-token"), 0o640, "chmod 600"),
            (key_file.clone(), 0o644, "chmod 600"),
            (store.clone(), 0o755, "chmod 700"),
        ] {
            let closed = mode(&path);
            set(&path, open);
            let e = reopen(key_file.clone()).await.unwrap_err();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(fix),
                "{path:?}: {e}"
            );
            set(&path, closed);
        }
        reopen(key_file.clone()).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(key_file.parent().unwrap());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_while_a_well_behaved_client_is_served() {
    bounded(async {
        let cp = start("flood", |s| {
            s.limits.handshake_timeout = Duration::from_secs(1);
        })
        .await;
        let addr = cp.url.trim_start_matches("https://").to_string();
        // 500 connections that never speak.
        let mut idle = Vec::new();
        for _ in 0..500 {
            idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        // A well-behaved client is served at once, flood or not.
        let start = tokio::time::Instant::now();
        let creds = cp.credentials("orders").await;
        let mut c = cp.client(Some(&creds)).await;
        c.register(register("orders")).await.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "took {:?}",
            start.elapsed()
        );
        // Every silent connection is closed by the server after the handshake deadline.
        let closed = futures_util::future::join_all(idle.iter_mut().map(|s| async move {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
                Ok(Ok(0) | Err(_))
            )
        }))
        .await;
        let n = closed.iter().filter(|c| **c).count();
        assert_eq!(n, 500, "{n} of 500 idle connections closed");
        // The live connection is untouched: it still works.
        c.register(register("orders")).await.unwrap();
        cp.finish();
    })
    .await;
}

/// Two replicas on one etcd race for the last use of a token: exactly one certificate.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_etcd_never_both_accept_the_last_use_of_a_token() {
    let etcd = etcd::Etcd::start();
    bounded(async {
        let spec = etcd_spec(&etcd, "/token-race/");
        let open = || async { Control::open(&spec, mesh_settings()).await.unwrap() };
        let (a, b) = (open().await, open().await);
        for _ in 0..5 {
            let (token, _) = a
                .create_token("default", "orders", Duration::from_secs(600), 1)
                .await
                .unwrap();
            // Both replicas see the token before the race.
            for _ in 0..100 {
                if b.state().tokens.len() == a.state().tokens.len() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let csr = |_| WorkloadKey::generate().unwrap().csr(None).unwrap();
            let (ca, cb) = (csr(0), csr(1));
            let (ra, rb) = tokio::join!(a.certify(&token, &ca, ""), b.certify(&token, &cb, ""));
            assert_eq!(
                usize::from(ra.is_ok()) + usize::from(rb.is_ok()),
                1,
                "{:?} / {:?}",
                ra.err(),
                rb.err()
            );
        }
    })
    .await;
}

/// The value of one sample line of the control plane's `/metrics` page (0 when absent).
fn sample(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_and_is_counted_in_metrics() {
    bounded(async {
        let cp = start("cap", |s| {
            s.limits.handshake_timeout = Duration::from_secs(1);
            s.limits.max_connections = 20;
        })
        .await;
        let addr = cp.url.trim_start_matches("https://").to_string();
        let mut silent = Vec::new();
        for _ in 0..30 {
            silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        // The 20 admitted wait for their handshake deadline; the 10 over the cap are closed
        // at once. Read the counters once all 30 have been seen by the accept loop.
        let m = &cp.control.metrics;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while m.accepted.get() + refused(m, "limit") < 30 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "accept loop stalled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let page = m.encode();
        assert_eq!(
            sample(&page, "trellis_control_connection_limit"),
            20,
            "{page}"
        );
        assert_eq!(
            sample(
                &page,
                "trellis_control_connections_refused_total{reason=\"limit\"}"
            ),
            10,
            "{page}"
        );
        assert_eq!(sample(&page, "trellis_control_connections"), 20, "{page}");
        // After the handshake deadline the silent ones are gone, counted, and a
        // well-behaved client is served again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while m.open.get() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "silent connections kept"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(refused(m, "handshake_timeout"), 20);
        let creds = cp.credentials("orders").await;
        cp.client(Some(&creds))
            .await
            .register(register("orders"))
            .await
            .unwrap();
        cp.finish();
    })
    .await;
}

fn refused(m: &trellis_control::metrics::Metrics, reason: &'static str) -> u64 {
    m.refused
        .get_or_create(&trellis_control::metrics::RefusedLabels { reason })
        .get()
}

/// One HTTP/1.1 GET over TLS to the plane, with `token` as the bearer if given: (status,
/// body).
async fn https_get(cp: &Plane, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = trellis_identity::control::control_client_config(
        &trellis_identity::ControlTrust::Bundle(cp.bundle()),
        None,
        &[b"http/1.1"],
    )
    .unwrap();
    let addr = cp.url.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // A peer that closes without close_notify: what was read stands.
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of the first series of `page` whose line starts with `series` and a space.
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_metrics_count_pushes_nacks_certificates_and_store_operations() {
    bounded(async {
        let cp = start("metrics", |_| {}).await;
        let m = &cp.control.metrics;
        let page = || m.encode();
        // A join certificate, then its renewal a second later (a later expiry).
        let key = WorkloadKey::generate().unwrap();
        let joined = cp
            .client(None)
            .await
            .certify(wire::CertifyRequest {
                token: cp.token("orders", 1).await,
                csr_pem: key.csr(None).unwrap(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let creds =
            Credentials::new(&joined.trust_domain, &joined.chain_pem, &key.pem(), &joined.bundle_pem)
                .unwrap();
        assert_eq!(
            value(&page(), "trellis_control_certificates_issued_total{kind=\"join\"}"),
            Some(1.0)
        );
        // No proxy connected: no expiry (not a zero an alert would fire on).
        cp.control.refresh_gauges();
        assert!(
            !page().contains("trellis_control_certificate_expiry_timestamp_seconds{"),
            "{}",
            page()
        );
        let ca = value(&page(), "trellis_control_ca_expiry_timestamp_seconds{}").unwrap();
        assert!(ca > joined.not_after_unix as f64, "{ca}");

        // A proxy connects with that certificate: its first update is ACKed.
        let mut client = cp.client(Some(&creds)).await;
        let (tx, mut responses) = config_stream(
            &mut client,
            wire::Node {
                metrics_address: "0.0.0.0:9901".into(),
                ..orders_node()
            },
        )
        .await;
        let first = responses.message().await.unwrap().unwrap();
        tx.send(wire::StreamRequest {
            response_nonce: first.nonce,
            ..Default::default()
        })
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while value(&page(), "trellis_control_config_push_seconds_count") != Some(1.0) {
            assert!(tokio::time::Instant::now() < deadline, "{}", page());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cp.control.refresh_gauges();
        assert_eq!(
            value(&page(), "trellis_control_certificate_expiry_timestamp_seconds{}"),
            Some(joined.not_after_unix as f64)
        );

        // Discovery lists it (at the address it connected from) and the plane itself, to
        // the admin token only.
        let admin = std::fs::read_to_string(cp.dir.join("store/admin-token")).unwrap();
        let (status, _) = https_get(&cp, "/v1/prometheus/targets", None).await;
        assert_eq!(status, 401);
        let (status, _) = https_get(&cp, "/v1/prometheus/targets", Some("wrong")).await;
        assert_eq!(status, 401);
        let (status, body) = https_get(&cp, "/v1/prometheus/targets", Some(admin.trim())).await;
        assert_eq!(status, 200, "{body}");
        let groups: serde_json::Value = serde_json::from_str(&body).unwrap();
        let addr = cp.url.trim_start_matches("https://");
        assert_eq!(groups[0]["targets"][0], "127.0.0.1:9901", "{body}");
        assert_eq!(groups[0]["labels"]["__meta_trellis_proxy_id"], "orders-1");
        assert_eq!(groups[0]["labels"]["__meta_trellis_service"], "orders");
        assert_eq!(groups[0]["labels"]["__meta_trellis_namespace"], "default");
        assert_eq!(groups[1]["targets"][0], addr, "{body}");
        assert_eq!(groups[1]["labels"]["__meta_trellis_kind"], "control");

        // A config change it refuses: counted, and the push latency is not.
        cp.control
            .apply(
                &[trellis_control::SourceFile {
                    name: "catalog.yaml".into(),
                    text: "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata:\n  name: catalog\nspec:\n  ports:\n  - {name: http, port: 80}\n".into(),
                }],
                false,
            )
            .await
            .unwrap();
        let update = responses.message().await.unwrap().unwrap();
        tx.send(wire::StreamRequest {
            response_nonce: update.nonce,
            error: "refused by the test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while value(&page(), "trellis_control_config_nacks_total") != Some(1.0) {
            assert!(tokio::time::Instant::now() < deadline, "{}", page());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            value(&page(), "trellis_control_config_push_seconds_count"),
            Some(1.0)
        );

        // Renewal a second later: counted, and the connected proxy's expiry follows it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let renewed = cp
            .client(Some(&creds))
            .await
            .certify(wire::CertifyRequest {
                csr_pem: key.csr(None).unwrap(),
                current_chain_pem: joined.chain_pem.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(renewed.not_after_unix > joined.not_after_unix);
        cp.control.refresh_gauges();
        assert_eq!(
            value(&page(), "trellis_control_certificates_issued_total{kind=\"renewal\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&page(), "trellis_control_certificate_expiry_timestamp_seconds{}"),
            Some(renewed.not_after_unix as f64)
        );

        // A heartbeat for a lapsed lease: the store says not found.
        let _ = cp
            .client(Some(&creds))
            .await
            .heartbeat(wire::HeartbeatRequest {
                id: "fffff".into(),
                healthy: true,
            })
            .await;
        let page_now = page();
        assert!(
            value(&page_now, "trellis_control_store_operations_total{op=\"commit\",result=\"ok\"}")
                .is_some_and(|v| v >= 3.0),
            "{page_now}"
        );
        assert_eq!(
            value(
                &page_now,
                "trellis_control_store_operations_total{op=\"keep_alive\",result=\"not_found\"}"
            ),
            Some(1.0),
            "{page_now}"
        );

        // The proxy goes: it leaves discovery, and the expiry with it.
        drop(tx);
        drop(responses);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = https_get(&cp, "/v1/prometheus/targets", Some(admin.trim())).await;
            let groups: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
            if groups.len() == 1 {
                assert_eq!(groups[0]["labels"]["__meta_trellis_kind"], "control");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cp.control.refresh_gauges();
        assert!(!page().contains("trellis_control_certificate_expiry_timestamp_seconds{"));
        cp.finish();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_push_latency_runs_from_the_change_even_while_an_update_is_pending() {
    bounded(async {
        let cp = start("push", |_| {}).await;
        let creds = cp.credentials("orders").await;
        let mut client = cp.client(Some(&creds)).await;
        let (tx, mut responses) = config_stream(&mut client, orders_node()).await;
        let first = responses.message().await.unwrap().unwrap();
        // A change while the first update awaits its ACK, which comes 300 ms later; the
        // change's own update is ACKed at once, yet it took 300 ms from the change.
        cp.control
            .apply(
                &[trellis_control::SourceFile {
                    name: "catalog.yaml".into(),
                    text: "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata:\n  name: catalog\nspec:\n  ports:\n  - {name: http, port: 80}\n".into(),
                }],
                false,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ack = |nonce: String| wire::StreamRequest {
            response_nonce: nonce,
            ..Default::default()
        };
        tx.send(ack(first.nonce)).await.unwrap();
        let second = responses.message().await.unwrap().unwrap();
        tx.send(ack(second.nonce)).await.unwrap();
        let page = || cp.control.metrics.encode();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while value(&page(), "trellis_control_config_push_seconds_count") != Some(2.0) {
            assert!(tokio::time::Instant::now() < deadline, "{}", page());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            value(
                &page(),
                "trellis_control_config_push_seconds_bucket{le=\"0.256\"}"
            ),
            Some(0.0),
            "{}",
            page()
        );
        cp.finish();
    })
    .await;
}

/// Opens a report stream as `creds`' proxy claiming `service`, sends one report, and
/// returns the stream's first answer (the active taps) or its refusal.
async fn report_as(
    plane: &Plane,
    creds: &Arc<Credentials>,
    service: &str,
) -> Result<wire::ReportResponse, tonic::Status> {
    let node = wire::Node {
        id: format!("node-{service}"),
        service: service.into(),
        ..Default::default()
    };
    report_node(plane, creds, node).await
}

/// [`report_as`] with the node's hello as given.
async fn report_node(
    plane: &Plane,
    creds: &Arc<Credentials>,
    node: wire::Node,
) -> Result<wire::ReportResponse, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(wire::ReportRequest {
        node: Some(node),
        ..Default::default()
    })
    .await
    .unwrap();
    let series = wire::TrafficSeries {
        direction: "inbound".into(),
        route: "inbound".into(),
        classes: vec![0, 7, 0, 0, 0],
        latency: vec![7],
        ..Default::default()
    };
    tx.send(wire::ReportRequest {
        traffic: Some(wire::TrafficReport {
            interval_ms: 2000,
            series: vec![series],
            latency_bounds: vec![0.001],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut answers = plane
        .client(Some(creds))
        .await
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = answers.message().await?.expect("the taps");
    // Keep the stream open until the control plane has taken the report.
    drop(tx);
    while answers.message().await.ok().flatten().is_some() {}
    Ok(first)
}

#[tokio::test]
async fn a_proxy_reports_only_about_itself() {
    bounded(async {
        let plane = start("report", |_| {}).await;
        let payment = plane.credentials("payment").await;
        // Claiming another service's node is refused.
        let e = report_as(&plane, &payment, "inventory").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // Its own node: the report counts for the service its certificate proves.
        let taps = report_as(&plane, &payment, "payment").await.unwrap();
        assert!(taps.taps.is_empty());
        // A client-only node (no service claimed) still reports as what it proves.
        report_as(&plane, &payment, "").await.unwrap();
        // A node id the control plane would have to keep as a key, megabytes long: refused
        // before anything is kept.
        let huge = wire::Node {
            id: "n".repeat(1 << 20),
            service: "payment".into(),
            ..Default::default()
        };
        let e = report_node(&plane, &payment, huge).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("node id"), "{e:?}");
        let view = plane.control.fleet.view(
            Duration::from_secs(30),
            &trellis_control::fleet::Query::default(),
            tokio::time::Instant::now(),
        );
        let services: Vec<_> = view.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(services, ["payment"], "{view:?}");
        assert_eq!(view.services[0].requests, 14);
        // Without credentials nothing is taken.
        let mut anonymous = plane.client(None).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(tx);
        let e = anonymous
            .report(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        plane.finish();
    })
    .await;
}

/// Waits until `f` holds of the connected proxies (bounded by the test's own limit).
async fn until_proxies(plane: &Plane, f: impl Fn(&[ProxyStatus]) -> bool) -> Vec<ProxyStatus> {
    loop {
        let proxies = plane.control.proxies();
        if f(&proxies) {
            return proxies;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn another_services_proxy_naming_the_same_node_neither_hides_it_nor_takes_its_explains() {
    bounded(async {
        let plane = start("samenode", |_| {}).await;
        let web = plane.credentials("web").await;
        let shop = plane.credentials("shop").await;
        let node = |service: &str| wire::Node {
            id: "web-1".into(),
            service: service.into(),
            ..Default::default()
        };
        let report = |creds: Arc<Credentials>, node: wire::Node| {
            let plane = &plane;
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tx.send(wire::ReportRequest {
                    node: Some(node),
                    ..Default::default()
                })
                .await
                .unwrap();
                let mut answers = plane
                    .client(Some(&creds))
                    .await
                    .report(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                answers.message().await.unwrap().expect("the taps");
                (tx, answers)
            }
        };
        // web's proxy: its config stream and its report stream.
        let mut client = plane.client(Some(&web)).await;
        let _web_config = config_stream(&mut client, node("web")).await;
        let _web_report = report(web.clone(), node("web")).await;
        let listed = until_proxies(&plane, |p| p.iter().any(|p| p.service == "web")).await;
        let web_proxy = listed.iter().find(|p| p.service == "web").unwrap().clone();
        let fleet = &plane.control.fleet;
        for _ in 0..100 {
            if fleet.can_explain(&web_proxy) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(fleet.can_explain(&web_proxy));

        // shop's credentials open a config stream and newer report streams as node web-1,
        // one claiming shop and one claiming no service.
        let mut client = plane.client(Some(&shop)).await;
        let shop_config = config_stream(&mut client, node("shop")).await;
        // Claiming no service, a hello may name any namespace: web's, here.
        let mut bare = node("");
        bare.namespace = "default".into();
        let bare_config = config_stream(&mut client, bare).await;
        let shop_report = report(shop.clone(), node("shop")).await;
        let bare_report = report(shop.clone(), node("")).await;
        let both = until_proxies(&plane, |p| p.len() == 2).await;
        // web's entry, and one for shop's credentials (its later hello replaced its first).
        assert_eq!(
            both.iter().filter(|p| p.service == "web").count(),
            1,
            "both listed: {both:?}"
        );
        assert!(
            fleet.can_explain(&web_proxy),
            "web's own stream still takes web's explains"
        );
        // An explain request for web goes to web's stream, not to the newer ones: shop's
        // streams see nothing (web's stream does not answer here, so it times out).
        let asked = fleet
            .explain(
                &web_proxy,
                wire::ExplainRequest::default(),
                Duration::from_millis(300),
            )
            .await;
        assert!(asked.is_err());
        let (_tx, mut shop_answers) = shop_report;
        let (_tx2, mut bare_answers) = bare_report;
        for answers in [&mut shop_answers, &mut bare_answers] {
            let got = tokio::time::timeout(Duration::from_millis(300), answers.message()).await;
            assert!(got.is_err(), "another service's stream got {got:?}");
        }

        // shop's config streams end: web's entry stays.
        drop(shop_config);
        drop(bare_config);
        let left = until_proxies(&plane, |p| p.len() == 1).await;
        assert_eq!(left[0].service, "web", "{left:?}");
        plane.finish();
    })
    .await;
}

/// The node of an `orders` sidecar that calls `catalog`.
fn orders_node() -> wire::Node {
    wire::Node {
        id: "orders-1".into(),
        service: "orders".into(),
        upstreams: vec!["catalog".into()],
        ..Default::default()
    }
}

/// Opens a config stream that says hello as `node`: the sender for ACKs, and the updates.
async fn config_stream(
    client: &mut MeshClient<tonic::transport::Channel>,
    node: wire::Node,
) -> (
    tokio::sync::mpsc::Sender<wire::StreamRequest>,
    tonic::Streaming<wire::StreamResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(wire::StreamRequest {
        node: Some(node),
        ..Default::default()
    })
    .await
    .unwrap();
    let responses = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

/// A sidecar's quota stream for the Global limit `default/catalog/total` (150 per second,
/// or `rate` as its config would say), as node `node` of `service`: reports `per_interval`
/// units every 250 ms; the receiver holds the latest share.
async fn quota_stream(
    plane: &Plane,
    creds: &Arc<Credentials>,
    (service, node): (&str, &str),
    rate: f64,
    per_interval: u64,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<f64>,
) {
    let client = plane.client(Some(creds)).await;
    let demand = vec![demand("total", "", rate, per_interval)];
    quota_stream_on(client, (service, node), demand).await
}

/// Demand for the limit `limit` of `default/catalog`, from `source` for a perSource limit.
fn demand(limit: &str, source: &str, rate: f64, per_interval: u64) -> wire::QuotaDemand {
    wire::QuotaDemand {
        key: Some(wire::QuotaKey {
            policy: "default/catalog".into(),
            limit: limit.into(),
            source: source.into(),
        }),
        rate,
        demand: per_interval,
    }
}

/// A quota stream on `client` as node `node` of `service`, reporting `demand` every 250 ms;
/// the receiver holds the latest share of its first key.
async fn quota_stream_on(
    mut client: MeshClient<tonic::transport::Channel>,
    (service, node): (&str, &str),
    demand: Vec<wire::QuotaDemand>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<f64>,
) {
    let report = move |node: Option<wire::Node>| wire::QuotaRequest {
        node,
        interval_ms: 250,
        demand: demand.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(report(Some(wire::Node {
        id: node.into(),
        service: service.into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut answers = client
        .quota(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (share_tx, share_rx) = tokio::sync::watch::channel(0.0);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if tx.send(report(None)).await.is_err() {
                        return;
                    }
                }
                a = answers.message() => match a {
                    Ok(Some(a)) => {
                        if let Some(s) = a.shares.first() {
                            share_tx.send_replace(s.rate);
                        }
                    }
                    _ => return,
                },
            }
        }
    });
    (task, share_rx)
}

/// Stores Service `catalog` and its RateLimitPolicy `default/catalog` with the Global limit
/// `total` (150 per second), enforced `direction`.
async fn catalog_limit(control: &Control, direction: &str) {
    let text = format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: catalog}}
spec: {{ports: [{{port: 80}}]}}
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: catalog}}
spec:
  targetRef: {{kind: Service, name: catalog}}
  direction: {direction}
  limits: [{{name: total, rate: 150, scope: Global}}]
"
    );
    control
        .apply(
            &[trellis_control::SourceFile {
                name: "limit.yaml".into(),
                text,
            }],
            false,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_proxy_of_another_service_naming_the_same_node_does_not_take_its_quota_share() {
    bounded(async {
        let plane = start("quotanode", |_| {}).await;
        // Outbound: every caller's sidecar enforces it, so both services may report.
        catalog_limit(&plane.control, "Outbound").await;
        let catalog = plane.credentials("catalog").await;
        let shop = plane.credentials("shop").await;
        // Equal demand as the same node id: two instances, half the limit each. With one
        // record per node id, the later stream replaced the other's and both were sent the
        // whole limit.
        let (_a, mine) = quota_stream(&plane, &catalog, ("catalog", "node-1"), 150.0, 10).await;
        let (_b, theirs) = quota_stream(&plane, &shop, ("shop", "node-1"), 150.0, 10).await;
        halves(&mine, &theirs).await;
        plane.finish();
    })
    .await;
}

/// Waits (bounded) until the two shares are half of the 150 per second each.
async fn halves(a: &tokio::sync::watch::Receiver<f64>, b: &tokio::sync::watch::Receiver<f64>) {
    for _ in 0..200 {
        if (*a.borrow() - 75.0).abs() < 1.0 && (*b.borrow() - 75.0).abs() < 1.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("shares {} and {}, not 75 each", *a.borrow(), *b.borrow());
}

#[tokio::test]
async fn only_an_inbound_limits_own_sidecars_count_and_a_reported_rate_is_the_configs() {
    bounded(async {
        let plane = start("quotaauth", |_| {}).await;
        catalog_limit(&plane.control, "Inbound").await;
        let catalog = plane.credentials("catalog").await;
        let shop = plane.credentials("shop").await;
        // shop's sidecar does not enforce catalog's Inbound limit: its demand, and the tiny
        // rate it claims, count for nothing. Before, the lowest reported rate was the
        // limit's, and this demand took nearly all of it.
        let (_s, theirs) = quota_stream(&plane, &shop, ("shop", "s-1"), 0.001, 1_000_000).await;
        let (_a, one) = quota_stream(&plane, &catalog, ("catalog", "c-1"), 150.0, 10).await;
        // Another catalog instance whose config would say 1 per second: held to the
        // stored 150.
        let (_b, two) = quota_stream(&plane, &catalog, ("catalog", "c-2"), 1.0, 10).await;
        halves(&one, &two).await;
        assert_eq!(*theirs.borrow(), 0.0, "shop's sidecar got a share");
        plane.finish();
    })
    .await;
}

/// Waits (bounded) until the busy and the idle sidecar's shares settle: together the whole
/// limit, most of it to the busy one.
#[cfg(feature = "etcd")]
async fn wait_division(
    busy: &tokio::sync::watch::Receiver<f64>,
    idle: &tokio::sync::watch::Receiver<f64>,
) -> (f64, f64) {
    for _ in 0..200 {
        let (b, i) = (*busy.borrow(), *idle.borrow());
        if (b + i - 150.0).abs() < 0.5 && b > 140.0 && i > 0.0 {
            return (b, i);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "no division of the limit: busy {}, idle {}",
        *busy.borrow(),
        *idle.borrow()
    );
}

/// One file of Services named `names`, each with port 80.
#[cfg(feature = "etcd")]
fn services(names: &[impl AsRef<str>]) -> Vec<trellis_control::SourceFile> {
    let text = names
        .iter()
        .map(|n| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: {}}}\nspec: {{ports: [{{port: 80}}]}}\n",
                n.as_ref()
            )
        })
        .collect::<Vec<_>>()
        .join("---\n");
    vec![trellis_control::SourceFile {
        name: "services.yaml".into(),
        text,
    }]
}

/// A control plane replica serving on a loopback port, on the store `spec`.
#[cfg(feature = "etcd")]
async fn replica(spec: &StoreSpec, tag: &str) -> Plane {
    let control = Control::open(spec, mesh_settings()).await.unwrap();
    serving(control, temp_dir(tag)).await
}

/// A replica writes its sidecars' quota records within etcd's limits (128 operations and
/// 1.5 MiB per transaction unless set): 150 sidecars, and one whose record alone is past
/// 1.5 MiB, all reach the other replica. Before, every record went in one commit, which etcd
/// refused whole every interval, so no other replica counted any of them.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_writes_many_and_large_quota_records_within_etcds_limits() {
    let etcd = etcd::Etcd::start();
    bounded(async {
        let spec = etcd_spec(&etcd, "/quota-many/");
        let a = replica(&spec, "quota-many-a").await;
        let b = replica(&spec, "quota-many-b").await;
        let text = "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec: {ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: catalog}
spec:
  targetRef: {kind: Service, name: catalog}
  direction: Inbound
  limits:
    - {name: total, rate: 150, scope: Global}
    - {name: per-caller, rate: 10, scope: Global, perSource: true}
";
        a.control
            .apply(
                &[trellis_control::SourceFile {
                    name: "limits.yaml".into(),
                    text: text.into(),
                }],
                false,
            )
            .await
            .unwrap();
        let creds = a.credentials("catalog").await;
        let client = a.client(Some(&creds)).await;
        let mut streams = Vec::new();
        for i in 0..150 {
            let node = format!("c-{i}");
            let total = vec![demand("total", "", 150.0, 10)];
            streams.push(quota_stream_on(client.clone(), ("catalog", &node), total).await);
        }
        // 3,000 callers with 600-byte identities: a record of about 2 MB.
        let pad = "x".repeat(560);
        let callers = (0..3000)
            .map(|i| {
                demand(
                    "per-caller",
                    &format!("spiffe://mesh.test/{pad}/{i}"),
                    10.0,
                    i,
                )
            })
            .collect();
        streams.push(quota_stream_on(client.clone(), ("catalog", "busy"), callers).await);
        let want = "trellis_control_quota_instances 151";
        let mut page = String::new();
        for _ in 0..200 {
            page = b.control.metrics.encode();
            if page.contains(want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = page
            .lines()
            .find(|l| l.starts_with("trellis_control_quota_instances "))
            .unwrap_or("none");
        assert!(page.contains(want), "replica b counts {seen}, not 151");
        a.finish();
        b.finish();
    })
    .await;
}

/// A replica compacts etcd's history to the revision of its previous tick, so etcd does not
/// keep every version of every key (quota records are rewritten four times a second) until
/// its backend quota fills; the replica's own watch goes on through compactions.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_compacts_etcds_history_behind_it() {
    let etcd = etcd::Etcd::start();
    bounded(async {
        let spec = etcd_spec(&etcd, "/compaction/");
        let mut s = mesh_settings();
        s.store_compaction = Duration::from_millis(200);
        let control = Control::open(&spec, s).await.unwrap();
        let first = control
            .apply(&services(&["one"]), false)
            .await
            .unwrap()
            .revision;
        // A later revision to compact to: the compacted revision itself stays readable.
        control.apply(&services(&["two"]), false).await.unwrap();
        let mut etcd_client = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
            .await
            .unwrap();
        let old = i64::try_from(first).unwrap();
        let mut compacted = false;
        for _ in 0..100 {
            let read = etcd_client::GetOptions::new().with_revision(old);
            match etcd_client.get("/compaction/", Some(read)).await {
                Err(e) if e.to_string().contains("compacted") => {
                    compacted = true;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("reading etcd: {e}"),
            }
        }
        assert!(compacted, "revision {first} still readable after 5 s");
        // The replica still follows etcd: an apply waits until its own state has it.
        control.apply(&services(&["three"]), false).await.unwrap();
        assert_eq!(control.state().config.len(), 3);
    })
    .await;
}

/// An apply past etcd's 128 operations per transaction is refused whole, saying which limit,
/// and one within it goes through.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_past_etcds_transaction_limit_is_refused_whole_and_says_why() {
    let etcd = etcd::Etcd::start();
    bounded(async {
        let spec = etcd_spec(&etcd, "/apply-many/");
        let plane = replica(&spec, "apply-many").await;
        let named = |n: usize| (0..n).map(|i| format!("s{i}")).collect::<Vec<_>>();
        let err = plane
            .control
            .apply(&services(&named(200)), false)
            .await
            .unwrap_err();
        let trellis_control::WriteError::TooLarge(why) = &err else {
            panic!("expected TooLarge, got {err:?}");
        };
        assert!(
            why.contains("changes 200 resources") && why.contains("--max-txn-ops"),
            "{why}"
        );
        assert_eq!(plane.control.state().config.len(), 0);
        let done = plane
            .control
            .apply(&services(&named(120)), false)
            .await
            .unwrap();
        assert_eq!(done.outcomes.len(), 120);
        plane.finish();
    })
    .await;
}

/// Global rate limits on two replicas of one etcd: sidecars connected to different replicas
/// share one limit (neither replica hands out the whole of it), and a sidecar that moves to
/// the other replica keeps its place.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_etcd_divide_one_global_limit() {
    let etcd = etcd::Etcd::start();
    bounded(async {
        let spec = etcd_spec(&etcd, "/quota/");
        let a = replica(&spec, "quota-a").await;
        let b = replica(&spec, "quota-b").await;
        catalog_limit(&a.control, "Inbound").await;
        let creds = a.credentials("catalog").await;
        // 100 per 250 ms (400 per second) on a, nothing on b.
        let (busy_task, busy) = quota_stream(&a, &creds, ("catalog", "busy"), 150.0, 100).await;
        let (_idle_task, idle) = quota_stream(&b, &creds, ("catalog", "idle"), 150.0, 0).await;
        let (bs, is) = wait_division(&busy, &idle).await;
        // The idle one keeps its floor: half of 10%.
        assert!((is - 7.5).abs() < 0.5, "busy {bs}, idle {is}");

        // The busy sidecar moves to b: b knows both and divides the same way.
        busy_task.abort();
        a.finish();
        let (_busy_task, busy) = quota_stream(&b, &creds, ("catalog", "busy"), 150.0, 100).await;
        wait_division(&busy, &idle).await;
        let page = b.control.metrics.encode();
        assert!(page.contains("trellis_control_quota_instances 2"), "{page}");
        b.finish();
    })
    .await;
}
