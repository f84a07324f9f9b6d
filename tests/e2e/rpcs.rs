//! Every RPC Ward serves, read from the descriptor sets the server registers for reflection
//! (Ward's own services and Envoy's ext_authz), and the server's own count of the calls it
//! answered per method (`ward_rpc_duration_seconds`): a test that claims to cover every RPC
//! asserts it with these, so a new RPC without coverage fails that test.

use std::collections::BTreeMap;

use prost::Message;
use prost_types::FileDescriptorSet;
use ward_tests::TestServer;

/// One gRPC method as the descriptor declares it.
#[derive(Debug, Clone)]
pub struct Rpc {
    /// The request path, e.g. `/ward.v1.Secrets/PutSecret`.
    pub path: String,
    /// Whether the server answers with a stream.
    pub server_streaming: bool,
    /// Whether the request message declares no field at all (every byte is an unknown field).
    pub fieldless_request: bool,
}

/// Every method of every service in Ward's descriptor set and in Envoy's ext_authz set.
pub fn every_rpc() -> Vec<Rpc> {
    let mut out = Vec::new();
    for bytes in [
        ward::FILE_DESCRIPTOR_SET,
        ward::ENVOY_AUTHZ_FILE_DESCRIPTOR_SET,
    ] {
        let set = FileDescriptorSet::decode(bytes).expect("descriptor set decodes");
        // Fully qualified message name → whether it has no fields.
        let mut fieldless = BTreeMap::new();
        for f in &set.file {
            let package = f.package();
            for m in &f.message_type {
                fieldless.insert(format!(".{package}.{}", m.name()), m.field.is_empty());
            }
        }
        for f in &set.file {
            for svc in &f.service {
                for m in &svc.method {
                    out.push(Rpc {
                        path: format!("/{}.{}/{}", f.package(), svc.name(), m.name()),
                        server_streaming: m.server_streaming(),
                        fieldless_request: *fieldless
                            .get(m.input_type())
                            .unwrap_or_else(|| panic!("no message {}", m.input_type())),
                    });
                }
            }
        }
    }
    assert!(
        out.len() > 20,
        "the descriptor sets name only {} methods: {out:?}",
        out.len()
    );
    out
}

/// The calls the running server answered so far, by (method path, gRPC code name), from its
/// `/metrics` (`ward_rpc_duration_seconds_count`).
pub fn served_calls(s: &TestServer) -> BTreeMap<(String, String), u64> {
    let (status, body) = s.http_get("/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("ward_rpc_duration_seconds_count{method=\"") else {
            continue;
        };
        let (method, rest) = rest.split_once("\",code=\"").expect("metric labels");
        let (code, count) = rest.split_once("\"} ").expect("metric value");
        out.insert(
            (format!("/{method}"), code.to_owned()),
            count.trim().parse().expect("count"),
        );
    }
    out
}

/// Asserts that the running server answered every RPC in the descriptor sets at least once
/// with a code `accept` takes (e.g. only "OK" for a test that must have exercised each one).
pub fn assert_every_rpc_served(s: &TestServer, accept: impl Fn(&str) -> bool, what: &str) {
    let calls = served_calls(s);
    let missing: Vec<String> = every_rpc()
        .into_iter()
        .filter(|rpc| {
            !calls
                .iter()
                .any(|((m, code), n)| *m == rpc.path && accept(code) && *n > 0)
        })
        .map(|rpc| rpc.path)
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: the server answered no accepted call of {missing:?}\n(calls it saw: {calls:?})"
    );
}
