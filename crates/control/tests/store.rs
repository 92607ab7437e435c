//! The store's semantics (see `store/mod.rs`), checked against both backends by one suite, plus
//! what only one backend can show: redb's durability across reopen, etcd's shared view between
//! replicas and its watch recovery.

#[cfg(feature = "etcd")]
#[path = "support/etcd.rs"]
mod etcd;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::{Instant, sleep, timeout};
use trellis_control::store::{
    Change, Entry, Event, Expect, LeaseId, Loaded, Op, Revision, Store, StoreError, StoreSpec,
};

#[cfg(feature = "etcd")]
use etcd::Etcd;

/// Bounds every test.
const TEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a change may take to arrive (etcd delivers through a watch).
const CHANGE_WAIT: Duration = Duration::from_secs(5);
/// The lease TTL in lease tests: short, and etcd's minimum with the test etcd's raft timings.
const TTL: Duration = Duration::from_secs(1);
/// How long a lapsed lease's keys may outlive it: redb sweeps every 250 ms, etcd checks every
/// 500 ms and then commits through raft.
const EXPIRY_SLACK: Duration = Duration::from_secs(3);

/// Runs each case once per backend, each time on a store of its own.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod on_redb {
            $(#[tokio::test]
            async fn $case() {
                super::run(super::Backend::redb(), super::$case).await;
            })*
        }
        #[cfg(feature = "etcd")]
        mod on_etcd {
            $(#[tokio::test]
            async fn $case() {
                super::run(super::Backend::etcd(), super::$case).await;
            })*
        }
    };
}

conformance!(
    reopen_loads_what_was_committed,
    absent_conflict_writes_nothing,
    version_conflict_writes_nothing,
    one_failed_precondition_applies_no_op,
    changes_arrive_in_revision_order,
    lapsed_lease_deletes_its_keys,
    kept_alive_lease_keeps_its_keys_until_revoked,
    unknown_lease_writes_nothing,
);

async fn reopen_loads_what_was_committed(backend: Backend) -> Result<()> {
    let (store, loaded, changes) = backend.open().await?;
    assert_eq!(loaded.entries, vec![]);
    let r1 = store
        .commit(vec![put("config/a", "1", Expect::Absent)])
        .await?;
    ensure!(
        r1 > loaded.revision,
        "revision {r1} after {}",
        loaded.revision
    );
    let r2 = store
        .commit(vec![
            put("config/a", "2", Expect::Version(r1)),
            put("config/b", "3", Expect::Absent),
        ])
        .await?;
    ensure!(r2 > r1, "revision {r2} after {r1}");
    drop((store, changes));

    let (_store, loaded, _changes) = backend.open().await?;
    assert_eq!(loaded.revision, r2);
    assert_eq!(
        loaded.entries,
        vec![entry("config/a", "2", r2), entry("config/b", "3", r2)]
    );
    Ok(())
}

async fn absent_conflict_writes_nothing(backend: Backend) -> Result<()> {
    let (store, _, mut changes) = backend.open().await?;
    let r1 = store.commit(vec![put("k", "1", Expect::Absent)]).await?;
    let err = store.commit(vec![put("k", "2", Expect::Absent)]).await;
    expect_conflict(err, "k", "absent", &format!("version {r1}"))?;
    let err = store.commit(vec![Op::delete("k", Expect::Absent)]).await;
    expect_conflict(err, "k", "absent", &format!("version {r1}"))?;

    assert_eq!(next_change(&mut changes).await?.revision, r1);
    expect_only_marker(&store, &mut changes).await?;
    assert_eq!(
        reopened(&backend, store, changes).await?.entries,
        vec![entry("k", "1", r1), entry("marker", "", r1 + 1)]
    );
    Ok(())
}

