//! Shared by Ward's fuzz targets: what every refusal must look like, splitting one input into
//! fields, and writing each target's seed inputs.
//!
//! Seeds are made by the targets themselves, from today's encoders, when `WARD_FUZZ_SEEDS`
//! names a directory (libFuzzer runs the init block before it reads the corpus): nothing
//! binary is committed, and a changed format never leaves stale seeds behind.

use std::path::Path;
use ward_server::error::{Code, Error};
use ward_server::grpc::status::to_status;

/// Longest message a refusal may carry. Messages travel in the `grpc-message` header: one
/// that echoed a large input whole broke the reply (docs/reliability.md §5), so every quote of
/// caller input is an excerpt (`model::excerpt`, at most ~300 bytes escaped). `to_status` also
/// cuts anything longer than `status::MAX_MESSAGE_BYTES`; this checks the message before that
/// safety net, so a site that quotes its input whole is still found.
pub const MAX_MESSAGE: usize = 512;

/// A validator's refusal: INVALID_ARGUMENT, with a bounded message.
pub fn invalid(e: Error) {
    refused(e, Code::InvalidArgument);
}

/// A refusal with `code` and a bounded message.
pub fn refused(e: Error, code: Code) {
    assert_eq!(e.code(), code, "{e:?}");
    let message = e.to_string();
    assert!(
        message.len() <= MAX_MESSAGE,
        "a {}-byte message: {:?}…",
        message.len(),
        message.chars().take(160).collect::<String>()
    );
    assert_eq!(to_status(e).code() as i32, code.as_i32());
}

/// Checks a validator's result: a refusal must be [`invalid`]; success is returned.
pub fn checked<T>(r: ward_server::error::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            invalid(e);
            None
        }
    }
}

/// `data` split at 0x00 bytes into exactly `n` fields (missing ones empty; the last takes the
/// rest, zero bytes included).
pub fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    for _ in 1..n {
        match rest.iter().position(|&b| b == 0) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + 1..];
            }
            None => {
                out.push(rest);
                rest = &[];
            }
        }
    }
    out.push(rest);
    out
}

/// Fields joined as [`fields`] splits them.
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&0u8)
}

/// Writes `seeds` into the directory `WARD_FUZZ_SEEDS` names, if it is set.
pub fn write_seeds(seeds: impl IntoIterator<Item = (String, Vec<u8>)>) {
    let Some(dir) = std::env::var_os("WARD_FUZZ_SEEDS") else {
        return;
    };
    let dir = Path::new(&dir);
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("cannot create seed dir {}: {e}", dir.display());
        return;
    }
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed-{name}"));
        if let Err(e) = std::fs::write(&path, bytes) {
            eprintln!("cannot write seed {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_and_join() {
        assert_eq!(fields(b"a\0b\0c\0d", 3), vec![&b"a"[..], b"b", b"c\0d"]);
        assert_eq!(fields(b"a", 3), vec![&b"a"[..], b"", b""]);
        assert_eq!(join(&[b"a", b"b"]), b"a\0b");
    }
}
