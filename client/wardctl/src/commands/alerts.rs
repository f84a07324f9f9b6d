//! The `alerts` commands: `tail` (print and follow alerts) and `test` (send a signed test
//! event to a configured webhook).

use clap::{Args, Subcommand};

use ward_client::proto::WatchAlertsRequest;
use ward_client::{Client, ClientConfig, Error};

use crate::failure::Failure;
use crate::output::alerts::{print_alert_item, test_json};
use crate::output::{print_answer, print_line};

/// The `alerts` subcommands.
#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// Print alerts, one line each
    ///
    /// Prints every alert kept (or from --from SEQ on) and, with --follow, new ones as they
    /// are raised until interrupted. Each line, tab-separated: seq, time, type,
    /// `name@version`, `key_id=`, `id=` (the webhook-id its deliveries carry) and the data
    /// as JSON. With --json: one JSON object per line. Needs the `audit` verb on the secrets
    /// concerned.
    Tail(AlertsTailArgs),
    /// Send a signed `ward.test` event to a webhook URL configured on the server
    ///
    /// Prints `delivered: HTTP 200, id msg_...` and exits 0 when the endpoint answered 2xx;
    /// otherwise prints why and exits 1. A success enables an endpoint that was disabled after
    /// failing too long. Needs the `admin` verb.
    Test(AlertsTestArgs),
}

/// Arguments of `alerts tail`.
#[derive(Debug, Args)]
pub struct AlertsTailArgs {
    /// Start at this audit sequence number (0: the oldest kept)
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub from: u64,
    /// Keep printing new alerts as they are raised
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only this type, or family such as `key.*` (repeatable)
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Only alerts about a secret whose name starts with this
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
}

/// Arguments of `alerts test`.
#[derive(Debug, Args)]
pub struct AlertsTestArgs {
    /// The webhook's URL, as in the server's [[alerts.webhooks]]
    pub url: String,
}

/// Runs an `alerts` command.
pub async fn run(cfg: ClientConfig, cmd: AlertsCommand, json: bool) -> Result<(), Failure> {
    let client = Client::connect(cfg).await?;
    match cmd {
        AlertsCommand::Tail(args) => {
            let req = WatchAlertsRequest {
                from_seq: args.from,
                follow: args.follow,
                types: args.types,
                name_prefix: args.prefix.unwrap_or_default(),
            };
            let mut stream = client.watch_alerts(req).await?;
            while let Some(msg) = stream.message().await.map_err(Error::from)? {
                print_alert_item(msg.item, json)?;
            }
            Ok(())
        }
        AlertsCommand::Test(args) => {
            let t = client.test_webhook(args.url).await?;
            let text = if t.delivered {
                format!("delivered: HTTP {}, id {}", t.http_status, t.id)
            } else {
                format!("not delivered: {} (id {})", t.error, t.id)
            };
            if json {
                print_answer(true, &test_json(&t), &text)?;
            } else if t.delivered {
                print_line(&text)?;
            } else {
                eprintln!("error: {text}");
            }
            if t.delivered {
                Ok(())
            } else {
                Err(Failure::Reported)
            }
        }
    }
}
