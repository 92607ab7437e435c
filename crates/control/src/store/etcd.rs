//! The etcd backend, for control planes that run as several replicas.
//!
//! Every key lives under the store's prefix; a key's version is its etcd `mod_revision` and the
//! store revision is etcd's header revision (shared with whatever else the cluster holds, so it
//! may jump). A commit is one etcd transaction: the preconditions are its compares, the ops its
//! success branch, and its failure branch reads the keys with preconditions so the error can
//! name the one that failed. Changes come from a watch on the prefix, so this replica sees every
//! other replica's commits and etcd's lease expiries in the same order.
//!
//! Differences from the redb backend that etcd imposes: lease TTLs are whole seconds (rounded
//! up, at least one; etcd may raise them to its own minimum), and lease ids are etcd's.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::redb::{check_expect, check_unique};
use super::{Change, Entry, Event, Expect, LeaseId, Loaded, Op, Revision, StoreError};

/// Bounds every unary request, so an unreachable cluster fails calls instead of hanging them.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds each endpoint's status call in [`EtcdStore::check`].
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect backoff for the watch.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The whole prefix is read in one response when opening or resetting; etcd-client's 4 MiB
/// default would cap the store's size.
const MAX_READ_BYTES: usize = 256 << 20;

/// The etcd-backed store.
pub struct EtcdStore {
    /// Boxed: the client is several kilobytes, and `Store` holds it inline.
    client: Box<Client>,
    prefix: String,
    /// The endpoints it was opened with, each checked on its own by [`EtcdStore::check`].
    endpoints: Vec<String>,
    /// Stops the watch task when the store is dropped.
    _watch: DropGuard,
}

