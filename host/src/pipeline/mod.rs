//! The pipeline: from pgoutput messages to batches.
//!
//! - [`assembler`]: transactions in commit order; streamed transactions buffered per
//!   xid, spilled to disk when large, released at Stream Commit, dropped at Stream Abort.
//! - [`schema`]: the schema cache and schema change detection.
//! - [`batcher`]: batches cut by size and time, with stable ids across restarts.
//! - [`change`]: the types that flow: [`change::Change`], [`change::Batch`].

pub mod assembler;
pub mod batcher;
pub mod change;
pub mod schema;
