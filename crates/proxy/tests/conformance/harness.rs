//! The table's request runner: a world of echo servers, a client proxy per namespace, and
//! the comparison of what happened with what a case wants.

use crate::support::*;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// One upstream case: a route set and the requests that check it.
pub(crate) struct Suite {
    /// The upstream case's `ShortName`.
    pub(crate) name: &'static str,
    /// HTTPRoutes and GRPCRoutes (YAML documents; namespace `mesh` unless they say).
    pub(crate) routes: &'static str,
    pub(crate) cases: &'static [Case],
}

pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) req: Req,
    pub(crate) want: Want,
}

/// A request, and how it is sent.
#[derive(Clone, Copy)]
pub(crate) struct Req {
    /// Namespace of the client (its proxy's namespace).
    pub(crate) from: &'static str,
    /// The client proxy's listener: `http-proxy` (routes by `Host`) or an explicit upstream
    /// (`echo`, `echo-v1`, `echo-v2` on port 80, `echo-grpc` on 7070).
    pub(crate) via: &'static str,
    pub(crate) method: &'static str,
    /// `Host` header; empty leaves the client's own.
    pub(crate) host: &'static str,
    /// Path and query; for gRPC `/service/method`.
    pub(crate) path: &'static str,
    pub(crate) headers: &'static [(&'static str, &'static str)],
    /// A gRPC call over HTTP/2 (method POST, one empty message).
    pub(crate) grpc: bool,
    /// Request body size in bytes.
    pub(crate) body_len: usize,
    /// Response headers the echo backend adds.
    pub(crate) backend_sets: &'static [(&'static str, &'static str)],
    /// How long the echo backend waits before answering.
    pub(crate) delay_ms: u64,
    /// The backend answers this status to the first N tries of this request.
    pub(crate) fail: Option<(u16, u32)>,
    /// Times to send it (distributions).
    pub(crate) repeat: u32,
}

/// What must happen. `None` and empty lists are not checked.
#[derive(Clone, Copy)]
pub(crate) struct Want {
    /// 0: any 2xx.
    pub(crate) status: u16,
    /// The echo server that answered.
    pub(crate) backend: Option<&'static str>,
    /// Path and query the backend received.
    pub(crate) path: Option<&'static str>,
    /// `Host` the backend received.
    pub(crate) host: Option<&'static str>,
    /// Request headers the backend received (several values joined by `,`).
    pub(crate) headers: &'static [(&'static str, &'static str)],
    /// Request headers the backend must not receive.
    pub(crate) absent: &'static [&'static str],
    pub(crate) resp_headers: &'static [(&'static str, &'static str)],
    pub(crate) resp_absent: &'static [&'static str],
    pub(crate) location: Option<&'static str>,
    pub(crate) grpc_status: Option<&'static str>,
    /// Share of answers per backend (or per status, for answers not 200) over `repeat`.
    pub(crate) split: &'static [(&'static str, f64)],
    /// Share of requests copied to each mirror backend.
    pub(crate) mirrored: &'static [(&'static str, f64)],
    /// A request header whose value must name the backend that answered (per-backend
    /// filters applied to the backend chosen, not to another).
    pub(crate) names_backend: Option<&'static str>,
}

pub(crate) const fn get(host: &'static str, path: &'static str) -> Req {
    Req {
        from: "mesh",
        via: "http-proxy",
        method: "GET",
        host,
        path,
        headers: &[],
        grpc: false,
        body_len: 0,
        backend_sets: &[],
        delay_ms: 0,
        fail: None,
        repeat: 1,
    }
}

/// `GET http://echo{path}`.
pub(crate) const fn echo(path: &'static str) -> Req {
    get("echo", path)
}

/// A gRPC call to service `echo` port 7070.
pub(crate) const fn grpc(path: &'static str) -> Req {
    Req {
        via: "echo-grpc",
        method: "POST",
        host: "",
        grpc: true,
        ..get("", path)
    }
}

pub(crate) const fn status(code: u16) -> Want {
    Want {
        status: code,
        backend: None,
        path: None,
        host: None,
        headers: &[],
        absent: &[],
        resp_headers: &[],
        resp_absent: &[],
        location: None,
        grpc_status: None,
        split: &[],
        mirrored: &[],
        names_backend: None,
    }
}

/// 200 from `backend`.
pub(crate) const fn ok(backend: &'static str) -> Want {
    Want {
        backend: Some(backend),
        ..status(200)
    }
}

/// A redirect, answered by the proxy itself.
pub(crate) const fn redirect(code: u16, location: &'static str) -> Want {
    Want {
        location: Some(location),
        ..status(code)
    }
}

