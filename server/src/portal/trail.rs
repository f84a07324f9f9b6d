//! A key's audit trail, read from the hash-chained log through the same access StreamAudit
//! uses (the caller's `audit` grant decides what it sees, and the read is itself audited), and
//! a button that verifies the chain (VerifyAuditLog: needs `audit` on every secret).

use super::view::{error_response, layout};
use super::web::{self, Body, Form};
use super::{Caller, Portal};
use crate::audit::{code_name, StreamItem, StreamQuery, Verification};
use crate::clock::rfc3339;
use crate::error::Result;
use http::{Response, StatusCode};
use maud::{html, Markup};
use std::collections::VecDeque;

/// Records scanned back from the head for one trail.
const SCAN_LAST: u32 = 20_000;
/// Records shown (the newest).
const SHOWN: usize = 200;

/// GET /audit?name=…
pub async fn page(portal: &Portal, caller: &Caller, name: &str) -> Result<Markup> {
    trail(portal, caller, name, None).await
}

/// POST /verify-chain: the trail page with the chain's verdict.
pub async fn verify(portal: &Portal, caller: &Caller, form: &Form) -> Response<Body> {
    let checked = portal.audit().verify(&caller.peer, 0, 0).await;
    let verdict = match checked {
        Ok(v) => Ok(v),
        Err(e) => Err(crate::grpc::status::to_status(e).message().to_owned()),
    };
    match trail(portal, caller, form.get("name"), Some(verdict)).await {
        Ok(p) => web::html(StatusCode::OK, p, None),
        Err(e) => error_response(e),
    }
}

async fn trail(
    portal: &Portal,
    caller: &Caller,
    name: &str,
    verdict: Option<std::result::Result<Verification, String>>,
) -> Result<Markup> {
    // The key must be one the caller may see at all.
    let s = portal.vault().describe(&caller.peer, name).await?;
    let mut rows = VecDeque::new();
    let opened = portal
        .audit()
        .stream(
            &caller.peer,
            StreamQuery {
                from_seq: 0,
                last: SCAN_LAST,
                follow: false,
                identity: String::new(),
                name_prefix: s.name.clone(),
                method: String::new(),
                outcome: String::new(),
            },
        )
        .await;
    let denied = match opened {
        Ok(mut reader) => {
            while let Some(item) = reader.next().await? {
                if let StreamItem::Record(r, hash) = item {
                    if r.targets.iter().any(|(n, _)| *n == s.name) {
                        rows.push_back((r, hash));
                        if rows.len() > SHOWN {
                            rows.pop_front();
                        }
                    }
                }
            }
            None
        }
        Err(e) => Some(crate::grpc::status::to_status(e).message().to_owned()),
    };
    Ok(layout(
        caller,
        &format!("Audit trail of {}", s.name),
        html! {
            p { a href=(web::link("/key", &[("name", &s.name)])) { "Back to the key" } }
            @if let Some(why) = denied {
                p.notice #no-audit { "You may not read this key's audit trail: " (why) }
            } @else {
                p { "The newest " (rows.len()) " records that name this key (of the last "
                    (SCAN_LAST) " in the log). Each record's hash covers the one before it." }
                table #trail {
                    thead { tr { th { "Seq" } th { "Time" } th { "Identity" } th { "Peer" } th { "Call" }
                        th { "Version" } th { "Result" } th { "Key id" } th { "Hash" } } }
                    tbody {
                        @for (r, hash) in rows.iter().rev() {
                            tr data-method=(r.method) {
                                td { (r.seq) }
                                td { (rfc3339(r.time_ms)) }
                                td { code { (r.identity) } }
                                td { (r.peer) }
                                td { (r.method) }
                                td { (versions_of(r, &s.name)) }
                                td { (code_name(r.code)) }
                                td { code { (r.key_id) } }
                                td { code title=(hex::encode(hash)) { (hex::encode(&hash[..8])) "…" } }
                            }
                        }
                    }
                }
            }
            form method="post" action="/verify-chain" #verify-chain {
                input type="hidden" name="csrf" value=(caller.csrf);
                input type="hidden" name="name" value=(s.name);
                button type="submit" hx-post="/verify-chain" hx-target="#chain" hx-select="#chain" hx-swap="outerHTML" {
                    "Verify the whole chain" }
            }
            div #chain {
                @match &verdict {
                    Some(Ok(v)) if v.ok() => p.preview #chain-ok { "Chain intact: " (v.records_checked)
                        " records checked (" (v.from) "–" (v.to) "), " (v.checkpoints_verified)
                        " HSM checkpoints verified, signed through " (v.signed_through) "." }
                    Some(Ok(v)) => p.error #chain-broken { "Chain BROKEN at record "
                        (v.first_broken.as_ref().map_or(0, |b| b.seq)) ": "
                        (v.first_broken.as_ref().map_or("", |b| b.reason.as_str())) }
                    Some(Err(why)) => p.error #chain-denied { (why) }
                    None => {}
                }
            }
        },
    ))
}

/// The versions of `name` a record names, e.g. `2` or `1, 2`.
fn versions_of(r: &crate::audit::AuditRecord, name: &str) -> String {
    r.targets
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
