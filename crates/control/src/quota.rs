//! Global rate limits: each sidecar enforcing a `Global` limit reports, every
//! [`INTERVAL`], the demand its bucket saw; the control plane leases it a share of the
//! limit's rate in proportion to that demand ([`allocate`]), so the shares of every instance
//! sum to the limit and no request waits for a round trip.
//!
//! The accounting (each sidecar's latest demand per key) lives in the store under
//! `quota/<node>`, one record per sidecar, written by the replica it is connected to in one
//! batched commit per interval and attached to that replica's lease. Every replica reads the
//! records back from the change stream, so all of them divide each limit among the same
//! instances: a sidecar that fails over keeps its place, and no two replicas hand out the
//! whole limit each. A record no one refreshes for [`EXPIRY`] stops counting, and lapses
//! with its replica's lease.

use crate::Control;
use crate::store::{Change, Entry, Event, Expect, LeaseId, Op, Revision, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::Status;
use trellis_api::wire;

/// How often shares are recomputed and records written.
pub const INTERVAL: Duration = Duration::from_millis(250);
/// A sidecar not heard of for this long no longer counts in any division.
pub const EXPIRY: Duration = Duration::from_secs(2);
/// Part of each limit split equally among its instances whatever their demand, so an idle
/// instance can admit its first requests and show its demand.
pub const FLOOR: f64 = 0.1;
/// Store key prefix of the records.
pub const PREFIX: &str = "quota/";
/// Most keys one sidecar may report (per-source limits bound their sources per limit).
const MAX_KEYS: usize = 50_000;
/// Longest caller of a perSource key (a SPIFFE id is at most 2,048 bytes).
const MAX_SOURCE: usize = 2048;
/// Most callers one sidecar may report per limit: a sidecar keeps its own buckets for
/// 10,000 callers (`trellis_proxy::ratelimit::MAX_SOURCES`), plus named overrides and the
/// overflow bucket.
const MAX_SOURCES_PER_LIMIT: usize = 20_000;
/// The lease attached to this replica's records.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// Most records in one commit: etcd takes at most 128 operations per transaction unless told
/// otherwise, and one commit of every sidecar's record would be refused past that.
const COMMIT_RECORDS: usize = 64;
/// Most bytes in one commit: etcd takes requests of at most 1.5 MiB unless told otherwise.
const COMMIT_BYTES: usize = 1 << 20;
/// Largest record written. Past it, the stored record keeps the keys without a caller, then
/// the callers of the highest demand; this replica still counts every key.
const RECORD_BYTES: usize = 256 << 10;

/// A global budget: `namespace/name` of the policy, the limit's name, the caller of a
/// perSource limit (empty otherwise).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key {
    /// `namespace/name`.
    pub policy: String,
    /// The limit's name.
    pub limit: String,
    /// The caller, for a perSource limit.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

/// What one sidecar reported for one key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    /// The key.
    pub key: Key,
    /// The limit's whole rate per second, as the sidecar's config has it.
    pub rate: f64,
    /// Units offered per second during its last interval.
    pub demand: f64,
}

/// One sidecar's latest report, as stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Its keys.
    pub keys: Vec<Demand>,
}

/// Pure: divides `rate` among instances with these `demands` (units per second). Each gets
/// an equal part of [`FLOOR`]`·rate`; the rest goes to demand: when it covers every
/// instance's demand beyond its floor, each gets that and the remainder is split equally
/// (headroom to grow); otherwise in proportion to that demand, so every instance admits the
/// same fraction of what it is offered. The shares sum to `rate`.
pub fn allocate(rate: f64, demands: &[f64]) -> Vec<f64> {
    let n = demands.len();
    if n == 0 {
        return Vec::new();
    }
    let rate = if rate.is_finite() { rate.max(0.0) } else { 0.0 };
    let nf = n as f64;
    let floor = rate * FLOOR / nf;
    let pool = rate - floor * nf;
    let wants: Vec<f64> = demands
        .iter()
        .map(|d| {
            if d.is_finite() {
                (d - floor).max(0.0)
            } else {
                0.0
            }
        })
        .collect();
    let wanted: f64 = wants.iter().sum();
    wants
        .iter()
        .map(|w| {
            if wanted <= pool {
                floor + w + (pool - wanted) / nf
            } else {
                floor + pool * w / wanted
            }
        })
        .collect()
}

