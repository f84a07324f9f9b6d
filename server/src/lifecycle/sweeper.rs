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

use crate::audit::AuditRecord;
use crate::error::{Error, Result};
use crate::lifecycle::ops::NewValue;
use crate::model::{Kind, SecretRecord};
use crate::store::{decode, encode, Batch, Tree};
use crate::tls::Peer;
use crate::vault::Vault;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use ward::keyformat::ApiKey;

/// The identity audit records of the sweeper's changes carry.
pub const SCHEDULER_IDENTITY: &str = "ward/scheduler";

/// Runs sweeps every `interval` until the vault's watch hub is closed (shutdown).
pub async fn run(vault: Arc<Vault>, interval: Duration) {
    let mut closed = vault.watch_hub().closed();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { let _ = closed.wait_for(|c| *c).await; } => return,
        }
        if let Err(e) = vault.sweep().await {
            tracing::warn!(error = %e, "sweep failed; retrying at the next pass");
        }
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

impl Vault {
    /// One pass over every secret. Returns the names it changed (watchers have been told).
    pub async fn sweep(&self) -> Result<Vec<String>> {
        let mut changed = Vec::new();
        let mut start = Vec::new();
        loop {
            let chunk = self.store.scan(Tree::Secrets, b"", &start, 256)?;
            let exhausted = chunk.len() < 256;
            for (key, raw) in chunk {
                start = key;
                start.push(0);
                match self.sweep_one(raw) {
                    Ok(Some(name)) => changed.push(name),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "sweep of one secret failed"),
                }
            }
            if exhausted {
                break;
            }
        }
        if !changed.is_empty() {
            self.store.sync().await?;
            for name in &changed {
                self.watch.publish(name);
            }
        }
        Ok(changed)
    }

    fn sweep_one(&self, raw: Vec<u8>) -> Result<Option<String>> {
        let mut secret: SecretRecord = decode("secret", &raw)?;
        let now = self.now();
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
        let batch = match work {
            Work::Rotate => {
                let key = ApiKey::generate(&self.settings.issuer, &secret.environment)
                    .map_err(|e| Error::Internal(format!("key generation: {e}")))?;
                let grace = self.default_grace(&secret);
                let (batch, rotated) =
                    self.stage_rotation(&mut secret, raw, NewValue::Key(key), grace, None, now)?;
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
                let mut batch = Batch::new();
                batch.guard(Tree::Secrets, secret.name.as_bytes(), Some(raw));
                batch.put(Tree::Secrets, secret.name.as_bytes(), encode(&secret));
                batch
            }
        };
        match self.commit_with_audit(batch, &mut rec) {
            Ok(()) => Ok(Some(secret.name)),
            // A caller changed it first; the next pass looks again.
            Err(Error::Conflict(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
