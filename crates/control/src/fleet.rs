//! The fleet view: what proxies report about their traffic, kept per proxy for a bounded
//! window, and aggregated on request into per-service, per-route and per-edge rows
//! (`trellis stat`, `top`, `edges`); and the taps `trellis tap` opens, whose events proxies
//! send back on the same report stream.
//!
//! A report is attributed to the authenticated caller (its namespace, service and identity
//! come from its credentials, not from the message), so a proxy can only report about itself.
//! The aggregation math is pure functions over reports, tested beside them.

use crate::mesh::ProxyStatus;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use trellis_api::wire;

/// The longest window a query may ask for; older reports are dropped.
pub const MAX_WINDOW: Duration = Duration::from_secs(600);

/// Most series kept from one report.
const MAX_SERIES: usize = 4096;

/// Most series kept per proxy over all its reports: beyond it, its oldest reports go
/// (a busy proxy's window shrinks rather than the control plane's memory growing).
const MAX_KEPT_SERIES: usize = 20_000;

/// Most authorization series kept from one report.
const MAX_AUTHZ_SERIES: usize = 1024;

/// Most bytes one proxy's window holds over its reports, verdicts and samples (as
/// [`cost`] counts them): beyond it, its oldest entries go. Ten minutes of a proxy with a
/// few hundred series take a few MiB.
const MAX_WINDOW_BYTES: usize = 16 << 20;

/// Most bytes the windows of one service hold together: beyond it, the windows of its
/// instances heard from least recently go whole. Node ids are the caller's to choose, so
/// without it one service's credentials could make the control plane keep a window per
/// made-up node until it ran out of memory.
const MAX_SERVICE_BYTES: usize = 256 << 20;

/// Most windows one service's proxies have: a window costs little in bytes but every report
/// looks at its service's windows, so made-up nodes must not make thousands of them.
const MAX_SERVICE_WINDOWS: usize = 4096;

/// Most report streams one service's proxies hold open on a replica: one per instance
/// (see [`MAX_SERVICE_WINDOWS`]) and a reconnect's overlap. Each is a task with buffers, and
/// one service's credentials must not be able to open them without end.
pub const MAX_SERVICE_STREAMS: usize = 2 * MAX_SERVICE_WINDOWS;

/// Open streams of one kind (report, quota) per service (namespace, name), at most
/// [`MAX_SERVICE_STREAMS`] each.
#[derive(Default)]
pub(crate) struct PerService(Mutex<HashMap<(String, String), usize>>);

impl PerService {
    /// Counts a stream of the service as open, unless it already holds
    /// [`MAX_SERVICE_STREAMS`] open (`false`: refuse it).
    pub(crate) fn open(&self, namespace: &str, service: &str) -> bool {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open
            .entry((namespace.to_string(), service.to_string()))
            .or_default();
        if *n >= MAX_SERVICE_STREAMS {
            return false;
        }
        *n += 1;
        true
    }

    /// A stream [`PerService::open`] counted has closed.
    pub(crate) fn close(&self, namespace: &str, service: &str) {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_string(), service.to_string());
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

/// Most latency buckets kept per report and series (a proxy sends 16 bounds, 17 buckets).
const MAX_BUCKETS: usize = 64;

/// Most backends, and endpoint states per backend, kept from one report: what a proxy
/// sends at most (`outlier::endpoint_report`); a report over it is not the proxy's own.
const MAX_BACKENDS: usize = 256;
const MAX_STATES: usize = 64;

/// Longest name kept from a report (policy, listener, backend, reason, decision); an
/// address is shorter still. Longer ones are dropped with their entry, so that a crafted
/// report cannot make the control plane keep megabytes of text.
const MAX_NAME: usize = 256;
const MAX_ADDRESS: usize = 64;

/// Most entries of each kind (reports, verdicts, samples) kept per proxy: its window at a
/// report every few seconds, so a proxy sending tiny reports as fast as it can does not
/// grow the lists.
const MAX_ENTRIES: usize = 1024;

/// How long a proxy's endpoint state stands without a newer report (a few report intervals).
pub const FRESH_STATE: Duration = Duration::from_secs(10);

/// Events buffered per tap client before new ones are dropped.
const TAP_BUFFER: usize = 512;

/// Who sent a report, as its credentials prove.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reporter {
    /// Its namespace.
    pub namespace: String,
    /// Its service (service account).
    pub service: String,
    /// Its SPIFFE id; empty when it authenticated with a join token.
    pub identity: String,
    /// Its node id.
    pub node: String,
}

/// One proxy's recent reports.
struct Window {
    reporter: Reporter,
    reports: VecDeque<(Instant, wire::TrafficReport)>,
    /// CPU and memory samples (capacity report), as long as the reports.
    usage: VecDeque<(Instant, wire::Usage)>,
    /// Authorization verdicts of each report, with the interval it covers (ms).
    authz: VecDeque<(Instant, u32, Vec<wire::AuthzSeries>)>,
    /// The latest state of the endpoints it sends to.
    endpoints: Option<(Instant, wire::EndpointReport)>,
    /// What all of the above holds, as [`cost`] counts it.
    bytes: usize,
    /// When it last took something.
    heard: Instant,
}

/// How often the report path expires every window: each report expiring all of them made a
/// fleet's reports cost the square of its size (views expire them before they read).
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Every proxy's window, with what each service's windows hold together kept as they change
/// (so a report's bounds cost no walk over its service's windows).
#[derive(Default)]
struct Windows {
    by_reporter: BTreeMap<Reporter, Window>,
    /// (namespace, service) → (windows, bytes).
    services: HashMap<(String, String), (usize, usize)>,
    /// When every window was last expired.
    pruned: Option<Instant>,
}

impl std::ops::Deref for Windows {
    type Target = BTreeMap<Reporter, Window>;

    fn deref(&self) -> &Self::Target {
        &self.by_reporter
    }
}

fn service_of(r: &Reporter) -> (String, String) {
    (r.namespace.clone(), r.service.clone())
}

impl Windows {
    /// Applies `add` to `who`'s window (made if new) and keeps it within `max_bytes`.
    fn update(
        &mut self,
        who: &Reporter,
        now: Instant,
        max_bytes: usize,
        add: impl FnOnce(&mut Window),
    ) {
        let mut created = false;
        let w = self.by_reporter.entry(who.clone()).or_insert_with(|| {
            created = true;
            Window::new(who, now)
        });
        // A new window's own bytes count too.
        let before = if created { 0 } else { w.bytes };
        add(w);
        w.bound(now, max_bytes);
        let totals = self.services.entry(service_of(who)).or_default();
        totals.0 += usize::from(created);
        totals.1 = totals.1 + w.bytes - before;
    }

    fn remove(&mut self, r: &Reporter) {
        if let Some(w) = self.by_reporter.remove(r) {
            let key = service_of(r);
            if let Some(t) = self.services.get_mut(&key) {
                t.0 -= 1;
                t.1 -= w.bytes;
                if t.0 == 0 {
                    self.services.remove(&key);
                }
            }
        }
    }

    /// Within `max_bytes` and [`MAX_SERVICE_WINDOWS`] for `who`'s service: the windows of its
    /// instances heard from least recently go (never `who`'s own, which [`Window::bound`]
    /// keeps in bounds).
    fn bound_service(&mut self, who: &Reporter, max_bytes: usize) {
        let over = |s: &Self| {
            s.services
                .get(&service_of(who))
                .is_some_and(|&(n, b)| b > max_bytes || n > MAX_SERVICE_WINDOWS)
        };
        let first = Reporter {
            namespace: who.namespace.clone(),
            service: who.service.clone(),
            identity: String::new(),
            node: String::new(),
        };
        while over(self) {
            let Some(quietest) = self
                .by_reporter
                .range(&first..)
                .take_while(|(r, _)| r.namespace == who.namespace && r.service == who.service)
                .filter(|(r, _)| *r != who)
                .min_by_key(|(_, w)| w.heard)
                .map(|(r, _)| r.clone())
            else {
                return;
            };
            self.remove(&quietest);
        }
    }

    /// Forgets what every window holds past its time, and the windows left empty.
    fn prune(&mut self, now: Instant) {
        self.pruned = Some(now);
        let mut empty = Vec::new();
        for (r, w) in &mut self.by_reporter {
            let before = w.bytes;
            w.expire(now);
            if w.bytes != before
                && let Some(t) = self.services.get_mut(&service_of(r))
            {
                t.1 -= before - w.bytes;
            }
            if w.is_empty() {
                empty.push(r.clone());
            }
        }
        for r in empty {
            self.remove(&r);
        }
    }

    /// [`Windows::prune`], unless it ran within [`PRUNE_EVERY`].
    fn prune_due(&mut self, now: Instant) {
        if self
            .pruned
            .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY)
        {
            self.prune(now);
        }
    }
}

/// Keeps at most `n` of `v`, and no spare capacity.
fn cut<T>(v: &mut Vec<T>, n: usize) {
    v.truncate(n);
    v.shrink_to_fit();
}

/// Roughly the heap bytes a kept entry holds: its strings, vectors (by capacity) and fixed
/// parts. Only the sums matter (the bounds above), so it need not be exact, only grow with
/// what a sender controls.
mod cost {
    use std::mem::size_of;
    use trellis_api::wire;

    pub fn report(r: &wire::TrafficReport) -> usize {
        size_of::<wire::TrafficReport>()
            + r.latency_bounds.capacity() * 8
            + (r.series.capacity() - r.series.len()) * size_of::<wire::TrafficSeries>()
            + r.series
                .iter()
                .map(|s| {
                    size_of::<wire::TrafficSeries>()
                        + s.direction.capacity()
                        + s.route.capacity()
                        + s.backend.capacity()
                        + s.peer_identity.capacity()
                        + (s.classes.capacity() + s.latency.capacity()) * 8
                })
                .sum::<usize>()
    }

    pub fn authz(a: &[wire::AuthzSeries]) -> usize {
        size_of::<Vec<wire::AuthzSeries>>()
            + a.iter()
                .map(|a| {
                    size_of::<wire::AuthzSeries>()
                        + a.listener.capacity()
                        + a.policy.capacity()
                        + a.decision.capacity()
                })
                .sum::<usize>()
    }

