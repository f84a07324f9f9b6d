//! The etcd backend: the store shared by every replica of a cluster (docs/cluster.md).
//!
//! - Layout: everything lives under one prefix, `prefix + tree name + "/" + key`; the replica
//!   registry and the leader key under `prefix + "_cluster/"`.
//! - Reads come from the replica's [mirror](mirror) (the whole prefix in memory, kept current
//!   by one watch), never from etcd.
//! - A commit is one etcd transaction: each guard becomes a compare on the key's
//!   `mod_revision` as the mirror knows it (0: absent) after checking the guard's value against
//!   the mirror, and the writes become the transaction's operations. Acknowledged = committed
//!   by etcd's Raft (etcd fsyncs its log before answering), so [`Store::sync`] has nothing left
//!   to wait for. A commit returns once the mirror has reached the transaction's revision, so
//!   the writer reads its own write; a guard that fails in etcd waits for the revision that
//!   made it fail, so the caller's retry reads what beat it.
//! - A transaction whose outcome is unknown (a timeout, a lost connection) is
//!   [`StoreError::Indeterminate`] and moves the [generation](Store::generation): the audit
//!   log then resolves the change from the store's applied mark instead of voiding it.
//! - etcd's own limits hold every transaction: at most [`MAX_TXN_OPS`] operations and
//!   [`MAX_TXN_BYTES`] bytes; a larger batch is [`StoreError::TooLarge`] and nothing is written.
//! - The etcd client runs on the backend's own small runtime: [`Store::commit`] is a blocking
//!   call and must not wait on the runtime of its caller.

mod cluster;
pub mod mirror;

pub use cluster::ReplicaInfo;
pub use mirror::Changed;

use super::{Batch, Entry, Snapshot, Store, StoreError, Tree};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, TlsOptions, Txn, TxnOp,
};
use futures::future::BoxFuture;
use mirror::{full_key, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Bytes of keys and values one transaction may carry: below etcd's default
/// `--max-request-bytes` (1.5 MiB) with room for the request's framing.
pub const MAX_TXN_BYTES: usize = 1_500_000;
/// Keys per page when loading the prefix.
const ETCD_PAGE: i64 = 2_000;

/// The key (under the prefix) of a tree's entries: its name and a slash.
fn tree_key(tree: Tree) -> Vec<u8> {
    let mut k = tree.name().as_bytes().to_vec();
    k.push(b'/');
    k
}

/// A key (under the prefix) of the cluster's own bookkeeping.
fn cluster_key(rest: &[u8]) -> Vec<u8> {
    let mut k = b"_cluster/".to_vec();
    k.extend_from_slice(rest);
    k
}

/// How to reach the etcd cluster (from `[store.etcd]`).
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the members.
    pub endpoints: Vec<String>,
    /// CA bundle of the members' certificates (TLS when set).
    pub ca: Option<std::path::PathBuf>,
    /// This replica's client certificate and key.
    pub cert: Option<std::path::PathBuf>,
    /// See `cert`.
    pub key: Option<std::path::PathBuf>,
    /// Key prefix of the vault.
    pub prefix: String,
    /// Bound of every etcd call.
    pub timeout: Duration,
    /// TTL of the replica's lease.
    pub lease_ttl: Duration,
    /// Longest watch silence before [`Store::fresh`] fails.
    pub max_staleness: Duration,
}

/// File (in `data_dir`) holding the replica's id: its registry entry and its node keys.
const REPLICA_ID_FILE: &str = "replica-id";

