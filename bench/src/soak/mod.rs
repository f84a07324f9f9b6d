//! `ward-bench soak`: a bounded mixed load for a fixed time against a fresh Ward dev server
//! (release build, real SoftHSM, durable store, audit on), watching what should not change.
//!
//! Workers run at a fixed total rate over a fixed working set: static secrets (fetch, batch
//! fetch, put, rotate) and API keys (verify, rotate, re-issue), old versions revoked as they go
//! and each name retired (all versions revoked, a fresh name put or issued) after
//! `--max-versions`, so no record grows without bound. The keyring is rotated every
//! `--keyring-every`, and one client follows the audit log (StreamAudit). Every operation on a
//! slot holds that slot's lock, so there are no write conflicts to excuse: any error counts.
//! Each answer is also checked against what the harness wrote (the PRIMARY's version and
//! checksum, the key's version and VALID result).
//!
//! Every `--sample-every` it records the server's RSS (/proc/PID/status VmRSS), open file
//! descriptors (/proc/PID/fd), the data directory's size, throughput, latency and errors, and
//! prints a row. At the end: the audit chain is verified, and the verdict compares the first
//! and last third of the samples (RSS growth, fd growth) and lists errors by gRPC code.

mod ops;
mod verdict;

use crate::server::{fd_count, server_bin, DevServer};
use crate::stats::percentile;
use ops::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Mutex as SlotLock;
use verdict::Verdict;
use ward_client::proto::{
    stream_audit_response, IssueKeyRequest, PutSecretRequest, RevokeSecretRequest,
    RotateSecretRequest, StreamAuditRequest, VerifyKeyRequest, VerifyResult,
};
use ward_client::{code_name, parse_duration, Client, Error, RetryPolicy};

/// Options of `ward-bench soak`.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// How long to run the load: seconds, or with a unit (90s, 10m, 1h)
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Concurrent workers
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Total operations per second across all workers (0: as fast as they go)
    #[arg(long, default_value_t = 400)]
    rate: u32,
    /// Time between samples of RSS, fds, disk and throughput
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    sample_every: Duration,
    /// Samples in this first part of the run are shown but left out of the RSS and fd verdict
    /// (caches filling, connections opening)
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    warmup: Duration,
    /// Static secrets in the working set
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(10..))]
    secrets: u64,
    /// API keys in the working set
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Versions a name reaches before it is retired (all revoked) and a fresh name replaces it
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..))]
    max_versions: u64,
    /// Time between keyring rotations
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    keyring_every: Duration,
    /// Value size in bytes
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// HTTP/2 connections the workers share
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Verdict: largest allowed RSS growth, last third of the samples against the first, %
    #[arg(long, default_value_t = 10.0)]
    max_rss_growth: f64,
    /// Verdict: largest allowed growth of the open-fd count, last third against the first
    #[arg(long, default_value_t = 8)]
    max_fd_growth: u64,
    /// The server's storage page cache, MiB (`limits.cache_mib`; default: the server's own).
    /// A small cache tells cache growth from a leak: the cache stops growing at its size
    #[arg(long)]
    cache_mib: Option<u64>,
    /// The ward-server binary (default: next to ward-bench)
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Also write the samples and the verdict as JSON to FILE
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What the load does, by weight (out of 100).
const MIX: [(Op, u32); 9] = [
    (Op::Fetch, 33),
    (Op::BatchFetch, 10),
    (Op::Verify, 25),
    (Op::Put, 8),
    (Op::RotateStatic, 5),
    (Op::RotateKey, 7),
    (Op::RevokeStatic, 5),
    (Op::RevokeKey, 5),
    (Op::IssueKey, 2),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Fetch,
    BatchFetch,
    Verify,
    Put,
    RotateStatic,
    RotateKey,
    RevokeStatic,
    RevokeKey,
    IssueKey,
    RotateKeyring,
    StreamAudit,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Fetch => "FetchSecret",
            Op::BatchFetch => "BatchFetchSecrets",
            Op::Verify => "VerifyKey",
            Op::Put => "PutSecret",
            Op::RotateStatic => "RotateSecret(static)",
            Op::RotateKey => "RotateSecret(key)",
            Op::RevokeStatic => "RevokeSecret(static)",
            Op::RevokeKey => "RevokeSecret(key)",
            Op::IssueKey => "IssueKey",
            Op::RotateKeyring => "RotateKeyring",
            Op::StreamAudit => "StreamAudit",
        }
    }
}

/// One name of the working set and what the harness knows it holds.
struct Slot {
    /// Slot number and generation make the name; a retired name is never reused.
    index: u64,
    generation: u64,
    /// The PRIMARY version (the latest written).
    primary: u64,
    /// Versions below this are revoked (or were never shown to be live).
    revoked_below: u64,
    /// Static secrets: the PRIMARY's checksum. API keys: unused.
    checksum: u32,
    /// API keys: the PRIMARY's plaintext key.
    key: String,
}

