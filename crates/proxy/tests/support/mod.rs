//! Test support: real upstream servers and clients on loopback, and a proxy started from YAML.
#![allow(dead_code)]

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use trellis_proxy::Proxy;

pub mod collector;

pub type TestBody = BoxBody<Bytes, hyper::Error>;

/// An upstream HTTP server (HTTP/1.1 and h2c) that describes each request it receives as
/// JSON, echoes bodies on `/echo`, delays on `/delay/MS`, and echoes gRPC streams (with the
/// request's headers as JSON in the `x-echo-request-headers` response header).
///
/// A request can steer the answer with headers (the conformance tests use them):
/// - `x-echo-delay-ms: N`: wait N ms before answering;
/// - `x-echo-response-header: NAME: VALUE` (repeatable): add that header to the response;
/// - `x-echo-fail: STATUS,TIMES,ID`: answer STATUS to the first TIMES requests carrying ID,
///   then answer normally (a backend that recovers, for retries).
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    /// Connections accepted.
    pub conns: Arc<AtomicU64>,
}

pub async fn upstream(name: &'static str) -> Upstream {
    upstream_with_delay(name, 0).await
}

/// An upstream that waits `delay_ms` before every answer.
pub async fn upstream_with_delay(name: &'static str, delay_ms: u64) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let conns = Arc::new(AtomicU64::new(0));
    let (h, c) = (hits.clone(), conns.clone());
    let failed = Failed::default();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::Relaxed);
            let (h, failed) = (h.clone(), failed.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    h.fetch_add(1, Ordering::Relaxed);
                    answer(name, delay_ms, failed.clone(), req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr, hits, conns }
}

/// An upstream like [`upstream`] that can be stopped (its listener and every connection
/// closed, as when its host dies) and started again on the same address.
pub struct Stoppable {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    stop: Option<tokio::sync::watch::Sender<()>>,
}

impl Stoppable {
    /// Serves on a new loopback port.
    pub async fn start(name: &'static str) -> Stoppable {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut s = Stoppable {
            name,
            addr: listener.local_addr().unwrap(),
            hits: Arc::default(),
            stop: None,
        };
        s.serve(listener);
        s
    }

    /// Closes the listener and every open connection; returns once the port refuses.
    pub async fn stop(&mut self) {
        self.stop = None;
        tokio::time::timeout(Duration::from_secs(10), async {
            while tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("upstream still accepting after stop");
    }

    /// Serves again on the same address.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let (tx, rx) = tokio::sync::watch::channel(());
        self.stop = Some(tx);
        let (name, hits) = (self.name, self.hits.clone());
        let failed = Failed::default();
        tokio::spawn(async move {
            let mut closed = rx.clone();
            loop {
                let stream = tokio::select! {
                    _ = closed.changed() => return,
                    a = listener.accept() => match a {
                        Ok((s, _)) => s,
                        Err(_) => return,
                    },
                };
                let (h, mut closed, failed) = (hits.clone(), rx.clone(), failed.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        h.fetch_add(1, Ordering::Relaxed);
                        answer(name, 0, failed.clone(), req)
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    // Dropping the connection closes its socket.
                    tokio::select! {
                        _ = conn => {}
                        _ = closed.changed() => {}
                    }
                });
            }
        });
    }
}

/// How many times an upstream answered each `x-echo-fail` id with its failure status.
type Failed = Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>;

/// The request's headers as JSON: name to the list of its values, in order.
fn headers_json(headers: &http::HeaderMap) -> serde_json::Value {
    let mut out = BTreeMap::new();
    for (k, v) in headers {
        out.entry(k.as_str().to_string())
            .or_insert_with(Vec::new)
            .push(v.to_str().unwrap_or("").to_string());
    }
    serde_json::json!(out)
}

/// The failure status to answer for an `x-echo-fail: STATUS,TIMES,ID` request, counting it.
fn echo_failure(headers: &http::HeaderMap, failed: &Failed) -> Option<StatusCode> {
    let spec = headers.get("x-echo-fail")?.to_str().ok()?;
    let mut parts = spec.splitn(3, ',');
    let status = StatusCode::from_u16(parts.next()?.trim().parse().ok()?).ok()?;
    let times: u32 = parts.next()?.trim().parse().ok()?;
    let id = parts.next()?.trim().to_string();
    let mut failed = failed.lock().unwrap();
    let n = failed.entry(id).or_default();
    (*n < times).then(|| {
        *n += 1;
        status
    })
}

