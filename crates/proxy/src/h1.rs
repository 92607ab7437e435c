//! A lean HTTP/1.1 client for upstream requests without a body — most proxied requests (GET,
//! HEAD, DELETE, ...). It runs inside the task serving the downstream connection: no
//! connection task, no channel to it, no second dispatcher. hyper's client handles everything
//! else (request bodies, which need reading and writing at once; upgrades; HTTP/2).
//!
//! The request head is written in one `send`; the response head is parsed with `httparse`
//! (what hyper uses) and its body framed by RFC 9112 §6.3: no body, `Content-Length`, chunked
//! or until close. Header values and body bytes are slices of the read buffer, not copies.
//! Anything the framing rules do not allow is a malformed response (502), never a guess.

use crate::tls::Upstream;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use std::future::Future as _;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::AsyncWriteExt;

/// Largest response head (and trailer block) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// First read size; doubled while reads fill it, up to [`MAX_READ`].
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the request failed: the connection was already gone, so the upstream saw
    /// no request.
    #[error("writing the request: {0}")]
    NotSent(io::Error),
    /// The connection ended after the request was written, before a whole response head.
    #[error("connection ended before a response: {0}")]
    Closed(String),
    /// The response broke HTTP/1.1.
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// An upstream HTTP/1.1 connection and the bytes read from it but not yet used.
pub struct Conn {
    io: Upstream,
    buf: BytesMut,
    read_size: u32,
    /// The request head being written, kept for the next request's.
    head: Vec<u8>,
    /// Scratch space for parsing response heads.
    fields: Vec<[usize; 4]>,
    /// Counts the connection against its backend's circuit breaker until it closes.
    permit: Option<crate::breaker::ConnPermit>,
    /// Milliseconds the connection may idle by the upstream's last response (`Keep-Alive:
    /// timeout`, see [`idle_allowed`]), or `u32::MAX` when it said nothing. (`u32`s here keep
    /// the connection, which every response body carries, as small as it was.)
    idle_allowed: u32,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A connection on `io`.
    pub fn new(io: Upstream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            read_size: FIRST_READ as u32,
            head: Vec::new(),
            fields: Vec::new(),
            permit: None,
            idle_allowed: u32::MAX,
        }
    }

    /// How long this connection may idle in the pool by what the upstream announced, if it
    /// announced anything: see [`idle_allowed`].
    pub fn idle_allowed(&self) -> Option<std::time::Duration> {
        (self.idle_allowed != u32::MAX)
            .then(|| std::time::Duration::from_millis(u64::from(self.idle_allowed)))
    }

    /// Keeps the circuit breaker's count of this connection until it closes.
    pub fn hold(&mut self, permit: Option<crate::breaker::ConnPermit>) {
        self.permit = permit;
    }

    /// Whether an idle pooled connection can take a request: the upstream has not closed
    /// it, nor sent anything unasked. Costs no system call when the last read emptied the
    /// socket (the runtime then knows it is not readable until epoll says otherwise).
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        // One poll, outside the task's cooperative budget: with the budget spent, the read
        // would answer "pending" without looking, and a closed connection would pass.
        let check = std::pin::pin!(tokio::task::unconstrained(std::future::poll_fn(|cx| {
            Poll::Ready(self.poll_read(cx))
        })));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(check.poll(&mut cx), Poll::Ready(Poll::Pending))
    }

    /// Lets go of the (empty) read buffer before the connection idles in the pool, as
    /// HAProxy and nginx do with an idle connection's buffers: pooled connections outnumber
    /// busy ones (a burst leaves its connections behind), and each held ~8 KiB. The next
    /// exchange allocates afresh, one allocation per request. A size learned from a large
    /// body is forgotten too.
    fn shrink(&mut self) {
        self.read_size = FIRST_READ as u32;
        self.buf = BytesMut::new();
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let read_size = self.read_size as usize;
        if self.buf.capacity() - self.buf.len() < read_size / 2 {
            self.buf.reserve(read_size);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        // A read that filled the space suggests a large body: read more at once next time.
        if n == spare {
            self.read_size = (self.read_size * 2).min(MAX_READ as u32);
        }
        Poll::Ready(Ok(n))
    }

    async fn read(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read(cx)).await
    }

    /// Sends a request without a body and reads the response head; the body streams from
    /// the returned [`ResponseBody`], which owns the connection until it ends.
    pub async fn send(
        mut self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<http::Response<ResponseBody>, Error> {
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        encode_request(method, uri, headers, &mut head);
        // A failed write means the connection was already gone: the upstream saw nothing.
        self.io.write_all(&head).await.map_err(Error::NotSent)?;
        // (TLS holds records until flushed; plain TCP has nothing to flush.)
        self.io.flush().await.map_err(Error::NotSent)?;
        self.head = head;
        loop {
            let parsed = match parse_response(&mut self.buf, &mut self.fields)? {
                Some(p) => p,
                None if self.buf.len() >= MAX_HEAD => {
                    return Err(Error::Malformed(format!(
                        "response head larger than {MAX_HEAD} bytes"
                    )));
                }
                None => {
                    let before = self.buf.len();
                    match self.read().await {
                        Ok(0) if before == 0 => {
                            return Err(Error::Closed("no response".into()));
                        }
                        Ok(0) => {
                            return Err(Error::Closed(format!(
                                "after {before} bytes of a response head"
                            )));
                        }
                        Ok(_) => continue,
                        Err(e) => return Err(Error::Closed(e.to_string())),
                    }
                }
            };
            let (version, status, mut headers) = parsed;
            if status.is_informational() {
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Error::Malformed(
                        "101 Switching Protocols to a request that asked for no upgrade".into(),
                    ));
                }
                // 100 Continue, 103 Early Hints: interim, the final response follows.
                continue;
            }
            let (framing, reusable) = framing(method == Method::HEAD, version, status, &headers)
                .map_err(|e| Error::Malformed(e.into()))?;
            self.idle_allowed = idle_allowed(&headers).map_or(u32::MAX, |d| {
                u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
            });
            if headers.contains_key(header::TRANSFER_ENCODING) {
                // The coding decides the length; a Content-Length beside it must not travel
                // on (RFC 9112 §6.3 rule 3), or the next hop would cut the body to it.
                headers.remove(header::CONTENT_LENGTH);
            }
            let state = match framing {
                Framing::Empty | Framing::Length(0) => State::Done,
                Framing::Length(n) => State::Length(n),
                Framing::Chunked => State::Chunked(Chunked::Size),
                Framing::UntilClose => State::UntilClose,
            };
            let mut resp = http::Response::new(ResponseBody {
                conn: Some(self),
                state,
                reusable,
            });
            *resp.status_mut() = status;
            *resp.version_mut() = version;
            *resp.headers_mut() = headers;
            return Ok(resp);
        }
    }
}

