//! The `admin` commands: keyring and master-key rotation, the keyring's state, and a backup.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{json, Value};

use ward_client::{Client, ClientConfig};

use super::backup::write_backup;
use crate::failure::Failure;
use crate::output::{print_answer, print_json, print_line};

/// `wardctl admin …`
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Add a keyring term; new versions are sealed under it (older ones keep theirs)
    RotateKeyring,
    /// Create a new HSM master key and rewrap the keyring under it (O(terms), online)
    RotateMasterKey {
        /// Label of the new master key (default: derived, e.g. ward-master-1 → ward-master-2)
        #[arg(long, default_value = "")]
        new_label: String,
    },
    /// Show the keyring's terms, master key and its wrap count
    Keyring,
    /// Write a consistent backup of the whole vault to FILE (still encrypted: restoring it with
    /// `ward-server restore` needs the same HSM master key). FILE must not exist; it is
    /// created 0600 and appears only once complete
    Backup {
        /// Where to write the backup
        file: PathBuf,
    },
}

/// Runs an `admin` command.
pub async fn run(cfg: ClientConfig, cmd: AdminCommand, json: bool) -> Result<(), Failure> {
    let client = Client::connect(cfg).await?;
    match cmd {
        AdminCommand::RotateKeyring => {
            let r = client.rotate_keyring().await?;
            print_answer(
                json,
                &json!({"term": r.term, "master_key_label": r.master_key_label}),
                &format!(
                    "keyring term {} (wrapped by {})",
                    r.term, r.master_key_label
                ),
            )
        }
        AdminCommand::RotateMasterKey { new_label } => {
            let r = client.rotate_master_key(new_label).await?;
            print_answer(
                json,
                &json!({
                    "previous_label": r.previous_label,
                    "master_key_label": r.master_key_label,
                    "terms_rewrapped": r.terms_rewrapped,
                }),
                &format!(
                    "master key {} -> {} ({} keyring terms rewrapped)",
                    r.previous_label, r.master_key_label, r.terms_rewrapped
                ),
            )
        }
        AdminCommand::Backup { file } => {
            let bytes = write_backup(&client, &file).await?;
            print_answer(
                json,
                &json!({"file": file.display().to_string(), "bytes": bytes}),
                &format!("backup of {bytes} bytes written to {}", file.display()),
            )
        }
        AdminCommand::Keyring => {
            let k = client.describe_keyring().await?;
            if json {
                let terms: Vec<Value> = k
                    .terms
                    .iter()
                    .map(|t| json!({"term": t.term, "master_key_label": t.master_key_label}))
                    .collect();
                return print_json(&json!({
                    "current_term": k.current_term,
                    "master_key_label": k.master_key_label,
                    "master_key_wraps": k.master_key_wraps,
                    "master_key_wrap_limit": k.master_key_wrap_limit,
                    "terms": terms,
                }));
            }
            let mut out = format!(
                "master key {} ({} of {} wraps)\ncurrent term {}\n",
                k.master_key_label, k.master_key_wraps, k.master_key_wrap_limit, k.current_term
            );
            for t in &k.terms {
                out.push_str(&format!("term {}\t{}\n", t.term, t.master_key_label));
            }
            print_line(out.trim_end())
        }
    }
}
