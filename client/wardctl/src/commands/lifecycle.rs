//! The lifecycle commands: `rotate`, and `revoke`, `state` and `destroy` — three changes of a
//! version's state that connect, call and print alike, so they run through one function.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};
use zeroize::{Zeroize, Zeroizing};

use ward_client::proto::{
    rotate_secret_request, DestroyVersionRequest, RevokeSecretRequest, RotateSecretRequest,
    SetVersionStateRequest, VersionState,
};
use ward_client::{Client, ClientConfig};

use crate::failure::Failure;
use crate::flags::{ExpiryArgs, WriteArgs};
use crate::input::{parse_period, parse_target_state, read_value, to_duration};
use crate::output::{
    or_none, primary_text, print_answer, print_json, print_new_key, state_name, timestamp_json,
};

/// Arguments of `rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Secret name
    pub name: String,
    /// STATIC secrets: read the new value from this file ("-" means stdin)
    #[arg(long, value_name = "PATH")]
    pub value_file: Option<PathBuf>,
    /// How long the previous PRIMARY stays ACTIVE (0: retire it at once) [default: the
    /// secret's, else the server's]
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    pub grace: Option<Duration>,
    #[command(flatten)]
    pub expiry: ExpiryArgs,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// Arguments of `revoke`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["version", "all"])))]
pub struct RevokeArgs {
    /// Secret name
    pub name: String,
    /// The version to revoke
    #[arg(long, value_name = "N")]
    pub version: Option<u64>,
    /// Revoke the whole secret (every version; it accepts no new one)
    #[arg(long)]
    pub all: bool,
    /// Why (required; recorded and shown to later callers, so never put a secret in it)
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// When revoking the PRIMARY: the ACTIVE version that takes its place
    #[arg(long, value_name = "N")]
    pub successor: Option<u64>,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// Arguments of `state`.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// Secret name
    pub name: String,
    /// The version to move
    pub version: u64,
    /// primary, active or inactive
    #[arg(value_parser = parse_target_state)]
    pub state: VersionState,
    /// active: how long from now; primary: how long the replaced PRIMARY stays ACTIVE
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    pub grace: Option<Duration>,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// Arguments of `destroy`.
#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// Secret name
    pub name: String,
    /// The version to destroy
    pub version: u64,
    /// When destroying the PRIMARY: the ACTIVE version that takes its place
    #[arg(long, value_name = "N")]
    pub successor: Option<u64>,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// A change of versions' state that answers with the secret's PRIMARY afterwards.
#[derive(Debug)]
pub enum Change {
    /// `revoke`
    Revoke(RevokeArgs),
    /// `state`
    State(StateArgs),
    /// `destroy`
    Destroy(DestroyArgs),
}

/// `revoke`, `state` or `destroy`: makes the call, prints its answer (JSON or one line).
pub async fn change(cfg: ClientConfig, change: Change, json: bool) -> Result<(), Failure> {
    let client = Client::connect(cfg).await?;
    let (value, text) = match change {
        Change::Revoke(args) => {
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
            let list: Vec<String> = resp.revoked_versions.iter().map(u64::to_string).collect();
            (
                json!({
                    "name": resp.name,
                    "revoked_versions": resp.revoked_versions,
                    "primary_version": resp.primary_version,
                    "revoke_time": timestamp_json(resp.revoke_time.as_ref()),
                }),
                format!(
                    "{} revoked version(s) {}; primary now {}",
                    resp.name,
                    or_none(&list.join(", ")),
                    primary_text(resp.primary_version)
                ),
            )
        }
        Change::State(args) => {
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
            let until = resp
                .grace_until
                .as_ref()
                .map(|t| format!(" until {t}"))
                .unwrap_or_default();
            (
                json!({
                    "name": resp.name,
                    "version": resp.version,
                    "state": state_name(resp.state),
                    "primary_version": resp.primary_version,
                    "grace_until": timestamp_json(resp.grace_until.as_ref()),
                }),
                format!(
                    "{} version {} is {}{until}; primary now {}",
                    resp.name,
                    resp.version,
                    state_name(resp.state),
                    primary_text(resp.primary_version)
                ),
            )
        }
        Change::Destroy(args) => {
            let resp = client
                .destroy_version(DestroyVersionRequest {
                    name: args.name,
                    version: args.version,
                    successor_version: args.successor.unwrap_or(0),
                    expected_version: args.write.expected_version,
                    request_id: args.write.request_id.unwrap_or_default(),
                })
                .await?;
            (
                json!({
                    "name": resp.name,
                    "version": resp.version,
                    "primary_version": resp.primary_version,
                    "destroy_time": timestamp_json(resp.destroy_time.as_ref()),
                }),
                format!(
                    "{} version {} destroyed; primary now {}",
                    resp.name,
                    resp.version,
                    primary_text(resp.primary_version)
                ),
            )
        }
    };
    print_answer(json, &value, &text)
}

/// `rotate`: reads the new value (STATIC) if one is given, rotates, prints the result.
pub async fn rotate(cfg: ClientConfig, args: RotateArgs, json: bool) -> Result<(), Failure> {
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
