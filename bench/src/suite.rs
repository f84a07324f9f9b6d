//! `ward-bench suite`: everything measured in one run on one machine, so ratios mean
//! something. Starts a Ward dev server (real SoftHSM, durable store, audit on), the echo floor
//! (same tonic + rustls mTLS stack, constant answer) and, when installed, a single-node etcd
//! with client-certificate auth from Ward's dev CA; drives each workload at each concurrency
//! through the same client stack; prints one table and the ratios against the targets. With
//! `--backend etcd` it measures replicas on a three-member etcd instead (`cluster`).

use crate::open_loop::{self, Paced};
use crate::server::{free_port, server_bin, spawn_ready, DevServer, Proc};
use crate::stats::Summary;
use crate::workload::{
    BatchFetch, EtcdKv, EtcdPut, EtcdRange, Fetch, Issue, Put, Rotate, Verify, Workload,
};
use crate::{drive, Spec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use ward_client::{Client, ClientConfig, RetryPolicy};

/// Options of `ward-bench suite`.
#[derive(Debug, clap::Args)]
pub struct SuiteArgs {
    /// Short run for a smoke check (under a minute; with `--backend etcd` under two): 0.5 s
    /// warm-up, 1.5 s per row
    #[arg(long)]
    pub(crate) quick: bool,
    /// Measured seconds per row (default 5; --quick: 1.5)
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Warm-up seconds per row (default 1; --quick: 0.5)
    #[arg(long)]
    pub(crate) warmup: Option<f64>,
    /// Concurrencies to measure
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub(crate) concurrency: Vec<u32>,
    /// HTTP/2 connections per target
    #[arg(long, default_value_t = 1)]
    pub(crate) connections: u32,
    /// Value size in bytes (fetched secrets, echo answers, etcd values)
    #[arg(long, default_value_t = 64)]
    pub(crate) value_size: usize,
    /// The ward-server binary (default: next to ward-bench)
    #[arg(long)]
    pub(crate) server_bin: Option<PathBuf>,
    /// The etcd binary (Debian's etcd-server); skipped with a note if missing (required with
    /// `--backend etcd`)
    #[arg(long, default_value = "etcd")]
    pub(crate) etcd_bin: PathBuf,
    /// Also write the results as JSON to FILE
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// After the closed-loop rows, run echo, fetch and verify open loop (a fixed request
    /// rate, latency counted from when each call was due) at 50 % and 80 % of the highest
    /// echo rate just measured, and report p50/p99/p999
    #[arg(long)]
    pub(crate) open_loop: bool,
    /// Instead of the suite: the cost of the abuse signals. Starts a second Ward with
    /// `[alerts] signals = false` and measures echo, fetch and verify (with client IPs, so the
    /// network signal runs) at each concurrency against both, interleaved; prints
    /// verify/echo and fetch/echo with signals on and off, and the difference
    #[arg(long)]
    pub(crate) signals: bool,
    /// Where the measured Ward keeps its state. `etcd`: instead of the suite above, a
    /// three-member etcd on loopback and two Ward replicas on it; fetch, verify and put on
    /// replica A beside a sled-backed Ward and raw etcd Put/Range on the same cluster, then
    /// revocation (and put) propagation from replica A to replica B
    #[arg(long, value_enum, default_value_t = Backend::Sled)]
    pub(crate) backend: Backend,
    /// With `--backend etcd`: propagation samples (each a key issued, seen VALID, revoked and
    /// seen REVOKED; and a secret put and fetched)
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) samples: u32,
}

/// The store backend `suite` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// One dev server on its embedded sled store (the suite as it always ran).
    Sled,
    /// Two replicas on a three-member etcd cluster, beside a sled dev server.
    Etcd,
}

/// Fractions of the echo floor's highest rate the open-loop rows offer.
const OPEN_LOOP_LOADS: [f64; 2] = [0.5, 0.8];

/// One open-loop row.
struct OpenRow {
    workload: &'static str,
    load: f64,
    rate: f64,
    summary: Summary,
}

pub(crate) struct Row {
    pub(crate) workload: &'static str,
    pub(crate) concurrency: u32,
    pub(crate) summary: Summary,
}

