//! Usage counters of API keys: per key and version, verifications by result and by endpoint
//! tag, the last use and the client IP of that use. They feed GetKeyUsage and the stale-key
//! report (ListSecrets with `unused_keys`). Beside them each version keeps its recent
//! [`Activity`] for the portal: counts per hour by result (a week), the client networks seen
//! in the last 24 h (who still uses an old key), and the latest successful verifications (to
//! preview what a tighter policy would have refused). Every part is bounded, whatever callers send.
//!
//! Counters are statistics, not a ledger: they are kept in memory and written to the store
//! every `keys.usage_flush_seconds` and at shutdown (no fsync of their own; they ride the next
//! group commit). A crash may lose the last interval's counts; quota charges, which must be
//! exact, live in the quota ledger instead. Endpoint tags are caller-supplied, so each version
//! keeps at most [`MAX_ENDPOINTS`] of them and counts the rest under `(other)`.
//!
//! ## Several processes, one store
//!
//! Replicas sharing an etcd store each count the verifications they serve. Writing a
//! process's totals would overwrite what the others counted since it loaded them (lost counts,
//! a `last_used_ms` moving backwards and a key reported stale while in use), so a process
//! writes only what it counted since its last successful flush — its *pending* counts — and
//! [merges](VersionUsage::merge) them into the stored value under a compare-and-set: read,
//! merge, guard on the bytes read, commit; on a lost race read again (at most
//! [`MAX_ATTEMPTS`] times, then the counts wait for the next flush). A commit that fails
//! keeps the pending counts, so nothing is lost and nothing is written twice. (A commit whose
//! outcome the store cannot tell, `Indeterminate`, is treated as failed: if it did land, those
//! counts are merged again.) Each transaction writes at most [`FLUSH_KEYS`] keys, well within
//! etcd's 128 operations per transaction (a guard and a put per key).
//!
//! What a process shows is the stored value merged with its own counts not yet written.
//! Readers (GetKeyUsage, the portal, the stale-key report and alert) read the stored value
//! again on every call — the etcd store answers reads from its in-memory mirror, sled from
//! its page cache — so they see other replicas' counts as of those replicas' last flush, that
//! is at most `keys.usage_flush_seconds` (plus the mirror's lag) behind. Only if the read
//! fails, or races this process's own flush of that key, does a reader fall back to the
//! stored value as this process last read or wrote it.

use super::write::MAX_ATTEMPTS;
use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::model::keypolicy::{canonical, grants_scopes, KeyPolicy};
use crate::model::VerifyResult;
use crate::store::scan_all;
use crate::store::{decode, encode, version_key, Batch, Store, StoreError, Tree};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

/// Distinct endpoint tags counted per version.
pub const MAX_ENDPOINTS: usize = 64;
/// The tag that collects endpoints beyond [`MAX_ENDPOINTS`].
pub const OTHER_ENDPOINT: &str = "(other)";
/// Number of result codes counted (indexed by `VerifyResult::index`).
pub const RESULTS: usize = 12;
/// Keys one flush transaction writes at most (a version's counters and activity are two).
pub const FLUSH_KEYS: usize = 60;

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

/// Hourly buckets kept per version: a week.
pub const ACTIVITY_HOURS: usize = 7 * 24;
/// Client networks remembered per version; past it the least recently seen is forgotten.
pub const MAX_NETWORKS: usize = 64;
/// Latest VALID verifications kept per version.
pub const RECENT: usize = 256;
/// Required scopes kept per remembered verification.
pub const MAX_SEEN_SCOPES: usize = 16;
/// An hour, in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;
/// How far back "recent" networks and verifications reach: 24 hours.
pub const WINDOW_MS: u64 = 24 * HOUR_MS;

/// An API key version's recent verifications.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// Hourly counts, oldest first, at most [`ACTIVITY_HOURS`] (hours without a verification
    /// have no bucket).
    pub hours: VecDeque<HourCount>,
    /// Client network (IPv4 /24, IPv6 /64) → when last seen and how many verifications.
    pub networks: BTreeMap<IpAddr, NetworkSeen>,
    /// The latest VALID verifications, oldest first, at most [`RECENT`].
    pub recent: VecDeque<Seen>,
}

/// Verifications in one hour, by result number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourCount {
    /// Start of the hour (ms since the epoch, a multiple of [`HOUR_MS`]).
    pub start_ms: Millis,
    /// Count by result number (index = result number).
    pub results: Vec<u64>,
}

/// One client network's use of a key version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSeen {
    /// Latest verification from it.
    pub last_ms: Millis,
    /// Verifications from it since it was first remembered.
    pub count: u64,
}

/// One remembered verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// When.
    pub at_ms: Millis,
    /// Result number.
    pub result: u8,
    /// The end client's IP, if the verifier sent it.
    pub client_ip: Option<IpAddr>,
    /// Scopes the verifier required (at most [`MAX_SEEN_SCOPES`]).
    pub scopes: Vec<String>,
}

/// The network a client address is counted under: IPv4 /24, IPv6 /64.
pub fn network_of(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    }
}

/// A network as shown: `203.0.113.0/24`, `2001:db8::/64`.
pub fn network_text(net: IpAddr) -> String {
    match net {
        IpAddr::V4(_) => format!("{net}/24"),
        IpAddr::V6(_) => format!("{net}/64"),
    }
}

impl VersionUsage {
    fn record(&mut self, u: &Use<'_>) {
        if self.results.len() < RESULTS {
            self.results.resize(RESULTS, 0);
        }
        if let Some(n) = self.results.get_mut(u.result) {
            *n += 1;
        }
        self.total += 1;
        count_endpoint(&mut self.endpoints, u.endpoint, 1);
        if u.charged && self.last_used_ms.is_none_or(|t| t <= u.at) {
            self.last_used_ms = Some(u.at);
            self.last_client_ip = u.client_ip.to_owned();
        }
    }

