//! Outlier detection: endpoints that keep failing, or are much slower than their peers, are
//! ejected from balancing for a time that grows with each repeated ejection.
//!
//! The decisions are a small state machine ([`Detector`]) over outcomes and `now`, plus two
//! pure functions ([`may_eject`], [`latency_outlier`]); [`report`] is the one place the
//! request path hands an attempt's outcome to an endpoint, and it does the locking around
//! them. An ejected endpoint is out of every algorithm's choice (see `balance::Load::rank`)
//! until its time is up; then it is probed one request at a time until one succeeds, and a
//! failure while probing ejects it again at once.

use crate::endpoint::EndpointState;
use crate::metrics::Metrics;
use crate::snapshot::Backend;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use trellis_api::health::OutlierDetection;

/// Latency samples an endpoint needs before it can be a latency outlier.
pub const MIN_LATENCY_SAMPLES: u32 = 5;
/// Weight of a new latency sample in an endpoint's average.
const LATENCY_WEIGHT: f64 = 0.2;

/// A backend's outlier detection settings, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Consecutive 5xx (or gateway failures) that eject; 0 disables.
    pub consecutive_5xx: u32,
    /// Consecutive gateway failures that eject; 0 disables.
    pub consecutive_gateway: u32,
    /// `(factor, floor)` of the latency rule, if on.
    pub latency: Option<(f64, Duration)>,
    /// Latency check period, and the good behaviour that takes one off the ejection count.
    pub interval: Duration,
    /// First ejection's time.
    pub base: Duration,
    /// Longest ejection.
    pub max: Duration,
    /// Most endpoints ejected at once, percent.
    pub max_percent: u32,
}

impl Policy {
    /// Compiles the config.
    pub fn new(spec: &OutlierDetection) -> Policy {
        Policy {
            consecutive_5xx: spec.consecutive_5xx,
            consecutive_gateway: spec.consecutive_gateway_errors,
            latency: spec
                .latency
                .as_ref()
                .map(|l| (l.factor, l.min_latency.get())),
            interval: spec.interval.get(),
            base: spec.base_ejection_time.get(),
            max: spec.max_ejection_time.get(),
            max_percent: spec.max_ejection_percent,
        }
    }
}

impl Policy {
    /// The compiled config, or `None` when every trigger is off.
    pub fn on(spec: &OutlierDetection) -> Option<Policy> {
        let p = Policy::new(spec);
        (p.consecutive_5xx > 0 || p.consecutive_gateway > 0 || p.latency.is_some()).then_some(p)
    }
}

impl Default for Policy {
    fn default() -> Policy {
        Policy::new(&OutlierDetection::default())
    }
}

/// One attempt's outcome, as far as outlier detection cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A 5xx response other than 502, 503, 504.
    ServerError,
    /// A connect failure, reset, timeout or protocol error, or a 502, 503 or 504 response.
    Gateway,
}

impl Outcome {
    /// The outcome of a response with `status`.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            502..=504 => Outcome::Gateway,
            500..=599 => Outcome::ServerError,
            _ => Outcome::Success,
        }
    }
}

/// Why an endpoint was ejected (the metric's `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `consecutive5xx` reached (gateway failures count as 5xx too).
    Consecutive5xx,
    /// `consecutiveGatewayErrors` reached.
    GatewayErrors,
    /// Latency average far above the peers' median.
    Latency,
    /// Failed while being probed after an ejection.
    Probe,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Consecutive5xx => "consecutive_5xx",
            Reason::GatewayErrors => "gateway_errors",
            Reason::Latency => "latency",
            Reason::Probe => "probe_failed",
        }
    }
}

/// One endpoint's outlier state (the state machine; no I/O, no clock of its own).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detector {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Ejections that still count towards the next one's length.
    times: u32,
    /// Ejected until then.
    until: Option<Instant>,
    /// Back from an ejection, not yet answered well.
    probing: bool,
    /// Since when good behaviour counts towards taking one off `times`.
    calm_since: Option<Instant>,
    /// Latency average, seconds, and how many samples it holds.
    latency: f64,
    samples: u32,
    /// No latency comparison before then.
    next_latency_check: Option<Instant>,
    /// Why it was last ejected.
    reason: Option<Reason>,
    /// The same in words, with the threshold of the policy that ejected it (the endpoint's
    /// state is shared by every backend that holds it, each with its own thresholds).
    described: Option<std::sync::Arc<str>>,
}

