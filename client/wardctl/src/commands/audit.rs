//! The `audit` commands: `tail` (print and follow records) and `verify` (check the chain).

use clap::{Args, Subcommand};

use ward_client::proto::StreamAuditRequest;
use ward_client::{Client, ClientConfig, Error};

use crate::failure::Failure;
use crate::output::audit::{print_audit_item, print_verification, verification_json};
use crate::output::print_json;

/// The `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
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
pub struct TailArgs {
    /// Start at this sequence number (0: the oldest record kept)
    #[arg(long, value_name = "SEQ", conflicts_with = "last")]
    pub from: Option<u64>,
    /// Print the last N records, this call's own included [default: 10]
    #[arg(long, value_name = "N")]
    pub last: Option<u32>,
    /// Keep printing new records as they happen
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only callers whose identity matches this glob
    #[arg(long, value_name = "GLOB")]
    pub identity: Option<String>,
    /// Only records touching a secret whose name starts with this
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Only this method, e.g. FetchSecret
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,
    /// Only these outcomes: OK, ERROR or a code name such as PERMISSION_DENIED
    #[arg(long, value_name = "OUTCOME")]
    pub outcome: Option<String>,
}

/// Arguments of `audit verify`.
#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// First record to check (default: the oldest kept)
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub from: u64,
    /// Last record to check (default: the newest)
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub to: u64,
}

/// Runs an `audit` command.
pub async fn run(cfg: ClientConfig, cmd: AuditCommand, json: bool) -> Result<(), Failure> {
    match cmd {
        AuditCommand::Tail(args) => {
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
        AuditCommand::Verify(args) => {
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
