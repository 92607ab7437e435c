//! Adaptive concurrency with priorities (`OverloadPolicy`), at a service's own sidecars.
//!
//! The [`Limiter`] is a pure state machine over latency samples, the in-flight count and the
//! clock: it measures the service's unloaded latency (a probe at `minLimit` concurrency, at
//! start and every [`PROBE_EVERY`]), then moves the limit by the gradient between that
//! latency (with [`TOLERANCE`]) and the median latency of each sample window: down when
//! latency rises above it, up (by the square root of the limit) while it stays near it and
//! the limit is in use. Admission ([`cap`]) keeps headroom for higher priorities instead of
//! queueing: a request over its priority's cap is shed at once.

use crate::error::ProxyError;
use crate::route::{HttpMatch, RequestView};
use http::request::Parts;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;
use trellis_api::ratelimit::{OverloadPolicySpec, Priority};
use trellis_api::{Located, Resource};

/// The latency a window may reach over the unloaded one before the limit falls: some
/// queueing is what keeps the service busy.
pub const TOLERANCE: f64 = 1.25;
/// Shortest sample window (Envoy's default update interval).
pub const WINDOW: Duration = Duration::from_millis(100);
/// Fewest samples that close a window: a median of fewer is noise.
pub const WINDOW_SAMPLES: usize = 10;
/// Samples a probe of the unloaded latency takes.
pub const PROBE_SAMPLES: usize = 16;
/// How often the unloaded latency is measured again (plus up to a quarter, at random, so
/// that a service's sidecars do not probe together).
pub const PROBE_EVERY: Duration = Duration::from_secs(30);

/// The adaptive limit of one policy (at one sidecar).
#[derive(Debug, Clone)]
pub struct Limiter {
    min: u32,
    max: u32,
    limit: f64,
    in_flight: u32,
    min_latency: Option<Duration>,
    /// While the unloaded latency is measured: since when, and the samples so far.
    probe: Option<(Instant, Vec<Duration>)>,
    window: Vec<Duration>,
    window_start: Instant,
    /// Most requests in flight at once during the window: the limit grows only if used.
    window_peak: u32,
    next_probe: Instant,
    /// In `[0, 1)`: this limiter's share of the probe interval's spread.
    jitter: f64,
}

impl Limiter {
    /// A limiter that first measures the unloaded latency (at `min` concurrency).
    pub fn new(min: u32, max: u32, now: Instant, jitter: f64) -> Limiter {
        Limiter {
            min,
            max,
            limit: f64::from(min),
            in_flight: 0,
            min_latency: None,
            probe: Some((now, Vec::new())),
            window: Vec::new(),
            window_start: now,
            window_peak: 0,
            next_probe: now,
            jitter,
        }
    }

    /// New bounds (a reload): the learned limit is kept, within them.
    pub fn set_bounds(&mut self, min: u32, max: u32) {
        self.min = min;
        self.max = max;
        self.limit = self.limit.clamp(f64::from(min), f64::from(max));
    }

    /// Requests let in at once now (`minLimit` while probing).
    pub fn limit(&self) -> u32 {
        if self.probe.is_some() {
            self.min
        } else {
            self.limit as u32
        }
    }

    /// Requests holding a slot.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// The unloaded latency, once measured.
    pub fn min_latency(&self) -> Option<Duration> {
        self.min_latency
    }

    /// Whether the unloaded latency is being measured.
    pub fn probing(&self) -> bool {
        self.probe.is_some()
    }

    /// Takes a slot if `priority`'s cap allows.
    pub fn try_acquire(&mut self, priority: Priority, has_high: bool) -> bool {
        if self.in_flight >= cap(self.limit(), priority, has_high) {
            return false;
        }
        self.in_flight += 1;
        self.window_peak = self.window_peak.max(self.in_flight);
        true
    }