async fn version_conflict_writes_nothing(backend: Backend) -> Result<()> {
    let (store, _, mut changes) = backend.open().await?;
    let r1 = store.commit(vec![put("k", "1", Expect::Absent)]).await?;
    let r2 = store
        .commit(vec![put("k", "2", Expect::Version(r1))])
        .await?;
    let (old, now) = (format!("version {r1}"), format!("version {r2}"));

    let err = store.commit(vec![put("k", "3", Expect::Version(r1))]).await;
    expect_conflict(err, "k", &old, &now)?;
    let err = store
        .commit(vec![Op::delete("k", Expect::Version(r1))])
        .await;
    expect_conflict(err, "k", &old, &now)?;
    let err = store
        .commit(vec![put("new", "1", Expect::Version(r2))])
        .await;
    expect_conflict(err, "new", &now, "absent")?;
    // No key ever has version 0 (etcd would read a missing key's revision as 0).
    let err = store
        .commit(vec![put("new", "1", Expect::Version(0))])
        .await;
    expect_conflict(err, "new", "version 0", "absent")?;

    assert_eq!(next_change(&mut changes).await?.revision, r1);
    assert_eq!(next_change(&mut changes).await?.revision, r2);
    expect_only_marker(&store, &mut changes).await?;
    assert_eq!(
        reopened(&backend, store, changes).await?.entries,
        vec![entry("k", "2", r2), entry("marker", "", r2 + 1)]
    );
    Ok(())
}

async fn one_failed_precondition_applies_no_op(backend: Backend) -> Result<()> {
    let (store, _, mut changes) = backend.open().await?;
    let r1 = store
        .commit(vec![
            put("x", "1", Expect::Absent),
            put("w", "1", Expect::Absent),
        ])
        .await?;
    let err = store
        .commit(vec![
            put("y", "1", Expect::Any),
            Op::delete("w", Expect::Any),
            put("z", "1", Expect::Absent),
            put("x", "2", Expect::Absent),
        ])
        .await;
    let err = expect_conflict(err, "x", "absent", &format!("version {r1}"))?;
    let text = err.to_string();
    ensure!(
        text.starts_with("x "),
        "the error does not name the key: {text}"
    );
    // A key may appear once per commit (etcd refuses more).
    let twice = store
        .commit(vec![
            put("y", "1", Expect::Any),
            Op::delete("y", Expect::Any),
        ])
        .await;
    ensure!(
        matches!(&twice, Err(StoreError::Backend(m)) if m.contains("twice")),
        "{twice:?}"
    );

    assert_eq!(next_change(&mut changes).await?.revision, r1);
    expect_only_marker(&store, &mut changes).await?;
    assert_eq!(
        reopened(&backend, store, changes).await?.entries,
        vec![
            entry("marker", "", r1 + 1),
            entry("w", "1", r1),
            entry("x", "1", r1)
        ]
    );
    Ok(())
}

async fn changes_arrive_in_revision_order(backend: Backend) -> Result<()> {
    let (store, _, mut changes) = backend.open().await?;
    let r1 = store
        .commit(vec![
            put("a", "1", Expect::Absent),
            put("b", "2", Expect::Absent),
        ])
        .await?;
    let r2 = store
        .commit(vec![
            put("a", "3", Expect::Version(r1)),
            Op::delete("b", Expect::Version(r1)),
        ])
        .await?;
    // Deleting a missing key changes nothing: no revision, no event.
    let same = store
        .commit(vec![Op::delete("missing", Expect::Any)])
        .await?;
    assert_eq!(same, r2, "a commit that changes nothing keeps the revision");
    let r3 = store
        .commit(vec![
            Op::delete("missing", Expect::Any),
            Op::delete("a", Expect::Any),
        ])
        .await?;

    let want = [
        change(r1, vec![put_event("a", "1", r1), put_event("b", "2", r1)]),
        change(r2, vec![put_event("a", "3", r2), Event::Delete("b".into())]),
        change(r3, vec![Event::Delete("a".into())]),
    ];
    for want in want {
        assert_eq!(next_change(&mut changes).await?, want);
    }

    // Racing commits still reach the channel in revision order.
    let store = Arc::new(store);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .commit(vec![put(&format!("race/{i}"), "x", Expect::Absent)])
                .await
        });
    }
    let mut committed = Vec::new();
    while let Some(result) = tasks.join_next().await {
        committed.push(result??);
    }
    committed.sort_unstable();
    let mut seen = Vec::new();
    for _ in 0..committed.len() {
        let change = next_change(&mut changes).await?;
        let [Event::Put(entry)] = &change.events[..] else {
            bail!("unexpected change {change:?}");
        };
        assert_eq!(entry.version, change.revision);
        seen.push(change.revision);
    }
    assert_eq!(seen, committed, "changes out of revision order");
    Ok(())
}

