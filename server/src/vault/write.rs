//! The one write path. Every write RPC — PutSecret, IssueKey, UpdateKeyPolicy, RotateSecret,
//! RevokeSecret, SetVersionState, DestroyVersion — describes itself as a [`Plan`] and
//! [`Vault::write`] runs it the same way:
//!
//! 1. an audit record for the call, naming the secret as sent;
//! 2. the name parsed, the verb required on it (in some environment), the idempotency key
//!    parsed; then the plan: validate the rest of the input, digest the request (a refusal
//!    at any of these steps is audited like any other);
//! 3. up to [`MAX_ATTEMPTS`] optimistic attempts, each: answer a retried request (same
//!    `request_id`, same digest) from its first result; else read, check compare-and-set,
//!    change the record, seal, and stage a batch guarded on what was read; add the request
//!    record; commit the batch together with the audit record; on a lost race, go again;
//! 4. wait until the commit is durable (or record the refusal);
//! 5. tell the [`ChangeSink`]s (watchers, the sweeper's index) — before the caller is answered.
//!
//! The sweeper's own changes use the lower steps ([`Vault::commit_with_audit`],
//! [`Vault::announce`]) with one durable sync per pass.

use super::Vault;
use crate::audit::AuditRecord;
use crate::clock::Millis;
use crate::error::{Code, Error, Result};
use crate::identity::Peer;
use crate::model::{RequestId, RequestRecord, SecretName, SecretRecord};
use crate::policy::Verb;
use crate::store::{decode, encode, request_key, Batch, StoreError, Tree};

/// Optimistic-concurrency attempts before a write gives up with ABORTED.
pub(crate) const MAX_ATTEMPTS: usize = 8;

/// What the write path tells about changes, to whoever follows them (watch streams, the
/// sweeper's deadline index). Given to the vault at construction; called on the write path,
/// so implementations only note the name and return.
pub trait ChangeSink: Send + Sync {
    /// The record of secret `name` was committed (not yet durable).
    fn committed(&self, _name: &[u8]) {}
    /// A change of secret `name` is durable and about to be answered.
    fn durable(&self, _name: &str) {}
}

/// What a write produced.
#[derive(Debug, Clone)]
pub struct Written {
    /// Secret name.
    pub name: String,
    /// New version.
    pub version: u64,
    /// CRC32C of the value.
    pub checksum: u32,
    /// Creation time of the version.
    pub create_ms: Millis,
}

impl Written {
    /// A write that made no version: the request record only needs name and version.
    pub(crate) fn of(name: &str, version: u64) -> Self {
        Self {
            name: name.to_owned(),
            version,
            checksum: 0,
            create_ms: 0,
        }
    }
}

/// A write call as received.
pub(crate) struct Call<'a> {
    /// The caller.
    peer: &'a Peer,
    /// RPC name, as audited and as the request record keeps it.
    method: &'static str,
    /// The verb the caller needs on the secret.
    verb: Verb,
    /// The secret's name as sent (audited even when it does not parse).
    name: &'a str,
    /// The idempotency key as sent, or empty.
    request_id: &'a str,
}

impl<'a> Call<'a> {
    /// `peer` calls `method`, needing `verb` on the secret `name`, with idempotency key
    /// `request_id` (all as sent).
    pub(crate) fn new(
        peer: &'a Peer,
        method: &'static str,
        verb: Verb,
        name: &'a str,
        request_id: &'a str,
    ) -> Self {
        Self {
            peer,
            method,
            verb,
            name,
            request_id,
        }
    }
}

/// A validated write, ready to run.
pub(crate) struct Plan<R, A> {
    /// Keyed digest of the request's fields: a retry under the same id must match it.
    pub fingerprint: [u8; 32],
    /// Rebuilds the answer of a request that already succeeded, from what it wrote.
    pub replayed: R,
    /// One optimistic attempt: read, check, change, stage. Runs again after a lost race, so
    /// it does no I/O besides reads and keeps nothing between runs.
    pub attempt: A,
}

/// What one attempt staged: the change and the answer to give once it is durable.
pub(crate) struct Staged<T> {
    /// The change, guarded on what the attempt read.
    pub batch: Batch,
    /// What the request record keeps for a retried request.
    pub written: Written,
    /// The answer.
    pub answer: T,
}

