//! A replica's membership: its lease, its registry entry, and the election that picks the one
//! replica running the cluster's jobs.
//!
//! - The lease (TTL `store.etcd.lease_ttl`) is kept alive every third of its TTL. Every key the
//!   replica owns hangs on it: its registry entry `_cluster/replicas/<id>` (id, address,
//!   version, start time) and, while it leads, the election key. A replica that dies stops
//!   counting when its lease expires; one that shuts down revokes the lease at once.
//! - Leadership is etcd's election API (`Campaign` on `_cluster/leader` with the lease). The
//!   leader's writes carry a compare on its election key's create revision (the fence): a
//!   replica whose lease expired (a pause, a partition) cannot commit as leader even before it
//!   learns that it lost.
//! - Losing the lease (keep-alive answered TTL 0, or no answer for a whole TTL) drops
//!   leadership at once, then the replica takes a new lease, registers again and campaigns.

use super::mirror::Mirror;
use super::{cluster_key, until_sent, Backoff};
use crate::store::StoreError;
use etcd_client::{Client, Compare, CompareOp, PutOptions};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// How long announcing an address or leaving may take.
const ANNOUNCE_WITHIN: Duration = Duration::from_secs(5);

/// Who this replica is, as the registry shows it.
#[derive(Debug, Clone)]
pub struct ReplicaInfo {
    /// Stable id of the replica (kept in its data directory).
    pub id: String,
    /// The address clients call, once known.
    pub address: String,
    /// Ward's version.
    pub version: String,
    /// Start time, ms since the epoch.
    pub started_ms: u64,
}

impl ReplicaInfo {
    fn encode(&self) -> Vec<u8> {
        format!(
            "id={}\naddress={}\nversion={}\nstarted_ms={}\n",
            self.id, self.address, self.version, self.started_ms
        )
        .into_bytes()
    }
}

/// The election key this replica holds while it leads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Leader {
    key: Vec<u8>,
    revision: i64,
}

