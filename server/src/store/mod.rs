//! Storage: a small key-value interface with atomic, guarded batches and an explicit
//! durability point. sled is the embedded default ([`sled_store::SledStore`]); another
//! backend is an addition, not a rewrite.
//!
//! The rule every caller follows: commit the batch that holds the state change and its audit
//! record, then await [`Store::sync`], then reply. Nothing is acknowledged before it is durable.

pub mod etcd;
pub mod sealed;
pub mod sled_store;

use futures::future::BoxFuture;

/// The trees (key spaces) of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Tree {
    /// Secret name → `SecretRecord`.
    Secrets,
    /// `name 0x00 version(u64 BE)` → `SealedValue`.
    Versions,
    /// `identity 0x00 request_id` → `RequestRecord`.
    Requests,
    /// HMAC(index key, API key) → `KeyIndexEntry`.
    KeyIndex,
    /// Sequence (u64 BE) → `AuditRecord`.
    Audit,
    /// Term (u32 BE) → `KeyringEntry`.
    Keyring,
    /// Named singletons (the wrapped index key).
    Meta,
    /// API-key secret name → `QuotaLedger` (the balance of its quota).
    Quota,
    /// `name 0x00 version(u64 BE)` → `VersionUsage` (verification counters of an API key).
    KeyUsage,
    /// `name 0x00 version(u64 BE)` → `UsageFact` (last use, derived from the audit log).
    Usage,
    /// `name 0x00 version(u64 BE)` → `Activity` (an API key version's recent verifications:
    /// hourly counts, client networks, the latest facts; written with `KeyUsage`).
    KeyActivity,
    /// Alert deliveries waiting for their webhook, the disabled endpoints and the alert
    /// writer's cursor (see `alerts::outbox`).
    Outbox,
}

impl Tree {
    /// Every tree, in a fixed order.
    pub const ALL: [Tree; 12] = [
        Tree::Secrets,
        Tree::Versions,
        Tree::Requests,
        Tree::KeyIndex,
        Tree::Audit,
        Tree::Keyring,
        Tree::Meta,
        Tree::Quota,
        Tree::KeyUsage,
        Tree::Usage,
        Tree::KeyActivity,
        Tree::Outbox,
    ];

    /// The tree's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Tree::Secrets => "secrets",
            Tree::Versions => "versions",
            Tree::Requests => "requests",
            Tree::KeyIndex => "key_index",
            Tree::Audit => "audit",
            Tree::Keyring => "keyring",
            Tree::Meta => "meta",
            Tree::Quota => "quota",
            Tree::KeyUsage => "key_usage",
            Tree::Usage => "usage",
            Tree::KeyActivity => "key_activity",
            Tree::Outbox => "alert_outbox",
        }
    }

    fn index(self) -> usize {
        Tree::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A key and its value, or why the value failed its integrity check ([`Store::scan_each`]).
pub type CheckedEntry = (Vec<u8>, Result<Vec<u8>, StoreError>);

/// A guard or a write: a tree, a key, and the value expected or to set (None: absent).
type Op = (Tree, Vec<u8>, Option<Vec<u8>>);

/// A set of writes applied atomically, only if every guard holds.
///
/// A batch may be several callers' batches [merged](Batch::merge) into one commit (the audit
/// log combines concurrent writes so that they share one storage transaction). The parts apply
/// in order, each part's guards checked against what the parts before it wrote: the same as
/// committing them one after another, except that all or none apply.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    parts: Vec<Part>,
    generation: Option<u64>,
    leader_only: bool,
}

/// One caller's guards and writes.
#[derive(Debug, Default, Clone)]
struct Part {
    guards: Vec<Op>,
    writes: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    fn part(&mut self) -> &mut Part {
        if self.parts.is_empty() {
            self.parts.push(Part::default());
        }
        let last = self.parts.len() - 1;
        &mut self.parts[last]
    }

    /// Requires `key` to hold exactly `expected` (None: absent) when the batch applies.
    pub fn guard(&mut self, tree: Tree, key: impl Into<Vec<u8>>, expected: Option<Vec<u8>>) {
        self.part().guards.push((tree, key.into(), expected));
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, tree: Tree, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.part().writes.push((tree, key.into(), Some(value)));
    }

    /// Removes `key`.
    pub fn remove(&mut self, tree: Tree, key: impl Into<Vec<u8>>) {
        self.part().writes.push((tree, key.into(), None));
    }

