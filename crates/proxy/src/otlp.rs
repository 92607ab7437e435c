//! Span export over OTLP (gRPC or HTTP/protobuf), off the request path: requests hand
//! finished spans to a bounded queue and never wait; one task batches them and sends them to
//! the collector. When the collector is slow or gone the queue fills and further spans are
//! dropped and counted, so tracing can never slow traffic or grow memory without bound.
//!
//! The message types are the OTLP trace protocol's (opentelemetry.proto.collector.trace.v1
//! and trace/common/resource v1), written out with prost's derive for the fields Trellis
//! sets; field numbers follow the published protocol, which is what collectors decode.

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// `ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    /// Spans grouped by the resource (process) that produced them.
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

/// `ResourceSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    /// The proxy as a resource (`service.name` etc.).
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    /// Spans grouped by instrumentation scope.
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

/// `Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    /// Attributes.
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

/// `ScopeSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    /// The instrumentation scope (`trellis-proxy`).
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    /// Spans.
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
}

/// `InstrumentationScope`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Version.
    #[prost(string, tag = "2")]
    pub version: String,
}

/// `Span`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    /// 16 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    /// 8 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    /// W3C `tracestate`.
    #[prost(string, tag = "3")]
    pub trace_state: String,
    /// 8 bytes, or empty for a root span.
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    /// Name.
    #[prost(string, tag = "5")]
    pub name: String,
    /// `SpanKind`: 2 server, 3 client.
    #[prost(int32, tag = "6")]
    pub kind: i32,
    /// Start, Unix nanoseconds.
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    /// End, Unix nanoseconds.
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    /// Attributes.
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    /// Status.
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
    /// W3C trace flags (bit 0: sampled).
    #[prost(fixed32, tag = "16")]
    pub flags: u32,
}

/// `Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// Why it failed.
    #[prost(string, tag = "2")]
    pub message: String,
    /// 0 unset, 1 ok, 2 error.
    #[prost(int32, tag = "3")]
    pub code: i32,
}

/// `KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// Key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Value.
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

/// `AnyValue` (the kinds Trellis sets).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    /// The value.
    #[prost(oneof = "Value", tags = "1, 2, 3")]
    pub value: Option<Value>,
}

/// `AnyValue.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    /// `string_value`.
    #[prost(string, tag = "1")]
    String(String),
    /// `bool_value`.
    #[prost(bool, tag = "2")]
    Bool(bool),
    /// `int_value`.
    #[prost(int64, tag = "3")]
    Int(i64),
}

/// `SpanKind` values.
pub mod kind {
    /// The hop that received the request (inbound).
    pub const SERVER: i32 = 2;
    /// The hop that sent it on (outbound).
    pub const CLIENT: i32 = 3;
}

/// An attribute.
pub fn attr(key: &str, value: impl Into<Value>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(value.into()),
        }),
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.into())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

/// Unix nanoseconds.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// How spans reach the collector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC: `TraceService/Export` on `http://host:4317`.
    Grpc,
    /// OTLP/HTTP with protobuf bodies: `POST /v1/traces` on `http://host:4318`.
    HttpProtobuf,
}

/// Where and how to export.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportConfig {
    /// `http://host:port` (plaintext; the collector runs beside the proxy).
    pub endpoint: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Spans waiting to be sent at most; more are dropped.
    pub queue: usize,
    /// Spans per export request at most.
    pub batch: usize,
    /// Longest a span waits for its batch.
    pub interval: Duration,
    /// Time allowed for one export request.
    pub timeout: Duration,
    /// Resource attributes (`service.name`, ...).
    pub resource: Vec<KeyValue>,
}

/// What the exporter did, for metrics.
#[derive(Debug, Default)]
pub struct Counts {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Spans dropped because their export request failed.
    pub dropped_export_failed: AtomicU64,
}

/// The request path's handle: hands spans to the export task without waiting.
#[derive(Clone, Debug)]
pub struct Exporter {
    tx: mpsc::Sender<Span>,
    counts: Arc<Counts>,
}

