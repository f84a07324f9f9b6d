//! The one table of gRPC status code names (`NOT_FOUND`, …), shared by the server (errors,
//! metrics, audit records), the SDK and `wardctl`, so every part of Ward spells a code alike.

/// The canonical upper-case name of every gRPC code, indexed by its number (0 = `OK` … 16 =
/// `UNAUTHENTICATED`).
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of a gRPC code number, e.g. 5 → `NOT_FOUND`; a number gRPC does not define gives
/// `UNKNOWN` (as gRPC itself reads one).
pub fn code_name(code: i32) -> &'static str {
    usize::try_from(code)
        .ok()
        .and_then(|i| CODE_NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// The name of a tonic status code, e.g. `Code::NotFound` → `NOT_FOUND`.
pub fn status_code_name(code: tonic::Code) -> &'static str {
    code_name(code as i32)
}

/// The number of a code given by its exact upper-case name, e.g. `NOT_FOUND` → 5.
pub fn code_number(name: &str) -> Option<i32> {
    CODE_NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| i32::try_from(i).ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_match_tonic_numbering() {
        for i in 0..17 {
            let code = tonic::Code::from_i32(i);
            assert_eq!(code as i32, i);
            let name = status_code_name(code);
            // tonic's Debug is the CamelCase of the same name.
            let camel: String = name
                .split('_')
                .map(|w| w[..1].to_owned() + &w[1..].to_ascii_lowercase())
                .collect();
            assert_eq!(format!("{code:?}"), camel, "{i}");
            assert_eq!(code_number(name), Some(i));
        }
        assert_eq!(code_name(5), "NOT_FOUND");
        assert_eq!(code_name(17), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
        assert_eq!(code_number("not_found"), None);
        assert_eq!(code_number("BOGUS"), None);
    }
}
