//! Route filters through a real proxy, as the Gateway API specifies them: redirect ports,
//! prefix stripping, mirrors of streamed bodies (HTTP/1.1 chunked and gRPC) and on backends,
//! and CORS.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::*;
use tokio::sync::mpsc;

/// A request a recording upstream received, read whole.
#[derive(Debug)]
struct Recorded {
    method: String,
    path: String,
    body: Bytes,
}

/// An upstream (HTTP/1.1 and h2c) that reads each request whole and hands it to the test,
/// then answers 200 (gRPC calls with `grpc-status: 0`).
async fn recording_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<Recorded>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|c| c.to_bytes());
                        let grpc = parts
                            .headers
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        if let Ok(body) = body {
                            let _ = tx.send(Recorded {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_string(),
                                body,
                            });
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let frames: Vec<Result<Frame<Bytes>, Infallible>> = if grpc {
                            vec![Ok(Frame::trailers(trailers))]
                        } else {
                            vec![Ok(Frame::data(Bytes::from_static(b"recorded")))]
                        };
                        let mut resp = http::Response::new(StreamBody::new(
                            futures_util::stream::iter(frames),
                        ));
                        if grpc {
                            resp.headers_mut()
                                .insert("content-type", "application/grpc".parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// The next recorded request, within 10 s.
async fn next(rx: &mut mpsc::UnboundedReceiver<Recorded>) -> Recorded {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no request reached the upstream within 10 s")
        .expect("upstream gone")
}

/// Sum of the metric lines named `name` whose labels contain every one of `labels`.
fn metric(p: &TestProxy, name: &str, labels: &[&str]) -> f64 {
    p.proxy
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (at most 10 s) until `metric` reaches `at_least`.
async fn wait_metric(p: &TestProxy, name: &str, labels: &[&str], at_least: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(p, name, labels) < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} stayed at {} (< {at_least})",
            metric(p, name, labels)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy for service `web` (port 8080, at `web`) with services `v1` and `shadow` and the
/// given resources (routes, policies) after them.
async fn proxy(web: SocketAddr, v1: SocketAddr, shadow: SocketAddr, rest: &str) -> TestProxy {
    start_proxy(&format!(
        "{}{}{}{}{rest}",
        proxy_yaml("web"),
        service_yaml("web", 8080, &[web]),
        service_yaml("v1", 8080, &[v1]),
        service_yaml("shadow", 8080, &[shadow]),
    ))
    .await
}

fn http_route(rules: &str) -> String {
    format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{kind: Service, name: web, port: 8080}}]
  rules:
{rules}"
    )
}

type StreamClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    BoxBody<Bytes, Infallible>,
>;

/// A POST of `chunks` chunks of `size` bytes each, streamed (chunked: no length), whose byte
/// `i` is `i % 251`.
fn chunked_post(
    addr: SocketAddr,
    path: &str,
    chunks: usize,
    size: usize,
) -> Request<BoxBody<Bytes, Infallible>> {
    let frames = (0..chunks).map(move |c| {
        let data: Vec<u8> = (c * size..(c + 1) * size)
            .map(|i| (i % 251) as u8)
            .collect();
        Ok::<_, Infallible>(Frame::data(Bytes::from(data)))
    });
    Request::post(format!("http://{addr}{path}"))
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap()
}

fn expected_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn stream_client() -> StreamClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test]
async fn redirect_port_is_the_service_port_not_the_host_header() {
    // Service `echo` on port 80, as in the upstream mesh redirect cases. The client talks to
    // the sidecar's loopback listener, so its Host carries that listener's random port.
    let echo = upstream("echo").await;
    let route = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirects}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /hostname}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
    - matches: [{path: {type: PathPrefix, value: /port}}]
      filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
    - matches: [{path: {type: PathPrefix, value: /scheme}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
    - matches: [{path: {type: PathPrefix, value: /scheme-and-port}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, port: 8443}}]
";
    let p = start_proxy(&format!(
        "{}{}{route}",
        proxy_yaml("echo"),
        service_yaml("echo", 80, &[echo.addr])
    ))
    .await;
    let addr = p.addr("out").await;
    assert_ne!(addr.port(), 80);
    let cases = [
        ("/hostname", 302, "http://example.org/hostname".to_string()),
        ("/port", 302, "http://127.0.0.1:8083/port".to_string()),
        ("/scheme", 301, "https://127.0.0.1/scheme".to_string()),
        (
            "/scheme-and-port/x?q=1",
            302,
            "https://127.0.0.1:8443/scheme-and-port/x?q=1".to_string(),
        ),
    ];
    for (path, status, location) in cases {
        let got = get(addr, path).await;
        assert_eq!(got.status.as_u16(), status, "{path}");
        assert_eq!(got.headers["location"], location.as_str(), "{path}");
    }
    // A service on another port: that port, whatever the Host says.
    let (web, v1, shadow) = (
        upstream("web").await,
        upstream("v1").await,
        upstream("s").await,
    );
    let p = proxy(
        web.addr,
        v1.addr,
        shadow.addr,
        &http_route(
            "    - filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]\n",
        ),
    )
    .await;
    let addr = p.addr("out").await;
    let got = send(
        &h1_client(),
        Request::get(format!("http://{addr}/a"))
            .header("host", "web:1234")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(got.headers["location"], "http://example.org:8080/a");
    assert_eq!(echo.hits.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_empty_replace_prefix_match_strips_the_prefix() {
    let (web, v1, shadow) = (
        upstream("web").await,
        upstream("v1").await,
        upstream("s").await,
    );
    let rules = "    - matches: [{path: {type: PathPrefix, value: /foo}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}]
      backendRefs: [{name: v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /moved}}]
      filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}]
";
    let p = proxy(web.addr, v1.addr, shadow.addr, &http_route(rules)).await;
    let addr = p.addr("out").await;
    for (path, want) in [
        ("/foo", "/"),
        ("/foo/", "/"),
        ("/foo/bar", "/bar"),
        ("/foo/bar/", "/bar/"),
        ("/foo/bar?x=1", "/bar?x=1"),
    ] {
        let got = get(addr, path).await;
        assert_eq!(got.upstream(), "v1", "{path}");
        assert_eq!(got.json()["path"], want, "{path}");
    }
    let got = get(addr, "/moved/page?x=1").await;
    assert_eq!(got.status, 302);
    assert_eq!(got.headers["location"], "http://127.0.0.1:8080/page?x=1");
}