impl Detector {
    /// Whether the endpoint is ejected at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Until when it is ejected (possibly past).
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Why it was last ejected, if ever.
    pub fn reason(&self) -> Option<Reason> {
        self.reason
    }

    /// Why it was last ejected, in words, as the ejecting policy put it.
    pub fn described(&self) -> Option<&str> {
        self.described.as_deref()
    }

    /// Ejections that count towards the next one's length.
    pub fn times(&self) -> u32 {
        self.times
    }

    /// Back from an ejection and not yet answered well: taken one request at a time.
    pub fn probing(&self) -> bool {
        self.probing
    }

    /// The latency average, seconds, once it has enough samples.
    pub fn latency(&self) -> Option<f64> {
        (self.samples >= MIN_LATENCY_SAMPLES).then_some(self.latency)
    }

    /// Whether anything is remembered; when not, a success has nothing to clear.
    pub fn idle(&self) -> bool {
        self.consecutive_5xx == 0
            && self.consecutive_gateway == 0
            && self.times == 0
            && !self.probing
            && self.until.is_none()
    }

    /// Records an outcome at `now`; returns why the endpoint should be ejected, if it
    /// should. The caller then asks whether the backend can spare it and calls
    /// [`Detector::eject`].
    pub fn record(&mut self, p: &Policy, outcome: Outcome, now: Instant) -> Option<Reason> {
        self.decay(p, now);
        if outcome == Outcome::Success {
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
            self.probing = false;
            return None;
        }
        self.consecutive_5xx = self.consecutive_5xx.saturating_add(1);
        if outcome == Outcome::Gateway {
            self.consecutive_gateway = self.consecutive_gateway.saturating_add(1);
        }
        if self.ejected(now) {
            // A response from before the ejection: already out.
            return None;
        }
        if self.probing {
            Some(Reason::Probe)
        } else if p.consecutive_gateway > 0 && self.consecutive_gateway >= p.consecutive_gateway {
            Some(Reason::GatewayErrors)
        } else if p.consecutive_5xx > 0 && self.consecutive_5xx >= p.consecutive_5xx {
            Some(Reason::Consecutive5xx)
        } else {
            None
        }
    }

    /// Records a latency sample; returns whether a latency comparison with the peers is due.
    pub fn observe(&mut self, p: &Policy, rtt: Duration, now: Instant) -> bool {
        let Some((_, floor)) = p.latency else {
            return false;
        };
        let rtt = rtt.as_secs_f64();
        self.latency = if self.samples == 0 {
            rtt
        } else {
            self.latency * (1.0 - LATENCY_WEIGHT) + rtt * LATENCY_WEIGHT
        };
        self.samples = self.samples.saturating_add(1);
        let due = self.samples >= MIN_LATENCY_SAMPLES
            && self.latency > floor.as_secs_f64()
            && !self.ejected(now)
            && self.next_latency_check.is_none_or(|t| now >= t);
        if due {
            self.next_latency_check = Some(now + p.interval);
        }
        due
    }

    /// Ejects at `now`: out for `base × times ejected`, capped at `max`, then probed.
    pub fn eject(&mut self, p: &Policy, now: Instant) {
        self.times = self.times.saturating_add(1);
        let time = p.base.saturating_mul(self.times).min(p.max);
        self.until = Some(now + time);
        self.calm_since = Some(now + time);
        self.probing = true;
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        // Latency is measured afresh after an ejection.
        self.samples = 0;
        self.latency = 0.0;
    }

