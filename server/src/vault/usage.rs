//! Usage counters of API keys: per key and version, verifications by result and by endpoint
//! tag, the last use and the client IP of that use. They feed GetKeyUsage and the stale-key
//! report (ListSecrets with `unused_keys`).
//!
//! Counters are statistics, not a ledger: they are kept in memory and written to the store in
//! one batch every few seconds and at shutdown (no fsync of their own; they ride the next
//! group commit). A crash may lose the last few seconds of counts; quota charges, which must
//! be exact, live in the quota ledger instead. Endpoint tags are caller-supplied, so each
//! version keeps at most [`MAX_ENDPOINTS`] of them and counts the rest under `(other)`.

use crate::clock::Millis;
use crate::error::Result;
use crate::store::scan_all;
use crate::store::{decode, encode, version_key, Batch, Store, Tree};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

/// Distinct endpoint tags counted per version.
pub const MAX_ENDPOINTS: usize = 64;
/// The tag that collects endpoints beyond [`MAX_ENDPOINTS`].
pub const OTHER_ENDPOINT: &str = "(other)";
/// Number of result codes counted (indexed by `VerifyResult::index`).
pub const RESULTS: usize = 12;

/// Counters of one key version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionUsage {
    /// Verifications by result code (index = result number).
    pub results: Vec<u64>,
    /// Verifications by endpoint tag.
    pub endpoints: BTreeMap<String, u64>,
    /// Last VALID verification with a non-zero cost.
    pub last_used_ms: Option<Millis>,
    /// Client IP of that verification, or empty.
    pub last_client_ip: String,
    /// All verifications that found this version.
    pub total: u64,
}

struct Entry {
    usage: VersionUsage,
    dirty: bool,
}

/// Every key's usage counters.
#[derive(Default)]
pub struct UsageBook {
    keys: Mutex<HashMap<String, BTreeMap<u64, Entry>>>,
}

/// One verification to count.
#[derive(Debug, Clone, Copy)]
pub struct Use<'a> {
    /// Result number.
    pub result: usize,
    /// Endpoint tag (may be empty).
    pub endpoint: &'a str,
    /// Set for a VALID, charged verification: when, and the client IP (may be empty).
    pub used: Option<(Millis, &'a str)>,
}

impl UsageBook {
    /// Loads the stored counters (at start-up).
    pub fn load(&self, store: &dyn Store) -> Result<()> {
        let mut keys = self.lock();
        for (k, raw) in scan_all(store, Tree::KeyUsage)? {
            let Some((name, version)) = split_version_key(&k) else {
                continue;
            };
            let usage: VersionUsage = decode("key usage", &raw)?;
            keys.entry(name).or_default().insert(
                version,
                Entry {
                    usage,
                    dirty: false,
                },
            );
        }
        Ok(())
    }

    /// Counts one verification of `name` at `version`.
    pub fn record(&self, name: &str, version: u64, u: Use<'_>) {
        let mut keys = self.lock();
        let versions = match keys.get_mut(name) {
            Some(v) => v,
            None => keys.entry(name.to_owned()).or_default(),
        };
        let e = versions.entry(version).or_insert_with(|| Entry {
            usage: VersionUsage::default(),
            dirty: true,
        });
        e.dirty = true;
        let usage = &mut e.usage;
        if usage.results.len() < RESULTS {
            usage.results.resize(RESULTS, 0);
        }
        if let Some(n) = usage.results.get_mut(u.result) {
            *n += 1;
        }
        usage.total += 1;
        let tag =
            if usage.endpoints.contains_key(u.endpoint) || usage.endpoints.len() < MAX_ENDPOINTS {
                u.endpoint
            } else {
                OTHER_ENDPOINT
            };
        match usage.endpoints.get_mut(tag) {
            Some(n) => *n += 1,
            None => {
                usage.endpoints.insert(tag.to_owned(), 1);
            }
        }
        if let Some((at, ip)) = u.used {
            if usage.last_used_ms.is_none_or(|t| t <= at) {
                usage.last_used_ms = Some(at);
                usage.last_client_ip = ip.to_owned();
            }
        }
    }

    /// The latest use of any version of `name`.
    pub fn last_used(&self, name: &str) -> Option<Millis> {
        self.lock()
            .get(name)?
            .values()
            .filter_map(|e| e.usage.last_used_ms)
            .max()
    }

    /// Every version's counters of `name`, oldest version first.
    pub fn get(&self, name: &str) -> BTreeMap<u64, VersionUsage> {
        self.lock()
            .get(name)
            .map(|v| v.iter().map(|(k, e)| (*k, e.usage.clone())).collect())
            .unwrap_or_default()
    }

    /// Writes every changed counter to the store in one batch (no sync: the next group commit
    /// or sled's own flush makes it durable). On failure the entries stay dirty.
    pub fn flush(&self, store: &dyn Store) -> Result<usize> {
        let mut batch = Batch::new();
        let mut written = Vec::new();
        {
            let mut keys = self.lock();
            for (name, versions) in keys.iter_mut() {
                for (v, e) in versions.iter_mut() {
                    if e.dirty {
                        batch.put(Tree::KeyUsage, version_key(name, *v), encode(&e.usage));
                        e.dirty = false;
                        written.push((name.clone(), *v));
                    }
                }
            }
        }
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(e) = store.commit(batch) {
            let mut keys = self.lock();
            for (name, v) in &written {
                if let Some(e) = keys.get_mut(name).and_then(|m| m.get_mut(v)) {
                    e.dirty = true;
                }
            }
            return Err(e.into());
        }
        Ok(written.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<u64, Entry>>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn split_version_key(k: &[u8]) -> Option<(String, u64)> {
    let cut = k.len().checked_sub(9)?;
    if k[cut] != 0 {
        return None;
    }
    let name = std::str::from_utf8(&k[..cut]).ok()?.to_owned();
    let version = u64::from_be_bytes(k[cut + 1..].try_into().ok()?);
    Some((name, version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_store::SledStore;

    #[tokio::test]
    async fn counts_persist_and_endpoints_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let book = UsageBook::default();
        book.record(
            "k",
            1,
            Use {
                result: 1,
                endpoint: "/orders",
                used: Some((50, "10.0.0.1")),
            },
        );
        book.record(
            "k",
            2,
            Use {
                result: 10,
                endpoint: "/orders",
                used: None,
            },
        );
        for i in 0..100 {
            book.record(
                "k",
                2,
                Use {
                    result: 1,
                    endpoint: &format!("/e{i}"),
                    used: Some((60 + i, "")),
                },
            );
        }
        assert_eq!(book.last_used("k"), Some(159));
        assert_eq!(book.flush(&store).unwrap(), 2);
        assert_eq!(book.flush(&store).unwrap(), 0);

        let again = UsageBook::default();
        again.load(&store).unwrap();
        let v = again.get("k");
        assert_eq!(v[&1].last_client_ip, "10.0.0.1");
        assert_eq!(v[&2].total, 101);
        assert_eq!(v[&2].results[10], 1);
        assert_eq!(v[&2].endpoints.len(), MAX_ENDPOINTS + 1);
        assert_eq!(v[&2].endpoints[OTHER_ENDPOINT], 101 - MAX_ENDPOINTS as u64);
        assert_eq!(again.last_used("nope"), None);
    }
}
