//! Faults under a Ward cluster on a real etcd (issue 14): an etcd member killed with SIGKILL
//! under a mixed load, a replica killed under load (failover of the SDK, the cluster's jobs
//! moving to a survivor), one quota spent from three replicas at once, etcd compacting past a
//! replica's watch while it was cut off, and etcd's NOSPACE alarm.
//!
//! Clients are the SDK (`ward_client`) with several endpoints, as an application runs it; the
//! generated client (no retries) where a test needs exact codes from one replica. Every wait
//! polls against a deadline; the figures (failures surfaced, resends, how long the leader took
//! to move, units admitted) are printed for the report, never asserted as times.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use tonic::Code;
use ward_client::{proto, Client, ClientConfig};
use ward_tests::{
    pb, ClusterOptions, EtcdCluster, EtcdOptions, RawClient, WardCluster, ETCD_PREFIX,
};

use crate::cluster::{eventually, primary_at};
use crate::{fetch, put, put_req};

/// The SDK's configuration for `identity` over the replicas `order` of `ward`, in that order
/// of preference, with a short failover backoff (a recovered replica is probed soon).
fn sdk_config(ward: &WardCluster, order: &[usize], identity: &str) -> ClientConfig {
    let first = &ward[order[0]];
    first
        .client_config(&first.identity_files(identity))
        .with_endpoints(order.iter().map(|&i| ward[i].addr().to_string()))
        .expect("distinct replica addresses")
        .with_failover_backoff(Duration::from_millis(50), Duration::from_millis(200))
}

/// An SDK client of the replicas `order` of `ward`.
async fn sdk(ward: &WardCluster, order: &[usize], identity: &str) -> Client {
    Client::connect(sdk_config(ward, order, identity))
        .await
        .expect("SDK connect")
}

