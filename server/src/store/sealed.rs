//! Authenticated records: a store decorator that MACs every secret record, key-index entry,
//! quota ledger and idempotency record it writes and checks the MAC on every read, so that
//! whoever can edit the database files (but cannot unseal the vault) cannot relabel a prod
//! secret as dev, un-revoke a version, widen scopes, drop CIDRs, point an API key's index entry
//! at another record, refill a key's quota, or redirect a retried request's answer.
//!
//! Stored value in the authenticated trees: `tag(32) || record`, where
//! `tag = HMAC-SHA256(record key, len·tree name || len·key || len·record)` (each part prefixed
//! by its u64 BE length) and the record key is derived from the index key at unseal
//! ([`crate::envelope::RECORD_MAC_LABEL`]): never stored, unchanged by keyring rotations. The
//! key the record is stored under is part of the MAC, so a record copied or moved to another
//! key fails as surely as an edited one.
//!
//! Every reader goes through [`Store`], so there is no unchecked read path: `get`, `scan` and
//! `last` return only records whose MAC holds, and fail with [`StoreError::Tampered`] (DATA_LOSS,
//! naming the record) otherwise; [`Store::scan_each`] reports a bad record in its place for
//! start-up loads. Commits seal what they write and what their guards expect (the MAC is
//! deterministic, so a guard on a value read earlier still compares equal).
//!
//! Not covered here, because they already are: values (AES-GCM bound to name, version and
//! term), the keyring and index key (wrapped by the HSM), the audit log (its own hash chain
//! and HSM-signed checkpoints). Rolling the whole database back to an older copy is not
//! detected (each old record carries a valid MAC); see the threat model in docs/security.md.

use super::{Batch, CheckedEntry, Entry, Snapshot, Store, StoreError, Tree};
use crate::envelope::DerivedKey;
use futures::future::BoxFuture;
use std::sync::Arc;

/// Bytes of the MAC in front of every authenticated record.
pub const TAG_LEN: usize = 32;

/// The trees whose records are authenticated. Not here: the audit log (its own chain and
/// checkpoints), values, keyring and index key (AES-GCM, HSM wrap), and the usage counters and
/// facts (statistics, rebuilt from the audit log; a bad one must not stop start-up). The alert
/// outbox is: an entry planted in it would be posted to a webhook signed by Ward.
pub const AUTHENTICATED: [Tree; 5] = [
    Tree::Secrets,
    Tree::KeyIndex,
    Tree::Quota,
    Tree::Requests,
    Tree::Outbox,
];

/// A store whose secret records and key-index entries are MACed (see the module doc).
pub struct SealedStore {
    inner: Arc<dyn Store>,
    key: DerivedKey,
}

impl SealedStore {
    /// Authenticates the records of `inner` under `key` (the record key derived at unseal).
    pub fn new(inner: Arc<dyn Store>, key: DerivedKey) -> Self {
        Self { inner, key }
    }

    /// `tag || record` for `record` stored at `key` of `tree`.
    pub fn seal(&self, tree: Tree, key: &[u8], record: &[u8]) -> Vec<u8> {
        let tag = self.key.mac(&[tree.name().as_bytes(), key, record]);
        let mut out = Vec::with_capacity(TAG_LEN + record.len());
        out.extend_from_slice(&tag);
        out.extend_from_slice(record);
        out
    }

    /// The record inside `stored` at `key` of `tree`, if its MAC holds.
    pub fn open(&self, tree: Tree, key: &[u8], stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        if !authenticated(tree) {
            return Ok(stored.to_vec());
        }
        match stored.split_at_checked(TAG_LEN) {
            Some((tag, record)) if self.key.verify(&[tree.name().as_bytes(), key, record], tag) => {
                Ok(record.to_vec())
            }
            _ => Err(StoreError::Tampered(format!(
                "integrity check failed for {}: the stored record was altered, or moved from \
                 another key (its MAC does not match); restore it from a backup",
                describe(tree, key)
            ))),
        }
    }

    fn open_entries(&self, tree: Tree, entries: Vec<Entry>) -> Result<Vec<Entry>, StoreError> {
        entries
            .into_iter()
            .map(|(k, v)| {
                let v = self.open(tree, &k, &v)?;
                Ok((k, v))
            })
            .collect()
    }
}

