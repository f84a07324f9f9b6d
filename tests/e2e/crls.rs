//! Certificate revocation lists, as docs/operating.md documents them: with any
//! CRL configured, a client CA that has none is refused (fail closed); a CRL past its
//! nextUpdate is still applied and logged as a warning; a CRL may be PEM or DER, at start-up and
//! on reload.

use std::time::Duration;

use ward_tests::{replace_file, CertFiles, TestCa, TestServer};

use crate::certs::{assert_accepted, assert_refused, Refusal, REVOKED};

const WAIT: Duration = Duration::from_secs(15);
const RELOADED: &str = "TLS configuration reloaded";
const STALE: &str = "CRL is past its nextUpdate; refresh it";

/// CRLs are configured, but none of them is the issuing CA's (fail closed).
const NO_CRL_FOR_ISSUER: Refusal = Refusal {
    log: "UnknownRevocationStatus",
    alert: "UnknownCA",
};

/// A client certificate of `ca` for CN `cn` with serial `serial`, written under the server's
/// scratch dir (trusting the dev CA for the server).
fn client_with_serial(s: &TestServer, ca: &TestCa, cn: &str, serial: u64) -> CertFiles {
    let (cert, key) = ca.client_cert_serial(cn, serial);
    s.write_client_files(cn, &cert, &key)
}

/// The DER bytes of a PEM CRL.
fn der_of(pem: &str) -> Vec<u8> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("CRL PEM");
    assert_eq!(parsed.label, "X509 CRL");
    parsed.contents
}

/// Points `[tls]` at DIR/tls/client-ca.pem holding `bundle`, with the given CRL files (relative
/// to DIR) and a fast file watcher.
fn configure(s: &TestServer, bundle: &str, crls: &[&str]) {
    let tls = s.data_dir().join("tls");
    std::fs::write(tls.join("client-ca.pem"), bundle).unwrap();
    let list = crls
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    s.edit_config(|t| {
        let t = t
            .replace(
                "client_ca = \"tls/ca.pem\"",
                "client_ca = \"tls/client-ca.pem\"",
            )
            .replace(
                "[tls]\n",
                &format!("[tls]\ncrl = [{list}]\nreload_interval_ms = 100\n"),
            );
        assert!(
            t.contains("tls/client-ca.pem"),
            "no client_ca line in ward.toml"
        );
        t
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_crls_configured_a_client_ca_without_one_is_refused() {
    let mut s = TestServer::start();
    let dev_ca = std::fs::read_to_string(s.ca_path()).unwrap();
    let other = TestCa::new("Ward test CA without a CRL");
    let (cert, key) = other.client_cert("admin");
    let stranger = s.write_client_files("admin", &cert, &key);
    let dev_admin = s.identity_files("admin");

    // Both CAs trusted, no CRL at all: both CAs' clients get in.
    configure(&s, &format!("{dev_ca}{}", other.pem), &[]);
    s.restart();
    assert_accepted(&s, &stranger, "other CA, no CRL configured").await;

    // A CRL for the dev CA only: the other CA's clients are refused, as their revocation
    // status is unknown; the dev CA's still get in.
    s.stop();
    std::fs::write(
        s.data_dir().join("tls").join("dev.crl.pem"),
        s.dev_crl(1, &[]),
    )
    .unwrap();
    s.edit_config(|t| t.replace("crl = []", "crl = [\"tls/dev.crl.pem\"]"));
    s.restart();
    assert_refused(
        &s,
        &stranger,
        "other CA, CRL of the dev CA only",
        NO_CRL_FOR_ISSUER,
    )
    .await;
    assert_accepted(&s, &dev_admin, "dev CA with its CRL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_past_its_next_update_is_applied_and_warned_about() {
    let mut s = TestServer::start();
    let dev_ca = std::fs::read_to_string(s.ca_path()).unwrap();
    let ca = TestCa::new("Ward test CA with a stale CRL");
    let tls = s.data_dir().join("tls");
    std::fs::write(tls.join("dev.crl.pem"), s.dev_crl(1, &[])).unwrap();
    // nextUpdate 2025-01-01: long past.
    std::fs::write(tls.join("stale.crl.pem"), ca.crl(1, 2025, &[77])).unwrap();
    configure(
        &s,
        &format!("{dev_ca}{}", ca.pem),
        &["tls/dev.crl.pem", "tls/stale.crl.pem"],
    );
    s.restart();

    // The warning names the stale list, once, and not the fresh one.
    s.wait_for_stderr(STALE, 1, WAIT);
    assert_eq!(s.count_in_stderr(STALE), 1, "{}", s.stderr_tail(40));
    let line = s
        .stderr_tail(usize::MAX)
        .lines()
        .find(|l| l.contains(STALE))
        .unwrap()
        .to_owned();
    assert!(line.contains("stale.crl.pem"), "{line}");
    assert!(
        line.contains("2025"),
        "the warning should give nextUpdate: {line}"
    );

    // Still applied: the revoked serial is refused, another serial of that CA gets in.
    let revoked = client_with_serial(&s, &ca, "admin", 77);
    let good = client_with_serial(&s, &ca, "admin", 78);
    assert_refused(&s, &revoked, "revoked by a stale CRL", REVOKED).await;
    assert_accepted(&s, &good, "not revoked, stale CRL").await;

    // A fresh list for that CA silences the warning on the next reload.
    let reloads = s.count_in_stderr(RELOADED);
    replace_file(
        &tls.join("stale.crl.pem"),
        ca.crl(2, 2099, &[77]).as_bytes(),
        0o644,
    );
    s.wait_for_stderr(RELOADED, reloads + 1, WAIT);
    assert_eq!(s.count_in_stderr(STALE), 1, "warned about a fresh CRL");
    assert_refused(&s, &revoked, "revoked by the fresh CRL", REVOKED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_der_crl_is_read_at_start_up_and_on_reload() {
    let mut s = TestServer::start();
    let dev_ca = std::fs::read_to_string(s.ca_path()).unwrap();
    let crl = s.data_dir().join("tls").join("crl.der");
    std::fs::write(&crl, der_of(&s.dev_crl(1, &[1002]))).unwrap();
    configure(&s, &dev_ca, &["tls/crl.der"]);
    s.restart();

    let good = s.issue_dev_cert_with("admin", |p| p.serial_number = Some(1001u64.into()));
    let doomed = s.issue_dev_cert_with("admin", |p| p.serial_number = Some(1002u64.into()));
    assert_refused(&s, &doomed, "revoked by a DER CRL", REVOKED).await;
    assert_accepted(&s, &good, "not revoked by the DER CRL").await;

    // A new DER list on disk is picked up by the watcher.
    let reloads = s.count_in_stderr(RELOADED);
    replace_file(&crl, &der_of(&s.dev_crl(2, &[1001, 1002])), 0o644);
    s.wait_for_stderr(RELOADED, reloads + 1, WAIT);
    assert_refused(&s, &good, "revoked by the reloaded DER CRL", REVOKED).await;
}
