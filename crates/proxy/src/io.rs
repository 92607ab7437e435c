//! The client connection as the proxy reads it: bytes consumed by protocol detection are
//! replayed first, and every byte is counted.

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    if prefix.is_empty() {
        // An empty view still holds its buffer (the detection read's) for the connection's life.
        *prefix = Bytes::new();
    }
    true
}

/// Largest vectored write that is copied into one buffer and sent with one `send`.
///
/// hyper hands a message over as separate buffers (head, body chunks) for `writev`. For a
/// small message one `send` of a copy is cheaper: the kernel's `writev` path costs more than
/// copying a few KiB (measured: up to 0.4 µs less kernel time per 1 KiB exchange; see
/// bench/RESULTS.md).
/// Larger writes keep `writev`, where the copy would cost more than it saves.
const COALESCE_LIMIT: usize = 4096;

thread_local! {
    /// Where small vectored writes are assembled: one per thread, reused, so it stays in cache
    /// and costs no memory per connection.
    static COALESCED: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(COALESCE_LIMIT));
}

/// A vectored write to a TCP stream: one buffer goes to `send` as is, several small ones
/// are copied together and sent at once, anything larger goes to `writev`.
pub fn poll_write_tcp(
    stream: Pin<&mut TcpStream>,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let (mut total, mut parts, mut only) = (0, 0, &[][..]);
    for b in bufs.iter().filter(|b| !b.is_empty()) {
        total += b.len();
        parts += 1;
        only = &**b;
    }
    if parts <= 1 {
        return stream.poll_write(cx, only);
    }
    if total > COALESCE_LIMIT {
        return stream.poll_write_vectored(cx, bufs);
    }
    COALESCED.with_borrow_mut(|buf| {
        buf.clear();
        for b in bufs {
            buf.extend_from_slice(b);
        }
        // A short write is reported as such; the caller advances over its buffers.
        stream.poll_write(cx, buf)
    })
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
        match self.get_mut() {
            Conn::Tcp(s) => poll_write_tcp(Pin::new(s), cx, bufs),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
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

/// What a client connection is doing, for its idle watchdog (`server.rs`): how many of its
/// requests are being handled, and a count that moves whenever a request starts or ends or
/// response bytes are written. The watchdog reads it every few seconds; the request path
/// only bumps it, which is far cheaper than arming and disarming a timer per request.
#[derive(Debug, Default)]
pub struct Activity {
    busy: AtomicU64,
    progress: AtomicU64,
}

impl Activity {
    /// Counts a request as being handled until the guard drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.moved();
        Busy(self.clone())
    }

    /// Whether any request is being handled.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    /// The progress count; equal readings mean nothing happened in between.
    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    fn moved(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }
}

/// A request being handled (see [`Activity::busy`]).
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.moved();
    }
}

/// A client connection with replayed prefix, byte counters and, when a watchdog reads it,
/// activity.
pub struct ClientIo {
    inner: Conn,
    prefix: Bytes,
    read: Counter,
    written: Counter,
    activity: Option<Arc<Activity>>,
    /// The connection's place under the caps, until its first byte is read.
    silent: Option<Arc<crate::conns::Slot>>,
}

