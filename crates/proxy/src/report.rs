//! Traffic reports for the control plane's fleet view (`trellis stat`, `top`, `edges`,
//! `tap`). Proxies' admin listeners are loopback-only, so the control plane cannot scrape
//! them: each proxy counts its requests here and sends what it saw every few seconds on its
//! own report stream, which also carries the tap requests and their events (module `tap`).
//!
//! The request path pays one read lock and a few atomic adds per request: counts are keyed by
//! direction, route, backend and peer, all bounded by the config and the mesh's identities.

use crate::Proxy;
use crate::rand::FastHash;
use crate::tap::{Seen, Taps};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_api::wire::{self, mesh_client::MeshClient};

/// Latency bucket upper bounds (seconds); a last bucket catches the rest.
pub const LATENCY_BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 8.192, 16.384,
];

/// Explain requests answered from one message; the control plane sends one at a time.
const MAX_EXPLAIN: usize = 8;

/// How often a report is sent.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Most series one proxy keeps between reports; beyond it, requests are counted under an
/// overflow series (route `~overflow`), never dropped.
const MAX_SERIES: usize = 4096;

/// Most authorization series (listener, policy, rule, decision) kept between reports, so
/// one report carries about this many (plus one overflow series per listener and decision):
/// policies and rules are config, but config is user input. Beyond it, verdicts are counted
/// under policy `~overflow`, never dropped.
const MAX_AUTHZ_SERIES: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AuthzKey {
    listener: Arc<str>,
    policy: Arc<str>,
    rule: Option<u32>,
    decision: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    direction: &'static str,
    route: Arc<str>,
    backend: Arc<str>,
    peer: Option<Arc<str>>,
    tls: bool,
}

#[derive(Default)]
struct Counts {
    classes: [AtomicU64; 5],
    grpc_errors: AtomicU64,
    latency: [AtomicU64; LATENCY_BOUNDS.len() + 1],
}

/// The bucket `seconds` falls into.
pub fn bucket(seconds: f64) -> usize {
    LATENCY_BOUNDS
        .iter()
        .position(|b| seconds <= *b)
        .unwrap_or(LATENCY_BOUNDS.len())
}

/// The status class index: 0 for 1xx … 4 for 5xx (anything else counts as 5xx).
pub fn class(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => 4,
    }
}

/// This proxy's counts since the last report, and its taps.
#[derive(Default)]
pub struct Collector {
    // Keys are config names and verified identities, bounded: no keyed hash needed.
    series: RwLock<HashMap<Key, Counts, FastHash>>,
    authz: RwLock<HashMap<AuthzKey, AtomicU64, FastHash>>,
    /// Active taps and their event queue.
    pub taps: Taps,
    /// The app whose CPU and memory reports carry (set by `trellis run`).
    pub app: crate::usage::App,
}

impl Collector {
    /// Counts one finished request.
    pub(crate) fn observe(&self, seen: &Seen, status: u16, grpc_error: bool, latency: Duration) {
        let key = Key {
            direction: seen.direction,
            route: seen.route.clone(),
            backend: seen.backend.clone(),
            peer: seen.peer.clone(),
            tls: seen.tls,
        };
        let add = |c: &Counts| {
            c.classes[class(status)].fetch_add(1, Ordering::Relaxed);
            if grpc_error {
                c.grpc_errors.fetch_add(1, Ordering::Relaxed);
            }
            c.latency[bucket(latency.as_secs_f64())].fetch_add(1, Ordering::Relaxed);
        };
        {
            let series = self.series.read().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = series.get(&key) {
                add(c);
                return;
            }
        }
        let mut series = self.series.write().unwrap_or_else(|e| e.into_inner());
        let key = if series.len() >= MAX_SERIES && !series.contains_key(&key) {
            Key {
                direction: seen.direction,
                route: "~overflow".into(),
                backend: "".into(),
                peer: None,
                tls: false,
            }
        } else {
            key
        };
        add(series.entry(key).or_default());
    }

