//! Secrets as values: PutSecret, FetchSecret, BatchFetchSecrets, DescribeSecret and
//! ListSecrets.

use super::versions::{Fetched, NewValue};
use super::write::{check_cas, Call, Plan, Staged, Written};
use super::Vault;
use crate::audit::AuditRecord;
use crate::error::{Error, Result};
use crate::identity::Peer;
use crate::model::input::{LifecycleInput, LifecyclePolicy};
use crate::model::{
    check_labels, check_text, KeyPolicy, Kind, SecretLife, SecretName, SecretRecord,
    MAX_DESCRIPTION,
};
use crate::policy::Verb;
use crate::store::{decode, encode, Tree};
use base64::Engine;
use std::collections::BTreeMap;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Largest page of ListSecrets.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Page size when the request names none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Days of the stale-key report when the request names none.
pub const DEFAULT_UNUSED_DAYS: u32 = 90;
/// Longest stale-key window, in days.
pub const MAX_UNUSED_DAYS: u32 = 3650;
const DAY_MS: u64 = 24 * 3600 * 1000;

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

/// One page of ListSecrets.
pub struct Page {
    /// Secrets on this page, in name order.
    pub secrets: Vec<SecretRecord>,
    /// Token of the next page; empty on the last.
    pub next_page_token: String,
}

impl Vault {
    /// Stores a caller-supplied value as a new PRIMARY version.
    pub async fn put(&self, peer: &Peer, input: PutInput) -> Result<Written> {
        let call = Call::new(
            peer,
            "PutSecret",
            Verb::Write,
            &input.name,
            &input.request_id,
        );
        self.write(call, |_, name| {
        if input.value.is_empty() {
            return Err(Error::invalid("value is empty"));
        }
        self.check_value_size(input.value.len())?;
        check_labels(&input.labels)?;
        check_text("description", &input.description, MAX_DESCRIPTION)?;
        self.check_owner(peer, name, &input.owner)?;
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
        let replayed = |done: Written, rec: &mut AuditRecord| {
            rec.targets = vec![(done.name.clone(), done.version)];
            Ok(done)
        };
        let target = name.clone();
        let attempt = move |rec: &mut AuditRecord| {
            let name = &target;
            let raw = self.store.get(Tree::Secrets, name.as_str().as_bytes())?;
            let existing: Option<SecretRecord> =
                raw.as_deref().map(|b| decode("secret", b)).transpose()?;
            if let Some(s) = &existing {
                // Before anything about the secret is told (its version, kind, environment):
                // those are for callers that may write it.
                self.authorize(peer, Verb::Write, name, Some(&s.environment))?;
            }
            check_cas(name, existing.as_ref(), input.expected_version)?;
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
            self.authorize(peer, Verb::Write, name, Some(&secret.environment))?;
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
            let grace = self.default_grace(&secret);
            let (batch, added) = self.stage_version(
                &mut secret,
                raw,
                NewValue::Static(&input.value),
                grace,
                None,
                now,
            )?;
            rec.targets = vec![(name.to_string(), added.written.version)];
            Ok(Staged {
                batch,
                written: added.written.clone(),
                answer: added.written,
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
        let secret = self.load_for_read(peer, Verb::Read, &name)?;
        self.read_version_of(&secret, &name, version)
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
