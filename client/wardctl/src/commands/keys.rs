//! The `keys` commands: `verify`, `policy`, `usage` and `stale`.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use ward_client::proto::{KeyPolicy, ListSecretsRequest, UpdateKeyPolicyRequest, VerifyKeyRequest};
use ward_client::{Client, ClientConfig};

use crate::failure::Failure;
use crate::flags::KeyPolicyArgs;
use crate::input::{parse_period, read_key, to_duration};
use crate::output::keys::{
    policy_json, policy_lines, print_usage, print_verify, usage_json, verify_json,
};
use crate::output::secrets::metadata_list_json;
use crate::output::{last_used_text, print_json, timestamp_json, timestamp_text, write_table};

/// The `keys` commands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
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

/// Arguments of `keys verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Read the key from this file ("-" or absent: stdin; surrounding whitespace is dropped)
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Scope the key must grant, repeatable
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// The end client's IP address
    #[arg(long, value_name = "IP")]
    pub ip: Option<String>,
    /// The environment the verifier serves
    #[arg(long = "env", value_name = "ENV")]
    pub environment: Option<String>,
    /// Units to charge (0: check without charging)
    #[arg(long, value_name = "N")]
    pub cost: Option<u64>,
    /// Endpoint tag for usage statistics
    #[arg(long, value_name = "TAG")]
    pub endpoint: Option<String>,
}

/// Arguments of `keys policy`: the key policy flags of `issue`, plus a `--no-…` flag to remove
/// each field.
#[derive(Debug, Args)]
pub struct KeyPolicyUpdate {
    /// Name of the API_KEY secret
    pub name: String,
    #[command(flatten)]
    pub policy: KeyPolicyArgs,
    /// Remove every scope
    #[arg(long, conflicts_with = "scopes")]
    pub no_scopes: bool,
    /// Remove every CIDR restriction
    #[arg(long, conflicts_with = "cidrs")]
    pub no_cidrs: bool,
    /// Remove the rate limit
    #[arg(long, conflicts_with = "rate_limit")]
    pub no_rate_limit: bool,
    /// Remove the quota
    #[arg(long, conflicts_with = "quota")]
    pub no_quota: bool,
    /// Remove the expiry
    #[arg(long, conflicts_with = "expires")]
    pub no_expiry: bool,
    /// Scheduled rotation period (e.g. 30d, 12h; 0 turns it off): Ward rotates the key when due
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    pub rotation_period: Option<Duration>,
    /// Turn scheduled rotation off
    #[arg(long, conflicts_with = "rotation_period")]
    pub no_rotation: bool,
    /// How long a replaced key stays valid when a rotation names no grace period
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    pub default_grace: Option<Duration>,
    /// Go back to the server's default grace period
    #[arg(long, conflicts_with = "default_grace")]
    pub no_default_grace: bool,
    /// Idempotency key: a retry does not reset the quota twice
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

impl KeyPolicyUpdate {
    /// The policy fields to change: those given a value or a `--no-…` flag.
    fn mask(&self) -> Vec<&'static str> {
        let p = &self.policy;
        [
            ("scopes", !p.scopes.is_empty() || self.no_scopes),
            ("allowed_cidrs", !p.cidrs.is_empty() || self.no_cidrs),
            ("rate_limit", p.rate_limit.is_some() || self.no_rate_limit),
            ("quota", p.quota.is_some() || self.no_quota),
            ("expire_time", p.expires.is_some() || self.no_expiry),
            (
                "rotation_period",
                self.rotation_period.is_some() || self.no_rotation,
            ),
            (
                "default_grace_period",
                self.default_grace.is_some() || self.no_default_grace,
            ),
        ]
        .into_iter()
        .filter_map(|(field, given)| given.then_some(field))
        .collect()
    }
}

/// Arguments of `keys usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Name of the API_KEY secret
    pub name: String,
    /// Only this version (default: every version)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub version: u64,
}

/// Arguments of `keys stale`.
#[derive(Debug, Args)]
pub struct StaleArgs {
    /// Unused for at least this many days
    #[arg(long, value_name = "N", default_value_t = 90,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
    /// Only names starting with this prefix
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Only this environment
    #[arg(long = "env", value_name = "ENV")]
    pub environment: Option<String>,
}

/// Runs a `keys` command.
pub async fn run(cfg: ClientConfig, cmd: KeysCommand, json: bool) -> Result<(), Failure> {
    match cmd {
        KeysCommand::Verify(args) => verify(cfg, args, json).await,
        KeysCommand::Policy(args) => policy(cfg, args, json).await,
        KeysCommand::Usage(args) => {
            let client = Client::connect(cfg).await?;
            let resp = client.get_key_usage(args.name, args.version).await?;
            if json {
                print_json(&usage_json(&resp))
            } else {
                print_usage(&resp)
            }
        }
        KeysCommand::Stale(args) => stale(cfg, args, json).await,
    }
}

/// `keys verify`: the key from a file or stdin, never the command line; exits 3 unless VALID.
async fn verify(cfg: ClientConfig, args: VerifyArgs, json: bool) -> Result<(), Failure> {
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

/// `keys policy`: changes the fields given, prints the whole new policy.
async fn policy(cfg: ClientConfig, args: KeyPolicyUpdate, json: bool) -> Result<(), Failure> {
    let mask = args.mask();
    if mask.is_empty() {
        return Err(Failure::Usage(
            "nothing to change: give --scope, --cidr, --rate-limit, --quota, --expires, \
             --rotation-period, --default-grace or a --no-… flag"
                .into(),
        ));
    }
    let policy = KeyPolicy {
        rotation_period: args.rotation_period.map(to_duration),
        default_grace_period: args.default_grace.map(to_duration),
        ..args.policy.policy()
    };
    let req = UpdateKeyPolicyRequest {
        name: args.name,
        policy: Some(policy),
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

/// `keys stale`: a table of keys unused for --days (count on stderr), or the JSON list.
async fn stale(cfg: ClientConfig, args: StaleArgs, json: bool) -> Result<(), Failure> {
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
        return print_json(&metadata_list_json(&secrets));
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
            last_used_text(m.last_used_time.as_ref()),
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
