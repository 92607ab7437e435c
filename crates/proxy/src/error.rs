//! Why a request failed, and what the client is told: the error decides the status, the
//! readable reason header and whether a retry may help, in one place.

use crate::body::{self, Body};
use http::{HeaderValue, Response, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;

/// The response header carrying the proxy's reason for an error it generated.
pub const ERROR_HEADER: &str = "trellis-proxy-error";

/// Who reads an error response, which decides how much it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// The local app (outbound): the full reason, to help it and its operator.
    App,
    /// A remote caller (inbound): a generic reason only, naming no address, OS error or
    /// policy.
    Remote,
}

/// A failure the proxy answers for.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The chosen backend reference does not resolve (no such Service, or not a Service):
    /// the Gateway API answers its share of traffic with 500 (gRPC: UNAVAILABLE).
    #[error("route {0}: {1}")]
    BackendNotFound(String, String),
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
    /// The backend's circuit breaker refused: a limit is reached (backend, limit, value).
    #[error("circuit breaker: {0} is at its {l} limit of {2}", l = .1.field())]
    Overloaded(std::sync::Arc<str>, crate::breaker::Limit, u32),
    /// A rate limit refused (module `ratelimit`).
    #[error("rate limit: {0}")]
    RateLimited(Box<crate::ratelimit::Refusal>),
    /// An OverloadPolicy shed the request: the service is at its concurrency limit (policy,
    /// `Retry-After`).
    #[error("shed by {0}: the service is at its concurrency limit")]
    Shed(std::sync::Arc<str>, Duration),
}

impl ProxyError {
    /// The HTTP status the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnknownHost(_) | ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::NoBackends(_) | ProxyError::BackendNotFound(..) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProxyError::NoEndpoint(_) | ProxyError::Overloaded(..) | ProxyError::Shed(..) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect(..)
            | ProxyError::NotSent(..)
            | ProxyError::Closed(..)
            | ProxyError::UpstreamProtocol(..) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Denied(_) => StatusCode::FORBIDDEN,
            ProxyError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
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
            ProxyError::BackendNotFound(..) => "backend_not_found",
            ProxyError::NoEndpoint(_) => "no_endpoint",
            ProxyError::Connect(..) => "connect",
            ProxyError::NotSent(..) => "not_sent",
            ProxyError::Closed(..) => "closed",
            ProxyError::UpstreamProtocol(..) => "upstream",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::Denied(_) => "denied",
            ProxyError::Unauthenticated(_) => "unauthenticated",
            ProxyError::Overloaded(..) => "circuit_breaker",
            ProxyError::RateLimited(_) => "rate_limited",
            ProxyError::Shed(..) => "shed",
        }
    }

    /// What a remote caller is told: one of a few fixed reasons, whatever the details.
    pub fn generic_reason(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad request",
            ProxyError::UnknownHost(_) | ProxyError::NoRoute(_) => "not found",
            ProxyError::NoBackends(_)
            | ProxyError::BackendNotFound(..)
            | ProxyError::NoEndpoint(_)
            | ProxyError::Connect(..)
            | ProxyError::NotSent(..)
            | ProxyError::Closed(..)
            | ProxyError::UpstreamProtocol(..) => "upstream unavailable",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::Denied(_) => "denied",
            ProxyError::Unauthenticated(_) => "unauthenticated",
            ProxyError::Overloaded(..) | ProxyError::Shed(..) => "overloaded",
            ProxyError::RateLimited(_) => "rate limited",
        }
    }

    /// The response for this error, saying as much as `audience` may read. gRPC clients get
    /// a trailers-only response with the matching `grpc-status`, since they do not read HTTP
    /// statuses.
    pub fn into_response(self, grpc: bool, audience: Audience) -> Response<Body> {
        let reason = match audience {
            Audience::App => self.to_string(),
            Audience::Remote => self.generic_reason().to_string(),
        };
        // grpc-message is always percent-encoded (the gRPC spec); the readable header only
        // when the reason holds a byte beyond printable ASCII.
        let encoded = || {
            HeaderValue::from_str(&grpc_message(&reason))
                .unwrap_or_else(|_| HeaderValue::from_static("proxy error"))
        };
        let reason_value = if reason.bytes().all(|b| (0x20..=0x7E).contains(&b)) {
            HeaderValue::from_str(&reason).unwrap_or_else(|_| encoded())
        } else {
            encoded()
        };
        let mut resp = if grpc {
            let code = match self.status() {
                _ if matches!(self, ProxyError::Overloaded(..)) => "8", // RESOURCE_EXHAUSTED
                _ if matches!(self, ProxyError::BackendNotFound(..)) => "14", // UNAVAILABLE
                StatusCode::TOO_MANY_REQUESTS => "8",                   // RESOURCE_EXHAUSTED
                StatusCode::NOT_FOUND => "12",                          // UNIMPLEMENTED
                StatusCode::GATEWAY_TIMEOUT => "4",                     // DEADLINE_EXCEEDED
                StatusCode::INTERNAL_SERVER_ERROR => "13",              // INTERNAL
                StatusCode::BAD_REQUEST => "3",                         // INVALID_ARGUMENT
                StatusCode::FORBIDDEN => "7",                           // PERMISSION_DENIED
                StatusCode::UNAUTHORIZED => "16",                       // UNAUTHENTICATED
                _ => "14",                                              // UNAVAILABLE
            };
            let mut r = Response::new(body::empty());
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static(code));
            h.insert("grpc-message", encoded());
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
        if let ProxyError::RateLimited(r) = &self {
            r.headers(resp.headers_mut());
        }
        if let ProxyError::Shed(_, after) = &self {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(after.as_secs().max(1)),
            );
        }
        resp
    }
}

