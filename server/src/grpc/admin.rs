//! The tonic service `ward.v1.Admin`: key management over a [`Vault`]. Conversion only.

use super::peer;
use super::status::to_status;
use crate::clock::to_timestamp;
use crate::vault::Vault;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use ward::v1::{self as pb, admin_server::Admin};
use ward_hsm::KeyWrapper;

/// `ward.v1.Admin` over a [`Vault`] and the HSM that holds its master keys.
pub struct AdminService {
    vault: Arc<Vault>,
    hsm: Arc<dyn KeyWrapper>,
}

impl AdminService {
    /// A service over `vault`, rotating keys in `hsm`.
    pub fn new(vault: Arc<Vault>, hsm: Arc<dyn KeyWrapper>) -> Self {
        Self { vault, hsm }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn rotate_keyring(
        &self,
        req: Request<pb::RotateKeyringRequest>,
    ) -> Result<Response<pb::RotateKeyringResponse>, Status> {
        let peer = peer(&req)?;
        let t = self
            .vault
            .rotate_keyring(&peer, &self.hsm)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RotateKeyringResponse {
            term: t.term,
            master_key_label: t.master_label,
            create_time: Some(to_timestamp(t.create_ms)),
        }))
    }

    async fn rotate_master_key(
        &self,
        req: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        let peer = peer(&req)?;
        let new_label = req.into_inner().new_label;
        let r = self
            .vault
            .rotate_master_key(&peer, &self.hsm, &new_label)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RotateMasterKeyResponse {
            previous_label: r.previous_label,
            master_key_label: r.label,
            terms_rewrapped: r.terms,
        }))
    }

    async fn describe_keyring(
        &self,
        req: Request<pb::DescribeKeyringRequest>,
    ) -> Result<Response<pb::KeyringStatus>, Status> {
        let peer = peer(&req)?;
        let k = self
            .vault
            .describe_keyring(&peer)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::KeyringStatus {
            current_term: k.current_term,
            terms: k
                .terms
                .into_iter()
                .map(|t| pb::KeyringTerm {
                    term: t.term,
                    master_key_label: t.master_label,
                    create_time: Some(to_timestamp(t.create_ms)),
                })
                .collect(),
            master_key_label: k.master_label,
            master_key_wraps: k.wraps,
            master_key_wrap_limit: k.wrap_limit,
        }))
    }
}
