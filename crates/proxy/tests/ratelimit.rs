//! Local rate limits end to end on loopback: a limit holds over time, callers have their own
//! buckets, refusals say what they must (and no more to a remote caller), outbound limits per
//! backend and route rule, connection limits close at accept, and a reload refills nothing.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy with an inbound listener `in` for service `app` forwarding to `app`, an outbound
/// listener `out` to service `app` (at `app` too), and `extra` resources.
fn yaml(app: SocketAddr, protocol: &str, extra: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: test}}
spec:
  admin: {{address: 127.0.0.1:0}}
  detectTimeout: 200ms
  inbound:
    - {{name: in, address: 127.0.0.1:0, forwardTo: '{app}', service: app{protocol}}}
  outbound:
    - {{name: out, address: 127.0.0.1:0, service: {{name: app}}{protocol}}}
{}{extra}",
        service_yaml("app", 80, &[app])
    )
}

async fn proxy(app: SocketAddr, extra: &str) -> TestProxy {
    start_proxy(&yaml(app, "", extra)).await
}

fn policy(name: &str, target: &str, direction: &str, limits: &str) -> String {
    format!(
        "---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: {name}}}
spec:
  targetRef: {target}
  direction: {direction}
  limits: {limits}
"
    )
}

fn status(got: &Got) -> u16 {
    got.status.as_u16()
}

/// Open-loop load: `rps` requests a second for `secs`, each on its own task, whatever the
/// answers; returns (admitted, limited, seconds from the first send to the last, seconds
/// from the first send to the last answer).
async fn open_loop(addr: SocketAddr, rps: u64, secs: u64) -> (u64, u64, f64, f64) {
    let client = h1_client();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let first = tokio::time::Instant::now();
    let mut last = first;
    for _ in 0..rps * secs {
        tick.tick().await;
        last = tokio::time::Instant::now();
        let c = client.clone();
        tasks.spawn(async move { status(&get_via(&c, addr, "/x").await) });
    }
    let (mut ok, mut limited) = (0, 0);
    while let Some(s) = tasks.join_next().await {
        match s.unwrap() {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    let sent = (last - first).as_secs_f64();
    (ok, limited, sent, first.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_limit_holds_within_tolerance_over_ten_seconds() {
    let up = upstream("app").await;
    let (rate, burst) = (20.0, 5.0);
    let p = proxy(
        up.addr,
        &policy(
            "steady",
            "{kind: Service, name: app}",
            "Inbound",
            "[{name: all, rate: 20, burst: 5}]",
        ),
    )
    .await;
    // 100 offered a second, five times the limit, for 10 s.
    let (ok, limited, t, answered) = open_loop(p.addr("in").await, 100, 10).await;
    assert_eq!(ok + limited, 1000);
    // At most the rate over the time requests could arrive (until the last answer: on a
    // loaded machine they reach the proxy later than they were sent) plus the burst; at
    // least the rate over the sending time, less a slack of 2% for requests the clock
    // splits at the ends.
    let upper = rate * answered + burst;
    let lower = rate * t * 0.98;
    assert!(
        (ok as f64) <= upper && (ok as f64) >= lower,
        "admitted {ok} over {t:.2}s (the last answered at {answered:.2}s), want {lower:.0}..={upper:.0}"
    );
    assert_eq!(
        p.metric("trellis_rate_limit_decisions_total{direction=\"inbound\",policy=\"default/steady\",limit=\"all\",unit=\"requests\",decision=\"allowed\"}"),
        ok as f64
    );
    assert_eq!(
        p.metric("trellis_rate_limit_decisions_total{direction=\"inbound\",policy=\"default/steady\",limit=\"all\",unit=\"requests\",decision=\"limited\"}"),
        limited as f64
    );
}

/// `n` GETs over one mutual TLS connection as `caller`; their statuses.
async fn mtls_gets(
    addr: SocketAddr,
    caller: &Arc<trellis_identity::Credentials>,
    n: usize,
) -> Vec<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = trellis_proxy::tls::server_name("spiffe://mesh.test/ns/default/sa/server").unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(caller.client_config()).connect(name, tcp),
    )
    .await
    .unwrap()
    .expect("the mesh handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::new();
    for _ in 0..n {
        let req = http::Request::get("/x")
            .header("host", "app")
            .body(Full::<Bytes>::default())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        out.push(resp.status().as_u16());
        resp.into_body().collect().await.unwrap();
    }
    out
}

#[tokio::test]
async fn each_identity_has_its_own_bucket_and_an_override_its_own_numbers() {
    let up = upstream("app").await;
    let p = proxy(
        up.addr,
        &policy(
            "callers",
            "{kind: Service, name: app}",
            "Inbound",
            "[{name: each, rate: 1, per: 1h, burst: 2, perSource: true, overrides: [{from: {identities: ['spiffe://mesh.test/ns/default/sa/vip']}, rate: 5}]}]",
        ),
    )
    .await;
    let ca = test_ca();
    p.proxy.set_identity(creds(&ca, "server"));
    let addr = p.addr("in").await;
    let (a, b, vip) = (creds(&ca, "a"), creds(&ca, "b"), creds(&ca, "vip"));
    assert_eq!(mtls_gets(addr, &a, 3).await, [200, 200, 429]);
    // Another identity, unaffected by the first's empty bucket.
    assert_eq!(mtls_gets(addr, &b, 2).await, [200, 200]);
    // A new connection of the first: still its bucket.
    assert_eq!(mtls_gets(addr, &a, 1).await, [429]);
    // The named caller: its own five.
    assert_eq!(
        mtls_gets(addr, &vip, 6).await,
        [200, 200, 200, 200, 200, 429]
    );
}

#[tokio::test]
async fn a_remote_caller_gets_429_with_ratelimit_headers_and_no_policy_name() {
    let up = upstream("app").await;
    let p = proxy(
        up.addr,
        &policy(
            "secret-policy",
            "{kind: Service, name: app}",
            "Inbound",
            "[{name: all, rate: 1, per: 1h}]",
        ),
    )
    .await;
    let addr = p.addr("in").await;
    // HTTP/2 prior knowledge, one connection.
    let client = h2_client();
    assert_eq!(status(&get_via(&client, addr, "/x").await), 200);
    let got = get_via(&client, addr, "/x").await;
    assert_eq!(status(&got), 429);
    let h = |n: &str| got.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(h("ratelimit-policy").as_deref(), Some("\"all\";q=1;w=3600"));
    let retry: u64 = h("retry-after").unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&retry), "{retry}");
    assert_eq!(h("ratelimit"), Some(format!("\"all\";r=0;t={retry}")));
    assert_eq!(h("trellis-proxy-error").as_deref(), Some("rate limited"));
    let head = format!("{:?}", got.headers);
    let body = String::from_utf8_lossy(&got.body);
    assert!(!head.contains("secret-policy") && !body.contains("secret-policy"));
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the refused request never reached the app"
    );
}

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

