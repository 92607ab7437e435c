//! Rate limits: token buckets (GCRA over atomics) and the registry of Global-scope buckets
//! that the control plane's quota client shares out.
//!
//! A [`Bucket`] is a theoretical arrival time (TAT) in one atomic: a request is admitted when
//! moving the TAT one emission interval forward keeps it within `burst` intervals of now.
//! Admission is a compare-and-swap, so a limit holds exactly under any number of threads.
//! Buckets belong to their limit, not to a snapshot: the snapshot builder carries them over
//! by key, so a reload does not refill one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

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
            let interval = self.interval();
            let tolerance = f64::from(self.burst()) * interval;
            let next = tat.max(t) as f64 + interval;
            let ahead = next - t as f64;
            if !interval.is_finite() {
                // Rate 0: nothing comes; a second is as good a guess as any.
                return Take::Limited {
                    retry_after: Duration::from_secs(1),
                };
            }
            if ahead > tolerance {
                let wait = Duration::from_nanos((ahead - tolerance).ceil() as u64);
                return Take::Limited { retry_after: wait };
            }
            match self.tat.compare_exchange_weak(
                tat,
                next as u64,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let remaining = ((tolerance - ahead) / interval).floor() as u32;
                    return Take::Allowed { remaining };
                }
                Err(actual) => tat = actual,
            }
        }
    }

    /// Whether the bucket is full at `now` (idle long enough to have refilled).
    pub fn is_full(&self, now: Instant) -> bool {
        self.tat.load(Ordering::Acquire) <= self.nanos(now)
    }
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
}
