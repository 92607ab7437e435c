//! load-generator: an open-loop stream of orders at a fixed rate, so slow responses show up
//! as latency rather than as a lower request rate, with a one-line summary every 5 seconds.

use crate::web::{self, HttpClient};
use crate::{App, Config, DemoError, catalog};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request};
use http_body_util::Full;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Past this many unanswered requests, ticks are skipped rather than piling up.
const MAX_IN_FLIGHT: usize = 256;
/// Long enough for order-processing to time out all three of its 2-second calls.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);
/// How long requests still in flight at shutdown get to be counted.
const DRAIN: Duration = Duration::from_secs(2);

/// What the load generator saw, over one report window or the whole run.
#[derive(Clone, Debug, Default)]
pub struct LoadSummary {
    /// Requests answered or failed.
    pub requests: u64,
    /// Ticks dropped because `MAX_IN_FLIGHT` requests were outstanding.
    pub skipped: u64,
    /// Counts by status code, or `"error"` when no answer came.
    pub by_status: BTreeMap<String, u64>,
    /// Counts by the `catalog_version` in answers that carry one.
    pub by_version: BTreeMap<String, u64>,
}

impl LoadSummary {
    fn add(&mut self, status: &str, version: Option<&str>) {
        self.requests += 1;
        *self.by_status.entry(status.to_owned()).or_default() += 1;
        if let Some(v) = version {
            *self.by_version.entry(v.to_owned()).or_default() += 1;
        }
    }

    /// `load-generator: 100 requests in 5s: 201×95 502×5; catalog v1×90 v2×10; p50 3.1ms ...`
    fn line(&self, elapsed: Duration, latencies: &mut [Duration]) -> String {
        let secs = elapsed.as_secs_f64();
        let secs = if (secs - secs.round()).abs() < 0.05 {
            format!("{secs:.0}s")
        } else {
            format!("{secs:.1}s")
        };
        let mut line = format!(
            "{}: {} requests in {secs}:",
            App::Load.name(),
            self.requests
        );
        let mut statuses: Vec<_> = self.by_status.iter().collect();
        statuses.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (status, n) in statuses {
            let _ = write!(line, " {status}×{n}");
        }
        if !self.by_version.is_empty() {
            line.push_str("; catalog");
            for (version, n) in &self.by_version {
                let _ = write!(line, " {version}×{n}");
            }
        }
        if !latencies.is_empty() {
            latencies.sort_unstable();
            let at = |q: f64| {
                let i = ((latencies.len() - 1) as f64 * q).round() as usize;
                latencies[i].as_secs_f64() * 1000.0
            };
            let _ = write!(line, "; p50 {:.1}ms p99 {:.1}ms", at(0.5), at(0.99));
        }
        if self.skipped > 0 {
            let _ = write!(line, "; skipped×{}", self.skipped);
        }
        line
    }
}

#[derive(Default)]
struct Tally {
    window: LoadSummary,
    latencies: Vec<Duration>,
    total: LoadSummary,
}

struct Shared {
    client: HttpClient,
    target: String,
    tally: Mutex<Tally>,
    /// The newest order placed, so some requests can read one back (0: none yet).
    last_order: AtomicU64,
}

/// Sends requests to `TARGET_URL` at `RATE` per second until `shutdown` resolves, printing a
/// summary line every 5 seconds and one for the final partial window; returns the totals.
pub async fn generate(
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<LoadSummary, DemoError> {
    let target = config.target_url.clone().ok_or(DemoError::Missing {
        app: App::Load.name(),
        var: "TARGET_URL",
    })?;
    tracing::info!(app = App::Load.name(), %target, rate = config.rate, "demo app started");
    let shared = Arc::new(Shared {
        client: web::client(),
        target,
        tally: Mutex::default(),
        last_order: AtomicU64::new(0),
    });
    let products: Vec<u32> = catalog::product_ids().collect();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut requests = JoinSet::new();
    // Skipping missed ticks keeps a stalled loop from bursting above the rate afterwards.
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut reports = tokio::time::interval_at(Instant::now() + REPORT_EVERY, REPORT_EVERY);
    let mut window_start = Instant::now();
    let mut sent: usize = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = reports.tick() => {
                println!("{}", shared.report(window_start.elapsed()));
                window_start = Instant::now();
            }
            _ = ticks.tick() => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    shared.tally().window.skipped += 1;
                    shared.tally().total.skipped += 1;
                    continue;
                };
                let product = products[sent % products.len()];
                let read_back = sent % 5 == 4;
                sent += 1;
                let shared = shared.clone();
                requests.spawn(async move {
                    shared.request(product, read_back).await;
                    drop(slot);
                });
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
    let drained = async { while requests.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(DRAIN, drained).await;
    requests.abort_all();
    if shared.tally().window.requests > 0 {
        println!("{}", shared.report(window_start.elapsed()));
    }
    Ok(shared.tally().total.clone())
}

impl Shared {
    /// Places an order, or every fifth time reads the newest one back.
    async fn request(&self, product: u32, read_back: bool) {
        let last = self.last_order.load(Ordering::Relaxed);
        let (method, path, body) = if read_back && last > 0 {
            (Method::GET, format!("/orders/{last}"), Bytes::new())
        } else {
            let order = json!({ "product_id": product, "quantity": 1 });
            (
                Method::POST,
                "/orders".to_owned(),
                Bytes::from(order.to_string()),
            )
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.target))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body));
        let started = Instant::now();
        let reply = match req {
            Ok(req) => web::send(&self.client, req, REQUEST_TIMEOUT).await.ok(),
            Err(_) => None,
        };
        let latency = started.elapsed();
        let body = reply.as_ref().and_then(|r| r.json()).unwrap_or_default();
        if let Some(id) = body.get("order_id").and_then(Value::as_u64) {
            self.last_order.fetch_max(id, Ordering::Relaxed);
        }
        let status = reply.map_or_else(|| "error".to_owned(), |r| r.status.as_u16().to_string());
        let version = body.get("catalog_version").and_then(Value::as_str);
        let mut tally = self.tally();
        tally.window.add(&status, version);
        tally.total.add(&status, version);
        tally.latencies.push(latency);
    }

    /// The current window's line; starts the next window.
    fn report(&self, elapsed: Duration) -> String {
        let mut tally = self.tally();
        let mut latencies = std::mem::take(&mut tally.latencies);
        std::mem::take(&mut tally.window).line(elapsed, &mut latencies)
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_orders_statuses_by_count() {
        let mut s = LoadSummary::default();
        for _ in 0..3 {
            s.add("201", Some("v1"));
        }
        s.add("502", None);
        s.add("201", Some("v2"));
        let mut latencies = [3, 1, 2, 4, 5].map(Duration::from_millis);
        assert_eq!(
            s.line(Duration::from_secs(5), &mut latencies),
            "load-generator: 5 requests in 5s: 201×4 502×1; catalog v1×3 v2×1; p50 3.0ms p99 5.0ms"
        );
        let empty = LoadSummary::default().line(Duration::from_millis(2300), &mut []);
        assert_eq!(empty, "load-generator: 0 requests in 2.3s:");
    }
}