/// Runs the suite.
pub async fn run(args: SuiteArgs) -> Result<(), String> {
    let (warmup, duration) = match (args.quick, args.warmup, args.duration) {
        (_, Some(w), Some(d)) => (w, d),
        (true, w, d) => (w.unwrap_or(0.5), d.unwrap_or(1.5)),
        (false, w, d) => (w.unwrap_or(1.0), d.unwrap_or(5.0)),
    };
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let server_bin = server_bin(args.server_bin.as_deref())?;
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = tmp.path();

    // Ward.
    let ward_server =
        DevServer::start(&server_bin, &dir.join("ward"), Some(&dir.join("ward.log")))?;
    let ward_addr = ward_server.addr.clone();
    if args.backend == Backend::Etcd {
        let times = (warmup, duration);
        return crate::cluster::run(&args, &server_bin, dir, &ward_server, times).await;
    }
    let tls = ward_server.tls();
    let (ca, cert, key) = (
        tls.join("ca.pem"),
        tls.join("admin.pem"),
        tls.join("admin.key"),
    );

    // The echo floor, in its own process like the server.
    let mut cmd = Command::new(&me);
    cmd.arg("echo-server")
        .arg("--cert")
        .arg(tls.join("server.pem"))
        .arg("--key")
        .arg(tls.join("server.key"))
        .arg("--client-ca")
        .arg(&ca)
        .args(["--value-size", &args.value_size.to_string()]);
    let (_echo, echo_addr, _) = spawn_ready(cmd, "echo ready addr=", Some(&dir.join("echo.log")))?;

    // etcd, if installed, with client-certificate auth from Ward's dev CA.
    let etcd = start_etcd(&args.etcd_bin, dir, &ca, &tls).await;
    let (_etcd_proc, etcd_clients) = match etcd {
        Ok((p, c)) => (Some(p), Some(c)),
        Err(e) => {
            eprintln!("ward-bench: etcd not measured: {e}");
            (None, None)
        }
    };

    let connect = |addr: String| {
        let (ca, cert, key) = (ca.clone(), cert.clone(), key.clone());
        async move {
            let cfg =
                ClientConfig::from_files(&addr, &ca, &cert, &key).map_err(|e| e.to_string())?;
            Client::connect(cfg).await.map_err(|e| e.to_string())
        }
    };
    let mut ward = Vec::new();
    let mut echo = Vec::new();
    for _ in 0..args.connections {
        ward.push(connect(ward_addr.clone()).await?);
        echo.push(connect(echo_addr.clone()).await?);
    }
    let ward: Vec<Client> = ward
        .into_iter()
        .map(|c| c.with_retry(RetryPolicy::none()))
        .collect();
    let echo: Vec<Client> = echo
        .into_iter()
        .map(|c| c.with_retry(RetryPolicy::none()))
        .collect();

    let v = args.value_size;
    let spec = row_spec(warmup, duration);
    if args.signals {
        let (servers, clients) = (&server_bin, (&ward[..], &echo[..]));
        return signals(&args, servers, dir, clients, &spec, (warmup, duration)).await;
    }
    let mut rows = Vec::new();
    for &c in &args.concurrency {
        rows.push(measure("echo", c, Fetch::echo(v), &echo, &spec).await?);
        rows.push(measure("fetch", c, Fetch::new(v), &ward, &spec).await?);
        rows.push(measure("batch10", c, BatchFetch::new(v), &ward, &spec).await?);
        rows.push(measure("verify", c, Verify::default(), &ward, &spec).await?);
        rows.push(measure("put", c, Put::new(v), &ward, &spec).await?);
        rows.push(measure("issue", c, Issue::new(), &ward, &spec).await?);
        let rotate = Rotate::new(v, c as usize);
        rows.push(measure("rotate", c, rotate, &ward, &spec).await?);
        if let Some(etcd) = &etcd_clients {
            rows.push(measure("etcd-range", c, EtcdRange::new(v), etcd, &spec).await?);
            rows.push(measure("etcd-put", c, EtcdPut::new(v), etcd, &spec).await?);
        }
    }
    let mut open_rows = Vec::new();
    if args.open_loop {
        let floor = rows
            .iter()
            .filter(|r| r.workload == "echo")
            .map(|r| r.summary.ops_per_sec)
            .fold(0.0, f64::max);
        for load in OPEN_LOOP_LOADS {
            let paced = |name| Paced {
                name,
                rate: floor * load,
                warmup: Duration::from_secs_f64(warmup),
                duration: Duration::from_secs_f64(duration),
                call_timeout: Duration::from_secs(10),
            };
            let runs = [
                (
                    "echo",
                    paced_run(Fetch::echo(v), &paced("echo"), &echo).await?,
                ),
                (
                    "fetch",
                    paced_run(Fetch::new(v), &paced("fetch"), &ward).await?,
                ),
                (
                    "verify",
                    paced_run(Verify::default(), &paced("verify"), &ward).await?,
                ),
            ];
            for (workload, summary) in runs {
                open_rows.push(OpenRow {
                    workload,
                    load,
                    rate: floor * load,
                    summary,
                });
            }
        }
    }
    report(&rows, &open_rows, &args, warmup, duration)
}

