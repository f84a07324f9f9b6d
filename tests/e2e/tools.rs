//! The operator tools as a user runs them: `grpcurl` through server reflection (no proto files)
//! and `wardctl`.

use std::process::Output;

use base64::Engine as _;
use tonic::Code;
use ward::keyformat::ApiKey;
use ward_tests::{random_hex, TestServer};

use crate::{assert_code, assert_value, describe, fetch, put};

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_success(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

fn json(o: &Output, what: &str) -> serde_json::Value {
    assert_success(o, what);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}):\n{}", stdout(o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_roundtrip_through_reflection() {
    let s = TestServer::start();

    let services = s.grpcurl(&[], &["list"]);
    assert_success(&services, "grpcurl list");
    let listed = stdout(&services);
    for svc in ["ward.v1.Secrets", "grpc.health.v1.Health"] {
        assert!(
            listed.lines().any(|l| l.trim() == svc),
            "{svc} not listed:\n{listed}"
        );
    }
    let methods = s.grpcurl(&[], &["describe", "ward.v1.Secrets"]);
    assert_success(&methods, "grpcurl describe");
    for m in [
        "PutSecret",
        "IssueKey",
        "FetchSecret",
        "BatchFetchSecrets",
        "DescribeSecret",
        "ListSecrets",
    ] {
        assert!(
            stdout(&methods).contains(m),
            "{m} not described:\n{}",
            stdout(&methods)
        );
    }

    let health = json(
        &s.grpcurl(&[], &["grpc.health.v1.Health/Check"]),
        "health check",
    );
    assert_eq!(health["status"], "SERVING", "{health}");

    let value = format!("grpcurl-value-{}", random_hex(16));
    let body =
        serde_json::json!({"name": "ops/grpcurl", "value": b64(value.as_bytes())}).to_string();
    let put = json(
        &s.grpcurl(&["-d", &body], &["ward.v1.Secrets/PutSecret"]),
        "grpcurl PutSecret",
    );
    assert_eq!(put["name"], "ops/grpcurl", "{put}");
    assert_eq!(put["version"], "1", "uint64 is a JSON string: {put}");

    let fetched = json(
        &s.grpcurl(
            &["-d", r#"{"name":"ops/grpcurl"}"#],
            &["ward.v1.Secrets/FetchSecret"],
        ),
        "grpcurl FetchSecret",
    );
    assert_eq!(fetched["value"], b64(value.as_bytes()), "{fetched}");
    assert_eq!(fetched["state"], "VERSION_STATE_PRIMARY", "{fetched}");
    assert_eq!(fetched["kind"], "SECRET_KIND_STATIC", "{fetched}");

    // Cross-check with the generated client.
    let mut c = s.raw_client("admin").await;
    assert_value(&mut c, "ops/grpcurl", 1, value.as_bytes()).await;

    let issued = json(
        &s.grpcurl(
            &[
                "-d",
                r#"{"name":"ops/grpcurl-key","environment":"staging"}"#,
            ],
            &["ward.v1.Secrets/IssueKey"],
        ),
        "grpcurl IssueKey",
    );
    let key = issued["apiKey"]
        .as_str()
        .unwrap_or_else(|| panic!("no apiKey: {issued}"));
    assert_eq!(
        ApiKey::parse(key).expect("well-formed key").environment(),
        "staging"
    );

    let listed = json(
        &s.grpcurl(
            &["-d", r#"{"namePrefix":"ops/"}"#],
            &["ward.v1.Secrets/ListSecrets"],
        ),
        "grpcurl ListSecrets",
    );
    let names: Vec<&str> = listed["secrets"]
        .as_array()
        .unwrap_or_else(|| panic!("no secrets: {listed}"))
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ops/grpcurl", "ops/grpcurl-key"]);

    // Errors come back as gRPC codes.
    let missing = s.grpcurl(
        &["-d", r#"{"name":"ops/missing"}"#],
        &["ward.v1.Secrets/FetchSecret"],
    );
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("NotFound"),
        "{}",
        stderr(&missing)
    );
    let denied = s.grpcurl_as("app", &["-d", &body], &["ward.v1.Secrets/PutSecret"]);
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains("PermissionDenied"),
        "{}",
        stderr(&denied)
    );
    let app_fetch = json(
        &s.grpcurl_as(
            "app",
            &["-d", r#"{"name":"ops/grpcurl"}"#],
            &["ward.v1.Secrets/FetchSecret"],
        ),
        "app FetchSecret",
    );
    assert_eq!(app_fetch["value"], b64(value.as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wardctl_roundtrip() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;

    // put reads stdin, get writes the raw value to stdout.
    let value = format!("wardctl-value-{}", random_hex(16));
    let o = s.wardctl(&["put", "cli/one"], Some(value.as_bytes()));
    assert_success(&o, "wardctl put");
    assert_value(&mut c, "cli/one", 1, value.as_bytes()).await;
    let o = s.wardctl(&["get", "cli/one"], None);
    assert_success(&o, "wardctl get");
    assert_eq!(
        o.stdout,
        value.as_bytes(),
        "wardctl get prints the raw value"
    );

    // Binary values survive stdin → server → stdout untouched.
    let binary: Vec<u8> = (0..=255u8).rev().chain([b'\n', 0, b'\r', b'\n']).collect();
    assert_success(
        &s.wardctl(&["put", "cli/binary"], Some(&binary)),
        "put binary",
    );
    assert_value(&mut c, "cli/binary", 1, &binary).await;
    let o = s.wardctl(&["get", "cli/binary"], None);
    assert_success(&o, "get binary");
    assert_eq!(o.stdout, binary);

    // A value put by another client reads back the same.
    put(&mut c, "cli/from-sdk", b"from the generated client").await;
    let o = s.wardctl(&["get", "cli/from-sdk"], None);
    assert_success(&o, "get cli/from-sdk");
    assert_eq!(o.stdout, b"from the generated client");

    // issue prints the key.
    let o = s.wardctl(&["issue", "cli/key"], None);
    assert_success(&o, "wardctl issue");
    let printed = stdout(&o);
    let key = printed.trim();
    let parsed = ApiKey::parse(key).unwrap_or_else(|e| panic!("issue printed {printed:?}: {e}"));
    assert_eq!(parsed.environment(), "dev");
    assert_eq!(
        fetch(&mut c, "cli/key", 0).await.unwrap().value,
        key.as_bytes()
    );

    // ls and describe, human and JSON.
    let o = s.wardctl(&["ls"], None);
    assert_success(&o, "wardctl ls");
    for n in ["cli/one", "cli/binary", "cli/from-sdk", "cli/key"] {
        assert!(stdout(&o).contains(n), "ls misses {n}:\n{}", stdout(&o));
    }
    let o = s.wardctl(&["describe", "cli/one"], None);
    assert_success(&o, "wardctl describe");
    assert!(stdout(&o).contains("cli/one"), "{}", stdout(&o));
    assert!(!stdout(&o).contains(&value), "describe shows the value");
    let d = json(
        &s.wardctl(&["--json", "describe", "cli/key"], None),
        "wardctl --json describe",
    );
    assert!(d.to_string().contains("cli/key"), "{d}");
    assert!(
        !d.to_string().contains(key),
        "describe --json shows the key"
    );
    let l = json(&s.wardctl(&["--json", "ls"], None), "wardctl --json ls");
    assert!(l.to_string().contains("cli/binary"), "{l}");

    // Certificates and address from the environment instead of flags.
    let f = s.identity_files("app");
    let mut cmd = s.wardctl_command();
    cmd.env("WARD_ADDR", s.addr().to_string())
        .env("WARD_CA", &f.ca)
        .env("WARD_CERT", &f.cert)
        .env("WARD_KEY", &f.key)
        .args(["get", "cli/one"]);
    let o = ward_tests::run_tool(cmd, None);
    assert_success(&o, "wardctl get with WARD_* env as app");
    assert_eq!(o.stdout, value.as_bytes());

    // Failures exit non-zero, say what happened, and store nothing.
    let o = s.wardctl(&["get", "cli/missing"], None);
    assert!(!o.status.success(), "get missing succeeded");
    assert!(o.stdout.is_empty(), "get missing printed {:?}", stdout(&o));
    let e = stderr(&o).to_lowercase();
    assert!(e.contains("not_found") || e.contains("not found"), "{e}");
    let o = s.wardctl_as("app", &["put", "cli/denied"], Some(b"x"));
    assert!(!o.status.success(), "app put succeeded");
    let e = stderr(&o).to_lowercase();
    assert!(e.contains("permission"), "{e}");
    assert_code(
        describe(&mut c, "cli/denied").await,
        Code::NotFound,
        "denied put stored",
    );
    let o = s.wardctl(&["put", "Bad Name"], Some(b"x"));
    assert!(!o.status.success(), "bad name accepted");
    assert!(
        stderr(&o).to_lowercase().contains("invalid"),
        "{}",
        stderr(&o)
    );
}

/// Asks a reflection service (v1 or v1alpha; same messages, different package) for its
/// services and for the file that defines `$symbol`.
macro_rules! reflect {
    ($version:ident, $channel:expr, $symbol:expr) => {{
        use tonic_reflection::pb::$version::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut client = ServerReflectionClient::new($channel);
        let reqs = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol($symbol.into())),
            },
        ];
        let mut stream = client
            .server_reflection_info(futures::stream::iter(reqs))
            .await
            .expect(concat!("reflection ", stringify!($version)))
            .into_inner();
        let mut services = Vec::new();
        let mut files = 0usize;
        while let Some(msg) = stream.message().await.expect("reflection stream") {
            match msg.message_response {
                Some(MessageResponse::ListServicesResponse(l)) => {
                    services.extend(l.service.into_iter().map(|s| s.name))
                }
                Some(MessageResponse::FileDescriptorResponse(f)) => {
                    files += f.file_descriptor_proto.len()
                }
                other => panic!("{}: unexpected {other:?}", stringify!($version)),
            }
        }
        (services, files)
    }};
}

