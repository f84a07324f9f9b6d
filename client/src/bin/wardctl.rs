//! `wardctl`: the command-line client of the Ward secrets vault, built on the `ward-client` SDK.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use clap::builder::FalseyValueParser;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use zeroize::{Zeroize, Zeroizing};

use ward_client::cli::ConnArgs;
use ward_client::proto::{
    batch_fetch_result, issue_key_request, put_secret_request, rotate_secret_request,
    stream_audit_response, AuditProblem, AuditRecord, AuditRecordKind, BatchFetchResult,
    DestroyVersionRequest, FetchSecretResponse, GetKeyUsageResponse, HeldSecret, HeldVersion,
    IssueKeyRequest, KeyPolicy, ListSecretsRequest, PutSecretRequest, Quota, RateLimit,
    RevokeSecretRequest, RotateSecretRequest, SecretKind, SecretMetadata, SetVersionStateRequest,
    StreamAuditRequest, UpdateKeyPolicyRequest, VerifyAuditLogResponse, VerifyKeyRequest,
    VerifyKeyResponse, VerifyResult, VersionState, WatchEvent, WatchEventType, WatchSecretsRequest,
};
use ward_client::scan::Standing;
use ward_client::{code_name, parse_duration, Client, Code, Error};

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
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Print JSON instead of human-readable text
    #[arg(
        long,
        global = true,
        env = "WARD_JSON",
        value_parser = FalseyValueParser::new(),
        help_heading = "Output"
    )]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The wardctl commands.
#[derive(Debug, Subcommand)]
enum Command {
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
}

/// `wardctl admin …`
#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Add a keyring term; new versions are sealed under it (older ones keep theirs)
    RotateKeyring,
    /// Create a new HSM master key and rewrap the keyring under it (O(terms), online)
    RotateMasterKey {
        /// Label of the new master key (default: derived, e.g. ward-master-1 → ward-master-2)
        #[arg(long, default_value = "")]
        new_label: String,
    },
    /// Show the keyring's terms, master key and its wrap count
    Keyring,
    /// Write a consistent backup of the whole vault to FILE (still encrypted: restoring it with
    /// `ward-server restore` needs the same HSM master key). FILE must not exist; it is
    /// created 0600 and appears only once complete
    Backup {
        /// Where to write the backup
        file: std::path::PathBuf,
    },
}

/// The `keys` commands.
#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Verify a key read from stdin (or --key-file): prints the result, exits 3 unless VALID
    ///
    /// The key is never taken from the command line (it would land in `ps` and shell history).
    /// Charges --cost (default 1) to the key's rate limit and quota when valid.
    Verify(VerifyArgs),
    /// Change fields of an API key's policy; only the fields given are changed
    ///
    /// Setting --quota starts a fresh ledger at the new limit.
    Policy(KeyPolicyUpdate),
    /// Show an API key's usage: per version, verifications by result and endpoint, last use
    Usage(UsageArgs),
    /// List API keys not used (no charged VALID verification) for N days, or never used
    Stale(StaleArgs),
}

/// Key policy flags shared by `issue` and `keys policy`.
#[derive(Debug, Args, Default)]
struct KeyPolicyArgs {
    /// Allowed client IP range (CIDR or address), repeatable; default any
    #[arg(long = "cidr", value_name = "CIDR")]
    cidrs: Vec<String>,
    /// Rate limit: REQUESTS/PERIOD, e.g. 100/s, 6000/1m, 10/500ms
    #[arg(long, value_name = "N/PERIOD", value_parser = parse_rate)]
    rate_limit: Option<(u32, Duration)>,
    /// Requests admitted back to back (default: the rate's N)
    #[arg(long, value_name = "N", requires = "rate_limit")]
    burst: Option<u32>,
    /// Usage quota (sum of verification costs)
    #[arg(long, value_name = "N")]
    quota: Option<u64>,
    /// Refill the quota every PERIOD (e.g. 1d, 30d, 1h)
    #[arg(long, value_name = "PERIOD", value_parser = parse_span, requires = "quota")]
    quota_period: Option<Duration>,
    /// Balance after each refill (default: the quota)
    #[arg(long, value_name = "N", requires = "quota_period")]
    quota_refill: Option<u64>,
}

impl KeyPolicyArgs {
    fn rate(&self) -> Option<RateLimit> {
        self.rate_limit.map(|(requests, period)| RateLimit {
            requests,
            period: Some(proto_duration(period)),
            burst: self.burst.unwrap_or(0),
        })
    }

    fn quota(&self) -> Option<Quota> {
        self.quota.map(|limit| Quota {
            limit,
            refill: self.quota_refill.unwrap_or(0),
            refill_period: self.quota_period.map(proto_duration),
        })
    }
}

/// Arguments of `keys verify`.
#[derive(Debug, Args)]
struct VerifyArgs {
    /// Read the key from this file ("-" or absent: stdin; surrounding whitespace is dropped)
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Scope the key must grant, repeatable
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// The end client's IP address
    #[arg(long, value_name = "IP")]
    ip: Option<String>,
    /// The environment the verifier serves
    #[arg(long = "env", value_name = "ENV")]
    environment: Option<String>,
    /// Units to charge (0: check without charging)
    #[arg(long, value_name = "N")]
    cost: Option<u64>,
    /// Endpoint tag for usage statistics
    #[arg(long, value_name = "TAG")]
    endpoint: Option<String>,
}

/// Arguments of `keys policy`.
#[derive(Debug, Args)]
struct KeyPolicyUpdate {
    /// Name of the API_KEY secret
    name: String,
    /// Replace the scopes with these, repeatable
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// Remove every scope
    #[arg(long, conflicts_with = "scopes")]
    no_scopes: bool,
    /// Remove every CIDR restriction
    #[arg(long, conflicts_with = "cidrs")]
    no_cidrs: bool,
    /// Remove the rate limit
    #[arg(long, conflicts_with = "rate_limit")]
    no_rate_limit: bool,
    /// Remove the quota
    #[arg(long, conflicts_with = "quota")]
    no_quota: bool,
    /// New expiry of the key (the secret's lifecycle expiry): an RFC 3339 time
    /// (2027-01-31T00:00:00Z) or a span from now (90d, 12h)
    #[arg(long, value_name = "TIME", value_parser = parse_expiry)]
    expires: Option<prost_types::Timestamp>,
    /// Remove the expiry
    #[arg(long, conflicts_with = "expires")]
    no_expiry: bool,
    #[command(flatten)]
    policy: KeyPolicyArgs,
    /// Idempotency key: a retry does not reset the quota twice
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
}

/// Lifecycle flags of `put` and `issue`.
#[derive(Debug, Args)]
struct PolicyArgs {
    /// Scheduled rotation period (e.g. 30d, 12h; 0 turns it off). API keys are rotated by
    /// Ward when due; STATIC secrets get a ROTATION_DUE watch event
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    rotation_period: Option<Duration>,
    /// How long a replaced PRIMARY stays ACTIVE when a rotation names no grace period
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    default_grace: Option<Duration>,
    #[command(flatten)]
    expiry: ExpiryArgs,
}

/// An expiry: absolute or relative to the server's clock.
#[derive(Debug, Args)]
struct ExpiryArgs {
    /// Expire at this RFC 3339 time (e.g. 2030-01-01T00:00:00Z)
    #[arg(long, value_name = "TIME", value_parser = parse_time, conflicts_with = "ttl")]
    expire_at: Option<prost_types::Timestamp>,
    /// Expire this long from now (server time; 0 removes an expiry)
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    ttl: Option<Duration>,
}

/// Compare-and-set and idempotency flags of the lifecycle commands.
#[derive(Debug, Args)]
struct WriteArgs {
    /// Act only if the current PRIMARY version is N
    #[arg(long, value_name = "N")]
    expected_version: Option<u64>,
    /// Idempotency key ([A-Za-z0-9._:-]{1,128}); also lets wardctl retry safely
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
}

/// Arguments of `keys usage`.
#[derive(Debug, Args)]
struct UsageArgs {
    /// Name of the API_KEY secret
    name: String,
    /// Only this version (default: every version)
    #[arg(long, value_name = "N", default_value_t = 0)]
    version: u64,
}

/// Arguments of `keys stale`.
#[derive(Debug, Args)]
struct StaleArgs {
    /// Unused for at least this many days
    #[arg(long, value_name = "N", default_value_t = 90,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
    /// Only names starting with this prefix
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Only this environment
    #[arg(long = "env", value_name = "ENV")]
    environment: Option<String>,
}

