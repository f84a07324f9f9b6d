//! API keys as secrets: IssueKey (Ward generates the key) and UpdateKeyPolicy (scopes, CIDRs,
//! rate limit, quota, expiry, and the schedule: rotation period, default grace). Verification
//! lives above, in keys/.

use super::versions::NewValue;
use super::write::{rewrite, Call, Plan, Staged, Written};
use super::Vault;
use crate::audit::AuditRecord;
use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::identity::Peer;
use crate::model::input::{LifecycleInput, LifecyclePolicy};
use crate::model::keypolicy::{parse_cidrs, KeyPolicyInput, PolicyMask, RateLimit};
use crate::model::{
    check_labels, check_scopes, check_text, KeyPolicy, Kind, SecretLife, SecretRecord,
    MAX_DESCRIPTION,
};
use crate::policy::Verb;
use crate::store::{decode, encode, Tree};
use std::collections::BTreeMap;
use ward::keyformat::ApiKey;

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

/// UpdateKeyPolicy's input, as received.
#[derive(Debug, Default)]
pub struct PolicyUpdate {
    /// Secret name (unparsed).
    pub name: String,
    /// New scopes (when the mask names them).
    pub scopes: Vec<String>,
    /// New policy fields (those the mask names).
    pub policy: KeyPolicyInput,
    /// New schedule (rotation period, default grace; those the mask names). Its expiration is
    /// ignored: a key's expiry is `policy.expire_ms`.
    pub schedule: LifecycleInput,
    /// Field-mask paths; empty: every usage field (not the schedule).
    pub mask: Vec<String>,
    /// Idempotency key, or empty.
    pub request_id: String,
}

impl Vault {
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
        policy_input: KeyPolicyInput,
    ) -> Result<Issued> {
        let call = Call::new(
            peer,
            "IssueKey",
            Verb::Issue,
            &input.name,
            &input.request_id,
        );
        self.write(call, |_, name| {
            check_scopes(&input.scopes)?;
            if policy_input.expire_ms.is_some_and(|t| t <= self.now()) {
                return Err(Error::invalid("expire_time is not in the future"));
            }
            let key_policy = parse_policy(
                &policy_input,
                &KeyPolicy::default(),
                PolicyMask::ALL,
                self.now(),
            )?;
            check_labels(&input.labels)?;
            check_text("description", &input.description, MAX_DESCRIPTION)?;
            self.check_owner(peer, name, &input.owner)?;
            let environment = if input.environment.is_empty() {
                self.settings.default_environment.clone()
            } else {
                self.check_environment(&input.environment)?;
                input.environment.clone()
            };
            self.authorize(peer, Verb::Issue, name, Some(&environment))?;
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
            let target = name.clone();
            let replayed = move |done: Written, rec: &mut AuditRecord| {
                rec.targets = vec![(done.name.clone(), done.version)];
                let key = self.stored_key(&target, done.version)?;
                let key_id = self.key_id(&key);
                rec.key_id = key_id.clone();
                Ok(Issued {
                    written: done,
                    key,
                    key_id,
                })
            };
            let target = name.clone();
            let attempt = move |rec: &mut AuditRecord| {
                let name = &target;
                if let Some(raw) = self.store.get(Tree::Secrets, name.as_str().as_bytes())? {
                    // Names are vault-wide: the name is taken either way, but only a caller
                    // that may issue in the taken name's environment learns that it exists
                    // there.
                    let taken: SecretRecord = decode("secret", &raw)?;
                    self.authorize(peer, Verb::Issue, name, Some(&taken.environment))?;
                    return Err(Error::AlreadyExists(format!(
                        "{name} already exists (rotate it to get a new key)"
                    )));
                }
                let now = self.now();
                let key = ApiKey::generate(&self.settings.issuer, &environment)
                    .map_err(|e| Error::Internal(format!("key generation: {e}")))?;
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
                // A key's expiry is its secret's lifecycle expiry (one deadline, judged in one
                // place).
                if secret.life.expire_ms.is_none() {
                    secret.life.expire_ms = policy_input.expire_ms;
                }
                let grace = self.default_grace(&secret);
                let (batch, added) =
                    self.stage_version(&mut secret, None, NewValue::Key(key), grace, None, now)?;
                let (Some(key), Some(key_id)) = (added.key, added.key_id) else {
                    return Err(Error::Internal(
                        "a new API key version without its key".into(),
                    ));
                };
                rec.targets = vec![(name.to_string(), 1)];
                rec.key_id = key_id.clone();
                Ok(Staged {
                    batch,
                    written: added.written.clone(),
                    answer: Issued {
                        written: added.written,
                        key,
                        key_id,
                    },
                })
            };
            Ok(Plan {
                fingerprint,
                replayed,
                attempt,
            })
        })
        .await
    }

    /// Replaces the masked fields of an API key's policy. Setting the quota starts a fresh
    /// ledger (a new quota epoch); a retry under the same request id does not.
    pub async fn update_key_policy(
        &self,
        peer: &Peer,
        input: PolicyUpdate,
    ) -> Result<SecretRecord> {
        let call = Call::new(
            peer,
            "UpdateKeyPolicy",
            Verb::Issue,
            &input.name,
            &input.request_id,
        );
        self.write(call, |_, name| {
            let mask = PolicyMask::parse(&input.mask)?;
            if mask.scopes {
                check_scopes(&input.scopes)?;
            }
            let schedule = parse_schedule(&input.schedule, mask, self.now())?;
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
                    &encode(&(
                        input.schedule.rotation_period,
                        input.schedule.default_grace_period,
                    )),
                    &encode(&input.mask),
                ],
            );
            let target = name.clone();
            let replayed =
                move |_: Written, _: &mut AuditRecord| Ok(self.as_of_now(self.load(&target)?));
            let target = name.clone();
            let attempt = move |rec: &mut AuditRecord| {
                let name = &target;
                let (raw, mut secret) = self.load_for(peer, Verb::Issue, name)?;
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
                schedule.apply(&mut secret, now);
                if mask.default_grace_period && schedule.grace_ms.is_none() {
                    // Named but absent: back to the server's default grace.
                    secret.life.grace_ms = None;
                }
                secret.update_ms = now;
                rec.targets = vec![(name.to_string(), secret.primary)];
                Ok(Staged {
                    batch: rewrite(&secret, raw),
                    written: Written::of(name.as_str(), secret.primary),
                    answer: self.as_of_now(secret),
                })
            };
            Ok(Plan {
                fingerprint,
                replayed,
                attempt,
            })
        })
        .await
    }
}

/// The schedule change an update makes: only the fields `mask` names; a named field absent in
/// `input` turns scheduled rotation off (rotation) or leaves `grace_ms` None for the caller to
/// clear (grace). The expiration is not part of it (the key policy's expiry is).
fn parse_schedule(
    input: &LifecycleInput,
    mask: PolicyMask,
    now: Millis,
) -> Result<LifecyclePolicy> {
    let parsed = LifecyclePolicy::parse(
        &LifecycleInput {
            expiration: None,
            ..*input
        },
        now,
    )?;
    Ok(LifecyclePolicy {
        rotation_period_ms: mask
            .rotation_period
            .then(|| parsed.rotation_period_ms.flatten()),
        grace_ms: parsed.grace_ms.filter(|_| mask.default_grace_period),
        expire_ms: None,
    })
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
