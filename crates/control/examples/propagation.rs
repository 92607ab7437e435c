//! Config propagation benchmark (run by `bench/propagation.sh`, not a test).
//!
//! Starts a real `trellis control` process, connects N simulated proxies to it (each its own
//! HTTP/2 connection and delta stream, speaking the real protocol: hello, then an ACK for
//! every response), then applies a route change R times through the config API and measures,
//! per round, the time from the apply returning to each proxy having ACKed the new revision
//! (0 when a proxy ACKed before the apply's answer arrived), and from the apply being sent.
//! Also reports the control plane's RSS per connected proxy.
//!
//! With `tls` as the fourth argument the control plane serves TLS, as in production: each
//! simulated proxy first gets a certificate with a join token (timed apart), then holds its
//! stream over mutual TLS; without it, plaintext (`--insecure`) with the token on the stream.
//! Comparing the two runs gives the control channel's TLS cost.
//!
//! Usage: propagation TRELLIS_BIN [PROXIES] [ROUNDS] [tls]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use trellis_api::wire::{self, mesh_client::MeshClient};
use trellis_identity::{Credentials, WorkloadKey};
use trellis_proxy::control::ControlTls;

type Acks = Arc<Mutex<Vec<(u64, Instant)>>>;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One simulated proxy: its stream's ACK times, by revision.
/// How a simulated proxy reaches the control plane.
#[derive(Clone)]
enum Channel {
    /// Plaintext, authenticated by the join token on the stream.
    Insecure(Arc<str>),
    /// TLS: the server verified against the bundle, the proxy's certificate presented.
    Tls(ControlTls, Arc<Credentials>),
}

