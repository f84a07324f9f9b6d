//! Certificate revocation lists, as README's "Certificates" section documents them: with any
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

/// A second client CA with its own key, so a test can sign revocation lists of any date. (The
/// harness's `TestCa` keeps its key to itself and `dev_crl` has fixed dates; once the harness
/// can sign a CRL with a chosen nextUpdate and a client certificate with a chosen serial, this
/// goes.)
struct CrlCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl CrlCa {
    fn new(cn: &str) -> CrlCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        CrlCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A client certificate for CN `cn` with serial number `serial`, written under the
    /// server's scratch dir (trusting the dev CA for the server).
    fn client(&self, s: &TestServer, cn: &str, serial: u64) -> CertFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(serial.into());
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        s.write_client_files(cn, &cert.pem(), &key.serialize_pem())
    }

    /// A CRL (PEM) revoking `revoked`, issued in 2024 with the given nextUpdate year.
    fn crl(&self, next_update_year: i32, revoked: &[u64]) -> String {
        rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(next_update_year, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2024, 6, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }
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
    let ca = CrlCa::new("Ward test CA with a stale CRL");
    let tls = s.data_dir().join("tls");
    std::fs::write(tls.join("dev.crl.pem"), s.dev_crl(1, &[])).unwrap();
    // nextUpdate 2025-01-01: long past.
    std::fs::write(tls.join("stale.crl.pem"), ca.crl(2025, &[77])).unwrap();
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
    let revoked = ca.client(&s, "admin", 77);
    let good = ca.client(&s, "admin", 78);
    assert_refused(&s, &revoked, "revoked by a stale CRL", REVOKED).await;
    assert_accepted(&s, &good, "not revoked, stale CRL").await;

    // A fresh list for that CA silences the warning on the next reload.
    let reloads = s.count_in_stderr(RELOADED);
    replace_file(
        &tls.join("stale.crl.pem"),
        ca.crl(2099, &[77]).as_bytes(),
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
