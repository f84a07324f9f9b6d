//! Development mode: `ward-server dev --data-dir DIR` creates on first run, and reuses
//! afterwards, everything a working server needs under DIR — a SoftHSM token with a
//! non-extractable master key, a dev CA with server and client certificates, a policy and a
//! config file — then serves. Nothing here runs outside dev mode.

use crate::config::Config;
use crate::harden::create_private_dir;
use crate::server::{Listening, StartError};
use rand::{rngs::OsRng, RngCore};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use ward_hsm::{Hsm, HsmError, KeyWrapper, MacSigner, Pkcs11Wrapper};
use zeroize::Zeroizing;

/// Token label of the dev SoftHSM token.
pub const DEV_TOKEN: &str = "ward-dev";
/// Label of the dev master key.
pub const DEV_MASTER_KEY: &str = "ward-master-1";

const DEV_POLICY: &str = r#"# Ward development policy. Deny by default: a call is allowed only if a rule grants it.
# Verbs: read write issue rotate revoke destroy list verify audit admin (or "*").
# Globs: * matches any run of characters (including /), ? any one character.

[[rule]]
identities = ["admin"]
verbs = ["*"]
secrets = ["*"]

[[rule]]
identities = ["app"]
verbs = ["read", "verify"]
secrets = ["*"]
"#;

/// Creates whatever is missing under `dir`, returning the path of its `ward.toml`. Runs before
/// the async runtime starts (it exports SOFTHSM2_CONF).
pub fn prepare_files(dir: &Path, listen: SocketAddr) -> Result<PathBuf, StartError> {
    create_private_dir(dir).map_err(StartError::Config)?;
    let module = ward_hsm::softhsm::find_module().ok_or_else(|| {
        StartError::Hsm(
            "SoftHSM not found (install it: apt-get install softhsm2, or set WARD_PKCS11_MODULE)"
                .into(),
        )
    })?;

    let softhsm_dir = dir.join("softhsm");
    let conf = softhsm_dir.join("softhsm2.conf");
    if !conf.exists() {
        ward_hsm::softhsm::write_config(&softhsm_dir)?;
    }
    ward_hsm::softhsm::export_conf(&conf);

    let pin_file = dir.join("hsm.pin");
    if !pin_file.exists() {
        write_private(&pin_file, random_pin().as_bytes())?;
    }

    let tls = dir.join("tls");
    if !tls.join("ca.pem").exists() {
        create_private_dir(&tls).map_err(StartError::Config)?;
        make_certificates(&tls)?;
    }

    let policy = dir.join("policy.toml");
    if !policy.exists() {
        write_private(&policy, DEV_POLICY.as_bytes())?;
    }

    let config = dir.join("ward.toml");
    if !config.exists() {
        let text = format!(
            r#"# Ward server configuration written by `ward-server dev`. Relative paths are relative
# to this file. Serve it with: ward-server serve --config {config}
listen = "{listen}"
data_dir = "data"
policy = "policy.toml"
issuer = "ward"
environments = ["dev", "staging", "prod"]
default_environment = "dev"

[tls]
cert = "tls/server.pem"
key = "tls/server.key"
client_ca = "tls/ca.pem"

[hsm]
module = "{module}"
token_label = "{DEV_TOKEN}"
master_key_label = "{DEV_MASTER_KEY}"
pin_file = "hsm.pin"
mechanism = "aes-gcm"
sessions = 4
softhsm_conf = "softhsm/softhsm2.conf"

[limits]
max_value_bytes = 65536
max_batch = 100
default_grace_seconds = 86400

[metrics]
# Plain HTTP: /metrics (Prometheus text) and /healthz. Port 0 picks a free port; the server
# prints `ward-server metrics addr=…` before its ready line.
enabled = true
listen = "127.0.0.1:0"

[portal]
# The developer portal (HTTPS, client certificate required, same CA as gRPC). Port 0 picks a
# free port; the server prints `ward-server portal addr=…` before its ready line.
listen = "127.0.0.1:0"
max_key_lifetime = "365d"

[keys]
unknown_key_burst = 100          # unknown keys a caller may present back to back …
unknown_keys_per_minute = 600    # … and per minute in the long run (per client IP)
usage_flush_seconds = 5
# The audit log keeps these defaults unless an [audit] table says otherwise:
# [audit]
# checkpoint_every = 10000          # records between HSM-signed checkpoints…
# checkpoint_interval = "60s"       # …or this long, whichever comes first
# checkpoint_key_label = "ward-audit-1"
# retention = "90d"
# prune_interval = "1h"
# max_streams = 64
# segment_bytes = 67108864          # each file under data/audit/ (64 MiB, allocated whole)
"#,
            config = config.display(),
            module = module.display(),
        );
        write_private(&config, text.as_bytes())?;
    }
    Ok(config)
}