async fn lapsed_lease_deletes_its_keys(backend: Backend) -> Result<()> {
    let (store, _, mut changes) = backend.open().await?;
    let lease = store.grant(TTL).await?;
    let r1 = store
        .commit(vec![
            leased("registry/i1", lease),
            put("plain", "", Expect::Any),
        ])
        .await?;
    let first = next_change(&mut changes).await?;
    let Event::Put(put_entry) = &first.events[0] else {
        bail!("expected a put, got {first:?}");
    };
    assert_eq!(put_entry.lease, Some(lease));

    // Nobody keeps the lease alive: its key goes, in a commit of its own.
    let lapsed = timeout(TTL + EXPIRY_SLACK, changes.recv())
        .await
        .context("the lease did not lapse")?
        .context("channel closed")?;
    ensure!(lapsed.revision > r1, "{lapsed:?}");
    assert_eq!(lapsed.events, vec![Event::Delete("registry/i1".into())]);

    expect_lease_not_found(store.keep_alive(lease).await, lease)?;
    let err = store.commit(vec![leased("registry/i1", lease)]).await;
    expect_lease_not_found(err, lease)?;
    let loaded = reopened(&backend, store, changes).await?;
    assert_eq!(loaded.entries, vec![entry("plain", "", r1)]);
    Ok(())
}

async fn kept_alive_lease_keeps_its_keys_until_revoked(backend: Backend) -> Result<()> {
    let (store, _, mut changes) = backend.open().await?;
    let lease = store.grant(TTL).await?;
    let r1 = store.commit(vec![leased("registry/i1", lease)]).await?;
    assert_eq!(next_change(&mut changes).await?.revision, r1);

    // Kept alive for well over two TTLs.
    let until = Instant::now() + TTL * 5 / 2;
    while Instant::now() < until {
        sleep(TTL / 4).await;
        store.keep_alive(lease).await?;
    }
    assert_eq!(changes.try_recv(), Err(TryRecvError::Empty));

    store.revoke(lease).await?;
    let revoked = timeout(Duration::from_secs(1), changes.recv())
        .await
        .context("revoking deleted nothing")?
        .context("channel closed")?;
    ensure!(revoked.revision > r1, "{revoked:?}");
    assert_eq!(revoked.events, vec![Event::Delete("registry/i1".into())]);
    expect_lease_not_found(store.keep_alive(lease).await, lease)?;
    expect_lease_not_found(store.revoke(lease).await, lease)?;
    Ok(())
}

async fn unknown_lease_writes_nothing(backend: Backend) -> Result<()> {
    let (store, _, mut changes) = backend.open().await?;
    let unknown: LeaseId = 0x7777_7777;
    let err = store
        .commit(vec![put("a", "1", Expect::Any), leased("b", unknown)])
        .await;
    expect_lease_not_found(err, unknown)?;
    expect_lease_not_found(store.keep_alive(unknown).await, unknown)?;
    expect_lease_not_found(store.revoke(unknown).await, unknown)?;
    let r = expect_only_marker(&store, &mut changes).await?;
    assert_eq!(
        reopened(&backend, store, changes).await?.entries,
        vec![entry("marker", "", r)]
    );
    Ok(())
}

// ---- redb only ----