/// Writes the request head: origin-form target, the caller's headers, and `content-length:
/// 0` for the methods whose requests are expected to carry a body (as hyper's client does).
fn encode_request(method: &Method, uri: &Uri, headers: &HeaderMap, out: &mut Vec<u8>) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Parses a response head at the front of `buf`; when whole, removes it from `buf` and
/// returns it. Header values share the head's bytes. `fields` is scratch space, kept by the
/// caller so that no parse allocates or clears it.
fn parse_response(
    buf: &mut BytesMut,
    fields: &mut Vec<[usize; 4]>,
) -> Result<Option<(Version, StatusCode, HeaderMap)>, Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    // [name start, name end, value start, value end] of each field, as offsets into `buf`,
    // so the head can be split off the buffer before the values are made from it.
    fields.clear();
    let base = buf.as_ptr() as usize;
    let (len, version, code, count) = {
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Error::Malformed(e.to_string())),
        };
        fields.extend(resp.headers.iter().map(|h| {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            [name, name + h.name.len(), value, value + h.value.len()]
        }));
        let version = match resp.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        (len, version, resp.code.unwrap_or(0), resp.headers.len())
    };
    let status =
        StatusCode::from_u16(code).map_err(|_| Error::Malformed(format!("status code {code}")))?;
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &[ns, ne, vs, ve] in &fields[..count] {
        let name = HeaderName::from_bytes(&head[ns..ne])
            .map_err(|_| Error::Malformed("invalid header name".into()))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| Error::Malformed(format!("invalid value for header {name}")))?;
        headers.append(name, value);
    }
    Ok(Some((version, status, headers)))
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body: a response to HEAD, or 1xx, 204, 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the upstream closes the connection.
    UntilClose,
}

