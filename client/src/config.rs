//! Client configuration: where the server's replicas are, the mTLS material to reach them,
//! timeouts, retry and failover policy; plus parsing of addresses and durations shared by
//! wardctl and ward-bench.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::Error;
use crate::retry::RetryPolicy;

/// Address used when none is given.
pub const DEFAULT_ADDR: &str = "https://127.0.0.1:8443";
/// Port assumed for a bare `host` without a scheme.
pub const DEFAULT_PORT: u16 = 8443;
/// Default limit on establishing a connection, TLS handshake included.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default limit on one attempt of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an endpoint that failed stays behind the others before it is probed again (it
/// doubles with each failed probe, up to [`DEFAULT_FAILOVER_BACKOFF_MAX`]).
pub const DEFAULT_FAILOVER_BACKOFF: Duration = Duration::from_secs(1);
/// Default upper bound on the time between probes of an endpoint that keeps failing.
pub const DEFAULT_FAILOVER_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Environment variable holding the server address, or several comma-separated.
pub const ENV_ADDR: &str = "WARD_ADDR";
/// Environment variable holding the path of the CA certificate (PEM).
pub const ENV_CA: &str = "WARD_CA";
/// Environment variable holding the path of the client certificate (PEM).
pub const ENV_CERT: &str = "WARD_CERT";
/// Environment variable holding the path of the client private key (PEM).
pub const ENV_KEY: &str = "WARD_KEY";
/// Environment variable overriding the TLS server name.
pub const ENV_SERVER_NAME: &str = "WARD_SERVER_NAME";
/// Environment variable holding the per-call timeout (`10`, `2.5s`, `500ms`, `1m`).
pub const ENV_TIMEOUT: &str = "WARD_TIMEOUT";

/// Everything needed to connect to a Ward server, or to the replicas of a Ward cluster, over
/// mutual TLS.
///
/// The address may be a comma-separated list (`https://a:8443,https://b:8443`), or the list is
/// given with [`ClientConfig::with_endpoints`]: the client then fails over between them (see
/// [`crate::Client`]). Every endpoint is reached with the same CA, client certificate and
/// server-name override.
///
/// Required parts (address, CA, client certificate and key) come from a constructor
/// ([`ClientConfig::new`], [`ClientConfig::from_files`], [`ClientConfig::from_env`]), so a
/// `ClientConfig` is always complete; optional settings are chained with the `with_*` methods:
///
/// ```no_run
/// # fn main() -> Result<(), ward_client::Error> {
/// use std::time::Duration;
/// let cfg = ward_client::ClientConfig::from_files(
///     "127.0.0.1:8443", "tls/ca.pem", "tls/app.pem", "tls/app.key",
/// )?
/// .with_timeout(Duration::from_secs(3));
/// # Ok(()) }
/// ```
///
/// The private key is held in a zeroizing buffer and never printed by `Debug`. (tonic copies it
/// into its own TLS configuration when connecting; that copy is outside the SDK's control.)
#[derive(Clone)]
pub struct ClientConfig {
    /// Normalised, distinct, never empty.
    endpoints: Vec<String>,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Zeroizing<Vec<u8>>,
    server_name: Option<String>,
    connect_timeout: Duration,
    timeout: Duration,
    retry: RetryPolicy,
    failover_backoff: (Duration, Duration),
}

