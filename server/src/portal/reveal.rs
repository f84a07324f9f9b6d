//! A new key, shown once. Creating or rolling a key is a POST answered with a redirect (so a
//! reload never repeats the action); the key waits here, in memory only, for the one GET of
//! `/reveal` by the same session and identity, which takes it. A second look, a reload, another
//! session or a wait past [`REVEAL_TTL`] finds nothing. The key never enters a URL, the disk or
//! a log; it is zeroized when dropped (`ApiKey`).

use crate::identity::Peer;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use ward::keyformat::ApiKey;

/// How long a new key waits to be shown.
pub const REVEAL_TTL: Duration = Duration::from_secs(120);
/// Keys waiting at once (one per session; the oldest is dropped past it).
pub const MAX_WAITING: usize = 1024;

/// A key waiting to be shown.
pub struct Waiting {
    /// Who made it (only they may see it).
    pub identity: String,
    /// The key's secret name.
    pub name: String,
    /// Its version.
    pub version: u64,
    /// The key.
    pub key: ApiKey,
    /// What happened ("created", "rolled").
    pub what: &'static str,
    at: Instant,
}

/// Keys waiting to be shown, by session.
#[derive(Default)]
pub struct Reveals {
    waiting: Mutex<HashMap<String, Waiting>>,
}

impl Reveals {
    /// Puts `key` aside for `session` (replacing one not yet shown).
    pub fn put(
        &self,
        session: &str,
        peer: &Peer,
        name: &str,
        version: u64,
        key: ApiKey,
        what: &'static str,
    ) {
        let mut w = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        w.retain(|_, k| k.at.elapsed() < REVEAL_TTL);
        if w.len() >= MAX_WAITING && !w.contains_key(session) {
            let oldest = w.iter().min_by_key(|(_, k)| k.at).map(|(s, _)| s.clone());
            if let Some(s) = oldest {
                w.remove(&s);
            }
        }
        w.insert(
            session.to_owned(),
            Waiting {
                identity: peer.identity.to_string(),
                name: name.to_owned(),
                version,
                key,
                what,
                at: Instant::now(),
            },
        );
    }

    /// Takes the key waiting for `session`, if `peer` made it and it is still fresh.
    pub fn take(&self, session: &str, peer: &Peer) -> Option<Waiting> {
        let mut w = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let k = w.remove(session)?;
        (k.identity == *peer.identity && k.at.elapsed() < REVEAL_TTL).then_some(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> Peer {
        Peer {
            identity: id.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn a_key_is_taken_once_by_its_maker() {
        let r = Reveals::default();
        let key = || ApiKey::generate("ward", "dev").unwrap();
        r.put("s", &peer("alice"), "k", 1, key(), "created");
        assert!(r.take("other", &peer("alice")).is_none());
        assert!(r.take("s", &peer("alice")).is_some());
        assert!(r.take("s", &peer("alice")).is_none(), "shown once");
        r.put("s", &peer("alice"), "k", 1, key(), "created");
        assert!(r.take("s", &peer("bob")).is_none(), "another identity");
        assert!(r.take("s", &peer("alice")).is_none(), "and then gone");
    }
}
