//! Server configuration: a TOML file (`ward-server serve --config ward.toml`), with secrets
//! such as the HSM PIN taken from the environment or a file, never from the command line
//! (where `ps` would show them). Relative paths are resolved against the config file's folder.

pub mod alerts;
pub mod store;

pub use alerts::{AlertsConfig, WebhookConfig, WebhookUrl};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use store::{Backend, EtcdSection, StoreConfig};
use zeroize::Zeroizing;

/// Environment variable that overrides the PIN file.
pub const PIN_ENV: &str = "WARD_HSM_PIN";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address (mutual TLS).
    pub listen: SocketAddr,
    /// Folder of this node's own state: the sled database (sled backend) and the audit log.
    pub data_dir: PathBuf,
    /// Policy file (TOML).
    pub policy: PathBuf,
    /// Prefix of generated API keys, `[a-z0-9]{1,16}`.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Environments secrets may belong to, each `[a-z0-9]{1,32}`.
    #[serde(default = "default_environments")]
    pub environments: Vec<String>,
    /// Environment of a new secret when the request names none (default: the first).
    #[serde(default)]
    pub default_environment: Option<String>,
    /// TLS files.
    pub tls: TlsConfig,
    /// HSM settings.
    pub hsm: HsmConfig,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// The plain-HTTP metrics and health listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// API-key verification.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Key lifecycle: the background sweeper.
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// TEST ONLY: absent in every real deployment. See [`TestingConfig`].
    #[serde(default)]
    pub testing: Option<TestingConfig>,
    /// Audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Abuse signals and webhooks.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// The developer portal (HTTPS, off unless `listen` is set).
    #[serde(default)]
    pub portal: PortalConfig,
    /// Where the vault's state lives: sled in `data_dir` (default) or a shared etcd cluster.
    #[serde(default)]
    pub store: StoreConfig,
}

/// The self-service developer portal: its own HTTPS listener, the same TLS files, CA and CRLs
/// as gRPC (a client certificate is required there too).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PortalConfig {
    /// Address (port 0 picks a free port; the server prints it). Absent: no portal.
    pub listen: Option<SocketAddr>,
    /// Behind an SSO proxy: the request header naming the user, believed only on connections
    /// whose certificate identity is one of `trusted_proxies`.
    pub identity_header: Option<String>,
    /// Certificate identities (exact) of the proxies allowed to set `identity_header`.
    pub trusted_proxies: Vec<String>,
    /// Longest expiry a key created in the portal may have.
    #[serde(deserialize_with = "de_duration")]
    pub max_key_lifetime: Duration,
}

impl Default for PortalConfig {
    fn default() -> Self {
        Self {
            listen: None,
            identity_header: None,
            trusted_proxies: Vec::new(),
            max_key_lifetime: Duration::from_secs(365 * 86_400),
        }
    }
}

/// The plain-HTTP listener serving `/metrics` (Prometheus text) and `/healthz`. It carries no
/// secret and needs no client certificate, so it listens on loopback unless told otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve it at all.
    pub enabled: bool,
    /// Address (port 0 picks a free port; the server prints it).
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// Key lifecycle settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// How often the sweeper stores deadline-driven state changes, runs scheduled rotations
    /// and tells watchers, in milliseconds. Fetch enforces deadlines at read time regardless.
    pub sweep_interval_ms: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            sweep_interval_ms: 5_000,
        }
    }
}

/// API-key verification settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Unknown keys one caller (per client IP, when given) may present back to back before
    /// its unknown keys are refused (RATE_LIMITED); keys it may verify never are.
    pub unknown_key_burst: u32,
    /// Unknown keys per minute allowed in the long run, per caller and client IP.
    pub unknown_keys_per_minute: u32,
    /// How often usage counters are written to the store, in seconds.
    pub usage_flush_seconds: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            unknown_key_burst: 100,
            unknown_keys_per_minute: 600,
            usage_flush_seconds: 5,
        }
    }
}

