//! Per-endpoint state that outlives config snapshots: load counters for balancing and the
//! pool of upstream connections.

use crate::body::Body;
use crate::breaker::{ConnAdmission, ConnPermit, Gate};
use crate::error::ProxyError;
use crate::tls::Upstream;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle connections kept per endpoint and client kind; beyond this, released connections are
/// simply closed.
const MAX_IDLE: usize = 256;

/// Latency assumed for an endpoint that has not answered yet.
const DEFAULT_RTT: f64 = 0.001;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// One upstream endpoint's live state.
#[derive(Debug)]
pub struct EndpointState {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// The server name that asks it for the identity it must present: connections to it use
    /// mutual TLS when set and this proxy has an identity.
    pub identity: Option<rustls::pki_types::ServerName<'static>>,
    /// The SPIFFE id behind `identity`, for metrics.
    spiffe: Option<Arc<str>>,
    mesh: crate::tls::MeshSlot,
    in_flight: AtomicU64,
    /// Peak-EWMA latency estimate in seconds, as `f64` bits.
    ewma: AtomicU64,
    /// When `ewma` was last updated, nanoseconds since [`epoch`].
    stamp: AtomicU64,
    /// Failures (connect, reset, 5xx, timeout) since the last success.
    failures: AtomicU32,
    /// Until when the endpoint is backed off after its last failure, nanoseconds since
    /// [`epoch`] (0: never failed).
    backoff_until: AtomicU64,
    /// Outlier detection: ejected or not, and the state that decides it.
    pub outlier: crate::outlier::Slot,
    /// The active health check's verdict.
    pub check: crate::health::CheckSlot,
    /// Connection pools, made by the first connection: a mesh-wide view holds thousands of
    /// endpoints a sidecar never calls, and the pools are most of an endpoint's size.
    pools: OnceLock<Box<Pools>>,
    /// Until when this peer sidecar is taken to speak only HTTP/1.1 (it did not answer ALPN
    /// `trellis/h2`), nanoseconds since [`epoch`]; then it is asked again (it may have been
    /// upgraded).
    h1_only_until: AtomicU64,
}

/// An endpoint's upstream connections.
#[derive(Debug, Default)]
struct Pools {
    /// hyper's idle connections, each with how long its upstream keeps it idle (its
    /// `Keep-Alive: timeout`, less a margin: [`crate::h1::idle_allowed`]).
    h1_idle: Mutex<Vec<(IdleHttp1, Instant)>>,
    /// Idle connections of the lean client (requests without a body), kept apart from
    /// hyper's: each kind of connection is driven by its own client.
    lean_idle: Mutex<Vec<(crate::h1::Conn, Instant)>>,
    /// Upstream HTTP/2 connections, each with its count of open streams.
    h2: Mutex<H2Pool>,
    /// Woken when an HTTP/2 connection being established is pooled or fails.
    h2_ready: tokio::sync::Notify,
    /// The circuit breaker whose connection limit this endpoint's connections count
    /// against, woken when a connection goes back to a pool (set once a connection is made
    /// under one; `gated` keeps the pool path to one load otherwise).
    breaker: Mutex<std::sync::Weak<crate::breaker::Breaker>>,
    gated: std::sync::atomic::AtomicBool,
}

/// How long a peer that answered ALPN `trellis/1` to an offer of `trellis/h2` is sent
/// HTTP/1.1 before it is asked again.
const H1_ONLY_FOR: Duration = Duration::from_secs(300);

/// One upstream HTTP/2 connection and the streams this proxy has open on it.
#[derive(Debug)]
struct H2Conn {
    tx: http2::SendRequest<Body>,
    streams: Arc<AtomicUsize>,
    /// The peer sidecar negotiated `trellis/h2`: HTTP/1.1 requests may ride on it.
    mesh: bool,
}

/// The HTTP/2 connections of an endpoint, and how many are being established.
#[derive(Debug, Default)]
struct H2Pool {
    conns: Vec<H2Conn>,
    connecting: usize,
    /// Requests waiting for a connection being established.
    waiting: usize,
    /// Connections that failed to be established, and the last one's error: requests that
    /// waited for one fail with it.
    failures: u64,
    last_error: String,
}

