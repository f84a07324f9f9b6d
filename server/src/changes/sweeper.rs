//! The background sweeper. Every interval it reads the vault's [`Clock`](crate::clock::Clock)
//! and, for each secret:
//!
//! - stores the states deadlines imply (ACTIVE past its grace, versions past their expiry), so
//!   Describe, List and watchers tell the truth — fetch already enforces them at read time;
//! - rotates API keys whose scheduled rotation is due (new key, the secret's grace period for
//!   the old one);
//! - flags STATIC secrets whose rotation is due (ROTATION_DUE for watchers), once.
//!
//! Each change is its own guarded batch with an audit record (identity `ward/scheduler`);
//! a batch that loses a race with a caller is simply retried at the next pass. One durable
//! sync covers the whole pass, then watchers are told.
//!
//! A pass does not read every secret: a [`SweepIndex`] keeps each secret's next deadline (the
//! earliest time at which a pass could have work for it, [`next_deadline`]) and a pass reads
//! only the secrets whose deadline has come. The index is built by one full scan at the first
//! pass, kept current by the write path (the index is a `ChangeSink`: every commit that writes
//! a secret record, in `Vault::commit_with_audit`, marks the name dirty; the next pass re-reads
//! it), and
//! rebuilt by a full scan every [`FULL_SCAN_EVERY`] as a backstop. Before, every pass decoded
//! every secret: at a million secrets that was seconds of CPU every 5 s, and it pulled the
//! whole store through the page cache (BENCHMARKS.md).

use crate::audit::AuditRecord;
use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::identity::Peer;
use crate::model::{Kind, SecretRecord, VersionState};
use crate::store::{decode, Tree};
use crate::vault::{rewrite, ChangeSink, NewValue, Vault};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use ward::keyformat::ApiKey;

/// The identity audit records of the sweeper's changes carry.
pub const SCHEDULER_IDENTITY: &str = "ward/scheduler";

/// Runs sweeps every `interval` until `closed` turns true (the watch hub's, at shutdown).
pub async fn run(
    vault: Arc<Vault>,
    index: Arc<SweepIndex>,
    mut closed: tokio::sync::watch::Receiver<bool>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { let _ = closed.wait_for(|c| *c).await; } => return,
        }
        // A cluster job: with replicas, only the leader sweeps (its writes are fenced).
        if !vault.store().leads() {
            continue;
        }
        if let Err(e) = index.sweep(&vault).await {
            tracing::warn!(error = %e, "sweep failed; retrying at the next pass");
        }
    }
}

/// How often a pass re-reads every secret anyway, in case a record changed without passing
/// through the write path's hook (none is known to; this bounds the damage if one ever does).
pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(600);

/// The earliest time at which a sweep could have work for `secret`, judged at `now`; `None`
/// if no deadline is pending. Mirrors [`Vault::sweep_one`]'s decisions: a PRIMARY or ACTIVE
/// version's expiry and an ACTIVE version's grace end (the moments [`SecretRecord::settle`]
/// changes something), and a scheduled rotation the secret can still take.
pub fn next_deadline(secret: &SecretRecord, now: Millis) -> Option<Millis> {
    let versions = secret
        .versions
        .iter()
        .filter(|v| matches!(v.state, VersionState::Primary | VersionState::Active))
        .flat_map(|v| {
            let grace = (v.state == VersionState::Active)
                .then_some(v.grace_until_ms)
                .flatten();
            [secret.expiry_of(v), grace]
        })
        .flatten();
    let rotation = secret.life.next_rotation_ms.filter(|_| {
        let flagged = secret.kind == Kind::Static && secret.life.rotation_due_ms.is_some();
        // Revoked and expired secrets take no new version, now or later.
        !flagged && secret.check_accepts_versions(now).is_ok()
    });
    versions.chain(rotation).min()
}

/// Each secret's next deadline, and the names written since the last pass.
#[derive(Default)]
pub struct SweepIndex {
    /// Names written since the last pass took them (by the write path).
    dirty: Mutex<HashSet<Vec<u8>>>,
    /// Deadlines, read and written by the pass only.
    due: Mutex<Deadlines>,
}

#[derive(Default)]
struct Deadlines {
    /// (deadline, name), in deadline order.
    queue: BTreeSet<(Millis, Vec<u8>)>,
    /// name → its entry in `queue`.
    by_name: HashMap<Vec<u8>, Millis>,
    /// When the last full scan began (None: never).
    scanned: Option<Instant>,
}

impl Deadlines {
    fn set(&mut self, name: &[u8], deadline: Option<Millis>) {
        if let Some(old) = self.by_name.remove(name) {
            self.queue.remove(&(old, name.to_vec()));
        }
        if let Some(at) = deadline {
            self.by_name.insert(name.to_vec(), at);
            self.queue.insert((at, name.to_vec()));
        }
    }
}

impl SweepIndex {
    fn take_dirty(&self) -> HashSet<Vec<u8>> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Secrets tracked (with a pending deadline).
    pub fn len(&self) -> usize {
        self.due
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_name
            .len()
    }

    /// Whether no secret has a pending deadline.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ChangeSink for SweepIndex {
    /// Every commit that writes a secret record marks its name dirty: the next pass re-reads
    /// it.
    fn committed(&self, name: &[u8]) {
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_vec());
    }
}

