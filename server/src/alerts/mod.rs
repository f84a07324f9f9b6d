//! Alerts: abuse signals noticed on the verification path, and their delivery.
//!
//! A signal is computed in memory where the event happens ([`signals::Signals`], bounded
//! state, no I/O) and *raised* into a bounded queue: the request never waits on alerting, and a
//! full queue drops the alert and counts it rather than slowing the vault down. One writer
//! task takes alerts off the queue and, off the request path, writes each as an audit record
//! (kind ALERT, in the hash chain; WatchAlerts streams them) and then as one outbox entry per
//! webhook that wants its type ([`outbox`]), which a delivery task sends, signed
//! ([`webhook`]), until the endpoint accepts it.
//!
//! The `webhook-id` of an alert is chosen when the writer takes it, and written into its audit
//! record, its outbox entries and every delivery attempt. If the process dies between the
//! audit record and the outbox entries, the writer finds the alert records past its durable
//! cursor at the next start and enqueues them then (at least once; an endpoint may see an id
//! twice, never a different id for one alert).

pub mod deadlines;
pub mod outbox;
pub mod signals;
pub mod webhook;

use crate::audit::{
    AlertEvent, AuditAccess, AuditLog, AuditRecord, Event, StreamItem, StreamQuery, ALERT_METHOD,
};
use crate::clock::{rfc3339, Clock, Millis};
use crate::config::alerts::{check_pattern, pattern_matches};
use crate::error::{Error, Result};
use crate::identity::Peer;
use crate::metrics;
use crate::policy::{Policy, Verb};
use outbox::Outbox;
use rand::{rngs::OsRng, RngCore};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What an alert is about (its `type` on the wire and in webhooks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum AlertType {
    /// A key used from a network not seen during its learning period.
    NewNetwork,
    /// A key's verifications far above its moving baseline.
    Spike,
    /// A REVOKED, DESTROYED or EXPIRED key presented.
    UsedAfterRevoke,
    /// An old version presented after its rotation window closed.
    UsedAfterGrace,
    /// Repeated INSUFFICIENT_SCOPE for one key.
    ScopeProbe,
    /// Quota balance at or below the low-water mark.
    QuotaLow,
    /// Quota balance at zero.
    QuotaExhausted,
    /// A key was reported leaked.
    LeakReported,
    /// A key or secret version expires within a threshold.
    SecretExpiring,
    /// A STATIC secret's scheduled rotation is due.
    RotationDue,
    /// An API key unused for the stale threshold.
    Stale,
    /// A webhook endpoint failed for longer than the retry period and was disabled.
    WebhookDisabled,
}

impl AlertType {
    /// Every type.
    pub const ALL: [AlertType; 12] = [
        Self::NewNetwork,
        Self::Spike,
        Self::UsedAfterRevoke,
        Self::UsedAfterGrace,
        Self::ScopeProbe,
        Self::QuotaLow,
        Self::QuotaExhausted,
        Self::LeakReported,
        Self::SecretExpiring,
        Self::RotationDue,
        Self::Stale,
        Self::WebhookDisabled,
    ];

    /// The event type's name, e.g. `key.new_network`.
    pub fn name(self) -> &'static str {
        match self {
            Self::NewNetwork => "key.new_network",
            Self::Spike => "key.spike",
            Self::UsedAfterRevoke => "key.used_after_revoke",
            Self::UsedAfterGrace => "key.used_after_grace",
            Self::ScopeProbe => "key.scope_probe",
            Self::QuotaLow => "key.quota.low",
            Self::QuotaExhausted => "key.quota.exhausted",
            Self::LeakReported => "key.leak_reported",
            Self::SecretExpiring => "secret.expiring",
            Self::RotationDue => "secret.rotation_due",
            Self::Stale => "key.stale",
            Self::WebhookDisabled => "webhook.disabled",
        }
    }
}

/// One alert, as raised.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Its type.
    pub kind: AlertType,
    /// The secret concerned (empty: none).
    pub name: String,
    /// Its version (0: none).
    pub version: u64,
    /// API keys: the non-reversible key id.
    pub key_id: String,
    /// The secret's environment.
    pub environment: String,
    /// Type-specific details (never a key or a value).
    pub details: Map<String, Value>,
    /// When it was noticed.
    pub time_ms: Millis,
}

