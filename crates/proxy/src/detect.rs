//! Protocol detection from a connection's first bytes: HTTP/2 prior knowledge, HTTP/1.x, or
//! opaque TCP. A client that sends nothing within the detect timeout is treated as TCP, so a
//! server-speaks-first protocol is delayed by at most that timeout; on an inbound port whose
//! policy needs HTTP, the server refuses what this calls TCP instead of forwarding it.

use bytes::BytesMut;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest request line we wait for before calling the stream opaque.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// A detection outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or 1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// Anything else.
    Tcp,
}

/// Classifies the bytes read so far; `None` means more bytes are needed to decide.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // Method: an HTTP token, then a space.
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let method_end = match buf.iter().position(|b| !token(*b)) {
        None => {
            return if buf.len() < 32 {
                None
            } else {
                Some(Protocol::Tcp)
            };
        }
        Some(0) => return Some(Protocol::Tcp),
        Some(i) if buf[i] != b' ' => return Some(Protocol::Tcp),
        Some(i) => i,
    };
    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
        return (buf.len() > MAX_REQUEST_LINE).then_some(Protocol::Tcp);
    };
    let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
    let rest = &line[method_end + 1..];
    let ok = rest
        .rsplit(|b| *b == b' ')
        .next()
        .is_some_and(|v| v == b"HTTP/1.1" || v == b"HTTP/1.0")
        && rest.len() > "HTTP/1.1".len() + 1;
    Some(if ok { Protocol::Http1 } else { Protocol::Tcp })
}

/// Why bytes classified as not HTTP are refused where HTTP is required, for metrics.
pub fn not_http_reason(buf: &[u8]) -> &'static str {
    if buf.len() > MAX_REQUEST_LINE && !buf.contains(&b'\n') {
        "request_line_too_long"
    } else {
        "not_http"
    }
}

/// Reads until the protocol is known or `timeout` passes. Returns the protocol, the bytes
/// read (to replay) and whether the timeout decided.
pub async fn detect(
    io: &mut (impl tokio::io::AsyncRead + Unpin),
    mut buf: BytesMut,
    timeout: Duration,
) -> std::io::Result<(Protocol, BytesMut, bool)> {
    if let Some(p) = classify(&buf) {
        return Ok((p, buf, false));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => return Ok((Protocol::Tcp, buf, true)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok((classify(&buf).unwrap_or(Protocol::Tcp), buf, false)),
            Ok(Ok(_)) => {
                if let Some(p) = classify(&buf) {
                    return Ok((p, buf, false));
                }
                if buf.capacity() == buf.len() {
                    buf.reserve(buf.len());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"GET / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (
                b"POST /x?y=1 HTTP/1.0\r\nHost: a\r\n",
                Some(Protocol::Http1),
            ),
            (b"GET / HTTP/1.1\n", Some(Protocol::Http1)),
            (b"GET /", None),
            (b"GE", None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Protocol::Http2)),
            (b"PRI * HTTP/2.0\r\n", None),
            (b"\x16\x03\x01\x02\x00", Some(Protocol::Tcp)), // TLS ClientHello
            (b"SSH-2.0-OpenSSH\r\n", Some(Protocol::Tcp)),
            (b"GET / HTTP/2.0\r\n", Some(Protocol::Tcp)),
            (b"hello world\n", Some(Protocol::Tcp)),
            (b"*2\r\n$3\r\nGET\r\n", Some(Protocol::Tcp)), // Redis
            (b"PING\r\n", Some(Protocol::Tcp)),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                classify(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn endless_token_is_tcp() {
        assert_eq!(classify(&[b'A'; 40]), Some(Protocol::Tcp));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// Whatever a client sends first, classification answers without panicking, and growing
    /// input never flips a decided HTTP/2 or HTTP/1 verdict to "need more".
    #[test]
    fn arbitrary_bytes_never_panic() {
        let alphabet = b"GETPOSTHTTP/1.1 \r\n:PRI*SM\x00\xff\x16abc";
        for _ in 0..20_000 {
            let len = crate::rand::below(64) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    if crate::rand::below(2) == 0 {
                        alphabet[crate::rand::below(alphabet.len() as u64) as usize]
                    } else {
                        crate::rand::u64() as u8
                    }
                })
                .collect();
            if let Some(p) = classify(&buf) {
                let mut longer = buf.clone();
                longer.extend_from_slice(b"\r\nmore");
                assert_eq!(
                    classify(&longer),
                    Some(p),
                    "{:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
        }
    }
}
