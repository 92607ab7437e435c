//! Access logs: one JSON line per request, written off the request path. Requests hand a
//! finished [`Entry`] to a bounded queue and never wait; a dedicated thread selects the
//! configured fields, encodes and writes. A slow or stuck disk fills the queue, and further
//! entries are dropped and counted instead of slowing traffic.

use crate::trace::{SpanId, TraceId};
use http::HeaderValue;
use http::uri::PathAndQuery;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// What one request did, in the order of the line's fields ([`FIELDS`]). Values stay typed
/// (times, addresses, the request's own shared buffers) and are formatted by the writer
/// thread, off the request path.
#[derive(Clone, Debug)]
pub struct Entry {
    /// When the request arrived, RFC 3339 with microseconds.
    pub start_time: SystemTime,
    /// W3C trace id (32 hex digits), when the request was traced.
    pub trace_id: Option<TraceId>,
    /// This hop's span id (16 hex digits), when the request was traced.
    pub span_id: Option<SpanId>,
    /// The request's `x-request-id` header, when it has one: an id to find the line by
    /// (`trellis explain --access-log`) without tracing.
    pub request_id: Option<HeaderValue>,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The client's address.
    pub client: SocketAddr,
    /// The other side's mesh identity (SPIFFE ID), when it proved one.
    pub peer_identity: Option<Arc<str>>,
    /// Method (HTTP only).
    pub method: Option<http::Method>,
    /// `Host` / `:authority` (HTTP only).
    pub authority: Authority,
    /// Path and query; only the path is written (the query may carry secrets; HTTP only).
    pub path: Option<PathAndQuery>,
    /// `HTTP/1.1`, `HTTP/2`, or `TCP` for a forwarded connection.
    pub protocol: &'static str,
    /// Status sent to the client (HTTP only; 0: none).
    pub status: u16,
    /// gRPC status, for gRPC calls that ended with one.
    pub grpc_status: Option<u32>,
    /// Route rule id (`namespace/route/rule`), `default` or `inbound` (HTTP only).
    pub route: Option<Arc<str>>,
    /// Backend (`namespace/service:port`); written as `""` when none was chosen.
    pub backend: Option<Arc<str>>,
    /// The endpoint that answered.
    pub upstream: Option<SocketAddr>,
    /// Why the proxy answered itself or the exchange failed (`no_route`, `denied`,
    /// `upstream_timeout`, ...; see `hop::reason`), if it did.
    pub reason: Option<&'static str>,
    /// The authorization policy that allowed or denied the request.
    pub policy: Option<Arc<str>>,
    /// Request body bytes, as its `content-length` declared (absent when streamed).
    pub request_bytes: Option<u64>,
    /// Response body bytes sent.
    pub response_bytes: u64,
    /// Time from the request's arrival to the upstream's response head, written in
    /// milliseconds (absent when no upstream answered).
    pub upstream_time: Option<Duration>,
    /// Time from the request's arrival to the end of its response body, written in
    /// milliseconds.
    pub duration: Duration,
}

/// The request's authority, kept in the request's own buffer (cloning it is a reference
/// count, not a copy).
#[derive(Clone, Debug, Default)]
pub enum Authority {
    /// Neither the URI nor a `Host` header had one.
    #[default]
    None,
    /// From the URI (HTTP/2 `:authority`, absolute-form HTTP/1).
    Uri(http::uri::Authority),
    /// From the `Host` header (may hold bytes that are not UTF-8).
    Host(HeaderValue),
}

impl Authority {
    /// The authority as text, `""` when absent or not text.
    pub fn as_str(&self) -> &str {
        match self {
            Authority::None => "",
            Authority::Uri(a) => a.as_str(),
            Authority::Host(h) => h.to_str().unwrap_or_default(),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Authority::None => b"",
            Authority::Uri(a) => a.as_str().as_bytes(),
            Authority::Host(h) => h.as_bytes(),
        }
    }
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            start_time: SystemTime::UNIX_EPOCH,
            trace_id: None,
            span_id: None,
            request_id: None,
            direction: "",
            client: SocketAddr::from(([0, 0, 0, 0], 0)),
            peer_identity: None,
            method: None,
            authority: Authority::None,
            path: None,
            protocol: "",
            status: 0,
            grpc_status: None,
            route: None,
            backend: None,
            upstream: None,
            reason: None,
            policy: None,
            request_bytes: None,
            response_bytes: 0,
            upstream_time: None,
            duration: Duration::ZERO,
        }
    }
}