/// Adds the `x-echo-response-header: NAME: VALUE` headers a request asked for.
fn echo_response_headers(req: &http::HeaderMap, resp: &mut http::HeaderMap) {
    for v in req.get_all("x-echo-response-header") {
        if let Some((n, v)) = v.to_str().ok().and_then(|s| s.split_once(':'))
            && let (Ok(n), Ok(v)) = (
                http::HeaderName::try_from(n.trim()),
                http::HeaderValue::try_from(v.trim()),
            )
        {
            resp.append(n, v);
        }
    }
}

async fn answer(
    name: &'static str,
    delay_ms: u64,
    failed: Failed,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let asked_delay = req
        .headers()
        .get("x-echo-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    if delay_ms + asked_delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms + asked_delay)).await;
    }
    let path = req.uri().path().to_string();
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|s| s.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(status) = echo_failure(req.headers(), &failed) {
        let mut resp = Response::new(
            Full::new(Bytes::from_static(b"failing as asked"))
                .map_err(|n| match n {})
                .boxed(),
        );
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert("x-upstream", name.parse().unwrap());
        return Ok(resp);
    }
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        return Ok(grpc_echo(name, req));
    }
    if path == "/echo" {
        let mut resp = Response::new(req.into_body().boxed());
        resp.headers_mut()
            .insert("x-upstream", name.parse().unwrap());
        return Ok(resp);
    }
    let headers = headers_json(req.headers());
    let doc = serde_json::json!({
        "upstream": name,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    let mut resp = Response::new(
        Full::new(Bytes::from(doc.to_string()))
            .map_err(|n| match n {})
            .boxed(),
    );
    resp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    echo_response_headers(req.headers(), resp.headers_mut());
    Ok(resp)
}

/// Streams every gRPC frame back as it arrives, then `grpc-status: 0` — a bidirectional echo
/// at the wire level.
fn grpc_echo(name: &'static str, req: Request<Incoming>) -> Response<TestBody> {
    let seen = headers_json(req.headers()).to_string();
    let mut extra = http::HeaderMap::new();
    echo_response_headers(req.headers(), &mut extra);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data()
                        && tx.send(Ok(Frame::data(data))).await.is_err()
                    {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    resp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    if let Ok(v) = http::HeaderValue::try_from(seen) {
        resp.headers_mut().insert("x-echo-request-headers", v);
    }
    for (k, v) in &extra {
        resp.headers_mut().append(k, v.clone());
    }
    resp
}

/// An HTTP/1.1 upstream that answers only the first request on each connection, then closes
/// without saying so — at once, or (`read_next`) after reading the next request. Returns its
/// address and a count of accepted connections.
pub async fn one_answer_upstream(read_next: bool) -> (SocketAddr, Arc<AtomicU64>) {
    counting_upstream(move |mut s| async move {
        let mut buf = [0u8; 4096];
        if s.read(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        if read_next {
            let _ = s.read(&mut buf).await;
        }
    })
    .await
}

/// A raw TCP upstream that counts the connections it accepts and runs `serve` on each.
pub async fn counting_upstream<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicU64>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(serve(s));
        }
    });
    (addr, conns)
}