    pub fn usage() -> usize {
        size_of::<wire::Usage>() + 16
    }

    pub fn endpoints(e: &wire::EndpointReport) -> usize {
        size_of::<wire::EndpointReport>()
            + e.backends
                .iter()
                .map(|b| {
                    size_of::<wire::BackendEndpoints>()
                        + b.backend.capacity()
                        + b.states
                            .iter()
                            .map(|s| {
                                size_of::<wire::EndpointState>()
                                    + s.address.capacity()
                                    + s.reason.capacity()
                            })
                            .sum::<usize>()
                })
                .sum::<usize>()
    }
}

impl Window {
    fn new(reporter: &Reporter, now: Instant) -> Window {
        Window {
            reporter: reporter.clone(),
            reports: VecDeque::new(),
            usage: VecDeque::new(),
            authz: VecDeque::new(),
            endpoints: None,
            bytes: Self::OVERHEAD
                + 2 * (reporter.namespace.len()
                    + reporter.service.len()
                    + reporter.identity.len()
                    + reporter.node.len()),
            heard: now,
        }
    }

    /// What an empty window holds (its key is stored twice: in the map and here).
    const OVERHEAD: usize = 2 * std::mem::size_of::<Reporter>() + std::mem::size_of::<Window>();

    fn is_empty(&self) -> bool {
        self.reports.is_empty()
            && self.usage.is_empty()
            && self.authz.is_empty()
            && self.endpoints.is_none()
    }

    /// Drops the oldest entry of any kind; `false` when only the newest of each is left.
    fn drop_oldest(&mut self) -> bool {
        let report = self
            .reports
            .front()
            .filter(|_| self.reports.len() > 1)
            .map(|(t, _)| *t);
        let usage = self
            .usage
            .front()
            .filter(|_| self.usage.len() > 1)
            .map(|(t, _)| *t);
        let authz = self
            .authz
            .front()
            .filter(|_| self.authz.len() > 1)
            .map(|(t, _, _)| *t);
        let oldest = [report, usage, authz].into_iter().flatten().min();
        match oldest {
            None => false,
            Some(t) if report == Some(t) => {
                self.pop_report();
                true
            }
            Some(t) if usage == Some(t) => {
                self.pop_usage();
                true
            }
            Some(_) => {
                self.pop_authz();
                true
            }
        }
    }

    fn pop_report(&mut self) -> Option<wire::TrafficReport> {
        let (_, r) = self.reports.pop_front()?;
        self.bytes -= cost::report(&r);
        Some(r)
    }

    fn pop_usage(&mut self) {
        if self.usage.pop_front().is_some() {
            self.bytes -= cost::usage();
        }
    }

    fn pop_authz(&mut self) -> Option<Vec<wire::AuthzSeries>> {
        let (_, _, a) = self.authz.pop_front()?;
        self.bytes -= cost::authz(&a);
        Some(a)
    }

    /// Keeps the window within its bounds (at most `max_bytes`) after an entry came in at
    /// `now`.
    fn bound(&mut self, now: Instant, max_bytes: usize) {
        self.heard = now;
        let mut series: usize = self.reports.iter().map(|(_, r)| r.series.len()).sum();
        while (series > MAX_KEPT_SERIES || self.reports.len() > MAX_ENTRIES)
            && self.reports.len() > 1
        {
            series -= self.pop_report().map_or(0, |r| r.series.len());
        }
        let mut verdicts: usize = self.authz.iter().map(|(_, _, a)| a.len()).sum();
        while (verdicts > MAX_KEPT_SERIES || self.authz.len() > MAX_ENTRIES) && self.authz.len() > 1
        {
            verdicts -= self.pop_authz().map_or(0, |a| a.len());
        }
        while self.usage.len() > MAX_ENTRIES {
            self.pop_usage();
        }
        while self.bytes > max_bytes && self.drop_oldest() {}
    }

    /// Forgets what is older than the longest window (endpoint state: older than fresh).
    fn expire(&mut self, now: Instant) {
        let old = |t: &Instant| now.duration_since(*t) > MAX_WINDOW;
        while self.reports.front().is_some_and(|(t, _)| old(t)) {
            self.pop_report();
        }
        while self.usage.front().is_some_and(|(t, _)| old(t)) {
            self.pop_usage();
        }
        while self.authz.front().is_some_and(|(t, _, _)| old(t)) {
            self.pop_authz();
        }
        if self
            .endpoints
            .as_ref()
            .is_some_and(|(t, _)| now.duration_since(*t) > FRESH_STATE)
        {
            self.set_endpoints(None);
        }
    }

    fn set_endpoints(&mut self, e: Option<(Instant, wire::EndpointReport)>) {
        if let Some((_, old)) = &self.endpoints {
            self.bytes -= cost::endpoints(old);
        }
        if let Some((_, new)) = &e {
            self.bytes += cost::endpoints(new);
        }
        self.endpoints = e;
    }
}

/// Latency summary and counts of a set of requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Requests by status class (1xx … 5xx).
    pub classes: [u64; 5],
    /// gRPC responses with a non-OK status.
    pub grpc_errors: u64,
    /// Requests per second.
    pub rps: f64,
    /// Counts per latency bucket.
    pub latency: Vec<u64>,
}

impl Totals {
    fn add(&mut self, s: &wire::TrafficSeries, seconds: f64) {
        let n: u64 = s.classes.iter().sum();
        for (a, b) in self.classes.iter_mut().zip(&s.classes) {
            *a += b;
        }
        self.grpc_errors += s.grpc_errors;
        if seconds > 0.0 {
            self.rps += n as f64 / seconds;
        }
        merge(&mut self.latency, &s.latency);
    }

    /// All requests.
    pub fn requests(&self) -> u64 {
        self.classes.iter().sum()
    }
}

/// Adds bucket counts `b` into `a` (growing it as needed).
pub fn merge(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// The `q` quantile (0–1) of a histogram with upper `bounds` (counts has one more bucket,
/// for the rest), interpolated linearly within its bucket; the last bound for the overflow
/// bucket. `None` without observations.
pub fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, c) in counts.iter().enumerate() {
        if *c == 0 {
            continue;
        }
        if (seen + c) as f64 >= rank {
            let Some(upper) = bounds.get(i) else {
                return bounds.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let within = (rank - seen as f64) / *c as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        seen += c;
    }
    bounds.last().copied()
}

/// The share of requests that succeeded: not 5xx, and not a failed gRPC call. `None`
/// without requests.
pub fn success_rate(classes: &[u64; 5], grpc_errors: u64) -> Option<f64> {
    let total: u64 = classes.iter().sum();
    if total == 0 {
        return None;
    }
    let failed = (classes[4] + grpc_errors).min(total);
    Some((total - failed) as f64 / total as f64)
}

/// One row of `trellis stat`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatRow {
    /// The service's (or route's) namespace.
    pub namespace: String,
    /// The service name, or the route id.
    pub name: String,
    /// For routes: the backend (`namespace/name:port`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend: String,
    /// For services: how many of its proxies served requests in the window.
    #[serde(default)]
    pub proxies: usize,
    /// Requests in the window.
    pub requests: u64,
    /// Share of successful requests (0–1); absent without requests.
    pub success_rate: Option<f64>,
    /// Requests per second.
    pub rps: f64,
    /// Latency quantiles in milliseconds.
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
}

/// One row of `trellis edges`: who calls whom.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EdgeRow {
    /// The caller's namespace and service, from its verified identity; empty when it
    /// called without mutual TLS.
    pub src_namespace: String,
    /// The caller's service.
    pub src_service: String,
    /// The caller's SPIFFE id.
    pub src_identity: String,
    /// The callee's namespace.
    pub dst_namespace: String,
    /// The callee's service.
    pub dst_service: String,
    /// The callee's SPIFFE id.
    pub dst_identity: String,
    /// Requests in the window.
    pub requests: u64,
    /// Share of successful requests.
    pub success_rate: Option<f64>,
    /// Whether the hop was mutual TLS.
    pub mtls: bool,
    /// Requests per second.
    #[serde(default)]
    pub rps: f64,
    /// 99th percentile latency in milliseconds, as the callee's sidecar measured it.
    #[serde(default)]
    pub p99_ms: Option<f64>,
}

/// The answer of `GET /v1/stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatsView {
    /// The window, in seconds.
    pub window_seconds: f64,
    /// Proxies that reported in the window.
    pub proxies: usize,
    /// Per service: what its sidecars served (inbound).
    pub services: Vec<StatRow>,
    /// Per route and backend: what sidecars sent (outbound).
    pub routes: Vec<StatRow>,
    /// Caller to callee, as the callees' sidecars saw them.
    pub edges: Vec<EdgeRow>,
    /// Authorization decisions per service, policy and rule, as the services' sidecars
    /// decided them (empty in history slices).
    #[serde(default)]
    pub authz: Vec<AuthzRow>,
    /// Instances that callers' sidecars see as not plainly healthy, and how many callers
    /// each has (empty in history slices).
    #[serde(default)]
    pub instances: Vec<InstanceRow>,
}

/// One row of the per-service view's "Authorization decisions": the verdicts one policy's
/// rule gave at one service's sidecars.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRow {
    /// The deciding sidecars' namespace and service.
    pub namespace: String,
    /// Their service.
    pub service: String,
    /// What decided: a policy `namespace/name`, a `MeshConfig`, `default`,
    /// `no-allow-policy-matched` or `request-authentication` (a refused token).
    pub policy: String,
    /// The rule of the policy (index from 0); absent when no rule decided.
    pub rule: Option<u32>,
    /// Requests allowed.
    pub allow: u64,
    /// Requests (or TCP connections) denied.
    pub deny: u64,
    /// Allowed, but an audit-mode policy (this one) would deny.
    pub audit_deny: u64,
    /// Decisions per second over the window.
    pub rps: f64,
    /// Denials per second over the window.
    pub deny_rps: f64,
}

