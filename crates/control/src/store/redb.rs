//! The embedded backend: one redb file, `trellis.redb`, in the data directory.
//!
//! Choices made to match etcd (see the module docs of `store`):
//! - A commit that changes nothing (only deletes of missing keys) keeps the revision, sends no
//!   [`Change`] and returns the current revision, as an etcd transaction without writes does.
//! - Preconditions are checked before leases, and a key may appear once per commit.
//! - Lease TTLs are persisted, deadlines are not: opening the store gives every persisted lease a
//!   fresh deadline of now + TTL, so restarting the control plane does not expire healthy
//!   instances that could not send keep-alives while it was down.
//! - Lease ids count up from 1 and are never reused.
//!
//! Every write runs on the blocking pool and commits with redb's default (immediate)
//! durability: once `commit` returns, a crash loses nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use redb::{Database, DatabaseError, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Change, Entry, Event, Expect, LeaseId, Loaded, Op, Revision, StoreError};

/// The file inside the data directory.
pub const FILE: &str = "trellis.redb";
/// key → (value, version, lease id or 0 for none).
const ENTRIES: TableDefinition<&str, (&[u8], u64, u64)> = TableDefinition::new("entries");
/// lease id → TTL in milliseconds.
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
/// Counters: [`REVISION`] and [`NEXT_LEASE`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
const NEXT_LEASE: &str = "next_lease";

/// How often lapsed leases are looked for; a lapsed lease's keys live at most this much longer.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Caps TTLs so a deadline never overflows the clock.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long `open` waits for a store dropped a moment ago (in this process) to release the
/// file: its background work may still hold it briefly.
const OPEN_WAIT: Duration = Duration::from_secs(2);

/// The redb-backed store.
pub struct RedbStore {
    inner: Arc<Inner>,
    /// Stops the lease sweeper when the store is dropped.
    _sweeper: DropGuard,
}

struct Inner {
    db: Database,
    /// Held from the start of every write transaction until its [`Change`] is sent, so the
    /// channel sees changes in revision order even when commits race.
    changes: Mutex<mpsc::UnboundedSender<Change>>,
    /// Live leases. Only memory knows deadlines; the TTLs are also in [`LEASES`].
    leases: Mutex<HashMap<LeaseId, Lease>>,
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
}

impl RedbStore {
    /// Opens (creating if needed) `dir/trellis.redb`.
    pub async fn open(
        dir: &Path,
    ) -> Result<(RedbStore, Loaded, mpsc::UnboundedReceiver<Change>), StoreError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| StoreError::backend(&format!("creating {}", dir.display()), e))?;
        let db = open_file(dir.join(FILE)).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            db,
            changes: Mutex::new(tx),
            leases: Mutex::new(HashMap::new()),
        });
        let (loaded, ttls) = blocking({
            let inner = inner.clone();
            move || inner.load()
        })
        .await?;
        let now = Instant::now();
        lock(&inner.leases).extend(ttls.into_iter().map(|(id, ttl)| {
            let deadline = now + ttl;
            (id, Lease { ttl, deadline })
        }));

        let stop = CancellationToken::new();
        tokio::spawn(sweep(Arc::downgrade(&inner), stop.clone()));
        let store = RedbStore {
            inner,
            _sweeper: stop.drop_guard(),
        };
        Ok((store, loaded, rx))
    }

    /// Whether the file still serves reads (`trellis check`).
    pub async fn check(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        blocking(move || {
            redb::ReadableDatabase::begin_read(&inner.db)
                .map(drop)
                .map_err(db_err)
        })
        .await
    }

    /// Applies `ops` atomically if every precondition holds; returns the new revision.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        check_unique(&ops)?;
        let inner = self.inner.clone();
        let now = Instant::now();
        blocking(move || inner.commit(&ops, now)).await
    }

    /// Creates a lease that lapses `ttl` after its last keep-alive.
    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl = ttl.min(MAX_TTL);
        let inner = self.inner.clone();
        let now = Instant::now();
        blocking(move || inner.grant(ttl, now)).await
    }

    /// Renews a lease; [`StoreError::LeaseNotFound`] once it has lapsed.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let now = Instant::now();
        match lock(&self.inner.leases).get_mut(&lease) {
            // A lapsed lease the sweeper has not reached yet is already gone for callers.
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    /// Ends a lease now, deleting its keys in one commit.
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        blocking(move || inner.revoke(lease)).await
    }
}

