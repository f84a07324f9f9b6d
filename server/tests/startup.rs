//! Start-up failures of the real `ward-server` binary: each gives a clear message on stderr and
//! its documented exit code, and nothing is created by accident outside dev mode.
#![allow(clippy::unwrap_used)] // a test: a panic is a failure, which is what we want

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_ward-server");

/// Runs dev mode once so that DIR holds a token, master key, certificates and config.
fn bootstrap(dir: &Path) {
    let mut child = Command::new(BIN)
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let ready = stdout
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("ward-server ready addr="));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ready, "dev mode never became ready");
}

fn serve(config: &Path, pin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"]).arg(config);
    match pin {
        Some(p) => cmd.env("WARD_HSM_PIN", p),
        None => cmd.env_remove("WARD_HSM_PIN"),
    };
    cmd.output().unwrap()
}

fn assert_fails(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

#[test]
fn startup_failures_are_clear_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    bootstrap(dir.path());
    let config = dir.path().join("ward.toml");
    let text = std::fs::read_to_string(&config).unwrap();

    // A PIN that does not open the token: exit 3, and the PIN itself is never echoed.
    let out = serve(&config, Some("not-the-pin-0000"));
    assert_fails(&out, 3, "PIN");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not-the-pin-0000"));

    // A new store whose configured master key is missing: exit 3, no silent creation, and the
    // data dir is not created either. (An existing store names its own master keys; that case
    // is covered end to end by swapping the token.)
    let other = dir.path().join("other.toml");
    let fresh = text
        .replace("ward-master-1", "ward-master-missing")
        .replace("data_dir = \"data\"", "data_dir = \"data-fresh\"");
    assert_ne!(fresh, text);
    std::fs::write(&other, fresh).unwrap();
    assert_fails(&serve(&other, None), 3, "ward-master-missing");
    let again = serve(&other, None);
    assert_fails(&again, 3, "not found");
    assert!(!dir.path().join("data-fresh").exists());

    // A token that does not exist: exit 3.
    std::fs::write(
        &other,
        text.replace("token_label = \"ward-dev\"", "token_label = \"nope\""),
    )
    .unwrap();
    assert_fails(&serve(&other, None), 3, "nope");

    // A config with an unknown field, or a missing policy: exit 2.
    std::fs::write(&other, format!("surprise = 1\n{text}")).unwrap();
    assert_fails(&serve(&other, None), 2, "surprise");
    std::fs::write(&other, text.replace("policy.toml", "missing-policy.toml")).unwrap();
    assert_fails(&serve(&other, None), 2, "missing-policy.toml");

    // A PKCS#11 module that does not exist: exit 3 or 2, never a crash.
    std::fs::write(&other, text.replace("libsofthsm2.so", "libnothing.so")).unwrap();
    let out = serve(&other, None);
    assert!(matches!(out.status.code(), Some(2 | 3)), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("libnothing.so"));
}
