//! The durable outbox of webhook deliveries, and the task that empties it.
//!
//! An alert becomes one entry per endpoint that wants its type, in store tree `alert_outbox`
//! (MACed like secret records: a planted entry would be posted signed by Ward), made durable
//! before the writer moves on. The delivery task posts each due entry; a 2xx answer removes
//! it, anything else schedules the next attempt after an exponential backoff with full jitter
//! (`retry_initial` doubling up to `retry_max_interval`, each wait drawn between half and all of
//! it), written back to the store so that a restart resumes the schedule. An entry still
//! undelivered `retry_for` after its alert disables its endpoint: its entries are dropped, the
//! endpoint is marked disabled (durably; a successful TestWebhook enables it again) and a
//! `webhook.disabled` alert is recorded. The `webhook-id` is the alert's, on every attempt.
//!
//! Keys: `e/<webhook-id>/<endpoint>` entries, `d/<endpoint>` disabled endpoints, `cursor` the
//! alert writer's position in the audit log; `<endpoint>` is the first 16 hex digits of the
//! SHA-256 of its URL.

use super::webhook::{Attempt, Endpoint};
use super::{Alert, AlertType, Alerts};
use crate::clock::{Clock, Millis};
use crate::config::AlertsConfig;
use crate::error::{Error, Result};
use crate::metrics;
use crate::store::{decode, encode, Batch, Store, Tree};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Entries read per pass of the delivery task.
const PASS: usize = 1024;
/// Deliveries in flight at once.
const PARALLEL: usize = 8;
/// Longest sleep of an idle delivery task (it is woken when an entry arrives).
const IDLE: Duration = Duration::from_secs(60);
/// Key of the alert writer's cursor (per node when nodes share the store).
const CURSOR: &[u8] = crate::store::NODE_KEYS[2].1;
/// How often a replica that does not lead looks whether it leads now.
const FOLLOWER_POLL: Duration = Duration::from_secs(1);

/// One delivery waiting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// `webhook-id`.
    pub id: String,
    /// The endpoint's URL.
    pub url: String,
    /// Event type.
    pub kind: String,
    /// The JSON body, exactly as signed on every attempt.
    pub body: String,
    /// When the alert was raised.
    pub created_ms: Millis,
    /// Attempts made.
    pub attempts: u32,
    /// Not before this.
    pub next_ms: Millis,
}

/// Retry settings.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// First wait.
    pub initial: Duration,
    /// Longest wait.
    pub max_interval: Duration,
    /// Give up (and disable the endpoint) after this long.
    pub retry_for: Duration,
    /// One attempt's timeout.
    pub timeout: Duration,
}

impl Retry {
    /// From the `[alerts]` section.
    pub fn from_config(c: &AlertsConfig) -> Self {
        Self {
            initial: c.retry_initial,
            max_interval: c.retry_max_interval,
            retry_for: c.retry_for,
            timeout: c.delivery_timeout,
        }
    }

    /// The wait after `attempts` failed attempts: full jitter over the doubled interval.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(30))
            .min(self.max_interval);
        let ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).max(2);
        Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
    }
}

/// The outbox and its endpoints.
pub struct Outbox {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    endpoints: Vec<Arc<Endpoint>>,
    retry: Retry,
    disabled: Mutex<HashSet<String>>,
    wake: Notify,
    alerts: OnceLock<Arc<Alerts>>,
    /// Key of the alert writer's cursor.
    cursor_key: Vec<u8>,
}

