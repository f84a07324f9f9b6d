//! The commands, one module per group, each with its arguments and what it runs; [`run`]
//! dispatches a parsed command line to them.

pub mod admin;
pub mod audit;
pub mod backup;
pub mod keys;
pub mod lifecycle;
pub mod scan;
pub mod secrets;
pub mod watch;

use crate::cli::{Cli, Command};
use crate::failure::Failure;
use lifecycle::Change;

/// Runs one command. Configuration is checked before any input is read or connection made.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let cfg = cli.conn.to_config()?;
    let json = cli.json;
    match cli.command {
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
    }
}
