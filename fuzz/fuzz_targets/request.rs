//! Request decoding and validation: the first byte picks one of Ward's request messages, the
//! rest is its protobuf encoding. What decodes must re-encode to a fixed point (decode →
//! encode → decode gives the same message, and encoding again the same bytes), and then goes
//! through the parsers and checks the server applies to those fields. Every refusal must be
//! INVALID_ARGUMENT with a bounded message; every acceptance must hold what it promises
//! (a parsed name is the text given, a page token maps back to itself, an expiry lies in the
//! future within the limit).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::collections::BTreeMap;
use std::fmt::Debug;
use ward::v1 as pb;
use ward_fuzz::{checked, invalid, write_seeds};
use ward_server::audit::Outcome;
use ward_server::model::keypolicy::{
    parse_cidrs, parse_client_ip, KeyPolicyInput, PolicyMask, Quota, RateLimit,
};
use ward_server::keys::check_endpoint;
use ward_server::grpc::wire::policy_input;
use ward_server::model::input::{
    expiry, grace, reason, LifecycleInput, LifecyclePolicy, RawExpiration, MAX_EXPIRY_AHEAD_MS,
};
use ward_server::model::{
    check_labels, check_scopes, check_text, RequestId, SecretName, MAX_DESCRIPTION, MAX_OWNER,
};
use ward_server::grpc::wire::{at, from_state, raw_duration};
use ward_server::vault::{page_token, parse_page_token};

/// The server's clock during a call, in ms (any fixed time after 1970 will do).
const NOW: u64 = 1_700_000_000_000;

/// The request messages, in selector order (the first input byte, modulo the count).
const MESSAGES: [&str; 16] = [
    "PutSecret",
    "IssueKey",
    "FetchSecret",
    "BatchFetchSecrets",
    "DescribeSecret",
    "ListSecrets",
    "RotateSecret",
    "RevokeSecret",
    "SetVersionState",
    "DestroyVersion",
    "WatchSecrets",
    "VerifyKey",
    "UpdateKeyPolicy",
    "GetKeyUsage",
    "StreamAudit",
    "VerifyAuditLog",
];

fuzz_target!(
    init: {
        write_seeds(seeds());
    },
    |data: &[u8]| {
        let Some((&selector, bytes)) = data.split_first() else {
            return;
        };
        match usize::from(selector) % MESSAGES.len() {
            0 => decoded::<pb::PutSecretRequest>(bytes).map(put),
            1 => decoded::<pb::IssueKeyRequest>(bytes).map(issue),
            2 => decoded::<pb::FetchSecretRequest>(bytes).map(|r| name(&r.name)),
            3 => decoded::<pb::BatchFetchSecretsRequest>(bytes)
                .map(|r| r.items.iter().for_each(|i| name(&i.name))),
            4 => decoded::<pb::DescribeSecretRequest>(bytes).map(|r| name(&r.name)),
            5 => decoded::<pb::ListSecretsRequest>(bytes).map(list),
            6 => decoded::<pb::RotateSecretRequest>(bytes).map(rotate),
            7 => decoded::<pb::RevokeSecretRequest>(bytes).map(revoke),
            8 => decoded::<pb::SetVersionStateRequest>(bytes).map(set_state),
            9 => decoded::<pb::DestroyVersionRequest>(bytes).map(|r| {
                name(&r.name);
                request_id(&r.request_id);
            }),
            10 => decoded::<pb::WatchSecretsRequest>(bytes).map(watch),
            11 => decoded::<pb::VerifyKeyRequest>(bytes).map(verify),
            12 => decoded::<pb::UpdateKeyPolicyRequest>(bytes).map(update_policy),
            13 => decoded::<pb::GetKeyUsageRequest>(bytes).map(|r| name(&r.name)),
            14 => decoded::<pb::StreamAuditRequest>(bytes).map(|r| outcome(&r.outcome)),
            _ => decoded::<pb::VerifyAuditLogRequest>(bytes).map(drop),
        };
    }
);

/// Decodes `bytes` as `M`; what decodes must survive re-encoding unchanged. (Not byte for
/// byte: prost encodes map fields in HashMap order, which differs between two equal maps.)
fn decoded<M: Message + Default + PartialEq + Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let encoded = m.encode_to_vec();
    assert_eq!(encoded.len(), m.encoded_len());
    let again = M::decode(encoded.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again, m);
    assert_eq!(again.encoded_len(), encoded.len());
    Some(m)
}