impl Inner {
    /// Creates the tables if missing; reads the entries, the revision and the leases' TTLs.
    fn load(&self) -> Result<(Loaded, Vec<(LeaseId, Duration)>), StoreError> {
        // A write transaction, so that a fresh file gets its tables.
        let txn = self.db.begin_write().map_err(db_err)?;
        let loaded = {
            let entries = txn.open_table(ENTRIES).map_err(db_err)?;
            let leases = txn.open_table(LEASES).map_err(db_err)?;
            let meta = txn.open_table(META).map_err(db_err)?;
            let revision = counter(&meta, REVISION)?;
            let mut loaded = Vec::new();
            for row in entries.iter().map_err(db_err)? {
                let (key, value) = row.map_err(db_err)?;
                let (value, version, lease) = value.value();
                loaded.push(entry(key.value(), value, version, lease));
            }
            let mut ttls = Vec::new();
            for row in leases.iter().map_err(db_err)? {
                let (id, ttl_ms) = row.map_err(db_err)?;
                ttls.push((id.value(), Duration::from_millis(ttl_ms.value())));
            }
            (
                Loaded {
                    revision,
                    entries: loaded,
                },
                ttls,
            )
        };
        txn.commit().map_err(db_err)?;
        Ok(loaded)
    }

    fn commit(&self, ops: &[Op], now: Instant) -> Result<Revision, StoreError> {
        let changes = lock(&self.changes);
        let txn = self.db.begin_write().map_err(db_err)?;
        match self.apply(&txn, ops, now) {
            Ok((revision, events)) if events.is_empty() => {
                txn.abort().map_err(db_err)?;
                Ok(revision)
            }
            Ok((revision, events)) => {
                txn.commit().map_err(db_err)?;
                // No receiver means nobody is listening; the commit still stands.
                let _ = changes.send(Change {
                    revision,
                    events,
                    reset: false,
                });
                Ok(revision)
            }
            Err(e) => {
                txn.abort().map_err(db_err)?;
                Err(e)
            }
        }
    }