#[tokio::test]
async fn redb_reopen_keeps_revision_and_gives_leases_a_fresh_deadline() {
    run(Backend::redb(), |backend| async move {
        let (store, _, changes) = backend.open().await?;
        let lease = store.grant(TTL).await?;
        store.commit(vec![leased("registry/i1", lease)]).await?;
        let r2 = store
            .commit(vec![put("config/a", "1", Expect::Absent)])
            .await?;
        sleep(TTL * 3 / 5).await;
        drop((store, changes));

        let (store, loaded, mut changes) = backend.open().await?;
        assert_eq!(loaded.revision, r2);
        let keys: Vec<(&str, Option<LeaseId>)> = loaded
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.lease))
            .collect();
        assert_eq!(keys, vec![("config/a", None), ("registry/i1", Some(lease))]);

        // Past the lease's original deadline, but the restart reset it.
        sleep(TTL * 3 / 5).await;
        assert_eq!(changes.try_recv(), Err(TryRecvError::Empty));
        store.keep_alive(lease).await?;
        let lapsed = timeout(TTL + EXPIRY_SLACK, changes.recv())
            .await
            .context("the lease did not lapse after reopening")?
            .context("channel closed")?;
        assert_eq!(lapsed.revision, r2 + 1);
        assert_eq!(lapsed.events, vec![Event::Delete("registry/i1".into())]);

        // The counters survived too.
        ensure!(store.grant(TTL).await? > lease, "a lease id was reused");
        let r4 = store
            .commit(vec![put("config/b", "1", Expect::Absent)])
            .await?;
        assert_eq!(r4, r2 + 2);
        Ok(())
    })
    .await;
}

/// Deadlines follow tokio's clock, so the control plane's lease logic can be tested with
/// paused time.
#[tokio::test(start_paused = true)]
async fn redb_lease_deadlines_follow_tokio_time() {
    run(Backend::redb(), |backend| async move {
        let (store, _, mut changes) = backend.open().await?;
        // Virtual time, yet within TEST_TIMEOUT, which is virtual here too.
        let ttl = Duration::from_secs(2);
        let lease = store.grant(ttl).await?;
        store.commit(vec![leased("registry/i1", lease)]).await?;
        next_change(&mut changes).await?;
        for _ in 0..3 {
            sleep(ttl * 3 / 4).await;
            store.keep_alive(lease).await?;
        }
        assert_eq!(changes.try_recv(), Err(TryRecvError::Empty));
        sleep(ttl + Duration::from_millis(500)).await;
        let lapsed = next_change(&mut changes).await?;
        assert_eq!(lapsed.events, vec![Event::Delete("registry/i1".into())]);
        expect_lease_not_found(store.keep_alive(lease).await, lease)?;
        Ok(())
    })
    .await;
}

// ---- etcd only ----

#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_replicas_see_each_others_commits() {
    run(Backend::etcd(), |backend| async move {
        let (one, _, mut one_changes) = backend.open().await?;
        let (two, _, mut two_changes) = backend.open().await?;
        let Backend::Etcd { etcd, .. } = &backend else {
            unreachable!()
        };
        let (_other, other_loaded, mut other_changes) =
            open_etcd(&etcd.endpoint, "/elsewhere/").await?;

        let r1 = one
            .commit(vec![put("config/a", "1", Expect::Absent)])
            .await?;
        let r2 = two
            .commit(vec![put("config/a", "2", Expect::Version(r1))])
            .await?;
        let lease = two.grant(TTL).await?;
        two.commit(vec![leased("registry/i1", lease)]).await?;
        two.revoke(lease).await?;
        for changes in [&mut one_changes, &mut two_changes] {
            assert_eq!(
                next_change(changes).await?,
                change(r1, vec![put_event("config/a", "1", r1)])
            );
            assert_eq!(
                next_change(changes).await?,
                change(r2, vec![put_event("config/a", "2", r2)])
            );
            let leased = next_change(changes).await?;
            let [Event::Put(e)] = &leased.events[..] else {
                bail!("expected the leased put, got {leased:?}");
            };
            assert_eq!((e.key.as_str(), e.lease), ("registry/i1", Some(lease)));
            assert_eq!(
                next_change(changes).await?.events,
                vec![Event::Delete("registry/i1".into())]
            );
        }
        // Another prefix on the same etcd is another store.
        assert_eq!(other_loaded.entries, vec![]);
        assert_eq!(other_changes.try_recv(), Err(TryRecvError::Empty));
        Ok(())
    })
    .await;
}

