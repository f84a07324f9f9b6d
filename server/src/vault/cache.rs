//! The decoded secret records that reads use, kept so that a hot fetch neither reads the
//! store, checks the record's MAC nor decodes it again.
//!
//! Coherent with the one write path: [`Vault::commit_with_audit`](super::Vault) invalidates a
//! name after its commit and before the write is answered. A reader notes the cache's epoch
//! before it reads the store and keeps what it read only if no invalidation came in between,
//! so a record read before a commit is never kept after it. A store reopened after a failure
//! (a new generation, which may have lost writes) empties the cache.
//!
//! Bounded: at most [`CAPACITY`] records; a full shard drops an arbitrary entry to make room.

use crate::model::SecretRecord;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Records kept at most.
pub const CAPACITY: usize = 1 << 18;
const SHARDS: usize = 16;

type Shard = HashMap<Box<str>, Arc<SecretRecord>>;

/// See the module documentation.
pub struct RecordCache {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    /// Bumped by every invalidation.
    epoch: AtomicU64,
    /// The store generation the records were read under.
    generation: AtomicU64,
}

impl Default for RecordCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }
}

impl RecordCache {
    fn shard(&self, name: &str) -> std::sync::MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(name) as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The record of `name` if cached under store generation `generation` (a newer
    /// generation empties the cache), and the epoch to pass to [`RecordCache::keep`].
    pub fn get(&self, name: &str, generation: u64) -> (Option<Arc<SecretRecord>>, u64) {
        if self.generation.load(Ordering::Acquire) != generation {
            self.clear(generation);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        (self.shard(name).get(name).cloned(), epoch)
    }

    /// Keeps `record`, read from the store after [`RecordCache::get`] returned `epoch`,
    /// unless a write invalidated anything since.
    pub fn keep(&self, name: &str, record: Arc<SecretRecord>, epoch: u64) {
        let mut shard = self.shard(name);
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if shard.len() >= CAPACITY / SHARDS {
            if let Some(k) = shard.keys().next().cloned() {
                shard.remove(&k);
            }
        }
        shard.insert(name.into(), record);
    }

    /// Forgets `name`: its record was just committed.
    pub fn invalidate(&self, name: &[u8]) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(name) = std::str::from_utf8(name) {
            self.shard(name).remove(name);
        }
    }

    fn clear(&self, generation: u64) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for s in &self.shards {
            s.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
        self.generation.store(generation, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> Arc<SecretRecord> {
        Arc::new(SecretRecord {
            name: name.into(),
            kind: crate::model::Kind::Static,
            environment: "dev".into(),
            owner: String::new(),
            labels: Default::default(),
            description: String::new(),
            scopes: Vec::new(),
            created_by: String::new(),
            create_ms: 0,
            update_ms: 0,
            primary: 1,
            versions: Vec::new(),
            key_policy: Default::default(),
            life: Default::default(),
        })
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let c = RecordCache::default();
        let (none, epoch) = c.get("a", 0);
        assert!(none.is_none());
        // A write commits and invalidates between the read of the store and the keep.
        c.invalidate(b"a");
        c.keep("a", record("a"), epoch);
        assert!(c.get("a", 0).0.is_none());
        // Without a write in between, it is kept.
        let (_, epoch) = c.get("a", 0);
        c.keep("a", record("a"), epoch);
        assert_eq!(c.get("a", 0).0.unwrap().name, "a");
        c.invalidate(b"a");
        assert!(c.get("a", 0).0.is_none());
    }

    #[test]
    fn a_new_store_generation_empties_it_and_it_stays_bounded() {
        let c = RecordCache::default();
        let (_, epoch) = c.get("a", 0);
        c.keep("a", record("a"), epoch);
        assert!(c.get("a", 1).0.is_none(), "kept across a store reopen");
        for i in 0..CAPACITY + 100 {
            let name = format!("n{i}");
            let (_, epoch) = c.get(&name, 1);
            c.keep(&name, record(&name), epoch);
        }
        let kept: usize = c.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(kept <= CAPACITY, "{kept}");
    }
}
