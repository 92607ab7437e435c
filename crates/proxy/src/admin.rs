//! The admin listener: `/live`, `/ready`, `/config`, `/endpoints`, `/metrics` and
//! `POST /explain`. It runs on its own
//! single-threaded runtime and thread so that scrapes never compete with the data path.

use crate::body::{self, Body};
use crate::server::Shared;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;

/// Admin state beyond the shared proxy state.
pub struct AdminState {
    /// Set once listeners are bound for an accepted config.
    pub ready: AtomicBool,
}

/// Starts the admin server on its own thread; returns the bound address.
pub fn spawn(
    shared: Arc<Shared>,
    state: Arc<AdminState>,
    std_listener: std::net::TcpListener,
    stop: CancellationToken,
) -> std::io::Result<std::net::SocketAddr> {
    let addr = std_listener.local_addr()?;
    std_listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("trellis-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin runtime failed to start");
                    return;
                }
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                    return;
                };
                loop {
                    let (stream, _) = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    };
                    let (shared, state) = (shared.clone(), state.clone());
                    tokio::spawn(async move {
                        let svc =
                            service_fn(move |req| respond(shared.clone(), state.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        })?;
    Ok(addr)
}

async fn respond(
    shared: Arc<Shared>,
    state: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let text = |status: StatusCode, ct: &'static str, b: String| {
        let mut r = Response::new(body::full(b));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
        r
    };
    if req.method() == Method::POST && req.uri().path() == "/explain" {
        let (status, body) = explain(&shared, req.into_body()).await;
        return Ok(text(status, "application/json", body));
    }
    if req.method() != Method::GET {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/live" => text(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => {
            if state.ready.load(Ordering::Acquire) && !shared.draining.is_cancelled() {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                )
            }
        }
        "/metrics" => {
            crate::outlier::refresh_gauges(&shared);
            crate::breaker::refresh_gauges(&shared);
            // OpenMetrics (with exemplars) for who asks for it, else Prometheus text 0.0.4.
            let accept = req.headers().get(header::ACCEPT);
            if crate::golden::wants_openmetrics(accept.and_then(|v| v.to_str().ok())) {
                let body = shared.metrics.encode();
                text(StatusCode::OK, crate::golden::OPENMETRICS, body)
            } else {
                let body = shared.metrics.encode_text();
                text(StatusCode::OK, crate::golden::PROMETHEUS_TEXT, body)
            }
        }
        "/endpoints" => text(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&crate::outlier::endpoints_view(&shared.snapshot()))
                .unwrap_or_default(),
        ),
        "/config" => text(
            StatusCode::OK,
            "application/json",
            config(&shared.snapshot()),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /live, /ready, /config, /endpoints, /metrics or POST /explain\n".into(),
        ),
    })
}

/// Largest explain request body.
const EXPLAIN_BODY: usize = 64 * 1024;