    /// Gives a slot back. `sample` is the time from its admission (`admitted`) to the
    /// response head; `None` when no response came (it says nothing about latency).
    pub fn release(&mut self, admitted: Instant, sample: Option<Duration>, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(rtt) = sample else { return };
        if let Some((since, samples)) = &mut self.probe {
            // Only requests admitted under the probe's concurrency measure it.
            if admitted >= *since {
                samples.push(rtt);
            }
            if samples.len() >= PROBE_SAMPLES {
                self.min_latency = Some(median(samples));
                self.probe = None;
                self.next_probe = now + PROBE_EVERY.mul_f64(1.0 + self.jitter / 4.0);
                self.start_window(now);
            }
            return;
        }
        self.window.push(rtt);
        if now - self.window_start < WINDOW || self.window.len() < WINDOW_SAMPLES {
            return;
        }
        let s = median(&mut self.window).max(Duration::from_micros(1));
        // A faster service is believed at once; a slower one only by the next probe.
        let m = self.min_latency.map_or(s, |m| m.min(s));
        self.min_latency = Some(m);
        let gradient = (m.as_secs_f64() * TOLERANCE / s.as_secs_f64()).clamp(0.5, 2.0);
        let used = f64::from(self.window_peak) >= self.limit / 2.0;
        let mut next = self.limit * gradient;
        if used {
            next += self.limit.sqrt();
        } else {
            // A limit that is not reached is not tested: it must not grow.
            next = next.min(self.limit);
        }
        self.limit = next.clamp(f64::from(self.min), f64::from(self.max));
        self.start_window(now);
        if now >= self.next_probe {
            self.probe = Some((now, Vec::new()));
        }
    }

    fn start_window(&mut self, now: Instant) {
        self.window.clear();
        self.window_start = now;
        self.window_peak = self.in_flight;
    }
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// How many requests of `priority` may be in flight under `limit`: `Low` leaves a quarter
/// to the others, `Normal` a tenth to `High` when the policy has a `High` class. At least
/// one, so that a lone request always passes.
pub fn cap(limit: u32, priority: Priority, has_high: bool) -> u32 {
    let reserve = match priority {
        Priority::High => 0,
        Priority::Normal if has_high => limit.div_ceil(10),
        Priority::Normal => 0,
        Priority::Low => limit.div_ceil(4),
    };
    limit.saturating_sub(reserve).max(1)
}

/// One `priorities[]` class, compiled.
#[derive(Debug)]
struct Class {
    priority: Priority,
    matches: Vec<HttpMatch>,
    identities: Vec<String>,
    namespaces: Vec<String>,
}

impl Class {
    fn matches(&self, req: &RequestView<'_>, peer: Option<&str>) -> bool {
        if !self.identities.is_empty()
            && !peer.is_some_and(|p| self.identities.iter().any(|i| i == p))
        {
            return false;
        }
        if !self.namespaces.is_empty()
            && !peer
                .and_then(crate::authz::namespace_of)
                .is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
        {
            return false;
        }
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(req).is_some())
    }
}

/// A policy's carried state: its limiter and decision counts, kept across reloads.
#[derive(Debug)]
pub struct State {
    policy: Arc<str>,
    limiter: Mutex<Limiter>,
    /// Allowed and shed, by priority (low, normal, high).
    decisions: [[AtomicU64; 2]; 3],
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the limiter, for tests and the metrics.
    pub fn limiter(&self) -> Limiter {
        self.lock().clone()
    }
}

/// An inbound listener's admission: its service's policy, compiled, over the carried state.
#[derive(Debug)]
pub struct Gate {
    /// `namespace/name` of the policy.
    pub policy: Arc<str>,
    classes: Vec<Class>,
    has_high: bool,
    retry_after: Duration,
    state: Arc<State>,
}

impl Gate {
    /// The priority of a request: its first matching class's, else `Normal`.
    pub fn classify(&self, parts: &Parts, peer: Option<&str>) -> Priority {
        let view = RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        self.classes
            .iter()
            .find(|c| c.matches(&view, peer))
            .map_or(Priority::Normal, |c| c.priority)
    }