/// One instance's outlier and health state as its callers' sidecars see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRow {
    /// `IP:PORT` of the instance's inbound sidecar (the workload's `address`).
    pub address: String,
    /// The backends (`namespace/name:port`) it is an endpoint of.
    pub backends: Vec<String>,
    /// Proxies whose view holds those backends (the callers that could eject it).
    pub callers: usize,
    /// Callers that eject it now.
    pub ejected_by: usize,
    /// The latest end of those ejections, Unix milliseconds.
    pub ejected_until_unix_ms: Option<i64>,
    /// Why they ejected it, each once (`5 consecutive 5xx`).
    pub reasons: Vec<String>,
    /// Callers probing it one request at a time after an ejection.
    pub probing: usize,
    /// Callers whose health check of it fails.
    pub check_failing: usize,
    /// Callers that saw its last requests fail (backing off).
    pub failing: usize,
    /// The state in words: `ejected by 2 of 3 callers (5 consecutive 5xx)`.
    pub summary: String,
}

/// One proxy's authorization verdicts in a window: each report's interval (ms) and series.
pub type Verdicts<'a> = (&'a Reporter, Vec<(u32, &'a [wire::AuthzSeries])>);

/// Authorization rows from each proxy's verdicts (with the interval each covers), per
/// destination service, policy and rule. Pure.
pub fn authz_rows(windows: &[Verdicts<'_>], q: &Query) -> Vec<AuthzRow> {
    let mut rows: BTreeMap<(String, String, String, Option<u32>), AuthzRow> = BTreeMap::new();
    for (who, reports) in windows {
        let ok = q.namespace.as_deref().is_none_or(|n| n == who.namespace)
            && q.service.as_deref().is_none_or(|s| s == who.service);
        if !ok || reports.is_empty() {
            continue;
        }
        let seconds: f64 = reports.iter().map(|(ms, _)| f64::from(*ms) / 1e3).sum();
        for s in reports.iter().flat_map(|(_, a)| a.iter()) {
            let key = (
                who.namespace.clone(),
                who.service.clone(),
                s.policy.clone(),
                s.rule,
            );
            let r = rows.entry(key).or_insert_with(|| AuthzRow {
                namespace: who.namespace.clone(),
                service: who.service.clone(),
                policy: s.policy.clone(),
                rule: s.rule,
                allow: 0,
                deny: 0,
                audit_deny: 0,
                rps: 0.0,
                deny_rps: 0.0,
            });
            match s.decision.as_str() {
                "allow" => r.allow += s.count,
                "deny" => r.deny += s.count,
                _ => r.audit_deny += s.count,
            }
            if seconds > 0.0 {
                let rate = s.count as f64 / seconds;
                r.rps += rate;
                if s.decision == "deny" {
                    r.deny_rps += rate;
                }
            }
        }
    }
    rows.into_values()
        .map(|mut r| {
            r.rps = (r.rps * 100.0).round() / 100.0;
            r.deny_rps = (r.deny_rps * 100.0).round() / 100.0;
            r
        })
        .collect()
}

/// Instance rows from each proxy's latest endpoint state (with its age): an instance is
/// listed when some caller sees it as not plainly healthy. Pure.
pub fn instance_rows(reports: &[(&Reporter, Duration, &wire::EndpointReport)]) -> Vec<InstanceRow> {
    // Callers per backend name.
    let mut holders: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, _, r) in reports {
        for b in &r.backends {
            *holders.entry(b.backend.as_str()).or_default() += 1;
        }
    }
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut rows: BTreeMap<String, InstanceRow> = BTreeMap::new();
    // Per instance: the callers seen with each state, so a proxy with the instance in two
    // backends counts once.
    let mut seen: BTreeMap<String, [std::collections::BTreeSet<&Reporter>; 4]> = BTreeMap::new();
    for (who, age, r) in reports {
        for b in &r.backends {
            for e in &b.states {
                let row = rows
                    .entry(e.address.clone())
                    .or_insert_with(|| InstanceRow {
                        address: e.address.clone(),
                        backends: Vec::new(),
                        callers: 0,
                        ejected_by: 0,
                        ejected_until_unix_ms: None,
                        reasons: Vec::new(),
                        probing: 0,
                        check_failing: 0,
                        failing: 0,
                        summary: String::new(),
                    });
                if !row.backends.contains(&b.backend) {
                    row.backends.push(b.backend.clone());
                }
                let sets = seen.entry(e.address.clone()).or_default();
                // The report is `age` old: an ejection that has ended since is over.
                let left = Duration::from_millis(e.ejected_ms).saturating_sub(*age);
                if e.ejected_ms > 0 && !left.is_zero() {
                    sets[0].insert(who);
                    let until = unix_now + i64::try_from(left.as_millis()).unwrap_or(i64::MAX);
                    row.ejected_until_unix_ms =
                        Some(row.ejected_until_unix_ms.map_or(until, |u| u.max(until)));
                    if !e.reason.is_empty() && !row.reasons.contains(&e.reason) {
                        row.reasons.push(e.reason.clone());
                    }
                }
                if e.probing {
                    sets[1].insert(who);
                }
                if e.check_failing {
                    sets[2].insert(who);
                }
                if e.failures > 0 {
                    sets[3].insert(who);
                }
            }
        }
    }
    rows.into_values()
        .map(|mut row| {
            let sets = &seen[&row.address];
            row.callers = row
                .backends
                .iter()
                .map(|b| holders.get(b.as_str()).copied().unwrap_or(0))
                .max()
                .unwrap_or(0);
            row.ejected_by = sets[0].len();
            row.probing = sets[1].len();
            row.check_failing = sets[2].len();
            row.failing = sets[3].len();
            row.summary = summary(&row);
            row
        })
        // An ejection that ended since its report, with nothing else to say: not listed.
        .filter(|r| r.ejected_by + r.probing + r.check_failing + r.failing > 0)
        .collect()
}

/// An instance's state in words.
fn summary(r: &InstanceRow) -> String {
    let of = |n: usize| {
        format!(
            "{n} of {} caller{}",
            r.callers,
            if r.callers == 1 { "" } else { "s" }
        )
    };
    let mut parts = Vec::new();
    if r.ejected_by > 0 {
        let why = if r.reasons.is_empty() {
            String::new()
        } else {
            format!(", reason: {}", r.reasons.join("; "))
        };
        parts.push(format!("ejected by {}{why}", of(r.ejected_by)));
    }
    if r.probing > 0 {
        parts.push(format!("probed after an ejection by {}", of(r.probing)));
    }
    if r.check_failing > 0 {
        parts.push(format!(
            "failing the health check of {}",
            of(r.check_failing)
        ));
    }
    if r.failing > 0 && r.ejected_by == 0 {
        parts.push(format!("recent requests failed for {}", of(r.failing)));
    }
    parts.join("; ")
}

/// What a stats query selects.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this service (rows of services, and routes whose backend is it).
    pub service: Option<String>,
    /// Only this route id (or route name).
    pub route: Option<String>,
}

fn ms(s: Option<f64>) -> Option<f64> {
    s.map(|s| (s * 1e6).round() / 1e3)
}

fn row(
    namespace: &str,
    name: &str,
    backend: &str,
    proxies: usize,
    t: &Totals,
    bounds: &[f64],
) -> StatRow {
    StatRow {
        namespace: namespace.into(),
        name: name.into(),
        backend: backend.into(),
        proxies,
        requests: t.requests(),
        success_rate: success_rate(&t.classes, t.grpc_errors),
        rps: (t.rps * 100.0).round() / 100.0,
        p50_ms: ms(quantile(bounds, &t.latency, 0.50)),
        p95_ms: ms(quantile(bounds, &t.latency, 0.95)),
        p99_ms: ms(quantile(bounds, &t.latency, 0.99)),
    }
}

/// `spiffe://TD/ns/NS/sa/SA` → (NS, SA).
pub fn identity_parts(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    let (_, path) = rest.split_once('/')?;
    let mut p = path.split('/');
    match (p.next(), p.next(), p.next(), p.next(), p.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
        _ => None,
    }
}

/// `namespace/name:port` → (namespace, name).
fn backend_service(backend: &str) -> Option<(&str, &str)> {
    let (ns, rest) = backend.split_once('/')?;
    Some((ns, rest.split_once(':').map_or(rest, |(n, _)| n)))
}

