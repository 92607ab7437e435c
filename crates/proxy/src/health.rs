//! Active health checks: one task per checked endpoint of a backend that configures
//! `healthCheck`, probing it over the same transport as traffic (mutual TLS for endpoints
//! with an identity) and publishing the verdict into the endpoint's state, which the
//! balancer reads (see `EndpointState::health`).
//!
//! The verdict is a pure transition ([`Tracker::next`]) over each probe's result and the
//! thresholds. Tasks follow the snapshots ([`Checkers::sync`]): started when a backend with a
//! check appears, kept as they are when a reload keeps the same endpoint and check, stopped
//! when it goes.

use crate::endpoint::EndpointState;
use crate::snapshot::Snapshot;
use bytes::{Buf, Bytes};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trellis_api::health::HealthCheck;

/// What the last checks said about an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckState {
    /// No check configured (or not yet run).
    Unchecked,
    /// Passing.
    Healthy,
    /// Failing: out of balancing while other endpoints are usable.
    Unhealthy,
}

impl CheckState {
    /// For the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Unchecked => "unchecked",
            CheckState::Healthy => "healthy",
            CheckState::Unhealthy => "unhealthy",
        }
    }
}

/// An endpoint's check verdict, read by the balancer on every pick.
#[derive(Debug, Default)]
pub struct CheckSlot(AtomicU8);

impl CheckSlot {
    /// Whether the endpoint fails its health check.
    pub fn down(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 2
    }

    /// The verdict.
    pub fn state(&self) -> CheckState {
        match self.0.load(Ordering::Relaxed) {
            1 => CheckState::Healthy,
            2 => CheckState::Unhealthy,
            _ => CheckState::Unchecked,
        }
    }

    fn set(&self, s: CheckState) {
        let v = match s {
            CheckState::Unchecked => 0,
            CheckState::Healthy => 1,
            CheckState::Unhealthy => 2,
        };
        self.0.store(v, Ordering::Relaxed);
    }
}

/// The health state machine: the current verdict and how many probes in a row have
/// disagreed with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracker {
    /// The verdict.
    pub healthy: bool,
    /// Consecutive probes that said otherwise.
    pub streak: u32,
}

impl Default for Tracker {
    /// Healthy until shown otherwise: the registry only sends endpoints it holds healthy.
    fn default() -> Tracker {
        Tracker {
            healthy: true,
            streak: 0,
        }
    }
}

impl Tracker {
    /// The state after one probe (pure): `unhealthy` failures in a row mark a healthy
    /// endpoint unhealthy, `healthy` passes in a row mark it healthy again.
    pub fn next(self, passed: bool, healthy: u32, unhealthy: u32) -> Tracker {
        if passed == self.healthy {
            return Tracker {
                healthy: self.healthy,
                streak: 0,
            };
        }
        let streak = self.streak + 1;
        let needed = if self.healthy { unhealthy } else { healthy };
        if streak >= needed.max(1) {
            Tracker {
                healthy: passed,
                streak: 0,
            }
        } else {
            Tracker {
                healthy: self.healthy,
                streak,
            }
        }
    }
}

/// The time to wait before the next check: `interval`, spread by up to `jitter` percent
/// either way by `random` (pure).
pub fn next_delay(interval: Duration, jitter: u32, random: u64) -> Duration {
    let spread = interval.as_secs_f64() * f64::from(jitter.min(100)) / 100.0;
    // random / 2^64 in [0, 1), mapped to [-spread, +spread).
    let unit = (random >> 11) as f64 / (1u64 << 53) as f64;
    Duration::from_secs_f64((interval.as_secs_f64() + spread * (2.0 * unit - 1.0)).max(0.001))
}

/// The running checker tasks, keyed by endpoint and check.
#[derive(Debug, Default)]
pub struct Checkers {
    tasks: Mutex<HashMap<(usize, HealthCheck), Running>>,
}

