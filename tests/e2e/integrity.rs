//! Integrity of what is stored: secret records and key-index entries are MACed under a key
//! derived at unseal, so an edit of the database files (server stopped) is DATA_LOSS naming the
//! record when it is read, while the rest is served; DescribeSecret shows a keyed fingerprint of
//! each value, never a checksum that could be brute-forced offline.

use std::path::Path;

use tonic::Code;
use ward_tests::{ok, pb, TestServer};

use crate::{describe, fetch, put};

/// postcard's varint encoding of `n` (how the records store integers).
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Replaces the only occurrence of `from` in `bytes` with `to`.
fn splice(bytes: &[u8], from: &[u8], to: &[u8], what: &str) -> Vec<u8> {
    let at: Vec<usize> = bytes
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{what}: {from:02x?} occurs {} times", at.len());
    [&bytes[..at[0]], to, &bytes[at[0] + from.len()..]].concat()
}

/// Rewrites the value at `key` of sled tree `tree` in the stopped server's database.
fn edit(data_dir: &Path, tree: &str, key: &[u8], f: impl FnOnce(&[u8]) -> Vec<u8>) {
    let db = ward_tests::open_stopped_db(data_dir);
    let t = db.open_tree(tree).unwrap();
    let old = t.get(key).unwrap().expect("record to edit");
    t.insert(key, f(&old)).unwrap();
    db.flush().unwrap();
}

/// The key of the only entry of `tree` whose value contains `needle`.
fn key_of(data_dir: &Path, tree: &str, needle: &[u8]) -> Vec<u8> {
    let db = ward_tests::open_stopped_db(data_dir);
    let t = db.open_tree(tree).unwrap();
    let keys: Vec<Vec<u8>> = t
        .iter()
        .map(Result::unwrap)
        .filter(|(_, v)| v.windows(needle.len()).any(|w| w == needle))
        .map(|(k, _)| k.to_vec())
        .collect();
    assert_eq!(keys.len(), 1, "entries of {tree} holding {needle:?}");
    keys.into_iter().next().unwrap()
}

fn ms(t: &prost_types::Timestamp) -> u64 {
    t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000
}

