//! Storage faults: a corrupted or truncated database makes the server refuse to start with a
//! clear message (exit 4) or answer DATA_LOSS for the affected records — never wrong
//! plaintext, never a panic; a full disk fails writes with UNAVAILABLE, leaves no partial
//! state, and the service recovers when space returns.

use std::collections::HashMap;
use std::path::Path;

use tonic::Code;
use ward_tests::{pb, TestServer};

use crate::put;

/// Copies every file of `from` into `to` (flat: sled's data dir has no subdirectories here).
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// What a start on a damaged database did.
#[derive(Debug)]
enum Outcome {
    /// Refused to start: exit code and first stderr line that says why.
    Refused(Option<i32>, String),
    /// Started: per secret, OK with the right value, DATA_LOSS, NOT_FOUND, or something else.
    Served {
        right: usize,
        data_loss: usize,
        missing: usize,
        other: Vec<String>,
    },
}

type Corruption = Box<dyn Fn(&Path)>;

fn corruptions() -> Vec<(&'static str, Corruption)> {
    let db = |d: &Path| d.join("db");
    let flip_at = |frac: f64| -> Corruption {
        Box::new(move |d: &Path| {
            let p = d.join("db");
            let mut b = std::fs::read(&p).unwrap();
            let i = ((b.len() as f64) * frac) as usize;
            let end = (i + 16).min(b.len());
            for x in &mut b[i..end] {
                *x ^= 0x5a;
            }
            std::fs::write(&p, b).unwrap();
        })
    };
    let truncate_to = |frac: f64| -> Corruption {
        Box::new(move |d: &Path| {
            let p = d.join("db");
            let len = std::fs::metadata(&p).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(((len as f64) * frac) as u64).unwrap();
        })
    };
    vec![
        ("flip 16 bytes at 5%", flip_at(0.05)),
        ("flip 16 bytes at 30%", flip_at(0.30)),
        ("flip 16 bytes at 60%", flip_at(0.60)),
        ("flip 16 bytes at 95%", flip_at(0.95)),
        ("truncate db to 90%", truncate_to(0.9)),
        ("truncate db to 50%", truncate_to(0.5)),
        ("truncate db to 10%", truncate_to(0.1)),
        ("truncate db to 0", truncate_to(0.0)),
        (
            "conf is garbage",
            Box::new(|d: &Path| std::fs::write(d.join("conf"), b"garbage\x00\xff").unwrap()),
        ),
        (
            "conf removed",
            Box::new(|d: &Path| std::fs::remove_file(d.join("conf")).unwrap()),
        ),
        (
            "db removed",
            Box::new(move |d: &Path| std::fs::remove_file(db(d)).unwrap()),
        ),
        (
            "blob files flipped",
            Box::new(|d: &Path| {
                for f in ward_tests::files_under(&d.join("blobs")) {
                    let mut b = std::fs::read(&f).unwrap();
                    let i = b.len() / 2;
                    b[i] ^= 0xff;
                    std::fs::write(&f, b).unwrap();
                }
            }),
        ),
        (
            "blob files removed",
            Box::new(|d: &Path| {
                for f in ward_tests::files_under(&d.join("blobs")) {
                    std::fs::remove_file(f).unwrap();
                }
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_or_truncated_database_never_yields_wrong_plaintext() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let mut values = HashMap::new();
    for i in 0..60 {
        let name = format!("corrupt/s{i:02}");
        let mut value = format!("value-{i}-{}", "z".repeat(i * 40)).into_bytes();
        if i % 20 == 7 {
            // Values near the limit land in sled's blob files.
            value.resize(64 * 1024, b'b');
        }
        put(&mut c, &name, &value).await;
        values.insert(name, value);
    }
    drop(c);
    s.stop();
    let data = s.data_dir().join("data");
    let pristine = s.scratch_dir().join("pristine");
    copy_dir(&data, &pristine);

    let mut report = Vec::new();
    for (what, corrupt) in corruptions() {
        copy_dir(&pristine, &data);
        corrupt(&data);
        let outcome = match s.try_restart() {
            Err(f) => Outcome::Refused(
                f.code,
                f.stderr
                    .lines()
                    .find(|l| l.contains("ward-server:") || l.contains("panicked"))
                    .unwrap_or("")
                    .to_owned(),
            ),
            Ok(()) => {
                let mut c = s.raw_client("admin").await;
                let (mut right, mut data_loss, mut missing, mut other) = (0, 0, 0, Vec::new());
                for (name, value) in &values {
                    match crate::fetch(&mut c, name, 0).await {
                        Ok(f) if &f.value == value => right += 1,
                        Ok(f) => panic!(
                            "{what}: {name} fetched WRONG plaintext ({} bytes)",
                            f.value.len()
                        ),
                        Err(st) if st.code() == Code::DataLoss => data_loss += 1,
                        Err(st) if st.code() == Code::NotFound => missing += 1,
                        Err(st) => other.push(format!("{name}: {:?} {}", st.code(), st.message())),
                    }
                }
                let _ = c
                    .list_secrets(pb::ListSecretsRequest::default())
                    .await
                    .map(|_| ());
                s.stop();
                Outcome::Served {
                    right,
                    data_loss,
                    missing,
                    other,
                }
            }
        };
        eprintln!("{what}: {outcome:?}");
        report.push((what, outcome));
    }
    // Every case either refused to start with exit 4 and a message that says the database is
    // damaged, or served only right values (DATA_LOSS where a record is damaged); no panic,
    // no silent loss of an acknowledged write, no wrong plaintext (checked above).
    for (what, outcome) in &report {
        match outcome {
            Outcome::Refused(code, msg) => {
                assert_eq!(*code, Some(4), "{what}: exit code ({msg})");
                assert!(
                    msg.contains("lost acknowledged writes") || msg.contains("damaged"),
                    "{what}: unclear refusal: {msg}"
                );
            }
            Outcome::Served {
                right,
                data_loss,
                missing,
                other,
            } => {
                assert!(other.is_empty(), "{what}: unexpected answers {other:?}");
                assert_eq!(
                    *missing, 0,
                    "{what}: {missing} acknowledged secrets silently gone"
                );
                assert_eq!(right + data_loss, values.len(), "{what}");
            }
        }
    }
    // The pristine copy still serves everything.
    copy_dir(&pristine, &data);
    s.restart();
    let mut c = s.raw_client("admin").await;
    for (name, value) in &values {
        crate::assert_value(&mut c, name, 0, value).await;
    }
}
