//! The tonic service `ward.v1.Keys`: converts between wire types and the domain's, takes the
//! caller from the verified connection, and maps errors through `status.rs`. No decisions here.

use crate::clock::{to_timestamp, Millis};
use crate::error::{Error, Result};
use crate::keypolicy::{KeyPolicy, KeyPolicyInput};
use crate::keys::{Keys, Verdict, VerifyInput, VerifyResult};
use crate::service::peer;
use crate::status::to_status;
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
            policy: Some(policy_out(
                s.scopes.clone(),
                &s.key_policy,
                s.life.expire_ms,
            )),
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

/// The wire form of a verdict.
pub fn verdict(v: Verdict) -> pb::VerifyKeyResponse {
    let mut out = pb::VerifyKeyResponse {
        valid: v.valid(),
        result: result(v.result) as i32,
        key_id: v.key_id,
        rate_limit: v.rate.map(|s| pb::RateLimitState {
            limit: s.limit,
            remaining: s.remaining,
            reset_time: Some(to_timestamp(s.reset_ms)),
        }),
        quota_remaining: v.quota_remaining,
        retry_after: v.retry_after_ms.map(duration),
        ..Default::default()
    };
    if let Some(k) = v.key {
        out.name = k.name;
        out.version = k.version;
        out.owner = k.owner;
        out.environment = k.environment;
        out.scopes = k.scopes;
        out.expire_time = k.expire_ms.map(to_timestamp);
        out.grace_until = k.grace_until_ms.map(to_timestamp);
    }
    out
}

/// The wire enum of a result.
pub fn result(r: VerifyResult) -> pb::VerifyResult {
    match r {
        VerifyResult::Valid => pb::VerifyResult::Valid,
        VerifyResult::Malformed => pb::VerifyResult::Malformed,
        VerifyResult::NotFound => pb::VerifyResult::NotFound,
        VerifyResult::Revoked => pb::VerifyResult::Revoked,
        VerifyResult::Expired => pb::VerifyResult::Expired,
        VerifyResult::Disabled => pb::VerifyResult::Disabled,
        VerifyResult::WrongEnvironment => pb::VerifyResult::WrongEnvironment,
        VerifyResult::ForbiddenIp => pb::VerifyResult::ForbiddenIp,
        VerifyResult::InsufficientScope => pb::VerifyResult::InsufficientScope,
        VerifyResult::RateLimited => pb::VerifyResult::RateLimited,
        VerifyResult::QuotaExceeded => pb::VerifyResult::QuotaExceeded,
    }
}

/// Milliseconds as a protobuf duration.
pub fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf duration in milliseconds (rounded up); negative or malformed ones are invalid.
fn duration_ms(field: &str, d: &prost_types::Duration) -> Result<u64> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Error::invalid(format!(
            "{field} must be a positive duration"
        )));
    }
    let secs = u64::try_from(d.seconds).unwrap_or(u64::MAX);
    Ok(secs
        .saturating_mul(1000)
        .saturating_add((d.nanos as u64).div_ceil(1_000_000)))
}

/// A protobuf timestamp in milliseconds since the epoch; before 1970 is invalid.
fn timestamp_ms(field: &str, t: &prost_types::Timestamp) -> Result<Millis> {
    if t.seconds < 0 || t.nanos < 0 || t.nanos >= 1_000_000_000 {
        return Err(Error::invalid(format!(
            "{field} is not a valid time after 1970"
        )));
    }
    Ok((t.seconds as u64)
        .saturating_mul(1000)
        .saturating_add(t.nanos as u64 / 1_000_000))
}

/// The domain input of a policy's wire fields (shared with IssueKey).
pub fn policy_input(
    allowed_cidrs: Vec<String>,
    rate_limit: Option<pb::RateLimit>,
    quota: Option<pb::Quota>,
    expire_time: Option<prost_types::Timestamp>,
) -> Result<KeyPolicyInput> {
    let rate_limit = rate_limit
        .map(|r| -> Result<_> {
            let period = r
                .period
                .as_ref()
                .map(|d| duration_ms("rate_limit.period", d))
                .transpose()?
                .unwrap_or(0);
            Ok((r.requests, period, r.burst))
        })
        .transpose()?;
    let quota = quota
        .map(|q| -> Result<_> {
            let period = q
                .refill_period
                .as_ref()
                .map(|d| duration_ms("quota.refill_period", d))
                .transpose()?;
            Ok((q.limit, q.refill, period))
        })
        .transpose()?;
    let expire_ms = expire_time
        .as_ref()
        .map(|t| timestamp_ms("expire_time", t))
        .transpose()?;
    Ok(KeyPolicyInput {
        allowed_cidrs,
        rate_limit,
        quota,
        expire_ms,
    })
}

/// The wire form of a key policy.
/// The wire form of a key policy; its expiry is the secret's lifecycle expiry.
pub fn policy_out(scopes: Vec<String>, p: &KeyPolicy, expire_ms: Option<Millis>) -> pb::KeyPolicy {
    pb::KeyPolicy {
        scopes,
        allowed_cidrs: p.allowed_cidrs.iter().map(ToString::to_string).collect(),
        rate_limit: p.rate_limit.map(rate_limit_out),
        quota: p.quota.map(quota_out),
        expire_time: expire_ms.map(to_timestamp),
    }
}

/// The wire form of a rate limit.
pub fn rate_limit_out(r: crate::keypolicy::RateLimit) -> pb::RateLimit {
    pb::RateLimit {
        requests: r.requests,
        period: Some(duration(r.period_ms)),
        burst: r.burst,
    }
}

/// The wire form of a quota.
pub fn quota_out(q: crate::keypolicy::Quota) -> pb::Quota {
    pb::Quota {
        limit: q.limit,
        refill: if q.refill_period_ms.is_some() {
            q.refill
        } else {
            0
        },
        refill_period: q.refill_period_ms.map(duration),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(duration_ms("x", &d(1, 500_000)).unwrap(), 1001);
        assert!(duration_ms("x", &d(-1, 0)).is_err());
        assert!(duration_ms("x", &d(0, 1_000_000_000)).is_err());
        assert_eq!(duration(1500), d(1, 500_000_000));
        let t = prost_types::Timestamp {
            seconds: -5,
            nanos: 0,
        };
        assert!(timestamp_ms("t", &t).is_err());
    }
}
