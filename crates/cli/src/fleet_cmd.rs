//! `trellis stat`, `top`, `edges` and `tap`: the control plane's fleet view, as tables or
//! JSON.

use crate::client::Api;
use anyhow::Result;
use std::io::{IsTerminal, Write};
use std::time::Duration;
use trellis_control::fleet::{EdgeRow, StatRow, StatsView, TapEvent, TapLine};

/// Output of the fleet commands.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// What `stat`, `top` and `edges` select.
pub struct Select {
    pub window: Duration,
    pub namespace: Option<String>,
    pub service: Option<String>,
    pub route: Option<String>,
}

/// A query string from pairs, skipping empty values.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            v.as_ref()
                .filter(|v| !v.is_empty())
                .map(|v| format!("{k}={}", encode(v)))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn view(api: &Api, s: &Select) -> Result<StatsView> {
    let path = format!(
        "/v1/stats{}",
        query(&[
            ("window", Some(format!("{}s", s.window.as_secs().max(1)))),
            ("namespace", s.namespace.clone()),
            ("service", s.service.clone()),
            ("route", s.route.clone()),
        ])
    );
    api.get(&path).await
}

fn rate(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{:.2}%", r * 100.0))
}

fn millis(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}ms"))
}

/// Left-aligned columns, two spaces apart.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn stat_rows(rows: &[StatRow], services: bool) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| {
            let mut row = vec![r.namespace.clone(), r.name.clone()];
            if services {
                row.push(r.proxies.to_string());
            } else {
                row.push(r.backend.clone());
            }
            row.extend([
                rate(r.success_rate),
                format!("{:.1}", r.rps),
                millis(r.p50_ms),
                millis(r.p95_ms),
                millis(r.p99_ms),
            ]);
            row
        })
        .collect()
}

/// The tables of `stat` and of one `top` frame.
fn stat_text(v: &StatsView) -> String {
    let mut out = String::new();
    if v.services.is_empty() && v.routes.is_empty() {
        out.push_str(&format!(
            "no traffic reported in the last {}s ({} proxies reporting)\n",
            v.window_seconds, v.proxies
        ));
        return out;
    }
    if !v.services.is_empty() {
        out.push_str(&table(
            &[
                "NAMESPACE",
                "SERVICE",
                "PROXIES",
                "SUCCESS",
                "RPS",
                "P50",
                "P95",
                "P99",
            ],
            &stat_rows(&v.services, true),
        ));
    }
    if !v.routes.is_empty() {
        if !v.services.is_empty() {
            out.push('\n');
        }
        out.push_str(&table(
            &[
                "NAMESPACE",
                "ROUTE",
                "BACKEND",
                "SUCCESS",
                "RPS",
                "P50",
                "P95",
                "P99",
            ],
            &stat_rows(&v.routes, false),
        ));
    }
    out
}

/// `trellis stat`.
pub async fn stat(api: &Api, s: &Select, format: Format) -> Result<i32> {
    let v = view(api, s).await?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Format::Table => print!("{}", stat_text(&v)),
    }
    Ok(0)
}

/// `trellis top`: a frame every `interval`, redrawn in place on a terminal; one frame with
/// `once` or when stdout is not a terminal.
pub async fn top(api: &Api, s: &Select, interval: Duration, once: bool) -> Result<i32> {
    let live = !once && std::io::stdout().is_terminal();
    loop {
        let mut v = view(api, s).await?;
        // Busiest first.
        v.services.sort_by(|a, b| b.rps.total_cmp(&a.rps));
        v.routes.sort_by(|a, b| b.rps.total_cmp(&a.rps));
        let frame = format!(
            "trellis top: {} proxies, last {}s, every {}s\n\n{}",
            v.proxies,
            v.window_seconds,
            interval.as_secs_f64(),
            stat_text(&v)
        );
        let mut out = std::io::stdout().lock();
        if live {
            // Home and clear, then the frame.
            write!(out, "\x1b[H\x1b[2J{frame}")?;
        } else {
            write!(out, "{frame}")?;
        }
        out.flush()?;
        if !live {
            return Ok(0);
        }
        drop(out);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = crate::shutdown_signal() => return Ok(0),
        }
    }
}

fn edge_rows(edges: &[EdgeRow]) -> Vec<Vec<String>> {
    let name = |ns: &str, svc: &str| {
        if svc.is_empty() {
            "(unidentified)".to_string()
        } else {
            format!("{ns}/{svc}")
        }
    };
    edges
        .iter()
        .map(|e| {
            vec![
                name(&e.src_namespace, &e.src_service),
                name(&e.dst_namespace, &e.dst_service),
                e.requests.to_string(),
                rate(e.success_rate),
                if e.mtls { "yes" } else { "no" }.to_string(),
                if e.src_identity.is_empty() {
                    "-".into()
                } else {
                    e.src_identity.clone()
                },
                if e.dst_identity.is_empty() {
                    "-".into()
                } else {
                    e.dst_identity.clone()
                },
            ]
        })
        .collect()
}

