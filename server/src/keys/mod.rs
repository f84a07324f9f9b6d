//! API keys at the edge: verification of presented keys (VerifyKey and Envoy's ext_authz
//! Check), their usage policy and their usage counters. Below the service layer: no tonic
//! types here.
//!
//! A verification stays in memory and off the HSM: the key is parsed (format and checksum),
//! hashed with HMAC-SHA256 under the index key, and looked up in the [`KeyDirectory`], which
//! also holds the key's current record. Nothing is decrypted. The checks then run in the order
//! the API promises — state, expiry, environment, client IP, scopes, rate limit, quota — and
//! the first that fails is the result. A denial is data (a [`VerifyResult`]); an `Err` is the
//! caller's fault or an outage.
//!
//! Every call leaves one audit record (method, identity, key id, target, result), made durable
//! through the store's group commit before the answer leaves — the same price as a fetch, and
//! the same flush that makes the quota charge durable.

pub mod directory;
pub mod gcra;
pub mod quota;
pub mod usage;

use crate::audit::{self, AuditRecord};
use crate::clock::Millis;
use crate::error::{Code, Error, Result};
use crate::keypolicy::{parse_client_ip, RateLimit};
use crate::metrics;
use crate::model::{check_scopes, SecretName, SecretRecord, VersionState};
use crate::policy::Verb;
use crate::tls::Peer;
use crate::vault::Vault;
use directory::KeyDirectory;
use gcra::{Decision, Limiters, RateState};
use quota::{Charge, QuotaLedger};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use usage::{Use, VersionUsage};
use ward::keyformat::ApiKey;
use zeroize::Zeroizing;

/// Largest cost of one verification.
pub const MAX_COST: u64 = 1_000_000;
/// Longest endpoint tag.
pub const MAX_ENDPOINT_LEN: usize = 64;
/// Most `(caller, client IP)` pairs whose failed lookups are tracked one by one; beyond this
/// new pairs share their caller's budget, so an attacker rotating IPs cannot grow memory.
pub const MAX_GUARD_ENTRIES: usize = 100_000;

/// The outcome of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum VerifyResult {
    /// Every check passed.
    Valid,
    /// Not a well-formed key.
    Malformed,
    /// Unknown key, or one the caller may not verify.
    NotFound,
    /// Version REVOKED or DESTROYED.
    Revoked,
    /// Past the key's expiry.
    Expired,
    /// Version INACTIVE.
    Disabled,
    /// Another environment than the verifier's.
    WrongEnvironment,
    /// Client IP outside the allowed ranges.
    ForbiddenIp,
    /// A required scope is missing.
    InsufficientScope,
    /// Over the rate limit.
    RateLimited,
    /// Quota used up.
    QuotaExceeded,
}

impl VerifyResult {
    /// Every result, in wire order.
    pub const ALL: [VerifyResult; 11] = [
        Self::Valid,
        Self::Malformed,
        Self::NotFound,
        Self::Revoked,
        Self::Expired,
        Self::Disabled,
        Self::WrongEnvironment,
        Self::ForbiddenIp,
        Self::InsufficientScope,
        Self::RateLimited,
        Self::QuotaExceeded,
    ];

    /// The wire number (`ward.v1.VerifyResult`).
    pub fn number(self) -> usize {
        match self {
            Self::Valid => 1,
            Self::Malformed => 2,
            Self::NotFound => 3,
            Self::Revoked => 4,
            Self::Expired => 5,
            Self::Disabled => 6,
            Self::WrongEnvironment => 7,
            Self::ForbiddenIp => 8,
            Self::InsufficientScope => 9,
            Self::RateLimited => 10,
            Self::QuotaExceeded => 11,
        }
    }

    /// The result with this wire number.
    pub fn from_number(n: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.number() == n)
    }

    /// The name users see, e.g. `QUOTA_EXCEEDED`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Valid => "VALID",
            Self::Malformed => "MALFORMED",
            Self::NotFound => "NOT_FOUND",
            Self::Revoked => "REVOKED",
            Self::Expired => "EXPIRED",
            Self::Disabled => "DISABLED",
            Self::WrongEnvironment => "WRONG_ENVIRONMENT",
            Self::ForbiddenIp => "FORBIDDEN_IP",
            Self::InsufficientScope => "INSUFFICIENT_SCOPE",
            Self::RateLimited => "RATE_LIMITED",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
        }
    }
}

/// A verification request, as received.
#[derive(Default)]
pub struct VerifyInput {
    /// The presented key (zeroized on drop).
    pub api_key: Zeroizing<String>,
    /// Scopes the key must grant.
    pub required_scopes: Vec<String>,
    /// End client's IP, or empty.
    pub client_ip: String,
    /// Units to charge; None means 1.
    pub cost: Option<u64>,
    /// Environment the verifier serves, or empty.
    pub environment: String,
    /// Endpoint tag, or empty.
    pub endpoint: String,
}

