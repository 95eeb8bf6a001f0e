//! The source: PostgreSQL logical replication.
//!
//! - [`conn`]: connection settings (`source.url`), SQL and replication sockets, TLS.
//! - [`replication`]: the replication protocol (IDENTIFY_SYSTEM, slots,
//!   START_REPLICATION, XLogData, keepalives, standby status updates).
//! - [`pgoutput`]: the zero-copy pgoutput message parser.
//! - [`value`]: typed values from pgoutput's text format.
//! - [`setup`]: idempotent checks and setup (tables, replica identity, publication, slot).

pub mod conn;
pub mod error;
pub mod recording;
pub mod replication;
pub mod setup;

pub use dbmazz_protocol::{pgoutput, value};
pub use error::{ServerError, SourceError};
