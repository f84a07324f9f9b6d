//! The in-memory key directory: every API key's keyed hash → (secret, version), and every
//! API_KEY secret's record, so a verification makes no store read and no decryption.
//!
//! Coherence is the point. A revoked or rotated-out key must be refused on the very next call,
//! whoever wrote the change (IssueKey here, RotateSecret or RevokeSecret elsewhere). So the
//! directory is not updated by the write paths one by one: it is kept by [`DirectoryStore`], a
//! decorator around the store through which *every* commit passes. After a batch that touches
//! the secrets or key-index trees commits, and before `commit` returns (so before the writer
//! can reply), the decorator re-reads those keys from the store and replaces the directory's
//! entries. Refreshes and cache fills run under one mutex and read the store inside it, so the
//! last refresh always reads a value at least as new as every commit before it: two racing
//! writers cannot leave an older record in the cache.
//!
//! The directory holds the records, not a verdict: the verifier judges each version's state
//! from the record at call time ([`crate::model::VersionMeta::is_usable_at`]), so deadlines
//! such as a grace window closing need no write at all.
//!
//! Because the index is complete (loaded in full at start-up, then kept by every commit), a
//! miss is a definitive NOT_FOUND at the cost of one hash-map probe: the index is its own
//! negative cache, and unknown keys never reach the store.
//!
//! Records are authenticated below this layer (`store::sealed`): a record or index entry that
//! fails its MAC at start-up is left out of the maps and logged, not fatal, so that the rest is
//! served; reading it answers DATA_LOSS naming it (a tampered index entry is remembered as
//! such, so its key verifies as DATA_LOSS rather than as unknown).
//!
//! Memory: one entry per issued key version (32-byte hash, name, version) plus one decoded
//! record per API_KEY secret — about 200 bytes per key, 200 MB for a million keys.

use crate::error::{Error, Result};
use crate::model::{KeyIndexEntry, Kind, SecretRecord};
use crate::store::{
    decode, scan_all, scan_all_checked, Batch, CheckedEntry, Entry, Store, StoreError, Tree,
};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// Where a key's hash points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    /// Secret holding the key.
    pub name: Arc<str>,
    /// Version holding the key.
    pub version: u64,
}

/// The in-memory index and record cache of API keys.
#[derive(Default)]
pub struct KeyDirectory {
    index: RwLock<HashMap<[u8; 32], KeyRef>>,
    records: RwLock<HashMap<Arc<str>, Arc<SecretRecord>>>,
    /// Index entries that failed their integrity check, and why (DATA_LOSS on lookup).
    tampered: RwLock<HashMap<[u8; 32], String>>,
    /// Serializes every store read that fills the maps (see the module doc).
    fill: Mutex<()>,
}