    /// A slot for the request, or the shed error.
    pub fn admit(&self, priority: Priority) -> Result<Slot, ProxyError> {
        let now = Instant::now();
        let ok = self.state.lock().try_acquire(priority, self.has_high);
        self.state.decisions[priority_index(priority)][usize::from(!ok)]
            .fetch_add(1, Ordering::Relaxed);
        if ok {
            Ok(Slot {
                state: self.state.clone(),
                admitted: now,
                answered: None,
            })
        } else {
            Err(ProxyError::Shed(self.policy.clone(), self.retry_after))
        }
    }

    /// The carried state.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }
}

fn priority_index(p: Priority) -> usize {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
    }
}

/// Step `0b.` of the request path: a slot when the listener has a policy (none without),
/// or the shed error, noted in the access log and span.
pub fn admit(
    listener: &crate::snapshot::Listener,
    parts: &Parts,
    peer: Option<&str>,
    hop: &mut crate::hop::Hop,
) -> Result<Option<Slot>, ProxyError> {
    let crate::snapshot::ListenerKind::Inbound {
        overload: Some(gate),
        ..
    } = &listener.kind
    else {
        return Ok(None);
    };
    let slot = gate.admit(gate.classify(parts, peer));
    if slot.is_err() {
        hop.policy(&gate.policy);
        hop.reason("shed");
    }
    slot.map(Some)
}

/// Whether an upstream response is another sidecar's shed answer (`503`, reason
/// `overloaded`: an inbound sidecar has no circuit breaker, so only shedding says so).
/// Callers do not count it against the endpoint: ejecting an instance because it sheds
/// would move its load onto the others and cascade.
pub fn is_shed<B>(resp: &http::Response<B>) -> bool {
    resp.status() == http::StatusCode::SERVICE_UNAVAILABLE
        && resp
            .headers()
            .get(crate::error::ERROR_HEADER)
            .is_some_and(|v| v == "overloaded")
}

/// A concurrency slot, held until the response body ends (or the request fails); it gives
/// the limiter its latency sample when dropped.
#[derive(Debug)]
pub struct Slot {
    state: Arc<State>,
    admitted: Instant,
    answered: Option<Instant>,
}

impl Slot {
    /// The response head arrived at `at`: the latency sample.
    pub fn answered(&mut self, at: Instant) {
        self.answered = Some(at);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let sample = self
            .answered
            .map(|a| a.saturating_duration_since(self.admitted));
        self.state
            .lock()
            .release(self.admitted, sample, Instant::now());
    }
}

/// The gate of an inbound listener of `service` in `namespace`: the OverloadPolicy that
/// targets it, over the state `previous` had for that policy (a reload keeps the learned
/// limit), recorded in `states` and `live`.
pub fn gate_for(
    resources: &[Located<Resource>],
    namespace: &str,
    service: Option<&str>,
    previous: Option<&HashMap<Arc<str>, Arc<State>>>,
    states: &mut HashMap<Arc<str>, Arc<State>>,
    live: &Live,
) -> Result<Option<Arc<Gate>>, String> {
    let Some(service) = service else {
        return Ok(None);
    };
    let Some((name, spec)) = resources.iter().find_map(|r| match &r.value {
        Resource::OverloadPolicy(p)
            if p.metadata.namespace == namespace && p.spec.target_ref.name == service =>
        {
            Some((format!("{namespace}/{}", p.metadata.name), &p.spec))
        }
        _ => None,
    }) else {
        return Ok(None);
    };
    let policy: Arc<str> = name.into();
    let ac = &spec.adaptive_concurrency;
    let state = match states
        .get(&policy)
        .or_else(|| previous.and_then(|p| p.get(&policy)))
    {
        Some(s) => {
            s.lock().set_bounds(ac.min_limit, ac.max_limit);
            s.clone()
        }
        None => {
            let jitter = crate::rand::u64() as f64 / u64::MAX as f64;
            let s = Arc::new(State {
                policy: policy.clone(),
                limiter: Mutex::new(Limiter::new(
                    ac.min_limit,
                    ac.max_limit,
                    Instant::now(),
                    jitter,
                )),
                decisions: Default::default(),
            });
            live.add(&s);
            s
        }
    };
    states.insert(policy.clone(), state.clone());
    Ok(Some(Arc::new(compile(policy, spec, state)?)))
}