impl EtcdStore {
    /// Connects, reads everything under `prefix`, and follows later changes.
    pub async fn open(
        endpoints: &[String],
        prefix: &str,
    ) -> Result<(EtcdStore, Loaded, mpsc::UnboundedReceiver<Change>), StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            // Detects a dead connection under an idle watch.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // A member cut off from its cluster ends the watch instead of going quiet, so the
            // watch reconnects (perhaps to another member) rather than miss changes.
            .with_require_leader(true);
        let client = timed(Client::connect(endpoints, Some(options)))
            .await
            .map_err(|e| etcd_err(&format!("connecting to etcd at {}", endpoints.join(",")), e))?;
        let loaded = read_all(&client, prefix).await?;

        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        tokio::spawn(follow(
            client.clone(),
            prefix.to_string(),
            loaded.revision + 1,
            tx,
            stop.clone(),
        ));
        let store = EtcdStore {
            client: Box::new(client),
            prefix: prefix.to_string(),
            endpoints: endpoints.to_vec(),
            _watch: stop.drop_guard(),
        };
        Ok((store, loaded, rx))
    }

    /// Asks each endpoint for its status on a connection of its own (so one dead member
    /// shows even while the shared client uses another); `Err` with the shared client's
    /// error when the cluster cannot be read at all.
    pub async fn check(&self) -> Result<Vec<super::EndpointHealth>, StoreError> {
        let mut out = Vec::new();
        for endpoint in &self.endpoints {
            let options = ConnectOptions::new().with_connect_timeout(CHECK_TIMEOUT);
            let status = tokio::time::timeout(CHECK_TIMEOUT, async {
                let mut c = Client::connect([endpoint.as_str()], Some(options)).await?;
                c.status().await
            })
            .await;
            out.push(match status {
                Ok(Ok(s)) => super::EndpointHealth {
                    endpoint: endpoint.clone(),
                    healthy: s.errors().is_empty(),
                    error: s.errors().join("; "),
                    leader: s.leader() == s.header().map_or(0, |h| h.member_id()),
                },
                Ok(Err(e)) => super::EndpointHealth::failed(endpoint, e),
                Err(_) => super::EndpointHealth::failed(
                    endpoint,
                    format!("no answer within {CHECK_TIMEOUT:?}"),
                ),
            });
        }
        let read = GetOptions::new().with_keys_only().with_limit(1);
        timed(self.client.kv_client().get(self.prefix.clone(), Some(read)))
            .await
            .map_err(|e| etcd_err("etcd read", e))?;
        Ok(out)
    }

    /// Applies `ops` atomically if every precondition holds; returns the new revision.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        check_unique(&ops)?;
        let mut compares = Vec::new();
        let mut success = Vec::new();
        let mut failure = Vec::new();
        for op in &ops {
            let key = self.full_key(&op.key);
            match op.expect {
                Expect::Any => {}
                Expect::Absent => {
                    compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                }
                Expect::Version(v) => {
                    let v = i64::try_from(v).unwrap_or(i64::MAX);
                    compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, v));
                    if v == 0 {
                        // etcd reads a missing key's mod_revision as 0; version 0 never exists.
                        compares.push(Compare::create_revision(key.clone(), CompareOp::Greater, 0));
                    }
                }
            }
            if op.expect != Expect::Any {
                let keys_only = GetOptions::new().with_keys_only();
                failure.push(TxnOp::get(key.clone(), Some(keys_only)));
            }
            success.push(match &op.value {
                Some(value) => {
                    let options = match op.lease {
                        Some(id) => Some(PutOptions::new().with_lease(lease_i64(id)?)),
                        None => None,
                    };
                    TxnOp::put(key, value.clone(), options)
                }
                None => TxnOp::delete(key, None),
            });
        }
        let txn = Txn::new().when(compares).and_then(success).or_else(failure);

        let response = match timed(self.client.kv_client().txn(txn)).await {
            Ok(response) => response,
            Err(e) if is_lease_not_found(&e) => return Err(self.missing_lease(&ops).await),
            Err(e) => return Err(too_large(&ops, &e).unwrap_or_else(|| etcd_err("etcd commit", e))),
        };
        if response.succeeded() {
            return Ok(header_revision(response.header()));
        }
        let checked = ops.iter().filter(|op| op.expect != Expect::Any);
        for (op, read) in checked.zip(response.op_responses()) {
            if let TxnOpResponse::Get(get) = read {
                let found = get.kvs().first().map(|kv| revision(kv.mod_revision()));
                check_expect(op, found)?;
            }
        }
        Err(StoreError::Backend(
            "etcd refused the commit, yet every precondition holds".to_string(),
        ))
    }

    /// Creates a lease that lapses `ttl` (rounded up to whole seconds) after its last
    /// keep-alive.
    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        let response = timed(self.client.lease_client().grant(secs, None))
            .await
            .map_err(|e| etcd_err("etcd lease grant", e))?;
        if !response.error().is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd lease grant: {}",
                response.error()
            )));
        }
        u64::try_from(response.id())
            .map_err(|_| StoreError::Backend(format!("etcd granted lease {}", response.id())))
    }

    /// Renews a lease with one keep-alive round trip; [`StoreError::LeaseNotFound`] once it
    /// has lapsed.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let id = lease_i64(lease)?;
        // etcd-client sends one request and reads one response, failing on a TTL of 0.
        match timed(self.client.lease_client().keep_alive(id)).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => {
                Err(StoreError::LeaseNotFound(lease))
            }
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(etcd_err("etcd lease keep-alive", e)),
        }
    }

    /// Ends a lease now; etcd deletes its keys in one revision.
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let id = lease_i64(lease)?;
        match timed(self.client.lease_client().revoke(id)).await {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(etcd_err("etcd lease revoke", e)),
        }
    }

    /// The cluster's revision now (from one read under the prefix).
    pub async fn head(&self) -> Result<Revision, StoreError> {
        let read = GetOptions::new().with_keys_only().with_limit(1);
        let response = timed(self.client.kv_client().get(self.prefix.clone(), Some(read)))
            .await
            .map_err(|e| etcd_err("etcd read", e))?;
        Ok(header_revision(response.header()))
    }

    /// Drops every key's versions older than `revision` (cluster-wide: etcd compacts its
    /// whole history). Already compacted that far, by another replica, is success.
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let rev = i64::try_from(revision).unwrap_or(i64::MAX);
        match timed(self.client.kv_client().compact(rev, None)).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s))
                if s.message().contains("required revision has been compacted") =>
            {
                Ok(())
            }
            Err(e) => Err(etcd_err("etcd compact", e)),
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Finds which lease of a refused commit is gone (etcd's error does not say).
    async fn missing_lease(&self, ops: &[Op]) -> StoreError {
        let mut leases: Vec<LeaseId> = ops
            .iter()
            .filter(|op| op.value.is_some())
            .filter_map(|op| op.lease)
            .collect();
        leases.sort_unstable();
        leases.dedup();
        if let [only] = leases[..] {
            return StoreError::LeaseNotFound(only);
        }
        for &lease in &leases {
            let Ok(id) = lease_i64(lease) else {
                return StoreError::LeaseNotFound(lease);
            };
            match timed(self.client.lease_client().time_to_live(id, None)).await {
                // etcd answers -1 for a lease it does not know.
                Ok(ttl) if ttl.ttl() <= 0 => return StoreError::LeaseNotFound(lease),
                Ok(_) => {}
                Err(e) if is_lease_not_found(&e) => return StoreError::LeaseNotFound(lease),
                Err(e) => return etcd_err("etcd lease lookup", e),
            }
        }
        StoreError::Backend("etcd refused the commit: a lease is gone".to_string())
    }
}

