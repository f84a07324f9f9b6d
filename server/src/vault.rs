//! The vault's operations: authorization, validation, versioning, envelope encryption, store
//! commits and audit, in that order. Below the service layer: no tonic types here.

mod admin;
mod backup;

pub use admin::{KeyringInfo, MasterKeyRotation, TermInfo};

use crate::audit::{AuditLog, AuditRecord};
use crate::clock::{Clock, Millis};
use crate::envelope::{DerivedKey, IndexKey, Keyring, SealedValue, FINGERPRINT_LABEL};
use crate::error::{Code, Error, Result};
use crate::keypolicy::{parse_cidrs, KeyPolicy, KeyPolicyInput, PolicyMask, RateLimit};
use crate::keys::usage::UsageBook;
use crate::lifecycle::input::{LifecycleInput, LifecyclePolicy};
use crate::lifecycle::sweeper::SweepIndex;
use crate::lifecycle::watch::WatchHub;
use crate::model::{
    check_labels, check_scopes, check_text, KeyIndexEntry, Kind, RequestId, RequestRecord,
    SecretLife, SecretName, SecretRecord, VersionLife, VersionMeta, VersionState, MAX_DESCRIPTION,
    MAX_OWNER,
};
use crate::policy::{Policy, Verb};
use crate::store::{decode, encode, request_key, version_key, Batch, Store, StoreError, Tree};
use crate::tls::Peer;
use base64::Engine;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use ward::keyformat::ApiKey;
use zeroize::Zeroizing;

/// Optimistic-concurrency attempts before a write gives up with ABORTED.
pub(crate) const MAX_ATTEMPTS: usize = 8;
/// Largest page of ListSecrets.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Page size when the request names none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Days of the stale-key report when the request names none.
pub const DEFAULT_UNUSED_DAYS: u32 = 90;
/// Longest stale-key window, in days.
pub const MAX_UNUSED_DAYS: u32 = 3650;
const DAY_MS: u64 = 24 * 3600 * 1000;

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
    /// Tells watchers which secrets changed (lifecycle/watch.rs).
    pub(crate) watch: WatchHub,
    /// The sweeper's deadlines; every secret write marks its name here (lifecycle/sweeper.rs).
    pub(crate) sweep_index: SweepIndex,
}

/// PutSecret's input, as received.
pub struct PutInput {
    /// Secret name (unparsed).
    pub name: String,
    /// The value; zeroized on drop.
    pub value: Zeroizing<Vec<u8>>,
    /// Environment, or empty.
    pub environment: String,
    /// Owner, or empty.
    pub owner: String,
    /// Labels (replace when non-empty).
    pub labels: BTreeMap<String, String>,
    /// Description (replaces when non-empty).
    pub description: String,
    /// Compare-and-set on the PRIMARY version (0: must not exist).
    pub expected_version: Option<u64>,
    /// Idempotency key, or empty.
    pub request_id: String,
    /// Lifecycle policy fields (rotation period, default grace, expiry).
    pub lifecycle: LifecycleInput,
}

/// IssueKey's input, as received.
pub struct IssueInput {
    /// Secret name (unparsed).
    pub name: String,
    /// Environment, or empty.
    pub environment: String,
    /// Owner, or empty.
    pub owner: String,
    /// Scopes the key grants.
    pub scopes: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Description.
    pub description: String,
    /// Idempotency key, or empty.
    pub request_id: String,
    /// Lifecycle policy fields (rotation period, default grace, expiry).
    pub lifecycle: LifecycleInput,
}

/// What a write produced.
#[derive(Debug, Clone)]
pub struct Written {
    /// Secret name.
    pub name: String,
    /// New version.
    pub version: u64,
    /// CRC32C of the value.
    pub checksum: u32,
    /// Creation time of the version.
    pub create_ms: Millis,
}

/// What IssueKey produced.
#[derive(Debug)]
pub struct Issued {
    /// The version written.
    pub written: Written,
    /// The plaintext key (zeroized on drop).
    pub key: ApiKey,
    /// Non-reversible key id.
    pub key_id: String,
}

/// A fetched version.
pub struct Fetched {
    /// Secret name.
    pub name: String,
    /// Version number.
    pub version: u64,
    /// State in force now.
    pub state: VersionState,
    /// The value (zeroized on drop).
    pub value: Zeroizing<Vec<u8>>,
    /// CRC32C of the value, checked.
    pub checksum: u32,
    /// Kind of secret.
    pub kind: Kind,
    /// Environment.
    pub environment: String,
    /// Creation time of the version.
    pub create_ms: Millis,
    /// ACTIVE versions: when the overlap window closes.
    pub grace_until_ms: Option<Millis>,
    /// When the version expires (its own expiry or the secret's, whichever is first).
    pub expire_ms: Option<Millis>,
}

/// Filters and paging of ListSecrets.
#[derive(Debug, Default)]
pub struct ListInput {
    /// 0: default.
    pub page_size: u32,
    /// From the previous page, or empty.
    pub page_token: String,
    /// Name prefix filter.
    pub name_prefix: String,
    /// Environment filter.
    pub environment: String,
    /// Owner filter.
    pub owner: String,
    /// Label filters (all must match).
    pub labels: BTreeMap<String, String>,
    /// Stale-key report: only API keys never used or unused for this many days (0: 90).
    pub unused_days: Option<u32>,
}

/// UpdateKeyPolicy's input, as received.
#[derive(Debug, Default)]
pub struct PolicyUpdate {
    /// Secret name (unparsed).
    pub name: String,
    /// New scopes (when the mask names them).
    pub scopes: Vec<String>,
    /// New policy fields (those the mask names).
    pub policy: KeyPolicyInput,
    /// Field-mask paths; empty: every field.
    pub mask: Vec<String>,
    /// Idempotency key, or empty.
    pub request_id: String,
}

