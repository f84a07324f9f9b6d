//! WatchSecrets. No event log is kept: a client says what it holds, the server answers with
//! the difference from the current state, sends SYNCED, then streams live changes.
//!
//! Live changes come from an in-process broadcast of secret names, published by the write
//! path once a change is durable (and by the sweeper). Publishing never blocks a writer: a
//! watcher that falls more than the broadcast's capacity behind gets `Lagged` and recomputes
//! its differences for everything it watches, which is always correct because each stream
//! remembers what it has told its client. A reconnecting client resends what it holds and
//! gets the difference, so it loses nothing it needs.

use crate::audit::AuditRecord;
use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::identity::Peer;
use crate::model::{Kind, SecretName, SecretRecord, StateReason, VersionState, MAX_NAME_LEN};
use crate::policy::Verb;
use crate::slots::{IdentitySlot, PerIdentity};
use crate::store::{decode, Tree};
use crate::vault::{ChangeSink, Vault};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, watch};

/// Names the broadcast holds before a slow watcher lags (and then recomputes).
const CHANGES_CAPACITY: usize = 1024;
/// Events buffered per stream before its task waits for the client to read.
const STREAM_BUFFER: usize = 64;
/// Most names in one WatchSecrets request.
pub const MAX_WATCH_NAMES: usize = 1000;
/// Most held secrets in one request.
pub const MAX_HELD_SECRETS: usize = 1000;
/// Most held versions per secret.
pub const MAX_HELD_VERSIONS: usize = 100;

/// The broadcast from the write path to every watch stream (a [`ChangeSink`] the vault is
/// given at construction), the shutdown switch that ends
/// the streams (and the sweeper) so a graceful shutdown is not held up by them, and the count
/// of open streams per identity (each stream holds a task and a broadcast receiver).
pub struct WatchHub {
    changes: broadcast::Sender<Arc<str>>,
    closed: watch::Sender<bool>,
    open: Arc<PerIdentity>,
    max_per_identity: usize,
}

impl WatchHub {
    /// A hub with no watchers, allowing `max_per_identity` open streams per identity.
    pub fn new(max_per_identity: usize) -> Self {
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let (closed, _) = watch::channel(false);
        Self {
            changes,
            closed,
            open: Arc::default(),
            max_per_identity,
        }
    }

    /// A stream slot for `identity`, or RESOURCE_EXHAUSTED if it has the most open.
    fn slot(&self, identity: &Arc<str>) -> Result<IdentitySlot> {
        self.open
            .enter(identity, self.max_per_identity)
            .ok_or_else(|| {
                Error::ResourceExhausted(format!(
                    "{identity} already has {} watch streams open \
                     (limits.max_watches_per_identity); close one, or watch several names in \
                     one stream",
                    self.max_per_identity
                ))
            })
    }

    /// Ends every watch stream (with UNAVAILABLE, so clients reconnect) and the sweeper.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// A receiver that turns true once [`WatchHub::close`] was called.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.changes.subscribe()
    }
}

impl ChangeSink for WatchHub {
    /// Tells watchers that `name` changed. Never blocks; with no watchers it is a no-op.
    fn durable(&self, name: &str) {
        let _ = self.changes.send(Arc::from(name));
    }
}

/// WatchSecrets' input, as received.
#[derive(Debug, Default, Clone)]
pub struct WatchInput {
    /// Secrets to watch; empty: every secret under `name_prefix`.
    pub names: Vec<String>,
    /// With no names: the prefix to watch ("" = everything the caller may read).
    pub name_prefix: String,
    /// What the client holds.
    pub held: Vec<HeldInput>,
    /// End after SYNCED.
    pub sync_only: bool,
}

/// What a client holds of one secret: versions and the states it believes they are in
/// (None: unknown).
#[derive(Debug, Default, Clone)]
pub struct HeldInput {
    /// Secret name (unparsed).
    pub name: String,
    /// (version, believed state).
    pub versions: Vec<(u64, Option<VersionState>)>,
}

/// What a watch event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// `version` is the PRIMARY now and the client did not hold it as such.
    Rotated,
    /// `version` moved to ACTIVE or INACTIVE (other than by expiry).
    StateChanged,
    /// `version` was revoked.
    Revoked,
    /// `version` expired.
    Expired,
    /// `version` was destroyed.
    Destroyed,
    /// A STATIC secret's scheduled rotation is due.
    RotationDue,
    /// The differences have all been sent; live changes follow.
    Synced,
}

