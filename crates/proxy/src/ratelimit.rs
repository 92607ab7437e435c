//! Rate limits: token buckets (GCRA over atomics) and the registry of Global-scope buckets
//! that the control plane's quota client shares out.
//!
//! A [`Bucket`] is a theoretical arrival time (TAT) in one atomic: a request is admitted when
//! moving the TAT one emission interval forward keeps it within `burst` intervals of now.
//! Admission is a compare-and-swap, so a limit holds exactly under any number of threads.
//! Buckets belong to their limit, not to a snapshot: the snapshot builder carries them over
//! by key, so a reload does not refill one.

use crate::metrics::{Metrics, RateLimitLabels, RateLimitOverflowLabels};
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;
use trellis_api::ratelimit::{LimitDirection, LimitScope, LimitUnit, RateLimit as RateLimitSpec};
use trellis_api::{Located, Resource};

/// A global budget: the policy (`namespace/name`), the limit's name, and the caller for a
/// perSource limit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GlobalKey {
    /// The policy, `namespace/name`.
    pub policy: Arc<str>,
    /// The limit's name within the policy.
    pub limit: Arc<str>,
    /// The caller (SPIFFE id or IP address) of a perSource limit's bucket.
    pub source: Option<Arc<str>>,
}

/// What a bucket said to one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Admitted; `remaining` more would be admitted right now.
    Allowed {
        /// Units left in the bucket after this one.
        remaining: u32,
    },
    /// Refused; a unit would be admitted after `retry_after`.
    Limited {
        /// Time until the bucket holds one unit again.
        retry_after: Duration,
    },
}

/// One token bucket (GCRA over atomics); its rate can change while it is used.
pub struct Bucket {
    origin: Instant,
    /// Theoretical arrival time, nanoseconds after `origin`.
    tat: AtomicU64,
    /// Nanoseconds per unit, as `f64` bits; infinite while the rate is 0.
    interval: AtomicU64,
    burst: AtomicU32,
    /// Units offered since the last [`Bucket::take_demand`].
    demand: AtomicU64,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("rate", &self.rate())
            .field("burst", &self.burst())
            .finish()
    }
}

fn interval_of(per_second: f64) -> f64 {
    if per_second > 0.0 && per_second.is_finite() {
        1e9 / per_second
    } else {
        f64::INFINITY
    }
}

impl Bucket {
    /// A full bucket admitting `per_second` units per second, up to `burst` at once.
    pub fn new(per_second: f64, burst: u32) -> Bucket {
        Bucket {
            origin: Instant::now(),
            tat: AtomicU64::new(0),
            interval: AtomicU64::new(interval_of(per_second).to_bits()),
            burst: AtomicU32::new(burst),
            demand: AtomicU64::new(0),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        // Ten years of nanoseconds fit easily; the saturation is only a guard.
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn interval(&self) -> f64 {
        f64::from_bits(self.interval.load(Ordering::Relaxed))
    }

    /// Sets the rate in units per second (0: admit nothing). What the bucket holds is kept
    /// in units, so a new rate neither refills nor drains it.
    pub fn set_rate(&self, per_second: f64) {
        let new = interval_of(per_second);
        let old = f64::from_bits(self.interval.swap(new.to_bits(), Ordering::Relaxed));
        if old == new {
            return;
        }
        let now = self.nanos(Instant::now());
        let burst = f64::from(self.burst());
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                let owed = tat.saturating_sub(now) as f64;
                // Units owed at the old rate, then as time at the new one. A bucket that
                // admitted nothing (rate 0) starts empty.
                let units = if old.is_finite() { owed / old } else { burst };
                let owed = if new.is_finite() { units * new } else { 0.0 };
                Some(now.saturating_add(owed as u64))
            });
    }

    /// Sets the bucket's size; what it holds is kept.
    pub fn set_burst(&self, burst: u32) {
        self.burst.store(burst, Ordering::Relaxed);
    }

    /// Current units per second.
    pub fn rate(&self) -> f64 {
        let i = self.interval();
        if i.is_finite() { 1e9 / i } else { 0.0 }
    }

    /// Current size.
    pub fn burst(&self) -> u32 {
        self.burst.load(Ordering::Relaxed)
    }

    /// Units offered (allowed or not) since the last call.
    pub fn take_demand(&self) -> u64 {
        self.demand.swap(0, Ordering::Relaxed)
    }

    /// Takes one unit at `now`, or says how long until one is there.
    pub fn take(&self, now: Instant) -> Take {
        self.demand.fetch_add(1, Ordering::Relaxed);
        let t = self.nanos(now);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let (next, remaining) = match gcra(tat, t, self.interval(), self.burst()) {
                Ok(x) => x,
                Err(retry_after) => return Take::Limited { retry_after },
            };
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Take::Allowed { remaining },
                Err(actual) => tat = actual,
            }
        }
    }

    /// What [`Bucket::take`] would say at `now`, taking nothing (for `trellis explain`).
    pub fn peek(&self, now: Instant) -> Take {
        let tat = self.tat.load(Ordering::Acquire);
        match gcra(tat, self.nanos(now), self.interval(), self.burst()) {
            Ok((_, remaining)) => Take::Allowed { remaining },
            Err(retry_after) => Take::Limited { retry_after },
        }
    }

    /// Whether the bucket is full at `now` (idle long enough to have refilled).
    pub fn is_full(&self, now: Instant) -> bool {
        self.tat.load(Ordering::Acquire) <= self.nanos(now)
    }
}

/// The GCRA decision for one unit at `t` (nanoseconds), given the theoretical arrival time
/// `tat`, the interval per unit and the burst: the new arrival time and the units left, or
/// how long until a unit is there.
fn gcra(tat: u64, t: u64, interval: f64, burst: u32) -> Result<(u64, u32), Duration> {
    if !interval.is_finite() {
        // Rate 0: nothing comes; a second is as good a guess as any.
        return Err(Duration::from_secs(1));
    }
    let tolerance = f64::from(burst) * interval;
    let next = tat.max(t) as f64 + interval;
    let ahead = next - t as f64;
    if ahead > tolerance {
        return Err(Duration::from_nanos((ahead - tolerance).ceil() as u64));
    }
    Ok((next as u64, ((tolerance - ahead) / interval).floor() as u32))
}

