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
//!
//! Three more failure modes of sled 0.34, each reproduced here, are handled too:
//! - **A flush that never returns** (a wedged or full device): a flush slower than
//!   `flush_timeout` marks the store *stalled*; every later call fails fast with UNAVAILABLE and
//!   [`SledStore::stalled`] tells the server to exit so that a supervisor restarts it (sled
//!   cannot be reopened in-process while its stuck thread holds the file lock).
//! - **A nearly full disk**: commits are refused (UNAVAILABLE) while free space is below
//!   `min_free_bytes`, and succeed again as soon as space returns.
//! - **A damaged log is silently cut short**: on open, sled stops at the first corrupt or
//!   missing record and serves the prefix before it. So each flush first stores an increasing
//!   *flush mark* in sled and, once the flush is durable, writes the mark to a small file beside
//!   the database (not fsynced: after a power loss it may hold an older mark, which only weakens
//!   the check). A database whose mark is behind the file's has lost acknowledged writes: it is
//!   refused at open (exit 4), naming both numbers.
//!
//! The end-to-end tests drive the full-disk and wedged-flush paths by injection (`store/fault.rs`,
//! a test-only feature) as well as on a real full tmpfs.

use super::{Batch, Entry, Store, StoreError, Tree};
use crate::faults::Faults;
use futures::future::BoxFuture;
use sled::transaction::{abort, TransactionError};
use sled::Transactional;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How long recovery waits for calls still holding the failed engine before dropping it anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// First and largest pause between attempts to reopen the database.
const REOPEN_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// sled tree private to this file: the flush mark.
const MARK_TREE: &str = "__ward_store";
const MARK_KEY: &[u8] = b"flush_mark";
/// File beside the database holding the last flush mark known durable.
pub const MARK_FILE: &str = "ward-flush-mark";

/// sled's page cache unless configured: below sled's own default (1 GiB), so that a server with
/// a million secrets stays under 1 GiB resident (BENCHMARKS.md).
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// Tuning of the sled store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Commits are refused (UNAVAILABLE) while the file system has less free space than this.
    pub min_free_bytes: u64,
    /// A flush slower than this marks the store stalled.
    pub flush_timeout: Duration,
    /// Size of sled's page cache, in bytes: most of the server's resident memory once the
    /// store is larger than it.
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            min_free_bytes: 64 * 1024 * 1024,
            flush_timeout: Duration::from_secs(10),
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

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
    options: StoreOptions,
    /// Set once a flush overran its timeout: nothing can be made durable any more.
    stalled: watch::Sender<bool>,
    /// Commits hold it shared; a snapshot holds it exclusively, so it sees whole batches.
    gate: RwLock<()>,
    /// The last flush mark staged, and the file that records the last one known durable.
    marks: std::sync::Mutex<(u64, std::fs::File)>,
    /// The last free-space reading: see [`SledStore::check_writable`].
    free: FreeSpace,
    /// Faults the end-to-end tests inject (none unless built and started for it).
    faults: Faults,
}

/// Free space on the store's file system, read at most once per [`FREE_SPACE_TTL`] while far
/// above the minimum: a `statvfs` on every commit cost 2.5% of the server's CPU under a read
/// load, and the margin (`min_free_bytes`, 64 MiB by default) is far more than the writes of
/// one interval.
struct FreeSpace {
    /// Microseconds since `epoch` of the last reading (0: never read).
    read_at_us: AtomicU64,
    /// Bytes free at that reading.
    bytes: AtomicU64,
    epoch: std::time::Instant,
}

/// How long a free-space reading is trusted.
const FREE_SPACE_TTL: Duration = Duration::from_millis(20);

