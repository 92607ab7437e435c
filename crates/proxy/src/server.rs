//! Listeners and connections: accept, detect the protocol, hand the connection to the HTTP
//! server or the TCP forwarder, and drain gracefully on shutdown.

use crate::conns::{Admit, ConnTable, Slot};
use crate::detect::{self, Protocol};
use crate::http::{self as proxy_http, ConnInfo};
use crate::io::{Activity, ClientIo, Conn};
use crate::metrics::{
    ConnLabels, DetectLabels, LimitLabels, Metrics, RefusedLabels, SecurityLabels,
};
use crate::snapshot::{Listener, ListenerKind, Snapshot};
use crate::{tcp, tls};
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use trellis_api::mesh::MtlsMode;
use trellis_api::service::AppProtocol;

/// State shared by every connection: the current snapshot, metrics, and shutdown signals.
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    /// Metrics.
    pub metrics: Metrics,
    /// Cancelled when the proxy starts draining: stop accepting, finish in-flight work.
    pub draining: CancellationToken,
    /// Every connection task, to wait for on drain.
    pub tasks: TaskTracker,
    /// This proxy's mutual TLS state, once it has an identity.
    pub mesh: crate::tls::MeshSlot,
    /// JWKS fetched from URLs, kept across snapshots.
    pub jwks: crate::jwt::JwksCache,
    /// Open client connections, for the caps.
    pub conns: Arc<ConnTable>,
    /// Signs session persistence tokens; kept across snapshots so reloads keep sessions.
    pub session_key: crate::session::Key,
    /// Traffic counts and taps for the control plane's fleet view.
    pub report: crate::report::Collector,
    /// Tracing and access-log sinks, swapped with the snapshot.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Global-scope rate limit buckets, for the quota client; kept across snapshots.
    pub globals: Arc<crate::ratelimit::Globals>,
}

impl Shared {
    /// Counts an authorization verdict in the metrics (which log denials) and in the next
    /// report to the control plane.
    pub fn authz_verdict(
        &self,
        listener: &Arc<str>,
        v: &crate::authz::Verdict,
        what: &dyn std::fmt::Display,
    ) {
        self.metrics.authz_verdict(listener, v, what);
        self.report.authorized(listener, v);
    }

    /// New shared state with an empty snapshot.
    pub fn new() -> Shared {
        let telemetry = Arc::new(crate::telemetry::Telemetry::default());
        let mut metrics = Metrics::default();
        metrics.register_collector(telemetry.collector());
        Shared {
            telemetry,
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            metrics,
            draining: CancellationToken::new(),
            tasks: TaskTracker::new(),
            mesh: Default::default(),
            jwks: Default::default(),
            conns: Default::default(),
            session_key: Default::default(),
            report: Default::default(),
            globals: Default::default(),
        }
    }

