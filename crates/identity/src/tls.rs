//! rustls configurations for mTLS between sidecars: TLS 1.3 only, aws-lc-rs as the only
//! provider, the hybrid post-quantum group X25519MLKEM768 preferred. Certificates and roots
//! live in [`Credentials`], swapped atomically on rotation, so existing connections are never
//! touched and new handshakes use the new certificate at once.

use crate::SpiffeId;
use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};
use std::sync::Arc;
use std::time::SystemTime;

/// ALPN protocol of a mesh connection carrying HTTP/1.1 or opaque bytes.
pub const ALPN_MESH: &[u8] = b"trellis/1";

/// ALPN protocol of a mesh connection carrying HTTP/2, on which a request may stand for an
/// HTTP/1.1 one (the receiving sidecar sends it on as HTTP/1.1). Offered only for
/// connections meant for HTTP/2; a peer that does not know it answers [`ALPN_MESH`].
pub const ALPN_MESH_H2: &[u8] = b"trellis/h2";

/// Sessions a sidecar keeps for resuming mutual TLS with its peers (one per peer identity,
/// a few tickets each), on either side.
const RESUMPTION_SESSIONS: usize = 1024;

/// Why credentials could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A PEM input is unusable.
    #[error("{what}: {message}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// The parser's message.
        message: String,
    },
    /// The certificate carries no SPIFFE id of the trust domain.
    #[error("the certificate carries no workload SPIFFE id of trust domain {0}")]
    NoIdentity(String),
}

