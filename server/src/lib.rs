//! Ward server: a gRPC secrets vault over mutual TLS. Secrets are envelope-encrypted under a
//! master key that never leaves a PKCS#11 HSM and kept in an embedded sled database.
//!
//! The data path reads top to bottom: transport (`service`, `keys_service`, `extauthz`,
//! `admin_service`, `audit_service`, `tls`, `limits`) → `policy` → domain (`keys` above `vault`,
//! `lifecycle`, `model`, `keypolicy`) → `envelope` → `store`, with `audit` and `metrics`
//! alongside, and `slots` (per-identity counts) a leaf below transport and domain.
#![deny(missing_docs)]

pub mod admin_service;
pub mod audit;
pub mod audit_service;
pub mod backup;
pub mod catch_panic;
pub mod clock;
pub mod config;
pub mod dev;
pub mod envelope;
pub mod error;
pub mod extauthz;
pub mod harden;
pub mod keypolicy;
pub mod keys;
pub mod keys_service;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod policy;
#[cfg(test)]
mod proptests;
pub mod server;
pub mod service;
pub mod slots;
pub mod status;
pub mod store;
#[cfg(test)]
mod testutil;
pub mod tls;
pub mod unseal;
pub mod vault;
