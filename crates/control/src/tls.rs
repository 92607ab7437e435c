//! The control channel's transport: TLS with a server certificate from the mesh CA (renewed
//! before expiry), the verified client certificate of each connection handed to the
//! handlers, and the bounds every connection lives under (handshake deadline, idle timeout,
//! a cap on concurrent connections).

use crate::Control;
use arc_swap::ArcSwapOption;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use trellis_identity::CertificateDer;

/// Bounds on the control plane's connections.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A connection must finish its TLS handshake (or, in plaintext, send its first bytes)
    /// within this.
    pub handshake_timeout: Duration,
    /// A connection that receives nothing for this long is closed. Proxies keep their
    /// stream alive with HTTP/2 pings (every 10 s), so live streams are never cut.
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 4096,
        }
    }
}

/// Who is at the other end of a request's connection (a request extension).
#[derive(Clone, Debug)]
pub struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    /// The client certificate chain verified in the TLS handshake, leaf first.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// The server certificate, replaced before it expires.
pub(crate) struct ServerTls {
    config: ArcSwapOption<rustls::ServerConfig>,
}

impl ServerTls {
    /// Issues the first certificate for `names`.
    pub(crate) fn new(control: &Control, names: &[String]) -> io::Result<Arc<ServerTls>> {
        let tls = Arc::new(ServerTls {
            config: ArcSwapOption::empty(),
        });
        tls.renew(control, names)?;
        Ok(tls)
    }

    /// Issues a new certificate; returns when it expires.
    fn renew(&self, control: &Control, names: &[String]) -> io::Result<SystemTime> {
        let (cert, bundle) = control
            .issue_server_cert(names)
            .map_err(|e| io::Error::other(format!("control plane certificate: {e}")))?;
        let config = trellis_identity::control::control_server_config(
            &cert.chain_pem,
            &cert.key_pem,
            &bundle,
        )
        .map_err(io::Error::other)?;
        self.config.store(Some(config));
        Ok(cert.not_after)
    }

    pub(crate) fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.config.load_full().map(tokio_rustls::TlsAcceptor::from)
    }

    /// Renews at two thirds of each certificate's lifetime until `stop`.
    pub(crate) async fn keep_renewed(
        self: Arc<Self>,
        control: Arc<Control>,
        names: Vec<String>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut issued = SystemTime::now();
        let mut not_after = issued + control.settings.identity.cert_ttl;
        loop {
            let due = trellis_identity::renew_at(issued, not_after);
            let wait = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::from_secs(1));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match self.renew(&control, &names) {
                Ok(t) => {
                    issued = SystemTime::now();
                    not_after = t;
                    tracing::info!("control plane certificate renewed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control plane certificate renewal failed; retrying in 30s");
                    issued = SystemTime::now();
                    not_after = issued + Duration::from_secs(45);
                }
            }
        }
    }
}

/// The names the server certificate carries: the loopback names, the listen address when
/// it is specific, and the operator's extra names.
pub(crate) fn server_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// A stream that fails reads after `first` without any byte, then after `idle` without a
/// new one, so silent and abandoned connections give their resources back.
pub(crate) struct Idle<S> {
    inner: S,
    timer: Pin<Box<Sleep>>,
    idle: Duration,
}

impl<S> Idle<S> {
    pub(crate) fn new(inner: S, first: Duration, idle: Duration) -> Idle<S> {
        Idle {
            inner,
            timer: Box::pin(tokio::time::sleep(first)),
            idle,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.idle;
                    this.timer.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "control connection idle",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_streams_fail_reads_after_their_deadlines() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Idle::new(a, Duration::from_secs(1), Duration::from_secs(5));
        // Nothing within the first deadline.
        let e = s.read_u8().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let (a, mut b2) = tokio::io::duplex(64);
        let mut s = Idle::new(a, Duration::from_secs(1), Duration::from_secs(5));
        b2.write_all(b"x").await.unwrap();
        assert_eq!(s.read_u8().await.unwrap(), b'x');
        // Activity within the idle timeout keeps it open.
        tokio::time::sleep(Duration::from_secs(4)).await;
        b2.write_all(b"y").await.unwrap();
        assert_eq!(s.read_u8().await.unwrap(), b'y');
        let start = Instant::now();
        let e = s.read_u8().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        b.shutdown().await.unwrap();
    }

    #[test]
    fn names_cover_loopback_the_listen_ip_and_extras() {
        let n = server_names("10.0.0.5:7070".parse().unwrap(), &["cp.example".into()]);
        assert_eq!(
            n,
            ["localhost", "127.0.0.1", "::1", "10.0.0.5", "cp.example"]
        );
        let n = server_names("0.0.0.0:7070".parse().unwrap(), &["localhost".into()]);
        assert_eq!(n, ["localhost", "127.0.0.1", "::1"]);
    }
}
