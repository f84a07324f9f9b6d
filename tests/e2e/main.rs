//! Ward end-to-end suite: one test binary, every test against its own real `ward-server`
//! process (SoftHSM token, mTLS, sled) in a temporary data directory.
//!
//! Build the binaries first, with every feature (`cargo build --workspace --bins
//! --all-features`; `make test` does): the storage-fault tests need ward-server's
//! `fault-injection` feature. The cluster tests run a real etcd (Debian's `etcd-server`, `make
//! deps` installs it; `ETCD_BIN` names another). Then run `cargo nextest run -p ward-tests
//! --all-features`. The two tmpfs tests fail where `mount` is refused, unless
//! `WARD_TEST_ALLOW_SKIP=1` asks to skip them (the injected-fault tests cover the same paths
//! without a mount).
// Tests state their expectations with unwrap/expect and a message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod alerts;
mod audit;
mod audit_files;
mod authz;
mod backup;
mod certs;
mod cluster;
mod cluster_faults;
mod crash;
mod crls;
mod disk;
mod durability;
mod extauthz;
mod failover;
mod grants;
mod hardening;
mod hsm_faults;
mod integrity;
mod key_schedule;
mod keyring;
mod keys;
mod keys_lifecycle;
mod lifecycle;
mod lifecycle_tools;
mod limits;
mod metrics;
mod pagination;
mod portal;
mod roundtrip;
mod rpcs;
mod scan;
mod sdk;
mod semantics;
mod shutdown;
mod slow_watcher;
mod startup;
mod storage;
mod tools;
mod validation;
mod verify;
mod wire;

use std::collections::HashMap;

use tonic::{Code, Status};
use ward_tests::{ok, pb, RawClient};

/// A PutSecret request with only a name and a value.
pub fn put_req(name: &str, value: &[u8]) -> pb::PutSecretRequest {
    pb::PutSecretRequest {
        name: name.to_owned(),
        value: value.to_vec(),
        ..Default::default()
    }
}

/// An UpdateKeyPolicy request that sets (or, with `None`, clears) only the quota of `name`.
pub fn quota_update(name: &str, quota: Option<pb::Quota>) -> pb::UpdateKeyPolicyRequest {
    pb::UpdateKeyPolicyRequest {
        name: name.to_owned(),
        policy: Some(pb::KeyPolicy {
            quota,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["quota".into()],
        }),
        request_id: String::new(),
    }
}

/// Puts `value` under `name` and returns the response (panics unless OK).
pub async fn put(c: &mut RawClient, name: &str, value: &[u8]) -> pb::PutSecretResponse {
    ok(
        c.put_secret(put_req(name, value)).await,
        &format!("put {name}"),
    )
}

/// FetchSecret of `name` at `version` (0 = PRIMARY).
pub async fn fetch(
    c: &mut RawClient,
    name: &str,
    version: u64,
) -> Result<pb::FetchSecretResponse, Status> {
    c.fetch_secret(pb::FetchSecretRequest {
        name: name.to_owned(),
        version,
    })
    .await
    .map(|r| r.into_inner())
}

/// Fetches `name`@`version` and asserts it holds `value`.
pub async fn assert_value(c: &mut RawClient, name: &str, version: u64, value: &[u8]) {
    let got = ok(
        c.fetch_secret(pb::FetchSecretRequest {
            name: name.to_owned(),
            version,
        })
        .await,
        &format!("fetch {name}@{version}"),
    );
    assert!(
        got.value == value,
        "{name}@{version}: value differs ({} bytes, expected {})",
        got.value.len(),
        value.len()
    );
    assert_eq!(
        got.checksum,
        ward_tests::crc32c(value),
        "{name}@{version}: checksum"
    );
}

/// DescribeSecret of `name`.
pub async fn describe(c: &mut RawClient, name: &str) -> Result<pb::SecretMetadata, Status> {
    c.describe_secret(pb::DescribeSecretRequest {
        name: name.to_owned(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Walks every page of `req` (its page_token is overwritten), checking that each page respects
/// the page size and that only the last page has an empty next_page_token. Returns every
/// secret in the order received.
pub async fn list_pages(
    c: &mut RawClient,
    mut req: pb::ListSecretsRequest,
) -> Result<Vec<pb::SecretMetadata>, Status> {
    let limit = if req.page_size == 0 {
        100
    } else {
        req.page_size as usize
    };
    req.page_token.clear();
    let mut all = Vec::new();
    for _ in 0..10_000 {
        let page = c.list_secrets(req.clone()).await?.into_inner();
        assert!(
            page.secrets.len() <= limit,
            "page of {} secrets exceeds page_size {limit}",
            page.secrets.len()
        );
        all.extend(page.secrets);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        req.page_token = page.next_page_token;
    }
    panic!("ListSecrets never returned an empty next_page_token");
}

/// The names of every secret the listing (all pages, no filters) shows.
pub async fn all_names(c: &mut RawClient) -> Vec<String> {
    list_pages(c, pb::ListSecretsRequest::default())
        .await
        .expect("list all")
        .into_iter()
        .map(|m| m.name)
        .collect()
}

/// A map from string pairs.
pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Asserts `r` failed with `code`.
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) {
    ward_tests::expect_code(r, code, what);
}
