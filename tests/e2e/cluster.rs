//! Ward replicas on a real etcd cluster: a put on one replica is fetched on another, a key
//! revoked on one is refused on another. And the harness itself: a 3-member etcd starts, keeps
//! taking writes while one member is killed with SIGKILL, and the member rejoins and catches
//! up on restart; mTLS with client-certificate auth; the NOSPACE alarm and the recovery
//! docs/cluster.md gives.

use std::time::{Duration, Instant};

use etcd_client::{AlarmType, Client, GetOptions};
use ward_tests::{crc32c, ok, pb, EtcdCluster, EtcdOptions, RawClient, WardCluster};

/// Puts `key` = `value`, retrying failed attempts for up to 15 s (the first call after a member
/// died may go to its closed connection; the crate moves on to a live one).
async fn put_retrying(c: &mut Client, key: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match c.put(key, value, None).await {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("put {key}: {e} (retrying)");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put {key} kept failing for 15 s: {e}"),
        }
    }
}

/// The value of `key` read through `c` (linearizable).
async fn value(c: &mut Client, key: &str) -> Option<String> {
    let r = c.get(key, None).await.expect("etcd get");
    r.kvs()
        .first()
        .map(|kv| kv.value_str().expect("utf-8 value").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_survive_a_killed_member_and_it_rejoins() {
    let mut etcd = EtcdCluster::start(3).await;
    assert_eq!(etcd.endpoints().len(), 3);
    let mut c = etcd.client().await;
    put_retrying(&mut c, "before", "1").await;

    // Kill the leader: the survivors elect another and go on taking writes.
    let leader = etcd.leader().await;
    etcd.kill9(leader);
    assert!(!etcd.is_running(leader));
    for i in 0..20 {
        put_retrying(&mut c, &format!("during/{i}"), &i.to_string()).await;
    }
    let survivor = (leader + 1) % 3;
    let mut s = etcd.member_client(survivor).await;
    assert_eq!(value(&mut s, "before").await.as_deref(), Some("1"));
    let during = s
        .get("during/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("etcd get prefix");
    assert_eq!(
        during.kvs().len(),
        20,
        "writes acknowledged while a member was down"
    );

    // Back on the same data dir and ports: a linearizable read through it alone sees what was
    // written while it was down.
    etcd.restart(leader).await;
    assert!(etcd.is_running(leader));
    let mut back = etcd.member_client(leader).await;
    assert_eq!(value(&mut back, "during/19").await.as_deref(), Some("19"));
    assert_eq!(value(&mut back, "before").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_drops_history() {
    let etcd = EtcdCluster::start(3).await;
    let mut c = etcd.client().await;
    c.put("k", "old", None).await.expect("put old");
    let old_rev = c
        .get("k", None)
        .await
        .expect("get")
        .kvs()
        .first()
        .expect("k")
        .mod_revision();
    c.put("k", "new", None).await.expect("put new");
    let at = etcd.compact_to_latest().await;
    assert!(
        at > old_rev,
        "compacted to {at}, before the old revision {old_rev}"
    );
    let err = c
        .get("k", Some(GetOptions::new().with_revision(old_rev)))
        .await
        .expect_err("a read of a compacted revision must fail");
    assert!(
        err.to_string().contains("compacted"),
        "unexpected error for a compacted revision: {err}"
    );
    assert_eq!(value(&mut c, "k").await.as_deref(), Some("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_members_refuse_a_client_without_a_certificate() {
    let etcd = EtcdCluster::start_mtls(3).await;
    assert!(etcd.endpoints().iter().all(|e| e.starts_with("https://")));
    let tls = etcd.client_tls().expect("mTLS cluster has client files");
    let mut c = etcd.client().await;
    c.put("tls", "yes", None).await.expect("put over mTLS");
    assert_eq!(value(&mut c, "tls").await.as_deref(), Some("yes"));

    // Trusting the CA but presenting no certificate: the handshake or the call is refused.
    let ca = std::fs::read(&tls.ca).unwrap();
    let anonymous = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5))
        .with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca))
                .domain_name("localhost"),
        );
    let refused = match Client::connect(etcd.endpoints(), Some(anonymous)).await {
        Ok(mut c) => c.get("tls", None).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate was served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_alarm_blocks_writes_until_compact_defrag_disarm() {
    let etcd = EtcdCluster::start_with(EtcdOptions {
        quota_backend_bytes: Some(4 << 20),
        ..EtcdOptions::default()
    })
    .await;
    let mut c = etcd.client().await;
    // Overwrite a few keys with 64 KiB values until the backend is full: the history keeps
    // every old version, so the quota is reached without many keys.
    let big = "x".repeat(64 << 10);
    let mut nospace = None;
    for i in 0..1000 {
        if let Err(e) = c.put(format!("fill/{}", i % 8), big.as_str(), None).await {
            nospace = Some(e.to_string());
            break;
        }
    }
    let err = nospace.expect("4 MiB quota never reached with 1000 puts of 64 KiB");
    assert!(
        err.contains("database space exceeded"),
        "unexpected error at the quota: {err}"
    );
    assert!(
        etcd.alarms().await.contains(&AlarmType::Nospace),
        "no NOSPACE alarm raised"
    );
    // Reads keep working while the alarm is raised; writes do not.
    let r = c.get("fill/0", None).await.expect("read under NOSPACE");
    assert_eq!(r.kvs().len(), 1);
    assert!(
        c.put("more", "1", None).await.is_err(),
        "write under NOSPACE"
    );

    etcd.recover_from_nospace().await;
    assert!(etcd.alarms().await.is_empty(), "alarms left after disarm");
    c.put("more", "1", None)
        .await
        .expect("write after recovery");
}

/// Polls `check` every 20 ms until it gives a value, for up to 30 s: a change made on one
/// replica reaches another through etcd's watch (how fast is ward-bench's to measure, not a
/// test's to assert).
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => panic!("{what}: not within 30 s: {last}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The PRIMARY of `name` on the replica `c` talks to, once it is `version`.
pub(crate) async fn primary_at(
    c: &RawClient,
    name: &str,
    version: u64,
) -> Result<pb::FetchSecretResponse, String> {
    match crate::fetch(&mut c.clone(), name, 0).await {
        Ok(f) if f.version == version => Ok(f),
        Ok(f) => Err(format!("version {}", f.version)),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_on_one_replica_is_fetched_on_another() {
    let etcd = EtcdCluster::start(3).await;
    let ward = WardCluster::start(&etcd, 2);
    let mut a = ward[0].raw_client("admin").await;
    let mut b = ward[1].raw_client("admin").await;
    let name = "shared/db-password";

    let put = crate::put(&mut a, name, b"written on A").await;
    let got = eventually("A's put fetched on B", || primary_at(&b, name, put.version)).await;
    assert_eq!(got.value, b"written on A");
    assert_eq!(got.checksum, crc32c(b"written on A"));

    // And back: B numbers its version after A's, and A serves it.
    let put2 = crate::put(&mut b, name, b"written on B").await;
    assert_eq!(put2.version, put.version + 1, "B numbers after A's version");
    let got = eventually("B's put fetched on A", || {
        primary_at(&a, name, put2.version)
    })
    .await;
    assert_eq!(got.value, b"written on B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_on_one_replica_is_refused_on_another() {
    // The replicas reach etcd over mTLS here (the put test above over plain http).
    let etcd = EtcdCluster::start_mtls(3).await;
    let ward = WardCluster::start(&etcd, 2);
    let mut a = ward[0].raw_client("admin").await;
    let b = ward[1].keys_client("admin").await;
    let issued = ok(
        a.issue_key(pb::IssueKeyRequest {
            name: "edge/partner".into(),
            ..Default::default()
        })
        .await,
        "issue on A",
    );
    let verify_on_b = |want: pb::VerifyResult| {
        let mut b = b.clone();
        let key = issued.api_key.clone();
        async move {
            let r = b
                .verify_key(pb::VerifyKeyRequest {
                    api_key: key,
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            if r.result() == want {
                Ok(r)
            } else {
                Err(format!("{:?}", r.result()))
            }
        }
    };
    let valid = eventually("A's key valid on B", || {
        verify_on_b(pb::VerifyResult::Valid)
    })
    .await;
    assert!(valid.valid);

    ok(
        a.revoke_secret(pb::RevokeSecretRequest {
            name: "edge/partner".into(),
            all_versions: true,
            reason: "partner offboarded".into(),
            ..Default::default()
        })
        .await,
        "revoke on A",
    );
    let revoked = eventually("A's revocation seen on B", || {
        verify_on_b(pb::VerifyResult::Revoked)
    })
    .await;
    assert!(!revoked.valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_one_replica_streams_changes_made_on_another() {
    let etcd = EtcdCluster::start(3).await;
    let ward = WardCluster::start(&etcd, 2);
    let mut a = ward[0].raw_client("admin").await;
    let mut b = ward[1].raw_client("admin").await;
    let mut watch = ok(
        b.watch_secrets(pb::WatchSecretsRequest {
            name_prefix: "watched/".into(),
            ..Default::default()
        })
        .await,
        "watch on B",
    );
    ward_tests::until_synced(&mut watch).await;

    let put = crate::put(&mut a, "watched/db", b"written on A").await;
    let event = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = ward_tests::next_event(&mut watch).await;
            if e.name == "watched/db" && e.version == put.version {
                return e;
            }
        }
    })
    .await
    .expect("B's watcher told of A's put within 30 s");
    assert_eq!(event.state(), pb::VersionState::Primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyring_term_added_on_one_replica_opens_values_on_another() {
    let etcd = EtcdCluster::start(3).await;
    let ward = WardCluster::start(&etcd, 2);
    let mut a = ward[0].raw_client("admin").await;
    let b = ward[1].raw_client("admin").await;
    let admin_a = ward[0].client("admin").await;
    let admin_b = ward[1].client("admin").await;

    admin_a.rotate_keyring().await.expect("rotate on A");
    // Sealed under the new term on A; B must load the term (an HSM unwrap) before it can
    // open it, and never answers with anything but the value or a retryable UNAVAILABLE.
    let put = crate::put(&mut a, "rotated/db", b"sealed under term 2").await;
    let got = eventually("A's value under the new term fetched on B", || {
        primary_at(&b, "rotated/db", put.version)
    })
    .await;
    assert_eq!(got.value, b"sealed under term 2");
    let ring = admin_b.describe_keyring().await.expect("describe on B");
    assert_eq!(
        ring.current_term, 2,
        "B seals new values under the new term too"
    );
}
