//! Each balancing algorithm's distribution over real upstreams.

mod support;

use http::Request;
use http_body_util::Full;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use support::*;

const NAMES: [&str; 4] = ["e0", "e1", "e2", "e3"];

async fn setup(policy: &str, delays: [u64; 4]) -> (TestProxy, SocketAddr, Vec<Upstream>) {
    let mut ups = Vec::new();
    for (name, delay) in NAMES.iter().zip(delays) {
        ups.push(upstream_with_delay(name, delay).await);
    }
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let yaml = format!(
        "{}{}---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: lb}}
spec:
  targetRef: {{kind: Service, name: app}}
  loadBalancer:
{policy}
",
        proxy_yaml("app"),
        service_yaml("app", 8080, &addrs)
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    (p, addr, ups)
}

fn hits(ups: &[Upstream]) -> Vec<u64> {
    ups.iter().map(|u| u.hits.load(Ordering::Relaxed)).collect()
}

/// Runs `total` requests from `workers` concurrent clients; returns per-upstream counts.
async fn load(
    addr: SocketAddr,
    total: usize,
    workers: usize,
    header: Option<(&'static str, String)>,
) -> HashMap<String, u32> {
    let per = total / workers;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let header = header.clone();
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut counts: HashMap<String, u32> = HashMap::new();
            for _ in 0..per {
                let mut b = Request::get(format!("http://{addr}/"));
                if let Some((k, v)) = &header {
                    b = b.header(*k, v.as_str());
                }
                let got = send(&client, b.body(Full::default()).unwrap()).await;
                assert_eq!(got.status, 200);
                *counts.entry(got.upstream()).or_default() += 1;
            }
            counts
        }));
    }
    let mut all: HashMap<String, u32> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *all.entry(k).or_default() += v;
        }
    }
    all
}

#[tokio::test]
async fn round_robin_is_even() {
    let (_p, addr, ups) = setup("    algorithm: RoundRobin", [0; 4]).await;
    load(addr, 400, 1, None).await;
    assert_eq!(hits(&ups), vec![100, 100, 100, 100]);
}

#[tokio::test]
async fn least_request_avoids_busy_endpoint() {
    // e0 answers in 200ms, so its requests pile up and least-request sends it fewer.
    let (_p, addr, ups) = setup("    algorithm: LeastRequest", [200, 0, 0, 0]).await;
    load(addr, 400, 8, None).await;
    let h = hits(&ups);
    assert_eq!(h.iter().sum::<u64>(), 400);
    assert!(h[0] < 40, "slow endpoint got {} of 400: {h:?}", h[0]);
}

#[tokio::test]
async fn peak_ewma_steers_away_from_slow_endpoint() {
    let (_p, addr, ups) = setup("    algorithm: PeakEwma", [0, 0, 60, 0]).await;
    load(addr, 300, 2, None).await;
    let h = hits(&ups);
    // Uniform would give the slow endpoint 75; peak EWMA only re-probes it occasionally.
    assert!(h[2] < 20, "slow endpoint got {} of 300: {h:?}", h[2]);
    // The fast ones share the rest (not evenly: one slow answer is a peak that takes the
    // decay window to fade).
    assert!(
        h.iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .all(|(_, n)| *n > 20),
        "{h:?}"
    );
}

#[tokio::test]
async fn consistent_hash_on_header_is_sticky() {
    let policy = "    algorithm: ConsistentHash\n    consistentHash: {header: x-user}";
    let (_p, addr, _ups) = setup(policy, [0; 4]).await;
    let mut homes = HashMap::new();
    for user in 0..40 {
        let counts = load(addr, 10, 1, Some(("x-user", format!("user-{user}")))).await;
        assert_eq!(counts.len(), 1, "user-{user} was spread: {counts:?}");
        homes.insert(user, counts.into_keys().next().unwrap());
    }
    let used: std::collections::HashSet<_> = homes.values().collect();
    assert_eq!(
        used.len(),
        4,
        "40 keys should reach all 4 endpoints: {homes:?}"
    );
}

#[tokio::test]
async fn consistent_hash_on_cookie_and_source_ip() {
    let policy = "    algorithm: ConsistentHash\n    consistentHash: {cookie: session}";
    let (_p, addr, _ups) = setup(policy, [0; 4]).await;
    for s in 0..10 {
        let counts = load(
            addr,
            8,
            1,
            Some(("cookie", format!("theme=dark; session=s{s}"))),
        )
        .await;
        assert_eq!(counts.len(), 1, "{counts:?}");
    }
    let policy = "    algorithm: ConsistentHash\n    consistentHash: {sourceIP: true}";
    let (_p, addr, _ups) = setup(policy, [0; 4]).await;
    // Every test client is 127.0.0.1: one endpoint takes all.
    assert_eq!(load(addr, 40, 1, None).await.len(), 1);
}

#[tokio::test]
async fn consistent_hash_bounded_load_spills_hot_key() {
    let policy =
        "    algorithm: ConsistentHash\n    consistentHash: {header: x-user, boundedLoad: 1.25}";
    // Slow answers keep requests in flight, so the bound is what spreads the hot key.
    let (_p, addr, _ups) = setup(policy, [100; 4]).await;
    let counts = load(addr, 48, 12, Some(("x-user", "hot".into()))).await;
    let max = counts.values().max().copied().unwrap_or(0);
    assert!(
        counts.len() >= 2 && max < 48,
        "hot key did not spill: {counts:?}"
    );
}