/// TEST ONLY settings, for end-to-end tests that must control a running server's time. Never
/// set in production; the server logs a warning when they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestingConfig {
    /// A file holding an offset in milliseconds that is added to the system clock, re-read on
    /// every clock reading. It must exist when the server starts.
    pub clock_file: PathBuf,
}

/// TLS files (PEM).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to.
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM or DER) of the client CAs. When any is given, a client
    /// certificate whose issuer has no CRL here is refused (fail closed).
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// How often the TLS files are checked for changes, in milliseconds (0: only on SIGHUP).
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// A connection older than this is told to go away (HTTP/2 GOAWAY; clients reconnect and
    /// present their certificate again), bounding how long a revoked or expired certificate's
    /// session can last.
    #[serde(
        default = "default_max_connection_age",
        deserialize_with = "de_duration"
    )]
    pub max_connection_age: Duration,
    /// Calls still running on a connection past its age get this long to finish before the
    /// connection is closed (watch and audit streams end then; clients reconnect).
    #[serde(
        default = "default_max_connection_age_grace",
        deserialize_with = "de_duration"
    )]
    pub max_connection_age_grace: Duration,
    /// The server pings each connection this often (HTTP/2 PING) and closes it if the client
    /// does not answer within `keepalive_timeout`: dead peers do not hold connections.
    #[serde(
        default = "default_keepalive_interval",
        deserialize_with = "de_duration"
    )]
    pub keepalive_interval: Duration,
    /// How long an HTTP/2 PING may go unanswered.
    #[serde(
        default = "default_keepalive_timeout",
        deserialize_with = "de_duration"
    )]
    pub keepalive_timeout: Duration,
}

/// HSM settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// PKCS#11 module (shared library) path.
    pub module: PathBuf,
    /// Token label (tokens are chosen by label, never by slot number).
    pub token_label: String,
    /// Label of the master key on the token.
    pub master_key_label: String,
    /// File holding the user PIN (overridden by `WARD_HSM_PIN`).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// `aes-gcm` (default) or `aes-key-wrap-pad`.
    #[serde(default = "default_mechanism")]
    pub mechanism: String,
    /// PKCS#11 sessions kept open.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// SoftHSM only: its config file, exported as SOFTHSM2_CONF before the module loads.
    #[serde(default)]
    pub softhsm_conf: Option<PathBuf>,
}

