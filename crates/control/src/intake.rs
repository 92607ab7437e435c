//! What a gRPC request may make the control plane hold while it is read.
//!
//! tonic buffers each message whole (up to 4 MiB) before the handler sees it, and decodes it
//! into structs that can be ~100 times its size (an empty repeated entry is 2 bytes on the
//! wire and a struct of a few hundred bytes in memory). Left alone, 300 half-sent 4 MiB
//! messages on two connections took 1.2 GB, before any authentication. So, before tonic:
//! - every method but `Certify` authenticates from the request's headers and TLS peer, and is
//!   refused before its body is read;
//! - a message is refused at its 5-byte header when longer than its class allows (64 KiB for
//!   requests without a client certificate, which can only be `Certify`; 4 MiB otherwise),
//!   and once whole when what it decodes to could exceed [`MAX_DECODED`];
//! - the bytes of messages being read and decoded are charged to a budget per class
//!   ([`Budget`]): a request that would pass it waits unread, so HTTP/2 flow control holds
//!   its sender back;
//! - a message must arrive whole within [`MESSAGE_DEADLINE`] of its first byte.
//!
//! Not bounded here: tonic keeps a stream's read buffer at the size of its largest message
//! until the stream ends, so an authenticated sidecar's open streams can each keep up to
//! 4 MiB (its streams per service are capped in `fleet::PerService`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// A message must arrive whole within this of its first byte.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(10);
/// Longest message of a request without a client certificate (a `Certify`: a token, a CSR).
pub const ANONYMOUS_MESSAGE: usize = 64 << 10;
/// Longest message otherwise: tonic's own limit.
pub const MESSAGE: usize = 4 << 20;
/// Most one message may decode to, by [`decoded_bound`].
pub const MAX_DECODED: usize = 64 << 20;
/// What one length-delimited field may take once decoded: twice (a vector's spare capacity)
/// the largest request-side struct (checked in the tests).
pub const ENTRY: usize = 1024;
/// How deep [`decoded_bound`] looks into nested fields; the request messages nest less.
const DEPTH: usize = 16;
/// The default budget of authenticated requests, in charged bytes (`--read-budget-mib`);
/// requests without a client certificate get a sixteenth of it.
pub const AUTHENTICATED_BUDGET: usize = 256 << 20;

/// The charged bytes requests of one class may hold at once.
#[derive(Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    size: usize,
    max_message: usize,
}

impl Budget {
    /// A budget of `size` charged bytes for messages of at most `max_message` bytes.
    pub fn new(size: usize, max_message: usize) -> Budget {
        Budget {
            permits: Arc::new(Semaphore::new(size)),
            size,
            max_message,
        }
    }

    /// Charged bytes held now.
    pub fn held(&self) -> usize {
        self.size - self.permits.available_permits()
    }
}

/// The budgets of the two classes.
#[derive(Clone)]
pub struct Budgets {
    /// Requests without a client certificate (`Certify` with a join token).
    pub anonymous: Budget,
    /// Requests of authenticated proxies.
    pub authenticated: Budget,
}

impl Budgets {
    /// `authenticated` bytes for authenticated requests, a sixteenth of it (at least their
    /// longest message's) for the others.
    pub fn new(authenticated: usize) -> Budgets {
        let anonymous = (authenticated / 16).max(ANONYMOUS_MESSAGE * 9);
        Budgets {
            anonymous: Budget::new(anonymous, ANONYMOUS_MESSAGE),
            authenticated: Budget::new(authenticated.max(MESSAGE * 9), MESSAGE),
        }
    }
}

/// Pure: an upper bound of the memory `message` (protobuf, uncompressed) decodes to: eight
/// bytes per wire byte (a packed varint becomes a `u64`) plus [`ENTRY`] per length-delimited
/// field whose payload parses whole as protobuf (an empty one does: the 2-byte empty struct),
/// with the fields nested in each payload's parsing prefix, up to [`DEPTH`] deep. A decoder
/// stops at a message-typed payload that does not parse, so nothing past it is allocated;
/// most strings fail at their first byte and count nothing.
pub fn decoded_bound(message: &[u8]) -> usize {
    message
        .len()
        .saturating_mul(8)
        .saturating_add(entries(message, 0).0.saturating_mul(ENTRY))
}

