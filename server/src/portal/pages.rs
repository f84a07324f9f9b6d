//! The portal's pages (maud: every value is HTML-escaped). Each GET reads through the domain
//! as the caller — ListSecrets, DescribeSecret, GetKeyUsage — so a page shows exactly what the
//! same identity could read over gRPC, and the read is audited like one. No page carries a
//! secret except `/reveal`, once.

use super::chart;
use super::view::{csrf, layout, span, time};
use super::web;
use super::{Caller, Portal};
use crate::clock::{rfc3339, Millis};
use crate::error::{Error, Result};
use crate::model::{Kind, SecretRecord, VersionState};
use crate::vault::usage::{network_text, Activity, HOUR_MS, WINDOW_MS};
use crate::vault::ListInput;
use maud::{html, Markup};
use std::collections::BTreeMap;

/// A day, in milliseconds.
pub const DAY_MS: u64 = 24 * HOUR_MS;
/// Expiring within this long is highlighted.
const EXPIRING_MS: u64 = 7 * DAY_MS;
/// Unused this long is stale (as `wardctl keys stale`'s default).
const STALE_MS: u64 = 90 * DAY_MS;
/// Pages of ListSecrets read for "My keys".
const MAX_LIST_PAGES: usize = 20;

/// My keys: the API keys the caller may list, with last use, expiry and staleness.
pub async fn keys_page(portal: &Portal, caller: &Caller) -> Result<Markup> {
    let mut keys = Vec::new();
    let mut token = String::new();
    let mut denied = None;
    for _ in 0..MAX_LIST_PAGES {
        let page = portal
            .vault()
            .list(
                &caller.peer,
                ListInput {
                    page_size: 500,
                    page_token: token.clone(),
                    ..Default::default()
                },
            )
            .await;
        match page {
            Ok(p) => {
                keys.extend(p.secrets.into_iter().filter(|s| s.kind == Kind::ApiKey));
                token = p.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            // No list grant at all: nothing to show (and nothing to act on).
            Err(e @ Error::PermissionDenied { .. }) => {
                denied = Some(e.to_string());
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let now = portal.vault().now();
    let usage = portal.vault().usage();
    Ok(layout(
        caller,
        "My keys",
        html! {
            @if let Some(why) = denied {
                p.notice #no-grants { "You hold no grant to list keys. " (why) }
            }
            @if keys.is_empty() {
                p #no-keys { "No API keys you may see." }
            } @else {
                table #keys {
                    thead { tr {
                        th { "Name" } th { "Environment" } th { "Owner" } th { "Scopes" }
                        th { "State" } th { "Created" } th { "Last used" } th { "Expires" } th {}
                    } }
                    tbody {
                        @for s in &keys {
                            @let last = usage.get(&s.name).into_values()
                                .filter_map(|u| u.last_used_ms.map(|t| (t, u.last_client_ip)))
                                .max_by_key(|(t, _)| *t);
                            @let expires = s.life.expire_ms;
                            @let expiring = expires.is_some_and(|e| e > now && e - now <= EXPIRING_MS);
                            @let stale = last.as_ref().map_or(s.create_ms, |(t, _)| *t) + STALE_MS <= now;
                            tr data-name=(s.name) {
                                td { a href=(web::link("/key", &[("name", &s.name)])) { (s.name) } }
                                td { (s.environment) }
                                td { (s.owner) }
                                td { (s.scopes.join(", ")) }
                                td { (state_of(s, now)) }
                                td { (time(Some(s.create_ms))) }
                                td { @match &last {
                                    Some((t, ip)) => { (rfc3339(*t)) @if !ip.is_empty() { " from " code { (ip) } } }
                                    None => "never",
                                } }
                                td class=[expiring.then_some("expiring")] { (time(expires)) }
                                td { @if stale { span.stale title="unused for 90 days" { "stale" } } }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// The key's state in words: revoked, expired, or its PRIMARY's state.
fn state_of(s: &SecretRecord, now: Millis) -> &'static str {
    if s.life.revoked.is_some() {
        return "REVOKED";
    }
    match s.version(s.primary) {
        Some(v) => s.standing(v, now).state.name(),
        None => "NO PRIMARY",
    }
}

/// The create form (expiry required, at most `max_key_lifetime`).
pub fn new_page(portal: &Portal, caller: &Caller) -> Markup {
    let max_days = portal.settings().max_key_lifetime_ms / DAY_MS;
    let envs = &portal.vault().settings().environments;
    layout(
        caller,
        "Create key",
        html! {
            form method="post" action="/keys" #create {
                (csrf(caller))
                label { "Name " input name="name" required placeholder="team/partner-key"; }
                label { "Environment "
                    select name="environment" {
                        @for e in envs { option value=(e) { (e) } }
                    }
                }
                label { "Scopes (comma-separated) " input name="scopes" placeholder="orders:read"; }
                label { "Description " input name="description"; }
                (policy_fields(None, 90, max_days))
                button type="submit" { "Create key" }
            }
        },
    )
}

/// The usage-policy fields, filled from `s` when editing; the expiry field starts at `days`.
fn policy_fields(s: Option<&SecretRecord>, days: u64, max_days: u64) -> Markup {
    let cidrs = s.map(|s| {
        s.key_policy
            .allowed_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    });
    let rate = s.and_then(|s| s.key_policy.rate_limit);
    let quota = s.and_then(|s| s.key_policy.quota);
    html! {
        label { "Allowed client networks (CIDRs, comma-separated; empty: any) "
            input name="cidrs" value=[cidrs] placeholder="10.0.0.0/8, 2001:db8::/32"; }
        label { "Rate limit (requests) " input name="rate" type="number" min="1" value=[rate.map(|r| r.requests)]; }
        label { "per "
            select name="rate_period" {
                option value="s" selected[rate.is_none_or(|r| r.period_ms == 1000)] { "second" }
                option value="m" selected[rate.is_some_and(|r| r.period_ms == 60_000)] { "minute" }
                option value="h" selected[rate.is_some_and(|r| r.period_ms == 3_600_000)] { "hour" }
            }
        }
        label { "Quota (verifications; empty: unlimited) "
            input name="quota" type="number" min="1" value=[quota.map(|q| q.limit)]; }
        label { "Expires in (days, required, at most " (max_days) ") "
            input name="expires_days" type="number" min="1" max=(max_days) required value=(days.clamp(1, max_days)); }
    }
}

/// The new key, once: taken from the waiting room, never shown again.
pub fn reveal_page(portal: &Portal, caller: &Caller) -> Markup {
    let Some(w) = portal.reveals().take(&caller.session, &caller.peer) else {
        return layout(
            caller,
            "Key",
            html! {
                p #gone { "No new key to show: a key is shown once, right after it is made. \
                           Roll the key to get a new one." }
                p { a href="/keys" { "My keys" } }
            },
        );
    };
    layout(
        caller,
        "Your new key",
        html! {
            p { "Key " strong { (w.name) } " version " (w.version) " was " (w.what) ". "
                strong { "Copy it now: it is shown this once and never again." } }
            p.secret {
                code #new-key { (w.key.expose()) }
                " "
                button type="button" #copy data-copy="new-key" { "Copy" }
            }
            p { a href=(web::link("/key", &[("name", &w.name)])) { "Done" } }
        },
    )
}

/// A key's page: versions and their windows, the networks still using each old version, the
/// usage chart, and the roll, revoke and edit forms. `preview` is the restriction preview's
/// verdict, when the edit form asked for one.
pub async fn key_page(
    portal: &Portal,
    caller: &Caller,
    name: &str,
    preview: Option<(u64, u64)>,
) -> Result<Markup> {
    let s = portal.vault().describe(&caller.peer, name).await?;
    if s.kind != Kind::ApiKey {
        return Err(Error::FailedPrecondition(format!(
            "{} is not an API key",
            s.name
        )));
    }
    // GetKeyUsage as the caller: its verb decides whether the counters are shown.
    let report = portal.keys().usage(&caller.peer, &s.name, 0).await.ok();
    let activity = if report.is_some() {
        portal.vault().usage().activity(&s.name)
    } else {
        BTreeMap::new()
    };
    let now = portal.vault().now();
    let max_days = portal.settings().max_key_lifetime_ms / DAY_MS;
    let revoked = s.life.revoked.is_some();
    // Old keys still in their window: the ones a developer revokes one by one.
    let old_active: Vec<_> = s
        .versions
        .iter()
        .rev()
        .filter(|v| v.version != s.primary && s.standing(v, now).state == VersionState::Active)
        .collect();
    // Saving the edit form keeps the expiry unless it is changed: start from what is left.
    let days_left = s
        .life
        .expire_ms
        .map_or(90, |e| e.saturating_sub(now).div_ceil(DAY_MS));
    Ok(layout(
        caller,
        &s.name,
        html! {
            p { "Environment " strong { (s.environment) } ", owner " (s.owner)
                ", scopes " code { (s.scopes.join(", ")) } ", expires " (time(s.life.expire_ms))
                @if let Some(r) = &s.life.revoked { ". " strong.revoked { "Revoked by " (r.by) ": " (r.reason) } } }
            p { a #audit-link href=(web::link("/audit", &[("name", &s.name)])) { "Audit trail of this key" } }
            h2 { "Versions" }
            table #versions {
                thead { tr {
                    th { "Version" } th { "State" } th { "Created" } th { "Window" } th { "Key id" }
                    th { "Networks in the last 24 h" }
                } }
                tbody {
                    @for v in s.versions.iter().rev() {
                        @let standing = s.standing(v, now);
                        tr data-version=(v.version) data-state=(standing.state.name()) {
                            td { (v.version) }
                            td { (standing.state.name()) }
                            td { (rfc3339(v.create_ms)) }
                            td { @if let (VersionState::Active, Some(until)) = (standing.state, v.grace_until_ms) {
                                span.window { "valid until " (rfc3339(until))
                                    " (" (span(until.saturating_sub(now))) " left)" }
                            } }
                            td { code { (v.key_id.as_deref().unwrap_or("")) } }
                            td { (networks(activity.get(&v.version), now)) }
                        }
                    }
                }
            }
            @if let Some(r) = &report {
                h2 { "Usage" }
                @let hours: Vec<_> = activity.values().flat_map(|a| a.hours.iter()).collect();
                (chart::render("Verifications per hour (last 24 h, UTC)",
                    &chart::buckets(&hours, now, HOUR_MS, 24), chart::hour_label))
                (chart::render("Verifications per day (last 7 days, UTC)",
                    &chart::buckets(&hours, now, DAY_MS, 7), chart::day_label))
                @if let Some(q) = r.quota_remaining { p { "Quota left: " (q) } }
            }
            @if !revoked {
                h2 { "Roll" }
                form method="post" action="/roll" #roll {
                    (csrf(caller))
                    input type="hidden" name="name" value=(s.name);
                    input type="hidden" name="expected_version" value=(s.primary);
                    p { "A new key replaces version " (s.primary) "; the old key stays valid for the grace period." }
                    fieldset {
                        legend { "Grace for the old key" }
                        label { input type="radio" name="grace" value="0"; " none (old key stops now)" }
                        label { input type="radio" name="grace" value="3600" checked; " 1 hour" }
                        label { input type="radio" name="grace" value="86400"; " 24 hours" }
                        label { input type="radio" name="grace" value="custom"; " custom: "
                            input name="grace_hours" type="number" min="0" max="8760" placeholder="hours"; }
                    }
                    button type="submit" { "Roll key" }
                }
                h2 { "Revoke" }
                form method="post" action="/revoke" #revoke {
                    (csrf(caller))
                    input type="hidden" name="name" value=(s.name);
                    label { "Version "
                        select name="version" {
                            @for v in old_active.iter() {
                                option value=(v.version) { "version " (v.version) " (old key)" }
                            }
                            option value="all" { "every version (the whole key)" }
                        }
                    }
                    label { "Reason (required; never put a secret here) " input name="reason" required; }
                    button type="submit" { "Revoke" }
                }
                h2 { "Edit restrictions" }
                form method="post" action="/policy" #edit {
                    (csrf(caller))
                    input type="hidden" name="name" value=(s.name);
                    label { "Scopes (comma-separated) " input name="scopes" value=(s.scopes.join(", ")); }
                    (policy_fields(Some(&s), days_left, max_days))
                    button type="submit" name="action" value="preview"
                        hx-post="/policy" hx-target="#preview" hx-select="#preview" hx-swap="outerHTML" { "Preview" }
                    " "
                    button type="submit" name="action" value="save" { "Save" }
                }
                div #preview {
                    @if let Some((refused, of)) = preview {
                        p.preview { "This change would have refused " strong #refused { (refused) } " of the last 24 h's "
                            (of) " successful verifications (client network and scope checks, of the latest "
                            (crate::vault::usage::RECENT) " remembered per version)." }
                    }
                }
            }
        },
    ))
}

fn networks(a: Option<&Activity>, now: Millis) -> Markup {
    let nets = a
        .map(|a| a.networks_since(now.saturating_sub(WINDOW_MS)))
        .unwrap_or_default();
    html! {
        @if nets.is_empty() { span.muted { "none" } }
        ul.networks {
            @for (net, seen) in &nets {
                li { code { (network_text(*net)) } " — " (seen.count) " verifications, last "
                    (span(now.saturating_sub(seen.last_ms))) " ago" }
            }
        }
    }
}
