//! `trellis check`: is this installation healthy? Each check prints one line (pass, warn or
//! fail) and a hint when it does not pass; any failure makes the exit code 1. The checks are
//! pure functions over what the control plane answers (`GET /v1/health`, `get proxies`),
//! tested beside them.

use crate::client::Api;
use anyhow::Result;
use std::time::Duration;
use trellis_control::ProxyStatus;
use trellis_control::check::{CaHealth, Certificates, Health, StoreHealth};

/// How a check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One check's line.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub status: Status,
    pub name: &'static str,
    pub detail: String,
    /// What to do about it (shown unless it passed).
    pub hint: String,
}

impl Line {
    fn pass(name: &'static str, detail: String) -> Line {
        Line {
            status: Status::Pass,
            name,
            detail,
            hint: String::new(),
        }
    }

    fn not(status: Status, name: &'static str, detail: String, hint: &str) -> Line {
        Line {
            status,
            name,
            detail,
            hint: hint.into(),
        }
    }
}

/// What `trellis check` was asked.
pub struct Options {
    /// The CA may expire no sooner than this without a warning.
    pub ca_warn: Duration,
    /// Most clock skew allowed between this machine and the control plane.
    pub max_skew: Duration,
    /// How long a proxy may be behind the current revision before it counts as stale.
    pub sync_grace: Duration,
}

/// `a` and `b` at human scale: `3d 4h`, `5h 12m`, `42s`.
pub fn human(seconds: i64) -> String {
    let s = seconds.unsigned_abs();
    let text = match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    };
    if seconds < 0 {
        format!("-{text}")
    } else {
        text
    }
}

/// The control plane's version against this CLI's.
pub fn version(url: &str, server: &str, cli: &str) -> Line {
    let detail = format!("reachable at {url}, version {server} (this CLI {cli})");
    if server == cli {
        Line::pass("control plane", detail)
    } else {
        Line::not(
            Status::Warn,
            "control plane",
            detail,
            "the CLI and the control plane differ: use the CLI of the same release",
        )
    }
}

/// The store, and each etcd endpoint.
pub fn store(s: &StoreHealth) -> Line {
    if !s.reachable {
        return Line::not(
            Status::Fail,
            "store",
            format!("{} unreachable: {}", s.kind, s.error),
            if s.kind == "etcd" {
                "the control plane cannot read etcd: check that the etcd members in --store are running and reachable from it (etcdctl endpoint health)"
            } else {
                "the control plane cannot read its data directory (--store): check its disk and its log"
            },
        );
    }
    if s.endpoints.is_empty() {
        return Line::pass("store", format!("{}: reads go through", s.kind));
    }
    let down: Vec<String> = s
        .endpoints
        .iter()
        .filter(|e| !e.healthy)
        .map(|e| format!("{} ({})", e.endpoint, e.error))
        .collect();
    let leader = s
        .endpoints
        .iter()
        .find(|e| e.leader)
        .map_or("no leader seen".to_string(), |e| {
            format!("leader {}", e.endpoint)
        });
    let healthy = s.endpoints.len() - down.len();
    let detail = format!(
        "{}: {healthy} of {} endpoints healthy, {leader}",
        s.kind,
        s.endpoints.len()
    );
    if down.is_empty() {
        Line::pass("store", detail)
    } else {
        Line::not(
            Status::Warn,
            "store",
            format!("{detail}; down: {}", down.join(", ")),
            "the cluster still answers, but with fewer members it tolerates fewer failures: restart the member(s) down",
        )
    }
}