/// Aggregates per-proxy reports (each with the seconds it covers within the window) into
/// the fleet view. Pure.
pub fn aggregate(
    windows: &[(&Reporter, Vec<&wire::TrafficReport>)],
    window: Duration,
    q: &Query,
) -> StatsView {
    let mut bounds: Vec<f64> = Vec::new();
    let mut services: BTreeMap<(String, String), (Totals, usize)> = BTreeMap::new();
    let mut routes: BTreeMap<(String, String), Totals> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String, bool), (EdgeRow, Totals)> = BTreeMap::new();
    let mut proxies = 0;
    for (who, reports) in windows {
        if reports.is_empty() {
            continue;
        }
        proxies += 1;
        let seconds: f64 = reports.iter().map(|r| f64::from(r.interval_ms) / 1e3).sum();
        let mut served = false;
        for r in reports {
            if bounds.len() < r.latency_bounds.len() {
                bounds = r.latency_bounds.clone();
            }
            for s in &r.series {
                if s.direction == "inbound" {
                    served = true;
                    services
                        .entry((who.namespace.clone(), who.service.clone()))
                        .or_default()
                        .0
                        .add(s, seconds);
                    let (sns, ssvc) = identity_parts(&s.peer_identity).unwrap_or_default();
                    let e = edges
                        .entry((s.peer_identity.clone(), who.identity.clone(), s.tls))
                        .or_insert_with(|| {
                            (
                                EdgeRow {
                                    src_namespace: sns.into(),
                                    src_service: ssvc.into(),
                                    src_identity: s.peer_identity.clone(),
                                    dst_namespace: who.namespace.clone(),
                                    dst_service: who.service.clone(),
                                    dst_identity: who.identity.clone(),
                                    requests: 0,
                                    success_rate: None,
                                    mtls: s.tls,
                                    rps: 0.0,
                                    p99_ms: None,
                                },
                                Totals::default(),
                            )
                        });
                    e.1.add(s, seconds);
                } else if !s.route.is_empty() {
                    routes
                        .entry((s.route.clone(), s.backend.clone()))
                        .or_default()
                        .add(s, seconds);
                }
            }
        }
        if served {
            services
                .entry((who.namespace.clone(), who.service.clone()))
                .or_default()
                .1 += 1;
        }
    }
    let ns_ok = |ns: &str| q.namespace.as_deref().is_none_or(|n| n == ns);
    let svc_ok = |svc: &str| q.service.as_deref().is_none_or(|s| s == svc);
    let route_ok = |route: &str| {
        q.route
            .as_deref()
            .is_none_or(|r| route == r || route.split('/').nth(1) == Some(r))
    };
    StatsView {
        window_seconds: window.as_secs_f64(),
        proxies,
        services: services
            .iter()
            .filter(|((ns, svc), _)| ns_ok(ns) && svc_ok(svc) && q.route.is_none())
            .map(|((ns, svc), (t, n))| row(ns, svc, "", *n, t, &bounds))
            .collect(),
        routes: routes
            .iter()
            .filter(|((route, backend), _)| {
                let (bns, bsvc) = backend_service(backend).unwrap_or_default();
                let rns = route.split_once('/').map_or(bns, |(ns, _)| ns);
                ns_ok(rns) && route_ok(route) && (q.service.is_none() || svc_ok(bsvc))
            })
            .map(|((route, backend), t)| {
                let (bns, _) = backend_service(backend).unwrap_or_default();
                let rns = route.split_once('/').map_or(bns, |(ns, _)| ns);
                row(rns, route, backend, 0, t, &bounds)
            })
            .collect(),
        edges: edges
            .into_values()
            .filter(|(e, _)| {
                (ns_ok(&e.dst_namespace) || ns_ok(&e.src_namespace))
                    && (svc_ok(&e.dst_service) || svc_ok(&e.src_service))
                    && q.route.is_none()
            })
            .map(|(mut e, t)| {
                e.requests = t.requests();
                e.success_rate = success_rate(&t.classes, t.grpc_errors);
                e.rps = (t.rps * 100.0).round() / 100.0;
                e.p99_ms = ms(quantile(&bounds, &t.latency, 0.99));
                e
            })
            .collect(),
        authz: Vec::new(),
        instances: Vec::new(),
    }
}

/// One line of `GET /v1/tap`'s answer (newline-delimited JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TapLine {
    /// First: the tap is active on this many proxies.
    Started {
        /// Proxies the tap went to.
        proxies: usize,
    },
    /// A request.
    Event(Box<TapEvent>),
    /// Last: why the tap ended and what was lost.
    End {
        /// Events sent.
        events: u64,
        /// Events dropped (by proxies or because this client read too slowly).
        dropped: u64,
        /// `max`, `duration` or `closed`.
        reason: String,
    },
}

/// One request's metadata in a tap.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TapEvent {
    /// This control plane's id for the event, for `trellis explain --request-id`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// Unix milliseconds at the request's start.
    pub time_unix_ms: i64,
    /// The proxy that saw it: `namespace/service` and node id.
    pub proxy: String,
    /// Its node id.
    pub node: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// The caller's identity (inbound, mutual TLS).
    pub src_identity: String,
    /// The callee's identity: the proxy's own (inbound) or the endpoint's (outbound, its
    /// server name).
    pub dst_identity: String,
    /// Method.
    pub method: String,
    /// Authority.
    pub authority: String,
    /// Path (no query).
    pub path: String,
    /// Route id.
    pub route: String,
    /// Backend.
    pub backend: String,
    /// HTTP status.
    pub status: u16,
    /// gRPC status, when the response head had one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub grpc_status: String,
    /// Latency to the response head, in milliseconds.
    pub latency_ms: f64,
    /// Upstream endpoint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// Whether the hop was mutual TLS.
    pub tls: bool,
    /// Request headers (sensitive ones redacted by the proxy), when asked for.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl TapEvent {
    fn from_wire(e: wire::TapEvent, who: &Reporter, trust_domain: &str) -> TapEvent {
        TapEvent {
            request_id: String::new(),
            time_unix_ms: e.time_unix_ms,
            proxy: format!("{}/{}", who.namespace, who.service),
            node: who.node.clone(),
            direction: e.direction.clone(),
            src_identity: e.src_identity,
            dst_identity: if e.direction == "inbound" {
                who.identity.clone()
            } else {
                // The proxy knows the endpoint by its server name; shown as a SPIFFE id.
                trellis_identity::SpiffeId::from_server_name(&e.dst_identity, trust_domain)
                    .map_or(e.dst_identity, |id| id.to_string())
            },
            method: e.method,
            authority: e.authority,
            path: e.path,
            route: e.route,
            backend: e.backend,
            status: u16::try_from(e.status).unwrap_or(0),
            grpc_status: e.grpc_status,
            latency_ms: e.latency_us as f64 / 1e3,
            endpoint: e.endpoint,
            tls: e.tls,
            headers: e.headers.into_iter().collect(),
        }
    }
}

/// What `trellis tap` asked for.
#[derive(Clone, Debug, Default)]
pub struct TapSpec {
    /// Only proxies of this namespace.
    pub namespace: Option<String>,
    /// Only proxies of this service.
    pub service: Option<String>,
    /// The filter and options the proxies apply.
    pub request: wire::TapRequest,
}

struct TapSub {
    spec: TapSpec,
    tx: mpsc::Sender<TapEvent>,
    dropped: std::sync::Arc<AtomicU64>,
}

/// Reports and taps, shared by every report stream and the HTTP API.
pub struct Fleet {
    windows: Mutex<Windows>,
    limits: Limits,
    /// Open report streams per reporter.
    streams: Mutex<BTreeMap<Reporter, usize>>,
    /// And per service, bounded.
    per_service: PerService,
    taps: Mutex<BTreeMap<String, TapSub>>,
    /// Bumped whenever the set of taps changes; report streams watch it.
    taps_changed: watch::Sender<u64>,
    next_tap: AtomicU64,
    explains: Mutex<Explains>,
    next_explain: AtomicU64,
    /// The last [`RECENT`] tapped requests, by request id, for `explain --request-id`.
    recent: Mutex<VecDeque<TapEvent>>,
    next_request: AtomicU64,
}

/// What the windows may hold: [`MAX_WINDOW_BYTES`] and [`MAX_SERVICE_BYTES`] (smaller in
/// tests).
#[derive(Clone, Copy, Debug)]
struct Limits {
    window_bytes: usize,
    service_bytes: usize,
}

/// Tapped requests kept for `trellis explain --request-id`.
pub const RECENT: usize = 4096;

/// Explain requests on their way to proxies over the report streams of this replica.
#[derive(Default)]
struct Explains {
    /// Per node id: its open report streams, oldest first: who each is from, and where it
    /// takes requests from. Node ids are the proxies' to choose, so several services' proxies
    /// may share one; a request goes to the newest stream that [`reports_for`] its proxy.
    streams: HashMap<String, Vec<(Reporter, mpsc::Sender<wire::ExplainRequest>)>>,
    /// Requests sent and not answered yet: who was asked, and where the answer goes.
    waiting: HashMap<String, (Reporter, tokio::sync::oneshot::Sender<wire::ExplainAnswer>)>,
}

impl Explains {
    /// Where proxy `p`'s explain requests go: its node's newest report stream that
    /// [`reports_for`] it.
    fn stream_for(
        &self,
        p: &ProxyStatus,
    ) -> Option<(Reporter, mpsc::Sender<wire::ExplainRequest>)> {
        self.streams
            .get(&p.node)?
            .iter()
            .rev()
            .find(|(who, _)| reports_for(who, p))
            .cloned()
    }
}

/// Explain requests queued per proxy before new ones are refused.
const EXPLAIN_QUEUE: usize = 4;

/// Why an explain request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The proxy has no report stream to this replica.
    #[error(
        "proxy {0} has no report stream to this control plane replica (it is not connected, or connected to another replica)"
    )]
    NotConnected(String),
    /// Its queue is full.
    #[error("proxy {0} is busy with other explain requests; try again")]
    Busy(String),
    /// No answer in time.
    #[error("proxy {0} did not answer within {1:?}")]
    Timeout(String, Duration),
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            windows: Mutex::default(),
            limits: Limits {
                window_bytes: MAX_WINDOW_BYTES,
                service_bytes: MAX_SERVICE_BYTES,
            },
            streams: Mutex::default(),
            per_service: PerService::default(),
            taps: Mutex::default(),
            taps_changed: watch::channel(0).0,
            next_tap: AtomicU64::new(1),
            explains: Mutex::default(),
            next_explain: AtomicU64::new(1),
            recent: Mutex::default(),
            next_request: AtomicU64::new(1),
        }
    }
}

/// An open tap: its events, until dropped (which closes it everywhere).
pub struct TapHandle {
    fleet: std::sync::Arc<Fleet>,
    /// The tap's id.
    pub id: String,
    /// Its events.
    pub events: mpsc::Receiver<TapEvent>,
    /// Events lost on the way.
    pub dropped: std::sync::Arc<AtomicU64>,
}

impl Drop for TapHandle {
    fn drop(&mut self) {
        self.fleet.close_tap(&self.id);
    }
}

