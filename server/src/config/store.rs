//! The `[store]` section: which backend holds the vault's state. sled (the default) keeps it in
//! `data_dir` on this machine; etcd shares it between replicas (docs/cluster.md).

use super::de_duration;
use crate::store::etcd::EtcdConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the vault's state lives.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The backend.
    pub backend: Backend,
    /// The etcd cluster, when `backend = "etcd"`.
    pub etcd: Option<EtcdSection>,
}

/// A store backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded sled database in `data_dir` (one machine).
    #[default]
    Sled,
    /// A shared etcd cluster (several stateless replicas).
    Etcd,
}

/// How a replica reaches the etcd cluster (`[store.etcd]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    /// Client URLs of the members (`https://host:2379`; plain `http://` only to loopback).
    pub endpoints: Vec<String>,
    /// CA bundle that signed the members' certificates (mutual TLS).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This replica's client certificate for etcd.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Key prefix of everything Ward keeps in etcd (one vault per prefix).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// An etcd call that takes longer fails (UNAVAILABLE).
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Time-to-live of this replica's lease (registry entry, quota blocks, leadership): how
    /// long a replica that died without a goodbye counts as live.
    #[serde(default = "default_lease_ttl", deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// A replica whose watch has heard nothing from etcd (no event, no answer to its progress
    /// requests, sent twice a second) for longer refuses calls with UNAVAILABLE: a replica cut
    /// off from the cluster must not keep accepting keys revoked elsewhere.
    #[serde(default = "default_max_staleness", deserialize_with = "de_duration")]
    pub max_staleness: Duration,
    /// Units of an API key's quota a replica takes from the shared ledger at a time (at most
    /// this many are lost per replica that crashes: quotas under-admit, never over-admit).
    #[serde(default = "default_quota_block")]
    pub quota_block: u64,
}

fn default_prefix() -> String {
    "/ward/".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_max_staleness() -> Duration {
    Duration::from_secs(3)
}
fn default_quota_block() -> u64 {
    100
}

impl StoreConfig {
    /// The etcd section, when the backend is etcd.
    pub fn etcd(&self) -> Option<&EtcdSection> {
        self.etcd.as_ref().filter(|_| self.backend == Backend::Etcd)
    }

    /// Quota units a process takes from a key's ledger at a time: exactly each charge's cost
    /// on a store of its own, `quota_block` on a shared one.
    pub fn quota_block(&self) -> u64 {
        self.etcd().map_or(1, |e| e.quota_block)
    }

    /// Resolves relative paths against the config file's folder.
    pub(super) fn resolve(&mut self, base: &Path) {
        if let Some(e) = self.etcd.as_mut() {
            for p in [&mut e.ca, &mut e.cert, &mut e.key].into_iter().flatten() {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
    }

    /// Checks the section's rules.
    pub(super) fn validate(&self) -> Result<(), String> {
        match (self.backend, &self.etcd) {
            (Backend::Sled, _) => Ok(()),
            (Backend::Etcd, None) => {
                Err("store.backend = \"etcd\" needs a [store.etcd] section".into())
            }
            (Backend::Etcd, Some(e)) => e.validate(),
        }
    }
}

impl EtcdSection {
    /// What the store needs of it.
    pub fn store_config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.endpoints.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            prefix: self.prefix.clone(),
            timeout: self.timeout,
            lease_ttl: self.lease_ttl,
            max_staleness: self.max_staleness,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("store.etcd.endpoints must name at least one member".into());
        }
        let tls = self.ca.is_some();
        for e in &self.endpoints {
            let (scheme, rest) = e
                .split_once("://")
                .ok_or_else(|| format!("store.etcd endpoint {e:?} must be http(s)://host:port"))?;
            let host = rest.rsplit_once(':').map(|(h, _)| h).unwrap_or(rest);
            match scheme {
                "https" if tls => {}
                "https" => {
                    return Err(format!(
                        "store.etcd endpoint {e:?} is https but store.etcd.ca is not set"
                    ))
                }
                "http" if tls => {
                    return Err(format!(
                        "store.etcd endpoint {e:?} is plain http but store.etcd.ca is set: use \
                         https"
                    ))
                }
                "http" if is_loopback(host) => {}
                "http" => {
                    return Err(format!(
                        "store.etcd endpoint {e:?}: plain http is allowed only to loopback; use \
                         https with store.etcd.ca, cert and key"
                    ))
                }
                _ => {
                    return Err(format!(
                        "store.etcd endpoint {e:?} must be http(s)://host:port"
                    ))
                }
            }
        }
        if tls && (self.cert.is_none() != self.key.is_none()) {
            return Err("store.etcd.cert and store.etcd.key go together".into());
        }
        if !tls && (self.cert.is_some() || self.key.is_some()) {
            return Err("store.etcd.cert and key need store.etcd.ca".into());
        }
        let p = &self.prefix;
        if p.is_empty() || !p.starts_with('/') || !p.ends_with('/') || p.len() > 128 {
            return Err(format!(
                "store.etcd.prefix {p:?} must start and end with '/' (at most 128 bytes)"
            ));
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_secs(300) {
            return Err("store.etcd.timeout must be between 100ms and 5m".into());
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(600) {
            return Err("store.etcd.lease_ttl must be between 2s and 10m".into());
        }
        if self.max_staleness < Duration::from_secs(1)
            || self.max_staleness > Duration::from_secs(60)
        {
            return Err("store.etcd.max_staleness must be between 1s and 60s".into());
        }
        if self.quota_block == 0 || self.quota_block > 1_000_000 {
            return Err("store.etcd.quota_block must be between 1 and 1000000".into());
        }
        Ok(())
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd(endpoints: &[&str], ca: bool) -> StoreConfig {
        StoreConfig {
            backend: Backend::Etcd,
            etcd: Some(EtcdSection {
                endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
                ca: ca.then(|| "ca.pem".into()),
                cert: ca.then(|| "c.pem".into()),
                key: ca.then(|| "c.key".into()),
                prefix: default_prefix(),
                timeout: default_timeout(),
                lease_ttl: default_lease_ttl(),
                max_staleness: default_max_staleness(),
                quota_block: 100,
            }),
        }
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(etcd(&["http://127.0.0.1:2379"], false).validate().is_ok());
        assert!(etcd(&["https://etcd-0:2379"], true).validate().is_ok());
        let err = |c: StoreConfig| c.validate().unwrap_err();
        assert!(err(etcd(&["http://etcd-0:2379"], false)).contains("only to loopback"));
        assert!(err(etcd(&["https://etcd-0:2379"], false)).contains("ca is not set"));
        assert!(err(etcd(&["http://127.0.0.1:2379"], true)).contains("use https"));
        assert!(err(etcd(&["etcd-0:2379"], false)).contains("http(s)://"));
        assert!(err(etcd(&[], false)).contains("at least one"));
        let mut c = etcd(&["http://[::1]:2379"], false);
        assert!(c.validate().is_ok());
        c.etcd.as_mut().unwrap().prefix = "ward".into();
        assert!(err(c).contains("prefix"));
        let none = StoreConfig {
            backend: Backend::Etcd,
            etcd: None,
        };
        assert!(err(none).contains("[store.etcd]"));
    }
}
