//! The replica's copy of everything under the prefix, kept current by one etcd watch.
//!
//! Loading reads the whole prefix at one revision R (paged, every page at R), then watches from
//! R + 1 with progress notifications, so the copy is always exactly etcd's state at
//! [`Mirror::revision`]: events are applied a whole watch response at a time under the write
//! lock, and a watch response never splits one revision. When etcd has compacted past the
//! revision the watch needs ("required revision has been compacted"), or the watch cannot be
//! resumed, the prefix is read again and the difference is told to followers as a change like
//! any other. Readers never wait for etcd.
//!
//! The watch asks etcd for a progress report every [`PROGRESS_EVERY`]; an answer (or an event)
//! proves the copy current up to its revision. [`Shared::silence`] is how long etcd has been
//! silent: the store refuses to serve from a copy silent for longer than its staleness bound
//! (a replica cut off from the cluster must not keep accepting a key revoked elsewhere).

use super::{cluster_key, tree_key, Backoff, ETCD_PAGE};
use crate::store::{Entry, Tree};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

/// How often the watch asks etcd for a progress report.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A stored value and the revision that wrote it.
#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// What changed: (tree, key) pairs, in commit order. Keys outside the trees (the replica
/// registry, the leader key) are not listed.
pub type Changed = Arc<Vec<(Tree, Vec<u8>)>>;

/// Every tree's entries and the cluster keys, at one revision.
#[derive(Debug, Default)]
pub(super) struct Mirror {
    pub trees: Vec<BTreeMap<Vec<u8>, Stored>>,
    /// Keys under `prefix + "_cluster/"` (registry, leader), without that prefix.
    pub cluster: BTreeMap<Vec<u8>, Stored>,
    /// The etcd revision this copy reflects.
    pub revision: i64,
}

/// Where a full key of the prefix belongs.
enum Place<'a> {
    Tree(Tree, &'a [u8]),
    Cluster(&'a [u8]),
    Foreign,
}

impl Mirror {
    fn empty() -> Self {
        Self {
            trees: vec![BTreeMap::new(); Tree::ALL.len()],
            ..Self::default()
        }
    }

    pub fn tree(&self, tree: Tree) -> &BTreeMap<Vec<u8>, Stored> {
        &self.trees[tree.index()]
    }

    /// Entries of `tree` with keys starting with `prefix`, from `start`, at most `limit`.
    pub fn scan(&self, tree: Tree, prefix: &[u8], start: &[u8], limit: usize) -> Vec<Entry> {
        let from = if start > prefix { start } else { prefix };
        self.tree(tree)
            .range(from.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, s)| (k.clone(), s.value.clone()))
            .collect()
    }

    fn place<'a>(prefix: &[u8], full: &'a [u8]) -> Place<'a> {
        let Some(rest) = full.strip_prefix(prefix) else {
            return Place::Foreign;
        };
        if let Some(k) = rest.strip_prefix(cluster_key(b"").as_slice()) {
            return Place::Cluster(k);
        }
        let Some(slash) = rest.iter().position(|b| *b == b'/') else {
            return Place::Foreign;
        };
        match std::str::from_utf8(&rest[..slash])
            .ok()
            .and_then(Tree::from_name)
        {
            Some(t) => Place::Tree(t, &rest[slash + 1..]),
            None => Place::Foreign,
        }
    }

    /// Sets or removes one full key; returns its tree and key if it is a tree entry.
    fn apply(
        &mut self,
        prefix: &[u8],
        full: &[u8],
        value: Option<Stored>,
    ) -> Option<(Tree, Vec<u8>)> {
        let (map, key, tree) = match Self::place(prefix, full) {
            Place::Tree(t, k) => (&mut self.trees[t.index()], k, Some(t)),
            Place::Cluster(k) => (&mut self.cluster, k, None),
            Place::Foreign => return None,
        };
        match value {
            Some(v) => {
                map.insert(key.to_vec(), v);
            }
            None => {
                map.remove(key);
            }
        }
        tree.map(|t| (t, key.to_vec()))
    }

    /// Every (tree, key) whose value differs between `self` and `other`.
    fn diff(&self, other: &Mirror) -> Vec<(Tree, Vec<u8>)> {
        let mut out = Vec::new();
        for t in Tree::ALL {
            let (a, b) = (self.tree(t), other.tree(t));
            for (k, v) in a {
                if b.get(k).map(|w| w.mod_revision) != Some(v.mod_revision) {
                    out.push((t, k.clone()));
                }
            }
            for k in b.keys() {
                if !a.contains_key(k) {
                    out.push((t, k.clone()));
                }
            }
        }
        out
    }
}

