//! The commands, one module per group, each with its arguments and what it runs.

pub mod admin;
pub mod alerts;
pub mod audit;
pub mod backup;
pub mod keys;
pub mod lifecycle;
pub mod scan;
pub mod secrets;
pub mod watch;
