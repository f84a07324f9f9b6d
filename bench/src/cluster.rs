//! `ward-bench suite --backend etcd`: Ward replicas on a shared etcd, measured in one run beside
//! what they are judged against. Starts a three-member etcd on loopback (plain http, each
//! member its own data directory and ports) and two `ward-server serve` replicas, A and B, on
//! copies of the dev server's configuration: each its own `data_dir` (replica id, audit log),
//! the dev files shared (SoftHSM token and PIN, CA and certificates, policy). The sled-backed
//! dev server that made those files keeps running as the sled peer. Drives fetch, verify and put
//! on the dev server and on replica A, and raw etcd Range/Put on the same cluster, at each
//! concurrency, interleaved; then measures how long a revocation (and a new secret) made on A
//! takes to be seen on B.

use crate::server::{cpu_us, DevServer, Proc};
use crate::stats::{Summary, WorkerStats};
use crate::suite::{self, measure, Row, SuiteArgs, Target};
use crate::workload::{run_prefix, EtcdKv, EtcdPut, EtcdRange, Fetch, Put, Verify, Workload};
use crate::Spec;
use serde_json::{json, Value};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use ward_client::proto::{
    IssueKeyRequest, PutSecretRequest, RevokeSecretRequest, VerifyKeyRequest, VerifyResult,
};
use ward_client::{Client, RetryPolicy};

/// Members of the etcd cluster.
const MEMBERS: usize = 3;

/// The replicas' key prefix in etcd.
const PREFIX: &str = "/ward/";

/// A change B has not shown this long after A answered counts as missed (and ends the poll).
const SEEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A three-member etcd cluster on loopback; its members are killed when it is dropped.
pub struct EtcdCluster {
    members: Vec<Proc>,
    /// The members' client URLs.
    pub endpoints: Vec<String>,
}

