//! The vault's own words: validated names and ids (made only by parsing), and the records
//! kept in the store.

use crate::clock::Millis;
use crate::error::{Error, Result};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A caller-supplied value.
    Static,
    /// An API key generated by Ward.
    ApiKey,
}

/// The lifecycle state of a version, as stored. See [`VersionMeta::state_at`] for the state
/// in force at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// CRC32C of the value.
    pub checksum: u32,
    /// Keyring term whose key wraps the data key.
    pub term: u32,
    /// API keys: the non-reversible key id.
    pub key_id: Option<String>,
}

impl VersionMeta {
    /// The state in force at `now`: deadlines are enforced when read, not only by a sweeper.
    pub fn state_at(&self, now: Millis) -> VersionState {
        match (self.state, self.grace_until_ms) {
            (VersionState::Active, Some(until)) if now >= until => VersionState::Inactive,
            (state, _) => state,
        }
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
            checksum: 0,
            term: 1,
            key_id: None,
        };
        assert_eq!(m.state_at(99), VersionState::Active);
        assert_eq!(m.state_at(100), VersionState::Inactive);
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