/// The crypto provider: aws-lc-rs, TLS 1.3 suites, X25519MLKEM768 first.
pub fn provider() -> Arc<CryptoProvider> {
    use aws_lc_rs::kx_group::{SECP256R1, X25519, X25519MLKEM768};
    Arc::new(CryptoProvider {
        kx_groups: vec![X25519MLKEM768, X25519, SECP256R1],
        cipher_suites: vec![
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// A workload's certificate, key and trust bundle, replaceable while in use.
pub struct Credentials {
    trust_domain: String,
    certified: ArcSwap<CertifiedKey>,
    identity: ArcSwap<SpiffeId>,
    not_after: ArcSwap<SystemTime>,
    roots: ArcSwap<RootCertStore>,
    bundle_pem: ArcSwap<String>,
    provider: Arc<CryptoProvider>,
    /// Tickets for resuming sessions with peers, shared by every client config, so that an
    /// HTTP/2 connection resumes what an HTTP/1.1 one established and the other way round.
    resumption: Arc<dyn rustls::client::ClientSessionStore>,
    /// Sessions this side issued, shared by every server config.
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({})", self.identity.load())
    }
}

fn pem_err(what: &'static str) -> impl Fn(rustls::pki_types::pem::Error) -> CredentialError {
    move |e| CredentialError::Pem {
        what,
        message: e.to_string(),
    }
}

/// The pieces of one set of credentials, parsed.
struct Parsed {
    certified: CertifiedKey,
    identity: SpiffeId,
    not_after: SystemTime,
    roots: RootCertStore,
}

fn parse(
    trust_domain: &str,
    chain_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
    provider: &CryptoProvider,
) -> Result<Parsed, CredentialError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(pem_err("certificate chain"))?;
    let leaf = chain.first().ok_or(CredentialError::Pem {
        what: "certificate chain",
        message: "no certificate".into(),
    })?;
    let (identity, not_after) = crate::inspect(leaf)
        .filter(|(id, _)| id.trust_domain == trust_domain)
        .ok_or_else(|| CredentialError::NoIdentity(trust_domain.into()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("private key"))?;
    let certified =
        CertifiedKey::from_der(chain, key, provider).map_err(|e| CredentialError::Pem {
            what: "private key",
            message: e.to_string(),
        })?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        let c = c.map_err(pem_err("trust bundle"))?;
        roots.add(c).map_err(|e| CredentialError::Pem {
            what: "trust bundle",
            message: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(CredentialError::Pem {
            what: "trust bundle",
            message: "no certificate".into(),
        });
    }
    Ok(Parsed {
        certified,
        identity,
        not_after,
        roots,
    })
}

impl Credentials {
    /// Credentials from a certificate chain, its key and the trust bundle (all PEM).
    pub fn new(
        trust_domain: &str,
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
    ) -> Result<Arc<Credentials>, CredentialError> {
        let provider = provider();
        let p = parse(trust_domain, chain_pem, key_pem, bundle_pem, &provider)?;
        Ok(Arc::new(Credentials {
            trust_domain: trust_domain.into(),
            certified: ArcSwap::from_pointee(p.certified),
            identity: ArcSwap::from_pointee(p.identity),
            not_after: ArcSwap::from_pointee(p.not_after),
            roots: ArcSwap::from_pointee(p.roots),
            bundle_pem: ArcSwap::from_pointee(bundle_pem.to_string()),
            provider,
            resumption: Arc::new(rustls::client::ClientSessionMemoryCache::new(
                RESUMPTION_SESSIONS,
            )),
            sessions: rustls::server::ServerSessionMemoryCache::new(RESUMPTION_SESSIONS),
        }))
    }

    /// Replaces certificate, key and bundle; connections already open are unaffected.
    pub fn rotate(
        &self,
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
    ) -> Result<(), CredentialError> {
        let p = parse(
            &self.trust_domain,
            chain_pem,
            key_pem,
            bundle_pem,
            &self.provider,
        )?;
        self.roots.store(Arc::new(p.roots));
        self.bundle_pem.store(Arc::new(bundle_pem.to_string()));
        self.certified.store(Arc::new(p.certified));
        self.identity.store(Arc::new(p.identity));
        self.not_after.store(Arc::new(p.not_after));
        Ok(())
    }

    /// A proof that this workload holds its certificate's key, at `time` (Unix seconds): the
    /// certificate chain (DER, leaf first) and a signature over
    /// [`proof_message`](crate::proof_message). The control plane checks it with
    /// [`Ca::verify_proof`](crate::Ca::verify_proof).
    pub fn prove(&self, time: u64) -> Option<(Vec<CertificateDer<'static>>, Vec<u8>)> {
        let certified = self.certified.load();
        let signer = certified
            .key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])?;
        let signature = signer.sign(crate::proof_message(time).as_bytes()).ok()?;
        Some((certified.cert.clone(), signature))
    }

    /// This workload's identity.
    pub fn identity(&self) -> SpiffeId {
        (**self.identity.load()).clone()
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        **self.not_after.load()
    }

    /// The trust bundle, PEM (it also verifies the control plane).
    pub fn bundle_pem(&self) -> String {
        (**self.bundle_pem.load()).clone()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Server side: requires a client certificate from the bundle's CA carrying a workload
    /// SPIFFE id of this trust domain. Offers HTTP/2 ([`ALPN_MESH_H2`]) first.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        self.server_config_with(&[ALPN_MESH_H2, ALPN_MESH])
    }

    /// [`Credentials::server_config`] answering only the given ALPN protocols (a sidecar
    /// that does not speak [`ALPN_MESH_H2`] offers [`ALPN_MESH`] alone).
    pub fn server_config_with(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let mut c = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| unreachable!("TLS 1.3 is supported by aws-lc-rs"))
            .with_client_cert_verifier(Arc::new(PeerVerifier(self.clone())))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        c.session_storage = self.sessions.clone();
        Arc::new(c)
    }

    /// Client side: presents this workload's certificate and checks that the server presents
    /// the identity named by the server name (see [`SpiffeId::server_name`]). ALPN
    /// [`ALPN_MESH`]: HTTP/1.1 or opaque bytes.
    pub fn client_config(self: &Arc<Self>) -> Arc<ClientConfig> {
        self.client_config_with(&[ALPN_MESH])
    }

    /// [`Credentials::client_config`] offering these ALPN protocols, most preferred first
    /// (`[ALPN_MESH_H2, ALPN_MESH]` for a connection meant for HTTP/2 that can fall back).
    pub fn client_config_with(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut c = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| unreachable!("TLS 1.3 is supported by aws-lc-rs"))
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        c.resumption = rustls::client::Resumption::store(self.resumption.clone());
        Arc::new(c)
    }

    /// A resumed session skips certificate verification: it carries the identity the first
    /// handshake proved. This checks that identity's chain again against the current roots
    /// and clock, so a resumed session never outlives its certificate or a trust bundle
    /// that no longer includes its CA. Returns the identity.
    pub fn recheck(&self, chain: &[CertificateDer<'_>]) -> Result<SpiffeId, Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| Error::General("no peer certificate".into()))?;
        self.verify_chain(leaf, intermediates, UnixTime::now())
    }

    /// Presents the current certificate as a client certificate (the control channel).
    pub(crate) fn client_resolver(self: &Arc<Self>) -> Arc<dyn ResolvesClientCert> {
        Arc::new(Resolver(self.clone()))
    }

    fn algorithms(&self) -> WebPkiSupportedAlgorithms {
        self.provider.signature_verification_algorithms
    }

    /// Checks a peer's chain against the current roots and returns its identity.
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let roots = self.roots.load();
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.algorithms().all,
        )?;
        crate::inspect(end_entity)
            .map(|(id, _)| id)
            .filter(|id| id.trust_domain == self.trust_domain)
            .ok_or_else(|| {
                Error::General(format!(
                    "peer certificate carries no workload SPIFFE id of trust domain {}",
                    self.trust_domain
                ))
            })
    }
}

/// Presents the current certificate, on either side.
#[derive(Debug)]
struct Resolver(Arc<Credentials>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified.load_full())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies peers against the current roots and the expected identity.
#[derive(Debug)]
struct PeerVerifier(Arc<Credentials>);

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = self.0.verify_chain(end_entity, intermediates, now)?;
        let expected = match server_name {
            ServerName::DnsName(n) => SpiffeId::from_server_name(n.as_ref(), &self.0.trust_domain),
            _ => None,
        };
        match expected {
            Some(want) if want == id => Ok(ServerCertVerified::assertion()),
            Some(want) => Err(Error::General(format!(
                "server presented {id}, expected {want}"
            ))),
            None => Err(Error::General(format!(
                "server name {server_name:?} names no mesh identity"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms().supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // Mesh certificates carry both server and client authentication usages, so the
        // server-auth chain check applies to clients too.
        self.0.verify_chain(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms().supported_schemes()
    }
}