/// The mirror and how it is shared: readers, the watch task, and writers waiting for their
/// revision to arrive.
pub(super) struct Shared {
    pub prefix: Vec<u8>,
    pub mirror: std::sync::RwLock<Mirror>,
    /// The revision the mirror reflects, for writers waiting to read their own writes.
    pub applied: watch::Sender<i64>,
    pub changes: broadcast::Sender<Changed>,
    /// When the watch last answered (ms since `started`).
    heard_ms: AtomicU64,
    started: Instant,
}

/// Changes kept for followers before a slow one lags (and then reloads everything).
const CHANGES_CAPACITY: usize = 4096;

impl Shared {
    pub fn new(prefix: Vec<u8>) -> Self {
        Self {
            prefix,
            mirror: std::sync::RwLock::new(Mirror::empty()),
            applied: watch::channel(0).0,
            changes: broadcast::channel(CHANGES_CAPACITY).0,
            heard_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Notes that etcd answered on the watch (an event or a progress report).
    fn heard(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heard_ms.store(ms, Ordering::Release);
    }

    /// How long since etcd last answered on the watch.
    pub fn silence(&self) -> Duration {
        let heard = Duration::from_millis(self.heard_ms.load(Ordering::Acquire));
        self.started.elapsed().saturating_sub(heard)
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        self.mirror
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Mirror> {
        self.mirror
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, revision: i64, changed: Vec<(Tree, Vec<u8>)>) {
        if !changed.is_empty() {
            // No follower yet is fine: they load what they need when they start.
            let _ = self.changes.send(Arc::new(changed));
        }
        self.applied.send_replace(revision);
    }
}

/// Reads the whole prefix at one revision.
pub(super) async fn load(client: &mut Client, prefix: &[u8]) -> Result<Mirror, etcd_client::Error> {
    let mut mirror = Mirror::empty();
    let end = prefix_end(prefix);
    let mut from = prefix.to_vec();
    let mut revision = 0;
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(ETCD_PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = client.get(from.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in resp.kvs() {
            mirror.apply(
                prefix,
                kv.key(),
                Some(Stored {
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                }),
            );
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    mirror.revision = revision;
    Ok(mirror)
}

/// The end of the key range that holds every key starting with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Installs a freshly loaded mirror, telling followers what differs from the old one.
pub(super) fn install(shared: &Shared, fresh: Mirror) {
    shared.heard();
    let revision = fresh.revision;
    let changed = {
        let mut m = shared.write();
        let changed = m.diff(&fresh);
        *m = fresh;
        changed
    };
    shared.publish(revision, changed);
}

/// The watch task: applies every change under the prefix, reconnecting and reloading as
/// needed, until `stop` is set.
pub(super) async fn follow(client: Client, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let from = shared.read().revision + 1;
        let outcome = tokio::select! {
            r = watch_from(client.clone(), &shared, from) => r,
            _ = stop.changed() => return,
        };
        match outcome {
            Ok(Ended::Compacted(at)) => {
                tracing::warn!(
                    needed = from,
                    compacted_to = at,
                    "etcd compacted past the watch's revision; reloading the store's copy"
                );
                reload(&client, &shared, &mut stop).await;
                backoff = Backoff::new();
            }
            Ok(Ended::Closed) => {
                tracing::warn!("etcd watch closed; resuming");
            }
            Err(e) => {
                tracing::warn!(error = %e, "etcd watch failed; resuming");
                if !backoff.wait(&mut stop).await {
                    return;
                }
            }
        }
    }
}

/// Loads the prefix again until it works (or `stop`).
async fn reload(client: &Client, shared: &Shared, stop: &mut watch::Receiver<bool>) {
    let mut backoff = Backoff::new();
    loop {
        match load(&mut client.clone(), &shared.prefix).await {
            Ok(fresh) => {
                install(shared, fresh);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "reloading from etcd failed; retrying"),
        }
        if !backoff.wait(stop).await {
            return;
        }
    }
}

enum Ended {
    Compacted(i64),
    Closed,
}

/// One watch stream from `from`: applies its events until it ends.
async fn watch_from(
    mut client: Client,
    shared: &Shared,
    from: i64,
) -> Result<Ended, etcd_client::Error> {
    let opts = WatchOptions::new()
        .with_range(prefix_end(&shared.prefix))
        .with_start_revision(from)
        .with_progress_notify();
    let (mut requests, mut stream) = client
        .watch(shared.prefix.clone(), Some(opts))
        .await?
        .split();
    let mut ask = tokio::time::interval(PROGRESS_EVERY);
    loop {
        let resp = tokio::select! {
            r = stream.message() => match r? {
                Some(resp) => resp,
                None => break,
            },
            _ = ask.tick() => {
                // etcd answers with its current revision once every event before it was sent:
                // proof that this copy is current, or (no answer) that it may not be.
                requests.request_progress().await?;
                continue;
            }
        };
        shared.heard();
        if resp.compact_revision() > 0 {
            return Ok(Ended::Compacted(resp.compact_revision()));
        }
        if resp.canceled() {
            tracing::warn!(reason = resp.cancel_reason(), "etcd canceled the watch");
            return Ok(Ended::Closed);
        }
        let header_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut changed = Vec::new();
        let revision = {
            let mut m = shared.write();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let value = match ev.event_type() {
                    EventType::Put => Some(Stored {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    }),
                    EventType::Delete => None,
                };
                m.revision = m.revision.max(kv.mod_revision());
                changed.extend(m.apply(&shared.prefix, kv.key(), value));
            }
            // A progress notification (no events) says nothing changed up to its revision;
            // with events, the header is the store's revision when they were sent, which may
            // be beyond them only once every event up to it has come.
            if resp.events().is_empty() {
                m.revision = m.revision.max(header_rev);
            }
            m.revision
        };
        shared.publish(revision, changed);
    }
    Ok(Ended::Closed)
}

/// A key of the watched prefix for a tree entry.
pub(super) fn full_key(prefix: &[u8], tree: Tree, key: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&tree_key(tree));
    k.extend_from_slice(key);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(v: &[u8], rev: i64) -> Option<Stored> {
        Some(Stored {
            value: v.to_vec(),
            mod_revision: rev,
        })
    }

    #[test]
    fn keys_land_in_their_tree_and_foreign_ones_are_ignored() {
        let p = b"/ward/";
        let mut m = Mirror::empty();
        let k = full_key(p, Tree::Versions, b"app/db\0\0\0\0\0\0\0\0\x01");
        assert_eq!(
            m.apply(p, &k, stored(b"v1", 5)),
            Some((Tree::Versions, b"app/db\0\0\0\0\0\0\0\0\x01".to_vec()))
        );
        assert_eq!(
            m.apply(p, b"/ward/_cluster/replicas/r1", stored(b"i", 6)),
            None
        );
        assert_eq!(m.apply(p, b"/ward/nosuchtree/x", stored(b"i", 7)), None);
        assert_eq!(m.apply(p, b"/other/secrets/x", stored(b"i", 8)), None);
        assert_eq!(m.tree(Tree::Versions).len(), 1);
        assert_eq!(m.cluster.len(), 1);
        assert_eq!(crate::store::etcd::cluster::live(&m), 1);
        // A delete removes it.
        m.apply(p, &k, None);
        assert!(m.tree(Tree::Versions).is_empty());
    }

    #[test]
    fn scans_respect_prefix_start_and_limit() {
        let p = b"/ward/";
        let mut m = Mirror::empty();
        for (i, name) in ["a/1", "a/2", "a/3", "b/1"].iter().enumerate() {
            m.apply(
                p,
                &full_key(p, Tree::Secrets, name.as_bytes()),
                stored(b"r", i as i64 + 1),
            );
        }
        let keys = |v: Vec<Entry>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(m.scan(Tree::Secrets, b"a/", b"", 10)),
            vec![b"a/1".to_vec(), b"a/2".to_vec(), b"a/3".to_vec()]
        );
        assert_eq!(
            keys(m.scan(Tree::Secrets, b"a/", b"a/2", 1)),
            vec![b"a/2".to_vec()]
        );
        assert_eq!(
            keys(m.scan(Tree::Secrets, b"", b"a/3\0", 10)),
            vec![b"b/1".to_vec()]
        );
    }

    #[test]
    fn a_reload_reports_exactly_what_differs() {
        let p = b"/ward/";
        let (mut old, mut new) = (Mirror::empty(), Mirror::empty());
        let key = |n: &str| full_key(p, Tree::Secrets, n.as_bytes());
        old.apply(p, &key("same"), stored(b"x", 1));
        new.apply(p, &key("same"), stored(b"x", 1));
        old.apply(p, &key("changed"), stored(b"x", 2));
        new.apply(p, &key("changed"), stored(b"y", 9));
        old.apply(p, &key("gone"), stored(b"x", 3));
        new.apply(p, &key("added"), stored(b"x", 10));
        let mut names: Vec<Vec<u8>> = old.diff(&new).into_iter().map(|(_, k)| k).collect();
        names.sort();
        assert_eq!(
            names,
            vec![b"added".to_vec(), b"changed".to_vec(), b"gone".to_vec()]
        );
    }

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/ward/"), b"/ward0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
