//! [`AuditLog`]: owns the chain head, appends records to the segment files, publishes the
//! durable head to readers, writes changes to the store after their records, and runs
//! checkpointing, retention and the usage facts in the background.

mod changes;

use super::segments::{SegmentError, Segments, Tail};
use super::{
    decode, AuditRecord, Checkpoint, DecodeError, Event, Stored, CHECKPOINT_METHOD, GENESIS,
    PRUNE_METHOD, USE_METHODS,
};
use crate::clock::{Clock, Millis};
use crate::config::AuditSettings;
use crate::error::{Code, Error, Result};
use crate::store::{version_key, Batch, Store, Tree};
use changes::Queued;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use ward_hsm::MacSigner;

/// Records read per scan.
const CHUNK: usize = 512;
/// Usage facts are rewritten at most this often per secret version: a stale-key report counts
/// in days.
const USAGE_RESOLUTION_MS: u64 = 60_000;
/// Versions whose last usage write is remembered before the memory is cleared; also the most
/// facts waiting to be written.
const USAGE_MEMORY: usize = 100_000;
/// Usage facts written per store transaction (a guard and a put each; etcd takes 128
/// operations).
const USAGE_FLUSH_CHUNK: usize = 60;
/// Attempts of one chunk when other nodes keep writing the same facts.
const USAGE_FLUSH_ATTEMPTS: usize = 8;
/// Pause after a failed checkpoint before the next attempt.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(5);
/// Least time between two attempts to reopen a failed log.
const REOPEN_EVERY: Duration = Duration::from_millis(200);
/// Meta key: every change record up to this sequence number (u64 BE) is resolved — its change
/// was committed, or a void record says it was not. Per node when nodes share a store
/// (`store::node_key`).
pub const APPLIED_MARK: &[u8] = crate::store::NODE_KEYS[0].1;
/// Meta key: the newest checkpoint record (u64 BE seq, then its 32-byte hash), so that a log
/// cut before it is refused at start-up. Per node like [`APPLIED_MARK`].
pub const CHECKPOINT_MARK: &[u8] = crate::store::NODE_KEYS[1].1;

/// The last use of a secret version, kept from the audit log's own events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageFact {
    /// Time of the last successful read.
    pub last_used_ms: Millis,
    /// The audit record of that read.
    pub seq: u64,
}

/// What a pruning pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PruneReport {
    /// Records deleted.
    pub deleted: u64,
    /// First sequence number kept.
    pub oldest: u64,
}

/// The audit log. One per node; the vault and the Audit service share it.
pub struct AuditLog {
    store: Arc<dyn Store>,
    segments: Arc<Segments>,
    clock: Arc<dyn Clock>,
    signer: Arc<dyn MacSigner>,
    settings: AuditSettings,
    /// The chain head. Held while a record is staged, never across an await.
    chain: Mutex<Chain>,
    /// Highest sequence number known durable; readers follow it and never see a record that
    /// a crash could still take back.
    durable: watch::Sender<u64>,
    /// Poked when `checkpoint_every` records have accumulated.
    checkpoint_due: Notify,
    /// Lowest sequence number kept (0 while the log is empty).
    oldest: AtomicU64,
    /// Usage facts: when each version's fact was last taken, and the facts not yet written.
    usage: Mutex<UsageFacts>,
    /// Changes for the writer task (see [`AuditLog::commit`]).
    changes: tokio::sync::mpsc::UnboundedSender<Queued>,
    /// Held by whoever commits to the store on the log's behalf (the writer task, a
    /// checkpoint, reconciliation).
    writer: tokio::sync::Mutex<()>,
    /// When the log last tried to reopen after a failure (ms on the monotonic epoch).
    reopening: Mutex<Option<std::time::Instant>>,
    /// Whether the store generation changed under a commit (the store reopened).
    reconcile_due: AtomicBool,
}

#[derive(Default)]
struct UsageFacts {
    taken: HashMap<Vec<u8>, Millis>,
    waiting: HashMap<Vec<u8>, UsageFact>,
}

struct Chain {
    /// Sequence number of the head (0: empty log).
    seq: u64,
    /// Hash of the head ([`GENESIS`] for an empty log).
    hash: [u8; 32],
    /// Sequence number of the newest checkpoint record (0: none since start-up).
    last_checkpoint: u64,
}

fn segment_error(e: SegmentError) -> Error {
    match e {
        SegmentError::Damaged(m) => Error::DataLoss(m),
        SegmentError::Io(m) => Error::Unavailable(m),
    }
}

