//! The vault's own words: validated names and ids (made only by parsing), and the records
//! kept in the store.

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::keypolicy::KeyPolicy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Longest secret name, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Most labels on one secret.
pub const MAX_LABELS: usize = 64;
/// Most scopes on one key.
pub const MAX_SCOPES: usize = 64;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION: usize = 1024;
/// Longest owner, in bytes.
pub const MAX_OWNER: usize = 256;

/// A secret name: `[a-z0-9][a-z0-9._/-]*`, at most 256 bytes, no `//`, no `..`, no trailing
/// `/`. Only [`SecretName::parse`] makes one, so every holder knows it is valid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretName(String);

impl SecretName {
    /// Parses a name, saying what is wrong with a bad one.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Err(Error::invalid(format!("invalid secret name: {why}")));
        if s.is_empty() {
            return bad("empty");
        }
        if s.len() > MAX_NAME_LEN {
            return bad("longer than 256 bytes");
        }
        let first = s.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return bad("must start with a-z or 0-9");
        }
        if let Some(c) = s.chars().find(|&c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '/' | '-'))
        }) {
            return bad(&format!(
                "character {c:?} is not allowed (use a-z 0-9 . _ / -)"
            ));
        }
        if s.contains("//") {
            return bad("contains //");
        }
        if s.contains("..") {
            return bad("contains ..");
        }
        if s.ends_with('/') {
            return bad("ends with /");
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An idempotency key: `[A-Za-z0-9._:-]{1,128}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// Parses an optional request id: empty means none.
    pub fn parse_optional(s: &str) -> Result<Option<Self>> {
        if s.is_empty() {
            return Ok(None);
        }
        if s.len() > 128
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(Error::invalid(
                "invalid request_id: use 1 to 128 characters of A-Z a-z 0-9 . _ : -",
            ));
        }
        Ok(Some(Self(s.to_owned())))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A caller's input quoted in an error message, cut to a readable length: messages travel in
/// the `grpc-message` header, and echoing a megabyte there breaks the reply (h2 refuses
/// headers that large, so the caller saw RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT).
pub fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = 48;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// Checks labels: keys `[a-z0-9._/-]{1,63}`, values at most 256 bytes.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid(format!("more than {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'/' | b'-')
            });
        if !key_ok {
            return Err(Error::invalid(format!(
                "invalid label key {}: use 1 to 63 characters of a-z 0-9 . _ / -",
                excerpt(k)
            )));
        }
        if v.len() > 256 {
            return Err(Error::invalid(format!(
                "label {k:?}: value longer than 256 bytes"
            )));
        }
    }
    Ok(())
}

/// Checks scopes: each `[a-z0-9:._-]{1,64}`, no duplicates.
pub fn check_scopes(scopes: &[String]) -> Result<()> {
    if scopes.len() > MAX_SCOPES {
        return Err(Error::invalid(format!("more than {MAX_SCOPES} scopes")));
    }
    for (i, s) in scopes.iter().enumerate() {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b':' | b'.' | b'_' | b'-')
            });
        if !ok {
            return Err(Error::invalid(format!(
                "invalid scope {}: use 1 to 64 characters of a-z 0-9 : . _ -",
                excerpt(s)
            )));
        }
        if scopes[..i].contains(s) {
            return Err(Error::invalid(format!("scope {s:?} given twice")));
        }
    }
    Ok(())
}

/// Checks free-text fields for length.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::invalid(format!("{field} longer than {max} bytes")));
    }
    Ok(())
}

/// What a secret holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A caller-supplied value.
    Static,
    /// An API key generated by Ward.
    ApiKey,
}

/// The lifecycle state of a version, as stored. See [`VersionMeta::state_at`] for the state
/// in force at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VersionState {
    /// The current version; exactly one per secret.
    Primary,
    /// Still valid until `grace_until`.
    Active,
    /// Retired.
    Inactive,
    /// Refused, for good.
    Revoked,
    /// Data key deleted, for good.
    Destroyed,
}

impl VersionState {
    /// The state's name as users see it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Primary => "PRIMARY",
            Self::Active => "ACTIVE",
            Self::Inactive => "INACTIVE",
            Self::Revoked => "REVOKED",
            Self::Destroyed => "DESTROYED",
        }
    }

    /// Whether the state machine lets a stored version move from `self` to `to`. REVOKED and
    /// DESTROYED never come back (a REVOKED version may still be destroyed); a version
    /// becomes PRIMARY only from ACTIVE; staying put is allowed.
    pub fn may_become(self, to: VersionState) -> bool {
        use VersionState::*;
        match (self, to) {
            (Destroyed, _) => false,
            (Revoked, Destroyed) => true,
            (Revoked, _) => false,
            (_, Revoked | Destroyed) => true,
            (Primary, Primary | Active | Inactive) => true,
            (Active, Primary | Active | Inactive) => true,
            (Inactive, Active | Inactive) => true,
            (Inactive, Primary) => false,
        }
    }
}

/// One version's metadata (its value lives apart, in the versions tree).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// 1, 2, …
    pub version: u64,
    /// Stored state.
    pub state: VersionState,
    /// When it was created.
    pub create_ms: Millis,
    /// For ACTIVE versions: when the overlap window closes.
    pub grace_until_ms: Option<Millis>,
    /// Keyed fingerprint of the value ([`crate::envelope::DerivedKey::fingerprint`]). Not a
    /// bare checksum: DescribeSecret shows it to holders of `list`, who must not be able to
    /// test guesses of the value against it. Fetch computes the value's CRC32C afresh.
    pub fingerprint: [u8; 16],
    /// Keyring term whose key wraps the data key.
    pub term: u32,
    /// API keys: the non-reversible key id.
    pub key_id: Option<String>,
    /// Expiry and the last state change (lifecycle).
    pub life: VersionLife,
}

impl VersionMeta {
    /// The state in force at `now` judged from this version alone (its grace period and its
    /// own expiry): deadlines are enforced when read, not only by a sweeper. Holders of the
    /// secret use [`SecretRecord::standing`], which also applies the secret's expiry.
    pub fn state_at(&self, now: Millis) -> VersionState {
        let expired = self.life.expire_ms.is_some_and(|at| now >= at);
        match (self.state, self.grace_until_ms) {
            (VersionState::Primary | VersionState::Active, _) if expired => VersionState::Inactive,
            (VersionState::Active, Some(until)) if now >= until => VersionState::Inactive,
            (state, _) => state,
        }
    }

    /// Whether the version may be used (fetched, or verified as an API key) at `now`: PRIMARY,
    /// or ACTIVE inside its grace window. The one rule every read path applies.
    pub fn is_usable_at(&self, now: Millis) -> bool {
        matches!(
            self.state_at(now),
            VersionState::Primary | VersionState::Active
        )
    }
}

/// A secret: metadata and every version's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// Name (the record's key).
    pub name: String,
    /// What it holds.
    pub kind: Kind,
    /// Environment, fixed at creation.
    pub environment: String,
    /// Owner.
    pub owner: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Free text.
    pub description: String,
    /// API keys: scopes granted.
    pub scopes: Vec<String>,
    /// Identity that created it.
    pub created_by: String,
    /// Creation time.
    pub create_ms: Millis,
    /// Last change.
    pub update_ms: Millis,
    /// The PRIMARY version's number.
    pub primary: u64,
    /// Every version, oldest first.
    pub versions: Vec<VersionMeta>,
    /// API keys: allowed CIDRs, rate limit, quota, expiry (default for STATIC secrets).
    pub key_policy: KeyPolicy,
    /// Rotation schedule, grace default, expiry and revocation (lifecycle).
    pub life: SecretLife,
}

impl SecretRecord {
    /// The version with this number, or the PRIMARY for 0.
    pub fn version(&self, version: u64) -> Option<&VersionMeta> {
        let v = if version == 0 { self.primary } else { version };
        self.versions.iter().find(|m| m.version == v)
    }

    /// The number the next version gets.
    pub fn next_version(&self) -> u64 {
        self.versions.last().map_or(1, |m| m.version + 1)
    }

    /// When `v` stops working for deadline reasons: its own expiry or the secret's, whichever
    /// comes first.
    pub fn expiry_of(&self, v: &VersionMeta) -> Option<Millis> {
        match (v.life.expire_ms, self.life.expire_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The state `v` is in at `now`, why, and since when. Deadlines (grace_until, expire_time)
    /// are applied here, when read, so nothing depends on the sweeper having run. This is the
    /// one place that decides it; [`SecretRecord::usable`] and [`SecretRecord::settle`] build
    /// on it.
    pub fn standing(&self, v: &VersionMeta, now: Millis) -> Standing {
        if matches!(v.state, VersionState::Primary | VersionState::Active) {
            if let Some(at) = self.expiry_of(v).filter(|&at| now >= at) {
                return Standing {
                    state: VersionState::Inactive,
                    reason: Some(StateReason::Expired),
                    since_ms: Some(at),
                };
            }
            if let (VersionState::Active, Some(until)) = (v.state, v.grace_until_ms) {
                if now >= until {
                    return Standing {
                        state: VersionState::Inactive,
                        reason: Some(StateReason::GraceEnded),
                        since_ms: Some(until),
                    };
                }
            }
        }
        Standing {
            state: v.state,
            reason: v.life.reason.clone(),
            since_ms: v.life.changed_ms,
        }
    }

    /// Whether `version` (0: the PRIMARY) may be used at `now` — fetched, or presented as an
    /// API key. The one judgement shared by fetch and key verification: PRIMARY and ACTIVE
    /// within their deadlines are usable; anything else is FAILED_PRECONDITION naming why.
    pub fn usable(&self, version: u64, now: Millis) -> Result<(&VersionMeta, VersionState)> {
        let meta = self
            .version(version)
            .ok_or_else(|| Error::NotFound(format!("version {version} of {}", self.name)))?;
        let standing = self.standing(meta, now);
        match standing.state {
            VersionState::Primary | VersionState::Active => Ok((meta, standing.state)),
            state => Err(Error::FailedPrecondition(format!(
                "version {} of {} is {}{}",
                meta.version,
                self.name,
                state.name(),
                standing.explain()
            ))),
        }
    }

    /// Writes every version's state as in force at `now` into the record (what the sweeper
    /// stores so Describe, List and watchers see the truth). Returns whether anything changed.
    pub fn settle(&mut self, now: Millis) -> bool {
        let mut changed = false;
        for i in 0..self.versions.len() {
            let standing = self.standing(&self.versions[i], now);
            let v = &mut self.versions[i];
            if standing.state != v.state {
                v.state = standing.state;
                v.life.reason = standing.reason;
                v.life.changed_ms = standing.since_ms;
                changed = true;
            }
        }
        changed
    }
}

/// A version's state as in force at some time, with why and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// The state in force.
    pub state: VersionState,
    /// Why the version left its previous state, if it did.
    pub reason: Option<StateReason>,
    /// When it entered this state, if known.
    pub since_ms: Option<Millis>,
}

impl Standing {
    /// `": <reason> (since <time>)"`, or empty when there is nothing to say.
    pub fn explain(&self) -> String {
        match (&self.reason, self.since_ms) {
            (Some(r), Some(t)) => format!(": {r} at {}", crate::clock::rfc3339(t)),
            (Some(r), None) => format!(": {r}"),
            (None, _) => String::new(),
        }
    }
}

/// Why a version is in its state. Shown to callers, so it never holds a secret: revocation
/// reasons are operator text, limited and checked when given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateReason {
    /// A newer PRIMARY replaced it.
    Replaced {
        /// The version that replaced it.
        by_version: u64,
    },
    /// Its grace period ended.
    GraceEnded,
    /// Its expire_time (or the secret's) passed.
    Expired,
    /// Revoked.
    Revoked {
        /// Identity that revoked it.
        by: String,
        /// The reason given.
        reason: String,
    },
    /// Destroyed (data key deleted).
    Destroyed {
        /// Identity that destroyed it.
        by: String,
    },
    /// Moved by SetVersionState (or promoted in place of a revoked or destroyed PRIMARY).
    SetBy {
        /// Identity that moved it.
        by: String,
    },
}

impl fmt::Display for StateReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Replaced { by_version } => write!(f, "replaced by version {by_version}"),
            Self::GraceEnded => f.write_str("grace period ended"),
            Self::Expired => f.write_str("expired"),
            Self::Revoked { by, reason } => write!(f, "revoked by {by}: {reason}"),
            Self::Destroyed { by } => write!(f, "destroyed by {by}"),
            Self::SetBy { by } => write!(f, "set by {by}"),
        }
    }
}

/// A version's lifecycle fields (`Default`: no expiry, never moved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionLife {
    /// The version's own expiry.
    pub expire_ms: Option<Millis>,
    /// When the stored state last changed.
    pub changed_ms: Option<Millis>,
    /// Why it is in its stored state.
    pub reason: Option<StateReason>,
    /// The version that was PRIMARY when this one replaced it.
    pub replaced: Option<u64>,
}

/// A whole-secret revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Identity that revoked it.
    pub by: String,
    /// The reason given.
    pub reason: String,
    /// When.
    pub time_ms: Millis,
}

/// A secret's lifecycle fields (`Default`: no schedule, server grace, no expiry, not revoked).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretLife {
    /// Scheduled rotation period, in milliseconds.
    pub rotation_period_ms: Option<u64>,
    /// When the next scheduled rotation is due.
    pub next_rotation_ms: Option<Millis>,
    /// STATIC secrets: the due time of a scheduled rotation still waiting for a value.
    pub rotation_due_ms: Option<Millis>,
    /// Grace period for a replaced PRIMARY, in milliseconds (None: the server's default).
    pub grace_ms: Option<u64>,
    /// When the whole secret expires.
    pub expire_ms: Option<Millis>,
    /// Set once the whole secret is revoked.
    pub revoked: Option<Revocation>,
}

/// What a completed idempotent request returned, kept to answer its retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The RPC.
    pub method: String,
    /// Keyed hash of the request's content: a retry must match it.
    pub fingerprint: [u8; 32],
    /// Secret written.
    pub name: String,
    /// Version written.
    pub version: u64,
}

/// Where an API key's keyed hash points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIndexEntry {
    /// Secret holding the key.
    pub name: String,
    /// Version holding the key.
    pub version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "db/password", "svc-1/api_key.v2", "0"] {
            assert!(SecretName::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(257);
        for bad in [
            "",
            "A",
            "/a",
            "a//b",
            "a/../b",
            "a/",
            "-a",
            "a b",
            "é",
            long.as_str(),
        ] {
            assert!(SecretName::parse(bad).is_err(), "{bad}");
        }
        assert!(SecretName::parse(&"a".repeat(256)).is_ok());
    }

    #[test]
    fn request_ids() {
        assert_eq!(RequestId::parse_optional("").unwrap(), None);
        assert!(RequestId::parse_optional("req-1:a.b_c").unwrap().is_some());
        assert!(RequestId::parse_optional("has space").is_err());
        assert!(RequestId::parse_optional(&"x".repeat(129)).is_err());
    }

    #[test]
    fn grace_is_enforced_at_read_time() {
        let m = VersionMeta {
            version: 1,
            state: VersionState::Active,
            create_ms: 0,
            grace_until_ms: Some(100),
            fingerprint: [0; 16],
            term: 1,
            key_id: None,
            life: VersionLife::default(),
        };
        assert_eq!(m.state_at(99), VersionState::Active);
        assert_eq!(m.state_at(100), VersionState::Inactive);
        assert!(m.is_usable_at(99));
        assert!(!m.is_usable_at(100));
    }

    #[test]
    fn scopes_and_labels() {
        assert!(check_scopes(&["read:users".into(), "write".into()]).is_ok());
        assert!(check_scopes(&["Read".into()]).is_err());
        assert!(check_scopes(&["a".into(), "a".into()]).is_err());
        let mut l = BTreeMap::new();
        l.insert("team".to_string(), "payments".to_string());
        assert!(check_labels(&l).is_ok());
        l.insert("Bad Key".to_string(), String::new());
        assert!(check_labels(&l).is_err());
    }
}