/// `issue` takes the key policy flags of `keys policy` (one flag set, one parser): a key issued
/// with them has the policy that `keys policy` sets from the same flags, `--expires` included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wardctl_issue_takes_the_flags_of_keys_policy() {
    let s = TestServer::start();
    let policy_flags = [
        "--scope",
        "orders:read",
        "--scope",
        "orders:write",
        "--cidr",
        "10.0.0.0/8",
        "--cidr",
        "192.168.1.7",
        "--rate-limit",
        "600/1m",
        "--burst",
        "20",
        "--quota",
        "1000",
        "--quota-period",
        "1d",
        "--quota-refill",
        "500",
        "--expires",
        "2030-01-01T00:00:00Z",
    ];
    let with = |head: &[&'static str]| -> Vec<&'static str> {
        head.iter().chain(&policy_flags).copied().collect()
    };

    let o = s.wardctl(&with(&["issue", "cli/issued"]), None);
    assert_success(&o, "issue with the policy flags");
    ApiKey::parse(stdout(&o).trim()).expect("issue prints the key");
    assert_success(&s.wardctl(&["issue", "cli/updated"], None), "plain issue");
    let updated = json(
        &s.wardctl(&with(&["--json", "keys", "policy", "cli/updated"]), None),
        "keys policy with the same flags",
    );

    let policy = |name: &str| {
        let d = json(
            &s.wardctl(&["--json", "describe", name], None),
            "describe --json",
        );
        serde_json::json!({
            "scopes": d["scopes"],
            "allowed_cidrs": d["allowed_cidrs"],
            "rate_limit": d["rate_limit"],
            "quota": d["quota"],
            "expire_time": d["expire_time"],
        })
    };
    let issued = policy("cli/issued");
    assert_eq!(
        issued,
        serde_json::json!({
            "scopes": ["orders:read", "orders:write"],
            "allowed_cidrs": ["10.0.0.0/8", "192.168.1.7/32"],
            "rate_limit": {"requests": 600, "period": "60s", "burst": 20},
            "quota": {"limit": 1000, "refill": 500, "refill_period": "86400s"},
            "expire_time": "2030-01-01T00:00:00Z",
        })
    );
    assert_eq!(policy("cli/updated"), issued, "keys policy said {updated}");
    // `keys policy` answers the whole policy, its schedule included (none set here).
    let mut answered = issued.clone();
    answered["rotation_period"] = serde_json::Value::Null;
    answered["default_grace_period"] = serde_json::Value::Null;
    assert_eq!(
        updated["policy"], answered,
        "keys policy answers the new policy"
    );

    // One expiry per key: --expires excludes --ttl and --expire-at, and a refused command
    // line creates nothing.
    for other in [["--ttl", "1h"], ["--expire-at", "2031-01-01T00:00:00Z"]] {
        let o = s.wardctl(
            &[
                "issue",
                "cli/two-expiries",
                "--expires",
                "1d",
                other[0],
                other[1],
            ],
            None,
        );
        assert_eq!(o.status.code(), Some(2), "{other:?}: {}", stderr(&o));
    }
    let o = s.wardctl(&["describe", "cli/two-expiries"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains("NOT_FOUND"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_and_health() {
    let s = TestServer::start();
    // Envoy's ext_authz is served on the same port, so it is described too (issue 11 item 8).
    let authz = "envoy.service.auth.v3.Authorization";
    for symbol in ["ward.v1.Secrets", authz] {
        for (services, files) in [
            reflect!(v1, s.channel("app").await, symbol),
            reflect!(v1alpha, s.channel("app").await, symbol),
        ] {
            for svc in ["ward.v1.Secrets", "grpc.health.v1.Health", authz] {
                assert!(
                    services.iter().any(|x| x == svc),
                    "{svc} not in {services:?}"
                );
            }
            assert!(files >= 1, "no file descriptor for {symbol}");
        }
    }

    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let mut health = HealthClient::new(s.channel("app").await);
    for service in ["", "ward.v1.Secrets"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health {service:?}: {e:?}"))
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "health {service:?}");
    }
}

/// The shell commands in dev mode's start-up banner (everything on stdout before the ready
/// line), with backslash-continued lines joined.
fn banner_commands(s: &TestServer) -> Vec<String> {
    let out = s.stdout_tail(500);
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in out.lines() {
        if line.starts_with(ward_tests::READY_PREFIX) {
            break;
        }
        let t = line.trim();
        let first = t.split_whitespace().next().unwrap_or("");
        // Headings ("grpcurl (reflection):") and prose are not commands.
        if current.is_empty()
            && (t.ends_with(':')
                || !["grpcurl", "wardctl", "export", "printf", "echo"].contains(&first))
        {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_banner_commands_work_as_pasted() {
    let s = TestServer::start();
    let commands = banner_commands(&s);
    let uses = |tool: &str| commands.iter().any(|c| c.contains(tool));
    assert!(
        uses("grpcurl") && uses("wardctl"),
        "banner lacks grpcurl or wardctl commands:\n{}",
        s.stdout_tail(100)
    );
    assert!(
        commands
            .iter()
            .any(|c| c.contains(&s.addr().port().to_string())),
        "banner commands do not name the bound port {}:\n{commands:#?}",
        s.addr()
    );
    // Paste them into a shell, in order, with wardctl on PATH.
    let script = format!("set -euo pipefail\n{}\n", commands.join("\n"));
    let wardctl_dir = ward_tests::wardctl_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        wardctl_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut bash = std::process::Command::new("bash");
    for v in ["WARD_ADDR", "WARD_CA", "WARD_CERT", "WARD_KEY"] {
        bash.env_remove(v);
    }
    bash.env("PATH", path).arg("-c").arg(&script);
    let o = ward_tests::run_tool(bash, None);
    assert_success(&o, &format!("banner commands:\n{script}"));
    // They did what they say: something is stored now.
    let mut c = s.raw_client("admin").await;
    assert!(
        !crate::all_names(&mut c).await.is_empty(),
        "banner commands stored nothing"
    );
}