impl Exporter {
    /// Starts the export task (on the current runtime); it ends when every handle is gone.
    pub fn start(config: ExportConfig) -> Exporter {
        Exporter::start_counted(config, Arc::default())
    }

    /// Like [`start`](Self::start), counting into `counts` (kept across reconfigurations).
    pub fn start_counted(config: ExportConfig, counts: Arc<Counts>) -> Exporter {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(run(config, rx, counts.clone()));
        Exporter { tx, counts }
    }

    /// Queues `span`, or drops and counts it when the queue is full. Never waits.
    pub fn record(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.counts
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }
}

async fn run(config: ExportConfig, mut rx: mpsc::Receiver<Span>, counts: Arc<Counts>) {
    let mut client = Client::new(&config);
    let mut batch = Vec::with_capacity(config.batch);
    loop {
        // Wait for the first span, then collect until the batch is full or its time is up.
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + config.interval;
        while batch.len() < config.batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let req = request(&config, std::mem::take(&mut batch));
        match tokio::time::timeout(config.timeout, client.send(req)).await {
            Ok(Ok(())) => {
                counts.exported.fetch_add(n, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, spans = n, "span export failed");
                counts.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
            }
            Err(_) => {
                tracing::debug!(spans = n, "span export timed out");
                counts.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
                client = Client::new(&config);
            }
        }
    }
}

fn request(config: &ExportConfig, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: config.resource.clone(),
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "trellis-proxy".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans,
            }],
        }],
    }
}

/// One connection to the collector, made when first needed and again after a failure.
enum Client {
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
    Http {
        authority: String,
        conn: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>>,
    },
    Invalid(String),
}

impl Client {
    fn new(config: &ExportConfig) -> Client {
        match config.protocol {
            Protocol::Grpc => {
                match tonic::transport::Endpoint::from_shared(config.endpoint.clone()) {
                    Ok(e) => Client::Grpc(tonic::client::Grpc::new(
                        e.connect_timeout(config.timeout).connect_lazy(),
                    )),
                    Err(e) => Client::Invalid(e.to_string()),
                }
            }
            Protocol::HttpProtobuf => match config.endpoint.parse::<http::Uri>() {
                Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => {
                    Client::Http {
                        authority: u.authority().map(|a| a.to_string()).unwrap_or_default(),
                        conn: None,
                    }
                }
                _ => Client::Invalid(format!("not an http:// URL: {}", config.endpoint)),
            },
        }
    }

    async fn send(&mut self, req: ExportTraceServiceRequest) -> Result<(), String> {
        match self {
            Client::Invalid(e) => Err(e.clone()),
            Client::Grpc(grpc) => {
                grpc.ready().await.map_err(|e| e.to_string())?;
                let path = http::uri::PathAndQuery::from_static(
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                );
                let codec = tonic_prost::ProstCodec::<ExportTraceServiceRequest, Empty>::default();
                grpc.unary(tonic::Request::new(req), path, codec)
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            }
            Client::Http { authority, conn } => {
                let body = Bytes::from(prost::Message::encode_to_vec(&req));
                let tx = match conn {
                    Some(tx) if !tx.is_closed() => tx,
                    _ => {
                        let stream = tokio::net::TcpStream::connect(authority.as_str())
                            .await
                            .map_err(|e| e.to_string())?;
                        let (tx, c) = hyper::client::conn::http1::handshake(
                            hyper_util::rt::TokioIo::new(stream),
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                        tokio::spawn(c);
                        conn.insert(tx)
                    }
                };
                let request = http::Request::post("/v1/traces")
                    .header(http::header::HOST, authority.as_str())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(http_body_util::Full::new(body))
                    .map_err(|e| e.to_string())?;
                let result = tx.send_request(request).await;
                let resp = match result {
                    Ok(r) => r,
                    Err(e) => {
                        *conn = None;
                        return Err(e.to_string());
                    }
                };
                let status = resp.status();
                // Read the (small) answer so the connection can carry the next batch.
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("collector answered {status}"))
                }
            }
        }
    }
}

/// `ExportTraceServiceResponse`, whose partial-success details are not used.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}
