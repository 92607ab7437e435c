//! What a gRPC request may make the control plane hold while it is read.
//!
//! tonic buffers each message whole (up to 4 MiB) before the handler sees it, and decodes it
//! into structs that can be ~100 times its size (an empty repeated entry is 2 bytes on the
//! wire and a struct of up to 280 bytes in memory). Left alone, 300 half-sent 4 MiB
//! messages on two connections took 1.2 GB, before any authentication. So, before tonic:
//! - every method but `Certify` authenticates from the request's headers and TLS peer, and is
//!   refused before its body is read;
//! - a message is refused at its 5-byte header when longer than its method and class allow
//!   (64 KiB for requests without a client certificate, which can only be `Certify`; 4 MiB
//!   for the streams, 1 MiB for other calls), and once whole when what it decodes to could
//!   exceed [`MAX_DECODED`];
//! - a message's declared length is charged to a budget when its header arrives (only the
//!   first frame is read before), and its decoded bound once it is whole; a request that
//!   would pass the budget waits unread, so HTTP/2 flow control holds its sender back. Each
//!   authenticated service has a budget of its own, so a compromised sidecar can stall only
//!   its own service; requests without credentials share one;
//! - a message must arrive whole within [`MESSAGE_DEADLINE`] of its first byte (time spent
//!   waiting for the budget does not count), and a call's request must end within it after
//!   its message.
//!
//! Not bounded here: tonic keeps a stream's read buffer at the size of its largest message
//! until the stream ends, so each open stream may keep up to 4 MiB beyond the budget (config,
//! report and quota streams are each capped per service, `fleet::PerService`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// A message must arrive whole within this of its first byte.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(10);
/// Longest message of a request without a client certificate (a `Certify`: a token, a CSR).
pub const ANONYMOUS_MESSAGE: usize = 64 << 10;
/// Longest message of the streams (`Stream`, `Report`, `Quota`): tonic's own limit.
pub const STREAM_MESSAGE: usize = 4 << 20;
/// Longest message of the other calls (`Register`, `Heartbeat`, a renewal's `Certify`).
pub const CALL_MESSAGE: usize = 1 << 20;
/// Most one message may decode to, by [`decoded_bound`].
pub const MAX_DECODED: usize = 224 << 20;
/// What one length-delimited field whose payload parses as protobuf may take once decoded:
/// more than three times (a vector's growth copies) the largest request struct (a test
/// checks).
pub const ENTRY: usize = 1536;
/// What any other length-delimited field (a string, bytes) may take beyond its bytes: a
/// `String` in a vector with its spare room, and the allocator's rounding.
pub const STRING: usize = 64;
/// Decoded bytes per wire byte: a packed varint of one byte becomes a `u64` in a vector that
/// grows by doubling (old and new capacity at once while it moves: 24).
const PER_BYTE: usize = 24;
/// How deep [`decoded_bound`] follows nested fields; the request messages nest less.
const DEPTH: usize = 16;
/// The default budget of each authenticated service, in charged bytes
/// (`--read-budget-mib`); requests without credentials share a sixteenth of it.
pub const SERVICE_BUDGET: usize = 256 << 20;

/// The charged bytes one class of requests may hold at once.
#[derive(Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    size: usize,
}

