//! What the server processes of one data directory printed: every line of stdout and stderr,
//! kept in order for the test to search, and the queries on it.
//!
//! A stream keeps at most [`LOG_CAP`] lines. A line dropped past the cap is counted, and a log
//! that lost lines fails the test when it is searched and when the server is dropped: a test
//! that looks for a line (or for the absence of a secret) must never pass on a truncated log.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

/// Lines of server output kept per stream; a line past it is dropped, counted, and fails the
/// test (see the module doc).
pub(crate) const LOG_CAP: usize = 50_000;

/// Everything a server process (and its predecessors in the same data dir) printed.
#[derive(Default)]
pub(crate) struct Logs {
    stdout: Stream,
    stderr: Stream,
}

/// One output stream: the lines kept, and how many were ever pushed.
#[derive(Default)]
struct Stream {
    lines: VecDeque<String>,
    pushed: usize,
}

impl Stream {
    fn push(&mut self, line: String) {
        if self.lines.len() == LOG_CAP {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
        self.pushed += 1;
    }

    fn dropped(&self) -> usize {
        self.pushed - self.lines.len()
    }

    /// The last `n` lines, joined (diagnostics: a tail is whole even when older lines went).
    fn tail(&self, n: usize) -> String {
        let skip = self.lines.len().saturating_sub(n);
        let tail: Vec<&str> = self.lines.iter().skip(skip).map(String::as_str).collect();
        tail.join("\n")
    }
}

impl Logs {
    /// Lines dropped past [`LOG_CAP`], both streams.
    pub(crate) fn dropped(&self) -> usize {
        self.stdout.dropped() + self.stderr.dropped()
    }

    /// Panics if any line was dropped: whatever is searched next would miss it.
    pub(crate) fn assert_complete(&self) {
        let dropped = self.dropped();
        assert!(
            dropped == 0,
            "[harness] {dropped} server log lines were dropped past the cap of {LOG_CAP} lines \
             per stream: a search of the log would miss them (log less, or raise LOG_CAP)"
        );
    }

    /// How many stderr lines contain `needle` (panics if lines were dropped).
    pub(crate) fn count_in_stderr(&self, needle: &str) -> usize {
        self.assert_complete();
        self.stderr
            .lines
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// The last `n` stderr lines, joined.
    pub(crate) fn stderr_tail(&self, n: usize) -> String {
        self.stderr.tail(n)
    }

    /// The last `n` stdout lines, joined.
    pub(crate) fn stdout_tail(&self, n: usize) -> String {
        self.stdout.tail(n)
    }

    /// Every line, stdout then stderr (panics if lines were dropped).
    pub(crate) fn all_output(&self) -> String {
        self.assert_complete();
        let mut s = self.stdout.tail(usize::MAX);
        s.push('\n');
        s.push_str(&self.stderr.tail(usize::MAX));
        s
    }

    /// How many stderr lines have been written so far: a mark for [`Logs::stderr_from`].
    pub(crate) fn stderr_mark(&self) -> usize {
        self.stderr.pushed
    }

    /// The stderr lines written since `mark`, joined (panics if lines were dropped).
    pub(crate) fn stderr_from(&self, mark: usize) -> String {
        self.assert_complete();
        let lines: Vec<&str> = self
            .stderr
            .lines
            .iter()
            .skip(mark)
            .map(String::as_str)
            .collect();
        lines.join("\n")
    }
}

pub(crate) type SharedLogs = Arc<Mutex<Logs>>;

/// Appends `line` to the stdout or stderr log.
pub(crate) fn push_line(logs: &SharedLogs, stderr: bool, line: String) {
    let mut l = logs.lock().unwrap();
    if stderr {
        l.stderr.push(line);
    } else {
        l.stdout.push(line);
    }
}

/// Reads `pipe` line by line until EOF, handing every line to `each`.
pub(crate) fn pump(
    pipe: impl Read + Send + 'static,
    mut each: impl FnMut(String) + Send + 'static,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    each(line.trim_end_matches(['\n', '\r']).to_owned());
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(extra: usize) -> Logs {
        let mut l = Logs::default();
        for i in 0..LOG_CAP + extra {
            l.stderr.push(format!("line {i}"));
        }
        l
    }

    #[test]
    fn a_full_log_keeps_every_line() {
        let l = filled(0);
        assert_eq!(l.dropped(), 0);
        l.assert_complete();
        assert!(l.stderr_from(0).starts_with("line 0\n"));
    }

    #[test]
    fn lines_past_the_cap_are_counted() {
        let mut l = filled(3);
        l.stdout.push("out".into());
        assert_eq!(l.dropped(), 3);
        assert_eq!(l.stderr.tail(1), format!("line {}", LOG_CAP + 2));
    }

    #[test]
    #[should_panic(expected = "3 server log lines were dropped")]
    fn searching_a_truncated_log_fails() {
        filled(3).stderr_from(0);
    }
}
