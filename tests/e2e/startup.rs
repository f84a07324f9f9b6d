//! `serve` start-up failures: a clear message on stderr and the documented exit code (2 config
//! or usage, 3 HSM, 4 storage), and no master key is ever created outside dev mode.

use std::process::Command;

use ward_tests::{move_entries, run_tool, server_bin, FailedStart, TestServer};

use crate::hsm_faults::{init_token, token_label};
use crate::{assert_value, put};

fn assert_exit(f: &FailedStart, code: i32, mentions: &[&str], what: &str) {
    assert_eq!(
        f.code,
        Some(code),
        "{what}: exit code\n--- stderr ---\n{}",
        f.stderr
    );
    let lower = f.stderr.to_lowercase();
    assert!(
        mentions.iter().any(|m| lower.contains(m)),
        "{what}: stderr should mention one of {mentions:?}\n--- stderr ---\n{}",
        f.stderr
    );
}

/// A server with one secret in it, stopped.
async fn stopped_server_with_data() -> TestServer {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    put(&mut c, "boot/a", b"still here").await;
    drop(c);
    s.stop();
    s
}

async fn assert_still_works(s: &mut TestServer) {
    s.restart();
    let mut c = s.raw_client("admin").await;
    assert_value(&mut c, "boot/a", 1, b"still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_and_wrong_pin() {
    let mut s = stopped_server_with_data().await;
    let dir = s.data_dir().to_path_buf();

    // Usage and configuration errors: 2.
    let o = run_tool(Command::new(server_bin()), None);
    assert_eq!(o.status.code(), Some(2), "no subcommand");
    let mut cmd = Command::new(server_bin());
    cmd.arg("serve");
    assert_eq!(
        run_tool(cmd, None).status.code(),
        Some(2),
        "serve without --config"
    );
    let f = s.serve_expect_failure(&dir.join("no-such.toml"), &[]);
    assert_exit(&f, 2, &["no-such.toml"], "missing config file");
    let garbage = dir.join("garbage.toml");
    std::fs::write(&garbage, "this is [[ not toml").unwrap();
    let f = s.serve_expect_failure(&garbage, &[]);
    assert_exit(
        &f,
        2,
        &["garbage.toml", "toml", "config"],
        "unparsable config",
    );

    // A PIN that does not open the token: 3, and the message names the PIN, not its value.
    let pin = std::fs::read_to_string(dir.join("hsm.pin")).unwrap();
    let f = s.serve_expect_failure(&s.config_path(), &[("WARD_HSM_PIN", "wrong-pin-1234")]);
    assert_exit(&f, 3, &["pin"], "wrong PIN from the environment");
    assert!(!f.stderr.contains("wrong-pin-1234"), "stderr shows the PIN");
    std::fs::write(dir.join("hsm.pin"), "another-wrong-pin\n").unwrap();
    let f = s.serve_expect_failure(&s.config_path(), &[]);
    assert_exit(&f, 3, &["pin"], "wrong PIN in the pin file");
    assert!(
        !f.stderr.contains("another-wrong-pin"),
        "stderr shows the PIN"
    );
    std::fs::write(dir.join("hsm.pin"), &pin).unwrap();

    assert_still_works(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_or_master_key_fails_closed() {
    let mut s = stopped_server_with_data().await;
    let dir = s.data_dir().to_path_buf();
    let (_, tokendir) = s.softhsm_paths();
    let backup = s.scratch_dir().join("tokens-backup");

    let label = token_label(&s);

    // No token at all: 3.
    move_entries(&tokendir, &backup);
    let f = s.serve_expect_failure(&s.config_path(), &[]);
    assert_exit(&f, 3, &["token"], "token missing");

    // A token with the right label and PIN but no master key: 3, and serve must not create one
    // (a second attempt fails the same way).
    let pin = std::fs::read_to_string(dir.join("hsm.pin")).unwrap();
    init_token(&s, &label, pin.trim());
    for attempt in 1..=2 {
        let f = s.serve_expect_failure(&s.config_path(), &[]);
        assert_exit(
            &f,
            3,
            &["master key"],
            &format!("master key missing, attempt {attempt}"),
        );
    }

    // Put the real token back: everything is as before.
    for e in std::fs::read_dir(&tokendir).unwrap() {
        std::fs::remove_dir_all(e.unwrap().path()).unwrap();
    }
    move_entries(&backup, &tokendir);
    assert_still_works(&mut s).await;
}

/// `[hsm] module` naming no PKCS#11 library: exit 3 (HSM), and a message that says which
/// module could not be loaded and why, whether the path is missing, not a library at all, or a
/// real shared library without the PKCS#11 entry point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pkcs11_module_exits_3_naming_it() {
    let mut s = stopped_server_with_data().await;
    let config = std::fs::read_to_string(s.config_path()).unwrap();
    let module_line = config
        .lines()
        .find(|l| l.starts_with("module = "))
        .expect("a module line in [hsm]")
        .to_owned();
    let not_a_library = s.scratch_dir().join("not-a-library.so");
    std::fs::write(&not_a_library, b"just text").unwrap();
    // A real shared library that is not a PKCS#11 module (no C_GetFunctionList).
    let libz = [
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/x86_64-linux-gnu/libz.so.1",
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file());
    let mut cases = vec![
        (
            s.scratch_dir().join("no-such-module.so"),
            "No such file",
            "missing",
        ),
        (not_a_library, "libloading", "not a library"),
    ];
    match libz {
        Some(p) => cases.push((p, "C_GetFunctionList", "a library without PKCS#11")),
        None => eprintln!("libz.so.1 not found: the non-PKCS#11 library case is not run"),
    }
    for (path, why, what) in cases {
        let line = format!("module = \"{}\"", path.display());
        s.edit_config(|t| t.replace(&module_line, &line));
        let f = s.serve_expect_failure(&s.config_path(), &[]);
        assert_exit(&f, 3, &["pkcs#11 module"], what);
        let said = format!(
            "ward-server: HSM: cannot load PKCS#11 module {}",
            path.display()
        );
        assert!(
            f.stderr.contains(&said) && f.stderr.contains(why),
            "{what}: the message should say {said:?} and {why:?}\n--- stderr ---\n{}",
            f.stderr
        );
        s.edit_config(|t| t.replace(&line, &module_line));
    }
    assert_still_works(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_errors_exit_4() {
    let mut s = stopped_server_with_data().await;
    let data = s.data_dir().join("data");
    let aside = s.scratch_dir().join("data-aside");

    // The data directory replaced by a file.
    std::fs::rename(&data, &aside).unwrap();
    std::fs::write(&data, b"not a database").unwrap();
    let f = s.serve_expect_failure(&s.config_path(), &[]);
    assert_exit(
        &f,
        4,
        &["data", "storage", "sled", "database"],
        "data dir is a file",
    );
    std::fs::remove_file(&data).unwrap();
    std::fs::rename(&aside, &data).unwrap();

    // A second server on a data dir that the first holds locked.
    assert_still_works(&mut s).await;
    let f = s.serve_expect_failure(&s.config_path(), &[]);
    assert_exit(
        &f,
        4,
        &["lock", "data", "storage", "sled", "database"],
        "data dir locked",
    );
    // The first one is unharmed.
    let mut c = s.raw_client("admin").await;
    assert_value(&mut c, "boot/a", 0, b"still here").await;
}