async fn proxy(url: String, how: Channel, id: usize, acks: Acks, connected: mpsc::Sender<()>) {
    let channel = match &how {
        Channel::Insecure(_) => ControlTls {
            insecure: true,
            ..ControlTls::default()
        }
        .connect(&url, None, |e| e)
        .await
        .expect("connect"),
        Channel::Tls(tls, creds) => tls
            .connect(&url, Some(creds), |e| e)
            .await
            .expect("connect"),
    };
    let mut client = MeshClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(wire::StreamRequest {
        node: Some(wire::Node {
            id: format!("sim-{id}"),
            namespace: "default".into(),
            upstreams: vec!["product-catalog".into()],
            proxy_version: "bench".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Channel::Insecure(token) = &how {
        // Authenticated like a sidecar before its first certificate: with a join token.
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let mut responses = client.stream(request).await.expect("stream").into_inner();
    let mut first = true;
    while let Ok(Some(r)) = responses.message().await {
        // Parse what a real proxy would, so the work per update is realistic.
        for res in &r.resources {
            trellis_api::Resource::from_json(&res.json).expect("valid resource");
        }
        let revision: u64 = r.system_version.parse().unwrap_or(0);
        tx.send(wire::StreamRequest {
            response_nonce: r.nonce,
            ..Default::default()
        })
        .await
        .unwrap();
        acks.lock().await.push((revision, Instant::now()));
        if first {
            first = false;
            let _ = connected.send(()).await;
        }
    }
}

fn route(weight: u32) -> String {
    format!(
        r#"apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: product-catalog}}
spec:
  ports: [{{port: 80}}]
  endpoints: [{{address: "127.0.0.1:9001"}}, {{address: "127.0.0.1:9002"}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: product-catalog-v2}}
spec:
  ports: [{{port: 80}}]
  endpoints: [{{address: "127.0.0.1:9003"}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: canary}}
spec:
  parentRefs: [{{group: "", kind: Service, name: product-catalog}}]
  rules:
    - backendRefs:
        - {{name: product-catalog, port: 80, weight: {}}}
        - {{name: product-catalog-v2, port: 80, weight: {weight}}}
"#,
        100 - weight
    )
}

/// The config API over one fresh connection (TLS when `tls` is set): the JSON answer.
async fn admin(
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    path: &str,
    token: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let req = http::Request::post(path)
        .header("host", format!("127.0.0.1:{port}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = match tls {
        Some(config) => {
            let name =
                rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .expect("TLS to the control plane");
            send(TokioIo::new(stream), req).await
        }
        None => send(TokioIo::new(tcp), req).await,
    };
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(status.is_success(), "{}", String::from_utf8_lossy(&bytes));
    serde_json::from_slice(&bytes).unwrap()
}

async fn send<T>(io: T, req: http::Request<Full<Bytes>>) -> http::Response<hyper::body::Incoming>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("handshake");
    tokio::spawn(conn);
    tx.send_request(req).await.expect("request")
}

async fn apply(
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    token: &str,
    text: String,
) -> u64 {
    let body = serde_json::json!({"files": [{"name": "canary.yaml", "text": text}]});
    admin(port, tls, "/v1/apply", token, body).await["revision"]
        .as_u64()
        .unwrap()
}

/// A join token good for `uses` certificates.
async fn create_token(
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    admin_token: &str,
    uses: usize,
) -> String {
    let body = serde_json::json!({"service": "bench-proxy", "ttl_seconds": 3600, "uses": uses});
    admin(port, tls, "/v1/tokens", admin_token, body).await["token"]
        .as_str()
        .expect("a token")
        .to_string()
}

/// A certificate for one simulated proxy, obtained with the join token as a sidecar does.
async fn certify(url: String, tls: ControlTls, token: Arc<str>) -> Arc<Credentials> {
    let key = WorkloadKey::generate().unwrap();
    let channel = tls.connect(&url, None, |e| e).await.expect("connect");
    let r = MeshClient::new(channel)
        .certify(wire::CertifyRequest {
            token: token.to_string(),
            csr_pem: key.csr(None).unwrap(),
            ..Default::default()
        })
        .await
        .expect("certify")
        .into_inner();
    Credentials::new(&r.trust_domain, &r.chain_pem, &key.pem(), &r.bundle_pem).unwrap()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .expect("usage: propagation TRELLIS_BIN [PROXIES] [ROUNDS]");
    let n: usize = args.get(2).map_or(1000, |s| s.parse().unwrap());
    let rounds: usize = args.get(3).map_or(20, |s| s.parse().unwrap());
    let tls = args.get(4).is_some_and(|a| a == "tls");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("trellis-propagation-{}", std::process::id()));
    let mut control = std::process::Command::new(bin);
    control.args(["--log", "warn", "control"]);
    if !tls {
        control.arg("--insecure");
    }
    let mut control = control
        .args(["--listen", &format!("127.0.0.1:{port}"), "--store"])
        .arg(&dir)
        .spawn()
        .expect("starting trellis control");
    let url = format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" });
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "control plane did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The admin token `trellis control` wrote into its store directory.
    let token = std::fs::read_to_string(dir.join("admin-token"))
        .expect("admin token")
        .trim()
        .to_string();
    // The trust bundle `trellis control` wrote beside its admin token.
    let bundle = tls.then(|| std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem"));
    let client_tls = bundle.as_ref().map(|b| {
        let trust = trellis_identity::ControlTrust::Bundle(b.clone());
        trellis_identity::control::control_client_config(&trust, None, &[b"http/1.1"]).unwrap()
    });
    let client_tls = client_tls.as_ref();
    apply(port, client_tls, &token, route(0)).await;
    let join: Arc<str> = create_token(port, client_tls, &token, n).await.into();
    let channels: Vec<Channel> = match &bundle {
        None => vec![Channel::Insecure(join); n],
        Some(b) => {
            let tls = ControlTls {
                ca_bundle: Some(b.clone()),
                ..ControlTls::default()
            };
            let start = Instant::now();
            // A join token serves a few certifications at a time (its uses are counted with
            // compare-and-swap): eight at once, as a fleet starting up would.
            let mut creds = Vec::with_capacity(n);
            for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
                let mut tasks = tokio::task::JoinSet::new();
                for _ in chunk {
                    tasks.spawn(certify(url.clone(), tls.clone(), join.clone()));
                }
                creds.extend(tasks.join_all().await);
            }
            println!(
                "{n} proxies got their certificates in {:?}",
                start.elapsed()
            );
            creds
                .into_iter()
                .map(|c| Channel::Tls(tls.clone(), c))
                .collect()
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(control.id());

    let (ctx, mut crx) = mpsc::channel(n);
    let mut all = Vec::new();
    let start = Instant::now();
    for (i, how) in channels.into_iter().enumerate() {
        let acks: Acks = Arc::default();
        all.push(acks.clone());
        tokio::spawn(proxy(url.clone(), how, i, acks, ctx.clone()));
    }
    for _ in 0..n {
        crx.recv().await;
    }
    println!(
        "{n} proxies connected and ACKed their first view in {:?}",
        start.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(control.id());

    let mut per_proxy = Vec::new();
    let mut per_round = Vec::new();
    let mut from_sent = Vec::new();
    for round in 0..rounds {
        let weight = [10, 20][round % 2];
        let sent = Instant::now();
        let revision = apply(port, client_tls, &token, route(weight)).await;
        let returned = Instant::now();
        // Wait (bounded) until every proxy ACKed `revision`.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut times = Vec::with_capacity(n);
        for acks in &all {
            loop {
                let found = acks
                    .lock()
                    .await
                    .iter()
                    .find(|(r, _)| *r >= revision)
                    .map(|(_, t)| *t);
                if let Some(t) = found {
                    times.push(t.saturating_duration_since(returned));
                    from_sent.push(t.saturating_duration_since(sent));
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: not every proxy ACKed"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        times.sort();
        let all_acked = *times.last().unwrap();
        println!(
            "round {round:2}: apply took {:?}; all {n} ACKed {:?} after it returned (p50 {:?})",
            returned - sent,
            all_acked,
            percentile(&times, 0.5)
        );
        per_round.push(all_acked);
        per_proxy.extend(times);
        for acks in &all {
            acks.lock().await.clear();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    per_round.sort();
    per_proxy.sort();
    from_sent.sort();
    println!(
        "\nproxies: {n}, rounds: {rounds}, channel: {}",
        if tls {
            "mutual TLS"
        } else {
            "plaintext (--insecure)"
        }
    );
    println!(
        "per proxy, apply returned -> ACK: p50 {:?}  p99 {:?}  max {:?}",
        percentile(&per_proxy, 0.5),
        percentile(&per_proxy, 0.99),
        per_proxy.last().unwrap()
    );
    println!(
        "per proxy, apply sent -> ACK (includes the durable commit): p50 {:?}  p99 {:?}  max {:?}",
        percentile(&from_sent, 0.5),
        percentile(&from_sent, 0.99),
        from_sent.last().unwrap()
    );
    println!(
        "per round, apply returned -> every proxy ACKed: p50 {:?}  p99 {:?}  max {:?}",
        percentile(&per_round, 0.5),
        percentile(&per_round, 0.99),
        per_round.last().unwrap()
    );
    println!(
        "control-plane RSS: {} KiB before, {} KiB with {n} proxies: {:.1} KiB per proxy",
        rss_before,
        rss_after,
        (rss_after.saturating_sub(rss_before)) as f64 / n as f64
    );
    let _ = control.kill();
    let _ = control.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