/// One open sled database and its trees.
struct Engine {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// The flush mark's tree.
    marks: sled::Tree,
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
        Self::open_with(path, StoreOptions::default())
    }

    /// [`open`](Self::open) with explicit options. Refuses a database that lost acknowledged
    /// writes (its flush mark is behind the one recorded beside it).
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let engine = Engine::open(path, 0, options.cache_bytes)?;
        let stored = engine.stored_mark()?;
        let mark_path = path.join(MARK_FILE);
        let mark_file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&mark_path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", mark_path.display())))?;
        let (done, _) = watch::channel((0, true));
        let (stalled, _) = watch::channel(false);
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
            options,
            stalled,
            gate: RwLock::new(()),
            marks: std::sync::Mutex::new((stored, mark_file)),
            free: FreeSpace {
                read_at_us: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                epoch: std::time::Instant::now(),
            },
            faults: Faults::from_env(),
        });
        tokio::spawn(flusher(shared.clone()));
        Ok(Self { shared })
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
        db.flush().map_err(engine_error)?;
        Ok(entries)
    }

    /// Resolves to `true` once the store has stalled (a flush overran its timeout); the
    /// server should then stop so that a supervisor restarts it.
    pub fn stalled(&self) -> watch::Receiver<bool> {
        self.shared.stalled.subscribe()
    }

    /// Refuses to write when the store has stalled or the disk is nearly full: a write that
    /// sled cannot complete wedges it for the life of the process.
    fn check_writable(&self) -> Result<(), StoreError> {
        if *self.shared.stalled.borrow() {
            return Err(StoreError::Unavailable(
                "the store stalled earlier (a flush never finished); restart the server".into(),
            ));
        }
        let min = self.shared.options.min_free_bytes;
        if min == 0 {
            return Ok(());
        }
        let free = self.shared.free_bytes(min)?;
        if free < min {
            return Err(StoreError::Unavailable(format!(
                "disk nearly full: {free} bytes free under {}, writes need {min} \
                 (limits.min_free_bytes)",
                self.shared.path.display()
            )));
        }
        Ok(())
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
    fn open(path: &Path, generation: u64, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(cache_bytes)
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
        let engine = Self {
            db,
            trees,
            marks,
            generation,
        };
        let stored = engine.stored_mark()?;
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
        Ok(engine)
    }

    /// The flush mark the database itself holds.
    fn stored_mark(&self) -> Result<u64, StoreError> {
        read_u64(&self.marks, MARK_KEY)
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        &self.trees[t.index()]
    }
}

impl Shared {
    /// Free bytes on the store's file system. A reading is reused for [`FREE_SPACE_TTL`] while
    /// it shows at least twice `min` free; near or below `min` every call reads afresh, so a
    /// refusal ends as soon as space returns.
    fn free_bytes(&self, min: u64) -> Result<u64, StoreError> {
        if let Some(injected) = self.faults.free_bytes() {
            return Ok(injected);
        }
        let f = &self.free;
        let now = (f.epoch.elapsed().as_micros() as u64).max(1);
        let at = f.read_at_us.load(Ordering::Acquire);
        let bytes = f.bytes.load(Ordering::Acquire);
        if at != 0
            && now.saturating_sub(at) < FREE_SPACE_TTL.as_micros() as u64
            && bytes >= min.saturating_mul(2)
        {
            return Ok(bytes);
        }
        let free = super::free_bytes(&self.path).map_err(StoreError::Unavailable)?;
        f.bytes.store(free, Ordering::Release);
        f.read_at_us.store(now, Ordering::Release);
        Ok(free)
    }

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
    engine_error(e)
}

