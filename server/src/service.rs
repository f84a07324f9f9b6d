//! The tonic service `ward.v1.Secrets`: converts between wire types and the vault's, takes the
//! caller from the verified connection, and maps errors through `status.rs`. No decisions here.

use crate::audit::UsageFact;
use crate::clock::to_timestamp;
use crate::model::{Kind, SecretRecord, VersionState};
use crate::status::to_status;
use crate::tls::Peer;
use crate::vault::{Fetched, IssueInput, ListInput, PutInput, Vault};
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
        };
        let issued = self.vault.issue(&peer, input).await.map_err(to_status)?;
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
        // Last-use facts are extra information: without them the description still stands.
        let usage = self.vault.audit().usage(&s.name).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "usage facts unreadable");
            Vec::new()
        });
        Ok(Response::new(metadata(s, true, &usage)))
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
        };
        let page = self.vault.list(&peer, input).await.map_err(to_status)?;
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: page
                .secrets
                .into_iter()
                .map(|s| metadata(s, false, &[]))
                .collect(),
            next_page_token: page.next_page_token,
        }))
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
    usage: &[(u64, UsageFact)],
) -> pb::SecretMetadata {
    let used = |version: u64| {
        usage
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, f)| to_timestamp(f.last_used_ms))
    };
    let last_used_time = usage
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
                checksum: v.checksum,
                keyring_term: v.term,
                key_id: v.key_id.clone().unwrap_or_default(),
                last_used_time: used(v.version),
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
        last_used_time,
    }
}
