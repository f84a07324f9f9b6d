//! sled 0.34 behind [`Store`], with group commit, a flush watchdog, a free-space guard and a
//! durable-prefix check.
//!
//! sled acknowledges a write before it is durable (its background flush runs every 500 ms and
//! a crash loses what it had not flushed; reproduced on these machines). So every caller
//! awaits [`Store::sync`] before replying, and one flusher task turns any number of waiting
//! callers into one fsync: a caller takes a ticket after its commit, and is released by the
//! first flush that *started* after its ticket was taken.
//!
//! Three failure modes of sled 0.34, each reproduced here, are handled in this file:
//! - **A full disk wedges sled**: a flush then waits forever for a write that never completes
//!   (no error is ever returned, and freeing space does not unwedge it). So commits are refused
//!   while free space is below `min_free_bytes` (UNAVAILABLE, and they succeed again as soon as
//!   space returns), and a flush that takes longer than `flush_timeout` marks the store
//!   *stalled*: every later call fails fast with UNAVAILABLE and [`SledStore::stalled`] tells
//!   the server to exit so that a supervisor restarts it (sled cannot be reopened in-process
//!   while its stuck thread holds the file lock).
//! - **A damaged log is silently cut short**: on open, sled stops at the first corrupt or
//!   missing record and serves the prefix before it, as if later acknowledged writes had never
//!   happened. So each flush first stores an increasing *flush mark* in sled and, once the
//!   flush is durable, writes the mark to a small file beside the database. On open, a
//!   database whose mark is behind the file's has lost acknowledged writes: the store refuses
//!   to open (exit 4), naming both numbers.
//! - **Checksum failures** found by sled on a read are reported as corruption (DATA_LOSS).

use super::{Batch, Entry, Store, StoreError, Tree};
use futures::future::BoxFuture;
use sled::transaction::{abort, TransactionError};
use sled::Transactional;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// sled tree private to this file: the flush mark.
const MARK_TREE: &str = "__ward_store";
const MARK_KEY: &[u8] = b"flush_mark";
const ID_OFFSET_KEY: &[u8] = b"id_offset";
/// File beside the database holding the last flush mark known durable.
pub const MARK_FILE: &str = "ward-flush-mark";

/// Tuning of the sled store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Commits are refused (UNAVAILABLE) while the file system has less free space than this.
    pub min_free_bytes: u64,
    /// A flush slower than this marks the store stalled.
    pub flush_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            min_free_bytes: 64 * 1024 * 1024,
            flush_timeout: Duration::from_secs(10),
        }
    }
}

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    group: Arc<GroupCommit>,
    path: PathBuf,
    min_free_bytes: u64,
    /// Commits hold it shared; a snapshot holds it exclusively, so it sees whole batches.
    gate: std::sync::RwLock<()>,
    /// Added to sled's id generator: a restored store continues above the ids of its source.
    id_offset: u64,
}

struct GroupCommit {
    /// Tickets handed out; a ticket is taken after the caller's commit.
    requested: AtomicU64,
    /// Wakes the flusher.
    wake: Notify,
    /// (highest ticket covered by the last finished flush, whether it succeeded).
    done: watch::Sender<(u64, bool)>,
    /// Set once a flush overran its timeout: nothing can be made durable any more.
    stalled: watch::Sender<bool>,
}