/// The response's framing, and whether the connection can carry another request after it.
/// Pure: a decision over the head alone.
pub(crate) fn framing(
    head_request: bool,
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<(Framing, bool), &'static str> {
    let keep_alive = keep_alive(version, headers);
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, keep_alive));
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if codings.peek().is_some() && version == Version::HTTP_10 {
        // HTTP/1.0 has no transfer codings: the framing is faulty (RFC 9112 §6.1).
        return Err("transfer-encoding in an HTTP/1.0 response");
    }
    if codings.peek().is_some() {
        let last = codings.last().map(|v| v.as_bytes()).unwrap_or_default();
        let chunked = last
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        // With Transfer-Encoding, any Content-Length is ignored, and the connection is not
        // trusted afterwards (§6.3 rule 3).
        let reusable = keep_alive && !headers.contains_key(header::CONTENT_LENGTH);
        return Ok(if chunked {
            (Framing::Chunked, reusable)
        } else {
            (Framing::UntilClose, false)
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_length(part.trim_ascii()).ok_or("invalid content-length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values");
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::UntilClose, false),
    })
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Whether the upstream lets the connection stay open after this response.
fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &[u8]| {
        headers.get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
        })
    };
    if version == Version::HTTP_10 {
        has(b"keep-alive") && !has(b"close")
    } else {
        !has(b"close")
    }
}

/// How long a connection may idle before its next request, from the response's `Keep-Alive:
/// timeout=N` (as Trellis's own HTTP/1.1 listeners, Node.js and Apache send it): N seconds
/// less one (less half of N under two) for the response's way here, since a request sent
/// later races the upstream's close and would be lost with it. Pure; `None` when the
/// response says nothing (or nothing readable) about it.
pub(crate) fn idle_allowed(headers: &HeaderMap) -> Option<std::time::Duration> {
    let mut secs = None;
    for value in headers.get_all(KEEP_ALIVE) {
        for param in value.as_bytes().split(|&b| b == b',') {
            let Some(eq) = param.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (name, n) = (&param[..eq], &param[eq + 1..]);
            let n = n.trim_ascii();
            // A quoted-string is allowed too (RFC 9110 §5.6.6).
            let n = n
                .strip_prefix(b"\"")
                .and_then(|q| q.strip_suffix(b"\""))
                .unwrap_or(n);
            if name.trim_ascii().eq_ignore_ascii_case(b"timeout")
                && let Some(n) = parse_length(n)
            {
                // Several: the shortest binds.
                secs = Some(secs.map_or(n, |s: u64| s.min(n)));
            }
        }
    }
    secs.map(|s| {
        let n = std::time::Duration::from_secs(s);
        n.saturating_sub((n / 2).min(std::time::Duration::from_secs(1)))
    })
}