impl ClientConfig {
    /// A configuration from PEM bytes: CA certificate(s), client certificate chain, private key.
    ///
    /// `addr` is `host:port`, `host`, `[v6]:port` or `https://host[:port]` (see
    /// [`normalize_endpoint`]), or several of them separated by commas (see
    /// [`parse_endpoints`]).
    pub fn new(
        addr: impl AsRef<str>,
        ca_pem: impl Into<Vec<u8>>,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self, Error> {
        let key_pem = Zeroizing::new(key_pem.into());
        let ca_pem = ca_pem.into();
        let cert_pem = cert_pem.into();
        check_pem(&ca_pem, "CERTIFICATE", "CA certificate")?;
        check_pem(&cert_pem, "CERTIFICATE", "client certificate")?;
        check_pem(&key_pem, "PRIVATE KEY", "client key")?;
        Ok(Self {
            endpoints: parse_endpoints(addr.as_ref())?,
            ca_pem,
            cert_pem,
            key_pem,
            server_name: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
            retry: RetryPolicy::default(),
            failover_backoff: (DEFAULT_FAILOVER_BACKOFF, DEFAULT_FAILOVER_BACKOFF_MAX),
        })
    }

    /// A configuration from PEM files: CA certificate(s), client certificate chain, private key.
    pub fn from_files(
        addr: impl AsRef<str>,
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let mut ca_pem = read_pem(ca.as_ref(), "CA certificate", "CERTIFICATE")?;
        let mut cert_pem = read_pem(cert.as_ref(), "client certificate", "CERTIFICATE")?;
        let mut key_pem = read_pem(key.as_ref(), "client key", "PRIVATE KEY")?;
        // Moving the Vec out of its Zeroizing wrapper copies no bytes; `new` wraps it again.
        Self::new(
            addr,
            std::mem::take(&mut *ca_pem),
            std::mem::take(&mut *cert_pem),
            std::mem::take(&mut *key_pem),
        )
    }

    /// A configuration from the environment: `WARD_ADDR` (default [`DEFAULT_ADDR`]; one address
    /// or a comma-separated list), `WARD_CA`,
    /// `WARD_CERT`, `WARD_KEY` (file paths, required), and optionally `WARD_SERVER_NAME` and
    /// `WARD_TIMEOUT`.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`ClientConfig::from_env`] with the environment given as a function (testable).
    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let get = |name: &str| get(name).filter(|v| !v.is_empty());
        let required =
            |name: &str| get(name).ok_or_else(|| Error::config(format!("{name} is not set")));
        let addr = get(ENV_ADDR).unwrap_or_else(|| DEFAULT_ADDR.to_owned());
        let mut cfg = Self::from_files(
            addr,
            required(ENV_CA)?,
            required(ENV_CERT)?,
            required(ENV_KEY)?,
        )?;
        if let Some(name) = get(ENV_SERVER_NAME) {
            cfg = cfg.with_server_name(name);
        }
        if let Some(t) = get(ENV_TIMEOUT) {
            let t = parse_duration(&t).map_err(|e| Error::config(format!("{ENV_TIMEOUT}: {e}")))?;
            cfg = cfg.with_timeout(t);
        }
        Ok(cfg)
    }

    /// Verifies the server certificate against this name instead of the address's host.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Replaces the endpoints with `addrs`, each in a form [`normalize_endpoint`] accepts, in
    /// order of preference. An empty list, an empty or invalid item and the same endpoint
    /// twice are configuration errors.
    pub fn with_endpoints<I, S>(mut self, addrs: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.endpoints = normalize_all(addrs.into_iter().map(|a| a.as_ref().to_owned()))?;
        Ok(self)
    }

    /// How long an endpoint that failed (transport error or UNAVAILABLE) stays behind the
    /// others before it is probed again: from `initial`, doubling with each failure up to
    /// `max`; default 1 s to 30 s.
    pub fn with_failover_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.failover_backoff = (initial, max.max(initial));
        self
    }

    /// Limits establishing a connection (TCP, then the TLS handshake, each); default 5 s. The
    /// client uses at most a third of the call timeout, so that a replica it cannot reach
    /// fails the attempt as a connection error (known not to have been sent, so retried on
    /// another endpoint) before the call's own deadline.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Limits each attempt of each call; default 10 s. Must be more than zero.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the retry policy; default 3 attempts, backoff from 50 ms capped at 1 s.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The first (most preferred) normalised endpoint URI, e.g. `https://127.0.0.1:8443`.
    pub fn endpoint(&self) -> &str {
        // `endpoints` is never empty: every constructor and `with_endpoints` checks it.
        self.endpoints.first().map_or("", String::as_str)
    }

    /// Every normalised endpoint URI, in order of preference.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The failover backoff: (initial, max).
    pub fn failover_backoff(&self) -> (Duration, Duration) {
        self.failover_backoff
    }

    /// The TLS server name override, if any.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The connect timeout the client applies: the configured one, capped at a third of the
    /// call timeout (TCP connect and TLS handshake together stay below the call's deadline).
    pub(crate) fn effective_connect_timeout(&self) -> Duration {
        self.connect_timeout.min(self.timeout / 3)
    }

    /// The per-attempt call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The retry policy.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The CA certificate PEM.
    pub(crate) fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// The client certificate PEM.
    pub(crate) fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The client private key PEM.
    pub(crate) fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoints", &self.endpoints)
            .field("server_name", &self.server_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("failover_backoff", &self.failover_backoff)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Reads a whole PEM file and checks it holds a block of the expected kind, naming the file and
/// its role on failure.
fn read_pem(path: &Path, what: &str, label_suffix: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
    let what = format!("{what} file {}", path.display());
    let pem = Zeroizing::new(
        std::fs::read(path).map_err(|e| Error::config(format!("cannot read {what}: {e}")))?,
    );
    check_pem(&pem, label_suffix, &what)?;
    Ok(pem)
}

/// Rejects input that plainly is not PEM of the expected kind, so a swapped or empty file is
/// reported here, by role, instead of as an opaque TLS failure later.
fn check_pem(pem: &[u8], label_suffix: &str, what: &str) -> Result<(), Error> {
    let found = pem
        .split(|&b| b == b'\n')
        .filter_map(|line| line.trim_ascii().strip_prefix(b"-----BEGIN "))
        .filter_map(|rest| rest.strip_suffix(b"-----"))
        .any(|label| label.ends_with(label_suffix.as_bytes()));
    if found {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what} is not PEM containing a {label_suffix} block"
        )))
    }
}