    /// Adds `other`'s counts to these (what two processes counted of one version): results,
    /// endpoints and the total add up, the later use stays the last one. Commutative, except
    /// which tags keep their own count once more than [`MAX_ENDPOINTS`] meet: the rest go to
    /// `(other)`, in either order, so the counts still add up.
    pub fn merge(&mut self, other: &VersionUsage) {
        add_counts(&mut self.results, &other.results);
        for (tag, n) in &other.endpoints {
            count_endpoint(&mut self.endpoints, tag, *n);
        }
        self.total += other.total;
        if let Some(t) = other.last_used_ms {
            // Equal times: the greater IP, so that the order of merging does not matter.
            let later = self.last_used_ms.is_none_or(|mine| {
                (mine, self.last_client_ip.as_str()) < (t, other.last_client_ip.as_str())
            });
            if later {
                self.last_used_ms = Some(t);
                self.last_client_ip.clone_from(&other.last_client_ip);
            }
        }
    }
}

/// Adds `n` uses of endpoint `tag`, under [`OTHER_ENDPOINT`] once [`MAX_ENDPOINTS`] other tags
/// are kept.
fn count_endpoint(endpoints: &mut BTreeMap<String, u64>, tag: &str, n: u64) {
    // `(other)` is not one of the MAX_ENDPOINTS, wherever it sorts among them.
    let named = endpoints.len() - usize::from(endpoints.contains_key(OTHER_ENDPOINT));
    let tag = if endpoints.contains_key(tag) || named < MAX_ENDPOINTS {
        tag
    } else {
        OTHER_ENDPOINT
    };
    match endpoints.get_mut(tag) {
        Some(c) => *c += n,
        None => {
            endpoints.insert(tag.to_owned(), n);
        }
    }
}

/// Adds counts by result number.
fn add_counts(into: &mut Vec<u64>, add: &[u64]) {
    if into.len() < add.len() {
        into.resize(add.len(), 0);
    }
    for (n, a) in into.iter_mut().zip(add) {
        *n += a;
    }
}

impl Activity {
    fn record(&mut self, u: &Use<'_>, ip: Option<IpAddr>) {
        let hour = u.at - u.at % HOUR_MS;
        if self.hours.back().is_none_or(|h| h.start_ms < hour) {
            self.hours.push_back(HourCount {
                start_ms: hour,
                results: vec![0; RESULTS],
            });
            while self.hours.len() > ACTIVITY_HOURS {
                self.hours.pop_front();
            }
        }
        // A clock step backwards counts into the newest bucket rather than reordering them.
        if let Some(n) = self
            .hours
            .back_mut()
            .and_then(|h| h.results.get_mut(u.result))
        {
            *n += 1;
        }
        if let Some(ip) = ip {
            let net = network_of(ip);
            if !self.networks.contains_key(&net) && self.networks.len() >= MAX_NETWORKS {
                self.forget_networks(MAX_NETWORKS - 1);
            }
            let seen = self.networks.entry(net).or_default();
            seen.last_ms = seen.last_ms.max(u.at);
            seen.count += 1;
        }
        // Only successes: the preview asks which of them a tighter policy would refuse, and a
        // flood of refusals must not push them out.
        if u.result != VerifyResult::Valid.number() {
            return;
        }
        self.recent.push_back(Seen {
            at_ms: u.at,
            result: u8::try_from(u.result).unwrap_or(u8::MAX),
            client_ip: ip,
            scopes: u.scopes.iter().take(MAX_SEEN_SCOPES).cloned().collect(),
        });
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    /// Adds `other`'s activity to this (what two processes saw of one version): hourly counts
    /// add per hour, the newest [`ACTIVITY_HOURS`] kept; networks add their counts and keep
    /// the later sighting, the [`MAX_NETWORKS`] most recently seen kept; remembered
    /// verifications merge by time, the newest [`RECENT`] kept. Commutative.
    pub fn merge(&mut self, other: &Activity) {
        let mut hours: BTreeMap<Millis, Vec<u64>> = BTreeMap::new();
        for h in self.hours.iter().chain(&other.hours) {
            add_counts(hours.entry(h.start_ms).or_default(), &h.results);
        }
        let skip = hours.len().saturating_sub(ACTIVITY_HOURS);
        self.hours = hours
            .into_iter()
            .skip(skip)
            .map(|(start_ms, results)| HourCount { start_ms, results })
            .collect();

        for (net, s) in &other.networks {
            let mine = self.networks.entry(*net).or_default();
            mine.last_ms = mine.last_ms.max(s.last_ms);
            mine.count += s.count;
        }
        self.forget_networks(MAX_NETWORKS);

        let mut recent: Vec<Seen> = self
            .recent
            .drain(..)
            .chain(other.recent.iter().cloned())
            .collect();
        // Ordered on every field, so that equal times come out the same in either order.
        recent.sort_by(|a, b| {
            (a.at_ms, a.result, a.client_ip, &a.scopes).cmp(&(
                b.at_ms,
                b.result,
                b.client_ip,
                &b.scopes,
            ))
        });
        let skip = recent.len().saturating_sub(RECENT);
        self.recent = recent.into_iter().skip(skip).collect();
    }

    /// Forgets the least recently seen networks (the lowest address first among equals) until
    /// at most `keep` remain.
    fn forget_networks(&mut self, keep: usize) {
        let excess = self.networks.len().saturating_sub(keep);
        if excess == 0 {
            return;
        }
        let mut by_age: Vec<(Millis, IpAddr)> =
            self.networks.iter().map(|(n, s)| (s.last_ms, *n)).collect();
        by_age.sort_unstable();
        for (_, net) in by_age.into_iter().take(excess) {
            self.networks.remove(&net);
        }
    }

    /// Of the VALID verifications remembered since `since`: how many a key with `policy` and
    /// `scopes` would have refused (FORBIDDEN_IP or INSUFFICIENT_SCOPE, judged by the checks
    /// VerifyKey makes), and how many there were.
    pub fn would_refuse(&self, since: Millis, policy: &KeyPolicy, scopes: &[String]) -> (u64, u64) {
        let valid = VerifyResult::Valid.number();
        self.recent
            .iter()
            .filter(|s| s.at_ms >= since && usize::from(s.result) == valid)
            .fold((0, 0), |(refused, of), s| {
                let admitted = policy.admits_ip(s.client_ip) && grants_scopes(scopes, &s.scopes);
                (refused + u64::from(!admitted), of + 1)
            })
    }

    /// Networks seen since `since`, most recently seen first.
    pub fn networks_since(&self, since: Millis) -> Vec<(IpAddr, NetworkSeen)> {
        let mut out: Vec<_> = self
            .networks
            .iter()
            .filter(|(_, s)| s.last_ms >= since)
            .map(|(n, s)| (*n, *s))
            .collect();
        out.sort_by_key(|n| std::cmp::Reverse(n.1.last_ms));
        out
    }
}

/// A counter record that two processes' counts can be merged into.
trait Merge: Clone + Default + DeserializeOwned + Serialize {
    /// What the store calls it, in errors.
    const WHAT: &'static str;
    /// The tree it is stored in.
    const TREE: Tree;
    fn merge_from(&mut self, other: &Self);
}

impl Merge for VersionUsage {
    const WHAT: &'static str = "key usage";
    const TREE: Tree = Tree::KeyUsage;
    fn merge_from(&mut self, other: &Self) {
        self.merge(other);
    }
}

impl Merge for Activity {
    const WHAT: &'static str = "key activity";
    const TREE: Tree = Tree::KeyActivity;
    fn merge_from(&mut self, other: &Self) {
        self.merge(other);
    }
}

/// What this process knows of one stored record.
#[derive(Debug, Default)]
struct Layers<T> {
    /// The stored value as this process last read or wrote it.
    stored: T,
    /// Counted here, being merged into the store by a flush now.
    flushing: Option<T>,
    /// Counted here since (not yet written).
    pending: T,
}

impl<T: Merge> Layers<T> {
    /// The stored value with this process's unwritten counts.
    fn shown(&self) -> T {
        let mut v = self.stored.clone();
        if let Some(f) = &self.flushing {
            v.merge_from(f);
        }
        v.merge_from(&self.pending);
        v
    }

