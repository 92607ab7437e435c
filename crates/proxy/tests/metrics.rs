//! The proxy's metrics as a scraper sees them: identity labels over mutual TLS and plaintext,
//! status class and gRPC status, body sizes, forwarded TCP, exemplars and the two text
//! formats, and cardinality that neither grows with traffic nor outlives the config.

mod support;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::net::SocketAddr;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT: &str = "spiffe://mesh.test/ns/default/sa/client";
const SERVER: &str = "spiffe://mesh.test/ns/default/sa/server";

/// The identity labels of a series, in the order the proxy writes them.
fn parties(src: [&str; 3], dst: [&str; 3], tls: bool) -> String {
    format!(
        "src_service=\"{}\",src_namespace=\"{}\",src_identity=\"{}\",dst_service=\"{}\",dst_namespace=\"{}\",dst_identity=\"{}\",tls=\"{tls}\"",
        src[0], src[1], src[2], dst[0], dst[1], dst[2]
    )
}

/// An inbound sidecar of service `app` with identity `sa`, in front of `app_addr`.
async fn sidecar(ca: &trellis_identity::Ca, sa: &str, app_addr: SocketAddr) -> TestProxy {
    let p = start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: {sa}}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound: [{{name: in, address: 127.0.0.1:0, forwardTo: '{app_addr}', service: app}}]
---
{}",
        service_yaml("app", 80, &[])
    ))
    .await;
    p.proxy.set_identity(creds(ca, sa));
    p
}

/// Service `app` at endpoints with identities.
fn app_with_identities(endpoints: &[(SocketAddr, &str)]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(a, id)| format!("{{address: '{a}', identity: '{id}'}}"))
        .collect();
    format!(
        "---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec:
  ports: [{{port: 80}}]
  endpoints: [{}]
",
        eps.join(", ")
    )
}

