//! The quota client: shares of Global rate limits, leased by the control plane.
//!
//! Every [`INTERVAL`] the proxy reports, per Global bucket, the units offered to it since
//! the last report (admitted or not); the control plane divides each limit among the
//! instances that enforce it in proportion to their demand and answers with this proxy's
//! share, which becomes the bucket's rate (its burst scales with it). No request waits for
//! the control plane.
//!
//! - A new bucket starts at [`INITIAL_FRACTION`] of its limit until its first answer, which
//!   comes within one interval: a fleet of new instances cannot each admit the whole limit.
//! - While the control plane is unreachable, every bucket keeps its last share (or its
//!   initial one): never unlimited, never zero.
//! - Without a control plane (a proxy from a file) this client does not run and a Global
//!   bucket has its limit's whole rate.

use crate::Proxy;
use crate::ratelimit::{Bucket, GlobalKey};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_api::wire::{self, mesh_client::MeshClient};

/// How often demand is reported.
pub const INTERVAL: Duration = Duration::from_millis(250);
/// The share of its limit a new bucket has until the control plane answers.
pub const INITIAL_FRACTION: f64 = 0.1;

/// How to reach the control plane for quota.
#[derive(Clone, Debug)]
pub struct QuotaConfig {
    /// Control-plane replicas, tried in turn.
    pub endpoints: Vec<String>,
    /// Who this proxy is.
    pub node: wire::Node,
    /// TLS and credentials for the control channel.
    pub tls: crate::control::ControlTls,
}

/// Pure: a bucket's burst for a `share` of a limit with `rate` per second and `burst`:
/// scaled with the share, at least 1.
pub fn scaled_burst(burst: u32, rate: f64, share: f64) -> u32 {
    if rate <= 0.0 || !share.is_finite() {
        return burst.max(1);
    }
    let scaled = (f64::from(burst) * (share / rate).clamp(0.0, 1.0)).ceil();
    (scaled as u32).clamp(1, burst.max(1))
}

/// Pure: the first rate and burst of a new Global bucket.
pub fn initial_share(_: &GlobalKey, rate: f64, burst: u32) -> (f64, u32) {
    let share = rate * INITIAL_FRACTION;
    (share, scaled_burst(burst, rate, share))
}

fn wire_key(k: &GlobalKey) -> wire::QuotaKey {
    wire::QuotaKey {
        policy: k.policy.to_string(),
        limit: k.limit.to_string(),
        source: k.source.as_deref().unwrap_or_default().to_string(),
    }
}

fn same(k: &GlobalKey, w: &wire::QuotaKey) -> bool {
    *k.policy == w.policy && *k.limit == w.limit && k.source.as_deref().unwrap_or("") == w.source
}

/// Sets the share gauge: this proxy's rate per policy and limit, summed over sources.
fn publish(proxy: &Proxy, buckets: &[(GlobalKey, Arc<Bucket>, f64, u32)]) {
    let mut sums: HashMap<(Arc<str>, Arc<str>), f64> = HashMap::new();
    for (k, b, _, _) in buckets {
        *sums.entry((k.policy.clone(), k.limit.clone())).or_default() += b.rate();
    }
    let gauge = &proxy.shared.metrics.global_share;
    gauge.retain(|l| sums.contains_key(&(l.policy.clone(), l.limit.clone())));
    for ((policy, limit), rate) in sums {
        gauge
            .get_or_create(&crate::metrics::GlobalShareLabels { policy, limit })
            .set(rate);
    }
}