/// `keep-alive`, the response header that says how long an idle connection stays open.
pub(crate) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Where the body reader is.
enum State {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// A response body read from the upstream connection. It owns the connection: when the body
/// has been read to its end, [`ResponseBody::take_reusable`] gives it back for the pool.
pub struct ResponseBody {
    /// `None` once taken back for the pool.
    conn: Option<Conn>,
    state: State,
    reusable: bool,
}

impl ResponseBody {
    /// The connection, when the body ended cleanly and the connection may carry another
    /// request: the upstream kept it alive and sent nothing beyond the response.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        let clean = matches!(self.state, State::Done)
            && self.reusable
            && self.conn.as_ref().is_some_and(|c| c.buf.is_empty());
        if !clean {
            return None;
        }
        let mut conn = self.conn.take()?;
        conn.shrink();
        Some(conn)
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            let buf = &mut conn.buf;
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) if !buf.is_empty() => {
                    let take = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    if *left == 0 {
                        this.state = State::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(buf.split_to(take).freeze()))));
                }
                State::UntilClose if !buf.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                }
                State::Chunked(chunked) if !buf.is_empty() => match chunked.step(buf) {
                    Ok(Some(Step::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Some(Step::End(trailers))) => {
                        this.state = State::Done;
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        this.reusable = false;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                _ => {}
            }
            // Nothing (or not enough) buffered: read more.
            let n = match ready!(conn.poll_read(cx)) {
                Ok(n) => n,
                Err(e) => {
                    this.reusable = false;
                    return Poll::Ready(Some(Err(Error::Closed(e.to_string()))));
                }
            };
            if n == 0 {
                this.reusable = false;
                if matches!(this.state, State::UntilClose) {
                    this.state = State::Done;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(Error::Closed(
                    "connection ended before the end of the response body".into(),
                ))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// What the chunked decoder produced from the buffer.
#[derive(Debug, PartialEq)]
enum Step {
    Data(Bytes),
    /// The last chunk, with the trailer fields if there were any.
    End(Option<HeaderMap>),
}

/// The chunked transfer coding decoder (RFC 9112 §7.1), over a buffer refilled by the
/// caller.
#[derive(Debug)]
enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

impl Chunked {
    /// Consumes what it can from `buf`; `None` means more bytes are needed.
    fn step(&mut self, buf: &mut BytesMut) -> Result<Option<Step>, Error> {
        let bad = |what: &str| Error::Malformed(format!("chunked body: {what}"));
        loop {
            match self {
                Chunked::Size => {
                    let end = buf.iter().position(|&b| b == b'\n');
                    if end.unwrap_or(buf.len()) > MAX_CHUNK_LINE {
                        return Err(bad("chunk-size line too long"));
                    }
                    let Some(end) = end else {
                        return Ok(None);
                    };
                    let line = buf[..end]
                        .strip_suffix(b"\r")
                        .ok_or_else(|| bad("chunk-size line not ended by CRLF"))?;
                    // chunk-size [ BWS ";" extensions ]: extensions are ignored.
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = parse_hex(digits.trim_ascii_end())
                        .ok_or_else(|| bad("invalid chunk size"))?;
                    buf.advance(end + 1);
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    if *left == 0 {
                        *self = Chunked::DataEnd;
                    }
                    return Ok(Some(Step::Data(buf.split_to(take).freeze())));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(bad("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        return Ok(Some(Step::End(None)));
                    }
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if buf.len() > MAX_HEAD {
                            return Err(bad("trailer section too large"));
                        }
                        return Ok(None);
                    };
                    let block = buf.split_to(end + 4);
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let fields = match httparse::parse_headers(&block, &mut slots) {
                        Ok(httparse::Status::Complete((_, fields))) => fields,
                        _ => return Err(bad("malformed trailer section")),
                    };
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for f in fields {
                        let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(f.name.as_bytes()),
                            HeaderValue::from_bytes(f.value),
                        ) else {
                            return Err(bad("malformed trailer field"));
                        };
                        trailers.append(name, value);
                    }
                    return Ok(Some(Step::End(Some(trailers))));
                }
            }
        }
    }
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    // Leading zeros are allowed; at most 15 significant digits, which a u64 holds with room.
    let first = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len() - 1);
    let digits = &digits[first..];
    if digits.len() > 15 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        Some(n << 4 | u64::from(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::headers;
    use std::time::Duration;

    #[test]
    fn framing_follows_rfc_9112() {
        use Framing::*;
        let v11 = Version::HTTP_11;
        let v10 = Version::HTTP_10;
        // (HEAD request, version, status, headers, expected framing and reusability)
        type Case<'a> = (
            bool,
            Version,
            u16,
            &'a [(&'a str, &'a str)],
            Result<(Framing, bool), &'a str>,
        );
        let cases: &[Case] = &[
            (
                false,
                v11,
                200,
                &[("content-length", "5")],
                Ok((Length(5), true)),
            ),
            (
                false,
                v11,
                200,
                &[("content-length", "0")],
                Ok((Length(0), true)),
            ),
            (
                true,
                v11,
                200,
                &[("content-length", "5")],
                Ok((Empty, true)),
            ),
            (false, v11, 204, &[], Ok((Empty, true))),
            (
                false,
                v11,
                304,
                &[("content-length", "5")],
                Ok((Empty, true)),
            ),
            (false, v11, 200, &[], Ok((UntilClose, false))),
            (
                false,
                v11,
                200,
                &[("transfer-encoding", "chunked")],
                Ok((Chunked, true)),
            ),
            (
                false,
                v11,
                200,
                &[("transfer-encoding", "gzip, Chunked")],
                Ok((Chunked, true)),
            ),
            (
                false,
                v11,
                200,
                &[("transfer-encoding", "chunked, gzip")],
                Ok((UntilClose, false)),
            ),
            // Transfer-Encoding overrides Content-Length, and the connection is not reused.
            (
                false,
                v11,
                200,
                &[("transfer-encoding", "chunked"), ("content-length", "3")],
                Ok((Chunked, false)),
            ),
            (
                false,
                v11,
                200,
                &[("content-length", "5, 5")],
                Ok((Length(5), true)),
            ),
            (
                false,
                v11,
                200,
                &[("content-length", "5"), ("content-length", "6")],
                Err("conflicting content-length values"),
            ),
            (
                false,
                v11,
                200,
                &[("content-length", "-1")],
                Err("invalid content-length"),
            ),
            (
                false,
                v11,
                200,
                &[("content-length", "5x")],
                Err("invalid content-length"),
            ),
            (
                false,
                v11,
                200,
                &[("content-length", "99999999999999999999")],
                Err("invalid content-length"),
            ),
            (
                false,
                v11,
                200,
                &[("content-length", "5"), ("connection", "close")],
                Ok((Length(5), false)),
            ),
            (
                false,
                v11,
                200,
                &[("content-length", "5"), ("connection", "foo, Close")],
                Ok((Length(5), false)),
            ),
            (
                false,
                v10,
                200,
                &[("content-length", "5")],
                Ok((Length(5), false)),
            ),
            (
                false,
                v10,
                200,
                &[("content-length", "5"), ("connection", "keep-alive")],
                Ok((Length(5), true)),
            ),
            (
                false,
                v10,
                200,
                &[
                    ("transfer-encoding", "chunked"),
                    ("connection", "keep-alive"),
                ],
                Err("transfer-encoding in an HTTP/1.0 response"),
            ),
        ];
        for (head, version, status, h, want) in cases {
            let got = framing(
                *head,
                *version,
                StatusCode::from_u16(*status).unwrap(),
                &headers(h),
            );
            assert_eq!(got, *want, "HEAD={head} {version:?} {status} {h:?}");
        }
    }

    /// Feeds `input` to the decoder `split` bytes at a time; returns the data, the trailers,
    /// or the error.
    fn decode(input: &[u8], split: usize) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
        let mut c = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for piece in input.chunks(split) {
            buf.extend_from_slice(piece);
            loop {
                match c.step(&mut buf).map_err(|e| e.to_string())? {
                    Some(Step::Data(d)) => data.extend_from_slice(&d),
                    Some(Step::End(t)) => {
                        assert!(buf.is_empty(), "bytes left after the body");
                        return Ok((data, t));
                    }
                    None => break,
                }
            }
        }
        Err("incomplete".into())
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        let with_trailers = b"3\r\nabc\r\nA \r\n0123456789\r\n0\r\nx-sum: 42\r\nx-b: 1\r\n\r\n";
        for split in [1, 2, 3, 7, 1000] {
            let (data, t) = decode(body, split).unwrap();
            assert_eq!(data, b"hello, world", "split {split}");
            assert!(t.is_none());
            let (data, t) = decode(with_trailers, split).unwrap();
            assert_eq!(data, b"abc0123456789", "split {split}");
            let t = t.unwrap();
            assert_eq!(t["x-sum"], "42");
            assert_eq!(t["x-b"], "1");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        let cases: &[(&[u8], &str)] = &[
            (b"z\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
            (b"5\nhello\r\n0\r\n\r\n", "not ended by CRLF"),
            (b"5\r\nhelloXX0\r\n\r\n", "not followed by CRLF"),
            (b"\r\n", "invalid chunk size"),
            (b"1000000000000000\r\n", "invalid chunk size"),
            (b"-5\r\nhello\r\n", "invalid chunk size"),
            (b"0\r\nbad header\r\n\r\n", "malformed trailer"),
        ];
        for (input, want) in cases {
            let err = decode(input, 1000).unwrap_err();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(input)
            );
        }
        let long = [b'1'; MAX_CHUNK_LINE + 1];
        assert!(decode(&long, 1000).unwrap_err().contains("too long"));
        // A line too long is refused even when its end arrives in the same read.
        let mut long_ext = b"5;".to_vec();
        long_ext.resize(MAX_CHUNK_LINE + 10, b'x');
        long_ext.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert!(decode(&long_ext, 100_000).unwrap_err().contains("too long"));
        // Leading zeros are only zeros.
        let zeros = b"0000000000000000005\r\nhello\r\n0\r\n\r\n";
        assert_eq!(decode(zeros, 1000).unwrap().0, b"hello");
    }

    #[test]
    fn response_heads_parse_into_shared_headers() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nX-A: 1\r\nx-a: 2\r\n\r\nabc"[..],
        );
        let (version, status, h) = parse_response(&mut buf, &mut Vec::new()).unwrap().unwrap();
        assert_eq!((version, status), (Version::HTTP_11, StatusCode::NOT_FOUND));
        assert_eq!(h["content-length"], "3");
        let xa: Vec<_> = h.get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        assert_eq!(&buf[..], b"abc", "the body stays in the buffer");

        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Len"[..]);
        assert!(
            parse_response(&mut partial, &mut Vec::new())
                .unwrap()
                .is_none()
        );
        assert_eq!(
            &partial[..],
            b"HTTP/1.1 200 OK\r\nContent-Len",
            "nothing consumed"
        );

        for bad in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"SMTP 220\r\n\r\n",
        ] {
            let mut b = BytesMut::from(bad);
            assert!(
                parse_response(&mut b, &mut Vec::new()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Polls `conn.is_usable()` after spending the task's cooperative budget in the same poll.
    async fn usable_with_budget_spent(conn: &mut Conn) -> bool {
        std::future::poll_fn(|cx| {
            while std::pin::pin!(tokio::task::consume_budget())
                .poll(cx)
                .is_ready()
            {}
            Poll::Ready(conn.is_usable())
        })
        .await
    }

    #[tokio::test]
    async fn a_connection_back_in_the_pool_holds_no_read_buffer() {
        use http_body_util::BodyExt;
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .await
                .unwrap();
            s
        });
        let conn = Conn::new(Upstream::Plain(
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        ));
        let resp = conn
            .send(&Method::GET, &Uri::from_static("/"), &HeaderMap::new())
            .await
            .unwrap();
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(got, b"hello");
        let pooled = body.take_reusable().expect("reusable after the whole body");
        assert_eq!(
            pooled.buf.capacity(),
            0,
            "an idle connection keeps no read buffer"
        );
        drop(upstream.await.unwrap());
    }

    #[tokio::test]
    async fn pooled_connections_are_checked_even_with_the_budget_spent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_kept, _) = listener.accept().await.unwrap();
        let closed = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        drop(peer);
        // Let the runtime see the close.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut open = Conn::new(Upstream::Plain(open));
        let mut closed = Conn::new(Upstream::Plain(closed));
        assert!(usable_with_budget_spent(&mut open).await);
        assert!(!usable_with_budget_spent(&mut closed).await);
    }

    #[test]
    fn request_heads_are_origin_form_with_length_when_expected() {
        let h = headers(&[("host", "a.example"), ("x-b", "1")]);
        let mut out = Vec::new();
        encode_request(&Method::GET, &Uri::from_static("/p?q=1"), &h, &mut out);
        assert_eq!(
            out,
            b"GET /p?q=1 HTTP/1.1\r\nhost: a.example\r\nx-b: 1\r\n\r\n"
        );
        out.clear();
        encode_request(&Method::POST, &Uri::from_static("/"), &h, &mut out);
        assert!(out.ends_with(b"x-b: 1\r\ncontent-length: 0\r\n\r\n"));
        out.clear();
        encode_request(
            &Method::OPTIONS,
            &Uri::from_static("*"),
            &HeaderMap::new(),
            &mut out,
        );
        assert_eq!(out, b"OPTIONS * HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn idle_allowed_reads_keep_alive_timeout_less_a_margin() {
        let s = |n| Some(Duration::from_secs(n));
        let ms = |n| Some(Duration::from_millis(n));
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<Duration>);
        let cases: &[Case] = &[
            (&[], None),
            (&[("keep-alive", "timeout=5")], s(4)),
            (&[("keep-alive", "timeout=5, max=1000")], s(4)),
            (&[("keep-alive", "max=1000,Timeout = 30")], s(29)),
            (&[("keep-alive", "timeout=\"5\"")], s(4)),
            // Under two seconds, half of it is the margin.
            (&[("keep-alive", "timeout=2")], s(1)),
            (&[("keep-alive", "timeout=1")], ms(500)),
            (&[("keep-alive", "timeout=0")], s(0)),
            (
                &[("keep-alive", "timeout=5"), ("keep-alive", "timeout=3")],
                s(2),
            ),
            // Nothing readable: no limit of the upstream's own.
            (&[("keep-alive", "timeout=")], None),
            (&[("keep-alive", "timeout=-3")], None),
            (&[("keep-alive", "timeout=3s")], None),
            (&[("keep-alive", "timeout=\"3")], None),
            (&[("keep-alive", "timeout=99999999999999999999")], None),
            (&[("keep-alive", "max=5")], None),
            (&[("connection", "keep-alive")], None),
        ];
        for (h, want) in cases {
            assert_eq!(idle_allowed(&headers(h)), *want, "{h:?}");
        }
    }
}

