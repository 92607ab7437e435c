//! The client connection as the proxy reads it: bytes consumed by protocol detection are
//! replayed first, and every byte is counted.

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Copies what is left of `prefix` (bytes already read from a stream) into `buf`; false when
/// nothing is left and reads go to the stream itself.
pub fn replay(prefix: &mut Bytes, buf: &mut ReadBuf<'_>) -> bool {
    if prefix.is_empty() {
        return false;
    }
    let n = prefix.len().min(buf.remaining());
    buf.put_slice(&prefix[..n]);
    prefix.advance(n);
    true
}

/// A client connection: plain TCP, or mutual TLS from another sidecar (whose first bytes
/// were read to see the ClientHello).
pub enum Conn {
    /// Plain TCP.
    Tcp(TcpStream),
    /// Mutual TLS, terminated here.
    Tls(Box<tokio_rustls::server::TlsStream<crate::tls::Rewind<TcpStream>>>),
}

macro_rules! conn {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Conn::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        conn!(self.get_mut(), s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        conn!(self.get_mut(), s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        conn!(self.get_mut(), s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        conn!(self.get_mut(), s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        conn!(self.get_mut(), s => s.poll_shutdown(cx))
    }
}

/// A client connection with replayed prefix and byte counters.
pub struct ClientIo {
    inner: Conn,
    prefix: Bytes,
    read: Counter,
    written: Counter,
}

impl ClientIo {
    /// Wraps `inner`; `prefix` is what detection already read.
    pub fn new(inner: Conn, prefix: Bytes, read: Counter, written: Counter) -> ClientIo {
        read.inc_by(prefix.len() as u64);
        ClientIo {
            inner,
            prefix,
            read,
            written,
        }
    }

    /// Splits off the not-yet-replayed prefix, for forwarders that write it themselves.
    pub fn take_prefix(&mut self) -> Bytes {
        std::mem::take(&mut self.prefix)
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if replay(&mut self.prefix, buf) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            self.read.inc_by((buf.filled().len() - before) as u64);
        }
        res
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.written.inc_by(n as u64);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.written.inc_by(n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
