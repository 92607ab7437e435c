//! Config writes: an apply or delete is parsed, checked against resource versions, validated
//! together with everything already stored, and committed in one atomic store commit, or not
//! at all.

use crate::Control;
use crate::state::{CONFIG_MARKER, State, config_key};
use crate::store::{Expect, Op, Revision, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use trellis_api::{Diagnostics, Kind, Located, ObjectKey, Resource};

/// A file to apply, as the CLI read it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceFile {
    /// Its name, for error messages.
    pub name: String,
    /// Its YAML text.
    pub text: String,
}

/// What an apply did to one resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `Kind namespace/name`.
    pub resource: String,
    /// `created`, `configured`, `unchanged` or `deleted`.
    pub action: String,
}

/// The result of a successful write.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WriteResult {
    /// The store revision after the write (unchanged when nothing changed).
    pub revision: Revision,
    /// Per resource.
    pub outcomes: Vec<Outcome>,
}

/// Why a write was refused. Nothing was written in any case.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The config is invalid: every problem, with file, line and field.
    #[error("{0}")]
    Invalid(Diagnostics),
    /// A resource changed since the version the writer read.
    #[error("{0}")]
    Conflict(String),
    /// A resource to delete does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The store cannot take the write in one transaction (etcd's size limits).
    #[error("{0}")]
    TooLarge(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(StoreError),
}

/// How often an apply is retried when another writer committed config between its
/// validation and its commit.
const RETRIES: usize = 5;

impl Control {
    /// Applies every resource in `files` atomically.
    pub async fn apply(
        &self,
        files: &[SourceFile],
        dry_run: bool,
    ) -> Result<WriteResult, WriteError> {
        let mut parsed = Vec::new();
        let mut problems = Vec::new();
        for f in files {
            match trellis_api::parse_documents(&f.name, &f.text) {
                Ok(r) => parsed.extend(r),
                Err(d) => problems.extend(d.0),
            }
        }
        for r in &parsed {
            if r.value.kind() == Kind::Proxy {
                problems.push(r.diagnostic(
                    "kind",
                    "Proxy is a sidecar's local config (trellis proxy --config, or the flags of trellis run); the control plane does not store it",
                ));
            }
        }
        if !problems.is_empty() {
            return Err(WriteError::Invalid(Diagnostics(problems)));
        }
        let now = now_rfc3339();
        self.commit_plan(dry_run, |state| plan_apply(state, &parsed, &now))
            .await
    }

    /// Deletes `keys` atomically, refusing when something still refers to them.
    pub async fn delete(&self, keys: &[ObjectKey]) -> Result<WriteResult, WriteError> {
        self.commit_plan(false, |state| plan_delete(state, keys))
            .await
    }

    /// Plans a write on the latest state and commits it. When another writer committed
    /// config in between (the config marker moved), the write is planned and validated again
    /// on top of that, up to [`RETRIES`] times; a resource changed under it is a conflict.
    async fn commit_plan(
        &self,
        dry_run: bool,
        plan: impl Fn(&State) -> Result<Plan, WriteError>,
    ) -> Result<WriteResult, WriteError> {
        let mut attempt = 0;
        loop {
            let state = self.state();
            let plan = plan(&state)?;
            if dry_run || plan.ops.is_empty() {
                return Ok(WriteResult {
                    revision: state.revision,
                    outcomes: plan.outcomes,
                });
            }
            // Every op but the config marker's changes one resource.
            let changes = plan.ops.len().saturating_sub(1);
            match self.store.commit(plan.ops).await {
                Ok(revision) => {
                    self.wait_for(revision).await;
                    return Ok(WriteResult {
                        revision,
                        outcomes: plan.outcomes,
                    });
                }
                Err(StoreError::Conflict { key, .. })
                    if key == CONFIG_MARKER && attempt < RETRIES =>
                {
                    attempt += 1;
                    self.wait_newer(state.revision).await;
                }
                Err(StoreError::Conflict {
                    key,
                    expected,
                    found,
                }) => {
                    return Err(WriteError::Conflict(format!(
                        "{key} was changed by another writer (expected {expected}, found {found}); get it again and retry"
                    )));
                }
                Err(StoreError::TooLarge(why)) => {
                    return Err(WriteError::TooLarge(format!(
                        "this write changes {changes} resources in one atomic commit, and the \
                         store refused it: {why}. Nothing was written; apply the files in \
                         parts, each valid with what is already stored"
                    )));
                }
                Err(e) => return Err(WriteError::Store(e)),
            }
        }
    }
}

/// The store commit an apply or delete needs, and what it does per resource.
#[derive(Debug)]
pub struct Plan {
    /// Store ops, including the config marker; empty when nothing changes.
    pub ops: Vec<Op>,
    /// Per resource.
    pub outcomes: Vec<Outcome>,
}