impl Budget {
    /// A budget of `size` charged bytes.
    pub fn new(size: usize) -> Budget {
        Budget {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Charged bytes held now.
    pub fn held(&self) -> usize {
        self.size - self.permits.available_permits()
    }
}

/// The budgets: one per authenticated service, one for requests without credentials.
pub struct Budgets {
    size: usize,
    anonymous: Budget,
    services: Mutex<HashMap<(String, String), Budget>>,
}

impl Budgets {
    /// `per_service` bytes for each authenticated service, a sixteenth of it (at least 1 MiB)
    /// for the requests without credentials.
    pub fn new(per_service: usize) -> Budgets {
        Budgets {
            size: per_service,
            anonymous: Budget::new((per_service / 16).max(1 << 20)),
            services: Mutex::default(),
        }
    }

    /// The budget of requests without credentials.
    pub fn anonymous(&self) -> Budget {
        self.anonymous.clone()
    }

    /// The budget of `service`'s proxies (made on first use; services are as many as the
    /// identities the CA issued).
    pub fn service(&self, namespace: &str, service: &str) -> Budget {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services
            .entry((namespace.to_string(), service.to_string()))
            .or_insert_with(|| Budget::new(self.size))
            .clone()
    }

    /// Charged bytes held now: (without credentials, by every authenticated service).
    pub fn held(&self) -> (usize, usize) {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        (
            self.anonymous.held(),
            services.values().map(Budget::held).sum(),
        )
    }
}

/// Whether `path` is one of the proxy protocol's streams; every other method is a call that
/// sends one message.
fn is_stream(path: &str) -> bool {
    matches!(path.rsplit('/').next(), Some("Stream" | "Report" | "Quota"))
}

/// The longest message `path` may carry, with or without credentials.
pub fn max_message(path: &str, anonymous: bool) -> usize {
    match (anonymous, is_stream(path)) {
        (true, _) => ANONYMOUS_MESSAGE,
        (false, true) => STREAM_MESSAGE,
        (false, false) => CALL_MESSAGE,
    }
}

/// Pure: an upper bound of the memory `message` (protobuf, uncompressed) decodes to:
/// [`PER_BYTE`] per wire byte, plus [`ENTRY`] per length-delimited field whose payload parses
/// whole as protobuf (an empty one does: the 2-byte empty struct) and [`STRING`] per other
/// one, over every prefix that parses, following nested fields and groups (which a decoder
/// skips in unknown fields and then goes on) up to [`DEPTH`] deep; past that depth the rest
/// counts as if it were all empty entries. A decoder stops at a message-typed payload that
/// does not parse, so nothing after it is allocated.
pub fn decoded_bound(message: &[u8]) -> usize {
    let (c, _, _) = fields(message, 0, None);
    message
        .len()
        .saturating_mul(PER_BYTE)
        .saturating_add(c.entries.saturating_mul(ENTRY))
        .saturating_add(c.strings.saturating_mul(STRING))
}

#[derive(Default)]
struct Counts {
    entries: usize,
    strings: usize,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.entries = self.entries.saturating_add(o.entries);
        self.strings = self.strings.saturating_add(o.strings);
    }
}

/// The fields of `buf` up to its end or, inside group `group`, that group's end tag: what
/// they count, the bytes they took (the end tag included), and whether they parsed to the
/// end (or the end tag).
fn fields(buf: &[u8], depth: usize, group: Option<u64>) -> (Counts, usize, bool) {
    let mut c = Counts::default();
    let mut rest = buf;
    let used = |rest: &[u8]| buf.len() - rest.len();
    while !rest.is_empty() {
        let Some(tag) = varint(&mut rest) else {
            return (c, used(rest), false);
        };
        let field = tag >> 3;
        if field == 0 {
            return (c, used(rest), false);
        }
        let skip = match tag & 7 {
            0 => match varint(&mut rest) {
                Some(_) => 0,
                None => return (c, used(rest), false),
            },
            1 => 8,
            5 => 4,
            2 => {
                let Some(len) = varint(&mut rest).and_then(|l| usize::try_from(l).ok()) else {
                    return (c, used(rest), false);
                };
                if len > rest.len() {
                    return (c, used(rest), false);
                }
                if depth + 1 >= DEPTH {
                    // Too deep to follow: as if it were all empty entries.
                    c.entries = c.entries.saturating_add(1 + len / 2);
                } else {
                    let (inner, _, whole) = fields(&rest[..len], depth + 1, None);
                    c.add(&inner);
                    if whole {
                        c.entries = c.entries.saturating_add(1);
                    } else {
                        c.strings = c.strings.saturating_add(1);
                    }
                }
                len
            }
            3 => {
                if depth + 1 >= DEPTH {
                    c.entries = c.entries.saturating_add(rest.len() / 2 + 1);
                    return (c, buf.len(), false);
                }
                let (inner, took, ok) = fields(rest, depth + 1, Some(field));
                c.add(&inner);
                if !ok {
                    return (c, used(rest) + took, false);
                }
                took
            }
            4 => return (c, used(rest), group == Some(field)),
            _ => return (c, used(rest), false),
        };
        if skip > rest.len() {
            return (c, used(rest), false);
        }
        rest = &rest[skip..];
    }
    // The end of the bytes closes a message, not a group.
    (c, used(rest), group.is_none())
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
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the message at the front of the buffer is charged for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Paid {
    Nothing,
    /// Its declared length.
    Bytes,
    /// And its decoded bound.
    Decoded,
}

/// A gRPC request body held to a [`Budget`]: passes on one whole message at a time, each once
/// its declared length (when its header arrives) and its decoded bound (once whole) are
/// charged. A stream's charge comes back when the reader asks for the next message (it has
/// decoded and handled the last); a call's when its request ends.
pub struct Charged<B> {
    inner: B,
    budget: Budget,
    max_message: usize,
    /// A unary call: one message, then the end.
    unary: bool,
    /// Received and not passed on: the message being read, and perhaps the next's start.
    buf: BytesMut,
    held: Option<OwnedSemaphorePermit>,
    paid: Paid,
    /// A charge being waited for.
    waiting: Option<Acquire>,
    /// When the message being read (or, after a call's message, the request's end) is due.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A call's message was passed on.
    passed: bool,
    /// The inner body ended.
    ended: bool,
}

impl<B> Charged<B> {
    /// The body of a request to `path` (without credentials: `anonymous`), held to `budget`.
    pub fn for_request(inner: B, budget: Budget, path: &str, anonymous: bool) -> Charged<B> {
        let max = max_message(path, anonymous);
        Charged::new(inner, budget, max, !is_stream(path))
    }

    /// Holds `inner` to `budget`, with messages of at most `max_message` bytes; `unary` for a
    /// call that sends one message.
    pub fn new(inner: B, budget: Budget, max_message: usize, unary: bool) -> Charged<B> {
        Charged {
            inner,
            budget,
            max_message,
            unary,
            buf: BytesMut::new(),
            held: None,
            paid: Paid::Nothing,
            waiting: None,
            deadline: None,
            passed: false,
            ended: false,
        }
    }

    fn held(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Charges up to `want` bytes in all: at once if the budget has them, else starts
    /// waiting.
    fn charge(&mut self, want: usize) -> Result<(), Status> {
        let more = want.saturating_sub(self.held());
        if more == 0 {
            return Ok(());
        }
        if want > self.budget.size {
            return Err(Status::resource_exhausted(format!(
                "a message that needs {want} bytes; this control plane reads at most {} at once for its sender",
                self.budget.size
            )));
        }
        let n = u32::try_from(more).unwrap_or(u32::MAX);
        match self.budget.permits.clone().try_acquire_many_owned(n) {
            Ok(p) => self.add(p),
            Err(_) => {
                self.waiting = Some(Box::pin(self.budget.permits.clone().acquire_many_owned(n)));
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
        if len > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "a message of {len} bytes; at most {} here",
                self.max_message
            )));
        }
        Ok(Some(5 + len))
    }

    fn start_deadline(&mut self) {
        self.deadline = Some(Box::pin(tokio::time::sleep(MESSAGE_DEADLINE)));
    }

    /// Pending (the waker registered), unless what is due is late.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T, BoxError>>> {
        let late = self
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        if !late {
            return Poll::Pending;
        }
        let what = if self.passed {
            "a call's request did not end"
        } else {
            "a message was not whole"
        };
        Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
            "{what} within {MESSAGE_DEADLINE:?}"
        ))
        .into())))
    }
}

