//! Trellis identity: SPIFFE ids, the mesh CA, certificate signing requests, and the rustls
//! configurations for mTLS between sidecars. Used by the control plane (CA) and the proxy
//! (its key, CSR, credentials and TLS configs).
#![forbid(unsafe_code)]

pub mod ca;
pub mod control;
pub mod files;
mod spiffe;
pub mod tls;

pub use ca::{Ca, CaError, CaMaterial, Issued, ServerCert, Signer};
pub use control::{ControlTlsError, ControlTrust};
pub use spiffe::{ParseError, SpiffeId, check_trust_domain};
pub use tls::{CredentialError, Credentials};

pub use rustls::pki_types::CertificateDer;
use std::time::{Duration, SystemTime};

/// A workload's private key, generated locally; it never leaves the process that made it.
pub struct WorkloadKey(rcgen::KeyPair);

/// Why a key or CSR could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

impl WorkloadKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<WorkloadKey, KeyError> {
        rcgen::KeyPair::generate()
            .map(WorkloadKey)
            .map_err(|e| KeyError(e.to_string()))
    }

    /// A key read back from [`WorkloadKey::pem`].
    pub fn from_pem(pem: &str) -> Result<WorkloadKey, KeyError> {
        rcgen::KeyPair::from_pem(pem)
            .map(WorkloadKey)
            .map_err(|e| KeyError(e.to_string()))
    }

    /// The key, PKCS#8 PEM, for this process's TLS configs.
    pub fn pem(&self) -> String {
        self.0.serialize_pem()
    }

    /// A certificate signing request for `id` (or for whatever identity the signer decides,
    /// when `None`), signed with this key (proof of possession).
    pub fn csr(&self, id: Option<&SpiffeId>) -> Result<String, KeyError> {
        let mut params = rcgen::CertificateParams::default();
        if let Some(id) = id {
            params.subject_alt_names = vec![rcgen::SanType::URI(
                id.to_string()
                    .as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| KeyError(e.to_string()))?,
            )];
        }
        params
            .serialize_request(&self.0)
            .and_then(|r| r.pem())
            .map_err(|e| KeyError(e.to_string()))
    }
}

/// A certificate's workload SPIFFE id (its URI SAN) and expiry, if it has one.
pub fn inspect(cert: &CertificateDer<'_>) -> Option<(SpiffeId, SystemTime)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(x509.validity().not_after.timestamp()).ok()?);
    let san = x509.subject_alternative_name().ok()??;
    let id = san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => SpiffeId::parse(u).ok(),
        _ => None,
    })?;
    Some((id, not_after))
}

/// The expiry (Unix seconds) of the first certificate in `pem`, any certificate (a CA's too).
pub fn pem_not_after(pem: &str) -> Option<i64> {
    use rustls::pki_types::pem::PemObject;
    let cert = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let (_, x509) = x509_parser::parse_x509_certificate(&cert).ok()?;
    Some(x509.validity().not_after.timestamp())
}

/// When a certificate valid from `issued` until `not_after` should be renewed: at two thirds
/// of its lifetime.
pub fn renew_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    issued + life * 2 / 3
}

/// A fresh join token: 32 random bytes, hex.
pub fn random_token() -> Result<String, KeyError> {
    let mut buf = [0u8; 32];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| KeyError("no randomness available".into()))?;
    Ok(hex(&buf))
}

/// How a token is stored: its SHA-256, hex, so the store never holds a usable token.
pub fn token_hash(token: &str) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a proof of possession signs: a fixed label and the time, so a proof cannot be reused
/// for anything else, nor for long.
pub fn proof_message(time: u64) -> String {
    format!("trellis-proxy-proof:{time}")
}

/// Metadata keys of a proxy's proof on the proxy protocol.
pub mod proof_metadata {
    /// Each certificate of the chain, DER, leaf first (binary metadata).
    pub const CHAIN: &str = "x-trellis-chain-bin";
    /// The proof's time, Unix seconds.
    pub const TIME: &str = "x-trellis-proof-time";
    /// The signature over the proof message (binary metadata).
    pub const SIGNATURE: &str = "x-trellis-proof-bin";
}
