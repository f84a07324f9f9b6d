//! The audit log end to end: one record per call with the right fields and no secrets in it,
//! tampering found where it happened, forged chains caught at the HSM-signed checkpoint, stream
//! resume, a stalled consumer that does not stall the vault, and audit storage that fails
//! (calls fail closed) and comes back.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tonic::Code;
use ward_tests::{ok, pb, segments, AuditClient, TestServer, Tmpfs};

use crate::{assert_code, assert_value, fetch, put, put_req};

/// Every record of the log, in order, as `admin` sees them (the reading call adds its own).
pub(crate) async fn all_records(a: &mut AuditClient) -> Vec<pb::AuditRecord> {
    read_stream(a, stream_req(0, false), usize::MAX).await.0
}

fn stream_req(from_seq: u64, follow: bool) -> pb::StreamAuditRequest {
    pb::StreamAuditRequest {
        from_seq,
        follow,
        ..Default::default()
    }
}

/// Reads up to `max` records (and any gaps) from a stream opened with `req`.
pub(crate) async fn read_stream(
    a: &mut AuditClient,
    req: pb::StreamAuditRequest,
    max: usize,
) -> (Vec<pb::AuditRecord>, Vec<pb::AuditGap>) {
    let mut s = ok(a.stream_audit(req).await, "StreamAudit");
    let (mut records, mut gaps) = (Vec::new(), Vec::new());
    while records.len() < max {
        let next = tokio::time::timeout(Duration::from_secs(20), s.message())
            .await
            .expect("no stream message within 20 s");
        match next.expect("stream failed") {
            None => break,
            Some(m) => match m.item {
                Some(pb::stream_audit_response::Item::Record(r)) => records.push(r),
                Some(pb::stream_audit_response::Item::Gap(g)) => gaps.push(g),
                None => panic!("empty stream item"),
            },
        }
    }
    (records, gaps)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn time_ms(r: &pb::AuditRecord) -> u64 {
    let t = r.time.as_ref().expect("record without time");
    t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_kind_allowed_and_denied_leaves_exactly_one_record_without_secrets() {
    let s = TestServer::start();
    let started = now_ms();
    let mut admin = s.raw_client("admin").await;
    let mut app = s.raw_client("app").await;
    let mallory_files = s.issue_dev_cert("mallory", None);
    let mut mallory = s.raw_client_with(&mallory_files).await.unwrap();
    let mut audit_admin = s.audit_client("admin").await;
    let mut audit_app = s.audit_client("app").await;

    let value = format!("AUDIT-CANARY-{}", ward_tests::random_hex(32));
    // Allowed, as admin.
    let mut req = put_req("aud/db", value.as_bytes());
    req.request_id = "rid-put-1".into();
    let put = ok(admin.put_secret(req).await, "put");
    let issued = ok(
        admin
            .issue_key(pb::IssueKeyRequest {
                name: "aud/key".into(),
                environment: "prod".into(),
                ..Default::default()
            })
            .await,
        "issue",
    );
    assert_value(&mut admin, "aud/db", 0, value.as_bytes()).await;
    let batch = ok(
        admin
            .batch_fetch_secrets(pb::BatchFetchSecretsRequest {
                items: vec![
                    pb::FetchSecretRequest {
                        name: "aud/db".into(),
                        version: 1,
                    },
                    pb::FetchSecretRequest {
                        name: "aud/missing".into(),
                        version: 0,
                    },
                ],
            })
            .await,
        "batch",
    );
    assert_eq!(batch.results.len(), 2);
    let described = crate::describe(&mut admin, "aud/db").await.unwrap();
    ok(
        admin
            .list_secrets(pb::ListSecretsRequest {
                name_prefix: "aud/".into(),
                ..Default::default()
            })
            .await,
        "list",
    );
    let verified = ok(
        audit_admin
            .verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await,
        "verify",
    );
    assert!(verified.ok, "{verified:?}");

    // Denied: app may only read and verify; mallory may do nothing.
    assert_code(
        app.put_secret(put_req("aud/db", b"x")).await,
        Code::PermissionDenied,
        "app put",
    );
    assert_code(
        app.issue_key(pb::IssueKeyRequest {
            name: "aud/app-key".into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "app issue",
    );
    assert_code(
        fetch(&mut mallory, "aud/db", 0).await,
        Code::PermissionDenied,
        "mallory fetch",
    );
    let denied_batch = ok(
        mallory
            .batch_fetch_secrets(pb::BatchFetchSecretsRequest {
                items: vec![pb::FetchSecretRequest {
                    name: "aud/db".into(),
                    version: 0,
                }],
            })
            .await,
        "mallory batch",
    );
    assert!(matches!(
        &denied_batch.results[0].result,
        Some(pb::batch_fetch_result::Result::Error(e)) if e.code == Code::PermissionDenied as i32
    ));
    assert_code(
        crate::describe(&mut app, "aud/db").await,
        Code::PermissionDenied,
        "app describe",
    );
    assert_code(
        app.list_secrets(pb::ListSecretsRequest::default()).await,
        Code::PermissionDenied,
        "app list",
    );
    assert_code(
        audit_app
            .verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await,
        Code::PermissionDenied,
        "app verify",
    );
    assert_code(
        audit_app.stream_audit(stream_req(0, false)).await,
        Code::PermissionDenied,
        "app stream",
    );

    // The usage facts saw the reads.
    let used = described.versions[0]
        .last_read_time
        .as_ref()
        .map(|t| t.seconds);
    assert!(
        used.is_some(),
        "DescribeSecret shows no last use: {described:?}"
    );

    let records = all_records(&mut audit_admin).await;
    let count = |method: &str, identity: &str, target: Option<&str>, code: Code| {
        records
            .iter()
            .filter(|r| {
                r.method == method
                    && r.identity == identity
                    && r.code == code as i32
                    && match target {
                        Some(t) => r.targets.iter().any(|x| x.name == t),
                        None => r.targets.is_empty(),
                    }
            })
            .count()
    };
    let expected: &[(&str, &str, Option<&str>, Code)] = &[
        ("PutSecret", "admin", Some("aud/db"), Code::Ok),
        ("IssueKey", "admin", Some("aud/key"), Code::Ok),
        ("FetchSecret", "admin", Some("aud/db"), Code::Ok),
        ("BatchFetchSecrets", "admin", Some("aud/missing"), Code::Ok),
        ("DescribeSecret", "admin", Some("aud/db"), Code::Ok),
        ("ListSecrets", "admin", None, Code::Ok),
        ("VerifyAuditLog", "admin", None, Code::Ok),
        ("StreamAudit", "admin", None, Code::Ok),
        ("PutSecret", "app", Some("aud/db"), Code::PermissionDenied),
        (
            "IssueKey",
            "app",
            Some("aud/app-key"),
            Code::PermissionDenied,
        ),
        (
            "FetchSecret",
            "mallory",
            Some("aud/db"),
            Code::PermissionDenied,
        ),
        // A batch answers per item: the call is OK, the item is denied (checked below).
        ("BatchFetchSecrets", "mallory", Some("aud/db"), Code::Ok),
        (
            "DescribeSecret",
            "app",
            Some("aud/db"),
            Code::PermissionDenied,
        ),
        ("ListSecrets", "app", None, Code::PermissionDenied),
        ("VerifyAuditLog", "app", None, Code::PermissionDenied),
        ("StreamAudit", "app", None, Code::PermissionDenied),
    ];
    for (method, identity, target, code) in expected {
        assert_eq!(
            count(method, identity, *target, *code),
            1,
            "records for {method} by {identity} on {target:?} with {code:?}:\n{records:#?}"
        );
    }
    // Nothing else: every record is one of the calls above (the log starts empty).
    let calls: Vec<&pb::AuditRecord> = records
        .iter()
        .filter(|r| r.kind == pb::AuditRecordKind::Call as i32)
        .collect();
    assert_eq!(calls.len(), expected.len(), "{calls:#?}");

    // The fields.
    let find = |method: &str, identity: &str| {
        calls
            .iter()
            .find(|r| r.method == method && r.identity == identity)
            .unwrap()
    };
    for r in &calls {
        let peer: SocketAddr = r
            .peer
            .parse()
            .unwrap_or_else(|_| panic!("peer {:?}", r.peer));
        assert!(peer.ip().is_loopback(), "{r:?}");
        assert!(time_ms(r) >= started && time_ms(r) <= now_ms(), "{r:?}");
        assert_eq!(r.hash.len(), 32);
        assert!(!r.code_name.is_empty());
    }
    let p = find("PutSecret", "admin");
    assert_eq!(p.request_id, "rid-put-1");
    assert_eq!(
        (p.targets[0].name.as_str(), p.targets[0].version),
        ("aud/db", put.version)
    );
    assert_eq!(find("IssueKey", "admin").key_id, issued.key_id);
    assert!(!issued.key_id.is_empty());
    let f = find("FetchSecret", "admin");
    assert_eq!((f.targets[0].version, f.code_name.as_str()), (1, "OK"));
    let b = find("BatchFetchSecrets", "admin");
    let items: Vec<(&str, u64, i32)> = b
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t.version, t.code))
        .collect();
    assert_eq!(
        items,
        [("aud/db", 1, 0), ("aud/missing", 0, Code::NotFound as i32)]
    );
    let mb = find("BatchFetchSecrets", "mallory");
    assert_eq!(mb.targets[0].code, Code::PermissionDenied as i32);
    assert_eq!(find("PutSecret", "app").code_name, "PERMISSION_DENIED");
    // The chain links.
    for pair in records.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }

    // No record holds the value or the API key, on the wire or on disk.
    let key = issued.api_key.clone();
    let body = key[key.len() - ward::keyformat::BODY_LEN..].to_owned();
    let needles = [value.as_str(), key.as_str(), body.as_str()];
    for r in &records {
        let shown = format!("{r:?}");
        for n in needles {
            assert!(
                !shown.contains(n),
                "record {} holds a secret: {shown}",
                r.seq
            );
        }
    }
    drop((admin, app, mallory, audit_admin, audit_app));
    let mut s = s;
    s.stop();
    let dir = segments::audit_dir(s.data_dir());
    let on_disk = segments::records(&dir);
    assert!(on_disk.len() >= records.len());
    for seg in segments::read_all(&dir) {
        let bytes = std::fs::read(&seg.path).unwrap();
        for n in needles {
            assert!(!bytes.windows(n.len()).any(|w| w == n.as_bytes()));
        }
    }
}

// ---- the documented encoding, re-implemented from docs/security.md for the tamper tests ---------

/// A stored record, parsed per the documented format 2.
#[derive(Debug, Clone)]
struct Raw {
    seq: u64,
    prev_hash: [u8; 32],
    kind: u8,
    identity: String,
    /// Everything between `identity` and the end of the common fields, verbatim.
    middle: Vec<u8>,
    /// The kind-specific tail, verbatim unless rewritten.
    tail: Vec<u8>,
    time_ms: u64,
}

struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        h
    }
    fn u32(&mut self) -> usize {
        u32::from_be_bytes(self.take(4).try_into().unwrap()) as usize
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().unwrap())
    }
    fn str(&mut self) -> &'a [u8] {
        let n = self.u32();
        self.take(n)
    }
}

