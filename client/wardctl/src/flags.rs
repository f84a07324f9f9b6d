//! Flag groups that several commands share, each defined once with its conversion to the wire:
//! metadata (`put`, `issue`), key policy (`issue`, `keys policy`), lifecycle and expiry (`put`,
//! `issue`, `rotate`) and compare-and-set (the lifecycle commands).

use std::time::Duration;

use clap::Args;

use ward_client::proto::{KeyPolicy, Quota, RateLimit};

use crate::input::{
    parse_expiry, parse_label, parse_period, parse_rate, parse_span, parse_time, to_duration,
};

/// Metadata flags shared by `put` and `issue`.
#[derive(Debug, Args)]
pub struct MetaArgs {
    /// Environment (default: the server's default, or the secret's own after creation)
    #[arg(long = "env", value_name = "ENV")]
    pub environment: Option<String>,
    /// Owner (team or identity; default: unchanged, or your identity on creation)
    #[arg(long, value_name = "OWNER")]
    pub owner: Option<String>,
    /// Label, repeatable; when any is given they replace the secret's labels
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Free-text description
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Idempotency key ([A-Za-z0-9._:-]{1,128}): a retry with the same id returns the first
    /// result, and lets wardctl retry the call safely after a network failure
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

/// The key policy flags: one set, for `issue` (the new key's policy) and `keys policy` (the
/// fields to change).
#[derive(Debug, Args, Default)]
pub struct KeyPolicyArgs {
    /// Scope the key grants, repeatable (`keys policy`: replaces the scopes)
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// Allowed client IP range (CIDR or address), repeatable; default any
    #[arg(long = "cidr", value_name = "CIDR")]
    pub cidrs: Vec<String>,
    /// Rate limit: REQUESTS/PERIOD, e.g. 100/s, 6000/1m, 10/500ms
    #[arg(long, value_name = "N/PERIOD", value_parser = parse_rate)]
    pub rate_limit: Option<(u32, Duration)>,
    /// Requests admitted back to back (default: the rate's N)
    #[arg(long, value_name = "N", requires = "rate_limit")]
    pub burst: Option<u32>,
    /// Usage quota (sum of verification costs)
    #[arg(long, value_name = "N")]
    pub quota: Option<u64>,
    /// Refill the quota every PERIOD (e.g. 1d, 30d, 1h)
    #[arg(long, value_name = "PERIOD", value_parser = parse_span, requires = "quota")]
    pub quota_period: Option<Duration>,
    /// Balance after each refill (default: the quota)
    #[arg(long, value_name = "N", requires = "quota_period")]
    pub quota_refill: Option<u64>,
    /// Expiry of the key (the secret's lifecycle expiry): an RFC 3339 time
    /// (2027-01-31T00:00:00Z) or a span from now (90d, 12h)
    #[arg(long, value_name = "TIME", value_parser = parse_expiry)]
    pub expires: Option<prost_types::Timestamp>,
}

impl KeyPolicyArgs {
    /// The policy these flags describe (fields not given are empty).
    pub fn policy(&self) -> KeyPolicy {
        KeyPolicy {
            scopes: self.scopes.clone(),
            allowed_cidrs: self.cidrs.clone(),
            rate_limit: self.rate_limit.map(|(requests, period)| RateLimit {
                requests,
                period: Some(to_duration(period)),
                burst: self.burst.unwrap_or(0),
            }),
            quota: self.quota.map(|limit| Quota {
                limit,
                refill: self.quota_refill.unwrap_or(0),
                refill_period: self.quota_period.map(to_duration),
            }),
            expire_time: self.expires,
            // The schedule is set by `issue`'s lifecycle flags and by `keys policy`'s own.
            rotation_period: None,
            default_grace_period: None,
        }
    }
}

/// Lifecycle flags of `put` and `issue`.
#[derive(Debug, Args)]
pub struct LifecycleArgs {
    /// Scheduled rotation period (e.g. 30d, 12h; 0 turns it off). API keys are rotated by
    /// Ward when due; STATIC secrets get a ROTATION_DUE watch event
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    pub rotation_period: Option<Duration>,
    /// How long a replaced PRIMARY stays ACTIVE when a rotation names no grace period
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    pub default_grace: Option<Duration>,
    #[command(flatten)]
    pub expiry: ExpiryArgs,
}

/// An expiry: absolute or relative to the server's clock.
#[derive(Debug, Args)]
pub struct ExpiryArgs {
    /// Expire at this RFC 3339 time (e.g. 2030-01-01T00:00:00Z)
    #[arg(long, value_name = "TIME", value_parser = parse_time, conflicts_with = "ttl")]
    pub expire_at: Option<prost_types::Timestamp>,
    /// Expire this long from now (server time; 0 removes an expiry)
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    pub ttl: Option<Duration>,
}

impl ExpiryArgs {
    /// The wire expiration, built with the request type's own oneof variants.
    pub fn pick<E>(
        &self,
        at: impl FnOnce(prost_types::Timestamp) -> E,
        ttl: impl FnOnce(prost_types::Duration) -> E,
    ) -> Option<E> {
        match (&self.expire_at, self.ttl) {
            (Some(t), _) => Some(at(*t)),
            (None, Some(d)) => Some(ttl(to_duration(d))),
            (None, None) => None,
        }
    }
}

/// Compare-and-set and idempotency flags of the lifecycle commands.
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Act only if the current PRIMARY version is N
    #[arg(long, value_name = "N")]
    pub expected_version: Option<u64>,
    /// Idempotency key ([A-Za-z0-9._:-]{1,128}); also lets wardctl retry safely
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}