/// Size and time limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest secret value, in bytes.
    pub max_value_bytes: usize,
    /// Most items in one BatchFetchSecrets.
    pub max_batch: usize,
    /// Overlap during which a replaced PRIMARY stays ACTIVE, in seconds.
    pub default_grace_seconds: u64,
    /// Largest request message, in bytes (larger ones get RESOURCE_EXHAUSTED).
    pub max_request_bytes: usize,
    /// Calls that write are refused (UNAVAILABLE) while the data dir's file system has less
    /// free space than this; they succeed again once space returns.
    pub min_free_bytes: u64,
    /// A flush to disk slower than this means the storage has stalled: the server fails every
    /// call and exits (code 4) so that its supervisor restarts it.
    pub flush_timeout_ms: u64,
    /// Memory for the storage engine's page cache, in MiB. The main lever on resident memory;
    /// reads of records outside it cost a disk read.
    pub cache_mib: u64,
    /// Most client connections open at once (including those still in their handshake); more
    /// are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Most TLS handshakes in progress at once; further connections wait in the listen
    /// backlog until one finishes.
    pub max_handshakes: usize,
    /// How long a client has to finish its TLS handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Most calls (HTTP/2 streams) open at once on one connection (SETTINGS_MAX_CONCURRENT_
    /// STREAMS; clients queue further calls, and a stream over it is refused).
    pub max_concurrent_streams: u32,
    /// Streams a client may open and reset before the server accepts them, per connection,
    /// before the connection is closed (HTTP/2 "rapid reset", CVE-2023-44487).
    pub max_pending_reset_streams: usize,
    /// Streams the server may reset because of the client's protocol errors, per connection,
    /// before the connection is closed.
    pub max_local_reset_streams: usize,
    /// How long a call may take until its (first) response, in milliseconds; longer ones end
    /// with CANCELLED. A client's shorter gRPC deadline still applies. Streams, once answering,
    /// are not cut by it. The longest legitimate calls (VerifyAuditLog over a large log) must
    /// fit: the default is generous, and its job is to bound calls that never send their
    /// request (with `max_calls_per_identity`, what one client can hold).
    pub request_timeout_ms: u64,
    /// Most calls one identity may have in progress at once, across all its connections
    /// (open streams included); more get RESOURCE_EXHAUSTED.
    pub max_calls_per_identity: usize,
    /// Most WatchSecrets streams one identity may have open at once; more get
    /// RESOURCE_EXHAUSTED.
    pub max_watches_per_identity: usize,
    /// Most versions one secret may hold (every state counts, DESTROYED too: their metadata
    /// stays); a put or rotation past it gets RESOURCE_EXHAUSTED.
    pub max_versions_per_secret: usize,
    /// Most stored records one ListSecrets call examines (a caller whose grants cover few of
    /// many secrets then gets a short page and a token to go on), and one step of a watch or
    /// audit stream reads before it yields; these scans run off the async workers.
    pub scan_budget: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: 64 * 1024,
            max_batch: 100,
            default_grace_seconds: 24 * 3600,
            max_request_bytes: 4 * 1024 * 1024,
            min_free_bytes: 64 * 1024 * 1024,
            flush_timeout_ms: 10_000,
            cache_mib: crate::store::sled_store::DEFAULT_CACHE_BYTES / (1024 * 1024),
            max_connections: 4096,
            max_handshakes: 128,
            handshake_timeout_ms: 10_000,
            max_concurrent_streams: 256,
            max_pending_reset_streams: 20,
            max_local_reset_streams: 1024,
            request_timeout_ms: 300_000,
            max_calls_per_identity: 1024,
            max_watches_per_identity: 256,
            max_versions_per_secret: 1000,
            scan_budget: 10_000,
        }
    }
}

/// Smallest audit segment allowed (`audit.segment_bytes`): the largest record (bounded to about
/// 70 KiB) must fit twice.
pub const MIN_SEGMENT_SIZE: u64 = 256 * 1024;

/// Audit log settings (`[audit]`). Durations are strings with a unit: `500ms`, `30s`, `15m`,
/// `12h`, `90d`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// A checkpoint signed in the HSM after this many records…
    pub checkpoint_every: u64,
    /// …or this long after the last one, whichever comes first.
    #[serde(deserialize_with = "de_duration")]
    pub checkpoint_interval: Duration,
    /// Label of the HSM key (HMAC-SHA256, non-extractable) that signs checkpoints.
    pub checkpoint_key_label: String,
    /// Records are kept at least this long.
    #[serde(deserialize_with = "de_duration")]
    pub retention: Duration,
    /// How often records older than `retention` are pruned.
    #[serde(deserialize_with = "de_duration")]
    pub prune_interval: Duration,
    /// Most StreamAudit calls open at once.
    pub max_streams: usize,
    /// Size of each audit segment file under `data_dir/audit/`, in bytes (allocated whole
    /// when the segment starts; retention deletes whole segments).
    pub segment_bytes: u64,
}

/// How the log checkpoints and prunes.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// A checkpoint after this many records.
    pub checkpoint_every: u64,
    /// A checkpoint at least this often while records arrive.
    pub checkpoint_interval: Duration,
    /// Label of the HSM key that signs checkpoints.
    pub key_label: String,
    /// Records younger than this are never pruned.
    pub retention: Duration,
    /// How often pruning runs.
    pub prune_interval: Duration,
    /// Size of each segment file.
    pub segment_bytes: u64,
    /// This node's id when several share one store (its marks there are its own); None for
    /// a store of its own.
    pub node: Option<String>,
}

