//! Views of secrets: a fetched value, metadata (`describe`, `ls`), batch results and watch
//! events, as text and as JSON. A value is shown only where the command fetched it.

use std::io::{self, Write};

use base64::Engine as _;
use serde_json::{json, Value};

use ward_client::proto::{
    batch_fetch_result, BatchFetchResult, FetchSecretResponse, KeyPolicy, SecretKind,
    SecretMetadata, WatchEvent,
};
use ward_client::{code_name, Code};

use super::keys::{policy_lines, quota_json, rate_limit_json};
use super::{
    event_name, kind_name, last_used_text, one_line, or_dash, print_json, state_name,
    timestamp_json, timestamp_text, value_text, write_table,
};
use crate::failure::Failure;

/// JSON of a fetched secret; `value` is a string if UTF-8, else `value_base64`.
pub fn fetched_json(s: &FetchSecretResponse, value: &[u8]) -> Value {
    let mut obj = json!({
        "name": s.name,
        "version": s.version,
        "state": state_name(s.state),
        "checksum": s.checksum,
        "kind": kind_name(s.kind),
        "environment": s.environment,
        "create_time": timestamp_json(s.create_time.as_ref()),
    });
    let (key, text) = match std::str::from_utf8(value) {
        Ok(text) => ("value", text.to_owned()),
        Err(_) => (
            "value_base64",
            base64::engine::general_purpose::STANDARD.encode(value),
        ),
    };
    if let Value::Object(map) = &mut obj {
        map.insert(key.to_owned(), Value::String(text));
    }
    obj
}

/// JSON of a secret's metadata, versions included (ListSecrets leaves them empty).
pub fn metadata_json(m: &SecretMetadata) -> Value {
    let labels: serde_json::Map<String, Value> = m
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let versions: Vec<Value> = m
        .versions
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "state": state_name(v.state),
                "create_time": timestamp_json(v.create_time.as_ref()),
                "fingerprint": v.fingerprint,
                "keyring_term": v.keyring_term,
                "key_id": v.key_id,
                "grace_until": timestamp_json(v.grace_until.as_ref()),
                "expire_time": timestamp_json(v.expire_time.as_ref()),
                "state_reason": v.state_reason,
                "state_change_time": timestamp_json(v.state_change_time.as_ref()),
                "last_read_time": timestamp_json(v.last_read_time.as_ref()),
            })
        })
        .collect();
    json!({
        "name": m.name,
        "kind": kind_name(m.kind),
        "environment": m.environment,
        "owner": m.owner,
        "labels": labels,
        "description": m.description,
        "scopes": m.scopes,
        "create_time": timestamp_json(m.create_time.as_ref()),
        "update_time": timestamp_json(m.update_time.as_ref()),
        "primary_version": m.primary_version,
        "versions": versions,
        "created_by": m.created_by,
        "allowed_cidrs": m.allowed_cidrs,
        "rate_limit": m.rate_limit.as_ref().map(rate_limit_json),
        "quota": m.quota.as_ref().map(quota_json),
        "last_used_time": timestamp_json(m.last_used_time.as_ref()),
        "rotation_period_seconds": m.rotation_period.as_ref().map(|d| d.seconds),
        "next_rotation_time": timestamp_json(m.next_rotation_time.as_ref()),
        "rotation_due": m.rotation_due,
        "default_grace_period_seconds": m.default_grace_period.as_ref().map(|d| d.seconds),
        "expire_time": timestamp_json(m.expire_time.as_ref()),
        "revoked": m.revoked,
        "revoke_reason": m.revoke_reason,
        "revoke_time": timestamp_json(m.revoke_time.as_ref()),
        "last_read_time": timestamp_json(m.last_read_time.as_ref()),
    })
}

/// JSON array of several secrets' metadata.
pub fn metadata_list_json(secrets: &[SecretMetadata]) -> Value {
    Value::Array(secrets.iter().map(metadata_json).collect())
}

/// Prints batch results, as tab-separated lines or a JSON array; returns how many failed.
pub fn print_batch(results: &[BatchFetchResult], json: bool) -> Result<usize, Failure> {
    let mut failed = 0;
    let mut rows = Vec::with_capacity(results.len());
    let mut out = io::stdout().lock();
    for r in results {
        let label = format!("{}@{}", r.name, r.requested_version);
        match &r.result {
            Some(batch_fetch_result::Result::Secret(s)) if json => rows.push(json!({
                "name": r.name,
                "requested_version": r.requested_version,
                "secret": fetched_json(s, &s.value),
            })),
            Some(batch_fetch_result::Result::Secret(s)) => writeln!(
                out,
                "{label}\tok\t{}\t{}\t{}",
                s.version,
                state_name(s.state),
                value_text(&s.value)
            )?,
            other => {
                failed += 1;
                let (code, message) = match other {
                    Some(batch_fetch_result::Result::Error(e)) => (e.code, e.message.as_str()),
                    _ => (Code::Internal as i32, "server sent no result for this item"),
                };
                let code = code_name(Code::from_i32(code));
                if json {
                    rows.push(json!({
                        "name": r.name,
                        "requested_version": r.requested_version,
                        "error": {"code": code, "message": message},
                    }));
                } else {
                    writeln!(out, "{label}\terror\t{code}\t{}", one_line(message))?;
                }
            }
        }
    }
    drop(out);
    if json {
        print_json(&Value::Array(rows))?;
    }
    Ok(failed)
}

