//! End-to-end harness: runs the real `ward-server` binary (real SoftHSM token, real mTLS) in a
//! temporary data directory and hands out clients for it: the SDK, a raw generated client,
//! `wardctl` and `grpcurl`.
//!
//! Each [`TestServer`] owns its own data directory and port, so tests run in parallel. The child's
//! stdout and stderr are drained by background threads for its whole life (a full pipe would
//! block the server) and kept, so a failure message can show the server's last words and a test
//! can check that no secret ever reached a log line.
// A harness step that fails is a failed test; unwrap/expect with a message is how it says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use ward::v1 as pb;

/// The generated gRPC client over an mTLS channel: no retries, no cache, exact status codes.
pub type RawClient = pb::secrets_client::SecretsClient<Channel>;
/// The generated `ward.v1.Keys` client over an mTLS channel.
pub type KeysClient = pb::keys_client::KeysClient<Channel>;
/// Envoy's ext_authz client over an mTLS channel.
pub type AuthzClient =
    envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<Channel>;

/// The generated `ward.v1.Audit` client over an mTLS channel.
pub type AuditClient = pb::audit_client::AuditClient<Channel>;

/// How long a server may take from spawn to its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `wardctl` or `grpcurl` invocation may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// The prefix of the one line the server prints on stdout once it is listening.
pub const READY_PREFIX: &str = "ward-server ready addr=";
/// The prefix of the line naming the plain-HTTP metrics listener (printed before ready).
pub const METRICS_PREFIX: &str = "ward-server metrics addr=";
/// Lines of server output kept per stream (older lines are dropped).
const LOG_CAP: usize = 50_000;

/// Path of the `ward-server` binary: `$WARD_SERVER_BIN`, else next to the test executable.
pub fn server_bin() -> PathBuf {
    find_bin("WARD_SERVER_BIN", "ward-server")
}

/// Path of the `wardctl` binary: `$WARDCTL_BIN`, else next to the test executable.
pub fn wardctl_bin() -> PathBuf {
    find_bin("WARDCTL_BIN", "wardctl")
}

fn find_bin(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{var}={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // The test executable is target/<profile>/deps/e2e-<hash>; binaries are in target/<profile>.
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect();
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (looked at {candidates:?}, and {var} is unset): \
                 run `cargo build --workspace --bins` first (make test does)"
            )
        })
}

/// CRC32C, the checksum the server reports for a value.
pub fn crc32c(value: &[u8]) -> u32 {
    crc32c::crc32c(value)
}

/// A fresh random lowercase-hex string of `n` characters (for distinctive names and values).
pub fn random_hex(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap())
        .collect()
}

/// Unwraps a call that must succeed, showing the status and `what` otherwise.
pub fn ok<T>(r: Result<tonic::Response<T>, tonic::Status>, what: &str) -> T {
    match r {
        Ok(resp) => resp.into_inner(),
        Err(s) => panic!("{what}: expected OK, got {:?}: {}", s.code(), s.message()),
    }
}

/// Asserts that a call failed with exactly `code`; returns the status message.
pub fn expect_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    what: &str,
) -> String {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got OK: {v:?}"),
        Err(s) => {
            assert_eq!(
                s.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                s.code(),
                s.message()
            );
            s.message().to_owned()
        }
    }
}

/// A CA certificate, a client certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// CA certificate (PEM) the client trusts for the server.
    pub ca: PathBuf,
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Client private key (PEM).
    pub key: PathBuf,
}

/// Makes a brand-new CA (unknown to any server) and a client certificate with subject CN `cn`
/// signed by it, written under `dir` as `<cn>-foreign-{ca,cert,key}.pem`.
pub fn foreign_identity(dir: &Path, cn: &str) -> CertFiles {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Foreign test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let (cert, key) = client_cert(cn, None, &issuer);
    let files = CertFiles {
        ca: dir.join(format!("{cn}-foreign-ca.pem")),
        cert: dir.join(format!("{cn}-foreign-cert.pem")),
        key: dir.join(format!("{cn}-foreign-key.pem")),
    };
    std::fs::write(&files.ca, ca_cert.pem()).unwrap();
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    files
}

