//! Access logs end to end: a proxy with a `Telemetry` writes one JSON line per request with
//! the trace id, route, upstream, timings, status, reason flag, peer identity and policy; the
//! field selection and per-service switch apply; a reload moves the log and a path that
//! cannot be opened is refused whole; a pipe nobody reads costs dropped, counted lines, never
//! a slower request.

mod support;

use http::Request;
use http_body_util::Full;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trellis-accesslog-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn telemetry(name: &str, service: Option<&str>, access_log: &str) -> String {
    let service = service.map_or(String::new(), |s| format!("\n  service: {s}"));
    format!(
        "---
apiVersion: trellis.dev/v1alpha1
kind: Telemetry
metadata: {{name: {name}}}
spec:{service}
  accessLog: {access_log}
"
    )
}

/// The JSON lines of `path` once there are `n` (at most 10 s).
fn lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let got: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} lines: {text}",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn lines_carry_the_request_and_what_the_proxy_decided() {
    let dir = temp_dir("fields");
    let log = dir.join("access.log");
    let app = upstream("app").await;
    // An inbound proxy with an authorization policy, logging everything.
    let p = start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: test}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound:
    - {{name: in, address: 127.0.0.1:0, forwardTo: '{}', service: app}}
{}---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin}}
spec:
  targetRef: {{kind: Service, name: app}}
  action: Deny
  rules:
    - to: {{paths: [/admin/*]}}
---
apiVersion: trellis.dev/v1alpha1
kind: Telemetry
metadata: {{name: mesh}}
spec:
  tracing: {{collector: 'http://127.0.0.1:9', samplingPercent: 0}}
  accessLog: {{path: '{}'}}
",
        app.addr,
        service_yaml("app", 80, &[]),
        log.display()
    ))
    .await;
    let addr = p.addr("in").await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = Request::post(format!("http://{addr}/orders?card=secret"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-00"))
        .body(Full::from("12345"))
        .unwrap();
    assert_eq!(send(&h1_client(), req).await.status, 200);
    assert_eq!(get(addr, "/admin/x").await.status, 403);
    let got = lines(&log, 2);
    let ok = &got[0];
    assert_eq!(ok["trace_id"], trace);
    assert_eq!(ok["span_id"].as_str().unwrap().len(), 16);
    assert_eq!(ok["direction"], "inbound");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["path"], "/orders", "never the query");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["route"], "inbound");
    assert_eq!(ok["upstream"], app.addr.to_string());
    assert_eq!(ok["request_bytes"], 5);
    assert!(ok["response_bytes"].as_u64().unwrap() > 0);
    assert_eq!(ok["policy"], "default", "allowed by the default");
    assert!(ok.get("reason").is_none());
    let (up, total) = (
        ok["upstream_ms"].as_f64().unwrap(),
        ok["duration_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < up && up <= total, "{up} {total}");
    assert!(ok["start_time"].as_str().unwrap().ends_with('Z'));
    let denied = &got[1];
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["reason"], "denied");
    assert_eq!(denied["policy"], "default/no-admin");
    assert!(denied.get("upstream").is_none() && denied.get("upstream_ms").is_none());
    // No identity without mutual TLS; the field is left out.
    assert!(ok.get("peer_identity").is_none());
    assert_eq!(
        p.metric("trellis_access_log_lines_total{result=\"written\"}"),
        2.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn hostile_paths_and_hosts_stay_one_parseable_line() {
    let dir = temp_dir("hostile");
    let log = dir.join("access.log");
    let app = upstream("app").await;
    let p = start_proxy(&format!(
        "{}{}{}",
        proxy_yaml("app"),
        service_yaml("app", 80, &[app.addr]),
        telemetry("mesh", None, &format!("{{path: '{}'}}", log.display()))
    ))
    .await;
    let addr = p.addr("out").await;
    // A quote and a backslash are legal in a path; a Host header may carry a quote and bytes
    // that are not UTF-8.
    let req = Request::get(format!("http://{addr}/q\"\\x/{{}}?s=1"))
        .header(
            "host",
            http::HeaderValue::from_bytes(b"caf\xe9\"},x").unwrap(),
        )
        .body(Full::default())
        .unwrap();
    // The proxy refuses it (400), and logs it as sent.
    assert_eq!(send(&h1_client(), req).await.status, 400);
    let got = lines(&log, 1);
    assert_eq!(got[0]["path"], "/q\"\\x/{}");
    assert_eq!(got[0]["authority"], "caf\u{fffd}\"},x");
    assert_eq!(got[0]["status"], 400);
    assert_eq!(got[0]["reason"], "bad_request");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn selected_fields_only_and_off_per_service() {
    let dir = temp_dir("select");
    let (mesh_log, quiet_log) = (dir.join("mesh.log"), dir.join("quiet.log"));
    let app = upstream("app").await;
    // The mesh logs two fields; service `quiet`'s sidecars log nothing.
    let policy = format!(
        "{}{}",
        telemetry(
            "mesh",
            None,
            &format!(
                "{{path: '{}', fields: [status, reason]}}",
                mesh_log.display()
            )
        ),
        telemetry(
            "quiet",
            Some("quiet"),
            &format!("{{enabled: false, path: '{}'}}", quiet_log.display())
        )
    );
    let sidecar = |service: &'static str| {
        let policy = policy.clone();
        async move {
            start_proxy(&format!(
                "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: {service}-1}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound:
    - {{name: in, address: 127.0.0.1:0, forwardTo: '{}', service: {service}}}
{}{policy}",
                app.addr,
                service_yaml(service, 80, &[]),
            ))
            .await
        }
    };
    let loud = sidecar("loud").await;
    let quiet = sidecar("quiet").await;
    assert_eq!(get(quiet.addr("in").await, "/").await.status, 200);
    assert_eq!(get(loud.addr("in").await, "/").await.status, 200);
    let got = lines(&mesh_log, 1);
    assert_eq!(got, [serde_json::json!({"status": 200})]);
    // The quiet sidecar has no writer: the file was never even opened.
    assert!(!quiet_log.exists());
    assert_eq!(
        quiet.metric("trellis_access_log_lines_total{result=\"written\"}"),
        0.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_reload_moves_the_log_and_an_unopenable_path_is_refused_whole() {
    let dir = temp_dir("reload");
    let (a, b) = (dir.join("a.log"), dir.join("b.log"));
    let app = upstream("app").await;
    let config = |path: &Path| {
        format!(
            "{}{}{}",
            proxy_yaml("app"),
            service_yaml("app", 80, &[app.addr]),
            telemetry("mesh", None, &format!("{{path: '{}'}}", path.display()))
        )
    };
    let p = start_proxy(&config(&a)).await;
    let out = p.addr("out").await;
    assert_eq!(get(out, "/1").await.status, 200);
    lines(&a, 1);
    let apply = |yaml: String| {
        let p = p.proxy.clone();
        async move {
            let rs = trellis_api::parse_documents("test.yaml", &yaml).unwrap();
            p.apply(&rs, "test.yaml").await
        }
    };
    apply(config(&b)).await.unwrap();
    assert_eq!(get(out, "/2").await.status, 200);
    assert_eq!(lines(&b, 1)[0]["path"], "/2");
    let version = p.proxy.snapshot().version;
    let err = apply(config(&dir.join("missing/dir/c.log")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be opened"), "{err}");
    assert_eq!(
        p.proxy.snapshot().version,
        version,
        "the previous config serves"
    );
    assert_eq!(get(out, "/3").await.status, 200);
    let got = lines(&b, 2);
    assert_eq!(got[1]["path"], "/3");
    assert_eq!(lines(&a, 1).len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_pipe_nobody_reads_costs_dropped_lines_not_slower_requests() {
    let dir = temp_dir("pipe");
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // A reader that opens the pipe and never reads: the writer fills its buffer, then waits.
    let reader_path = fifo.clone();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&reader_path).unwrap();
        opened_tx.send(()).unwrap();
        let _ = done_rx.recv_timeout(Duration::from_secs(120));
        drop(f);
    });
    let app = upstream("app").await;
    let p = start_proxy(&format!(
        "{}{}{}",
        proxy_yaml("app"),
        service_yaml("app", 80, &[app.addr]),
        telemetry(
            "mesh",
            None,
            &format!("{{path: '{}', queueSize: 8}}", fifo.display())
        )
    ))
    .await;
    opened_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let out = p.addr("out").await;
    // Long paths make long lines, so the pipe's buffer fills soon.
    let path = format!("/{}", "x".repeat(2000));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            for _ in 0..150 {
                assert_eq!(get_via(&client, out, &path).await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    // The pipe (64 KiB, ~30 lines), a batch in hand (≤ 256) and the queue (8) hold some; the
    // rest are dropped and counted.
    let dropped = p.metric("trellis_access_log_lines_total{result=\"dropped\"}");
    assert!(
        dropped >= 600.0 - 30.0 - 256.0 - 8.0,
        "{}",
        p.proxy.metrics_text()
    );
    let _ = done_tx.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

// Two workers: `lines` blocks its thread while the proxy closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_tcp_connection_gets_one_line_when_it_ends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("tcp");
    let log = dir.join("access.log");
    let echo = tcp_echo().await;
    let p = start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: test}}
spec:
  admin: {{address: 127.0.0.1:0}}
  outbound:
    - {{name: out, address: 127.0.0.1:0, service: {{name: echo}}, protocol: tcp}}
{}{}",
        service_yaml("echo", 80, &[echo]),
        telemetry("mesh", None, &format!("{{path: '{}'}}", log.display()))
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(p.addr("out").await)
        .await
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    drop(s);
    let line = &lines(&log, 1)[0];
    assert_eq!(line["protocol"], "TCP");
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["backend"], "default/echo:80");
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0);
    // HTTP's fields are left out, and the connection ended on its own.
    for absent in ["method", "path", "status", "route", "reason"] {
        assert!(line.get(absent).is_none(), "{absent}: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
