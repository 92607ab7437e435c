//! The HTTP plumbing every app shares: the accept loop with graceful shutdown, JSON
//! responses, and outgoing calls with a deadline.

use crate::Service;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub(crate) type Body = Full<Bytes>;
pub(crate) type HttpClient = Client<HttpConnector, Body>;

/// Request bodies are small JSON documents; anything larger is a mistake.
const MAX_BODY: usize = 64 * 1024;
/// How long open connections get to finish their requests after shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// A request with its body already read, so handlers are plain functions.
pub(crate) struct Req {
    pub method: Method,
    pub path: String,
    pub body: Bytes,
    /// The trace context the request came with, passed on to the calls it makes (as any
    /// instrumented app would), so the mesh's spans of one request form one trace.
    pub trace: http::HeaderMap,
}

/// Trace-context headers: W3C, and Zipkin B3 single and multi-header.
const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

fn trace_context(h: &http::HeaderMap) -> http::HeaderMap {
    let mut out = http::HeaderMap::new();
    for name in TRACE_HEADERS {
        for v in h.get_all(name) {
            out.append(name, v.clone());
        }
    }
    out
}

/// How every answer is degraded on purpose (`LATENCY_MS`, `FAIL_STATUS`); `/healthz` never is.
#[derive(Clone, Copy)]
pub(crate) struct Behaviour {
    pub latency: Duration,
    pub fail_status: Option<StatusCode>,
}

/// Accepts connections until `shutdown` resolves, then lets open ones finish.
pub(crate) async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    behaviour: Behaviour,
    shutdown: impl Future<Output = ()>,
) {
    let (stop, stopping) = watch::channel(());
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, service.clone(), behaviour, stopping.clone()));
                }
                // Usually out of file descriptors: back off instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop.send(());
    let drained = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(DRAIN, drained).await;
}

async fn connection(
    stream: TcpStream,
    service: Arc<Service>,
    behaviour: Behaviour,
    mut stopping: watch::Receiver<()>,
) {
    let _ = stream.set_nodelay(true);
    let svc = service_fn(move |req| {
        let service = service.clone();
        async move { Ok::<_, Infallible>(answer(&service, behaviour, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopping.changed() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

async fn answer(service: &Service, behaviour: Behaviour, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let Ok(body) = Limited::new(body, MAX_BODY).collect().await else {
        return error(
            StatusCode::BAD_REQUEST,
            "unreadable or oversized request body",
        );
    };
    let path = parts.uri.path().to_owned();
    if path != "/healthz" {
        if !behaviour.latency.is_zero() {
            tokio::time::sleep(behaviour.latency).await;
        }
        if let Some(status) = behaviour.fail_status {
            return error(status, "failing on purpose (FAIL_STATUS)");
        }
    }
    let req = Req {
        trace: trace_context(&parts.headers),
        method: parts.method,
        path,
        body: body.to_bytes(),
    };
    service.handle(&req).await
}

pub(crate) fn json(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    let json = HeaderValue::from_static("application/json");
    resp.headers_mut().insert(CONTENT_TYPE, json);
    resp
}

pub(crate) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json(status, &json!({ "error": message.to_string() }))
}

/// A refused request: its status and the message for the `{"error": ...}` body.
pub(crate) struct Reject(pub StatusCode, pub String);

impl From<Reject> for Response<Body> {
    fn from(Reject(status, message): Reject) -> Self {
        error(status, message)
    }
}

pub(crate) fn not_found() -> Response<Body> {
    error(StatusCode::NOT_FOUND, "no such route")
}

pub(crate) fn healthy() -> Response<Body> {
    Response::new(Full::new(Bytes::from_static(b"ok")))
}

/// The id in a path like `/products/3`, if `path` starts with `prefix`.
pub(crate) fn id_after<T: std::str::FromStr>(path: &str, prefix: &str) -> Option<T> {
    path.strip_prefix(prefix)?.parse().ok()
}

/// Parses a JSON request body, or answers 400 saying why not.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, Reject> {
    serde_json::from_slice(body)
        .map_err(|e| Reject(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

pub(crate) fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Why an outgoing call got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("timed out")]
    Timeout,
    #[error("{}", chain(.0))]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
}

/// The legacy client's own message ("client error (Connect)") hides the useful part.
fn chain(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// A complete answer from another service.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub(crate) async fn read(resp: Response<Incoming>) -> Result<Reply, CallError> {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub(crate) fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Sends `req` and reads the whole answer, giving up after `limit`.
pub(crate) async fn send(
    client: &HttpClient,
    req: Request<Body>,
    limit: Duration,
) -> Result<Reply, CallError> {
    let call = async { Reply::read(client.request(req).await?).await };
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| CallError::Timeout)?
}
