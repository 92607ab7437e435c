//! Circuit breaking: per-backend limits on upstream connections, on requests waiting for a
//! connection, and on requests in flight. Excess fails fast (503, gRPC `RESOURCE_EXHAUSTED`)
//! instead of queueing without bound behind a struggling service.
//!
//! The counters ([`Breaker`]) belong to the backend, not to a snapshot: the snapshot builder
//! carries them over by backend name, like endpoint state, so a reload neither forgets what
//! is in flight nor lets a burst through. The limits come with each snapshot ([`Gate`]).
//! Admission is a compare-and-swap over the pure decisions [`request`] and [`connection`],
//! so a limit holds exactly however many threads race for the last slot.

use crate::endpoint::EndpointState;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Which limit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `maxConnections`, with no waiting allowed (`maxPendingRequests: 0`).
    Connections,
    /// `maxPendingRequests`: too many requests already wait for a connection.
    PendingRequests,
    /// `maxRequests`.
    Requests,
}

impl Limit {
    /// The config field, used as the metric label and in the reason.
    pub fn field(self) -> &'static str {
        match self {
            Limit::Connections => "maxConnections",
            Limit::PendingRequests => "maxPendingRequests",
            Limit::Requests => "maxRequests",
        }
    }
}

/// A backend's limits (`None`: not limited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Upstream connections open to all the backend's endpoints together.
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection while `max_connections` is reached.
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    pub max_requests: Option<u32>,
}

impl Limits {
    /// The limits of a `circuitBreaker` config.
    pub fn from_spec(cb: &trellis_api::policy::CircuitBreaker) -> Limits {
        Limits {
            max_connections: cb.max_connections,
            max_pending_requests: cb.max_pending_requests,
            max_requests: cb.max_requests,
        }
    }

    /// The configured value of `limit` (for the reason text).
    pub fn of(&self, limit: Limit) -> u32 {
        match limit {
            Limit::Connections => self.max_connections,
            Limit::PendingRequests => self.max_pending_requests,
            Limit::Requests => self.max_requests,
        }
        .unwrap_or(u32::MAX)
    }
}

/// Sets the circuit breaker gauges of every backend of the active snapshot that has
/// limits: what each limit counts now, and the limit.
pub fn refresh_gauges(shared: &crate::Shared) {
    let snap = shared.snapshot();
    let m = &shared.metrics;
    let backends = crate::outlier::backends(&snap);
    // A backend whose policy dropped its limits loses its series.
    let gated: std::collections::HashSet<&Arc<str>> = backends
        .iter()
        .filter(|b| b.gate.is_some())
        .map(|b| &b.name)
        .collect();
    m.breaker_current.retain(|l| gated.contains(&l.backend));
    m.breaker_limit.retain(|l| gated.contains(&l.backend));
    for b in backends {
        let Some(gate) = &b.gate else { continue };
        let (connections, pending, requests) = gate.state.counts();
        for (limit, now) in [
            (Limit::Connections, connections),
            (Limit::PendingRequests, pending),
            (Limit::Requests, requests),
        ] {
            let labels = crate::metrics::BreakerLabels {
                backend: b.name.clone(),
                limit: limit.field(),
            };
            m.breaker_current
                .get_or_create(&labels)
                .set(i64::try_from(now).unwrap_or(i64::MAX));
            let max = match limit {
                Limit::Connections => gate.limits.max_connections,
                Limit::PendingRequests => gate.limits.max_pending_requests,
                Limit::Requests => gate.limits.max_requests,
            };
            match max {
                Some(max) => {
                    m.breaker_limit.get_or_create(&labels).set(i64::from(max));
                }
                None => m.breaker_limit.retain(|l| *l != labels),
            }
        }
    }
}

/// What a request or a new connection may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Admit,
    /// Wait for a connection to close or come back to a pool.
    Wait,
    /// Fail now.
    Reject(Limit),
}

fn under(count: u64, max: Option<u32>) -> bool {
    max.is_none_or(|m| count < u64::from(m))
}

/// Whether one more request may be in flight with `in_flight` already (pure).
pub fn request(in_flight: u64, limits: &Limits) -> Admission {
    if under(in_flight, limits.max_requests) {
        Admission::Admit
    } else {
        Admission::Reject(Limit::Requests)
    }
}

/// Whether a request that needs a new connection may open one, with `open` connections
/// and `waiting` requests already waiting for one (pure).
pub fn connection(open: u64, waiting: u64, limits: &Limits) -> Admission {
    if under(open, limits.max_connections) {
        Admission::Admit
    } else if limits.max_pending_requests == Some(0) {
        Admission::Reject(Limit::Connections)
    } else if under(waiting, limits.max_pending_requests) {
        Admission::Wait
    } else {
        Admission::Reject(Limit::PendingRequests)
    }
}