#[derive(Debug)]
struct Running {
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Checkers {
    /// Makes the running checks those `snap` asks for: starts the new ones, stops those it
    /// no longer has, leaves the others running.
    pub fn sync(&self, snap: &Snapshot, shared: &Arc<crate::Shared>) {
        let mut want: HashMap<(usize, HealthCheck), (Arc<EndpointState>, Arc<str>)> =
            HashMap::new();
        for entry in snap.services.values().flatten() {
            let b = &entry.backend;
            let Some(check) = &b.health_check else {
                continue;
            };
            for m in b.balancer.members() {
                let k = (Arc::as_ptr(&m.state) as usize, (**check).clone());
                want.entry(k)
                    .or_insert_with(|| (m.state.clone(), b.name.clone()));
            }
        }
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        // Dropping a `Running` stops its task.
        tasks.retain(|k, _| want.contains_key(k));
        for (k, (endpoint, backend)) in want {
            if tasks.contains_key(&k) {
                continue;
            }
            let stop = shared.draining.child_token();
            let shared = shared.clone();
            let check = k.1.clone();
            let token = stop.clone();
            tokio::spawn(async move {
                let checking = &shared.metrics.health_checkers;
                checking.inc();
                run(&endpoint, &check, &backend, &shared.metrics, token).await;
                endpoint.check.set(CheckState::Unchecked);
                checking.dec();
            });
            tasks.insert(k, Running { stop });
        }
    }

    /// Checker tasks that should be running.
    pub fn len(&self) -> usize {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none should be running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Probes `endpoint` until `stop`, publishing each verdict.
async fn run(
    endpoint: &EndpointState,
    check: &HealthCheck,
    backend: &Arc<str>,
    metrics: &crate::metrics::Metrics,
    stop: CancellationToken,
) {
    let mut t = Tracker::default();
    loop {
        let passed = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(check.timeout.get(), probe(endpoint, check)) => match r {
                Ok(Ok(())) => true,
                Ok(Err(why)) => {
                    tracing::debug!(endpoint = %endpoint.addr, %why, "health check failed");
                    false
                }
                Err(_) => false,
            },
        };
        let before = t.healthy;
        t = t.next(passed, check.healthy_threshold, check.unhealthy_threshold);
        metrics.health_check(backend, passed);
        if t.healthy != before {
            tracing::info!(backend = %backend, endpoint = %endpoint.addr, healthy = t.healthy, "health check verdict changed");
        }
        endpoint.check.set(if t.healthy {
            CheckState::Healthy
        } else {
            CheckState::Unhealthy
        });
        let wait = next_delay(check.interval.get(), check.jitter, crate::rand::u64());
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One probe: `Ok` when it passes, else why not.
async fn probe(endpoint: &EndpointState, check: &HealthCheck) -> Result<(), String> {
    let io = endpoint
        .connect(check.timeout.get())
        .await
        .map_err(|e| e.to_string())?;
    if check.tcp.is_some() {
        return Ok(());
    }
    let authority = endpoint.addr.to_string();
    if let Some(h) = &check.http {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(h.path.as_str())
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, "trellis-health-check")
            .body(Full::<Bytes>::default())
            .map_err(|e| e.to_string())?;
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read the body so the server sees a complete exchange.
        let _ = resp.into_body().collect().await;
        return if http_passes(status, &h.expected_statuses) {
            Ok(())
        } else {
            Err(format!("status {status}"))
        };
    }
    if let Some(g) = &check.grpc {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::post(format!("http://{authority}/grpc.health.v1.Health/Check"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(http::header::USER_AGENT, "trellis-health-check")
            .body(Full::new(grpc_request(&g.service)))
            .map_err(|e| e.to_string())?;
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        if parts.status != StatusCode::OK {
            return Err(format!("status {}", parts.status));
        }
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned();
        // Trailers-only responses carry grpc-status in the headers.
        let code = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| parts.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if code != "0" {
            return Err(format!("grpc-status {code:?}"));
        }
        return match grpc_serving(&collected.to_bytes()) {
            Some(1) => Ok(()),
            Some(s) => Err(format!("serving status {s}")),
            None => Err("malformed HealthCheckResponse".into()),
        };
    }
    Err("no check kind".into())
}

/// Whether an HTTP check's status passes: listed, or any 2xx when none are listed (pure).
pub fn http_passes(status: StatusCode, expected: &[u16]) -> bool {
    if expected.is_empty() {
        status.is_success()
    } else {
        expected.contains(&status.as_u16())
    }
}

/// A length-prefixed `grpc.health.v1.HealthCheckRequest { service }` (protobuf field 1,
/// a string; omitted when empty).
pub fn grpc_request(service: &str) -> Bytes {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    out.into()
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.first()?;
        b.advance(1);
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `status` of a length-prefixed `grpc.health.v1.HealthCheckResponse` (field 1, an
/// enum; 0 when absent; 1 is `SERVING`), skipping unknown fields; `None` when malformed or
/// compressed (pure).
pub fn grpc_serving(frame: &[u8]) -> Option<u64> {
    let (&compressed, rest) = frame.split_first()?;
    if compressed != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    let mut msg = rest.get(4..4 + len)?;
    let mut status = 0;
    while !msg.is_empty() {
        let key = read_varint(&mut msg)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = read_varint(&mut msg)?,
            (_, 0) => {
                read_varint(&mut msg)?;
            }
            (_, 1) => msg = msg.get(8..)?,
            (_, 2) => {
                let n = read_varint(&mut msg)? as usize;
                msg = msg.get(n..)?;
            }
            (_, 5) => msg = msg.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_change_after_their_thresholds() {
        // healthy threshold 2, unhealthy threshold 3: (probes, verdict after each)
        let cases: &[(&[bool], &[bool])] = &[
            (&[true, true], &[true, true]),
            (&[false, false, false], &[true, true, false]),
            // A pass in between starts the count over.
            (
                &[false, false, true, false, false, false],
                &[true, true, true, true, true, false],
            ),
            // Down, then two passes to come back; one pass is not enough.
            (
                &[false, false, false, true, false, true, true],
                &[true, true, false, false, false, false, true],
            ),
        ];
        for (probes, want) in cases {
            let mut t = Tracker::default();
            let got: Vec<bool> = probes
                .iter()
                .map(|p| {
                    t = t.next(*p, 2, 3);
                    t.healthy
                })
                .collect();
            assert_eq!(&got, want, "{probes:?}");
        }
        // Thresholds of 1 follow every probe.
        let t = Tracker::default().next(false, 1, 1);
        assert!(!t.healthy);
        assert!(t.next(true, 1, 1).healthy);
    }

    #[test]
    fn delays_are_spread_by_the_jitter() {
        let i = Duration::from_secs(10);
        assert_eq!(next_delay(i, 0, 12345), i);
        assert_eq!(next_delay(i, 10, 0), Duration::from_secs(9));
        let top = next_delay(i, 10, u64::MAX);
        assert!(top > Duration::from_millis(10_999) && top <= Duration::from_secs(11));
        assert_eq!(next_delay(i, 10, 1 << 63), i);
    }

    #[test]
    fn http_statuses_pass_when_listed_or_2xx() {
        let s = |n| StatusCode::from_u16(n).unwrap();
        let cases: &[(u16, &[u16], bool)] = &[
            (200, &[], true),
            (204, &[], true),
            (301, &[], false),
            (503, &[], false),
            (301, &[200, 301], true),
            (200, &[204], false),
        ];
        for (status, expected, want) in cases {
            assert_eq!(
                http_passes(s(*status), expected),
                *want,
                "{status} {expected:?}"
            );
        }
    }

    #[test]
    fn grpc_health_messages_by_hand() {
        assert_eq!(&grpc_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &grpc_request("ab")[..],
            &[0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']
        );
        // (frame, status)
        let cases: &[(&[u8], Option<u64>)] = &[
            (&[0, 0, 0, 0, 2, 0x08, 1], Some(1)),
            (&[0, 0, 0, 0, 2, 0x08, 2], Some(2)),
            // Absent: UNKNOWN.
            (&[0, 0, 0, 0, 0], Some(0)),
            // An unknown length-delimited field is skipped.
            (&[0, 0, 0, 0, 5, 0x12, 1, b'x', 0x08, 1], Some(1)),
            // Compressed, truncated, or empty.
            (&[1, 0, 0, 0, 2, 0x08, 1], None),
            (&[0, 0, 0, 0, 3, 0x08, 1], None),
            (&[0, 0, 0, 0, 2, 0x08, 0x80], None),
            (&[], None),
        ];
        for (frame, want) in cases {
            assert_eq!(grpc_serving(frame), *want, "{frame:?}");
        }
    }
}
