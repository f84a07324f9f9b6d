//! What the user hands wardctl besides the flag structure: the value parsers of flags (spans,
//! rates, times, labels, `NAME@VERSION` items) and values or keys read from a file or stdin
//! (into zeroizing buffers, never from the command line).

use std::collections::HashMap;
use std::io::{self, IsTerminal, Read};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

use ward_client::parse_duration;
use ward_client::proto::VersionState;

use crate::failure::Failure;

/// Reads the value for `put` from a file, or from stdin when no file (or "-") is given.
pub fn read_value(path: Option<&Path>) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let mut buf = Zeroizing::new(Vec::new());
    match path {
        Some(p) if p != Path::new("-") => {
            let mut file = std::fs::File::open(p).map_err(|e| {
                Failure::Usage(format!("cannot read value file {}: {e}", p.display()))
            })?;
            // Size the buffer up front so it is not reallocated (leaving copies) while reading.
            if let Ok(meta) = file.metadata() {
                buf.reserve(usize::try_from(meta.len()).unwrap_or(0));
            }
            file.read_to_end(&mut buf).map_err(|e| {
                Failure::Usage(format!("cannot read value file {}: {e}", p.display()))
            })?;
        }
        _ => {
            let stdin = io::stdin();
            if stdin.is_terminal() {
                eprintln!("reading the value from stdin; end it with Ctrl-D");
            }
            stdin
                .lock()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::Usage(format!("cannot read the value from stdin: {e}")))?;
        }
    }
    Ok(buf)
}

/// Reads a key from a file or stdin, trimmed.
pub fn read_key(path: Option<&Path>) -> Result<Zeroizing<String>, Failure> {
    let raw = read_value(path)?;
    let text = std::str::from_utf8(&raw)
        .map_err(|_| Failure::Usage("the key is not UTF-8 text".into()))?;
    Ok(Zeroizing::new(text.trim().to_owned()))
}

/// Parses `KEY=VALUE` (the value may be empty or contain `=`).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Collects labels into a map, refusing a key given twice.
pub fn label_map(labels: Vec<(String, String)>) -> Result<HashMap<String, String>, Failure> {
    let mut map = HashMap::with_capacity(labels.len());
    for (k, v) in labels {
        if map.contains_key(&k) {
            return Err(Failure::Usage(format!("label {k:?} given more than once")));
        }
        map.insert(k, v);
    }
    Ok(map)
}

/// Parses a batch item: `NAME` (version 0, the PRIMARY) or `NAME@VERSION`. Secret names never
/// contain `@`, so the last `@` separates the version.
pub fn parse_batch_item(s: &str) -> Result<(String, u64), String> {
    let (name, version) = match s.rsplit_once('@') {
        Some((name, v)) => {
            let version = v
                .parse::<u64>()
                .map_err(|_| format!("{s:?}: version after '@' must be a number"))?;
            (name, version)
        }
        None => (s, 0),
    };
    if name.is_empty() {
        return Err(format!("{s:?}: empty secret name"));
    }
    Ok((name.to_owned(), version))
}

/// Parses `NAME@VERSION` or `NAME@VERSION:STATE` for `watch --held`.
pub fn parse_held(s: &str) -> Result<(String, u64, VersionState), String> {
    let (item, state) = match s.rsplit_once(':') {
        Some((item, state)) => {
            let upper = state.to_ascii_uppercase();
            let st = VersionState::from_str_name(&format!("VERSION_STATE_{upper}"))
                .filter(|st| *st != VersionState::Unspecified)
                .ok_or_else(|| format!("{s:?}: unknown state {state:?}"))?;
            (item, st)
        }
        None => (s, VersionState::Unspecified),
    };
    match parse_batch_item(item)? {
        (_, 0) => Err(format!("{s:?}: give the version you hold as NAME@VERSION")),
        (name, version) => Ok((name, version, state)),
    }
}

/// Parses the target of `state`: primary, active or inactive.
pub fn parse_target_state(s: &str) -> Result<VersionState, String> {
    match s.to_ascii_lowercase().as_str() {
        "primary" => Ok(VersionState::Primary),
        "active" => Ok(VersionState::Active),
        "inactive" => Ok(VersionState::Inactive),
        _ => Err(format!(
            "{s:?}: use primary, active or inactive (revoke and destroy have their own commands)"
        )),
    }
}

/// Parses a span: a number with a unit ms, s, m, h or d (a bare number is seconds).
pub fn parse_span(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid span {s:?} (examples: 500ms, 30s, 5m, 12h, 90d)"))?;
    let ms = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m, h or d)")),
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("span {s:?} is too long"))
}