fn name(s: &str) {
    if let Some(n) = checked(SecretName::parse(s)) {
        assert_eq!(n.as_str(), s);
        assert!(!s.contains("..") && !s.contains("//") && !s.ends_with('/'));
    }
}

fn request_id(s: &str) {
    if let Some(id) = checked(RequestId::parse_optional(s)) {
        assert_eq!(id.as_ref().map_or("", |i| i.as_str()), s);
    }
}

fn labels(l: &std::collections::HashMap<String, String>) {
    let l: BTreeMap<String, String> = l.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    checked(check_labels(&l));
}

fn texts(description: &str, owner: &str) {
    checked(check_text("description", description, MAX_DESCRIPTION));
    checked(check_text("owner", owner, MAX_OWNER));
}

fn lifecycle(
    rotation_period: Option<prost_types::Duration>,
    default_grace_period: Option<prost_types::Duration>,
    expiration: Option<RawExpiration>,
) {
    let input = LifecycleInput {
        rotation_period: rotation_period.map(raw_duration),
        default_grace_period: default_grace_period.map(raw_duration),
        expiration,
    };
    if let Some(p) = checked(LifecyclePolicy::parse(&input, NOW)) {
        if let Some(Some(at)) = p.expire_ms {
            assert!(at > NOW && at - NOW <= MAX_EXPIRY_AHEAD_MS, "{at}");
        }
    }
}

/// The key-policy checks IssueKey and UpdateKeyPolicy apply (vault::parse_policy).
fn key_policy(input: KeyPolicyInput) {
    if let Some(cidrs) = checked(parse_cidrs(&input.allowed_cidrs)) {
        assert_eq!(cidrs.len(), input.allowed_cidrs.len());
        for (c, text) in cidrs.iter().zip(&input.allowed_cidrs) {
            // Display is canonical: it parses back to the same range.
            let shown = c.to_string();
            let again = ward_server::model::keypolicy::Cidr::parse(&shown).expect("shown CIDR parses");
            assert_eq!(&again, c, "{text:?} shown as {shown:?}");
        }
    }
    if let Some((requests, period, burst)) = input.rate_limit {
        if let Some(r) = checked(RateLimit::parse(requests, period, burst)) {
            assert!(r.requests > 0 && r.burst > 0 && r.period_ms > 0);
        }
    }
    if let Some((limit, refill, period)) = input.quota {
        if let Some(q) = checked(Quota::parse(limit, refill, period, NOW, 1)) {
            assert!(q.limit > 0 && q.refill > 0);
        }
    }
}

fn put(r: pb::PutSecretRequest) {
    name(&r.name);
    request_id(&r.request_id);
    labels(&r.labels);
    texts(&r.description, &r.owner);
    lifecycle(
        r.rotation_period,
        r.default_grace_period,
        r.expiration.map(|e| match e {
            pb::put_secret_request::Expiration::ExpireTime(t) => at(t),
            pb::put_secret_request::Expiration::Ttl(d) => RawExpiration::Ttl(raw_duration(d)),
        }),
    );
}

fn issue(r: pb::IssueKeyRequest) {
    name(&r.name);
    request_id(&r.request_id);
    checked(check_scopes(&r.scopes));
    labels(&r.labels);
    texts(&r.description, &r.owner);
    lifecycle(
        r.rotation_period,
        r.default_grace_period,
        r.expiration.map(|e| match e {
            pb::issue_key_request::Expiration::ExpireTime(t) => at(t),
            pb::issue_key_request::Expiration::Ttl(d) => RawExpiration::Ttl(raw_duration(d)),
        }),
    );
    if let Some(p) = checked(policy_input(r.allowed_cidrs, r.rate_limit, r.quota, None)) {
        key_policy(p);
    }
}

fn list(r: pb::ListSecretsRequest) {
    match parse_page_token(&r.page_token) {
        Ok(None) => assert!(r.page_token.is_empty()),
        // Each name has exactly one token, so the server never pages from a look-alike.
        Ok(Some(last)) => assert_eq!(page_token(last.as_str()), r.page_token),
        Err(e) => invalid(e),
    }
}