/// Prints the human view of `describe`: a field list, then a table of versions.
pub fn print_describe(m: &SecretMetadata) -> Result<(), Failure> {
    let mut labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let mut fields = vec![
        ("name", m.name.clone()),
        ("kind", kind_name(m.kind)),
        ("environment", or_dash(&m.environment)),
        ("owner", or_dash(&m.owner)),
        ("created by", or_dash(&m.created_by)),
        ("description", or_dash(&one_line(&m.description))),
        ("labels", or_dash(&labels.join(", "))),
    ];
    if !m.scopes.is_empty() {
        fields.push(("scopes", m.scopes.join(", ")));
    }
    if m.kind == SecretKind::ApiKey as i32 {
        let policy = KeyPolicy {
            scopes: Vec::new(),
            allowed_cidrs: m.allowed_cidrs.clone(),
            rate_limit: m.rate_limit,
            quota: m.quota,
            expire_time: m.expire_time,
            rotation_period: None,
            default_grace_period: None,
        };
        // Scopes are shown above and the schedule below, with the other secrets' lifecycle.
        fields.extend(policy_lines(&policy).into_iter().skip(1).take(4));
        fields.push(("last used", last_used_text(m.last_used_time.as_ref())));
    }
    fields.push(("created", timestamp_text(m.create_time.as_ref())));
    fields.push(("updated", timestamp_text(m.update_time.as_ref())));
    fields.push(("last read", timestamp_text(m.last_read_time.as_ref())));
    fields.push(("primary", m.primary_version.to_string()));
    if let Some(d) = &m.rotation_period {
        let due = if m.rotation_due { " (DUE)" } else { "" };
        fields.push((
            "rotation",
            format!(
                "every {}s, next {}{due}",
                d.seconds,
                timestamp_text(m.next_rotation_time.as_ref())
            ),
        ));
    }
    if let Some(d) = &m.default_grace_period {
        fields.push(("grace", format!("{}s", d.seconds)));
    }
    if m.expire_time.is_some() {
        fields.push(("expires", timestamp_text(m.expire_time.as_ref())));
    }
    if m.revoked {
        fields.push((
            "revoked",
            format!(
                "{} ({})",
                one_line(&m.revoke_reason),
                timestamp_text(m.revoke_time.as_ref())
            ),
        ));
    }

    let mut out = io::stdout().lock();
    for (k, v) in &fields {
        writeln!(out, "{k:<12} {v}")?;
    }
    writeln!(out)?;
    let mut rows = vec![[
        "VERSION".to_owned(),
        "STATE".to_owned(),
        "CREATED".to_owned(),
        "FINGERPRINT".to_owned(),
        "TERM".to_owned(),
        "KEY ID".to_owned(),
        "NOTE".to_owned(),
        "LAST READ".to_owned(),
    ]];
    rows.extend(m.versions.iter().map(|v| {
        let mut note = Vec::new();
        if let Some(t) = &v.grace_until {
            note.push(format!("until {t}"));
        }
        if let Some(t) = &v.expire_time {
            note.push(format!("expires {t}"));
        }
        if !v.state_reason.is_empty() {
            note.push(one_line(&v.state_reason));
        }
        [
            v.version.to_string(),
            state_name(v.state),
            timestamp_text(v.create_time.as_ref()),
            // The first 64 bits are plenty to tell values apart at a glance; --json has all.
            v.fingerprint.chars().take(16).collect(),
            v.keyring_term.to_string(),
            or_dash(&v.key_id),
            note.join("; "),
            timestamp_text(v.last_read_time.as_ref()),
        ]
    }));
    write_table(&mut out, &rows)
}

/// Prints the human view of `ls`: one aligned line per secret.
pub fn print_ls(secrets: &[SecretMetadata]) -> Result<(), Failure> {
    let rows: Vec<[String; 5]> = secrets
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                kind_name(m.kind),
                m.environment.clone(),
                m.primary_version.to_string(),
                m.owner.clone(),
            ]
        })
        .collect();
    write_table(&mut io::stdout().lock(), &rows)
}

/// Prints one watch event as a line (tab-separated, or compact JSON), flushed at once.
pub fn print_event(e: &WatchEvent, json: bool) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    if json {
        let obj = json!({
            "type": event_name(e.r#type),
            "name": e.name,
            "version": e.version,
            "state": state_name(e.state),
            "reason": e.reason,
            "time": timestamp_json(e.time.as_ref()),
            "secret": e.secret.as_ref().map(metadata_json),
        });
        serde_json::to_writer(&mut out, &obj).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}",
            event_name(e.r#type),
            e.name,
            e.version,
            state_name(e.state),
            one_line(&e.reason)
        )?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ward_client::proto::VersionState;

    #[test]
    fn fetched_value_as_text_or_base64() {
        let s = FetchSecretResponse {
            name: "x".into(),
            version: 1,
            state: VersionState::Primary as i32,
            ..Default::default()
        };
        let j = fetched_json(&s, b"pw");
        assert_eq!(j["value"], "pw");
        assert_eq!(j["state"], "PRIMARY");
        assert_eq!(j["create_time"], Value::Null);
        let j = fetched_json(&s, &[0xff]);
        assert_eq!(j["value_base64"], "/w==");
        assert!(j.get("value").is_none());
    }
}