impl Alert {
    /// The webhook body's `data` object.
    pub fn data(&self) -> Value {
        let mut d = Map::new();
        if !self.name.is_empty() {
            d.insert("secret".into(), json!(self.name));
            d.insert("version".into(), json!(self.version));
            d.insert("environment".into(), json!(self.environment));
        }
        if !self.key_id.is_empty() {
            d.insert("key_id".into(), json!(self.key_id));
        }
        d.insert("details".into(), Value::Object(self.details.clone()));
        Value::Object(d)
    }
}

/// The webhook body of an event: `{"type", "timestamp", "data"}` (Standard Webhooks).
pub fn body(kind: &str, time_ms: Millis, data: &Value) -> String {
    json!({"type": kind, "timestamp": rfc3339(time_ms), "data": data}).to_string()
}

/// A fresh `webhook-id`: `msg_` and 128 random bits.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    format!("msg_{}", hex::encode(b))
}

/// Where alerts are raised: the bounded queue in front of the writer task. Cheap to call on
/// the request path.
pub struct Alerts {
    tx: mpsc::Sender<Alert>,
}

impl Alerts {
    /// A queue of `capacity` alerts, and its receiving end for [`run_writer`].
    pub fn new(capacity: usize) -> (Arc<Self>, mpsc::Receiver<Alert>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Arc::new(Self { tx }), rx)
    }

    /// Queues an alert without waiting; a full queue drops it (and counts it).
    pub fn raise(&self, alert: Alert) {
        let kind = alert.kind;
        match self.tx.try_send(alert) {
            Ok(()) => metrics::global().count_alert(kind.name()),
            Err(_) => {
                metrics::global().count_alert_dropped();
                tracing::warn!(
                    alert = kind.name(),
                    "alert queue full or closed: alert dropped"
                );
            }
        }
    }
}

