//! Small helpers the tests share: call results, checksums, random names, files, watch streams.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pb;

/// CRC32C, the checksum the server reports for a value.
pub fn crc32c(value: &[u8]) -> u32 {
    crc32c::crc32c(value)
}

/// A fresh random lowercase-hex string of `n` characters (for distinctive names and values).
pub fn random_hex(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap())
        .collect()
}

/// Unwraps a call that must succeed, showing the status and `what` otherwise.
pub fn ok<T>(r: Result<tonic::Response<T>, tonic::Status>, what: &str) -> T {
    match r {
        Ok(resp) => resp.into_inner(),
        Err(s) => panic!("{what}: expected OK, got {:?}: {}", s.code(), s.message()),
    }
}

/// Asserts that a call failed with exactly `code`; returns the status message.
pub fn expect_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    what: &str,
) -> String {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got OK: {v:?}"),
        Err(s) => {
            assert_eq!(
                s.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                s.code(),
                s.message()
            );
            s.message().to_owned()
        }
    }
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it), keeping `mode`, as a
/// careful operator or a certificate agent replaces a file.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp-replace");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The next event of a watch stream (panics after 10 s, at the stream's end, or on an error).
pub async fn next_event(stream: &mut tonic::Streaming<pb::WatchEvent>) -> pb::WatchEvent {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(e))) => e,
        Ok(Ok(None)) => panic!("watch stream ended"),
        Ok(Err(s)) => panic!("watch stream failed: {:?}: {}", s.code(), s.message()),
        Err(_) => panic!("no watch event within 10 s"),
    }
}

/// Events up to and including the next SYNCED.
pub async fn until_synced(stream: &mut tonic::Streaming<pb::WatchEvent>) -> Vec<pb::WatchEvent> {
    let mut out = Vec::new();
    loop {
        let e = next_event(stream).await;
        let synced = e.r#type() == pb::WatchEventType::Synced;
        out.push(e);
        if synced {
            return out;
        }
    }
}

/// Moves every entry of `from` into `to` (created). Renames, so both must be on one file
/// system: tests use it to take a SoftHSM token away and give it back.
pub fn move_entries(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::rename(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {d:?}: {e}")) {
            let entry = entry.unwrap();
            let ty = entry.file_type().unwrap();
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                out.push(entry.path());
            }
        }
    }
    out
}

/// The files under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    assert!(!needle.is_empty());
    files_under(dir)
        .into_iter()
        .filter(|f| {
            let data = std::fs::read(f).unwrap_or_else(|e| panic!("read {f:?}: {e}"));
            data.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

/// The environment variable that lets a test skip what this machine cannot do (`=1`).
pub const ALLOW_SKIP_ENV: &str = "WARD_TEST_ALLOW_SKIP";

/// For a test that cannot run here (`why`): fails it, unless skipping was asked for explicitly
/// with [`ALLOW_SKIP_ENV`]`=1`, in which case it says SKIPPED and returns (the caller returns
/// too). A test that quietly passes without running would hide that CI never ran it.
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var(ALLOW_SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: {why} ({ALLOW_SKIP_ENV}=1)");
        return;
    }
    panic!(
        "{test} cannot run here: {why}. Run it where it can (as root on Linux), or set \
         {ALLOW_SKIP_ENV}=1 to skip it explicitly"
    );
}

/// Opens the sled database of a stopped server (`DIR/data`) to read or edit it. sled releases
/// its file lock only when the background threads of the last handle have exited, a moment
/// after that handle (a previous call's, or the server's) is gone: wait for it, up to 10 s.
pub fn open_stopped_db(data_dir: &Path) -> sled::Db {
    let path = data_dir.join("data");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(&path) {
            Ok(db) => return db,
            Err(e) if e.to_string().contains("could not acquire lock") => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{}: still locked after 10 s: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open sled at {}: {e}", path.display()),
        }
    }
}