/// Decides a Global bucket's first rate and burst, from its key and its limit's total rate
/// per second and burst.
pub type InitialShare = dyn Fn(&GlobalKey, f64, u32) -> (f64, u32) + Send + Sync;

struct GlobalEntry {
    bucket: Weak<Bucket>,
    rate: f64,
    burst: u32,
}

/// Every Global-scope bucket of the current config (`Shared::globals`, carried across
/// reloads): local registers them (and per-source ones as callers appear); global's client
/// reads them and sets each one's share.
///
/// Entries hold their buckets weakly: a bucket dropped with its policy or evicted from a
/// per-source map leaves the list by itself.
#[derive(Default)]
pub struct Globals {
    entries: Mutex<HashMap<GlobalKey, GlobalEntry>>,
    initial: Mutex<Option<Arc<InitialShare>>>,
}

impl std::fmt::Debug for Globals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Globals")
            .field("entries", &self.lock().len())
            .finish()
    }
}

impl Globals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GlobalKey, GlobalEntry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each live global bucket, with its limit's total rate per second and burst.
    pub fn list(&self) -> Vec<(GlobalKey, Arc<Bucket>, f64, u32)> {
        let mut entries = self.lock();
        entries.retain(|_, e| e.bucket.strong_count() > 0);
        let mut out: Vec<_> = entries
            .iter()
            .filter_map(|(k, e)| Some((k.clone(), e.bucket.upgrade()?, e.rate, e.burst)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Installs how a new Global bucket (or one whose limit's numbers changed) gets its
    /// first rate and burst. Without one (a proxy with no control plane), a bucket has its
    /// limit's whole rate and burst.
    pub fn set_initial(&self, f: Arc<InitialShare>) {
        *self.initial.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Registers `bucket` as the budget `key` of a limit with `rate` per second and `burst`
    /// in total. A new key, or new numbers, set the bucket's first share; the same numbers
    /// again leave the share alone.
    pub fn register(&self, key: GlobalKey, bucket: &Arc<Bucket>, rate: f64, burst: u32) {
        let mut entries = self.lock();
        if let Some(e) = entries.get(&key)
            && e.rate == rate
            && e.burst == burst
            && e.bucket.ptr_eq(&Arc::downgrade(bucket))
        {
            return;
        }
        let initial = self
            .initial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (r, b) = match initial {
            Some(f) => f(&key, rate, burst),
            None => (rate, burst),
        };
        bucket.set_burst(b);
        bucket.set_rate(r);
        entries.insert(
            key,
            GlobalEntry {
                bucket: Arc::downgrade(bucket),
                rate,
                burst,
            },
        );
    }
}

/// How many callers a perSource limit keeps a bucket for. Beyond it, idle full buckets are
/// evicted (at most one sweep a second), and if none is idle the newcomer shares the limit's
/// overflow bucket: an attacker with many identities or addresses cannot grow memory.
pub const MAX_SOURCES: usize = 10_000;

/// How often a full per-source map may be swept for idle buckets.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The overflow bucket's source, in its [`GlobalKey`].
const OVERFLOW: &str = "(overflow)";

/// Callers named in a `from`: exact SPIFFE ids, or every identity of some namespaces.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Callers {
    identities: Vec<String>,
    namespaces: Vec<String>,
}

impl Callers {
    fn from_spec(s: &trellis_api::authz::AuthzSource) -> Callers {
        Callers {
            identities: s.identities.clone(),
            namespaces: s.namespaces.clone(),
        }
    }

    /// Whether `identity` is one of them: a caller without an identity never is.
    fn matches(&self, identity: Option<&str>) -> bool {
        let Some(id) = identity else { return false };
        self.identities.iter().any(|i| i == id)
            || namespace_of(id).is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
    }

    /// Whether `identity` is named exactly (a bounded set: such callers always keep a
    /// bucket of their own).
    fn names(&self, identity: Option<&str>) -> bool {
        identity.is_some_and(|id| self.identities.iter().any(|i| i == id))
    }
}

/// The namespace of a SPIFFE id `spiffe://td/ns/NS/sa/SA`.
fn namespace_of(id: &str) -> Option<&str> {
    let mut parts = id.strip_prefix("spiffe://")?.split('/');
    parts.next()?;
    (parts.next()? == "ns").then_some(())?;
    parts.next()
}

/// A bucket's numbers, and how the `RateLimit-Policy` header states them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Numbers {
    /// Units per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: u32,
    /// Quota per window (`q`).
    pub quota: u32,
    /// Window in whole seconds (`w`).
    pub window: u32,
}

impl Numbers {
    fn new(rate: u32, per: Duration, burst: u32) -> Numbers {
        let secs = per.as_secs_f64();
        // The header's window is whole seconds: a sub-second or fractional period is
        // stated per second.
        let (quota, window) = if per.subsec_nanos() == 0 {
            (rate, u32::try_from(per.as_secs()).unwrap_or(u32::MAX))
        } else {
            (((f64::from(rate) / secs).round() as u32).max(1), 1)
        };
        Numbers {
            per_second: f64::from(rate) / secs,
            burst,
            quota,
            window,
        }
    }
}

/// A caller as limits see it: its mutual TLS identity, else its address.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// SPIFFE id proved over mutual TLS.
    pub identity: Option<&'a str>,
    /// Client address.
    pub ip: std::net::IpAddr,
}

impl Caller<'_> {
    fn key(&self) -> Arc<str> {
        match self.identity {
            Some(id) => id.into(),
            None => self.ip.to_string().into(),
        }
    }
}

/// One limit of a policy as configured (no state): what [`applies`] decides over.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The policy, `namespace/name`.
    pub policy: Arc<str>,
    /// The limit's name.
    pub name: Arc<str>,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// What it counts.
    pub unit: LimitUnit,
    /// Whether the budget is shared by the enforcing sidecars.
    pub global: bool,
    /// The limit's own numbers.
    pub numbers: Numbers,
    /// Each caller has its own bucket.
    pub per_source: bool,
    /// Only these callers count.
    pub from: Option<Callers>,
    /// Named callers' own numbers.
    pub overrides: Vec<(Callers, Numbers)>,
}