/// One page of ListSecrets.
pub struct Page {
    /// Secrets on this page, in name order.
    pub secrets: Vec<SecretRecord>,
    /// Token of the next page; empty on the last.
    pub next_page_token: String,
}

impl Vault {
    /// Assembles a vault from its parts. `audit` must live in `store`.
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        keyring: Keyring,
        index: IndexKey,
        policy: Policy,
        clock: Arc<dyn Clock>,
        settings: Settings,
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
            watch: WatchHub::new(settings.max_watches_per_identity),
            settings,
            sweep_index: SweepIndex::default(),
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

    /// The broadcast that tells watchers of changes; closing it ends every watch stream and
    /// the sweeper (at shutdown).
    pub fn watch_hub(&self) -> &WatchHub {
        &self.watch
    }

    /// The audit log every call is recorded in.
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// The vault's clock reading.
    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    // ---- PutSecret -------------------------------------------------------------------------

    /// Stores a caller-supplied value as a new PRIMARY version.
    pub async fn put(&self, peer: &Peer, input: PutInput) -> Result<Written> {
        let mut rec = AuditRecord::new(peer, "PutSecret", self.now());
        rec.targets.push((input.name.clone(), 0));
        rec.request_id = input.request_id.clone();
        let result = self.put_inner(peer, &input, &mut rec).await;
        let written = self.finish_write(rec, result).await?;
        self.watch.publish(&written.name);
        Ok(written)
    }

    async fn put_inner(
        &self,
        peer: &Peer,
        input: &PutInput,
        rec: &mut AuditRecord,
    ) -> Result<Written> {
        let name = SecretName::parse(&input.name)?;
        self.authorize(peer, Verb::Write, &name, None)?;
        let request_id = RequestId::parse_optional(&input.request_id)?;
        if input.value.is_empty() {
            return Err(Error::invalid("value is empty"));
        }
        if input.value.len() > self.settings.max_value_bytes {
            return Err(Error::invalid(format!(
                "value is {} bytes; the limit is {}",
                input.value.len(),
                self.settings.max_value_bytes
            )));
        }
        check_labels(&input.labels)?;
        check_text("description", &input.description, MAX_DESCRIPTION)?;
        self.check_owner(peer, &name, &input.owner)?;
        if !input.environment.is_empty() {
            self.check_environment(&input.environment)?;
        }
        let policy = LifecyclePolicy::parse(&input.lifecycle, self.now())?;
        let fingerprint = self.fingerprint(
            "PutSecret",
            &[
                name.as_str().as_bytes(),
                &input.value,
                input.environment.as_bytes(),
                input.owner.as_bytes(),
                &encode(&input.labels),
                input.description.as_bytes(),
                &encode(&input.expected_version),
                &encode(&input.lifecycle),
            ],
        );

        for _ in 0..MAX_ATTEMPTS {
            if let Some(id) = &request_id {
                if let Some(done) = self.replay(peer, id, "PutSecret", &fingerprint)? {
                    rec.targets = vec![(done.name.clone(), done.version)];
                    return Ok(done);
                }
            }
            let raw = self.store.get(Tree::Secrets, name.as_str().as_bytes())?;
            let existing: Option<SecretRecord> =
                raw.as_deref().map(|b| decode("secret", b)).transpose()?;
            if let Some(s) = &existing {
                // Before anything about the secret is told (its version, kind, environment):
                // those are for callers that may write it.
                self.authorize(peer, Verb::Write, &name, Some(&s.environment))?;
            }
            check_cas(&name, existing.as_ref(), input.expected_version)?;
            let now = self.now();
            let mut secret = match existing {
                Some(s) => {
                    if s.kind == Kind::ApiKey {
                        return Err(Error::FailedPrecondition(format!(
                            "{name} is an API key; Ward generates its values (rotate it instead)"
                        )));
                    }
                    if !input.environment.is_empty() && input.environment != s.environment {
                        return Err(Error::invalid(format!(
                            "{name} belongs to environment {:?}; a secret's environment never changes",
                            s.environment
                        )));
                    }
                    s
                }
                None => SecretRecord {
                    name: name.to_string(),
                    kind: Kind::Static,
                    environment: if input.environment.is_empty() {
                        self.settings.default_environment.clone()
                    } else {
                        input.environment.clone()
                    },
                    owner: peer.identity.to_string(),
                    labels: BTreeMap::new(),
                    description: String::new(),
                    scopes: Vec::new(),
                    created_by: peer.identity.to_string(),
                    create_ms: now,
                    update_ms: now,
                    primary: 0,
                    versions: Vec::new(),
                    key_policy: KeyPolicy::default(),
                    life: SecretLife::default(),
                },
            };
            self.authorize(peer, Verb::Write, &name, Some(&secret.environment))?;
            if !input.owner.is_empty() {
                secret.owner = input.owner.clone();
            }
            if !input.labels.is_empty() {
                secret.labels = input.labels.clone();
            }
            if !input.description.is_empty() {
                secret.description = input.description.clone();
            }
            policy.apply(&mut secret, now);
            secret.check_accepts_versions(now)?;
            self.check_version_room(&secret)?;
            let version = secret.next_version();
            let sealed = self.keyring().seal(name.as_str(), version, &input.value)?;
            let written = self.add_version(&mut secret, version, &input.value, &sealed, None, now);
            rec.targets = vec![(name.to_string(), version)];

            let mut batch = Batch::new();
            batch.guard(Tree::Secrets, name.as_str().as_bytes(), raw);
            batch.put(Tree::Secrets, name.as_str().as_bytes(), encode(&secret));
            batch.put(
                Tree::Versions,
                version_key(name.as_str(), version),
                encode(&sealed),
            );
            self.stage_request(
                &mut batch,
                peer,
                request_id.as_ref(),
                "PutSecret",
                fingerprint,
                &written,
            );
            match self.commit_with_audit(batch, rec).await {
                Err(Error::Conflict(_)) => continue,
                other => other?,
            }
            return Ok(written);
        }
        Err(Error::Conflict(format!(
            "{name} is being changed concurrently; retry"
        )))
    }

