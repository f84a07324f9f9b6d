//! [`WardCluster`]: N `ward-server` replicas on one [`EtcdCluster`], as docs/cluster.md runs
//! them: every replica reaches the same SoftHSM token (one token directory, one PIN, one master
//! key) and trusts the same dev CA, and each has its own data directory (its own audit log),
//! port and configuration file.
//!
//! The first replica's directory is made by dev mode (token, master key, CA, certificates,
//! policy, ward.toml), which is then stopped and its sled data removed; every other replica's
//! directory is a copy of it without the data and without the token (softhsm2.conf names the
//! shared token directory by its absolute path). Each ward.toml gets the `[store]` tables
//! pointing at the etcd cluster, and every replica runs the production path, `ward-server
//! serve --config DIR/ward.toml`, one after the other. [`ClusterOptions`] adds `[store.etcd]`
//! keys (`lease_ttl`, `quota_block`, …), gives a replica a subset of the etcd members, or puts
//! every replica on a test clock.

use std::net::SocketAddr;
use std::ops::{Index, IndexMut};
use std::path::Path;

use etcd_client::{GetOptions, SortOrder, SortTarget};

use crate::server::{copy_dir, test_clock_tables, TEST_CLOCK_FILE};
use crate::{EtcdCluster, TestServer};

/// Key prefix of the replicas' state in etcd.
pub const ETCD_PREFIX: &str = "/ward/";

/// Ward replicas sharing an etcd cluster, a SoftHSM token and a CA (see the module doc).
/// Index it for a replica: `cluster[1].raw_client("admin")`.
pub struct WardCluster {
    replicas: Vec<TestServer>,
}

/// How to start a [`WardCluster`] beyond the number of replicas.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// `key = value` lines (TOML) added to every replica's `[store.etcd]` table.
    etcd_keys: Vec<String>,
    /// (replica, the etcd members it lists in `endpoints`); the others list every member.
    members: Vec<(usize, Vec<usize>)>,
    /// Every replica on a test clock (see [`TestServer::start_with_test_clock`]).
    test_clock: bool,
}

impl ClusterOptions {
    /// Adds `key = value` (`value` as TOML, e.g. `"\"2s\""` or `"10"`) to every replica's
    /// `[store.etcd]` table.
    pub fn etcd_key(mut self, key: &str, value: &str) -> Self {
        self.etcd_keys.push(format!("{key} = {value}"));
        self
    }

    /// Replica `replica` lists only the etcd members `members` (by index) in its endpoints.
    pub fn members_of(mut self, replica: usize, members: &[usize]) -> Self {
        self.members.push((replica, members.to_vec()));
        self
    }

    /// Every replica reads its time from a test clock file that
    /// [`WardCluster::advance_clocks`] moves, and sweeps every
    /// [`TEST_SWEEP_INTERVAL_MS`](crate::TEST_SWEEP_INTERVAL_MS).
    pub fn test_clock(mut self) -> Self {
        self.test_clock = true;
        self
    }
}

impl WardCluster {
    /// Starts `n` replicas on `etcd`, each ready when this returns. When the etcd cluster
    /// requires client certificates ([`EtcdOptions::mtls`](crate::EtcdOptions::mtls)), every
    /// replica reaches it over mTLS with the cluster's client identity, copied to
    /// `tls/etcd-ca.pem`, `tls/etcd-client.pem` and `tls/etcd-client.key` of its directory.
    pub fn start(etcd: &EtcdCluster, n: usize) -> WardCluster {
        Self::start_with(etcd, n, ClusterOptions::default())
    }

    /// [`start`](Self::start) as `options` say.
    pub fn start_with(etcd: &EtcdCluster, n: usize, options: ClusterOptions) -> WardCluster {
        assert!(n > 0, "a cluster needs a replica");
        let mut first = TestServer::start();
        first.stop();
        let template = first.data_dir().to_path_buf();
        // The dev run's sled store: an etcd replica keeps only its own state (the audit log)
        // in data_dir.
        std::fs::remove_dir_all(template.join("data")).expect("remove the dev run's data");
        configure(&template, etcd, &options);
        // Copied before the first replica serves and writes its own data.
        let others: Vec<tempfile::TempDir> = (1..n)
            .map(|_| {
                let dir = tempfile::Builder::new()
                    .prefix("ward-e2e-replica-")
                    .tempdir()
                    .expect("create replica dir");
                // Everything but the token itself (softhsm2.conf names it by its absolute
                // path) and what a server wrote.
                let own = ["data", "e2e-scratch", "softhsm/tokens"].map(Path::new);
                copy_dir(&template, dir.path(), &|rel| own.contains(&rel));
                dir
            })
            .collect();
        for (i, members) in &options.members {
            let dir = match i {
                0 => template.as_path(),
                _ => others[i - 1].path(),
            };
            list_members(dir, etcd, members);
        }
        first.restart();
        let mut replicas = vec![first];
        replicas.extend(others.into_iter().map(TestServer::serve_in));
        if options.test_clock {
            for r in &replicas {
                *r.clock_offset_ms.lock().unwrap() = Some(0);
            }
        }
        WardCluster { replicas }
    }