/// Percent-encodes a `grpc-message` value as the gRPC spec requires (PROTOCOL-HTTP2.md):
/// bytes outside 0x20–0x7E, and `%` itself, become `%XX` of the UTF-8 encoding.
pub fn grpc_message(text: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| (0x20..=0x7E).contains(&b) && b != b'%';
    if text.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for b in text.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Decodes a percent-encoded grpc-message, as a gRPC client does.
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn grpc_messages_are_percent_encoded_and_decode_back() {
        let cases = [
            ("upstream unavailable", "upstream unavailable"),
            ("100% done", "100%25 done"),
            ("caf\u{e9}", "caf%C3%A9"),
            ("tab\there\nnl", "tab%09here%0Anl"),
            ("\u{1F600}~", "%F0%9F%98%80~"),
            ("%%", "%25%25"),
        ];
        for (text, want) in cases {
            let got = grpc_message(text);
            assert_eq!(got, want, "{text:?}");
            assert!(got.bytes().all(|b| (0x20..=0x7E).contains(&b)));
            assert_eq!(decode(&got), text);
        }
    }

    fn addr() -> SocketAddr {
        "10.1.2.3:8080".parse().unwrap()
    }

    fn text(resp: &Response<Body>, name: &str) -> String {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_backend_not_found_is_500_or_grpc_unavailable() {
        let e = ProxyError::BackendNotFound(
            "default/r/0".into(),
            "Service default/gone does not exist".into(),
        );
        let http = e.clone().into_response(false, Audience::App);
        assert_eq!(http.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            text(&http, ERROR_HEADER),
            "route default/r/0: Service default/gone does not exist"
        );
        let grpc = e.into_response(true, Audience::App);
        assert_eq!(text(&grpc, "grpc-status"), "14");
    }

    #[test]
    fn reasons_a_header_cannot_carry_are_encoded_in_it_too() {
        let e = ProxyError::BadRequest("caf\u{e9} 100%".into());
        let resp = e.clone().into_response(false, Audience::App);
        assert_eq!(text(&resp, ERROR_HEADER), "bad request: caf%C3%A9 100%25");
        let resp = e.into_response(true, Audience::App);
        assert_eq!(
            decode(&text(&resp, "grpc-message")),
            "bad request: caf\u{e9} 100%"
        );
    }

    #[test]
    fn circuit_breaker_refusals_are_503_or_resource_exhausted_naming_the_limit() {
        let e = ProxyError::Overloaded("default/app:80".into(), crate::breaker::Limit::Requests, 4);
        let http = e.clone().into_response(false, Audience::App);
        assert_eq!(http.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            text(&http, ERROR_HEADER),
            "circuit breaker: default/app:80 is at its maxRequests limit of 4"
        );
        let grpc = e.clone().into_response(true, Audience::App);
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(text(&grpc, "grpc-status"), "8");
        let remote = e.into_response(true, Audience::Remote);
        assert_eq!(text(&remote, "grpc-message"), "overloaded");
    }

    #[test]
    fn remote_callers_get_generic_reasons_and_the_app_the_full_one() {
        let errors = [
            ProxyError::Connect(addr(), "Connection refused (os error 111)".into()),
            ProxyError::NotSent(addr(), "broken pipe".into()),
            ProxyError::Closed(addr(), "reset".into()),
            ProxyError::UpstreamProtocol(addr(), "bad head".into()),
            ProxyError::NoEndpoint("default/app:80 at 10.1.2.3:8080".into()),
            ProxyError::NoBackends("default/secret-route".into()),
            ProxyError::BackendNotFound(
                "default/r/0".into(),
                "Service secret/gone does not exist".into(),
            ),
            ProxyError::Denied(Arc::from("default/secret-policy")),
            ProxyError::Unauthenticated("issuer https://10.1.2.3/ unknown".into()),
            ProxyError::Timeout(Duration::from_millis(1500)),
            ProxyError::BadRequest("path: encoded slash (%2F) at byte 2".into()),
            ProxyError::NoRoute("GET /internal/10.1.2.3".into()),
            ProxyError::UnknownHost("secret.internal".into()),
            ProxyError::Overloaded("secret/app:80".into(), crate::breaker::Limit::Requests, 10),
        ];
        for e in errors {
            let (generic, detail) = (e.generic_reason(), e.to_string());
            for grpc in [false, true] {
                let remote = e.clone().into_response(grpc, Audience::Remote);
                assert_eq!(text(&remote, ERROR_HEADER), generic, "{detail}");
                if grpc {
                    assert_eq!(text(&remote, "grpc-message"), generic, "{detail}");
                } else {
                    assert_eq!(remote.status(), e.status(), "{detail}");
                }
                for v in remote.headers().values() {
                    let v = v.to_str().unwrap();
                    for secret in ["10.1.2.3", "secret", "os error", "%2F"] {
                        assert!(!v.contains(secret), "{detail}: {v}");
                    }
                }
                let app = e.clone().into_response(grpc, Audience::App);
                assert_eq!(text(&app, ERROR_HEADER), detail);
                if grpc {
                    assert_eq!(decode(&text(&app, "grpc-message")), detail);
                }
            }
        }
    }
}