    /// Hands the pending counts to a flush.
    fn start_flush(&mut self) -> T {
        let p = std::mem::take(&mut self.pending);
        self.flushing = Some(p.clone());
        p
    }

    /// The flush wrote its counts: `stored` is what the store now holds.
    fn flushed(&mut self, stored: T) {
        self.stored = stored;
        self.flushing = None;
    }

    /// The flush did not write: its counts are pending again.
    fn flush_failed(&mut self) {
        if let Some(mut f) = self.flushing.take() {
            f.merge_from(&self.pending);
            self.pending = f;
        }
    }

    /// A value just read from the store, unless a flush of this record is under way (its
    /// counts may or may not be in what was read).
    fn read(&mut self, stored: T) {
        if self.flushing.is_none() {
            self.stored = stored;
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    usage: Layers<VersionUsage>,
    activity: Layers<Activity>,
}

impl Entry {
    /// Whether it holds counts no flush has taken yet.
    fn pending(&self) -> bool {
        self.usage.pending.total > 0
    }
}

#[derive(Default)]
struct Book {
    keys: HashMap<String, BTreeMap<u64, Entry>>,
    /// Flushes finished so far: a read that began before one ended may predate its write.
    flushes: u64,
}

/// Every key's usage counters.
#[derive(Default)]
pub struct UsageBook {
    book: Mutex<Book>,
    /// The store the counters were loaded from, which readers read again.
    store: OnceLock<Arc<dyn Store>>,
    /// One flush at a time (a shutdown flush waits for the periodic one).
    flush_lock: Mutex<()>,
}

/// One verification to count.
#[derive(Debug, Clone, Copy)]
pub struct Use<'a> {
    /// Result number.
    pub result: usize,
    /// Endpoint tag (may be empty).
    pub endpoint: &'a str,
    /// When.
    pub at: Millis,
    /// The end client's IP as the verifier sent it (may be empty).
    pub client_ip: &'a str,
    /// Scopes the verifier required.
    pub scopes: &'a [String],
    /// A VALID verification with a non-zero cost: a use of the key.
    pub charged: bool,
}

/// A version's counts taken by a flush.
struct Taken {
    name: String,
    version: u64,
    usage: VersionUsage,
    activity: Activity,
}

/// What the store holds after a flush merged a version's counts.
type Merged = (VersionUsage, Activity);

impl UsageBook {
    /// Loads the stored counters (at start-up); readers read `store` again later.
    pub fn load(&self, store: &Arc<dyn Store>) -> Result<()> {
        let usage = scan_all(&**store, Tree::KeyUsage)?;
        // Activity is written with its counters; counters stored before activity was kept
        // simply start with none.
        let activity = scan_all(&**store, Tree::KeyActivity)?;
        let mut book = self.lock();
        for (k, raw) in usage {
            if let Some((name, version)) = split_version_key(&k) {
                let stored: VersionUsage = decode(VersionUsage::WHAT, &raw)?;
                let e = book.keys.entry(name).or_default().entry(version);
                e.or_default().usage.read(stored);
            }
        }
        for (k, raw) in activity {
            let Some((name, version)) = split_version_key(&k) else {
                continue;
            };
            let stored: Activity = decode(Activity::WHAT, &raw)?;
            if let Some(e) = book.keys.get_mut(&name).and_then(|v| v.get_mut(&version)) {
                e.activity.read(stored);
            }
        }
        drop(book);
        // A second load (a test) keeps the first store: both name the same data.
        let _ = self.store.set(store.clone());
        Ok(())
    }

