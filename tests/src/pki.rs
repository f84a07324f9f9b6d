//! Certificates for the tests: new CAs (for rotation and foreign-CA tests), client and server
//! certificates signed by them or by a server's dev CA, CRLs, and the files they are written to.

use std::path::{Path, PathBuf};

use crate::{random_hex, TestServer};

/// A CA certificate, a client certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// CA certificate (PEM) the client trusts for the server.
    pub ca: PathBuf,
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Client private key (PEM).
    pub key: PathBuf,
}

/// Makes a brand-new CA (unknown to any server) and a client certificate with subject CN `cn`
/// signed by it, written under `dir` as `<cn>-foreign-{ca,cert,key}.pem`.
pub fn foreign_identity(dir: &Path, cn: &str) -> CertFiles {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Foreign test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let (cert, key) = client_cert(cn, None, &issuer);
    let files = CertFiles {
        ca: dir.join(format!("{cn}-foreign-ca.pem")),
        cert: dir.join(format!("{cn}-foreign-cert.pem")),
        key: dir.join(format!("{cn}-foreign-key.pem")),
    };
    std::fs::write(&files.ca, ca_cert.pem()).unwrap();
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    files
}

/// A client certificate (PEM) and key (PEM) for subject CN `cn` and an optional URI SAN.
pub(crate) fn client_cert(
    cn: &str,
    uri_san: Option<&str>,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> (String, String) {
    client_cert_with(cn, issuer, |params| {
        if let Some(uri) = uri_san {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
    })
}

/// A client certificate for subject CN `cn` (clientAuth EKU, digitalSignature), adjusted by
/// `customize` before signing (validity, EKU, serial number, …).
fn client_cert_with(
    cn: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    customize: impl FnOnce(&mut rcgen::CertificateParams),
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    customize(&mut params);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A test certificate authority (for CA rotation tests): its certificate and signing key.
pub struct TestCa {
    /// The CA certificate (PEM).
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new self-signed CA named `cn`, allowed to sign certificates and CRLs.
    pub fn new(cn: &str) -> TestCa {
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
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A client certificate for CN `cn`: (cert PEM, key PEM).
    pub fn client_cert(&self, cn: &str) -> (String, String) {
        client_cert(cn, None, &self.issuer)
    }

    /// A client certificate for CN `cn` with serial number `serial` (to revoke it by a CRL).
    pub fn client_cert_serial(&self, cn: &str, serial: u64) -> (String, String) {
        client_cert_with(cn, &self.issuer, |p| p.serial_number = Some(serial.into()))
    }

    /// A CRL (PEM) of this CA revoking the given serial numbers, with CRL number `number` and
    /// its nextUpdate on 1 January of `next_update_year` (a past year makes a stale list).
    pub fn crl(&self, number: u64, next_update_year: i32, revoked: &[u64]) -> String {
        crl_pem(&self.issuer, number, next_update_year, revoked)
    }

    /// A server certificate for localhost / 127.0.0.1: (cert PEM, key PEM).
    pub fn server_cert(&self) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "server");
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A CRL (PEM) signed by `issuer` that revokes the certificates with the given serial numbers,
/// issued in 2024 with its nextUpdate on 1 January of `next_update_year`.
fn crl_pem(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    number: u64,
    next_update_year: i32,
    revoked: &[u64],
) -> String {
    let params = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2024, 1, 1),
        next_update: rcgen::date_time_ymd(next_update_year, 1, 1),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(*serial),
                revocation_time: rcgen::date_time_ymd(2025, 1, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params.signed_by(issuer).unwrap().pem().unwrap()
}

/// A file name made from a certificate's CN (which may hold `/`, `:` or control characters).
fn file_stem(cn: &str) -> String {
    cn.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Rebuilds an rcgen issuer from an existing CA certificate and key (PEM): the issuer name must
/// be byte-identical to the CA's subject, so every attribute keeps its string type.
fn issuer_from_pem(ca_pem: &str, ca_key_pem: &str) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).expect("ca.pem is PEM");
    let x509 = pem.parse_x509().expect("ca.pem is a certificate");
    let mut dn = rcgen::DistinguishedName::new();
    for attr in x509.subject().iter_attributes() {
        let oid: Vec<u64> = attr.attr_type().iter().expect("small OID").collect();
        let raw = attr.attr_value().data;
        let text = String::from_utf8(raw.to_vec()).expect("CA subject is text");
        let value = match attr.attr_value().tag() {
            Tag::Utf8String => rcgen::DnValue::Utf8String(text),
            Tag::PrintableString => rcgen::DnValue::PrintableString(text.try_into().unwrap()),
            Tag::Ia5String => rcgen::DnValue::Ia5String(text.try_into().unwrap()),
            t => panic!("CA subject attribute with string type {t:?} not supported by the harness"),
        };
        dn.push(rcgen::DnType::from_oid(&oid), value);
    }
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = dn;
    params.key_usages = Vec::new();
    let key = rcgen::KeyPair::from_pem(ca_key_pem).expect("ca.key is a PKCS#8 PEM key");
    rcgen::Issuer::new(params, key)
}

impl TestServer {
    /// `DIR/tls/ca.pem`.
    pub fn ca_path(&self) -> PathBuf {
        self.path.join("tls").join("ca.pem")
    }

    /// The dev CA and the certificate files of `identity` (`admin` or `app`).
    pub fn identity_files(&self, identity: &str) -> CertFiles {
        let tls = self.path.join("tls");
        CertFiles {
            ca: tls.join("ca.pem"),
            cert: tls.join(format!("{identity}.pem")),
            key: tls.join(format!("{identity}.key")),
        }
    }

    /// A new client certificate with subject CN `cn` (and an optional URI SAN) signed by the dev
    /// CA, written under DIR/e2e-certs/. The server will accept its TLS; policy decides the rest.
    pub fn issue_dev_cert(&self, cn: &str, uri_san: Option<&str>) -> CertFiles {
        let tls = self.path.join("tls");
        let ca_pem = std::fs::read_to_string(tls.join("ca.pem")).unwrap();
        let ca_key = std::fs::read_to_string(tls.join("ca.key")).unwrap();
        let issuer = issuer_from_pem(&ca_pem, &ca_key);
        let (cert, key) = client_cert(cn, uri_san, &issuer);
        let out = self.scratch_dir();
        let unique = random_hex(8);
        let stem = file_stem(cn);
        let files = CertFiles {
            ca: tls.join("ca.pem"),
            cert: out.join(format!("{stem}-{unique}.pem")),
            key: out.join(format!("{stem}-{unique}.key")),
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        files
    }

    /// Like [`issue_dev_cert`](Self::issue_dev_cert) (no URI SAN), with the parameters adjusted
    /// by `customize` before the dev CA signs (validity, EKU, serial number, …).
    pub fn issue_dev_cert_with(
        &self,
        cn: &str,
        customize: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> CertFiles {
        let (cert, key) = client_cert_with(cn, &self.dev_issuer(), customize);
        self.write_client_files(cn, &cert, &key)
    }

    /// A CRL (PEM) signed by the dev CA revoking the given serial numbers; `number` is its CRL
    /// number (increase it with each new list).
    pub fn dev_crl(&self, number: u64, revoked: &[u64]) -> String {
        crl_pem(&self.dev_issuer(), number, 2099, revoked)
    }

    fn dev_issuer(&self) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let tls = self.path.join("tls");
        let ca_pem = std::fs::read_to_string(tls.join("ca.pem")).unwrap();
        let ca_key = std::fs::read_to_string(tls.join("ca.key")).unwrap();
        issuer_from_pem(&ca_pem, &ca_key)
    }

    /// Writes a client certificate and key under the scratch dir, with the dev CA as trust.
    pub fn write_client_files(&self, cn: &str, cert: &str, key: &str) -> CertFiles {
        let out = self.scratch_dir();
        let unique = random_hex(8);
        let stem = file_stem(cn);
        let files = CertFiles {
            ca: self.ca_path(),
            cert: out.join(format!("{stem}-{unique}.pem")),
            key: out.join(format!("{stem}-{unique}.key")),
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        files
    }
}