    /// Moves every replica's test clock forward by `d` (a cluster started with
    /// [`ClusterOptions::test_clock`]).
    pub fn advance_clocks(&self, d: std::time::Duration) {
        for r in &self.replicas {
            r.advance_clock(d);
        }
    }

    /// Replica `i`'s id in the cluster (`replica-id` in its `data_dir`, DIR/data as dev mode
    /// configures it, made at its first start).
    pub fn replica_id(&self, i: usize) -> String {
        let path = self.replicas[i].data_dir().join("data").join("replica-id");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    /// The index of the replica that leads the cluster's jobs now, as etcd's election says:
    /// the oldest key under `PREFIX_cluster/leader` holds the leader's replica id. `None` while
    /// no replica leads.
    pub async fn leader(&self, etcd: &EtcdCluster) -> Option<usize> {
        let key = format!("{ETCD_PREFIX}_cluster/leader");
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let r = etcd
            .client()
            .await
            .get(key, Some(options))
            .await
            .expect("etcd get of the leader key");
        let id = r
            .kvs()
            .first()?
            .value_str()
            .expect("utf-8 replica id")
            .to_owned();
        let i = (0..self.replicas.len()).find(|&i| self.replica_id(i) == id);
        Some(i.unwrap_or_else(|| panic!("leader {id:?} is not a replica of this cluster")))
    }

    /// Number of replicas.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Whether there is no replica (never: a cluster starts with one at least).
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The replicas' gRPC addresses, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(TestServer::addr).collect()
    }

    /// Every replica's URL, comma-separated: the `WARD_ADDR` of a client of the whole cluster.
    pub fn ward_addr(&self) -> String {
        self.addrs()
            .iter()
            .map(|a| format!("https://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The replicas.
    pub fn replicas(&self) -> &[TestServer] {
        &self.replicas
    }
}

impl Index<usize> for WardCluster {
    type Output = TestServer;
    fn index(&self, i: usize) -> &TestServer {
        &self.replicas[i]
    }
}

impl IndexMut<usize> for WardCluster {
    fn index_mut(&mut self, i: usize) -> &mut TestServer {
        &mut self.replicas[i]
    }
}

/// The `endpoints = [...]` line of `[store.etcd]` listing `members` of `etcd`.
fn endpoints_line(etcd: &EtcdCluster, members: &[usize]) -> String {
    let list = members
        .iter()
        .map(|&i| format!("{:?}", etcd.endpoint(i)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("endpoints = [{list}]")
}

/// Rewrites DIR/ward.toml's etcd endpoints to list only `members`.
fn list_members(dir: &Path, etcd: &EtcdCluster, members: &[usize]) {
    let config = dir.join("ward.toml");
    let all = endpoints_line(etcd, &(0..etcd.len()).collect::<Vec<_>>());
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains(&all),
        "{} lists no etcd endpoints",
        config.display()
    );
    std::fs::write(&config, text.replace(&all, &endpoints_line(etcd, members))).unwrap();
}

/// Appends the `[store]` tables for `etcd` (and `options`' keys) to DIR/ward.toml, with the
/// etcd client identity copied under DIR/tls when the cluster requires one; and with
/// `options.test_clock`, the test clock file and the `[lifecycle]` and `[testing]` tables.
fn configure(dir: &Path, etcd: &EtcdCluster, options: &ClusterOptions) {
    let endpoints = endpoints_line(etcd, &(0..etcd.len()).collect::<Vec<_>>());
    let mut tables = format!(
        "[store]\nbackend = \"etcd\"\n\n[store.etcd]\n{endpoints}\nprefix = \"{ETCD_PREFIX}\"\n"
    );
    for line in &options.etcd_keys {
        tables.push_str(line);
        tables.push('\n');
    }
    if let Some(tls) = etcd.client_tls() {
        for (from, to, key) in [
            (&tls.ca, "etcd-ca.pem", "ca"),
            (&tls.cert, "etcd-client.pem", "cert"),
            (&tls.key, "etcd-client.key", "key"),
        ] {
            std::fs::copy(from, dir.join("tls").join(to)).expect("copy etcd client files");
            tables.push_str(&format!("{key} = \"tls/{to}\"\n"));
        }
    }
    let config = dir.join("ward.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    assert!(
        !text.lines().any(|l| l.trim() == "[store]"),
        "{} has a [store] table already",
        config.display()
    );
    if options.test_clock {
        std::fs::write(dir.join(TEST_CLOCK_FILE), "0").unwrap();
        text.push_str(&test_clock_tables());
    }
    text.push('\n');
    text.push_str(&tables);
    std::fs::write(&config, text).unwrap();
}
