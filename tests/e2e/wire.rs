//! Bad input at the wire: each RPC (every method of the descriptor sets the server serves, so a
//! new one is covered or fails the test) gets its malformed variants as raw bytes (empty, wrong
//! wire types, truncated, invalid UTF-8, deeply nested unknown groups, oversized, huge repeated
//! fields and maps, deep and bogus pagination tokens) and must answer with the status docs/api.md
//! documents — and keep serving afterwards.
//!
//! Undecodable protobuf gets INTERNAL: that is gRPC's convention for a message the server
//! cannot parse (tonic's prost codec applies it before any Ward code runs); docs/api.md says so.

use bytes::{Buf, BufMut};
use prost::Message;
use std::collections::BTreeMap;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

use ward_tests::{pb, TestServer};

use crate::rpcs::{assert_every_rpc_served, every_rpc, Rpc};
use crate::{assert_value, put};

/// Passes bytes through unchanged, so a test can send anything as a request body.
#[derive(Clone, Default)]
struct RawCodec;
#[derive(Clone, Default)]
struct RawEncoder;
#[derive(Clone, Default)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// Sends `body` to `rpc`; the status code it got. A streaming answer counts as OK once its
/// first message (or its clean end) arrives: a live watch never ends by itself.
async fn call(channel: &Channel, rpc: &Rpc, body: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone())
        .max_encoding_message_size(64 * 1024 * 1024)
        .max_decoding_message_size(64 * 1024 * 1024);
    grpc.ready().await.expect("channel ready");
    let path = PathAndQuery::try_from(rpc.path.as_str()).unwrap();
    let req = tonic::Request::new(body);
    if !rpc.server_streaming {
        return match grpc.unary(req, path, RawCodec).await {
            Ok(_) => Code::Ok,
            Err(st) => st.code(),
        };
    }
    match grpc.server_streaming(req, path, RawCodec).await {
        Ok(resp) => match resp.into_inner().message().await {
            Ok(_) => Code::Ok,
            Err(st) => st.code(),
        },
        Err(st) => st.code(),
    }
}

/// An RPC that is not in the descriptor (to check the server's answer to unknown methods).
fn unknown(path: &str) -> Rpc {
    Rpc {
        path: path.to_owned(),
        server_streaming: false,
        fieldless_request: true,
    }
}

