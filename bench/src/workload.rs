//! Workloads: what one benchmark operation is, and the state it needs before timing starts.
//!
//! A workload is plugged into the runner through the [`Workload`] trait; adding one (an echo
//! server baseline, an etcd peer) means a new type here and a new [`WorkloadKind`] arm.

use std::future::Future;
use std::sync::OnceLock;

use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use ward_client::proto::{IssueKeyRequest, PutSecretRequest, VerifyKeyRequest, VerifyResult};
use ward_client::{code_name, Client};

/// Label under which a failed operation is counted, e.g. `UNAVAILABLE`.
pub type ErrorLabel = &'static str;

/// One kind of operation the benchmark repeats.
pub trait Workload: Send + Sync + 'static {
    /// Prepares server state (outside the timed window).
    fn setup(&self, client: &Client) -> impl Future<Output = Result<(), String>> + Send;

    /// Performs operation number `seq` of worker `worker`.
    fn op(
        &self,
        client: &Client,
        worker: usize,
        seq: u64,
    ) -> impl Future<Output = Result<(), ErrorLabel>> + Send;
}

/// The workloads selectable with `--workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    /// Fetch `bench/fetch-0..99` (PRIMARY) round-robin, after writing them once.
    Fetch,
    /// Write `bench/put-<worker>-<n>`, a new secret per operation.
    Put,
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
            Self::Put => "put",
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
}

impl Fetch {
    /// A fetch workload over `bench/fetch-0..99`, whose values are `value_size` bytes.
    pub fn new(value_size: usize) -> Self {
        Self {
            names: (0..FETCH_SET).map(|i| format!("bench/fetch-{i}")).collect(),
            value_size,
        }
    }
}

impl Workload for Fetch {
    async fn setup(&self, client: &Client) -> Result<(), String> {
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

/// Writes a new secret per operation.
pub struct Put {
    value: Vec<u8>,
}

impl Put {
    /// A put workload writing `value_size`-byte values.
    pub fn new(value_size: usize) -> Self {
        Self {
            value: bench_value(value_size),
        }
    }
}

impl Workload for Put {
    async fn setup(&self, _client: &Client) -> Result<(), String> {
        Ok(())
    }

    async fn op(&self, client: &Client, worker: usize, seq: u64) -> Result<(), ErrorLabel> {
        client
            .put_secret(PutSecretRequest {
                name: format!("bench/put-{worker}-{seq}"),
                value: self.value.clone(),
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| code_name(e.code()))
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
}

impl Workload for Verify {
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
