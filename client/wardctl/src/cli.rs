//! The command line: the global flags and the command tree, whose leaves are the argument
//! structs of [`crate::commands`], and the dispatch of a parsed command line to them.

use clap::builder::FalseyValueParser;
use clap::{Parser, Subcommand};

use crate::commands::admin::{self, AdminCommand};
use crate::commands::alerts::{self, AlertsCommand};
use crate::commands::audit::{self, AuditCommand};
use crate::commands::keys::{self, KeysCommand};
use crate::commands::lifecycle::{self, Change, DestroyArgs, RevokeArgs, RotateArgs, StateArgs};
use crate::commands::scan::{self, ScanArgs};
use crate::commands::secrets::{
    self, BatchGetArgs, DescribeArgs, GetArgs, IssueArgs, LsArgs, PutArgs,
};
use crate::commands::watch::{self, WatchArgs};
use crate::conn::ConnArgs;
use crate::failure::Failure;

/// Command-line client for the Ward secrets vault.
#[derive(Debug, Parser)]
#[command(
    name = "wardctl",
    version,
    about = "Command-line client for the Ward secrets vault",
    after_help = "Every call is made over mutual TLS: give --ca, --cert and --key (or WARD_CA, \
                  WARD_CERT, WARD_KEY).\n\nExit status: 0 success, 1 the server refused or \
                  could not be reached (stderr: `error: <CODE>: <message>`), 2 bad usage or \
                  configuration, 3 `keys verify`: the key is not valid; `scan`: keys were \
                  found (with --check: live ones, or ones whose state it cannot tell)."
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print JSON instead of human-readable text
    #[arg(
        long,
        global = true,
        env = "WARD_JSON",
        value_parser = FalseyValueParser::new(),
        help_heading = "Output"
    )]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The wardctl commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a value as a secret's new PRIMARY version (value from --value-file or stdin)
    ///
    /// Creates the STATIC secret if needed. The value is read from --value-file, or else from
    /// stdin, byte for byte: a trailing newline is kept (use `printf %s`, not `echo`). There is
    /// no --value flag on purpose: a value on the command line lands in `ps` and shell
    /// history. Prints `NAME version N (crc32c XXXXXXXX)`.
    Put(PutArgs),
    /// Generate an API key and store it as a new API_KEY secret
    ///
    /// Prints the key alone on stdout (so `KEY=$(wardctl issue ...)` works) and name, version
    /// and key id on stderr; with --json, one object on stdout. The key is shown only once.
    Issue(IssueArgs),
    /// Write a secret's value to stdout, exactly as stored
    ///
    /// No trailing newline is added. With --json: an object with name, version, state,
    /// checksum, kind, environment, create_time and `value` (if UTF-8) or `value_base64`.
    Get(GetArgs),
    /// Fetch several secrets in one call
    ///
    /// Prints one tab-separated line per item, in request order:
    /// `NAME@VERSION ok VERSION STATE VALUE` or `NAME@VERSION error CODE MESSAGE`; a value
    /// that is not single-line UTF-8 is printed as `base64:...`. With --json, an array of
    /// `{name, requested_version, secret}` or `{name, requested_version, error: {code,
    /// message}}`. Exits 1 if any item failed.
    BatchGet(BatchGetArgs),
    /// Show a secret's metadata and the state of every version (never a value)
    Describe(DescribeArgs),
    /// List secrets in name order
    ///
    /// Prints one line per secret: name, kind, environment, primary version, owner; with
    /// --json, an array of objects. Follows every page unless --page-size or --page-token is
    /// given; then prints just that page, and the next page token goes to stderr as
    /// `next page token: T` (with --json the output is instead an object
    /// `{"secrets": [...], "next_page_token": "..."}`).
    Ls(LsArgs),
    /// Key management (needs the `admin` verb): keyring and master-key rotation
    #[command(subcommand)]
    Admin(AdminCommand),
    /// API keys: verify one, change a key's policy, show usage, report stale keys
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Find Ward API keys in files (a leak scanner for pre-commit hooks and CI)
    ///
    /// Walks PATHs (default: .), honouring .gitignore and .ignore files, skipping binaries and
    /// .git/, and reports every string in Ward's key format whose checksum is valid, as
    /// `FILE:LINE:COLUMN: PREVIEW` with the key redacted. With --check, asks the server
    /// (verify verb, zero cost: nothing is charged or counted as a use) whether each is live.
    /// Exits 3 when keys were found (with --check: live keys), 0 otherwise.
    Scan(ScanArgs),
    /// Rotate a secret: a new PRIMARY version, the old one ACTIVE for the grace period
    ///
    /// API_KEY secrets: Ward generates the new key; it is printed alone on stdout (shown
    /// once), with version details on stderr. STATIC secrets: the new value is read from
    /// --value-file, or from stdin when stdin is not a terminal, byte for byte; prints
    /// `NAME version N (crc32c X)` and what became of the previous version.
    Rotate(RotateArgs),
    /// Revoke one version (--version N) or the whole secret (--all), with a reason
    ///
    /// Takes effect on the server's very next call; watchers are told at once. Revoking the
    /// PRIMARY alone needs --successor (an ACTIVE version to promote). Nothing brings a
    /// revoked version back.
    Revoke(RevokeArgs),
    /// Set a version's state: primary (promote an ACTIVE version, i.e. roll back), active
    /// (re-activate, or change an ACTIVE window) or inactive (retire now)
    State(StateArgs),
    /// Destroy a version for good: its data key and ciphertext are deleted; the metadata
    /// stays and reads as DESTROYED. Destroying the PRIMARY needs --successor.
    Destroy(DestroyArgs),
    /// Watch secrets: print what differs from what you hold, a SYNCED line, then live changes
    ///
    /// One tab-separated line per event: `TYPE NAME VERSION STATE REASON` (with --json, one
    /// compact JSON object per line). Runs until interrupted or the server ends the stream
    /// (exit 1); with --once, exits after SYNCED.
    Watch(WatchArgs),
    /// Read and verify the audit log
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Abuse alerts: follow them, test a webhook
    #[command(subcommand)]
    Alerts(AlertsCommand),
}