/// `POST /explain`: the body is an [`crate::explain::Ask`]; the answer its explanation
/// against the current snapshot, or `{"error": ...}`.
async fn explain(shared: &Shared, body: Incoming) -> (StatusCode, String) {
    use http_body_util::BodyExt;
    let bad = |status, why: String| (status, serde_json::json!({ "error": why }).to_string());
    let bytes = match http_body_util::Limited::new(body, EXPLAIN_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return bad(
                StatusCode::BAD_REQUEST,
                format!("body (at most {EXPLAIN_BODY} bytes): {e}"),
            );
        }
    };
    let ask: crate::explain::Ask = match serde_json::from_slice(&bytes) {
        Ok(a) => a,
        Err(e) => return bad(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    match crate::explain::explain(
        &shared.snapshot(),
        &ask,
        tokio::time::Instant::now(),
        jiff::Timestamp::now(),
    ) {
        Ok(v) => (
            StatusCode::OK,
            serde_json::to_string_pretty(&v).unwrap_or_default(),
        ),
        Err(e) => bad(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

/// The `/config` document, pretty-printed straight from the snapshot's JSON texts: parsing
/// them into a `serde_json::Value` first would take ~50 MB for a config of 3,000 resources.
/// The held set's packed texts are inflated for this and dropped after.
fn config(snap: &crate::snapshot::Snapshot) -> String {
    use crate::snapshot::ConfigText;
    // Each packed set inflated once, however many ranges of it the view has.
    let mut unpacked: Vec<(
        &std::sync::Arc<crate::packed::Packed>,
        crate::packed::Unpacked,
    )> = Vec::new();
    for c in &snap.config {
        if let ConfigText::Packed(set, _) = c
            && !unpacked.iter().any(|(s, _)| std::sync::Arc::ptr_eq(s, set))
        {
            unpacked.push((set, set.unpack()));
        }
    }
    let mut texts: Vec<&str> = Vec::new();
    for c in &snap.config {
        match c {
            ConfigText::Own(t) => texts.push(t),
            ConfigText::Packed(set, range) => {
                let inflated = unpacked
                    .iter()
                    .find(|(s, _)| std::sync::Arc::ptr_eq(s, set))
                    .map(|(_, u)| u.iter().skip(range.start).take(range.len()));
                texts.extend(inflated.into_iter().flatten());
            }
        }
    }
    let size: usize = texts.iter().map(|r| r.len() + 1).sum();
    let mut out = String::with_capacity(size * 2);
    out.push_str("{\n  \"resources\": ");
    // The array is laid out from its parts; it is never joined into one string.
    let parts = texts.iter().enumerate().flat_map(|(i, r)| {
        let comma = (i > 0).then_some(',');
        comma.into_iter().chain(r.chars())
    });
    let array = std::iter::once('[')
        .chain(parts)
        .chain(std::iter::once(']'));
    indent(array, 1, &mut out);
    out.push_str(",\n  \"source\": ");
    out.push_str(&serde_json::to_string(&snap.source).unwrap_or_default());
    out.push_str(&format!(",\n  \"version\": {}\n}}", snap.version));
    out
}

/// Appends compact JSON `json` to `out` laid out as `serde_json::to_string_pretty` does
/// (two spaces per level, empty arrays and objects kept as `[]` and `{}`), starting at
/// nesting `level`.
fn indent(json: impl Iterator<Item = char>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        out.push('\n');
        for _ in 0..level {
            out.push_str("  ");
        }
    };
    let mut level = level;
    let mut chars = json.peekable();
    let (mut in_string, mut escaped) = (false, false);
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                let close = if c == '{' { '}' } else { ']' };
                if chars.peek() == Some(&close) {
                    out.push(close);
                    chars.next();
                } else {
                    level += 1;
                    newline(out, level);
                }
            }
            '}' | ']' => {
                level = level.saturating_sub(1);
                newline(out, level);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(out, level);
            }
            ':' => out.push_str(": "),
            _ => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indent_lays_out_compact_json_as_serde_json_pretty_does() {
        let docs = [
            r#"[]"#,
            r#"{}"#,
            r#"[1,2.5,-3,true,false,null]"#,
            r#"[{"a":{},"b":[],"c":[{}],"d":[[]]}]"#,
            r#"{"k":"a \"quoted\", [braced] {text}: with, commas","e":"\\","u":"ümlaut \u0001"}"#,
            r#"[{"apiVersion":"v1","kind":"Service","spec":{"ports":[{"port":80}],"endpoints":[]}}]"#,
        ];
        for doc in docs {
            let value: serde_json::Value = serde_json::from_str(doc).unwrap();
            let compact = serde_json::to_string(&value).unwrap();
            let mut got = String::new();
            indent(compact.chars(), 0, &mut got);
            assert_eq!(got, serde_json::to_string_pretty(&value).unwrap(), "{doc}");
        }
    }

    #[test]
    fn config_document_keeps_its_fields() {
        let mut snap = crate::snapshot::Snapshot::empty();
        snap.version = 7;
        snap.source = "a \"file\"".into();
        snap.config = vec![
            r#"{"kind":"Proxy","spec":{"inbound":[]}}"#.into(),
            r#"{"kind":"Service","spec":{"ports":[{"port":80}]}}"#.into(),
        ];
        let text = config(&snap);
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let want = serde_json::json!({
            "resources": [
                {"kind": "Proxy", "spec": {"inbound": []}},
                {"kind": "Service", "spec": {"ports": [{"port": 80}]}},
            ],
            "source": "a \"file\"",
            "version": 7,
        });
        assert_eq!(doc, want);
        assert_eq!(text, serde_json::to_string_pretty(&want).unwrap());
        snap.config = vec![];
        let doc: serde_json::Value = serde_json::from_str(&config(&snap)).unwrap();
        assert_eq!(doc["resources"], serde_json::json!([]));
    }

    /// Texts from the held set's packed view render exactly as the same texts of their own.
    #[test]
    fn config_document_is_the_same_from_packed_texts() {
        use crate::packed::Packed;
        use crate::snapshot::ConfigText;
        use std::sync::Arc;
        let texts = [
            r#"{"kind":"Proxy","spec":{"inbound":[]}}"#,
            r#"{"kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":80}]}}"#,
            r#"{"kind":"HTTPRoute","spec":{"rules":[{"matches":[{"path":"/ü \"x\""}]}]}}"#,
            r#"{"kind":"Service","metadata":{"name":"placeholder"},"spec":{}}"#,
        ];
        let mut own = crate::snapshot::Snapshot::empty();
        own.version = 3;
        own.source = "control-plane".into();
        own.config = texts.iter().map(|&t| t.into()).collect();
        let want = config(&own);
        let packed = Arc::new(Packed::pack(texts[1..3].iter().copied()));
        let layouts = [
            vec![
                texts[0].into(),
                ConfigText::Packed(packed.clone(), 0..2),
                texts[3].into(),
            ],
            vec![
                texts[0].into(),
                ConfigText::Packed(packed.clone(), 0..1),
                ConfigText::Packed(packed.clone(), 1..2),
                texts[3].into(),
            ],
        ];
        for layout in layouts {
            let mut snap = crate::snapshot::Snapshot::empty();
            snap.version = 3;
            snap.source = "control-plane".into();
            snap.config = layout;
            assert_eq!(config(&snap), want, "{:?}", snap.config);
        }
    }
}