/// Arguments of `scan`.
#[derive(Debug, Args)]
struct ScanArgs {
    /// Files or directories (default: .)
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Ask the server whether each key found is live (needs the verify verb on the keys; a key
    /// the server will not tell about is reported as such and fails the scan)
    #[arg(long)]
    check: bool,
    /// Revoke the live keys found, after confirmation (implies --check)
    #[arg(long)]
    revoke: bool,
    /// Do not ask for confirmation before revoking
    #[arg(long, requires = "revoke")]
    yes: bool,
}

/// Arguments of `rotate`.
#[derive(Debug, Args)]
struct RotateArgs {
    /// Secret name
    name: String,
    /// STATIC secrets: read the new value from this file ("-" means stdin)
    #[arg(long, value_name = "PATH")]
    value_file: Option<PathBuf>,
    /// How long the previous PRIMARY stays ACTIVE (0: retire it at once) [default: the
    /// secret's, else the server's]
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    grace: Option<Duration>,
    #[command(flatten)]
    expiry: ExpiryArgs,
    #[command(flatten)]
    write: WriteArgs,
}

/// Arguments of `revoke`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["version", "all"])))]
struct RevokeArgs {
    /// Secret name
    name: String,
    /// The version to revoke
    #[arg(long, value_name = "N")]
    version: Option<u64>,
    /// Revoke the whole secret (every version; it accepts no new one)
    #[arg(long)]
    all: bool,
    /// Why (required; recorded and shown to later callers, so never put a secret in it)
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// When revoking the PRIMARY: the ACTIVE version that takes its place
    #[arg(long, value_name = "N")]
    successor: Option<u64>,
    #[command(flatten)]
    write: WriteArgs,
}

/// Arguments of `state`.
#[derive(Debug, Args)]
struct StateArgs {
    /// Secret name
    name: String,
    /// The version to move
    version: u64,
    /// primary, active or inactive
    #[arg(value_parser = parse_target_state)]
    state: VersionState,
    /// active: how long from now; primary: how long the replaced PRIMARY stays ACTIVE
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    grace: Option<Duration>,
    #[command(flatten)]
    write: WriteArgs,
}

/// Arguments of `destroy`.
#[derive(Debug, Args)]
struct DestroyArgs {
    /// Secret name
    name: String,
    /// The version to destroy
    version: u64,
    /// When destroying the PRIMARY: the ACTIVE version that takes its place
    #[arg(long, value_name = "N")]
    successor: Option<u64>,
    #[command(flatten)]
    write: WriteArgs,
}

/// Arguments of `watch`.
#[derive(Debug, Args)]
struct WatchArgs {
    /// Secrets to watch (none: every secret under --prefix)
    names: Vec<String>,
    /// With no names: watch every secret starting with this prefix that you may read
    #[arg(long, value_name = "PREFIX", conflicts_with = "names")]
    prefix: Option<String>,
    /// A version you hold, repeatable: NAME@VERSION or NAME@VERSION:STATE (e.g.
    /// db@3:primary); you are told what differs
    #[arg(long = "held", value_name = "NAME@VERSION[:STATE]", value_parser = parse_held)]
    held: Vec<(String, u64, VersionState)>,
    /// Exit after SYNCED instead of streaming live changes
    #[arg(long)]
    once: bool,
}

/// The `audit` subcommands.
#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print audit records, one line each
    ///
    /// Prints the last 10 records (or --last N, or from --from SEQ on) and, with --follow, new
    /// ones as they happen until interrupted. Each line: seq, time, identity, peer, method,
    /// targets (`name@version`, with `:CODE` when an item's outcome differs from the call's),
    /// outcome, then `request_id=` and `key_id=` when set; checkpoint and prune records show
    /// what they cover. Records that retention deleted before they were read are reported on
    /// stderr. With --json: one JSON object per line (`{"gap": ...}` for such a gap).
    Tail(TailArgs),
    /// Verify the audit log's hash chain and HSM-signed checkpoints
    ///
    /// Prints `ok: ...` or `BROKEN at record N (PROBLEM): why`, and exits 1 when broken.
    Verify(AuditVerifyArgs),
}

/// Arguments of `audit tail`.
#[derive(Debug, Args)]
struct TailArgs {
    /// Start at this sequence number (0: the oldest record kept)
    #[arg(long, value_name = "SEQ", conflicts_with = "last")]
    from: Option<u64>,
    /// Print the last N records, this call's own included [default: 10]
    #[arg(long, value_name = "N")]
    last: Option<u32>,
    /// Keep printing new records as they happen
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only callers whose identity matches this glob
    #[arg(long, value_name = "GLOB")]
    identity: Option<String>,
    /// Only records touching a secret whose name starts with this
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Only this method, e.g. FetchSecret
    #[arg(long, value_name = "METHOD")]
    method: Option<String>,
    /// Only these outcomes: OK, ERROR or a code name such as PERMISSION_DENIED
    #[arg(long, value_name = "OUTCOME")]
    outcome: Option<String>,
}

/// Arguments of `audit verify`.
#[derive(Debug, Args)]
struct AuditVerifyArgs {
    /// First record to check (default: the oldest kept)
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    from: u64,
    /// Last record to check (default: the newest)
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    to: u64,
}

/// Metadata flags shared by `put` and `issue`.
#[derive(Debug, Args)]
struct MetaArgs {
    /// Environment (default: the server's default, or the secret's own after creation)
    #[arg(long = "env", value_name = "ENV")]
    environment: Option<String>,
    /// Owner (team or identity; default: unchanged, or your identity on creation)
    #[arg(long, value_name = "OWNER")]
    owner: Option<String>,
    /// Label, repeatable; when any is given they replace the secret's labels
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Free-text description
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Idempotency key ([A-Za-z0-9._:-]{1,128}): a retry with the same id returns the first
    /// result, and lets wardctl retry the call safely after a network failure
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
}

