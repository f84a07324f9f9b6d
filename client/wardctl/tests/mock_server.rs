//! wardctl against an in-process mock of the Secrets service (the SDK's test harness), over
//! real mutual TLS with rcgen certificates: the command line end to end, without the real
//! server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../tests/mock/mod.rs"]
mod mock;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use mock::{start, Pki};

// ---------------------------------------------------------------------------------------------
// wardctl

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8(self.stdout.clone()).unwrap()
    }
}

async fn wardctl(pki: &Pki, addr: Option<SocketAddr>, args: &[&str], stdin: &[u8]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wardctl"));
    for var in [
        "WARD_ADDR",
        "WARD_CA",
        "WARD_CERT",
        "WARD_KEY",
        "WARD_SERVER_NAME",
        "WARD_TIMEOUT",
        "WARD_JSON",
    ] {
        cmd.env_remove(var);
    }
    if let Some(addr) = addr {
        cmd.env("WARD_ADDR", addr.to_string())
            .env("WARD_CA", pki.path("ca.pem"))
            .env("WARD_CERT", pki.path("admin.pem"))
            .env("WARD_KEY", pki.path("admin.key"));
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wardctl_commands() {
    let pki = Pki::new();
    let (addr, _mock) = start(&pki).await;
    let a = Some(addr);

    // put from stdin, exact bytes (trailing newline kept).
    let r = wardctl(&pki, a, &["put", "app/db", "--label", "team=pay"], b"pw\n").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let crc = crc32c::crc32c(b"pw\n");
    assert_eq!(r.out(), format!("app/db version 1 (crc32c {crc:08x})\n"));

    // put from a file, binary.
    let file = pki.path("value.bin");
    std::fs::write(&file, [0u8, 159, 146, 150]).unwrap();
    let f = file.to_str().unwrap();
    let r = wardctl(
        &pki,
        a,
        &["put", "app/bin", "--value-file", f, "--json"],
        b"",
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["version"], 1);

    // get: raw bytes, no newline added.
    let r = wardctl(&pki, a, &["get", "app/db"], b"").await;
    assert_eq!((r.code, r.stdout.as_slice()), (0, &b"pw\n"[..]));
    let r = wardctl(&pki, a, &["get", "app/bin", "--version", "1"], b"").await;
    assert_eq!(r.stdout, [0u8, 159, 146, 150]);
    let r = wardctl(&pki, a, &["--json", "get", "app/bin"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["value_base64"], "AJ+Slg==");
    assert_eq!(j["state"], "PRIMARY");
    assert_eq!(j["kind"], "STATIC");
    let r = wardctl(&pki, a, &["get", "app/db", "--json"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["value"], "pw\n");

    // issue: the key alone on stdout.
    let r = wardctl(&pki, a, &["issue", "app/key", "--scope", "read"], b"").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.out(), "ward_dev_0123456789abcdefghijABCDEFGHIJ012345\n");
    assert!(r.stderr.contains("app/key version 1"), "{}", r.stderr);

    // batch-get: one line per item; exit 1 because one failed.
    let r = wardctl(&pki, a, &["batch-get", "app/db@1", "nope", "app/bin"], b"").await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    let lines: Vec<String> = r.out().lines().map(String::from).collect();
    assert_eq!(lines[0], "app/db@1\tok\t1\tPRIMARY\tbase64:cHcK");
    assert!(
        lines[1].starts_with("nope@0\terror\tNOT_FOUND\t"),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("app/bin@0\tok\t1\tPRIMARY\tbase64:"));
    let r = wardctl(&pki, a, &["batch-get", "--json", "app/db"], b"").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j[0]["secret"]["value"], "pw\n");

    // describe.
    let r = wardctl(&pki, a, &["describe", "app/db"], b"").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = r.out();
    assert!(out.contains("labels       team=pay"), "{out}");
    assert!(out.contains("1        PRIMARY"), "{out}");
    let r = wardctl(&pki, a, &["describe", "app/db", "--json"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["versions"][0]["state"], "PRIMARY");
    assert_eq!(j["labels"]["team"], "pay");

    // ls: every page by default; one page with --page-size.
    let r = wardctl(&pki, a, &["ls", "--prefix", "app/"], b"").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let names: Vec<String> = r
        .out()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["app/bin", "app/db", "app/key"]);
    assert!(r.out().contains("API_KEY"));
    let r = wardctl(&pki, a, &["ls", "--json", "--page-size", "2"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["secrets"].as_array().unwrap().len(), 2);
    assert_eq!(j["next_page_token"], "app/db");
    let r = wardctl(&pki, a, &["ls", "--json", "--label", "team=pay"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wardctl_errors() {
    let pki = Pki::new();
    let (addr, _mock) = start(&pki).await;
    let a = Some(addr);

    // Server errors: exit 1, `error: CODE: message`.
    let r = wardctl(&pki, a, &["get", "nope"], b"").await;
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr, "error: NOT_FOUND: secret nope not found\n");
    let r = wardctl(&pki, a, &["put", "forbidden/x"], b"v").await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("error: PERMISSION_DENIED: "),
        "{}",
        r.stderr
    );

    // Usage and configuration errors: exit 2.
    let r = wardctl(&pki, a, &["put", "x"], b"").await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("value is empty"), "{}", r.stderr);
    let r = wardctl(&pki, None, &["get", "x"], b"").await;
    assert_eq!(r.code, 2);
    assert_eq!(r.stderr, "error: config: --ca (or WARD_CA) is required\n");
    let missing = pki.path("missing.pem");
    let r = wardctl(
        &pki,
        a,
        &["get", "x", "--cert", missing.to_str().unwrap()],
        b"",
    )
    .await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("missing.pem"), "{}", r.stderr);
    let r = wardctl(&pki, a, &["batch-get", "x@y"], b"").await;
    assert_eq!(r.code, 2);
    let r = wardctl(&pki, a, &["frobnicate"], b"").await;
    assert_eq!(r.code, 2);
    let r = wardctl(&pki, a, &["get", "x", "--addr", "http://127.0.0.1:1"], b"").await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("https"), "{}", r.stderr);

    // Unreachable server: exit 1, UNAVAILABLE.
    let r = wardctl(&pki, a, &["get", "x", "--addr", "127.0.0.1:1"], b"").await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("error: UNAVAILABLE: "), "{}", r.stderr);
    assert!(r.stderr.contains("127.0.0.1:1"), "{}", r.stderr);
    assert!(!r.stderr.contains("transport error"), "{}", r.stderr);
}