/// A commit past etcd's limits (128 operations, 1.5 MiB unless set) is refused whole with an
/// error that names the limit, and a commit just within them goes through.
#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_refuses_an_oversized_commit_whole_and_says_which_limit() {
    run(Backend::etcd(), |backend| async move {
        let (store, _, mut changes) = backend.open().await?;
        let many = |n: usize| (0..n).map(|i| put(&format!("config/k{i}"), "v", Expect::Absent));
        let err = store.commit(many(200).collect()).await.unwrap_err();
        let StoreError::TooLarge(why) = &err else {
            bail!("expected TooLarge, got {err:?}");
        };
        assert!(
            why.contains("200 operations") && why.contains("--max-txn-ops"),
            "{why}"
        );
        let big = vec![b'x'; 1 << 20];
        let two = vec![
            Op::put("config/big1", big.clone(), Expect::Any),
            Op::put("config/big2", big, Expect::Any),
        ];
        let err = store.commit(two).await.unwrap_err();
        let StoreError::TooLarge(why) = &err else {
            bail!("expected TooLarge, got {err:?}");
        };
        assert!(why.contains("--max-request-bytes"), "{why}");
        // Nothing of either was written: the next change is the commit within the limits.
        let r = store.commit(many(128).collect()).await?;
        let c = next_change(&mut changes).await?;
        assert_eq!((c.revision, c.events.len()), (r, 128));
        Ok(())
    })
    .await;
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_watch_resumes_after_an_outage_and_resets_after_compaction() {
    let mut etcd = Etcd::start();
    let prefix = "/trellis/";
    let outcome = timeout(TEST_TIMEOUT, async {
        let (store, _, mut changes) = open_etcd(&etcd.endpoint, prefix).await?;
        let r1 = store.commit(vec![put("k1", "1", Expect::Absent)]).await?;
        assert_eq!(next_change(&mut changes).await?.revision, r1);

        // A short outage: the watch resumes where it was, with nothing lost or repeated.
        etcd.restart(None);
        let r2 = retry(|| store.commit(vec![put("k2", "2", Expect::Absent)])).await?;
        assert_eq!(
            next_change(&mut changes).await?,
            change(r2, vec![put_event("k2", "2", r2)])
        );

        // While this store cannot reach etcd, another writes and compacts its history away.
        let home = etcd.client_port();
        etcd.restart(Some(etcd::free_port()));
        let (other, _, _) = open_etcd(&etcd.endpoint, prefix).await?;
        let r3 = other.commit(vec![put("k3", "3", Expect::Absent)]).await?;
        let r4 = other.commit(vec![Op::delete("k1", Expect::Any)]).await?;
        let mut client = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
        client.compact(i64::try_from(r4)?, None).await?;
        drop(other);
        etcd.restart(Some(home));

        let reset = next_change(&mut changes).await?;
        ensure!(reset.reset, "expected a reset, got {reset:?}");
        assert_eq!(reset.revision, r4);
        assert_eq!(
            reset.events,
            vec![put_event("k2", "2", r2), put_event("k3", "3", r3)]
        );
        // And it follows on from there.
        let r5 = retry(|| store.commit(vec![put("k4", "4", Expect::Absent)])).await?;
        assert_eq!(
            next_change(&mut changes).await?,
            change(r5, vec![put_event("k4", "4", r5)])
        );
        anyhow::Ok(())
    })
    .await;
    match outcome {
        Ok(result) => result.unwrap(),
        Err(_) => panic!("timed out after {TEST_TIMEOUT:?}"),
    }
}

// ---- support ----

/// Where one test's store lives; dropping it removes the store.
enum Backend {
    Redb(TempDir),
    #[cfg(feature = "etcd")]
    Etcd {
        etcd: Etcd,
        prefix: String,
    },
}

impl Backend {
    fn redb() -> Backend {
        Backend::Redb(TempDir::new())
    }

    #[cfg(feature = "etcd")]
    fn etcd() -> Backend {
        Backend::Etcd {
            etcd: Etcd::start(),
            prefix: "/trellis/".to_string(),
        }
    }