/// `trellis edges`.
pub async fn edges(api: &Api, s: &Select, format: Format) -> Result<i32> {
    let v = view(api, s).await?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&v.edges)?),
        Format::Table if v.edges.is_empty() => {
            println!("no traffic reported in the last {}s", v.window_seconds)
        }
        Format::Table => print!(
            "{}",
            table(
                &[
                    "SRC",
                    "DST",
                    "REQUESTS",
                    "SUCCESS",
                    "MTLS",
                    "SRC_IDENTITY",
                    "DST_IDENTITY"
                ],
                &edge_rows(&v.edges)
            )
        ),
    }
    Ok(0)
}

/// What `trellis tap` asks for.
pub struct TapArgs {
    pub namespace: Option<String>,
    pub service: Option<String>,
    pub route: Option<String>,
    pub path: Option<String>,
    pub method: Option<String>,
    pub status: Option<String>,
    pub direction: Option<String>,
    pub show_headers: bool,
    pub redact: Vec<String>,
    pub max: u64,
    pub duration: Duration,
}

fn event_line(e: &TapEvent) -> String {
    let time = trellis_control::config::rfc3339(u64::try_from(e.time_unix_ms / 1000).unwrap_or(0));
    let mut line = format!(
        "{time} {dir:<3} {proxy} {method} {authority}{path} :status={status}",
        dir = if e.direction == "inbound" {
            "in"
        } else {
            "out"
        },
        proxy = e.proxy,
        method = e.method,
        authority = e.authority,
        path = e.path,
        status = e.status,
    );
    if !e.grpc_status.is_empty() {
        line.push_str(&format!(" grpc-status={}", e.grpc_status));
    }
    line.push_str(&format!(" latency={:.2}ms", e.latency_ms));
    if !e.route.is_empty() {
        line.push_str(&format!(" route={}", e.route));
    }
    if !e.endpoint.is_empty() {
        line.push_str(&format!(" endpoint={}", e.endpoint));
    }
    line.push_str(&format!(" tls={}", e.tls));
    if !e.src_identity.is_empty() {
        line.push_str(&format!(" src={}", e.src_identity));
    }
    if !e.dst_identity.is_empty() {
        line.push_str(&format!(" dst={}", e.dst_identity));
    }
    for (k, v) in &e.headers {
        line.push_str(&format!(" {k}={v:?}"));
    }
    // For `trellis explain --request-id`.
    if !e.request_id.is_empty() {
        line.push_str(&format!(" id={}", e.request_id));
    }
    line
}

/// `trellis tap`: prints events until the tap ends by itself (`max` events or `duration`).
pub async fn tap(api: &Api, a: TapArgs, format: Format) -> Result<i32> {
    let path = format!(
        "/v1/tap{}",
        query(&[
            ("namespace", a.namespace),
            ("service", a.service),
            ("route", a.route),
            ("path", a.path),
            ("method", a.method),
            ("status", a.status),
            ("direction", a.direction),
            ("headers", a.show_headers.then(|| "true".to_string())),
            ("redact", Some(a.redact.join(","))),
            ("max", Some(a.max.to_string())),
            (
                "duration",
                Some(format!("{}ms", a.duration.as_millis().max(1)))
            ),
        ])
    );
    let mut stdout = std::io::stdout();
    let mut failed = None;
    let stream = api.get_lines(&path, |text| {
        let parsed: Result<TapLine, _> = serde_json::from_str(text);
        let out = match parsed {
            Ok(TapLine::Started { proxies }) => {
                eprintln!("tapping {proxies} proxies (up to {} events)", a.max);
                return true;
            }
            Ok(TapLine::Event(e)) => match format {
                Format::Json => serde_json::to_string(&e).unwrap_or_default(),
                Format::Table => event_line(&e),
            },
            Ok(TapLine::End {
                events,
                dropped,
                reason,
            }) => {
                eprintln!("tap ended ({reason}): {events} events, {dropped} dropped");
                return false;
            }
            Err(e) => {
                failed = Some(format!("unreadable tap line: {e}"));
                return false;
            }
        };
        writeln!(stdout, "{out}").is_ok() && stdout.flush().is_ok()
    });
    tokio::select! {
        r = stream => r?,
        () = crate::shutdown_signal() => {}
    }
    match failed {
        Some(e) => anyhow::bail!(e),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_encode_and_skip_empty_values() {
        assert_eq!(query(&[("a", None), ("b", Some(String::new()))]), "");
        assert_eq!(
            query(&[
                ("path", Some("/a b&c".into())),
                ("service", Some("pay".into()))
            ]),
            "?path=/a%20b%26c&service=pay"
        );
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
