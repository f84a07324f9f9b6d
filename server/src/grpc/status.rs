//! The one conversion from the server's errors to gRPC status. The code is decided by
//! [`Error::code`]; this file turns it into a `tonic::Status` and keeps internal details in the
//! log, not on the wire.

use crate::error::{Code, Error};

/// Longest status message sent. Messages travel in the `grpc-message` header, which h2
/// limits: one that echoed a large input broke the reply (the caller saw RESOURCE_EXHAUSTED or
/// CANCELLED instead of the real code). Each message quotes caller input only as an excerpt
/// (`model::excerpt`); this cap is the safety net for any that does not.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// The wire status for an error.
pub fn to_status(e: Error) -> tonic::Status {
    let mut message = match &e {
        Error::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            e.to_string()
        }
        _ => e.to_string(),
    };
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES - "… (cut)".len();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (cut)");
    }
    tonic::Status::new(to_code(e.code()), message)
}

/// The tonic code for a domain code.
pub fn to_code(code: Code) -> tonic::Code {
    match code {
        Code::Ok => tonic::Code::Ok,
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::NotFound => tonic::Code::NotFound,
        Code::AlreadyExists => tonic::Code::AlreadyExists,
        Code::PermissionDenied => tonic::Code::PermissionDenied,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::Aborted => tonic::Code::Aborted,
        Code::OutOfRange => tonic::Code::OutOfRange,
        Code::Internal => tonic::Code::Internal,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::DataLoss => tonic::Code::DataLoss,
        Code::Unauthenticated => tonic::Code::Unauthenticated,
    }
}

/// Rewrites tonic's OUT_OF_RANGE for a request larger than the decoding limit into the
/// RESOURCE_EXHAUSTED that gRPC specifies and docs/api.md documents. Only tonic's own size-limit
/// error is rewritten (its message says the message is "too large"): Ward answers OUT_OF_RANGE
/// itself for an audit resume point beyond the end of the log. Applied to every service as a
/// tower layer on the response head (errors are trailers-only responses).
pub fn size_limit_status(
    mut resp: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    use tonic::codegen::http::HeaderValue;
    let out_of_range = tonic::Code::OutOfRange as i32;
    let is_oor = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        == Some(out_of_range);
    let too_large = resp
        .headers()
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if is_oor && too_large {
        let h = resp.headers_mut();
        h.insert(
            "grpc-status",
            HeaderValue::from(tonic::Code::ResourceExhausted as i32),
        );
        h.insert(
            "grpc-message",
            HeaderValue::from_static("request%20larger%20than%20limits.max_request_bytes"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_hsm::HsmError;

    #[test]
    fn every_error_maps_to_its_documented_code() {
        let cases: Vec<(Error, tonic::Code)> = vec![
            (Error::invalid("bad name"), tonic::Code::InvalidArgument),
            (Error::NotFound("secret x".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("x".into()), tonic::Code::AlreadyExists),
            (Error::Conflict("cas".into()), tonic::Code::Aborted),
            (
                Error::FailedPrecondition("revoked".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                Error::PermissionDenied {
                    identity: "app".into(),
                    verb: "write",
                    target: "x".into(),
                },
                tonic::Code::PermissionDenied,
            ),
            (
                Error::Unauthenticated("no cert".into()),
                tonic::Code::Unauthenticated,
            ),
            (
                Error::ResourceExhausted("quota".into()),
                tonic::Code::ResourceExhausted,
            ),
            (Error::Unavailable("audit".into()), tonic::Code::Unavailable),
            (
                Error::OutOfRange("past the end".into()),
                tonic::Code::OutOfRange,
            ),
            (Error::DataLoss("tag".into()), tonic::Code::DataLoss),
            (Error::Internal("detail".into()), tonic::Code::Internal),
            (Error::from(HsmError::Integrity), tonic::Code::DataLoss),
            (
                Error::from(HsmError::Unavailable("gone".into())),
                tonic::Code::Unavailable,
            ),
        ];
        for (e, want) in cases {
            let shown = e.to_string();
            let status = to_status(e);
            assert_eq!(status.code(), want, "{shown}");
            assert_eq!(status.code() as i32, {
                // The audit log stores Code numbers; they must equal gRPC's.
                want as i32
            });
        }
    }

    #[test]
    fn hsm_failures_name_the_hsm_once_and_integrity_stays_data_loss() {
        let s = to_status(Error::from(HsmError::Unavailable(
            "token \"ward\" is not present".into(),
        )));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(
            s.message(),
            "HSM unavailable: token \"ward\" is not present"
        );
        let s = to_status(Error::from(HsmError::BadPin {
            label: "ward".into(),
        }));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message().starts_with("HSM unavailable: "),
            "{}",
            s.message()
        );
        let s = to_status(Error::from(HsmError::Integrity));
        assert_eq!(s.code(), tonic::Code::DataLoss);
        assert!(s.message().contains("integrity"), "{}", s.message());
    }

    #[test]
    fn internal_details_stay_off_the_wire() {
        let s = to_status(Error::Internal("stack detail".into()));
        assert_eq!(s.message(), "internal error");
    }

    #[test]
    fn long_messages_are_cut_to_fit_a_header() {
        let s = to_status(Error::invalid(format!("bad {}", "é".repeat(4000))));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            s.message().len()
        );
        assert!(s.message().starts_with("bad éé") && s.message().ends_with("… (cut)"));
        let short = to_status(Error::invalid("short"));
        assert_eq!(short.message(), "short");
    }

    #[test]
    fn denial_names_identity_verb_and_target() {
        let s = to_status(Error::PermissionDenied {
            identity: "app".into(),
            verb: "write",
            target: "db/pw".into(),
        });
        assert_eq!(s.message(), "app may not write db/pw");
    }
}
