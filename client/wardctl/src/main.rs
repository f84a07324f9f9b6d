//! `wardctl`: the command-line client of the Ward secrets vault (the tool is the library).

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    wardctl::main().await
}
