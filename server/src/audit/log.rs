//! [`AuditLog`]: owns the chain head, appends records, publishes the durable head to readers,
//! and runs checkpointing and retention in the background.

use super::{
    decode, key_seq, record_key, AuditRecord, Checkpoint, Event, Stored, CHECKPOINT_METHOD,
    GENESIS, PRUNE_METHOD, USE_METHODS,
};
use crate::clock::{Clock, Millis};
use crate::config::AuditSettings;
use crate::error::{Code, Error, Result};
use crate::store::{version_key, Batch, Store, StoreError, Tree};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use ward_hsm::MacSigner;

/// Records read per storage scan.
const CHUNK: usize = 512;
/// Usage facts are rewritten at most this often per secret version: a stale-key report counts
/// in days, and a hot secret would otherwise cost a second write on every fetch.
const USAGE_RESOLUTION_MS: u64 = 60_000;
/// Versions whose last usage write is remembered before the memory is cleared.
const USAGE_MEMORY: usize = 100_000;
/// Pause after a failed checkpoint before the next attempt.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(5);

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

/// The audit log. One per store; the vault and the Audit service share it.
pub struct AuditLog {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    signer: Arc<dyn MacSigner>,
    settings: AuditSettings,
    /// The chain head. Held across staging and the store commit, never across an await.
    chain: Mutex<Chain>,
    /// Highest sequence number known durable; readers follow it and never see a record that
    /// a crash could still take back.
    durable: watch::Sender<u64>,
    /// Poked when `checkpoint_every` records have accumulated.
    checkpoint_due: Notify,
    /// Lowest sequence number kept (0 while the log is empty).
    oldest: AtomicU64,
    /// When each version's usage fact was last written by this process.
    usage_written: Mutex<HashMap<Vec<u8>, Millis>>,
    /// Writes waiting to be committed; the caller that is [`Leader`] commits them together.
    waiting: Mutex<Vec<Arc<Mutex<Waiting>>>>,
    /// A caller is committing the queue.
    committing: std::sync::atomic::AtomicBool,
    /// Counts finished commit rounds: waiting callers wake to look for their outcome.
    rounds: watch::Sender<u64>,
}

/// The one caller committing the waiting writes. Dropped (also when its call is cancelled),
/// it lets the next caller lead and wakes the waiting ones.
struct Leader<'a>(&'a AuditLog);

