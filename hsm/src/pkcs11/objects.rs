//! The long-lived key objects this crate keeps on a token: their kinds, the templates they are
//! made with and found by, and the per-token cache of their handles.

use std::sync::Mutex;

use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};

use super::context::lock;
use crate::HsmError;

/// Template of a new master key (AES-256, token object, private, sensitive, not extractable).
pub(super) fn master_key_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Search template for the master key `label`.
fn master_key_query(label: &str) -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Template of a new audit MAC key (256-bit generic secret for CKM_SHA256_HMAC: token object,
/// private, sensitive, not extractable, good for signing and verifying only).
fn mac_key_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// The kinds of long-lived key this crate keeps on a token. Their handles share one cache, so
/// each kind has its own cache key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyKind {
    /// AES-256 master key (wraps key material).
    Master,
    /// Generic-secret HMAC key (signs audit checkpoints).
    Mac,
}

impl KeyKind {
    pub(super) fn query(self, label: &str) -> Vec<Attribute> {
        match self {
            KeyKind::Master => master_key_query(label).to_vec(),
            KeyKind::Mac => vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
        }
    }

    pub(super) fn template(self, label: &str) -> Vec<Attribute> {
        match self {
            KeyKind::Master => master_key_template(label),
            KeyKind::Mac => mac_key_template(label),
        }
    }

    /// Key of the handle cache. Master keys keep their bare label (as before MAC keys existed).
    fn cache_key(self, label: &str) -> String {
        match self {
            KeyKind::Master => label.to_owned(),
            KeyKind::Mac => format!("\0mac\0{label}"),
        }
    }

    pub(super) fn noun(self) -> &'static str {
        match self {
            KeyKind::Master => "master key",
            KeyKind::Mac => "MAC key",
        }
    }

    pub(super) fn missing(self, label: &str) -> HsmError {
        let label = label.to_owned();
        match self {
            KeyKind::Master => HsmError::MasterKeyMissing { label },
            KeyKind::Mac => HsmError::MacKeyMissing { label },
        }
    }

    pub(super) fn exists(self, label: &str) -> HsmError {
        let label = label.to_owned();
        match self {
            KeyKind::Master => HsmError::MasterKeyExists { label },
            KeyKind::Mac => HsmError::MacKeyExists { label },
        }
    }
}

/// What a token's keys are known by in this process.
pub(super) struct KeyCache {
    /// Key handles by cache key (valid in every session of this process until a reconnect).
    handles: Mutex<Vec<(String, ObjectHandle)>>,
    /// Keys this process has found or created on the token. Ward never deletes one, so one of
    /// these going missing means the token lost its storage or is unreachable (SoftHSM then
    /// answers C_FindObjects with an empty list), not that the key never existed.
    seen: Mutex<Vec<(KeyKind, String)>>,
}

impl KeyCache {
    pub(super) fn new() -> Self {
        Self {
            handles: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn cached(&self, kind: KeyKind, label: &str) -> Option<ObjectHandle> {
        let key = kind.cache_key(label);
        lock(&self.handles)
            .iter()
            .find(|(l, _)| *l == key)
            .map(|(_, h)| *h)
    }

    pub(super) fn remember(&self, kind: KeyKind, label: &str, handle: ObjectHandle) {
        let key = kind.cache_key(label);
        let mut handles = lock(&self.handles);
        handles.retain(|(l, _)| *l != key);
        handles.push((key, handle));
        drop(handles);
        let mut seen = lock(&self.seen);
        if !seen.iter().any(|(k, l)| *k == kind && l == label) {
            seen.push((kind, label.to_owned()));
        }
    }

    pub(super) fn forget(&self, kind: KeyKind, label: &str) {
        let key = kind.cache_key(label);
        lock(&self.handles).retain(|(l, _)| *l != key);
    }

    /// Forgets every handle (they die with the sessions at a reconnect); the keys stay seen.
    pub(super) fn forget_handles(&self) {
        lock(&self.handles).clear();
    }

    pub(super) fn has_seen(&self, kind: KeyKind, label: &str) -> bool {
        lock(&self.seen)
            .iter()
            .any(|(k, l)| *k == kind && l == label)
    }

    /// Every key seen so far.
    pub(super) fn seen(&self) -> Vec<(KeyKind, String)> {
        lock(&self.seen).clone()
    }
}
