//! How wardctl shows things: the printing primitives (JSON, lines, tables, a new key) and the
//! text of the wire's enums and times, shared by every command. The views of secrets, keys and
//! audit records are in the submodules.

pub mod alerts;
pub mod audit;
pub mod keys;
pub mod secrets;

use std::io::{self, Write};

use base64::Engine as _;
use serde_json::Value;

use ward_client::proto::{SecretKind, VerifyResult, VersionState, WatchEventType};

use crate::failure::Failure;

/// Prints a JSON value, pretty, with a final newline.
pub fn print_json(value: &Value) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).map_err(io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

/// Writes one line of human output.
pub fn print_line(line: &str) -> Result<(), Failure> {
    writeln!(io::stdout().lock(), "{line}")?;
    Ok(())
}

/// Prints a command's answer: `value` with --json, else the one-line `text`.
pub fn print_answer(json: bool, value: &Value, text: &str) -> Result<(), Failure> {
    if json {
        print_json(value)
    } else {
        print_line(text)
    }
}

/// Prints a new API key alone on stdout (so `KEY=$(wardctl …)` works), then `note` on stderr.
pub fn print_new_key(key: &str, note: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(out, "{key}")?;
    out.flush()?;
    eprintln!("{note}");
    Ok(())
}

/// Writes rows as left-aligned columns separated by two spaces, without trailing blanks.
pub fn write_table<const N: usize>(
    out: &mut impl Write,
    rows: &[[String; N]],
) -> Result<(), Failure> {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// The name of a wire enum value without its type prefix (`VERSION_STATE_PRIMARY` →
/// `PRIMARY`), or `UNKNOWN(n)` for a number this build does not know.
pub fn enum_name<E>(n: i32, prefix: &str, name: impl FnOnce(&E) -> &'static str) -> String
where
    E: TryFrom<i32>,
{
    match E::try_from(n) {
        Ok(e) => name(&e).trim_start_matches(prefix).to_owned(),
        Err(_) => format!("UNKNOWN({n})"),
    }
}

/// A version state without its `VERSION_STATE_` prefix, e.g. `PRIMARY`.
pub fn state_name(state: i32) -> String {
    enum_name(state, "VERSION_STATE_", VersionState::as_str_name)
}

/// A secret kind without its `SECRET_KIND_` prefix, e.g. `API_KEY`.
pub fn kind_name(kind: i32) -> String {
    enum_name(kind, "SECRET_KIND_", SecretKind::as_str_name)
}

/// A verify result without its `VERIFY_RESULT_` prefix, e.g. `VALID`.
pub fn result_name(r: i32) -> String {
    enum_name(r, "VERIFY_RESULT_", VerifyResult::as_str_name)
}

/// A watch event type without its `WATCH_EVENT_TYPE_` prefix, e.g. `ROTATED`.
pub fn event_name(t: i32) -> String {
    enum_name(t, "WATCH_EVENT_TYPE_", WatchEventType::as_str_name)
}

/// RFC 3339 text of a timestamp, or "-" when absent.
pub fn timestamp_text(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(|| "-".to_owned(), ToString::to_string)
}

/// RFC 3339 string of a timestamp, or null when absent.
pub fn timestamp_json(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// When something was last used: its time, or "never".
pub fn last_used_text(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(|| "never".to_owned(), ToString::to_string)
}

/// Human text of a protobuf duration, e.g. `1.5s`.
pub fn duration_text(d: Option<&prost_types::Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| {
            let ms = d.seconds * 1000 + i64::from(d.nanos) / 1_000_000;
            if ms % 1000 == 0 {
                format!("{}s", ms / 1000)
            } else {
                format!("{ms}ms")
            }
        },
    )
}

/// A value for a one-line text field: itself if it is UTF-8 without control characters, else
/// `base64:` and its base64.
pub fn value_text(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
        _ => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(value)
        ),
    }
}

/// Replaces line breaks and tabs so a message stays on its line and in its column.
pub fn one_line(s: &str) -> String {
    s.replace(['\n', '\r', '\t'], " ")
}

/// The text itself, or "-" when empty.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// The text itself, or "none" when empty.
pub fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "none"
    } else {
        s
    }
}

/// "version N", or "none" for version 0 (no PRIMARY).
pub fn primary_text(v: u64) -> String {
    if v == 0 {
        "none".into()
    } else {
        format!("version {v}")
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn enum_names() {
        assert_eq!(state_name(VersionState::Primary as i32), "PRIMARY");
        assert_eq!(state_name(VersionState::Destroyed as i32), "DESTROYED");
        assert_eq!(state_name(42), "UNKNOWN(42)");
        assert_eq!(kind_name(SecretKind::ApiKey as i32), "API_KEY");
        assert_eq!(
            result_name(VerifyResult::ForbiddenIp as i32),
            "FORBIDDEN_IP"
        );
        assert_eq!(
            event_name(WatchEventType::RotationDue as i32),
            "ROTATION_DUE"
        );
    }

    #[test]
    fn value_rendering() {
        assert_eq!(value_text(b"hello world"), "hello world");
        assert_eq!(value_text(b"a\nb"), "base64:YQpi");
        assert_eq!(value_text(&[0xff, 0x00]), "base64:/wA=");
    }

    #[test]
    fn table_alignment() {
        let rows = vec![
            ["a".to_owned(), "bb".to_owned(), "c".to_owned()],
            ["aaa".to_owned(), "b".to_owned(), String::new()],
        ];
        let mut out = Vec::new();
        write_table(&mut out, &rows).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "a    bb  c\naaa  b\n");
    }
}