/// A backend's counters, shared by every snapshot that has the backend.
#[derive(Debug, Default)]
pub struct Breaker {
    connections: AtomicU64,
    pending: AtomicU64,
    requests: AtomicU64,
    /// Wakes requests waiting for a connection: one closed, or one went back to a pool.
    freed: Notify,
}

impl Breaker {
    /// Connections open, requests waiting for one, requests in flight.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.connections.load(Ordering::Relaxed),
            self.pending.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    /// Wakes requests waiting for a connection, if any wait (a load otherwise).
    pub fn wake(&self) {
        if self.pending.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// Increments `counter` if `admit` allows it at its current value: one compare-and-swap
/// loop, so concurrent callers can never overshoot.
fn claim(counter: &AtomicU64, mut admit: impl FnMut(u64) -> bool) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            admit(n).then_some(n + 1)
        })
        .is_ok()
}

/// A backend's limits in one snapshot, over its lasting counters.
#[derive(Debug)]
pub struct Gate {
    /// The backend's name, for the reason and the metric.
    pub name: Arc<str>,
    /// The counters.
    pub state: Arc<Breaker>,
    /// The limits.
    pub limits: Limits,
    /// The backend's endpoints: a request waiting at the connection limit closes an idle
    /// connection of another endpoint, so that idle connections cannot starve it.
    pub endpoints: Vec<Arc<EndpointState>>,
}

/// A request in flight, counted until dropped.
#[derive(Debug)]
pub struct RequestPermit(Arc<Breaker>);

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open upstream connection, counted until dropped (with the connection).
#[derive(Debug)]
pub struct ConnPermit(Arc<Breaker>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.wake();
    }
}

/// An upstream connection's I/O with its permit: the connection counts against
/// `maxConnections` for as long as the I/O lives, also after an upgrade (WebSocket) has taken
/// it from the HTTP/1.1 connection task.
#[derive(Debug)]
pub struct Counted<T> {
    io: T,
    _permit: Option<ConnPermit>,
}