    /// Checks every precondition, then writes. Returns the new revision and the events, or
    /// the current revision and no events when nothing changed.
    fn apply(
        &self,
        txn: &WriteTransaction,
        ops: &[Op],
        now: Instant,
    ) -> Result<(Revision, Vec<Event>), StoreError> {
        let mut entries = txn.open_table(ENTRIES).map_err(db_err)?;
        let mut meta = txn.open_table(META).map_err(db_err)?;
        for op in ops {
            let found = entries
                .get(op.key.as_str())
                .map_err(db_err)?
                .map(|row| row.value().1);
            check_expect(op, found)?;
        }
        {
            let leases = lock(&self.leases);
            for op in ops.iter().filter(|op| op.value.is_some()) {
                if let Some(id) = op.lease
                    && leases.get(&id).is_none_or(|l| l.deadline <= now)
                {
                    return Err(StoreError::LeaseNotFound(id));
                }
            }
        }

        let current = counter(&meta, REVISION)?;
        let revision = current + 1;
        let mut events = Vec::new();
        for op in ops {
            match &op.value {
                Some(value) => {
                    let lease = op.lease.unwrap_or(0);
                    entries
                        .insert(op.key.as_str(), (value.as_slice(), revision, lease))
                        .map_err(db_err)?;
                    events.push(Event::Put(entry(&op.key, value, revision, lease)));
                }
                None => {
                    if entries.remove(op.key.as_str()).map_err(db_err)?.is_some() {
                        events.push(Event::Delete(op.key.clone()));
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok((current, events));
        }
        meta.insert(REVISION, revision).map_err(db_err)?;
        Ok((revision, events))
    }

    fn grant(&self, ttl: Duration, now: Instant) -> Result<LeaseId, StoreError> {
        // Serialised with commits, which check leases inside their transaction.
        let _changes = lock(&self.changes);
        let txn = self.db.begin_write().map_err(db_err)?;
        let id = {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let mut leases = txn.open_table(LEASES).map_err(db_err)?;
            let id = counter(&meta, NEXT_LEASE)?.max(1);
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            leases.insert(id, ttl_ms).map_err(db_err)?;
            meta.insert(NEXT_LEASE, id + 1).map_err(db_err)?;
            id
        };
        txn.commit().map_err(db_err)?;
        lock(&self.leases).insert(
            id,
            Lease {
                ttl,
                deadline: now + ttl,
            },
        );
        Ok(id)
    }

    fn revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let changes = lock(&self.changes);
        let Some(lease) = lock(&self.leases).remove(&id) else {
            return Err(StoreError::LeaseNotFound(id));
        };
        self.end_lease(&changes, id).inspect_err(|_| {
            // Still on disk: let the sweeper finish the job.
            lock(&self.leases).insert(id, lease);
        })
    }

    /// Ends every lease whose deadline has passed.
    fn expire(&self, now: Instant) -> Result<(), StoreError> {
        let changes = lock(&self.changes);
        let lapsed: Vec<(LeaseId, Lease)> = {
            let mut leases = lock(&self.leases);
            let ids: Vec<LeaseId> = leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| leases.remove(&id).map(|l| (id, l)))
                .collect()
        };
        for (i, (id, _)) in lapsed.iter().enumerate() {
            if let Err(e) = self.end_lease(&changes, *id) {
                // Put back what is still on disk, lapsed, so the next sweep retries.
                lock(&self.leases).extend(lapsed[i..].iter().copied());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deletes a lease and its keys in one commit (which bumps the revision only if the lease
    /// had keys); the caller holds `changes` and has removed the lease from memory.
    fn end_lease(
        &self,
        changes: &mpsc::UnboundedSender<Change>,
        id: LeaseId,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let change = {
            let mut entries = txn.open_table(ENTRIES).map_err(db_err)?;
            let mut leases = txn.open_table(LEASES).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            // A scan: leases end rarely, and an index would need upkeep on every put.
            let mut keys = Vec::new();
            for row in entries.iter().map_err(db_err)? {
                let (key, value) = row.map_err(db_err)?;
                if value.value().2 == id {
                    keys.push(key.value().to_string());
                }
            }
            for key in &keys {
                entries.remove(key.as_str()).map_err(db_err)?;
            }
            leases.remove(id).map_err(db_err)?;
            if keys.is_empty() {
                None
            } else {
                let revision = counter(&meta, REVISION)? + 1;
                meta.insert(REVISION, revision).map_err(db_err)?;
                Some(Change {
                    revision,
                    events: keys.into_iter().map(Event::Delete).collect(),
                    reset: false,
                })
            }
        };
        txn.commit().map_err(db_err)?;
        if let Some(change) = change {
            let _ = changes.send(change);
        }
        Ok(())
    }

    fn any_lapsed(&self, now: Instant) -> bool {
        lock(&self.leases).values().any(|l| l.deadline <= now)
    }
}

/// Ends lapsed leases every [`SWEEP_EVERY`] until the store is dropped. Holds the store only
/// weakly, so a dropped store's file is released without waiting for this task.
async fn sweep(inner: Weak<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        if !inner.any_lapsed(now) {
            continue;
        }
        if let Err(e) = blocking(move || inner.expire(now)).await {
            tracing::warn!(error = %e, "could not delete the keys of lapsed leases; will retry");
        }
    }
}

/// Opens or creates the file, waiting a little if this process still has it open.
async fn open_file(path: PathBuf) -> Result<Database, StoreError> {
    let give_up = Instant::now() + OPEN_WAIT;
    loop {
        let attempt = path.clone();
        match blocking(move || Ok(Database::create(attempt))).await? {
            Ok(db) => return Ok(db),
            Err(DatabaseError::DatabaseAlreadyOpen) if Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                return Err(StoreError::backend(
                    &format!("opening {}", path.display()),
                    e,
                ));
            }
        }
    }
}

/// Rejects a commit that names a key twice, as etcd does, so both backends agree.
pub(super) fn check_unique(ops: &[Op]) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::new();
    for op in ops {
        if !seen.insert(op.key.as_str()) {
            return Err(StoreError::Backend(format!(
                "a commit may name a key once; {} appears twice",
                op.key
            )));
        }
    }
    Ok(())
}

/// Checks `op`'s precondition against the version found (`None`: absent). Shared with the
/// etcd backend so conflicts read the same on both.
pub(super) fn check_expect(op: &Op, found: Option<Revision>) -> Result<(), StoreError> {
    let holds = match op.expect {
        Expect::Any => true,
        Expect::Absent => found.is_none(),
        Expect::Version(v) => found == Some(v),
    };
    if holds {
        return Ok(());
    }
    let expected = match op.expect {
        Expect::Any => "anything".to_string(),
        Expect::Absent => "absent".to_string(),
        Expect::Version(v) => format!("version {v}"),
    };
    let found = match found {
        Some(v) => format!("version {v}"),
        None => "absent".to_string(),
    };
    Err(StoreError::Conflict {
        key: op.key.clone(),
        expected,
        found,
    })
}

fn entry(key: &str, value: &[u8], version: Revision, lease: u64) -> Entry {
    Entry {
        key: key.to_string(),
        value: value.to_vec(),
        version,
        lease: (lease != 0).then_some(lease),
    }
}

fn counter(meta: &Table<&str, u64>, name: &str) -> Result<u64, StoreError> {
    Ok(meta
        .get(name)
        .map_err(db_err)?
        .map(|v| v.value())
        .unwrap_or(0))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::backend("redb task", e))?
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::backend("redb", e.into())
}

/// A panic in another thread must not wedge the store; the guarded maps hold no invariant
/// that a half-finished critical section could break.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