/// Turns a user-supplied address into the `https://host:port` URI the SDK connects to.
///
/// Accepted forms: `host:port`, `host` (port [`DEFAULT_PORT`]), `[v6]:port`, a bare IPv6
/// address, `https://host:port`, and `https://host` (port 443, as in any URL). A trailing `/`
/// is dropped. Other schemes, paths, queries and user-info are refused: Ward is only served over
/// TLS, at the root.
pub fn normalize_endpoint(addr: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::config(format!("invalid server address {addr:?}: {why}"));
    let s = addr.trim();
    let (rest, default_port) = match s.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (rest, 443),
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "scheme {scheme:?} is not supported; Ward requires https"
            )))
        }
        None => (s, DEFAULT_PORT),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains(['/', '?', '#', '@']) {
        return Err(bad("expected host:port, without path, query or user"));
    }
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (v6, after) = inner.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address inside [ ]"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
        };
        (format!("[{v6}]"), port)
    } else if let Ok(v6) = authority.parse::<Ipv6Addr>() {
        (format!("[{v6}]"), None)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !host.starts_with('[')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(bad(
            "host may contain only letters, digits, '.', '-' and '_'",
        ));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => return Err(bad("port must be a number from 1 to 65535")),
        },
    };
    Ok(format!("https://{host}:{port}"))
}

/// Parses a list of server addresses separated by commas (`https://a:8443,https://b:8443`),
/// normalising each with [`normalize_endpoint`]. A single address is a list of one. Spaces
/// around items are ignored; an empty item (`a,,b`, a trailing comma), an invalid address and
/// the same endpoint twice (after normalisation: `a` and `https://a:8443`) are errors.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, Error> {
    normalize_all(list.split(',').map(str::to_owned))
}

/// Normalises every address, refusing none at all, empty ones and repeats.
fn normalize_all(addrs: impl Iterator<Item = String>) -> Result<Vec<String>, Error> {
    let mut out: Vec<String> = Vec::new();
    for (i, addr) in addrs.enumerate() {
        if addr.trim().is_empty() {
            return Err(Error::config(format!(
                "server address list: item {} is empty",
                i + 1
            )));
        }
        let uri = normalize_endpoint(&addr)?;
        if out.contains(&uri) {
            return Err(Error::config(format!(
                "server address list: {uri} is listed twice"
            )));
        }
        out.push(uri);
    }
    if out.is_empty() {
        return Err(Error::config("server address list is empty"));
    }
    Ok(out)
}