/// Pure: every node's share of every key it reported. A key's rate is the lowest any of
/// its instances reports, each already held within the configured rates by [`admit`].
pub fn divide<'a>(
    records: impl IntoIterator<Item = (&'a str, &'a Record)>,
) -> HashMap<String, Vec<(Key, f64)>> {
    // Key → (its lowest rate, each instance's demand).
    type Instances<'a> = (f64, Vec<(&'a str, f64)>);
    let mut by_key: BTreeMap<&Key, Instances> = BTreeMap::new();
    for (node, record) in records {
        for d in &record.keys {
            let e = by_key.entry(&d.key).or_insert((f64::INFINITY, Vec::new()));
            e.0 = e.0.min(d.rate);
            e.1.push((node, d.demand));
        }
    }
    let mut out: HashMap<String, Vec<(Key, f64)>> = HashMap::new();
    for (key, (rate, nodes)) in by_key {
        let demands: Vec<f64> = nodes.iter().map(|(_, d)| *d).collect();
        for ((node, _), share) in nodes.iter().zip(allocate(rate, &demands)) {
            out.entry((*node).to_string())
                .or_default()
                .push((key.clone(), share));
        }
    }
    out
}

/// Pure: the record a report makes, or why it is refused.
pub fn record_of(report: &wire::QuotaRequest) -> Result<Record, String> {
    if report.demand.len() > MAX_KEYS {
        return Err(format!(
            "{} keys in one report; at most {MAX_KEYS}",
            report.demand.len()
        ));
    }
    let seconds = f64::from(report.interval_ms.max(1)) / 1000.0;
    let mut keys = Vec::with_capacity(report.demand.len());
    for d in &report.demand {
        let Some(k) = &d.key else {
            return Err("a demand without a key".into());
        };
        if k.policy.is_empty() || k.limit.is_empty() {
            return Err("a key needs a policy and a limit".into());
        }
        if !d.rate.is_finite() || d.rate <= 0.0 {
            return Err(format!("{}/{}: rate must be positive", k.policy, k.limit));
        }
        keys.push(Demand {
            key: Key {
                policy: k.policy.clone(),
                limit: k.limit.clone(),
                source: k.source.clone(),
            },
            rate: d.rate,
            demand: d.demand as f64 / seconds,
        });
    }
    Ok(Record { keys })
}

/// What a sidecar of service `reporter` (namespace, name) may report for `d`, as the stored
/// config has it (pure): its rate held within the limit's configured rates (its own and its
/// overrides', per second), or why the key is not the sidecar's to report. The rate a
/// division uses is the lowest reported, so without this one report of a tiny rate would
/// throttle every instance; and an Inbound limit is enforced only by its target's own
/// sidecars, so another service's demand for it would only take their shares.
pub fn admit(
    state: &crate::state::State,
    reporter: (&str, &str),
    d: &Demand,
) -> Result<f64, String> {
    use trellis_api::Resource;
    use trellis_api::ratelimit::{LimitDirection, LimitScope};
    let (namespace, name) = d
        .key
        .policy
        .split_once('/')
        .ok_or_else(|| format!("{}: not a namespace/name", d.key.policy))?;
    let key = trellis_api::ObjectKey {
        kind: trellis_api::Kind::RateLimitPolicy.as_str().into(),
        namespace: namespace.into(),
        name: name.into(),
    };
    let Some(Resource::RateLimitPolicy(p)) = state.config.get(&key).map(|s| &*s.resource) else {
        return Err(format!("{}: no such RateLimitPolicy", d.key.policy));
    };
    let limit = p
        .spec
        .limits
        .iter()
        .find(|l| l.name == d.key.limit && l.scope == LimitScope::Global)
        .ok_or_else(|| format!("{}: no Global limit {}", d.key.policy, d.key.limit))?;
    if !d.key.source.is_empty() && !limit.per_source {
        return Err(format!(
            "{}/{}: a caller for a limit that is not perSource",
            d.key.policy, d.key.limit
        ));
    }
    if d.key.source.len() > MAX_SOURCE {
        return Err(format!(
            "{}/{}: a caller of {} bytes; at most {MAX_SOURCE}",
            d.key.policy,
            d.key.limit,
            d.key.source.len()
        ));
    }
    if p.spec.direction() == LimitDirection::Inbound {
        let t = &p.spec.target_ref;
        let target = (t.namespace.as_deref().unwrap_or(namespace), t.name.as_str());
        if reporter != target {
            return Err(format!(
                "{}: enforced by {}/{}'s sidecars, not {}/{}'s",
                d.key.policy, target.0, target.1, reporter.0, reporter.1
            ));
        }
    }
    let secs = limit.per.get().as_secs_f64();
    let rates = std::iter::once(limit.rate)
        .chain(limit.overrides.iter().map(|o| o.rate))
        .map(|r| f64::from(r) / secs);
    let (low, high) = rates.fold((f64::INFINITY, 0.0_f64), |(lo, hi), r| {
        (lo.min(r), hi.max(r))
    });
    Ok(d.rate.clamp(low, high))
}