    /// Opens the store, through `Store` so the dispatch is covered too.
    async fn open(&self) -> Result<(Store, Loaded, UnboundedReceiver<Change>)> {
        let spec = match self {
            // A directory that does not exist yet: opening creates it.
            Backend::Redb(dir) => StoreSpec::Dir(dir.0.join("nested/data")),
            #[cfg(feature = "etcd")]
            Backend::Etcd { etcd, prefix } => StoreSpec::Etcd {
                endpoints: vec![etcd.endpoint.clone()],
                prefix: prefix.clone(),
            },
        };
        Ok(Store::open(&spec).await?)
    }
}

#[cfg(feature = "etcd")]
async fn open_etcd(
    endpoint: &str,
    prefix: &str,
) -> Result<(Store, Loaded, UnboundedReceiver<Change>)> {
    let spec = StoreSpec::Etcd {
        endpoints: vec![endpoint.to_string()],
        prefix: prefix.to_string(),
    };
    Ok(Store::open(&spec).await?)
}

/// Runs a case within [`TEST_TIMEOUT`].
async fn run<F, Fut>(backend: Backend, case: F)
where
    F: FnOnce(Backend) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    match timeout(TEST_TIMEOUT, case(backend)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("timed out after {TEST_TIMEOUT:?}"),
    }
}

/// Closes the store and opens it again: what a restarted control plane would load.
async fn reopened(
    backend: &Backend,
    store: Store,
    changes: UnboundedReceiver<Change>,
) -> Result<Loaded> {
    drop((store, changes));
    Ok(backend.open().await?.1)
}

async fn next_change(changes: &mut UnboundedReceiver<Change>) -> Result<Change> {
    timeout(CHANGE_WAIT, changes.recv())
        .await
        .context("no change arrived")?
        .context("the change channel closed")
}

/// Commits a marker and checks it is the next change: nothing was sent before it.
async fn expect_only_marker(
    store: &Store,
    changes: &mut UnboundedReceiver<Change>,
) -> Result<Revision> {
    let r = store
        .commit(vec![put("marker", "", Expect::Absent)])
        .await?;
    assert_eq!(
        next_change(changes).await?,
        change(r, vec![put_event("marker", "", r)])
    );
    Ok(r)
}

/// Retries a call that may fail while the client reconnects.
#[cfg(feature = "etcd")]
async fn retry<T, Fut>(mut call: impl FnMut() -> Fut) -> Result<T>
where
    Fut: Future<Output = Result<T, StoreError>>,
{
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(StoreError::Backend(_)) if Instant::now() < give_up => {
                sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn expect_conflict<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    key: &str,
    expected: &str,
    found: &str,
) -> Result<StoreError> {
    let want = format!("a conflict on {key} ({expected} vs {found})");
    let err = match result {
        Err(err) => err,
        Ok(value) => bail!("wanted {want}, got {value:?}"),
    };
    match &err {
        StoreError::Conflict {
            key: k,
            expected: e,
            found: f,
        } if k == key && e == expected && f == found => Ok(err),
        _ => bail!("wanted {want}, got {err:?}"),
    }
}

fn expect_lease_not_found<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    lease: LeaseId,
) -> Result<()> {
    match result {
        Err(StoreError::LeaseNotFound(l)) if l == lease => Ok(()),
        other => bail!("wanted LeaseNotFound({lease:x}), got {other:?}"),
    }
}

fn put(key: &str, value: &str, expect: Expect) -> Op {
    Op::put(key, value.as_bytes().to_vec(), expect)
}

fn leased(key: &str, lease: LeaseId) -> Op {
    Op {
        lease: Some(lease),
        ..put(key, "up", Expect::Any)
    }
}

fn entry(key: &str, value: &str, version: Revision) -> Entry {
    Entry {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        version,
        lease: None,
    }
}

fn put_event(key: &str, value: &str, version: Revision) -> Event {
    Event::Put(entry(key, value, version))
}

fn change(revision: Revision, events: Vec<Event>) -> Change {
    Change {
        revision,
        events,
        reset: false,
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "trellis-store-test-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
