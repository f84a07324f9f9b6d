//! Ward SDK: a mutual-TLS gRPC client for the Ward secrets vault, with per-call timeouts,
//! retries of calls that are safe to repeat, failover between the replicas of a cluster, one
//! error type, and a [`Cache`] that keeps fetched secrets current through `WatchSecrets`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ward_client::Error> {
//! use ward_client::{Client, ClientConfig};
//!
//! let cfg = ClientConfig::from_files(
//!     "127.0.0.1:8443",
//!     ".ward-dev/tls/ca.pem",
//!     ".ward-dev/tls/app.pem",
//!     ".ward-dev/tls/app.key",
//! )?;
//! let client = Client::connect(cfg).await?;
//! let secret = client.fetch_secret_zeroizing("payments/db-password", 0).await?;
//! println!("version {} has {} bytes", secret.metadata.version, secret.value.len());
//! # Ok(()) }
//! ```
//!
//! Responses are the generated wire types, re-exported as [`proto`]. Secret values arrive in
//! `FetchSecretResponse::value` and API keys in `IssueKeyResponse::api_key`: the derived
//! `Debug` of those types prints them, so never log a whole response.
#![deny(missing_docs)]

mod cache;
mod client;
mod config;
mod endpoints;
mod error;
mod retry;

/// The generated `ward.v1` wire types and client (e.g. `proto::PutSecretRequest`).
pub use ward::v1 as proto;

pub use cache::{
    Cache, CacheConfig, CacheEvent, CachedSecret, SystemTimeSource, TimeSource, DEFAULT_MAX_STALE,
};
pub use client::{Client, FetchedSecret, WatchStream};
pub use config::{
    normalize_endpoint, parse_duration, parse_endpoints, ClientConfig, DEFAULT_ADDR,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_FAILOVER_BACKOFF, DEFAULT_FAILOVER_BACKOFF_MAX, DEFAULT_PORT,
    DEFAULT_TIMEOUT, ENV_ADDR, ENV_CA, ENV_CERT, ENV_KEY, ENV_SERVER_NAME, ENV_TIMEOUT,
};
pub use endpoints::EndpointStatus;
pub use error::Error;
pub use retry::RetryPolicy;
/// The gRPC status code type used by [`Error::code`].
pub use tonic::Code;
/// The canonical upper-case name of a gRPC code, e.g. `NOT_FOUND` (Ward's one table, in the
/// wire crate).
pub use ward::status::status_code_name as code_name;