fn verify_req(key: &str, client_ip: &str, scopes: &[&str]) -> pb::VerifyKeyRequest {
    pb::VerifyKeyRequest {
        api_key: key.to_owned(),
        client_ip: client_ip.to_owned(),
        required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Asserts a DATA_LOSS whose message names `record`.
fn assert_data_loss<T: std::fmt::Debug>(r: Result<T, tonic::Status>, record: &str, what: &str) {
    let st = r.expect_err(what);
    assert_eq!(st.code(), Code::DataLoss, "{what}: {st:?}");
    assert!(
        st.message().contains(record),
        "{what}: the message does not name {record}: {}",
        st.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edited_field_kind_is_data_loss_naming_the_record() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let mut k = s.keys_client("admin").await;

    // Environment: a prod secret.
    ok(
        c.put_secret(pb::PutSecretRequest {
            environment: "prod".into(),
            ..crate::put_req("integrity/env", b"prod value")
        })
        .await,
        "put prod",
    );
    // Version state: version 1 revoked (version 2 is the PRIMARY).
    put(&mut c, "integrity/state", b"one").await;
    put(&mut c, "integrity/state", b"two").await;
    ok(
        c.revoke_secret(crate::lifecycle::revoke_req("integrity/state", 1, "leaked"))
            .await,
        "revoke v1",
    );
    let v1_create = ms(
        describe(&mut c, "integrity/state").await.unwrap().versions[0]
            .create_time
            .as_ref()
            .unwrap(),
    );
    // Scopes, CIDRs, and two keys whose index entries can be swapped.
    let issue = |name: &str, scopes: &[&str], cidrs: &[&str]| pb::IssueKeyRequest {
        name: name.to_owned(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        allowed_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let scoped = ok(
        c.issue_key(issue("integrity/scoped", &["read"], &[])).await,
        "issue scoped",
    );
    let fenced = ok(
        c.issue_key(issue("integrity/fenced", &[], &["10.0.0.0/8"]))
            .await,
        "issue fenced",
    );
    let ka = ok(
        c.issue_key(issue("integrity/ka", &[], &[])).await,
        "issue ka",
    );
    ok(
        c.issue_key(issue("integrity/kb", &["admin"], &[])).await,
        "issue kb",
    );
    put(&mut c, "integrity/untouched", b"still here").await;

    // Before: what the edits would change.
    let r = ok(
        k.verify_key(verify_req(&scoped.api_key, "", &["admin"]))
            .await,
        "verify scoped",
    );
    assert_eq!(r.result(), pb::VerifyResult::InsufficientScope);
    let r = ok(
        k.verify_key(verify_req(&fenced.api_key, "192.0.2.7", &[]))
            .await,
        "verify fenced",
    );
    assert_eq!(r.result(), pb::VerifyResult::ForbiddenIp);
    assert_eq!(
        fetch(&mut c, "integrity/state", 1)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    drop((c, k));
    s.stop();

    // The edits, each what an attacker with the files would do, bytes of the record's postcard
    // body behind its MAC.
    let dir = s.data_dir();
    edit(dir, "secrets", b"integrity/env", |v| {
        splice(v, b"\x04prod", b"\x03dev", "environment")
    });
    edit(dir, "secrets", b"integrity/state", |v| {
        // version 1, state REVOKED (3), create_ms → state PRIMARY (0)
        let from = [&[1u8, 3][..], &varint(v1_create)].concat();
        let to = [&[1u8, 0][..], &varint(v1_create)].concat();
        splice(v, &from, &to, "version state")
    });
    edit(dir, "secrets", b"integrity/scoped", |v| {
        splice(v, b"\x01\x04read", b"\x02\x04read\x05admin", "scopes")
    });
    edit(dir, "secrets", b"integrity/fenced", |v| {
        // one CIDR: IPv4 10.0.0.0, prefix 8 → none
        splice(v, &[1, 0, 10, 0, 0, 0, 8], &[0], "allowed CIDRs")
    });
    let ka_entry = key_of(dir, "key_index", b"integrity/ka");
    edit(dir, "key_index", &ka_entry, |v| {
        splice(v, b"integrity/ka", b"integrity/kb", "key index entry")
    });
    s.restart();

    let mut c = s.raw_client("admin").await;
    let mut k = s.keys_client("admin").await;
    assert_data_loss(
        fetch(&mut c, "integrity/env", 0).await,
        "integrity/env",
        "relabelled environment: fetch",
    );
    assert_data_loss(
        describe(&mut c, "integrity/env").await,
        "integrity/env",
        "relabelled environment: describe",
    );
    assert_data_loss(
        fetch(&mut c, "integrity/state", 1).await,
        "integrity/state",
        "un-revoked version",
    );
    assert_data_loss(
        k.verify_key(verify_req(&scoped.api_key, "", &["admin"]))
            .await,
        "integrity/scoped",
        "widened scopes",
    );
    assert_data_loss(
        k.verify_key(verify_req(&fenced.api_key, "192.0.2.7", &[]))
            .await,
        "integrity/fenced",
        "dropped CIDRs",
    );
    assert_data_loss(
        k.verify_key(verify_req(&ka.api_key, "", &[])).await,
        &ka.key_id,
        "re-pointed key index entry",
    );
    // Listing meets a tampered record and says which; untouched records are still served.
    assert_data_loss(
        c.list_secrets(pb::ListSecretsRequest::default()).await,
        "integrity/",
        "list",
    );
    crate::assert_value(&mut c, "integrity/untouched", 0, b"still here").await;
    let r = ok(
        k.verify_key(verify_req(
            &ok(
                c.issue_key(issue("integrity/new", &[], &[])).await,
                "issue after the edits",
            )
            .api_key,
            "",
            &[],
        ))
        .await,
        "verify an untouched key",
    );
    assert_eq!(r.result(), pb::VerifyResult::Valid);
}

/// DescribeSecret (the `list` verb) shows a keyed fingerprint, not the value's CRC32C; the
/// stored record holds no CRC32C of the value either. Fetch still returns the CRC32C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_a_keyed_fingerprint_and_nothing_stores_the_checksum() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    // A low-entropy value: a CRC32C of it would fall to a few thousand guesses.
    let pin = b"4821";
    let r = put(&mut c, "fp/pin", pin).await;
    assert_eq!(
        r.checksum,
        ward_tests::crc32c(pin),
        "put answers the caller's CRC32C"
    );
    put(&mut c, "fp/pin", b"9999").await;
    put(&mut c, "fp/pin", pin).await;
    put(&mut c, "fp/other", pin).await;
    assert_eq!(
        fetch(&mut c, "fp/pin", 1).await.unwrap().checksum,
        ward_tests::crc32c(pin)
    );
    let m = describe(&mut c, "fp/pin").await.unwrap();
    let fp: Vec<&str> = m.versions.iter().map(|v| v.fingerprint.as_str()).collect();
    assert!(
        fp.iter()
            .all(|f| f.len() == 32 && f.bytes().all(|b| b.is_ascii_hexdigit())),
        "{fp:?}"
    );
    assert_eq!(
        fp[0], fp[2],
        "the same value of one secret: the same fingerprint"
    );
    assert_ne!(fp[0], fp[1], "another value: another fingerprint");
    let other = describe(&mut c, "fp/other").await.unwrap();
    assert_ne!(
        other.versions[0].fingerprint, fp[0],
        "the same value in another secret is not linkable"
    );
    // The same over grpcurl: no checksum field at all.
    let o = s.grpcurl(
        &["-d", r#"{"name":"fp/pin"}"#],
        &["ward.v1.Secrets/DescribeSecret"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!text.contains("checksum"), "{text}");
    assert!(text.contains(fp[0]), "{text}");
    drop(c);
    s.stop();
    // On disk: the record holds no CRC32C of the value (as postcard stored it, a varint).
    let db = ward_tests::open_stopped_db(s.data_dir());
    let record = db
        .open_tree("secrets")
        .unwrap()
        .get("fp/pin")
        .unwrap()
        .unwrap();
    let crc = varint(u64::from(ward_tests::crc32c(pin)));
    assert!(
        !record.windows(crc.len()).any(|w| w == crc.as_slice()),
        "the stored record holds the value's CRC32C"
    );
}
