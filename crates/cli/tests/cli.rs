//! The `trellis` binary end to end: validate, and a standalone proxy that drains on SIGTERM.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::free_port;

fn trellis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn every_example_validates() {
    for dir in ["examples", "docs/examples", "demo"] {
        let path = repo().join(dir);
        if !path.exists() {
            continue;
        }
        // Strict: every route in the examples is accepted with every reference resolved.
        let out = trellis()
            .args(["validate", "--strict", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn validate_reports_file_line_and_field() {
    let dir = std::env::temp_dir().join(format!("trellis-cli-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    let text = std::fs::read_to_string(repo().join("examples/proxy.yaml"))
        .unwrap()
        .replace(
            "name: catalog-v2, port: 8080",
            "name: catalog-v2, port: 8081",
        );
    let line = text.lines().position(|l| l.contains("port: 8081")).unwrap() + 1;
    std::fs::write(&file, text).unwrap();
    let out = trellis()
        .args(["validate", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "bad.yaml:{line}: spec.rules[1].backendRefs[1].port: Service catalog-v2 has no port 8081"
    );
    assert!(err.contains(&want), "want {want} in {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A route whose backend does not exist is valid (the Gateway API accepts it and reports
/// `ResolvedRefs: False`); `validate` prints the condition, and `--strict` fails on it.
#[test]
fn validate_strict_fails_on_a_route_condition_that_is_not_true() {
    let dir = std::env::temp_dir().join(format!("trellis-cli-strict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("routes.yaml");
    let text = "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  ports: [{port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog}
spec:
  parentRefs: [{name: catalog}]
  rules:
    - backendRefs:
        - {name: catalog, port: 8080}
        - {name: catalog-v3, port: 8080}
";
    std::fs::write(&file, text).unwrap();
    let run = |strict: bool| {
        let mut cmd = trellis();
        cmd.args(["validate", "-f"]).arg(&file);
        if strict {
            cmd.arg("--strict");
        }
        cmd.output().unwrap()
    };
    let want = "routes.yaml:15: HTTPRoute default/catalog: ResolvedRefs=False (BackendNotFound): spec.rules[0].backendRefs[1]: Service default/catalog-v3 does not exist";
    let lax = run(false);
    let err = String::from_utf8_lossy(&lax.stderr);
    assert_eq!(lax.status.code(), Some(0), "{err}");
    assert!(err.contains(want), "want {want} in {err}");
    let strict = run(true);
    let err = String::from_utf8_lossy(&strict.stderr);
    assert_eq!(strict.status.code(), Some(1), "{err}");
    assert!(err.contains(want), "want {want} in {err}");
    assert!(
        err.contains("--strict: 1 route condition(s) not True"),
        "{err}"
    );

    // Once the Service exists, --strict passes.
    std::fs::write(
        &file,
        format!(
            "{text}---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: catalog-v3}}\nspec:\n  ports: [{{port: 8080}}]\n"
        ),
    )
    .unwrap();
    let fixed = run(true);
    let out = String::from_utf8_lossy(&fixed.stdout);
    assert_eq!(
        fixed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fixed.stderr)
    );
    assert!(out.contains("1 route(s): every condition True"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn validate_refuses_a_policy_path_that_could_never_match() {
    let dir = std::env::temp_dir().join(format!("trellis-cli-canon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.yaml");
    std::fs::write(
        &file,
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  action: Deny
  rules:
    - to:
        paths:
          - /%61dmin/*
",
    )
    .unwrap();
    let out = trellis()
        .args(["validate", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = "policy.yaml:9: spec.rules[0].to.paths[0]: \"/%61dmin/*\" is not a canonical path";
    assert!(err.contains(want), "want {want} in {err}");
    assert!(err.contains("use \"/admin/*\" instead"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Serves each HTTP/1.1 request after `delay`, one connection at a time per thread.
fn slow_upstream(delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    std::thread::sleep(delay);
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow");
                }
            });
        }
    });
    addr
}

/// Writes `dir/proxy.yaml`: a standalone proxy with its admin and outbound listeners on
/// `ports`, the outbound for Service `up` (one endpoint, `up`), `spec` lines added to the
/// Proxy's spec and `docs` (documents) after the Service.
fn one_upstream_proxy(
    dir: &Path,
    ports: [u16; 2],
    up: SocketAddr,
    spec: &str,
    docs: &str,
) -> PathBuf {
    let [admin, out] = ports;
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: p}}
spec:
  admin: {{address: 127.0.0.1:{admin}}}
{spec}  outbound: [{{name: out, address: 127.0.0.1:{out}, service: {{name: up}}}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: up}}
spec:
  ports: [{{port: 80}}]
  endpoints: [{{address: \"{up}\"}}]
{docs}"
        ),
    )
    .unwrap();
    config
}

/// Runs `cmd` to its end, failing the test if it has not exited within `limit`: a command
/// expected to refuse its input must not hang the suite if it starts serving instead.
fn exits_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn wait_ready(admin: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("proxy exited early: {status}");
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)) {
            let _ = s.write_all(b"GET /ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("proxy not ready");
}

#[test]
fn proxy_drains_in_flight_requests_on_sigterm() {
    let up = slow_upstream(Duration::from_millis(800));
    let (admin, out) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("trellis-cli-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = one_upstream_proxy(&dir, [admin, out], up, "  drainTimeout: 5s\n", "");
    let mut child = trellis()
        .args(["proxy", "--threads", "1", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(admin, &mut child);
    let req = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", out)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: up\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let response = req.join().unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("slow"),
        "{response:?}"
    );
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "proxy did not exit after drain"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_reference_embeds_every_example_verbatim() {
    let doc = std::fs::read_to_string(repo().join("docs/config.md")).unwrap();
    // Every kind has an example (which `every_example_validates` checks).
    let examples: String = std::fs::read_dir(repo().join("docs/examples"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    for kind in trellis_api::Kind::ALL {
        assert!(
            examples.contains(&format!("kind: {kind}\n")),
            "docs/examples has no {kind}"
        );
    }
    for entry in std::fs::read_dir(repo().join("docs/examples")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            doc.contains(text.trim_end()),
            "docs/config.md is out of date with {}",
            path.display()
        );
    }
}

#[test]
fn a_standalone_proxy_honours_the_telemetry_in_its_config() {
    let up = slow_upstream(Duration::ZERO);
    let (admin, out) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("trellis-cli-telemetry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let config = one_upstream_proxy(
        &dir,
        [admin, out],
        up,
        "",
        &format!(
            "---
apiVersion: trellis.dev/v1alpha1
kind: Telemetry
metadata: {{name: logs}}
spec:
  accessLog: {{path: '{}', fields: [status, route, upstream]}}
",
            log.display()
        ),
    );
    let mut child = trellis()
        .args(["proxy", "--threads", "1", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(admin, &mut child);
    let mut s = TcpStream::connect(("127.0.0.1", out)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: up\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().next() {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no access log line");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        line,
        // The selected fields, in the line's documented order.
        format!("{{\"status\":200,\"route\":\"default\",\"upstream\":\"{up}\"}}")
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_proxy_taking_one_readiness_event_per_wait_serves_concurrent_clients() {
    let up = slow_upstream(Duration::ZERO);
    let (admin, out) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("trellis-cli-iobatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = one_upstream_proxy(&dir, [admin, out], up, "", "");
    // Zero is refused, naming the flag.
    let refused = exits_within(
        trellis()
            .args(["proxy", "--io-batch", "0", "--config"])
            .arg(&config),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("--io-batch"),
        "{err}"
    );
    // The smallest batch still serves every client: events left in the kernel come on the
    // next wait.
    let mut child = trellis()
        .args(["proxy", "--threads", "1", "--io-batch", "1", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(admin, &mut child);
    let clients: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", out)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                for _ in 0..5 {
                    s.write_all(b"GET / HTTP/1.1\r\nhost: up\r\n\r\n").unwrap();
                    let mut got = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !got.ends_with(b"slow") {
                        let n = s.read(&mut buf).unwrap();
                        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
                        got.extend_from_slice(&buf[..n]);
                    }
                    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