/// The CA: present, valid, not about to expire.
pub fn ca(c: &CaHealth, now_unix: i64, warn: Duration) -> Line {
    let Some(at) = c.not_after_unix.filter(|_| c.error.is_empty()) else {
        let why = if c.error.is_empty() {
            "its expiry cannot be read".to_string()
        } else {
            c.error.clone()
        };
        return Line::not(
            Status::Fail,
            "CA",
            format!("unusable: {why}"),
            "the control plane cannot issue certificates: see its log, and docs/security.md (Identities)",
        );
    };
    let left = at - now_unix;
    let when = trellis_control::config::rfc3339(u64::try_from(at).unwrap_or(0));
    let detail = format!(
        "trust domain {}, {} root(s), expires {when} (in {})",
        c.trust_domain,
        c.roots.len(),
        human(left)
    );
    if left <= 0 {
        Line::not(
            Status::Fail,
            "CA",
            detail,
            "the CA has expired: no new certificate verifies; rotate it (trellis control --ca-cert/--ca-bundle, docs/security.md)",
        )
    } else if left < i64::try_from(warn.as_secs()).unwrap_or(i64::MAX) {
        Line::not(
            Status::Warn,
            "CA",
            detail,
            "rotate the CA before it expires: add the new root to --ca-bundle first, then sign with it (docs/security.md)",
        )
    } else {
        Line::pass("CA", detail)
    }
}

/// Clock skew from the control plane's time and this machine's clock around the request:
/// the uncertainty is half the round trip.
pub fn skew(server_ms: i64, sent_ms: i64, received_ms: i64, max: Duration) -> Line {
    let mid = sent_ms + (received_ms - sent_ms) / 2;
    let skew = server_ms - mid;
    let slack = (received_ms - sent_ms) / 2;
    let beyond = skew.abs() - slack;
    let max_ms = i64::try_from(max.as_millis()).unwrap_or(i64::MAX);
    let direction = if skew >= 0 { "ahead of" } else { "behind" };
    let detail = format!(
        "the control plane is {} ms {direction} this machine (± {slack} ms)",
        skew.abs()
    );
    if beyond > max_ms {
        Line::not(
            Status::Fail,
            "clock skew",
            format!("{detail}: more than {} ms", max_ms),
            "certificates and tokens carry times: sync both clocks (chrony or systemd-timesyncd)",
        )
    } else {
        Line::pass("clock skew", detail)
    }
}

/// Every proxy acknowledged the current revision, and none refused its last update.
pub fn proxies(list: &[ProxyStatus], revision: u64) -> Line {
    if list.is_empty() {
        return Line::not(
            Status::Warn,
            "proxies in sync",
            "no proxy is connected".into(),
            "start sidecars with trellis run (or trellis proxy --control)",
        );
    }
    let nacks: Vec<String> = list
        .iter()
        .filter_map(|p| {
            let e = p.nack.as_ref()?;
            Some(format!(
                "{} refused revision {}: {e}",
                p.node,
                p.nack_version.as_deref().unwrap_or("?")
            ))
        })
        .collect();
    let stale: Vec<String> = list
        .iter()
        .filter(|p| p.nack.is_none() && !acked(p, revision))
        .map(|p| {
            let at = if p.acked_version.is_empty() {
                "nothing acknowledged yet".to_string()
            } else {
                format!("at revision {}", p.acked_version)
            };
            format!("{} {at}, current {revision}", p.node)
        })
        .collect();
    let n = list.len();
    if !nacks.is_empty() {
        return Line::not(
            Status::Fail,
            "proxies in sync",
            format!(
                "{} of {n} refused their config (NACK): {}",
                nacks.len(),
                nacks.join("; ")
            ),
            "the proxy keeps its previous config: fix what its error names (trellis get proxies NODE -o yaml) and apply again",
        );
    }
    if !stale.is_empty() {
        return Line::not(
            Status::Fail,
            "proxies in sync",
            format!("{} of {n} stale: {}", stale.len(), stale.join("; ")),
            "a stale proxy has not acknowledged the latest config: check that it reaches the control plane and look for errors in its log",
        );
    }
    Line::pass(
        "proxies in sync",
        format!("{n} proxies at revision {revision}, no NACK"),
    )
}

