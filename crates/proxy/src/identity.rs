//! Getting and keeping a workload certificate: the key is generated here and never leaves;
//! the first certificate comes from a join token, later ones are renewals at two thirds of
//! the lifetime, proven by the current certificate. Certificate and key are persisted so a
//! restarted proxy keeps its identity while the control plane is unreachable.

use crate::Proxy;
use crate::control::Backoff;
use crate::tls::MeshTls;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use trellis_api::wire::{self, mesh_client::MeshClient};
use trellis_identity::{Credentials, WorkloadKey};

/// Why an identity could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The control plane refused (bad or expired token, wrong identity).
    #[error("the control plane refused the certificate request: {0}")]
    Refused(String),
    /// The control plane could not be reached.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// What came back (or was persisted) is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// Where the certificate is kept, and how to get one.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Control-plane replicas.
    pub endpoints: Vec<String>,
    /// TLS for the control channel; its join token gets the first certificate.
    pub tls: crate::control::ControlTls,
    /// Directory for `identity.json` (certificate, key, bundle).
    pub state_dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    trust_domain: String,
    chain_pem: String,
    key_pem: String,
    bundle_pem: String,
    issued_at: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn file(dir: &Path) -> PathBuf {
    dir.join("identity.json")
}

fn persist(dir: &Path, p: &Persisted) -> Result<(), IdentityError> {
    let bytes = serde_json::to_vec(p).map_err(|e| IdentityError::Invalid(e.to_string()))?;
    // The private key: readable by this user only.
    trellis_identity::files::write_private(&file(dir), &bytes)
        .map_err(|e| IdentityError::Invalid(e.to_string()))
}

fn load(dir: &Path) -> Option<Persisted> {
    serde_json::from_slice(&std::fs::read(file(dir)).ok()?).ok()
}

async fn certify(
    cfg: &IdentityConfig,
    creds: Option<&Arc<Credentials>>,
    request: wire::CertifyRequest,
) -> Result<wire::CertifyResponse, IdentityError> {
    let mut last = String::from("no control plane configured");
    for url in &cfg.endpoints {
        let channel = cfg
            .tls
            .connect(url, creds, |e| {
                e.connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(10))
            })
            .await;
        let channel = match channel {
            Ok(c) => c,
            // An impostor (or the wrong CA file): retrying will not change its certificate.
            Err(e) if e.contains("untrusted control plane") => {
                return Err(IdentityError::Refused(e));
            }
            Err(e) => {
                last = e;
                continue;
            }
        };
        match MeshClient::new(channel).certify(request.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                ) =>
            {
                return Err(IdentityError::Refused(s.message().to_string()));
            }
            Err(s) => last = format!("{url}: {}", s.message()),
        }
    }
    Err(IdentityError::Unreachable(last))
}

impl Proxy {
    /// Installs (or replaces) this proxy's workload credentials.
    pub fn set_identity(&self, creds: Arc<Credentials>) {
        self.shared
            .metrics
            .cert_expiry
            .set(i64::try_from(unix(creds.not_after())).unwrap_or(i64::MAX));
        self.shared.mesh.store(Some(Arc::new(MeshTls::new(creds))));
        self.shared.refresh_parties();
    }

    /// This proxy's credentials, once it has an identity.
    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.shared.mesh.load().as_ref().map(|m| m.creds.clone())
    }
}

/// Gets the first certificate (from the persisted one when still valid, else with the join
/// token, retrying with backoff while the control plane is unreachable) and installs it.
/// Returns the persisted key and the certificate's issue time, for [`renew`].
pub async fn bootstrap(
    proxy: &Proxy,
    cfg: &IdentityConfig,
) -> Result<(String, SystemTime), IdentityError> {
    if let Some(p) = load(&cfg.state_dir) {
        let creds = Credentials::new(&p.trust_domain, &p.chain_pem, &p.key_pem, &p.bundle_pem);
        match creds {
            Ok(c) if c.not_after() > SystemTime::now() + Duration::from_secs(5) => {
                tracing::info!(identity = %c.identity(), "identity from the persisted certificate");
                proxy.set_identity(c);
                return Ok((
                    p.key_pem,
                    SystemTime::UNIX_EPOCH + Duration::from_secs(p.issued_at),
                ));
            }
            _ => tracing::info!("persisted certificate expired or unusable; requesting a new one"),
        }
    }
    let token = cfg.tls.token.clone().ok_or_else(|| {
        IdentityError::Refused(
            "no join token (trellis token create) and no valid persisted certificate".into(),
        )
    })?;
    let key = WorkloadKey::generate().map_err(|e| IdentityError::Invalid(e.to_string()))?;
    let csr = key
        .csr(None)
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let response = loop {
        match certify(
            cfg,
            None,
            wire::CertifyRequest {
                token: token.clone(),
                csr_pem: csr.clone(),
                ..Default::default()
            },
        )
        .await
        {
            Ok(r) => break r,
            Err(IdentityError::Unreachable(e)) => {
                let d = backoff.next_delay();
                tracing::warn!(error = %e, "cannot get a certificate yet; retrying in {d:?}");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(e),
        }
    };
    let issued = SystemTime::now();
    install(proxy, cfg, &response, &key.pem(), issued)?;
    Ok((key.pem(), issued))
}

fn install(
    proxy: &Proxy,
    cfg: &IdentityConfig,
    r: &wire::CertifyResponse,
    key_pem: &str,
    issued: SystemTime,
) -> Result<(), IdentityError> {
    let p = Persisted {
        trust_domain: r.trust_domain.clone(),
        chain_pem: r.chain_pem.clone(),
        key_pem: key_pem.to_string(),
        bundle_pem: r.bundle_pem.clone(),
        issued_at: unix(issued),
    };
    match proxy.credentials() {
        // Rotation in place: open connections keep their session, new handshakes use the
        // new certificate.
        Some(c) => {
            c.rotate(&p.chain_pem, &p.key_pem, &p.bundle_pem)
                .map_err(|e| IdentityError::Invalid(e.to_string()))?;
            proxy.set_identity(c);
        }
        None => proxy.set_identity(
            Credentials::new(&p.trust_domain, &p.chain_pem, &p.key_pem, &p.bundle_pem)
                .map_err(|e| IdentityError::Invalid(e.to_string()))?,
        ),
    }
    tracing::info!(identity = %r.spiffe_id, not_after = r.not_after_unix, "certificate installed");
    if let Err(e) = std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| IdentityError::Invalid(e.to_string()))
        .and_then(|()| persist(&cfg.state_dir, &p))
    {
        tracing::warn!(error = %e, "could not persist the certificate");
    }
    Ok(())
}

