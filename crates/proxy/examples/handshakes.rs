//! New mutual TLS connections per second against a real inbound sidecar (run by
//! `bench/mtls.sh`, not a test). Gets its own certificate from the control plane with a join
//! token, then for DURATION opens CONCURRENCY streams of fresh connections: each one a full
//! TLS 1.3 handshake (X25519MLKEM768) with certificate checks on both sides, one HTTP/1.1
//! request through the sidecar to its app, and close.
//!
//! Usage: handshakes CONTROL_URL TOKEN TARGET_ADDR TARGET_SPIFFE_ID [SECONDS] [CONCURRENCY]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_api::wire::{self, mesh_client::MeshClient};
use trellis_identity::{Credentials, SpiffeId, WorkloadKey};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let usage =
        "usage: handshakes CONTROL_URL TOKEN TARGET_ADDR TARGET_SPIFFE_ID [SECONDS] [CONCURRENCY]";
    let (url, token, target, id) = (
        a.get(1).expect(usage).clone(),
        a.get(2).expect(usage).clone(),
        a.get(3).expect(usage).clone(),
        SpiffeId::parse(a.get(4).expect(usage)).expect("target SPIFFE id"),
    );
    let secs: u64 = a.get(5).map_or(10, |s| s.parse().unwrap());
    let concurrency: usize = a.get(6).map_or(8, |s| s.parse().unwrap());

    let key = WorkloadKey::generate().unwrap();
    let mut client = MeshClient::connect(url).await.expect("control plane");
    let r = client
        .certify(wire::CertifyRequest {
            token,
            csr_pem: key.csr(None).unwrap(),
            ..Default::default()
        })
        .await
        .expect("certificate")
        .into_inner();
    let creds = Credentials::new(&r.trust_domain, &r.chain_pem, &key.pem(), &r.bundle_pem).unwrap();
    let connector = tokio_rustls::TlsConnector::from(creds.client_config());
    let name = rustls::pki_types::ServerName::try_from(id.server_name()).unwrap();

    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (connector, name, target) = (connector.clone(), name.clone(), target.clone());
        let (done, failed, first_error) = (done.clone(), failed.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let attempt = async {
                    let tcp = tokio::net::TcpStream::connect(&target).await?;
                    let _ = tcp.set_nodelay(true);
                    let mut tls = connector.connect(name.clone(), tcp).await?;
                    tls.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
                        .await?;
                    let mut out = Vec::new();
                    tls.read_to_end(&mut out).await?;
                    if out.starts_with(b"HTTP/1.1 200") {
                        Ok(())
                    } else {
                        let head = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
                        Err(std::io::Error::other(format!("answer: {head:?}")))
                    }
                };
                match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                    Ok(Ok(())) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let why = match other {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".into(),
                        };
                        first_error.lock().unwrap().get_or_insert(why);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = first_error.lock().unwrap().as_ref() {
        eprintln!("first failure: {e}");
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "connections {n} failed {} seconds {elapsed:.2} per_second {:.0}",
        failed.load(Ordering::Relaxed),
        n as f64 / elapsed
    );
}