fn acked(p: &ProxyStatus, revision: u64) -> bool {
    p.acked_version.parse::<u64>().is_ok_and(|v| v >= revision)
}

/// Workload certificates are renewed at two thirds of their lifetime, so one with less than
/// a quarter left is overdue.
pub fn certificates(c: &Certificates, now_unix: i64) -> Line {
    let Some(soonest) = c.proxies.iter().min_by_key(|p| p.not_after_unix) else {
        return Line::pass(
            "certificates",
            "no connected proxy holds a workload certificate".into(),
        );
    };
    let ttl = i64::try_from(c.ttl_seconds).unwrap_or(i64::MAX);
    let late: Vec<String> = c
        .proxies
        .iter()
        .filter(|p| p.not_after_unix - now_unix < ttl / 4)
        .map(|p| {
            format!(
                "{} ({}) expires in {}",
                p.node,
                p.identity,
                human(p.not_after_unix - now_unix)
            )
        })
        .collect();
    if late.is_empty() {
        Line::pass(
            "certificates",
            format!(
                "{} workload certificate(s), the soonest expires in {} ({})",
                c.proxies.len(),
                human(soonest.not_after_unix - now_unix),
                soonest.node
            ),
        )
    } else {
        Line::not(
            Status::Fail,
            "certificates",
            format!("{} close to expiry: {}", late.len(), late.join("; ")),
            "sidecars renew at two thirds of the lifetime: look for \"certificate renewal failed\" in that sidecar's log and check it reaches the control plane",
        )
    }
}

