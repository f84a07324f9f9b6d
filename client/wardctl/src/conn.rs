//! Connection flags shared by `wardctl` and `ward-bench` (clap), each also read from the
//! environment, and their conversion into a [`ClientConfig`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use ward_client::{
    parse_duration, ClientConfig, Error, DEFAULT_ADDR, ENV_ADDR, ENV_CA, ENV_CERT, ENV_KEY,
    ENV_SERVER_NAME, ENV_TIMEOUT,
};

/// How to reach and authenticate to the server.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnArgs {
    /// Server address, or the replicas of a cluster as a comma-separated list.
    #[arg(
        long,
        env = ENV_ADDR,
        default_value = DEFAULT_ADDR,
        global = true,
        value_name = "ADDR[,ADDR…]",
        help = "Server address: host:port, [v6]:port or https://host[:port]; several \
                (comma-separated, in order of preference) fail over to each other"
    )]
    pub addr: String,
    /// CA certificate (PEM) that signed the server certificate
    #[arg(long, env = ENV_CA, value_name = "PATH", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM); its identity decides what you may do
    #[arg(long, env = ENV_CERT, value_name = "PATH", global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM)
    #[arg(long, env = ENV_KEY, value_name = "PATH", global = true)]
    pub key: Option<PathBuf>,
    /// Verify the server certificate against this name instead of the address's host
    #[arg(long, env = ENV_SERVER_NAME, value_name = "NAME", global = true)]
    pub server_name: Option<String>,
    /// Per-call timeout: seconds, or with a unit (500ms, 2.5s, 1m) [default: 10s]
    #[arg(long, env = ENV_TIMEOUT, value_name = "DURATION", value_parser = parse_duration, global = true)]
    pub timeout: Option<Duration>,
}

impl ConnArgs {
    /// Reads the certificate files and builds the client configuration; a missing flag or an
    /// unreadable file is an [`Error::Config`].
    pub fn to_config(&self) -> Result<ClientConfig, Error> {
        let need = |v: &Option<PathBuf>, flag: &str, env: &str| {
            v.clone()
                .ok_or_else(|| Error::Config(format!("--{flag} (or {env}) is required")))
        };
        let ca = need(&self.ca, "ca", ENV_CA)?;
        let cert = need(&self.cert, "cert", ENV_CERT)?;
        let key = need(&self.key, "key", ENV_KEY)?;
        let mut cfg = ClientConfig::from_files(&self.addr, ca, cert, key)?;
        if let Some(name) = &self.server_name {
            cfg = cfg.with_server_name(name);
        }
        if let Some(timeout) = self.timeout {
            if timeout.is_zero() {
                return Err(Error::Config("--timeout must be more than zero".into()));
            }
            cfg = cfg.with_timeout(timeout);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        conn: ConnArgs,
    }

    #[test]
    fn missing_files_are_config_errors() {
        let cmd =
            Cmd::try_parse_from(["x", "--addr", "localhost:1", "--ca", "/nonexistent/ca"]).unwrap();
        assert_eq!(cmd.conn.addr, "localhost:1");
        let err = cmd.conn.to_config().unwrap_err();
        assert!(err.message().contains("--cert"), "{err}");

        let cmd = Cmd::try_parse_from([
            "x",
            "--ca",
            "/nonexistent/ca",
            "--cert",
            "/c",
            "--key",
            "/k",
            "--timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(cmd.conn.timeout, Some(Duration::from_secs(2)));
        let err = cmd.conn.to_config().unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert!(err.message().contains("/nonexistent/ca"), "{err}");
    }

    #[test]
    fn addr_takes_a_list_of_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let pem = |name: &str, label: &str| {
            let path = dir.path().join(name);
            std::fs::write(
                &path,
                format!("-----BEGIN {label}-----\nMIIB\n-----END {label}-----\n"),
            )
            .unwrap();
            path.to_str().unwrap().to_owned()
        };
        let (ca, key) = (pem("ca.pem", "CERTIFICATE"), pem("k.pem", "PRIVATE KEY"));
        let files = ["--ca", &ca, "--cert", &ca, "--key", &key];
        let parse = |addr: &str| {
            let args = ["x", "--addr", addr].into_iter().chain(files);
            Cmd::try_parse_from(args).unwrap().conn.to_config()
        };
        let cfg = parse("ward-1:8443,https://ward-2:9443").unwrap();
        assert_eq!(
            cfg.endpoints(),
            ["https://ward-1:8443", "https://ward-2:9443"]
        );
        for (bad, says) in [
            ("ward-1,,ward-2", "item 2 is empty"),
            ("ward-1,ward-1:8443", "listed twice"),
            ("ward-1,ftp://x", "not supported"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad}: {err:?}");
            assert!(err.message().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_timeout_is_a_usage_error() {
        assert!(Cmd::try_parse_from(["x", "--timeout", "soon"]).is_err());
    }
}
