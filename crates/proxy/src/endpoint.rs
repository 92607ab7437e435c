//! Per-endpoint state that outlives config snapshots: load counters for balancing and the
//! pool of upstream connections.

use crate::body::Body;
use crate::error::ProxyError;
use crate::tls::Upstream;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
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
    mesh: crate::tls::MeshSlot,
    in_flight: AtomicU64,
    /// Peak-EWMA latency estimate in seconds, as `f64` bits.
    ewma: AtomicU64,
    /// When `ewma` was last updated, nanoseconds since [`epoch`].
    stamp: AtomicU64,
    h1_idle: Mutex<Vec<(http1::SendRequest<Body>, Instant)>>,
    /// Idle connections of the lean client (requests without a body), kept apart from
    /// hyper's: each kind of connection is driven by its own client.
    lean_idle: Mutex<Vec<(crate::h1::Conn, Instant)>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
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
            mesh,
            in_flight: AtomicU64::new(0),
            ewma: AtomicU64::new(DEFAULT_RTT.to_bits()),
            stamp: AtomicU64::new(nanos(Instant::now())),
            h1_idle: Mutex::new(Vec::new()),
            lean_idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
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

    /// An HTTP/1.1 connection ready for a request: a pooled one idle for no longer than
    /// `idle_timeout` at `now`, or a new one.
    pub async fn http1(
        &self,
        connect_timeout: Duration,
        idle_timeout: Duration,
        now: Instant,
    ) -> Result<http1::SendRequest<Body>, ProxyError> {
        while let Some((mut tx, since)) = take_idle(&self.h1_idle) {
            if tx.is_closed() || now.saturating_duration_since(since) > idle_timeout {
                continue;
            }
            if tx.ready().await.is_ok() {
                return Ok(tx);
            }
        }
        let io = self.connect(connect_timeout).await?;
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

    /// Returns a connection whose previous exchange finished cleanly.
    pub fn release_http1(&self, tx: http1::SendRequest<Body>) {
        park_idle(&self.h1_idle, tx);
    }

    /// A connection for the lean HTTP/1.1 client: a pooled one idle for no longer than
    /// `idle_timeout` at `now` that the upstream has not closed, or a new one.
    pub async fn lean(
        &self,
        connect_timeout: Duration,
        idle_timeout: Duration,
        now: Instant,
    ) -> Result<crate::h1::Conn, ProxyError> {
        while let Some((mut conn, since)) = take_idle(&self.lean_idle) {
            if now.saturating_duration_since(since) <= idle_timeout && conn.is_usable() {
                return Ok(conn);
            }
        }
        Ok(crate::h1::Conn::new(self.connect(connect_timeout).await?))
    }

    /// Returns a lean connection whose previous exchange finished cleanly.
    pub fn release_lean(&self, conn: crate::h1::Conn) {
        park_idle(&self.lean_idle, conn);
    }

    /// The shared HTTP/2 connection, established on first use.
    pub async fn http2(
        &self,
        connect_timeout: Duration,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        if let Some(tx) = self.h2.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
            && !tx.is_closed()
        {
            return Ok(tx.clone());
        }
        let io = self.connect(connect_timeout).await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::UpstreamProtocol(self.addr, e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream http/2 connection ended");
            }
        });
        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
        Ok(tx)
    }

    /// A new connection within `timeout`: mutual TLS when the endpoint has an identity and
    /// this proxy has one too, else plain TCP.
    pub async fn connect(&self, timeout: Duration) -> Result<Upstream, ProxyError> {
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
                Some((name, m)) => m
                    .connector
                    .connect(name, s)
                    .await
                    .map(|t| Upstream::Tls(Box::new(t)))
                    .map_err(|e| ProxyError::Connect(self.addr, format!("mutual TLS: {e}"))),
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

fn nanos(t: Instant) -> u64 {
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