fn earliest(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn endpoint_key(url: &str) -> String {
    hex::encode(&Sha256::digest(url.as_bytes())[..8])
}

fn entry_key(id: &str, url: &str) -> Vec<u8> {
    format!("e/{id}/{}", endpoint_key(url)).into_bytes()
}

fn disabled_key(url: &str) -> Vec<u8> {
    format!("d/{}", endpoint_key(url)).into_bytes()
}

impl Outbox {
    /// The outbox over `store` for the configured endpoints (their secrets are read here).
    pub fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        cfg: &AlertsConfig,
    ) -> std::result::Result<Self, String> {
        let endpoints = cfg
            .webhooks
            .iter()
            .map(|w| Endpoint::from_config(w).map(Arc::new))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut disabled = HashSet::new();
        for e in &endpoints {
            if store
                .get(Tree::Outbox, &disabled_key(&e.url))
                .map_err(|e| e.to_string())?
                .is_some()
            {
                tracing::warn!(endpoint = %e.host(), "webhook endpoint is disabled (it failed for longer than retry_for); TestWebhook enables it again");
                disabled.insert(e.url.clone());
            }
        }
        Ok(Self {
            store,
            clock,
            endpoints,
            retry: Retry::from_config(cfg),
            disabled: Mutex::new(disabled),
            wake: Notify::new(),
            alerts: OnceLock::new(),
            cursor_key: CURSOR.to_vec(),
        })
    }

    /// For a node sharing the store with others: its alert writer keeps its own cursor (a
    /// position in its own audit log).
    pub fn for_node(mut self, node: Option<&str>) -> Self {
        self.cursor_key = crate::store::node_key(CURSOR, node);
        self
    }

    /// Where `webhook.disabled` alerts go (set once at start-up).
    pub fn set_alerts(&self, alerts: Arc<Alerts>) {
        let _ = self.alerts.set(alerts);
    }

    fn is_disabled(&self, url: &str) -> bool {
        self.disabled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(url)
    }

    /// Durably queues an alert's body for every endpoint that wants `kind`, and moves the
    /// writer's cursor to `cursor` if given.
    pub async fn enqueue(
        &self,
        id: &str,
        kind: &str,
        body: &str,
        created_ms: Millis,
        cursor: Option<u64>,
    ) -> Result<()> {
        let mut b = Batch::new();
        for e in &self.endpoints {
            if e.wants(kind) && !self.is_disabled(&e.url) {
                let entry = Entry {
                    id: id.to_owned(),
                    url: e.url.clone(),
                    kind: kind.to_owned(),
                    body: body.to_owned(),
                    created_ms,
                    attempts: 0,
                    next_ms: 0,
                };
                b.put(Tree::Outbox, entry_key(id, &e.url), encode(&entry));
            }
        }
        if let Some(c) = cursor {
            if self.cursor()?.is_none_or(|now| c > now) {
                b.put(
                    Tree::Outbox,
                    self.cursor_key.clone(),
                    c.to_be_bytes().to_vec(),
                );
            }
        }
        if b.is_empty() {
            return Ok(());
        }
        self.store.commit(b)?;
        self.store.sync().await?;
        self.wake.notify_one();
        Ok(())
    }

    /// The alert writer's cursor (None: never set).
    pub fn cursor(&self) -> Result<Option<u64>> {
        Ok(self
            .store
            .get(Tree::Outbox, &self.cursor_key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes))
    }

    /// Durably sets the cursor.
    pub async fn set_cursor(&self, seq: u64) -> Result<()> {
        let mut b = Batch::new();
        b.put(
            Tree::Outbox,
            self.cursor_key.clone(),
            seq.to_be_bytes().to_vec(),
        );
        self.store.commit(b)?;
        self.store.sync().await?;
        Ok(())
    }

    /// Whether any delivery of webhook-id `id` is waiting.
    pub fn knows(&self, id: &str) -> Result<bool> {
        let prefix = format!("e/{id}/");
        Ok(!self
            .store
            .scan(Tree::Outbox, prefix.as_bytes(), b"", 1)?
            .is_empty())
    }

    /// Deliveries waiting.
    pub fn pending(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for (k, v) in self.store.scan_each(Tree::Outbox, b"e/", b"", usize::MAX)? {
            match v
                .map_err(Error::from)
                .and_then(|v| decode::<Entry>("outbox entry", &v))
            {
                Ok(e) => out.push(e),
                Err(e) => {
                    tracing::error!(error = %e, key = %String::from_utf8_lossy(&k), "outbox entry unreadable; skipped");
                }
            }
        }
        Ok(out)
    }

    /// Delivers until `closed` is notified.
    pub async fn run(self: Arc<Self>, closed: Arc<Notify>) {
        loop {
            // Deliveries are a cluster job: with replicas, only the leader sends.
            let sleep = if !self.store.leads() {
                Ok(FOLLOWER_POLL)
            } else {
                self.pass().await
            };
            let sleep = match sleep {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "webhook delivery pass failed");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
                _ = closed.notified() => return,
            }
        }
    }

    /// Attempts every due entry once; returns how long to sleep until the next is due.
    async fn pass(self: &Arc<Self>) -> Result<Duration> {
        let this = self.clone();
        let entries = tokio::task::spawn_blocking(move || this.pending())
            .await
            .map_err(|e| Error::Internal(format!("outbox task: {e}")))??;
        let mut left = entries.len() as u64;
        metrics::global().set_webhooks_pending(left);
        let now = self.clock.now_ms();
        let mut next_due: Option<Millis> = None;
        let mut running = JoinSet::new();
        for entry in entries.into_iter().take(PASS) {
            if entry.next_ms > now {
                next_due = earliest(next_due, Some(entry.next_ms));
                continue;
            }
            let Some(endpoint) = self.endpoints.iter().find(|e| e.url == entry.url).cloned() else {
                // The endpoint left the configuration: its deliveries go with it.
                tracing::warn!(id = %entry.id, "webhook endpoint no longer configured; delivery dropped");
                self.remove(&entry)?;
                left = left.saturating_sub(1);
                continue;
            };
            if self.is_disabled(&entry.url) {
                self.remove(&entry)?;
                left = left.saturating_sub(1);
                continue;
            }
            while running.len() >= PARALLEL {
                if let Some(r) = running.join_next().await {
                    let again = self.settle(r)?;
                    left = left.saturating_sub(u64::from(again.is_none()));
                    next_due = earliest(next_due, again);
                }
            }
            let this = self.clone();
            running.spawn(async move {
                let started = std::time::Instant::now();
                let ts = this.clock.now_ms() / 1000;
                let attempt = endpoint
                    .send(&entry.id, &entry.body, ts, this.retry.timeout)
                    .await;
                metrics::global().observe_webhook(started.elapsed());
                (entry, endpoint, attempt)
            });
        }
        while let Some(r) = running.join_next().await {
            let again = self.settle(r)?;
            left = left.saturating_sub(u64::from(again.is_none()));
            next_due = earliest(next_due, again);
        }
        // A disabled endpoint's other entries went too; the next pass counts exactly.
        metrics::global().set_webhooks_pending(left);
        let now = self.clock.now_ms();
        Ok(next_due.map_or(IDLE, |n| {
            Duration::from_millis(n.saturating_sub(now)).min(IDLE)
        }))
    }

    /// Records how an attempt went; returns when the entry is due again, if it stays.
    fn settle(
        &self,
        joined: std::result::Result<(Entry, Arc<Endpoint>, Attempt), tokio::task::JoinError>,
    ) -> Result<Option<Millis>> {
        let (mut entry, endpoint, attempt) =
            joined.map_err(|e| Error::Internal(format!("delivery task: {e}")))?;
        let m = metrics::global();
        let why = match attempt {
            Attempt::Delivered(status) => {
                m.count_webhook("delivered");
                tracing::info!(id = %entry.id, endpoint = %endpoint.host(), status, attempts = entry.attempts + 1, "webhook delivered");
                return self.remove(&entry).map(|()| None);
            }
            Attempt::Refused(status) => format!("HTTP {status}"),
            Attempt::Failed(e) => e,
        };
        m.count_webhook("failed");
        let now = self.clock.now_ms();
        entry.attempts = entry.attempts.saturating_add(1);
        let age = Duration::from_millis(now.saturating_sub(entry.created_ms));
        if self.is_disabled(&endpoint.url) {
            // Another of its deliveries gave up first, in this pass: one disabling, one alert.
            return self.remove(&entry).map(|()| None);
        }
        if age >= self.retry.retry_for {
            m.count_webhook("given_up");
            tracing::error!(endpoint = %endpoint.host(), id = %entry.id, why, "webhook endpoint failed for longer than retry_for: disabled");
            return self.disable(&endpoint, &why).map(|()| None);
        }
        let wait = self.retry.backoff(entry.attempts);
        entry.next_ms = now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        tracing::warn!(id = %entry.id, endpoint = %endpoint.host(), why, attempts = entry.attempts, retry_in_ms = wait.as_millis() as u64, "webhook delivery failed; will retry");
        let mut b = Batch::new();
        b.put(
            Tree::Outbox,
            entry_key(&entry.id, &entry.url),
            encode(&entry),
        );
        // Not synced: a schedule lost in a crash only means an earlier retry.
        self.store.commit(b)?;
        Ok(Some(entry.next_ms))
    }

    fn remove(&self, entry: &Entry) -> Result<()> {
        let mut b = Batch::new();
        b.remove(Tree::Outbox, entry_key(&entry.id, &entry.url));
        // Not synced: a removal lost in a crash only means one more delivery of that id.
        self.store.commit(b)?;
        Ok(())
    }

    fn disable(&self, endpoint: &Endpoint, why: &str) -> Result<()> {
        self.disabled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(endpoint.url.clone());
        let mut b = Batch::new();
        b.put(Tree::Outbox, disabled_key(&endpoint.url), Vec::new());
        for e in self.pending()? {
            if e.url == endpoint.url {
                b.remove(Tree::Outbox, entry_key(&e.id, &e.url));
            }
        }
        self.store.commit(b)?;
        if let Some(alerts) = self.alerts.get() {
            let mut details = Map::new();
            details.insert("endpoint".into(), json!(endpoint.host()));
            details.insert("last_error".into(), json!(why));
            details.insert(
                "retry_for_seconds".into(),
                json!(self.retry.retry_for.as_secs()),
            );
            alerts.raise(Alert {
                kind: AlertType::WebhookDisabled,
                name: String::new(),
                version: 0,
                key_id: String::new(),
                environment: String::new(),
                details,
                time_ms: self.clock.now_ms(),
            });
        }
        Ok(())
    }

    /// The endpoint configured with `url`.
    pub fn endpoint(&self, url: &str) -> Result<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.url == url).ok_or_else(|| {
            Error::NotFound(format!(
                "no [[alerts.webhooks]] endpoint with url {}",
                crate::model::excerpt(url)
            ))
        })
    }

    /// Sends a signed `ward.test` event to the endpoint configured with `url`, now; a success
    /// enables it again if it was disabled. Returns the id sent and how it went.
    pub async fn test(&self, url: &str) -> Result<(String, Attempt)> {
        let endpoint = self.endpoint(url)?;
        let id = super::new_id();
        let now = self.clock.now_ms();
        let body = super::body(
            "ward.test",
            now,
            &json!({"details": {"message": "a test event sent by TestWebhook"}}),
        );
        let attempt = endpoint
            .send(&id, &body, now / 1000, self.retry.timeout)
            .await;
        if matches!(attempt, Attempt::Delivered(_)) && self.is_disabled(url) {
            let mut b = Batch::new();
            b.remove(Tree::Outbox, disabled_key(url));
            self.store.commit(b)?;
            self.store.sync().await?;
            self.disabled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(url);
            tracing::info!(endpoint = %endpoint.host(), "webhook endpoint enabled again");
        }
        Ok((id, attempt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let r = Retry {
            initial: Duration::from_secs(1),
            max_interval: Duration::from_secs(60),
            retry_for: Duration::from_secs(3600),
            timeout: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let w = r.backoff(1).as_millis();
            assert!((500..=1000).contains(&w), "{w}");
            let w = r.backoff(4).as_millis();
            assert!((4000..=8000).contains(&w), "{w}");
            let w = r.backoff(40).as_millis();
            assert!((30_000..=60_000).contains(&w), "{w}");
        }
    }
}
