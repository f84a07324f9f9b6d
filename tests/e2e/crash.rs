//! Crash consistency under random SIGKILLs. Concurrent workers drive the real server, which is
//! killed at a random moment, restarted and checked, again and again:
//!
//! - writers put values (16 B–8 KiB) to a few shared names, so puts contend and conflict;
//! - a keyring rotator calls RotateKeyring;
//! - a lifecycle worker rotates static secrets and API keys (RotateSecret), revokes versions
//!   (RevokeSecret), retires them (SetVersionState INACTIVE), and issues a throwaway key that
//!   it then revokes whole;
//! - verifiers hammer VerifyKey on API keys whose quota (set with UpdateKeyPolicy) runs out
//!   during the run.
//!
//! After every restart:
//! - the audit log verifies (VerifyAuditLog: every record, link and checkpoint; no gap), and
//!   what was read of it before the kill is unchanged (the test reads it incrementally and
//!   checks the links itself too);
//! - every acknowledged write, rotation, revocation and retirement is there and has its audit
//!   record; every VerifyKey answer a client received has one;
//! - nothing is half there: every version the server lists has the audit record of the call
//!   that wrote it and decrypts to the value or key acknowledged for it (a version whose reply
//!   was lost: to a value some caller sent to that name, or a well-formed key); version numbers
//!   have no gaps. Values are read back the first time they are seen, and all again every
//!   fifth round and at the end;
//! - every version is in a state the acknowledged calls allow: an acknowledged revocation
//!   still holds (DescribeSecret says REVOKED, and VerifyKey REVOKED for an API key), and a
//!   REVOKED or INACTIVE version has the audit record of the call that moved it;
//! - quotas never over-admit: the VALID answers clients saw are at most the limit, and the
//!   server's ledger (GetKeyUsage) has charged at least those and at most the limit;
//! - the keyring holds every acknowledged term.
//!
//! At the end the whole log, across every kill, is covered by a verified HSM checkpoint.
//!
//! Before a kill, every call must succeed or be refused as the contract allows (ABORTED,
//! FAILED_PRECONDITION): any other error fails the test. Over the run every kind of operation
//! must have been acknowledged, and at least one kill must have cut off calls in flight.
//!
//! Seeded: the seed picks the kill moments, the number of writers, every worker's choices and
//! pacing and the second quota, and is printed; rerun with `WARD_CRASH_SEED=<seed>` (thread
//! interleavings still vary run to run). `WARD_CRASH_KILLS` sets the number of kills
//! (default 20).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tonic::{Code, Status};
use ward::keyformat::ApiKey;
use ward_tests::{ok, pb, AuditClient, KeysClient, RawClient, TestServer};

/// Static names every writer shares, so puts contend and conflict.
const NAMES: usize = 6;
/// API keys the lifecycle worker rotates and revokes versions of.
const KEYS: usize = 3;
/// The small quota: spent within the first rounds, then every later VALID would over-admit.
const SMALL_QUOTA: u64 = 20;
/// Every this many rounds, every readable value is read back (else only new ones).
const FULL_EVERY: usize = 5;
/// Prefix of every name the test uses.
const PREFIX: &str = "crash/";

/// What clients sent and what the server acknowledged, across the whole run.
#[derive(Default, Clone)]
struct Ledger {
    /// (name, version) → value, for every acknowledged PutSecret and static RotateSecret.
    acked: HashMap<(String, u64), Vec<u8>>,
    /// name → every value ever sent to it (acknowledged or not).
    sent: HashMap<String, HashSet<Vec<u8>>>,
    /// (name, version) → the key, for every acknowledged IssueKey and API-key RotateSecret.
    keys: HashMap<(String, u64), String>,
    /// Every name a creating call was sent for.
    names: BTreeSet<String>,
    /// Highest keyring term whose rotation was acknowledged.
    acked_term: u32,
    /// Acknowledged RotateSecret calls.
    rotations: usize,
    /// Versions whose RevokeSecret was sent / acknowledged.
    revoke_sent: HashSet<(String, u64)>,
    revoked: HashSet<(String, u64)>,
    /// Secrets whose RevokeSecret (all versions) was sent / acknowledged.
    revoke_all_sent: HashSet<String>,
    revoked_all: HashSet<String>,
    /// Versions whose SetVersionState INACTIVE was sent / acknowledged.
    retire_sent: HashSet<(String, u64)>,
    retired: HashSet<(String, u64)>,
    /// Keys with a quota, by name.
    quotas: BTreeMap<String, QuotaKey>,
    /// VerifyKey answers received, by the secret they named (each needs an audit record).
    answers: HashMap<String, u64>,
    /// Acknowledged calls, by kind of operation (every kind in [`OPERATIONS`] must occur).
    ops: BTreeMap<&'static str, usize>,
}