/// Follows the prefix from `next` until stopped or until nobody receives: reconnects with
/// backoff after the stream ends, and resets the receiver if etcd compacted what it missed.
async fn follow(
    client: Client,
    prefix: String,
    mut next: Revision,
    tx: mpsc::UnboundedSender<Change>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = async {
            match watch(&client, &prefix, &mut next, &tx, &mut backoff).await {
                Ok(Compacted) => match read_all(&client, &prefix).await {
                    Ok(loaded) => {
                        next = loaded.revision + 1;
                        let events = loaded.entries.into_iter().map(Event::Put).collect();
                        let _ = tx.send(Change {
                            revision: loaded.revision,
                            events,
                            reset: true,
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "could not re-read etcd after compaction"),
                },
                Err(why) => {
                    tracing::warn!(%why, from = next, "etcd watch ended; resuming");
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            _ = attempt => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The revision a watch wanted to start from was compacted away.
struct Compacted;

/// Runs one watch stream, sending one [`Change`] per etcd revision and advancing `next`.
async fn watch(
    client: &Client,
    prefix: &str,
    next: &mut Revision,
    tx: &mpsc::UnboundedSender<Change>,
    backoff: &mut Duration,
) -> Result<Compacted, String> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(i64::try_from(*next).unwrap_or(i64::MAX));
    let mut stream = timed(client.watch_client().watch(prefix, Some(options)))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let response = stream
            .message()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("stream closed")?;
        if response.compact_revision() > 0 {
            return Ok(Compacted);
        }
        if response.canceled() {
            return Err(format!("cancelled: {}", response.cancel_reason()));
        }
        if response.created() {
            *backoff = BACKOFF_MIN;
        }
        // etcd keeps a revision's events within one response unless asked to fragment.
        let mut changes: Vec<Change> = Vec::new();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let rev = revision(kv.mod_revision());
            let event = match event.event_type() {
                EventType::Put => Event::Put(entry(prefix, kv)),
                EventType::Delete => Event::Delete(strip(prefix, kv)),
            };
            match changes.last_mut() {
                Some(change) if change.revision == rev => change.events.push(event),
                _ => changes.push(Change {
                    revision: rev,
                    events: vec![event],
                    reset: false,
                }),
            }
        }
        for change in changes {
            *next = change.revision + 1;
            tx.send(change).map_err(|_| "nobody receives changes")?;
        }
    }
}

/// Everything under `prefix`, and the revision it was read at.
async fn read_all(client: &Client, prefix: &str) -> Result<Loaded, StoreError> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_READ_BYTES);
    let response = timed(kv.get(prefix, Some(GetOptions::new().with_prefix())))
        .await
        .map_err(|e| etcd_err("reading etcd", e))?;
    Ok(Loaded {
        revision: header_revision(response.header()),
        entries: response.kvs().iter().map(|kv| entry(prefix, kv)).collect(),
    })
}

fn entry(prefix: &str, kv: &KeyValue) -> Entry {
    Entry {
        key: strip(prefix, kv),
        value: kv.value().to_vec(),
        version: revision(kv.mod_revision()),
        lease: u64::try_from(kv.lease()).ok().filter(|&l| l != 0),
    }
}

fn strip(prefix: &str, kv: &KeyValue) -> String {
    let key = kv.key();
    String::from_utf8_lossy(key.strip_prefix(prefix.as_bytes()).unwrap_or(key)).into_owned()
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, |h| revision(h.revision()))
}

fn revision(r: i64) -> Revision {
    u64::try_from(r).unwrap_or(0)
}

/// etcd lease ids are positive i64s, so a larger id cannot name a lease.
fn lease_i64(lease: LeaseId) -> Result<i64, StoreError> {
    i64::try_from(lease).map_err(|_| StoreError::LeaseNotFound(lease))
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

async fn timed<T>(
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {REQUEST_TIMEOUT:?}"),
        ))),
    }
}

/// etcd's refusal of a transaction over its size limits, in words that say which limit and
/// what to change; `None` for any other error.
fn too_large(ops: &[Op], e: &etcd_client::Error) -> Option<StoreError> {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return None;
    };
    let m = s.message();
    if m.contains("too many operations in txn request") {
        return Some(StoreError::TooLarge(format!(
            "etcd refused one transaction of {} operations: more than its --max-txn-ops \
             allows (128 unless set); raise it on every etcd member, or write less at once",
            ops.len()
        )));
    }
    // Past --max-request-bytes etcd answers "request is too large"; past its gRPC limit
    // (that plus 512 KiB) gRPC itself refuses the message.
    if m.contains("request is too large") || m.contains("larger than max") {
        let bytes: usize = ops
            .iter()
            .map(|op| op.key.len() + op.value.as_ref().map_or(0, Vec::len))
            .sum();
        return Some(StoreError::TooLarge(format!(
            "etcd refused one transaction of {bytes} bytes: more than its \
             --max-request-bytes allows (1.5 MiB unless set); raise it on every etcd \
             member, or write less at once"
        )));
    }
    None
}

fn etcd_err(context: &str, e: etcd_client::Error) -> StoreError {
    StoreError::backend(context, e)
}
