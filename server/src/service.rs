//! The tonic service `ward.v1.Secrets`: converts between wire types and the vault's, takes the
//! caller from the verified connection, and maps errors through `status.rs`. No decisions here.

use crate::audit::UsageFact;
use crate::clock::{to_timestamp, Millis};
use crate::keys_service::{policy_input, quota_out, rate_limit_out};
use crate::lifecycle::input::{LifecycleInput, RawDuration, RawExpiration};
use crate::lifecycle::ops::{DestroyInput, RevokeInput, RotateInput, SetStateInput};
use crate::lifecycle::watch::{EventKind, HeldInput, WatchEvent, WatchInput};
use crate::model::{Kind, SecretRecord, VersionState};
use crate::status::to_status;
use crate::tls::Peer;
use crate::vault::{Fetched, IssueInput, ListInput, PutInput, Vault};
use futures::StreamExt;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use ward::v1::{self as pb, secrets_server::Secrets};
use zeroize::Zeroizing;

/// `ward.v1.Secrets` over a [`Vault`].
pub struct SecretsService {
    vault: Arc<Vault>,
}

impl SecretsService {
    /// A service over `vault`.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

/// The verified caller of a request. Every connection is mutual TLS, so a request without a
/// peer can only be a bug; refuse it rather than guess.
pub fn peer<T>(req: &Request<T>) -> Result<Peer, Status> {
    req.extensions()
        .get::<Peer>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))
}

#[tonic::async_trait]
impl Secrets for SecretsService {
    async fn put_secret(
        &self,
        req: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::PutSecretResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let input = PutInput {
            name: r.name,
            value: Zeroizing::new(r.value),
            environment: r.environment,
            owner: r.owner,
            labels: r.labels.into_iter().collect(),
            description: r.description,
            expected_version: r.expected_version,
            request_id: r.request_id,
            lifecycle: LifecycleInput {
                rotation_period: r.rotation_period.map(duration),
                default_grace_period: r.default_grace_period.map(duration),
                expiration: r.expiration.map(|e| match e {
                    pb::put_secret_request::Expiration::ExpireTime(t) => at(t),
                    pb::put_secret_request::Expiration::Ttl(d) => RawExpiration::Ttl(duration(d)),
                }),
            },
        };
        let w = self.vault.put(&peer, input).await.map_err(to_status)?;
        Ok(Response::new(pb::PutSecretResponse {
            name: w.name,
            version: w.version,
            checksum: w.checksum,
            create_time: Some(to_timestamp(w.create_ms)),
        }))
    }

