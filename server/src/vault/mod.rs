//! The domain: every vault operation, below the transport (no tonic types here) and above the
//! envelope and the store.
//!
//! - here: the [`Vault`] type, its parts and the checks every operation shares (authorization
//!   that leaks nothing, environments, owners);
//! - [`write`]: the one write path (replay, CAS, audit record, retry, commit, durability wait,
//!   telling the [`ChangeSink`]s);
//! - `secrets`: PutSecret and the reads; `api_keys`: IssueKey and UpdateKeyPolicy;
//!   `lifecycle`: rotate, revoke, version states, destroy; `versions`: adding and opening a
//!   version; `admin`: keyring and master-key rotation; [`backup`]: snapshots, the backup
//!   file format and restore; [`usage`]: API keys' usage counters.

mod admin;
mod api_keys;
pub mod backup;
mod cache;
mod follow;
mod lifecycle;
mod secrets;
pub mod usage;
mod versions;
mod write;

pub use admin::{KeyringInfo, MasterKeyRotation, TermInfo};
pub use api_keys::{IssueInput, Issued, PolicyUpdate};
pub use lifecycle::{
    DestroyDone, DestroyInput, RevokeDone, RevokeInput, RotateInput, Rotated, SetStateInput,
    StateSet,
};
pub use secrets::{
    page_token, parse_page_token, ListInput, Page, PutInput, DEFAULT_PAGE_SIZE,
    DEFAULT_UNUSED_DAYS, MAX_PAGE_SIZE, MAX_UNUSED_DAYS,
};
pub use versions::Fetched;
pub(crate) use versions::NewValue;
pub(crate) use write::rewrite;
pub use write::{ChangeSink, Written};

use crate::audit::AuditLog;
use crate::clock::{Clock, Millis};
use crate::envelope::{DerivedKey, IndexKey, Keyring, FINGERPRINT_LABEL};
use crate::error::{Error, Result};
use crate::identity::Peer;
use crate::model::{check_text, Kind, SecretName, SecretRecord, VersionState, MAX_OWNER};
use crate::policy::{Policy, Verb};
use crate::store::{decode, scan_all, Store, Tree};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use usage::UsageBook;
use ward::keyformat::ApiKey;

/// Settings the vault needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Prefix of generated API keys.
    pub issuer: String,
    /// Allowed environments.
    pub environments: Vec<String>,
    /// Environment of new secrets when none is named.
    pub default_environment: String,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
    /// Most items in a batch fetch.
    pub max_batch: usize,
    /// Overlap for a replaced PRIMARY, in milliseconds (0: retire at once).
    pub grace_ms: u64,
    /// Most versions one secret may hold.
    pub max_versions_per_secret: usize,
    /// Most watch streams one identity may have open.
    pub max_watches_per_identity: usize,
    /// Most stored records one ListSecrets call, or one step of a watch stream, examines.
    pub scan_budget: usize,
}

/// The vault: everything a call needs, shared by all calls.
pub struct Vault {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) audit: Arc<AuditLog>,
    /// Swapped whole when a keyring term is added; readers clone the Arc and never wait on a
    /// rotation.
    pub(crate) keyring: RwLock<Arc<Keyring>>,
    /// Serialises keyring and master-key rotations.
    admin_lock: tokio::sync::Mutex<()>,
    pub(crate) index: IndexKey,
    /// Keys the fingerprints of values (derived from the index key; never stored).
    fingerprints: DerivedKey,
    pub(crate) policy: Policy,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) settings: Settings,
    usage: Arc<UsageBook>,
    /// Who follows changes (watch streams, the sweeper's index): told by the write path.
    sinks: Vec<Arc<dyn ChangeSink>>,
    /// Decoded secret records for reads, invalidated by the write path.
    records: cache::RecordCache,
}

