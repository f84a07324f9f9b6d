//! Why wardctl stopped early, and the one place that turns it into a message and an exit
//! status.

use std::io;
use std::process::ExitCode;

use ward_client::{code_name, Error};

/// Why wardctl stopped early; decides the message and the exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad input on the command line or stdin: exit 2.
    Usage(String),
    /// An SDK error: exit 2 for configuration, 1 for the server or the network.
    Sdk(Error),
    /// Writing the output failed: exit 1.
    Output(io::Error),
    /// The error was already reported (e.g. per-item in a batch): exit 1, print nothing more.
    Reported,
    /// `keys verify` found the key not valid, or `scan` found keys (with --check: live ones,
    /// or ones it cannot tell): exit 3.
    Found,
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
    pub fn report(self) -> ExitCode {
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
            Self::Found => ExitCode::from(3),
        }
    }
}