impl Slot {
    /// Slot `index` before its first write: generation 0, nothing live yet.
    fn first(index: u64) -> Self {
        Self {
            index,
            generation: 0,
            primary: 0,
            revoked_below: 1,
            checksum: 0,
            key: String::new(),
        }
    }

    fn name(&self, kind: &str) -> String {
        format!("soak/{kind}-{}-g{}", self.index, self.generation)
    }
}

/// Counters the workers add to and the sampler reads.
#[derive(Default)]
struct Window {
    ops: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<u32>,
}

struct Shared {
    statics: Vec<SlotLock<Slot>>,
    keys: Vec<SlotLock<Slot>>,
    value_size: usize,
    max_versions: u64,
    window: Mutex<Window>,
    totals: Mutex<Window>,
    keyring_term: AtomicU32,
    audit_records: AtomicU64,
}

impl Shared {
    fn record(&self, op: Op, started: Instant, result: Result<(), String>) {
        let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        for w in [&self.window, &self.totals] {
            let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
            match &result {
                Ok(()) => {
                    *w.ops.entry(op.name()).or_default() += 1;
                }
                Err(label) => {
                    *w.errors
                        .entry(format!("{} {label}", op.name()))
                        .or_default() += 1;
                }
            }
        }
        if result.is_ok() {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            w.latencies_us.push(us);
        }
    }
}

/// A value that differs per name and version, so a wrong version shows as a wrong checksum.
fn value(size: usize, name: &str, version: u64) -> Vec<u8> {
    let seed = format!("{name}@{version}:");
    seed.bytes().cycle().take(size.max(seed.len())).collect()
}

fn code(e: &Error) -> String {
    code_name(e.code()).to_owned()
}

/// One sample of the server and the load.
#[derive(Debug, Clone)]
struct Sample {
    at_secs: f64,
    rss_kib: u64,
    fds: u64,
    data_bytes: u64,
    ops: u64,
    ops_per_sec: f64,
    errors: u64,
    p50_us: u32,
    p99_us: u32,
    keyring_term: u32,
    audit_streamed: u64,
}

impl Sample {
    fn to_json(&self) -> Value {
        json!({
            "at_secs": self.at_secs,
            "rss_kib": self.rss_kib,
            "fds": self.fds,
            "data_bytes": self.data_bytes,
            "ops": self.ops,
            "ops_per_sec": self.ops_per_sec,
            "errors": self.errors,
            "latency_us": {"p50": self.p50_us, "p99": self.p99_us},
            "keyring_term": self.keyring_term,
            "audit_records_streamed": self.audit_streamed,
        })
    }
}