    /// The current snapshot (lock-free).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Swaps in a new snapshot.
    pub fn store(&self, snap: Arc<Snapshot>) {
        self.metrics.config_version.set(snap.version as i64);
        self.snapshot.store(snap);
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

/// A running accept loop.
struct Running {
    configured: SocketAddr,
    bound: SocketAddr,
    stop: CancellationToken,
}

/// Publishes the connection caps of `snap` as gauges.
fn publish_limits(metrics: &Metrics, snap: &Snapshot) {
    let b = &snap.settings.bounds;
    metrics.total_limit.set(i64::from(b.max_connections));
    for l in &snap.listeners {
        metrics
            .listener_limit
            .get_or_create(&ConnLabels {
                direction: l.direction(),
                listener: l.name.clone(),
            })
            .set(i64::from(b.max_connections_per_listener));
    }
}

/// The set of bound listeners, reconciled against each new snapshot.
#[derive(Default)]
pub struct Listeners {
    running: HashMap<Arc<str>, Running>,
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("listener {name} cannot bind {addr}: {source}")]
pub struct BindError {
    /// Listener name.
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

impl Listeners {
    /// Binds every listener `snap` adds (all or none), then returns a commit function that
    /// starts them and stops the ones `snap` removed. Binding first means a port conflict
    /// rejects the whole snapshot before anything changes.
    pub fn prepare(&self, snap: &Snapshot) -> Result<Vec<(Listener, TcpListener)>, BindError> {
        let mut fresh = Vec::new();
        for l in &snap.listeners {
            if self
                .running
                .get(&l.name)
                .is_some_and(|r| r.configured == l.addr)
            {
                continue;
            }
            // A listener moving to a new address must release the old one first if they are
            // the same port; other cases bind side by side.
            let std_listener = bind(l.addr).map_err(|source| BindError {
                name: l.name.to_string(),
                addr: l.addr,
                source,
            })?;
            fresh.push((l.clone(), std_listener));
        }
        Ok(fresh)
    }

    /// Starts prepared listeners and stops those no longer in `snap`.
    pub fn commit(
        &mut self,
        shared: &Arc<Shared>,
        snap: &Snapshot,
        fresh: Vec<(Listener, TcpListener)>,
    ) {
        publish_limits(&shared.metrics, snap);
        let keep: HashMap<&str, SocketAddr> =
            snap.listeners.iter().map(|l| (&*l.name, l.addr)).collect();
        self.running.retain(|name, r| {
            let stays = keep.get(&**name) == Some(&r.configured);
            if !stays {
                r.stop.cancel();
            }
            stays
        });
        for (l, tcp) in fresh {
            let stop = shared.draining.child_token();
            let bound = tcp.local_addr().unwrap_or(l.addr);
            tracing::info!(listener = %l.name, addr = %bound, direction = l.direction(), "listening");
            self.running.insert(
                l.name.clone(),
                Running {
                    configured: l.addr,
                    bound,
                    stop: stop.clone(),
                },
            );
            let shared2 = shared.clone();
            shared
                .tasks
                .spawn(accept_loop(shared2, Arc::new(l), tcp, stop));
        }
    }

    /// The bound address of a listener (useful when configured with port 0).
    pub fn bound(&self, name: &str) -> Option<SocketAddr> {
        self.running.get(name).map(|r| r.bound)
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    tcp: TcpListener,
    stop: CancellationToken,
) {
    // This listener's open connections, against its cap.
    let listener_open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    accept_failed(&shared, &listener.name, &e, &mut warned);
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        accepted(&shared, &listener, &listener_open, stream, peer);
    }
    // Connections the kernel already completed are clients that sent (or are sending) a
    // request: served, not reset by closing the listener on them. Taken with plain
    // non-blocking accepts (tokio's would wait for the reactor to report readiness).
    let Ok(queue) = tcp.into_std() else { return };
    loop {
        match queue.accept() {
            Ok((stream, peer)) => {
                match stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(stream))
                {
                    Ok(stream) => accepted(&shared, &listener, &listener_open, stream, peer),
                    Err(e) => tracing::debug!(error = %e, %peer, "queued connection lost"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                accept_failed(&shared, &listener.name, &e, &mut warned);
                return;
            }
        }
    }
}

/// Admits an accepted connection against the caps (shedding a silent one to make room, or
/// refusing it) and serves it on a task of its own.
fn accepted(
    shared: &Arc<Shared>,
    listener: &Arc<Listener>,
    listener_open: &Arc<std::sync::atomic::AtomicUsize>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let limit_labels = |limit: &'static str, listener: Arc<str>| LimitLabels { listener, limit };
    let snap = shared.snapshot();
    // Connection rate limits, before the caps: a refused one never sheds another.
    if !crate::ratelimit::admit_connection(shared, &snap, &listener.name, peer) {
        return;
    }
    let bounds = &snap.settings.bounds;
    let decision = crate::conns::admit(
        shared.conns.open(),
        bounds.max_connections as usize,
        listener_open.load(std::sync::atomic::Ordering::Relaxed),
        bounds.max_connections_per_listener as usize,
    );
    let shed = match decision {
        Admit::Accept => None,
        Admit::ShedListener => Some(("listener", shared.conns.shed_oldest(Some(&listener.name)))),
        Admit::ShedAny => Some(("total", shared.conns.shed_oldest(None))),
    };
    match shed {
        Some((limit, Some(from))) => {
            shared
                .metrics
                .shed
                .get_or_create(&limit_labels(limit, from))
                .inc();
        }
        Some((limit, None)) => {
            // Every connection at the cap is doing work: the newcomer waits its turn.
            tracing::debug!(listener = %listener.name, %peer, limit, "connection refused at the cap");
            shared
                .metrics
                .refused
                .get_or_create(&limit_labels(limit, listener.name.clone()))
                .inc();
            drop(stream);
            return;
        }
        None => {}
    }
    let slot = shared.conns.register(&listener.name, listener_open);
    let _ = stream.set_nodelay(true);
    let shared2 = shared.clone();
    let l = listener.clone();
    shared.tasks.spawn(async move {
        let labels = ConnLabels {
            direction: l.direction(),
            listener: l.name.clone(),
        };
        shared2.metrics.connections.get_or_create(&labels).inc();
        let open = shared2
            .metrics
            .open_connections
            .get_or_create(&labels)
            .clone();
        open.inc();
        let opened = tokio::time::Instant::now();
        let shed = slot.shed.clone();
        tokio::select! {
            r = serve_connection(&shared2, l, stream, peer, &slot) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, %peer, "connection ended with error");
                }
            }
            // Shed to make room: dropping the connection closes it.
            _ = shed.cancelled() => tracing::debug!(%peer, "silent connection shed"),
        }
        open.dec();
        shared2
            .metrics
            .tcp_duration
            .get_or_create(&labels)
            .observe(opened.elapsed().as_secs_f64());
    });
}

/// An accept error (out of file descriptors and the like): counted, logged at most once a
/// second (a flood must not become a log flood), and a silent connection is shed to free a
/// descriptor, so that such a flood cannot lock every client out.
fn accept_failed(
    shared: &Shared,
    listener: &Arc<str>,
    e: &std::io::Error,
    warned: &mut Option<tokio::time::Instant>,
) {
    if warned.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
        tracing::warn!(listener = %listener, error = %e, "accept failed");
        *warned = Some(tokio::time::Instant::now());
    }
    let labels = |listener: Arc<str>| LimitLabels {
        listener,
        limit: "accept_error",
    };
    shared
        .metrics
        .refused
        .get_or_create(&labels(listener.clone()))
        .inc();
    if let Some(from) = shared.conns.shed_oldest(None) {
        shared.metrics.shed.get_or_create(&labels(from)).inc();
    }
}

