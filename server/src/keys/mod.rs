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

use crate::alerts::signals::{Observation, Signals, Standing};
use crate::alerts::{Alert, AlertType, Alerts};
use crate::audit::AuditRecord;
use crate::clock::Millis;
use crate::error::{Code, Error, Result};
use crate::identity::Peer;
use crate::metrics;
use crate::model::keypolicy::{grants_scopes, parse_client_ip, KeyPolicyInput, RateLimit};
pub use crate::model::VerifyResult;
use crate::model::{check_scopes, excerpt, SecretName, SecretRecord, VersionState};
use crate::policy::Verb;
use crate::vault::usage::{Use, VersionUsage};
use crate::vault::{denied, PolicyUpdate, Vault};
use directory::KeyDirectory;
use gcra::{Decision, Limiters, RateState};
use quota::{Charge, QuotaLedger};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use ward::keyformat::ApiKey;
use zeroize::Zeroizing;

/// Largest cost of one verification.
pub const MAX_COST: u64 = 1_000_000;
/// Longest endpoint tag.
pub const MAX_ENDPOINT_LEN: usize = 64;
/// Most `(caller, client IP)` pairs whose failed lookups are tracked one by one; beyond this
/// new pairs share their caller's budget, so an attacker rotating IPs cannot grow memory.
pub const MAX_GUARD_ENTRIES: usize = 100_000;

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
    /// verifications of keys that read as unknown are RATE_LIMITED (known keys still verify).
    pub unknown_key_limit: RateLimit,
    /// Quota units taken from the stored ledger at a time (1 on an embedded store; see
    /// [`quota`]).
    pub quota_block: u64,
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
    alerts: Option<Arc<Alerts>>,
    signals: Option<Arc<Signals>>,
}

/// ReportLeak's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeakReport {
    /// The key is Ward's and the caller may verify it.
    pub found: bool,
    /// Then: its secret, version and key id.
    pub name: String,
    /// See `name`.
    pub version: u64,
    /// See `name`.
    pub key_id: String,
    /// The key was quarantined: its allowed CIDRs are now `allowed_cidrs`.
    pub quarantined: bool,
    /// See `quarantined`.
    pub allowed_cidrs: Vec<String>,
}

/// Longest leak location kept.
const MAX_LEAK_LOCATION: usize = 512;
/// Longest leak source kept.
const MAX_LEAK_SOURCE: usize = 128;

impl Keys {
    /// A verifier over `vault`, whose store keeps `dir` in step.
    pub fn new(vault: Arc<Vault>, dir: Arc<KeyDirectory>, settings: KeySettings) -> Self {
        Self {
            vault,
            dir,
            rates: Limiters::default(),
            guard: Limiters::default(),
            quotas: QuotaLedger::with_block(settings.quota_block),
            settings,
            alerts: None,
            signals: None,
        }
    }

    /// Gives the quota units this process took and did not spend back to the stored ledgers
    /// (at shutdown). Returns how many.
    pub fn give_back_quota(&self) -> Result<u64> {
        self.quotas.give_back(&**self.vault.store())
    }

