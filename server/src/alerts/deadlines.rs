//! Deadline signals, judged by a periodic pass over every secret (off the request path):
//! `secret.expiring` (a PRIMARY or ACTIVE version expires within each `expiring_within`),
//! `secret.rotation_due` (a STATIC secret's scheduled rotation came due) and `key.stale` (an API
//! key unused for `stale_after`, by the usage counters).
//!
//! Each signal has a moment at which it becomes true (expiry − threshold, the rotation time,
//! last use + `stale_after`; never before the version or secret existed). A pass raises what
//! became true since the previous pass, whose time is stored (`deadlines` in the outbox tree,
//! one write per pass), so each fires once across restarts; the first pass ever raises what is
//! already true.

use super::{Alert, AlertType, Alerts};
use crate::clock::{rfc3339, Millis};
use crate::config::AlertsConfig;
use crate::error::{Error, Result};
use crate::model::{Kind, SecretRecord, VersionState};
use crate::store::{decode, Batch, Tree};
use crate::vault::Vault;
use serde_json::{json, Map};
use std::sync::Arc;
use std::time::Duration;

/// Key of the last pass's time in the outbox tree.
const LAST_PASS: &[u8] = b"deadlines";
/// Secrets read per store scan.
const CHUNK: usize = 256;

/// The deadline pass's settings.
#[derive(Debug, Clone)]
pub struct DeadlineSettings {
    /// `secret.expiring` thresholds.
    pub expiring_within: Vec<Duration>,
    /// `key.stale` threshold.
    pub stale_after: Duration,
    /// How often a pass runs.
    pub interval: Duration,
}

impl DeadlineSettings {
    /// From `[alerts]`.
    pub fn from_config(c: &AlertsConfig) -> Self {
        Self {
            expiring_within: c.expiring_within.clone(),
            stale_after: c.stale_after,
            interval: c.deadline_interval,
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs a pass every `interval` until `closed` is notified.
pub async fn run(
    vault: Arc<Vault>,
    alerts: Arc<Alerts>,
    settings: DeadlineSettings,
    closed: Arc<tokio::sync::Notify>,
) {
    loop {
        let (v, a, s) = (vault.clone(), alerts.clone(), settings.clone());
        let pass = tokio::task::spawn_blocking(move || pass(&v, &a, &s))
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("deadline pass: {e}"))));
        match pass {
            Ok(raised) if raised > 0 => tracing::info!(raised, "deadline alerts raised"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "deadline pass failed; retrying at the next"),
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = closed.notified() => return,
        }
    }
}

/// One pass (blocking): raises what became true since the last, stores this pass's time.
/// Returns how many alerts it raised.
pub fn pass(vault: &Vault, alerts: &Alerts, s: &DeadlineSettings) -> Result<usize> {
    let store = vault.store();
    // A cluster job: with replicas, only the leader judges deadlines (and its pass record is
    // fenced by its leadership).
    if !store.leads() {
        return Ok(0);
    }
    let now = vault.now();
    let since = store
        .get(Tree::Outbox, LAST_PASS)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes);
    let mut raised = 0;
    let mut start = Vec::new();
    loop {
        let chunk = store.scan_each(Tree::Secrets, b"", &start, CHUNK)?;
        let exhausted = chunk.len() < CHUNK;
        for (key, raw) in chunk {
            start = key;
            start.push(0);
            let secret = raw
                .map_err(Error::from)
                .and_then(|raw| decode::<SecretRecord>("secret", &raw));
            match secret {
                Ok(secret) => {
                    for a in judge(vault, &secret, since, now, s) {
                        alerts.raise(a);
                        raised += 1;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "deadline pass: secret not readable"),
            }
        }
        if exhausted {
            break;
        }
    }
    let mut b = Batch::new();
    b.put(Tree::Outbox, LAST_PASS, now.to_be_bytes().to_vec());
    b.require_leadership();
    store.commit(b)?;
    Ok(raised)
}

/// The alerts of one secret that became true in `(since, now]`.
fn judge(
    vault: &Vault,
    secret: &SecretRecord,
    since: Millis,
    now: Millis,
    s: &DeadlineSettings,
) -> Vec<Alert> {
    let crossed = |at: Millis| at > since && at <= now;
    let alert = |kind, version: u64, key_id: &str, details| Alert {
        kind,
        name: secret.name.clone(),
        version,
        key_id: key_id.to_owned(),
        environment: secret.environment.clone(),
        details,
        time_ms: now,
    };
    let mut out = Vec::new();
    for v in &secret.versions {
        if !matches!(
            v.state_at(now),
            VersionState::Primary | VersionState::Active
        ) {
            continue;
        }
        let Some(expiry) = secret.expiry_of(v).filter(|&at| at > now) else {
            continue;
        };
        for within in &s.expiring_within {
            let at = expiry.saturating_sub(ms(*within)).max(v.create_ms);
            if crossed(at) {
                let mut d = Map::new();
                d.insert("expires_at".into(), json!(rfc3339(expiry)));
                d.insert("within_seconds".into(), json!(within.as_secs()));
                let key_id = v.key_id.as_deref().unwrap_or_default();
                out.push(alert(AlertType::SecretExpiring, v.version, key_id, d));
            }
        }
    }
    if secret.kind == Kind::Static {
        if let Some(due) = secret.life.next_rotation_ms.filter(|&at| crossed(at)) {
            let mut d = Map::new();
            d.insert("due_at".into(), json!(rfc3339(due)));
            out.push(alert(AlertType::RotationDue, 0, "", d));
        }
    }
    if secret.kind == Kind::ApiKey && secret.check_accepts_versions(now).is_ok() {
        let primary = secret
            .versions
            .iter()
            .find(|v| v.state_at(now) == VersionState::Primary);
        if let Some(p) = primary {
            let last = vault.usage().last_used(&secret.name);
            let at = last.unwrap_or(secret.create_ms);
            if crossed(at.saturating_add(ms(s.stale_after))) {
                let mut d = Map::new();
                d.insert(
                    "last_used".into(),
                    last.map_or(serde_json::Value::Null, |t| json!(rfc3339(t))),
                );
                d.insert("unused_seconds".into(), json!(s.stale_after.as_secs()));
                let key_id = p.key_id.as_deref().unwrap_or_default();
                out.push(alert(AlertType::Stale, p.version, key_id, d));
            }
        }
    }
    out
}
