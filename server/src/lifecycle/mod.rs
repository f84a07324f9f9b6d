//! Key lifecycle: rotation with an overlap window, revocation, version states, destruction,
//! expiry, scheduled rotation and watching for changes.
//!
//! - [`machine`]: the version state machine, as pure operations on a `SecretRecord`.
//! - [`input`]: lifecycle fields as received, parsed into types that cannot be invalid.
//! - [`ops`]: the RPCs' domain operations (`impl Vault`), each one audited, durable write.
//! - [`watch`]: WatchSecrets — differences from what a client holds, then live changes from an
//!   in-process broadcast fed by the write path.
//! - [`sweeper`]: the background task that stores deadline-driven states, rotates API keys
//!   when due and flags STATIC secrets whose rotation is due.
//!
//! Deadlines are judged at read time by `SecretRecord::standing` (model.rs); the sweeper only
//! makes stored states (and watchers) catch up.

pub mod input;
pub mod machine;
pub mod ops;
pub mod sweeper;
pub mod watch;

#[cfg(test)]
mod tests;
