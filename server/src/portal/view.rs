//! The portal's page frame and small view helpers, shared by every page: the layout (header,
//! the one stylesheet and scripts served from the binary), the error page and the response for
//! a domain error (its status and message from grpc/status.rs, the one mapping).

use super::web::{self, Body};
use super::Caller;
use crate::clock::{rfc3339, Millis};
use crate::error::Error;
use crate::grpc::status::to_status;
use http::{Response, StatusCode};
use maud::{html, Markup, DOCTYPE};

/// The error page for a domain error: its status and message as gRPC would give them.
pub fn error_response(e: Error) -> Response<Body> {
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
    web::html(http, error_page(http, status.message()), None)
}

/// A page of the portal around `body`.
pub fn layout(caller: &Caller, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // No eval, no injected <style> (the CSP forbids both).
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false}"#;
                title { (title) " — Ward" }
                link rel="stylesheet" href="/static/portal.css";
                script src="/static/htmx.min.js" defer {}
                script src="/static/portal.js" defer {}
            }
            body {
                header {
                    nav {
                        strong { "Ward" }
                        a href="/keys" { "My keys" }
                        a href="/new" { "Create key" }
                    }
                    span.who { "Signed in as " code #identity { (caller.peer.identity) } }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// An error page.
pub fn error_page(status: StatusCode, message: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Error — Ward" }
                link rel="stylesheet" href="/static/portal.css";
            }
            body {
                main {
                    h1 { "Error " (status.as_u16()) }
                    p.error #error { (message) }
                    p { a href="/keys" { "Back to my keys" } }
                }
            }
        }
    }
}

/// A time as RFC 3339, or a dash.
pub fn time(ms: Option<Millis>) -> String {
    ms.map_or_else(|| "—".to_owned(), rfc3339)
}

/// `3h 20m`, `2d 4h`, `45s`.
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The hidden CSRF field of a form.
pub fn csrf(caller: &Caller) -> Markup {
    html! { input type="hidden" name="csrf" value=(caller.csrf); }
}