/// Arguments of `put`.
#[derive(Debug, Args)]
struct PutArgs {
    /// Secret name
    name: String,
    /// Read the value from this file ("-" means stdin)
    #[arg(long, value_name = "PATH")]
    value_file: Option<PathBuf>,
    #[command(flatten)]
    meta: MetaArgs,
    /// Write only if the current PRIMARY version is N (0: only if the secret does not exist)
    #[arg(long, value_name = "N")]
    expected_version: Option<u64>,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Arguments of `issue`.
#[derive(Debug, Args)]
struct IssueArgs {
    /// Name of the new API_KEY secret
    name: String,
    /// Scope the key grants, repeatable
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    #[command(flatten)]
    meta: MetaArgs,
    #[command(flatten)]
    key_policy: KeyPolicyArgs,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Arguments of `get`.
#[derive(Debug, Args)]
struct GetArgs {
    /// Secret name
    name: String,
    /// Version number (default 0: the PRIMARY version)
    #[arg(long, value_name = "N", default_value_t = 0)]
    version: u64,
}

/// Arguments of `batch-get`.
#[derive(Debug, Args)]
struct BatchGetArgs {
    /// Items: NAME (the PRIMARY version) or NAME@VERSION
    #[arg(required = true, value_name = "NAME[@VERSION]", value_parser = parse_batch_item)]
    items: Vec<(String, u64)>,
}

/// Arguments of `describe`.
#[derive(Debug, Args)]
struct DescribeArgs {
    /// Secret name
    name: String,
}

/// Arguments of `ls`.
#[derive(Debug, Args)]
struct LsArgs {
    /// Only names starting with this prefix
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Only this environment
    #[arg(long = "env", value_name = "ENV")]
    environment: Option<String>,
    /// Only this owner
    #[arg(long, value_name = "OWNER")]
    owner: Option<String>,
    /// Only secrets carrying this label, repeatable (all must match)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Fetch one page of this many secrets (1..1000) instead of following every page
    #[arg(long, value_name = "N")]
    page_size: Option<u32>,
    /// Fetch the one page starting at this token (from a previous page)
    #[arg(long, value_name = "TOKEN")]
    page_token: Option<String>,
}

/// Why wardctl stopped early; decides the message and the exit status.
#[derive(Debug)]
enum Failure {
    /// Bad input on the command line or stdin: exit 2.
    Usage(String),
    /// An SDK error: exit 2 for configuration, 1 for the server or the network.
    Sdk(Error),
    /// Writing the output failed: exit 1.
    Output(io::Error),
    /// The error was already reported (e.g. per-item in a batch): exit 1, print nothing more.
    Reported,
    /// `keys verify` found the key not valid, or `scan` found keys (with --check: live ones,
    /// or ones it cannot tell): exit 3.
    Found,
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        Self::Sdk(err)
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        Self::Output(err)
    }
}

impl Failure {
    /// Prints the failure to stderr and returns the exit status.
    fn report(self) -> ExitCode {
        match self {
            Self::Usage(msg) => {
                eprintln!("error: usage: {msg}");
                ExitCode::from(2)
            }
            Self::Sdk(Error::Config(msg)) => {
                eprintln!("error: config: {msg}");
                ExitCode::from(2)
            }
            Self::Sdk(err) => {
                eprintln!("error: {}: {}", code_name(err.code()), err.message());
                ExitCode::from(1)
            }
            // A closed pipe (`wardctl ls | head`) is the reader's choice, not worth a message.
            Self::Output(err) if err.kind() == io::ErrorKind::BrokenPipe => ExitCode::from(1),
            Self::Output(err) => {
                eprintln!("error: writing output: {err}");
                ExitCode::from(1)
            }
            Self::Reported => ExitCode::from(1),
            Self::Found => ExitCode::from(3),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// Runs one command. Configuration is checked before any input is read or connection made.
async fn run(cli: Cli) -> Result<(), Failure> {
    let cfg = cli.conn.to_config()?;
    let json = cli.json;
    match cli.command {
        Command::Put(args) => {
            let mut value = read_value(args.value_file.as_deref())?;
            if value.is_empty() {
                return Err(Failure::Usage(
                    "the value is empty (give it on stdin or with --value-file)".into(),
                ));
            }
            let client = Client::connect(cfg).await?;
            let meta = args.meta;
            let req = PutSecretRequest {
                name: args.name,
                // Moves the buffer out of its zeroizing wrapper without copying the bytes.
                value: std::mem::take(&mut *value),
                environment: meta.environment.unwrap_or_default(),
                owner: meta.owner.unwrap_or_default(),
                labels: label_map(meta.labels)?,
                description: meta.description.unwrap_or_default(),
                expected_version: args.expected_version,
                request_id: meta.request_id.unwrap_or_default(),
                rotation_period: args.policy.rotation_period.map(to_duration),
                default_grace_period: args.policy.default_grace.map(to_duration),
                expiration: args.policy.expiry.pick(
                    put_secret_request::Expiration::ExpireTime,
                    put_secret_request::Expiration::Ttl,
                ),
            };
            let resp = client.put_secret(req).await?;
            if json {
                print_json(&json!({
                    "name": resp.name,
                    "version": resp.version,
                    "checksum": resp.checksum,
                    "checksum_hex": format!("{:08x}", resp.checksum),
                    "create_time": timestamp_json(resp.create_time.as_ref()),
                }))
            } else {
                let mut out = io::stdout().lock();
                writeln!(
                    out,
                    "{} version {} (crc32c {:08x})",
                    resp.name, resp.version, resp.checksum
                )?;
                Ok(())
            }
        }
        Command::Issue(args) => {
            let client = Client::connect(cfg).await?;
            let meta = args.meta;
            let req = IssueKeyRequest {
                name: args.name,
                environment: meta.environment.unwrap_or_default(),
                owner: meta.owner.unwrap_or_default(),
                scopes: args.scopes,
                labels: label_map(meta.labels)?,
                description: meta.description.unwrap_or_default(),
                request_id: meta.request_id.unwrap_or_default(),
                allowed_cidrs: args.key_policy.cidrs.clone(),
                rate_limit: args.key_policy.rate(),
                quota: args.key_policy.quota(),
                rotation_period: args.policy.rotation_period.map(to_duration),
                default_grace_period: args.policy.default_grace.map(to_duration),
                expiration: args.policy.expiry.pick(
                    issue_key_request::Expiration::ExpireTime,
                    issue_key_request::Expiration::Ttl,
                ),
            };
            let mut resp = client.issue_key(req).await?;
            let printed = if json {
                print_json(&json!({
                    "name": resp.name,
                    "version": resp.version,
                    "api_key": resp.api_key,
                    "key_id": resp.key_id,
                    "create_time": timestamp_json(resp.create_time.as_ref()),
                }))
            } else {
                print_new_key(
                    &resp.api_key,
                    &format!(
                        "issued {} version {} (key id {})",
                        resp.name, resp.version, resp.key_id
                    ),
                )
            };
            resp.api_key.zeroize();
            printed
        }
        Command::Get(args) => {
            let client = Client::connect(cfg).await?;
            let secret = client
                .fetch_secret_zeroizing(args.name, args.version)
                .await?;
            if json {
                print_json(&fetched_json(&secret.metadata, &secret.value))
            } else {
                let mut out = io::stdout().lock();
                out.write_all(&secret.value)?;
                out.flush()?;
                Ok(())
            }
        }
        Command::BatchGet(args) => {
            let client = Client::connect(cfg).await?;
            let resp = client.batch_fetch(args.items).await?;
            let failed = print_batch(&resp.results, json)?;
            if failed > 0 {
                Err(Failure::Reported)
            } else {
                Ok(())
            }
        }
        Command::Describe(args) => {
            let client = Client::connect(cfg).await?;
            let meta = client.describe_secret(args.name).await?;
            if json {
                print_json(&metadata_json(&meta))
            } else {
                print_describe(&meta)
            }
        }
        Command::Admin(cmd) => {
            let client = Client::connect(cfg).await?;
            match cmd {
                AdminCommand::RotateKeyring => {
                    let r = client.rotate_keyring().await?;
                    if json {
                        print_json(&json!({"term": r.term, "master_key_label": r.master_key_label}))
                    } else {
                        print_line(&format!(
                            "keyring term {} (wrapped by {})",
                            r.term, r.master_key_label
                        ))
                    }
                }
                AdminCommand::RotateMasterKey { new_label } => {
                    let r = client.rotate_master_key(new_label).await?;
                    if json {
                        print_json(&json!({
                            "previous_label": r.previous_label,
                            "master_key_label": r.master_key_label,
                            "terms_rewrapped": r.terms_rewrapped,
                        }))
                    } else {
                        print_line(&format!(
                            "master key {} -> {} ({} keyring terms rewrapped)",
                            r.previous_label, r.master_key_label, r.terms_rewrapped
                        ))
                    }
                }
                AdminCommand::Backup { file } => {
                    let bytes = write_backup(&client, &file).await?;
                    if json {
                        print_json(&json!({"file": file.display().to_string(), "bytes": bytes}))
                    } else {
                        print_line(&format!(
                            "backup of {bytes} bytes written to {}",
                            file.display()
                        ))
                    }
                }
                AdminCommand::Keyring => {
                    let k = client.describe_keyring().await?;
                    if json {
                        let terms: Vec<Value> = k
                            .terms
                            .iter()
                            .map(
                                |t| json!({"term": t.term, "master_key_label": t.master_key_label}),
                            )
                            .collect();
                        print_json(&json!({
                            "current_term": k.current_term,
                            "master_key_label": k.master_key_label,
                            "master_key_wraps": k.master_key_wraps,
                            "master_key_wrap_limit": k.master_key_wrap_limit,
                            "terms": terms,
                        }))
                    } else {
                        let mut out = format!(
                            "master key {} ({} of {} wraps)\ncurrent term {}\n",
                            k.master_key_label,
                            k.master_key_wraps,
                            k.master_key_wrap_limit,
                            k.current_term
                        );
                        for t in &k.terms {
                            out.push_str(&format!("term {}\t{}\n", t.term, t.master_key_label));
                        }
                        print_line(out.trim_end())
                    }
                }
            }
        }
        Command::Ls(args) => {
            let one_page = args.page_size.is_some() || args.page_token.is_some();
            let req = ListSecretsRequest {
                page_size: args.page_size.unwrap_or(0),
                page_token: args.page_token.unwrap_or_default(),
                name_prefix: args.prefix.unwrap_or_default(),
                environment: args.environment.unwrap_or_default(),
                owner: args.owner.unwrap_or_default(),
                labels: label_map(args.labels)?,
                ..Default::default()
            };
            let client = Client::connect(cfg).await?;
            let (secrets, next) = if one_page {
                let page = client.list_secrets(req).await?;
                (page.secrets, Some(page.next_page_token))
            } else {
                (client.list_all(req).await?, None)
            };
            if json {
                let list = Value::Array(secrets.iter().map(metadata_json).collect());
                match next {
                    Some(token) => print_json(&json!({"secrets": list, "next_page_token": token})),
                    None => print_json(&list),
                }
            } else {
                print_ls(&secrets)?;
                if let Some(token) = next.filter(|t| !t.is_empty()) {
                    eprintln!("next page token: {token}");
                }
                Ok(())
            }
        }
        Command::Keys(cmd) => run_keys(cfg, cmd, json).await,
        Command::Scan(args) => run_scan(cfg, args, json).await,
        Command::Rotate(args) => run_rotate(cfg, args, json).await,
        Command::Revoke(args) => {
            let client = Client::connect(cfg).await?;
            let resp = client
                .revoke_secret(RevokeSecretRequest {
                    name: args.name,
                    version: args.version.unwrap_or(0),
                    all_versions: args.all,
                    reason: args.reason,
                    successor_version: args.successor.unwrap_or(0),
                    expected_version: args.write.expected_version,
                    request_id: args.write.request_id.unwrap_or_default(),
                })
                .await?;
            if json {
                print_json(&json!({
                    "name": resp.name,
                    "revoked_versions": resp.revoked_versions,
                    "primary_version": resp.primary_version,
                    "revoke_time": timestamp_json(resp.revoke_time.as_ref()),
                }))
            } else {
                let list: Vec<String> = resp.revoked_versions.iter().map(u64::to_string).collect();
                writeln!(
                    io::stdout().lock(),
                    "{} revoked version(s) {}; primary now {}",
                    resp.name,
                    or_none(&list.join(", ")),
                    primary_text(resp.primary_version)
                )?;
                Ok(())
            }
        }
        Command::State(args) => {
            let client = Client::connect(cfg).await?;
            let resp = client
                .set_version_state(SetVersionStateRequest {
                    name: args.name,
                    version: args.version,
                    state: args.state as i32,
                    grace_period: args.grace.map(to_duration),
                    expected_version: args.write.expected_version,
                    request_id: args.write.request_id.unwrap_or_default(),
                })
                .await?;
            if json {
                print_json(&json!({
                    "name": resp.name,
                    "version": resp.version,
                    "state": state_name(resp.state),
                    "primary_version": resp.primary_version,
                    "grace_until": timestamp_json(resp.grace_until.as_ref()),
                }))
            } else {
                let until = resp
                    .grace_until
                    .as_ref()
                    .map(|t| format!(" until {t}"))
                    .unwrap_or_default();
                writeln!(
                    io::stdout().lock(),
                    "{} version {} is {}{until}; primary now {}",
                    resp.name,
                    resp.version,
                    state_name(resp.state),
                    primary_text(resp.primary_version)
                )?;
                Ok(())
            }
        }
        Command::Destroy(args) => {
            let client = Client::connect(cfg).await?;
            let resp = client
                .destroy_version(DestroyVersionRequest {
                    name: args.name,
                    version: args.version,
                    successor_version: args.successor.unwrap_or(0),
                    expected_version: args.write.expected_version,
                    request_id: args.write.request_id.unwrap_or_default(),
                })
                .await?;
            if json {
                print_json(&json!({
                    "name": resp.name,
                    "version": resp.version,
                    "primary_version": resp.primary_version,
                    "destroy_time": timestamp_json(resp.destroy_time.as_ref()),
                }))
            } else {
                writeln!(
                    io::stdout().lock(),
                    "{} version {} destroyed; primary now {}",
                    resp.name,
                    resp.version,
                    primary_text(resp.primary_version)
                )?;
                Ok(())
            }
        }
        Command::Watch(args) => {
            let mut held: Vec<HeldSecret> = Vec::new();
            for (name, version, state) in args.held {
                let v = HeldVersion {
                    version,
                    state: state as i32,
                };
                match held.iter_mut().find(|h| h.name == name) {
                    Some(h) => h.versions.push(v),
                    None => held.push(HeldSecret {
                        name,
                        versions: vec![v],
                    }),
                }
            }
            let client = Client::connect(cfg).await?;
            let mut stream = client
                .watch_secrets(WatchSecretsRequest {
                    names: args.names,
                    name_prefix: args.prefix.unwrap_or_default(),
                    held,
                    sync_only: args.once,
                })
                .await?;
            while let Some(event) = stream.next().await {
                print_event(&event?, json)?;
            }
            if args.once {
                Ok(())
            } else {
                Err(Failure::Sdk(Error::Status {
                    code: Code::Unavailable,
                    message: "the server ended the watch".into(),
                }))
            }
        }
        Command::Audit(AuditCommand::Tail(args)) => {
            let (from_seq, last) = match args.from {
                Some(from) => (from, 0),
                None => (0, args.last.unwrap_or(10)),
            };
            let req = StreamAuditRequest {
                from_seq,
                follow: args.follow,
                last,
                identity: args.identity.unwrap_or_default(),
                name_prefix: args.prefix.unwrap_or_default(),
                method: args.method.unwrap_or_default(),
                outcome: args.outcome.unwrap_or_default(),
            };
            let client = Client::connect(cfg).await?;
            let mut stream = client.stream_audit(req).await?;
            while let Some(msg) = stream.message().await.map_err(Error::from)? {
                print_audit_item(msg.item, json)?;
            }
            Ok(())
        }
        Command::Audit(AuditCommand::Verify(args)) => {
            let client = Client::connect(cfg).await?;
            let v = client.verify_audit_log(args.from, args.to).await?;
            if json {
                print_json(&verification_json(&v))?;
            } else {
                print_verification(&v)?;
            }
            if v.ok {
                Ok(())
            } else {
                Err(Failure::Reported)
            }
        }
    }
}

/// Prints one stream item: a record line on stdout, or a gap (stderr; a JSON line with --json).
fn print_audit_item(item: Option<stream_audit_response::Item>, json: bool) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match item {
        Some(stream_audit_response::Item::Record(r)) if json => {
            writeln!(out, "{}", audit_record_json(&r))?
        }
        Some(stream_audit_response::Item::Record(r)) => writeln!(out, "{}", audit_line(&r))?,
        Some(stream_audit_response::Item::Gap(g)) if json => writeln!(
            out,
            "{}",
            json!({"gap": {"from_seq": g.from_seq, "to_seq": g.to_seq, "pruned": g.pruned}})
        )?,
        Some(stream_audit_response::Item::Gap(g)) => {
            let why = if g.pruned {
                "were deleted by retention before they were read"
            } else {
                "are missing or unreadable (run `wardctl audit verify`)"
            };
            eprintln!("warning: records {}..{} {why}", g.from_seq, g.to_seq);
        }
        None => {}
    }
    // Followers read this live: one line at a time.
    out.flush()?;
    Ok(())
}

/// The one-line form of an audit record.
fn audit_line(r: &AuditRecord) -> String {
    let mut cols = vec![
        r.seq.to_string(),
        timestamp_text(r.time.as_ref()),
        or_dash(&r.identity),
        or_dash(&r.peer),
        r.method.clone(),
    ];
    match AuditRecordKind::try_from(r.kind) {
        Ok(AuditRecordKind::Checkpoint) => cols.push(format!("covers={}", r.checkpoint_covers_seq)),
        Ok(AuditRecordKind::Prune) => cols.push(format!("below={}", r.pruned_below_seq)),
        _ => {
            let targets: Vec<String> = r
                .targets
                .iter()
                .map(|t| {
                    let mut s = format!("{}@{}", t.name, t.version);
                    if t.code != r.code {
                        s.push(':');
                        s.push_str(code_name(Code::from_i32(t.code)));
                    }
                    s
                })
                .collect();
            cols.push(or_dash(&targets.join(",")));
        }
    }
    cols.push(r.code_name.clone());
    if !r.request_id.is_empty() {
        cols.push(format!("request_id={}", r.request_id));
    }
    if !r.key_id.is_empty() {
        cols.push(format!("key_id={}", r.key_id));
    }
    one_line(&cols.join(" "))
}

/// The JSON form of an audit record.
fn audit_record_json(r: &AuditRecord) -> Value {
    let kind = AuditRecordKind::try_from(r.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("AUDIT_RECORD_KIND_")
                .to_owned()
        })
        .unwrap_or_else(|_| format!("UNKNOWN({})", r.kind));
    let targets: Vec<Value> = r
        .targets
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "version": t.version,
                "code": code_name(Code::from_i32(t.code)),
            })
        })
        .collect();
    json!({
        "seq": r.seq,
        "time": timestamp_json(r.time.as_ref()),
        "kind": kind,
        "identity": r.identity,
        "peer": r.peer,
        "method": r.method,
        "targets": targets,
        "code": r.code_name,
        "request_id": r.request_id,
        "key_id": r.key_id,
        "prev_hash": hex(&r.prev_hash),
        "hash": hex(&r.hash),
        "checkpoint_covers_seq": r.checkpoint_covers_seq,
        "pruned_below_seq": r.pruned_below_seq,
    })
}