/// Every kind of operation the workers make; each must be acknowledged at least once a run.
const OPERATIONS: [&str; 9] = [
    "PutSecret",
    "RotateKeyring",
    "RotateSecret (static)",
    "RotateSecret (API key)",
    "RevokeSecret (version)",
    "SetVersionState INACTIVE",
    "IssueKey",
    "RevokeSecret (all versions)",
    "VerifyKey",
];

#[derive(Clone)]
struct QuotaKey {
    key: String,
    limit: u64,
    /// VALID and QUOTA_EXCEEDED answers received.
    valid: u64,
    exceeded: u64,
    /// Units the server's ledger had charged at the last check.
    charged: u64,
    /// The round of the first QUOTA_EXCEEDED.
    spent_in_round: Option<usize>,
}

impl Ledger {
    fn count(&mut self, op: &'static str) {
        *self.ops.entry(op).or_default() += 1;
    }

    fn send_value(&mut self, name: &str, value: &[u8]) {
        self.names.insert(name.to_owned());
        self.sent
            .entry(name.to_owned())
            .or_default()
            .insert(value.to_vec());
    }

    fn ack_value(&mut self, name: &str, version: u64, value: Vec<u8>) {
        let prev = self.acked.insert((name.to_owned(), version), value);
        assert!(prev.is_none(), "{name}@{version} acknowledged twice");
    }

    fn ack_key(&mut self, name: &str, version: u64, key: String) {
        let prev = self.keys.insert((name.to_owned(), version), key);
        assert!(prev.is_none(), "{name}@{version} acknowledged twice");
    }

    /// Every acknowledged version, static or API key.
    fn acked_versions(&self) -> impl Iterator<Item = &(String, u64)> {
        self.acked.keys().chain(self.keys.keys())
    }

    /// Acknowledged versions that an acknowledged later version has replaced (so none is
    /// PRIMARY) and that no revocation was sent for yet: what the lifecycle worker may revoke
    /// or retire. All were checked after an earlier restart, so revoking one (which makes its
    /// value unreadable) hides nothing unverified.
    fn replaced_versions(&self) -> Vec<(String, u64)> {
        let mut newest: HashMap<&str, u64> = HashMap::new();
        for (n, v) in self.acked_versions() {
            let e = newest.entry(n.as_str()).or_default();
            *e = (*e).max(*v);
        }
        let mut out: Vec<(String, u64)> = self
            .acked_versions()
            .filter(|k| k.1 < newest[k.0.as_str()] && !self.revoke_sent.contains(*k))
            .cloned()
            .collect();
        out.sort();
        out
    }

    /// The states (name, version) may be in, given the calls sent and acknowledged; `last`:
    /// it is the newest version of its secret.
    fn allowed_states(&self, name: &str, version: u64, last: bool) -> Vec<pb::VersionState> {
        use pb::VersionState::*;
        let key = (name.to_owned(), version);
        if self.revoked_all.contains(name) || self.revoked.contains(&key) {
            return vec![Revoked];
        }
        let mut states = if self.retired.contains(&key) {
            vec![Inactive]
        } else if self.retire_sent.contains(&key) {
            vec![Active, Inactive]
        } else if last {
            vec![Primary]
        } else {
            // Replaced: ACTIVE for the (24 h) grace period.
            vec![Active]
        };
        if self.revoke_sent.contains(&key) || self.revoke_all_sent.contains(name) {
            states.push(Revoked);
        }
        states
    }
}

/// What one round's workers share.
#[derive(Clone)]
struct Round {
    number: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    /// Set just before the kill: a transport error from then on is the kill's doing.
    killing: Arc<AtomicBool>,
    in_flight: Arc<AtomicU32>,
}

impl Round {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }

    /// Whether a worker carries on after `st`: yes when the server refused the call as its
    /// contract allows (nothing done), no when the kill cut it off (outcome unknown). Any other
    /// error, and any transport error before the kill, fails the test.
    fn carry_on(&self, what: &str, st: &Status) -> bool {
        match st.code() {
            // Compare-and-set lost too often; a version already retired or revoked.
            Code::Aborted | Code::FailedPrecondition => true,
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
                if self.killing.load(Ordering::SeqCst) =>
            {
                false
            }
            other => panic!(
                "round {}: {what} failed before the kill: {other:?}: {}",
                self.number,
                st.message()
            ),
        }
    }

    /// Runs one call, counted as in flight while it runs.
    async fn call<T>(
        &self,
        f: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let r = f.await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        r.map(tonic::Response::into_inner)
    }
}

