//! Crash consistency under random SIGKILLs: concurrent puts (contending on shared names) and
//! keyring rotations run against the real server, which is killed at a random moment, restarted
//! and checked, again and again. After every restart: every acknowledged write is there with
//! its value; every version the server lists decrypts to a value some writer sent to that name
//! (nothing half-written: no version without a decryptable value, no gaps in the numbering);
//! the keyring holds every acknowledged term.
//!
//! Seeded: the seed picks the kill moments, the number of writers and the rotation pace, and is
//! printed; rerun with `WARD_CRASH_SEED=<seed>` (thread interleavings still vary run to run).
//! `WARD_CRASH_KILLS` sets the number of kills (default 20).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{rngs::StdRng, Rng, SeedableRng};
use tonic::Code;
use ward_tests::{pb, TestServer};

/// Names every writer shares, so puts contend and conflict.
const NAMES: usize = 6;

#[derive(Default)]
struct Ledger {
    /// (name, version) → value, for every write the server acknowledged.
    acked: HashMap<(String, u64), Vec<u8>>,
    /// name → every value ever sent to it (acknowledged or not).
    sent: HashMap<String, HashSet<Vec<u8>>>,
    /// Highest keyring term whose rotation was acknowledged.
    acked_term: u32,
}

fn env_u64(var: &str) -> Option<u64> {
    std::env::var(var).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a number"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_and_rotations_survive_random_sigkills() {
    let seed = env_u64("WARD_CRASH_SEED").unwrap_or_else(rand::random);
    let kills = env_u64("WARD_CRASH_KILLS").unwrap_or(20) as usize;
    eprintln!("crash test: seed {seed}, {kills} kills (rerun with WARD_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut s = TestServer::start();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut in_flight_at_kill = 0usize;
    let mut unacked_present = 0usize;

    for round in 0..kills {
        let writers = rng.gen_range(2..=5);
        let rotate_every = Duration::from_millis(rng.gen_range(20..150));
        let kill_after = Duration::from_millis(rng.gen_range(30..350));
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for w in 0..writers {
            let mut c = s.raw_client("admin").await;
            let (stop, ledger, in_flight) = (stop.clone(), ledger.clone(), in_flight.clone());
            let mut wrng = StdRng::seed_from_u64(seed ^ ((round as u64) << 16) ^ w as u64);
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("crash/n{}", wrng.gen_range(0..NAMES));
                    // Sizes from a few bytes to 8 KiB: small records and multi-page ones.
                    let len = wrng.gen_range(16..8192);
                    let mut value = format!("seed{seed}-r{round}-w{w}-i{i}-").into_bytes();
                    value.resize(len.max(value.len()), b'a' + (i % 26) as u8);
                    i += 1;
                    ledger
                        .lock()
                        .unwrap()
                        .sent
                        .entry(name.clone())
                        .or_default()
                        .insert(value.clone());
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    let r = c.put_secret(crate::put_req(&name, &value)).await;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    match r {
                        Ok(resp) => {
                            let v = resp.into_inner().version;
                            let prev = ledger
                                .lock()
                                .unwrap()
                                .acked
                                .insert((name.clone(), v), value);
                            assert!(prev.is_none(), "{name}@{v} acknowledged twice");
                        }
                        // Compare-and-set lost too often: not written, by contract.
                        Err(st) if st.code() == Code::Aborted => {}
                        // The server is gone: outcome unknown; stop.
                        Err(_) => return,
                    }
                }
            }));
        }
        {
            let mut admin =
                ward_tests::pb::admin_client::AdminClient::new(s.channel("admin").await);
            let (stop, ledger, in_flight) = (stop.clone(), ledger.clone(), in_flight.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(rotate_every).await;
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    let r = admin.rotate_keyring(pb::RotateKeyringRequest {}).await;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    match r {
                        Ok(resp) => {
                            let mut l = ledger.lock().unwrap();
                            l.acked_term = l.acked_term.max(resp.into_inner().term);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(kill_after).await;
        in_flight_at_kill += in_flight.load(Ordering::Relaxed) as usize;
        s.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        s.restart();
        unacked_present = verify(&s, &ledger, round).await;
    }
    let l = ledger.lock().unwrap();
    let sent: usize = l.sent.values().map(HashSet::len).sum();
    eprintln!(
        "crash test: seed {seed}: {kills} kills in {:.1} s; {} writes acknowledged of {sent} sent, \
         keyring term {} acknowledged, {in_flight_at_kill} calls in flight at the kills, \
         {unacked_present} unacknowledged writes complete on disk",
        started.elapsed().as_secs_f64(),
        l.acked.len(),
        l.acked_term
    );
    assert!(
        l.acked.len() >= kills,
        "too few writes acknowledged to mean anything"
    );
}

/// Checks the restarted server against the ledger.
/// Returns how many present versions were never acknowledged (written, reply lost to the kill).
async fn verify(s: &TestServer, ledger: &Mutex<Ledger>, round: usize) -> usize {
    let mut c = s.raw_client("admin").await;
    let (acked, sent, acked_term) = {
        let l = ledger.lock().unwrap();
        (l.acked.clone(), l.sent.clone(), l.acked_term)
    };
    let mut listed: BTreeMap<(String, u64), ()> = BTreeMap::new();
    for (name, values) in &sent {
        let meta = match crate::describe(&mut c, name).await {
            Ok(m) => m,
            Err(st) if st.code() == Code::NotFound => {
                let lost: Vec<_> = acked.keys().filter(|(n, _)| n == name).collect();
                assert!(
                    lost.is_empty(),
                    "round {round}: {name} missing, acked {lost:?}"
                );
                continue;
            }
            Err(st) => panic!("round {round}: describe {name}: {st:?}"),
        };
        let numbers: Vec<u64> = meta.versions.iter().map(|v| v.version).collect();
        let expected: Vec<u64> = (1..=meta.primary_version).collect();
        assert_eq!(
            numbers, expected,
            "round {round}: {name}: version numbering"
        );
        for chunk in numbers.chunks(100) {
            let items = chunk
                .iter()
                .map(|v| pb::FetchSecretRequest {
                    name: name.clone(),
                    version: *v,
                })
                .collect();
            let got = c
                .batch_fetch_secrets(pb::BatchFetchSecretsRequest { items })
                .await
                .unwrap_or_else(|st| panic!("round {round}: batch {name}: {st:?}"))
                .into_inner();
            for (v, r) in chunk.iter().zip(got.results) {
                let value = match r.result {
                    Some(pb::batch_fetch_result::Result::Secret(f)) => f.value,
                    other => panic!(
                        "round {round}: {name}@{v} listed but not readable (half-written?): {other:?}"
                    ),
                };
                assert!(
                    values.contains(&value),
                    "round {round}: {name}@{v} holds a value no writer sent to it"
                );
                if let Some(want) = acked.get(&(name.clone(), *v)) {
                    assert!(
                        *want == value,
                        "round {round}: {name}@{v} differs from the acknowledged write"
                    );
                }
                listed.insert((name.clone(), *v), ());
            }
        }
    }
    let lost: Vec<_> = acked.keys().filter(|k| !listed.contains_key(*k)).collect();
    assert!(
        lost.is_empty(),
        "round {round}: acknowledged writes lost: {lost:?}"
    );
    let mut admin = pb::admin_client::AdminClient::new(s.channel("admin").await);
    let ring = admin
        .describe_keyring(pb::DescribeKeyringRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        ring.current_term >= acked_term,
        "round {round}: keyring at term {} but term {acked_term} was acknowledged",
        ring.current_term
    );
    let terms: Vec<u32> = ring.terms.iter().map(|t| t.term).collect();
    assert_eq!(
        terms,
        (1..=ring.current_term).collect::<Vec<_>>(),
        "round {round}: keyring terms"
    );
    listed.keys().filter(|k| !acked.contains_key(*k)).count()
}
