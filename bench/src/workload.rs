//! Workloads: what one benchmark operation is, and the state it needs before timing starts.
//!
//! A workload is plugged into the runner through the [`Workload`] trait; adding one (an echo
//! server baseline, an etcd peer) means a new type here and a new [`WorkloadKind`] arm.

use std::future::Future;

use ward_client::proto::PutSecretRequest;
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
}

impl WorkloadKind {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fetch => "fetch",
            Self::Put => "put",
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
