//! Flood: 2,000 idle connections to a `trellis proxy` process held to a 1,024 file limit
//! (soft and hard), while a well-behaved client keeps being served with a normal latency.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use support::*;

/// A plain HTTP/1.1 server on a thread per connection: answers `ok` to each request head.
fn ok_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk) else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn idle_connection_flood_under_a_1024_file_limit() {
    let dir = TempDir::new("bounds-flood");
    let upstream = ok_server();
    let (admin, out) = (free_port(), free_port());
    let config = dir.write(
        "proxy.yaml",
        &format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: flood}}
spec:
  admin: {{address: 127.0.0.1:{admin}}}
  outbound:
    - {{name: out, address: 127.0.0.1:{out}, service: {{name: app}}}}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 80}}]
  endpoints: [{{address: \"{upstream}\"}}]
"
        ),
    );
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args([
        "--nofile=1024:1024",
        "--",
        bin(),
        "proxy",
        "--threads",
        "2",
        "--config",
    ])
    .arg(&config);
    let proxy = Proc::spawn("proxy", dir.path(), cmd);
    wait_for(Duration::from_secs(20), "the proxy to be ready", || {
        get(admin, "/ready").ok().filter(|r| r.status == 200)
    });
    assert_eq!(nofile(proxy.pid()), ["1024", "1024"]);
    assert!(
        proxy.log_text().contains("file limit"),
        "{}",
        proxy.log_text()
    );

    // 2,000 connections that never send a byte, held open by the attacker.
    let mut idle = Vec::new();
    let target: SocketAddr = ([127, 0, 0, 1], out).into();
    for _ in 0..2000 {
        if let Ok(s) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            idle.push(s);
        }
    }
    assert!(idle.len() > 1500, "only {} connections opened", idle.len());

    // The well-behaved client: a new connection per request, every one answered promptly.
    let mut took = Vec::new();
    for i in 0..100 {
        let t = Instant::now();
        let r = get(out, "/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        took.push(t.elapsed());
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.body, "ok");
    }
    took.sort();
    let p99 = took[98];
    assert!(p99 < Duration::from_millis(1000), "p99 {p99:?}");

    let metrics = get(admin, "/metrics").unwrap().body;
    let shed: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("trellis_connections_shed_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(shed >= 1000.0, "silent connections shed: {shed}\n{metrics}");
    assert!(
        metrics.contains("trellis_connection_limit_total 384"),
        "{metrics}"
    );
    assert!(!proxy.log_text().contains("panicked"));
    drop(idle);
}

/// The soft and hard file limits of process `pid`.
fn nofile(pid: u32) -> Vec<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .map(String::from)
        .collect()
}

#[test]
fn the_proxy_raises_its_file_limit_to_the_hard_limit() {
    let dir = TempDir::new("bounds-nofile");
    let admin = free_port();
    let config = dir.write(
        "proxy.yaml",
        &format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: nofile}}
spec:
  admin: {{address: 127.0.0.1:{admin}}}
"
        ),
    );
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=512:4096", "--", bin(), "proxy", "--config"])
        .arg(&config);
    let proxy = Proc::spawn("proxy", dir.path(), cmd);
    wait_for(Duration::from_secs(20), "the proxy to be ready", || {
        get(admin, "/ready").ok().filter(|r| r.status == 200)
    });
    assert_eq!(nofile(proxy.pid()), ["4096", "4096"]);
    let log = proxy.log_text();
    assert!(log.contains("file limit") && log.contains("4096"), "{log}");
    // The default caps follow the raised limit: (4096 - 256) / 2.
    let metrics = get(admin, "/metrics").unwrap().body;
    assert!(
        metrics.contains("trellis_connection_limit_total 1920"),
        "{metrics}"
    );
}

/// `trellis control --max-connections`: connections over the cap are closed at once, silent
/// ones at the handshake deadline, and both are counted on the public `/metrics` page.
#[test]
fn the_control_planes_connection_cap_is_counted_in_its_metrics() {
    let dir = TempDir::new("bounds-control-cap");
    let port = free_port();
    let store = dir.path().join("store");
    let cp = ControlPlane::start_with(
        "control",
        dir.path(),
        port,
        store.to_str().unwrap(),
        &["--max-connections", "5", "--handshake-timeout", "1s"],
    );
    // Eight silent connections: five take the five slots, three are over the cap.
    let silent: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Every silent one is closed by the server: at once over the cap, after 1 s otherwise.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    }
    let page = wait_for(Duration::from_secs(10), "the counts on /metrics", || {
        let r = cp.https("GET", "/metrics", "").ok()?;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
            .contains("trellis_control_connections_refused_total{reason=\"handshake_timeout\"} 5")
            .then_some(r.body)
    });
    for line in [
        "trellis_control_connection_limit 5",
        "trellis_control_connections_refused_total{reason=\"limit\"} 3",
        // This scrape's own connection.
        "trellis_control_connections 1",
    ] {
        assert!(page.lines().any(|l| l == line), "no `{line}` in\n{page}");
    }
}

/// A process's `/proc` status field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A gRPC request body that announces a message of 4 MiB − 1 and sends all of it but its
/// last 64 KiB, then waits forever.
struct HalfSent {
    chunks: usize,
}

const HALF_SENT_LEN: usize = (4 << 20) - 1;
const HALF_SENT_CHUNK: usize = 64 << 10;

