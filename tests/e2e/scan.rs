//! `wardctl scan`: finds planted keys in a tree (honouring .gitignore, skipping binaries and
//! checksum-broken look-alikes), shows them redacted, and with --check tells live keys from
//! dead ones. Only REVOKED, EXPIRED and DESTROYED keys are dead; a DISABLED key is live (it can
//! be re-activated), and a key the server answers NOT_FOUND for (never issued, or the
//! scanner may not verify it) is "cannot tell": both fail the scan (exit 3).

use std::path::Path;
use std::process::Output;

use ward::keyformat::ApiKey;
use ward_tests::{pb, TestServer};

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(dir: &Path, rel: &str, data: &[u8]) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Issues an API key named `name` as `admin`; its plaintext.
async fn issue(admin: &ward_client::Client, name: &str) -> String {
    admin
        .issue_key(pb::IssueKeyRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_finds_planted_keys_and_check_tells_live_from_dead() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    let live = issue(&admin, "scan/live").await;
    let expired = issue(&admin, "scan/expired").await;
    admin
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            name: "scan/expired".into(),
            policy: Some(pb::KeyPolicy {
                expire_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["expire_time".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let never_issued = ApiKey::generate("ward", "dev").unwrap();
    let mut look_alike = live.clone();
    let i = look_alike.len() - 3;
    let c = if &look_alike[i..=i] == "z" { "y" } else { "z" };
    look_alike.replace_range(i..=i, c);

    let tree = s.scratch_dir().join("repo");
    write(
        &tree,
        "src/config.rs",
        format!("const KEY: &str = \"{live}\";\n").as_bytes(),
    );
    write(
        &tree,
        ".env",
        format!("# old\nAPI_KEY={expired}\n").as_bytes(),
    );
    write(
        &tree,
        "docs/example.md",
        format!("try `{}`\n", never_issued.expose()).as_bytes(),
    );
    write(
        &tree,
        "notes.txt",
        format!("typo: {look_alike}\n").as_bytes(),
    );
    write(&tree, ".gitignore", b"secrets.local\n");
    write(&tree, "secrets.local", live.as_bytes());
    let mut blob = vec![0u8, 1, 2];
    blob.extend_from_slice(live.as_bytes());
    write(&tree, "assets/blob.bin", &blob);
    let tree_arg = tree.to_str().unwrap();

    // Without --check: every well-formed key is reported, redacted; exit 3.
    let o = s.wardctl(&["scan", tree_arg], None);
    assert_eq!(o.status.code(), Some(3), "{}\n{}", out(&o), err(&o));
    let text = out(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("src/config.rs:1:20: ward_dev_…")),
        "{text}"
    );
    assert!(lines.iter().any(|l| l.contains(".env:2:9: ")), "{text}");
    assert!(
        lines.iter().any(|l| l.contains("docs/example.md:1:6: ")),
        "{text}"
    );
    for k in [
        live.as_str(),
        expired.as_str(),
        never_issued.expose(),
        look_alike.as_str(),
    ] {
        assert!(
            !text.contains(k) && !err(&o).contains(k),
            "a key is shown in full"
        );
    }
    assert!(err(&o).contains("3 keys found"), "{}", err(&o));

    // --check (as app: verify verb, zero cost) tells live from dead.
    let o = s.wardctl_as("app", &["scan", "--check", tree_arg], None);
    assert_eq!(o.status.code(), Some(3), "{}\n{}", out(&o), err(&o));
    let text = out(&o);
    let line = |file: &str| {
        text.lines()
            .find(|l| l.contains(file))
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        line("config.rs").ends_with("LIVE VALID (scan/live@1)"),
        "{text}"
    );
    assert!(line(".env").ends_with("EXPIRED (scan/expired@1)"), "{text}");
    assert!(
        line("example.md").contains("CANNOT TELL NOT_FOUND"),
        "{text}"
    );
    assert!(err(&o).contains("1 live, 1 cannot tell"), "{}", err(&o));
    // Zero cost: the scan is not a use of the key.
    let usage = admin.get_key_usage("scan/live", 0).await.unwrap();
    assert!(usage.last_used_time.is_none(), "{usage:?}");

    // --revoke leaves a key that is still its secret's PRIMARY alone, with a hint to rotate
    // first (revoking a leaked old version is covered in keys_lifecycle.rs).
    let o = s.wardctl(&["scan", "--revoke", "--yes", tree_arg], None);
    assert_eq!(o.status.code(), Some(3));
    assert!(err(&o).contains("rotate it first"), "{}", err(&o));

    // Nothing live left, but a key the server would not tell about: still exit 3.
    std::fs::remove_file(tree.join("src/config.rs")).unwrap();
    let o = s.wardctl_as("app", &["scan", "--check", tree_arg], None);
    assert_eq!(o.status.code(), Some(3), "{}\n{}", out(&o), err(&o));
    assert!(err(&o).contains("0 live, 1 cannot tell"), "{}", err(&o));
    // Only dead keys left: exit 0 (a pre-commit hook passes).
    std::fs::remove_file(tree.join("docs/example.md")).unwrap();
    let o = s.wardctl_as("app", &["scan", "--check", tree_arg], None);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    let o = s.wardctl(&["--json", "scan", "--check", tree_arg], None);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|f| f["live"] == false && f["standing"] == "dead"),
        "{v}"
    );
}

/// Issue 11 item 9: `scan --check` counted NOT_FOUND (the scanner's identity has no verify
/// grant on the key) and DISABLED (a retired version, which can be re-activated) as dead, so a
/// live leak passed a pre-commit hook. Only REVOKED, EXPIRED and DESTROYED are dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_check_counts_only_revoked_expired_and_destroyed_as_dead() {
    let mut s = TestServer::start();
    // A scanner that may verify only scan/* keys.
    let policy = s.data_dir().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(
        "\n[[rule]]\nidentities = [\"scanner\"]\nverbs = [\"verify\"]\nsecrets = [\"scan/*\"]\n",
    );
    std::fs::write(&policy, text).unwrap();
    s.restart();
    let admin = s.client("admin").await;
    // Version 1 of each is retired by a rotation with no grace, then revoked / destroyed / left.
    let retire = |name: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .rotate_secret(pb::RotateSecretRequest {
                    name: name.into(),
                    grace_period: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    };
    let disabled = issue(&admin, "scan/disabled").await;
    retire("scan/disabled").await;
    let revoked = issue(&admin, "scan/revoked").await;
    retire("scan/revoked").await;
    admin
        .revoke_secret(pb::RevokeSecretRequest {
            name: "scan/revoked".into(),
            version: 1,
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let destroyed = issue(&admin, "scan/destroyed").await;
    retire("scan/destroyed").await;
    admin
        .destroy_version(pb::DestroyVersionRequest {
            name: "scan/destroyed".into(),
            version: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let hidden = issue(&admin, "other/hidden").await;

    let scanner = s.issue_dev_cert("scanner", None);
    let scan = |dir: &Path| {
        let mut cmd = s.wardctl_command();
        cmd.arg("--addr")
            .arg(s.addr().to_string())
            .arg("--ca")
            .arg(&scanner.ca)
            .arg("--cert")
            .arg(&scanner.cert)
            .arg("--key")
            .arg(&scanner.key)
            .args(["scan", "--check"])
            .arg(dir);
        ward_tests::run_tool(cmd, None)
    };
    let tree = |name: &str, keys: &[&str]| {
        let dir = s.scratch_dir().join(name);
        for (i, k) in keys.iter().enumerate() {
            write(&dir, &format!("f{i}.env"), format!("KEY={k}\n").as_bytes());
        }
        dir
    };

    // Dead keys only: exit 0.
    let o = scan(&tree("dead", &[&revoked, &destroyed]));
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    assert_eq!(
        out(&o)
            .lines()
            .filter(|l| l.ends_with("REVOKED (scan/revoked@1)")
                || l.ends_with("REVOKED (scan/destroyed@1)"))
            .count(),
        2,
        "{}",
        out(&o)
    );
    // A DISABLED key can be re-activated: live, exit 3 (it passed as dead).
    let o = scan(&tree("disabled", &[&disabled]));
    assert_eq!(o.status.code(), Some(3), "{}\n{}", out(&o), err(&o));
    assert!(
        out(&o).contains("LIVE DISABLED (scan/disabled@1)"),
        "{}",
        out(&o)
    );
    // A key the scanner may not verify reads NOT_FOUND: reported, exit 3 (it passed as dead).
    let o = scan(&tree("hidden", &[&hidden, &revoked]));
    assert_eq!(o.status.code(), Some(3), "{}\n{}", out(&o), err(&o));
    assert!(out(&o).contains("CANNOT TELL NOT_FOUND"), "{}", out(&o));
    assert!(err(&o).contains("0 live, 1 cannot tell"), "{}", err(&o));
    // The key is still live: the admin's scan says so.
    let o = s.wardctl(
        &[
            "scan",
            "--check",
            tree("hidden2", &[&hidden]).to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(
        out(&o).contains("LIVE VALID (other/hidden@1)"),
        "{}",
        out(&o)
    );
}
