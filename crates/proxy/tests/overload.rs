//! Adaptive concurrency (`OverloadPolicy`) at an inbound sidecar, end to end: open-loop load
//! at three times a fixed-capacity app's capacity, through a real sidecar, with and without
//! the policy; priorities under overload; the limit following the app's latency; and a
//! caller's sidecar that does not hold a shed answer against the endpoint.
//!
//! Load-sensitive: the tests run one at a time (`SERIAL`), and `.config/nextest.toml` gives
//! this binary every CPU so nothing else runs beside it.

mod support;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::*;
use tokio::time::Instant;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The app serves this many requests at once …
const CAPACITY: usize = 8;
/// … each taking this long: 200 requests per second.
const SERVICE_MS: u64 = 40;
const CAPACITY_RPS: f64 = CAPACITY as f64 * 1000.0 / SERVICE_MS as f64;

const POLICY: &str = "apiVersion: trellis.dev/v1alpha1
kind: OverloadPolicy
metadata: {name: app-overload}
spec:
  targetRef: {kind: Service, name: app}
  priorities:
    - name: checkout
      priority: High
      matches: [{path: {type: PathPrefix, value: /high}}]
    - name: batch
      priority: Low
      matches: [{path: {type: PathPrefix, value: /low}}]
";

/// A sidecar with one inbound listener `in` for service `app` forwarding to `app`, plus
/// `extra` resources.
async fn sidecar(app: SocketAddr, extra: &str) -> TestProxy {
    start_proxy(&format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: test}}
spec:
  admin: {{address: 127.0.0.1:0}}
  requestTimeout: 30s
  inbound:
    - {{name: in, address: 127.0.0.1:0, forwardTo: '{app}', service: app, protocol: http}}
---
{}---
{extra}",
        service_yaml("app", 80, &[])
    ))
    .await
}

/// More file descriptors for the queue the run without a policy builds (two per request).
fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
}

/// What an open-loop run saw.
#[derive(Debug, Default)]
struct Run {
    /// Latencies of answered (200) requests, from when each was due.
    ok: Vec<Duration>,
    shed: usize,
    other: usize,
    /// One shed response's headers and body.
    shed_sample: Option<(http::HeaderMap, Bytes)>,
    /// From the first request's due time to the last answer.
    took: Duration,
}

impl Run {
    fn p99(&mut self) -> Duration {
        self.ok.sort();
        self.ok
            .get(self.ok.len() * 99 / 100)
            .copied()
            .unwrap_or(Duration::MAX)
    }
    fn total(&self) -> usize {
        self.ok.len() + self.shed + self.other
    }
}

/// Sends GET `path` at `rate` per second for `length`, each request at its due time whatever
/// the earlier ones did (open loop); waits for every answer (at most 30 s each).
async fn open_loop(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    path: &'static str,
    rate: f64,
    length: Duration,
) -> Run {
    let n = (rate * length.as_secs_f64()) as u32;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let due = start + Duration::from_secs_f64(f64::from(i) / rate);
        tokio::time::sleep_until(due).await;
        let client = client.clone();
        tasks.spawn(async move {
            let req = Request::get(format!("http://{addr}{path}"))
                .body(Full::default())
                .unwrap();
            let got = tokio::time::timeout(Duration::from_secs(30), async {
                let resp = client.request(req).await.ok()?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.ok()?.to_bytes();
                Some((parts.status, parts.headers, body))
            })
            .await
            .ok()
            .flatten();
            (got, due.elapsed())
        });
    }
    let mut run = Run::default();
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            (Some((StatusCode::OK, _, _)), took) => run.ok.push(took),
            (Some((StatusCode::SERVICE_UNAVAILABLE, headers, body)), _) => {
                run.shed += 1;
                run.shed_sample.get_or_insert((headers, body));
            }
            _ => run.other += 1,
        }
    }
    run.took = start.elapsed();
    run
}