    /// Counts one verification of `name` at `version`.
    pub fn record(&self, name: &str, version: u64, u: Use<'_>) {
        let mut book = self.lock();
        let versions = match book.keys.get_mut(name) {
            Some(v) => v,
            None => book.keys.entry(name.to_owned()).or_default(),
        };
        let e = versions.entry(version).or_default();
        let ip = u.client_ip.parse::<IpAddr>().ok().map(canonical);
        e.activity.pending.record(&u, ip);
        e.usage.pending.record(&u);
    }

    /// The latest use of any version of `name`.
    pub fn last_used(&self, name: &str) -> Option<Millis> {
        self.get(name).values().filter_map(|u| u.last_used_ms).max()
    }

    /// Every version's counters of `name`, oldest version first.
    pub fn get(&self, name: &str) -> BTreeMap<u64, VersionUsage> {
        self.shown(name, |e| &mut e.usage)
    }

    /// Every version's recent activity of `name`, oldest version first.
    pub fn activity(&self, name: &str) -> BTreeMap<u64, Activity> {
        self.shown(name, |e| &mut e.activity)
    }

    /// What the store holds of every version of `name` (read again now) with this process's
    /// unwritten counts.
    fn shown<T: Merge>(
        &self,
        name: &str,
        layers: fn(&mut Entry) -> &mut Layers<T>,
    ) -> BTreeMap<u64, T> {
        let mut read = None;
        if let Some(store) = self.store.get() {
            let flushes = self.lock().flushes;
            match read_versions::<T>(&**store, name) {
                Ok(rows) => read = Some((flushes, rows)),
                Err(e) => {
                    tracing::warn!(error = %e, "stored usage counters unreadable; showing this process's copy")
                }
            }
        }
        let mut book = self.lock();
        if let Some((flushes, rows)) = read {
            // A flush that ended meanwhile wrote values newer than the ones read.
            if flushes == book.flushes && !rows.is_empty() {
                let versions = book.keys.entry(name.to_owned()).or_default();
                for (v, stored) in rows {
                    layers(versions.entry(v).or_default()).read(stored);
                }
            }
        }
        book.keys
            .get_mut(name)
            .map(|v| v.iter_mut().map(|(k, e)| (*k, layers(e).shown())).collect())
            .unwrap_or_default()
    }