impl Default for AuditSettings {
    /// A checkpoint every 10,000 records or 60 s, signed by `ward-audit-1`; 90 days' retention,
    /// pruned hourly; 64 MiB segments.
    fn default() -> Self {
        Self {
            checkpoint_every: 10_000,
            checkpoint_interval: Duration::from_secs(60),
            key_label: "ward-audit-1".into(),
            retention: Duration::from_secs(90 * 24 * 3600),
            prune_interval: Duration::from_secs(3600),
            segment_bytes: 64 * 1024 * 1024,
            node: None,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        let s = AuditSettings::default();
        Self {
            checkpoint_every: s.checkpoint_every,
            checkpoint_interval: s.checkpoint_interval,
            checkpoint_key_label: s.key_label,
            retention: s.retention,
            prune_interval: s.prune_interval,
            max_streams: 64,
            segment_bytes: s.segment_bytes,
        }
    }
}

impl AuditConfig {
    /// The audit log's settings.
    pub fn settings(&self) -> AuditSettings {
        AuditSettings {
            checkpoint_every: self.checkpoint_every,
            checkpoint_interval: self.checkpoint_interval,
            key_label: self.checkpoint_key_label.clone(),
            retention: self.retention,
            prune_interval: self.prune_interval,
            segment_bytes: self.segment_bytes,
            node: None,
        }
    }
}

/// Parses a duration with a unit: `500ms`, `30s`, `15m`, `12h`, `90d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {text:?} needs a unit (ms, s, m, h or d)"))?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("duration {text:?} must start with a whole number"))?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "duration {text:?}: unknown unit {unit:?} (ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {text:?} is too long"))
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn default_issuer() -> String {
    "ward".into()
}
fn default_environments() -> Vec<String> {
    vec!["dev".into(), "staging".into(), "prod".into()]
}
fn default_reload_interval_ms() -> u64 {
    1000
}
fn default_max_connection_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_connection_age_grace() -> Duration {
    Duration::from_secs(60)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_mechanism() -> String {
    "aes-gcm".into()
}
fn default_sessions() -> usize {
    4
}

impl Config {
    /// Reads, resolves and validates a config file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        let mut cfg: Config =
            toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        cfg.validate()
            .map_err(|e| format!("config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.policy);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        for p in &mut self.tls.crl {
            fix(p);
        }
        if let Some(p) = self.hsm.pin_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.hsm.softhsm_conf.as_mut() {
            fix(p);
        }
        if let Some(t) = self.testing.as_mut() {
            fix(&mut t.clock_file);
        }
        self.alerts.resolve(base);
        self.store.resolve(base);
    }

    /// Checks every field that has rules.
    pub fn validate(&self) -> Result<(), String> {
        self.alerts.validate()?;
        self.store.validate()?;
        ward::keyformat::check_prefix(&self.issuer, ward::keyformat::MAX_ISSUER_LEN).map_err(
            |_| {
                format!(
                    "issuer {:?} must be 1 to 16 characters of a-z 0-9",
                    self.issuer
                )
            },
        )?;
        if self.environments.is_empty() {
            return Err("environments must name at least one environment".into());
        }
        for env in &self.environments {
            ward::keyformat::check_prefix(env, ward::keyformat::MAX_ENV_LEN).map_err(|_| {
                format!("environment {env:?} must be 1 to 32 characters of a-z 0-9")
            })?;
        }
        if let Some(d) = &self.default_environment {
            if !self.environments.contains(d) {
                return Err(format!("default_environment {d:?} is not in environments"));
            }
        }
        self.hsm
            .mechanism
            .parse::<ward_hsm::Mechanism>()
            .map_err(|e| e.to_string())?;
        let l = &self.limits;
        if l.max_value_bytes == 0 || l.max_value_bytes > 1024 * 1024 {
            return Err("limits.max_value_bytes must be between 1 and 1048576".into());
        }
        if l.max_batch == 0 || l.max_batch > 1000 {
            return Err("limits.max_batch must be between 1 and 1000".into());
        }
        if l.max_request_bytes < l.max_value_bytes + 4096 {
            return Err("limits.max_request_bytes must exceed max_value_bytes by 4 KiB".into());
        }
        if l.default_grace_seconds > 365 * 24 * 3600 {
            return Err("limits.default_grace_seconds must be at most a year".into());
        }
        let k = &self.keys;
        if k.unknown_key_burst == 0 || k.unknown_key_burst > 1_000_000 {
            return Err("keys.unknown_key_burst must be between 1 and 1000000".into());
        }
        if k.unknown_keys_per_minute == 0 || k.unknown_keys_per_minute > 1_000_000 {
            return Err("keys.unknown_keys_per_minute must be between 1 and 1000000".into());
        }
        if k.usage_flush_seconds == 0 || k.usage_flush_seconds > 3600 {
            return Err("keys.usage_flush_seconds must be between 1 and 3600".into());
        }
        if l.cache_mib < 8 || l.cache_mib > 1024 * 1024 {
            return Err("limits.cache_mib must be between 8 and 1048576".into());
        }
        if l.flush_timeout_ms < 100 {
            return Err("limits.flush_timeout_ms must be at least 100".into());
        }
        let counts = [
            ("max_connections", l.max_connections, 1_000_000),
            ("max_handshakes", l.max_handshakes, 100_000),
            (
                "max_concurrent_streams",
                l.max_concurrent_streams as usize,
                100_000,
            ),
            (
                "max_pending_reset_streams",
                l.max_pending_reset_streams,
                100_000,
            ),
            (
                "max_local_reset_streams",
                l.max_local_reset_streams,
                100_000,
            ),
            (
                "max_calls_per_identity",
                l.max_calls_per_identity,
                1_000_000,
            ),
            (
                "max_watches_per_identity",
                l.max_watches_per_identity,
                1_000_000,
            ),
            (
                "max_versions_per_secret",
                l.max_versions_per_secret,
                1_000_000,
            ),
            ("scan_budget", l.scan_budget, 10_000_000),
        ];
        for (name, value, max) in counts {
            if value == 0 || value > max {
                return Err(format!("limits.{name} must be between 1 and {max}"));
            }
        }
        if l.max_handshakes > l.max_connections {
            return Err("limits.max_handshakes must not exceed limits.max_connections".into());
        }
        if !(100..=600_000).contains(&l.handshake_timeout_ms) {
            return Err("limits.handshake_timeout_ms must be between 100 and 600000".into());
        }
        if !(1..=86_400_000).contains(&l.request_timeout_ms) {
            return Err("limits.request_timeout_ms must be between 1 and 86400000".into());
        }
        let t = &self.tls;
        let (second, day) = (Duration::from_secs(1), Duration::from_secs(86_400));
        if t.max_connection_age < second || t.max_connection_age > 30 * day {
            return Err("tls.max_connection_age must be between 1s and 30d".into());
        }
        if t.max_connection_age_grace < Duration::from_millis(100)
            || t.max_connection_age_grace > day
        {
            return Err("tls.max_connection_age_grace must be between 100ms and 1d".into());
        }
        if t.keepalive_interval < second || t.keepalive_interval > day {
            return Err("tls.keepalive_interval must be between 1s and 1d".into());
        }
        if t.keepalive_timeout < second
            || t.keepalive_timeout > t.keepalive_interval.max(second * 60)
        {
            return Err(
                "tls.keepalive_timeout must be between 1s and max(keepalive_interval, 60s)".into(),
            );
        }
        if self.hsm.sessions == 0 || self.hsm.sessions > 64 {
            return Err("hsm.sessions must be between 1 and 64".into());
        }
        let sweep = self.lifecycle.sweep_interval_ms;
        if !(10..=3_600_000).contains(&sweep) {
            return Err("lifecycle.sweep_interval_ms must be between 10 and 3600000".into());
        }
        let a = &self.audit;
        if a.checkpoint_every == 0 || a.checkpoint_every > 10_000_000 {
            return Err("audit.checkpoint_every must be between 1 and 10000000".into());
        }
        let (short, day) = (Duration::from_millis(100), Duration::from_secs(86_400));
        if a.checkpoint_interval < short || a.checkpoint_interval > day {
            return Err("audit.checkpoint_interval must be between 100ms and 1d".into());
        }
        if a.prune_interval < short || a.prune_interval > day {
            return Err("audit.prune_interval must be between 100ms and 1d".into());
        }
        if a.retention < Duration::from_secs(1) {
            return Err("audit.retention must be at least 1s".into());
        }
        if a.checkpoint_key_label.is_empty() || a.checkpoint_key_label.len() > 128 {
            return Err("audit.checkpoint_key_label must be 1 to 128 bytes".into());
        }
        if a.checkpoint_key_label == self.hsm.master_key_label {
            return Err("audit.checkpoint_key_label must differ from hsm.master_key_label".into());
        }
        if a.max_streams == 0 || a.max_streams > 10_000 {
            return Err("audit.max_streams must be between 1 and 10000".into());
        }
        let seg = MIN_SEGMENT_SIZE..=(1 << 30);
        if !seg.contains(&a.segment_bytes) {
            return Err(format!(
                "audit.segment_bytes must be between {} and {}",
                seg.start(),
                seg.end()
            ));
        }
        let p = &self.portal;
        if let Some(h) = &p.identity_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() || p.trusted_proxies.is_empty() {
                return Err("portal.identity_header must be a header name, and needs \
                            portal.trusted_proxies"
                    .into());
            }
        }
        let (hour, century) = (
            Duration::from_secs(3600),
            Duration::from_secs(36_500 * 86_400),
        );
        if p.max_key_lifetime < hour || p.max_key_lifetime > century {
            return Err("portal.max_key_lifetime must be between 1h and 36500d".into());
        }
        Ok(())
    }

    /// The environment of new secrets when none is named.
    pub fn default_environment(&self) -> &str {
        self.default_environment
            .as_deref()
            .or(self.environments.first().map(String::as_str))
            .unwrap_or("dev")
    }

    /// The HSM user PIN: `WARD_HSM_PIN` if set, else the pin file's first line.
    pub fn pin(&self) -> Result<Zeroizing<String>, String> {
        if let Ok(pin) = std::env::var(PIN_ENV) {
            return Ok(Zeroizing::new(pin));
        }
        let path = self
            .hsm
            .pin_file
            .as_ref()
            .ok_or_else(|| format!("no HSM PIN: set {PIN_ENV} or hsm.pin_file"))?;
        crate::harden::check_private_file(path, "PIN file")?;
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read PIN file {}: {e}", path.display()))?,
        );
        Ok(Zeroizing::new(
            text.trim_end_matches(['\r', '\n']).to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        listen = "127.0.0.1:8443"
        data_dir = "data"
        policy = "policy.toml"
        [tls]
        cert = "tls/server.pem"
        key = "tls/server.key"
        client_ca = "tls/ca.pem"
        [hsm]
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "ward"
        master_key_label = "ward-master-1"
        pin_file = "hsm.pin"
    "#;

    #[test]
    fn minimal_config_resolves_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ward.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.data_dir, dir.path().join("data"));
        assert_eq!(cfg.limits.max_value_bytes, 65536);
        assert_eq!(cfg.default_environment(), "dev");
        assert_eq!(cfg.audit.retention, Duration::from_secs(90 * 86_400));
        assert_eq!(cfg.audit.checkpoint_every, 10_000);
        assert_eq!(cfg.audit.checkpoint_key_label, "ward-audit-1");
        assert!(cfg.metrics.enabled);
        assert!(cfg.metrics.listen.ip().is_loopback());
        assert_eq!(cfg.keys.unknown_key_burst, 100);
        assert_eq!(cfg.lifecycle.sweep_interval_ms, 5000);
        assert_eq!(cfg.tls.max_connection_age, Duration::from_secs(3600));
        assert_eq!(cfg.tls.keepalive_interval, Duration::from_secs(60));
        assert_eq!(cfg.limits.max_versions_per_secret, 1000);
        assert_eq!(cfg.limits.max_concurrent_streams, 256);
        assert!(
            cfg.testing.is_none(),
            "the test clock is never on by default"
        );
        assert!(cfg.portal.listen.is_none(), "no portal unless configured");
        assert_eq!(
            cfg.portal.max_key_lifetime,
            Duration::from_secs(365 * 86_400)
        );
    }

    #[test]
    fn testing_section_is_explicit_and_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ward.toml");
        let text = format!("{MINIMAL}\n[testing]\nclock_file = \"clock\"\n");
        std::fs::write(&path, text).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.testing.unwrap().clock_file, dir.path().join("clock"));
    }

    #[test]
    fn audit_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ward.toml");
        let text = format!(
            "{MINIMAL}\n[audit]\ncheckpoint_every = 5\ncheckpoint_interval = \"250ms\"\n\
             retention = \"30d\"\nprune_interval = \"2h\"\nmax_streams = 3\n"
        );
        std::fs::write(&path, text).unwrap();
        let a = Config::load(&path).unwrap().audit;
        assert_eq!(a.checkpoint_every, 5);
        assert_eq!(a.checkpoint_interval, Duration::from_millis(250));
        assert_eq!(a.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(a.prune_interval, Duration::from_secs(7200));
        assert_eq!(a.max_streams, 3);
        for bad in [
            "checkpoint_every = 0",
            "retention = \"90\"",
            "retention = \"5y\"",
            "retention = \"500ms\"",
            "checkpoint_interval = \"10ms\"",
            "checkpoint_key_label = \"ward-master-1\"",
            "segment_bytes = 4096",
            "surprise = true",
        ] {
            std::fs::write(&path, format!("{MINIMAL}\n[audit]\n{bad}\n")).unwrap();
            let err = Config::load(&path).unwrap_err();
            assert!(err.contains("config"), "{bad}: {err}");
        }
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn bad_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ward.toml");
        let cases = [
            MINIMAL.replacen("127.0.0.1:8443", "nowhere", 1),
            format!("issuer = \"Bad_Issuer\"\n{MINIMAL}"),
            format!("environments = [\"prod_eu\"]\n{MINIMAL}"),
            format!("default_environment = \"qa\"\n{MINIMAL}"),
            MINIMAL.replacen("pin_file", "mechanism = \"des\"\npin_file", 1),
            MINIMAL.replacen("[tls]", "[tls]\nsurprise = 1", 1),
            format!("{MINIMAL}\n[limits]\nmax_value_bytes = 0\n"),
            format!("{MINIMAL}\n[metrics]\nlisten = \"nowhere\"\n"),
            format!("{MINIMAL}\n[keys]\nunknown_key_burst = 0\n"),
            format!("{MINIMAL}\n[lifecycle]\nsweep_interval_ms = 0\n"),
            format!("{MINIMAL}\n[testing]\nclock = \"x\"\n"),
            format!("{MINIMAL}\n[limits]\nmax_connections = 0\n"),
            format!("{MINIMAL}\n[limits]\nmax_handshakes = 5000\n"),
            format!("{MINIMAL}\n[limits]\nmax_versions_per_secret = 0\n"),
            format!("{MINIMAL}\n[limits]\nrequest_timeout_ms = 0\n"),
            MINIMAL.replacen("[tls]", "[tls]\nmax_connection_age = \"0s\"", 1),
            MINIMAL.replacen("[tls]", "[tls]\nmax_connection_age = \"1h5\"", 1),
            MINIMAL.replacen("[tls]", "[tls]\nkeepalive_timeout = \"10m\"", 1),
            format!("{MINIMAL}\n[portal]\nidentity_header = \"x-user\"\n"),
            format!(
                "{MINIMAL}\n[portal]\nidentity_header = \"x user\"\ntrusted_proxies = [\"p\"]\n"
            ),
            format!("{MINIMAL}\n[portal]\nmax_key_lifetime = \"10m\"\n"),
            format!("{MINIMAL}\n[portal]\nlisten = \"nowhere\"\n"),
        ];
        for text in cases {
            std::fs::write(&path, &text).unwrap();
            let err = Config::load(&path).unwrap_err();
            assert!(err.contains("config"), "{err}");
        }
        // The unmodified text is valid, so each failure above is the edit's doing.
        std::fs::write(&path, MINIMAL).unwrap();
        assert!(Config::load(&path).is_ok());
    }
}