fn audit_down(e: impl std::fmt::Display) -> Error {
    tracing::error!(error = %e, "audit log write failed; failing the call closed");
    Error::Unavailable("audit log unavailable".into())
}

fn read_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

impl AuditLog {
    /// Opens the log in `dir` (`data_dir/audit`): moves a log that a previous version kept in
    /// the store into segment files, checks the files and that they hold every record the
    /// store names, and resolves change records whose commit a crash interrupted.
    pub async fn open(
        store: Arc<dyn Store>,
        dir: &Path,
        clock: Arc<dyn Clock>,
        signer: Arc<dyn MacSigner>,
        settings: AuditSettings,
    ) -> Result<Arc<Self>> {
        let (segments, tail) = {
            let (store, dir, signer) = (store.clone(), dir.to_owned(), signer.clone());
            let size = settings.segment_bytes;
            tokio::task::spawn_blocking(move || {
                super::migrate::from_store(&*store, &dir, size, &*signer)?;
                Segments::open(&dir, size).map_err(segment_error)
            })
            .await
            .map_err(|e| Error::Internal(format!("audit open task: {e}")))??
        };
        if tail.cut_bytes > 0 {
            tracing::warn!(
                bytes = tail.cut_bytes,
                "the audit log ended in a torn write (a crash); it was cut at the last whole record"
            );
        }
        let (seq, hash, checkpoint) = head_of(&tail);
        let (durable, _) = watch::channel(seq);
        let (changes, queue) = tokio::sync::mpsc::unbounded_channel();
        let log = Arc::new(Self {
            changes,
            oldest: AtomicU64::new(segments.oldest()),
            store,
            segments,
            clock,
            signer,
            settings,
            chain: Mutex::new(Chain {
                seq,
                hash,
                last_checkpoint: if checkpoint { seq } else { 0 },
            }),
            durable,
            checkpoint_due: Notify::new(),
            usage: Mutex::new(UsageFacts::default()),
            writer: tokio::sync::Mutex::new(()),
            reopening: Mutex::new(None),
            reconcile_due: AtomicBool::new(false),
        });
        log.check_marks()?;
        log.reconcile().await?;
        tokio::spawn(Self::write_changes(Arc::downgrade(&log), queue));
        Ok(log)
    }

    /// The settings in force.
    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// This node's key of `mark` in the store's meta tree.
    pub(super) fn mark(&self, mark: &[u8]) -> Vec<u8> {
        crate::store::node_key(mark, self.settings.node.as_deref())
    }

    /// The store the changes go to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The signer of checkpoints.
    pub(crate) fn signer(&self) -> &Arc<dyn MacSigner> {
        &self.signer
    }

    /// Highest durable sequence number (0: empty).
    pub fn durable_head(&self) -> u64 {
        *self.durable.borrow()
    }

    /// Follows the durable head.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// Lowest sequence number kept (0: empty).
    pub fn oldest(&self) -> u64 {
        self.oldest.load(Ordering::SeqCst)
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.count()
    }

    /// Writes `rec` on its own (a read or a refusal) and waits until it is durable. Any
    /// failure is UNAVAILABLE: the caller must then release nothing.
    pub async fn append(&self, mut rec: AuditRecord) -> Result<()> {
        let started = std::time::Instant::now();
        self.append_record(&mut rec).map_err(audit_down)?;
        let result = self.durable(rec.seq).await.map_err(audit_down);
        if result.is_ok() {
            self.note_usage(&rec);
        }
        crate::metrics::global().observe_audit_write(started.elapsed());
        result
    }

    /// Stages `rec` as the next record (sequence number, link, bounded input) and hands it
    /// to the segment files. Not yet durable: see [`AuditLog::durable`].
    fn append_record(&self, rec: &mut AuditRecord) -> Result<()> {
        if self.segments.failed() {
            self.reopen()?;
        }
        let mut chain = self.lock();
        rec.seq = chain.seq + 1;
        rec.prev_hash = chain.hash;
        rec.bound_input();
        let (stored, hash) = rec.encode();
        if let Err(e) = self.segments.append(rec.seq, &stored) {
            rec.seq = 0;
            return Err(segment_error(e));
        }
        chain.seq = rec.seq;
        chain.hash = hash;
        if matches!(rec.event, Event::Checkpoint(_)) {
            chain.last_checkpoint = rec.seq;
        }
        if self.oldest.load(Ordering::SeqCst) == 0 {
            self.oldest.store(rec.seq, Ordering::SeqCst);
        }
        if chain.seq.saturating_sub(chain.last_checkpoint) >= self.settings.checkpoint_every {
            self.checkpoint_due.notify_one();
        }
        Ok(())
    }