/// Where the next HTTP/2 request goes (pure; see [`H2Pool::choose`]).
#[derive(Debug, PartialEq, Eq)]
enum H2Choice {
    /// This connection (index), which has room.
    Use(usize),
    /// A new connection, kept in the pool.
    Connect,
    /// Wait for a connection being established, which has room for this request.
    Wait,
    /// Every connection is full and no more may be opened: the least loaded one, where the
    /// request waits for a stream (the upstream queues it).
    Crowd(usize),
    /// No connection yet and the pool is at its connection cap with connections still
    /// being established: a connection for this request alone.
    Alone,
}

impl H2Pool {
    /// Chooses from the least loaded usable connection (index, open streams), how many
    /// usable connections there are, how many are being established, and how many requests
    /// already wait for those.
    fn choose(
        least: Option<(usize, usize)>,
        open: usize,
        connecting: usize,
        waiting: usize,
        max_streams: usize,
        max_conns: usize,
    ) -> H2Choice {
        match least {
            Some((i, n)) if n < max_streams => H2Choice::Use(i),
            _ if waiting < connecting * max_streams => H2Choice::Wait,
            _ if open + connecting < max_conns => H2Choice::Connect,
            Some((i, _)) => H2Choice::Crowd(i),
            None => H2Choice::Alone,
        }
    }
}

/// A request counted in [`H2Pool::waiting`] until dropped.
struct Waiter<'a>(&'a Mutex<H2Pool>);

impl Waiter<'_> {
    fn done(self, pool: &mut H2Pool) {
        pool.waiting = pool.waiting.saturating_sub(1);
        std::mem::forget(self);
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pool.waiting = pool.waiting.saturating_sub(1);
    }
}

/// A connection counted in [`H2Pool::connecting`] until it is pooled or fails; dropped
/// before either (its request gave up), the waiters look again. Either way the requests
/// waiting for it are woken.
struct Connecting<'a> {
    endpoint: &'a EndpointState,
    done: bool,
}

impl Connecting<'_> {
    fn finish(&mut self, pool: &mut H2Pool) {
        pool.connecting = pool.connecting.saturating_sub(1);
        self.done = true;
        self.endpoint.pools().h2_ready.notify_waiters();
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Its request gave up (its client left, its try timed out): that says nothing
            // about the endpoint. The waiters look again, and one of them connects.
            let mut pool = self.endpoint.h2_pool();
            pool.connecting = pool.connecting.saturating_sub(1);
            drop(pool);
            self.endpoint.pools().h2_ready.notify_waiters();
        }
    }
}

/// What a request that found no pooled connection does next.
enum Checkout {
    /// Open a connection, counted by this circuit breaker permit (if any).
    Open(Option<ConnPermit>),
    /// Look at the pool again.
    Again,
}

/// An open stream on an upstream HTTP/2 connection: counted until dropped.
#[derive(Debug)]
pub struct H2Stream(Arc<AtomicUsize>);

impl Drop for H2Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Limits of an endpoint's HTTP/2 pool.
#[derive(Clone, Copy, Debug)]
pub struct H2Limits {
    /// Streams at once on one connection before another is opened.
    pub max_streams: u32,
    /// Connections per endpoint.
    pub max_connections: u32,
}

impl EndpointState {
    /// Fresh state for `addr`, expected to present `identity` (a SPIFFE id).
    pub fn new(
        addr: SocketAddr,
        identity: Option<&str>,
        mesh: crate::tls::MeshSlot,
    ) -> EndpointState {
        EndpointState {
            addr,
            identity: identity.and_then(crate::tls::server_name),
            spiffe: identity
                .filter(|i| crate::tls::server_name(i).is_some())
                .map(Arc::from),
            mesh,
            in_flight: AtomicU64::new(0),
            ewma: AtomicU64::new(DEFAULT_RTT.to_bits()),
            stamp: AtomicU64::new(nanos(Instant::now())),
            failures: AtomicU32::new(0),
            backoff_until: AtomicU64::new(0),
            outlier: Default::default(),
            check: Default::default(),
            pools: OnceLock::new(),
            h1_only_until: AtomicU64::new(0),
        }
    }

