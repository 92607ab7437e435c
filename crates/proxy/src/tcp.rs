//! Opaque TCP forwarding: pick an endpoint, connect (trying others if that fails), replay
//! what detection read, then copy bytes both ways until either side closes.

use crate::io::{ClientIo, Spliced, splice};
use crate::outlier::Outcome;
use crate::parties::Hop;
use crate::snapshot::{Backend, HashOn};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Attempts to connect before giving up on a connection.
const CONNECT_ATTEMPTS: usize = 3;

/// Forwards `client` to an endpoint of `backend` until either side closes, or no byte moves
/// either way for `idle` (`first` while no byte has moved at all). Returns how it ended
/// (`None`: no endpoint could be reached). `caller`: the client's SPIFFE id (inbound mutual
/// TLS), for the forwarded connection's metrics.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    backend: &Backend,
    mut client: ClientIo,
    peer: SocketAddr,
    first: Duration,
    idle: Duration,
    metrics: &crate::metrics::Metrics,
    direction: &'static str,
    caller: Option<&str>,
) -> std::io::Result<Option<Spliced>> {
    // The fallback step: another service while this one has no usable endpoint.
    let backend = backend.or_fallback();
    // Opaque connections count against the backend's maxConnections too; at the limit the
    // client's connection is closed at once (there is no request to queue).
    let _permit = match backend.gate.as_ref().map(|g| g.tcp()) {
        Some(Err(limit)) => {
            tracing::debug!(backend = %backend.name, "circuit breaker: TCP connection refused");
            metrics.breaker_rejected(&backend.name, limit);
            return Ok(None);
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let hash = match backend.hash_on {
        Some(HashOn::SourceIp) => Some(crate::rand::hash_bytes(peer.ip().to_string().as_bytes())),
        _ => None,
    };
    for _ in 0..CONNECT_ATTEMPTS {
        let Some(endpoint) = backend.balancer.pick(hash) else {
            tracing::debug!(backend = %backend.name, "no endpoint for TCP connection; closing");
            return Ok(None);
        };
        let _guard = endpoint.start();
        let upstream = match endpoint.connect(backend.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "TCP connect failed; trying another endpoint");
                crate::outlier::report(
                    backend,
                    endpoint,
                    Outcome::Gateway,
                    Some("connect"),
                    None,
                    metrics,
                );
                continue;
            }
        };
        crate::outlier::report(backend, endpoint, Outcome::Success, None, None, metrics);
        let hop = if direction == "inbound" {
            Hop::Inbound { peer: caller }
        } else {
            Hop::Outbound {
                backend: &backend.name,
                verified: endpoint.verified().map(|v| &**v),
            }
        };
        let counters = crate::golden::tcp_forwarded(metrics, direction, &backend.name, hop);
        let mut upstream = crate::golden::Counted::new(upstream, counters);
        let prefix = client.take_prefix();
        if !prefix.is_empty() {
            upstream.write_all(&prefix).await?;
        }
        return splice(client, upstream, first, idle, !prefix.is_empty())
            .await
            .map(Some);
    }
    Ok(None)
}