/// A field selection: bit `i` keeps `FIELDS[i]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields(u32);

impl Fields {
    /// Every field.
    pub const ALL: Fields = Fields((1 << FIELDS.len()) - 1);

    /// The fields named in `names` (known names only; validation refused the others), or
    /// every field when `names` is empty.
    pub fn new(names: &[String]) -> Fields {
        if names.is_empty() {
            return Fields::ALL;
        }
        Fields(
            FIELDS
                .iter()
                .enumerate()
                .filter(|(_, f)| names.iter().any(|n| n == *f))
                .fold(0, |m, (i, _)| m | 1 << i),
        )
    }
}

/// What the writer did, for metrics.
#[derive(Debug, Default)]
pub struct Counts {
    /// Lines written.
    pub written: AtomicU64,
    /// Entries dropped because the queue was full (the disk is slow).
    pub dropped: AtomicU64,
    /// Lines lost to write errors.
    pub failed: AtomicU64,
}

/// The request path's handle.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
    counts: Arc<Counts>,
}

impl AccessLog {
    /// Starts the writer thread on `out`, keeping only `fields` of each entry (every field
    /// when empty), with at most `queue` entries waiting. The thread ends with the last
    /// handle, after writing what is queued.
    pub fn start(
        out: Box<dyn Write + Send>,
        fields: Vec<String>,
        queue: usize,
    ) -> std::io::Result<AccessLog> {
        AccessLog::start_counted(out, fields, queue, Arc::default())
    }

    /// Like [`start`](Self::start), counting into `counts` (kept across reconfigurations).
    pub fn start_counted(
        out: Box<dyn Write + Send>,
        fields: Vec<String>,
        queue: usize,
        counts: Arc<Counts>,
    ) -> std::io::Result<AccessLog> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let c = counts.clone();
        let fields = Fields::new(&fields);
        std::thread::Builder::new()
            .name("trellis-access-log".into())
            .spawn(move || write_loop(out, fields, rx, queue, &c))?;
        Ok(AccessLog { tx, counts })
    }

    /// Queues `entry`, or drops and counts it when the queue is full. Never waits.
    pub fn record(&self, entry: Entry) {
        if self.tx.try_send(entry).is_err() {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }
}