impl EtcdCluster {
    /// Starts the members (`bin` is Debian's etcd) with their data and logs under `dir`, and
    /// waits until each of them takes a Put.
    pub async fn start(bin: &Path, dir: &Path) -> Result<Self, String> {
        // Hold every listener until all ports are chosen, so no two members get the same one.
        let listeners = (0..2 * MEMBERS)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let urls = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| format!("http://{a}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        drop(listeners);
        let (clients, peers) = urls.split_at(MEMBERS);
        let initial = peers
            .iter()
            .enumerate()
            .map(|(i, url)| format!("m{i}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(MEMBERS);
        for (i, (client, peer)) in clients.iter().zip(peers).enumerate() {
            let log = dir.join(format!("etcd-m{i}.log"));
            let log = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let child = Command::new(bin)
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(dir.join(format!("etcd-m{i}")))
                .args(["--listen-client-urls", client])
                .args(["--advertise-client-urls", client])
                .args(["--listen-peer-urls", peer])
                .args(["--initial-advertise-peer-urls", peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "ward-bench"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            members.push(Proc(child));
        }
        let cluster = Self {
            members,
            endpoints: clients.to_vec(),
        };
        for url in &cluster.endpoints {
            wait_ready(url, dir).await?;
        }
        Ok(cluster)
    }

    /// The members' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(Proc::pid).collect()
    }

    /// A KV client spread over every member, as a replica's etcd client is.
    pub fn kv(&self) -> Result<EtcdKv, String> {
        let endpoints = self
            .endpoints
            .iter()
            .map(|u| Endpoint::from_shared(u.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("etcd endpoint: {e}"))?;
        Ok(EtcdKv::new(Channel::balance_list(endpoints.into_iter())))
    }
}

/// Waits (at most 30 s) until the member at `url` takes a Put: the cluster has a leader.
async fn wait_ready(url: &str, dir: &Path) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
    match etcd_ready(&endpoint).await {
        Some(_) => Ok(()),
        None => Err(format!(
            "etcd member {url} did not become ready (see {}/etcd-m*.log)",
            dir.display()
        )),
    }
}

/// Connects to `endpoint` until a Put goes through (at most 30 s); the client, or None.
pub async fn etcd_ready(endpoint: &Endpoint) -> Option<EtcdKv> {
    for _ in 0..150 {
        if let Ok(channel) = endpoint.connect().await {
            let mut kv = EtcdKv::new(channel);
            let put = kv
                .put(crate::workload::etcd::PutRequest {
                    key: b"bench/ready".to_vec(),
                    value: b"1".to_vec(),
                    ..Default::default()
                })
                .await;
            if put.is_ok() {
                return Some(kv);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Writes `ward-<name>.toml` beside the dev server's `ward.toml` in `dir`: the same settings
/// (so the dev files are shared), its own `data_dir`, the store on etcd, and the unknown-key
/// limits raised — B is polled for keys it has not seen yet, which would otherwise trip them.
fn replica_config(dir: &Path, name: &str, endpoints: &[String]) -> Result<PathBuf, String> {
    let base = dir.join("ward.toml");
    let text = std::fs::read_to_string(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    let mut out = String::with_capacity(text.len() + 256);
    let mut data_dir = false;
    for line in text.lines() {
        match line.split('=').next().map(str::trim) {
            Some("data_dir") => {
                data_dir = true;
                out.push_str(&format!("data_dir = \"replica-{name}\""));
            }
            Some("unknown_key_burst") => out.push_str("unknown_key_burst = 1000000"),
            Some("unknown_keys_per_minute") => out.push_str("unknown_keys_per_minute = 1000000"),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    if !data_dir {
        return Err(format!("{} names no data_dir", base.display()));
    }
    let endpoints = endpoints
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    out.push_str(&format!(
        "\n[store]\nbackend = \"etcd\"\n\n[store.etcd]\nendpoints = [{endpoints}]\n\
         prefix = \"{PREFIX}\"\n"
    ));
    let path = dir.join(format!("ward-{name}.toml"));
    std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// CPU per call of one Ward row: the server's, and that of the processes behind it (the etcd
/// members and the other replica; none for the sled server).
type Cpu = (Option<f64>, Option<f64>);

/// A Ward row with the CPU time (user + system) the server process `pid`, and the processes
/// `behind` it together, spent on it, per call: less moved by a busy machine than the
/// throughput. The window includes the workload's setup (at most 100 calls) and the warm-up,
/// whose calls are taken to have run at the measured rate.
async fn measure_cpu<W: Workload>(
    (name, c): (&'static str, u32),
    workload: W,
    clients: &[W::Client],
    spec: &impl Fn(&'static str, u32) -> Spec,
    (pid, behind): (u32, &[u32]),
) -> Result<(Row, Cpu), String> {
    let total = |pids: &[u32]| pids.iter().map(|&p| cpu_us(p)).sum::<Option<u64>>();
    let before = (cpu_us(pid), total(behind));
    let row = measure(name, c, workload, clients, spec).await?;
    let after = (cpu_us(pid), total(behind));
    let s = &row.summary;
    let calls = s.ops as f64 + s.ops_per_sec * spec(name, c).warmup.as_secs_f64();
    let per_call = |b: Option<u64>, a: Option<u64>| match (b, a) {
        (Some(b), Some(a)) if calls >= 1.0 => Some(a.saturating_sub(b) as f64 / calls),
        _ => None,
    };
    let others = if behind.is_empty() {
        None
    } else {
        per_call(before.1, after.1)
    };
    Ok((row, (per_call(before.0, after.0), others)))
}

/// How long changes made on A took to show on B.
struct Propagation {
    /// Time from A's answer to B's first answer showing the change.
    summary: Summary,
    /// Polls of B made, and the time they took (the resolution: one poll's round trip).
    polls: u64,
    polling: Duration,
    /// Samples whose first poll already showed the change: for these the figure is one
    /// round trip to B, an upper bound on the propagation itself.
    first_poll: u64,
}

impl Propagation {
    fn new(stats: WorkerStats, (polls, polling, first_poll): (u64, Duration, u64)) -> Self {
        Self {
            summary: Summary::merge(vec![stats], polling),
            polls,
            polling,
            first_poll,
        }
    }

    /// Adds one sample's polls: `t` spent in `polls` calls.
    fn add(acc: &mut (u64, Duration, u64), t: Duration, polls: u64) {
        acc.0 += polls;
        acc.1 += t;
        acc.2 += u64::from(polls == 1);
    }

    fn poll_us(&self) -> f64 {
        self.polling.as_secs_f64() * 1e6 / self.polls.max(1) as f64
    }

    fn print(&self, what: &str) {
        let ms = |us: u32| f64::from(us) / 1000.0;
        let s = &self.summary;
        println!(
            "  {what:<22} {:>5} samples  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  \
             missed {}  (one poll every {:.0} µs; {} seen on the first poll)",
            s.ops,
            ms(s.p50_us),
            ms(s.p99_us),
            ms(s.max_us),
            s.error_count(),
            self.poll_us(),
            self.first_poll
        );
    }

    fn to_json(&self) -> Value {
        let s = &self.summary;
        json!({
            "samples": s.ops,
            "missed": s.error_count(),
            "latency_us": {"p50": s.p50_us, "p99": s.p99_us, "max": s.max_us, "mean": s.mean_us},
            "polls": self.polls,
            "mean_poll_us": self.poll_us(),
            "seen_on_first_poll": self.first_poll,
        })
    }
}

/// Calls `probe` back to back until it answers true or [`SEEN_TIMEOUT`] passes; returns how
/// long after the call it answered true (or gave up), whether it did, and how many calls it
/// made.
async fn poll_until<F, Fut>(mut probe: F) -> (Duration, bool, u64)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let mut polls = 0;
    loop {
        let seen = probe().await;
        polls += 1;
        let elapsed = start.elapsed();
        if seen || elapsed > SEEN_TIMEOUT {
            return (elapsed, seen, polls);
        }
    }
}

/// Records one sample; one never seen counts as missed and with the time given up after, so
/// the percentiles are not flattered by leaving it out.
fn record(stats: &mut WorkerStats, t: Duration, seen: bool) {
    stats.ok(t);
    if !seen {
        stats.error("NOT_SEEN");
    }
}

async fn verify_on(b: &Client, api_key: &str) -> Option<VerifyResult> {
    let req = VerifyKeyRequest {
        api_key: api_key.to_owned(),
        ..Default::default()
    };
    b.verify_key(req).await.ok().map(|v| v.result())
}

/// `samples` times: a key issued on A is polled on B until VALID, revoked on A, and polled on
/// B until REVOKED (the time measured); then a new secret put on A is polled on B until it
/// fetches. Returns (revocation, put) propagation.
async fn propagation(
    a: &Client,
    b: &Client,
    samples: u32,
) -> Result<(Propagation, Propagation), String> {
    eprintln!("ward-bench: propagation A -> B, {samples} samples");
    let prefix = run_prefix();
    let (mut revoked, mut put) = (WorkerStats::new(), WorkerStats::new());
    let (mut revoke_polls, mut put_polls) = ((0, Duration::ZERO, 0), (0, Duration::ZERO, 0));
    for i in 0..samples {
        let name = format!("bench/propagation-{prefix}-{i}");
        let key = a
            .issue_key(IssueKeyRequest {
                name: name.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("issuing {name} on A: {e}"))?
            .api_key;
        let valid =
            poll_until(|| async { verify_on(b, &key).await == Some(VerifyResult::Valid) }).await;
        if !valid.1 {
            return Err(format!("{name}, issued on A, never verified VALID on B"));
        }
        a.revoke_secret(RevokeSecretRequest {
            name: name.clone(),
            all_versions: true,
            reason: "ward-bench propagation".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("revoking {name} on A: {e}"))?;
        let (t, seen, polls) =
            poll_until(|| async { verify_on(b, &key).await == Some(VerifyResult::Revoked) }).await;
        record(&mut revoked, t, seen);
        Propagation::add(&mut revoke_polls, t, polls);

        let secret = format!("bench/propagation-put-{prefix}-{i}");
        a.put_secret(PutSecretRequest {
            name: secret.clone(),
            value: b"propagation".to_vec(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("writing {secret} on A: {e}"))?;
        let (t, seen, polls) =
            poll_until(|| async { b.fetch_secret(&secret, 0).await.is_ok() }).await;
        record(&mut put, t, seen);
        Propagation::add(&mut put_polls, t, polls);
    }
    Ok((
        Propagation::new(revoked, revoke_polls),
        Propagation::new(put, put_polls),
    ))
}

/// The Ward rows with their CPU per call (`cpu[i]` belongs to the i-th Ward row).
fn ward_cpu<'a>(rows: &'a [Row], cpu: &'a [Cpu]) -> impl Iterator<Item = (&'a Row, Cpu)> {
    rows.iter()
        .filter(|r| !r.workload.starts_with("etcd-"))
        .zip(cpu.iter().copied())
}

/// Prints the CPU per call of the Ward rows, sled beside etcd.
fn print_cpu(rows: &[Row], cpu: &[Cpu]) {
    println!(
        "CPU per call, µs (utime + stime over the row): the server; for replica A also the \
         etcd members and replica B together"
    );
    let us = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
    let mut line = String::new();
    for (r, (server, behind)) in ward_cpu(rows, cpu) {
        line.push_str(&format!(
            "  {} c={}: {}",
            r.workload,
            r.concurrency,
            us(server)
        ));
        if r.workload.ends_with("-etcd") {
            println!("{line} + {}", us(behind));
            line.clear();
        }
    }
}

/// The rows as JSON, the Ward rows with their CPU per call.
fn rows_json(rows: &[Row], cpu: &[Cpu]) -> Vec<Value> {
    let mut out = suite::rows_json(rows);
    for (r, (server, behind)) in ward_cpu(rows, cpu) {
        if let Some(Value::Object(m)) = out
            .iter_mut()
            .find(|d| d["workload"] == r.workload && d["concurrency"] == r.concurrency)
        {
            m.insert("server_cpu_us_per_call".into(), server.into());
            if behind.is_some() {
                m.insert("etcd_and_replica_b_cpu_us_per_call".into(), behind.into());
            }
        }
    }
    out
}

/// Runs the etcd suite. `sled` is the dev server the suite started (its files are shared by
/// the replicas; it stays up as the sled peer).
pub async fn run(
    args: &SuiteArgs,
    server_bin: &Path,
    dir: &Path,
    sled: &DevServer,
    (warmup, duration): (f64, f64),
) -> Result<(), String> {
    let cluster = EtcdCluster::start(&args.etcd_bin, dir).await?;
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let config = replica_config(&sled.dir, name, &cluster.endpoints)?;
        let log = dir.join(format!("replica-{name}.log"));
        // One after the other: the first creates the cluster's keyring, the second reads it.
        let replica = DevServer::serve_config(server_bin, &sled.dir, &config, Some(&log))
            .map_err(|e| format!("replica {name}: {e} (see {})", log.display()))?;
        replicas.push(replica);
    }
    let no_retry = |clients: Vec<Client>| -> Vec<Client> {
        clients
            .into_iter()
            .map(|c| c.with_retry(RetryPolicy::none()))
            .collect()
    };
    let sled_clients = no_retry(sled.admin_clients(args.connections).await?);
    let a = no_retry(replicas[0].admin_clients(args.connections).await?);
    let b = no_retry(replicas[1].admin_clients(1).await?);
    let etcd = vec![cluster.kv()?];

    let v = args.value_size;
    let spec = suite::row_spec(warmup, duration);
    let mut rows: Vec<Row> = Vec::new();
    let mut cpu: Vec<Cpu> = Vec::new();
    let mut behind = cluster.pids();
    behind.push(replicas[1].proc.pid());
    let (sled_pid, a_pid) = (
        (sled.proc.pid(), &[][..]),
        (replicas[0].proc.pid(), &behind[..]),
    );
    for &c in &args.concurrency {
        let ward_rows = [
            measure_cpu(
                ("fetch-sled", c),
                Fetch::new(v),
                &sled_clients,
                &spec,
                sled_pid,
            )
            .await?,
            measure_cpu(("fetch-etcd", c), Fetch::new(v), &a, &spec, a_pid).await?,
            measure_cpu(
                ("verify-sled", c),
                Verify::default(),
                &sled_clients,
                &spec,
                sled_pid,
            )
            .await?,
            measure_cpu(("verify-etcd", c), Verify::default(), &a, &spec, a_pid).await?,
            measure_cpu(("put-sled", c), Put::new(v), &sled_clients, &spec, sled_pid).await?,
            measure_cpu(("put-etcd", c), Put::new(v), &a, &spec, a_pid).await?,
        ];
        for (row, per_call) in ward_rows {
            rows.push(row);
            cpu.push(per_call);
        }
        rows.push(measure("etcd-range", c, EtcdRange::new(v), &etcd, &spec).await?);
        rows.push(measure("etcd-put", c, EtcdPut::new(v), &etcd, &spec).await?);
    }
    // Setup calls retry as the SDK does by default; the polls of B do not (a failed poll is
    // just not yet seen).
    let a_setup = a[0].clone().with_retry(RetryPolicy::default());
    let (revoke, put) = propagation(&a_setup, &b[0], args.samples).await?;

    println!(
        "ward-bench suite --backend etcd: 2 replicas on a {MEMBERS}-member etcd (loopback, \
         plain http) beside a sled dev server; value {v} B, {} connection(s), warm-up \
         {warmup} s, {duration} s per row",
        args.connections
    );
    println!("  fetch/verify/put-etcd: replica A; etcd-range/put: raw etcd on the same cluster");
    suite::print_rows(&rows);
    print_cpu(&rows, &cpu);
    println!(
        "propagation A -> B (from A's answer to B's first answer showing the change; B polled \
         back to back by one client):"
    );
    revoke.print("revoke -> REVOKED");
    put.print("put -> fetch");
    let c = args.concurrency.iter().copied().max().unwrap_or(64);
    let ratio = |x, y| suite::ratio(&rows, x, y, c, false);
    let revoke_p99_ms = Some(f64::from(revoke.summary.p99_us) / 1000.0);
    let targets: [Target; 4] = [
        (
            "fetch etcd/sled ops/s",
            ratio("fetch-etcd", "fetch-sled"),
            ">= 0.9",
        ),
        (
            "verify etcd/sled ops/s",
            ratio("verify-etcd", "verify-sled"),
            ">= 0.9",
        ),
        (
            "put etcd/etcd-put ops/s",
            ratio("put-etcd", "etcd-put"),
            ">= 0.8",
        ),
        ("revoke A->B p99 ms", revoke_p99_ms, "<= 100"),
    ];
    println!("ratios at c={c}:");
    let json_ratios = suite::print_targets(&targets);
    if let Some(path) = &args.json {
        let doc = json!({
            "backend": "etcd",
            "etcdmembers": MEMBERS,
            "replicas": replicas.len(),
            "value_size": v,
            "connections": args.connections,
            "warmup_secs": warmup,
            "duration_secs": duration,
            "rows": rows_json(&rows, &cpu),
            "propagation": {"revoke": revoke.to_json(), "put": put.to_json()},
            "ratios": Value::Object(json_ratios),
        });
        suite::write_json(path, &doc)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ward_server::config::{Backend, Config};

    #[test]
    fn replica_config_keeps_the_dev_files_and_moves_the_store_to_etcd() {
        let dir = tempfile::tempdir().unwrap();
        let listen = "127.0.0.1:0".parse().unwrap();
        ward_server::dev::prepare_files(dir.path(), listen).unwrap();
        let endpoints = vec![
            "http://127.0.0.1:2379".to_string(),
            "http://127.0.0.1:22379".to_string(),
        ];
        let path = replica_config(dir.path(), "a", &endpoints).unwrap();
        let dev = Config::load(&dir.path().join("ward.toml")).unwrap();
        let replica = Config::load(&path).unwrap();

        assert_eq!(replica.data_dir, dir.path().join("replica-a"));
        assert_eq!(dev.data_dir, dir.path().join("data"));
        assert_eq!(replica.store.backend, Backend::Etcd);
        let etcd = replica.store.etcd.as_ref().unwrap();
        assert_eq!(etcd.endpoints, endpoints);
        assert_eq!(etcd.prefix, PREFIX);
        assert_eq!(dev.store.backend, Backend::Sled);
        assert_eq!(replica.keys.unknown_key_burst, 1_000_000);
        assert_eq!(replica.keys.unknown_keys_per_minute, 1_000_000);
        // Everything else is the dev server's: the same token, PIN, certificates and policy.
        assert_eq!(replica.hsm.pin_file, dev.hsm.pin_file);
        assert_eq!(replica.hsm.softhsm_conf, dev.hsm.softhsm_conf);
        assert_eq!(replica.tls.client_ca, dev.tls.client_ca);
        assert_eq!(replica.policy, dev.policy);
    }
}
