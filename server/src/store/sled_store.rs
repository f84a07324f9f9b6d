//! sled 0.34 behind [`Store`], with group commit and recovery from storage failures.
//!
//! sled acknowledges a write before it is durable (its background flush runs every 500 ms and
//! a crash loses what it had not flushed; reproduced on these machines). So every caller
//! awaits [`Store::sync`] before replying, and one flusher task turns any number of waiting
//! callers into one fsync: a caller takes a ticket after its commit, and is released by the
//! first flush that *started* after its ticket was taken.
//!
//! sled 0.34 turns its first I/O error (ENOSPC, EIO, EROFS) into a process-wide "global error":
//! every later write and flush of that `Db` fails, even after space returns (reproduced here on
//! a full tmpfs). So the first storage error takes the engine out of service — calls fail
//! UNAVAILABLE at once — and a recovery task drops it, waits for its file lock to go, and opens
//! the database again, retrying with backoff until that works. Reopening loses what had been
//! committed but not flushed; those commits were never acknowledged, because their syncs failed
//! or [`Store::generation`] changed under them.

use super::{Batch, Entry, Store, StoreError, Tree};
use futures::future::BoxFuture;
use sled::transaction::{abort, TransactionError};
use sled::Transactional;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How long recovery waits for calls still holding the failed engine before dropping it anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// First and largest pause between attempts to reopen the database.
const REOPEN_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// The sled-backed store.
pub struct SledStore {
    shared: Arc<Shared>,
}

/// State shared by the store, its flusher task and its recovery task.
struct Shared {
    path: PathBuf,
    /// The open database; `None` while recovering from a failure.
    engine: RwLock<Option<Arc<Engine>>>,
    /// Bumped each time the database is reopened.
    generation: AtomicU64,
    /// A recovery task is running.
    recovering: AtomicBool,
    /// The store was dropped: background tasks end.
    closed: AtomicBool,
    runtime: tokio::runtime::Handle,
    group: GroupCommit,
}

/// One open sled database and its trees.
struct Engine {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// [`Store::generation`] this engine serves.
    generation: u64,
}

struct GroupCommit {
    /// Tickets handed out; a ticket is taken after the caller's commit.
    requested: AtomicU64,
    /// Wakes the flusher.
    wake: Notify,
    /// (highest ticket covered by the last finished flush, whether it succeeded).
    done: watch::Sender<(u64, bool)>,
}

impl SledStore {
    /// Opens (creating if absent) the database at `path` and starts the flusher task. Must be
    /// called inside a tokio runtime.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let engine = Engine::open(path, 0)?;
        let (done, _) = watch::channel((0, true));
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            engine: RwLock::new(Some(Arc::new(engine))),
            generation: AtomicU64::new(0),
            recovering: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
            group: GroupCommit {
                requested: AtomicU64::new(0),
                wake: Notify::new(),
                done,
            },
        });
        tokio::spawn(flusher(shared.clone()));
        Ok(Self { shared })
    }

    /// The engine in service, or UNAVAILABLE while recovering.
    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.shared.engine()
    }

    /// Turns a sled error into UNAVAILABLE and starts recovery.
    fn failed(&self, e: sled::Error) -> StoreError {
        self.shared.failed(&e);
        unavailable(e)
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.group.wake.notify_one();
    }
}

impl Engine {
    fn open(path: &Path, generation: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let trees = Tree::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        Ok(Self {
            db,
            trees,
            generation,
        })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        &self.trees[t.index()]
    }
}

impl Shared {
    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.engine
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::Unavailable("storage is recovering from a failure".into()))
    }

    /// Takes the engine out of service and starts the recovery task, once.
    fn failed(self: &Arc<Self>, e: &sled::Error) {
        if self.recovering.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!(error = %e, path = %self.path.display(), "storage failed; reopening the database");
        let old = self
            .engine
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.runtime.spawn(recover(self.clone(), old));
    }
}

fn unavailable(e: sled::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Drops the failed engine once no call holds it, then reopens the database until it opens.
async fn recover(shared: Arc<Shared>, old: Option<Arc<Engine>>) {
    if let Some(old) = old {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while Arc::strong_count(&old) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Dropping a sled Db flushes (and fails, quickly): keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
    }
    let mut pause = REOPEN_BACKOFF.0;
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(pause).await;
        let path = shared.path.clone();
        let generation = shared.generation.load(Ordering::SeqCst) + 1;
        match tokio::task::spawn_blocking(move || Engine::open(&path, generation)).await {
            Ok(Ok(engine)) => {
                // The generation moves before the new engine serves anything: a caller that
                // reads the old number after this sees no engine or a refusing one.
                shared.generation.store(generation, Ordering::SeqCst);
                *shared
                    .engine
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(engine));
                shared.recovering.store(false, Ordering::SeqCst);
                tracing::warn!(generation, path = %shared.path.display(), "storage reopened after a failure");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "storage still unavailable; retrying");
            }
            Err(e) => tracing::warn!(error = %e, "reopen task failed; retrying"),
        }
        pause = (pause * 2).min(REOPEN_BACKOFF.1);
    }
}

/// Flushes whenever tickets are waiting; each flush covers every ticket taken before it began.
async fn flusher(shared: Arc<Shared>) {
    let group = &shared.group;
    loop {
        group.wake.notified().await;
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        loop {
            let target = group.requested.load(Ordering::SeqCst);
            if target <= group.done.borrow().0 {
                break;
            }
            let ok = match shared.engine() {
                Err(e) => {
                    tracing::warn!(error = %e, "flush refused");
                    false
                }
                Ok(engine) => {
                    let flushing = engine.clone();
                    // sled's flush blocks on fsync: keep it off the async workers.
                    match tokio::task::spawn_blocking(move || flushing.db.flush()).await {
                        Ok(Ok(_)) => true,
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "flush failed");
                            drop(engine);
                            shared.failed(&e);
                            false
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "flush task failed");
                            false
                        }
                    }
                }
            };
            group.done.send_replace((target, ok));
            if !ok {
                break;
            }
        }
    }
}