/// A client certificate (PEM) and key (PEM) for subject CN `cn` and an optional URI SAN.
fn client_cert(
    cn: &str,
    uri_san: Option<&str>,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> (String, String) {
    client_cert_with(cn, issuer, |params| {
        if let Some(uri) = uri_san {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
    })
}

/// A client certificate for subject CN `cn` (clientAuth EKU, digitalSignature), adjusted by
/// `customize` before signing (validity, EKU, serial number, …).
fn client_cert_with(
    cn: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    customize: impl FnOnce(&mut rcgen::CertificateParams),
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    customize(&mut params);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A test certificate authority (for CA rotation tests): its certificate and signing key.
pub struct TestCa {
    /// The CA certificate (PEM).
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new self-signed CA named `cn`, allowed to sign certificates and CRLs.
    pub fn new(cn: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A client certificate for CN `cn`: (cert PEM, key PEM).
    pub fn client_cert(&self, cn: &str) -> (String, String) {
        client_cert(cn, None, &self.issuer)
    }

    /// A server certificate for localhost / 127.0.0.1: (cert PEM, key PEM).
    pub fn server_cert(&self) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "server");
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A CRL (PEM) signed by `issuer` that revokes the certificates with the given serial numbers,
/// valid from 2024 to 2099.
fn crl_pem(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, number: u64, revoked: &[u64]) -> String {
    let params = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2024, 1, 1),
        next_update: rcgen::date_time_ymd(2099, 1, 1),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(*serial),
                revocation_time: rcgen::date_time_ymd(2025, 1, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params.signed_by(issuer).unwrap().pem().unwrap()
}

/// A file name made from a certificate's CN (which may hold `/`, `:` or control characters).
fn file_stem(cn: &str) -> String {
    cn.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it), keeping `mode`, as a
/// careful operator or a certificate agent replaces a file.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp-replace");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Rebuilds an rcgen issuer from an existing CA certificate and key (PEM): the issuer name must
/// be byte-identical to the CA's subject, so every attribute keeps its string type.
fn issuer_from_pem(ca_pem: &str, ca_key_pem: &str) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).expect("ca.pem is PEM");
    let x509 = pem.parse_x509().expect("ca.pem is a certificate");
    let mut dn = rcgen::DistinguishedName::new();
    for attr in x509.subject().iter_attributes() {
        let oid: Vec<u64> = attr.attr_type().iter().expect("small OID").collect();
        let raw = attr.attr_value().data;
        let text = String::from_utf8(raw.to_vec()).expect("CA subject is text");
        let value = match attr.attr_value().tag() {
            Tag::Utf8String => rcgen::DnValue::Utf8String(text),
            Tag::PrintableString => rcgen::DnValue::PrintableString(text.try_into().unwrap()),
            Tag::Ia5String => rcgen::DnValue::Ia5String(text.try_into().unwrap()),
            t => panic!("CA subject attribute with string type {t:?} not supported by the harness"),
        };
        dn.push(rcgen::DnType::from_oid(&oid), value);
    }
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = dn;
    params.key_usages = Vec::new();
    let key = rcgen::KeyPair::from_pem(ca_key_pem).expect("ca.key is a PKCS#8 PEM key");
    rcgen::Issuer::new(params, key)
}

/// Opens an mTLS channel to `addr`. `identity` is (cert PEM, key PEM); `None` presents no
/// client certificate.
pub async fn connect_channel(
    addr: SocketAddr,
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
}

/// Connects the generated client over mTLS (see [`connect_channel`]).
pub async fn connect_raw(
    addr: SocketAddr,
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<RawClient, tonic::transport::Error> {
    let channel = connect_channel(addr, ca_pem, identity).await?;
    Ok(pb::secrets_client::SecretsClient::new(channel))
}

/// Runs `cmd` with `stdin` (if any) to completion, killing it after [`TOOL_TIMEOUT`].
pub fn run_tool(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        // A tool that exits without reading stdin closes the pipe; that is its business.
        thread::spawn(move || drop(pipe.write_all(&data)))
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {TOOL_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Everything a server process (and its predecessors in the same data dir) printed.
#[derive(Default)]
struct Logs {
    stdout: VecDeque<String>,
    stderr: VecDeque<String>,
}

type SharedLogs = Arc<Mutex<Logs>>;

fn push_line(logs: &SharedLogs, stderr: bool, line: String) {
    let mut l = logs.lock().unwrap();
    let q = if stderr { &mut l.stderr } else { &mut l.stdout };
    if q.len() == LOG_CAP {
        q.pop_front();
    }
    q.push_back(line);
}

/// Reads `pipe` line by line until EOF, handing every line to `each`.
fn pump(
    pipe: impl Read + Send + 'static,
    mut each: impl FnMut(String) + Send + 'static,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    each(line.trim_end_matches(['\n', '\r']).to_owned());
                }
            }
        }
    })
}

