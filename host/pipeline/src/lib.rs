//! The pipeline: from pgoutput messages to batches, without I/O beyond the spill files of
//! large streamed transactions.
//!
//! - [`assembler`]: transactions in commit order; streamed transactions buffered per
//!   xid, spilled to disk when large, released at Stream Commit, dropped at Stream Abort.
//! - [`schema`]: the schema cache and schema change detection.
//! - [`batcher`]: batches cut by size and time, with stable ids across restarts.
//! - [`change`]: the types that flow: [`change::Change`], [`change::Batch`].
//!
//! The assembler takes its messages from the network: any sequence of them must end in
//! events or an error, never a panic. The `assembler` fuzz target in `fuzz/` drives this
//! crate with arbitrary message sequences (`scripts/fuzz.sh`). The host (`dbmazz`)
//! re-exports the crate as `dbmazz::pipeline`.

#![warn(missing_docs)]

pub mod assembler;
pub mod batcher;
pub mod change;
pub mod schema;