impl Cli {
    /// Runs the command. Configuration is checked before any input is read or connection made.
    pub async fn run(self) -> Result<(), Failure> {
        let cfg = self.conn.to_config()?;
        let json = self.json;
        match self.command {
            Command::Put(args) => secrets::put(cfg, args, json).await,
            Command::Issue(args) => secrets::issue(cfg, args, json).await,
            Command::Get(args) => secrets::get(cfg, args, json).await,
            Command::BatchGet(args) => secrets::batch_get(cfg, args, json).await,
            Command::Describe(args) => secrets::describe(cfg, args, json).await,
            Command::Ls(args) => secrets::ls(cfg, args, json).await,
            Command::Admin(cmd) => admin::run(cfg, cmd, json).await,
            Command::Keys(cmd) => keys::run(cfg, cmd, json).await,
            Command::Scan(args) => scan::scan(cfg, args, json).await,
            Command::Rotate(args) => lifecycle::rotate(cfg, args, json).await,
            Command::Revoke(args) => lifecycle::change(cfg, Change::Revoke(args), json).await,
            Command::State(args) => lifecycle::change(cfg, Change::State(args), json).await,
            Command::Destroy(args) => lifecycle::change(cfg, Change::Destroy(args), json).await,
            Command::Watch(args) => watch::watch(cfg, args, json).await,
            Command::Audit(cmd) => audit::run(cfg, cmd, json).await,
            Command::Alerts(cmd) => alerts::run(cfg, cmd, json).await,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use ward_client::proto::VersionState;

    use super::*;

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "wardctl",
            "put",
            "a/b",
            "--label",
            "k=v",
            "--label",
            "x=y",
            "--env",
            "prod",
            "--expected-version",
            "0",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        let Command::Put(p) = cli.command else {
            panic!("not put")
        };
        assert_eq!(p.meta.labels.len(), 2);
        assert_eq!(p.expected_version, Some(0));
        assert_eq!(p.meta.environment.as_deref(), Some("prod"));

        let cli = Cli::try_parse_from(["wardctl", "get", "a", "--version", "3"]).unwrap();
        let Command::Get(g) = cli.command else {
            panic!("not get")
        };
        assert_eq!(g.version, 3);

        let cli = Cli::try_parse_from(["wardctl", "batch-get", "a", "b@2"]).unwrap();
        let Command::BatchGet(b) = cli.command else {
            panic!("not batch-get")
        };
        assert_eq!(b.items, vec![("a".into(), 0), ("b".into(), 2)]);

        assert!(Cli::try_parse_from(["wardctl", "batch-get"]).is_err());

        let cli = Cli::try_parse_from([
            "wardctl",
            "audit",
            "tail",
            "-f",
            "--from",
            "7",
            "--outcome",
            "ERROR",
        ])
        .unwrap();
        let Command::Audit(AuditCommand::Tail(t)) = cli.command else {
            panic!("not audit tail")
        };
        assert_eq!(
            (t.from, t.follow, t.outcome.as_deref()),
            (Some(7), true, Some("ERROR"))
        );
        assert!(
            Cli::try_parse_from(["wardctl", "audit", "tail", "--from", "1", "--last", "2"])
                .is_err()
        );
        let cli = Cli::try_parse_from(["wardctl", "audit", "verify", "--to", "9"]).unwrap();
        let Command::Audit(AuditCommand::Verify(v)) = cli.command else {
            panic!("not audit verify")
        };
        assert_eq!((v.from, v.to), (0, 9));
        assert!(Cli::try_parse_from(["wardctl", "put", "a", "--value", "x"]).is_err());
        let cli = Cli::try_parse_from([
            "wardctl",
            "alerts",
            "tail",
            "-f",
            "--type",
            "key.*",
            "--type",
            "webhook.disabled",
        ])
        .unwrap();
        let Command::Alerts(AlertsCommand::Tail(t)) = cli.command else {
            panic!("not alerts tail")
        };
        assert!(t.follow);
        assert_eq!(t.types, ["key.*", "webhook.disabled"]);
        let cli =
            Cli::try_parse_from(["wardctl", "alerts", "test", "https://h.example/w"]).unwrap();
        let Command::Alerts(AlertsCommand::Test(t)) = cli.command else {
            panic!("not alerts test")
        };
        assert_eq!(t.url, "https://h.example/w");
    }

    #[test]
    fn lifecycle_commands_parse() {
        let cli = Cli::try_parse_from([
            "wardctl",
            "rotate",
            "k",
            "--grace",
            "1h",
            "--ttl",
            "30d",
            "--request-id",
            "r1",
        ])
        .unwrap();
        let Command::Rotate(r) = cli.command else {
            panic!("not rotate")
        };
        assert_eq!(r.grace, Some(Duration::from_secs(3600)));
        assert_eq!(r.expiry.ttl, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(r.write.request_id.as_deref(), Some("r1"));
        assert!(Cli::try_parse_from([
            "wardctl",
            "rotate",
            "k",
            "--ttl",
            "1d",
            "--expire-at",
            "2030-01-01T00:00:00Z"
        ])
        .is_err());

        // revoke needs exactly one of --version and --all, and a reason.
        assert!(Cli::try_parse_from(["wardctl", "revoke", "k", "--reason", "x"]).is_err());
        assert!(Cli::try_parse_from(["wardctl", "revoke", "k", "--version", "1"]).is_err());
        assert!(Cli::try_parse_from([
            "wardctl",
            "revoke",
            "k",
            "--version",
            "1",
            "--all",
            "--reason",
            "x"
        ])
        .is_err());
        let cli =
            Cli::try_parse_from(["wardctl", "revoke", "k", "--all", "--reason", "leak"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Revoke(RevokeArgs { all: true, .. })
        ));

        let cli = Cli::try_parse_from(["wardctl", "state", "k", "2", "PRIMARY"]).unwrap();
        let Command::State(st) = cli.command else {
            panic!("not state")
        };
        assert_eq!((st.version, st.state), (2, VersionState::Primary));
        assert!(Cli::try_parse_from(["wardctl", "state", "k", "2", "revoked"]).is_err());
        assert!(Cli::try_parse_from(["wardctl", "destroy", "k"]).is_err());

        let cli = Cli::try_parse_from([
            "wardctl",
            "watch",
            "a",
            "b",
            "--held",
            "a@3:primary",
            "--held",
            "b@1",
            "--once",
        ])
        .unwrap();
        let Command::Watch(w) = cli.command else {
            panic!("not watch")
        };
        assert_eq!(w.names, ["a", "b"]);
        assert_eq!(
            w.held,
            [
                ("a".into(), 3, VersionState::Primary),
                ("b".into(), 1, VersionState::Unspecified)
            ]
        );
        assert!(w.once);
        assert!(Cli::try_parse_from(["wardctl", "watch", "a", "--prefix", "x/"]).is_err());
    }

    #[test]
    fn issue_takes_the_key_policy_flags_of_keys_policy() {
        let policy_flags = [
            "--scope",
            "read",
            "--scope",
            "write",
            "--cidr",
            "10.0.0.0/8",
            "--rate-limit",
            "100/s",
            "--burst",
            "5",
            "--quota",
            "1000",
            "--quota-period",
            "1d",
            "--quota-refill",
            "500",
            "--expires",
            "2030-01-01T00:00:00Z",
        ];
        let issue =
            Cli::try_parse_from(["wardctl", "issue", "k"].iter().chain(&policy_flags)).unwrap();
        let Command::Issue(i) = issue.command else {
            panic!("not issue")
        };
        let update = Cli::try_parse_from(
            ["wardctl", "keys", "policy", "k"]
                .iter()
                .chain(&policy_flags),
        )
        .unwrap();
        let Command::Keys(KeysCommand::Policy(u)) = update.command else {
            panic!("not keys policy")
        };
        // One flag set, one parser: both commands read the same policy from the same flags.
        assert_eq!(i.key_policy.policy(), u.policy.policy());
        let p = i.key_policy.policy();
        assert_eq!(p.scopes, ["read", "write"]);
        assert_eq!(p.expire_time.map(|t| t.seconds), Some(1_893_456_000));
        assert_eq!(p.quota.map(|q| (q.limit, q.refill)), Some((1000, 500)));

        // One expiry: --expires, --expire-at and --ttl exclude each other.
        for other in [["--ttl", "1h"], ["--expire-at", "2031-01-01T00:00:00Z"]] {
            let args = [
                "wardctl",
                "issue",
                "k",
                "--expires",
                "1d",
                other[0],
                other[1],
            ];
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["wardctl", "issue", "k", "--ttl", "1h"]).is_ok());
        assert!(Cli::try_parse_from(["wardctl", "issue", "k", "--quota-refill", "5"]).is_err());
        assert!(Cli::try_parse_from([
            "wardctl",
            "keys",
            "policy",
            "k",
            "--expires",
            "1d",
            "--no-expiry"
        ])
        .is_err());
    }
}