    /// Whether an HTTP/1.1 request to this endpoint goes over HTTP/2: it is a peer sidecar
    /// reached over mutual TLS that has not answered `trellis/1` to `trellis/h2` lately.
    pub fn speaks_mesh_h2(&self, now: Instant) -> bool {
        self.identity.is_some()
            && nanos(now) >= self.h1_only_until.load(Ordering::Relaxed)
            && self.mesh.load().is_some()
    }

    /// The identity this endpoint proves over mutual TLS, when connections to it use it
    /// (it has an identity and this proxy has a certificate).
    pub fn verified(&self) -> Option<&Arc<str>> {
        self.spiffe.as_ref().filter(|_| self.mesh.load().is_some())
    }

    /// Requests or connections outstanding.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request in flight until the guard drops.
    pub fn start(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The latency estimate at `now`, decayed toward zero since the last observation so that
    /// an endpoint once slow is eventually tried again.
    pub fn ewma(&self, now: Instant, decay: Duration) -> f64 {
        let value = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let elapsed = nanos(now).saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64 / 1e9;
        value * (-elapsed / decay.as_secs_f64().max(1e-3)).exp()
    }

    /// Records an observed latency: a peak is taken at once, an improvement is averaged in.
    pub fn observe(&self, rtt: Duration, now: Instant, decay: Duration) {
        let rtt = rtt.as_secs_f64();
        let prev = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let elapsed =
            nanos(now).saturating_sub(self.stamp.swap(nanos(now), Ordering::Relaxed)) as f64 / 1e9;
        let w = (-elapsed / decay.as_secs_f64().max(1e-3)).exp();
        let next = if rtt > prev {
            rtt
        } else {
            prev * w + rtt * (1.0 - w)
        };
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The endpoint's state at `now`, for the balancer: the one view of whether it is
    /// usable (outlier ejection, health check, failures and backoff).
    pub fn health(&self, now: Instant) -> Health {
        let failures = self.failures.load(Ordering::Relaxed);
        let at = nanos(now);
        Health {
            failures,
            backoff: failures != 0 && at < self.backoff_until.load(Ordering::Relaxed),
            ejected: self.outlier.ejected(at),
            probing: self.outlier.probing(),
            down: self.check.down(),
        }
    }

    /// Consecutive failures and until when the endpoint is backed off, for the admin API.
    pub fn failures(&self) -> (u32, Option<Instant>) {
        let until = self.backoff_until.load(Ordering::Relaxed);
        (
            self.failures.load(Ordering::Relaxed),
            (until != 0).then(|| epoch() + Duration::from_nanos(until)),
        )
    }

    /// Records a failure at `now`: the endpoint is backed off for a time that doubles with
    /// each consecutive failure. Returns the consecutive count.
    pub fn failed(&self, now: Instant) -> u32 {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let until = nanos(now).saturating_add(backoff(n).as_nanos() as u64);
        self.backoff_until.store(until, Ordering::Relaxed);
        n
    }

    /// Records a success: the failure count starts over. Only a load on the common path
    /// where nothing failed, so that healthy endpoints' cache lines stay shared.
    pub fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// An HTTP/1.1 connection ready for a request: a pooled one idle for no longer than
    /// `idle_timeout` at `now`, or a new one.
    pub async fn http1(
        &self,
        connect_timeout: Duration,
        idle_timeout: Duration,
        now: Instant,
        gate: Option<&Gate>,
    ) -> Result<http1::SendRequest<Body>, ProxyError> {
        let mut waiting = None;
        let permit = loop {
            let freed = gate.map(Gate::freed);
            while let Some(((mut tx, allowed), since)) = take_idle(&self.pools().h1_idle) {
                if tx.is_closed()
                    || now.saturating_duration_since(since) > idle_timeout
                    || !upstream_keeps(allowed, since)
                {
                    continue;
                }
                if tx.ready().await.is_ok() {
                    return Ok(tx);
                }
            }
            if let Checkout::Open(p) = self.admit(gate, &mut waiting, freed).await? {
                break p;
            }
        };
        // Counted against the circuit breaker until the connection closes, or the upgraded
        // stream that took it over ends.
        let io = crate::breaker::Counted::new(self.connect(connect_timeout).await?, permit);
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::UpstreamProtocol(self.addr, e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream http/1 connection ended");
            }
        });
        Ok(tx)
    }