fn rotate(r: pb::RotateSecretRequest) {
    name(&r.name);
    request_id(&r.request_id);
    if let Some(g) = r.grace_period {
        checked(grace("grace_period", raw_duration(g)));
    }
    if let Some(e) = r.expiration {
        let e = match e {
            pb::rotate_secret_request::Expiration::ExpireTime(t) => at(t),
            pb::rotate_secret_request::Expiration::Ttl(d) => RawExpiration::Ttl(raw_duration(d)),
        };
        if let Some(Some(at)) = checked(expiry(e, NOW)) {
            assert!(at > NOW && at - NOW <= MAX_EXPIRY_AHEAD_MS);
        }
    }
}

fn revoke(r: pb::RevokeSecretRequest) {
    name(&r.name);
    request_id(&r.request_id);
    if let Some(text) = checked(reason(&r.reason)) {
        assert_eq!(text, r.reason);
        assert!(!text.trim().is_empty() && !text.chars().any(char::is_control));
    }
}

fn set_state(r: pb::SetVersionStateRequest) {
    name(&r.name);
    request_id(&r.request_id);
    // Unknown state numbers are None (the vault refuses them), never a panic.
    let _ = from_state(r.state);
    if let Some(g) = r.grace_period {
        checked(grace("grace_period", raw_duration(g)));
    }
}

fn watch(r: pb::WatchSecretsRequest) {
    r.names.iter().for_each(|n| name(n));
    r.held.iter().for_each(|h| {
        name(&h.name);
        h.versions.iter().for_each(|v| {
            let _ = from_state(v.state);
        });
    });
}

fn verify(r: pb::VerifyKeyRequest) {
    checked(check_scopes(&r.required_scopes));
    if let Some(Some(ip)) = checked(parse_client_ip(&r.client_ip)) {
        // Stored canonical: an IPv4-mapped IPv6 address is matched as IPv4.
        assert_eq!(ward_server::model::keypolicy::canonical(ip), ip);
    }
    checked(check_endpoint(&r.endpoint));
    if let Ok(key) = ward::keyformat::ApiKey::parse(&r.api_key) {
        assert_eq!(key.expose(), r.api_key);
    }
}

fn update_policy(r: pb::UpdateKeyPolicyRequest) {
    name(&r.name);
    request_id(&r.request_id);
    let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
    if let Some(mask) = checked(PolicyMask::parse(&paths)) {
        // An empty mask replaces every field; a named one at least one.
        assert!(mask != PolicyMask::default());
        if paths.is_empty() {
            assert_eq!(mask, PolicyMask::ALL);
        }
    }
    let p = r.policy.unwrap_or_default();
    checked(check_scopes(&p.scopes));
    if let Some(input) = checked(policy_input(
        p.allowed_cidrs,
        p.rate_limit,
        p.quota,
        p.expire_time,
    )) {
        key_policy(input);
    }
}

fn outcome(s: &str) {
    match Outcome::parse(s) {
        Ok(Outcome::Code(c)) => {
            assert!(ward_server::audit::code_name(c).eq_ignore_ascii_case(s.trim()));
        }
        Ok(_) => {}
        Err(e) => invalid(e),
    }
}

