//! The mesh certificate authority: a root generated at first start (or a user's root or
//! intermediate) that signs short-lived workload certificates from CSRs, for exactly the
//! identity the caller is allowed.

use crate::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::time::{Duration, SystemTime};

/// Why the CA refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CSR does not parse or its signature does not verify.
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
    /// The CSR asks for an identity other than the one allowed.
    #[error("the request asks for {asked}, but only {allowed} may be issued to this caller")]
    WrongIdentity {
        /// What the CSR named.
        asked: String,
        /// What the caller may have.
        allowed: String,
    },
    /// The CA's own material is unusable.
    #[error("CA material: {0}")]
    Material(String),
    /// A renewal's proof does not hold.
    #[error("renewal refused: {0}")]
    Renewal(String),
}

/// What the CA keeps (in the control plane's store; the key is never served).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaMaterial {
    /// The signing certificate (a root or an intermediate), PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Certificates between the signing certificate and a root, PEM (empty for a root).
    #[serde(default)]
    pub chain_pem: String,
    /// Every trusted root, PEM. Several during a root rotation.
    pub bundle_pem: String,
}

/// A certificate issued to a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The leaf and any intermediates, PEM.
    pub chain_pem: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

/// The control plane's TLS server certificate.
#[derive(Clone, Debug)]
pub struct ServerCert {
    /// Leaf, intermediates and roots, PEM.
    pub chain_pem: String,
    /// The leaf's key, PKCS#8 PEM (kept in memory only).
    pub key_pem: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

/// What issues certificates. [`Ca`] holds its key in memory; a KMS or PKCS#11 backend
/// implements the signing methods with a remote key (rcgen's `SigningKey` is the seam) and
/// keeps the default verification, which needs only the public bundle.
pub trait Signer: Send + Sync {
    /// Signs `csr_pem` for exactly `id` (see [`Ca::sign`]).
    fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError>;

    /// Renews the identity of `current_chain_pem` for a CSR signed with its key (see
    /// [`Ca::renew`]).
    fn renew_csr(
        &self,
        csr_pem: &str,
        current_chain_pem: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(SpiffeId, Issued), CaError>;

    /// Issues the control plane's TLS server certificate (see [`Ca::issue_server`]).
    fn issue_server_cert(
        &self,
        names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<ServerCert, CaError>;

    /// The trust bundle, PEM.
    fn bundle(&self) -> &str;

    /// Checks a workload chain against the bundle (see [`Ca::verify_workload`]).
    fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<SpiffeId, CaError> {
        verify_workload_in(self.bundle(), chain, now)
    }
}

impl Signer for Ca {
    fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        self.sign(csr_pem, id, ttl, now)
    }

    fn renew_csr(
        &self,
        csr_pem: &str,
        current_chain_pem: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(SpiffeId, Issued), CaError> {
        self.renew(csr_pem, current_chain_pem, ttl, now)
    }

    fn issue_server_cert(
        &self,
        names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<ServerCert, CaError> {
        self.issue_server(names, ttl, now)
    }

    fn bundle(&self) -> &str {
        &self.bundle_pem
    }
}

/// Checks that `chain` (leaf first) is a workload certificate that `bundle_pem` trusts,
/// unexpired at `now`; returns its identity.
pub fn verify_workload_in(
    bundle_pem: &str,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<SpiffeId, CaError> {
    let leaf = chain
        .first()
        .ok_or_else(|| CaError::Renewal("no certificate".into()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()).flatten() {
        let _ = roots.add(c);
    }
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)
        .map_err(|e| CaError::Renewal(e.to_string()))?;
    let unix = rustls::pki_types::UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &chain[1..],
        unix,
        crate::tls::provider().signature_verification_algorithms.all,
    )
    .map_err(|e| CaError::Renewal(format!("certificate: {e}")))?;
    crate::inspect(leaf)
        .map(|(id, _)| id)
        .ok_or_else(|| CaError::Renewal("the certificate has no workload identity".into()))
}

/// [`Ca::verify_proof`] against `bundle_pem`.
pub fn verify_proof_in(
    bundle_pem: &str,
    chain: &[CertificateDer<'_>],
    time: u64,
    signature: &[u8],
    now: SystemTime,
) -> Result<SpiffeId, CaError> {
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now_secs.abs_diff(time) > 300 {
        return Err(CaError::Renewal(
            "the proof's time is more than five minutes off".into(),
        ));
    }
    let id = verify_workload_in(bundle_pem, chain, now)?;
    let (_, x509) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| CaError::Renewal(e.to_string()))?;
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        x509.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(crate::proof_message(time).as_bytes(), signature)
        .map_err(|_| CaError::Renewal("the proof's signature does not verify".into()))?;
    Ok(id)
}

/// A loaded CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// What follows a leaf in the chain it is served with: nothing when the CA signs with a
    /// root, else the intermediate and its own chain.
    intermediates_pem: String,
    bundle_pem: String,
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl Ca {
    /// Generates a new root for `trust_domain`, valid for `validity`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<CaMaterial, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Material(e.to_string()))?;
        let mut params = CertificateParams::default();
        // A name of its own per root, so roots side by side in a bundle (during a rotation)
        // are told apart by name before signatures are checked.
        let tag = key
            .public_key_raw()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Trellis root CA for {trust_domain} {:08x}", tag >> 32),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Trellis mesh");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + validity);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Material(e.to_string()))?;
        Ok(CaMaterial {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain_pem: String::new(),
            bundle_pem: cert.pem(),
        })
    }

