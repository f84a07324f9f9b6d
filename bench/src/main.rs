//! `ward-bench`: throughput and latency of a running Ward server over mutual TLS, measured
//! through the SDK with a fixed number of concurrent workers for a fixed time.

mod cluster;
mod echo;
mod open_loop;
mod scale;
mod server;
mod soak;
mod stats;
mod suite;
mod workload;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;
use tokio::task::JoinSet;

use ward_client::{parse_duration, Client, RetryPolicy};
use wardctl::conn::ConnArgs;

use stats::{Summary, WorkerStats};
use workload::{BatchFetch, Fetch, Health, Issue, Put, Rotate, Verify, Workload, WorkloadKind};

/// Time allowed after the window closes, beyond one call timeout, before workers are aborted.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Command-line options.
#[derive(Debug, Parser)]
#[command(
    name = "ward-bench",
    version,
    about = "Throughput and latency of a running Ward server, over mutual TLS",
    after_help = "Workers run operations back to back with no retries (a failure is counted by \
                  its gRPC code, not hidden). Operations started during --warmup are not \
                  counted; the run stops by itself after warmup + duration (plus at most one \
                  call timeout for operations in flight)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// One workload at one concurrency against a running server
    Run(Opts),
    /// The whole suite in one run: starts a Ward dev server, the echo floor and etcd, drives
    /// every workload at each concurrency, prints one table with the ratios to the targets
    Suite(suite::SuiteArgs),
    /// Scale: load N secrets (default one million), then fetch at N vs 1k, RSS, disk per
    /// secret and cold start-up time
    Scale(scale::ScaleArgs),
    /// Soak: a bounded mixed load (fetch, batch, put, verify, rotations, revocations, keyring
    /// rotations, an audit follower) for a fixed time against a fresh dev server; samples RSS,
    /// open fds and disk, counts errors by code, and judges growth. Exits 1 on a failed verdict
    Soak(soak::SoakArgs),
    /// (internal) The transport floor: FetchSecret answered with a constant, over Ward's mTLS
    EchoServer(echo::EchoArgs),
}

/// Options of `ward-bench run`.
#[derive(Debug, clap::Args)]
struct Opts {
    #[command(flatten)]
    conn: ConnArgs,
    /// Operation to repeat
    #[arg(long, value_enum, default_value_t = WorkloadKind::Fetch, help_heading = "Run")]
    workload: WorkloadKind,
    /// Concurrent workers
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Run")]
    concurrency: u32,
    /// Measured time: seconds, or with a unit (500ms, 1m)
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration,
          help_heading = "Run")]
    duration: Duration,
    /// Unmeasured time before it
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_duration,
          help_heading = "Run")]
    warmup: Duration,
    /// Value size in bytes (fetch: of the prepared secrets; put: of every write)
    #[arg(long, value_name = "BYTES", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Run")]
    value_size: u32,
    /// HTTP/2 connections to spread the workers over, round-robin
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Run")]
    connections: u32,
    /// Also write the report as JSON to FILE ("-" for stdout)
    #[arg(long, value_name = "FILE", help_heading = "Run")]
    json: Option<PathBuf>,
}

/// Why a run failed: exit 2 for configuration, 1 for anything else.
#[derive(Debug)]
enum Failure {
    /// Bad flags or unreadable certificate files.
    Config(String),
    /// Connecting, setting up or running failed.
    Run(String),
}