impl KeyDirectory {
    /// Loads the whole key index and every API_KEY record from the store.
    pub fn load(store: &dyn Store) -> Result<Self> {
        let dir = Self::default();
        {
            let mut index = write(&dir.index);
            for (hash, raw) in scan_all_checked(store, Tree::KeyIndex)? {
                let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                    tracing::warn!("key index entry with a malformed hash skipped");
                    continue;
                };
                let e = match raw
                    .map_err(Error::from)
                    .and_then(|raw| decode::<KeyIndexEntry>("key index entry", &raw))
                {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, "key index entry left out");
                        write(&dir.tampered).insert(hash, e.to_string());
                        continue;
                    }
                };
                index.insert(
                    hash,
                    KeyRef {
                        name: e.name.into(),
                        version: e.version,
                    },
                );
            }
        }
        {
            let mut records = write(&dir.records);
            for (_, raw) in scan_all_checked(store, Tree::Secrets)? {
                // A bad record is read again (and refused) when a verification needs it.
                let r = match raw
                    .map_err(Error::from)
                    .and_then(|raw| decode::<SecretRecord>("secret", &raw))
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "secret record left out of the key directory");
                        continue;
                    }
                };
                if r.kind == Kind::ApiKey {
                    records.insert(r.name.as_str().into(), Arc::new(r));
                }
            }
        }
        Ok(dir)
    }

    /// The key a hash points to, if any; DATA_LOSS if its index entry failed its integrity
    /// check. No store access.
    pub fn lookup(&self, hash: &[u8; 32]) -> Result<Option<KeyRef>> {
        if let Some(r) = read(&self.index).get(hash) {
            return Ok(Some(r.clone()));
        }
        match read(&self.tampered).get(hash) {
            Some(why) => Err(Error::DataLoss(why.clone())),
            None => Ok(None),
        }
    }

    /// The current record of an API_KEY secret. Served from memory; a secret missing from the
    /// cache (only after a failed refresh) is read from the store under the fill lock.
    pub fn record(&self, store: &dyn Store, name: &str) -> Result<Option<Arc<SecretRecord>>> {
        if let Some(r) = read(&self.records).get(name) {
            return Ok(Some(r.clone()));
        }
        let _fill = self.fill.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh_record(store, name.as_bytes())?;
        Ok(read(&self.records).get(name).cloned())
    }

    /// Every cached API_KEY record (for metrics).
    pub fn records(&self) -> Vec<Arc<SecretRecord>> {
        read(&self.records).values().cloned().collect()
    }

    /// Number of indexed key versions.
    pub fn index_len(&self) -> usize {
        read(&self.index).len()
    }

    /// Re-reads the given keys of the secrets and key-index trees after a commit.
    /// Names of the cached records.
    fn record_names(&self) -> Vec<Vec<u8>> {
        read(&self.records)
            .keys()
            .map(|k| k.as_bytes().to_vec())
            .collect()
    }

    /// Hashes in the index.
    fn index_hashes(&self) -> Vec<Vec<u8>> {
        read(&self.index).keys().map(|h| h.to_vec()).collect()
    }

    fn refresh(&self, store: &dyn Store, secrets: &[Vec<u8>], index: &[Vec<u8>]) {
        let _fill = self.fill.lock().unwrap_or_else(PoisonError::into_inner);
        for name in secrets {
            if let Err(e) = self.refresh_record(store, name) {
                // Fail closed: a key whose record cannot be read verifies as an outage, never
                // against a stale copy.
                tracing::error!(error = %e, "key directory refresh failed; entry dropped");
                if let Ok(name) = std::str::from_utf8(name) {
                    write(&self.records).remove(name);
                }
            }
        }
        for hash in index {
            let Ok(h) = <[u8; 32]>::try_from(hash.as_slice()) else {
                continue;
            };
            let entry = store
                .get(Tree::KeyIndex, hash)
                .map_err(crate::error::Error::from)
                .and_then(|raw| {
                    raw.map(|raw| decode::<KeyIndexEntry>("key index entry", &raw))
                        .transpose()
                });
            if entry.is_ok() {
                write(&self.tampered).remove(&h);
            }
            match entry {
                Ok(Some(e)) => {
                    write(&self.index).insert(
                        h,
                        KeyRef {
                            name: e.name.into(),
                            version: e.version,
                        },
                    );
                }
                Ok(None) => {
                    write(&self.index).remove(&h);
                }
                Err(e) => {
                    tracing::error!(error = %e, "key index refresh failed; entry dropped");
                    write(&self.index).remove(&h);
                    if matches!(e, Error::DataLoss(_)) {
                        write(&self.tampered).insert(h, e.to_string());
                    }
                }
            }
        }
    }

    /// Reads one secret record into the cache (API keys) or out of it (anything else).
    /// Caller holds the fill lock.
    fn refresh_record(&self, store: &dyn Store, name: &[u8]) -> Result<()> {
        let Ok(text) = std::str::from_utf8(name) else {
            return Ok(());
        };
        let record = store
            .get(Tree::Secrets, name)?
            .map(|raw| decode::<SecretRecord>("secret", &raw))
            .transpose()?;
        let mut records = write(&self.records);
        match record {
            Some(r) if r.kind == Kind::ApiKey => {
                records.insert(text.into(), Arc::new(r));
            }
            _ => {
                records.remove(text);
            }
        }
        Ok(())
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// The store every component uses: it forwards to the real store and keeps the
/// [`KeyDirectory`] in step with every commit (see the module doc).
pub struct DirectoryStore {
    inner: Arc<dyn Store>,
    dir: Arc<KeyDirectory>,
}

impl DirectoryStore {
    /// Wraps `inner`, keeping `dir` in step with it.
    pub fn new(inner: Arc<dyn Store>, dir: Arc<KeyDirectory>) -> Self {
        Self { inner, dir }
    }

    /// Re-reads the directory's entries of changed keys that another replica of a shared
    /// store committed (the store's follow feed): the same refresh a local commit makes.
    pub fn apply_changes(&self, changed: &[(Tree, Vec<u8>)]) {
        let pick = |tree: Tree| -> Vec<Vec<u8>> {
            changed
                .iter()
                .filter(|(t, _)| *t == tree)
                .map(|(_, k)| k.clone())
                .collect()
        };
        let (secrets, index) = (pick(Tree::Secrets), pick(Tree::KeyIndex));
        if !secrets.is_empty() || !index.is_empty() {
            self.dir.refresh(&*self.inner, &secrets, &index);
        }
    }

    /// Re-reads every entry (the follow feed fell behind: anything may have changed). Keys
    /// that are gone from the store are dropped as their refresh finds them absent.
    pub fn apply_everything(&self) -> Result<()> {
        let keys = |tree: Tree| -> Result<Vec<Vec<u8>>> {
            Ok(scan_all(&*self.inner, tree)?
                .into_iter()
                .map(|(k, _)| k)
                .collect())
        };
        let mut secrets = keys(Tree::Secrets)?;
        let mut index = keys(Tree::KeyIndex)?;
        secrets.extend(self.dir.record_names());
        index.extend(self.dir.index_hashes());
        self.dir.refresh(&*self.inner, &secrets, &index);
        Ok(())
    }
}

impl Store for DirectoryStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(tree, key)
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.inner.scan(tree, prefix, start, limit)
    }

    fn scan_each(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<CheckedEntry>, StoreError> {
        self.inner.scan_each(tree, prefix, start, limit)
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let secrets: Vec<Vec<u8>> = batch
            .written_keys(Tree::Secrets)
            .map(<[u8]>::to_vec)
            .collect();
        let index: Vec<Vec<u8>> = batch
            .written_keys(Tree::KeyIndex)
            .map(<[u8]>::to_vec)
            .collect();
        self.inner.commit(batch)?;
        if !secrets.is_empty() || !index.is_empty() {
            self.dir.refresh(&*self.inner, &secrets, &index);
        }
        Ok(())
    }

    fn sync(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.sync()
    }

    fn last(&self, tree: Tree) -> Result<Option<crate::store::Entry>, StoreError> {
        self.inner.last(tree)
    }

    fn generation(&self) -> u64 {
        self.inner.generation()
    }

    fn snapshot(&self) -> Result<crate::store::Snapshot, StoreError> {
        self.inner.snapshot()
    }
    fn follow(&self) -> Option<tokio::sync::broadcast::Receiver<crate::store::etcd::Changed>> {
        self.inner.follow()
    }

    fn leads(&self) -> bool {
        self.inner.leads()
    }

    fn live_replicas(&self) -> usize {
        self.inner.live_replicas()
    }
}