fn parse(stored: &[u8]) -> Raw {
    let body = &stored[..stored.len() - 32];
    assert_eq!(body[0], 2, "format");
    let mut c = Cur(&body[1..]);
    let seq = c.u64();
    let time_ms = c.u64();
    let prev_hash: [u8; 32] = c.take(32).try_into().unwrap();
    let kind = c.take(1)[0];
    let identity = String::from_utf8(c.str().to_vec()).unwrap();
    let middle_start = c.0;
    c.str(); // peer
    c.str(); // method
    for _ in 0..c.u32() {
        c.str();
        c.u64();
    }
    let codes = c.u32();
    c.take(4 * codes);
    c.take(4); // code
    c.str(); // request_id
    c.str(); // key_id
    let middle = middle_start[..middle_start.len() - c.0.len()].to_vec();
    Raw {
        seq,
        prev_hash,
        kind,
        identity,
        middle,
        tail: c.0.to_vec(),
        time_ms,
    }
}

fn encode(r: &Raw) -> (Vec<u8>, [u8; 32]) {
    let mut b = vec![2u8];
    b.extend_from_slice(&r.seq.to_be_bytes());
    b.extend_from_slice(&r.time_ms.to_be_bytes());
    b.extend_from_slice(&r.prev_hash);
    b.push(r.kind);
    b.extend_from_slice(&(r.identity.len() as u32).to_be_bytes());
    b.extend_from_slice(r.identity.as_bytes());
    b.extend_from_slice(&r.middle);
    b.extend_from_slice(&r.tail);
    let hash: [u8; 32] = Sha256::digest(&b).into();
    b.extend_from_slice(&hash);
    (b, hash)
}