/// The JSON form of a verification.
fn verification_json(v: &VerifyAuditLogResponse) -> Value {
    json!({
        "ok": v.ok,
        "from_seq": v.from_seq,
        "to_seq": v.to_seq,
        "records_checked": v.records_checked,
        "checkpoints_verified": v.checkpoints_verified,
        "signed_through_seq": v.signed_through_seq,
        "oldest_seq": v.oldest_seq,
        "head_seq": v.head_seq,
        "first_broken": v.first_broken.as_ref().map(|b| json!({
            "seq": b.seq,
            "problem": problem_name(b.problem),
            "reason": b.reason,
        })),
    })
}

/// Prints the human form of a verification.
fn print_verification(v: &VerifyAuditLogResponse) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match &v.first_broken {
        None => writeln!(
            out,
            "ok: records {}..{} ({} chained, {} checkpoints verified, signed through {}); oldest {}, head {}",
            v.from_seq,
            v.to_seq,
            v.records_checked,
            v.checkpoints_verified,
            v.signed_through_seq,
            v.oldest_seq,
            v.head_seq
        )?,
        Some(b) => writeln!(
            out,
            "BROKEN at record {} ({}): {}",
            b.seq,
            problem_name(b.problem),
            one_line(&b.reason)
        )?,
    }
    Ok(())
}