/// A value of 16 B–8 KiB that names where it came from.
fn value(rng: &mut StdRng, tag: &str) -> Vec<u8> {
    let mut v = format!("{tag}-").into_bytes();
    let len = rng.gen_range(16..8192).max(v.len());
    v.resize(len, b'a' + rng.gen_range(0..26u8));
    v
}

fn env_u64(var: &str) -> Option<u64> {
    std::env::var(var).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a number"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_operations_survive_random_sigkills() {
    let seed = env_u64("WARD_CRASH_SEED").unwrap_or_else(rand::random);
    let kills = env_u64("WARD_CRASH_KILLS").unwrap_or(20) as usize;
    eprintln!("crash test: seed {seed}, {kills} kills (rerun with WARD_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut s = TestServer::start();
    // Checkpoints often (taken from the first restart on), so kills land while they are signed
    // and written too.
    s.append_config("[audit]\ncheckpoint_every = 100\ncheckpoint_interval = \"1s\"");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    setup(&s, &ledger, rng.gen_range(50..=200)).await;
    let mut seen = Seen::new();
    let mut in_flight_at_kill = 0usize;
    let mut kills_with_calls_in_flight = 0usize;
    let mut unacked_present = 0usize;

    for number in 0..kills {
        let round = Round {
            number,
            ledger: ledger.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            killing: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::new(AtomicU32::new(0)),
        };
        let writers = rng.gen_range(2..=5);
        let rotate_every = Duration::from_millis(rng.gen_range(20..150));
        let kill_after = Duration::from_millis(rng.gen_range(30..350));
        let worker_rng = |w: u64| StdRng::seed_from_u64(seed ^ ((number as u64) << 16) ^ w);
        let mut tasks = Vec::new();
        for w in 0..writers {
            let tag = format!("seed{seed}-r{number}-w{w}");
            tasks.push(tokio::spawn(writer(
                round.clone(),
                s.raw_client("admin").await,
                worker_rng(w),
                tag,
            )));
        }
        let admin = pb::admin_client::AdminClient::new(s.channel("admin").await);
        tasks.push(tokio::spawn(keyring_rotator(
            round.clone(),
            admin,
            rotate_every,
        )));
        let replaced = ledger.lock().unwrap().replaced_versions();
        tasks.push(tokio::spawn(lifecycle(
            round.clone(),
            s.raw_client("admin").await,
            worker_rng(100),
            replaced,
        )));
        for v in 0..2 {
            tasks.push(tokio::spawn(verifier(
                round.clone(),
                s.keys_client("admin").await,
                worker_rng(200 + v),
            )));
        }
        tokio::time::sleep(kill_after).await;
        round.killing.store(true, Ordering::SeqCst);
        let in_flight = round.in_flight.load(Ordering::SeqCst) as usize;
        in_flight_at_kill += in_flight;
        kills_with_calls_in_flight += usize::from(in_flight > 0);
        s.kill9();
        round.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        s.restart();
        // Every value is read back the first time it is seen, and all of them again every
        // few rounds and at the end (reading ~1000 values after every kill would double the
        // run time).
        let full = number % FULL_EVERY == FULL_EVERY - 1 || number + 1 == kills;
        unacked_present = verify(&s, &ledger, &mut seen, number, full).await;
    }

    // The whole log, across every kill, is covered by a verified HSM checkpoint (one is due
    // within a second of the last record).
    let mut a = s.audit_client("admin").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let v = ok(
            a.verify_audit_log(pb::VerifyAuditLogRequest::default())
                .await,
            "VerifyAuditLog",
        );
        assert!(v.ok, "audit log broken at the end: {:?}", v.first_broken);
        if v.signed_through_seq >= seen.head {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint covering record {} within 20 s: {v:?}",
            seen.head
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let l = ledger.lock().unwrap();
    let sent: usize = l.sent.values().map(HashSet::len).sum();
    let quotas: Vec<String> = l
        .quotas
        .iter()
        .map(|(name, q)| {
            format!(
                "{name}: {} VALID answers, {} charged, limit {} ({} refused, spent in round \
                 {:?})",
                q.valid, q.charged, q.limit, q.exceeded, q.spent_in_round
            )
        })
        .collect();
    eprintln!(
        "crash test: seed {seed}: {kills} kills in {:.1} s; {} values acknowledged of {sent} \
         sent, {} API keys, {} rotations, {} revocations ({} whole secrets), {} retirements \
         acknowledged; keyring term {}; {in_flight_at_kill} calls in flight at the kills \
         ({kills_with_calls_in_flight} kills with some), acknowledged by kind {:?}, \
         {unacked_present} unacknowledged versions complete on disk; quotas: {}; audit log: \
         {} records, {} checkpoints verified",
        started.elapsed().as_secs_f64(),
        l.acked.len(),
        l.keys.len(),
        l.rotations,
        l.revoked.len(),
        l.revoked_all.len(),
        l.retired.len(),
        l.acked_term,
        l.ops,
        quotas.join("; "),
        v.head_seq,
        v.checkpoints_verified,
    );
    assert!(
        l.acked.len() >= kills,
        "too few writes acknowledged to mean anything"
    );
    assert!(
        kills_with_calls_in_flight > 0,
        "no kill cut off a call: only idle servers were killed"
    );
    // (A short rerun to debug something may end before every kind of operation ran.)
    let missing: Vec<&str> = OPERATIONS
        .iter()
        .filter(|op| l.ops.get(*op).copied().unwrap_or(0) == 0)
        .copied()
        .collect();
    assert!(
        missing.is_empty() || kills < 10,
        "never acknowledged: {missing:?} (acknowledged: {:?})",
        l.ops
    );
    // (A short rerun to debug something may end before the quota does.)
    let small = l.quotas.values().find(|q| q.limit == SMALL_QUOTA).unwrap();
    assert!(
        small.exceeded > 0 || kills < 10,
        "the small quota was never spent: over-admission was not tested"
    );
}

/// Before the first kill: every static name (so rotating one never finds it missing), API
/// keys to rotate, and two keys with a quota (the small one, and `second` units).
async fn setup(s: &TestServer, ledger: &Mutex<Ledger>, second: u64) {
    let mut c = s.raw_client("admin").await;
    let mut keys = s.keys_client("admin").await;
    for n in 0..NAMES {
        let (name, value) = (format!("{PREFIX}n{n}"), b"first".to_vec());
        let r = crate::put(&mut c, &name, &value).await;
        let mut l = ledger.lock().unwrap();
        l.send_value(&name, &value);
        l.ack_value(&name, r.version, value);
    }
    for k in 0..KEYS {
        issue(&mut c, ledger, &format!("{PREFIX}k{k}")).await;
    }
    for (i, limit) in [SMALL_QUOTA, second].into_iter().enumerate() {
        let name = format!("{PREFIX}q{i}");
        let key = issue(&mut c, ledger, &name).await;
        let policy = ok(
            keys.update_key_policy(crate::quota_update(
                &name,
                Some(pb::Quota {
                    limit,
                    ..Default::default()
                }),
            ))
            .await,
            "UpdateKeyPolicy",
        );
        assert_eq!(policy.policy.unwrap().quota.unwrap().limit, limit);
        ledger.lock().unwrap().quotas.insert(
            name,
            QuotaKey {
                key,
                limit,
                valid: 0,
                exceeded: 0,
                charged: 0,
                spent_in_round: None,
            },
        );
    }
}

/// Issues the API key `name` (with no policy) and returns it.
async fn issue(c: &mut RawClient, ledger: &Mutex<Ledger>, name: &str) -> String {
    let req = pb::IssueKeyRequest {
        name: name.to_owned(),
        ..Default::default()
    };
    let r = ok(c.issue_key(req).await, "issue");
    let mut l = ledger.lock().unwrap();
    l.names.insert(name.to_owned());
    l.ack_key(name, r.version, r.api_key.clone());
    r.api_key
}

/// Puts values to the shared names.
async fn writer(round: Round, mut c: RawClient, mut rng: StdRng, tag: String) {
    let mut i = 0u64;
    while round.running() {
        let name = format!("{PREFIX}n{}", rng.gen_range(0..NAMES));
        let value = value(&mut rng, &format!("{tag}-i{i}"));
        i += 1;
        round.ledger().send_value(&name, &value);
        match round
            .call(c.put_secret(crate::put_req(&name, &value)))
            .await
        {
            Ok(r) => {
                let mut l = round.ledger();
                l.ack_value(&name, r.version, value);
                l.count("PutSecret");
            }
            Err(st) if round.carry_on("PutSecret", &st) => {}
            Err(_) => return,
        }
    }
}

/// Rotates the keyring every `pause`.
async fn keyring_rotator(
    round: Round,
    mut admin: pb::admin_client::AdminClient<tonic::transport::Channel>,
    pause: Duration,
) {
    while round.running() {
        tokio::time::sleep(pause).await;
        match round
            .call(admin.rotate_keyring(pb::RotateKeyringRequest {}))
            .await
        {
            Ok(r) => {
                let mut l = round.ledger();
                l.acked_term = l.acked_term.max(r.term);
                l.count("RotateKeyring");
            }
            Err(st) if round.carry_on("RotateKeyring", &st) => {}
            Err(_) => return,
        }
    }
}

/// Rotates static secrets and API keys, revokes and retires `replaced` versions, and once per
/// round issues a throwaway key and revokes it whole.
async fn lifecycle(
    round: Round,
    mut c: RawClient,
    mut rng: StdRng,
    mut replaced: Vec<(String, u64)>,
) {
    let mut throwaway_done = false;
    let mut i = 0;
    while round.running() {
        i += 1;
        let result = match rng.gen_range(0..5) {
            0 => {
                let name = format!("{PREFIX}n{}", rng.gen_range(0..NAMES));
                let value = value(&mut rng, &format!("r{}-rotation{i}", round.number));
                round.ledger().send_value(&name, &value);
                let req = pb::RotateSecretRequest {
                    name: name.clone(),
                    value: value.clone(),
                    ..Default::default()
                };
                round.call(c.rotate_secret(req)).await.map(|r| {
                    let mut l = round.ledger();
                    l.ack_value(&name, r.version, value);
                    l.rotations += 1;
                    l.count("RotateSecret (static)");
                })
            }
            1 => {
                let name = format!("{PREFIX}k{}", rng.gen_range(0..KEYS));
                let req = pb::RotateSecretRequest {
                    name: name.clone(),
                    ..Default::default()
                };
                round.call(c.rotate_secret(req)).await.map(|r| {
                    let mut l = round.ledger();
                    l.ack_key(&name, r.version, r.api_key);
                    l.rotations += 1;
                    l.count("RotateSecret (API key)");
                })
            }
            2 if !replaced.is_empty() => {
                let (name, version) = replaced.swap_remove(rng.gen_range(0..replaced.len()));
                round.ledger().revoke_sent.insert((name.clone(), version));
                let req = pb::RevokeSecretRequest {
                    name: name.clone(),
                    version,
                    reason: "crash test".into(),
                    ..Default::default()
                };
                round.call(c.revoke_secret(req)).await.map(|_| {
                    let mut l = round.ledger();
                    l.revoked.insert((name, version));
                    l.count("RevokeSecret (version)");
                })
            }
            3 if !replaced.is_empty() => {
                let (name, version) = replaced[rng.gen_range(0..replaced.len())].clone();
                round.ledger().retire_sent.insert((name.clone(), version));
                let req = pb::SetVersionStateRequest {
                    name: name.clone(),
                    version,
                    state: pb::VersionState::Inactive as i32,
                    ..Default::default()
                };
                round.call(c.set_version_state(req)).await.map(|_| {
                    let mut l = round.ledger();
                    l.retired.insert((name, version));
                    l.count("SetVersionState INACTIVE");
                })
            }
            4 if !throwaway_done => {
                throwaway_done = true;
                throwaway(&round, &mut c, &format!("{PREFIX}x{}", round.number)).await
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => {}
            Err(st) if round.carry_on("a lifecycle call", &st) => {}
            Err(_) => return,
        }
    }
}

/// Issues the key `name`, then revokes the whole secret.
async fn throwaway(round: &Round, c: &mut RawClient, name: &str) -> Result<(), Status> {
    round.ledger().names.insert(name.to_owned());
    let req = pb::IssueKeyRequest {
        name: name.to_owned(),
        ..Default::default()
    };
    let r = round.call(c.issue_key(req)).await?;
    round.ledger().ack_key(name, r.version, r.api_key);
    round.ledger().count("IssueKey");
    round.ledger().revoke_all_sent.insert(name.to_owned());
    let req = pb::RevokeSecretRequest {
        name: name.to_owned(),
        all_versions: true,
        reason: "crash test".into(),
        ..Default::default()
    };
    round.call(c.revoke_secret(req)).await?;
    round.ledger().revoked_all.insert(name.to_owned());
    round.ledger().count("RevokeSecret (all versions)");
    Ok(())
}

/// Verifies the quota keys as fast as the server answers, counting the answers.
async fn verifier(round: Round, mut k: KeysClient, mut rng: StdRng) {
    let keys: Vec<(String, String)> = round
        .ledger()
        .quotas
        .iter()
        .map(|(n, q)| (n.clone(), q.key.clone()))
        .collect();
    while round.running() {
        let (name, key) = &keys[rng.gen_range(0..keys.len())];
        let req = pb::VerifyKeyRequest {
            api_key: key.clone(),
            ..Default::default()
        };
        match round.call(k.verify_key(req)).await {
            Ok(v) => {
                let mut l = round.ledger();
                *l.answers.entry(name.clone()).or_default() += 1;
                l.count("VerifyKey");
                let q = l.quotas.get_mut(name).unwrap();
                match v.result() {
                    pb::VerifyResult::Valid => q.valid += 1,
                    pb::VerifyResult::QuotaExceeded => {
                        q.exceeded += 1;
                        q.spent_in_round.get_or_insert(round.number);
                    }
                    other => panic!("{name}: unexpected {other:?}"),
                }
            }
            Err(st) if round.carry_on("VerifyKey", &st) => {}
            Err(_) => return,
        }
    }
}

/// Which of [`Seen`]'s sets a change record adds to.
#[derive(Debug, Clone, Copy)]
enum Which {
    Written,
    Revoked,
    Retired,
}

/// (name, version) → how many change records name it that no void record undid.
#[derive(Default)]
struct Applied(HashMap<(String, u64), u32>);

impl Applied {
    fn add(&mut self, k: (String, u64)) {
        *self.0.entry(k).or_default() += 1;
    }

    fn remove(&mut self, k: &(String, u64)) {
        if let Some(n) = self.0.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(k);
            }
        }
    }

    fn contains(&self, k: &(String, u64)) -> bool {
        self.0.contains_key(k)
    }

    fn iter(&self) -> impl Iterator<Item = &(String, u64)> {
        self.0.keys()
    }
}

/// What the checks have seen so far: the audit log, read incrementally (each restart from
/// where the last read ended), and which versions' values were read back.
struct Seen {
    /// The last record read, and its hash.
    head: u64,
    head_hash: Vec<u8>,
    /// (name, version) of every successful PutSecret, RotateSecret and IssueKey record that
    /// no void record undid (a change's record is written before its change: see
    /// docs/security.md), counted.
    written: Applied,
    /// Targets of successful RevokeSecret and SetVersionState records, as `written`.
    revoked: Applied,
    retired: Applied,
    /// Change records seen: sequence number → which set, and their targets (for voids).
    changes: HashMap<u64, (Which, Vec<(String, u64)>)>,
    /// VerifyKey records, by the secret they name.
    verifications: HashMap<String, u64>,
    /// Versions whose value was read back and found right.
    read_back: HashSet<(String, u64)>,
}

impl Seen {
    fn new() -> Self {
        Self {
            head: 0,
            head_hash: vec![0; 32],
            written: Applied::default(),
            revoked: Applied::default(),
            retired: Applied::default(),
            changes: HashMap::new(),
            verifications: HashMap::new(),
            read_back: HashSet::new(),
        }
    }

    fn set(&mut self, which: Which) -> &mut Applied {
        match which {
            Which::Written => &mut self.written,
            Which::Revoked => &mut self.revoked,
            Which::Retired => &mut self.retired,
        }
    }

    /// Reads the records after `head`, checking that `head` itself is unchanged and that each
    /// new record follows and links to the one before.
    async fn catch_up(&mut self, a: &mut AuditClient, round: usize) {
        let req = pb::StreamAuditRequest {
            from_seq: self.head.max(1),
            ..Default::default()
        };
        let (records, gaps) = crate::audit::read_stream(a, req, usize::MAX).await;
        assert!(
            gaps.is_empty(),
            "round {round}: the audit log has gaps: {gaps:?}"
        );
        let mut records = records.into_iter();
        if self.head > 0 {
            let r = records.next().expect("the last audit record read is gone");
            assert_eq!(
                (r.seq, &r.hash),
                (self.head, &self.head_hash),
                "round {round}: audit record {} changed across the restart",
                self.head
            );
        }
        for r in records {
            assert_eq!(r.seq, self.head + 1, "round {round}: audit sequence");
            assert_eq!(
                r.prev_hash, self.head_hash,
                "round {round}: audit record {} does not link to the one before",
                r.seq
            );
            self.head = r.seq;
            self.head_hash = r.hash.clone();
            if r.kind == pb::AuditRecordKind::Void as i32 {
                // (Voids of changes this test does not track, such as UpdateKeyPolicy, too.)
                if let Some((which, targets)) = self.changes.remove(&r.voided_seq) {
                    for t in targets {
                        self.set(which).remove(&t);
                    }
                }
                continue;
            }
            if r.kind != pb::AuditRecordKind::Call as i32 || r.code != Code::Ok as i32 {
                continue;
            }
            let targets: Vec<(String, u64)> = r
                .targets
                .iter()
                .map(|t| (t.name.clone(), t.version))
                .collect();
            let which = match r.method.as_str() {
                "PutSecret" | "RotateSecret" | "IssueKey" => Some(Which::Written),
                "RevokeSecret" => Some(Which::Revoked),
                "SetVersionState" => Some(Which::Retired),
                _ => None,
            };
            if let Some(which) = which {
                for t in &targets {
                    self.set(which).add(t.clone());
                }
                self.changes.insert(r.seq, (which, targets.clone()));
            }
            if r.method == "VerifyKey" {
                for (name, _) in targets {
                    *self.verifications.entry(name).or_default() += 1;
                }
            }
        }
    }
}

/// Checks the restarted server against the ledger and the audit log. Returns how many present
/// versions were never acknowledged (written, reply lost to the kill).
async fn verify(
    s: &TestServer,
    ledger: &Mutex<Ledger>,
    seen: &mut Seen,
    round: usize,
    full: bool,
) -> usize {
    let l = ledger.lock().unwrap().clone();

    // The audit log: intact, and a record for everything acknowledged.
    let mut a = s.audit_client("admin").await;
    let v = ok(
        a.verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await,
        "VerifyAuditLog",
    );
    assert!(v.ok, "round {round}: audit log broken: {v:?}");
    seen.catch_up(&mut a, round).await;
    for k in l.acked_versions() {
        assert!(
            seen.written.contains(k),
            "round {round}: acknowledged write {k:?} has no audit record"
        );
    }
    for k in &l.revoked {
        assert!(
            seen.revoked.contains(k),
            "round {round}: acknowledged revocation of {k:?} has no audit record"
        );
    }
    for k in &l.retired {
        assert!(
            seen.retired.contains(k),
            "round {round}: acknowledged retirement of {k:?} has no audit record"
        );
    }
    for (name, n) in &l.answers {
        let records = seen.verifications.get(name).copied().unwrap_or(0);
        assert!(
            records >= *n,
            "round {round}: {n} VerifyKey answers on {name} received, {records} audited"
        );
    }

    // Every secret: versions, states, values, against the ledger and the audit log.
    let mut c = s.raw_client("admin").await;
    let listed_names: Vec<String> = crate::list_pages(
        &mut c,
        pb::ListSecretsRequest {
            name_prefix: PREFIX.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|st| panic!("round {round}: list: {st:?}"))
    .into_iter()
    .map(|m| m.name)
    .collect();
    let mut listed: HashMap<(String, u64), pb::VersionState> = HashMap::new();
    for name in &listed_names {
        assert!(
            l.names.contains(name),
            "round {round}: {name} exists but no call created it"
        );
        let meta = crate::describe(&mut c, name)
            .await
            .unwrap_or_else(|st| panic!("round {round}: describe {name}: {st:?}"));
        let numbers: Vec<u64> = meta.versions.iter().map(|v| v.version).collect();
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(
            numbers, expected,
            "round {round}: {name}: version numbering"
        );
        let mut readable = Vec::new();
        for vi in &meta.versions {
            let key = (name.clone(), vi.version);
            let state = vi.state();
            let allowed = l.allowed_states(name, vi.version, vi.version == numbers.len() as u64);
            assert!(
                allowed.contains(&state),
                "round {round}: {name}@{} is {state:?}, the calls sent allow {allowed:?}",
                vi.version
            );
            assert!(
                seen.written.contains(&key),
                "round {round}: {name}@{} exists without the audit record of its write",
                vi.version
            );
            match state {
                pb::VersionState::Revoked => assert!(
                    seen.revoked.contains(&key),
                    "round {round}: {name}@{} is REVOKED without an audit record",
                    vi.version
                ),
                pb::VersionState::Inactive => assert!(
                    seen.retired.contains(&key),
                    "round {round}: {name}@{} is INACTIVE without an audit record",
                    vi.version
                ),
                _ if full || !seen.read_back.contains(&key) => readable.push(vi.version),
                _ => {}
            }
            // The keyed fingerprint cannot be recomputed here (its key never leaves the
            // server); the values themselves are checked by reading them back.
            assert_eq!(
                vi.fingerprint.len(),
                32,
                "round {round}: {name}@{}",
                vi.version
            );
            listed.insert(key, state);
        }
        check_values(&mut c, name, &readable, &l, round).await;
        seen.read_back
            .extend(readable.into_iter().map(|v| (name.clone(), v)));
    }
    let lost: Vec<_> = l
        .acked_versions()
        .filter(|k| !listed.contains_key(*k))
        .collect();
    assert!(
        lost.is_empty(),
        "round {round}: acknowledged writes lost: {lost:?}"
    );
    for k in seen.written.iter() {
        assert!(
            !k.0.starts_with(PREFIX) || listed.contains_key(k),
            "round {round}: audited write {k:?} is not there"
        );
    }

    // Every acknowledged API key answers as its version's state says (a check that charges
    // nothing).
    let mut answers = HashMap::new();
    let mut keys = s.keys_client("admin").await;
    let checks = futures::stream::iter(l.keys.iter().map(|((name, version), key)| {
        let mut k = keys.clone();
        let req = pb::VerifyKeyRequest {
            api_key: key.clone(),
            cost: Some(0),
            ..Default::default()
        };
        async move { (name, *version, k.verify_key(req).await) }
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
    for (name, version, r) in checks {
        let got = ok(r, &format!("round {round}: verify {name}@{version}"));
        *answers.entry(name.clone()).or_insert(0u64) += 1;
        let want = match listed[&(name.clone(), version)] {
            pb::VersionState::Primary | pb::VersionState::Active => pb::VerifyResult::Valid,
            pb::VersionState::Inactive => pb::VerifyResult::Disabled,
            _ => pb::VerifyResult::Revoked,
        };
        assert_eq!(
            (got.result(), got.version),
            (want, version),
            "round {round}: the key of {name}@{version}"
        );
    }

    // Quotas: never over-admitted, and the server charged every VALID a client saw.
    let mut charges = Vec::new();
    for (name, q) in &l.quotas {
        let usage = ok(
            keys.get_key_usage(pb::GetKeyUsageRequest {
                name: name.clone(),
                version: 0,
            })
            .await,
            "GetKeyUsage",
        );
        let left = usage
            .quota_remaining
            .expect("a quota key reports its balance");
        assert!(
            left <= q.limit,
            "round {round}: {name}: {left} left of {}",
            q.limit
        );
        let charged = q.limit - left;
        assert!(
            q.valid <= q.limit,
            "round {round}: {name}: over-admitted: {} VALID answers, limit {}",
            q.valid,
            q.limit
        );
        assert!(
            q.valid <= charged,
            "round {round}: {name}: {} VALID answers seen but only {charged} charged: a charge \
             was lost",
            q.valid
        );
        charges.push((name.clone(), charged));
    }
    {
        let mut l = ledger.lock().unwrap();
        for (name, n) in answers {
            *l.answers.entry(name).or_default() += n;
        }
        for (name, charged) in charges {
            l.quotas.get_mut(&name).unwrap().charged = charged;
        }
    }

    // The keyring.
    let mut admin = pb::admin_client::AdminClient::new(s.channel("admin").await);
    let ring = admin
        .describe_keyring(pb::DescribeKeyringRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        ring.current_term >= l.acked_term,
        "round {round}: keyring at term {} but term {} was acknowledged",
        ring.current_term,
        l.acked_term
    );
    let terms: Vec<u32> = ring.terms.iter().map(|t| t.term).collect();
    assert_eq!(
        terms,
        (1..=ring.current_term).collect::<Vec<_>>(),
        "round {round}: keyring terms"
    );
    listed
        .keys()
        .filter(|k| !l.acked.contains_key(*k) && !l.keys.contains_key(*k))
        .count()
}

/// Fetches the `readable` versions of `name`: each decrypts to the acknowledged value or key,
/// else (reply lost to the kill) to a value sent to that name or a well-formed key.
async fn check_values(c: &mut RawClient, name: &str, readable: &[u64], l: &Ledger, round: usize) {
    for chunk in readable.chunks(100) {
        let items = chunk
            .iter()
            .map(|v| pb::FetchSecretRequest {
                name: name.to_owned(),
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
            let key = (name.to_owned(), *v);
            let want = l
                .acked
                .get(&key)
                .map(Vec::as_slice)
                .or_else(|| l.keys.get(&key).map(String::as_bytes));
            match (want, l.sent.get(name)) {
                (Some(want), _) => assert!(
                    want == value,
                    "round {round}: {name}@{v} differs from the acknowledged write"
                ),
                (None, Some(values)) => assert!(
                    values.contains(&value),
                    "round {round}: {name}@{v} holds a value no writer sent to it"
                ),
                (None, None) => assert!(
                    std::str::from_utf8(&value).is_ok_and(|k| ApiKey::parse(k).is_ok()),
                    "round {round}: {name}@{v} holds no well-formed key"
                ),
            }
        }
    }
}