/// One entry as its JSON line, keeping only `fields` (all when empty).
pub fn line(entry: &Entry, fields: &[String]) -> String {
    let mut out = Vec::new();
    push_line(&mut out, entry, Fields::new(fields));
    // Every string was escaped from valid UTF-8 or replaced where it was not.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `e`'s JSON line to `out`, written by hand: serde_json's generic path and the
/// formatting machinery were most of the writer thread's cost. Each field goes out as
/// `,"name":value` with its key a literal; the first comma then becomes the `{`.
fn push_line(out: &mut Vec<u8>, e: &Entry, fields: Fields) {
    out.reserve(LINE);
    let start = out.len();
    macro_rules! field {
        ($name:literal, $present:expr, $value:expr) => {
            if fields.0 & const { 1 << index($name) } != 0 && $present {
                out.extend_from_slice(concat!(",\"", $name, "\":").as_bytes());
                $value;
            }
        };
    }
    field!("start_time", true, push_time(out, e.start_time));
    if let Some(id) = &e.trace_id {
        field!("trace_id", true, push_hex(out, id));
    }
    if let Some(id) = &e.span_id {
        field!("span_id", true, push_hex(out, id));
    }
    if let Some(id) = &e.request_id {
        field!("request_id", true, push_bytes(out, id.as_bytes()));
    }
    field!("direction", true, push_str(out, e.direction));
    field!("client", true, push_addr(out, e.client));
    if let Some(p) = &e.peer_identity {
        field!("peer_identity", true, push_str(out, p));
    }
    if let Some(m) = &e.method {
        field!("method", true, push_str(out, m.as_str()));
    }
    let authority = e.authority.as_bytes();
    field!(
        "authority",
        !authority.is_empty(),
        push_bytes(out, authority)
    );
    let path = e.path.as_ref().map_or("", |p| p.path());
    field!("path", !path.is_empty(), push_str(out, path));
    field!("protocol", true, push_str(out, e.protocol));
    field!("status", e.status != 0, push_u64(out, e.status.into()));
    if let Some(g) = e.grpc_status {
        field!("grpc_status", true, push_u64(out, g.into()));
    }
    let route = e.route.as_deref().unwrap_or_default();
    field!("route", !route.is_empty(), push_str(out, route));
    field!(
        "backend",
        true,
        push_str(out, e.backend.as_deref().unwrap_or_default())
    );
    if let Some(u) = e.upstream {
        field!("upstream", true, push_addr(out, u));
    }
    if let Some(r) = e.reason {
        field!("reason", true, push_str(out, r));
    }
    if let Some(p) = &e.policy {
        field!("policy", true, push_str(out, p));
    }
    if let Some(n) = e.request_bytes {
        field!("request_bytes", true, push_u64(out, n));
    }
    field!("response_bytes", true, push_u64(out, e.response_bytes));
    if let Some(t) = e.upstream_time {
        field!("upstream_ms", true, push_ms(out, t));
    }
    field!("duration_ms", true, push_ms(out, e.duration));
    if out.len() == start {
        out.extend_from_slice(b"{}\n");
    } else {
        out[start] = b'{';
        out.extend_from_slice(b"}\n");
    }
}

/// Room reserved for a line, enough for most, so writing one rarely grows the buffer.
const LINE: usize = 1024;

/// The position of `name` in [`FIELDS`]; a name that is not there fails the build.
const fn index(name: &str) -> usize {
    let mut i = 0;
    while i < FIELDS.len() {
        let f = FIELDS[i].as_bytes();
        let n = name.as_bytes();
        if f.len() == n.len() {
            let mut j = 0;
            while j < n.len() && f[j] == n[j] {
                j += 1;
            }
            if j == n.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("not an access log field")
}

/// Whether `b` holds a byte JSON requires escaped. No early exit, so it compiles to wide
/// compares: most values have nothing to escape.
fn needs_escape(b: &[u8]) -> bool {
    b.iter().fold(false, |any, &c| {
        any | (c < 0x20) | (c == b'"') | (c == b'\\')
    })
}

/// A JSON string from text, escaping what JSON requires (quote, backslash, control bytes).
fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    if needs_escape(s.as_bytes()) {
        escape(out, s);
    } else {
        out.extend_from_slice(s.as_bytes());
    }
    out.push(b'"');
}

/// A JSON string from bytes that may not be UTF-8: each invalid sequence becomes U+FFFD.
fn push_bytes(out: &mut Vec<u8>, b: &[u8]) {
    if let Ok(s) = std::str::from_utf8(b) {
        return push_str(out, s);
    }
    out.push(b'"');
    for chunk in b.utf8_chunks() {
        escape(out, chunk.valid());
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

fn escape(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = s.as_bytes();
    let mut done = 0;
    for (i, &c) in b.iter().enumerate() {
        let short: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&b[done..i]);
        if short.is_empty() {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(c >> 4)], {
                HEX[usize::from(c & 0xf)]
            }]);
        } else {
            out.extend_from_slice(short);
        }
        done = i + 1;
    }
    out.extend_from_slice(&b[done..]);
}

/// A trace or span id as a JSON string of lowercase hex digits.
fn push_hex<const N: usize>(out: &mut Vec<u8>, id: &[u8; N]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = [b'"'; 34];
    for (i, b) in id.iter().take(16).enumerate() {
        s[1 + 2 * i] = HEX[usize::from(b >> 4)];
        s[2 + 2 * i] = HEX[usize::from(b & 0xf)];
    }
    let n = 2 * N.min(16);
    s[n + 1] = b'"';
    out.extend_from_slice(&s[..n + 2]);
}

/// Writes `n` in decimal ending just before `end` in `buf`; returns where it starts.
fn digits(buf: &mut [u8], end: usize, mut n: u64) -> usize {
    let mut i = end;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return i;
        }
    }
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut buf = [0u8; 20];
    let i = digits(&mut buf, 20, n);
    out.extend_from_slice(&buf[i..]);
}