fn authenticated(tree: Tree) -> bool {
    AUTHENTICATED.contains(&tree)
}

/// The record at `key` of `tree` in words: a secret by name, an index entry by the key id
/// (the first 8 bytes of the keyed hash, as in audit records and VerifyKey answers).
fn describe(tree: Tree, key: &[u8]) -> String {
    match tree {
        Tree::Secrets => format!(
            "secret {}",
            crate::model::excerpt(&String::from_utf8_lossy(key))
        ),
        Tree::KeyIndex => format!(
            "the key index entry of key id {}",
            hex::encode(&key[..key.len().min(8)])
        ),
        Tree::Quota => format!(
            "the quota ledger of {}",
            crate::model::excerpt(&String::from_utf8_lossy(key))
        ),
        Tree::Requests => {
            let text = String::from_utf8_lossy(key);
            let (identity, id) = text.split_once('\0').unwrap_or((&text, ""));
            format!(
                "the idempotency record of request_id {} by {}",
                crate::model::excerpt(id),
                crate::model::excerpt(identity)
            )
        }
        other => format!("{} record {}", other.name(), hex::encode(key)),
    }
}

impl Store for SealedStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner
            .get(tree, key)?
            .map(|v| self.open(tree, key, &v))
            .transpose()
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let entries = self.inner.scan(tree, prefix, start, limit)?;
        if !authenticated(tree) {
            return Ok(entries);
        }
        self.open_entries(tree, entries)
    }

    fn scan_each(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<CheckedEntry>, StoreError> {
        Ok(self
            .inner
            .scan(tree, prefix, start, limit)?
            .into_iter()
            .map(|(k, v)| {
                let v = self.open(tree, &k, &v);
                (k, v)
            })
            .collect())
    }

    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError> {
        match self.inner.last(tree)? {
            Some((k, v)) => {
                let v = self.open(tree, &k, &v)?;
                Ok(Some((k, v)))
            }
            None => Ok(None),
        }
    }

    fn commit(&self, mut batch: Batch) -> Result<(), StoreError> {
        for tree in AUTHENTICATED {
            batch.map_values(tree, |k, v| self.seal(tree, k, v));
        }
        self.inner.commit(batch)
    }

    fn sync(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.sync()
    }

    fn generation(&self) -> u64 {
        self.inner.generation()
    }

    /// The records as stored, MACs included: a backup restores them byte for byte, and the
    /// restored vault (same index key, wrapped in the backup) checks them as before.
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{random_key, IndexKey, RECORD_MAC_LABEL};
    use crate::store::sled_store::SledStore;

    fn stores() -> (Arc<dyn Store>, SealedStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let key = IndexKey::new(&random_key())
            .unwrap()
            .derive(RECORD_MAC_LABEL);
        (raw.clone(), SealedStore::new(raw, key), dir)
    }

    fn put(store: &dyn Store, tree: Tree, key: &[u8], value: &[u8]) {
        let mut b = Batch::new();
        b.put(tree, key.to_vec(), value.to_vec());
        store.commit(b).unwrap();
    }

    #[tokio::test]
    async fn records_round_trip_and_guards_compare_what_was_read() {
        let (raw, sealed, _dir) = stores();
        put(&sealed, Tree::Secrets, b"db/pw", b"record");
        assert_eq!(
            sealed.get(Tree::Secrets, b"db/pw").unwrap().unwrap(),
            b"record"
        );
        // Stored with its MAC in front; other trees as they are.
        assert_eq!(raw.get(Tree::Secrets, b"db/pw").unwrap().unwrap().len(), 38);
        put(&sealed, Tree::Usage, b"u", b"plain");
        assert_eq!(raw.get(Tree::Usage, b"u").unwrap().unwrap(), b"plain");
        // A guard on the value read holds; on another value it does not.
        let mut b = Batch::new();
        b.guard(Tree::Secrets, b"db/pw".to_vec(), Some(b"record".to_vec()));
        b.put(Tree::Secrets, b"db/pw".to_vec(), b"record2".to_vec());
        sealed.commit(b).unwrap();
        let mut b = Batch::new();
        b.guard(Tree::Secrets, b"db/pw".to_vec(), Some(b"record".to_vec()));
        assert!(matches!(sealed.commit(b), Err(StoreError::Conflict)));
        let scanned = sealed.scan(Tree::Secrets, b"", b"", 10).unwrap();
        assert_eq!(scanned, vec![(b"db/pw".to_vec(), b"record2".to_vec())]);
        assert_eq!(
            sealed.last(Tree::Secrets).unwrap().unwrap().1,
            b"record2".to_vec()
        );
    }

    #[tokio::test]
    async fn edited_moved_unsealed_or_foreign_records_are_refused_by_name() {
        let (raw, sealed, _dir) = stores();
        put(&sealed, Tree::Secrets, b"prod/db", b"environment=prod");
        put(&sealed, Tree::Secrets, b"dev/db", b"environment=dev");
        put(&sealed, Tree::KeyIndex, &[7u8; 32], b"-> prod/db v1");
        let stored = raw.get(Tree::Secrets, b"prod/db").unwrap().unwrap();

        // Edited.
        let mut edited = stored.clone();
        let n = edited.len();
        edited[n - 4..].copy_from_slice(b"=dev");
        put(&*raw, Tree::Secrets, b"prod/db", &edited);
        let e = sealed.get(Tree::Secrets, b"prod/db").unwrap_err();
        assert!(
            matches!(&e, StoreError::Tampered(m) if m.contains("secret \"prod/db\"")),
            "{e}"
        );
        let e = crate::error::Error::from(e);
        assert_eq!(e.code(), crate::error::Code::DataLoss);
        // A scan fails naming it; scan_each reports it in its place and serves the rest.
        assert!(matches!(
            sealed.scan(Tree::Secrets, b"", b"", 10),
            Err(StoreError::Tampered(_))
        ));
        let each = sealed.scan_each(Tree::Secrets, b"", b"", 10).unwrap();
        assert_eq!(each[0].1.as_ref().unwrap(), b"environment=dev");
        assert!(each[1].1.is_err());

        // Moved: a valid record copied under another key.
        let dev = raw.get(Tree::Secrets, b"dev/db").unwrap().unwrap();
        put(&*raw, Tree::Secrets, b"prod/db", &dev);
        assert!(sealed.get(Tree::Secrets, b"prod/db").is_err());
        // Moved between trees with the same key.
        let entry = raw.get(Tree::KeyIndex, &[7u8; 32]).unwrap().unwrap();
        put(&*raw, Tree::Secrets, &[7u8; 32], &entry);
        assert!(sealed.get(Tree::Secrets, &[7u8; 32]).is_err());
        // An index entry pointed elsewhere names the key id.
        let mut edited = entry.clone();
        edited[TAG_LEN + 3] ^= 1;
        put(&*raw, Tree::KeyIndex, &[7u8; 32], &edited);
        let e = sealed.get(Tree::KeyIndex, &[7u8; 32]).unwrap_err();
        assert!(e.to_string().contains("key id 0707070707070707"), "{e}");
        // Quota ledgers and idempotency records, named in words.
        put(&sealed, Tree::Quota, b"app/key", b"ledger");
        put(&sealed, Tree::Requests, b"admin\0req-1", b"request");
        for (tree, key, name) in [
            (
                Tree::Quota,
                &b"app/key"[..],
                "the quota ledger of \"app/key\"",
            ),
            (
                Tree::Requests,
                &b"admin\0req-1"[..],
                "request_id \"req-1\" by \"admin\"",
            ),
        ] {
            let mut v = raw.get(tree, key).unwrap().unwrap();
            v[TAG_LEN] ^= 1;
            put(&*raw, tree, key, &v);
            let e = sealed.get(tree, key).unwrap_err();
            assert!(e.to_string().contains(name), "{e}");
        }
        // Written without a MAC (or too short to hold one).
        put(&*raw, Tree::Secrets, b"plain", b"\x01record");
        assert!(sealed.get(Tree::Secrets, b"plain").is_err());
        put(&*raw, Tree::Secrets, b"short", b"x");
        assert!(sealed.get(Tree::Secrets, b"short").is_err());
        // Sealed under another vault's key.
        let other = SealedStore::new(
            raw.clone(),
            IndexKey::new(&random_key())
                .unwrap()
                .derive(RECORD_MAC_LABEL),
        );
        assert!(other.get(Tree::Secrets, b"dev/db").is_err());
    }
}