/// Parses a rate: `N/PERIOD` (`100/s`, `6000/1m`, `10/500ms`).
pub fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let (n, period) = s
        .split_once('/')
        .ok_or_else(|| format!("invalid rate {s:?} (expected N/PERIOD, e.g. 100/s)"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {s:?}: {n:?} is not a number"))?;
    let period = period.trim();
    let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
        parse_span(period)?
    } else {
        parse_span(&format!("1{period}"))?
    };
    Ok((n, period))
}

/// Parses an expiry: RFC 3339, or a span from now.
pub fn parse_expiry(s: &str) -> Result<prost_types::Timestamp, String> {
    if let Ok(t) = s.parse::<prost_types::Timestamp>() {
        return Ok(t);
    }
    let span = parse_span(s.trim_start_matches('+'))
        .map_err(|_| format!("invalid expiry {s:?} (an RFC 3339 time or a span such as 90d)"))?;
    let at = SystemTime::now()
        .checked_add(span)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .ok_or_else(|| format!("expiry {s:?} is out of range"))?;
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(at.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

/// Parses a lifecycle period: what `--timeout` takes (`90`, `500ms`, `10s`, `2m`) plus hours
/// and days (`12h`, `30d`).
pub fn parse_period(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    for (suffix, unit) in [("h", 3600.0), ("d", 86_400.0)] {
        if let Some(num) = t.strip_suffix(suffix) {
            return match num.parse::<f64>() {
                Ok(n) if n >= 0.0 => Duration::try_from_secs_f64(n * unit)
                    .map_err(|_| format!("duration {s:?} is out of range")),
                _ => Err(format!(
                    "invalid duration {s:?} (examples: 0, 90s, 15m, 12h, 30d)"
                )),
            };
        }
    }
    parse_duration(t)
        .map_err(|_| format!("invalid duration {s:?} (examples: 0, 90s, 15m, 12h, 30d)"))
}

/// Parses an RFC 3339 time.
pub fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    s.parse::<prost_types::Timestamp>()
        .map_err(|_| format!("invalid time {s:?} (use RFC 3339, e.g. 2030-01-01T00:00:00Z)"))
}

/// A protobuf duration (millisecond precision is all the server keeps).
pub fn to_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_millis() * 1_000_000).unwrap_or(0),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn batch_items() {
        assert_eq!(parse_batch_item("a/b").unwrap(), ("a/b".into(), 0));
        assert_eq!(parse_batch_item("a/b@7").unwrap(), ("a/b".into(), 7));
        assert_eq!(parse_batch_item("a@b@2").unwrap(), ("a@b".into(), 2));
        for bad in ["", "@3", "a@", "a@x", "a@-1", "a@1.5"] {
            assert!(parse_batch_item(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(
            parse_label("team=pay").unwrap(),
            ("team".into(), "pay".into())
        );
        assert_eq!(parse_label("k=a=b").unwrap(), ("k".into(), "a=b".into()));
        assert_eq!(parse_label("k=").unwrap(), ("k".into(), String::new()));
        assert!(parse_label("=v").is_err());
        assert!(parse_label("novalue").is_err());
        let dup = vec![("a".into(), "1".into()), ("a".into(), "2".into())];
        assert!(matches!(label_map(dup), Err(Failure::Usage(_))));
    }

    #[test]
    fn periods_and_held_items() {
        assert_eq!(parse_period("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_period("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_period("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_period("1.5d").unwrap(), Duration::from_secs(129_600));
        for bad in ["", "h", "-1d", "1w", "x"] {
            assert!(parse_period(bad).is_err(), "{bad:?}");
        }
        for bad in ["a", "a@0", "a@1:gone", "a@1:unspecified", "@1"] {
            assert!(parse_held(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            to_duration(Duration::from_millis(1500)),
            prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            }
        );
    }

    #[test]
    fn rates_and_expiries() {
        assert_eq!(parse_rate("100/s").unwrap(), (100, Duration::from_secs(1)));
        assert_eq!(
            parse_rate("6000/1m").unwrap(),
            (6000, Duration::from_secs(60))
        );
        assert_eq!(
            parse_rate("10/500ms").unwrap(),
            (10, Duration::from_millis(500))
        );
        for bad in ["100", "x/s", "1/1w"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_expiry("2030-01-01T00:00:00Z").unwrap().seconds,
            1_893_456_000
        );
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let in_a_day = parse_expiry("1d").unwrap().seconds;
        assert!(
            (in_a_day - now.as_secs() as i64 - 86_400).abs() <= 2,
            "{in_a_day}"
        );
        assert!(parse_expiry("soon").is_err());
    }
}