/// Leases shares until the proxy drains, reconnecting with backoff to the replicas in turn.
pub async fn run(proxy: Arc<Proxy>, cfg: QuotaConfig) {
    let globals = proxy.shared.globals.clone();
    globals.set_initial(Arc::new(initial_share));
    // Buckets made before this client started (from a persisted config) had the whole
    // limit: bring them to their initial share too.
    for (key, bucket, rate, burst) in globals.list() {
        if bucket.rate() >= rate {
            let (r, b) = initial_share(&key, rate, burst);
            bucket.set_burst(b);
            bucket.set_rate(r);
        }
    }
    let draining = proxy.shared.draining.clone();
    let mut backoff =
        crate::control::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut next = 0;
    loop {
        let Some(endpoint) = cfg.endpoints.get(next % cfg.endpoints.len().max(1)) else {
            return;
        };
        let result = tokio::select! {
            () = draining.cancelled() => return,
            r = session(&proxy, &cfg, endpoint, &mut backoff) => r,
        };
        next += 1;
        let delay = backoff.next_delay();
        if let Err(e) = result {
            tracing::debug!(%endpoint, error = %e.message(), "quota stream ended; keeping the last shares, retrying in {delay:?}");
        }
        tokio::select! {
            () = draining.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn demand(
    buckets: &[(GlobalKey, Arc<Bucket>, f64, u32)],
    interval: Duration,
    node: Option<wire::Node>,
) -> wire::QuotaRequest {
    wire::QuotaRequest {
        node,
        interval_ms: u32::try_from(interval.as_millis())
            .unwrap_or(u32::MAX)
            .max(1),
        demand: buckets
            .iter()
            .map(|(k, b, rate, _)| wire::QuotaDemand {
                key: Some(wire_key(k)),
                rate: *rate,
                demand: b.take_demand(),
            })
            .collect(),
    }
}

async fn session(
    proxy: &Proxy,
    cfg: &QuotaConfig,
    endpoint: &str,
    backoff: &mut crate::control::Backoff,
) -> Result<(), tonic::Status> {
    let creds = proxy.credentials();
    let channel = cfg
        .tls
        .connect(endpoint, creds.as_ref(), |e| {
            e.connect_timeout(Duration::from_secs(1))
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(1))
        })
        .await
        .map_err(tonic::Status::unavailable)?;
    let globals = proxy.shared.globals.clone();
    let (tx, rx) = mpsc::channel(4);
    let mut last = tokio::time::Instant::now();
    let buckets = globals.list();
    // Demand from before this stream is counted as one interval's.
    let _ = tx
        .send(demand(&buckets, INTERVAL, Some(cfg.node.clone())))
        .await;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    crate::identity::authorize(&mut request, proxy, &cfg.tls);
    let mut answers = MeshClient::new(channel).quota(request).await?.into_inner();
    backoff.reset();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // An answer that does not come for this long means the replica is gone.
    let silence = INTERVAL * 8;
    let mut heard = tokio::time::Instant::now();
    let mut reported = !buckets.is_empty();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let buckets = globals.list();
                publish(proxy, &buckets);
                // Nothing to report (and no answer to expect) without Global buckets; one
                // empty report tells the control plane they are gone.
                if buckets.is_empty() && !reported {
                    heard = now;
                    last = now;
                    continue;
                }
                if now.duration_since(heard) > silence {
                    return Err(tonic::Status::unavailable("no quota answer"));
                }
                reported = !buckets.is_empty();
                if tx.send(demand(&buckets, now - last, None)).await.is_err() {
                    return Ok(());
                }
                last = now;
            }
            answer = answers.message() => match answer? {
                Some(a) => {
                    heard = tokio::time::Instant::now();
                    let buckets = globals.list();
                    apply(&buckets, &a);
                    publish(proxy, &buckets);
                }
                None => return Ok(()),
            },
        }
    }
}

/// Sets each bucket's rate and burst to its share in `answer`; buckets it does not name keep
/// theirs.
pub fn apply(buckets: &[(GlobalKey, Arc<Bucket>, f64, u32)], answer: &wire::QuotaResponse) {
    for s in &answer.shares {
        let Some(wk) = &s.key else { continue };
        if !s.rate.is_finite() || s.rate <= 0.0 {
            continue; // never zero, never unlimited
        }
        for (k, bucket, rate, burst) in buckets {
            if same(k, wk) {
                let share = s.rate.min(*rate);
                bucket.set_burst(scaled_burst(*burst, *rate, share));
                bucket.set_rate(share);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: Option<&str>) -> GlobalKey {
        GlobalKey {
            policy: "shop/catalog".into(),
            limit: "total".into(),
            source: source.map(Into::into),
        }
    }

    #[test]
    fn burst_scales_with_the_share() {
        let cases = [
            // (burst, rate, share, want)
            (300, 300.0, 100.0, 100),
            (300, 300.0, 300.0, 300),
            (10, 300.0, 1.0, 1),
            (300, 300.0, 1000.0, 300),
            (0, 300.0, 100.0, 1),
            (50, 0.0, 10.0, 50),
        ];
        for (burst, rate, share, want) in cases {
            assert_eq!(
                scaled_burst(burst, rate, share),
                want,
                "{burst} {rate} {share}"
            );
        }
        assert_eq!(initial_share(&key(None), 300.0, 300), (30.0, 30));
    }

    #[tokio::test(start_paused = true)]
    async fn answers_set_shares_and_keep_the_rest() {
        let plain = Arc::new(Bucket::new(30.0, 30));
        let other = Arc::new(Bucket::new(30.0, 30));
        let buckets = vec![
            (key(None), plain.clone(), 300.0, 300),
            (
                key(Some("spiffe://td/ns/a/sa/b")),
                other.clone(),
                300.0,
                300,
            ),
        ];
        let share = |source: &str, rate: f64| wire::QuotaShare {
            key: Some(wire::QuotaKey {
                policy: "shop/catalog".into(),
                limit: "total".into(),
                source: source.into(),
            }),
            rate,
        };
        apply(
            &buckets,
            &wire::QuotaResponse {
                shares: vec![share("", 150.0)],
            },
        );
        assert_eq!((plain.rate(), plain.burst()), (150.0, 150));
        assert_eq!(other.rate(), 30.0, "not named: kept");
        // Zero, nonsense and more than the limit: never zero, never above the limit.
        apply(
            &buckets,
            &wire::QuotaResponse {
                shares: vec![
                    share("", 0.0),
                    share("spiffe://td/ns/a/sa/b", 1e9),
                    share("x", f64::NAN),
                ],
            },
        );
        assert_eq!(plain.rate(), 150.0);
        assert_eq!((other.rate(), other.burst()), (300.0, 300));
    }
}