fn compile(policy: Arc<str>, spec: &OverloadPolicySpec, state: Arc<State>) -> Result<Gate, String> {
    let classes = spec
        .priorities
        .iter()
        .map(|c| {
            Ok(Class {
                priority: c.priority,
                matches: c
                    .matches
                    .iter()
                    .map(crate::snapshot::compile_http_match)
                    .collect::<Result<_, String>>()?,
                identities: c
                    .from
                    .as_ref()
                    .map(|f| f.identities.clone())
                    .unwrap_or_default(),
                namespaces: c
                    .from
                    .as_ref()
                    .map(|f| f.namespaces.clone())
                    .unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Gate {
        policy,
        has_high: classes.iter().any(|c| c.priority == Priority::High),
        classes,
        retry_after: spec.adaptive_concurrency.retry_after.get(),
        state,
    })
}

/// Every policy state some snapshot still holds, for the metrics (a removed policy's
/// series go with its last snapshot).
#[derive(Debug, Default)]
pub struct Live(Mutex<Vec<Weak<State>>>);

impl Live {
    fn add(&self, s: &Arc<State>) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(s));
    }

    fn states(&self) -> Vec<Arc<State>> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    }
}

/// The `trellis_concurrency_*` families, read at scrape time.
pub fn collector(live: &Arc<Live>) -> Box<dyn prometheus_client::collector::Collector> {
    Box::new(Collector(live.clone()))
}