    /// Whether a request that found no pooled connection may open one under `gate`: open
    /// one (with the breaker's permit, none without a gate), look at the pool again (after
    /// waiting for a connection to close or come back, unless the request has only just
    /// taken its place in the queue), or the circuit breaker's refusal. `freed` was created
    /// before the pool was looked at, so that nothing freed since is missed.
    async fn admit(
        &self,
        gate: Option<&Gate>,
        waiting: &mut Option<crate::breaker::Waiting>,
        freed: Option<tokio::sync::futures::Notified<'_>>,
    ) -> Result<Checkout, ProxyError> {
        let (Some(gate), Some(freed)) = (gate, freed) else {
            return Ok(Checkout::Open(None));
        };
        let queued = waiting.is_some();
        match gate.connection(waiting) {
            ConnAdmission::Open(p) => {
                self.watch(gate);
                Ok(Checkout::Open(Some(p)))
            }
            ConnAdmission::Reject(limit) => Err(ProxyError::Overloaded(
                gate.name.clone(),
                limit,
                gate.limits.of(limit),
            )),
            // Just queued: the pool is looked at once more, now that releases wake us.
            ConnAdmission::Wait if !queued => Ok(Checkout::Again),
            ConnAdmission::Wait => {
                // Idle connections elsewhere would hold the limit forever: close one.
                gate.close_idle_elsewhere(self);
                freed.await;
                Ok(Checkout::Again)
            }
        }
    }