    /// Waits until record `seq` is durable, then lets readers see it.
    async fn durable(&self, seq: u64) -> Result<()> {
        self.segments.sync(seq).await.map_err(segment_error)?;
        self.durable.send_if_modified(|d| {
            let newer = seq > *d;
            if newer {
                *d = seq;
            }
            newer
        });
        Ok(())
    }

    /// Reopens the segment files after a failed write (at most every [`REOPEN_EVERY`]):
    /// what was not durable is dropped, and the chain continues from the last durable
    /// record. Change records are resolved before the next commit.
    fn reopen(&self) -> Result<()> {
        {
            let mut last = self
                .reopening
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return Err(Error::Unavailable(
                    "audit log unavailable; reopening".into(),
                ));
            }
            *last = Some(std::time::Instant::now());
        }
        let mut chain = self.lock();
        if !self.segments.failed() {
            return Ok(());
        }
        let tail = self.segments.recover().map_err(segment_error)?;
        let (seq, hash, checkpoint) = head_of(&tail);
        *chain = Chain {
            seq,
            hash,
            last_checkpoint: if checkpoint {
                seq
            } else {
                chain.last_checkpoint.min(seq)
            },
        };
        self.durable.send_replace(seq);
        self.reconcile_due.store(true, Ordering::Release);
        tracing::warn!(seq, "audit log reopened after a failure");
        Ok(())
    }

    /// The last use of each version of `name` (version → fact), from the usage facts.
    pub fn usage(&self, name: &str) -> Result<Vec<(u64, UsageFact)>> {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        let mut facts: HashMap<u64, UsageFact> = HashMap::new();
        let version_of = |k: &[u8]| {
            k.get(prefix.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
        };
        for (k, v) in self.store.scan(Tree::Usage, &prefix, b"", usize::MAX)? {
            if let Some(version) = version_of(&k) {
                facts.insert(version, crate::store::decode("usage fact", &v)?);
            }
        }
        let usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        for (k, fact) in &usage.waiting {
            if !k.starts_with(&prefix) {
                continue;
            }
            if let Some(version) = version_of(k) {
                let newer = facts.get(&version).is_none_or(|f| f.seq < fact.seq);
                if newer {
                    facts.insert(version, *fact);
                }
            }
        }
        let mut out: Vec<_> = facts.into_iter().collect();
        out.sort_unstable_by_key(|(v, _)| *v);
        Ok(out)
    }

    /// Up to `limit` durable records from `from` on: (sequence number, decoded record or why
    /// not).
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<(u64, Result<Stored, DecodeError>)>> {
        let raw = self
            .segments
            .read(from, limit, self.durable_head())
            .map_err(segment_error)?;
        Ok(raw
            .into_iter()
            .map(|(seq, r)| (seq, r.map_err(DecodeError).and_then(|b| decode(&b))))
            .collect())
    }

    /// Every durable record as stored, keyed by its sequence number (u64 BE), for a backup.
    /// A record that cannot be read fails the export (DATA_LOSS). Blocking.
    pub fn export(&self) -> Result<Vec<crate::store::Entry>> {
        let head = self.durable_head();
        let mut out = Vec::new();
        let mut next = self.oldest().max(1);
        while next <= head {
            let chunk = self
                .segments
                .read(next, CHUNK, head)
                .map_err(segment_error)?;
            let Some(last) = chunk.last().map(|(s, _)| *s) else {
                break;
            };
            for (seq, stored) in chunk {
                let stored = stored.map_err(|e| {
                    Error::DataLoss(format!("audit record {seq} cannot be read: {e}"))
                })?;
                out.push((super::record_key(seq).to_vec(), stored));
            }
            next = last + 1;
        }
        Ok(out)
    }

    /// Appends a checkpoint over the current head, signed in the HSM, unless nothing but a
    /// checkpoint was appended since the last one; then notes it in the store (the mark that
    /// start-up checks) with the applied mark. Returns its sequence number.
    pub async fn checkpoint(&self) -> Result<Option<u64>> {
        let (covers_seq, covers_hash) = {
            let chain = self.lock();
            if chain.seq == 0 || chain.seq == chain.last_checkpoint {
                return Ok(None);
            }
            (chain.seq, chain.hash)
        };
        let every = self.settings.checkpoint_every;
        let message = Checkpoint::message(covers_seq, &covers_hash, every);
        let (signer, label) = (self.signer.clone(), self.settings.key_label.clone());
        let mac = tokio::task::spawn_blocking(move || signer.mac(&label, &message))
            .await
            .map_err(|e| Error::Internal(format!("HSM task: {e}")))??;
        let mut rec = AuditRecord::system(
            CHECKPOINT_METHOD,
            self.clock.now_ms(),
            Event::Checkpoint(Checkpoint {
                covers_seq,
                covers_hash,
                every,
                key_label: self.settings.key_label.clone(),
                mac,
            }),
        );
        // Under the writer lock: no change record is between its record and its commit, so
        // every one up to here is resolved and the applied mark may move to the checkpoint.
        let _writer = self.writer.lock().await;
        self.append_record(&mut rec)?;
        self.durable(rec.seq).await?;
        let hash = rec.encode().1;
        let mut mark = rec.seq.to_be_bytes().to_vec();
        mark.extend_from_slice(&hash);
        let mut batch = Batch::new();
        batch.put(Tree::Meta, self.mark(CHECKPOINT_MARK), mark);
        if !self.reconcile_due.load(Ordering::Acquire) {
            batch.put(
                Tree::Meta,
                self.mark(APPLIED_MARK),
                rec.seq.to_be_bytes().to_vec(),
            );
        }
        self.store.commit(batch)?;
        self.store.sync().await?;
        tracing::debug!(seq = rec.seq, covers = covers_seq, "audit checkpoint");
        Ok(Some(rec.seq))
    }

    /// Deletes the segments whose records are all older than the retention period and come
    /// before a record a checkpoint signs, after appending a prune record that names the
    /// first one kept.
    pub async fn prune(&self) -> Result<PruneReport> {
        let retention = u64::try_from(self.settings.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = self.clock.now_ms().saturating_sub(retention);
        let oldest = self.oldest();
        let mut anchor = None;
        let mut calls_before = 0u64;
        let mut calls = 0u64;
        let mut next = oldest;
        'scan: loop {
            let chunk = self.read(next, CHUNK)?;
            let done = chunk.len() < CHUNK;
            for (seq, stored) in chunk {
                next = seq + 1;
                let Ok(Stored { record, .. }) = stored else {
                    // Never cut through what cannot be read: verification has to see it.
                    break 'scan;
                };
                if record.time_ms >= cutoff {
                    break 'scan;
                }
                match record.event {
                    Event::Checkpoint(c) if c.covers_seq > oldest && c.covers_seq < seq => {
                        anchor = Some(c.covers_seq);
                        calls_before = calls;
                    }
                    Event::Call | Event::Change => calls += 1,
                    _ => {}
                }
            }
            if done {
                break;
            }
        }
        // Whole segments only: the first kept is the one holding the signed record.
        let below = anchor
            .filter(|_| calls_before > 0)
            .map(|a| self.segments.segment_start(a))
            .filter(|b| *b > oldest);
        let Some(below) = below else {
            return Ok(PruneReport { deleted: 0, oldest });
        };
        let mut rec =
            AuditRecord::system(PRUNE_METHOD, self.clock.now_ms(), Event::Prune { below });
        self.append_record(&mut rec).map_err(audit_down)?;
        self.durable(rec.seq).await.map_err(audit_down)?;
        let kept = self.segments.remove_below(below).map_err(segment_error)?;
        self.oldest.store(kept, Ordering::SeqCst);
        let deleted = kept.saturating_sub(oldest);
        tracing::info!(deleted, oldest = kept, "audit log pruned");
        Ok(PruneReport {
            deleted,
            oldest: kept,
        })
    }

    /// Writes the usage facts taken since the last call, in one store commit (no sync of its
    /// own: facts are derived data and ride the next group commit). The server calls it with
    /// the API keys' usage counters, every `keys.usage_flush_seconds` and at shutdown.
    pub fn flush_usage(&self) -> Result<usize> {
        let waiting: Vec<(Vec<u8>, UsageFact)> = std::mem::take(
            &mut self
                .usage
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .waiting,
        )
        .into_iter()
        .collect();
        let mut written = 0;
        let mut rest = waiting.as_slice();
        while !rest.is_empty() {
            let (chunk, later) = rest.split_at(rest.len().min(USAGE_FLUSH_CHUNK));
            if let Err(e) = self.write_facts(chunk) {
                // Kept for the next flush (within the memory bound).
                let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
                for (k, f) in rest {
                    if usage.waiting.len() < USAGE_MEMORY {
                        usage.waiting.entry(k.clone()).or_insert(*f);
                    }
                }
                return Err(e);
            }
            written += chunk.len();
            rest = later;
        }
        Ok(written)
    }

    /// Writes `facts` in one transaction, each only if it is newer than the stored one (other
    /// nodes sharing the store write theirs too: the latest use wins), retrying when another
    /// node wrote one of them meanwhile.
    fn write_facts(&self, facts: &[(Vec<u8>, UsageFact)]) -> Result<()> {
        for _ in 0..USAGE_FLUSH_ATTEMPTS {
            let mut batch = Batch::new();
            for (key, fact) in facts {
                let raw = self.store.get(Tree::Usage, key)?;
                let stored = raw
                    .as_deref()
                    .and_then(|r| crate::store::decode::<UsageFact>("usage fact", r).ok());
                if stored.is_some_and(|s| s.last_used_ms >= fact.last_used_ms) {
                    continue;
                }
                batch.guard(Tree::Usage, key.clone(), raw);
                batch.put(Tree::Usage, key.clone(), crate::store::encode(fact));
            }
            match self.store.commit(batch) {
                Err(crate::store::StoreError::Conflict) => continue,
                other => return other.map_err(Into::into),
            }
        }
        Err(Error::Unavailable(
            "usage facts kept changing under this flush; retried at the next".into(),
        ))
    }

    /// Starts checkpointing (now, if the log ends in unsigned records, then as due) and
    /// pruning (every `prune_interval`). The tasks end once the log is
    /// dropped (checked between rounds).
    pub fn start_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let interval = self.settings.checkpoint_interval;
        tokio::spawn(async move {
            while let Some(log) = Weak::upgrade(&weak) {
                let pause = match log.checkpoint().await {
                    Ok(_) => interval,
                    Err(e) => {
                        tracing::warn!(error = %e, "audit checkpoint failed; will retry");
                        interval.min(CHECKPOINT_RETRY)
                    }
                };
                tokio::select! {
                    _ = log.checkpoint_due.notified() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        });
        let weak = Arc::downgrade(self);
        let every = self.settings.prune_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(log) = Weak::upgrade(&weak) else {
                    return;
                };
                if let Err(e) = log.prune().await {
                    tracing::warn!(error = %e, "audit pruning failed; will retry");
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Chain> {
        // Every critical section leaves the chain consistent (the head moves only after the
        // record was handed to the segments), so a poisoned lock is safe to keep using.
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the last-use facts of a successful read, to within [`USAGE_RESOLUTION_MS`], for
    /// the background writer: a fetch makes no store write of its own.
    fn note_usage(&self, rec: &AuditRecord) {
        if !USE_METHODS.contains(&rec.method.as_str()) {
            return;
        }
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        if usage.taken.len() > USAGE_MEMORY {
            usage.taken.clear();
        }
        for (i, (name, version)) in rec.targets.iter().enumerate() {
            if rec.target_code(i) != Code::Ok.as_i32() || *version == 0 {
                continue;
            }
            let key = version_key(name, *version);
            let due = usage.taken.get(&key).is_none_or(|t| {
                rec.time_ms >= t.saturating_add(USAGE_RESOLUTION_MS) || rec.time_ms < *t
            });
            if !due || usage.waiting.len() >= USAGE_MEMORY {
                continue;
            }
            usage.taken.insert(key.clone(), rec.time_ms);
            usage.waiting.insert(
                key,
                UsageFact {
                    last_used_ms: rec.time_ms,
                    seq: rec.seq,
                },
            );
        }
    }
}

/// The head found at the end of the files: (seq, hash, whether it is a checkpoint).
fn head_of(tail: &Tail) -> (u64, [u8; 32], bool) {
    let Some((seq, stored)) = &tail.last else {
        return (0, GENESIS, false);
    };
    match decode(stored) {
        Ok(Stored { record, hash, .. }) => {
            (*seq, hash, matches!(record.event, Event::Checkpoint(_)))
        }
        // Refusing to start would let anyone who can write the files stop the vault; chain on
        // from the hash the record carries, and leave it to verification to report it.
        Err(e) => {
            tracing::error!(seq, error = %e, "the audit log's last record does not decode; VerifyAuditLog will report it");
            (*seq, super::segments::stored_hash(stored), false)
        }
    }
}