/// Renews the certificate at two thirds of its lifetime, for as long as the proxy runs.
/// A failed renewal is retried with backoff; an expired certificate falls back to the join
/// token if there is one.
pub async fn renew(
    proxy: Arc<Proxy>,
    cfg: IdentityConfig,
    key_pem: String,
    mut issued: SystemTime,
) {
    let draining = proxy.shared.draining.clone();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let Some(creds) = proxy.credentials() else {
            return;
        };
        let due = trellis_identity::renew_at(issued, creds.not_after());
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            () = draining.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let Ok(key) = rcgen_key(&key_pem) else { return };
        let current = std::fs::read(file(&cfg.state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice::<Persisted>(&b).ok())
            .map(|p| p.chain_pem)
            .unwrap_or_default();
        let expired = creds.not_after() <= SystemTime::now();
        let request = match (&cfg.tls.token, expired || current.is_empty()) {
            (Some(t), true) => wire::CertifyRequest {
                token: t.clone(),
                csr_pem: key.clone(),
                ..Default::default()
            },
            _ => wire::CertifyRequest {
                csr_pem: key.clone(),
                current_chain_pem: current,
                ..Default::default()
            },
        };
        let present = (!expired).then_some(&creds);
        match certify(&cfg, present, request).await {
            Ok(r) => {
                let now = SystemTime::now();
                if install(&proxy, &cfg, &r, &key_pem, now).is_ok() {
                    issued = now;
                    backoff.reset();
                    continue;
                }
            }
            Err(e) => tracing::warn!(error = %e, "certificate renewal failed; retrying"),
        }
        let d = backoff.next_delay();
        tokio::select! {
            () = draining.cancelled() => return,
            () = tokio::time::sleep(d) => {}
        }
    }
}

/// A CSR for the persisted key (renewals keep the key the current certificate holds).
fn rcgen_key(key_pem: &str) -> Result<String, IdentityError> {
    WorkloadKey::from_pem(key_pem)
        .and_then(|k| k.csr(None))
        .map_err(|e| IdentityError::Invalid(e.to_string()))
}

/// Adds this proxy's credentials to a request on the proxy protocol. Over TLS a proxy with
/// a certificate needs nothing here (it is the TLS client certificate); without one it sends
/// its join token (inside TLS). Only on an `--insecure` channel does a proxy with a
/// certificate send a proof in metadata, which anyone on the path could replay.
pub fn authorize<T>(req: &mut tonic::Request<T>, proxy: &Proxy, tls: &crate::control::ControlTls) {
    use tonic::metadata::{BinaryMetadataValue, MetadataValue};
    use trellis_identity::proof_metadata as md;
    let meta = req.metadata_mut();
    if let Some(creds) = proxy.credentials() {
        if !tls.insecure {
            return;
        }
        let now = unix(SystemTime::now());
        if let Some((chain, signature)) = creds.prove(now)
            && let Ok(time) = MetadataValue::try_from(now.to_string())
        {
            meta.insert(md::TIME, time);
            for c in chain {
                meta.append_bin(md::CHAIN, BinaryMetadataValue::from_bytes(c.as_ref()));
            }
            meta.insert_bin(md::SIGNATURE, BinaryMetadataValue::from_bytes(&signature));
            return;
        }
    }
    if let Some(t) = &tls.token
        && let Ok(v) = MetadataValue::try_from(format!("Bearer {}", t.trim()))
    {
        meta.insert("authorization", v);
    }
}