impl SledStore {
    /// Opens (creating if absent) the database at `path` with default options and starts the
    /// flusher task. Must be called inside a tokio runtime.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// [`open`](Self::open) with explicit options. Refuses a database that lost acknowledged
    /// writes (its flush mark is behind the one recorded beside it).
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| {
                let hint = if matches!(e, sled::Error::Corruption { .. }) {
                    " (the database is damaged: restore the data directory from a backup)"
                } else {
                    ""
                };
                StoreError::Unavailable(format!("cannot open {}: {e}{hint}", path.display()))
            })?;
        let trees = Tree::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(engine_error)?;
        let marks = db.open_tree(MARK_TREE).map_err(engine_error)?;
        let stored = marks
            .get(MARK_KEY)
            .map_err(engine_error)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let id_offset = marks
            .get(ID_OFFSET_KEY)
            .map_err(engine_error)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let mark_path = path.join(MARK_FILE);
        if let Some(durable) = read_mark_file(&mark_path) {
            if stored < durable {
                return Err(StoreError::Corrupt(format!(
                    "{} has lost acknowledged writes: it ends at flush {stored}, but flush \
                     {durable} had completed ({}). The database file was truncated or damaged; \
                     Ward will not serve from it. Restore the data directory from a backup",
                    path.display(),
                    mark_path.display()
                )));
            }
        }
        let mark_file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&mark_path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", mark_path.display())))?;
        let (done, _) = watch::channel((0, true));
        let (stalled, _) = watch::channel(false);
        let group = Arc::new(GroupCommit {
            requested: AtomicU64::new(0),
            wake: Notify::new(),
            done,
            stalled,
        });
        tokio::spawn(flusher(
            db.clone(),
            group.clone(),
            Marks {
                tree: marks,
                file: mark_file,
                next: stored,
            },
            options.flush_timeout,
        ));
        Ok(Self {
            db,
            trees,
            group,
            path: path.to_path_buf(),
            min_free_bytes: options.min_free_bytes,
            gate: std::sync::RwLock::new(()),
            id_offset,
        })
    }

    /// Creates a new database at `path` (which must not hold one) from a snapshot, durably.
    /// Blocking; no runtime needed.
    pub fn restore_into(path: &Path, snapshot: &super::Snapshot) -> Result<u64, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(engine_error)?;
        if db.tree_names().len() > 1 || !db.is_empty() {
            return Err(StoreError::Unavailable(format!(
                "{} already holds a database",
                path.display()
            )));
        }
        let mut entries = 0u64;
        for (tree, items) in &snapshot.trees {
            let t = db.open_tree(tree.name()).map_err(engine_error)?;
            for (k, v) in items {
                t.insert(k.as_slice(), v.as_slice()).map_err(engine_error)?;
                entries += 1;
            }
        }
        db.open_tree(MARK_TREE)
            .and_then(|m| m.insert(ID_OFFSET_KEY, &snapshot.next_id.to_be_bytes()[..]))
            .map_err(engine_error)?;
        db.flush().map_err(engine_error)?;
        Ok(entries)
    }

    /// Resolves to `true` once the store has stalled (a flush overran its timeout); the
    /// server should then stop so that a supervisor restarts it.
    pub fn stalled(&self) -> watch::Receiver<bool> {
        self.group.stalled.subscribe()
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        &self.trees[t.index()]
    }

    /// Refuses to write when the store has stalled or the disk is nearly full: a write that
    /// sled cannot complete wedges it for the life of the process.
    fn check_writable(&self) -> Result<(), StoreError> {
        if *self.group.stalled.borrow() {
            return Err(StoreError::Unavailable(
                "the store stalled earlier (a flush never finished); restart the server".into(),
            ));
        }
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        let st = nix::sys::statvfs::statvfs(&self.path).map_err(|e| {
            StoreError::Unavailable(format!("statvfs {}: {e}", self.path.display()))
        })?;
        let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
        if free < self.min_free_bytes {
            return Err(StoreError::Unavailable(format!(
                "disk nearly full: {free} bytes free under {}, writes need {} \
                 (limits.min_free_bytes)",
                self.path.display(),
                self.min_free_bytes
            )));
        }
        Ok(())
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Let the flusher see it is alone and exit, releasing sled (and its file lock).
        self.group.wake.notify_one();
    }
}

fn engine_error(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// The flush mark: kept in sled, and beside it once durable.
struct Marks {
    tree: sled::Tree,
    file: std::fs::File,
    next: u64,
}

/// Reads the mark file: 8 bytes big-endian mark, 4 bytes CRC32C of them. A missing file means
/// no check (a new or pre-mark database); an unreadable one is reported and skipped.
fn read_mark_file(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let parsed = (bytes.len() == 12)
        .then(|| {
            let (mark, crc) = bytes.split_at(8);
            (crc32c::crc32c(mark).to_be_bytes() == crc)
                .then(|| <[u8; 8]>::try_from(mark).ok().map(u64::from_be_bytes))
                .flatten()
        })
        .flatten();
    if parsed.is_none() && !bytes.is_empty() {
        tracing::warn!(file = %path.display(), "flush mark file is unreadable; not checking the database against it");
    }
    parsed
}

/// Flushes whenever tickets are waiting; each flush covers every ticket taken before it began.
async fn flusher(db: sled::Db, group: Arc<GroupCommit>, mut marks: Marks, timeout: Duration) {
    loop {
        group.wake.notified().await;
        loop {
            let target = group.requested.load(Ordering::SeqCst);
            if target <= group.done.borrow().0 {
                break;
            }
            // The mark goes into the log before the flush: if it is durable, so is everything
            // committed before it (sled recovers a prefix of its log).
            marks.next += 1;
            let mark = marks.next;
            let staged = marks.tree.insert(MARK_KEY, &mark.to_be_bytes()[..]);
            let db = db.clone();
            // sled's flush blocks on fsync: keep it off the async workers.
            let flush = tokio::task::spawn_blocking(move || db.flush());
            let ok = match tokio::time::timeout(timeout, flush).await {
                _ if staged.is_err() => {
                    tracing::error!(error = ?staged.err(), "cannot stage the flush mark");
                    false
                }
                Ok(Ok(Ok(_))) => true,
                Ok(Ok(Err(e))) => {
                    tracing::error!(error = %e, "flush failed");
                    false
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "flush task failed");
                    false
                }
                Err(_) => {
                    tracing::error!(
                        ?timeout,
                        "flush did not finish in time: the storage has stalled (full disk or \
                         failing device?); failing every call from now on"
                    );
                    group.stalled.send_replace(true);
                    group.done.send_replace((u64::MAX, false));
                    return;
                }
            };
            if ok {
                let mut rec = mark.to_be_bytes().to_vec();
                rec.extend_from_slice(&crc32c::crc32c(&mark.to_be_bytes()).to_be_bytes());
                // Not fsynced: after a power loss the file may hold an older mark, which only
                // weakens the check; it can never claim more than sled made durable.
                if let Err(e) = marks.file.write_all_at(&rec, 0) {
                    tracing::warn!(error = %e, "cannot record the flush mark");
                }
            }
            group.done.send_replace((target, ok));
            if !ok {
                break;
            }
        }
        if Arc::strong_count(&group) == 1 {
            return;
        }
    }
}

