//! `Proxy`: one sidecar's own settings: its listeners, timeouts and admin port.

use crate::Duration;
use crate::service::AppProtocol;
use serde::{Deserialize, Serialize};

/// `spec` of a `Proxy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxySpec {
    /// The admin listener (`/ready`, `/live`, `/config`, `/metrics`).
    #[serde(default)]
    pub admin: AdminListener,
    /// Listeners for traffic from other sidecars to the local application.
    #[serde(default)]
    pub inbound: Vec<InboundListener>,
    /// Listeners for traffic from the local application to services.
    #[serde(default)]
    pub outbound: Vec<OutboundListener>,
    /// How long to wait for a client's first bytes before treating the connection as opaque
    /// TCP (so server-speaks-first protocols are never stalled for long), or, on an inbound
    /// port whose policy reads requests (paths, methods, headers, tokens), refusing it.
    /// Default `300ms`.
    #[serde(default = "default_detect")]
    pub detect_timeout: Duration,
    /// Default time to establish an upstream connection. Default `1s`.
    #[serde(default = "default_connect")]
    pub connect_timeout: Duration,
    /// Default time until response headers arrive; `0s` disables. Default `15s`.
    #[serde(default = "default_request")]
    pub request_timeout: Duration,
    /// How long an idle pooled upstream connection is kept. Default `60s`.
    #[serde(default = "default_idle")]
    pub idle_timeout: Duration,
    /// On shutdown, how long in-flight work may finish before the proxy exits. Default `10s`.
    #[serde(default = "default_drain")]
    pub drain_timeout: Duration,
    /// How long an HTTP/1.1 client connection may go without starting a request or receiving
    /// response bytes, while no request of it is being handled, before it is closed: the
    /// keep-alive idle timeout, which also bounds a request head sent slowly. Default `30s`.
    #[serde(default = "default_client_idle")]
    pub client_idle_timeout: Duration,
    /// How long an opaque TCP connection or an upgraded stream (WebSocket) may pass no byte
    /// in either direction before it is closed. Generous by default because database and
    /// similar connections are often quiet for long. Default `1h`.
    #[serde(default = "default_tcp_idle")]
    pub tcp_idle_timeout: Duration,
    /// A client connection that has not sent a single byte (and, once forwarded as opaque
    /// TCP, received none either) is closed after this long. Default `10s`.
    #[serde(default = "default_first_byte")]
    pub first_byte_timeout: Duration,
    /// An HTTP/2 stream (request or response body) that moves no data for this long, for
    /// example because its client never reads, is reset and its upstream stream released.
    /// Default `5m`.
    #[serde(default = "default_stream_idle")]
    pub stream_idle_timeout: Duration,
    /// Client connections open at once, over all listeners. Default: derived from the file
    /// limit (half of it, less a reserve, since an opaque TCP connection holds two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Client connections open at once on any one listener. Default: three quarters of
    /// `maxConnections`, so that a flood on one listener leaves room on the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_listener: Option<u32>,
    /// Streams this proxy opens at once on one upstream HTTP/2 connection before it opens
    /// another connection to the endpoint. Default `100` (RFC 9113 recommends that peers
    /// allow at least 100).
    #[serde(default = "default_h2_streams")]
    pub upstream_http2_max_streams: u32,
    /// Upstream HTTP/2 connections per endpoint. Default `8`.
    #[serde(default = "default_h2_conns")]
    pub upstream_http2_max_connections: u32,
    /// Where this proxy runs: its backends prefer endpoints in the same zone, cluster and
    /// region (see `BackendPolicy.spec.locality`).
    #[serde(default, skip_serializing_if = "crate::locality::Locality::is_empty")]
    pub locality: crate::locality::Locality,
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            admin: AdminListener::default(),
            inbound: vec![],
            outbound: vec![],
            detect_timeout: default_detect(),
            connect_timeout: default_connect(),
            request_timeout: default_request(),
            idle_timeout: default_idle(),
            drain_timeout: default_drain(),
            client_idle_timeout: default_client_idle(),
            tcp_idle_timeout: default_tcp_idle(),
            first_byte_timeout: default_first_byte(),
            stream_idle_timeout: default_stream_idle(),
            max_connections: None,
            max_connections_per_listener: None,
            upstream_http2_max_streams: default_h2_streams(),
            upstream_http2_max_connections: default_h2_conns(),
            locality: Default::default(),
        }
    }
}

fn default_detect() -> Duration {
    Duration::from_millis(300)
}
fn default_connect() -> Duration {
    Duration::from_secs(1)
}
fn default_request() -> Duration {
    Duration::from_secs(15)
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}
fn default_client_idle() -> Duration {
    Duration::from_secs(30)
}
fn default_tcp_idle() -> Duration {
    Duration::from_secs(3600)
}
fn default_first_byte() -> Duration {
    Duration::from_secs(10)
}
fn default_stream_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_h2_streams() -> u32 {
    100
}
fn default_h2_conns() -> u32 {
    8
}

/// The admin listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminListener {
    /// `IP:PORT`; default `127.0.0.1:9990`.
    #[serde(default = "default_admin")]
    pub address: String,
}

impl Default for AdminListener {
    fn default() -> Self {
        Self {
            address: default_admin(),
        }
    }
}

fn default_admin() -> String {
    "127.0.0.1:9990".into()
}

/// A listener that forwards to the local application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundListener {
    /// Listener name, used in metrics.
    pub name: String,
    /// `IP:PORT` to listen on.
    pub address: String,
    /// `IP:PORT` of the local application.
    pub forward_to: String,
    /// The service the local application is an instance of (in the proxy's namespace); its
    /// mutual TLS mode applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The port of `service` this listener serves, whose `appProtocol` applies when
    /// `protocol` is omitted. Omitted (or not a port of the service): the service port equal
    /// to `forwardTo`'s port, else the service's only port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u16>,
    /// Declared protocol (skips detection). Omitted: the service port's `appProtocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AppProtocol>,
}

/// A listener for the application's outbound traffic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundListener {
    /// Listener name, used in metrics.
    pub name: String,
    /// `IP:PORT` to listen on, usually on loopback.
    pub address: String,
    /// Explicit upstream: everything on this listener goes to this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceTarget>,
    /// HTTP proxy mode: requests are routed by their `Host` (or absolute URI) to a service.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http_proxy: bool,
    /// Declared protocol (skips detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AppProtocol>,
}

/// Names a service port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceTarget {
    /// Service name.
    pub name: String,
    /// Namespace; `default` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port; may be omitted when the service has one port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}
