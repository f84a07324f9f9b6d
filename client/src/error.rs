//! The SDK's one error type, and the single place where tonic statuses and transport errors
//! are turned into it.

use std::error::Error as StdError;
use std::fmt::Write as _;

use tonic::Code;
use ward::status::status_code_name as code_name;

/// Everything a Ward SDK call can fail with.
///
/// No variant ever carries a secret value or key: server messages describe the input (the
/// server's contract), transport and configuration messages name files and addresses only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with a gRPC status other than OK, or the call ran out of time
    /// (`DEADLINE_EXCEEDED`, produced by the SDK's per-call timeout).
    #[error("{}: {message}", code_name(*code))]
    Status {
        /// The gRPC status code.
        code: Code,
        /// The server's description of what was wrong with the request.
        message: String,
    },
    /// The call got no gRPC answer: connection refused or reset, TLS handshake failure,
    /// HTTP/2 error. Reported as `UNAVAILABLE` by [`Error::code`].
    #[error("transport error: {0}")]
    Transport(String),
    /// The client configuration is unusable: missing or unreadable file, malformed PEM, bad
    /// address. Reported as `INVALID_ARGUMENT` by [`Error::code`].
    #[error("configuration error: {0}")]
    Config(String),
    /// The [`crate::Cache`] could not reach the server for longer than its `max_stale` and no
    /// longer serves what it holds. Reported as `UNAVAILABLE` by [`Error::code`].
    #[error("stale: {0}")]
    Stale(String),
}

impl Error {
    /// The gRPC code that best describes this error (`UNAVAILABLE` for transport failures,
    /// `INVALID_ARGUMENT` for configuration errors).
    pub fn code(&self) -> Code {
        match self {
            Self::Status { code, .. } => *code,
            Self::Transport(_) | Self::Stale(_) => Code::Unavailable,
            Self::Config(_) => Code::InvalidArgument,
        }
    }

    /// The human-readable part of the error, without the code.
    pub fn message(&self) -> &str {
        match self {
            Self::Status { message, .. } => message,
            Self::Transport(message) | Self::Config(message) | Self::Stale(message) => message,
        }
    }

    /// Builds a configuration error.
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::Config(message.into())
    }
}

impl From<tonic::Status> for Error {
    /// A status the server sent has no `source`; one tonic made up locally from a failed
    /// connection or a broken HTTP/2 stream always has one. That is the only reliable way to
    /// tell "the server said UNKNOWN" from "the connection died", so it is what decides
    /// `Status` versus `Transport`.
    fn from(status: tonic::Status) -> Self {
        if StdError::source(&status).is_some() {
            Self::Transport(describe_chain(status.message(), StdError::source(&status)))
        } else {
            Self::Status {
                code: status.code(),
                message: status.message().to_owned(),
            }
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(err: tonic::transport::Error) -> Self {
        Self::Transport(transport_causes(&err))
    }
}

/// What went wrong in a tonic transport error: its own text is only "transport error", so the
/// causes are the useful part.
pub(crate) fn transport_causes(err: &tonic::transport::Error) -> String {
    let causes = describe_chain("", err.source());
    if causes.is_empty() {
        err.to_string()
    } else {
        causes
    }
}

/// Joins an error message with the messages of its source chain, skipping repeats (tonic
/// often copies a source's text into the outer message).
pub(crate) fn describe_chain(head: &str, mut source: Option<&(dyn StdError + 'static)>) -> String {
    let mut out = head.to_owned();
    while let Some(err) = source {
        let text = err.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            let _ = write!(out, "{text}");
        }
        source = err.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn server_status_stays_a_status() {
        let err = Error::from(tonic::Status::not_found("secret a/b not found"));
        assert_eq!(
            err,
            Error::Status {
                code: Code::NotFound,
                message: "secret a/b not found".into()
            }
        );
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(err.to_string(), "NOT_FOUND: secret a/b not found");
    }

    #[test]
    fn locally_made_status_is_transport() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = tonic::Status::from_error(Box::new(io));
        let err = Error::from(status);
        assert!(matches!(err, Error::Transport(_)), "{err:?}");
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.to_string().contains("refused"));
    }

    #[test]
    fn chain_skips_repeated_text() {
        let io = std::io::Error::other("connection reset");
        assert_eq!(
            describe_chain("connection reset", Some(&io)),
            "connection reset"
        );
        assert_eq!(
            describe_chain("h2 error", Some(&io)),
            "h2 error: connection reset"
        );
    }

    #[test]
    fn config_error_code_and_display() {
        let err = Error::config("cannot read CA file /x: not found");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "cannot read CA file /x: not found");
        assert!(err.to_string().starts_with("configuration error: "));
    }
}
