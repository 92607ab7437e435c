//! Resource bounds: the process's file limit, and the connection caps and timeouts derived
//! from it and from the `Proxy` settings.

use std::time::Duration;
use trellis_api::proxy::ProxySpec;

/// File descriptors kept out of the connection caps: listeners, the admin port, upstream
/// pools, log files, the control-plane stream.
const FD_RESERVE_MAX: u64 = 256;

/// The file limit: soft (current) and hard (maximum). `None` means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLimit {
    /// What the process may open now.
    pub soft: Option<u64>,
    /// What the soft limit may be raised to.
    pub hard: Option<u64>,
}

/// The process's file limit now.
pub fn file_limit() -> FileLimit {
    let l = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    FileLimit {
        soft: l.current,
        hard: l.maximum,
    }
}

/// Raises the soft file limit to the hard limit, so that many client connections do not run
/// the proxy out of descriptors at the common default of 1,024. Returns the limit in force
/// afterwards (unchanged when raising fails, with the error).
pub fn raise_file_limit() -> (FileLimit, Option<std::io::Error>) {
    let before = file_limit();
    if before.soft == before.hard {
        return (before, None);
    }
    let raised = rustix::process::Rlimit {
        current: before.hard,
        maximum: before.hard,
    };
    match rustix::process::setrlimit(rustix::process::Resource::Nofile, raised) {
        Ok(()) => (file_limit(), None),
        Err(e) => (before, Some(e.into())),
    }
}

/// The connection caps for a soft file limit of `soft` (`None`: unlimited): total and per
/// listener. An opaque TCP connection holds two descriptors (client and upstream), so the
/// total is half of what is left after a reserve; one listener may take three quarters of
/// it, leaving room for the others when it is flooded.
pub fn default_caps(soft: Option<u64>) -> (u32, u32) {
    let soft = soft.unwrap_or(u64::from(u32::MAX));
    let reserve = (soft / 4).min(FD_RESERVE_MAX);
    let total = (soft.saturating_sub(reserve) / 2).clamp(1, u64::from(u32::MAX)) as u32;
    (total, per_listener_default(total))
}

fn per_listener_default(total: u32) -> u32 {
    ((u64::from(total) * 3 / 4) as u32).max(1)
}

/// Bounds on client connections and streams, resolved from a `Proxy` spec and the file limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Client connections open at once, over all listeners.
    pub max_connections: u32,
    /// Client connections open at once on one listener.
    pub max_connections_per_listener: u32,
    /// Quiet time after which an opaque TCP connection or upgraded stream is closed.
    pub tcp_idle_timeout: Duration,
    /// Deadline for a connection that has sent nothing yet.
    pub first_byte_timeout: Duration,
    /// Quiet time after which an HTTP/2 stream is reset.
    pub stream_idle_timeout: Duration,
    /// Streams opened at once on one upstream HTTP/2 connection.
    pub upstream_h2_max_streams: u32,
    /// Upstream HTTP/2 connections per endpoint.
    pub upstream_h2_max_connections: u32,
}

impl Bounds {
    /// Resolves `spec` against a soft file limit (pure; see [`file_limit`]).
    pub fn resolve(spec: &ProxySpec, soft: Option<u64>) -> Bounds {
        let (total, per) = default_caps(soft);
        let max_connections = spec.max_connections.unwrap_or(total);
        let max_connections_per_listener =
            spec.max_connections_per_listener
                .unwrap_or(if spec.max_connections.is_some() {
                    per_listener_default(max_connections)
                } else {
                    per
                });
        Bounds {
            max_connections,
            max_connections_per_listener: max_connections_per_listener.min(max_connections),
            tcp_idle_timeout: spec.tcp_idle_timeout.get(),
            first_byte_timeout: spec.first_byte_timeout.get(),
            stream_idle_timeout: spec.stream_idle_timeout.get(),
            upstream_h2_max_streams: spec.upstream_http2_max_streams,
            upstream_h2_max_connections: spec.upstream_http2_max_connections,
        }
    }

    /// The upstream HTTP/2 pool's limits.
    pub fn h2(&self) -> crate::endpoint::H2Limits {
        crate::endpoint::H2Limits {
            max_streams: self.upstream_h2_max_streams,
            max_connections: self.upstream_h2_max_connections,
        }
    }

    /// Resolves `spec` against the process's current file limit.
    pub fn from_spec(spec: &ProxySpec) -> Bounds {
        Bounds::resolve(spec, file_limit().soft)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_follow_the_file_limit_unless_configured() {
        let spec = |total: Option<u32>, per: Option<u32>| ProxySpec {
            max_connections: total,
            max_connections_per_listener: per,
            ..ProxySpec::default()
        };
        // (spec, soft limit, expected total, expected per listener)
        let cases = [
            // 1,024: 256 reserved, half of the rest, three quarters of that per listener.
            (spec(None, None), Some(1024), 384, 288),
            // A tiny limit still leaves at least one connection.
            (spec(None, None), Some(2), 1, 1),
            (
                spec(None, None),
                Some(1 << 20),
                (((1 << 20) - 256) / 2),
                393_120,
            ),
            (spec(None, None), None, (u32::MAX - 256) / 2, 1_610_612_639),
            (spec(Some(1000), None), Some(1024), 1000, 750),
            (spec(Some(1000), Some(10)), Some(1024), 1000, 10),
            // Per listener never exceeds the total.
            (spec(Some(10), Some(1000)), Some(1024), 10, 10),
            (spec(None, Some(5)), Some(1024), 384, 5),
        ];
        for (s, soft, total, per) in cases {
            let b = Bounds::resolve(&s, soft);
            assert_eq!(
                (b.max_connections, b.max_connections_per_listener),
                (total, per),
                "{soft:?} {:?} {:?}",
                s.max_connections,
                s.max_connections_per_listener
            );
        }
    }
}
