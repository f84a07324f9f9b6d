//! The developer portal in a real browser: tests/portal/portal_flows.py drives Debian's
//! chromium through Playwright (client certificates given with `client_certificates`, never a
//! browser download) against this server, and checks each result over gRPC with grpcurl.
//! `make deps` installs chromium and Playwright; without them this test fails (or, with
//! WARD_TEST_ALLOW_SKIP=1, is skipped saying so).

use std::path::{Path, PathBuf};
use std::process::Command;

use ward_tests::{skip_or_fail, TestServer};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Where the flows save their screenshots: `$WARD_PORTAL_SCREENSHOTS`, else the server's
/// scratch folder.
fn screenshots(s: &TestServer) -> PathBuf {
    let dir = std::env::var_os("WARD_PORTAL_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| s.scratch_dir().join("screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tools_missing() -> Option<String> {
    if !Path::new(CHROMIUM).exists() {
        return Some(format!(
            "{CHROMIUM} is missing (apt-get install chromium; make deps)"
        ));
    }
    let pw = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .output();
    match pw {
        Ok(o) if o.status.success() => None,
        _ => Some("Playwright for Python is missing (pip install playwright; make deps)".into()),
    }
}

#[test]
fn browser_flows_create_reveal_roll_revoke_and_refusals() {
    if let Some(why) = tools_missing() {
        skip_or_fail("portal browser flows", &why);
        return;
    }
    let s = TestServer::start();
    let admin = s.identity_files("admin");
    let app = s.identity_files("app");
    let nobody = s.issue_dev_cert("nobody", None);
    let shots = screenshots(&s);
    let id = |f: &ward_tests::CertFiles| serde_json::json!({"cert": f.cert, "key": f.key});
    let cfg = serde_json::json!({
        "portal": format!("https://{}", s.portal_addr()),
        "grpc": s.addr().to_string(),
        "ca": admin.ca,
        "chromium": CHROMIUM,
        "screenshots": shots,
        "identities": {"admin": id(&admin), "app": id(&app), "nobody": id(&nobody)},
    });
    let cfg_path = s.scratch_dir().join("portal-flows.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("portal/portal_flows.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&cfg_path)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "portal flows failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- server ---\n{}",
        s.stderr_tail(40)
    );
    assert!(stdout.contains("all portal flows passed"), "{stdout}");
    for shot in [
        "portal-keys",
        "portal-create",
        "portal-reveal",
        "portal-key",
        "portal-preview",
    ] {
        assert!(
            shots.join(format!("{shot}.png")).exists(),
            "no screenshot {shot}"
        );
    }
    // The reveal screenshot masks the key; the server's output never holds it.
    assert!(
        !s.all_output().contains("ward_dev_"),
        "a key reached the server's output"
    );
}

/// GET `path` on the portal with curl as the holder of `cert`, with extra headers: (HTTP
/// status, body).
fn curl(
    s: &TestServer,
    cert: &ward_tests::CertFiles,
    path: &str,
    headers: &[&str],
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "20", "-w", "\n%{http_code}", "--cacert"])
        .arg(&cert.ca)
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("https://{}{path}", s.portal_addr()))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Behind an SSO proxy: the configured header names the user, believed only from a trusted
/// proxy's certificate; anyone else sending it is refused, and so is a proxy naming no user
/// or a user that is not a valid identity.
#[test]
fn identity_header_only_from_trusted_proxies() {
    let mut s = TestServer::start();
    s.edit_config(|c| {
        c.replacen(
            "[portal]\n",
            "[portal]\nidentity_header = \"x-forwarded-user\"\ntrusted_proxies = [\"sso-proxy\"]\n",
            1,
        )
    });
    s.restart();
    let proxy = s.issue_dev_cert("sso-proxy", None);
    let admin = s.identity_files("admin");

    let (code, body) = curl(&s, &proxy, "/keys", &["X-Forwarded-User: admin"]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(r#"<code id="identity">admin</code>"#),
        "{body}"
    );
    let (code, _) = curl(&s, &proxy, "/keys", &[]);
    assert_eq!(code, 401, "a trusted proxy must name a user");
    let (code, _) = curl(&s, &admin, "/keys", &["X-Forwarded-User: someone-else"]);
    assert_eq!(code, 403, "only a trusted proxy may name the user");
    let (code, _) = curl(
        &s,
        &proxy,
        "/keys",
        &["X-Forwarded-User: spiffe://ward/admin"],
    );
    assert_eq!(
        code, 400,
        "a user that looks like a URI identity is refused"
    );
    let (code, body) = curl(&s, &admin, "/keys", &[]);
    assert_eq!(
        code, 200,
        "without the header a certificate is its own identity"
    );
    assert!(body.contains(r#"<code id="identity">admin</code>"#));
}