    // ---- IssueKey --------------------------------------------------------------------------

    /// Generates an API key and stores it as a new API_KEY secret.
    pub async fn issue(&self, peer: &Peer, input: IssueInput) -> Result<Issued> {
        self.issue_with_policy(peer, input, KeyPolicyInput::default())
            .await
    }

    /// [`Vault::issue`] with a key policy (CIDRs, rate limit, quota, expiry).
    pub async fn issue_with_policy(
        &self,
        peer: &Peer,
        input: IssueInput,
        policy: KeyPolicyInput,
    ) -> Result<Issued> {
        let mut rec = AuditRecord::new(peer, "IssueKey", self.now());
        rec.targets.push((input.name.clone(), 0));
        rec.request_id = input.request_id.clone();
        let result = self.issue_inner(peer, &input, &policy, &mut rec).await;
        let issued = self.finish_write(rec, result).await?;
        self.watch.publish(&issued.written.name);
        Ok(issued)
    }

    async fn issue_inner(
        &self,
        peer: &Peer,
        input: &IssueInput,
        policy_input: &KeyPolicyInput,
        rec: &mut AuditRecord,
    ) -> Result<Issued> {
        let name = SecretName::parse(&input.name)?;
        self.authorize(peer, Verb::Issue, &name, None)?;
        let request_id = RequestId::parse_optional(&input.request_id)?;
        check_scopes(&input.scopes)?;
        if policy_input.expire_ms.is_some_and(|t| t <= self.now()) {
            return Err(Error::invalid("expire_time is not in the future"));
        }
        let key_policy = parse_policy(
            policy_input,
            &KeyPolicy::default(),
            PolicyMask::ALL,
            self.now(),
        )?;
        check_labels(&input.labels)?;
        check_text("description", &input.description, MAX_DESCRIPTION)?;
        self.check_owner(peer, &name, &input.owner)?;
        let environment = if input.environment.is_empty() {
            self.settings.default_environment.clone()
        } else {
            self.check_environment(&input.environment)?;
            input.environment.clone()
        };
        self.authorize(peer, Verb::Issue, &name, Some(&environment))?;
        let policy = LifecyclePolicy::parse(&input.lifecycle, self.now())?;
        let fingerprint = self.fingerprint(
            "IssueKey",
            &[
                name.as_str().as_bytes(),
                environment.as_bytes(),
                input.owner.as_bytes(),
                &encode(&input.scopes),
                &encode(&input.labels),
                input.description.as_bytes(),
                &encode(&(
                    &policy_input.allowed_cidrs,
                    policy_input.rate_limit,
                    policy_input.quota,
                    policy_input.expire_ms,
                )),
                &encode(&input.lifecycle),
            ],
        );

        for _ in 0..MAX_ATTEMPTS {
            if let Some(id) = &request_id {
                if let Some(done) = self.replay(peer, id, "IssueKey", &fingerprint)? {
                    rec.targets = vec![(done.name.clone(), done.version)];
                    let (_, fetched) = self.read_version(&name, done.version)?;
                    let text = std::str::from_utf8(&fetched.value)
                        .map_err(|_| Error::DataLoss(format!("{name}: stored key is not text")))?;
                    let key = ApiKey::parse(text)
                        .map_err(|_| Error::DataLoss(format!("{name}: stored key is malformed")))?;
                    let key_id = self.key_id(&key);
                    rec.key_id = key_id.clone();
                    return Ok(Issued {
                        written: done,
                        key,
                        key_id,
                    });
                }
            }
            if let Some(raw) = self.store.get(Tree::Secrets, name.as_str().as_bytes())? {
                // Names are vault-wide: the name is taken either way, but only a caller that
                // may issue in the taken name's environment learns that it exists there.
                let taken: SecretRecord = decode("secret", &raw)?;
                self.authorize(peer, Verb::Issue, &name, Some(&taken.environment))?;
                return Err(Error::AlreadyExists(format!(
                    "{name} already exists (rotate it to get a new key)"
                )));
            }
            let now = self.now();
            let key = ApiKey::generate(&self.settings.issuer, &environment)
                .map_err(|e| Error::Internal(format!("key generation: {e}")))?;
            let hash = self.key_hash(&key);
            let key_id = hex::encode(&hash[..8]);
            let mut secret = SecretRecord {
                name: name.to_string(),
                kind: Kind::ApiKey,
                environment: environment.clone(),
                owner: if input.owner.is_empty() {
                    peer.identity.to_string()
                } else {
                    input.owner.clone()
                },
                labels: input.labels.clone(),
                description: input.description.clone(),
                scopes: input.scopes.clone(),
                created_by: peer.identity.to_string(),
                create_ms: now,
                update_ms: now,
                primary: 0,
                versions: Vec::new(),
                key_policy: key_policy.clone(),
                life: SecretLife::default(),
            };
            policy.apply(&mut secret, now);
            // A key's expiry is its secret's lifecycle expiry (one deadline, judged in one place).
            if secret.life.expire_ms.is_none() {
                secret.life.expire_ms = policy_input.expire_ms;
            }
            let value = key.expose().as_bytes();
            let sealed = self.keyring().seal(name.as_str(), 1, value)?;
            let written =
                self.add_version(&mut secret, 1, value, &sealed, Some(key_id.clone()), now);
            rec.targets = vec![(name.to_string(), 1)];
            rec.key_id = key_id.clone();

            let mut batch = Batch::new();
            batch.guard(Tree::Secrets, name.as_str().as_bytes(), None);
            batch.guard(Tree::KeyIndex, hash.to_vec(), None);
            batch.put(Tree::Secrets, name.as_str().as_bytes(), encode(&secret));
            batch.put(
                Tree::Versions,
                version_key(name.as_str(), 1),
                encode(&sealed),
            );
            batch.put(
                Tree::KeyIndex,
                hash.to_vec(),
                encode(&KeyIndexEntry {
                    name: name.to_string(),
                    version: 1,
                }),
            );
            self.stage_request(
                &mut batch,
                peer,
                request_id.as_ref(),
                "IssueKey",
                fingerprint,
                &written,
            );
            match self.commit_with_audit(batch, rec).await {
                Err(Error::Conflict(_)) => continue,
                other => other?,
            }
            return Ok(Issued {
                written,
                key,
                key_id,
            });
        }
        Err(Error::Conflict(format!(
            "{name} is being changed concurrently; retry"
        )))
    }