impl<'a> Leader<'a> {
    fn elect(log: &'a AuditLog) -> Option<Self> {
        log.committing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then_some(Leader(log))
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.0.committing.store(false, Ordering::Release);
        self.0.rounds.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// A write waiting to be committed with its record, then its outcome.
struct Waiting {
    batch: Option<Batch>,
    rec: AuditRecord,
    outcome: Option<Result<(), StoreError>>,
}

struct Chain {
    /// Sequence number of the head (0: empty log).
    seq: u64,
    /// Hash of the head ([`GENESIS`] for an empty log).
    hash: [u8; 32],
    /// Store generation the head was read under.
    generation: u64,
    /// Sequence number of the newest checkpoint record (0: none since start-up).
    last_checkpoint: u64,
}

impl AuditLog {
    /// Opens the log over `store`, reading its head.
    pub fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        signer: Arc<dyn MacSigner>,
        settings: AuditSettings,
    ) -> Result<Arc<Self>> {
        let generation = store.generation();
        let (seq, hash, checkpoint) = read_head(&*store)?;
        let oldest = match store.scan(Tree::Audit, b"", b"", 1)?.first() {
            Some((k, _)) => key_seq(k).unwrap_or(0),
            None => 0,
        };
        let (durable, _) = watch::channel(seq);
        Ok(Arc::new(Self {
            store,
            clock,
            signer,
            settings,
            chain: Mutex::new(Chain {
                seq,
                hash,
                generation,
                last_checkpoint: if checkpoint { seq } else { 0 },
            }),
            durable,
            checkpoint_due: Notify::new(),
            oldest: AtomicU64::new(oldest),
            usage_written: Mutex::new(HashMap::new()),
            waiting: Mutex::new(Vec::new()),
            committing: std::sync::atomic::AtomicBool::new(false),
            rounds: watch::channel(0).0,
        }))
    }

    /// The settings in force.
    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// The store the log lives in.
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

    /// Stages `rec` as the next record and commits it with `batch`, atomically, under the
    /// chain lock: either both apply and the head advances, or neither does (a guard did not
    /// hold: [`StoreError::Conflict`]; `rec.seq` is then 0). Durable only after
    /// [`AuditLog::synced`].
    ///
    /// Concurrent writes are combined: each queues itself, and one caller at a time (the
    /// [`Leader`]) commits every queued write in one storage transaction (sled 0.34 pays two
    /// synchronous log writes per transaction, whatever its size). Parts apply in queue order
    /// with their own guards, exactly as one after another; if any guard fails, each is
    /// committed alone so that only that one fails.
    pub async fn commit(&self, batch: Batch, rec: &mut AuditRecord) -> Result<(), StoreError> {
        if batch.is_empty() {
            // A read's record: a lone insert, with no transaction to share.
            let mut chain = self.lock();
            self.refresh(&mut chain)?;
            return self.commit_locked(&mut chain, batch, rec);
        }
        let mine = Arc::new(Mutex::new(Waiting {
            batch: Some(batch),
            rec: rec.clone(),
            outcome: None,
        }));
        lock(&self.waiting).push(mine.clone());
        let mut rounds = self.rounds.subscribe();
        loop {
            let outcome = {
                let mut w = lock(&mine);
                let outcome = w.outcome.take();
                if outcome.is_some() {
                    std::mem::swap(rec, &mut w.rec);
                }
                outcome
            };
            if let Some(outcome) = outcome {
                return outcome;
            }
            if let Some(_leader) = Leader::elect(self) {
                // Let the writers that are already runnable queue up first: they share this
                // commit. No timer, so a lone write is committed at once.
                tokio::task::yield_now().await;
                let queued = std::mem::take(&mut *lock(&self.waiting));
                if !queued.is_empty() {
                    let mut chain = self.lock();
                    self.commit_queued(&mut chain, &queued);
                }
                continue;
            }
            // Another caller is committing the queue; its round may or may not include this
            // write (it may have taken the queue before this write joined it).
            if rounds.changed().await.is_err() {
                return Err(StoreError::Unavailable("audit log closed".into()));
            }
        }
    }

    /// Commits the queued writes, in order, as one transaction if their guards allow.
    fn commit_queued(&self, chain: &mut Chain, queued: &[Arc<Mutex<Waiting>>]) {
        let mut waiting: Vec<_> = queued.iter().map(|w| lock(w)).collect();
        if let Err(e) = self.refresh(chain) {
            for w in &mut waiting {
                w.outcome = Some(Err(e.clone()));
            }
            return;
        }
        if let [w] = &mut waiting[..] {
            let batch = w.batch.take().unwrap_or_default();
            w.outcome = Some(self.commit_locked(chain, batch, &mut w.rec));
            return;
        }
        let mut all = Batch::new();
        let (mut seq, mut hash) = (chain.seq, chain.hash);
        let mut hashes = Vec::with_capacity(waiting.len());
        for w in &mut waiting {
            let mut batch = w.batch.clone().unwrap_or_default();
            hash = stage(&mut batch, &mut w.rec, seq, hash, chain.generation);
            seq = w.rec.seq;
            hashes.push(hash);
            all.merge(batch);
        }
        all.require_generation(chain.generation);
        match self.store.commit(all) {
            Ok(()) => {
                for (w, hash) in waiting.iter_mut().zip(hashes) {
                    self.advance(chain, &w.rec, hash);
                    w.outcome = Some(Ok(()));
                }
            }
            Err(StoreError::Conflict) => {
                for w in &mut waiting {
                    let batch = w.batch.take().unwrap_or_default();
                    w.outcome = Some(self.commit_locked(chain, batch, &mut w.rec));
                }
            }
            Err(e) => {
                for w in &mut waiting {
                    w.rec.seq = 0;
                    w.outcome = Some(Err(e.clone()));
                }
            }
        }
    }

    /// Waits until `rec` (committed by [`AuditLog::commit`]) is durable, then lets readers see
    /// it. Fails if the store was reopened since the commit, which may have lost it.
    pub async fn synced(&self, rec: &AuditRecord) -> Result<(), StoreError> {
        self.store.sync().await?;
        if self.store.generation() != rec.generation {
            return Err(StoreError::Unavailable(
                "storage was reopened before the write was confirmed durable".into(),
            ));
        }
        self.durable.send_if_modified(|d| {
            let newer = rec.seq > *d;
            if newer {
                *d = rec.seq;
            }
            newer
        });
        Ok(())
    }

    /// Writes `rec` on its own (a read or a refusal) and waits until it is durable, recording
    /// the usage facts of a successful read in the same fsync. Any failure is UNAVAILABLE: the
    /// caller must then release nothing.
    pub async fn append(&self, mut rec: AuditRecord) -> Result<()> {
        let started = std::time::Instant::now();
        self.commit(Batch::new(), &mut rec)
            .await
            .map_err(audit_down)?;
        self.record_usage(&rec);
        let result = self.synced(&rec).await.map_err(audit_down);
        crate::metrics::global().observe_audit_write(started.elapsed());
        result
    }

    /// The last use of each version of `name` (version → fact), from the usage facts.
    pub fn usage(&self, name: &str) -> Result<Vec<(u64, UsageFact)>> {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for (k, v) in self.store.scan(Tree::Usage, &prefix, b"", usize::MAX)? {
            let Some(version) = k
                .get(prefix.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            out.push((version, crate::store::decode("usage fact", &v)?));
        }
        Ok(out)
    }

    /// Up to `limit` durable records from `from` on, as stored: (sequence number from the key,
    /// decoded record or why not).
    pub fn read(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Result<Stored, super::DecodeError>)>> {
        let head = self.durable_head();
        let mut out = Vec::new();
        for (k, v) in self
            .store
            .scan(Tree::Audit, b"", &record_key(from), limit)?
        {
            let Some(seq) = key_seq(&k) else { continue };
            if seq > head {
                break;
            }
            out.push((seq, decode(&v)));
        }
        Ok(out)
    }

    /// Appends a checkpoint over the current head, signed in the HSM, unless nothing but a
    /// checkpoint was appended since the last one. Returns its sequence number.
    pub async fn checkpoint(&self) -> Result<Option<u64>> {
        let (covers_seq, covers_hash, generation) = {
            let mut chain = self.lock();
            self.refresh(&mut chain)?;
            if chain.seq == 0 || chain.seq == chain.last_checkpoint {
                return Ok(None);
            }
            (chain.seq, chain.hash, chain.generation)
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
        {
            let mut chain = self.lock();
            self.refresh(&mut chain)?;
            if chain.generation != generation || chain.seq < covers_seq {
                // The store was reopened and may have lost the record just signed.
                return Err(Error::Unavailable(
                    "storage was reopened; checkpoint dropped".into(),
                ));
            }
            self.commit_locked(&mut chain, Batch::new(), &mut rec)?;
        }
        self.synced(&rec).await?;
        tracing::debug!(seq = rec.seq, covers = covers_seq, "audit checkpoint");
        Ok(Some(rec.seq))
    }

    /// Deletes the records that are older than the retention period, down to one a checkpoint
    /// signs, after appending a prune record that names the first one kept.
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
                    Event::Call => calls += 1,
                    _ => {}
                }
            }
            if done {
                break;
            }
        }
        // Only system records to drop: not worth a prune record (which would itself age out).
        let Some(below) = anchor.filter(|_| calls_before > 0) else {
            return Ok(PruneReport { deleted: 0, oldest });
        };
        let mut rec =
            AuditRecord::system(PRUNE_METHOD, self.clock.now_ms(), Event::Prune { below });
        self.commit(Batch::new(), &mut rec)
            .await
            .map_err(audit_down)?;
        self.synced(&rec).await.map_err(audit_down)?;
        let mut deleted = 0;
        loop {
            let keys: Vec<Vec<u8>> = self
                .store
                .scan(Tree::Audit, b"", b"", CHUNK)?
                .into_iter()
                .map(|(k, _)| k)
                .take_while(|k| key_seq(k).is_some_and(|s| s < below))
                .collect();
            if keys.is_empty() {
                break;
            }
            let mut batch = Batch::new();
            deleted += keys.len() as u64;
            for k in keys {
                batch.remove(Tree::Audit, k);
            }
            self.store.commit(batch)?;
        }
        self.store.sync().await?;
        self.oldest.store(below, Ordering::SeqCst);
        tracing::info!(deleted, oldest = below, "audit log pruned");
        Ok(PruneReport {
            deleted,
            oldest: below,
        })
    }

    /// Starts checkpointing (now, if the log ends in unsigned records, then as due) and
    /// pruning (every `prune_interval`). The tasks end once the log is dropped (checked between
    /// rounds).
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
        // Every critical section leaves the chain consistent (the head moves only after a
        // successful commit), so a poisoned lock is safe to keep using.
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Re-reads the head if the store was reopened (it may have lost unflushed records).
    fn refresh(&self, chain: &mut Chain) -> Result<(), StoreError> {
        let generation = self.store.generation();
        if generation == chain.generation {
            return Ok(());
        }
        let (seq, hash, checkpoint) = read_head(&*self.store).map_err(|e| match e {
            Error::Unavailable(m) => StoreError::Unavailable(m),
            other => StoreError::Unavailable(other.to_string()),
        })?;
        tracing::warn!(
            seq,
            "audit chain head reloaded after the store was reopened"
        );
        *chain = Chain {
            seq,
            hash,
            generation,
            last_checkpoint: if checkpoint {
                seq
            } else {
                chain.last_checkpoint.min(seq)
            },
        };
        Ok(())
    }

    fn commit_locked(
        &self,
        chain: &mut Chain,
        mut batch: Batch,
        rec: &mut AuditRecord,
    ) -> Result<(), StoreError> {
        let hash = stage(&mut batch, rec, chain.seq, chain.hash, chain.generation);
        batch.require_generation(chain.generation);
        if let Err(e) = self.store.commit(batch) {
            // Not in the log: the caller must not take this number for its record.
            rec.seq = 0;
            return Err(e);
        }
        self.advance(chain, rec, hash);
        Ok(())
    }

    /// Moves the head to `rec`, just committed, whose hash is `hash`.
    fn advance(&self, chain: &mut Chain, rec: &AuditRecord, hash: [u8; 32]) {
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
    }

    /// Sets the last-use facts of a successful read, to within [`USAGE_RESOLUTION_MS`].
    /// Derived data: written beside the record (same fsync, no transaction, so no global lock
    /// on the fetch path); if it fails the record still stands and the fact lags.
    fn record_usage(&self, rec: &AuditRecord) {
        if !USE_METHODS.contains(&rec.method.as_str()) {
            return;
        }
        let fact = crate::store::encode(&UsageFact {
            last_used_ms: rec.time_ms,
            seq: rec.seq,
        });
        let due: Vec<Vec<u8>> = {
            let mut written = self
                .usage_written
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if written.len() > USAGE_MEMORY {
                written.clear();
            }
            rec.targets
                .iter()
                .enumerate()
                .filter(|(i, (_, version))| {
                    rec.target_code(*i) == Code::Ok.as_i32() && *version != 0
                })
                .map(|(_, (name, version))| version_key(name, *version))
                .filter(|key| {
                    let last = written.get(key).copied();
                    let due = last.is_none_or(|t| {
                        rec.time_ms >= t.saturating_add(USAGE_RESOLUTION_MS) || rec.time_ms < t
                    });
                    if due {
                        written.insert(key.clone(), rec.time_ms);
                    }
                    due
                })
                .collect()
        };
        for key in due {
            let mut batch = Batch::new();
            batch.put(Tree::Usage, key, fact.clone());
            if let Err(e) = self.store.commit(batch) {
                tracing::warn!(error = %e, "usage fact not recorded");
            }
        }
    }
}