/// An audit problem without its `AUDIT_PROBLEM_` prefix, e.g. `ALTERED`.
fn problem_name(p: i32) -> String {
    match AuditProblem::try_from(p) {
        Ok(p) => p
            .as_str_name()
            .trim_start_matches("AUDIT_PROBLEM_")
            .to_owned(),
        Err(_) => format!("UNKNOWN({p})"),
    }
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The text itself, or "-" when empty.
fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// Runs a `keys` command.
async fn run_keys(
    cfg: ward_client::ClientConfig,
    cmd: KeysCommand,
    json: bool,
) -> Result<(), Failure> {
    match cmd {
        KeysCommand::Verify(args) => {
            let key = read_key(args.key_file.as_deref())?;
            let client = Client::connect(cfg).await?;
            let resp = client
                .verify_key(VerifyKeyRequest {
                    api_key: key.to_string(),
                    required_scopes: args.scopes,
                    client_ip: args.ip.unwrap_or_default(),
                    cost: args.cost,
                    environment: args.environment.unwrap_or_default(),
                    endpoint: args.endpoint.unwrap_or_default(),
                })
                .await?;
            if json {
                print_json(&verify_json(&resp))?;
            } else {
                print_verify(&resp)?;
            }
            if resp.valid {
                Ok(())
            } else {
                Err(Failure::Found)
            }
        }
        KeysCommand::Policy(args) => {
            let p = &args.policy;
            let mut mask = Vec::new();
            if !args.scopes.is_empty() || args.no_scopes {
                mask.push("scopes");
            }
            if !p.cidrs.is_empty() || args.no_cidrs {
                mask.push("allowed_cidrs");
            }
            if p.rate_limit.is_some() || args.no_rate_limit {
                mask.push("rate_limit");
            }
            if p.quota.is_some() || args.no_quota {
                mask.push("quota");
            }
            if args.expires.is_some() || args.no_expiry {
                mask.push("expire_time");
            }
            if mask.is_empty() {
                return Err(Failure::Usage(
                    "nothing to change: give --scope, --cidr, --rate-limit, --quota, --expires or a --no-… flag".into(),
                ));
            }
            let req = UpdateKeyPolicyRequest {
                name: args.name,
                policy: Some(KeyPolicy {
                    scopes: args.scopes.clone(),
                    allowed_cidrs: p.cidrs.clone(),
                    rate_limit: p.rate(),
                    quota: p.quota(),
                    expire_time: args.expires,
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: mask.iter().map(|s| s.to_string()).collect(),
                }),
                request_id: args.request_id.unwrap_or_default(),
            };
            let client = Client::connect(cfg).await?;
            let resp = client.update_key_policy(req).await?;
            let policy = resp.policy.unwrap_or_default();
            if json {
                print_json(&json!({
                    "name": resp.name,
                    "policy": policy_json(&policy),
                    "update_time": timestamp_json(resp.update_time.as_ref()),
                }))
            } else {
                let mut out = io::stdout().lock();
                writeln!(out, "{}: policy updated ({})", resp.name, mask.join(", "))?;
                for (k, v) in policy_lines(&policy) {
                    writeln!(out, "  {k:<12} {v}")?;
                }
                Ok(())
            }
        }
        KeysCommand::Usage(args) => {
            let client = Client::connect(cfg).await?;
            let resp = client.get_key_usage(args.name, args.version).await?;
            if json {
                print_json(&usage_json(&resp))
            } else {
                print_usage(&resp)
            }
        }
        KeysCommand::Stale(args) => {
            let client = Client::connect(cfg).await?;
            let secrets = client
                .list_all(ListSecretsRequest {
                    name_prefix: args.prefix.unwrap_or_default(),
                    environment: args.environment.unwrap_or_default(),
                    unused_keys: true,
                    unused_days: args.days,
                    ..Default::default()
                })
                .await?;
            if json {
                return print_json(&Value::Array(secrets.iter().map(metadata_json).collect()));
            }
            let mut rows = vec![[
                "NAME".to_owned(),
                "ENV".to_owned(),
                "OWNER".to_owned(),
                "CREATED".to_owned(),
                "LAST USED".to_owned(),
            ]];
            rows.extend(secrets.iter().map(|m| {
                [
                    m.name.clone(),
                    m.environment.clone(),
                    m.owner.clone(),
                    timestamp_text(m.create_time.as_ref()),
                    m.last_used_time
                        .as_ref()
                        .map_or_else(|| "never".to_owned(), ToString::to_string),
                ]
            }));
            write_table(&mut io::stdout().lock(), &rows)?;
            eprintln!(
                "{} API keys unused for {} days or never used",
                secrets.len(),
                args.days
            );
            Ok(())
        }
    }
}

/// Runs `scan`.
async fn run_scan(
    cfg: ward_client::ClientConfig,
    args: ScanArgs,
    json: bool,
) -> Result<(), Failure> {
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.paths
    };
    for p in &paths {
        if !p.exists() {
            return Err(Failure::Usage(format!(
                "{}: no such file or directory",
                p.display()
            )));
        }
    }
    let mut findings = Vec::new();
    let summary = ward_client::scan::scan_paths(&paths, |f| findings.push(f));
    for (path, err) in &summary.errors {
        eprintln!("warning: {}: {err}", path.display());
    }
    let check = args.check || args.revoke;
    // One verification per distinct key (a key pasted in ten places is asked about once).
    let mut verdicts: HashMap<String, Result<VerifyKeyResponse, String>> = HashMap::new();
    let mut client = None;
    if check && !findings.is_empty() {
        let client = client.insert(Client::connect(cfg).await?);
        for f in &findings {
            if verdicts.contains_key(f.key.expose()) {
                continue;
            }
            let v = client
                .verify_key(VerifyKeyRequest {
                    api_key: f.key.expose().to_owned(),
                    cost: Some(0),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("{}: {}", code_name(e.code()), e.message()));
            verdicts.insert(f.key.expose().to_owned(), v);
        }
    }
    let status = |key: &str| -> (String, Standing) {
        match verdicts.get(key) {
            None => ("unchecked".into(), Standing::Unchecked),
            Some(Ok(v)) => {
                let standing = Standing::of(v.result);
                let what = if v.name.is_empty() {
                    result_name(v.result)
                } else {
                    format!("{} ({}@{})", result_name(v.result), v.name, v.version)
                };
                let text = match standing {
                    Standing::Live => format!("LIVE {what}"),
                    Standing::CannotTell if v.result == VerifyResult::NotFound as i32 => format!(
                        "CANNOT TELL {what} (never issued here, or this identity may not verify \
                         it)"
                    ),
                    Standing::CannotTell => format!("CANNOT TELL {what}"),
                    _ => what,
                };
                (text, standing)
            }
            // Could not tell: a broken check never passes a leak.
            Some(Err(e)) => (
                format!("CANNOT TELL: check failed: {e}"),
                Standing::CannotTell,
            ),
        }
    };
    let (mut live, mut unknown) = (0, 0);
    let mut rows = Vec::new();
    let mut out = io::stdout().lock();
    for f in &findings {
        let (what, standing) = status(f.key.expose());
        let counts_live = matches!(standing, Standing::Live | Standing::Unchecked);
        if counts_live {
            live += 1;
        } else if standing == Standing::CannotTell {
            unknown += 1;
        }
        if json {
            rows.push(json!({
                "path": f.path.display().to_string(),
                "line": f.line,
                "column": f.column,
                "preview": f.key.redacted(),
                "status": what,
                "standing": standing.name(),
                "live": counts_live,
            }));
        } else {
            writeln!(
                out,
                "{}:{}:{}: {}\t{what}",
                f.path.display(),
                f.line,
                f.column,
                f.key.redacted()
            )?;
        }
    }
    drop(out);
    if json {
        print_json(&Value::Array(rows))?;
    }
    eprintln!(
        "scanned {} files ({} skipped): {} keys found{}",
        summary.files,
        summary.skipped,
        findings.len(),
        if check {
            format!(", {live} live, {unknown} cannot tell")
        } else {
            String::new()
        }
    );
    if args.revoke && live > 0 {
        if let Some(client) = &client {
            revoke_found(client, &findings, &verdicts, args.yes).await?;
        }
    }
    if live > 0 || unknown > 0 {
        Err(Failure::Found)
    } else {
        Ok(())
    }
}

/// Revokes, after confirmation, the version behind each live key found (each once). A key that
/// is its secret's PRIMARY is left alone with a hint: revoking it needs a successor, which only
/// a rotation can make, and choosing to rotate is the owner's call.
async fn revoke_found(
    client: &Client,
    findings: &[ward_client::scan::Finding],
    verdicts: &HashMap<String, Result<VerifyKeyResponse, String>>,
    yes: bool,
) -> Result<(), Failure> {
    if !yes && !io::stdin().is_terminal() {
        return Err(Failure::Usage(
            "--revoke asks before each revocation; without a terminal, pass --yes".into(),
        ));
    }
    let mut done = std::collections::HashSet::new();
    for f in findings {
        let Some(Ok(v)) = verdicts.get(f.key.expose()) else {
            continue;
        };
        if Standing::of(v.result) != Standing::Live
            || v.name.is_empty()
            || !done.insert((v.name.clone(), v.version))
        {
            continue;
        }
        let at = format!("{}:{}", f.path.display(), f.line);
        if !yes {
            eprint!("revoke {}@{} (found at {at})? [y/N] ", v.name, v.version);
            let mut answer = String::new();
            io::stdin().read_line(&mut answer)?;
            if !answer.trim().eq_ignore_ascii_case("y") {
                eprintln!("skipped {}@{}", v.name, v.version);
                continue;
            }
        }
        let req = RevokeSecretRequest {
            name: v.name.clone(),
            version: v.version,
            reason: format!("leaked: found by wardctl scan at {at}"),
            ..Default::default()
        };
        match client.revoke_secret(req).await {
            Ok(_) => eprintln!("revoked {}@{}", v.name, v.version),
            Err(e) if e.code() == Code::FailedPrecondition => eprintln!(
                "not revoked {}@{}: {}; rotate it first (wardctl rotate {}), then revoke \
                 version {}",
                v.name,
                v.version,
                e.message(),
                v.name,
                v.version
            ),
            Err(e) => eprintln!(
                "not revoked {}@{}: {}: {}",
                v.name,
                v.version,
                code_name(e.code()),
                e.message()
            ),
        }
    }
    Ok(())
}

/// Reads a key from a file or stdin, trimmed.
fn read_key(path: Option<&Path>) -> Result<Zeroizing<String>, Failure> {
    let raw = read_value(path)?;
    let text = std::str::from_utf8(&raw)
        .map_err(|_| Failure::Usage("the key is not UTF-8 text".into()))?;
    Ok(Zeroizing::new(text.trim().to_owned()))
}

/// A verify result without its `VERIFY_RESULT_` prefix, e.g. `VALID`.
fn result_name(r: i32) -> String {
    match VerifyResult::try_from(r) {
        Ok(v) => v
            .as_str_name()
            .trim_start_matches("VERIFY_RESULT_")
            .to_owned(),
        Err(_) => format!("UNKNOWN({r})"),
    }
}

/// A protobuf duration.
fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Human text of a protobuf duration, e.g. `1.5s`.
fn duration_text(d: Option<&prost_types::Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| {
            let ms = d.seconds * 1000 + i64::from(d.nanos) / 1_000_000;
            if ms % 1000 == 0 {
                format!("{}s", ms / 1000)
            } else {
                format!("{ms}ms")
            }
        },
    )
}

/// Parses a span: a number with a unit ms, s, m, h or d (a bare number is seconds).
fn parse_span(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid span {s:?} (examples: 500ms, 30s, 5m, 12h, 90d)"))?;
    let ms = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m, h or d)")),
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("span {s:?} is too long"))
}

/// Parses a rate: `N/PERIOD` (`100/s`, `6000/1m`, `10/500ms`).
fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let (n, period) = s
        .split_once('/')
        .ok_or_else(|| format!("invalid rate {s:?} (expected N/PERIOD, e.g. 100/s)"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {s:?}: {n:?} is not a number"))?;
    let period = period.trim();
    let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
        parse_span(period)?
    } else {
        parse_span(&format!("1{period}"))?
    };
    Ok((n, period))
}

