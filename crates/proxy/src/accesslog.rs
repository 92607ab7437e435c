//! Access logs: one JSON line per request, written off the request path. Requests hand a
//! finished [`Entry`] to a bounded queue and never wait; a dedicated thread selects the
//! configured fields, encodes and writes. A slow or stuck disk fills the queue, and further
//! entries are dropped and counted instead of slowing traffic.

use crate::trace::{SpanId, TraceId};
use serde::{Serialize, Serializer};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use tokio::sync::mpsc;

/// What one request did. Field names are those of the JSON line. Values stay typed (times,
/// addresses, shared strings) and are formatted by the writer thread, off the request path.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// When the request arrived, RFC 3339 with microseconds.
    #[serde(serialize_with = "rfc3339")]
    pub start_time: SystemTime,
    /// W3C trace id (32 hex digits), when the request was traced.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "hex")]
    pub trace_id: Option<TraceId>,
    /// This hop's span id (16 hex digits), when the request was traced.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "hex")]
    pub span_id: Option<SpanId>,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The client's address.
    pub client: SocketAddr,
    /// The other side's mesh identity (SPIFFE ID), when it proved one.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_text")]
    pub peer_identity: Option<Arc<str>>,
    /// Method (HTTP only).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "method")]
    pub method: Option<http::Method>,
    /// `Host` / `:authority` (HTTP only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub authority: String,
    /// Path (without the query, which may carry secrets; HTTP only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, or `TCP` for a forwarded connection.
    pub protocol: &'static str,
    /// Status sent to the client (HTTP only).
    #[serde(skip_serializing_if = "is_zero")]
    pub status: u16,
    /// gRPC status, for gRPC calls that ended with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// Route rule id (`namespace/route/rule`), `default` or `inbound` (HTTP only).
    #[serde(skip_serializing_if = "is_empty", serialize_with = "text")]
    pub route: Arc<str>,
    /// Backend (`namespace/service:port`).
    #[serde(serialize_with = "text")]
    pub backend: Arc<str>,
    /// The endpoint that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    /// Why the proxy answered itself or the exchange failed (`no_route`, `denied`,
    /// `upstream_timeout`, ...; see `hop::reason`), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The authorization policy that allowed or denied the request.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_text")]
    pub policy: Option<Arc<str>>,
    /// Request body bytes, as its `content-length` declared (absent when streamed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<u64>,
    /// Response body bytes sent.
    pub response_bytes: u64,
    /// Time from the request's arrival to the upstream's response head, milliseconds
    /// (absent when no upstream answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    /// Time from the request's arrival to the end of its response body, milliseconds.
    pub duration_ms: f64,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            start_time: SystemTime::UNIX_EPOCH,
            trace_id: None,
            span_id: None,
            direction: "",
            client: SocketAddr::from(([0, 0, 0, 0], 0)),
            peer_identity: None,
            method: None,
            authority: String::new(),
            path: String::new(),
            protocol: "",
            status: 0,
            grpc_status: None,
            route: Arc::from(""),
            backend: Arc::from(""),
            upstream: None,
            reason: None,
            policy: None,
            request_bytes: None,
            response_bytes: 0,
            upstream_ms: None,
            duration_ms: 0.0,
        }
    }
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

fn is_empty(s: &Arc<str>) -> bool {
    s.is_empty()
}

fn text<S: Serializer>(t: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t)
}

fn opt_text<S: Serializer>(t: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(t),
        None => s.serialize_none(),
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let text = jiff::Timestamp::try_from(*t)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_default();
    s.serialize_str(&text)
}

fn hex<S: Serializer, const N: usize>(id: &Option<[u8; N]>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_str(&crate::trace::to_hex(id)),
        None => s.serialize_none(),
    }
}

fn method<S: Serializer>(m: &Option<http::Method>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_str(m.as_str()),
        None => s.serialize_none(),
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
        std::thread::Builder::new()
            .name("trellis-access-log".into())
            .spawn(move || write_loop(out, &fields, rx, &c))?;
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
    push_line(&mut out, entry, fields);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `entry`'s JSON line to `out`. Every field is serialized straight into the
/// buffer; only a selection goes through a map, which costs an allocation per field.
fn push_line(out: &mut Vec<u8>, entry: &Entry, fields: &[String]) {
    if fields.is_empty() {
        let _ = serde_json::to_writer(&mut *out, entry);
    } else {
        let mut v = serde_json::to_value(entry).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            map.retain(|k, _| fields.iter().any(|f| f == k));
        }
        let _ = serde_json::to_writer(&mut *out, &v);
    }
    out.push(b'\n');
}

fn write_loop(
    mut out: Box<dyn Write + Send>,
    fields: &[String],
    mut rx: mpsc::Receiver<Entry>,
    counts: &Counts,
) {
    let mut buf = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        // Everything already queued goes out in one write.
        buf.clear();
        let mut n = 1;
        push_line(&mut buf, &first, fields);
        while n < 256 {
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
    }
}

/// The known field names, for validating a field selection.
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
            authority: "catalog".into(),
            path: "/products/1".into(),
            protocol: "HTTP/1.1",
            status,
            route: "shop/catalog/0".into(),
            backend: "shop/catalog:8080".into(),
            upstream: Some("10.0.0.1:8080".parse().unwrap()),
            duration_ms: 1.5,
            ..Entry::default()
        }
    }

    #[test]
    fn every_serialized_field_is_listed_and_selection_keeps_only_those_asked_for() {
        let all = Entry {
            peer_identity: Some("spiffe://x/ns/a/sa/b".into()),
            grpc_status: Some(0),
            span_id: Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]),
            reason: Some("upstream_timeout"),
            policy: Some("shop/allow".into()),
            request_bytes: Some(12),
            upstream_ms: Some(1.0),
            ..entry(200)
        };
        let text = line(&all, &[]);
        assert!(
            text.starts_with(
                "{\"start_time\":\"1970-01-01T00:00:00.000001Z\",\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"span_id\":\"00f067aa0ba902b7\""
            ),
            "{text}"
        );
        assert!(
            text.contains("\"client\":\"127.0.0.1:40000\",\"peer_identity\":\"spiffe://x/ns/a/sa/b\",\"method\":\"GET\"")
                && text.contains("\"upstream\":\"10.0.0.1:8080\""),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        let mut known = FIELDS.to_vec();
        known.sort_unstable();
        assert_eq!(keys, known);
        let some = line(&all, &["status".into(), "trace_id".into()]);
        assert_eq!(
            some,
            "{\"status\":200,\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\"}\n"
        );
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
