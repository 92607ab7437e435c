//! TLS for the control channel: the control plane's server certificate comes from the mesh
//! CA; clients (proxies, the CLI) verify it against the trust bundle, or, for a first-time
//! proxy that has only its join token, against the CA fingerprint the token carries (the way
//! `kubeadm join` pins the CA with a discovery hash). Proxies that hold a workload
//! certificate present it as their client certificate, so the control plane takes their
//! identity from the verified handshake, never from a replayable proof.

use crate::Credentials;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, Error, RootCertStore, ServerConfig};
use std::sync::Arc;

/// Prefix of join tokens that carry the CA fingerprint: `trellis1.<sha256-hex>.<secret>`.
pub const TOKEN_PREFIX: &str = "trellis1";

/// SHA-256 of a certificate's DER encoding, lowercase hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    crate::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref()).as_ref())
}

/// The fingerprint of a bundle's first root, the one join tokens pin.
pub fn bundle_fingerprint(bundle_pem: &str) -> Option<String> {
    CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
        .next()?
        .ok()
        .map(|c| fingerprint(&c))
}

/// A join token split into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken<'a> {
    /// The CA fingerprint it pins, when it carries one.
    pub ca_fingerprint: Option<&'a str>,
    /// The secret, the only part the control plane checks (by hash).
    pub secret: &'a str,
}

/// Splits `trellis1.<fingerprint>.<secret>`; a bare secret (older tokens) pins nothing.
pub fn parse_token(token: &str) -> Result<JoinToken<'_>, String> {
    let token = token.trim();
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(TOKEN_PREFIX), Some(fp), Some(secret), None) => {
            if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "join token: the CA fingerprint {fp:?} is not 64 hex digits"
                ));
            }
            if secret.is_empty() {
                return Err("join token: the secret part is empty".into());
            }
            Ok(JoinToken {
                ca_fingerprint: Some(fp),
                secret,
            })
        }
        (Some(secret), None, ..) if !secret.is_empty() => Ok(JoinToken {
            ca_fingerprint: None,
            secret,
        }),
        _ => Err(format!(
            "join token: expected {TOKEN_PREFIX}.<ca-sha256>.<secret> (trellis token create)"
        )),
    }
}

/// Formats a join token.
pub fn format_token(ca_fingerprint: &str, secret: &str) -> String {
    format!("{TOKEN_PREFIX}.{ca_fingerprint}.{secret}")
}

/// How a client decides that it talks to the real control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlTrust {
    /// The chain must end in one of these roots (PEM): `ca.pem`, or the bundle a proxy
    /// received with its certificate.
    Bundle(String),
    /// The chain the server presents must contain a root with this SHA-256 (hex), from a
    /// join token; used only until the proxy holds the bundle.
    Fingerprint(String),
}

/// Why a control-channel TLS config could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ControlTlsError(pub String);

fn roots_of(bundle_pem: &str) -> Result<RootCertStore, ControlTlsError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        let c = c.map_err(|e| ControlTlsError(format!("trust bundle: {e}")))?;
        roots
            .add(c)
            .map_err(|e| ControlTlsError(format!("trust bundle: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ControlTlsError("trust bundle: no certificate in it".into()));
    }
    Ok(roots)
}

/// Client side of the control channel: TLS 1.3, the server verified by `trust` (chain and
/// server name), ALPN `alpn`, and `client` presented as the client certificate when given.
pub fn control_client_config(
    trust: &ControlTrust,
    client: Option<&Arc<Credentials>>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, ControlTlsError> {
    let provider = crate::tls::provider();
    let verifier = Arc::new(ControlVerifier {
        trust: match trust {
            ControlTrust::Bundle(pem) => Anchor::Roots(roots_of(pem)?),
            ControlTrust::Fingerprint(fp) => Anchor::Pinned(fp.to_ascii_lowercase()),
        },
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ControlTlsError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut c = match client {
        Some(creds) => builder.with_client_cert_resolver(creds.client_resolver()),
        None => builder.with_no_client_auth(),
    };
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(c))
}

/// Server side of the control channel: presents `chain_pem`/`key_pem`, and accepts (but does
/// not require) a client certificate that chains to `bundle_pem`. ALPN h2 and http/1.1.
pub fn control_server_config(
    chain_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Result<Arc<ServerConfig>, ControlTlsError> {
    let provider = crate::tls::provider();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ControlTlsError(format!("server certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ControlTlsError(format!("server key: {e}")))?;
    let clients = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots_of(bundle_pem)?),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| ControlTlsError(format!("client verifier: {e}")))?;
    let mut c = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ControlTlsError(e.to_string()))?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .map_err(|e| ControlTlsError(format!("server certificate: {e}")))?;
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

#[derive(Debug)]
enum Anchor {
    Roots(RootCertStore),
    Pinned(String),
}

#[derive(Debug)]
struct ControlVerifier {
    trust: Anchor,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ControlVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let pinned;
        let roots = match &self.trust {
            Anchor::Roots(r) => r,
            Anchor::Pinned(fp) => {
                // The server sends its root along; only a root with the pinned hash anchors.
                let mut r = RootCertStore::empty();
                for c in intermediates.iter().filter(|c| fingerprint(c) == *fp) {
                    let _ = r.add(c.clone().into_owned());
                }
                if r.is_empty() {
                    return Err(Error::General(format!(
                        "the control plane's certificate does not chain to the CA pinned by the join token (sha256 {fp}): not the control plane that issued the token"
                    )));
                }
                pinned = r;
                &pinned
            }
        };
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(|e| match e {
            Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => Error::General(
                "the control plane's certificate is not issued by the trusted mesh CA (wrong --ca-file, or not the real control plane)".into(),
            ),
            e => e,
        })?;
        verify_server_name(&parsed, server_name)?;
        Ok(ServerCertVerified::assertion())
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
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_forms() {
        let fp = "ab".repeat(32);
        let t = format_token(&fp, "s3cret");
        assert_eq!(
            parse_token(&t),
            Ok(JoinToken {
                ca_fingerprint: Some(&fp),
                secret: "s3cret"
            })
        );
        assert_eq!(
            parse_token(" bare \n"),
            Ok(JoinToken {
                ca_fingerprint: None,
                secret: "bare"
            })
        );
        for bad in ["", "trellis1.zz.s", "trellis1..s", "a.b", "trellis1.x.y.z"] {
            assert!(parse_token(bad).is_err(), "{bad:?}");
        }
        assert!(parse_token(&format!("trellis1.{fp}.")).is_err());
    }
}
