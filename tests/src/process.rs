//! One `ward-server` child process: spawning it with its output drained into the shared log,
//! waiting for its ready line, and reaping it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::logs::{pump, push_line, SharedLogs};

/// How long a server may take from spawn to its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// The prefix of the one line the server prints on stdout once it is listening.
pub const READY_PREFIX: &str = "ward-server ready addr=";
/// The prefix of the line naming the plain-HTTP metrics listener (printed before ready).
pub const METRICS_PREFIX: &str = "ward-server metrics addr=";
/// The prefix of the line naming the portal's HTTPS listener (printed before ready).
pub const PORTAL_PREFIX: &str = "ward-server portal addr=";

/// Path of the `ward-server` binary: `$WARD_SERVER_BIN`, else next to the test executable.
pub fn server_bin() -> PathBuf {
    find_bin("WARD_SERVER_BIN", "ward-server")
}

/// The binary `name`: `$var` if set, else next to the test executable.
pub(crate) fn find_bin(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{var}={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // The test executable is target/<profile>/deps/e2e-<hash>; binaries are in target/<profile>.
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect();
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (looked at {candidates:?}, and {var} is unset): \
                 run `cargo build --workspace --bins` first (make test does)"
            )
        })
}

/// One running (or exited) `ward-server` process.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) ready: mpsc::Receiver<Result<SocketAddr, String>>,
    /// The side listeners the server named before its ready line, by prefix.
    pub(crate) listeners: Arc<Mutex<HashMap<&'static str, SocketAddr>>>,
    pub(crate) readers: Vec<JoinHandle<()>>,
}

impl Proc {
    pub(crate) fn spawn(args: &[OsString], envs: &[(&str, &str)], logs: &SharedLogs) -> Proc {
        let bin = server_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .env_remove("WARD_HSM_PIN")
            .env_remove("SOFTHSM2_CONF")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        push_line(
            logs,
            true,
            format!("[harness] spawn {} {args:?} env {envs:?}", bin.display()),
        );
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
        let (tx, rx) = mpsc::channel();
        let out_logs = logs.clone();
        let listeners = Arc::new(Mutex::new(HashMap::new()));
        let seen = listeners.clone();
        let stdout = pump(child.stdout.take().unwrap(), move |line| {
            for prefix in [METRICS_PREFIX, PORTAL_PREFIX] {
                if let Some(rest) = line.trim().strip_prefix(prefix) {
                    if let Ok(addr) = rest.trim().parse::<SocketAddr>() {
                        seen.lock().unwrap().insert(prefix, addr);
                    }
                }
            }
            if let Some(rest) = line.trim().strip_prefix(READY_PREFIX) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("malformed ready line {line:?}: {e}"));
                let _ = tx.send(addr);
            }
            push_line(&out_logs, false, line);
        });
        let err_logs = logs.clone();
        let stderr = pump(child.stderr.take().unwrap(), move |line| {
            push_line(&err_logs, true, line)
        });
        Proc {
            child,
            ready: rx,
            listeners,
            readers: vec![stdout, stderr],
        }
    }

    /// Waits for the ready line. On exit or timeout returns what happened (the process is dead
    /// and its output drained by then).
    pub(crate) fn wait_ready(&mut self) -> Result<SocketAddr, StartFailure> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.ready.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(addr)) => return Ok(addr),
                Ok(Err(msg)) => {
                    self.kill_and_drain();
                    return Err(StartFailure::Malformed(msg));
                }
                Err(_) => {}
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                if let Ok(Ok(addr)) = self.ready.try_recv() {
                    return Err(StartFailure::ExitedAfterReady(addr, status));
                }
                return Err(StartFailure::Exited(status));
            }
            if Instant::now() > deadline {
                self.kill_and_drain();
                return Err(StartFailure::TimedOut);
            }
        }
    }

    pub(crate) fn drain(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    pub(crate) fn kill_and_drain(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.drain();
    }
}

/// Why a server did not get to its ready line.
pub(crate) enum StartFailure {
    Exited(ExitStatus),
    ExitedAfterReady(SocketAddr, ExitStatus),
    TimedOut,
    Malformed(String),
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(status) => write!(f, "exited with {status} before its ready line"),
            Self::ExitedAfterReady(addr, status) => {
                write!(f, "printed ready ({addr}) and exited with {status}")
            }
            Self::TimedOut => write!(f, "no ready line within {START_TIMEOUT:?} (killed)"),
            Self::Malformed(msg) => f.write_str(msg),
        }
    }
}

/// How a start-up that was expected to fail ended.
#[derive(Debug)]
pub struct FailedStart {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Everything the process wrote to stderr.
    pub stderr: String,
}
