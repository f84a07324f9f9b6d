//! The leak scanner behind `wardctl scan`: walks files (honouring `.gitignore`, `.ignore` and
//! git's exclude files, skipping binaries and `.git/`) and finds strings in Ward's API-key
//! format whose checksum is valid, so look-alikes and typos are not reported.
//!
//! A finding holds the key itself (zeroized on drop; its `Debug` is redacted) so the caller can
//! ask the server whether it is live; only [`ApiKey::redacted`] is ever meant to be shown.

use std::path::{Path, PathBuf};

use ward::keyformat::{ApiKey, BODY_LEN};
use ward::v1::VerifyResult;

/// Files larger than this are skipped (keys live in source and config, not in data dumps).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// A file with a NUL byte in its first this-many bytes is treated as binary.
const BINARY_SNIFF: usize = 8192;

/// One key found in a file.
#[derive(Debug)]
pub struct Finding {
    /// The file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based byte column of the key's first character.
    pub column: usize,
    /// The key (never print it; use `key.redacted()`).
    pub key: ApiKey,
}

/// What `wardctl scan --check` makes of a key found, from the server's verification of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Standing {
    /// Not asked (no check made): counts as live.
    Unchecked,
    /// The key works, or can be made to work again (DISABLED: a retired version can be
    /// re-activated): a leak to fix.
    Live,
    /// The key can never work again: REVOKED (the answer for DESTROYED too) or EXPIRED.
    Dead,
    /// The server did not say: NOT_FOUND (never issued, or the scanner's identity may not verify
    /// it — the server answers both alike, on purpose), or the check failed. Never dead.
    CannotTell,
}

impl Standing {
    /// The standing a verification result (`ward.v1.VerifyResult` number) gives. Only REVOKED
    /// and EXPIRED are dead; NOT_FOUND (and MALFORMED, which a key the scanner parsed can only
    /// be if the server's rules differ) cannot tell; every other answer — VALID, DISABLED, and
    /// the denials of a key that exists (environment, IP, scope, rate, quota) — is live.
    pub fn of(result: i32) -> Self {
        match VerifyResult::try_from(result) {
            Ok(VerifyResult::Revoked | VerifyResult::Expired) => Self::Dead,
            Ok(VerifyResult::NotFound | VerifyResult::Malformed | VerifyResult::Unspecified)
            | Err(_) => Self::CannotTell,
            Ok(_) => Self::Live,
        }
    }

    /// Its name in `wardctl --json scan` output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unchecked => "unchecked",
            Self::Live => "live",
            Self::Dead => "dead",
            Self::CannotTell => "cannot_tell",
        }
    }
}

/// What a scan saw besides findings.
#[derive(Debug, Default)]
pub struct Summary {
    /// Files read.
    pub files: usize,
    /// Files skipped as binary or too large.
    pub skipped: usize,
    /// Paths that could not be read, with the reason.
    pub errors: Vec<(PathBuf, String)>,
}

/// Every well-formed key in `text`, with its 1-based byte column.
///
/// Candidates are the `_`-separated pieces of each run of `[A-Za-z0-9_]`: a 38-character
/// base62 piece preceded by two pieces is tried as `<issuer>_<environment>_<body>`, and kept
/// only if it parses (prefix rules and checksum).
pub fn find_keys(text: &str) -> Vec<(usize, ApiKey)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !is_word(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_word(bytes[i]) {
            i += 1;
        }
        find_in_run(&text[start..i], start, &mut out);
    }
    out
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn find_in_run(run: &str, offset: usize, out: &mut Vec<(usize, ApiKey)>) {
    if run.len() < BODY_LEN + 4 {
        return;
    }
    // (start, piece) of every `_`-separated piece.
    let mut pieces = Vec::new();
    let mut at = 0;
    for piece in run.split('_') {
        pieces.push((at, piece));
        at += piece.len() + 1;
    }
    for w in pieces.windows(3) {
        let [(start, _), _, (body_start, body)] = w else {
            continue;
        };
        if body.len() != BODY_LEN {
            continue;
        }
        let candidate = &run[*start..body_start + BODY_LEN];
        if let Ok(key) = ApiKey::parse(candidate) {
            out.push((offset + start + 1, key));
        }
    }
}