/// A TCP echo server.
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A server-speaks-first TCP service: sends a banner on connect, then echoes.
pub async fn banner_server(banner: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.write_all(banner).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A WebSocket echo server.
pub async fn ws_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A running proxy and its listeners' bound addresses.
pub struct TestProxy {
    pub proxy: Arc<Proxy>,
}

impl TestProxy {
    pub async fn addr(&self, listener: &str) -> SocketAddr {
        self.proxy
            .listener_addr(listener)
            .await
            .unwrap_or_else(|| panic!("no listener {listener}"))
    }

    /// The value of a metric line starting with `prefix` (name and labels), or 0.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.proxy
            .metrics_text()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl TestProxy {
    /// Waits (up to 5 s) until the metric lines starting with `prefix` sum to at least
    /// `min`; returns the sum.
    pub async fn wait_metric(&self, prefix: &str, min: f64) -> f64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let v = self.metric(prefix);
            if v >= min || std::time::Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// Workload credentials for `spiffe://mesh.test/ns/default/sa/SA`, signed by `ca`.
pub fn creds(ca: &trellis_identity::Ca, sa: &str) -> Arc<trellis_identity::Credentials> {
    use std::time::{Duration, SystemTime};
    let id = trellis_identity::SpiffeId::new("mesh.test", "default", sa).unwrap();
    let key = trellis_identity::WorkloadKey::generate().unwrap();
    let issued = ca
        .sign(
            &key.csr(Some(&id)).unwrap(),
            &id,
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
    trellis_identity::Credentials::new("mesh.test", &issued.chain_pem, &key.pem(), ca.bundle_pem())
        .unwrap()
}

/// A test CA for trust domain `mesh.test`.
pub fn test_ca() -> trellis_identity::Ca {
    let pem = trellis_identity::Ca::generate("mesh.test", std::time::Duration::from_secs(86400));
    trellis_identity::Ca::load(&pem.unwrap()).unwrap()
}

/// Starts a proxy from YAML (listeners should use port 0).
pub async fn start_proxy(yaml: &str) -> TestProxy {
    let resources =
        trellis_api::parse_documents("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::start(&resources, "test.yaml")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    TestProxy { proxy }
}

/// A `Proxy` resource with one outbound listener `out` for `service` and an admin port.
pub fn proxy_yaml(service: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: test}}
spec:
  admin: {{address: 127.0.0.1:0}}
  detectTimeout: 200ms
  requestTimeout: 5s
  outbound:
    - {{name: out, address: 127.0.0.1:0, service: {{name: {service}}}}}
    - {{name: http-proxy, address: 127.0.0.1:0, httpProxy: true}}
"
    )
}

/// A proxy whose outbound listener `out` goes to service `app` (port 80) at `endpoints`.
pub async fn app_proxy(endpoints: &[SocketAddr]) -> TestProxy {
    start_proxy(&format!(
        "{}{}",
        proxy_yaml("app"),
        service_yaml("app", 80, endpoints)
    ))
    .await
}

/// A `Service` with the given endpoints.
pub fn service_yaml(name: &str, port: u16, endpoints: &[SocketAddr]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{address: \"{a}\"}}"))
        .collect();
    format!(
        "---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: {name}}}
spec:
  ports: [{{port: {port}}}]
  endpoints: [{}]
",
        eps.join(", ")
    )
}

pub fn h1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn upstream(&self) -> String {
        self.headers
            .get("x-upstream")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

pub async fn send(client: &Client<HttpConnector, Full<Bytes>>, req: Request<Full<Bytes>>) -> Got {
    let resp = client.request(req).await.expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET `path` through `client` (so its connection pool is reused across calls).
pub async fn get_via(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> Got {
    send(
        client,
        Request::get(format!("http://{addr}{path}"))
            .body(Full::default())
            .unwrap(),
    )
    .await
}

pub async fn get(addr: SocketAddr, path: &str) -> Got {
    send(
        &h1_client(),
        Request::get(format!("http://{addr}{path}"))
            .body(Full::default())
            .unwrap(),
    )
    .await
}

/// What a scripted upstream answers: status, extra headers, and whether to echo the request
/// body (else the body is `name`).
pub struct Script {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub echo: bool,
    /// Wait before answering.
    pub delay: Duration,
}

impl Script {
    pub fn status(status: u16) -> Script {
        Script {
            status,
            headers: Vec::new(),
            echo: false,
            delay: Duration::ZERO,
        }
    }
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Script {
        self.headers.push((name, value.into()));
        self
    }
    pub fn echo(mut self) -> Script {
        self.echo = true;
        self
    }
}

/// An upstream (HTTP/1.1 and h2c) that reads each request's body whole, then answers as
/// `script` says given the request's head and its number (from 0). `hits` counts requests.
pub async fn scripted_upstream<F>(name: &'static str, script: F) -> Upstream
where
    F: Fn(u64, &http::request::Parts) -> Script + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let conns = Arc::new(AtomicU64::new(0));
    let (h, c) = (hits.clone(), conns.clone());
    let script = Arc::new(script);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::Relaxed);
            let (h, script) = (h.clone(), script.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let n = h.fetch_add(1, Ordering::Relaxed);
                    let script = script.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let s = script(n, &parts);
                        let bytes = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if !s.delay.is_zero() {
                            tokio::time::sleep(s.delay).await;
                        }
                        let body = if s.echo { bytes } else { Bytes::from(name) };
                        let mut resp =
                            Response::new(Full::new(body).map_err(|n| match n {}).boxed());
                        *resp.status_mut() = StatusCode::from_u16(s.status).unwrap();
                        resp.headers_mut()
                            .insert("x-upstream", name.parse().unwrap());
                        for (k, v) in s.headers {
                            resp.headers_mut().insert(k, v.parse().unwrap());
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
    Upstream { addr, hits, conns }
}

/// An HTTP/1.1 upstream answering every request with the status currently in `status`
/// (a body naming it, and `x-upstream: name`), and `/healthz` with the one in `health`;
/// counts requests by path (`/healthz` apart).
pub struct StatusUpstream {
    pub addr: SocketAddr,
    pub status: Arc<std::sync::atomic::AtomicU16>,
    /// The status of `/healthz` (200 to begin with).
    pub health: Arc<std::sync::atomic::AtomicU16>,
    /// Requests other than `/healthz`.
    pub hits: Arc<AtomicU64>,
    /// Requests for `/healthz`.
    pub checks: Arc<AtomicU64>,
}

/// A [`StatusUpstream`] answering `status` to begin with.
pub async fn status_upstream(name: &'static str, status: u16) -> StatusUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(std::sync::atomic::AtomicU16::new(status));
    let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
    let (hits, checks) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (s, hs, h, c) = (status.clone(), health.clone(), hits.clone(), checks.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (s, hs, h, c) = (s.clone(), hs.clone(), h.clone(), c.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (counter, status) = if req.uri().path() == "/healthz" {
                        (&c, &hs)
                    } else {
                        (&h, &s)
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let resp = Response::builder()
                        .status(status.load(Ordering::Relaxed))
                        .header("x-upstream", name)
                        .body(Full::new(Bytes::from_static(b"x")))
                        .unwrap();
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    StatusUpstream {
        addr,
        status,
        health,
        hits,
        checks,
    }
}

/// A hung upstream (the effect of SIGSTOP on its process): connections are accepted and
/// held open, and nothing is ever read or answered. Counts accepted connections.
pub async fn hung_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::Relaxed);
            held.push(s);
        }
    });
    (addr, accepted)
}

/// GET `path` on a proxy's admin listener, as JSON.
pub async fn admin_json(p: &TestProxy, path: &str) -> serde_json::Value {
    get(p.proxy.admin_addr(), path).await.json()
}

/// An upstream that holds every request until [`Held::release`], counting the requests
/// that arrived (readable as a readiness signal) and the connections it accepted.
pub struct Held {
    pub addr: SocketAddr,
    /// Requests that reached the upstream so far.
    pub arrived: tokio::sync::watch::Receiver<u64>,
    /// Connections accepted.
    pub conns: Arc<AtomicU64>,
    open: tokio::sync::watch::Sender<bool>,
}

impl Held {
    /// Lets every held request, and every later one, through.
    pub fn release(&self) {
        let _ = self.open.send(true);
    }

    /// Waits (at most 10 s) until `n` requests have arrived.
    pub async fn wait_arrived(&self, n: u64) {
        let mut rx = self.arrived.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|a| *a >= n))
            .await
            .unwrap_or_else(|_| panic!("{} of {n} requests arrived", *self.arrived.borrow()))
            .unwrap();
    }

    pub fn arrived_now(&self) -> u64 {
        *self.arrived.borrow()
    }
}

pub async fn held_upstream() -> Held {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = tokio::sync::watch::channel(0u64);
    let arrived_tx = Arc::new(arrived_tx);
    let (open, open_rx) = tokio::sync::watch::channel(false);
    let conns = Arc::new(AtomicU64::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::Relaxed);
            let (arrived_tx, open_rx) = (arrived_tx.clone(), open_rx.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let mut open_rx = open_rx.clone();
                    arrived_tx.send_modify(|n| *n += 1);
                    async move {
                        let _ = open_rx.wait_for(|o| *o).await;
                        let mut resp = Response::new(
                            Full::new(Bytes::from_static(b"ok"))
                                .map_err(|n| match n {})
                                .boxed(),
                        );
                        resp.headers_mut()
                            .insert("x-upstream", "held".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Held {
        addr,
        arrived,
        conns,
        open,
    }
}

/// A gRPC message with one string, as the echo upstream streams back.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Note {
    #[prost(string, tag = "1")]
    pub text: String,
}

/// A bidirectional gRPC call through `addr` (`/echo.Echo/Chat` against an echo upstream):
/// each of `words` is sent after the previous one's echo arrived, so a proxy that buffered
/// the stream would hang here; then the stream must end with `grpc-status: 0`.
pub async fn grpc_chat(addr: SocketAddr, words: &[&str]) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Note>(4);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let codec = tonic_prost::ProstCodec::<Note, Note>::default();
    let path = http::uri::PathAndQuery::from_static("/echo.Echo/Chat");
    let call = tokio::spawn(async move {
        client
            .streaming(tonic::Request::new(outbound), path, codec)
            .await
    });
    let (first, rest) = words.split_first().expect("at least one word");
    tx.send(Note {
        text: (*first).into(),
    })
    .await
    .unwrap();
    let mut stream = call.await.unwrap().expect("call failed").into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().text, *first);
    for word in rest {
        tx.send(Note {
            text: (*word).into(),
        })
        .await
        .unwrap();
        assert_eq!(stream.message().await.unwrap().unwrap().text, *word);
    }
    drop(tx);
    // End of stream with grpc-status 0 in the trailers.
    assert!(stream.message().await.unwrap().is_none());
    let trailers = stream.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
}

/// A fixed-capacity app (HTTP/1.1 and h2c): `capacity` requests are served at once, each taking the
/// service time in `service_ms` (changeable while it runs); the rest wait their turn in
/// arrival order, as in a thread pool with a queue. `served` counts answers.
pub struct CapacityApp {
    pub addr: SocketAddr,
    pub service_ms: Arc<AtomicU64>,
    pub served: Arc<AtomicU64>,
}

pub async fn capacity_app(capacity: usize, service_ms: u64) -> CapacityApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let workers = Arc::new(tokio::sync::Semaphore::new(capacity));
    let service = Arc::new(AtomicU64::new(service_ms));
    let served = Arc::new(AtomicU64::new(0));
    let (w, s, n) = (workers.clone(), service.clone(), served.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (w, s, n) = (w.clone(), s.clone(), n.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (w, s, n) = (w.clone(), s.clone(), n.clone());
                    async move {
                        // Fair: waiters get a worker in arrival order.
                        let _worker = w.acquire().await.unwrap();
                        tokio::time::sleep(Duration::from_millis(s.load(Ordering::Relaxed))).await;
                        n.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    CapacityApp {
        addr,
        service_ms: service,
        served,
    }
}

/// An app serving its own TLS (certificate for `app.example`) that echoes 5 bytes.
pub async fn tls_echo_app() -> (SocketAddr, rustls::pki_types::CertificateDer<'static>) {
    let cert = rcgen::generate_simple_self_signed(vec!["app.example".into()]).unwrap();
    let der = cert.cert.der().clone();
    let config = rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(s).await.unwrap();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(&buf).await.unwrap();
        tls.flush().await.unwrap();
    });
    (addr, der)
}

/// Speaks TLS to `app.example` through `addr` (a sidecar): the handshake must complete end to
/// end with the app's own certificate (nothing in between terminated it), then 5 bytes echo.
pub async fn app_tls_roundtrip(
    addr: SocketAddr,
    app_cert: &rustls::pki_types::CertificateDer<'static>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(app_cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("app.example").unwrap();
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .unwrap()
    .expect("the app's own handshake completes end to end");
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], *app_cert);
    tls.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
}