impl Store for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(tree)
            .get(key)
            .map_err(engine_error)?
            .map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let from = if start > prefix { start } else { prefix };
        let mut out = Vec::new();
        for item in self.tree(tree).range(from..) {
            let (k, v) = item.map_err(engine_error)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.check_writable()?;
        // A poisoned gate only means a snapshot panicked; the data is sled's, unaffected.
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        // A lone unconditional write (an audit record of a read) needs no transaction.
        if let ([], [(tree, key, Some(value))]) = (&batch.guards[..], &batch.writes[..]) {
            self.tree(*tree)
                .insert(key.as_slice(), value.as_slice())
                .map_err(engine_error)?;
            return Ok(());
        }
        let result = self.trees[..].transaction(|txs| {
            for (tree, key, expected) in &batch.guards {
                let current = txs[tree.index()].get(key)?;
                if current.as_deref() != expected.as_deref() {
                    return abort(());
                }
            }
            for (tree, key, value) in &batch.writes {
                match value {
                    Some(v) => txs[tree.index()].insert(key.as_slice(), v.as_slice())?,
                    None => txs[tree.index()].remove(key.as_slice())?,
                };
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => Err(StoreError::Conflict),
            Err(TransactionError::Storage(e)) => Err(engine_error(e)),
        }
    }

    fn sync(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut rx = self.group.done.subscribe();
            let ticket = self.group.requested.fetch_add(1, Ordering::SeqCst) + 1;
            self.group.wake.notify_one();
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
        Ok(self.db.generate_id().map_err(engine_error)? + self.id_offset)
    }

    fn snapshot(&self) -> Result<super::Snapshot, StoreError> {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut trees = Vec::with_capacity(Tree::ALL.len());
        for t in Tree::ALL {
            let mut items = Vec::new();
            for item in self.tree(t).iter() {
                let (k, v) = item.map_err(engine_error)?;
                items.push((k.to_vec(), v.to_vec()));
            }
            trees.push((t, items));
        }
        Ok(super::Snapshot {
            trees,
            next_id: self.next_id()?,
        })
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
    }

    #[tokio::test]
    async fn restored_store_holds_the_snapshot_and_continues_its_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(&dir.path().join("a")).unwrap();
        let mut used = 0;
        for i in 0..50u32 {
            used = s.next_id().unwrap();
            let mut b = Batch::new();
            b.put(
                Tree::Audit,
                used.to_be_bytes().to_vec(),
                i.to_be_bytes().to_vec(),
            );
            s.commit(b).unwrap();
        }
        s.sync().await.unwrap();
        let snap = s.snapshot().unwrap();
        assert!(snap.next_id > used);
        let to = dir.path().join("b");
        assert_eq!(SledStore::restore_into(&to, &snap).unwrap(), 50);
        // Not over an existing database.
        assert!(SledStore::restore_into(&dir.path().join("a"), &snap).is_err());
        let r = SledStore::open(&to).unwrap();
        assert_eq!(r.scan(Tree::Audit, b"", b"", 1000).unwrap().len(), 50);
        assert!(
            r.next_id().unwrap() > used,
            "ids would collide with restored records"
        );
    }

    #[tokio::test]
    async fn a_database_behind_its_flush_mark_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = SledStore::open(&path).unwrap();
            for i in 0..5u32 {
                let mut b = Batch::new();
                b.put(Tree::Secrets, i.to_be_bytes().to_vec(), vec![1]);
                s.commit(b).unwrap();
                s.sync().await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mark = std::fs::read(path.join(MARK_FILE)).unwrap();
        // The same database with a mark file from the future: acknowledged writes are missing.
        let mut ahead = 1000u64.to_be_bytes().to_vec();
        ahead.extend_from_slice(&crc32c::crc32c(&1000u64.to_be_bytes()).to_be_bytes());
        std::fs::write(path.join(MARK_FILE), &ahead).unwrap();
        let err = SledStore::open(&path).err().expect("refused");
        assert!(
            err.to_string().contains("lost acknowledged writes"),
            "{err}"
        );
        // Its own mark opens; an unreadable mark file is skipped with a warning.
        std::fs::write(path.join(MARK_FILE), &mark).unwrap();
        drop(SledStore::open(&path).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(path.join(MARK_FILE), b"junk").unwrap();
        assert!(SledStore::open(&path).is_ok());
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
}
