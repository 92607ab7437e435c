//! Why a request failed, and what the client is told: the error decides the status, the
//! readable reason header and whether a retry may help, in one place.

use crate::body::{self, Body};
use http::{HeaderValue, Response, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;

/// The response header carrying the proxy's reason for an error it generated.
pub const ERROR_HEADER: &str = "trellis-proxy-error";

/// A failure the proxy answers for.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request could not be understood.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No service is known for the request's host (HTTP proxy mode).
    #[error("no service for host {0:?}")]
    UnknownHost(String),
    /// No route rule matched.
    #[error("no route matched {0}")]
    NoRoute(String),
    /// The matched rule has no usable backend.
    #[error("route {0} has no backends with weight")]
    NoBackends(String),
    /// The backend has no endpoint that can take traffic.
    #[error("no available endpoint for {0}")]
    NoEndpoint(String),
    /// Connecting to the endpoint failed.
    #[error("upstream connect failed: {0}: {1}")]
    Connect(SocketAddr, String),
    /// The connection closed before the request was written (a stale pooled connection).
    #[error("upstream {0} closed the connection before the request was sent: {1}")]
    NotSent(SocketAddr, String),
    /// The connection closed after the request was sent, before any response.
    #[error("upstream {0} closed the connection before responding: {1}")]
    Closed(SocketAddr, String),
    /// The endpoint broke the protocol or reset the connection.
    #[error("upstream {0} failed: {1}")]
    UpstreamProtocol(SocketAddr, String),
    /// No response headers within the request timeout.
    #[error("upstream did not respond within {0:?}")]
    Timeout(Duration),
    /// An authorization policy (or the default) refused the caller.
    #[error("denied by {0}")]
    Denied(std::sync::Arc<str>),
    /// Request authentication refused the request's token (or its absence).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
}

impl ProxyError {
    /// The HTTP status the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnknownHost(_) | ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::NoBackends(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NoEndpoint(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(..)
            | ProxyError::NotSent(..)
            | ProxyError::Closed(..)
            | ProxyError::UpstreamProtocol(..) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Denied(_) => StatusCode::FORBIDDEN,
            ProxyError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        }
    }

    /// Whether sending the same request to another endpoint may succeed: only when the
    /// request never reached an endpoint.
    pub fn retryable(&self) -> bool {
        matches!(self, ProxyError::Connect(..) | ProxyError::NotSent(..))
    }

    /// A short machine-friendly label, used in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::UnknownHost(_) => "unknown_host",
            ProxyError::NoRoute(_) => "no_route",
            ProxyError::NoBackends(_) => "no_backends",
            ProxyError::NoEndpoint(_) => "no_endpoint",
            ProxyError::Connect(..) => "connect",
            ProxyError::NotSent(..) => "not_sent",
            ProxyError::Closed(..) => "closed",
            ProxyError::UpstreamProtocol(..) => "upstream",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::Denied(_) => "denied",
            ProxyError::Unauthenticated(_) => "unauthenticated",
        }
    }

    /// The response for this error. gRPC clients get a trailers-only response with the
    /// matching `grpc-status`, since they do not read HTTP statuses.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let reason = self.to_string();
        let reason_value = HeaderValue::from_str(&reason)
            .unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
        let mut resp = if grpc {
            let code = match self.status() {
                StatusCode::NOT_FOUND => "12",             // UNIMPLEMENTED
                StatusCode::GATEWAY_TIMEOUT => "4",        // DEADLINE_EXCEEDED
                StatusCode::INTERNAL_SERVER_ERROR => "13", // INTERNAL
                StatusCode::BAD_REQUEST => "3",            // INVALID_ARGUMENT
                StatusCode::FORBIDDEN => "7",              // PERMISSION_DENIED
                StatusCode::UNAUTHORIZED => "16",          // UNAUTHENTICATED
                _ => "14",                                 // UNAVAILABLE
            };
            let mut r = Response::new(body::empty());
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static(code));
            h.insert("grpc-message", reason_value.clone());
            r
        } else {
            let mut r = Response::new(body::full(format!("{reason}\n")));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        resp.headers_mut().insert(ERROR_HEADER, reason_value);
        resp
    }
}