/// What is known about a found key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFacts {
    /// Secret holding the key.
    pub name: String,
    /// Version holding the key.
    pub version: u64,
    /// Owner.
    pub owner: String,
    /// Environment.
    pub environment: String,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// Expiry, if any.
    pub expire_ms: Option<Millis>,
    /// End of the overlap window, while the version is ACTIVE.
    pub grace_until_ms: Option<Millis>,
}

/// The answer to a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The result.
    pub result: VerifyResult,
    /// Non-reversible key id (empty for a malformed key).
    pub key_id: String,
    /// Set when the key was found and may be verified by the caller.
    pub key: Option<KeyFacts>,
    /// Rate-limit state, when the key has a rate limit and the check was reached.
    pub rate: Option<RateState>,
    /// Quota balance, when the key has a quota.
    pub quota_remaining: Option<u64>,
    /// How long to wait before retrying.
    pub retry_after_ms: Option<u64>,
}

impl Verdict {
    fn bare(result: VerifyResult, key_id: String) -> Self {
        Self {
            result,
            key_id,
            key: None,
            rate: None,
            quota_remaining: None,
            retry_after_ms: None,
        }
    }

    /// Whether the key is good.
    pub fn valid(&self) -> bool {
        self.result == VerifyResult::Valid
    }
}

/// Settings of the verifier.
#[derive(Debug, Clone, Copy)]
pub struct KeySettings {
    /// Budget of failed lookups (NOT_FOUND) per caller and client IP; past it the pair's
    /// verifications are RATE_LIMITED before any lookup.
    pub unknown_key_limit: RateLimit,
}

/// GetKeyUsage's answer.
#[derive(Debug, Clone)]
pub struct KeyUsageReport {
    /// Secret name.
    pub name: String,
    /// Counters by version.
    pub versions: BTreeMap<u64, VersionUsage>,
    /// Quota balance now, if the key has a quota.
    pub quota_remaining: Option<u64>,
}

/// The verifier and its in-memory state.
pub struct Keys {
    vault: Arc<Vault>,
    dir: Arc<KeyDirectory>,
    rates: Limiters<Arc<str>>,
    guard: Limiters<(Arc<str>, Option<IpAddr>)>,
    quotas: QuotaLedger,
    settings: KeySettings,
}

impl Keys {
    /// A verifier over `vault`, whose store keeps `dir` in step.
    pub fn new(vault: Arc<Vault>, dir: Arc<KeyDirectory>, settings: KeySettings) -> Self {
        Self {
            vault,
            dir,
            rates: Limiters::default(),
            guard: Limiters::default(),
            quotas: QuotaLedger::default(),
            settings,
        }
    }

    /// The key directory.
    pub fn directory(&self) -> &Arc<KeyDirectory> {
        &self.dir
    }

    /// Verifies a presented key; `method` names the RPC in the audit record. The answer leaves
    /// only once the call's audit record (and any quota charge) is durable.
    pub async fn verify(
        &self,
        peer: &Peer,
        input: VerifyInput,
        method: &'static str,
    ) -> Result<Verdict> {
        let now = self.vault.now();
        let mut rec = AuditRecord::new(peer, method, now);
        let outcome = self.decide(peer, &input, now, &mut rec);
        let m = metrics::global();
        match &outcome {
            Ok(v) => {
                rec.key_id = v.key_id.clone();
                if rec.detail.is_empty() {
                    rec.detail = v.result.name().to_owned();
                }
                m.count_verification(v.result);
                if v.result == VerifyResult::NotFound {
                    m.count_unknown_key(&peer.identity);
                }
            }
            Err(e) => {
                rec.code = e.code().as_i32();
                tracing::info!(method, identity = %peer.identity, code = %e.code(), error = %e, "call refused");
            }
        }
        audit::append(&**self.vault.store(), rec).await?;
        outcome
    }