impl Fleet {
    fn lock_windows(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_taps(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TapSub>> {
        self.taps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a report from `who`, and forgets reports older than the longest window.
    pub fn record(&self, who: &Reporter, mut report: wire::TrafficReport, now: Instant) {
        // Cut and shrunk: a decoded vector's spare capacity is memory too (a message of
        // empty series decodes to ~80 bytes per wire byte, more with spare capacity).
        cut(&mut report.series, MAX_SERIES);
        cut(&mut report.latency_bounds, MAX_BUCKETS);
        for s in &mut report.series {
            cut(&mut s.classes, 5);
            cut(&mut s.latency, MAX_BUCKETS + 1);
        }
        self.keep(who, now, |w| {
            w.bytes += cost::report(&report);
            w.reports.push_back((now, report));
        });
    }

    /// Applies `add` to `who`'s window (made if new), then keeps the window, its service's
    /// windows and every window within their bounds.
    fn keep(&self, who: &Reporter, now: Instant, add: impl FnOnce(&mut Window)) {
        let mut windows = self.lock_windows();
        windows.update(who, now, self.limits.window_bytes, add);
        windows.bound_service(who, self.limits.service_bytes);
        windows.prune_due(now);
    }

    /// Keeps a CPU and memory sample from `who`.
    pub fn record_usage(&self, who: &Reporter, usage: wire::Usage, now: Instant) {
        self.keep(who, now, |w| {
            w.bytes += cost::usage();
            w.usage.push_back((now, usage));
        });
    }

    /// Keeps the authorization verdicts and endpoint state that came with a report from
    /// `who` covering `interval_ms`.
    pub fn record_policy(
        &self,
        who: &Reporter,
        interval_ms: u32,
        mut authz: Vec<wire::AuthzSeries>,
        endpoints: Option<wire::EndpointReport>,
        now: Instant,
    ) {
        authz.retain(|a| {
            a.policy.len() <= MAX_NAME
                && a.listener.len() <= MAX_NAME
                && a.decision.len() <= MAX_NAME
        });
        cut(&mut authz, MAX_AUTHZ_SERIES);
        let endpoints = endpoints.map(|mut e| {
            e.backends.retain(|b| b.backend.len() <= MAX_NAME);
            cut(&mut e.backends, MAX_BACKENDS);
            for b in &mut e.backends {
                b.states
                    .retain(|s| s.address.len() <= MAX_ADDRESS && s.reason.len() <= MAX_NAME);
                cut(&mut b.states, MAX_STATES);
            }
            e
        });
        self.keep(who, now, |w| {
            // Empty entries too: they count the time they cover (the rate's denominator).
            w.bytes += cost::authz(&authz);
            w.authz.push_back((now, interval_ms, authz));
            if let Some(e) = endpoints {
                w.set_endpoints(Some((now, e)));
            }
        });
    }

    /// Authorization decisions per destination service, policy and rule over the last
    /// `window`, and each instance's outlier state as its callers see it now.
    pub fn policy_view(
        &self,
        window: Duration,
        q: &Query,
        now: Instant,
    ) -> (Vec<AuthzRow>, Vec<InstanceRow>) {
        let window = window.min(MAX_WINDOW);
        let mut windows = self.lock_windows();
        windows.prune(now);
        let authz: Vec<Verdicts<'_>> = windows
            .values()
            .map(|w| {
                (
                    &w.reporter,
                    w.authz
                        .iter()
                        .filter(|(t, _, _)| now.duration_since(*t) <= window)
                        .map(|(_, ms, a)| (*ms, a.as_slice()))
                        .collect(),
                )
            })
            .collect();
        let endpoints: Vec<(&Reporter, Duration, &wire::EndpointReport)> = windows
            .values()
            .filter_map(|w| {
                let (t, e) = w.endpoints.as_ref()?;
                Some((&w.reporter, now.duration_since(*t), e))
            })
            .collect();
        (authz_rows(&authz, q), instance_rows(&endpoints))
    }

    /// Each proxy's CPU rates and latest memory over the last `window`.
    pub fn usage(&self, window: Duration, now: Instant) -> Vec<(Reporter, crate::capacity::Usage)> {
        let window = window.min(MAX_WINDOW);
        let mut windows = self.lock_windows();
        windows.prune(now);
        windows
            .values()
            .filter_map(|w| {
                let samples: Vec<(f64, &wire::Usage)> = w
                    .usage
                    .iter()
                    .filter(|(t, _)| now.duration_since(*t) <= window)
                    .map(|(t, u)| (t.duration_since(w.usage[0].0).as_secs_f64(), u))
                    .collect();
                Some((
                    w.reporter.clone(),
                    crate::capacity::Usage::from_samples(&samples)?,
                ))
            })
            .collect()
    }

    /// The fleet view over the last `window`, with authorization decisions and the
    /// instances callers do not see as plainly healthy (all of them: the caller selects).
    pub fn view(&self, window: Duration, q: &Query, now: Instant) -> StatsView {
        let mut v = self.traffic_view(window, q, now);
        (v.authz, v.instances) = self.policy_view(window, q, now);
        v
    }

    fn traffic_view(&self, window: Duration, q: &Query, now: Instant) -> StatsView {
        let window = window.min(MAX_WINDOW);
        let mut windows = self.lock_windows();
        windows.prune(now);
        let selected: Vec<(&Reporter, Vec<&wire::TrafficReport>)> = windows
            .values()
            .map(|w| {
                (
                    &w.reporter,
                    w.reports
                        .iter()
                        .filter(|(t, _)| now.duration_since(*t) <= window)
                        .map(|(_, r)| r)
                        .collect(),
                )
            })
            .collect();
        aggregate(&selected, window, q)
    }

    /// The fleet view in consecutive slices of `step` over the last `window`, oldest first
    /// (the dashboard's sparklines). Each slice covers the reports received within it.
    pub fn history(
        &self,
        window: Duration,
        step: Duration,
        q: &Query,
        now: Instant,
    ) -> Vec<StatsView> {
        let window = window.min(MAX_WINDOW);
        let step = step.max(Duration::from_secs(1));
        let slices = (window.as_secs_f64() / step.as_secs_f64()).ceil() as u32;
        let mut windows = self.lock_windows();
        windows.prune(now);
        (0..slices)
            .rev()
            .map(|i| {
                let (newest, oldest) = (step * i, step * (i + 1));
                let selected: Vec<(&Reporter, Vec<&wire::TrafficReport>)> = windows
                    .values()
                    .map(|w| {
                        (
                            &w.reporter,
                            w.reports
                                .iter()
                                .filter(|(t, _)| {
                                    let age = now.duration_since(*t);
                                    age >= newest && age < oldest
                                })
                                .map(|(_, r)| r)
                                .collect(),
                        )
                    })
                    .collect();
                aggregate(&selected, step, q)
            })
            .collect()
    }

    /// Opens a tap; it ends when the handle is dropped.
    pub fn open_tap(self: &std::sync::Arc<Self>, spec: TapSpec) -> TapHandle {
        let id = format!("tap-{}", self.next_tap.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::channel(TAP_BUFFER);
        let dropped = std::sync::Arc::new(AtomicU64::new(0));
        let mut spec = spec;
        spec.request.id = id.clone();
        self.lock_taps().insert(
            id.clone(),
            TapSub {
                spec,
                tx,
                dropped: dropped.clone(),
            },
        );
        self.taps_changed.send_modify(|v| *v += 1);
        TapHandle {
            fleet: self.clone(),
            id,
            events: rx,
            dropped,
        }
    }

    fn close_tap(&self, id: &str) {
        self.lock_taps().remove(id);
        self.taps_changed.send_modify(|v| *v += 1);
    }

    /// Notified when the taps change.
    pub fn watch_taps(&self) -> watch::Receiver<u64> {
        self.taps_changed.subscribe()
    }

    /// The taps `who`'s proxy must serve.
    pub fn taps_for(&self, who: &Reporter) -> Vec<wire::TapRequest> {
        self.lock_taps()
            .values()
            .filter(|t| applies(&t.spec, who))
            .map(|t| t.spec.request.clone())
            .collect()
    }

    /// Counts a report stream from `who` as open, unless its service already holds
    /// [`MAX_SERVICE_STREAMS`] open (`false`: refuse it).
    pub fn open_stream(&self, who: &Reporter) -> bool {
        if !self.per_service.open(&who.namespace, &who.service) {
            return false;
        }
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        *streams.entry(who.clone()).or_default() += 1;
        true
    }

    /// A report stream [`Fleet::open_stream`] counted has closed.
    pub fn close_stream(&self, who: &Reporter) {
        self.per_service.close(&who.namespace, &who.service);
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = streams.get_mut(who) {
            *n -= 1;
            if *n == 0 {
                streams.remove(who);
            }
        }
    }

    /// How many connected proxies a tap reaches.
    pub fn reach(&self, spec: &TapSpec) -> usize {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|r| applies(spec, r))
            .count()
    }

    fn lock_explains(&self) -> std::sync::MutexGuard<'_, Explains> {
        self.explains.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request tap showed recently, by its id.
    pub fn recent(&self, request_id: &str) -> Option<TapEvent> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|e| e.request_id == request_id)
            .cloned()
    }

    /// Whether proxy `p` has a report stream to this replica (so it can explain): one from
    /// its node that [`reports_for`] it.
    pub fn can_explain(&self, p: &ProxyStatus) -> bool {
        self.lock_explains().stream_for(p).is_some()
    }

    /// Asks proxy `p` to explain, over its report stream; waits at most `timeout`.
    pub async fn explain(
        &self,
        p: &ProxyStatus,
        mut req: wire::ExplainRequest,
        timeout: Duration,
    ) -> Result<wire::ExplainAnswer, ExplainError> {
        let node = p.node.as_str();
        let id = format!("x-{}", self.next_explain.fetch_add(1, Ordering::Relaxed));
        req.id = id.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut e = self.lock_explains();
            let Some((who, stream)) = e.stream_for(p) else {
                return Err(ExplainError::NotConnected(node.into()));
            };
            if stream.try_send(req).is_err() {
                return Err(ExplainError::Busy(node.into()));
            }
            e.waiting.insert(id.clone(), (who, tx));
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.lock_explains().waiting.remove(&id);
        match answer {
            Ok(Ok(a)) => Ok(a),
            // The stream ended (the sender went with it), or time ran out.
            _ => Err(ExplainError::Timeout(node.into(), timeout)),
        }
    }

    /// An answer from `who`: delivered only to a request that was sent to `who` (request ids
    /// are sequential, so another proxy could guess one).
    fn answered(&self, who: &Reporter, answer: wire::ExplainAnswer) {
        let mut e = self.lock_explains();
        if e.waiting
            .get(&answer.id)
            .is_some_and(|(asked, _)| asked == who)
            && let Some((_, tx)) = e.waiting.remove(&answer.id)
        {
            let _ = tx.send(answer);
        }
    }

    /// Delivers events from `who` to their taps (only taps that apply to it); a client that
    /// reads too slowly loses events, counted.
    pub fn deliver(
        &self,
        who: &Reporter,
        trust_domain: &str,
        events: Vec<wire::TapEvent>,
        dropped: HashMap<String, u64>,
    ) {
        let taps = self.lock_taps();
        for (id, n) in dropped {
            if let Some(t) = taps.get(&id) {
                t.dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
        for e in events {
            let Some(t) = taps.get(&e.tap_id).filter(|t| applies(&t.spec, who)) else {
                continue;
            };
            let mut event = TapEvent::from_wire(e, who, trust_domain);
            event.request_id = format!("r{}", self.next_request.fetch_add(1, Ordering::Relaxed));
            {
                let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
                if recent.len() >= RECENT {
                    recent.pop_front();
                }
                recent.push_back(event.clone());
            }
            if t.tx.try_send(event).is_err() {
                t.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One proxy's report stream: keeps its reports, delivers its tap events, and sends it the
/// taps that apply to it whenever they change.
pub(crate) async fn serve_reports(
    fleet: &Fleet,
    who: &Reporter,
    trust_domain: &str,
    mut inbound: tonic::Streaming<wire::ReportRequest>,
    tx: mpsc::Sender<Result<wire::ReportResponse, tonic::Status>>,
) {
    let mut taps = fleet.watch_taps();
    taps.mark_changed();
    let mut sent: Option<Vec<wire::TapRequest>> = None;
    // Explain requests for this proxy arrive here (the newest stream of a node takes them;
    // they are sent only where `reports_for` holds).
    let (etx, mut explains) = mpsc::channel(EXPLAIN_QUEUE);
    fleet
        .lock_explains()
        .streams
        .entry(who.node.clone())
        .or_default()
        .push((who.clone(), etx.clone()));
    let _unregister = Unregister(fleet, who.node.clone(), etx);
    loop {
        tokio::select! {
            Some(req) = explains.recv() => {
                let message = wire::ReportResponse { taps: Vec::new(), explain: vec![req] };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            changed = taps.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = fleet.taps_for(who);
                if sent.as_ref() != Some(&now) {
                    let message = wire::ReportResponse { taps: now.clone(), explain: Vec::new() };
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                    sent = Some(now);
                }
            }
            message = inbound.message() => {
                let Ok(Some(m)) = message else { return };
                if let Some(t) = m.traffic {
                    fleet.record_policy(who, t.interval_ms, m.authz, m.endpoints, Instant::now());
                    fleet.record(who, t, Instant::now());
                }
                if let Some(u) = m.usage {
                    fleet.record_usage(who, u, Instant::now());
                }
                if !m.tap_events.is_empty() || !m.tap_dropped.is_empty() {
                    fleet.deliver(who, trust_domain, m.tap_events, m.tap_dropped);
                }
                for a in m.explained {
                    fleet.answered(who, a);
                }
            }
            () = tx.closed() => return,
        }
    }
}

/// Removes a report stream's explain channel when the stream ends.
struct Unregister<'a>(&'a Fleet, String, mpsc::Sender<wire::ExplainRequest>);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        let mut e = self.0.lock_explains();
        if let Some(list) = e.streams.get_mut(&self.1) {
            list.retain(|(_, s)| !s.same_channel(&self.2));
            if list.is_empty() {
                e.streams.remove(&self.1);
            }
        }
    }
}

/// Whether a report stream from `who` can be the one of proxy `p` (pure): node ids are the
/// proxies' to choose, so the stream must also be from the namespace and service `p`'s
/// credentials proved. Without it a proxy of another service reporting under `p`'s node id
/// would receive, and answer, the explain requests meant for `p`.
pub fn reports_for(who: &Reporter, p: &ProxyStatus) -> bool {
    who.node == p.node && (&who.namespace, &who.service) == (&p.principal.0, &p.principal.1)
}

/// Checks a tap's status filter: empty, an HTTP status (`503`) or a class (`5xx`).
pub fn check_status(s: &str) -> Result<(), String> {
    let ok = s.is_empty()
        || s.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c))
        || s.strip_suffix("xx")
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| (1..=5).contains(&c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "status {s:?}: use an HTTP status (503) or a class (5xx)"
        ))
    }
}

