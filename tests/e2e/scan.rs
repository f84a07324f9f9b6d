//! `wardctl scan`: finds planted keys in a tree (honouring .gitignore, skipping binaries and
//! checksum-broken look-alikes), shows them redacted, and with --check tells live keys from
//! dead ones. A dead key here is an expired one and one the server never issued; once
//! RevokeSecret exists, a revoked key belongs in the same list.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_finds_planted_keys_and_check_tells_live_from_dead() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    let issue = |name: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .issue_key(pb::IssueKeyRequest {
                    name: name.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .api_key
        }
    };
    let live = issue("scan/live").await;
    let expired = issue("scan/expired").await;
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
    assert!(line("example.md").ends_with("NOT_FOUND"), "{text}");
    assert!(err(&o).contains("1 live"), "{}", err(&o));
    // Zero cost: the scan is not a use of the key.
    let usage = admin.get_key_usage("scan/live", 0).await.unwrap();
    assert!(usage.last_used_time.is_none(), "{usage:?}");

    // --revoke leaves a key that is still its secret's PRIMARY alone, with a hint to rotate
    // first (revoking a leaked old version is covered in keys_lifecycle.rs).
    let o = s.wardctl(&["scan", "--revoke", "--yes", tree_arg], None);
    assert_eq!(o.status.code(), Some(3));
    assert!(err(&o).contains("rotate it first"), "{}", err(&o));

    // Nothing live left: exit 0 (a pre-commit hook passes).
    std::fs::remove_file(tree.join("src/config.rs")).unwrap();
    let o = s.wardctl_as("app", &["scan", "--check", tree_arg], None);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    let o = s.wardctl(&["--json", "scan", "--check", tree_arg], None);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(
        v.as_array().unwrap().iter().all(|f| f["live"] == false),
        "{v}"
    );
}