impl Vault {
    /// Runs a write call through the one write path (see the module docs). Before `plan`
    /// sees the call, the name is parsed, the caller must hold the verb on it in some
    /// environment, and the idempotency key is parsed.
    pub(crate) async fn write<T, R, A>(
        &self,
        call: Call<'_>,
        plan: impl FnOnce(&mut AuditRecord, &SecretName) -> Result<Plan<R, A>>,
    ) -> Result<T>
    where
        R: FnMut(Written, &mut AuditRecord) -> Result<T>,
        A: FnMut(&mut AuditRecord) -> Result<Staged<T>>,
    {
        let mut rec = AuditRecord::new(call.peer, call.method, self.now());
        rec.targets.push((call.name.to_owned(), 0));
        rec.request_id = call.request_id.to_owned();
        let planned = (|| {
            let name = SecretName::parse(call.name)?;
            self.authorize(call.peer, call.verb, &name, None)?;
            let request_id = RequestId::parse_optional(call.request_id)?;
            let plan = plan(&mut rec, &name)?;
            Ok((name, request_id, plan))
        })();
        let result = match planned {
            Ok((name, request_id, plan)) => {
                self.attempts(&call, &name, request_id, plan, &mut rec)
                    .await
            }
            Err(e) => Err(e),
        };
        let answer = self.finish_write(rec, result).await?;
        self.announce(call.name);
        Ok(answer)
    }

    async fn attempts<T, R, A>(
        &self,
        call: &Call<'_>,
        name: &SecretName,
        request_id: Option<RequestId>,
        mut plan: Plan<R, A>,
        rec: &mut AuditRecord,
    ) -> Result<T>
    where
        R: FnMut(Written, &mut AuditRecord) -> Result<T>,
        A: FnMut(&mut AuditRecord) -> Result<Staged<T>>,
    {
        for _ in 0..MAX_ATTEMPTS {
            if let Some(id) = &request_id {
                if let Some(done) = self.replay(call.peer, id, call.method, &plan.fingerprint)? {
                    return (plan.replayed)(done, rec);
                }
            }
            let Staged {
                mut batch,
                written,
                answer,
            } = (plan.attempt)(rec)?;
            if let Some(id) = &request_id {
                stage_request(
                    &mut batch,
                    call.peer,
                    id,
                    call.method,
                    plan.fingerprint,
                    &written,
                );
            }
            match self.commit_with_audit(batch, rec).await {
                Err(Error::Conflict(_)) => continue,
                other => other?,
            }
            return Ok(answer);
        }
        Err(Error::Conflict(format!(
            "{name} is being changed concurrently; retry"
        )))
    }

    /// The earlier result of this request id, if the same request already succeeded.
    fn replay(
        &self,
        peer: &Peer,
        id: &RequestId,
        method: &str,
        fingerprint: &[u8; 32],
    ) -> Result<Option<Written>> {
        let Some(raw) = self
            .store
            .get(Tree::Requests, &request_key(&peer.identity, id.as_str()))?
        else {
            return Ok(None);
        };
        let done: RequestRecord = decode("request record", &raw)?;
        if done.method != method || &done.fingerprint != fingerprint {
            return Err(Error::AlreadyExists(format!(
                "request_id {:?} was already used for a different request",
                id.as_str()
            )));
        }
        let name = SecretName::parse(&done.name)?;
        let secret = self.load(&name)?;
        let meta = secret.version(done.version).ok_or_else(|| {
            Error::DataLoss(format!(
                "request {:?} refers to a missing version",
                id.as_str()
            ))
        })?;
        Ok(Some(Written {
            checksum: self.stored_checksum(&done.name, meta.version)?,
            name: done.name,
            version: meta.version,
            create_ms: meta.create_ms,
        }))
    }

