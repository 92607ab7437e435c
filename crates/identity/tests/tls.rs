//! Real TLS 1.3 handshakes on loopback between credentials the CA issued, and the ways a
//! peer is refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_identity::{Ca, CaMaterial, Credentials, SpiffeId, WorkloadKey};

const TD: &str = "mesh.test";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "shop", sa).unwrap()
}

/// Credentials for `sa`, issued by `ca` with `ttl` from `now`.
fn issue(ca: &Ca, sa: &str, ttl: Duration, now: SystemTime) -> Arc<Credentials> {
    let key = WorkloadKey::generate().unwrap();
    let issued = ca
        .sign(&key.csr(Some(&id(sa))).unwrap(), &id(sa), ttl, now)
        .unwrap();
    Credentials::new(TD, &issued.chain_pem, &key.pem(), ca.bundle_pem()).unwrap()
}

fn new_ca() -> (CaMaterial, Ca) {
    let m = Ca::generate(TD, Duration::from_secs(86400 * 365)).unwrap();
    let ca = Ca::load(&m).unwrap();
    (m, ca)
}

/// A server that records the client identity it saw and echoes one message per connection.
async fn server(
    creds: Arc<Credentials>,
) -> (
    u16,
    tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = TlsAcceptor::from(creds.server_config());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(s).await {
                    Ok(mut tls) => {
                        let (_, conn) = tls.get_ref();
                        let peer = conn
                            .peer_certificates()
                            .and_then(|c| trellis_identity::inspect(&c[0]))
                            .map(|(id, _)| id.to_string())
                            .unwrap_or_default();
                        let _ = tx.send(Ok(peer));
                        let mut buf = [0u8; 64];
                        while let Ok(n) = tls.read(&mut buf).await {
                            if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    (port, rx)
}

async fn connect(
    creds: &Arc<Credentials>,
    port: u16,
    expect: &SpiffeId,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from(expect.server_name()).unwrap();
    let mut tls = TlsConnector::from(creds.client_config())
        .connect(name, s)
        .await?;
    // TLS 1.3: a client certificate the server refuses surfaces on the first read.
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    Ok(tls)
}

#[tokio::test]
async fn mutual_tls_with_spiffe_identities_and_post_quantum_key_exchange() {
    let (_, ca) = new_ca();
    let now = SystemTime::now();
    let orders = issue(&ca, "orders", Duration::from_secs(3600), now);
    let catalog = issue(&ca, "catalog", Duration::from_secs(3600), now);
    let (port, mut seen) = server(catalog.clone()).await;
    let tls = connect(&orders, port, &id("catalog")).await.unwrap();
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    assert_eq!(conn.alpn_protocol(), Some(trellis_identity::tls::ALPN_MESH));
    assert_eq!(seen.recv().await.unwrap(), Ok(id("orders").to_string()));
}

#[tokio::test]
async fn peers_are_refused_for_the_wrong_identity_expiry_self_signing_or_another_ca() {
    let (_, ca) = new_ca();
    let now = SystemTime::now();
    let orders = issue(&ca, "orders", Duration::from_secs(3600), now);
    let catalog = issue(&ca, "catalog", Duration::from_secs(3600), now);
    let (port, _seen) = server(catalog.clone()).await;

    // The client expected payment; catalog answered.
    let e = connect(&orders, port, &id("payment")).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("expected spiffe://mesh.test/ns/shop/sa/payment"),
        "{e}"
    );

    // An expired server certificate.
    let expired = issue(
        &ca,
        "catalog",
        Duration::from_secs(3600),
        now - Duration::from_secs(7200),
    );
    let (p2, _s2) = server(expired).await;
    let e = connect(&orders, p2, &id("catalog")).await.unwrap_err();
    assert!(e.to_string().to_lowercase().contains("expired"), "{e}");

    // A server certificate from another CA (also how a self-signed one looks: an unknown
    // issuer).
    let (_, other) = new_ca();
    let foreign = issue(&other, "catalog", Duration::from_secs(3600), now);
    let (p3, _s3) = server(foreign.clone()).await;
    let e = connect(&orders, p3, &id("catalog")).await.unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    drop(foreign);

    // A self-signed workload certificate that names a mesh identity.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id("catalog").to_string().as_str().try_into().unwrap(),
    )];
    let selfsigned = params.self_signed(&key).unwrap();
    let creds = Credentials::new(
        TD,
        &selfsigned.pem(),
        &key.serialize_pem(),
        &selfsigned.pem(),
    )
    .unwrap();
    let (p4, _s4) = server(creds).await;
    let e = connect(&orders, p4, &id("catalog")).await.unwrap_err();
    assert!(
        e.to_string().contains("UnknownIssuer") || e.to_string().contains("CaUsedAsEndEntity"),
        "{e}"
    );

    // Clients are checked too: a client whose certificate comes from another CA (while it
    // trusts ours, so it accepts the server) is refused by the server.
    let key = WorkloadKey::generate().unwrap();
    let issued = other
        .sign(
            &key.csr(Some(&id("orders"))).unwrap(),
            &id("orders"),
            Duration::from_secs(3600),
            now,
        )
        .unwrap();
    let both = format!("{}{}", other.bundle_pem(), ca.bundle_pem());
    let intruder = Credentials::new(TD, &issued.chain_pem, &key.pem(), &both).unwrap();
    let (p5, mut s5) = server(catalog.clone()).await;
    assert!(connect(&intruder, p5, &id("catalog")).await.is_err());
    let refused = s5.recv().await.unwrap().unwrap_err();
    assert!(refused.contains("UnknownIssuer"), "{refused}");

    // And a client without any certificate.
    let plain = rustls::ClientConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    let s = TcpStream::connect(("127.0.0.1", p5)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("catalog.shop.trellis").unwrap();
    if let Ok(mut tls) = TlsConnector::from(Arc::new(plain)).connect(name, s).await {
        let _ = tls.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        assert!(tls.read_exact(&mut buf).await.is_err());
    }
    let refused = s5.recv().await.unwrap().unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
}

#[tokio::test]
async fn rotation_keeps_open_connections_and_new_handshakes_see_the_new_certificate() {
    let (_, ca) = new_ca();
    let now = SystemTime::now();
    let orders = issue(&ca, "orders", Duration::from_secs(3600), now);
    let catalog = issue(&ca, "catalog", Duration::from_secs(600), now);
    let before = catalog.not_after();
    let (port, _seen) = server(catalog.clone()).await;
    let mut open = connect(&orders, port, &id("catalog")).await.unwrap();

    let key = WorkloadKey::generate().unwrap();
    let issued = ca
        .sign(
            &key.csr(Some(&id("catalog"))).unwrap(),
            &id("catalog"),
            Duration::from_secs(7200),
            now,
        )
        .unwrap();
    catalog
        .rotate(&issued.chain_pem, &key.pem(), ca.bundle_pem())
        .unwrap();
    assert!(catalog.not_after() > before);

    // The connection made before the rotation still works.
    open.write_all(b"more").await.unwrap();
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"more");
    // A new one gets the new certificate.
    let fresh = connect(&orders, port, &id("catalog")).await.unwrap();
    let leaf = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, not_after) = trellis_identity::inspect(&leaf).unwrap();
    assert_eq!(not_after, catalog.not_after());
}

