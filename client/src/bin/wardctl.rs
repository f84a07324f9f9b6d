//! `wardctl`: the command-line client of the Ward secrets vault, built on the `ward-client` SDK.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use clap::builder::FalseyValueParser;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use zeroize::{Zeroize, Zeroizing};

use ward_client::cli::ConnArgs;
use ward_client::proto::{
    batch_fetch_result, BatchFetchResult, FetchSecretResponse, IssueKeyRequest, ListSecretsRequest,
    PutSecretRequest, SecretKind, SecretMetadata, VersionState,
};
use ward_client::{code_name, Client, Code, Error};

/// Command-line client for the Ward secrets vault.
#[derive(Debug, Parser)]
#[command(
    name = "wardctl",
    version,
    about = "Command-line client for the Ward secrets vault",
    after_help = "Every call is made over mutual TLS: give --ca, --cert and --key (or WARD_CA, \
                  WARD_CERT, WARD_KEY).\n\nExit status: 0 success, 1 the server refused or \
                  could not be reached (stderr: `error: <CODE>: <message>`), 2 bad usage or \
                  configuration."
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
                let mut out = io::stdout().lock();
                writeln!(out, "{}", resp.api_key)
                    .and_then(|()| out.flush())
                    .map_err(Failure::from)
                    .map(|()| {
                        eprintln!(
                            "issued {} version {} (key id {})",
                            resp.name, resp.version, resp.key_id
                        )
                    })
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
    }
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
                "checksum": v.checksum,
                "keyring_term": v.keyring_term,
                "key_id": v.key_id,
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
    })
}

/// Prints a JSON value, pretty, with a final newline.
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
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
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
    fields.push(("created", timestamp_text(m.create_time.as_ref())));
    fields.push(("updated", timestamp_text(m.update_time.as_ref())));
    fields.push(("primary", m.primary_version.to_string()));

    let mut out = io::stdout().lock();
    for (k, v) in &fields {
        writeln!(out, "{k:<12} {v}")?;
    }
    writeln!(out)?;
    let mut rows = vec![[
        "VERSION".to_owned(),
        "STATE".to_owned(),
        "CREATED".to_owned(),
        "CRC32C".to_owned(),
        "TERM".to_owned(),
        "KEY ID".to_owned(),
    ]];
    rows.extend(m.versions.iter().map(|v| {
        [
            v.version.to_string(),
            state_name(v.state),
            timestamp_text(v.create_time.as_ref()),
            format!("{:08x}", v.checksum),
            v.keyring_term.to_string(),
            or_dash(&v.key_id),
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
        assert!(Cli::try_parse_from(["wardctl", "put", "a", "--value", "x"]).is_err());
    }
}