    /// Appends `other` as a later part: its guards are checked after this batch's writes.
    pub fn merge(&mut self, other: Batch) {
        self.leader_only |= other.leader_only;
        self.parts.extend(other.parts);
    }

    /// The keys this batch writes or removes in `tree`.
    pub fn written_keys(&self, tree: Tree) -> impl Iterator<Item = &[u8]> + '_ {
        self.writes()
            .filter(move |(t, _, _)| *t == tree)
            .map(|(_, k, _)| k.as_slice())
    }

    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes().next().is_none()
    }

    /// Applies only if the store is still at [`Store::generation`] `generation` (UNAVAILABLE
    /// otherwise): a batch prepared from what one generation held must not land in the next.
    pub fn require_generation(&mut self, generation: u64) {
        self.generation = Some(generation);
    }

    /// Applies only while this process leads the cluster's jobs ([`Store::leads`]); a
    /// replica that lost the lead meanwhile gets UNAVAILABLE, never a write.
    pub fn require_leadership(&mut self) {
        self.leader_only = true;
    }

    /// Rewrites every value this batch expects or sets in `tree` with `f(key, value)` (how
    /// [`sealed::SealedStore`] adds the MAC to what it stores and to what guards expect).
    pub(crate) fn map_values(&mut self, tree: Tree, f: impl Fn(&[u8], &[u8]) -> Vec<u8>) {
        for part in &mut self.parts {
            for (t, k, v) in part.guards.iter_mut().chain(part.writes.iter_mut()) {
                if *t == tree {
                    if let Some(value) = v {
                        *value = f(k, value);
                    }
                }
            }
        }
    }

    fn writes(&self) -> impl Iterator<Item = &Op> + '_ {
        self.parts.iter().flat_map(|p| &p.writes)
    }

    fn guards(&self) -> impl Iterator<Item = &Op> + '_ {
        self.parts.iter().flat_map(|p| &p.guards)
    }
}

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A guard did not hold: someone else changed the key first.
    #[error("concurrent change")]
    Conflict,
    /// The storage failed (I/O, full disk, stalled device).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The engine found corrupt data (a checksum failed) where it read.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A stored record failed its MAC: edited, or moved from another key. Says which record.
    #[error("{0}")]
    Tampered(String),
    /// The storage may or may not have applied the batch (a shared store stopped answering
    /// mid-commit); [`Store::generation`] moved, and what the store holds settles it.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The batch exceeds what the storage takes in one atomic write; nothing was written.
    #[error("write too large: {0}")]
    TooLarge(String),
    /// The storage is out of space and refuses writes until an operator frees some (reads go
    /// on). The message says what happened and is meant for the caller too.
    #[error("{0}")]
    Full(String),
}

impl From<StoreError> for crate::error::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => crate::error::Error::Conflict("concurrent change".into()),
            StoreError::Unavailable(detail) => {
                tracing::error!(%detail, "storage failure");
                crate::error::Error::Unavailable("storage unavailable".into())
            }
            StoreError::Corrupt(detail) => {
                tracing::error!(%detail, "storage engine found corrupt data");
                crate::error::Error::DataLoss("stored data is corrupt".into())
            }
            StoreError::Tampered(what) => {
                tracing::error!(record = %what, "stored record failed its integrity check");
                crate::error::Error::DataLoss(what)
            }
            StoreError::Indeterminate(detail) => {
                tracing::error!(%detail, "storage did not confirm a write");
                crate::error::Error::Unavailable(
                    "storage unavailable: the write may or may not have been applied; retry it \
                     with the same request_id"
                        .into(),
                )
            }
            StoreError::Full(what) => {
                tracing::error!(%what, "storage refused a write: out of space");
                crate::error::Error::Unavailable(format!("storage unavailable: {what}"))
            }
            StoreError::TooLarge(detail) => {
                tracing::error!(%detail, "write too large for the store");
                crate::error::Error::ResourceExhausted(
                    "the write is too large for the store in one transaction".into(),
                )
            }
        }
    }
}