    /// Takes one off the ejection count for each `interval` of good behaviour since the
    /// endpoint came back (or since the last one taken off).
    fn decay(&mut self, p: &Policy, now: Instant) {
        let Some(since) = self.calm_since else {
            return;
        };
        if self.probing || now <= since || p.interval.is_zero() {
            return;
        }
        let periods = ((now - since).as_nanos() / p.interval.as_nanos()).min(u32::MAX as u128);
        let periods = periods as u32;
        if periods == 0 {
            return;
        }
        self.times = self.times.saturating_sub(periods);
        if self.times == 0 {
            self.calm_since = None;
            self.until = None;
        } else {
            self.calm_since = Some(since + p.interval.saturating_mul(periods));
        }
    }
}

/// Whether one more endpoint may be ejected when `ejected` of `total` already are: at most
/// `max_percent` of them (rounded down), and never the last one (pure).
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    let allowed = total * max_percent.min(100) as usize / 100;
    ejected < allowed && ejected + 1 < total
}

/// Whether an endpoint whose latency average is `own` is an outlier among peers whose
/// averages are `peers`: above `factor` times their median and above `floor` (pure).
pub fn latency_outlier(own: f64, peers: &mut [f64], factor: f64, floor: Duration) -> bool {
    if peers.is_empty() || own <= floor.as_secs_f64() {
        return false;
    }
    peers.sort_by(f64::total_cmp);
    let n = peers.len();
    let median = if n % 2 == 1 {
        peers[n / 2]
    } else {
        (peers[n / 2 - 1] + peers[n / 2]) / 2.0
    };
    own > factor * median
}