    fn decide(
        &self,
        peer: &Peer,
        input: &VerifyInput,
        now: Millis,
        rec: &mut AuditRecord,
    ) -> Result<Verdict> {
        // The caller's own faults come first: they are errors, not verdicts.
        if !self.vault.policy().grants_any(&peer.identity, Verb::Verify) {
            return Err(Error::PermissionDenied {
                identity: peer.identity.to_string(),
                verb: Verb::Verify.name(),
                target: "*".into(),
            });
        }
        check_scopes(&input.required_scopes)
            .map_err(|e| Error::invalid(format!("required_scopes: {e}")))?;
        let ip = parse_client_ip(&input.client_ip)?;
        let cost = input.cost.unwrap_or(1);
        if cost > MAX_COST {
            return Err(Error::invalid(format!("cost must be at most {MAX_COST}")));
        }
        if !input.environment.is_empty()
            && !self
                .vault
                .settings()
                .environments
                .iter()
                .any(|e| *e == input.environment)
        {
            return Err(Error::invalid(format!(
                "unknown environment {:?}",
                input.environment
            )));
        }
        check_endpoint(&input.endpoint)?;

        // 1. Format and checksum, before any lookup.
        let Ok(key) = ApiKey::parse(&input.api_key) else {
            return Ok(Verdict::bare(VerifyResult::Malformed, String::new()));
        };
        let hash = self.vault.key_hash(&key);
        let key_id = hex::encode(&hash[..8]);
        drop(key);

        // Brute force: a caller (and client IP) past its budget of unknown keys learns nothing
        // more until the budget refills.
        let guard_key = self.guard_key(peer, ip);
        if let Decision::Limited { retry_after_ms, .. } =
            self.guard
                .peek(&guard_key, self.settings.unknown_key_limit, 1, now)
        {
            rec.detail = "RATE_LIMITED (too many unknown keys)".into();
            metrics::global().count_lockout();
            let mut v = Verdict::bare(VerifyResult::RateLimited, key_id);
            v.retry_after_ms = retry_after_ms;
            return Ok(v);
        }

        // 2. Lookup: in memory, no decryption. A key the caller may not verify reads as
        // unknown (the audit record says why).
        let found = match self.dir.lookup(&hash) {
            Some(r) => self
                .dir
                .record(&**self.vault.store(), &r.name)?
                .map(|rec| (r, rec)),
            None => None,
        };
        let not_found = |this: &Self, rec: &mut AuditRecord, why: &str| {
            this.guard
                .check(&guard_key, this.settings.unknown_key_limit, 1, now);
            if !why.is_empty() {
                rec.detail = format!("NOT_FOUND ({why})");
            }
            Ok(Verdict::bare(VerifyResult::NotFound, key_id.clone()))
        };
        let Some((kref, record)) = found else {
            return not_found(self, rec, "");
        };
        rec.targets = vec![(kref.name.to_string(), kref.version)];
        let allowed = SecretName::parse(&record.name).is_ok()
            && self.vault.policy().allows(
                &peer.identity,
                Verb::Verify,
                &record.name,
                Some(&record.environment),
            );
        if !allowed {
            return not_found(self, rec, "no verify grant");
        }
        let Some(meta) = record.versions.iter().find(|m| m.version == kref.version) else {
            return not_found(self, rec, "version missing");
        };
        let state = meta.state_at(now);
        let policy = &record.key_policy;
        let mut v = Verdict::bare(VerifyResult::Valid, key_id.clone());
        v.key = Some(KeyFacts {
            name: record.name.clone(),
            version: meta.version,
            owner: record.owner.clone(),
            environment: record.environment.clone(),
            scopes: record.scopes.clone(),
            expire_ms: policy.expire_ms,
            grace_until_ms: (state == VersionState::Active)
                .then_some(meta.grace_until_ms)
                .flatten(),
        });
        v.result = self.check(
            &record,
            meta.is_usable_at(now),
            state,
            input,
            ip,
            cost,
            now,
            &mut v,
        )?;
        let charged = v.result == VerifyResult::Valid && cost > 0;
        self.vault.usage().record(
            &record.name,
            meta.version,
            Use {
                result: v.result.number(),
                endpoint: &input.endpoint,
                used: charged.then_some((now, input.client_ip.as_str())),
            },
        );
        Ok(v)
    }