/// What an inbound connection turned out to be, before protocol detection.
struct Accepted {
    conn: Conn,
    prefix: bytes::BytesMut,
    peer_identity: Option<Arc<str>>,
    /// The detection wait already ran out (a server-speaks-first client).
    timed_out: bool,
    /// A peer sidecar negotiated HTTP/2 (ALPN `trellis/h2`).
    mesh_h2: bool,
}

/// Inbound: mutual TLS from another sidecar is terminated here (its identity recorded);
/// anything else is plaintext, accepted in permissive mode and closed in strict mode.
async fn accept_inbound(
    shared: &Shared,
    listener: &Listener,
    mode: MtlsMode,
    mut stream: TcpStream,
    wait: std::time::Duration,
) -> std::io::Result<Option<Accepted>> {
    let mut buf = bytes::BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + wait;
    let (hello, timed_out) = loop {
        match tls::client_hello(&buf) {
            tls::Hello::Incomplete => {}
            done => break (done, false),
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => break (tls::Hello::NotTls, true),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => break (tls::Hello::NotTls, false),
            Ok(Ok(_)) => {}
        }
    };
    let count = |security: &'static str| {
        shared
            .metrics
            .inbound_security
            .get_or_create(&SecurityLabels {
                listener: listener.name.clone(),
                security,
            })
            .inc();
    };
    let mesh = shared.mesh.load_full();
    match (hello, mesh) {
        (tls::Hello::Tls(Some(name)), Some(m)) if tls::is_mesh_name(&name) => {
            let handshake = m.acceptor.accept(tls::Rewind::new(buf.freeze(), stream));
            match tokio::time::timeout(std::time::Duration::from_secs(10), handshake).await {
                Ok(Ok(s)) => {
                    if let Err(e) = tls::recheck_resumed(&m.creds, s.get_ref().1) {
                        tracing::debug!(error = %e, listener = %listener.name, "resumed mutual TLS session refused");
                        count("refused_handshake");
                        return Ok(None);
                    }
                    let mesh_h2 =
                        s.get_ref().1.alpn_protocol() == Some(trellis_identity::tls::ALPN_MESH_H2);
                    let peer_identity: Option<Arc<str>> = s
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(trellis_identity::inspect)
                        .map(|(id, _)| Arc::from(id.to_string()));
                    count("mtls");
                    if let Some(id) = &peer_identity {
                        tracing::debug!(listener = %listener.name, peer = %id, "mutual TLS connection");
                        shared
                            .metrics
                            .peers
                            .get_or_create(&crate::metrics::PeerLabels {
                                listener: listener.name.clone(),
                                peer: id.clone(),
                            })
                            .inc();
                    }
                    Ok(Some(Accepted {
                        conn: Conn::Tls(Box::new(s)),
                        prefix: bytes::BytesMut::new(),
                        peer_identity,
                        timed_out: false,
                        mesh_h2,
                    }))
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, listener = %listener.name, "mutual TLS handshake refused");
                    count("refused_handshake");
                    Ok(None)
                }
                Err(_) => {
                    count("refused_handshake");
                    Ok(None)
                }
            }
        }
        _ if mode == MtlsMode::Strict => {
            tracing::debug!(listener = %listener.name, "plaintext connection refused (strict mutual TLS)");
            count("refused_plaintext");
            Ok(None)
        }
        _ => {
            count("plaintext");
            Ok(Some(Accepted {
                conn: Conn::Tcp(stream),
                prefix: buf,
                peer_identity: None,
                timed_out,
                mesh_h2: false,
            }))
        }
    }
}