/// gRPC UNIMPLEMENTED: no rule of the port's GRPCRoutes matched.
pub(crate) const UNIMPLEMENTED: Want = Want {
    grpc_status: Some("12"),
    ..status(200)
};

pub(crate) const fn case(name: &'static str, req: Req, want: Want) -> Case {
    Case { name, req, want }
}

// The running world: echo servers, and a client proxy per namespace for each suite.

const SERVICES: [&str; 4] = ["echo", "echo-v1", "echo-v2", "echo-v3"];

pub(crate) struct World {
    upstreams: HashMap<&'static str, Upstream>,
    h1: Client<HttpConnector, Full<Bytes>>,
    h2: Client<HttpConnector, Full<Bytes>>,
}

impl World {
    pub(crate) async fn start() -> World {
        let mut upstreams = HashMap::new();
        for name in SERVICES {
            upstreams.insert(name, upstream(name).await);
        }
        World {
            upstreams,
            h1: h1_client(),
            h2: h2_client(),
        }
    }

    /// The whole config of a client proxy in namespace `ns`: its listeners, the Services,
    /// and the suite's routes.
    fn config(&self, ns: &str, routes: &str) -> String {
        let mut yaml = format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: client, namespace: {ns}}}
spec:
  admin: {{address: 127.0.0.1:0}}
  detectTimeout: 200ms
  requestTimeout: 5s
  outbound:
    - {{name: http-proxy, address: 127.0.0.1:0, httpProxy: true}}
    - {{name: echo, address: 127.0.0.1:0, service: {{name: echo, namespace: mesh, port: 80}}}}
    - {{name: echo-grpc, address: 127.0.0.1:0, service: {{name: echo, namespace: mesh, port: 7070}}}}
    - {{name: echo-v1, address: 127.0.0.1:0, service: {{name: echo-v1, namespace: mesh, port: 80}}}}
    - {{name: echo-v2, address: 127.0.0.1:0, service: {{name: echo-v2, namespace: mesh, port: 80}}}}