    /// Raises alerts into `alerts`: leak reports always, and the verification path's signals
    /// when `signals` is given.
    pub fn with_alerts(mut self, alerts: Arc<Alerts>, signals: Option<Arc<Signals>>) -> Self {
        self.alerts = Some(alerts);
        self.signals = signals;
        self
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
        let generation = self.vault.store().generation();
        let mut rec = AuditRecord::new(peer, method, now);
        let outcome = self.decide(peer, &input, now, &mut rec);
        let m = metrics::global();
        match &outcome {
            Ok(v) => {
                rec.key_id = v.key_id.clone();
                tracing::debug!(method, identity = %peer.identity, result = v.result.name(), "verified");
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
        // A quota charge is committed to the store during the decision; the answer waits until
        // both it and the call's audit record are durable (the two syncs run side by side).
        let charged = matches!(&outcome, Ok(v) if v.result == VerifyResult::Valid && v.quota_remaining.is_some());
        if charged {
            let (audited, synced) =
                tokio::join!(self.vault.audit().append(rec), self.vault.store().sync());
            audited?;
            synced.map_err(|e| {
                tracing::error!(error = %e, "quota charge not durable");
                Error::Unavailable(
                    "storage unavailable: the quota charge is not confirmed durable".into(),
                )
            })?;
        } else {
            self.vault.audit().append(rec).await?;
        }
        // A store reopened in between (after an I/O error) may have lost the charge: then a
        // VALID answer could exceed the quota after a crash.
        if matches!(&outcome, Ok(v) if v.result == VerifyResult::Valid)
            && self.vault.store().generation() != generation
        {
            return Err(Error::Unavailable(
                "storage was reopened during the call; the quota charge is not confirmed durable"
                    .into(),
            ));
        }
        outcome
    }

    /// Audits a call refused before it became a verification (a request that could not be
    /// read as one), and returns the refusal — or the audit log's outage, since nothing is
    /// answered before its record is durable.
    pub async fn refuse(&self, peer: &Peer, method: &'static str, e: Error) -> Error {
        let mut rec = AuditRecord::new(peer, method, self.vault.now());
        rec.code = e.code().as_i32();
        tracing::info!(method, identity = %peer.identity, code = %e.code(), error = %e, "call refused");
        match self.vault.audit().append(rec).await {
            Ok(()) => e,
            Err(outage) => outage,
        }
    }

    fn decide(
        &self,
        peer: &Peer,
        input: &VerifyInput,
        now: Millis,
        rec: &mut AuditRecord,
    ) -> Result<Verdict> {
        // The caller's own faults come first: they are errors, not verdicts.
        self.may_verify(peer)?;
        check_scopes(&input.required_scopes)
            .map_err(|e| Error::invalid(format!("required_scopes: {e}")))?;
        let ip = parse_client_ip(&input.client_ip)?;
        let cost = input.cost.unwrap_or(1);
        if cost > MAX_COST {
            return Err(Error::invalid(format!("cost must be at most {MAX_COST}")));
        }
        if !input.environment.is_empty() {
            self.vault.check_environment(&input.environment)?;
        }
        check_endpoint(&input.endpoint)?;

        // 1. Format and checksum, before any lookup. 2. Lookup: in memory, no decryption. A
        // key the caller may not verify reads as unknown (the audit record says why).
        let Some((key_id, found)) = self.find(&input.api_key)? else {
            return Ok(Verdict::bare(VerifyResult::Malformed, String::new()));
        };
        // Brute force: a caller (and client IP) past its budget of unknown keys learns nothing
        // more until the budget refills. Only keys that read as unknown are throttled, and
        // only after the lookup: a key the caller may verify is never refused here, so a
        // guesser behind a shared NAT or gateway cannot lock the real keys out for everyone
        // else (reproduced: 1,000 unknown keys from one IP did). A key the caller may not
        // verify is throttled like an unknown one, so the refusal tells nothing either.
        let guard_key = self.guard_key(peer, ip);
        let not_found = |this: &Self, rec: &mut AuditRecord, why: &str| {
            if let Decision::Limited { retry_after_ms, .. } =
                this.guard
                    .check(&guard_key, this.settings.unknown_key_limit, 1, now)
            {
                tracing::info!(identity = %rec.identity, "verification refused: too many unknown keys");
                metrics::global().count_lockout();
                let mut v = Verdict::bare(VerifyResult::RateLimited, key_id.clone());
                v.retry_after_ms = retry_after_ms;
                return Ok(v);
            }
            if !why.is_empty() {
                // The caller sees NOT_FOUND either way; operators see why in the log.
                tracing::debug!(identity = %rec.identity, why, "verification read as NOT_FOUND");
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
        // State and deadlines (grace, expiry) from the one judgement fetch uses too.
        let standing = record.standing(meta, now);
        let state = standing.state;
        let expired = standing.reason == Some(crate::model::StateReason::Expired);
        let mut v = Verdict::bare(VerifyResult::Valid, key_id.clone());
        v.key = Some(KeyFacts {
            name: record.name.clone(),
            version: meta.version,
            owner: record.owner.clone(),
            environment: record.environment.clone(),
            scopes: record.scopes.clone(),
            expire_ms: record.expiry_of(meta),
            grace_until_ms: (state == VersionState::Active)
                .then_some(meta.grace_until_ms)
                .flatten(),
        });
        v.result = self.check(
            &record,
            matches!(state, VersionState::Primary | VersionState::Active),
            expired,
            state,
            input,
            ip,
            cost,
            now,
            &mut v,
        )?;
        if let Some(signals) = &self.signals {
            let standing = match state {
                VersionState::Primary | VersionState::Active => Standing::Usable,
                VersionState::Revoked | VersionState::Destroyed => Standing::Revoked,
                _ if expired => Standing::Expired,
                _ if standing.reason == Some(crate::model::StateReason::GraceEnded) => {
                    Standing::GraceEnded
                }
                _ => Standing::Inactive,
            };
            let quota = record.key_policy.quota.as_ref().and_then(|q| {
                // One id per quota setting and refill period: each fires its alerts once.
                let period = q
                    .refill_period_ms
                    .map_or(0, |p| now.saturating_sub(q.set_ms) / p.max(1));
                // A refill replaces the balance: after the first period, it is the full one.
                let full = if period > 0 && q.refill > 0 {
                    q.refill
                } else {
                    q.limit
                };
                v.quota_remaining
                    .map(|left| (left, full, (q.epoch << 32) ^ period))
            });
            signals.observe(&Observation {
                name: &record.name,
                version: meta.version,
                key_id: &key_id,
                environment: &record.environment,
                standing,
                result: v.result,
                ip,
                quota,
                now,
            });
        }
        let charged = v.result == VerifyResult::Valid && cost > 0;
        self.vault.usage().record(
            &record.name,
            meta.version,
            Use {
                result: v.result.number(),
                endpoint: &input.endpoint,
                at: now,
                client_ip: &input.client_ip,
                scopes: &input.required_scopes,
                charged,
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
        expired: bool,
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
                _ if expired => VerifyResult::Expired,
                _ => VerifyResult::Disabled,
            });
        }
        if !input.environment.is_empty() && input.environment != record.environment {
            return Ok(VerifyResult::WrongEnvironment);
        }
        if !policy.admits_ip(ip) {
            return Ok(VerifyResult::ForbiddenIp);
        }
        if !grants_scopes(&record.scopes, &input.required_scopes) {
            return Ok(VerifyResult::InsufficientScope);
        }
        if let Some(limit) = policy.rate_limit {
            let name: Arc<str> = record.name.as_str().into();
            // Replicas share the rate: each admits its share of it (docs/cluster.md).
            let limit = limit.shared_by(store.live_replicas());
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

    /// PERMISSION_DENIED for a caller with no verify grant at all.
    fn may_verify(&self, peer: &Peer) -> Result<()> {
        if self.vault.policy().grants_any(&peer.identity, Verb::Verify) {
            return Ok(());
        }
        Err(Error::PermissionDenied {
            identity: peer.identity.to_string(),
            verb: Verb::Verify.name(),
            target: "*".into(),
        })
    }

    /// A presented key's id and, if the directory holds it, where it is and its record; None
    /// for a key that is not well formed (checked before any lookup). In memory: no decryption.
    #[allow(clippy::type_complexity)]
    fn find(
        &self,
        presented: &str,
    ) -> Result<Option<(String, Option<(directory::KeyRef, Arc<SecretRecord>)>)>> {
        let Ok(key) = ApiKey::parse(presented) else {
            return Ok(None);
        };
        let hash = self.vault.key_hash(&key);
        drop(key);
        let found = match self.dir.lookup(&hash)? {
            Some(r) => self
                .dir
                .record(&**self.vault.store(), &r.name)?
                .map(|rec| (r, rec)),
            None => None,
        };
        Ok(Some((hex::encode(&hash[..8]), found)))
    }

    fn guard_key(&self, peer: &Peer, ip: Option<IpAddr>) -> (Arc<str>, Option<IpAddr>) {
        let key = (peer.identity.clone(), ip);
        if ip.is_some() && self.guard.len() >= MAX_GUARD_ENTRIES && !self.guard.contains(&key) {
            return (peer.identity.clone(), None);
        }
        key
    }

    /// ReportLeak: a key found where it should not be. A key Ward issued and the caller may
    /// verify raises `key.leak_reported`; any other reads as not found. Audited like VerifyKey.
    ///
    /// With `quarantine`, the key's allowed CIDRs then become the networks it was used from
    /// during its learning period, through the vault's UpdateKeyPolicy (verb issue, audited
    /// as that call); FAILED_PRECONDITION when none is known.
    pub async fn report_leak(
        &self,
        peer: &Peer,
        api_key: Zeroizing<String>,
        location: &str,
        source: &str,
        quarantine: bool,
    ) -> Result<LeakReport> {
        let now = self.vault.now();
        let mut rec = AuditRecord::new(peer, "ReportLeak", now);
        let result = self.leak(peer, &api_key, location, source, now, &mut rec);
        match &result {
            Ok(r) => rec.key_id = r.key_id.clone(),
            Err(e) => rec.code = e.code().as_i32(),
        }
        self.vault.audit().append(rec).await?;
        let mut report = result?;
        if quarantine && report.found {
            let networks = self
                .signals
                .as_ref()
                .map(|s| s.learnt_networks(&report.name))
                .unwrap_or_default();
            if networks.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "{} has no known networks to quarantine it to (none learnt since the server \
                     started, or signals are off): revoke it instead",
                    report.name
                )));
            }
            let update = PolicyUpdate {
                name: report.name.clone(),
                scopes: Vec::new(),
                policy: KeyPolicyInput {
                    allowed_cidrs: networks.clone(),
                    ..KeyPolicyInput::default()
                },
                schedule: Default::default(),
                mask: vec!["allowed_cidrs".into()],
                request_id: String::new(),
            };
            self.vault.update_key_policy(peer, update).await?;
            tracing::warn!(name = %report.name, networks = networks.len(), "leaked key quarantined to its known networks");
            report.quarantined = true;
            report.allowed_cidrs = networks;
        }
        Ok(report)
    }

    fn leak(
        &self,
        peer: &Peer,
        api_key: &str,
        location: &str,
        source: &str,
        now: Millis,
        rec: &mut AuditRecord,
    ) -> Result<LeakReport> {
        self.may_verify(peer)?;
        let printable = |s: &str, max: usize| s.len() <= max && !s.chars().any(char::is_control);
        if !printable(location, MAX_LEAK_LOCATION) || !printable(source, MAX_LEAK_SOURCE) {
            return Err(Error::invalid(format!(
                "location (at most {MAX_LEAK_LOCATION} bytes) and source (at most \
                 {MAX_LEAK_SOURCE}) must be printable text"
            )));
        }
        let Some((key_id, found)) = self.find(api_key)? else {
            return Ok(LeakReport::default());
        };
        let mut report = LeakReport {
            key_id: key_id.clone(),
            ..LeakReport::default()
        };
        let Some((kref, record)) = found else {
            return Ok(report);
        };
        rec.targets = vec![(kref.name.to_string(), kref.version)];
        let allowed = self.vault.policy().allows(
            &peer.identity,
            Verb::Verify,
            &record.name,
            Some(&record.environment),
        );
        if !allowed {
            return Ok(report);
        }
        report.found = true;
        report.name = record.name.clone();
        report.version = kref.version;
        if let Some(alerts) = &self.alerts {
            // A location that quotes the key (a URL with it as a parameter) must not carry
            // it into the alert.
            let location = location.replace(api_key, "[key]");
            let mut details = serde_json::Map::new();
            details.insert("location".into(), location.into());
            details.insert("source".into(), source.into());
            details.insert("reported_by".into(), peer.identity.to_string().into());
            alerts.raise(Alert {
                kind: AlertType::LeakReported,
                name: record.name.clone(),
                version: kref.version,
                key_id,
                environment: record.environment.clone(),
                details,
                time_ms: now,
            });
        }
        Ok(report)
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
        self.vault.audit().append(rec).await?;
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
        let policy = self.vault.policy();
        if !policy.allows(&peer.identity, Verb::List, name.as_str(), None) {
            return Err(denied(peer, Verb::List, &name));
        }
        let store = &**self.vault.store();
        let record = match self.dir.record(store, name.as_str())? {
            Some(r) => r,
            None => {
                // Missing, or a STATIC secret: answered as the vault answers any lookup, so
                // that only a caller that may see the secret learns which.
                self.vault.load_for(peer, Verb::List, &name)?;
                return Err(Error::FailedPrecondition(format!(
                    "{name} is not an API key"
                )));
            }
        };
        if !policy.allows(
            &peer.identity,
            Verb::List,
            name.as_str(),
            Some(&record.environment),
        ) {
            return Err(denied(peer, Verb::List, &name));
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
pub fn check_endpoint(tag: &str) -> Result<()> {
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
            "invalid endpoint {}: use up to {MAX_ENDPOINT_LEN} characters of a-z 0-9 : . _ / -",
            excerpt(tag)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::model::keypolicy::KeyPolicyInput;
    use crate::model::VersionMeta;
    use crate::testutil::peer;

    use crate::store::sled_store::SledStore;
    use crate::store::{decode, encode, Batch, Store, Tree};

    use crate::vault::IssueInput;

    const POLICY: &str = r#"
        [[rule]]
        identities = ["admin"]
        verbs = ["*"]
        secrets = ["*"]
        [[rule]]
        identities = ["edge"]
        verbs = ["verify"]
        secrets = ["app/*"]
        [[rule]]
        identities = ["reader"]
        verbs = ["read"]
        secrets = ["*"]
    "#;

    struct Fixture {
        keys: Keys,
        vault: Arc<Vault>,
        clock: Arc<ManualClock>,
        _dir: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sled: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let directory = Arc::new(KeyDirectory::load(&*sled).unwrap());
        let store: Arc<dyn Store> =
            Arc::new(directory::DirectoryStore::new(sled, directory.clone()));
        let (vault, clock) = crate::testutil::vault_over(store, POLICY, 60_000).await;
        let keys = Keys::new(
            vault.clone(),
            directory,
            KeySettings {
                unknown_key_limit: RateLimit::parse(60, 60_000, 5).unwrap(),
                quota_block: 1,
            },
        );
        Fixture {
            keys,
            vault,
            clock,
            _dir: dir,
        }
    }

    impl Fixture {
        async fn issue(&self, name: &str, scopes: &[&str], policy: KeyPolicyInput) -> String {
            let issued = self
                .vault
                .issue_with_policy(
                    &peer("admin"),
                    IssueInput {
                        name: name.into(),
                        environment: "prod".into(),
                        owner: "team".into(),
                        scopes: scopes.iter().map(|s| s.to_string()).collect(),
                        labels: Default::default(),
                        description: String::new(),
                        request_id: String::new(),
                        lifecycle: Default::default(),
                    },
                    policy,
                )
                .await
                .unwrap();
            issued.key.expose().to_owned()
        }

        async fn verify_as(&self, who: &str, input: VerifyInput) -> Result<Verdict> {
            self.keys.verify(&peer(who), input, "VerifyKey").await
        }

        async fn verify(&self, key: &str) -> VerifyResult {
            self.verify_as("edge", input(key)).await.unwrap().result
        }

        /// Rewrites a version's stored state the way RotateSecret / RevokeSecret will: a
        /// guarded commit of the secret record, nothing else.
        fn set_state(&self, name: &str, version: u64, f: impl Fn(&mut VersionMeta)) {
            let store = self.vault.store();
            let raw = store.get(Tree::Secrets, name.as_bytes()).unwrap().unwrap();
            let mut rec: SecretRecord = decode("secret", &raw).unwrap();
            f(rec
                .versions
                .iter_mut()
                .find(|v| v.version == version)
                .unwrap());
            let mut b = Batch::new();
            b.guard(Tree::Secrets, name.as_bytes(), Some(raw));
            b.put(Tree::Secrets, name.as_bytes(), encode(&rec));
            store.commit(b).unwrap();
        }
    }

    fn input(key: &str) -> VerifyInput {
        VerifyInput {
            api_key: Zeroizing::new(key.to_owned()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn each_result_in_the_documented_order() {
        let f = fixture().await;
        let policy = KeyPolicyInput {
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            ..Default::default()
        };
        let key = f.issue("app/a", &["orders:read"], policy).await;
        let ok = |k: &str| VerifyInput {
            client_ip: "10.1.2.3".into(),
            required_scopes: vec!["orders:read".into()],
            environment: "prod".into(),
            ..input(k)
        };
        let v = f.verify_as("edge", ok(&key)).await.unwrap();
        assert_eq!(v.result, VerifyResult::Valid);
        let facts = v.key.unwrap();
        assert_eq!(
            (facts.name.as_str(), facts.version, facts.owner.as_str()),
            ("app/a", 1, "team")
        );
        assert_eq!(v.key_id.len(), 16);

        assert_eq!(f.verify("").await, VerifyResult::Malformed);
        assert_eq!(
            f.verify(&key[..key.len() - 1]).await,
            VerifyResult::Malformed
        );
        let other = ApiKey::generate("ward", "prod").unwrap();
        assert_eq!(f.verify(other.expose()).await, VerifyResult::NotFound);

        let r = |i: VerifyInput| async { f.verify_as("edge", i).await.unwrap().result };
        assert_eq!(
            r(VerifyInput {
                environment: "dev".into(),
                ..ok(&key)
            })
            .await,
            VerifyResult::WrongEnvironment
        );
        assert_eq!(
            r(VerifyInput {
                client_ip: "11.0.0.1".into(),
                ..ok(&key)
            })
            .await,
            VerifyResult::ForbiddenIp
        );
        assert_eq!(
            r(VerifyInput {
                client_ip: String::new(),
                ..ok(&key)
            })
            .await,
            VerifyResult::ForbiddenIp
        );
        assert_eq!(
            r(VerifyInput {
                required_scopes: vec!["orders:write".into()],
                ..ok(&key)
            })
            .await,
            VerifyResult::InsufficientScope
        );
        // Environment is judged before IP, IP before scopes.
        assert_eq!(
            r(VerifyInput {
                environment: "dev".into(),
                client_ip: "11.0.0.1".into(),
                required_scopes: vec!["x".into()],
                ..ok(&key)
            })
            .await,
            VerifyResult::WrongEnvironment
        );

        // Expiry comes before environment.
        let exp = f
            .issue(
                "app/exp",
                &[],
                KeyPolicyInput {
                    expire_ms: Some(f.clock.now_ms() + 10),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(f.verify(&exp).await, VerifyResult::Valid);
        f.clock.advance(10);
        assert_eq!(
            r(VerifyInput {
                environment: "dev".into(),
                ..input(&exp)
            })
            .await,
            VerifyResult::Expired
        );
    }

    #[tokio::test]
    async fn revoked_and_retired_versions_are_refused_on_the_next_call() {
        let f = fixture().await;
        let key = f.issue("app/k", &[], KeyPolicyInput::default()).await;
        assert_eq!(f.verify(&key).await, VerifyResult::Valid);

        // A rotation: the old version is ACTIVE with a grace window (grace_until reported),
        // then INACTIVE once the window closes — with no write at all.
        let until = f.clock.now_ms() + 5_000;
        f.set_state("app/k", 1, |v| {
            v.state = VersionState::Active;
            v.grace_until_ms = Some(until);
        });
        let v = f.verify_as("edge", input(&key)).await.unwrap();
        assert_eq!(v.result, VerifyResult::Valid);
        assert_eq!(v.key.unwrap().grace_until_ms, Some(until));
        f.clock.advance(5_000);
        assert_eq!(f.verify(&key).await, VerifyResult::Disabled);

        // Revocation is seen by the very next call, and precedes every other check.
        f.set_state("app/k", 1, |v| v.state = VersionState::Revoked);
        let wrong_everything = VerifyInput {
            environment: "dev".into(),
            required_scopes: vec!["nope".into()],
            ..input(&key)
        };
        assert_eq!(
            f.verify_as("edge", wrong_everything).await.unwrap().result,
            VerifyResult::Revoked
        );
        f.set_state("app/k", 1, |v| v.state = VersionState::Destroyed);
        assert_eq!(f.verify(&key).await, VerifyResult::Revoked);
    }

    #[tokio::test]
    async fn callers_without_a_grant_learn_nothing() {
        let f = fixture().await;
        let inside = f.issue("app/k", &[], KeyPolicyInput::default()).await;
        let outside = f.issue("other/k", &[], KeyPolicyInput::default()).await;
        assert_eq!(f.verify(&inside).await, VerifyResult::Valid);
        let v = f.verify_as("edge", input(&outside)).await.unwrap();
        assert_eq!(v.result, VerifyResult::NotFound);
        assert!(v.key.is_none());
        // No verify grant at all: the caller's own fault.
        let err = f.verify_as("reader", input(&inside)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        // Bad requests are errors, not verdicts.
        for bad in [
            VerifyInput {
                client_ip: "10.0.0".into(),
                ..input(&inside)
            },
            VerifyInput {
                required_scopes: vec!["Bad Scope".into()],
                ..input(&inside)
            },
            VerifyInput {
                cost: Some(MAX_COST + 1),
                ..input(&inside)
            },
            // Large ones too: the fuzz target `request` found them quoted whole.
            VerifyInput {
                environment: "mars".repeat(100_000),
                ..input(&inside)
            },
            VerifyInput {
                endpoint: "UPPER".repeat(100_000),
                ..input(&inside)
            },
        ] {
            let err = f.verify_as("edge", bad).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
            assert!(err.to_string().len() < 512, "{:.80}", err.to_string());
        }
        // Every call, refused or not, left one audit record; the not-verifiable key's says why.
        let audit: Vec<AuditRecord> = crate::audit::call_records(f.vault.audit())
            .into_iter()
            .filter(|r| r.method == "VerifyKey")
            .collect();
        assert_eq!(audit.len(), 8);
        assert_eq!(audit[1].targets, vec![("other/k".to_string(), 1)]);
        assert_eq!(audit[2].code, Code::PermissionDenied.as_i32());
    }

    #[tokio::test]
    async fn rate_limit_retry_after_is_exact_on_the_clock() {
        let f = fixture().await;
        let key = f
            .issue(
                "app/r",
                &[],
                KeyPolicyInput {
                    rate_limit: Some((10, 1000, 2)),
                    ..Default::default()
                },
            )
            .await;
        for _ in 0..2 {
            assert_eq!(f.verify(&key).await, VerifyResult::Valid);
        }
        let v = f.verify_as("edge", input(&key)).await.unwrap();
        assert_eq!(v.result, VerifyResult::RateLimited);
        let wait = v.retry_after_ms.unwrap();
        assert_eq!(wait, 100);
        assert_eq!(v.rate.unwrap().remaining, 0);
        f.clock.advance(wait - 1);
        assert_eq!(f.verify(&key).await, VerifyResult::RateLimited);
        f.clock.advance(1);
        assert_eq!(f.verify(&key).await, VerifyResult::Valid);
        // A zero-cost check never trips the limit.
        let check = VerifyInput {
            cost: Some(0),
            ..input(&key)
        };
        assert_eq!(
            f.verify_as("edge", check).await.unwrap().result,
            VerifyResult::Valid
        );
    }

    #[tokio::test]
    async fn quota_is_charged_only_when_everything_else_passed() {
        let f = fixture().await;
        let key = f
            .issue(
                "app/q",
                &["s"],
                KeyPolicyInput {
                    quota: Some((3, 0, None)),
                    ..Default::default()
                },
            )
            .await;
        let scoped = |scope: &str, cost| VerifyInput {
            required_scopes: vec![scope.into()],
            cost,
            ..input(&key)
        };
        let v = f.verify_as("edge", scoped("other", None)).await.unwrap();
        assert_eq!(
            (v.result, v.quota_remaining),
            (VerifyResult::InsufficientScope, Some(3))
        );
        let v = f.verify_as("edge", scoped("s", Some(2))).await.unwrap();
        assert_eq!(
            (v.result, v.quota_remaining),
            (VerifyResult::Valid, Some(1))
        );
        let v = f.verify_as("edge", scoped("s", Some(2))).await.unwrap();
        assert_eq!(
            (v.result, v.quota_remaining),
            (VerifyResult::QuotaExceeded, Some(1))
        );
        assert_eq!(v.retry_after_ms, None);
        let v = f.verify_as("edge", scoped("s", Some(1))).await.unwrap();
        assert_eq!(
            (v.result, v.quota_remaining),
            (VerifyResult::Valid, Some(0))
        );
        let usage = f.vault.usage().get("app/q");
        assert_eq!(usage[&1].results[VerifyResult::QuotaExceeded.number()], 1);
        assert_eq!(usage[&1].total, 4);
    }

    #[tokio::test]
    async fn unknown_keys_are_throttled_and_known_keys_never_are() {
        let f = fixture().await;
        let key = f.issue("app/g", &[], KeyPolicyInput::default()).await;
        let outside = f.issue("other/g", &[], KeyPolicyInput::default()).await;
        let from = |k: &str, ip: &str| VerifyInput {
            client_ip: ip.into(),
            ..input(k)
        };
        for _ in 0..5 {
            let guess = ApiKey::generate("ward", "prod").unwrap();
            let v = f
                .verify_as("edge", from(guess.expose(), "192.0.2.1"))
                .await
                .unwrap();
            assert_eq!(v.result, VerifyResult::NotFound);
        }
        // Budget spent: the next unknown key from this client IP is refused …
        let guess = ApiKey::generate("ward", "prod").unwrap();
        let v = f
            .verify_as("edge", from(guess.expose(), "192.0.2.1"))
            .await
            .unwrap();
        assert_eq!(v.result, VerifyResult::RateLimited);
        assert!(v.key.is_none());
        assert_eq!(v.retry_after_ms, Some(1000));
        // … and so is a real key this caller may not verify (it reads as unknown) …
        let v = f
            .verify_as("edge", from(&outside, "192.0.2.1"))
            .await
            .unwrap();
        assert_eq!(v.result, VerifyResult::RateLimited);
        assert!(v.key.is_none());
        // … but a key the caller may verify is never refused by the guard.
        for _ in 0..10 {
            let v = f.verify_as("edge", from(&key, "192.0.2.1")).await.unwrap();
            assert_eq!(v.result, VerifyResult::Valid);
        }
        // Other clients behind the same caller are unaffected.
        let v = f
            .verify_as("edge", from(guess.expose(), "192.0.2.2"))
            .await
            .unwrap();
        assert_eq!(v.result, VerifyResult::NotFound);
        f.clock.advance(1000);
        let v = f
            .verify_as("edge", from(guess.expose(), "192.0.2.1"))
            .await
            .unwrap();
        assert_eq!(v.result, VerifyResult::NotFound);
    }

    #[tokio::test]
    async fn policy_updates_apply_at_once_and_restart_the_quota() {
        let f = fixture().await;
        let key = f
            .issue(
                "app/u",
                &[],
                KeyPolicyInput {
                    quota: Some((1, 0, None)),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(f.verify(&key).await, VerifyResult::Valid);
        assert_eq!(f.verify(&key).await, VerifyResult::QuotaExceeded);
        let update = |mask: &[&str], policy: KeyPolicyInput, id: &str| crate::vault::PolicyUpdate {
            name: "app/u".into(),
            scopes: vec![],
            policy,
            mask: mask.iter().map(|s| s.to_string()).collect(),
            request_id: id.into(),
            ..Default::default()
        };
        let two = KeyPolicyInput {
            quota: Some((2, 0, None)),
            ..Default::default()
        };
        let admin = peer("admin");
        f.vault
            .update_key_policy(&admin, update(&["quota"], two.clone(), "r1"))
            .await
            .unwrap();
        assert_eq!(f.verify(&key).await, VerifyResult::Valid);
        // A retry of the same request does not reset the ledger again.
        f.vault
            .update_key_policy(&admin, update(&["quota"], two, "r1"))
            .await
            .unwrap();
        assert_eq!(f.verify(&key).await, VerifyResult::Valid);
        assert_eq!(f.verify(&key).await, VerifyResult::QuotaExceeded);
        // Expire now: the next call is EXPIRED.
        let now = KeyPolicyInput {
            expire_ms: Some(f.clock.now_ms()),
            ..Default::default()
        };
        let rec = f
            .vault
            .update_key_policy(&admin, update(&["expire_time"], now, ""))
            .await
            .unwrap();
        assert!(rec.key_policy.quota.is_some(), "unmasked fields are kept");
        assert_eq!(f.verify(&key).await, VerifyResult::Expired);
        // Bad input.
        for (mask, p) in [
            (
                vec!["rate_limit"],
                KeyPolicyInput {
                    rate_limit: Some((0, 1000, 0)),
                    ..Default::default()
                },
            ),
            (
                vec!["quota"],
                KeyPolicyInput {
                    quota: Some((5, 3, None)),
                    ..Default::default()
                },
            ),
            (
                vec!["allowed_cidrs"],
                KeyPolicyInput {
                    allowed_cidrs: vec!["10.0.0.1/8".into()],
                    ..Default::default()
                },
            ),
            (vec!["owner"], KeyPolicyInput::default()),
        ] {
            let err = f
                .vault
                .update_key_policy(&admin, update(&mask, p, ""))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{mask:?}: {err}");
        }
    }
}