/// Pure: `record` as stored, at most `max` bytes of JSON (for any `max` of at least the
/// 11 bytes of an empty record). Keys without a caller are kept first, then the callers of
/// the highest demand: what other replicas then miss is the least busy callers.
pub fn stored(record: &Record, max: usize) -> Vec<u8> {
    let whole = serde_json::to_vec(record).unwrap_or_default();
    if whole.len() <= max {
        return whole;
    }
    let mut order: Vec<&Demand> = record.keys.iter().collect();
    order.sort_by(|a, b| {
        (!a.key.source.is_empty())
            .cmp(&!b.key.source.is_empty())
            .then(b.demand.total_cmp(&a.demand))
    });
    // `{"keys":[]}` plus, per key, its JSON and a comma.
    let mut size: usize = 11;
    let mut keys = Vec::new();
    for d in order {
        let more = serde_json::to_vec(d).map_or(usize::MAX, |v| v.len() + 1);
        if size.saturating_add(more) > max {
            break;
        }
        size += more;
        keys.push(d.clone());
    }
    serde_json::to_vec(&Record { keys }).unwrap_or_default()
}

/// Pure: `items` (each with its size) in order, cut into batches of at most `records` items
/// and `bytes` bytes; an item larger than `bytes` goes alone.
pub fn batches<T>(items: Vec<(T, usize)>, records: usize, bytes: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut size = 0;
    for (item, n) in items {
        match out.last_mut() {
            Some(last) if last.len() < records && size + n <= bytes => {
                size += n;
                last.push(item);
            }
            _ => {
                size = n;
                out.push(vec![item]);
            }
        }
    }
    out
}

/// Every node's shares after the latest rebalance.
pub type Shares = Arc<HashMap<String, Vec<(Key, f64)>>>;

struct Seen {
    record: Arc<Record>,
    at: Instant,
}

/// Records of this replica's own sidecars, waiting for the next batched write.
#[derive(Default)]
struct Local {
    /// Node → its latest record, not written yet.
    dirty: HashMap<String, Arc<Record>>,
    /// Node → the revision that last wrote its record (for a guarded delete).
    written: HashMap<String, Revision>,
}

