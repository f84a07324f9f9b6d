//! Processes the harness starts — a Ward dev server, the echo floor — and what it reads about
//! them from /proc: resident memory, open file descriptors, bytes on disk. Shared by `suite`,
//! `scale` and `soak`, so each starts the server the same way.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use ward_client::{Client, ClientConfig};

/// A started process, killed when dropped.
pub struct Proc(pub Child);

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` and waits for a stdout line starting with `prefix`; returns the process, what
/// follows the prefix and how long it took. Standard error goes to `log` (or nowhere).
pub fn spawn_ready(
    mut cmd: Command,
    prefix: &str,
    log: Option<&Path>,
) -> Result<(Proc, String, Duration), String> {
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).map_err(|e| e.to_string())?),
        None => Stdio::null(),
    };
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix(prefix).map(str::to_owned));
    let ready = started.elapsed();
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    match found {
        Some(rest) => Ok((Proc(child), rest.trim().to_owned(), ready)),
        None => Err(format!("{cmd:?} exited before it was ready")),
    }
}

/// The ward-server binary: `explicit`, else the one next to this ward-bench.
pub fn server_bin(explicit: Option<&Path>) -> Result<PathBuf, String> {
    match explicit {
        Some(p) => Ok(p.to_path_buf()),
        None => std::env::current_exe()
            .map(|me| me.with_file_name("ward-server"))
            .map_err(|e| e.to_string()),
    }
}

/// A Ward dev server (real SoftHSM token, durable store, audit on) in its own directory.
pub struct DevServer {
    /// The server process.
    pub proc: Proc,
    /// `host:port` it listens on.
    pub addr: String,
    /// Its directory (`ward-server dev --data-dir`): config, TLS files, `data/`.
    pub dir: PathBuf,
    /// Time from spawn to the ready line.
    pub ready: Duration,
}

impl DevServer {
    /// Starts `ward-server dev` in `dir` on a free loopback port; its standard error goes to
    /// `log` (or nowhere).
    pub fn start(bin: &Path, dir: &Path, log: Option<&Path>) -> Result<Self, String> {
        let mut cmd = Command::new(bin);
        cmd.args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir);
        let (proc, addr, ready) = spawn_ready(cmd, "ward-server ready addr=", log)?;
        Ok(Self {
            proc,
            addr,
            dir: dir.to_path_buf(),
            ready,
        })
    }

    /// Starts `ward-server serve` on the configuration a dev server left in `dir`.
    pub fn serve_existing(bin: &Path, dir: &Path) -> Result<Self, String> {
        Self::serve_config(bin, dir, &dir.join("ward.toml"), None)
    }

    /// Starts `ward-server serve --config config`, a configuration beside the dev files in
    /// `dir` (its TLS directory is `dir`'s); standard error goes to `log` (or nowhere).
    pub fn serve_config(
        bin: &Path,
        dir: &Path,
        config: &Path,
        log: Option<&Path>,
    ) -> Result<Self, String> {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--config"]).arg(config);
        let (proc, addr, ready) = spawn_ready(cmd, "ward-server ready addr=", log)?;
        Ok(Self {
            proc,
            addr,
            dir: dir.to_path_buf(),
            ready,
        })
    }

    /// The dev TLS directory (CA, server and admin certificates).
    pub fn tls(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// Client configuration as the dev admin.
    pub fn admin_config(&self) -> Result<ClientConfig, String> {
        let tls = self.tls();
        ClientConfig::from_files(
            &self.addr,
            tls.join("ca.pem"),
            tls.join("admin.pem"),
            tls.join("admin.key"),
        )
        .map_err(|e| e.to_string())
    }

    /// `n` connections as the dev admin.
    pub async fn admin_clients(&self, n: u32) -> Result<Vec<Client>, String> {
        let cfg = self.admin_config()?;
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(
                Client::connect(cfg.clone())
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(clients)
    }

    /// The server's resident memory, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.proc.pid())
    }

    /// Bytes under the data directory (sled and the flush mark).
    pub fn data_bytes(&self) -> u64 {
        disk_bytes(&self.dir.join("data"))
    }
}

/// Resident memory of process `pid` (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time process `pid` has used (utime + stime of /proc/PID/stat), in microseconds.
pub fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, the state;
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // /proc counts in USER_HZ ticks, 100 per second on Linux whatever the kernel's HZ.
    Some((utime + stime) * 10_000)
}

/// Open file descriptors of process `pid` (entries of /proc/PID/fd).
pub fn fd_count(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// Bytes in the files under `dir`, recursively.
pub fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A free loopback TCP port.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_from_proc_and_grows_with_work() {
        let pid = std::process::id();
        let before = cpu_us(pid).expect("this process's /proc/PID/stat");
        // Work until the count moves (it moves in 10 ms ticks); bounded, never a hang.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut x = 1u64;
        let grew = loop {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
            }
            std::hint::black_box(x);
            if cpu_us(pid).unwrap() > before {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
        };
        assert!(grew, "CPU time did not move after 10 s of work");
        assert_eq!(cpu_us(u32::MAX), None);
    }
}
