//! [`EtcdCluster`]: a real etcd cluster of N members (Debian's `etcd-server`, 3.4) on loopback,
//! for the replicas' store. Each member has its own temporary directory, a client port and a
//! peer port; the cluster is healthy (every running member answers a linearizable read) when a
//! constructor or [`restart`](EtcdCluster::restart) returns, and every member is killed when it
//! is dropped. A member's stderr goes to `DIR/<member>/etcd.log`, whose tail a failure shows.
//!
//! Admin actions (health, compaction, alarms, defragmentation) go through the `etcd-client`
//! crate, the same client the server uses; nothing here needs `etcdctl`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, ConnectOptions, GetOptions};

use crate::pki::{CertFiles, TestCa};
use crate::process::START_TIMEOUT;

/// Path of the `etcd` binary: `$ETCD_BIN`, else `etcd` on `PATH` (panics if neither: `make
/// deps` installs Debian's `etcd-server`).
pub fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ETCD_BIN={} is not a file", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "etcd not found on PATH and ETCD_BIN is unset: install Debian's etcd-server \
                 (`make deps` does)"
            )
        })
}

/// How to start an [`EtcdCluster`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Number of members.
    pub members: usize,
    /// `--quota-backend-bytes` (etcd's default, 2 GiB, when `None`): a small one brings the
    /// NOSPACE alarm within reach of a test.
    pub quota_backend_bytes: Option<u64>,
    /// Client URLs on https with client-certificate auth (`--client-cert-auth`): certificates
    /// from a new test CA, see [`EtcdCluster::client_tls`]. Peers talk plain http either way.
    pub mtls: bool,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            members: 3,
            quota_backend_bytes: None,
            mtls: false,
        }
    }
}

/// A running etcd cluster on loopback (see the module doc).
pub struct EtcdCluster {
    dir: Option<tempfile::TempDir>,
    members: Vec<Member>,
    options: EtcdOptions,
    /// `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
    /// CA, server certificate and key of the members, and a client identity (with `mtls`).
    tls: Option<EtcdTls>,
}

struct Member {
    name: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    proc: Option<Child>,
}

struct EtcdTls {
    server_cert: PathBuf,
    server_key: PathBuf,
    client: CertFiles,
}

