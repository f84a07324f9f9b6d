//! Views of the audit log: one record (a line, or JSON), a gap in the stream, and the result of
//! a verification.

use std::io::{self, Write};

use serde_json::{json, Value};

use ward_client::proto::{
    stream_audit_response, AuditGap, AuditProblem, AuditRecord, AuditRecordKind,
    VerifyAuditLogResponse,
};
use ward_client::{code_name, Code};

use super::{enum_name, hex, one_line, or_dash, timestamp_json, timestamp_text};
use crate::failure::Failure;

/// Prints one stream item: a record line on stdout, or a gap (stderr; a JSON line with --json).
pub fn print_audit_item(
    item: Option<stream_audit_response::Item>,
    json: bool,
) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match item {
        Some(stream_audit_response::Item::Record(r)) if json => {
            writeln!(out, "{}", audit_record_json(&r))?
        }
        Some(stream_audit_response::Item::Record(r)) => writeln!(out, "{}", audit_line(&r))?,
        Some(stream_audit_response::Item::Gap(g)) => print_gap(&mut out, &g, json)?,
        None => {}
    }
    // Followers read this live: one line at a time.
    out.flush()?;
    Ok(())
}

/// Reports records a stream skips: a JSON line on stdout with --json, else a warning on stderr.
pub fn print_gap(out: &mut impl Write, g: &AuditGap, json: bool) -> Result<(), Failure> {
    if json {
        writeln!(
            out,
            "{}",
            json!({"gap": {"from_seq": g.from_seq, "to_seq": g.to_seq, "pruned": g.pruned}})
        )?;
    } else {
        let why = if g.pruned {
            "were deleted by retention before they were read"
        } else {
            "are missing or unreadable (run `wardctl audit verify`)"
        };
        eprintln!("warning: records {}..{} {why}", g.from_seq, g.to_seq);
    }
    Ok(())
}

/// The one-line form of an audit record.
pub fn audit_line(r: &AuditRecord) -> String {
    let mut cols = vec![
        r.seq.to_string(),
        timestamp_text(r.time.as_ref()),
        or_dash(&r.identity),
        or_dash(&r.peer),
        r.method.clone(),
    ];
    match AuditRecordKind::try_from(r.kind) {
        Ok(AuditRecordKind::Checkpoint) => cols.push(format!("covers={}", r.checkpoint_covers_seq)),
        Ok(AuditRecordKind::Prune) => cols.push(format!("below={}", r.pruned_below_seq)),
        Ok(AuditRecordKind::Void) => cols.push(format!(
            "voids={} {}",
            r.voided_seq,
            code_name(Code::from_i32(r.code))
        )),
        Ok(AuditRecordKind::Alert) => {
            cols.push(format!("type={}", r.alert_type));
            cols.extend(
                r.targets
                    .iter()
                    .map(|t| format!("{}@{}", t.name, t.version)),
            );
        }
        _ => {
            let targets: Vec<String> = r
                .targets
                .iter()
                .map(|t| {
                    let mut s = format!("{}@{}", t.name, t.version);
                    if t.code != r.code {
                        s.push(':');
                        s.push_str(code_name(Code::from_i32(t.code)));
                    }
                    s
                })
                .collect();
            cols.push(or_dash(&targets.join(",")));
        }
    }
    cols.push(r.code_name.clone());
    if !r.request_id.is_empty() {
        cols.push(format!("request_id={}", r.request_id));
    }
    if !r.key_id.is_empty() {
        cols.push(format!("key_id={}", r.key_id));
    }
    one_line(&cols.join(" "))
}

/// The JSON form of an audit record.
pub fn audit_record_json(r: &AuditRecord) -> Value {
    let kind = enum_name(r.kind, "AUDIT_RECORD_KIND_", AuditRecordKind::as_str_name);
    let targets: Vec<Value> = r
        .targets
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "version": t.version,
                "code": code_name(Code::from_i32(t.code)),
            })
        })
        .collect();
    json!({
        "seq": r.seq,
        "time": timestamp_json(r.time.as_ref()),
        "kind": kind,
        "identity": r.identity,
        "peer": r.peer,
        "method": r.method,
        "targets": targets,
        "code": r.code_name,
        "request_id": r.request_id,
        "key_id": r.key_id,
        "prev_hash": hex(&r.prev_hash),
        "hash": hex(&r.hash),
        "checkpoint_covers_seq": r.checkpoint_covers_seq,
        "pruned_below_seq": r.pruned_below_seq,
        "voided_seq": r.voided_seq,
        "alert_type": r.alert_type,
    })
}

/// The JSON form of a verification.
pub fn verification_json(v: &VerifyAuditLogResponse) -> Value {
    json!({
        "ok": v.ok,
        "from_seq": v.from_seq,
        "to_seq": v.to_seq,
        "records_checked": v.records_checked,
        "checkpoints_verified": v.checkpoints_verified,
        "signed_through_seq": v.signed_through_seq,
        "oldest_seq": v.oldest_seq,
        "head_seq": v.head_seq,
        "first_broken": v.first_broken.as_ref().map(|b| json!({
            "seq": b.seq,
            "problem": problem_name(b.problem),
            "reason": b.reason,
        })),
    })
}

/// Prints the human form of a verification.
pub fn print_verification(v: &VerifyAuditLogResponse) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match &v.first_broken {
        None => writeln!(
            out,
            "ok: records {}..{} ({} chained, {} checkpoints verified, signed through {}); oldest {}, head {}",
            v.from_seq,
            v.to_seq,
            v.records_checked,
            v.checkpoints_verified,
            v.signed_through_seq,
            v.oldest_seq,
            v.head_seq
        )?,
        Some(b) => writeln!(
            out,
            "BROKEN at record {} ({}): {}",
            b.seq,
            problem_name(b.problem),
            one_line(&b.reason)
        )?,
    }
    Ok(())
}

/// An audit problem without its `AUDIT_PROBLEM_` prefix, e.g. `ALTERED`.
fn problem_name(p: i32) -> String {
    enum_name(p, "AUDIT_PROBLEM_", AuditProblem::as_str_name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ward_client::proto::AuditTarget;

    #[test]
    fn audit_lines() {
        let r = AuditRecord {
            seq: 12,
            identity: "admin".into(),
            peer: "127.0.0.1:5000".into(),
            method: "BatchFetchSecrets".into(),
            kind: AuditRecordKind::Call as i32,
            targets: vec![
                AuditTarget {
                    name: "db".into(),
                    version: 3,
                    code: 0,
                },
                AuditTarget {
                    name: "gone".into(),
                    version: 0,
                    code: 5,
                },
            ],
            code: 0,
            code_name: "OK".into(),
            request_id: "r1".into(),
            ..Default::default()
        };
        assert_eq!(
            audit_line(&r),
            "12 - admin 127.0.0.1:5000 BatchFetchSecrets db@3,gone@0:NOT_FOUND OK request_id=r1"
        );
        let j = audit_record_json(&r);
        assert_eq!(j["kind"], "CALL");
        assert_eq!(j["targets"][1]["code"], "NOT_FOUND");
        assert_eq!(problem_name(99), "UNKNOWN(99)");
    }
}
