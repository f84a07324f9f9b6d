//! Envoy ext_authz request parsing (`ward_server::grpc::extauthz::check_input`): any headers, context
//! extensions and client address either parse or are refused INVALID_ARGUMENT with a bounded
//! message, never a panic (a non-ASCII `authorization` header once panicked there). What
//! parses is exact: the key is the bearer token, else the `x-api-key` value, trimmed, and the
//! header named is the one it came in; the client IP is an IP or nothing; scopes are split
//! clean. The parsed input then goes through the verifier's own field checks.
//!
//! Input: fields split at 0x00 — a presence mask (first byte; none: everything present),
//! `authorization`, `x-api-key`, `scopes`, `cost`, `environment`, `endpoint`, client address,
//! each taken as (lossy) UTF-8 as Envoy sends it. The same bytes are also decoded as a whole
//! protobuf CheckRequest.
#![no_main]

use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context, AttributeContext, CheckRequest,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::collections::HashMap;
use ward::keyformat::ApiKey;
use ward_fuzz::{checked, fields, invalid, join, write_seeds};
use ward_server::grpc::extauthz::{check_input, API_KEY_HEADER};

const AUTHORIZATION: &str = "authorization";

fuzz_target!(
    init: {
        write_seeds(seeds());
    },
    |data: &[u8]| {
        if let Ok(req) = CheckRequest::decode(data) {
            check(&req);
        }
        let f = fields(data, 8);
        let mask = f[0].first().copied().unwrap_or(0xff);
        let text = |i: usize| (mask & (1 << (i - 1)) != 0).then(|| String::from_utf8_lossy(f[i]).into_owned());
        let mut headers = HashMap::new();
        if let Some(v) = text(1) {
            headers.insert(AUTHORIZATION.to_owned(), v);
        }
        if let Some(v) = text(2) {
            headers.insert(API_KEY_HEADER.to_owned(), v);
        }
        let mut ext = HashMap::new();
        for (i, name) in [(3, "scopes"), (4, "cost"), (5, "environment"), (6, "endpoint")] {
            if let Some(v) = text(i) {
                ext.insert(name.to_owned(), v);
            }
        }
        let req = request(headers, ext, text(7));
        check(&req);
    }
);

fn request(
    headers: HashMap<String, String>,
    context_extensions: HashMap<String, String>,
    client: Option<String>,
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: client.map(|address| attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address,
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions,
            ..Default::default()
        }),
    }
}

/// Parses `req` and checks what came out against what went in.
fn check(req: &CheckRequest) {
    let attrs = req.attributes.as_ref();
    let none = HashMap::new();
    let headers = attrs
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .map_or(&none, |h| &h.headers);
    let ext = attrs.map_or(&none, |a| &a.context_extensions);
    let (input, header) = match check_input(req) {
        Ok(parsed) => parsed,
        Err(e) => {
            // The only refusal: a cost that is not a number.
            assert!(ext.get("cost").is_some_and(|c| c.parse::<u64>().is_err()));
            invalid(e);
            return;
        }
    };
    let key = input.api_key.as_str();
    assert_eq!(key, key.trim(), "the key is trimmed");
    let bearer = headers.get(AUTHORIZATION).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    });
    match header {
        AUTHORIZATION => assert_eq!(Some(key), bearer),
        API_KEY_HEADER => {
            assert!(bearer.is_none());
            assert_eq!(Some(key), headers.get(API_KEY_HEADER).map(|v| v.trim()));
        }
        "" => {
            assert!(bearer.is_none() && !headers.contains_key(API_KEY_HEADER));
            assert!(key.is_empty());
        }
        other => panic!("the key came in an unexpected header {other:?}"),
    }
    assert!(input.client_ip.is_empty() || input.client_ip.parse::<std::net::IpAddr>().is_ok());
    assert_eq!(input.cost, ext.get("cost").and_then(|c| c.parse().ok()));
    assert!(input
        .required_scopes
        .iter()
        .all(|s| !s.is_empty() && !s.contains([' ', ','])));
    // What the verifier checks next refuses cleanly too.
    checked(ward_server::model::check_scopes(&input.required_scopes));
    checked(ward_server::keys::check_endpoint(&input.endpoint));
    checked(ward_server::model::keypolicy::parse_client_ip(&input.client_ip));
    let _ = ApiKey::parse(key);
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let key = ApiKey::generate("ward", "dev")
        .map(|k| k.expose().to_owned())
        .unwrap_or_default();
    let bearer = format!("Bearer {key}");
    let all = [0xffu8];
    let mut out = vec![
        (
            "bearer".to_owned(),
            join(&[
                &all,
                bearer.as_bytes(),
                b"",
                b"orders:read",
                b"1",
                b"dev",
                b"/orders",
                b"203.0.113.9",
            ]),
        ),
        (
            "x-api-key".to_owned(),
            join(&[&[0b10], b"", key.as_bytes()]),
        ),
        // The inputs that panicked: byte 7 inside a multi-byte character.
        (
            "non-ascii-1".to_owned(),
            join(&[&[0b1], "Bearer\u{e9}abcdef".as_bytes()]),
        ),
        (
            "non-ascii-2".to_owned(),
            join(&[&[0b1], "\u{e9}\u{e9}\u{e9}\u{e9}x".as_bytes()]),
        ),
        (
            "bad-cost".to_owned(),
            join(&[&[0b1000], b"", b"", b"", b"lots"]),
        ),
        (
            "ipv6".to_owned(),
            join(&[&[0b1000000], b"", b"", b"", b"", b"", b"", b"2001:db8::1"]),
        ),
    ];
    let req = request(
        [(AUTHORIZATION.to_owned(), bearer)].into_iter().collect(),
        [("scopes".to_owned(), "a:read b:write".to_owned())]
            .into_iter()
            .collect(),
        Some("198.51.100.7".to_owned()),
    );
    out.push(("protobuf".to_owned(), req.encode_to_vec()));
    out
}