async fn grpc_call(addr: SocketAddr) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<Msg, Msg>::default();
    let path = http::uri::PathAndQuery::from_static("/echo.Echo/Chat");
    let words = futures_util::stream::iter(vec![Msg { text: "hi".into() }]);
    match client
        .streaming(tonic::Request::new(words), path, codec)
        .await
    {
        Ok(_) => tonic::Status::ok(""),
        Err(s) => s,
    }
}

#[tokio::test]
async fn grpc_gets_resource_exhausted_and_the_local_app_reads_the_limit() {
    let up = upstream("grpc").await;
    let limits = "[{name: calls, rate: 1, per: 1h}]";
    let p = proxy(
        up.addr,
        &format!(
            "{}{}",
            policy("in-limit", "{kind: Service, name: app}", "Inbound", limits),
            policy(
                "out-limit",
                "{kind: Service, name: app}",
                "Outbound",
                limits
            )
        ),
    )
    .await;
    let inbound = p.addr("in").await;
    assert_eq!(grpc_call(inbound).await.code(), tonic::Code::Ok);
    let refused = grpc_call(inbound).await;
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(
        refused.message(),
        "rate limited",
        "no policy for a remote caller"
    );

    let outbound = p.addr("out").await;
    assert_eq!(grpc_call(outbound).await.code(), tonic::Code::Ok);
    let refused = grpc_call(outbound).await;
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .starts_with("rate limit: default/out-limit/calls exceeded"),
        "{refused:?}"
    );
    // The local app over HTTP/1.1 reads it in the error header.
    let got = get(outbound, "/x").await;
    assert_eq!(status(&got), 429);
    let reason = got.headers["trellis-proxy-error"].to_str().unwrap();
    assert!(
        reason.starts_with(
            "rate limit: default/out-limit/calls exceeded (1 per 3600s), retry after "
        ),
        "{reason}"
    );
}

#[tokio::test]
async fn outbound_limits_per_backend_and_per_route_rule() {
    let up = upstream("app").await;
    let route = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{kind: Service, name: app}]
  rules:
    - name: api
      matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: app, port: 80}]
    - backendRefs: [{name: app, port: 80}]
";
    let p = proxy(
        up.addr,
        &format!(
            "{route}{}{}",
            policy(
                "api-rule",
                "{kind: HTTPRoute, name: r, sectionName: api}",
                "Outbound",
                "[{name: api, rate: 1, per: 1h}]"
            ),
            policy(
                "backend",
                "{kind: Service, name: app}",
                "Outbound",
                "[{name: all, rate: 3, per: 1h}]"
            )
        ),
    )
    .await;
    let out = p.addr("out").await;
    let reason = |g: &Got| {
        g.headers["trellis-proxy-error"]
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(status(&get(out, "/api/1").await), 200);
    // The rule's limit: the other rule still passes.
    let got = get(out, "/api/2").await;
    assert_eq!(status(&got), 429);
    assert!(
        reason(&got).starts_with("rate limit: default/api-rule/api "),
        "{}",
        reason(&got)
    );
    assert_eq!(status(&get(out, "/other").await), 200);
    // The backend's limit counts every rule (the refused request took its unit).
    let got = get(out, "/other").await;
    assert_eq!(status(&got), 429);
    assert!(
        reason(&got).starts_with("rate limit: default/backend/all "),
        "{}",
        reason(&got)
    );
    // Inbound is not limited by Outbound policies.
    assert_eq!(status(&get(p.addr("in").await, "/other").await), 200);
}