/// Writes queued alerts as audit records, then as outbox entries. First enqueues any alert
/// record a crash left without its outbox entries. When `stop` turns true (shutdown, after the
/// last call was answered) the queue is closed and what it still holds is written first.
pub async fn run_writer(
    mut rx: mpsc::Receiver<Alert>,
    log: Arc<AuditLog>,
    outbox: Arc<Outbox>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if let Err(e) = recover(&log, &outbox).await {
        tracing::error!(error = %e, "alert outbox recovery failed; alerts since the last start may not be delivered");
    }
    loop {
        let alert = tokio::select! {
            a = rx.recv() => a,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(alert) = alert else { return };
        write(alert, &log, &outbox).await;
    }
}

/// Writes one alert: its audit record (retried while the log is down), then its outbox entries.
async fn write(alert: Alert, log: &AuditLog, outbox: &Outbox) {
    let id = new_id();
    let data = alert.data();
    let mut rec = AuditRecord::system(
        ALERT_METHOD,
        alert.time_ms,
        Event::Alert(AlertEvent {
            kind: alert.kind.name().to_owned(),
            id: id.clone(),
            data: data.to_string(),
        }),
    );
    if !alert.name.is_empty() {
        rec.targets.push((alert.name.clone(), alert.version));
    }
    rec.key_id = alert.key_id.clone();
    // Every record before this one is an alert already in the outbox (this task is the only
    // writer of alerts), so the cursor may move up to here with this alert's entries.
    let before = log.durable_head();
    let mut delay = Duration::from_millis(100);
    loop {
        match log.append(rec.clone()).await {
            Ok(()) => break,
            Err(e) => {
                // The audit log is down (full disk, I/O error): the alert waits, and the queue
                // behind it fills and drops, rather than being delivered unrecorded.
                tracing::error!(error = %e, alert = alert.kind.name(), "cannot record alert; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    let body = body(alert.kind.name(), alert.time_ms, &data);
    if let Err(e) = outbox
        .enqueue(&id, alert.kind.name(), &body, alert.time_ms, Some(before))
        .await
    {
        tracing::error!(error = %e, alert = alert.kind.name(), "cannot queue alert for delivery");
    }
}

/// Enqueues the alert records after the outbox's cursor (see the module documentation).
async fn recover(log: &Arc<AuditLog>, outbox: &Arc<Outbox>) -> Result<()> {
    let head = log.durable_head();
    // The first start with alerts: no alert record can be older than this, and reading a
    // long log from its start here would hold up the queue.
    let Some(cursor) = outbox.cursor()? else {
        return outbox.set_cursor(head).await;
    };
    let mut from = cursor + 1;
    while from <= head {
        let (log2, start) = (log.clone(), from);
        let chunk = tokio::task::spawn_blocking(move || log2.read(start, 1024))
            .await
            .map_err(|e| Error::Internal(format!("alert recovery task: {e}")))??;
        let Some(last) = chunk.last().map(|(seq, _)| *seq) else {
            break;
        };
        for (_, stored) in chunk {
            let Ok(stored) = stored else { continue };
            let r = stored.record;
            if let Event::Alert(a) = &r.event {
                if !outbox.knows(&a.id)? {
                    let data: Value = serde_json::from_str(&a.data).unwrap_or(Value::Null);
                    let body = body(&a.kind, r.time_ms, &data);
                    tracing::info!(alert = %a.kind, id = %a.id, "queueing an alert a crash left undelivered");
                    outbox
                        .enqueue(&a.id, &a.kind, &body, r.time_ms, None)
                        .await?;
                }
            }
        }
        from = last + 1;
    }
    outbox.set_cursor(head).await
}

/// What a WatchAlerts caller asked for.
#[derive(Debug, Clone, Default)]
pub struct WatchQuery {
    /// First sequence number wanted (0: the oldest kept).
    pub from_seq: u64,
    /// Keep streaming.
    pub follow: bool,
    /// Only these types (patterns as in webhook `events`; empty: all).
    pub types: Vec<String>,
    /// Only alerts about a secret whose name starts with this.
    pub name_prefix: String,
}

/// One thing WatchAlerts delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// An alert record.
    Alert(Box<AuditRecord>),
    /// Records `from..=to` cannot be delivered (see [`StreamItem::Gap`]).
    Gap {
        /// First missing.
        from: u64,
        /// Last missing.
        to: u64,
        /// Deleted by retention.
        pruned: bool,
    },
}

/// The Alerts RPCs' domain (ReportLeak is the verifier's: keys::Keys::report_leak).
pub struct AlertsApi {
    access: Arc<AuditAccess>,
    outbox: Arc<Outbox>,
    policy: Policy,
    clock: Arc<dyn Clock>,
}

impl AlertsApi {
    /// Over the audit log's `access`, the `outbox` and the authorization `policy`.
    pub fn new(
        access: Arc<AuditAccess>,
        outbox: Arc<Outbox>,
        policy: Policy,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            access,
            outbox,
            policy,
            clock,
        }
    }

    /// WatchAlerts (see [`AlertStream::open`]).
    pub async fn watch(&self, peer: &Peer, q: WatchQuery) -> Result<AlertStream> {
        AlertStream::open(&self.access, peer, q).await
    }

    /// TestWebhook: verb admin on `*`. Its record is durable before the endpoint is called.
    pub async fn test_webhook(&self, peer: &Peer, url: &str) -> Result<(String, webhook::Attempt)> {
        let mut rec = AuditRecord::new(peer, "TestWebhook", self.clock.now_ms());
        let checked = if !self.policy.grants_everywhere(&peer.identity, Verb::Admin) {
            Err(Error::PermissionDenied {
                identity: peer.identity.to_string(),
                verb: Verb::Admin.name(),
                target: "*".into(),
            })
        } else {
            self.outbox.endpoint(url).map(drop)
        };
        if let Err(e) = &checked {
            rec.code = e.code().as_i32();
        }
        self.access.log().append(rec).await?;
        checked?;
        self.outbox.test(url).await
    }
}

/// Most type patterns in one WatchAlerts request.
const MAX_TYPE_FILTERS: usize = 32;

/// A WatchAlerts stream: the audit log's stream reader, limited to alert records.
pub struct AlertStream {
    reader: crate::audit::StreamReader,
    types: Vec<String>,
}

impl AlertStream {
    /// Opens a stream for `peer` (verb `audit` on the secrets concerned, as StreamAudit);
    /// the call's own record is durable first.
    pub async fn open(access: &AuditAccess, peer: &Peer, q: WatchQuery) -> Result<Self> {
        if q.types.len() > MAX_TYPE_FILTERS {
            return Err(Error::invalid(format!(
                "at most {MAX_TYPE_FILTERS} type filters"
            )));
        }
        for t in &q.types {
            check_pattern(t).map_err(Error::invalid)?;
        }
        let reader = access
            .stream_for(
                peer,
                "WatchAlerts",
                StreamQuery {
                    from_seq: q.from_seq,
                    last: 0,
                    follow: q.follow,
                    identity: String::new(),
                    name_prefix: q.name_prefix,
                    method: ALERT_METHOD.to_owned(),
                    outcome: String::new(),
                },
            )
            .await?;
        Ok(Self {
            reader,
            types: q.types,
        })
    }

    /// The next alert (or gap); `None` once caught up when not following.
    pub async fn next(&mut self) -> Result<Option<WatchItem>> {
        loop {
            match self.reader.next().await? {
                None => return Ok(None),
                Some(StreamItem::Gap { from, to, pruned }) => {
                    return Ok(Some(WatchItem::Gap { from, to, pruned }))
                }
                Some(StreamItem::Record(r, _)) => {
                    let Event::Alert(a) = &r.event else { continue };
                    if self.types.is_empty()
                        || self.types.iter().any(|p| pattern_matches(p, &a.kind))
                    {
                        return Ok(Some(WatchItem::Alert(r)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AlertsConfig, WebhookConfig};
    use crate::store::sled_store::SledStore;
    use crate::store::Store;

    #[tokio::test]
    async fn an_alert_recorded_but_not_queued_before_a_crash_is_queued_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
        let (vault, clock) =
            crate::testutil::vault_over(store.clone(), crate::testutil::ADMIN_ONLY_POLICY, 60_000)
                .await;
        let secret = dir.path().join("hook.secret");
        std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        let cfg = AlertsConfig {
            webhooks: vec![WebhookConfig {
                url: "http://127.0.0.1:9/hook".into(),
                secret_file: secret,
                events: vec!["key.*".into()],
                ca_file: None,
            }],
            ..AlertsConfig::default()
        };
        let outbox = Arc::new(Outbox::open(store.clone(), clock.clone(), &cfg).unwrap());
        let log = vault.audit().clone();
        // First start: the cursor is set at the head, nothing before it is read.
        recover(&log, &outbox).await.unwrap();
        assert_eq!(outbox.cursor().unwrap(), Some(log.durable_head()));
        // One alert written whole, one whose process died after its audit record.
        let (alerts, mut rx) = Alerts::new(8);
        let alert = |kind| Alert {
            kind,
            name: "app/key".into(),
            version: 1,
            key_id: "00ff00ff00ff00ff".into(),
            environment: "prod".into(),
            details: Map::new(),
            time_ms: clock.now_ms(),
        };
        alerts.raise(alert(AlertType::Spike));
        write(rx.recv().await.unwrap(), &log, &outbox).await;
        let whole = outbox.pending().unwrap();
        assert_eq!(whole.len(), 1);
        let mut cut = AuditRecord::system(
            ALERT_METHOD,
            clock.now_ms(),
            Event::Alert(AlertEvent {
                kind: "key.leak_reported".into(),
                id: "msg_0123456789abcdef0123456789abcdef".into(),
                data: r#"{"secret":"app/key"}"#.into(),
            }),
        );
        cut.targets.push(("app/key".into(), 1));
        log.append(cut).await.unwrap();
        // The next start queues the cut one, with its recorded id, and not the whole one again.
        recover(&log, &outbox).await.unwrap();
        let pending = outbox.pending().unwrap();
        assert_eq!(pending.len(), 2, "{pending:?}");
        let found = pending
            .iter()
            .find(|e| e.kind == "key.leak_reported")
            .unwrap();
        assert_eq!(found.id, "msg_0123456789abcdef0123456789abcdef");
        assert!(
            found.body.contains(r#""secret":"app/key""#),
            "{}",
            found.body
        );
        assert_eq!(outbox.cursor().unwrap(), Some(log.durable_head()));
        // A type the endpoint does not take is recorded but not queued.
        alerts.raise(alert(AlertType::WebhookDisabled));
        write(rx.recv().await.unwrap(), &log, &outbox).await;
        assert_eq!(outbox.pending().unwrap().len(), 2);
    }
}
