//! [`TestServer`]: a `ward-server` in its own temporary data directory, started, stopped,
//! killed and restarted by the test, with its configuration edited in between.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::logs::{push_line, SharedLogs};
use crate::process::{FailedStart, Proc, StartFailure, STOP_TIMEOUT};

/// A `ward-server` child process in its own temporary data directory.
pub struct TestServer {
    pub(crate) dir: Option<tempfile::TempDir>,
    pub(crate) path: PathBuf,
    pub(crate) proc: Option<Proc>,
    pub(crate) addr: SocketAddr,
    pub(crate) logs: SharedLogs,
    /// The test clock's offset in ms, when the server runs with one.
    pub(crate) clock_offset_ms: Mutex<Option<i64>>,
}

/// File name (in the data dir) of the test-only clock offset.
pub const TEST_CLOCK_FILE: &str = "test-clock-offset-ms";
/// Sweep interval of servers started with a test clock: moves of the clock show up fast.
pub const TEST_SWEEP_INTERVAL_MS: u64 = 50;

/// The `[lifecycle]` and `[testing]` tables of a server on the test clock: the clock file
/// [`TEST_CLOCK_FILE`] in the data dir and a fast sweeper.
pub(crate) fn test_clock_tables() -> String {
    format!(
        "\n[lifecycle]\nsweep_interval_ms = {TEST_SWEEP_INTERVAL_MS}\n\n\
         [testing]\nclock_file = \"{TEST_CLOCK_FILE}\"\n"
    )
}

impl TestServer {
    /// Spawns `ward-server dev --data-dir <fresh tempdir> --listen 127.0.0.1:0` and waits for
    /// its ready line (panics with the server's stderr after [`START_TIMEOUT`](crate::START_TIMEOUT)).
    pub fn start() -> TestServer {
        Self::start_with_env(&[])
    }

    /// [`start`](Self::start) with extra environment variables for the server process.
    pub fn start_with_env(envs: &[(&str, &str)]) -> TestServer {
        Self::start_prepared(envs, |_| {})
    }

    /// A dev server with everything of its own (data dir, SoftHSM token, store, audit log)
    /// except its `tls/` directory, a copy of `other`'s: the same dev CA, server and client
    /// certificates, so one client certificate and CA reach both — a client can fail over
    /// between them. (Each dev server otherwise makes its own CA.)
    pub fn start_with_tls_of(other: &TestServer) -> TestServer {
        Self::start_prepared(&[], |dir| {
            copy_dir(&other.path.join("tls"), &dir.join("tls"), &|_| false)
        })
    }

    /// Makes a fresh data dir, lets `prepare` put files in it, then runs dev mode on it.
    fn start_prepared(envs: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("ward-e2e-")
            .tempdir()
            .expect("create temp data dir");
        prepare(dir.path());
        let mut server = Self::stopped_in(dir);
        server.launch(&server.dev_args(), envs);
        server
    }

    /// `ward-server serve --config DIR/ward.toml` on a directory the caller prepared (the
    /// config and every file it names), waiting for its ready line.
    pub(crate) fn serve_in(dir: tempfile::TempDir) -> TestServer {
        let mut server = Self::stopped_in(dir);
        server.restart();
        server
    }

    /// A server of `dir` that is not running yet.
    fn stopped_in(dir: tempfile::TempDir) -> TestServer {
        TestServer {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            proc: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs: SharedLogs::default(),
            clock_offset_ms: Mutex::new(None),
        }
    }

    /// A server whose time the test moves with [`advance_clock`](Self::advance_clock): dev
    /// mode creates everything, then the server is restarted (`serve`) with the test-only
    /// `[testing] clock_file` and a fast sweeper appended to its ward.toml.
    pub fn start_with_test_clock() -> TestServer {
        let mut s = Self::start();
        s.stop();
        std::fs::write(s.path.join(TEST_CLOCK_FILE), "0").unwrap();
        let mut cfg = std::fs::read_to_string(s.config_path()).unwrap();
        cfg.push_str(&test_clock_tables());
        std::fs::write(s.config_path(), cfg).unwrap();
        *s.clock_offset_ms.lock().unwrap() = Some(0);
        s.restart();
        s
    }

    /// Moves the server's clock forward by `d` (the offset file is replaced atomically, and
    /// the server reads it on every clock reading). Only for [`start_with_test_clock`].
    ///
    /// [`start_with_test_clock`]: Self::start_with_test_clock
    pub fn advance_clock(&self, d: Duration) {
        let mut offset = self.clock_offset_ms.lock().unwrap();
        let now = offset.expect("advance_clock needs TestServer::start_with_test_clock");
        let next = now + i64::try_from(d.as_millis()).unwrap();
        let tmp = self.path.join(format!("{TEST_CLOCK_FILE}.tmp"));
        std::fs::write(&tmp, next.to_string()).unwrap();
        std::fs::rename(&tmp, self.path.join(TEST_CLOCK_FILE)).unwrap();
        *offset = Some(next);
    }

