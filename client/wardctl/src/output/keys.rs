//! Views of API keys: a key policy, a verification and a usage report, as text and as JSON.

use std::io::{self, Write};

use serde_json::{json, Value};

use ward_client::proto::{GetKeyUsageResponse, KeyPolicy, Quota, RateLimit, VerifyKeyResponse};

use super::{duration_text, last_used_text, result_name, timestamp_json, timestamp_text};
use crate::failure::Failure;

/// (field, text) lines of a key policy.
pub fn policy_lines(p: &KeyPolicy) -> Vec<(&'static str, String)> {
    let or_dash = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    vec![
        ("scopes", or_dash(p.scopes.clone())),
        ("cidrs", or_dash(p.allowed_cidrs.clone())),
        (
            "rate limit",
            p.rate_limit.as_ref().map_or_else(
                || "-".to_owned(),
                |r| {
                    format!(
                        "{}/{} burst {}",
                        r.requests,
                        duration_text(r.period.as_ref()),
                        r.burst
                    )
                },
            ),
        ),
        (
            "quota",
            p.quota.as_ref().map_or_else(
                || "-".to_owned(),
                |q| match &q.refill_period {
                    Some(period) => format!(
                        "{} (refilled to {} every {})",
                        q.limit,
                        q.refill,
                        duration_text(Some(period))
                    ),
                    None => q.limit.to_string(),
                },
            ),
        ),
        ("expires", timestamp_text(p.expire_time.as_ref())),
        (
            "rotation",
            p.rotation_period
                .as_ref()
                .map_or_else(|| "-".to_owned(), |d| duration_text(Some(d))),
        ),
        (
            "grace",
            p.default_grace_period
                .as_ref()
                .map_or_else(|| "server default".to_owned(), |d| duration_text(Some(d))),
        ),
    ]
}

/// JSON of a rate limit.
pub fn rate_limit_json(r: &RateLimit) -> Value {
    json!({
        "requests": r.requests,
        "period": duration_text(r.period.as_ref()),
        "burst": r.burst,
    })
}

/// JSON of a quota.
pub fn quota_json(q: &Quota) -> Value {
    json!({
        "limit": q.limit,
        "refill": q.refill,
        "refill_period": q.refill_period.as_ref().map(|d| duration_text(Some(d))),
    })
}

/// JSON of a key policy.
pub fn policy_json(p: &KeyPolicy) -> Value {
    json!({
        "scopes": p.scopes,
        "allowed_cidrs": p.allowed_cidrs,
        "rate_limit": p.rate_limit.as_ref().map(rate_limit_json),
        "quota": p.quota.as_ref().map(quota_json),
        "expire_time": timestamp_json(p.expire_time.as_ref()),
        "rotation_period": p.rotation_period.as_ref().map(|d| duration_text(Some(d))),
        "default_grace_period": p.default_grace_period.as_ref().map(|d| duration_text(Some(d))),
    })
}

/// JSON of a verification.
pub fn verify_json(v: &VerifyKeyResponse) -> Value {
    json!({
        "valid": v.valid,
        "result": result_name(v.result),
        "key_id": v.key_id,
        "name": v.name,
        "version": v.version,
        "owner": v.owner,
        "environment": v.environment,
        "scopes": v.scopes,
        "expire_time": timestamp_json(v.expire_time.as_ref()),
        "grace_until": timestamp_json(v.grace_until.as_ref()),
        "rate_limit": v.rate_limit.as_ref().map(|r| json!({
            "limit": r.limit,
            "remaining": r.remaining,
            "reset_time": timestamp_json(r.reset_time.as_ref()),
        })),
        "quota_remaining": v.quota_remaining,
        "retry_after": v.retry_after.as_ref().map(|d| duration_text(Some(d))),
    })
}

/// The human view of a verification.
pub fn print_verify(v: &VerifyKeyResponse) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(out, "{}", result_name(v.result))?;
    if !v.key_id.is_empty() {
        writeln!(out, "  key id       {}", v.key_id)?;
    }
    if !v.name.is_empty() {
        writeln!(out, "  key          {} version {}", v.name, v.version)?;
        writeln!(out, "  owner        {}", v.owner)?;
        writeln!(out, "  environment  {}", v.environment)?;
        if !v.scopes.is_empty() {
            writeln!(out, "  scopes       {}", v.scopes.join(", "))?;
        }
    }
    if let Some(t) = &v.expire_time {
        writeln!(out, "  expires      {t}")?;
    }
    if let Some(t) = &v.grace_until {
        writeln!(out, "  grace until  {t}")?;
    }
    if let Some(r) = &v.rate_limit {
        writeln!(
            out,
            "  rate limit   {}/{} left, full at {}",
            r.remaining,
            r.limit,
            timestamp_text(r.reset_time.as_ref())
        )?;
    }
    if let Some(q) = v.quota_remaining {
        writeln!(out, "  quota left   {q}")?;
    }
    if let Some(d) = &v.retry_after {
        writeln!(out, "  retry after  {}", duration_text(Some(d)))?;
    }
    Ok(())
}

/// JSON of a usage report.
pub fn usage_json(u: &GetKeyUsageResponse) -> Value {
    json!({
        "name": u.name,
        "last_used_time": timestamp_json(u.last_used_time.as_ref()),
        "quota_remaining": u.quota_remaining,
        "versions": u.versions.iter().map(|v| json!({
            "version": v.version,
            "total": v.total,
            "last_used_time": timestamp_json(v.last_used_time.as_ref()),
            "last_client_ip": v.last_client_ip,
            "results": v.results.iter().map(|r| (result_name(r.result), Value::from(r.count))).collect::<serde_json::Map<_, _>>(),
            "endpoints": v.endpoints.iter().map(|e| (e.endpoint.clone(), Value::from(e.count))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The human view of a usage report.
pub fn print_usage(u: &GetKeyUsageResponse) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{}: last used {}",
        u.name,
        last_used_text(u.last_used_time.as_ref())
    )?;
    if let Some(q) = u.quota_remaining {
        writeln!(out, "quota left {q}")?;
    }
    for v in &u.versions {
        writeln!(out)?;
        writeln!(
            out,
            "version {}: {} verifications, last used {} from {}",
            v.version,
            v.total,
            last_used_text(v.last_used_time.as_ref()),
            if v.last_client_ip.is_empty() {
                "-"
            } else {
                &v.last_client_ip
            }
        )?;
        for r in &v.results {
            writeln!(out, "  {:<20} {}", result_name(r.result), r.count)?;
        }
        for e in &v.endpoints {
            let tag = if e.endpoint.is_empty() {
                "(none)"
            } else {
                &e.endpoint
            };
            writeln!(out, "  endpoint {tag:<11} {}", e.count)?;
        }
    }
    Ok(())
}
