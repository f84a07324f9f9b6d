//! What follows the vault's changes, above the domain: WatchSecrets streams ([`watch`]) and the
//! background sweeper ([`sweeper`]). Both learn of changes as [`ChangeSink`]s handed to the
//! vault at construction; the vault knows neither.
//!
//! Deadlines are judged at read time by `SecretRecord::standing` (model/); the sweeper only
//! makes stored states (and watchers) catch up.
//!
//! [`ChangeSink`]: crate::vault::ChangeSink

pub mod sweeper;
pub mod watch;

#[cfg(test)]
mod tests;