/// Plans an apply of `applied` on top of `state`: checks `resourceVersion`s, validates the
/// resulting config whole, and lists the ops. Pure.
pub fn plan_apply(
    state: &State,
    applied: &[Located<Resource>],
    now: &str,
) -> Result<Plan, WriteError> {
    let mut conflicts = Vec::new();
    for r in applied {
        let key = r.value.key();
        let Some(want) = r.value.metadata().resource_version.as_deref() else {
            continue;
        };
        match state.config.get(&key) {
            Some(s) if s.version.to_string() == want => {}
            Some(s) => conflicts.push(format!(
                "{}:{}: {key}: resourceVersion {want} is stale: it is now {} (someone else changed it; get it again and reapply)",
                r.file, r.first_line, s.version
            )),
            None => conflicts.push(format!(
                "{}:{}: {key}: resourceVersion {want} given but the resource does not exist (remove resourceVersion to create it)",
                r.file, r.first_line
            )),
        }
    }
    if !conflicts.is_empty() {
        return Err(WriteError::Conflict(conflicts.join("\n")));
    }

    let set = resulting_set(state, applied);
    trellis_api::validate(&set).map_err(WriteError::Invalid)?;

    let mut ops = Vec::new();
    let mut outcomes = Vec::new();
    for r in applied {
        let key = r.value.key();
        let mut value = r.value.clone();
        let m = value.metadata_mut();
        m.resource_version = None;
        let existing = state.config.get(&key);
        m.creation_timestamp = existing
            .and_then(|s| s.resource.metadata().creation_timestamp.clone())
            .or_else(|| Some(now.to_string()));
        let action = match existing {
            Some(s) if *s.resource == value => "unchanged",
            Some(_) => "configured",
            None => "created",
        };
        outcomes.push(Outcome {
            resource: key.to_string(),
            action: action.into(),
        });
        if action != "unchanged" {
            let expect = existing.map_or(Expect::Absent, |s| Expect::Version(s.version));
            ops.push(Op::put(
                config_key(&key),
                value.to_json().into_bytes(),
                expect,
            ));
        }
    }
    if !ops.is_empty() {
        ops.push(marker_op(state));
    }
    Ok(Plan { ops, outcomes })
}

/// The whole config an apply of `applied` would leave: the applied resources, everything
/// stored that they do not replace, and services that exist only through registered
/// instances. What an apply (and `trellis explain --with`) validates.
pub(crate) fn resulting_set(
    state: &State,
    applied: &[Located<Resource>],
) -> Vec<Located<Resource>> {
    let applied_keys: BTreeSet<ObjectKey> = applied.iter().map(|r| r.value.key()).collect();
    let mut set: Vec<Located<Resource>> = applied.to_vec();
    set.extend(stored_except(state, &applied_keys));
    set.extend(registered_services(state, &set));
    set
}

/// Plans deleting `keys`: each must exist, and what remains must still be valid (nothing may
/// still route to a deleted service). Pure.
pub fn plan_delete(state: &State, keys: &[ObjectKey]) -> Result<Plan, WriteError> {
    let missing: Vec<String> = keys
        .iter()
        .filter(|k| !state.config.contains_key(k))
        .map(|k| format!("{k} not found"))
        .collect();
    if !missing.is_empty() {
        return Err(WriteError::NotFound(missing.join("\n")));
    }
    let gone: BTreeSet<ObjectKey> = keys.iter().cloned().collect();
    let mut set: Vec<Located<Resource>> = stored_except(state, &gone).collect();
    set.extend(registered_services(state, &set));
    trellis_api::validate(&set).map_err(|d| {
        WriteError::Invalid(Diagnostics(
            d.0.into_iter()
                .map(|mut x| {
                    x.message = format!("{} (after deleting {})", x.message, list(keys));
                    x
                })
                .collect(),
        ))
    })?;
    let mut ops: Vec<Op> = keys
        .iter()
        .map(|k| Op::delete(config_key(k), Expect::Version(state.config[k].version)))
        .collect();
    ops.push(marker_op(state));
    Ok(Plan {
        ops,
        outcomes: keys
            .iter()
            .map(|k| Outcome {
                resource: k.to_string(),
                action: "deleted".into(),
            })
            .collect(),
    })
}

fn list(keys: &[ObjectKey]) -> String {
    keys.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn marker_op(state: &State) -> Op {
    let expect = state.config_marker.map_or(Expect::Absent, Expect::Version);
    Op::put(CONFIG_MARKER, b"{}".to_vec(), expect)
}

/// Stored resources other than `except`, labelled with their key for error messages.
fn stored_except<'a>(
    state: &'a State,
    except: &'a BTreeSet<ObjectKey>,
) -> impl Iterator<Item = Located<Resource>> + 'a {
    state
        .config
        .iter()
        .filter(move |(k, _)| !except.contains(k))
        .map(|(k, s)| Located::unsourced((*s.resource).clone(), &format!("stored {k}")))
}

/// Services that exist only because instances registered, so routes may name them.
fn registered_services(state: &State, set: &[Located<Resource>]) -> Vec<Located<Resource>> {
    let defined: BTreeSet<(String, String)> = set
        .iter()
        .filter(|r| r.value.kind() == Kind::Service)
        .map(|r| {
            let m = r.value.metadata();
            (m.namespace.clone(), m.name.clone())
        })
        .collect();
    let mut ports: BTreeMap<(String, String), BTreeSet<u16>> = BTreeMap::new();
    for w in state.workloads.values() {
        let k = (w.namespace.clone(), w.service.clone());
        if !defined.contains(&k) {
            ports.entry(k).or_default().insert(w.port);
        }
    }
    ports
        .into_iter()
        .map(|((ns, name), _)| {
            let r = crate::compile::effective_service(state, &ns, &name, &[]);
            Located::unsourced(r, &format!("registry Service {ns}/{name}"))
        })
        .collect()
}

/// The current time as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// Formats Unix seconds as RFC 3339 UTC (the civil-from-days algorithm, proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
