//! The control plane's CA and join tokens. The CA's material lives in the store (so replicas
//! share it) and is never served; tokens are stored as hashes, on a lease that ends with them.

use crate::Control;
use crate::store::{Expect, Op, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use trellis_identity::{Ca, CaError, CaMaterial, Issued, Signer, SpiffeId};

/// Store key of the CA.
pub const CA_KEY: &str = "ca/material";

/// What the store holds for the CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCa {
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Certificate, key, chain and bundle.
    pub material: CaMaterial,
}

/// A join token, as stored (under its hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    /// The namespace of the identity it grants.
    pub namespace: String,
    /// The service (service account) of the identity it grants.
    pub service: String,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Certificates it may still obtain; each use is a compare-and-swap in the store, so
    /// replicas cannot both accept the last one.
    #[serde(default = "one")]
    pub uses: u32,
}

fn one() -> u32 {
    1
}

/// Identity settings of a control plane.
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    /// The trust domain of a CA generated at first start.
    pub trust_domain: String,
    /// Lifetime of workload certificates.
    pub cert_ttl: Duration,
    /// A user-provided root or intermediate, replacing the stored CA.
    pub ca: Option<CaMaterial>,
    /// Keep a generated CA's private key in this file (0600) instead of the store; the
    /// store then holds only the public certificate.
    pub key_file: Option<std::path::PathBuf>,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        IdentitySettings {
            trust_domain: "trellis.local".into(),
            cert_ttl: Duration::from_secs(24 * 3600),
            ca: None,
            key_file: None,
        }
    }
}

/// Why an identity call failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No usable credential was presented.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credential does not allow this.
    #[error("{0}")]
    Denied(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The CA or the store failed.
    #[error("{0}")]
    Unavailable(String),
}

/// The parsed CA, cached for the material it was built from.
#[derive(Default)]
pub(crate) struct CaCache(Mutex<Option<LoadedCa>>);

