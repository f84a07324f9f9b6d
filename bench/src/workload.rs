//! Workloads: what one benchmark operation is, and the state it needs before timing starts.
//!
//! A workload is plugged into the runner through the [`Workload`] trait; adding one (an echo
//! server baseline, an etcd peer) means a new type here and a new [`WorkloadKind`] arm.

use std::future::Future;
use std::sync::OnceLock;

use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use ward_client::proto::{
    IssueKeyRequest, PutSecretRequest, RotateSecretRequest, VerifyKeyRequest, VerifyResult,
};
use ward_client::{code_name, Client};

/// Generated client of etcd's KV API subset (bench/proto/etcd_kv.proto).
#[allow(missing_docs, clippy::all)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// An etcd KV client over the same tonic + rustls stack as Ward's SDK.
pub type EtcdKv = etcd::kv_client::KvClient<tonic::transport::Channel>;

/// Label under which a failed operation is counted, e.g. `UNAVAILABLE`.
pub type ErrorLabel = &'static str;

/// One kind of operation the benchmark repeats.
pub trait Workload: Send + Sync + 'static {
    /// The client stack the workload drives (Ward's SDK, or etcd's client for the peer).
    type Client: Clone + Send + Sync + 'static;

    /// Prepares server state (outside the timed window).
    fn setup(&self, client: &Self::Client) -> impl Future<Output = Result<(), String>> + Send;

    /// Performs operation number `seq` of worker `worker`.
    fn op(
        &self,
        client: &Self::Client,
        worker: usize,
        seq: u64,
    ) -> impl Future<Output = Result<(), ErrorLabel>> + Send;
}

/// The workloads selectable with `--workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    /// Fetch `bench/fetch-0..99` (PRIMARY) round-robin, after writing them once.
    Fetch,
    /// The fetch calls without writing anything first: for the echo floor
    /// (`ward-bench echo-server`), which serves FetchSecret only.
    Echo,
    /// Write `bench/put-<worker>-<n>`, a new secret per operation.
    Put,
    /// BatchFetchSecrets of 10 of the fetch secrets.
    Batch,
    /// IssueKey, a new API key per operation.
    Issue,
    /// RotateSecret of `bench/rotate-<run>-<worker>-0..9`, each worker its own secrets
    /// (a new PRIMARY per call, the old one ACTIVE for the default grace).
    Rotate,
    /// Verify `bench/verify-0..99` (API keys without limits) round-robin, after issuing them.
    Verify,
    /// `grpc.health.v1.Health/Check`: a bare tonic RPC over the same mTLS connection, the
    /// baseline VerifyKey is measured against.
    Health,
}

impl WorkloadKind {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fetch => "fetch",
            Self::Echo => "echo",
            Self::Put => "put",
            Self::Batch => "batch10",
            Self::Issue => "issue",
            Self::Rotate => "rotate",
            Self::Verify => "verify",
            Self::Health => "health",
        }
    }
}

/// Secrets the fetch workload reads.
const FETCH_SET: usize = 100;

/// Reads a fixed set of secrets round-robin.
pub struct Fetch {
    names: Vec<String>,
    value_size: usize,
    prepare: bool,
}

impl Fetch {
    /// A fetch workload over `bench/fetch-0..99`, whose values are `value_size` bytes.
    pub fn new(value_size: usize) -> Self {
        Self {
            names: (0..FETCH_SET).map(|i| format!("bench/fetch-{i}")).collect(),
            value_size,
            prepare: true,
        }
    }

    /// The same calls against the echo server, which has nothing to prepare.
    pub fn echo(value_size: usize) -> Self {
        Self {
            prepare: false,
            ..Self::new(value_size)
        }
    }
}

impl Workload for Fetch {
    type Client = Client;

    async fn setup(&self, client: &Client) -> Result<(), String> {
        if !self.prepare {
            return Ok(());
        }
        for name in &self.names {
            client
                .put_secret(PutSecretRequest {
                    name: name.clone(),
                    value: bench_value(self.value_size),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("writing {name}: {e}"))?;
        }
        Ok(())
    }

    async fn op(&self, client: &Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        // Workers start at different offsets so they do not all hit the same secret at once.
        let i = (worker as u64).wrapping_add(seq) % self.names.len() as u64;
        let name = self.names[i as usize].as_str();
        client
            .fetch_secret(name, 0)
            .await
            .map(drop)
            .map_err(|e| code_name(e.code()))
    }
}

/// A prefix unique to this workload instance, so runs at several concurrencies (and repeated
/// runs against one server) never write the same name twice.
pub fn run_prefix() -> String {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{run}-{nanos:x}", std::process::id())
}

/// Writes a new secret per operation.
pub struct Put {
    value: Vec<u8>,
    prefix: String,
}

impl Put {
    /// A put workload writing `value_size`-byte values.
    pub fn new(value_size: usize) -> Self {
        Self {
            value: bench_value(value_size),
            prefix: run_prefix(),
        }
    }
}

impl Workload for Put {
    type Client = Client;