/// Whether the proxy echoes over a fresh TCP connection to `addr` (else it closed it).
async fn echoes(addr: SocketAddr) -> bool {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 5];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("an answer or a close within 5s");
    read.is_ok() && &buf == b"hello"
}

#[tokio::test]
async fn a_connections_limit_closes_new_connections_at_accept() {
    let echo = tcp_echo().await;
    let limits = "[{name: conns, unit: Connections, rate: 1, per: 1h, burst: 2}]";
    let p = start_proxy(&yaml(
        echo,
        ", protocol: tcp",
        &format!(
            "{}{}",
            policy("in-conns", "{kind: Service, name: app}", "Inbound", limits),
            policy(
                "out-conns",
                "{kind: Service, name: app}",
                "Outbound",
                limits
            )
        ),
    ))
    .await;
    for l in ["in", "out"] {
        let addr = p.addr(l).await;
        assert!(echoes(addr).await, "{l} 1");
        assert!(echoes(addr).await, "{l} 2");
        assert!(!echoes(addr).await, "{l}: the third connection is closed");
    }
    for (d, policy) in [("inbound", "in-conns"), ("outbound", "out-conns")] {
        let m = |decision: &str| {
            p.metric(&format!("trellis_rate_limit_decisions_total{{direction=\"{d}\",policy=\"default/{policy}\",limit=\"conns\",unit=\"connections\",decision=\"{decision}\"}}"))
        };
        assert_eq!((m("allowed"), m("limited")), (2.0, 1.0), "{d}");
    }
}

#[tokio::test]
async fn a_reload_refills_nothing_and_a_removed_policy_loses_its_series() {
    let up = upstream("app").await;
    let limited = policy(
        "reload",
        "{kind: Service, name: app}",
        "Inbound",
        "[{name: all, rate: 1, per: 1h, burst: 2}]",
    );
    let p = proxy(up.addr, &limited).await;
    let addr = p.addr("in").await;
    let statuses = |n| async move {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(status(&get(addr, "/x").await));
        }
        v
    };
    assert_eq!(statuses(3).await, [200, 200, 429]);
    // The same policy again, with another resource changed: still drained.
    let other = policy(
        "other",
        "{kind: Service, name: app}",
        "Outbound",
        "[{name: x, rate: 1}]",
    );
    let resources =
        trellis_api::parse_documents("t.yaml", &yaml(up.addr, "", &format!("{limited}{other}")))
            .unwrap();
    p.proxy.apply(&resources, "reload").await.unwrap();
    assert_eq!(statuses(1).await, [429]);
    let series =
        "trellis_rate_limit_decisions_total{direction=\"inbound\",policy=\"default/reload\"";
    assert_eq!(p.metric(series), 4.0);
    // Gone: nothing limits, and its series are dropped.
    let resources = trellis_api::parse_documents("t.yaml", &yaml(up.addr, "", "")).unwrap();
    p.proxy.apply(&resources, "reload").await.unwrap();
    assert_eq!(statuses(2).await, [200, 200]);
    assert!(
        !p.proxy.metrics_text().contains("policy=\"default/reload\""),
        "{}",
        p.proxy.metrics_text()
    );
}

#[tokio::test]
async fn a_refused_requests_access_log_line_names_the_policy_and_the_reason() {
    let dir = std::env::temp_dir().join(format!("trellis-ratelimit-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let up = upstream("app").await;
    let p = proxy(
        up.addr,
        &format!(
            "{}---
apiVersion: trellis.dev/v1alpha1
kind: Telemetry
metadata: {{name: mesh}}
spec:
  accessLog: {{path: '{}'}}
",
            policy(
                "logged",
                "{kind: Service, name: app}",
                "Inbound",
                "[{name: all, rate: 1, per: 1h}]"
            ),
            log.display()
        ),
    )
    .await;
    let addr = p.addr("in").await;
    assert_eq!(status(&get(addr, "/x").await), 200);
    assert_eq!(status(&get(addr, "/x").await), 429);
    // Lines are written by a thread of their own: wait (at most 10 s) for both.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(lines[0].get("reason").is_none(), "{}", lines[0]);
    assert_eq!(lines[1]["status"], 429);
    assert_eq!(lines[1]["reason"], "rate_limited");
    assert_eq!(lines[1]["policy"], "default/logged");
    let _ = std::fs::remove_dir_all(&dir);
}