/// Property tests: the parsers never panic, and what they make of a byte stream does not
/// depend on how it was split into reads.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// What the chunked decoder made of a stream: the data, the trailers and how many bytes
    /// it consumed, or its error, or `None` when it wanted more.
    type Decoded = Option<Result<(Vec<u8>, Option<HeaderMap>, usize), String>>;

    /// Feeds `input` in pieces of the given sizes (cycled; 0 counts as 1).
    fn decode_in(input: &[u8], sizes: &[usize]) -> Decoded {
        let mut c = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let (mut fed, mut sizes) = (0, sizes.iter().cycle());
        while fed < input.len() {
            let n = sizes.next().map_or(input.len(), |&n| n.max(1));
            let piece = &input[fed..input.len().min(fed + n)];
            fed += piece.len();
            buf.extend_from_slice(piece);
            loop {
                match c.step(&mut buf) {
                    Err(e) => return Some(Err(e.to_string())),
                    Ok(Some(Step::Data(d))) => data.extend_from_slice(&d),
                    Ok(Some(Step::End(t))) => return Some(Ok((data, t, fed - buf.len()))),
                    Ok(None) => break,
                }
            }
        }
        None
    }

    /// A chunked body of these chunks (with an extension on some) and trailers.
    fn chunked_body(chunks: &[Vec<u8>], trailers: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let ext = if i % 2 == 1 { ";x=1" } else { "" };
            out.extend_from_slice(format!("{:X}{ext}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for (n, v) in trailers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    fn chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..6)
    }

    fn fields() -> impl Strategy<Value = Vec<(String, String)>> {
        prop::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,12}"), 0..4).prop_map(|v| {
            v.into_iter()
                .map(|(n, v)| (n, v.trim().to_string()))
                .collect()
        })
    }

    /// Valid streams, the same damaged at one byte or cut short, and plain noise.
    fn chunked_stream() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
        prop_oneof![
            (chunks(), fields()).prop_map(|(c, t)| (chunked_body(&c, &t), Some(c.concat()))),
            (
                chunks(),
                fields(),
                any::<prop::sample::Index>(),
                any::<u8>()
            )
                .prop_map(|(c, t, at, b)| {
                    let mut body = chunked_body(&c, &t);
                    let i = at.index(body.len());
                    body[i] = b;
                    (body, None)
                }),
            (chunks(), any::<prop::sample::Index>()).prop_map(|(c, at)| {
                let body = chunked_body(&c, &[]);
                (body[..at.index(body.len())].to_vec(), None)
            }),
            prop::collection::vec(any::<u8>(), 0..200).prop_map(|b| (b, None)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn chunked_decoding_does_not_depend_on_the_reads(
            (stream, data) in chunked_stream(),
            sizes in prop::collection::vec(0usize..16, 1..8),
        ) {
            let whole = decode_in(&stream, &[stream.len()]);
            let split = decode_in(&stream, &sizes);
            prop_assert_eq!(&split, &whole);
            let one_byte = decode_in(&stream, &[1]);
            prop_assert_eq!(&one_byte, &whole);
            if let Some(data) = data {
                // A valid body decodes to its chunks, consuming all of it.
                let Some(Ok((got, _, consumed))) = whole else {
                    return Err(TestCaseError::fail(format!("not decoded: {whole:?}")));
                };
                prop_assert_eq!(got, data);
                prop_assert_eq!(consumed, stream.len());
            }
        }
    }

    /// What the response-head parser made of a stream: the head and the bytes left after
    /// it, or its error, or `None` while it wanted more.
    type Parsed = Result<Option<(Version, StatusCode, HeaderMap, Vec<u8>)>, String>;

    fn parse_in(input: &[u8], sizes: &[usize]) -> Parsed {
        let (mut buf, mut fields) = (BytesMut::new(), Vec::new());
        let (mut fed, mut sizes) = (0, sizes.iter().cycle());
        while fed < input.len() {
            let n = sizes.next().map_or(input.len(), |&n| n.max(1));
            let piece = &input[fed..input.len().min(fed + n)];
            fed += piece.len();
            buf.extend_from_slice(piece);
            match parse_response(&mut buf, &mut fields) {
                Ok(None) => {}
                Ok(Some((v, s, h))) => {
                    // The parser leaves what follows the head in the buffer.
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&input[fed..]);
                    return Ok(Some((v, s, h, rest)));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(None)
    }

    fn response_head() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0")],
            100u16..1000,
            "[A-Za-z ]{0,12}",
            fields(),
            prop::collection::vec(any::<u8>(), 0..20),
        )
            .prop_map(|(version, status, reason, fields, body)| {
                let mut out = format!("{version} {status} {reason}\r\n").into_bytes();
                for (n, v) in fields {
                    out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&body);
                out
            })
    }

    fn response_stream() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            response_head(),
            (response_head(), any::<prop::sample::Index>(), any::<u8>()).prop_map(
                |(mut head, at, b)| {
                    let i = at.index(head.len());
                    head[i] = b;
                    head
                }
            ),
            prop::collection::vec(any::<u8>(), 0..200),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn response_heads_parse_the_same_however_they_are_split(
            stream in response_stream(),
            sizes in prop::collection::vec(0usize..16, 1..8),
        ) {
            let whole = parse_in(&stream, &[stream.len()]);
            prop_assert_eq!(&parse_in(&stream, &sizes), &whole);
            prop_assert_eq!(&parse_in(&stream, &[1]), &whole);
        }
    }
}
