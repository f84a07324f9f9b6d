//! sled 0.34 behind [`Store`], with group commit.
//!
//! sled acknowledges a write before it is durable (its background flush runs every 500 ms and
//! a crash loses what it had not flushed; reproduced on these machines). So every caller
//! awaits [`Store::sync`] before replying, and one flusher task turns any number of waiting
//! callers into one fsync: a caller takes a ticket after its commit, and is released by the
//! first flush that *started* after its ticket was taken.

use super::{Batch, Entry, Store, StoreError, Tree};
use futures::future::BoxFuture;
use sled::transaction::{abort, TransactionError};
use sled::Transactional;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{watch, Notify};

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    group: Arc<GroupCommit>,
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
        let (done, _) = watch::channel((0, true));
        let group = Arc::new(GroupCommit {
            requested: AtomicU64::new(0),
            wake: Notify::new(),
            done,
        });
        tokio::spawn(flusher(db.clone(), group.clone()));
        Ok(Self { db, trees, group })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        &self.trees[t.index()]
    }
}

fn unavailable(e: sled::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Flushes whenever tickets are waiting; each flush covers every ticket taken before it began.
async fn flusher(db: sled::Db, group: Arc<GroupCommit>) {
    loop {
        group.wake.notified().await;
        loop {
            let target = group.requested.load(Ordering::SeqCst);
            if target <= group.done.borrow().0 {
                break;
            }
            let db = db.clone();
            // sled's flush blocks on fsync: keep it off the async workers.
            let ok = match tokio::task::spawn_blocking(move || db.flush()).await {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "flush failed");
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "flush task failed");
                    false
                }
            };
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
            .map_err(unavailable)?
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
            let (k, v) = item.map_err(unavailable)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        // A lone unconditional write (an audit record of a read) needs no transaction.
        if let ([], [(tree, key, Some(value))]) = (&batch.guards[..], &batch.writes[..]) {
            self.tree(*tree)
                .insert(key.as_slice(), value.as_slice())
                .map_err(unavailable)?;
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
        let trees: Vec<sled::Tree> = used.iter().map(|t| self.tree(*t).clone()).collect();
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
            Err(TransactionError::Storage(e)) => Err(unavailable(e)),
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
        self.db.generate_id().map_err(unavailable)
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