/// One event for a watcher. Carries metadata only, never a value.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// What happened.
    pub kind: EventKind,
    /// Secret (empty for Synced).
    pub name: String,
    /// Version concerned (0 for RotationDue and Synced).
    pub version: u64,
    /// That version's state now.
    pub state: Option<VersionState>,
    /// Why.
    pub reason: String,
    /// When it took effect.
    pub time_ms: Millis,
    /// The secret now, as a watcher may see it (see [`watch_view`]).
    pub secret: Option<SecretRecord>,
}

/// What one stream has told its client about one secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Known {
    versions: BTreeMap<u64, Option<VersionState>>,
    due: Option<Millis>,
}

/// Which secrets a stream covers.
#[derive(Debug, Clone)]
pub(crate) enum Scope {
    Names(BTreeSet<String>),
    Prefix(String),
}

impl Scope {
    fn covers(&self, name: &str) -> bool {
        match self {
            Scope::Names(names) => names.contains(name),
            Scope::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

type Sender = mpsc::Sender<Result<WatchEvent>>;

impl WatchHub {
    /// Opens a watch: checks and audits the request (the record is durable before anything is
    /// sent), then streams events from a task of its own until the client goes away, the
    /// server shuts down, or (with `sync_only`) SYNCED has been sent.
    pub async fn watch(
        &self,
        vault: &Arc<Vault>,
        peer: &Peer,
        input: WatchInput,
    ) -> Result<mpsc::Receiver<Result<WatchEvent>>> {
        let mut rec = AuditRecord::new(peer, "WatchSecrets", vault.now());
        let opened = watch_open(vault, peer, &input, &mut rec).and_then(|(scope, known)| {
            let slot = self.slot(&peer.identity)?;
            Ok((scope, known, slot))
        });
        let (scope, known, slot) = vault.finish_read(rec, opened).await?;
        // Subscribe before the first snapshot is read, so no change falls in between.
        let changes = self.subscribe();
        let closed = self.closed();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let vault = vault.clone();
        let identity = peer.identity.clone();
        tokio::spawn(async move {
            run_watch(
                vault,
                closed,
                identity,
                scope,
                known,
                input.sync_only,
                changes,
                tx,
            )
            .await;
            drop(slot);
        });
        Ok(rx)
    }
}

fn watch_open(
    vault: &Vault,
    peer: &Peer,
    input: &WatchInput,
    rec: &mut AuditRecord,
) -> Result<(Scope, BTreeMap<String, Known>)> {
    if input.names.len() > MAX_WATCH_NAMES {
        return Err(Error::invalid(format!(
            "{} names; at most {MAX_WATCH_NAMES} per watch",
            input.names.len()
        )));
    }
    if input.held.len() > MAX_HELD_SECRETS {
        return Err(Error::invalid(format!(
            "{} held secrets; at most {MAX_HELD_SECRETS}",
            input.held.len()
        )));
    }
    let scope = if input.names.is_empty() {
        if input.name_prefix.len() > MAX_NAME_LEN {
            return Err(Error::invalid("name_prefix longer than 256 bytes"));
        }
        rec.targets = vec![(format!("{}*", input.name_prefix), 0)];
        if !vault.policy().grants_any(&peer.identity, Verb::Read) {
            return Err(Error::PermissionDenied {
                identity: peer.identity.to_string(),
                verb: Verb::Read.name(),
                target: format!("{}*", input.name_prefix),
            });
        }
        Scope::Prefix(input.name_prefix.clone())
    } else {
        if !input.name_prefix.is_empty() {
            return Err(Error::invalid("give names or name_prefix, not both"));
        }
        rec.targets = input.names.iter().map(|n| (n.clone(), 0)).collect();
        let mut names = BTreeSet::new();
        for n in &input.names {
            let name = SecretName::parse(n)?;
            vault.authorize(peer, Verb::Read, &name, None)?;
            // A name in an environment the caller may not read is watched like a missing
            // one: the stream shows it only if it ever becomes readable (see `send_diffs`),
            // so opening a watch tells nothing about what exists elsewhere.
            names.insert(name.to_string());
        }
        Scope::Names(names)
    };
    let mut known = BTreeMap::new();
    for h in &input.held {
        let name = SecretName::parse(&h.name)?;
        if h.versions.len() > MAX_HELD_VERSIONS {
            return Err(Error::invalid(format!(
                "{name}: {} held versions; at most {MAX_HELD_VERSIONS}",
                h.versions.len()
            )));
        }
        let mut k = Known::default();
        for &(v, state) in &h.versions {
            if v == 0 {
                return Err(Error::invalid(format!(
                    "{name}: held versions are numbered from 1"
                )));
            }
            k.versions.insert(v, state);
        }
        known.insert(name.to_string(), k);
    }
    Ok((scope, known))
}

#[allow(clippy::too_many_arguments)]
async fn run_watch(
    vault: Arc<Vault>,
    mut closed: watch::Receiver<bool>,
    identity: Arc<str>,
    scope: Scope,
    mut known: BTreeMap<String, Known>,
    sync_only: bool,
    mut changes: broadcast::Receiver<Arc<str>>,
    tx: Sender,
) {
    let initial = names_in(&vault, &scope).await;
    if send_diffs(&vault, &identity, initial, &mut known, &tx)
        .await
        .is_err()
    {
        return;
    }
    let synced = WatchEvent {
        kind: EventKind::Synced,
        name: String::new(),
        version: 0,
        state: None,
        reason: String::new(),
        time_ms: vault.now(),
        secret: None,
    };
    if tx.send(Ok(synced)).await.is_err() || sync_only {
        return;
    }
    loop {
        let names = tokio::select! {
            _ = async { let _ = closed.wait_for(|c| *c).await; } => {
                let _ = tx
                    .send(Err(Error::Unavailable(
                        "server shutting down; reconnect and resend what you hold".into(),
                    )))
                    .await;
                return;
            }
            _ = tx.closed() => return,
            msg = changes.recv() => match msg {
                Ok(name) if scope.covers(&name) => Ok(vec![name.to_string()]),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "watcher lagged; recomputing its differences");
                    names_in(&vault, &scope).await
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if send_diffs(&vault, &identity, names, &mut known, &tx)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Every name the scope covers now.
fn scope_names(vault: &Vault, scope: &Scope) -> Result<Vec<String>> {
    match scope {
        Scope::Names(names) => Ok(names.iter().cloned().collect()),
        Scope::Prefix(prefix) => {
            let mut out = Vec::new();
            let mut start = Vec::new();
            loop {
                let chunk = vault
                    .store()
                    .scan(Tree::Secrets, prefix.as_bytes(), &start, 256)?;
                let exhausted = chunk.len() < 256;
                for (key, _) in chunk {
                    out.push(String::from_utf8_lossy(&key).into_owned());
                    start = key;
                    start.push(0);
                }
                if exhausted {
                    return Ok(out);
                }
            }
        }
    }
}

/// Every name the scope covers now, read off the async workers.
async fn names_in(vault: &Arc<Vault>, scope: &Scope) -> Result<Vec<String>> {
    match scope {
        Scope::Names(names) => Ok(names.iter().cloned().collect()),
        Scope::Prefix(_) => {
            let (vault, scope) = (vault.clone(), scope.clone());
            tokio::task::spawn_blocking(move || scope_names(&vault, &scope))
                .await
                .unwrap_or_else(|e| Err(Error::Internal(format!("watch task: {e}"))))
        }
    }
}

/// Sends what differs for each of `names` from what the client was told, and remembers
/// what it sent. The records are read and compared off the async workers, `scan_budget`
/// names at a time, so a wide scope under a narrow grant (most names invisible to the
/// caller) never holds a worker. Err(()) when the stream is over (client gone, or an error
/// was sent).
async fn send_diffs(
    vault: &Arc<Vault>,
    identity: &Arc<str>,
    names: Result<Vec<String>>,
    known: &mut BTreeMap<String, Known>,
    tx: &Sender,
) -> std::result::Result<(), ()> {
    let names = match names {
        Ok(n) => n,
        Err(e) => return fail(tx, e).await,
    };
    let budget = vault.settings().scan_budget.max(1);
    let mut names = names.into_iter().peekable();
    while names.peek().is_some() {
        let batch: Vec<(String, Option<Known>)> = names
            .by_ref()
            .take(budget)
            .map(|n| {
                let held = known.get(&n).cloned();
                (n, held)
            })
            .collect();
        let (vault, id) = (vault.clone(), identity.clone());
        let step = tokio::task::spawn_blocking(move || diff_batch(&vault, &id, batch))
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("watch task: {e}"))));
        let seen = match step {
            Ok(s) => s,
            Err(e) => return fail(tx, e).await,
        };
        for (name, seen) in seen {
            match seen {
                Seen::Gone => {}
                Seen::Hidden => {
                    known.remove(&name);
                }
                Seen::Now(events, next) => {
                    for event in events {
                        tx.send(Ok(event)).await.map_err(|_| ())?;
                    }
                    known.insert(name, next);
                }
            }
        }
    }
    Ok(())
}

/// What each of `batch` (a name and what the client holds of it) looks like to
/// `identity` now (blocking: store reads).
fn diff_batch(
    vault: &Vault,
    identity: &str,
    batch: Vec<(String, Option<Known>)>,
) -> Result<Vec<(String, Seen)>> {
    let mut out = Vec::with_capacity(batch.len());
    for (name, held) in batch {
        let Some(raw) = vault.store().get(Tree::Secrets, name.as_bytes())? else {
            out.push((name, Seen::Gone));
            continue;
        };
        let mut secret: SecretRecord = decode("secret", &raw)?;
        if !vault.policy().allows(
            identity,
            Verb::Read,
            &secret.name,
            Some(&secret.environment),
        ) {
            out.push((name, Seen::Hidden));
            continue;
        }
        let now = vault.now();
        secret.settle(now);
        let (events, next) = diff(held.as_ref(), &secret, now);
        out.push((name, Seen::Now(events, next)));
    }
    Ok(out)
}
/// One secret as a watch step found it.
enum Seen {
    /// Not stored (any more): nothing to say.
    Gone,
    /// Not readable by the watcher: forget what it was told.
    Hidden,
    /// The events that bring the client up to date, and what it holds afterwards.
    Now(Vec<WatchEvent>, Known),
}

async fn fail(tx: &Sender, e: Error) -> std::result::Result<(), ()> {
    tracing::warn!(error = %e, "watch stream ended by an error");
    let _ = tx.send(Err(e)).await;
    Err(())
}

/// The events that bring a client holding `known` up to `secret` (settled at `now`), and
/// what it holds afterwards.
pub(crate) fn diff(
    known: Option<&Known>,
    secret: &SecretRecord,
    now: Millis,
) -> (Vec<WatchEvent>, Known) {
    let view = watch_view(secret);
    let mut events = Vec::new();
    for v in &secret.versions {
        let held = known.and_then(|k| k.versions.get(&v.version));
        let kind = match held {
            Some(Some(s)) if *s == v.state => continue,
            Some(_) => kind_of(v.state, v.life.reason.as_ref()),
            None if v.state == VersionState::Primary => EventKind::Rotated,
            None => continue,
        };
        events.push(WatchEvent {
            kind,
            name: secret.name.clone(),
            version: v.version,
            state: Some(v.state),
            reason: v
                .life
                .reason
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            time_ms: v.life.changed_ms.unwrap_or(v.create_ms),
            secret: Some(view.clone()),
        });
    }
    let due = secret.life.rotation_due_ms;
    if let Some(at) = due.filter(|_| secret.kind == Kind::Static) {
        if known.is_none_or(|k| k.due != due) {
            events.push(WatchEvent {
                kind: EventKind::RotationDue,
                name: secret.name.clone(),
                version: 0,
                state: None,
                reason: "scheduled rotation is due: supply a new value with RotateSecret".into(),
                time_ms: at.min(now),
                secret: Some(view.clone()),
            });
        }
    }
    let next = Known {
        versions: secret
            .versions
            .iter()
            .map(|v| (v.version, Some(v.state)))
            .collect(),
        due,
    };
    (events, next)
}

fn kind_of(state: VersionState, reason: Option<&StateReason>) -> EventKind {
    match state {
        VersionState::Primary => EventKind::Rotated,
        VersionState::Revoked => EventKind::Revoked,
        VersionState::Destroyed => EventKind::Destroyed,
        VersionState::Inactive if reason == Some(&StateReason::Expired) => EventKind::Expired,
        VersionState::Active | VersionState::Inactive => EventKind::StateChanged,
    }
}

/// A secret as a watcher sees it: versions and lifecycle, without owner, labels, description,
/// scopes or creator (watching needs only the read verb, which does not grant those).
pub fn watch_view(secret: &SecretRecord) -> SecretRecord {
    let mut s = secret.clone();
    s.owner.clear();
    s.labels.clear();
    s.description.clear();
    s.scopes.clear();
    s.created_by.clear();
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SecretLife, VersionLife, VersionMeta};
    use VersionState::*;

    fn secret(states: &[VersionState]) -> SecretRecord {
        let versions: Vec<VersionMeta> = states
            .iter()
            .enumerate()
            .map(|(i, &state)| VersionMeta {
                version: i as u64 + 1,
                state,
                create_ms: i as u64,
                grace_until_ms: (state == Active).then_some(1000),
                fingerprint: [0; 16],
                term: 1,
                key_id: None,
                life: VersionLife::default(),
            })
            .collect();
        SecretRecord {
            name: "svc/key".into(),
            kind: Kind::Static,
            environment: "dev".into(),
            owner: "team".into(),
            labels: Default::default(),
            description: "d".into(),
            scopes: Vec::new(),
            created_by: "admin".into(),
            create_ms: 0,
            update_ms: 0,
            primary: states
                .iter()
                .position(|s| *s == Primary)
                .map_or(0, |p| p as u64 + 1),
            versions,
            life: SecretLife::default(),
            key_policy: Default::default(),
        }
    }

    fn held(pairs: &[(u64, Option<VersionState>)]) -> Known {
        Known {
            versions: pairs.iter().copied().collect(),
            due: None,
        }
    }

    fn summary(events: &[WatchEvent]) -> Vec<(EventKind, u64)> {
        events.iter().map(|e| (e.kind, e.version)).collect()
    }

    #[test]
    fn nothing_held_learns_the_primary_only() {
        let s = secret(&[Inactive, Active, Primary]);
        let (events, next) = diff(None, &s, 10);
        assert_eq!(summary(&events), [(EventKind::Rotated, 3)]);
        assert_eq!(next.versions.len(), 3);
        let view = events[0].secret.as_ref().unwrap();
        assert!(view.owner.is_empty() && view.description.is_empty());
        // Told once: the same state again yields nothing.
        assert!(diff(Some(&next), &s, 11).0.is_empty());
    }

    #[test]
    fn reconnecting_client_gets_the_difference() {
        let mut s = secret(&[Revoked, Destroyed, Active, Primary]);
        s.versions[0].life.reason = Some(StateReason::Revoked {
            by: "admin".into(),
            reason: "leak".into(),
        });
        let known = held(&[(1, Some(Primary)), (2, Some(Active))]);
        let (events, _) = diff(Some(&known), &s, 10);
        assert_eq!(
            summary(&events),
            [
                (EventKind::Revoked, 1),
                (EventKind::Destroyed, 2),
                (EventKind::Rotated, 4)
            ]
        );
        assert_eq!(events[0].reason, "revoked by admin: leak");
        // A version held in an unknown state is always reported.
        let (events, _) = diff(Some(&held(&[(4, None)])), &s, 10);
        assert_eq!(summary(&events), [(EventKind::Rotated, 4)]);
    }

    #[test]
    fn expiry_grace_and_rotation_due() {
        let mut s = secret(&[Inactive, Inactive]);
        s.versions[1].life.reason = Some(StateReason::Expired);
        s.versions[0].life.reason = Some(StateReason::GraceEnded);
        let known = held(&[(1, Some(Active)), (2, Some(Primary))]);
        let (events, next) = diff(Some(&known), &s, 10);
        assert_eq!(
            summary(&events),
            [(EventKind::StateChanged, 1), (EventKind::Expired, 2)]
        );
        s.life.rotation_due_ms = Some(5);
        let (events, next) = diff(Some(&next), &s, 10);
        assert_eq!(summary(&events), [(EventKind::RotationDue, 0)]);
        assert!(diff(Some(&next), &s, 11).0.is_empty(), "told once");
        // API keys are rotated by Ward, never flagged.
        s.kind = Kind::ApiKey;
        assert!(diff(None, &s, 12).0.is_empty());
    }
}
