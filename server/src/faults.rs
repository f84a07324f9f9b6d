//! Storage and audit-log faults injected on demand, for the end-to-end tests of the paths a full or wedged
//! disk takes (a full disk cannot be made without `mount`, and a wedged flush only by luck).
//!
//! Compiled only with the cargo feature `fault-injection` (off by default; `--all-features`,
//! which `make test` builds with, turns it on) and refused in builds without debug assertions.
//! Even then nothing is injected unless the server starts with `WARD_FAULT_FILE=<path>` in its
//! environment: the store then reads that file before each operation that can fail, so the test
//! arms and lifts faults while the server runs. Each line of the file names a fault in force:
//!
//! - `write`: a commit fails as sled fails on a full disk (ENOSPC, so the store takes the
//!   engine out of service and reopens it), and reopening fails too, until the line is gone;
//! - `flush-hang`: a flush blocks until the line is gone (a wedged device: the flush timeout
//!   marks the store stalled and the server exits 4);
//! - `free-bytes N`: the free-space guards (the store's, and the audit log's when it starts a
//!   segment) read N bytes free;
//! - `audit-write`: the audit log's segment writes fail with ENOSPC (the log fails closed and
//!   reopens once the line is gone).
//!
//! No file, or an empty one: no fault. Without the feature every method here answers "no
//! fault" and the environment is never read.

#[cfg(all(feature = "fault-injection", not(debug_assertions)))]
compile_error!(
    "the fault-injection feature is for tests only: it must not be built into a release binary"
);

/// Environment variable naming the fault file.
#[cfg(feature = "fault-injection")]
pub const FAULT_FILE_ENV: &str = "WARD_FAULT_FILE";

/// The faults to inject: where to read them from, if anywhere.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    #[cfg(feature = "fault-injection")]
    file: Option<std::path::PathBuf>,
}

#[cfg(feature = "fault-injection")]
impl Faults {
    /// The faults named by [`FAULT_FILE_ENV`], if it is set.
    pub(crate) fn from_env() -> Self {
        let file = std::env::var_os(FAULT_FILE_ENV).map(std::path::PathBuf::from);
        if let Some(f) = &file {
            tracing::warn!(file = %f.display(), "storage fault injection armed (test build)");
        }
        Self { file }
    }

    /// Whether the fault file holds a line starting with the word `name`, and the rest of it.
    fn line(&self, name: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.file.as_ref()?).ok()?;
        text.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.collect::<Vec<_>>().join(" "))
        })
    }

    /// The I/O error sled returns on a full disk, while `write` is in force.
    pub(crate) fn write_error(&self) -> Option<sled::Error> {
        self.line("write").map(|_| {
            sled::Error::Io(std::io::Error::from_raw_os_error(
                nix::errno::Errno::ENOSPC as i32,
            ))
        })
    }

    /// The I/O error a full disk gives the audit log's next segment write, while
    /// `audit-write` is in force.
    pub(crate) fn audit_write_error(&self) -> Option<std::io::Error> {
        self.line("audit-write")
            .map(|_| std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32))
    }

    /// Blocks while `flush-hang` is in force. Blocking: call it where the flush blocks.
    pub(crate) fn hang_flush(&self) {
        if self.line("flush-hang").is_none() {
            return;
        }
        tracing::warn!("injected fault: the flush hangs");
        while self.line("flush-hang").is_some() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The free space to report instead of the file system's, while `free-bytes N` is in force.
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        self.line("free-bytes")?.parse().ok()
    }
}

#[cfg(not(feature = "fault-injection"))]
impl Faults {
    /// No faults: this build cannot inject any.
    pub(crate) fn from_env() -> Self {
        Self {}
    }

    /// Never an error.
    pub(crate) fn write_error(&self) -> Option<sled::Error> {
        None
    }

    /// Never an error.
    pub(crate) fn audit_write_error(&self) -> Option<std::io::Error> {
        None
    }

    /// Never blocks.
    pub(crate) fn hang_flush(&self) {}

    /// Never overrides the free space.
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        None
    }
}

#[cfg(test)]
#[cfg(feature = "fault-injection")]
mod tests {
    use super::*;

    fn faults(text: &str) -> (tempfile::TempDir, Faults) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("faults");
        std::fs::write(&file, text).unwrap();
        (dir, Faults { file: Some(file) })
    }

    #[test]
    fn each_line_names_a_fault() {
        let (_d, f) = faults("write\nfree-bytes 4096\n");
        assert!(
            matches!(f.write_error(), Some(sled::Error::Io(e)) if e.raw_os_error() == Some(28))
        );
        assert_eq!(f.free_bytes(), Some(4096));
        f.hang_flush(); // not in force: returns at once
        let (_d, f) = faults("");
        assert!(f.write_error().is_none());
        assert_eq!(f.free_bytes(), None);
        assert!(Faults::default().write_error().is_none());
    }

    #[test]
    fn a_hung_flush_returns_once_the_line_goes() {
        let (dir, f) = faults("flush-hang\n");
        let t = std::thread::spawn(move || f.hang_flush());
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!t.is_finished(), "the flush did not hang");
        std::fs::write(dir.path().join("faults"), "").unwrap();
        t.join().unwrap();
    }
}