impl Store for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let engine = self.engine()?;
        let value = engine.tree(tree).get(key).map_err(|e| self.failed(e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let engine = self.engine()?;
        let from = if start > prefix { start } else { prefix };
        let mut out = Vec::new();
        for item in engine.tree(tree).range(from..) {
            let (k, v) = item.map_err(|e| self.failed(e))?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError> {
        let engine = self.engine()?;
        let last = engine.tree(tree).last().map_err(|e| self.failed(e))?;
        Ok(last.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let engine = self.engine()?;
        if batch.generation.is_some_and(|g| g != engine.generation) {
            return Err(StoreError::Unavailable(
                "storage was reopened after a failure; retry".into(),
            ));
        }
        // A lone unconditional write (an audit record of a read) needs no transaction.
        if let ([], [(tree, key, Some(value))]) = (&batch.guards[..], &batch.writes[..]) {
            engine
                .tree(*tree)
                .insert(key.as_slice(), value.as_slice())
                .map_err(|e| self.failed(e))?;
            return Ok(());
        }
        // Transact over the trees this batch touches only: sled locks and overlays every tree
        // in a transaction, so naming all of them would serialise unrelated writers.
        let mut used: Vec<Tree> = batch
            .guards
            .iter()
            .chain(&batch.writes)
            .map(|(t, _, _)| *t)
            .collect();
        used.sort_by_key(|t| t.index());
        used.dedup();
        let trees: Vec<sled::Tree> = used.iter().map(|t| engine.tree(*t).clone()).collect();
        let slot = |t: &Tree| used.iter().position(|u| u == t).unwrap_or(0);
        let result = trees[..].transaction(|txs| {
            for (tree, key, expected) in &batch.guards {
                let current = txs[slot(tree)].get(key)?;
                if current.as_deref() != expected.as_deref() {
                    return abort(());
                }
            }
            for (tree, key, value) in &batch.writes {
                match value {
                    Some(v) => txs[slot(tree)].insert(key.as_slice(), v.as_slice())?,
                    None => txs[slot(tree)].remove(key.as_slice())?,
                };
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => Err(StoreError::Conflict),
            Err(TransactionError::Storage(e)) => Err(self.failed(e)),
        }
    }

    fn sync(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let group = &self.shared.group;
            let mut rx = group.done.subscribe();
            let ticket = group.requested.fetch_add(1, Ordering::SeqCst) + 1;
            group.wake.notify_one();
            loop {
                let (upto, ok) = *rx.borrow_and_update();
                if upto >= ticket {
                    return if ok {
                        Ok(())
                    } else {
                        Err(StoreError::Unavailable("flush to disk failed".into()))
                    };
                }
                if rx.changed().await.is_err() {
                    return Err(StoreError::Unavailable("flusher stopped".into()));
                }
            }
        })
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        let engine = self.engine()?;
        engine.db.generate_id().map_err(|e| self.failed(e))
    }

    fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guarded_batches_and_sync() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.guard(Tree::Secrets, b"a".to_vec(), None);
        b.put(Tree::Secrets, b"a".to_vec(), b"1".to_vec());
        b.put(Tree::Versions, b"a\0x".to_vec(), b"v".to_vec());
        s.commit(b).unwrap();
        s.sync().await.unwrap();
        assert_eq!(
            s.get(Tree::Secrets, b"a").unwrap().as_deref(),
            Some(&b"1"[..])
        );

        // A stale guard aborts the whole batch.
        let mut b = Batch::new();
        b.guard(Tree::Secrets, b"a".to_vec(), None);
        b.put(Tree::Versions, b"b".to_vec(), b"v".to_vec());
        assert!(matches!(s.commit(b), Err(StoreError::Conflict)));
        assert_eq!(s.get(Tree::Versions, b"b").unwrap(), None);

        assert_eq!(s.last(Tree::Usage).unwrap(), None);
        assert_eq!(
            s.last(Tree::Versions).unwrap(),
            Some((b"a\0x".to_vec(), b"v".to_vec()))
        );
        assert_eq!(s.generation(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_syncs_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut b = Batch::new();
                b.put(Tree::Audit, i.to_be_bytes().to_vec(), vec![1]);
                s.commit(b).unwrap();
                s.sync().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.scan(Tree::Audit, b"", b"", 1000).unwrap().len(), 64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopens_after_a_failure_and_keeps_what_was_synced() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.put(Tree::Meta, b"kept".to_vec(), b"1".to_vec());
        s.commit(b).unwrap();
        s.sync().await.unwrap();

        // What a poisoned engine does: report its error. (A full disk is exercised end to end.)
        s.failed(sled::Error::Unsupported("simulated failure".into()));
        assert!(matches!(
            s.get(Tree::Meta, b"kept"),
            Err(StoreError::Unavailable(_))
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while s.generation() == 0 {
            assert!(std::time::Instant::now() < deadline, "never reopened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            s.get(Tree::Meta, b"kept").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        let mut b = Batch::new();
        b.put(Tree::Meta, b"after".to_vec(), b"2".to_vec());
        s.commit(b).unwrap();
        s.sync().await.unwrap();
    }
}