/// The series lines (not comments) of a scrape.
fn series(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

/// The series of a scrape, without their values.
fn series_names(text: &str) -> std::collections::BTreeSet<String> {
    series(text)
        .iter()
        .map(|l| l.rsplit_once(' ').map_or(*l, |(s, _)| s).to_string())
        .collect()
}

#[tokio::test]
async fn request_series_carry_who_called_whom_and_over_what() {
    let up = upstream("app").await;
    let ca = test_ca();
    let server = sidecar(&ca, "server", up.addr).await;
    let in_addr = server.addr("in").await;
    let client = start_proxy(&format!(
        "{}{}",
        proxy_yaml("app"),
        app_with_identities(&[(in_addr, SERVER)])
    ))
    .await;
    client.proxy.set_identity(creds(&ca, "client"));

    let got = get(client.addr("out").await, "/").await;
    assert_eq!(got.status, StatusCode::OK);

    // The calling sidecar: its own workload (client-only: no service) to the backend's
    // service, as the identity the endpoint proved.
    let out = format!(
        "direction=\"outbound\",route=\"default\",backend=\"default/app:80\",{}",
        parties(["", "default", CLIENT], ["app", "default", SERVER], true)
    );
    // The answering sidecar: the caller from its certificate, to its own workload.
    let inb = format!(
        "direction=\"inbound\",route=\"inbound\",backend=\"inbound/in\",{}",
        parties(
            ["client", "default", CLIENT],
            ["app", "default", SERVER],
            true
        )
    );
    for (p, labels) in [(&client, &out), (&server, &inb)] {
        assert_eq!(
            p.metric(&format!("trellis_http_requests_total{{{labels}}}")),
            1.0,
            "{}",
            p.proxy.metrics_text()
        );
        assert_eq!(
            p.metric(&format!(
                "trellis_http_responses_total{{{labels},status=\"200\",class=\"2xx\",grpc_status=\"\",error=\"\"}}"
            )),
            1.0
        );
        assert_eq!(
            p.metric(&format!(
                "trellis_http_response_latency_seconds_count{{{labels}}}"
            )),
            1.0
        );
    }

    // A plaintext caller (the mesh is permissive here): nothing known of it.
    let got = get(in_addr, "/missing").await;
    assert_eq!(got.status, StatusCode::OK);
    let plain = format!(
        "direction=\"inbound\",route=\"inbound\",backend=\"inbound/in\",{}",
        parties(["", "", ""], ["app", "default", SERVER], false)
    );
    assert_eq!(
        server.metric(&format!("trellis_http_requests_total{{{plain}}}")),
        1.0
    );
}

#[tokio::test]
async fn responses_by_class_and_grpc_status() {
    let up = upstream("app").await;
    let p = app_proxy(&[up.addr]).await;
    let addr = p.addr("out").await;
    let labels = format!(
        "direction=\"outbound\",route=\"default\",backend=\"default/app:80\",{}",
        parties(["", "default", ""], ["app", "default", ""], false)
    );

    // A gRPC call's status comes in its trailers: counted when the body ends.
    grpc_chat(addr, &["one", "two"]).await;
    let ok = format!(
        "trellis_http_responses_total{{{labels},status=\"200\",class=\"2xx\",grpc_status=\"0\",error=\"\"}}"
    );
    assert_eq!(
        p.wait_metric(&ok, 1.0).await,
        1.0,
        "{}",
        p.proxy.metrics_text()
    );

    // An HTTP error from the app: by status and class, no gRPC status.
    let got = send(
        &h1_client(),
        Request::get(format!("http://{addr}/"))
            .header("x-echo-fail", "503,1,class-test")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        p.metric(&format!(
            "trellis_http_responses_total{{{labels},status=\"503\",class=\"5xx\",grpc_status=\"\",error=\"\"}}"
        )),
        1.0,
        "{}",
        p.proxy.metrics_text()
    );

    // A gRPC call the proxy answers itself (no endpoint): the status it sent.
    let empty = app_proxy(&[]).await;
    let got = send(
        &h2_client(),
        Request::post(format!("http://{}/echo.Echo/Chat", empty.addr("out").await))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(got.headers["grpc-status"], "14");
    assert_eq!(
        empty.metric(&format!(
            "trellis_http_responses_total{{{labels},status=\"200\",class=\"2xx\",grpc_status=\"14\",error=\""
        )),
        1.0,
        "{}",
        empty.proxy.metrics_text()
    );
}

#[tokio::test]
async fn body_sizes_and_forwarded_tcp() {
    let up = upstream("app").await;
    let p = app_proxy(&[up.addr]).await;
    let addr = p.addr("out").await;
    let got = send(
        &h1_client(),
        Request::post(format!("http://{addr}/echo"))
            .body(Full::new(Bytes::from(vec![b'x'; 1000])))
            .unwrap(),
    )
    .await;
    assert_eq!(got.body.len(), 1000);
    get(addr, "/").await;
    let route = "direction=\"outbound\",route=\"default\",backend=\"default/app:80\"";
    let req = format!("trellis_http_request_size_bytes_sum{{{route}}}");
    assert_eq!(p.wait_metric(&req, 1000.0).await, 1000.0);
    let count = format!("trellis_http_request_size_bytes_count{{{route}}}");
    assert_eq!(p.metric(&count), 2.0);
    let resp = format!("trellis_http_response_size_bytes_count{{{route}}}");
    assert_eq!(p.wait_metric(&resp, 2.0).await, 2.0);
    let resp_bytes = format!("trellis_http_response_size_bytes_sum{{{route}}}");
    // The echo, and the JSON answer to the GET.
    assert!(p.metric(&resp_bytes) > 1000.0);

    // Opaque TCP: the connection, its bytes each way, and how long it lasted.
    let echo = tcp_echo().await;
    let t = start_proxy(&format!(
        "{}{}",
        proxy_yaml("echo"),
        service_yaml("echo", 80, &[echo])
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(t.addr("out").await)
        .await
        .unwrap();
    s.write_all(b"\x00\x01binary protocol\n").await.unwrap();
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).await.unwrap();
    drop(s);
    let labels = format!(
        "direction=\"outbound\",backend=\"default/echo:80\",{}",
        parties(["", "default", ""], ["echo", "default", ""], false)
    );
    assert_eq!(
        t.metric(&format!(
            "trellis_tcp_forwarded_connections_total{{{labels}}}"
        )),
        1.0,
        "{}",
        t.proxy.metrics_text()
    );
    for way in ["sent", "received"] {
        let bytes = format!("trellis_tcp_forwarded_bytes_total{{{labels},way=\"{way}\"}}");
        assert_eq!(t.wait_metric(&bytes, 18.0).await, 18.0, "{way}");
    }
    let closed =
        "trellis_tcp_connection_duration_seconds_count{direction=\"outbound\",listener=\"out\"}";
    assert_eq!(t.wait_metric(closed, 1.0).await, 1.0);
}

/// A scrape of the admin `/metrics` with `accept`.
async fn scrape(p: &TestProxy, accept: Option<&str>) -> Got {
    let mut req = Request::get(format!("http://{}/metrics", p.proxy.admin_addr()));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    send(&h1_client(), req.body(Full::default()).unwrap()).await
}

#[tokio::test]
async fn openmetrics_with_exemplars_or_prometheus_text_without() {
    let up = upstream("app").await;
    let p = app_proxy(&[up.addr]).await;
    let addr = p.addr("out").await;
    let sampled = "0af7651916cd43dd8448eb211c80319c";
    let unsampled = "4bf92f3577b34da6a3ce929d0e0e4736";
    for (trace, flags) in [(sampled, "01"), (unsampled, "00")] {
        let got = send(
            &h1_client(),
            Request::get(format!("http://{addr}/"))
                .header(
                    "traceparent",
                    format!("00-{trace}-b7ad6b7169203331-{flags}"),
                )
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
    }

    // What Prometheus asks for.
    let om = scrape(
        &p,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    )
    .await;
    assert!(
        om.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    let text = String::from_utf8(om.body.to_vec()).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let exemplar = format!("# {{trace_id=\"{sampled}\"}}");
    assert!(
        text.lines().any(
            |l| l.starts_with("trellis_http_response_latency_seconds_bucket{")
                && l.contains(&exemplar)
        ),
        "{text}"
    );
    assert!(
        !text.contains(unsampled),
        "an unsampled trace is no exemplar"
    );

    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let plain = scrape(&p, accept).await;
        assert_eq!(
            plain.headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = String::from_utf8(plain.body.to_vec()).unwrap();
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("trace_id"), "{text}");
        assert!(text.contains("# TYPE trellis_http_requests_total counter\n"));
        assert!(text.contains("# TYPE trellis_http_response_latency_seconds histogram\n"));
        // Same series as the OpenMetrics scrape.
        assert!(
            series(&text).iter().any(|l| l
                .starts_with("trellis_http_response_latency_seconds_count{direction=\"outbound\"")
                && l.ends_with(" 2"))
        );
    }

    // Prometheus's own checker accepts the 0.0.4 text (the prometheus package; scripts/test
    // installs it).
    let text = scrape(&p, None).await.body;
    let check = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut check = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect(
                "promtool (Debian package prometheus) is needed: apt-get install -y prometheus",
            );
        check.stdin.take().unwrap().write_all(&text).unwrap();
        check.wait_with_output().unwrap()
    });
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), check)
        .await
        .expect("promtool hung")
        .unwrap();
    // Exit 3 is lint only: the one finding allowed is the name of a gauge that predates
    // these checks (`trellis_connection_limit_total`; metric names stay as they are).
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let known =
        "trellis_connection_limit_total non-counter metrics should not have \"_total\" suffix";
    let lint_only = out.status.code() == Some(3)
        && report
            .lines()
            .all(|l| l.trim().is_empty() || l.trim() == known);
    assert!(
        out.status.success() || lint_only,
        "promtool check metrics ({:?}): {report}",
        out.status.code()
    );
}