/// The accounting and the latest division of this replica.
pub struct Quota {
    /// Every sidecar's latest record, from the store (and this replica's own reports).
    table: Mutex<HashMap<String, Seen>>,
    local: Mutex<Local>,
    shares: watch::Sender<Shares>,
    /// Open quota streams per service: as many as report streams may be (one per instance,
    /// and a reconnect's overlap).
    pub(crate) streams: crate::fleet::PerService,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            table: Mutex::default(),
            local: Mutex::default(),
            shares: watch::Sender::new(Shares::default()),
            streams: Default::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Quota {
    /// Loads the records of a freshly opened store.
    pub fn load(&self, entries: &[Entry]) {
        let mut table = lock(&self.table);
        for e in entries {
            put(&mut table, e);
        }
    }

    /// Follows one change of the store; true when it holds anything besides records (only
    /// then must the config state be rebuilt).
    pub fn observe(&self, change: &Change) -> bool {
        let mut table = lock(&self.table);
        if change.reset {
            table.clear();
        }
        let mut other = change.reset;
        for ev in &change.events {
            match ev {
                Event::Put(e) if e.key.starts_with(PREFIX) => put(&mut table, e),
                Event::Delete(k) if k.starts_with(PREFIX) => {
                    table.remove(&k[PREFIX.len()..]);
                }
                _ => other = true,
            }
        }
        other
    }

    /// A sidecar's report, counted at once on this replica and written with the next batch.
    fn report(&self, node: &str, record: Record) {
        let record = Arc::new(record);
        lock(&self.table).insert(
            node.to_string(),
            Seen {
                record: record.clone(),
                at: Instant::now(),
            },
        );
        lock(&self.local).dirty.insert(node.to_string(), record);
    }

    /// Divides every limit among the instances heard of within [`EXPIRY`].
    fn rebalance(&self) -> Shares {
        let now = Instant::now();
        let mut table = lock(&self.table);
        table.retain(|_, s| now.duration_since(s.at) < EXPIRY);
        let shares = Arc::new(divide(
            table.iter().map(|(n, s)| (n.as_str(), s.record.as_ref())),
        ));
        drop(table);
        self.shares.send_replace(shares.clone());
        shares
    }

    /// Distinct keys and instances in the table.
    fn counts(&self) -> (usize, usize) {
        let table = lock(&self.table);
        let mut keys = std::collections::HashSet::new();
        for s in table.values() {
            keys.extend(s.record.keys.iter().map(|d| &d.key));
        }
        (keys.len(), table.len())
    }
}

fn put(table: &mut HashMap<String, Seen>, e: &Entry) {
    let node = &e.key[PREFIX.len()..];
    match serde_json::from_slice::<Record>(&e.value) {
        Ok(r) => {
            table.insert(
                node.to_string(),
                Seen {
                    record: Arc::new(r),
                    at: Instant::now(),
                },
            );
        }
        Err(err) => tracing::warn!(key = e.key, %err, "skipping unreadable quota record"),
    }
}

fn response(shares: &[(Key, f64)]) -> wire::QuotaResponse {
    wire::QuotaResponse {
        shares: shares
            .iter()
            .map(|(k, rate)| wire::QuotaShare {
                key: Some(wire::QuotaKey {
                    policy: k.policy.clone(),
                    limit: k.limit.clone(),
                    source: k.source.clone(),
                }),
                rate: *rate,
            })
            .collect(),
    }
}

/// Serves one sidecar's quota stream after its hello: takes its reports, sends its shares
/// after every rebalance (and at once when it reports a key it had no share of).
pub(crate) async fn serve(
    control: &Control,
    node: String,
    service: (String, String),
    first: wire::QuotaRequest,
    mut inbound: tonic::Streaming<wire::QuotaRequest>,
    tx: mpsc::Sender<Result<wire::QuotaResponse, Status>>,
) {
    let quota = &control.quota;
    let mut shares = quota.shares.subscribe();
    let mut known: Vec<Key> = Vec::new();
    let mut next = Some(first);
    loop {
        if let Some(m) = next.take() {
            let mut record = match record_of(&m) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(Status::invalid_argument(e))).await;
                    break;
                }
            };
            // Only what the config lets this sidecar report counts (a key the config does
            // not have yet, on a replica behind, counts once it has), and no more callers
            // per limit than a sidecar keeps.
            let state = control.state();
            let mut callers: HashMap<(String, String), usize> = HashMap::new();
            record.keys.retain(|d| {
                let n = callers
                    .entry((d.key.policy.clone(), d.key.limit.clone()))
                    .or_default();
                *n += 1;
                *n <= MAX_SOURCES_PER_LIMIT
            });
            record
                .keys
                .retain_mut(|d| match admit(&state, (&service.0, &service.1), d) {
                    Ok(rate) => {
                        d.rate = rate;
                        true
                    }
                    Err(why) => {
                        tracing::debug!(node = %node, %why, "quota demand not counted");
                        false
                    }
                });
            let new = record.keys.iter().any(|d| !known.contains(&d.key));
            let was_empty = known.is_empty();
            known = record.keys.iter().map(|d| d.key.clone()).collect();
            // A proxy without Global buckets costs no writes.
            if !(was_empty && record.keys.is_empty()) {
                quota.report(&node, record);
            }
            if new {
                let now = quota.rebalance();
                let mine = now.get(&node).map(Vec::as_slice).unwrap_or_default();
                if tx.send(Ok(response(mine))).await.is_err() {
                    break;
                }
            }
        }
        tokio::select! {
            m = inbound.message() => {
                let Ok(Some(m)) = m else { break };
                next = Some(m);
            }
            changed = shares.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = shares.borrow_and_update().clone();
                if let Some(mine) = now.get(&node)
                    && tx.send(Ok(response(mine))).await.is_err()
                {
                    break;
                }
            }
            () = tx.closed() => break,
        }
    }
    // Gone from here: drop its record unless another replica has written it since.
    let written = {
        let mut local = lock(&quota.local);
        local.dirty.remove(&node);
        local.written.remove(&node)
    };
    if let Some(v) = written {
        let key = format!("{PREFIX}{node}");
        match control
            .store
            .commit(vec![Op::delete(key, Expect::Version(v))])
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => tracing::debug!(%node, error = %e, "quota record not deleted"),
        }
    }
}