    /// Merges every version's pending counts into the store (no sync: the next group commit
    /// or sled's own flush makes it durable), in transactions of at most [`FLUSH_KEYS`] keys.
    /// Counts that could not be written stay pending for the next flush. Returns how many
    /// versions were written.
    pub fn flush(&self, store: &dyn Store) -> Result<usize> {
        let _one = self
            .flush_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let taken: Vec<Taken> = {
            let mut book = self.lock();
            let mut taken = Vec::new();
            for (name, versions) in &mut book.keys {
                for (version, e) in versions.iter_mut().filter(|(_, e)| e.pending()) {
                    taken.push(Taken {
                        name: name.clone(),
                        version: *version,
                        usage: e.usage.start_flush(),
                        activity: e.activity.start_flush(),
                    });
                }
            }
            taken
        };
        let mut outcomes: Vec<Option<Merged>> = Vec::with_capacity(taken.len());
        let mut failure = None;
        for chunk in taken.chunks(FLUSH_KEYS / 2) {
            if !store_down(&failure) {
                match merge_into_store(store, chunk) {
                    Ok(Some(merged)) => {
                        outcomes.extend(merged.into_iter().map(Some));
                        continue;
                    }
                    Err(e @ Error::Unavailable(_)) => failure = Some(e),
                    // A lost race, a chunk too large for one transaction, a record that does
                    // not read: each version on its own, so that one does not hold back the
                    // others.
                    Ok(None) | Err(_) => {}
                }
            }
            for t in chunk {
                let outcome = if store_down(&failure) {
                    Ok(None)
                } else {
                    merge_alone(store, t)
                };
                match outcome {
                    Ok(Some(merged)) => outcomes.push(Some(merged)),
                    Ok(None) => {
                        failure.get_or_insert_with(|| {
                            Error::Conflict(
                                "usage counters kept changing; kept for the next flush".into(),
                            )
                        });
                        outcomes.push(None);
                    }
                    Err(e) => {
                        if matches!(e, Error::Unavailable(_)) || failure.is_none() {
                            failure = Some(e);
                        }
                        outcomes.push(None);
                    }
                }
            }
        }
        let mut book = self.lock();
        let mut written = 0;
        for (t, outcome) in taken.iter().zip(outcomes) {
            let Some(e) = book
                .keys
                .get_mut(&t.name)
                .and_then(|v| v.get_mut(&t.version))
            else {
                continue;
            };
            match outcome {
                Some((usage, activity)) => {
                    e.usage.flushed(usage);
                    e.activity.flushed(activity);
                    written += 1;
                }
                None => {
                    e.usage.flush_failed();
                    e.activity.flush_failed();
                }
            }
        }
        book.flushes += 1;
        match failure {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether the flush met a store that is down, or that could not tell whether it wrote: the
/// rest waits for the next flush rather than each version waiting out a timeout of its own.
fn store_down(failure: &Option<Error>) -> bool {
    matches!(failure, Some(Error::Unavailable(_)))
}

/// Merges one version's counts into the store, reading again after each lost race: None if
/// it lost [`MAX_ATTEMPTS`] times.
fn merge_alone(store: &dyn Store, taken: &Taken) -> Result<Option<Merged>> {
    for _ in 0..MAX_ATTEMPTS {
        if let Some(mut merged) = merge_into_store(store, std::slice::from_ref(taken))? {
            return Ok(merged.pop());
        }
    }
    Ok(None)
}

/// One transaction merging `taken`'s counts into what the store holds, guarded on the bytes
/// read: what the store holds after it, or None if another process wrote first.
fn merge_into_store(store: &dyn Store, taken: &[Taken]) -> Result<Option<Vec<Merged>>> {
    let mut batch = Batch::new();
    let mut merged = Vec::with_capacity(taken.len());
    for t in taken {
        let key = version_key(&t.name, t.version);
        let usage = merge_stored(store, &mut batch, &key, &t.usage)?;
        let activity = merge_stored(store, &mut batch, &key, &t.activity)?;
        merged.push((usage, activity));
    }
    match store.commit(batch) {
        Ok(()) => Ok(Some(merged)),
        Err(StoreError::Conflict) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Stages `add` merged into the stored record at `key`, guarded on the bytes read.
fn merge_stored<T: Merge>(store: &dyn Store, batch: &mut Batch, key: &[u8], add: &T) -> Result<T> {
    let raw = store.get(T::TREE, key)?;
    let mut value = match &raw {
        Some(raw) => decode::<T>(T::WHAT, raw)?,
        None => T::default(),
    };
    value.merge_from(add);
    batch.guard(T::TREE, key, raw);
    batch.put(T::TREE, key, encode(&value));
    Ok(value)
}

/// Every stored version's record of `name`.
fn read_versions<T: Merge>(store: &dyn Store, name: &str) -> Result<Vec<(u64, T)>> {
    const CHUNK: usize = 256;
    let mut prefix = name.as_bytes().to_vec();
    prefix.push(0);
    let mut start = prefix.clone();
    let mut out = Vec::new();
    loop {
        let got = store.scan(T::TREE, &prefix, &start, CHUNK)?;
        let done = got.len() < CHUNK;
        for (k, raw) in got {
            if let Some((n, version)) = split_version_key(&k) {
                if n == name {
                    out.push((version, decode(T::WHAT, &raw)?));
                }
            }
            start = k;
            start.push(0);
        }
        if done {
            return Ok(out);
        }
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

    fn sled() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        (dir, Arc::new(store))
    }

    fn use_at<'a>(
        result: usize,
        endpoint: &'a str,
        at: Millis,
        ip: &'a str,
        charged: bool,
    ) -> Use<'a> {
        Use {
            result,
            endpoint,
            at,
            client_ip: ip,
            scopes: &[],
            charged,
        }
    }

    #[tokio::test]
    async fn counts_persist_and_endpoints_are_bounded() {
        let (_dir, store) = sled();
        let book = UsageBook::default();
        book.record("k", 1, use_at(1, "/orders", 50, "10.0.0.1", true));
        book.record("k", 2, use_at(10, "/orders", 55, "", false));
        for i in 0..100 {
            let e = format!("/e{i}");
            book.record("k", 2, use_at(1, &e, 60 + i, "", true));
        }
        assert_eq!(book.last_used("k"), Some(159));
        assert_eq!(book.flush(&*store).unwrap(), 2);
        assert_eq!(book.flush(&*store).unwrap(), 0);

        let again = UsageBook::default();
        again.load(&store).unwrap();
        let v = again.get("k");
        assert_eq!(v[&1].last_client_ip, "10.0.0.1");
        assert_eq!(v[&2].total, 101);
        assert_eq!(v[&2].results[10], 1);
        assert_eq!(v[&2].endpoints.len(), MAX_ENDPOINTS + 1);
        assert_eq!(v[&2].endpoints[OTHER_ENDPOINT], 101 - MAX_ENDPOINTS as u64);
        assert_eq!(again.last_used("nope"), None);
        assert_eq!(
            again.activity("k"),
            book.activity("k"),
            "activity persists too"
        );
    }

    #[test]
    fn activity_is_bounded_and_groups_networks() {
        let book = UsageBook::default();
        let scopes = vec!["s:read".to_owned()];
        let day0 = 100 * WINDOW_MS;
        // Two hosts of one /24, one IPv6 host, one mapped address (counted as IPv4).
        for (i, ip) in ["10.1.2.3", "10.1.2.200", "2001:db8::1", "::ffff:10.9.9.9"]
            .iter()
            .enumerate()
        {
            book.record(
                "k",
                1,
                Use {
                    scopes: &scopes,
                    ..use_at(1, "", day0 + i as u64, ip, true)
                },
            );
        }
        let a = &book.activity("k")[&1];
        let nets: Vec<String> = a
            .networks_since(day0)
            .into_iter()
            .map(|(n, _)| network_text(n))
            .collect();
        assert_eq!(nets, ["10.9.9.0/24", "2001:db8::/64", "10.1.2.0/24"]);
        assert_eq!(a.networks[&"10.1.2.0".parse::<IpAddr>().unwrap()].count, 2);
        assert_eq!(a.recent.len(), 4);
        assert_eq!(a.recent[0].scopes, scopes);
        assert_eq!(a.hours.len(), 1);
        assert_eq!(a.hours[0].results[1], 4);

        // A flood from many networks over many hours stays within every bound.
        for i in 0..10_000u64 {
            let ip = format!("10.{}.{}.1", i / 256 % 256, i % 256);
            let result = if i % 2 == 0 { 1 } else { 8 };
            book.record(
                "k",
                1,
                use_at(result, "", day0 + i * HOUR_MS / 10, &ip, false),
            );
        }
        let a = &book.activity("k")[&1];
        assert_eq!(a.hours.len(), ACTIVITY_HOURS);
        assert_eq!(a.networks.len(), MAX_NETWORKS);
        assert_eq!(a.recent.len(), RECENT);
        assert!(
            a.recent.iter().all(|s| s.result == 1),
            "only successes are remembered"
        );
        let newest = a.hours.back().unwrap();
        assert_eq!(newest.start_ms % HOUR_MS, 0);
        assert!(a.networks_since(day0 + 999 * HOUR_MS).len() <= MAX_NETWORKS);
    }

    #[test]
    fn the_preview_judges_remembered_successes_with_verifys_checks() {
        let book = UsageBook::default();
        let read = vec!["orders:read".to_owned()];
        let write = vec!["orders:write".to_owned()];
        let at = 50 * WINDOW_MS;
        for (ip, scopes, result) in [
            ("10.0.0.1", &read, 1),
            ("192.168.1.1", &read, 1),
            ("", &write, 1),
            ("10.0.0.2", &read, 8),
        ] {
            book.record(
                "k",
                1,
                Use {
                    scopes,
                    ..use_at(result, "", at, ip, true)
                },
            );
        }
        let a = &book.activity("k")[&1];
        let only_10 = KeyPolicy {
            allowed_cidrs: crate::model::keypolicy::parse_cidrs(&["10.0.0.0/8".into()]).unwrap(),
            ..Default::default()
        };
        let both = vec!["orders:read".to_owned(), "orders:write".to_owned()];
        assert_eq!(a.would_refuse(at, &KeyPolicy::default(), &both), (0, 3));
        assert_eq!(
            a.would_refuse(at, &only_10, &both),
            (2, 3),
            "other network, no IP"
        );
        assert_eq!(
            a.would_refuse(at, &KeyPolicy::default(), &read),
            (1, 3),
            "a scope dropped"
        );
        assert_eq!(
            a.would_refuse(at + 1, &only_10, &read),
            (0, 0),
            "older than the window"
        );
    }

    /// Merges `a` and `b` both ways, checks that the order does not matter, and returns it.
    fn both_ways<T: Merge + PartialEq + std::fmt::Debug>(a: &T, b: &T) -> T {
        let mut ab = a.clone();
        ab.merge_from(b);
        let mut ba = b.clone();
        ba.merge_from(a);
        assert_eq!(ab, ba, "merging is commutative");
        ab
    }

    #[test]
    fn usage_merge_adds_and_keeps_the_later_use() {
        let mut a = VersionUsage::default();
        let mut b = VersionUsage::default();
        a.record(&use_at(1, "/orders", 100, "10.0.0.1", true));
        a.record(&use_at(8, "/orders", 300, "10.0.0.1", false));
        b.record(&use_at(1, "/orders", 200, "10.0.0.2", true));
        b.record(&use_at(1, "/users", 250, "10.0.0.3", true));
        let m = both_ways(&a, &b);
        assert_eq!(m.total, 4);
        assert_eq!(m.results[1], 3);
        assert_eq!(m.results[8], 1);
        assert_eq!(m.endpoints["/orders"], 3);
        assert_eq!(m.endpoints["/users"], 1);
        assert_eq!(
            (m.last_used_ms, m.last_client_ip.as_str()),
            (Some(250), "10.0.0.3")
        );
        assert_eq!(
            both_ways(&m, &VersionUsage::default()),
            m,
            "nothing merged changes nothing"
        );

        // Uses at the same instant on two replicas: the same winner either way.
        let mut c = VersionUsage::default();
        c.record(&use_at(1, "", 250, "10.0.0.9", true));
        assert_eq!(both_ways(&m, &c).last_client_ip, "10.0.0.9");
    }

    #[test]
    fn usage_merge_keeps_the_endpoint_bound() {
        let mut a = VersionUsage::default();
        let mut b = VersionUsage::default();
        let tags = MAX_ENDPOINTS as u64 + 6;
        for i in 0..tags {
            a.record(&use_at(1, &format!("/a{i}"), 1, "", false));
            b.record(&use_at(1, &format!("/b{i}"), 1, "", false));
            b.record(&use_at(1, &format!("/b{i}"), 1, "", false));
        }
        assert_eq!(a.endpoints[OTHER_ENDPOINT], 6);
        // Into nothing (a flush to an empty store), `(other)` — sorting first — takes no slot.
        assert_eq!(both_ways(&a, &VersionUsage::default()), a);
        for (x, y) in [(&a, &b), (&b, &a)] {
            let mut m = x.clone();
            m.merge(y);
            assert_eq!(m.endpoints.len(), MAX_ENDPOINTS + 1);
            assert_eq!(m.endpoints.values().sum::<u64>(), 3 * tags);
            assert_eq!(m.total, 3 * tags);
        }
    }

    #[test]
    fn activity_merge_adds_and_keeps_every_bound() {
        // Hours: 0..100 on one side, 50..200 on the other; the newest week stays.
        let (mut a, mut b) = (Activity::default(), Activity::default());
        for h in 0..200u64 {
            if h < 100 {
                a.record(&use_at(1, "", h * HOUR_MS, "", false), None);
            }
            if h >= 50 {
                b.record(&use_at(8, "", h * HOUR_MS + 5, "", false), None);
            }
        }
        let m = both_ways(&a, &b);
        assert_eq!(m.hours.len(), ACTIVITY_HOURS);
        assert_eq!(m.hours[0].start_ms, (200 - ACTIVITY_HOURS as u64) * HOUR_MS);
        assert!(m
            .hours
            .iter()
            .zip(m.hours.iter().skip(1))
            .all(|(x, y)| x.start_ms < y.start_ms));
        let h60 = m.hours.iter().find(|h| h.start_ms == 60 * HOUR_MS).unwrap();
        assert_eq!((h60.results[1], h60.results[8]), (1, 1));

        // Networks: 40 on each side, 10 shared; the 6 least recently seen go.
        let (mut a, mut b) = (Activity::default(), Activity::default());
        let net = |i: u64| -> IpAddr { format!("10.0.{i}.1").parse().unwrap() };
        for i in 0..40 {
            a.record(&use_at(8, "", 1000 + i, "", false), Some(net(i)));
            b.record(&use_at(8, "", 2000 + i, "", false), Some(net(i + 30)));
        }
        let m = both_ways(&a, &b);
        assert_eq!(m.networks.len(), MAX_NETWORKS);
        for i in 0..6 {
            assert!(
                !m.networks.contains_key(&network_of(net(i))),
                "10.0.{i}.0 forgotten"
            );
        }
        let shared = m.networks[&network_of(net(35))];
        assert_eq!((shared.count, shared.last_ms), (2, 2005));

        // Remembered verifications: interleaved in time, the newest RECENT stay, in order.
        let (mut a, mut b) = (Activity::default(), Activity::default());
        for i in 0..200u64 {
            a.record(&use_at(1, "", 10 + 20 * i, "", false), None);
            b.record(&use_at(1, "", 20 + 20 * i, "", false), None);
        }
        let m = both_ways(&a, &b);
        assert_eq!(m.recent.len(), RECENT);
        let times: Vec<Millis> = m.recent.iter().map(|s| s.at_ms).collect();
        let expected: Vec<Millis> = (400 - RECENT as u64..400).map(|i| 10 + 10 * i).collect();
        assert_eq!(times, expected);
    }

    /// Runs once, at a commit.
    type Hook<F> = Mutex<Option<Box<F>>>;

    /// A store that can fail commits, let another process commit first, and tells how many
    /// counter keys each commit wrote.
    struct Meddling {
        inner: SledStore,
        fail: std::sync::atomic::AtomicUsize,
        meddle: Hook<dyn FnOnce(&SledStore) + Send>,
        after: Hook<dyn FnOnce() + Send>,
        commits: Mutex<Vec<usize>>,
    }

    /// A book loaded from a new meddling store.
    fn meddled() -> (
        tempfile::TempDir,
        Arc<Meddling>,
        Arc<dyn Store>,
        Arc<UsageBook>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let meddling = Arc::new(Meddling {
            inner: SledStore::open(dir.path()).unwrap(),
            fail: 0.into(),
            meddle: Mutex::new(None),
            after: Mutex::new(None),
            commits: Mutex::new(Vec::new()),
        });
        let store: Arc<dyn Store> = meddling.clone();
        let book = Arc::new(UsageBook::default());
        book.load(&store).unwrap();
        (dir, meddling, store, book)
    }

    impl Store for Meddling {
        fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(tree, key)
        }
        fn scan(
            &self,
            tree: Tree,
            prefix: &[u8],
            start: &[u8],
            limit: usize,
        ) -> Result<Vec<crate::store::Entry>, StoreError> {
            self.inner.scan(tree, prefix, start, limit)
        }
        fn last(&self, tree: Tree) -> Result<Option<crate::store::Entry>, StoreError> {
            self.inner.last(tree)
        }
        fn commit(&self, batch: Batch) -> Result<(), StoreError> {
            let written = batch.written_keys(Tree::KeyUsage).count()
                + batch.written_keys(Tree::KeyActivity).count();
            self.commits.lock().unwrap().push(written);
            let failing = self.fail.load(std::sync::atomic::Ordering::SeqCst);
            if failing > 0 {
                self.fail
                    .store(failing - 1, std::sync::atomic::Ordering::SeqCst);
                return Err(StoreError::Unavailable("injected".into()));
            }
            if let Some(meddle) = self.meddle.lock().unwrap().take() {
                meddle(&self.inner);
            }
            self.inner.commit(batch)?;
            if let Some(after) = self.after.lock().unwrap().take() {
                after();
            }
            Ok(())
        }
        fn sync(&self) -> futures::future::BoxFuture<'_, Result<(), StoreError>> {
            self.inner.sync()
        }
        fn generation(&self) -> u64 {
            self.inner.generation()
        }
    }

    fn stored(store: &dyn Store, name: &str, version: u64) -> VersionUsage {
        let raw = store
            .get(Tree::KeyUsage, &version_key(name, version))
            .unwrap();
        decode("key usage", &raw.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn two_replicas_over_one_store_add_up() {
        let (_dir, store) = sled();
        let (a, b) = (UsageBook::default(), UsageBook::default());
        a.load(&store).unwrap();
        b.load(&store).unwrap();
        let mut last = 0;
        for round in 0..30u64 {
            for i in 0..round % 3 + 1 {
                a.record(
                    "k",
                    1,
                    use_at(1, "/a", 1000 + round * 10 + i, "10.0.0.1", true),
                );
            }
            b.record(
                "k",
                1,
                use_at(1, "/b", 1000 + round * 10 + 5, "10.0.0.2", true),
            );
            if round % 4 == 0 {
                b.record(
                    "k",
                    2,
                    use_at(8, "/b", 1000 + round * 10, "10.0.0.2", false),
                );
            }
            let book = if round % 2 == 0 { &a } else { &b };
            book.flush(&*store).unwrap();
            let now = stored(&*store, "k", 1).last_used_ms.unwrap();
            assert!(now >= last, "the last use never moves back: {now} < {last}");
            last = now;
        }
        // A later use flushed first, an earlier one after it: the later stays.
        a.record("k", 1, use_at(1, "/a", 9000, "10.0.0.1", true));
        b.record("k", 1, use_at(1, "/b", 8000, "10.0.0.2", true));
        a.flush(&*store).unwrap();
        assert_eq!(
            b.last_used("k"),
            Some(9000),
            "b shows a's flushed use at once"
        );
        assert_eq!(
            b.get("k")[&1].endpoints["/b"],
            31,
            "and its own, not yet written"
        );
        b.flush(&*store).unwrap();

        let fresh = UsageBook::default();
        fresh.load(&store).unwrap();
        let v = fresh.get("k");
        let a_uses: u64 = (0..30).map(|r| r % 3 + 1).sum::<u64>() + 1;
        assert_eq!(v[&1].endpoints["/a"], a_uses);
        assert_eq!(v[&1].endpoints["/b"], 31);
        assert_eq!(v[&1].total, a_uses + 31);
        assert_eq!(
            (v[&1].last_used_ms, v[&1].last_client_ip.as_str()),
            (Some(9000), "10.0.0.1")
        );
        assert_eq!(v[&2].total, 8);
        assert_eq!(
            v[&1].total,
            fresh.activity("k")[&1]
                .hours
                .iter()
                .map(|h| h.results.iter().sum::<u64>())
                .sum::<u64>()
        );
        for book in [&a, &b] {
            assert_eq!(book.get("k"), v, "each replica shows the merged value");
            assert_eq!(book.activity("k"), fresh.activity("k"));
        }
    }

    #[tokio::test]
    async fn a_lost_race_is_merged_again() {
        let (_dir, meddling, store, book) = meddled();
        for name in ["k1", "k2", "k3"] {
            book.record(name, 1, use_at(1, "/mine", 10, "10.0.0.1", true));
        }
        // Another replica flushes k2 between this flush's read and its commit.
        let other = UsageBook::default();
        other.record("k2", 1, use_at(1, "/theirs", 20, "10.0.0.2", true));
        *meddling.meddle.lock().unwrap() = Some(Box::new(move |s: &SledStore| {
            other.flush(s).unwrap();
        }));
        assert_eq!(book.flush(&*store).unwrap(), 3);
        let k2 = stored(&*store, "k2", 1);
        assert_eq!(k2.total, 2);
        assert_eq!(k2.last_used_ms, Some(20));
        assert_eq!(stored(&*store, "k1", 1).total, 1);
        assert_eq!(book.get("k2")[&1], k2);
        // The chunk lost, then each version went on its own.
        assert_eq!(*meddling.commits.lock().unwrap(), [6, 2, 2, 2]);
    }

    #[tokio::test]
    async fn a_failed_commit_keeps_the_counts_once() {
        let (_dir, meddling, store, book) = meddled();
        book.record("k", 1, use_at(1, "/e", 10, "", true));
        book.record("k", 1, use_at(1, "/e", 11, "", true));
        book.flush(&*store).unwrap();
        book.record("k", 1, use_at(1, "/e", 12, "", true));
        // The store is down: one failed commit, and every count waits for the next flush.
        book.record("k2", 1, use_at(1, "/e", 12, "", true));
        meddling.fail.store(1, std::sync::atomic::Ordering::SeqCst);
        let before = meddling.commits.lock().unwrap().len();
        assert!(book.flush(&*store).is_err());
        assert_eq!(meddling.commits.lock().unwrap().len(), before + 1);
        assert_eq!(stored(&*store, "k", 1).total, 2, "nothing written");
        assert_eq!(book.get("k")[&1].total, 3, "the count is still shown");
        book.record("k", 1, use_at(1, "/e", 13, "", true));
        assert_eq!(book.flush(&*store).unwrap(), 2);
        assert_eq!(stored(&*store, "k2", 1).total, 1);
        let v = stored(&*store, "k", 1);
        assert_eq!(
            (v.total, v.endpoints["/e"], v.last_used_ms),
            (4, 4, Some(13))
        );
        assert_eq!(book.get("k")[&1], v);
        assert_eq!(book.flush(&*store).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_flush_commits_in_small_transactions() {
        let (_dir, meddling, store, book) = meddled();
        for i in 0..100 {
            book.record(&format!("k{i}"), 1, use_at(1, "", 10, "", true));
        }
        assert_eq!(book.flush(&*store).unwrap(), 100);
        let commits = meddling.commits.lock().unwrap().clone();
        assert_eq!(
            commits,
            [FLUSH_KEYS, FLUSH_KEYS, FLUSH_KEYS, 200 - 3 * FLUSH_KEYS]
        );
        assert_eq!(stored(&*store, "k99", 1).total, 1);
    }

    #[tokio::test]
    async fn a_read_during_a_flush_counts_nothing_twice() {
        let (_dir, meddling, store, book) = meddled();
        book.record("k", 1, use_at(1, "", 10, "", true));
        book.record("k", 1, use_at(1, "", 11, "", true));
        book.flush(&*store).unwrap();
        book.record("k", 1, use_at(1, "", 12, "", true));
        // Read after the commit landed, before the flush took note of it.
        let seen = Arc::new(Mutex::new(None));
        let (reader, into) = (book.clone(), seen.clone());
        *meddling.after.lock().unwrap() = Some(Box::new(move || {
            *into.lock().unwrap() = Some(reader.get("k")[&1].total);
        }));
        book.flush(&*store).unwrap();
        assert_eq!(*seen.lock().unwrap(), Some(3));
        assert_eq!(book.get("k")[&1].total, 3);
    }

    #[tokio::test]
    async fn a_record_that_does_not_read_holds_back_only_itself() {
        let (_dir, meddling, store, book) = meddled();
        let mut garbage = Batch::new();
        garbage.put(Tree::KeyUsage, version_key("bad", 1), b"?".to_vec());
        store.commit(garbage).unwrap();
        book.record("bad", 1, use_at(1, "", 10, "", true));
        book.record("good", 1, use_at(1, "", 10, "", true));
        assert!(matches!(book.flush(&*store), Err(Error::DataLoss(_))));
        assert_eq!(stored(&*store, "good", 1).total, 1);
        // The garbage, then good's own commit: the chunk never reached the store.
        assert_eq!(*meddling.commits.lock().unwrap(), [1, 2]);
        assert_eq!(book.get("bad")[&1].total, 1, "bad's count is kept");
    }
}