impl Vault {
    /// Assembles a vault from its parts. `audit` must live in `store`; `sinks` are told of
    /// every change (see [`ChangeSink`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        keyring: Keyring,
        index: IndexKey,
        policy: Policy,
        clock: Arc<dyn Clock>,
        settings: Settings,
        sinks: Vec<Arc<dyn ChangeSink>>,
    ) -> Self {
        Self {
            store,
            audit,
            keyring: RwLock::new(Arc::new(keyring)),
            admin_lock: tokio::sync::Mutex::new(()),
            fingerprints: index.derive(FINGERPRINT_LABEL),
            index,
            policy,
            clock,
            usage: Arc::new(UsageBook::default()),
            settings,
            sinks,
            records: cache::RecordCache::default(),
        }
    }

    /// The keyring in force now.
    pub(crate) fn keyring(&self) -> Arc<Keyring> {
        // A poisoned lock only means a writer panicked between two whole-Arc assignments; the
        // Arc inside is still a complete keyring.
        self.keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The store (with the key directory in step).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The authorization policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The vault's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// API keys' usage counters.
    pub fn usage(&self) -> &Arc<UsageBook> {
        &self.usage
    }

    /// The audit log every call is recorded in.
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// The vault's clock reading.
    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    /// Versions of every secret by kind and state in force now (for metrics). Scans the store.
    pub fn count_versions(&self) -> Result<BTreeMap<(Kind, VersionState), u64>> {
        let now = self.now();
        let mut counts = BTreeMap::new();
        for (_, raw) in scan_all(&*self.store, Tree::Secrets)? {
            let s: SecretRecord = decode("secret", &raw)?;
            for v in &s.versions {
                *counts.entry((s.kind, v.state_at(now))).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// The keyed hash an API key is indexed by (HMAC-SHA256 under the index key).
    pub fn key_hash(&self, key: &ApiKey) -> [u8; 32] {
        self.index
            .hash("ward/apikey/v1", &[key.expose().as_bytes()])
    }

    pub(crate) fn authorize(
        &self,
        peer: &Peer,
        verb: Verb,
        name: &SecretName,
        env: Option<&str>,
    ) -> Result<()> {
        if self.policy.allows(&peer.identity, verb, name.as_str(), env) {
            Ok(())
        } else {
            Err(denied(peer, verb, name))
        }
    }

    /// Checks an owner a caller asks for. It goes out as the `x-ward-key-owner` header on
    /// every request a key authorizes, so it is one line of text; and it names who answers for
    /// the secret, so only an admin may name someone other than itself.
    fn check_owner(&self, peer: &Peer, name: &SecretName, owner: &str) -> Result<()> {
        if owner.is_empty() {
            return Ok(());
        }
        check_text("owner", owner, MAX_OWNER)?;
        if owner.chars().any(char::is_control) {
            return Err(Error::invalid(format!(
                "owner {} contains a control character",
                crate::model::excerpt(owner)
            )));
        }
        if owner != &*peer.identity && !self.policy.grants_everywhere(&peer.identity, Verb::Admin) {
            return Err(Error::PermissionDenied {
                identity: peer.identity.to_string(),
                verb: Verb::Admin.name(),
                target: format!(
                    "{name} (naming an owner other than the caller, {}, takes admin)",
                    crate::model::excerpt(owner)
                ),
            });
        }
        Ok(())
    }

    /// Loads `name` (stored bytes and record) for a caller that needs `verb` on it, answering
    /// so that a caller learns nothing it may not see: without a grant on the name anywhere,
    /// PERMISSION_DENIED before the store is read; with a grant limited to some environments,
    /// the same PERMISSION_DENIED whether the secret is missing or lives in another
    /// environment; NOT_FOUND only to a caller whose grant covers every environment.
    pub(crate) fn load_for(
        &self,
        peer: &Peer,
        verb: Verb,
        name: &SecretName,
    ) -> Result<(Vec<u8>, SecretRecord)> {
        self.authorize(peer, verb, name, None)?;
        let Some(raw) = self.store.get(Tree::Secrets, name.as_str().as_bytes())? else {
            return Err(
                if self
                    .policy
                    .allows_in_every_environment(&peer.identity, verb, name.as_str())
                {
                    Error::NotFound(format!("secret {name}"))
                } else {
                    denied(peer, verb, name)
                },
            );
        };
        let secret: SecretRecord = decode("secret", &raw)?;
        self.authorize(peer, verb, name, Some(&secret.environment))?;
        Ok((raw, secret))
    }

    /// [`Vault::load_for`] for a read: the decoded record, from the cache when it holds it
    /// (see [`cache`]), without the stored bytes a write would guard on.
    pub(crate) fn load_for_read(
        &self,
        peer: &Peer,
        verb: Verb,
        name: &SecretName,
    ) -> Result<Arc<SecretRecord>> {
        let (cached, epoch) = self.records.get(name.as_str(), self.store.generation());
        if let Some(secret) = cached {
            // The same checks, in the same order, as a read of the store.
            self.authorize(peer, verb, name, None)?;
            self.authorize(peer, verb, name, Some(&secret.environment))?;
            return Ok(secret);
        }
        let (_, secret) = self.load_for(peer, verb, name)?;
        let secret = Arc::new(secret);
        self.records.keep(name.as_str(), secret.clone(), epoch);
        Ok(secret)
    }

    pub(crate) fn check_environment(&self, env: &str) -> Result<()> {
        if self.settings.environments.iter().any(|e| e == env) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "unknown environment {} (configured: {})",
                crate::model::excerpt(env),
                self.settings.environments.join(", ")
            )))
        }
    }

    pub(crate) fn load(&self, name: &SecretName) -> Result<SecretRecord> {
        let raw = self
            .store
            .get(Tree::Secrets, name.as_str().as_bytes())?
            .ok_or_else(|| Error::NotFound(format!("secret {name}")))?;
        decode("secret", &raw)
    }

    /// Applies read-time deadlines to every version's state.
    pub(crate) fn as_of_now(&self, mut secret: SecretRecord) -> SecretRecord {
        secret.settle(self.now());
        secret
    }

    /// The keyed fingerprint stored with a new version of `name` holding `value`.
    pub(crate) fn value_fingerprint(&self, name: &str, value: &[u8]) -> [u8; 16] {
        self.fingerprints.fingerprint(name, value)
    }

    pub(crate) fn fingerprint(&self, method: &str, parts: &[&[u8]]) -> [u8; 32] {
        self.index.hash(method, parts)
    }

    pub(crate) fn key_id(&self, key: &ApiKey) -> String {
        hex::encode(&self.key_hash(key)[..8])
    }

    /// Refuses a value over `max_value_bytes`.
    pub(crate) fn check_value_size(&self, len: usize) -> Result<()> {
        if len > self.settings.max_value_bytes {
            return Err(Error::invalid(format!(
                "value is {len} bytes; the limit is {}",
                self.settings.max_value_bytes
            )));
        }
        Ok(())
    }
}

/// The one refusal for a caller without `verb` on `name` (in the environment concerned).
pub(crate) fn denied(peer: &Peer, verb: Verb, name: &SecretName) -> Error {
    Error::PermissionDenied {
        identity: peer.identity.to_string(),
        verb: verb.name(),
        target: name.to_string(),
    }
}

#[cfg(test)]
mod tests;