/// This replica's id: read from `data_dir`, or made (random) and kept there on first start.
pub fn replica_id(data_dir: &std::path::Path) -> Result<String, String> {
    let path = data_dir.join(REPLICA_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim().to_owned();
            let valid = |b: u8| b.is_ascii_alphanumeric() || b == b'-';
            if id.is_empty() || id.len() > 64 || !id.bytes().all(valid) {
                return Err(format!(
                    "{} does not hold a replica id (1 to 64 of a-z A-Z 0-9 -)",
                    path.display()
                ));
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            let id = hex::encode(bytes);
            let tmp = data_dir.join(format!("{REPLICA_ID_FILE}.tmp"));
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Cluster key present while a restore writes the prefix (see [`EtcdStore::restore_into`]).
const RESTORING: &[u8] = b"restoring";

/// The store on an etcd cluster.
pub struct EtcdStore {
    client: Client,
    shared: Arc<Shared>,
    timeout: Duration,
    /// Longest etcd silence on the watch before reads are refused ([`Store::fresh`]).
    max_staleness: Duration,
    generation: AtomicU64,
    /// The generation up to which [`Store::sync`] has caught up with etcd.
    settled: Arc<AtomicU64>,
    /// The backend's own runtime (the etcd client's I/O).
    runtime: Runtime,
    stop: watch::Sender<bool>,
    cluster: cluster::Membership,
}

impl EtcdStore {
    /// Connects to the cluster, loads the prefix, starts the watch and joins the replica
    /// registry under a lease. Fails (UNAVAILABLE) if etcd cannot be reached within the
    /// configured timeout.
    pub async fn open(cfg: &EtcdConfig, replica: ReplicaInfo) -> Result<Self, StoreError> {
        let runtime = Runtime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("ward-etcd")
                .enable_all()
                .build()
                .map_err(|e| StoreError::Unavailable(format!("etcd runtime: {e}")))?,
        ));
        let options = connect_options(cfg)?;
        let endpoints = cfg.endpoints.clone();
        let prefix = cfg.prefix.as_bytes().to_vec();
        let timeout = cfg.timeout;
        let ttl = cfg.lease_ttl;
        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared::new(prefix.clone()));
        let started = {
            let shared = shared.clone();
            runtime.get()?.spawn(async move {
                let mut client =
                    tokio::time::timeout(timeout, Client::connect(endpoints, Some(options)))
                        .await
                        .map_err(|_| "timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                let mirror = tokio::time::timeout(timeout, mirror::load(&mut client, &prefix))
                    .await
                    .map_err(|_| "timed out loading the prefix".to_string())?
                    .map_err(|e| e.to_string())?;
                if mirror.cluster.contains_key(RESTORING) {
                    return Err(format!(
                        "a restore into prefix {:?} was interrupted: delete the prefix \
                         (etcdctl del --prefix {:?}) and restore again",
                        String::from_utf8_lossy(&prefix),
                        String::from_utf8_lossy(&prefix)
                    ));
                }
                mirror::install(&shared, mirror);
                tokio::spawn(mirror::follow(
                    client.clone(),
                    shared.clone(),
                    stopped.clone(),
                ));
                let cluster =
                    cluster::Membership::join(client.clone(), &prefix, replica, ttl, stopped)
                        .await
                        .map_err(|e| e.to_string())?;
                Ok::<_, String>((client, cluster))
            })
        };
        let (client, cluster) = started
            .await
            .map_err(|e| StoreError::Unavailable(format!("etcd: {e}")))?
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot reach etcd at {}: {e}",
                    cfg.endpoints.join(", ")
                ))
            })?;
        tracing::info!(
            endpoints = %cfg.endpoints.join(","),
            prefix = %cfg.prefix,
            revision = shared.read().revision,
            "etcd store open"
        );
        Ok(Self {
            client,
            shared,
            timeout,
            max_staleness: cfg.max_staleness,
            generation: AtomicU64::new(0),
            settled: Arc::new(AtomicU64::new(0)),
            runtime,
            stop,
            cluster,
        })
    }

    /// Runs `f` on the backend's runtime and blocks the calling thread until it is done (in
    /// a multi-threaded runtime, the worker hands its other tasks on first).
    fn block_on<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let runtime = self.runtime.get()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(f.await);
        });
        let wait = || {
            rx.recv()
                .map_err(|_| StoreError::Unavailable("etcd store closed".into()))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    /// Publishes this replica's address in the registry (once its listener is bound).
    pub fn announce(&self, address: &str) {
        if let Ok(rt) = self.runtime.get() {
            self.cluster.announce(address, rt);
        }
    }

    /// Leaves the cluster: gives up leadership and the registry entry at once (its lease is
    /// revoked), so survivors take over without waiting for the lease to expire.
    pub async fn leave(&self) {
        let leave = self.cluster.leave();
        if let Ok(rt) = self.runtime.get() {
            let _ = tokio::time::timeout(self.timeout, rt.spawn(leave)).await;
        }
    }

    /// The transaction for `batch`, checked against the mirror first.
    fn transaction(&self, batch: &Batch) -> Result<Txn, StoreError> {
        let prefix = &self.shared.prefix;
        let m = self.shared.read();
        let mut compares = Vec::new();
        // What earlier parts of the batch wrote (their guards see it, etcd need not).
        let mut written: HashMap<(Tree, &[u8]), Option<&[u8]>> = HashMap::new();
        let mut order: Vec<(Tree, &[u8])> = Vec::new();
        for part in &batch.parts {
            for (tree, key, expected) in &part.guards {
                let now = match written.get(&(*tree, key.as_slice())) {
                    Some(v) => *v,
                    None => {
                        let stored = m.tree(*tree).get(key);
                        compares.push(Compare::mod_revision(
                            full_key(prefix, *tree, key),
                            CompareOp::Equal,
                            stored.map_or(0, |s| s.mod_revision),
                        ));
                        stored.map(|s| s.value.as_slice())
                    }
                };
                if now != expected.as_deref() {
                    return Err(StoreError::Conflict);
                }
            }
            for (tree, key, value) in &part.writes {
                let k = (*tree, key.as_slice());
                if written.insert(k, value.as_deref()).is_none() {
                    order.push(k);
                }
            }
        }
        if batch.leader_only {
            compares.push(self.cluster.fence()?);
        }
        // etcd refuses a transaction that names a key twice: the last write of each wins.
        let mut ops = Vec::with_capacity(order.len());
        let mut bytes = 0usize;
        for k in order {
            let full = full_key(prefix, k.0, k.1);
            bytes += full.len();
            ops.push(match written[&k] {
                Some(v) => {
                    bytes += v.len();
                    TxnOp::put(full, v.to_vec(), None)
                }
                None => TxnOp::delete(full, None),
            });
        }
        if ops.len() > MAX_TXN_OPS || compares.len() > MAX_TXN_OPS || bytes > MAX_TXN_BYTES {
            return Err(StoreError::TooLarge(format!(
                "{} writes, {} guards, {bytes} bytes (etcd takes at most {MAX_TXN_OPS} of each \
                 and {MAX_TXN_BYTES} bytes per transaction)",
                ops.len(),
                compares.len()
            )));
        }
        Ok(Txn::new().when(compares).and_then(ops))
    }
}

