//! The portal's state changes: each POST form becomes the input of one domain call — IssueKey,
//! RotateSecret, RevokeSecret, UpdateKeyPolicy — made as the caller, under the same policy and
//! audited the same way as over gRPC. Errors are turned into a status and message by
//! grpc/status.rs (the one mapping), then into an HTTP status here. Nothing is decided here
//! except the portal's own rule: a key created here must expire within `max_key_lifetime`.

use super::web::{self, Body, Form};
use super::{pages, Caller, Portal};
use crate::error::{Error, Result};
use crate::grpc::status::to_status;
use crate::model::input::RawDuration;
use crate::model::keypolicy::KeyPolicyInput;
use crate::vault::{IssueInput, PolicyUpdate, RevokeInput, RotateInput};
use http::{Response, StatusCode};
use zeroize::Zeroizing;

const DAY_MS: u64 = 86_400_000;

/// Answers a POST whose origin and CSRF token were checked.
pub async fn post(portal: &Portal, caller: &Caller, path: &str, form: &Form) -> Response<Body> {
    let done = match path {
        "/keys" => create(portal, caller, form).await,
        "/roll" => roll(portal, caller, form).await,
        "/revoke" => revoke(portal, caller, form).await,
        "/policy" if form.get("action") == "preview" => {
            return match pages::edit_preview(portal, caller, form).await {
                Ok(page) => web::html(StatusCode::OK, page, None),
                Err(e) => error_response(portal, e),
            }
        }
        "/policy" => update_policy(portal, caller, form).await,
        "/verify-chain" => return super::trail::verify(portal, caller, form).await,
        _ => return portal.error(StatusCode::NOT_FOUND, "no such page"),
    };
    match done {
        Ok(next) => web::see_other(&next),
        Err(e) => error_response(portal, e),
    }
}

/// The error page for a domain error: its status and message as gRPC would give them.
pub fn error_response(portal: &Portal, e: Error) -> Response<Body> {
    let status = to_status(e);
    let http = match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::AlreadyExists | tonic::Code::Aborted => StatusCode::CONFLICT,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    portal.error(http, status.message())
}

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

async fn create(portal: &Portal, caller: &Caller, form: &Form) -> Result<String> {
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

async fn roll(portal: &Portal, caller: &Caller, form: &Form) -> Result<String> {
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

async fn revoke(portal: &Portal, caller: &Caller, form: &Form) -> Result<String> {
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

async fn update_policy(portal: &Portal, caller: &Caller, form: &Form) -> Result<String> {
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