impl hyper::body::Body for HalfSent {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, tonic::Status>>> {
        let data = match self.chunks {
            0 => {
                let mut first = vec![0u8];
                first.extend_from_slice(&u32::try_from(HALF_SENT_LEN).unwrap().to_be_bytes());
                first
            }
            n if n < HALF_SENT_LEN / HALF_SENT_CHUNK => vec![0x0a_u8; HALF_SENT_CHUNK],
            // Never woken: the request hangs until its task is aborted.
            _ => return std::task::Poll::Pending,
        };
        self.chunks += 1;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data.into()))))
    }
}

/// `streams` gRPC requests to `method` on `channel`, each with a [`HalfSent`] body: what a
/// client that never finishes its messages makes a server hold. They end when aborted.
fn half_sent(
    channel: &tonic::transport::Channel,
    method: &str,
    streams: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    use tonic::codegen::Service;
    (0..streams)
        .map(|_| {
            let mut channel = channel.clone();
            let uri = format!("/trellis.mesh.v1.Mesh/{method}");
            tokio::spawn(async move {
                let body = tonic::body::Body::new(HalfSent { chunks: 0 });
                let request = http::Request::post(uri)
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(body)
                    .unwrap();
                if std::future::poll_fn(|cx| channel.poll_ready(cx))
                    .await
                    .is_ok()
                {
                    let _ = channel.call(request).await;
                }
                std::future::pending::<()>().await;
            })
        })
        .collect()
}

/// Half-sent gRPC messages cannot take the control plane's memory. 300 requests each hold a
/// message of 4 MiB unfinished, first without a certificate (Register and Certify, read
/// before any authentication) and then as an authenticated sidecar (Report): without a bound the
/// control plane buffered all of it, 1.2 GB each time. Now the unauthenticated requests are
/// refused unread and the others wait, unread, for their service's read budget (64 MiB
/// here), so its RSS grows by at most about that; afterwards it serves as before.
#[test]
fn half_sent_grpc_messages_cannot_take_the_control_planes_memory() {
    let dir = TempDir::new("bounds-grpc");
    let store = dir.path().join("store");
    let cp = ControlPlane::start_with(
        "control",
        dir.path(),
        free_port(),
        store.to_str().unwrap(),
        &["--read-budget-mib", "64"],
    );
    let pid = cp.proc.pid();
    let bundle = std::fs::read_to_string(cp.ca()).unwrap();
    let token = token(&cp, "flooder");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let before = status_kib(pid, "VmRSS");
    // The RSS once the flood is held back (or wholly buffered): sampled until it has not grown
    // by a MiB for 2 s (or for 40 s at most).
    let settle = move || {
        let start = Instant::now();
        let mut last = (status_kib(pid, "VmRSS"), Instant::now());
        while start.elapsed() < Duration::from_secs(40) && last.1.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(100));
            let now = status_kib(pid, "VmRSS");
            if now > last.0 + 1024 {
                last = (now, Instant::now());
            }
        }
        last.0
    };
    let url = cp.url();
    let (anonymous, authenticated) = runtime.block_on(async {
        let tls = trellis_proxy::control::ControlTls {
            ca_bundle: Some(bundle.clone()),
            ..Default::default()
        };
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let channel = tls.connect(&url, None, |e| e).await.unwrap();
            tasks.extend(half_sent(&channel, "Register", 100));
            tasks.extend(half_sent(&channel, "Certify", 50));
        }
        let anonymous = tokio::task::spawn_blocking(settle).await.unwrap();
        for t in tasks.drain(..) {
            t.abort();
        }
        // A sidecar's certificate, as `trellis run` gets it.
        let key = trellis_identity::WorkloadKey::generate().unwrap();
        let channel = tls.connect(&url, None, |e| e).await.unwrap();
        let r = trellis_api::wire::mesh_client::MeshClient::new(channel)
            .certify(trellis_api::wire::CertifyRequest {
                token: token.clone(),
                csr_pem: key.csr(None).unwrap(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let creds = trellis_identity::Credentials::new(
            &r.trust_domain,
            &r.chain_pem,
            &key.pem(),
            &r.bundle_pem,
        )
        .unwrap();
        for _ in 0..2 {
            let channel = tls.connect(&url, Some(&creds), |e| e).await.unwrap();
            tasks.extend(half_sent(&channel, "Report", 150));
        }
        let authenticated = tokio::task::spawn_blocking(settle).await.unwrap();
        for t in tasks {
            t.abort();
        }
        (anonymous, authenticated)
    });
    drop(runtime);
    let grown = |peak: u64| (peak.saturating_sub(before)) / 1024;
    eprintln!(
        "control plane RSS {} MiB before; {} MiB under the unauthenticated flood, {} MiB under the authenticated one",
        before / 1024,
        anonymous / 1024,
        authenticated / 1024
    );
    // Refused unread: nothing to hold.
    assert!(
        grown(anonymous) < 32,
        "unauthenticated: +{} MiB",
        grown(anonymous)
    );
    // The 64 MiB budget, what arrived before the reads stopped (the connections' windows, a
    // frame per request) and the allocator's own.
    assert!(
        grown(authenticated) < 120,
        "authenticated: +{} MiB",
        grown(authenticated)
    );
    // Still serving; and a path that is no method is not asked for credentials (the
    // intake covers the proxy protocol's methods only).
    let (code, _, err) = cp.cli(&["get", "services"]);
    assert_eq!(code, 0, "{err}");
    let r = cp.https("GET", "/v1/no-such-thing", "").unwrap();
    assert_ne!(
        r.headers.get("grpc-status").map(String::as_str),
        Some("16"),
        "{:?}",
        r.headers
    );
}
