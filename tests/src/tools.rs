//! The command-line tools run against a server: `wardctl` (as a given identity, or bare) and
//! `grpcurl`, each to completion under a timeout.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::find_bin;
use crate::TestServer;

/// How long one `wardctl` or `grpcurl` invocation may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of the `wardctl` binary: `$WARDCTL_BIN`, else next to the test executable.
pub fn wardctl_bin() -> PathBuf {
    find_bin("WARDCTL_BIN", "wardctl")
}

/// Runs `cmd` with `stdin` (if any) to completion, killing it after [`TOOL_TIMEOUT`].
pub fn run_tool(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        // A tool that exits without reading stdin closes the pipe; that is its business.
        thread::spawn(move || drop(pipe.write_all(&data)))
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {TOOL_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

impl TestServer {
    /// Runs `wardctl --addr .. --ca .. --cert .. --key .. <args>` as `admin`.
    pub fn wardctl(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.wardctl_as("admin", args, stdin)
    }

    /// Runs `wardctl` with `identity`'s certificates given as flags.
    pub fn wardctl_as(&self, identity: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let f = self.identity_files(identity);
        let mut cmd = self.wardctl_command();
        cmd.arg("--addr")
            .arg(self.addr.to_string())
            .arg("--ca")
            .arg(&f.ca)
            .arg("--cert")
            .arg(&f.cert)
            .arg("--key")
            .arg(&f.key)
            .args(args);
        run_tool(cmd, stdin)
    }

    /// A bare `wardctl` command with no WARD_* variables inherited (add flags or env yourself).
    pub fn wardctl_command(&self) -> Command {
        let mut cmd = Command::new(wardctl_bin());
        for v in ["WARD_ADDR", "WARD_CA", "WARD_CERT", "WARD_KEY"] {
            cmd.env_remove(v);
        }
        cmd
    }

    /// Runs `grpcurl -cacert .. -cert .. -key .. <flags> <addr> <tail>` as `admin`.
    pub fn grpcurl(&self, flags: &[&str], tail: &[&str]) -> Output {
        self.grpcurl_as("admin", flags, tail)
    }

    /// Runs grpcurl with `identity`'s certificates.
    pub fn grpcurl_as(&self, identity: &str, flags: &[&str], tail: &[&str]) -> Output {
        let f = self.identity_files(identity);
        let mut cmd = Command::new("grpcurl");
        cmd.arg("-max-time")
            .arg("30")
            .arg("-cacert")
            .arg(&f.ca)
            .arg("-cert")
            .arg(&f.cert)
            .arg("-key")
            .arg(&f.key)
            .args(flags)
            .arg(self.addr.to_string())
            .args(tail);
        run_tool(cmd, None)
    }
}