impl ClientIo {
    /// Wraps `inner`; `prefix` is what detection already read. `silent`, when the client
    /// has sent nothing yet, is told when it does.
    pub fn new(
        inner: Conn,
        prefix: Bytes,
        read: Counter,
        written: Counter,
        activity: Option<Arc<Activity>>,
        silent: Option<Arc<crate::conns::Slot>>,
    ) -> ClientIo {
        read.inc_by(prefix.len() as u64);
        ClientIo {
            inner,
            silent: silent.filter(|_| prefix.is_empty()),
            prefix,
            read,
            written,
            activity,
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
            let n = buf.filled().len() - before;
            self.read.inc_by(n as u64);
            if n > 0
                && let Some(slot) = self.silent.take()
            {
                slot.heard();
            }
            // A request body arriving is progress; bytes between requests are not (a head
            // trickled in must not keep a connection).
            if n > 0
                && let Some(a) = &self.activity
                && a.is_busy()
            {
                a.moved();
            }
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
            if let Some(a) = &self.activity {
                a.moved();
            }
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
            if let Some(a) = &self.activity {
                a.moved();
            }
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

/// A stream that counts the reads that returned data, for an idle watchdog ([`quiet`]).
pub struct Metered<T> {
    inner: T,
    moved: Arc<AtomicU64>,
}

impl<T> Metered<T> {
    /// Wraps `inner`, counting into `moved`.
    pub fn new(inner: T, moved: Arc<AtomicU64>) -> Metered<T> {
        Metered { inner, moved }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

/// Returns once `moved` has stayed still for `idle` (`first` while it is still zero: nothing
/// has moved yet). Checks every half period, so it returns between one and one and a half
/// periods after the last movement; a timer per read or write would cost more.
pub async fn quiet(moved: &AtomicU64, first: std::time::Duration, idle: std::time::Duration) {
    let (mut last, mut still) = (moved.load(Ordering::Relaxed), 0u32);
    loop {
        let period = if last == 0 { first } else { idle };
        tokio::time::sleep(period / 2).await;
        let now = moved.load(Ordering::Relaxed);
        if now != last {
            (last, still) = (now, 0);
            continue;
        }
        still += 1;
        if still >= 2 {
            return;
        }
    }
}

/// How a splice ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Spliced {
    /// One side closed (or failed).
    Closed,
    /// Nothing moved for the idle time: both sides were dropped.
    Idle,
}

/// Copies bytes both ways between `a` and `b` until either side closes, or until no byte
/// moves either way for `idle` (`first` while nothing has moved at all; `moved_already`
/// says bytes were exchanged before the splice began).
pub async fn splice<A, B>(
    a: A,
    b: B,
    first: std::time::Duration,
    idle: std::time::Duration,
    moved_already: bool,
) -> io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let moved = Arc::new(AtomicU64::new(u64::from(moved_already)));
    let mut a = Metered::new(a, moved.clone());
    let mut b = Metered::new(b, moved.clone());
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => r.map(|_| Spliced::Closed),
        _ = quiet(&moved, first, idle) => Ok(Spliced::Idle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What detection read is handed on and then let go: a connection does not keep the
    /// detection buffer for its life.
    #[test]
    fn a_replayed_prefix_lets_its_buffer_go() {
        let mut detected = bytes::BytesMut::with_capacity(1024);
        detected.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut prefix = detected.freeze();
        let other_view = prefix.clone();
        let mut storage = [0u8; 8];
        let mut buf = ReadBuf::new(&mut storage);
        assert!(replay(&mut prefix, &mut buf));
        assert_eq!(buf.filled(), b"GET / HT");
        assert!(
            !other_view.is_unique(),
            "part of the prefix is still to be read"
        );
        let mut storage = [0u8; 64];
        let mut buf = ReadBuf::new(&mut storage);
        assert!(replay(&mut prefix, &mut buf));
        assert_eq!(buf.filled(), b"TP/1.1\r\n");
        assert!(prefix.is_empty());
        assert!(
            other_view.is_unique(),
            "the replayed prefix still holds the buffer"
        );
        assert!(!replay(&mut prefix, &mut buf));
    }

    /// Writes `parts` with vectored writes through a client connection until all is sent,
    /// as hyper does (advancing over what each write took), and returns what arrived.
    async fn send_vectored(parts: &[Vec<u8>]) -> Vec<u8> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut conn = Conn::Tcp(client.unwrap());
        let (mut peer, _) = accepted.unwrap();
        let expected: usize = parts.iter().map(Vec::len).sum();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut bufs: Vec<Bytes> = parts.iter().map(|p| Bytes::from(p.clone())).collect();
        let mut sent = 0;
        while sent < expected {
            let slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
            let n = conn.write_vectored(&slices).await.unwrap();
            assert!(n > 0, "no progress");
            sent += n;
            let mut left = n;
            for b in &mut bufs {
                let take = left.min(b.len());
                b.advance(take);
                left -= take;
            }
        }
        conn.shutdown().await.unwrap();
        drop(conn);
        reader.await.unwrap()
    }

    #[tokio::test]
    async fn vectored_writes_arrive_whole_and_in_order() {
        let pattern = |len: usize, seed: u8| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        };
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("one buffer", vec![pattern(300, 1)]),
            (
                "small head and body, coalesced",
                vec![pattern(200, 2), pattern(1024, 3)],
            ),
            (
                "empty parts skipped",
                vec![vec![], pattern(10, 4), vec![], pattern(7, 5)],
            ),
            (
                "exactly the limit",
                vec![pattern(96, 6), pattern(COALESCE_LIMIT - 96, 7)],
            ),
            (
                "above the limit: writev",
                vec![pattern(96, 8), pattern(COALESCE_LIMIT, 9)],
            ),
            // Larger than the socket buffers: short writes must resume where they stopped.
            (
                "large, short writes",
                vec![pattern(150, 10), pattern(3 << 20, 11), pattern(5, 12)],
            ),
        ];
        for (name, parts) in cases {
            let want: Vec<u8> = parts.concat();
            let got = send_vectored(&parts).await;
            assert!(
                got == want,
                "{name}: {} bytes arrived, {} sent",
                got.len(),
                want.len()
            );
        }
    }

    /// A splice ends when both sides are quiet for the idle time (the first-byte deadline
    /// before anything moved), and not before while bytes keep moving. Paused clock.
    #[tokio::test(start_paused = true)]
    async fn splice_closes_quiet_streams_only() {
        use std::time::Duration;
        let first = Duration::from_secs(10);
        let idle = Duration::from_secs(3600);
        // (case, bytes moved before, pause between writes, writes, expected end, bound)
        let cases = [
            (
                "silent: first-byte deadline",
                false,
                None,
                Spliced::Idle,
                first,
            ),
            (
                "quiet after an exchange: idle time",
                true,
                None,
                Spliced::Idle,
                idle,
            ),
            (
                "steady trickle outlives the first-byte deadline",
                false,
                Some(Duration::from_secs(4)),
                Spliced::Closed,
                Duration::from_secs(4 * 20),
            ),
        ];
        for (name, moved, trickle, want, bound) in cases {
            let (a, mut a_peer) = tokio::io::duplex(64);
            let (b, mut b_peer) = tokio::io::duplex(64);
            let started = tokio::time::Instant::now();
            let task = tokio::spawn(splice(a, b, first, idle, moved));
            // The peers stay open (silent) unless the case trickles and then hangs up.
            let open = match trickle {
                Some(pause) => {
                    for _ in 0..20 {
                        tokio::time::sleep(pause).await;
                        a_peer.write_all(b"x").await.unwrap();
                        let mut one = [0u8; 1];
                        b_peer.read_exact(&mut one).await.unwrap();
                    }
                    drop((a_peer, b_peer));
                    None
                }
                None => Some((a_peer, b_peer)),
            };
            let got = task.await.unwrap().unwrap();
            let took = started.elapsed();
            assert_eq!(got, want, "{name}");
            assert!(took >= bound, "{name}: ended after {took:?}");
            assert!(took <= bound + bound / 2, "{name}: ended after {took:?}");
            drop(open);
        }
    }
}