/// How long a read or write of the harness's admin client may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl EtcdCluster {
    /// A cluster of `members` members, plain http, etcd's default quota.
    pub async fn start(members: usize) -> EtcdCluster {
        Self::start_with(EtcdOptions {
            members,
            ..EtcdOptions::default()
        })
        .await
    }

    /// A cluster of `members` members on https with client-certificate auth (see
    /// [`client_tls`](Self::client_tls)), etcd's default quota.
    pub async fn start_mtls(members: usize) -> EtcdCluster {
        Self::start_with(EtcdOptions {
            members,
            mtls: true,
            ..EtcdOptions::default()
        })
        .await
    }

    /// A cluster as `options` say. The ports are free ports picked just before etcd binds
    /// them; should another process take one in between, the cluster is started again on new
    /// ports (a few times).
    pub async fn start_with(options: EtcdOptions) -> EtcdCluster {
        assert!(options.members > 0, "an etcd cluster needs a member");
        let mut last = String::new();
        for _ in 0..3 {
            let mut cluster = Self::spawn(options.clone());
            match cluster.wait_healthy_or_exit().await {
                Ok(()) => return cluster,
                Err(why) if why.contains("address already in use") => last = why,
                Err(why) => panic!("etcd cluster did not start: {why}"),
            }
        }
        panic!("etcd cluster did not start (ports taken three times): {last}")
    }

    fn spawn(options: EtcdOptions) -> EtcdCluster {
        let dir = tempfile::Builder::new()
            .prefix("ward-etcd-")
            .tempdir()
            .expect("create etcd temp dir");
        let members: Vec<Member> = (0..options.members)
            .map(|i| {
                let name = format!("m{i}");
                let member_dir = dir.path().join(&name);
                std::fs::create_dir(&member_dir).unwrap();
                Member {
                    name,
                    dir: member_dir,
                    client_port: free_port(),
                    peer_port: free_port(),
                    proc: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let tls = options.mtls.then(|| write_tls(dir.path()));
        let mut cluster = EtcdCluster {
            dir: Some(dir),
            members,
            options,
            initial_cluster,
            tls,
        };
        for i in 0..cluster.members.len() {
            cluster.launch(i);
        }
        cluster
    }

    /// Starts member `i`'s process (first start or restart: its data dir decides).
    fn launch(&mut self, i: usize) {
        assert!(self.members[i].proc.is_none(), "member {i} is running");
        let token = self
            .dir
            .as_ref()
            .and_then(|d| d.path().file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ward-test".into());
        let m = &self.members[i];
        let client_url = self.client_url(m);
        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(m.dir.join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &token])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(q) = self.options.quota_backend_bytes {
            cmd.arg("--quota-backend-bytes").arg(q.to_string());
        }
        if let Some(tls) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.client.ca)
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.log_path())
            .expect("open etcd.log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup etcd.log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", etcd_bin().display()));
        self.members[i].proc = Some(child);
    }

    /// The members' client URLs, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| self.client_url(m)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        self.client_url(&self.members[i])
    }

    fn client_url(&self, m: &Member) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", m.client_port)
    }

    /// With mTLS: the CA that signed the members' certificates and a client certificate and
    /// key it trusts (CN `ward`), as files.
    pub fn client_tls(&self) -> Option<&CertFiles> {
        self.tls.as_ref().map(|t| &t.client)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member (never: a cluster needs one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A client of every member (the crate balances over them).
    pub async fn client(&self) -> Client {
        self.connect(&self.endpoints()).await
    }

    /// A client of the members whose process runs (a killed member's endpoint would fail the
    /// calls the crate sends it).
    pub async fn live_client(&self) -> Client {
        let live: Vec<String> = (0..self.members.len())
            .filter(|&i| self.members[i].proc.is_some())
            .map(|i| self.endpoint(i))
            .collect();
        self.connect(&live).await
    }

    /// A client of member `i` alone.
    pub async fn member_client(&self, i: usize) -> Client {
        self.connect(&[self.endpoint(i)]).await
    }

    async fn connect(&self, endpoints: &[String]) -> Client {
        Client::connect(endpoints, Some(self.connect_options()))
            .await
            .unwrap_or_else(|e| panic!("etcd client for {endpoints:?}: {e}"))
    }

    fn connect_options(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        if let Some(tls) = &self.tls {
            let read = |p: &Path| std::fs::read(p).unwrap();
            o = o.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.client.ca)))
                    .identity(etcd_client::Identity::from_pem(
                        read(&tls.client.cert),
                        read(&tls.client.key),
                    ))
                    .domain_name("localhost"),
            );
        }
        o
    }

    /// SIGKILLs member `i` (no chance to flush) and reaps it.
    pub fn kill9(&mut self, i: usize) {
        let mut p = self.members[i]
            .proc
            .take()
            .unwrap_or_else(|| panic!("member {i} is not running"));
        let _ = p.kill();
        let _ = p.wait();
    }

    /// Starts member `i` again on its data dir and ports, and waits until every running member,
    /// this one included, answers a linearizable read (it has rejoined).
    pub async fn restart(&mut self, i: usize) {
        self.launch(i);
        if let Err(why) = self.wait_healthy_or_exit().await {
            panic!("etcd member {i} did not rejoin: {why}");
        }
    }

    /// Whether member `i`'s process runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.members[i].proc.as_mut() {
            Some(p) => p.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Waits until every running member answers a linearizable read (panics with the
    /// members' logs after [`START_TIMEOUT`]).
    pub async fn wait_healthy(&mut self) {
        if let Err(why) = self.wait_healthy_or_exit().await {
            panic!("etcd cluster not healthy: {why}");
        }
    }

    async fn wait_healthy_or_exit(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        for i in 0..self.members.len() {
            if self.members[i].proc.is_none() {
                continue;
            }
            loop {
                if let Some(status) = self.members[i].proc.as_mut().unwrap().try_wait().unwrap() {
                    self.members[i].proc = None;
                    return Err(format!(
                        "member {i} exited with {status}\n{}",
                        self.logs_tail(30)
                    ));
                }
                if self.member_answers(i).await.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    let why = self.member_answers(i).await.err().unwrap_or_default();
                    return Err(format!(
                        "member {i} not healthy within {START_TIMEOUT:?}: {why}\n{}",
                        self.logs_tail(30)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// A linearizable read through member `i` alone: it needs a leader and a quorum, and this
    /// member to have applied everything committed before the read.
    async fn member_answers(&self, i: usize) -> Result<(), String> {
        let mut c = Client::connect([self.endpoint(i)], Some(self.connect_options()))
            .await
            .map_err(|e| e.to_string())?;
        c.get(
            "ward-harness/health",
            Some(GetOptions::new().with_count_only()),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// The index of the member that leads (asked of a running member).
    pub async fn leader(&self) -> usize {
        let mut c = self.live_client().await;
        let status = c.status().await.expect("etcd status");
        let leader = status.leader();
        let members = c.member_list().await.expect("etcd member list");
        let name = members
            .members()
            .iter()
            .find(|m| m.id() == leader)
            .map(|m| m.name().to_owned())
            .unwrap_or_else(|| panic!("leader {leader:x} is not in the member list"));
        self.members
            .iter()
            .position(|m| m.name == name)
            .unwrap_or_else(|| panic!("leader {name} is not one of this cluster's members"))
    }

    /// Compacts the key-value history up to the current revision (physically: the call
    /// returns once every running member has dropped it); returns that revision. A watch from an older
    /// revision then fails with "required revision has been compacted".
    pub async fn compact_to_latest(&self) -> i64 {
        let mut c = self.live_client().await;
        let rev = c
            .get(
                "ward-harness/compact",
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .expect("etcd get (current revision)")
            .header()
            .expect("response header")
            .revision();
        c.compact(
            rev,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("etcd compact");
        rev
    }

    /// The alarms raised in the cluster (NOSPACE when a member's backend reached its quota).
    pub async fn alarms(&self) -> Vec<AlarmType> {
        let mut c = self.live_client().await;
        let r = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .expect("etcd alarm list");
        r.alarms().iter().map(|a| a.alarm()).collect()
    }

    /// What an operator does on NOSPACE (docs/cluster.md): compact the history, defragment
    /// every running member to hand the freed pages back, then disarm the alarms.
    pub async fn recover_from_nospace(&self) {
        self.compact_to_latest().await;
        for (i, m) in self.members.iter().enumerate() {
            if m.proc.is_some() {
                self.member_client(i)
                    .await
                    .defragment()
                    .await
                    .unwrap_or_else(|e| panic!("defragment member {i}: {e}"));
            }
        }
        // An alarm is raised per member and disarmed per member (as `etcdctl alarm disarm`).
        let mut c = self.live_client().await;
        let raised = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .expect("etcd alarm list");
        for a in raised.alarms() {
            let mut one = AlarmOptions::new();
            one.with_member(a.member_id());
            c.alarm(AlarmAction::Deactivate, a.alarm(), Some(one))
                .await
                .expect("etcd alarm disarm");
        }
    }

    /// The last `n` lines each member logged, member by member.
    pub fn logs_tail(&self, n: usize) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = std::fs::read_to_string(m.log_path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(n)..].join("\n");
            out.push_str(&format!(
                "--- etcd {} (last {n} lines) ---\n{tail}\n",
                m.name
            ));
        }
        out
    }
}

impl Member {
    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
        if std::env::var_os("WARD_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("[harness] keeping etcd dir {}", dir.keep().display());
            }
        }
    }
}

/// A port no one listens on now (the listener that found it is closed on return).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A new CA, the members' server certificate (localhost, 127.0.0.1) and a client identity, as
/// files under `dir/tls`.
fn write_tls(dir: &Path) -> EtcdTls {
    let tls = dir.join("tls");
    std::fs::create_dir(&tls).unwrap();
    let ca = TestCa::new("Ward test etcd CA");
    let (server_cert, server_key) = ca.server_cert();
    let (client_cert, client_key) = ca.client_cert("ward");
    let write = |name: &str, text: &str| {
        let p = tls.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    EtcdTls {
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client: CertFiles {
            ca: write("ca.pem", &ca.pem),
            cert: write("client.pem", &client_cert),
            key: write("client.key", &client_key),
        },
    }
}
