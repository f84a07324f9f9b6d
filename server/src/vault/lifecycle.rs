//! The lifecycle RPCs' domain operations: RotateSecret, RevokeSecret, SetVersionState and
//! DestroyVersion, each a plan run by the one write path (write.rs). The state changes
//! themselves are pure functions of the record (model/machine.rs).

use super::versions::NewValue;
pub use super::versions::Rotated;
use super::write::{check_cas, rewrite, Call, Plan, Staged, Written};
use super::Vault;
use crate::audit::AuditRecord;
use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::identity::Peer;
use crate::model::input::{self, RawDuration, RawExpiration};
use crate::model::machine::Replaced;
use crate::model::{Kind, SecretName, SecretRecord, VersionState};
use crate::policy::Verb;
use crate::store::{encode, version_key, Tree};
use ward::keyformat::ApiKey;
use zeroize::Zeroizing;

/// RotateSecret's input, as received.
pub struct RotateInput {
    /// Secret name (unparsed).
    pub name: String,
    /// STATIC: the new value; API_KEY: empty. Zeroized on drop.
    pub value: Zeroizing<Vec<u8>>,
    /// Grace period of the replaced PRIMARY; None: the secret's default, else the server's.
    pub grace_period: Option<RawDuration>,
    /// Expiry of the new version.
    pub expiration: Option<RawExpiration>,
    /// Compare-and-set on the PRIMARY version.
    pub expected_version: Option<u64>,
    /// Idempotency key, or empty.
    pub request_id: String,
}

/// RevokeSecret's input, as received.
pub struct RevokeInput {
    /// Secret name (unparsed).
    pub name: String,
    /// Version to revoke (0 with `all_versions`).
    pub version: u64,
    /// Revoke the whole secret.
    pub all_versions: bool,
    /// Why (required).
    pub reason: String,
    /// When revoking the PRIMARY: the ACTIVE version that takes its place (0: none).
    pub successor_version: u64,
    /// Compare-and-set on the PRIMARY version.
    pub expected_version: Option<u64>,
    /// Idempotency key, or empty.
    pub request_id: String,
}

/// What RevokeSecret did.
#[derive(Debug, Clone)]
pub struct RevokeDone {
    /// Secret name.
    pub name: String,
    /// Versions revoked by the call.
    pub revoked: Vec<u64>,
    /// The PRIMARY afterwards (0: none).
    pub primary: u64,
    /// When.
    pub time_ms: Millis,
}

/// SetVersionState's input, as received.
pub struct SetStateInput {
    /// Secret name (unparsed).
    pub name: String,
    /// Version to move.
    pub version: u64,
    /// Target state (None: unspecified or unknown on the wire).
    pub state: Option<VersionState>,
    /// ACTIVE: the window from now; PRIMARY: the replaced PRIMARY's grace.
    pub grace_period: Option<RawDuration>,
    /// Compare-and-set on the PRIMARY version.
    pub expected_version: Option<u64>,
    /// Idempotency key, or empty.
    pub request_id: String,
}

/// What SetVersionState left.
#[derive(Debug, Clone)]
pub struct StateSet {
    /// Secret name.
    pub name: String,
    /// The version moved.
    pub version: u64,
    /// Its state now.
    pub state: VersionState,
    /// The PRIMARY now (0: none).
    pub primary: u64,
    /// ACTIVE: when its window closes.
    pub grace_until_ms: Option<Millis>,
}

/// DestroyVersion's input, as received.
pub struct DestroyInput {
    /// Secret name (unparsed).
    pub name: String,
    /// Version to destroy (never 0).
    pub version: u64,
    /// When destroying the PRIMARY: the ACTIVE version that takes its place (0: none).
    pub successor_version: u64,
    /// Compare-and-set on the PRIMARY version.
    pub expected_version: Option<u64>,
    /// Idempotency key, or empty.
    pub request_id: String,
}

/// What DestroyVersion did.
#[derive(Debug, Clone)]
pub struct DestroyDone {
    /// Secret name.
    pub name: String,
    /// The version destroyed.
    pub version: u64,
    /// The PRIMARY afterwards (0: none).
    pub primary: u64,
    /// When.
    pub time_ms: Millis,
}

