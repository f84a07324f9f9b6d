//! `scan`: reports the Ward API keys found in files, asks the server which are live (--check)
//! and revokes them after confirmation (--revoke), reporting each as leaked first (ReportLeak).
//! The finding itself is [`crate::scan`].

use std::collections::{HashMap, HashSet};
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use ward_client::proto::{
    ReportLeakRequest, RevokeSecretRequest, VerifyKeyRequest, VerifyKeyResponse, VerifyResult,
};
use ward_client::{code_name, Client, ClientConfig, Code};

use crate::failure::Failure;
use crate::output::{print_json, result_name};
use crate::scan::{scan_paths, Finding, Standing};

/// Arguments of `scan`.
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Files or directories (default: .)
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Ask the server whether each key found is live (needs the verify verb on the keys; a key
    /// the server will not tell about is reported as such and fails the scan)
    #[arg(long)]
    pub check: bool,
    /// Revoke the live keys found, after confirmation (implies --check)
    #[arg(long)]
    pub revoke: bool,
    /// Do not ask for confirmation before revoking
    #[arg(long, requires = "revoke")]
    pub yes: bool,
}

/// The server's verdict on each distinct key found, by key.
type Verdicts = HashMap<String, Result<VerifyKeyResponse, String>>;

/// Runs `scan`.
pub async fn scan(cfg: ClientConfig, args: ScanArgs, json: bool) -> Result<(), Failure> {
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.paths
    };
    for p in &paths {
        if !p.exists() {
            return Err(Failure::Usage(format!(
                "{}: no such file or directory",
                p.display()
            )));
        }
    }
    let mut findings = Vec::new();
    let summary = scan_paths(&paths, |f| findings.push(f));
    for (path, err) in &summary.errors {
        eprintln!("warning: {}: {err}", path.display());
    }
    let check = args.check || args.revoke;
    // One verification per distinct key (a key pasted in ten places is asked about once).
    let mut verdicts = Verdicts::new();
    let mut client = None;
    if check && !findings.is_empty() {
        let client = client.insert(Client::connect(cfg).await?);
        for f in &findings {
            if verdicts.contains_key(f.key.expose()) {
                continue;
            }
            let v = client
                .verify_key(VerifyKeyRequest {
                    api_key: f.key.expose().to_owned(),
                    cost: Some(0),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("{}: {}", code_name(e.code()), e.message()));
            verdicts.insert(f.key.expose().to_owned(), v);
        }
    }
    let (mut live, mut unknown) = (0, 0);
    let mut rows = Vec::new();
    let mut out = io::stdout().lock();
    for f in &findings {
        let (what, standing) = status(&verdicts, f.key.expose());
        let counts_live = matches!(standing, Standing::Live | Standing::Unchecked);
        if counts_live {
            live += 1;
        } else if standing == Standing::CannotTell {
            unknown += 1;
        }
        if json {
            rows.push(json!({
                "path": f.path.display().to_string(),
                "line": f.line,
                "column": f.column,
                "preview": f.key.redacted(),
                "status": what,
                "standing": standing.name(),
                "live": counts_live,
            }));
        } else {
            writeln!(
                out,
                "{}:{}:{}: {}\t{what}",
                f.path.display(),
                f.line,
                f.column,
                f.key.redacted()
            )?;
        }
    }
    drop(out);
    if json {
        print_json(&Value::Array(rows))?;
    }
    eprintln!(
        "scanned {} files ({} skipped): {} keys found{}",
        summary.files,
        summary.skipped,
        findings.len(),
        if check {
            format!(", {live} live, {unknown} cannot tell")
        } else {
            String::new()
        }
    );
    if args.revoke && live > 0 {
        if let Some(client) = &client {
            revoke_found(client, &findings, &verdicts, args.yes).await?;
        }
    }
    if live > 0 || unknown > 0 {
        Err(Failure::Found)
    } else {
        Ok(())
    }
}

/// What to say about a key found, and its standing, from the server's verdict (if asked).
fn status(verdicts: &Verdicts, key: &str) -> (String, Standing) {
    match verdicts.get(key) {
        None => ("unchecked".into(), Standing::Unchecked),
        Some(Ok(v)) => {
            let standing = Standing::of(v.result);
            let what = if v.name.is_empty() {
                result_name(v.result)
            } else {
                format!("{} ({}@{})", result_name(v.result), v.name, v.version)
            };
            let text = match standing {
                Standing::Live => format!("LIVE {what}"),
                Standing::CannotTell if v.result == VerifyResult::NotFound as i32 => format!(
                    "CANNOT TELL {what} (never issued here, or this identity may not verify \
                     it)"
                ),
                Standing::CannotTell => format!("CANNOT TELL {what}"),
                _ => what,
            };
            (text, standing)
        }
        // Could not tell: a broken check never passes a leak.
        Some(Err(e)) => (
            format!("CANNOT TELL: check failed: {e}"),
            Standing::CannotTell,
        ),
    }
}

/// Revokes, after confirmation, the version behind each live key found (each once). A key that
/// is its secret's PRIMARY is left alone with a hint: revoking it needs a successor, which only
/// a rotation can make, and choosing to rotate is the owner's call.
async fn revoke_found(
    client: &Client,
    findings: &[Finding],
    verdicts: &Verdicts,
    yes: bool,
) -> Result<(), Failure> {
    if !yes && !io::stdin().is_terminal() {
        return Err(Failure::Usage(
            "--revoke asks before each revocation; without a terminal, pass --yes".into(),
        ));
    }
    let mut done = HashSet::new();
    for f in findings {
        let Some(Ok(v)) = verdicts.get(f.key.expose()) else {
            continue;
        };
        if Standing::of(v.result) != Standing::Live
            || v.name.is_empty()
            || !done.insert((v.name.clone(), v.version))
        {
            continue;
        }
        let at = format!("{}:{}", f.path.display(), f.line);
        if !yes {
            eprint!("revoke {}@{} (found at {at})? [y/N] ", v.name, v.version);
            let mut answer = String::new();
            io::stdin().read_line(&mut answer)?;
            if !answer.trim().eq_ignore_ascii_case("y") {
                eprintln!("skipped {}@{}", v.name, v.version);
                continue;
            }
        }
        // Recorded as a `key.leak_reported` alert (webhooks, WatchAlerts) whatever the
        // revocation's fate.
        let report = ReportLeakRequest {
            api_key: f.key.expose().to_owned(),
            location: at.clone(),
            source: "wardctl scan".into(),
            quarantine: false,
        };
        if let Err(e) = client.report_leak(report).await {
            eprintln!(
                "leak of {}@{} not reported: {}: {}",
                v.name,
                v.version,
                code_name(e.code()),
                e.message()
            );
        }
        let req = RevokeSecretRequest {
            name: v.name.clone(),
            version: v.version,
            reason: format!("leaked: found by wardctl scan at {at}"),
            ..Default::default()
        };
        match client.revoke_secret(req).await {
            Ok(_) => eprintln!("revoked {}@{}", v.name, v.version),
            Err(e) if e.code() == Code::FailedPrecondition => eprintln!(
                "not revoked {}@{}: {}; rotate it first (wardctl rotate {}), then revoke \
                 version {}",
                v.name,
                v.version,
                e.message(),
                v.name,
                v.version
            ),
            Err(e) => eprintln!(
                "not revoked {}@{}: {}: {}",
                v.name,
                v.version,
                code_name(e.code()),
                e.message()
            ),
        }
    }
    Ok(())
}
