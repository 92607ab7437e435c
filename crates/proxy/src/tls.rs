//! Mutual TLS between sidecars. Outbound: a connection to an endpoint that has an identity is
//! TLS, and the server must present exactly that identity. Inbound: a connection whose
//! ClientHello names a mesh server (`*.trellis`) is terminated here and the client's identity
//! recorded; anything else (plaintext, or an application's own TLS) is accepted or refused by
//! the listener's mode.

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use rustls::pki_types::ServerName;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_identity::{Credentials, SpiffeId};

/// This proxy's mTLS state, once it has an identity.
pub struct MeshTls {
    /// Certificate, key and roots (rotated in place).
    pub creds: Arc<Credentials>,
    /// For connections to endpoints: HTTP/1.1 or opaque bytes.
    pub connector: TlsConnector,
    /// For HTTP/2 connections to endpoints (falling back to HTTP/1.1 with an older peer).
    pub connector_h2: TlsConnector,
    /// For connections from other sidecars.
    pub acceptor: TlsAcceptor,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshTls({:?})", self.creds)
    }
}

impl MeshTls {
    /// TLS configs over `creds`.
    pub fn new(creds: Arc<Credentials>) -> MeshTls {
        MeshTls {
            connector: TlsConnector::from(creds.client_config()),
            connector_h2: TlsConnector::from(creds.client_config_with(&[
                trellis_identity::tls::ALPN_MESH_H2,
                trellis_identity::tls::ALPN_MESH,
            ])),
            acceptor: TlsAcceptor::from(creds.server_config()),
            creds,
        }
    }
}

/// A resumed handshake's peer, checked again: the first handshake's verification does not
/// run on resumption, so the stored chain is verified against the current roots and clock.
pub fn recheck_resumed(
    creds: &Credentials,
    conn: &rustls::CommonState,
) -> Result<(), rustls::Error> {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return Ok(());
    }
    let chain = conn.peer_certificates().unwrap_or_default();
    creds.recheck(chain).map(|_| ())
}

/// Where the proxy's mTLS state lives; empty until it has an identity.
pub type MeshSlot = Arc<ArcSwapOption<MeshTls>>;

/// The server name that asks an endpoint for `identity`.
pub fn server_name(identity: &str) -> Option<ServerName<'static>> {
    let id = SpiffeId::parse(identity).ok()?;
    ServerName::try_from(id.server_name()).ok()
}