impl Vault {
    /// Creates a new PRIMARY version and demotes the old one for the grace period.
    pub async fn rotate(&self, peer: &Peer, input: RotateInput) -> Result<Rotated> {
        let call = Call::new(
            peer,
            "RotateSecret",
            Verb::Rotate,
            &input.name,
            &input.request_id,
        );
        self.write(call, |_, name| {
            let grace = input
                .grace_period
                .map(|g| input::grace("grace_period", g))
                .transpose()?;
            let expire = input
                .expiration
                .map(|e| input::expiry(e, self.now()))
                .transpose()?
                .flatten();
            self.check_value_size(input.value.len())?;
            let fingerprint = self.fingerprint(
                "RotateSecret",
                &[
                    name.as_str().as_bytes(),
                    &input.value,
                    &encode(&input.grace_period),
                    &encode(&input.expiration),
                    &encode(&input.expected_version),
                ],
            );
            let target = name.clone();
            let replayed = move |done: Written, rec: &mut AuditRecord| {
                self.rotation_replayed(&target, done, rec)
            };
            let target = name.clone();
            let attempt = move |rec: &mut AuditRecord| {
                let name = &target;
                let (raw, mut secret) = self.load_for(peer, Verb::Rotate, name)?;
                check_cas(name, Some(&secret), input.expected_version)?;
                let now = self.now();
                secret.check_accepts_versions(now)?;
                self.check_version_room(&secret)?;
                let value = match secret.kind {
                    Kind::Static if input.value.is_empty() => {
                        return Err(Error::invalid(format!(
                            "{name} is a STATIC secret: its rotation needs the new value, and \
                             value is empty"
                        )))
                    }
                    Kind::Static => NewValue::Static(&input.value),
                    Kind::ApiKey if !input.value.is_empty() => {
                        return Err(Error::invalid(format!(
                            "{name} is an API key: Ward generates the new key, so send no value"
                        )))
                    }
                    Kind::ApiKey => NewValue::Key(
                        ApiKey::generate(&self.settings.issuer, &secret.environment)
                            .map_err(|e| Error::Internal(format!("key generation: {e}")))?,
                    ),
                };
                let grace_ms = grace.unwrap_or_else(|| self.default_grace(&secret));
                let (batch, rotated) =
                    self.stage_version(&mut secret, Some(raw), value, grace_ms, expire, now)?;
                rec.targets = vec![(name.to_string(), rotated.written.version)];
                rec.key_id = rotated.key_id.clone().unwrap_or_default();
                Ok(Staged {
                    batch,
                    written: rotated.written.clone(),
                    answer: rotated,
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

    /// The first result of a retried rotation (for an API key, the same key).
    fn rotation_replayed(
        &self,
        name: &SecretName,
        done: Written,
        rec: &mut AuditRecord,
    ) -> Result<Rotated> {
        rec.targets = vec![(done.name.clone(), done.version)];
        let secret = self.load(name)?;
        let meta = secret
            .version(done.version)
            .ok_or_else(|| Error::DataLoss(format!("{name}: replayed version is missing")))?;
        let previous = meta.life.replaced.unwrap_or(0);
        let replaced = Replaced {
            version: previous,
            grace_until_ms: secret
                .version(previous)
                .filter(|_| previous != 0)
                .and_then(|p| p.grace_until_ms),
        };
        let (key, key_id) = if secret.kind == Kind::ApiKey {
            let key = self.stored_key(name, done.version)?;
            let key_id = self.key_id(&key);
            rec.key_id = key_id.clone();
            (Some(key), Some(key_id))
        } else {
            (None, None)
        };
        Ok(Rotated {
            written: done,
            key,
            key_id,
            replaced,
        })
    }

    /// Revokes one version or the whole secret; effective on the very next call.
    pub async fn revoke(&self, peer: &Peer, input: RevokeInput) -> Result<RevokeDone> {
        let call = Call::new(
            peer,
            "RevokeSecret",
            Verb::Revoke,
            &input.name,
            &input.request_id,
        );
        self.write(call, |_, name| {
            let reason = input::reason(&input.reason)?;
            match (input.all_versions, input.version, input.successor_version) {
                (true, 0, 0) => {}
                (true, _, 0) => {
                    return Err(Error::invalid(
                        "give either version or all_versions, not both",
                    ))
                }
                (true, _, _) => {
                    return Err(Error::invalid(
                        "successor_version does not apply to all_versions",
                    ))
                }
                (false, 0, _) => {
                    return Err(Error::invalid(
                        "name the version to revoke (1, 2, ...) or set all_versions",
                    ))
                }
                (false, _, _) => {}
            }
            let successor = nonzero(input.successor_version);
            let fingerprint = self.fingerprint(
                "RevokeSecret",
                &[
                    name.as_str().as_bytes(),
                    &encode(&(input.version, input.all_versions, input.successor_version)),
                    reason.as_bytes(),
                    &encode(&input.expected_version),
                ],
            );
            let target = name.clone();
            let replayed = move |done: Written, rec: &mut AuditRecord| {
                rec.targets = vec![(done.name.clone(), input.version)];
                let secret = self.load(&target)?;
                let now = self.now();
                let revoked = if input.all_versions {
                    secret
                        .versions
                        .iter()
                        .filter(|v| v.state == VersionState::Revoked)
                        .map(|v| v.version)
                        .collect()
                } else {
                    vec![input.version]
                };
                Ok(RevokeDone {
                    name: done.name,
                    revoked,
                    primary: secret.primary_at(now),
                    time_ms: secret.life.revoked.as_ref().map_or(now, |r| r.time_ms),
                })
            };
            let target = name.clone();
            let attempt = move |rec: &mut AuditRecord| {
                let name = &target;
                let (raw, mut secret) = self.load_for(peer, Verb::Revoke, name)?;
                check_cas(name, Some(&secret), input.expected_version)?;
                let now = self.now();
                let by = peer.identity.to_string();
                let revoked = if input.all_versions {
                    secret.revoke_all(&by, &reason, now)?
                } else {
                    secret.revoke_version(input.version, successor, &by, &reason, now)?;
                    vec![input.version]
                };
                rec.targets = revoked.iter().map(|&v| (name.to_string(), v)).collect();
                if rec.targets.is_empty() {
                    rec.targets = vec![(name.to_string(), 0)];
                }
                Ok(Staged {
                    batch: rewrite(&secret, raw),
                    written: Written::of(name.as_str(), input.version),
                    answer: RevokeDone {
                        name: name.to_string(),
                        revoked,
                        primary: secret.primary_at(now),
                        time_ms: now,
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

    /// Moves a version between ACTIVE and INACTIVE, or promotes an ACTIVE one to PRIMARY.
    pub async fn set_state(&self, peer: &Peer, input: SetStateInput) -> Result<StateSet> {
        let call = Call::new(
            peer,
            "SetVersionState",
            Verb::Rotate,
            &input.name,
            &input.request_id,
        );
        self.write(call, |rec, name| {
            if input.version == 0 {
                return Err(Error::invalid("name the version to move (1, 2, ...)"));
            }
            let target_state = match input.state {
                Some(
                    s @ (VersionState::Primary | VersionState::Active | VersionState::Inactive),
                ) => s,
                Some(VersionState::Revoked) => {
                    return Err(Error::invalid("to revoke a version, use RevokeSecret"))
                }
                Some(VersionState::Destroyed) => {
                    return Err(Error::invalid("to destroy a version, use DestroyVersion"))
                }
                None => {
                    return Err(Error::invalid(
                        "state must be VERSION_STATE_PRIMARY, VERSION_STATE_ACTIVE or \
                         VERSION_STATE_INACTIVE",
                    ))
                }
            };
            let grace = input
                .grace_period
                .map(|g| input::grace("grace_period", g))
                .transpose()?;
            match (target_state, grace) {
                (VersionState::Inactive, Some(_)) => {
                    return Err(Error::invalid(
                        "grace_period applies to ACTIVE and PRIMARY, not INACTIVE",
                    ))
                }
                (VersionState::Active, Some(0)) => {
                    return Err(Error::invalid(
                        "an ACTIVE version needs a grace_period above 0 (to retire it, set \
                         INACTIVE)",
                    ))
                }
                _ => {}
            }
            let fingerprint = self.fingerprint(
                "SetVersionState",
                &[
                    name.as_str().as_bytes(),
                    &encode(&input.version),
                    target_state.name().as_bytes(),
                    &encode(&input.grace_period),
                    &encode(&input.expected_version),
                ],
            );
            rec.targets = vec![(name.to_string(), input.version)];
            let target = name.clone();
            let replayed = move |_: Written, _: &mut AuditRecord| {
                let secret = self.as_of_now(self.load(&target)?);
                state_set(&secret, input.version, self.now())
            };
            let target = name.clone();
            let attempt = move |_: &mut AuditRecord| {
                let name = &target;
                let (raw, mut secret) = self.load_for(peer, Verb::Rotate, name)?;
                check_cas(name, Some(&secret), input.expected_version)?;
                let now = self.now();
                if let Some(r) = &secret.life.revoked {
                    return Err(Error::FailedPrecondition(format!(
                        "{name} is revoked (by {}: {}); its versions never come back",
                        r.by, r.reason
                    )));
                }
                let by = peer.identity.to_string();
                let grace_ms = grace.unwrap_or_else(|| self.default_grace(&secret));
                match target_state {
                    VersionState::Primary => secret.promote(input.version, now, grace_ms, &by)?,
                    VersionState::Active => secret.set_active(input.version, now, grace_ms, &by)?,
                    _ => secret.set_inactive(input.version, now, &by)?,
                }
                Ok(Staged {
                    answer: state_set(&secret, input.version, now)?,
                    batch: rewrite(&secret, raw),
                    written: Written::of(name.as_str(), input.version),
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

    /// Deletes a version's sealed value (wrapped data key and ciphertext) for good; its
    /// metadata stays and reads as DESTROYED.
    pub async fn destroy(&self, peer: &Peer, input: DestroyInput) -> Result<DestroyDone> {
        let call = Call::new(
            peer,
            "DestroyVersion",
            Verb::Destroy,
            &input.name,
            &input.request_id,
        );
        self.write(call, |rec, name| {
            if input.version == 0 {
                return Err(Error::invalid(
                    "name the version to destroy explicitly (1, 2, ...); 0 is not accepted here",
                ));
            }
            let successor = nonzero(input.successor_version);
            let fingerprint = self.fingerprint(
                "DestroyVersion",
                &[
                    name.as_str().as_bytes(),
                    &encode(&(input.version, input.successor_version)),
                    &encode(&input.expected_version),
                ],
            );
            rec.targets = vec![(name.to_string(), input.version)];
            let target = name.clone();
            let replayed = move |_: Written, _: &mut AuditRecord| {
                let secret = self.load(&target)?;
                let now = self.now();
                let time_ms = secret
                    .version(input.version)
                    .and_then(|v| v.life.changed_ms)
                    .unwrap_or(now);
                Ok(DestroyDone {
                    name: target.to_string(),
                    version: input.version,
                    primary: secret.primary_at(now),
                    time_ms,
                })
            };
            let target = name.clone();
            let attempt = move |_: &mut AuditRecord| {
                let name = &target;
                let (raw, mut secret) = self.load_for(peer, Verb::Destroy, name)?;
                check_cas(name, Some(&secret), input.expected_version)?;
                let now = self.now();
                let by = peer.identity.to_string();
                secret.destroy_version(input.version, successor, &by, now)?;
                let mut batch = rewrite(&secret, raw);
                // Crypto-shredding: the wrapped data key goes with the ciphertext.
                batch.remove(Tree::Versions, version_key(name.as_str(), input.version));
                Ok(Staged {
                    batch,
                    written: Written::of(name.as_str(), input.version),
                    answer: DestroyDone {
                        name: name.to_string(),
                        version: input.version,
                        primary: secret.primary_at(now),
                        time_ms: now,
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
}

fn state_set(secret: &SecretRecord, version: u64, now: Millis) -> Result<StateSet> {
    let meta = secret
        .version(version)
        .ok_or_else(|| Error::NotFound(format!("version {version} of {}", secret.name)))?;
    let state = secret.standing(meta, now).state;
    Ok(StateSet {
        name: secret.name.clone(),
        version,
        state,
        primary: secret.primary_at(now),
        grace_until_ms: meta
            .grace_until_ms
            .filter(|_| state == VersionState::Active),
    })
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}