/// How each closed-loop row is run: `warmup` then `duration` seconds.
pub(crate) fn row_spec(warmup: f64, duration: f64) -> impl Fn(&'static str, u32) -> Spec {
    move |name, c| Spec {
        name,
        concurrency: c,
        warmup: Duration::from_secs_f64(warmup),
        duration: Duration::from_secs_f64(duration),
        call_timeout: Duration::from_secs(10),
    }
}

pub(crate) async fn measure<W: Workload>(
    name: &'static str,
    concurrency: u32,
    workload: W,
    clients: &[W::Client],
    spec: &impl Fn(&'static str, u32) -> Spec,
) -> Result<Row, String> {
    workload
        .setup(&clients[0])
        .await
        .map_err(|e| format!("{name} setup: {e}"))?;
    let summary = drive(workload, &spec(name, concurrency), clients).await?;
    Ok(Row {
        workload: name,
        concurrency,
        summary,
    })
}

/// Sets `workload` up, then drives it open loop.
async fn paced_run<W: Workload>(
    workload: W,
    paced: &Paced,
    clients: &[W::Client],
) -> Result<Summary, String> {
    workload
        .setup(&clients[0])
        .await
        .map_err(|e| format!("{} setup: {e}", paced.name))?;
    open_loop::drive(workload, paced, clients).await
}

async fn start_etcd(
    bin: &Path,
    dir: &Path,
    ca: &Path,
    tls: &Path,
) -> Result<(Proc, Vec<EtcdKv>), String> {
    let (client_port, peer_port) = (free_port()?, free_port()?);
    let client_url = format!("https://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let log = std::fs::File::create(dir.join("etcd.log")).map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .arg("--client-cert-auth")
        .arg("--trusted-ca-file")
        .arg(ca)
        .arg("--cert-file")
        .arg(tls.join("server.pem"))
        .arg("--key-file")
        .arg(tls.join("server.key"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let proc = Proc(child);
    let read = |p: PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
    // The same client TLS stack the SDK uses: tonic's rustls client config.
    let tls_config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(
            ca.to_path_buf(),
        )?))
        .identity(tonic::transport::Identity::from_pem(
            read(tls.join("admin.pem"))?,
            read(tls.join("admin.key"))?,
        ))
        .domain_name("localhost");
    let endpoint = tonic::transport::Endpoint::from_shared(client_url.clone())
        .and_then(|e| e.tls_config(tls_config))
        .map_err(|e| format!("etcd endpoint: {e}"))?;
    if let Some(kv) = crate::cluster::etcd_ready(&endpoint).await {
        return Ok((proc, vec![kv]));
    }
    Err(format!(
        "etcd did not become ready (see {})",
        dir.join("etcd.log").display()
    ))
}

/// `--signals`: the same workloads against Ward with signals on (`on`) and off, interleaved
/// row by row so that both see the same machine; one table of ratios to the echo floor.
async fn signals(
    args: &SuiteArgs,
    server_bin: &Path,
    dir: &Path,
    (on, echo): (&[Client], &[Client]),
    spec: &impl Fn(&'static str, u32) -> Spec,
    (warmup, duration): (f64, f64),
) -> Result<(), String> {
    // A dev server's files, then served again with the signals off.
    let off_dir = dir.join("ward-signals-off");
    drop(DevServer::start(server_bin, &off_dir, None)?);
    let config = off_dir.join("ward.toml");
    let mut text = std::fs::read_to_string(&config).map_err(|e| e.to_string())?;
    text.push_str("\n[alerts]\nsignals = false\n");
    std::fs::write(&config, text).map_err(|e| e.to_string())?;
    let off_server = DevServer::serve_existing(server_bin, &off_dir)?;
    let off: Vec<Client> = off_server
        .admin_clients(args.connections)
        .await?
        .into_iter()
        .map(|c| c.with_retry(RetryPolicy::none()))
        .collect();
    let v = args.value_size;
    println!(
        "ward-bench suite --signals: value {v} B, {} connection(s), warm-up {warmup} s, \
         {duration} s per row",
        args.connections
    );
    println!("conc  workload   ops/s on   ops/s off   /echo on  /echo off   cost");
    let mut out = Vec::new();
    for &c in &args.concurrency {
        let floor = measure("echo", c, Fetch::echo(v), echo, spec).await?;
        let fetch_on = measure("fetch", c, Fetch::new(v), on, spec).await?;
        let fetch_off = measure("fetch", c, Fetch::new(v), &off, spec).await?;
        let verify_on = measure("verify", c, Verify::with_client_ips(), on, spec).await?;
        let verify_off = measure("verify", c, Verify::with_client_ips(), &off, spec).await?;
        let e = floor.summary.ops_per_sec.max(f64::MIN_POSITIVE);
        for (name, a, b) in [
            ("fetch", fetch_on, fetch_off),
            ("verify", verify_on, verify_off),
        ] {
            let (x, y) = (a.summary.ops_per_sec, b.summary.ops_per_sec);
            let cost = if y > 0.0 { (1.0 - x / y) * 100.0 } else { 0.0 };
            println!(
                "{c:>4}  {name:<8} {x:>10.0} {y:>11.0} {:>10.3} {:>10.3} {cost:>5.1} %",
                x / e,
                y / e
            );
            out.push(json!({
                "workload": name, "concurrency": c, "echo_ops_per_sec": e,
                "on_ops_per_sec": x, "off_ops_per_sec": y, "cost_percent": cost,
                "on_p99_us": a.summary.p99_us, "off_p99_us": b.summary.p99_us,
            }));
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&Value::Array(out)).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub(crate) fn find<'a>(rows: &'a [Row], workload: &str, c: u32) -> Option<&'a Summary> {
    rows.iter()
        .find(|r| r.workload == workload && r.concurrency == c)
        .map(|r| &r.summary)
}

/// The ratio of `a`'s to `b`'s throughput (or p99 latency) at concurrency `c`, if both were
/// measured.
pub(crate) fn ratio(rows: &[Row], a: &str, b: &str, c: u32, p99: bool) -> Option<f64> {
    let (a, b) = (find(rows, a, c)?, find(rows, b, c)?);
    if p99 {
        Some(a.p99_us as f64 / b.p99_us.max(1) as f64)
    } else {
        Some(a.ops_per_sec / b.ops_per_sec.max(f64::MIN_POSITIVE))
    }
}

/// Prints the closed-loop rows as one table.
pub(crate) fn print_rows(rows: &[Row]) {
    println!(
        "{:<11} {:>4} {:>11} {:>10} {:>10} {:>7}",
        "workload", "c", "ops/s", "p50 µs", "p99 µs", "errors"
    );
    for r in rows {
        println!(
            "{:<11} {:>4} {:>11.0} {:>10} {:>10} {:>7}",
            r.workload,
            r.concurrency,
            r.summary.ops_per_sec,
            r.summary.p50_us,
            r.summary.p99_us,
            r.summary.error_count()
        );
    }
}

/// The rows as JSON objects (the summary plus workload and concurrency).
pub(crate) fn rows_json(rows: &[Row]) -> Vec<Value> {
    rows.iter()
        .map(|r| {
            let mut v = r.summary.to_json();
            if let Value::Object(m) = &mut v {
                m.insert("workload".into(), r.workload.into());
                m.insert("concurrency".into(), r.concurrency.into());
            }
            v
        })
        .collect()
}

/// A measured value against its target: name, value (None when not measured in this run),
/// and the target as `">= 0.75"` or `"<= 2.0"`.
pub(crate) type Target = (&'static str, Option<f64>, &'static str);

/// Prints each target's value and whether it is met; returns them as JSON.
pub(crate) fn print_targets(targets: &[Target]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for &(name, value, target) in targets {
        let Some(v) = value else {
            println!("  {name:<24}    n/a  (not measured in this run)");
            continue;
        };
        let (at_least, bound) = match target.split_once(' ') {
            Some((op, b)) => (op == ">=", b.parse::<f64>().unwrap_or(0.0)),
            None => (true, 0.0),
        };
        let met = if at_least { v >= bound } else { v <= bound };
        println!(
            "  {name:<24} {v:>6.2}  target {target}  {}",
            if met { "met" } else { "NOT met" }
        );
        out.insert(
            name.into(),
            json!({"value": v, "target": target, "met": met}),
        );
    }
    out
}

/// Writes `doc` to `path` as pretty JSON.
pub(crate) fn write_json(path: &Path, doc: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(doc).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

fn report(
    rows: &[Row],
    open_rows: &[OpenRow],
    args: &SuiteArgs,
    warmup: f64,
    duration: f64,
) -> Result<(), String> {
    println!(
        "ward-bench suite: value {} B, {} connection(s), warm-up {warmup} s, {duration} s per row",
        args.value_size, args.connections
    );
    print_rows(rows);
    if !open_rows.is_empty() {
        println!("open loop (latency from when each call was due):");
        println!(
            "{:<11} {:>5} {:>11} {:>11} {:>10} {:>10} {:>10} {:>7}",
            "workload", "load", "offered/s", "answered/s", "p50 µs", "p99 µs", "p999 µs", "errors"
        );
        for r in open_rows {
            println!(
                "{:<11} {:>4.0}% {:>11.0} {:>11.0} {:>10} {:>10} {:>10} {:>7}",
                r.workload,
                r.load * 100.0,
                r.rate,
                r.summary.ops_per_sec,
                r.summary.p50_us,
                r.summary.p99_us,
                r.summary.p999_us,
                r.summary.error_count()
            );
        }
    }
    let c = args.concurrency.iter().copied().max().unwrap_or(64);
    let ratio = |a, b, p99| ratio(rows, a, b, c, p99);
    let targets: [Target; 5] = [
        ("fetch/echo ops/s", ratio("fetch", "echo", false), ">= 0.75"),
        ("fetch/echo p99", ratio("fetch", "echo", true), "<= 2.0"),
        (
            "fetch/etcd-range ops/s",
            ratio("fetch", "etcd-range", false),
            ">= 1.0",
        ),
        (
            "put/etcd-put ops/s",
            ratio("put", "etcd-put", false),
            ">= 1.0",
        ),
        (
            "verify/echo ops/s",
            ratio("verify", "echo", false),
            ">= 0.85",
        ),
    ];
    println!("ratios at c={c}:");
    let json_ratios = print_targets(&targets);
    if let Some(path) = &args.json {
        let doc = json!({
            "value_size": args.value_size,
            "connections": args.connections,
            "warmup_secs": warmup,
            "duration_secs": duration,
            "rows": rows_json(rows),
            "open_loop": open_rows.iter().map(|r| {
                let mut v = r.summary.to_json();
                if let Value::Object(m) = &mut v {
                    m.insert("workload".into(), r.workload.into());
                    m.insert("load".into(), r.load.into());
                    m.insert("offered_per_sec".into(), r.rate.into());
                }
                v
            }).collect::<Vec<_>>(),
            "ratios": Value::Object(json_ratios),
        });
        write_json(path, &doc)?;
    }
    Ok(())
}