"
        );
        for name in SERVICES {
            yaml += &format!(
                "---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: {name}, namespace: mesh}}
spec:
  ports: [{{name: http, port: 80}}, {{name: http-alt, port: 8080}}, {{name: grpc, port: 7070, appProtocol: grpc}}]
  endpoints: [{{address: \"{}\"}}]
",
                self.upstreams[name].addr
            );
        }
        yaml + routes
    }

    pub(crate) async fn proxy(&self, ns: &str, routes: &str) -> Result<TestProxy, String> {
        let resources = trellis_api::parse_documents("routes.yaml", &self.config(ns, routes))
            .map_err(|e| e.to_string())?;
        let proxy = trellis_proxy::Proxy::start(&resources, "routes.yaml")
            .await
            .map_err(|e| e.to_string())?;
        Ok(TestProxy { proxy })
    }

    fn hits(&self, name: &str) -> u64 {
        self.upstreams
            .get(name)
            .map_or(0, |u| u.hits.load(Ordering::Relaxed))
    }

    /// Runs every case of `suite`; returns a line per failed case.
    async fn run(&self, suite: &Suite) -> Vec<String> {
        let mut proxies: HashMap<&str, TestProxy> = HashMap::new();
        let mut failures = Vec::new();
        for (i, c) in suite.cases.iter().enumerate() {
            let label = format!(
                "[{}] {}: {} {}{}{} (from {}, via {})",
                suite.name,
                c.name,
                c.req.method,
                c.req.host,
                c.req.path,
                if c.req.headers.is_empty() {
                    String::new()
                } else {
                    format!(" {:?}", c.req.headers)
                },
                c.req.from,
                c.req.via
            );
            if !proxies.contains_key(c.req.from) {
                match self.proxy(c.req.from, suite.routes).await {
                    Ok(p) => {
                        proxies.insert(c.req.from, p);
                    }
                    Err(e) => {
                        failures.push(format!("{label}: the config was refused: {e}"));
                        continue;
                    }
                }
            }
            let proxy = &proxies[c.req.from];
            let errs = self.check(proxy, c, &format!("{}/{i}", suite.name)).await;
            if !errs.is_empty() {
                failures.push(format!("{label}:\n    {}", errs.join("\n    ")));
            }
        }
        failures
    }

    /// Sends a case's request (`repeat` times) and compares what happened with its `want`.
    async fn check(&self, proxy: &TestProxy, c: &Case, id: &str) -> Vec<String> {
        let Some(addr) = proxy.proxy.listener_addr(c.req.via).await else {
            return vec![format!("no listener {}", c.req.via)];
        };
        let want = &c.want;
        let before: Vec<(u64, f64)> = want
            .mirrored
            .iter()
            .map(|(m, _)| (self.hits(m), mirrored(proxy, m)))
            .collect();
        let mut errs = Vec::new();
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for n in 0..c.req.repeat {
            let got = match self.send(addr, &c.req, &format!("{id}/{n}")).await {
                Ok(g) => g,
                Err(e) => {
                    errs.push(e);
                    break;
                }
            };
            if want.split.is_empty() {
                errs.extend(compare(want, &got));
            } else {
                let key = if got.status == 200 {
                    got.upstream()
                } else {
                    got.status.as_str().to_string()
                };
                *counts.entry(key).or_default() += 1;
                errs.extend(names_backend(want, &got));
            }
            if !errs.is_empty() {
                break;
            }
        }
        let n = f64::from(c.req.repeat);
        for (key, share) in want.split {
            let count = f64::from(counts.get(*key).copied().unwrap_or(0));
            if !within(count, n, *share) {
                errs.push(format!(
                    "share of {key}: expected {share} of {n}, got {count} (all: {counts:?})"
                ));
            }
        }
        for (key, count) in &counts {
            if !want.split.iter().any(|(k, _)| k == key) {
                errs.push(format!("{count} answers from {key}, which should get none"));
            }
        }
        for ((m, share), (hits, decided)) in want.mirrored.iter().zip(before) {
            // The proxy counts a copy when it decides to send it; the copy arrives later.
            let copies = mirrored(proxy, m) - decided;
            let arrived = tokio::time::timeout(Duration::from_secs(5), async {
                while ((self.hits(m) - hits) as f64) < copies {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            if arrived.is_err() {
                errs.push(format!(
                    "mirror {m}: {copies} copies sent, {} arrived",
                    self.hits(m) - hits
                ));
            }
            if !within(copies, n, *share) {
                errs.push(format!(
                    "mirror {m}: expected a share of {share} of {n} requests, got {copies}"
                ));
            }
        }
        errs
    }

    async fn send(&self, addr: SocketAddr, r: &Req, id: &str) -> Result<Got, String> {
        let mut b = Request::builder()
            .method(r.method)
            .uri(format!("http://{addr}{}", r.path));
        if !r.host.is_empty() {
            b = b.header("host", r.host);
        }
        for (k, v) in r.headers {
            b = b.header(*k, *v);
        }
        for (k, v) in r.backend_sets {
            b = b.header("x-echo-response-header", format!("{k}: {v}"));
        }
        if r.delay_ms > 0 {
            b = b.header("x-echo-delay-ms", r.delay_ms.to_string());
        }
        if let Some((code, times)) = r.fail {
            b = b.header("x-echo-fail", format!("{code},{times},{id}"));
        }
        let body = if r.grpc {
            b = b
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            Bytes::from_static(b"\0\0\0\0\0")
        } else {
            Bytes::from(vec![b'x'; r.body_len])
        };
        let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
        let client = if r.grpc { &self.h2 } else { &self.h1 };
        let sent = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::BodyExt::collect(body)
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(Got {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        })
        .await;
        match sent {
            Ok(Ok(got)) => Ok(got),
            Ok(Err(e)) => Err(format!("request failed: {e}")),
            Err(_) => Err("no answer within 10s".into()),
        }
    }
}

/// Copies of requests the proxy has sent to mirror backend service `name`.
fn mirrored(proxy: &TestProxy, name: &str) -> f64 {
    let backend = format!("backend=\"mesh/{name}:");
    proxy
        .proxy
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("trellis_http_mirrored_requests_total{") && l.contains(&backend))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether `count` of `n` tries is a plausible draw at probability `p` (four standard
/// deviations; exact at 0 and 1).
fn within(count: f64, n: f64, p: f64) -> bool {
    let sd = (n * p * (1.0 - p)).sqrt();
    (count - n * p).abs() <= 4.0 * sd + 1e-9
}

/// Every value of a header, joined by `,` as one field.
fn joined(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("<not text>"))
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// What the echo backend saw: the JSON description it answered with (HTTP), or the request
/// headers it returned in `x-echo-request-headers` (gRPC).
fn seen(got: &Got) -> Result<serde_json::Value, String> {
    if let Some(h) = got.headers.get("x-echo-request-headers") {
        let headers: serde_json::Value = serde_json::from_slice(h.as_bytes())
            .map_err(|e| format!("x-echo-request-headers is not JSON: {e}"))?;
        return Ok(serde_json::json!({ "headers": headers }));
    }
    serde_json::from_slice(&got.body).map_err(|_| {
        format!(
            "the backend's view is unknown: status {}, body {:?}",
            got.status,
            String::from_utf8_lossy(&got.body)
        )
    })
}

fn seen_header(doc: &serde_json::Value, name: &str) -> Option<String> {
    let values = doc["headers"][name.to_ascii_lowercase()].as_array()?;
    Some(
        values
            .iter()
            .map(|v| v.as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// Checks `want.names_backend`.
fn names_backend(want: &Want, got: &Got) -> Option<String> {
    let name = want.names_backend?;
    let value = seen(got).map(|doc| seen_header(&doc, name));
    match value {
        Err(e) => Some(e),
        Ok(v) if v.as_deref() == Some(got.upstream().as_str()) => None,
        Ok(v) => Some(format!(
            "backend got header {name}: expected {:?} (the backend that answered), got {v:?}",
            got.upstream()
        )),
    }
}

fn compare(want: &Want, got: &Got) -> Vec<String> {
    let mut errs = Vec::new();
    let mut expect = |what: String, expected: Option<&str>, actual: Option<String>| {
        if expected != actual.as_deref() {
            errs.push(format!("{what}: expected {expected:?}, got {actual:?}"));
        }
    };
    let status_ok = match want.status {
        0 => got.status.is_success(),
        s => got.status == s,
    };
    if !status_ok {
        let reason = got
            .headers
            .get("trellis-proxy-error")
            .map(|v| format!(" ({})", v.to_str().unwrap_or("")))
            .unwrap_or_default();
        let expected = match want.status {
            0 => "2xx".to_string(),
            s => s.to_string(),
        };
        expect(
            "status".into(),
            Some(expected.as_str()),
            Some(format!("{}{reason}", got.status.as_str())),
        );
    }
    if let Some(b) = want.backend {
        expect("backend".into(), Some(b), Some(got.upstream()));
    }
    if let Some(l) = want.location {
        expect("location".into(), Some(l), joined(&got.headers, "location"));
    }
    if let Some(g) = want.grpc_status {
        expect(
            "grpc-status".into(),
            Some(g),
            joined(&got.headers, "grpc-status"),
        );
    }
    for (name, value) in want.resp_headers {
        expect(
            format!("response header {name}"),
            Some(*value),
            joined(&got.headers, name),
        );
    }
    for name in want.resp_absent {
        expect(
            format!("response header {name}"),
            None,
            joined(&got.headers, name),
        );
    }
    errs.extend(names_backend(want, got));
    let backend_checks = want.path.is_some()
        || want.host.is_some()
        || !want.headers.is_empty()
        || !want.absent.is_empty();
    if backend_checks {
        match seen(got) {
            Err(e) => errs.push(e),
            Ok(doc) => {
                let mut expect = |what: String, expected: Option<&str>, actual: Option<String>| {
                    if expected != actual.as_deref() {
                        errs.push(format!("{what}: expected {expected:?}, got {actual:?}"));
                    }
                };
                if let Some(p) = want.path {
                    expect(
                        "backend got path".into(),
                        Some(p),
                        doc["path"].as_str().map(String::from),
                    );
                }
                if let Some(h) = want.host {
                    expect(
                        "backend got host".into(),
                        Some(h),
                        seen_header(&doc, "host"),
                    );
                }
                for (name, value) in want.headers {
                    expect(
                        format!("backend got header {name}"),
                        Some(*value),
                        seen_header(&doc, name),
                    );
                }
                for name in want.absent {
                    expect(
                        format!("backend got header {name}"),
                        None,
                        seen_header(&doc, name),
                    );
                }
            }
        }
    }
    errs
}

/// Runs suites on one world; fails with every failed case.
pub(crate) async fn run(suites: &[&Suite]) {
    let world = World::start().await;
    let mut failures = Vec::new();
    let mut total = 0;
    for s in suites {
        total += s.cases.len();
        failures.extend(world.run(s).await);
    }
    assert!(
        failures.is_empty(),
        "{} of {total} conformance cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `echo{path}` with another method.
pub(crate) const fn method(m: &'static str, path: &'static str) -> Req {
    Req {
        method: m,
        ..echo(path)
    }
}

/// Request headers both path-and-header rewrite cases expect.
pub(crate) const REWRITTEN_HEADERS: &[(&str, &str)] = &[
    ("X-Header-Add", "header-val-1"),
    ("X-Header-Add-Append", "append-val-1,header-val-2"),
    ("X-Header-Set", "set-overwrites-values"),
];

/// Request headers the header-modifying cases send.
pub(crate) const HEADERS_TO_MODIFY: &[(&str, &str)] = &[
    ("X-Header-Remove", "remove-val"),
    ("X-Header-Add-Append", "append-val-1"),
    ("X-Header-Set", "set-val"),
];