/// Every replica serves the same trust bundle.
pub fn bundles(replicas: &[(String, Vec<String>)]) -> Line {
    match replicas {
        [] => Line::not(
            Status::Fail,
            "trust bundle",
            "no replica answered".into(),
            "",
        ),
        [(url, roots)] => Line::pass(
            "trust bundle",
            format!(
                "{} root(s) at {url}; one replica listed (give --control URL1,URL2,… to compare replicas)",
                roots.len()
            ),
        ),
        [(first_url, first), rest @ ..] => {
            let differ: Vec<&str> = rest
                .iter()
                .filter(|(_, r)| r != first)
                .map(|(u, _)| u.as_str())
                .collect();
            if differ.is_empty() {
                Line::pass(
                    "trust bundle",
                    format!(
                        "{} replicas serve the same {} root(s)",
                        replicas.len(),
                        first.len()
                    ),
                )
            } else {
                Line::not(
                    Status::Fail,
                    "trust bundle",
                    format!(
                        "{} serve(s) a different bundle from {first_url}",
                        differ.join(", ")
                    ),
                    "replicas disagree on the roots: sidecars of one will not trust the other's; restart the replica that is behind (it reloads the CA from the store) or check --ca-bundle on each",
                )
            }
        }
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[derive(serde::Deserialize)]
struct Proxies {
    revision: u64,
    items: Vec<ProxyStatus>,
}

fn unreachable_hint(e: &anyhow::Error) -> &'static str {
    let text = format!("{e:#}");
    if text.contains("trust bundle") || text.contains("certificate") {
        "the CLI verifies the control plane with its ca.pem: pass --ca-file or TRELLIS_CA_FILE"
    } else if text.contains("admin token") {
        "set TRELLIS_ADMIN_TOKEN_FILE to the admin-token file trellis control wrote (or TRELLIS_ADMIN_TOKEN)"
    } else {
        "is trellis control running? check --control / TRELLIS_CONTROL and that this machine reaches its port"
    }
}

/// Runs every check against the replicas in `control` (comma-separated URLs) and prints
/// them; returns the exit code.
pub async fn check(
    control: &str,
    insecure: bool,
    ca_file: Option<std::path::PathBuf>,
    o: &Options,
) -> Result<i32> {
    let urls = crate::run::endpoints(control);
    let mut lines = Vec::new();
    let mut answered: Vec<(String, Api, Health, i64, i64)> = Vec::new();
    for url in &urls {
        let api = match Api::new(url, insecure, ca_file.clone()) {
            Ok(a) => a,
            Err(e) => {
                lines.push(Line::not(
                    Status::Fail,
                    "control plane",
                    format!("{url}: {e:#}"),
                    unreachable_hint(&e),
                ));
                continue;
            }
        };
        let sent = unix_ms();
        let answer =
            tokio::time::timeout(Duration::from_secs(10), api.get::<Health>("/v1/health")).await;
        let received = unix_ms();
        match answer {
            Ok(Ok(h)) => answered.push((url.clone(), api, h, sent, received)),
            Ok(Err(e)) => lines.push(Line::not(
                Status::Fail,
                "control plane",
                format!("{url}: {e:#}"),
                unreachable_hint(&e),
            )),
            Err(_) => lines.push(Line::not(
                Status::Fail,
                "control plane",
                format!("{url}: no answer within 10s"),
                "the control plane accepts connections but does not answer: see its log",
            )),
        }
    }
    let now = unix_ms() / 1000;
    for (url, _, h, sent, received) in &answered {
        lines.push(version(url, &h.version, env!("CARGO_PKG_VERSION")));
        lines.push(store(&h.store));
        lines.push(skew(h.time_unix_ms, *sent, *received, o.max_skew));
    }
    if let Some((_, _, h, _, _)) = answered.first() {
        lines.push(ca(&h.ca, now, o.ca_warn));
    }
    if !answered.is_empty() {
        lines.push(sync(&answered, o.sync_grace).await);
        let mut certs = Certificates::default();
        for (_, _, h, _, _) in &answered {
            certs.ttl_seconds = h.certificates.ttl_seconds;
            certs.proxies.extend(h.certificates.proxies.iter().cloned());
        }
        lines.push(certificates(&certs, now));
        let roots: Vec<(String, Vec<String>)> = answered
            .iter()
            .map(|(u, _, h, _, _)| (u.clone(), h.ca.roots.clone()))
            .collect();
        lines.push(bundles(&roots));
    }
    let mut failed = 0;
    for l in &lines {
        let mark = match l.status {
            Status::Pass => "√",
            Status::Warn => "‼",
            Status::Fail => "×",
        };
        println!("{mark} {}: {}", l.name, l.detail);
        if l.status != Status::Pass && !l.hint.is_empty() {
            println!("    hint: {}", l.hint);
        }
        if l.status == Status::Fail {
            failed += 1;
        }
    }
    let warned = lines.iter().filter(|l| l.status == Status::Warn).count();
    if answered.is_empty() {
        println!("skipped the other checks: no control plane answered");
    }
    if failed > 0 {
        println!("{failed} check(s) failed, {warned} warning(s)");
        Ok(1)
    } else {
        println!("all checks passed, {warned} warning(s)");
        Ok(0)
    }
}

/// The proxies of every replica; a proxy behind the current revision gets `grace` to catch
/// up (an apply may have just happened) before it counts as stale.
async fn sync(answered: &[(String, Api, Health, i64, i64)], grace: Duration) -> Line {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let mut all = Vec::new();
        let mut revision = 0;
        for (url, api, _, _, _) in answered {
            match api.get::<Proxies>("/v1/resources/proxies").await {
                Ok(p) => {
                    revision = revision.max(p.revision);
                    all.extend(p.items);
                }
                Err(e) => {
                    return Line::not(
                        Status::Fail,
                        "proxies in sync",
                        format!("{url}: {e:#}"),
                        unreachable_hint(&e),
                    );
                }
            }
        }
        let line = proxies(&all, revision);
        let waiting = all.iter().any(|p| p.nack.is_none() && !acked(p, revision));
        if line.status == Status::Pass || !waiting || tokio::time::Instant::now() >= deadline {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests;