    /// Loads CA material.
    pub fn load(m: &CaMaterial) -> Result<Ca, CaError> {
        let key =
            KeyPair::from_pem(&m.key_pem).map_err(|e| CaError::Material(format!("key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&m.cert_pem, key)
            .map_err(|e| CaError::Material(format!("certificate: {e}")))?;
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(m.bundle_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| CaError::Material(format!("trust bundle: {e}")))?;
        if roots.is_empty() {
            return Err(CaError::Material(
                "the trust bundle holds no certificate".into(),
            ));
        }
        let signer = CertificateDer::from_pem_slice(m.cert_pem.as_bytes())
            .map_err(|e| CaError::Material(format!("certificate: {e}")))?;
        let intermediates_pem = if roots.contains(&signer) {
            String::new()
        } else {
            format!("{}{}", m.cert_pem, m.chain_pem)
        };
        Ok(Ca {
            issuer,
            intermediates_pem,
            bundle_pem: m.bundle_pem.clone(),
        })
    }

    /// The trust bundle, PEM.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Signs `csr_pem` for `id`, valid for `ttl` from `now`. The CSR's signature proves the
    /// caller holds the key; its requested names must be exactly `id` (or absent), and the
    /// certificate carries `id` only, whatever else the request asked for.
    pub fn sign(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        self.issue(&csr, id, ttl, now)
    }

    /// Renews a workload's certificate: `current_chain_pem` must verify against the trust
    /// bundle and be unexpired, and the CSR must be signed with the same key (so only the
    /// holder of that certificate's key can renew it); the new certificate carries the same
    /// identity.
    pub fn renew(
        &self,
        csr_pem: &str,
        current_chain_pem: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(SpiffeId, Issued), CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(current_chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| CaError::Renewal(format!("current certificate: {e}")))?;
        let id = self.verify_workload(&chain, now)?;
        let leaf = &chain[0];
        let (_, x509) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| CaError::Renewal(e.to_string()))?;
        if x509.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&csr.public_key)
        {
            return Err(CaError::Renewal(
                "the request is not signed with the current certificate's key".into(),
            ));
        }
        let issued = self.issue(&csr, &id, ttl, now)?;
        Ok((id, issued))
    }

    /// Checks that `chain` (leaf first) is a workload certificate this CA's bundle trusts,
    /// unexpired at `now`; returns its identity.
    pub fn verify_workload(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<SpiffeId, CaError> {
        verify_workload_in(&self.bundle_pem, chain, now)
    }

    /// Checks a proof of possession made with [`Credentials::prove`](crate::Credentials::prove):
    /// the chain verifies, the time is within five minutes of `now`, and the signature over
    /// it was made with the leaf's key. Returns the identity.
    pub fn verify_proof(
        &self,
        chain: &[CertificateDer<'_>],
        time: u64,
        signature: &[u8],
        now: SystemTime,
    ) -> Result<SpiffeId, CaError> {
        verify_proof_in(&self.bundle_pem, chain, time, signature, now)
    }

    /// Issues the control plane's own TLS server certificate for `names` (DNS names or IP
    /// addresses), on a fresh key. The chain ends with the bundle's roots, so a client
    /// that pins a root by fingerprint (a join token) finds it in the handshake.
    pub fn issue_server(
        &self,
        names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<ServerCert, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Material(e.to_string()))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Trellis control plane");
        for n in names {
            let san = match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.as_str()
                        .try_into()
                        .map_err(|e: rcgen::Error| CaError::Material(format!("name {n:?}: {e}")))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = offset(now - Duration::from_secs(60));
        let not_after = now + ttl;
        params.not_after = offset(not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Material(e.to_string()))?;
        let mut chain_pem = cert.pem();
        chain_pem.push_str(&self.intermediates_pem);
        chain_pem.push_str(&self.bundle_pem);
        Ok(ServerCert {
            chain_pem,
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    fn issue(
        &self,
        csr: &CertificateSigningRequestParams,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let want = id.to_string();
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            };
            if asked != want {
                return Err(CaError::WrongIdentity {
                    asked,
                    allowed: want,
                });
            }
        }
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, id.service_account.clone());
        params.subject_alt_names =
            vec![SanType::URI(want.as_str().try_into().map_err(
                |e: rcgen::Error| CaError::Material(e.to_string()),
            )?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // A minute of slack for clocks that disagree a little.
        params.not_before = offset(now - Duration::from_secs(60));
        let not_after = now + ttl;
        params.not_after = offset(not_after);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let mut chain_pem = cert.pem();
        chain_pem.push_str(&self.intermediates_pem);
        Ok(Issued {
            chain_pem,
            not_after,
        })
    }
}