fn refused<T>(s: Status) -> Poll<Option<Result<T, BoxError>>> {
    Poll::Ready(Some(Err(s.into())))
}

impl<B> Body for Charged<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // Asked for more: a stream's reader has decoded and handled the message passed on
        // last, so its charge comes back; the next message's time starts now if it began.
        if !this.unary && this.waiting.is_none() && this.paid == Paid::Nothing {
            this.held = None;
            if !this.buf.is_empty() && this.deadline.is_none() {
                this.start_deadline();
            }
        }
        loop {
            if let Some(w) = &mut this.waiting {
                match w.as_mut().poll(cx) {
                    Poll::Ready(Ok(p)) => {
                        this.waiting = None;
                        this.add(p);
                        // Waiting for the budget is not the sender's time.
                        this.start_deadline();
                    }
                    Poll::Ready(Err(_)) => return refused(Status::unavailable("shutting down")),
                    Poll::Pending => return Poll::Pending,
                }
            }
            match this.framed() {
                Err(s) => return refused(s),
                Ok(Some(total)) => {
                    if this.paid == Paid::Nothing {
                        // The declared length, before the rest is read.
                        this.paid = Paid::Bytes;
                        if let Err(s) = this.charge(total) {
                            return refused(s);
                        }
                        continue;
                    }
                    if this.buf.capacity() < total {
                        // One allocation for the message, now that it is charged.
                        this.buf.reserve(total - this.buf.len());
                    }
                    if this.buf.len() >= total {
                        if this.paid == Paid::Bytes {
                            let decoded = if this.buf[0] == 0 {
                                decoded_bound(&this.buf[5..total])
                            } else {
                                // Compressed (tonic refuses it): the bytes only.
                                total
                            };
                            if decoded > MAX_DECODED {
                                return refused(Status::resource_exhausted(format!(
                                    "a message of {total} bytes that may decode to {decoded}; at most {MAX_DECODED}"
                                )));
                            }
                            this.paid = Paid::Decoded;
                            if let Err(s) = this.charge(total.saturating_add(decoded)) {
                                return refused(s);
                            }
                            continue;
                        }
                        this.paid = Paid::Nothing;
                        this.deadline = None;
                        let message = this.buf.split_to(total).freeze();
                        // What follows goes in a buffer of its own, so that the message's
                        // allocation is not kept once the reader is done with it.
                        this.buf = BytesMut::from(&this.buf[..]);
                        if this.unary {
                            this.passed = true;
                            this.start_deadline();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(message))));
                    }
                }
                Ok(None) => {}
            }
            if this.ended {
                this.held = None;
                if this.buf.is_empty() {
                    return Poll::Ready(None);
                }
                // A message cut short: tonic reports it.
                let rest = this.buf.split().freeze();
                return Poll::Ready(Some(Ok(Frame::data(rest))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if this.passed && data.has_remaining() => {
                        // tonic would decode and drop more messages of a call while it waits
                        // for the end, each restarting nothing: a call sends one.
                        let _ = data;
                        return refused(Status::invalid_argument(
                            "a call's request carries one message",
                        ));
                    }
                    Ok(mut data) => {
                        if this.buf.is_empty() && !this.passed && data.has_remaining() {
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
                            this.deadline = None;
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        this.ended = true;
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {
                    this.ended = true;
                    this.deadline = None;
                }
                Poll::Pending => return this.pending(cx),
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

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::convert::Infallible;
    use tokio::sync::mpsc;
    use trellis_api::wire;

    #[test]
    fn an_entry_covers_every_request_struct_three_times_over() {
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
        // A request itself is decoded once; what it holds may repeat.
        let top = [
            "StreamRequest",
            "RegisterRequest",
            "HeartbeatRequest",
            "DeregisterRequest",
            "CertifyRequest",
            "ReportRequest",
            "QuotaRequest",
        ];
        for (name, size) in sizes {
            let times = if top.contains(&name) { 1 } else { 3 };
            assert!(times * size <= ENTRY, "{name}: {size} bytes");
        }
        // A string in a vector with its spare room, beyond its bytes.
        assert!(2 * size_of::<String>() + 16 <= STRING);
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
        let empties = [0x1a_u8, 0x00].repeat(1000);
        let cut = [&empties[..], &[0xff, 0xff]].concat();
        // A group (skipped by a decoder in an unknown field, which then goes on) first.
        let grouped = [&[0x7b_u8, 0x7c][..], &empties].concat();
        // A group never closed: a decoder fails at the end, having decoded what is in it.
        let open = [&[0x7b_u8][..], &empties].concat();
        // (what, message, length-delimited fields that parse, other ones)
        let cases: &[(&str, &[u8], usize, usize)] = &[
            ("nothing", &[], 0, 0),
            ("a varint", &[0x08, 0x96, 0x01], 0, 0),
            // Two demands and their keys; their five strings do not parse.
            ("quota", &quota, 4, 5),
            // A string that happens to parse counts as an entry.
            ("a parsing string", &[0x0a, 0x02, b'h', b'i'], 1, 0),
            ("1,000 empty entries", &empties, 1000, 0),
            ("and garbage after them", &cut, 1000, 0),
            ("after a group", &grouped, 1000, 0),
            ("inside an open group", &open, 1000, 0),
            ("an end tag outside a group", &[0x7c, 0x1a, 0x00], 0, 0),
            ("a length past the end", &[0x0a, 0x05, 0x00], 0, 0),
            ("field 0", &[0x02, 0x00], 0, 0),
        ];
        for (what, message, entries, strings) in cases {
            assert_eq!(
                decoded_bound(message),
                message.len() * PER_BYTE + entries * ENTRY + strings * STRING,
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
        assert_eq!(decoded_bound(&nested), nested.len() * PER_BYTE + 9 * ENTRY);
        // Groups nested past what is followed: the rest counts as if all empty entries.
        let deep = [vec![0x7b_u8; 40], vec![0x7c; 40], empties.clone()].concat();
        assert!(decoded_bound(&deep) >= 1000 * ENTRY);
    }

    #[test]
    fn what_a_busy_sidecar_sends_fits_well_within_the_bounds() {
        // Three perSource Global limits with the 10,000 callers a sidecar keeps buckets for
        // in each.
        let quota = wire::QuotaRequest {
            demand: (0..30_000)
                .map(|i| demand(&format!("spiffe://mesh.test/ns/default/sa/caller-{i:05}")))
                .collect(),
            ..Default::default()
        }
        .encode_to_vec();
        let bound = decoded_bound(&quota);
        assert!(quota.len() < STREAM_MESSAGE, "{} bytes", quota.len());
        assert!(bound < MAX_DECODED, "{bound} for {} bytes", quota.len());
        assert!(quota.len() + bound < SERVICE_BUDGET);
        assert_eq!(
            max_message("/trellis.mesh.v1.Mesh/Quota", false),
            STREAM_MESSAGE
        );
        assert_eq!(
            max_message("/trellis.mesh.v1.Mesh/Register", false),
            CALL_MESSAGE
        );
        assert_eq!(
            max_message("/trellis.mesh.v1.Mesh/Certify", true),
            ANONYMOUS_MESSAGE
        );
    }

    #[test]
    fn each_service_has_a_budget_of_its_own() {
        let budgets = Budgets::new(4 << 20);
        let a = budgets.service("default", "a");
        let all = a.permits.clone().try_acquire_many_owned(4 << 20).unwrap();
        assert!(
            budgets
                .service("default", "a")
                .permits
                .try_acquire()
                .is_err()
        );
        assert!(
            budgets
                .service("default", "b")
                .permits
                .try_acquire()
                .is_ok()
        );
        assert!(budgets.anonymous().permits.try_acquire().is_ok());
        assert_eq!(budgets.held(), (0, 4 << 20));
        drop(all);
        assert_eq!(budgets.held(), (0, 0));
    }

    type Tx = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

    /// A body fed by the returned sender, held to `budget`.
    fn body(
        budget: &Budget,
        unary: bool,
    ) -> (
        Tx,
        Charged<impl Body<Data = Bytes, Error = Infallible> + Unpin>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let inner =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        (tx, Charged::new(inner, budget.clone(), 4096, unary))
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn cost(message: &[u8]) -> usize {
        message.len() + decoded_bound(&message[5..])
    }

    async fn send(tx: &Tx, bytes: &[u8]) {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(bytes))))
            .await
            .unwrap();
    }

    type Next = Option<Result<Frame<Bytes>, BoxError>>;

    /// The next frame, if one is ready without waiting.
    async fn ready<B>(b: &mut Charged<B>) -> Option<Next>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
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

    fn data(n: Option<Next>) -> Vec<u8> {
        n.expect("ready")
            .expect("a frame")
            .expect("no error")
            .into_data()
            .expect("data")
            .to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn messages_pass_whole_and_their_charge_comes_back_when_more_is_asked() {
        let budget = Budget::new(1 << 20);
        let (tx, mut b) = body(&budget, false);
        let one = framed(b"\x0a\x03abc");
        let two = framed(b"\x10\x01");
        // Split inside the header: nothing is charged before the header is whole.
        send(&tx, &one[..3]).await;
        assert!(ready(&mut b).await.is_none());
        assert_eq!(budget.held(), 0);
        // The rest of one with the whole of two, in one frame.
        send(&tx, &[&one[3..], &two[..]].concat()).await;
        assert_eq!(data(ready(&mut b).await), one);
        assert_eq!(budget.held(), cost(&one));
        // Asking for more gives one's charge back; two is charged on its own.
        assert_eq!(data(ready(&mut b).await), two);
        assert_eq!(budget.held(), cost(&two));
        drop(tx);
        assert!(ready(&mut b).await.unwrap().is_none());
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_header_is_refused_before_its_body_is_read() {
        let budget = Budget::new(1 << 20);
        let (tx, mut b) = body(&budget, false);
        let mut header = vec![0u8];
        header.extend_from_slice(&4097u32.to_be_bytes());
        send(&tx, &header).await;
        let e = err(ready(&mut b).await);
        assert!(e.contains("4097 bytes; at most 4096"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_may_decode_past_the_bound_is_refused() {
        let budget = Budget::new(1 << 30);
        let (tx, rx) = mpsc::channel(4);
        let inner =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut b = Charged::new(inner, budget, 64 << 20, false);
        // 200,000 empty entries: 400 KB on the wire, each a struct once decoded.
        send(&tx, &framed(&[0x1a, 0x00].repeat(200_000))).await;
        let e = err(ready(&mut b).await);
        assert!(e.contains("may decode to"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_the_budget_waits_unread_and_its_wait_is_not_its_time() {
        let message = framed(&[0x08; 100]);
        let budget = Budget::new(cost(&message) + 50);
        let (tx1, mut b1) = body(&budget, false);
        let (tx2, mut b2) = body(&budget, false);
        send(&tx1, &message).await;
        assert_eq!(data(ready(&mut b1).await), message);
        // The second's message does not fit beside the first's charge: its header is read,
        // its body is not.
        send(&tx2, &message[..5]).await;
        send(&tx2, &message[5..]).await;
        assert!(ready(&mut b2).await.is_none());
        assert_eq!(tx2.capacity(), 15, "the body was read");
        // Waiting for the budget far past the deadline does not fail it.
        tokio::time::advance(MESSAGE_DEADLINE * 2).await;
        assert!(ready(&mut b2).await.is_none());
        // The first asks for more (it handled its message): the second goes on.
        assert!(ready(&mut b1).await.is_none());
        assert_eq!(data(ready(&mut b2).await), message);
        drop((tx1, tx2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_not_whole_within_the_deadline_ends_the_request_and_frees_its_charge() {
        let budget = Budget::new(1 << 20);
        let (tx, mut b) = body(&budget, false);
        let message = framed(&[0x08; 100]);
        send(&tx, &message[..50]).await;
        assert!(ready(&mut b).await.is_none());
        assert_eq!(budget.held(), message.len());
        tokio::time::advance(MESSAGE_DEADLINE - Duration::from_millis(1)).await;
        assert!(ready(&mut b).await.is_none());
        tokio::time::advance(Duration::from_millis(1)).await;
        let e = err(ready(&mut b).await);
        assert!(e.contains("not whole"), "{e}");
        drop(b);
        assert_eq!(budget.held(), 0);
        // Between messages there is no deadline.
        let (tx2, mut b2) = body(&budget, false);
        send(&tx2, &message).await;
        assert_eq!(data(ready(&mut b2).await), message);
        tokio::time::advance(MESSAGE_DEADLINE * 3).await;
        assert!(ready(&mut b2).await.is_none());
        drop((tx, tx2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_keeps_its_charge_until_its_request_ends_which_must_be_soon() {
        let budget = Budget::new(1 << 20);
        let message = framed(&[0x08; 100]);
        let (tx, mut b) = body(&budget, true);
        send(&tx, &message).await;
        assert_eq!(data(ready(&mut b).await), message);
        // The reader waits for the end (tonic reads a call's trailers): still charged.
        assert!(ready(&mut b).await.is_none());
        assert_eq!(budget.held(), cost(&message));
        drop(tx);
        assert!(ready(&mut b).await.unwrap().is_none());
        assert_eq!(budget.held(), 0);
        // A call that sends a second message is refused.
        let (tx, mut b) = body(&budget, true);
        send(&tx, &message).await;
        assert_eq!(data(ready(&mut b).await), message);
        send(&tx, &[0, 0, 0, 0, 0]).await;
        let e = err(ready(&mut b).await);
        assert!(e.contains("one message"), "{e}");
        drop(b);
        assert_eq!(budget.held(), 0);
        // A call that never ends its request is ended.
        let (tx, mut b) = body(&budget, true);
        send(&tx, &message).await;
        assert_eq!(data(ready(&mut b).await), message);
        tokio::time::advance(MESSAGE_DEADLINE).await;
        let e = err(ready(&mut b).await);
        assert!(e.contains("did not end"), "{e}");
        drop(b);
        assert_eq!(budget.held(), 0);
        drop(tx);
    }
}