fn engine_error(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    Ok(tree
        .get(key)
        .map_err(engine_error)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
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

/// Records `mark` as durable in the file beside the database (not fsynced; see the module doc).
fn record_mark(shared: &Shared, mark: u64) {
    let mut rec = mark.to_be_bytes().to_vec();
    rec.extend_from_slice(&crc32c::crc32c(&mark.to_be_bytes()).to_be_bytes());
    let m = shared.marks.lock().unwrap_or_else(PoisonError::into_inner);
    if let Err(e) = m.1.write_all_at(&rec, 0) {
        tracing::warn!(error = %e, "cannot record the flush mark");
    }
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
        let cache = shared.options.cache_bytes;
        let faults = shared.faults.clone();
        let reopen = move || match faults.write_error() {
            Some(e) => Err(engine_error(e)),
            None => Engine::open(&path, generation, cache),
        };
        match tokio::task::spawn_blocking(reopen).await {
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
            // Let the request tasks that are already runnable commit first, so that this flush
            // covers them too: larger groups, fewer flushes. No timer, so an idle server's lone
            // write is flushed at once.
            tokio::task::yield_now().await;
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
                    // The mark goes into the log before the flush: if it is durable, so is
                    // everything committed before it (sled recovers a prefix of its log).
                    let mark = {
                        let mut m = shared.marks.lock().unwrap_or_else(PoisonError::into_inner);
                        m.0 += 1;
                        m.0
                    };
                    if let Err(e) = engine.marks.insert(MARK_KEY, &mark.to_be_bytes()[..]) {
                        tracing::error!(error = %e, "cannot stage the flush mark");
                    }
                    let flushing = engine.clone();
                    // sled's flush blocks on fsync: keep it off the async workers, and bound it.
                    let faults = shared.faults.clone();
                    let flush = tokio::task::spawn_blocking(move || {
                        faults.hang_flush();
                        flushing.db.flush()
                    });
                    let timeout = shared.options.flush_timeout;
                    let Ok(flushed) = tokio::time::timeout(timeout, flush).await else {
                        tracing::error!(
                            ?timeout,
                            "flush did not finish in time: the storage has stalled (full disk \
                             or failing device?); failing every call from now on"
                        );
                        shared.stalled.send_replace(true);
                        group.done.send_replace((u64::MAX, false));
                        return;
                    };
                    match flushed {
                        Ok(Ok(_)) => {
                            record_mark(&shared, mark);
                            true
                        }
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
        self.check_writable()?;
        let _gate = self
            .shared
            .gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let engine = self.engine()?;
        if batch.generation.is_some_and(|g| g != engine.generation) {
            return Err(StoreError::Unavailable(
                "storage was reopened after a failure; retry".into(),
            ));
        }
        if let Some(e) = self.shared.faults.write_error() {
            return Err(self.failed(e));
        }
        // A lone unconditional write (an audit record of a read) needs no transaction.
        if let ([part], 0) = (&batch.parts[..], batch.guards().count()) {
            if let [(tree, key, Some(value))] = &part.writes[..] {
                engine
                    .tree(*tree)
                    .insert(key.as_slice(), value.as_slice())
                    .map_err(|e| self.failed(e))?;
                return Ok(());
            }
        }
        // Transact over the trees this batch touches only: sled locks and overlays every tree
        // in a transaction, so naming all of them would serialise unrelated writers.
        let mut used: Vec<Tree> = batch
            .guards()
            .chain(batch.writes())
            .map(|(t, _, _)| *t)
            .collect();
        used.sort_by_key(|t| t.index());
        used.dedup();
        let trees: Vec<sled::Tree> = used.iter().map(|t| engine.tree(*t).clone()).collect();
        let slot = |t: &Tree| used.iter().position(|u| u == t).unwrap_or(0);
        // Each sled 0.34 transaction costs two synchronous log-buffer writes (`pin_log`), which
        // is why the audit log merges concurrent batches into one.
        let result = trees[..].transaction(|txs| {
            for part in &batch.parts {
                // A transaction's reads see its own earlier writes: a part's guards are checked
                // against what the parts before it left.
                for (tree, key, expected) in &part.guards {
                    let current = txs[slot(tree)].get(key)?;
                    if current.as_deref() != expected.as_deref() {
                        return abort(());
                    }
                }
                for (tree, key, value) in &part.writes {
                    match value {
                        Some(v) => txs[slot(tree)].insert(key.as_slice(), v.as_slice())?,
                        None => txs[slot(tree)].remove(key.as_slice())?,
                    };
                }
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

    fn snapshot(&self) -> Result<super::Snapshot, StoreError> {
        let _gate = self
            .shared
            .gate
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let engine = self.engine()?;
        let mut trees = Vec::with_capacity(Tree::ALL.len());
        for t in Tree::ALL {
            let mut items = Vec::new();
            for item in engine.tree(t).iter() {
                let (k, v) = item.map_err(engine_error)?;
                items.push((k.to_vec(), v.to_vec()));
            }
            trees.push((t, items));
        }
        Ok(super::Snapshot { trees })
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

    #[tokio::test]
    async fn merged_parts_apply_in_order_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let part = |expected: Option<&[u8]>, value: &[u8], other: &[u8]| {
            let mut b = Batch::new();
            b.guard(Tree::Secrets, b"k".to_vec(), expected.map(<[u8]>::to_vec));
            b.put(Tree::Secrets, b"k".to_vec(), value.to_vec());
            b.put(Tree::Versions, other.to_vec(), value.to_vec());
            b
        };
        // The second part's guard sees the first part's write.
        let mut b = part(None, b"1", b"x1");
        b.merge(part(Some(b"1"), b"2", b"x2"));
        s.commit(b).unwrap();
        assert_eq!(
            s.get(Tree::Secrets, b"k").unwrap().as_deref(),
            Some(&b"2"[..])
        );
        // A later part guarding on what was there before the earlier part: nothing applies.
        let mut b = part(Some(b"2"), b"3", b"x3");
        b.merge(part(Some(b"2"), b"4", b"x4"));
        assert!(matches!(s.commit(b), Err(StoreError::Conflict)));
        assert_eq!(
            s.get(Tree::Secrets, b"k").unwrap().as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(s.get(Tree::Versions, b"x3").unwrap(), None);
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

    #[tokio::test]
    async fn restored_store_holds_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(&dir.path().join("a")).unwrap();
        for i in 0..50u64 {
            let mut b = Batch::new();
            b.put(
                Tree::Audit,
                i.to_be_bytes().to_vec(),
                i.to_be_bytes().to_vec(),
            );
            s.commit(b).unwrap();
        }
        s.sync().await.unwrap();
        let snap = s.snapshot().unwrap();
        let to = dir.path().join("b");
        assert_eq!(SledStore::restore_into(&to, &snap).unwrap(), 50);
        // Not over an existing database.
        assert!(SledStore::restore_into(&dir.path().join("a"), &snap).is_err());
        let r = SledStore::open(&to).unwrap();
        assert_eq!(r.scan(Tree::Audit, b"", b"", 1000).unwrap().len(), 50);
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
}