/// A connection to an endpoint: plain TCP, or mutual TLS.
pub enum Upstream {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mutual TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Upstream {
    /// The ALPN protocol mutual TLS negotiated (none for plain TCP).
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Upstream::Plain(_) => None,
            Upstream::Tls(t) => t.get_ref().1.alpn_protocol(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Upstream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Upstream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => crate::io::poll_write_tcp(Pin::new(s), cx, bufs),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Plain(s) => s.is_write_vectored(),
            Upstream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A stream whose first bytes were already read (by detection): they are replayed first.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// Replays `prefix`, then reads `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Rewind<T> {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if crate::io::replay(&mut self.prefix, buf) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the first bytes of an inbound connection are.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// Not a TLS handshake.
    NotTls,
    /// A TLS ClientHello, with its server name if it sent one.
    Tls(Option<String>),
}

/// Reads a TLS ClientHello's server name (SNI) from the first bytes of a connection.
pub fn client_hello(buf: &[u8]) -> Hello {
    // Record header: type 22 (handshake), version 3.x, length.
    if buf.is_empty() {
        return Hello::Incomplete;
    }
    if buf[0] != 0x16 || (buf.len() > 1 && buf[1] != 0x03) {
        return Hello::NotTls;
    }
    if buf.len() < 5 {
        return Hello::Incomplete;
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + len {
        return Hello::Incomplete;
    }
    Hello::Tls(sni(&buf[5..5 + len]))
}

/// The server name in a handshake message holding a ClientHello, if any.
fn sni(hs: &[u8]) -> Option<String> {
    let mut r = Reader(hs);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    r.skip(3)?; // handshake length
    r.skip(2 + 32)?; // version, random
    let n = usize::from(r.u8()?);
    r.skip(n)?; // session id
    r.vec16()?; // cipher suites
    let n = usize::from(r.u8()?);
    r.skip(n)?; // compression methods
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let body = exts.vec16()?;
        if kind == 0 {
            // server_name: list length, then entries of (type, length, name).
            let mut list = Reader(Reader(body).vec16()?);
            while !list.0.is_empty() {
                let t = list.u8()?;
                let name = list.vec16()?;
                if t == 0 {
                    return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
                }
            }
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A 16-bit length, then that many bytes.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// Whether a server name asks for a mesh sidecar rather than the application.
pub fn is_mesh_name(name: &str) -> bool {
    name.ends_with(".trellis")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, as rustls writes it for `name`.
    fn hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(trellis_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from(name.to_string()).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn client_hello_table() {
        let h = hello("orders.shop.trellis");
        assert_eq!(
            client_hello(&h),
            Hello::Tls(Some("orders.shop.trellis".into()))
        );
        assert_eq!(client_hello(&h[..3]), Hello::Incomplete);
        assert_eq!(client_hello(&h[..h.len() - 1]), Hello::Incomplete);
        assert_eq!(
            client_hello(&hello("example.com")),
            Hello::Tls(Some("example.com".into()))
        );
        assert_eq!(client_hello(b""), Hello::Incomplete);
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(client_hello(b"\x16\x01"), Hello::NotTls);
        // A handshake record that is not a ClientHello, or is truncated inside: no name.
        assert_eq!(
            client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"),
            Hello::Tls(None)
        );
        assert!(is_mesh_name("orders.shop.trellis"));
        assert!(!is_mesh_name("example.com"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// What the detector says after each read, when bytes arrive in pieces of the given
        /// sizes (cycled; 0 counts as 1), up to its first answer other than `Incomplete`.
        fn detect_in(input: &[u8], sizes: &[usize]) -> Hello {
            let (mut seen, mut sizes) = (0, sizes.iter().cycle());
            while seen < input.len() {
                seen = input
                    .len()
                    .min(seen + sizes.next().map_or(1, |&n| n.max(1)));
                match client_hello(&input[..seen]) {
                    Hello::Incomplete => {}
                    answer => return answer,
                }
            }
            Hello::Incomplete
        }

        fn noise() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                // A TLS record header, then anything.
                (any::<u16>(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(
                    |(len, rest)| {
                        let mut b = vec![0x16, 0x03, 0x01];
                        b.extend_from_slice(&(len % 400).to_be_bytes());
                        b.extend_from_slice(&rest);
                        b
                    }
                ),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn arbitrary_bytes_get_one_answer_however_they_are_split(
                bytes in noise(),
                sizes in prop::collection::vec(0usize..32, 1..8),
            ) {
                let whole = client_hello(&bytes);
                let split = detect_in(&bytes, &sizes);
                if whole == Hello::Incomplete {
                    prop_assert_eq!(split, Hello::Incomplete);
                } else {
                    // The first answer is final: more bytes never change it.
                    prop_assert_eq!(split, whole);
                }
            }
        }

        proptest! {
            // Each case builds a real ClientHello: few cases.
            #![proptest_config(ProptestConfig::with_cases(24))]

            #[test]
            fn every_prefix_of_a_real_hello_is_incomplete(
                name in "[a-z][a-z0-9]{0,20}(\\.[a-z]{1,10}){0,3}",
                sizes in prop::collection::vec(0usize..64, 1..8),
            ) {
                let h = hello(&name);
                for end in 0..h.len() {
                    prop_assert_eq!(client_hello(&h[..end]), Hello::Incomplete, "prefix {}", end);
                }
                prop_assert_eq!(client_hello(&h), Hello::Tls(Some(name.clone())));
                prop_assert_eq!(detect_in(&h, &sizes), Hello::Tls(Some(name)));
            }
        }
    }
}
