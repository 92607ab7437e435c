//! An OTLP collector on loopback (gRPC, or HTTP/protobuf), decoding what it receives with the
//! official OpenTelemetry definitions (opentelemetry-proto). Shared with the CLI's tests.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;

/// A span as received, with its resource's attributes.
#[derive(Clone, Debug)]
pub struct Got {
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

impl Got {
    /// A span attribute, as text (ints in decimal).
    pub fn attr(&self, key: &str) -> Option<String> {
        value(&self.span.attributes, key)
    }

    /// A resource attribute, as text.
    pub fn resource_attr(&self, key: &str) -> Option<String> {
        value(&self.resource, key)
    }

    pub fn trace_hex(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_hex(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_hex(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// 0 unset, 1 ok, 2 error.
    pub fn status_code(&self) -> i32 {
        self.span.status.as_ref().map_or(0, |s| s.code)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(kvs: &[KeyValue], key: &str) -> Option<String> {
    let v = kvs.iter().find(|kv| kv.key == key)?.value.clone()?.value?;
    Some(match v {
        any_value::Value::StringValue(s) => s,
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

/// A running collector.
pub struct Collector {
    pub addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
}

struct Grpc(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// OTLP/gRPC.
    pub async fn grpc() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Grpc(tx)))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Collector { addr, rx }
    }

    /// OTLP/HTTP with protobuf bodies; `hang`: never answers (a stuck collector).
    pub async fn http(hang: bool) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            if hang {
                                std::future::pending::<()>().await;
                            }
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let _ = tx.send(ExportTraceServiceRequest::decode(body).unwrap());
                            let answer = ExportTraceServiceResponse::default().encode_to_vec();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(answer),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Collector { addr, rx }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits (at most 20 s) until spans matching `want` have arrived, and returns every span
    /// received so far.
    pub async fn until(&mut self, seen: &mut Vec<Got>, want: impl Fn(&[Got]) -> bool) {
        let wait = async {
            while !want(seen) {
                let r = self.rx.recv().await.expect("collector gone");
                for rs in r.resource_spans {
                    let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            seen.push(Got {
                                resource: resource.clone(),
                                span,
                            });
                        }
                    }
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .is_err()
        {
            panic!("spans did not arrive in 20 s; got {seen:#?}");
        }
    }

    /// Waits (at most 10 s) for export requests carrying `spans` spans in all, and returns
    /// them as they came (one per batch).
    pub async fn requests(&mut self, spans: usize) -> Vec<ExportTraceServiceRequest> {
        let mut out = Vec::new();
        let mut count = 0;
        tokio::time::timeout(Duration::from_secs(10), async {
            while count < spans {
                let r = self.rx.recv().await.expect("collector gone");
                count += r
                    .resource_spans
                    .iter()
                    .flat_map(|rs| &rs.scope_spans)
                    .map(|ss| ss.spans.len())
                    .sum::<usize>();
                out.push(r);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{count} of {spans} spans in 10 s"));
        out
    }

    /// Waits for `n` spans in all, and returns them.
    pub async fn spans(&mut self, n: usize) -> Vec<Got> {
        let mut seen = Vec::new();
        self.until(&mut seen, |s| s.len() >= n).await;
        seen
    }
}