/// Parses a duration: a number of seconds (`10`, `2.5`) or a number with a unit (`500ms`,
/// `10s`, `2m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 10, 2.5s, 500ms, 1m)"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        other => return Err(format!("unknown duration unit {other:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} is out of range"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

    #[test]
    fn endpoint_forms() {
        let ok = |a: &str| normalize_endpoint(a).unwrap();
        assert_eq!(ok("127.0.0.1:8443"), "https://127.0.0.1:8443");
        assert_eq!(ok("localhost"), "https://localhost:8443");
        assert_eq!(ok("https://localhost:9000"), "https://localhost:9000");
        assert_eq!(
            ok("HTTPS://ward.example.com/"),
            "https://ward.example.com:443"
        );
        assert_eq!(ok("  ward-1.internal:1 "), "https://ward-1.internal:1");
        assert_eq!(ok("[::1]:8443"), "https://[::1]:8443");
        assert_eq!(ok("https://[::1]"), "https://[::1]:443");
        assert_eq!(ok("::1"), "https://[::1]:8443");
        assert_eq!(ok(DEFAULT_ADDR), DEFAULT_ADDR);
    }

    #[test]
    fn endpoint_rejects() {
        for bad in [
            "",
            "http://localhost:8443",
            "unix:///tmp/sock",
            "https://",
            ":8443",
            "localhost:0",
            "localhost:99999",
            "localhost:port",
            "https://localhost:8443/api",
            "user@localhost:8443",
            "[::1",
            "[::1]x",
            "[nope]:1",
            "a b:1",
        ] {
            let err = normalize_endpoint(bad).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn endpoint_lists() {
        let ok = |l: &str| parse_endpoints(l).unwrap();
        assert_eq!(ok("127.0.0.1:8443"), ["https://127.0.0.1:8443"]);
        assert_eq!(
            ok("https://a:8443,https://b:8443"),
            ["https://a:8443", "https://b:8443"]
        );
        assert_eq!(
            ok(" a , [::1]:9 ,https://c/"),
            ["https://a:8443", "https://[::1]:9", "https://c:443"]
        );
        let err = |l: &str| parse_endpoints(l).unwrap_err();
        for (list, says) in [
            ("", "item 1 is empty"),
            ("a:1,,b:1", "item 2 is empty"),
            ("a:1,", "item 2 is empty"),
            (" , a:1", "item 1 is empty"),
            ("a:1,http://b:1", "\"http\" is not supported"),
            ("a:1,b:0", "invalid server address \"b:0\""),
            (
                "localhost,https://localhost:8443",
                "https://localhost:8443 is listed twice",
            ),
            ("a:1,b:1,a:1", "https://a:1 is listed twice"),
        ] {
            let e = err(list);
            assert!(matches!(e, Error::Config(_)), "{list:?}: {e:?}");
            assert!(e.message().contains(says), "{list:?}: {e}");
        }
    }

    #[test]
    fn several_endpoints_in_the_config() {
        let cfg = ClientConfig::new("b:1, a:1", CA, CA, KEY).unwrap();
        assert_eq!(cfg.endpoints(), ["https://b:1", "https://a:1"]);
        assert_eq!(cfg.endpoint(), "https://b:1");

        let cfg = cfg.with_endpoints(["https://c:3", "d"]).unwrap();
        assert_eq!(cfg.endpoints(), ["https://c:3", "https://d:8443"]);
        let cfg = cfg.with_endpoints(vec![String::from("e:5")]).unwrap();
        assert_eq!(cfg.endpoints(), ["https://e:5"]);
        let e = cfg.clone().with_endpoints(Vec::<&str>::new()).unwrap_err();
        assert!(e.message().contains("list is empty"), "{e}");
        let e = cfg.clone().with_endpoints(["x:1", "x:1"]).unwrap_err();
        assert!(e.message().contains("listed twice"), "{e}");
        let e = cfg.clone().with_endpoints(["x:1", " "]).unwrap_err();
        assert!(e.message().contains("item 2 is empty"), "{e}");

        assert_eq!(
            cfg.failover_backoff(),
            (DEFAULT_FAILOVER_BACKOFF, DEFAULT_FAILOVER_BACKOFF_MAX)
        );
        let cfg = cfg.with_failover_backoff(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(
            cfg.failover_backoff(),
            (Duration::from_secs(2), Duration::from_secs(2))
        );
    }

    #[test]
    fn connect_timeout_stays_below_the_call_timeout() {
        let cfg = ClientConfig::new("a", CA, CA, KEY).unwrap();
        assert_eq!(cfg.effective_connect_timeout(), DEFAULT_TIMEOUT / 3);
        let cfg = cfg.with_connect_timeout(Duration::from_secs(1));
        assert_eq!(cfg.effective_connect_timeout(), Duration::from_secs(1));
        let cfg = cfg.with_timeout(Duration::from_millis(300));
        assert_eq!(cfg.effective_connect_timeout(), Duration::from_millis(100));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2.5s").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        for bad in ["", "s", "-1", "10h", "1e3", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn new_checks_pem_roles() {
        let cfg = ClientConfig::new("localhost:1", CA, CA, KEY).unwrap();
        assert_eq!(cfg.endpoint(), "https://localhost:1");
        assert_eq!(cfg.timeout(), DEFAULT_TIMEOUT);
        assert_eq!(cfg.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(cfg.retry(), &RetryPolicy::default());
        // Key where the certificate belongs, and the other way round.
        let err = ClientConfig::new("localhost:1", CA, KEY, KEY).unwrap_err();
        assert!(err.message().contains("client certificate"), "{err}");
        let err = ClientConfig::new("localhost:1", CA, CA, CA).unwrap_err();
        assert!(err.message().contains("client key"), "{err}");
        let err = ClientConfig::new("localhost:1", "", CA, KEY).unwrap_err();
        assert!(err.message().contains("CA certificate"), "{err}");
        // An EC or RSA key label is accepted too.
        let ec = KEY.replace("PRIVATE KEY", "EC PRIVATE KEY");
        assert!(ClientConfig::new("localhost:1", CA, CA, ec).is_ok());
    }

    #[test]
    fn debug_hides_the_key() {
        let cfg = ClientConfig::new("localhost:1", CA, CA, KEY)
            .unwrap()
            .with_server_name("ward.test");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("MIIE"), "{dbg}");
        assert!(dbg.contains("ward.test"));
    }

    #[test]
    fn from_files_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = dir.path().join("app.pem");
        let key = dir.path().join("app.key");
        std::fs::write(&ca, CA).unwrap();
        std::fs::write(&cert, CA).unwrap();
        std::fs::write(&key, KEY).unwrap();

        let cfg = ClientConfig::from_files("localhost", &ca, &cert, &key).unwrap();
        assert_eq!(cfg.key_pem(), KEY.as_bytes());
        assert_eq!(cfg.ca_pem(), CA.as_bytes());
        assert_eq!(cfg.cert_pem(), CA.as_bytes());

        let missing = dir.path().join("nope.pem");
        let err = ClientConfig::from_files("localhost", &ca, &cert, &missing).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert!(err.message().contains("nope.pem"), "{err}");

        let path = |p: &Path| p.to_str().unwrap().to_owned();
        let mut env: HashMap<&str, String> = HashMap::from([
            (ENV_CA, path(&ca)),
            (ENV_CERT, path(&cert)),
            (ENV_KEY, path(&key)),
        ]);
        let cfg = ClientConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(cfg.endpoint(), DEFAULT_ADDR);
        assert_eq!(cfg.server_name(), None);

        env.insert(ENV_ADDR, "ward.test:9443".into());
        env.insert(ENV_SERVER_NAME, "localhost".into());
        env.insert(ENV_TIMEOUT, "250ms".into());
        let cfg = ClientConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(cfg.endpoint(), "https://ward.test:9443");
        assert_eq!(cfg.server_name(), Some("localhost"));
        assert_eq!(cfg.timeout(), Duration::from_millis(250));

        env.insert(ENV_ADDR, "ward-1.test:9443,ward-2.test:9443".into());
        let cfg = ClientConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(
            cfg.endpoints(),
            ["https://ward-1.test:9443", "https://ward-2.test:9443"]
        );
        env.insert(ENV_ADDR, "ward-1.test:9443,".into());
        let err = ClientConfig::from_lookup(|k| env.get(k).cloned()).unwrap_err();
        assert!(err.message().contains("item 2 is empty"), "{err}");
        env.insert(ENV_ADDR, "ward.test:9443".into());

        env.insert(ENV_TIMEOUT, "soon".into());
        let err = ClientConfig::from_lookup(|k| env.get(k).cloned()).unwrap_err();
        assert!(err.message().contains(ENV_TIMEOUT), "{err}");

        env.remove(ENV_KEY);
        let err = ClientConfig::from_lookup(|k| env.get(k).cloned()).unwrap_err();
        assert_eq!(err, Error::Config("WARD_KEY is not set".into()));
    }
}
