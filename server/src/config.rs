//! Server configuration: a TOML file (`ward-server serve --config ward.toml`), with secrets
//! such as the HSM PIN taken from the environment or a file, never from the command line
//! (where `ps` would show them). Relative paths are resolved against the config file's folder.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Environment variable that overrides the PIN file.
pub const PIN_ENV: &str = "WARD_HSM_PIN";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address (mutual TLS).
    pub listen: SocketAddr,
    /// Folder of the sled database.
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
        }
    }
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
    }

    /// Checks every field that has rules.
    pub fn validate(&self) -> Result<(), String> {
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
        if l.flush_timeout_ms < 100 {
            return Err("limits.flush_timeout_ms must be at least 100".into());
        }
        if self.hsm.sessions == 0 || self.hsm.sessions > 64 {
            return Err("hsm.sessions must be between 1 and 64".into());
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
