//! Changes after their records: the writer task that makes a change's record durable, then
//! commits the change with the store's applied mark, voids what does not commit, and resolves
//! at start-up (or after a store failure) the change records whose commit never happened; and
//! the start-up check that the log reaches every record the store names. The rule these keep
//! is in the [`crate::audit`] module documentation.

use super::{read_u64, AuditLog, APPLIED_MARK, CHECKPOINT_MARK, CHUNK};
use crate::audit::{AuditRecord, Event, VOID_METHOD};
use crate::error::{Code, Error, Result};
use crate::store::{Batch, StoreError, Tree};
use std::sync::atomic::Ordering;
use std::sync::Weak;

/// A change waiting for the writer task, and where its outcome goes.
pub(super) struct Queued {
    batch: Batch,
    rec: AuditRecord,
    reply: tokio::sync::oneshot::Sender<(Result<(), StoreError>, AuditRecord)>,
}

impl Queued {
    fn answer(mut self, outcome: Result<(), StoreError>) {
        if outcome.is_err() {
            // Not in the store: the caller must not take this number for its change, and the
            // record it may write next (a retry's, or the refusal's) starts as a plain call.
            self.rec.seq = 0;
            self.rec.event = Event::Call;
        }
        // The caller may have gone away; the change is settled either way.
        let _ = self.reply.send((outcome, self.rec));
    }
}

