//! Envoy ext_authz `Check` on Ward's gRPC port, driven with Envoy's own generated client: the
//! HTTP status, headers to add and remove, and Retry-After for each kind of answer.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context, check_response, AttributeContext, CheckRequest, CheckResponse,
};
use ward::keyformat::ApiKey;
use ward_tests::{pb, TestServer};

fn check_req(headers: &[(&str, &str)], ip: &str, ext: &[(&str, &str)]) -> CheckRequest {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ip.into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: ext
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    }
}

/// (gRPC code in the response, HTTP status for a denial, headers set) of a response.
fn denied(r: &CheckResponse) -> (i32, i32, HashMap<String, String>) {
    let code = r.status.as_ref().map_or(-1, |s| s.code);
    match &r.http_response {
        Some(check_response::HttpResponse::DeniedResponse(d)) => (
            code,
            d.status.as_ref().map_or(0, |s| s.code),
            d.headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| (h.key.to_ascii_lowercase(), h.value.clone()))
                .collect(),
        ),
        other => panic!("expected a denied response, got {other:?} (status {code})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_allows_and_denies_with_the_right_http_answers() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    let key = admin
        .issue_key(pb::IssueKeyRequest {
            name: "gw/orders".into(),
            owner: "team-orders".into(),
            scopes: vec!["orders:read".into()],
            allowed_cidrs: vec!["203.0.113.0/24".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;
    let limited = admin
        .issue_key(pb::IssueKeyRequest {
            name: "gw/limited".into(),
            rate_limit: Some(pb::RateLimit {
                requests: 1,
                period: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                burst: 1,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;
    // Envoy authenticates to Ward with its own certificate; here the app identity (verify).
    let mut envoy = s.authz_client("app").await;
    let bearer = format!("Bearer {key}");
    let read = [("scopes", "orders:read")];

    // Allowed: OK, owner and name headers overwrite anything the client sent, key removed.
    let r = envoy
        .check(check_req(
            &[("authorization", &bearer), ("x-ward-key-owner", "spoofed")],
            "203.0.113.9",
            &read,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.as_ref().unwrap().code, 0, "{r:?}");
    let Some(check_response::HttpResponse::OkResponse(ok)) = &r.http_response else {
        panic!("expected OK response: {r:?}");
    };
    let set: HashMap<String, (String, i32)> = ok
        .headers
        .iter()
        .map(|h| {
            let hv = h.header.as_ref().unwrap();
            (hv.key.clone(), (hv.value.clone(), h.append_action))
        })
        .collect();
    let overwrite = envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
    assert_eq!(
        set["x-ward-key-owner"],
        ("team-orders".to_string(), overwrite)
    );
    assert_eq!(set["x-ward-key-name"], ("gw/orders".to_string(), overwrite));
    assert_eq!(ok.headers_to_remove, vec!["authorization"]);

    // The x-api-key header works too, and is the one removed.
    let r = envoy
        .check(check_req(&[("x-api-key", &key)], "203.0.113.9", &[]))
        .await
        .unwrap()
        .into_inner();
    let Some(check_response::HttpResponse::OkResponse(ok)) = &r.http_response else {
        panic!("expected OK response: {r:?}");
    };
    assert_eq!(ok.headers_to_remove, vec!["x-api-key"]);

    // Wrong scope, and a client outside the key's range: 403.
    for (scopes, ip) in [
        ("orders:write", "203.0.113.9"),
        ("orders:read", "198.51.100.1"),
    ] {
        let r = envoy
            .check(check_req(
                &[("authorization", &bearer)],
                ip,
                &[("scopes", scopes)],
            ))
            .await
            .unwrap()
            .into_inner();
        let (code, http, _) = denied(&r);
        assert_eq!((code, http), (7, 403), "{scopes} from {ip}");
    }

    // No key, an unknown key, a malformed one: 401 with a Bearer challenge.
    let unknown = format!(
        "Bearer {}",
        ApiKey::generate("ward", "dev").unwrap().expose()
    );
    for headers in [
        vec![],
        vec![("authorization", unknown.as_str())],
        vec![("authorization", "Bearer nope")],
        vec![("authorization", "Basic dXNlcjpwYXNz")],
    ] {
        let r = envoy
            .check(check_req(&headers, "203.0.113.9", &[]))
            .await
            .unwrap()
            .into_inner();
        let (code, http, h) = denied(&r);
        assert_eq!((code, http), (16, 401), "{headers:?}");
        assert_eq!(
            h.get("www-authenticate").map(String::as_str),
            Some("Bearer")
        );
    }

    // Rate-limited: 429 with Retry-After in whole seconds.
    let lim = format!("Bearer {limited}");
    let r = envoy
        .check(check_req(&[("authorization", &lim)], "192.0.2.1", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.as_ref().unwrap().code, 0);
    let r = envoy
        .check(check_req(&[("authorization", &lim)], "192.0.2.1", &[]))
        .await
        .unwrap()
        .into_inner();
    let (code, http, h) = denied(&r);
    assert_eq!((code, http), (8, 429));
    let after: u64 = h["retry-after"].parse().unwrap();
    assert!((25..=30).contains(&after), "retry-after {after}");

    // Checks are audited and counted like any verification.
    let usage = admin.get_key_usage("gw/orders", 0).await.unwrap();
    assert_eq!(usage.versions[0].total, 4);
}

/// Issue 11 item 7: a non-ASCII `authorization` header made Check panic (a byte slice inside a
/// character): the stream reset, nothing was audited, and Envoy's `failure_mode_allow` let
/// the request through. Now it is a clean 401 denial, audited like any Check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_with_a_non_ascii_authorization_header_is_denied_and_audited() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    let key = admin
        .issue_key(pb::IssueKeyRequest {
            name: "gw/utf8".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;
    let mut envoy = s.authz_client("app").await;
    let values = [
        "Bearer\u{e9}abcdef".to_owned(),
        "\u{e9}\u{e9}\u{e9}\u{e9}".to_owned(),
        "Bea\u{1f511}rer x".to_owned(),
        format!("Bearer {key}\u{e9}"),
        format!("\u{e9}\u{e9}\u{e9}{key}"),
    ];
    for v in &values {
        let r = envoy
            .check(check_req(&[("authorization", v)], "203.0.113.9", &[]))
            .await
            .unwrap_or_else(|e| panic!("{v:?}: Check failed instead of denying: {e}"))
            .into_inner();
        let (code, http, h) = denied(&r);
        assert_eq!((code, http), (16, 401), "{v:?}");
        assert_eq!(h["www-authenticate"], "Bearer");
    }
    // A good key in x-api-key still works beside a non-ASCII authorization header.
    let r = envoy
        .check(check_req(
            &[("authorization", &values[0]), ("x-api-key", &key)],
            "203.0.113.9",
            &[],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.as_ref().unwrap().code, 0, "{r:?}");

    // Every Check left its audit record, as app, with no trace of the key.
    let mut auditor = s.audit_client("admin").await;
    let records = crate::audit::all_records(&mut auditor).await;
    let checks: Vec<_> = records.iter().filter(|r| r.method == "Check").collect();
    assert_eq!(checks.len(), values.len() + 1, "{checks:?}");
    assert!(checks.iter().all(|r| r.identity == "app" && r.code == 0));
    let body = &key[key.len() - 38..];
    assert!(
        !format!("{records:?}").contains(body),
        "the key reached the audit log"
    );
    // The server did not panic.
    assert_eq!(s.count_in_stderr("panicked"), 0, "{}", s.stderr_tail(40));
}

/// Issue 11 item 8: an operator debugging the gateway lists, describes and calls Check with
/// grpcurl through server reflection, without Envoy's proto files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_check_through_reflection() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    let key = admin
        .issue_key(pb::IssueKeyRequest {
            name: "gw/grpcurl".into(),
            owner: "team-gw".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;
    let text = |o: &std::process::Output| {
        assert!(
            o.status.success(),
            "grpcurl failed: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let listed = text(&s.grpcurl_as("app", &[], &["list"]));
    assert!(
        listed
            .lines()
            .any(|l| l.trim() == "envoy.service.auth.v3.Authorization"),
        "{listed}"
    );
    let described = text(&s.grpcurl_as(
        "app",
        &[],
        &["describe", "envoy.service.auth.v3.Authorization.Check"],
    ));
    assert!(
        described.contains("CheckRequest") && described.contains("CheckResponse"),
        "{described}"
    );
    let described = text(&s.grpcurl_as(
        "app",
        &[],
        &[
            "describe",
            "envoy.service.auth.v3.AttributeContext.HttpRequest",
        ],
    ));
    assert!(described.contains("headers"), "{described}");

    let body = |authorization: &str| {
        serde_json::json!({
            "attributes": {
                "source": {"address": {"socketAddress": {
                    "address": "203.0.113.9", "portValue": 40000}}},
                "request": {"http": {"method": "GET", "path": "/orders",
                    "headers": {"authorization": authorization}}},
            }
        })
        .to_string()
    };
    let allowed: serde_json::Value = serde_json::from_str(&text(&s.grpcurl_as(
        "app",
        &["-d", &body(&format!("Bearer {key}"))],
        &["envoy.service.auth.v3.Authorization/Check"],
    )))
    .unwrap();
    assert!(
        allowed["status"].get("code").is_none() || allowed["status"]["code"] == 0,
        "{allowed}"
    );
    let headers = allowed["okResponse"]["headers"].to_string();
    assert!(
        headers.contains("x-ward-key-owner") && headers.contains("team-gw"),
        "{allowed}"
    );
    let denied: serde_json::Value = serde_json::from_str(&text(&s.grpcurl_as(
        "app",
        &["-d", &body("Bearer ward_dev_not-a-key")],
        &["envoy.service.auth.v3.Authorization/Check"],
    )))
    .unwrap();
    assert_eq!(denied["status"]["code"], 16, "{denied}");
    assert_eq!(
        denied["deniedResponse"]["status"]["code"], "Unauthorized",
        "{denied}"
    );
}

/// A Check that cannot be read as a verification (here a `cost` that is not a number) is
/// refused INVALID_ARGUMENT — and audited, like every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refused_for_bad_input_is_audited() {
    let s = TestServer::start();
    let mut envoy = s.authz_client("app").await;
    let err = envoy
        .check(check_req(
            &[("x-api-key", "anything")],
            "203.0.113.9",
            &[("cost", "lots")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let mut auditor = s.audit_client("admin").await;
    let records = crate::audit::all_records(&mut auditor).await;
    let checks: Vec<_> = records.iter().filter(|r| r.method == "Check").collect();
    assert_eq!(checks.len(), 1, "{records:?}");
    assert_eq!(
        (checks[0].identity.as_str(), checks[0].code),
        ("app", tonic::Code::InvalidArgument as i32)
    );
}