/// Parses an expiry: RFC 3339, or a span from now.
fn parse_expiry(s: &str) -> Result<prost_types::Timestamp, String> {
    if let Ok(t) = s.parse::<prost_types::Timestamp>() {
        return Ok(t);
    }
    let span = parse_span(s.trim_start_matches('+'))
        .map_err(|_| format!("invalid expiry {s:?} (an RFC 3339 time or a span such as 90d)"))?;
    let at = SystemTime::now()
        .checked_add(span)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .ok_or_else(|| format!("expiry {s:?} is out of range"))?;
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(at.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

/// (field, text) lines of a key policy.
fn policy_lines(p: &KeyPolicy) -> Vec<(&'static str, String)> {
    let or_dash = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    vec![
        ("scopes", or_dash(p.scopes.clone())),
        ("cidrs", or_dash(p.allowed_cidrs.clone())),
        (
            "rate limit",
            p.rate_limit.as_ref().map_or_else(
                || "-".to_owned(),
                |r| {
                    format!(
                        "{}/{} burst {}",
                        r.requests,
                        duration_text(r.period.as_ref()),
                        r.burst
                    )
                },
            ),
        ),
        (
            "quota",
            p.quota.as_ref().map_or_else(
                || "-".to_owned(),
                |q| match &q.refill_period {
                    Some(period) => format!(
                        "{} (refilled to {} every {})",
                        q.limit,
                        q.refill,
                        duration_text(Some(period))
                    ),
                    None => q.limit.to_string(),
                },
            ),
        ),
        ("expires", timestamp_text(p.expire_time.as_ref())),
    ]
}

/// JSON of a key policy.
fn policy_json(p: &KeyPolicy) -> Value {
    json!({
        "scopes": p.scopes,
        "allowed_cidrs": p.allowed_cidrs,
        "rate_limit": p.rate_limit.as_ref().map(|r| json!({
            "requests": r.requests,
            "period": duration_text(r.period.as_ref()),
            "burst": r.burst,
        })),
        "quota": p.quota.as_ref().map(|q| json!({
            "limit": q.limit,
            "refill": q.refill,
            "refill_period": q.refill_period.as_ref().map(|d| duration_text(Some(d))),
        })),
        "expire_time": timestamp_json(p.expire_time.as_ref()),
    })
}

/// JSON of a verification.
fn verify_json(v: &VerifyKeyResponse) -> Value {
    json!({
        "valid": v.valid,
        "result": result_name(v.result),
        "key_id": v.key_id,
        "name": v.name,
        "version": v.version,
        "owner": v.owner,
        "environment": v.environment,
        "scopes": v.scopes,
        "expire_time": timestamp_json(v.expire_time.as_ref()),
        "grace_until": timestamp_json(v.grace_until.as_ref()),
        "rate_limit": v.rate_limit.as_ref().map(|r| json!({
            "limit": r.limit,
            "remaining": r.remaining,
            "reset_time": timestamp_json(r.reset_time.as_ref()),
        })),
        "quota_remaining": v.quota_remaining,
        "retry_after": v.retry_after.as_ref().map(|d| duration_text(Some(d))),
    })
}

/// The human view of a verification.
fn print_verify(v: &VerifyKeyResponse) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(out, "{}", result_name(v.result))?;
    if !v.key_id.is_empty() {
        writeln!(out, "  key id       {}", v.key_id)?;
    }
    if !v.name.is_empty() {
        writeln!(out, "  key          {} version {}", v.name, v.version)?;
        writeln!(out, "  owner        {}", v.owner)?;
        writeln!(out, "  environment  {}", v.environment)?;
        if !v.scopes.is_empty() {
            writeln!(out, "  scopes       {}", v.scopes.join(", "))?;
        }
    }
    if let Some(t) = &v.expire_time {
        writeln!(out, "  expires      {t}")?;
    }
    if let Some(t) = &v.grace_until {
        writeln!(out, "  grace until  {t}")?;
    }
    if let Some(r) = &v.rate_limit {
        writeln!(
            out,
            "  rate limit   {}/{} left, full at {}",
            r.remaining,
            r.limit,
            timestamp_text(r.reset_time.as_ref())
        )?;
    }
    if let Some(q) = v.quota_remaining {
        writeln!(out, "  quota left   {q}")?;
    }
    if let Some(d) = &v.retry_after {
        writeln!(out, "  retry after  {}", duration_text(Some(d)))?;
    }
    Ok(())
}

/// JSON of a usage report.
fn usage_json(u: &GetKeyUsageResponse) -> Value {
    json!({
        "name": u.name,
        "last_used_time": timestamp_json(u.last_used_time.as_ref()),
        "quota_remaining": u.quota_remaining,
        "versions": u.versions.iter().map(|v| json!({
            "version": v.version,
            "total": v.total,
            "last_used_time": timestamp_json(v.last_used_time.as_ref()),
            "last_client_ip": v.last_client_ip,
            "results": v.results.iter().map(|r| (result_name(r.result), Value::from(r.count))).collect::<serde_json::Map<_, _>>(),
            "endpoints": v.endpoints.iter().map(|e| (e.endpoint.clone(), Value::from(e.count))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The human view of a usage report.
fn print_usage(u: &GetKeyUsageResponse) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{}: last used {}",
        u.name,
        u.last_used_time
            .as_ref()
            .map_or_else(|| "never".to_owned(), ToString::to_string)
    )?;
    if let Some(q) = u.quota_remaining {
        writeln!(out, "quota left {q}")?;
    }
    for v in &u.versions {
        writeln!(out)?;
        writeln!(
            out,
            "version {}: {} verifications, last used {} from {}",
            v.version,
            v.total,
            v.last_used_time
                .as_ref()
                .map_or_else(|| "never".to_owned(), ToString::to_string),
            if v.last_client_ip.is_empty() {
                "-"
            } else {
                &v.last_client_ip
            }
        )?;
        for r in &v.results {
            writeln!(out, "  {:<20} {}", result_name(r.result), r.count)?;
        }
        for e in &v.endpoints {
            let tag = if e.endpoint.is_empty() {
                "(none)"
            } else {
                &e.endpoint
            };
            writeln!(out, "  endpoint {tag:<11} {}", e.count)?;
        }
    }
    Ok(())
}

/// `rotate`: reads the new value (STATIC) if one is given, rotates, prints the result.
async fn run_rotate(
    cfg: ward_client::ClientConfig,
    args: RotateArgs,
    json: bool,
) -> Result<(), Failure> {
    // API keys take no value: read one only when it is offered (a file, or a stdin that is
    // not a terminal), so `wardctl rotate api/key` at a prompt does not wait for input.
    let mut value = match &args.value_file {
        Some(p) => read_value(Some(p))?,
        None if !io::stdin().is_terminal() => read_value(None)?,
        None => Zeroizing::new(Vec::new()),
    };
    let client = Client::connect(cfg).await?;
    let req = RotateSecretRequest {
        name: args.name,
        // Moves the buffer out of its zeroizing wrapper without copying the bytes.
        value: std::mem::take(&mut *value),
        grace_period: args.grace.map(to_duration),
        expiration: args.expiry.pick(
            rotate_secret_request::Expiration::ExpireTime,
            rotate_secret_request::Expiration::Ttl,
        ),
        expected_version: args.write.expected_version,
        request_id: args.write.request_id.unwrap_or_default(),
    };
    let mut resp = client.rotate_secret(req).await?;
    let previous = match (resp.previous_version, resp.previous_grace_until.as_ref()) {
        (0, _) => "no previous PRIMARY".to_owned(),
        (v, Some(t)) => format!("version {v} stays ACTIVE until {t}"),
        (v, None) => format!("version {v} retired"),
    };
    let printed = if json {
        let mut obj = json!({
            "name": resp.name,
            "version": resp.version,
            "checksum": resp.checksum,
            "create_time": timestamp_json(resp.create_time.as_ref()),
            "previous_version": resp.previous_version,
            "previous_grace_until": timestamp_json(resp.previous_grace_until.as_ref()),
        });
        if !resp.api_key.is_empty() {
            obj["api_key"] = Value::String(resp.api_key.clone());
            obj["key_id"] = Value::String(resp.key_id.clone());
        }
        print_json(&obj)
    } else if resp.api_key.is_empty() {
        writeln!(
            io::stdout().lock(),
            "{} version {} (crc32c {:08x}); {previous}",
            resp.name,
            resp.version,
            resp.checksum
        )
        .map_err(Failure::from)
    } else {
        print_new_key(
            &resp.api_key,
            &format!(
                "rotated {} to version {} (key id {}); {previous}",
                resp.name, resp.version, resp.key_id
            ),
        )
    };
    resp.api_key.zeroize();
    printed
}

impl ExpiryArgs {
    /// The wire expiration, built with the request type's own oneof variants.
    fn pick<E>(
        &self,
        at: impl FnOnce(prost_types::Timestamp) -> E,
        ttl: impl FnOnce(prost_types::Duration) -> E,
    ) -> Option<E> {
        match (&self.expire_at, self.ttl) {
            (Some(t), _) => Some(at(*t)),
            (None, Some(d)) => Some(ttl(to_duration(d))),
            (None, None) => None,
        }
    }
}

/// A protobuf duration (millisecond precision is all the server keeps).
fn to_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_millis() * 1_000_000).unwrap_or(0),
    }
}

/// Parses a lifecycle period: what `--timeout` takes (`90`, `500ms`, `10s`, `2m`) plus hours
/// and days (`12h`, `30d`).
fn parse_period(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    for (suffix, unit) in [("h", 3600.0), ("d", 86_400.0)] {
        if let Some(num) = t.strip_suffix(suffix) {
            return match num.parse::<f64>() {
                Ok(n) if n >= 0.0 => Duration::try_from_secs_f64(n * unit)
                    .map_err(|_| format!("duration {s:?} is out of range")),
                _ => Err(format!(
                    "invalid duration {s:?} (examples: 0, 90s, 15m, 12h, 30d)"
                )),
            };
        }
    }
    parse_duration(t)
        .map_err(|_| format!("invalid duration {s:?} (examples: 0, 90s, 15m, 12h, 30d)"))
}

/// Parses an RFC 3339 time.
fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    s.parse::<prost_types::Timestamp>()
        .map_err(|_| format!("invalid time {s:?} (use RFC 3339, e.g. 2030-01-01T00:00:00Z)"))
}

/// Parses the target of `state`: primary, active or inactive.
fn parse_target_state(s: &str) -> Result<VersionState, String> {
    match s.to_ascii_lowercase().as_str() {
        "primary" => Ok(VersionState::Primary),
        "active" => Ok(VersionState::Active),
        "inactive" => Ok(VersionState::Inactive),
        _ => Err(format!(
            "{s:?}: use primary, active or inactive (revoke and destroy have their own commands)"
        )),
    }
}

/// Parses `NAME@VERSION` or `NAME@VERSION:STATE` for `watch --held`.
fn parse_held(s: &str) -> Result<(String, u64, VersionState), String> {
    let (item, state) = match s.rsplit_once(':') {
        Some((item, state)) => {
            let upper = state.to_ascii_uppercase();
            let st = VersionState::from_str_name(&format!("VERSION_STATE_{upper}"))
                .filter(|st| *st != VersionState::Unspecified)
                .ok_or_else(|| format!("{s:?}: unknown state {state:?}"))?;
            (item, st)
        }
        None => (s, VersionState::Unspecified),
    };
    match parse_batch_item(item)? {
        (_, 0) => Err(format!("{s:?}: give the version you hold as NAME@VERSION")),
        (name, version) => Ok((name, version, state)),
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "none"
    } else {
        s
    }
}

fn primary_text(v: u64) -> String {
    if v == 0 {
        "none".into()
    } else {
        format!("version {v}")
    }
}

/// A watch event type without its `WATCH_EVENT_TYPE_` prefix, e.g. `ROTATED`.
fn event_name(t: i32) -> String {
    match WatchEventType::try_from(t) {
        Ok(t) => t
            .as_str_name()
            .trim_start_matches("WATCH_EVENT_TYPE_")
            .to_owned(),
        Err(_) => format!("UNKNOWN({t})"),
    }
}

/// Prints one watch event as a line (tab-separated, or compact JSON), flushed at once.
fn print_event(e: &WatchEvent, json: bool) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    if json {
        let obj = json!({
            "type": event_name(e.r#type),
            "name": e.name,
            "version": e.version,
            "state": state_name(e.state),
            "reason": e.reason,
            "time": timestamp_json(e.time.as_ref()),
            "secret": e.secret.as_ref().map(metadata_json),
        });
        serde_json::to_writer(&mut out, &obj).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}",
            event_name(e.r#type),
            e.name,
            e.version,
            state_name(e.state),
            one_line(&e.reason)
        )?;
    }
    out.flush()?;
    Ok(())
}

/// Reads the value for `put` from a file, or from stdin when no file (or "-") is given.
fn read_value(path: Option<&Path>) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let mut buf = Zeroizing::new(Vec::new());
    match path {
        Some(p) if p != Path::new("-") => {
            let mut file = std::fs::File::open(p).map_err(|e| {
                Failure::Usage(format!("cannot read value file {}: {e}", p.display()))
            })?;
            // Size the buffer up front so it is not reallocated (leaving copies) while reading.
            if let Ok(meta) = file.metadata() {
                buf.reserve(usize::try_from(meta.len()).unwrap_or(0));
            }
            file.read_to_end(&mut buf).map_err(|e| {
                Failure::Usage(format!("cannot read value file {}: {e}", p.display()))
            })?;
        }
        _ => {
            let stdin = io::stdin();
            if stdin.is_terminal() {
                eprintln!("reading the value from stdin; end it with Ctrl-D");
            }
            stdin
                .lock()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::Usage(format!("cannot read the value from stdin: {e}")))?;
        }
    }
    Ok(buf)
}

