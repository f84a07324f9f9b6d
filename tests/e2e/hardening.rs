//! Process and file hardening: every file the server writes is private (sled's own files
//! included), a PIN or server key file readable by others stops start-up, core dumps are off,
//! and the PIN never appears in the process's command line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use ward_tests::{files_under, ok, pb, run_tool, server_bin, TestServer};

use crate::put;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every directory under `dir` (itself included).
fn dirs_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        for e in std::fs::read_dir(&out[i]).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.push(e.path());
            }
        }
        i += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_files_no_core_dumps_pin_not_in_argv() {
    let mut s = TestServer::start();
    let pin = std::fs::read_to_string(s.data_dir().join("hsm.pin")).unwrap();
    let pin = pin.trim().to_owned();
    let mut c = s.raw_client("admin").await;
    for i in 0..20 {
        put(&mut c, &format!("hard/s{i}"), &[b'x'; 4000]).await;
    }
    // Values at the size limit, so sled writes whatever side files it uses for large items.
    for i in 0..3 {
        put(&mut c, &format!("hard/big{i}"), &vec![b'y'; 64 * 1024]).await;
    }
    ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "hard/key".into(),
            ..Default::default()
        })
        .await,
        "issue",
    );
    drop(c);

    // Core dumps off: RLIMIT_CORE is 0 (PR_SET_DUMPABLE is checked by a unit test in
    // ward-server: only the process itself can read it back).
    let check_process = |s: &TestServer| {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .expect("core limit line");
        let fields: Vec<&str> = core.split_whitespace().collect();
        assert_eq!(&fields[4..6], ["0", "0"], "core dumps enabled: {core}");
        // The PIN is not on the command line.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", s.pid())).unwrap();
        assert!(
            !cmdline.windows(pin.len()).any(|w| w == pin.as_bytes()),
            "PIN in argv"
        );
    };
    check_process(&s);
    s.restart();
    check_process(&s);
    s.stop();

    // Every file the server wrote is 0600, every directory 0700: the dev files and sled's.
    let data = s.data_dir().join("data");
    let files = files_under(&data);
    assert!(files.len() >= 2, "sled wrote {files:?}");
    for f in files {
        assert_eq!(mode(&f), 0o600, "{f:?} mode {:o}", mode(&f));
    }
    for d in dirs_under(&data) {
        assert_eq!(mode(&d), 0o700, "{d:?} mode {:o}", mode(&d));
    }
    for f in ["hsm.pin", "tls/server.key", "tls/ca.key", "tls/admin.key"] {
        let p = s.data_dir().join(f);
        assert_eq!(mode(&p), 0o600, "{f} mode {:o}", mode(&p));
    }

    // A PIN file or server key that group or others can read stops start-up (exit 2), with a
    // message that names the file and never shows the PIN.
    for (file, what) in [
        ("hsm.pin", "PIN file"),
        ("tls/server.key", "server private key"),
    ] {
        let p = s.data_dir().join(file);
        for wide in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(wide)).unwrap();
            let f = s.serve_expect_failure(&s.config_path(), &[]);
            assert_eq!(f.code, Some(2), "{file} mode {wide:o}: {}", f.stderr);
            assert!(
                f.stderr.contains(what) && f.stderr.contains("chmod 600"),
                "{file} mode {wide:o}: {}",
                f.stderr
            );
            assert!(!f.stderr.contains(&pin), "stderr shows the PIN");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    // There is no PIN flag to misuse.
    let mut cmd = Command::new(server_bin());
    cmd.args(["serve", "--config"])
        .arg(s.config_path())
        .args(["--pin", "1234"]);
    let o = run_tool(cmd, None);
    assert_eq!(o.status.code(), Some(2), "--pin must be a usage error");
    for sub in ["serve", "dev", "init"] {
        let mut cmd = Command::new(server_bin());
        cmd.args([sub, "--help"]);
        let help = String::from_utf8_lossy(&run_tool(cmd, None).stdout).into_owned();
        assert!(
            !help.contains("--pin"),
            "{sub} --help offers --pin:\n{help}"
        );
    }

    // With the files fixed, the server starts again.
    s.restart();
    let mut c = s.raw_client("admin").await;
    crate::assert_value(&mut c, "hard/s3", 1, &[b'x'; 4000]).await;
}
