//! Ward server: a gRPC secrets vault over mutual TLS. Secrets are envelope-encrypted under a
//! master key that never leaves a PKCS#11 HSM and kept in an embedded sled database.
//!
//! Data flows one way, and the folders say so (docs/architecture.md draws it):
//!
//! ```text
//! server, dev, main      wiring: configuration → HSM → store → vault → listeners
//! cluster                wiring of replicas on etcd: replica id, the store's change follower
//! grpc/                  transport: one file per service, wire.rs, status mapping, layers
//! portal/                the developer portal: HTTPS pages beside grpc/, same domain calls
//! changes/               watch streams and the sweeper: follow the vault's changes
//! keys/                  API-key verification at the edge: directory, GCRA, quota
//! alerts/                abuse signals, the alert writer, the webhook outbox and its delivery
//! vault/                 the domain: every operation, one write path (vault/write.rs)
//! audit/                 the tamper-evident audit log, its access and verification
//! unseal, envelope       the keyring: unsealed by the HSM, seals values
//! store/                 the store trait, sled, etcd, record MACs
//! model/, policy, config, tls, identity, clock, error, metrics, slots, harden — leaves
//! ```
#![deny(missing_docs)]

pub mod alerts;
pub mod audit;
pub mod changes;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dev;
pub mod envelope;
pub mod error;
pub(crate) mod faults;
pub mod grpc;
pub mod harden;
pub mod identity;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod portal;
#[cfg(test)]
mod proptests;
pub mod server;
pub mod slots;
pub mod store;
#[cfg(test)]
mod testutil;
pub mod tls;
pub mod unseal;
pub mod vault;