impl Rule {
    /// A limit of the policy `policy` (`namespace/name`).
    pub fn new(policy: &Arc<str>, direction: LimitDirection, l: &RateLimitSpec) -> Rule {
        let per = l.per.get();
        Rule {
            policy: policy.clone(),
            name: l.name.as_str().into(),
            direction: match direction {
                LimitDirection::Inbound => "inbound",
                LimitDirection::Outbound => "outbound",
            },
            unit: l.unit,
            global: l.scope == LimitScope::Global,
            numbers: Numbers::new(l.rate, per, l.burst()),
            per_source: l.per_source,
            from: l.from.as_ref().map(Callers::from_spec),
            overrides: l
                .overrides
                .iter()
                .map(|o| {
                    let n = Numbers::new(o.rate, per, o.burst.unwrap_or(o.rate));
                    (Callers::from_spec(&o.from), n)
                })
                .collect(),
        }
    }

    fn unit_label(&self) -> &'static str {
        match self.unit {
            LimitUnit::Requests => "requests",
            LimitUnit::Connections => "connections",
        }
    }
}

/// Which bucket of a limit a request is charged to.
#[derive(Clone, Debug, PartialEq)]
pub enum Applies {
    /// The limit does not count this caller (`from`).
    No,
    /// The limit's one bucket.
    Shared,
    /// The caller's own bucket, with its numbers; `named`: an override names it exactly,
    /// so it keeps its bucket beyond [`MAX_SOURCES`].
    Source {
        /// The caller: SPIFFE id, else IP address.
        key: Arc<str>,
        /// Its numbers (an override's, else the limit's).
        numbers: Numbers,
        /// Named exactly by an override.
        named: bool,
    },
}

/// Whether `rule` applies to a request from `caller`, and which bucket it charges: the
/// pure decision behind every check.
pub fn applies(rule: &Rule, caller: &Caller<'_>) -> Applies {
    if let Some(from) = &rule.from
        && !from.matches(caller.identity)
    {
        return Applies::No;
    }
    if !rule.per_source {
        return Applies::Shared;
    }
    let own = rule
        .overrides
        .iter()
        .find(|(c, _)| c.matches(caller.identity));
    Applies::Source {
        key: caller.key(),
        numbers: own.map_or(rule.numbers, |(_, n)| *n),
        named: own.is_some_and(|(c, _)| c.names(caller.identity)),
    }
}

/// A limit's buckets: one, or one per caller. Carried over to the next snapshot by
/// policy and limit name.
#[derive(Debug)]
pub enum State {
    /// One bucket for every caller.
    One(Arc<Bucket>),
    /// A bucket per caller.
    PerSource(Mutex<Sources>),
}

/// The buckets of a perSource limit.
#[derive(Debug, Default)]
pub struct Sources {
    buckets: HashMap<Arc<str>, (Arc<Bucket>, Numbers)>,
    overflow: Option<(Arc<Bucket>, Numbers)>,
    swept: Option<Instant>,
}

impl Sources {
    /// Live per-caller buckets (the overflow bucket aside).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no caller has a bucket.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// One limit as enforced: its rule, its buckets and its counters.
#[derive(Debug)]
pub struct Limit {
    /// The config.
    pub rule: Rule,
    /// The buckets.
    pub state: Arc<State>,
    allowed: Counter,
    limited: Counter,
}

/// Why a request (or connection) was refused: what the refusal's headers state.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{policy}/{limit} exceeded ({quota} per {window}s), retry after {retry_after}s")]
pub struct Refusal {
    /// The policy, `namespace/name` (named to the local app only).
    pub policy: Arc<str>,
    /// The limit's name (in the `RateLimit` headers, for every caller).
    pub limit: Arc<str>,
    /// Quota per window.
    pub quota: u32,
    /// Window, whole seconds.
    pub window: u32,
    /// Whole seconds until a request would pass, at least 1.
    pub retry_after: u64,
}

impl Refusal {
    /// Sets `RateLimit-Policy`, `RateLimit` and `Retry-After` (the structured-field form of
    /// draft-ietf-httpapi-ratelimit-headers: a quoted policy name with `q`, `w`; `r`, `t`).
    pub fn headers(&self, h: &mut http::HeaderMap) {
        let name = self.limit.replace(['"', '\\'], "");
        let mut set = |k: &'static str, v: String| {
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        set(
            "ratelimit-policy",
            format!("\"{name}\";q={};w={}", self.quota, self.window),
        );
        set(
            "ratelimit",
            format!("\"{name}\";r=0;t={}", self.retry_after),
        );
        set("retry-after", self.retry_after.to_string());
    }
}

impl Limit {
    /// Charges one unit to the bucket `applies` chose, counting the decision.
    fn check(&self, caller: &Caller<'_>, now: Instant, ctx: &Ctx<'_>) -> Result<(), Refusal> {
        let (bucket, numbers) = match (applies(&self.rule, caller), &*self.state) {
            (Applies::No, _) => return Ok(()),
            (Applies::Shared, State::One(b)) => (b.clone(), self.rule.numbers),
            (
                Applies::Source {
                    key,
                    numbers,
                    named,
                },
                State::PerSource(m),
            ) => {
                let mut sources = m.lock().unwrap_or_else(|e| e.into_inner());
                let b = self.source_bucket(&mut sources, key, numbers, named, now, ctx);
                (b, numbers)
            }
            // A state of the other kind cannot be carried over (see `Limits::build`).
            _ => return Ok(()),
        };
        match bucket.take(now) {
            Take::Allowed { .. } => {
                self.allowed.inc();
                Ok(())
            }
            Take::Limited { retry_after } => {
                self.limited.inc();
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Err(Refusal {
                    policy: self.rule.policy.clone(),
                    limit: self.rule.name.clone(),
                    quota: numbers.quota,
                    window: numbers.window,
                    retry_after: secs.max(1),
                })
            }
        }
    }