/// `n` as exactly `width` digits ending just before `end` (zero-padded; `n` fits).
fn fixed(buf: &mut [u8], end: usize, mut n: u32, width: usize) {
    for d in buf[end - width..end].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Milliseconds with up to six decimals (nanoseconds), trailing zeros dropped but one kept,
/// so the value always reads as a fraction.
fn push_ms(out: &mut Vec<u8>, d: Duration) {
    // In 64 bits: 128-bit division is a library call.
    let (secs, sub) = (d.as_secs(), d.subsec_nanos());
    let mut frac = sub % 1_000_000;
    let mut width = 6;
    while width > 1 && frac % 10 == 0 {
        frac /= 10;
        width -= 1;
    }
    let mut buf = [0u8; 28];
    fixed(&mut buf, 28, frac, width);
    let dot = 28 - width - 1;
    buf[dot] = b'.';
    let ms = secs
        .saturating_mul(1000)
        .saturating_add(u64::from(sub / 1_000_000));
    let i = digits(&mut buf, dot, ms);
    out.extend_from_slice(&buf[i..]);
}

fn push_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            // `"255.255.255.255:65535"` at most, filled from the end.
            let mut buf = [0u8; 23];
            buf[22] = b'"';
            let mut i = digits(&mut buf, 22, v4.port().into());
            let mut sep = b':';
            for o in v4.ip().octets().into_iter().rev() {
                i -= 1;
                buf[i] = sep;
                sep = b'.';
                // At most three digits: no division loop.
                i -= 1;
                buf[i] = b'0' + o % 10;
                if o >= 10 {
                    i -= 1;
                    buf[i] = b'0' + o / 10 % 10;
                }
                if o >= 100 {
                    i -= 1;
                    buf[i] = b'0' + o / 100;
                }
            }
            i -= 1;
            buf[i] = b'"';
            out.extend_from_slice(&buf[i..]);
        }
        // Rare in a mesh; the standard form (brackets, scope id) is worth its cost.
        SocketAddr::V6(v6) => {
            let _ = write!(out, "\"{v6}\"");
        }
    }
}