    /// Counts one authorization verdict of inbound listener `listener`.
    pub(crate) fn authorized(&self, listener: &Arc<str>, v: &crate::authz::Verdict) {
        let (decision, policy, rule) = v.decision();
        let key = AuthzKey {
            listener: listener.clone(),
            policy: policy.clone(),
            rule,
            decision,
        };
        {
            let authz = self.authz.read().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = authz.get(&key) {
                n.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut authz = self.authz.write().unwrap_or_else(|e| e.into_inner());
        let key = if authz.len() >= MAX_AUTHZ_SERIES - 1 && !authz.contains_key(&key) {
            AuthzKey {
                listener: key.listener,
                policy: "~overflow".into(),
                rule: None,
                decision,
            }
        } else {
            key
        };
        authz
            .entry(key)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The authorization verdicts counted since the last call, and a fresh start.
    pub fn take_authz(&self) -> Vec<wire::AuthzSeries> {
        let mut authz = self.authz.write().unwrap_or_else(|e| e.into_inner());
        let out = authz
            .iter()
            .map(|(k, n)| wire::AuthzSeries {
                listener: k.listener.to_string(),
                policy: k.policy.to_string(),
                rule: k.rule,
                decision: k.decision.into(),
                count: n.swap(0, Ordering::Relaxed),
            })
            .filter(|s| s.count > 0)
            .collect();
        authz.clear();
        out
    }

    /// What was counted since the last call, and a fresh start (series without requests go,
    /// so routes and peers a config no longer has are not kept).
    pub fn take(&self) -> Vec<wire::TrafficSeries> {
        let mut series = self.series.write().unwrap_or_else(|e| e.into_inner());
        let out = series
            .iter()
            .map(|(k, c)| wire::TrafficSeries {
                direction: k.direction.into(),
                route: k.route.to_string(),
                backend: k.backend.to_string(),
                peer_identity: k.peer.as_deref().unwrap_or_default().into(),
                tls: k.tls,
                classes: c
                    .classes
                    .iter()
                    .map(|a| a.swap(0, Ordering::Relaxed))
                    .collect(),
                latency: c
                    .latency
                    .iter()
                    .map(|a| a.swap(0, Ordering::Relaxed))
                    .collect(),
                grpc_errors: c.grpc_errors.swap(0, Ordering::Relaxed),
            })
            .filter(|s| s.classes.iter().any(|n| *n > 0))
            .collect();
        series.clear();
        out
    }
}

/// How to reach the control plane for reports.
#[derive(Clone, Debug)]
pub struct ReportConfig {
    /// Control-plane replicas, tried in turn.
    pub endpoints: Vec<String>,
    /// Who this proxy is (its id and service; the control plane checks them against its
    /// credentials).
    pub node: wire::Node,
    /// TLS and credentials for the control channel.
    pub tls: crate::control::ControlTls,
}

/// Sends reports until the proxy drains, reconnecting with backoff.
pub async fn run(proxy: Arc<Proxy>, cfg: ReportConfig) {
    let draining = proxy.shared.draining.clone();
    let mut backoff =
        crate::control::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut next = 0;
    loop {
        let Some(endpoint) = cfg.endpoints.get(next % cfg.endpoints.len().max(1)) else {
            return;
        };
        let result = tokio::select! {
            () = draining.cancelled() => return,
            r = session(&proxy, &cfg, endpoint, &mut backoff) => r,
        };
        // No tap outlives its stream.
        proxy.shared.report.taps.set(Vec::new());
        next += 1;
        let delay = backoff.next_delay();
        if let Err(e) = result {
            tracing::debug!(%endpoint, error = %e.message(), "report stream ended; retrying in {delay:?}");
        }
        tokio::select! {
            () = draining.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session(
    proxy: &Proxy,
    cfg: &ReportConfig,
    endpoint: &str,
    backoff: &mut crate::control::Backoff,
) -> Result<(), tonic::Status> {
    let creds = proxy.credentials();
    let channel = cfg
        .tls
        .connect(endpoint, creds.as_ref(), |e| {
            e.connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .await
        .map_err(tonic::Status::unavailable)?;
    let (tx, rx) = mpsc::channel(16);
    let _ = tx
        .send(wire::ReportRequest {
            node: Some(cfg.node.clone()),
            ..Default::default()
        })
        .await;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    crate::identity::authorize(&mut request, proxy, &cfg.tls);
    let mut answers = MeshClient::new(channel).report(request).await?.into_inner();
    backoff.reset();
    let collector = &proxy.shared.report;
    // What was counted before this stream is not reported as this interval's.
    collector.take();
    collector.take_authz();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = tokio::time::Instant::now();
    let mut events = collector.taps.events();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let traffic = wire::TrafficReport {
                    interval_ms: u32::try_from((now - last).as_millis()).unwrap_or(u32::MAX),
                    series: collector.take(),
                    latency_bounds: LATENCY_BOUNDS.to_vec(),
                };
                last = now;
                let message = wire::ReportRequest {
                    traffic: Some(traffic),
                    authz: collector.take_authz(),
                    endpoints: Some(crate::outlier::endpoint_report(&proxy.shared.snapshot(), now)),
                    usage: Some(collector.app.sample().await),
                    tap_dropped: collector.taps.take_dropped(),
                    ..Default::default()
                };
                if tx.send(message).await.is_err() {
                    return Ok(());
                }
            }
            Some(first) = events.recv() => {
                // A batch of what is queued; the control plane drops what its clients
                // cannot take.
                let mut batch = vec![first];
                while batch.len() < 256 {
                    match events.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                let message = wire::ReportRequest {
                    tap_events: batch,
                    tap_dropped: collector.taps.take_dropped(),
                    ..Default::default()
                };
                if tx.send(message).await.is_err() {
                    return Ok(());
                }
            }
            answer = answers.message() => match answer? {
                Some(a) if a.explain.is_empty() => collector.taps.set(a.taps),
                Some(a) => {
                    // Off the report loop: a proposed view builds a whole snapshot.
                    let (shared, tx) = (proxy.shared.clone(), tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let explained = a
                            .explain
                            .into_iter()
                            .take(MAX_EXPLAIN)
                            .map(|r| crate::explain::answer(&shared, r))
                            .collect();
                        let _ = tx.blocking_send(wire::ReportRequest {
                            explained,
                            ..Default::default()
                        });
                    });
                }
                None => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(direction: &'static str, route: &str, peer: Option<&str>) -> Seen {
        Seen::for_test(
            direction,
            route.into(),
            "default/pay:80".into(),
            peer.map(Arc::from),
        )
    }

    #[test]
    fn counts_group_by_series_and_start_over_after_each_report() {
        let c = Collector::default();
        let orders = Some("spiffe://td/ns/default/sa/orders");
        let ms = Duration::from_millis;
        c.observe(&seen("inbound", "inbound", orders), 200, false, ms(3));
        c.observe(&seen("inbound", "inbound", orders), 503, false, ms(3));
        c.observe(&seen("inbound", "inbound", None), 200, true, ms(20));
        c.observe(&seen("outbound", "default/r/0", None), 404, false, ms(1));
        let mut got = c.take();
        got.sort_by(|a, b| (&a.direction, &a.peer_identity).cmp(&(&b.direction, &b.peer_identity)));
        assert_eq!(got.len(), 3, "{got:?}");
        let plain = &got[0];
        assert_eq!(
            (plain.tls, plain.classes.as_slice(), plain.grpc_errors),
            (false, &[0, 1, 0, 0, 0][..], 1)
        );
        assert_eq!(plain.latency[bucket(0.020)], 1);
        let tls = &got[1];
        assert!(tls.tls);
        assert_eq!(tls.classes, [0, 1, 0, 0, 1]);
        assert_eq!(tls.latency[bucket(0.003)], 2);
        assert_eq!(got[2].route, "default/r/0");
        assert_eq!(got[2].classes, [0, 0, 0, 1, 0]);
        assert!(
            c.take().is_empty(),
            "each report covers only its own interval"
        );
    }

    #[test]
    fn authz_verdicts_count_per_policy_rule_and_decision_boundedly() {
        let c = Collector::default();
        let l: Arc<str> = "inbound".into();
        let v = |allow, policy: &str, rule, audit: Option<(&str, u32)>| crate::authz::Verdict {
            allow,
            policy: policy.into(),
            rule,
            audit_denied_by: audit.map(|(p, _)| p.into()),
            audit_rule: audit.map(|(_, r)| r),
        };
        c.authorized(&l, &v(false, "shop/deny", Some(1), None));
        c.authorized(&l, &v(false, "shop/deny", Some(1), None));
        c.authorized(&l, &v(true, "shop/allow", Some(0), None));
        c.authorized(&l, &v(true, "shop/allow", Some(0), Some(("shop/audit", 2))));
        let mut got: Vec<_> = c
            .take_authz()
            .into_iter()
            .map(|s| (s.policy, s.rule, s.decision, s.count))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("shop/allow".into(), Some(0), "allow".into(), 1),
                ("shop/audit".into(), Some(2), "audit_deny".into(), 1),
                ("shop/deny".into(), Some(1), "deny".into(), 2),
            ]
        );
        assert!(c.take_authz().is_empty(), "deltas: each report its own");
        // Distinct series are capped; the rest are counted together.
        for i in 0..(MAX_AUTHZ_SERIES * 2) {
            c.authorized(&l, &v(true, &format!("shop/p{i}"), None, None));
        }
        let got = c.take_authz();
        assert_eq!(got.len(), MAX_AUTHZ_SERIES);
        assert_eq!(
            got.iter().map(|s| s.count).sum::<u64>(),
            MAX_AUTHZ_SERIES as u64 * 2
        );
        assert!(got.iter().any(|s| s.policy == "~overflow"));
    }

    #[test]
    fn buckets_and_classes() {
        for (seconds, want) in [
            (0.0, 0),
            (0.0005, 0),
            (0.0006, 1),
            (0.003, 3),
            (16.384, 15),
            (17.0, 16),
            (f64::INFINITY, 16),
        ] {
            assert_eq!(bucket(seconds), want, "{seconds}");
        }
        for (status, want) in [
            (100, 0),
            (200, 1),
            (204, 1),
            (302, 2),
            (404, 3),
            (503, 4),
            (0, 4),
            (600, 4),
        ] {
            assert_eq!(class(status), want, "{status}");
        }
    }
}