/// The stored CA and the signer built from it.
type LoadedCa = (Arc<StoredCa>, Arc<dyn Signer>);

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Control {
    /// Makes sure the store holds a CA: the user's, or one generated now (first start).
    /// Replicas starting together agree: only one generated root is stored.
    pub(crate) async fn ensure_ca(&self) -> Result<(), StoreError> {
        let s = &self.settings.identity;
        trellis_identity::check_trust_domain(&s.trust_domain)
            .map_err(|e| StoreError::Backend(format!("--trust-domain: {e}")))?;
        let current = self.state().ca.clone();
        let wanted = match (&s.ca, &current) {
            (Some(m), Some(c)) if c.material == *m && c.trust_domain == s.trust_domain => {
                return Ok(());
            }
            (Some(m), _) => StoredCa {
                trust_domain: s.trust_domain.clone(),
                material: m.clone(),
            },
            (None, Some(c)) => {
                if s.key_file.is_some() && !c.material.key_pem.is_empty() {
                    tracing::warn!(
                        "--ca-key-file is ignored: this store's CA keeps its key in the store (it was created without --ca-key-file)"
                    );
                }
                if c.trust_domain != s.trust_domain {
                    tracing::warn!(stored = %c.trust_domain, flag = %s.trust_domain, "the store's CA belongs to another trust domain; keeping the stored one");
                }
                return Ok(());
            }
            (None, None) => StoredCa {
                trust_domain: s.trust_domain.clone(),
                material: Ca::generate(&s.trust_domain, Duration::from_secs(10 * 365 * 86400))
                    .map_err(|e| StoreError::Backend(e.to_string()))?,
            },
        };
        Ca::load(&wanted.material).map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut wanted = wanted;
        if s.ca.is_none()
            && let Some(f) = &s.key_file
        {
            // The key goes to its own file; the store keeps only the public certificate.
            let key = std::mem::take(&mut wanted.material.key_pem);
            if f.exists() {
                return Err(StoreError::Backend(format!(
                    "--ca-key-file {}: the file exists but the store holds no CA; remove the file or use the store it belongs to",
                    f.display()
                )));
            }
            if let Some(dir) = f.parent()
                && !dir.as_os_str().is_empty()
            {
                trellis_identity::files::private_dir(dir)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
            }
            trellis_identity::files::write_private(f, key.as_bytes())
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            tracing::info!(file = %f.display(), "CA key written outside the store");
        }
        let expect = if s.ca.is_some() {
            Expect::Any
        } else {
            Expect::Absent
        };
        let value = serde_json::to_vec(&wanted).map_err(|e| StoreError::Backend(e.to_string()))?;
        match self
            .store
            .commit(vec![Op::put(CA_KEY, value, expect)])
            .await
        {
            Ok(rev) => {
                tracing::info!(trust_domain = %wanted.trust_domain, "certificate authority stored");
                self.wait_for(rev).await;
                Ok(())
            }
            // Another replica stored its root first: use that one.
            Err(StoreError::Conflict { .. }) => {
                self.wait_newer(self.state().revision).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn ca(&self) -> Result<LoadedCa, IdentityError> {
        let stored = self.state().ca.clone().ok_or_else(|| {
            IdentityError::Unavailable("the certificate authority is not ready".into())
        })?;
        let mut cache = self.ca_cache.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, ca)) = &*cache
            && Arc::ptr_eq(s, &stored)
        {
            return Ok((s.clone(), ca.clone()));
        }
        let ca: Arc<dyn Signer> = Arc::new(if stored.material.key_pem.is_empty() {
            // A CA whose key is kept outside the store (--ca-key-file).
            let f = self.settings.identity.key_file.as_ref().ok_or_else(|| {
                IdentityError::Unavailable(
                    "the store's CA key is kept outside the store: start with --ca-key-file FILE"
                        .into(),
                )
            })?;
            trellis_identity::files::check_private(f)
                .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
            let key_pem = std::fs::read_to_string(f).map_err(|e| {
                IdentityError::Unavailable(format!("--ca-key-file {}: {e}", f.display()))
            })?;
            let mut m = stored.material.clone();
            m.key_pem = key_pem;
            Ca::load(&m).map_err(|e| IdentityError::Unavailable(e.to_string()))?
        } else {
            Ca::load(&stored.material).map_err(|e| IdentityError::Unavailable(e.to_string()))?
        });
        *cache = Some((stored.clone(), ca.clone()));
        Ok((stored, ca))
    }

    /// The trust bundle and trust domain (public).
    pub fn trust(&self) -> Result<(String, String), IdentityError> {
        let (stored, ca) = self.ca()?;
        Ok((stored.trust_domain.clone(), ca.bundle().to_string()))
    }

    /// Creates a join token for one service's identity, valid for `ttl`. Returns the token
    /// (shown once; only its hash is stored) and its expiry.
    pub async fn create_token(
        &self,
        namespace: &str,
        service: &str,
        ttl: Duration,
        uses: u32,
    ) -> Result<(String, u64), IdentityError> {
        let (stored, ca) = self.ca()?;
        if !(1..=10_000).contains(&uses) {
            return Err(IdentityError::Invalid(
                "uses must be between 1 and 10000".into(),
            ));
        }
        SpiffeId::new(&stored.trust_domain, namespace, service)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        if ttl.is_zero() || ttl > Duration::from_secs(366 * 86400) {
            return Err(IdentityError::Invalid(
                "ttl must be between 1s and 366d".into(),
            ));
        }
        let secret = trellis_identity::random_token()
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        let fingerprint = trellis_identity::control::bundle_fingerprint(ca.bundle())
            .ok_or_else(|| IdentityError::Unavailable("the trust bundle is empty".into()))?;
        let token = trellis_identity::control::format_token(&fingerprint, &secret);
        let expires_at = unix(SystemTime::now() + ttl);
        let record = Token {
            namespace: namespace.into(),
            service: service.into(),
            expires_at,
            uses,
        };
        let lease = self
            .store
            .grant(ttl)
            .await
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        let mut op = Op::put(
            format!("tokens/{}", trellis_identity::token_hash(&secret)),
            serde_json::to_vec(&record).map_err(|e| IdentityError::Unavailable(e.to_string()))?,
            Expect::Absent,
        );
        op.lease = Some(lease);
        let rev = self
            .store
            .commit(vec![op])
            .await
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        self.wait_for(rev).await;
        tracing::info!(namespace, service, expires_at, uses, "join token created");
        Ok((token, expires_at))
    }

    /// Issues a certificate for `csr_pem`: the identity a join token grants (spending one of
    /// its uses), or (renewal) the identity of the current certificate, whose key must have
    /// signed the CSR.
    pub async fn certify(
        &self,
        token: &str,
        csr_pem: &str,
        current_chain_pem: &str,
    ) -> Result<(SpiffeId, Issued, String, String), IdentityError> {
        let (stored, ca) = self.ca()?;
        let now = SystemTime::now();
        let ttl = self.settings.identity.cert_ttl;
        let refused = |e: CaError| match e {
            CaError::Csr(m) => IdentityError::Invalid(m),
            CaError::WrongIdentity { .. } | CaError::Renewal(_) => {
                IdentityError::Denied(e.to_string())
            }
            CaError::Material(m) => IdentityError::Unavailable(m),
        };
        let (id, issued) = if !token.is_empty() {
            let secret = secret_of(token)?;
            let t = self.live_token(secret)?.token;
            let id = SpiffeId::new(&stored.trust_domain, &t.namespace, &t.service)
                .map_err(|e| IdentityError::Invalid(e.to_string()))?;
            // Signed before the use is spent, so a bad CSR costs no use.
            let issued = ca.sign_csr(csr_pem, &id, ttl, now).map_err(refused)?;
            self.spend_token(secret).await?;
            (id, issued)
        } else if !current_chain_pem.is_empty() {
            ca.renew_csr(csr_pem, current_chain_pem, ttl, now)
                .map_err(refused)?
        } else {
            return Err(IdentityError::Unauthenticated(
                "a join token (trellis token create) or the current certificate is required".into(),
            ));
        };
        tracing::info!(%id, "certificate issued");
        let kind = if token.is_empty() { "renewal" } else { "join" };
        self.metrics
            .issued
            .get_or_create(&crate::metrics::IssuedLabels { kind })
            .inc();
        if kind == "renewal" {
            self.renewed(&id, current_chain_pem, &issued);
        }
        Ok((
            id,
            issued,
            ca.bundle().to_string(),
            stored.trust_domain.clone(),
        ))
    }

    /// Moves the certificate expiry of connected proxies that held the certificate just
    /// renewed (same identity, same expiry) to the new one: a renewal does not reconnect
    /// the stream, so the handshake's certificate would otherwise look ever closer to expiry.
    fn renewed(&self, id: &SpiffeId, old_chain_pem: &str, issued: &Issued) {
        let Some(old) = trellis_identity::pem_not_after(old_chain_pem) else {
            return;
        };
        let new = issued
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let id = id.to_string();
        let mut proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        for p in proxies.values_mut() {
            if p.certificate.as_ref() == Some(&(id.clone(), old)) {
                p.certificate = Some((id.clone(), new));
            }
        }
    }

    /// The unexpired token with uses left whose secret is `secret`.
    fn live_token(&self, secret: &str) -> Result<crate::state::TokenEntry, IdentityError> {
        let t = self
            .state()
            .tokens
            .get(&trellis_identity::token_hash(secret))
            .cloned()
            .ok_or_else(|| {
                IdentityError::Unauthenticated("unknown or expired join token".into())
            })?;
        if t.token.expires_at <= unix(SystemTime::now()) {
            return Err(IdentityError::Unauthenticated("join token expired".into()));
        }
        if t.token.uses == 0 {
            return Err(IdentityError::Unauthenticated(
                "join token already used (tokens are single-use unless created with --uses N)"
                    .into(),
            ));
        }
        Ok(t)
    }

    /// Spends one use of a token: a compare-and-swap on its stored version, retried when
    /// another writer (another replica) changed it first. Spends on this replica queue.
    async fn spend_token(&self, secret: &str) -> Result<(), IdentityError> {
        let key = format!("tokens/{}", trellis_identity::token_hash(secret));
        let _one_at_a_time = self.token_spends.lock().await;
        for _ in 0..8 {
            let revision = self.state().revision;
            let entry = self.live_token(secret)?;
            let mut record = entry.token.clone();
            record.uses -= 1;
            let mut op = Op::put(
                key.clone(),
                serde_json::to_vec(&record)
                    .map_err(|e| IdentityError::Unavailable(e.to_string()))?,
                Expect::Version(entry.version),
            );
            op.lease = entry.lease;
            match self.store.commit(vec![op]).await {
                Ok(rev) => {
                    self.wait_for(rev).await;
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => self.wait_newer(revision).await,
                Err(e) => return Err(IdentityError::Unavailable(e.to_string())),
            }
        }
        Err(IdentityError::Unavailable(
            "join token busy: too many concurrent uses".into(),
        ))
    }

    /// The control plane's own TLS certificate for `names`, and the trust bundle.
    pub(crate) fn issue_server_cert(
        &self,
        names: &[String],
    ) -> Result<(trellis_identity::ServerCert, String), IdentityError> {
        let (_, ca) = self.ca()?;
        let cert = ca
            .issue_server_cert(names, self.settings.identity.cert_ttl, SystemTime::now())
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        Ok((cert, ca.bundle().to_string()))
    }

    /// Writes the trust bundle to the configured `ca.pem`, for the CLI (public; it lets
    /// clients verify this control plane).
    pub(crate) fn write_ca_file(&self) -> Result<(), StoreError> {
        let Some(path) = &self.settings.ca_file else {
            return Ok(());
        };
        let (_, bundle) = self
            .trust()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        if std::fs::read_to_string(path).ok().as_deref() == Some(bundle.as_str()) {
            return Ok(());
        }
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bundle.as_bytes())?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| StoreError::Backend(format!("writing {}: {e}", path.display())))?;
        tracing::info!(file = %path.display(), "trust bundle written (clients verify the control plane with it: TRELLIS_CA_FILE)");
        Ok(())
    }
}