#[derive(Debug)]
struct Collector(Arc<Live>);

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let states = self.0.states();
        let now: Vec<(Arc<str>, Limiter)> = states
            .iter()
            .map(|s| (s.policy.clone(), s.limiter()))
            .collect();
        type Read = fn(&Limiter) -> f64;
        let gauges: [(&str, &str, Read); 3] = [
            (
                "concurrency_limit",
                "Requests an OverloadPolicy lets in at once now (adaptive), by policy",
                |l| f64::from(l.limit()),
            ),
            (
                "concurrency_in_flight",
                "Requests holding a concurrency slot now, by policy",
                |l| f64::from(l.in_flight()),
            ),
            (
                "concurrency_min_latency_seconds",
                "The unloaded latency the adaptive limit is measured against (0 until measured), by policy",
                |l| l.min_latency().map_or(0.0, |d| d.as_secs_f64()),
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (policy, l) in &now {
                let labels = [("policy", policy.as_ref())];
                ConstGauge::new(value(l)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "concurrency_decisions",
            "Admission decisions of OverloadPolicies, by policy, priority and decision (allowed, shed)",
            None,
            MetricType::Counter,
        )?;
        for s in &states {
            for (i, priority) in ["low", "normal", "high"].into_iter().enumerate() {
                for (j, decision) in ["allowed", "shed"].into_iter().enumerate() {
                    let labels = [
                        ("policy", s.policy.as_ref()),
                        ("priority", priority),
                        ("decision", decision),
                    ];
                    let n = s.decisions[i][j].load(Ordering::Relaxed);
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs `n` windows in which `concurrency` requests (at most the limit) each take
    /// `latency(in_flight)`; returns the limit after each window.
    fn drive(
        l: &mut Limiter,
        now: &mut Instant,
        windows: usize,
        offered: u32,
        latency: impl Fn(u32) -> Duration,
    ) -> Vec<u32> {
        let mut limits = Vec::new();
        for _ in 0..windows {
            let end = *now + WINDOW;
            while *now < end {
                let mut admitted = Vec::new();
                for _ in 0..offered {
                    if l.try_acquire(Priority::Normal, false) {
                        admitted.push(*now);
                    }
                }
                let rtt = latency(l.in_flight());
                *now += rtt;
                for at in admitted {
                    l.release(at, Some(rtt), *now);
                }
            }
            limits.push(l.limit());
        }
        limits
    }

    /// A service that does `capacity` requests at once in `service` time and queues the
    /// rest.
    fn queueing(capacity: u32, service: Duration) -> impl Fn(u32) -> Duration {
        move |n| service.mul_f64(f64::from(n.max(capacity)) / f64::from(capacity))
    }

    #[test]
    fn caps_keep_headroom_for_higher_priorities() {
        let cases = [
            // (limit, priority, has_high, cap)
            (20, Priority::High, true, 20),
            (20, Priority::Normal, true, 18),
            (20, Priority::Normal, false, 20),
            (20, Priority::Low, true, 15),
            (20, Priority::Low, false, 15),
            (4, Priority::Low, true, 3),
            (4, Priority::Normal, true, 3),
            (1, Priority::Low, true, 1),
            (1, Priority::High, true, 1),
        ];
        for (limit, p, high, want) in cases {
            assert_eq!(cap(limit, p, high), want, "{limit} {p:?} {high}");
        }
    }

    #[test]
    fn probes_first_then_grows_while_latency_stays_unloaded() {
        let mut now = Instant::now();
        let mut l = Limiter::new(4, 1000, now, 0.0);
        assert!(l.probing());
        assert_eq!(l.limit(), 4);
        // A service that never queues (capacity far above the offered load).
        let limits = drive(&mut l, &mut now, 12, 60, queueing(1000, ms(20)));
        assert_eq!(l.min_latency(), Some(ms(20)));
        assert!(!l.probing());
        assert!(limits.windows(2).all(|w| w[1] >= w[0]), "{limits:?}");
        assert!(*limits.last().unwrap() >= 50, "{limits:?}");
    }

    #[test]
    fn settles_near_capacity_when_latency_rises() {
        let mut now = Instant::now();
        let mut l = Limiter::new(4, 1000, now, 0.0);
        let limits = drive(&mut l, &mut now, 40, 200, queueing(16, ms(20)));
        assert_eq!(l.min_latency(), Some(ms(20)));
        // Near 16, not at the 200 offered: the gradient holds latency near 1.25x unloaded.
        let last = &limits[30..];
        assert!(last.iter().all(|&n| (14..=32).contains(&n)), "{limits:?}");
    }

    #[test]
    fn bounds_hold() {
        let mut now = Instant::now();
        let mut l = Limiter::new(5, 12, now, 0.0);
        let limits = drive(&mut l, &mut now, 20, 100, queueing(1000, ms(10)));
        assert!(limits.iter().all(|&n| (5..=12).contains(&n)), "{limits:?}");
        assert_eq!(*limits.last().unwrap(), 12);
        // A service many times slower than it was: the limit falls to the floor.
        let limits = drive(&mut l, &mut now, 10, 100, |_| ms(80));
        assert_eq!(*limits.last().unwrap(), 5, "{limits:?}");
        l.set_bounds(6, 8);
        assert_eq!(l.limit(), 6);
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        let mut now = Instant::now();
        let mut l = Limiter::new(4, 1000, now, 0.0);
        let limits = drive(&mut l, &mut now, 10, 60, queueing(1000, ms(20)));
        let high = *limits.last().unwrap();
        // Two requests at a time: far below the limit.
        let limits = drive(&mut l, &mut now, 10, 2, queueing(1000, ms(20)));
        assert!(limits.iter().all(|&n| n == high), "{high} {limits:?}");
    }

    #[test]
    fn a_probe_remeasures_a_slower_service_and_the_limit_recovers() {
        let mut now = Instant::now();
        let mut l = Limiter::new(4, 1000, now, 0.0);
        drive(&mut l, &mut now, 10, 60, queueing(1000, ms(20)));
        // The service becomes slower for good (no queueing, just 4x the time).
        let limits = drive(&mut l, &mut now, 16, 60, queueing(1000, ms(80)));
        assert_eq!(*limits.last().unwrap(), 4, "{limits:?}");
        assert_eq!(l.min_latency(), Some(ms(20)));
        // Until the next probe (30s on), then the slower latency is the new unloaded one.
        let windows = (PROBE_EVERY.as_millis() / ms(80).as_millis()) as usize;
        drive(&mut l, &mut now, windows, 60, queueing(1000, ms(80)));
        assert_eq!(l.min_latency(), Some(ms(80)));
        let limits = drive(&mut l, &mut now, 10, 60, queueing(1000, ms(80)));
        assert!(*limits.last().unwrap() >= 50, "{limits:?}");
    }

    #[test]
    fn a_faster_service_lowers_the_unloaded_latency_at_once() {
        let mut now = Instant::now();
        let mut l = Limiter::new(4, 1000, now, 0.0);
        drive(&mut l, &mut now, 5, 60, queueing(1000, ms(40)));
        assert_eq!(l.min_latency(), Some(ms(40)));
        drive(&mut l, &mut now, 2, 60, queueing(1000, ms(10)));
        assert_eq!(l.min_latency(), Some(ms(10)));
    }

    #[test]
    fn a_probe_ignores_requests_admitted_before_it() {
        let t0 = Instant::now();
        let mut l = Limiter::new(4, 1000, t0 + ms(5), 0.0);
        assert!(l.try_acquire(Priority::Normal, false));
        l.release(t0, Some(ms(500)), t0 + ms(505));
        for i in 0..PROBE_SAMPLES as u64 {
            assert!(l.try_acquire(Priority::Normal, false));
            l.release(t0 + ms(10 + i), Some(ms(20)), t0 + ms(30 + i));
        }
        assert_eq!(l.min_latency(), Some(ms(20)));
    }

    fn spec(yaml: &str) -> OverloadPolicySpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn parts(method: &str, uri: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn state() -> Arc<State> {
        Arc::new(State {
            policy: "shop/o".into(),
            limiter: Mutex::new(Limiter::new(4, 100, Instant::now(), 0.0)),
            decisions: Default::default(),
        })
    }

    #[test]
    fn the_first_matching_class_decides_and_unmatched_is_normal() {
        let gate = compile(
            "shop/o".into(),
            &spec(
                "targetRef: {kind: Service, name: catalog}\n\
                 priorities:\n\
                 - {name: checkout, priority: High, matches: [{path: {type: PathPrefix, value: /checkout}}]}\n\
                 - {name: batch, priority: Low, from: {namespaces: [batch]}}\n\
                 - {name: posts, priority: Low, matches: [{method: POST}]}\n",
            ),
            state(),
        )
        .unwrap();
        let batch = "spiffe://cluster.local/ns/batch/sa/job";
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let cases = [
            ("GET", "/checkout/1", Some(batch), Priority::High),
            ("GET", "/items", Some(batch), Priority::Low),
            ("GET", "/items", Some(web), Priority::Normal),
            ("GET", "/items", None, Priority::Normal),
            ("POST", "/items", Some(web), Priority::Low),
            ("POST", "/checkout", None, Priority::High),
            ("GET", "/checkoutx", Some(web), Priority::Normal),
        ];
        for (method, path, peer, want) in cases {
            assert_eq!(
                gate.classify(&parts(method, path), peer),
                want,
                "{method} {path} {peer:?}"
            );
        }
        assert!(gate.has_high);
    }

    #[test]
    fn a_shed_answer_is_503_or_unavailable_with_retry_after_and_no_policy_name() {
        use crate::error::Audience;
        let e = ProxyError::Shed("shop/secret-policy".into(), Duration::from_secs(2));
        for grpc in [false, true] {
            let r = e.clone().into_response(grpc, Audience::Remote);
            assert_eq!(r.headers()["retry-after"], "2");
            assert_eq!(r.headers()[crate::error::ERROR_HEADER], "overloaded");
            assert!(!format!("{:?}", r.headers()).contains("secret"));
            if grpc {
                assert_eq!(r.headers()["grpc-status"], "14");
            } else {
                assert_eq!(r.status(), http::StatusCode::SERVICE_UNAVAILABLE);
                assert!(is_shed(&r));
            }
        }
        let plain = http::Response::builder().status(503).body(()).unwrap();
        assert!(!is_shed(&plain));
    }

    #[test]
    fn a_reload_keeps_the_learned_limit_and_a_removed_policy_leaves_the_metrics() {
        let shared = crate::Shared::new();
        let yaml = |policy: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: p}}
spec:
  admin: {{address: 127.0.0.1:0}}
  inbound: [{{name: in, address: 127.0.0.1:0, forwardTo: 127.0.0.1:7001, service: app}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: app}}
spec: {{ports: [{{port: 80}}]}}
{policy}"
            )
        };
        let policy = |min: u32| {
            format!(
                "---
apiVersion: trellis.dev/v1alpha1
kind: OverloadPolicy
metadata: {{name: o}}
spec: {{targetRef: {{kind: Service, name: app}}, adaptiveConcurrency: {{minLimit: {min}}}}}
"
            )
        };
        let build = |yaml: &str, previous| {
            let resources = trellis_api::parse_documents("t.yaml", yaml).unwrap();
            crate::snapshot::Snapshot::build(&resources, 1, "t.yaml", previous, &shared).unwrap()
        };
        let gate = |snap: &crate::snapshot::Snapshot| match &snap.listeners[0].kind {
            crate::snapshot::ListenerKind::Inbound { overload, .. } => overload.clone(),
            _ => None,
        };
        let first = build(&yaml(&policy(4)), None);
        let state = first.overloads["default/o"].clone();
        assert!(Arc::ptr_eq(gate(&first).unwrap().state(), &state));
        {
            let mut l = state.lock();
            let now = Instant::now();
            for _ in 0..PROBE_SAMPLES {
                assert!(l.try_acquire(Priority::Normal, false));
                l.release(now, Some(ms(20)), now);
            }
        }
        let second = build(&yaml(&policy(6)), Some(&first));
        assert!(Arc::ptr_eq(&second.overloads["default/o"], &state));
        assert!(Arc::ptr_eq(gate(&second).unwrap().state(), &state));
        let l = state.limiter();
        assert_eq!(l.min_latency(), Some(ms(20)));
        assert_eq!(l.limit(), 6);
        let limit = "trellis_concurrency_limit{policy=\"default/o\"} 6";
        assert!(shared.metrics.encode().contains(limit));
        let third = build(&yaml(""), Some(&second));
        assert!(third.overloads.is_empty() && gate(&third).is_none());
        drop((first, second, state));
        assert!(!shared.metrics.encode().contains("policy=\"default/o\""));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_held_until_dropped_and_give_their_latency() {
        let gate = compile(
            "shop/o".into(),
            &spec("targetRef: {kind: Service, name: catalog}\nadaptiveConcurrency: {retryAfter: 3s}\n"),
            state(),
        )
        .unwrap();
        let mut slots = Vec::new();
        for _ in 0..4 {
            slots.push(gate.admit(Priority::Normal).unwrap());
        }
        match gate.admit(Priority::High) {
            Err(ProxyError::Shed(p, after)) => {
                assert_eq!(&*p, "shop/o");
                assert_eq!(after, Duration::from_secs(3));
            }
            other => panic!("{other:?}"),
        }
        // The probe: PROBE_SAMPLES answers of 20ms (the head), bodies ending later.
        let mut answered = 0;
        while answered < PROBE_SAMPLES {
            tokio::time::advance(ms(20)).await;
            for s in &mut slots {
                s.answered(Instant::now());
            }
            tokio::time::advance(ms(50)).await;
            answered += slots.len();
            slots.clear();
            for _ in 0..4 {
                slots.push(gate.admit(Priority::Normal).unwrap());
            }
        }
        let l = gate.state().limiter();
        assert_eq!(l.min_latency(), Some(ms(20)));
        assert_eq!(l.in_flight(), 4);
        drop(slots);
        assert_eq!(gate.state().limiter().in_flight(), 0);
        let d = &gate.state().decisions;
        assert_eq!(d[2][1].load(Ordering::Relaxed), 1);
    }
}