/// Parses `KEY=VALUE` (the value may be empty or contain `=`).
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Collects labels into a map, refusing a key given twice.
fn label_map(labels: Vec<(String, String)>) -> Result<HashMap<String, String>, Failure> {
    let mut map = HashMap::with_capacity(labels.len());
    for (k, v) in labels {
        if map.contains_key(&k) {
            return Err(Failure::Usage(format!("label {k:?} given more than once")));
        }
        map.insert(k, v);
    }
    Ok(map)
}

/// Parses a batch item: `NAME` (version 0, the PRIMARY) or `NAME@VERSION`. Secret names never
/// contain `@`, so the last `@` separates the version.
fn parse_batch_item(s: &str) -> Result<(String, u64), String> {
    let (name, version) = match s.rsplit_once('@') {
        Some((name, v)) => {
            let version = v
                .parse::<u64>()
                .map_err(|_| format!("{s:?}: version after '@' must be a number"))?;
            (name, version)
        }
        None => (s, 0),
    };
    if name.is_empty() {
        return Err(format!("{s:?}: empty secret name"));
    }
    Ok((name.to_owned(), version))
}

/// A version state without its `VERSION_STATE_` prefix, e.g. `PRIMARY`.
fn state_name(state: i32) -> String {
    match VersionState::try_from(state) {
        Ok(s) => s
            .as_str_name()
            .trim_start_matches("VERSION_STATE_")
            .to_owned(),
        Err(_) => format!("UNKNOWN({state})"),
    }
}

/// A secret kind without its `SECRET_KIND_` prefix, e.g. `API_KEY`.
fn kind_name(kind: i32) -> String {
    match SecretKind::try_from(kind) {
        Ok(k) => k
            .as_str_name()
            .trim_start_matches("SECRET_KIND_")
            .to_owned(),
        Err(_) => format!("UNKNOWN({kind})"),
    }
}

/// RFC 3339 text of a timestamp, or "-" when absent.
fn timestamp_text(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(|| "-".to_owned(), ToString::to_string)
}

/// RFC 3339 string of a timestamp, or null when absent.
fn timestamp_json(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// A value for a one-line text field: itself if it is UTF-8 without control characters, else
/// `base64:` and its base64.
fn value_text(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
        _ => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(value)
        ),
    }
}

/// Replaces line breaks and tabs so a message stays on its line and in its column.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r', '\t'], " ")
}

/// JSON of a fetched secret; `value` is a string if UTF-8, else `value_base64`.
fn fetched_json(s: &FetchSecretResponse, value: &[u8]) -> Value {
    let mut obj = json!({
        "name": s.name,
        "version": s.version,
        "state": state_name(s.state),
        "checksum": s.checksum,
        "kind": kind_name(s.kind),
        "environment": s.environment,
        "create_time": timestamp_json(s.create_time.as_ref()),
    });
    let (key, text) = match std::str::from_utf8(value) {
        Ok(text) => ("value", text.to_owned()),
        Err(_) => (
            "value_base64",
            base64::engine::general_purpose::STANDARD.encode(value),
        ),
    };
    if let Value::Object(map) = &mut obj {
        map.insert(key.to_owned(), Value::String(text));
    }
    obj
}

/// JSON of a secret's metadata, versions included (ListSecrets leaves them empty).
fn metadata_json(m: &SecretMetadata) -> Value {
    let labels: serde_json::Map<String, Value> = m
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let versions: Vec<Value> = m
        .versions
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "state": state_name(v.state),
                "create_time": timestamp_json(v.create_time.as_ref()),
                "fingerprint": v.fingerprint,
                "keyring_term": v.keyring_term,
                "key_id": v.key_id,
                "grace_until": timestamp_json(v.grace_until.as_ref()),
                "expire_time": timestamp_json(v.expire_time.as_ref()),
                "state_reason": v.state_reason,
                "state_change_time": timestamp_json(v.state_change_time.as_ref()),
                "last_read_time": timestamp_json(v.last_read_time.as_ref()),
            })
        })
        .collect();
    json!({
        "name": m.name,
        "kind": kind_name(m.kind),
        "environment": m.environment,
        "owner": m.owner,
        "labels": labels,
        "description": m.description,
        "scopes": m.scopes,
        "create_time": timestamp_json(m.create_time.as_ref()),
        "update_time": timestamp_json(m.update_time.as_ref()),
        "primary_version": m.primary_version,
        "versions": versions,
        "created_by": m.created_by,
        "allowed_cidrs": m.allowed_cidrs,
        "rate_limit": m.rate_limit.as_ref().map(|r| json!({
            "requests": r.requests,
            "period": duration_text(r.period.as_ref()),
            "burst": r.burst,
        })),
        "quota": m.quota.as_ref().map(|q| json!({
            "limit": q.limit,
            "refill": q.refill,
            "refill_period": q.refill_period.as_ref().map(|d| duration_text(Some(d))),
        })),
        "last_used_time": timestamp_json(m.last_used_time.as_ref()),
        "rotation_period_seconds": m.rotation_period.as_ref().map(|d| d.seconds),
        "next_rotation_time": timestamp_json(m.next_rotation_time.as_ref()),
        "rotation_due": m.rotation_due,
        "default_grace_period_seconds": m.default_grace_period.as_ref().map(|d| d.seconds),
        "expire_time": timestamp_json(m.expire_time.as_ref()),
        "revoked": m.revoked,
        "revoke_reason": m.revoke_reason,
        "revoke_time": timestamp_json(m.revoke_time.as_ref()),
        "last_read_time": timestamp_json(m.last_read_time.as_ref()),
    })
}

/// Prints a JSON value, pretty, with a final newline.
/// Prints a new API key alone on stdout (so `KEY=$(wardctl …)` works), then `note` on stderr.
fn print_new_key(key: &str, note: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(out, "{key}")?;
    out.flush()?;
    eprintln!("{note}");
    Ok(())
}

