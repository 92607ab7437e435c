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
