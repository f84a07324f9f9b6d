//! Every conversion between the wire types (`ward.v1`) and the domain's. The services call
//! these and decide nothing here; durations and times are checked where the lifecycle's are,
//! in model/input.rs.

use crate::alerts::webhook::Attempt;
use crate::alerts::WatchItem;
use crate::audit::{code_name, AuditRecord, Event, Problem, StreamItem, UsageFact, Verification};
use crate::changes::watch::{EventKind, WatchEvent};
use crate::clock::{to_timestamp, Millis};
use crate::error::Result;
use crate::keys::{LeakReport, Verdict, VerifyResult};
use crate::model::input::{self, LifecycleInput, RawDuration, RawExpiration};
use crate::model::keypolicy::{KeyPolicy, KeyPolicyInput};
use crate::model::{Kind, SecretLife, SecretRecord, VersionState};
use crate::vault::Fetched;
use ward::v1 as pb;

/// A wire duration as the lifecycle layer receives it (checked there, not here).
pub fn raw_duration(d: prost_types::Duration) -> RawDuration {
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

/// The wire form of a watch event.
pub fn watch_event(e: WatchEvent) -> pb::WatchEvent {
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

/// The wire form of a fetched version.
pub fn fetched(f: Fetched) -> pb::FetchSecretResponse {
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

/// The wire form of a kind.
pub fn kind(k: Kind) -> pb::SecretKind {
    match k {
        Kind::Static => pb::SecretKind::Static,
        Kind::ApiKey => pb::SecretKind::ApiKey,
    }
}

/// The wire form of a version state.
pub fn state(s: VersionState) -> pb::VersionState {
    match s {
        VersionState::Primary => pb::VersionState::Primary,
        VersionState::Active => pb::VersionState::Active,
        VersionState::Inactive => pb::VersionState::Inactive,
        VersionState::Revoked => pb::VersionState::Revoked,
        VersionState::Destroyed => pb::VersionState::Destroyed,
    }
}

/// The wire form of a secret's metadata (with its versions when `with_versions`).
pub fn metadata(
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
        rotation_period: s.life.rotation_period_ms.map(duration_out),
        next_rotation_time: s.life.next_rotation_ms.map(to_timestamp),
        rotation_due: s.life.rotation_due_ms.is_some(),
        default_grace_period: s.life.grace_ms.map(duration_out),
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
        retry_after: v.retry_after_ms.map(duration_out),
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
pub fn duration_out(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
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
                .map(|d| input::period_ms("rate_limit.period", raw_duration(*d)))
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
                .map(|d| input::period_ms("quota.refill_period", raw_duration(*d)))
                .transpose()?;
            Ok((q.limit, q.refill, period))
        })
        .transpose()?;
    let expire_ms = expire_time
        .as_ref()
        .map(|t| input::time_ms("expire_time", t.seconds, t.nanos))
        .transpose()?;
    Ok(KeyPolicyInput {
        allowed_cidrs,
        rate_limit,
        quota,
        expire_ms,
    })
}

/// The wire form of a key policy; its expiry and schedule are the secret's lifecycle settings.
pub fn policy_out(scopes: Vec<String>, p: &KeyPolicy, life: &SecretLife) -> pb::KeyPolicy {
    pb::KeyPolicy {
        scopes,
        allowed_cidrs: p.allowed_cidrs.iter().map(ToString::to_string).collect(),
        rate_limit: p.rate_limit.map(rate_limit_out),
        quota: p.quota.map(quota_out),
        expire_time: life.expire_ms.map(to_timestamp),
        rotation_period: life.rotation_period_ms.map(duration_out),
        default_grace_period: life.grace_ms.map(duration_out),
    }
}

/// The schedule fields of a wire key policy, as received.
pub fn schedule_input(p: &pb::KeyPolicy) -> LifecycleInput {
    LifecycleInput {
        rotation_period: p.rotation_period.map(raw_duration),
        default_grace_period: p.default_grace_period.map(raw_duration),
        expiration: None,
    }
}

/// The wire form of a rate limit.
pub fn rate_limit_out(r: crate::model::keypolicy::RateLimit) -> pb::RateLimit {
    pb::RateLimit {
        requests: r.requests,
        period: Some(duration_out(r.period_ms)),
        burst: r.burst,
    }
}

/// The wire form of a quota.
pub fn quota_out(q: crate::model::keypolicy::Quota) -> pb::Quota {
    pb::Quota {
        limit: q.limit,
        refill: if q.refill_period_ms.is_some() {
            q.refill
        } else {
            0
        },
        refill_period: q.refill_period_ms.map(duration_out),
    }
}

/// The wire form of one StreamAudit item.
pub fn audit_item(item: StreamItem) -> pb::StreamAuditResponse {
    let item = match item {
        StreamItem::Record(r, hash) => {
            pb::stream_audit_response::Item::Record(audit_record(*r, hash))
        }
        StreamItem::Gap { from, to, pruned } => {
            pb::stream_audit_response::Item::Gap(pb::AuditGap {
                from_seq: from,
                to_seq: to,
                pruned,
            })
        }
    };
    pb::StreamAuditResponse { item: Some(item) }
}

/// The wire form of a record.
pub fn audit_record(r: AuditRecord, hash: [u8; 32]) -> pb::AuditRecord {
    let (kind, covers, below, voided) = match &r.event {
        Event::Call => (pb::AuditRecordKind::Call, 0, 0, 0),
        Event::Checkpoint(c) => (pb::AuditRecordKind::Checkpoint, c.covers_seq, 0, 0),
        Event::Prune { below } => (pb::AuditRecordKind::Prune, 0, *below, 0),
        // A change's record is a call record to readers; a void record says if it was undone.
        Event::Change => (pb::AuditRecordKind::Call, 0, 0, 0),
        Event::Void { seq } => (pb::AuditRecordKind::Void, 0, 0, *seq),
        Event::Alert(_) => (pb::AuditRecordKind::Alert, 0, 0, 0),
    };
    let alert_type = match &r.event {
        Event::Alert(a) => a.kind.clone(),
        _ => String::new(),
    };
    let targets = r
        .targets
        .iter()
        .enumerate()
        .map(|(i, (name, version))| pb::AuditTarget {
            name: name.clone(),
            version: *version,
            code: r.target_code(i),
        })
        .collect();
    pb::AuditRecord {
        seq: r.seq,
        time: Some(to_timestamp(r.time_ms)),
        kind: kind as i32,
        identity: r.identity,
        peer: r.peer,
        method: r.method,
        targets,
        code: r.code,
        code_name: code_name(r.code).to_owned(),
        request_id: r.request_id,
        key_id: r.key_id,
        prev_hash: r.prev_hash.to_vec(),
        hash: hash.to_vec(),
        checkpoint_covers_seq: covers,
        pruned_below_seq: below,
        voided_seq: voided,
        alert_type,
    }
}

/// The wire form of a WatchAlerts item.
pub fn alert_item(item: WatchItem) -> pb::WatchAlertsResponse {
    let item = match item {
        WatchItem::Alert(r) => {
            let (kind, id, data_json) = match r.event {
                Event::Alert(a) => (a.kind, a.id, a.data),
                _ => Default::default(),
            };
            let (name, version) = r.targets.into_iter().next().unwrap_or_default();
            pb::watch_alerts_response::Item::Alert(pb::Alert {
                seq: r.seq,
                time: Some(to_timestamp(r.time_ms)),
                r#type: kind,
                id,
                name,
                version,
                key_id: r.key_id,
                data_json,
            })
        }
        WatchItem::Gap { from, to, pruned } => pb::watch_alerts_response::Item::Gap(pb::AuditGap {
            from_seq: from,
            to_seq: to,
            pruned,
        }),
    };
    pb::WatchAlertsResponse { item: Some(item) }
}

/// The wire form of ReportLeak's answer.
pub fn leak_report(r: LeakReport) -> pb::ReportLeakResponse {
    pb::ReportLeakResponse {
        found: r.found,
        name: r.name,
        version: r.version,
        key_id: r.key_id,
        quarantined: r.quarantined,
        allowed_cidrs: r.allowed_cidrs,
    }
}

/// The wire form of TestWebhook's answer.
pub fn test_webhook(id: String, attempt: Attempt) -> pb::TestWebhookResponse {
    let (http_status, delivered, error) = match attempt {
        Attempt::Delivered(s) => (s, true, String::new()),
        Attempt::Refused(s) => (s, false, format!("the endpoint answered HTTP {s}")),
        Attempt::Failed(e) => (0, false, e),
    };
    pb::TestWebhookResponse {
        http_status: u32::from(http_status),
        delivered,
        id,
        error,
    }
}

/// The wire form of a verification of the audit log.
pub fn verification(v: Verification) -> pb::VerifyAuditLogResponse {
    pb::VerifyAuditLogResponse {
        ok: v.ok(),
        from_seq: v.from,
        to_seq: v.to,
        records_checked: v.records_checked,
        checkpoints_verified: v.checkpoints_verified,
        signed_through_seq: v.signed_through,
        oldest_seq: v.oldest,
        head_seq: v.head,
        first_broken: v.first_broken.map(|b| pb::BrokenRecord {
            seq: b.seq,
            problem: problem(b.problem) as i32,
            reason: b.reason,
        }),
    }
}

/// The wire form of one problem found in the audit log.
pub fn problem(p: Problem) -> pb::AuditProblem {
    match p {
        Problem::Undecodable => pb::AuditProblem::Undecodable,
        Problem::Altered => pb::AuditProblem::Altered,
        Problem::Misplaced => pb::AuditProblem::Misplaced,
        Problem::Missing => pb::AuditProblem::Missing,
        Problem::Unlinked => pb::AuditProblem::Unlinked,
        Problem::CheckpointForged => pb::AuditProblem::CheckpointForged,
        Problem::CheckpointMismatch => pb::AuditProblem::CheckpointMismatch,
        Problem::CheckpointOrder => pb::AuditProblem::CheckpointOrder,
        Problem::Unsigned => pb::AuditProblem::Unsigned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_both_ways() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(duration_out(1500), d(1, 500_000_000));
        assert_eq!(
            raw_duration(d(1, 2)),
            RawDuration {
                seconds: 1,
                nanos: 2
            }
        );
    }
}