/// An endpoint's outlier state: the detector behind a lock, and what the balancer reads on
/// every pick as atomics.
#[derive(Debug, Default)]
pub struct Slot {
    /// Made by the first outcome that must visit it: most endpoints of a mesh-wide view
    /// are never called, or have no outlier detection.
    detector: std::sync::OnceLock<Box<Mutex<Detector>>>,
    /// The detector remembers something (see [`Detector::idle`]): a success must visit it.
    active: AtomicBool,
    /// Ejected until then, nanoseconds on the endpoint clock (0: not ejected).
    until: AtomicU64,
    /// Back from an ejection and not yet answered well.
    probing: AtomicBool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Detector> {
        let d = self.detector.get_or_init(Box::default);
        d.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the detector, for the admin API.
    pub fn detector(&self) -> Detector {
        self.detector.get().map_or_else(Detector::default, |d| {
            d.lock().unwrap_or_else(|e| e.into_inner()).clone()
        })
    }

    /// The latency average, when the detector holds one.
    fn latency(&self) -> Option<f64> {
        let d = self.detector.get()?;
        d.lock().unwrap_or_else(|e| e.into_inner()).latency()
    }

    /// Whether the endpoint is ejected at `now` (`now_nanos` on the endpoint clock).
    pub fn ejected(&self, now_nanos: u64) -> bool {
        now_nanos < self.until.load(Ordering::Relaxed)
    }

    /// Whether the endpoint is being probed after an ejection.
    pub fn probing(&self) -> bool {
        self.probing.load(Ordering::Relaxed)
    }

    fn publish(&self, d: &Detector) {
        self.active.store(!d.idle(), Ordering::Relaxed);
        self.probing.store(d.probing, Ordering::Relaxed);
        let until = d.until.map_or(0, crate::endpoint::nanos);
        self.until.store(until, Ordering::Relaxed);
    }
}

/// Hands one attempt's outcome to its endpoint: failure counting and backoff (see
/// [`EndpointState::failed`]), outlier detection under the backend's policy, and the
/// metrics of both. `kind` is the failure's metric label for a failure; `latency` is the
/// time to the response head, when there was one.
pub fn report(
    backend: &Backend,
    endpoint: &EndpointState,
    outcome: Outcome,
    kind: Option<&'static str>,
    latency: Option<Duration>,
    metrics: &Metrics,
) {
    let now = Instant::now();
    match kind {
        Some(kind) => {
            endpoint.failed(now);
            metrics.endpoint_failure(&backend.name, kind);
        }
        None => endpoint.succeeded(),
    }
    let Some(policy) = &backend.outlier else {
        return;
    };
    let slot = &endpoint.outlier;
    let latency = latency.filter(|_| policy.latency.is_some());
    // The common case, a success with nothing remembered and no latency rule, stays one
    // atomic load.
    if outcome == Outcome::Success && latency.is_none() && !slot.active.load(Ordering::Relaxed) {
        return;
    }
    let mut d = slot.lock();
    let mut reason = d.record(policy, outcome, now);
    let latency_due = latency.is_some_and(|rtt| d.observe(policy, rtt, now));
    if latency_due
        && reason.is_none()
        && let (Some(own), Some((factor, floor))) = (d.latency(), policy.latency)
    {
        // Peers' averages, read one lock at a time: holding this endpoint's lock while
        // taking a peer's could deadlock with that peer doing the same.
        drop(d);
        let mut peers: Vec<f64> = backend
            .balancer
            .members()
            .iter()
            .filter(|m| !std::ptr::eq(&*m.state, endpoint))
            .filter_map(|m| m.state.outlier.latency())
            .collect();
        d = slot.lock();
        if !d.ejected(now) && latency_outlier(own, &mut peers, factor, floor) {
            reason = Some(Reason::Latency);
        }
    }
    if let Some(reason) = reason {
        // Counting the ejected and ejecting are one step per backend, so that concurrent
        // ejections cannot together exceed the cap.
        let _one = backend.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        let at = crate::endpoint::nanos(now);
        let members = backend.balancer.members();
        let ejected = members
            .iter()
            .filter(|m| m.state.outlier.ejected(at))
            .count();
        if may_eject(ejected, members.len(), policy.max_percent) {
            d.eject(policy, now);
            d.reason = Some(reason);
            d.described = Some(reason.describe(policy).into());
            slot.publish(&d);
            metrics.outlier_ejection(&backend.name, reason.as_str());
            tracing::info!(backend = %backend.name, endpoint = %endpoint.addr, reason = reason.as_str(), times = d.times(), "endpoint ejected");
        }
    }
    slot.publish(&d);
}

impl Backend {
    /// Whether responses' latency is worth measuring: the balancer uses it, or the latency
    /// outlier rule does.
    pub fn measures_latency(&self) -> bool {
        self.balancer.measures_latency()
            || self.outlier.as_ref().is_some_and(|p| p.latency.is_some())
    }
}

/// Endpoints of `backend` ejected at `now`.
pub fn ejected_count(backend: &Backend, now: Instant) -> usize {
    let at = crate::endpoint::nanos(now);
    backend
        .balancer
        .members()
        .iter()
        .filter(|m| m.state.outlier.ejected(at))
        .count()
}

/// Sets the ejected-endpoints gauge of every backend of the active snapshot (ejections end
/// by time alone, so the gauge is computed when scraped).
pub fn refresh_gauges(shared: &crate::Shared) {
    let snap = shared.snapshot();
    let now = Instant::now();
    for b in backends(&snap) {
        if b.outlier.is_some() {
            shared
                .metrics
                .outlier_ejected
                .get_or_create(&crate::metrics::BackendLabels {
                    backend: b.name.clone(),
                })
                .set(ejected_count(b, now) as i64);
        }
    }
}

impl Reason {
    /// The reason in words, with the threshold of `p` that was reached.
    pub fn describe(self, p: &Policy) -> String {
        match self {
            Reason::Consecutive5xx => format!("{} consecutive 5xx", p.consecutive_5xx),
            Reason::GatewayErrors => {
                format!("{} consecutive gateway errors", p.consecutive_gateway)
            }
            Reason::Latency => match p.latency {
                Some((factor, _)) => format!("latency above {factor}x the peers' median"),
                None => "latency above the peers'".into(),
            },
            Reason::Probe => "failed while probed after an ejection".into(),
        }
    }
}

/// Most backends, and endpoints per backend, one report describes: a proxy in HTTP proxy
/// mode may hold every service of a large mesh.
const MAX_REPORTED_BACKENDS: usize = 256;
const MAX_REPORTED_ENDPOINTS: usize = 64;
/// How long after its ejection ended an endpoint not yet answered well is reported as probed.
const REPORT_PROBING_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// What the control plane's per-service view needs of this proxy's endpoints at `now`:
/// each backend that has outlier detection or health checks (or an endpoint that is not
/// plainly healthy) with its endpoint count, and only the endpoints that are ejected,
/// probed, failing their check or failing requests. An idle healthy mesh sends names and
/// counts only.
pub fn endpoint_report(snap: &crate::Snapshot, now: Instant) -> trellis_api::wire::EndpointReport {
    use trellis_api::wire;
    let mut out = Vec::new();
    for b in backends(snap) {
        let members = b.balancer.members();
        let mut states = Vec::new();
        for m in members.iter() {
            let e = &m.state;
            let h = e.health(now);
            let d = e.outlier.detector();
            // Probing and failing only while they mean something: a caller that stopped
            // calling would otherwise report them for as long as it stays connected.
            let probing = h.probing
                && !h.ejected
                && d.until()
                    .is_some_and(|u| now.saturating_duration_since(u) < REPORT_PROBING_FOR);
            if !(h.ejected || probing || h.down || h.backoff) {
                continue;
            }
            let left = d.until().filter(|_| h.ejected).map_or(0, |u| {
                u64::try_from(u.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
            });
            states.push(wire::EndpointState {
                address: e.addr.to_string(),
                // An ejection that is about to end still counts as one.
                ejected_ms: if h.ejected { left.max(1) } else { 0 },
                reason: d.described().unwrap_or_default().to_string(),
                times_ejected: d.times(),
                // Ejecting also marks it for probing once it is back.
                probing,
                check_failing: h.down,
                failures: if h.backoff { h.failures } else { 0 },
            });
            if states.len() >= MAX_REPORTED_ENDPOINTS {
                break;
            }
        }
        if states.is_empty() && b.outlier.is_none() && b.health_check.is_none() {
            continue;
        }
        out.push(wire::BackendEndpoints {
            backend: b.name.to_string(),
            endpoints: u32::try_from(members.len()).unwrap_or(u32::MAX),
            states,
        });
    }
    // Over the cap, backends with something to say go first (the sort is stable: by name
    // within each group), so a large healthy view cannot crowd out an ejection.
    if out.len() > MAX_REPORTED_BACKENDS {
        out.sort_by_key(|b| b.states.is_empty());
        out.truncate(MAX_REPORTED_BACKENDS);
    }
    wire::EndpointReport { backends: out }
}

/// The snapshot's service backends, each once, by name.
pub fn backends(snap: &crate::Snapshot) -> Vec<&Backend> {
    let mut out: Vec<&Backend> = snap
        .services
        .values()
        .flatten()
        .map(|e| &*e.backend)
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

/// The one view of every endpoint of every backend: what the balancer reads, and whether
/// it is usable and why not, for the admin API's `GET /endpoints`.
pub fn endpoints_view(snap: &crate::Snapshot) -> serde_json::Value {
    let now = Instant::now();
    let mut out = serde_json::Map::new();
    for b in backends(snap) {
        let eps: Vec<serde_json::Value> = b
            .balancer
            .members()
            .iter()
            .map(|m| endpoint_view(m, b.balancer.decay(), now))
            .collect();
        out.insert(
            b.name.to_string(),
            serde_json::json!({
                "algorithm": format!("{:?}", b.balancer.algorithm()),
                "outlierDetection": b.outlier.is_some(),
                "healthCheck": b.health_check.is_some(),
                "endpoints": eps,
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// One endpoint as `/endpoints` and `trellis explain` show it: what the balancer reads,
/// whether it is usable and why not.
pub fn endpoint_view(
    m: &crate::balance::Member,
    decay: std::time::Duration,
    now: Instant,
) -> serde_json::Value {
    let since = |t: Option<Instant>| t.filter(|t| *t > now).map(|t| (t - now).as_secs_f64());
    let e = &m.state;
    let h = e.health(now);
    let d = e.outlier.detector();
    let (failures, backoff) = e.failures();
    let reason = match h.usable() {
        Err(why) => why,
        Ok(()) if m.weight == 0 => "weight 0",
        Ok(()) if h.backoff => "backed off after a failure",
        Ok(()) if h.probing => "probing after an ejection",
        Ok(()) if h.failures > 0 => "probing after a failure",
        Ok(()) => "healthy",
    };
    serde_json::json!({
        "address": e.addr.to_string(),
        "identity": e.identity.as_ref().map(|n| n.to_str().into_owned()),
        "weight": m.weight,
        "zone": m.locality.zone.as_deref(),
        "region": m.locality.region.as_deref(),
        "cluster": m.locality.cluster.as_deref(),
        "inFlight": e.in_flight(),
        "ewmaSeconds": e.ewma(now, decay),
        "failures": failures,
        "backoffSeconds": since(backoff),
        "ejectedSeconds": since(d.until()),
        "timesEjected": d.times(),
        "latencySeconds": d.latency(),
        "check": e.check.state().as_str(),
        "usable": h.usable().is_ok() && m.weight > 0,
        "reason": reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            consecutive_5xx: 5,
            consecutive_gateway: 3,
            latency: Some((3.0, Duration::from_millis(100))),
            interval: Duration::from_secs(10),
            base: Duration::from_secs(30),
            max: Duration::from_secs(100),
            max_percent: 50,
        }
    }

    #[test]
    fn the_ejection_cap_keeps_capacity() {
        // (already ejected, endpoints, max percent, may eject one more)
        let cases = [
            (0, 1, 100, false),
            (0, 2, 50, true),
            (1, 2, 50, false),
            (1, 2, 100, false),
            (0, 3, 50, true),
            (1, 3, 50, false),
            (1, 4, 50, true),
            (2, 4, 50, false),
            (2, 4, 100, true),
            (3, 4, 100, false),
            (0, 10, 0, false),
            (0, 10, 10, true),
            (1, 10, 10, false),
            (4, 10, 50, true),
            (5, 10, 50, false),
        ];
        for (ejected, total, pct, want) in cases {
            assert_eq!(
                may_eject(ejected, total, pct),
                want,
                "{ejected} of {total} at {pct}%"
            );
        }
    }

    #[test]
    fn latency_outliers_are_far_above_the_peers_median_and_a_floor() {
        let ms = |v: &[f64]| v.iter().map(|x| x / 1000.0).collect::<Vec<_>>();
        let floor = Duration::from_millis(100);
        // (own ms, peers ms, outlier)
        let cases: &[(f64, &[f64], bool)] = &[
            (250.0, &[1.0, 2.0], true),
            (250.0, &[], false),
            // Below the floor however slow relatively.
            (90.0, &[1.0, 1.0], false),
            // Within the factor.
            (250.0, &[100.0, 90.0], false),
            // The median, not the mean: one slow peer does not hide another.
            (400.0, &[1.0, 2.0, 390.0], true),
            (301.0, &[100.0, 100.0, 100.0, 100.0], true),
            (300.0, &[100.0, 100.0, 100.0, 100.0], false),
        ];
        for (own, peers, want) in cases {
            let mut p = ms(peers);
            assert_eq!(
                latency_outlier(own / 1000.0, &mut p, 3.0, floor),
                *want,
                "{own} among {peers:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_successes_reset() {
        use Outcome::*;
        let p = policy();
        // (outcomes, reason on the last one)
        let cases: &[(&[Outcome], Option<Reason>)] = &[
            (&[ServerError; 4], None),
            (&[ServerError; 5], Some(Reason::Consecutive5xx)),
            (
                &[ServerError, ServerError, Success, ServerError, ServerError],
                None,
            ),
            (&[Gateway; 3], Some(Reason::GatewayErrors)),
            (&[Gateway, Success, Gateway, Gateway], None),
            // Gateway failures count as 5xx too.
            (
                &[ServerError, Gateway, ServerError, Gateway, ServerError],
                Some(Reason::Consecutive5xx),
            ),
            (&[Success; 10], None),
        ];
        for (outcomes, want) in cases {
            let mut d = Detector::default();
            let now = Instant::now();
            let mut got = None;
            for o in *outcomes {
                got = d.record(&p, *o, now);
            }
            assert_eq!(got, *want, "{outcomes:?}");
        }
        // A trigger set to 0 is off.
        let off = Policy {
            consecutive_5xx: 0,
            consecutive_gateway: 0,
            ..policy()
        };
        let mut d = Detector::default();
        for _ in 0..100 {
            assert_eq!(d.record(&off, Gateway, Instant::now()), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_grows_with_repeats_is_capped_and_decays() {
        let p = policy();
        let mut d = Detector::default();
        let t0 = Instant::now();
        d.eject(&p, t0);
        assert!(d.ejected(t0) && d.probing());
        assert!(d.ejected(t0 + Duration::from_secs(29)));
        assert!(!d.ejected(t0 + Duration::from_secs(30)));
        // Back at 30 s, fails while probed: out again at once, for twice as long.
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(d.record(&p, Outcome::ServerError, t1), Some(Reason::Probe));
        d.eject(&p, t1);
        assert_eq!(d.until(), Some(t1 + Duration::from_secs(60)));
        // The third is 90 s; the fourth would be 120 s, capped at 100 s.
        let t2 = t1 + Duration::from_secs(60);
        d.eject(&p, t2);
        assert_eq!(d.until(), Some(t2 + Duration::from_secs(90)));
        let t3 = t2 + Duration::from_secs(90);
        d.eject(&p, t3);
        assert_eq!(d.until(), Some(t3 + Duration::from_secs(100)));
        assert_eq!(d.times(), 4);
        // Back at t4, a success ends probing; 25 s of calm take two off the count.
        let t4 = t3 + Duration::from_secs(100);
        assert_eq!(d.record(&p, Outcome::Success, t4), None);
        assert!(!d.probing() && !d.ejected(t4));
        assert_eq!(
            d.record(&p, Outcome::Success, t4 + Duration::from_secs(25)),
            None
        );
        assert_eq!(d.times(), 2);
        // So the next ejection lasts 3 × base.
        let t5 = t4 + Duration::from_secs(25);
        d.eject(&p, t5);
        assert_eq!(d.until(), Some(t5 + Duration::from_secs(90)));
        // Long calm forgets everything.
        let t6 = t5 + Duration::from_secs(90);
        d.record(&p, Outcome::Success, t6);
        d.record(&p, Outcome::Success, t6 + Duration::from_secs(3600));
        assert_eq!(d.times(), 0);
        assert!(d.idle(), "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_failure_while_ejected_changes_nothing() {
        let p = policy();
        let mut d = Detector::default();
        let t0 = Instant::now();
        d.eject(&p, t0);
        let during = t0 + Duration::from_secs(1);
        assert_eq!(d.record(&p, Outcome::Gateway, during), None);
        assert_eq!(d.until(), Some(t0 + p.base));
    }

    #[tokio::test(start_paused = true)]
    async fn latency_comparisons_need_samples_a_floor_and_wait_an_interval() {
        let p = policy();
        let mut d = Detector::default();
        let t0 = Instant::now();
        let slow = Duration::from_millis(250);
        for i in 1..MIN_LATENCY_SAMPLES {
            assert!(!d.observe(&p, slow, t0), "sample {i}");
        }
        assert!(d.observe(&p, slow, t0), "enough samples");
        assert!(!d.observe(&p, slow, t0), "not again within the interval");
        assert!(d.observe(&p, slow, t0 + p.interval));
        // Fast answers stay under the floor: never due.
        let mut fast = Detector::default();
        for _ in 0..20 {
            assert!(!fast.observe(&p, Duration::from_millis(5), t0));
        }
        assert!(fast.latency().is_some());
        // No latency rule: nothing measured.
        let off = Policy {
            latency: None,
            ..policy()
        };
        let mut none = Detector::default();
        for _ in 0..20 {
            assert!(!none.observe(&off, slow, t0));
        }
        assert_eq!(none.latency(), None);
    }
}
