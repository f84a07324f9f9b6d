//! Audit records: one per call, allowed or denied, success or failure. A mutation's record is
//! committed in the same batch as the change; a read's record is durable before the value
//! leaves the server. Records name identities, methods, secrets, versions, outcomes and key
//! ids — never a value, a data key or an API key.
//!
//! This is the fail-closed core; hash chaining, signed checkpoints and streaming build on it.

use crate::clock::Millis;
use crate::error::{Code, Error, Result};
use crate::store::{encode, Batch, Store, Tree};
use crate::tls::Peer;
use serde::{Deserialize, Serialize};

/// One audited call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number (increasing; also the record's key).
    pub seq: u64,
    /// When the call was decided.
    pub time_ms: Millis,
    /// Caller identity from its certificate.
    pub identity: String,
    /// Caller address.
    pub peer: String,
    /// RPC method name.
    pub method: String,
    /// Secrets touched: (name, version; 0 when none applies).
    pub targets: Vec<(String, u64)>,
    /// Outcome as a gRPC code number.
    pub code: i32,
    /// Client-supplied idempotency key, if any.
    pub request_id: String,
    /// API keys: the non-reversible key id.
    pub key_id: String,
    /// Outcome detail beyond the gRPC code, e.g. a verification's result (`REVOKED`).
    pub detail: String,
}

impl AuditRecord {
    /// A record for a call by `peer` to `method`, outcome not yet known.
    pub fn new(peer: &Peer, method: &str, now: Millis) -> Self {
        Self {
            seq: 0,
            time_ms: now,
            identity: peer.identity.to_string(),
            peer: peer.addr.to_string(),
            method: method.to_owned(),
            targets: Vec::new(),
            code: Code::Ok.as_i32(),
            request_id: String::new(),
            key_id: String::new(),
            detail: String::new(),
        }
    }
}

/// Adds `record` to `batch` under a fresh sequence number.
pub fn stage(store: &dyn Store, batch: &mut Batch, record: &mut AuditRecord) -> Result<()> {
    record.seq = store.next_id()?;
    batch.put(
        Tree::Audit,
        record.seq.to_be_bytes().to_vec(),
        encode(record),
    );
    Ok(())
}

/// Writes `record` and waits until it is durable. Any failure is UNAVAILABLE: the caller
/// must then release nothing.
pub async fn append(store: &dyn Store, mut record: AuditRecord) -> Result<()> {
    let started = std::time::Instant::now();
    let mut batch = Batch::new();
    stage(store, &mut batch, &mut record).map_err(audit_down)?;
    store.commit(batch).map_err(|e| audit_down(e.into()))?;
    let synced = store.sync().await.map_err(|e| audit_down(e.into()));
    crate::metrics::global().observe_audit_write(started.elapsed());
    synced
}

fn audit_down(e: Error) -> Error {
    tracing::error!(error = %e, "audit log write failed; failing the call closed");
    Error::Unavailable("audit log unavailable".into())
}