/// One running (or exited) `ward-server` process.
struct Proc {
    child: Child,
    ready: mpsc::Receiver<Result<SocketAddr, String>>,
    metrics: Arc<Mutex<Option<SocketAddr>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    fn spawn(args: &[OsString], envs: &[(&str, &str)], logs: &SharedLogs) -> Proc {
        let bin = server_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .env_remove("WARD_HSM_PIN")
            .env_remove("SOFTHSM2_CONF")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        push_line(
            logs,
            true,
            format!("[harness] spawn {} {args:?} env {envs:?}", bin.display()),
        );
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
        let (tx, rx) = mpsc::channel();
        let out_logs = logs.clone();
        let metrics = Arc::new(Mutex::new(None));
        let metrics_seen = metrics.clone();
        let stdout = pump(child.stdout.take().unwrap(), move |line| {
            if let Some(rest) = line.trim().strip_prefix(METRICS_PREFIX) {
                *metrics_seen.lock().unwrap() = rest.trim().parse::<SocketAddr>().ok();
            }
            if let Some(rest) = line.trim().strip_prefix(READY_PREFIX) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("malformed ready line {line:?}: {e}"));
                let _ = tx.send(addr);
            }
            push_line(&out_logs, false, line);
        });
        let err_logs = logs.clone();
        let stderr = pump(child.stderr.take().unwrap(), move |line| {
            push_line(&err_logs, true, line)
        });
        Proc {
            child,
            ready: rx,
            metrics,
            readers: vec![stdout, stderr],
        }
    }

    /// Waits for the ready line. On exit or timeout returns what happened (the process is dead
    /// and its output drained by then).
    fn wait_ready(&mut self) -> Result<SocketAddr, StartFailure> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.ready.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(addr)) => return Ok(addr),
                Ok(Err(msg)) => {
                    self.kill_and_drain();
                    return Err(StartFailure::Malformed(msg));
                }
                Err(_) => {}
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                if let Ok(Ok(addr)) = self.ready.try_recv() {
                    return Err(StartFailure::ExitedAfterReady(addr, status));
                }
                return Err(StartFailure::Exited(status));
            }
            if Instant::now() > deadline {
                self.kill_and_drain();
                return Err(StartFailure::TimedOut);
            }
        }
    }

    fn drain(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    fn kill_and_drain(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.drain();
    }
}

/// Why a server did not get to its ready line.
enum StartFailure {
    Exited(ExitStatus),
    ExitedAfterReady(SocketAddr, ExitStatus),
    TimedOut,
    Malformed(String),
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(status) => write!(f, "exited with {status} before its ready line"),
            Self::ExitedAfterReady(addr, status) => {
                write!(f, "printed ready ({addr}) and exited with {status}")
            }
            Self::TimedOut => write!(f, "no ready line within {START_TIMEOUT:?} (killed)"),
            Self::Malformed(msg) => f.write_str(msg),
        }
    }
}

/// How a start-up that was expected to fail ended.
#[derive(Debug)]
pub struct FailedStart {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Everything the process wrote to stderr.
    pub stderr: String,
}

/// A `ward-server` child process in its own temporary data directory.
pub struct TestServer {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    proc: Option<Proc>,
    addr: SocketAddr,
    logs: SharedLogs,
    /// The test clock's offset in ms, when the server runs with one.
    clock_offset_ms: Mutex<Option<i64>>,
}

/// File name (in the data dir) of the test-only clock offset.
pub const TEST_CLOCK_FILE: &str = "test-clock-offset-ms";
/// Sweep interval of servers started with a test clock: moves of the clock show up fast.
pub const TEST_SWEEP_INTERVAL_MS: u64 = 50;

impl TestServer {
    /// Spawns `ward-server dev --data-dir <fresh tempdir> --listen 127.0.0.1:0` and waits for
    /// its ready line (panics with the server's stderr after [`START_TIMEOUT`]).
    pub fn start() -> TestServer {
        Self::start_with_env(&[])
    }