    // ---- reads -----------------------------------------------------------------------------

    /// Fetches one version's value. The value is returned only once the read's audit record
    /// is durable.
    pub async fn fetch(&self, peer: &Peer, name: &str, version: u64) -> Result<Fetched> {
        let mut rec = AuditRecord::new(peer, "FetchSecret", self.now());
        rec.targets.push((name.to_owned(), version));
        let result = self.fetch_one(peer, name, version);
        if let Ok(f) = &result {
            rec.targets = vec![(f.name.clone(), f.version)];
        }
        self.finish_read(rec, result).await
    }

    /// Fetches many versions, each authorized and reported on its own. One audit record covers
    /// the call; if it cannot be written, nothing is returned.
    pub async fn batch_fetch(
        &self,
        peer: &Peer,
        items: &[(String, u64)],
    ) -> Result<Vec<Result<Fetched>>> {
        let mut rec = AuditRecord::new(peer, "BatchFetchSecrets", self.now());
        let result = if items.is_empty() {
            Err(Error::invalid("no items"))
        } else if items.len() > self.settings.max_batch {
            Err(Error::invalid(format!(
                "{} items; at most {} per batch",
                items.len(),
                self.settings.max_batch
            )))
        } else {
            let results: Vec<Result<Fetched>> = items
                .iter()
                .map(|(n, v)| self.fetch_one(peer, n, *v))
                .collect();
            rec.targets = items
                .iter()
                .zip(&results)
                .map(|((n, v), r)| (n.clone(), r.as_ref().map_or(*v, |f| f.version)))
                .collect();
            rec.target_codes = results
                .iter()
                .map(|r| r.as_ref().map_or_else(|e| e.code().as_i32(), |_| 0))
                .collect();
            Ok(results)
        };
        self.finish_read(rec, result).await
    }

    fn fetch_one(&self, peer: &Peer, name: &str, version: u64) -> Result<Fetched> {
        let name = SecretName::parse(name)?;
        let (_, secret) = self.load_for(peer, Verb::Read, &name)?;
        let (_, fetched) = self.read_version_of(&secret, &name, version)?;
        Ok(fetched)
    }

    /// Reads and decrypts a version for internal use (no authorization, no audit).
    pub(crate) fn read_version(
        &self,
        name: &SecretName,
        version: u64,
    ) -> Result<(SecretRecord, Fetched)> {
        let secret = self.load(name)?;
        let (_, fetched) = self.read_version_of(&secret, name, version)?;
        Ok((secret, fetched))
    }

    fn read_version_of(
        &self,
        secret: &SecretRecord,
        name: &SecretName,
        version: u64,
    ) -> Result<(VersionMeta, Fetched)> {
        let (meta, state) = secret.usable(version, self.now())?;
        let blob = self
            .store
            .get(Tree::Versions, &version_key(name.as_str(), meta.version))?
            .ok_or_else(|| {
                Error::DataLoss(format!(
                    "value of {name} version {} is missing",
                    meta.version
                ))
            })?;
        let sealed: SealedValue = decode("sealed value", &blob)?;
        // AES-GCM with the name and version in its associated data has checked the value;
        // the CRC32C is computed here (it is stored nowhere) for the client to check in turn.
        let value = self.keyring().open(name.as_str(), meta.version, &sealed)?;
        let checksum = crc32c::crc32c(&value);
        let fetched = Fetched {
            name: name.to_string(),
            version: meta.version,
            state,
            value,
            checksum,
            kind: secret.kind,
            environment: secret.environment.clone(),
            create_ms: meta.create_ms,
            grace_until_ms: meta
                .grace_until_ms
                .filter(|_| state == VersionState::Active),
            expire_ms: secret.expiry_of(meta),
        };
        Ok((meta.clone(), fetched))
    }

    /// A secret's metadata, with each version's state as in force now.
    pub async fn describe(&self, peer: &Peer, name: &str) -> Result<SecretRecord> {
        let mut rec = AuditRecord::new(peer, "DescribeSecret", self.now());
        rec.targets.push((name.to_owned(), 0));
        let result = (|| {
            let name = SecretName::parse(name)?;
            let (_, secret) = self.load_for(peer, Verb::List, &name)?;
            Ok(self.as_of_now(secret))
        })();
        self.finish_read(rec, result).await
    }