/// Issues the API key `name` through `c` and returns the plaintext key.
async fn issue(c: &Client, name: &str) -> String {
    c.issue_key(proto::IssueKeyRequest {
        name: name.into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("issue {name}: {e}"))
    .api_key
}

/// A verification of `key` that charges nothing (the SDK may resend it).
fn check(key: &str) -> proto::VerifyKeyRequest {
    proto::VerifyKeyRequest {
        api_key: key.into(),
        cost: Some(0),
        ..Default::default()
    }
}

/// Waits until `key` verifies VALID on replica `i` (what another replica issued reached it).
async fn valid_on(ward: &WardCluster, i: usize, key: &str) -> proto::VerifyKeyResponse {
    let c = sdk(ward, &[i], "admin").await;
    eventually(&format!("key valid on replica {i}"), || {
        let c = c.clone();
        async move {
            let r = c.verify_key(check(key)).await.map_err(|e| e.to_string())?;
            match r.result() {
                proto::VerifyResult::Valid => Ok(r),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
}

/// What a load saw.
#[derive(Default)]
struct Tally {
    /// Writes the SDK acknowledged: (name, version, value).
    acked: Mutex<Vec<(String, u64, Vec<u8>)>>,
    /// Writes whose call surfaced an error to the caller at least once (after the SDK's own
    /// retries); the test then sent them again with the same request_id.
    writes_resent: AtomicUsize,
    /// How many times the test sent a write again.
    resends: AtomicUsize,
    /// Reads (FetchSecret) and checks (VerifyKey, cost 0) that surfaced an error or a wrong
    /// answer.
    read_failures: AtomicUsize,
    verify_failures: AtomicUsize,
    reads: AtomicUsize,
    verifies: AtomicUsize,
    /// The first few failures, for the report.
    seen: Mutex<Vec<String>>,
}

impl Tally {
    fn note(&self, what: String) {
        let mut seen = self.seen.lock().unwrap();
        if seen.len() < 10 {
            seen.push(what);
        }
    }

    /// Every read and check of the load succeeded (with the SDK's retries), VALID for checks.
    fn assert_reads_succeeded(&self) {
        let seen = self.seen.lock().unwrap();
        assert_eq!(
            self.read_failures.load(Ordering::Relaxed),
            0,
            "reads failed: {seen:?}"
        );
        assert_eq!(
            self.verify_failures.load(Ordering::Relaxed),
            0,
            "verifications failed: {seen:?}"
        );
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn report(&self, name: &str) {
        eprintln!(
            "[{name}] acknowledged writes {}, writes that surfaced an error {} (resent {} times \
             with the same request_id), reads {} failed {}, verifies {} failed {}; first \
             failures: {:?}",
            self.acked(),
            self.writes_resent.load(Ordering::Relaxed),
            self.resends.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
            self.read_failures.load(Ordering::Relaxed),
            self.verifies.load(Ordering::Relaxed),
            self.verify_failures.load(Ordering::Relaxed),
            self.seen.lock().unwrap()
        );
    }
}

/// A mixed load: for each client, a task putting new secrets (each with its own request_id),
/// one fetching `seed` and one checking `key`, until [`stop`](Load::stop).
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How long the test keeps resending one write (with its request_id) before failing.
const WRITE_RETRY_FOR: Duration = Duration::from_secs(30);

impl Load {
    fn start(clients: &[Client], tag: &str, seed: &str, key: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut tasks = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let (c2, c3) = (c.clone(), c.clone());
            let (s, t, tag) = (stop.clone(), tally.clone(), tag.to_owned());
            tasks.push(tokio::spawn(async move {
                let c = c2;
                let mut j = 0u64;
                while !s.load(Ordering::Relaxed) {
                    let name = format!("{tag}/w{i}/{j}");
                    let value = format!("{tag} value {i}-{j}").into_bytes();
                    let req = proto::PutSecretRequest {
                        request_id: format!("{tag}-w{i}-{j}"),
                        ..put_req(&name, &value)
                    };
                    let deadline = Instant::now() + WRITE_RETRY_FOR;
                    let mut failed = false;
                    let r = loop {
                        match c.put_secret(req.clone()).await {
                            Ok(r) => break r,
                            Err(e) => {
                                if !failed {
                                    t.writes_resent.fetch_add(1, Ordering::Relaxed);
                                    failed = true;
                                }
                                t.note(format!("put {name}: {:?}: {e}", e.code()));
                                assert!(
                                    Instant::now() < deadline,
                                    "put {name} failed for {WRITE_RETRY_FOR:?}: {e}"
                                );
                                t.resends.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    };
                    t.acked.lock().unwrap().push((name, r.version, value));
                    j += 1;
                }
            }));
            let (s, t, seed) = (stop.clone(), tally.clone(), seed.to_owned());
            let c = c3.clone();
            tasks.push(tokio::spawn(async move {
                while !s.load(Ordering::Relaxed) {
                    t.reads.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = c.fetch_secret(&seed, 0).await {
                        t.read_failures.fetch_add(1, Ordering::Relaxed);
                        t.note(format!("fetch {seed}: {:?}: {e}", e.code()));
                    }
                }
            }));
            let (s, t, key) = (stop.clone(), tally.clone(), key.to_owned());
            let c = c3;
            tasks.push(tokio::spawn(async move {
                while !s.load(Ordering::Relaxed) {
                    t.verifies.fetch_add(1, Ordering::Relaxed);
                    match c.verify_key(check(&key)).await {
                        Ok(r) if r.result() == proto::VerifyResult::Valid => {}
                        Ok(r) => {
                            t.verify_failures.fetch_add(1, Ordering::Relaxed);
                            t.note(format!("verify: {:?}", r.result()));
                        }
                        Err(e) => {
                            t.verify_failures.fetch_add(1, Ordering::Relaxed);
                            t.note(format!("verify: {:?}: {e}", e.code()));
                        }
                    }
                }
            }));
        }
        Load { stop, tally, tasks }
    }

    /// Waits until `n` more writes than now are acknowledged (the load makes progress).
    async fn progress(&self, what: &str, n: usize) {
        let want = self.tally.acked() + n;
        let tally = self.tally.clone();
        eventually(what, || {
            let got = tally.acked();
            async move {
                if got >= want {
                    Ok(())
                } else {
                    Err(format!("{got} of {want} writes acknowledged"))
                }
            }
        })
        .await;
    }

    /// Stops every task and waits for it (a task's panic fails the test here).
    async fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load task");
        }
        self.tally
    }
}

/// Asserts that every write `tally` acknowledged is served, at its version and value, by every
/// replica in `replicas` (polling: a replica learns of another's write through its watch).
async fn all_acked_readable(ward: &WardCluster, replicas: &[usize], tally: &Tally) {
    let acked = tally.acked.lock().unwrap().clone();
    for &i in replicas {
        let c = ward[i].raw_client("admin").await;
        for (name, version, value) in &acked {
            let got = eventually(&format!("{name} on replica {i}"), || {
                primary_at(&c, name, *version)
            })
            .await;
            assert!(
                &got.value == value,
                "{name}@{version} on replica {i}: another value"
            );
        }
    }
}

/// What a [`Load`] reads: puts `TAG/seed` on replica 0 and issues the key `TAG/key`, both
/// known to every replica when this returns. Returns the seed's name and the key.
async fn seed_load(ward: &WardCluster, tag: &str) -> (String, String) {
    let seed = format!("{tag}/seed");
    put(&mut ward[0].raw_client("admin").await, &seed, b"seed").await;
    let key = issue(&sdk(ward, &[0], "admin").await, &format!("{tag}/key")).await;
    for i in 0..ward.len() {
        valid_on(ward, i, &key).await;
        let c = ward[i].raw_client("admin").await;
        eventually(&format!("{seed} on replica {i}"), || {
            primary_at(&c, &seed, 1)
        })
        .await;
    }
    (seed, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_killed_under_load_loses_no_acknowledged_write() {
    let mut etcd = EtcdCluster::start(3).await;
    let ward = WardCluster::start(&etcd, 2);
    let (seed, key) = &seed_load(&ward, "load").await;

    // Two clients, each preferring another replica, each with both.
    let clients = [
        sdk(&ward, &[0, 1], "admin").await,
        sdk(&ward, &[1, 0], "admin").await,
    ];
    let load = Load::start(&clients, "etcdkill", seed, key);
    load.progress("writes before the kill", 10).await;

    let leader = etcd.leader().await;
    etcd.kill9(leader);
    let killed_at = Instant::now();
    load.progress("writes after the etcd leader's kill", 40)
        .await;
    eprintln!(
        "[etcd kill] 40 writes acknowledged {:?} after killing member {leader}",
        killed_at.elapsed()
    );
    let tally = load.stop().await;
    tally.report("etcd leader killed");
    tally.assert_reads_succeeded();
    // Writes that surfaced an error were resent with their request_id until they succeeded
    // (the load task fails the test otherwise); how many needed it is in the report.
    all_acked_readable(&ward, &[0, 1], &tally).await;
    // A resent write was applied once: its secret has exactly one version.
    let mut raw = ward[1].raw_client("admin").await;
    let acked = tally.acked.lock().unwrap().clone();
    for (name, version, _) in &acked {
        assert_eq!(*version, 1, "{name} was written twice");
        let m = crate::describe(&mut raw, name).await.expect("describe");
        assert_eq!(m.versions.len(), 1, "{name} has {:?}", m.versions);
    }

    // The member comes back on its data dir and catches up: its own (serializable) copy at the
    // survivors' revision equals theirs.
    etcd.restart(leader).await;
    let survivor = (leader + 1) % etcd.len();
    let prefix = || GetOptions::new().with_prefix().with_count_only();
    let theirs = etcd
        .member_client(survivor)
        .await
        .get(ETCD_PREFIX, Some(prefix()))
        .await
        .expect("count on a survivor");
    let rev = theirs.header().expect("header").revision();
    let mut back = etcd.member_client(leader).await;
    let count_at = |c: &mut etcd_client::Client| {
        let mut c = c.clone();
        async move {
            c.get(
                ETCD_PREFIX,
                Some(prefix().with_serializable().with_revision(rev)),
            )
            .await
            .map(|r| r.count())
            .map_err(|e| e.to_string())
        }
    };
    let mut survivor_c = etcd.member_client(survivor).await;
    let want = count_at(&mut survivor_c).await.expect("survivor's count");
    let got = eventually("the restarted member at the survivors' revision", || {
        let mut b = back.clone();
        async move {
            let r = b
                .get(ETCD_PREFIX, Some(prefix().with_serializable()))
                .await
                .map_err(|e| e.to_string())?;
            let at = r.header().map(|h| h.revision()).unwrap_or(0);
            if at >= rev {
                Ok(at)
            } else {
                Err(format!("at revision {at} of {rev}"))
            }
        }
    })
    .await;
    assert!(got >= rev);
    assert_eq!(count_at(&mut back).await.expect("its count"), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_under_load_fails_over_and_its_jobs_move() {
    let etcd = EtcdCluster::start(3).await;
    let mut ward = WardCluster::start_with(
        &etcd,
        3,
        ClusterOptions::default()
            .etcd_key("lease_ttl", "\"2s\"")
            .test_clock(),
    );
    let (seed, key) = &seed_load(&ward, "jobs").await;
    let admin = sdk(&ward, &[0, 1, 2], "admin").await;
    // A key whose scheduled rotation (the shortest a policy allows, 60 s) only the leader's
    // sweeper carries out; set through grpcurl as an operator would.
    issue(&admin, "jobs/rotating").await;
    let body = r#"{"name":"jobs/rotating","policy":{"rotation_period":"60s"},"update_mask":{"paths":["rotation_period"]}}"#;
    let o = ward[0].grpcurl(&["-d", body], &["ward.v1.Keys/UpdateKeyPolicy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let leader = eventually("a replica leads", || {
        let (ward, etcd) = (&ward, &etcd);
        async move {
            ward.leader(etcd)
                .await
                .ok_or_else(|| "no leader".to_owned())
        }
    })
    .await;
    // Every client prefers the leader, so the kill hits their calls.
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let order = [leader, others[0], others[1]];
    let clients = [
        sdk(&ward, &order, "admin").await,
        sdk(&ward, &order, "admin").await,
    ];
    let load = Load::start(&clients, "replicakill", seed, key);
    load.progress("writes before the kill", 10).await;

    ward[leader].kill9();
    let killed_at = Instant::now();
    let new_leader = eventually("the leader key names a survivor", || {
        let (ward, etcd) = (&ward, &etcd);
        async move {
            match ward.leader(etcd).await {
                Some(l) if l != leader => Ok(l),
                other => Err(format!("leader {other:?}")),
            }
        }
    })
    .await;
    let moved_after = killed_at.elapsed();
    load.progress("writes after the replica's kill", 40).await;
    let tally = load.stop().await;
    tally.report("replica killed");
    eprintln!(
        "[replica kill] leader moved from replica {leader} to {new_leader} {moved_after:?} after \
         the kill (lease_ttl 2s)"
    );
    tally.assert_reads_succeeded();
    all_acked_readable(&ward, &others, &tally).await;
    for c in &clients {
        let health = c.endpoints();
        assert!(
            !health[0].healthy,
            "the killed replica is marked: {health:?}"
        );
    }

    // A cluster job on the new leader: the rotation falls due (every clock moves past it) and
    // is carried out although the replica that led when it was scheduled is gone.
    ward.advance_clocks(Duration::from_secs(61));
    let survivor = ward[new_leader].raw_client("admin").await;
    let m = eventually("the scheduled rotation done by the new leader", || {
        let mut c = survivor.clone();
        async move {
            let m = crate::describe(&mut c, "jobs/rotating")
                .await
                .map_err(|s| s.to_string())?;
            let primary = m
                .versions
                .iter()
                .find(|v| v.state() == pb::VersionState::Primary)
                .map(|v| v.version);
            if primary == Some(2) {
                Ok(m)
            } else {
                Err(format!("primary {primary:?}"))
            }
        }
    })
    .await;
    assert_eq!(m.versions.len(), 2, "{:?}", m.versions);
}

/// Charged verifications of `key` through `c` until `QUOTA_EXCEEDED` comes five times in a
/// row; returns how many were VALID (any other answer or error fails the test).
async fn spend(c: Client, key: String) -> u64 {
    let (mut valid, mut exceeded_in_row) = (0, 0);
    while exceeded_in_row < 5 {
        let r = c
            .verify_key(proto::VerifyKeyRequest {
                api_key: key.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("charged verify: {:?}: {e}", e.code()));
        match r.result() {
            proto::VerifyResult::Valid => {
                valid += 1;
                exceeded_in_row = 0;
            }
            proto::VerifyResult::QuotaExceeded => exceeded_in_row += 1,
            other => panic!("charged verify: {other:?}"),
        }
    }
    valid
}

/// Sets a quota of `limit` uses (no refill) on the key `name`.
async fn set_quota(c: &Client, name: &str, limit: u64) {
    let quota = proto::Quota {
        limit,
        ..Default::default()
    };
    c.update_key_policy(crate::quota_update(name, Some(quota)))
        .await
        .unwrap_or_else(|e| panic!("quota on {name}: {e}"));
}

/// Waits until replica `i` knows `key`'s quota (a cost-0 check reports a balance).
async fn quota_known_on(ward: &WardCluster, i: usize, key: &str) {
    let c = sdk(ward, &[i], "admin").await;
    eventually(&format!("the quota known on replica {i}"), || {
        let c = c.clone();
        async move {
            let r = c.verify_key(check(key)).await.map_err(|e| e.to_string())?;
            r.quota_remaining
                .map(|_| ())
                .ok_or_else(|| format!("{:?}, no quota", r.result()))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_quota_spent_from_three_replicas_is_never_over_admitted() {
    const LIMIT: u64 = 300;
    const BLOCK: u64 = 10;
    let etcd = EtcdCluster::start(3).await;
    let mut ward = WardCluster::start_with(
        &etcd,
        3,
        ClusterOptions::default().etcd_key("quota_block", &BLOCK.to_string()),
    );
    let admin = sdk(&ward, &[0], "admin").await;
    let key = issue(&admin, "quota/shared").await;
    set_quota(&admin, "quota/shared", LIMIT).await;
    for i in 0..3 {
        quota_known_on(&ward, i, &key).await;
    }

    // Two verifiers per replica, each with its own client of that replica alone.
    let mut tasks = Vec::new();
    for i in 0..3 {
        for _ in 0..2 {
            let c = sdk(&ward, &[i], "admin").await;
            tasks.push((i, tokio::spawn(spend(c, key.clone()))));
        }
    }
    let mut per_replica = [0u64; 3];
    for (i, t) in tasks {
        per_replica[i] += t.await.expect("verifier");
    }
    let admitted: u64 = per_replica.iter().sum();
    eprintln!("[quota] limit {LIMIT}, block {BLOCK}: admitted {admitted} ({per_replica:?})");
    // docs/configuration.md (store.etcd.quota_block): units are taken from the shared ledger
    // before they are spent, so the replicas never admit more than the quota; each may hold at
    // most one block unspent, so at most 3 × BLOCK go unused while all three are up.
    assert!(admitted <= LIMIT, "over-admitted: {admitted} > {LIMIT}");
    assert!(
        admitted >= LIMIT - 3 * BLOCK,
        "under-admitted beyond the bound: {admitted}"
    );

    // A clean stop gives the replica's unspent units back to the ledger: replica 2 takes a
    // block for one use and stops; replica 0 can then spend everything else.
    const SECOND: u64 = 100;
    let key2 = issue(&admin, "quota/returned").await;
    set_quota(&admin, "quota/returned", SECOND).await;
    for i in [0, 2] {
        quota_known_on(&ward, i, &key2).await;
    }
    let on_2 = sdk(&ward, &[2], "admin").await;
    let one = on_2
        .verify_key(proto::VerifyKeyRequest {
            api_key: key2.clone(),
            ..Default::default()
        })
        .await
        .expect("one use on replica 2");
    assert_eq!(one.result(), proto::VerifyResult::Valid, "{one:?}");
    drop(on_2);
    ward[2].stop();
    let usage = admin
        .get_key_usage("quota/returned", 0)
        .await
        .expect("usage on replica 0");
    eprintln!(
        "[quota] after replica 2 stopped: GetKeyUsage quota_remaining {:?}",
        usage.quota_remaining
    );
    let rest = spend(sdk(&ward, &[0], "admin").await, key2).await;
    eprintln!("[quota] replica 0 admitted {rest} of the {SECOND} − 1 left");
    assert_eq!(
        rest,
        SECOND - 1,
        "replica 2's unspent units were not given back at its stop (it held {} of them)",
        BLOCK - 1
    );
}

/// The value of `name`@`version` as the test writes it.
fn versioned(version: u64) -> Vec<u8> {
    format!("written on A, version {version}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_after_etcd_compacted_past_it() {
    let mut etcd = EtcdCluster::start(3).await;
    // A reaches etcd through members 0 and 2, B through member 1 alone.
    let ward = WardCluster::start_with(
        &etcd,
        2,
        ClusterOptions::default()
            .members_of(0, &[0, 2])
            .members_of(1, &[1]),
    );
    let name = "watched/db";
    let mut a = ward[0].raw_client("admin").await;
    let b = ward[1].raw_client("admin").await;
    let v1 = put(&mut a, name, &versioned(1)).await.version;
    eventually("v1 on B", || primary_at(&b, name, v1)).await;

    let on_b = sdk(&ward, &[1], "admin").await;
    let watch = || {
        let on_b = on_b.clone();
        async move {
            on_b.watch_secrets(proto::WatchSecretsRequest {
                names: vec![name.into()],
                ..Default::default()
            })
            .await
        }
    };
    let mut stream = watch().await.expect("watch on B");
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an event within 10 s")
            .expect("the stream is open")
            .expect("an event");
        if e.r#type() == proto::WatchEventType::Synced {
            break;
        }
    }

    etcd.kill9(1);
    // Cut off from etcd for longer than max_staleness (3 s by default), B refuses calls.
    let refused = eventually("B refuses calls", || {
        let mut b = b.clone();
        async move {
            match fetch(&mut b, name, 0).await {
                Err(s) if s.code() == Code::Unavailable => Ok(s.message().to_owned()),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
                Ok(f) => Err(format!("served version {}", f.version)),
            }
        }
    })
    .await;
    assert!(
        refused.contains("etcd") && refused.contains("max_staleness"),
        "B's refusal: {refused}"
    );
    eprintln!("[compaction] B cut off from etcd answers UNAVAILABLE: {refused}");

    // Meanwhile A writes, and etcd compacts past the revision B's watch has seen.
    let mut last = v1;
    for _ in 0..2 {
        last = put(&mut a, name, &versioned(last + 1)).await.version;
    }
    let value = versioned(last);
    let compacted = etcd.compact_to_latest().await;
    eprintln!("[compaction] compacted to revision {compacted}; newest version {last}");

    etcd.restart(1).await;
    ward[1].wait_for_stderr("compacted", 1, Duration::from_secs(30));
    // B's watcher hears of the newest version: on the stream it had open, or, if B ended that
    // stream, on one opened again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reopened = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "B's watcher never heard of version {last} ({reopened} reopenings)\n{}",
            ward[1].stderr_tail(30)
        );
        let next = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
        match next {
            Err(_) => continue,
            Ok(Some(Ok(e))) => {
                if e.r#type() == proto::WatchEventType::Rotated && e.version == last {
                    break;
                }
            }
            Ok(None) | Ok(Some(Err(_))) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(s) = watch().await {
                    stream = s;
                    reopened += 1;
                }
            }
        }
    }
    eprintln!("[compaction] B's watcher got version {last} after {reopened} reopenings");
    let got = primary_at(&b, name, last)
        .await
        .expect("B serves the newest");
    assert_eq!(got.value, value);
    let served = on_b.fetch_secret(name, 0).await.expect("SDK fetch on B");
    assert_eq!(served.version, last);
}

/// A PutSecret of `bytes` bytes through `c`.
async fn put_big(c: &mut RawClient, name: &str, bytes: usize) -> Result<u64, tonic::Status> {
    c.put_secret(put_req(name, &vec![b'x'; bytes]))
        .await
        .map(|r| r.into_inner().version)
}

/// A 3-member etcd with a 4 MiB backend quota, 2 replicas, a secret `full/seed` and a key
/// `full/key` known to both; then replica 0 writes 60 KB values over a few names (every version
/// stays in etcd's history until compaction, so 4 MiB fills within a few dozen puts) until a
/// write is refused. Returns the refusal.
async fn fill_etcd() -> (EtcdCluster, WardCluster, String, tonic::Status) {
    let etcd = EtcdCluster::start_with(EtcdOptions {
        quota_backend_bytes: Some(4 << 20),
        ..EtcdOptions::default()
    })
    .await;
    let ward = WardCluster::start(&etcd, 2);
    let mut a = ward[0].raw_client("admin").await;
    let b = ward[1].raw_client("admin").await;
    let seed = put(&mut a, "full/seed", b"seed").await.version;
    let key = issue(&sdk(&ward, &[0], "admin").await, "full/key").await;
    valid_on(&ward, 1, &key).await;
    eventually("seed on B", || primary_at(&b, "full/seed", seed)).await;
    for i in 0..1000 {
        if let Err(s) = put_big(&mut a, &format!("full/fill-{}", i % 8), 60_000).await {
            eprintln!("[nospace] put {i} refused: {:?}: {}", s.code(), s.message());
            return (etcd, ward, key, s);
        }
    }
    panic!("4 MiB quota never reached with 1000 puts of 60 KB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_refuses_writes_with_unavailable_and_reads_go_on() {
    let (etcd, ward, key, refusal) = fill_etcd().await;
    assert_eq!(refusal.code(), Code::Unavailable, "{}", refusal.message());
    assert!(
        etcd.alarms()
            .await
            .contains(&etcd_client::AlarmType::Nospace),
        "no NOSPACE alarm raised"
    );
    // The replica logged why (what the client is told: see the next test).
    assert!(
        ward[0].count_in_stderr("NOSPACE") > 0,
        "replica 0 did not log NOSPACE\n{}",
        ward[0].stderr_tail(20)
    );
    let mut a = ward[0].raw_client("admin").await;
    let mut b = ward[1].raw_client("admin").await;
    // Every write refuses, on either replica; the SDK (with request_id, so retried) too.
    let on_b = put_big(&mut b, "full/on-b", 10)
        .await
        .expect_err("a write on B");
    assert_eq!(on_b.code(), Code::Unavailable, "{}", on_b.message());
    let admin = sdk(&ward, &[0, 1], "admin").await;
    let sdk_put = || {
        admin.put_secret(proto::PutSecretRequest {
            request_id: "full-sdk-1".into(),
            ..put_req("full/sdk", b"x")
        })
    };
    let sdk_err = sdk_put().await.expect_err("an SDK write under NOSPACE");
    assert_eq!(sdk_err.code(), Code::Unavailable, "{sdk_err}");

    // Reads go on: fetch and charged verification on both replicas.
    for i in 0..2 {
        let mut c = ward[i].raw_client("admin").await;
        let f = fetch(&mut c, "full/seed", 0)
            .await
            .expect("fetch under NOSPACE");
        assert_eq!(f.value, b"seed");
        let app = sdk(&ward, &[i], "admin").await;
        for _ in 0..3 {
            let v = app
                .verify_key(proto::VerifyKeyRequest {
                    api_key: key.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("verify on replica {i} under NOSPACE: {e}"));
            assert_eq!(v.result(), proto::VerifyResult::Valid, "{v:?}");
        }
    }

    etcd.recover_from_nospace().await;
    assert!(etcd.alarms().await.is_empty(), "alarms left after disarm");
    let after = put(&mut a, "full/after", b"after recovery").await.version;
    eventually("the write after recovery on B", || {
        primary_at(&b, "full/after", after)
    })
    .await;
    // The SDK write refused under NOSPACE goes through when sent again with its request_id.
    let w = sdk_put().await.expect("the SDK write after recovery");
    assert_eq!(w.version, 1);
    put_big(&mut b, "full/on-b", 10)
        .await
        .expect("a write on B after recovery");
}

/// docs/cluster.md (NOSPACE): writes fail with UNAVAILABLE and a message saying that etcd is
/// out of space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_refusal_tells_the_client_etcd_is_full() {
    let (_etcd, _ward, _key, refusal) = fill_etcd().await;
    assert_eq!(refusal.code(), Code::Unavailable, "{}", refusal.message());
    assert!(
        refusal.message().contains("NOSPACE") && refusal.message().contains("out of space"),
        "the refusal does not say that etcd is out of space: {}",
        refusal.message()
    );
}
