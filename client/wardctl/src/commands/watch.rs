//! `watch`: what differs from the versions the caller holds, then live changes.

use clap::Args;

use ward_client::proto::{HeldSecret, HeldVersion, VersionState, WatchSecretsRequest};
use ward_client::{Client, ClientConfig, Code, Error};

use crate::failure::Failure;
use crate::input::parse_held;
use crate::output::secrets::print_event;

/// Arguments of `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Secrets to watch (none: every secret under --prefix)
    pub names: Vec<String>,
    /// With no names: watch every secret starting with this prefix that you may read
    #[arg(long, value_name = "PREFIX", conflicts_with = "names")]
    pub prefix: Option<String>,
    /// A version you hold, repeatable: NAME@VERSION or NAME@VERSION:STATE (e.g.
    /// db@3:primary); you are told what differs
    #[arg(long = "held", value_name = "NAME@VERSION[:STATE]", value_parser = parse_held)]
    pub held: Vec<(String, u64, VersionState)>,
    /// Exit after SYNCED instead of streaming live changes
    #[arg(long)]
    pub once: bool,
}

/// Runs `watch` until SYNCED (--once) or until the server ends the stream (an error).
pub async fn watch(cfg: ClientConfig, args: WatchArgs, json: bool) -> Result<(), Failure> {
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