    /// One page of the secrets the caller may list, in name order. The scan runs off the
    /// async workers and examines at most `scan_budget` records: a caller whose grants cover
    /// few of many secrets gets a short (even empty) page with a token to go on from.
    pub async fn list(self: &Arc<Self>, peer: &Peer, input: ListInput) -> Result<Page> {
        let rec = AuditRecord::new(peer, "ListSecrets", self.now());
        let (vault, caller) = (self.clone(), peer.clone());
        let result = tokio::task::spawn_blocking(move || vault.list_inner(&caller, &input))
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("list task: {e}"))));
        self.finish_read(rec, result).await
    }

    fn list_inner(&self, peer: &Peer, input: &ListInput) -> Result<Page> {
        if !self.policy.grants_any(&peer.identity, Verb::List) {
            return Err(Error::PermissionDenied {
                identity: peer.identity.to_string(),
                verb: Verb::List.name(),
                target: "*".into(),
            });
        }
        let page_size = match input.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::invalid(format!(
                    "page_size {n} exceeds {MAX_PAGE_SIZE}"
                )))
            }
            n => n,
        } as usize;
        if input.name_prefix.len() > crate::model::MAX_NAME_LEN {
            return Err(Error::invalid("name_prefix longer than 256 bytes"));
        }
        let unused_before = match input.unused_days {
            None => None,
            Some(d) if d > MAX_UNUSED_DAYS => {
                return Err(Error::invalid(format!(
                    "unused_days {d} exceeds {MAX_UNUSED_DAYS}"
                )))
            }
            Some(d) => {
                let days = if d == 0 { DEFAULT_UNUSED_DAYS } else { d };
                Some(self.now().saturating_sub(u64::from(days) * DAY_MS))
            }
        };
        let mut start = match parse_page_token(&input.page_token)? {
            None => Vec::new(),
            Some(last) => {
                let mut k = last.as_str().as_bytes().to_vec();
                k.push(0); // strictly after the last name returned
                k
            }
        };
        let mut secrets = Vec::new();
        let mut more = false;
        let (budget, mut examined) = (self.settings.scan_budget, 0usize);
        // Set when the budget ends the scan: the last name examined, to go on after.
        let mut resume_after: Option<Vec<u8>> = None;
        'scan: loop {
            let chunk =
                self.store
                    .scan(Tree::Secrets, input.name_prefix.as_bytes(), &start, 256)?;
            let exhausted = chunk.len() < 256;
            for (key, raw) in chunk {
                if examined == budget {
                    more = true;
                    resume_after = start.split_last().map(|(_, name)| name.to_vec());
                    break 'scan;
                }
                examined += 1;
                start = key;
                start.push(0);
                let s: SecretRecord = decode("secret", &raw)?;
                let visible =
                    self.policy
                        .allows(&peer.identity, Verb::List, &s.name, Some(&s.environment))
                        && (input.environment.is_empty() || s.environment == input.environment)
                        && (input.owner.is_empty() || s.owner == input.owner)
                        && input.labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))
                        && unused_before.is_none_or(|cutoff| {
                            s.kind == Kind::ApiKey
                                && self.usage.last_used(&s.name).is_none_or(|t| t < cutoff)
                        });
                if !visible {
                    continue;
                }
                if secrets.len() == page_size {
                    more = true;
                    break 'scan;
                }
                secrets.push(self.as_of_now(s));
            }
            if exhausted {
                break;
            }
        }
        let next_page_token = match (more, resume_after, secrets.last()) {
            (true, Some(name), _) => page_token(&String::from_utf8_lossy(&name)),
            (true, None, Some(last)) => page_token(&last.name),
            _ => String::new(),
        };
        Ok(Page {
            secrets,
            next_page_token,
        })
    }

    // ---- UpdateKeyPolicy -------------------------------------------------------------------

    /// Replaces the masked fields of an API key's policy. Setting the quota starts a fresh
    /// ledger (a new quota epoch); a retry under the same request id does not.
    pub async fn update_key_policy(
        &self,
        peer: &Peer,
        input: PolicyUpdate,
    ) -> Result<SecretRecord> {
        let mut rec = AuditRecord::new(peer, "UpdateKeyPolicy", self.now());
        rec.targets.push((input.name.clone(), 0));
        rec.request_id = input.request_id.clone();
        let result = self.update_policy_inner(peer, &input, &mut rec).await;
        self.finish_write(rec, result).await
    }

    async fn update_policy_inner(
        &self,
        peer: &Peer,
        input: &PolicyUpdate,
        rec: &mut AuditRecord,
    ) -> Result<SecretRecord> {
        let name = SecretName::parse(&input.name)?;
        self.authorize(peer, Verb::Issue, &name, None)?;
        let request_id = RequestId::parse_optional(&input.request_id)?;
        let mask = PolicyMask::parse(&input.mask)?;
        if mask.scopes {
            check_scopes(&input.scopes)?;
        }
        let fingerprint = self.fingerprint(
            "UpdateKeyPolicy",
            &[
                name.as_str().as_bytes(),
                &encode(&input.scopes),
                &encode(&(
                    &input.policy.allowed_cidrs,
                    input.policy.rate_limit,
                    input.policy.quota,
                    input.policy.expire_ms,
                )),
                &encode(&input.mask),
            ],
        );
        for _ in 0..MAX_ATTEMPTS {
            if let Some(id) = &request_id {
                if self
                    .replay(peer, id, "UpdateKeyPolicy", &fingerprint)?
                    .is_some()
                {
                    return Ok(self.as_of_now(self.load(&name)?));
                }
            }
            let (raw, mut secret) = self.load_for(peer, Verb::Issue, &name)?;
            if secret.kind != Kind::ApiKey {
                return Err(Error::FailedPrecondition(format!(
                    "{name} is not an API key; only API keys have a key policy"
                )));
            }
            let now = self.now();
            secret.key_policy = parse_policy(&input.policy, &secret.key_policy, mask, now)?;
            if mask.scopes {
                secret.scopes = input.scopes.clone();
            }
            // A key's expiry is its secret's lifecycle expiry: one deadline, judged in one
            // place (SecretRecord::standing) for fetch and verify alike.
            // Setting it to now (or earlier) expires the key at once, on purpose.
            if mask.expire_time {
                secret.life.expire_ms = input.policy.expire_ms;
            }
            secret.update_ms = now;
            rec.targets = vec![(name.to_string(), secret.primary)];
            let mut batch = Batch::new();
            batch.guard(Tree::Secrets, name.as_str().as_bytes(), Some(raw));
            batch.put(Tree::Secrets, name.as_str().as_bytes(), encode(&secret));
            let written = Written {
                name: name.to_string(),
                version: secret.primary,
                checksum: 0,
                create_ms: now,
            };
            self.stage_request(
                &mut batch,
                peer,
                request_id.as_ref(),
                "UpdateKeyPolicy",
                fingerprint,
                &written,
            );
            match self.commit_with_audit(batch, rec).await {
                Err(Error::Conflict(_)) => continue,
                other => other?,
            }
            return Ok(self.as_of_now(secret));
        }
        Err(Error::Conflict(format!(
            "{name} is being changed concurrently; retry"
        )))
    }

    /// Versions of every secret by kind and state in force now (for metrics). Scans the store.
    pub fn count_versions(&self) -> Result<BTreeMap<(Kind, VersionState), u64>> {
        let now = self.now();
        let mut counts = BTreeMap::new();
        for (_, raw) in crate::keys::directory::scan_all(&*self.store, Tree::Secrets)? {
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

    // ---- helpers ---------------------------------------------------------------------------

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

    /// Refuses a new version of a secret that holds `max_versions_per_secret` already: every
    /// version's metadata lives in the secret's record, which each fetch decodes.
    pub(crate) fn check_version_room(&self, secret: &SecretRecord) -> Result<()> {
        let max = self.settings.max_versions_per_secret;
        if secret.versions.len() >= max {
            return Err(Error::ResourceExhausted(format!(
                "{} holds {} versions, the most a secret may (limits.max_versions_per_secret); \
                 store further values under a new name",
                secret.name,
                secret.versions.len()
            )));
        }
        Ok(())
    }

    /// Appends a PRIMARY version, demoting the old PRIMARY to ACTIVE for the grace period
    /// (the secret's default, else the server's).
    fn add_version(
        &self,
        secret: &mut SecretRecord,
        version: u64,
        value: &[u8],
        sealed: &SealedValue,
        key_id: Option<String>,
        now: Millis,
    ) -> Written {
        let grace = secret.life.grace_ms.unwrap_or(self.settings.grace_ms);
        let checksum = crc32c::crc32c(value);
        secret.push_primary(
            VersionMeta {
                version,
                state: VersionState::Primary,
                create_ms: now,
                grace_until_ms: None,
                fingerprint: self.value_fingerprint(&secret.name, value),
                term: sealed.term,
                key_id,
                life: VersionLife::default(),
            },
            now,
            grace,
        );
        Written {
            name: secret.name.clone(),
            version,
            checksum,
            create_ms: now,
        }
    }

    /// The keyed fingerprint stored with a new version of `name` holding `value`.
    pub(crate) fn value_fingerprint(&self, name: &str, value: &[u8]) -> [u8; 16] {
        self.fingerprints.fingerprint(name, value)
    }

    /// CRC32C of a stored version's value, decrypted for the purpose (whatever the version's
    /// state; 0 once destroyed): the checksum is stored nowhere, and a retried write answers
    /// the one its first attempt did.
    fn stored_checksum(&self, name: &str, version: u64) -> Result<u32> {
        let Some(blob) = self
            .store
            .get(Tree::Versions, &version_key(name, version))?
        else {
            return Ok(0);
        };
        let sealed: SealedValue = decode("sealed value", &blob)?;
        let value = self.keyring().open(name, version, &sealed)?;
        Ok(crc32c::crc32c(&value))
    }

    pub(crate) fn fingerprint(&self, method: &str, parts: &[&[u8]]) -> [u8; 32] {
        self.index.hash(method, parts)
    }

    pub(crate) fn key_id(&self, key: &ApiKey) -> String {
        hex::encode(&self.key_hash(key)[..8])
    }

    /// The earlier result of this request id, if the same request already succeeded.
    pub(crate) fn replay(
        &self,
        peer: &Peer,
        id: &RequestId,
        method: &str,
        fingerprint: &[u8; 32],
    ) -> Result<Option<Written>> {
        let Some(raw) = self
            .store
            .get(Tree::Requests, &request_key(&peer.identity, id.as_str()))?
        else {
            return Ok(None);
        };
        let done: RequestRecord = decode("request record", &raw)?;
        if done.method != method || &done.fingerprint != fingerprint {
            return Err(Error::AlreadyExists(format!(
                "request_id {:?} was already used for a different request",
                id.as_str()
            )));
        }
        let name = SecretName::parse(&done.name)?;
        let secret = self.load(&name)?;
        let meta = secret.version(done.version).ok_or_else(|| {
            Error::DataLoss(format!(
                "request {:?} refers to a missing version",
                id.as_str()
            ))
        })?;
        Ok(Some(Written {
            checksum: self.stored_checksum(&done.name, meta.version)?,
            name: done.name,
            version: meta.version,
            create_ms: meta.create_ms,
        }))
    }

    pub(crate) fn stage_request(
        &self,
        batch: &mut Batch,
        peer: &Peer,
        id: Option<&RequestId>,
        method: &str,
        fingerprint: [u8; 32],
        written: &Written,
    ) {
        if let Some(id) = id {
            let key = request_key(&peer.identity, id.as_str());
            batch.guard(Tree::Requests, key.clone(), None);
            batch.put(
                Tree::Requests,
                key,
                encode(&RequestRecord {
                    method: method.to_owned(),
                    fingerprint,
                    name: written.name.clone(),
                    version: written.version,
                }),
            );
        }
    }

    /// Commits a batch together with the call's audit record (outcome OK). Every write of a
    /// secret record goes through here: the sweeper's index learns of it.
    pub(crate) async fn commit_with_audit(
        &self,
        batch: Batch,
        rec: &mut AuditRecord,
    ) -> Result<()> {
        rec.code = Code::Ok.as_i32();
        rec.time_ms = self.now();
        let written: Vec<Vec<u8>> = batch
            .written_keys(Tree::Secrets)
            .map(<[u8]>::to_vec)
            .collect();
        match self.audit.commit(batch, rec).await {
            Ok(()) => {
                self.sweep_index.touch(written.iter().map(Vec::as_slice));
                Ok(())
            }
            Err(StoreError::Conflict) => Err(Error::Conflict("concurrent change".into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Completes a write: on success the change and its audit record are committed, so wait
    /// for durability; on failure record the refusal.
    pub(crate) async fn finish_write<T>(
        &self,
        mut rec: AuditRecord,
        result: Result<T>,
    ) -> Result<T> {
        match result {
            // An idempotent replay committed nothing: the call still gets its own record.
            Ok(v) if rec.seq == 0 => {
                self.audit.append(rec).await?;
                Ok(v)
            }
            Ok(v) => {
                self.audit.synced(&rec).await.map_err(|e| {
                    tracing::error!(error = %e, "write not durable");
                    Error::Unavailable("storage unavailable: write not confirmed durable".into())
                })?;
                Ok(v)
            }
            Err(e) => {
                rec.code = e.code().as_i32();
                log_refusal(&rec, &e);
                self.audit.append(rec).await?;
                Err(e)
            }
        }
    }

    /// Completes a read: the audit record is durable before anything is returned.
    pub(crate) async fn finish_read<T>(
        &self,
        mut rec: AuditRecord,
        result: Result<T>,
    ) -> Result<T> {
        rec.code = match &result {
            Ok(_) => Code::Ok.as_i32(),
            Err(e) => {
                log_refusal(&rec, e);
                e.code().as_i32()
            }
        };
        self.audit.append(rec).await?;
        result
    }
}

/// The ListSecrets page token that continues after `last_name`: the name, base64url.
pub fn page_token(last_name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_name.as_bytes())
}

/// Parses a ListSecrets page token: empty is the first page, anything else must be a token
/// [`page_token`] made from a valid name (INVALID_ARGUMENT otherwise). The base64 decoder is
/// strict (no padding, no stray trailing bits), so each name has exactly one token.
pub fn parse_page_token(token: &str) -> Result<Option<SecretName>> {
    if token.is_empty() {
        return Ok(None);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| SecretName::parse(&s).ok())
        .map(Some)
        .ok_or_else(|| Error::invalid("invalid page_token"))
}

/// Builds a key policy: the fields `mask` names from `input`, the others from `current`.
/// Setting a quota gives it a new epoch (see [`KeyPolicy::set_quota`]), so its ledger starts at
/// the new limit.
fn parse_policy(
    input: &KeyPolicyInput,
    current: &KeyPolicy,
    mask: PolicyMask,
    now: Millis,
) -> Result<KeyPolicy> {
    let mut p = current.clone();
    if mask.allowed_cidrs {
        p.allowed_cidrs = parse_cidrs(&input.allowed_cidrs)?;
    }
    if mask.rate_limit {
        p.rate_limit = input
            .rate_limit
            .map(|(r, period, burst)| RateLimit::parse(r, period, burst))
            .transpose()?;
    }
    if mask.quota {
        p.set_quota(input.quota, now)?;
    }
    Ok(p)
}

/// The one refusal for a caller without `verb` on `name` (in the environment concerned).
pub(crate) fn denied(peer: &Peer, verb: Verb, name: &SecretName) -> Error {
    Error::PermissionDenied {
        identity: peer.identity.to_string(),
        verb: verb.name(),
        target: name.to_string(),
    }
}

fn log_refusal(rec: &AuditRecord, e: &Error) {
    tracing::info!(
        method = %rec.method,
        identity = %rec.identity,
        code = %e.code(),
        error = %e,
        "call refused"
    );
}

pub(crate) fn check_cas(
    name: &SecretName,
    existing: Option<&SecretRecord>,
    expected: Option<u64>,
) -> Result<()> {
    match (expected, existing) {
        (None, _) | (Some(0), None) => Ok(()),
        (Some(0), Some(s)) => Err(Error::Conflict(format!(
            "expected_version 0 (must not exist) but {name} is at version {}",
            s.primary
        ))),
        (Some(n), None) => Err(Error::Conflict(format!(
            "expected_version {n} but {name} does not exist"
        ))),
        (Some(n), Some(s)) if s.primary != n => Err(Error::Conflict(format!(
            "expected_version {n} but {name} is at version {}",
            s.primary
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::sled_store::SledStore;

    const POLICY: &str = r#"
        [[rule]]
        identities = ["admin"]
        verbs = ["*"]
        secrets = ["*"]
        [[rule]]
        identities = ["app"]
        verbs = ["read", "list"]
        secrets = ["app/*"]
        environments = ["prod"]
    "#;

    struct Fixture {
        vault: Arc<Vault>,
        clock: Arc<ManualClock>,
        _dir: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (vault, clock) = crate::testutil::vault_over(store, POLICY, 60_000).await;
        Fixture {
            vault,
            clock,
            _dir: dir,
        }
    }

    fn peer(identity: &str) -> Peer {
        Peer {
            identity: identity.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    fn put(name: &str, value: &[u8]) -> PutInput {
        PutInput {
            name: name.into(),
            value: Zeroizing::new(value.to_vec()),
            environment: String::new(),
            owner: String::new(),
            labels: BTreeMap::new(),
            description: String::new(),
            expected_version: None,
            request_id: String::new(),
            lifecycle: LifecycleInput::default(),
        }
    }

    #[tokio::test]
    async fn replaced_primary_stays_active_until_grace_ends() {
        let f = fixture().await;
        let admin = peer("admin");
        f.vault.put(&admin, put("db", b"one")).await.unwrap();
        f.vault.put(&admin, put("db", b"two")).await.unwrap();
        let old = f.vault.fetch(&admin, "db", 1).await.unwrap();
        assert_eq!(
            (old.state, &old.value[..]),
            (VersionState::Active, &b"one"[..])
        );
        assert_eq!(
            &f.vault.fetch(&admin, "db", 0).await.unwrap().value[..],
            b"two"
        );

        f.clock.advance(60_000);
        let err = f.vault.fetch(&admin, "db", 1).await.err().unwrap();
        assert_eq!(err.code(), Code::FailedPrecondition);
        let d = f.vault.describe(&admin, "db").await.unwrap();
        assert_eq!(d.versions[0].state, VersionState::Inactive);
    }

    #[tokio::test]
    async fn environment_scoped_grants() {
        let f = fixture().await;
        let (admin, app) = (peer("admin"), peer("app"));
        let mut p = put("app/prod-db", b"x");
        p.environment = "prod".into();
        f.vault.put(&admin, p).await.unwrap();
        f.vault.put(&admin, put("app/dev-db", b"y")).await.unwrap();
        assert!(f.vault.fetch(&app, "app/prod-db", 0).await.is_ok());
        let denied = f.vault.fetch(&app, "app/dev-db", 0).await.err().unwrap();
        assert_eq!(denied.code(), Code::PermissionDenied);
        // Outside its globs the caller cannot even learn whether a name exists.
        let denied = f.vault.fetch(&app, "nope", 0).await.err().unwrap();
        assert_eq!(denied.code(), Code::PermissionDenied);
        let page = f.vault.list(&app, ListInput::default()).await.unwrap();
        let names: Vec<_> = page.secrets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["app/prod-db"]);
    }

    #[tokio::test]
    async fn issued_key_is_stored_encrypted_and_indexed() {
        let f = fixture().await;
        let admin = peer("admin");
        let issued = f
            .vault
            .issue(
                &admin,
                IssueInput {
                    name: "svc/key".into(),
                    environment: "prod".into(),
                    owner: String::new(),
                    scopes: vec!["read:users".into()],
                    labels: BTreeMap::new(),
                    description: String::new(),
                    request_id: String::new(),
                    lifecycle: LifecycleInput::default(),
                },
            )
            .await
            .unwrap();
        assert_eq!(issued.key.environment(), "prod");
        let hash = f.vault.key_hash(&issued.key);
        let entry = f.vault.store.get(Tree::KeyIndex, &hash).unwrap().unwrap();
        let entry: KeyIndexEntry = decode("index", &entry).unwrap();
        assert_eq!((entry.name.as_str(), entry.version), ("svc/key", 1));
        let fetched = f.vault.fetch(&admin, "svc/key", 0).await.unwrap();
        assert_eq!(&fetched.value[..], issued.key.expose().as_bytes());
        // Putting a value onto an API key is refused.
        let err = f
            .vault
            .put(&admin, put("svc/key", b"x"))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn every_call_leaves_one_audit_record_without_values() {
        let f = fixture().await;
        let (admin, app) = (peer("admin"), peer("app"));
        f.vault
            .put(&admin, put("db", b"super-secret-value"))
            .await
            .unwrap();
        f.vault.fetch(&admin, "db", 0).await.unwrap();
        let _ = f.vault.put(&app, put("db", b"x")).await;
        let _ = f.vault.fetch(&admin, "missing", 0).await;
        let records = f.vault.store.scan(Tree::Audit, b"", b"", 100).unwrap();
        let records: Vec<AuditRecord> = records
            .iter()
            .map(|(_, v)| *crate::audit::decode(v).unwrap().record)
            .collect();
        let summary: Vec<_> = records
            .iter()
            .map(|r| (r.method.as_str(), r.code))
            .collect();
        assert_eq!(
            summary,
            [
                ("PutSecret", 0),
                ("FetchSecret", 0),
                ("PutSecret", 7),
                ("FetchSecret", 5)
            ]
        );
        for (_, v) in f.vault.store.scan(Tree::Audit, b"", b"", 100).unwrap() {
            assert!(!v.windows(18).any(|w| w == b"super-secret-value"));
        }
    }

    #[tokio::test]
    async fn an_idempotent_replay_is_audited_too() {
        let f = fixture().await;
        let admin = peer("admin");
        let mut p = put("db", b"v");
        p.request_id = "once".into();
        let first = f.vault.put(&admin, p).await.unwrap();
        let mut p = put("db", b"v");
        p.request_id = "once".into();
        let again = f.vault.put(&admin, p).await.unwrap();
        assert_eq!(first.version, again.version);
        let records: Vec<AuditRecord> = f
            .vault
            .store
            .scan(Tree::Audit, b"", b"", 100)
            .unwrap()
            .iter()
            .map(|(_, v)| *crate::audit::decode(v).unwrap().record)
            .collect();
        let puts: Vec<_> = records
            .iter()
            .map(|r| (r.method.as_str(), r.request_id.as_str(), r.targets[0].1))
            .collect();
        assert_eq!(puts, [("PutSecret", "once", 1), ("PutSecret", "once", 1)]);
        assert_eq!(f.vault.audit().durable_head(), 2);
    }
}
