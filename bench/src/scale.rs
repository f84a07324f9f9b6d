//! `ward-bench scale`: what a million secrets cost. Loads N secrets through the public API at
//! concurrency, then measures fetch throughput spread over all N against the same over the
//! first 1,000 (same run), the server's RSS, bytes on disk per secret, and a cold start
//! (unseal + open) to ready.

use crate::server::{server_bin, DevServer};
use crate::stats::Summary;
use crate::workload::{ErrorLabel, Workload};
use crate::{drive, Spec};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ward_client::proto::PutSecretRequest;
use ward_client::{code_name, Client, RetryPolicy};

/// Options of `ward-bench scale`.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// Secrets to load
    #[arg(long, default_value_t = 1_000_000)]
    secrets: u64,
    /// Concurrent loaders and fetchers
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// HTTP/2 connections
    #[arg(long, default_value_t = 4)]
    connections: u32,
    /// Value size in bytes
    #[arg(long, default_value_t = 64)]
    value_size: usize,
    /// Measured seconds for each fetch row
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// The ward-server binary (default: next to ward-bench)
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

/// Fetches names `scale/0..n` chosen by a per-worker xorshift, so the whole set is touched.
struct FetchSpread {
    n: u64,
}

impl Workload for FetchSpread {
    type Client = Client;

    async fn setup(&self, _client: &Client) -> Result<(), String> {
        Ok(())
    }

    async fn op(&self, client: &Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        let mut x = (worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        client
            .fetch_secret(format!("scale/{:07}", x % self.n), 0)
            .await
            .map(drop)
            .map_err(|e| code_name(e.code()))
    }
}

/// Runs the scale measurement.
pub async fn run(args: ScaleArgs) -> Result<(), String> {
    let bin = server_bin(args.server_bin.as_deref())?;
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = tmp.path().join("ward");
    let server = DevServer::start(&bin, &dir, None)?;
    let clients = server.admin_clients(args.connections).await?;

    // Load.
    eprintln!("ward-bench scale: loading {} secrets", args.secrets);
    let next = Arc::new(AtomicU64::new(0));
    let value: Vec<u8> = (0..args.value_size)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..args.concurrency as usize {
        let (client, next, value, n) = (
            clients[w % clients.len()].clone(),
            next.clone(),
            value.clone(),
            args.secrets,
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), String>(());
                }
                if i > 0 && i % 100_000 == 0 {
                    eprintln!("ward-bench scale: {i} loaded");
                }
                client
                    .put_secret(PutSecretRequest {
                        name: format!("scale/{i:07}"),
                        value: value.clone(),
                        request_id: format!("scale-{i}"),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("put scale/{i:07}: {e}"))?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let load_secs = started.elapsed().as_secs_f64();

    // Fetch spread over all N vs over the first 1k, same run.
    let spec = |name| Spec {
        name,
        concurrency: args.concurrency,
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs_f64(args.duration),
        call_timeout: Duration::from_secs(10),
    };
    let fetchers: Vec<Client> = clients
        .iter()
        .map(|c| c.clone().with_retry(RetryPolicy::none()))
        .collect();
    let small = drive(
        FetchSpread {
            n: args.secrets.min(1000),
        },
        &spec("fetch-1k"),
        &fetchers,
    )
    .await?;
    let large = drive(
        FetchSpread { n: args.secrets },
        &spec("fetch-all"),
        &fetchers,
    )
    .await?;
    let rss = server.rss_kib();
    let disk = server.data_bytes();

    // Cold start: stop, then serve the same store and time it to the ready line.
    drop(clients);
    drop(fetchers);
    drop(server);
    let restarted = DevServer::serve_existing(&bin, &dir)?;
    let (rss_cold, ready) = (restarted.rss_kib(), restarted.ready);
    drop(restarted);

    let n = args.secrets;
    println!(
        "ward-bench scale: {n} secrets of {} B, concurrency {}, {} connections",
        args.value_size, args.concurrency, args.connections
    );
    println!(
        "load        {load_secs:.1} s = {:.0} puts/s (durable, audited, idempotent)",
        n as f64 / load_secs
    );
    print_fetch("fetch 1k", &small);
    print_fetch(&format!("fetch {n}"), &large);
    println!(
        "fetch ratio {:.2} (all / first 1k; target >= 0.85)",
        large.ops_per_sec / small.ops_per_sec.max(1.0)
    );
    match rss {
        Some(kib) => println!(
            "server RSS  {:.0} MiB after load and fetch (target <= 1024)",
            kib as f64 / 1024.0
        ),
        None => println!("server RSS  unknown"),
    }
    if let Some(kib) = rss_cold {
        println!("cold RSS    {:.0} MiB at ready", kib as f64 / 1024.0);
    }
    println!(
        "disk        {:.1} MiB = {:.0} bytes per secret (sled data dir, incl. audit records)",
        disk as f64 / 1048576.0,
        disk as f64 / n as f64
    );
    println!(
        "cold start  {:.2} s to ready (unseal + open; target <= 3 s)",
        ready.as_secs_f64()
    );
    Ok(())
}

fn print_fetch(label: &str, s: &Summary) {
    println!(
        "{label:<11} {:.0} ops/s, p50 {} µs, p99 {} µs, errors {}",
        s.ops_per_sec,
        s.p50_us,
        s.p99_us,
        s.error_count()
    );
}