/// Every [`INTERVAL`] while the control plane lives: writes this replica's new records (in
/// commits within etcd's limits), then rebalances.
pub(crate) async fn run(control: Weak<Control>) {
    let mut lease: Option<LeaseId> = None;
    let mut renewed = Instant::now();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(control) = control.upgrade() else {
            return;
        };
        if let Err(e) = flush(&control, &mut lease, &mut renewed).await {
            tracing::warn!(error = %e, "quota records not written");
        }
        control.quota.rebalance();
        let (keys, instances) = control.quota.counts();
        let m = &control.metrics;
        m.quota_rebalances.inc();
        m.quota_keys.set(i64::try_from(keys).unwrap_or(i64::MAX));
        m.quota_instances
            .set(i64::try_from(instances).unwrap_or(i64::MAX));
    }
}

async fn flush(
    control: &Control,
    lease: &mut Option<LeaseId>,
    renewed: &mut Instant,
) -> Result<(), StoreError> {
    let dirty: Vec<(String, Arc<Record>)> = lock(&control.quota.local).dirty.drain().collect();
    if dirty.is_empty() {
        return Ok(());
    }
    let id = match *lease {
        Some(id) if renewed.elapsed() < LEASE_TTL / 3 => id,
        Some(id) if control.store.keep_alive(id).await.is_ok() => {
            *renewed = Instant::now();
            id
        }
        _ => match control.store.grant(LEASE_TTL).await {
            Ok(id) => {
                *renewed = Instant::now();
                *lease = Some(id);
                id
            }
            Err(e) => {
                redirty(control, dirty);
                return Err(e);
            }
        },
    };
    let writes = dirty
        .into_iter()
        .map(|(node, r)| {
            let value = stored(&r, RECORD_BYTES);
            let size = PREFIX.len() + node.len() + value.len();
            ((node, r, value), size)
        })
        .collect();
    // Records are independent: a commit etcd refuses as too large leaves the others written
    // (its records are not retried: each sidecar's next report replaces its record); any
    // other failure (etcd unreachable, the lease gone) would fail the rest alike, so they
    // wait for the next interval instead of each taking a request timeout.
    let mut failed = None;
    let mut unwritten = Vec::new();
    for batch in batches(writes, COMMIT_RECORDS, COMMIT_BYTES) {
        if failed
            .as_ref()
            .is_some_and(|e| !matches!(e, StoreError::TooLarge(_)))
        {
            unwritten.extend(batch.into_iter().map(|(node, r, _)| (node, r)));
            continue;
        }
        let mut ops = Vec::with_capacity(batch.len());
        let mut nodes = Vec::with_capacity(batch.len());
        for (node, r, value) in batch {
            let mut op = Op::put(format!("{PREFIX}{node}"), value, Expect::Any);
            op.lease = Some(id);
            ops.push(op);
            nodes.push((node, r));
        }
        match control.store.commit(ops).await {
            Ok(rev) => {
                let mut local = lock(&control.quota.local);
                for (node, _) in nodes {
                    local.written.insert(node, rev);
                }
            }
            Err(e @ StoreError::TooLarge(_)) => {
                tracing::warn!(records = nodes.len(), error = %e, "quota records not written");
                failed.get_or_insert(e);
            }
            Err(e) => {
                if matches!(e, StoreError::LeaseNotFound(_)) {
                    *lease = None;
                }
                unwritten.extend(nodes);
                // Stops the loop even after a TooLarge.
                failed = Some(e);
            }
        }
    }
    redirty(control, unwritten);
    failed.map_or(Ok(()), Err)
}