/// Size of the segment the tamper tests write (the whole log fits).
const SEGMENT: usize = 1 << 20;

/// The records of a stopped server's audit log, by sequence number.
fn log_of(s: &TestServer) -> BTreeMap<u64, Vec<u8>> {
    segments::records(&segments::audit_dir(s.data_dir()))
        .into_iter()
        .collect()
}

/// Writes `records` back as the stopped server's audit log.
fn write_log(s: &TestServer, records: &BTreeMap<u64, Vec<u8>>) {
    let list: Vec<(u64, Vec<u8>)> = records.iter().map(|(k, v)| (*k, v.clone())).collect();
    segments::rewrite(&segments::audit_dir(s.data_dir()), &list, SEGMENT);
}

/// Removes the store's note of the newest checkpoint, as an attacker who rewrites the log's
/// checkpoints must (otherwise the server refuses to start: see the marks test).
fn drop_checkpoint_mark(s: &TestServer) {
    let db = ward_tests::open_stopped_db(s.data_dir());
    db.open_tree("meta")
        .unwrap()
        .remove("audit_checkpoint")
        .unwrap();
    db.flush().unwrap();
}

/// Asserts that VerifyAuditLog (through the SDK) finds the whole log intact.
pub(crate) async fn assert_verifies(s: &TestServer, what: &str) {
    let v = s
        .client("admin")
        .await
        .verify_audit_log(0, 0)
        .await
        .unwrap();
    assert!(v.ok, "{what}: {v:?}");
}