    async fn issue_key(
        &self,
        req: Request<pb::IssueKeyRequest>,
    ) -> Result<Response<pb::IssueKeyResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let input = IssueInput {
            name: r.name,
            environment: r.environment,
            owner: r.owner,
            scopes: r.scopes,
            labels: r.labels.into_iter().collect(),
            description: r.description,
            request_id: r.request_id,
            lifecycle: LifecycleInput {
                rotation_period: r.rotation_period.map(duration),
                default_grace_period: r.default_grace_period.map(duration),
                expiration: r.expiration.map(|e| match e {
                    pb::issue_key_request::Expiration::ExpireTime(t) => at(t),
                    pb::issue_key_request::Expiration::Ttl(d) => RawExpiration::Ttl(duration(d)),
                }),
            },
        };
        let policy =
            policy_input(r.allowed_cidrs, r.rate_limit, r.quota, None).map_err(to_status)?;
        let issued = self
            .vault
            .issue_with_policy(&peer, input, policy)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::IssueKeyResponse {
            name: issued.written.name,
            version: issued.written.version,
            api_key: issued.key.expose().to_owned(),
            key_id: issued.key_id,
            create_time: Some(to_timestamp(issued.written.create_ms)),
        }))
    }

    async fn fetch_secret(
        &self,
        req: Request<pb::FetchSecretRequest>,
    ) -> Result<Response<pb::FetchSecretResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let f = self
            .vault
            .fetch(&peer, &r.name, r.version)
            .await
            .map_err(to_status)?;
        Ok(Response::new(fetched(f)))
    }

    async fn batch_fetch_secrets(
        &self,
        req: Request<pb::BatchFetchSecretsRequest>,
    ) -> Result<Response<pb::BatchFetchSecretsResponse>, Status> {
        let peer = peer(&req)?;
        let items: Vec<(String, u64)> = req
            .into_inner()
            .items
            .into_iter()
            .map(|i| (i.name, i.version))
            .collect();
        let results = self
            .vault
            .batch_fetch(&peer, &items)
            .await
            .map_err(to_status)?;
        let results = items
            .into_iter()
            .zip(results)
            .map(|((name, requested_version), r)| pb::BatchFetchResult {
                name,
                requested_version,
                result: Some(match r {
                    Ok(f) => pb::batch_fetch_result::Result::Secret(fetched(f)),
                    Err(e) => {
                        let s = to_status(e);
                        pb::batch_fetch_result::Result::Error(pb::ItemError {
                            code: s.code() as i32,
                            message: s.message().to_owned(),
                        })
                    }
                }),
            })
            .collect();
        Ok(Response::new(pb::BatchFetchSecretsResponse { results }))
    }

    async fn describe_secret(
        &self,
        req: Request<pb::DescribeSecretRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let peer = peer(&req)?;
        let s = self
            .vault
            .describe(&peer, &req.into_inner().name)
            .await
            .map_err(to_status)?;
        let last_used = self.vault.usage().last_used(&s.name);
        // Last-read facts are extra information: without them the description still stands.
        let usage = self.vault.audit().usage(&s.name).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "usage facts unreadable");
            Vec::new()
        });
        Ok(Response::new(metadata(s, true, last_used, &usage)))
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let input = ListInput {
            page_size: r.page_size,
            page_token: r.page_token,
            name_prefix: r.name_prefix,
            environment: r.environment,
            owner: r.owner,
            labels: r.labels.into_iter().collect(),
            unused_days: r.unused_keys.then_some(r.unused_days),
        };
        let page = self.vault.list(&peer, input).await.map_err(to_status)?;
        let usage = self.vault.usage();
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: page
                .secrets
                .into_iter()
                .map(|s| {
                    let last_used = usage.last_used(&s.name);
                    metadata(s, false, last_used, &[])
                })
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn rotate_secret(
        &self,
        req: Request<pb::RotateSecretRequest>,
    ) -> Result<Response<pb::RotateSecretResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let input = RotateInput {
            name: r.name,
            value: Zeroizing::new(r.value),
            grace_period: r.grace_period.map(duration),
            expiration: r.expiration.map(|e| match e {
                pb::rotate_secret_request::Expiration::ExpireTime(t) => at(t),
                pb::rotate_secret_request::Expiration::Ttl(d) => RawExpiration::Ttl(duration(d)),
            }),
            expected_version: r.expected_version,
            request_id: r.request_id,
        };
        let done = self.vault.rotate(&peer, input).await.map_err(to_status)?;
        Ok(Response::new(pb::RotateSecretResponse {
            name: done.written.name,
            version: done.written.version,
            checksum: done.written.checksum,
            create_time: Some(to_timestamp(done.written.create_ms)),
            api_key: done
                .key
                .as_ref()
                .map(|k| k.expose().to_owned())
                .unwrap_or_default(),
            key_id: done.key_id.unwrap_or_default(),
            previous_version: done.replaced.version,
            previous_grace_until: done.replaced.grace_until_ms.map(to_timestamp),
        }))
    }

    async fn revoke_secret(
        &self,
        req: Request<pb::RevokeSecretRequest>,
    ) -> Result<Response<pb::RevokeSecretResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let input = RevokeInput {
            name: r.name,
            version: r.version,
            all_versions: r.all_versions,
            reason: r.reason,
            successor_version: r.successor_version,
            expected_version: r.expected_version,
            request_id: r.request_id,
        };
        let done = self.vault.revoke(&peer, input).await.map_err(to_status)?;
        Ok(Response::new(pb::RevokeSecretResponse {
            name: done.name,
            revoked_versions: done.revoked,
            primary_version: done.primary,
            revoke_time: Some(to_timestamp(done.time_ms)),
        }))
    }

    async fn set_version_state(
        &self,
        req: Request<pb::SetVersionStateRequest>,
    ) -> Result<Response<pb::SetVersionStateResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let input = SetStateInput {
            name: r.name,
            version: r.version,
            state: from_state(r.state),
            grace_period: r.grace_period.map(duration),
            expected_version: r.expected_version,
            request_id: r.request_id,
        };
        let done = self
            .vault
            .set_state(&peer, input)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SetVersionStateResponse {
            name: done.name,
            version: done.version,
            state: state(done.state) as i32,
            primary_version: done.primary,
            grace_until: done.grace_until_ms.map(to_timestamp),
        }))
    }

    async fn destroy_version(
        &self,
        req: Request<pb::DestroyVersionRequest>,
    ) -> Result<Response<pb::DestroyVersionResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let input = DestroyInput {
            name: r.name,
            version: r.version,
            successor_version: r.successor_version,
            expected_version: r.expected_version,
            request_id: r.request_id,
        };
        let done = self.vault.destroy(&peer, input).await.map_err(to_status)?;
        Ok(Response::new(pb::DestroyVersionResponse {
            name: done.name,
            version: done.version,
            primary_version: done.primary,
            destroy_time: Some(to_timestamp(done.time_ms)),
        }))
    }

    type WatchSecretsStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::WatchEvent, Status>> + Send + 'static>>;

    async fn watch_secrets(
        &self,
        req: Request<pb::WatchSecretsRequest>,
    ) -> Result<Response<Self::WatchSecretsStream>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let input = WatchInput {
            names: r.names,
            name_prefix: r.name_prefix,
            held: r
                .held
                .into_iter()
                .map(|h| HeldInput {
                    name: h.name,
                    versions: h
                        .versions
                        .into_iter()
                        .map(|v| (v.version, from_state(v.state)))
                        .collect(),
                })
                .collect(),
            sync_only: r.sync_only,
        };
        let rx = self.vault.watch(&peer, input).await.map_err(to_status)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|item| item.map(watch_event).map_err(to_status));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A wire duration as the lifecycle layer receives it (checked there, not here).
