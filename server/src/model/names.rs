//! Validated names and ids (made only by parsing) and the checks on free text that every
//! input goes through. A leaf: the records (model/mod.rs) and the key policy build on it.

use crate::error::{Error, Result};
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