    /// Remembers the circuit breaker to wake when a connection goes back to a pool.
    fn watch(&self, gate: &Gate) {
        let pools = self.pools();
        if !pools.gated.load(Ordering::Relaxed) {
            *pools.breaker.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&gate.state);
            pools.gated.store(true, Ordering::Relaxed);
        }
    }

    /// A connection went back to a pool: a request waiting for one may take it.
    fn wake(&self) {
        if let Some(pools) = self.pools.get()
            && pools.gated.load(Ordering::Relaxed)
            && let Some(b) = pools
                .breaker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .upgrade()
        {
            b.wake();
        }
    }

    /// Closes one idle pooled connection (to make room under a connection limit). Returns
    /// whether there was one.
    pub fn close_idle(&self) -> bool {
        self.pools
            .get()
            .is_some_and(|p| take_idle(&p.lean_idle).is_some() || take_idle(&p.h1_idle).is_some())
    }

    /// Returns a connection whose previous exchange finished cleanly; `allowed` is how long
    /// its upstream keeps it idle, from the last response ([`crate::h1::idle_allowed`]): one
    /// kept too briefly to reuse is closed instead. Its connection task may not have seen the
    /// end of the response yet; checkout waits for readiness (`ready()`), which is cheaper
    /// than a task per request waiting here.
    pub fn release_http1(&self, tx: http1::SendRequest<Body>, allowed: Option<Duration>) {
        if allowed == Some(Duration::ZERO) {
            return;
        }
        park_idle(&self.pools().h1_idle, (tx, allowed));
        self.wake();
    }

    /// A connection for the lean HTTP/1.1 client: a pooled one idle for no longer than
    /// `idle_timeout` at `now`, nor than its upstream said it keeps idle connections, that
    /// the upstream has not closed; or a new one.
    pub async fn lean(
        &self,
        connect_timeout: Duration,
        idle_timeout: Duration,
        now: Instant,
        gate: Option<&Gate>,
    ) -> Result<crate::h1::Conn, ProxyError> {
        let mut waiting = None;
        let permit = loop {
            let freed = gate.map(Gate::freed);
            while let Some((mut conn, since)) = take_idle(&self.pools().lean_idle) {
                if now.saturating_duration_since(since) <= idle_timeout
                    && upstream_keeps(conn.idle_allowed(), since)
                    && conn.is_usable()
                {
                    return Ok(conn);
                }
            }
            if let Checkout::Open(p) = self.admit(gate, &mut waiting, freed).await? {
                break p;
            }
        };
        let mut conn = crate::h1::Conn::new(self.connect(connect_timeout).await?);
        conn.hold(permit);
        Ok(conn)
    }

    /// Returns a lean connection whose previous exchange finished cleanly; one its upstream
    /// keeps open too briefly to reuse ([`crate::h1::idle_allowed`]) is closed instead.
    pub fn release_lean(&self, conn: crate::h1::Conn) {
        if conn.idle_allowed() == Some(Duration::ZERO) {
            return;
        }
        park_idle(&self.pools().lean_idle, conn);
        self.wake();
    }

    /// An HTTP/2 connection with room for one more stream, and that stream's count: an open
    /// one with fewer than `max_streams` streams of ours, else a new one while the endpoint
    /// has fewer than `max_connections`, so that one client's stalled streams cannot fill
    /// the one connection every other client shares.
    /// `mesh`: for an HTTP/1.1 request to a peer sidecar, which only rides on connections
    /// that negotiated `trellis/h2`.
    ///
    /// While a connection is being established, requests wait for it (up to its stream
    /// limit) instead of each opening its own: a burst of clients becomes one handshake, not
    /// a burst of them. When that connection fails, they fail with its error.
    pub async fn http2(
        &self,
        connect_timeout: Duration,
        limits: H2Limits,
        gate: Option<&Gate>,
        mesh: bool,
    ) -> Result<(http2::SendRequest<Body>, H2Stream), ProxyError> {
        let take = |c: &H2Conn| {
            c.streams.fetch_add(1, Ordering::Relaxed);
            (c.tx.clone(), H2Stream(c.streams.clone()))
        };
        let mut waiting = None;
        // Set while this request waits for a connection being established: the count of
        // failed connections when it began waiting.
        let mut waited: Option<(u64, Waiter<'_>)> = None;
        let (choice, permit) = loop {
            if mesh && !self.speaks_mesh_h2(Instant::now()) {
                return Err(Self::h1_only(self.addr));
            }
            let freed = gate.map(Gate::freed);
            let ready = self.pools().h2_ready.notified();
            tokio::pin!(ready);
            // The pool's lock is held in this block only, never across an await.
            let admitted = {
                let mut pool = self.h2_pool();
                if let Some((failures, w)) = waited.take() {
                    w.done(&mut pool);
                    if pool.failures != failures {
                        // The request that connected reports the failure (once, to the
                        // endpoint's health); these go again, elsewhere if they can.
                        return Err(ProxyError::NotSent(
                            self.addr,
                            format!("the connection it waited for failed: {}", pool.last_error),
                        ));
                    }
                }
                pool.conns.retain(|c| !c.tx.is_closed());
                // The least loaded connection this request may ride on, and how many there are.
                let mut usable = 0;
                let mut least: Option<(usize, usize)> = None;
                for (i, c) in pool.conns.iter().enumerate() {
                    if c.mesh || !mesh {
                        usable += 1;
                        let n = c.streams.load(Ordering::Relaxed);
                        if least.is_none_or(|(_, m)| n < m) {
                            least = Some((i, n));
                        }
                    }
                }
                let choice = H2Pool::choose(
                    least,
                    usable,
                    pool.connecting,
                    pool.waiting,
                    limits.max_streams as usize,
                    limits.max_connections as usize,
                );
                match choice {
                    H2Choice::Use(i) | H2Choice::Crowd(i) => return Ok(take(&pool.conns[i])),
                    H2Choice::Wait => {
                        pool.waiting += 1;
                        waited = Some((pool.failures, Waiter(&self.pools().h2)));
                        // Registered before the lock goes, so a connection that completes
                        // in between still wakes this request.
                        ready.as_mut().enable();
                    }
                    H2Choice::Connect | H2Choice::Alone => {}
                }
                if choice == H2Choice::Wait {
                    None
                } else {
                    // A new connection, if the circuit breaker allows one; at its limit, an
                    // open connection takes one more stream rather than the request waiting.
                    let queued = waiting.is_some();
                    let permit = match gate {
                        None => Some(None),
                        Some(g) => match g.connection(&mut waiting) {
                            ConnAdmission::Open(p) => Some(Some(p)),
                            ConnAdmission::Reject(_) | ConnAdmission::Wait if least.is_some() => {
                                let (i, _) = least.unwrap_or_default();
                                return Ok(take(&pool.conns[i]));
                            }
                            ConnAdmission::Reject(limit) => {
                                return Err(ProxyError::Overloaded(
                                    g.name.clone(),
                                    limit,
                                    g.limits.of(limit),
                                ));
                            }
                            // Just queued: look again before waiting, now that closes wake us.
                            ConnAdmission::Wait if !queued => continue,
                            ConnAdmission::Wait => None,
                        },
                    };
                    if permit.is_some() && choice == H2Choice::Connect {
                        pool.connecting += 1;
                    }
                    Some(permit.map(|p| (choice, p)))
                }
            };
            match admitted {
                Some(Some(go)) => break go,
                Some(None) => {
                    if let Some(f) = freed {
                        f.await;
                    }
                }
                None => ready.await,
            }
        };
        // Counted as connecting until it is pooled or fails, even if this request is
        // dropped meanwhile: the requests waiting for it are woken either way.
        let connecting = (choice == H2Choice::Connect).then(|| Connecting {
            endpoint: self,
            done: false,
        });
        let made = self.connect_h2(connect_timeout, permit).await;
        let mut pool = self.h2_pool();
        let (tx, negotiated) = match made {
            Ok(m) => m,
            Err(e) => {
                if let Some(mut c) = connecting {
                    pool.failures += 1;
                    pool.last_error = e.to_string();
                    c.finish(&mut pool);
                }
                return Err(e);
            }
        };
        let conn = H2Conn {
            tx,
            streams: Arc::new(AtomicUsize::new(0)),
            mesh: negotiated,
        };
        let got = take(&conn);
        if let Some(mut c) = connecting {
            pool.conns.push(conn);
            c.finish(&mut pool);
        }
        drop(pool);
        if mesh && !negotiated {
            // An older peer: HTTP/2 from it would reach its app as HTTP/2. This request was
            // not sent; it goes again over HTTP/1.1 (the connection serves HTTP/2 clients).
            self.h1_only_until
                .store(nanos(Instant::now() + H1_ONLY_FOR), Ordering::Relaxed);
            return Err(Self::h1_only(self.addr));
        }
        Ok(got)
    }

    fn pools(&self) -> &Pools {
        self.pools.get_or_init(Box::default)
    }

    fn h1_only(addr: SocketAddr) -> ProxyError {
        ProxyError::NotSent(
            addr,
            "the peer sidecar does not speak HTTP/2 (ALPN trellis/1)".into(),
        )
    }

    fn h2_pool(&self) -> std::sync::MutexGuard<'_, H2Pool> {
        self.pools().h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new HTTP/2 connection, and whether it is to a peer sidecar that negotiated
    /// `trellis/h2`.
    async fn connect_h2(
        &self,
        connect_timeout: Duration,
        permit: Option<ConnPermit>,
    ) -> Result<(http2::SendRequest<Body>, bool), ProxyError> {
        let io = self.connect_for(connect_timeout, true).await?;
        let negotiated = io.alpn() == Some(trellis_identity::tls::ALPN_MESH_H2);
        let mut builder = http2::Builder::new(TokioExecutor::new());
        if negotiated {
            // Responses to HTTP/1.1 requests: as large a head as HTTP/1.1 would take.
            builder.max_header_list_size(crate::http::MESH_H2_MAX_HEADER_LIST);
        }
        let (tx, conn) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::UpstreamProtocol(self.addr, e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream http/2 connection ended");
            }
            drop(permit);
        });
        Ok((tx, negotiated))
    }

    /// A new connection within `timeout`: mutual TLS when the endpoint has an identity and
    /// this proxy has one too, else plain TCP.
    pub async fn connect(&self, timeout: Duration) -> Result<Upstream, ProxyError> {
        self.connect_for(timeout, false).await
    }

    /// [`EndpointState::connect`]; `h2`: the connection is for HTTP/2, so mutual TLS offers
    /// `trellis/h2` first.
    async fn connect_for(&self, timeout: Duration, h2: bool) -> Result<Upstream, ProxyError> {
        let mesh = match &self.identity {
            Some(name) => self.mesh.load_full().map(|m| (name.clone(), m)),
            None => None,
        };
        let attempt = async {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| ProxyError::Connect(self.addr, e.to_string()))?;
            let _ = s.set_nodelay(true);
            match mesh {
                None => Ok(Upstream::Plain(s)),
                Some((name, m)) => {
                    let connector = if h2 { &m.connector_h2 } else { &m.connector };
                    let t = connector
                        .connect(name, s)
                        .await
                        .map_err(|e| ProxyError::Connect(self.addr, format!("mutual TLS: {e}")))?;
                    crate::tls::recheck_resumed(&m.creds, t.get_ref().1).map_err(|e| {
                        ProxyError::Connect(self.addr, format!("mutual TLS, resumed session: {e}"))
                    })?;
                    Ok(Upstream::Tls(Box::new(t)))
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Connect(
                self.addr,
                format!("no connection within {timeout:?}"),
            )),
        }
    }
}