impl AuditLog {
    /// Refuses a log that ends before a record the store names (see the module docs of
    /// [`crate::audit`]): segments were deleted or cut.
    pub(super) fn check_marks(&self) -> Result<()> {
        let head = self.lock().seq;
        let refuse = |what: String| {
            Err(Error::DataLoss(format!(
                "the audit log in {} ends at record {head}, but {what}: audit segments were \
                 deleted, truncated or replaced. Restore the data directory (store and audit/ \
                 together) from a backup",
                self.segments.dir().display()
            )))
        };
        if let Some(raw) = self.store.get(Tree::Meta, &self.mark(APPLIED_MARK))? {
            let applied = read_u64(&raw).unwrap_or(0);
            if applied > head {
                return refuse(format!(
                    "the store holds changes recorded up to record {applied}"
                ));
            }
        }
        if let Some(raw) = self.store.get(Tree::Meta, &self.mark(CHECKPOINT_MARK))? {
            let seq = read_u64(&raw).unwrap_or(0);
            if seq > head {
                return refuse(format!("checkpoint record {seq} was written"));
            }
            if seq >= self.oldest() && seq > 0 {
                let found = self.read(seq, 1)?;
                let same = match found.first() {
                    Some((s, Ok(stored))) => *s == seq && raw.get(8..40) == Some(&stored.hash[..]),
                    _ => false,
                };
                if !same {
                    return refuse(format!(
                        "checkpoint record {seq} differs from the one written"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Resolves the change records after the store's applied mark: each whose change the
    /// store does not hold (a crash or a store failure came between the record and the
    /// commit) gets a void record; then the mark moves to the head.
    pub(super) async fn reconcile(&self) -> Result<()> {
        let _writer = self.writer.lock().await;
        self.reconcile_locked().await
    }

    /// [`AuditLog::reconcile`], with the writer lock held.
    async fn reconcile_locked(&self) -> Result<()> {
        self.reconcile_due.store(false, Ordering::Release);
        // The mark must be read as the store holds it now: a shared store's copy first
        // catches up with every commit, including one whose outcome was unknown.
        self.store.sync().await?;
        let applied = match self.store.get(Tree::Meta, &self.mark(APPLIED_MARK))? {
            Some(raw) => read_u64(&raw).unwrap_or(0),
            None => 0,
        };
        let head = self.durable_head();
        if head <= applied {
            return Ok(());
        }
        let mut open: Vec<u64> = Vec::new();
        let mut next = (applied + 1).max(self.oldest());
        while next <= head {
            let chunk = self.read(next, CHUNK)?;
            if chunk.is_empty() {
                break;
            }
            for (seq, stored) in chunk {
                next = seq + 1;
                match stored.map(|s| s.record.event) {
                    Ok(Event::Change) => open.push(seq),
                    Ok(Event::Void { seq: v }) => open.retain(|s| *s != v),
                    Ok(_) => {}
                    // Whoever can write the files could otherwise stop the vault; the record
                    // is left to verification to report.
                    Err(e) => {
                        tracing::error!(seq, error = %e, "an audit record after the applied mark cannot be read; VerifyAuditLog will report it")
                    }
                }
            }
        }
        for seq in &open {
            self.void(*seq, Code::Unavailable).await?;
        }
        if !open.is_empty() {
            tracing::warn!(
                records = open.len(),
                "change records whose commit never happened were voided"
            );
        }
        let mut batch = Batch::new();
        batch.put(
            Tree::Meta,
            self.mark(APPLIED_MARK),
            self.durable_head().to_be_bytes().to_vec(),
        );
        self.store.commit(batch)?;
        self.store.sync().await?;
        Ok(())
    }

    /// Appends a record saying that change record `seq` was not applied (`code`: why), and
    /// waits until it is durable.
    pub(super) async fn void(&self, seq: u64, code: Code) -> Result<()> {
        let mut rec = AuditRecord::system(VOID_METHOD, self.clock.now_ms(), Event::Void { seq });
        rec.code = code.as_i32();
        self.append_record(&mut rec)?;
        self.durable(rec.seq).await
    }

    /// Commits `batch` to the store after its record `rec` (a change record) is durable:
    /// the record first, so that nothing can be in the store without its record. The batch
    /// also moves the store's applied mark to the record. If the commit fails (a guard did not
    /// hold: [`StoreError::Conflict`], or the store failed), a void record says so before
    /// anything else is committed. Durable only after [`AuditLog::synced`].
    ///
    /// Changes go to one writer task, which takes every change queued meanwhile as one group:
    /// their records share one `fdatasync` (with any reads' records), then their batches one
    /// store transaction, applied in queue order with their own guards; if any guard fails,
    /// each is committed alone so that only that one fails. The task finishes a group even if
    /// its callers go away, so a change is never left between its record and its commit.
    pub async fn commit(&self, batch: Batch, rec: &mut AuditRecord) -> Result<(), StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.changes
            .send(Queued {
                batch,
                rec: rec.clone(),
                reply,
            })
            .map_err(|_| StoreError::Unavailable("audit log closed".into()))?;
        let (outcome, back) = answer
            .await
            .map_err(|_| StoreError::Unavailable("audit log closed".into()))?;
        *rec = back;
        outcome
    }

    /// The writer task: commits queued changes in groups until the log is dropped.
    pub(super) async fn write_changes(
        log: Weak<Self>,
        mut queue: tokio::sync::mpsc::UnboundedReceiver<Queued>,
    ) {
        while let Some(first) = queue.recv().await {
            let mut group = vec![first];
            while let Ok(more) = queue.try_recv() {
                group.push(more);
            }
            let Some(log) = log.upgrade() else {
                return;
            };
            let _writer = log.writer.lock().await;
            if log.reconcile_due.load(Ordering::Acquire) {
                if let Err(e) = log.reconcile_locked().await {
                    for q in group {
                        q.answer(Err(store_down(&e)));
                    }
                    continue;
                }
            }
            log.commit_group(group).await;
        }
    }

    /// Records, syncs and commits one group of changes (see [`AuditLog::commit`]).
    async fn commit_group(&self, group: Vec<Queued>) {
        let generation = self.store.generation();
        let mut staged = Vec::with_capacity(group.len());
        for mut q in group {
            q.rec.event = Event::Change;
            q.rec.generation = generation;
            match self.append_record(&mut q.rec) {
                Ok(()) => staged.push(q),
                Err(e) => q.answer(Err(store_down(e))),
            }
        }
        let Some(last) = staged.last().map(|q| q.rec.seq) else {
            return;
        };
        if let Err(e) = self.durable(last).await {
            // Not durable: nothing was committed. Records that reached the disk anyway are
            // voided when the log reopens.
            for q in staged {
                q.answer(Err(store_down(&e)));
            }
            return;
        }
        let marked = |q: &Queued| {
            let mut b = q.batch.clone();
            b.put(
                Tree::Meta,
                self.mark(APPLIED_MARK),
                q.rec.seq.to_be_bytes().to_vec(),
            );
            b.require_generation(generation);
            b
        };
        // In queue order, as few transactions as the store takes: a group larger than one
        // transaction may be is halved until its parts fit.
        let mut chunks = std::collections::VecDeque::from([staged]);
        while let Some(chunk) = chunks.pop_front() {
            let outcome = if let [q] = &chunk[..] {
                self.store.commit(marked(q))
            } else {
                let mut all = Batch::new();
                for q in &chunk {
                    all.merge(marked(q));
                }
                all.require_generation(generation);
                self.store.commit(all)
            };
            match outcome {
                Ok(()) => {
                    for q in chunk {
                        q.answer(Ok(()));
                    }
                }
                Err(StoreError::TooLarge(_)) if chunk.len() > 1 => {
                    let mut first = chunk;
                    let second = first.split_off(first.len() / 2);
                    chunks.push_front(second);
                    chunks.push_front(first);
                }
                // One member's guard failed: each is committed alone, so only it fails.
                Err(StoreError::Conflict) if chunk.len() > 1 => {
                    for q in chunk {
                        let result = self.store.commit(marked(&q));
                        self.settle(q, result).await;
                    }
                }
                Err(e) => {
                    for q in chunk {
                        self.settle(q, Err(e.clone())).await;
                    }
                }
            }
        }
    }

    /// Answers a change whose commit is known; a failed one is voided first, so that no later
    /// commit moves the applied mark past an unresolved record.
    async fn settle(&self, q: Queued, result: Result<(), StoreError>) {
        if let Err(StoreError::Indeterminate(_)) = &result {
            // The store may hold the change: what it holds (the applied mark travels with the
            // change) settles the record before the next change, instead of a void that
            // could be false.
            self.reconcile_due.store(true, Ordering::Release);
        } else if let Err(e) = &result {
            let code = match e {
                StoreError::Conflict => Code::Aborted,
                _ => Code::Unavailable,
            };
            if let Err(v) = self.void(q.rec.seq, code).await {
                tracing::error!(seq = q.rec.seq, error = %v, "could not void a change record; it is resolved before the next change");
                self.reconcile_due.store(true, Ordering::Release);
            }
        }
        q.answer(result);
    }

    /// Waits until the change committed by [`AuditLog::commit`] is durable in the store.
    /// Fails if the store was reopened since the commit, which may have lost it.
    pub async fn synced(&self, rec: &AuditRecord) -> Result<(), StoreError> {
        let result = self.store.sync().await;
        if result.is_err() || self.store.generation() != rec.generation {
            // A reopened store may have lost the change: resolve its record first.
            self.reconcile_due.store(true, Ordering::Release);
            result?;
            return Err(StoreError::Unavailable(
                "storage was reopened before the write was confirmed durable".into(),
            ));
        }
        Ok(())
    }
}

fn store_down(e: impl std::fmt::Display) -> StoreError {
    tracing::error!(error = %e, "audit log write failed; failing the change closed");
    StoreError::Unavailable("audit log unavailable".into())
}
