//! The portal's state changes: each POST form becomes the input of one domain call — IssueKey,
//! RotateSecret, RevokeSecret, UpdateKeyPolicy — made as the caller, under the same policy and
//! audited the same way as over gRPC. Errors are turned into a status and message by
//! grpc/status.rs (the one mapping), then into an HTTP status here. Nothing is decided here
//! except the portal's own rule: a key created here must expire within `max_key_lifetime`.

use super::pages::key_page;
use super::web::{self, Form};
use super::{Caller, Portal};
use crate::error::{Error, Result};
use crate::model::input::RawDuration;
use crate::model::keypolicy::{parse_cidrs, KeyPolicyInput};
use crate::model::{check_scopes, KeyPolicy};
use crate::vault::usage::WINDOW_MS;
use crate::vault::{IssueInput, PolicyUpdate, RevokeInput, RotateInput};
use maud::Markup;
use zeroize::Zeroizing;

const DAY_MS: u64 = 86_400_000;

/// A whole number from a form field (empty: `None`).
fn number<T: std::str::FromStr>(form: &Form, field: &str) -> Result<Option<T>> {
    match form.get(field) {
        "" => Ok(None),
        v => v
            .parse()
            .map(Some)
            .map_err(|_| Error::invalid(format!("{field} must be a whole number"))),
    }
}

/// The usage-policy fields of the create and edit forms, and the expiry in days from now
/// (required, within `max_key_lifetime`).
pub fn policy_from(portal: &Portal, form: &Form) -> Result<KeyPolicyInput> {
    let rate_limit = match number::<u32>(form, "rate")? {
        None => None,
        Some(n) => {
            let period = match form.get("rate_period") {
                "s" | "" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                _ => return Err(Error::invalid("rate_period must be s, m or h")),
            };
            Some((n, period, 0))
        }
    };
    let quota = number::<u64>(form, "quota")?.map(|q| (q, 0, None));
    let days: u64 = number(form, "expires_days")?
        .ok_or_else(|| Error::invalid("an expiry is required: expires_days"))?;
    let max = portal.settings().max_key_lifetime_ms;
    if days == 0 || days.saturating_mul(DAY_MS) > max {
        return Err(Error::invalid(format!(
            "expires_days must be 1 to {} (the portal's max_key_lifetime)",
            max / DAY_MS
        )));
    }
    Ok(KeyPolicyInput {
        allowed_cidrs: form.list("cidrs"),
        rate_limit,
        quota,
        expire_ms: Some(portal.vault().now().saturating_add(days * DAY_MS)),
    })
}

/// Create: IssueKey, then the new key waits for `/reveal`.
pub async fn create(portal: &Portal, caller: &Caller, form: &Form) -> Result<String> {
    let policy = policy_from(portal, form)?;
    let input = IssueInput {
        name: form.get("name").to_owned(),
        environment: form.get("environment").to_owned(),
        owner: String::new(),
        scopes: form.list("scopes"),
        labels: Default::default(),
        description: form.get("description").to_owned(),
        request_id: String::new(),
        lifecycle: Default::default(),
    };
    let issued = portal
        .vault()
        .issue_with_policy(&caller.peer, input, policy)
        .await?;
    portal.reveals().put(
        &caller.session,
        &caller.peer,
        &issued.written.name,
        issued.written.version,
        issued.key,
        "created",
    );
    Ok("/reveal".into())
}

/// Roll: RotateSecret with the chosen grace, then the new key waits for `/reveal`.
pub async fn roll(portal: &Portal, caller: &Caller, form: &Form) -> Result<String> {
    let grace_s: i64 = match form.get("grace") {
        "custom" => {
            let hours: i64 = number(form, "grace_hours")?
                .ok_or_else(|| Error::invalid("give the custom grace in hours"))?;
            hours.saturating_mul(3600)
        }
        other => other
            .parse()
            .map_err(|_| Error::invalid("choose a grace period"))?,
    };
    let input = RotateInput {
        name: form.get("name").to_owned(),
        value: Zeroizing::new(Vec::new()),
        grace_period: Some(RawDuration {
            seconds: grace_s,
            nanos: 0,
        }),
        expiration: None,
        // The version the page showed as current: a second submit of the same form (or a
        // roll by someone else meanwhile) is refused, not a second roll.
        expected_version: number(form, "expected_version")?,
        request_id: String::new(),
    };
    let rotated = portal.vault().rotate(&caller.peer, input).await?;
    let Some(key) = rotated.key else {
        return Err(Error::FailedPrecondition(
            "only API keys can be rolled here".into(),
        ));
    };
    portal.reveals().put(
        &caller.session,
        &caller.peer,
        &rotated.written.name,
        rotated.written.version,
        key,
        "rolled",
    );
    Ok("/reveal".into())
}

/// Revoke one old version or the whole key (a reason is required).
pub async fn revoke(portal: &Portal, caller: &Caller, form: &Form) -> Result<String> {
    let name = form.get("name").to_owned();
    let reason = form.get("reason");
    if reason.is_empty() {
        return Err(Error::invalid("a reason is required to revoke"));
    }
    let all_versions = form.get("version") == "all";
    let version = if all_versions {
        0
    } else {
        number(form, "version")?.ok_or_else(|| Error::invalid("choose a version"))?
    };
    portal
        .vault()
        .revoke(
            &caller.peer,
            RevokeInput {
                name: name.clone(),
                version,
                all_versions,
                reason: reason.to_owned(),
                successor_version: 0,
                expected_version: None,
                request_id: String::new(),
            },
        )
        .await?;
    Ok(web::link("/key", &[("name", &name)]))
}

/// Save restrictions: UpdateKeyPolicy of every usage field.
pub async fn update_policy(portal: &Portal, caller: &Caller, form: &Form) -> Result<String> {
    let name = form.get("name").to_owned();
    let input = PolicyUpdate {
        name: name.clone(),
        scopes: form.list("scopes"),
        policy: policy_from(portal, form)?,
        // Every usage field, as the form shows them all.
        mask: Vec::new(),
        ..Default::default()
    };
    portal
        .vault()
        .update_key_policy(&caller.peer, input)
        .await?;
    Ok(web::link("/key", &[("name", &name)]))
}

/// The edit form's Preview: how many of the last 24 h's successful verifications the new
/// scopes and CIDRs would have refused, shown on the key's page (htmx swaps in just that part).
pub async fn edit_preview(portal: &Portal, caller: &Caller, form: &Form) -> Result<Markup> {
    let name = form.get("name");
    let scopes = form.list("scopes");
    check_scopes(&scopes)?;
    policy_from(portal, form)?;
    let policy = KeyPolicy {
        allowed_cidrs: parse_cidrs(&form.list("cidrs"))?,
        ..Default::default()
    };
    // Authorization first: the page read decides whether the caller may see this key.
    let s = portal.vault().describe(&caller.peer, name).await?;
    portal.keys().usage(&caller.peer, &s.name, 0).await?;
    let since = portal.vault().now().saturating_sub(WINDOW_MS);
    let (refused, of) = portal
        .vault()
        .usage()
        .activity(&s.name)
        .values()
        .map(|a| a.would_refuse(since, &policy, &scopes))
        .fold((0, 0), |(r, o), (r2, o2)| (r + r2, o + o2));
    key_page(portal, caller, &s.name, Some((refused, of))).await
}