#[tokio::test]
async fn mirrors_copy_chunked_bodies_of_any_size() {
    let (web, v1) = (upstream("web").await, upstream("v1").await);
    let (shadow, mut seen) = recording_upstream().await;
    let rules = "    - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 8080}}}]
      backendRefs: [{name: v1, port: 8080}]
";
    let p = proxy(web.addr, v1.addr, shadow, &http_route(rules)).await;
    let addr = p.addr("out").await;
    // 1 MiB in 64 KiB chunks, no length: far over the old 64 KiB limit.
    let (chunks, size) = (16, 64 * 1024);
    let resp = stream_client()
        .request(chunked_post(addr, "/echo", chunks, size))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-upstream"], "v1");
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, expected_body(chunks * size));
    let copy = next(&mut seen).await;
    assert_eq!(
        (copy.method.as_str(), copy.path.as_str()),
        ("POST", "/echo")
    );
    assert_eq!(copy.body.len(), chunks * size);
    assert_eq!(copy.body, expected_body(chunks * size));
    wait_metric(&p, "trellis_http_mirrored_requests_total", &[], 1.0).await;
    assert_eq!(metric(&p, "trellis_http_mirror_dropped_total", &[]), 0.0);
}

#[tokio::test]
async fn mirrors_copy_grpc_streams() {
    let (web, v1) = (upstream("web").await, upstream("v1").await);
    let (shadow, mut seen) = recording_upstream().await;
    let route = "---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{name: web}]
  rules:
    - matches: [{method: {service: echo.Echo}}]
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 8080}}}]
      backendRefs: [{name: v1, port: 8080}]
";
    let p = proxy(web.addr, v1.addr, shadow, route).await;
    let addr = p.addr("out").await;
    // The primary streams: each echo arrives before the next message is sent, mirror or not.
    grpc_chat(addr, &["one", "two", "three"]).await;
    // The copy got the whole stream: three length-prefixed messages.
    let copy = next(&mut seen).await;
    assert_eq!(copy.path, "/echo.Echo/Chat");
    let mut texts = Vec::new();
    let mut rest = &copy.body[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let msg: Note = prost::Message::decode(&rest[5..5 + len]).unwrap();
        texts.push(msg.text);
        rest = &rest[5 + len..];
    }
    assert_eq!(texts, ["one", "two", "three"]);
    assert!(rest.is_empty());
}

#[tokio::test]
async fn a_mirror_on_a_backend_ref_copies_requests_sent_to_that_backend() {
    let (web, v1) = (upstream("web").await, upstream("v1").await);
    let (shadow, mut seen) = recording_upstream().await;
    let rules = "    - backendRefs:
        - name: v1
          port: 8080
          filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 8080}}}]
";
    let p = proxy(web.addr, v1.addr, shadow, &http_route(rules)).await;
    let addr = p.addr("out").await;
    let got = get(addr, "/from-backend?x=1").await;
    assert_eq!(got.upstream(), "v1");
    let copy = next(&mut seen).await;
    assert_eq!(
        (copy.method.as_str(), copy.path.as_str()),
        ("GET", "/from-backend")
    );
}

#[tokio::test]
async fn slow_or_failing_mirrors_never_hold_the_request_back() {
    let (web, v1) = (upstream("web").await, upstream("v1").await);
    // Never reads: the copy falls behind once the socket buffers are full.
    let (hung, accepted) = hung_upstream().await;
    // Nothing listens here.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let rest = format!(
        "{}{}
    - matches: [{{path: {{value: /slow}}}}]
      filters:
        - {{type: RequestMirror, requestMirror: {{backendRef: {{name: shadow, port: 8080}}}}}}
        - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /echo}}}}}}
      backendRefs: [{{name: v1, port: 8080}}]
    - matches: [{{path: {{value: /dead}}}}]
      filters:
        - {{type: RequestMirror, requestMirror: {{backendRef: {{name: dead, port: 8080}}}}}}
        - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /echo}}}}}}
      backendRefs: [{{name: v1, port: 8080}}]