fn applies(spec: &TapSpec, who: &Reporter) -> bool {
    spec.namespace.as_deref().is_none_or(|n| n == who.namespace)
        && spec.service.as_deref().is_none_or(|s| s == who.service)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: [f64; 4] = [0.001, 0.01, 0.1, 1.0];

    #[test]
    fn quantiles_interpolate_within_buckets() {
        for (counts, q, want) in [
            (vec![0, 0, 0, 0, 0], 0.5, None),
            (vec![10, 0, 0, 0, 0], 0.5, Some(0.0005)),
            (vec![10, 0, 0, 0, 0], 1.0, Some(0.001)),
            (vec![0, 10, 0, 0, 0], 0.5, Some(0.0055)),
            (vec![50, 50, 0, 0, 0], 0.5, Some(0.001)),
            (vec![50, 50, 0, 0, 0], 0.99, Some(0.00982)),
            (vec![0, 0, 0, 0, 5], 0.5, Some(1.0)),
            (vec![98, 0, 0, 2, 0], 0.99, Some(0.55)),
        ] {
            let got = quantile(&B, &counts, q);
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{counts:?} q{q}: {g} != {w}"),
                _ => assert_eq!(got, want, "{counts:?} q{q}"),
            }
        }
    }

    #[test]
    fn success_rates_count_5xx_and_grpc_failures() {
        for (classes, grpc, want) in [
            ([0, 0, 0, 0, 0], 0, None),
            ([0, 10, 0, 0, 0], 0, Some(1.0)),
            ([0, 6, 0, 2, 2], 0, Some(0.8)),
            ([0, 10, 0, 0, 0], 5, Some(0.5)),
            ([0, 0, 0, 0, 4], 4, Some(0.0)),
        ] {
            assert_eq!(success_rate(&classes, grpc), want, "{classes:?} {grpc}");
        }
    }

    #[test]
    fn merging_grows_and_adds() {
        let mut a = vec![1, 2];
        merge(&mut a, &[1, 1, 1]);
        assert_eq!(a, [2, 3, 1]);
        merge(&mut a, &[]);
        assert_eq!(a, [2, 3, 1]);
    }

    #[test]
    fn identities_name_namespace_and_service() {
        assert_eq!(
            identity_parts("spiffe://trellis.local/ns/default/sa/payment"),
            Some(("default", "payment"))
        );
        assert_eq!(identity_parts(""), None);
        assert_eq!(identity_parts("spiffe://td/ns/a/sa/b/c"), None);
    }

    fn series(
        direction: &str,
        route: &str,
        backend: &str,
        peer: &str,
        ok: u64,
        err: u64,
    ) -> wire::TrafficSeries {
        wire::TrafficSeries {
            direction: direction.into(),
            route: route.into(),
            backend: backend.into(),
            peer_identity: peer.into(),
            tls: !peer.is_empty(),
            classes: vec![0, ok, 0, 0, err],
            latency: vec![ok + err, 0, 0, 0, 0],
            grpc_errors: 0,
        }
    }

    fn report(seconds: u32, series: Vec<wire::TrafficSeries>) -> wire::TrafficReport {
        wire::TrafficReport {
            interval_ms: seconds * 1000,
            series,
            latency_bounds: B.to_vec(),
        }
    }

    fn who(service: &str, node: &str) -> Reporter {
        Reporter {
            namespace: "default".into(),
            service: service.into(),
            identity: format!("spiffe://td/ns/default/sa/{service}"),
            node: node.into(),
        }
    }

    fn verdicts(policy: &str, rule: Option<u32>, decision: &str, count: u64) -> wire::AuthzSeries {
        wire::AuthzSeries {
            listener: "inbound".into(),
            policy: policy.into(),
            rule,
            decision: decision.into(),
            count,
        }
    }

    #[test]
    fn authz_rows_sum_per_service_policy_and_rule() {
        let (a, b, other) = (who("pay", "n1"), who("pay", "n2"), who("shop", "n3"));
        let r1 = [
            verdicts("default/no-admin", Some(1), "deny", 4),
            verdicts("default", None, "allow", 10),
        ];
        let r2 = [verdicts("default/no-admin", Some(1), "deny", 2)];
        let r3 = [
            verdicts("default/no-admin", Some(0), "deny", 1),
            verdicts("default/audit", Some(2), "audit_deny", 3),
        ];
        let o = [verdicts("default/x", Some(0), "allow", 7)];
        let windows = vec![
            // Two reports of 2 s from one proxy: 4 s.
            (&a, vec![(2000, &r1[..]), (2000, &[][..])]),
            (&b, vec![(2000, &r2[..]), (2000, &r3[..])]),
            (&other, vec![(2000, &o[..])]),
        ];
        let q = Query {
            service: Some("pay".into()),
            ..Query::default()
        };
        let rows = authz_rows(&windows, &q);
        let got: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.policy.as_str(),
                    r.rule,
                    r.allow,
                    r.deny,
                    r.audit_deny,
                    r.rps,
                    r.deny_rps,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("default", None, 10, 0, 0, 2.5, 0.0),
                ("default/audit", Some(2), 0, 0, 3, 0.75, 0.0),
                ("default/no-admin", Some(0), 0, 1, 0, 0.25, 0.25),
                // 4 over 4 s from one proxy, 2 over 4 s from the other.
                ("default/no-admin", Some(1), 0, 6, 0, 1.5, 1.5),
            ]
        );
        assert!(rows.iter().all(|r| r.service == "pay"));
        assert_eq!(authz_rows(&windows, &Query::default()).len(), 5);
    }

    fn state(address: &str, ejected_ms: u64, reason: &str) -> wire::EndpointState {
        wire::EndpointState {
            address: address.into(),
            ejected_ms,
            reason: reason.into(),
            times_ejected: u32::from(ejected_ms > 0),
            probing: false,
            check_failing: false,
            failures: 0,
        }
    }

    fn backend(name: &str, states: Vec<wire::EndpointState>) -> wire::BackendEndpoints {
        wire::BackendEndpoints {
            backend: name.into(),
            endpoints: 3,
            states,
        }
    }

    #[test]
    fn instance_rows_count_callers_that_eject_and_drop_ended_ejections() {
        let (a, b, c) = (who("web", "n1"), who("web", "n2"), who("shop", "n3"));
        let five = "5 consecutive 5xx";
        let ra = wire::EndpointReport {
            backends: vec![backend(
                "default/pay:80",
                vec![state("10.0.0.1:80", 30_000, five)],
            )],
        };
        // Also in a subset backend: the instance counts this caller once.
        let rb = wire::EndpointReport {
            backends: vec![
                backend(
                    "default/pay:80",
                    vec![state("10.0.0.1:80", 10_000, "3 consecutive gateway errors")],
                ),
                backend(
                    "default/pay-v2:80",
                    vec![state("10.0.0.1:80", 10_000, five)],
                ),
            ],
        };
        // Reported 3 s ago with 2 s left: over. Another instance failing its check.
        let mut failing = state("10.0.0.2:80", 0, "");
        failing.check_failing = true;
        failing.probing = true;
        let rc = wire::EndpointReport {
            backends: vec![backend(
                "default/pay:80",
                vec![
                    state("10.0.0.1:80", 2_000, five),
                    failing,
                    // Its ejection ended since, and nothing else: not listed.
                    state("10.0.0.3:80", 2_000, five),
                ],
            )],
        };
        let ms = Duration::from_millis;
        let rows = instance_rows(&[(&a, ms(0), &ra), (&b, ms(500), &rb), (&c, ms(3000), &rc)]);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let r = &rows[0];
        assert_eq!(r.address, "10.0.0.1:80");
        assert_eq!((r.callers, r.ejected_by, r.probing), (3, 2, 0));
        assert_eq!(r.backends, ["default/pay:80", "default/pay-v2:80"]);
        assert_eq!(r.reasons, [five, "3 consecutive gateway errors"]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let until = r.ejected_until_unix_ms.unwrap() - now;
        assert!((29_000..=30_500).contains(&until), "{until}");
        assert_eq!(
            r.summary,
            "ejected by 2 of 3 callers, reason: 5 consecutive 5xx; 3 consecutive gateway errors"
        );
        let r = &rows[1];
        assert_eq!((r.ejected_by, r.check_failing, r.probing), (0, 1, 1));
        assert_eq!(
            r.summary,
            "probed after an ejection by 1 of 3 callers; failing the health check of 1 of 3 callers"
        );
        assert!(instance_rows(&[]).is_empty());
    }

    #[test]
    fn aggregation_sums_proxies_rates_and_edges() {
        let orders = "spiffe://td/ns/default/sa/orders";
        let (a, b, o) = (
            who("payment", "p1"),
            who("payment", "p2"),
            who("orders", "o1"),
        );
        let (r1, r2) = (
            report(2, vec![series("inbound", "inbound", "", orders, 18, 2)]),
            report(2, vec![series("inbound", "inbound", "", "", 10, 0)]),
        );
        let r3 = report(
            2,
            vec![series(
                "outbound",
                "default/pay/0",
                "default/payment:80",
                "",
                28,
                2,
            )],
        );
        let windows = vec![(&a, vec![&r1]), (&b, vec![&r2]), (&o, vec![&r3])];
        let v = aggregate(&windows, Duration::from_secs(30), &Query::default());
        assert_eq!(v.proxies, 3);
        assert_eq!(v.services.len(), 1, "orders serves nothing: {v:?}");
        let pay = &v.services[0];
        assert_eq!(
            (pay.name.as_str(), pay.proxies, pay.requests),
            ("payment", 2, 30)
        );
        assert_eq!(pay.rps, 15.0, "20/2s + 10/2s");
        assert_eq!(pay.success_rate, Some(28.0 / 30.0));
        assert_eq!(pay.p50_ms, Some(0.5));
        assert_eq!(v.routes.len(), 1);
        assert_eq!(v.routes[0].name, "default/pay/0");
        assert_eq!(v.routes[0].backend, "default/payment:80");
        // Two edges into payment: orders over mutual TLS, and an unknown plaintext caller.
        assert_eq!(v.edges.len(), 2, "{:?}", v.edges);
        let tls = v.edges.iter().find(|e| e.mtls).unwrap();
        assert_eq!(
            (tls.src_service.as_str(), tls.dst_service.as_str()),
            ("orders", "payment")
        );
        assert_eq!(tls.requests, 20);
        assert_eq!(tls.rps, 10.0, "20 in 2s");
        assert_eq!(tls.p99_ms, Some(0.99), "all in the first bucket (1 ms)");
        let plain = v.edges.iter().find(|e| !e.mtls).unwrap();
        assert_eq!((plain.src_service.as_str(), plain.requests), ("", 10));

        // Filters.
        let q = Query {
            service: Some("payment".into()),
            ..Query::default()
        };
        let v = aggregate(&windows, Duration::from_secs(30), &q);
        assert_eq!(v.services.len(), 1);
        assert_eq!(v.routes.len(), 1, "routes to payment");
        let q = Query {
            service: Some("inventory".into()),
            ..Query::default()
        };
        let v = aggregate(&windows, Duration::from_secs(30), &q);
        assert!(v.services.is_empty() && v.routes.is_empty() && v.edges.is_empty());
        let q = Query {
            route: Some("pay".into()),
            ..Query::default()
        };
        let v = aggregate(&windows, Duration::from_secs(30), &q);
        assert!(v.services.is_empty());
        assert_eq!(v.routes.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_proxy_ages_out_of_the_window() {
        let fleet = Fleet::default();
        let a = who("payment", "p1");
        let start = Instant::now();
        fleet.record(
            &a,
            report(2, vec![series("inbound", "inbound", "", "", 10, 0)]),
            start,
        );
        let v = fleet.view(Duration::from_secs(30), &Query::default(), start);
        assert_eq!((v.proxies, v.services.len()), (1, 1));
        tokio::time::advance(Duration::from_secs(31)).await;
        let v = fleet.view(Duration::from_secs(30), &Query::default(), Instant::now());
        assert_eq!((v.proxies, v.services.len()), (0, 0));
        tokio::time::advance(MAX_WINDOW).await;
        fleet.view(Duration::from_secs(30), &Query::default(), Instant::now());
        assert!(
            fleet.lock_windows().is_empty(),
            "forgotten after the longest window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn history_slices_the_window_oldest_first() {
        let fleet = Fleet::default();
        let a = who("payment", "p1");
        let start = Instant::now();
        for (i, ok) in [4u64, 6, 8].into_iter().enumerate() {
            let at = start + Duration::from_secs(10 * i as u64);
            fleet.record(
                &a,
                report(2, vec![series("inbound", "inbound", "", "", ok, 0)]),
                at,
            );
        }
        let now = start + Duration::from_secs(25);
        let h = fleet.history(
            Duration::from_secs(40),
            Duration::from_secs(10),
            &Query::default(),
            now,
        );
        let requests: Vec<u64> = h
            .iter()
            .map(|v| v.services.first().map_or(0, |s| s.requests))
            .collect();
        assert_eq!(requests, [0, 4, 6, 8], "oldest first, one report a slice");
        assert_eq!(h[3].services[0].rps, 4.0, "8 in the report's 2s");
    }

    #[test]
    fn a_proxy_keeps_a_bounded_number_of_series() {
        let fleet = Fleet::default();
        let a = who("payment", "p1");
        let wide = |n: usize| {
            report(
                2,
                (0..n)
                    .map(|i| series("outbound", &format!("default/r{i}/0"), "", "", 1, 0))
                    .collect(),
            )
        };
        let now = Instant::now();
        fleet.record(&a, wide(MAX_SERIES + 100), now);
        assert_eq!(
            fleet.lock_windows()[&a].reports[0].1.series.len(),
            MAX_SERIES
        );
        for _ in 0..10 {
            fleet.record(&a, wide(MAX_SERIES), now);
        }
        let kept: usize = fleet.lock_windows()[&a]
            .reports
            .iter()
            .map(|(_, r)| r.series.len())
            .sum();
        assert!(kept <= MAX_KEPT_SERIES, "{kept}");
        assert!(
            kept > MAX_KEPT_SERIES - MAX_SERIES,
            "only the oldest went: {kept}"
        );
    }

    #[test]
    fn a_report_stream_speaks_for_a_proxy_only_from_its_credentials_service() {
        let proxy = |claims: &str, principal: (&str, &str)| ProxyStatus {
            node: "web-1".into(),
            namespace: "default".into(),
            service: claims.into(),
            principal: (principal.0.into(), principal.1.into()),
            ..Default::default()
        };
        let reporter = |namespace: &str, service: &str, node: &str| Reporter {
            namespace: namespace.into(),
            service: service.into(),
            identity: String::new(),
            node: node.into(),
        };
        let cases = [
            // (stream from, proxy listed, speaks for it)
            (
                reporter("default", "web", "web-1"),
                proxy("web", ("default", "web")),
                true,
            ),
            // Claiming no service changes nothing: the credentials decide.
            (
                reporter("default", "web", "web-1"),
                proxy("", ("default", "web")),
                true,
            ),
            (
                reporter("default", "web", "web-2"),
                proxy("web", ("default", "web")),
                false,
            ),
            // Another service's proxy naming the same node, claiming a service or not.
            (
                reporter("default", "shop", "web-1"),
                proxy("web", ("default", "web")),
                false,
            ),
            (
                reporter("default", "shop", "web-1"),
                proxy("", ("default", "web")),
                false,
            ),
            // The same service name in another namespace.
            (
                reporter("other", "web", "web-1"),
                proxy("", ("default", "web")),
                false,
            ),
        ];
        for (i, (who, p, want)) in cases.iter().enumerate() {
            assert_eq!(reports_for(who, p), *want, "case {i}");
        }
    }

    /// A fleet with small byte bounds, so that tests can cross them.
    fn small(window_bytes: usize, service_bytes: usize) -> Fleet {
        Fleet {
            limits: Limits {
                window_bytes,
                service_bytes,
            },
            ..Fleet::default()
        }
    }

    /// Each window's byte count is what its entries cost, counted afresh.
    fn counted_right(fleet: &Fleet) {
        for (r, w) in fleet.lock_windows().iter() {
            let fresh = Window::new(r, w.heard).bytes
                + w.reports
                    .iter()
                    .map(|(_, r)| cost::report(r))
                    .sum::<usize>()
                + w.authz
                    .iter()
                    .map(|(_, _, a)| cost::authz(a))
                    .sum::<usize>()
                + w.usage.len() * cost::usage()
                + w.endpoints.as_ref().map_or(0, |(_, e)| cost::endpoints(e));
            assert_eq!(w.bytes, fresh, "{}", r.node);
        }
        // And each service's totals are its windows' sums.
        let windows = fleet.lock_windows();
        let mut sums: HashMap<(String, String), (usize, usize)> = HashMap::new();
        for (r, w) in windows.iter() {
            let t = sums.entry(service_of(r)).or_default();
            t.0 += 1;
            t.1 += w.bytes;
        }
        assert_eq!(windows.services, sums);
    }

    fn service_bytes(fleet: &Fleet, service: &str) -> (usize, usize) {
        let windows = fleet.lock_windows();
        let mine = windows.iter().filter(|(r, _)| r.service == service);
        (mine.clone().count(), mine.map(|(_, w)| w.bytes).sum())
    }

    #[tokio::test(start_paused = true)]
    async fn made_up_nodes_cannot_grow_the_control_plane_past_their_services_bound() {
        // A leaked credential reporting as ever new nodes, each with a fat report: the
        // service's windows stay within its bound, the newest are the ones kept, and another
        // service's window is untouched.
        const SERVICE: usize = 256 << 10;
        let fleet = small(64 << 10, SERVICE);
        let b = who("billing", "b1");
        fleet.record(
            &b,
            report(2, vec![series("inbound", "inbound", "", "", 5, 0)]),
            Instant::now(),
        );
        let fat = |i: usize| {
            report(
                2,
                (0..40)
                    .map(|j| {
                        series(
                            "outbound",
                            &format!("default/r{i}-{j}/{}", "x".repeat(200)),
                            "",
                            "",
                            1,
                            0,
                        )
                    })
                    .collect(),
            )
        };
        for i in 0..200 {
            tokio::time::advance(Duration::from_millis(10)).await;
            fleet.record(
                &who("payment", &format!("made-up-{i}")),
                fat(i),
                Instant::now(),
            );
            let (_, bytes) = service_bytes(&fleet, "payment");
            assert!(bytes <= SERVICE, "after node {i}: {bytes} bytes");
        }
        counted_right(&fleet);
        let (windows, _) = service_bytes(&fleet, "payment");
        assert!((2..200).contains(&windows), "{windows} windows kept");
        let kept = fleet.lock_windows();
        assert!(
            kept.contains_key(&who("payment", "made-up-199")),
            "the newest stays"
        );
        assert!(
            !kept.contains_key(&who("payment", "made-up-0")),
            "the quietest went"
        );
        assert_eq!(
            kept[&b].reports.len(),
            1,
            "another service keeps its window"
        );
    }

    #[test]
    fn one_service_holds_a_bounded_number_of_report_streams_open() {
        let fleet = Fleet::default();
        for i in 0..MAX_SERVICE_STREAMS {
            assert!(
                fleet.open_stream(&who("payment", &format!("n{i}"))),
                "stream {i}"
            );
        }
        assert!(!fleet.open_stream(&who("payment", "one-more")));
        assert!(
            fleet.open_stream(&who("billing", "b1")),
            "another service's"
        );
        fleet.close_stream(&who("payment", "n7"));
        assert!(fleet.open_stream(&who("payment", "one-more")), "room again");
        assert!(!fleet.open_stream(&who("payment", "n7")));
        // Streams of one node count each (a reconnect's overlap).
        fleet.close_stream(&who("payment", "n1"));
        fleet.close_stream(&who("payment", "n2"));
        assert!(fleet.open_stream(&who("payment", "n3")));
        assert_eq!(fleet.streams.lock().unwrap()[&who("payment", "n3")], 2);
    }

    #[test]
    fn made_up_nodes_cannot_make_more_windows_than_a_service_may_have() {
        // Cheap windows (a usage sample each) from ever new node ids.
        let fleet = Fleet::default();
        let now = Instant::now();
        for i in 0..MAX_SERVICE_WINDOWS + 500 {
            fleet.record_usage(
                &who("payment", &format!("n{i}")),
                wire::Usage::default(),
                now,
            );
        }
        fleet.record_usage(&who("billing", "b1"), wire::Usage::default(), now);
        assert_eq!(service_bytes(&fleet, "payment").0, MAX_SERVICE_WINDOWS);
        assert_eq!(service_bytes(&fleet, "billing").0, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_flooding_tiny_messages_keeps_a_bounded_window() {
        // Empty reports, empty verdict lists and usage samples as fast as a stream can carry
        // them: counted by entry, since they hold no series.
        let fleet = small(64 << 10, 1 << 20);
        let a = who("payment", "p1");
        for _ in 0..5_000 {
            let now = Instant::now();
            fleet.record(&a, report(2, Vec::new()), now);
            fleet.record_usage(&a, wire::Usage::default(), now);
            fleet.record_policy(&a, 2000, Vec::new(), None, now);
        }
        counted_right(&fleet);
        let windows = fleet.lock_windows();
        let w = &windows[&a];
        assert!(w.reports.len() <= MAX_ENTRIES, "{}", w.reports.len());
        assert!(w.usage.len() <= MAX_ENTRIES, "{}", w.usage.len());
        assert!(w.authz.len() <= MAX_ENTRIES, "{}", w.authz.len());
        assert!(w.bytes <= 64 << 10, "{}", w.bytes);
    }

    #[test]
    fn a_report_s_buckets_are_bounded_and_bytes_counted_through_expiry() {
        let fleet = small(1 << 20, 4 << 20);
        let a = who("payment", "p1");
        let mut r = report(2, vec![series("inbound", "inbound", "", "", 1, 0)]);
        r.latency_bounds = vec![0.1; 100_000];
        r.series[0].latency = vec![1; 100_000];
        r.series[0].classes = vec![1; 100_000];
        // Spare capacity, as decoding a message of many empty series leaves.
        r.series.reserve(100_000);
        let now = Instant::now();
        fleet.record(&a, r, now);
        {
            let windows = fleet.lock_windows();
            let kept = &windows[&a].reports[0].1;
            assert_eq!(kept.latency_bounds.len(), MAX_BUCKETS);
            assert_eq!(kept.series[0].latency.len(), MAX_BUCKETS + 1);
            assert_eq!(kept.series[0].classes.len(), 5);
            // What is kept holds no more than that.
            assert!(kept.latency_bounds.capacity() <= MAX_BUCKETS);
            assert!(kept.series[0].latency.capacity() <= MAX_BUCKETS + 1);
            assert!(kept.series.capacity() <= 2, "{}", kept.series.capacity());
            assert!(windows[&a].bytes < 64 << 10, "{}", windows[&a].bytes);
        }
        let endpoints = wire::EndpointReport {
            backends: vec![wire::BackendEndpoints {
                backend: "default/payment:80".into(),
                endpoints: 2,
                states: vec![wire::EndpointState {
                    address: "10.0.0.1:80".into(),
                    ejected_ms: 100,
                    reason: "consecutive_5xx".into(),
                    times_ejected: 1,
                    ..Default::default()
                }],
            }],
        };
        fleet.record_policy(
            &a,
            2000,
            vec![verdicts("p", Some(0), "allow", 3)],
            Some(endpoints.clone()),
            now,
        );
        fleet.record_policy(
            &a,
            2000,
            Vec::new(),
            Some(endpoints),
            now + Duration::from_secs(1),
        );
        counted_right(&fleet);
        // Endpoint state goes stale first, then everything: the count follows each step.
        fleet
            .lock_windows()
            .prune(now + FRESH_STATE + Duration::from_secs(2));
        assert!(fleet.lock_windows()[&a].endpoints.is_none());
        counted_right(&fleet);
        fleet
            .lock_windows()
            .prune(now + MAX_WINDOW + Duration::from_secs(2));
        assert!(fleet.lock_windows().is_empty());
    }

    #[test]
    fn taps_reach_only_their_service_and_deliver_boundedly() {
        let fleet = std::sync::Arc::new(Fleet::default());
        let (pay, orders) = (who("payment", "p1"), who("orders", "o1"));
        let mut tap = fleet.open_tap(TapSpec {
            service: Some("payment".into()),
            ..TapSpec::default()
        });
        assert_eq!(fleet.taps_for(&pay).len(), 1);
        assert!(fleet.taps_for(&orders).is_empty());
        let ev = |id: &str| wire::TapEvent {
            tap_id: id.into(),
            direction: "inbound".into(),
            ..Default::default()
        };
        // Events from a proxy the tap does not apply to are not delivered.
        fleet.deliver(&orders, "td", vec![ev(&tap.id)], HashMap::new());
        assert!(tap.events.try_recv().is_err());
        let many = (0..TAP_BUFFER + 10).map(|_| ev(&tap.id)).collect();
        fleet.deliver(&pay, "td", many, HashMap::from([(tap.id.clone(), 3)]));
        let got = std::iter::from_fn(|| tap.events.try_recv().ok()).count();
        assert_eq!(got, TAP_BUFFER);
        assert_eq!(tap.dropped.load(Ordering::Relaxed), 13);
        let e = {
            fleet.deliver(&pay, "td", vec![ev(&tap.id)], HashMap::new());
            tap.events.try_recv().unwrap()
        };
        assert_eq!(
            e.dst_identity, pay.identity,
            "the callee is the reporter itself"
        );
        drop(tap);
        assert!(fleet.taps_for(&pay).is_empty(), "closed with its handle");
    }
}