    /// Steps 3 to 9 for a found key; fills in rate and quota state as they are reached.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        record: &SecretRecord,
        usable: bool,
        state: VersionState,
        input: &VerifyInput,
        ip: Option<IpAddr>,
        cost: u64,
        now: Millis,
        v: &mut Verdict,
    ) -> Result<VerifyResult> {
        let policy = &record.key_policy;
        let store = &**self.vault.store();
        if let Some(q) = &policy.quota {
            v.quota_remaining =
                Some(
                    self.quotas
                        .balance(store, &record.name, record.create_ms, q, now)?,
                );
        }
        if !usable {
            return Ok(match state {
                VersionState::Revoked | VersionState::Destroyed => VerifyResult::Revoked,
                _ => VerifyResult::Disabled,
            });
        }
        if policy.expire_ms.is_some_and(|t| t <= now) {
            return Ok(VerifyResult::Expired);
        }
        if !input.environment.is_empty() && input.environment != record.environment {
            return Ok(VerifyResult::WrongEnvironment);
        }
        if !policy.allowed_cidrs.is_empty()
            && !ip.is_some_and(|ip| policy.allowed_cidrs.iter().any(|c| c.contains(ip)))
        {
            return Ok(VerifyResult::ForbiddenIp);
        }
        if !input
            .required_scopes
            .iter()
            .all(|s| record.scopes.contains(s))
        {
            return Ok(VerifyResult::InsufficientScope);
        }
        if let Some(limit) = policy.rate_limit {
            let name: Arc<str> = record.name.as_str().into();
            match self.rates.check(&name, limit, cost, now) {
                Decision::Allowed(s) => v.rate = Some(s),
                Decision::Limited {
                    state,
                    retry_after_ms,
                } => {
                    v.rate = Some(state);
                    v.retry_after_ms = retry_after_ms;
                    metrics::global().count_rate_limited();
                    return Ok(VerifyResult::RateLimited);
                }
            }
        }
        if let Some(q) = &policy.quota {
            match self
                .quotas
                .charge(store, &record.name, record.create_ms, q, cost, now)?
            {
                Charge::Charged(left) => v.quota_remaining = Some(left),
                Charge::Exceeded(left, retry) => {
                    v.quota_remaining = Some(left);
                    v.retry_after_ms = retry;
                    metrics::global().count_quota_exceeded();
                    return Ok(VerifyResult::QuotaExceeded);
                }
            }
        }
        Ok(VerifyResult::Valid)
    }

    fn guard_key(&self, peer: &Peer, ip: Option<IpAddr>) -> (Arc<str>, Option<IpAddr>) {
        let key = (peer.identity.clone(), ip);
        if ip.is_some() && self.guard.len() >= MAX_GUARD_ENTRIES && !self.guard.contains(&key) {
            return (peer.identity.clone(), None);
        }
        key
    }

    /// An API key's usage counters and quota balance. Verb: list.
    pub async fn usage(&self, peer: &Peer, name: &str, version: u64) -> Result<KeyUsageReport> {
        let now = self.vault.now();
        let mut rec = AuditRecord::new(peer, "GetKeyUsage", now);
        rec.targets.push((name.to_owned(), version));
        let result = self.usage_inner(peer, name, version, now);
        rec.code = match &result {
            Ok(_) => Code::Ok.as_i32(),
            Err(e) => e.code().as_i32(),
        };
        audit::append(&**self.vault.store(), rec).await?;
        result
    }

    fn usage_inner(
        &self,
        peer: &Peer,
        name: &str,
        version: u64,
        now: Millis,
    ) -> Result<KeyUsageReport> {
        let name = SecretName::parse(name)?;
        let deny = || Error::PermissionDenied {
            identity: peer.identity.to_string(),
            verb: Verb::List.name(),
            target: name.to_string(),
        };
        let policy = self.vault.policy();
        if !policy.allows(&peer.identity, Verb::List, name.as_str(), None) {
            return Err(deny());
        }
        let store = &**self.vault.store();
        let record = match self.dir.record(store, name.as_str())? {
            Some(r) => r,
            None => {
                return Err(
                    if store
                        .get(crate::store::Tree::Secrets, name.as_str().as_bytes())?
                        .is_some()
                    {
                        Error::FailedPrecondition(format!("{name} is not an API key"))
                    } else {
                        Error::NotFound(format!("secret {name}"))
                    },
                )
            }
        };
        if !policy.allows(
            &peer.identity,
            Verb::List,
            name.as_str(),
            Some(&record.environment),
        ) {
            return Err(deny());
        }
        if version != 0 && record.version(version).is_none() {
            return Err(Error::NotFound(format!("version {version} of {name}")));
        }
        let mut versions = self.vault.usage().get(name.as_str());
        if version != 0 {
            versions.retain(|v, _| *v == version);
        }
        let quota_remaining = record
            .key_policy
            .quota
            .map(|q| {
                self.quotas
                    .balance(store, &record.name, record.create_ms, &q, now)
            })
            .transpose()?;
        Ok(KeyUsageReport {
            name: name.to_string(),
            versions,
            quota_remaining,
        })
    }
}

/// Checks an endpoint tag: empty, or `[a-z0-9:._/-]{1,64}`.
fn check_endpoint(tag: &str) -> Result<()> {
    let ok = tag.len() <= MAX_ENDPOINT_LEN
        && tag.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b':' | b'.' | b'_' | b'/' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid endpoint {tag:?}: use up to {MAX_ENDPOINT_LEN} characters of a-z 0-9 : . _ / -"
        )))
    }
}
