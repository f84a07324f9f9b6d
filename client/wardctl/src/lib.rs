//! `wardctl`, the command-line client of the Ward secrets vault, built on the `ward-client`
//! SDK: the command line (`cli`), the commands (one module per group), how answers are printed
//! (`output`), and the leak scanner behind `wardctl scan` ([`scan`]). The connection flags
//! ([`conn`]) are shared with `ward-bench`.
#![deny(missing_docs)]

mod cli;
mod commands;
pub mod conn;
mod failure;
mod flags;
mod input;
mod output;
pub mod scan;

use std::process::ExitCode;

use clap::Parser;

/// Parses the command line, runs the command and reports how it ended: the whole of `wardctl`.
pub async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}