    /// How far the test has moved the server's clock.
    pub fn clock_offset(&self) -> Duration {
        let ms = self.clock_offset_ms.lock().unwrap().unwrap_or(0);
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }

    /// Stops the server and starts it again (`serve`) on the same address, so clients that
    /// keep their channel (the SDK cache) can reconnect.
    pub fn restart_on_same_port(&mut self) {
        if self.proc.is_some() {
            self.stop();
        }
        let cfg = std::fs::read_to_string(self.config_path()).unwrap();
        // Only the top-level (gRPC) listen line; later tables ([metrics]) have their own.
        let mut done = false;
        let cfg: String = cfg
            .lines()
            .map(|l| {
                if !done && l.starts_with("listen = ") {
                    done = true;
                    format!("listen = \"{}\"", self.addr)
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(self.config_path(), cfg + "\n").unwrap();
        let want = self.addr;
        self.launch(&self.serve_args(), &[]);
        assert_eq!(self.addr, want, "restarted on another address");
    }

    fn dev_args(&self) -> Vec<OsString> {
        vec![
            "dev".into(),
            "--data-dir".into(),
            self.path.clone().into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ]
    }

    fn serve_args(&self) -> Vec<OsString> {
        vec!["serve".into(), "--config".into(), self.config_path().into()]
    }

    fn launch(&mut self, args: &[OsString], envs: &[(&str, &str)]) {
        assert!(self.proc.is_none(), "a server is already running");
        let mut proc = Proc::spawn(args, envs, &self.logs);
        let result = proc.wait_ready();
        self.proc = Some(proc);
        match result {
            Ok(addr) => self.addr = addr,
            Err(why) => {
                self.proc = None;
                panic!(
                    "ward-server {args:?} did not become ready: {why}\n--- stderr (last 60 lines) ---\n{}\n--- stdout (last 20 lines) ---\n{}",
                    self.stderr_tail(60),
                    self.stdout_tail(20)
                );
            }
        }
    }

    /// Starts `serve --config DIR/ward.toml` (stopping the running server first) and reports
    /// whether it became ready; if it exited instead, its exit code and the stderr it wrote.
    /// Panics if it neither gets ready nor exits within [`START_TIMEOUT`](crate::START_TIMEOUT).
    pub fn try_restart(&mut self) -> Result<(), FailedStart> {
        if self.proc.is_some() {
            self.stop();
        }
        let from = self.logs.lock().unwrap().stderr_mark();
        let mut proc = Proc::spawn(&self.serve_args(), &[], &self.logs);
        let result = proc.wait_ready();
        // Past the harness's own spawn line.
        let stderr = || self.logs.lock().unwrap().stderr_from(from + 1);
        match result {
            Ok(addr) => {
                self.proc = Some(proc);
                self.addr = addr;
                Ok(())
            }
            Err(StartFailure::Exited(status)) => Err(FailedStart {
                code: status.code(),
                stderr: stderr(),
            }),
            Err(other) => panic!("serve neither got ready nor exited: {other}\n{}", stderr()),
        }
    }

    /// Runs `ward-server serve --config <config>` with `envs`, expecting it to refuse to start.
    /// Panics if it gets to its ready line (and kills it).
    pub fn serve_expect_failure(&self, config: &Path, envs: &[(&str, &str)]) -> FailedStart {
        let logs = SharedLogs::default();
        let args: Vec<OsString> = vec!["serve".into(), "--config".into(), config.into()];
        let mut p = Proc::spawn(&args, envs, &logs);
        let result = p.wait_ready();
        let stderr = logs.lock().unwrap().stderr_from(1); // past the harness's spawn line
        match result {
            Err(StartFailure::Exited(status)) => FailedStart {
                code: status.code(),
                stderr,
            },
            Ok(addr) | Err(StartFailure::ExitedAfterReady(addr, _)) => {
                p.kill_and_drain();
                panic!("serve {config:?} with {envs:?} was expected to fail but became ready on {addr}\n--- stderr ---\n{stderr}");
            }
            Err(other) => panic!(
                "serve {config:?} with {envs:?} was expected to exit with an error, but it {other}\n--- stderr ---\n{stderr}"
            ),
        }
    }

    /// Starts the production path on the same data dir: `ward-server serve --config DIR/ward.toml`
    /// (stopping the running server first, if any). The address changes: make new clients.
    pub fn restart(&mut self) {
        self.restart_with_env(&[]);
    }

    /// [`restart`](Self::restart) with extra environment variables for the server.
    pub fn restart_with_env(&mut self, envs: &[(&str, &str)]) {
        if self.proc.is_some() {
            self.stop();
        }
        self.launch(&self.serve_args(), envs);
    }

    /// Runs `ward-server dev` again on the same data dir (it must reuse everything).
    pub fn restart_dev(&mut self) {
        self.restart_dev_with_env(&[]);
    }

    /// [`restart_dev`](Self::restart_dev) with extra environment variables for the server.
    pub fn restart_dev_with_env(&mut self, envs: &[(&str, &str)]) {
        if self.proc.is_some() {
            self.stop();
        }
        self.launch(&self.dev_args(), envs);
    }

    /// SIGTERMs the server and waits for it to exit (panics after [`STOP_TIMEOUT`], after
    /// killing it). Returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut p = self.proc.take().expect("no server running");
        push_line(&self.logs, true, "[harness] SIGTERM".into());
        let sent = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                p.drain();
                return status;
            }
            if Instant::now() > deadline {
                p.kill_and_drain();
                panic!(
                    "ward-server did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- stderr ---\n{}",
                    self.stderr_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server (no chance to flush or clean up) and reaps it.
    pub fn kill9(&mut self) {
        let mut p = self.proc.take().expect("no server running");
        push_line(&self.logs, true, "[harness] kill -9".into());
        p.kill_and_drain();
    }

    /// If the server process has exited by itself: `Some(exit code)` (`Some(None)` if a signal
    /// ended it), with its output drained; `None` while it runs.
    pub fn exit_code(&mut self) -> Option<Option<i32>> {
        let p = self.proc.as_mut()?;
        let status = p.child.try_wait().unwrap()?;
        let mut p = self.proc.take().unwrap();
        p.drain();
        Some(status.code())
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.proc.as_mut() {
            Some(p) => p.child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// The running server's process id.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("no server running").child.id()
    }

    /// Sends `signal` (a `kill` name such as `HUP`) to the running server.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// The data directory (`--data-dir`).
    pub fn data_dir(&self) -> &Path {
        &self.path
    }

    /// `DIR/ward.toml`, the serve configuration dev mode writes.
    pub fn config_path(&self) -> PathBuf {
        self.path.join("ward.toml")
    }

    /// The address the running server reported in its ready line.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A directory for the test's own files (DIR/e2e-scratch), created on demand.
    pub fn scratch_dir(&self) -> PathBuf {
        let d = self.path.join("e2e-scratch");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Rewrites DIR/ward.toml (used by [`restart`](Self::restart)) with `edit`.
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, edit(text)).unwrap();
    }

    /// Sets `key = value` in the config's `[limits]` table (appending to the file would land in
    /// whichever table comes last).
    pub fn set_limit(&self, key: &str, value: &str) {
        self.edit_config(|t| {
            assert!(t.contains("[limits]\n"), "the config has no [limits] table");
            t.replacen("[limits]\n", &format!("[limits]\n{key} = {value}\n"), 1)
        });
    }

    /// Appends `text` (e.g. an `[audit]` table) to DIR/ward.toml; it takes effect at the next
    /// [`restart`](Self::restart).
    pub fn append_config(&self, text: &str) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.config_path())
            .unwrap();
        writeln!(f, "\n{text}").unwrap();
    }
}

/// What the server processes printed (kept by the `logs` module).
impl TestServer {
    /// How many lines the server(s) wrote to stderr containing `needle` (panics if the log
    /// lost lines).
    pub fn count_in_stderr(&self, needle: &str) -> usize {
        self.logs.lock().unwrap().count_in_stderr(needle)
    }

    /// Waits until at least `n` stderr lines contain `needle`; panics with the log tail after
    /// `timeout`.
    pub fn wait_for_stderr(&self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count_in_stderr(needle) < n {
            assert!(
                Instant::now() < deadline,
                "no {n} stderr lines with {needle:?} within {timeout:?}\n--- stderr ---\n{}",
                self.stderr_tail(30)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` lines the server(s) wrote to stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        self.logs.lock().unwrap().stderr_tail(n)
    }

    /// The last `n` lines the server(s) wrote to stdout.
    pub fn stdout_tail(&self, n: usize) -> String {
        self.logs.lock().unwrap().stdout_tail(n)
    }

    /// Everything every server process in this data dir printed so far (stdout, then stderr;
    /// panics if the log lost lines).
    pub fn all_output(&self) -> String {
        self.logs.lock().unwrap().all_output()
    }
}

/// Copies directory `from` into `to` (created if missing), recursively, leaving out the
/// entries `skip` names by their path under `from`, keeping the permission bits of every file
/// and directory (dev mode keeps `tls/` and its keys private to the user).
pub(crate) fn copy_dir(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) {
    copy_under(from, to, Path::new(""), skip);
}

fn copy_under(from: &Path, to: &Path, rel: &Path, skip: &dyn Fn(&Path) -> bool) {
    if !to.exists() {
        std::fs::create_dir(to).unwrap();
    }
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst, rel) = (
            entry.path(),
            to.join(entry.file_name()),
            rel.join(entry.file_name()),
        );
        if skip(&rel) {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_under(&src, &dst, &rel, skip);
        } else {
            // `fs::copy` keeps the file's permission bits.
            std::fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
        }
    }
    let perms = std::fs::metadata(from).unwrap().permissions();
    std::fs::set_permissions(to, perms).unwrap();
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill_and_drain();
        }
        if std::env::var_os("WARD_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("[harness] keeping data dir {}", dir.keep().display());
            }
        }
        // A test must not pass on a log that lost lines (unless it is failing already).
        if !thread::panicking() {
            self.logs.lock().unwrap().assert_complete();
        }
    }
}