/// Watches a client connection: once it has gone `idle` without a request being handled, a
/// request starting or ending, or bytes moving, `stop` asks it to close gracefully (an idle
/// keep-alive connection closes at once); if it then makes no progress for as long again,
/// `abandon` drops it. With `stalled` (HTTP/1.1, where a request is the whole connection), a
/// request in flight that moves no byte for that long (a client that never reads its
/// response, a request body that stops) drops the connection too, releasing its upstream
/// connection; HTTP/2 resets such streams one by one instead (`streams.rs`). Checks run every
/// half of the shorter period, so a connection is closed within one and a half periods.
async fn watch_idle(
    activity: Arc<Activity>,
    stop: CancellationToken,
    abandon: CancellationToken,
    idle: std::time::Duration,
    stalled: Option<(
        std::time::Duration,
        prometheus_client::metrics::counter::Counter,
    )>,
) {
    let tick = stalled.as_ref().map_or(idle, |(s, _)| idle.min(*s)) / 2;
    let mut last = activity.progress();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = activity.progress();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
            continue;
        }
        let quiet = since.elapsed();
        if activity.is_busy() {
            if let Some((limit, counter)) = &stalled
                && quiet >= *limit
            {
                tracing::debug!(quiet = ?quiet, "request made no progress; connection dropped");
                counter.inc();
                abandon.cancel();
                return;
            }
            continue;
        }
        if quiet >= idle {
            if stop.is_cancelled() {
                abandon.cancel();
                return;
            }
            stop.cancel();
            since = tokio::time::Instant::now();
        }
    }
}

