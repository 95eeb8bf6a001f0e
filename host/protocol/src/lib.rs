//! The PostgreSQL formats dbmazz reads, as pure functions over bytes: no I/O, no async,
//! no state beyond the message at hand.
//!
//! - [`lsn`]: log sequence numbers (`XXX/XXX`).
//! - [`frame`]: CopyData frames of the streaming replication protocol (XLogData, primary
//!   keepalive).
//! - [`pgoutput`]: the zero-copy pgoutput message parser (and, for tests and benchmarks,
//!   an encoder).
//! - [`value`]: typed values from pgoutput's text format.
//! - [`copy_text`]: COPY's text format escapes.
//!
//! Everything here takes input from the network and must answer any byte string with a
//! value or an error, never a panic: the fuzz targets in `fuzz/` exercise these functions
//! (`scripts/fuzz.sh`). The host (`dbmazz`) re-exports the modules where they used to
//! live (`dbmazz::lsn`, `dbmazz::source::{pgoutput, value}`).

#![warn(missing_docs)]

pub mod copy_text;
pub mod frame;
pub mod lsn;
pub mod pgoutput;
pub mod value;