/// Asserts that VerifyAuditLog (through the SDK) finds `problem` first at `seq`.
async fn assert_broken_at(s: &TestServer, seq: u64, problem: pb::AuditProblem, what: &str) {
    let v = s
        .client("admin")
        .await
        .verify_audit_log(0, 0)
        .await
        .unwrap();
    let b = v
        .first_broken
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: the log verified: {v:?}"));
    assert_eq!(
        (b.seq, b.problem),
        (seq, problem as i32),
        "{what}: {}",
        b.reason
    );
    assert!(!v.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_one_stored_record_is_reported_at_that_record() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    for i in 0..8 {
        put(&mut c, &format!("tamper/{i}"), b"v").await;
    }
    let records = all_records(&mut s.audit_client("admin").await).await;
    let k = records
        .iter()
        .find(|r| r.method == "PutSecret" && r.targets[0].name == "tamper/4")
        .unwrap()
        .seq;
    drop(c);

    for case in ["edit", "delete", "reorder"] {
        s.stop();
        let mut log = log_of(&s);
        let original: Vec<(u64, Vec<u8>)> = [k, k + 1]
            .iter()
            .map(|seq| (*seq, log[seq].clone()))
            .collect();
        match case {
            "edit" => {
                let v = log.get_mut(&k).unwrap();
                let at = v.windows(8).position(|w| w == b"tamper/4").unwrap();
                v[at..at + 8].copy_from_slice(b"tamper/x");
            }
            "delete" => {
                log.remove(&k);
            }
            _ => {
                log.insert(k, original[1].1.clone());
                log.insert(k + 1, original[0].1.clone());
            }
        }
        write_log(&s, &log);
        s.restart();
        let problem = match case {
            "edit" => pb::AuditProblem::Altered,
            "delete" => pb::AuditProblem::Missing,
            _ => pb::AuditProblem::Misplaced,
        };
        assert_broken_at(&s, k, problem, case).await;
        if case == "edit" {
            // The operator tools say the same.
            let o = s.wardctl(&["audit", "verify"], None);
            assert_eq!(
                o.status.code(),
                Some(1),
                "wardctl audit verify on a broken log"
            );
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                out.starts_with(&format!("BROKEN at record {k} (ALTERED)")),
                "{out}"
            );
            let o = s.grpcurl(&["-d", "{}"], &["ward.v1.Audit/VerifyAuditLog"]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["firstBroken"]["seq"], k.to_string(), "{v}");
            assert_eq!(v["firstBroken"]["problem"], "AUDIT_PROBLEM_ALTERED", "{v}");
            assert!(
                v.get("ok").is_none(),
                "ok is false (proto3 JSON omits it): {v}"
            );
        }
        // Put the original records back for the next case (keeping what was added since).
        s.stop();
        let mut log = log_of(&s);
        log.extend(original.iter().cloned());
        write_log(&s, &log);
        s.restart();
        assert_verifies(&s, &format!("{case}: the restored log")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_rechained_log_fails_at_the_hsm_signed_checkpoint() {
    let mut s = TestServer::start();
    s.append_config("[audit]\ncheckpoint_every = 5");
    s.restart();
    let mut c = s.raw_client("admin").await;
    for i in 0..12 {
        put(&mut c, &format!("forge/{i}"), b"v").await;
    }
    drop(c);
    let mut a = s.audit_client("admin").await;
    // Checkpointing runs in the background: wait until one signs past the record we forge.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (k, cp) = loop {
        let records = all_records(&mut a).await;
        let k = records
            .iter()
            .find(|r| r.method == "PutSecret" && r.targets[0].name == "forge/3")
            .unwrap()
            .seq;
        let cp = records.iter().find(|r| {
            r.kind == pb::AuditRecordKind::Checkpoint as i32 && r.checkpoint_covers_seq >= k
        });
        if let Some(cp) = cp {
            break (k, cp.seq);
        }
        assert!(Instant::now() < deadline, "no checkpoint after record {k}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(a);
    s.stop();

    // The attacker can write the database but not use the HSM: rewrite record k, then
    // re-chain every record after it, including the hash each checkpoint claims to sign.
    {
        let mut log = log_of(&s);
        let last = *log.keys().last().unwrap();
        let mut rewritten: HashMap<u64, [u8; 32]> = HashMap::new();
        let mut prev = None;
        for seq in k..=last {
            let mut r = parse(&log[&seq]);
            if seq == k {
                r.identity = "somebody-else".into();
            } else {
                r.prev_hash = prev.unwrap();
            }
            if r.kind == 1 {
                // Checkpoint tail: u64 covers_seq, [32] covers_hash, ...
                let covers = u64::from_be_bytes(r.tail[..8].try_into().unwrap());
                if let Some(h) = rewritten.get(&covers) {
                    r.tail[8..40].copy_from_slice(h);
                }
            }
            let (stored, hash) = encode(&r);
            log.insert(seq, stored);
            rewritten.insert(seq, hash);
            prev = Some(hash);
        }
        write_log(&s, &log);
        drop_checkpoint_mark(&s);
    }
    s.restart();
    // Every link holds; the first checkpoint after the forgery does not.
    assert_broken_at(&s, cp, pb::AuditProblem::CheckpointForged, "forged chain").await;
    let v = s
        .client("admin")
        .await
        .verify_audit_log(1, cp - 1)
        .await
        .unwrap();
    assert!(v.ok, "the re-chained records themselves link up: {v:?}");
}

/// The downgrade: whoever can write the database turns every record up to the last checkpoint
/// into the old unchained format (once accepted as "legacy", unverified) and lays a forged tail
/// over the rest, chained afresh from genesis. Verification must not accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_rechained_from_genesis_behind_legacy_records_fails_verification() {
    let mut s = TestServer::start();
    s.append_config("[audit]\ncheckpoint_every = 5");
    s.restart();
    let mut c = s.raw_client("admin").await;
    for i in 0..12 {
        put(&mut c, &format!("downgrade/{i}"), b"v").await;
    }
    drop(c);
    let mut a = s.audit_client("admin").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let cp = loop {
        let records = all_records(&mut a).await;
        let cp = records
            .iter()
            .filter(|r| r.kind == pb::AuditRecordKind::Checkpoint as i32)
            .map(|r| r.seq)
            .max();
        if let Some(cp) = cp {
            break cp;
        }
        assert!(Instant::now() < deadline, "no checkpoint was written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(a);
    s.stop();
    {
        let mut log = log_of(&s);
        let last = *log.keys().last().unwrap();
        assert!(last > cp, "no record after the last checkpoint");
        for seq in 1..=cp {
            log.insert(seq, vec![1u8, 0, 0, 0]);
        }
        let mut prev = [0u8; 32];
        for seq in cp + 1..=last {
            let mut r = parse(&log[&seq]);
            r.identity = "somebody-else".into();
            r.prev_hash = prev;
            let (stored, hash) = encode(&r);
            log.insert(seq, stored);
            prev = hash;
        }
        write_log(&s, &log);
        drop_checkpoint_mark(&s);
    }
    s.restart();
    assert_broken_at(&s, 1, pb::AuditProblem::Undecodable, "downgraded start").await;
    // Checked from the forged tail only, the link into it fails.
    let v = s
        .client("admin")
        .await
        .verify_audit_log(cp + 1, 0)
        .await
        .unwrap();
    let b = v.first_broken.expect("the forged tail verified on its own");
    assert_eq!(b.seq, cp, "{}", b.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_after_a_disconnect_without_gaps_or_duplicates() {
    let s = TestServer::start();
    let client = s.client("admin").await;
    let mut c = s.raw_client("admin").await;
    for i in 0..10 {
        put(&mut c, &format!("resume/{i}"), b"v").await;
    }
    // Read k records, then disconnect mid-stream.
    let k = 6;
    let mut stream = client.stream_audit(stream_req(0, true)).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < k {
        match stream.message().await.unwrap().unwrap().item {
            Some(pb::stream_audit_response::Item::Record(r)) => seen.push(r.seq),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(stream);
    assert_eq!(seen, (1..=k as u64).collect::<Vec<_>>());
    for i in 10..15 {
        put(&mut c, &format!("resume/{i}"), b"v").await;
    }

    // Resume from k + 1 and follow: the backlog, then live records, each once.
    let mut stream = client
        .stream_audit(stream_req(k as u64 + 1, true))
        .await
        .unwrap();
    let live = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 15..18 {
            put(&mut c, &format!("resume/{i}"), b"v").await;
        }
    });
    let mut after = Vec::new();
    let mut live_puts = 0;
    while live_puts < 3 {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("live record did not arrive")
            .unwrap()
            .unwrap();
        if let Some(pb::stream_audit_response::Item::Record(r)) = m.item {
            if r.method == "PutSecret"
                && ["resume/15", "resume/16", "resume/17"].contains(&r.targets[0].name.as_str())
            {
                live_puts += 1;
            }
            after.push(r.seq);
        }
    }
    live.await.unwrap();
    let first = k as u64 + 1;
    assert_eq!(
        after,
        (first..first + after.len() as u64).collect::<Vec<_>>(),
        "every record after {k} exactly once"
    );
    // 15 puts, the two StreamAudit calls, and nothing more before the last live put.
    assert_eq!(*after.last().unwrap(), 20);

    // A resume point past the end is refused; one at the end waits for what comes next.
    assert_code(
        s.audit_client("admin")
            .await
            .stream_audit(stream_req(1000, false))
            .await,
        Code::OutOfRange,
        "resume beyond the end",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_does_not_stall_fetches() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    put(&mut c, "stall/db", b"value").await;

    // Four followers read one record each, then stop reading.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut a = s.audit_client("admin").await;
        let mut st = ok(a.stream_audit(stream_req(0, true)).await, "stream");
        assert!(st.message().await.unwrap().is_some());
        stalled.push((a, st));
    }

    // Far more records than an HTTP/2 window holds (~150 bytes each against 64 KiB).
    const FETCHES: usize = 1200;
    const WORKERS: usize = 8;
    let client = Arc::new(s.client("admin").await);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..FETCHES / WORKERS {
                let f = client.fetch_secret("stall/db", 0).await.unwrap();
                assert_eq!(f.value, b"value", "worker {w}");
            }
        }));
    }
    let all = futures::future::join_all(tasks);
    let done = tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("fetches stalled behind consumers that stopped reading");
    for d in done {
        d.unwrap();
    }
    let elapsed = t0.elapsed();
    eprintln!(
        "{FETCHES} fetches with 4 stalled audit streams: {:.1?} ({:.0}/s)",
        elapsed,
        FETCHES as f64 / elapsed.as_secs_f64()
    );

    // A stalled consumer that reads again gets everything it missed, in order.
    let (_a, mut st) = stalled.pop().unwrap();
    let head = s
        .client("admin")
        .await
        .verify_audit_log(0, 0)
        .await
        .unwrap()
        .head_seq;
    let mut expected = 2;
    while expected <= head {
        match st.message().await.unwrap().unwrap().item {
            Some(pb::stream_audit_response::Item::Record(r)) => {
                assert_eq!(r.seq, expected);
                expected += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Fills the filesystem of `dir` with a file until it is full; returns the file.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&chunk[..512]).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_disk_fails_fetches_closed_and_the_server_recovers() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    put(&mut c, "full/db", b"full-disk-value").await;
    drop(c);
    s.stop();

    // Small audit segments (the log rewritten into one, and new ones that size), so that the
    // data directory fits a small disk and a new segment is needed soon.
    let audit = segments::audit_dir(s.data_dir());
    segments::rewrite(&audit, &segments::records(&audit), 256 * 1024);
    s.append_config("[audit]\nsegment_bytes = 262144");

    // Move the store onto a small tmpfs of its own.
    let mnt_dir = tempfile::Builder::new()
        .prefix("ward-e2e-tmpfs-")
        .tempdir()
        .unwrap();
    let _mount = match Tmpfs::mount(mnt_dir.path(), "4m") {
        Ok(m) => m,
        // The same paths without mount: the injected-fault test below.
        Err(why) => {
            return ward_tests::skip_or_fail(
                "a_full_audit_disk_fails_fetches_closed_and_the_server_recovers",
                &format!("cannot mount a tmpfs ({why})"),
            )
        }
    };
    let data = mnt_dir.path().join("data");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(s.data_dir().join("data"))
        .arg(&data)
        .status()
        .unwrap();
    assert!(cp.success());
    let config = std::fs::read_to_string(s.config_path()).unwrap();
    let config = config.replace(
        "data_dir = \"data\"",
        &format!("data_dir = \"{}\"", data.display()),
    );
    std::fs::write(s.config_path(), config).unwrap();
    // This test is about sled's I/O errors and the store reopening after them, so the
    // free-space guard (which would refuse writes on a 4 MiB disk from the start) is off.
    s.set_limit("min_free_bytes", "0");
    s.restart();
    // sled writes into space it already holds for a while; the first write that needs more
    // fails, and from then on every call that must be audited fails closed.
    let filler = fetches_fail_closed_on_a_full_disk(&mut s, |_| fill(mnt_dir.path())).await;
    fetches_resume_once_space_returns(&mut s, |_| std::fs::remove_file(&filler).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_write_error_fails_fetches_closed_and_the_server_recovers() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    put(&mut c, "full/db", b"full-disk-value").await;
    drop(c);
    // The store fails its next write as sled does on a full disk (see store/fault.rs).
    s.restart_with_faults();
    fetches_fail_closed_on_a_full_disk(&mut s, |s| s.inject_faults("audit-write")).await;
    fetches_resume_once_space_returns(&mut s, |s| s.inject_faults("")).await;
}

/// With the server up and serving "full/db", fills the disk with `fill` and fetches until one
/// is refused: it fails UNAVAILABLE without showing the value, and so do the fetches and the
/// put after it; the server stays up. Returns what `fill` returned.
async fn fetches_fail_closed_on_a_full_disk<T>(
    s: &mut TestServer,
    fill: impl FnOnce(&TestServer) -> T,
) -> T {
    let mut c = s.raw_client("admin").await;
    assert_value(&mut c, "full/db", 0, b"full-disk-value").await;
    let filled = fill(s);
    let mut failed_at = None;
    for i in 0..2000 {
        match fetch(&mut c, "full/db", 0).await {
            Ok(f) => assert_eq!(f.value, b"full-disk-value"),
            Err(st) => {
                assert_eq!(st.code(), Code::Unavailable, "{}", st.message());
                assert!(!st.message().contains("full-disk-value"));
                failed_at = Some(i);
                break;
            }
        }
    }
    let failed_at = failed_at.expect("fetches kept succeeding on a full disk");
    eprintln!("first fetch refused after {failed_at} fetches on the full disk");
    for _ in 0..5 {
        assert_code(
            fetch(&mut c, "full/db", 0).await,
            Code::Unavailable,
            "fetch on a full disk",
        );
    }
    assert_code(
        c.put_secret(put_req("full/other", b"x")).await,
        Code::Unavailable,
        "put on a full disk",
    );
    assert!(s.is_running(), "the server died on a full disk");
    filled
}

/// Frees the disk with `free`: the store reopens, fetches and puts succeed again, and the audit
/// chain verifies (nothing acknowledged lost, nothing unacknowledged linked in).
async fn fetches_resume_once_space_returns(s: &mut TestServer, free: impl FnOnce(&TestServer)) {
    let mut c = s.raw_client("admin").await;
    free(s);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fetch(&mut c, "full/db", 0).await {
            Ok(f) => {
                assert_eq!(f.value, b"full-disk-value");
                break;
            }
            Err(st) => assert_eq!(st.code(), Code::Unavailable, "{}", st.message()),
        }
        assert!(
            Instant::now() < deadline,
            "no recovery 30 s after space returned\n{}",
            s.stderr_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    put(&mut c, "full/after", b"ok").await;
    assert!(
        s.all_output()
            .contains("audit log reopened after a failure"),
        "recovered without reopening the audit log?\n{}",
        s.stderr_tail(30)
    );
    assert_verifies(s, "after recovering").await;
    drop(c);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wardctl_and_grpcurl_read_the_log() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    put(&mut c, "cli/a", b"v").await;
    put(&mut c, "cli/b", b"v").await;
    let _ = fetch(&mut c, "cli/missing", 0).await;

    // One line per record.
    let o = s.wardctl(&["audit", "tail", "--last", "3"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("2 ")
            && lines[0].contains(" admin ")
            && lines[0].contains(" PutSecret cli/b@1 OK"),
        "{out}"
    );
    assert!(
        lines[1].contains(" FetchSecret cli/missing@0 NOT_FOUND"),
        "{out}"
    );
    assert!(lines[2].contains(" StreamAudit - OK"), "{out}");

    // Filters, JSON lines.
    let o = s.wardctl(
        &[
            "--json",
            "audit",
            "tail",
            "--from",
            "0",
            "--method",
            "PutSecret",
            "--prefix",
            "cli/",
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["targets"][0]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cli/a", "cli/b"]);
    assert_eq!(rows[0]["seq"], 1);
    assert_eq!(rows[1]["prev_hash"], rows[0]["hash"]);
    let o = s.wardctl(
        &[
            "audit",
            "tail",
            "--outcome",
            "PERMISSION_DENIED",
            "--from",
            "0",
        ],
        None,
    );
    assert!(
        o.status.success() && o.stdout.is_empty(),
        "a filter matching nothing"
    );
    let o = s.wardctl(&["audit", "tail", "--outcome", "SOMETIMES"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("INVALID_ARGUMENT"));

    // --follow prints records as they happen.
    let files = s.identity_files("admin");
    let mut follower = s
        .wardctl_command()
        .arg("--addr")
        .arg(s.addr().to_string())
        .args(["--ca"])
        .arg(&files.ca)
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .args([
            "audit",
            "tail",
            "-f",
            "--last",
            "0",
            "--method",
            "PutSecret",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    // `--last 0` starts at the oldest: the two puts so far, then the live one.
    let mut got = Vec::new();
    let mut live_put = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 3 {
        if got.len() == 2 && !live_put {
            put(&mut c, "cli/live", b"v").await;
            live_put = true;
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => got.push(line),
            Err(_) => assert!(Instant::now() < deadline, "follower printed {got:?}"),
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(got[2].contains(" PutSecret cli/live@1 OK"), "{got:?}");

    // grpcurl: the service is listed and streams as JSON objects.
    let o = s.grpcurl(&[], &["describe", "ward.v1.Audit"]);
    assert!(o.status.success());
    let o = s.grpcurl(
        &["-d", r#"{"fromSeq":"1","method":"PutSecret"}"#],
        &["ward.v1.Audit/StreamAudit"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        text.matches("\"method\": \"PutSecret\"").count(),
        3,
        "{text}"
    );
    let o = s.grpcurl(
        &["-d", r#"{"fromSeq":"100000"}"#],
        &["ward.v1.Audit/StreamAudit"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("OutOfRange"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Rewrites the stopped server's log into one segment of [`SMALL_SEGMENT`] bytes and has new
/// segments made that size (with `more` lines for the `[audit]` table), so that a test can
/// span several segments with a few thousand records.
fn small_segments(s: &mut TestServer, more: &str) {
    s.stop();
    let dir = segments::audit_dir(s.data_dir());
    segments::rewrite(&dir, &segments::records(&dir), SMALL_SEGMENT as usize);
    s.append_config(&format!("[audit]\nsegment_bytes = {SMALL_SEGMENT}\n{more}"));
    s.restart();
}

/// The smallest segment the server allows.
const SMALL_SEGMENT: u64 = 256 * 1024;

/// Fetches `name` `n` times, four callers at once.
async fn fetch_many(s: &TestServer, name: &str, n: usize) {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = s.raw_client("admin").await;
        let name = name.to_owned();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 4 {
                fetch(&mut c, &name, 0).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_whole_segments_to_a_signed_record_and_tells_a_late_reader() {
    let mut s = TestServer::start();
    small_segments(
        &mut s,
        "retention = \"1s\"\nprune_interval = \"200ms\"\ncheckpoint_interval = \"100ms\"",
    );
    let mut c = s.raw_client("admin").await;
    for i in 0..5 {
        put(&mut c, &format!("old/{i}"), b"v").await;
    }
    // Enough records for several segments: retention deletes whole ones.
    fetch_many(&s, "old/0", 4000).await;
    let client = s.client("admin").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let v = client.verify_audit_log(0, 0).await.unwrap();
        if v.oldest_seq > 1 {
            break v;
        }
        assert!(Instant::now() < deadline, "nothing pruned: {v:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(v.ok, "a pruned log must still verify: {v:?}");
    let (records, gaps) = read_stream(
        &mut s.audit_client("admin").await,
        stream_req(1, false),
        usize::MAX,
    )
    .await;
    assert!(gaps[0].pruned && gaps[0].from_seq == 1, "{gaps:?}");
    assert_eq!(records[0].seq, gaps[0].to_seq + 1);
    assert!(records
        .iter()
        .any(|r| r.kind == pb::AuditRecordKind::Prune as i32 && r.pruned_below_seq > 1));
    // Secrets are not the log: they stay.
    assert_value(&mut c, "old/0", 0, b"v").await;
    // Whole segments went: the log starts where its first remaining file does.
    let files = segments::read_all(&segments::audit_dir(s.data_dir()));
    assert_eq!(files[0].first, v.oldest_seq, "{} files", files.len());
    // A reader from the oldest record on crosses the segment boundaries without a gap.
    let (records, gaps) = read_stream(
        &mut s.audit_client("admin").await,
        stream_req(v.oldest_seq, false),
        usize::MAX,
    )
    .await;
    assert!(gaps.is_empty(), "{gaps:?}");
    for pair in records.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_the_audit_key_fails_until_init_creates_it() {
    let mut s = TestServer::start();
    s.stop();
    s.append_config("[audit]\ncheckpoint_key_label = \"ward-audit-other\"");
    let f = s.serve_expect_failure(&s.config_path(), &[]);
    assert_eq!(f.code, Some(3), "{}", f.stderr);
    assert!(
        f.stderr.contains("ward-audit-other") && f.stderr.contains("init"),
        "{}",
        f.stderr
    );
    let mut init = Command::new(ward_tests::server_bin());
    init.args(["init", "--config"]).arg(s.config_path());
    let o = ward_tests::run_tool(init, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("created audit checkpoint key \"ward-audit-other\""));
    s.restart();
    let v = s
        .client("admin")
        .await
        .verify_audit_log(0, 0)
        .await
        .unwrap();
    assert!(v.ok);
}