/// An idle connection of hyper's HTTP/1.1 client, with how long its upstream keeps it idle.
type IdleHttp1 = (http1::SendRequest<Body>, Option<Duration>);

/// Whether a connection parked at `since` is still within what its upstream said it keeps
/// idle connections (`allowed`; `None`: it said nothing). Held to the clock now, not to when
/// the request arrived: a retry's backoff or a wait for a slot may lie between.
fn upstream_keeps(allowed: Option<Duration>, since: Instant) -> bool {
    allowed.is_none_or(|d| Instant::now().saturating_duration_since(since) <= d)
}

/// The most recently parked idle connection of a pool, with when it was parked.
fn take_idle<T>(pool: &Mutex<Vec<(T, Instant)>>) -> Option<(T, Instant)> {
    pool.lock().unwrap_or_else(|e| e.into_inner()).pop()
}

/// Parks an idle connection, unless the pool is full (then it is closed by dropping it).
fn park_idle<T>(pool: &Mutex<Vec<(T, Instant)>>, conn: T) {
    let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < MAX_IDLE {
        pool.push((conn, Instant::now()));
    }
}

/// Backoff after the first failure.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest backoff: a failing endpoint is tried again (one request at a time) at least this
/// often, so a recovered one gets traffic back within it.
pub const BACKOFF_MAX: Duration = Duration::from_millis(3200);