impl EtcdStore {
    /// Writes a snapshot into the configured prefix, which must be empty (blocking; no runtime
    /// needed). The prefix is marked while it is written: a server refuses to start on a
    /// prefix whose restore was interrupted. Returns the entries written.
    pub fn restore_into(cfg: &EtcdConfig, snapshot: &Snapshot) -> Result<u64, StoreError> {
        let unavailable = |e: etcd_client::Error| StoreError::Unavailable(format!("etcd: {e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("etcd runtime: {e}")))?;
        let prefix = cfg.prefix.as_bytes().to_vec();
        runtime.block_on(async {
            let mut client = Client::connect(&cfg.endpoints, Some(connect_options(cfg)?))
                .await
                .map_err(unavailable)?;
            let marker = [prefix.as_slice(), &cluster_key(RESTORING)].concat();
            let present = client
                .get(
                    prefix.clone(),
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await
                .map_err(unavailable)?
                .count();
            if present > 0 {
                return Err(StoreError::Unavailable(format!(
                    "prefix {:?} holds {present} keys: restore only into an empty prefix",
                    cfg.prefix
                )));
            }
            let claim = Txn::new()
                .when([Compare::create_revision(
                    marker.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(marker.clone(), b"1".to_vec(), None)]);
            if !client.txn(claim).await.map_err(unavailable)?.succeeded() {
                return Err(StoreError::Unavailable(
                    "another restore is writing this prefix".into(),
                ));
            }
            let mut written = 0u64;
            let mut ops = Vec::new();
            let mut bytes = 0usize;
            for (tree, entries) in &snapshot.trees {
                for (k, v) in entries {
                    let full = full_key(&prefix, *tree, k);
                    if ops.len() == MAX_TXN_OPS || bytes + full.len() + v.len() > MAX_TXN_BYTES {
                        let txn = Txn::new().and_then(std::mem::take(&mut ops));
                        client.txn(txn).await.map_err(unavailable)?;
                        bytes = 0;
                    }
                    bytes += full.len() + v.len();
                    ops.push(TxnOp::put(full, v.clone(), None));
                    written += 1;
                }
            }
            if !ops.is_empty() {
                client
                    .txn(Txn::new().and_then(ops))
                    .await
                    .map_err(unavailable)?;
            }
            client.delete(marker, None).await.map_err(unavailable)?;
            Ok(written)
        })
    }
}

fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, StoreError> {
    // No per-request timeout on the connection: an election campaign waits as long as
    // another replica leads. Every other call is bounded where it is made.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(cfg.timeout)
        .with_keep_alive(Duration::from_secs(5), cfg.timeout)
        .with_require_leader(true);
    if let Some(ca) = &cfg.ca {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| StoreError::Unavailable(format!("cannot read {}: {e}", p.display())))
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// Growing pauses between attempts that keep failing (reconnecting a watch, reloading,
/// re-registering): 50 ms doubling to 2 s.
pub(super) struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Self {
        Self(Duration::from_millis(50))
    }

    /// Waits the current pause (then doubles it); false if `stop` came first.
    pub async fn wait(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let pause = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = stop.changed() => false,
        }
    }
}

/// Pause before a call that never reached a member is sent again.
const RESEND_PAUSE: Duration = Duration::from_millis(20);

/// Makes `call` until it reaches a member (a dead member, mid-failover, refuses connections:
/// nothing was applied, so another member may take the call), or `deadline` passes
/// (`Err(None)`). Any other failure is `Err(Some(_))`.
pub(super) async fn until_sent<
    T,
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
>(
    deadline: tokio::time::Instant,
    mut call: impl FnMut() -> F,
) -> Result<T, Option<etcd_client::Error>> {
    loop {
        match tokio::time::timeout_at(deadline, call()).await {
            Err(_) => return Err(None),
            Ok(Err(e)) if not_sent(&e) => {
                tracing::debug!(error = %e, "etcd call not sent; trying again");
                tokio::time::sleep(RESEND_PAUSE).await;
            }
            Ok(Err(e)) => return Err(Some(e)),
            Ok(Ok(v)) => return Ok(v),
        }
    }
}

/// Whether a failed call never reached a member (so it cannot have been applied): the
/// connection was refused or could not be made, or the member has no leader (refused before
/// any proposal, with `require_leader`).
fn not_sent(e: &etcd_client::Error) -> bool {
    let text = format!("{e:?}");
    [
        "ConnectError",
        "Connection refused",
        "no leader",
        "not connected",
    ]
    .iter()
    .any(|s| text.contains(s))
}

/// Maps an etcd failure whose transaction surely did not apply (refused before Raft).
fn refused(e: &etcd_client::Error) -> Option<StoreError> {
    let text = e.to_string();
    if text.contains("database space exceeded") {
        return Some(StoreError::Full(
            "etcd is out of space (NOSPACE alarm): writes are refused until an operator \
             compacts, defragments and disarms the alarm; reads continue"
                .into(),
        ));
    }
    if text.contains("too many operations in txn request") || text.contains("request is too large")
    {
        return Some(StoreError::TooLarge(text));
    }
    None
}

impl Store for EtcdStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .shared
            .read()
            .tree(tree)
            .get(key)
            .map(|s| s.value.clone()))
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        Ok(self.shared.read().scan(tree, prefix, start, limit))
    }

    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .shared
            .read()
            .tree(tree)
            .last_key_value()
            .map(|(k, s)| (k.clone(), s.value.clone())))
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if let Some(g) = batch.generation {
            if g != self.generation() {
                return Err(StoreError::Unavailable(
                    "the store's state moved on since this write was prepared".into(),
                ));
            }
        }
        if batch.is_empty() && batch.guards().next().is_none() {
            return Ok(());
        }
        let txn = self.transaction(&batch)?;
        let client = self.client.clone();
        let mut applied = self.shared.applied.subscribe();
        let timeout = self.timeout;
        let outcome = self.block_on(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let resp = until_sent(deadline, || {
                let (mut client, txn) = (client.clone(), txn.clone());
                async move { client.txn(txn).await }
            })
            .await?;
            // Read-your-writes (and, after a failed guard, read what beat it): wait for the
            // watch to bring this revision into the mirror.
            let revision = resp.header().map_or(0, |h| h.revision());
            let seen = tokio::time::timeout(timeout, applied.wait_for(|r| *r >= revision))
                .await
                .is_ok_and(|r| r.is_ok());
            Ok((resp.succeeded(), revision, seen))
        })?;
        match outcome {
            Ok((succeeded, revision, seen)) => {
                if !seen {
                    tracing::warn!(
                        revision,
                        "the etcd watch has not delivered a committed write yet; this replica \
                         may read the older value until it does"
                    );
                }
                if succeeded {
                    Ok(())
                } else {
                    Err(StoreError::Conflict)
                }
            }
            Err(Some(e)) => match refused(&e) {
                Some(refusal) => {
                    tracing::error!(error = %e, "etcd refused a write");
                    Err(refusal)
                }
                None => {
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    Err(StoreError::Indeterminate(format!("etcd: {e}")))
                }
            },
            Err(None) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                Err(StoreError::Indeterminate(format!(
                    "etcd did not answer within {timeout:?}"
                )))
            }
        }
    }

    /// Every commit is durable once etcd answered it; after an unknown outcome, waits until
    /// this replica's copy holds everything etcd has committed (a linearizable read gives
    /// the revision), so what the caller reads next is settled.
    fn sync(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let generation = self.generation();
            if self.settled.load(Ordering::Acquire) == generation {
                return Ok(());
            }
            let settled = self.settled.clone();
            let client = self.client.clone();
            let prefix = self.shared.prefix.clone();
            let mut applied = self.shared.applied.subscribe();
            let timeout = self.timeout;
            let barrier = async move {
                let deadline = tokio::time::Instant::now() + timeout;
                let resp = until_sent(deadline, || {
                    let (mut client, prefix) = (client.clone(), prefix.clone());
                    let count = etcd_client::GetOptions::new().with_count_only();
                    async move { client.get(prefix, Some(count)).await }
                })
                .await
                .map_err(|e| match e {
                    Some(e) => StoreError::Unavailable(format!("etcd: {e}")),
                    None => StoreError::Unavailable("etcd did not answer".into()),
                })?;
                let revision = resp.header().map_or(0, |h| h.revision());
                applied
                    .wait_for(|r| *r >= revision)
                    .await
                    .map_err(|_| StoreError::Unavailable("etcd watch stopped".into()))?;
                settled.fetch_max(generation, Ordering::AcqRel);
                Ok(())
            };
            tokio::time::timeout(timeout, self.runtime.get()?.spawn(barrier))
                .await
                .map_err(|_| StoreError::Unavailable("etcd did not answer".into()))?
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let m = self.shared.read();
        Ok(Snapshot {
            trees: Tree::ALL
                .iter()
                .map(|t| {
                    let entries = m
                        .tree(*t)
                        .iter()
                        .map(|(k, s)| (k.clone(), s.value.clone()))
                        .collect();
                    (*t, entries)
                })
                .collect(),
        })
    }

    fn follow(&self) -> Option<broadcast::Receiver<Changed>> {
        Some(self.shared.changes.subscribe())
    }

    fn leads(&self) -> bool {
        self.cluster.leads()
    }

    fn live_replicas(&self) -> usize {
        cluster::live(&self.shared.read())
    }

    fn fresh(&self) -> Result<(), StoreError> {
        let silence = self.shared.silence();
        if silence <= self.max_staleness {
            return Ok(());
        }
        Err(StoreError::Unavailable(format!(
            "this replica has not heard from etcd for {:.1}s (store.etcd.max_staleness is \
             {:?}): what it holds may be out of date; use another replica",
            silence.as_secs_f64(),
            self.max_staleness
        )))
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// The backend's runtime, shut down without waiting when dropped (dropping a runtime may
/// happen on an async worker, where waiting for its tasks is not allowed).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn get(&self) -> Result<&tokio::runtime::Runtime, StoreError> {
        self.0
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("etcd store closed".into()))
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