#[tokio::test]
async fn series_do_not_grow_with_paths_queries_headers_or_client_ports() {
    let up = upstream("app").await;
    let p = app_proxy(&[up.addr]).await;
    let addr = p.addr("out").await;
    // Every kind of answer first, so the series exist before counting.
    get(addr, "/warm").await;
    let closed =
        "trellis_tcp_connection_duration_seconds_count{direction=\"outbound\",listener=\"out\"}";
    p.wait_metric(closed, 1.0).await;
    let before = series_names(&p.proxy.metrics_text());

    // 10,000 distinct paths, query strings and header values, over 50 connections (50
    // client ports).
    const CONNS: usize = 50;
    const EACH: usize = 200;
    let mut tasks = Vec::new();
    for c in 0..CONNS {
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            for i in 0..EACH {
                let n = c * EACH + i;
                let got = send(
                    &client,
                    Request::get(format!("http://{addr}/items/{n}/detail?q={n}&page={i}"))
                        .header("x-request-id", format!("req-{n}"))
                        .header("user-agent", format!("agent/{n}"))
                        .body(Full::default())
                        .unwrap(),
                )
                .await;
                assert_eq!(got.status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = p.proxy.metrics_text();
    let after = series_names(&text);
    assert_eq!(
        after.difference(&before).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "series grew with traffic"
    );
    assert_eq!(before.len(), after.len());
    assert_eq!(
        p.metric("trellis_http_requests_total{direction=\"outbound\""),
        (CONNS * EACH + 1) as f64
    );
    for raw in ["/items/", "q=", "req-", "agent/", "127.0.0.1:"] {
        assert!(!text.contains(raw), "{raw} in a label");
    }
}

#[tokio::test]
async fn series_of_removed_routes_backends_and_endpoint_identities_go_at_reload() {
    let up = upstream("app").await;
    let other = upstream("other").await;
    let ca = test_ca();
    let s1 = sidecar(&ca, "server", up.addr).await;
    let s2 = sidecar(&ca, "server2", up.addr).await;
    let (a1, a2) = (s1.addr("in").await, s2.addr("in").await);
    const SERVER2: &str = "spiffe://mesh.test/ns/default/sa/server2";
    let route = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: other}]
  rules:
    - backendRefs: [{name: third, port: 80}]
";
    let config = |with_removed: bool| {
        let mut c = proxy_yaml("app");
        c += &service_yaml("other", 80, &[other.addr]);
        if with_removed {
            c += &app_with_identities(&[(a1, SERVER), (a2, SERVER2)]);
            c += route;
            c += &service_yaml("third", 80, &[other.addr]);
        } else {
            c += &app_with_identities(&[(a1, SERVER)]);
        }
        c
    };
    let p = start_proxy(&config(true)).await;
    p.proxy.set_identity(creds(&ca, "client"));
    let addr = p.addr("out").await;
    // Until both endpoints answered (the balancer picks; a bounded number of tries).
    for _ in 0..200 {
        assert_eq!(get(addr, "/").await.status, StatusCode::OK);
        if s1.metric("trellis_http_requests_total") >= 1.0
            && s2.metric("trellis_http_requests_total") >= 1.0
        {
            break;
        }
    }
    // The route, by Host on the HTTP proxy listener.
    let via_route = send(
        &h1_client(),
        Request::get(format!("http://{}/", p.addr("http-proxy").await))
            .header("host", "other")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(via_route.status, StatusCode::OK);
    let text = p.proxy.metrics_text();
    for present in [
        "dst_identity=\"spiffe://mesh.test/ns/default/sa/server\"",
        "dst_identity=\"spiffe://mesh.test/ns/default/sa/server2\"",
        "route=\"default/r/0\",backend=\"default/third:80\"",
    ] {
        assert!(text.contains(present), "{present} missing:\n{text}");
    }

    let kept = format!(
        "trellis_http_requests_total{{direction=\"outbound\",route=\"default\",backend=\"default/app:80\",{}}}",
        parties(["", "default", CLIENT], ["app", "default", SERVER], true)
    );
    let before = p.metric(&kept);

    // The second endpoint, the route and the backend it led to are gone from the config.
    let resources = trellis_api::parse_documents("test.yaml", &config(false)).unwrap();
    p.proxy.apply(&resources, "test.yaml").await.unwrap();
    let text = p.proxy.metrics_text();
    for gone in [SERVER2, "route=\"default/r/0\"", "default/third:80"] {
        assert!(!text.contains(gone), "{gone} still there:\n{text}");
    }
    // What remains keeps its counts.
    assert!(text.contains("dst_identity=\"spiffe://mesh.test/ns/default/sa/server\""));
    assert_eq!(p.metric(&kept), before);
    assert!(before >= 1.0);
}

#[tokio::test]
async fn a_route_has_series_only_once_it_carries_traffic() {
    // Thousands of routes in a sidecar's view cost no series until they are used.
    let up = upstream("app").await;
    let mut config = app_with_routes(&[up.addr]);
    config.insert_str(0, &proxy_yaml("app"));
    let p = start_proxy(&config).await;
    let text = p.proxy.metrics_text();
    assert!(!text.contains("route=\"default/used/0\""), "{text}");
    assert!(!text.contains("route=\"default/unused/0\""), "{text}");
    let addr = p.addr("out").await;
    assert_eq!(get(addr, "/used").await.status, StatusCode::OK);
    let used = "direction=\"outbound\",route=\"default/used/0\",backend=\"default/app:80\"";
    let count = format!("trellis_http_request_size_bytes_count{{{used}}}");
    assert_eq!(p.wait_metric(&count, 1.0).await, 1.0);
    let text = p.proxy.metrics_text();
    assert!(!text.contains("route=\"default/unused/0\""), "{text}");
}

/// Service `app` with two routes, on `/used` and `/unused`.
fn app_with_routes(endpoints: &[SocketAddr]) -> String {
    let mut c = service_yaml("app", 80, endpoints);
    for name in ["used", "unused"] {
        c += &format!(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: app, port: 80}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /{name}}}}}]
      backendRefs: [{{name: app, port: 80}}]
"
        );
    }
    c
}