impl From<ward_client::Error> for Failure {
    fn from(err: ward_client::Error) -> Self {
        match err {
            ward_client::Error::Config(msg) => Self::Config(msg),
            other => Self::Run(other.to_string()),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let opts = match Cli::parse().command {
        Command::Run(opts) => opts,
        Command::Suite(args) => {
            return match suite::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    eprintln!("error: {msg}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Scale(args) => {
            return match scale::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    eprintln!("error: {msg}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Soak(args) => {
            return match soak::run(args).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(msg) => {
                    eprintln!("error: {msg}");
                    ExitCode::from(1)
                }
            }
        }
        Command::EchoServer(args) => {
            return match echo::serve(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    eprintln!("error: {msg}");
                    ExitCode::from(1)
                }
            }
        }
    };
    match run(&opts).await {
        Ok(summary) if summary.ops > 0 => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("error: no operation succeeded");
            ExitCode::from(1)
        }
        Err(Failure::Config(msg)) => {
            eprintln!("error: config: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Run(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// Connects, runs the chosen workload and prints the report.
async fn run(opts: &Opts) -> Result<Summary, Failure> {
    let cfg = opts.conn.to_config()?;
    let call_timeout = cfg.timeout();
    let mut clients = Vec::new();
    for _ in 0..opts.connections {
        clients.push(Client::connect(cfg.clone()).await?);
    }
    let value_size = opts.value_size as usize;
    let spec = Spec {
        name: opts.workload.name(),
        concurrency: opts.concurrency,
        warmup: opts.warmup,
        duration: opts.duration,
        call_timeout,
    };
    let summary = match opts.workload {
        WorkloadKind::Fetch => run_on(Fetch::new(value_size), &spec, &clients).await,
        WorkloadKind::Echo => run_on(Fetch::echo(value_size), &spec, &clients).await,
        WorkloadKind::Put => run_on(Put::new(value_size), &spec, &clients).await,
        WorkloadKind::Batch => run_on(BatchFetch::new(value_size), &spec, &clients).await,
        WorkloadKind::Issue => run_on(Issue::new(), &spec, &clients).await,
        WorkloadKind::Rotate => {
            run_on(
                Rotate::new(value_size, opts.concurrency as usize),
                &spec,
                &clients,
            )
            .await
        }
        WorkloadKind::Verify => run_on(Verify::default(), &spec, &clients).await,
        WorkloadKind::Health => run_on(Health, &spec, &clients).await,
    }
    .map_err(Failure::Run)?;
    report(opts, &summary)?;
    Ok(summary)
}

/// How long and how wide one measured run is.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Workload name, for messages.
    pub name: &'static str,
    /// Concurrent workers.
    pub concurrency: u32,
    /// Unmeasured time first.
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Bound on one call, for the hard stop.
    pub call_timeout: Duration,
}

/// Runs a Ward-SDK workload with retries off (a failure is counted, never hidden).
async fn run_on<W: Workload<Client = Client>>(
    workload: W,
    spec: &Spec,
    clients: &[Client],
) -> Result<Summary, String> {
    let clients: Vec<Client> = clients
        .iter()
        .map(|c| c.clone().with_retry(RetryPolicy::none()))
        .collect();
    // Setup runs with the SDK's default retries: it is not measured.
    workload
        .setup(&clients[0].clone().with_retry(RetryPolicy::default()))
        .await
        .map_err(|e| format!("setup: {e}"))?;
    drive(workload, spec, &clients).await
}

/// Runs the workers through warmup and the timed window (setup already done), and merges
/// what they measured.
pub async fn drive<W: Workload>(
    workload: W,
    spec: &Spec,
    clients: &[W::Client],
) -> Result<Summary, String> {
    eprintln!(
        "ward-bench: {} with {} workers, warmup {:?}, measuring {:?}",
        spec.name, spec.concurrency, spec.warmup, spec.duration
    );
    let workload = Arc::new(workload);
    let warm_end = Instant::now() + spec.warmup;
    let end = warm_end + spec.duration;
    let mut set = JoinSet::new();
    for id in 0..spec.concurrency as usize {
        let client = clients[id % clients.len()].clone();
        set.spawn(worker(workload.clone(), client, id, warm_end, end));
    }

    // Every operation is bounded by the call timeout, so workers stop by themselves; the hard
    // stop only guards against a bug turning into a hung benchmark.
    let hard_stop = tokio::time::Instant::from_std(end + spec.call_timeout + STOP_GRACE);
    let mut results = Vec::with_capacity(spec.concurrency as usize);
    let mut last_end = warm_end;
    loop {
        match tokio::time::timeout_at(hard_stop, set.join_next()).await {
            Ok(Some(Ok((stats, last)))) => {
                last_end = last_end.max(last.unwrap_or(warm_end));
                results.push(stats);
            }
            Ok(Some(Err(e))) => return Err(format!("worker failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                eprintln!(
                    "warning: {} workers did not stop in time; their results are dropped",
                    set.len()
                );
                set.abort_all();
                break;
            }
        }
    }
    // The window ends when its last operation finished, which is at or after `end`.
    let elapsed = last_end.max(end) - warm_end;
    Ok(Summary::merge(results, elapsed))
}

/// One worker: runs operations back to back until `end`, recording those started after
/// `warm_end`. Returns its stats and when its last recorded operation finished.
async fn worker<W: Workload>(
    workload: Arc<W>,
    client: W::Client,
    id: usize,
    warm_end: Instant,
    end: Instant,
) -> (WorkerStats, Option<Instant>) {
    let mut stats = WorkerStats::new();
    let mut last = None;
    let mut seq = 0u64;
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let result = workload.op(&client, id, seq).await;
        let finished = Instant::now();
        seq += 1;
        if started < warm_end {
            continue;
        }
        match result {
            Ok(()) => stats.ok(finished - started),
            Err(label) => stats.error(label),
        }
        last = Some(finished);
    }
    (stats, last)
}

/// Prints the human report to stdout and, if asked, the JSON report.
fn report(opts: &Opts, s: &Summary) -> Result<(), Failure> {
    let mut errors: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if errors.is_empty() {
        errors.push("none".into());
    }
    println!(
        "ward-bench {}: concurrency {}, connections {}, value {} B, warmup {:?}, measured {:.2}s",
        opts.workload.name(),
        opts.concurrency,
        opts.connections,
        opts.value_size,
        opts.warmup,
        s.elapsed.as_secs_f64()
    );
    println!("ops        {} ok, {} errors", s.ops, s.error_count());
    println!("throughput {:.1} ops/s", s.ops_per_sec);
    println!(
        "latency    p50 {} us, p99 {} us, max {} us, mean {:.1} us",
        s.p50_us, s.p99_us, s.max_us, s.mean_us
    );
    println!("errors     {}", errors.join(", "));

    let Some(path) = &opts.json else {
        return Ok(());
    };
    let mut doc = s.to_json();
    if let Value::Object(map) = &mut doc {
        let run = serde_json::json!({
            "workload": opts.workload.name(),
            "addr": opts.conn.addr,
            "concurrency": opts.concurrency,
            "connections": opts.connections,
            "value_size": opts.value_size,
            "warmup_secs": opts.warmup.as_secs_f64(),
            "duration_secs": opts.duration.as_secs_f64(),
        });
        map.insert("run".into(), run);
    }
    let text = serde_json::to_string_pretty(&doc)
        .map_err(|e| Failure::Run(format!("encoding the JSON report: {e}")))?;
    let written = if path.as_os_str() == "-" {
        writeln!(std::io::stdout(), "{text}")
    } else {
        std::fs::write(path, text + "\n")
    };
    written.map_err(|e| Failure::Run(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_and_defaults() {
        Cli::command().debug_assert();
        let parse = |args: &[&str]| {
            let mut all = vec!["ward-bench", "run"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).map(|c| c.command) {
                Ok(Command::Run(o)) => Ok(o),
                Ok(_) => panic!("not run"),
                Err(e) => Err(e),
            }
        };
        let o = parse(&[]).unwrap();
        assert_eq!(o.workload, WorkloadKind::Fetch);
        assert_eq!((o.concurrency, o.connections, o.value_size), (16, 1, 64));
        assert_eq!(o.duration, Duration::from_secs(10));
        assert_eq!(o.warmup, Duration::from_secs(2));
        let o = parse(&[
            "--workload",
            "put",
            "--duration",
            "500ms",
            "--connections",
            "4",
            "--json",
            "out.json",
        ])
        .unwrap();
        assert_eq!(o.workload, WorkloadKind::Put);
        assert_eq!(o.duration, Duration::from_millis(500));
        assert_eq!(o.connections, 4);
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert!(parse(&["--workload", "etcd"]).is_err());
        let o = parse(&["--workload", "verify"]).unwrap();
        assert_eq!(o.workload, WorkloadKind::Verify);
        let o = parse(&["--workload", "health"]).unwrap();
        assert_eq!(o.workload.name(), "health");

        let suite = |args: &[&str]| {
            let mut all = vec!["ward-bench", "suite"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).map(|c| c.command) {
                Ok(Command::Suite(s)) => Ok(s),
                Ok(_) => panic!("not suite"),
                Err(e) => Err(e),
            }
        };
        let s = suite(&[]).unwrap();
        assert_eq!((s.backend, s.samples), (suite::Backend::Sled, 200));
        let s = suite(&["--backend", "etcd", "--samples", "50", "--quick"]).unwrap();
        assert_eq!(
            (s.backend, s.samples, s.quick),
            (suite::Backend::Etcd, 50, true)
        );
        assert!(suite(&["--backend", "etcd", "--samples", "0"]).is_err());
        assert!(suite(&["--backend", "consul"]).is_err());
    }
}
