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
//! serve --config DIR/ward.toml`, one after the other.

use std::net::SocketAddr;
use std::ops::{Index, IndexMut};
use std::path::Path;

use crate::server::copy_dir;
use crate::{EtcdCluster, TestServer};

/// Key prefix of the replicas' state in etcd.
pub const ETCD_PREFIX: &str = "/ward/";

/// Ward replicas sharing an etcd cluster, a SoftHSM token and a CA (see the module doc).
/// Index it for a replica: `cluster[1].raw_client("admin")`.
pub struct WardCluster {
    replicas: Vec<TestServer>,
}

impl WardCluster {
    /// Starts `n` replicas on `etcd`, each ready when this returns. When the etcd cluster
    /// requires client certificates ([`EtcdOptions::mtls`](crate::EtcdOptions::mtls)), every
    /// replica reaches it over mTLS with the cluster's client identity, copied to
    /// `tls/etcd-ca.pem`, `tls/etcd-client.pem` and `tls/etcd-client.key` of its directory.
    pub fn start(etcd: &EtcdCluster, n: usize) -> WardCluster {
        assert!(n > 0, "a cluster needs a replica");
        let mut first = TestServer::start();
        first.stop();
        let template = first.data_dir().to_path_buf();
        // The dev run's sled store: an etcd replica keeps only its own state (the audit log)
        // in data_dir.
        std::fs::remove_dir_all(template.join("data")).expect("remove the dev run's data");
        configure(&template, etcd);
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
        first.restart();
        let mut replicas = vec![first];
        replicas.extend(others.into_iter().map(TestServer::serve_in));
        WardCluster { replicas }
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

/// Appends the `[store]` tables for `etcd` to DIR/ward.toml, with the etcd client identity
/// copied under DIR/tls when the cluster requires one.
fn configure(dir: &Path, etcd: &EtcdCluster) {
    let endpoints = etcd
        .endpoints()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut tables = format!(
        "[store]\nbackend = \"etcd\"\n\n[store.etcd]\nendpoints = [{endpoints}]\nprefix = \"{ETCD_PREFIX}\"\n"
    );
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
    text.push('\n');
    text.push_str(&tables);
    std::fs::write(&config, text).unwrap();
}