pub fn duration(d: prost_types::Duration) -> RawDuration {
    RawDuration {
        seconds: d.seconds,
        nanos: d.nanos,
    }
}

/// A wire timestamp as an absolute expiry, as the lifecycle layer receives it.
pub fn at(t: prost_types::Timestamp) -> RawExpiration {
    RawExpiration::At {
        seconds: t.seconds,
        nanos: t.nanos,
    }
}

fn to_duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A wire state as the domain's; unspecified or unknown numbers are None.
pub fn from_state(n: i32) -> Option<VersionState> {
    match pb::VersionState::try_from(n).ok()? {
        pb::VersionState::Unspecified => None,
        pb::VersionState::Primary => Some(VersionState::Primary),
        pb::VersionState::Active => Some(VersionState::Active),
        pb::VersionState::Inactive => Some(VersionState::Inactive),
        pb::VersionState::Revoked => Some(VersionState::Revoked),
        pb::VersionState::Destroyed => Some(VersionState::Destroyed),
    }
}

fn watch_event(e: WatchEvent) -> pb::WatchEvent {
    let kind = match e.kind {
        EventKind::Rotated => pb::WatchEventType::Rotated,
        EventKind::StateChanged => pb::WatchEventType::StateChanged,
        EventKind::Revoked => pb::WatchEventType::Revoked,
        EventKind::Expired => pb::WatchEventType::Expired,
        EventKind::Destroyed => pb::WatchEventType::Destroyed,
        EventKind::RotationDue => pb::WatchEventType::RotationDue,
        EventKind::Synced => pb::WatchEventType::Synced,
    };
    pb::WatchEvent {
        r#type: kind as i32,
        name: e.name,
        version: e.version,
        state: e.state.map_or(pb::VersionState::Unspecified, state) as i32,
        reason: e.reason,
        time: Some(to_timestamp(e.time_ms)),
        secret: e.secret.map(|s| metadata(s, true, None, &[])),
    }
}