const PUT: &str = "/ward.v1.Secrets/PutSecret";
const ISSUE: &str = "/ward.v1.Secrets/IssueKey";
const FETCH: &str = "/ward.v1.Secrets/FetchSecret";
const BATCH: &str = "/ward.v1.Secrets/BatchFetchSecrets";
const DESCRIBE: &str = "/ward.v1.Secrets/DescribeSecret";
const LIST: &str = "/ward.v1.Secrets/ListSecrets";
const ROTATE: &str = "/ward.v1.Secrets/RotateSecret";
const REVOKE: &str = "/ward.v1.Secrets/RevokeSecret";
const SET_STATE: &str = "/ward.v1.Secrets/SetVersionState";
const DESTROY: &str = "/ward.v1.Secrets/DestroyVersion";
const WATCH: &str = "/ward.v1.Secrets/WatchSecrets";
const ROTATE_KEYRING: &str = "/ward.v1.Admin/RotateKeyring";
const ROTATE_MASTER: &str = "/ward.v1.Admin/RotateMasterKey";
const DESCRIBE_KEYRING: &str = "/ward.v1.Admin/DescribeKeyring";
const VERIFY: &str = "/ward.v1.Keys/VerifyKey";
const UPDATE_POLICY: &str = "/ward.v1.Keys/UpdateKeyPolicy";
const GET_USAGE: &str = "/ward.v1.Keys/GetKeyUsage";
const STREAM_AUDIT: &str = "/ward.v1.Audit/StreamAudit";
const VERIFY_AUDIT: &str = "/ward.v1.Audit/VerifyAuditLog";
const BACKUP: &str = "/ward.v1.Backup/StreamBackup";
const WATCH_ALERTS: &str = "/ward.v1.Alerts/WatchAlerts";
const REPORT_LEAK: &str = "/ward.v1.Alerts/ReportLeak";
const TEST_WEBHOOK: &str = "/ward.v1.Alerts/TestWebhook";
const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_their_documented_status() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    put(&mut c, "wire/a", b"first").await;
    put(&mut c, "wire/b", b"second").await;
    let channel = s.channel("admin").await;

    // Variants every request message gets: field 1 is a string, a message or a varint in each,
    // so each of these is undecodable for all of them.
    let mut deep_groups = vec![0x0bu8; 200]; // 200 nested start-group tags of field 1
    deep_groups.extend(vec![0x0cu8; 200]);
    let undecodable: Vec<(&str, Vec<u8>)> = vec![
        ("field 1 as fixed32", vec![0x0d, 0, 0, 0, 0]),
        ("length past the end", vec![0x0a, 0x05, b'a']),
        (
            "invalid UTF-8 / bad nested bytes",
            vec![0x0a, 0x02, 0xff, 0xfe],
        ),
        (
            "varint of 11 bytes",
            vec![
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
        ("200 nested groups", deep_groups),
        ("field number 0", vec![0x00, 0x01]),
    ];
    let oversized = vec![0x0a, 0x80, 0x80, 0x80, 0x03]
        .into_iter()
        .chain(std::iter::repeat_n(b'a', 6 * 1024 * 1024))
        .collect::<Vec<u8>>();
    // Every RPC the server serves, from its descriptor sets: a new one gets the same treatment
    // without anyone listing it here.
    let rpcs: BTreeMap<String, Rpc> = every_rpc()
        .into_iter()
        .map(|r| (r.path.clone(), r))
        .collect();
    let rpc = |path: &str| -> Rpc {
        rpcs.get(path)
            .cloned()
            .unwrap_or_else(|| panic!("{path} is not in the descriptor sets"))
    };
    let mut failures = Vec::new();
    let mut check = |what: String, got: Code, want: Code| {
        if got != want {
            failures.push(format!("{what}: expected {want:?}, got {got:?}"));
        }
    };
    for method in rpcs.values() {
        for (i, (what, body)) in undecodable.iter().enumerate() {
            // A request with no fields (RotateKeyring, DescribeKeyring, StreamBackup): the
            // first and third variants are then well-formed unknown fields, skipped as proto3
            // says.
            let want = if method.fieldless_request && (i == 0 || i == 2) {
                Code::Ok
            } else {
                Code::Internal
            };
            check(
                format!("{} {what}", method.path),
                call(&channel, method, body.clone()).await,
                want,
            );
        }
        check(
            format!("{} 6 MiB", method.path),
            call(&channel, method, oversized.clone()).await,
            Code::ResourceExhausted,
        );
    }

    // Empty messages: every field at its default. Every RPC must have its row.
    let empty: BTreeMap<&str, Code> = [
        (PUT, Code::InvalidArgument),
        (ISSUE, Code::InvalidArgument),
        (FETCH, Code::InvalidArgument),
        (BATCH, Code::InvalidArgument),
        (DESCRIBE, Code::InvalidArgument),
        (LIST, Code::Ok),
        (ROTATE, Code::InvalidArgument),
        (REVOKE, Code::InvalidArgument),
        (SET_STATE, Code::InvalidArgument),
        (DESTROY, Code::InvalidArgument),
        // No names and no prefix: every secret the caller may read.
        (WATCH, Code::Ok),
        (ROTATE_KEYRING, Code::Ok),
        // An empty new_label: the server picks the next label.
        (ROTATE_MASTER, Code::Ok),
        (DESCRIBE_KEYRING, Code::Ok),
        (VERIFY, Code::Ok),
        (UPDATE_POLICY, Code::InvalidArgument),
        (GET_USAGE, Code::InvalidArgument),
        (STREAM_AUDIT, Code::Ok),
        (VERIFY_AUDIT, Code::Ok),
        (BACKUP, Code::Ok),
        (CHECK, Code::Ok),
        (WATCH_ALERTS, Code::Ok),
        // An empty key is no key of Ward's: found = false.
        (REPORT_LEAK, Code::Ok),
        // No webhook has the empty URL.
        (TEST_WEBHOOK, Code::NotFound),
    ]
    .into();
    let unlisted: Vec<&String> = rpcs
        .keys()
        .filter(|p| !empty.contains_key(p.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "RPCs with no expectation for an empty request: {unlisted:?}"
    );
    for (method, want) in &empty {
        check(
            format!("{method} empty"),
            call(&channel, &rpc(method), Vec::new()).await,
            *want,
        );
    }

    // Well-formed but out of bounds.
    let big = |n: usize| "x".repeat(n);
    let put_req = |f: &dyn Fn(&mut pb::PutSecretRequest)| {
        let mut r = pb::PutSecretRequest {
            name: "wire/new".into(),
            value: b"v".to_vec(),
            ..Default::default()
        };
        f(&mut r);
        r.encode_to_vec()
    };
    let table: Vec<(&str, &str, Vec<u8>, Code)> = vec![
        (
            "1 MiB name",
            PUT,
            put_req(&|r| r.name = big(1 << 20)),
            Code::InvalidArgument,
        ),
        (
            "1 MiB value",
            PUT,
            put_req(&|r| r.value = vec![1; 1 << 20]),
            Code::InvalidArgument,
        ),
        (
            "1 MiB description",
            PUT,
            put_req(&|r| r.description = big(1 << 20)),
            Code::InvalidArgument,
        ),
        (
            "1 MiB owner",
            PUT,
            put_req(&|r| r.owner = big(1 << 20)),
            Code::InvalidArgument,
        ),
        (
            "1 MiB request_id",
            PUT,
            put_req(&|r| r.request_id = big(1 << 20)),
            Code::InvalidArgument,
        ),
        (
            "1 MiB environment",
            PUT,
            put_req(&|r| r.environment = big(1 << 20)),
            Code::InvalidArgument,
        ),
        (
            "20 000 labels",
            PUT,
            put_req(&|r| r.labels = (0..20_000).map(|i| (format!("k{i}"), "v".into())).collect()),
            Code::InvalidArgument,
        ),
        (
            "label value of 1 MiB",
            PUT,
            put_req(&|r| r.labels = [("k".to_string(), big(1 << 20))].into()),
            Code::InvalidArgument,
        ),
        (
            "label key of 1 MiB",
            PUT,
            put_req(&|r| r.labels = [(big(1 << 20), "v".to_string())].into()),
            Code::InvalidArgument,
        ),
        (
            "scope of 1 MiB",
            ISSUE,
            pb::IssueKeyRequest {
                name: "wire/key".into(),
                scopes: vec![big(1 << 20)],
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "environment of 1 MiB",
            ISSUE,
            pb::IssueKeyRequest {
                name: "wire/key".into(),
                environment: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        // Found by the fuzz target `request`/`policy`: each of these was echoed whole into the
        // status message, so a large one broke the reply (RESOURCE_EXHAUSTED or a reset).
        (
            "allowed_cidr of 1 MiB",
            ISSUE,
            pb::IssueKeyRequest {
                name: "wire/key".into(),
                allowed_cidrs: vec![big(1 << 20)],
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "client_ip of 1 MiB",
            VERIFY,
            pb::VerifyKeyRequest {
                client_ip: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "endpoint of 1 MiB",
            VERIFY,
            pb::VerifyKeyRequest {
                endpoint: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "environment of 1 MiB",
            VERIFY,
            pb::VerifyKeyRequest {
                environment: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "update_mask path of 1 MiB",
            UPDATE_POLICY,
            pb::UpdateKeyPolicyRequest {
                name: "wire/a".into(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![big(1 << 20)],
                }),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "outcome filter of 1 MiB",
            STREAM_AUDIT,
            pb::StreamAuditRequest {
                outcome: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "expected_version u64::MAX",
            PUT,
            put_req(&|r| r.expected_version = Some(u64::MAX)),
            Code::Aborted,
        ),
        (
            "200 000 scopes",
            ISSUE,
            pb::IssueKeyRequest {
                name: "wire/key".into(),
                scopes: vec!["s".into(); 200_000],
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "version u64::MAX",
            FETCH,
            pb::FetchSecretRequest {
                name: "wire/a".into(),
                version: u64::MAX,
            }
            .encode_to_vec(),
            Code::NotFound,
        ),
        (
            "500 000 batch items",
            BATCH,
            pb::BatchFetchSecretsRequest {
                items: vec![
                    pb::FetchSecretRequest {
                        name: "a".into(),
                        version: 0
                    };
                    500_000
                ],
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "page_size u32::MAX",
            LIST,
            pb::ListSecretsRequest {
                page_size: u32::MAX,
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "1 MiB page_token",
            LIST,
            pb::ListSecretsRequest {
                page_token: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "page_token of a 300-byte name",
            LIST,
            pb::ListSecretsRequest {
                page_token: b64(&"a".repeat(300)),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "page_token that is not a name",
            LIST,
            pb::ListSecretsRequest {
                page_token: b64("../../etc"),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "page_token past the last name",
            LIST,
            pb::ListSecretsRequest {
                page_token: b64("zzzz"),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::Ok,
        ),
        (
            "1 MiB name_prefix",
            LIST,
            pb::ListSecretsRequest {
                name_prefix: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "1 MiB name",
            DESCRIBE,
            pb::DescribeSecretRequest { name: big(1 << 20) }.encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "10 KiB new_label",
            ROTATE_MASTER,
            pb::RotateMasterKeyRequest {
                new_label: big(10 << 10),
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "1 MiB name",
            ROTATE,
            pb::RotateSecretRequest {
                name: big(1 << 20),
                value: b"v".to_vec(),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "1 MiB value",
            ROTATE,
            pb::RotateSecretRequest {
                name: "wire/a".into(),
                value: vec![1; 1 << 20],
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "1 MiB reason",
            REVOKE,
            pb::RevokeSecretRequest {
                name: "wire/a".into(),
                version: 1,
                reason: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "no reason",
            REVOKE,
            pb::RevokeSecretRequest {
                name: "wire/a".into(),
                version: 1,
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "state 99",
            SET_STATE,
            pb::SetVersionStateRequest {
                name: "wire/a".into(),
                version: 1,
                state: 99,
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "1 MiB request_id",
            DESTROY,
            pb::DestroyVersionRequest {
                name: "wire/a".into(),
                version: 1,
                request_id: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "version u64::MAX",
            DESTROY,
            pb::DestroyVersionRequest {
                name: "wire/a".into(),
                version: u64::MAX,
                ..Default::default()
            }
            .encode_to_vec(),
            Code::NotFound,
        ),
        (
            "100 000 names",
            WATCH,
            pb::WatchSecretsRequest {
                names: vec!["wire/a".into(); 100_000],
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "1 MiB name_prefix",
            WATCH,
            pb::WatchSecretsRequest {
                name_prefix: big(1 << 20),
                ..Default::default()
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "1 MiB name",
            GET_USAGE,
            pb::GetKeyUsageRequest {
                name: big(1 << 20),
                version: 0,
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "from_seq past to_seq",
            VERIFY_AUDIT,
            pb::VerifyAuditLogRequest {
                from_seq: 10,
                to_seq: 2,
            }
            .encode_to_vec(),
            Code::InvalidArgument,
        ),
        (
            "unknown fields are ignored",
            FETCH,
            {
                let mut b = pb::FetchSecretRequest {
                    name: "wire/a".into(),
                    version: 1,
                }
                .encode_to_vec();
                b.extend([0xf8, 0x06, 0x01]); // field 111, varint 1
                b
            },
            Code::Ok,
        ),
        (
            "no such method",
            "/ward.v1.Secrets/DropEverything",
            Vec::new(),
            Code::Unimplemented,
        ),
        (
            "no such service",
            "/ward.v2.Secrets/FetchSecret",
            Vec::new(),
            Code::Unimplemented,
        ),
    ];
    for (what, method, body, want) in table {
        let target = rpcs.get(method).cloned().unwrap_or_else(|| unknown(method));
        check(
            format!("{method} {what}"),
            call(&channel, &target, body).await,
            want,
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The server itself saw every RPC (a path the descriptor and the server spell differently
    // would count as "unknown" there).
    assert_every_rpc_served(&s, |_| true, "malformed requests");

    // None of it left a trace or hurt the server.
    assert_value(&mut c, "wire/a", 1, b"first").await;
    assert_value(&mut c, "wire/b", 1, b"second").await;
    assert_eq!(crate::all_names(&mut c).await, ["wire/a", "wire/b"]);
}
