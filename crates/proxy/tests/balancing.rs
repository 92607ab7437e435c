//! Each balancing algorithm's distribution over real upstreams, and how each avoids a
//! failing endpoint.

mod support;

use http::Request;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use support::*;
use tokio::net::TcpListener;

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

// Failure-aware balancing: a failing endpoint is backed off in every algorithm, and a
// re-attempt goes to another endpoint.

/// How a bad endpoint misbehaves.
#[derive(Clone, Copy, Debug)]
enum Bad {
    /// Nothing listens on its port: connections are refused.
    Dead,
    /// Accepts and closes every connection at once, before any response.
    Reset,
}

/// A bad endpoint's address, and the connections it accepted (always 0 when dead).
async fn bad_endpoint(bad: Bad) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    match bad {
        Bad::Dead => drop(listener),
        Bad::Reset => {
            let a = accepted.clone();
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    a.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                }
            });
        }
    }
    (addr, accepted)
}

/// Serves HTTP on `listener`, answering every request with `status` from `name`; counts
/// requests.
fn serve(listener: TcpListener, name: &'static str, status: u16) -> Arc<AtomicU64> {
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    h.fetch_add(1, Ordering::Relaxed);
                    let resp = http::Response::builder()
                        .status(status)
                        .header("x-upstream", name)
                        .body(Full::new(bytes::Bytes::from_static(b"x")))
                        .unwrap();
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    hits
}

/// A proxy for service `app` over `endpoints`, with `policy` (a `loadBalancer` body) or the
/// defaults when `None`.
async fn proxy_over(endpoints: &[SocketAddr], policy: Option<&str>) -> (TestProxy, SocketAddr) {
    let mut yaml = format!(
        "{}{}",
        proxy_yaml("app"),
        service_yaml("app", 8080, endpoints)
    );
    if let Some(policy) = policy {
        yaml.push_str(&format!(
            "---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: lb}}
spec:
  targetRef: {{kind: Service, name: app}}
  loadBalancer:
    algorithm: {policy}
"
        ));
    }
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    (p, addr)
}

/// Sends `total` requests from `workers` clients, one in four a POST with a body; returns
/// (failed GETs, failed POSTs) and the count per upstream.
async fn mixed_load(
    addr: SocketAddr,
    total: usize,
    workers: usize,
) -> ((usize, usize), HashMap<String, u32>) {
    let mut tasks = Vec::new();
    for w in 0..workers {
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let (mut failed, mut counts) = ((0, 0), HashMap::<String, u32>::new());
            for i in 0..total / workers {
                let post = (i + w) % 4 == 0;
                let req = if post {
                    Request::post(format!("http://{addr}/echo")).body(Full::from("order"))
                } else {
                    Request::get(format!("http://{addr}/")).body(Full::default())
                };
                let got = send(&client, req.unwrap()).await;
                if got.status != 200 {
                    if post { failed.1 += 1 } else { failed.0 += 1 }
                }
                *counts.entry(got.upstream()).or_default() += 1;
            }
            (failed, counts)
        }));
    }
    let (mut failed, mut all) = ((0, 0), HashMap::<String, u32>::new());
    for t in tasks {
        let ((g, p), counts) = t.await.unwrap();
        failed = (failed.0 + g, failed.1 + p);
        for (k, v) in counts {
            *all.entry(k).or_default() += v;
        }
    }
    (failed, all)
}