/// Live registry entries: at least this replica.
pub(super) fn live(m: &Mirror) -> usize {
    let prefix = b"replicas/";
    m.cluster
        .range(prefix.to_vec()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .count()
        .max(1)
}

/// This replica's lease, registry entry and campaign.
pub(super) struct Membership {
    client: Client,
    prefix: Vec<u8>,
    info: Arc<Mutex<ReplicaInfo>>,
    lease: Arc<AtomicI64>,
    leader: watch::Receiver<Option<Leader>>,
}

impl Membership {
    /// Takes a lease, registers, and starts keeping the lease and campaigning.
    pub async fn join(
        mut client: Client,
        prefix: &[u8],
        info: ReplicaInfo,
        ttl: Duration,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, etcd_client::Error> {
        let info = Arc::new(Mutex::new(info));
        let lease = register(&mut client, prefix, &info, ttl).await?;
        let lease = Arc::new(AtomicI64::new(lease));
        let (leader_tx, leader) = watch::channel(None);
        tokio::spawn(run(
            client.clone(),
            prefix.to_vec(),
            info.clone(),
            lease.clone(),
            ttl,
            leader_tx,
            stop,
        ));
        Ok(Self {
            client,
            prefix: prefix.to_vec(),
            info,
            lease,
            leader,
        })
    }

    /// Whether this replica leads the cluster's jobs now.
    pub fn leads(&self) -> bool {
        self.leader.borrow().is_some()
    }

    /// The compare that lets a transaction apply only while this replica leads.
    pub fn fence(&self) -> Result<Compare, StoreError> {
        match &*self.leader.borrow() {
            Some(l) => Ok(Compare::create_revision(
                l.key.clone(),
                CompareOp::Equal,
                l.revision,
            )),
            None => Err(StoreError::Unavailable(
                "this replica does not lead the cluster's jobs".into(),
            )),
        }
    }

    /// Records the address and rewrites the registry entry.
    pub fn announce(&self, address: &str, runtime: &tokio::runtime::Runtime) {
        let (key, value) = {
            let mut info = lock(&self.info);
            info.address = address.to_owned();
            (registry_key(&self.prefix, &info.id), info.encode())
        };
        let (client, lease) = (self.client.clone(), self.lease.load(Ordering::Acquire));
        runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + ANNOUNCE_WITHIN;
            let put = until_sent(deadline, || put_leased(client.clone(), &key, &value, lease));
            if let Err(e) = put.await {
                tracing::warn!(error = ?e, "could not update this replica's registry entry");
            }
        });
    }

    /// Revokes the lease: the registry entry and any leadership go at once.
    pub fn leave(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let client = self.client.clone();
        let lease = self.lease.load(Ordering::Acquire);
        async move {
            let deadline = tokio::time::Instant::now() + ANNOUNCE_WITHIN;
            let revoke = until_sent(deadline, || {
                let mut client = client.clone();
                async move { client.lease_revoke(lease).await }
            });
            if let Err(e) = revoke.await {
                tracing::warn!(error = ?e, "could not revoke this replica's lease; it expires by itself");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn registry_key(prefix: &[u8], id: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&cluster_key(format!("replicas/{id}").as_bytes()));
    k
}

/// Grants a lease and writes the registry entry under it.
async fn register(
    client: &mut Client,
    prefix: &[u8],
    info: &Mutex<ReplicaInfo>,
    ttl: Duration,
) -> Result<i64, etcd_client::Error> {
    let failed = |e: Option<etcd_client::Error>| {
        e.unwrap_or_else(|| etcd_client::Error::Internal("etcd did not answer in time".into()))
    };
    let deadline = tokio::time::Instant::now() + ttl;
    let seconds = ttl.as_secs().max(2) as i64;
    let lease = until_sent(deadline, || {
        let mut client = client.clone();
        async move { client.lease_grant(seconds, None).await }
    })
    .await
    .map_err(failed)?
    .id();
    let (key, value) = {
        let i = lock(info);
        (registry_key(prefix, &i.id), i.encode())
    };
    until_sent(deadline, || put_leased(client.clone(), &key, &value, lease))
        .await
        .map_err(failed)?;
    Ok(lease)
}

/// Puts `key` under `lease`.
async fn put_leased(
    mut client: Client,
    key: &[u8],
    value: &[u8],
    lease: i64,
) -> Result<(), etcd_client::Error> {
    let opts = PutOptions::new().with_lease(lease);
    client.put(key, value, Some(opts)).await.map(|_| ())
}

/// Keeps the lease, campaigns while holding it, and starts over with a new lease when it is
/// lost, until `stop`.
async fn run(
    mut client: Client,
    prefix: Vec<u8>,
    info: Arc<Mutex<ReplicaInfo>>,
    lease: Arc<AtomicI64>,
    ttl: Duration,
    leader: watch::Sender<Option<Leader>>,
    mut stop: watch::Receiver<bool>,
) {
    let name = {
        let mut n = prefix.clone();
        n.extend_from_slice(&cluster_key(b"leader"));
        n
    };
    loop {
        let id = lease.load(Ordering::Acquire);
        let lost = keep(client.clone(), id, ttl);
        tokio::pin!(lost);
        let value = lock(&info).id.clone().into_bytes();
        loop {
            tokio::select! {
                _ = &mut lost => break,
                _ = stop.changed() => return,
                won = client.campaign(name.clone(), value.clone(), id) => match won {
                    Ok(resp) => {
                        if let Some(l) = resp.leader() {
                            tracing::info!(lease = id, "this replica now leads the cluster's jobs");
                            leader.send_replace(Some(Leader { key: l.key().to_vec(), revision: l.rev() }));
                        }
                        tokio::select! {
                            _ = &mut lost => break,
                            _ = stop.changed() => return,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd election failed; campaigning again");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = &mut lost => break,
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
        }
        if leader.send_replace(None).is_some() {
            tracing::warn!(
                "this replica lost its etcd lease and with it the lead of the cluster's jobs"
            );
        } else {
            tracing::warn!("this replica lost its etcd lease; registering again");
        }
        let mut backoff = Backoff::new();
        loop {
            match register(&mut client, &prefix, &info, ttl).await {
                Ok(id) => {
                    lease.store(id, Ordering::Release);
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "could not take a new etcd lease; retrying"),
            }
            if !backoff.wait(&mut stop).await {
                return;
            }
        }
    }
}

/// Keeps lease `id` alive; resolves when it is lost (etcd says it expired, or no renewal
/// succeeded for a whole TTL counted from when the last successful one was sent).
async fn keep(mut client: Client, id: i64, ttl: Duration) {
    let every = ttl / 3;
    let mut deadline = tokio::time::Instant::now() + ttl;
    let mut stream = None;
    loop {
        let sent = tokio::time::Instant::now();
        let round = async {
            if stream.is_none() {
                stream = Some(client.lease_keep_alive(id).await?);
            }
            match stream.as_mut() {
                Some((keeper, answers)) => {
                    keeper.keep_alive().await?;
                    answers.message().await
                }
                None => Ok(None),
            }
        };
        match tokio::time::timeout_at(deadline, round).await {
            Err(_) => return,
            Ok(Ok(Some(a))) if a.ttl() > 0 => {
                deadline = sent + ttl;
                tokio::time::sleep(every).await;
            }
            Ok(Ok(Some(_))) => return,
            Ok(Ok(None)) | Ok(Err(_)) => {
                stream = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