/// How long an endpoint stays out after `failures` consecutive failures (pure).
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}

/// What the balancer knows about an endpoint's health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Consecutive failures (0: healthy).
    pub failures: u32,
    /// Still within the backoff that followed the last failure.
    pub backoff: bool,
    /// Ejected by outlier detection.
    pub ejected: bool,
    /// Back from an ejection and not yet answered well: one request at a time.
    pub probing: bool,
    /// Failing its active health check.
    pub down: bool,
}

impl Health {
    /// Whether the endpoint takes traffic at all while others do, and if not, why.
    pub fn usable(&self) -> Result<(), &'static str> {
        if self.ejected {
            Err("ejected")
        } else if self.down {
            Err("health check failing")
        } else {
            Ok(())
        }
    }
}

/// `t` in nanoseconds on the endpoint clock (since the first use of it).
pub fn nanos(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

/// Keeps an endpoint's in-flight count raised while alive.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint no request has used has no pools: a mesh-wide view holds thousands of
    /// endpoints, most of which a sidecar never calls.
    #[test]
    fn an_unused_endpoint_is_small() {
        let e = EndpointState::new(([127, 0, 0, 1], 1).into(), None, Default::default());
        assert!(!e.close_idle(), "nothing to close");
        assert!(e.pools.get().is_none(), "looking made the pools");
        let size = size_of::<EndpointState>();
        assert!(size <= 192, "{size} bytes");
    }

    #[test]
    fn http2_requests_spread_over_a_bounded_pool() {
        use H2Choice::*;
        // (open streams per connection, connecting, waiting for those, max streams,
        //  max connections, choice)
        type Case = (&'static [usize], usize, usize, usize, usize, H2Choice);
        let cases: &[Case] = &[
            (&[], 0, 0, 100, 8, Connect),
            (&[3], 0, 0, 100, 8, Use(0)),
            // The least loaded connection with room.
            (&[99, 40, 70], 0, 0, 100, 8, Use(1)),
            // Full: another connection.
            (&[100], 0, 0, 100, 8, Connect),
            // One being established has room: wait for it rather than open another (a
            // burst of requests becomes one handshake).
            (&[], 1, 0, 100, 8, Wait),
            (&[], 1, 99, 100, 8, Wait),
            (&[100, 100], 1, 0, 100, 8, Wait),
            // It is spoken for: another connection.
            (&[], 1, 100, 100, 8, Connect),
            (&[100, 100], 1, 100, 100, 8, Connect),
            // At the connection cap: the least loaded full one.
            (&[100, 120, 100, 100], 0, 0, 100, 4, Crowd(0)),
            (&[120, 101], 2, 200, 100, 4, Crowd(1)),
            // Nothing open yet and every allowed connection still being made and spoken for.
            (&[], 8, 800, 100, 8, Alone),
        ];
        for (streams, connecting, waiting, max_streams, max_conns, want) in cases {
            let least = streams.iter().copied().enumerate().min_by_key(|(_, n)| *n);
            assert_eq!(
                H2Pool::choose(
                    least,
                    streams.len(),
                    *connecting,
                    *waiting,
                    *max_streams,
                    *max_conns
                ),
                *want,
                "{streams:?} connecting={connecting} waiting={waiting} max={max_streams}/{max_conns}"
            );
        }
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let ms = |n| backoff(n).as_millis();
        let cases = [
            (0, 100),
            (1, 100),
            (2, 200),
            (3, 400),
            (6, 3200),
            (7, 3200),
            (u32::MAX, 3200),
        ];
        for (n, want) in cases {
            assert_eq!(ms(n), want, "{n} failures");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_a_success_clears_them() {
        let e = EndpointState::new("127.0.0.1:1".parse().unwrap(), None, Default::default());
        assert_eq!(e.health(Instant::now()), Health::default());
        assert_eq!(e.failed(Instant::now()), 1);
        let h = e.health(Instant::now());
        assert!(h.backoff && h.failures == 1, "{h:?}");
        tokio::time::advance(BACKOFF_BASE).await;
        // Out of backoff, but still remembered as failing until it succeeds.
        assert_eq!(
            e.health(Instant::now()),
            Health {
                failures: 1,
                backoff: false,
                ..Default::default()
            }
        );
        assert_eq!(e.failed(Instant::now()), 2);
        tokio::time::advance(BACKOFF_BASE).await;
        assert!(
            e.health(Instant::now()).backoff,
            "second backoff is twice as long"
        );
        tokio::time::advance(BACKOFF_BASE).await;
        assert!(!e.health(Instant::now()).backoff);
        e.succeeded();
        assert_eq!(e.health(Instant::now()), Health::default());
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_takes_peaks_and_decays() {
        let e = EndpointState::new("127.0.0.1:1".parse().unwrap(), None, Default::default());
        let decay = Duration::from_secs(10);
        let now = Instant::now();
        e.observe(Duration::from_millis(100), now, decay);
        assert!(
            (e.ewma(now, decay) - 0.100).abs() < 1e-9,
            "a peak is taken at once"
        );
        // A fast answer right after barely moves it (weight of the old value ~1).
        e.observe(Duration::from_millis(1), now, decay);
        assert!(e.ewma(now, decay) > 0.099);
        // One decay window later, the estimate has fallen to 1/e of itself.
        tokio::time::advance(decay).await;
        let later = e.ewma(Instant::now(), decay);
        assert!(
            (later - 0.100 / std::f64::consts::E).abs() < 1e-3,
            "{later}"
        );
        // And a fast answer then pulls it most of the way down.
        e.observe(Duration::from_millis(1), Instant::now(), decay);
        assert!(e.ewma(Instant::now(), decay) < 0.04);
    }
}