/// Written with the next batch, unless a newer report replaces them first.
fn redirty(control: &Control, records: Vec<(String, Arc<Record>)>) {
    let mut local = lock(&control.quota.local);
    for (node, r) in records {
        local.dirty.entry(node).or_insert(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn allocate_table() {
        // (rate, demands, want)
        let cases: &[(f64, &[f64], &[f64])] = &[
            (300.0, &[], &[]),
            // Alone: everything.
            (300.0, &[0.0], &[300.0]),
            (300.0, &[1000.0], &[300.0]),
            // Idle: equal parts.
            (300.0, &[0.0, 0.0, 0.0], &[100.0, 100.0, 100.0]),
            // Equal demand beyond the limit: equal parts.
            (300.0, &[200.0, 200.0, 200.0], &[100.0, 100.0, 100.0]),
            // All demand on one: it gets all but the others' floors.
            (300.0, &[900.0, 0.0, 0.0], &[280.0, 10.0, 10.0]),
            // Over the limit: in proportion to demand beyond the floor (10 each).
            (300.0, &[410.0, 210.0, 10.0], &[190.0, 100.0, 10.0]),
            // Under the limit: demand met, the rest split equally.
            (
                300.0,
                &[110.0, 50.0, 0.0],
                &[460.0 / 3.0, 280.0 / 3.0, 160.0 / 3.0],
            ),
            // Nonsense demand counts as none.
            (100.0, &[f64::NAN, -5.0], &[50.0, 50.0]),
        ];
        for (rate, demands, want) in cases {
            let got = allocate(*rate, demands);
            assert_eq!(got.len(), want.len(), "{demands:?}");
            for (g, w) in got.iter().zip(*want) {
                assert!(
                    close(*g, *w),
                    "rate {rate} demands {demands:?}: got {got:?}, want {want:?}"
                );
            }
            if !demands.is_empty() {
                assert!(
                    close(got.iter().sum::<f64>(), *rate),
                    "{demands:?} sums to the rate"
                );
            }
        }
    }

    fn key(limit: &str) -> Key {
        Key {
            policy: "shop/catalog".into(),
            limit: limit.into(),
            source: String::new(),
        }
    }

    fn record(keys: &[(&str, f64, f64)]) -> Record {
        Record {
            keys: keys
                .iter()
                .map(|(l, rate, demand)| Demand {
                    key: key(l),
                    rate: *rate,
                    demand: *demand,
                })
                .collect(),
        }
    }

    #[test]
    fn divide_per_key_with_the_lowest_rate() {
        let a = record(&[("total", 300.0, 900.0), ("only-a", 50.0, 0.0)]);
        // b's config is behind: its lower rate wins.
        let b = record(&[("total", 200.0, 0.0)]);
        let shares = divide([("a", &a), ("b", &b)]);
        let get = |n: &str, l: &str| {
            shares[n]
                .iter()
                .find(|(k, _)| k.limit == l)
                .map(|(_, s)| *s)
                .unwrap()
        };
        assert!(close(get("a", "total"), 190.0));
        assert!(close(get("b", "total"), 10.0));
        assert!(close(get("a", "only-a"), 50.0));
        assert_eq!(shares["b"].len(), 1);
    }

    #[test]
    fn a_demand_counts_only_where_the_config_puts_it_and_at_its_rates() {
        let state = crate::state::State::of_yaml(
            "apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: catalog}
spec:
  targetRef: {kind: Service, name: catalog}
  limits:
  - {name: total, rate: 150, scope: Global}
  - {name: local, rate: 10}
  - name: callers
    rate: 60
    per: 1m
    scope: Global
    perSource: true
    overrides: [{from: {identities: [\"spiffe://td/ns/default/sa/batch\"]}, rate: 600}]
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: out, namespace: shop}
spec:
  targetRef: {kind: Service, name: catalog, namespace: default}
  direction: Outbound
  limits: [{name: all, rate: 20, scope: Global}]
",
        );
        let d = |policy: &str, limit: &str, rate: f64| Demand {
            key: Key {
                policy: policy.into(),
                limit: limit.into(),
                source: String::new(),
            },
            rate,
            demand: 1.0,
        };
        let sourced = |limit: &str, source: &str| Demand {
            key: Key {
                policy: "default/catalog".into(),
                limit: limit.into(),
                source: source.into(),
            },
            rate: 1.0,
            demand: 1.0,
        };
        let catalog = ("default", "catalog");
        let shop = ("shop", "web");
        // (reporter, demand, the rate it counts at or why not)
        type Case<'a> = ((&'a str, &'a str), Demand, Result<f64, &'a str>);
        let cases: [Case; 13] = [
            (catalog, d("default/catalog", "total", 150.0), Ok(150.0)),
            // A rate the config does not have is held within the limit's rates.
            (catalog, d("default/catalog", "total", 0.001), Ok(150.0)),
            (catalog, d("default/catalog", "total", 1e9), Ok(150.0)),
            (catalog, d("default/catalog", "callers", 1.0), Ok(1.0)),
            (catalog, d("default/catalog", "callers", 0.1), Ok(1.0)),
            (catalog, d("default/catalog", "callers", 50.0), Ok(10.0)),
            // An Inbound limit is its target's sidecars' alone.
            (
                shop,
                d("default/catalog", "total", 150.0),
                Err("enforced by default/catalog"),
            ),
            // A Local limit, an unknown limit or policy, a malformed name.
            (
                catalog,
                d("default/catalog", "local", 10.0),
                Err("no Global limit"),
            ),
            (
                catalog,
                d("default/nope", "total", 10.0),
                Err("no such RateLimitPolicy"),
            ),
            (
                catalog,
                d("catalog", "total", 10.0),
                Err("not a namespace/name"),
            ),
            // A caller only for a perSource limit, and no longer than a SPIFFE id.
            (
                catalog,
                sourced("total", "spiffe://td/ns/default/sa/x"),
                Err("not perSource"),
            ),
            (
                catalog,
                sourced("callers", "spiffe://td/ns/default/sa/x"),
                Ok(1.0),
            ),
            (
                catalog,
                sourced("callers", &"x".repeat(MAX_SOURCE + 1)),
                Err("bytes"),
            ),
        ];
        for (i, (who, demand, want)) in cases.into_iter().enumerate() {
            match (admit(&state, who, &demand), want) {
                (Ok(r), Ok(w)) => assert!(close(r, w), "case {i}: {r}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "case {i}: {e}"),
                (got, want) => panic!("case {i}: {got:?}, wanted {want:?}"),
            }
        }
        // An Outbound limit: any caller's sidecar.
        assert_eq!(admit(&state, shop, &d("shop/out", "all", 20.0)), Ok(20.0));
        assert_eq!(
            admit(&state, catalog, &d("shop/out", "all", 20.0)),
            Ok(20.0)
        );
    }

    #[test]
    fn record_of_refuses_bad_reports() {
        let demand = |policy: &str, rate: f64| wire::QuotaDemand {
            key: Some(wire::QuotaKey {
                policy: policy.into(),
                limit: "l".into(),
                source: String::new(),
            }),
            rate,
            demand: 50,
        };
        let ok = wire::QuotaRequest {
            node: None,
            interval_ms: 250,
            demand: vec![demand("ns/p", 100.0)],
        };
        let r = record_of(&ok).unwrap();
        assert!(close(r.keys[0].demand, 200.0), "per second");
        for (bad, why) in [
            (vec![demand("", 100.0)], "needs a policy"),
            (vec![demand("ns/p", 0.0)], "positive"),
            (vec![demand("ns/p", f64::INFINITY)], "positive"),
        ] {
            let req = wire::QuotaRequest {
                demand: bad,
                ..ok.clone()
            };
            assert!(record_of(&req).unwrap_err().contains(why), "{why}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn records_expire_and_store_changes_replace_them() {
        let q = Quota::default();
        q.report("a", record(&[("total", 300.0, 300.0)]));
        let b = serde_json::to_vec(&record(&[("total", 300.0, 0.0)])).unwrap();
        let put = Change {
            revision: 2,
            events: vec![Event::Put(Entry {
                key: "quota/b".into(),
                value: b,
                version: 2,
                lease: None,
            })],
            reset: false,
        };
        assert!(!q.observe(&put), "records only: the config state stays");
        let shares = q.rebalance();
        assert!(close(shares["a"][0].1, 285.0) && close(shares["b"][0].1, 15.0));
        tokio::time::advance(EXPIRY).await;
        q.report("a", record(&[("total", 300.0, 300.0)]));
        let shares = q.rebalance();
        assert!(
            !shares.contains_key("b"),
            "b was not heard of within the expiry"
        );
        assert!(close(shares["a"][0].1, 300.0));
        let del = Change {
            revision: 3,
            events: vec![
                Event::Delete("quota/a".into()),
                Event::Delete("config/x".into()),
            ],
            reset: false,
        };
        assert!(q.observe(&del));
        assert!(q.rebalance().is_empty());
    }

    #[test]
    fn batches_table() {
        // (sizes, records per batch, bytes per batch, want: sizes per batch)
        type Case = (&'static [usize], usize, usize, &'static [&'static [usize]]);
        let cases: &[Case] = &[
            (&[], 2, 10, &[]),
            (&[1, 1, 1, 1, 1], 2, 10, &[&[1, 1], &[1, 1], &[1]]),
            (&[4, 4, 4], 5, 10, &[&[4, 4], &[4]]),
            // Exactly the byte bound fits.
            (&[5, 5, 5], 5, 10, &[&[5, 5], &[5]]),
            // Too large for any batch: alone, and the rest go on around it.
            (&[3, 50, 3, 3], 5, 10, &[&[3], &[50], &[3, 3]]),
            (&[50, 50], 5, 10, &[&[50], &[50]]),
        ];
        for (sizes, records, bytes, want) in cases {
            let items = sizes.iter().map(|&n| (n, n)).collect();
            let got = batches(items, *records, *bytes);
            let want: Vec<Vec<usize>> = want.iter().map(|b| b.to_vec()).collect();
            assert_eq!(got, want, "{sizes:?} by {records} and {bytes}");
        }
    }

    #[test]
    fn a_stored_record_fits_its_bound_and_keeps_the_busiest_keys() {
        let caller = |who: &str, demand: f64| Demand {
            key: Key {
                source: format!("spiffe://mesh.test/ns/default/sa/{who}"),
                ..key("per-caller")
            },
            rate: 10.0,
            demand,
        };
        let mut r = record(&[("total", 300.0, 1.0)]);
        r.keys
            .extend((0..1000).map(|i| caller(&format!("c{i}"), f64::from(i))));
        let whole = serde_json::to_vec(&r).unwrap();
        // Within the bound: the record as it is.
        assert_eq!(stored(&r, whole.len()), whole);
        for max in [11, 100, 1_000, 10_000, whole.len() - 1] {
            let bytes = stored(&r, max);
            assert!(bytes.len() <= max, "{} bytes for {max}", bytes.len());
            let back: Record = serde_json::from_slice(&bytes).unwrap();
            if max < 100 {
                assert!(back.keys.is_empty(), "{max}: {back:?}");
                continue;
            }
            // The key without a caller first, then callers by falling demand, none left out
            // that is busier than one kept.
            assert_eq!(back.keys[0].key.limit, "total", "{max}");
            let kept: Vec<f64> = back.keys[1..].iter().map(|d| d.demand).collect();
            let n = kept.len();
            let want: Vec<f64> = (0..n).map(|i| (999 - i) as f64).collect();
            assert_eq!(kept, want, "{max}");
            assert!(n < 1000, "{max}");
        }
    }
}