    /// [`start`](Self::start) with extra environment variables for the server process.
    pub fn start_with_env(envs: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("ward-e2e-")
            .tempdir()
            .expect("create temp data dir");
        let path = dir.path().to_path_buf();
        let mut server = TestServer {
            dir: Some(dir),
            path,
            proc: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs: SharedLogs::default(),
            clock_offset_ms: Mutex::new(None),
        };
        server.launch(&server.dev_args(), envs);
        server
    }

    /// A server whose time the test moves with [`advance_clock`](Self::advance_clock): dev
    /// mode creates everything, then the server is restarted (`serve`) with the test-only
    /// `[testing] clock_file` and a fast sweeper appended to its ward.toml.
    pub fn start_with_test_clock() -> TestServer {
        let mut s = Self::start();
        s.stop();
        std::fs::write(s.path.join(TEST_CLOCK_FILE), "0").unwrap();
        let mut cfg = std::fs::read_to_string(s.config_path()).unwrap();
        cfg.push_str(&format!(
            "\n[lifecycle]\nsweep_interval_ms = {TEST_SWEEP_INTERVAL_MS}\n\n\
             [testing]\nclock_file = \"{TEST_CLOCK_FILE}\"\n"
        ));
        std::fs::write(s.config_path(), cfg).unwrap();
        *s.clock_offset_ms.lock().unwrap() = Some(0);
        s.restart();
        s
    }

    /// Moves the server's clock forward by `d` (the offset file is replaced atomically, and
    /// the server reads it on every clock reading). Only for [`start_with_test_clock`].
    ///
    /// [`start_with_test_clock`]: Self::start_with_test_clock
    pub fn advance_clock(&self, d: Duration) {
        let mut offset = self.clock_offset_ms.lock().unwrap();
        let now = offset.expect("advance_clock needs TestServer::start_with_test_clock");
        let next = now + i64::try_from(d.as_millis()).unwrap();
        let tmp = self.path.join(format!("{TEST_CLOCK_FILE}.tmp"));
        std::fs::write(&tmp, next.to_string()).unwrap();
        std::fs::rename(&tmp, self.path.join(TEST_CLOCK_FILE)).unwrap();
        *offset = Some(next);
    }

    /// How far the test has moved the server's clock.
    pub fn clock_offset(&self) -> Duration {
        let ms = self.clock_offset_ms.lock().unwrap().unwrap_or(0);
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }

    /// Stops the server and starts it again (`serve`) on the same address, so clients that
    /// keep their channel (the SDK cache) can reconnect.
    pub fn restart_on_same_port(&mut self) {
        if self.proc.is_some() {
            self.stop();
        }
        let cfg = std::fs::read_to_string(self.config_path()).unwrap();
        // Only the top-level (gRPC) listen line; later tables ([metrics]) have their own.
        let mut done = false;
        let cfg: String = cfg
            .lines()
            .map(|l| {
                if !done && l.starts_with("listen = ") {
                    done = true;
                    format!("listen = \"{}\"", self.addr)
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(self.config_path(), cfg + "\n").unwrap();
        let want = self.addr;
        self.launch(&self.serve_args(), &[]);
        assert_eq!(self.addr, want, "restarted on another address");
    }

    fn dev_args(&self) -> Vec<OsString> {
        vec![
            "dev".into(),
            "--data-dir".into(),
            self.path.clone().into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ]
    }

    fn serve_args(&self) -> Vec<OsString> {
        vec!["serve".into(), "--config".into(), self.config_path().into()]
    }

    fn launch(&mut self, args: &[OsString], envs: &[(&str, &str)]) {
        assert!(self.proc.is_none(), "a server is already running");
        let mut proc = Proc::spawn(args, envs, &self.logs);
        let result = proc.wait_ready();
        self.proc = Some(proc);
        match result {
            Ok(addr) => self.addr = addr,
            Err(why) => {
                self.proc = None;
                panic!(
                    "ward-server {args:?} did not become ready: {why}\n--- stderr (last 60 lines) ---\n{}\n--- stdout (last 20 lines) ---\n{}",
                    self.stderr_tail(60),
                    self.stdout_tail(20)
                );
            }
        }
    }

    /// Starts `serve --config DIR/ward.toml` (stopping the running server first) and reports
    /// whether it became ready; if it exited instead, its exit code and the stderr it wrote.
    /// Panics if it neither gets ready nor exits within [`START_TIMEOUT`].
    pub fn try_restart(&mut self) -> Result<(), FailedStart> {
        if self.proc.is_some() {
            self.stop();
        }
        let from = self.logs.lock().unwrap().stderr.len();
        let mut proc = Proc::spawn(&self.serve_args(), &[], &self.logs);
        let result = proc.wait_ready();
        let stderr = || {
            let l = self.logs.lock().unwrap();
            l.stderr
                .iter()
                .skip(from + 1)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        };
        match result {
            Ok(addr) => {
                self.proc = Some(proc);
                self.addr = addr;
                Ok(())
            }
            Err(StartFailure::Exited(status)) => Err(FailedStart {
                code: status.code(),
                stderr: stderr(),
            }),
            Err(other) => panic!("serve neither got ready nor exited: {other}\n{}", stderr()),
        }
    }

    /// The data directory (`--data-dir`).
    pub fn data_dir(&self) -> &Path {
        &self.path
    }

    /// `DIR/ward.toml`, the serve configuration dev mode writes.
    pub fn config_path(&self) -> PathBuf {
        self.path.join("ward.toml")
    }

    /// The address the running server reported in its ready line.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The plain-HTTP metrics address the running server reported.
    pub fn metrics_addr(&self) -> SocketAddr {
        let p = self.proc.as_ref().expect("no server running");
        p.metrics
            .lock()
            .unwrap()
            .expect("the server printed no metrics address")
    }

    /// `GET path` on the metrics listener: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::net::TcpStream;
        let mut tcp = TcpStream::connect(self.metrics_addr()).expect("connect to metrics");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).expect("read metrics response");
        let text = String::from_utf8(raw).expect("metrics response is UTF-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("HTTP status line");
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        (
            status,
            if chunked {
                dechunk(body)
            } else {
                body.to_owned()
            },
        )
    }

    /// The generated `ward.v1.Keys` client connected as `identity`.
    pub async fn keys_client(&self, identity: &str) -> KeysClient {
        pb::keys_client::KeysClient::new(self.channel(identity).await)
    }

    /// Envoy's ext_authz client connected as `identity`.
    pub async fn authz_client(&self, identity: &str) -> AuthzClient {
        AuthzClient::new(self.channel(identity).await)
    }

    /// `DIR/tls/ca.pem`.
    pub fn ca_path(&self) -> PathBuf {
        self.path.join("tls").join("ca.pem")
    }

    /// The dev CA and the certificate files of `identity` (`admin` or `app`).
    pub fn identity_files(&self, identity: &str) -> CertFiles {
        let tls = self.path.join("tls");
        CertFiles {
            ca: tls.join("ca.pem"),
            cert: tls.join(format!("{identity}.pem")),
            key: tls.join(format!("{identity}.key")),
        }
    }

    /// A new client certificate with subject CN `cn` (and an optional URI SAN) signed by the dev
    /// CA, written under DIR/e2e-certs/. The server will accept its TLS; policy decides the rest.
    pub fn issue_dev_cert(&self, cn: &str, uri_san: Option<&str>) -> CertFiles {
        let tls = self.path.join("tls");
        let ca_pem = std::fs::read_to_string(tls.join("ca.pem")).unwrap();
        let ca_key = std::fs::read_to_string(tls.join("ca.key")).unwrap();
        let issuer = issuer_from_pem(&ca_pem, &ca_key);
        let (cert, key) = client_cert(cn, uri_san, &issuer);
        let out = self.scratch_dir();
        let unique = random_hex(8);
        let stem = file_stem(cn);
        let files = CertFiles {
            ca: tls.join("ca.pem"),
            cert: out.join(format!("{stem}-{unique}.pem")),
            key: out.join(format!("{stem}-{unique}.key")),
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        files
    }

    /// Like [`issue_dev_cert`](Self::issue_dev_cert) (no URI SAN), with the parameters adjusted
    /// by `customize` before the dev CA signs (validity, EKU, serial number, …).
    pub fn issue_dev_cert_with(
        &self,
        cn: &str,
        customize: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> CertFiles {
        let (cert, key) = client_cert_with(cn, &self.dev_issuer(), customize);
        self.write_client_files(cn, &cert, &key)
    }

    /// A CRL (PEM) signed by the dev CA revoking the given serial numbers; `number` is its CRL
    /// number (increase it with each new list).
    pub fn dev_crl(&self, number: u64, revoked: &[u64]) -> String {
        crl_pem(&self.dev_issuer(), number, revoked)
    }

    fn dev_issuer(&self) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let tls = self.path.join("tls");
        let ca_pem = std::fs::read_to_string(tls.join("ca.pem")).unwrap();
        let ca_key = std::fs::read_to_string(tls.join("ca.key")).unwrap();
        issuer_from_pem(&ca_pem, &ca_key)
    }

    /// Writes a client certificate and key under the scratch dir, with the dev CA as trust.
    pub fn write_client_files(&self, cn: &str, cert: &str, key: &str) -> CertFiles {
        let out = self.scratch_dir();
        let unique = random_hex(8);
        let stem = file_stem(cn);
        let files = CertFiles {
            ca: self.ca_path(),
            cert: out.join(format!("{stem}-{unique}.pem")),
            key: out.join(format!("{stem}-{unique}.key")),
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        files
    }

    /// The running server's process id.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("no server running").child.id()
    }

    /// Sends `signal` (a `kill` name such as `HUP`) to the running server.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// How many lines the server(s) wrote to stderr containing `needle`.
    pub fn count_in_stderr(&self, needle: &str) -> usize {
        let l = self.logs.lock().unwrap();
        l.stderr.iter().filter(|line| line.contains(needle)).count()
    }

    /// Waits until at least `n` stderr lines contain `needle`; panics with the log tail after
    /// `timeout`.
    pub fn wait_for_stderr(&self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count_in_stderr(needle) < n {
            assert!(
                Instant::now() < deadline,
                "no {n} stderr lines with {needle:?} within {timeout:?}\n--- stderr ---\n{}",
                self.stderr_tail(30)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites DIR/ward.toml (used by [`restart`](Self::restart)) with `edit`.
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, edit(text)).unwrap();
    }

    /// Sets `key = value` in the config's `[limits]` table (appending to the file would land in
    /// whichever table comes last).
    pub fn set_limit(&self, key: &str, value: &str) {
        self.edit_config(|t| {
            assert!(t.contains("[limits]\n"), "the config has no [limits] table");
            t.replacen("[limits]\n", &format!("[limits]\n{key} = {value}\n"), 1)
        });
    }

    /// The softhsm2.conf dev mode wrote (DIR/softhsm/softhsm2.conf), and the token directory
    /// it names (one subdirectory per token).
    pub fn softhsm_paths(&self) -> (PathBuf, PathBuf) {
        let conf = self.path.join("softhsm").join("softhsm2.conf");
        let text = std::fs::read_to_string(&conf).unwrap_or_else(|e| panic!("read {conf:?}: {e}"));
        let tokendir = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == "directories.tokendir")
            .map(|(_, v)| PathBuf::from(v.trim()))
            .unwrap_or_else(|| panic!("no directories.tokendir in {conf:?}"));
        (conf, tokendir)
    }

    /// A directory for the test's own files (DIR/e2e-scratch), created on demand.
    pub fn scratch_dir(&self) -> PathBuf {
        let d = self.path.join("e2e-scratch");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The generated client connected as `identity` (`admin` or `app`).
    pub async fn raw_client(&self, identity: &str) -> RawClient {
        let files = self.identity_files(identity);
        self.raw_client_with(&files)
            .await
            .unwrap_or_else(|e| panic!("connect as {identity} to {}: {e:?}", self.addr))
    }

    /// The generated client connected with the given certificate files.
    pub async fn raw_client_with(
        &self,
        files: &CertFiles,
    ) -> Result<RawClient, tonic::transport::Error> {
        let channel = self.channel_with(files).await?;
        Ok(pb::secrets_client::SecretsClient::new(channel))
    }

    /// The generated `ward.v1.Audit` client connected as `identity`.
    pub async fn audit_client(&self, identity: &str) -> AuditClient {
        pb::audit_client::AuditClient::new(self.channel(identity).await)
    }

    /// Appends `text` (e.g. an `[audit]` table) to DIR/ward.toml; it takes effect at the next
    /// [`restart`](Self::restart).
    pub fn append_config(&self, text: &str) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.config_path())
            .unwrap();
        writeln!(f, "\n{text}").unwrap();
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.proc.as_mut() {
            Some(p) => p.child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// An mTLS channel as `identity`, for the other services on the port (health, reflection).
    pub async fn channel(&self, identity: &str) -> Channel {
        self.channel_with(&self.identity_files(identity))
            .await
            .unwrap_or_else(|e| panic!("connect as {identity} to {}: {e:?}", self.addr))
    }

    /// An mTLS channel with the given certificate files.
    pub async fn channel_with(
        &self,
        files: &CertFiles,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = std::fs::read(&files.ca).unwrap();
        let cert = std::fs::read(&files.cert).unwrap();
        let key = std::fs::read(&files.key).unwrap();
        connect_channel(self.addr, &ca, Some((&cert, &key))).await
    }

    /// The SDK's configuration for `identity`'s certificate files.
    pub fn client_config(&self, files: &CertFiles) -> ward_client::ClientConfig {
        ward_client::ClientConfig::from_files(
            self.addr.to_string(),
            &files.ca,
            &files.cert,
            &files.key,
        )
        .unwrap_or_else(|e| panic!("SDK config from {files:?}: {e}"))
    }

    /// The SDK client connected as `identity` (`admin` or `app`).
    pub async fn client(&self, identity: &str) -> ward_client::Client {
        let cfg = self.client_config(&self.identity_files(identity));
        ward_client::Client::connect(cfg)
            .await
            .unwrap_or_else(|e| panic!("SDK connect as {identity} to {}: {e}", self.addr))
    }

    /// If the server process has exited by itself: `Some(exit code)` (`Some(None)` if a signal
    /// ended it), with its output drained; `None` while it runs.
    pub fn exit_code(&mut self) -> Option<Option<i32>> {
        let p = self.proc.as_mut()?;
        let status = p.child.try_wait().unwrap()?;
        let mut p = self.proc.take().unwrap();
        p.drain();
        Some(status.code())
    }

    /// SIGKILLs the server (no chance to flush or clean up) and reaps it.
    pub fn kill9(&mut self) {
        let mut p = self.proc.take().expect("no server running");
        push_line(&self.logs, true, "[harness] kill -9".into());
        p.kill_and_drain();
    }

    /// SIGTERMs the server and waits for it to exit (panics after [`STOP_TIMEOUT`], after
    /// killing it). Returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut p = self.proc.take().expect("no server running");
        push_line(&self.logs, true, "[harness] SIGTERM".into());
        let sent = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                p.drain();
                return status;
            }
            if Instant::now() > deadline {
                p.kill_and_drain();
                panic!(
                    "ward-server did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- stderr ---\n{}",
                    self.stderr_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the production path on the same data dir: `ward-server serve --config DIR/ward.toml`
    /// (stopping the running server first, if any). The address changes: make new clients.
    pub fn restart(&mut self) {
        self.restart_with_env(&[]);
    }

    /// [`restart`](Self::restart) with extra environment variables for the server.
    pub fn restart_with_env(&mut self, envs: &[(&str, &str)]) {
        if self.proc.is_some() {
            self.stop();
        }
        self.launch(&self.serve_args(), envs);
    }

    /// Runs `ward-server dev` again on the same data dir (it must reuse everything).
    pub fn restart_dev(&mut self) {
        if self.proc.is_some() {
            self.stop();
        }
        self.launch(&self.dev_args(), &[]);
    }

    /// Runs `ward-server serve --config <config>` with `envs`, expecting it to refuse to start.
    /// Panics if it gets to its ready line (and kills it).
    pub fn serve_expect_failure(&self, config: &Path, envs: &[(&str, &str)]) -> FailedStart {
        let logs = SharedLogs::default();
        let args: Vec<OsString> = vec!["serve".into(), "--config".into(), config.into()];
        let mut p = Proc::spawn(&args, envs, &logs);
        let result = p.wait_ready();
        let stderr = logs
            .lock()
            .unwrap()
            .stderr
            .iter()
            .skip(1) // the harness's own spawn line
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        match result {
            Err(StartFailure::Exited(status)) => FailedStart {
                code: status.code(),
                stderr,
            },
            Ok(addr) | Err(StartFailure::ExitedAfterReady(addr, _)) => {
                p.kill_and_drain();
                panic!("serve {config:?} with {envs:?} was expected to fail but became ready on {addr}\n--- stderr ---\n{stderr}");
            }
            Err(other) => panic!(
                "serve {config:?} with {envs:?} was expected to exit with an error, but it {other}\n--- stderr ---\n{stderr}"
            ),
        }
    }

    /// The last `n` lines the server(s) wrote to stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let l = self.logs.lock().unwrap();
        let skip = l.stderr.len().saturating_sub(n);
        l.stderr
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The last `n` lines the server(s) wrote to stdout.
    pub fn stdout_tail(&self, n: usize) -> String {
        let l = self.logs.lock().unwrap();
        let skip = l.stdout.len().saturating_sub(n);
        l.stdout
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Everything every server process in this data dir printed so far (stdout, then stderr).
    pub fn all_output(&self) -> String {
        let l = self.logs.lock().unwrap();
        let mut s = l.stdout.iter().cloned().collect::<Vec<_>>().join("\n");
        s.push('\n');
        s.push_str(&l.stderr.iter().cloned().collect::<Vec<_>>().join("\n"));
        s
    }

    /// Runs `wardctl --addr .. --ca .. --cert .. --key .. <args>` as `admin`.
    pub fn wardctl(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.wardctl_as("admin", args, stdin)
    }

    /// Runs `wardctl` with `identity`'s certificates given as flags.
    pub fn wardctl_as(&self, identity: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let f = self.identity_files(identity);
        let mut cmd = self.wardctl_command();
        cmd.arg("--addr")
            .arg(self.addr.to_string())
            .arg("--ca")
            .arg(&f.ca)
            .arg("--cert")
            .arg(&f.cert)
            .arg("--key")
            .arg(&f.key)
            .args(args);
        run_tool(cmd, stdin)
    }

    /// A bare `wardctl` command with no WARD_* variables inherited (add flags or env yourself).
    pub fn wardctl_command(&self) -> Command {
        let mut cmd = Command::new(wardctl_bin());
        for v in ["WARD_ADDR", "WARD_CA", "WARD_CERT", "WARD_KEY"] {
            cmd.env_remove(v);
        }
        cmd
    }

    /// Runs `grpcurl -cacert .. -cert .. -key .. <flags> <addr> <tail>` as `admin`.
    pub fn grpcurl(&self, flags: &[&str], tail: &[&str]) -> Output {
        self.grpcurl_as("admin", flags, tail)
    }

    /// Runs grpcurl with `identity`'s certificates.
    pub fn grpcurl_as(&self, identity: &str, flags: &[&str], tail: &[&str]) -> Output {
        let f = self.identity_files(identity);
        let mut cmd = Command::new("grpcurl");
        cmd.arg("-max-time")
            .arg("30")
            .arg("-cacert")
            .arg(&f.ca)
            .arg("-cert")
            .arg(&f.cert)
            .arg("-key")
            .arg(&f.key)
            .args(flags)
            .arg(self.addr.to_string())
            .args(tail);
        run_tool(cmd, None)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill_and_drain();
        }
        if std::env::var_os("WARD_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("[harness] keeping data dir {}", dir.keep().display());
            }
        }
    }
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The next event of a watch stream (panics after 10 s, at the stream's end, or on an error).
pub async fn next_event(stream: &mut tonic::Streaming<pb::WatchEvent>) -> pb::WatchEvent {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(e))) => e,
        Ok(Ok(None)) => panic!("watch stream ended"),
        Ok(Err(s)) => panic!("watch stream failed: {:?}: {}", s.code(), s.message()),
        Err(_) => panic!("no watch event within 10 s"),
    }
}

/// Events up to and including the next SYNCED.
pub async fn until_synced(stream: &mut tonic::Streaming<pb::WatchEvent>) -> Vec<pb::WatchEvent> {
    let mut out = Vec::new();
    loop {
        let e = next_event(stream).await;
        let synced = e.r#type() == pb::WatchEventType::Synced;
        out.push(e);
        if synced {
            return out;
        }
    }
}

/// Moves every entry of `from` into `to` (created). Renames, so both must be on one file
/// system: tests use it to take a SoftHSM token away and give it back.
pub fn move_entries(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::rename(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {d:?}: {e}")) {
            let entry = entry.unwrap();
            let ty = entry.file_type().unwrap();
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                out.push(entry.path());
            }
        }
    }
    out
}

/// The files under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    assert!(!needle.is_empty());
    files_under(dir)
        .into_iter()
        .filter(|f| {
            let data = std::fs::read(f).unwrap_or_else(|e| panic!("read {f:?}: {e}"));
            data.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}