impl<T> Counted<T> {
    /// `io`, counted by `permit` (none: the backend has no limits).
    pub fn new(io: T, permit: Option<ConnPermit>) -> Counted<T> {
        Counted {
            io,
            _permit: permit,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request waiting for a connection, counted until dropped.
#[derive(Debug)]
pub struct Waiting(Arc<Breaker>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`Gate::connection`] allows.
#[derive(Debug)]
pub enum ConnAdmission {
    /// Open a connection, holding this permit for its life.
    Open(ConnPermit),
    /// Wait (the caller holds the returned slot while it waits), then ask again.
    Wait,
    /// Fail the request.
    Reject(Limit),
}

impl Gate {
    /// Admits one more request in flight, or says which limit refuses it.
    pub fn request(&self) -> Result<RequestPermit, Limit> {
        let limits = &self.limits;
        if claim(&self.state.requests, |n| {
            request(n, limits) == Admission::Admit
        }) {
            Ok(RequestPermit(self.state.clone()))
        } else {
            Err(Limit::Requests)
        }
    }

    /// Whether a request that found no pooled connection may open one. `waiting` is the
    /// request's place among those waiting, taken on its first `Wait` and kept until it
    /// gets a connection or gives up.
    pub fn connection(&self, waiting: &mut Option<Waiting>) -> ConnAdmission {
        let limits = &self.limits;
        let s = &self.state;
        loop {
            if claim(&s.connections, |n| under(n, limits.max_connections)) {
                return ConnAdmission::Open(ConnPermit(s.clone()));
            }
            if waiting.is_some() {
                return ConnAdmission::Wait;
            }
            let open = s.connections.load(Ordering::Acquire);
            let mut decision = Admission::Admit;
            let queued = claim(&s.pending, |n| {
                decision = connection(open, n, limits);
                decision == Admission::Wait
            });
            if queued {
                *waiting = Some(Waiting(s.clone()));
                return ConnAdmission::Wait;
            }
            if let Admission::Reject(l) = decision {
                return ConnAdmission::Reject(l);
            }
            // `Admit`: a connection closed meanwhile; claim it.
        }
    }

    /// A future that completes when a connection closes or goes back to a pool. Created
    /// before the caller looks at the pools, so a release in between is not missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.state.freed.notified()
    }

    /// Closes one idle connection of an endpoint other than `except`, to make room under
    /// `maxConnections`. Returns whether one was closed.
    pub fn close_idle_elsewhere(&self, except: &EndpointState) -> bool {
        self.endpoints
            .iter()
            .filter(|e| !std::ptr::eq(&***e, except))
            .any(|e| e.close_idle())
    }

    /// Opens an opaque TCP connection's slot at once, or refuses (TCP connections never wait).
    pub fn tcp(&self) -> Result<ConnPermit, Limit> {
        let limits = &self.limits;
        if claim(&self.state.connections, |n| {
            under(n, limits.max_connections)
        }) {
            Ok(ConnPermit(self.state.clone()))
        } else {
            Err(Limit::Connections)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(conns: Option<u32>, pending: Option<u32>, requests: Option<u32>) -> Limits {
        Limits {
            max_connections: conns,
            max_pending_requests: pending,
            max_requests: requests,
        }
    }

    #[test]
    fn requests_are_admitted_below_the_limit_only() {
        use Admission::*;
        // (in flight, maxRequests, decision)
        let cases = [
            (0, None, Admit),
            (1_000_000, None, Admit),
            (0, Some(1), Admit),
            (1, Some(1), Reject(Limit::Requests)),
            (3, Some(4), Admit),
            (4, Some(4), Reject(Limit::Requests)),
            (5, Some(4), Reject(Limit::Requests)),
        ];
        for (n, max, want) in cases {
            assert_eq!(request(n, &limits(None, None, max)), want, "{n} of {max:?}");
        }
    }

    #[test]
    fn connections_open_then_wait_then_are_refused() {
        use Admission::*;
        // (open, waiting, maxConnections, maxPendingRequests, decision)
        let cases = [
            (0, 0, None, None, Admit),
            (500, 0, None, Some(0), Admit),
            (1, 0, Some(2), Some(0), Admit),
            // At the limit: wait while the queue has room (unlimited when not set).
            (2, 0, Some(2), None, Wait),
            (2, 1_000, Some(2), None, Wait),
            (2, 0, Some(2), Some(3), Wait),
            (2, 2, Some(2), Some(3), Wait),
            (2, 3, Some(2), Some(3), Reject(Limit::PendingRequests)),
            // No queue: the connection limit itself refuses.
            (2, 0, Some(2), Some(0), Reject(Limit::Connections)),
        ];
        for (open, waiting, conns, pending, want) in cases {
            assert_eq!(
                connection(open, waiting, &limits(conns, pending, None)),
                want,
                "{open} open, {waiting} waiting, limits {conns:?}/{pending:?}"
            );
        }
    }

    fn gate(l: Limits) -> Gate {
        Gate {
            name: "default/app:80".into(),
            state: Arc::default(),
            limits: l,
            endpoints: vec![],
        }
    }

    #[test]
    fn permits_count_until_dropped() {
        let g = gate(limits(Some(1), Some(1), Some(2)));
        let a = g.request().unwrap();
        let b = g.request().unwrap();
        assert_eq!(g.request().unwrap_err(), Limit::Requests);
        drop(a);
        let _c = g.request().unwrap();
        assert_eq!(g.state.counts().2, 2);
        drop(b);
        assert_eq!(g.state.counts().2, 1);

        let mut w1 = None;
        let conn = match g.connection(&mut w1) {
            ConnAdmission::Open(p) => p,
            other => panic!("{other:?}"),
        };
        assert!(matches!(g.connection(&mut w1), ConnAdmission::Wait));
        assert!(w1.is_some());
        // The one waiting place is taken: the next request is refused.
        let mut w2 = None;
        assert!(matches!(
            g.connection(&mut w2),
            ConnAdmission::Reject(Limit::PendingRequests)
        ));
        assert!(w2.is_none());
        assert_eq!(g.tcp().unwrap_err(), Limit::Connections);
        // The connection closes: the waiting request gets its slot.
        drop(conn);
        assert!(matches!(g.connection(&mut w1), ConnAdmission::Open(_)));
        drop(w1);
        assert_eq!(g.state.counts(), (0, 0, 1));
    }

    #[test]
    fn concurrent_requests_never_overshoot() {
        let g = Arc::new(gate(limits(None, None, Some(7))));
        let held = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        if let Ok(p) = g.request() {
                            held.lock().unwrap().push(p);
                        }
                    }
                });
            }
        });
        assert_eq!(held.lock().unwrap().len(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_is_woken_when_a_connection_closes() {
        let g = gate(limits(Some(1), None, None));
        let mut none = None;
        let ConnAdmission::Open(conn) = g.connection(&mut none) else {
            panic!()
        };
        let mut waiting = None;
        let freed = g.freed();
        assert!(matches!(g.connection(&mut waiting), ConnAdmission::Wait));
        let waker = async {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            drop(conn);
        };
        let start = tokio::time::Instant::now();
        tokio::join!(freed, waker);
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(1));
        assert!(matches!(g.connection(&mut waiting), ConnAdmission::Open(_)));
    }
}