/// The sum of the proxy's endpoint failure counters of `kind`.
fn failures(p: &TestProxy, kind: &str) -> f64 {
    let label = format!("kind=\"{kind}\"");
    p.proxy
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("trellis_endpoint_failures_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One of three endpoints bad: no GET fails, and the bad endpoint sees only the few
/// connections of its backoff probes; with a dead one, fewer than 0.5% of all requests fail.
async fn one_bad_of_three(policy: Option<&str>, bad: Bad) {
    const N: usize = 800;
    let (a, b) = (upstream("a").await, upstream("b").await);
    let (bad_addr, accepted) = bad_endpoint(bad).await;
    let (p, addr) = proxy_over(&[a.addr, bad_addr, b.addr], policy).await;
    let ((get_failed, post_failed), counts) = mixed_load(addr, N, 4).await;
    assert_eq!(get_failed, 0, "{policy:?} {bad:?}: GETs failed; {counts:?}");
    // Before the first failure, and one probe per backoff after: a small share.
    let tries = accepted.load(Ordering::Relaxed);
    assert!(
        tries < (N / 20) as u64,
        "{policy:?} {bad:?}: the bad endpoint was tried {tries} times in {N} requests"
    );
    match bad {
        // A refused connection never took the request: a POST is safe to send elsewhere.
        Bad::Dead => assert!(
            post_failed * 1000 < N * 5,
            "{policy:?}: {post_failed} POSTs of {N} requests failed; {counts:?}"
        ),
        // A POST that reached a connection closed before any response may have been
        // processed, so it is not sent again: only those that were the bad endpoint's
        // probes fail.
        Bad::Reset => assert!(
            post_failed as u64 <= tries,
            "{post_failed} POSTs failed but only {tries} reached the bad endpoint"
        ),
    }
    let kind = match bad {
        Bad::Dead => "connect",
        Bad::Reset => "reset",
    };
    assert!(failures(&p, kind) >= 1.0, "{kind} failures not counted");
}

#[tokio::test]
async fn dead_endpoint_fails_no_request_by_default() {
    one_bad_of_three(None, Bad::Dead).await;
}

#[tokio::test]
async fn dead_endpoint_fails_no_request_round_robin_and_least_request() {
    one_bad_of_three(Some("RoundRobin"), Bad::Dead).await;
    one_bad_of_three(Some("LeastRequest"), Bad::Dead).await;
}

#[tokio::test]
async fn resetting_endpoint_is_backed_off_in_every_algorithm() {
    for policy in [None, Some("RoundRobin"), Some("LeastRequest")] {
        one_bad_of_three(policy, Bad::Reset).await;
    }
}

#[tokio::test]
async fn endpoint_answering_500_at_once_gets_little_traffic() {
    const N: usize = 600;
    let (a, b) = (upstream("a").await, upstream("b").await);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad_addr = listener.local_addr().unwrap();
    let bad_hits = serve(listener, "bad", 500);
    for policy in [None, Some("RoundRobin"), Some("LeastRequest")] {
        let (p, addr) = proxy_over(&[a.addr, bad_addr, b.addr], policy).await;
        let before = bad_hits.load(Ordering::Relaxed);
        let counts = load_counting(addr, N, 2).await;
        let hits = bad_hits.load(Ordering::Relaxed) - before;
        // Even shares would give it a third (200); fast 500s used to win it more.
        assert!(
            hits * 20 < N as u64,
            "{policy:?}: the endpoint answering 500 got {hits} of {N}: {counts:?}"
        );
        assert!(failures(&p, "5xx") >= 1.0, "{policy:?}: 5xx not counted");
    }
}

/// Like [`load`], tolerating non-200 answers.
async fn load_counting(addr: SocketAddr, total: usize, workers: usize) -> HashMap<String, u32> {
    let mut tasks = Vec::new();
    for _ in 0..workers {
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut counts = HashMap::<String, u32>::new();
            for _ in 0..total / workers {
                let got = get_via(&client, addr, "/").await;
                *counts.entry(got.upstream()).or_default() += 1;
            }
            counts
        }));
    }
    let mut all = HashMap::<String, u32>::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *all.entry(k).or_default() += v;
        }
    }
    all
}

#[tokio::test]
async fn dead_endpoint_gets_traffic_again_once_it_is_back() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let (bad_addr, _) = bad_endpoint(Bad::Dead).await;
    // Backoff alone: outlier detection (on by default) would eject it for 30 s after five
    // failures in a row; tests/health.rs covers that.
    let p = start_proxy(&format!(
        "{}{}---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: lb}}
spec:
  targetRef: {{kind: Service, name: app}}
  outlierDetection: {{consecutive5xx: 0, consecutiveGatewayErrors: 0}}
",
        proxy_yaml("app"),
        service_yaml("app", 8080, &[a.addr, bad_addr, b.addr])
    ))
    .await;
    let addr = p.addr("out").await;
    let client = h1_client();
    // Fail it a few times, so that it is well into its backoff.
    for _ in 0..200 {
        assert_eq!(get_via(&client, addr, "/").await.status, 200);
    }
    assert!(failures(&p, "connect") >= 1.0);
    let listener = TcpListener::bind(bad_addr)
        .await
        .expect("the dead endpoint's port is free again");
    let back = serve(listener, "back", 200);
    let revived = tokio::time::Instant::now();
    // The longest backoff is 3.2 s: it must be probed, and then chosen, within it.
    let limit = std::time::Duration::from_millis(3200 + 1500);
    while back.load(Ordering::Relaxed) < 5 {
        assert!(
            revived.elapsed() < limit,
            "the returned endpoint got {} requests in {limit:?}",
            back.load(Ordering::Relaxed)
        );
        assert_eq!(get_via(&client, addr, "/").await.status, 200);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}
