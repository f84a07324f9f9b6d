//! The secret commands: `put`, `issue`, `get`, `batch-get`, `describe` and `ls`.

use std::io::{self, Write};
use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use zeroize::Zeroize;

use ward_client::proto::{
    issue_key_request, put_secret_request, IssueKeyRequest, ListSecretsRequest, PutSecretRequest,
};
use ward_client::{Client, ClientConfig};

use crate::failure::Failure;
use crate::flags::{KeyPolicyArgs, LifecycleArgs, MetaArgs};
use crate::input::{label_map, parse_batch_item, parse_label, read_value, to_duration};
use crate::output::secrets::{
    fetched_json, metadata_json, metadata_list_json, print_batch, print_describe, print_ls,
};
use crate::output::{print_json, print_new_key, timestamp_json};

/// Arguments of `put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// Secret name
    pub name: String,
    /// Read the value from this file ("-" means stdin)
    #[arg(long, value_name = "PATH")]
    pub value_file: Option<PathBuf>,
    #[command(flatten)]
    pub meta: MetaArgs,
    /// Write only if the current PRIMARY version is N (0: only if the secret does not exist)
    #[arg(long, value_name = "N")]
    pub expected_version: Option<u64>,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

/// Arguments of `issue`: the key policy flags are those of `keys policy`, and `--expires`
/// is a third way, beside `--expire-at` and `--ttl`, to give the one expiry.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("expiry").args(["expires", "expire_at", "ttl"])))]
pub struct IssueArgs {
    /// Name of the new API_KEY secret
    pub name: String,
    #[command(flatten)]
    pub meta: MetaArgs,
    #[command(flatten)]
    pub key_policy: KeyPolicyArgs,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

/// Arguments of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Secret name
    pub name: String,
    /// Version number (default 0: the PRIMARY version)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub version: u64,
}

/// Arguments of `batch-get`.
#[derive(Debug, Args)]
pub struct BatchGetArgs {
    /// Items: NAME (the PRIMARY version) or NAME@VERSION
    #[arg(required = true, value_name = "NAME[@VERSION]", value_parser = parse_batch_item)]
    pub items: Vec<(String, u64)>,
}

/// Arguments of `describe`.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Secret name
    pub name: String,
}

/// Arguments of `ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only names starting with this prefix
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Only this environment
    #[arg(long = "env", value_name = "ENV")]
    pub environment: Option<String>,
    /// Only this owner
    #[arg(long, value_name = "OWNER")]
    pub owner: Option<String>,
    /// Only secrets carrying this label, repeatable (all must match)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Fetch one page of this many secrets (1..1000) instead of following every page
    #[arg(long, value_name = "N")]
    pub page_size: Option<u32>,
    /// Fetch the one page starting at this token (from a previous page)
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
}

/// `put`: reads the value (before connecting), stores it, prints name, version and checksum.
pub async fn put(cfg: ClientConfig, args: PutArgs, json: bool) -> Result<(), Failure> {
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
        rotation_period: args.lifecycle.rotation_period.map(to_duration),
        default_grace_period: args.lifecycle.default_grace.map(to_duration),
        expiration: args.lifecycle.expiry.pick(
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

/// `issue`: has Ward generate a key and prints it once (alone on stdout, or in the JSON).
pub async fn issue(cfg: ClientConfig, args: IssueArgs, json: bool) -> Result<(), Failure> {
    let client = Client::connect(cfg).await?;
    let meta = args.meta;
    let policy = args.key_policy.policy();
    let expiration = match policy.expire_time {
        Some(at) => Some(issue_key_request::Expiration::ExpireTime(at)),
        None => args.lifecycle.expiry.pick(
            issue_key_request::Expiration::ExpireTime,
            issue_key_request::Expiration::Ttl,
        ),
    };
    let req = IssueKeyRequest {
        name: args.name,
        environment: meta.environment.unwrap_or_default(),
        owner: meta.owner.unwrap_or_default(),
        scopes: policy.scopes,
        labels: label_map(meta.labels)?,
        description: meta.description.unwrap_or_default(),
        request_id: meta.request_id.unwrap_or_default(),
        allowed_cidrs: policy.allowed_cidrs,
        rate_limit: policy.rate_limit,
        quota: policy.quota,
        rotation_period: args.lifecycle.rotation_period.map(to_duration),
        default_grace_period: args.lifecycle.default_grace.map(to_duration),
        expiration,
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

/// `get`: writes the value to stdout exactly as stored (or the JSON view).
pub async fn get(cfg: ClientConfig, args: GetArgs, json: bool) -> Result<(), Failure> {
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

/// `batch-get`: one line (or JSON item) per item; fails if any item failed.
pub async fn batch_get(cfg: ClientConfig, args: BatchGetArgs, json: bool) -> Result<(), Failure> {
    let client = Client::connect(cfg).await?;
    let resp = client.batch_fetch(args.items).await?;
    let failed = print_batch(&resp.results, json)?;
    if failed > 0 {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}

/// `describe`: metadata and versions, never a value.
pub async fn describe(cfg: ClientConfig, args: DescribeArgs, json: bool) -> Result<(), Failure> {
    let client = Client::connect(cfg).await?;
    let meta = client.describe_secret(args.name).await?;
    if json {
        print_json(&metadata_json(&meta))
    } else {
        print_describe(&meta)
    }
}

/// `ls`: every page, or the one page asked for (its next token on stderr, or in the JSON).
pub async fn ls(cfg: ClientConfig, args: LsArgs, json: bool) -> Result<(), Failure> {
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
        let list = metadata_list_json(&secrets);
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