/// A key-value store with guarded atomic batches and group-committed durability.
pub trait Store: Send + Sync + 'static {
    /// The value at `key`, if any.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` entries with keys starting with `prefix`, from `start` (inclusive;
    /// empty: the first), in key order.
    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError>;

    /// [`Store::scan`], except that an entry failing its integrity check comes back as an error
    /// in its place instead of failing the whole scan: for start-up loads, which must go on
    /// past one tampered record so that reading it answers DATA_LOSS and the rest is served.
    fn scan_each(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<CheckedEntry>, StoreError> {
        Ok(self
            .scan(tree, prefix, start, limit)?
            .into_iter()
            .map(|(k, v)| (k, Ok(v)))
            .collect())
    }

    /// The entry with the greatest key, if the tree is not empty.
    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError>;

    /// Applies the batch atomically if every guard holds; [`StoreError::Conflict`] otherwise.
    /// Visible at once; durable only after [`Store::sync`].
    fn commit(&self, batch: Batch) -> Result<(), StoreError>;

    /// Resolves once everything committed before the call is on disk. Concurrent callers
    /// share one fsync (group commit).
    fn sync(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Changes whenever the backend had to be reopened after a failure (a full disk, an I/O
    /// error). Commits made before a change that no [`Store::sync`] confirmed before it are
    /// lost: a caller that compares the generation of its commit with the one after its sync
    /// never acknowledges such a write.
    fn generation(&self) -> u64;
    /// Every entry of every tree as of one instant (no commit is half in it), and a number
    /// above every id handed out so far. Blocking; writes wait while it copies.
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Err(StoreError::Unavailable(
            "this store cannot take snapshots".into(),
        ))
    }

    /// For a store shared by several processes: every change anyone commits (this process
    /// included), once this process reads it, as (tree, key) lists in commit order. A
    /// follower that lags gets `Lagged` and must treat everything as changed. None: only
    /// this process writes (the embedded store).
    fn follow(&self) -> Option<tokio::sync::broadcast::Receiver<etcd::Changed>> {
        None
    }

    /// Whether this process runs the cluster's jobs (the sweeper, deadline alerts). Always,
    /// for a store only this process uses.
    fn leads(&self) -> bool {
        true
    }

    /// Processes serving this store now (from the replica registry): 1 for an embedded store.
    fn live_replicas(&self) -> usize {
        1
    }

    /// Whether what this process reads is known to be current: a shared store's copy whose
    /// source has been silent for longer than its bound is not (UNAVAILABLE, saying so), and
    /// calls should go to another replica. Always, for an embedded store.
    fn fresh(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A point-in-time copy of the whole store (see [`Store::snapshot`]).
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Each tree's entries, in key order.
    pub trees: Vec<(Tree, Vec<Entry>)>,
}

impl Tree {
    /// The tree with this on-disk name.
    pub fn from_name(name: &str) -> Option<Tree> {
        Tree::ALL.iter().copied().find(|t| t.name() == name)
    }
}

/// Free bytes (for an unprivileged writer) on the file system that holds `path`.
pub fn free_bytes(path: &std::path::Path) -> Result<u64, String> {
    let st =
        nix::sys::statvfs::statvfs(path).map_err(|e| format!("statvfs {}: {e}", path.display()))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Keys each node keeps for itself (its audit log's marks, its alert writer's cursor): `key` on
/// a store of its own, `key/<node id>` on a store several nodes share ([`node_key`]).
pub const NODE_KEYS: [(Tree, &[u8]); 3] = [
    (Tree::Meta, b"audit_applied"),
    (Tree::Meta, b"audit_checkpoint"),
    (Tree::Outbox, b"cursor"),
];

/// The key of node `node`'s own `key` (one of [`NODE_KEYS`]): `key`, or `key/node`.
pub fn node_key(key: &[u8], node: Option<&str>) -> Vec<u8> {
    let mut k = key.to_vec();
    if let Some(node) = node {
        k.push(b'/');
        k.extend_from_slice(node.as_bytes());
    }
    k
}

/// Rewrites a snapshot's node keys from node `from`'s names to node `to`'s, dropping every
/// other node's (their audit logs are not in the snapshot): what a backup taken on one node
/// and restored as another must carry.
pub fn move_node_keys(snapshot: &mut Snapshot, from: Option<&str>, to: Option<&str>) {
    for (tree, entries) in &mut snapshot.trees {
        let mine: Vec<(Vec<u8>, Vec<u8>)> = NODE_KEYS
            .iter()
            .filter(|(t, _)| t == tree)
            .map(|(_, k)| (node_key(k, from), node_key(k, to)))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let node_keyed = |k: &[u8]| {
            NODE_KEYS.iter().any(|(t, base)| {
                t == tree
                    && (k == *base || (k.starts_with(base) && k.get(base.len()) == Some(&b'/')))
            })
        };
        // Entries of a MACed tree are bound to their key: renamed, they would fail their
        // check. The alert writer's cursor is dropped instead (the restored node starts it at
        // its log's head).
        let renamable = !sealed::AUTHENTICATED.contains(tree);
        let mut kept = Vec::with_capacity(entries.len());
        for (k, v) in std::mem::take(entries) {
            match mine.iter().find(|(old, _)| *old == k) {
                Some((old, new)) if renamable || old == new => kept.push((new.clone(), v)),
                Some(_) => {}
                None if node_keyed(&k) => {}
                None => kept.push((k, v)),
            }
        }
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        *entries = kept;
    }
}

/// Key of a version's sealed value: `name 0x00 version(u64 BE)`. Names never contain 0x00.
pub fn version_key(name: &str, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Key of an idempotency record: `identity 0x00 request_id`.
pub fn request_key(identity: &str, request_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(identity.len() + request_id.len() + 1);
    k.extend_from_slice(identity.as_bytes());
    k.push(0);
    k.extend_from_slice(request_id.as_bytes());
    k
}

/// Encodes a stored record: format byte 1, then postcard.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![1u8];
    // postcard writing into a Vec cannot fail for these plain structs; an error would be a bug,
    // surfaced on decode as DATA_LOSS rather than a panic here.
    if let Ok(body) = postcard::to_allocvec(value) {
        out.extend_from_slice(&body);
    }
    out
}

/// Decodes a stored record; anything unreadable is an integrity failure.
pub fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> crate::error::Result<T> {
    match bytes.split_first() {
        Some((1, body)) => postcard::from_bytes(body).map_err(|e| {
            tracing::error!(what, error = %e, "stored record does not decode");
            crate::error::Error::DataLoss(format!("stored {what} is corrupt"))
        }),
        _ => Err(crate::error::Error::DataLoss(format!(
            "stored {what} has an unknown format"
        ))),
    }
}

/// Every entry of a tree, in key order, each checked on its own ([`Store::scan_each`]).
pub fn scan_all_checked(store: &dyn Store, tree: Tree) -> crate::error::Result<Vec<CheckedEntry>> {
    scan_whole(|start| store.scan_each(tree, b"", start, SCAN_CHUNK))
}

/// Every entry of a tree, in key order.
pub fn scan_all(store: &dyn Store, tree: Tree) -> crate::error::Result<Vec<Entry>> {
    scan_whole(|start| store.scan(tree, b"", start, SCAN_CHUNK))
}

/// Entries read per scan call when loading a whole tree.
const SCAN_CHUNK: usize = 1024;

/// Calls `chunk` from the start of a tree until it returns a short chunk, each time from just
/// after the last key it returned.
fn scan_whole<T>(
    mut chunk: impl FnMut(&[u8]) -> std::result::Result<Vec<(Vec<u8>, T)>, StoreError>,
) -> crate::error::Result<Vec<(Vec<u8>, T)>> {
    let mut out = Vec::new();
    let mut start = Vec::new();
    loop {
        let got = chunk(&start)?;
        let done = got.len() < SCAN_CHUNK;
        if let Some((last, _)) = got.last() {
            start = last.clone();
            start.push(0);
        }
        out.extend(got);
        if done {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_keys_move_with_their_log_and_others_are_dropped() {
        let mut snap = Snapshot {
            trees: vec![
                (
                    Tree::Meta,
                    vec![
                        (b"audit_applied/a".to_vec(), b"7".to_vec()),
                        (b"audit_applied/b".to_vec(), b"9".to_vec()),
                        (b"audit_checkpoint/a".to_vec(), b"c".to_vec()),
                        (b"index_key".to_vec(), b"k".to_vec()),
                    ],
                ),
                (
                    Tree::Outbox,
                    vec![
                        (b"cursor/a".to_vec(), b"3".to_vec()),
                        (b"e/x".to_vec(), b"entry".to_vec()),
                    ],
                ),
            ],
        };
        move_node_keys(&mut snap, Some("a"), None);
        let meta: Vec<&[u8]> = snap.trees[0].1.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(
            meta,
            vec![&b"audit_applied"[..], b"audit_checkpoint", b"index_key"]
        );
        assert_eq!(
            snap.trees[0].1[0].1,
            b"7".to_vec(),
            "node a's mark, not b's"
        );
        // The cursor is MACed with its key: dropped, not renamed.
        let outbox: Vec<&[u8]> = snap.trees[1].1.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(outbox, vec![&b"e/x"[..]]);
        move_node_keys(&mut snap, None, Some("n"));
        assert_eq!(snap.trees[0].1[0].0, b"audit_applied/n".to_vec());
        assert_eq!(node_key(b"cursor", None), b"cursor".to_vec());
    }
}