fn fetched(f: Fetched) -> pb::FetchSecretResponse {
    pb::FetchSecretResponse {
        name: f.name,
        version: f.version,
        state: state(f.state) as i32,
        // prost owns its buffers; this copy lives until the response is encoded and sent.
        value: f.value.to_vec(),
        checksum: f.checksum,
        kind: kind(f.kind) as i32,
        environment: f.environment,
        create_time: Some(to_timestamp(f.create_ms)),
        grace_until: f.grace_until_ms.map(to_timestamp),
        expire_time: f.expire_ms.map(to_timestamp),
    }
}

fn kind(k: Kind) -> pb::SecretKind {
    match k {
        Kind::Static => pb::SecretKind::Static,
        Kind::ApiKey => pb::SecretKind::ApiKey,
    }
}

fn state(s: VersionState) -> pb::VersionState {
    match s {
        VersionState::Primary => pb::VersionState::Primary,
        VersionState::Active => pb::VersionState::Active,
        VersionState::Inactive => pb::VersionState::Inactive,
        VersionState::Revoked => pb::VersionState::Revoked,
        VersionState::Destroyed => pb::VersionState::Destroyed,
    }
}

fn metadata(
    s: SecretRecord,
    with_versions: bool,
    last_used: Option<Millis>,
    usage: &[(u64, UsageFact)],
) -> pb::SecretMetadata {
    let read = |version: u64| {
        usage
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, f)| to_timestamp(f.last_used_ms))
    };
    let last_read_time = usage
        .iter()
        .map(|(_, f)| f.last_used_ms)
        .max()
        .map(to_timestamp);
    let versions = if with_versions {
        s.versions
            .iter()
            .map(|v| pb::VersionInfo {
                version: v.version,
                state: state(v.state) as i32,
                create_time: Some(to_timestamp(v.create_ms)),
                fingerprint: hex::encode(v.fingerprint),
                keyring_term: v.term,
                key_id: v.key_id.clone().unwrap_or_default(),
                grace_until: v
                    .grace_until_ms
                    .filter(|_| v.state == VersionState::Active)
                    .map(to_timestamp),
                expire_time: v.life.expire_ms.map(to_timestamp),
                state_reason: v
                    .life
                    .reason
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                state_change_time: v.life.changed_ms.map(to_timestamp),
                last_read_time: read(v.version),
            })
            .collect()
    } else {
        Vec::new()
    };
    pb::SecretMetadata {
        name: s.name,
        kind: kind(s.kind) as i32,
        environment: s.environment,
        owner: s.owner,
        labels: s.labels.into_iter().collect(),
        description: s.description,
        scopes: s.scopes,
        create_time: Some(to_timestamp(s.create_ms)),
        update_time: Some(to_timestamp(s.update_ms)),
        primary_version: s.primary,
        versions,
        created_by: s.created_by,
        allowed_cidrs: s
            .key_policy
            .allowed_cidrs
            .iter()
            .map(ToString::to_string)
            .collect(),
        rate_limit: s.key_policy.rate_limit.map(rate_limit_out),
        quota: s.key_policy.quota.map(quota_out),
        last_used_time: last_used.map(to_timestamp),
        rotation_period: s.life.rotation_period_ms.map(to_duration),
        next_rotation_time: s.life.next_rotation_ms.map(to_timestamp),
        rotation_due: s.life.rotation_due_ms.is_some(),
        default_grace_period: s.life.grace_ms.map(to_duration),
        expire_time: s.life.expire_ms.map(to_timestamp),
        revoked: s.life.revoked.is_some(),
        revoke_reason: s
            .life
            .revoked
            .as_ref()
            .map(|r| format!("revoked by {}: {}", r.by, r.reason))
            .unwrap_or_default(),
        revoke_time: s.life.revoked.as_ref().map(|r| r.time_ms).map(to_timestamp),
        last_read_time,
    }
}
