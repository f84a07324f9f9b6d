//! Usage counters of API keys: per key and version, verifications by result and by endpoint
//! tag, the last use and the client IP of that use. They feed GetKeyUsage and the stale-key
//! report (ListSecrets with `unused_keys`). Beside them each version keeps its recent
//! [`Activity`] for the portal: counts per hour by result (a week), the client networks seen
//! in the last 24 h (who still uses an old key), and the latest successful verifications (to
//! preview what a tighter policy would have refused). Every part is bounded, whatever callers send.
//!
//! Counters are statistics, not a ledger: they are kept in memory and written to the store in
//! one batch every few seconds and at shutdown (no fsync of their own; they ride the next
//! group commit). A crash may lose the last few seconds of counts; quota charges, which must
//! be exact, live in the quota ledger instead. Endpoint tags are caller-supplied, so each
//! version keeps at most [`MAX_ENDPOINTS`] of them and counts the rest under `(other)`.

use crate::clock::Millis;
use crate::error::Result;
use crate::model::keypolicy::{canonical, grants_scopes, KeyPolicy};
use crate::model::VerifyResult;
use crate::store::scan_all;
use crate::store::{decode, encode, version_key, Batch, Store, Tree};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
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
                let oldest = self
                    .networks
                    .iter()
                    .min_by_key(|(_, s)| s.last_ms)
                    .map(|(n, _)| *n);
                if let Some(oldest) = oldest {
                    self.networks.remove(&oldest);
                }
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

struct Entry {
    usage: VersionUsage,
    activity: Activity,
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
    /// When.
    pub at: Millis,
    /// The end client's IP as the verifier sent it (may be empty).
    pub client_ip: &'a str,
    /// Scopes the verifier required.
    pub scopes: &'a [String],
    /// A VALID verification with a non-zero cost: a use of the key.
    pub charged: bool,
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
                    activity: Activity::default(),
                    dirty: false,
                },
            );
        }
        // Activity is written with its counters; counters stored before activity was kept
        // simply start with none.
        for (k, raw) in scan_all(store, Tree::KeyActivity)? {
            let Some((name, version)) = split_version_key(&k) else {
                continue;
            };
            let activity: Activity = decode("key activity", &raw)?;
            if let Some(e) = keys.get_mut(&name).and_then(|v| v.get_mut(&version)) {
                e.activity = activity;
            }
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
            activity: Activity::default(),
            dirty: true,
        });
        let ip = u.client_ip.parse::<IpAddr>().ok().map(canonical);
        e.activity.record(&u, ip);
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
        if u.charged && usage.last_used_ms.is_none_or(|t| t <= u.at) {
            usage.last_used_ms = Some(u.at);
            usage.last_client_ip = u.client_ip.to_owned();
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

    /// Every version's recent activity of `name`, oldest version first.
    pub fn activity(&self, name: &str) -> BTreeMap<u64, Activity> {
        self.lock()
            .get(name)
            .map(|v| v.iter().map(|(k, e)| (*k, e.activity.clone())).collect())
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
                        batch.put(
                            Tree::KeyActivity,
                            version_key(name, *v),
                            encode(&e.activity),
                        );
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
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let book = UsageBook::default();
        book.record("k", 1, use_at(1, "/orders", 50, "10.0.0.1", true));
        book.record("k", 2, use_at(10, "/orders", 55, "", false));
        for i in 0..100 {
            let e = format!("/e{i}");
            book.record("k", 2, use_at(1, &e, 60 + i, "", true));
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
}
