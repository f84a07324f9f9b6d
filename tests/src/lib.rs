//! End-to-end harness: runs the real `ward-server` binary (real SoftHSM token, real mTLS) in a
//! temporary data directory and hands out clients for it: the SDK, a raw generated client,
//! `wardctl` and `grpcurl`.
//!
//! Each [`TestServer`] owns its own data directory and port, so tests run in parallel. The child's
//! stdout and stderr are drained by background threads for its whole life (a full pipe would
//! block the server) and kept, so a failure message can show the server's last words and a test
//! can check that no secret ever reached a log line.
//!
//! - `server`: [`TestServer`] itself: start, stop, kill, restart, configuration edits, test clock;
//! - `process`: one server child process, its ready line, how a start failed;
//! - `logs`: every line the server printed, and the searches on it;
//! - `pki`: CAs, client and server certificates, CRLs, certificate files;
//! - `clients`: mTLS channels, generated clients, the SDK, the metrics listener;
//! - `tools`: `wardctl` and `grpcurl` runs;
//! - `token`: the dev SoftHSM token and its key objects;
//! - `cluster`: [`WardCluster`], Ward replicas sharing an etcd cluster, a token and a CA;
//! - `etcd`: [`EtcdCluster`], a real etcd cluster on loopback for the replicas' store;
//! - `faults`: storage faults injected into a running server; `disk`: a tmpfs to fill;
//! - `helpers`: call results, checksums, files, watch streams;
//! - `webhook`: a webhook receiver that checks Standard Webhooks signatures itself.
// A harness step that fails is a failed test; unwrap/expect with a message is how it says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod clients;
mod cluster;
mod disk;
mod etcd;
mod faults;
mod helpers;
mod logs;
mod pki;
mod process;
pub mod segments;
mod server;
mod token;
mod tools;
mod webhook;

pub use ward::v1 as pb;

pub use clients::{connect_channel, connect_raw, AuditClient, AuthzClient, KeysClient, RawClient};
pub use cluster::{ClusterOptions, WardCluster, ETCD_PREFIX};
pub use disk::Tmpfs;
pub use etcd::{etcd_bin, EtcdCluster, EtcdOptions};
pub use faults::FAULT_FILE_ENV;
pub use helpers::{
    crc32c, expect_code, files_containing, files_under, move_entries, next_event, ok,
    open_stopped_db, random_hex, replace_file, skip_or_fail, until_synced, ALLOW_SKIP_ENV,
};
pub use pki::{foreign_identity, CertFiles, TestCa};
pub use process::{
    server_bin, FailedStart, METRICS_PREFIX, PORTAL_PREFIX, READY_PREFIX, START_TIMEOUT,
    STOP_TIMEOUT,
};
pub use server::{TestServer, TEST_CLOCK_FILE, TEST_SWEEP_INTERVAL_MS};
pub use tools::{run_tool, wardctl_bin, TOOL_TIMEOUT};
pub use webhook::{Delivery, WebhookReceiver};