    /// Commits a batch together with the call's audit record (outcome OK). Every write of a
    /// secret record goes through here, so the sinks learn of each one.
    pub(crate) async fn commit_with_audit(
        &self,
        batch: Batch,
        rec: &mut AuditRecord,
    ) -> Result<()> {
        rec.code = Code::Ok.as_i32();
        rec.time_ms = self.now();
        let written: Vec<Vec<u8>> = batch
            .written_keys(Tree::Secrets)
            .map(<[u8]>::to_vec)
            .collect();
        match self.audit.commit(batch, rec).await {
            Ok(()) => {
                for name in &written {
                    self.records.invalidate(name);
                    for sink in &self.sinks {
                        sink.committed(name);
                    }
                }
                Ok(())
            }
            Err(StoreError::Conflict) => Err(Error::Conflict("concurrent change".into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Tells the sinks that a change of `name` is durable.
    pub(crate) fn announce(&self, name: &str) {
        for sink in &self.sinks {
            sink.durable(name);
        }
    }

    /// Completes a write: on success the change and its audit record are committed, so wait
    /// for durability; on failure record the refusal.
    pub(crate) async fn finish_write<T>(
        &self,
        mut rec: AuditRecord,
        result: Result<T>,
    ) -> Result<T> {
        match result {
            // An idempotent replay committed nothing: the call still gets its own record.
            Ok(v) if rec.seq == 0 => {
                self.audit.append(rec).await?;
                Ok(v)
            }
            Ok(v) => {
                self.audit.synced(&rec).await.map_err(|e| {
                    tracing::error!(error = %e, "write not durable");
                    Error::Unavailable("storage unavailable: write not confirmed durable".into())
                })?;
                Ok(v)
            }
            Err(e) => {
                rec.code = e.code().as_i32();
                log_refusal(&rec, &e);
                self.audit.append(rec).await?;
                Err(e)
            }
        }
    }

    /// Completes a read: the audit record is durable before anything is returned.
    pub(crate) async fn finish_read<T>(
        &self,
        mut rec: AuditRecord,
        result: Result<T>,
    ) -> Result<T> {
        rec.code = match &result {
            Ok(_) => Code::Ok.as_i32(),
            Err(e) => {
                log_refusal(&rec, e);
                e.code().as_i32()
            }
        };
        self.audit.append(rec).await?;
        result
    }
}

/// A batch that replaces `secret`, guarded on the bytes the attempt read.
pub(crate) fn rewrite(secret: &SecretRecord, raw: Vec<u8>) -> Batch {
    let mut batch = Batch::new();
    batch.guard(Tree::Secrets, secret.name.as_bytes(), Some(raw));
    batch.put(Tree::Secrets, secret.name.as_bytes(), encode(secret));
    batch
}

/// Compare-and-set on the PRIMARY version: `expected` 0 means "must not exist".
pub(crate) fn check_cas(
    name: &SecretName,
    existing: Option<&SecretRecord>,
    expected: Option<u64>,
) -> Result<()> {
    match (expected, existing) {
        (None, _) | (Some(0), None) => Ok(()),
        (Some(0), Some(s)) => Err(Error::Conflict(format!(
            "expected_version 0 (must not exist) but {name} is at version {}",
            s.primary
        ))),
        (Some(n), None) => Err(Error::Conflict(format!(
            "expected_version {n} but {name} does not exist"
        ))),
        (Some(n), Some(s)) if s.primary != n => Err(Error::Conflict(format!(
            "expected_version {n} but {name} is at version {}",
            s.primary
        ))),
        _ => Ok(()),
    }
}

/// Adds the request record (guarded: absent) that makes a retry under `id` a replay.
fn stage_request(
    batch: &mut Batch,
    peer: &Peer,
    id: &RequestId,
    method: &str,
    fingerprint: [u8; 32],
    written: &Written,
) {
    let key = request_key(&peer.identity, id.as_str());
    batch.guard(Tree::Requests, key.clone(), None);
    batch.put(
        Tree::Requests,
        key,
        encode(&RequestRecord {
            method: method.to_owned(),
            fingerprint,
            name: written.name.clone(),
            version: written.version,
        }),
    );
}

fn log_refusal(rec: &AuditRecord, e: &Error) {
    tracing::info!(
        method = %rec.method,
        identity = %rec.identity,
        code = %e.code(),
        error = %e,
        "call refused"
    );
}