    /// What [`Limit::check`] would decide for `caller` at `now`, charging nothing and
    /// creating no bucket (a caller without one has a full one): `None` when the limit does
    /// not count this caller, else the bucket's answer and the numbers it applies.
    pub fn peek(&self, caller: &Caller<'_>, now: Instant) -> Option<(Take, Numbers)> {
        match (applies(&self.rule, caller), &*self.state) {
            (Applies::No, _) => None,
            (Applies::Shared, State::One(b)) => Some((b.peek(now), self.rule.numbers)),
            (Applies::Source { key, numbers, .. }, State::PerSource(m)) => {
                let sources = m.lock().unwrap_or_else(|e| e.into_inner());
                let take = match sources.buckets.get(&key) {
                    Some((b, _)) => b.peek(now),
                    None => match &sources.overflow {
                        Some((b, _)) if sources.buckets.len() >= MAX_SOURCES => b.peek(now),
                        _ => Take::Allowed {
                            remaining: numbers.burst.saturating_sub(1),
                        },
                    },
                };
                Some((take, numbers))
            }
            _ => None,
        }
    }

    /// The caller's bucket: its own (made, or renumbered after a reload), else the
    /// overflow bucket once [`MAX_SOURCES`] callers have one.
    fn source_bucket(
        &self,
        s: &mut Sources,
        key: Arc<str>,
        numbers: Numbers,
        named: bool,
        now: Instant,
        ctx: &Ctx<'_>,
    ) -> Arc<Bucket> {
        if let Some((b, n)) = s.buckets.get_mut(&key) {
            if *n != numbers {
                *n = numbers;
                self.renumber(b, Some(key), numbers, ctx);
            }
            return b.clone();
        }
        if s.buckets.len() >= MAX_SOURCES && !named {
            if s.swept.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY) {
                s.swept = Some(now);
                s.buckets.retain(|_, (b, _)| !b.is_full(now));
            }
            if s.buckets.len() >= MAX_SOURCES {
                ctx.overflow(&self.rule);
                let base = self.rule.numbers;
                let (b, n) = s.overflow.get_or_insert_with(|| {
                    (Arc::new(Bucket::new(base.per_second, base.burst)), base)
                });
                if *n != base {
                    *n = base;
                    self.renumber(b, Some(OVERFLOW.into()), base, ctx);
                }
                if self.rule.global {
                    ctx.register(&self.rule, Some(OVERFLOW.into()), b, base);
                }
                return b.clone();
            }
        }
        let b = Arc::new(Bucket::new(numbers.per_second, numbers.burst));
        if self.rule.global {
            ctx.register(&self.rule, Some(key.clone()), &b, numbers);
        }
        s.buckets.insert(key, (b.clone(), numbers));
        b
    }

    /// New numbers for a bucket: set at once for a local one; a global one's share is
    /// decided anew ([`Globals::register`]).
    fn renumber(&self, b: &Arc<Bucket>, source: Option<Arc<str>>, n: Numbers, ctx: &Ctx<'_>) {
        if self.rule.global {
            ctx.register(&self.rule, source, b, n);
        } else {
            b.set_burst(n.burst);
            b.set_rate(n.per_second);
        }
    }
}

/// What a check needs beyond the limit: the global registry and metrics.
struct Ctx<'a> {
    globals: &'a Globals,
    metrics: &'a Metrics,
}

impl Ctx<'_> {
    fn register(&self, rule: &Rule, source: Option<Arc<str>>, b: &Arc<Bucket>, n: Numbers) {
        let key = GlobalKey {
            policy: rule.policy.clone(),
            limit: rule.name.clone(),
            source,
        };
        self.globals.register(key, b, n.per_second, n.burst);
    }

    fn overflow(&self, rule: &Rule) {
        self.metrics
            .rate_limit_overflow
            .get_or_create(&RateLimitOverflowLabels {
                policy: rule.policy.clone(),
                limit: rule.name.clone(),
            })
            .inc();
    }
}

/// The limits that apply at one place (a listener, a backend, a route rule), checked in
/// order; the first that refuses decides. Units already taken by earlier limits of a
/// refused request are not given back.
#[derive(Debug, Default, Clone)]
pub struct LimitSet(Vec<Arc<Limit>>);

impl LimitSet {
    /// Whether nothing is limited here.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The limits.
    pub fn limits(&self) -> &[Arc<Limit>] {
        &self.0
    }

    /// Charges a request (or connection) from `caller` to every limit that applies.
    pub fn check(
        &self,
        caller: &Caller<'_>,
        now: Instant,
        globals: &Globals,
        metrics: &Metrics,
    ) -> Result<(), Refusal> {
        let ctx = Ctx { globals, metrics };
        self.0.iter().try_for_each(|l| l.check(caller, now, &ctx))
    }
}

/// Every limit of a snapshot, by where it is enforced.
#[derive(Debug, Default)]
pub struct Limits {
    /// Inbound listener name → request limits of its service.
    pub inbound: HashMap<Arc<str>, LimitSet>,
    /// Listener name → connection limits (inbound: its service's; outbound: its target
    /// service's Outbound ones).
    pub connections: HashMap<Arc<str>, LimitSet>,
    /// Backend name (`namespace/service:port`) → its service's Outbound request limits.
    pub backends: HashMap<Arc<str>, LimitSet>,
    /// Route rule id → its route's (or that rule's) limits.
    pub rules: HashMap<Arc<str>, LimitSet>,
    /// Every limit, by policy and limit name, for the next snapshot to carry over.
    pub all: HashMap<(Arc<str>, Arc<str>), Arc<Limit>>,
}

type ServiceName = (String, String);

/// A route rule's id (`namespace/route/name-or-index`) and its name.
type RuleId = (Arc<str>, Option<String>);