/// The median latency of 20 requests one after another.
async fn unloaded(client: &Client<HttpConnector, Full<Bytes>>, addr: SocketAddr) -> Duration {
    let mut all = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get_via(client, addr, "/").await.status, StatusCode::OK);
        all.push(t.elapsed());
    }
    all.sort();
    all[all.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_policy_goodput_holds_and_p99_stays_near_unloaded_without_one_p99_grows() {
    let _serial = SERIAL.lock().await;
    raise_file_limit();
    let client = h2_client();
    let offered = 3.0 * CAPACITY_RPS;

    let app = capacity_app(CAPACITY, SERVICE_MS).await;
    let p = sidecar(app.addr, POLICY).await;
    let addr = p.addr("in").await;
    let base = unloaded(&client, addr).await;
    // The limiter measures the unloaded latency and finds the limit.
    open_loop(&client, addr, "/", CAPACITY_RPS, Duration::from_secs(1)).await;
    let length = Duration::from_secs(3);
    let mut with = open_loop(&client, addr, "/", offered, length).await;
    let goodput = with.ok.len() as f64 / with.took.as_secs_f64();
    let with_p99 = with.p99();

    let app = capacity_app(CAPACITY, SERVICE_MS).await;
    let p = sidecar(app.addr, "").await;
    let addr = p.addr("in").await;
    let length = Duration::from_secs(2);
    let mut without = open_loop(&client, addr, "/", offered, length).await;
    let without_p99 = without.p99();

    eprintln!(
        "capacity {CAPACITY_RPS}/s, offered {offered}/s, unloaded {base:?}\n\
         with the policy:    {} ok, {} shed, {} other; goodput {goodput:.0}/s; p99 {with_p99:?}\n\
         without the policy: {} ok, {} shed, {} other; p99 {without_p99:?}",
        with.ok.len(),
        with.shed,
        with.other,
        without.ok.len(),
        without.shed,
        without.other,
    );
    // Quiet, the figures are about 175/s and 3x; the bounds leave room for a busy machine.
    assert!(goodput >= 0.6 * CAPACITY_RPS, "goodput {goodput:.0}/s");
    assert!(with.shed > with.total() / 4, "{} shed", with.shed);
    assert!(with_p99 <= base * 8, "p99 {with_p99:?}, unloaded {base:?}");
    // Without the policy every request is let in and waits in the app's queue.
    assert_eq!(without.shed, 0);
    assert!(
        without_p99 >= base * 40 && without_p99 >= with_p99 * 5,
        "p99 {without_p99:?}, unloaded {base:?}, with the policy {with_p99:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_overload_high_priority_keeps_its_slots_and_low_is_shed() {
    let _serial = SERIAL.lock().await;
    let client = h2_client();
    let app = capacity_app(CAPACITY, SERVICE_MS).await;
    let p = sidecar(app.addr, POLICY).await;
    let addr = p.addr("in").await;
    open_loop(&client, addr, "/", CAPACITY_RPS, Duration::from_secs(1)).await;

    let length = Duration::from_secs(3);
    let (mut low, mut high) = tokio::join!(
        open_loop(&client, addr, "/low", 3.0 * CAPACITY_RPS, length),
        open_loop(&client, addr, "/high", CAPACITY_RPS / 8.0, length),
    );
    let (low_p99, high_p99) = (low.p99(), high.p99());
    eprintln!(
        "low: {} ok, {} shed, {} other, p99 {low_p99:?}; high: {} ok, {} shed, {} other, p99 {high_p99:?}",
        low.ok.len(),
        low.shed,
        low.other,
        high.ok.len(),
        high.shed,
        high.other,
    );
    assert!(
        high.ok.len() * 100 >= high.total() * 95,
        "high: {} of {}",
        high.ok.len(),
        high.total()
    );
    assert!(low.shed * 100 >= low.total() * 30, "low shed {}", low.shed);
    // What a remote caller reads: 503, Retry-After, a generic reason, no policy name.
    let (headers, body) = low.shed_sample.take().unwrap();
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["trellis-proxy-error"], "overloaded");
    let all = format!("{headers:?} {}", String::from_utf8_lossy(&body));
    assert!(!all.contains("app-overload"), "{all}");
    let decided = |priority: &str, decision: &str| {
        p.metric(&format!(
            "trellis_concurrency_decisions_total{{policy=\"default/app-overload\",priority=\"{priority}\",decision=\"{decision}\"}}"
        ))
    };
    assert_eq!(decided("low", "shed"), low.shed as f64);
    assert!(decided("high", "allowed") >= high.ok.len() as f64);
}

fn limit(p: &TestProxy) -> f64 {
    p.metric("trellis_concurrency_limit{policy=\"default/app-overload\"}")
}

/// Sends `rate` requests per second until `done` says so (or 10 s pass); returns whether it
/// did.
async fn load_until(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    rate: f64,
    done: impl Fn() -> bool,
) -> bool {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u32;
    while !done() {
        if start.elapsed() > Duration::from_secs(10) {
            return false;
        }
        tokio::time::sleep_until(start + Duration::from_secs_f64(f64::from(i) / rate)).await;
        i += 1;
        let client = client.clone();
        tasks.spawn(async move {
            let _ = get_via(&client, addr, "/").await;
        });
    }
    while tasks.join_next().await.is_some() {}
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_falls_when_the_app_slows_and_recovers_when_it_is_fast_again() {
    let _serial = SERIAL.lock().await;
    let client = h2_client();
    let app = capacity_app(CAPACITY, SERVICE_MS).await;
    let p = sidecar(app.addr, POLICY).await;
    let addr = p.addr("in").await;
    // Half the capacity: four requests at once, and room for more.
    let rate = CAPACITY_RPS / 2.0;
    assert!(
        load_until(&client, addr, rate, || limit(&p) >= 8.0).await,
        "limit {}",
        limit(&p)
    );
    let before = limit(&p);
    // A sick dependency: five times slower, so the same load is now too much.
    app.service_ms.store(SERVICE_MS * 5, Ordering::Relaxed);
    assert!(
        load_until(&client, addr, rate, || limit(&p) <= 5.0).await,
        "limit {} (was {before})",
        limit(&p)
    );
    let min_latency = p.metric("trellis_concurrency_min_latency_seconds{");
    assert!(min_latency < 0.1, "unloaded latency {min_latency}");
    // Healthy again: the limit grows back.
    app.service_ms.store(SERVICE_MS, Ordering::Relaxed);
    assert!(
        load_until(&client, addr, rate, || limit(&p) >= 8.0).await,
        "limit {} (was {before})",
        limit(&p)
    );
}

#[tokio::test]
async fn a_callers_sidecar_does_not_count_a_shed_answer_against_the_endpoint() {
    let _serial = SERIAL.lock().await;
    let shed = scripted_upstream("shed", |_, _| {
        Script::status(503).header("trellis-proxy-error", "overloaded")
    })
    .await;
    let broken = scripted_upstream("broken", |_, _| Script::status(503)).await;
    for (up, counted) in [(shed, false), (broken, true)] {
        let p = start_proxy(&format!(
            "{}{}---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: app}}
spec:
  targetRef: {{kind: Service, name: app}}
  outlierDetection: {{consecutive5xx: 2}}
",
            proxy_yaml("app"),
            service_yaml("app", 80, &[up.addr])
        ))
        .await;
        let addr = p.addr("out").await;
        for _ in 0..4 {
            assert_eq!(get(addr, "/").await.status, 503);
        }
        let failures = p.metric("trellis_endpoint_failures_total{");
        assert_eq!(failures > 0.0, counted, "failures {failures}");
    }
}

/// An HTTP/1.1 app that answers every request's head and first chunk at once and the rest of
/// the body when `end` turns true.
async fn streaming_app(end: tokio::sync::watch::Receiver<bool>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut end = end.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    let head =
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = end.wait_for(|e| *e).await;
                    if s.write_all(b"0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_slot_is_held_until_the_response_body_ends() {
    let _serial = SERIAL.lock().await;
    let (end, ends) = tokio::sync::watch::channel(false);
    let app = streaming_app(ends).await;
    let p = sidecar(
        app,
        "apiVersion: trellis.dev/v1alpha1
kind: OverloadPolicy
metadata: {name: one-at-a-time}
spec:
  targetRef: {kind: Service, name: app}
  adaptiveConcurrency: {minLimit: 1, maxLimit: 1}
",
    )
    .await;
    let addr = p.addr("in").await;
    let client = h1_client();
    let req = || {
        Request::get(format!("http://{addr}/"))
            .body(Full::default())
            .unwrap()
    };
    // Its head is here, its body still streaming: it holds the one slot.
    let streaming = client.request(req()).await.unwrap();
    assert_eq!(streaming.status(), StatusCode::OK);
    let second = tokio::time::timeout(Duration::from_secs(5), client.request(req()))
        .await
        .expect("no answer within 5 s")
        .unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    end.send(true).unwrap();
    let body = streaming.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    assert_eq!(send(&client, req()).await.status, StatusCode::OK);
}