/// The entries in `buf`'s parsing prefix, and whether all of it parses.
fn entries(mut buf: &[u8], depth: usize) -> (usize, bool) {
    let mut n: usize = 0;
    while !buf.is_empty() {
        let Some(tag) = varint(&mut buf) else {
            return (n, false);
        };
        if tag >> 3 == 0 {
            return (n, false);
        }
        let skip = match tag & 7 {
            0 => match varint(&mut buf) {
                Some(_) => 0,
                None => return (n, false),
            },
            1 => 8,
            5 => 4,
            2 => {
                let Some(len) = varint(&mut buf).and_then(|l| usize::try_from(l).ok()) else {
                    return (n, false);
                };
                if len > buf.len() {
                    return (n, false);
                }
                if depth + 1 < DEPTH {
                    let (inner, whole) = entries(&buf[..len], depth + 1);
                    n = n.saturating_add(inner).saturating_add(usize::from(whole));
                } else {
                    n = n.saturating_add(1);
                }
                len
            }
            // Groups (not in proto3) and unknown wire types: nothing more parses.
            _ => return (n, false),
        };
        if skip > buf.len() {
            return (n, false);
        }
        buf = &buf[skip..];
    }
    (n, true)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A gRPC request body held to a [`Budget`]: passes on one whole message at a time, each
/// once its bytes and its decoded bound are charged; what is charged for a message is given
/// back when the reader asks for more (it has decoded and handled it) or drops the body.
pub struct Charged<B> {
    inner: B,
    budget: Budget,
    /// Received and not passed on: the message being read, and perhaps the next's start.
    buf: BytesMut,
    /// Charged for `buf` and the message passed on last.
    held: Option<OwnedSemaphorePermit>,
    /// Whether the whole message at the front of `buf` is charged for its decoded bound.
    decoded_paid: bool,
    /// A charge being waited for.
    waiting: Option<Acquire>,
    /// When the message being read must be whole.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The inner body ended.
    ended: bool,
}

impl<B> Charged<B> {
    /// Holds `inner` to `budget`.
    pub fn new(inner: B, budget: Budget) -> Charged<B> {
        Charged {
            inner,
            budget,
            buf: BytesMut::new(),
            held: None,
            decoded_paid: false,
            waiting: None,
            deadline: None,
            ended: false,
        }
    }

    fn held(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Charges `want` bytes in all: at once if the budget has them, else starts waiting.
    fn charge(&mut self, want: usize) -> Result<(), Status> {
        let more = want.saturating_sub(self.held());
        if more == 0 {
            return Ok(());
        }
        if want > self.budget.size {
            return Err(Status::resource_exhausted(format!(
                "a message that needs {want} bytes; this control plane reads at most {} at once",
                self.budget.size
            )));
        }
        let n = u32::try_from(more).unwrap_or(u32::MAX);
        match self.budget.permits.clone().try_acquire_many_owned(n) {
            Ok(p) => self.add(p),
            Err(_) => {
                self.waiting = Some(Box::pin(self.budget.permits.clone().acquire_many_owned(n)))
            }
        }
        Ok(())
    }

    fn add(&mut self, p: OwnedSemaphorePermit) {
        match &mut self.held {
            Some(h) => h.merge(p),
            None => self.held = Some(p),
        }
    }

    /// The length of the message at the front of `buf` (header included) once its header
    /// is in, or why it is refused.
    fn framed(&self) -> Result<Option<usize>, Status> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.budget.max_message {
            return Err(Status::resource_exhausted(format!(
                "a message of {len} bytes; at most {} here",
                self.budget.max_message
            )));
        }
        Ok(Some(5 + len))
    }
}

impl<B> Body for Charged<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // Asked for more: the message passed on last is decoded and handled. Keep only what
        // the bytes still here need.
        if this.waiting.is_none()
            && let Some(h) = &mut this.held
        {
            let keep = this.buf.len();
            if h.num_permits() > keep {
                drop(h.split(h.num_permits() - keep));
            }
        }
        loop {
            if let Some(w) = &mut this.waiting {
                match w.as_mut().poll(cx) {
                    Poll::Ready(Ok(p)) => {
                        this.waiting = None;
                        this.add(p);
                    }
                    Poll::Ready(Err(_)) => {
                        return Poll::Ready(Some(Err(Status::unavailable("shutting down").into())));
                    }
                    Poll::Pending => return this.poll_deadline(cx),
                }
            }
            let framed = this.framed();
            if let Ok(Some(total)) = framed {
                // One allocation for the message (untouched bytes take no memory), not a
                // doubling vector's copies.
                this.buf.reserve(total.saturating_sub(this.buf.len()));
            }
            match framed {
                Err(s) => return Poll::Ready(Some(Err(s.into()))),
                Ok(Some(total)) if this.buf.len() >= total => {
                    if !this.decoded_paid {
                        let decoded = if this.buf[0] == 0 {
                            decoded_bound(&this.buf[5..total])
                        } else {
                            // Compressed (refused by tonic): the bytes only.
                            total
                        };
                        if decoded > MAX_DECODED {
                            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                                "a message of {total} bytes that may decode to {decoded}; at most {MAX_DECODED}"
                            ))
                            .into())));
                        }
                        this.decoded_paid = true;
                        if let Err(s) = this.charge(this.buf.len() + decoded) {
                            return Poll::Ready(Some(Err(s.into())));
                        }
                        continue;
                    }
                    this.decoded_paid = false;
                    this.deadline = None;
                    let message = this.buf.split_to(total).freeze();
                    if !this.buf.is_empty() {
                        this.start_deadline();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(message))));
                }
                Ok(_) => {}
            }
            if this.ended {
                if this.buf.is_empty() {
                    return Poll::Ready(None);
                }
                // A message cut short: tonic reports it.
                let rest = this.buf.split().freeze();
                return Poll::Ready(Some(Ok(Frame::data(rest))));
            }
            // The bytes read so far are charged before more are read.
            if let Err(s) = this.charge(this.buf.len()) {
                return Poll::Ready(Some(Err(s.into())));
            }
            if this.waiting.is_some() {
                continue;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        if this.buf.is_empty() && data.has_remaining() {
                            this.start_deadline();
                        }
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            let n = chunk.len();
                            this.buf.extend_from_slice(chunk);
                            data.advance(n);
                        }
                    }
                    Err(frame) => {
                        if this.buf.is_empty() {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        this.ended = true;
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return this.poll_deadline(cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.buf.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl<B> Charged<B> {
    fn start_deadline(&mut self) {
        self.deadline = Some(Box::pin(tokio::time::sleep(MESSAGE_DEADLINE)));
    }

    /// Pending, unless the message being read is past its deadline.
    fn poll_deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<T, Box<dyn std::error::Error + Send + Sync>>>> {
        if self.buf.is_empty() && self.waiting.is_none() {
            return Poll::Pending;
        }
        match &mut self.deadline {
            Some(d) => {
                ready!(d.as_mut().poll(cx));
                Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "a message not whole {MESSAGE_DEADLINE:?} after its first byte"
                ))
                .into())))
            }
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::convert::Infallible;
    use tokio::sync::mpsc;
    use trellis_api::wire;

    #[test]
    fn an_entry_covers_every_request_struct_twice() {
        let sizes = [
            ("Node", size_of::<wire::Node>()),
            ("StreamRequest", size_of::<wire::StreamRequest>()),
            ("Instance", size_of::<wire::Instance>()),
            ("RegisterRequest", size_of::<wire::RegisterRequest>()),
            ("HeartbeatRequest", size_of::<wire::HeartbeatRequest>()),
            ("DeregisterRequest", size_of::<wire::DeregisterRequest>()),
            ("CertifyRequest", size_of::<wire::CertifyRequest>()),
            ("ReportRequest", size_of::<wire::ReportRequest>()),
            ("AuthzSeries", size_of::<wire::AuthzSeries>()),
            ("EndpointReport", size_of::<wire::EndpointReport>()),
            ("BackendEndpoints", size_of::<wire::BackendEndpoints>()),
            ("EndpointState", size_of::<wire::EndpointState>()),
            ("Usage", size_of::<wire::Usage>()),
            ("TrafficReport", size_of::<wire::TrafficReport>()),
            ("TrafficSeries", size_of::<wire::TrafficSeries>()),
            ("ExplainAnswer", size_of::<wire::ExplainAnswer>()),
            ("TapEvent", size_of::<wire::TapEvent>()),
            ("QuotaRequest", size_of::<wire::QuotaRequest>()),
            ("QuotaDemand", size_of::<wire::QuotaDemand>()),
            ("QuotaKey", size_of::<wire::QuotaKey>()),
            // A map entry: two strings and the table's own bytes.
            ("map entry", 2 * size_of::<String>() + 16),
        ];
        for (name, size) in sizes {
            assert!(2 * size <= ENTRY, "{name}: {size} bytes");
        }
    }

    fn demand(source: &str) -> wire::QuotaDemand {
        wire::QuotaDemand {
            key: Some(wire::QuotaKey {
                policy: "default/catalog".into(),
                limit: "total".into(),
                source: source.into(),
            }),
            rate: 150.0,
            demand: 10,
        }
    }

    #[test]
    fn decoded_bound_table() {
        let quota = wire::QuotaRequest {
            demand: vec![demand(""), demand("spiffe://mesh.test/ns/default/sa/web")],
            ..Default::default()
        }
        .encode_to_vec();
        let empties = wire::ReportRequest {
            tap_events: vec![wire::TapEvent::default(); 1000],
            ..Default::default()
        }
        .encode_to_vec();
        let mut cut = empties.clone();
        cut.extend_from_slice(&[0xff, 0xff]);
        // (what, message, length-delimited fields counted)
        let cases: &[(&str, &[u8], usize)] = &[
            ("nothing", &[], 0),
            ("a varint", &[0x08, 0x96, 0x01], 0),
            // Two demands and their keys; the strings do not parse.
            ("quota", &quota, 4),
            // A string that happens to parse counts.
            ("a parsing string", &[0x0a, 0x02, b'h', b'i'], 1),
            ("1,000 empty events", &empties, 1000),
            ("and garbage after them", &cut, 1000),
            ("a length past the end", &[0x0a, 0x05, 0x00], 0),
            ("field 0", &[0x02, 0x00], 0),
        ];
        for (what, message, n) in cases {
            assert_eq!(
                decoded_bound(message),
                message.len() * 8 + n * ENTRY,
                "{what}"
            );
        }
        // Every prefix counts: nested empty entries are found at each depth.
        let nested = wire::ReportRequest {
            endpoints: Some(wire::EndpointReport {
                backends: vec![
                    wire::BackendEndpoints {
                        states: vec![wire::EndpointState::default(); 3],
                        ..Default::default()
                    };
                    2
                ],
            }),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(decoded_bound(&nested), nested.len() * 8 + 9 * ENTRY);
    }

    #[test]
    fn what_a_busy_sidecar_sends_fits_well_within_the_bounds() {
        // A perSource Global limit with the 10,000 callers a sidecar keeps buckets for.
        let quota = wire::QuotaRequest {
            demand: (0..10_000)
                .map(|i| demand(&format!("spiffe://mesh.test/ns/default/sa/caller-{i:05}")))
                .collect(),
            ..Default::default()
        }
        .encode_to_vec();
        let bound = decoded_bound(&quota);
        assert!(quota.len() < MESSAGE, "{} bytes", quota.len());
        assert!(bound < MAX_DECODED / 2, "{bound} for {} bytes", quota.len());
        assert!(quota.len() + bound < AUTHENTICATED_BUDGET / 8);
    }

    type Tx = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

    /// A body fed by the returned sender, held to `budget`.
    fn body(
        budget: &Budget,
    ) -> (
        Tx,
        Charged<impl Body<Data = Bytes, Error = Infallible> + Unpin>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let inner =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        (tx, Charged::new(inner, budget.clone()))
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    async fn send(tx: &Tx, bytes: &[u8]) {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(bytes))))
            .await
            .unwrap();
    }

    type Next = Option<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>>;

    /// The next frame, if one is ready without waiting.
    async fn ready<B>(b: &mut Charged<B>) -> Option<Next>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut f = std::pin::pin!(http_body_util::BodyExt::frame(b));
        std::future::poll_fn(|cx| {
            Poll::Ready(match f.as_mut().poll(cx) {
                Poll::Ready(x) => Some(x),
                Poll::Pending => None,
            })
        })
        .await
    }

    fn err(n: Option<Next>) -> String {
        match n {
            Some(Some(Err(e))) => e.to_string(),
            Some(Some(Ok(f))) => {
                panic!("a frame, not an error: {:?}", f.data_ref().map(Bytes::len))
            }
            other => panic!("no error: {:?}", other.map(|n| n.is_some())),
        }
    }

    fn data(n: Next) -> Vec<u8> {
        n.expect("a frame")
            .expect("no error")
            .into_data()
            .expect("data")
            .to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn messages_pass_whole_and_their_charge_comes_back_when_more_is_asked() {
        let budget = Budget::new(1 << 20, 4096);
        let (tx, mut b) = body(&budget);
        let one = framed(b"\x0a\x03abc");
        let two = framed(b"\x10\x01");
        // Split inside the header, then the rest of one with the whole of two.
        send(&tx, &one[..3]).await;
        assert!(ready(&mut b).await.is_none());
        assert_eq!(budget.held(), 3);
        let mut rest = one[3..].to_vec();
        rest.extend_from_slice(&two);
        send(&tx, &rest).await;
        assert_eq!(data(ready(&mut b).await.unwrap()), one);
        // Charged: both messages' bytes and one's decoded bound.
        assert_eq!(
            budget.held(),
            one.len() + two.len() + decoded_bound(&one[5..])
        );
        assert_eq!(data(ready(&mut b).await.unwrap()), two);
        drop(tx);
        assert!(ready(&mut b).await.unwrap().is_none());
        assert_eq!(budget.held(), 0);
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_header_is_refused_before_its_body_is_read() {
        let budget = Budget::new(1 << 20, 4096);
        let (tx, mut b) = body(&budget);
        let mut header = vec![0u8];
        header.extend_from_slice(&4097u32.to_be_bytes());
        send(&tx, &header).await;
        let err = err(ready(&mut b).await);
        assert!(
            err.to_string().contains("4097 bytes; at most 4096"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_may_decode_past_the_bound_is_refused() {
        let budget = Budget::new(1 << 30, 64 << 20);
        let (tx, mut b) = body(&budget);
        // 110,000 empty entries: 220 KB on the wire, each a struct once decoded.
        let empties = [0x1a, 0x00].repeat(110_000);
        send(&tx, &framed(&empties)).await;
        let err = err(ready(&mut b).await);
        assert!(err.to_string().contains("may decode to"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_the_budget_waits_unread_until_another_gives_back() {
        let message = framed(&[0x08; 100]);
        let first = message.len() + decoded_bound(&message[5..]);
        let budget = Budget::new(first + 50, 4096);
        let (tx1, mut b1) = body(&budget);
        let (tx2, mut b2) = body(&budget);
        send(&tx1, &message).await;
        assert_eq!(data(ready(&mut b1).await.unwrap()), message);
        // The second's message does not fit beside the first's charge: it waits.
        send(&tx2, &message).await;
        assert!(ready(&mut b2).await.is_none());
        // The first asks for more (it handled its message): the second goes on.
        assert!(ready(&mut b1).await.is_none());
        assert_eq!(data(ready(&mut b2).await.unwrap()), message);
        drop((tx1, tx2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_not_whole_within_the_deadline_ends_the_request_and_frees_its_charge() {
        let budget = Budget::new(1 << 20, 4096);
        let (tx, mut b) = body(&budget);
        let message = framed(&[0x08; 100]);
        send(&tx, &message[..50]).await;
        assert!(ready(&mut b).await.is_none());
        tokio::time::advance(MESSAGE_DEADLINE - Duration::from_millis(1)).await;
        assert!(ready(&mut b).await.is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        let err = err(ready(&mut b).await);
        assert!(err.to_string().contains("not whole"), "{err}");
        drop(b);
        assert_eq!(budget.held(), 0);
        // Between messages there is no deadline.
        let (tx2, mut b2) = body(&budget);
        send(&tx2, &message).await;
        assert_eq!(data(ready(&mut b2).await.unwrap()), message);
        tokio::time::advance(MESSAGE_DEADLINE * 3).await;
        assert!(ready(&mut b2).await.is_none());
        drop((tx, tx2));
    }
}