/// What one secret needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Deadline-driven state changes only.
    Settle,
    /// An API key's scheduled rotation.
    Rotate,
    /// A STATIC secret's rotation became due.
    FlagDue,
}

impl SweepIndex {
    /// One pass: every secret whose deadline has come. Returns the names it changed (watchers
    /// have been told).
    pub async fn sweep(&self, vault: &Vault) -> Result<Vec<String>> {
        let now = vault.now();
        // Taken before reading: a write that lands during this pass is re-read by the next.
        let dirty = self.take_dirty();
        let full = self
            .due
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .scanned
            .is_none_or(|at| at.elapsed() >= FULL_SCAN_EVERY);
        if full {
            self.index_every_secret(vault, now)?;
        } else {
            for name in dirty {
                let deadline = match vault.store().get(Tree::Secrets, &name)? {
                    Some(raw) => next_deadline(&decode("secret", &raw)?, now),
                    None => None,
                };
                self.deadlines().set(&name, deadline);
            }
        }
        let due: Vec<Vec<u8>> = {
            let d = self.deadlines();
            d.queue
                .iter()
                .take_while(|(at, _)| *at <= now)
                .map(|(_, name)| name.clone())
                .collect()
        };
        let mut changed = Vec::new();
        for name in due {
            let Some(raw) = vault.store().get(Tree::Secrets, &name)? else {
                self.deadlines().set(&name, None);
                continue;
            };
            match self.sweep_one(vault, raw).await {
                // Committed, so marked dirty: the next pass re-reads it.
                Ok(Some(name)) => changed.push(name),
                // Nothing to do, or a caller changed it first (dirty too): keep the entry.
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "sweep of one secret failed"),
            }
        }
        if !changed.is_empty() {
            vault.store().sync().await?;
            for name in &changed {
                vault.announce(name);
            }
        }
        Ok(changed)
    }

    fn deadlines(&self) -> std::sync::MutexGuard<'_, Deadlines> {
        self.due.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Rebuilds the deadline index from every stored secret.
    fn index_every_secret(&self, vault: &Vault, now: Millis) -> Result<()> {
        let began = Instant::now();
        let mut fresh = Deadlines::default();
        let mut start = Vec::new();
        loop {
            // One record failing its integrity check must not stop the sweeper for the rest.
            let chunk = vault.store().scan_each(Tree::Secrets, b"", &start, 256)?;
            let exhausted = chunk.len() < 256;
            for (key, raw) in chunk {
                let secret = raw
                    .map_err(crate::error::Error::from)
                    .and_then(|raw| decode::<SecretRecord>("secret", &raw));
                match secret {
                    Ok(secret) => fresh.set(&key, next_deadline(&secret, now)),
                    Err(e) => tracing::warn!(error = %e, "sweep index: secret not readable"),
                }
                start = key;
                start.push(0);
            }
            if exhausted {
                break;
            }
        }
        fresh.scanned = Some(began);
        tracing::debug!(
            pending = fresh.by_name.len(),
            took_ms = began.elapsed().as_millis() as u64,
            "sweep index rebuilt"
        );
        *self.deadlines() = fresh;
        Ok(())
    }

    async fn sweep_one(&self, vault: &Vault, raw: Vec<u8>) -> Result<Option<String>> {
        let mut secret: SecretRecord = decode("secret", &raw)?;
        let now = vault.now();
        let settled = secret.settle(now);
        let due = secret.life.next_rotation_ms.is_some_and(|at| now >= at)
            && secret.check_accepts_versions(now).is_ok();
        let work = match (due, secret.kind) {
            (true, Kind::ApiKey) => Work::Rotate,
            (true, Kind::Static) if secret.life.rotation_due_ms.is_none() => Work::FlagDue,
            _ if settled => Work::Settle,
            _ => return Ok(None),
        };
        let peer = Peer {
            identity: Arc::from(SCHEDULER_IDENTITY),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let method = match work {
            Work::Settle => "Sweep",
            Work::Rotate => "ScheduledRotation",
            Work::FlagDue => "RotationDue",
        };
        let mut rec = AuditRecord::new(&peer, method, now);
        rec.peer = "internal".into();
        rec.targets = vec![(secret.name.clone(), 0)];
        let mut batch = match work {
            Work::Rotate => {
                let key = ApiKey::generate(&vault.settings().issuer, &secret.environment)
                    .map_err(|e| Error::Internal(format!("key generation: {e}")))?;
                let grace = vault.default_grace(&secret);
                let (batch, rotated) = vault.stage_version(
                    &mut secret,
                    Some(raw),
                    NewValue::Key(key),
                    grace,
                    None,
                    now,
                )?;
                rec.targets = vec![(secret.name.clone(), rotated.written.version)];
                rec.key_id = rotated.key_id.unwrap_or_default();
                tracing::info!(name = %secret.name, version = rotated.written.version, "scheduled rotation");
                batch
            }
            Work::FlagDue | Work::Settle => {
                if work == Work::FlagDue {
                    secret.life.rotation_due_ms = secret.life.next_rotation_ms;
                    tracing::info!(name = %secret.name, "scheduled rotation due");
                }
                rewrite(&secret, raw)
            }
        };
        batch.require_leadership();
        match vault.commit_with_audit(batch, &mut rec).await {
            Ok(()) => Ok(Some(secret.name)),
            // A caller changed it first; the next pass looks again.
            Err(Error::Conflict(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