/// RFC 3339 in UTC with microseconds, `"1970-01-01T00:00:00.000000Z"`.
fn push_time(out: &mut Vec<u8>, t: SystemTime) {
    // Whole seconds and microseconds into the second, counted forward (also before 1970);
    // in 64 bits, as 128-bit division is a library call.
    let (secs, micros) = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_micros()),
        Err(e) => {
            let d = e.duration();
            // Truncated to whole microseconds toward the past, like a forward count.
            let back = d.as_secs() as i64 * 1_000_000 + i64::from(d.subsec_nanos().div_ceil(1000));
            let fwd = -back;
            (fwd.div_euclid(1_000_000), fwd.rem_euclid(1_000_000) as u32)
        }
    };
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let day = secs.rem_euclid(86_400) as u32;
    let mut buf = *b"\"0000-00-00T00:00:00.000000Z\"";
    fixed(&mut buf, 5, y.clamp(0, 9999) as u32, 4);
    fixed(&mut buf, 8, m, 2);
    fixed(&mut buf, 11, d, 2);
    fixed(&mut buf, 14, day / 3600, 2);
    fixed(&mut buf, 17, day / 60 % 60, 2);
    fixed(&mut buf, 20, day % 60, 2);
    fixed(&mut buf, 27, micros, 6);
    out.extend_from_slice(&buf);
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (the classic
/// days-to-civil arithmetic over 400-year eras).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn write_loop(
    mut out: Box<dyn Write + Send>,
    fields: Fields,
    mut rx: mpsc::Receiver<Entry>,
    queue: usize,
    counts: &Counts,
) {
    // Lingering after a short batch lets lines gather, so requests seldom wake this thread
    // and it writes tens of lines at a time; only with a queue so large that no sidecar
    // fills it in that time, so lingering never drops a line.
    let linger = (queue >= LINGER_QUEUE).then_some(LINGER);
    let mut buf = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        // Everything already queued goes out in one write.
        buf.clear();
        let mut n = 1;
        push_line(&mut buf, &first, fields);
        drop(first);
        while n < BATCH {
            match rx.try_recv() {
                Ok(e) => {
                    push_line(&mut buf, &e, fields);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        match out.write_all(&buf).and_then(|()| out.flush()) {
            Ok(()) => counts.written.fetch_add(n, Ordering::Relaxed),
            Err(_) => counts.failed.fetch_add(n, Ordering::Relaxed),
        };
        if let Some(d) = linger
            && n < BATCH
        {
            std::thread::sleep(d);
        }
    }
}

/// Most lines in one write.
const BATCH: u64 = 256;
/// How long the writer waits for more lines after a short batch.
const LINGER: Duration = Duration::from_millis(5);
/// The smallest queue the writer lingers with: at 5 ms, it would take over 200,000 lines a
/// second to fill.
const LINGER_QUEUE: usize = 1024;

/// The known field names, for validating a field selection, in the order of a line.
pub const FIELDS: &[&str] = trellis_api::telemetry::ACCESS_LOG_FIELDS;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn entry(status: u16) -> Entry {
        Entry {
            start_time: SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1),
            trace_id: Some([
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ]),
            direction: "outbound",
            client: "127.0.0.1:40000".parse().unwrap(),
            method: Some(http::Method::GET),
            authority: Authority::Host(HeaderValue::from_static("catalog")),
            path: Some(PathAndQuery::from_static("/products/1?card=secret")),
            protocol: "HTTP/1.1",
            status,
            route: Some("shop/catalog/0".into()),
            backend: Some("shop/catalog:8080".into()),
            upstream: Some("10.0.0.1:8080".parse().unwrap()),
            duration: Duration::from_micros(1500),
            ..Entry::default()
        }
    }

    #[test]
    fn every_serialized_field_is_listed_and_selection_keeps_only_those_asked_for() {
        let all = Entry {
            peer_identity: Some("spiffe://x/ns/a/sa/b".into()),
            grpc_status: Some(0),
            span_id: Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]),
            request_id: Some(HeaderValue::from_static("req-1")),
            reason: Some("upstream_timeout"),
            policy: Some("shop/allow".into()),
            request_bytes: Some(12),
            upstream_time: Some(Duration::from_millis(1)),
            ..entry(200)
        };
        let text = line(&all, &[]);
        assert!(
            text.starts_with(
                "{\"start_time\":\"1970-01-01T00:00:00.000001Z\",\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"span_id\":\"00f067aa0ba902b7\",\"request_id\":\"req-1\""
            ),
            "{text}"
        );
        assert!(
            text.contains("\"client\":\"127.0.0.1:40000\",\"peer_identity\":\"spiffe://x/ns/a/sa/b\",\"method\":\"GET\"")
                && text.contains("\"upstream\":\"10.0.0.1:8080\"")
                && text.contains("\"path\":\"/products/1\",")
                && text.ends_with(",\"upstream_ms\":1.0,\"duration_ms\":1.5}\n"),
            "{text}"
        );
        // Every field, in the documented order.
        let at: Vec<usize> = FIELDS
            .iter()
            .map(|f| {
                text.find(&format!("\"{f}\":"))
                    .unwrap_or_else(|| panic!("{f}"))
            })
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        let mut known = FIELDS.to_vec();
        known.sort_unstable();
        assert_eq!(keys, known);
        // A selection keeps the line's order, whatever the order asked in.
        let some = line(&all, &["status".into(), "trace_id".into()]);
        assert_eq!(
            some,
            "{\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"status\":200}\n"
        );
        assert_eq!(line(&all, &["nothing".into()]), "{}\n");
    }

    #[test]
    fn hostile_values_are_escaped_and_read_back_as_sent() {
        let mut nasty = String::from("q\"b\\s/\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f}é\u{2028}");
        nasty.push_str("\"}],\"status\":1,\"x\":\"");
        let e = Entry {
            // Bytes that are not UTF-8 and a quote in a Host header; a quote and a backslash
            // are valid in a path.
            authority: Authority::Host(HeaderValue::from_bytes(b"ca\xfft\xc3\"\\x").unwrap()),
            path: Some(PathAndQuery::try_from("/a\"b\\c/%22/caf\u{e9}?q=1").unwrap()),
            peer_identity: Some(nasty.as_str().into()),
            route: Some(nasty.as_str().into()),
            backend: Some(nasty.as_str().into()),
            policy: Some(nasty.as_str().into()),
            client: "[fe80::1%7]:443".parse().unwrap(),
            upstream: Some("[::1]:80".parse().unwrap()),
            ..entry(200)
        };
        let text = line(&e, &[]);
        assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
        assert!(!text.bytes().any(|b| b < 0x20 && b != b'\n'), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["authority"], "ca\u{fffd}t\u{fffd}\"\\x");
        assert_eq!(v["path"], "/a\"b\\c/%22/caf\u{e9}");
        for f in ["peer_identity", "route", "backend", "policy"] {
            assert_eq!(v[f], nasty.as_str(), "{f}");
        }
        assert_eq!(v["status"], 200);
        assert_eq!(v["client"], "[fe80::1%7]:443");
        assert_eq!(v["upstream"], "[::1]:80");
        assert_eq!(v.as_object().unwrap().len(), 16, "{text}");
    }

    #[test]
    fn times_and_durations_read_as_before() {
        // The hand-written date against jiff's, over leap days, centuries and far years.
        let mut times: Vec<i64> = vec![
            951_782_400 - 1, // 2000-02-28T23:59:59
            951_868_800 - 1, // 2000-02-29T23:59:59
            -2_203_891_200,  // 1900-03-01
            1_709_251_199,   // 2024-02-29T23:59:59
            -1,              // just before the epoch
        ];
        let mut t: i64 = -62_135_596_800; // 0001-01-01
        while t < 253_402_300_000 {
            times.push(t);
            t += 3_200_003;
        }
        for t in times {
            let sub = Duration::from_nanos(987_654_321);
            let at = if t >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(t.unsigned_abs()) + sub
            } else {
                SystemTime::UNIX_EPOCH - Duration::from_secs(t.unsigned_abs()) + sub
            };
            let want = jiff::Timestamp::try_from(at)
                .unwrap()
                .strftime("\"%Y-%m-%dT%H:%M:%S%.6fZ\"")
                .to_string();
            let mut got = Vec::new();
            push_time(&mut got, at);
            assert_eq!(String::from_utf8(got).unwrap(), want, "{t}");
        }
        for (nanos, want) in [
            (0, "0.0"),
            (1, "0.000001"),
            (999, "0.000999"),
            (1_000, "0.001"),
            (1_210_000, "1.21"),
            (1_500_000, "1.5"),
            (2_000_000, "2.0"),
            (12_345_678_901, "12345.678901"),
        ] {
            let mut got = Vec::new();
            push_ms(&mut got, Duration::from_nanos(nanos));
            assert_eq!(String::from_utf8(got).unwrap(), want);
            let f: f64 = want.parse().unwrap();
            assert!((f - nanos as f64 / 1e6).abs() < 1e-6, "{nanos}");
        }
    }

    #[test]
    fn addresses_read_as_displayed() {
        for a in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.0.1:8080",
            "100.20.3.9:80",
            "[::1]:443",
            "[fe80::1%7]:1",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let mut got = Vec::new();
            push_addr(&mut got, a);
            assert_eq!(String::from_utf8(got).unwrap(), format!("\"{a}\""));
        }
    }

    /// A sink that records what it got, or blocks until released.
    #[derive(Clone, Default)]
    struct Sink {
        got: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.got.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn wait(mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_are_written_in_order() {
        let sink = Sink::default();
        let log = AccessLog::start(Box::new(sink.clone()), vec!["status".into()], 64).unwrap();
        for s in 200..210 {
            log.record(entry(s));
        }
        wait(|| log.counts().written.load(Ordering::Relaxed) == 10);
        let text = String::from_utf8(sink.got.lock().unwrap().clone()).unwrap();
        let want: String = (200..210)
            .map(|s| format!("{{\"status\":{s}}}\n"))
            .collect();
        assert_eq!(text, want);
    }

    #[test]
    fn a_stuck_disk_costs_dropped_lines_never_a_waiting_request() {
        let sink = Sink::default();
        let stuck = sink.gate.lock().unwrap();
        let log = AccessLog::start(Box::new(sink.clone()), vec![], 16).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..10_000 {
            log.record(entry(200));
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        // The queue (16) and the batch being written (up to 256) are kept; the rest dropped.
        let dropped = log.counts().dropped.load(Ordering::Relaxed);
        assert!(dropped >= 10_000 - 16 - 256, "{dropped}");
        drop(stuck);
        wait(|| {
            let c = log.counts();
            c.written.load(Ordering::Relaxed) + c.dropped.load(Ordering::Relaxed) == 10_000
        });
    }
}