/// One valid request of each kind, and a few near misses.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let d = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let labels: std::collections::HashMap<String, String> =
        [("team".to_owned(), "payments".to_owned())].into();
    let encoded: Vec<(usize, Vec<u8>)> = vec![
        (
            0,
            pb::PutSecretRequest {
                name: "payments/db/password".into(),
                value: b"hunter2".to_vec(),
                environment: "prod".into(),
                owner: "team-payments".into(),
                labels: labels.clone(),
                description: "primary database".into(),
                expected_version: Some(0),
                request_id: "req-1".into(),
                rotation_period: d(86_400),
                default_grace_period: d(3600),
                expiration: Some(pb::put_secret_request::Expiration::Ttl(
                    prost_types::Duration {
                        seconds: 7 * 86_400,
                        nanos: 0,
                    },
                )),
            }
            .encode_to_vec(),
        ),
        (
            1,
            pb::IssueKeyRequest {
                name: "keys/billing".into(),
                environment: "prod".into(),
                scopes: vec!["billing:read".into(), "billing:write".into()],
                labels,
                allowed_cidrs: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
                rate_limit: Some(pb::RateLimit {
                    requests: 100,
                    period: d(60),
                    burst: 10,
                }),
                quota: Some(pb::Quota {
                    limit: 1000,
                    refill: 1000,
                    refill_period: d(86_400),
                }),
                expiration: Some(pb::issue_key_request::Expiration::ExpireTime(
                    prost_types::Timestamp {
                        seconds: 1_800_000_000,
                        nanos: 0,
                    },
                )),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            2,
            pb::FetchSecretRequest {
                name: "payments/db/password".into(),
                version: 3,
            }
            .encode_to_vec(),
        ),
        (
            3,
            pb::BatchFetchSecretsRequest {
                items: vec![
                    pb::FetchSecretRequest {
                        name: "a/b".into(),
                        version: 0,
                    },
                    pb::FetchSecretRequest {
                        name: "a//b".into(),
                        version: 1,
                    },
                ],
            }
            .encode_to_vec(),
        ),
        (
            5,
            pb::ListSecretsRequest {
                page_size: 50,
                page_token: page_token("payments/db/password"),
                name_prefix: "payments/".into(),
                unused_keys: true,
                unused_days: 30,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            6,
            pb::RotateSecretRequest {
                name: "payments/db/password".into(),
                value: b"new".to_vec(),
                grace_period: d(600),
                expiration: Some(pb::rotate_secret_request::Expiration::Ttl(
                    prost_types::Duration {
                        seconds: 3600,
                        nanos: 5,
                    },
                )),
                expected_version: Some(2),
                request_id: "rot:2".into(),
            }
            .encode_to_vec(),
        ),
        (
            7,
            pb::RevokeSecretRequest {
                name: "keys/billing".into(),
                version: 1,
                reason: "leaked in a log".into(),
                successor_version: 2,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            8,
            pb::SetVersionStateRequest {
                name: "keys/billing".into(),
                version: 1,
                state: pb::VersionState::Active as i32,
                grace_period: d(60),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            9,
            pb::DestroyVersionRequest {
                name: "keys/billing".into(),
                version: 1,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            10,
            pb::WatchSecretsRequest {
                names: vec!["a/b".into()],
                held: vec![pb::HeldSecret {
                    name: "a/b".into(),
                    versions: vec![pb::HeldVersion {
                        version: 1,
                        state: pb::VersionState::Primary as i32,
                    }],
                }],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            11,
            pb::VerifyKeyRequest {
                api_key: ward::keyformat::ApiKey::generate("ward", "prod")
                    .map(|k| k.expose().to_owned())
                    .unwrap_or_default(),
                required_scopes: vec!["billing:read".into()],
                client_ip: "::ffff:10.1.2.3".into(),
                cost: Some(2),
                environment: "prod".into(),
                endpoint: "/v1/charge".into(),
            }
            .encode_to_vec(),
        ),
        (
            12,
            pb::UpdateKeyPolicyRequest {
                name: "keys/billing".into(),
                policy: Some(pb::KeyPolicy {
                    scopes: vec!["a".into()],
                    allowed_cidrs: vec!["192.168.0.0/16".into()],
                    rate_limit: Some(pb::RateLimit {
                        requests: 5,
                        period: d(1),
                        burst: 0,
                    }),
                    quota: None,
                    expire_time: None,
                    rotation_period: d(3600),
                    default_grace_period: None,
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![
                        "allowedCidrs".into(),
                        "rate_limit".into(),
                        "rotation_period".into(),
                        "defaultGracePeriod".into(),
                    ],
                }),
                request_id: "u1".into(),
            }
            .encode_to_vec(),
        ),
        (
            14,
            pb::StreamAuditRequest {
                last: 10,
                identity: "spiffe://prod/*".into(),
                name_prefix: "payments/".into(),
                method: "FetchSecret".into(),
                outcome: "permission_denied".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            15,
            pb::VerifyAuditLogRequest {
                from_seq: 1,
                to_seq: 100,
            }
            .encode_to_vec(),
        ),
    ];
    encoded
        .into_iter()
        .map(|(i, bytes)| {
            let mut input = vec![i as u8];
            input.extend(bytes);
            (MESSAGES[i].to_lowercase(), input)
        })
        .collect()
}