    async fn setup(&self, _client: &Client) -> Result<(), String> {
        Ok(())
    }

    async fn op(&self, client: &Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        client
            .put_secret(PutSecretRequest {
                name: format!("bench/put-{}-{worker}-{seq}", self.prefix),
                value: self.value.clone(),
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| code_name(e.code()))
    }
}

/// Secrets each rotate worker owns: its calls never contend with another worker's.
const ROTATE_SET: u64 = 10;

/// Rotates secrets to a new value, each worker its own set.
pub struct Rotate {
    value: Vec<u8>,
    prefix: String,
    workers: usize,
}

impl Rotate {
    /// A rotation workload for `workers` workers, writing `value_size`-byte values.
    pub fn new(value_size: usize, workers: usize) -> Self {
        Self {
            value: bench_value(value_size),
            prefix: run_prefix(),
            workers,
        }
    }

    fn name(&self, worker: usize, i: u64) -> String {
        format!("bench/rotate-{}-{worker}-{i}", self.prefix)
    }
}

impl Workload for Rotate {
    type Client = Client;

    async fn setup(&self, client: &Client) -> Result<(), String> {
        for worker in 0..self.workers {
            for i in 0..ROTATE_SET {
                let name = self.name(worker, i);
                client
                    .put_secret(PutSecretRequest {
                        name: name.clone(),
                        value: self.value.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("writing {name}: {e}"))?;
            }
        }
        Ok(())
    }

    async fn op(&self, client: &Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        client
            .rotate_secret(RotateSecretRequest {
                name: self.name(worker, seq % ROTATE_SET),
                value: self.value.clone(),
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| code_name(e.code()))
    }
}

/// Fetches 10 secrets per call through BatchFetchSecrets.
pub struct BatchFetch {
    fetch: Fetch,
}

impl BatchFetch {
    /// Batches of 10 over the fetch workload's secrets.
    pub fn new(value_size: usize) -> Self {
        Self {
            fetch: Fetch::new(value_size),
        }
    }
}

impl Workload for BatchFetch {
    type Client = Client;

    async fn setup(&self, client: &Client) -> Result<(), String> {
        self.fetch.setup(client).await
    }

    async fn op(&self, client: &Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        let n = self.fetch.names.len();
        let start = (worker + seq as usize * 10) % n;
        let items = (0..10).map(|i| (self.fetch.names[(start + i) % n].clone(), 0));
        let resp = client
            .batch_fetch(items)
            .await
            .map_err(|e| code_name(e.code()))?;
        for r in resp.results {
            if let Some(ward_client::proto::batch_fetch_result::Result::Error(e)) = r.result {
                return Err(code_name(tonic::Code::from(e.code)));
            }
        }
        Ok(())
    }
}

/// Issues a new API key per operation.
pub struct Issue {
    prefix: String,
}

impl Issue {
    /// An issue workload with names of its own.
    pub fn new() -> Self {
        Self {
            prefix: run_prefix(),
        }
    }
}

impl Workload for Issue {
    type Client = Client;

    async fn setup(&self, _client: &Client) -> Result<(), String> {
        Ok(())
    }

    async fn op(&self, client: &Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        client
            .issue_key(ward_client::proto::IssueKeyRequest {
                name: format!("bench/key-{}-{worker}-{seq}", self.prefix),
                scopes: vec!["bench".into()],
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| code_name(e.code()))
    }
}

/// etcd serializable Range of a fixed key set (the peer for FetchSecret).
pub struct EtcdRange {
    value_size: usize,
}

impl EtcdRange {
    /// Ranges over `bench/fetch-0..99` holding `value_size`-byte values.
    pub fn new(value_size: usize) -> Self {
        Self { value_size }
    }
}

impl Workload for EtcdRange {
    type Client = EtcdKv;

    async fn setup(&self, client: &Self::Client) -> Result<(), String> {
        let mut kv = client.clone();
        for i in 0..FETCH_SET {
            kv.put(etcd::PutRequest {
                key: format!("bench/fetch-{i}").into_bytes(),
                value: bench_value(self.value_size),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("etcd put: {e}"))?;
        }
        Ok(())
    }

    async fn op(&self, client: &Self::Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        let i = (worker as u64).wrapping_add(seq) % FETCH_SET as u64;
        let mut kv = client.clone();
        let resp = kv
            .range(etcd::RangeRequest {
                key: format!("bench/fetch-{i}").into_bytes(),
                serializable: true,
                ..Default::default()
            })
            .await
            .map_err(|s| code_name(s.code()))?;
        if resp.get_ref().kvs.len() == 1 {
            Ok(())
        } else {
            Err("ETCD_MISSING")
        }
    }
}

/// etcd Put of a new key per operation (the peer for PutSecret; etcd fsyncs its WAL too).
pub struct EtcdPut {
    value: Vec<u8>,
    prefix: String,
}

impl EtcdPut {
    /// Writes `value_size`-byte values.
    pub fn new(value_size: usize) -> Self {
        Self {
            value: bench_value(value_size),
            prefix: run_prefix(),
        }
    }
}

impl Workload for EtcdPut {
    type Client = EtcdKv;

    async fn setup(&self, _client: &Self::Client) -> Result<(), String> {
        Ok(())
    }

    async fn op(&self, client: &Self::Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        let mut kv = client.clone();
        kv.put(etcd::PutRequest {
            key: format!("bench/put-{}-{worker}-{seq}", self.prefix).into_bytes(),
            value: self.value.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
        .map_err(|s| code_name(s.code()))
    }
}

/// A benchmark value: printable, not all one byte, exactly `size` bytes.
fn bench_value(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Keys the verify workload presents.
const VERIFY_SET: usize = 100;

/// Verifies a fixed set of API keys round-robin (cost 1, no policy: the full check path with
/// its audit record, nothing refused).
#[derive(Default)]
pub struct Verify {
    keys: OnceLock<Vec<String>>,
    client_ips: bool,
}

impl Verify {
    /// Verifications that name an end client's IP (one of 16 /24 networks: all learnt, so no alert is raised and the cost measured is the check's), so the
    /// abuse signals' network check runs as it would behind a gateway.
    pub fn with_client_ips() -> Self {
        Self {
            keys: OnceLock::new(),
            client_ips: true,
        }
    }
}

impl Workload for Verify {
    type Client = Client;

    async fn setup(&self, client: &Client) -> Result<(), String> {
        // A fresh suffix per run: IssueKey refuses existing names.
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut keys = Vec::with_capacity(VERIFY_SET);
        for i in 0..VERIFY_SET {
            let name = format!("bench/verify-{run}-{i}");
            let k = client
                .issue_key(IssueKeyRequest {
                    name: name.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("issuing {name}: {e}"))?;
            keys.push(k.api_key);
        }
        self.keys
            .set(keys)
            .map_err(|_| "verify workload set up twice".to_string())
    }

    async fn op(&self, client: &Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        let keys = self.keys.get().ok_or("NOT_SET_UP")?;
        let i = (worker as u64).wrapping_add(seq) % keys.len() as u64;
        let v = client
            .verify_key(VerifyKeyRequest {
                api_key: keys[i as usize].clone(),
                client_ip: if self.client_ips {
                    format!("10.{}.0.7", (seq + worker as u64) % 16)
                } else {
                    String::new()
                },
                ..Default::default()
            })
            .await
            .map_err(|e| code_name(e.code()))?;
        if v.result() == VerifyResult::Valid {
            Ok(())
        } else {
            Err("NOT_VALID")
        }
    }
}

/// A bare tonic RPC: the health check of the whole server.
pub struct Health;

impl Workload for Health {
    type Client = Client;

    async fn setup(&self, _client: &Client) -> Result<(), String> {
        Ok(())
    }

    async fn op(&self, client: &Client, _worker: usize, _seq: u64) -> Result<(), ErrorLabel> {
        let mut h = HealthClient::new(client.channel());
        let call = h.check(HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(ward_client::DEFAULT_TIMEOUT, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(code_name(s.code())),
            Err(_) => Err("DEADLINE_EXCEEDED"),
        }
    }
}
