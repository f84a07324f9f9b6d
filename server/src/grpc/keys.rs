//! The tonic service `ward.v1.Keys`: converts between wire types and the domain's, takes the
//! caller from the verified connection, and maps errors through `status.rs`. No decisions here.

use super::peer;
use super::status::to_status;
use super::wire::{policy_input, policy_out, result, schedule_input, verdict};
use crate::clock::to_timestamp;
use crate::keys::{Keys, VerifyInput, VerifyResult};
use crate::vault::{PolicyUpdate, Vault};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use ward::v1::{self as pb, keys_server};
use zeroize::Zeroizing;

/// `ward.v1.Keys` over the verifier and the vault.
pub struct KeysService {
    keys: Arc<Keys>,
    vault: Arc<Vault>,
}

impl KeysService {
    /// A service over `keys` and `vault`.
    pub fn new(keys: Arc<Keys>, vault: Arc<Vault>) -> Self {
        Self { keys, vault }
    }
}

#[tonic::async_trait]
impl keys_server::Keys for KeysService {
    async fn verify_key(
        &self,
        req: Request<pb::VerifyKeyRequest>,
    ) -> Result<Response<pb::VerifyKeyResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let input = VerifyInput {
            api_key: Zeroizing::new(r.api_key),
            required_scopes: r.required_scopes,
            client_ip: r.client_ip,
            cost: r.cost,
            environment: r.environment,
            endpoint: r.endpoint,
        };
        let v = self
            .keys
            .verify(&peer, input, "VerifyKey")
            .await
            .map_err(to_status)?;
        Ok(Response::new(verdict(v)))
    }

    async fn update_key_policy(
        &self,
        req: Request<pb::UpdateKeyPolicyRequest>,
    ) -> Result<Response<pb::UpdateKeyPolicyResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let p = r.policy.unwrap_or_default();
        let input = PolicyUpdate {
            name: r.name,
            scopes: p.scopes.clone(),
            schedule: schedule_input(&p),
            policy: policy_input(p.allowed_cidrs, p.rate_limit, p.quota, p.expire_time)
                .map_err(to_status)?,
            mask: r.update_mask.map(|m| m.paths).unwrap_or_default(),
            request_id: r.request_id,
        };
        let s = self
            .vault
            .update_key_policy(&peer, input)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::UpdateKeyPolicyResponse {
            policy: Some(policy_out(s.scopes.clone(), &s.key_policy, &s.life)),
            name: s.name,
            update_time: Some(to_timestamp(s.update_ms)),
        }))
    }

    async fn get_key_usage(
        &self,
        req: Request<pb::GetKeyUsageRequest>,
    ) -> Result<Response<pb::GetKeyUsageResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let report = self
            .keys
            .usage(&peer, &r.name, r.version)
            .await
            .map_err(to_status)?;
        let last = report
            .versions
            .values()
            .filter_map(|u| u.last_used_ms)
            .max();
        let versions = report
            .versions
            .into_iter()
            .map(|(version, u)| pb::KeyVersionUsage {
                version,
                results: u
                    .results
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .filter_map(|(i, n)| {
                        VerifyResult::from_number(i).map(|r| pb::ResultCount {
                            result: result(r) as i32,
                            count: *n,
                        })
                    })
                    .collect(),
                endpoints: u
                    .endpoints
                    .into_iter()
                    .map(|(endpoint, count)| pb::EndpointCount { endpoint, count })
                    .collect(),
                last_used_time: u.last_used_ms.map(to_timestamp),
                last_client_ip: u.last_client_ip,
                total: u.total,
            })
            .collect();
        Ok(Response::new(pb::GetKeyUsageResponse {
            name: report.name,
            versions,
            last_used_time: last.map(to_timestamp),
            quota_remaining: report.quota_remaining,
        }))
    }
}