/// Scans the files under `paths` (files or directories), calling `found` for each key.
pub fn scan_paths(paths: &[PathBuf], mut found: impl FnMut(Finding)) -> Summary {
    let mut summary = Summary::default();
    let Some((first, rest)) = paths.split_first() else {
        return summary;
    };
    let mut walk = ignore::WalkBuilder::new(first);
    for p in rest {
        walk.add(p);
    }
    // Leaks hide in dotfiles (.env) and outside git repositories too: honour ignore files
    // everywhere, skip only git's own directory.
    walk.hidden(false)
        .require_git(false)
        .filter_entry(|e| e.file_name() != ".git");
    for entry in walk.build() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                summary.errors.push((PathBuf::new(), e.to_string()));
                continue;
            }
        };
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        scan_file(entry.path(), &mut summary, &mut found);
    }
    summary
}

fn scan_file(path: &Path, summary: &mut Summary, found: &mut impl FnMut(Finding)) {
    let data = match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            summary.skipped += 1;
            return;
        }
        Ok(_) => std::fs::read(path),
        Err(e) => Err(e),
    };
    let data = match data {
        Ok(d) => zeroize::Zeroizing::new(d),
        Err(e) => {
            summary.errors.push((path.to_path_buf(), e.to_string()));
            return;
        }
    };
    if data[..data.len().min(BINARY_SNIFF)].contains(&0) {
        summary.skipped += 1;
        return;
    }
    summary.files += 1;
    for (n, line) in data.split(|&b| b == b'\n').enumerate() {
        // Keys are ASCII: a line that is not UTF-8 is searched in its valid stretches.
        let text = String::from_utf8_lossy(line);
        for (column, key) in find_keys(&text) {
            found(Finding {
                path: path.to_path_buf(),
                line: n + 1,
                column,
                key,
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn only_revoked_and_expired_keys_are_dead() {
        use VerifyResult as R;
        let of = |r: R| Standing::of(r as i32);
        for r in [R::Revoked, R::Expired] {
            assert_eq!(of(r), Standing::Dead, "{r:?}");
        }
        for r in [R::NotFound, R::Malformed, R::Unspecified] {
            assert_eq!(of(r), Standing::CannotTell, "{r:?}");
        }
        assert_eq!(Standing::of(999), Standing::CannotTell);
        for r in [
            R::Valid,
            R::Disabled,
            R::WrongEnvironment,
            R::ForbiddenIp,
            R::InsufficientScope,
            R::RateLimited,
            R::QuotaExceeded,
        ] {
            assert_eq!(of(r), Standing::Live, "{r:?}");
        }
    }

    #[test]
    fn finds_real_keys_and_ignores_look_alikes() {
        let a = ApiKey::generate("ward", "prod").unwrap();
        let b = ApiKey::generate("acme", "dev").unwrap();
        let mut broken = a.expose().to_owned();
        let i = broken.len() - 10;
        let c = if &broken[i..=i] == "A" { "B" } else { "A" };
        broken.replace_range(i..=i, c);
        let line = format!(
            "API_KEY={} other=\"{}\" bad={broken} x_{}",
            a.expose(),
            b.expose(),
            a.expose()
        );
        let found = find_keys(&line);
        let got: Vec<(usize, &str)> = found.iter().map(|(c, k)| (*c, k.expose())).collect();
        let col_a = line.find(a.expose()).unwrap() + 1;
        let col_b = line.find(b.expose()).unwrap() + 1;
        let col_a2 = line.rfind(a.expose()).unwrap() + 1;
        assert_eq!(
            got,
            vec![
                (col_a, a.expose()),
                (col_b, b.expose()),
                (col_a2, a.expose())
            ]
        );
        // Longer runs around a key body are not keys.
        assert!(find_keys(&format!("{}X", a.expose())).is_empty());
        assert!(find_keys("ward_prod_0123456789").is_empty());
    }

    #[test]
    fn walks_respecting_gitignore_and_skipping_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let key = ApiKey::generate("ward", "dev").unwrap();
        std::fs::write(dir.path().join(".gitignore"), "ignored.txt\n").unwrap();
        std::fs::write(dir.path().join("ignored.txt"), key.expose()).unwrap();
        std::fs::write(dir.path().join(".env"), format!("\n\nK={}\n", key.expose())).unwrap();
        let mut bin = b"\0\x01binary ".to_vec();
        bin.extend_from_slice(key.expose().as_bytes());
        std::fs::write(dir.path().join("blob.bin"), bin).unwrap();
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        std::fs::write(dir.path().join(".git/config"), key.expose()).unwrap();
        let mut found = Vec::new();
        let summary = scan_paths(&[dir.path().to_path_buf()], |f| found.push(f));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].path.ends_with(".env"));
        assert_eq!((found[0].line, found[0].column), (3, 3));
        assert_eq!(summary.skipped, 1);
    }
}