---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: shadow}}
spec:
  targetRef: {{kind: Service, name: shadow}}
  timeouts: {{request: 500ms}}
",
        service_yaml("dead", 8080, &[dead]),
        http_route(""),
    );
    let p = proxy(web.addr, v1.addr, hung, &rest).await;
    let addr = p.addr("out").await;
    // 32 MiB streamed: more than loopback socket buffers hold for a reader that never reads.
    let (chunks, size) = (512, 64 * 1024);
    let resp = stream_client()
        .request(chunked_post(addr, "/slow", chunks, size))
        .await
        .unwrap();
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), chunks * size);
    assert!(echoed == expected_body(chunks * size));
    // Cut off (`slow`), or, on a loaded machine, out of its 500 ms first (`failed`).
    wait_metric(
        &p,
        "trellis_http_mirror_dropped_total",
        &["route=\"default/r/0\""],
        1.0,
    )
    .await;
    assert_eq!(accepted.load(Ordering::Relaxed), 1, "the copy was sent");
    // A mirror that cannot connect: the request is answered all the same.
    for _ in 0..3 {
        let got = send(
            &h1_client(),
            Request::post(format!("http://{addr}/dead"))
                .body(Full::new(Bytes::from_static(b"payload")))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, "payload");
    }
    wait_metric(
        &p,
        "trellis_http_mirror_dropped_total",
        &["route=\"default/r/1\"", "reason=\"failed\""],
        3.0,
    )
    .await;
    assert_eq!(v1.hits.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn cors_preflights_are_answered_by_the_proxy_and_responses_carry_the_headers() {
    let (web, v1, shadow) = (
        upstream("web").await,
        upstream("v1").await,
        upstream("s").await,
    );
    let rules = "    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: CORS
          cors:
            allowOrigins: ['https://www.foo.com', 'https://*.bar.com']
            allowMethods: [GET, PUT]
            allowHeaders: [x-header-1]
            exposeHeaders: [x-upstream]
            allowCredentials: true
            maxAge: 600
      backendRefs: [{name: v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - {type: CORS, cors: {allowOrigins: ['*']}}
        - {type: RequestRedirect, requestRedirect: {hostname: new.example}}
";
    let p = proxy(web.addr, v1.addr, shadow.addr, &http_route(rules)).await;
    let addr = p.addr("out").await;
    let client = h1_client();
    let call = |method: &str, path: &str, headers: &[(&str, &str)]| {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        send(&client, b.body(Full::default()).unwrap())
    };
    // An allowed preflight: answered here, the backend never sees it.
    let got = call(
        "OPTIONS",
        "/api/items",
        &[
            ("origin", "https://shop.bar.com"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "x-header-1"),
        ],
    )
    .await;
    assert_eq!(got.status, 204);
    let h = &got.headers;
    assert_eq!(h["access-control-allow-origin"], "https://shop.bar.com");
    assert_eq!(h["access-control-allow-methods"], "GET, PUT");
    assert_eq!(h["access-control-allow-headers"], "x-header-1");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["vary"], "origin");
    assert_eq!(v1.hits.load(Ordering::Relaxed), 0);
    // A preflight from another origin: answered, with no CORS headers.
    let got = call(
        "OPTIONS",
        "/api/items",
        &[
            ("origin", "https://foobar.com"),
            ("access-control-request-method", "PUT"),
        ],
    )
    .await;
    assert!(got.status.is_success());
    assert!(got.headers.get("access-control-allow-origin").is_none());
    assert_eq!(v1.hits.load(Ordering::Relaxed), 0);
    // Actual requests reach the backend; only an allowed origin gets the headers.
    let got = call("GET", "/api/items", &[("origin", "https://www.foo.com")]).await;
    assert_eq!(got.upstream(), "v1");
    assert_eq!(
        got.headers["access-control-allow-origin"],
        "https://www.foo.com"
    );
    assert_eq!(got.headers["access-control-allow-credentials"], "true");
    assert_eq!(got.headers["access-control-expose-headers"], "x-upstream");
    let got = call("GET", "/api/items", &[("origin", "https://evil.example")]).await;
    assert_eq!(got.upstream(), "v1");
    assert!(
        !got.headers
            .keys()
            .any(|n| n.as_str().starts_with("access-control-")),
        "{:?}",
        got.headers
    );
    let got = call("GET", "/api/items", &[]).await;
    assert!(got.headers.get("access-control-allow-origin").is_none());
    assert_eq!(v1.hits.load(Ordering::Relaxed), 3);
    // A redirect on a CORS rule carries the headers too.
    let got = call("GET", "/old/x", &[("origin", "https://a.example")]).await;
    assert_eq!(got.status, 302);
    assert_eq!(got.headers["location"], "http://new.example:8080/old/x");
    assert_eq!(got.headers["access-control-allow-origin"], "*");
}
