//! The tonic service `ward.v1.Secrets`: converts between wire types and the vault's, takes the
//! caller from the verified connection, and maps errors through `status.rs`. No decisions here.

use super::peer;
use super::status::to_status;
use super::wire::{
    at, fetched, from_state, metadata, policy_input, raw_duration, state, watch_event,
};
use crate::changes::watch::{HeldInput, WatchHub, WatchInput};
use crate::clock::to_timestamp;
use crate::model::input::{LifecycleInput, RawExpiration};
use crate::vault::{
    DestroyInput, IssueInput, ListInput, PutInput, RevokeInput, RotateInput, SetStateInput, Vault,
};
use futures::StreamExt;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use ward::v1::{self as pb, secrets_server::Secrets};
use zeroize::Zeroizing;

/// `ward.v1.Secrets` over a [`Vault`].
pub struct SecretsService {
    vault: Arc<Vault>,
    hub: Arc<WatchHub>,
}

impl SecretsService {
    /// A service over `vault`, whose watch streams are fed by `hub`.
    pub fn new(vault: Arc<Vault>, hub: Arc<WatchHub>) -> Self {
        Self { vault, hub }
    }
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
                rotation_period: r.rotation_period.map(raw_duration),
                default_grace_period: r.default_grace_period.map(raw_duration),
                expiration: r.expiration.map(|e| match e {
                    pb::put_secret_request::Expiration::ExpireTime(t) => at(t),
                    pb::put_secret_request::Expiration::Ttl(d) => {
                        RawExpiration::Ttl(raw_duration(d))
                    }
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
                rotation_period: r.rotation_period.map(raw_duration),
                default_grace_period: r.default_grace_period.map(raw_duration),
                expiration: r.expiration.map(|e| match e {
                    pb::issue_key_request::Expiration::ExpireTime(t) => at(t),
                    pb::issue_key_request::Expiration::Ttl(d) => {
                        RawExpiration::Ttl(raw_duration(d))
                    }
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
            grace_period: r.grace_period.map(raw_duration),
            expiration: r.expiration.map(|e| match e {
                pb::rotate_secret_request::Expiration::ExpireTime(t) => at(t),
                pb::rotate_secret_request::Expiration::Ttl(d) => {
                    RawExpiration::Ttl(raw_duration(d))
                }
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
            grace_period: r.grace_period.map(raw_duration),
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
        let rx = self
            .hub
            .watch(&self.vault, &peer, input)
            .await
            .map_err(to_status)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|item| item.map(watch_event).map_err(to_status));
        Ok(Response::new(Box::pin(stream)))
    }
}