/// Runs the soak; `Err` for a run that could not be made, `Ok(false)` for a failed verdict.
pub async fn run(args: SoakArgs) -> Result<bool, String> {
    let bin = server_bin(args.server_bin.as_deref())?;
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let log = tmp.path().join("ward.log");
    let dir = tmp.path().join("ward");
    let mut server = DevServer::start(&bin, &dir, Some(&log))?;
    if let Some(mib) = args.cache_mib {
        // The dev server wrote its config on first start; restart it with the cache size set.
        drop(server);
        let path = dir.join("ward.toml");
        let config = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let config = config.replacen("[limits]\n", &format!("[limits]\ncache_mib = {mib}\n"), 1);
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        server = DevServer::serve_existing(&bin, &dir)?;
    }
    let pid = server.proc.pid();
    eprintln!(
        "ward-bench soak: server pid {pid} at {} (log {}), {} workers at {} ops/s for {:?}",
        server.addr,
        log.display(),
        args.concurrency,
        if args.rate == 0 {
            "unlimited".to_string()
        } else {
            args.rate.to_string()
        },
        args.duration
    );
    let clients = server.admin_clients(args.connections).await?;
    let setup_client = clients[0].clone();
    let clients: Vec<Client> = clients
        .into_iter()
        .map(|c| c.with_retry(RetryPolicy::none()))
        .collect();

    let shared = Arc::new(setup(&args, &setup_client).await?);
    let started = Instant::now();
    let end = started + args.duration;

    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..args.concurrency {
        let (shared, client) = (shared.clone(), clients[id as usize % clients.len()].clone());
        let period = (args.rate > 0)
            .then(|| Duration::from_secs_f64(f64::from(args.concurrency) / f64::from(args.rate)));
        tasks.spawn(worker(shared, client, u64::from(id), period, end));
    }
    let background = [
        tokio::spawn(rotate_keyring(
            shared.clone(),
            clients[0].clone(),
            args.keyring_every,
            end,
        )),
        tokio::spawn(follow_audit(shared.clone(), clients[0].clone())),
    ];

    println!(
        "{:>7} {:>9} {:>7} {:>8} {:>8} {:>5} {:>9} {:>5} {:>8}",
        "t (s)", "ops/s", "errors", "p99 µs", "RSS MiB", "fds", "disk MiB", "term", "audit/s"
    );
    let mut samples = Vec::new();
    let mut last_at = started;
    let mut last_streamed = 0;
    loop {
        let now = Instant::now();
        let done = tasks.is_empty() || now >= end;
        let window = std::mem::take(&mut *shared.window.lock().unwrap_or_else(|e| e.into_inner()));
        let mut lat = window.latencies_us;
        lat.sort_unstable();
        let secs = (now - last_at).as_secs_f64().max(1e-9);
        let streamed = shared.audit_records.load(Ordering::Relaxed);
        let s = Sample {
            at_secs: (now - started).as_secs_f64(),
            rss_kib: server.rss_kib().unwrap_or(0),
            fds: fd_count(pid).unwrap_or(0),
            data_bytes: server.data_bytes(),
            ops: window.ops.values().sum(),
            ops_per_sec: window.ops.values().sum::<u64>() as f64 / secs,
            errors: window.errors.values().sum(),
            p50_us: percentile(&lat, 0.50),
            p99_us: percentile(&lat, 0.99),
            keyring_term: shared.keyring_term.load(Ordering::Relaxed),
            audit_streamed: streamed,
        };
        println!(
            "{:>7.0} {:>9.0} {:>7} {:>8} {:>8.1} {:>5} {:>9.1} {:>5} {:>8.0}",
            s.at_secs,
            s.ops_per_sec,
            s.errors,
            s.p99_us,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.data_bytes as f64 / 1_048_576.0,
            s.keyring_term,
            (streamed - last_streamed) as f64 / secs
        );
        for (label, n) in &window.errors {
            println!("        errors: {n} × {label}");
        }
        samples.push(s);
        last_at = now;
        last_streamed = streamed;
        if done {
            break;
        }
        let next = (now + args.sample_every).min(end);
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(next));
        tokio::select! {
            () = sleep => {}
            // A worker that ends early (a bug) ends the run rather than hanging it.
            Some(r) = tasks.join_next() => r.map_err(|e| format!("worker failed: {e}"))?,
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| format!("worker failed: {e}"))?;
    }
    for t in background {
        t.abort();
    }

    // Verifying the whole chain reads every record: allow it more than one call's timeout.
    let audit = setup_client
        .clone()
        .with_timeout(Duration::from_secs(600))
        .verify_audit_log(0, 0)
        .await
        .map_err(|e| format!("VerifyAuditLog: {e}"))?;
    let totals = std::mem::take(&mut *shared.totals.lock().unwrap_or_else(|e| e.into_inner()));
    let verdict = Verdict::of(&samples, &totals, &args, audit.ok);
    verdict.print(&totals, audit.records_checked, started.elapsed());
    if let Some(path) = &args.json {
        let doc = json!({
            "duration_secs": args.duration.as_secs_f64(),
            "concurrency": args.concurrency,
            "rate": args.rate,
            "secrets": args.secrets,
            "keys": args.keys,
            "max_versions": args.max_versions,
            "keyring_every_secs": args.keyring_every.as_secs_f64(),
            "warmup_secs": args.warmup.as_secs_f64(),
            "value_size": args.value_size,
            "ops": totals.ops,
            "errors": totals.errors,
            "audit_chain_ok": audit.ok,
            "audit_records_checked": audit.records_checked,
            "samples": samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
            "verdict": verdict.to_json(),
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    drop(server);
    Ok(verdict.passed())
}

/// Puts the static secrets and issues the keys of generation 0 (SDK retries on: not measured).
async fn setup(args: &SoakArgs, client: &Client) -> Result<Shared, String> {
    let mut statics = Vec::new();
    for index in 0..args.secrets {
        let mut slot = Slot::first(index);
        let name = slot.name("s");
        let w = client
            .put_secret(PutSecretRequest {
                value: value(args.value_size, &name, 1),
                name: name.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("setup: putting {name}: {e}"))?;
        (slot.primary, slot.checksum) = (w.version, w.checksum);
        statics.push(SlotLock::new(slot));
    }
    let mut keys = Vec::new();
    for index in 0..args.keys {
        let mut slot = Slot::first(index);
        let name = slot.name("k");
        let k = client
            .issue_key(IssueKeyRequest {
                name: name.clone(),
                scopes: vec!["soak".into()],
                ..Default::default()
            })
            .await
            .map_err(|e| format!("setup: issuing {name}: {e}"))?;
        (slot.primary, slot.key) = (k.version, k.api_key);
        keys.push(SlotLock::new(slot));
    }
    let term = client
        .describe_keyring()
        .await
        .map_err(|e| format!("setup: DescribeKeyring: {e}"))?
        .current_term;
    Ok(Shared {
        statics,
        keys,
        value_size: args.value_size,
        max_versions: args.max_versions,
        window: Mutex::new(Window::default()),
        totals: Mutex::new(Window::default()),
        keyring_term: AtomicU32::new(term),
        audit_records: AtomicU64::new(0),
    })
}

/// One worker: a paced loop of operations drawn from [`MIX`] until `end`.
async fn worker(
    shared: Arc<Shared>,
    client: Client,
    id: u64,
    period: Option<Duration>,
    end: Instant,
) {
    let mut rng = (id + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut ticker = period.map(|p| {
        let mut t = tokio::time::interval(p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        if Instant::now() >= end {
            return;
        }
        let mut pick = next() % 100;
        let op = MIX
            .iter()
            .find(|(_, w)| {
                if pick < u64::from(*w) {
                    true
                } else {
                    pick -= u64::from(*w);
                    false
                }
            })
            .map_or(Op::Fetch, |(op, _)| *op);
        let r = next();
        let started = Instant::now();
        let result = match op {
            Op::Fetch => fetch(&shared, &client, r).await,
            Op::BatchFetch => batch_fetch(&shared, &client, r).await,
            Op::Verify => verify(&shared, &client, r).await,
            Op::Put => put(&shared, &client, r).await,
            Op::RotateStatic | Op::RotateKey => rotate(&shared, &client, r, op).await,
            Op::RevokeStatic | Op::RevokeKey => revoke_old(&shared, &client, r, op).await,
            Op::IssueKey => reissue(&shared, &client, r).await,
            Op::RotateKeyring | Op::StreamAudit => Ok(()),
        };
        shared.record(op, started, result);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: SoakArgs,
    }

    fn sample(at_secs: f64, rss_kib: u64, fds: u64) -> Sample {
        Sample {
            at_secs,
            rss_kib,
            fds,
            data_bytes: (at_secs as u64) * 1_048_576,
            ops: 100,
            ops_per_sec: 10.0,
            errors: 0,
            p50_us: 1,
            p99_us: 2,
            keyring_term: 1,
            audit_streamed: 0,
        }
    }

    #[test]
    fn flags_and_defaults() {
        let a = Wrap::try_parse_from(["soak"]).unwrap().args;
        assert_eq!(a.duration, Duration::from_secs(600));
        assert_eq!((a.concurrency, a.rate, a.secrets, a.keys), (8, 400, 64, 32));
        assert_eq!(a.sample_every, Duration::from_secs(10));
        let a = Wrap::try_parse_from(["soak", "--duration", "90s", "--sample-every", "500ms"])
            .unwrap()
            .args;
        assert_eq!(a.duration, Duration::from_secs(90));
        assert_eq!(a.sample_every, Duration::from_millis(500));
        assert!(Wrap::try_parse_from(["soak", "--secrets", "5"]).is_err());
    }

    #[test]
    fn verdict_compares_the_first_and_last_third() {
        let args = Wrap::try_parse_from(["soak"]).unwrap().args;
        let quiet = Window::default();
        // A warm-up sample at 0 s is left out of the judgement.
        let flat: Vec<Sample> = std::iter::once(sample(0.0, 10_000, 10))
            .chain((1..10).map(|i| sample(f64::from(i) * 60.0, 100_000, 40)))
            .collect();
        let v = Verdict::of(&flat, &quiet, &args, true);
        assert!(v.passed() && v.rss_growth_pct.abs() < 1e-9);
        assert!((v.disk_mib_per_min - 60.0).abs() < 1e-9);

        let growing: Vec<Sample> = (0..9)
            .map(|i| {
                let t = 60.0 + f64::from(i) * 60.0;
                sample(t, 100_000 + 10_000 * i as u64, 40 + i as u64 * 3)
            })
            .collect();
        let v = Verdict::of(&growing, &quiet, &args, true);
        assert!(!v.rss_flat() && !v.fds_flat() && !v.passed());
        // Means 110 000 and 170 000 KiB: +54.5 %.
        assert!(
            (v.rss_growth_pct - 600.0 / 11.0).abs() < 1e-9,
            "{}",
            v.rss_growth_pct
        );

        let mut errors = Window::default();
        errors.errors.insert("FetchSecret UNAVAILABLE".into(), 1);
        assert!(!Verdict::of(&flat, &errors, &args, true).passed());
        assert!(!Verdict::of(&flat, &quiet, &args, false).passed());
    }
}