impl Limits {
    /// Compiles the `RateLimitPolicy`s of `resources` for a proxy in namespace `proxy_ns`
    /// with `spec`'s listeners; buckets of limits that remain come from `previous`.
    pub fn build(
        resources: &[Located<Resource>],
        proxy_ns: &str,
        spec: &trellis_api::proxy::ProxySpec,
        previous: Option<&Limits>,
        globals: &Globals,
        metrics: &Metrics,
    ) -> Limits {
        let mut out = Limits::default();
        let policies: Vec<_> = resources
            .iter()
            .filter_map(|r| match &r.value {
                Resource::RateLimitPolicy(p) => Some(p),
                _ => None,
            })
            .collect();
        if policies.is_empty() {
            return out;
        }
        // Service ports (for backend names) and route rules (for rule ids).
        let mut ports: HashMap<ServiceName, Vec<u16>> = HashMap::new();
        let mut rules: HashMap<(&str, ServiceName), Vec<RuleId>> = HashMap::new();
        for r in resources {
            let m = r.value.metadata();
            let names: Vec<Option<String>> = match &r.value {
                Resource::Service(s) => {
                    let k = (m.namespace.clone(), m.name.clone());
                    ports.insert(k, s.spec.ports.iter().map(|p| p.port).collect());
                    continue;
                }
                Resource::HttpRoute(h) => h.spec.rules.iter().map(|x| x.name.clone()).collect(),
                Resource::GrpcRoute(g) => g.spec.rules.iter().map(|x| x.name.clone()).collect(),
                _ => continue,
            };
            let kind = if matches!(r.value, Resource::HttpRoute(_)) {
                "HTTPRoute"
            } else {
                "GRPCRoute"
            };
            let ids = names
                .into_iter()
                .enumerate()
                .map(|(i, n)| {
                    let id = match &n {
                        Some(n) => format!("{}/{}/{n}", m.namespace, m.name),
                        None => format!("{}/{}/{i}", m.namespace, m.name),
                    };
                    (Arc::from(id), n)
                })
                .collect();
            rules.insert((kind, (m.namespace.clone(), m.name.clone())), ids);
        }
        for p in policies {
            let name: Arc<str> = format!("{}/{}", p.metadata.namespace, p.metadata.name).into();
            let direction = p.spec.direction();
            let t = &p.spec.target_ref;
            let target = (
                t.namespace
                    .clone()
                    .unwrap_or_else(|| p.metadata.namespace.clone()),
                t.name.clone(),
            );
            for l in &p.spec.limits {
                let limit = out.limit(Rule::new(&name, direction, l), previous, globals, metrics);
                let conns = l.unit == LimitUnit::Connections;
                match (t.kind.as_str(), direction) {
                    ("Service", LimitDirection::Inbound) => {
                        // This proxy's inbound listeners that serve the target.
                        for il in &spec.inbound {
                            if proxy_ns == target.0 && il.service.as_deref() == Some(&target.1) {
                                let at = if conns {
                                    &mut out.connections
                                } else {
                                    &mut out.inbound
                                };
                                push(at, il.name.as_str().into(), &limit);
                            }
                        }
                    }
                    ("Service", LimitDirection::Outbound) if conns => {
                        for ol in &spec.outbound {
                            let Some(s) = &ol.service else { continue };
                            let ns = s.namespace.as_deref().unwrap_or(proxy_ns);
                            if (ns, s.name.as_str()) == (&target.0, &target.1) {
                                push(&mut out.connections, ol.name.as_str().into(), &limit);
                            }
                        }
                    }
                    ("Service", LimitDirection::Outbound) => {
                        for port in ports.get(&target).into_iter().flatten() {
                            let b = format!("{}/{}:{port}", target.0, target.1);
                            push(&mut out.backends, b.into(), &limit);
                        }
                    }
                    (kind, _) => {
                        let ids = rules.get(&(kind, target.clone())).into_iter().flatten();
                        for (id, rule_name) in ids {
                            if t.section_name.is_none() || t.section_name == *rule_name {
                                push(&mut out.rules, id.clone(), &limit);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// A limit with the buckets it had in `previous` when it stays the same kind (one
    /// bucket or per caller, local or global), renumbered to this config; else fresh, full buckets.
    fn limit(
        &mut self,
        rule: Rule,
        previous: Option<&Limits>,
        globals: &Globals,
        metrics: &Metrics,
    ) -> Arc<Limit> {
        let key = (rule.policy.clone(), rule.name.clone());
        let kept = previous
            .and_then(|p| p.all.get(&key))
            .filter(|l| (l.rule.per_source, l.rule.global) == (rule.per_source, rule.global))
            .map(|l| l.state.clone());
        let n = rule.numbers;
        let state = kept.unwrap_or_else(|| {
            Arc::new(if rule.per_source {
                State::PerSource(Mutex::default())
            } else {
                State::One(Arc::new(Bucket::new(n.per_second, n.burst)))
            })
        });
        let counter = |decision| {
            metrics
                .rate_limit_decisions
                .get_or_create(&RateLimitLabels {
                    direction: rule.direction,
                    policy: rule.policy.clone(),
                    limit: rule.name.clone(),
                    unit: rule.unit_label(),
                    decision,
                })
                .clone()
        };
        let limit = Arc::new(Limit {
            allowed: counter("allowed"),
            limited: counter("limited"),
            state,
            rule,
        });
        let ctx = Ctx { globals, metrics };
        match &*limit.state {
            State::One(b) if limit.rule.global => ctx.register(&limit.rule, None, b, n),
            State::One(b) => {
                b.set_burst(n.burst);
                b.set_rate(n.per_second);
            }
            // Per-caller buckets are renumbered as their callers come back.
            State::PerSource(_) => {}
        }
        self.all.insert(key, limit.clone());
        limit
    }
}

fn push(at: &mut HashMap<Arc<str>, LimitSet>, k: Arc<str>, l: &Arc<Limit>) {
    let set = at.entry(k).or_default();
    if !set.0.iter().any(|x| Arc::ptr_eq(x, l)) {
        set.0.push(l.clone());
    }
}

/// Drops the decision series of policies the active snapshot no longer has.
pub fn prune(metrics: &Metrics, limits: &Limits) {
    let live = |p: &Arc<str>, l: &Arc<str>| limits.all.contains_key(&(p.clone(), l.clone()));
    metrics
        .rate_limit_decisions
        .retain(|s| live(&s.policy, &s.limit));
    metrics
        .rate_limit_overflow
        .retain(|s| live(&s.policy, &s.limit));
}

/// Step 0a: an inbound request charged to its listener's limits.
pub(crate) fn inbound(
    shared: &crate::Shared,
    snap: &crate::Snapshot,
    listener: &crate::snapshot::Listener,
    conn: &crate::http::ConnInfo,
    hop: &mut crate::hop::Hop,
) -> Result<(), crate::ProxyError> {
    let Some(set) = snap.limits.inbound.get(&listener.name) else {
        return Ok(());
    };
    let caller = Caller {
        identity: conn.peer_identity.as_deref(),
        ip: conn.client.ip(),
    };
    refused(
        set.check(&caller, Instant::now(), &shared.globals, &shared.metrics),
        hop,
    )
}

/// Outbound: a request charged to its backend's and its route rule's limits.
pub(crate) fn outbound(
    shared: &crate::Shared,
    snap: &crate::Snapshot,
    fwd: &crate::decide::Forward,
    conn: &crate::http::ConnInfo,
    hop: &mut crate::hop::Hop,
) -> Result<(), crate::ProxyError> {
    let l = &snap.limits;
    if l.backends.is_empty() && l.rules.is_empty() {
        return Ok(());
    }
    let caller = Caller {
        identity: None,
        ip: conn.client.ip(),
    };
    let now = Instant::now();
    let rule = fwd.rule.as_ref().and_then(|r| l.rules.get(&r.id));
    for set in [l.backends.get(&fwd.backend.name), rule]
        .into_iter()
        .flatten()
    {
        refused(
            set.check(&caller, now, &shared.globals, &shared.metrics),
            hop,
        )?;
    }
    Ok(())
}

fn refused(r: Result<(), Refusal>, hop: &mut crate::hop::Hop) -> Result<(), crate::ProxyError> {
    r.map_err(|e| {
        hop.policy(&e.policy);
        crate::ProxyError::RateLimited(Box::new(e))
    })
}

/// A new connection on `listener`, charged to its connection limits; `false`: close it.
pub(crate) fn admit_connection(
    shared: &crate::Shared,
    snap: &crate::Snapshot,
    listener: &Arc<str>,
    peer: std::net::SocketAddr,
) -> bool {
    let Some(set) = snap.limits.connections.get(listener) else {
        return true;
    };
    let caller = Caller {
        identity: None,
        ip: peer.ip(),
    };
    match set.check(&caller, Instant::now(), &shared.globals, &shared.metrics) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(%listener, %peer, limit = %e.limit, policy = %e.policy, "connection refused by a rate limit");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(b: &Bucket, n: u32) -> u32 {
        let now = Instant::now();
        (0..n)
            .filter(|_| matches!(b.take(now), Take::Allowed { .. }))
            .count() as u32
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_admits_its_burst_then_refills_at_its_rate() {
        let b = Bucket::new(10.0, 5);
        assert_eq!(admitted(&b, 20), 5);
        assert_eq!(
            b.take(Instant::now()),
            Take::Limited {
                retry_after: Duration::from_millis(100)
            }
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(admitted(&b, 20), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        // A second refills ten, but the bucket holds five.
        assert_eq!(admitted(&b, 20), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_counts_down() {
        let b = Bucket::new(1.0, 3);
        let now = Instant::now();
        assert_eq!(b.take(now), Take::Allowed { remaining: 2 });
        assert_eq!(b.take(now), Take::Allowed { remaining: 1 });
        assert_eq!(b.take(now), Take::Allowed { remaining: 0 });
        assert!(matches!(b.take(now), Take::Limited { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn steady_rate_over_ten_seconds() {
        let b = Bucket::new(100.0, 10);
        let mut allowed = 0;
        // 1,000 offered per second, every millisecond.
        for _ in 0..10_000 {
            if matches!(b.take(Instant::now()), Take::Allowed { .. }) {
                allowed += 1;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!((1000..=1010).contains(&allowed), "{allowed}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_applies_at_once_and_keeps_the_level() {
        let b = Bucket::new(10.0, 10);
        assert_eq!(admitted(&b, 10), 10);
        b.set_rate(100.0);
        assert_eq!(b.rate(), 100.0);
        // Empty before, empty after: the next unit comes after one new interval.
        assert_eq!(admitted(&b, 10), 0);
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(admitted(&b, 10), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_zero_admits_nothing_until_raised() {
        let b = Bucket::new(0.0, 5);
        assert_eq!(admitted(&b, 5), 0);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(admitted(&b, 5), 0);
        assert_eq!(
            b.take(Instant::now()),
            Take::Limited {
                retry_after: Duration::from_secs(1)
            }
        );
        b.set_rate(10.0);
        // Starts empty: a zero rate never stored up units.
        assert_eq!(admitted(&b, 5), 0);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(admitted(&b, 5), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn demand_counts_allowed_and_limited() {
        let b = Bucket::new(1.0, 2);
        admitted(&b, 7);
        assert_eq!(b.take_demand(), 7);
        assert_eq!(b.take_demand(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_after_idle() {
        let b = Bucket::new(10.0, 2);
        assert!(b.is_full(Instant::now()));
        admitted(&b, 1);
        assert!(!b.is_full(Instant::now()));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.is_full(Instant::now()));
    }

    fn key(limit: &str, source: Option<&str>) -> GlobalKey {
        GlobalKey {
            policy: "shop/p".into(),
            limit: limit.into(),
            source: source.map(Into::into),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn globals_list_live_buckets_and_forget_dropped_ones() {
        let g = Globals::default();
        let a = Arc::new(Bucket::new(1.0, 1));
        let b = Arc::new(Bucket::new(1.0, 1));
        g.register(key("a", None), &a, 100.0, 10);
        g.register(key("b", Some("spiffe://x")), &b, 5.0, 1);
        let listed = g.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].0, key("a", None));
        assert!(Arc::ptr_eq(&listed[0].1, &a));
        assert_eq!((listed[0].2, listed[0].3), (100.0, 10));
        // Without an initial share, the whole limit.
        assert_eq!((a.rate(), a.burst()), (100.0, 10));
        drop((listed, b));
        assert_eq!(g.list().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn globals_initial_share_and_kept_share() {
        let g = Globals::default();
        g.set_initial(Arc::new(|_: &GlobalKey, r: f64, b: u32| (r / 4.0, b / 4)));
        let a = Arc::new(Bucket::new(1.0, 1));
        g.register(key("a", None), &a, 100.0, 40);
        assert_eq!((a.rate(), a.burst()), (25.0, 10));
        // The quota client moves the share; registering the same numbers keeps it.
        a.set_rate(60.0);
        g.register(key("a", None), &a, 100.0, 40);
        assert_eq!(a.rate(), 60.0);
        // New numbers: a new first share.
        g.register(key("a", None), &a, 200.0, 40);
        assert_eq!(a.rate(), 50.0);
    }

    // ---- which limits apply (pure), and limits across reloads ----

    const WEB: &str = "spiffe://td/ns/web/sa/frontend";
    const SHOP: &str = "spiffe://td/ns/shop/sa/storefront";

    fn rule(json: serde_json::Value) -> Rule {
        let spec: RateLimitSpec = serde_json::from_value(json).unwrap();
        Rule::new(&"shop/p".into(), LimitDirection::Inbound, &spec)
    }

    fn caller(identity: Option<&str>) -> Caller<'_> {
        Caller {
            identity,
            ip: [10, 0, 0, 7].into(),
        }
    }

    #[test]
    fn which_bucket_a_request_charges() {
        use serde_json::json;
        let base = Numbers::new(10, Duration::from_secs(1), 10);
        let vip = Numbers::new(50, Duration::from_secs(1), 5);
        let src = |key: &str, numbers, named| Applies::Source {
            key: key.into(),
            numbers,
            named,
        };
        let vip_override = json!([{"from": {"identities": [SHOP]}, "rate": 50, "burst": 5}]);
        let ns_override = json!([{"from": {"namespaces": ["shop"]}, "rate": 50, "burst": 5}]);
        let cases = [
            (json!({"name": "a", "rate": 10}), None, Applies::Shared),
            (json!({"name": "a", "rate": 10}), Some(WEB), Applies::Shared),
            (
                json!({"name": "a", "rate": 10, "from": {"identities": [WEB]}}),
                Some(WEB),
                Applies::Shared,
            ),
            (
                json!({"name": "a", "rate": 10, "from": {"identities": [WEB]}}),
                Some(SHOP),
                Applies::No,
            ),
            // No identity: never one of the named callers.
            (
                json!({"name": "a", "rate": 10, "from": {"identities": [WEB]}}),
                None,
                Applies::No,
            ),
            (
                json!({"name": "a", "rate": 10, "from": {"namespaces": ["shop"]}}),
                Some(SHOP),
                Applies::Shared,
            ),
            (
                json!({"name": "a", "rate": 10, "from": {"namespaces": ["shop"]}}),
                Some(WEB),
                Applies::No,
            ),
            (
                json!({"name": "a", "rate": 10, "perSource": true}),
                Some(WEB),
                src(WEB, base, false),
            ),
            // Without an identity the caller is its address.
            (
                json!({"name": "a", "rate": 10, "perSource": true}),
                None,
                src("10.0.0.7", base, false),
            ),
            (
                json!({"name": "a", "rate": 10, "perSource": true, "overrides": vip_override}),
                Some(SHOP),
                src(SHOP, vip, true),
            ),
            (
                json!({"name": "a", "rate": 10, "perSource": true, "overrides": vip_override}),
                Some(WEB),
                src(WEB, base, false),
            ),
            (
                json!({"name": "a", "rate": 10, "perSource": true, "overrides": ns_override}),
                Some(SHOP),
                src(SHOP, vip, false),
            ),
            (
                json!({"name": "a", "rate": 10, "perSource": true, "from": {"namespaces": ["web"]}}),
                Some(SHOP),
                Applies::No,
            ),
        ];
        for (i, (spec, id, want)) in cases.into_iter().enumerate() {
            assert_eq!(applies(&rule(spec), &caller(id)), want, "case {i}");
        }
    }

    #[test]
    fn header_numbers_state_whole_second_windows() {
        let n = |rate, ms| {
            let n = Numbers::new(rate, Duration::from_millis(ms), rate);
            (n.quota, n.window, n.per_second)
        };
        assert_eq!(n(100, 1000), (100, 1, 100.0));
        assert_eq!(n(600, 60_000), (600, 60, 10.0));
        assert_eq!(n(5, 500), (10, 1, 10.0));
        assert_eq!(n(3, 1500), (2, 1, 2.0));
    }

    #[test]
    fn refusal_headers_are_structured_fields() {
        let r = Refusal {
            policy: "shop/p".into(),
            limit: "per-caller".into(),
            quota: 100,
            window: 1,
            retry_after: 2,
        };
        let mut h = http::HeaderMap::new();
        r.headers(&mut h);
        assert_eq!(h["ratelimit-policy"], "\"per-caller\";q=100;w=1");
        assert_eq!(h["ratelimit"], "\"per-caller\";r=0;t=2");
        assert_eq!(h["retry-after"], "2");
    }

    fn resources(policy: &str) -> Vec<Located<Resource>> {
        let yaml = format!(
            "apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {{name: p, namespace: shop}}
spec:
  inbound: [{{name: in, address: 127.0.0.1:0, forwardTo: 127.0.0.1:1, service: catalog}}]
  outbound: [{{name: out, address: 127.0.0.1:0, service: {{name: catalog, port: 80}}}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: catalog, namespace: shop}}
spec: {{ports: [{{port: 80}}, {{port: 81}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, name: catalog}}]
  rules: [{{name: api}}, {{}}]
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: p, namespace: shop}}
spec:
{policy}"
        );
        let r = trellis_api::parse_documents("t.yaml", &yaml).unwrap();
        trellis_api::validate(&r).unwrap();
        r
    }

    fn build(policy: &str, previous: Option<&Limits>, globals: &Globals) -> Limits {
        let r = resources(policy);
        let Resource::Proxy(p) = &r[0].value else {
            panic!()
        };
        Limits::build(&r, "shop", &p.spec, previous, globals, &Metrics::default())
    }

    fn names(m: &HashMap<Arc<str>, LimitSet>) -> Vec<String> {
        let mut v: Vec<String> = m
            .iter()
            .flat_map(|(k, s)| s.0.iter().map(move |l| format!("{k}={}", l.rule.name)))
            .collect();
        v.sort();
        v
    }

    #[tokio::test(start_paused = true)]
    async fn limits_are_placed_where_they_are_enforced() {
        let g = Globals::default();
        let l = build(
            "  targetRef: {kind: Service, name: catalog}
  limits: [{name: req, rate: 1}, {name: conn, rate: 1, unit: Connections}]
",
            None,
            &g,
        );
        assert_eq!(names(&l.inbound), ["in=req"]);
        assert_eq!(names(&l.connections), ["in=conn"]);
        assert!(l.backends.is_empty() && l.rules.is_empty());
        let l = build(
            "  targetRef: {kind: Service, name: catalog}
  direction: Outbound
  limits: [{name: req, rate: 1}, {name: conn, rate: 1, unit: Connections}]
",
            None,
            &g,
        );
        assert_eq!(
            names(&l.backends),
            ["shop/catalog:80=req", "shop/catalog:81=req"]
        );
        assert_eq!(names(&l.connections), ["out=conn"]);
        assert!(l.inbound.is_empty());
        let l = build(
            "  targetRef: {kind: HTTPRoute, name: r, sectionName: api}
  limits: [{name: req, rate: 1}]
",
            None,
            &g,
        );
        assert_eq!(names(&l.rules), ["shop/r/api=req"]);
        let l = build(
            "  targetRef: {kind: HTTPRoute, name: r}
  limits: [{name: req, rate: 1}]
",
            None,
            &g,
        );
        assert_eq!(names(&l.rules), ["shop/r/1=req", "shop/r/api=req"]);
        // One bucket for the whole route.
        assert!(Arc::ptr_eq(
            &l.rules["shop/r/1"].0[0].state,
            &l.rules["shop/r/api"].0[0].state
        ));
    }

    fn check(l: &Limits, id: Option<&str>) -> Result<(), Refusal> {
        check_in(l, id, &Globals::default())
    }

    fn check_in(l: &Limits, id: Option<&str>, g: &Globals) -> Result<(), Refusal> {
        l.inbound["in"].check(&caller(id), Instant::now(), g, &Metrics::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_a_drained_bucket_drained_and_new_numbers_apply_at_once() {
        let g = Globals::default();
        let spec = |rate: u32| {
            format!(
                "  targetRef: {{kind: Service, name: catalog}}\n  limits: [{{name: req, rate: {rate}, per: 10s, burst: 2}}]\n"
            )
        };
        let first = build(&spec(2), None, &g);
        assert!(check(&first, None).is_ok());
        assert!(check(&first, None).is_ok());
        let refused = check(&first, None).unwrap_err();
        assert_eq!(
            (refused.quota, refused.window, refused.retry_after),
            (2, 10, 5)
        );
        let same = build(&spec(2), Some(&first), &g);
        assert!(check(&same, None).is_err(), "a reload refilled the bucket");
        // Twice the rate: the next unit comes after half the time.
        let faster = build(&spec(4), Some(&same), &g);
        tokio::time::advance(Duration::from_millis(2600)).await;
        assert!(check(&faster, None).is_ok());
        assert!(check(&faster, None).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn per_source_buckets_are_bounded_and_idle_ones_make_room() {
        let g = Globals::default();
        let l = build(
            "  targetRef: {kind: Service, name: catalog}
  limits:
    - name: each
      rate: 1
      perSource: true
      overrides: [{from: {identities: [\"spiffe://td/ns/shop/sa/storefront\"]}, rate: 100}]
",
            None,
            &g,
        );
        let m = Metrics::default();
        let set = &l.inbound["in"];
        let at = |i: u32| Caller {
            identity: None,
            ip: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
        };
        let n = MAX_SOURCES as u32 + 500;
        for i in 0..n {
            let r = set.check(&at(i), Instant::now(), &g, &m);
            // Beyond the bound, callers share one bucket of the limit's numbers.
            assert_eq!(r.is_ok(), i <= MAX_SOURCES as u32, "{i}");
        }
        let State::PerSource(sources) = &*set.0[0].state else {
            panic!()
        };
        assert_eq!(sources.lock().unwrap().len(), MAX_SOURCES);
        let overflow = "trellis_rate_limit_source_overflow_total{policy=\"shop/p\",limit=\"each\"}";
        let counted = |m: &Metrics| {
            m.encode_text()
                .lines()
                .find_map(|x| x.strip_prefix(overflow)?.trim().parse::<u32>().ok())
        };
        assert_eq!(counted(&m), Some(500));
        // A caller an override names keeps a bucket of its own.
        let vip = caller(Some(SHOP));
        assert!(set.check(&vip, Instant::now(), &g, &m).is_ok());
        assert_eq!(sources.lock().unwrap().len(), MAX_SOURCES + 1);
        // Once they refilled, idle buckets give way to new callers.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(set.check(&at(n + 1), Instant::now(), &g, &m).is_ok());
        assert_eq!(sources.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn global_limits_are_registered_with_their_totals() {
        let g = Globals::default();
        let l = build(
            "  targetRef: {kind: Service, name: catalog}
  limits:
    - {name: all, rate: 100, burst: 20, scope: Global}
    - {name: each, rate: 10, scope: Global, perSource: true}
",
            None,
            &g,
        );
        let listed: Vec<_> = g.list().into_iter().map(|(k, _, r, b)| (k, r, b)).collect();
        assert_eq!(
            listed,
            [(
                GlobalKey {
                    policy: "shop/p".into(),
                    limit: "all".into(),
                    source: None
                },
                100.0,
                20
            )]
        );
        assert!(check_in(&l, Some(WEB), &g).is_ok());
        // The per-caller bucket joins the list as its caller appears.
        let keys: Vec<_> = g.list().into_iter().map(|(k, ..)| k.source).collect();
        assert_eq!(keys, [None, Some(WEB.into())]);
        drop(l);
        assert!(g.list().is_empty(), "dropped with their policy");
    }
}