/// Refuses a connection that is not HTTP on a port whose policy needs HTTP: counted, and
/// closed. Bytes that are not an HTTP request get a 400 first, as a parser would answer them.
async fn refuse(shared: &Shared, listener: &Arc<str>, reason: &'static str, stream: &mut Conn) {
    tracing::debug!(%listener, reason, "connection refused: the port's policy needs HTTP");
    shared
        .metrics
        .inbound_refused
        .get_or_create(&RefusedLabels {
            listener: listener.clone(),
            reason,
        })
        .inc();
    if matches!(reason, "not_http" | "request_line_too_long") {
        let answer = async {
            stream
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await?;
            stream.shutdown().await
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), answer).await;
    }
}

async fn serve_connection(
    shared: &Arc<Shared>,
    listener: Arc<Listener>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: &Arc<Slot>,
) -> std::io::Result<()> {
    let snap = shared.snapshot();
    let direction = listener.direction();
    // The listener as currently configured: a reload may have changed its mode since the
    // listener was bound.
    let current = snap
        .listeners
        .iter()
        .find(|l| l.name == listener.name)
        .unwrap_or(&listener);
    let accepted = match &current.kind {
        ListenerKind::Inbound { mtls, .. } => {
            match accept_inbound(
                shared,
                &listener,
                *mtls,
                stream,
                snap.settings.detect_timeout,
            )
            .await?
            {
                Some(a) => a,
                None => return Ok(()),
            }
        }
        _ => Accepted {
            conn: Conn::Tcp(stream),
            prefix: bytes::BytesMut::new(),
            peer_identity: None,
            timed_out: false,
            mesh_h2: false,
        },
    };
    let Accepted {
        conn: mut stream,
        prefix,
        peer_identity,
        timed_out,
        mesh_h2,
    } = accepted;
    // A completed mutual TLS handshake is work done by an authenticated peer: not shed.
    if matches!(stream, Conn::Tls(_)) {
        slot.heard();
    }
    // The current declaration: a service's `appProtocol` may arrive after the listener was
    // bound (a sidecar starts before the control plane's view reaches it).
    let (protocol, prefix, how) = match current.protocol {
        // The peer sidecar chose HTTP/2 for this connection (ALPN): its requests are HTTP.
        _ if mesh_h2 => (Protocol::Http2, prefix, "alpn"),
        Some(AppProtocol::Tcp) => (Protocol::Tcp, prefix, "declared"),
        Some(AppProtocol::Http2 | AppProtocol::Grpc) => (Protocol::Http2, prefix, "declared"),
        Some(AppProtocol::Http) => {
            // Declared HTTP: no TCP fallback, only HTTP/1 versus HTTP/2 prior knowledge.
            // Anything else is served as HTTP/1 and answered 400.
            let (p, buf, _) =
                detect::detect(&mut stream, prefix, snap.settings.bounds.first_byte_timeout)
                    .await?;
            (
                if p == Protocol::Http2 {
                    Protocol::Http2
                } else {
                    Protocol::Http1
                },
                buf,
                "declared",
            )
        }
        None if timed_out => (Protocol::Tcp, prefix, "timeout"),
        None => {
            let (p, buf, timed_out) =
                detect::detect(&mut stream, prefix, snap.settings.detect_timeout).await?;
            (p, buf, if timed_out { "timeout" } else { "detected" })
        }
    };
    if !prefix.is_empty() {
        slot.heard();
    }
    let name = match protocol {
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Tcp => "tcp",
    };
    shared
        .metrics
        .detect
        .get_or_create(&DetectLabels {
            direction,
            protocol: name,
            how,
        })
        .inc();
    // Fail closed: where the policy reads requests, what is not HTTP is never forwarded.
    if protocol == Protocol::Tcp
        && let ListenerKind::Inbound {
            requires_http: true,
            ..
        } = current.kind
    {
        let reason = match how {
            "declared" => "declared_tcp",
            "timeout" => "detect_timeout",
            _ if prefix.is_empty() => return Ok(()), // closed before sending anything
            _ => detect::not_http_reason(&prefix),
        };
        refuse(shared, &listener.name, reason, &mut stream).await;
        return Ok(());
    }
    let labels = ConnLabels {
        direction,
        listener: listener.name.clone(),
    };
    // HTTP connections have an idle watchdog: HTTP/1.1 ones count response bytes written
    // as progress, HTTP/2 ones only streams starting and ending (so that PING and SETTINGS
    // frames do not keep an unused connection open).
    let activity = Arc::new(Activity::default());
    let watched = (protocol != Protocol::Tcp).then(|| activity.clone());
    let io = ClientIo::new(
        stream,
        prefix.freeze(),
        shared.metrics.read_bytes.get_or_create(&labels).clone(),
        shared.metrics.write_bytes.get_or_create(&labels).clone(),
        watched.clone().filter(|_| protocol == Protocol::Http1),
        Some(slot.clone()),
    );
    match protocol {
        Protocol::Tcp => {
            if let ListenerKind::Inbound { authz, port, .. } = &current.kind
                && !authz.is_open()
            {
                let verdict = authz.decide(
                    &crate::authz::Request {
                        peer: peer_identity.as_deref(),
                        http: None,
                        port: *port,
                        claims: None,
                    },
                    jiff::Timestamp::now(),
                );
                shared.authz_verdict(
                    &listener.name,
                    &verdict,
                    &format_args!(
                        "TCP connection from {}",
                        peer_identity.as_deref().unwrap_or("(no identity)")
                    ),
                );
                if !verdict.allow {
                    // Opaque TCP has no way to say why: the connection is closed.
                    return Ok(());
                }
            }
            // From the current snapshot, not the one the listener was bound under: endpoints
            // that arrived or changed since then are used by each new connection.
            let backend = match &current.kind {
                ListenerKind::Inbound { app, .. } => app.clone(),
                ListenerKind::Service(_, _, entry) => entry.backend.clone(),
                // Without an HTTP Host there is nothing to route on.
                ListenerKind::HttpProxy => return Ok(()),
            };
            let drain = shared.draining.clone();
            let (first, idle) = (
                snap.settings.bounds.first_byte_timeout,
                snap.settings.bounds.tcp_idle_timeout,
            );
            // A long-lived connection does not pin the config it started under (nor the
            // metric series only that config has).
            drop(snap);
            // This connection's access log line (module hop), written when it ends.
            let logged = crate::hop::TcpHop::begin(
                &shared.telemetry,
                direction,
                peer,
                peer_identity.clone(),
                &backend.name,
            );
            // Opaque streams cannot be asked to finish: they run until the drain deadline.
            tokio::select! {
                r = tcp::forward(&backend, io, peer, first, idle, &shared.metrics, direction, peer_identity.as_deref()) => {
                    logged.end(&r);
                    if let Ok(Some(crate::io::Spliced::Idle)) = r {
                        shared.metrics.idle("tcp");
                    }
                    r.map(|_| ())
                }
                _ = async { drain.cancelled().await; std::future::pending::<()>().await } => Ok(()),
            }
        }
        Protocol::Http1 | Protocol::Http2 => {
            // Requests read the current snapshot; the connection keeps none of its own.
            let client_idle = snap.settings.client_idle_timeout;
            let stream_idle = snap.settings.bounds.stream_idle_timeout;
            let stalled_counter = shared
                .metrics
                .idle_closed
                .get_or_create(&crate::metrics::IdleLabels { kind: "stream" })
                .clone();
            drop(snap);
            let conn = Arc::new(ConnInfo {
                listener,
                client: peer,
                peer_identity,
                activity: watched,
                streams: Default::default(),
                mesh_h2,
            });
            let shared2 = shared.clone();
            // An HTTP/1.1 client learns how long an idle connection stays open (whole
            // seconds, rounded down: it is closed one to one and a half periods after going
            // quiet), so that it does not send a request as the connection closes; the
            // outbound's lean client heeds it (`h1::idle_allowed`).
            let keep_alive = (protocol == Protocol::Http1)
                .then(|| {
                    http::HeaderValue::from_str(&format!("timeout={}", client_idle.as_secs())).ok()
                })
                .flatten();
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                // A tunnel's connection is no longer HTTP/1.1 once it answered.
                let keep_alive = keep_alive
                    .clone()
                    .filter(|_| req.method() != http::Method::CONNECT);
                // Boxed: the request path's state machine is large, and hyper moves the
                // service's future into a task of its own for every HTTP/2 stream (copied on
                // each move; bench/RESULTS.md). A box moves as one pointer.
                let answer = Box::pin(proxy_http::handle(shared2.clone(), conn.clone(), req));
                async move {
                    let mut resp = answer.await?;
                    if let Some(v) = keep_alive
                        && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
                    {
                        resp.headers_mut().insert(crate::h1::KEEP_ALIVE, v);
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let io = TokioIo::new(io);
            // One watchdog per connection, ending with it: idle (HTTP/1.1 between requests,
            // HTTP/2 without a stream: GOAWAY) asks for a graceful close, then drops a
            // connection that does not finish; a stalled HTTP/1.1 request drops it at once
            // (HTTP/2 resets stalled streams one by one instead).
            let stop = shared.draining.child_token();
            let abandon = CancellationToken::new();
            let stalled = (protocol == Protocol::Http1).then_some((stream_idle, stalled_counter));
            let _watchdog = AbortOnDropHandle::new(tokio::spawn(watch_idle(
                activity,
                stop.clone(),
                abandon.clone(),
                client_idle,
                stalled,
            )));
            if protocol == Protocol::Http1 {
                // Accepted while draining: its request is served, with `connection: close`.
                // (A graceful shutdown before hyper has read the request would close the
                // connection unanswered.) The watchdog and the drain deadline bound it.
                let late = stop.is_cancelled();
                // No header-read timer from hyper: it arms and drops a timer for every
                // request. The connection's watchdog covers the same ground (idle keep-alive
                // connections, request heads sent slowly) from a task of its own.
                let c = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(None)
                    .keep_alive(!late)
                    .serve_connection(io, svc)
                    .with_upgrades();
                tokio::pin!(c);
                if late {
                    return tokio::select! {
                        r = c.as_mut() => r.map_err(std::io::Error::other),
                        _ = abandon.cancelled() => Ok(()),
                    };
                }
                tokio::select! {
                    r = c.as_mut() => return r.map_err(std::io::Error::other),
                    _ = stop.cancelled() => c.as_mut().graceful_shutdown(),
                    // A stalled request: nothing to finish gracefully.
                    _ = abandon.cancelled() => return Ok(()),
                }
                // Draining or idle: requests in flight finish, then the connection closes.
                // One that still makes no progress (a request head never completed) is
                // dropped.
                tokio::select! {
                    r = c.as_mut() => r.map_err(std::io::Error::other),
                    _ = abandon.cancelled() => Ok(()),
                }
            } else {
                // Explicit limits (hyper's defaults today), so that an upgrade cannot
                // loosen them unnoticed: concurrent streams, header list size (bounds
                // CONTINUATION floods and HPACK bombs), streams reset before being served
                // (rapid reset) and streams this side had to reset.
                // A peer sidecar's connection carries HTTP/1.1 heads: it takes what
                // HTTP/1.1 would (the peer is authenticated and bounded by its own side).
                let header_list = if mesh_h2 {
                    proxy_http::MESH_H2_MAX_HEADER_LIST
                } else {
                    16 * 1024
                };
                let c = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(200)
                    .max_header_list_size(header_list)
                    .max_pending_accept_reset_streams(20)
                    .max_local_error_reset_streams(1024)
                    .serve_connection(io, svc);
                tokio::pin!(c);
                tokio::select! {
                    r = c.as_mut() => return r.map_err(std::io::Error::other),
                    _ = stop.cancelled() => c.as_mut().graceful_shutdown(),
                }
                if !shared.draining.is_cancelled() {
                    shared.metrics.idle("http2");
                }
                tokio::select! {
                    r = c.as_mut() => r.map_err(std::io::Error::other),
                    _ = abandon.cancelled() => Ok(()),
                }
            }
        }
    }
}