/// Makes `rec` the record after (`seq`, `hash`) and adds it to `batch`; returns its hash.
fn stage(
    batch: &mut Batch,
    rec: &mut AuditRecord,
    seq: u64,
    hash: [u8; 32],
    generation: u64,
) -> [u8; 32] {
    rec.seq = seq + 1;
    rec.prev_hash = hash;
    rec.generation = generation;
    rec.bound_input();
    let (stored, hash) = rec.encode();
    batch.put(Tree::Audit, record_key(rec.seq).to_vec(), stored);
    hash
}

/// Locks `m`, poisoned or not: every critical section here leaves its data whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The head of the stored chain: (seq, hash, whether it is a checkpoint).
fn read_head(store: &dyn Store) -> Result<(u64, [u8; 32], bool)> {
    let Some((key, value)) = store.last(Tree::Audit)? else {
        return Ok((0, GENESIS, false));
    };
    let seq = key_seq(&key).ok_or_else(|| {
        Error::DataLoss("the audit log's last key is not a sequence number".into())
    })?;
    match decode(&value) {
        Ok(Stored { record, hash, .. }) => {
            Ok((seq, hash, matches!(record.event, Event::Checkpoint(_))))
        }
        // Refusing to start would let anyone who can write the database stop the vault; chain
        // on instead, and leave it to verification to report the record.
        Err(e) => {
            tracing::error!(seq, error = %e, "the audit log's last record does not decode; VerifyAuditLog will report it");
            Ok((seq, GENESIS, false))
        }
    }
}

fn audit_down(e: impl std::fmt::Display) -> Error {
    tracing::error!(error = %e, "audit log write failed; failing the call closed");
    Error::Unavailable("audit log unavailable".into())
}