/// Opens the dev token, creating the token, the master key and the audit checkpoint key if
/// they do not exist yet. Blocking (PKCS#11).
pub fn prepare_hsm(cfg: &Config) -> Result<Arc<dyn Hsm>, StartError> {
    let hsm = match crate::server::open_hsm(cfg) {
        Err(StartError::Hsm(_)) if !token_exists(cfg)? => {
            let pin = cfg.pin().map_err(StartError::Config)?;
            // The SO PIN is only needed to create the token; a dev token never needs it again.
            let so_pin = random_pin();
            Pkcs11Wrapper::init_token(&cfg.hsm.module, &cfg.hsm.token_label, &so_pin, &pin)?;
            tracing::info!(token = %cfg.hsm.token_label, "created SoftHSM token");
            crate::server::open_hsm(cfg)?
        }
        other => other?,
    };
    match hsm.create_master_key(&cfg.hsm.master_key_label) {
        Ok(()) => tracing::info!(label = %cfg.hsm.master_key_label, "created master key"),
        Err(HsmError::MasterKeyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    match hsm.create_mac_key(&cfg.audit.checkpoint_key_label) {
        Ok(()) => {
            tracing::info!(label = %cfg.audit.checkpoint_key_label, "created audit checkpoint key")
        }
        Err(HsmError::MacKeyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Arc::new(hsm))
}

fn token_exists(cfg: &Config) -> Result<bool, StartError> {
    // A token directory with no entries means no token was ever created here.
    let tokens = cfg
        .hsm
        .softhsm_conf
        .as_ref()
        .and_then(|c| c.parent().map(|p| p.join("tokens")));
    Ok(match tokens {
        Some(dir) => std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false),
        None => true,
    })
}

/// The ready-to-paste commands printed when dev mode starts.
pub fn banner(dir: &Path, at: &Listening) -> String {
    let (d, addr) = (dir.display(), at.grpc);
    let metrics = at
        .metrics
        .map_or_else(|| "(disabled)".to_owned(), |m| m.to_string());
    let portal = at
        .portal
        .map_or_else(|| "(disabled)".to_owned(), |p| format!("https://{p}/"));
    format!(
        r#"Ward dev server — data, token, certificates and policy in {d}

  grpcurl (reflection, no proto files needed):
    grpcurl -cacert {d}/tls/ca.pem -cert {d}/tls/admin.pem -key {d}/tls/admin.key \
      -d '{{"name":"demo/db-password","value":"'$(printf 's3cret' | base64)'"}}' \
      {addr} ward.v1.Secrets/PutSecret
    grpcurl -cacert {d}/tls/ca.pem -cert {d}/tls/app.pem -key {d}/tls/app.key \
      -d '{{"name":"demo/db-password"}}' {addr} ward.v1.Secrets/FetchSecret

  wardctl:
    export WARD_ADDR=https://{addr} WARD_CA={d}/tls/ca.pem \
           WARD_CERT={d}/tls/admin.pem WARD_KEY={d}/tls/admin.key
    printf 's3cret' | wardctl put demo/db-password
    wardctl get demo/db-password
    wardctl issue demo/api-key --scope read:users
    wardctl ls
    wardctl keys stale --days 90
    wardctl audit tail
    wardctl audit verify

  metrics (plain HTTP, no certificate): curl http://{metrics}/metrics

  developer portal (HTTPS, client certificate required; docs/portal.md): {portal}
    curl --cacert {d}/tls/ca.pem --cert {d}/tls/admin.pem --key {d}/tls/admin.key {portal}keys

  identities: admin (every verb), app (read, verify) — edit {d}/policy.toml to change.
"#
    )
}

fn make_certificates(dir: &Path) -> Result<(), StartError> {
    let err = |e: rcgen::Error| StartError::Other(format!("creating dev certificates: {e}"));
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.distinguished_name
        .push(DnType::CommonName, "Ward dev CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key_pem = Zeroizing::new(ca_key.serialize_pem());
    let ca = CertifiedIssuer::self_signed(ca, ca_key).map_err(err)?;
    write_private(&dir.join("ca.pem"), ca.pem().as_bytes())?;
    write_private(&dir.join("ca.key"), ca_key_pem.as_bytes())?;

    let leaf = |name: &str, server: bool| -> Result<(), StartError> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, name);
        if server {
            p.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().map_err(err)?),
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
            ];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &ca).map_err(err)?;
        write_private(&dir.join(format!("{name}.pem")), cert.pem().as_bytes())?;
        write_private(
            &dir.join(format!("{name}.key")),
            Zeroizing::new(key.serialize_pem()).as_bytes(),
        )
    };
    leaf("server", true)?;
    leaf("admin", false)?;
    leaf("app", false)
}

/// Writes a file readable by the owner only (created 0600, never briefly wider).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StartError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StartError::Config(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| StartError::Config(format!("cannot write {}: {e}", path.display())))
}

fn random_pin() -> Zeroizing<String> {
    let mut b = Zeroizing::new([0u8; 16]);
    OsRng.fill_bytes(&mut b[..]);
    Zeroizing::new(hex::encode(&b[..]))
}