/// The secret part of a join token, however it was written.
fn secret_of(token: &str) -> Result<&str, IdentityError> {
    trellis_identity::control::parse_token(token)
        .map(|t| t.secret)
        .map_err(IdentityError::Unauthenticated)
}

/// Store key of the admin token's hash.
pub const ADMIN_KEY: &str = "auth/admin";

impl Control {
    /// Makes sure an admin token exists: at first start one is generated, its hash stored
    /// (shared by replicas) and the token itself written to `file` (mode 0600), the only
    /// place it ever appears.
    pub(crate) async fn ensure_admin(&self) -> Result<(), StoreError> {
        if self.state().admin_hash.is_some() {
            if let Some(f) = &self.settings.admin_token_file
                && !f.exists()
            {
                tracing::warn!(file = %f.display(), "an admin token exists in the store but not in this file; use the file of the replica that created it");
            }
            return Ok(());
        }
        let token =
            trellis_identity::random_token().map_err(|e| StoreError::Backend(e.to_string()))?;
        let value = serde_json::json!({ "sha256": trellis_identity::token_hash(&token) });
        match self
            .store
            .commit(vec![Op::put(
                ADMIN_KEY,
                value.to_string().into_bytes(),
                Expect::Absent,
            )])
            .await
        {
            Ok(rev) => {
                self.wait_for(rev).await;
                match &self.settings.admin_token_file {
                    Some(f) => {
                        write_secret(f, &token).map_err(|e| {
                            StoreError::Backend(format!(
                                "writing the admin token to {}: {e}",
                                f.display()
                            ))
                        })?;
                        tracing::info!(file = %f.display(), "admin token created (pass it to the CLI with TRELLIS_ADMIN_TOKEN_FILE)");
                    }
                    None => tracing::warn!(
                        "admin token created but no --admin-token-file to write it to"
                    ),
                }
                Ok(())
            }
            // Another replica created it first.
            Err(StoreError::Conflict { .. }) => {
                self.wait_newer(self.state().revision).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `token` is the admin token.
    pub fn check_admin(&self, token: &str) -> bool {
        self.state().admin_hash.as_deref().is_some_and(|h| {
            constant_time_eq(h.as_bytes(), trellis_identity::token_hash(token).as_bytes())
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn write_secret(path: &std::path::Path, secret: &str) -> Result<(), String> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        trellis_identity::files::private_dir(dir).map_err(|e| e.to_string())?;
    }
    trellis_identity::files::write_private(path, format!("{secret}\n").as_bytes())
        .map_err(|e| e.to_string())
}

pub use trellis_identity::proof_metadata as metadata;

/// Who a proxy is, as authenticated on the proxy protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A join token's holder, before it has a certificate.
    Token {
        /// The token's namespace.
        namespace: String,
        /// The token's service.
        service: String,
    },
    /// A workload proven by its certificate.
    Workload(SpiffeId),
}

impl Principal {
    /// Namespace and service (service account) this principal may act as.
    pub fn service(&self) -> (&str, &str) {
        match self {
            Principal::Token { namespace, service } => (namespace, service),
            Principal::Workload(id) => (&id.namespace, &id.service_account),
        }
    }
}

impl Control {
    /// Authenticates a proxy. Over TLS: the workload certificate it presented as its client
    /// certificate (verified in the handshake, so bound to this connection), or a join token
    /// with uses left. Proofs in metadata are refused over TLS, since they can be replayed;
    /// only an `--insecure` control plane still takes them.
    pub fn authenticate_proxy(
        &self,
        md: &tonic::metadata::MetadataMap,
        peer: Option<&crate::tls::Peer>,
    ) -> Result<Principal, IdentityError> {
        let now = SystemTime::now();
        let tls = peer.is_some_and(|p| p.tls);
        if let Some(certs) = peer.and_then(|p| p.certs.as_ref()) {
            // The handshake verified the chain against the bundle; a connection stays
            // authenticated as what it proved then (renewal does not cut it).
            let (stored, _) = self.ca()?;
            let id = certs
                .first()
                .and_then(trellis_identity::inspect)
                .map(|(id, _)| id)
                .ok_or_else(|| {
                    IdentityError::Unauthenticated(
                        "the client certificate carries no workload identity".into(),
                    )
                })?;
            if id.trust_domain != stored.trust_domain {
                return Err(IdentityError::Unauthenticated(format!(
                    "client certificate {id} is not of trust domain {}",
                    stored.trust_domain
                )));
            }
            return Ok(Principal::Workload(id));
        }
        if let Some(time) = md.get(metadata::TIME) {
            if tls || !self.settings.insecure {
                return Err(IdentityError::Unauthenticated(
                    "proofs in metadata are not accepted over TLS: present the workload certificate as the TLS client certificate".into(),
                ));
            }
            let (_, ca) = self.ca()?;
            let time: u64 = time
                .to_str()
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| IdentityError::Unauthenticated("bad proof time".into()))?;
            let chain: Vec<trellis_identity::CertificateDer<'static>> = md
                .get_all_bin(metadata::CHAIN)
                .iter()
                .filter_map(|v| v.to_bytes().ok())
                .map(|b| trellis_identity::CertificateDer::from(b.to_vec()))
                .collect();
            let signature = md
                .get_bin(metadata::SIGNATURE)
                .and_then(|v| v.to_bytes().ok())
                .ok_or_else(|| {
                    IdentityError::Unauthenticated("proof without a signature".into())
                })?;
            return trellis_identity::ca::verify_proof_in(
                ca.bundle(),
                &chain,
                time,
                &signature,
                now,
            )
            .map(Principal::Workload)
            .map_err(|e| IdentityError::Unauthenticated(e.to_string()));
        }
        let token = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                IdentityError::Unauthenticated(
                    "proxies must present a join token (trellis token create) or their workload certificate".into(),
                )
            })?;
        let t = self.live_token(secret_of(token)?)?.token;
        Ok(Principal::Token {
            namespace: t.namespace,
            service: t.service,
        })
    }
}