#[test]
fn the_ca_signs_only_the_allowed_identity_and_only_valid_requests() {
    let (_, ca) = new_ca();
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(Some(&id("payment"))).unwrap();
    let e = ca
        .sign(
            &csr,
            &id("orders"),
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("asks for spiffe://mesh.test/ns/shop/sa/payment"),
        "{e}"
    );
    let e = ca
        .sign(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &id("orders"),
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("invalid certificate signing request"),
        "{e}"
    );
    // The issued certificate carries exactly the identity and the lifetime asked.
    let now = SystemTime::now();
    let issued = ca
        .sign(
            &key.csr(Some(&id("orders"))).unwrap(),
            &id("orders"),
            Duration::from_secs(86400),
            now,
        )
        .unwrap();
    let leaf =
        rustls::pki_types::pem::PemObject::from_pem_slice(issued.chain_pem.as_bytes()).unwrap();
    let (got, not_after) = trellis_identity::inspect(&leaf).unwrap();
    assert_eq!(got, id("orders"));
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(secs(not_after), secs(now + Duration::from_secs(86400)));
}

#[test]
fn an_intermediate_ca_issues_chains_that_verify_against_the_root() {
    // A root, and an intermediate it signs; the mesh CA signs with the intermediate.
    let root_m = Ca::generate(TD, Duration::from_secs(86400 * 3650)).unwrap();
    let root_key = rcgen::KeyPair::from_pem(&root_m.key_pem).unwrap();
    let root_issuer = rcgen::Issuer::from_ca_cert_pem(&root_m.cert_pem, root_key).unwrap();
    let int_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    let int_cert = p.signed_by(&int_key, &root_issuer).unwrap();
    let ca = Ca::load(&CaMaterial {
        cert_pem: int_cert.pem(),
        key_pem: int_key.serialize_pem(),
        chain_pem: String::new(),
        bundle_pem: root_m.cert_pem.clone(),
    })
    .unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = ca
        .sign(
            &key.csr(Some(&id("orders"))).unwrap(),
            &id("orders"),
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(
        issued.chain_pem.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf and intermediate"
    );
    let a = Credentials::new(TD, &issued.chain_pem, &key.pem(), ca.bundle_pem()).unwrap();
    assert_eq!(a.identity(), id("orders"));
}

#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        trellis_identity::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn renewal_needs_the_current_certificate_and_its_key() {
    let (_, ca) = new_ca();
    let now = SystemTime::now();
    let key = WorkloadKey::generate().unwrap();
    let first = ca
        .sign(
            &key.csr(None).unwrap(),
            &id("orders"),
            Duration::from_secs(600),
            now,
        )
        .unwrap();
    // Same key, current certificate: renewed with the same identity.
    let (who, renewed) = ca
        .renew(
            &key.csr(None).unwrap(),
            &first.chain_pem,
            Duration::from_secs(3600),
            now,
        )
        .unwrap();
    assert_eq!(who, id("orders"));
    assert!(renewed.not_after > first.not_after);
    // Another key cannot renew someone else's certificate.
    let thief = WorkloadKey::generate().unwrap();
    let e = ca
        .renew(
            &thief.csr(None).unwrap(),
            &first.chain_pem,
            Duration::from_secs(3600),
            now,
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("not signed with the current certificate's key"),
        "{e}"
    );
    // An expired certificate cannot be renewed.
    let e = ca
        .renew(
            &key.csr(None).unwrap(),
            &first.chain_pem,
            Duration::from_secs(3600),
            now + Duration::from_secs(7200),
        )
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
    // Nor one from another CA.
    let (_, other) = new_ca();
    let foreign = other
        .sign(
            &key.csr(None).unwrap(),
            &id("orders"),
            Duration::from_secs(600),
            now,
        )
        .unwrap();
    assert!(
        ca.renew(
            &key.csr(None).unwrap(),
            &foreign.chain_pem,
            Duration::from_secs(600),
            now
        )
        .is_err()
    );
}

#[test]
fn proofs_of_possession_verify_only_with_the_key_in_time_and_from_this_ca() {
    let (_, ca) = new_ca();
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let orders = issue(&ca, "orders", Duration::from_secs(600), now);
    let (chain, sig) = orders.prove(secs).unwrap();
    assert_eq!(
        ca.verify_proof(&chain, secs, &sig, now).unwrap(),
        id("orders")
    );
    // Another time than the one signed, a stale proof, another key, another CA: refused.
    assert!(ca.verify_proof(&chain, secs + 1, &sig, now).is_err());
    let (old_chain, old_sig) = orders.prove(secs - 600).unwrap();
    let e = ca
        .verify_proof(&old_chain, secs - 600, &old_sig, now)
        .unwrap_err();
    assert!(e.to_string().contains("five minutes"), "{e}");
    let payment = issue(&ca, "payment", Duration::from_secs(600), now);
    let (_, other_sig) = payment.prove(secs).unwrap();
    assert!(ca.verify_proof(&chain, secs, &other_sig, now).is_err());
    let (_, foreign_ca) = new_ca();
    assert!(foreign_ca.verify_proof(&chain, secs, &sig, now).is_err());
}