/// Writes one line of human output.
/// Streams a backup into `file` through a private temporary file beside it, renamed into
/// place only once every chunk is on disk: an interrupted backup never looks complete.
async fn write_backup(client: &Client, file: &std::path::Path) -> Result<u64, Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    if file.exists() {
        return Err(Failure::Usage(format!(
            "{} exists; choose a new file",
            file.display()
        )));
    }
    let mut partial = file.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", partial.display())))?;
    let result = async {
        let mut stream = client.backup_stream().await?;
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await.map_err(Error::from)? {
            out.write_all(&chunk.data)?;
            bytes += chunk.data.len() as u64;
        }
        out.sync_all()?;
        std::fs::rename(&partial, file)?;
        Ok::<u64, Failure>(bytes)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn print_line(line: &str) -> Result<(), Failure> {
    writeln!(io::stdout().lock(), "{line}")?;
    Ok(())
}

fn print_json(value: &Value) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).map_err(io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

/// Prints batch results, as tab-separated lines or a JSON array; returns how many failed.
fn print_batch(results: &[BatchFetchResult], json: bool) -> Result<usize, Failure> {
    let mut failed = 0;
    let mut rows = Vec::with_capacity(results.len());
    let mut out = io::stdout().lock();
    for r in results {
        let label = format!("{}@{}", r.name, r.requested_version);
        match &r.result {
            Some(batch_fetch_result::Result::Secret(s)) if json => rows.push(json!({
                "name": r.name,
                "requested_version": r.requested_version,
                "secret": fetched_json(s, &s.value),
            })),
            Some(batch_fetch_result::Result::Secret(s)) => writeln!(
                out,
                "{label}\tok\t{}\t{}\t{}",
                s.version,
                state_name(s.state),
                value_text(&s.value)
            )?,
            other => {
                failed += 1;
                let (code, message) = match other {
                    Some(batch_fetch_result::Result::Error(e)) => (e.code, e.message.as_str()),
                    _ => (Code::Internal as i32, "server sent no result for this item"),
                };
                let code = code_name(Code::from_i32(code));
                if json {
                    rows.push(json!({
                        "name": r.name,
                        "requested_version": r.requested_version,
                        "error": {"code": code, "message": message},
                    }));
                } else {
                    writeln!(out, "{label}\terror\t{code}\t{}", one_line(message))?;
                }
            }
        }
    }
    drop(out);
    if json {
        print_json(&Value::Array(rows))?;
    }
    Ok(failed)
}

/// Prints the human view of `describe`: a field list, then a table of versions.
fn print_describe(m: &SecretMetadata) -> Result<(), Failure> {
    let mut labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let mut fields = vec![
        ("name", m.name.clone()),
        ("kind", kind_name(m.kind)),
        ("environment", or_dash(&m.environment)),
        ("owner", or_dash(&m.owner)),
        ("created by", or_dash(&m.created_by)),
        ("description", or_dash(&one_line(&m.description))),
        ("labels", or_dash(&labels.join(", "))),
    ];
    if !m.scopes.is_empty() {
        fields.push(("scopes", m.scopes.join(", ")));
    }
    if m.kind == SecretKind::ApiKey as i32 {
        let policy = KeyPolicy {
            scopes: Vec::new(),
            allowed_cidrs: m.allowed_cidrs.clone(),
            rate_limit: m.rate_limit,
            quota: m.quota,
            expire_time: m.expire_time,
        };
        fields.extend(policy_lines(&policy).into_iter().skip(1));
        fields.push((
            "last used",
            m.last_used_time
                .as_ref()
                .map_or_else(|| "never".to_owned(), ToString::to_string),
        ));
    }
    fields.push(("created", timestamp_text(m.create_time.as_ref())));
    fields.push(("updated", timestamp_text(m.update_time.as_ref())));
    fields.push(("last read", timestamp_text(m.last_read_time.as_ref())));
    fields.push(("primary", m.primary_version.to_string()));
    if let Some(d) = &m.rotation_period {
        let due = if m.rotation_due { " (DUE)" } else { "" };
        fields.push((
            "rotation",
            format!(
                "every {}s, next {}{due}",
                d.seconds,
                timestamp_text(m.next_rotation_time.as_ref())
            ),
        ));
    }
    if let Some(d) = &m.default_grace_period {
        fields.push(("grace", format!("{}s", d.seconds)));
    }
    if m.expire_time.is_some() {
        fields.push(("expires", timestamp_text(m.expire_time.as_ref())));
    }
    if m.revoked {
        fields.push((
            "revoked",
            format!(
                "{} ({})",
                one_line(&m.revoke_reason),
                timestamp_text(m.revoke_time.as_ref())
            ),
        ));
    }

    let mut out = io::stdout().lock();
    for (k, v) in &fields {
        writeln!(out, "{k:<12} {v}")?;
    }
    writeln!(out)?;
    let mut rows = vec![[
        "VERSION".to_owned(),
        "STATE".to_owned(),
        "CREATED".to_owned(),
        "FINGERPRINT".to_owned(),
        "TERM".to_owned(),
        "KEY ID".to_owned(),
        "NOTE".to_owned(),
        "LAST READ".to_owned(),
    ]];
    rows.extend(m.versions.iter().map(|v| {
        let mut note = Vec::new();
        if let Some(t) = &v.grace_until {
            note.push(format!("until {t}"));
        }
        if let Some(t) = &v.expire_time {
            note.push(format!("expires {t}"));
        }
        if !v.state_reason.is_empty() {
            note.push(one_line(&v.state_reason));
        }
        [
            v.version.to_string(),
            state_name(v.state),
            timestamp_text(v.create_time.as_ref()),
            // The first 64 bits are plenty to tell values apart at a glance; --json has all.
            v.fingerprint.chars().take(16).collect(),
            v.keyring_term.to_string(),
            or_dash(&v.key_id),
            note.join("; "),
            timestamp_text(v.last_read_time.as_ref()),
        ]
    }));
    write_table(&mut out, &rows)
}

/// Prints the human view of `ls`: one aligned line per secret.
fn print_ls(secrets: &[SecretMetadata]) -> Result<(), Failure> {
    let rows: Vec<[String; 5]> = secrets
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                kind_name(m.kind),
                m.environment.clone(),
                m.primary_version.to_string(),
                m.owner.clone(),
            ]
        })
        .collect();
    write_table(&mut io::stdout().lock(), &rows)
}

/// Writes rows as left-aligned columns separated by two spaces, without trailing blanks.
fn write_table<const N: usize>(out: &mut impl Write, rows: &[[String; N]]) -> Result<(), Failure> {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn batch_items() {
        assert_eq!(parse_batch_item("a/b").unwrap(), ("a/b".into(), 0));
        assert_eq!(parse_batch_item("a/b@7").unwrap(), ("a/b".into(), 7));
        assert_eq!(parse_batch_item("a@b@2").unwrap(), ("a@b".into(), 2));
        for bad in ["", "@3", "a@", "a@x", "a@-1", "a@1.5"] {
            assert!(parse_batch_item(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(
            parse_label("team=pay").unwrap(),
            ("team".into(), "pay".into())
        );
        assert_eq!(parse_label("k=a=b").unwrap(), ("k".into(), "a=b".into()));
        assert_eq!(parse_label("k=").unwrap(), ("k".into(), String::new()));
        assert!(parse_label("=v").is_err());
        assert!(parse_label("novalue").is_err());
        let dup = vec![("a".into(), "1".into()), ("a".into(), "2".into())];
        assert!(matches!(label_map(dup), Err(Failure::Usage(_))));
    }

    #[test]
    fn enum_names() {
        assert_eq!(state_name(VersionState::Primary as i32), "PRIMARY");
        assert_eq!(state_name(VersionState::Destroyed as i32), "DESTROYED");
        assert_eq!(state_name(42), "UNKNOWN(42)");
        assert_eq!(kind_name(SecretKind::ApiKey as i32), "API_KEY");
    }

    #[test]
    fn value_rendering() {
        assert_eq!(value_text(b"hello world"), "hello world");
        assert_eq!(value_text(b"a\nb"), "base64:YQpi");
        assert_eq!(value_text(&[0xff, 0x00]), "base64:/wA=");
        let s = FetchSecretResponse {
            name: "x".into(),
            version: 1,
            state: VersionState::Primary as i32,
            ..Default::default()
        };
        let j = fetched_json(&s, b"pw");
        assert_eq!(j["value"], "pw");
        assert_eq!(j["state"], "PRIMARY");
        assert_eq!(j["create_time"], Value::Null);
        let j = fetched_json(&s, &[0xff]);
        assert_eq!(j["value_base64"], "/w==");
        assert!(j.get("value").is_none());
    }

    #[test]
    fn audit_lines() {
        let r = AuditRecord {
            seq: 12,
            identity: "admin".into(),
            peer: "127.0.0.1:5000".into(),
            method: "BatchFetchSecrets".into(),
            kind: AuditRecordKind::Call as i32,
            targets: vec![
                ward_client::proto::AuditTarget {
                    name: "db".into(),
                    version: 3,
                    code: 0,
                },
                ward_client::proto::AuditTarget {
                    name: "gone".into(),
                    version: 0,
                    code: 5,
                },
            ],
            code: 0,
            code_name: "OK".into(),
            request_id: "r1".into(),
            ..Default::default()
        };
        assert_eq!(
            audit_line(&r),
            "12 - admin 127.0.0.1:5000 BatchFetchSecrets db@3,gone@0:NOT_FOUND OK request_id=r1"
        );
        let j = audit_record_json(&r);
        assert_eq!(j["kind"], "CALL");
        assert_eq!(j["targets"][1]["code"], "NOT_FOUND");
    }

    #[test]
    fn table_alignment() {
        let rows = vec![
            ["a".to_owned(), "bb".to_owned(), "c".to_owned()],
            ["aaa".to_owned(), "b".to_owned(), String::new()],
        ];
        let mut out = Vec::new();
        write_table(&mut out, &rows).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "a    bb  c\naaa  b\n");
    }

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
    fn periods_and_held_items() {
        assert_eq!(parse_period("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_period("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_period("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_period("1.5d").unwrap(), Duration::from_secs(129_600));
        for bad in ["", "h", "-1d", "1w", "x"] {
            assert!(parse_period(bad).is_err(), "{bad:?}");
        }
        for bad in ["a", "a@0", "a@1:gone", "a@1:unspecified", "@1"] {
            assert!(parse_held(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            event_name(WatchEventType::RotationDue as i32),
            "ROTATION_DUE"
        );
        assert_eq!(
            to_duration(Duration::from_millis(1500)),
            prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            }
        );
    }
}
